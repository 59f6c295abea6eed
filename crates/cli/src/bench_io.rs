//! `ferry bench io`: what the guest sees of its virtio disk and network, beside the same file
//! read and written directly on the host, and beside QEMU running the same guest binary.
//!
//! - disk: the test guest's writer (4 KiB records, `qd` in flight, no flushes) gives write
//!   IOPS; its verifier (`d`) re-reads every record written, giving read IOPS. The host does
//!   the same 4 KiB writes and reads on the same file with `pwrite`/`pread`, one at a time.
//! - net: the host (the VM's host namespace) reads the guest's TCP stream port for a while.
//! - QEMU (Debian's qemu-system-x86, `-M microvm` with virtio-mmio devices, modern transport):
//!   the same guest binary and command line, a fresh image of the same size, a tap on the same
//!   bridge; QEMU's defaults otherwise (virtio-blk on its thread pool, virtio-net without vhost,
//!   which this machine lacks).

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
    /// Requests the guest keeps in flight.
    #[arg(long, default_value_t = 16)]
    qd: u32,
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

fn boot(lab: &Lab, dir: &Path, cmdline: &str, disk: &Path) -> Result<Guest> {
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let (api, com1) = (dir.join("io.api"), dir.join("io.com1"));
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
            "--disk",
        ])
        .arg(disk)
        .arg("--api")
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
/// tap of the lab host's bridge (QEMU appends the `virtio_mmio.device=` tokens itself).
fn boot_qemu(lab: &Lab, dir: &Path, qemu: &Path, cmdline: &str, disk: &Path) -> Result<Guest> {
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let ns = &lab.hosts[0].ns;
    let tap = "qiotap0";
    // The guest comes back at the same address with another MAC: forget the old one.
    for args in [
        vec!["ip", "neigh", "flush", "all"],
        vec!["ip", "tuntap", "add", tap, "mode", "tap"],
        vec!["ip", "link", "set", tap, "master", "br0", "up"],
    ] {
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
    let mut cmd = Lab::exec(ns);
    cmd.arg(qemu).args([
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off,pit=on,pic=on,isa-serial=on",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "256",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-monitor",
        "none",
    ]);
    // microvm adds its `virtio_mmio.device=` tokens only for Linux's boot path, not for a
    // Multiboot kernel's command line: name all eight of its transports (512 bytes each from
    // 0xfeb00000, IRQ 5 on); the guest skips the empty ones.
    let tokens: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000u64 + i * 512,
                5 + i
            )
        })
        .collect();
    let append = format!("{cmdline} {}", tokens.join(" "));
    cmd.arg("-kernel").arg(&guest).args(["-append", &append]);
    cmd.arg("-drive").arg(format!(
        "id=d0,file={},format=raw,if=none,cache=writeback",
        disk.display()
    ));
    cmd.args(["-device", "virtio-blk-device,drive=d0"]);
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

/// What one VMM's guest measured: write and read IOPS, TCP guest->host Mbit/s.
struct Figures {
    write: f64,
    read: f64,
    tcp: f64,
}

/// The disk writer for `secs`, the verifier's full read-back, the stream port for `secs`.
fn measure(lab: &Lab, g: &mut Guest, secs: u64) -> Result<Figures> {
    g.line(0, "DISK found=", Duration::from_secs(60))?;
    let (s0, _) = g.ask(b's', "STATUS")?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (s1, _) = g.ask(b's', "STATUS")?;
    let elapsed = t0.elapsed().as_secs_f64();
    let write = (field(&s1, "disk_acked")? - field(&s0, "disk_acked")?) as f64 / elapsed;
    let (v, took) = g.ask(b'd', "DISK VERIFY")?;
    if !v.starts_with("DISK VERIFY OK") {
        bail!("the guest's disk check failed: {v}");
    }
    let read = field(&v, "records")? as f64 / took.as_secs_f64();

    let addr = format!("{}:19", ferry_lab::guest_ip(0)).parse()?;
    let mut s =
        ferry_vmm::host_io::connect_in_netns(&lab.hosts[0].ns, addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 256 << 10];
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        bytes += s.read(&mut buf)? as u64;
    }
    let tcp = bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6;
    Ok(Figures { write, read, tcp })
}

/// Host 4 KiB I/O on `path`: (write IOPS, read IOPS).
fn host_io(path: &Path, secs: u64) -> Result<(f64, f64)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let w = host_writes(&f, secs, false)?;
    let records = f.metadata()?.len() / 4096;
    let mut rb = [0u8; 4096];
    let t = Instant::now();
    let mut m = 0u64;
    while t.elapsed() < Duration::from_secs(secs) {
        f.read_exact_at(&mut rb, (m % records) * 4096)?;
        m += 1;
    }
    Ok((w, m as f64 / t.elapsed().as_secs_f64()))
}

