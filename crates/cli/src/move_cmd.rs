//! `ferry move ...`: move a running VM live to another host, its disks to another folder or
//! share (a storage move), or both at once (into the other host's folders: shared-nothing),
//! through the daemons: a check first, then the move with a progress bar, Ctrl-C to cancel, a
//! report at the end.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::host::{
    CheckReport, MoveInfo, MoveList, MoveReport, MoveRequest, MoveSettings, MoveState,
};
use ferry_api::MigrationPhase;
use ferry_hostd::{Client, ClientError};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::host_cmd::rt;
use crate::target::Targets;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MoveCmd {
    #[command(subcommand)]
    sub: Option<MoveSub>,
    #[command(flatten)]
    args: MoveArgs,
}

#[derive(Subcommand)]
enum MoveSub {
    /// Cancel a VM's move; it stays where it is, running.
    Cancel {
        /// The VM.
        vm: String,
    },
    /// Moves sent from a host (running, queued and recent).
    List,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).multiple(true).args(["to", "storage_to", "disk_to"])))]
struct MoveArgs {
    /// The VM to move (found on whichever host has it).
    #[arg(required = true)]
    vm: Option<String>,
    /// Move the VM (its memory, CPU and device state) to this host: a host name the source
    /// knows as a peer, or its daemon's host:port.
    #[arg(long)]
    to: Option<String>,
    /// Move the VM's disks, while it runs, to DEST: a folder (an absolute path, e.g. /srv/vms)
    /// or a share of a file server (SHARE, or FILESERVER:SHARE). Without --to the VM stays on
    /// its host (a storage move, the folder is on that host). With --to and a folder, the
    /// folder is on the --to host: disks and VM move together, sharing nothing but the network
    /// (the disks are copied while the VM runs, then the VM moves in one pause). With --to and
    /// a share, the disks go onto the share first and then the VM moves (two moves).
    #[arg(long, value_name = "DEST")]
    storage_to: Option<String>,
    /// Move one disk to DEST (DISK: its index, path or file name); may be given for each
    /// disk, and overrides --storage-to for the disks it names.
    #[arg(long, value_name = "DISK=DEST", value_parser = parse_disk_to)]
    disk_to: Vec<ferry_api::host::DiskMove>,
    /// Keep each moved disk's old copy (by default it is removed once the VM uses the new one).
    #[arg(long)]
    keep_source: bool,
    /// Only check whether the move could happen, and say why not; move nothing. For a move of
    /// the VM to another host, also forecast it: sample the guest's dirty rate and the link for
    /// a few seconds and predict the total time, pause, bytes and the mode auto would use.
    #[arg(long)]
    check: bool,
    /// Longest pause the guest may see, ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap for the memory copy, Mbit/s (0: none).
    #[arg(long, default_value_t = 0)]
    bandwidth_mbit: u64,
    /// Give up after this many seconds (0: never); the VM stays where it is.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Connections for the memory copy (1-8). Several pay where one cannot fill the link:
    /// encryption or compression bound by one core, with cores to spare on both hosts.
    /// Default: two for an encrypted stream, one for plaintext.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
    channels: Option<u32>,
    /// How memory moves. auto: pre-copy (compressing and throttling as needed), switching to
    /// post-copy only where pre-copy could not converge. precopy: the guest runs here until a
    /// short pause at the end. postcopy: one pass over memory, then the guest runs on --to at
    /// once and fetches what it still lacks from here; from then on a broken link stalls the
    /// guest until it comes back (--postcopy-recovery), and losing this host loses the guest.
    #[arg(long, default_value = "auto", value_parser = ["auto", "precopy", "postcopy"])]
    mode: String,
    /// Post-copy: if the link breaks, both hosts wait this many seconds for it to come back
    /// (the guest on --to waits meanwhile). Past that the guest is lost. 0: give up at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    postcopy_recovery: u64,
    /// Use this grant (a file from `ferry grant`) instead of signing one.
    #[arg(long)]
    grant: Option<std::path::PathBuf>,
}

