//! `ferry vmm ...`: one VMM process, driven directly through its control socket. The host
//! daemon starts VMMs this way; people use it to run a VM by hand without a daemon.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::{
    Compression, DiskConfig, MigrateSettings, MigrationForecast, MigrationMode, MigrationPhase,
    MigrationProgress, NetConfig, OnTimeout, Outcome, Request, Response, ResponseBody,
    SerialBackend, VmConfig,
};
use ferry_vmm::migration::receive::{Listen, ReceiveOptions};
use ferry_vmm::{api_server, RestoreOverrides, RunOptions, Vm, VmExit};

#[derive(Subcommand)]
pub enum VmmCmd {
    /// Run a VM in the foreground until the guest powers off or resets (exit status 0).
    ///
    /// Example: ferry vmm run --kernel guest.elf --cmdline "mode=run" --memory 256 --serial stdio
    Run(RunArgs),
    /// Restore a VM saved with `ferry vmm save` and run it in the foreground.
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
    /// Wait for a VM to arrive from another host's `ferry vmm migrate`, then run it in the
    /// foreground. Nothing runs here unless the move completes.
    ///
    /// Example: ferry vmm receive --listen 0.0.0.0:7788 --api /run/web01.sock --serial stdio
    Receive(ReceiveArgs),
    /// Move a running VM (through its --api socket) to a VMM waiting with `vmm receive`.
    /// Prints progress and a final report; on failure or cancel the VM keeps running here.
    ///
    /// Example: ferry vmm migrate --api /run/web01.sock --to hv2:7788
    Migrate(MigrateArgs),
    /// Cancel a migration that has not committed yet; the VM keeps running here.
    MigrateCancel(ApiArg),
    /// Settle a migration that is in doubt (Commit sent, no answer came): say what the
    /// destination's outcome record says. `committed` ends this VMM (the guest runs there);
    /// `aborted` resumes the guest here. Saying it without reading the record may run the
    /// guest twice or lose it.
    MigrateResolve {
        #[command(flatten)]
        api: ApiArg,
        /// What the destination's outcome record says.
        #[arg(long, value_parser = ["committed", "aborted"])]
        outcome: String,
    },
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Address to listen on for the source VMM (host:port).
    #[arg(long, required_unless_present = "listen_fd")]
    listen: Option<String>,
    /// Use this inherited, already listening TCP socket instead (set by the host daemon).
    #[arg(long, conflicts_with = "listen")]
    listen_fd: Option<i32>,
    /// Give up if no source connects within this many seconds (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Accept only the move with this id (the host daemon names each move).
    #[arg(long)]
    expect_id: Option<String>,
    /// Keep the move's outcome (committed or aborted) in this file, written once; a source
    /// in doubt, or its daemon, learns the outcome from it.
    #[arg(long)]
    record: Option<PathBuf>,
    /// COM1 backend on this host (default: as on the source).
    #[arg(long)]
    serial: Option<SerialBackend>,
    /// COM2 backend on this host (default: as on the source).
    #[arg(long)]
    serial2: Option<SerialBackend>,
    /// Disk INDEX is at PATH on this host, not where the source has it (repeatable): a disk a
    /// storage move copied here. Example: --disk-path 0=/var/lib/ferry/disks/web01.img
    #[arg(long = "disk-path", value_name = "INDEX=PATH", value_parser = parse_disk_path)]
    disk_paths: Vec<(usize, PathBuf)>,
    /// Serve the control API on this unix socket (once the VM has arrived).
    #[arg(long)]
    api: Option<PathBuf>,
    /// Require mutual TLS with this host's credentials (a `ferry host` tls directory)...
    #[arg(long, requires = "expect_peer")]
    tls_dir: Option<PathBuf>,
    /// ...from the source host of this name.
    #[arg(long, requires = "tls_dir")]
    expect_peer: Option<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: ApiArg,
    /// The destination VMM (host:port given to its `vmm receive --listen`).
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
    /// How memory moves. auto: pre-copy, switching to post-copy only if pre-copy stalls (the
    /// guest dirties memory about as fast as the link carries it). precopy: copy while the
    /// guest runs here, throttling it if it must. postcopy: one pass, then the guest runs on
    /// the destination at once and fetches what it still lacks; from then on a broken link
    /// stalls the guest until it comes back (see --postcopy-recovery), and losing this host
    /// loses the guest.
    #[arg(long, default_value = "auto", value_parser = ["auto", "precopy", "postcopy"])]
    mode: String,
    /// Post-copy: if the connection breaks, both hosts wait this many seconds for it to come
    /// back (this side reconnects and the destination asks again for what it still lacks;
    /// the guest waits meanwhile). Past that the guest is lost. 0: give up at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    postcopy_recovery: u64,
    /// Compress what is sent. auto: a page sent again goes as the words that changed since
    /// (when few did), and lz4 is used while it moves pages faster than sending them as they
    /// are, as measured during the move (so a fast link never gets slower). off: never. on:
    /// always, measured or not. Needs a destination of this version or later.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off", "on"])]
    compression: String,
    /// Memory for the copies of pages sent that deltas are made against, in MiB (0: a quarter
    /// of guest memory, at most 1024).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    delta_cache: u64,
    /// Connections for memory during pre-copy (like QEMU's multifd channels): 2 or more pay
    /// where one connection cannot fill the link, e.g. TLS or compression on a fast link,
    /// with cores to spare on both hosts. Each page always goes on the same connection; one
    /// that breaks fails the move and the guest runs on here.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    channels: u32,
    /// Move nothing: measure the link to the destination (which must be waiting, as for a
    /// move) and the guest's dirty rate, and predict the total time, pause, bytes and mode
    /// of a move with these settings.
    #[arg(long)]
    forecast: bool,
    /// Forecast first (as --forecast), then move, and set the forecast beside the outcome in
    /// the report.
    #[arg(long, conflicts_with = "forecast")]
    forecast_first: bool,
    /// With --forecast or --forecast-first: how long to watch the guest's memory, ms.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    sample_ms: u64,
    /// Name the move (default: a random id); the destination's outcome record uses it.
    #[arg(long)]
    id: Option<String>,
    /// If the move ends in doubt (Commit sent, no answer), wait this many seconds for the
    /// VMM to learn the outcome from the destination before giving up here (the VMM keeps
    /// the guest paused and keeps asking).
    #[arg(long, default_value_t = 30)]
    wait_in_doubt: u64,
    /// Encrypt the stream (mutual TLS) with this host's credentials (a `ferry host` tls
    /// directory)...
    #[arg(long, requires = "tls_peer")]
    tls_dir: Option<PathBuf>,
    /// ...to the destination host of this name.
    #[arg(long, requires = "tls_dir")]
    tls_peer: Option<String>,
    /// Print progress and the report as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ApiArg {
    /// The VM's control socket (as given to `vmm run --api`).
    #[arg(long)]
    api: PathBuf,
}

