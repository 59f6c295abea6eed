//! Host resources behind virtio devices: tap devices and locked disk images.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors opening host resources.
#[derive(Debug, thiserror::Error)]
pub enum HostIoError {
    #[error("cannot open disk image {path}")]
    OpenDisk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is in use by {holder}; a disk has one writer at a time")]
    DiskInUse { path: PathBuf, holder: String },
    #[error("cannot flush and release disk image {path}")]
    Release {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes; it must be a non-empty multiple of 512")]
    DiskSize { path: PathBuf, size: u64 },
    #[error("cannot open tap {name} (does /dev/net/tun exist, and may this user create taps?)")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach tap {tap} to bridge {bridge} (does the bridge exist?)")]
    Bridge {
        tap: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
}

/// Open a raw disk image and lock it: exclusively for a writable disk, shared for a read-only
/// one. A second writer gets an error naming the holder.
pub fn open_disk(path: &Path, read_only: bool) -> Result<File, HostIoError> {
    let file = open_disk_unlocked(path, read_only)?;
    lock_disk(&file, path, read_only)?;
    Ok(file)
}

/// Open a raw disk image without locking it (a migration's destination, which takes the lock
/// only when the source has let go of it).
pub fn open_disk_unlocked(path: &Path, read_only: bool) -> Result<File, HostIoError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| HostIoError::OpenDisk {
            path: path.into(),
            source,
        })?;
    let size = file
        .metadata()
        .map_err(|source| HostIoError::OpenDisk {
            path: path.into(),
            source,
        })?
        .len();
    if size == 0 || !size.is_multiple_of(512) {
        return Err(HostIoError::DiskSize {
            path: path.into(),
            size,
        });
    }
    Ok(file)
}

/// Take the lock on an open disk image (the lock belongs to the open file description, so
/// any duplicate of `file` holds it too).
pub fn lock_disk(file: &File, path: &Path, read_only: bool) -> Result<(), HostIoError> {
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(HostIoError::DiskInUse {
            path: path.into(),
            holder: lock_holder(file),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(HostIoError::OpenDisk {
            path: path.into(),
            source,
        }),
    }
}

/// Flush an image to stable storage and let go of its lock.
pub fn release_disk(file: &File, path: &Path) -> Result<(), HostIoError> {
    file.sync_data()
        .and_then(|_| file.unlock())
        .map_err(|source| HostIoError::Release {
            path: path.into(),
            source,
        })
}

/// Who holds a lock on `file`, from /proc/locks.
fn lock_holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let ino = meta.ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:567 0 EOF"
        let Some(pos) = f
            .iter()
            .position(|w| w.matches(':').count() == 2 && w.contains(':'))
        else {
            continue;
        };
        if pos == 0
            || f[pos]
                .rsplit(':')
                .next()
                .and_then(|i| i.parse::<u64>().ok())
                != Some(ino)
        {
            continue;
        }
        let pid = f[pos - 1];
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        return if cmd.is_empty() {
            format!("process {pid}")
        } else {
            format!("process {pid} ({cmd})")
        };
    }
    "another process".into()
}

/// Take over a listening TCP socket inherited from the parent process as descriptor `fd` (the
/// host daemon binds a migration port and hands it to the VMM it starts, so no other process
/// can take the port in between).
pub fn inherited_listener(fd: i32) -> io::Result<std::net::TcpListener> {
    // SAFETY: fstat on a descriptor number only reads its metadata into `st`; a bad number gives
    // EBADF, checked below.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other(format!("descriptor {fd} is not a socket")));
    }
    // SAFETY: `fd` is an open socket this process was given to own (the parent passed it for
    // exactly this use and keeps no claim on this process's copy); nothing else here owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let l = std::net::TcpListener::from(owned);
    l.local_addr()?;
    Ok(l)
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// flags (c_short) or ifindex (c_int), and padding to the kernel's 40-byte `struct ifreq`.
    data: [u8; 24],
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: [0; 24],
    };
    let n = name.len().min(libc::IFNAMSIZ - 1);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn ioctl(fd: &impl AsRawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a properly sized, initialised `struct ifreq` that outlives the call;
    // the kernel reads and writes at most its 40 bytes.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bring interface `name` up.
fn set_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut r = ifreq(name);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut r)?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Open (or create) tap `name`, non-blocking, without packet info, with a 12-byte virtio-net
/// header on every frame (so a guest's checksum and segmentation offloads pass through), and
/// bring it up.
pub fn open_tap(name: &str) -> Result<File, HostIoError> {
    let err = |source| HostIoError::Tap {
        name: name.into(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(err)?;
    let mut r = ifreq(name);
    r.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    ioctl(&file, TUNSETIFF, &mut r).map_err(err)?;
    let hdr: libc::c_int = ferry_devices::virtio::net::HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr`.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // Nothing offloaded until a driver takes it (`set_tap_offload`).
    set_tap_offload(&file, 0).map_err(err)?;
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0
    {
        return Err(err(io::Error::last_os_error()));
    }
    set_up(name).map_err(err)?;
    Ok(file)
}

/// Tell tap `tap` what the guest takes unfinished (`TUN_F_*`: partial checksums, TCP segments).
pub fn set_tap_offload(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attach interface `tap` to bridge `bridge`.
pub fn attach_to_bridge(tap: &str, bridge: &str) -> Result<(), HostIoError> {
    let err = |source| HostIoError::Bridge {
        tap: tap.into(),
        bridge: bridge.into(),
        source,
    };
    let cname = std::ffi::CString::new(tap).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let sock = inet_socket().map_err(err)?;
    let mut r = ifreq(bridge);
    r.data[..4].copy_from_slice(&(index as libc::c_int).to_ne_bytes());
    ioctl(&sock, SIOCBRADDIF, &mut r).map_err(err)
}

/// Run `f` on a thread that has joined network namespace `ns` (as made by `ip netns add`).
/// Sockets it creates stay in that namespace's network stack wherever they are used later.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let nsfd = File::open(&path)?;
        // SAFETY: setns(2) on the calling thread only, with a namespace fd we hold open.
        if unsafe { libc::setns(nsfd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Open a TCP connection from inside network namespace `ns`.
pub fn connect_in_netns(
    ns: &str,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> io::Result<std::net::TcpStream> {
    in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, timeout)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let first = open_disk(f.path(), false).unwrap();
        // flock locks belong to the open file description: a second open in this very
        // process conflicts just as another VMM's would.
        match open_disk(f.path(), false) {
            Err(HostIoError::DiskInUse { holder, .. }) => {
                assert!(holder.contains(&std::process::id().to_string()), "{holder}")
            }
            other => panic!("expected DiskInUse, got {other:?}"),
        }
        assert!(matches!(
            open_disk(f.path(), true),
            Err(HostIoError::DiskInUse { .. })
        ));
        drop(first);
        let r1 = open_disk(f.path(), true).unwrap();
        let _r2 = open_disk(f.path(), true).expect("readers share");
        assert!(
            open_disk(f.path(), false).is_err(),
            "no writer while readers hold it"
        );
        drop(r1);
    }

    #[test]
    fn bad_images_are_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            open_disk(f.path(), false),
            Err(HostIoError::DiskSize { size: 0, .. })
        ));
        f.as_file().set_len(1000).unwrap();
        assert!(matches!(
            open_disk(f.path(), false),
            Err(HostIoError::DiskSize { .. })
        ));
        assert!(matches!(
            open_disk(Path::new("/nonexistent/x.img"), false),
            Err(HostIoError::OpenDisk { .. })
        ));
    }
}