fn parse_disk_to(s: &str) -> Result<ferry_api::host::DiskMove, String> {
    match s.split_once('=') {
        Some((d, to)) if !d.is_empty() && !to.is_empty() => Ok(ferry_api::host::DiskMove {
            disk: d.into(),
            to: to.into(),
        }),
        _ => Err(format!(
            "{s:?}: give DISK=DEST, e.g. 0=/srv/vms or web01.img=fs1:vms"
        )),
    }
}

pub fn run(cmd: MoveCmd, t: &Targets, json: bool) -> Result<()> {
    rt()?.block_on(async {
        match cmd.sub {
            Some(MoveSub::Cancel { vm }) => {
                let (h, c, v) = t.find_vm(&vm).await?;
                let id = v.move_id.with_context(|| format!("{vm} is not moving"))?;
                let m: MoveInfo = c
                    .post(&format!("/v1/moves/{id}/cancel"), &serde_json::json!({}))
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&m)?);
                } else {
                    println!("cancelling move {id} of {vm} on {h}; the VM stays on {h}");
                }
                Ok(())
            }
            Some(MoveSub::List) => {
                let (_, c) = t.default()?;
                let l: MoveList = c.get("/v1/moves").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&l)?);
                } else {
                    println!(
                        "{:<17} {:<16} {:<8} {:<8} {:<10} NOTE",
                        "ID", "VM", "FROM", "TO", "STATE"
                    );
                    for m in l.moves {
                        println!(
                            "{:<17} {:<16} {:<8} {:<8} {:<10} {}",
                            m.id,
                            m.vm,
                            m.from,
                            m.to,
                            format!("{:?}", m.state).to_lowercase(),
                            m.waiting_for.or(m.error).unwrap_or_default()
                        );
                    }
                }
                Ok(())
            }
            None => {
                let a = cmd.args;
                let (vm, to) = (
                    a.vm.clone().unwrap_or_default(),
                    a.to.clone().unwrap_or_default(),
                );
                let (_, c, info) = t.find_vm(&vm).await?;
                let moves_disks = a.storage_to.is_some() || !a.disk_to.is_empty();
                // Onto a share with the VM: two moves (folders of the other host: one).
                let all_folders = a
                    .storage_to
                    .iter()
                    .chain(a.disk_to.iter().map(|d| &d.to))
                    .all(|d| d.starts_with('/'));
                if !to.is_empty() && to != info.host && moves_disks && !all_folders {
                    return both(t, a, info, json).await;
                }
                let grant = match &a.grant {
                    Some(f) => Some(
                        std::fs::read_to_string(f)
                            .with_context(|| format!("reading the grant {}", f.display()))?
                            .trim()
                            .to_string(),
                    ),
                    None => grant_for(t, &info, if to.is_empty() { &info.host } else { &to })?,
                };
                let req = MoveRequest {
                    vm: vm.clone(),
                    to,
                    settings: MoveSettings {
                        downtime_ms: a.downtime_ms,
                        bandwidth_mbit: a.bandwidth_mbit,
                        timeout_s: a.timeout,
                        channels: a.channels.unwrap_or(0),
                        mode: crate::vmm_cmd::mode_of(&a.mode),
                        postcopy_recovery_s: a.postcopy_recovery,
                    },
                    grant,
                    storage_to: a.storage_to,
                    disk_to: a.disk_to,
                    keep_source: a.keep_source,
                };
                one(&c, &req, a.check, json).await
            }
        }
    })
}

