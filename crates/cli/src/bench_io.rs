//! `ferry bench io`: what the guest sees of its virtio disk and network under ferry, beside
//! QEMU running the same guest binary, and beside the same file on the host.
//!
//! - disk: the test guest's benchmark mode (`disk=bench io=... bs=... qd=...`: requests of one
//!   kind kept in flight and only counted, so the device and not the guest sets the figure):
//!   4 KiB random reads and writes at 1 and 16 in flight, 1 MiB sequential reads and writes at
//!   4 in flight, and a 4 KiB write followed by a flush, one after the other (the flush's
//!   latency). All on one 1 GiB image filled with data first (no holes, no first writes).
//!   Every row starts from the same page cache: the image dropped and read back in (a cold
//!   row only drops it, so its reads go to the host's disk).
//!   The host column: the same file and pattern on the host, one `pread`/`pwrite` at a time at
//!   depth 1, io_uring at depth 16.
//! - net: the host (the VM's host namespace) reads the guest's counter stream (port 19) and
//!   writes to its discard port (9), one connection each.
//! - QEMU (Debian's qemu-system-x86, `-M microvm` with virtio-mmio devices, modern transport):
//!   the same guest binary and command line, the same image, a tap on the same bridge; QEMU's
//!   defaults otherwise (virtio-blk on its thread pool, virtio-net without vhost, which this
//!   machine lacks).

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use ferry_lab::{Lab, LabOptions, Port, Proc};

#[derive(Args)]
pub struct IoArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// One JSON object per figure.
    #[arg(long)]
    json: bool,
    /// QEMU binary to run the same guest beside ferry ("" to skip QEMU).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
}

struct Guest {
    vmm: Proc,
    con: Port,
}

impl Guest {
    fn line(&self, from: usize, prefix: &str, timeout: Duration) -> Result<(String, usize)> {
        self.con.line_after(from, prefix, timeout)
    }

    fn ask(&mut self, cmd: u8, prefix: &str) -> Result<(String, Duration)> {
        let t = Instant::now();
        let l = self.con.ask(cmd, prefix, Duration::from_secs(120))?;
        Ok((l, t.elapsed()))
    }
}

fn field(line: &str, key: &str) -> Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("no {key}= in {line}"))?
        .parse()
        .with_context(|| format!("{key}= in {line}"))
}

