//! The management API's routes: each handler checks its input, calls into the daemon, and
//! answers with one of `ferry_api::host`'s types or an `ErrorBody`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use ferry_api::host::*;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::transport::Peer;
use crate::{check, incoming, moves};

type D = State<Arc<Daemon>>;

/// A JSON body whose rejection is an `ErrorBody` saying what was wrong.
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "bad request body: {}",
                e.body_text()
            ))),
        }
    }
}

fn json<T: serde::Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

/// The router over a daemon.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/host", get(host).patch(set_host))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{name}", get(vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/moves/check", post(check_move))
        .route("/v1/moves/forecast", post(forecast_move))
        .route("/v1/moves", get(list_moves).post(start_move))
        .route("/v1/moves/{id}", get(get_move))
        .route("/v1/moves/{id}/events", get(move_events))
        .route("/v1/moves/{id}/cancel", post(cancel_move))
        .route("/v1/evacuate", post(evacuate))
        .route("/v1/incoming/check", post(incoming_check))
        .route("/v1/incoming/probe", post(incoming_probe))
        .route("/v1/incoming", post(incoming_start))
        .route("/v1/incoming/{id}", get(incoming_info))
        .route("/v1/incoming/{id}/settle", post(incoming_settle))
        .route("/v1/incoming/{id}/abort", post(incoming_abort))
        .route("/v1/disk-targets", post(disk_targets_start))
        .route(
            "/v1/disk-targets/{id}",
            axum::routing::delete(disk_targets_delete),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/audit", get(audit))
        .merge(crate::cluster::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(d.clone(), authorise))
        .with_state(d)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {} {} (see GET /v1/openapi.json)",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {} (see GET /v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn openapi() -> Response {
    json(ferry_api::openapi::document())
}

async fn host(State(d): D) -> Response {
    json(d.host_info())
}

async fn set_host(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(p): Body<HostSettingsPatch>,
) -> ApiResult<Response> {
    let what = format!("set {}", serde_json::to_string(&p).unwrap_or_default());
    let r = d.set_settings(p);
    crate::audit::record(
        &d.state.root,
        &peer,
        &what,
        r.as_ref().err().map(|e| e.body.error.as_str()),
        None,
    );
    Ok(json(r?))
}

async fn vms(State(d): D) -> Response {
    json(VmList { vms: d.vms() })
}

async fn vm(State(d): D, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(json(d.vm(&name)?))
}

async fn create_vm(State(d): D, Body(req): Body<VmCreate>) -> ApiResult<Response> {
    let v = d.create(req).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn delete_vm(State(d): D, Path(name): Path<String>) -> ApiResult<Response> {
    d.delete(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start_vm(State(d): D, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(json(d.start(&name).await?))
}

async fn stop_vm(
    State(d): D,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let stop: VmStop = if body.iter().all(|b| b.is_ascii_whitespace()) {
        VmStop::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))?
    };
    Ok(json(d.stop(&name, stop.force).await?))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    port: Option<u8>,
}

/// A VM's serial port as a WebSocket: bytes from the guest as binary messages, and what the
/// client sends goes to the guest.
async fn console(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let info = d.vm(&name)?;
    let path = match q.port.unwrap_or(1) {
        1 => info.console,
        2 => info.console2,
        p => {
            return Err(ApiError::bad_request(format!(
                "port {p}: a VM has ports 1 and 2"
            )))
        }
    };
    if !matches!(
        info.state,
        VmState::Running | VmState::Paused | VmState::Moving
    ) {
        return Err(ApiError::conflict(format!(
            "{name} is {:?}: no console",
            info.state
        )));
    }
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!(
            "the console is a WebSocket (use `ferry vm console {name}`): {e}"
        ))
    })?;
    let sock = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| ApiError::conflict(format!("{name}'s console {path} is not there: {e}")))?;
    Ok(ws.on_upgrade(move |socket| pump(socket, sock)))
}

