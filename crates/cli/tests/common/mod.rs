//! Test harness: runs the real `ferry` binary on real KVM with the real test guest, and
//! talks to the guest through its serial ports on unix sockets.
#![allow(dead_code)]

pub mod netns;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A private directory for one test's files, removed afterwards.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .unwrap()
}

/// The ferry binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Whether KVM is usable. In CI (CI=true) a missing /dev/kvm fails the test loudly; elsewhere
/// the test is skipped with a reason.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("/dev/kvm is not usable and CI=true: KVM tests must run in CI");
        }
        eprintln!("SKIPPED: /dev/kvm is not usable on this machine");
    }
    ok
}

/// Write the test guest into `dir` and return its path.
pub fn testguest(dir: &Path) -> PathBuf {
    let p = dir.join("testguest.elf");
    std::fs::write(&p, ferry_testguest::elf()).unwrap();
    p
}

/// The API, COM1 and COM2 sockets of VMM `tag` in `dir`.
fn socket_paths(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |what: &str| dir.join(format!("{tag}.{what}"));
    (p("api"), p("com1"), p("com2"))
}

/// `ferry`, or `PREFIX... ferry` (e.g. `ip netns exec NS ferry`).
fn ferry_command(prefix: &[String]) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(ferry_bin());
            c
        }
        None => Command::new(ferry_bin()),
    }
}

/// Run `ferry ARGS` to completion with a timeout.
pub fn ferry_output(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ferry {args:?} did not finish in {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect_retry(path: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// COM1: the guest's console, line by line.
pub struct Console {
    stream: UnixStream,
    text: Arc<Mutex<String>>,
}

impl Console {
    pub fn connect(path: &Path) -> Console {
        let stream = connect_retry(path, Duration::from_secs(60));
        let text = Arc::new(Mutex::new(String::new()));
        let (t, s) = (text.clone(), stream.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                t.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Console { stream, text }
    }

    /// Everything the guest printed so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Wait until a line starting with `prefix` appears after byte `from` of the output;
    /// returns that line and the offset just past it.
    pub fn wait_line_from(&self, from: usize, prefix: &str, timeout: Duration) -> (String, usize) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            let mut off = 0;
            for line in text.split_inclusive('\n') {
                let end = off + line.len();
                if off >= from && line.ends_with('\n') && line.starts_with(prefix) {
                    return (line.trim_end().to_string(), end);
                }
                off = end;
            }
            if Instant::now() > deadline {
                panic!(
                    "no line starting with {prefix:?} within {timeout:?}; console so far:\n{text}"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        self.wait_line_from(0, prefix, timeout).0
    }

    /// Send a command byte and wait for the answer line starting with `prefix`.
    pub fn ask(&mut self, cmd: u8, prefix: &str) -> String {
        let from = self.text().len();
        self.stream.write_all(&[cmd]).unwrap();
        self.wait_line_from(from, prefix, Duration::from_secs(20)).0
    }

    pub fn send(&mut self, cmd: u8) {
        self.stream.write_all(&[cmd]).unwrap();
    }

    /// A second handle for sending bytes from another thread.
    pub fn sender(&self) -> UnixStream {
        self.stream.try_clone().unwrap()
    }
}

/// COM2: heartbeat bytes, timestamped on arrival.
pub struct Heartbeat {
    stamps: Arc<Mutex<Vec<Instant>>>,
}

impl Heartbeat {
    pub fn connect(path: &Path) -> Heartbeat {
        let s = connect_retry(path, Duration::from_secs(60));
        Heartbeat::reading(s)
    }

    /// Start listening in the background, connecting once `path` appears (a migration's
    /// destination creates its ports only when the VM arrives).
    pub fn connect_when_ready(path: &Path) -> Heartbeat {
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let (st, path) = (stamps.clone(), path.to_path_buf());
        std::thread::spawn(move || {
            let s = connect_retry(&path, Duration::from_secs(120));
            Heartbeat::read_into(s, st)
        });
        Heartbeat { stamps }
    }

    fn reading(s: UnixStream) -> Heartbeat {
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let st = stamps.clone();
        std::thread::spawn(move || Heartbeat::read_into(s, st));
        Heartbeat { stamps }
    }

    /// First and last beat.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        let s = self.stamps.lock().unwrap();
        Some((*s.first()?, *s.last()?))
    }

    fn read_into(s: UnixStream, st: Arc<Mutex<Vec<Instant>>>) {
        {
            use std::io::Read;
            let mut s = s;
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                st.lock().unwrap().extend(std::iter::repeat_n(now, n));
            }
        }
    }

    pub fn count(&self) -> usize {
        self.stamps.lock().unwrap().len()
    }

    /// Wait for `n` more beats.
    pub fn wait_more(&self, n: usize, timeout: Duration) {
        let start = self.count();
        let deadline = Instant::now() + timeout;
        while self.count() < start + n {
            assert!(
                Instant::now() < deadline,
                "heartbeat stalled: {} beats in {timeout:?}",
                self.count() - start
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Longest gap between consecutive beats.
    pub fn max_gap(&self) -> Duration {
        let s = self.stamps.lock().unwrap();
        s.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// A running `ferry vm run|restore` process with its sockets in a private directory.
pub struct Vmm {
    pub child: Child,
    pub api: PathBuf,
    pub com1: PathBuf,
    pub com2: PathBuf,
}

impl Vmm {
    /// Start ferry with COM1/COM2 on unix sockets and the API socket, paused, so the test
    /// can connect to both ports before the guest prints anything.
    pub fn spawn(dir: &Path, tag: &str, args: &[&str]) -> Vmm {
        Vmm::spawn_in(&[], dir, tag, args)
    }

    /// Like [`Vmm::spawn`], run under `prefix` (e.g. `ip netns exec NS`).
    pub fn spawn_in(prefix: &[String], dir: &Path, tag: &str, args: &[&str]) -> Vmm {
        let (api, com1, com2) = socket_paths(dir, tag);
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend([
            "--api".into(),
            api.display().to_string(),
            "--serial".into(),
            format!("unix:{}", com1.display()),
            "--serial2".into(),
            format!("unix:{}", com2.display()),
            "--paused".into(),
        ]);
        let mut cmd = ferry_command(prefix);
        let child = cmd
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Vmm {
            child,
            api,
            com1,
            com2,
        }
    }

    /// Start `ferry vm receive --listen ADDR` under `prefix`, with ports on unix sockets and
    /// `env` set (e.g. FERRY_CRASH_AT).
    pub fn receive_in(
        prefix: &[String],
        dir: &Path,
        tag: &str,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Vmm {
        let (api, com1, com2) = socket_paths(dir, tag);
        let mut cmd = ferry_command(prefix);
        cmd.args(["vm", "receive", "--listen", listen, "--api"])
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", com1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", com2.display()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vmm {
            child,
            api,
            com1,
            com2,
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Run `ferry vm SUB --api SOCK [extra]` and return its output.
    pub fn ctl(&self, sub: &str, extra: &[&str]) -> Output {
        // The API socket appears once the VM is built (a restore reads its memory first).
        drop(connect_retry(&self.api, Duration::from_secs(30)));
        let mut args = vec!["vm", sub, "--api", self.api.to_str().unwrap()];
        args.extend_from_slice(extra);
        ferry_output(&args, Duration::from_secs(60))
    }

    pub fn ctl_ok(&self, sub: &str, extra: &[&str]) -> String {
        let out = self.ctl(sub, extra);
        assert!(
            out.status.success(),
            "ferry vm {sub} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Wait for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("VMM did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed `key=value` field of a guest line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(|s| s.trim_matches('"').to_string())
}
