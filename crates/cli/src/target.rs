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

/// The daemons a command may talk to.
pub struct Targets {
    /// `--host` as given.
    pub host: Option<String>,
    pub config: CliConfig,
}

impl Targets {
    pub fn new(host: Option<String>) -> Result<Targets> {
        let host = host.or_else(|| std::env::var("FERRY_HOST").ok());
        Ok(Targets {
            host,
            config: CliConfig::load()?.0,
        })
    }

    /// Resolve a host given by name or address.
    pub fn resolve(&self, h: &str) -> Result<(String, Endpoint)> {
        if let Some(a) = self.config.hosts.get(h) {
            let e = Endpoint::parse(a).with_context(|| {
                format!("host {h}'s address {a:?} in the CLI config is not unix:PATH or host:port")
            })?;
            return Ok((h.into(), e));
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
        let (name, e) = match (&self.host, &self.config.default) {
            (Some(h), _) => self.resolve(h)?,
            (None, Some(d)) => self.resolve(d)?,
            (None, None) => match self.config.hosts.iter().next() {
                Some((n, _)) if self.config.hosts.len() == 1 => self.resolve(n)?,
                _ => ("local".into(), Endpoint::Unix(DEFAULT_SOCKET.into())),
            },
        };
        Ok((name, Client::new(e)))
    }

    /// Every host the CLI knows (for finding a VM).
    fn all(&self) -> Result<Vec<(String, Client)>> {
        if self.host.is_some() || self.config.hosts.is_empty() {
            return Ok(vec![self.default()?]);
        }
        self.config
            .hosts
            .keys()
            .map(|n| self.resolve(n).map(|(n, e)| (n, Client::new(e))))
            .collect()
    }

    /// The daemon that owns VM `name` (with `--host`, that host; else every known host is
    /// asked, and the one that has it, not as an arriving copy, answers).
    pub async fn find_vm(&self, name: &str) -> Result<(String, Client, VmInfo)> {
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
