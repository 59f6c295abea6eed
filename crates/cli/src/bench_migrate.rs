//! `ferry bench migrate`: live migration from lab host A to lab host B (network namespaces on
//! one veth link, optionally capped with tc), ferry and QEMU side by side on the same test
//! guest, workload, link and downtime budget.
//!
//! Per row: boot the guest on A (paused until its serial ports are connected), wait for READY,
//! settle, measure the heartbeat noise floor, start the destination on B, migrate, and time
//! the guest's heartbeat bytes (one every 1 ms on COM2) on the host: the guest-observed pause
//! is the longest gap between them from the start of the migration until 1 s after its end.
//! Then the guest checks its memory (`v` on COM1) where it runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::qmp::Qmp;
use ferry_lab::{longest_gap, Lab, LabOptions, Port, Proc};

#[derive(Args)]
pub struct MigrateArgs {
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the idle and 100 MiB/s rows of the 1 GiB guest, unlimited and capped.
    #[arg(long)]
    quick: bool,
    /// Runs per row (the median is reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// QEMU binary to compare against ("" to skip QEMU).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Keep sockets and VMM logs here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Guest sizes in MiB (ignored with --quick).
    #[arg(long, value_delimiter = ',', default_values_t = [1024u64, 4096])]
    memory: Vec<u64>,
    /// Scenarios: idle (nothing populated), idle-populated (a 256 MiB working set filled once,
    /// then left alone, as any real VM's RAM is), 100MiB/s, flat-out (rewriting whole pages),
    /// flat-out-sparse (flat out over the same working set, each rewrite changing 64 bytes of
    /// its page, as a guest updating records in place does) (ignored with --quick).
    #[arg(long, value_delimiter = ',',
          default_values = ["idle", "idle-populated", "100MiB/s", "flat-out", "flat-out-sparse"],
          value_parser = ["idle", "idle-populated", "100MiB/s", "flat-out", "flat-out-sparse"])]
    scenarios: Vec<String>,
    /// Compression for ferry's rows (`ferry vmm migrate --compression`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "off", "on"])]
    compression: String,
    /// Memory connections for ferry's rows (`ferry vmm migrate --channels`).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    channels: u32,
    /// The migration stream of ferry's rows: plain, tls, or both side by side.
    #[arg(long, default_value = "both", value_parser = ["plain", "tls", "both"])]
    encryption: String,
    /// Link caps in Mbit/s, 0 = none.
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 1000])]
    caps: Vec<u64>,
    /// ferry's modes to run (`ferry vmm migrate --mode`); the targets compare `auto`.
    #[arg(long, value_delimiter = ',', default_values = ["auto"],
          value_parser = ["auto", "precopy", "postcopy"])]
    modes: Vec<String>,
    /// QEMU's modes to run beside: plain pre-copy, XBZRLE (cache as large as the working
    /// set), post-copy (started after the first pass), multifd (2 channels), auto-converge.
    #[arg(long, value_delimiter = ',',
          default_values = ["precopy", "xbzrle", "postcopy", "multifd", "auto-converge"],
          value_parser = ["precopy", "xbzrle", "postcopy", "multifd", "auto-converge"])]
    qemu_modes: Vec<String>,
}

/// The pause budget given to both VMMs, ms.
const DOWNTIME_MS: u64 = 300;
/// Give up on a migration (and cancel it) after this long.
const TIMEOUT_S: u64 = 60;
/// Guest running after READY before anything is measured.
const SETTLE: Duration = Duration::from_secs(2);
/// The noise floor window before the migration.
const NOISE_PRE: Duration = Duration::from_secs(3);
/// At most this much noise window in all (before plus after the migration).
const NOISE_MAX: Duration = Duration::from_secs(10);
/// How long after the migration's end heartbeats still count for the pause.
const AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Idle,
    IdlePopulated,
    Dirty100,
    FlatOut,
    FlatOutSparse,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::IdlePopulated => "idle-populated",
            Scenario::Dirty100 => "100MiB/s",
            Scenario::FlatOut => "flat-out",
            Scenario::FlatOutSparse => "flat-out-sparse",
        }
    }

    fn cmdline(self) -> &'static str {
        match self {
            Scenario::Idle => "mode=run hb=2 dirty=0",
            // The dirtier fills its 256 MiB once, then rewrites one page a second: populated
            // memory, next to nothing dirtied.
            Scenario::IdlePopulated => "mode=run hb=2 dirty=256 rate=1",
            // 25600 pages of 4 KiB per second = 100 MiB/s over a 256 MiB working set.
            Scenario::Dirty100 => "mode=run hb=2 dirty=256 rate=25600",
            Scenario::FlatOut => "mode=run hb=2 dirty=256 rate=0",
            Scenario::FlatOutSparse => "mode=run hb=2 dirty=256 rate=0 touch=8",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    /// ferry in a mode, its stream encrypted (mutual TLS between the two hosts) or not.
    Ferry {
        tls: bool,
        mode: ferry_api::MigrationMode,
    },
    Qemu(QemuMode),
}

/// QEMU's migration modes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QemuMode {
    Precopy,
    Xbzrle,
    Postcopy,
    Multifd,
    AutoConverge,
}

impl QemuMode {
    fn parse(s: &str) -> QemuMode {
        match s {
            "xbzrle" => QemuMode::Xbzrle,
            "postcopy" => QemuMode::Postcopy,
            "multifd" => QemuMode::Multifd,
            "auto-converge" => QemuMode::AutoConverge,
            _ => QemuMode::Precopy,
        }
    }

