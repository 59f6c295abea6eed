//! A lab of hosts on one machine, for `ferry demo` and `ferry bench migrate`: each host is a
//! network namespace with a bridge, the hosts share one Ethernet segment (veth pairs), and a
//! client namespace sits on the same segment.
//!
//! ```text
//!  host A (br0 10.78.0.1) ── vab/vba ── host B (br0 10.78.0.11)
//!        └── vac/vca ── client (10.78.0.3)         guest: 10.78.0.2 (a tap on a bridge)
//! ```
//! Names carry the process ID, so labs of concurrent runs never collide; dropping the lab
//! removes every namespace (and with them every interface).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The lab.
pub struct Lab {
    pub a: String,
    pub b: String,
    pub client: String,
}

/// Addresses on the lab segment.
pub const HOST_A_IP: &str = "10.78.0.1";
pub const HOST_B_IP: &str = "10.78.0.11";
pub const CLIENT_IP: &str = "10.78.0.3";
pub const GUEST_IP: &str = "10.78.0.2";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// Build the lab (needs root: it creates network namespaces).
    pub fn new(tag: &str) -> Result<Lab> {
        let p = format!("fy{tag}{}", std::process::id());
        let lab = Lab { a: format!("{p}a"), b: format!("{p}b"), client: format!("{p}c") };
        for ns in [&lab.a, &lab.b, &lab.client] {
            ip(&["netns", "add", ns]).context("creating the lab's network namespaces (run as root)")?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (ns, addr, mac) in [(&lab.a, HOST_A_IP, "02:78:00:00:00:01"), (&lab.b, HOST_B_IP, "02:78:00:00:00:11")] {
            // A fixed MAC, or the bridge takes its ports' and changes it as taps come and go.
            ip(&["-n", ns, "link", "add", "br0", "address", mac, "type", "bridge"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "br0"])?;
            ip(&["-n", ns, "link", "set", "br0", "up"])?;
        }
        ip(&["-n", &lab.a, "link", "add", "vab", "type", "veth", "peer", "name", "vba", "netns", &lab.b])?;
        ip(&["-n", &lab.a, "link", "add", "vac", "type", "veth", "peer", "name", "vca", "netns", &lab.client])?;
        for (ns, port) in [(&lab.a, "vab"), (&lab.a, "vac"), (&lab.b, "vba")] {
            ip(&["-n", ns, "link", "set", port, "master", "br0"])?;
            ip(&["-n", ns, "link", "set", port, "up"])?;
        }
        ip(&["-n", &lab.client, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "vca"])?;
        ip(&["-n", &lab.client, "link", "set", "vca", "up"])?;
        Ok(lab)
    }

    /// Cap the A-to-B link at `mbit` Mbit/s (tc tbf on both ends of the host link); 0 removes it.
    pub fn cap_link(&self, mbit: u64) -> Result<()> {
        for (ns, dev) in [(&self.a, "vab"), (&self.b, "vba")] {
            let _ = Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]).output();
            if mbit > 0 {
                let rate = format!("{mbit}mbit");
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate])
                    .args(["burst", "256kb", "latency", "50ms"])
                    .output()
                    .context("running tc")?;
                if !out.status.success() {
                    bail!("tc: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        Ok(())
    }

    /// `ip netns exec NS` as a command prefix.
    pub fn exec(ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
