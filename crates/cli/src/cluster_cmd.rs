//! `ferry cluster ...`, `ferry host join|remove`, `ferry admin join|remove`, `ferry audit`:
//! the cluster authority, enrolment, removal, the migration group, and the audit trail.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use ferry_api::cluster::*;

use crate::host_cmd::rt;
use crate::target::{creds_dir, Targets};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make a cluster: a certificate authority on this host (in <state-dir>/authority; its key
    /// never leaves), this host's own certificate, this host in the migration group, and the
    /// first admin's credentials. This host's daemon then also serves enrolment (its port + 1).
    ///
    /// Example: ferry cluster init --name prod --host-name hv1 --listen 10.0.0.1:7700 --admin alice
    Init(InitArgs),
    /// A one-time join token for a host, an admin or a file server (15 minutes by default).
    Token {
        /// Who may join with it.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "host", value_parser = ["host", "admin", "fileserver"])]
        role: String,
        /// Minutes it may be used.
        #[arg(long, default_value_t = 15)]
        ttl_min: i64,
    },
    /// The cluster document a host holds: hosts, migration group, revocations, version.
    Show,
    /// Which hosts may send and receive live migrations and storage moves.
    #[command(subcommand)]
    MigrationGroup(GroupCmd),
}

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Let hosts take part in moves.
    Add { hosts: Vec<String> },
    /// Stop hosts from taking part in moves.
    Remove { hosts: Vec<String> },
}

#[derive(Args)]
pub struct InitArgs {
    /// The cluster's name.
    #[arg(long)]
    name: String,
    /// This host's state directory (where its daemon runs).
    #[arg(long, default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// This host's name [default: the machine's hostname].
    #[arg(long)]
    host_name: Option<String>,
    /// Where this host's daemon listens (host:port), for the other hosts.
    #[arg(long)]
    listen: Option<String>,
    /// The first admin's name.
    #[arg(long, default_value = "admin")]
    admin: String,
    /// Where the first admin's credentials go [default: $FERRY_CREDS or ~/.config/ferry/admin].
    #[arg(long)]
    admin_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct JoinArgs {
    /// The cluster authority's enrolment address (its daemon's port + 1), host:port.
    #[arg(long)]
    authority: String,
    /// The join token (from `ferry cluster token`).
    #[arg(long)]
    token: String,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn print_info(i: &ClusterInfo, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(i)?);
        return Ok(());
    }
    println!(
        "cluster {} (document version {}), seen from {}{}",
        i.cluster,
        i.version,
        i.me,
        if i.authority {
            ", which holds the authority"
        } else {
            ""
        }
    );
    for h in &i.hosts {
        println!(
            "  host {:<8} {:<22} {}",
            h.name,
            h.addr,
            if i.migration_group.contains(&h.name) {
                "in the migration group"
            } else {
                "not in the migration group"
            }
        );
    }
    for f in &i.file_servers {
        println!("  file server {} {}", f.name, f.addr);
    }
    for r in &i.revoked {
        println!(
            "  removed: {} {} (certificate {})",
            r.role, r.name, r.serial
        );
    }
    Ok(())
}

pub fn run(cmd: ClusterCmd, t: &Targets, json: bool) -> Result<()> {
    match cmd {
        ClusterCmd::Init(a) => {
            let host = a.host_name.unwrap_or_else(hostname);
            let admin_dir = a.admin_dir.unwrap_or_else(creds_dir);
            let i = ferry_hostd::cluster::init_cluster(
                &a.state_dir,
                &a.name,
                &host,
                a.listen.as_deref(),
                Some((&a.admin, &admin_dir)),
            )
            .map_err(anyhow::Error::msg)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"cluster": i.cluster, "host": host, "admin": a.admin,
                        "admin_dir": admin_dir, "enrolment": i.enrolment})
                );
            } else {
                println!("cluster {} made: its authority lives in {}/authority", i.cluster, a.state_dir.display());
                println!("  {host}: certificate in {}/tls, in the migration group", a.state_dir.display());
                println!("  admin {}: credentials in {} (keep them private)", a.admin, admin_dir.display());
                if let Some(e) = &i.enrolment {
                    println!("  enrolment: {e} (once `ferry host run` runs here)");
                    println!("next: `ferry cluster token --name hv2`, then on hv2: `ferry host join --authority {e} --token TOKEN`");
                }
            }
            Ok(())
        }
        ClusterCmd::Token { name, role, ttl_min } => rt()?.block_on(async {
            let (_, c) = t.default()?;
            let r: TokenReply = c
                .post(
                    "/v1/cluster/tokens",
                    &TokenRequest {
                        role: role.clone(),
                        name: name.clone(),
                        ttl_s: Some(ttl_min * 60),
                    },
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", r.token);
                eprintln!(
                    "ferry: a one-time token for {role} {name}, valid {} min: `ferry {} join --authority ADDR --token {}`",
                    r.expires_in_s / 60,
                    if role == "admin" { "admin" } else { "host" },
                    r.token
                );
            }
            Ok(())
        }),
        ClusterCmd::Show => rt()?.block_on(async {
            let (_, c) = t.default()?;
            let i: ClusterInfo = c.get("/v1/cluster").await?;
            print_info(&i, json)
        }),
        ClusterCmd::MigrationGroup(g) => rt()?.block_on(async {
            let (member, hosts) = match g {
                GroupCmd::Add { hosts } => (true, hosts),
                GroupCmd::Remove { hosts } => (false, hosts),
            };
            if hosts.is_empty() {
                bail!("name at least one host");
            }
            let (_, c) = t.default()?;
            let mut last = None;
            for h in hosts {
                let i: ClusterInfo = c
                    .post("/v1/cluster/migration-group", &GroupRequest { host: h, member })
                    .await?;
                last = Some(i);
            }
            if let Some(i) = last {
                print_info(&i, json)?;
            }
            Ok(())
        }),
    }
}

