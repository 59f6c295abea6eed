//! `ferry ui`: the web console. One process, next to the CLI and with the CLI's reach (its
//! config, the admin's credentials, the cluster document), serving HTTPS to browsers:
//!
//! - the console's page and script (`crates/cli/ui/`, embedded in the binary; nothing is
//!   loaded from anywhere else);
//! - `/api/...`: the hosts' and file servers' own management APIs passed through
//!   (`/api/hosts/HOST/X` is `HOST`'s `/v1/X`, `/api/shares/SERVER/X` the file server's), plus
//!   the few things only an admin's side can do: an overview of every host, its live stream,
//!   and starting a move (which signs the admin's grant, as `ferry move` does).
//!
//! Nothing answers before login: `ferry ui` prints a one-time login link (as Jupyter does); it
//! sets a session cookie (HttpOnly, Secure, SameSite=Strict) and sends the browser on to a URL
//! without it; a new link is printed for the next login. Requests that change anything carry
//! the session's CSRF token in a header, and a request from another origin is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Form, Json, Router};
use clap::Args;
use ferry_api::host::{
    CheckReport, DiskMove, ErrorBody, HostInfo, MoveInfo, MoveList, MoveRequest, MoveSettings,
    VmInfo, VmList,
};
use ferry_api::share::{ShareList, ShareServerInfo};
use ferry_hostd::{Client, ClientError};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message as TMessage;

use crate::target::Targets;

#[derive(Args)]
pub struct UiArgs {
    /// Where to serve the console over HTTPS (ADDRESS:PORT; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7780")]
    listen: SocketAddr,
    /// The certificate (PEM, leaf first) to serve, e.g. one your cluster's CA or your
    /// organisation issued; without it ferry makes a self-signed one at start and prints its
    /// fingerprint.
    #[arg(long, requires = "key", value_name = "PEM")]
    cert: Option<PathBuf>,
    /// The certificate's private key (PKCS#8 PEM).
    #[arg(long, requires = "cert", value_name = "PEM")]
    key: Option<PathBuf>,
    /// A file server whose shares the console shows (a name from the cluster document or the
    /// CLI config, host:port or unix:PATH); may be repeated. Default: every file server the
    /// cluster document names, and $FERRY_SHARE_SERVER.
    #[arg(long = "share-server", value_name = "SERVER")]
    share_servers: Vec<String>,
    /// A login ends after this many minutes without a request.
    #[arg(long, default_value_t = 720, value_name = "MIN")]
    idle_min: u64,
}

/// The session cookie's name.
const COOKIE: &str = "ferry_session";
/// The header a changing request carries its session's CSRF token in.
const CSRF_HEADER: &str = "x-ferry-csrf";
/// Largest request body passed through (JSON bodies are small).
const MAX_BODY: usize = 1 << 20;
/// How often the overview stream looks for changes.
const WATCH_EVERY: Duration = Duration::from_millis(1000);
/// How long the overview waits for one host.
const HOST_TIMEOUT: Duration = Duration::from_secs(3);

const INDEX_HTML: &str = include_str!("../ui/index.html");
const LOGIN_HTML: &str = include_str!("../ui/login.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");

struct Session {
    csrf: String,
    last: Instant,
}

struct Ui {
    t: Targets,
    share_servers: Vec<String>,
    /// The one-time login token in force.
    login: Mutex<String>,
    sessions: Mutex<HashMap<String, Session>>,
    /// File servers' own names, by how the console reaches them.
    titles: Mutex<HashMap<String, String>>,
    idle: Duration,
    /// `https://ADDR` as printed, for new login links.
    base: String,
}

type S = State<Arc<Ui>>;

/// An error answer, shaped as every ferry API's (`ErrorBody`).
fn error(status: StatusCode, code: &str, msg: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: msg.into(),
            code: code.into(),
            check: None,
        }),
    )
        .into_response()
}

fn client_error(e: ClientError) -> Response {
    match e {
        ClientError::Api { status, body } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            Json(body),
        )
            .into_response(),
        e => error(StatusCode::BAD_GATEWAY, "unreachable", format!("{e:#}")),
    }
}

fn anyhow_error(e: anyhow::Error) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", format!("{e:#}"))
}