    fn name(self) -> &'static str {
        match self {
            QemuMode::Precopy => "precopy",
            QemuMode::Xbzrle => "xbzrle",
            QemuMode::Postcopy => "postcopy",
            QemuMode::Multifd => "multifd",
            QemuMode::AutoConverge => "auto-converge",
        }
    }

    /// Capabilities set on the source and, for those both sides need, the destination.
    fn capabilities(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            QemuMode::Precopy => (&[], &[]),
            QemuMode::Xbzrle => (&["xbzrle"], &[]),
            QemuMode::Postcopy => (&["postcopy-ram"], &["postcopy-ram"]),
            QemuMode::Multifd => (&["multifd"], &["multifd"]),
            QemuMode::AutoConverge => (&["auto-converge"], &[]),
        }
    }
}

fn ferry_mode_name(m: ferry_api::MigrationMode) -> &'static str {
    match m {
        ferry_api::MigrationMode::Auto => "auto",
        ferry_api::MigrationMode::Precopy => "precopy",
        ferry_api::MigrationMode::Postcopy => "postcopy",
    }
}

impl Vmm {
    fn name(self) -> &'static str {
        use ferry_api::MigrationMode as M;
        match self {
            Vmm::Ferry {
                tls: false,
                mode: M::Auto,
            } => "ferry",
            Vmm::Ferry {
                tls: true,
                mode: M::Auto,
            } => "ferry+tls",
            Vmm::Ferry {
                tls: false,
                mode: M::Precopy,
            } => "ferry-pre",
            Vmm::Ferry {
                tls: true,
                mode: M::Precopy,
            } => "ferry-pre+tls",
            Vmm::Ferry {
                tls: false,
                mode: M::Postcopy,
            } => "ferry-post",
            Vmm::Ferry {
                tls: true,
                mode: M::Postcopy,
            } => "ferry-post+tls",
            Vmm::Qemu(QemuMode::Precopy) => "qemu",
            Vmm::Qemu(QemuMode::Xbzrle) => "qemu-xbzrle",
            Vmm::Qemu(QemuMode::Postcopy) => "qemu-post",
            Vmm::Qemu(QemuMode::Multifd) => "qemu-multifd",
            Vmm::Qemu(QemuMode::AutoConverge) => "qemu-autoconv",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Vmm::Ferry { mode, .. } => ferry_mode_name(mode),
            Vmm::Qemu(m) => m.name(),
        }
    }
}

/// One measured migration (or the median of several).
#[derive(Clone, Default)]
struct Row {
    vmm: &'static str,
    /// The migration mode asked for (ferry: auto, precopy, postcopy; QEMU: its capability).
    mode: &'static str,
    /// What ferry's auto chose, and why.
    chose: Option<String>,
    mem_mib: u64,
    scenario: &'static str,
    cap_mbit: u64,
    link_mbit: f64,
    total_ms: f64,
    guest_gap_ms: f64,
    noise_gap_ms: f64,
    noise_window_ms: f64,
    /// The pause as the VMM measured it (none when it did not switch over).
    downtime_ms: Option<f64>,
    bytes: u64,
    rounds: u64,
    converged: bool,
    verified: bool,
    verdict: String,
    error: Option<String>,
    /// Why a migration did not complete, as the VMM said.
    note: Option<String>,
    /// ferry auto: the forecast made just before the move (total ms, mode).
    forecast: Option<(f64, &'static str)>,
}

impl Row {
    /// Total time over the time the bytes sent need on the measured link.
    fn efficiency(&self) -> f64 {
        let ideal_ms = self.bytes as f64 * 8.0 / (self.link_mbit * 1e6) * 1000.0;
        if ideal_ms > 0.0 {
            self.total_ms / ideal_ms
        } else {
            0.0
        }
    }

    fn json(&self, runs: usize) -> Value {
        let r2 = |v: f64| (v * 100.0).round() / 100.0;
        json!({
            "vmm": self.vmm, "mode": self.mode, "chose": self.chose, "mem_mib": self.mem_mib,
            "scenario": self.scenario,
            "cap_mbit": self.cap_mbit, "link_mbit": r2(self.link_mbit),
            "total_ms": r2(self.total_ms), "guest_gap_ms": r2(self.guest_gap_ms),
            "noise_gap_ms": r2(self.noise_gap_ms), "noise_window_ms": r2(self.noise_window_ms),
            "downtime_ms": self.downtime_ms.map(r2), "bytes": self.bytes, "rounds": self.rounds,
            "converged": self.converged, "verified": self.verified, "verdict": self.verdict,
            "efficiency": r2(self.efficiency()), "runs": runs, "error": self.error,
            "note": self.note,
            "forecast_total_ms": self.forecast.map(|f| r2(f.0)),
            "forecast_mode": self.forecast.map(|f| f.1),
        })
    }
}

/// A guest's two serial ports: console (COM1) and heartbeat (COM2).
struct Ports {
    con: Port,
    hb: Port,
}

impl Ports {
    fn follow(dir: &Path, tag: &str, poll: Duration) -> (Ports, PathBuf, PathBuf) {
        let (c1, c2) = (
            dir.join(format!("{tag}.com1")),
            dir.join(format!("{tag}.com2")),
        );
        let _ = std::fs::remove_file(&c1);
        let _ = std::fs::remove_file(&c2);
        let ports = Ports {
            con: Port::follow(c1.clone(), poll),
            hb: Port::follow(c2.clone(), poll),
        };
        (ports, c1, c2)
    }

