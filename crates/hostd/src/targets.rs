//! The destination's side of a shared-nothing move: empty copies of the VM's disks in this
//! host's own folders, served over NBD to the move's source host only, for that move only.
//!
//! ```text
//! POST /v1/disk-targets: checked, recorded (moves/<id>.targets.json), files made, served
//!   --> the source VMM mirrors into them (guest writes to both, one pass copies the rest)
//!   --> the move's VM commits here: serving stops, the files stay (the VM runs on them)
//!   --> or the move ends before that: serving stops, the files go
//! ```
//!
//! "Ends before" is whichever comes first: the source asks (`DELETE /v1/disk-targets/{id}`),
//! the arriving move is aborted here, nothing of the move happens for [`IDLE`] (no NBD request
//! and no arriving VMM: the source is gone), or this daemon restarts before the move arrived.
//! The copies are never anyone's disk until the move's outcome record says committed, and
//! only the source's VMM writes them until then.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use ferry_api::host::{DiskTarget, DiskTargetReply, IncomingRequest};
use ferry_api::Outcome;
use ferry_nbd::export::{
    Export, ExportProvider, Peer as NbdPeer, RawFileExport, Refusal, ZeroFlags,
};
use ferry_nbd::proto::{Errno, Extent};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::transport::Peer;
use crate::{check, incoming, state, vmm};

/// A move whose copies nothing touches for this long, and that has not arrived, is given up.
pub const IDLE: Duration = Duration::from_secs(60);

/// The copies of one move, while they are served.
pub struct Served {
    pub vm: String,
    pub from: String,
    /// Disk index -> (the copy here, the disk's path on the source).
    pub disks: Vec<(usize, PathBuf, String)>,
    stop: Arc<Notify>,
    last_use: Arc<AtomicU64>,
}

/// What the state directory keeps of a move's copies until they are settled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TargetRecord {
    id: String,
    vm: String,
    from: String,
    files: Vec<PathBuf>,
}

/// The source path of disk `path` if it is a copy move `id` made here.
pub fn source_of(d: &Daemon, id: &str, path: &std::path::Path) -> Option<String> {
    d.lock()
        .targets
        .get(id)
        .and_then(|s| s.disks.iter().find(|(_, p, _)| p == path))
        .map(|(_, _, src)| src.clone())
}

/// Only the move's source host, by its certificate (or anyone, without a cluster).
fn peer_ok(d: &Daemon, from: &str, peer: &Peer) -> ApiResult<()> {
    if d.security.is_none() {
        return Ok(());
    }
    match peer {
        Peer::Cert { identity, .. } if crate::security::is_host(identity, from) => Ok(()),
        p => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "only host {from} may ask for the copies of its move, not {}",
                p.describe()
            ),
        )),
    }
}

/// `POST /v1/disk-targets`.
pub async fn start(
    d: &Arc<Daemon>,
    req: IncomingRequest,
    peer: &Peer,
) -> ApiResult<DiskTargetReply> {
    let id = req.move_id.clone();
    let what = format!(
        "copies of {}'s disks from {} (move {id})",
        req.check.vm, req.check.from
    );
    let r = async {
        peer_ok(d, &req.check.from, peer)?;
        incoming::check_grant(d, &req.move_id, req.grant.as_deref(), &req.check, false)?;
        make(d, &req).await
    }
    .await;
    crate::audit::record(
        &d.state.root,
        peer,
        &what,
        r.as_ref().err().map(|e| e.body.error.as_str()),
        None,
    );
    r
}

