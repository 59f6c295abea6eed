//! The file server's management API (`crates/api/openapi-share.json`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use ferry_api::share::*;
use ferry_auth::Role;
use ferry_hostd::audit;
use ferry_hostd::error::{ApiError, ApiResult};
use ferry_hostd::routes::Body;
use ferry_hostd::transport::Peer;

use crate::store::{export_name, StoreError};
use crate::ShareServer;

type S = State<Arc<ShareServer>>;

fn json<T: serde::Serialize>(v: T) -> Response {
    axum::Json(v).into_response()
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> ApiErr {
        ApiErr(match &e {
            StoreError::NotFound(m) => ApiError::not_found(m.clone()),
            StoreError::Conflict(m) => ApiError::conflict(m.clone()),
            StoreError::Bad(m) => ApiError::bad_request(m.clone()),
            StoreError::Forbidden(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", m.clone())
            }
            _ => ApiError::internal(e.to_string()),
        })
    }
}

/// An [`ApiError`] that store errors convert into.
pub struct ApiErr(pub ApiError);

impl From<ApiError> for ApiErr {
    fn from(e: ApiError) -> ApiErr {
        ApiErr(e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

type R = Result<Response, ApiErr>;

/// Who the caller is, for the file server.
enum Caller {
    Admin,
    Host(String),
}

fn caller(s: &ShareServer, p: &Peer) -> ApiResult<Caller> {
    match p {
        Peer::Local { uid: 0 } => Ok(Caller::Admin),
        Peer::Insecure(_) if s.security.is_none() => Ok(Caller::Admin),
        Peer::Cert { identity, .. } if identity.role == Role::Admin => Ok(Caller::Admin),
        Peer::Cert { identity, .. } if identity.role == Role::Host => {
            Ok(Caller::Host(identity.name.clone()))
        }
        p => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not use this file server", p.describe()),
        )),
    }
}

/// Admins only; the refusal is audited.
fn admin(s: &ShareServer, p: &Peer, what: &str) -> ApiResult<()> {
    match caller(s, p) {
        Ok(Caller::Admin) => {
            audit::record(&s.state, p, what, None, Some("admin"));
            Ok(())
        }
        Ok(Caller::Host(h)) => {
            let why = format!("host {h} is not an admin: only admins change shares");
            audit::record(&s.state, p, what, Some(&why), None);
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why))
        }
        Err(e) => {
            audit::record(&s.state, p, what, Some(&e.body.error), None);
            Err(e)
        }
    }
}

/// Admins, or a host with write access to the share (its "Full Control": a host makes and
/// removes the disks of its storage moves). `disk`: a disk to remove, which another host's
/// lease must not hold. Audited.
fn writer(s: &ShareServer, p: &Peer, share: &str, disk: Option<&str>, what: &str) -> ApiResult<()> {
    let r = match caller(s, p) {
        Ok(Caller::Admin) => Ok("admin"),
        Ok(Caller::Host(h)) if s.store.access(share, &h) != Some(Access::Write) => {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "host {h} may not change share {share}: it needs write access (ferry share grant {share} {h} write)"
                ),
            ))
        }
        Ok(Caller::Host(h)) => {
            let holder = disk.and_then(|d| s.store.lease(&export_name(share, d)).holder);
            match holder {
                Some(other) if other != h => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "lease_held",
                    format!("host {other} holds the write lease of {share}/{}", disk.unwrap_or("")),
                )),
                _ => Ok("write access"),
            }
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(how) => {
            audit::record(&s.state, p, what, None, Some(how));
            Ok(())
        }
        Err(e) => {
            audit::record(&s.state, p, what, Some(&e.body.error), None);
            Err(e)
        }
    }
}

/// Admins, or a host on the share's access list.
fn reader(s: &ShareServer, p: &Peer, share: &str) -> ApiResult<()> {
    match caller(s, p)? {
        Caller::Admin => Ok(()),
        Caller::Host(h) if s.store.access(share, &h).is_some() => Ok(()),
        Caller::Host(h) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_on_access_list",
            format!("host {h} is not on share {share}'s access list"),
        )),
    }
}

