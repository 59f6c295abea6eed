//! Storage moves: a running VM's disks moved to another folder of its host or to a share,
//! while the VM stays where it runs (`ferry move VM --storage-to DEST`).
//!
//! ```text
//! Queued --> Checking --> Preparing (the copies are made, empty; a share disk's lease taken)
//!   --> Migrating (the VMM mirrors: guest writes go to both, one pass copies the rest)
//!   --> Switchover (each disk in turn: the VMM flushes the copy and uses it from then on)
//!   --> Done (the VM's definition names the new copies; the old ones are removed)
//! any step before the switch --> Failed | Cancelled: the VM stays on its disks, the copies go
//! ```
//!
//! The VMM does the copying ([`ferry_vmm::mirror`]); this daemon makes and removes the copies,
//! takes and gives up share leases, and records where each disk is. A disk is switched only
//! when its copy is complete, and until then the old copy is the truth: whatever fails, the VM
//! runs on from a disk with every acknowledged write. There is never a second writer: the copy
//! is new and only this VMM writes it.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::host::{
    CheckItem, CheckReport, DiskMoveReport, MoveInfo, MoveReport, MoveRequest, MoveState, VmState,
};
use ferry_api::share::{Access, DiskCreate, DiskInfo, LeaseAction, LeaseRequest, ShareInfo};
use serde::{Deserialize, Serialize};

use ferry_api::{DiskConfig, MirrorProgress, MirrorState, Request, Response, ResponseBody};

use crate::check::item;
use crate::client::Client;
use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::vmm;

/// Whether `req` asks for a storage move only (the VM stays on this host).
pub fn is_storage_only(d: &Daemon, req: &MoveRequest) -> bool {
    (req.storage_to.is_some() || !req.disk_to.is_empty()) && (req.to.is_empty() || req.to == d.name)
}

/// A file server's share, as a destination or a disk's home.
#[derive(Clone)]
pub(crate) struct ShareRef {
    pub server: String,
    pub client: Client,
    pub share: String,
}

impl ShareRef {
    pub fn disk_path(&self, disk: &str) -> String {
        format!("/v1/shares/{}/disks/{disk}", self.share)
    }

    async fn lease(&self, disk: &str, action: LeaseAction) -> Result<DiskInfo, crate::ClientError> {
        self.client
            .post(
                &format!("{}/lease", self.disk_path(disk)),
                &LeaseRequest::new(action),
            )
            .await
    }
}

/// Where one disk goes.
#[derive(Clone)]
enum Dest {
    Folder(PathBuf),
    Share(ShareRef),
}

/// One disk of the move, planned.
#[derive(Clone)]
struct Plan {
    index: usize,
    /// The disk as the VM has it now (path or URI).
    source: DiskConfig,
    /// Its share, when it is on one (for its lease and removal).
    source_share: Option<(ShareRef, String)>,
    dest: Dest,
    /// The new copy's name (file name, or disk name on the share).
    name: String,
    size: u64,
    /// Bytes the source has allocated (what the copy may need at most).
    allocated: u64,
    /// The copy's path or URI, once made.
    target: Option<PathBuf>,
}

impl Plan {
    fn dest_text(&self) -> String {
        match &self.dest {
            Dest::Folder(f) => f.join(&self.name).display().to_string(),
            Dest::Share(s) => format!("{}:{}/{}", s.server, s.share, self.name),
        }
    }
}

/// The file server `server` (or the only one) of this host's cluster, with a client for its API.
fn file_server(d: &Daemon, server: Option<&str>) -> Result<(String, Client), String> {
    let sec = d.security.as_ref().ok_or_else(|| {
        format!(
            "{} is in no cluster: it knows no file servers (storage moves to shares need a cluster; folders on the host work without)",
            d.name
        )
    })?;
    let doc = sec.trust.doc();
    let fs = match server {
        Some(n) => doc
            .file_servers
            .iter()
            .find(|m| m.name == n)
            .ok_or_else(|| {
                format!(
                    "the cluster has no file server {n:?} (it has: {})",
                    names(&doc.file_servers)
                )
            })?,
        None => match doc.file_servers.as_slice() {
            [one] => one,
            [] => {
                return Err(
                    "the cluster has no file server; enrol one with `ferry share join`".into(),
                )
            }
            many => {
                return Err(format!(
                    "the cluster has several file servers ({}): say which, as FILESERVER:SHARE",
                    names(many)
                ))
            }
        },
    };
    Ok((
        fs.name.clone(),
        crate::leases::file_server_client(d, fs, Duration::from_secs(10))?,
    ))
}

