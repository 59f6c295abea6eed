//! A daemon's place in the cluster: its credentials (`<state>/tls/`), what it trusts (the CA
//! and the newest cluster document), the TLS configs every connection uses, and, on the host
//! where `ferry cluster init` ran, the cluster authority itself (`<state>/authority/`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_auth::authority::Authority;
use ferry_auth::{tls, Credentials, Identity, Role, Trust};
use tokio_rustls::rustls;

use crate::transport::ClientTls;

/// Why the daemon cannot use its credentials.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{0}")]
    Auth(#[from] ferry_auth::AuthError),
    #[error("the credentials in {dir} name {found}, not {name}")]
    NotMe {
        dir: PathBuf,
        found: String,
        name: String,
    },
}

/// A daemon's security.
pub struct Security {
    pub creds: Credentials,
    pub trust: Arc<Trust>,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    /// The enrolment port's config (only where the authority lives).
    pub enrolment: Option<Arc<rustls::ServerConfig>>,
    /// The cluster authority, where it lives.
    pub authority: Option<Mutex<Authority>>,
    /// Where the authority's enrolment port is (to fetch newer cluster documents from).
    pub authority_addr: Option<String>,
}

/// Where a host keeps its credentials.
pub fn tls_dir(state: &Path) -> PathBuf {
    state.join("tls")
}

/// Where the authority lives on the host that holds it.
pub fn authority_dir(state: &Path) -> PathBuf {
    state.join("authority")
}

/// The file naming the authority's enrolment address (written at join).
pub fn authority_addr_file(state: &Path) -> PathBuf {
    tls_dir(state).join("authority.addr")
}

impl Security {
    /// Load the host's credentials from `state`, if it joined a cluster.
    pub fn load(state: &Path, name: &str) -> Result<Option<Security>, SecurityError> {
        Security::load_as(state, &Identity::host(name)?)
    }

    /// Load the credentials of `me` (a host, or a file server) from `state`, if it joined.
    pub fn load_as(state: &Path, me: &Identity) -> Result<Option<Security>, SecurityError> {
        let dir = tls_dir(state);
        if !Credentials::exists(&dir) {
            return Ok(None);
        }
        let creds = Credentials::load(&dir)?;
        if &creds.identity != me {
            return Err(SecurityError::NotMe {
                dir,
                found: creds.identity.to_string(),
                name: me.to_string(),
            });
        }
        let trust = Arc::new(creds.trust()?);
        let server = tls::server_config(&creds, trust.clone())?;
        let client = tls::client_config(&creds, trust.clone())?;
        let adir = authority_dir(state);
        let (authority, enrolment) = if Authority::exists(&adir) {
            let a = Authority::open(&adir)?;
            // The authority's newest document is the truth here.
            let _ = trust.update(&a.doc_jws()?);
            (
                Some(Mutex::new(a)),
                Some(tls::enrolment_server_config(&creds)?),
            )
        } else {
            (None, None)
        };
        let authority_addr = std::fs::read_to_string(authority_addr_file(state))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        Ok(Some(Security {
            creds,
            trust,
            server,
            client,
            enrolment,
            authority,
            authority_addr,
        }))
    }

    /// How to reach host `name` over mutual TLS.
    pub fn client_tls(&self, name: &str) -> Result<ClientTls, ferry_auth::AuthError> {
        Ok(ClientTls {
            config: self.client.clone(),
            server: tls::server_name(name)?,
        })
    }

    /// Take a newer cluster document (verified), and keep it.
    pub fn adopt(&self, jws: &str) -> Result<bool, ferry_auth::AuthError> {
        let newer = self.trust.update(jws)?;
        if newer {
            self.creds.save_doc(jws)?;
            tracing::info!("cluster document version {} taken", self.trust.version());
        }
        Ok(newer)
    }

    /// This host's identity.
    pub fn me(&self) -> &Identity {
        &self.creds.identity
    }

    /// Whether `host` may send or receive live migrations (the migration group).
    pub fn in_group(&self, host: &str) -> bool {
        self.trust.doc().in_migration_group(host)
    }
}

/// Whether an identity is a host named `name`.
pub fn is_host(id: &Identity, name: &str) -> bool {
    id.role == Role::Host && id.name == name
}
