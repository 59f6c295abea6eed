//! `ferry bench storage`: a VM's disk on a file server's share (NBD over TLS across the lab's
//! segment) against the same disk on the host's own filesystem, as the test guest sees it.
//!
//! A lab with one host and one file server (`ferry share run`), each in its network namespace,
//! a cluster, TLS everywhere. The same 1 GiB disk, the same guest (through the host daemon, so
//! the share disk gets its write lease as in real use), in its benchmark mode: 1 MiB
//! sequential writes at 4 in flight (timed once they have filled the disk), 1 MiB sequential
//! reads at 4, 4 KiB random writes and reads at 16.
//!
//! The move half: a 6 GiB disk (its last GiB full of data, its start taking the guest's
//! writes: 4 KiB records, one in flight, so write latency is 1/IOPS) moved while the guest
//! writes, by `ferry move --storage-to` (to another folder, and to the share) and, in the same
//! run, by QEMU's drive-mirror + block-job-complete (to another folder), unlimited and at
//! 1 Gbit/s. Printed: total time, bytes copied and skipped, the switch's I/O pause, the guest's
//! write IOPS before and during the move, and the time against bytes / link rate.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use ferry_lab::{Lab, LabOptions, Port};

#[derive(Args)]
pub struct StorageArgs {
    /// Seconds each I/O row is timed.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Runs of each (medians are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// One JSON object per figure.
    #[arg(long)]
    json: bool,
    /// Which half: the share against local disks (`io`), live storage moves (`move`), or both.
    #[arg(long, default_value = "all", value_parser = ["all", "io", "move"])]
    part: String,
    /// MiB of data at the end of the moved disk (6 GiB; at most 1024).
    #[arg(long, default_value_t = 1024)]
    data_mib: u64,
    /// QEMU for the side-by-side move rows.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// The share's and the shared-nothing move's traffic: tls, plain (a file server outside
    /// the cluster; a network both hosts trust for migrations), or both side by side.
    #[arg(long, default_value = "both", value_parser = ["plain", "tls", "both"])]
    encryption: String,
    /// The move half's destinations: another folder, the share, the other host's folder
    /// (shared-nothing).
    #[arg(long = "to", value_delimiter = ',', default_values = ["folder", "share", "host"],
          value_parser = ["folder", "share", "host"])]
    dests: Vec<String>,
    /// The move half's link caps in Mbit/s, 0 = none.
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 1000])]
    caps: Vec<u64>,
}

pub(super) fn field(line: &str, key: &str) -> Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("no {key}= in {line}"))?
        .parse()
        .with_context(|| format!("{key}= in {line}"))
}

pub(super) fn ferry(args: &[&str]) -> Result<String> {
    Lab::ferry_out(&std::env::current_exe()?, args)
}

/// The disk the I/O rows run on: filled by the first row, then read and rewritten.
const IO_DISK_BYTES: u64 = 1 << 30;

/// One I/O row: the test guest's benchmark mode (`disk=bench io=... bs=... qd=...`).
struct IoRow {
    name: &'static str,
    io: &'static str,
    bs: u64,
    qd: u32,
}

/// In this order: the sequential writer fills the disk (one whole pass before it is timed), so
/// every later row reads and rewrites data, not holes.
const IO_ROWS: [IoRow; 4] = [
    IoRow {
        name: "write 1M qd4 (MB/s)",
        io: "write",
        bs: 1 << 20,
        qd: 4,
    },
    IoRow {
        name: "read 1M qd4 (MB/s)",
        io: "read",
        bs: 1 << 20,
        qd: 4,
    },
    IoRow {
        name: "randwrite 4k qd16",
        io: "randwrite",
        bs: 4096,
        qd: 16,
    },
    IoRow {
        name: "randread 4k qd16",
        io: "randread",
        bs: 4096,
        qd: 16,
    },
];

impl IoRow {
    /// The row's figure from requests per second: MB/s for 1 MiB rows, IOPS for 4 KiB.
    fn figure(&self, rate: f64) -> f64 {
        if self.bs >= 1 << 20 {
            rate * self.bs as f64 / 1e6
        } else {
            rate
        }
    }
}

