//! `ferry demo`: the main job on a fresh machine. It builds a lab of two hosts and a client
//! (network namespaces on one Ethernet segment), boots ferry's test guest on host A with all its
//! workloads (memory dirtier, disk writer, heartbeat, TCP server), holds a TCP stream to it from
//! the client, moves the running guest to host B and back, and has the guest prove after each
//! move that its memory, its disk and the stream are intact.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use ferry_lab::{Lab, LabOptions, Port};

/// How often to look for a serial socket that is not there yet.
const POLL: Duration = Duration::from_millis(5);
/// How long the guest may take to answer.
const ANSWER: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Working set the guest rewrites flat out, in MiB.
    #[arg(long, default_value_t = 64)]
    dirty: u64,
    /// Keep sockets, disk image and logs here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Vmm {
    child: Child,
    api: PathBuf,
    con: Port,
    hb: Port,
}

impl Vmm {
    fn spawn(ns: &str, dir: &Path, tag: &str, args: &[String]) -> Result<Vmm> {
        let api = dir.join(format!("{tag}.api"));
        let (c1, c2) = (
            dir.join(format!("{tag}.com1")),
            dir.join(format!("{tag}.com2")),
        );
        let child = Lab::exec(ns)
            .arg(std::env::current_exe()?)
            .args(args)
            .arg("--api")
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", c1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", c2.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{tag}.log")))?)
            .spawn()?;
        Ok(Vmm {
            child,
            api,
            con: Port::follow(c1, POLL),
            hb: Port::follow(c2, POLL),
        })
    }

