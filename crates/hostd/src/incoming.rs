//! A move arriving here, and the one place that decides who owns a VM.
//!
//! A VM arriving by move `id` is defined here from the start (`vm.json` with `incoming: id`)
//! but is **not this host's** until the move's outcome record (`moves/<id>.outcome`, see
//! `ferry_migration::outcome`) says committed. That record is written exactly once: by the
//! receiving VMM just before it resumes the guest (committed), or by whoever gives up first
//! (aborted): the VMM when its source goes away before Commit, or this daemon when asked to
//! settle. Whatever the source host believes, this file is the truth about the move, and both
//! daemons defer to it: the source drops its paused copy only when it says committed, and
//! resumes only when it says aborted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::host::{IncomingInfo, IncomingReply, IncomingRequest, IncomingState, SettleReply};
use ferry_api::Outcome;
use ferry_migration::OutcomeRecord;
use serde::{Deserialize, Serialize};

use axum::http::StatusCode;
use ferry_api::host::MigrationAuth;

use crate::check;
use crate::daemon::{reap, Daemon, Live, VmEntry, VmRecord};
use crate::error::{ApiError, ApiResult};
use crate::state;
use crate::transport::Peer;
use crate::vmm;

/// An arriving move, in memory.
#[derive(Debug, Clone)]
pub struct InMove {
    pub id: String,
    pub vm: String,
    pub from: String,
    pub state: IncomingState,
    pub since: Instant,
    pub grant: Option<String>,
}

impl InMove {
    /// Whether it takes one of this host's migration slots.
    pub fn active(&self) -> bool {
        self.state == IncomingState::Receiving
    }

    pub fn info(&self) -> IncomingInfo {
        IncomingInfo {
            move_id: self.id.clone(),
            vm: self.vm.clone(),
            from: self.from.clone(),
            state: self.state,
        }
    }
}

/// What the state directory keeps of an arriving move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRecord {
    pub id: String,
    pub vm: String,
    pub from: String,
    pub state: IncomingState,
    pub created_ms: u64,
    /// A delegated move's grant: the file server wants it to hand the disks' leases over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// The outcome record of move `id` on this host.
pub fn record(d: &Daemon, id: &str) -> OutcomeRecord {
    OutcomeRecord::File(d.state.outcome_record(id))
}

/// Settle move `id` now: committed if the destination VMM committed it, else aborted for good
/// (a receiving VMM that has not committed yet will then refuse Commit).
pub fn settle(d: &Daemon, id: &str, by: &str) -> ApiResult<Outcome> {
    let o = record(d, id)
        .decide(id, Outcome::Aborted, by)
        .map_err(|e| ApiError::internal(ferry_vmm::error_chain(&e)))?;
    tracing::info!("move {id} settled: {o:?} ({by})");
    Ok(o)
}

/// Whether `req` may arrive from `peer`: the source host itself (by its certificate), and in
/// delegated mode only inside a valid, unused grant. Returns how it was authorised.
fn authorise(d: &Daemon, req: &IncomingRequest, peer: &Peer) -> ApiResult<String> {
    if d.security.is_none() {
        return Ok("no cluster (insecure)".into());
    }
    let from = &req.check.from;
    match peer {
        Peer::Cert { identity, .. } if crate::security::is_host(identity, from) => {}
        Peer::Cert { identity, .. } => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{identity} may not send a VM in the name of host {from}"),
            ))
        }
        p => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "only a host of the cluster may send VMs here, not {}",
                    p.describe()
                ),
            ))
        }
    }
    if d.lock().settings.migration_auth != MigrationAuth::Delegated {
        return Ok(format!(
            "console mode; source {from} is in the migration group"
        ));
    }
    check_grant(d, &req.move_id, req.grant.as_deref(), &req.check, true)?
        .map(|(jti, admin)| format!("grant {jti} signed by {admin}"))
        .ok_or_else(|| ApiError::internal("no grant checked"))
}