/// Each row on `disk` (a path or an NBD URI), one VM through the host daemon per row (so a
/// share disk gets its write lease as in real use): the row's figures, in `IO_ROWS` order.
fn measure(lab: &Lab, dir: &Path, name: &str, disk: &str, a: &StorageArgs) -> Result<Vec<f64>> {
    let h = &lab.hosts[0];
    let host = format!("unix:{}", h.socket().display());
    let kernel = dir.join("testguest.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, ferry_testguest::elf())?;
    }
    let mut out = Vec::new();
    for (k, r) in IO_ROWS.iter().enumerate() {
        let vm = format!("{name}-{k}");
        let cmdline = format!("hb=0 disk=bench io={} bs={} qd={}", r.io, r.bs, r.qd);
        ferry(&[
            "--host",
            &host,
            "vm",
            "create",
            &vm,
            "--kernel",
            &kernel.display().to_string(),
            "--memory",
            "256",
            "--disk",
            disk,
            "--cmdline",
            &cmdline,
            "--start",
        ])?;
        let con = Port::follow(
            h.state_dir.join("vms").join(&vm).join("run/con"),
            Duration::from_millis(5),
        );
        let rate = row_rate(&con, r, a.seconds).with_context(|| format!("{} on {disk}", r.name));
        con.close();
        ferry(&["--host", &host, "vm", "stop", "--force", &vm])?;
        ferry(&["--host", &host, "vm", "delete", &vm])?;
        out.push(r.figure(rate?));
    }
    Ok(out)
}

