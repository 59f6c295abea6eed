//! The VM's device set: two UARTs, the i8042 reset line, the ACPI PM1a control port, and the
//! virtio-mmio disks and network cards; placed on the buses, wired to interrupts, saved and
//! restored together.
//!
//! Virtio slot `i` (disks first, then network cards) has its registers at
//! `VIRTIO_MMIO_BASE + i * 4 KiB` and IOAPIC pin `VIRTIO_IRQS[i]`; the guest learns of it from
//! a `virtio_mmio.device=4K@BASE:IRQ` token added to its command line. QueueNotify writes go
//! to KVM ioeventfds, so a notification wakes the device's worker without leaving the kernel.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::{parse_mac, NetBackend, SerialBackend, VmConfig};
use ferry_devices::legacy::{I8042State, PmState, PowerManagement, I8042, PM_BASE};
use ferry_devices::serial::{IrqTrigger, SerialDevice, SerialDeviceState, SERIAL_PORT_LEN};
use ferry_devices::virtio::block::{Block, BlockState, DiskBackend};
use ferry_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use ferry_devices::virtio::net::{Net, NetState, Tap};
use ferry_devices::virtio::persist::{MmioArgs, MmioState};
use ferry_devices::virtio::worker::{self, Worker};
use ferry_devices::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};
use ferry_migration::Persist;
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{MmioBus, PioBus};
use crate::host_io::{self, HostIoError};
use crate::serial_backend::{self, BackendError, OpenedBackend};

/// First virtio-mmio register window (inside the 32-bit MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// IOAPIC pins for virtio slots (ISA-style edge interrupts, avoiding the PIT, UARTs, RTC).
pub const VIRTIO_IRQS: [u32; 16] = [5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22];

/// COM1 base port and IRQ.
pub const COM1: (u16, u32) = (0x3f8, 4);
/// COM2 base port and IRQ.
pub const COM2: (u16, u32) = (0x2f8, 3);

/// Errors building or restoring the device set.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("serial backend")]
    Backend(#[from] BackendError),
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot wire IRQ {irq}")]
    Irqfd {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("device bus")]
    Bus(#[from] crate::bus::Overlap),
    #[error("serial device state")]
    Serial(#[from] ferry_devices::serial::persist::SerialPersistError),
    #[error("cannot start serial input thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    HostIo(#[from] HostIoError),
    #[error("cannot set up virtio device {index}")]
    Virtio {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wire virtio device {index}'s notifications")]
    Ioevent {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("virtio device {index} state")]
    VirtioState {
        index: usize,
        #[source]
        source: ferry_devices::virtio::persist::MmioPersistError,
    },
    #[error("the saved VM has {saved} virtio devices, its config {config}")]
    VirtioCount { saved: usize, config: usize },
    #[error("virtio device {0} in the saved VM is of another kind than in its config")]
    VirtioKind(usize),
}

/// Saved state of one virtio slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioSlotState {
    Block(MmioState<BlockState>),
    Net(MmioState<NetState>),
}

enum VirtioKind {
    Block(Arc<Mutex<MmioTransport<Block>>>),
    Net(Arc<Mutex<MmioTransport<Net>>>),
}

/// One virtio device: its transport, where it sits, and its worker thread.
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    kind: VirtioKind,
    _worker: Worker,
}

impl VirtioSlot {
    fn with<R>(&self, f: impl FnOnce(&mut dyn PauseSave) -> R) -> R {
        match &self.kind {
            VirtioKind::Block(t) => f(&mut *t.lock().unwrap_or_else(|e| e.into_inner())),
            VirtioKind::Net(t) => f(&mut *t.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// What the VM does to a virtio transport, whatever the device.
trait PauseSave {
    fn pause(&mut self, paused: bool);
    fn save_slot(
        &self,
    ) -> Result<VirtioSlotState, ferry_devices::virtio::persist::MmioPersistError>;
}

impl PauseSave for MmioTransport<Block> {
    fn pause(&mut self, paused: bool) {
        self.set_paused(paused)
    }
    fn save_slot(
        &self,
    ) -> Result<VirtioSlotState, ferry_devices::virtio::persist::MmioPersistError> {
        self.save().map(VirtioSlotState::Block)
    }
}

impl PauseSave for MmioTransport<Net> {
    fn pause(&mut self, paused: bool) {
        self.set_paused(paused)
    }
    fn save_slot(
        &self,
    ) -> Result<VirtioSlotState, ferry_devices::virtio::persist::MmioPersistError> {
        self.save().map(VirtioSlotState::Net)
    }
}

/// The `virtio_mmio.device=` tokens announcing `count` virtio slots on a kernel command line.
pub fn virtio_cmdline(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
                VIRTIO_IRQS[i]
            )
        })
        .collect()
}

/// The name of the tap ferry makes for network card `index` of this process.
pub fn own_tap_name(index: usize) -> String {
    format!("fy{}n{index}", std::process::id())
}

/// Saved state of every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub com1: SerialDeviceState,
    pub com2: SerialDeviceState,
    #[serde(default)]
    pub i8042: I8042State,
    #[serde(default)]
    pub pm: PmState,
    #[serde(default)]
    pub virtio: Vec<VirtioSlotState>,
}

/// The device set of a VM.
pub struct Devices {
    pub com1: Arc<Mutex<SerialDevice>>,
    pub com2: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub pm: Arc<Mutex<PowerManagement>>,
    pub virtio: Vec<VirtioSlot>,
    /// The disk images, in slot order.
    pub disks: Vec<DiskHandle>,
    /// Socket files to remove when the VMM ends.
    pub sockets: Vec<PathBuf>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn irq(vm: &VmFd, irq: u32) -> Result<IrqTrigger, DevicesError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DevicesError::EventFd)?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| DevicesError::Irqfd { irq, source })?;
    Ok(IrqTrigger(evt))
}

