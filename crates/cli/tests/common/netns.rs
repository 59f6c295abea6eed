//! Hosts as network namespaces: each test makes its own, with unique names, and removes them.
//!
//! ```text
//!   ns "<tag>h" (the VM's host)            ns "<tag>c" (a client host)
//!   br0 10.77.0.1/24 ── tap (ferry's) ── guest 10.77.0.2
//!        └── veth "vh" ─────────────────── veth "vc" 10.77.0.3/24
//! ```
#![allow(dead_code)]

use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A VM host namespace with a bridge, and a client namespace wired to it; optionally a second
/// VM host ("B", bridge address 10.77.0.11) on the same Ethernet segment.
pub struct Lab {
    pub host: String,
    pub host_b: Option<String>,
    pub client: String,
    pub bridge: &'static str,
    pub guest_ip: &'static str,
    pub client_ip: &'static str,
}

impl Lab {
    pub fn new() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("fy{}x{n}", std::process::id());
        let lab = Lab {
            host: format!("{tag}h"),
            host_b: None,
            client: format!("{tag}c"),
            bridge: "br0",
            guest_ip: "10.77.0.2",
            client_ip: "10.77.0.3",
        };
        ip(&["netns", "add", &lab.host]);
        ip(&["netns", "add", &lab.client]);
        let h = |args: &[&str]| {
            let mut v = vec!["-n", lab.host.as_str()];
            v.extend_from_slice(args);
            ip(&v)
        };
        let c = |args: &[&str]| {
            let mut v = vec!["-n", lab.client.as_str()];
            v.extend_from_slice(args);
            ip(&v)
        };
        h(&["link", "set", "lo", "up"]);
        c(&["link", "set", "lo", "up"]);
        // A fixed bridge MAC: otherwise a bridge takes the lowest MAC of its ports and changes
        // it when a VM's tap comes or goes, leaving stale ARP entries on the other hosts.
        h(&[
            "link",
            "add",
            "br0",
            "address",
            "02:77:00:00:00:01",
            "type",
            "bridge",
        ]);
        h(&["addr", "add", "10.77.0.1/24", "dev", "br0"]);
        h(&["link", "set", "br0", "up"]);
        h(&[
            "link",
            "add",
            "vh",
            "type",
            "veth",
            "peer",
            "name",
            "vc",
            "netns",
            &lab.client,
        ]);
        h(&["link", "set", "vh", "master", "br0"]);
        h(&["link", "set", "vh", "up"]);
        c(&["addr", "add", "10.77.0.3/24", "dev", "vc"]);
        c(&["link", "set", "vc", "up"]);
        lab
    }

    /// A lab with a second VM host B: its own bridge, joined to host A's by a veth pair.
    pub fn two_hosts() -> Lab {
        let mut lab = Lab::new();
        let b = format!("{}b", lab.host.trim_end_matches('h'));
        ip(&["netns", "add", &b]);
        let hb = |args: &[&str]| {
            let mut v = vec!["-n", b.as_str()];
            v.extend_from_slice(args);
            ip(&v)
        };
        hb(&["link", "set", "lo", "up"]);
        hb(&[
            "link",
            "add",
            "br0",
            "address",
            "02:77:00:00:00:11",
            "type",
            "bridge",
        ]);
        hb(&["addr", "add", "10.77.0.11/24", "dev", "br0"]);
        hb(&["link", "set", "br0", "up"]);
        ip(&[
            "-n", &lab.host, "link", "add", "vab", "type", "veth", "peer", "name", "vba", "netns",
            &b,
        ]);
        ip(&["-n", &lab.host, "link", "set", "vab", "master", "br0"]);
        ip(&["-n", &lab.host, "link", "set", "vab", "up"]);
        hb(&["link", "set", "vba", "master", "br0"]);
        hb(&["link", "set", "vba", "up"]);
        lab.host_b = Some(b);
        lab
    }

    /// `ip netns exec B` prefix.
    pub fn in_host_b(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.host_b.clone().expect("two_hosts lab"),
        ]
    }

    /// Host A's address on the segment.
    pub const HOST_A_IP: &'static str = "10.77.0.1";
    /// Host B's address on the segment.
    pub const HOST_B_IP: &'static str = "10.77.0.11";

    /// `ip netns exec HOST` prefix for running a VMM in the host namespace.
    pub fn in_host(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.host.clone(),
        ]
    }

    /// Connect to the guest from the client namespace (in a thread that joins it).
    pub fn connect_from_client(&self, port: u16, timeout: Duration) -> TcpStream {
        let ns = format!("/var/run/netns/{}", self.client);
        let addr = format!("{}:{port}", self.guest_ip);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let deadline = std::time::Instant::now() + timeout;
            loop {
                match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
                    Ok(s) => return s,
                    Err(e) if std::time::Instant::now() > deadline => {
                        panic!("cannot connect to {addr}: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .join()
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(b) = &self.host_b {
            let _ = Command::new("ip").args(["netns", "del", b]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.host])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client])
            .status();
    }
}
