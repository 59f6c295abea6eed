//! The cluster authority: a CA key and certificate, the join tokens it handed out, every
//! certificate it issued, and the cluster document it signs. It lives in a directory (by
//! default the state directory of the host where `ferry cluster init` ran, whose daemon then
//! serves enrolment); the CA key never leaves it.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::doc::{self, ClusterDoc, Member, Revoked};
use crate::identity::{Identity, Role};
use crate::keyfile;
use crate::pki;
use crate::AuthError;

/// How long certificates are valid unless said otherwise.
pub const CERT_DAYS: i64 = 365;
/// How long a join token is valid unless said otherwise.
pub const TOKEN_SECS: i64 = 15 * 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    id: String,
    /// SHA-256 of the secret part, hex: the secret itself is not kept.
    secret_sha256: String,
    identity: Identity,
    expires_at: i64,
    used: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Issued {
    serial: String,
    identity: Identity,
    not_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    next_serial: u64,
    tokens: Vec<Token>,
    issued: Vec<Issued>,
    doc: ClusterDoc,
}

/// What a party gets when it enrols.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub cert: String,
    pub ca: String,
    /// The signed cluster document.
    pub doc: String,
}

/// An open authority.
pub struct Authority {
    dir: PathBuf,
    key: KeyPair,
    key_pem: String,
    pub ca_pem: String,
    state: State,
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// `n` random bytes from the system, as hex (tokens, session ids).
pub fn random_hex(n: usize) -> Result<String, AuthError> {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AuthError::Pki("no randomness".into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn sha256_hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A join token's parts: `ferry1.<id>.<secret>.<CA fingerprint, 32 hex>`.
pub struct TokenParts {
    pub id: String,
    pub secret: String,
    pub ca_pin: String,
}

pub fn parse_token(t: &str) -> Result<TokenParts, AuthError> {
    let p: Vec<&str> = t.trim().split('.').collect();
    match p.as_slice() {
        ["ferry1", id, secret, pin] if pin.len() == 32 => Ok(TokenParts {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_pin: pin.to_string(),
        }),
        _ => Err(AuthError::Token(
            "that is not a ferry join token (ferry1.ID.SECRET.PIN, from `ferry cluster token`)"
                .into(),
        )),
    }
}

impl Authority {
    fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join("ca.key"),
            dir.join("ca.crt"),
            dir.join("state.json"),
        )
    }

    /// Make a new authority for cluster `cluster` in `dir` (refused if one is there).
    pub fn init(dir: &Path, cluster: &str) -> Result<Authority, AuthError> {
        let (k, c, _) = Authority::paths(dir);
        if k.exists() || c.exists() {
            return Err(AuthError::State(format!(
                "{} already holds a cluster authority; use it, or pick another directory",
                dir.display()
            )));
        }
        if !crate::identity::valid_name(cluster) {
            return Err(AuthError::BadName(cluster.into()));
        }
        let (key, ca_pem) = pki::new_ca(cluster, 10 * 365)?;
        let key_pem = key.serialize_pem();
        keyfile::write_private(&k, &key_pem)?;
        keyfile::write_public(&c, &ca_pem)?;
        let mut a = Authority {
            dir: dir.into(),
            key,
            key_pem,
            ca_pem,
            state: State {
                next_serial: 1,
                tokens: Vec::new(),
                issued: Vec::new(),
                doc: ClusterDoc {
                    cluster: cluster.into(),
                    version: 0,
                    issued_at: now(),
                    ..Default::default()
                },
            },
        };
        a.publish()?;
        Ok(a)
    }

    /// Open the authority in `dir`.
    pub fn open(dir: &Path) -> Result<Authority, AuthError> {
        let (k, c, s) = Authority::paths(dir);
        let key_pem = keyfile::read_private(&k)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| AuthError::Pki(e.to_string()))?;
        let ca_pem = keyfile::read_public(&c)?;
        let state: State = serde_json::from_str(&keyfile::read_private(&s)?)
            .map_err(|e| AuthError::State(format!("{}: {e}", s.display())))?;
        Ok(Authority {
            dir: dir.into(),
            key,
            key_pem,
            ca_pem,
            state,
        })
    }

    /// Whether `dir` holds an authority.
    pub fn exists(dir: &Path) -> bool {
        Authority::paths(dir).0.exists()
    }