/// `POST /v1/incoming/probe`: answer a forecast's link probes for the move `req` describes, on
/// the address a move would take and with its encryption, for 30 s. No receiving VMM, no slot,
/// no grant used: nothing is received. Only the source host itself may ask.
pub fn probe(
    d: &Arc<Daemon>,
    req: &ferry_api::host::IncomingCheck,
    peer: &Peer,
) -> ApiResult<IncomingReply> {
    let what = format!("answer a forecast for {} from {}", req.vm, req.from);
    let r = probe_authorised(d, req, peer);
    crate::audit::record(
        &d.state.root,
        peer,
        &what,
        r.as_ref().err().map(|e| e.body.error.as_str()),
        None,
    );
    r
}

fn probe_authorised(
    d: &Arc<Daemon>,
    req: &ferry_api::host::IncomingCheck,
    peer: &Peer,
) -> ApiResult<IncomingReply> {
    if d.security.is_some() {
        match peer {
            Peer::Cert { identity, .. } if crate::security::is_host(identity, &req.from) => {}
            p => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "only host {} may forecast its move, not {}",
                        req.from,
                        p.describe()
                    ),
                ))
            }
        }
    }
    let ip = check::incoming_ip(d, req)?;
    let listener = std::net::TcpListener::bind((ip.as_str(), 0))
        .map_err(|e| ApiError::internal(format!("cannot listen on {ip}: {e}")))?;
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let plaintext = plaintext(d, &ip, req);
    let tls = if plaintext {
        None
    } else {
        Some(
            ferry_vmm::migration::transport::MigrationTls::load(
                &crate::security::tls_dir(&d.state.root),
                &req.from,
            )
            .map_err(|e| ApiError::internal(format!("loading this host's TLS credentials: {e}")))?,
        )
    };
    std::thread::Builder::new()
        .name("forecast".into())
        .spawn(move || {
            ferry_vmm::migration::receive::answer_forecasts(listener, tls, Duration::from_secs(30))
        })
        .map_err(|e| ApiError::internal(format!("cannot start the probe answerer: {e}")))?;
    tracing::info!(
        "answering a forecast for {} from {} on {listen}",
        req.vm,
        req.from
    );
    Ok(IncomingReply {
        listen,
        encrypted: !plaintext,
    })
}

/// Whether a move arriving on migration address `ip` goes in the clear (its memory stream and
/// a shared-nothing move's disk copies): only where both hosts trust the network for it, or
/// outside a cluster.
pub fn plaintext(d: &Daemon, ip: &str, check: &ferry_api::host::IncomingCheck) -> bool {
    let trusted = |nets: &[String]| {
        let nets = crate::hostinfo::parse_nets(nets).unwrap_or_default();
        ip.parse()
            .is_ok_and(|a| !nets.is_empty() && crate::hostinfo::allowed(&nets, a))
    };
    d.security.is_none()
        || (trusted(&d.lock().settings.plaintext_migration_networks)
            && trusted(&check.plaintext_networks))
}

