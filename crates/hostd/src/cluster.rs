//! The cluster authority's side of the daemon (on the host that holds it): join tokens,
//! enrolment (its own TLS port, where a joining party has no certificate yet and its token
//! authenticates it), removals, the migration group; and, on every host, keeping the cluster
//! document current: the authority pushes each new version to every host, and every host asks
//! the authority's enrolment port for it every few seconds, so a host that was offline when
//! something changed learns it as soon as it is back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use ferry_api::cluster::*;
use ferry_auth::authority::parse_token;
use ferry_auth::{pki, tls, Credentials, Identity, Role};

use crate::client::Client;
use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::routes::Body;
use crate::security::{self, Security};
use crate::transport::{ClientTls, Endpoint, Peer};

/// The enrolment port's default (the daemon's port + 1).
pub fn enrolment_addr(listen: &str) -> Option<String> {
    let (host, port) = listen.rsplit_once(':')?;
    let p: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", p.checked_add(1)?))
}

fn auth_err(e: ferry_auth::AuthError) -> ApiError {
    match e {
        ferry_auth::AuthError::Token(m) => {
            ApiError::new(axum::http::StatusCode::FORBIDDEN, "bad_token", m)
        }
        e => ApiError::bad_request(e.to_string()),
    }
}

fn sec(d: &Daemon) -> ApiResult<&Security> {
    d.security.as_ref().ok_or_else(|| {
        ApiError::conflict(format!(
            "{} has not joined a cluster (`ferry cluster init` or `ferry host join`)",
            d.name
        ))
    })
}

fn role(s: &str) -> ApiResult<Role> {
    Role::parse(s).ok_or_else(|| {
        ApiError::bad_request(format!("role {s:?} is not host, admin or fileserver"))
    })
}

/// The cluster as this host sees it.
pub fn info(d: &Daemon) -> ApiResult<ClusterInfo> {
    let s = sec(d)?;
    let doc = s.trust.doc();
    let m = |v: &[ferry_auth::doc::Member]| {
        v.iter()
            .map(|m| ClusterMember {
                name: m.name.clone(),
                addr: m.addr.clone(),
            })
            .collect()
    };
    Ok(ClusterInfo {
        cluster: doc.cluster.clone(),
        version: doc.version,
        hosts: m(&doc.hosts),
        file_servers: m(&doc.file_servers),
        migration_group: doc.migration_group.clone(),
        revoked: doc
            .revoked
            .iter()
            .map(|r| RevokedCert {
                serial: r.serial.clone(),
                role: r.identity.role.as_str().into(),
                name: r.identity.name.clone(),
                at: r.at,
            })
            .collect(),
        me: s.me().to_string(),
        authority: s.authority.is_some(),
    })
}

/// Routes of the main API.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/cluster", get(get_info))
        .route("/v1/cluster/doc", get(get_doc).post(push_doc))
        .route("/v1/cluster/version", get(get_version))
        .route("/v1/cluster/tokens", post(make_token))
        .route("/v1/cluster/remove", post(remove))
        .route("/v1/cluster/migration-group", post(group))
}

type D = State<Arc<Daemon>>;

async fn get_info(State(d): D) -> ApiResult<Response> {
    Ok(axum::Json(info(&d)?).into_response())
}

async fn get_doc(State(d): D) -> ApiResult<Response> {
    Ok(axum::Json(DocPush {
        doc: sec(&d)?.trust.jws(),
    })
    .into_response())
}

async fn get_version(State(d): D) -> ApiResult<Response> {
    Ok(axum::Json(DocVersion {
        version: sec(&d)?.trust.version(),
    })
    .into_response())
}

async fn push_doc(State(d): D, Body(p): Body<DocPush>) -> ApiResult<Response> {
    let s = sec(&d)?;
    s.adopt(&p.doc)
        .map_err(|e| ApiError::bad_request(format!("refused the cluster document: {e}")))?;
    Ok(axum::Json(DocVersion {
        version: s.trust.version(),
    })
    .into_response())
}

/// Run `f` on the authority (refused on hosts that do not hold it).
fn with_authority<T>(
    d: &Daemon,
    f: impl FnOnce(&mut ferry_auth::authority::Authority) -> Result<T, ferry_auth::AuthError>,
) -> ApiResult<T> {
    let s = sec(d)?;
    let a = s.authority.as_ref().ok_or_else(|| {
        ApiError::conflict(format!(
            "{} does not hold the cluster authority; ask the host where `ferry cluster init` ran",
            d.name
        ))
    })?;
    let mut g = a.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g).map_err(auth_err)
}

