//! The move half of `ferry bench storage`: a running VM's 6 GiB disk moved while the guest
//! writes to it, by ferry (`ferry move --storage-to`, to a folder and to the share; `--to hv2
//! --storage-to`, shared-nothing) and by QEMU (drive-mirror + block-job-complete to a folder;
//! drive-mirror to the destination's NBD export + migrate), unlimited and at 1 Gbit/s.
//!
//! Every row is run alike: it starts cold ([`settle`]), the move starts as soon as the guest's
//! writer runs (so every copy carries about the same data, however fast the VMM lets the guest
//! write), and the guest's write rate without a move is measured for 2 s after it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_lab::{Lab, Port, Proc};
use serde_json::{json, Value};

use super::storage::{ferry, field};
use crate::qmp::Qmp;

/// The moved disk: big enough that the guest's writer (from the start) does not reach the
/// data (at the end) before the move is over, also under QEMU's capped mirror (~60 s of ~13k
/// 4 KiB writes a second filled the 3 GiB a 4 GiB disk left it).
const DISK_BYTES: u64 = 6 << 30;
/// The guest's writer: 4 KiB records, one in flight, no flushes (latency = 1 / IOPS).
const CMDLINE: &str = "hb=0 disk=write flush=0 qd=1";
const T: Duration = Duration::from_secs(120);

struct Row {
    vmm: &'static str,
    dest: &'static str,
    /// What crossed the network encrypted: "tls", "plain", or "-" (nothing did).
    enc: &'static str,
    cap_mbit: u64,
    total_ms: f64,
    copied: u64,
    skipped: u64,
    pause_ms: Option<f64>,
    iops_idle: f64,
    iops_during: f64,
}

