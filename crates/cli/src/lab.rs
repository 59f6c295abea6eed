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
//!
//! Also here: [`Port`], a guest serial port on a unix socket read in the background with
//! host timestamps; [`Lab::link_mbit`], a TCP blast from host A to host B; [`Proc`], a process
//! killed (by its PID) when dropped; and [`Qmp`], a small QMP client for QEMU.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

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
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Fail with a clear message unless this process runs as root (network namespaces, tc).
pub fn require_root(what: &str) -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok());
    if euid != Some(0) {
        bail!("{what} needs root for network namespaces (run it with sudo or as root)");
    }
    Ok(())
}

impl Lab {
    /// Build the lab (needs root: it creates network namespaces).
    pub fn new(tag: &str) -> Result<Lab> {
        let p = format!("fy{tag}{}", std::process::id());
        let lab = Lab {
            a: format!("{p}a"),
            b: format!("{p}b"),
            client: format!("{p}c"),
        };
        for ns in [&lab.a, &lab.b, &lab.client] {
            ip(&["netns", "add", ns])
                .context("creating the lab's network namespaces (run as root)")?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (ns, addr, mac) in [
            (&lab.a, HOST_A_IP, "02:78:00:00:00:01"),
            (&lab.b, HOST_B_IP, "02:78:00:00:00:11"),
        ] {
            // A fixed MAC, or the bridge takes its ports' and changes it as taps come and go.
            ip(&[
                "-n", ns, "link", "add", "br0", "address", mac, "type", "bridge",
            ])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "br0"])?;
            ip(&["-n", ns, "link", "set", "br0", "up"])?;
        }
        ip(&[
            "-n", &lab.a, "link", "add", "vab", "type", "veth", "peer", "name", "vba", "netns",
            &lab.b,
        ])?;
        ip(&[
            "-n",
            &lab.a,
            "link",
            "add",
            "vac",
            "type",
            "veth",
            "peer",
            "name",
            "vca",
            "netns",
            &lab.client,
        ])?;
        for (ns, port) in [(&lab.a, "vab"), (&lab.a, "vac"), (&lab.b, "vba")] {
            ip(&["-n", ns, "link", "set", port, "master", "br0"])?;
            ip(&["-n", ns, "link", "set", port, "up"])?;
        }
        ip(&[
            "-n",
            &lab.client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "vca",
        ])?;
        ip(&["-n", &lab.client, "link", "set", "vca", "up"])?;
        Ok(lab)
    }

    /// Cap the A-to-B link at `mbit` Mbit/s (tc tbf on both ends of the host link); 0 removes it.
    pub fn cap_link(&self, mbit: u64) -> Result<()> {
        for (ns, dev) in [(&self.a, "vab"), (&self.b, "vba")] {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                ])
                .output();
            if mbit > 0 {
                let rate = format!("{mbit}mbit");
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                    ])
                    .args(["tbf", "rate", &rate, "burst", "256kb", "latency", "50ms"])
                    .output()
                    .context("running tc")?;
                if !out.status.success() {
                    bail!("tc: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        Ok(())
    }

    /// TCP throughput from host A to host B over the lab link, in Mbit/s: one stream blasting
    /// for `secs` seconds, counted at the receiver (the first 200 ms, while TCP and the tbf
    /// bucket settle, are left out).
    pub fn link_mbit(&self, port: u16, secs: f64) -> Result<f64> {
        let addr: SocketAddr = format!("{HOST_B_IP}:{port}").parse()?;
        let listener = ferry_vmm::host_io::in_netns(&self.b, move || TcpListener::bind(addr))
            .context("listening on host B for the link test")?;
        let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut counted = 0u64;
            let mut start: Option<Instant> = None;
            let first = Instant::now();
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                match start {
                    Some(_) => counted += n as u64,
                    None if first.elapsed() >= Duration::from_millis(200) => {
                        start = Some(Instant::now())
                    }
                    None => {}
                }
            }
            Ok((counted, start.map(|s| s.elapsed()).unwrap_or_default()))
        });
        let mut s = ferry_vmm::host_io::connect_in_netns(&self.a, addr, Duration::from_secs(5))
            .context("connecting from host A to host B for the link test")?;
        let buf = vec![0x5au8; 1 << 20];
        let end = Instant::now() + Duration::from_secs_f64(secs + 0.2);
        while Instant::now() < end {
            s.write_all(&buf).context("sending on the lab link")?;
        }
        drop(s);
        let (bytes, took) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("link test receiver panicked"))?
            .context("receiving on the lab link")?;
        if took.is_zero() || bytes == 0 {
            bail!("the link test moved no data from host A to host B");
        }
        Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e6)
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

