//! Where a virtio disk's bytes live: a raw image file here, or (in the VMM) an NBD export.
//!
//! The device hands its backend a stream of requests ([`DiskBackend::serve_stream`]) through
//! a [`RequestFeed`]: by default the backend takes a batch, serves it whole
//! ([`DiskBackend::serve`]: a file through io_uring, all of it in flight at once) and takes
//! the next; a network backend keeps taking requests while earlier ones are on the wire, so
//! the guest's queue never waits for a whole batch's round trip. Either way the stream returns
//! only with every request it took answered (a paused device never has a request half done).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rustix::fs::FallocateFlags;
use vm_memory::io::{ReadVolatile, WriteVolatile};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::GuestMemoryMmap;

/// Guest memory a request's data sits in: (guest-physical address, length) in order.
pub type GuestSegments = [(u64, usize)];

/// Most requests taken from the guest at once by [`serve_batches`].
pub const MAX_BATCH: usize = 64;
/// Most data bytes (reads and writes) taken from the guest at once by [`serve_batches`].
pub const MAX_BATCH_BYTES: usize = 32 << 20;

/// The device's side of [`DiskBackend::serve_stream`].
pub trait RequestFeed {
    /// Requests the guest has queued, parsed, each with the device's tag for it: at most `max`
    /// of them, stopping once `max_bytes` of reads and writes are taken. None: nothing queued
    /// now, or the stream should end (someone waits for the disk).
    fn take(&mut self, max: usize, max_bytes: usize, out: &mut Vec<(usize, DiskOp)>);
    /// A request taken is finished (its `result` set): the device answers the guest at once.
    fn done(&mut self, tag: usize, op: DiskOp);
}

/// What one request asks of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOpKind {
    /// Read `len` bytes at `offset` into `buf`.
    Read,
    /// Write `buf` at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// The guest no longer needs `len` bytes at `offset` (a hint; reads may return anything
    /// the disk held, but zeros for a punched range).
    Discard,
    /// Make `len` bytes at `offset` read as zeros; `unmap` allows deallocating them.
    WriteZeroes { unmap: bool },
}

/// One request of a batch, and (after [`DiskBackend::run`]) its result.
#[derive(Debug)]
pub struct DiskOp {
    pub kind: DiskOpKind,
    pub offset: u64,
    pub len: u64,
    /// The data: filled by a read, the bytes to write for a write; empty otherwise.
    pub buf: Vec<u8>,
    /// Where in guest memory a large read or write goes straight to or from (then `buf` is
    /// empty; see [`DiskBackend::read_to_guest`]).
    pub guest: Vec<(u64, usize)>,
    pub result: io::Result<()>,
}

impl DiskOp {
    pub fn new(kind: DiskOpKind, offset: u64, len: u64, buf: Vec<u8>) -> DiskOp {
        DiskOp {
            kind,
            offset,
            len,
            buf,
            guest: Vec::new(),
            result: Ok(()),
        }
    }

    /// Serve this request on `disk` with its one-at-a-time methods.
    pub fn run_on<D: DiskBackend + ?Sized>(&mut self, disk: &mut D) -> io::Result<()> {
        match self.kind {
            DiskOpKind::Read => disk.read_at(&mut self.buf, self.offset),
            DiskOpKind::Write => disk.write_at(&self.buf, self.offset),
            DiskOpKind::Flush => disk.flush(),
            DiskOpKind::Discard => disk.discard(self.offset, self.len),
            DiskOpKind::WriteZeroes { unmap } => disk.write_zeroes(self.offset, self.len, unmap),
        }
    }
}