/// What a VM is: the options `ferry vmm run` and `ferry vm create` share.
#[derive(Args)]
pub struct VmOptions {
    /// The whole VM as a JSON file (a `VmConfig`, as `ferry vm show --json` prints under
    /// "config"); the options below override what it says.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel: ELF with a PVH note or Multiboot header, or a Linux bzImage.
    #[arg(long, required_unless_present = "config")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Initial ramdisk for a Linux kernel, or Multiboot modules: "PATH [ARGS]", the whole of
    /// which the kernel gets as the module's command line. Repeat it, or give a comma list
    /// (",," for a comma in a name), as QEMU's -initrd.
    /// Example: --initrd "/boot/mod1.bin speed=3" --initrd /boot/mod2.bin
    #[arg(long, value_name = "PATH [ARGS]")]
    pub initrd: Vec<String>,
    /// Guest RAM in MiB [default: 256].
    #[arg(long)]
    pub memory: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// A virtio disk on a raw image: PATH[,readonly][,serial=S][,queues=N]. Repeat for more
    /// disks. The image is locked: a second VMM cannot open it for writing. Requests go
    /// through io_uring where the kernel has it; queues=N request queues (default: one per
    /// vCPU) for a guest that supports multiqueue.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<DiskConfig>,
    /// A virtio network card: tap=NAME[,mac=MAC] (an existing tap) or bridge=BR[,mac=MAC]
    /// (ferry makes a tap on bridge BR and removes it at exit). Repeat for more cards.
    #[arg(long = "net", value_name = "tap=NAME|bridge=BR")]
    pub nets: Vec<NetConfig>,
    /// Hide these CPU features from the guest (comma list, names as in /proc/cpuinfo).
    #[arg(long, value_delimiter = ',')]
    pub cpu_hide: Vec<String>,
}

