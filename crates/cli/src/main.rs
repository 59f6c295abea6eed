//! `ferry`: run, snapshot and restore VMs; write the test guest; benchmarks.

mod bench;
mod demo;
mod lab;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_api::{
    DiskConfig, MigrateSettings, MigrationPhase, MigrationProgress, NetConfig, OnTimeout, Request,
    Response, ResponseBody, SerialBackend, VmConfig,
};
use ferry_vmm::{api_server, RestoreOverrides, RunOptions, Vm, VmExit};

/// ferry moves running virtual machines between hosts. This build runs VMs on KVM, saves and
/// restores them, and ships its own test guest.
#[derive(Parser)]
#[command(name = "ferry", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run, control, save and restore VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Write ferry's test guest (an x86-64 ELF with PVH and Multiboot entries) to a file.
    ///
    /// The guest runs its workload in ring 3. Its command line selects it, e.g.
    /// `mode=run hb=2 dirty=64 rate=0` (heartbeat on COM2 every ms, 64 MiB dirtier flat out)
    /// or `mode=exit code=0`. On COM1 it prints a banner and `READY`, and answers `v`
    /// (verify), `s` (status), `p` (power off), `r` (reset).
    Testguest {
        /// Where to write the ELF.
        #[arg(long)]
        out: PathBuf,
    },
    /// The quickest proof that ferry works here: a lab of two hosts (network namespaces; needs
    /// root), the test guest running on host A with memory, disk and TCP workloads, moved live
    /// to host B and back, verified after each move.
    Demo(demo::DemoArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

#[derive(Subcommand)]
enum VmCmd {
    /// Run a VM in the foreground until the guest powers off or resets (exit status 0).
    ///
    /// Example: ferry vm run --kernel guest.elf --cmdline "mode=run" --memory 256 --serial stdio
    Run(RunArgs),
    /// Restore a VM saved with `ferry vm save` and run it in the foreground.
    Restore(RestoreArgs),
    /// Pause a running VM (through its --api socket).
    Pause(ApiArg),
    /// Resume a paused VM.
    Resume(ApiArg),
    /// Show a VM's state.
    Status(ApiArg),
    /// Pause a VM and save its complete state and memory to DIR; it stays paused.
    Save {
        #[command(flatten)]
        api: ApiArg,
        /// An empty or new directory.
        dir: PathBuf,
    },
    /// Stop a VM and end its VMM.
    Quit(ApiArg),
    /// Wait for a VM to arrive from another host's `ferry vm migrate`, then run it in the
    /// foreground. Nothing runs here unless the move completes.
    ///
    /// Example: ferry vm receive --listen 0.0.0.0:7788 --api /run/web01.sock --serial stdio
    Receive(ReceiveArgs),
    /// Move a running VM (through its --api socket) to a VMM waiting with `vm receive`.
    /// Prints progress and a final report; on failure or cancel the VM keeps running here.
    ///
    /// Example: ferry vm migrate --api /run/web01.sock --to hv2:7788
    Migrate(MigrateArgs),
    /// Cancel a migration that has not committed yet; the VM keeps running here.
    MigrateCancel(ApiArg),
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on for the source VMM (host:port).
    #[arg(long)]
    listen: String,
    /// Give up if no source connects within this many seconds (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// COM1 backend on this host (default: as on the source).
    #[arg(long)]
    serial: Option<SerialBackend>,
    /// COM2 backend on this host (default: as on the source).
    #[arg(long)]
    serial2: Option<SerialBackend>,
    /// Serve the control API on this unix socket (once the VM has arrived).
    #[arg(long)]
    api: Option<PathBuf>,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    api: ApiArg,
    /// The destination VMM (host:port given to its `vm receive --listen`).
    #[arg(long)]
    to: String,
    /// Longest pause the guest may see, in ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap in Mbit/s (0 = none).
    #[arg(long, default_value_t = 0)]
    bandwidth_mbit: u64,
    /// Give up after this many seconds (0 = never).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// What to do when the memory copy does not converge in time: cancel (stay here) or force.
    #[arg(long, default_value = "cancel", value_parser = ["cancel", "force"])]
    on_timeout: String,
    /// Print progress and the report as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ApiArg {
    /// The VM's control socket (as given to `vm run --api`).
    #[arg(long)]
    api: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: ELF with a PVH note or Multiboot header, or a Linux bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// COM1: stdio, null, file:PATH or unix:PATH (ferry listens there).
    #[arg(long, default_value = "stdio")]
    serial: SerialBackend,
    /// COM2: stdio, null, file:PATH or unix:PATH.
    #[arg(long, default_value = "null")]
    serial2: SerialBackend,
    /// A virtio disk on a raw image: PATH[,readonly][,serial=S]. Repeat for more disks.
    /// The image is locked: a second VMM cannot open it for writing.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<DiskConfig>,
    /// A virtio network card: tap=NAME[,mac=MAC] (an existing tap) or bridge=BR[,mac=MAC]
    /// (ferry makes a tap on bridge BR and removes it at exit). Repeat for more cards.
    #[arg(long = "net", value_name = "tap=NAME|bridge=BR")]
    nets: Vec<NetConfig>,
    /// Serve the control API (pause, resume, save, status, quit) on this unix socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Create the VM paused; `ferry vm resume` starts it.
    #[arg(long)]
    paused: bool,
}

#[derive(Args)]
struct RestoreArgs {
    /// A directory written by `ferry vm save`.
    dir: PathBuf,
    /// COM1 backend (default: as saved).
    #[arg(long)]
    serial: Option<SerialBackend>,
    /// COM2 backend (default: as saved).
    #[arg(long)]
    serial2: Option<SerialBackend>,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Restore paused; `ferry vm resume` starts it.
    #[arg(long)]
    paused: bool,
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
    match cli.cmd {
        Cmd::Vm(cmd) => vm(cmd),
        Cmd::Testguest { out } => std::fs::write(&out, ferry_testguest::elf())
            .with_context(|| format!("writing {}", out.display())),
        Cmd::Bench(cmd) => bench::run(cmd),
        Cmd::Demo(a) => demo::run(a),
    }
}

/// Run a VM that was just built (or report why it could not be) until it ends.
fn run_vm(vm: Result<Vm, ferry_vmm::VmError>) -> Result<()> {
    let chain = |e: ferry_vmm::VmError| anyhow::anyhow!(ferry_vmm::error_chain(&e));
    let exit: VmExit = vm.map_err(chain)?.run().map_err(chain)?;
    tracing::info!("VM ended: {exit:?}");
    Ok(())
}

fn vm(cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Run(a) => {
            let config = VmConfig {
                kernel: a.kernel,
                cmdline: a.cmdline,
                initrd: a.initrd,
                memory_mib: a.memory,
                vcpus: a.vcpus,
                serial: a.serial,
                serial2: a.serial2,
                disks: a.disks,
                nets: a.nets,
            };
            let opts = RunOptions {
                api: a.api,
                paused: a.paused,
            };
            run_vm(Vm::create(config, opts))
        }
        VmCmd::Restore(a) => {
            let overrides = RestoreOverrides {
                serial: a.serial,
                serial2: a.serial2,
            };
            let opts = RunOptions {
                api: a.api,
                paused: a.paused,
            };
            run_vm(Vm::restore(&a.dir, overrides, opts))
        }
        VmCmd::Pause(a) => call(&a.api, Request::Pause),
        VmCmd::Resume(a) => call(&a.api, Request::Resume),
        VmCmd::Status(a) => call(&a.api, Request::Status),
        VmCmd::Save { api, dir } => {
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            call(&api.api, Request::Save { dir })
        }
        VmCmd::Quit(a) => call(&a.api, Request::Quit),
        VmCmd::MigrateCancel(a) => call(&a.api, Request::MigrateCancel),
        VmCmd::Receive(a) => {
            let overrides = RestoreOverrides {
                serial: a.serial,
                serial2: a.serial2,
            };
            let timeout = (a.timeout > 0).then(|| std::time::Duration::from_secs(a.timeout));
            let opts = RunOptions {
                api: a.api,
                paused: false,
            };
            run_vm(ferry_vmm::migration::receive::receive(
                &a.listen,
                timeout,
                &overrides,
                opts,
                |m| eprintln!("ferry: {m}"),
            ))
        }
        VmCmd::Migrate(a) => migrate(a),
    }
}