    fn save(&self) -> Result<(), AuthError> {
        let s = serde_json::to_string_pretty(&self.state).unwrap_or_default();
        keyfile::write_private(&Authority::paths(&self.dir).2, &s)
    }

    /// Sign the document anew (version + 1), keep it, return it.
    fn publish(&mut self) -> Result<String, AuthError> {
        self.state.doc.version += 1;
        self.state.doc.issued_at = now();
        let jws = doc::sign(&self.state.doc, &self.key_pem)?;
        self.save()?;
        keyfile::write_public(&self.dir.join("cluster.jwt"), &jws)?;
        Ok(jws)
    }

    /// The current signed document.
    pub fn doc_jws(&self) -> Result<String, AuthError> {
        keyfile::read_public(&self.dir.join("cluster.jwt"))
    }

    pub fn doc(&self) -> &ClusterDoc {
        &self.state.doc
    }

    /// The CA certificate's pin (as join tokens carry it).
    pub fn ca_pin(&self) -> Result<String, AuthError> {
        Ok(pki::fingerprint(&pki::cert_der(&self.ca_pem)?)[..32].to_string())
    }

    /// Issue a certificate for `id` from a request made where its key lives.
    pub fn issue(&mut self, id: &Identity, csr_pem: &str) -> Result<String, AuthError> {
        let nb = OffsetDateTime::now_utc() - Duration::minutes(5);
        self.issue_with(id, csr_pem, nb, Duration::days(CERT_DAYS))
    }

    /// Issue with a given validity (tests make expired certificates with it).
    pub fn issue_with(
        &mut self,
        id: &Identity,
        csr_pem: &str,
        not_before: OffsetDateTime,
        valid: Duration,
    ) -> Result<String, AuthError> {
        let serial = self.state.next_serial;
        self.state.next_serial += 1;
        let cert = pki::sign_request(
            &self.key,
            &self.ca_pem,
            csr_pem,
            id,
            serial,
            not_before,
            valid,
        )?;
        let (serial_hex, not_after) =
            crate::identity::cert_serial_and_expiry(&pki::cert_der(&cert)?)?;
        self.state.issued.push(Issued {
            serial: serial_hex,
            identity: id.clone(),
            not_after,
        });
        self.save()?;
        tracing::info!("issued a certificate to {id}");
        Ok(cert)
    }

    /// A one-time join token for `id`, valid `secs` seconds.
    pub fn token(&mut self, id: &Identity, secs: i64) -> Result<String, AuthError> {
        let (tid, secret) = (random_hex(8)?, random_hex(16)?);
        self.state
            .tokens
            .retain(|t| t.expires_at > now() && !t.used);
        self.state.tokens.push(Token {
            id: tid.clone(),
            secret_sha256: sha256_hex(&secret),
            identity: id.clone(),
            expires_at: now() + secs,
            used: false,
        });
        self.save()?;
        Ok(format!("ferry1.{tid}.{secret}.{}", self.ca_pin()?))
    }

    /// Enrol with a join token: the token is spent whatever happens next, and names the
    /// identity (the request cannot choose it).
    pub fn redeem(
        &mut self,
        token: &str,
        csr_pem: &str,
    ) -> Result<(Identity, Enrolled), AuthError> {
        let p = parse_token(token)?;
        let t = self
            .state
            .tokens
            .iter_mut()
            .find(|t| t.id == p.id)
            .ok_or_else(|| AuthError::Token("unknown join token".into()))?;
        if t.secret_sha256 != sha256_hex(&p.secret) {
            return Err(AuthError::Token("wrong join token".into()));
        }
        if t.used {
            return Err(AuthError::Token(
                "this join token was used already; ask for a new one (`ferry cluster token`)"
                    .into(),
            ));
        }
        if t.expires_at <= now() {
            return Err(AuthError::Token(
                "this join token has expired; ask for a new one (`ferry cluster token`)".into(),
            ));
        }
        t.used = true;
        let id = t.identity.clone();
        self.save()?;
        let cert = self.issue(&id, csr_pem)?;
        Ok((
            id,
            Enrolled {
                cert,
                ca: self.ca_pem.clone(),
                doc: self.doc_jws()?,
            },
        ))
    }

    /// Record where a host or file server listens (and so that it is one).
    pub fn set_member(&mut self, role: Role, name: &str, addr: &str) -> Result<String, AuthError> {
        let list = match role {
            Role::Host => &mut self.state.doc.hosts,
            Role::FileServer => &mut self.state.doc.file_servers,
            Role::Admin => return self.doc_jws(),
        };
        list.retain(|m| m.name != name);
        list.push(Member {
            name: name.into(),
            addr: addr.into(),
        });
        list.sort_by(|a, b| a.name.cmp(&b.name));
        self.publish()
    }

