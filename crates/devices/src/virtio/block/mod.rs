//! virtio-blk on a [`DiskBackend`]: a raw image file, or an NBD export (VIRTIO 1.1 §5.2).
//!
//! The device's worker thread takes every request the guest queued (up to a batch), hands
//! them to the backend together (a network backend keeps them all in flight), and completes
//! them all before it returns, so when the transport is paused no request is half done: a
//! snapshot or a migration never has to carry in-flight block requests. Read, write, flush
//! (acknowledged only once the data is on stable storage), get-id (serial), discard and
//! write-zeroes.

mod backend;
mod persist;

pub use backend::{
    gather, serve_each, DiskBackend, DiskOp, DiskOpKind, GuestSegments, FILE_DIRECT_MIN,
};
pub use persist::BlockState;

use std::io::{Read, Write};
use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::{
    read_config_bytes, wants_interrupt, GuestMemoryMmap, LogLimit, VirtioDevice, Wake, TYPE_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
#[cfg(test)]
use ferry_migration::Persist;

/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues a device offers.
pub const MAX_QUEUES: u16 = 16;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID returned by GET_ID.
pub const ID_LEN: usize = 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
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
/// Most requests handed to the backend at once.
const MAX_BATCH: usize = 64;
/// Most data bytes in one batch (reads and writes).
const MAX_BATCH_BYTES: usize = 32 << 20;

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
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; ID_LEN],
    pub(crate) acked_features: u64,
    /// Request queues offered (VIRTIO_BLK_F_MQ when more than one).
    queues: u16,
    /// Data buffers kept for the next batch.
    spare: Vec<Vec<u8>>,
    /// The backend's [`DiskBackend::direct_min`], asked at each batch.
    direct_min: Option<usize>,
    errors: LogLimit,
    /// Requests served (for status and benchmarks).
    pub requests: u64,
}

/// Why a request failed, turned into a status byte.
enum ReqError {
    Unsupported,
    Io,
}

/// `Pending::work` of a request answered without the backend.
const ANSWERED: usize = usize::MAX;

/// A request taken off the queue: where its reply goes, and what it asks.
struct Pending<'a, B: vm_memory::bitmap::BitmapSlice> {
    head: u16,
    data: Writer<'a, B>,
    status: Writer<'a, B>,
    /// Its index in the batch's ops, or the answer it already has.
    work: Result<usize, ReqError>,
    /// Bytes the answer puts into guest buffers besides the status (GET_ID).
    written: u32,
}