fn migrate(a: MigrateArgs) -> Result<()> {
    let settings = MigrateSettings {
        to: a.to,
        downtime_ms: a.downtime_ms,
        bandwidth_mbit: a.bandwidth_mbit,
        timeout_s: a.timeout,
        on_timeout: if a.on_timeout == "force" {
            OnTimeout::Force
        } else {
            OnTimeout::Cancel
        },
    };
    let mut last: Option<MigrationProgress> = None;
    let mut error = None;
    api_server::call_stream(&a.api.api, &Request::Migrate { settings, follow: true }, |r| {
        match r {
            Response::Ok(ResponseBody::Migration(p)) => {
                if a.json {
                    println!("{}", serde_json::to_string(&p).unwrap_or_default());
                } else if !matches!(p.phase, MigrationPhase::Done | MigrationPhase::Failed | MigrationPhase::Cancelled) {
                    eprintln!(
                        "{:>7.1}s {:?} round {} sent {:.1} MiB, dirty {} pages ({} pages/s), link {:.0} Mbit/s, expected pause {:.1} ms",
                        p.elapsed_ms as f64 / 1000.0,
                        p.phase,
                        p.round,
                        p.bytes_sent as f64 / (1 << 20) as f64,
                        p.dirty_pages,
                        p.dirty_rate_pps,
                        p.bandwidth_mbit,
                        p.expected_downtime_ms
                    );
                }
                last = Some(p);
            }
            Response::Ok(_) => {}
            Response::Error(e) => error = Some(e),
        }
        true
    })
    .with_context(|| format!("cannot reach the VMM at {} (is it running with --api?)", a.api.api.display()))?;
    if let Some(e) = error {
        bail!("{e}");
    }
    let p = last.context("the VMM ended the migration without a report")?;
    if !a.json {
        println!(
            "migration {:?}: {:.2} s total, pause {}, {:.1} MiB in {} rounds{}",
            p.phase,
            p.elapsed_ms as f64 / 1000.0,
            p.downtime_ms
                .map(|d| format!("{d:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            p.bytes_sent as f64 / (1 << 20) as f64,
            p.round + 1,
            if p.converged || p.phase != MigrationPhase::Done {
                ""
            } else {
                " (forced: did not converge)"
            }
        );
    }
    match p.phase {
        MigrationPhase::Done => Ok(()),
        _ => bail!("{}", p.error.unwrap_or_else(|| format!("{:?}", p.phase))),
    }
}

fn call(api: &std::path::Path, req: Request) -> Result<()> {
    let resp = api_server::call(api, &req).with_context(|| {
        format!(
            "cannot reach the VMM at {} (is it running with --api?)",
            api.display()
        )
    })?;
    match resp {
        Response::Ok(ResponseBody::Status(s)) => {
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Response::Ok(ResponseBody::Saved {
            dir,
            memory_bytes,
            ms,
        }) => {
            println!(
                "saved to {} in {ms} ms ({} MiB of memory written)",
                dir.display(),
                memory_bytes >> 20
            );
            Ok(())
        }
        Response::Ok(ResponseBody::Migration(p)) => {
            println!("{}", serde_json::to_string(&p)?);
            Ok(())
        }
        Response::Ok(ResponseBody::Done) => Ok(()),
        Response::Error(e) => bail!("{e}"),
    }
}