pub fn router(s: Arc<ShareServer>) -> Router {
    Router::new()
        .route("/v1/share-server", get(server_info))
        .route("/v1/shares", get(list).post(create))
        .route("/v1/shares/{share}", get(show).delete(delete))
        .route(
            "/v1/shares/{share}/access/{host}",
            put(grant).delete(revoke),
        )
        .route("/v1/shares/{share}/disks", post(create_disk))
        .route(
            "/v1/shares/{share}/disks/{disk}",
            get(show_disk).delete(delete_disk),
        )
        .route("/v1/shares/{share}/disks/{disk}/lease", post(lease))
        .route("/v1/shares/{share}/disks/{disk}/copy", post(copy_disk))
        .fallback(|| async {
            ApiError::not_found("no such endpoint (see crates/api/openapi-share.json)")
        })
        .with_state(s)
}

async fn server_info(State(s): S) -> R {
    Ok(json(ShareServerInfo {
        name: s.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        nbd: Some(s.nbd.clone()),
        nbd_tls: s.security.is_some(),
        shares: s.store.share_names().len(),
    }))
}

async fn list(State(s): S, Extension(p): Extension<Peer>) -> R {
    let c = caller(&s, &p)?;
    let shares = s
        .store
        .share_names()
        .into_iter()
        .filter(|n| match &c {
            Caller::Admin => true,
            Caller::Host(h) => s.store.access(n, h).is_some(),
        })
        .filter_map(|n| s.store.share_info(&n, Some(&s.nbd)).ok())
        .collect();
    Ok(json(ShareList { shares }))
}

async fn create(State(s): S, Extension(p): Extension<Peer>, Body(b): Body<ShareCreate>) -> R {
    admin(&s, &p, &format!("create share {}", b.name))?;
    s.store.create_share(&b.name, b.path.as_deref())?;
    Ok((
        StatusCode::CREATED,
        json(s.store.share_info(&b.name, Some(&s.nbd))?),
    )
        .into_response())
}

async fn show(State(s): S, Extension(p): Extension<Peer>, Path(share): Path<String>) -> R {
    s.store.check_share(&share)?;
    reader(&s, &p, &share)?;
    Ok(json(s.store.share_info(&share, Some(&s.nbd))?))
}

async fn delete(State(s): S, Extension(p): Extension<Peer>, Path(share): Path<String>) -> R {
    admin(&s, &p, &format!("delete share {share}"))?;
    s.store.delete_share(&share)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn grant(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, host)): Path<(String, String)>,
    Body(b): Body<AccessSet>,
) -> R {
    admin(
        &s,
        &p,
        &format!("grant {host} {} on share {share}", b.access),
    )?;
    s.store.set_access(&share, &host, Some(b.access))?;
    Ok(json(s.store.share_info(&share, Some(&s.nbd))?))
}

async fn revoke(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, host)): Path<(String, String)>,
) -> R {
    admin(&s, &p, &format!("revoke {host} on share {share}"))?;
    s.store.set_access(&share, &host, None)?;
    Ok(json(s.store.share_info(&share, Some(&s.nbd))?))
}

async fn create_disk(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path(share): Path<String>,
    Body(b): Body<DiskCreate>,
) -> R {
    s.store.check_share(&share)?;
    writer(
        &s,
        &p,
        &share,
        None,
        &format!("create disk {share}/{}", b.name),
    )?;
    s.store.create_disk(&share, &b.name, b.size_bytes)?;
    Ok((
        StatusCode::CREATED,
        json(s.store.disk_info(&share, &b.name, Some(&s.nbd))?),
    )
        .into_response())
}

async fn show_disk(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, disk)): Path<(String, String)>,
) -> R {
    s.store.check_share(&share)?;
    reader(&s, &p, &share)?;
    Ok(json(s.store.disk_info(&share, &disk, Some(&s.nbd))?))
}