async fn make(d: &Arc<Daemon>, req: &IncomingRequest) -> ApiResult<DiskTargetReply> {
    let id = &req.move_id;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request(format!("{id:?} is not a move id")));
    }
    if req.check.disks_to.is_empty() {
        return Err(ApiError::bad_request("no disks to copy here"));
    }
    if d.lock().targets.contains_key(id) || d.state.targets_record(id).exists() {
        return Err(ApiError::conflict(format!(
            "move {id} has its copies on {} already",
            d.name
        )));
    }
    let ip = check::incoming_ip(d, &req.check)?;
    let files: Vec<PathBuf> = req
        .check
        .disks_to
        .iter()
        .map(|t| t.folder.join(&t.name))
        .collect();
    // Recorded before any file exists: a restart finds and removes them.
    state::write_json(
        &d.state.targets_record(id),
        &TargetRecord {
            id: id.clone(),
            vm: req.check.vm.clone(),
            from: req.check.from.clone(),
            files: files.clone(),
        },
    )?;
    let undo = |d: &Daemon, made: &[PathBuf]| {
        for f in made {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_file(d.state.targets_record(id));
    };
    let mut exports: BTreeMap<String, Arc<dyn Export>> = BTreeMap::new();
    let last_use = Arc::new(AtomicU64::new(vmm::now_ms()));
    let token = ferry_vmm::migration::send::new_migration_id();
    let mut made = Vec::new();
    let mut disks = Vec::new();
    for (t, path) in req.check.disks_to.iter().zip(&files) {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                undo(d, &made);
                return Err(ApiError::conflict(format!(
                    "creating {} on {}: {e}",
                    path.display(),
                    d.name
                )));
            }
        };
        made.push(path.clone());
        let export = file
            .set_len(t.size_bytes)
            .and_then(|_| RawFileExport::from_file(file, false));
        let export = match export {
            Ok(x) => x,
            Err(e) => {
                undo(d, &made);
                return Err(ApiError::internal(format!(
                    "sizing {}: {e}",
                    path.display()
                )));
            }
        };
        let name = format!("{token}-{}", t.index);
        exports.insert(
            name.clone(),
            Arc::new(Touched {
                inner: export,
                last_use: last_use.clone(),
            }),
        );
        let source = req
            .check
            .config
            .disks
            .get(t.index)
            .map(|x| x.path.display().to_string())
            .unwrap_or_default();
        disks.push((t.index, path.clone(), source, name));
    }
    let listener = match tokio::net::TcpListener::bind((ip.as_str(), 0)).await {
        Ok(l) => l,
        Err(e) => {
            undo(d, &made);
            return Err(ApiError::internal(format!("cannot listen on {ip}: {e}")));
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Encrypted as the move's memory stream will be: in the clear only on a network both hosts
    // trust for it (then the export names' random token is what keeps others out).
    let tls = d
        .security
        .as_ref()
        .filter(|_| !incoming::plaintext(d, &ip, &req.check))
        .map(|s| ferry_nbd::server::ServerTls {
            config: s.server.clone(),
            required: true,
            identity: Some(ferry_auth::tls::client_identity),
        });
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let provider = Arc::new(Provider {
        exports,
        allowed: tls.as_ref().map(|_| format!("host {}", req.check.from)),
    });
    let stop = Arc::new(Notify::new());
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let r = ferry_nbd::server::serve_until(listener, provider, tls, async move {
                stop.notified().await
            })
            .await;
            if let Err(e) = r {
                tracing::warn!("serving a move's disk copies: {e}");
            }
        });
    }
    let reply = DiskTargetReply {
        disks: disks
            .iter()
            .map(|(index, path, _, name)| DiskTarget {
                index: *index,
                path: path.clone(),
                uri: format!("{scheme}://{addr}/{name}"),
            })
            .collect(),
    };
    d.lock().targets.insert(
        id.clone(),
        Served {
            vm: req.check.vm.clone(),
            from: req.check.from.clone(),
            disks: disks.into_iter().map(|(i, p, s, _)| (i, p, s)).collect(),
            stop,
            last_use,
        },
    );
    tracing::info!(
        "move {id}: serving {} empty copies of {}'s disks on {scheme}://{addr} for {}{}",
        reply.disks.len(),
        req.check.vm,
        req.check.from,
        if scheme == "nbd" && d.security.is_some() {
            " in the clear (a network both hosts trust for migrations)"
        } else {
            ""
        }
    );
    tokio::spawn(watch(d.clone(), id.clone()));
    Ok(reply)
}

/// Give up a move's copies when nothing of the move happens for [`IDLE`] and it has not
/// arrived; an arriving move settles them itself ([`settled`]).
async fn watch(d: Arc<Daemon>, id: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let last = match d.lock().targets.get(&id) {
            Some(s) => s.last_use.load(Ordering::Relaxed),
            None => return,
        };
        let arrived = d.lock().incoming.contains_key(&id);
        if arrived {
            continue;
        }
        if vmm::now_ms().saturating_sub(last) > IDLE.as_millis() as u64 {
            tracing::warn!(
                "move {id}: nothing wrote its disk copies for {IDLE:?} and the VM did not arrive: removing them"
            );
            drop_copies(&d, &id);
            return;
        }
    }
}

/// Stop serving move `id`'s copies and remove them (the move will not run here).
pub fn drop_copies(d: &Daemon, id: &str) {
    let served = d.lock().targets.remove(id);
    let files: Vec<PathBuf> = match served {
        Some(s) => {
            s.stop.notify_one();
            s.disks.into_iter().map(|(_, p, _)| p).collect()
        }
        None => match state::read_json::<TargetRecord>(&d.state.targets_record(id)) {
            Ok(Some(r)) => r.files,
            _ => return,
        },
    };
    for f in &files {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!("move {id}: removed the copy {}", f.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("move {id}: removing the copy {}: {e}", f.display()),
        }
    }
    let _ = std::fs::remove_file(d.state.targets_record(id));
}

/// The arriving move `id` is decided: committed, its VM runs on the copies (they stay, no
/// longer served); aborted, they go.
pub fn settled(d: &Daemon, id: &str, outcome: Outcome) {
    match outcome {
        Outcome::Committed => {
            if let Some(s) = d.lock().targets.remove(id) {
                s.stop.notify_one();
                tracing::info!("move {id}: its disk copies are {}'s disks now", s.vm);
            }
            let _ = std::fs::remove_file(d.state.targets_record(id));
        }
        Outcome::Aborted => drop_copies(d, id),
    }
}

