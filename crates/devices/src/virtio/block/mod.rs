//! virtio-blk on a [`DiskBackend`]: a raw image file, or an NBD export (VIRTIO 1.1 §5.2).
//!
//! The device's worker thread hands the backend a stream of requests
//! ([`DiskBackend::serve_stream`]): the backend takes what the guest has queued (a file a
//! batch at a time, all of it in flight together; a network disk as many as it keeps in
//! flight, taking the next ones as earlier ones are answered), and the device answers each
//! request, and interrupts the driver if it asks, as soon as the backend is done with it. The
//! stream ends when the queues are dry and nothing is in flight, so when the transport is
//! paused (after the vCPUs, so the guest queues nothing more) no request is half done: a
//! snapshot or a migration never has to carry in-flight block requests. Read, write, flush
//! (acknowledged only once the data is on stable storage), get-id (serial), discard and
//! write-zeroes.

mod backend;
mod persist;

pub use backend::{
    gather, serve_batches, serve_each, DiskBackend, DiskOp, DiskOpKind, GuestSegments, RequestFeed,
    StreamLock, FILE_DIRECT_MIN, MAX_BATCH, MAX_BATCH_BYTES,
};
pub use persist::BlockState;

use std::io::{Read, Write};
use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::{
    read_config_bytes, wants_interrupt, GuestMemoryMmap, Interrupt, LogLimit, VirtioDevice, Wake,
    TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX,
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
    /// Everything a request is checked and answered against.
    req: Requests,
    /// Request queues offered (VIRTIO_BLK_F_MQ when more than one).
    queues: u16,
    /// The device's interrupt line, to tell the driver of completions while requests are still
    /// in flight (set by the transport; without it the transport interrupts after `process`).
    interrupt: Option<Interrupt>,
}

/// What parsing and answering requests needs, apart from the disk (which serves them while
/// this takes the next ones off the queues).
struct Requests {
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; ID_LEN],
    acked_features: u64,
    /// Data buffers kept for the next requests.
    spare: Vec<Vec<u8>>,
    /// The backend's [`DiskBackend::direct_min`], asked before each stream of requests.
    direct_min: Option<usize>,
    errors: LogLimit,
}

/// Why a request failed, turned into a status byte.
enum ReqError {
    Unsupported,
    Io,
}

/// A request taken off a queue: where its reply goes.
struct Pending<'a, B: vm_memory::bitmap::BitmapSlice> {
    head: u16,
    data: Writer<'a, B>,
    status: Writer<'a, B>,
    /// The answer it already has (`Ok(None)`: none yet, the disk's work decides it).
    answer: Result<Option<()>, ReqError>,
    /// Bytes the answer puts into guest buffers besides the status (GET_ID).
    written: u32,
}

/// The guest memory slices of the requests in flight.
type Slices<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

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
            req: Requests {
                read_only,
                capacity_sectors: len / SECTOR_SIZE,
                serial: s,
                acked_features: 0,
                spare: Vec::new(),
                direct_min: None,
                errors: LogLimit::default(),
            },
            queues: 1,
            interrupt: None,
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
        self.req.capacity_sectors
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.req.capacity_sectors.to_le_bytes());
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
}

impl Requests {
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

