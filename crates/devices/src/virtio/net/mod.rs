//! virtio-net on a tap device (VIRTIO 1.1 §5.1): one receive and one transmit queue.
//!
//! On a tap opened with a virtio-net header (`IFF_VNET_HDR`, header size 12: the VMM's taps),
//! the card offers what a guest's driver expects of a modern one: checksum offload both ways
//! (`CSUM`, `GUEST_CSUM`), TCP segmentation offload both ways (`HOST_TSO4/6`, `GUEST_TSO4/6`),
//! and mergeable receive buffers (`MRG_RXBUF`). Then the header travels between the guest and
//! the tap as it is: a frame the guest leaves to be checksummed or segmented goes to the host
//! kernel so, and the host kernel hands the guest large segments with their checksums still to
//! check only where the driver said it takes them (`TUNSETOFFLOAD`, set from the features the
//! driver accepted, again on restore). On a plain tap (tests, or a guest that accepts none of
//! it) the header is stripped on transmit and added, all zero, on receive.
//!
//! Both queues honour EVENT_IDX: the card keeps `avail_event` current, so the driver notifies
//! only when it has something new, and interrupts follow the driver's `used_event`.
//! Transmit is batched: every frame the driver queued goes before the one interrupt.

mod persist;

pub use persist::NetState;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::{
    read_config_bytes, GuestMemoryMmap, LogLimit, VirtioDevice, Wake, TYPE_NET,
    VIRTIO_RING_F_EVENT_IDX,
};
#[cfg(test)]
use ferry_migration::Persist;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1` (also the tap's header size).
pub const HDR_LEN: usize = 12;
/// Largest frame (with TSO: a 64 KiB segment) read from or written to the tap.
const MAX_FRAME: usize = 65_536;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;

/// `TUNSETOFFLOAD` flags: what the host kernel may hand the guest unfinished.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

const RX: usize = 0;
const TX: usize = 1;

/// Frame counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    /// Receive buffers used beyond the first (mergeable receive buffers).
    pub rx_merged: u64,
}

/// Sets the tap's offloads (`TUNSETOFFLOAD`: an ioctl, so the VMM's).
pub type SetOffload = Box<dyn Fn(u32) -> std::io::Result<()> + Send>;

/// The host side of a card.
pub struct Tap {
    /// Opened non-blocking, without packet info.
    pub file: File,
    /// `Some` when the tap carries a 12-byte virtio-net header (`IFF_VNET_HDR`): then the card
    /// offers offloads and calls this with the ones the driver takes.
    pub offload: Option<SetOffload>,
}

impl Tap {
    /// A tap without a header (no offloads).
    pub fn plain(file: File) -> Tap {
        Tap {
            file,
            offload: None,
        }
    }
}

/// A virtio network card on a tap.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    pub(crate) acked_features: u64,
    /// A frame (with its header) read from the tap that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub counters: NetCounters,
    errors: LogLimit,
}

/// The tap offloads for a driver that accepted `features`: a driver takes large segments only
/// with partial checksums.
pub fn tap_offloads(features: u64) -> u32 {
    if features & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        f |= TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        f |= TUN_F_TSO6;
    }
    f
}

impl Net {
    /// A card on `tap` with `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            acked_features: 0,
            pending: None,
            buf: vec![0u8; HDR_LEN + MAX_FRAME],
            counters: NetCounters::default(),
            errors: LogLimit::default(),
        }
    }

    /// The card's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn vnet(&self) -> bool {
        self.tap.offload.is_some()
    }

    fn mergeable(&self) -> bool {
        self.acked_features & F_MRG_RXBUF != 0
    }

    /// Send a frame to the network as if the guest had (the MAC announcement after a move).
    pub fn inject_tx(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if self.vnet() {
            let mut f = vec![0u8; HDR_LEN];
            f.extend_from_slice(frame);
            self.tap.file.write_all(&f)
        } else {
            self.tap.file.write_all(frame)
        }
    }

    /// Tell the tap what the driver takes (after activation or restore).
    fn apply_offloads(&mut self) {
        if let Some(set) = &self.tap.offload {
            if let Err(e) = set(tap_offloads(self.acked_features)) {
                tracing::warn!("virtio-net: cannot set the tap's offloads: {e}");
            }
        }
    }

    /// The next frame as the guest gets it: the virtio-net header, then the frame.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(f) = self.pending.take() {
            return Some(f);
        }
        let at = if self.vnet() { 0 } else { HDR_LEN };
        match self.tap.file.read(&mut self.buf[at..]) {
            Ok(n) if n > 0 => {
                let mut f = self.buf[..at + n].to_vec();
                if !self.vnet() {
                    f[..HDR_LEN].fill(0);
                }
                Some(f)
            }
            Ok(_) => None,
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => {
                if self.errors.allow() {
                    tracing::warn!("virtio-net: tap read failed: {e}");
                }
                None
            }
        }
    }

    /// Put `frame` (header included) into receive buffers: one chain, or with mergeable
    /// buffers as many as it takes. `None` when the driver has not given enough buffers yet
    /// (nothing is taken off the queue then).
    fn deliver(&mut self, frame: &mut [u8], q: &mut Queue, mem: &GuestMemoryMmap) -> Option<bool> {
        let mut chains = Vec::new();
        let mut room = 0usize;
        while room < frame.len() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Not enough buffers: give back what was taken, keep the frame.
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return None;
            };
            let head = chain.head_index();
            match Writer::new(mem, chain) {
                // A receive buffer the device cannot write into is no buffer.
                Ok(w) if w.available_bytes() > 0 => {
                    room += w.available_bytes();
                    chains.push((head, Some(w)));
                }
                _ => chains.push((head, None)),
            }
            if !self.mergeable() || chains.last().is_some_and(|(_, w)| w.is_none()) {
                break;
            }
        }
        let usable = room >= frame.len() && chains.iter().all(|(_, w)| w.is_some());
        if !usable {
            // One buffer too small (or bad) without mergeable buffers: the frame is dropped and
            // the buffers go back empty.
            self.counters.rx_dropped += 1;
            if self.errors.allow() {
                tracing::warn!("virtio-net: receive buffer unusable or too small; frame dropped");
            }
            for (head, _) in chains {
                let _ = q.add_used(mem, head, 0);
            }
            return Some(true);
        }
        let n = chains.len();
        frame[10..12].copy_from_slice(&(n as u16).to_le_bytes()); // num_buffers
        let mut rest: &[u8] = frame;
        let mut lens = Vec::with_capacity(n);
        let mut ok = true;
        for (_, w) in chains.iter_mut() {
            let Some(w) = w.as_mut() else { continue };
            let k = w.available_bytes().min(rest.len());
            ok &= w.write_all(&rest[..k]).is_ok();
            lens.push(k as u32);
            rest = &rest[k..];
        }
        if ok {
            self.counters.rx_frames += 1;
            self.counters.rx_merged += n as u64 - 1;
        } else {
            self.counters.rx_dropped += 1;
        }
        for ((head, _), len) in chains.iter().zip(lens) {
            let _ = q.add_used(mem, *head, if ok { len } else { 0 });
        }
        Some(true)
    }

    fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let mut starved = None;
            while let Some(mut frame) = self.next_frame() {
                match self.deliver(&mut frame, q, mem) {
                    Some(u) => used |= u,
                    None => {
                        self.pending = Some(frame);
                        starved = Some(q.avail_idx(mem, Ordering::Acquire).ok());
                        break;
                    }
                }
            }
            let Some(seen) = starved else { break };
            // Waiting for buffers: ask the driver to say when it adds some (EVENT_IDX), and
            // look again only if it did meanwhile (the ones there are not enough).
            let _ = q.enable_notification(mem);
            if q.avail_idx(mem, Ordering::Acquire).ok() == seen {
                break;
            }
        }
        used
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match Reader::new(mem, chain) {
                    Ok(mut r)
                        if r.available_bytes() > HDR_LEN
                            && r.available_bytes() <= HDR_LEN + MAX_FRAME =>
                    {
                        let n = r.available_bytes();
                        // With a header on the tap the guest's goes along (checksum and
                        // segmentation requests), else only the frame.
                        let from = if self.tap.offload.is_some() {
                            0
                        } else {
                            HDR_LEN
                        };
                        let frame = &mut self.buf[..n];
                        if r.read_exact(frame).is_ok()
                            && self.tap.file.write_all(&frame[from..]).is_ok()
                        {
                            self.counters.tx_frames += 1;
                        } else {
                            self.counters.tx_dropped += 1;
                        }
                    }
                    _ => {
                        self.counters.tx_dropped += 1;
                        if self.errors.allow() {
                            tracing::warn!("virtio-net: malformed transmit chain dropped");
                        }
                    }
                }
                let _ = q.add_used(mem, head, 0);
                used = true;
            }
            // Keep avail_event current (EVENT_IDX) and catch what came meanwhile.
            if !q.enable_notification(mem).unwrap_or(false) {
                break;
            }
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_MAC | F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX;
        if self.vnet() {
            f |= F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver.
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.file.as_raw_fd())
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
        self.apply_offloads();
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.pending = None;
        self.apply_offloads();
    }

    fn process(&mut self, wake: Wake, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let [rx, tx] = queues else { return false };
        let mut used = false;
        if matches!(wake, Wake::Queue(TX) | Wake::All) {
            used |= self.transmit(tx, mem) && tx.needs_notification(mem).unwrap_or(true);
        }
        if matches!(wake, Wake::Queue(RX) | Wake::Backend | Wake::All) {
            used |= self.receive(rx, mem) && rx.needs_notification(mem).unwrap_or(true);
        }
        used
    }
}

#[cfg(test)]
mod tests;
