//! userfaultfd, the little of it post-copy needs: register guest memory for missing-page
//! faults, read the faults, and fill pages atomically (which wakes whoever waits on them).
//!
//! Written against `<linux/userfaultfd.h>` with libc rather than through the `userfaultfd`
//! crate: that crate generates its bindings with bindgen at build time, which needs libclang on
//! every build machine, for five ioctls and two structs (see docs/migration.md).
//!
//! Faults from the kernel count too (the uffd is not `UFFD_USER_MODE_ONLY`): KVM touching a
//! guest page for a vCPU, or a device's `pwrite` from guest memory, wait for the page like any
//! access from this process does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
// _IOWR(0xAA, nr, size) = 3 << 30 | size << 16 | 0xAA << 8 | nr.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
// _IOR(0xAA, 1, struct uffdio_range).
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, the fault address at offset 16 for a page fault.
#[repr(C)]
#[derive(Clone, Copy)]
struct Msg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// A userfaultfd (non-blocking, close-on-exec).
pub struct Uffd {
    fd: OwnedFd,
}

/// How a page was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was filled now (and any waiter woken).
    Now,
    /// It was there already (filled earlier by the other path).
    Already,
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request here takes a pointer to the struct `T` it is called with, which
    // lives for the call.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Open a userfaultfd and agree on the API.
    pub fn new() -> io::Result<Uffd> {
        // SAFETY: a plain syscall with flags; it returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "userfaultfd: {e} (post-copy needs it: run the VMM as root, or set \
                     vm.unprivileged_userfaultfd=1)"
                ),
            ));
        }
        // SAFETY: fd is a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = Api {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(Uffd { fd })
    }

    /// Report missing-page faults in `[addr, addr + len)` of this process.
    pub fn register(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut r = Register {
            range: Range { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut r)
    }

    /// Stop reporting faults in `[addr, addr + len)`.
    pub fn unregister(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start: addr, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r)
    }

    /// Fill the page at `dst` (host address) with `data` (one page).
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Placed> {
        let mut c = Copy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(Placed::Now),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::Already),
            Err(e) => Err(e),
        }
    }

    /// Fill the page at `dst` (host address) with zeros.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<Placed> {
        let mut z = ZeroPage {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => Ok(Placed::Now),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::Already),
            Err(e) => Err(e),
        }
    }

    /// Wait up to `timeout_ms` for faults, then return the faulting host addresses (page
    /// aligned) read so far; empty on timeout.
    pub fn faults(&self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let mut msgs = [Msg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            _feat: 0,
        }; 64];
        loop {
            // SAFETY: reads at most the size of `msgs` into it.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(e),
                };
            }
            let n = n as usize / std::mem::size_of::<Msg>();
            out.extend(
                msgs[..n]
                    .iter()
                    .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
                    .map(|m| m.address & !(crate::memory::PAGE_SIZE as u64 - 1)),
            );
            if n < msgs.len() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<Api>(), 24);
        assert_eq!(std::mem::size_of::<Register>(), 32);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(std::mem::size_of::<ZeroPage>(), 32);
        assert_eq!(std::mem::size_of::<Msg>(), 32);
    }

    /// A thread touching a registered page waits until the page is filled, then sees the data.
    #[test]
    fn a_missing_page_waits_for_its_data() {
        let Ok(u) = Uffd::new() else {
            eprintln!("skipped: userfaultfd is not available here");
            return;
        };
        let len = 4 * 4096usize;
        // SAFETY: a fresh anonymous private mapping this test owns.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let addr = base as u64;
        u.register(addr, len as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives the thread (joined below).
            unsafe { std::ptr::read_volatile((addr + 4096 + 8) as *const u64) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            u.faults(1000, &mut faults).unwrap();
        }
        assert_eq!(faults, vec![addr + 4096]);
        let page: Vec<u8> = (0..4096).map(|i| (i / 8) as u8).collect();
        assert_eq!(u.copy(addr + 4096, &page).unwrap(), Placed::Now);
        assert_eq!(u.copy(addr + 4096, &page).unwrap(), Placed::Already);
        assert_eq!(reader.join().unwrap(), u64::from_ne_bytes([1; 8]));
        assert_eq!(u.zero(addr, 4096).unwrap(), Placed::Now);
        u.unregister(addr, len as u64).unwrap();
        // SAFETY: unmapping what this test mapped; nothing uses it any more.
        unsafe { libc::munmap(base, len) };
    }
}
