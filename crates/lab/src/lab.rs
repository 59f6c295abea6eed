//! The lab itself: namespaces, the segment, addresses, daemons, and clean-up (also of labs
//! left behind by a run that was killed).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::proc::Proc;

/// Where labs register themselves, one folder each, so a later run finds one left behind.
pub const REGISTRY: &str = "/run/ferry-lab";
/// The lab segment.
pub const LAB_SUBNET: &str = "10.78.0.0/24";
/// The client's address.
pub const CLIENT_IP: &str = "10.78.0.2";
/// The address the lab gives guest number `k` (on the segment, after the hosts and client).
pub fn guest_ip(k: usize) -> String {
    format!("10.78.0.{}", 100 + k)
}

/// Port the host daemons listen on.
pub const DAEMON_PORT: u16 = 7700;

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The lab's name (namespaces are `<name>-hv1`, ...). `None`: a unique name for this
    /// process, for tests and benchmarks that run side by side.
    pub name: Option<String>,
    /// How many hosts.
    pub hosts: usize,
    /// Where the hosts' state directories, logs and disk images go.
    pub dir: PathBuf,
    /// Start a host daemon in each host with this `ferry` binary (None: no daemons).
    pub ferry: Option<PathBuf>,
    /// Whether the lab outlives this process (`ferry lab up`): then only `ferry lab down` (or
    /// the next `lab up`) removes it.
    pub persistent: bool,
    /// Daemons without a cluster, on plain TCP (`--insecure`); by default the lab forms a
    /// cluster and every link is mutual TLS.
    pub insecure: bool,
}

impl LabOptions {
    /// `hosts` hosts without daemons, files under `dir`, named for this process.
    pub fn new(hosts: usize, dir: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            name: None,
            hosts,
            dir: dir.into(),
            ferry: None,
            persistent: false,
            insecure: false,
        }
    }

    /// Start a host daemon (this `ferry` binary) in every host.
    pub fn with_daemons(mut self, ferry: impl Into<PathBuf>) -> LabOptions {
        self.ferry = Some(ferry.into());
        self
    }
}

/// One host of a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    /// `hv1`, `hv2`, ...
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the segment (on its bridge `br0`).
    pub ip: String,
    /// Its daemon's state directory.
    pub state_dir: PathBuf,
}

impl LabHost {
    /// The daemon's address on the segment.
    pub fn daemon_addr(&self) -> String {
        format!("{}:{DAEMON_PORT}", self.ip)
    }

    /// The daemon's local socket (reachable from anywhere on this machine).
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("hostd.sock")
    }

    /// The daemon's log.
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.with_extension("log")
    }
}

/// What a lab records about itself in the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabRecord {
    pub name: String,
    /// The process that owns the lab (0: persistent, owned by whoever runs `lab down`).
    pub owner_pid: u32,
    /// The owner's start time (clock ticks since boot), so a reused PID is not taken for it.
    pub owner_start: u64,
    pub namespaces: Vec<String>,
    pub hosts: Vec<LabHost>,
    pub client_ns: String,
    pub dir: PathBuf,
}

/// A lab of hosts (see the crate docs).
pub struct Lab {
    pub record: LabRecord,
    pub hosts: Vec<LabHost>,
    /// The client namespace.
    pub client: String,
    switch: String,
    daemons: Vec<Proc>,
    /// File servers added with [`Lab::add_file_server`], and their processes.
    pub file_servers: Vec<LabFileServer>,
    file_server_procs: Vec<Proc>,
    persistent: bool,
}

/// A file server of a lab (`ferry share run` in its own namespace).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabFileServer {
    /// `fs1`, ...
    pub name: String,
    pub ns: String,
    pub ip: String,
    pub state_dir: PathBuf,
    /// Run with `--insecure`: not of the cluster, NBD and its API in the clear, anyone may
    /// write (a plaintext figure for benchmarks).
    #[serde(default)]
    pub insecure: bool,
}