/// The VM to another host and its disks onto a share, as two moves in one command: the disks
/// first (the VM stays where it is), then the VM (only its memory moves, the share being
/// reachable from both). Into folders of the other host it is one move (shared-nothing: the
/// daemons copy the disks while the VM runs, then move it in one pause), not this.
async fn both(t: &Targets, a: MoveArgs, info: ferry_api::host::VmInfo, json: bool) -> Result<()> {
    let to = a.to.clone().unwrap_or_default();
    let dests: Vec<&String> = a
        .storage_to
        .iter()
        .chain(a.disk_to.iter().map(|d| &d.to))
        .collect();
    let folders = dests.iter().filter(|d| d.starts_with('/')).count();
    if folders > 0 {
        bail!(
            "with --to, give either folders of {to} (one shared-nothing move) or shares (the disks onto the share, then the VM), not both"
        );
    }
    if a.grant.is_some() {
        bail!("--grant names one move; this is two (the disks, then the VM): let ferry sign one per step, or run them one by one");
    }
    let settings = MoveSettings {
        downtime_ms: a.downtime_ms,
        bandwidth_mbit: a.bandwidth_mbit,
        timeout_s: a.timeout,
        channels: a.channels.unwrap_or(0),
        mode: crate::vmm_cmd::mode_of(&a.mode),
        postcopy_recovery_s: a.postcopy_recovery,
    };
    let (_, c, _) = t.find_vm(&info.name).await?;
    let disks = MoveRequest {
        vm: info.name.clone(),
        to: String::new(),
        settings: settings.clone(),
        grant: grant_for(t, &info, &info.host)?,
        storage_to: a.storage_to.clone(),
        disk_to: a.disk_to.clone(),
        keep_source: a.keep_source,
    };
    if !json {
        eprintln!(
            "step 1 of 2: {}'s disks onto the share, on {}",
            info.name, info.host
        );
    }
    one(&c, &disks, a.check, json).await?;
    if a.check {
        println!(
            "then: {} to {to}, checked once its disks are on the share (`ferry move {} --to {to} --check`)",
            info.name, info.name
        );
        return Ok(());
    }
    // The disks are on the share now: the VM's move is checked and granted for them.
    let (_, c, info) = t.find_vm(&info.name).await?;
    let vm = MoveRequest {
        vm: info.name.clone(),
        to: to.clone(),
        settings,
        grant: grant_for(t, &info, &to)?,
        storage_to: None,
        disk_to: Vec::new(),
        keep_source: false,
    };
    if !json {
        eprintln!("step 2 of 2: {} to {to}", info.name);
    }
    one(&c, &vm, false, json).await.with_context(|| {
        format!(
            "{}'s disks are on the share now; only the VM did not move",
            info.name
        )
    })
}

/// Check, or start and follow, one move; fails unless it is done.
async fn one(c: &Client, req: &MoveRequest, check: bool, json: bool) -> Result<()> {
    if check {
        let r: CheckReport = c.post("/v1/moves/check", req).await?;
        // A move of the VM itself (no disks): what it would do, measured (a few seconds).
        let forecast = if r.ok
            && !req.to.is_empty()
            && req.storage_to.is_none()
            && req.disk_to.is_empty()
        {
            if !json {
                print_check(&r);
                eprintln!("forecasting: sampling {}'s memory and the link to {} for a few seconds; nothing moves...", r.vm, r.to);
            }
            Some(
                c.post::<_, ferry_api::MigrationForecast>("/v1/moves/forecast", req)
                    .await,
            )
        } else {
            if !json {
                print_check(&r);
            }
            None
        };
        if json {
            let mut v = serde_json::to_value(&r)?;
            match &forecast {
                Some(Ok(f)) => v["forecast"] = serde_json::to_value(f)?,
                Some(Err(e)) => v["forecast_error"] = e.to_string().into(),
                None => {}
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            match &forecast {
                Some(Ok(f)) => crate::vmm_cmd::print_forecast(&r.to, f),
                Some(Err(e)) => println!("forecast: could not run: {e}"),
                None => {}
            }
        }
        if !r.ok {
            bail!("{} cannot move to {}", r.vm, r.to);
        }
        return Ok(());
    }
    let m: MoveInfo = match c.post("/v1/moves", req).await {
        Ok(m) => m,
        Err(ClientError::Api { body, .. }) if body.check.is_some() => {
            let r = body.check.map(|b| *b).unwrap_or_else(unreachable_report);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_check(&r);
            }
            bail!("nothing moved: {}", body.error);
        }
        Err(e) => return Err(e.into()),
    };
    let report = follow(c, &m, json).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if report.result != "done" {
        bail!(
            "the move {}: {}; {} runs on {}",
            report.result,
            report.error.clone().unwrap_or_default(),
            report.vm,
            report.runs_on
        );
    }
    Ok(())
}