/// A 6 GiB image: a hole where the guest's records go, its last `data_mib` MiB pseudo-random
/// data.
fn image(path: &Path, data_mib: u64) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(DISK_BYTES)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(
        DISK_BYTES - (data_mib.min(1024) << 20),
    ))?;
    for _ in 0..data_mib.min(1024) {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&(x | 1).to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Wait until the memory the last row freed has gone back to the machine's host. On this
/// machine (itself a VM) freed pages are handed back within about 3 s and the next touch of
/// each faults in the host; a row started right after another reuses that one's freed page
/// cache at memory speed instead (measured: the same QEMU mirror 4.1 s cold, 1.3 s right after
/// ferry's row). So every row starts cold, whichever VMM went before.
fn settle() {
    std::thread::sleep(Duration::from_secs(5));
}

fn acked(con: &Port) -> Result<(u64, Instant)> {
    let s = con.ask(b's', "STATUS", T)?;
    Ok((field(&s, "disk_acked")?, Instant::now()))
}

fn rate(a: (u64, Instant), b: (u64, Instant)) -> f64 {
    (b.0 - a.0) as f64 / b.1.duration_since(a.1).as_secs_f64()
}

/// Wait for the console (and, where output before the connection is not kept, as with
/// QEMU's socket, for READY: a byte sent before the guest set its UART up may be lost).
fn wait_console(con: &Port, what: &str, ready: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() || (ready && !con.text().contains("READY")) {
        if Instant::now() > deadline {
            bail!("{what}'s console never appeared (or never said READY)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest answers once its disk scan is done.
    con.ask(b's', "STATUS", T)?;
    Ok(())
}

fn ferry_row(
    lab: &Lab,
    dir: &Path,
    srv: &str,
    run: usize,
    dest: &'static str,
    cap: u64,
    data_mib: u64,
) -> Result<Row> {
    settle();
    let h = &lab.hosts[0];
    let host = format!("unix:{}", h.socket().display());
    let kernel = dir.join("testguest.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, ferry_testguest::elf())?;
    }
    let name = format!("m{run}{dest}{cap}");
    let img = dir.join(format!("{name}.img"));
    image(&img, data_mib)?;
    ferry(&[
        "--host",
        &host,
        "vm",
        "create",
        &name,
        "--kernel",
        &kernel.display().to_string(),
        "--memory",
        "256",
        "--disk",
        &img.display().to_string(),
        "--cmdline",
        CMDLINE,
        "--start",
    ])?;
    let con = Port::follow(
        h.state_dir.join("vms").join(&name).join("run/con"),
        Duration::from_millis(5),
    );
    wait_console(&con, &name, false)?;
    // The move starts at once: every guest has written about as little when it does, so each
    // copy has the same data to carry (its write rate without a move is measured after).
    let s1 = acked(&con)?;
    let to = match dest {
        "folder" | "host" => {
            let d = dir.join(format!("dest-{name}"));
            std::fs::create_dir_all(&d)?;
            d.display().to_string()
        }
        _ => "vms".to_string(),
    };
    let capstr = cap.to_string();
    let mut args = vec![
        "--json",
        "--host",
        &host,
        "move",
        &name,
        "--storage-to",
        &to,
        "--bandwidth-mbit",
        &capstr,
    ];
    if dest == "host" {
        // Shared-nothing: the VM and its disk into the other host's folder.
        args.extend(["--to", "hv2"]);
    }
    let out = ferry(&args)?;
    let now_on = if dest == "host" { &lab.hosts[1] } else { h };
    let vmm_log =
        ferry_hostd::vmm::RunDir(now_on.state_dir.join("vms").join(&name).join("run")).log();
    let (con, host) = if dest == "host" {
        con.close();
        let h2 = &lab.hosts[1];
        let c = Port::follow(
            h2.state_dir.join("vms").join(&name).join("run/con"),
            Duration::from_millis(5),
        );
        wait_console(&c, &name, false)?;
        (c, format!("unix:{}", h2.socket().display()))
    } else {
        (con, host)
    };
    let s2 = acked(&con)?;
    std::thread::sleep(Duration::from_secs(2));
    let s3 = acked(&con)?;
    let r: Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))
        .with_context(|| format!("the move's report: {out}"))?;
    if r["result"] != "done" {
        bail!("the storage move of {name} did not finish: {out}");
    }
    // A guest that stopped answering: the VMM's log says what its disk was doing.
    let v = con.ask(b'd', "DISK VERIFY", T).with_context(|| {
        let log = ferry_hostd::vmm::tail(&vmm_log, 40).join("\n");
        format!("the VMM's log ({}) ends:\n{log}", vmm_log.display())
    })?;
    if !v.starts_with("DISK VERIFY OK") {
        bail!("the guest's disk check failed after the move: {v}");
    }
    if con.text().contains("DISK full") {
        bail!("{name}'s writer filled its disk during the measurement: use a smaller --data-mib");
    }
    con.close();
    ferry(&["--host", &host, "vm", "stop", "--force", &name])?;
    let d = &r["disks"][0];
    let row = Row {
        vmm: "ferry",
        dest,
        enc: match dest {
            "folder" => "-",
            "host" if r["encrypted"] == false => "plain",
            _ => "tls",
        },
        cap_mbit: cap,
        total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
        // With the VM (shared-nothing), its memory stream too.
        copied: d["copied_bytes"].as_u64().unwrap_or(0)
            + d["mirrored_bytes"].as_u64().unwrap_or(0)
            + if dest == "host" {
                r["bytes"].as_u64().unwrap_or(0)
            } else {
                0
            },
        skipped: d["skipped_bytes"].as_u64().unwrap_or(0),
        // A storage move pauses the disk's I/O only; a shared-nothing move, the whole VM once.
        pause_ms: d["pause_ms"].as_f64().or(r["downtime_ms"].as_f64()),
        iops_idle: rate(s2, s3),
        iops_during: rate(s1, s2),
    };
    ferry(&["--host", &host, "vm", "delete", &name])?;
    if dest == "share" {
        // The lease goes when the daemon sees the VMM end; then the disk may go.
        let disk = format!("vms/{name}.img");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ferry(&["disk", "delete", &disk, "--server", srv]).is_err()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_dir_all(dir.join(format!("dest-{name}")));
    Ok(row)
}

/// One QEMU (microvm, the test guest, the disk as virtio-blk) in namespace `ns`, with its
/// console and QMP sockets; `extra` arguments appended.
fn qemu_vm(
    ns: &str,
    dir: &Path,
    qemu: &Path,
    tag: &str,
    img: &Path,
    extra: &[&str],
) -> Result<(Proc, Qmp, PathBuf)> {
    let kernel = dir.join("testguest.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, ferry_testguest::elf())?;
    }
    let con_path = dir.join(format!("{tag}.con"));
    let qmp_path = dir.join(format!("{tag}.qmp"));
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = super::qemu_microvm(ns, qemu, &kernel, CMDLINE, 256);
    cmd.arg("-drive")
        .arg(format!(
            "id=d0,file={},format=raw,if=none,cache=writeback,aio=threads",
            img.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0,serial=ferrydisk"]);
    cmd.arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", con_path.display()));
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    cmd.args(extra);
    let mut p = Proc::spawn(cmd, format!("QEMU {tag}"), dir.join(format!("{tag}.log")))?;
    let q = Qmp::connect(&qmp_path, &mut p)?;
    Ok((p, q, con_path))
}

/// Start a QEMU created stopped (`-S`) once its console is followed, so that no byte of the
/// guest's is sent before anyone reads (QEMU's socket drops them), and wait for the guest.
fn start_on_console(q: &mut Qmp, con: &Port, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !con.connected() {
        if Instant::now() > deadline {
            bail!("{what}'s console never appeared");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    q.cmd("cont", json!({}))?;
    wait_console(con, what, true)
}

/// Wait until QEMU's mirror job `m` is ready (the copy complete and kept in step).
fn mirror_ready(q: &mut Qmp) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = q.cmd("query-block-jobs", json!({}))?;
        let j = jobs.get(0).cloned().context("QEMU's mirror job vanished")?;
        if j["ready"] == true {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("QEMU's mirror never became ready: {j}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until QEMU's block jobs have ended (a completed or cancelled mirror).
fn jobs_gone(q: &mut Qmp) -> Result<()> {
    while q
        .cmd("query-block-jobs", json!({}))?
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// QEMU's shared-nothing move, as libvirt drives it: the destination QEMU (`-incoming defer`)
/// exports its blank disk over NBD, the source mirrors into it (blockdev-mirror's drive-mirror
/// form, `mode: existing`), then migrates; once migrated (the source paused for good), the
/// mirror is cancelled, which in QEMU copies what the guest wrote since the mirror's last pass
/// first, and only then does the destination (started with `-S`) run on its own disk. Its
/// pause is the migration's downtime and that last copy. (Cancelling with `force`, as this
/// bench first did, leaves that last copy out: the destination's disk then missed the guest's
/// last writes, which its verifier caught once, and the destination ran without waiting.)
fn qemu_shared_nothing(
    lab: &Lab,
    dir: &Path,
    qemu: &Path,
    run: usize,
    cap: u64,
    data_mib: u64,
) -> Result<Row> {
    settle();
    let tag = format!("qs{run}-{cap}");
    let img = dir.join(format!("{tag}.img"));
    image(&img, data_mib)?;
    let target = dir.join(format!("{tag}-dest.img"));
    std::fs::File::create(&target)?.set_len(DISK_BYTES)?;
    let (sp, mut sq, scon) = qemu_vm(&lab.hosts[0].ns, dir, qemu, &tag, &img, &["-S"])?;
    let dtag = format!("{tag}-B");
    let (dp, mut dq, dcon) = qemu_vm(
        &lab.hosts[1].ns,
        dir,
        qemu,
        &dtag,
        &target,
        &["-incoming", "defer", "-S"],
    )?;
    let ip = &lab.hosts[1].ip;
    dq.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": ip, "port": "10809"}}}),
    )?;
    dq.cmd("nbd-server-add", json!({"device": "d0", "writable": true}))?;
    dq.cmd("migrate-incoming", json!({"uri": format!("tcp:{ip}:4444")}))?;
    let con = Port::follow(scon, Duration::from_millis(5));
    start_on_console(&mut sq, &con, &tag)?;
    // The move starts at once: every guest has written about as little when it does, so each
    // copy has the same data to carry (its write rate without a move is measured after).
    let s1 = acked(&con)?;
    let t0 = Instant::now();
    let mut args = json!({"device": "d0", "target": format!("nbd:{ip}:10809:exportname=d0"),
        "sync": "full", "format": "raw", "mode": "existing", "job-id": "m"});
    if cap > 0 {
        args["speed"] = json!(cap * 1_000_000 / 8);
    }
    sq.cmd("drive-mirror", args)?;
    mirror_ready(&mut sq)?;
    let bw: u64 = if cap > 0 {
        cap * 1_000_000 / 8
    } else {
        10_000_000_000
    };
    sq.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 300, "max-bandwidth": bw}),
    )?;
    sq.cmd("migrate", json!({"uri": format!("tcp:{ip}:4444")}))?;
    let info = loop {
        std::thread::sleep(Duration::from_millis(20));
        let q = sq.cmd("query-migrate", json!({}))?;
        match q.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => break q,
            "failed" | "cancelled" => bail!("QEMU's migration ended: {q}"),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(900) {
            bail!("QEMU's migration did not complete: {q}");
        }
    };
    // The source is paused for good: the mirror copies the rest and ends, the export stops,
    // the destination runs.
    let migrated = Instant::now();
    sq.cmd("block-job-cancel", json!({"device": "m"}))?;
    jobs_gone(&mut sq)?;
    dq.cmd("nbd-server-stop", json!({}))?;
    dq.cmd("cont", json!({}))?;
    let last_copy = migrated.elapsed();
    let total = t0.elapsed();
    con.close();
    let con = Port::follow(dcon, Duration::from_millis(5));
    wait_console(&con, &dtag, false)?;
    let s2 = acked(&con)?;
    std::thread::sleep(Duration::from_secs(2));
    let s3 = acked(&con)?;
    let v = con.ask(b'd', "DISK VERIFY", T)?;
    if !v.starts_with("DISK VERIFY OK") {
        bail!("the guest's disk check failed after QEMU's shared-nothing move: {v}");
    }
    let _ = sq.cmd("quit", json!({}));
    let _ = dq.cmd("quit", json!({}));
    con.close();
    let alloc = allocated(&target);
    drop(sp);
    drop(dp);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&target);
    let num = |k: &str| info.get(k).and_then(Value::as_f64);
    let ram = info
        .get("ram")
        .and_then(|r| r.get("transferred"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Row {
        vmm: "qemu",
        dest: "host",
        enc: "plain",
        cap_mbit: cap,
        total_ms: total.as_secs_f64() * 1e3,
        copied: alloc + ram,
        skipped: DISK_BYTES.saturating_sub(alloc),
        pause_ms: num("downtime").map(|d| d + last_copy.as_secs_f64() * 1e3),
        iops_idle: rate(s2, s3),
        iops_during: rate(s1, s2),
    })
}

fn qemu_row(
    lab: &Lab,
    dir: &Path,
    qemu: &Path,
    run: usize,
    cap: u64,
    data_mib: u64,
) -> Result<Row> {
    settle();
    let ns = &lab.hosts[0].ns;
    let tag = format!("q{run}-{cap}");
    let img = dir.join(format!("{tag}.img"));
    image(&img, data_mib)?;
    let target = dir.join(format!("{tag}-copy.img"));
    let _ = std::fs::remove_file(&target);
    let (p, mut q, con_path) = qemu_vm(ns, dir, qemu, &tag, &img, &["-S"])?;
    let con = Port::follow(con_path, Duration::from_millis(5));
    start_on_console(&mut q, &con, &tag)?;
    // The move starts at once: every guest has written about as little when it does, so each
    // copy has the same data to carry (its write rate without a move is measured after).
    let s1 = acked(&con)?;
    let t0 = Instant::now();
    let mut args = json!({"device": "d0", "target": target.display().to_string(), "sync": "full", "format": "raw", "job-id": "m"});
    if cap > 0 {
        args["speed"] = json!(cap * 1_000_000 / 8);
    }
    q.cmd("drive-mirror", args)?;
    mirror_ready(&mut q)?;
    let t_switch = Instant::now();
    q.cmd("block-job-complete", json!({"device": "m"}))?;
    jobs_gone(&mut q)?;
    let switch = t_switch.elapsed();
    let total = t0.elapsed();
    let s2 = acked(&con)?;
    std::thread::sleep(Duration::from_secs(2));
    let s3 = acked(&con)?;
    let v = con.ask(b'd', "DISK VERIFY", T)?;
    if !v.starts_with("DISK VERIFY OK") {
        bail!("the guest's disk check failed after QEMU's mirror: {v}");
    }
    if con.text().contains("DISK full") {
        bail!("the writer under QEMU filled its disk during the measurement: use a smaller --data-mib");
    }
    let _ = q.cmd("quit", json!({}));
    con.close();
    drop(p);
    let alloc = allocated(&target);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&target);
    Ok(Row {
        vmm: "qemu",
        dest: "folder",
        enc: "-",
        cap_mbit: cap,
        total_ms: total.as_secs_f64() * 1e3,
        // What the copy holds (QEMU's job length counts the whole disk, holes included).
        copied: alloc,
        skipped: DISK_BYTES.saturating_sub(alloc),
        // Its switch (block-job-complete until the job is gone) drains guest I/O: an upper
        // bound on what the guest waited.
        pause_ms: Some(switch.as_secs_f64() * 1e3),
        iops_idle: rate(s2, s3),
        iops_during: rate(s1, s2),
    })
}

fn median_row(mut v: Vec<Row>) -> Row {
    v.sort_by(|a, b| a.total_ms.total_cmp(&b.total_ms));
    let n = v.len() / 2;
    v.swap_remove(n)
}

/// One line comparing row `a` with row `b`: total time, pause, guest write IOPS while moving.
fn compare(what: &str, cap: u64, a: &Row, b: &Row, target: &str) {
    println!(
        "{what}, cap {}: total {:.2}x{target}, pause {}, guest write IOPS while moving {:.0}/{:.0}",
        if cap > 0 {
            format!("{cap} Mbit/s")
        } else {
            "none".into()
        },
        a.total_ms / b.total_ms,
        match (a.pause_ms, b.pause_ms) {
            (Some(x), Some(y)) => format!("{x:.2}/{y:.2} ms"),
            _ => "-".into(),
        },
        a.iops_during,
        b.iops_during
    );
}

/// Set (or with `none`, clear) the network both hosts trust for plaintext migrations.
fn plaintext_network(lab: &Lab, net: &str) -> Result<()> {
    for h in &lab.hosts {
        let host = format!("unix:{}", h.socket().display());
        ferry(&[
            "--host",
            &host,
            "host",
            "set",
            "--plaintext-migration-network",
            net,
        ])?;
    }
    Ok(())
}

/// What the move half runs.
pub struct Plan<'a> {
    pub data_mib: u64,
    pub runs: usize,
    pub json: bool,
    /// QEMU binary ("" for none).
    pub qemu: &'a str,
    /// "tls", "plain" or "both" (for the shared-nothing rows).
    pub encryption: &'a str,
    /// Of "folder", "share", "host".
    pub dests: &'a [String],
    pub caps: &'a [u64],
}

pub fn run(lab: &Lab, dir: &Path, srv: &str, p: &Plan) -> Result<()> {
    let (data_mib, runs, as_json, encryption) = (p.data_mib, p.runs, p.json, p.encryption);
    let qemu: Option<PathBuf> = if p.qemu.is_empty() {
        None
    } else {
        let q = super::which(p.qemu);
        if q.is_none() && !as_json {
            println!("(QEMU not found: install qemu-system-x86 for the side-by-side rows)");
        }
        q
    };
    let wants = |d: &str| p.dests.iter().any(|x| x == d);
    let mut rows = Vec::new();
    let rows_of = |dest: &'static str, cap: u64| -> Result<Row> {
        let mut v = Vec::new();
        for r in 0..runs.max(1) {
            v.push(ferry_row(lab, dir, srv, r, dest, cap, data_mib)?);
        }
        Ok(median_row(v))
    };
    for &cap in p.caps {
        for dest in ["folder", "share"] {
            if wants(dest) {
                rows.push(rows_of(dest, cap)?);
            }
        }
        // Shared-nothing, encrypted and (on a network both hosts trust) in the clear.
        if wants("host") && encryption != "plain" {
            rows.push(rows_of("host", cap)?);
        }
        if wants("host") && encryption != "tls" {
            let subnet = lab.hosts[0]
                .ip
                .rsplit_once('.')
                .map(|(a, _)| format!("{a}.0/24"))
                .unwrap_or_default();
            plaintext_network(lab, &subnet)?;
            let r = rows_of("host", cap);
            plaintext_network(lab, "none")?;
            rows.push(r?);
        }
        if let Some(q) = &qemu {
            if wants("folder") {
                let mut v = Vec::new();
                for r in 0..runs.max(1) {
                    v.push(qemu_row(lab, dir, q, r, cap, data_mib)?);
                }
                rows.push(median_row(v));
            }
            if wants("host") {
                let mut v = Vec::new();
                for r in 0..runs.max(1) {
                    v.push(qemu_shared_nothing(lab, dir, q, r, cap, data_mib)?);
                }
                rows.push(median_row(v));
            }
        }
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    if as_json {
        for r in &rows {
            println!(
                "{}",
                json!({"bench": "storage_move", "vmm": r.vmm, "dest": r.dest, "encryption": r.enc, "cap_mbit": r.cap_mbit,
                    "total_ms": r.total_ms, "copied_bytes": r.copied, "skipped_bytes": r.skipped,
                    "pause_ms": r.pause_ms, "write_iops_idle": r.iops_idle.round(),
                    "write_iops_during": r.iops_during.round()})
            );
        }
        return Ok(());
    }
    println!();
    println!(
        "a running VM's 6 GiB disk ({data_mib} MiB of data, the guest writing 4 KiB records one at a time) moved to another folder, to the share, or with the VM to the other host's folder (\"host\", shared-nothing; pause = the VM's); medians of {}:",
        runs.max(1)
    );
    println!(
        "{:<6} {:<7} {:<6} {:>6} {:>9} {:>10} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "vmm",
        "to",
        "crypto",
        "cap",
        "total s",
        "sent MiB",
        "skip MiB",
        "pause ms",
        "IOPS idle",
        "IOPS move",
        "vs link"
    );
    for r in &rows {
        let link = if r.cap_mbit > 0 {
            let ideal_ms = r.copied as f64 * 8.0 / (r.cap_mbit as f64 * 1e6) * 1e3;
            format!("{:.2}x", r.total_ms / ideal_ms.max(1.0))
        } else {
            "-".into()
        };
        println!(
            "{:<6} {:<7} {:<6} {:>6} {:>9.2} {:>10.0} {:>10.0} {:>9} {:>10.0} {:>10.0} {:>8}",
            r.vmm,
            r.dest,
            r.enc,
            if r.cap_mbit > 0 {
                format!("{}M", r.cap_mbit)
            } else {
                "none".into()
            },
            r.total_ms / 1e3,
            mib(r.copied),
            mib(r.skipped),
            r.pause_ms
                .map(|p| format!("{p:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.iops_idle,
            r.iops_during,
            link
        );
    }
    for (cap, dest) in p.caps.iter().flat_map(|&c| [(c, "folder"), (c, "host")]) {
        let f = rows
            .iter()
            .find(|r| r.vmm == "ferry" && r.dest == dest && r.cap_mbit == cap && r.enc != "plain");
        let q = rows
            .iter()
            .find(|r| r.vmm == "qemu" && r.dest == dest && r.cap_mbit == cap);
        if let (Some(f), Some(q)) = (f, q) {
            let what = if dest == "host" {
                "with the VM to the other host's folder"
            } else {
                "to a folder"
            };
            compare(&format!("ferry/qemu {what}"), cap, f, q, "");
        }
    }
    for &cap in p.caps {
        let with = |enc: &str| {
            rows.iter()
                .find(|r| r.vmm == "ferry" && r.dest == "host" && r.cap_mbit == cap && r.enc == enc)
        };
        if let (Some(t), Some(p)) = (with("tls"), with("plain")) {
            let what = "ferry tls/plain, with the VM to the other host's folder";
            compare(what, cap, t, p, " (target at most 1.10x)");
        }
    }
    println!("(write IOPS with one request in flight: latency = 1/IOPS, \"idle\" for 2 s after the move, \"move\" during it; each move starts once the guest is up, each row after 5 s for the memory to settle; \"vs link\": total time against bytes sent at the cap; crypto: how the disk and memory crossed the network, QEMU's rows are in the clear)");
    Ok(())
}
