//! The tests' view of a lab (`ferry_lab::Lab`, the same lab `ferry demo`, `ferry lab` and the
//! benchmarks use): hosts are network namespaces on one segment with a client beside them.
//! Each test makes its own, with unique names, and removes it (and everything running in it)
//! when it drops.
#![allow(dead_code)]

use std::net::TcpStream;
use std::time::Duration;

use ferry_lab::LabOptions;

/// A lab of one or two VM hosts (no daemons) and a client.
pub struct Lab {
    pub inner: ferry_lab::Lab,
    /// Host A's namespace.
    pub host: String,
    /// Host B's namespace (two-host labs).
    pub host_b: Option<String>,
    pub client: String,
    pub bridge: &'static str,
    pub guest_ip: String,
    pub client_ip: &'static str,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn with_hosts(n: usize) -> Lab {
        let dir = super::tmp();
        let inner = ferry_lab::Lab::new(LabOptions::new(n, dir.path())).expect("building a lab");
        Lab {
            host: inner.hosts[0].ns.clone(),
            host_b: inner.hosts.get(1).map(|h| h.ns.clone()),
            client: inner.client.clone(),
            bridge: "br0",
            guest_ip: ferry_lab::guest_ip(0),
            client_ip: ferry_lab::CLIENT_IP,
            inner,
            _dir: dir,
        }
    }

    /// One VM host and a client.
    pub fn new() -> Lab {
        Lab::with_hosts(1)
    }

    /// Two VM hosts (A and B) and a client on one segment.
    pub fn two_hosts() -> Lab {
        Lab::with_hosts(2)
    }

    /// Host A's address on the segment.
    pub const HOST_A_IP: &'static str = "10.78.0.11";
    /// Host B's address on the segment.
    pub const HOST_B_IP: &'static str = "10.78.0.12";

    fn prefix(ns: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), ns.into()]
    }

    /// `ip netns exec A` prefix for running a VMM on host A.
    pub fn in_host(&self) -> Vec<String> {
        Lab::prefix(&self.host)
    }

    /// `ip netns exec B` prefix.
    pub fn in_host_b(&self) -> Vec<String> {
        Lab::prefix(self.host_b.as_ref().expect("two_hosts lab"))
    }

    /// Connect to the guest's `port` from the client namespace.
    pub fn connect_from_client(&self, port: u16, timeout: Duration) -> TcpStream {
        self.inner
            .connect_from_client(&format!("{}:{port}", self.guest_ip), timeout)
            .unwrap()
    }
}

/// Capture the RARP frames (ethertype 0x8035) seen in namespace `ns`, up to the first one or for
/// at most `for_` (a thread that enters the namespace and reads a packet socket on all its
/// interfaces).
pub fn capture_rarp(ns: &str, for_: Duration) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace file we hold open; it moves only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let proto = (0x8035u16).to_be() as libc::c_int;
        // SAFETY: plain socket(2); the result is checked before use and closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, given by pointer with its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut frames = Vec::new();
        let end = std::time::Instant::now() + for_;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < end {
            // SAFETY: recv into `buf`, at most its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
                break;
            }
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        frames
    })
}
