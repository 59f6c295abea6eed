//! Moves sent from this host: a resource with an id, a state machine and a progress stream.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Queued
//!     Queued --> Checking: a slot here is free
//!     Checking --> Failed: the compatibility check fails
//!     Checking --> Preparing
//!     Preparing --> Queued: the destination has no free slot
//!     Preparing --> Migrating: the destination's VMM listens
//!     Migrating --> Switchover: the guest pauses
//!     Switchover --> Done: the destination runs the guest
//!     Migrating --> Postcopy: post-copy, the guest runs on the destination (committed)
//!     Postcopy --> Done: every page is there
//!     Switchover --> Settling: the last answer was lost
//!     Settling --> Done: the destination's record says committed
//!     Settling --> Failed: it says aborted (the guest runs on here)
//!     Migrating --> Failed: error, timeout, destination lost
//!     Migrating --> Cancelled: cancel
//! ```
//!
//! The source VMM does the copying; this daemon decides when it may start (limits), watches
//! the destination's daemon while it runs (a lost destination daemon cancels the move before
//! the switch-over), and settles a hand-over whose last answer was lost by asking the
//! destination daemon for the outcome record (see [`crate::incoming`]). The move's record is
//! written before the VMM starts sending, so a daemon that restarts mid-move picks it up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::host::{
    CheckReport, EvacuateInfo, EvacuateRequest, IncomingInfo, IncomingReply, IncomingRequest,
    IncomingState, MigrationAuth, MoveInfo, MoveReport, MoveRequest, MoveSettings, MoveState,
    SettleReply, Skipped, VmState,
};
use ferry_api::{
    MigrateSettings, MigrationPhase, MigrationProgress, Outcome, Request, Response, ResponseBody,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::check;
use crate::client::Client;
use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::state;
use crate::transport::Peer;
use crate::vmm;

/// How long the destination's daemon may be unreachable during a move before it is given up.
const DEST_LOST: Duration = Duration::from_secs(2);
/// Moves kept in memory after they end, for `GET /v1/moves`.
const HISTORY: usize = 100;

/// A move from here, in memory.
pub struct OutMove {
    pub info: MoveInfo,
    pub tx: watch::Sender<MoveInfo>,
    pub cancel: Arc<AtomicBool>,
    pub cancelled: Arc<Notify>,
    pub to_addr: String,
    pub settings: MoveSettings,
    /// Whether it holds one of this host's migration slots.
    pub holds_slot: bool,
    pub started: Instant,
    pub queued_ms: u64,
    /// The admin's grant, passed on to the destination.
    pub grant: Option<String>,
    /// How the move was authorised, for the report.
    pub auth: String,
    /// Whether the migration stream is encrypted.
    pub encrypted: bool,
    /// A storage move (the VM stays here): it holds a storage-move slot, not a migration's.
    pub storage_only: bool,
    /// What a storage move did with each disk, for its report.
    pub disk_reports: Vec<ferry_api::host::DiskMoveReport>,
    /// Disks that go into the destination's folders with the VM (a shared-nothing move).
    pub disks_to: Vec<ferry_api::host::DiskTargetSpec>,
    /// Keep the old disks once the move is done.
    pub keep_source: bool,
    /// Post-copy began: the move committed as the guest started on the destination, and the
    /// disks' write leases went there then (not when the last page had gone).
    pub postcopy_began: bool,
}

/// What the state directory keeps of a move sent from here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveRecord {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub to_addr: String,
    pub state: MoveState,
    pub created_ms: u64,
    #[serde(default)]
    pub report: Option<MoveReport>,
}

pub(crate) fn new_id() -> String {
    ferry_vmm::migration::send::new_migration_id()[..16].to_string()
}

/// Change a move's public state and tell its followers.
pub(crate) fn update(d: &Daemon, id: &str, f: impl FnOnce(&mut MoveInfo)) -> Option<MoveInfo> {
    let mut g = d.lock();
    let m = g.outgoing.get_mut(id)?;
    f(&mut m.info);
    let info = m.info.clone();
    m.tx.send_replace(info.clone());
    Some(info)
}

fn set_slot(d: &Daemon, id: &str, hold: bool) {
    if let Some(m) = d.lock().outgoing.get_mut(id) {
        m.holds_slot = hold;
    }
    if !hold {
        d.moves_changed.notify_waiters();
    }
}

/// Take a migration slot here for `id` if one is free (queued moves go in order of arrival).
fn try_take_slot(d: &Daemon, id: &str) -> Result<(), String> {
    let mut g = d.lock();
    let counts = d.move_counts(&g);
    let in_use = counts.outgoing + counts.incoming;
    let max = g.settings.max_migrations;
    let created = g.outgoing.get(id).map(|m| m.info.created_ms).unwrap_or(0);
    let earlier_waiting = g.outgoing.values().any(|m| {
        m.info.id != id
            && !m.holds_slot
            && m.info.state == MoveState::Queued
            && m.info.created_ms < created
            && m.info
                .waiting_for
                .as_deref()
                .is_some_and(|w| w.contains(&d.name))
    });
    if in_use < max && !earlier_waiting {
        if let Some(m) = g.outgoing.get_mut(id) {
            m.holds_slot = true;
        }
        Ok(())
    } else {
        Err(format!(
            "waiting for a free migration slot on {} ({in_use} of {max} in use)",
            d.name
        ))
    }
}

fn persist(d: &Daemon, id: &str, state: MoveState, report: Option<MoveReport>) {
    let g = d.lock();
    let Some(m) = g.outgoing.get(id) else { return };
    let r = MoveRecord {
        id: id.into(),
        vm: m.info.vm.clone(),
        to: m.info.to.clone(),
        to_addr: m.to_addr.clone(),
        state,
        created_ms: m.info.created_ms,
        report,
    };
    drop(g);
    if let Err(e) = state::write_json(&d.state.move_record(id), &r) {
        tracing::error!("recording move {id}: {}", ferry_vmm::error_chain(&e));
    }
}

