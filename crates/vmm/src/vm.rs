//! A running VM and its control loop.
//!
//! [`Vm`] owns the KVM VM, guest memory, devices and vCPU threads. [`Vm::run`] is the control
//! loop: it serves API requests (pause, resume, save, status, quit) and ends the VM when the
//! guest powers off or resets, a vCPU fails, or the process is asked to stop (SIGINT/SIGTERM).
//! Everything that touches the whole VM happens on this one thread, so no two requests race.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::{
    ConfigError, MigrationProgress, Request, Response, ResponseBody, SerialBackend, VmConfig,
    VmRunState, VmStatus,
};
use ferry_devices::VmAction;
use ferry_migration::Persist;
use vmm_sys_util::signal::Killable;

use crate::acpi::{self, AcpiError};
use crate::api_server::{ApiError, ApiServer};
use crate::boot::{self, BootEntry, BootError};
use crate::bus::{MmioBus, PioBus};
use crate::cpu_features;
use crate::cpuid::{self, CpuidError};
use crate::devices::DevicesState;
use crate::devices::{self, Devices, DevicesArgs, DevicesError};
use crate::event::Event;
use crate::kvm_vm::{KvmVm, KvmVmError, KvmVmState};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::migration::{send, CallReply, MigrationCall};
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vcpu::VcpuState;
use crate::vcpu::{self, Vcpu, VcpuAck, VcpuCmd, VcpuError, VcpuEvent};

/// How long a vCPU may take to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors creating, running or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("{wanted_mib} MiB of guest memory requested, but this host has only {available_mib} MiB available")]
    HostMemory { wanted_mib: u64, available_mib: u64 },
    #[error(transparent)]
    Kvm(#[from] KvmVmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("creating vCPU {id} failed")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("cannot wire the device bus")]
    Bus(#[from] crate::bus::Overlap),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("vCPU {id} did not pause within {PAUSE_TIMEOUT:?}")]
    PauseTimeout { id: u8 },
    #[error("vCPU {id} thread is gone")]
    VcpuGone { id: u8 },
    #[error("vCPU {id} stopped: {msg}")]
    VcpuFailed { id: u8, msg: String },
    #[error("{0}")]
    Busy(&'static str),
    #[error("{0}")]
    Mirror(String),
    #[error(transparent)]
    Receive(#[from] crate::migration::receive::ReceiveError),
}

/// Why a VM ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (ferry ends the VM rather than rebooting it, like Firecracker).
    Reset,
    /// An API client asked the VMM to quit.
    Quit,
    /// The process got SIGINT or SIGTERM.
    Signal,
    /// The VM moved to another host.
    MigratedAway,
}

/// A migration this VMM is sending (or sent).
struct Migration {
    thread: JoinHandle<()>,
    progress: Arc<Mutex<MigrationProgress>>,
    cancel: Arc<AtomicBool>,
    /// An in-doubt migration's outcome, once someone who read the record says it.
    resolve: Arc<Mutex<Option<ferry_api::Outcome>>>,
    /// A forecast: set once it has let go of the dirty log and answered (its thread may
    /// still be ending), so a move asked for right after it is not refused.
    answered: Option<Arc<AtomicBool>>,
}

/// Host-side options that are not part of the VM's config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Serve the control API on this unix socket.
    pub api: Option<PathBuf>,
    /// Create the VM with its vCPUs paused.
    pub paused: bool,
    /// Serial sockets opened before the VM exists (a migration's destination).
    pub ports: Option<Arc<crate::serial_backend::Ports>>,
}

/// Host-side overrides when restoring a snapshot or receiving a VM (host ends of the serial
/// ports; where a disk is on this host, for a disk that a shared-nothing move brought here).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    pub serial: Option<SerialBackend>,
    pub serial2: Option<SerialBackend>,
    /// Disk index -> its path (or URI) here.
    pub disks: Vec<(usize, PathBuf)>,
}