/// What the devices need from their surroundings.
pub struct DevicesArgs<'a> {
    pub vm: &'a VmFd,
    pub config: &'a VmConfig,
    pub mem: &'a GuestMemoryMmap,
    /// Lock disk images now (false for a migration's destination until commit).
    pub lock_disks: bool,
    /// Serial ports opened before the VM (taken where the config names them).
    pub ports: Option<&'a serial_backend::Ports>,
}

/// Where a disk's bytes are, as the VMM (not the device) holds them.
enum DiskStore {
    /// An image file: its lock is the VMM's to take and release.
    File(File),
    /// An NBD export: the server decides who may write; the VMM only flushes.
    Nbd(crate::nbd_disk::SharedNbd),
}

/// A disk image as the VM holds it, for taking and releasing its lock.
pub struct DiskHandle {
    pub path: PathBuf,
    pub read_only: bool,
    store: DiskStore,
    /// Whether this VMM holds the image's lock now.
    locked: std::sync::atomic::AtomicBool,
    /// What the device reaches the disk through (and mirrors it with).
    slot: crate::mirror::SwitchDisk,
    /// The copy being made by a mirror: where it is and its store, for the switch.
    pending: Option<(PathBuf, DiskStore)>,
}

/// Open disk `d`'s storage: its backend for the device and the VMM's own handle on it.
/// `stall` overrides the NBD stall limit (a mirror's copy gives up sooner than a disk).
fn open_disk_store(
    index: usize,
    d: &ferry_api::DiskConfig,
    lock: bool,
    stall: Option<std::time::Duration>,
) -> Result<(Box<dyn DiskBackend>, DiskStore), DevicesError> {
    let io = |source| DevicesError::Virtio { index, source };
    let nbd_stall = stall.unwrap_or(std::time::Duration::from_secs(
        d.stall_limit_s.unwrap_or(ferry_api::DEFAULT_STALL_LIMIT_S),
    ));
    match d.nbd_uri() {
        Some(uri) => {
            let tls = if uri.starts_with("nbds://") {
                crate::nbd_disk::host_tls().map_err(|e| io(std::io::Error::other(e)))?
            } else {
                None
            };
            let n = crate::nbd_disk::NbdDisk::open(uri, d.read_only, nbd_stall, tls)
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let shared = crate::nbd_disk::SharedNbd(Arc::new(
                ferry_devices::virtio::block::StreamLock::new(n),
            ));
            Ok((Box::new(shared.clone()), DiskStore::Nbd(shared)))
        }
        None => {
            let file = if lock {
                host_io::open_disk(&d.path, d.read_only)?
            } else {
                host_io::open_disk_unlocked(&d.path, d.read_only)?
            };
            let dup = file.try_clone().map_err(io)?;
            let disk = crate::uring_disk::UringFile::new(file);
            Ok((Box::new(disk), DiskStore::File(dup)))
        }
    }
}