/// Host 4 KiB writes in sequence through `f` for `secs`, one at a time: IOPS. `one_pass`
/// stops at the end of the file (on a new sparse file: every write to a page not written
/// before); otherwise it wraps around and rewrites.
fn host_writes(f: &std::fs::File, secs: u64, one_pass: bool) -> Result<f64> {
    let records = f.metadata()?.len() / 4096;
    let buf = [0x5au8; 4096];
    let t = Instant::now();
    let mut n = 0u64;
    while !(one_pass && n >= records) && t.elapsed() < Duration::from_secs(secs) {
        f.write_all_at(&buf, (n % records) * 4096)?;
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
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
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(1 << 30)?;
    let cmdline = format!(
        "hb=0 disk=write flush=0 qd={} ip={}/24",
        a.qd,
        ferry_lab::guest_ip(0)
    );
    let mut g = boot(&lab, dir, &cmdline, &disk)?;
    let ferry = measure(&lab, &mut g, a.seconds)?;
    drop(g);
    let qemu = match super::which(&a.qemu) {
        Some(bin) => {
            // A fresh image of the same size: the guest's writer makes the same first writes.
            let qdisk = dir.join("qemu-disk.img");
            std::fs::File::create(&qdisk)?.set_len(1 << 30)?;
            let mut q = boot_qemu(&lab, dir, &bin, &cmdline, &qdisk)?;
            let f = measure(&lab, &mut q, a.seconds)?;
            q.vmm.kill();
            let _ = std::fs::remove_file(&qdisk);
            Some(f)
        }
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
    let (write_iops, read_iops, tcp_mbit) = (ferry.write, ferry.read, ferry.tcp);
    let (host_w, host_r) = host_io(&disk, a.seconds)?;
    // The guest's writer goes through a new sparse image, so each record allocates page-cache
    // pages (perf: most of the worker's time is the kernel's copy into fresh pages); the host
    // rows above rewrite pages the guest already made. The same first writes on the host:
    let fresh = dir.join("fresh.img");
    std::fs::File::create(&fresh)?.set_len(1 << 30)?;
    let host_new = host_writes(
        &std::fs::OpenOptions::new().write(true).open(&fresh)?,
        a.seconds,
        true,
    )?;
    let _ = std::fs::remove_file(&fresh);
    let rows = [
        (
            "disk_write_4k",
            "guest",
            write_iops,
            write_iops * 4096.0 / 1e6,
        ),
        ("disk_write_4k", "host", host_w, host_w * 4096.0 / 1e6),
        (
            "disk_write_4k",
            "host-new",
            host_new,
            host_new * 4096.0 / 1e6,
        ),
        ("disk_read_4k", "guest", read_iops, read_iops * 4096.0 / 1e6),
        ("disk_read_4k", "host", host_r, host_r * 4096.0 / 1e6),
    ];
    let mut rows = rows.to_vec();
    if let Some(q) = &qemu {
        rows.insert(
            1,
            ("disk_write_4k", "qemu", q.write, q.write * 4096.0 / 1e6),
        );
        rows.insert(5, ("disk_read_4k", "qemu", q.read, q.read * 4096.0 / 1e6));
    }
    if a.json {
        for (what, side, iops, mbs) in rows {
            println!(
                "{}",
                serde_json::json!({"bench": what, "side": side, "iops": iops.round(), "mb_s": (mbs * 10.0).round() / 10.0})
            );
        }
        println!(
            "{}",
            serde_json::json!({"bench": "tcp_guest_to_host", "side": "guest", "mbit_s": tcp_mbit.round()})
        );
        if let Some(q) = &qemu {
            println!(
                "{}",
                serde_json::json!({"bench": "tcp_guest_to_host", "side": "qemu", "mbit_s": q.tcp.round()})
            );
        }
        return Ok(());
    }
    println!(
        "virtio I/O as the test guest sees it ({} s each; guest qd {}):",
        a.seconds, a.qd
    );
    println!("{:<16} {:>8} {:>12} {:>10}", "what", "side", "IOPS", "MB/s");
    for (what, side, iops, mbs) in &rows {
        println!("{what:<16} {side:>8} {iops:>12.0} {mbs:>10.1}");
    }
    println!(
        "guest/host: write {:.2}x ({:.2}x of the host's first writes to a new file, as the guest's are), read {:.2}x",
        write_iops / host_w,
        write_iops / host_new,
        read_iops / host_r
    );
    println!("tcp guest->host (stream port 19, one connection): {tcp_mbit:.0} Mbit/s");
    if let Some(q) = &qemu {
        println!(
            "tcp guest->host under QEMU: {:.0} Mbit/s\nferry/QEMU (same guest binary, microvm, virtio-mmio): write {:.2}x, read {:.2}x, tcp {:.2}x (target: at least 1x on every row)",
            q.tcp,
            write_iops / q.write,
            read_iops / q.read,
            tcp_mbit / q.tcp
        );
    }
    Ok(())
}