fn names(m: &[ferry_auth::doc::Member]) -> String {
    m.iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_dest(d: &Daemon, s: &str) -> Result<Dest, String> {
    if s.starts_with('/') {
        return Ok(Dest::Folder(PathBuf::from(s)));
    }
    if s.is_empty() || s.contains('/') {
        return Err(format!(
            "{s:?} is neither a folder (an absolute path) nor a share (SHARE or FILESERVER:SHARE)"
        ));
    }
    let (server, share) = match s.split_once(':') {
        Some((a, b)) => (Some(a), b),
        None => (None, s),
    };
    let (server, client) = file_server(d, server)?;
    Ok(Dest::Share(ShareRef {
        server,
        client,
        share: share.into(),
    }))
}

/// The share a disk URI points into, if it is one of this cluster's file servers.
pub(crate) fn share_of(d: &Daemon, disk: &DiskConfig) -> Option<(ShareRef, String)> {
    let (fs, share, name) = crate::leases::file_server_of(d, disk.nbd_uri()?)?;
    let client = crate::leases::file_server_client(d, &fs, Duration::from_secs(10)).ok()?;
    Some((
        ShareRef {
            server: fs.name,
            client,
            share,
        },
        name,
    ))
}

/// The last part of a disk's path or URI (`web01.img`, or `web01` of `nbds://.../vms/web01`).
pub(crate) fn file_name(d: &DiskConfig) -> &str {
    d.path
        .to_str()
        .and_then(|s| s.rsplit('/').next())
        .unwrap_or_default()
}

/// Which disk `sel` names: its index, its path or URI, or its file name.
pub(crate) fn select(disks: &[DiskConfig], sel: &str) -> Result<usize, String> {
    if let Ok(i) = sel.parse::<usize>() {
        if i < disks.len() {
            return Ok(i);
        }
    }
    let hits: Vec<usize> = (0..disks.len())
        .filter(|&i| disks[i].path.to_str() == Some(sel) || file_name(&disks[i]) == sel)
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "the VM has no disk {sel:?} (its disks: {})",
            disks
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{i} = {}", d.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => Err(format!("{sel:?} names several disks: give its index")),
    }
}

/// A disk's size and the bytes it has allocated (what a copy may need at most); when they
/// cannot be known, a failed check item `label` says why.
pub(crate) async fn sizes(
    src: &DiskConfig,
    share: Option<&(ShareRef, String)>,
    label: &str,
    checks: &mut Vec<CheckItem>,
) -> Option<(u64, u64)> {
    let r = match (src.nbd_uri(), share) {
        (None, _) => std::fs::metadata(&src.path)
            .map(|m| (m.len(), m.blocks() * 512))
            .map_err(|e| e.to_string()),
        (Some(_), Some((s, n))) => s
            .client
            .get::<DiskInfo>(&s.disk_path(n))
            .await
            .map(|di| (di.size_bytes, di.allocated_bytes))
            .map_err(|e| e.to_string()),
        (Some(uri), None) => Err(format!(
            "{uri} is an NBD export of no file server of this cluster: ferry cannot size or remove it (move it with the tools of the server that exports it)"
        )),
    };
    r.map_err(|e| {
        checks.push(item(
            label,
            false,
            format!("{}: {e}", src.path.display()),
            None,
        ))
    })
    .ok()
}

/// Which disks `req` moves, and where to (index, destination as given); a disk it names that
/// the VM lacks, or no disk at all, is a failed item of `checks`.
pub(crate) fn wanted(
    req: &MoveRequest,
    disks: &[DiskConfig],
    checks: &mut Vec<CheckItem>,
) -> Vec<(usize, String)> {
    let mut wanted: Vec<(usize, String)> = Vec::new();
    if let Some(all) = &req.storage_to {
        wanted.extend((0..disks.len()).map(|i| (i, all.clone())));
    }
    for dm in &req.disk_to {
        match select(disks, &dm.disk) {
            Ok(i) => {
                wanted.retain(|(j, _)| *j != i);
                wanted.push((i, dm.to.clone()));
            }
            Err(e) => checks.push(item(&format!("disk {}", dm.disk), false, e, None)),
        }
    }
    wanted.sort();
    if wanted.is_empty() && disks.is_empty() {
        checks.push(item(
            "disks",
            false,
            format!("{} has no disks", req.vm),
            None,
        ));
    }
    wanted
}