    /// Take one request apart: check it, copy a write's data out of the guest, and say what
    /// the backend must do for it. Returns the request, or why it is malformed (it is then
    /// dropped with nothing written).
    fn parse<'a>(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
    ) -> Result<(Pending<'a, Slices<'a>>, Option<DiskOp>), String> {
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
        let mut written = 0u32;
        // Straight to or from guest memory where the backend takes a request this large.
        let direct = |len: usize| self.direct_min.is_some_and(|m| len >= m);
        let work = match header.request_type {
            T_IN if direct(data_len) => {
                // The data: the writable bytes before the status byte.
                let segs = take_bytes(descs().filter(|d| d.2), 0, data_len);
                self.direct_op(DiskOpKind::Read, header.sector, data_len, segs)
            }
            T_OUT if direct(reader.available_bytes()) => {
                // The data: the readable bytes after the 16-byte header.
                let len = reader.available_bytes();
                let segs = take_bytes(descs().filter(|d| !d.2), 16, len);
                if self.read_only {
                    Err(ReqError::Io)
                } else {
                    self.direct_op(DiskOpKind::Write, header.sector, len, segs)
                }
            }
            T_IN => self.read_op(header.sector, data_len),
            T_OUT => self.write_op(header.sector, &mut reader),
            T_FLUSH => Ok(Some(DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()))),
            T_GET_ID => {
                let n = data_len.min(ID_LEN);
                match writer.write_all(&self.serial[..n]) {
                    Ok(()) => {
                        written = n as u32;
                        Ok(None)
                    }
                    Err(_) => Err(ReqError::Io),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => self.zero_op(header.request_type, &mut reader),
            _ => Err(ReqError::Unsupported),
        };
        let (answer, op) = match work {
            Ok(Some(op)) => (Ok(None), Some(op)),
            Ok(None) => (Ok(Some(())), None),
            Err(e) => (Err(e), None),
        };
        Ok((
            Pending {
                head,
                data: writer,
                status,
                answer,
                written,
            },
            op,
        ))
    }

    /// A large read or write that goes straight to or from guest memory at `segs`.
    fn direct_op(
        &mut self,
        kind: DiskOpKind,
        sector: u64,
        len: usize,
        segs: Vec<(u64, usize)>,
    ) -> Result<Option<DiskOp>, ReqError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        let mut op = DiskOp::new(kind, off, len as u64, Vec::new());
        op.guest = segs;
        Ok(Some(op))
    }

    fn read_op(&mut self, sector: u64, len: usize) -> Result<Option<DiskOp>, ReqError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
            return Err(ReqError::Io);
        }
        let off = self.check_range(sector, len as u64)?;
        let buf = self.buffer(len);
        Ok(Some(DiskOp::new(DiskOpKind::Read, off, len as u64, buf)))
    }

    fn write_op(
        &mut self,
        sector: u64,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<Option<DiskOp>, ReqError> {
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
        Ok(Some(DiskOp::new(DiskOpKind::Write, off, len as u64, buf)))
    }

    /// Discard / write-zeroes: one segment (max_discard_seg and max_write_zeroes_seg are 1).
    fn zero_op(
        &mut self,
        kind: u32,
        r: &mut Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<Option<DiskOp>, ReqError> {
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
        Ok(Some(DiskOp::new(k, off, len, Vec::new())))
    }

    /// Write a request's answer into the guest (`op`: what the disk did for it); returns the
    /// bytes written (for the used ring).
    fn complete(
        &mut self,
        p: &mut Pending<'_, impl vm_memory::bitmap::BitmapSlice>,
        op: Option<&DiskOp>,
    ) -> Result<u32, String> {
        let mut written = p.written;
        let result = match (&p.answer, op) {
            (Err(ReqError::Io), _) => Err(ReqError::Io),
            (Err(ReqError::Unsupported), _) => Err(ReqError::Unsupported),
            (Ok(Some(())), _) => Ok(()),
            // Nothing done for a request that needed the disk: never left unanswered.
            (Ok(None), None) => Err(ReqError::Io),
            (Ok(None), Some(op)) => {
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
        if self.req.read_only {
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
        self.req.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.req.acked_features = 0;
    }

    /// Every ready queue, whichever woke it: looking at a queue with nothing new costs a read
    /// of its index, and a notification is never missed.
    fn process(&mut self, _wake: Wake, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.req.direct_min = self.disk.direct_min();
        for q in queues.iter_mut().filter(|q| q.ready()) {
            // The driver need not notify while the device works through the queue; the
            // transport turns notifications back on once it is dry (`VirtioDevice::polls`).
            let _ = q.disable_notification(mem);
        }
        let mut feed = Feed {
            req: &mut self.req,
            unsignaled: vec![false; queues.len()],
            queues,
            mem,
            pending: Vec::new(),
            free: Vec::new(),
            next_queue: 0,
            interrupt: self.interrupt.as_ref(),
        };
        self.disk.serve_stream(&mut feed, mem);
        debug_assert!(
            feed.pending.iter().all(Option::is_none),
            "the disk returned with requests unanswered"
        );
        feed.wants_interrupt()
    }

    fn set_interrupt(&mut self, interrupt: Interrupt) {
        self.interrupt = Some(interrupt);
    }
}

/// The device's side of a stream of requests ([`DiskBackend::serve_stream`]): takes them off
/// the ready queues (in turn) and answers each as the disk finishes it.
struct Feed<'a> {
    req: &'a mut Requests,
    queues: &'a mut [Queue],
    mem: &'a GuestMemoryMmap,
    /// The requests the disk has, by tag: their queue and where their answer goes.
    pending: Vec<Option<(usize, Pending<'a, Slices<'a>>)>>,
    /// Free tags.
    free: Vec<usize>,
    /// The queue looked at first by the next `take`.
    next_queue: usize,
    /// Queues with answers the driver has not been interrupted for.
    unsignaled: Vec<bool>,
    interrupt: Option<&'a Interrupt>,
}

impl Feed<'_> {
    /// Whether the driver wants an interrupt for the answers added since the last one (asking
    /// resets each queue's count).
    fn wants_interrupt(&mut self) -> bool {
        let mut wanted = false;
        for (q, u) in self.queues.iter_mut().zip(self.unsignaled.iter_mut()) {
            if std::mem::take(u) {
                wanted |= wants_interrupt(q, self.mem);
            }
        }
        wanted
    }

    /// Put a request's answer on its queue's used ring.
    fn answer(&mut self, queue: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[queue].add_used(self.mem, head, len) {
            if self.req.errors.allow() {
                tracing::warn!("virtio-blk: cannot complete request: {e:?}");
            }
        }
        self.unsignaled[queue] = true;
    }

    /// Answer a request the disk had (or never needed).
    fn finish(&mut self, queue: usize, mut p: Pending<'_, Slices<'_>>, op: Option<&DiskOp>) {
        let len = match self.req.complete(&mut p, op) {
            Ok(n) => n,
            Err(msg) => {
                if self.req.errors.allow() {
                    tracing::warn!("virtio-blk: {msg}");
                }
                0
            }
        };
        self.answer(queue, p.head, len);
    }
}

impl RequestFeed for Feed<'_> {
    fn take(&mut self, max: usize, max_bytes: usize, out: &mut Vec<(usize, DiskOp)>) {
        // Answers given since the last take: the driver hears of them before the disk waits.
        if self.interrupt.is_some() && self.wants_interrupt() {
            if let Some(i) = self.interrupt {
                i.signal_used();
            }
        }
        let mem = self.mem;
        let n = self.queues.len();
        let (mut taken, mut bytes) = (0usize, 0usize);
        let mut dry = 0;
        // Round the ready queues, one request from each in turn, until all are dry or enough.
        while taken < max && bytes < max_bytes && dry < n {
            let qi = self.next_queue % n;
            self.next_queue = (qi + 1) % n;
            let q = &mut self.queues[qi];
            let chain = if q.ready() {
                q.pop_descriptor_chain(mem)
            } else {
                None
            };
            let Some(chain) = chain else {
                dry += 1;
                continue;
            };
            dry = 0;
            let head = chain.head_index();
            match self.req.parse(chain, mem) {
                Ok((p, Some(op))) => {
                    taken += 1;
                    if matches!(op.kind, DiskOpKind::Read | DiskOpKind::Write) {
                        bytes += op.len as usize;
                    }
                    let tag = match self.free.pop() {
                        Some(t) => {
                            self.pending[t] = Some((qi, p));
                            t
                        }
                        None => {
                            self.pending.push(Some((qi, p)));
                            self.pending.len() - 1
                        }
                    };
                    out.push((tag, op));
                }
                // Answered already (GET_ID) or refused: no disk work.
                Ok((p, None)) => self.finish(qi, p, None),
                Err(msg) => {
                    if self.req.errors.allow() {
                        tracing::warn!("virtio-blk: malformed request dropped: {msg}");
                    }
                    self.answer(qi, head, 0);
                }
            }
        }
    }

    fn done(&mut self, tag: usize, op: DiskOp) {
        let Some((queue, p)) = self.pending.get_mut(tag).and_then(Option::take) else {
            tracing::error!("virtio-blk: the disk answered request {tag}, which it did not have");
            return;
        };
        self.free.push(tag);
        self.finish(queue, p, Some(&op));
        if op.buf.capacity() > 0 && self.req.spare.len() < MAX_BATCH {
            self.req.spare.push(op.buf);
        }
    }
}

/// Read back and forget the file (tests).
#[cfg(test)]
impl Block {
    fn file_bytes(&mut self) -> Vec<u8> {
        let mut v = vec![0u8; (self.req.capacity_sectors * SECTOR_SIZE) as usize];
        self.disk.read_at(&mut v, 0).unwrap();
        v
    }
}

#[cfg(test)]
mod tests;
