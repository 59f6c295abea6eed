//! virtio-net on a tap device (VIRTIO 1.1 §5.1): one receive and one transmit queue, no
//! offloads, the 12-byte `virtio_net_hdr_v1` stripped on transmit and added (all zero,
//! `num_buffers` = 1) on receive.

mod persist;

pub use persist::NetState;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::{read_config_bytes, GuestMemoryMmap, LogLimit, VirtioDevice, Wake, TYPE_NET};
#[cfg(test)]
use ferry_migration::Persist;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Largest frame read from the tap (no offloads: an Ethernet frame).
const MAX_FRAME: usize = 65_536;

const F_MAC: u64 = 1 << 5;
const RX: usize = 0;
const TX: usize = 1;

/// Frame counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

/// A virtio network card on a tap.
pub struct Net {
    tap: File,
    mac: [u8; 6],
    pub(crate) acked_features: u64,
    /// A frame read from the tap that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub counters: NetCounters,
    errors: LogLimit,
}

impl Net {
    /// A card on `tap` (opened non-blocking, without packet info) with `mac`.
    pub fn new(tap: File, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            acked_features: 0,
            pending: None,
            buf: vec![0u8; MAX_FRAME],
            counters: NetCounters::default(),
            errors: LogLimit::default(),
        }
    }

    /// The card's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Send a frame to the network as if the guest had (the MAC announcement after a move).
    pub fn inject_tx(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.tap.write_all(frame)
    }

    fn next_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(f) = self.pending.take() {
            return Some(f);
        }
        match self.tap.read(&mut self.buf) {
            Ok(n) if n > 0 => Some(self.buf[..n].to_vec()),
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

    fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(frame) = self.next_frame() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame and wait for the driver to add some.
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let len = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN + frame.len() => {
                    let mut hdr = [0u8; HDR_LEN];
                    hdr[10] = 1; // num_buffers
                    match w.write_all(&hdr).and_then(|_| w.write_all(&frame)) {
                        Ok(()) => {
                            self.counters.rx_frames += 1;
                            (HDR_LEN + frame.len()) as u32
                        }
                        Err(_) => {
                            self.counters.rx_dropped += 1;
                            0
                        }
                    }
                }
                _ => {
                    self.counters.rx_dropped += 1;
                    if self.errors.allow() {
                        tracing::warn!(
                            "virtio-net: receive buffer unusable or too small; frame dropped"
                        );
                    }
                    0
                }
            };
            let _ = q.add_used(mem, head, len);
            used = true;
        }
        used
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                Ok(mut r)
                    if r.available_bytes() > HDR_LEN
                        && r.available_bytes() <= HDR_LEN + MAX_FRAME =>
                {
                    let n = r.available_bytes();
                    let frame = &mut self.buf[..n];
                    if r.read_exact(frame).is_ok() && self.tap.write_all(&frame[HDR_LEN..]).is_ok()
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
        F_MAC
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
        Some(self.tap.as_raw_fd())
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.pending = None;
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