/// In delegated mode, whether `token` is an admin's grant for exactly this move (VM, source,
/// destination, every disk; a disk a shared-nothing move copied here counts by its source
/// path). `spend` uses it up (the move itself); a grant works once. Returns its id and admin;
/// `None` outside delegated mode, where no grant is needed.
pub fn check_grant(
    d: &Daemon,
    move_id: &str,
    token: Option<&str>,
    check: &ferry_api::host::IncomingCheck,
    spend_it: bool,
) -> ApiResult<Option<(String, String)>> {
    let Some(sec) = &d.security else {
        return Ok(None);
    };
    if d.lock().settings.migration_auth != MigrationAuth::Delegated {
        return Ok(None);
    }
    let from = &check.from;
    let token = token.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "grant_required",
            format!(
                "{} takes moves only with an admin's grant (migration auth: delegated); move with `ferry move` as an admin",
                d.name
            ),
        )
    })?;
    let refuse = |m: String| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "grant_refused",
            format!("grant refused: {m}"),
        )
    };
    let (g, admin) = ferry_auth::grant::verify(token, &sec.trust).map_err(|e| {
        refuse(
            e.to_string()
                .trim_start_matches("grant refused: ")
                .to_string(),
        )
    })?;
    if g.to != d.name {
        return Err(refuse(format!(
            "it is for a move to {}, not to {}",
            g.to, d.name
        )));
    }
    if &g.from != from {
        return Err(refuse(format!(
            "it is for a move from {}, not from {from}",
            g.from
        )));
    }
    if g.vm != check.vm {
        return Err(refuse(format!("it is for VM {}, not {}", g.vm, check.vm)));
    }
    for disk in &check.config.disks {
        let p = disk.path.display().to_string();
        let copied = crate::targets::source_of(d, move_id, &disk.path);
        if !g.disks.contains(&p) && !copied.is_some_and(|s| g.disks.contains(&s)) {
            return Err(refuse(format!("it does not name disk {p}")));
        }
    }
    if spend_it {
        spend(d, &g.jti, g.exp).map_err(refuse)?;
    }
    Ok(Some((g.jti, admin.to_string())))
}

static GRANTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Spend a grant's id: refused if it was seen before (kept until it expires).
fn spend(d: &Daemon, jti: &str, exp: i64) -> Result<(), String> {
    let _g = GRANTS.lock().unwrap_or_else(|e| e.into_inner());
    let path = d.state.root.join("grants-used.json");
    let mut used: std::collections::BTreeMap<String, i64> =
        state::read_json(&path).ok().flatten().unwrap_or_default();
    let now = (vmm::now_ms() / 1000) as i64;
    used.retain(|_, e| *e + 60 > now);
    if used.contains_key(jti) {
        return Err(format!("grant {jti} was used already; a grant works once"));
    }
    used.insert(jti.into(), exp);
    state::write_json(&path, &used).map_err(|e| e.to_string())
}

/// `POST /v1/incoming`: check, take a slot, define the VM as arriving, start a VMM that
/// receives it on a fresh port of the migration network.
pub async fn start(d: &Arc<Daemon>, req: IncomingRequest, peer: &Peer) -> ApiResult<IncomingReply> {
    let what = format!(
        "receive {} from {} (move {})",
        req.check.vm, req.check.from, req.move_id
    );
    let auth = match authorise(d, &req, peer) {
        Ok(a) => a,
        Err(e) => {
            crate::audit::record(&d.state.root, peer, &what, Some(&e.body.error), None);
            return Err(e);
        }
    };
    let r = start_authorised(d, req).await;
    crate::audit::record(
        &d.state.root,
        peer,
        &what,
        r.as_ref().err().map(|e| e.body.error.as_str()),
        Some(&auth),
    );
    r
}