fn forbidden(code: &str, m: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::FORBIDDEN, code, m)
}

/// Whether `peer` may start this move here: in console mode only from this host itself (its
/// local socket, as root); in delegated mode only with a valid grant for exactly this move.
/// Returns how it was authorised.
fn authorise(d: &Daemon, req: &MoveRequest, peer: &Peer) -> ApiResult<String> {
    let mode = d.lock().settings.migration_auth;
    match mode {
        MigrationAuth::Console => match peer {
            Peer::Local { uid: 0 } => Ok(format!("console: a local admin on {}", d.name)),
            Peer::Insecure(_) if d.security.is_none() => Ok("no cluster (insecure)".into()),
            p => Err(forbidden(
                "console_only",
                format!(
                    "{} accepts moves only from its own console (migration auth: console), not from {}: run `ferry move` on {}, or allow signed grants with `ferry --host {} host set --migration-auth delegated`",
                    d.name,
                    p.describe(),
                    d.name,
                    d.name
                ),
            )),
        },
        MigrationAuth::Delegated => {
            let sec = d.security.as_ref().ok_or_else(|| {
                forbidden("grant_refused", format!("{} is in no cluster: it cannot check grants", d.name))
            })?;
            let token = req.grant.as_deref().ok_or_else(|| {
                forbidden(
                    "grant_required",
                    format!("{} starts moves only with an admin's grant (migration auth: delegated)", d.name),
                )
            })?;
            let refuse = |m: String| forbidden("grant_refused", format!("grant refused: {m}"));
            let (g, admin) = ferry_auth::grant::verify(token, &sec.trust)
                .map_err(|e| refuse(e.to_string().trim_start_matches("grant refused: ").to_string()))?;
            let to = if crate::storage::is_storage_only(d, req) {
                d.name.clone()
            } else {
                d.resolve_host(&req.to)?.0
            };
            if g.from != d.name {
                return Err(refuse(format!("it is for a move from {}, not from {}", g.from, d.name)));
            }
            if g.to != to {
                return Err(refuse(format!("it is for a move to {}, not to {to}", g.to)));
            }
            if g.vm != req.vm {
                return Err(refuse(format!("it is for VM {}, not {}", g.vm, req.vm)));
            }
            let disks: Vec<String> = d
                .lock()
                .vms
                .get(&req.vm)
                .map(|v| v.record.config.disks.iter().map(|x| x.path.display().to_string()).collect())
                .unwrap_or_default();
            if let Some(p) = disks.iter().find(|p| !g.disks.contains(p)) {
                return Err(refuse(format!("it does not name disk {p}")));
            }
            Ok(format!("grant {} signed by {admin}", g.jti))
        }
    }
}

/// `POST /v1/moves`: authorise, check, then start (or queue) a move.
pub async fn start(d: &Arc<Daemon>, req: MoveRequest, peer: &Peer) -> ApiResult<MoveInfo> {
    let what = format!("move {} to {}", req.vm, req.to);
    let auth = match authorise(d, &req, peer) {
        Ok(a) => a,
        Err(e) => {
            crate::audit::record(&d.state.root, peer, &what, Some(&e.body.error), None);
            return Err(e);
        }
    };
    let r = start_authorised(d, req, auth.clone()).await;
    crate::audit::record(
        &d.state.root,
        peer,
        &what,
        r.as_ref().err().map(|e| e.body.error.as_str()),
        Some(&auth),
    );
    r
}

async fn start_authorised(d: &Arc<Daemon>, req: MoveRequest, auth: String) -> ApiResult<MoveInfo> {
    if crate::storage::is_storage_only(d, &req) {
        return crate::storage::start(d, req, auth).await;
    }
    let (report, disks_to) = if crate::shared_nothing::wants(d, &req) {
        crate::shared_nothing::check(d, &req, None).await?
    } else {
        (
            check::check_move(d, &req.vm, &req.to, None, &[]).await?,
            Vec::new(),
        )
    };
    if !report.ok {
        return Err(
            if report
                .checks
                .iter()
                .any(|c| c.name.starts_with("migration (") && !c.ok)
            {
                let mut e = ApiError::check_failed(report.clone());
                e.status = axum::http::StatusCode::FORBIDDEN;
                e.body.code = "migration_disabled".into();
                e
            } else {
                ApiError::check_failed(report)
            },
        );
    }
    begin(d, &req, report, auth, disks_to)
}

fn begin(
    d: &Arc<Daemon>,
    req: &MoveRequest,
    report: CheckReport,
    auth: String,
    disks_to: Vec<ferry_api::host::DiskTargetSpec>,
) -> ApiResult<MoveInfo> {
    let (to_name, to_addr) = d.resolve_host(&req.to)?;
    let info = register(d, req, to_name, to_addr, report, auth, false)?;
    let id = info.id.clone();
    if let Some(m) = d.lock().outgoing.get_mut(&id) {
        m.disks_to = disks_to;
    }
    tracing::info!("move {id}: {} to {}", req.vm, info.to);
    tokio::spawn(drive(d.clone(), id));
    Ok(info)
}