impl RestoreOverrides {
    /// The saved config with this host's choices, checked against this host.
    pub fn apply(&self, mut config: VmConfig) -> Result<VmConfig, VmError> {
        if let Some(s) = &self.serial {
            config.serial = s.clone();
        }
        if let Some(s) = &self.serial2 {
            config.serial2 = s.clone();
        }
        for (i, p) in &self.disks {
            let n = config.disks.len();
            let d = config.disks.get_mut(*i).ok_or_else(|| {
                VmError::Mirror(format!(
                    "a disk path is given for disk {i}, but the VM has {n} disks"
                ))
            })?;
            d.path = p.clone();
        }
        config.validate()?;
        check_host_memory(&config)?;
        Ok(config)
    }
}

struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<()>>,
    cmds: Sender<VcpuCmd>,
    acks: Receiver<VcpuAck>,
}

impl VcpuHandle {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    fn wait_ack(&self, want: VcpuAck) -> Result<(), VmError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            match self.acks.recv_timeout(Duration::from_millis(1)) {
                Ok(a) if a == want => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(VmError::PauseTimeout { id: self.id });
                    }
                    if want == VcpuAck::Paused {
                        // The first kick may land before the thread enters KVM_RUN; keep kicking.
                        self.kick();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VmError::VcpuGone { id: self.id })
                }
            }
        }
    }
}

/// A VM.
pub struct Vm {
    config: VmConfig,
    kvm_vm: Arc<KvmVm>,
    memory: GuestMemory,
    devices: Devices,
    vcpus: Vec<VcpuHandle>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    state: VmRunState,
    started: Instant,
    boot: Option<BootEntry>,
    api: Option<ApiServer>,
    migration: Option<Migration>,
    /// Percent of each vCPU's time taken away while a migration struggles to converge.
    throttle: Arc<AtomicU32>,
    /// The CPU features the vCPUs were given.
    cpu_features: Vec<String>,
    /// A migration's destination keeps answering queries about the move for as long as the VM
    /// runs (see `migration::receive`).
    _query_server: Option<JoinHandle<()>>,
    /// False while a post-copy still brings in pages: the VM may not be saved or moved on.
    memory_complete: Arc<AtomicBool>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM asked this process to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal);
    }
}

/// Give every network card without a MAC a random locally administered one (52:54:00 like
/// QEMU's, then three random bytes). It is part of the config from now on, so it stays the
/// same across snapshots and moves.
fn assign_macs(config: &mut VmConfig) {
    let mut seed = std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default();
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    for (i, net) in config.nets.iter_mut().enumerate() {
        if net.mac.is_none() {
            let h = crc32fast::hash(&[&seed[..], &(i as u32).to_le_bytes()].concat()).to_le_bytes();
            net.mac = Some(ferry_api::format_mac(&[0x52, 0x54, 0x00, h[0], h[1], h[2]]));
        }
    }
}

/// Memory the host can still give, from /proc/meminfo.
fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn check_host_memory(config: &VmConfig) -> Result<(), VmError> {
    let wanted = config.memory_mib << 20;
    if let Some(avail) = host_available_bytes() {
        if wanted > avail {
            return Err(VmError::HostMemory {
                wanted_mib: config.memory_mib,
                available_mib: avail >> 20,
            });
        }
    }
    Ok(())
}

/// The CPU features this host's KVM offers a VM (before any `cpu_hide`): what a VM started
/// here sees, and what a VM arriving here may need.
pub fn host_cpu_features() -> Result<Vec<String>, VmError> {
    let kvm_vm = KvmVm::create()?;
    let mut base = cpuid::supported(&kvm_vm.kvm)?;
    let probe = kvm_vm
        .fd
        .create_vcpu(0)
        .map_err(|source| VmError::CreateVcpu { id: 0, source })?;
    let msrs = cpuid::saveable_msrs(&kvm_vm.kvm, &probe)?;
    cpuid::hide_unusable(&mut base, &msrs);
    Ok(cpu_features::names(&base))
}

