//! `ferry share ...` and `ferry disk ...`: the file server, its shares, access lists, disks
//! and their write leases.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::share::*;
use ferry_hostd::{Client, Endpoint};

use crate::host_cmd::rt;
use crate::target::Targets;

/// Where a file server's local socket is by default.
pub const DEFAULT_SHARE_STATE: &str = "/var/lib/ferry-share";

#[derive(Args)]
pub struct ServerArg {
    /// The file server: a name (CLI config or cluster document), unix:PATH or host:port
    /// [default: $FERRY_SHARE_SERVER, else this machine's at /var/lib/ferry-share/share.sock].
    #[arg(long, global = true)]
    pub server: Option<String>,
}

#[derive(Subcommand)]
pub enum ShareCmd {
    /// Run this machine's file server in the foreground: shares of disk images, served over
    /// NBD (STARTTLS with the cluster's certificates), each share with an access list naming
    /// the hosts that may read or write it, one writer per disk by a fenced lease.
    ///
    /// Example: ferry share run --name fs1 --listen 10.0.0.9:7800 --nbd-listen 10.0.0.9:10809
    Run(RunArgs),
    /// Enrol this file server in a cluster with a one-time token (`ferry cluster token --role
    /// fileserver --name fs1` on the authority); its key is made here and stays here.
    Join {
        #[command(flatten)]
        join: crate::cluster_cmd::JoinArgs,
        #[arg(long, default_value = DEFAULT_SHARE_STATE)]
        state_dir: PathBuf,
        /// Where this file server's API will listen (host:port), for the cluster document.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Make a share: a folder of disk images with an empty access list.
    Create {
        name: String,
        /// The folder [default: <state>/shares/<name>].
        #[arg(long)]
        path: Option<String>,
    },
    /// Every share with its access list and disks.
    List,
    /// One share: folder, free space, access list, disks and their leases.
    Show { name: String },
    /// Remove an empty share (its folder stays).
    Delete { name: String },
    /// Let a host read, or read and write, a share's disks (by its certificate name).
    ///
    /// Example: ferry share grant vms hv1 write
    Grant {
        share: String,
        host: String,
        /// read or write
        access: Access,
    },
    /// Take a host off a share's access list: it cannot open the share's disks any more, and
    /// its open connections stop at their next request.
    Revoke { share: String, host: String },
}

#[derive(Args)]
pub struct RunArgs {
    /// This file server's name (its certificate's) [default: the machine's hostname].
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = DEFAULT_SHARE_STATE)]
    state_dir: PathBuf,
    /// Serve the management API on this TCP address too (mutual TLS).
    #[arg(long)]
    listen: Option<String>,
    /// Where NBD clients connect.
    #[arg(long, default_value = "0.0.0.0:10809")]
    nbd_listen: String,
    /// Without a cluster: no TLS, anyone who reaches the ports may read and write every disk.
    /// Only for a trusted lab network.
    #[arg(long)]
    insecure: bool,
}

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Make a sparse raw disk image on a share.
    ///
    /// Example: ferry disk create vms/web01 --size 20G
    Create {
        /// SHARE/DISK
        disk: String,
        /// Size: bytes, or with K, M, G, T (binary).
        #[arg(long)]
        size: String,
    },
    /// Disks of every share (or one).
    List { share: Option<String> },
    /// One disk: size, allocation, its NBD URI, who holds its write lease.
    Show { disk: String },
    /// Copy a disk nobody writes, on its file server: to another name, or another share
    /// (`ferry disk copy vms/web01 backup/web01-monday`). Holes stay holes.
    Copy {
        /// SHARE/DISK
        from: String,
        /// SHARE/DISK, or DISK on the same share
        to: String,
    },
    /// Delete a disk nobody holds the lease of.
    Delete { disk: String },
    /// Break a disk's write lease (a host that is gone for good): whatever it has open can no
    /// longer write.
    BreakLease { disk: String },
}