/// Record a new move from here (queued), unless the VM is moving already.
pub(crate) fn register(
    d: &Daemon,
    req: &MoveRequest,
    to_name: String,
    to_addr: String,
    report: CheckReport,
    auth: String,
    storage_only: bool,
) -> ApiResult<MoveInfo> {
    let id = new_id();
    let info = MoveInfo {
        id: id.clone(),
        vm: req.vm.clone(),
        from: d.name.clone(),
        to: to_name,
        state: MoveState::Queued,
        waiting_for: None,
        progress: None,
        storage: Vec::new(),
        check: Some(report),
        report: None,
        error: None,
        created_ms: vmm::now_ms(),
    };
    {
        let mut g = d.lock();
        if let Some(m) = g
            .outgoing
            .values()
            .find(|m| m.info.vm == req.vm && !m.info.state.is_final())
        {
            return Err(ApiError::conflict(format!(
                "{} is already moving (move {} to {}); cancel it or wait for it to end",
                req.vm, m.info.id, m.info.to
            )));
        }
        let (tx, _) = watch::channel(info.clone());
        g.outgoing.insert(
            id.clone(),
            OutMove {
                info: info.clone(),
                tx,
                cancel: Arc::new(AtomicBool::new(false)),
                cancelled: Arc::new(Notify::new()),
                to_addr,
                settings: req.settings.clone(),
                holds_slot: false,
                started: Instant::now(),
                queued_ms: 0,
                grant: req.grant.clone(),
                auth,
                encrypted: false,
                storage_only,
                disk_reports: Vec::new(),
                disks_to: Vec::new(),
                keep_source: req.keep_source,
                postcopy_began: false,
            },
        );
        prune(&mut g);
    }
    Ok(info)
}

/// Keep the history bounded.
fn prune(g: &mut crate::daemon::Inner) {
    let mut done: Vec<(u64, String)> = g
        .outgoing
        .values()
        .filter(|m| m.info.state.is_final())
        .map(|m| (m.info.created_ms, m.info.id.clone()))
        .collect();
    if done.len() > HISTORY {
        done.sort();
        for (_, id) in done
            .into_iter()
            .take(g.outgoing.len().saturating_sub(HISTORY))
        {
            g.outgoing.remove(&id);
        }
    }
}

fn cancelled(d: &Daemon, id: &str) -> bool {
    d.lock()
        .outgoing
        .get(id)
        .is_some_and(|m| m.cancel.load(Ordering::SeqCst))
}

/// Wait until a slot may have freed, the move is cancelled, or a second passed.
async fn wait_a_little(d: &Daemon, id: &str) {
    let c = d.lock().outgoing.get(id).map(|m| m.cancelled.clone());
    let changed = d.moves_changed.notified();
    tokio::select! {
        _ = changed => {}
        _ = async { if let Some(c) = c { c.notified().await } else { std::future::pending().await } } => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// How a move ended.
struct Ending {
    state: MoveState,
    error: Option<String>,
    progress: Option<MigrationProgress>,
}

impl Ending {
    fn failed(msg: impl Into<String>) -> Ending {
        Ending {
            state: MoveState::Failed,
            error: Some(msg.into()),
            progress: None,
        }
    }
}

/// Run move `id` to its end.
async fn drive(d: Arc<Daemon>, id: String) {
    let ending = run(&d, &id).await;
    // A shared-nothing move's copies: kept (and the old disks removed), or dropped.
    let disks = crate::shared_nothing::settle(&d, &id, ending.state).await;
    if let Some(m) = d.lock().outgoing.get_mut(&id) {
        m.disk_reports = disks;
    }
    finish(&d, &id, ending).await;
}

async fn run(d: &Arc<Daemon>, id: &str) -> Ending {
    let Some((vm, to, to_addr, settings, disks_to)) = d.lock().outgoing.get(id).map(|m| {
        (
            m.info.vm.clone(),
            m.info.to.clone(),
            m.to_addr.clone(),
            m.settings.clone(),
            m.disks_to.clone(),
        )
    }) else {
        return Ending::failed("the move vanished");
    };
    let dest = d
        .client_for(&to, &to_addr)
        .with_timeout(Duration::from_secs(15));
    let queued_at = Instant::now();
    // Time spent waiting for a slot (here or on the destination), for the report: not the
    // checks, nor a shared-nothing move's disk copy.
    let mut queued = Duration::ZERO;
    // The check that let the move start is fresh unless the move had to wait.
    let mut waited = false;
    // A shared-nothing move's copies on the destination, once made (and in step).
    let mut copies: Option<Vec<ferry_api::host::DiskTarget>> = None;
    let (listen, encrypted) = loop {
        if cancelled(d, id) {
            return Ending {
                state: MoveState::Cancelled,
                error: Some("cancelled while queued".into()),
                progress: None,
            };
        }
        if let Err(why) = try_take_slot(d, id) {
            waited = true;
            update(d, id, |i| {
                i.state = MoveState::Queued;
                i.waiting_for = Some(why);
            });
            let t = Instant::now();
            wait_a_little(d, id).await;
            queued += t.elapsed();
            continue;
        }
        if waited && copies.is_none() {
            // Things may have changed while it waited: check again.
            update(d, id, |i| {
                i.state = MoveState::Checking;
                i.waiting_for = None;
            });
            let report = match check::check_move(d, &vm, &to, Some(id), &disks_to).await {
                Ok(r) => r,
                Err(e) => {
                    set_slot(d, id, false);
                    return Ending::failed(e.to_string());
                }
            };
            let ok = report.ok;
            update(d, id, |i| i.check = Some(report.clone()));
            if !ok {
                set_slot(d, id, false);
                return Ending::failed(ApiError::check_failed(report).to_string());
            }
        }
        update(d, id, |i| i.state = MoveState::Preparing);
        if !disks_to.is_empty() && copies.is_none() {
            // A shared-nothing move's time counts from its disk copy.
            if let Some(m) = d.lock().outgoing.get_mut(id) {
                m.started = Instant::now();
            }
            match crate::shared_nothing::copy(d, id, &dest, &vm, &to, &to_addr, &disks_to).await {
                Ok(c) => copies = Some(c),
                Err((state, error)) => {
                    set_slot(d, id, false);
                    return Ending {
                        state,
                        error: Some(error),
                        progress: None,
                    };
                }
            }
        }
        let req = match check::incoming_request(d, &vm) {
            Ok(mut check) => IncomingRequest {
                check: {
                    // The destination runs the VM on the copies it made.
                    for c in copies.iter().flatten() {
                        if let Some(disk) = check.config.disks.get_mut(c.index) {
                            disk.path = c.path.clone();
                        }
                    }
                    check
                },
                move_id: id.into(),
                grant: d.lock().outgoing.get(id).and_then(|m| m.grant.clone()),
            },
            Err(e) => {
                set_slot(d, id, false);
                return Ending::failed(e.to_string());
            }
        };
        match dest.post::<_, IncomingReply>("/v1/incoming", &req).await {
            Ok(r) => {
                tracing::debug!(
                    "move {id}: {to} listens on {} after {:?}",
                    r.listen,
                    queued_at.elapsed()
                );
                break (r.listen, r.encrypted);
            }
            Err(e) if e.code() == Some("busy") => {
                waited = true;
                set_slot(d, id, false);
                update(d, id, |i| {
                    i.state = MoveState::Queued;
                    i.waiting_for = Some(format!("waiting for a free migration slot on {to}: {e}"));
                });
                let t = Instant::now();
                wait_a_little(d, id).await;
                queued += t.elapsed();
            }
            Err(e) => {
                set_slot(d, id, false);
                return Ending::failed(format!("{to} cannot receive {vm}: {e}"));
            }
        }
    };
    if let Some(m) = d.lock().outgoing.get_mut(id) {
        m.queued_ms = queued.as_millis() as u64;
        if copies.is_none() {
            m.started = Instant::now();
        }
        m.encrypted = encrypted;
    }
    // From here the VMM may commit the move: record it first, so a restarted daemon settles it.
    persist(d, id, MoveState::Migrating, None);
    update(d, id, |i| i.state = MoveState::Migrating);
    let api = d.run_dir(&vm).api();
    let ms = vmm_settings(d, &settings, listen, id, encrypted, &to);
    let stream = vmm::open(
        &api,
        &Request::Migrate {
            settings: ms,
            follow: true,
        },
    )
    .await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            abort_remote(&dest, id).await;
            return Ending::failed(format!("cannot reach {vm}'s VMM: {e}"));
        }
    };
    tracing::debug!(
        "move {id}: the VMM sends, {:?} after the move began",
        queued_at.elapsed()
    );
    follow(d, id, &vm, &to, &api, &dest, &mut stream).await
}

