//! `ferry bench ...`: benchmarks that print figures, with QEMU measured beside ferry in the
//! same run when Debian's qemu-system-x86 is installed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

#[path = "bench_io.rs"]
mod io;
#[path = "bench_migrate.rs"]
mod migrate;
#[path = "bench_move.rs"]
mod move_;
#[path = "bench_storage.rs"]
mod storage;
#[path = "bench_storage_move.rs"]
mod storage_move;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Process start to the guest's first heartbeat, and the VMM's resident memory beyond
    /// guest RAM, for 256 MiB and 1 GiB guests; ferry and (if installed) QEMU side by side.
    Boot(BootArgs),
    /// Live migration between two lab hosts (network namespaces; needs root) for 1 GiB and
    /// 4 GiB guests, idle, dirtying 256 MiB at 100 MiB/s and flat out, with and without a
    /// 1 Gbit/s link cap: total time, guest-observed pause (heartbeat gap) beside its noise
    /// floor, the VMM's own pause figure, bytes, rounds, convergence and the guest's memory
    /// check; ferry and (if installed) QEMU side by side, with ferry/QEMU ratios.
    Migrate(migrate::MigrateArgs),
    /// What the host daemons add to a live move: the same guest and workloads moved by `ferry
    /// move` through the daemons and directly VMM to VMM in one run (lab hosts; needs root):
    /// total time as the admin sees it, guest-observed pause beside its noise floor; and an
    /// evacuation of 4 idle VMs against the sum of their single moves.
    Move(move_::MoveArgs),
    /// Virtio as the test guest sees it, beside QEMU running the same guest and the host's own
    /// figure on the same file: 4 KiB random reads and writes at 1 and 16 in flight (and at 16
    /// with a cold page cache), 1 MiB sequential reads and writes, write + flush latency, TCP
    /// both ways (a lab host; needs root).
    Io(io::IoArgs),
    /// A VM's disk on a file server's share (NBD over TLS, a lab file server) against the same
    /// disk on the host's own filesystem: 1 MiB sequential and 4 KiB random writes and reads,
    /// and their ratios; and live
    /// storage moves (to a folder, to the share, with the VM to the other host) beside QEMU's.
    Storage(storage::StorageArgs),
}

#[derive(Args)]
pub struct BootArgs {
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024])]
    memory: Vec<u64>,
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// QEMU binary to compare against ("" to skip QEMU).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(a) => boot(a),
        BenchCmd::Migrate(a) => migrate::run(a),
        BenchCmd::Io(a) => io::run(a),
        BenchCmd::Storage(a) => storage::run(a),
        BenchCmd::Move(a) => move_::run(a),
    }
}

/// Builds the command line of one VMM under test.
type CommandMaker = Box<dyn Fn() -> Command>;

struct Sample {
    first_beat: Duration,
    overhead_kib: u64,
}

/// Resident memory of `pid` outside its guest-RAM mappings (anonymous mappings of at least
/// 64 MiB), in KiB.
fn overhead_kib(pid: u32) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size_kib = 0u64;
    let mut anon_mapping = false;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            anon_mapping = line.split_whitespace().count() < 6;
            continue;
        }
        let val: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Size:" => size_kib = val,
            "Rss:" => {
                total += val;
                if anon_mapping && size_kib >= 64 * 1024 {
                    guest += val;
                }
            }
            _ => {}
        }
    }
    Ok(total - guest)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Start `cmd` (guest console on its stdout), wait for READY then the first heartbeat, let
