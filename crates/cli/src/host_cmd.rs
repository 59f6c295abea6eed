//! `ferry host ...`: run a host daemon, show and change a host's migration settings, evacuate
//! a host.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::host::{EvacuateInfo, EvacuateRequest, HostInfo, HostSettingsPatch, MoveSettings};
use serde::Deserialize;

use crate::move_cmd;
use crate::target::Targets;

#[derive(Subcommand)]
pub enum HostCmd {
    /// Run this host's daemon in the foreground: it keeps the host's VMs (definitions in the
    /// state directory, one VMM process per running VM), serves the management API on a local
    /// socket (<state-dir>/hostd.sock) and, with --listen, on a TCP address for other hosts and
    /// remote admins. Its VMs keep running when it stops; a restarted daemon finds them again.
    /// Live migration is off until an admin turns it on (`ferry host set --live-migration on`).
    ///
    /// Example: ferry host run --name hv1 --listen 10.0.0.1:7700 --peer hv2=10.0.0.2:7700
    Run(RunArgs),
    /// Show a host: version, migration settings, memory, CPU, bridges, VMs, moves, peers.
    Show,
    /// Change a host's migration settings; what is not given stays as it is.
    ///
    /// Example: ferry --host hv2 host set --live-migration on --max-migrations 2 --migration-network 10.0.0.0/24
    Set(SetArgs),
    /// Move every running VM off a host (for maintenance), within its limits: one line of
    /// progress per VM, then a summary. VMs no destination can take stay, with the reason.
    ///
    /// Example: ferry host evacuate hv1 --to hv2 --to hv3
    Evacuate(EvacuateArgs),
    /// Enrol this host in a cluster with a one-time token (`ferry cluster token --name NAME`
    /// on the authority): its key is made here and stays here; the certificate names it.
    ///
    /// Example: ferry host join --authority 10.0.0.1:7701 --token ferry1.... --listen 10.0.0.2:7700
    Join {
        #[command(flatten)]
        join: crate::cluster_cmd::JoinArgs,
        /// This host's state directory.
        #[arg(long, default_value = "/var/lib/ferry")]
        state_dir: PathBuf,
        /// Where this host's daemon will listen (host:port), for the cluster document.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Take a host out of the cluster: from now on every part refuses its certificate (on the
    /// host that holds the authority).
    Remove {
        /// The host.
        name: String,
    },
    /// (Internal) the monitor a daemon runs each VMM under; it records how the VMM ends.
    #[command(hide = true)]
    Monitor {
        #[arg(long)]
        run_dir: PathBuf,
        /// Descriptors to close once the VMM has started (they were for it only).
        #[arg(long)]
        close: Vec<i32>,
        /// The VMM's arguments.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// A JSON config file: {"name", "state_dir", "listen", "peers": {"hv2": "ADDR"}}; the
    /// options below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the daemon keeps its VMs and settings [default: /var/lib/ferry].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also serve the API on this TCP address (host:port), for other hosts and remote admins.
    #[arg(long)]
    listen: Option<String>,
    /// This host's name [default: the machine's hostname].
    #[arg(long)]
    name: Option<String>,
    /// Another host, as NAME=ADDR (its daemon's host:port). Repeat for more. (In a cluster the
    /// cluster document names the hosts.)
    #[arg(long = "peer", value_name = "NAME=ADDR")]
    peers: Vec<String>,
    /// Serve --listen as plain TCP without a cluster: anyone who reaches it may manage the host.
    /// Only for a trusted lab network.
    #[arg(long)]
    insecure: bool,
    /// Where the cluster authority's enrolment port listens (on the host that holds it)
    /// [default: --listen's port + 1].
    #[arg(long)]
    enrol_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    peers: BTreeMap<String, String>,
}

#[derive(Args)]
pub struct SetArgs {
    /// Allow this host to send and receive live migrations.
    #[arg(long, value_parser = ["on", "off"])]
    live_migration: Option<String>,
    /// Live migrations (sending and receiving together) at once; more wait in a queue.
    #[arg(long)]
    max_migrations: Option<u32>,
    /// Storage moves at once; more wait.
    #[arg(long)]
    max_storage_moves: Option<u32>,
    /// Networks migration traffic may use (CIDR; repeat), or `any`.
    #[arg(long = "migration-network", value_name = "CIDR|any")]
    migration_networks: Vec<String>,
    /// Memory this host offers VMs, MiB (0: whatever is available).
    #[arg(long)]
    memory_limit_mib: Option<u64>,
    /// CPU features this host does not offer VMs (comma list, e.g. avx512f,avx2; `none`
    /// offers all again). Applies to VMs started from now on.
    #[arg(long, value_delimiter = ',')]
    cpu_hide: Vec<String>,
    /// How moves are authorised: `console` (started only on the source host itself, by a local
    /// admin) or `delegated` (an admin's signed grant names the VM, hosts and disks).
    #[arg(long, value_parser = ["console", "delegated"])]
    migration_auth: Option<String>,
    /// Networks this host trusts to carry migration streams unencrypted (CIDR; repeat), or
    /// `none`. A stream goes in the clear only on a network both hosts list.
    #[arg(long = "plaintext-migration-network", value_name = "CIDR|none")]
    plaintext_networks: Vec<String>,
}

#[derive(Args)]
pub struct EvacuateArgs {
    /// The host to empty (default: --host, or the default host).
    host: Option<String>,
    /// Where the VMs may go (repeat; default: every peer of the host).
    #[arg(long = "to", value_name = "HOST")]
    to: Vec<String>,
    /// Bandwidth cap per move, Mbit/s (0: none).
    #[arg(long, default_value_t = 0)]
    bandwidth_mbit: u64,
}

use crate::cluster_cmd::hostname;

pub fn run(cmd: HostCmd, t: &Targets, json: bool) -> Result<()> {
    match cmd {
        HostCmd::Monitor {
            run_dir,
            close,
            args,
        } => std::process::exit(ferry_hostd::vmm::monitor_main(&run_dir, &close, &args)),
        HostCmd::Run(a) => run_daemon(a),
        HostCmd::Show => rt()?.block_on(async {
            let (_, c) = t.default()?;
            let h: HostInfo = c.get("/v1/host").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print_host(&h);
            }
            Ok(())
        }),
        HostCmd::Set(a) => {
            let mut p = HostSettingsPatch {
                live_migration: a.live_migration.map(|v| v == "on"),
                max_migrations: a.max_migrations,
                max_storage_moves: a.max_storage_moves,
                memory_limit_mib: a.memory_limit_mib,
                ..Default::default()
            };
            if !a.migration_networks.is_empty() {
                p.migration_networks = Some(if a.migration_networks.iter().any(|n| n == "any") {
                    Vec::new()
                } else {
                    a.migration_networks
                });
            }
            if let Some(m) = &a.migration_auth {
                p.migration_auth = Some(if m == "delegated" {
                    ferry_api::host::MigrationAuth::Delegated
                } else {
                    ferry_api::host::MigrationAuth::Console
                });
            }
            if !a.plaintext_networks.is_empty() {
                p.plaintext_migration_networks =
                    Some(if a.plaintext_networks.iter().any(|n| n == "none") {
                        Vec::new()
                    } else {
                        a.plaintext_networks
                    });
            }
            if !a.cpu_hide.is_empty() {
                p.cpu_hide = Some(if a.cpu_hide.iter().any(|f| f == "none") {
                    Vec::new()
                } else {
                    a.cpu_hide
                });
            }
            if p == HostSettingsPatch::default() {
                bail!("nothing to change: give a setting (see `ferry host set --help`)");
            }
            rt()?.block_on(async {
                let (_, c) = t.default()?;
                let h: HostInfo = c.patch("/v1/host", &p).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&h)?);
                } else {
                    print_host(&h);
                }
                Ok(())
            })
        }
        HostCmd::Evacuate(a) => rt()?.block_on(evacuate(a, t, json)),
        HostCmd::Join {
            join,
            state_dir,
            listen,
        } => crate::cluster_cmd::host_join(join, state_dir, listen, json),
        HostCmd::Remove { name } => crate::cluster_cmd::remove(t, "host", &name, json),
    }
}