/// Follow the VMM's migration to its end, watching the destination daemon meanwhile.
async fn follow(
    d: &Arc<Daemon>,
    id: &str,
    vm: &str,
    to: &str,
    api: &std::path::Path,
    dest: &Client,
    stream: &mut vmm::VmmStream,
) -> Ending {
    let cancel = d.lock().outgoing.get(id).map(|m| m.cancelled.clone());
    let mut watchdog = tokio::time::interval(Duration::from_millis(500));
    let mut dest_lost_since: Option<Instant> = None;
    let mut cancel_sent = false;
    let mut settling: Option<tokio::task::JoinHandle<()>> = None;
    let mut last: Option<MigrationProgress> = None;
    let mut note: Option<String> = None;
    let mut committed = false;
    loop {
        tokio::select! {
            line = stream.next() => match line {
                Some(Ok(Response::Ok(ResponseBody::Migration(p)))) => {
                    let phase = p.phase;
                    update(d, id, |i| {
                        i.state = match phase {
                            MigrationPhase::Connecting | MigrationPhase::Memory => MoveState::Migrating,
                            MigrationPhase::Switchover | MigrationPhase::Committing => MoveState::Switchover,
                            MigrationPhase::InDoubt => MoveState::Settling,
                            MigrationPhase::Postcopy => MoveState::Postcopy,
                            _ => i.state,
                        };
                        i.progress = Some(p.clone());
                    });
                    last = Some(p.clone());
                    match phase {
                        MigrationPhase::Done => {
                            let error = note.map(|n| format!("{n}, but too late: the hand-over had begun and completed"));
                            return Ending { state: MoveState::Done, error, progress: last };
                        }
                        MigrationPhase::Failed | MigrationPhase::Cancelled => {
                            abort_remote(dest, id).await;
                            let err = match (p.error.clone(), note) {
                                (Some(e), Some(n)) => format!("{n}: {e}"),
                                (e, n) => e.or(n).unwrap_or_default(),
                            };
                            return Ending {
                                state: if phase == MigrationPhase::Cancelled { MoveState::Cancelled } else { MoveState::Failed },
                                error: Some(err),
                                progress: last,
                            };
                        }
                        MigrationPhase::Postcopy if !committed => {
                            // The guest runs on the destination now: its writes to a shared
                            // disk wait there for the lease, so hand it over at once. Nothing
                            // can be cancelled any more; a broken link is the VMMs' to mend.
                            committed = true;
                            tracing::info!("move {id}: {vm} runs on {to}; its pages follow (post-copy)");
                            hand_over_leases(d, id, vm, to);
                        }
                        MigrationPhase::InDoubt if settling.is_none() => {
                            tracing::warn!("move {id}: the hand-over's last answer was lost; settling it with {to}");
                            settling = Some(tokio::spawn(settle_with(dest.clone(), id.to_string(), api.to_path_buf())));
                        }
                        _ => {}
                    }
                }
                Some(Ok(Response::Error(e))) => {
                    abort_remote(dest, id).await;
                    return Ending::failed(format!("{vm}'s VMM refused to migrate: {e}"));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    // The VMM's stream ended without a final report: the VMM is gone.
                    return vmm_gone(d, id, vm, dest, last).await;
                }
            },
            _ = watchdog.tick(), if settling.is_none() && !cancel_sent && !committed => {
                match dest.get::<IncomingInfo>(&format!("/v1/incoming/{id}")).await {
                    Ok(i) if i.state == IncomingState::Aborted => {
                        note = Some(format!("{to} gave up the move"));
                        cancel_sent = cancel_vmm(api).await;
                    }
                    Ok(_) => dest_lost_since = None,
                    Err(e) if e.unreachable() => {
                        let since = *dest_lost_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= DEST_LOST {
                            tracing::warn!("move {id}: lost {to}'s daemon ({e}); cancelling");
                            note = Some(format!("lost contact with {to}'s daemon ({e})"));
                            cancel_sent = cancel_vmm(api).await;
                        }
                    }
                    Err(_) => {}
                }
            },
            _ = async { if let Some(c) = &cancel { c.notified().await } else { std::future::pending().await } }, if !cancel_sent => {
                cancel_sent = cancel_vmm(api).await;
                if !cancel_sent {
                    update(d, id, |i| i.error = Some("too late to cancel: the hand-over has begun".into()));
                }
            },
        }
    }
}