/// it run 300 ms, measure its memory, and stop it.
fn measure(mut cmd: Command) -> Result<Sample> {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut ready = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                seen.push(b);
                if !ready && seen.ends_with(b"READY\n") {
                    ready = true;
                } else if ready && b == b'.' {
                    let _ = tx.send(Instant::now());
                    // Keep draining so the guest never blocks on a full pipe.
                    while out.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    return;
                }
            }
        }
    });
    let result = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(t) => {
            std::thread::sleep(Duration::from_millis(300));
            let overhead = overhead_kib(child.id());
            overhead.map(|overhead_kib| Sample {
                first_beat: t - start,
                overhead_kib,
            })
        }
        Err(_) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = child.kill();
                let _ = e.read_to_string(&mut err);
            }
            Err(anyhow::anyhow!("no heartbeat within 30 s: {err}"))
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// QEMU's microvm running the test guest `kernel` in namespace `ns`: KVM with the CPU flags
/// this machine needs, one vCPU, `mem_mib`, modern virtio-mmio, nothing else plugged in. The
/// command line gets the eight `virtio_mmio.device=` tokens of microvm's transports (512 bytes
/// each from 0xfeb00000, IRQ 5 on), which microvm adds only to Linux's; the guest skips the
/// empty ones. The caller adds disks, cards, serial ports and QMP.
pub(crate) fn qemu_microvm(
    ns: &str,
    qemu: &Path,
    kernel: &Path,
    cmdline: &str,
    mem_mib: u64,
) -> Command {
    let tokens: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000u64 + i * 512,
                5 + i
            )
        })
        .collect();
    let mut cmd = ferry_lab::Lab::exec(ns);
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
        &mem_mib.to_string(),
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-monitor",
        "none",
    ]);
    cmd.arg("-kernel")
        .arg(kernel)
        .args(["-append", &format!("{cmdline} {}", tokens.join(" "))]);
    cmd
}

pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    if bin.is_empty() {
        return None;
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

fn boot(a: BootArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let me = std::env::current_exe()?;
    let qemu = which(&a.qemu);
    if qemu.is_none() && !a.json {
        println!(
            "(QEMU {:?} not found: install qemu-system-x86 for the side-by-side figures)",
            a.qemu
        );
    }
    let cmdline = "mode=run hb=1";
    let mut rows = vec![];
    for &mib in &a.memory {
        let mut vmms: Vec<(&str, CommandMaker)> = vec![(
            "ferry",
            Box::new({
                let (me, guest) = (me.clone(), guest.clone());
                move || {
                    let mut c = Command::new(&me);
                    c.args(["vmm", "run", "--kernel"]).arg(&guest);
                    c.args([
                        "--cmdline",
                        cmdline,
                        "--memory",
                        &mib.to_string(),
                        "--serial",
                        "stdio",
                    ]);
                    c
                }
            }),
        )];
        if let Some(q) = qemu.clone() {
            let guest = guest.clone();
            vmms.push((
                "qemu",
                Box::new(move || {
                    let mut c = Command::new(&q);
                    c.args([
                        "-accel",
                        "kvm",
                        "-cpu",
                        "host,-arch-capabilities",
                        "-m",
                        &mib.to_string(),
                    ]);
                    c.arg("-kernel").arg(&guest).args(["-append", cmdline]);
                    c.args([
                        "-serial",
                        "stdio",
                        "-display",
                        "none",
                        "-no-reboot",
                        "-nodefaults",
                        "-monitor",
                        "none",
                    ]);
                    c
                }),
            ));
        }
        for (name, make) in &vmms {
            let mut beats = vec![];
            let mut over = vec![];
            for _ in 0..a.runs {
                let s = measure(make()).with_context(|| format!("{name} with {mib} MiB"))?;
                beats.push(s.first_beat.as_secs_f64() * 1000.0);
                over.push(s.overhead_kib as f64 / 1024.0);
            }
            rows.push((name.to_string(), mib, median(beats), median(over)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let find = |vmm: &str, mib: u64| {
        rows.iter()
            .find(|r| r.0 == vmm && r.1 == mib)
            .map(|r| (r.2, r.3))
    };
    if a.json {
        for r in &rows {
            println!(
                "{}",
                serde_json::json!({"vmm": r.0, "mem_mib": r.1, "first_heartbeat_ms": (r.2 * 100.0).round() / 100.0,
                    "overhead_mib": (r.3 * 100.0).round() / 100.0, "runs": a.runs})
            );
        }
        return Ok(());
    }
    println!("boot: process start -> first guest heartbeat; VMM resident memory beyond guest RAM");
    println!("(median of {} runs each; test guest `{cmdline}`)", a.runs);
    println!(
        "{:<6} {:>8} {:>16} {:>14}",
        "vmm", "mem_mib", "first_beat_ms", "overhead_mib"
    );
    for r in &rows {
        println!("{:<6} {:>8} {:>16.1} {:>14.1}", r.0, r.1, r.2, r.3);
    }
    for &mib in &a.memory {
        if let (Some(f), Some(q)) = (find("ferry", mib), find("qemu", mib)) {
            println!(
                "ferry/qemu at {mib} MiB: start {:.2}x, overhead {:.2}x",
                f.0 / q.0,
                f.1 / q.1
            );
        }
    }
    Ok(())
}