/// `ferry host join`: enrol this host (key made here) with a join token.
pub fn host_join(
    a: JoinArgs,
    state_dir: PathBuf,
    listen: Option<String>,
    json: bool,
) -> Result<()> {
    let dir = ferry_hostd::security::tls_dir(&state_dir);
    if ferry_auth::Credentials::exists(&dir) {
        bail!(
            "this host already belongs to a cluster (credentials in {})",
            dir.display()
        );
    }
    let c = rt()?.block_on(ferry_hostd::cluster::join_cluster(
        &a.authority,
        &a.token,
        listen,
        &dir,
    ));
    let c = c.map_err(anyhow::Error::msg)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"joined": c.identity.to_string(), "credentials": dir})
        );
    } else {
        println!(
            "joined as {}: credentials in {} (its key was made here and stays here)",
            c.identity,
            dir.display()
        );
        if c.identity.role == ferry_auth::Role::FileServer {
            println!(
                "next: `ferry share run --name {}`, then shares and their access lists (`ferry share create`, `ferry share grant`)",
                c.identity.name
            );
        } else {
            println!(
                "next: an admin adds it to the migration group: `ferry cluster migration-group add {}`",
                c.identity.name
            );
        }
    }
    Ok(())
}

/// `ferry admin join`: enrol an admin (key made here) with a join token.
pub fn admin_join(a: JoinArgs, dir: Option<PathBuf>, json: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(creds_dir);
    if ferry_auth::Credentials::exists(&dir) {
        bail!("{} already holds an admin's credentials", dir.display());
    }
    let c = rt()?
        .block_on(ferry_hostd::cluster::join_cluster(
            &a.authority,
            &a.token,
            None,
            &dir,
        ))
        .map_err(anyhow::Error::msg)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"joined": c.identity.to_string(), "credentials": dir})
        );
    } else {
        println!("joined as {}: credentials in {}", c.identity, dir.display());
    }
    Ok(())
}

/// `ferry host remove` / `ferry admin remove`.
pub fn remove(t: &Targets, role: &str, name: &str, json: bool) -> Result<()> {
    rt()?.block_on(async {
        let (_, c) = t.default()?;
        let i: ClusterInfo = c
            .post(
                "/v1/cluster/remove",
                &RemoveRequest {
                    role: role.into(),
                    name: name.into(),
                },
            )
            .await?;
        if !json {
            println!("{role} {name} removed: its certificates are refused from now on (document version {})", i.version);
        }
        print_info(&i, json)
    })
}

/// `ferry grant`: sign a grant for one move with this admin's key (`ferry move` signs its own;
/// this is for handing one to someone else, or for looking at what a grant says).
pub fn grant(a: GrantArgs, json: bool) -> Result<()> {
    let dir = creds_dir();
    let creds = ferry_auth::Credentials::load(&dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let claims = ferry_auth::grant::GrantClaims {
        vm: a.vm,
        from: a.from,
        to: a.to,
        disks: a.disks,
        shares: a.shares,
        exp: now + a.ttl_s,
        iat: now,
        jti: ferry_vmm::migration::send::new_migration_id(),
        admin: creds.identity.name.clone(),
    };
    let t = ferry_auth::grant::sign(&creds, &claims)?;
    if json {
        println!("{}", serde_json::json!({"grant": t, "claims": claims}));
    } else {
        println!("{t}");
    }
    Ok(())
}

#[derive(Args)]
pub struct GrantArgs {
    /// The VM.
    #[arg(long)]
    vm: String,
    /// The source host.
    #[arg(long)]
    from: String,
    /// The destination host.
    #[arg(long)]
    to: String,
    /// A disk image the hosts may open for this move (repeat).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A share the hosts may touch for this move (repeat).
    #[arg(long = "share")]
    shares: Vec<String>,
    /// Seconds it is valid.
    #[arg(long, default_value_t = 600, allow_hyphen_values = true)]
    ttl_s: i64,
}

/// `ferry audit`: who did what on a host.
pub fn audit(t: &Targets, json: bool) -> Result<()> {
    rt()?.block_on(async {
        let (h, c) = t.default()?;
        let l: AuditList = c.get("/v1/audit").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&l)?);
            return Ok(());
        }
        println!("audit trail of {h} (newest last)");
        for e in l.entries {
            println!(
                "{} {:<8} {} — {}{}{}",
                e.at_ms / 1000,
                e.result,
                e.who,
                e.what,
                e.auth.map(|a| format!(" [{a}]")).unwrap_or_default(),
                e.why.map(|w| format!(": {w}")).unwrap_or_default()
            );
        }
        Ok(())
    })
}