    fn wait_connected(&self, p: &mut Proc, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !(self.con.connected() && self.hb.connected()) {
            p.alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: its serial sockets did not accept within {timeout:?}",
                    p.what
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        self.con.close();
        self.hb.close();
    }
}

/// What a VMM reported about one migration.
struct Outcome {
    total_ms: f64,
    downtime_ms: Option<f64>,
    bytes: u64,
    rounds: u64,
    converged: bool,
    /// When the migration was asked for and when its end was seen.
    start: Instant,
    end: Instant,
}

/// Everything one row needs to know.
struct Ctx<'a> {
    /// Credentials of lab hosts hv1 and hv2 (for the ferry+tls rows).
    tls: (PathBuf, PathBuf),
    lab: &'a Lab,
    dir: &'a Path,
    guest: &'a Path,
    qemu: Option<&'a Path>,
    port: u16,
    compression: ferry_api::Compression,
    channels: u32,
}

pub fn run(a: MigrateArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    ferry_lab::require_root("ferry bench migrate")?;
    let qemu = super::which(&a.qemu);
    if qemu.is_none() {
        eprintln!(
            "(QEMU {:?} not found: install qemu-system-x86 for the side-by-side rows; ferry rows only)",
            a.qemu
        );
    }
    let tmp = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    let dir = a.dir.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&a, &dir, qemu.as_deref());
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn bench(a: &MigrateArgs, dir: &Path, qemu: Option<&Path>) -> Result<()> {
    let lab = Lab::new(LabOptions::new(2, dir.join("lab")))?;
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf()).context("writing the test guest")?;
    let mems: &[u64] = if a.quick { &[1024] } else { &a.memory };
    let scenarios: Vec<Scenario> = [
        Scenario::Idle,
        Scenario::IdlePopulated,
        Scenario::Dirty100,
        Scenario::FlatOut,
        Scenario::FlatOutSparse,
    ]
    .into_iter()
    .filter(|s| {
        if a.quick {
            !matches!(s, Scenario::FlatOut | Scenario::FlatOutSparse)
        } else {
            a.scenarios.iter().any(|n| n == s.name())
        }
    })
    .collect();
    let mut vmms = Vec::new();
    for m in &a.modes {
        let mode = match m.as_str() {
            "precopy" => ferry_api::MigrationMode::Precopy,
            "postcopy" => ferry_api::MigrationMode::Postcopy,
            _ => ferry_api::MigrationMode::Auto,
        };
        if a.encryption != "tls" {
            vmms.push(Vmm::Ferry { tls: false, mode });
        }
        if a.encryption != "plain" {
            vmms.push(Vmm::Ferry { tls: true, mode });
        }
    }
    let tls = host_credentials(dir)?;
    if qemu.is_some() {
        vmms.extend(a.qemu_modes.iter().map(|m| Vmm::Qemu(QemuMode::parse(m))));
    }
    let mut ctx = Ctx {
        tls,
        lab: &lab,
        dir,
        guest: &guest,
        qemu,
        port: 7710,
        compression: match a.compression.as_str() {
            "off" => ferry_api::Compression::Off,
            "on" => ferry_api::Compression::On,
            _ => ferry_api::Compression::Auto,
        },
        channels: a.channels,
    };
    let mut rows = vec![];
    let mut links = vec![];
    for &cap in &a.caps {
        lab.cap_link(cap)?;
        let link = lab.link_mbit(0, 1, 7700 + cap as u16 % 100, 1.5)?;
        eprintln!(
            "link A->B, cap {}: {link:.0} Mbit/s measured",
            cap_name(cap)
        );
        links.push((cap, link));
        for &mem in mems {
            for &sc in &scenarios {
                for &vmm in &vmms {
                    let mut samples = vec![];
                    for run in 0..a.runs {
                        eprintln!(
                            "-- {} {mem} MiB {} cap {} (run {}/{})",
                            vmm.name(),
                            sc.name(),
                            cap_name(cap),
                            run + 1,
                            a.runs
                        );
                        let mut r = match one(&mut ctx, vmm, mem, sc) {
                            Ok(r) => r,
                            Err(e) => {
                                eprintln!("   failed: {e:#}");
                                Row {
                                    error: Some(format!("{e:#}")),
                                    ..Row::default()
                                }
                            }
                        };
                        (
                            r.vmm,
                            r.mode,
                            r.mem_mib,
                            r.scenario,
                            r.cap_mbit,
                            r.link_mbit,
                        ) = (vmm.name(), vmm.mode(), mem, sc.name(), cap, link);
                        if r.error.is_none() {
                            eprintln!(
                                "   total {:.0} ms, gap {:.1} ms (noise {:.1}), vmm pause {}, {:.1} MiB, {} rounds, {}, {}",
                                r.total_ms,
                                r.guest_gap_ms,
                                r.noise_gap_ms,
                                opt_ms(r.downtime_ms),
                                r.bytes as f64 / MIB,
                                r.rounds,
                                if r.converged { "converged" } else { "not converged" },
                                r.verdict
                            );
                            if let Some(n) = &r.note {
                                eprintln!("   {n}");
                            }
                            if let Some(c) = &r.chose {
                                eprintln!("   mode: {c}");
                            }
                        }
                        samples.push(r);
                    }
                    rows.push(median_row(samples));
                }
            }
        }
    }
    lab.cap_link(0)?;
    if a.json {
        for r in &rows {
            println!("{}", r.json(a.runs));
        }
        return Ok(());
    }
    print_report(&rows, &links, a.runs);
    Ok(())
}

const MIB: f64 = (1u64 << 20) as f64;