/// What this host's VMM is told for a move (or a forecast) to `to`, listening on `listen`.
fn vmm_settings(
    d: &Daemon,
    settings: &MoveSettings,
    listen: String,
    id: &str,
    encrypted: bool,
    to: &str,
) -> MigrateSettings {
    MigrateSettings {
        to: listen,
        downtime_ms: settings.downtime_ms,
        bandwidth_mbit: settings.bandwidth_mbit,
        timeout_s: settings.timeout_s,
        on_timeout: ferry_api::OnTimeout::Cancel,
        migration_id: id.into(),
        tls: encrypted.then(|| ferry_api::MigrationTls {
            dir: crate::security::tls_dir(&d.state.root),
            peer: to.into(),
        }),
        // Post-copy commits as the guest starts on the destination: from then on the
        // destination's daemon owns the VM (see `follow`), this VMM only serves its pages.
        mode: settings.mode,
        postcopy_recovery_s: settings.postcopy_recovery_s,
        compression: ferry_api::Compression::Auto,
        delta_cache_mib: 0,
        // Encryption on one core bounds one connection well below a fast link (see
        // docs/benchmarks.md, "Several connections"); plaintext fills it alone.
        channels: match settings.channels {
            0 if encrypted => 2,
            0 => 1,
            n => n,
        },
    }
}

/// `POST /v1/moves/forecast`: what moving `req.vm` to `req.to` with `req.settings` would do,
/// moving nothing. The check first (a failed one is the answer); then the destination answers
/// link probes on the address and with the encryption a move would use, while this host's VMM
/// samples the guest's dirty rate and plays the move forward (`ferry vmm migrate --forecast`).
pub async fn forecast(
    d: &Arc<Daemon>,
    req: &MoveRequest,
) -> ApiResult<ferry_api::MigrationForecast> {
    if req.to.is_empty() || req.to == d.name || req.storage_to.is_some() || !req.disk_to.is_empty()
    {
        return Err(ApiError::bad_request(
            "a forecast is for moving a VM's memory to another host (--to HOST, no disks)",
        ));
    }
    let report = check::check_move(d, &req.vm, &req.to, None, &[]).await?;
    if !report.ok {
        return Err(ApiError::check_failed(report));
    }
    let (to_name, to_addr) = d.resolve_host(&req.to)?;
    let dest = d.client_for(&to_name, &to_addr);
    let ask = check::incoming_request(d, &req.vm)?;
    let r: IncomingReply = dest
        .post("/v1/incoming/probe", &ask)
        .await
        .map_err(|e| ApiError::internal(format!("{to_name} would not answer the forecast: {e}")))?;
    let settings = vmm_settings(d, &req.settings, r.listen, "", r.encrypted, &to_name);
    let api = d.run_dir(&req.vm).api();
    let ask = Request::MigrateForecast {
        settings,
        sample_ms: 3000,
    };
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        let mut st = vmm::open(&api, &ask).await?;
        st.next().await.unwrap_or(Err(vmm::VmmError::NoAnswer))
    })
    .await
    .map_err(|_| {
        ApiError::internal(format!(
            "{}'s VMM did not answer the forecast in 60 s",
            req.vm
        ))
    })?
    .map_err(|e| ApiError::internal(format!("asking {}'s VMM: {e}", req.vm)))?;
    match answer {
        Response::Ok(ResponseBody::Forecast(f)) => Ok(f),
        Response::Error(e) => Err(ApiError::conflict(format!("the forecast failed: {e}"))),
        other => Err(ApiError::internal(format!(
            "{}'s VMM answered {other:?}",
            req.vm
        ))),
    }
}

/// Post-copy began: hand `vm`'s shared disks' write leases over to `to` now (once).
fn hand_over_leases(d: &Arc<Daemon>, id: &str, vm: &str, to: &str) {
    let (config, grant) = {
        let mut g = d.lock();
        let Some(m) = g.outgoing.get_mut(id) else {
            return;
        };
        if std::mem::replace(&mut m.postcopy_began, true) {
            return;
        }
        let grant = m.grant.clone();
        (g.vms.get(vm).map(|v| v.record.config.clone()), grant)
    };
    if let Some(c) = config {
        let (d2, to2) = (d.clone(), to.to_string());
        tokio::spawn(async move { crate::leases::hand_over(&d2, &c, &to2, grant).await });
    }
}

/// Ask the VMM to cancel; false if it would not (the hand-over has begun).
async fn cancel_vmm(api: &std::path::Path) -> bool {
    matches!(
        vmm::call(api, &Request::MigrateCancel).await,
        Ok(Response::Ok(_))
    )
}

