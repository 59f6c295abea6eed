//! Shared-nothing moves, the source's side: the VM to another host and its disks into that
//! host's own folders, in one move with one pause (`ferry move VM --to HOST --storage-to DIR`).
//!
//! ```text
//! Checking --> Preparing: the destination makes empty copies and serves them to this host
//!   (NBD over mutual TLS, for this move only; see crate::targets)
//!   --> Migrating: the VMM mirrors each disk into its copy (guest writes go to both, one pass
//!       copies the rest), then, every copy complete and kept in step, pre-copies memory
//!   --> Switchover: one pause; the VMM flushes the copies, sends its state; the destination
//!       runs on the copies
//!   --> Done: the old disks are removed (unless --keep-source)
//! failed or cancelled before the commit: the VMM stops mirroring, the destination removes the
//!   copies, the VM runs on here, on its disks as they were
//! ```
//!
//! Until the destination's outcome record says committed, the disks here are the truth and
//! only this host's VMM writes the copies; after it, only the destination's VMM writes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::host::{
    CheckItem, CheckReport, DiskMoveReport, DiskTarget, DiskTargetReply, DiskTargetSpec,
    IncomingInfo, IncomingRequest, IncomingState, MoveRequest, MoveState,
};
use ferry_api::Request;
use serde::{Deserialize, Serialize};

use crate::check::{self, item};
use crate::client::Client;
use crate::daemon::Daemon;
use crate::error::ApiResult;
use crate::state;
use crate::storage::{self, vmm_call};

/// Whether `req` moves the VM to another host together with disks.
pub fn wants(d: &Daemon, req: &MoveRequest) -> bool {
    (req.storage_to.is_some() || !req.disk_to.is_empty()) && !req.to.is_empty() && req.to != d.name
}