impl Ui {
    /// Every host the console shows: the CLI config's, then those the cluster document adds.
    fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.t.config.hosts.keys().cloned().collect();
        if let Some(a) = &self.t.admin {
            for m in a.trust.doc().hosts {
                if !v.contains(&m.name) {
                    v.push(m.name);
                }
            }
        }
        if let Some(h) = &self.t.host {
            if !v.contains(h) {
                v.push(h.clone());
            }
        }
        if v.is_empty() {
            v.push("local".into());
        }
        v
    }

    fn host_client(&self, name: &str) -> Result<Client> {
        if !self.hosts().iter().any(|h| h == name) {
            anyhow::bail!("{name:?} is not one of the console's hosts");
        }
        match self.t.resolve(name) {
            Ok((_, c)) => Ok(c),
            Err(_) if name == "local" => Ok(self.t.default()?.1),
            Err(e) => Err(e),
        }
    }

    fn share_servers(&self) -> Vec<String> {
        let mut v = self.share_servers.clone();
        if let Some(a) = &self.t.admin {
            for m in a.trust.doc().file_servers {
                if !v.contains(&m.name) && !v.contains(&m.addr) {
                    v.push(m.name);
                }
            }
        }
        v
    }

    fn share_client(&self, name: &str) -> Result<Client> {
        if !self.share_servers().iter().any(|s| s == name) {
            anyhow::bail!("{name:?} is not one of the console's file servers");
        }
        Ok(crate::share_cmd::share_client(&self.t, Some(name.into()))?.1)
    }

    /// A file server's own name, asked once (`/v1/share-server`), then remembered.
    async fn server_title(&self, name: &str, c: &Client) -> String {
        if let Some(t) = self
            .titles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return t.clone();
        }
        match c.get::<ShareServerInfo>("/v1/share-server").await {
            Ok(i) => {
                self.titles
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.into(), i.name.clone());
                i.name
            }
            Err(_) => name.into(),
        }
    }

    /// A new one-time login link (the old one stops working).
    fn new_login(&self) -> Result<String> {
        let token = ferry_auth::authority::random_hex(24)?;
        *self.login.lock().unwrap_or_else(|e| e.into_inner()) = token.clone();
        Ok(format!("{}/login?token={token}", self.base))
    }

    /// The session a cookie names, if it is still alive (and now used).
    fn session(&self, id: &str) -> Option<String> {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|_, v| v.last.elapsed() < self.idle);
        let v = s.get_mut(id)?;
        v.last = Instant::now();
        Some(v.csrf.clone())
    }
}

/// `ferry ui`.
pub fn run(a: UiArgs, t: Targets) -> Result<()> {
    crate::host_cmd::rt()?.block_on(serve(a, t))
}

async fn serve(a: UiArgs, t: Targets) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {} (is another console there?)", a.listen))?;
    let addr = listener.local_addr()?;
    let host_part = if addr.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    } else {
        addr.ip().to_string()
    };
    let base = format!("https://{host_part}:{}", addr.port());
    let (chain, key, how) = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => (
            std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?,
            format!("{} (given)", c.display()),
        ),
        _ => {
            // host_part is the address itself unless it is unspecified (then the hostname).
            let mut names = vec!["localhost".to_string()];
            if !names.contains(&host_part) {
                names.push(host_part.clone());
            }
            let (key, cert) = ferry_auth::pki::new_self_signed(&names, 365)?;
            let fp = ferry_auth::pki::fingerprint(&ferry_auth::pki::cert_der(&cert)?);
            (
                cert,
                key,
                format!("self-signed for {}, SHA-256 {fp} (give --cert and --key for one your browsers trust)", names.join(", ")),
            )
        }
    };
    let tls = ferry_auth::tls::web_server_config(&chain, &key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let ui = Arc::new(Ui {
        t,
        share_servers: {
            let mut v = a.share_servers.clone();
            if let Ok(s) = std::env::var("FERRY_SHARE_SERVER") {
                if !v.contains(&s) {
                    v.push(s);
                }
            }
            v
        },
        login: Mutex::new(String::new()),
        sessions: Mutex::new(HashMap::new()),
        titles: Mutex::new(HashMap::new()),
        idle: Duration::from_secs(a.idle_min.max(1) * 60),
        base: base.clone(),
    });
    let link = ui.new_login()?;
    println!("ferry ui: the web console is at {base}/");
    println!("  certificate: {how}");
    println!("  hosts: {}", ui.hosts().join(", "));
    println!("  log in (this link works once; a new one is printed after each login):");
    println!("  {link}");
    let app = router(ui.clone());
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting on {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => {
                println!("ferry ui: stopped");
                return Ok(());
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return; // not TLS, or too slow to say hello
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let r = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .with_upgrades()
                .await;
            if let Err(e) = r {
                tracing::debug!("console connection: {e}");
            }
        });
    }
}

fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/login", get(login_get).post(login_post))
        .route("/api/session", get(session))
        .route("/api/logout", post(logout))
        .route("/api/overview", get(overview))
        .route("/api/watch", get(watch))
        .route("/api/moves", post(start_move))
        .route("/api/hosts/{host}/vms/{vm}/console", get(console))
        .route("/api/hosts/{host}/{*rest}", any(proxy_host))
        .route("/api/shares/{server}/{*rest}", any(proxy_share))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such page") })
        .layer(axum::middleware::from_fn_with_state(ui.clone(), gate))
        .layer(axum::middleware::map_response(headers))
        .with_state(ui)
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// What every answer carries: no caching, no framing, no referrer (a login link never leaks),
/// scripts and styles from this origin only.
async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Login first, for every page and call but the login page itself; then, for a call that
/// changes something, the same origin and the session's CSRF token.
async fn gate(State(ui): S, req: Request, next: Next) -> Response {
    // The login page and its stylesheet are all there is before login.
    if matches!(req.uri().path(), "/login" | "/app.css" | "/favicon.ico") {
        return next.run(req).await;
    }
    let csrf = cookie(req.headers(), COOKIE).and_then(|id| ui.session(&id));
    let Some(csrf) = csrf else {
        if req.uri().path().starts_with("/api/") {
            return error(
                StatusCode::UNAUTHORIZED,
                "login_required",
                "log in first: open the login link `ferry ui` printed",
            );
        }
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    };
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if origin.to_str().ok() != Some(&format!("https://{host}")) {
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "a request from another site's page is refused",
            );
        }
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changes
        && req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) != Some(csrf.as_str())
    {
        return error(
            StatusCode::FORBIDDEN,
            "csrf",
            format!("a request that changes something must carry the session's {CSRF_HEADER} header (reload the console)"),
        );
    }
    next.run(req).await
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    token: Option<String>,
}

async fn login_get(State(ui): S, Query(q): Query<LoginQuery>) -> Response {
    match q.token {
        Some(t) => login(&ui, &t),
        None => login_page(StatusCode::OK, ""),
    }
}

async fn login_post(State(ui): S, Form(q): Form<LoginQuery>) -> Response {
    login(&ui, q.token.as_deref().unwrap_or_default().trim())
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let msg = if message.is_empty() {
        String::new()
    } else {
        format!("<p role=\"alert\" class=\"error\">{message}</p>")
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        LOGIN_HTML.replace("<!--MESSAGE-->", &msg),
    )
        .into_response()
}

fn login(ui: &Ui, token: &str) -> Response {
    let good = {
        let cur = ui.login.lock().unwrap_or_else(|e| e.into_inner());
        // Compared as digests: the time taken says nothing about the token.
        let digest = |s: &str| ferry_auth::pki::fingerprint(s.as_bytes());
        !cur.is_empty() && digest(&cur) == digest(token)
    };
    if !good {
        return login_page(
            StatusCode::FORBIDDEN,
            "That login link was used already or is wrong. Use the newest link <code>ferry ui</code> printed in its terminal.",
        );
    }
    let (Ok(id), Ok(csrf)) = (
        ferry_auth::authority::random_hex(32),
        ferry_auth::authority::random_hex(32),
    ) else {
        return login_page(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    };
    ui.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Session {
                csrf,
                last: Instant::now(),
            },
        );
    match ui.new_login() {
        Ok(link) => println!("ferry ui: a browser logged in; the next login link:\n  {link}"),
        Err(e) => eprintln!("ferry ui: no new login link: {e:#}"),
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict"),
            ),
        ],
    )
        .into_response()
}

/// `GET /api/session`: who is logged in, and the CSRF token for changing calls.
#[derive(Serialize)]
struct SessionInfo {
    csrf: String,
    /// The admin the console acts as ("local admin" on a host's own socket).
    admin: String,
    version: String,
}