pub(crate) fn share_client(t: &Targets, server: Option<String>) -> Result<(String, Client)> {
    let s = server.or_else(|| std::env::var("FERRY_SHARE_SERVER").ok());
    let Some(s) = s else {
        return Ok((
            "local".into(),
            Client::new(Endpoint::Unix(
                PathBuf::from(DEFAULT_SHARE_STATE).join("share.sock"),
            )),
        ));
    };
    if let Some(a) = &t.admin {
        let doc = a.trust.doc();
        if let Some(m) = doc.file_servers.iter().find(|m| m.name == s || m.addr == s) {
            return Ok((
                m.name.clone(),
                a.client(&m.name, Endpoint::Tcp(m.addr.clone()))?,
            ));
        }
    }
    t.resolve(&s)
}

fn split_disk(d: &str) -> Result<(&str, &str)> {
    d.split_once('/')
        .filter(|(s, n)| !s.is_empty() && !n.is_empty())
        .with_context(|| format!("{d:?} is not SHARE/DISK"))
}

/// `20G`, `512M`, `4096`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size (e.g. 20G, 512M, 1048576)"))?;
    n.checked_mul(mul).context("size too large")
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn lease_text(l: &LeaseInfo) -> String {
    match &l.holder {
        Some(h) => format!("held by {h} (fence {})", l.fence),
        None => match (&l.handed_to, &l.grant) {
            (Some(t), Some(g)) => format!(
                "handed over to {t} under grant {g}, which {t} must show (fence {})",
                l.fence
            ),
            (Some(t), None) => format!("handed over to {t} (fence {})", l.fence),
            _ => format!("free (fence {})", l.fence),
        },
    }
}

fn print_share(s: &ShareInfo) {
    println!("share {}  {}  free {}", s.name, s.path, human(s.free_bytes));
    if s.access.is_empty() {
        println!(
            "  access: nobody (`ferry share grant {} HOST read|write`)",
            s.name
        );
    } else {
        let a: Vec<String> = s.access.iter().map(|(h, a)| format!("{h}={a}")).collect();
        println!("  access: {}", a.join(" "));
    }
    for d in &s.disks {
        print_disk_line(d);
    }
}

fn print_disk_line(d: &DiskInfo) {
    println!(
        "  {:<24} {:>10} ({} used)  lease {}",
        d.export,
        human(d.size_bytes),
        human(d.allocated_bytes),
        lease_text(&d.lease)
    );
}

fn out<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human(v)
    }
}

pub fn run(cmd: ShareCmd, server: ServerArg, t: &Targets, json: bool) -> Result<()> {
    if let ShareCmd::Run(a) = cmd {
        return run_server(a);
    }
    if let ShareCmd::Join {
        join,
        state_dir,
        listen,
    } = cmd
    {
        return crate::cluster_cmd::host_join(join, state_dir, listen, json);
    }
    let (name, c) = share_client(t, server.server)?;
    let rt = rt()?;
    let at = |e: ferry_hostd::ClientError| anyhow::anyhow!("file server {name}: {e}");
    match cmd {
        ShareCmd::Run(_) | ShareCmd::Join { .. } => unreachable!("handled above"),
        ShareCmd::Create { name: n, path } => {
            let s: ShareInfo = rt
                .block_on(c.post("/v1/shares", &ShareCreate { name: n, path }))
                .map_err(at)?;
            out(json, &s, print_share);
        }
        ShareCmd::List => {
            let l: ShareList = rt.block_on(c.get("/v1/shares")).map_err(at)?;
            out(json, &l, |l| {
                if l.shares.is_empty() {
                    println!("no shares (`ferry share create NAME`)");
                }
                for s in &l.shares {
                    print_share(s);
                }
            });
        }
        ShareCmd::Show { name: n } => {
            let s: ShareInfo = rt.block_on(c.get(&format!("/v1/shares/{n}"))).map_err(at)?;
            out(json, &s, print_share);
        }
        ShareCmd::Delete { name: n } => {
            rt.block_on(c.delete(&format!("/v1/shares/{n}")))
                .map_err(at)?;
            if !json {
                println!("share {n} removed (its folder stays)");
            }
        }
        ShareCmd::Grant {
            share,
            host,
            access,
        } => {
            let s: ShareInfo = rt
                .block_on(c.put(
                    &format!("/v1/shares/{share}/access/{host}"),
                    &AccessSet { access },
                ))
                .map_err(at)?;
            out(json, &s, print_share);
        }
        ShareCmd::Revoke { share, host } => {
            let s: ShareInfo = rt
                .block_on(c.delete_json(&format!("/v1/shares/{share}/access/{host}")))
                .map_err(at)?;
            out(json, &s, print_share);
        }
    }
    Ok(())
}

