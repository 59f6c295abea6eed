//! `ferry lab ...`: a lab of hosts on this machine (network namespaces on one segment, a host
//! daemon in each, live migration on), for trying ferry without a second machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::host::{HostInfo, HostSettingsPatch};
use ferry_hostd::{Client, Endpoint};
use ferry_lab::{Lab, LabOptions};

use crate::host_cmd::rt;
use crate::target::{lab_config_path, CliConfig};

/// The name of the lab `ferry lab up` makes.
pub const LAB_NAME: &str = "ferrylab";
/// Where its hosts keep their state, disks and logs by default.
pub const LAB_DIR: &str = "/var/tmp/ferry-lab";

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build a lab: N hosts (network namespaces on one segment, each with its own address, a
    /// bridge br0 and a host daemon with live migration on) and a client namespace. Writes a CLI
    /// config naming the hosts (used when no other is set) and the test guest as a kernel. A
    /// lab left behind by an earlier run is removed first.
    ///
    /// Example: ferry lab up --hosts 2 && ferry vm create web01 --kernel /var/tmp/ferry-lab/testguest.elf --net bridge=br0 --start
    Up(UpArgs),
    /// Remove the lab: every process in it, its namespaces, its files.
    Down,
    /// The lab's hosts, their addresses and whether their daemons answer.
    Status,
}

#[derive(Args)]
pub struct UpArgs {
    /// How many hosts.
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Where the hosts keep their state, disks and logs.
    #[arg(long, default_value = LAB_DIR)]
    dir: PathBuf,
}

pub fn run(cmd: LabCmd, json: bool) -> Result<()> {
    match cmd {
        LabCmd::Up(a) => up(a, json),
        LabCmd::Down => down(),
        LabCmd::Status => status(json),
    }
}

/// Turn live migration on in every host of `lab` (as an admin would) and wait until each
/// daemon says so.
pub async fn enable_migration(lab: &Lab) -> Result<()> {
    for h in &lab.hosts {
        let c = Client::new(Endpoint::Unix(h.socket()));
        let p = HostSettingsPatch {
            live_migration: Some(true),
            ..Default::default()
        };
        let _: HostInfo = c
            .patch("/v1/host", &p)
            .await
            .with_context(|| format!("turning live migration on on {}", h.name))?;
    }
    Ok(())
}

/// The CLI config that names a lab's hosts by their local sockets.
pub fn cli_config(lab: &Lab) -> CliConfig {
    CliConfig {
        default: lab.hosts.first().map(|h| h.name.clone()),
        hosts: lab
            .hosts
            .iter()
            .map(|h| (h.name.clone(), format!("unix:{}", h.socket().display())))
            .collect(),
    }
}

fn up(a: UpArgs, json: bool) -> Result<()> {
    ferry_lab::require_root("ferry lab up")?;
    if a.hosts == 0 || a.hosts > 9 {
        bail!("--hosts must be 1 to 9");
    }
    for removed in ferry_lab::remove_stale(Some(LAB_NAME)) {
        eprintln!("ferry: removed the lab {removed} left behind by an earlier run");
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let ferry = std::env::current_exe()?;
    let lab = Lab::new(LabOptions {
        name: Some(LAB_NAME.into()),
        hosts: a.hosts,
        dir: a.dir.clone(),
        ferry: Some(ferry),
        persistent: true,
        insecure: false,
    })?;
    rt()?.block_on(enable_migration(&lab))?;
    let guest = a.dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let cfg = cli_config(&lab);
    let cfg_path = lab_config_path();
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&lab.record)?);
    } else {
        println!(
            "lab {LAB_NAME} is up: {} hosts on {}",
            a.hosts,
            ferry_lab::LAB_SUBNET
        );
        for h in &lab.hosts {
            println!(
                "  {:<4} {:<12} daemon {} and unix:{} (namespace {})",
                h.name,
                h.ip,
                h.daemon_addr(),
                h.socket().display(),
                h.ns
            );
        }
        println!(
            "  client {} (namespace {})",
            ferry_lab::CLIENT_IP,
            lab.client
        );
        println!("  test guest: {}", guest.display());
        println!(
            "the ferry CLI finds the lab's hosts through {} (or set FERRY_CONFIG to it); try:",
            cfg_path.display()
        );
        println!(
            "  ferry vm create web01 --kernel {} --memory 256 --net bridge=br0 --cmdline \"hb=2 dirty=16 ip={}/24\" --start",
            guest.display(),
            ferry_lab::guest_ip(0)
        );
        println!("  ferry move web01 --to hv2");
        println!("  ferry lab down");
    }
    lab.keep();
    Ok(())
}

fn down() -> Result<()> {
    ferry_lab::require_root("ferry lab down")?;
    let rec = ferry_lab::find(LAB_NAME);
    let removed = ferry_lab::remove_stale(Some(LAB_NAME));
    let _ = std::fs::remove_file(lab_config_path());
    if let Some(r) = rec {
        let _ = std::fs::remove_dir_all(&r.dir);
    }
    if removed.is_empty() {
        println!("no lab was up (stale labs of killed runs are removed too)");
    } else {
        println!("lab {LAB_NAME} removed: its processes, namespaces and files are gone");
    }
    Ok(())
}

fn status(json: bool) -> Result<()> {
    let Some(r) = ferry_lab::find(LAB_NAME) else {
        bail!("no lab is up; start one with `ferry lab up`");
    };
    let answers: Vec<Option<HostInfo>> = rt()?.block_on(async {
        let mut v = Vec::new();
        for h in &r.hosts {
            let c = Client::new(Endpoint::Unix(h.socket())).with_timeout(Duration::from_secs(3));
            v.push(c.get::<HostInfo>("/v1/host").await.ok());
        }
        v
    });
    if json {
        let hosts: Vec<serde_json::Value> = r
            .hosts
            .iter()
            .zip(&answers)
            .map(|(h, a)| {
                serde_json::json!({"name": h.name, "ip": h.ip, "namespace": h.ns,
                    "daemon": h.daemon_addr(), "socket": h.socket(), "up": a.is_some(),
                    "vms_running": a.as_ref().map(|a| a.vms_running)})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"lab": r.name, "client": ferry_lab::CLIENT_IP, "hosts": hosts})
        );
        return Ok(());
    }
    println!("lab {} ({})", r.name, r.dir.display());
    for (h, a) in r.hosts.iter().zip(&answers) {
        match a {
            Some(i) => println!(
                "  {:<4} {:<12} daemon up, live migration {}, {} VMs running",
                h.name,
                h.ip,
                if i.settings.live_migration {
                    "on"
                } else {
                    "off"
                },
                i.vms_running
            ),
            None => println!(
                "  {:<4} {:<12} daemon NOT answering ({})",
                h.name,
                h.ip,
                h.socket().display()
            ),
        }
    }
    println!(
        "  client {} (namespace {})",
        ferry_lab::CLIENT_IP,
        r.client_ns
    );
    Ok(())
}