/// How long a grant the CLI signs is valid.
const GRANT_SECS: i64 = 10 * 60;

/// With an admin's credentials, a grant for exactly this move (the VM, its host, the
/// destination, its disks; ten minutes; single use), signed with the admin's key. Hosts in
/// delegated mode require one; hosts in console mode ignore it.
pub(crate) fn grant_for(
    t: &Targets,
    vm: &ferry_api::host::VmInfo,
    to: &str,
) -> Result<Option<String>> {
    let Some(a) = &t.admin else { return Ok(None) };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let claims = ferry_auth::grant::GrantClaims {
        vm: vm.name.clone(),
        from: vm.host.clone(),
        to: t.host_name(to),
        disks: vm
            .config
            .disks
            .iter()
            .map(|d| d.path.display().to_string())
            .collect(),
        shares: Vec::new(),
        exp: now + GRANT_SECS,
        iat: now,
        jti: ferry_vmm::migration::send::new_migration_id(),
        admin: a.creds.identity.name.clone(),
    };
    Ok(Some(ferry_auth::grant::sign(&a.creds, &claims)?))
}

fn unreachable_report() -> CheckReport {
    CheckReport {
        vm: String::new(),
        from: String::new(),
        to: String::new(),
        ok: false,
        checks: Vec::new(),
    }
}