impl Block {
    /// A block device on `disk`. `serial` is truncated to 20 bytes.
    pub fn new<D: DiskBackend + 'static>(
        disk: D,
        read_only: bool,
        serial: &str,
    ) -> std::io::Result<Block> {
        Block::with_backend(Box::new(disk), read_only, serial)
    }

    /// A block device on a boxed backend.
    pub fn with_backend(
        disk: Box<dyn DiskBackend>,
        read_only: bool,
        serial: &str,
    ) -> std::io::Result<Block> {
        let len = disk.size()?;
        let mut s = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            disk,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            serial: s,
            acked_features: 0,
            queues: 1,
            spare: Vec::new(),
            direct_min: None,
            errors: LogLimit::default(),
            requests: 0,
        })
    }

    /// Offer `n` request queues (1 to [`MAX_QUEUES`]): a guest that takes VIRTIO_BLK_F_MQ may
    /// give each of its CPUs its own; one worker serves them all.
    pub fn with_queues(mut self, n: u16) -> Block {
        self.queues = n.clamp(1, MAX_QUEUES);
        self
    }

    /// Request queues offered.
    pub fn queues(&self) -> u16 {
        self.queues
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
        c[34..36].copy_from_slice(&self.queues.to_le_bytes()); // num_queues
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

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.resize(len, 0);
        b
    }

    /// Take one request apart: check it, copy a write's data out of the guest, and add what
    /// the backend must do to `ops`. Returns the request, or why it is malformed (it is then
    /// dropped with nothing written).
    fn parse<'a>(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
        ops: &mut Vec<DiskOp>,
    ) -> Result<Pending<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>, String>
    {
        let head = chain.head_index();
        // The chain's buffers (address, length, writable), read again for a direct request.
        let again = chain.clone();
        let descs = || {
            again
                .clone()
                .map(|d| (d.addr().0, d.len() as usize, d.is_write_only()))
        };
        let mut reader = Reader::new(mem, chain.clone())
            .map_err(|e| format!("bad readable descriptors: {e}"))?;
        let mut writer =
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
        let status = writer
            .split_at(data_len)
            .map_err(|e| format!("status split: {e}"))?;
        self.requests += 1;
        let mut written = 0u32;
        // Straight to or from guest memory where the backend takes a request this large.
        let direct = |len: usize| self.direct_min.is_some_and(|m| len >= m);
        let work = match header.request_type {
            T_IN if direct(data_len) => {
                // The data: the writable bytes before the status byte.
                let segs = take_bytes(descs().filter(|d| d.2), 0, data_len);
                self.direct_op(DiskOpKind::Read, header.sector, data_len, segs, ops)
            }
            T_OUT if direct(reader.available_bytes()) => {
                // The data: the readable bytes after the 16-byte header.
                let len = reader.available_bytes();
                let segs = take_bytes(descs().filter(|d| !d.2), 16, len);
                if self.read_only {
                    Err(ReqError::Io)
                } else {
                    self.direct_op(DiskOpKind::Write, header.sector, len, segs, ops)
                }
            }
            T_IN => self.read_op(header.sector, data_len, ops),
            T_OUT => self.write_op(header.sector, &mut reader, ops),
            T_FLUSH => {
                ops.push(DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()));
                Ok(ops.len() - 1)
            }
            T_GET_ID => {
                let n = data_len.min(ID_LEN);
                match writer.write_all(&self.serial[..n]) {
                    Ok(()) => {
                        written = n as u32;
                        Ok(ANSWERED)
                    }
                    Err(_) => Err(ReqError::Io),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => self.zero_op(header.request_type, &mut reader, ops),
            _ => Err(ReqError::Unsupported),
        };
        Ok(Pending {
            head,
            data: writer,
            status,
            work,
            written,
        })
    }

    /// A large read or write that goes straight to or from guest memory at `segs`.
    fn direct_op(
        &mut self,
        kind: DiskOpKind,
        sector: u64,
        len: usize,
        segs: Vec<(u64, usize)>,
        ops: &mut Vec<DiskOp>,
    ) -> Result<usize, ReqError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        let mut op = DiskOp::new(kind, off, len as u64, Vec::new());
        op.guest = segs;
        ops.push(op);
        Ok(ops.len() - 1)
    }

    fn read_op(
        &mut self,
        sector: u64,
        len: usize,
        ops: &mut Vec<DiskOp>,
    ) -> Result<usize, ReqError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        let buf = self.buffer(len);
        ops.push(DiskOp::new(DiskOpKind::Read, off, len as u64, buf));
        Ok(ops.len() - 1)
    }

    fn write_op(
        &mut self,
        sector: u64,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        ops: &mut Vec<DiskOp>,
    ) -> Result<usize, ReqError> {
        if self.read_only {
            return Err(ReqError::Io);
        }
        let len = r.available_bytes();
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        let mut buf = self.buffer(len);
        r.read_exact(&mut buf).map_err(|_| ReqError::Io)?;
        ops.push(DiskOp::new(DiskOpKind::Write, off, len as u64, buf));
        Ok(ops.len() - 1)
    }

    /// Discard / write-zeroes: one segment (max_discard_seg and max_write_zeroes_seg are 1).
    fn zero_op(
        &mut self,
        kind: u32,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
        ops: &mut Vec<DiskOp>,
    ) -> Result<usize, ReqError> {
        let feature = if kind == T_DISCARD {
            F_DISCARD
        } else {
            F_WRITE_ZEROES
        };
        if self.read_only || self.acked_features & feature == 0 {
            return Err(ReqError::Unsupported);
        }
        if r.available_bytes() < 16 {
            return Err(ReqError::Io);
        }
        let mut sb = [0u8; 16];
        r.read_exact(&mut sb).map_err(|_| ReqError::Io)?;
        let seg = ZeroSegment::from_bytes(&sb);
        if seg.num_sectors > MAX_ZERO_SECTORS || r.available_bytes() != 0 {
            return Err(ReqError::Io);
        }
        let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
        let off = self.check_range(seg.sector, len)?;
        let k = if kind == T_DISCARD {
            DiskOpKind::Discard
        } else {
            DiskOpKind::WriteZeroes {
                unmap: seg.flags & 1 != 0,
            }
        };
        ops.push(DiskOp::new(k, off, len, Vec::new()));
        Ok(ops.len() - 1)
    }

    /// Write a request's answer into the guest; returns the bytes written (for the used ring).
    fn complete(
        &mut self,
        p: &mut Pending<'_, impl vm_memory::bitmap::BitmapSlice>,
        ops: &mut [DiskOp],
    ) -> Result<u32, String> {
        let mut written = p.written;
        let result = match p.work {
            Err(ReqError::Io) => Err(ReqError::Io),
            Err(ReqError::Unsupported) => Err(ReqError::Unsupported),
            Ok(ANSWERED) => Ok(()),
            Ok(i) => {
                let op = &mut ops[i];
                match (&op.result, op.kind) {
                    // Already in guest memory.
                    (Ok(()), DiskOpKind::Read) if !op.guest.is_empty() => {
                        written = op.len as u32;
                        Ok(())
                    }
                    (Ok(()), DiskOpKind::Read) => match p.data.write_all(&op.buf) {
                        Ok(()) => {
                            written = op.len as u32;
                            Ok(())
                        }
                        Err(_) => Err(ReqError::Io),
                    },
                    (Ok(()), _) => Ok(()),
                    // Discard is a hint: a disk that cannot punch holes has done nothing wrong.
                    (Err(_), DiskOpKind::Discard) => Ok(()),
                    (Err(e), _) => {
                        if self.errors.allow() {
                            tracing::warn!("virtio-blk: {:?} at {}: {e}", op.kind, op.offset);
                        }
                        Err(ReqError::Io)
                    }
                }
            }
        };
        let status = match result {
            Ok(()) => S_OK,
            Err(ReqError::Unsupported) => S_UNSUPP,
            Err(ReqError::Io) => S_IOERR,
        };
        p.status
            .write_all(&[status])
            .map_err(|e| format!("cannot write status: {e}"))?;
        Ok(written + 1)
    }
}