/// Plan the move: which disk goes where (a failed step is an item of the check report).
async fn plan(d: &Arc<Daemon>, req: &MoveRequest) -> ApiResult<(CheckReport, Vec<Plan>)> {
    let info = d.vm(&req.vm)?;
    let me = d.name.clone();
    let mut checks = Vec::new();
    let running = info.state == VmState::Running;
    checks.push(item(
        "vm",
        running,
        format!("{} is {:?} on {me}", req.vm, info.state).to_lowercase(),
        Some(match info.state {
            VmState::Paused => format!("resume {} first", req.vm),
            VmState::Moving => format!("wait for {}'s move to end, or cancel it", req.vm),
            _ => format!(
                "storage moves are for running VMs; a stopped VM's disks can be copied with `ferry disk copy` (start {} to move it live)",
                req.vm
            ),
        }),
    ));
    if let Some(sec) = &d.security {
        let ok = sec.in_group(&me);
        checks.push(item(
            "migration group",
            ok,
            if ok {
                format!("{me} is in the cluster's migration group")
            } else {
                format!("{me} is not in the cluster's migration group: it may not move storage")
            },
            Some(format!(
                "an admin adds it: `ferry cluster migration-group add {me}`"
            )),
        ));
    }
    let disks = &info.config.disks;
    let wanted = wanted(req, disks, &mut checks);
    let mut plans = Vec::new();
    for (i, to) in wanted {
        let src = disks[i].clone();
        let label = format!("disk {i}");
        let dest = match parse_dest(d, &to) {
            Ok(x) => x,
            Err(e) => {
                checks.push(item(&label, false, e, None));
                continue;
            }
        };
        let source_share = share_of(d, &src);
        let name = match &source_share {
            Some((_, n)) => n.clone(),
            None => file_name(&src).to_string(),
        };
        // Size and allocation of the source.
        let Some((size, allocated)) = sizes(&src, source_share.as_ref(), &label, &mut checks).await
        else {
            continue;
        };
        let p = Plan {
            index: i,
            source: src.clone(),
            source_share,
            dest,
            name,
            size,
            allocated,
            target: None,
        };
        check_dest(d, &p, &mut checks).await;
        plans.push(p);
    }
    // Two disks into one place under one name.
    let mut seen = std::collections::BTreeSet::new();
    for p in &plans {
        if !seen.insert(p.dest_text()) {
            checks.push(item(
                &format!("disk {}", p.index),
                false,
                format!("two disks would both become {}", p.dest_text()),
                Some("give them different destinations with --disk-to".into()),
            ));
        }
    }
    let ok = checks.iter().all(|c| c.ok) && !plans.is_empty();
    Ok((
        CheckReport {
            vm: req.vm.clone(),
            from: me.clone(),
            to: me,
            ok,
            checks,
        },
        plans,
    ))
}

/// Check one disk's destination: the same place, free name, space, access.
async fn check_dest(d: &Daemon, p: &Plan, checks: &mut Vec<CheckItem>) {
    let label = format!("disk {}", p.index);
    let what = format!("{} -> {}", p.source.path.display(), p.dest_text());
    match &p.dest {
        Dest::Folder(f) => {
            let target = f.join(&p.name);
            if !f.is_dir() {
                checks.push(item(
                    &label,
                    false,
                    format!("{what}: {} is not a folder on {}", f.display(), d.name),
                    Some(format!("create it first (mkdir -p {})", f.display())),
                ));
                return;
            }
            if target == p.source.path {
                checks.push(item(
                    &label,
                    false,
                    format!("{what}: the disk is there already"),
                    None,
                ));
                return;
            }
            if target.exists() {
                checks.push(item(
                    &label,
                    false,
                    format!("{what}: {} exists", target.display()),
                    Some("remove it, or move the disk to another folder".into()),
                ));
                return;
            }
            let free = nix::sys::statvfs::statvfs(f)
                .map(|s| s.blocks_available() * s.fragment_size())
                .unwrap_or(0);
            let ok = free >= p.allocated;
            checks.push(item(
                &label,
                ok,
                format!(
                    "{what}: needs up to {} MiB, {} MiB free there",
                    p.allocated >> 20,
                    free >> 20
                ),
                Some(format!("free space in {}", f.display())),
            ));
        }
        Dest::Share(s) => {
            let info: ShareInfo = match s.client.get(&format!("/v1/shares/{}", s.share)).await {
                Ok(i) => i,
                Err(e) => {
                    checks.push(item(
                        &label,
                        false,
                        format!("{what}: share {} on {}: {e}", s.share, s.server),
                        Some(format!(
                            "an admin grants it: `ferry share grant {} {} write`",
                            s.share, d.name
                        )),
                    ));
                    return;
                }
            };
            let access = info.access.get(&d.name).copied();
            if access != Some(Access::Write) {
                checks.push(item(
                    &label,
                    false,
                    format!(
                        "{what}: {} has {} access to share {}",
                        d.name,
                        match access {
                            Some(Access::Read) => "only read",
                            _ => "no",
                        },
                        s.share
                    ),
                    Some(format!("ferry share grant {} {} write", s.share, d.name)),
                ));
                return;
            }
            if let Some((src, n)) = &p.source_share {
                if src.server == s.server && src.share == s.share && *n == p.name {
                    checks.push(item(
                        &label,
                        false,
                        format!("{what}: the disk is there already"),
                        None,
                    ));
                    return;
                }
            }
            if info.disks.iter().any(|x| x.name == p.name) {
                checks.push(item(
                    &label,
                    false,
                    format!("{what}: share {} has a disk {} already", s.share, p.name),
                    Some("delete it, or move the disk to another share".into()),
                ));
                return;
            }
            let ok = info.free_bytes >= p.allocated;
            checks.push(item(
                &label,
                ok,
                format!(
                    "{what}: needs up to {} MiB, {} MiB free on the share; a new disk, whose write lease {} takes",
                    p.allocated >> 20,
                    info.free_bytes >> 20,
                    d.name
                ),
                Some(format!("free space on share {}", s.share)),
            ));
        }
    }
}

