//! ferry's cluster authority and the security of every link.
//!
//! - [`pki`]: keys, certificate requests, certificates (rcgen, ECDSA P-256);
//! - [`identity`]: who a certificate names (`ferry://host/hv1`);
//! - [`keyfile`]: private keys written 0600 where they are made, refused when looser;
//! - [`doc`]: the signed cluster document (hosts, migration group, revocations), versioned;
//! - [`authority`]: the CA's state: join tokens, issued certificates, the document;
//! - [`creds`]: a party's credentials on disk;
//! - [`tls`]: the rustls configs (mutual TLS, revocation checked on every handshake);
//! - [`grant`]: an admin's signed, single-use permission for one move (JWS, ES256).

pub mod authority;
pub mod creds;
pub mod doc;
pub mod grant;
pub mod identity;
pub mod keyfile;
pub mod pki;
pub mod tls;

use std::path::PathBuf;

pub use creds::Credentials;
pub use doc::{ClusterDoc, Trust};
pub use identity::{Identity, Role};

/// Every error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} may be read by others (mode {mode:o}); private keys must be private: chmod 600 {path}")]
    LooseKey { path: PathBuf, mode: u32 },
    #[error("{0:?} is not a valid name (letters, digits, '-', '_', '.'; up to 63)")]
    BadName(String),
    #[error("bad certificate: {0}")]
    BadCert(String),
    #[error("certificate authority: {0}")]
    Pki(String),
    #[error("the cluster document is not valid: {0}")]
    BadDoc(String),
    #[error("{0}")]
    Token(String),
    #[error("grant refused: {0}")]
    Grant(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    State(String),
}