pub fn disk(cmd: DiskCmd, server: ServerArg, t: &Targets, json: bool) -> Result<()> {
    let (name, c) = share_client(t, server.server)?;
    let rt = rt()?;
    let at = |e: ferry_hostd::ClientError| anyhow::anyhow!("file server {name}: {e}");
    match cmd {
        DiskCmd::Create { disk, size } => {
            let (share, d) = split_disk(&disk)?;
            let size_bytes = parse_size(&size)?;
            let i: DiskInfo = rt
                .block_on(c.post(
                    &format!("/v1/shares/{share}/disks"),
                    &DiskCreate {
                        name: d.into(),
                        size_bytes,
                    },
                ))
                .map_err(at)?;
            out(json, &i, |i| {
                println!("disk {} made: {} (sparse)", i.export, human(i.size_bytes));
                if let Some(u) = &i.uri {
                    println!("  give it to a VM: --disk {u}");
                }
            });
        }
        DiskCmd::List { share } => {
            let l: ShareList = rt.block_on(c.get("/v1/shares")).map_err(at)?;
            let disks: Vec<DiskInfo> = l
                .shares
                .into_iter()
                .filter(|s| share.as_ref().is_none_or(|n| &s.name == n))
                .flat_map(|s| s.disks)
                .collect();
            out(json, &disks, |v| {
                if v.is_empty() {
                    println!("no disks");
                }
                for d in v {
                    print_disk_line(d);
                }
            });
        }
        DiskCmd::Show { disk } => {
            let (share, d) = split_disk(&disk)?;
            let i: DiskInfo = rt
                .block_on(c.get(&format!("/v1/shares/{share}/disks/{d}")))
                .map_err(at)?;
            out(json, &i, |i| {
                println!("disk {}", i.export);
                println!(
                    "  size      {} ({} allocated)",
                    human(i.size_bytes),
                    human(i.allocated_bytes)
                );
                if let Some(u) = &i.uri {
                    println!("  uri       {u}");
                }
                println!("  lease     {}", lease_text(&i.lease));
            });
        }
        DiskCmd::Copy { from, to } => {
            let (share, d) = split_disk(&from)?;
            let (to_share, to_name) = match to.split_once('/') {
                Some((s, n)) => (Some(s.to_string()), n.to_string()),
                None => (None, to.clone()),
            };
            let r: DiskCopyReport = rt
                .block_on(c.post(
                    &format!("/v1/shares/{share}/disks/{d}/copy"),
                    &DiskCopy { to_share, to_name },
                ))
                .map_err(at)?;
            out(json, &r, |r| {
                println!(
                    "copied {from} to {}: {} copied, {} skipped as holes, {} ms",
                    r.disk.export,
                    human(r.bytes_copied),
                    human(r.bytes_skipped),
                    r.total_ms
                )
            });
        }
        DiskCmd::Delete { disk } => {
            let (share, d) = split_disk(&disk)?;
            rt.block_on(c.delete(&format!("/v1/shares/{share}/disks/{d}")))
                .map_err(at)?;
            if !json {
                println!("disk {disk} deleted");
            }
        }
        DiskCmd::BreakLease { disk } => {
            let (share, d) = split_disk(&disk)?;
            let i: DiskInfo = rt
                .block_on(c.post(
                    &format!("/v1/shares/{share}/disks/{d}/lease"),
                    &LeaseRequest::new(LeaseAction::Break),
                ))
                .map_err(at)?;
            out(json, &i, |i| {
                println!("disk {}: lease broken, {}", i.export, lease_text(&i.lease))
            });
        }
    }
    Ok(())
}

fn run_server(a: RunArgs) -> Result<()> {
    let name = a.name.unwrap_or_else(crate::cluster_cmd::hostname);
    if name.is_empty() {
        bail!("give the file server a --name");
    }
    let o = ferry_share::Options {
        name,
        state_dir: a.state_dir,
        listen: a.listen,
        nbd_listen: a.nbd_listen,
        insecure: a.insecure,
    };
    rt()?
        .block_on(ferry_share::run(o))
        .map_err(|e| anyhow::anyhow!("{e}"))
}