/// Requests per second of one row, between two STATUS answers `secs` apart (the first row
/// only once its writer has been over the whole disk).
fn row_rate(con: &Port, r: &IoRow, secs: u64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() {
        if Instant::now() > deadline {
            bail!("the VM's console never appeared");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let fill = if r.io == "write" {
        IO_DISK_BYTES / r.bs
    } else {
        0
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut s0 = con.ask(b's', "STATUS", Duration::from_secs(60))?;
    while field(&s0, "disk_acked")? < fill {
        if Instant::now() > deadline {
            bail!("the first pass over the disk took over 300 s: {s0}");
        }
        std::thread::sleep(Duration::from_millis(200));
        s0 = con.ask(b's', "STATUS", Duration::from_secs(30))?;
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let s1 = con.ask(b's', "STATUS", Duration::from_secs(30))?;
    if field(&s1, "disk_errors")? > 0 {
        bail!("the guest saw disk errors: {s1}");
    }
    Ok((field(&s1, "disk_acked")? - field(&s0, "disk_acked")?) as f64 / t0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: StorageArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-storage-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = bench(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn bench(a: &StorageArgs, dir: &Path) -> Result<()> {
    let ferry_bin = std::env::current_exe()?;
    // Two hosts: the shared-nothing rows move the VM and its disk to hv2.
    let mut lab = Lab::new(LabOptions::new(2, dir.join("lab")).with_daemons(&ferry_bin))?;
    for h in &lab.hosts {
        let host = format!("unix:{}", h.socket().display());
        ferry(&["--host", &host, "host", "set", "--live-migration", "on"])?;
    }
    let fs = lab.add_file_server(&ferry_bin)?;
    let srv = format!("unix:{}", fs.socket().display());
    ferry(&["share", "create", "vms", "--server", &srv])?;
    ferry(&["share", "grant", "vms", "hv1", "write", "--server", &srv])?;
    if a.part != "move" {
        // The plaintext figure: the same NBD server outside the cluster, with no TLS.
        let plain = if a.encryption != "tls" {
            let p = lab.add_insecure_file_server(&ferry_bin)?;
            let s = format!("unix:{}", p.socket().display());
            ferry(&["share", "create", "vms", "--server", &s])?;
            Some((p, s))
        } else {
            None
        };
        io_half(a, dir, &lab, &fs, &srv, plain.as_ref())?;
    }
    if a.part != "io" {
        super::storage_move::run(
            &lab,
            dir,
            &srv,
            &super::storage_move::Plan {
                data_mib: a.data_mib,
                runs: a.runs,
                json: a.json,
                qemu: &a.qemu,
                encryption: &a.encryption,
                dests: &a.dests,
                caps: &a.caps,
            },
        )?;
    }
    Ok(())
}

fn io_half(
    a: &StorageArgs,
    dir: &Path,
    lab: &Lab,
    fs: &ferry_lab::LabFileServer,
    srv: &str,
    plain: Option<&(ferry_lab::LabFileServer, String)>,
) -> Result<()> {
    // (row, NBD URI of its share disk, the file server's socket); local: no URI.
    let mut shares: Vec<(&str, String, &str)> = Vec::new();
    if a.encryption != "plain" {
        shares.push(("share", format!("nbds://{}/vms/bench", fs.nbd_addr()), srv));
    }
    if let Some((p, s)) = plain {
        shares.push(("plain", format!("nbd://{}/vms/bench", p.nbd_addr()), s));
    }
    // Per disk, per row: one figure per run.
    let mut names = vec!["local"];
    names.extend(shares.iter().map(|(n, _, _)| *n));
    let mut figs: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); IO_ROWS.len()]; names.len()];
    let mut keep = |d: usize, got: Vec<f64>| {
        for (k, f) in got.into_iter().enumerate() {
            figs[d][k].push(f);
        }
    };
    for run in 0..a.runs.max(1) {
        let local = dir.join(format!("local{run}.img"));
        std::fs::File::create(&local)?.set_len(IO_DISK_BYTES)?;
        keep(
            0,
            measure(
                lab,
                dir,
                &format!("l{run}"),
                &local.display().to_string(),
                a,
            )?,
        );
        let _ = std::fs::remove_file(&local);
        for (i, (n, uri, server)) in shares.iter().enumerate() {
            ferry(&[
                "disk",
                "create",
                "vms/bench",
                "--size",
                "1G",
                "--server",
                server,
            ])?;
            keep(
                i + 1,
                measure(lab, dir, &format!("{}{run}", &n[..1]), uri, a)?,
            );
            ferry(&["disk", "delete", "vms/bench", "--server", server])?;
        }
    }
    let med: Vec<Vec<f64>> = figs
        .into_iter()
        .map(|rows| rows.into_iter().map(median).collect())
        .collect();
    let col = |name: &str| names.iter().position(|n| *n == name).map(|i| &med[i]);
    let local = &med[0];
    if a.json {
        for (k, r) in IO_ROWS.iter().enumerate() {
            let mut v = serde_json::json!({"bench": "storage", "row": r.name, "io": r.io, "bs": r.bs, "qd": r.qd});
            for (i, n) in names.iter().enumerate() {
                v[*n] = (med[i][k] * 10.0).round().div_euclid(10.0).into();
            }
            if let Some(sh) = col("share") {
                v["share_over_local"] = ((sh[k] / local[k] * 100.0).round() / 100.0).into();
            }
            println!("{v}");
        }
        return Ok(());
    }
    println!(
        "a VM's disk on a share (NBD to a file server namespace: \"share\" with TLS, \"plain\" a file server outside the cluster, no TLS) against local, as the test guest sees it"
    );
    println!(
        "(the guest's benchmark mode on a 1 GiB disk its first row fills; {} s per row, a VM per row; medians of {}):",
        a.seconds,
        a.runs.max(1)
    );
    print!("{:<22}", "row");
    for n in &names {
        print!(" {n:>10}");
    }
    for n in names.iter().skip(1) {
        print!(" {:>12}", format!("{n}/local"));
    }
    println!();
    for (k, r) in IO_ROWS.iter().enumerate() {
        print!("{:<22}", r.name);
        for m in &med {
            print!(" {:>10.0}", m[k]);
        }
        for m in med.iter().skip(1) {
            print!(" {:>11.2}x", m[k] / local[k]);
        }
        println!();
    }
    if let Some(sh) = col("share") {
        let worst = (0..IO_ROWS.len())
            .map(|k| sh[k] / local[k])
            .fold(f64::INFINITY, f64::min);
        println!(
            "target: the share at least 0.7x of local on every row: {} (worst {worst:.2}x)",
            if worst >= 0.7 { "met" } else { "NOT MET" }
        );
    }
    if let (Some(sh), Some(pl)) = (col("share"), col("plain")) {
        let tls: Vec<String> = (0..IO_ROWS.len())
            .map(|k| format!("{:.2}x", sh[k] / pl[k]))
            .collect();
        println!("share tls/plain, row by row: {}", tls.join(", "));
    }
    Ok(())
}