impl VmOptions {
    /// The config these options describe (a config file, then the options over it).
    pub fn config(&self) -> Result<VmConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a VM config", p.display()))?
            }
            None => VmConfig::new(self.kernel.clone().unwrap_or_default()),
        };
        if let Some(k) = &self.kernel {
            c.kernel = k.clone();
        }
        if let Some(v) = &self.cmdline {
            c.cmdline = v.clone();
        }
        if !self.initrd.is_empty() {
            c.initrd = self
                .initrd
                .iter()
                .flat_map(|s| ferry_api::BootModule::parse_list(s))
                .collect();
        }
        if let Some(v) = self.memory {
            c.memory_mib = v;
        }
        if let Some(v) = self.vcpus {
            c.vcpus = v;
        }
        if !self.disks.is_empty() {
            c.disks = self.disks.clone();
        }
        if !self.nets.is_empty() {
            c.nets = self.nets.clone();
        }
        if !self.cpu_hide.is_empty() {
            c.cpu_hide = self.cpu_hide.clone();
        }
        Ok(c)
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmOptions,
    /// COM1: stdio, null, file:PATH or unix:PATH (ferry listens there) [default: stdio].
    /// On a terminal, stdio is raw while the VM runs (every key, Ctrl-C too, goes to the
    /// guest); Ctrl-] detaches and gives the terminal back, the VM running on.
    #[arg(long)]
    serial: Option<SerialBackend>,
    /// COM2: stdio, null, file:PATH or unix:PATH [default: null].
    #[arg(long)]
    serial2: Option<SerialBackend>,
    /// Serve the control API (pause, resume, save, status, quit) on this unix socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Create the VM paused; `ferry vmm resume` starts it.
    #[arg(long)]
    paused: bool,
}

impl RunArgs {
    fn config(&self) -> Result<VmConfig> {
        let mut c = self.vm.config()?;
        if self.vm.config.is_none() {
            c.serial = SerialBackend::Stdio;
        }
        if let Some(v) = &self.serial {
            c.serial = v.clone();
        }
        if let Some(v) = &self.serial2 {
            c.serial2 = v.clone();
        }
        Ok(c)
    }
}

#[derive(Args)]
pub struct RestoreArgs {
    /// A directory written by `ferry vmm save`.
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
    /// Restore paused; `ferry vmm resume` starts it.
    #[arg(long)]
    paused: bool,
}

/// Run a VM that was just built (or report why it could not be) until it ends.
fn run_vm(vm: Result<Vm, ferry_vmm::VmError>) -> Result<()> {
    let chain = |e: ferry_vmm::VmError| anyhow::anyhow!(ferry_vmm::error_chain(&e));
    let exit = vm.and_then(|vm| vm.run());
    // The terminal, if the console had it, is the user's again before anything is printed.
    ferry_vmm::serial_backend::terminal::restore();
    let exit: VmExit = exit.map_err(chain)?;
    tracing::info!("VM ended: {exit:?}");
    // The host daemon reads why a VMM ended from its last log line.
    eprintln!("ferry: VM ended: {exit:?}");
    Ok(())
}

