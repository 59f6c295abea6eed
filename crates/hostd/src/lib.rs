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

pub mod check;
pub mod client;
pub mod daemon;
pub mod error;
pub mod hostinfo;
pub mod incoming;
pub mod moves;
pub mod routes;
pub mod server;
pub mod state;
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
    let d = Arc::new(daemon::Daemon::new(
        o.name.clone(),
        state,
        o.ferry.clone(),
        o.peers.clone(),
        o.listen.clone(),
        features,
    )?);
    let unix = transport::Listener::unix(sock.clone())
        .await
        .map_err(|source| RunError::Listen {
            what: sock.display().to_string(),
            source,
        })?;
    let tcp = match &o.listen {
        Some(a) => Some(
            transport::Listener::tcp(a)
                .await
                .map_err(|source| RunError::Listen {
                    what: a.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    incoming::recover(&d);
    moves::recover(&d);
    tokio::spawn(d.clone().supervise());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = routes::router(d.clone());
    let mut servers = vec![tokio::spawn(server::serve(
        unix,
        router.clone(),
        stop_rx.clone(),
    ))];
    if let Some(t) = tcp {
        servers.push(tokio::spawn(server::serve(t, router, stop_rx)));
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