/// The source's side of the check (which disk goes where, sized) and the disks the destination
/// is asked to take.
async fn plan(
    d: &Arc<Daemon>,
    req: &MoveRequest,
) -> ApiResult<(Vec<CheckItem>, Vec<DiskTargetSpec>)> {
    let info = d.vm(&req.vm)?;
    let disks = &info.config.disks;
    let mut checks = Vec::new();
    let wanted = storage::wanted(req, disks, &mut checks);
    let mut specs = Vec::new();
    for (i, to) in wanted {
        let src = &disks[i];
        let label = format!("disk {i}");
        if !to.starts_with('/') {
            checks.push(item(
                &label,
                false,
                format!("{to:?}: with the VM to {}, a disk goes into an absolute folder of {}", req.to, req.to),
                Some(format!(
                    "for a share, let `ferry move {} --to {} --storage-to {to}` put the disks there first, then move the VM (two steps, one command)",
                    req.vm, req.to
                )),
            ));
            continue;
        }
        let source_share = storage::share_of(d, src);
        let Some((size, allocated)) =
            storage::sizes(src, source_share.as_ref(), &label, &mut checks).await
        else {
            continue;
        };
        let name = match &source_share {
            Some((_, n)) if n.contains('.') => n.clone(),
            Some((_, n)) => format!("{n}.img"),
            None => storage::file_name(src).to_string(),
        };
        specs.push(DiskTargetSpec {
            index: i,
            folder: PathBuf::from(to),
            name,
            size_bytes: size,
            allocated_bytes: allocated,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &specs {
        if !seen.insert(s.folder.join(&s.name)) {
            checks.push(item(
                &format!("disk {}", s.index),
                false,
                format!(
                    "two disks would both become {}",
                    s.folder.join(&s.name).display()
                ),
                Some("give them different destinations with --disk-to".into()),
            ));
        }
    }
    Ok((checks, specs))
}

/// The whole check of a shared-nothing move (both hosts' sides), and the disks it copies.
pub async fn check(
    d: &Arc<Daemon>,
    req: &MoveRequest,
    for_move: Option<&str>,
) -> ApiResult<(CheckReport, Vec<DiskTargetSpec>)> {
    let (mut mine, specs) = plan(d, req).await?;
    let mut report = check::check_move(d, &req.vm, &req.to, for_move, &specs).await?;
    mine.append(&mut report.checks);
    report.checks = mine;
    report.ok = report.checks.iter().all(|c| c.ok) && !specs.is_empty();
    Ok((report, specs))
}

/// What the state directory keeps of a shared-nothing move while its copies exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RemoteRecord {
    id: String,
    vm: String,
    to: String,
    to_addr: String,
    keep_source: bool,
    /// (index, the disk here, its copy there) of every disk copied.
    disks: Vec<(usize, PathBuf, PathBuf)>,
}

/// Have the destination make and serve the copies, mirror every disk into its copy, and wait
/// until all are complete (and kept in step from then on). Returns the copies.
pub async fn copy(
    d: &Arc<Daemon>,
    id: &str,
    dest: &Client,
    vm: &str,
    to: &str,
    to_addr: &str,
    specs: &[DiskTargetSpec],
) -> Result<Vec<DiskTarget>, (MoveState, String)> {
    let fail = |e: String| (MoveState::Failed, e);
    let (grant, keep_source, bandwidth) = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| (m.grant.clone(), m.keep_source, m.settings.bandwidth_mbit))
        .unwrap_or_default();
    let mut c = check::incoming_request(d, vm).map_err(|e| fail(e.to_string()))?;
    c.disks_to = specs.to_vec();
    // Recorded before the copies exist, so a restarted daemon settles them.
    state::write_json(
        &d.state.remote_record(id),
        &RemoteRecord {
            id: id.into(),
            vm: vm.into(),
            to: to.into(),
            to_addr: to_addr.into(),
            keep_source,
            disks: specs
                .iter()
                .map(|s| {
                    (
                        s.index,
                        c.config.disks[s.index].path.clone(),
                        s.folder.join(&s.name),
                    )
                })
                .collect(),
        },
    )
    .map_err(|e| fail(format!("recording the move: {e}")))?;
    let req = IncomingRequest {
        move_id: id.into(),
        check: c,
        grant,
    };
    let reply: DiskTargetReply = dest
        .post("/v1/disk-targets", &req)
        .await
        .map_err(|e| fail(format!("{to} cannot take {vm}'s disks: {e}")))?;
    let api = d.run_dir(vm).api();
    crate::moves::update(d, id, |i| i.state = MoveState::Migrating);
    for t in &reply.disks {
        let r = vmm_call(
            &api,
            Request::MirrorStart {
                disk: t.index,
                target: PathBuf::from(&t.uri),
                bandwidth_mbit: bandwidth.div_ceil(reply.disks.len() as u64),
            },
        )
        .await;
        if let Err(e) = r {
            return Err(fail(format!("disk {}: {e}", t.index)));
        }
    }
    let indices: Vec<usize> = reply.disks.iter().map(|t| t.index).collect();
    let started = Instant::now();
    let (last, failed) = storage::follow_mirrors(d, id, &api, &indices).await;
    if let Some((state, e)) = failed {
        return Err((state, e.unwrap_or_default()));
    }
    tracing::info!(
        "move {id}: {vm}'s disks copied to {to} in {:?} ({} MiB); now its memory",
        started.elapsed(),
        last.iter().map(|m| m.copied_bytes).sum::<u64>() >> 20
    );
    Ok(reply.disks)
}

/// After the move ended (`state`): done, the old disks go (unless kept); otherwise the VMM
/// stops mirroring and the destination removes the copies. Returns the per-disk report.
pub async fn settle(d: &Arc<Daemon>, id: &str, state: MoveState) -> Vec<DiskMoveReport> {
    let Ok(Some(r)) = state::read_json::<RemoteRecord>(&d.state.remote_record(id)) else {
        return Vec::new();
    };
    let progress = d
        .lock()
        .outgoing
        .get(id)
        .map(|m| m.info.storage.clone())
        .unwrap_or_default();
    let dest = d
        .client_for(&r.to, &r.to_addr)
        .with_timeout(Duration::from_secs(10));
    let done = state == MoveState::Done;
    let old: Vec<Option<String>> = if done {
        let mut v = Vec::new();
        for (_, p, _) in &r.disks {
            v.push(Some(if r.keep_source {
                "kept".into()
            } else {
                remove_old(d, p).await
            }));
        }
        v
    } else {
        stop_copies(d, &r, &dest).await;
        vec![None; r.disks.len()]
    };
    let _ = std::fs::remove_file(d.state.remote_record(id));
    r.disks
        .iter()
        .zip(old)
        .map(|((i, p, there), old_copy)| {
            let pr = progress.iter().find(|m| m.disk == *i);
            DiskMoveReport {
                disk: *i,
                from: p.display().to_string(),
                to: format!("{}:{}", r.to, there.display()),
                switched: done,
                copied_bytes: pr.map(|m| m.copied_bytes).unwrap_or(0),
                skipped_bytes: pr.map(|m| m.skipped_bytes).unwrap_or(0),
                mirrored_bytes: pr.map(|m| m.mirrored_bytes).unwrap_or(0),
                pause_ms: None,
                old_copy,
            }
        })
        .collect()
}

/// The old disk of a VM that now runs elsewhere on its copy: removed (a share's disk deleted).
async fn remove_old(d: &Daemon, p: &Path) -> String {
    let disk = ferry_api::DiskConfig {
        path: p.to_path_buf(),
        read_only: false,
        serial: None,
        stall_limit_s: None,
        queues: None,
    };
    let r = match storage::share_of(d, &disk) {
        Some((s, n)) => storage::remove_share_copy(&s, &n).await,
        None => storage::remove_file(p),
    };
    match r {
        Ok(()) => "removed".into(),
        Err(e) => {
            tracing::warn!("{e}");
            format!("stays: {e}")
        }
    }
}

/// The move will not commit: stop mirroring here, have the destination drop the copies.
async fn stop_copies(d: &Daemon, r: &RemoteRecord, dest: &Client) {
    let api = d.run_dir(&r.vm).api();
    for (i, _, _) in &r.disks {
        // The migration thread may take a moment to end after a failure.
        for _ in 0..50 {
            match vmm_call(&api, Request::MirrorCancel { disk: *i }).await {
                Err(e) if e.contains("migration is in progress") => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => break,
            }
        }
    }
    let path = format!("/v1/disk-targets/{}", r.id);
    match dest.delete(&path).await {
        Ok(()) => tracing::info!("move {}: {} removed the copies", r.id, r.to),
        Err(e) => {
            // Unreachable (perhaps why the move failed): ask again once it answers. Its own
            // watch also removes copies nothing writes, after a while.
            tracing::warn!(
                "move {}: asking {} to remove the copies: {e}; asking again until it answers (it removes them itself within {:?})",
                r.id,
                r.to,
                crate::targets::IDLE
            );
            let (dest, id, to) = (dest.clone(), r.id.clone(), r.to.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(600);
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if dest.delete(&path).await.is_ok() {
                        tracing::info!("move {id}: {to} removed the copies (it answers again)");
                        return;
                    }
                }
            });
        }
    }
}