/// A disk's storage.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// Whether `len` bytes at `offset` are a hole (read as zeros and take no space); `false`
    /// when the backend cannot tell. A copy skips holes.
    fn is_hole(&mut self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Serve requests from `feed` until it has none and none is in flight; every request taken
    /// is handed back done. A batch at a time through [`Self::serve`] by default
    /// ([`serve_batches`]); a backend that can keep requests in flight across batches takes new
    /// ones while earlier ones are out. A flush covers every write completed before it was
    /// taken. A request may come with [`DiskOp::guest`] segments whatever
    /// [`Self::direct_min`] says (the device asks before the stream, and a disk that switches
    /// its storage may change its answer meanwhile): an override serves those too.
    fn serve_stream(&mut self, feed: &mut dyn RequestFeed, mem: &GuestMemoryMmap) {
        serve_batches(self, feed, mem);
    }

    /// Serve every request of `ops` and set each one's `result`, in any order, but a flush
    /// covers every write completed before it was issued. One at a time by default.
    fn run(&mut self, ops: &mut [DiskOp]) {
        for op in ops.iter_mut() {
            op.result = op.run_on(self);
        }
    }

    /// The smallest read or write this backend takes straight to or from guest memory
    /// ([`Self::read_to_guest`]), sparing the request the copy through a buffer; `None`: every
    /// request goes through a buffer.
    fn direct_min(&self) -> Option<usize> {
        None
    }

    /// Serve a batch in which some reads and writes (those with [`DiskOp::guest`] segments) go
    /// straight to or from guest memory; set each one's `result`. Every request is done when
    /// this returns. By default those go one by one through [`Self::read_to_guest`] and
    /// [`Self::write_from_guest`] first (so a flush of the batch covers those writes), then the
    /// rest through [`Self::run`]; a backend that can keep them all in flight does.
    fn serve(&mut self, ops: &mut [DiskOp], mem: &GuestMemoryMmap) {
        serve_each(self, ops, mem);
    }

    /// Read the bytes at `offset` into guest memory at `segs` (what it writes there is marked
    /// in the dirty bitmap, as every device write is). Through a buffer by default; a
    /// backend with [`Self::direct_min`] reads straight into guest memory.
    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; segs.iter().map(|s| s.1).sum()];
        self.read_at(&mut buf, offset)?;
        let mut at = 0;
        for &(a, n) in segs {
            mem.write_slice(&buf[at..at + n], GuestAddress(a))
                .map_err(mem_err)?;
            at += n;
        }
        Ok(())
    }

    /// Write guest memory at `segs` to `offset` (through a buffer by default).
    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        let buf = gather(mem, segs)?;
        self.write_at(&buf, offset)
    }
}

/// A lock around a disk that a stream of requests holds while it runs and gives up as soon as
/// anyone else wants the disk (a storage move starting or switching, a flush before a
/// hand-over): the stream's feed then takes nothing new, and the stream ends once what it has
/// in flight is answered. Anything but a stream locks with [`StreamLock::lock`].
pub struct StreamLock<T> {
    inner: Mutex<T>,
    /// Threads waiting in [`StreamLock::lock`].
    waiting: AtomicUsize,
}

impl<T> StreamLock<T> {
    pub fn new(v: T) -> Self {
        StreamLock {
            inner: Mutex::new(v),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The disk, for anything but a stream (which ends soon if it holds it).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// Run a stream on the disk: `f` gets it and a feed that takes nothing new once someone
    /// waits in [`Self::lock`]. Someone waiting already goes first.
    pub fn stream<R>(
        &self,
        feed: &mut dyn RequestFeed,
        f: impl FnOnce(&mut T, &mut dyn RequestFeed) -> R,
    ) -> R {
        while self.waiting.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut yielding = Yielding {
            feed,
            waiting: &self.waiting,
        };
        f(&mut g, &mut yielding)
    }
}

/// A feed that runs dry while someone waits for the disk.
struct Yielding<'a> {
    feed: &'a mut dyn RequestFeed,
    waiting: &'a AtomicUsize,
}

impl RequestFeed for Yielding<'_> {
    fn take(&mut self, max: usize, max_bytes: usize, out: &mut Vec<(usize, DiskOp)>) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            self.feed.take(max, max_bytes, out);
        }
    }
    fn done(&mut self, tag: usize, op: DiskOp) {
        self.feed.done(tag, op);
    }
}

/// [`DiskBackend::serve_stream`]'s default: take a batch (up to [`MAX_BATCH`] requests and
/// [`MAX_BATCH_BYTES`]), serve it whole through [`DiskBackend::serve`], hand it back, again.
pub fn serve_batches<D: DiskBackend + ?Sized>(
    disk: &mut D,
    feed: &mut dyn RequestFeed,
    mem: &GuestMemoryMmap,
) {
    let mut taken = Vec::new();
    loop {
        feed.take(MAX_BATCH, MAX_BATCH_BYTES, &mut taken);
        if taken.is_empty() {
            return;
        }
        let (tags, mut ops): (Vec<usize>, Vec<DiskOp>) = taken.drain(..).unzip();
        disk.serve(&mut ops, mem);
        for (tag, op) in tags.into_iter().zip(ops) {
            feed.done(tag, op);
        }
    }
}

