//! virtio-blk on a raw image file (VIRTIO 1.1 §5.2).
//!
//! Requests are served synchronously by the device's worker thread, so when the transport is
//! paused no request is half done: a snapshot or a migration never has to carry in-flight
//! block requests. Read, write, flush (`fdatasync`: acknowledged only once the data is on
//! stable storage), get-id (serial), discard (punch a hole) and write-zeroes (zero range).

mod persist;

pub use persist::BlockState;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::{read_config_bytes, GuestMemoryMmap, LogLimit, VirtioDevice, Wake, TYPE_BLOCK};
#[cfg(test)]
use ferry_migration::Persist;

/// Queue size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID returned by GET_ID.
pub const ID_LEN: usize = 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest single data transfer accepted (a guest can ask for more; it gets IOERR).
const MAX_TRANSFER: usize = 16 << 20;
/// Largest discard / write-zeroes range in sectors.
const MAX_ZERO_SECTORS: u32 = 1 << 22;

/// The 16-byte request header: type, reserved, sector (little endian).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct RequestHeader {
    pub(crate) request_type: u32,
    pub(crate) sector: u64,
}

impl RequestHeader {
    #[cfg(test)]
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        RequestHeader {
            request_type: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// One discard / write-zeroes segment: sector, number of sectors, flags (bit 0: unmap).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct ZeroSegment {
    pub(crate) sector: u64,
    pub(crate) num_sectors: u32,
    pub(crate) flags: u32,
}

impl ZeroSegment {
    #[cfg(test)]
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[0..8]);
        ZeroSegment {
            sector: u64::from_le_bytes(s),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// A virtio block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; ID_LEN],
    pub(crate) acked_features: u64,
    buf: Vec<u8>,
    errors: LogLimit,
    /// Requests served (for status and benchmarks).
    pub requests: u64,
}

/// Why a request failed, turned into a status byte.
enum ReqError {
    Unsupported,
    Io,
}

impl Block {
    /// A block device on an open image. `serial` is truncated to 20 bytes.
    pub fn new(file: File, read_only: bool, serial: &str) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        let mut s = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            serial: s,
            acked_features: 0,
            buf: Vec::new(),
            errors: LogLimit::default(),
            requests: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn check_range(&self, sector: u64, bytes: u64) -> Result<u64, ReqError> {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|off| off.checked_add(bytes).map(|end| (off, end)))
            .ok_or(ReqError::Io)?;
        if end.1 > self.capacity_sectors * SECTOR_SIZE {
            return Err(ReqError::Io);
        }
        Ok(end.0)
    }

    /// Serve one request; returns the bytes written into guest buffers (for the used ring).
    fn serve(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, String> {
        let mut reader = Reader::new(mem, chain.clone())
            .map_err(|e| format!("bad readable descriptors: {e}"))?;
        let mut writer: Writer<'_, _> =
            Writer::new(mem, chain).map_err(|e| format!("bad writable descriptors: {e}"))?;
        let mut hb = [0u8; 16];
        reader
            .read_exact(&mut hb)
            .map_err(|e| format!("short request header: {e}"))?;
        let header = RequestHeader::from_bytes(&hb);
        let data_len = writer
            .available_bytes()
            .checked_sub(1)
            .ok_or("no status byte")?;
        let mut status_writer = writer
            .split_at(data_len)
            .map_err(|e| format!("status split: {e}"))?;
        self.requests += 1;
        let mut written = 0u32;
        let result = match header.request_type {
            T_IN => self
                .read_into(header.sector, &mut writer, data_len)
                .map(|n| written = n),
            T_OUT => self.write_from(header.sector, &mut reader),
            T_FLUSH => self.file.sync_data().map_err(|_| ReqError::Io),
            T_GET_ID => {
                let n = data_len.min(ID_LEN);
                writer
                    .write_all(&self.serial[..n])
                    .map_err(|_| ReqError::Io)
                    .map(|_| written = n as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => self.zero_ranges(header.request_type, &mut reader),
            _ => Err(ReqError::Unsupported),
        };
        let status = match result {
            Ok(()) => S_OK,
            Err(ReqError::Unsupported) => S_UNSUPP,
            Err(ReqError::Io) => S_IOERR,
        };
        status_writer
            .write_all(&[status])
            .map_err(|e| format!("cannot write status: {e}"))?;
        Ok(written + 1)
    }

    fn read_into(
        &mut self,
        sector: u64,
        w: &mut Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
        len: usize,
    ) -> Result<u32, ReqError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        self.buf.resize(len, 0);
        self.file
            .read_exact_at(&mut self.buf, off)
            .map_err(|_| ReqError::Io)?;
        w.write_all(&self.buf).map_err(|_| ReqError::Io)?;
        Ok(len as u32)
    }

    fn write_from(
        &mut self,
        sector: u64,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<(), ReqError> {
        if self.read_only {
            return Err(ReqError::Io);
        }
        let len = r.available_bytes();
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        self.buf.resize(len, 0);
        r.read_exact(&mut self.buf).map_err(|_| ReqError::Io)?;
        self.file
            .write_all_at(&self.buf, off)
            .map_err(|_| ReqError::Io)
    }

    fn zero_ranges(
        &mut self,
        kind: u32,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<(), ReqError> {
        let feature = if kind == T_DISCARD {
            F_DISCARD
        } else {
            F_WRITE_ZEROES
        };
        if self.read_only || self.acked_features & feature == 0 {
            return Err(ReqError::Unsupported);
        }
        while r.available_bytes() >= 16 {
            let mut sb = [0u8; 16];
            r.read_exact(&mut sb).map_err(|_| ReqError::Io)?;
            let seg = ZeroSegment::from_bytes(&sb);
            if seg.num_sectors > MAX_ZERO_SECTORS {
                return Err(ReqError::Io);
            }
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            let off = self.check_range(seg.sector, len)?;
            let unmap = kind == T_DISCARD || seg.flags & 1 != 0;
            let flags = if unmap {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            if rustix::fs::fallocate(&self.file, flags, off, len).is_err() {
                if kind == T_DISCARD {
                    continue; // discard is a hint
                }
                // No fallocate on this filesystem: write zeros.
                let zeros = vec![0u8; len as usize];
                self.file
                    .write_all_at(&zeros, off)
                    .map_err(|_| ReqError::Io)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The writeback field is not offered (no F_CONFIG_WCE): writes are ignored.
    }

    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn process(&mut self, _wake: Wake, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(q) = queues.first_mut() else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match self.serve(chain, mem) {
                Ok(n) => n,
                Err(msg) => {
                    if self.errors.allow() {
                        tracing::warn!("virtio-blk: malformed request dropped: {msg}");
                    }
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                if self.errors.allow() {
                    tracing::warn!("virtio-blk: cannot complete request: {e:?}");
                }
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }
}

/// Read back and forget the file (tests).
#[cfg(test)]
impl Block {
    fn file_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; (self.capacity_sectors * SECTOR_SIZE) as usize];
        self.file.read_exact_at(&mut v, 0).unwrap();
        v
    }
}

#[cfg(test)]
mod tests;