pub fn run(cmd: VmmCmd) -> Result<()> {
    match cmd {
        VmmCmd::Run(a) => {
            let config = a.config()?;
            let opts = RunOptions {
                api: a.api,
                paused: a.paused,
                ports: None,
            };
            run_vm(Vm::create(config, opts))
        }
        VmmCmd::Restore(a) => {
            let overrides = RestoreOverrides {
                serial: a.serial,
                serial2: a.serial2,
                disks: Vec::new(),
            };
            let opts = RunOptions {
                api: a.api,
                paused: a.paused,
                ports: None,
            };
            run_vm(Vm::restore(&a.dir, overrides, opts))
        }
        VmmCmd::Pause(a) => call(&a.api, Request::Pause),
        VmmCmd::Resume(a) => call(&a.api, Request::Resume),
        VmmCmd::Status(a) => call(&a.api, Request::Status),
        VmmCmd::Save { api, dir } => {
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            call(&api.api, Request::Save { dir })
        }
        VmmCmd::Quit(a) => call(&a.api, Request::Quit),
        VmmCmd::MigrateCancel(a) => call(&a.api, Request::MigrateCancel),
        VmmCmd::MigrateResolve { api, outcome } => {
            let outcome = if outcome == "committed" {
                Outcome::Committed
            } else {
                Outcome::Aborted
            };
            call(&api.api, Request::MigrateResolve { outcome })
        }
        VmmCmd::Receive(a) => {
            let overrides = RestoreOverrides {
                serial: a.serial,
                serial2: a.serial2,
                disks: a.disk_paths,
            };
            let listen = match (a.listen, a.listen_fd) {
                (_, Some(fd)) => Listen::Fd(fd),
                (Some(addr), None) => Listen::Addr(addr),
                (None, None) => bail!("give --listen ADDR or --listen-fd N"),
            };
            let tls = match (&a.tls_dir, &a.expect_peer) {
                (Some(d), Some(p)) => Some(
                    ferry_vmm::migration::transport::MigrationTls::load(d, p)
                        .with_context(|| format!("loading TLS credentials from {}", d.display()))?,
                ),
                _ => None,
            };
            let ropts = ReceiveOptions {
                accept_timeout: (a.timeout > 0).then(|| std::time::Duration::from_secs(a.timeout)),
                expect_id: a.expect_id,
                record: a.record,
                tls,
            };
            let opts = RunOptions {
                api: a.api,
                paused: false,
                ports: None,
            };
            run_vm(ferry_vmm::migration::receive::receive(
                &listen,
                &ropts,
                &overrides,
                opts,
                |m| eprintln!("ferry: {m}"),
            ))
        }
        VmmCmd::Migrate(a) => migrate(a),
    }
}

fn parse_disk_path(s: &str) -> Result<(usize, PathBuf), String> {
    let (i, p) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give INDEX=PATH, e.g. 0=/var/lib/ferry/web01.img"))?;
    let i = i
        .parse()
        .map_err(|_| format!("{i:?} is not a disk index (0, 1, ...)"))?;
    if p.is_empty() {
        return Err(format!("{s:?}: the path is empty"));
    }
    Ok((i, PathBuf::from(p)))
}

