//! Host daemons in a lab (`ferry_lab::Lab` with a `ferry host run` in every host), driven the
//! way an admin drives them: the real `ferry` CLI, with a CLI config naming the lab's hosts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ferry_lab::{Lab, LabOptions, Port, Stream};
use serde_json::Value;

use super::{ferry_bin, tmp};

pub const T: Duration = Duration::from_secs(90);

/// A lab of hosts with daemons, live migration on.
pub struct Hosts {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Hosts {
    /// `n` hosts, each with a daemon; live migration turned on everywhere (as an admin would).
    pub fn new(n: usize) -> Hosts {
        Hosts::with(n, true)
    }

    /// `n` hosts with daemons; live migration as a new host has it (off) unless `on`.
    pub fn with(n: usize, on: bool) -> Hosts {
        let dir = tmp();
        let lab = Lab::new(LabOptions::new(n, dir.path()).with_daemons(ferry_bin()))
            .expect("building a lab with daemons");
        let config = dir.path().join("cli.json");
        let hosts: serde_json::Map<String, Value> = lab
            .hosts
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    Value::String(format!("unix:{}", h.socket().display())),
                )
            })
            .collect();
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({"default": "hv1", "hosts": hosts})).unwrap(),
        )
        .unwrap();
        let h = Hosts { lab, dir, config };
        if on {
            for i in 1..=n {
                h.ok(&[
                    "--host",
                    &format!("hv{i}"),
                    "host",
                    "set",
                    "--live-migration",
                    "on",
                ]);
            }
        }
        h
    }

    /// Run `ferry ARGS` (with the lab's CLI config) to completion.
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.ferry_timeout(args, T)
    }

    pub fn ferry_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let mut child = std::process::Command::new(ferry_bin())
            .args(args)
            .env("FERRY_CONFIG", &self.config)
            .env_remove("FERRY_HOST")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
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
                    "ferry {args:?} did not finish in {timeout:?}\nstdout: {}\nstderr: {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Start `ferry ARGS` in the background (a move to interrupt, a console), its stdin a pipe.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(ferry_bin())
            .args(args)
            .env("FERRY_CONFIG", &self.config)
            .env_remove("FERRY_HOST")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ferry ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed:\nstdout: {}\nstderr: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `ferry --json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// A VM as host `host` reports it (`None`: it has no such VM).
    pub fn vm(&self, host: &str, name: &str) -> Option<Value> {
        let out = self.ferry(&["--json", "--host", host, "vm", "show", name]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// A VM's state on `host` ("running", ...), or "absent".
    pub fn state(&self, host: &str, name: &str) -> String {
        self.vm(host, name)
            .map(|v| v["state"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "absent".into())
    }

    /// Wait until a VM's state on `host` is `want`.
    pub fn wait_state(&self, host: &str, name: &str, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state(host, name);
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} on {host} is {s}, not {want}, after {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Host `host`'s state directory.
    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.lab.host(host).unwrap().state_dir.clone()
    }

    /// The serial socket `port` (1 or 2) of VM `name` on `host`.
    pub fn serial(&self, host: &str, name: &str, port: u8) -> PathBuf {
        self.state_dir(host)
            .join("vms")
            .join(name)
            .join("run")
            .join(if port == 1 { "con" } else { "con2" })
    }

    /// Every daemon log and VMM log of the lab, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for h in &self.lab.hosts {
            for e in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = e.path();
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                if n.starts_with(&h.name) && n.ends_with(".log") {
                    out.push_str(&format!("--- {n}\n{}\n", tail(&p)));
                }
            }
            for e in std::fs::read_dir(h.state_dir.join("vms"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = e.path().join("run/vmm.log");
                if p.exists() {
                    out.push_str(&format!("--- {} {}\n{}\n", h.name, p.display(), tail(&p)));
                }
            }
        }
        out
    }

    /// Everything host `host`'s daemon has logged so far.
    pub fn daemon_log(&self, host: &str) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(host) && n.ends_with(".log") {
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// The lab's client connects to a guest's TCP port.
    pub fn connect(&self, ip: &str, port: u16) -> std::net::TcpStream {
        let s = self
            .lab
            .connect_from_client(&format!("{ip}:{port}"), T)
            .unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    }
}

fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A test guest defined and started through a daemon, with its console followed.
pub struct Guest {
    pub name: String,
    pub ip: String,
    pub disk: Option<PathBuf>,
    pub con: Port,
}

/// What to run in a guest.
pub struct GuestSpec<'a> {
    pub name: &'a str,
    pub host: &'a str,
    /// Which lab address it gets (guest_ip(k)).
    pub k: usize,
    pub memory: u64,
    pub disk: bool,
    /// The size of its disk, MiB (the writer stops when it is full).
    pub disk_mib: u64,
    /// Extra guest command line (the heartbeat, TCP server and, with a disk, the writer run
    /// anyway).
    pub cmdline: &'a str,
    /// Extra `vm create` options.
    pub extra: Vec<&'a str>,
}

impl Default for GuestSpec<'_> {
    fn default() -> Self {
        GuestSpec {
            name: "web01",
            host: "hv1",
            k: 0,
            memory: 256,
            disk: true,
            disk_mib: 64,
            cmdline: "dirty=32 rate=0",
            extra: Vec::new(),
        }
    }
}

impl Hosts {
    /// Create and start a test guest, and wait until its console answers.
    pub fn guest(&self, s: GuestSpec) -> Guest {
        let kernel = self.dir.path().join("testguest.elf");
        if !kernel.exists() {
            std::fs::write(&kernel, ferry_testguest::elf()).unwrap();
        }
        let ip = ferry_lab::guest_ip(s.k);
        let disk = s.disk.then(|| {
            let p = self.dir.path().join(format!("{}.img", s.name));
            std::fs::File::create(&p)
                .unwrap()
                .set_len(s.disk_mib << 20)
                .unwrap();
            p
        });
        let cmdline = format!(
            "hb=2 ip={ip}/24 {} {}",
            if s.disk {
                "disk=write flush=4 qd=4"
            } else {
                ""
            },
            s.cmdline
        );
        let mem = s.memory.to_string();
        let mut args = vec![
            "--host",
            s.host,
            "vm",
            "create",
            s.name,
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            &mem,
            "--vcpus",
            "2",
            "--net",
            "bridge=br0",
            "--cmdline",
            &cmdline,
        ];
        let disk_arg = disk.as_ref().map(|d| d.display().to_string());
        if let Some(d) = &disk_arg {
            args.extend(["--disk", d.as_str()]);
        }
        args.extend(s.extra.iter().copied());
        args.push("--start");
        self.ok(&args);
        let con = Port::follow(self.serial(s.host, s.name, 1), Duration::from_millis(2));
        let g = Guest {
            name: s.name.into(),
            ip,
            disk,
            con,
        };
        g.wait_answering();
        if g.disk.is_some() {
            g.wait_disk_scanned();
        }
        g
    }
}

impl Guest {
    /// Wait until the guest answers on its console.
    pub fn wait_answering(&self) {
        let deadline = Instant::now() + T;
        while !self.con.connected() {
            assert!(
                Instant::now() < deadline,
                "{}'s console never appeared",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        loop {
            if self.con.ask(b's', "STATUS", Duration::from_secs(2)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never answered: {}",
                self.name,
                self.con.text()
            );
        }
    }

    /// Wait until the guest's start-up disk scan is over: its `DISK found=` line, or (when
    /// the console was followed only after that line) a writer that has started.
    pub fn wait_disk_scanned(&self) {
        let deadline = Instant::now() + T;
        loop {
            let text = self.con.text();
            if text.contains("DISK found=") || text.contains("DISK full") {
                return;
            }
            if let Ok(s) = self.con.ask(b's', "STATUS", Duration::from_secs(2)) {
                if super::field(&s, "disk_acked").is_some_and(|a| a != "0") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}'s disk scan never ended: {}",
                self.name,
                self.con.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Follow the guest's console on `host` (after a move).
    pub fn follow_on(&mut self, h: &Hosts, host: &str) {
        self.con.close();
        self.con = Port::follow(h.serial(host, &self.name, 1), Duration::from_millis(2));
        self.wait_answering();
    }

    /// Everything the guest can prove: memory intact, disk intact, progress; returns writes.
    pub fn verify(&self, min_writes: u64) -> u64 {
        let t = Duration::from_secs(30);
        let v = self.con.ask(b'v', "VERIFY", t).unwrap();
        assert!(v.starts_with("VERIFY OK"), "{}: memory: {v}", self.name);
        if self.disk.is_some() {
            let d = self.con.ask(b'd', "DISK VERIFY", t).unwrap();
            assert!(d.starts_with("DISK VERIFY OK"), "{}: disk: {d}", self.name);
        }
        let s = self.con.ask(b's', "STATUS", t).unwrap();
        let writes: u64 = super::field(&s, "writes").unwrap().parse().unwrap();
        assert!(writes >= min_writes, "{} lost progress: {s}", self.name);
        if self.disk.is_some() {
            assert_eq!(super::field(&s, "disk_errors").as_deref(), Some("0"), "{s}");
        }
        writes
    }

    /// How many disk records the guest's writer has made durable (its disk shows no errors).
    pub fn durable(&self) -> u64 {
        let s = self.con.ask(b's', "STATUS", T).unwrap();
        assert_eq!(super::field(&s, "disk_errors").as_deref(), Some("0"), "{s}");
        super::num(&s, "disk_durable")
    }

    /// Wait until the writer has made `at_least` records durable (or filled its disk); returns
    /// how many it has.
    pub fn wait_durable(&self, at_least: u64) -> u64 {
        let deadline = Instant::now() + T;
        loop {
            let d = self.durable();
            // A writer that filled its disk stops (its records stay for the verifier).
            if d >= at_least || self.con.text().contains("DISK full") {
                return d;
            }
            assert!(Instant::now() < deadline, "the disk writer stalled at {d}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client's TCP counter stream from this guest.
    pub fn stream(&self, h: &Hosts) -> Stream {
        Stream::new(h.connect(&self.ip, 19))
    }
}

/// A disk the guest does not touch, full of data (so a copy has something to copy: every 4th
/// MiB zero, the rest pseudo-random from `seed`), and its contents.
pub fn data_disk(dir: &Path, mib: usize, seed: u32) -> (PathBuf, Vec<u8>) {
    let p = dir.join("data.img");
    let mut bytes = vec![0u8; mib << 20];
    let mut x = seed | 1;
    for (i, b) in bytes.iter_mut().enumerate() {
        if (i >> 20) % 4 == 3 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8 | 1;
    }
    std::fs::write(&p, &bytes).unwrap();
    (p, bytes)
}

impl Hosts {
    /// Start `ferry ARGS` (a move that copies disks) and return once its copy has begun; the
    /// caller waits for the child.
    #[allow(clippy::zombie_processes)]
    pub fn spawn_until_copying(&self, args: &[&str]) -> std::process::Child {
        let child = self.spawn(args);
        let deadline = Instant::now() + T;
        loop {
            let v: Value = self.json(&["move", "list"]);
            // This move: the one not ended yet (earlier ones have).
            let m = v["moves"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| !["done", "failed", "cancelled"].contains(&m["state"].as_str().unwrap()))
                .cloned();
            let copied: u64 = m
                .as_ref()
                .and_then(|m| m["storage"].as_array())
                .map(|s| s.iter().map(|x| x["copied_bytes"].as_u64().unwrap()).sum())
                .unwrap_or(0);
            if copied > 0 {
                return child;
            }
            assert!(Instant::now() < deadline, "the copy never started: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Parse a move's `--json` report (the last line of stdout).
pub fn report(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// stdout and stderr of an output, together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Hosts {
    /// The lab's admin credentials (made by `ferry cluster init` on hv1).
    pub fn admin_dir(&self) -> PathBuf {
        self.lab.admin_dir()
    }

    /// Run `ferry ARGS` as a remote admin: from the lab's client namespace, over mutual TLS,
    /// with the credentials in `creds` and no CLI config (the cluster document names hosts).
    pub fn remote(&self, creds: &Path, args: &[&str]) -> Output {
        let empty = self.dir.path().join("remote-cli.json");
        std::fs::write(&empty, "{}").unwrap();
        let out = ferry_lab::Lab::exec(&self.lab.client)
            .arg(ferry_bin())
            .args(args)
            .env("FERRY_CREDS", creds)
            .env("FERRY_CONFIG", &empty)
            .env_remove("FERRY_HOST")
            .env_remove("FERRY_INSECURE")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        out
    }

    /// Restart host `i`'s daemon (optionally with `env` for it and its VMMs).
    pub fn restart_daemon(&mut self, i: usize, env: &[(&str, &str)]) {
        if let Some(d) = self.lab.daemon(i) {
            d.kill();
        }
        let p = self
            .lab
            .start_daemon_env(Path::new(ferry_bin()), i, &[], env)
            .unwrap();
        self.lab.set_daemon(i, p);
        self.lab.wait_daemon(i, T).unwrap();
    }
}

impl Hosts {
    /// The destination never ran `vm` for move `id`: its outcome record is absent or aborted, and
    /// it keeps no trace of the VM.
    pub fn assert_never_ran_on(&self, host: &str, vm: &str, id: &str) {
        let rec = self
            .state_dir(host)
            .join("moves")
            .join(format!("{id}.outcome"));
        if let Ok(b) = std::fs::read(&rec) {
            let r: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(r["outcome"], "aborted", "{host} recorded {r}");
        }
        let deadline = Instant::now() + T;
        while self.state(host, vm) != "absent" {
            assert!(
                Instant::now() < deadline,
                "{host} still has {vm}: {:?}",
                self.vm(host, vm)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