/// `POST /v1/moves/check` for a storage move.
pub async fn check(d: &Arc<Daemon>, req: &MoveRequest) -> ApiResult<CheckReport> {
    Ok(plan(d, req).await?.0)
}

/// `POST /v1/moves` for a storage move (authorised already).
pub async fn start(d: &Arc<Daemon>, req: MoveRequest, auth: String) -> ApiResult<MoveInfo> {
    let (report, plans) = plan(d, &req).await?;
    if !report.ok {
        return Err(ApiError::check_failed(report));
    }
    let info = crate::moves::register(d, &req, d.name.clone(), String::new(), report, auth, true)?;
    let id = info.id.clone();
    tracing::info!("move {id}: storage of {}", req.vm);
    let d2 = d.clone();
    tokio::spawn(async move {
        let mut plans = plans;
        let (state, error) = run(&d2, &id, &mut plans).await;
        finish(&d2, &id, state, error).await;
    });
    Ok(info)
}

fn cancelled(d: &Daemon, id: &str) -> bool {
    d.lock()
        .outgoing
        .get(id)
        .is_some_and(|m| m.cancel.load(Ordering::SeqCst))
}

/// Take one of the host's storage-move slots, if one is free.
fn try_take_slot(d: &Daemon, id: &str) -> Result<(), String> {
    let mut g = d.lock();
    let max = g.settings.max_storage_moves;
    let in_use = g
        .outgoing
        .values()
        .filter(|m| m.storage_only && m.holds_slot)
        .count() as u32;
    if in_use < max {
        if let Some(m) = g.outgoing.get_mut(id) {
            m.holds_slot = true;
        }
        Ok(())
    } else {
        Err(format!(
            "waiting for a free storage-move slot on {} ({in_use} of {max} in use; `ferry host set --max-storage-moves N`)",
            d.name
        ))
    }
}

pub(crate) async fn vmm_call(api: &Path, req: Request) -> Result<ResponseBody, String> {
    match vmm::call(api, &req).await {
        Ok(Response::Ok(b)) => Ok(b),
        Ok(Response::Error(e)) => Err(e),
        Err(e) => Err(format!("the VM's VMM: {e}")),
    }
}

/// Make the empty copy of `p`: a sparse file of the disk's size, or a new disk on the share
/// whose lease this host takes.
async fn make_copy(p: &mut Plan) -> Result<(), String> {
    match &p.dest {
        Dest::Folder(f) => {
            let path = f.join(&p.name);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("creating {}: {e}", path.display()))?;
            p.target = Some(path.clone());
            file.set_len(p.size)
                .map_err(|e| format!("sizing {}: {e}", path.display()))?;
        }
        Dest::Share(s) => {
            let di: DiskInfo = s
                .client
                .post(
                    &format!("/v1/shares/{}/disks", s.share),
                    &DiskCreate {
                        name: p.name.clone(),
                        size_bytes: p.size,
                    },
                )
                .await
                .map_err(|e| format!("creating {}: {e}", p.dest_text()))?;
            let uri = di
                .uri
                .ok_or_else(|| format!("file server {} exports no NBD address", s.server))?;
            p.target = Some(PathBuf::from(uri));
            s.lease(&p.name, LeaseAction::Acquire)
                .await
                .map_err(|e| format!("taking the write lease of {}: {e}", p.dest_text()))?;
        }
    }
    Ok(())
}

