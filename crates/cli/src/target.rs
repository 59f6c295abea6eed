//! Which daemon a command talks to: `--host` (a name from the CLI's config, `unix:PATH`, a
//! socket path, or `host:port`), else the config's default, else this host's own daemon.
//!
//! The CLI's config (`$FERRY_CONFIG`, else `~/.config/ferry/cli.json`, else the config of a
//! lab made by `ferry lab up`) names hosts:
//! `{"default": "hv1", "hosts": {"hv1": "unix:/var/tmp/ferry-lab/hv1/hostd.sock", "hv2": "10.0.0.2:7700"}}`

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ferry_api::host::VmInfo;
use ferry_hostd::{Client, ClientError, Endpoint};
use serde::{Deserialize, Serialize};

/// Where this machine's own daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/var/lib/ferry/hostd.sock";

/// The CLI's config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CliConfig {
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

/// The lab's CLI config, written by `ferry lab up`.
pub fn lab_config_path() -> PathBuf {
    PathBuf::from(ferry_lab::REGISTRY).join(format!("{}.cli.json", crate::lab_cmd::LAB_NAME))
}

impl CliConfig {
    /// The config in use, and where it came from.
    pub fn load() -> Result<(CliConfig, Option<PathBuf>)> {
        let mut candidates = Vec::new();
        if let Ok(p) = std::env::var("FERRY_CONFIG") {
            let p = PathBuf::from(p);
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("reading FERRY_CONFIG={}", p.display()))?;
            let c = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a ferry CLI config", p.display()))?;
            return Ok((c, Some(p)));
        }
        if let Ok(home) = std::env::var("HOME") {
            candidates.push(PathBuf::from(home).join(".config/ferry/cli.json"));
        }
        candidates.push(lab_config_path());
        for p in candidates {
            if let Ok(text) = std::fs::read_to_string(&p) {
                let c = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a ferry CLI config", p.display()))?;
                return Ok((c, Some(p)));
            }
        }
        Ok((CliConfig::default(), None))
    }
}

/// Where an admin's credentials are: `$FERRY_CREDS`, else `~/.config/ferry/admin`.
pub fn creds_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERRY_CREDS") {
        return d.into();
    }
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".config/ferry/admin")
}

/// An admin's TLS: credentials and what they trust.
pub struct AdminTls {
    pub creds: ferry_auth::Credentials,
    pub trust: std::sync::Arc<ferry_auth::Trust>,
    config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
}

impl AdminTls {
    pub fn load(dir: &std::path::Path) -> Result<AdminTls> {
        let creds = ferry_auth::Credentials::load(dir)
            .with_context(|| format!("loading an admin's credentials from {}", dir.display()))?;
        let trust = std::sync::Arc::new(creds.trust()?);
        let config = ferry_auth::tls::client_config(&creds, trust.clone())?;
        Ok(AdminTls {
            creds,
            trust,
            config,
        })
    }

    /// A client of host `name` at `e` (TLS for TCP).
    pub fn client(&self, name: &str, e: Endpoint) -> Result<Client> {
        Ok(match e {
            Endpoint::Tcp(_) => Client::with_tls(
                e,
                Some(ferry_hostd::transport::ClientTls {
                    config: self.config.clone(),
                    server: ferry_auth::tls::server_name(name)?,
                }),
            ),
            e => Client::new(e),
        })
    }
}

/// The daemons a command may talk to.
pub struct Targets {
    /// `--host` as given.
    pub host: Option<String>,
    pub config: CliConfig,
    /// An admin's credentials, if there are any (TCP needs them).
    pub admin: Option<AdminTls>,
}