fn migrate(a: MigrateArgs) -> Result<()> {
    let settings = MigrateSettings {
        to: a.to.clone(),
        downtime_ms: a.downtime_ms,
        bandwidth_mbit: a.bandwidth_mbit,
        timeout_s: a.timeout,
        on_timeout: if a.on_timeout == "force" {
            OnTimeout::Force
        } else {
            OnTimeout::Cancel
        },
        migration_id: a.id.clone().unwrap_or_default(),
        tls: match (a.tls_dir.clone(), a.tls_peer.clone()) {
            (Some(dir), Some(peer)) => Some(ferry_api::MigrationTls { dir, peer }),
            _ => None,
        },
        mode: mode_of(&a.mode),
        postcopy_recovery_s: a.postcopy_recovery,
        compression: match a.compression.as_str() {
            "off" => Compression::Off,
            "on" => Compression::On,
            _ => Compression::Auto,
        },
        delta_cache_mib: a.delta_cache,
        channels: a.channels,
    };
    if a.forecast {
        let f = get_forecast(&a, &settings)?;
        if a.json {
            println!("{}", serde_json::to_string(&f)?);
        } else {
            print_forecast(&settings.to, &f);
        }
        return Ok(());
    }
    let predicted = match a.forecast_first {
        true => {
            let f = get_forecast(&a, &settings)?;
            if !a.json {
                print_forecast(&settings.to, &f);
            }
            Some(f)
        }
        false => None,
    };
    let mut last: Option<MigrationProgress> = None;
    let mut error = None;
    let mut doubt_since: Option<std::time::Instant> = None;
    let wait_in_doubt = std::time::Duration::from_secs(a.wait_in_doubt);
    api_server::call_stream(&a.api.api, &Request::Migrate { settings, follow: true }, |r| {
        match r {
            Response::Ok(ResponseBody::Migration(p)) => {
                let end = matches!(
                    p.phase,
                    MigrationPhase::Done | MigrationPhase::Failed | MigrationPhase::Cancelled
                );
                let in_doubt = p.phase == MigrationPhase::InDoubt;
                if in_doubt && doubt_since.is_none() {
                    doubt_since = Some(std::time::Instant::now());
                    if !a.json {
                        eprintln!("ferry: {}", p.error.as_deref().unwrap_or("in doubt"));
                    }
                }
                if a.json {
                    println!("{}", serde_json::to_string(&p).unwrap_or_default());
                } else if p.phase == MigrationPhase::Postcopy && p.postcopy_reconnecting {
                    eprintln!(
                        "{:>7.1}s Postcopy: the connection to the destination broke; reconnecting (the guest there waits for {} pages). {}",
                        p.elapsed_ms as f64 / 1000.0,
                        p.postcopy_pages_left,
                        p.error.as_deref().unwrap_or_default(),
                    );
                } else if p.phase == MigrationPhase::Postcopy {
                    eprintln!(
                        "{:>7.1}s Postcopy: the guest runs on the destination; {} pages still to go ({} fetched on demand), sent {:.1} MiB",
                        p.elapsed_ms as f64 / 1000.0,
                        p.postcopy_pages_left,
                        p.postcopy_pages_requested,
                        p.bytes_sent as f64 / (1 << 20) as f64,
                    );
                } else if !end && !in_doubt {
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
                // In doubt the VMM holds the guest until the outcome is known: follow it for a
                // while, then leave it to whoever can read the destination's record.
                !end && doubt_since.is_none_or(|t| t.elapsed() < wait_in_doubt)
            }
            Response::Ok(_) => true,
            Response::Error(e) => {
                error = Some(e);
                true
            }
        }
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
        if p.phase == MigrationPhase::Done {
            for l in mode_lines(&p) {
                println!("{l}");
            }
        }
        if let Some(f) = &predicted {
            println!(
                "forecast beforehand: {:.2} s {}, pause {:.1} ms, {:.1} MiB; it took {:.2} s ({:.2}x the forecast)",
                f.total_ms / 1000.0,
                mode_name(f.mode),
                f.pause_ms,
                f.bytes as f64 / f64::from(1 << 20),
                p.elapsed_ms as f64 / 1000.0,
                p.elapsed_ms as f64 / f.total_ms.max(1.0)
            );
        }
    }
    match p.phase {
        MigrationPhase::Done => {
            if let (Some(note), false) = (&p.error, a.json) {
                println!("note: {note}");
            }
            Ok(())
        }
        _ => bail!("{}", p.error.unwrap_or_else(|| format!("{:?}", p.phase))),
    }
}

/// What a finished migration's report says of how memory went: the mode and why, and
/// compression.
pub(crate) fn mode_lines(p: &MigrationProgress) -> Vec<String> {
    let how = match p.mode {
        MigrationMode::Postcopy => format!(
            "post-copy ({} pages fetched on demand{})",
            p.postcopy_pages_requested,
            match p.postcopy_recoveries {
                0 => String::new(),
                1 => ", recovered from 1 broken connection".into(),
                n => format!(", recovered from {n} broken connections"),
            }
        ),
        _ => "pre-copy".into(),
    };
    let how = match p.channels {
        n if n >= 2 => format!("{how}, memory on {n} connections"),
        _ => how,
    };
    let mut lines = vec![match &p.mode_reason {
        Some(why) => format!("mode: {how}: {why}"),
        None => format!("mode: {how}"),
    }];
    if let Some(note) = &p.compression_note {
        lines.push(format!("compression: {note}"));
    }
    lines
}

/// `--mode`'s value (one clap already checked).
pub(crate) fn mode_of(s: &str) -> MigrationMode {
    match s {
        "precopy" => MigrationMode::Precopy,
        "postcopy" => MigrationMode::Postcopy,
        _ => MigrationMode::Auto,
    }
}

pub(crate) fn mode_name(m: MigrationMode) -> &'static str {
    match m {
        MigrationMode::Postcopy => "post-copy",
        MigrationMode::Precopy => "pre-copy",
        MigrationMode::Auto => "auto",
    }
}

/// Ask the VMM for a forecast of a move under `settings` (it moves nothing).
fn get_forecast(a: &MigrateArgs, settings: &MigrateSettings) -> Result<MigrationForecast> {
    if !a.json {
        eprintln!(
            "ferry: measuring the link to {} and watching the guest's memory for {:.1} s; nothing moves",
            settings.to,
            a.sample_ms as f64 / 1000.0
        );
    }
    let req = Request::MigrateForecast {
        settings: settings.clone(),
        sample_ms: a.sample_ms,
    };
    let resp = api_server::call(&a.api.api, &req).with_context(|| {
        format!(
            "cannot reach the VMM at {} (is it running with --api?)",
            a.api.api.display()
        )
    })?;
    match resp {
        Response::Ok(ResponseBody::Forecast(f)) => Ok(f),
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

pub(crate) fn print_forecast(to: &str, f: &MigrationForecast) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("forecast for a move to {to}:");
    println!(
        "  measured: link {:.0} Mbit/s (round trip {:.2} ms); the guest dirties {} pages/s, {} pages ({:.1} MiB) over {:.1} s; first pass {:.1} MiB",
        f.link_mbit,
        f.rtt_ms,
        f.dirty_rate_pps,
        f.working_set_pages,
        mib(f.working_set_pages * 4096),
        f.sample_ms as f64 / 1000.0,
        mib(f.first_pass_bytes)
    );
    let mode = match f.mode {
        MigrationMode::Postcopy => format!(
            "post-copy ({} pages after the switch-over)",
            f.postcopy_pages
        ),
        _ => "pre-copy".into(),
    };
    println!("  mode: {mode}: {}", f.reason);
    if f.converges {
        println!(
            "  predicted: {:.2} s total, pause {:.1} ms, {:.1} MiB sent, {} rounds after the first pass",
            f.total_ms / 1000.0,
            f.pause_ms,
            mib(f.bytes),
            f.rounds
        );
    } else {
        println!(
            "  predicted: does not converge within the time limit; try --mode auto or postcopy, a faster link, or --on-timeout force (pause {:.0} ms)",
            f.pause_ms
        );
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
        Response::Ok(ResponseBody::Forecast(f)) => {
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Response::Ok(ResponseBody::Mirrors(m)) => {
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Response::Ok(ResponseBody::MirrorSwitched(m)) => {
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Response::Ok(ResponseBody::Done) => Ok(()),
        Response::Error(e) => bail!("{e}"),
    }
}