/// Remove an image file (a half-made copy, or the old disk after the switch).
pub(crate) fn remove_file(p: &Path) -> Result<(), String> {
    std::fs::remove_file(p).map_err(|e| format!("{} could not be removed: {e}", p.display()))
}

/// Give up a share disk's lease (ours, if we hold it), then delete it.
pub(crate) async fn remove_share_copy(s: &ShareRef, name: &str) -> Result<(), String> {
    let _ = s.lease(name, LeaseAction::Release).await;
    match s.client.delete(&s.disk_path(name)).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("not_found") => Ok(()),
        Err(e) => Err(format!(
            "{}:{}/{name} could not be removed: {e}",
            s.server, s.share
        )),
    }
}

/// Remove the half-made copy of `p`.
async fn drop_copy(p: &Plan) {
    let Some(target) = &p.target else { return };
    let r = match &p.dest {
        Dest::Folder(_) => remove_file(target),
        Dest::Share(s) => remove_share_copy(s, &p.name).await,
    };
    match r {
        Ok(()) => tracing::info!("removed the unfinished copy {}", p.dest_text()),
        Err(e) => {
            tracing::warn!("{e}");
            if let Dest::Share(s) = &p.dest {
                // The file server is away (perhaps why the move failed): remove the copy once
                // it answers again, so no half-made disk stays behind.
                let (s, name, what) = (s.clone(), p.name.clone(), p.dest_text());
                tokio::spawn(async move {
                    let deadline = Instant::now() + CLEANUP_RETRY;
                    while Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if remove_share_copy(&s, &name).await.is_ok() {
                            tracing::info!(
                                "removed the unfinished copy {what} (its file server is back)"
                            );
                            return;
                        }
                    }
                    tracing::error!("the unfinished copy {what} could not be removed within {CLEANUP_RETRY:?}: delete it with `ferry disk delete`");
                });
            }
        }
    }
}

/// How long a half-made copy on an unreachable file server is retried for removal.
const CLEANUP_RETRY: Duration = Duration::from_secs(600);

/// The per-disk outcome, filled in as the move goes.
#[derive(Default, Clone)]
struct Outcome {
    progress: Option<MirrorProgress>,
    switched: bool,
    pause_ms: Option<f64>,
    old_copy: Option<String>,
}

