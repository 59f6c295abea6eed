//! Test harness: runs the real `ferry` binary on real KVM with the real test guest, and
//! talks to the guest through its serial ports on unix sockets.
#![allow(dead_code)]

pub mod hosts;
pub mod migrate;
pub mod netns;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use ferry_lab::{Port, Proc, Stream};

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

fn try_connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Wait until a port's reader is connected.
fn wait_connected(p: &Port, path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !p.connected() {
        assert!(
            Instant::now() < deadline,
            "cannot connect to {} within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// COM1: the guest's console, line by line (a `ferry_lab::Port` with test assertions).
pub struct Console {
    port: Port,
}

impl Console {
    pub fn connect(path: &Path) -> Console {
        let port = Port::follow(path.to_path_buf(), Duration::from_millis(2));
        wait_connected(&port, path, Duration::from_secs(60));
        Console { port }
    }

    /// Everything the guest printed so far.
    pub fn text(&self) -> String {
        self.port.text()
    }

    /// Wait until a line starting with `prefix` appears after byte `from` of the output;
    /// returns that line and the offset just past it.
    pub fn wait_line_from(&self, from: usize, prefix: &str, timeout: Duration) -> (String, usize) {
        self.port
            .line_after(from, prefix, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        self.wait_line_from(0, prefix, timeout).0
    }

    /// Send a command byte and wait for the answer line starting with `prefix`.
    pub fn ask(&mut self, cmd: u8, prefix: &str) -> String {
        self.port
            .ask(cmd, prefix, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn send(&mut self, cmd: u8) {
        self.port.send(cmd).unwrap();
    }

    /// A second handle for sending bytes from another thread.
    pub fn sender(&self) -> UnixStream {
        self.port.writer().unwrap()
    }
}

/// COM2: heartbeat bytes, timestamped on arrival.
pub struct Heartbeat {
    port: Port,
}

impl Heartbeat {
    pub fn connect(path: &Path) -> Heartbeat {
        let port = Port::follow(path.to_path_buf(), Duration::from_millis(2));
        wait_connected(&port, path, Duration::from_secs(60));
        Heartbeat { port }
    }

    /// Start listening in the background, connecting once `path` appears (a migration's
    /// destination creates its ports only when the VM arrives).
    pub fn connect_when_ready(path: &Path) -> Heartbeat {
        Heartbeat {
            port: Port::follow(path.to_path_buf(), Duration::from_micros(250)),
        }
    }

    /// First and last beat.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        let b = self.port.beats();
        Some((*b.first()?, *b.last()?))
    }

    pub fn count(&self) -> usize {
        self.port.len()
    }

    /// Wait for `n` more beats.
    pub fn wait_more(&self, n: usize, timeout: Duration) {
        self.port
            .wait_bytes(self.count(), n, timeout)
            .unwrap_or_else(|e| panic!("heartbeat: {e}"))
    }

    /// Longest gap between consecutive beats.
    pub fn max_gap(&self) -> Duration {
        self.port.max_gap()
    }
}

/// A running `ferry vmm run|restore|receive` process with its sockets in a private directory
/// and its stderr in `<tag>.log` there; killed (by its PID) when dropped.
pub struct Vmm {
    pub proc: Proc,
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
        Vmm::spawn_env(prefix, dir, tag, args, &[])
    }

    /// Like [`Vmm::spawn_in`], with `env` set (e.g. FERRY_FAIL_AT).
    pub fn spawn_env(
        prefix: &[String],
        dir: &Path,
        tag: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Vmm {
        let (api, com1, com2) = socket_paths(dir, tag);
        let mut cmd = ferry_command(prefix);
        cmd.args(args)
            .arg("--api")
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", com1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", com2.display()))
            .arg("--paused");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(cmd, format!("VMM {tag}"), dir.join(format!("{tag}.log"))).unwrap();
        Vmm {
            proc,
            api,
            com1,
            com2,
        }
    }

    /// Start `ferry vmm receive --listen ADDR [extra]` under `prefix`, with ports on unix
    /// sockets and `env` set (e.g. FERRY_CRASH_AT).
    pub fn receive_in(
        prefix: &[String],
        dir: &Path,
        tag: &str,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Vmm {
        Vmm::receive_with(prefix, dir, tag, listen, &[], env)
    }

    /// Like [`Vmm::receive_in`] with extra `vmm receive` options.
    pub fn receive_with(
        prefix: &[String],
        dir: &Path,
        tag: &str,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vmm {
        let (api, com1, com2) = socket_paths(dir, tag);
        let mut cmd = ferry_command(prefix);
        cmd.args(["vmm", "receive", "--listen", listen, "--api"])
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", com1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", com2.display()))
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(cmd, format!("VMM {tag}"), dir.join(format!("{tag}.log"))).unwrap();
        Vmm {
            proc,
            api,
            com1,
            com2,
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Kill it now (SIGKILL).
    pub fn kill(&mut self) {
        self.proc.kill()
    }

    /// Run `ferry vmm SUB --api SOCK [extra]` and return its output.
    pub fn ctl(&self, sub: &str, extra: &[&str]) -> Output {
        // The API socket appears once the VM is built (a restore reads its memory first).
        if let Err(e) = try_connect(&self.api, Duration::from_secs(30)) {
            panic!(
                "cannot connect to {}: {e}; the VMM's log:\n{}",
                self.api.display(),
                self.log()
            );
        }
        let mut args = vec!["vmm", sub, "--api", self.api.to_str().unwrap()];
        args.extend_from_slice(extra);
        ferry_output(&args, Duration::from_secs(60))
    }

    pub fn ctl_ok(&self, sub: &str, extra: &[&str]) -> String {
        let out = self.ctl(sub, extra);
        assert!(
            out.status.success(),
            "ferry vmm {sub} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Wait for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match self.proc.wait(timeout) {
            Some(s) => s,
            None => {
                self.proc.kill();
                panic!(
                    "VMM did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
        }
    }
}

/// A parsed `key=value` field of a guest line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(|s| s.trim_matches('"').to_string())
}

/// The number after `key=` in a guest line; panics (naming the line) when there is none.
pub fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .parse()
        .unwrap()
}

/// A sparse raw image `disk.img` of `mib` MiB in `dir`.
pub fn disk_image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

/// `ferry vmm run` of the test guest (128 MiB) with `cmdline` and one disk (`--disk` as
/// given: a path or an NBD URI); the VMM and its console, after READY.
pub fn start_disk_guest(dir: &Path, tag: &str, disk: &str, cmdline: &str) -> (Vmm, Console) {
    let kernel = testguest(dir);
    let vmm = Vmm::spawn(
        dir,
        tag,
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "128",
            "--disk",
            disk,
            "--cmdline",
            cmdline,
        ],
    );
    let con = Console::connect(&vmm.com1);
    vmm.ctl_ok("resume", &[]);
    con.wait_line("READY", Duration::from_secs(60));
    (vmm, con)
}