async fn session(State(ui): S, h: HeaderMap) -> Response {
    let csrf = cookie(&h, COOKIE)
        .and_then(|id| ui.session(&id))
        .unwrap_or_default();
    Json(SessionInfo {
        csrf,
        admin: ui
            .t
            .admin
            .as_ref()
            .map(|a| a.creds.identity.name.clone())
            .unwrap_or_else(|| "local admin".into()),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response()
}

async fn logout(State(ui): S, h: HeaderMap) -> Response {
    if let Some(id) = cookie(&h, COOKIE) {
        ui.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    (
        StatusCode::OK,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
        )],
        Json(serde_json::json!({})),
    )
        .into_response()
}

/// One host as the console shows it.
#[derive(Serialize, PartialEq)]
struct HostView {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<HostInfo>,
    vms: Vec<VmInfo>,
    /// Its recent moves (newest last).
    moves: Vec<MoveInfo>,
    /// Why it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One file server as the console shows it.
#[derive(Serialize, PartialEq)]
struct ServerView {
    /// How the console reaches it (`/api/shares/NAME/...`): a cluster name or an address.
    name: String,
    /// What the page calls it: its own name (`fs1` where `name` is `unix:/run/...`), or
    /// `name` until it has answered.
    title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    shares: Option<ShareList>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `GET /api/overview` (and every event of `/api/watch`).
#[derive(Serialize, PartialEq)]
struct Overview {
    hosts: Vec<HostView>,
    file_servers: Vec<ServerView>,
}

/// Most recent moves listed per host.
const RECENT_MOVES: usize = 20;

async fn host_view(ui: &Ui, name: String) -> HostView {
    let c = match ui.host_client(&name) {
        Ok(c) => c.with_timeout(HOST_TIMEOUT),
        Err(e) => {
            return HostView {
                name,
                info: None,
                vms: Vec::new(),
                moves: Vec::new(),
                error: Some(format!("{e:#}")),
            }
        }
    };
    let (info, vms, moves) = tokio::join!(
        c.get::<HostInfo>("/v1/host"),
        c.get::<VmList>("/v1/vms"),
        c.get::<MoveList>("/v1/moves")
    );
    let error = info.as_ref().err().map(|e| e.to_string());
    let mut moves = moves.map(|m| m.moves).unwrap_or_default();
    let skip = moves.len().saturating_sub(RECENT_MOVES);
    moves.drain(..skip);
    HostView {
        name,
        info: info.ok(),
        vms: vms.map(|v| v.vms).unwrap_or_default(),
        moves,
        error,
    }
}

async fn build_overview(ui: &Ui) -> Overview {
    let hosts =
        futures_util::future::join_all(ui.hosts().into_iter().map(|h| host_view(ui, h))).await;
    let mut file_servers = Vec::new();
    for s in ui.share_servers() {
        let (title, r) = match ui.share_client(&s) {
            Ok(c) => {
                let c = c.with_timeout(HOST_TIMEOUT);
                (
                    ui.server_title(&s, &c).await,
                    c.get::<ShareList>("/v1/shares")
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            Err(e) => (s.clone(), Err(format!("{e:#}"))),
        };
        file_servers.push(ServerView {
            name: s,
            title,
            error: r.as_ref().err().cloned(),
            shares: r.ok(),
        });
    }
    Overview {
        hosts,
        file_servers,
    }
}

async fn overview(State(ui): S) -> Response {
    Json(build_overview(&ui).await).into_response()
}

/// `GET /api/watch`: the overview as server-sent events, one at the start and one at every
/// change (a VM starting, stopping or arriving, a setting changed, a move's state).
async fn watch(State(ui): S) -> Response {
    let stream =
        futures_util::stream::unfold((ui, None::<String>, 0u32), |(ui, last, n)| async move {
            loop {
                if last.is_some() {
                    tokio::time::sleep(WATCH_EVERY).await;
                }
                if n % 10 == 0 {
                    // The cluster document names the hosts: keep up with joins and removals.
                    ui.t.refresh_doc().await;
                }
                let text = serde_json::to_string(&build_overview(&ui).await).unwrap_or_default();
                if last.as_deref() != Some(text.as_str()) {
                    let ev = Event::default().event("overview").data(text.clone());
                    return Some((
                        Ok::<_, std::convert::Infallible>(ev),
                        (ui, Some(text), n.wrapping_add(1)),
                    ));
                }
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `POST /api/moves`: check or start a move, as `ferry move` does (the grant signed with the
/// admin's key, for exactly this move).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveAsk {
    /// The VM and the host it is on.
    vm: String,
    host: String,
    /// The destination host; empty: the VM stays (a storage move).
    #[serde(default)]
    to: String,
    #[serde(default)]
    storage_to: Option<String>,
    #[serde(default)]
    disk_to: Vec<DiskMove>,
    #[serde(default)]
    keep_source: bool,
    #[serde(default)]
    settings: MoveSettings,
    /// Only check.
    #[serde(default)]
    check: bool,
}

async fn start_move(
    State(ui): S,
    body: Result<Json<MoveAsk>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let a = match body {
        Ok(Json(a)) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("bad request body: {}", e.body_text()),
            )
        }
    };
    let c = match ui.host_client(&a.host) {
        Ok(c) => c,
        Err(e) => return anyhow_error(e),
    };
    let info: VmInfo = match c.get(&format!("/v1/vms/{}", a.vm)).await {
        Ok(i) => i,
        Err(e) => return client_error(e),
    };
    let dest = if a.to.is_empty() {
        info.host.clone()
    } else {
        a.to.clone()
    };
    let grant = match crate::move_cmd::grant_for(&ui.t, &info, &dest) {
        Ok(g) => g,
        Err(e) => return anyhow_error(e),
    };
    let req = MoveRequest {
        vm: a.vm,
        to: a.to,
        storage_to: a.storage_to.filter(|s| !s.trim().is_empty()),
        disk_to: a.disk_to,
        keep_source: a.keep_source,
        settings: a.settings,
        grant,
    };
    if a.check {
        return match c.post::<_, CheckReport>("/v1/moves/check", &req).await {
            Ok(r) => Json(r).into_response(),
            Err(e) => client_error(e),
        };
    }
    match c.post::<_, MoveInfo>("/v1/moves", &req).await {
        Ok(m) => (StatusCode::CREATED, Json(m)).into_response(),
        Err(e) => client_error(e),
    }
}

/// The part of the request's path after `/api/{kind}/{name}/`, as the browser sent it (still
/// percent-encoded), with its query.
fn rest_of(req: &Request, name: &str) -> Option<String> {
    let path = req.uri().path();
    // "/api/hosts/hv1/vms/web01" -> "hv1/vms/web01" -> "vms/web01"
    let rest = path.splitn(4, '/').nth(3)?;
    let rest = rest
        .strip_prefix(&format!("{}/", urlencode(name)))
        .or_else(|| rest.strip_prefix(&format!("{name}/")))?;
    if rest.split('/').any(|s| s == ".." || s == ".") {
        return None;
    }
    Some(match req.uri().query() {
        Some(q) => format!("/v1/{rest}?{q}"),
        None => format!("/v1/{rest}"),
    })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn proxy_host(
    State(ui): S,
    Path((host, _)): Path<(String, String)>,
    req: Request,
) -> Response {
    match ui.host_client(&host) {
        Ok(c) => forward(c, &host, req).await,
        Err(e) => error(StatusCode::NOT_FOUND, "not_found", format!("{e:#}")),
    }
}

async fn proxy_share(
    State(ui): S,
    Path((server, _)): Path<(String, String)>,
    req: Request,
) -> Response {
    match ui.share_client(&server) {
        Ok(c) => forward(c, &server, req).await,
        Err(e) => error(StatusCode::NOT_FOUND, "not_found", format!("{e:#}")),
    }
}

/// Pass one call through to a daemon's `/v1/...` and its answer back as it streams.
async fn forward(c: Client, name: &str, req: Request) -> Response {
    let Some(path) = rest_of(&req, name) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a path with . or .. parts",
        );
    };
    let method = req.method().clone();
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body: {e}"),
            )
        }
    };
    let body = (!body.is_empty()).then(|| body.to_vec());
    match c.forward(method, &path, body).await {
        Ok(resp) => {
            let status = resp.status();
            let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
            let mut r = Response::new(Body::new(resp.into_body()));
            *r.status_mut() = status;
            if let Some(ct) = ct {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            r
        }
        Err(e) => client_error(e),
    }
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    port: Option<u8>,
}

/// A VM's serial port in the browser: a WebSocket here, joined to the daemon's.
async fn console(
    State(ui): S,
    Path((host, vm)): Path<(String, String)>,
    Query(q): Query<ConsoleQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let c = match ui.host_client(&host) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::NOT_FOUND, "not_found", format!("{e:#}")),
    };
    let up = match c
        .websocket(&format!(
            "/v1/vms/{}/console?port={}",
            urlencode(&vm),
            q.port.unwrap_or(1)
        ))
        .await
    {
        Ok(w) => w,
        Err(e) => return client_error(e),
    };
    ws.on_upgrade(move |browser| pipe(browser, up))
}

async fn pipe(
    browser: WebSocket,
    daemon: tokio_tungstenite::WebSocketStream<ferry_hostd::transport::Conn>,
) {
    let (mut bt, mut br) = browser.split();
    let (mut dt, mut dr) = daemon.split();
    let down = async {
        while let Some(Ok(m)) = dr.next().await {
            let m = match m {
                TMessage::Binary(b) => Message::Binary(b),
                TMessage::Text(t) => Message::Text(t.as_str().to_string().into()),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if bt.send(m).await.is_err() {
                break;
            }
        }
    };
    let up = async {
        while let Some(Ok(m)) = br.next().await {
            let m = match m {
                Message::Binary(b) => TMessage::Binary(b),
                Message::Text(t) => TMessage::Text(t.as_str().to_string().into()),
                Message::Close(_) => break,
                _ => continue,
            };
            if dt.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
    let _ = bt.send(Message::Close(None)).await;
    let _ = dt.close().await;
}