fn boot(lab: &Lab, dir: &Path, cmdline: &str, disk: Option<&Path>) -> Result<Guest> {
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let (api, com1) = (dir.join("io.api"), dir.join("io.com1"));
    // A VMM killed by the row before left its sockets behind.
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&com1);
    let mut cmd = Lab::exec(&lab.hosts[0].ns);
    cmd.arg(std::env::current_exe()?)
        .args(["vmm", "run", "--kernel"])
        .arg(&guest)
        .args([
            "--memory",
            "256",
            "--cmdline",
            cmdline,
            "--net",
            "bridge=br0",
            "--paused",
        ]);
    if let Some(d) = disk {
        cmd.arg("--disk").arg(d);
    }
    cmd.arg("--api")
        .arg(&api)
        .arg("--serial")
        .arg(format!("unix:{}", com1.display()));
    let mut vmm = Proc::spawn(cmd, "the VMM", dir.join("io.log"))?;
    let con = Port::follow(com1, Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() || !api.exists() {
        vmm.alive()?;
        if Instant::now() > deadline {
            bail!("the VMM did not start; see {}", vmm.log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ferry_vmm::api_server::call(&api, &ferry_api::Request::Resume)?;
    let g = Guest { vmm, con };
    g.line(0, "READY", Duration::from_secs(60))?;
    Ok(g)
}

/// The same guest under QEMU: microvm with a modern virtio-mmio disk on `disk` and a card on a
/// tap of the lab host's bridge (`qemu_microvm` names the transports on its command line).
fn boot_qemu(
    lab: &Lab,
    dir: &Path,
    qemu: &Path,
    cmdline: &str,
    disk: Option<&Path>,
) -> Result<Guest> {
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let ns = &lab.hosts[0].ns;
    let tap = "qiotap0";
    // The guest comes back at the same address with another MAC: forget the old one.
    let mut setup = vec![vec!["ip", "neigh", "flush", "all"]];
    if !lab_has(ns, tap) {
        setup.push(vec!["ip", "tuntap", "add", tap, "mode", "tap"]);
        setup.push(vec!["ip", "link", "set", tap, "master", "br0", "up"]);
    }
    for args in setup {
        let out = Lab::exec(ns).args(&args).output()?;
        if !out.status.success() {
            bail!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let com1 = dir.join("qemu.com1");
    let _ = std::fs::remove_file(&com1);
    let mut cmd = super::qemu_microvm(ns, qemu, &guest, cmdline, 256);
    if let Some(disk) = disk {
        cmd.arg("-drive").arg(format!(
            "id=d0,file={},format=raw,if=none,cache=writeback",
            disk.display()
        ));
        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    cmd.args([
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device",
        "virtio-net-device,netdev=n0,mac=52:54:00:10:10:10",
    ]);
    cmd.arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", com1.display()));
    let mut vmm = Proc::spawn(cmd, "QEMU", dir.join("qemu.log"))?;
    let con = Port::follow(com1, Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() {
        vmm.alive()?;
        if Instant::now() > deadline {
            bail!("QEMU did not start; see {}", vmm.log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let g = Guest { vmm, con };
    g.line(0, "READY", Duration::from_secs(60))
        .with_context(|| format!("the guest under QEMU; its log: {}", g.vmm.log.display()))?;
    Ok(g)
}

/// Whether interface `name` exists in namespace `ns`.
fn lab_has(ns: &str, name: &str) -> bool {
    Lab::exec(ns)
        .args(["ip", "link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One disk row: the guest's benchmark mode.
struct DiskRow {
    name: &'static str,
    io: &'static str,
    bs: u64,
    qd: u32,
    /// The image's pages are dropped from the host's page cache first: every read goes to
    /// the host's disk (the row shows how many requests a VMM keeps in flight there).
    cold: bool,
}

const fn row(name: &'static str, io: &'static str, bs: u64, qd: u32) -> DiskRow {
    DiskRow {
        name,
        io,
        bs,
        qd,
        cold: false,
    }
}

const DISK_ROWS: [DiskRow; 8] = [
    row("randread 4k qd1", "randread", 4096, 1),
    row("randread 4k qd16", "randread", 4096, 16),
    row("randwrite 4k qd1", "randwrite", 4096, 1),
    row("randwrite 4k qd16", "randwrite", 4096, 16),
    row("read 1M qd4", "read", 1 << 20, 4),
    row("write 1M qd4", "write", 1 << 20, 4),
    row("write 4k + flush", "flush", 4096, 1),
    DiskRow {
        cold: true,
        ..row("randread 4k qd16 cold", "randread", 4096, 16)
    },
];

/// Requests per second the guest's benchmark mode completes over `secs`.
fn disk_rate(g: &mut Guest, secs: u64) -> Result<f64> {
    let (found, _) = g.line(0, "DISK found=", Duration::from_secs(60))?;
    if !found.starts_with("DISK found=") {
        bail!("no disk: {found}");
    }
    let (s0, _) = g.ask(b's', "STATUS")?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (s1, _) = g.ask(b's', "STATUS")?;
    if field(&s1, "disk_errors")? > 0 {
        bail!("the guest saw disk errors: {s1}");
    }
    Ok((field(&s1, "disk_acked")? - field(&s0, "disk_acked")?) as f64 / t0.elapsed().as_secs_f64())
}

/// TCP guest -> host (the counter stream) and host -> guest (the discard port), Mbit/s.
fn tcp_rates(lab: &Lab, secs: u64) -> Result<(f64, f64)> {
    let connect = |port: u16| -> Result<std::net::TcpStream> {
        let addr = format!("{}:{port}", ferry_lab::guest_ip(0)).parse()?;
        let s =
            ferry_vmm::host_io::connect_in_netns(&lab.hosts[0].ns, addr, Duration::from_secs(20))
                .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut s = connect(19)?;
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        bytes += s.read(&mut buf)? as u64;
    }
    let out = bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
    drop(s);
    let mut s = connect(9)?;
    buf.fill(0x5a);
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        bytes += std::io::Write::write(&mut s, &buf)? as u64;
    }
    let into = bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
    Ok((out, into))
}

/// One VMM's figures: each disk row's requests/s, then TCP out and in (Mbit/s).
struct Figures {
    disk: Vec<f64>,
    tcp: (f64, f64),
}

/// Every row under one VMM (`boot` starts its guest with a command line and maybe the disk).
fn run_rows(
    lab: &Lab,
    image: &Path,
    secs: u64,
    mut boot: impl FnMut(&str, Option<&Path>) -> Result<Guest>,
) -> Result<Figures> {
    let mut disk = Vec::new();
    for r in &DISK_ROWS {
        let cmdline = format!("hb=0 disk=bench io={} bs={} qd={}", r.io, r.bs, r.qd);
        fresh_cache(image, r.cold)?;
        let mut g = boot(&cmdline, Some(image))?;
        disk.push(disk_rate(&mut g, secs).with_context(|| r.name)?);
        g.vmm.kill();
    }
    let mut g = boot(&format!("hb=0 ip={}/24", ferry_lab::guest_ip(0)), None)?;
    g.line(0, "NET up", Duration::from_secs(30))?;
    let tcp = tcp_rates(lab, secs)
        .with_context(|| format!("TCP to the guest; its console:\n{}", g.con.text()))?;
    g.vmm.kill();
    Ok(Figures { disk, tcp })
}

/// Drop the image's pages from the host's page cache (written back first, so none stays).
fn drop_cache(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("dropping {} from the page cache", path.display()))
}

/// Every row starts from the same page cache: the image dropped from it and, unless `cold`,
/// read back in once. How the cache holds a file's pages depends on how they got there (the
/// image's own writes, a row's random writes, a read), and 4 KiB random writes into it ran
/// from 16k to 500k IOPS on the host alone with nothing else changed.
fn fresh_cache(path: &Path, cold: bool) -> Result<()> {
    drop_cache(path)?;
    if !cold {
        let mut f = std::fs::File::open(path)?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }
    Ok(())
}

/// A cheap random record number below `n` (xorshift; the guest's rows are random too).
fn next_record(x: &mut u64, n: u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x % n
}

/// The host's own figure for a 4 KiB random row, on the same file: one `pread`/`pwrite` at a
/// time for depth 1; io_uring for more, `qd` requests submitted with one call and all reaped
/// before the next `qd` (on one thread, the best a single thread did here: fio's io_uring
/// engine keeping 16 in flight one completion at a time did ~0.6x of it).
fn host_row(path: &Path, r: &DiskRow, secs: u64) -> Result<f64> {
    fresh_cache(path, r.cold)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let records = f.metadata()?.len() / 4096;
    let write = r.io == "randwrite";
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    let mut n = 0u64;
    let rate = if r.qd <= 1 {
        let mut buf = [0x5au8; 4096];
        while t.elapsed() < Duration::from_secs(secs) {
            let off = next_record(&mut x, records) * 4096;
            if write {
                f.write_all_at(&buf, off)?;
            } else {
                f.read_exact_at(&mut buf, off)?;
            }
            n += 1;
        }
        n as f64 / t.elapsed().as_secs_f64()
    } else {
        use io_uring::{opcode, types, IoUring};
        use std::os::fd::AsRawFd;
        let qd = r.qd as usize;
        let mut ring = IoUring::new(r.qd.next_power_of_two())?;
        let mut bufs = vec![[0x5au8; 4096]; qd];
        let fd = types::Fd(f.as_raw_fd());
        while t.elapsed() < Duration::from_secs(secs) {
            for (i, b) in bufs.iter_mut().enumerate() {
                let off = next_record(&mut x, records) * 4096;
                let e = if write {
                    opcode::Write::new(fd, b.as_ptr(), 4096).offset(off).build()
                } else {
                    opcode::Read::new(fd, b.as_mut_ptr(), 4096)
                        .offset(off)
                        .build()
                };
                // SAFETY: `bufs` is neither touched nor freed until every entry of this round
                // has completed (the loop below reaps all `qd` of them).
                unsafe { ring.submission().push(&e.user_data(i as u64)) }
                    .map_err(|_| anyhow::anyhow!("io_uring queue full"))?;
            }
            let mut left = qd;
            while left > 0 {
                ring.submit_and_wait(left)?;
                for c in ring.completion() {
                    if c.result() < 4096 {
                        bail!("host io_uring request failed: {}", c.result());
                    }
                    left -= 1;
                }
            }
            n += qd as u64;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    Ok(rate)
}

pub fn run(a: IoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = bench(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn bench(a: &IoArgs, dir: &Path) -> Result<()> {
    let lab = Lab::new(LabOptions::new(1, dir.join("lab")))?;
    // One image for every row, full of data: reads read data, writes overwrite it.
    let image = dir.join("disk.img");
    {
        let f = std::fs::File::create(&image)?;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..1024u64 {
            f.write_all_at(&chunk, i << 20)?;
        }
        f.sync_all()?;
    }
    let ferry = run_rows(&lab, &image, a.seconds, |c, d| boot(&lab, dir, c, d))?;
    let qemu = match super::which(&a.qemu) {
        Some(bin) => Some(run_rows(&lab, &image, a.seconds, |c, d| {
            boot_qemu(&lab, dir, &bin, c, d)
        })?),
        None => {
            if !a.qemu.is_empty() {
                eprintln!(
                    "QEMU ({}) is not installed: its rows are left out (apt-get install qemu-system-x86)",
                    a.qemu
                );
            }
            None
        }
    };
    // The host's own figure where it has one: the 4 KiB random rows.
    let host: Vec<Option<f64>> = DISK_ROWS
        .iter()
        .map(|r| {
            r.io.starts_with("rand")
                .then(|| host_row(&image, r, a.seconds))
                .transpose()
        })
        .collect::<Result<_>>()?;

    if a.json {
        for (k, r) in DISK_ROWS.iter().enumerate() {
            let mut v = serde_json::json!({
                "bench": r.name, "io": r.io, "bs": r.bs, "qd": r.qd,
                "ferry_iops": ferry.disk[k].round(),
                "ferry_mb_s": (ferry.disk[k] * r.bs as f64 / 1e5).round() / 10.0,
            });
            if let Some(q) = &qemu {
                v["qemu_iops"] = q.disk[k].round().into();
                v["qemu_mb_s"] = ((q.disk[k] * r.bs as f64 / 1e5).round() / 10.0).into();
            }
            if let Some(h) = host[k] {
                v["host_iops"] = h.round().into();
            }
            println!("{v}");
        }
        let mut v = serde_json::json!({"bench": "tcp", "ferry_out_mbit": ferry.tcp.0.round(), "ferry_in_mbit": ferry.tcp.1.round()});
        if let Some(q) = &qemu {
            v["qemu_out_mbit"] = q.tcp.0.round().into();
            v["qemu_in_mbit"] = q.tcp.1.round().into();
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "virtio I/O as the test guest sees it, ferry beside QEMU ({} s each; same guest binary, 1 GiB image full of data):",
        a.seconds
    );
    println!(
        "{:<22} {:>11} {:>9} {:>11} {:>9} {:>10} {:>11} {:>10}",
        "what", "ferry IOPS", "MB/s", "QEMU IOPS", "MB/s", "ferry/QEMU", "host IOPS", "ferry/host"
    );
    for (k, r) in DISK_ROWS.iter().enumerate() {
        let f = ferry.disk[k];
        let mb = |x: f64| x * r.bs as f64 / 1e6;
        let (qi, qm, qr) = match &qemu {
            Some(q) => (
                format!("{:.0}", q.disk[k]),
                format!("{:.1}", mb(q.disk[k])),
                format!("{:.2}x", f / q.disk[k]),
            ),
            None => Default::default(),
        };
        let (hi, hr) = match host[k] {
            Some(h) => (format!("{h:.0}"), format!("{:.2}x", f / h)),
            None => Default::default(),
        };
        println!(
            "{:<22} {:>11.0} {:>9.1} {qi:>11} {qm:>9} {qr:>10} {hi:>11} {hr:>10}",
            r.name,
            f,
            mb(f)
        );
    }
    let flush = DISK_ROWS
        .iter()
        .position(|r| r.io == "flush")
        .unwrap_or_default();
    let lat = |x: f64| 1e6 / x.max(1e-9);
    match &qemu {
        Some(q) => {
            println!(
                "write 4k + flush latency: ferry {:.0} us, QEMU {:.0} us",
                lat(ferry.disk[flush]),
                lat(q.disk[flush])
            );
            println!(
                "tcp guest->host: ferry {:.0} Mbit/s, QEMU {:.0} ({:.2}x); host->guest: ferry {:.0}, QEMU {:.0} ({:.2}x)",
                ferry.tcp.0,
                q.tcp.0,
                ferry.tcp.0 / q.tcp.0,
                ferry.tcp.1,
                q.tcp.1,
                ferry.tcp.1 / q.tcp.1
            );
            let worst = (0..DISK_ROWS.len())
                .map(|k| ferry.disk[k] / q.disk[k])
                .chain([ferry.tcp.0 / q.tcp.0, ferry.tcp.1 / q.tcp.1])
                .fold(f64::INFINITY, f64::min);
            println!(
                "target: at least QEMU's figure on every row: {} (worst {worst:.2}x)",
                if worst >= 1.0 { "met" } else { "NOT MET" }
            );
        }
        None => println!(
            "write 4k + flush latency: {:.0} us; tcp guest->host {:.0} Mbit/s, host->guest {:.0}",
            lat(ferry.disk[flush]),
            ferry.tcp.0,
            ferry.tcp.1
        ),
    }
    println!(
        "host column: the same file on the host, one pread/pwrite at a time at depth 1, io_uring at depth 16 (16 submitted per call, all reaped)"
    );
    let qd16: Vec<f64> = DISK_ROWS
        .iter()
        .enumerate()
        .filter(|(k, r)| r.qd == 16 && !r.cold && host[*k].is_some())
        .map(|(k, _)| ferry.disk[k] / host[k].unwrap_or(f64::INFINITY))
        .collect();
    if let Some(worst) = qd16.iter().copied().reduce(f64::min) {
        println!(
            "target: 4 KiB at 16 in flight at least 0.5x of the host's own: {} (worst {worst:.2}x)",
            if worst >= 0.5 { "met" } else { "NOT MET" }
        );
    }
    Ok(())
}