/// `DELETE /v1/disk-targets/{id}`: the source gave the move up before its VM ran here.
pub fn delete(d: &Daemon, id: &str, peer: &Peer) -> ApiResult<()> {
    let from = d
        .lock()
        .targets
        .get(id)
        .map(|s| s.from.clone())
        .or_else(|| {
            state::read_json::<TargetRecord>(&d.state.targets_record(id))
                .ok()
                .flatten()
                .map(|r| r.from)
        });
    let Some(from) = from else { return Ok(()) };
    if !matches!(peer, Peer::Local { uid: 0 }) {
        peer_ok(d, &from, peer)?;
    }
    if d.lock().incoming.contains_key(id) {
        // The arriving move decides (its abort removes them; its commit keeps them).
        match incoming::settle(d, id, "host daemon: the source gave up the move's disks")? {
            Outcome::Committed => {
                return Err(ApiError::conflict(format!(
                    "move {id} has committed: the VM runs on {} from these disks",
                    d.name
                )))
            }
            Outcome::Aborted => {}
        }
    }
    drop_copies(d, id);
    Ok(())
}

/// After a restart: copies of moves that arrived are settled by their outcome; the others are
/// removed (nothing serves them any more, so their source's copy has failed).
pub fn recover(d: &Daemon) {
    for (id, _) in d.state.records(".targets.json") {
        match incoming::record(d, &id).get(&id) {
            Ok(Some(o)) => settled(d, &id, o),
            // Still arriving (its receiving VMM may commit): the arriving move settles them.
            _ if d.lock().incoming.contains_key(&id) => {}
            _ => {
                tracing::warn!(
                    "move {id} had disk copies here when the daemon stopped: removing them"
                );
                drop_copies(d, &id);
            }
        }
    }
}

/// Who may open a move's copies: its source host (by certificate), nobody else.
struct Provider {
    exports: BTreeMap<String, Arc<dyn Export>>,
    /// The identity the client's certificate must have (`host NAME`); None without a cluster.
    allowed: Option<String>,
}

impl Provider {
    fn may(&self, peer: &NbdPeer) -> bool {
        match &self.allowed {
            Some(a) => peer.tls_identity.as_deref() == Some(a.as_str()),
            None => true,
        }
    }
}

impl ExportProvider for Provider {
    fn open(&self, name: &str, peer: &NbdPeer) -> Result<Arc<dyn Export>, Refusal> {
        if !self.may(peer) {
            return Err(Refusal::Policy(format!(
                "only {} writes these copies",
                self.allowed.as_deref().unwrap_or_default()
            )));
        }
        self.exports
            .get(name)
            .cloned()
            .ok_or_else(|| Refusal::Unknown(name.into()))
    }

    fn list(&self, peer: &NbdPeer) -> Vec<String> {
        if self.may(peer) {
            self.exports.keys().cloned().collect()
        } else {
            Vec::new()
        }
    }
}

/// A copy, noting when it was last used (so an abandoned move's copies can be given up).
struct Touched {
    inner: RawFileExport,
    last_use: Arc<AtomicU64>,
}

impl Touched {
    fn touch(&self) {
        self.last_use.store(vmm::now_ms(), Ordering::Relaxed);
    }
}

impl Export for Touched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.touch();
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.touch();
        self.inner.write_at(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.touch();
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.touch();
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.touch();
        self.inner.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        self.touch();
        self.inner.block_status(offset, len)
    }
    fn check_write(&self) -> Result<(), Errno> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: Option<&str>) -> NbdPeer {
        NbdPeer {
            addr: "10.0.0.1:5000".parse().unwrap(),
            tls_identity: id.map(String::from),
        }
    }

    #[test]
    fn only_the_source_host_opens_or_lists_a_move_s_copies() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("c.img")).unwrap();
        f.set_len(1 << 20).unwrap();
        let export: Arc<dyn Export> = Arc::new(Touched {
            inner: RawFileExport::from_file(f, false).unwrap(),
            last_use: Arc::new(AtomicU64::new(0)),
        });
        let p = Provider {
            exports: BTreeMap::from([("tok-0".to_string(), export)]),
            allowed: Some("host hv1".into()),
        };
        assert!(p.open("tok-0", &peer(Some("host hv1"))).is_ok());
        assert_eq!(p.list(&peer(Some("host hv1"))), vec!["tok-0".to_string()]);
        for stranger in [
            Some("host hv3"),
            Some("admin hv1"),
            Some("fileserver hv1"),
            None,
        ] {
            assert!(
                matches!(p.open("tok-0", &peer(stranger)), Err(Refusal::Policy(_))),
                "{stranger:?} must be refused"
            );
            assert!(p.list(&peer(stranger)).is_empty());
        }
        assert!(matches!(
            p.open("tok-1", &peer(Some("host hv1"))),
            Err(Refusal::Unknown(_))
        ));
    }
}
