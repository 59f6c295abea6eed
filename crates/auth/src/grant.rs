//! A grant: an admin's signed permission for exactly one move (the delegated way of
//! authorising moves). It names the VM, the source and destination hosts, the disks and
//! shares the two hosts may touch for it, an expiry (minutes away) and a unique id; it is a
//! standard JWS (RFC 7515, ES256, via the `jsonwebtoken` crate) signed with the admin's own key,
//! its certificate in the `x5c` header. A destination accepts it only if the certificate is the
//! cluster's, an admin's, not revoked, the signature holds, it has not expired, and its id was
//! never used before (the destination keeps the ids it has seen until they expire).

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

use crate::creds::Credentials;
use crate::doc::{decoding_key, Trust};
use crate::identity::{Identity, Role};
use crate::AuthError;

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantClaims {
    /// The VM to move.
    pub vm: String,
    /// The source host.
    pub from: String,
    /// The destination host.
    pub to: String,
    /// Disk images (paths) the hosts may open for this move.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Shares the hosts may touch for this move.
    #[serde(default)]
    pub shares: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// When it was made, Unix seconds.
    pub iat: i64,
    /// Its unique id: a grant works once.
    pub jti: String,
    /// The admin who signed it.
    pub admin: String,
}

fn refuse(m: impl Into<String>) -> AuthError {
    AuthError::Grant(m.into())
}

/// Sign `claims` with the admin's key.
pub fn sign(admin: &Credentials, claims: &GrantClaims) -> Result<String, AuthError> {
    if admin.identity.role != Role::Admin {
        return Err(refuse(format!("{} is not an admin", admin.identity)));
    }
    let key = EncodingKey::from_ec_pem(admin.key_pem.as_bytes())
        .map_err(|e| AuthError::Pki(format!("the admin's key: {e}")))?;
    let mut h = Header::new(Algorithm::ES256);
    h.typ = Some("ferry-grant+jwt".into());
    h.x5c = Some(vec![
        base64::engine::general_purpose::STANDARD.encode(admin.cert_der()?)
    ]);
    jsonwebtoken::encode(&h, claims, &key).map_err(|e| AuthError::Pki(e.to_string()))
}

/// Verify a grant: who signed it (an admin of this cluster, not removed) and what it says (not
/// expired). Single use is the caller's to enforce (it keeps the ids).
pub fn verify(token: &str, trust: &Arc<Trust>) -> Result<(GrantClaims, Identity), AuthError> {
    verify_within(token, trust, 5)
}

/// As [`verify`], taking it up to `grace_s` seconds past its expiry: a grant's expiry bounds
/// when its move may start, and a file server sees it again as the move ends.
pub fn verify_within(
    token: &str,
    trust: &Arc<Trust>,
    grace_s: u64,
) -> Result<(GrantClaims, Identity), AuthError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| refuse(format!("not a grant: {e}")))?;
    if header.alg != Algorithm::ES256 {
        return Err(refuse("not signed with ES256"));
    }
    let x5c = header
        .x5c
        .and_then(|v| v.into_iter().next())
        .ok_or_else(|| refuse("it carries no certificate"))?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(x5c)
        .map_err(|_| refuse("its certificate is not base64"))?;
    // The certificate must be this cluster's (the same check a TLS client certificate gets).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(trust.ca_der.clone()))
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| AuthError::Tls(e.to_string()))?;
    webpki
        .verify_client_cert(&CertificateDer::from(der.clone()), &[], UnixTime::now())
        .map_err(|e| {
            refuse(format!(
                "its certificate is not one of this cluster's valid certificates: {e}"
            ))
        })?;
    let id = Identity::from_cert(&der)?;
    if id.role != Role::Admin {
        return Err(refuse(format!("it was signed by {id}, not an admin")));
    }
    let (serial, _) = crate::identity::cert_serial_and_expiry(&der)?;
    if trust.is_revoked(&serial) {
        return Err(refuse(format!("{id} was removed from the cluster")));
    }
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = grace_s;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    let claims = jsonwebtoken::decode::<GrantClaims>(token, &decoding_key(&der)?, &v)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => refuse("it has expired"),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                refuse("its signature does not match (altered?)")
            }
            _ => refuse(format!("{e}")),
        })?
        .claims;
    if claims.admin != id.name {
        return Err(refuse(format!(
            "it says it is from {} but {} signed it",
            claims.admin, id.name
        )));
    }
    Ok((claims, id))
}