async fn delete_disk(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, disk)): Path<(String, String)>,
) -> R {
    s.store.check_share(&share)?;
    writer(
        &s,
        &p,
        &share,
        Some(&disk),
        &format!("delete disk {share}/{disk}"),
    )?;
    s.store.delete_disk(&share, &disk)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn lease(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, disk)): Path<(String, String)>,
    Body(b): Body<LeaseRequest>,
) -> R {
    let mut what = format!("{:?} lease of {share}/{disk}", b.action).to_lowercase();
    if let Some(t) = &b.to {
        what.push_str(&format!(" to {t}"));
    }
    let c = caller(&s, &p)?;
    // A delegated move's grant: an admin of this cluster signed it (checked here); what it
    // allows for this disk is the store's to check.
    let grant = match (&b.grant, &s.security) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "this file server is in no cluster: it cannot check grants",
            )
            .into())
        }
        (Some(t), Some(sec)) => {
            match ferry_auth::grant::verify_within(t, &sec.trust, crate::store::GRANT_GRACE_S) {
                Ok((g, _)) => {
                    what.push_str(&format!(
                        " under grant {} signed by admin {}",
                        g.jti, g.admin
                    ));
                    Some(g)
                }
                Err(e) => {
                    let e = StoreError::Forbidden(e.to_string());
                    audit::record(&s.state, &p, &what, Some(&e.to_string()), None);
                    return Err(e.into());
                }
            }
        }
    };
    let r = match (b.action, &c) {
        (LeaseAction::Break, Caller::Admin) => s.store.break_lease(&share, &disk),
        (LeaseAction::Break, Caller::Host(h)) => Err(StoreError::Forbidden(format!(
            "host {h} may not break leases: only admins may"
        ))),
        (LeaseAction::Acquire, Caller::Host(h)) => {
            s.store.acquire(&share, &disk, h, grant.as_ref())
        }
        (LeaseAction::Release, Caller::Host(h)) => s.store.release(&share, &disk, h),
        (LeaseAction::HandOver, Caller::Host(h)) => match &b.to {
            Some(to) => s.store.hand_over(&share, &disk, h, to, grant.as_ref()),
            None => Err(StoreError::Bad(
                "a hand-over names the host it goes to (`to`)".into(),
            )),
        },
        (_, Caller::Admin) => Err(StoreError::Bad(
            "a lease is acquired, released and handed over by the host that writes (an admin may break it)"
                .into(),
        )),
    };
    match r {
        Ok(_) => {
            audit::record(&s.state, &p, &what, None, None);
            Ok(json(s.store.disk_info(&share, &disk, Some(&s.nbd))?))
        }
        Err(e) => {
            audit::record(&s.state, &p, &what, Some(&e.to_string()), None);
            Err(e.into())
        }
    }
}

async fn copy_disk(
    State(s): S,
    Extension(p): Extension<Peer>,
    Path((share, disk)): Path<(String, String)>,
    Body(b): Body<DiskCopy>,
) -> R {
    let to_share = b.to_share.clone().unwrap_or_else(|| share.clone());
    admin(
        &s,
        &p,
        &format!("copy disk {share}/{disk} to {to_share}/{}", b.to_name),
    )?;
    let t = std::time::Instant::now();
    let store = s.store.clone();
    let (sh, d, ts, tn) = (
        share.clone(),
        disk.clone(),
        to_share.clone(),
        b.to_name.clone(),
    );
    let (copied, skipped) = tokio::task::spawn_blocking(move || store.copy_disk(&sh, &d, &ts, &tn))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((
        StatusCode::CREATED,
        json(DiskCopyReport {
            disk: s.store.disk_info(&to_share, &b.to_name, Some(&s.nbd))?,
            bytes_copied: copied,
            bytes_skipped: skipped,
            total_ms: t.elapsed().as_millis() as u64,
        }),
    )
        .into_response())
}