impl Targets {
    pub fn new(host: Option<String>) -> Result<Targets> {
        let host = host.or_else(|| std::env::var("FERRY_HOST").ok());
        let dir = creds_dir();
        let admin = if ferry_auth::Credentials::exists(&dir) {
            match AdminTls::load(&dir) {
                Ok(a) => Some(a),
                Err(e) => {
                    // Local commands work without them; remote ones say why they cannot.
                    eprintln!(
                        "ferry: not using the admin credentials in {}: {e:#}",
                        dir.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        Ok(Targets {
            host,
            config: CliConfig::load()?.0,
            admin,
        })
    }

    /// A client of host `name` at `e`: mutual TLS with the admin's credentials over TCP.
    fn client(&self, name: &str, e: Endpoint) -> Result<Client> {
        match (&e, &self.admin) {
            (Endpoint::Tcp(_), Some(a)) => a.client(name, e),
            (Endpoint::Tcp(_), None) if std::env::var("FERRY_INSECURE").is_ok() => Ok(Client::new(e)),
            (Endpoint::Tcp(a), None) => bail!(
                "reaching {name} at {a} takes an admin's credentials (none in {}; enrol with `ferry admin join`, or set FERRY_CREDS); a daemon run with --insecure is reached with FERRY_INSECURE=1",
                creds_dir().display()
            ),
            _ => Ok(Client::new(e)),
        }
    }

    /// Resolve a host given by name or address to a client.
    pub fn resolve(&self, h: &str) -> Result<(String, Client)> {
        let (n, e) = self.resolve_endpoint(h)?;
        Ok((n.clone(), self.client(&n, e)?))
    }

    /// The name the cluster knows a host by (for grants): a name, or an address it lists.
    pub fn host_name(&self, h: &str) -> String {
        self.admin
            .as_ref()
            .and_then(|a| {
                a.trust
                    .doc()
                    .hosts
                    .into_iter()
                    .find(|m| m.addr == h)
                    .map(|m| m.name)
            })
            .unwrap_or_else(|| h.to_string())
    }

    fn resolve_endpoint(&self, h: &str) -> Result<(String, Endpoint)> {
        if let Some(a) = self.config.hosts.get(h) {
            let e = Endpoint::parse(a).with_context(|| {
                format!("host {h}'s address {a:?} in the CLI config is not unix:PATH or host:port")
            })?;
            return Ok((h.into(), e));
        }
        if let Some(a) = &self.admin {
            let doc = a.trust.doc();
            if let Some(m) = doc.host(h) {
                return Ok((m.name.clone(), Endpoint::Tcp(m.addr.clone())));
            }
            if let Some(m) = doc.hosts.iter().find(|m| m.addr == h) {
                return Ok((m.name.clone(), Endpoint::Tcp(m.addr.clone())));
            }
        }
        match Endpoint::parse(h) {
            Some(e) => Ok((h.into(), e)),
            None => {
                let known: Vec<&str> = self.config.hosts.keys().map(|s| s.as_str()).collect();
                bail!(
                    "unknown host {h:?}: give unix:PATH or host:port, or a name from the CLI config ({})",
                    if known.is_empty() {
                        "none configured; see `ferry --help`".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }
        }
    }

    /// The daemon a host-level command talks to.
    pub fn default(&self) -> Result<(String, Client)> {
        match (&self.host, &self.config.default) {
            (Some(h), _) => self.resolve(h),
            (None, Some(d)) => self.resolve(d),
            (None, None) => match self.config.hosts.iter().next() {
                Some((n, _)) if self.config.hosts.len() == 1 => self.resolve(n),
                _ => Ok((
                    "local".into(),
                    Client::new(Endpoint::Unix(DEFAULT_SOCKET.into())),
                )),
            },
        }
    }

    /// Every host the CLI knows (for finding a VM).
    fn all(&self) -> Result<Vec<(String, Client)>> {
        if self.host.is_none() && self.config.hosts.is_empty() {
            // An admin's cluster document names every host.
            if let Some(a) = &self.admin {
                let hosts = a.trust.doc().hosts;
                if !hosts.is_empty() {
                    return hosts.iter().map(|m| self.resolve(&m.name)).collect();
                }
            }
        }
        if self.host.is_some() || self.config.hosts.is_empty() {
            return Ok(vec![self.default()?]);
        }
        self.config.hosts.keys().map(|n| self.resolve(n)).collect()
    }

    /// Bring the admin's copy of the cluster document up to date (it names the hosts), from
    /// the first host that answers.
    pub async fn refresh_doc(&self) {
        let Some(a) = &self.admin else { return };
        for m in a.trust.doc().hosts {
            let Ok(c) = a.client(&m.name, Endpoint::Tcp(m.addr.clone())) else {
                continue;
            };
            let c = c.with_timeout(std::time::Duration::from_secs(3));
            if let Ok(p) = c
                .get::<ferry_api::cluster::DocPush>("/v1/cluster/doc")
                .await
            {
                if let Ok(true) = a.trust.update(&p.doc) {
                    let _ = a.creds.save_doc(&p.doc);
                }
                return;
            }
        }
    }

    /// The daemon that owns VM `name` (with `--host`, that host; else every known host is
    /// asked, and the one that has it, not as an arriving copy, answers).
    pub async fn find_vm(&self, name: &str) -> Result<(String, Client, VmInfo)> {
        if self.host.is_none() && self.config.hosts.is_empty() {
            self.refresh_doc().await;
        }
        let mut errors = Vec::new();
        let mut arriving = None;
        for (h, c) in self.all()? {
            match c.get::<VmInfo>(&format!("/v1/vms/{name}")).await {
                Ok(v) if v.state == ferry_api::host::VmState::Incoming => {
                    arriving = Some((h, c, v));
                }
                Ok(v) => return Ok((h, c, v)),
                Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => errors.push(format!("{h}: {e}")),
            }
        }
        if let Some(a) = arriving {
            return Ok(a);
        }
        if errors.is_empty() {
            bail!("no host has a VM named {name:?}");
        }
        bail!(
            "no host that answered has a VM named {name:?} ({})",
            errors.join("; ")
        )
    }
}