    fn ctl(&self, req: ferry_api::Request) -> Result<ferry_api::ResponseBody> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.api.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        match ferry_vmm::api_server::call(&self.api, &req)? {
            ferry_api::Response::Ok(b) => Ok(b),
            ferry_api::Response::Error(e) => bail!("{e}"),
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

/// The client's TCP stream from the guest's port 19: a counter sequence that must not skip.
struct Stream {
    s: TcpStream,
    next: u64,
    carry: Vec<u8>,
}

impl Stream {
    fn read(&mut self, bytes: usize) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < bytes {
            let n = self.s.read(&mut buf)?;
            if n == 0 {
                bail!("the guest closed the TCP stream");
            }
            got += n;
            self.carry.extend_from_slice(&buf[..n]);
            let whole = self.carry.len() / 8 * 8;
            for c in self.carry[..whole].chunks_exact(8) {
                let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
                if v != self.next {
                    bail!(
                        "TCP stream corrupted: expected counter {}, got {v}",
                        self.next
                    );
                }
                self.next += 1;
            }
            self.carry.drain(..whole);
        }
        Ok(())
    }
}

fn check(con: &Port) -> Result<(String, String, String)> {
    let v = con.ask(b'v', "VERIFY", ANSWER)?;
    let d = con.ask(b'd', "DISK VERIFY", ANSWER)?;
    let s = con.ask(b's', "STATUS", ANSWER)?;
    if !v.starts_with("VERIFY OK") || !d.starts_with("DISK VERIFY OK") {
        bail!("the guest found damage: {v} / {d}");
    }
    Ok((v, d, s))
}

pub fn run(a: DemoArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    let dir = a.dir.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let result = demo(&a, &dir);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn demo(a: &DemoArgs, dir: &Path) -> Result<()> {
    let lab = Lab::new(LabOptions::new(2, dir.join("lab")))?;
    println!(
        "[1/5] lab: hosts A ({}) and B ({}) and a client ({}) on one segment",
        lab.hosts[0].ip,
        lab.hosts[1].ip,
        ferry_lab::CLIENT_IP
    );
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    let cmdline = format!(
        "hb=2 dirty={} rate=0 disk=write flush=8 qd=8 ip={}/24",
        a.dirty,
        ferry_lab::guest_ip(0)
    );
    println!(
        "[2/5] booting ferry's test guest on host A: {} MiB, {} vCPUs, disk {}, net on A's bridge\n      workloads: `{cmdline}`",
        a.memory,
        a.vcpus,
        disk.display()
    );
    let args: Vec<String> = [
        "vmm",
        "run",
        "--kernel",
        &guest.display().to_string(),
        "--cmdline",
        &cmdline,
        "--memory",
        &a.memory.to_string(),
        "--vcpus",
        &a.vcpus.to_string(),
        "--disk",
        &disk.display().to_string(),
        "--net",
        "bridge=br0",
        "--paused",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut src = Vmm::spawn(&lab.hosts[0].ns, dir, "hostA", &args)?;
    while !(src.con.connected() && src.hb.connected()) {
        if src.child.try_wait()?.is_some() {
            bail!(
                "the VMM on host A did not start; see {}",
                dir.join("hostA.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    src.ctl(ferry_api::Request::Resume)?;
    let t = Instant::now();
    let (banner, _) = src
        .con
        .line_after(0, "ferry-testguest", Duration::from_secs(60))?;
    src.con.line_after(0, "READY", Duration::from_secs(60))?;
    println!("      guest: {banner}");
    println!(
        "      READY {} ms after resume (the dirtier's working set is filled first)",
        t.elapsed().as_millis()
    );
    let addr = format!("{}:19", ferry_lab::guest_ip(0)).parse()?;
    let s = ferry_vmm::host_io::connect_in_netns(&lab.client, addr, Duration::from_secs(10))
        .context("the client cannot reach the guest's TCP server")?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut stream = Stream {
        s,
        next: 0,
        carry: Vec::new(),
    };
    stream.read(4 << 20)?;
    std::thread::sleep(Duration::from_millis(1000));
    let (v, d, s) = check(&src.con)?;
    println!(
        "      client holds a TCP stream to the guest: {} counters verified",
        stream.next
    );
    println!("      {v}\n      {d}\n      {s}");

    let mut here = src;
    let mut noise = Duration::ZERO;
    for (step, (from, to_ns, to_ip, tag)) in [
        ("A", &lab.hosts[1].ns, lab.hosts[1].ip.as_str(), "hostB"),
        ("B", &lab.hosts[0].ns, lab.hosts[0].ip.as_str(), "hostA2"),
    ]
    .into_iter()
    .enumerate()
    {
        let to_name = if step == 0 { "B" } else { "A" };
        println!("[{}/5] live migration {from} -> {to_name}", 3 + step);
        let beats = here.hb.beats();
        noise = noise.max(
            beats
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default(),
        );
        let listen = format!("{to_ip}:7788");
        let dst = Vmm::spawn(
            to_ns,
            dir,
            tag,
            &[
                "vmm".into(),
                "receive".into(),
                "--listen".into(),
                listen.clone(),
            ],
        )?;
        let mut report = None;
        let settings = ferry_api::MigrateSettings::to(listen);
        ferry_vmm::api_server::call_stream(
            &here.api,
            &ferry_api::Request::Migrate {
                settings,
                follow: true,
            },
            |r| {
                if let ferry_api::Response::Ok(ferry_api::ResponseBody::Migration(p)) = r {
                    println!(
                    "      {:>6.2}s {:?} round {} sent {:>6.1} MiB, dirty {:>6} pages, link {:>6.0} Mbit/s, expected pause {:>6.1} ms",
                    p.elapsed_ms as f64 / 1000.0,
                    p.phase,
                    p.round,
                    p.bytes_sent as f64 / f64::from(1 << 20),
                    p.dirty_pages,
                    p.bandwidth_mbit,
                    p.expected_downtime_ms
                );
                    report = Some(p);
                }
                true
            },
        )?;
        let p = report.context("no migration report")?;
        if p.phase != ferry_api::MigrationPhase::Done {
            bail!("the migration failed: {}", p.error.unwrap_or_default());
        }
        here.child.wait()?;
        while !dst.hb.connected() || dst.hb.beats().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let last_src = *here
            .hb
            .beats()
            .last()
            .context("no heartbeat on the source")?;
        let first_dst = dst.hb.beats()[0];
        stream.read(4 << 20)?;
        let (v, d, s) = check(&dst.con)?;
        println!(
            "      done in {:.2} s: {:.1} MiB in {} rounds; pause {:.1} ms measured by ferry, {:.1} ms seen by the guest's heartbeat",
            p.elapsed_ms as f64 / 1000.0,
            p.bytes_sent as f64 / f64::from(1 << 20),
            p.round + 1,
            p.downtime_ms.unwrap_or_default(),
            (first_dst - last_src).as_secs_f64() * 1000.0
        );
        println!(
            "      TCP stream: {} counters, none lost or reordered",
            stream.next
        );
        println!("      {v}\n      {d}\n      {s}");
        here = dst;
    }
    println!("[5/5] powering the guest off on host A");
    here.con.send(b'p')?;
    let st = here.child.wait()?;
    if !st.success() {
        bail!("the VMM ended with {st}");
    }
    println!(
        "done: the guest moved A -> B -> A while running; memory, disk and TCP verified after each move\n      (heartbeat noise floor before the moves: {:.1} ms)",
        noise.as_secs_f64() * 1000.0
    );
    Ok(())
}
