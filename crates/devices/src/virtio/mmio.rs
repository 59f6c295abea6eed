//! The virtio-mmio transport, version 2 (VIRTIO 1.1 §4.2.2).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemoryMmap, Interrupt, LogLimit, VirtioDevice, Wake, VIRTIO_F_VERSION_1};

/// How long a polling device's transport keeps looking for new buffers after the device ran
/// dry: 32 µs (QEMU's default poll-max-ns), or `FERRY_VIRTIO_POLL_US` (0 turns polling off).
fn poll_window() -> std::time::Duration {
    static WINDOW: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| {
        let us = std::env::var("FERRY_VIRTIO_POLL_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32);
        std::time::Duration::from_micros(us)
    })
}

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify (where KVM ioeventfds are registered).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4652_5259; // "FRRY"

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// One virtio device behind its MMIO registers.
pub struct MmioTransport<D> {
    pub(crate) device: D,
    pub(crate) queues: Vec<Queue>,
    pub(crate) interrupt: Interrupt,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) acked_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) config_generation: u32,
    /// While paused the worker leaves queues alone (the VM is being saved or moved).
    pub(crate) paused: bool,
    kick: EventFd,
    bad_access: LogLimit,
    /// `status` as last written, for [`FastRegisters`].
    status_seen: Arc<AtomicU32>,
}

/// The registers a driver touches while its device works (InterruptStatus, InterruptACK,
/// Status), served without the transport's lock: a vCPU never waits for a device that is in
/// the middle of a slow request (an NBD disk riding out a server outage holds its lock).
#[derive(Clone)]
pub struct FastRegisters {
    status: Arc<AtomicU32>,
    interrupt: Interrupt,
}

impl FastRegisters {
    /// Serve a guest read here if it is one of these registers; false otherwise.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let v = match (offset, data.len()) {
            (0x60, 4) => self.interrupt.status(),
            (0x70, 4) => self.status.load(Ordering::SeqCst),
            _ => return false,
        };
        data.copy_from_slice(&v.to_le_bytes());
        true
    }

    /// Serve a guest write here if it is one of these registers; false otherwise.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        match (offset, <[u8; 4]>::try_from(data)) {
            (0x64, Ok(b)) => {
                self.interrupt.ack(u32::from_le_bytes(b));
                true
            }
            _ => false,
        }
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A device in its reset state. `kick` wakes the device's worker.
    pub fn new(
        mut device: D,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        kick: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(Queue::new)
            .collect::<Result<_, _>>()?;
        device.set_interrupt(interrupt.clone());
        Ok(MmioTransport {
            device,
            queues,
            interrupt,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            paused: false,
            kick,
            bad_access: LogLimit::default(),
            status_seen: Arc::new(AtomicU32::new(0)),
        })
    }

    /// The registers a vCPU may use without this transport's lock.
    pub fn fast_registers(&self) -> FastRegisters {
        FastRegisters {
            status: self.status_seen.clone(),
            interrupt: self.interrupt.clone(),
        }
    }

    pub(crate) fn publish_status(&self) {
        self.status_seen.store(self.status, Ordering::SeqCst);
    }

    /// How many queues the device has (each gets its own notification).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, to act on it from the VMM (e.g. a MAC announcement).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver finished initialisation.
    pub fn active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Stop or restart queue processing (VM pause / resume).
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            // Notifications that arrived while paused were drained unprocessed: look again.
            let _ = self.kick.write(1);
        }
    }

    /// Run the device for `wake` if it is active and not paused.
    pub fn process(&mut self, wake: Wake) {
        if !self.active() || self.paused {
            return;
        }
        let mut wake = wake;
        loop {
            if self.device.process(wake, &mut self.queues, &self.mem) {
                self.interrupt.signal_used();
            }
            if !self.device.polls() || !self.poll_for_more() {
                return;
            }
            wake = Wake::All;
        }
    }

    /// After a polling device ran dry: look for new buffers for up to [`poll_window`] with the
    /// driver's notifications still off (a driver that just took its completions usually
    /// queues the next requests within microseconds, as QEMU's poll-max-ns counts on: that
    /// saves the driver an exit and the worker a wake-up), then turn them back on. True if
    /// there is more to process.
    fn poll_for_more(&mut self) -> bool {
        let mem = &self.mem;
        let has_new = |q: &Queue| {
            q.ready()
                && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|i| i.0 != q.next_avail())
        };
        let start = std::time::Instant::now();
        let window = poll_window();
        while start.elapsed() < window {
            if self.queues.iter().any(has_new) {
                return true;
            }
            std::hint::spin_loop();
        }
        let mut more = false;
        for q in self.queues.iter_mut().filter(|q| q.ready()) {
            // True if buffers came in while notifications were off.
            more |= q.enable_notification(mem).unwrap_or(false);
        }
        more
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            if self.bad_access.allow() {
                tracing::debug!(
                    "virtio-mmio: {}-byte read at {offset:#x} ignored",
                    data.len()
                );
            }
            data.fill(0);
            return;
        }
        let features = self.device.avail_features() | VIRTIO_F_VERSION_1;
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                if self.bad_access.allow() {
                    tracing::debug!("virtio-mmio: read of register {offset:#x}");
                }
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            if self.bad_access.allow() {
                tracing::debug!(
                    "virtio-mmio: {}-byte write at {offset:#x} ignored",
                    data.len()
                );
            }
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue set-up is only allowed before DRIVER_OK on a queue that is not ready.
        let queue_setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => {
                let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
                let v = u64::from(v);
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | (v & offered),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | ((v << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => {
                // Notifications normally go to KVM ioeventfds and never reach here.
                if (v as usize) < self.queues.len() {
                    self.process(Wake::Queue(v as usize));
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => {
                self.set_status(v);
                self.publish_status();
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_setup => {
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(v))
                } else {
                    (Some(v), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {
                if self.bad_access.allow() {
                    tracing::debug!("virtio-mmio: write of {v:#x} to register {offset:#x} ignored");
                }
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: ferry's devices are modern only; refuse FEATURES_OK.
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        self.status = v;
        if newly & STATUS_DRIVER_OK != 0 {
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                self.status |= STATUS_NEEDS_RESET;
                tracing::warn!("virtio-mmio: driver enabled a queue with invalid addresses");
                return;
            }
            let event_idx = self.acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            self.device.activate(self.acked_features);
            let _ = self.kick.write(1);
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
        self.device.reset();
    }

    /// The eventfd that wakes this device's worker.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
}