async fn pump(socket: WebSocket, sock: tokio::net::UnixStream) {
    let (mut tx, mut rx) = socket.split();
    let (mut r, mut w) = sock.into_split();
    let up = async {
        let mut buf = vec![0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = rx.next().await {
            let bytes = match m {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if w.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn check_move(State(d): D, Body(req): Body<MoveRequest>) -> ApiResult<Response> {
    if crate::storage::is_storage_only(&d, &req) {
        return Ok(json(crate::storage::check(&d, &req).await?));
    }
    if crate::shared_nothing::wants(&d, &req) {
        return Ok(json(crate::shared_nothing::check(&d, &req, None).await?.0));
    }
    Ok(json(
        check::check_move(&d, &req.vm, &req.to, None, &[]).await?,
    ))
}

async fn start_move(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(req): Body<MoveRequest>,
) -> ApiResult<Response> {
    let m = moves::start(&d, req, &peer).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(m)).into_response())
}

async fn list_moves(State(d): D) -> Response {
    json(MoveList {
        moves: moves::list(&d),
    })
}

async fn get_move(State(d): D, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(moves::get(&d, &id)?))
}

async fn cancel_move(State(d): D, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(moves::cancel(&d, &id)?))
}

/// A move's changes as server-sent events; the stream ends after the final state.
async fn move_events(State(d): D, Path(id): Path<String>) -> ApiResult<Response> {
    let mut rx = moves::subscribe(&d, &id)?;
    let stream = async_stream(move |tx| async move {
        loop {
            let info = rx.borrow_and_update().clone();
            let done = info.state.is_final();
            let ev = Event::default().data(serde_json::to_string(&info).unwrap_or_default());
            if tx.send(Ok::<_, Infallible>(ev)).await.is_err() || done {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response())
}

/// A stream fed by a task through a channel.
fn async_stream<T, F, Fut>(f: F) -> impl futures_util::Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn evacuate(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<Response> {
    let e = moves::evacuate(&d, req, &peer).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(e)).into_response())
}

async fn incoming_check(State(d): D, Body(req): Body<IncomingCheck>) -> Response {
    json(check::incoming(&d, &req))
}

async fn incoming_probe(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(req): Body<IncomingCheck>,
) -> ApiResult<Response> {
    Ok(json(incoming::probe(&d, &req, &peer)?))
}

async fn forecast_move(State(d): D, Body(req): Body<MoveRequest>) -> ApiResult<Response> {
    Ok(json(moves::forecast(&d, &req).await?))
}

async fn incoming_start(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(req): Body<IncomingRequest>,
) -> ApiResult<Response> {
    let r = incoming::start(&d, req, &peer).await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

async fn disk_targets_start(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(req): Body<IncomingRequest>,
) -> ApiResult<Response> {
    let r = crate::targets::start(&d, req, &peer).await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

async fn disk_targets_delete(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    crate::targets::delete(&d, &id, &peer)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn incoming_info(State(d): D, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(incoming::info(&d, &id)?))
}

async fn incoming_settle(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    incoming::may_decide(&d, &id, &peer)?;
    Ok(json(incoming::settle_api(&d, &id)?))
}

async fn incoming_abort(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    incoming::may_decide(&d, &id, &peer)?;
    Ok(json(incoming::abort(&d, &id)?))
}

async fn audit(State(d): D) -> Response {
    json(ferry_api::cluster::AuditList {
        entries: crate::audit::read(&d.state.root, 500),
    })
}

/// Who may call what. The local socket is for root (the host's own console); over TLS, admins
/// may manage the host, and other hosts may only do what a move needs of them; plain TCP
/// exists only on a daemon run with --insecure. A refusal is audited.
async fn authorise(State(d): D, req: Request, next: axum::middleware::Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let for_hosts = path.starts_with("/v1/incoming") || path.starts_with("/v1/disk-targets");
    let host_ok = for_hosts
        || (method == axum::http::Method::GET && path.starts_with("/v1/cluster"))
        || (method == axum::http::Method::POST && path == "/v1/cluster/doc");
    let refusal = match &peer {
        Some(Peer::Local { uid: 0 }) | Some(Peer::Insecure(_)) => None,
        Some(Peer::Local { uid }) => Some(format!(
            "user {uid} may not manage {}: the local socket is for root",
            d.name
        )),
        Some(Peer::Cert { identity, .. }) => match identity.role {
            ferry_auth::Role::Admin if for_hosts => Some(format!(
                "{identity} may not call {path}: it is for hosts sending VMs here"
            )),
            ferry_auth::Role::Admin => None,
            _ if host_ok => None,
            _ => Some(format!(
                "{identity} may not call {method} {path} on {}",
                d.name
            )),
        },
        Some(Peer::Anonymous(a)) => Some(format!("{a} presented no certificate")),
        None => Some("no peer".into()),
    };
    match refusal {
        None => next.run(req).await,
        Some(why) => {
            let who = peer.unwrap_or(Peer::Local { uid: u32::MAX });
            crate::audit::record(
                &d.state.root,
                &who,
                &format!("{method} {path}"),
                Some(&why),
                None,
            );
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response()
        }
    }
}
