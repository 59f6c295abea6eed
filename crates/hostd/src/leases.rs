//! Write leases of a VM's disks on a file server's share (`nbds://FILESERVER/share/disk`): the
//! file server lets only the lease holder write, under the fence number the lease had when the
//! connection opened. A host takes a disk's lease before it starts the VM, gives it up when
//! the VM stops or has moved away, and the destination of a move takes it once the move has
//! committed, after the source gave it up (until then the resumed guest's writes wait in its
//! VMM, which reconnects and resends them as soon as the lease is its host's: never two
//! writers, and nothing acknowledged that did not reach the disk).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::share::{DiskInfo, LeaseAction, LeaseRequest};
use ferry_api::VmConfig;
use ferry_nbd::client::parse_uri;

use crate::client::Client;
use crate::daemon::Daemon;
use crate::transport::Endpoint;

/// A disk on a share, and the file server's API that holds its lease.
struct SharedDisk {
    uri: String,
    server: String,
    client: Client,
    share: String,
    disk: String,
}

/// The file server of this host's cluster that exports `uri`, and the share and disk there
/// (`None`: no cluster, not a ferry share, or not a file server of the cluster).
pub(crate) fn file_server_of(
    d: &Daemon,
    uri: &str,
) -> Option<(ferry_auth::doc::Member, String, String)> {
    let u = parse_uri(uri).ok()?;
    let (share, name) = u.export.split_once('/')?;
    let doc = d.security.as_ref()?.trust.doc();
    let fs = doc
        .file_servers
        .into_iter()
        .find(|m| m.addr.rsplit_once(':').map(|(h, _)| h) == Some(u.host.as_str()))?;
    Some((fs, share.into(), name.into()))
}

/// A client of file server `fs`'s API, with this host's credentials.
pub(crate) fn file_server_client(
    d: &Daemon,
    fs: &ferry_auth::doc::Member,
    timeout: Duration,
) -> Result<Client, String> {
    let sec = d
        .security
        .as_ref()
        .ok_or_else(|| format!("{} is in no cluster: it knows no file servers", d.name))?;
    let tls = sec.client_tls(&fs.name).map_err(|e| e.to_string())?;
    Ok(Client::with_tls(Endpoint::Tcp(fs.addr.clone()), Some(tls)).with_timeout(timeout))
}

/// The share disks of `config`, each with a client for its file server's API.
fn shared_disks(d: &Daemon, config: &VmConfig) -> Result<Vec<SharedDisk>, String> {
    let mut v = Vec::new();
    for disk in &config.disks {
        let Some(uri) = disk.nbd_uri() else { continue };
        if disk.read_only {
            continue;
        }
        // Any other NBD server, or no cluster (file servers run --insecure): no lease to take.
        let Some((fs, share, name)) = file_server_of(d, uri) else {
            continue;
        };
        v.push(SharedDisk {
            uri: uri.to_string(),
            server: fs.name.clone(),
            client: file_server_client(d, &fs, Duration::from_secs(5))?,
            share,
            disk: name,
        });
    }
    Ok(v)
}

async fn lease(s: &SharedDisk, req: &LeaseRequest) -> Result<DiskInfo, crate::ClientError> {
    s.client
        .post(
            &format!("/v1/shares/{}/disks/{}/lease", s.share, s.disk),
            req,
        )
        .await
}

/// Take the write lease of every share disk of `config` (before starting its VMM).
pub async fn acquire(d: &Daemon, config: &VmConfig) -> Result<(), String> {
    for s in shared_disks(d, config)? {
        let i = lease(&s, &LeaseRequest::new(LeaseAction::Acquire))
            .await
            .map_err(|e| {
                format!(
                    "cannot take the write lease of {} from file server {}: {e}",
                    s.uri, s.server
                )
            })?;
        tracing::info!("write lease of {} taken (fence {})", s.uri, i.lease.fence);
    }
    Ok(())
}

/// Take the leases once the previous holder (a move's source) has handed them over: keep
/// asking for up to `wait`. `grant`: the delegated move's grant, which the file server wants
/// to see when the source handed the lease over under it.
pub async fn acquire_when_free(
    d: Arc<Daemon>,
    config: VmConfig,
    wait: Duration,
    grant: Option<String>,
) {
    let req = LeaseRequest {
        grant,
        ..LeaseRequest::new(LeaseAction::Acquire)
    };
    let disks = match shared_disks(&d, &config) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("leases: {e}");
            return;
        }
    };
    for s in disks {
        let deadline = Instant::now() + wait;
        loop {
            match lease(&s, &req).await {
                Ok(i) => {
                    tracing::info!(
                        "write lease of {} taken over (fence {})",
                        s.uri,
                        i.lease.fence
                    );
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("waiting for the write lease of {}: {e}", s.uri);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::error!(
                        "could not take the write lease of {} within {wait:?}: {e}; the guest's writes wait, then fail",
                        s.uri
                    );
                    break;
                }
            }
        }
    }
}

/// Give up the leases (the VM stopped here, or runs elsewhere now). Best effort: a lease that
/// stays is refused to others until an admin breaks it, which is safe.
pub async fn release(d: &Daemon, config: &VmConfig) {
    let disks = match shared_disks(d, config) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("leases: {e}");
            return;
        }
    };
    for s in disks {
        match lease(&s, &LeaseRequest::new(LeaseAction::Release)).await {
            Ok(_) => tracing::info!("write lease of {} given up", s.uri),
            Err(e) => tracing::warn!("giving up the write lease of {}: {e}", s.uri),
        }
    }
}

/// A move committed: hand the leases over to its destination `to` (nobody else may take them
/// next), under the move's grant in delegated mode. An unreachable file server is asked again
/// for a minute (the destination's guest writes wait meanwhile); a refusal is logged: the
/// destination cannot write until an admin breaks the lease.
pub async fn hand_over(d: &Daemon, config: &VmConfig, to: &str, grant: Option<String>) {
    let disks = match shared_disks(d, config) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("leases: {e}");
            return;
        }
    };
    let req = LeaseRequest {
        to: Some(to.to_string()),
        grant,
        ..LeaseRequest::new(LeaseAction::HandOver)
    };
    for s in disks {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match lease(&s, &req).await {
                Ok(_) => {
                    tracing::info!("write lease of {} handed over to {to}", s.uri);
                    break;
                }
                Err(crate::ClientError::Api { status, body }) => {
                    tracing::error!(
                        "file server {} refused to hand the write lease of {} over to {to} ({status}): {}",
                        s.server,
                        s.uri,
                        body.error
                    );
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(
                        "handing the write lease of {} over: {e}; asking again",
                        s.uri
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(
                        "could not hand the write lease of {} over to {to}: {e}",
                        s.uri
                    );
                    break;
                }
            }
        }
    }
}