async fn make_token(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(r): Body<TokenRequest>,
) -> ApiResult<Response> {
    let id = Identity::new(role(&r.role)?, &r.name).map_err(auth_err)?;
    let ttl = r
        .ttl_s
        .unwrap_or(ferry_auth::authority::TOKEN_SECS)
        .clamp(1, 7 * 86400);
    let token = with_authority(&d, |a| a.token(&id, ttl))?;
    crate::audit::record(
        &d.state.root,
        &peer,
        &format!("join token for {id}"),
        None,
        None,
    );
    Ok(axum::Json(TokenReply {
        token,
        expires_in_s: ttl,
    })
    .into_response())
}

async fn remove(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(r): Body<RemoveRequest>,
) -> ApiResult<Response> {
    let id = Identity::new(role(&r.role)?, &r.name).map_err(auth_err)?;
    if d.security.as_ref().is_some_and(|s| s.me() == &id) {
        return Err(ApiError::bad_request(format!(
            "{id} holds the cluster authority; it cannot remove itself"
        )));
    }
    let jws = with_authority(&d, |a| a.remove(&id))?;
    crate::audit::record(
        &d.state.root,
        &peer,
        &format!("remove {id} from the cluster"),
        None,
        None,
    );
    publish(&d, jws).await?;
    Ok(axum::Json(info(&d)?).into_response())
}

async fn group(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(r): Body<GroupRequest>,
) -> ApiResult<Response> {
    let jws = with_authority(&d, |a| a.migration_group(&r.host, r.member))?;
    crate::audit::record(
        &d.state.root,
        &peer,
        &format!(
            "migration group: {} {}",
            if r.member { "add" } else { "remove" },
            r.host
        ),
        None,
        None,
    );
    publish(&d, jws).await?;
    Ok(axum::Json(info(&d)?).into_response())
}

/// Take a new document here and send it to every host it lists.
pub async fn publish(d: &Arc<Daemon>, jws: String) -> ApiResult<()> {
    let s = sec(d)?;
    s.adopt(&jws).map_err(auth_err)?;
    for h in s.trust.doc().hosts {
        if h.name == d.name {
            continue;
        }
        let Ok(t) = s.client_tls(&h.name) else {
            continue;
        };
        let c = Client::with_tls(Endpoint::Tcp(h.addr.clone()), Some(t))
            .with_timeout(Duration::from_secs(3));
        let push = DocPush { doc: jws.clone() };
        tokio::spawn(async move {
            if let Err(e) = c.post::<_, DocVersion>("/v1/cluster/doc", &push).await {
                tracing::info!(
                    "could not send the cluster document to {}: {e} (it will fetch it)",
                    h.name
                );
            }
        });
    }
    Ok(())
}

