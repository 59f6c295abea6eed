//! The cluster document: the one list every part of the cluster trusts, signed by the
//! authority's key (JWS, ES256) and versioned. It names the hosts (and where their daemons
//! listen), the file servers, the migration group, and every certificate that was revoked.
//!
//! How it travels: the authority pushes each new version to every host it lists; every daemon
//! keeps the newest it has seen (in its state directory) and tells each peer its version on
//! every request (`ferry-cluster-version`); a part that sees a newer one fetches it. So a part
//! that was offline when a host was removed learns of it at its first contact with any
//! up-to-date part, and meanwhile every up-to-date part refuses the removed host's certificate
//! at the TLS handshake.

use std::sync::RwLock;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::identity::Identity;
use crate::AuthError;

/// A host or file server and where its daemon listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `host:port` of its daemon (TLS).
    pub addr: String,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Serial number, hex.
    pub serial: String,
    pub identity: Identity,
    /// When, Unix seconds.
    pub at: i64,
}

/// The cluster document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDoc {
    pub cluster: String,
    /// Rises with every change; a part keeps the highest it has verified.
    pub version: u64,
    pub issued_at: i64,
    #[serde(default)]
    pub hosts: Vec<Member>,
    #[serde(default)]
    pub file_servers: Vec<Member>,
    /// Hosts that may send and receive live migrations and storage moves.
    #[serde(default)]
    pub migration_group: Vec<String>,
    #[serde(default)]
    pub revoked: Vec<Revoked>,
}

impl ClusterDoc {
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.iter().any(|r| r.serial == serial)
    }

    /// Whether `id` was removed (some certificate of it revoked, and none issued since: the
    /// authority revokes every certificate of an identity it removes).
    pub fn removed(&self, id: &Identity) -> bool {
        self.revoked.iter().any(|r| &r.identity == id)
    }

    pub fn host(&self, name: &str) -> Option<&Member> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn in_migration_group(&self, host: &str) -> bool {
        self.migration_group.iter().any(|h| h == host)
    }
}

/// The EC public key of a certificate (DER), for verifying what its key signed.
pub fn decoding_key(cert_der: &[u8]) -> Result<DecodingKey, AuthError> {
    use base64::Engine;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| AuthError::BadCert(e.to_string()))?;
    let point = &cert.public_key().subject_public_key.data;
    if point.len() != 65 || point[0] != 4 {
        return Err(AuthError::BadCert(
            "not an uncompressed P-256 public key".into(),
        ));
    }
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    DecodingKey::from_ec_components(&b.encode(&point[1..33]), &b.encode(&point[33..65]))
        .map_err(|e| AuthError::BadCert(e.to_string()))
}

/// Sign a document with the authority's key (PKCS#8 PEM).
pub fn sign(doc: &ClusterDoc, ca_key_pem: &str) -> Result<String, AuthError> {
    let key = EncodingKey::from_ec_pem(ca_key_pem.as_bytes())
        .map_err(|e| AuthError::Pki(format!("the authority's key: {e}")))?;
    let mut h = Header::new(Algorithm::ES256);
    h.typ = Some("ferry-cluster+jwt".into());
    jsonwebtoken::encode(&h, doc, &key).map_err(|e| AuthError::Pki(e.to_string()))
}

/// Verify a signed document against the authority's certificate (DER).
pub fn verify(jws: &str, ca_der: &[u8]) -> Result<ClusterDoc, AuthError> {
    let key = decoding_key(ca_der)?;
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    jsonwebtoken::decode::<ClusterDoc>(jws.trim(), &key, &v)
        .map(|d| d.claims)
        .map_err(|e| AuthError::BadDoc(e.to_string()))
}

/// What a part trusts: the authority's certificate and the newest cluster document it has
/// verified. Shared by every TLS config of the part, so a new revocation takes effect on the
/// next handshake.
pub struct Trust {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    current: RwLock<(ClusterDoc, String)>,
}

impl Trust {
    /// Trust `ca_pem`, starting from document `jws` (verified).
    pub fn new(ca_pem: &str, jws: &str) -> Result<Trust, AuthError> {
        let ca_der = crate::pki::cert_der(ca_pem)?;
        let doc = verify(jws, &ca_der)?;
        Ok(Trust {
            ca_pem: ca_pem.into(),
            ca_der,
            current: RwLock::new((doc, jws.trim().into())),
        })
    }

    /// The current document.
    pub fn doc(&self) -> ClusterDoc {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The current document as signed.
    pub fn jws(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    pub fn version(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .version
    }

    /// Take `jws` if it is valid and newer; returns whether it was taken.
    pub fn update(&self, jws: &str) -> Result<bool, AuthError> {
        let doc = verify(jws, &self.ca_der)?;
        let mut g = self.current.write().unwrap_or_else(|e| e.into_inner());
        if doc.cluster != g.0.cluster {
            return Err(AuthError::BadDoc(format!(
                "it belongs to cluster {:?}, not {:?}",
                doc.cluster, g.0.cluster
            )));
        }
        if doc.version <= g.0.version {
            return Ok(false);
        }
        *g = (doc, jws.trim().into());
        Ok(true)
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .is_revoked(serial)
    }
}
