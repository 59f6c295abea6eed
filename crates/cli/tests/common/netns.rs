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