/// The hand-over's last answer was lost: ask the destination daemon for the outcome record
/// until it answers, and tell the VMM.
async fn settle_with(dest: Client, id: String, api: std::path::PathBuf) {
    loop {
        match dest
            .post::<_, SettleReply>(&format!("/v1/incoming/{id}/settle"), &serde_json::json!({}))
            .await
        {
            Ok(r) => {
                tracing::info!("move {id}: the destination's record says {:?}", r.outcome);
                match vmm::call(&api, &Request::MigrateResolve { outcome: r.outcome }).await {
                    Ok(_) => return,
                    Err(e) => tracing::warn!("move {id}: telling the VMM: {e}"),
                }
            }
            Err(e) => tracing::warn!("move {id}: settling with the destination: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tell the destination to drop a move that failed here (best effort: its own watch cleans
/// up too).
async fn abort_remote(dest: &Client, id: &str) {
    if let Err(e) = dest
        .post::<_, IncomingInfo>(&format!("/v1/incoming/{id}/abort"), &serde_json::json!({}))
        .await
    {
        tracing::debug!("move {id}: abort at the destination: {e}");
    }
}

/// The VMM ended during a move: where is the guest? Only the destination's record can say.
async fn vmm_gone(
    d: &Arc<Daemon>,
    id: &str,
    vm: &str,
    dest: &Client,
    last: Option<MigrationProgress>,
) -> Ending {
    let run = d.run_dir(vm);
    // Let the monitor record the exit.
    for _ in 0..100 {
        if run.exit().exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exit = vmm::exit_info(&run);
    let migrated = exit
        .as_ref()
        .and_then(|e| e.reason.as_deref())
        .is_some_and(|r| r == "MigratedAway");
    loop {
        match dest
            .post::<_, SettleReply>(&format!("/v1/incoming/{id}/settle"), &serde_json::json!({}))
            .await
        {
            Ok(r) if r.outcome == Outcome::Committed => {
                return Ending {
                    state: MoveState::Done,
                    error: (!migrated).then(|| "the source VMM ended before it reported; the destination's record says committed".into()),
                    progress: last,
                }
            }
            Ok(_) => {
                let why = exit.map(|e| e.status).unwrap_or_else(|| "ended".into());
                return Ending::failed(format!(
                    "{vm}'s VMM on {} ended during the move ({why}) and the move did not commit: the VM is stopped here",
                    d.name
                ));
            }
            Err(e) => {
                tracing::warn!("move {id}: asking the destination: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Record how a move ended; a VM that left is removed from here.
async fn finish(d: &Arc<Daemon>, id: &str, e: Ending) {
    let Some((vm, to, started, queued_ms, encrypted, auth, grant)) =
        d.lock().outgoing.get(id).map(|m| {
            (
                m.info.vm.clone(),
                m.info.to.clone(),
                m.started,
                m.queued_ms,
                m.encrypted,
                m.auth.clone(),
                m.grant.clone(),
            )
        })
    else {
        return;
    };
    tracing::debug!("move {id}: the VMM reported {:?}", e.state);
    let lost = e.state != MoveState::Done
        && (e.progress.as_ref().is_some_and(|p| p.guest_lost)
            || d.lock().outgoing.get(id).is_some_and(|m| m.postcopy_began));
    let mut e = e;
    if lost {
        // Post-copy broke past its limit: the guest ran on the destination since the hand-over
        // and cannot go on there without the pages it lacked; the copy here is older than
        // what it wrote since, so it must never run. The VM's definition is the destination's.
        let why = e.error.take().unwrap_or_default();
        let why = why
            .split("; the guest cannot go on")
            .next()
            .unwrap_or_default();
        e.error = Some(format!(
            "post-copy could not finish ({why}): {vm} ran on {to} since the hand-over and cannot \
             go on there without the pages it lacked, so it is lost; its older copy here was \
             stopped, since it must never run (see docs/migration.md, \"Post-copy\")"
        ));
        tracing::error!("move {id}: {}", e.error.as_deref().unwrap_or_default());
        d.lock().vms.remove(&vm);
        let run = d.run_dir(&vm);
        if let Err(err) = vmm::call(&run.api(), &Request::Quit).await {
            tracing::warn!("move {id}: asking {vm}'s old VMM to quit: {err}");
        }
        // It must end, one way or the other: a copy that must never run, holding its memory.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = vmm::running_pid(&run) {
            if Instant::now() >= deadline {
                tracing::warn!("move {id}: {vm}'s old VMM (pid {pid}) did not quit; killing it");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let (d2, vm2) = (d.clone(), vm.clone());
        tokio::spawn(async move { forget(&d2, &vm2).await });
    }
    if e.state == MoveState::Done {
        // The guest runs on the destination: the VM is not this host's any more. Its VMM exits
        // on its own; its files go once it has.
        let config = d.lock().vms.remove(&vm).map(|v| v.record.config);
        let handed = d.lock().outgoing.get(id).is_some_and(|m| m.postcopy_began);
        if let (Some(c), false) = (config, handed) {
            // The destination takes the disks' write leases once they are handed over.
            let (d2, to2) = (d.clone(), to.clone());
            tokio::spawn(async move { crate::leases::hand_over(&d2, &c, &to2, grant).await });
        }
        let (d2, vm2) = (d.clone(), vm.clone());
        tokio::spawn(async move { forget(&d2, &vm2).await });
    }
    if e.state != MoveState::Done && !lost {
        // It was paused for the switch-over: show it as it is now.
        d.refresh(&vm).await;
    }
    let p = e.progress.clone().unwrap_or_default();
    let disks = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| m.disk_reports.clone())
        .unwrap_or_default();
    let report = MoveReport {
        vm: vm.clone(),
        from: d.name.clone(),
        to: to.clone(),
        result: match e.state {
            MoveState::Done => "done",
            MoveState::Cancelled => "cancelled",
            _ => "failed",
        }
        .into(),
        total_ms: if p.elapsed_ms > 0 && disks.is_empty() {
            p.elapsed_ms
        } else {
            started.elapsed().as_millis() as u64
        },
        downtime_ms: p.downtime_ms,
        bytes: p.bytes_sent,
        rounds: if e.progress.is_some() { p.round + 1 } else { 0 },
        queued_ms,
        error: e.error.clone(),
        runs_on: if e.state == MoveState::Done {
            to.clone()
        } else if lost {
            "nowhere (lost in post-copy)".into()
        } else {
            d.name.clone()
        },
        encrypted: encrypted && e.progress.is_some(),
        auth: (!auth.is_empty()).then_some(auth),
        disks,
        migration: e.progress.clone(),
    };
    set_slot(d, id, false);
    let info = update(d, id, |i| {
        i.state = e.state;
        i.error = e.error.clone();
        i.report = Some(report.clone());
        i.waiting_for = None;
    });
    persist(d, id, e.state, Some(report));
    tracing::debug!("move {id}: recorded as {:?}", e.state);
    match e.state {
        MoveState::Done => tracing::info!("move {id}: {vm} runs on {to} now"),
        s => tracing::warn!(
            "move {id} of {vm} to {to}: {s:?}: {}",
            info.and_then(|i| i.error).unwrap_or_default()
        ),
    }
}

/// Remove the files of a VM that moved away, once its VMM has ended.
async fn forget(d: &Daemon, vm: &str) {
    let run = d.run_dir(vm);
    for _ in 0..400 {
        if vmm::running_pid(&run).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Unless it came back meanwhile (a new definition, arriving or owned): checked and removed
    // under the lock, so a move back that creates the directory again cannot come in between.
    // Its monitor may still be writing the exit record as the VMM ends: a second try then.
    let dir = d.state.vm_dir(vm);
    for last in [false, true] {
        {
            let g = d.lock();
            if g.vms.contains_key(vm) {
                return;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => return,
                Err(err) if last => {
                    tracing::warn!("removing {vm}'s definition after its move: {err}");
                    return;
                }
                Err(_) => drop(g),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `POST /v1/moves/{id}/cancel`.
pub fn cancel(d: &Daemon, id: &str) -> ApiResult<MoveInfo> {
    let g = d.lock();
    let m = g
        .outgoing
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("{} knows no move {id}", d.name)))?;
    if m.info.state.is_final() {
        return Err(ApiError::conflict(format!(
            "move {id} has ended ({:?})",
            m.info.state
        )));
    }
    if matches!(m.info.state, MoveState::Settling) {
        return Err(ApiError::conflict(format!(
            "move {id} is past the point of no return: the hand-over is being settled"
        )));
    }
    m.cancel.store(true, Ordering::SeqCst);
    m.cancelled.notify_waiters();
    m.cancelled.notify_one();
    Ok(m.info.clone())
}

pub fn get(d: &Daemon, id: &str) -> ApiResult<MoveInfo> {
    d.lock()
        .outgoing
        .get(id)
        .map(|m| m.info.clone())
        .ok_or_else(|| ApiError::not_found(format!("{} knows no move {id}", d.name)))
}

pub fn list(d: &Daemon) -> Vec<MoveInfo> {
    let mut v: Vec<MoveInfo> = d.lock().outgoing.values().map(|m| m.info.clone()).collect();
    v.sort_by_key(|m| m.created_ms);
    v
}

/// Follow a move's changes.
pub fn subscribe(d: &Daemon, id: &str) -> ApiResult<watch::Receiver<MoveInfo>> {
    d.lock()
        .outgoing
        .get(id)
        .map(|m| m.tx.subscribe())
        .ok_or_else(|| ApiError::not_found(format!("{} knows no move {id}", d.name)))
}

/// `POST /v1/evacuate`: a move for every running VM, to the destination with the most room
/// whose check passes; the VMs no destination takes are listed with the reasons. Only from the
/// host's own console: an evacuation moves VMs no single grant names.
pub async fn evacuate(
    d: &Arc<Daemon>,
    req: EvacuateRequest,
    peer: &Peer,
) -> ApiResult<EvacuateInfo> {
    let auth = match peer {
        Peer::Local { uid: 0 } => format!("console: a local admin on {} (evacuation)", d.name),
        Peer::Insecure(_) if d.security.is_none() => "no cluster (insecure)".to_string(),
        p => {
            let e = forbidden(
                "console_only",
                format!(
                    "an evacuation of {} is started from its own console, not by {}: run `ferry host evacuate` on {} (or move VMs one by one with grants)",
                    d.name,
                    p.describe(),
                    d.name
                ),
            );
            crate::audit::record(&d.state.root, peer, "evacuate", Some(&e.body.error), None);
            return Err(e);
        }
    };
    crate::audit::record(&d.state.root, peer, "evacuate", None, Some(&auth));
    if !d.lock().settings.live_migration {
        return Err(ApiError::migration_disabled(&d.name));
    }
    let targets: Vec<String> = if req.to.is_empty() {
        d.peers.keys().cloned().collect()
    } else {
        req.to.clone()
    };
    if targets.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} knows no other host to evacuate to; name some with --to",
            d.name
        )));
    }
    for t in &targets {
        d.resolve_host(t)?;
    }
    let running: Vec<(String, u64)> = d
        .vms()
        .into_iter()
        .filter(|v| v.state == VmState::Running)
        .map(|v| (v.name, v.config.memory_mib))
        .collect();
    // Memory each destination is already promised by this evacuation.
    let mut planned: std::collections::BTreeMap<String, u64> = Default::default();
    let mut moves = Vec::new();
    let mut skipped = Vec::new();
    for (vm, mem) in running {
        let mut best: Option<(i64, String, CheckReport)> = None;
        let mut reasons = Vec::new();
        for t in &targets {
            match check::check_move(d, &vm, t, None, &[]).await {
                Ok(r) if r.ok => {
                    let free = free_memory(&r) as i64 - *planned.get(t).unwrap_or(&0) as i64;
                    if free >= mem as i64 && best.as_ref().is_none_or(|b| free > b.0) {
                        best = Some((free, t.clone(), r));
                    } else if free < mem as i64 {
                        reasons.push(format!(
                            "{t}: not enough memory left after the other VMs of this evacuation"
                        ));
                    }
                }
                Ok(r) => reasons.push(format!(
                    "{t}: {}",
                    r.checks
                        .iter()
                        .filter(|c| !c.ok)
                        .map(|c| c.detail.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
                Err(e) => reasons.push(format!("{t}: {e}")),
            }
        }
        match best {
            Some((_, t, report)) => {
                *planned.entry(t.clone()).or_default() += mem;
                let r = MoveRequest {
                    vm: vm.clone(),
                    to: t,
                    settings: req.settings.clone(),
                    grant: None,
                    storage_to: None,
                    disk_to: Vec::new(),
                    keep_source: false,
                };
                match begin(d, &r, report, auth.clone(), Vec::new()) {
                    Ok(m) => moves.push(m),
                    Err(e) => skipped.push(Skipped {
                        vm,
                        reason: e.to_string(),
                    }),
                }
            }
            None => skipped.push(Skipped {
                vm,
                reason: reasons.join(" | "),
            }),
        }
    }
    Ok(EvacuateInfo { moves, skipped })
}

/// The free memory a destination reported in a check ("... can give VMs N MiB more").
fn free_memory(r: &CheckReport) -> u64 {
    r.checks
        .iter()
        .find(|c| c.name == "memory")
        .and_then(|c| c.detail.split("can give VMs ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// After a daemon restart: pick up every move that was under way.
pub fn recover(d: &Arc<Daemon>) {
    for e in std::fs::read_dir(d.state.moves_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if !name.ends_with(".json")
            || name.ends_with(".in.json")
            || name.ends_with(".storage.json")
            || name.ends_with(".targets.json")
            || name.ends_with(".remote.json")
        {
            continue;
        }
        let Ok(Some(r)) = state::read_json::<MoveRecord>(&p) else {
            continue;
        };
        let info = MoveInfo {
            id: r.id.clone(),
            vm: r.vm.clone(),
            from: d.name.clone(),
            to: r.to.clone(),
            state: if r.state.is_final() {
                r.state
            } else {
                MoveState::Migrating
            },
            waiting_for: None,
            progress: None,
            storage: Vec::new(),
            check: None,
            report: r.report.clone(),
            error: r.report.as_ref().and_then(|r| r.error.clone()),
            created_ms: r.created_ms,
        };
        if r.state == MoveState::Done {
            // A VM that left before the daemon could remove its files: they go now (not a VM
            // that came back since, which has a newer definition).
            let stale = d.lock().vms.get(&r.vm).is_some_and(|v| {
                v.record.created_ms <= r.created_ms && v.record.incoming.is_none()
            });
            if stale && vmm::running_pid(&d.run_dir(&r.vm)).is_none() {
                tracing::info!(
                    "{} moved to {} (move {}): removing what was left of it",
                    r.vm,
                    r.to,
                    r.id
                );
                d.lock().vms.remove(&r.vm);
                let _ = std::fs::remove_dir_all(d.state.vm_dir(&r.vm));
            }
        }
        let (tx, _) = watch::channel(info.clone());
        let live = !r.state.is_final();
        d.lock().outgoing.insert(
            r.id.clone(),
            OutMove {
                info,
                tx,
                cancel: Arc::new(AtomicBool::new(false)),
                cancelled: Arc::new(Notify::new()),
                to_addr: r.to_addr.clone(),
                settings: MoveSettings::default(),
                holds_slot: live,
                started: Instant::now(),
                queued_ms: 0,
                grant: None,
                auth: String::new(),
                encrypted: r.report.as_ref().is_some_and(|x| x.encrypted),
                storage_only: false,
                disk_reports: Vec::new(),
                disks_to: Vec::new(),
                keep_source: false,
                postcopy_began: false,
            },
        );
        if live {
            tracing::info!(
                "picking up move {} of {} to {} after a restart",
                r.id,
                r.vm,
                r.to
            );
            tokio::spawn(resume(d.clone(), r));
        }
    }
    let mut g = d.lock();
    prune(&mut g);
}

/// Finish a move this daemon was driving before it restarted: follow the VMM through its
/// status (the progress stream went with the old daemon), settle with the destination.
async fn resume(d: Arc<Daemon>, r: MoveRecord) {
    let id = r.id.clone();
    let dest = d
        .client_for(&r.to, &r.to_addr)
        .with_timeout(Duration::from_secs(15));
    let api = d.run_dir(&r.vm).api();
    let mut settling = false;
    let ending = loop {
        if vmm::running_pid(&d.run_dir(&r.vm)).is_none() {
            break vmm_gone(&d, &id, &r.vm, &dest, None).await;
        }
        match vmm::call(&api, &Request::MigrationStatus).await {
            Ok(Response::Ok(ResponseBody::Migration(p))) if p.migration_id != id => {
                // The VMM's last migration is an older one: this move never reached it.
                abort_remote(&dest, &id).await;
                break Ending::failed(
                    "the move never started (the daemon stopped before the VMM began sending)",
                );
            }
            Ok(Response::Ok(ResponseBody::Migration(p))) => {
                update(&d, &id, |i| i.progress = Some(p.clone()));
                match p.phase {
                    MigrationPhase::Done => {
                        break Ending {
                            state: MoveState::Done,
                            error: None,
                            progress: Some(p),
                        }
                    }
                    MigrationPhase::Failed | MigrationPhase::Cancelled => {
                        abort_remote(&dest, &id).await;
                        break Ending {
                            state: MoveState::Failed,
                            error: p.error.clone(),
                            progress: Some(p),
                        };
                    }
                    MigrationPhase::InDoubt if !settling => {
                        settling = true;
                        tokio::spawn(settle_with(dest.clone(), id.clone(), api.clone()));
                    }
                    _ => {}
                }
            }
            Ok(Response::Error(e)) => {
                // The VMM never started this migration (the old daemon stopped first).
                abort_remote(&dest, &id).await;
                break Ending::failed(format!("the move never started: {e}"));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    finish(&d, &id, ending).await;
}