/// Keep the cluster document current: ask the authority's enrolment port every few seconds.
pub async fn keep_current(d: Arc<Daemon>) {
    let Some(s) = d.security.as_ref() else { return };
    let Some(addr) = s.authority_addr.clone() else {
        return;
    };
    let Ok(cfg) = tls::enrolment_client_config(&s.creds.ca_pem) else {
        return;
    };
    loop {
        let server = s.trust.doc().hosts.first().map(|h| h.name.clone());
        if let Some(name) = authority_name(&d).or(server) {
            if let Ok(server) = tls::server_name(&name) {
                let c = Client::with_tls(
                    Endpoint::Tcp(addr.clone()),
                    Some(ClientTls {
                        config: cfg.clone(),
                        server,
                    }),
                )
                .with_timeout(Duration::from_secs(3));
                match c.get::<DocPush>("/v1/cluster/doc").await {
                    Ok(p) => {
                        if let Err(e) = s.adopt(&p.doc) {
                            tracing::warn!("the authority's cluster document: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("asking the authority for the cluster document: {e}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

fn authority_name(d: &Daemon) -> Option<String> {
    std::fs::read_to_string(security::tls_dir(&d.state.root).join("authority.name"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The enrolment port's routes (TLS, no client certificate).
pub fn enrolment_routes(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/cluster/ca", get(ca))
        .route("/v1/cluster/doc", get(get_doc))
        .route("/v1/cluster/join", post(join))
        .with_state(d)
}

async fn ca(State(d): D) -> ApiResult<Response> {
    let s = sec(&d)?;
    Ok(axum::Json(CaInfo {
        ca: s.creds.ca_pem.clone(),
        authority: d.name.clone(),
    })
    .into_response())
}

async fn join(
    State(d): D,
    Extension(peer): Extension<Peer>,
    Body(r): Body<JoinRequest>,
) -> ApiResult<Response> {
    let (id, e) = match with_authority(&d, |a| a.redeem(&r.token, &r.csr)) {
        Ok(x) => x,
        Err(e) => {
            crate::audit::record(
                &d.state.root,
                &peer,
                "join the cluster",
                Some(&e.to_string()),
                None,
            );
            return Err(e);
        }
    };
    let mut doc = e.doc.clone();
    if let (Some(addr), Role::Host | Role::FileServer) = (&r.addr, id.role) {
        doc = with_authority(&d, |a| a.set_member(id.role, &id.name, addr))?;
        publish(&d, doc.clone()).await?;
    }
    crate::audit::record(
        &d.state.root,
        &peer,
        &format!("{id} joined the cluster"),
        None,
        Some("join token"),
    );
    Ok(axum::Json(JoinReply {
        cert: e.cert,
        ca: e.ca,
        doc,
    })
    .into_response())
}

/// The joining side: check the authority against the token's pin, make a key here, send a
/// request, keep what comes back in `dir` (and the authority's address for later).
pub async fn join_cluster(
    authority: &str,
    token: &str,
    addr: Option<String>,
    dir: &Path,
) -> Result<Credentials, String> {
    let parts = parse_token(token).map_err(|e| e.to_string())?;
    let to = Endpoint::Tcp(authority.into());
    let fetch = Client::with_tls(
        to.clone(),
        Some(ClientTls {
            config: tls::pin_fetch_client_config(),
            server: tls::server_name("authority").map_err(|e| e.to_string())?,
        }),
    );
    let ca: CaInfo = fetch
        .get("/v1/cluster/ca")
        .await
        .map_err(|e| format!("asking {authority} for the authority's certificate: {e}"))?;
    let der = pki::cert_der(&ca.ca).map_err(|e| e.to_string())?;
    if pki::fingerprint(&der)[..32] != parts.ca_pin {
        return Err(format!(
            "the authority at {authority} is not the one the token names (certificate pin mismatch): refusing to join"
        ));
    }
    let (key, csr) = pki::new_request(&Identity::host("joining").map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let c = Client::with_tls(
        to,
        Some(ClientTls {
            config: tls::enrolment_client_config(&ca.ca).map_err(|e| e.to_string())?,
            server: tls::server_name(&ca.authority).map_err(|e| e.to_string())?,
        }),
    );
    let r: JoinReply = c
        .post(
            "/v1/cluster/join",
            &JoinRequest {
                token: token.into(),
                csr,
                addr,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let creds = Credentials::save(
        dir,
        &key.serialize_pem(),
        &ferry_auth::authority::Enrolled {
            cert: r.cert,
            ca: r.ca,
            doc: r.doc,
        },
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::write(dir.join("authority.addr"), authority);
    let _ = std::fs::write(dir.join("authority.name"), &ca.authority);
    Ok(creds)
}

/// What `ferry cluster init` made.
pub struct Initialised {
    pub cluster: String,
    pub host: Credentials,
    pub admin: Option<Credentials>,
    pub enrolment: Option<String>,
}

/// `ferry cluster init`: a new authority in `state`'s authority directory, this host's own
/// credentials (key made here), this host in the cluster document (at `listen`) and in the
/// migration group, and the first admin's credentials in `admin_dir`.
pub fn init_cluster(
    state: &Path,
    cluster: &str,
    host: &str,
    listen: Option<&str>,
    admin: Option<(&str, &Path)>,
) -> Result<Initialised, String> {
    use ferry_auth::authority::{Authority, Enrolled};
    let s = |e: ferry_auth::AuthError| e.to_string();
    let tls_dir = security::tls_dir(state);
    if Credentials::exists(&tls_dir) {
        return Err(format!(
            "{} already belongs to a cluster (its credentials are in {})",
            host,
            tls_dir.display()
        ));
    }
    let mut a = Authority::init(&security::authority_dir(state), cluster).map_err(s)?;
    let id = Identity::host(host).map_err(s)?;
    let (key, csr) = pki::new_request(&id).map_err(s)?;
    let cert = a.issue(&id, &csr).map_err(s)?;
    if let Some(l) = listen {
        a.set_member(Role::Host, host, l).map_err(s)?;
    }
    a.migration_group(host, true).map_err(s)?;
    let doc = a.doc_jws().map_err(s)?;
    let me = Credentials::save(
        &tls_dir,
        &key.serialize_pem(),
        &Enrolled {
            cert,
            ca: a.ca_pem.clone(),
            doc: doc.clone(),
        },
    )
    .map_err(s)?;
    let _ = std::fs::write(tls_dir.join("authority.name"), host);
    let admin = match admin {
        Some((name, dir)) => {
            let aid = Identity::admin(name).map_err(s)?;
            let (key, csr) = pki::new_request(&aid).map_err(s)?;
            let cert = a.issue(&aid, &csr).map_err(s)?;
            Some(
                Credentials::save(
                    dir,
                    &key.serialize_pem(),
                    &Enrolled {
                        cert,
                        ca: a.ca_pem.clone(),
                        doc,
                    },
                )
                .map_err(s)?,
            )
        }
        None => None,
    };
    Ok(Initialised {
        cluster: cluster.into(),
        host: me,
        admin,
        enrolment: listen.and_then(enrolment_addr),
    })
}