/// A check report for people.
pub fn print_check(r: &CheckReport) {
    println!("check: {} {} -> {}", r.vm, r.from, r.to);
    for c in &r.checks {
        println!(
            "  {:<5} {:<22} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
        if let Some(f) = &c.fix {
            println!("        fix: {f}");
        }
    }
    let bad = r.checks.iter().filter(|c| !c.ok).count();
    if r.ok {
        println!("result: {} can move to {}", r.vm, r.to);
    } else {
        println!(
            "result: {} cannot move to {} ({bad} problem{})",
            r.vm,
            r.to,
            if bad == 1 { "" } else { "s" }
        );
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

fn print_disks(r: &MoveReport) {
    for d in &r.disks {
        println!(
            "  disk {}: {} -> {}: {}; copied {}, skipped {} (holes, zeros), mirrored {} of guest writes{}{}",
            d.disk,
            d.from,
            d.to,
            if d.switched { "the VM uses the new copy" } else { "the VM stays on its disk" },
            mib(d.copied_bytes),
            mib(d.skipped_bytes),
            mib(d.mirrored_bytes),
            d.pause_ms.map(|p| format!(", I/O paused {p:.2} ms")).unwrap_or_default(),
            d.old_copy.as_deref().map(|o| format!("; old copy {o}")).unwrap_or_default(),
        );
    }
}

fn print_report(r: &MoveReport) {
    if !r.disks.is_empty() && r.from == r.to {
        // A storage move.
        let moved = r.disks.iter().filter(|d| d.switched).count();
        println!(
            "{} {} of {} disk{} of {} on {} in {:.2} s{}",
            if r.result == "done" {
                "moved"
            } else {
                "storage move"
            },
            moved,
            r.disks.len(),
            if r.disks.len() == 1 { "" } else { "s" },
            r.vm,
            r.from,
            r.total_ms as f64 / 1000.0,
            if r.result == "done" {
                String::new()
            } else {
                format!(": {}", r.result)
            }
        );
        print_disks(r);
        if let Some(n) = &r.error {
            println!("note: {n}");
        }
        return;
    }
    if r.result == "done" {
        println!(
            "moved {} {} -> {} in {:.2} s: pause {}, {:.1} MiB in {} rounds{}",
            r.vm,
            r.from,
            r.to,
            r.total_ms as f64 / 1000.0,
            r.downtime_ms
                .map(|d| format!("{d:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            r.bytes as f64 / f64::from(1 << 20),
            r.rounds,
            if r.queued_ms >= 100 {
                format!(" (queued {:.1} s first)", r.queued_ms as f64 / 1000.0)
            } else {
                String::new()
            }
        );
        println!(
            "  stream {}; authorised by {}",
            if r.encrypted {
                "encrypted (mutual TLS between the hosts)"
            } else {
                "NOT encrypted (a network both hosts trust for plaintext migration, or no cluster)"
            },
            r.auth.as_deref().unwrap_or("-")
        );
        if let Some(p) = &r.migration {
            for l in crate::vmm_cmd::mode_lines(p) {
                println!("  {l}");
            }
        }
        print_disks(r);
        if let Some(n) = &r.error {
            println!("note: {n}");
        }
    } else {
        println!(
            "move of {} {} -> {} {} after {:.2} s; it runs on {}",
            r.vm,
            r.from,
            r.to,
            r.result,
            r.total_ms as f64 / 1000.0,
            r.runs_on
        );
        print_disks(r);
    }
}

fn memory_bytes(m: &MoveInfo) -> u64 {
    m.check
        .as_ref()
        .and_then(|c| c.checks.iter().find(|c| c.name == "memory"))
        .and_then(|c| c.detail.split(" needs ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .map(|mib| mib << 20)
        .unwrap_or(1 << 30)
}

/// Percent done of a move, from its memory copy (or its disk copies).
fn percent(m: &MoveInfo) -> u64 {
    if !m.storage.is_empty() && m.progress.is_none() {
        let total: u64 = m.storage.iter().map(|s| s.total_bytes).sum::<u64>().max(1);
        let done: u64 = m.storage.iter().map(|s| s.done_bytes).sum();
        return if m.state == MoveState::Done {
            100
        } else {
            (done * 100 / total).min(99)
        };
    }
    let total = memory_bytes(m).max(1);
    match (&m.progress, m.state) {
        (_, MoveState::Done) => 100,
        (None, _) => 0,
        (Some(p), MoveState::Postcopy) => {
            (100 - (p.postcopy_pages_left * 4096 * 100 / total).min(100)).clamp(1, 99)
        }
        (Some(p), _) if p.round == 0 && p.phase == MigrationPhase::Memory => {
            (p.bytes_sent * 100 / total).min(99)
        }
        (Some(p), _) => (100 - (p.dirty_pages * 4096 * 100 / total).min(100)).clamp(1, 99),
    }
}

fn line(m: &MoveInfo) -> String {
    let storage_only = m.from == m.to;
    let state = match m.state {
        MoveState::Preparing if storage_only => "making the new copies".to_string(),
        MoveState::Migrating if storage_only => "copying disks".to_string(),
        MoveState::Switchover if storage_only => "switching disks".to_string(),
        MoveState::Postcopy => {
            let p = m.progress.clone().unwrap_or_default();
            return if p.postcopy_reconnecting {
                format!(
                    "post-copy: the link to {} broke; reconnecting (the guest there waits for {} pages)",
                    m.to, p.postcopy_pages_left
                )
            } else {
                format!(
                    "post-copy: {} runs on {}; {} pages still to go ({} fetched on demand)",
                    m.vm, m.to, p.postcopy_pages_left, p.postcopy_pages_requested
                )
            };
        }
        s => format!("{s:?}").to_lowercase(),
    };
    if !m.storage.is_empty() && m.progress.is_none() && !m.state.is_final() {
        let total: u64 = m.storage.iter().map(|s| s.total_bytes).sum();
        let done: u64 = m.storage.iter().map(|s| s.done_bytes).sum();
        let copied: u64 = m.storage.iter().map(|s| s.copied_bytes).sum();
        let skipped: u64 = m.storage.iter().map(|s| s.skipped_bytes).sum();
        let ms = m
            .storage
            .iter()
            .map(|s| s.elapsed_ms)
            .max()
            .unwrap_or(0)
            .max(1);
        return format!(
            "{} disks: {} of {} ({} copied at {:.0} MiB/s, {} skipped as holes)",
            if m.state == MoveState::Switchover {
                "switching"
            } else {
                "copying"
            },
            mib(done),
            mib(total),
            mib(copied),
            copied as f64 / f64::from(1 << 20) / (ms as f64 / 1000.0),
            mib(skipped)
        );
    }
    match (&m.progress, m.state) {
        (_, MoveState::Queued) => format!(
            "queued: {}",
            m.waiting_for.as_deref().unwrap_or("waiting for a slot")
        ),
        (Some(p), MoveState::Migrating | MoveState::Switchover | MoveState::Settling) => format!(
            "{state} round {} {:.0} MiB sent, {:.0} Mbit/s, dirty {} pages, expected pause {:.1} ms",
            p.round,
            p.bytes_sent as f64 / f64::from(1 << 20),
            p.bandwidth_mbit,
            p.dirty_pages,
            p.expected_downtime_ms
        ),
        _ => state,
    }
}

fn bar(mp: &MultiProgress, prefix: &str) -> ProgressBar {
    let b = mp.add(ProgressBar::new(100));
    b.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_prefix(prefix.to_string());
    b
}

/// Follow one move to its end, with a progress bar on a terminal and a line per change
/// otherwise; Ctrl-C cancels it (once) and keeps following until it ends.
pub async fn follow(c: &Client, m: &MoveInfo, json: bool) -> Result<MoveReport> {
    let mp = MultiProgress::with_draw_target(if json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let b = bar(&mp, &m.vm);
    let r = follow_one(c, m, &b, json, true).await;
    b.finish_and_clear();
    r
}

/// Follow several moves at once (an evacuation): one progress row per VM.
pub async fn follow_many(c: &Client, moves: &[MoveInfo], json: bool) -> Result<Vec<MoveReport>> {
    let mp = MultiProgress::with_draw_target(if json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let mut tasks = Vec::new();
    for m in moves {
        let b = bar(&mp, &m.vm);
        let (c, m) = (c.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            let r = follow_one(&c, &m, &b, json, false).await;
            b.finish();
            r
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await.context("a follower failed")??;
        if !json {
            mp.suspend(|| print_report(&r));
        }
        out.push(r);
    }
    Ok(out)
}

async fn follow_one(
    c: &Client,
    m: &MoveInfo,
    b: &ProgressBar,
    json: bool,
    ctrl_c: bool,
) -> Result<MoveReport> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut events = c
        .events::<MoveInfo>(&format!("/v1/moves/{}/events", m.id))
        .await?;
    let mut cancel_sent = false;
    let mut last_line = String::new();
    let mut last_state = None;
    loop {
        let next = tokio::select! {
            n = events.next() => n,
            _ = tokio::signal::ctrl_c(), if ctrl_c && !cancel_sent => {
                cancel_sent = true;
                b.suspend(|| eprintln!("{}: cancelling (Ctrl-C); the VM stays on {}", m.vm, m.from));
                if let Err(e) = c.post::<_, MoveInfo>(&format!("/v1/moves/{}/cancel", m.id), &serde_json::json!({})).await {
                    b.suspend(|| eprintln!("{}: cannot cancel: {e}", m.vm));
                }
                continue;
            }
        };
        match next {
            Some(Ok(info)) => {
                b.set_position(percent(&info));
                let l = line(&info);
                b.set_message(l.clone());
                let changed = last_state != Some(info.state);
                if !tty && !json && (changed || info.state == MoveState::Queued && l != last_line) {
                    eprintln!("{}: {l}", info.vm);
                }
                last_state = Some(info.state);
                last_line = l;
                if info.state.is_final() {
                    return info
                        .report
                        .with_context(|| format!("move {} ended without a report", info.id));
                }
            }
            Some(Err(_)) | None => {
                // The daemon ended the stream early: it stopped. The move goes on without it.
                tokio::time::sleep(Duration::from_millis(200)).await;
                match c.get::<MoveInfo>(&format!("/v1/moves/{}", m.id)).await {
                    Ok(i) if i.state.is_final() => {
                        return i.report.context("the move ended without a report")
                    }
                    Ok(_) => {
                        events = c
                            .events::<MoveInfo>(&format!("/v1/moves/{}/events", m.id))
                            .await?;
                    }
                    Err(e) => bail!(
                        "lost contact with {}'s daemon during the move ({e}); the VMs finish the move on their own: see `ferry vm show {}` once it is back",
                        m.from,
                        m.vm
                    ),
                }
            }
        }
    }
}