/// Bytes from a guest serial port on a unix socket (the VMM listens), read in the background
/// once the socket exists, each read stamped with the host's monotonic clock.
#[derive(Clone, Default)]
pub struct Port {
    text: Arc<Mutex<Vec<u8>>>,
    /// (time of a read, bytes in it)
    stamps: Arc<Mutex<Vec<(Instant, usize)>>>,
    stream: Arc<Mutex<Option<UnixStream>>>,
    closed: Arc<AtomicBool>,
}

impl Port {
    /// Connect to `path` as soon as it accepts (polling every `poll`, for up to 10 minutes)
    /// and collect what arrives.
    pub fn follow(path: PathBuf, poll: Duration) -> Port {
        let p = Port::default();
        let q = p.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            let s = loop {
                if q.closed.load(Ordering::Relaxed) {
                    return;
                }
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(poll),
                    Err(_) => return,
                }
            };
            if let Ok(w) = s.try_clone() {
                *q.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
            }
            let mut r = BufReader::new(s);
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                let now = Instant::now();
                q.text
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
                q.stamps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now, n));
            }
        });
        p
    }

    /// Stop waiting for the socket, and stop reading.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(s) = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn connected(&self) -> bool {
        self.stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The text received so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait for a whole line starting with `prefix` (heartbeat dots stripped) that begins at
    /// or after byte `from`; returns it and the offset just past it.
    pub fn line_after(
        &self,
        from: usize,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(String, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            let mut off = 0;
            for line in text.split_inclusive('\n') {
                let clean = line.trim_start_matches('.');
                if off >= from && line.ends_with('\n') && clean.starts_with(prefix) {
                    return Ok((clean.trim_end().to_string(), off + line.len()));
                }
                off += line.len();
            }
            if Instant::now() > deadline {
                let tail: String = text
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!("the guest did not print {prefix:?} within {timeout:?}; its console ends:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send one command byte to the guest.
    pub fn send(&self, cmd: u8) -> Result<()> {
        let mut guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_mut()
            .context("the guest console is not connected")?
            .write_all(&[cmd])
            .context("writing to the guest console")
    }

    /// Send one command byte and wait for the answer line starting with `prefix`.
    pub fn ask(&self, cmd: u8, prefix: &str, timeout: Duration) -> Result<String> {
        let from = self.len();
        self.send(cmd)?;
        Ok(self.line_after(from, prefix, timeout)?.0)
    }

    /// Times of the reads so far (each brought one or more bytes).
    pub fn beats(&self) -> Vec<Instant> {
        self.stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| s.0)
            .collect()
    }
}

/// A process started in the lab (e.g. a VMM under `ip netns exec`); killed (by its PID) when dropped.
pub struct Proc {
    child: Child,
    pub what: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: String, log: PathBuf) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .with_context(|| format!("creating {}", log.display()))?,
            )
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what, log })
    }

    /// Fail if it has ended.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!(
                "{} ended ({st}); its log {}:\n{}",
                self.what,
                self.log.display(),
                log.trim()
            );
        }
        Ok(())
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A QEMU Machine Protocol client on a unix socket: one JSON object per line each way.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, p: &mut Proc) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    p.alive()?;
                    if Instant::now() > deadline {
                        return Err(e)
                            .with_context(|| format!("connecting to QMP at {}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).context("reading from QMP")? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Run a command; events that arrive meanwhile are skipped.
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let mut s = json!({"execute": name, "arguments": args}).to_string();
        s.push('\n');
        self.w.write_all(s.as_bytes()).context("writing to QMP")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {}", e.get("desc").unwrap_or(e));
            }
        }
    }
}

/// The longest gap between consecutive stamps of `beats` within `[from, to]`, counting from
/// the last stamp before `from` (if any). `beats` need not be sorted across sources: it is
/// taken in the given order, as when one port's stamps are followed by another's.
pub fn longest_gap(beats: &[Instant], from: Instant, to: Instant) -> Duration {
    let start = beats.iter().rposition(|&t| t < from).unwrap_or(0);
    let mut gap = Duration::ZERO;
    let mut prev: Option<Instant> = None;
    for &t in &beats[start..] {
        if t > to {
            break;
        }
        if let Some(p) = prev {
            gap = gap.max(t.saturating_duration_since(p));
        }
        prev = Some(t);
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_spans_ports_and_window() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Source beats every ms to 10, then the destination from 25.
        let mut beats: Vec<Instant> = (0..=10).map(ms).collect();
        beats.extend((25..=40).map(ms));
        assert_eq!(
            longest_gap(&beats, ms(5), ms(40)),
            Duration::from_millis(15)
        );
        // The window ends before the destination starts: only the source's 1 ms beats count.
        assert_eq!(longest_gap(&beats, ms(2), ms(20)), Duration::from_millis(1));
        // The last beat before the window counts as its start.
        assert_eq!(
            longest_gap(&beats, ms(20), ms(40)),
            Duration::from_millis(15)
        );
        assert_eq!(longest_gap(&[], ms(0), ms(1)), Duration::ZERO);
    }
}