fn cap_name(cap: u64) -> String {
    if cap == 0 {
        "none".into()
    } else {
        format!("{cap} Mbit/s")
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|d| format!("{d:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

/// Median of each figure over the runs; converged if most runs converged, verified if all
/// verified; a failed run makes the row failed.
fn median_row(samples: Vec<Row>) -> Row {
    let mut r = samples[0].clone();
    if let Some(bad) = samples.iter().find(|s| s.error.is_some()) {
        r.error.clone_from(&bad.error);
        return r;
    }
    let med = |f: &dyn Fn(&Row) -> f64| super::median(samples.iter().map(f).collect());
    r.total_ms = med(&|s| s.total_ms);
    r.guest_gap_ms = med(&|s| s.guest_gap_ms);
    r.noise_gap_ms = med(&|s| s.noise_gap_ms);
    r.noise_window_ms = med(&|s| s.noise_window_ms);
    r.bytes = med(&|s| s.bytes as f64) as u64;
    r.rounds = med(&|s| s.rounds as f64) as u64;
    let dts: Vec<f64> = samples.iter().filter_map(|s| s.downtime_ms).collect();
    r.downtime_ms = (!dts.is_empty()).then(|| super::median(dts));
    r.converged = samples.iter().filter(|s| s.converged).count() * 2 > samples.len();
    r.verified = samples.iter().all(|s| s.verified);
    if let Some(bad) = samples.iter().find(|s| !s.verified) {
        r.verdict.clone_from(&bad.verdict);
    }
    r
}

/// One migration of one VMM; the row without its identifying fields.
fn one(ctx: &mut Ctx, vmm: Vmm, mem: u64, sc: Scenario) -> Result<Row> {
    ctx.port += 1;
    match vmm {
        Vmm::Ferry { tls, mode } => ferry_row(ctx, mem, sc, tls, mode),
        Vmm::Qemu(m) => qemu_row(ctx, mem, sc, m),
    }
}

/// Wait for READY, let the guest settle, then take the noise floor over `NOISE_PRE`.
/// Returns the noise gap.
fn boot_and_noise(ports: &Ports, p: &mut Proc) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while ports.con.line_after(0, "READY", Duration::ZERO).is_err() {
        p.alive()?;
        if Instant::now() > deadline {
            ports.con.line_after(0, "READY", Duration::ZERO)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok((l, _)) = ports.con.line_after(0, "ERROR", Duration::ZERO) {
        bail!("the guest failed: {l}");
    }
    std::thread::sleep(SETTLE);
    p.alive()?;
    let from = Instant::now();
    std::thread::sleep(NOISE_PRE);
    let noise = longest_gap(&ports.hb.beats(), from, Instant::now());
    if ports.hb.beats().is_empty() {
        bail!("no heartbeat from the guest on COM2");
    }
    Ok(noise)
}

/// After the migration: the guest-observed pause, more noise floor (so that the noise window
/// matches the pause window, up to `NOISE_MAX`), and the guest's own memory check.
fn finish(
    row: &mut Row,
    out: &Outcome,
    pre_noise: Duration,
    src: &Ports,
    dst: Option<&Ports>,
) -> Result<()> {
    let until = out.end + AFTER;
    if let Some(d) = dst {
        // The destination's heartbeats must have started, or the pause has no end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.hb.beats().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let now = Instant::now();
    if now < until {
        std::thread::sleep(until - now);
    }
    let mut beats = src.hb.beats();
    if let Some(d) = dst {
        beats.extend(d.hb.beats());
    }
    row.guest_gap_ms = ms(longest_gap(&beats, out.start, until));
    let here = dst.unwrap_or(src);
    let window = until.saturating_duration_since(out.start).min(NOISE_MAX);
    let mut noise = pre_noise;
    let mut noise_window = NOISE_PRE;
    if window > NOISE_PRE {
        let from = Instant::now();
        std::thread::sleep(window - NOISE_PRE);
        noise = noise.max(longest_gap(&here.hb.beats(), from, Instant::now()));
        noise_window = window;
    }
    row.noise_gap_ms = ms(noise);
    row.noise_window_ms = ms(noise_window);
    row.total_ms = out.total_ms;
    row.downtime_ms = out.downtime_ms;
    row.bytes = out.bytes;
    row.rounds = out.rounds;
    row.converged = out.converged;
    let v = here.con.ask(b'v', "VERIFY", Duration::from_secs(120))?;
    row.verified = v.starts_with("VERIFY OK");
    row.verdict = v;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Host credentials for hv1 and hv2 from a cluster authority of the bench's own.
fn host_credentials(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut a = ferry_auth::authority::Authority::init(&dir.join("tls-ca"), "bench")?;
    let mut out = Vec::new();
    for h in ["hv1", "hv2"] {
        let id = ferry_auth::Identity::host(h)?;
        let (key, csr) = ferry_auth::pki::new_request(&id)?;
        let cert = a.issue(&id, &csr)?;
        let d = dir.join(format!("tls-{h}"));
        ferry_auth::Credentials::save(
            &d,
            &key.serialize_pem(),
            &ferry_auth::authority::Enrolled {
                cert,
                ca: a.ca_pem.clone(),
                doc: a.doc_jws()?,
            },
        )?;
        out.push(d);
    }
    Ok((out[0].clone(), out[1].clone()))
}

fn ferry_row(
    ctx: &Ctx,
    mem: u64,
    sc: Scenario,
    tls: bool,
    mode: ferry_api::MigrationMode,
) -> Result<Row> {
    let me = std::env::current_exe()?;
    let spawn =
        |ns: &str, tag: &str, args: &[String], poll: Duration| -> Result<(Proc, Ports, PathBuf)> {
            let api = ctx.dir.join(format!("{tag}.api"));
            let _ = std::fs::remove_file(&api);
            let (ports, c1, c2) = Ports::follow(ctx.dir, tag, poll);
            let mut cmd = Lab::exec(ns);
            cmd.arg(&me).args(args).arg("--api").arg(&api);
            cmd.arg("--serial").arg(format!("unix:{}", c1.display()));
            cmd.arg("--serial2").arg(format!("unix:{}", c2.display()));
            let p = Proc::spawn(
                cmd,
                format!("ferry on {tag}"),
                ctx.dir.join(format!("{tag}.log")),
            )?;
            Ok((p, ports, api))
        };
    let args: Vec<String> = [
        "vmm",
        "run",
        "--kernel",
        &ctx.guest.display().to_string(),
        "--cmdline",
        sc.cmdline(),
        "--memory",
        &mem.to_string(),
        "--vcpus",
        "1",
        "--paused",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut src, src_ports, src_api) = spawn(
        &ctx.lab.hosts[0].ns,
        "ferry-A",
        &args,
        Duration::from_millis(5),
    )?;
    src_ports.wait_connected(&mut src, Duration::from_secs(60))?;
    ctl(&src_api, ferry_api::Request::Resume)?;
    let pre_noise = boot_and_noise(&src_ports, &mut src)?;

    let listen = format!("{}:{}", ctx.lab.hosts[1].ip, ctx.port);
    let mut rargs: Vec<String> = ["vmm", "receive", "--listen", &listen, "--timeout", "120"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if tls {
        rargs.extend([
            "--tls-dir".into(),
            ctx.tls.1.display().to_string(),
            "--expect-peer".into(),
            "hv1".into(),
        ]);
    }
    // The destination opens its serial sockets during the pause: poll fast so that no
    // heartbeat is sent before the bench listens (bytes nobody reads are dropped).
    let (mut dst, dst_ports, _) = spawn(
        &ctx.lab.hosts[1].ns,
        "ferry-B",
        &rargs,
        Duration::from_micros(250),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&dst.log)
        .unwrap_or_default()
        .contains("waiting for a VM")
    {
        dst.alive()?;
        if Instant::now() > deadline {
            bail!("the destination ferry did not start listening on {listen}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let settings = ferry_api::MigrateSettings {
        to: listen,
        downtime_ms: DOWNTIME_MS,
        bandwidth_mbit: 0,
        timeout_s: TIMEOUT_S,
        on_timeout: ferry_api::OnTimeout::Cancel,
        migration_id: String::new(),
        tls: tls.then(|| ferry_api::MigrationTls {
            dir: ctx.tls.0.clone(),
            peer: "hv2".into(),
        }),
        mode,
        postcopy_recovery_s: 60,
        compression: ctx.compression,
        delta_cache_mib: 0,
        channels: ctx.channels,
    };
    // Auto: forecast first (it moves nothing), to set the prediction beside the outcome.
    let forecast = if mode == ferry_api::MigrationMode::Auto {
        match ferry_vmm::api_server::call(
            &src_api,
            &ferry_api::Request::MigrateForecast {
                settings: settings.clone(),
                sample_ms: 2000,
            },
        )? {
            ferry_api::Response::Ok(ferry_api::ResponseBody::Forecast(f)) => {
                Some((f.total_ms, ferry_mode_name(f.mode)))
            }
            other => {
                eprintln!("   (forecast failed: {other:?})");
                None
            }
        }
    } else {
        None
    };
    let mut last = None;
    let mut error = None;
    let start = Instant::now();
    ferry_vmm::api_server::call_stream(
        &src_api,
        &ferry_api::Request::Migrate {
            settings,
            follow: true,
        },
        |r| {
            match r {
                ferry_api::Response::Ok(ferry_api::ResponseBody::Migration(p)) => last = Some(p),
                ferry_api::Response::Ok(_) => {}
                ferry_api::Response::Error(e) => error = Some(e),
            }
            true
        },
    )
    .context("following the migration on the source's API")?;
    let end = Instant::now();
    if let Some(e) = error {
        bail!("the source refused the migration: {e}");
    }
    let p = last.context("the source ended the migration without a report")?;
    let done = p.phase == ferry_api::MigrationPhase::Done;
    let mut note = None;
    if !done {
        // Failed or cancelled: the guest keeps running on the source (ferry may also give up
        // before the timeout when it sees the copy cannot converge).
        src.alive()
            .context("the migration did not complete and the source VMM is gone")?;
        note = Some(format!(
            "ferry: {:?}{}",
            p.phase,
            p.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    let out = Outcome {
        total_ms: p.elapsed_ms as f64,
        downtime_ms: p.downtime_ms,
        bytes: p.bytes_sent,
        rounds: u64::from(p.round) + 1,
        converged: done && p.converged,
        start,
        end,
    };
    let mut row = Row {
        note,
        forecast,
        chose: done.then(|| {
            let m = match p.channels {
                n if n >= 2 => format!("{} on {n} connections", ferry_mode_name(p.mode)),
                _ => ferry_mode_name(p.mode).to_string(),
            };
            let c = p
                .compression_note
                .as_ref()
                .map(|c| format!("; compression: {c}"))
                .unwrap_or_default();
            match &p.mode_reason {
                Some(why) => format!("{m}: {why}{c}"),
                None => format!("{m}{c}"),
            }
        }),
        ..Row::default()
    };
    if done {
        if !src.wait_exit(Duration::from_secs(10)) {
            eprintln!("   (the source VMM was still running 10 s after the migration)");
        }
        dst.alive()?;
        finish(&mut row, &out, pre_noise, &src_ports, Some(&dst_ports))?;
    } else {
        finish(&mut row, &out, pre_noise, &src_ports, None)?;
    }
    Ok(row)
}

fn ctl(api: &Path, req: ferry_api::Request) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    match ferry_vmm::api_server::call(api, &req)
        .with_context(|| format!("calling {}", api.display()))?
    {
        ferry_api::Response::Ok(_) => Ok(()),
        ferry_api::Response::Error(e) => bail!("{e}"),
    }
}

fn qemu_row(ctx: &Ctx, mem: u64, sc: Scenario, mode: QemuMode) -> Result<Row> {
    let qemu = ctx.qemu.context("QEMU is not installed")?;
    let spawn = |ns: &str, tag: &str, extra: &[String]| -> Result<(Proc, Ports, Qmp)> {
        let qmp = ctx.dir.join(format!("{tag}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let (ports, c1, c2) = Ports::follow(ctx.dir, tag, Duration::from_millis(5));
        let mut cmd = Lab::exec(ns);
        cmd.arg(qemu);
        cmd.args([
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            "1",
        ]);
        cmd.args(["-m", &mem.to_string()])
            .arg("-kernel")
            .arg(ctx.guest);
        cmd.args(["-append", sc.cmdline()]);
        for c in [&c1, &c2] {
            cmd.arg("-serial")
                .arg(format!("unix:{},server=on,wait=off", c.display()));
        }
        cmd.args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
        ]);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.args(extra);
        let mut p = Proc::spawn(
            cmd,
            format!("QEMU on {tag}"),
            ctx.dir.join(format!("{tag}.log")),
        )?;
        let q = Qmp::connect(&qmp, &mut p)?;
        ports.wait_connected(&mut p, Duration::from_secs(30))?;
        Ok((p, ports, q))
    };
    // Created stopped (-S), started once the bench listens on its serial ports.
    let (mut src, src_ports, mut src_qmp) = spawn(&ctx.lab.hosts[0].ns, "qemu-A", &["-S".into()])?;
    src_qmp.cmd("cont", json!({}))?;
    let pre_noise = boot_and_noise(&src_ports, &mut src)?;

    let incoming = format!("tcp:{}:{}", ctx.lab.hosts[1].ip, ctx.port);
    // Deferred, so that capabilities both sides need are set before the stream starts.
    let (mut dst, dst_ports, mut dst_qmp) = spawn(
        &ctx.lab.hosts[1].ns,
        "qemu-B",
        &["-incoming".into(), "defer".into()],
    )?;
    let caps = |names: &[&str]| {
        json!({"capabilities": names.iter()
            .map(|n| json!({"capability": n, "state": true}))
            .collect::<Vec<_>>()})
    };
    let (src_caps, dst_caps) = mode.capabilities();
    if !src_caps.is_empty() {
        src_qmp.cmd("migrate-set-capabilities", caps(src_caps))?;
    }
    if !dst_caps.is_empty() {
        dst_qmp.cmd("migrate-set-capabilities", caps(dst_caps))?;
    }
    if mode == QemuMode::Multifd {
        for q in [&mut src_qmp, &mut dst_qmp] {
            q.cmd("migrate-set-parameters", json!({"multifd-channels": 2}))?;
        }
    }
    dst_qmp.cmd("migrate-incoming", json!({ "uri": incoming }))?;
    // QEMU's default bandwidth limit (32 MiB/s) would decide the result: lift it, the link
    // cap is tc's, as for ferry.
    let mut params = json!({"downtime-limit": DOWNTIME_MS, "max-bandwidth": 10_000_000_000u64});
    if mode == QemuMode::Xbzrle {
        // A cache as large as the working set: XBZRLE at its best.
        params["xbzrle-cache-size"] = json!(256u64 << 20);
    }
    src_qmp.cmd("migrate-set-parameters", params)?;
    let start = Instant::now();
    src_qmp.cmd("migrate", json!({ "uri": incoming }))?;
    let mut postcopy_started = false;
    let mut cancelled = false;
    // The RAM figures while it ran: a cancelled migration reports none.
    let mut ram_seen = Value::Null;
    let info = loop {
        std::thread::sleep(Duration::from_millis(20));
        let q = src_qmp.cmd("query-migrate", json!({}))?;
        match q.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" | "failed" | "cancelled" => break q,
            _ => {}
        }
        if let Some(r) = q.get("ram") {
            ram_seen = r.clone();
            // Post-copy once the first pass is through (the second dirty sync), as QEMU's
            // documentation suggests.
            let syncs = r
                .get("dirty-sync-count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if mode == QemuMode::Postcopy && !postcopy_started && syncs >= 2 {
                src_qmp.cmd("migrate-start-postcopy", json!({}))?;
                postcopy_started = true;
            }
        }
        if !cancelled && start.elapsed() > Duration::from_secs(TIMEOUT_S) {
            src_qmp.cmd("migrate_cancel", json!({}))?;
            cancelled = true;
        }
        if start.elapsed() > Duration::from_secs(TIMEOUT_S + 30) {
            bail!("QEMU's migration neither completed nor cancelled: {q}");
        }
    };
    let end = Instant::now();
    let status = info.get("status").and_then(Value::as_str).unwrap_or("");
    if status == "failed" {
        bail!(
            "QEMU's migration failed: {}",
            info.get("error-desc").unwrap_or(&info)
        );
    }
    let num = |v: Option<&Value>| v.and_then(Value::as_f64);
    let ram = info.get("ram").or(Some(&ram_seen));
    let done = status == "completed";
    let out = Outcome {
        total_ms: num(info.get("total-time")).unwrap_or(ms(end - start)),
        downtime_ms: if done {
            num(info.get("downtime"))
        } else {
            None
        },
        bytes: num(ram.and_then(|r| r.get("transferred"))).unwrap_or(0.0) as u64,
        rounds: num(ram.and_then(|r| r.get("dirty-sync-count"))).unwrap_or(0.0) as u64,
        converged: done,
        start,
        end,
    };
    let mut row = Row {
        note: (!done).then(|| format!("qemu: {status} after {TIMEOUT_S} s without converging")),
        ..Row::default()
    };
    if done {
        dst.alive()?;
        finish(&mut row, &out, pre_noise, &src_ports, Some(&dst_ports))?;
    } else {
        finish(&mut row, &out, pre_noise, &src_ports, None)?;
    }
    src.alive().ok();
    Ok(row)
}

/// For one workload row: ferry auto's row, and QEMU's rows with the lowest total time and the
/// shortest longest guest gap among those (of every mode) that converged.
struct Best<'a> {
    ferry: &'a Row,
    total: &'a Row,
    gap: &'a Row,
}

fn best_of_qemu(rows: &[Row]) -> Vec<Best<'_>> {
    rows.iter()
        .filter(|f| f.vmm == "ferry" && f.error.is_none())
        .filter_map(|f| {
            let q: Vec<&Row> = rows
                .iter()
                .filter(|q| {
                    q.vmm.starts_with("qemu")
                        && q.error.is_none()
                        && q.converged
                        && q.mem_mib == f.mem_mib
                        && q.scenario == f.scenario
                        && q.cap_mbit == f.cap_mbit
                })
                .collect();
            let by = |k: fn(&Row) -> f64| q.iter().copied().min_by(|a, b| k(a).total_cmp(&k(b)));
            Some(Best {
                ferry: f,
                total: by(|r| r.total_ms)?,
                gap: by(|r| r.guest_gap_ms)?,
            })
        })
        .collect()
}

fn print_report(rows: &[Row], links: &[(u64, f64)], runs: usize) {
    println!(
        "live migration A -> B (lab veth), test guest `hb=2` + workload, downtime budget {DOWNTIME_MS} ms, \
         give up after {TIMEOUT_S} s{}",
        if runs > 1 { format!(", median of {runs} runs") } else { String::new() }
    );
    for (cap, link) in links {
        println!(
            "link throughput with cap {}: {link:.0} Mbit/s",
            cap_name(*cap)
        );
    }
    println!(
        "{:<14} {:>5} {:<14} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>5} {:>8} {:>5}",
        "vmm",
        "mem",
        "scenario",
        "cap",
        "total_ms",
        "gap_ms",
        "noise_ms",
        "vmm_dt",
        "MiB_sent",
        "rounds",
        "conv",
        "verified",
        "eff"
    );
    for r in rows {
        if let Some(e) = &r.error {
            println!(
                "{:<14} {:>5} {:<14} {:>5} ERROR: {}",
                r.vmm,
                r.mem_mib,
                r.scenario,
                r.cap_mbit,
                e.lines().next().unwrap_or("")
            );
            continue;
        }
        println!(
            "{:<14} {:>5} {:<14} {:>5} {:>9.0} {:>8.1} {:>8.1} {:>8} {:>9.1} {:>6} {:>5} {:>8} {:>5.2}",
            r.vmm,
            r.mem_mib,
            r.scenario,
            r.cap_mbit,
            r.total_ms,
            r.guest_gap_ms,
            r.noise_gap_ms,
            r.downtime_ms.map(|d| format!("{d:.1}")).unwrap_or_else(|| "-".into()),
            r.bytes as f64 / MIB,
            r.rounds,
            if r.converged { "yes" } else { "no" },
            if r.verified { "OK" } else { "FAIL" },
            r.efficiency()
        );
    }
    for r in rows.iter().filter(|r| r.error.is_none()) {
        if let Some(n) = &r.note {
            println!(
                "  note {} {} MiB {} cap {}: {n}",
                r.vmm, r.mem_mib, r.scenario, r.cap_mbit
            );
        }
        if let (Some(c), "auto") = (&r.chose, r.mode) {
            println!(
                "  {} {} MiB {} cap {} chose {c}",
                r.vmm, r.mem_mib, r.scenario, r.cap_mbit
            );
        }
        if let Some((ms, mode)) = r.forecast {
            println!(
                "  forecast {} MiB {} cap {}: {:.2} s {mode}, took {:.2} s ({:.2}x)",
                r.mem_mib,
                r.scenario,
                r.cap_mbit,
                ms / 1000.0,
                r.total_ms / 1000.0,
                ms / r.total_ms.max(1.0)
            );
        }
    }
    println!("(gap_ms: longest heartbeat gap seen by the host; noise_ms: the same with no migration; vmm_dt: pause as the VMM measured it; eff: total time / (bytes sent at the measured link rate))");
    let ok = |r: &&Row| r.error.is_none();
    let pairs: Vec<(&Row, &Row)> = rows
        .iter()
        .filter(|r| r.vmm == "ferry")
        .filter_map(|f| {
            rows.iter()
                .find(|q| {
                    q.vmm == "qemu"
                        && q.mem_mib == f.mem_mib
                        && q.scenario == f.scenario
                        && q.cap_mbit == f.cap_mbit
                })
                .map(|q| (f, q))
        })
        .filter(|(f, q)| ok(f) && ok(q))
        .collect();
    if !pairs.is_empty() {
        println!("ferry auto / qemu pre-copy:");
    }
    for (f, q) in &pairs {
        println!(
            "  {:>5} MiB {:<14} cap {:>4}: guest gap {:.2}x ({:.1} / {:.1} ms), total time {:.2}x ({:.0} / {:.0} ms)",
            f.mem_mib,
            f.scenario,
            f.cap_mbit,
            f.guest_gap_ms / q.guest_gap_ms,
            f.guest_gap_ms,
            q.guest_gap_ms,
            f.total_ms / q.total_ms,
            f.total_ms,
            q.total_ms
        );
    }
    let best = best_of_qemu(rows);
    if !best.is_empty() {
        println!("ferry auto / QEMU's best mode (lowest total; shortest longest gap):");
    }
    for b in &best {
        println!(
            "  {:>5} MiB {:<14} cap {:>4}: total {:.2}x ({:.0} ms / {} {:.0} ms), gap {:.2}x ({:.1} ms / {} {:.1} ms)",
            b.ferry.mem_mib,
            b.ferry.scenario,
            b.ferry.cap_mbit,
            b.ferry.total_ms / b.total.total_ms,
            b.ferry.total_ms,
            b.total.vmm,
            b.total.total_ms,
            b.ferry.guest_gap_ms / b.gap.guest_gap_ms,
            b.ferry.guest_gap_ms,
            b.gap.vmm,
            b.gap.guest_gap_ms
        );
    }
    let enc: Vec<(&Row, &Row)> = rows
        .iter()
        .filter(|r| r.vmm.ends_with("+tls") && r.error.is_none())
        .filter_map(|t| {
            rows.iter()
                .find(|p| {
                    p.vmm == t.vmm.trim_end_matches("+tls")
                        && p.error.is_none()
                        && p.mem_mib == t.mem_mib
                        && p.scenario == t.scenario
                        && p.cap_mbit == t.cap_mbit
                })
                .map(|p| (t, p))
        })
        .collect();
    if !enc.is_empty() {
        println!("encrypted/plaintext (ferry+tls / ferry):");
    }
    for (t, p) in &enc {
        println!(
            "  {:>5} MiB {:<14} cap {:>4}: total time {:.2}x ({:.0} / {:.0} ms), guest gap {:+.1} ms ({:.1} / {:.1}; noise {:.1})",
            t.mem_mib,
            t.scenario,
            t.cap_mbit,
            t.total_ms / p.total_ms,
            t.total_ms,
            p.total_ms,
            t.guest_gap_ms - p.guest_gap_ms,
            t.guest_gap_ms,
            p.guest_gap_ms,
            t.noise_gap_ms.max(p.noise_gap_ms)
        );
    }
    println!("targets:");
    let met = |b: bool| if b { "met" } else { "NOT MET" };
    if !enc.is_empty() {
        let worst = enc
            .iter()
            .map(|(t, p)| t.total_ms / p.total_ms)
            .fold(0.0, f64::max);
        println!(
            "  encryption costs at most 10% of the total time: {} (worst {worst:.2}x over {} rows)",
            met(worst <= 1.10),
            enc.len()
        );
    }
    let ferry: Vec<&Row> = rows.iter().filter(|r| r.vmm == "ferry").collect();
    if let Some(bad) = ferry.iter().find(|r| r.error.is_some()) {
        println!(
            "  NOT MET: a ferry row failed ({} MiB {} cap {})",
            bad.mem_mib, bad.scenario, bad.cap_mbit
        );
    }
    let best = best_of_qemu(rows);
    if best.is_empty() {
        println!("  ferry auto against QEMU's best mode: no QEMU rows to compare");
    } else {
        let worst_total = best
            .iter()
            .map(|b| b.ferry.total_ms / b.total.total_ms)
            .fold(0.0, f64::max);
        let worst_gap = best
            .iter()
            .map(|b| b.ferry.guest_gap_ms / b.gap.guest_gap_ms)
            .fold(0.0, f64::max);
        println!(
            "  ferry auto's total time <= QEMU's best total on every row: {} (worst {worst_total:.2}x over {} rows)",
            met(best.iter().all(|b| b.ferry.converged && b.ferry.total_ms <= b.total.total_ms)),
            best.len()
        );
        println!(
            "  ferry auto's longest guest gap <= 0.5x QEMU's best gap on every row: {} (worst {worst_gap:.2}x)",
            met(best
                .iter()
                .all(|b| b.ferry.converged && b.ferry.guest_gap_ms <= 0.5 * b.gap.guest_gap_ms)),
        );
        let lost: Vec<_> = pairs
            .iter()
            .filter(|(f, q)| q.converged && !f.converged)
            .collect();
        println!(
            "  every row QEMU converges, ferry converges: {}{}",
            met(lost.is_empty()),
            lost.iter()
                .map(|(f, _)| format!(" [{} MiB {} cap {}]", f.mem_mib, f.scenario, f.cap_mbit))
                .collect::<String>()
        );
    }
    let idle: Vec<&&Row> = ferry
        .iter()
        .filter(|r| r.scenario.starts_with("idle") && r.error.is_none())
        .collect();
    println!(
        "  idle guest gap < 10 ms (populated or not): {} ({})",
        met(!idle.is_empty() && idle.iter().all(|r| r.guest_gap_ms < 10.0)),
        idle.iter()
            .map(|r| format!("{:.1}", r.guest_gap_ms))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let effs: Vec<(&&Row, f64)> = ferry
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| (r, r.efficiency()))
        .collect();
    println!(
        "  total time <= 1.2x bytes/link rate: {} ({})",
        met(!effs.is_empty() && effs.iter().all(|(_, e)| *e <= 1.2)),
        effs.iter()
            .map(|(r, e)| format!("{}/{}/{}: {e:.2}", r.mem_mib, r.scenario, r.cap_mbit))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let unverified = rows
        .iter()
        .filter(|r| r.error.is_none() && !r.verified)
        .count();
    println!(
        "  guest memory verified on every row: {}",
        met(unverified == 0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_carry_the_required_fields() {
        let r = Row {
            vmm: "ferry",
            mem_mib: 1024,
            scenario: "idle",
            cap_mbit: 1000,
            link_mbit: 1000.0,
            total_ms: 12.0,
            bytes: 1_000_000,
            converged: true,
            verified: true,
            ..Row::default()
        };
        let v = r.json(1);
        for k in [
            "vmm",
            "mode",
            "mem_mib",
            "scenario",
            "cap_mbit",
            "total_ms",
            "guest_gap_ms",
            "noise_gap_ms",
            "downtime_ms",
            "bytes",
            "rounds",
            "converged",
            "verified",
            "link_mbit",
            "efficiency",
        ] {
            assert!(v.get(k).is_some(), "missing {k}: {v}");
        }
        // 1 MB at 1 Gbit/s takes 8 ms: 12 ms is 1.5x that.
        assert_eq!(v["efficiency"], json!(1.5));
    }

    #[test]
    fn the_median_row_needs_most_runs_converged_and_all_verified() {
        let run = |total_ms, converged, verified| Row {
            total_ms,
            converged,
            verified,
            verdict: if verified {
                "VERIFY OK".into()
            } else {
                "VERIFY FAIL".into()
            },
            ..Row::default()
        };
        let m = median_row(vec![
            run(3.0, true, true),
            run(1.0, false, true),
            run(2.0, true, false),
        ]);
        assert_eq!(m.total_ms, 2.0);
        assert!(m.converged);
        assert!(!m.verified);
        assert_eq!(m.verdict, "VERIFY FAIL");
    }
}