async fn run(d: &Arc<Daemon>, id: &str, plans: &mut [Plan]) -> (MoveState, Option<String>) {
    let Some((vm, keep)) = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| (m.info.vm.clone(), m.keep_source))
    else {
        return (MoveState::Failed, Some("the move vanished".into()));
    };
    let queued_at = Instant::now();
    loop {
        if cancelled(d, id) {
            return (MoveState::Cancelled, Some("cancelled while queued".into()));
        }
        match try_take_slot(d, id) {
            Ok(()) => break,
            Err(why) => {
                crate::moves::update(d, id, |i| {
                    i.state = MoveState::Queued;
                    i.waiting_for = Some(why);
                });
                let c = d.lock().outgoing.get(id).map(|m| m.cancelled.clone());
                tokio::select! {
                    _ = d.moves_changed.notified() => {}
                    _ = async { if let Some(c) = c { c.notified().await } else { std::future::pending().await } } => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    if let Some(m) = d.lock().outgoing.get_mut(id) {
        m.queued_ms = queued_at.elapsed().as_millis() as u64;
        m.started = Instant::now();
    }
    crate::moves::update(d, id, |i| {
        i.state = MoveState::Preparing;
        i.waiting_for = None;
    });
    let api = d.run_dir(&vm).api();
    let mut outcomes = vec![Outcome::default(); plans.len()];
    let r = copy_and_switch(d, id, &api, plans, &mut outcomes, keep).await;
    // Whatever happened: copies not switched to go, mirrors still running stop.
    for (p, o) in plans.iter().zip(&outcomes) {
        if !o.switched {
            let _ = vmm_call(&api, Request::MirrorCancel { disk: p.index }).await;
            drop_copy(p).await;
        }
    }
    // Old copies of switched disks go (unless kept).
    for (p, o) in plans.iter().zip(outcomes.iter_mut()) {
        if !o.switched {
            continue;
        }
        if keep {
            o.old_copy = Some("kept".into());
            if let Some((s, n)) = &p.source_share {
                // Kept, but not written by us any more.
                let _ = s
                    .client
                    .post::<_, DiskInfo>(
                        &format!("{}/lease", s.disk_path(n)),
                        &LeaseRequest::new(LeaseAction::Release),
                    )
                    .await;
            }
            continue;
        }
        let r = match &p.source_share {
            Some((s, n)) => remove_share_copy(s, n).await,
            None => remove_file(&p.source.path),
        };
        o.old_copy = Some(match r {
            Ok(()) => "removed".into(),
            Err(e) => {
                tracing::warn!("{e}");
                format!("stays: {e}")
            }
        });
    }
    let reports: Vec<DiskMoveReport> = plans
        .iter()
        .zip(&outcomes)
        .map(|(p, o)| {
            let pr = o.progress.clone();
            DiskMoveReport {
                disk: p.index,
                from: p.source.path.display().to_string(),
                to: p
                    .target
                    .as_ref()
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|| p.dest_text()),
                switched: o.switched,
                copied_bytes: pr.as_ref().map(|x| x.copied_bytes).unwrap_or(0),
                skipped_bytes: pr.as_ref().map(|x| x.skipped_bytes).unwrap_or(0),
                mirrored_bytes: pr.as_ref().map(|x| x.mirrored_bytes).unwrap_or(0),
                pause_ms: o.pause_ms,
                old_copy: o.old_copy.clone(),
            }
        })
        .collect();
    if let Some(m) = d.lock().outgoing.get_mut(id) {
        m.disk_reports = reports;
    }
    let _ = std::fs::remove_file(d.state.storage_record(id));
    r
}

/// What the state directory keeps of a storage move while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StorageRecord {
    id: String,
    vm: String,
    keep_source: bool,
    disks: Vec<DiskRecord>,
}

/// A disk of a storage move: where it was and where its copy goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskRecord {
    index: usize,
    source: PathBuf,
    /// The copy's path, for a folder (a share's copy is known by `dest_share`).
    target: Option<PathBuf>,
    /// (file server, share, disk) of the copy, and of the source, when on shares.
    dest_share: Option<(String, String, String)>,
    source_share: Option<(String, String, String)>,
}

impl DiskRecord {
    fn of(p: &Plan) -> DiskRecord {
        DiskRecord {
            index: p.index,
            source: p.source.path.clone(),
            target: match &p.dest {
                Dest::Folder(f) => Some(f.join(&p.name)),
                Dest::Share(_) => None,
            },
            dest_share: match &p.dest {
                Dest::Share(s) => Some((s.server.clone(), s.share.clone(), p.name.clone())),
                Dest::Folder(_) => None,
            },
            source_share: p
                .source_share
                .as_ref()
                .map(|(s, n)| (s.server.clone(), s.share.clone(), n.clone())),
        }
    }
}

/// A copy (or old disk) a record names, removed.
async fn remove_recorded(
    d: &Daemon,
    path: Option<&Path>,
    share: Option<&(String, String, String)>,
) {
    let r = match share {
        Some((server, share, name)) => match file_server(d, Some(server)) {
            Ok((server, client)) => {
                let s = ShareRef {
                    server,
                    client,
                    share: share.clone(),
                };
                remove_share_copy(&s, name).await
            }
            Err(e) => Err(e),
        },
        None => match path {
            Some(p) if p.exists() => remove_file(p),
            _ => Ok(()),
        },
    };
    if let Err(e) = r {
        tracing::warn!("{e}");
    }
}