    /// Take `id` out of the cluster: every certificate issued to it is revoked.
    pub fn remove(&mut self, id: &Identity) -> Result<String, AuthError> {
        let serials: Vec<String> = self
            .state
            .issued
            .iter()
            .filter(|i| &i.identity == id)
            .map(|i| i.serial.clone())
            .collect();
        if serials.is_empty() {
            return Err(AuthError::State(format!("the cluster knows no {id}")));
        }
        let at = now();
        for s in serials {
            if !self.state.doc.is_revoked(&s) {
                self.state.doc.revoked.push(Revoked {
                    serial: s,
                    identity: id.clone(),
                    at,
                });
            }
        }
        match id.role {
            Role::Host => self.state.doc.hosts.retain(|m| m.name != id.name),
            Role::FileServer => self.state.doc.file_servers.retain(|m| m.name != id.name),
            Role::Admin => {}
        }
        self.state.doc.migration_group.retain(|h| h != &id.name);
        tracing::info!("removed {id} from the cluster");
        self.publish()
    }

    /// Add a host to the migration group, or take it out.
    pub fn migration_group(&mut self, host: &str, member: bool) -> Result<String, AuthError> {
        let id = Identity::host(host)?;
        if member {
            if self.state.doc.removed(&id) {
                return Err(AuthError::State(format!(
                    "{id} was removed from the cluster"
                )));
            }
            if !self.state.issued.iter().any(|i| i.identity == id) {
                return Err(AuthError::State(format!(
                    "{id} has not joined the cluster (`ferry host join`)"
                )));
            }
            if !self.state.doc.in_migration_group(host) {
                self.state.doc.migration_group.push(host.into());
                self.state.doc.migration_group.sort();
            }
        } else {
            self.state.doc.migration_group.retain(|h| h != host);
        }
        self.publish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_tokens_are_one_time_and_name_the_party() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Authority::init(d.path(), "lab").unwrap();
        assert!(
            Authority::init(d.path(), "lab").is_err(),
            "never two authorities in one place"
        );
        let hv2 = Identity::host("hv2").unwrap();
        let t = a.token(&hv2, 60).unwrap();
        let (_, csr) = pki::new_request(&Identity::host("evil").unwrap()).unwrap();
        let (id, e) = a.redeem(&t, &csr).unwrap();
        assert_eq!(id, hv2, "the token names the identity, not the request");
        assert_eq!(
            Identity::from_cert(&pki::cert_der(&e.cert).unwrap()).unwrap(),
            hv2
        );
        let again = a.redeem(&t, &csr).unwrap_err().to_string();
        assert!(again.contains("used already"), "{again}");
        let old = a.token(&hv2, -1).unwrap();
        let late = a.redeem(&old, &csr).unwrap_err().to_string();
        assert!(late.contains("expired"), "{late}");
        let mut bad = t.clone();
        bad.replace_range(7..8, if &t[7..8] == "0" { "1" } else { "0" });
        assert!(a.redeem(&bad, &csr).is_err());

        // The document: signed, versioned, revocations in it.
        let v1 = doc::verify(&a.doc_jws().unwrap(), &pki::cert_der(&a.ca_pem).unwrap()).unwrap();
        a.set_member(Role::Host, "hv2", "10.0.0.2:7700").unwrap();
        a.migration_group("hv2", true).unwrap();
        let jws = a.remove(&hv2).unwrap();
        let v = doc::verify(&jws, &pki::cert_der(&a.ca_pem).unwrap()).unwrap();
        assert!(v.version > v1.version);
        assert!(v.removed(&hv2) && !v.in_migration_group("hv2") && v.host("hv2").is_none());
        // Reopened from disk, it is the same authority.
        let b = Authority::open(d.path()).unwrap();
        assert_eq!(b.doc().version, v.version);
        // A document signed by another authority is refused.
        let d2 = tempfile::tempdir().unwrap();
        let other = Authority::init(d2.path(), "lab").unwrap();
        assert!(doc::verify(
            &other.doc_jws().unwrap(),
            &pki::cert_der(&a.ca_pem).unwrap()
        )
        .is_err());
    }
}