/// A runtime for a command that talks to daemons.
pub fn rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_daemon(a: RunArgs) -> Result<()> {
    let mut c: RunConfig = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a host daemon config", p.display()))?
        }
        None => RunConfig::default(),
    };
    if let Some(v) = a.name {
        c.name = Some(v);
    }
    if let Some(v) = a.state_dir {
        c.state_dir = Some(v);
    }
    if let Some(v) = a.listen {
        c.listen = Some(v);
    }
    for p in a.peers {
        let (n, addr) = p
            .split_once('=')
            .filter(|(n, a)| !n.is_empty() && !a.is_empty())
            .with_context(|| format!("--peer {p:?} is not NAME=ADDR"))?;
        c.peers.insert(n.into(), addr.into());
    }
    let opts = ferry_hostd::Options {
        name: c.name.unwrap_or_else(hostname),
        state_dir: c.state_dir.unwrap_or_else(|| "/var/lib/ferry".into()),
        listen: c.listen,
        peers: c.peers,
        ferry: std::env::current_exe().context("finding the ferry binary")?,
        insecure: a.insecure,
        enrol_listen: a.enrol_listen,
    };
    rt()?
        .block_on(ferry_hostd::run(opts))
        .map_err(|e| anyhow::anyhow!(ferry_vmm::error_chain(&e)))
}