/// The file server's API port in a lab.
pub const SHARE_PORT: u16 = 7800;
/// The file server's NBD port in a lab.
pub const NBD_PORT: u16 = 10809;

impl LabFileServer {
    /// Its management API's address.
    pub fn api_addr(&self) -> String {
        format!("{}:{SHARE_PORT}", self.ip)
    }

    /// Where NBD clients connect.
    pub fn nbd_addr(&self) -> String {
        format!("{}:{NBD_PORT}", self.ip)
    }

    /// Its local API socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("share.sock")
    }
}

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

fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    ip(&v)
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

/// A process's start time (field 22 of /proc/PID/stat), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Every process inside network namespace `ns`.
fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kill every process in the namespaces (the lab started them all: daemons, their VMMs, test
/// servers), then remove the namespaces and with them every interface.
fn tear_down(namespaces: &[String]) {
    for _ in 0..50 {
        let pids: Vec<u32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a PID read from the lab's own namespaces; no memory involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for ns in namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

fn record_path(name: &str) -> PathBuf {
    Path::new(REGISTRY).join(format!("{name}.json"))
}

/// Remove labs whose owner is gone (a killed test run), or the one named `name` whatever its
/// owner. Returns the names removed.
pub fn remove_stale(name: Option<&str>) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir(REGISTRY) else {
        return removed;
    };
    for e in dir.flatten() {
        let path = e.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<LabRecord>(&text) else {
            continue;
        };
        let owner_gone = r.owner_pid != 0 && start_time(r.owner_pid) != Some(r.owner_start);
        if owner_gone || name == Some(r.name.as_str()) {
            tear_down(&r.namespaces);
            let _ = std::fs::remove_file(&path);
            removed.push(r.name);
        }
    }
    removed
}

/// The record of the lab named `name`, if one is registered.
pub fn find(name: &str) -> Option<LabRecord> {
    let text = std::fs::read_to_string(record_path(name)).ok()?;
    serde_json::from_str(&text).ok()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// On Ctrl-C (SIGINT), SIGTERM or SIGHUP, remove every lab this process owns (with every
/// process in it) before dying, so an interrupted test, demo or benchmark leaves no orphans.
/// Installed once, by the first lab a process makes.
fn clean_up_on_signal() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("lab-cleanup".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let me = std::process::id();
                    for r in registered() {
                        if r.owner_pid == me {
                            eprintln!("ferry: signal {sig}: removing lab {}", r.name);
                            tear_down(&r.namespaces);
                            let _ = std::fs::remove_file(record_path(&r.name));
                        }
                    }
                    std::process::exit(128 + sig);
                }
            });
    });
}

/// Every lab in the registry.
fn registered() -> Vec<LabRecord> {
    std::fs::read_dir(REGISTRY)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<LabRecord>(&t).ok())
        .collect()
}