/// The first `len` bytes after `skip` of the buffers `descs` (address, length, writable), as
/// guest segments.
fn take_bytes(
    descs: impl Iterator<Item = (u64, usize, bool)>,
    mut skip: usize,
    mut len: usize,
) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    for (addr, n, _) in descs {
        if len == 0 {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(len);
        out.push((addr + skip as u64, take));
        len -= take;
        skip = 0;
    }
    out
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queues as usize]
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | VIRTIO_RING_F_EVENT_IDX;
        if self.queues > 1 {
            f |= F_MQ;
        }
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

    fn polls(&self) -> bool {
        true
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    /// Every ready queue, whichever woke it: looking at a queue with nothing new costs a read
    /// of its index, and a notification is never missed.
    fn process(&mut self, _wake: Wake, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut interrupt = false;
        for q in queues.iter_mut() {
            // A queue the driver did not set up (one without VIRTIO_BLK_F_MQ) is not ready.
            if q.ready() {
                interrupt |= self.serve_queue(q, mem);
            }
        }
        interrupt
    }
}

impl Block {
    /// Serve every request queued on `q`; whether the driver wants an interrupt.
    fn serve_queue(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        // The driver need not notify while the device works through the queue.
        let _ = q.disable_notification(mem);
        loop {
            // A batch: every queued request, up to MAX_BATCH requests and MAX_BATCH_BYTES of data.
            let mut ops = Vec::new();
            let mut pending = Vec::new();
            let mut bytes = 0usize;
            self.direct_min = self.disk.direct_min();
            while pending.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                match self.parse(chain, mem, &mut ops) {
                    Ok(p) => {
                        if let Ok(i) = p.work {
                            if let Some(op) = ops.get(i) {
                                bytes += op.len as usize;
                            }
                        }
                        pending.push(p);
                    }
                    Err(msg) => {
                        if self.errors.allow() {
                            tracing::warn!("virtio-blk: malformed request dropped: {msg}");
                        }
                        if let Err(e) = q.add_used(mem, head, 0) {
                            if self.errors.allow() {
                                tracing::warn!("virtio-blk: cannot complete request: {e:?}");
                            }
                        }
                        used = true;
                    }
                }
            }
            if pending.is_empty() {
                // Notifications stay off: the transport looks for more requests a little
                // longer, then turns them back on (`VirtioDevice::polls`).
                break;
            }
            self.disk.serve(&mut ops, mem);
            for p in pending.iter_mut() {
                let len = match self.complete(p, &mut ops) {
                    Ok(n) => n,
                    Err(msg) => {
                        if self.errors.allow() {
                            tracing::warn!("virtio-blk: {msg}");
                        }
                        0
                    }
                };
                if let Err(e) = q.add_used(mem, p.head, len) {
                    if self.errors.allow() {
                        tracing::warn!("virtio-blk: cannot complete request: {e:?}");
                    }
                }
                used = true;
            }
            self.spare.extend(
                ops.into_iter()
                    .map(|o| o.buf)
                    .filter(|b| b.capacity() > 0)
                    .take(MAX_BATCH),
            );
            self.spare.truncate(MAX_BATCH);
        }
        used && wants_interrupt(q, mem)
    }
}

/// Read back and forget the file (tests).
#[cfg(test)]
impl Block {
    fn file_bytes(&mut self) -> Vec<u8> {
        let mut v = vec![0u8; (self.capacity_sectors * SECTOR_SIZE) as usize];
        self.disk.read_at(&mut v, 0).unwrap();
        v
    }
}

#[cfg(test)]
mod tests;