/// [`DiskBackend::serve`]'s default: the requests on guest memory one by one, then the rest
/// together through [`DiskBackend::run`].
pub fn serve_each<D: DiskBackend + ?Sized>(
    disk: &mut D,
    ops: &mut [DiskOp],
    mem: &GuestMemoryMmap,
) {
    let mut rest = Vec::new();
    for (i, op) in ops.iter_mut().enumerate() {
        if op.guest.is_empty() {
            rest.push(i);
            continue;
        }
        op.result = match op.kind {
            DiskOpKind::Read => disk.read_to_guest(mem, &op.guest, op.offset),
            _ => disk.write_from_guest(mem, &op.guest, op.offset),
        };
    }
    if rest.len() == ops.len() {
        disk.run(ops);
        return;
    }
    let placeholder = || DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new());
    let mut batch: Vec<DiskOp> = rest
        .iter()
        .map(|&i| std::mem::replace(&mut ops[i], placeholder()))
        .collect();
    disk.run(&mut batch);
    for (op, &i) in batch.into_iter().zip(&rest) {
        ops[i] = op;
    }
}

/// Copy guest memory at `segs` out, in order.
pub fn gather(mem: &GuestMemoryMmap, segs: &GuestSegments) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; segs.iter().map(|s| s.1).sum()];
    let mut at = 0;
    for &(a, n) in segs {
        mem.read_slice(&mut buf[at..at + n], GuestAddress(a))
            .map_err(mem_err)?;
        at += n;
    }
    Ok(buf)
}

fn mem_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("guest memory: {e}"))
}

/// `segs` of guest memory as slices, in order (each within one memory region).
fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &GuestSegments,
) -> io::Result<
    Vec<vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, vm_memory::bitmap::AtomicBitmap>>>,
> {
    segs.iter()
        .map(|&(a, n)| mem.get_slice(GuestAddress(a), n).map_err(mem_err))
        .collect()
}

/// Reads and writes this large go straight between a file and guest memory (one `read(2)` after
/// a seek, no copy through a buffer); smaller ones are cheaper as one `pread` and a copy.
pub const FILE_DIRECT_MIN: usize = 64 << 10;

impl DiskBackend for File {
    fn direct_min(&self) -> Option<usize> {
        Some(FILE_DIRECT_MIN)
    }

    /// From the file's page cache straight into guest memory: one copy, by `read(2)` after a
    /// seek (the device's worker is the only one to move this file's offset; every other user
    /// of the file reads and writes at explicit offsets).
    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        let mut f: &File = self;
        f.seek(SeekFrom::Start(offset))?;
        for mut s in slices(mem, segs)? {
            f.read_exact_volatile(&mut s).map_err(mem_err)?;
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        let mut f: &File = self;
        f.seek(SeekFrom::Start(offset))?;
        for s in slices(mem, segs)? {
            f.write_all_volatile(&s).map_err(mem_err)?;
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(
            &*self,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn is_hole(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        // The next byte of data at or after `offset`: none (ENXIO) or past the range is a hole.
        match rustix::fs::seek(&*self, rustix::fs::SeekFrom::Data(offset)) {
            Ok(next) => Ok(next >= offset + len),
            Err(rustix::io::Errno::NXIO) => Ok(true),
            Err(_) => Ok(false),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let flags = if unmap {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        if rustix::fs::fallocate(&*self, flags, offset, len).is_ok() {
            return Ok(());
        }
        // No fallocate on this filesystem: write zeros.
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that always has another request queued.
    struct Endless {
        taken: usize,
        done: usize,
    }

    impl RequestFeed for Endless {
        fn take(&mut self, max: usize, _: usize, out: &mut Vec<(usize, DiskOp)>) {
            for _ in 0..max.min(4) {
                out.push((self.taken, DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new())));
                self.taken += 1;
            }
        }
        fn done(&mut self, _: usize, _: DiskOp) {
            self.done += 1;
        }
    }

    #[test]
    fn a_stream_gives_the_disk_up_when_someone_waits_for_it_with_nothing_left_in_flight() {
        let disk = std::sync::Arc::new(StreamLock::new(0u64));
        let other = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                *disk.lock() += 1_000_000;
            })
        };
        let mut feed = Endless { taken: 0, done: 0 };
        // The stream takes for as long as its feed gives, answering as it goes: it ends only
        // because the other thread wants the disk.
        disk.stream(&mut feed, |served, feed| {
            let mut ops = Vec::new();
            loop {
                feed.take(4, usize::MAX, &mut ops);
                if ops.is_empty() {
                    return;
                }
                for (tag, op) in ops.drain(..) {
                    *served += 1;
                    feed.done(tag, op);
                }
            }
        });
        other.join().unwrap();
        assert!(feed.taken > 0);
        assert_eq!(feed.taken, feed.done, "everything taken was answered");
        assert_eq!(
            *disk.lock(),
            1_000_000 + feed.taken as u64,
            "the other thread had the disk after the stream"
        );
    }
}
