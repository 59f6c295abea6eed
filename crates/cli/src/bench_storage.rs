//! `ferry bench storage`: a VM's disk on a file server's share (NBD over TLS across the lab's
//! segment) against the same disk on the host's own filesystem, as the test guest sees it.
//!
//! A lab with one host and one file server (`ferry share run`), each in its network namespace,
//! a cluster, TLS everywhere. The same 1 GiB disk, the same guest (through the host daemon, so
//! the share disk gets its write lease as in real use): the guest's writer (4 KiB records in
//! sequence, `qd` in flight, no flushes) gives write IOPS, its verifier (reading every record
//! back, `qd` in flight) read IOPS.
//!
//! The move half: a 4 GiB disk (its last GiB full of data, its start taking the guest's
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
    /// Seconds of writing per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Requests the guest keeps in flight.
    #[arg(long, default_value_t = 16)]
    qd: u32,
    /// Runs of each (medians are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// One JSON object per figure.
    #[arg(long)]
    json: bool,
    /// Which half: the share against local disks (`io`), live storage moves (`move`), or both.
    #[arg(long, default_value = "all", value_parser = ["all", "io", "move"])]
    part: String,
    /// MiB of data at the end of the moved disk (4 GiB; at most 1024).
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

/// Big enough that the writer does not fill it within the measurement.
const DISK_BYTES: u64 = 4 << 30;

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

/// (write IOPS, read IOPS) of one guest on `disk`.
fn measure(lab: &Lab, dir: &Path, name: &str, disk: &str, a: &StorageArgs) -> Result<(f64, f64)> {
    let h = &lab.hosts[0];
    let host = format!("unix:{}", h.socket().display());
    let kernel = dir.join("testguest.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, ferry_testguest::elf())?;
    }
    let cmdline = format!("hb=0 disk=write flush=0 qd={}", a.qd);
    ferry(&[
        "--host",
        &host,
        "vm",
        "create",
        name,
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
        h.state_dir.join("vms").join(name).join("run/con"),
        Duration::from_millis(5),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() {
        if Instant::now() > deadline {
            bail!("{name}'s console never appeared");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest may be writing already: the rate is taken between two STATUS answers.
    let s0 = con.ask(b's', "STATUS", Duration::from_secs(60))?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(a.seconds));
    let s1 = con.ask(b's', "STATUS", Duration::from_secs(30))?;
    let w =
        (field(&s1, "disk_acked")? - field(&s0, "disk_acked")?) as f64 / t0.elapsed().as_secs_f64();
    let t = Instant::now();
    let v = con.ask(b'd', "DISK VERIFY", Duration::from_secs(120))?;
    let took = t.elapsed();
    if !v.starts_with("DISK VERIFY OK") {
        bail!("the guest's disk check failed on {disk}: {v}");
    }
    let r = field(&v, "records")? as f64 / took.as_secs_f64();
    con.close();
    ferry(&["--host", &host, "vm", "stop", "--force", name])?;
    ferry(&["--host", &host, "vm", "delete", name])?;
    Ok((w, r))
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
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![("local", vec![], vec![])];
    rows.extend(shares.iter().map(|(n, _, _)| (*n, vec![], vec![])));
    for run in 0..a.runs.max(1) {
        let local = dir.join(format!("local{run}.img"));
        std::fs::File::create(&local)?.set_len(DISK_BYTES)?;
        let (w, r) = measure(
            lab,
            dir,
            &format!("l{run}"),
            &local.display().to_string(),
            a,
        )?;
        rows[0].1.push(w);
        rows[0].2.push(r);
        let _ = std::fs::remove_file(&local);
        for (i, (n, uri, server)) in shares.iter().enumerate() {
            ferry(&[
                "disk",
                "create",
                "vms/bench",
                "--size",
                "4G",
                "--server",
                server,
            ])?;
            let (w, r) = measure(lab, dir, &format!("{}{run}", &n[..1]), uri, a)?;
            rows[i + 1].1.push(w);
            rows[i + 1].2.push(r);
            ferry(&["disk", "delete", "vms/bench", "--server", server])?;
        }
    }
    let med: Vec<(&str, f64, f64)> = rows
        .into_iter()
        .map(|(n, w, r)| (n, median(w), median(r)))
        .collect();
    let get = |name: &str| med.iter().find(|m| m.0 == name).map(|m| (m.1, m.2));
    let (lw, lr) = get("local").unwrap_or((1.0, 1.0));
    if a.json {
        for (n, w, r) in &med {
            println!(
                "{}",
                serde_json::json!({"bench": "storage", "disk": n, "write_iops": w.round(), "read_iops": r.round(), "qd": a.qd})
            );
        }
        if let Some((sw, sr)) = get("share") {
            println!(
                "{}",
                serde_json::json!({"bench": "storage_ratio", "write": sw / lw, "read": sr / lr})
            );
        }
        return Ok(());
    }
    println!(
        "a VM's disk on a share (NBD to a file server namespace: \"share\" with TLS, \"plain\" a file server outside the cluster, no TLS) against local, as the test guest sees it"
    );
    println!(
        "(4 KiB records in sequence, guest qd {}, {} s of writes, verify reads every record; medians of {}):",
        a.qd,
        a.seconds,
        a.runs.max(1)
    );
    println!("{:<8} {:>12} {:>12}", "disk", "write IOPS", "read IOPS");
    for (n, w, r) in &med {
        println!("{n:<8} {w:>12.0} {r:>12.0}");
    }
    for (n, what) in [("share", "share/local"), ("plain", "plain share/local")] {
        if let Some((w, r)) = get(n) {
            println!(
                "{what}: write {:.2}x, read {:.2}x{}",
                w / lw,
                r / lr,
                if n == "share" {
                    " (target: at least 0.7x)"
                } else {
                    ""
                }
            );
        }
    }
    if let (Some((sw, sr)), Some((pw, pr))) = (get("share"), get("plain")) {
        println!(
            "share tls/plain: write {:.2}x, read {:.2}x of the plaintext IOPS",
            sw / pw,
            sr / pr
        );
    }
    Ok(())
}
