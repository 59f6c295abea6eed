//! Virtio devices on the virtio-mmio transport (VIRTIO 1.1, §4.2; modern devices only).
//!
//! - [`mmio`]: the transport registers, queues and device status, shared between the vCPU
//!   that touches registers and the worker thread that processes queues;
//! - [`worker`]: one thread per device: epoll over the queue notifications (KVM ioeventfds),
//!   the backend (tap) and control events;
//! - [`block`], [`net`]: the devices.
//!
//! Every guest-memory write a device makes (used rings, read data, received frames) goes
//! through vm-memory with the VM's `AtomicBitmap`, so it is in the VMM's dirty bitmap.
//! Descriptor chains come from the guest and are untrusted: lengths and addresses are checked
//! by `virtio-queue` (chains are bounded by the queue size, so a loop ends), and a bad chain
//! is completed with an error or dropped, never a panic and never memory outside the guest.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(test)]
mod test_util;
pub mod worker;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: mmap regions with the VMM's dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Feature bit: the driver and device tell each other, by ring index, when to notify and
/// interrupt (used_event / avail_event), instead of by flags.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature bit: a modern (VIRTIO 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = 2;

/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line (an eventfd wired to an IOAPIC pin by KVM) and its
/// InterruptStatus register.
#[derive(Clone, Debug)]
pub struct Interrupt {
    pub(crate) status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt line raised through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }

    /// Tell the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio interrupt failed: {e}");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a worker woke a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The driver notified this queue.
    Queue(usize),
    /// The backend (tap) is readable.
    Backend,
    /// Look at everything (after activation, resume or restore).
    All,
}

/// What a device model implements; the transport does the rest.
pub trait VirtioDevice: Send + 'static {
    /// Virtio device type.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Read the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// A backend file descriptor the worker should watch for input (a tap), if any.
    fn backend_fd(&self) -> Option<RawFd>;
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked_features: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Do the work `wake` asks for. Returns whether the driver should be interrupted.
    fn process(&mut self, wake: Wake, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// The device's interrupt line, for a device that answers requests while `process` is
    /// still running (the transport hands it over when it is created).
    fn set_interrupt(&mut self, _interrupt: Interrupt) {}
    /// Whether the transport should poll the queues for a while after `process` (which then
    /// leaves the driver's notifications off), before it turns notifications back on.
    fn polls(&self) -> bool {
        false
    }
}

/// Whether the driver wants an interrupt for the used buffers just added to `q`. With
/// EVENT_IDX that is its used_event; without, its VIRTQ_AVAIL_F_NO_INTERRUPT flag, which
/// virtio-queue does not look at (a polling driver sets it, and an interrupt it never takes
/// still costs a vCPU exit to inject).
pub(crate) fn wants_interrupt(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    // Always asked, so its count of entries added since the last time starts afresh.
    let wanted = q.needs_notification(mem).unwrap_or(true);
    if !q.event_idx_enabled() {
        let flags: u16 = mem
            .read_obj(GuestAddress(q.avail_ring()))
            .map(u16::from_le)
            .unwrap_or(0);
        if flags & 1 != 0 {
            return false;
        }
    }
    wanted
}

/// Read `data.len()` bytes at `offset` of a config-space image, zero beyond its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}

/// A rate limiter for log lines a guest can trigger.
#[derive(Debug, Default)]
pub(crate) struct LogLimit(u64);

impl LogLimit {
    pub(crate) fn allow(&mut self) -> bool {
        self.0 += 1;
        self.0 <= 10 || self.0.is_power_of_two()
    }
}