/// After a restart: settle the storage moves the daemon was running. A disk whose VMM already
/// uses the copy keeps it (the definition is brought up to date, the old disk goes unless it
/// was to be kept); every other copy is dropped (the VMM's mirror stopped, the copy removed).
pub async fn recover(d: Arc<Daemon>) {
    for (_, f) in d.state.records(".storage.json") {
        let Ok(Some(r)) = crate::state::read_json::<StorageRecord>(&f) else {
            continue;
        };
        let api = d.run_dir(&r.vm).api();
        let using: Vec<PathBuf> = match vmm::call(&api, &Request::Status).await {
            Ok(Response::Ok(ResponseBody::Status(s))) => s.disks,
            _ => d
                .lock()
                .vms
                .get(&r.vm)
                .map(|v| {
                    v.record
                        .config
                        .disks
                        .iter()
                        .map(|x| x.path.clone())
                        .collect()
                })
                .unwrap_or_default(),
        };
        for disk in &r.disks {
            let _ = vmm_call(&api, Request::MirrorCancel { disk: disk.index }).await;
            let now = using.get(disk.index);
            let switched = now.is_some_and(|p| *p != disk.source);
            if switched {
                let new = now.cloned().unwrap_or_default();
                {
                    let mut g = d.lock();
                    if let Some(v) = g.vms.get_mut(&r.vm) {
                        if let Some(x) = v.record.config.disks.get_mut(disk.index) {
                            x.path = new.clone();
                        }
                        let _ = crate::state::write_json(&d.state.vm_record(&r.vm), &v.record);
                    }
                }
                tracing::warn!(
                    "storage move {} of {} was cut short by a restart after disk {} switched to {}: it stays there",
                    r.id,
                    r.vm,
                    disk.index,
                    new.display()
                );
                if !r.keep_source {
                    remove_recorded(&d, Some(&disk.source), disk.source_share.as_ref()).await;
                }
            } else {
                tracing::warn!(
                    "storage move {} of {} was cut short by a restart: disk {} stays {}, its copy goes",
                    r.id,
                    r.vm,
                    disk.index,
                    disk.source.display()
                );
                remove_recorded(&d, disk.target.as_deref(), disk.dest_share.as_ref()).await;
            }
        }
        let _ = std::fs::remove_file(&f);
    }
}

/// Make the copies, mirror, switch. Returns how the move ended; `outcomes` says per disk.
async fn copy_and_switch(
    d: &Arc<Daemon>,
    id: &str,
    api: &Path,
    plans: &mut [Plan],
    outcomes: &mut [Outcome],
    keep: bool,
) -> (MoveState, Option<String>) {
    let stop = |d: &Daemon| -> Option<(MoveState, Option<String>)> {
        cancelled(d, id).then(|| {
            (
                MoveState::Cancelled,
                Some("cancelled; the VM stays on its disks".into()),
            )
        })
    };
    // Recorded before any copy exists, so a daemon that restarts mid-move finds and settles it.
    let vm = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| m.info.vm.clone())
        .unwrap_or_default();
    let rec = StorageRecord {
        id: id.into(),
        vm,
        keep_source: keep,
        disks: plans.iter().map(DiskRecord::of).collect(),
    };
    if let Err(e) = crate::state::write_json(&d.state.storage_record(id), &rec) {
        return (MoveState::Failed, Some(format!("recording the move: {e}")));
    }
    for p in plans.iter_mut() {
        if let Some(s) = stop(d) {
            return s;
        }
        if let Err(e) = make_copy(p).await {
            return (MoveState::Failed, Some(e));
        }
    }
    crate::moves::update(d, id, |i| i.state = MoveState::Migrating);
    // The cap is for the whole move: each disk's pass gets its share.
    let bandwidth_mbit = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| m.settings.bandwidth_mbit)
        .unwrap_or(0);
    for p in plans.iter() {
        let target = p.target.clone().unwrap_or_default();
        let req = Request::MirrorStart {
            disk: p.index,
            target,
            bandwidth_mbit: bandwidth_mbit.div_ceil(plans.len() as u64),
        };
        if let Err(e) = vmm_call(api, req).await {
            return (MoveState::Failed, Some(format!("disk {}: {e}", p.index)));
        }
    }
    // Follow the copies until every one is ready.
    let indices: Vec<usize> = plans.iter().map(|p| p.index).collect();
    let (last, failed) = follow_mirrors(d, id, api, &indices).await;
    for (p, o) in plans.iter().zip(outcomes.iter_mut()) {
        o.progress = last.iter().find(|m| m.disk == p.index).cloned();
    }
    if let Some(f) = failed {
        return f;
    }
    // The switch, disk by disk; each is whole (the VMM flushes the copy, then uses it).
    crate::moves::update(d, id, |i| i.state = MoveState::Switchover);
    let vm = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| m.info.vm.clone())
        .unwrap_or_default();
    for (p, o) in plans.iter().zip(outcomes.iter_mut()) {
        if let Some(s) = stop(d) {
            return s;
        }
        let sw = match vmm_call(api, Request::MirrorComplete { disk: p.index }).await {
            Ok(ResponseBody::MirrorSwitched(sw)) => sw,
            Ok(_) => return (MoveState::Failed, Some("the VMM answered oddly".into())),
            Err(e) => {
                return (
                    MoveState::Failed,
                    Some(format!("switching disk {}: {e}", p.index)),
                )
            }
        };
        o.switched = true;
        o.pause_ms = Some(sw.pause_ms);
        o.progress = Some(sw.progress.clone());
        // The definition names the new copy from now on.
        let mut g = d.lock();
        if let Some(v) = g.vms.get_mut(&vm) {
            if let Some(disk) = v.record.config.disks.get_mut(p.index) {
                disk.path = sw.new.clone();
            }
            if let Err(e) = crate::state::write_json(&d.state.vm_record(&vm), &v.record) {
                tracing::error!("recording {vm}'s new disk: {e}");
            }
        }
        drop(g);
        tracing::info!(
            "move {id}: {vm}'s disk {} is {} now (I/O paused {:.2} ms)",
            p.index,
            sw.new.display(),
            sw.pause_ms
        );
    }
    (MoveState::Done, None)
}