async fn start_authorised(d: &Arc<Daemon>, req: IncomingRequest) -> ApiResult<IncomingReply> {
    let id = req.move_id.clone();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request(format!("{id:?} is not a move id")));
    }
    let vm = req.check.vm.clone();
    if !ferry_api::host::valid_vm_name(&vm) {
        return Err(ApiError::bad_request(format!("{vm:?} is not a VM name")));
    }
    if !d.lock().settings.live_migration {
        return Err(ApiError::migration_disabled(&d.name));
    }
    if record(d, &id).get(&id).ok().flatten().is_some() {
        return Err(ApiError::conflict(format!(
            "move {id} was already decided on {}",
            d.name
        )));
    }
    let reply = check::incoming(d, &req.check);
    if let Some(bad) = reply.checks.iter().find(|c| !c.ok) {
        let report = ferry_api::host::CheckReport {
            vm: vm.clone(),
            from: req.check.from.clone(),
            to: d.name.clone(),
            ok: false,
            checks: reply.checks.clone(),
        };
        tracing::info!("refusing move {id} of {vm}: {}", bad.detail);
        return Err(ApiError::check_failed(report));
    }
    let ip = reply
        .listen_ip
        .ok_or_else(|| ApiError::internal("no migration address chosen"))?;
    let run = d.run_dir(&vm);
    // A VM that just moved away from here may come straight back: its old VMM (sharing the
    // run directory) must have ended before a receiver takes the directory over.
    let deadline = Instant::now() + Duration::from_secs(5);
    while vmm::running_pid(&run).is_some() && !d.lock().vms.contains_key(&vm) {
        if Instant::now() > deadline {
            return Err(ApiError::conflict(format!(
                "{vm}'s previous VMM on {} is still ending; try again in a moment",
                d.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let mut g = d.lock();
        let active = d.move_counts(&g);
        let in_use = active.outgoing + active.incoming;
        if in_use >= g.settings.max_migrations {
            return Err(ApiError::busy(format!(
                "{} runs {in_use} of {} live migrations at once; the move waits for a free slot",
                d.name, g.settings.max_migrations
            )));
        }
        if g.vms.contains_key(&vm) {
            return Err(ApiError::conflict(format!(
                "{} already has a VM named {vm}",
                d.name
            )));
        }
        let dir = d.state.vm_dir(&vm);
        std::fs::create_dir_all(&run.0)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        let mut config = req.check.config.clone();
        config.serial = ferry_api::SerialBackend::Unix(run.con());
        config.serial2 = ferry_api::SerialBackend::Unix(run.con2());
        let rec = VmRecord {
            name: vm.clone(),
            config,
            created_ms: vmm::now_ms(),
            incoming: Some(id.clone()),
            cpu_features: req.check.cpu_features.clone(),
            origin: Some(format!("moved from {} (move {id})", req.check.from)),
        };
        state::write_json(&d.state.vm_record(&vm), &rec)?;
        state::write_json(
            &d.state.incoming_record(&id),
            &IncomingRecord {
                id: id.clone(),
                vm: vm.clone(),
                from: req.check.from.clone(),
                state: IncomingState::Receiving,
                created_ms: vmm::now_ms(),
                grant: req.grant.clone(),
            },
        )?;
        g.vms.insert(
            vm.clone(),
            VmEntry {
                record: rec,
                live: Live::default(),
            },
        );
        g.incoming.insert(
            id.clone(),
            InMove {
                id: id.clone(),
                vm: vm.clone(),
                from: req.check.from.clone(),
                state: IncomingState::Receiving,
                since: Instant::now(),
                grant: req.grant.clone(),
            },
        );
    }
    let fail = |d: &Arc<Daemon>, msg: String| {
        let _ = settle(d, &id, "host daemon: receiver did not start");
        cleanup(d, &id);
        ApiError::internal(msg)
    };
    let listener = match std::net::TcpListener::bind((ip.as_str(), 0)) {
        Ok(l) => l,
        Err(e) => return Err(fail(d, format!("cannot listen on {ip}: {e}"))),
    };
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let plaintext = plaintext(d, &ip, &req.check);
    let mut args: Vec<std::ffi::OsString> = vec![
        "vmm".into(),
        "receive".into(),
        "--listen-fd".into(),
        "3".into(),
        "--expect-id".into(),
        id.clone().into(),
        "--record".into(),
        d.state.outcome_record(&id).into_os_string(),
        "--timeout".into(),
        "60".into(),
        "--api".into(),
        run.api().into_os_string(),
        "--serial".into(),
        format!("unix:{}", run.con().display()).into(),
        "--serial2".into(),
        format!("unix:{}", run.con2().display()).into(),
    ];
    // Disks a shared-nothing move copied here are not where the source has them.
    for (i, disk) in req.check.config.disks.iter().enumerate() {
        if crate::targets::source_of(d, &id, &disk.path).is_some() {
            args.push("--disk-path".into());
            args.push(format!("{i}={}", disk.path.display()).into());
        }
    }
    if !plaintext {
        args.extend([
            "--tls-dir".into(),
            crate::security::tls_dir(&d.state.root).into_os_string(),
            "--expect-peer".into(),
            req.check.from.clone().into(),
        ]);
    }
    match vmm::spawn(
        &d.ferry,
        &run,
        args,
        Some(std::os::fd::OwnedFd::from(listener)),
    ) {
        Ok(child) => reap(child),
        Err(e) => return Err(fail(d, format!("cannot start the receiving VMM: {e}"))),
    }
    tracing::info!(
        "receiving {vm} from {} (move {id}) on {listen}",
        req.check.from
    );
    tokio::spawn(watch(d.clone(), id));
    Ok(IncomingReply {
        listen,
        encrypted: !plaintext,
    })
}

/// Follow an arriving move until its outcome is decided, then make it so: the VM becomes this
/// host's, or every trace of it goes.
pub async fn watch(d: Arc<Daemon>, id: String) {
    let Some(vm) = d.lock().incoming.get(&id).map(|m| m.vm.clone()) else {
        return;
    };
    let run = d.run_dir(&vm);
    let started = Instant::now();
    loop {
        match record(&d, &id).get(&id) {
            Ok(Some(Outcome::Committed)) => {
                commit(&d, &id, &vm);
                let (config, grant) = {
                    let g = d.lock();
                    (
                        g.vms.get(&vm).map(|v| v.record.config.clone()),
                        g.incoming.get(&id).and_then(|m| m.grant.clone()),
                    )
                };
                if let Some(c) = config {
                    tokio::spawn(crate::leases::acquire_when_free(
                        d.clone(),
                        c,
                        Duration::from_secs(60),
                        grant,
                    ));
                }
                return;
            }
            Ok(Some(Outcome::Aborted)) => {
                // The VMM will not run the guest; it may linger to answer its source.
                if let Some(pid) = vmm::running_pid(&run) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                cleanup(&d, &id);
                return;
            }
            Ok(None) => {
                let ended = run.exit().exists()
                    || (!vmm::started(&run) && started.elapsed() > Duration::from_secs(15));
                if ended {
                    // The receiver is gone without committing: it never will.
                    let _ = settle(&d, &id, "host daemon: receiving VMM ended");
                    continue;
                }
            }
            Err(e) => tracing::warn!("move {id}: {}", ferry_vmm::error_chain(&e)),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The move committed: the VM is this host's from now on.
fn commit(d: &Daemon, id: &str, vm: &str) {
    let mut g = d.lock();
    if let Some(v) = g.vms.get_mut(vm) {
        v.record.incoming = None;
        if let Err(e) = state::write_json(&d.state.vm_record(vm), &v.record) {
            tracing::error!(
                "recording {vm} as this host's: {}",
                ferry_vmm::error_chain(&e)
            );
        }
        // The VMM resumed the guest as it committed.
        v.live.run_state = Some(ferry_api::VmRunState::Running);
        v.live.pid = vmm::running_pid(&d.run_dir(vm));
        if v.live.pid.is_none() {
            v.live.starting = Some(Instant::now());
        }
    }
    if let Some(m) = g.incoming.get_mut(id) {
        m.state = IncomingState::Committed;
        let _ = state::write_json(
            &d.state.incoming_record(id),
            &IncomingRecord {
                id: id.into(),
                vm: vm.into(),
                from: m.from.clone(),
                state: IncomingState::Committed,
                created_ms: vmm::now_ms(),
                grant: m.grant.clone(),
            },
        );
    }
    drop(g);
    crate::targets::settled(d, id, Outcome::Committed);
    tracing::info!("{vm} arrived (move {id}): it runs here now");
    d.moves_changed.notify_waiters();
}

/// The move will never run here: remove the arriving VM's definition and run directory.
fn cleanup(d: &Daemon, id: &str) {
    let mut g = d.lock();
    let Some(m) = g.incoming.get_mut(id) else {
        return;
    };
    m.state = IncomingState::Aborted;
    let vm = m.vm.clone();
    let from = m.from.clone();
    if g.vms
        .get(&vm)
        .is_some_and(|v| v.record.incoming.as_deref() == Some(id))
    {
        g.vms.remove(&vm);
        // The receiving VMM's log goes with its directory: keep why it ended in ours.
        if let Ok(log) = std::fs::read_to_string(d.run_dir(&vm).log()) {
            for l in log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .take(5)
            {
                tracing::warn!("{vm} (move {id}), the receiving VMM: {}", l.trim());
            }
        }
        let _ = std::fs::remove_dir_all(d.state.vm_dir(&vm));
    }
    let _ = state::write_json(
        &d.state.incoming_record(id),
        &IncomingRecord {
            id: id.into(),
            vm: vm.clone(),
            from,
            state: IncomingState::Aborted,
            created_ms: vmm::now_ms(),
            grant: None,
        },
    );
    drop(g);
    crate::targets::settled(d, id, Outcome::Aborted);
    tracing::info!("move {id} of {vm} aborted here; nothing of it is left");
    d.moves_changed.notify_waiters();
}

/// `GET /v1/incoming/{id}`.
pub fn info(d: &Daemon, id: &str) -> ApiResult<IncomingInfo> {
    if let Some(m) = d.lock().incoming.get(id) {
        return Ok(m.info());
    }
    let rec: Option<IncomingRecord> = state::read_json(&d.state.incoming_record(id))?;
    rec.map(|r| IncomingInfo {
        move_id: r.id,
        vm: r.vm,
        from: r.from,
        state: r.state,
    })
    .ok_or_else(|| ApiError::not_found(format!("{} knows no arriving move {id}", d.name)))
}

/// Only the move's source host (or this host's own admin) may settle or abort it.
pub fn may_decide(d: &Daemon, id: &str, peer: &Peer) -> ApiResult<()> {
    let from = info(d, id).map(|i| i.from).ok();
    match (peer, from) {
        (Peer::Local { uid: 0 } | Peer::Insecure(_), _) => Ok(()),
        (Peer::Cert { identity, .. }, Some(f)) if crate::security::is_host(identity, &f) => Ok(()),
        (Peer::Cert { identity, .. }, _) if identity.role == ferry_auth::Role::Admin => Ok(()),
        (p, _) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} may not settle move {id}: only its source host may",
                p.describe()
            ),
        )),
    }
}

/// `POST /v1/incoming/{id}/settle`.
pub fn settle_api(d: &Daemon, id: &str) -> ApiResult<SettleReply> {
    Ok(SettleReply {
        outcome: settle(d, id, "host daemon: settle asked by the source")?,
    })
}

/// `POST /v1/incoming/{id}/abort`: give up a move that has not committed.
pub fn abort(d: &Daemon, id: &str) -> ApiResult<IncomingInfo> {
    match settle(d, id, "host daemon: abort asked by the source")? {
        Outcome::Committed => Err(ApiError::conflict(format!(
            "move {id} has committed: the VM runs on {}",
            d.name
        ))),
        Outcome::Aborted => info(d, id),
    }
}

/// After a daemon restart: pick up every move that was arriving.
pub fn recover(d: &Arc<Daemon>) {
    let mut pending = Vec::new();
    for (_, p) in d.state.records(".in.json") {
        let Ok(Some(r)) = state::read_json::<IncomingRecord>(&p) else {
            continue;
        };
        let m = InMove {
            id: r.id.clone(),
            vm: r.vm.clone(),
            from: r.from.clone(),
            state: r.state,
            since: Instant::now(),
            grant: r.grant.clone(),
        };
        if r.state == IncomingState::Receiving {
            pending.push(r.id.clone());
        }
        d.lock().incoming.insert(r.id, m);
    }
    for id in pending {
        tracing::info!("resuming the watch over arriving move {id}");
        tokio::spawn(watch(d.clone(), id));
    }
}
