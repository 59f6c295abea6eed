//! ferry's file server, `ferry share run`: shares of disk images, each with an access list
//! naming hosts by their certificate, served over NBD (the standard network block protocol,
//! so qemu-img, qemu-nbd and libnbd work against it), one writer per disk enforced here by a
//! fenced write lease. The same shape as the host daemon: a state directory, a management API
//! (HTTP/1.1 + JSON, mutual TLS, a local socket), the same transport and credentials.
//!
//! ```text
//! <state>/share.lock        held (flock) by the one file server using this directory
//! <state>/share.sock        the local API socket
//! <state>/catalog.json      shares, access lists, leases
//! <state>/shares/<name>/    a share's folder unless created with another path; <disk>.raw
//! <state>/tls/              the file server's credentials (`ferry share join`)
//! ```

pub mod exports;
pub mod routes;
pub mod store;

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_auth::{Identity, Role};
use ferry_hostd::security::Security;
use ferry_hostd::transport;

/// How to run the file server.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub state_dir: PathBuf,
    /// The management API's TCP address.
    pub listen: Option<String>,
    /// Where NBD clients connect.
    pub nbd_listen: String,
    /// Serve without a cluster: no TLS, anyone who reaches the ports may use every disk.
    pub insecure: bool,
}

/// Why the file server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot use state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another ferry file server (process {holder}) already uses {path}; stop it first, or give this one its own --state-dir")]
    Locked { path: PathBuf, holder: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Security(#[from] ferry_hostd::security::SecurityError),
    #[error("{0}")]
    Auth(#[from] ferry_auth::AuthError),
    #[error("file server {name} has not joined a cluster, so it cannot check who its clients are: `ferry share join --authority ADDR --token T` (a token from `ferry cluster token --role fileserver --name {name}`), or pass --insecure on a trusted lab network")]
    NotJoined { name: String },
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running file server.
pub struct ShareServer {
    pub name: String,
    pub store: Arc<store::Store>,
    pub security: Option<Security>,
    /// The NBD address clients use.
    pub nbd: String,
    pub state: PathBuf,
}

fn lock_dir(root: &Path) -> Result<std::fs::File, RunError> {
    let st = |source| RunError::State {
        path: root.into(),
        source,
    };
    std::fs::create_dir_all(root.join("shares")).map_err(st)?;
    let p = root.join("share.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(st)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut h = String::new();
            let _ = f.read_to_string(&mut h);
            return Err(RunError::Locked {
                path: root.into(),
                holder: h.trim().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(st(e)),
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

/// Run the file server until the process ends.
pub async fn run(o: Options) -> Result<(), RunError> {
    let root = std::path::absolute(&o.state_dir).map_err(|source| RunError::State {
        path: o.state_dir.clone(),
        source,
    })?;
    let _lock = lock_dir(&root)?;
    let me = Identity::new(Role::FileServer, &o.name)?;
    let security = Security::load_as(&root, &me)?;
    if security.is_none() && !o.insecure {
        return Err(RunError::NotJoined { name: o.name });
    }
    let store = Arc::new(store::Store::open(&root)?);
    let server_tls = security.as_ref().map(|s| s.server.clone());
    let nbd_tls = server_tls
        .clone()
        .map(|config| ferry_nbd::server::ServerTls {
            config,
            required: true,
            identity: Some(ferry_auth::tls::client_identity),
        });
    let nbd_listener = tokio::net::TcpListener::bind(&o.nbd_listen)
        .await
        .map_err(|source| RunError::Listen {
            what: o.nbd_listen.clone(),
            source,
        })?;
    let nbd = nbd_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(o.nbd_listen.clone());
    let s = Arc::new(ShareServer {
        name: o.name.clone(),
        store: store.clone(),
        security,
        nbd: nbd.clone(),
        state: root.clone(),
    });
    let sock = root.join("share.sock");
    let unix = transport::Listener::unix(sock.clone())
        .await
        .map_err(|source| RunError::Listen {
            what: sock.display().to_string(),
            source,
        })?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = routes::router(s.clone());
    let mut tasks = vec![tokio::spawn(ferry_hostd::server::serve(
        unix,
        router.clone(),
        stop_rx.clone(),
    ))];
    if let Some(a) = &o.listen {
        let l = transport::Listener::tcp(a, server_tls)
            .await
            .map_err(|source| RunError::Listen {
                what: a.clone(),
                source,
            })?;
        tasks.push(tokio::spawn(ferry_hostd::server::serve(l, router, stop_rx)));
    }
    let provider = Arc::new(exports::Exports {
        store,
        secure: s.security.is_some(),
    });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = ferry_nbd::server::serve(nbd_listener, provider, nbd_tls).await {
            tracing::error!("NBD server stopped: {e}");
        }
    }));
    tracing::info!(
        "ferry file server {} up: {}{}; NBD on {nbd}{}",
        o.name,
        sock.display(),
        o.listen
            .as_deref()
            .map(|l| format!(", {l}"))
            .unwrap_or_default(),
        if s.security.is_some() {
            " (TLS required)"
        } else {
            " (no TLS: insecure)"
        }
    );
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
