//! Serving the API (the mini-redis shape): a task per listener that accepts, a task per
//! connection, a bound on connections, and a shutdown signal every accept loop watches.

use std::sync::Arc;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::transport::Listener;

/// Most connections served at once (each follower of a move holds one).
const MAX_CONNECTIONS: usize = 256;

/// Serve `router` on `listener` until `shutdown` turns true.
pub async fn serve(listener: Listener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let what = listener.describe();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let accepted = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting on {what}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (conn, peer) = match accepted.finish().await {
                Ok(c) => c,
                Err(e) => {
                    // A client without a certificate of this cluster, or a revoked one.
                    tracing::warn!("refused a connection: {e}");
                    return;
                }
            };
            let svc =
                router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                });
            let r = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), TowerToHyperService::new(svc))
                .with_upgrades()
                .await;
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        });
    }
}
