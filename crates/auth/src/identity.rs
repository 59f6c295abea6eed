//! Who a certificate names: a role and a name, as the URI `ferry://<role>/<name>` in its subject
//! alternative names (and, for hosts and file servers, the DNS name `<name>.ferry` that TLS
//! clients check the server against).

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::AuthError;

/// What a party is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A host that runs VMs (`ferry host run`).
    Host,
    /// A person who administers the cluster (the CLI, the web console).
    Admin,
    /// A file server (`ferry share run`).
    FileServer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Admin => "admin",
            Role::FileServer => "fileserver",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "host" => Some(Role::Host),
            "admin" => Some(Role::Admin),
            "fileserver" => Some(Role::FileServer),
            _ => None,
        }
    }
}

/// A party of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role.as_str(), self.name)
    }
}

/// A name a party may have: letters, digits, '-', '_', '.'; up to 63.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Identity, AuthError> {
        if !valid_name(name) {
            return Err(AuthError::BadName(name.into()));
        }
        Ok(Identity {
            role,
            name: name.into(),
        })
    }

    pub fn host(name: &str) -> Result<Identity, AuthError> {
        Identity::new(Role::Host, name)
    }

    pub fn admin(name: &str) -> Result<Identity, AuthError> {
        Identity::new(Role::Admin, name)
    }

    /// The URI in the certificate.
    pub fn uri(&self) -> String {
        format!("ferry://{}/{}", self.role.as_str(), self.name)
    }

    /// The DNS name a server with this identity is checked against.
    pub fn dns(&self) -> String {
        dns_name(&self.name)
    }

    fn from_uri(u: &str) -> Option<Identity> {
        let rest = u.strip_prefix("ferry://")?;
        let (role, name) = rest.split_once('/')?;
        let role = Role::parse(role)?;
        valid_name(name).then(|| Identity {
            role,
            name: name.into(),
        })
    }

    /// The identity a certificate (DER) names.
    pub fn from_cert(der: &[u8]) -> Result<Identity, AuthError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| AuthError::BadCert(format!("not an X.509 certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| AuthError::BadCert(e.to_string()))?
            .ok_or_else(|| AuthError::BadCert("the certificate names no ferry identity".into()))?;
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                if let Some(i) = Identity::from_uri(u) {
                    return Ok(i);
                }
            }
        }
        Err(AuthError::BadCert(
            "the certificate names no ferry identity (no ferry:// URI)".into(),
        ))
    }
}

/// The DNS name of host `name` in certificates.
pub fn dns_name(name: &str) -> String {
    format!("{name}.ferry")
}

/// A certificate's serial number (hex) and expiry (Unix seconds).
pub fn cert_serial_and_expiry(der: &[u8]) -> Result<(String, i64), AuthError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| AuthError::BadCert(format!("not an X.509 certificate: {e}")))?;
    Ok((
        cert.raw_serial_as_string().replace(':', ""),
        cert.validity().not_after.timestamp(),
    ))
}
