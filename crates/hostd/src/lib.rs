//! ferry's host daemon (`ferry host run`): it owns the host's VMs (one definition each in its
//! state directory, one VMM process per running VM), keeps the host's migration settings,
//! serves the management API (HTTP/1.1 + JSON on an address and a local unix socket), and
//! drives live moves to other hosts' daemons.
//!
//! - [`daemon`]: the state and the VM operations, the VMM supervisor;
//! - [`moves`]: moves sent from here; [`incoming`]: moves arriving, and who owns a VM;
//! - [`check`]: the compatibility check; [`hostinfo`]: what this host is;
//! - [`vmm`]: VMM processes and their control sockets; [`state`]: the state directory;
//! - [`routes`], [`server`], [`error`]: the API; [`transport`], [`client`]: the one place
//!   connections are made and accepted (mutual TLS will wrap it).

pub mod audit;
pub mod check;
pub mod client;
pub mod cluster;
pub mod daemon;
pub mod error;
pub mod hostinfo;
pub mod incoming;
pub mod leases;
pub mod moves;
pub mod routes;
pub mod security;
pub mod server;
pub mod shared_nothing;
pub mod state;
pub mod storage;
pub mod targets;
pub mod transport;
pub mod vmm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use client::{Client, ClientError};
pub use transport::Endpoint;

/// How to run a daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// This host's name (others reach it as a peer by this name).
    pub name: String,
    pub state_dir: PathBuf,
    /// A TCP address to serve on besides the local socket.
    pub listen: Option<String>,
    /// Other hosts: name -> their daemon's `host:port`.
    pub peers: BTreeMap<String, String>,
    /// The `ferry` binary that VMMs run from.
    pub ferry: PathBuf,
    /// Serve `listen` over plain TCP without a cluster (a trusted lab network only).
    pub insecure: bool,
    /// Where the cluster authority's enrolment port listens (default: `listen`'s port + 1), on
    /// the host that holds the authority.
    pub enrol_listen: Option<String>,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Security(#[from] security::SecurityError),
    #[error("{name} has not joined a cluster, so it cannot serve {listen} over mutual TLS: join one (`ferry host join --authority ADDR --token T`, or `ferry cluster init` on the first host), or pass --insecure to serve plain TCP on a trusted network")]
    NotJoined { name: String, listen: String },
}

/// Run a daemon until SIGINT or SIGTERM. Its VMMs keep running after it stops.
pub async fn run(o: Options) -> Result<(), RunError> {
    let state = state::StateDir::open(&o.state_dir)?;
    let features = tokio::task::spawn_blocking(ferry_vmm::host_cpu_features)
        .await
        .ok()
        .and_then(|r| {
            r.map_err(|e| {
                tracing::warn!(
                    "cannot read the CPU features KVM offers ({}); VMs cannot start here",
                    ferry_vmm::error_chain(&e)
                )
            })
            .ok()
        })
        .unwrap_or_default();
    let sock = state.socket();
    let security = security::Security::load(&state.root, &o.name)?;
    if let (None, Some(l), false) = (&security, &o.listen, o.insecure) {
        return Err(RunError::NotJoined {
            name: o.name.clone(),
            listen: l.clone(),
        });
    }
    let server_tls = security.as_ref().map(|s| s.server.clone());
    let enrolment_tls = security.as_ref().and_then(|s| s.enrolment.clone());
    let d = Arc::new(daemon::Daemon::new(
        o.name.clone(),
        state,
        o.ferry.clone(),
        o.peers.clone(),
        o.listen.clone(),
        features,
        security,
    )?);
    let unix = transport::Listener::unix(sock.clone())
        .await
        .map_err(|source| RunError::Listen {
            what: sock.display().to_string(),
            source,
        })?;
    let tcp = match &o.listen {
        Some(a) => Some(
            transport::Listener::tcp(a, server_tls.clone())
                .await
                .map_err(|source| RunError::Listen {
                    what: a.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let enrol = match (
        &enrolment_tls,
        o.enrol_listen
            .clone()
            .or_else(|| o.listen.as_deref().and_then(cluster::enrolment_addr)),
    ) {
        (Some(cfg), Some(a)) => Some(
            transport::Listener::tcp(&a, Some(cfg.clone()))
                .await
                .map_err(|source| RunError::Listen {
                    what: a.clone(),
                    source,
                })?,
        ),
        _ => None,
    };
    // VMs found running again: ask each for its state before answering anyone.
    let names: Vec<String> = d.lock().vms.keys().cloned().collect();
    for n in names {
        d.refresh(&n).await;
    }
    incoming::recover(&d);
    targets::recover(&d);
    moves::recover(&d);
    tokio::spawn(storage::recover(d.clone()));
    tokio::spawn(shared_nothing::recover(d.clone()));
    tokio::spawn(d.clone().supervise());
    tokio::spawn(cluster::keep_current(d.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = routes::router(d.clone());
    let mut servers = vec![tokio::spawn(server::serve(
        unix,
        router.clone(),
        stop_rx.clone(),
    ))];
    if let Some(t) = tcp {
        servers.push(tokio::spawn(server::serve(t, router, stop_rx.clone())));
    }
    if let Some(e) = enrol {
        tracing::info!("cluster authority: enrolment on {}", e.describe());
        servers.push(tokio::spawn(server::serve(
            e,
            cluster::enrolment_routes(d.clone()),
            stop_rx,
        )));
    }
    let vms = d.vms().len();
    tracing::info!(
        "ferry host daemon {} up: {}{}; {vms} VMs known, live migration {}",
        o.name,
        sock.display(),
        o.listen
            .as_ref()
            .map(|a| format!(" and {a}"))
            .unwrap_or_default(),
        if d.lock().settings.live_migration {
            "on"
        } else {
            "off"
        }
    );
    eprintln!(
        "ferry: host daemon {} serving on unix:{}{}",
        o.name,
        sock.display(),
        o.listen
            .as_ref()
            .map(|a| format!(" and {a}"))
            .unwrap_or_default()
    );
    wait_for_stop().await;
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let running = d.vms().iter().filter(|v| v.pid.is_some()).count();
    eprintln!(
        "ferry: host daemon {} stopped; {running} VMs keep running",
        o.name
    );
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
