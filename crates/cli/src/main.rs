//! `ferry`: run, snapshot and restore VMs; write the test guest; benchmarks.

mod bench;
mod cluster_cmd;
mod demo;
mod host_cmd;
mod lab_cmd;
mod move_cmd;
mod qmp;
mod share_cmd;
mod target;
mod ui;
mod vm_cmd;
mod vmm_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// ferry moves running virtual machines between hosts, with no SAN and no cluster.
///
/// Each host runs `ferry host run`; an admin turns live migration on where it may happen
/// (`ferry host set --live-migration on`) and moves a VM with `ferry move web01 --to hv2`.
/// `ferry lab up` builds hosts on this machine to try it; `ferry demo` shows the whole story.
///
/// Which daemon a command talks to: --host (a name from the CLI config, unix:PATH or
/// host:port), else the CLI config's default ($FERRY_CONFIG, ~/.config/ferry/cli.json, or the
/// one `ferry lab up` writes), else this machine's own daemon (/var/lib/ferry/hostd.sock).
#[derive(Parser)]
#[command(name = "ferry", version, propagate_version = true)]
struct Cli {
    /// The host daemon to talk to: a name from the CLI config, unix:PATH, or host:port
    /// (or $FERRY_HOST).
    #[arg(long, global = true)]
    host: Option<String>,
    /// Print results as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This host's daemon, and a host's migration settings.
    #[command(subcommand)]
    Host(host_cmd::HostCmd),
    /// VMs by name, through their host's daemon: create, start, stop, delete, list, show,
    /// console.
    #[command(subcommand)]
    Vm(vm_cmd::VmCmd),
    /// Move a running VM live: to another host (`ferry move web01 --to hv2`), its disks
    /// (`--storage-to /srv/vms` or a share), or both (`--to hv2 --storage-to /srv/vms`). Checks
    /// first; `--check` only checks. `ferry move cancel web01` stops a move; the VM stays.
    Move(move_cmd::MoveCmd),
    /// The cluster: its authority, join tokens, the migration group.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCmd),
    /// Admins: enrol (with a join token) and remove.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Who did what on a host, how it was authorised, and every refusal with its reason.
    Audit,
    /// Sign a grant for one move with this admin's key (printed; `ferry move` signs its own).
    Grant(cluster_cmd::GrantArgs),
    /// The file server: `share run` on it, then shares of disk images with access lists
    /// naming the hosts that may read or write them (`ferry share create|grant|list ...`).
    Share {
        #[command(subcommand)]
        cmd: share_cmd::ShareCmd,
        #[command(flatten)]
        server: share_cmd::ServerArg,
    },
    /// Disk images on a file server's share: create, list, show, delete, break-lease.
    Disk {
        #[command(subcommand)]
        cmd: share_cmd::DiskCmd,
        #[command(flatten)]
        server: share_cmd::ServerArg,
    },
    /// A lab of hosts on this machine (network namespaces; needs root): up, down, status.
    #[command(subcommand)]
    Lab(lab_cmd::LabCmd),
    /// One VMM process, by hand: run, control, save, restore and migrate a VM through its
    /// control socket (the host daemon drives VMMs the same way).
    #[command(subcommand)]
    Vmm(vmm_cmd::VmmCmd),
    /// Write ferry's test guest (an x86-64 ELF with PVH and Multiboot entries) to a file.
    ///
    /// The guest runs its workload in ring 3. Its command line selects it, e.g.
    /// `mode=run hb=2 dirty=64 rate=0` (heartbeat on COM2 every ms, 64 MiB dirtier flat out)
    /// or `mode=exit code=0`. On COM1 it prints a banner and `READY`, and answers `v`
    /// (verify), `s` (status), `p` (power off), `r` (reset).
    Testguest {
        /// Where to write the image.
        #[arg(long)]
        out: PathBuf,
        /// Which form: elf64 (PVH note + Multiboot header), elf32 (a Multiboot ELF32 loaded by
        /// its program headers), elf32-kludge (ELF32 with a.out kludge addresses) or flat (a
        /// flat Multiboot binary). Every form boots under ferry and QEMU's -kernel.
        #[arg(long, default_value = "elf64", value_parser = ["elf64", "elf32", "elf32-kludge", "flat"])]
        form: String,
    },
    /// The quickest proof that ferry works here: a lab of two hosts with a ferry host daemon
    /// each (network namespaces; needs root), a VM on hv1 running the test guest with memory,
    /// disk and TCP workloads, `ferry move` to hv2 and back, verified after each move.
    Demo(demo::DemoArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The web console: hosts, VMs, shares and a Move wizard in a browser, over HTTPS.
    ///
    /// It reaches the hosts as this CLI does (its config, the admin's credentials, the
    /// cluster document) and prints a one-time login link. Example, on an admin's machine:
    /// `ferry ui --listen 0.0.0.0:7780`, then open the printed link. The console's pages and
    /// script are in this binary; the browser talks only to it.
    Ui(ui::UiArgs),
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Enrol as an admin with a one-time token (`ferry cluster token --role admin --name N`);
    /// the key is made here and stays here.
    Join {
        #[command(flatten)]
        join: cluster_cmd::JoinArgs,
        /// Where the credentials go [default: $FERRY_CREDS or ~/.config/ferry/admin].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Take an admin out of the cluster: their certificate and grants are refused from now on.
    Remove {
        /// The admin.
        name: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let targets = || target::Targets::new(cli.host.clone());
    match cli.cmd {
        Cmd::Host(cmd) => host_cmd::run(cmd, &targets()?, cli.json),
        Cmd::Vm(cmd) => vm_cmd::run(cmd, &targets()?, cli.json),
        Cmd::Move(cmd) => move_cmd::run(cmd, &targets()?, cli.json),
        Cmd::Lab(cmd) => lab_cmd::run(cmd, cli.json),
        Cmd::Cluster(cmd) => cluster_cmd::run(cmd, &targets()?, cli.json),
        Cmd::Admin(AdminCmd::Join { join, dir }) => cluster_cmd::admin_join(join, dir, cli.json),
        Cmd::Admin(AdminCmd::Remove { name }) => {
            cluster_cmd::remove(&targets()?, "admin", &name, cli.json)
        }
        Cmd::Audit => cluster_cmd::audit(&targets()?, cli.json),
        Cmd::Share { cmd, server } => share_cmd::run(cmd, server, &targets()?, cli.json),
        Cmd::Disk { cmd, server } => share_cmd::disk(cmd, server, &targets()?, cli.json),
        Cmd::Grant(a) => cluster_cmd::grant(a, cli.json),
        Cmd::Vmm(cmd) => vmm_cmd::run(cmd),
        Cmd::Testguest { out, form } => {
            let image = match form.as_str() {
                "elf32" => ferry_testguest::elf32(),
                "elf32-kludge" => ferry_testguest::elf32_kludge(),
                "flat" => ferry_testguest::flat(),
                _ => ferry_testguest::elf(),
            };
            std::fs::write(&out, image).with_context(|| format!("writing {}", out.display()))
        }
        Cmd::Bench(cmd) => bench::run(cmd),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Ui(a) => ui::run(a, targets()?),
    }
}