impl Lab {
    /// Build a lab (needs root). Labs left behind by killed runs are removed first.
    pub fn new(opts: LabOptions) -> Result<Lab> {
        require_root("a ferry lab")?;
        remove_stale(opts.name.as_deref());
        if !opts.persistent {
            clean_up_on_signal();
        }
        let name = opts.name.clone().unwrap_or_else(|| {
            format!(
                "fy{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            )
        });
        let switch = format!("{name}-sw");
        let client = format!("{name}-cl");
        let hosts: Vec<LabHost> = (1..=opts.hosts)
            .map(|i| LabHost {
                name: format!("hv{i}"),
                ns: format!("{name}-hv{i}"),
                ip: format!("10.78.0.{}", 10 + i),
                state_dir: opts.dir.join(format!("hv{i}")),
            })
            .collect();
        let mut namespaces = vec![switch.clone(), client.clone()];
        namespaces.extend(hosts.iter().map(|h| h.ns.clone()));
        let (owner_pid, owner_start) = if opts.persistent {
            (0, 0)
        } else {
            let pid = std::process::id();
            (pid, start_time(pid).unwrap_or(0))
        };
        let record = LabRecord {
            name: name.clone(),
            owner_pid,
            owner_start,
            namespaces: namespaces.clone(),
            hosts: hosts.clone(),
            client_ns: client.clone(),
            dir: opts.dir.clone(),
        };
        // Registered before anything exists, so a crash half-way still leaves a trail.
        std::fs::create_dir_all(REGISTRY).with_context(|| format!("creating {REGISTRY}"))?;
        std::fs::write(record_path(&name), serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("registering the lab in {REGISTRY}"))?;
        let mut lab = Lab {
            record,
            hosts,
            client,
            switch,
            daemons: Vec::new(),
            file_servers: Vec::new(),
            file_server_procs: Vec::new(),
            persistent: opts.persistent,
        };
        lab.wire().context("building the lab's network")?;
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        if let Some(ferry) = &opts.ferry {
            if opts.insecure {
                for i in 0..lab.hosts.len() {
                    let p = lab.start_daemon(ferry, i, &["--insecure"])?;
                    lab.daemons.push(p);
                }
                for i in 0..lab.hosts.len() {
                    lab.wait_daemon(i, Duration::from_secs(30))?;
                }
            } else {
                lab.form_cluster(ferry)
                    .context("forming the lab's cluster")?;
            }
        }
        Ok(lab)
    }

    /// Where the lab's admin credentials are (made by `ferry cluster init` on hv1).
    pub fn admin_dir(&self) -> PathBuf {
        self.record.dir.join("admin")
    }

    /// Run `ferry ARGS` here (not in a namespace) and return its stdout.
    pub fn ferry_out(ferry: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(ferry)
            .args(args)
            .env_remove("FERRY_HOST")
            .env_remove("FERRY_CONFIG")
            .output()
            .context("running ferry")?;
        if !out.status.success() {
            bail!(
                "ferry {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into())
    }

    /// The lab's cluster, as an admin makes one: the authority on hv1 (`ferry cluster init`),
    /// every other host enrolled with a one-time token (`ferry host join`, from inside its
    /// namespace over TLS), every host in the migration group, the admin's credentials in
    /// [`Lab::admin_dir`].
    fn form_cluster(&mut self, ferry: &Path) -> Result<()> {
        let hv1 = self.hosts[0].clone();
        std::fs::create_dir_all(&hv1.state_dir)?;
        let admin = self.admin_dir();
        Lab::ferry_out(
            ferry,
            &[
                "cluster",
                "init",
                "--name",
                &self.record.name,
                "--state-dir",
                &hv1.state_dir.display().to_string(),
                "--host-name",
                &hv1.name,
                "--listen",
                &hv1.daemon_addr(),
                "--admin",
                "admin",
                "--admin-dir",
                &admin.display().to_string(),
            ],
        )?;
        let p = self.start_daemon(ferry, 0, &[])?;
        self.daemons.push(p);
        self.wait_daemon(0, Duration::from_secs(30))?;
        let authority = format!("{}:{}", hv1.ip, DAEMON_PORT + 1);
        let hv1_sock = format!("unix:{}", hv1.socket().display());
        for i in 1..self.hosts.len() {
            let h = self.hosts[i].clone();
            let token = Lab::ferry_out(
                ferry,
                &["--host", &hv1_sock, "cluster", "token", "--name", &h.name],
            )?;
            std::fs::create_dir_all(&h.state_dir)?;
            let out = Lab::exec(&h.ns)
                .arg(ferry)
                .args([
                    "host",
                    "join",
                    "--authority",
                    &authority,
                    "--token",
                    token.trim(),
                ])
                .arg("--state-dir")
                .arg(&h.state_dir)
                .arg("--listen")
                .arg(h.daemon_addr())
                .output()?;
            if !out.status.success() {
                bail!(
                    "{} could not join: {}",
                    h.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let p = self.start_daemon(ferry, i, &[])?;
            self.daemons.push(p);
        }
        for i in 1..self.hosts.len() {
            self.wait_daemon(i, Duration::from_secs(30))?;
        }
        let mut args = vec![
            "--host",
            hv1_sock.as_str(),
            "cluster",
            "migration-group",
            "add",
        ];
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        args.extend(names.iter().map(|s| s.as_str()));
        Lab::ferry_out(ferry, &args)?;
        Ok(())
    }

    fn wire(&self) -> Result<()> {
        for ns in &self.record.namespaces {
            ip(&["netns", "add", ns]).context("creating the lab's network namespaces")?;
            ipn(ns, &["link", "set", "lo", "up"])?;
        }
        let sw = self.switch.as_str();
        ipn(sw, &["link", "add", "sw", "type", "bridge"])?;
        ipn(sw, &["link", "set", "sw", "up"])?;
        for (i, h) in self.hosts.iter().enumerate() {
            let port = format!("h{}", i + 1);
            ipn(
                sw,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &h.ns,
                ],
            )?;
            ipn(sw, &["link", "set", &port, "master", "sw"])?;
            ipn(sw, &["link", "set", &port, "up"])?;
            // A fixed bridge MAC: otherwise a bridge takes the lowest MAC of its ports and
            // changes it as VM taps come and go, leaving stale ARP entries on the other hosts.
            let mac = format!("02:78:00:00:00:{:02x}", 0x10 + i + 1);
            ipn(
                &h.ns,
                &["link", "add", "br0", "address", &mac, "type", "bridge"],
            )?;
            ipn(
                &h.ns,
                &["addr", "add", &format!("{}/24", h.ip), "dev", "br0"],
            )?;
            ipn(&h.ns, &["link", "set", "br0", "up"])?;
            ipn(&h.ns, &["link", "set", "eth0", "master", "br0"])?;
            ipn(&h.ns, &["link", "set", "eth0", "up"])?;
        }
        ipn(
            sw,
            &[
                "link",
                "add",
                "cl",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.client,
            ],
        )?;
        ipn(sw, &["link", "set", "cl", "master", "sw"])?;
        ipn(sw, &["link", "set", "cl", "up"])?;
        ipn(
            &self.client,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
        )?;
        ipn(&self.client, &["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Start host `i`'s daemon (`ferry host run`) with `extra` arguments; its log goes next to
    /// its state directory. The daemon's peers are the lab's other hosts.
    pub fn start_daemon(&self, ferry: &Path, i: usize, extra: &[&str]) -> Result<Proc> {
        self.start_daemon_env(ferry, i, extra, &[])
    }

    /// Like [`Lab::start_daemon`], with `env` set for the daemon (and so for its VMMs).
    pub fn start_daemon_env(
        &self,
        ferry: &Path,
        i: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let h = &self.hosts[i];
        std::fs::create_dir_all(&h.state_dir)?;
        let mut cmd = Lab::exec(&h.ns);
        cmd.arg(ferry)
            .args(["host", "run", "--name", &h.name, "--listen"])
            .arg(h.daemon_addr())
            .arg("--state-dir")
            .arg(&h.state_dir);
        for o in self.hosts.iter().filter(|o| o.name != h.name) {
            cmd.arg("--peer")
                .arg(format!("{}={}", o.name, o.daemon_addr()));
        }
        cmd.args(extra);
        cmd.env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into()),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A restarted daemon gets a new log (hv1.log, hv1.2.log, ...): the old one is evidence.
        let mut log = h.daemon_log();
        let mut n = 1;
        while log.exists() {
            n += 1;
            log = h.state_dir.with_extension(format!("{n}.log"));
        }
        let mut p = Proc::spawn(cmd, format!("{}'s daemon", h.name), log)?;
        p.alive()?;
        Ok(p)
    }

    /// Wait until host `i`'s daemon answers on its local socket.
    pub fn wait_daemon(&self, i: usize, timeout: Duration) -> Result<()> {
        let sock = self.hosts[i].socket();
        let deadline = Instant::now() + timeout;
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{}'s daemon did not start within {timeout:?} (socket {})",
                    self.hosts[i].name,
                    sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Host `i`'s daemon process (if the lab started it).
    pub fn daemon(&mut self, i: usize) -> Option<&mut Proc> {
        self.daemons.get_mut(i)
    }

    /// Replace host `i`'s daemon process (after a test killed and restarted it).
    pub fn set_daemon(&mut self, i: usize, p: Proc) {
        if i < self.daemons.len() {
            self.daemons[i] = p;
        }
    }

    /// Add a file server to the lab: its own namespace on the segment (10.78.0.2N), enrolled
    /// in the lab's cluster with a one-time token (`ferry share join`), `ferry share run`
    /// started and answering. The lab must have formed a cluster (daemons, not insecure).
    pub fn add_file_server(&mut self, ferry: &Path) -> Result<LabFileServer> {
        self.add_file_server_as(ferry, false)
    }

    /// A file server outside the cluster (`ferry share run --insecure`): no TLS anywhere.
    pub fn add_insecure_file_server(&mut self, ferry: &Path) -> Result<LabFileServer> {
        self.add_file_server_as(ferry, true)
    }

    fn add_file_server_as(&mut self, ferry: &Path, insecure: bool) -> Result<LabFileServer> {
        let n = self.file_servers.len() + 1;
        let fs = LabFileServer {
            name: format!("fs{n}"),
            ns: format!("{}-fs{n}", self.record.name),
            ip: format!("10.78.0.{}", 20 + n),
            state_dir: self.record.dir.join(format!("fs{n}")),
            insecure,
        };
        // Registered before it exists, so `lab down` after a crash removes it too.
        self.record.namespaces.push(fs.ns.clone());
        std::fs::write(
            record_path(&self.record.name),
            serde_json::to_vec_pretty(&self.record)?,
        )?;
        ip(&["netns", "add", &fs.ns])?;
        ipn(&fs.ns, &["link", "set", "lo", "up"])?;
        let port = format!("f{n}");
        ipn(
            &self.switch,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &fs.ns,
            ],
        )?;
        ipn(&self.switch, &["link", "set", &port, "master", "sw"])?;
        ipn(&self.switch, &["link", "set", &port, "up"])?;
        ipn(
            &fs.ns,
            &["addr", "add", &format!("{}/24", fs.ip), "dev", "eth0"],
        )?;
        ipn(&fs.ns, &["link", "set", "eth0", "up"])?;
        std::fs::create_dir_all(&fs.state_dir)?;
        if insecure {
            let p = self.start_file_server(ferry, &fs)?;
            self.file_server_procs.push(p);
            self.file_servers.push(fs.clone());
            return Ok(fs);
        }
        let hv1 = &self.hosts[0];
        let hv1_sock = format!("unix:{}", hv1.socket().display());
        let token = Lab::ferry_out(
            ferry,
            &[
                "--host",
                &hv1_sock,
                "cluster",
                "token",
                "--role",
                "fileserver",
                "--name",
                &fs.name,
            ],
        )?;
        let authority = format!("{}:{}", hv1.ip, DAEMON_PORT + 1);
        let out = Lab::exec(&fs.ns)
            .arg(ferry)
            .args([
                "share",
                "join",
                "--authority",
                &authority,
                "--token",
                token.trim(),
            ])
            .arg("--state-dir")
            .arg(&fs.state_dir)
            .arg("--listen")
            .arg(fs.api_addr())
            .output()?;
        if !out.status.success() {
            bail!(
                "{} could not join: {}",
                fs.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let p = self.start_file_server(ferry, &fs)?;
        self.file_server_procs.push(p);
        self.file_servers.push(fs.clone());
        Ok(fs)
    }

    /// Start (or restart) a file server's `ferry share run`; returns once it answers.
    pub fn start_file_server(&self, ferry: &Path, fs: &LabFileServer) -> Result<Proc> {
        let mut cmd = Lab::exec(&fs.ns);
        cmd.arg(ferry)
            .args(["share", "run", "--name", &fs.name, "--listen"])
            .arg(fs.api_addr())
            .arg("--nbd-listen")
            .arg(fs.nbd_addr())
            .arg("--state-dir")
            .arg(&fs.state_dir);
        if fs.insecure {
            cmd.arg("--insecure");
        }
        cmd.env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut log = fs.state_dir.with_extension("log");
        let mut k = 1;
        while log.exists() {
            k += 1;
            log = fs.state_dir.with_extension(format!("{k}.log"));
        }
        let mut p = Proc::spawn(cmd, format!("{}'s file server", fs.name), log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(fs.socket()).is_err() {
            p.alive()?;
            if Instant::now() > deadline {
                bail!("{} did not start within 30 s", fs.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// The file server processes (to kill one in a test).
    pub fn file_server_proc(&mut self, i: usize) -> Option<&mut Proc> {
        self.file_server_procs.get_mut(i)
    }

    /// Replace file server `i`'s process (after a test restarted it).
    pub fn set_file_server_proc(&mut self, i: usize, p: Proc) {
        if i < self.file_server_procs.len() {
            self.file_server_procs[i] = p;
        }
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Cap every host's link to the segment at `mbit` Mbit/s in both directions (tc tbf on
    /// each end of its uplink), as a host with a slower NIC would have; 0 removes the caps.
    pub fn cap_link(&self, mbit: u64) -> Result<()> {
        for (i, h) in self.hosts.iter().enumerate() {
            let port = format!("h{}", i + 1);
            for (ns, dev) in [
                (h.ns.as_str(), "eth0"),
                (self.switch.as_str(), port.as_str()),
            ] {
                let _ = Lab::exec(ns)
                    .args(["tc", "qdisc", "del", "dev", dev, "root"])
                    .output();
                if mbit > 0 {
                    let rate = format!("{mbit}mbit");
                    let out = Lab::exec(ns)
                        .args(["tc", "qdisc", "add", "dev", dev, "root"])
                        .args(["tbf", "rate", &rate, "burst", "256kb", "latency", "50ms"])
                        .output()
                        .context("running tc")?;
                    if !out.status.success() {
                        bail!("tc: {}", String::from_utf8_lossy(&out.stderr).trim());
                    }
                }
            }
        }
        Ok(())
    }

    /// TCP throughput from host `from` to host `to` over the segment, in Mbit/s: one stream
    /// blasting for `secs` seconds, counted at the receiver (the first 200 ms, while TCP and
    /// the tbf bucket settle, are left out).
    pub fn link_mbit(&self, from: usize, to: usize, port: u16, secs: f64) -> Result<f64> {
        use std::io::{Read, Write};
        let addr: SocketAddr = format!("{}:{port}", self.hosts[to].ip).parse()?;
        let listener =
            ferry_vmm::host_io::in_netns(&self.hosts[to].ns, move || TcpListener::bind(addr))
                .context("listening for the link test")?;
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
        let mut s = ferry_vmm::host_io::connect_in_netns(
            &self.hosts[from].ns,
            addr,
            Duration::from_secs(5),
        )
        .context("connecting for the link test")?;
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
            bail!("the link test moved no data");
        }
        Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e6)
    }

    /// `ip netns exec NS` as a command prefix.
    pub fn exec(ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }

    /// Connect from the client namespace to `ip:port`, retrying until `timeout`.
    pub fn connect_from_client(&self, addr: &str, timeout: Duration) -> Result<TcpStream> {
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match ferry_vmm::host_io::connect_in_netns(&self.client, addr, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("the client cannot reach {addr}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Let the lab live on after this process (for `ferry lab up`).
    pub fn keep(mut self) {
        self.persistent = true;
        // The daemons run on; forget their handles without killing them.
        for p in std::mem::take(&mut self.daemons) {
            std::mem::forget(p);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        self.file_server_procs.clear();
        self.daemons.clear();
        tear_down(&self.record.namespaces);
        let _ = std::fs::remove_file(record_path(&self.record.name));
    }
}