fn print_host(h: &HostInfo) {
    let s = &h.settings;
    println!(
        "host {} (ferry {}, migration protocol {}..={})",
        h.name, h.version, h.protocol.min, h.protocol.max
    );
    println!(
        "  live migration:     {} (at most {} at once; storage moves: {})",
        if s.live_migration { "on" } else { "off" },
        s.max_migrations,
        s.max_storage_moves
    );
    println!(
        "  authorisation:      {:?} (moves {}); plaintext migration on: {}",
        s.migration_auth,
        match s.migration_auth {
            ferry_api::host::MigrationAuth::Console => "start only on this host's console",
            ferry_api::host::MigrationAuth::Delegated => "need an admin's signed grant",
        },
        if s.plaintext_migration_networks.is_empty() {
            "nowhere (always encrypted)".into()
        } else {
            s.plaintext_migration_networks.join(", ")
        }
    );
    println!(
        "  migration networks: {}",
        if s.migration_networks.is_empty() {
            "any".into()
        } else {
            s.migration_networks.join(", ")
        }
    );
    println!(
        "  memory:             {} MiB total, {} available, {} for VMs here, {} free for VMs{}",
        h.memory.total_mib,
        h.memory.available_mib,
        h.memory.used_by_vms_mib,
        h.memory.free_for_vms_mib,
        s.memory_limit_mib
            .map(|l| format!(" (limit {l} MiB)"))
            .unwrap_or_default()
    );
    println!(
        "  CPU:                {}; {} features offered to VMs{}",
        h.cpu_model,
        h.cpu_features.len(),
        if s.cpu_hide.is_empty() {
            String::new()
        } else {
            format!(" (hidden: {})", s.cpu_hide.join(","))
        }
    );
    println!("  addresses:          {}", h.addresses.join(", "));
    println!("  bridges:            {}", h.bridges.join(", "));
    println!(
        "  VMs:                {} running, {} defined",
        h.vms_running, h.vms_defined
    );
    println!(
        "  moves:              {} sending, {} receiving, {} queued",
        h.moves.outgoing, h.moves.incoming, h.moves.queued
    );
    println!(
        "  peers:              {}",
        if h.peers.is_empty() {
            "none".into()
        } else {
            h.peers
                .iter()
                .map(|p| format!("{} ({})", p.name, p.addr))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
}

async fn evacuate(a: EvacuateArgs, t: &Targets, json: bool) -> Result<()> {
    let (name, c) = match &a.host {
        Some(h) => t.resolve(h)?,
        None => t.default()?,
    };
    let req = EvacuateRequest {
        to: a.to,
        settings: MoveSettings {
            bandwidth_mbit: a.bandwidth_mbit,
            ..Default::default()
        },
    };
    let e: EvacuateInfo = c.post("/v1/evacuate", &req).await?;
    if !json {
        println!(
            "evacuating {name}: {} VMs to move, {} staying",
            e.moves.len(),
            e.skipped.len()
        );
        for s in &e.skipped {
            println!("  {:<16} stays: {}", s.vm, s.reason);
        }
    }
    let reports = move_cmd::follow_many(&c, &e.moves, json).await?;
    let moved = reports.iter().filter(|r| r.result == "done").count();
    if json {
        println!(
            "{}",
            serde_json::json!({"host": name, "moved": reports, "skipped": e.skipped})
        );
    } else {
        println!(
            "summary: {moved} of {} VMs moved off {name}, {} failed, {} could not move",
            e.moves.len() + e.skipped.len(),
            reports.len() - moved,
            e.skipped.len()
        );
    }
    if moved < reports.len() || !e.skipped.is_empty() {
        bail!("{name} is not empty");
    }
    Ok(())
}
