//! A party's credentials on disk: its key (made here, 0600), its certificate, the authority's
//! certificate, and the newest cluster document it has verified.
//!
//! ```text
//! <dir>/me.key      private key (0600; refused if looser)
//! <dir>/me.crt      certificate naming this party (ferry://host/hv1, ...)
//! <dir>/ca.crt      the cluster authority's certificate
//! <dir>/cluster.jwt the newest cluster document
//! ```

use std::path::{Path, PathBuf};

use crate::authority::Enrolled;
use crate::doc::Trust;
use crate::identity::Identity;
use crate::keyfile;
use crate::pki;
use crate::AuthError;

/// A party's credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub dir: PathBuf,
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Credentials {
    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join("me.key")
    }

    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("me.crt")
    }

    pub fn ca_path(dir: &Path) -> PathBuf {
        dir.join("ca.crt")
    }

    pub fn doc_path(dir: &Path) -> PathBuf {
        dir.join("cluster.jwt")
    }

    /// Whether `dir` holds credentials.
    pub fn exists(dir: &Path) -> bool {
        Credentials::cert_path(dir).exists() && Credentials::key_path(dir).exists()
    }

    /// Load the credentials in `dir` (a key others may read is refused).
    pub fn load(dir: &Path) -> Result<Credentials, AuthError> {
        let key_pem = keyfile::read_private(&Credentials::key_path(dir))?;
        let cert_pem = keyfile::read_public(&Credentials::cert_path(dir))?;
        let ca_pem = keyfile::read_public(&Credentials::ca_path(dir))?;
        let identity = Identity::from_cert(&pki::cert_der(&cert_pem)?)?;
        Ok(Credentials {
            dir: dir.into(),
            identity,
            cert_pem,
            key_pem,
            ca_pem,
        })
    }

    /// Keep what enrolment gave, with the key made here.
    pub fn save(dir: &Path, key_pem: &str, e: &Enrolled) -> Result<Credentials, AuthError> {
        // Verify before keeping: the document must be the authority's.
        Trust::new(&e.ca, &e.doc)?;
        keyfile::write_private(&Credentials::key_path(dir), key_pem)?;
        keyfile::write_public(&Credentials::cert_path(dir), &e.cert)?;
        keyfile::write_public(&Credentials::ca_path(dir), &e.ca)?;
        keyfile::write_public(&Credentials::doc_path(dir), &e.doc)?;
        Credentials::load(dir)
    }

    /// What this party trusts, from its directory.
    pub fn trust(&self) -> Result<Trust, AuthError> {
        Trust::new(
            &self.ca_pem,
            &keyfile::read_public(&Credentials::doc_path(&self.dir))?,
        )
    }

    /// Keep a newer cluster document.
    pub fn save_doc(&self, jws: &str) -> Result<(), AuthError> {
        keyfile::write_public(&Credentials::doc_path(&self.dir), jws)
    }

    /// The certificate as DER.
    pub fn cert_der(&self) -> Result<Vec<u8>, AuthError> {
        pki::cert_der(&self.cert_pem)
    }
}