impl Vm {
    /// Create a VM from `config`, load its kernel and start its vCPUs.
    pub fn create(config: VmConfig, opts: RunOptions) -> Result<Vm, VmError> {
        config.validate()?;
        if let Some(bad) = config.cpu_hide.iter().find(|f| !cpu_features::known(f)) {
            return Err(ConfigError::CpuFeature(bad.clone()).into());
        }
        check_host_memory(&config)?;
        // Fail on an unreadable kernel before touching KVM.
        std::fs::metadata(&config.kernel).map_err(|source| BootError::OpenKernel {
            path: config.kernel.clone(),
            source,
        })?;
        let mut config = config;
        assign_macs(&mut config);
        let kvm_vm = KvmVm::create()?;
        let memory = memory::create_guest_memory(config.memory_mib << 20)?;
        memory::register_slots(&kvm_vm.fd, &memory, false)?;
        let devices = Devices::new(DevicesArgs {
            vm: &kvm_vm.fd,
            config: &config,
            mem: &memory,
            lock_disks: true,
            ports: opts.ports.as_deref(),
        })?;
        let tokens = devices::virtio_cmdline(devices.virtio.len());
        let entry = boot::load_kernel(
            &memory,
            &config.kernel,
            &config.cmdline,
            &tokens,
            &config.initrd,
        )?;
        acpi::write(&memory, config.vcpus, &devices.mmio_info())?;
        tracing::info!(
            "booting {} by {}",
            config.kernel.display(),
            entry.protocol()
        );

        let mut base = cpuid::supported(&kvm_vm.kvm)?;
        let probe_fd = kvm_vm
            .fd
            .create_vcpu(0)
            .map_err(|source| VmError::CreateVcpu { id: 0, source })?;
        probe_fd
            .set_cpuid2(&cpuid::for_vcpu(&base, 0, config.vcpus)?)
            .map_err(|source| VcpuError::Kvm {
                id: 0,
                what: "KVM_SET_CPUID2",
                source,
            })?;
        let msr_list = Arc::new(cpuid::saveable_msrs(&kvm_vm.kvm, &probe_fd)?);
        cpuid::hide_unusable(&mut base, &msr_list);
        cpu_features::hide(&mut base, &config.cpu_hide);
        if let Ok(khz) = probe_fd.get_tsc_khz() {
            cpuid::add_timing_leaf(&mut base, khz);
        }
        let mut fds = vec![probe_fd];
        for id in 1..config.vcpus {
            fds.push(
                kvm_vm
                    .fd
                    .create_vcpu(u64::from(id))
                    .map_err(|source| VmError::CreateVcpu { id, source })?,
            );
        }
        let features = cpu_features::names(&base);
        let mut vcpus = Vec::with_capacity(fds.len());
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            let v = Vcpu::new(
                id,
                fd,
                &cpuid::for_vcpu(&base, id, config.vcpus)?,
                msr_list.clone(),
            )?;
            v.configure(entry)?;
            vcpus.push(v);
        }
        let mut vm = Vm::assemble(config, kvm_vm, memory, devices, vcpus, Some(entry), opts)?;
        vm.cpu_features = features;
        Ok(vm)
    }

    /// Restore a VM from a snapshot directory written by `save`.
    pub fn restore(
        dir: &Path,
        overrides: RestoreOverrides,
        opts: RunOptions,
    ) -> Result<Vm, VmError> {
        let (snap, mut mem_file) = snapshot::read(dir)?;
        let config = overrides.apply(snap.config.clone())?;
        let memory = memory::create_guest_memory(config.memory_mib << 20)?;
        memory::load_from_file(&memory, &mut mem_file)?;
        Vm::restore_state(config, memory, snap, true, opts)
    }

    /// Build a VM from saved state and memory already filled in (a snapshot, or a migration's
    /// pages). `lock_disks` false leaves the disk images unlocked for a migration's
    /// destination, which takes the locks only at commit.
    pub(crate) fn restore_state(
        config: VmConfig,
        memory: GuestMemory,
        state: Snapshot,
        lock_disks: bool,
        opts: RunOptions,
    ) -> Result<Vm, VmError> {
        let Snapshot {
            vm: vm_state,
            vcpus: vcpu_states,
            devices: dev_state,
            ..
        } = state;
        if vcpu_states.len() != usize::from(config.vcpus) {
            return Err(VmError::Snapshot(SnapshotError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                vcpu_states.len(),
                config.vcpus
            ))));
        }
        let kvm_vm = Vm::prepare(&memory)?;
        Vm::restore_into(
            kvm_vm,
            config,
            memory,
            (vm_state, vcpu_states, dev_state),
            lock_disks,
            opts,
        )
    }

    /// A KVM VM with its irqchip, PIT and `memory` registered, ready for a saved state: a
    /// migration's destination makes it while pages still arrive, to keep it out of the pause.
    pub(crate) fn prepare(memory: &GuestMemory) -> Result<KvmVm, VmError> {
        let kvm_vm = KvmVm::create()?;
        memory::register_slots(&kvm_vm.fd, memory, false)?;
        Ok(kvm_vm)
    }

    /// Apply a saved state to a prepared VM and start it.
    pub(crate) fn restore_into(
        kvm_vm: KvmVm,
        config: VmConfig,
        memory: GuestMemory,
        (vm_state, vcpu_states, dev_state): (KvmVmState, Vec<VcpuState>, DevicesState),
        lock_disks: bool,
        opts: RunOptions,
    ) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let kvm_vm = KvmVm::restore(kvm_vm, &vm_state)?;
        tracing::debug!("restore: VM, memory, irqchip at {:?}", t0.elapsed());
        let args = DevicesArgs {
            vm: &kvm_vm.fd,
            config: &config,
            mem: &memory,
            lock_disks,
            ports: opts.ports.as_deref(),
        };
        let devices = Devices::restore(args, &dev_state)?;
        tracing::debug!("restore: devices at {:?}", t0.elapsed());
        let msr_list: Arc<Vec<u32>> = Arc::new(
            vcpu_states
                .first()
                .map(|s| s.msrs.iter().map(|m| m.index).collect())
                .unwrap_or_default(),
        );
        let features = vcpu_states
            .first()
            .map(|s| cpu_features::names(&s.cpuid))
            .unwrap_or_default();
        let mut vcpus = Vec::with_capacity(vcpu_states.len());
        for s in &vcpu_states {
            let fd = kvm_vm
                .fd
                .create_vcpu(u64::from(s.id))
                .map_err(|source| VmError::CreateVcpu { id: s.id, source })?;
            vcpus.push(Vcpu::restore((s.id, fd, msr_list.clone()), s)?);
        }
        tracing::debug!("restore: vCPUs at {:?}", t0.elapsed());
        let mut vm = Vm::assemble(config, kvm_vm, memory, devices, vcpus, None, opts)?;
        vm.cpu_features = features;
        Ok(vm)
    }

    fn assemble(
        config: VmConfig,
        kvm_vm: KvmVm,
        memory: GuestMemory,
        devices: Devices,
        vcpus: Vec<Vcpu>,
        boot: Option<BootEntry>,
        opts: RunOptions,
    ) -> Result<Vm, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Thread)?;
        install_stop_handlers();
        let mut bus = PioBus::default();
        devices.attach(&mut bus)?;
        let bus = Arc::new(bus);
        let mut mmio = MmioBus::default();
        devices.attach_mmio(&mut mmio)?;
        let mmio = Arc::new(mmio);
        // Look at every virtio queue once: a restored device may have work that was notified
        // before the save.
        devices.set_paused(false);
        let (events_tx, events) = mpsc::channel();
        let api = opts
            .api
            .as_deref()
            .map(|p| ApiServer::start(p, events_tx.clone()))
            .transpose()?;
        let throttle = Arc::new(AtomicU32::new(0));
        let mut handles = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            let id = v.id;
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let (ack_tx, ack_rx) = mpsc::channel();
            let (bus, mmio, ev) = (bus.clone(), mmio.clone(), events_tx.clone());
            let thr = throttle.clone();
            let paused = opts.paused;
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let links = vcpu::VcpuLinks {
                        bus,
                        mmio,
                        throttle: thr,
                        cmds: cmd_rx,
                        acks: ack_tx,
                        events: ev,
                    };
                    vcpu::run_thread(v, links, paused)
                })
                .map_err(VmError::Thread)?;
            handles.push(VcpuHandle {
                id,
                thread: Some(thread),
                cmds: cmd_tx,
                acks: ack_rx,
            });
        }
        Ok(Vm {
            config,
            kvm_vm: Arc::new(kvm_vm),
            memory,
            devices,
            vcpus: handles,
            events_tx,
            events,
            state: if opts.paused {
                VmRunState::Paused
            } else {
                VmRunState::Running
            },
            started: Instant::now(),
            boot,
            api,
            migration: None,
            throttle,
            cpu_features: Vec::new(),
            _query_server: None,
            memory_complete: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The flag a post-copy clears while pages are still arriving.
    pub(crate) fn memory_complete_flag(&self) -> Arc<AtomicBool> {
        self.memory_complete.clone()
    }

    /// A way for another thread to stop this VM with an error (post-copy lost its source).
    pub(crate) fn failure_sender(&self) -> impl Fn(String) + Send + 'static {
        let tx = self.events_tx.clone();
        move |msg| {
            let _ = tx.send(Event::Fatal(msg));
        }
    }

    /// Keep answering a finished migration's queries while this VM runs.
    pub(crate) fn keep_query_server(&mut self, t: JoinHandle<()>) {
        self._query_server = Some(t);
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// How the VM booted (None when restored).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.boot
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM fd (dirty logging, tests).
    pub fn vm_fd(&self) -> &kvm_ioctls::VmFd {
        &self.kvm_vm.fd
    }

    /// A sender for injecting events (API requests) into the control loop.
    pub fn event_sender(&self) -> Sender<Event> {
        self.events_tx.clone()
    }

    /// Stop every vCPU (they leave KVM_RUN and wait). All or nothing: if one vCPU does not
    /// stop, the ones that did run again and the VM stays Running.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state == VmRunState::Paused {
            return Ok(());
        }
        let last = self.vcpus.len().saturating_sub(1);
        let mut sent = 0;
        for (i, v) in self.vcpus.iter().enumerate() {
            if i > 0 && i == last && crate::fail::fail_point(&format!("pause-vcpu-{i}")) {
                break;
            }
            let _ = v.cmds.send(VcpuCmd::Pause);
            v.kick();
            sent += 1;
        }
        let mut paused = 0;
        let mut failure = None;
        for v in &self.vcpus[..sent] {
            match v.wait_ack(VcpuAck::Paused) {
                Ok(()) => paused += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() && sent < self.vcpus.len() {
            failure = Some(VmError::PauseTimeout {
                id: self.vcpus[sent].id,
            });
        }
        if let Some(e) = failure {
            // Put back the ones that stopped (a vCPU that acked late gets its Resume too).
            for v in &self.vcpus[..sent] {
                let _ = v.cmds.send(VcpuCmd::Resume);
            }
            for v in &self.vcpus[..paused] {
                let _ = v.wait_ack(VcpuAck::Resumed);
            }
            return Err(e);
        }
        self.devices.set_paused(true);
        self.state = VmRunState::Paused;
        Ok(())
    }

    /// Let every vCPU run again.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state == VmRunState::Running {
            return Ok(());
        }
        self.devices.set_paused(false);
        for v in &self.vcpus {
            let _ = v.cmds.send(VcpuCmd::Resume);
        }
        for v in &self.vcpus {
            v.wait_ack(VcpuAck::Resumed)?;
        }
        self.state = VmRunState::Running;
        Ok(())
    }

    /// The state of every vCPU, the in-kernel devices and the emulated devices. The VM must
    /// be paused.
    pub fn save_state(&self) -> Result<Snapshot, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let (tx, rx) = mpsc::channel();
            v.cmds
                .send(VcpuCmd::Save(tx))
                .map_err(|_| VmError::VcpuGone { id: v.id })?;
            vcpus.push(rx.recv().map_err(|_| VmError::VcpuGone { id: v.id })??);
        }
        Ok(Snapshot {
            config: self.config.clone(),
            memory_bytes: memory::total_bytes(&self.memory),
            memory_crc32: 0,
            vm: self.kvm_vm.save()?,
            vcpus,
            devices: self.devices.save()?,
        })
    }

    /// Pause (if needed) and write a snapshot to `dir`; the VM stays paused.
    pub fn save_snapshot(&mut self, dir: &Path) -> Result<u64, VmError> {
        self.pause()?;
        let snap = self.save_state()?;
        Ok(snapshot::write(dir, &self.memory, snap)?)
    }

    /// The VM's status.
    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: self.state,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            cpu_features: self.cpu_features.clone(),
            disks: self.config.disks.iter().map(|d| d.path.clone()).collect(),
        }
    }

    fn migrating(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| {
            !m.thread.is_finished()
                && !m
                    .answered
                    .as_ref()
                    .is_some_and(|a| a.load(Ordering::SeqCst))
        })
    }

    /// Serve one API request; returns whether the VMM should quit.
    fn handle(&mut self, req: Request, reply: Sender<Response>) -> bool {
        let busy = || {
            Err(VmError::Busy(
                "a migration is in progress; cancel it or wait for it to end",
            ))
        };
        let incomplete = !self.memory_complete.load(Ordering::SeqCst);
        let r = match req {
            Request::Status => Ok(ResponseBody::Status(self.status())),
            Request::Save { .. } | Request::Migrate { .. } | Request::MigrateForecast { .. }
                if incomplete =>
            {
                Err(VmError::Busy(
                    "the VM arrived by post-copy and part of its memory is still on its way here; \
                 try again once the move is complete",
                ))
            }
            Request::Pause | Request::Resume | Request::Save { .. } if self.migrating() => busy(),
            Request::Pause => self.pause().map(|_| ResponseBody::Status(self.status())),
            Request::Resume => self.resume().map(|_| ResponseBody::Status(self.status())),
            Request::Save { dir } => {
                let t = Instant::now();
                self.save_snapshot(&dir).map(|written| ResponseBody::Saved {
                    dir,
                    memory_bytes: written,
                    ms: t.elapsed().as_millis() as u64,
                })
            }
            Request::Quit => {
                if let Some(m) = &self.migration {
                    m.cancel.store(true, Ordering::SeqCst);
                }
                let _ = reply.send(Response::Ok(ResponseBody::Done));
                return true;
            }
            Request::Migrate { .. } if self.migrating() => busy(),
            Request::Migrate { .. }
                if self
                    .devices
                    .mirrors()
                    .iter()
                    .any(|m| m.state != ferry_api::MirrorState::Ready) =>
            {
                Err(VmError::Busy(
                    "a disk is being copied (a storage move): the VM may migrate once every copy \
                     is complete, and then keeps them in step until the switch-over; let the \
                     copy finish or cancel it first",
                ))
            }
            Request::Migrate { .. } if self.state != VmRunState::Running => Err(VmError::Busy(
                "only a running VM can be migrated; resume it first",
            )),
            Request::Migrate { settings, follow } => {
                let progress = Arc::new(Mutex::new(MigrationProgress::default()));
                let cancel = Arc::new(AtomicBool::new(false));
                let resolve = Arc::new(Mutex::new(None));
                let ctx = send::SendCtx {
                    resolve: resolve.clone(),
                    settings,
                    config: self.config.clone(),
                    memory: self.memory.clone(),
                    vm: self.kvm_vm.clone(),
                    events: self.events_tx.clone(),
                    progress: progress.clone(),
                    cancel: cancel.clone(),
                    follow: follow.then(|| reply.clone()),
                };
                match std::thread::Builder::new()
                    .name("migrate-send".into())
                    .spawn(move || send::run(ctx))
                {
                    Ok(thread) => {
                        self.migration = Some(Migration {
                            thread,
                            progress: progress.clone(),
                            cancel,
                            resolve,
                            answered: None,
                        });
                        if follow {
                            return false; // the migration thread answers, line by line
                        }
                        Ok(ResponseBody::Migration(
                            progress.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                        ))
                    }
                    Err(e) => Err(VmError::Thread(e)),
                }
            }
            Request::MigrateForecast { .. } if self.migrating() => busy(),
            Request::MigrateForecast {
                settings,
                sample_ms,
            } => {
                let cancel = Arc::new(AtomicBool::new(false));
                let (mem, vm) = (self.memory.clone(), self.kvm_vm.clone());
                let stop = cancel.clone();
                let reply = reply.clone();
                let sample = Duration::from_millis(sample_ms.clamp(250, 60_000));
                let answered = Arc::new(AtomicBool::new(false));
                let progress = self.migration.as_ref().map_or_else(
                    || Arc::new(Mutex::new(MigrationProgress::default())),
                    |m| m.progress.clone(),
                );
                let done = answered.clone();
                // It holds the dirty log meanwhile: counted as a migration, so none starts.
                match std::thread::Builder::new()
                    .name("migrate-forecast".into())
                    .spawn(move || {
                        let r = crate::migration::forecast::forecast(
                            &settings, &mem, &vm, sample, &stop,
                        );
                        done.store(true, Ordering::SeqCst);
                        let _ = reply.send(match r {
                            Ok(f) => Response::Ok(ResponseBody::Forecast(f)),
                            Err(e) => Response::Error(error_chain(&e)),
                        });
                    }) {
                    Ok(thread) => {
                        self.migration = Some(Migration {
                            thread,
                            // `MigrationStatus` goes on reporting the last real move.
                            progress,
                            cancel,
                            resolve: Arc::new(Mutex::new(None)),
                            answered: Some(answered),
                        });
                        return false; // the forecast thread answers
                    }
                    Err(e) => Err(VmError::Thread(e)),
                }
            }
            Request::MirrorStart { .. } if self.migrating() => busy(),
            Request::MirrorStart {
                disk,
                target,
                bandwidth_mbit,
            } => self
                .devices
                .start_mirror(disk, &target, bandwidth_mbit)
                .map(|_| ResponseBody::Mirrors(self.devices.mirrors()))
                .map_err(VmError::Mirror),
            Request::MirrorStatus => Ok(ResponseBody::Mirrors(self.devices.mirrors())),
            // A migration counts on every copy it was started with staying in step.
            Request::MirrorCancel { .. } | Request::MirrorComplete { .. } if self.migrating() => {
                busy()
            }
            Request::MirrorCancel { disk } => self
                .devices
                .cancel_mirror(disk)
                .map(|_| ResponseBody::Done)
                .map_err(VmError::Mirror),
            Request::MirrorComplete { disk } => match self.devices.complete_mirror(
                disk,
                std::time::Duration::from_secs(
                    self.config
                        .disks
                        .get(disk)
                        .and_then(|d| d.stall_limit_s)
                        .unwrap_or(ferry_api::DEFAULT_STALL_LIMIT_S),
                ),
            ) {
                Ok(sw) => {
                    if let Some(d) = self.config.disks.get_mut(disk) {
                        d.path = sw.new.clone();
                    }
                    Ok(ResponseBody::MirrorSwitched(sw))
                }
                Err(e) => Err(VmError::Mirror(e)),
            },
            Request::MigrationStatus => match &self.migration {
                Some(m) => Ok(ResponseBody::Migration(
                    m.progress.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                )),
                None => Err(VmError::Busy("no migration has run on this VMM")),
            },
            Request::MigrateCancel => match &self.migration {
                Some(m) if !m.thread.is_finished() => {
                    let phase = m.progress.lock().unwrap_or_else(|e| e.into_inner()).phase;
                    if phase == ferry_api::MigrationPhase::Postcopy {
                        Err(VmError::Busy(
                            "the migration is in post-copy: the guest runs on the destination \
                             and needs the pages still here; it can no longer be cancelled",
                        ))
                    } else if phase == ferry_api::MigrationPhase::InDoubt {
                        Err(VmError::Busy(
                            "the migration is in doubt (Commit was sent): it can no longer be \
                             cancelled; read the destination's outcome and resolve it",
                        ))
                    } else {
                        m.cancel.store(true, Ordering::SeqCst);
                        Ok(ResponseBody::Done)
                    }
                }
                _ => Err(VmError::Busy("no migration is in progress")),
            },
            Request::MigrateResolve { outcome } => match &self.migration {
                Some(m)
                    if !m.thread.is_finished()
                        && m.progress.lock().unwrap_or_else(|e| e.into_inner()).phase
                            == ferry_api::MigrationPhase::InDoubt =>
                {
                    *m.resolve.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                    Ok(ResponseBody::Done)
                }
                _ => Err(VmError::Busy("no migration is in doubt")),
            },
        };
        let _ = reply.send(match r {
            Ok(body) => Response::Ok(body),
            Err(e) => Response::Error(error_chain(&e)),
        });
        false
    }

    /// Carry out what the migration thread asks; `Some(exit)` ends the VM.
    fn migration_call(
        &mut self,
        call: MigrationCall,
    ) -> (Result<CallReply, String>, Option<VmExit>) {
        let s = |e: VmError| error_chain(&e);
        let r = match call {
            MigrationCall::Throttle(pct) => {
                self.throttle.store(pct, Ordering::Relaxed);
                Ok(CallReply::Done)
            }
            MigrationCall::SyncDisks => {
                self.devices.sync_disks();
                Ok(CallReply::Done)
            }
            MigrationCall::Pause => {
                self.throttle.store(0, Ordering::Relaxed);
                self.pause().map(|_| CallReply::Done).map_err(s)
            }
            MigrationCall::SaveState => self
                .save_state()
                .map(|st| CallReply::State(Box::new(st)))
                .map_err(s),
            MigrationCall::ReleaseDisks => self
                .devices
                .flush_mirrors()
                .map_err(VmError::Mirror)
                .and_then(|_| self.devices.release_disks().map_err(VmError::from))
                .map(|_| CallReply::Done)
                .map_err(s),
            MigrationCall::Rollback => {
                self.throttle.store(0, Ordering::Relaxed);
                // Every disk this VMM let go of comes back before the guest may run again.
                match self.devices.lock_disks() {
                    Ok(()) => self.resume().map(|_| CallReply::Done).map_err(s),
                    Err(e) => Err(s(e.into())),
                }
            }
            MigrationCall::Finished => return (Ok(CallReply::Done), Some(VmExit::MigratedAway)),
        };
        (r, None)
    }

    /// Take the disk images' locks (a migration's destination, at commit).
    pub fn take_disks(&self) -> Result<(), VmError> {
        Ok(self.devices.lock_disks()?)
    }

    /// Let go of the disk images' locks (a destination that will not run the guest after all).
    pub fn release_disks(&self) {
        if let Err(e) = self.devices.release_disks() {
            tracing::warn!("releasing the disks: {}", error_chain(&e));
        }
    }

    /// Announce every network card's MAC (after a move).
    pub fn announce_macs(&self) {
        self.devices.announce_macs();
    }

    /// Run the control loop until the VM ends.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        let result = loop {
            let throttling = self.throttle.load(Ordering::Relaxed) > 0;
            let tick = if throttling {
                vcpu::THROTTLE_PERIOD
            } else {
                Duration::from_millis(100)
            };
            match self.events.recv_timeout(tick) {
                Ok(Event::Vcpu(VcpuEvent::Action(id, action))) => {
                    tracing::info!("vCPU {id}: guest {action:?}");
                    break Ok(match action {
                        VmAction::PowerOff => VmExit::PowerOff,
                        VmAction::Reset => VmExit::Reset,
                    });
                }
                Ok(Event::Vcpu(VcpuEvent::Failed(id, msg))) => {
                    break Err(VmError::VcpuFailed { id, msg })
                }
                Ok(Event::Fatal(msg)) => {
                    // vCPUs and device threads may be waiting on guest pages that will never
                    // arrive, so they cannot be stopped one by one: end the process (the
                    // userfaultfd still holds them; nothing runs on with missing memory).
                    crate::serial_backend::terminal::restore();
                    tracing::error!("{msg}");
                    eprintln!("ferry: error: {msg}");
                    std::process::exit(1);
                }
                Ok(Event::Api(req, reply)) => {
                    if self.handle(req, reply) {
                        break Ok(VmExit::Quit);
                    }
                }
                Ok(Event::Migration(call, reply)) => {
                    let (r, exit) = self.migration_call(call);
                    let _ = reply.send(r);
                    if let Some(exit) = exit {
                        break Ok(exit);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if STOP.load(Ordering::SeqCst) {
                        break Ok(VmExit::Signal);
                    }
                    if throttling {
                        // A guest that never exits (no I/O) must still give up its share.
                        for v in &self.vcpus {
                            v.kick();
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break Ok(VmExit::Quit),
            }
        };
        self.shutdown();
        result
    }

    fn shutdown(&mut self) {
        self.api = None;
        for v in &self.vcpus {
            let _ = v.cmds.send(VcpuCmd::Exit);
            v.kick();
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                // A vCPU stuck in KVM_RUN is kicked until it sees Exit.
                while !t.is_finished() {
                    let _ = t.kill(vcpu::kick_signal());
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = t.join();
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