/// After a restart: settle each shared-nothing move whose copies existed, by what the
/// destination says of it (committed: the old disks go unless kept; otherwise the copies go).
pub async fn recover(d: Arc<Daemon>) {
    for (_, f) in d.state.records(".remote.json") {
        let Ok(Some(r)) = state::read_json::<RemoteRecord>(&f) else {
            continue;
        };
        let d = d.clone();
        tokio::spawn(async move {
            let dest = d
                .client_for(&r.to, &r.to_addr)
                .with_timeout(Duration::from_secs(10));
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                match dest
                    .get::<IncomingInfo>(&format!("/v1/incoming/{}", r.id))
                    .await
                {
                    Ok(i) if i.state == IncomingState::Committed => {
                        // The VM runs there on the copies: the disks here are stale.
                        if !r.keep_source {
                            for (_, p, _) in &r.disks {
                                let _ = remove_old(&d, p).await;
                            }
                        }
                        break;
                    }
                    Ok(i) if i.state == IncomingState::Receiving => {}
                    Ok(_) => {
                        stop_copies(&d, &r, &dest).await;
                        break;
                    }
                    Err(e) if e.code() == Some("not_found") => {
                        stop_copies(&d, &r, &dest).await;
                        break;
                    }
                    Err(e) => tracing::debug!("move {}: asking {}: {e}", r.id, r.to),
                }
                if Instant::now() > deadline {
                    tracing::error!(
                        "move {}: {} did not say what became of it within 10 min; its disks here stay as they are",
                        r.id,
                        r.to
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let _ = std::fs::remove_file(d.state.remote_record(&r.id));
        });
    }
}