/// Follow the VMM's mirrors of disks `indices` (the move's progress shows them) until every one
/// is ready. Returns their last progress, and how the move ends if it must (cancelled, a copy
/// failed, the VMM gone).
pub(crate) async fn follow_mirrors(
    d: &Daemon,
    id: &str,
    api: &Path,
    indices: &[usize],
) -> (Vec<MirrorProgress>, Option<(MoveState, Option<String>)>) {
    let mut mine: Vec<MirrorProgress> = Vec::new();
    loop {
        if cancelled(d, id) {
            return (
                mine,
                Some((
                    MoveState::Cancelled,
                    Some("cancelled; the VM stays on its disks".into()),
                )),
            );
        }
        let all = match vmm_call(api, Request::MirrorStatus).await {
            Ok(ResponseBody::Mirrors(m)) => m,
            Ok(_) => Vec::new(),
            Err(e) => return (mine, Some((MoveState::Failed, Some(e)))),
        };
        mine = all
            .into_iter()
            .filter(|m| indices.contains(&m.disk))
            .collect();
        crate::moves::update(d, id, |i| i.storage = mine.clone());
        if let Some(f) = mine.iter().find(|m| m.state == MirrorState::Failed) {
            let e = format!(
                "disk {}: {}; the VM stays on its disks",
                f.disk,
                f.error.clone().unwrap_or_default()
            );
            return (mine, Some((MoveState::Failed, Some(e))));
        }
        if mine.len() < indices.len() {
            return (
                mine,
                Some((
                    MoveState::Failed,
                    Some("the VMM stopped copying a disk".into()),
                )),
            );
        }
        if mine.iter().all(|m| m.state == MirrorState::Ready) {
            return (mine, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn finish(d: &Arc<Daemon>, id: &str, state: MoveState, error: Option<String>) {
    let Some((vm, started, queued_ms, auth, disks)) = d.lock().outgoing.get(id).map(|m| {
        (
            m.info.vm.clone(),
            m.started,
            m.queued_ms,
            m.auth.clone(),
            m.disk_reports.clone(),
        )
    }) else {
        return;
    };
    let switched = disks.iter().filter(|x| x.switched).count();
    let error = match (state, error) {
        (MoveState::Done, e) => e,
        (_, Some(e)) if switched > 0 => Some(format!(
            "{e} ({switched} of {} disks had switched and stay on their new copies)",
            disks.len()
        )),
        (_, e) => e,
    };
    let report = MoveReport {
        vm: vm.clone(),
        from: d.name.clone(),
        to: d.name.clone(),
        result: match state {
            MoveState::Done => "done",
            MoveState::Cancelled => "cancelled",
            _ => "failed",
        }
        .into(),
        total_ms: started.elapsed().as_millis() as u64,
        downtime_ms: disks
            .iter()
            .filter_map(|x| x.pause_ms)
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b)))),
        bytes: disks
            .iter()
            .map(|x| x.copied_bytes + x.mirrored_bytes)
            .sum(),
        rounds: 0,
        queued_ms,
        error: error.clone(),
        runs_on: d.name.clone(),
        encrypted: false,
        auth: (!auth.is_empty()).then_some(auth),
        disks,
        migration: None,
    };
    if let Some(m) = d.lock().outgoing.get_mut(id) {
        m.holds_slot = false;
    }
    d.moves_changed.notify_waiters();
    crate::moves::update(d, id, |i| {
        i.state = state;
        i.error = error.clone();
        i.report = Some(report);
        i.waiting_for = None;
    });
    match state {
        MoveState::Done => tracing::info!("move {id}: {vm}'s storage moved"),
        s => tracing::warn!(
            "move {id}: storage of {vm}: {s:?}: {}",
            error.unwrap_or_default()
        ),
    }
}
