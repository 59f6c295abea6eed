//! `ferry`: run, snapshot and restore VMs; write the test guest; benchmarks.

mod bench;
mod demo;
mod qmp;
mod vmm_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

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
        Cmd::Vmm(cmd) => vmm_cmd::run(cmd),
        Cmd::Testguest { out } => std::fs::write(&out, ferry_testguest::elf())
            .with_context(|| format!("writing {}", out.display())),
        Cmd::Bench(cmd) => bench::run(cmd),
        Cmd::Demo(a) => demo::run(a),
    }
}
