//! The serial console as people use it, on real KVM with the test guest: `--serial stdio` on
//! a real terminal (a pty) is raw while the VM runs and the terminal gets its settings back on
//! every way out; Ctrl-] detaches.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

/// A `ferry vmm run --serial stdio` whose stdin, stdout and stderr are a pty's slave.
struct OnTerminal {
    child: Child,
    master: File,
    slave: OwnedFd,
    seen: Arc<Mutex<Vec<u8>>>,
    before: libc::termios,
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: a termios is plain data; all zeroes is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills a termios we own from an open fd.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_lflag, a.c_cflag) == (b.c_iflag, b.c_oflag, b.c_lflag, b.c_cflag)
}

fn is_raw(t: &libc::termios) -> bool {
    t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
}

impl OnTerminal {
    fn spawn(dir: &std::path::Path, kernel: &std::path::Path) -> OnTerminal {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = termios(&pty.slave);
        assert!(!is_raw(&before), "a new pty starts cooked");
        let io = || Stdio::from(pty.slave.try_clone().unwrap());
        let child = Command::new(ferry_bin())
            .args(["vmm", "run", "--kernel", kernel.to_str().unwrap()])
            .args(["--memory", "64", "--cmdline", "mode=run hb=0"])
            .args(["--serial", "stdio", "--api"])
            .arg(dir.join("api.sock"))
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .spawn()
            .unwrap();
        let master = File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnTerminal {
            child,
            master,
            slave: pty.slave,
            seen,
            before,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + T;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn type_bytes(&mut self, b: &[u8]) {
        self.master.write_all(b).unwrap();
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + T;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not end: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_raw(&self) {
        let now = termios(&self.slave);
        assert!(is_raw(&now), "the terminal is not raw while the VM runs");
        assert!(
            now.c_oflag & libc::OPOST != 0,
            "output processing must stay on"
        );
    }

    fn assert_restored(&self, when: &str) {
        assert!(
            same(&termios(&self.slave), &self.before),
            "{when}: the terminal's settings were not given back"
        );
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_terminal_console_is_raw_while_the_vm_runs_and_given_back_on_every_way_out() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());

    // 1. The guest powers off, asked by one key typed without Enter (raw input reaches it).
    let mut t = OnTerminal::spawn(dir.path(), &kernel);
    t.wait_for("Ctrl-] detaches");
    t.wait_for("READY");
    t.assert_raw();
    t.type_bytes(b"p");
    assert!(t.wait_exit().success(), "{}", t.text());
    t.assert_restored("after the guest powered off");

    // 2. SIGTERM stops the VMM: the terminal is given back too.
    let mut t = OnTerminal::spawn(dir.path(), &kernel);
    t.wait_for("READY");
    t.assert_raw();
    // SAFETY: signals our own child by its PID.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
    t.wait_exit();
    t.assert_restored("after SIGTERM");

    // 3. Ctrl-] detaches: the terminal is cooked again while the VM keeps running; its
    //    output no longer reaches the terminal.
    let mut t = OnTerminal::spawn(dir.path(), &kernel);
    t.wait_for("READY");
    t.type_bytes(&[0x1d]);
    t.wait_for("detached from the serial console");
    t.assert_restored("after Ctrl-]");
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "the VMM ended on Ctrl-]"
    );
    let api = dir.path().join("api.sock");
    let status = ferry_output(&["vmm", "status", "--api", api.to_str().unwrap()], T);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("\"running\""), "{status}");
    // Typing now goes to the terminal, not the guest: 'p' does not power it off.
    t.type_bytes(b"p");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "a detached key reached the guest"
    );
    let quit = ferry_output(&["vmm", "quit", "--api", api.to_str().unwrap()], T);
    assert!(quit.status.success());
    t.wait_exit();
    t.assert_restored("after quit");
}