/// Another handle on a disk's storage (a duplicated file descriptor, or the same NBD disk).
fn store_handle(s: &DiskStore) -> std::io::Result<Box<dyn DiskBackend>> {
    Ok(match s {
        DiskStore::File(f) => Box::new(f.try_clone()?),
        DiskStore::Nbd(n) => Box::new(n.clone()),
    })
}

/// How long a mirror's NBD copy rides out an outage before the mirror fails (the guest's
/// writes wait for it meanwhile, so this is short: the VM's own disk is the truth).
const MIRROR_STALL: std::time::Duration = std::time::Duration::from_secs(3);

fn nonblocking_eventfd() -> std::io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK)
}

/// Build (or restore) the transport of virtio slot `index` around `device` and start its
/// worker.
fn virtio_slot<D>(
    args: &DevicesArgs<'_>,
    index: usize,
    name: &str,
    build: impl FnOnce(Interrupt, EventFd) -> Result<MmioTransport<D>, DevicesError>,
    wrap: impl FnOnce(Arc<Mutex<MmioTransport<D>>>) -> VirtioKind,
) -> Result<VirtioSlot, DevicesError>
where
    D: VirtioDevice,
{
    let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW;
    let irq_no = VIRTIO_IRQS[index];
    let io = |source| DevicesError::Virtio { index, source };
    let irq_evt = nonblocking_eventfd().map_err(io)?;
    args.vm
        .register_irqfd(&irq_evt, irq_no)
        .map_err(|source| DevicesError::Irqfd {
            irq: irq_no,
            source,
        })?;
    let transport = build(Interrupt::new(irq_evt), nonblocking_eventfd().map_err(io)?)?;
    let queues = transport.queue_count();
    let mut queue_evts = Vec::with_capacity(queues);
    for q in 0..queues {
        let evt = nonblocking_eventfd().map_err(io)?;
        args.vm
            .register_ioevent(&evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
            .map_err(|source| DevicesError::Ioevent { index, source })?;
        queue_evts.push(evt);
    }
    let shared = Arc::new(Mutex::new(transport));
    let worker = worker::spawn(format!("{name}{index}"), shared.clone(), queue_evts).map_err(io)?;
    Ok(VirtioSlot {
        base,
        irq: irq_no,
        kind: wrap(shared),
        _worker: worker,
    })
}

/// A card's tap: its header carries the driver's offloads, which the card sets with `TUNSETOFFLOAD`.
fn vnet_tap(file: File, index: usize) -> Result<Tap, DevicesError> {
    let ctl = file
        .try_clone()
        .map_err(|source| DevicesError::Virtio { index, source })?;
    Ok(Tap {
        file,
        offload: Some(Box::new(move |flags| host_io::set_tap_offload(&ctl, flags))),
    })
}

fn open_net(config: &VmConfig, i: usize) -> Result<(File, [u8; 6]), DevicesError> {
    let net = &config.nets[i];
    let tap = match &net.backend {
        NetBackend::Tap(name) => host_io::open_tap(name)?,
        NetBackend::Bridge(br) => {
            let name = own_tap_name(i);
            let f = host_io::open_tap(&name)?;
            host_io::attach_to_bridge(&name, br)?;
            f
        }
    };
    let mac = net
        .mac
        .as_deref()
        .and_then(parse_mac)
        .unwrap_or([0x52, 0x54, 0, 0, 0, i as u8]);
    Ok((tap, mac))
}

fn build_virtio(
    args: &DevicesArgs<'_>,
    saved: Option<&[VirtioSlotState]>,
    disks: &mut Vec<DiskHandle>,
) -> Result<Vec<VirtioSlot>, DevicesError> {
    let cfg = args.config;
    let total = cfg.disks.len() + cfg.nets.len();
    if let Some(s) = saved {
        if s.len() != total {
            return Err(DevicesError::VirtioCount {
                saved: s.len(),
                config: total,
            });
        }
    }
    let mut slots = Vec::with_capacity(total);
    for index in 0..total {
        let state = saved.map(|s| &s[index]);
        let mem = args.mem.clone();
        let vstate = |source| DevicesError::VirtioState { index, source };
        let slot = if index < cfg.disks.len() {
            let d = &cfg.disks[index];
            let (disk, store) = open_disk_store(index, d, args.lock_disks, None)?;
            let is_nbd = matches!(store, DiskStore::Nbd(_));
            let slot = crate::mirror::SwitchDisk::new(disk)
                .map_err(|source| DevicesError::Virtio { index, source })?;
            let disk: Box<dyn DiskBackend> = Box::new(slot.clone());
            disks.push(DiskHandle {
                path: d.path.clone(),
                read_only: d.read_only,
                store,
                locked: (args.lock_disks || is_nbd).into(),
                slot,
                pending: None,
            });
            let serial = d
                .serial
                .clone()
                .unwrap_or_else(|| format!("ferry-disk{index}"));
            let build = |interrupt, kick| match state {
                None => {
                    // One request queue per vCPU unless the config says (QEMU's default).
                    let queues = d.queues.unwrap_or(u16::from(cfg.vcpus));
                    let dev = Block::with_backend(disk, d.read_only, &serial)
                        .map_err(|source| DevicesError::Virtio { index, source })?
                        .with_queues(queues);
                    MmioTransport::new(dev, mem, interrupt, kick).map_err(|e| {
                        DevicesError::Virtio {
                            index,
                            source: std::io::Error::other(format!("{e:?}")),
                        }
                    })
                }
                Some(VirtioSlotState::Block(s)) => MmioTransport::restore(
                    MmioArgs {
                        device: disk,
                        mem,
                        interrupt,
                        kick,
                    },
                    s,
                )
                .map_err(vstate),
                Some(_) => Err(DevicesError::VirtioKind(index)),
            };
            virtio_slot(args, index, "blk", build, VirtioKind::Block)?
        } else {
            let (tap, mac) = open_net(cfg, index - cfg.disks.len())?;
            let build = |interrupt, kick| match state {
                None => {
                    MmioTransport::new(Net::new(vnet_tap(tap, index)?, mac), mem, interrupt, kick)
                        .map_err(|e| DevicesError::Virtio {
                            index,
                            source: std::io::Error::other(format!("{e:?}")),
                        })
                }
                Some(VirtioSlotState::Net(s)) => MmioTransport::restore(
                    MmioArgs {
                        device: vnet_tap(tap, index)?,
                        mem,
                        interrupt,
                        kick,
                    },
                    s,
                )
                .map_err(vstate),
                Some(_) => Err(DevicesError::VirtioKind(index)),
            };
            virtio_slot(args, index, "net", build, VirtioKind::Net)?
        };
        slots.push(slot);
    }
    Ok(slots)
}

impl Devices {
    /// Devices in their power-on state.
    pub fn new(args: DevicesArgs<'_>) -> Result<Devices, DevicesError> {
        let state = DevicesState {
            com1: SerialDeviceState::default(),
            com2: SerialDeviceState::default(),
            i8042: I8042State::default(),
            pm: PmState::default(),
            virtio: Vec::new(),
        };
        Devices::build(args, &state, false)
    }

    /// Place every device on `bus`.
    pub fn attach(&self, bus: &mut PioBus) -> Result<(), DevicesError> {
        bus.insert(COM1.0, SERIAL_PORT_LEN, self.com1.clone())?;
        bus.insert(COM2.0, SERIAL_PORT_LEN, self.com2.clone())?;
        bus.insert(0x60, 5, self.i8042.clone())?;
        bus.insert(PM_BASE, 8, self.pm.clone())?;
        Ok(())
    }

    /// Flush every disk image and let go of its lock (a migration's source, just before it
    /// lets the destination commit). On failure the disks released so far stay released and
    /// say so: [`Devices::lock_disks`] takes exactly those back.
    pub fn release_disks(&self) -> Result<(), DevicesError> {
        use std::sync::atomic::Ordering;
        for (i, d) in self.disks.iter().enumerate() {
            if !d.locked.load(Ordering::SeqCst) {
                continue;
            }
            if crate::fail::fail_point(&format!("release-disk-{i}")) {
                return Err(host_io::HostIoError::Release {
                    path: d.path.clone(),
                    source: std::io::Error::other("failure injected by FERRY_FAIL_AT"),
                }
                .into());
            }
            match &d.store {
                DiskStore::File(f) => host_io::release_disk(f, &d.path)?,
                // Everything acknowledged reaches the server's disk before the other host
                // may take over; the lease itself is the file server's.
                DiskStore::Nbd(n) => {
                    n.clone()
                        .flush()
                        .map_err(|source| host_io::HostIoError::Release {
                            path: d.path.clone(),
                            source,
                        })?
                }
            }
            d.locked.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Flush every disk image, and every copy a storage move is making, to stable storage (best
    /// effort, before a migration's pause; the flush that counts comes with `release_disks`
    /// and `flush_mirrors`).
    pub fn sync_disks(&self) {
        for d in &self.disks {
            d.slot.sync_mirror();
            let r = match &d.store {
                DiskStore::File(f) => f.sync_data(),
                DiskStore::Nbd(n) => n.clone().flush(),
            };
            if let Err(e) = r {
                tracing::warn!("flushing {}: {e}", d.path.display());
            }
        }
    }

    /// Take the lock of every disk image this VMM does not hold; on failure, the ones this
    /// call took are let go again, so it holds what it held before.
    pub fn lock_disks(&self) -> Result<(), DevicesError> {
        use std::sync::atomic::Ordering;
        let mut taken = Vec::new();
        for d in &self.disks {
            if d.locked.load(Ordering::SeqCst) {
                continue;
            }
            let DiskStore::File(file) = &d.store else {
                d.locked.store(true, Ordering::SeqCst);
                continue;
            };
            if let Err(e) = host_io::lock_disk(file, &d.path, d.read_only) {
                for held in taken {
                    let held: &DiskHandle = held;
                    if let DiskStore::File(f) = &held.store {
                        let _ = f.unlock();
                    }
                    held.locked.store(false, Ordering::SeqCst);
                }
                return Err(e.into());
            }
            d.locked.store(true, Ordering::SeqCst);
            taken.push(d);
        }
        Ok(())
    }

    /// Start copying disk `i` to `target` while the VM runs (see [`crate::mirror`]). The copy
    /// is opened (and locked, for an image file) here.
    pub fn start_mirror(
        &mut self,
        i: usize,
        target: &std::path::Path,
        bandwidth_mbit: u64,
    ) -> Result<(), String> {
        let h = self
            .disks
            .get_mut(i)
            .ok_or_else(|| format!("the VM has no disk {i}"))?;
        if h.pending.is_some() {
            return Err(format!(
                "disk {i} is already being copied; cancel that first"
            ));
        }
        if h.path == target {
            return Err(format!("disk {i} is {} already", target.display()));
        }
        let cfg = ferry_api::DiskConfig {
            path: target.to_path_buf(),
            read_only: false,
            serial: None,
            stall_limit_s: None,
            queues: None,
        };
        let (backend, store) = open_disk_store(i, &cfg, true, Some(MIRROR_STALL))
            .map_err(|e| crate::error_chain(&e))?;
        // The copy pass's own handles on the disk and on the copy, one pair per worker; an
        // image file copy is written around the page cache where its file system can.
        let mut handles = Vec::new();
        for _ in 0..crate::mirror::WORKERS {
            let direct = match &store {
                DiskStore::File(f) => crate::mirror::DirectWriter::open(target, f)
                    .map_err(|e| format!("opening {}: {e}", target.display()))?,
                DiskStore::Nbd(_) => None,
            };
            let writer: Box<dyn DiskBackend> = match direct {
                Some(d) => Box::new(d),
                None => store_handle(&store).map_err(|e| e.to_string())?,
            };
            handles.push((store_handle(&h.store).map_err(|e| e.to_string())?, writer));
        }
        h.slot
            .start_mirror(
                i,
                backend,
                handles,
                h.path.clone(),
                target.to_path_buf(),
                bandwidth_mbit,
            )
            .map_err(|e| e.to_string())?;
        h.pending = Some((target.to_path_buf(), store));
        tracing::info!(
            "disk {i}: copying {} to {}",
            h.path.display(),
            target.display()
        );
        Ok(())
    }

    /// The progress of every disk mirror.
    pub fn mirrors(&self) -> Vec<ferry_api::MirrorProgress> {
        self.disks
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.slot.mirror_progress(i))
            .collect()
    }

    /// Whether a disk mirror runs.
    pub fn mirroring(&self) -> bool {
        self.disks.iter().any(|h| h.pending.is_some())
    }

    /// Make every disk copy durable and check it is whole (a migration's switch-over, the guest
    /// paused: the destination runs on the copies a shared-nothing move made). A copy that is
    /// not complete, or that a write failed to reach, fails the migration.
    pub fn flush_mirrors(&self) -> Result<(), String> {
        for (i, h) in self.disks.iter().enumerate() {
            if h.pending.is_some() {
                h.slot.flush_mirror(i).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Stop copying disk `i`; the copy is closed (and its lock let go).
    pub fn cancel_mirror(&mut self, i: usize) -> Result<(), String> {
        let h = self
            .disks
            .get_mut(i)
            .ok_or_else(|| format!("the VM has no disk {i}"))?;
        h.slot.cancel_mirror();
        match h.pending.take() {
            Some((p, _store)) => {
                tracing::info!("disk {i}: copy to {} cancelled", p.display());
                Ok(())
            }
            None => Err(format!("disk {i} is not being copied")),
        }
    }

    /// Switch disk `i` to its complete copy: the old image is closed and its lock let go.
    /// `stall`: the NBD stall limit the disk has (the copy had a short one while it was one).
    pub fn complete_mirror(
        &mut self,
        i: usize,
        stall: std::time::Duration,
    ) -> Result<ferry_api::MirrorSwitched, String> {
        let h = self
            .disks
            .get_mut(i)
            .ok_or_else(|| format!("the VM has no disk {i}"))?;
        if h.pending.is_none() {
            return Err(format!("disk {i} is not being copied"));
        }
        let (old_backend, progress, waited) = h.slot.switch(i).map_err(|e| e.to_string())?;
        let (new_path, new_store) = h.pending.take().expect("checked above");
        if let DiskStore::Nbd(n) = &new_store {
            n.set_stall_limit(stall);
        }
        let old_path = std::mem::replace(&mut h.path, new_path.clone());
        let old_store = std::mem::replace(&mut h.store, new_store);
        drop(old_backend);
        match old_store {
            DiskStore::File(f) => {
                if let Err(e) = f.unlock() {
                    tracing::warn!("unlocking {}: {e}", old_path.display());
                }
            }
            DiskStore::Nbd(_) => {} // the connection closes with its last handle
        }
        tracing::info!(
            "disk {i}: now {} (was {}; guest I/O waited {:.2} ms)",
            new_path.display(),
            old_path.display(),
            waited.as_secs_f64() * 1e3
        );
        Ok(ferry_api::MirrorSwitched {
            disk: i,
            old: old_path,
            new: new_path,
            pause_ms: waited.as_secs_f64() * 1e3,
            progress,
        })
    }

    /// Whether every disk image's lock is held by this VMM.
    pub fn disks_locked(&self) -> bool {
        self.disks
            .iter()
            .all(|d| d.locked.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Tell the network where each card's MAC now lives: a broadcast RARP from every card, as
    /// QEMU's self-announce does after a move, so switches and bridges learn the new port.
    pub fn announce_macs(&self) {
        for slot in &self.virtio {
            if let VirtioKind::Net(t) = &slot.kind {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                let frame = rarp_announce(t.device().mac());
                if let Err(e) = t.device_mut().inject_tx(&frame) {
                    tracing::warn!("MAC announcement failed: {e}");
                }
            }
        }
    }

    /// Where the virtio devices are, for the ACPI DSDT.
    pub fn mmio_info(&self) -> Vec<crate::acpi::MmioDeviceInfo> {
        self.virtio
            .iter()
            .map(|s| crate::acpi::MmioDeviceInfo {
                base: s.base,
                len: MMIO_WINDOW,
                irq: s.irq,
            })
            .collect()
    }

    /// Place every virtio device on `mmio`.
    pub fn attach_mmio(&self, mmio: &mut MmioBus) -> Result<(), DevicesError> {
        for slot in &self.virtio {
            let dev: Arc<dyn crate::bus::MmioDevice> = match &slot.kind {
                VirtioKind::Block(t) => Arc::new(crate::bus::VirtioMmio::new(t.clone())),
                VirtioKind::Net(t) => Arc::new(crate::bus::VirtioMmio::new(t.clone())),
            };
            mmio.insert(slot.base, MMIO_WINDOW, dev)?;
        }
        Ok(())
    }

    /// Stop (or restart) all virtio queue processing. Taking each transport's lock also waits
    /// for a worker that is mid-request, so once this returns no device touches guest memory.
    pub fn set_paused(&self, paused: bool) {
        for slot in &self.virtio {
            slot.with(|t| t.pause(paused));
        }
    }

    /// Save every device's state.
    pub fn save(&self) -> Result<DevicesState, DevicesError> {
        let serial =
            |s: &Arc<Mutex<SerialDevice>>| s.lock().unwrap_or_else(|e| e.into_inner()).save();
        let i8042 = match self.i8042.lock().unwrap_or_else(|e| e.into_inner()).save() {
            Ok(s) => s,
            Err(e) => match e {},
        };
        let pm = match self.pm.lock().unwrap_or_else(|e| e.into_inner()).save() {
            Ok(s) => s,
            Err(e) => match e {},
        };
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for (index, slot) in self.virtio.iter().enumerate() {
            virtio.push(
                slot.with(|t| t.save_slot())
                    .map_err(|source| DevicesError::VirtioState { index, source })?,
            );
        }
        Ok(DevicesState {
            com1: serial(&self.com1)?,
            com2: serial(&self.com2)?,
            i8042,
            pm,
            virtio,
        })
    }

    /// Rebuild the devices from a saved state, with host backends from `args`.
    pub fn restore(args: DevicesArgs<'_>, state: &DevicesState) -> Result<Devices, DevicesError> {
        Devices::build(args, state, true)
    }

    fn build(
        args: DevicesArgs<'_>,
        state: &DevicesState,
        restoring: bool,
    ) -> Result<Devices, DevicesError> {
        let mut sockets = vec![];
        let mut port = |backend: &SerialBackend, irq_no: u32, s: &SerialDeviceState, name: &str| {
            let mut opened: OpenedBackend = match args.ports.and_then(|p| p.take(backend)) {
                Some(o) => o,
                None => serial_backend::open(backend)?,
            };
            if let Some(p) = opened.socket.take() {
                sockets.push(p);
            }
            let out = std::mem::replace(&mut opened.out, Box::new(std::io::sink()));
            let dev = Arc::new(Mutex::new(SerialDevice::restore(
                (irq(args.vm, irq_no)?, out),
                s,
            )?));
            opened
                .start_input(name, dev.clone())
                .map_err(DevicesError::Thread)?;
            Ok::<_, DevicesError>(dev)
        };
        let com1 = port(&args.config.serial, COM1.1, &state.com1, "com1")?;
        let com2 = port(&args.config.serial2, COM2.1, &state.com2, "com2")?;
        let mut disks = Vec::new();
        let virtio = build_virtio(&args, restoring.then_some(&state.virtio[..]), &mut disks)?;
        let i8042 = match I8042::restore((), &state.i8042) {
            Ok(d) => d,
            Err(e) => match e {},
        };
        let pm = match PowerManagement::restore((), &state.pm) {
            Ok(d) => d,
            Err(e) => match e {},
        };
        Ok(Devices {
            com1,
            com2,
            i8042: Arc::new(Mutex::new(i8042)),
            pm: Arc::new(Mutex::new(pm)),
            virtio,
            disks,
            sockets,
        })
    }
}

/// A broadcast RARP "reverse request" for `mac` (ethertype 0x8035), padded to 60 bytes.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, lengths, op 3
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}
