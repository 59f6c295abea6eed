//! I/O mirroring: moving a running VM's disk to another image without stopping it.
//!
//! Every disk's device reaches its storage through a [`SwitchDisk`]: one lock around the
//! backend the guest uses and, while a storage move runs, a [`Mirror`] to the new copy. Then
//!
//! - every guest write, discard and write-zeroes goes to the disk the guest uses and, where it
//!   touches chunks already copied, to the copy as well: queued under the lock (so the copy
//!   takes them in the disk's order) for the copy's own writer thread ([`CopyQueue`]), and
//!   acknowledged once the disk the guest uses has it. The guest does not wait for the copy
//!   unless the queue holds more than [`QUEUE_LIMIT`] bytes (so the copy keeps up however fast
//!   the guest writes). A write the copy refuses fails the mirror, not the guest;
//! - one background pass ([`WORKERS`] chunks in flight) copies the disk chunk by chunk on its
//!   own handles, outside the lock, skipping holes and chunks that read as zeros (the copy is a
//!   new image that reads as zeros), writing an image file copy around the page cache
//!   ([`DirectWriter`]); a chunk the guest writes while it is being copied is copied again. So
//!   the copy converges whatever the guest writes: once the pass has been everywhere, the copy
//!   is the disk and stays so;
//! - a chunk the pass has not reached yet that is a hole when the guest first writes it is the
//!   guest's: its writes go to both copies as behind the pass, and the pass skips it. A guest
//!   filling empty space ahead of the pass (a new file, a database growing) never makes the
//!   pass chase it;
//! - the switch writes out the queue and flushes the copy while the guest runs, then once more
//!   under the lock (only what came in between), and swaps the two: the request after it goes
//!   to the new image. Guest I/O waits only for that (and for a full queue).
//!
//! The VM's own disk stays the truth until the switch: a failed or cancelled mirror just drops
//! the copy.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_api::{MirrorProgress, MirrorState};
use ferry_devices::virtio::block::{
    gather, serve_batches, serve_each, DiskBackend, DiskOp, DiskOpKind, GuestSegments, RequestFeed,
    StreamLock,
};
use ferry_devices::virtio::GuestMemoryMmap;

/// What the background pass copies at a time.
pub const CHUNK: u64 = 1 << 20;
/// The copy pass's workers (chunks in flight at once).
pub const WORKERS: usize = 4;
/// What O_DIRECT asks of a write's buffer, offset and length (the largest logical block size
/// of the disks a copy may sit on).
const DIRECT_ALIGN: usize = 4096;
/// How much the pass copies between flushes of the copy.
const FLUSH_EVERY: u64 = 1 << 30;
/// Guest writes queued for the copy beyond which the guest's next acknowledgement waits for
/// the copy's writer.
pub const QUEUE_LIMIT: u64 = 64 << 20;
/// The most the copy's writer takes off the queue at once.
const WRITE_BATCH: u64 = 4 << 20;
/// The largest write the copy's writer makes of adjacent queued writes.
const MERGED_WRITE: u64 = 1 << 20;
/// The most requests the copy's writer sends at once.
const MAX_BATCH: usize = 256;
/// While less than this is queued, the copy's writer waits up to [`GATHER`] for more before
/// it writes (unless a flush waits). The guest never waits for that, so the longer the wait,
/// the fewer times the writer wakes and takes a core from the guest: measured against 200 µs
/// and 256 KiB, guest write latency during a move to a folder went from 2.0-3.1x of idle
/// (single runs) to 1.82x uncapped and 1.96x at 1 Gbit/s (medians of 3; single runs up to
/// 2.5x). 5 ms did no better.
const GATHER_BYTES: u64 = 1 << 20;
const GATHER: Duration = Duration::from_millis(2);

/// A disk's storage as its device reaches it: switchable, and mirrored during a storage move.
#[derive(Clone)]
pub struct SwitchDisk {
    inner: Arc<StreamLock<Slot>>,
}

struct Slot {
    disk: Box<dyn DiskBackend>,
    size: u64,
    mirror: Option<Mirror>,
}

/// A copy in the making.
struct Mirror {
    /// Guest writes on their way to the copy.
    queue: Arc<CopyQueue>,
    /// The copy's writer thread; it hands the copy back when the queue closes.
    writer: Option<JoinHandle<Box<dyn DiskBackend>>>,
    source_path: PathBuf,
    target_path: PathBuf,
    /// One bit per chunk: copied (or skipped) by the background pass.
    done: Vec<u64>,
    /// One bit per chunk the guest wrote before the pass reached it: looked at then.
    checked: Vec<u64>,
    /// One bit per chunk that was a hole when the guest first wrote it: every guest write to
    /// it goes to the copy (which reads as zeros elsewhere), and the pass leaves it alone.
    holes: Vec<u64>,
    /// The next chunk the pass looks at.
    next: u64,
    chunks: u64,
    copied: u64,
    skipped: u64,
    started: Instant,
    error: Option<String>,
    stop: Arc<AtomicBool>,
    /// The chunks the pass's workers are copying now, each with whether a guest write touched
    /// it meanwhile.
    in_flight: Vec<(u64, bool)>,
    /// Chunks done by the pass.
    done_count: u64,
    /// The pass's workers still running.
    workers: usize,
    /// The pass is through and the copy flushed.
    ready: bool,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
    }
}

impl Mirror {
    /// Whether guest writes to chunk `c` go to the copy: copied already, or a hole the guest
    /// writes to both.
    fn reaches_copy(&self, c: u64) -> bool {
        bit(&self.done, c) || bit(&self.holes, c)
    }

    /// Before `ops` run on `disk`: each chunk they change that the pass has not reached and
    /// nothing has changed since the mirror started is looked at once; a hole then has the
    /// copy (zeros) in step with the disk, and from now on gets every write on both.
    fn note_holes(&mut self, disk: &mut dyn DiskBackend, size: u64, ops: &[DiskOp]) {
        for o in ops {
            if matches!(o.kind, DiskOpKind::Read | DiskOpKind::Flush) || o.offset >= size {
                continue;
            }
            let last = (o.offset + o.len.max(1) - 1).min(size - 1) / CHUNK;
            for c in o.offset / CHUNK..=last {
                if bit(&self.done, c)
                    || bit(&self.checked, c)
                    || self.in_flight.iter().any(|(x, _)| *x == c)
                {
                    continue;
                }
                set_bit(&mut self.checked, c);
                let len = CHUNK.min(size - c * CHUNK);
                if disk.is_hole(c * CHUNK, len).unwrap_or(false) {
                    set_bit(&mut self.holes, c);
                }
            }
        }
    }

    /// Whether chunk `c` (in flight) was written since it was last asked; clears the mark.
    fn clear_dirtied(&mut self, c: u64) -> bool {
        match self.in_flight.iter_mut().find(|(x, _)| *x == c) {
            Some((_, d)) => std::mem::replace(d, false),
            None => false,
        }
    }

    fn set_done(&mut self, chunk: u64) {
        set_bit(&mut self.done, chunk);
    }

    /// Why the copy failed, if it did (the pass or the copy's writer).
    fn failure(&self) -> Option<String> {
        self.error.clone().or_else(|| self.queue.error())
    }

    /// The parts of `op` (done on the disk) that fall in chunks already copied or mirrored
    /// holes: those must reach the copy; elsewhere the pass copies the chunk from the disk
    /// later, or again if it is copying it now.
    fn copied_parts(&self, op: &DiskOp, out: &mut Vec<DiskOp>) {
        let end = op.offset + op.len;
        let mut c = op.offset / CHUNK;
        while c < self.chunks && c * CHUNK < end {
            if !self.reaches_copy(c) {
                c += 1;
                continue;
            }
            // A run of such chunks.
            let first = c;
            while c < self.chunks && c * CHUNK < end && self.reaches_copy(c) {
                c += 1;
            }
            let a = (first * CHUNK).max(op.offset);
            let b = (c * CHUNK).min(end);
            let buf = match op.kind {
                DiskOpKind::Write => {
                    op.buf[(a - op.offset) as usize..(b - op.offset) as usize].to_vec()
                }
                _ => Vec::new(),
            };
            out.push(DiskOp::new(op.kind, a, b - a, buf));
        }
    }

    fn progress(&self, disk: usize, size: u64) -> MirrorProgress {
        MirrorProgress {
            disk,
            source: self.source_path.clone(),
            target: self.target_path.clone(),
            state: if self.failure().is_some() {
                MirrorState::Failed
            } else if self.ready {
                MirrorState::Ready
            } else {
                MirrorState::Copying
            },
            total_bytes: size,
            done_bytes: (self.done_count * CHUNK).min(size),
            copied_bytes: self.copied,
            skipped_bytes: self.skipped,
            mirrored_bytes: self.queue.written(),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            error: self.failure(),
        }
    }
}

impl SwitchDisk {
    pub fn new(disk: Box<dyn DiskBackend>) -> io::Result<SwitchDisk> {
        let size = disk.size()?;
        Ok(SwitchDisk {
            inner: Arc::new(StreamLock::new(Slot {
                disk,
                size,
                mirror: None,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.inner.lock()
    }

    /// Start mirroring to `target` (same size, reads as zeros) and its background pass.
    pub fn start_mirror(
        &self,
        disk: usize,
        target: Box<dyn DiskBackend>,
        handles: Vec<(Box<dyn DiskBackend>, Box<dyn DiskBackend>)>,
        source_path: PathBuf,
        target_path: PathBuf,
        bandwidth_mbit: u64,
    ) -> io::Result<()> {
        let mut g = self.lock();
        if g.mirror.is_some() {
            return Err(io::Error::other(format!(
                "disk {disk} is already being copied; cancel that first"
            )));
        }
        let tsize = target.size()?;
        if tsize != g.size {
            return Err(io::Error::other(format!(
                "the copy {} is {tsize} bytes, the disk {} is {}: they must be the same size",
                target_path.display(),
                source_path.display(),
                g.size
            )));
        }
        let chunks = g.size.div_ceil(CHUNK);
        let stop = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(CopyQueue::default());
        let q = queue.clone();
        let writer = std::thread::Builder::new()
            .name(format!("mirror{disk}.w"))
            .spawn(move || q.write_to(target))?;
        g.mirror = Some(Mirror {
            queue,
            writer: Some(writer),
            source_path,
            target_path,
            done: vec![0; chunks.div_ceil(64) as usize],
            checked: vec![0; chunks.div_ceil(64) as usize],
            holes: vec![0; chunks.div_ceil(64) as usize],
            next: 0,
            chunks,
            copied: 0,
            skipped: 0,
            started: Instant::now(),
            error: None,
            stop: stop.clone(),
            in_flight: Vec::new(),
            done_count: 0,
            workers: handles.len(),
            ready: false,
        });
        drop(g);
        // Several workers, so several chunks are in flight (each gets its share of the cap).
        let n = handles.len().max(1) as u64;
        for (i, (reader, writer)) in handles.into_iter().enumerate() {
            let (me, stop) = (self.clone(), stop.clone());
            let mbit = bandwidth_mbit.div_ceil(n);
            let spawned = std::thread::Builder::new()
                .name(format!("mirror{disk}.{i}"))
                .spawn(move || me.copy_pass(stop, mbit, reader, writer));
            if let Err(e) = spawned {
                self.cancel_mirror();
                return Err(e);
            }
        }
        Ok(())
    }

    /// One worker of the background pass: chunk by chunk, on its own handles of the two disks
    /// (`reader` of the disk, `writer` of the copy) and outside the lock, so guest I/O never
    /// waits for a chunk: a chunk the guest wrote while it was being copied is copied again
    /// (after a few tries, under the lock, so the pass always gets through). At most `mbit`
    /// Mbit/s of copied data when not 0 (holes cost nothing). The copy is flushed as the pass
    /// goes, and by the last worker at its end, so the switch's own flush finds little to do.
    fn copy_pass(
        &self,
        stop: Arc<AtomicBool>,
        mbit: u64,
        mut reader: Box<dyn DiskBackend>,
        mut writer: Box<dyn DiskBackend>,
    ) {
        let r = self.copy_chunks(&stop, mbit, &mut *reader, &mut *writer);
        let mut g = self.lock();
        let Some(m) = g.mirror.as_mut() else { return };
        if !Arc::ptr_eq(&m.stop, &stop) {
            return; // a later mirror: this worker's was cancelled
        }
        if let Err(e) = r {
            tracing::warn!("{e}");
            m.error.get_or_insert(e);
        }
        m.workers -= 1;
        if m.workers > 0 || m.failure().is_some() || m.done_count < m.chunks {
            return;
        }
        // The last worker, the pass through: make the copy durable (outside the lock).
        drop(g);
        let r = writer.flush();
        let mut g = self.lock();
        if let Some(m) = g.mirror.as_mut() {
            match r {
                Ok(()) => m.ready = true,
                Err(e) => {
                    m.error = Some(format!(
                        "flushing the copy {}: {e}",
                        m.target_path.display()
                    ))
                }
            }
        }
    }

    /// Copy chunks until there are none left (or the mirror stops or fails).
    fn copy_chunks(
        &self,
        stop: &AtomicBool,
        mbit: u64,
        reader: &mut dyn DiskBackend,
        writer: &mut dyn DiskBackend,
    ) -> Result<(), String> {
        // Aligned, so a copy written around the page cache takes it as it is.
        let mut whole = vec![0u8; CHUNK as usize + DIRECT_ALIGN];
        let at = whole.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut whole[at..at + CHUNK as usize];
        let start = Instant::now();
        let mut sent = 0u64;
        let mut unflushed = 0u64;
        loop {
            if mbit > 0 {
                let due =
                    std::time::Duration::from_secs_f64(sent as f64 * 8.0 / (mbit as f64 * 1e6));
                while start.elapsed() < due && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(
                        (due - start.elapsed()).min(std::time::Duration::from_millis(50)),
                    );
                }
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Take the next chunk.
            let (c, off, len, names) = {
                let mut g = self.lock();
                let size = g.size;
                let Some(m) = g.mirror.as_mut() else {
                    return Ok(());
                };
                if m.failure().is_some() {
                    return Ok(());
                }
                // Holes the guest writes to both copies are not the pass's.
                while m.next < m.chunks && bit(&m.holes, m.next) {
                    let c = m.next;
                    m.next += 1;
                    m.set_done(c);
                    m.done_count += 1;
                    m.skipped += CHUNK.min(size - c * CHUNK);
                }
                if m.next >= m.chunks {
                    return Ok(());
                }
                let c = m.next;
                m.next += 1;
                m.in_flight.push((c, false));
                let off = c * CHUNK;
                (
                    c,
                    off,
                    CHUNK.min(size - off),
                    (m.source_path.clone(), m.target_path.clone()),
                )
            };
            let buf = &mut buf[..len as usize];
            let mut tries = 0u32;
            let copied = loop {
                let again = tries > 0;
                let r = if tries >= 3 {
                    // The guest keeps writing this chunk: copy it under the lock this time.
                    let mut g = self.lock();
                    let r = copy_chunk(reader, writer, off, buf, true);
                    if let Some(m) = g.mirror.as_mut() {
                        m.clear_dirtied(c);
                    }
                    drop(g);
                    r
                } else {
                    copy_chunk(reader, writer, off, buf, again)
                };
                let copied = r.map_err(|e| {
                    format!(
                        "copying {} at {off} to {}: {e}",
                        names.0.display(),
                        names.1.display()
                    )
                })?;
                // Done, unless the guest wrote the chunk meanwhile.
                let mut g = self.lock();
                let Some(m) = g.mirror.as_mut() else {
                    return Ok(());
                };
                if m.clear_dirtied(c) {
                    tries += 1;
                    continue;
                }
                m.in_flight.retain(|(x, _)| *x != c);
                m.set_done(c);
                m.done_count += 1;
                if copied {
                    m.copied += len;
                } else {
                    m.skipped += len;
                }
                break copied;
            };
            if copied {
                sent += len;
                unflushed += len;
            }
            if unflushed >= FLUSH_EVERY {
                unflushed = 0;
                writer
                    .flush()
                    .map_err(|e| format!("flushing the copy {}: {e}", names.1.display()))?;
            }
        }
    }

    /// The mirror's progress, if one runs.
    pub fn mirror_progress(&self, disk: usize) -> Option<MirrorProgress> {
        let g = self.lock();
        g.mirror.as_ref().map(|m| m.progress(disk, g.size))
    }

    /// Make the copy durable while it stays in step, if it is complete and whole.
    pub fn flush_mirror(&self, disk: usize) -> io::Result<()> {
        let mut g = self.lock();
        let size = g.size;
        let Some(m) = g.mirror.as_mut() else {
            return Err(io::Error::other(format!("disk {disk} is not being copied")));
        };
        if let Some(e) = m.failure() {
            return Err(io::Error::other(format!("disk {disk}'s copy failed: {e}")));
        }
        if !m.ready {
            return Err(io::Error::other(format!(
                "disk {disk}'s copy is not complete ({} of {size} bytes)",
                (m.done_count * CHUNK).min(size)
            )));
        }
        m.queue
            .sync()
            .map_err(|e| io::Error::other(format!("disk {disk}'s copy failed: {e}")))
    }

    /// Write what the guest wrote to the copy and flush it, while the guest runs, a few times
    /// over while it writes meanwhile: a switch or a migration's pause right after finds
    /// little left to do. A failure shows in the progress (and fails the switch).
    pub fn sync_mirror(&self) {
        let Some(q) = self.lock().mirror.as_ref().map(|m| m.queue.clone()) else {
            return;
        };
        for _ in 0..3 {
            let t = Instant::now();
            if q.sync().is_err() || t.elapsed() < Duration::from_millis(1) {
                return;
            }
        }
    }

    /// Drop the copy; the disk stays as it is.
    pub fn cancel_mirror(&self) -> bool {
        let m = self.lock().mirror.take();
        match m {
            // The pass stops, the queue is dropped; the copy is closed once its writer's
            // last batch is through.
            Some(mut m) => {
                let _ = m.finish();
                true
            }
            None => false,
        }
    }

    /// Switch to the copy, if it is complete: flush it, swap it in. Returns the old backend
    /// (to close), the final progress, and how long guest I/O waited.
    pub fn switch(
        &self,
        disk: usize,
    ) -> io::Result<(Box<dyn DiskBackend>, MirrorProgress, std::time::Duration)> {
        self.sync_mirror();
        let mut g = self.lock();
        let t = Instant::now();
        let size = g.size;
        let Some(m) = g.mirror.as_mut() else {
            return Err(io::Error::other(format!("disk {disk} is not being copied")));
        };
        if let Some(e) = m.failure() {
            return Err(io::Error::other(format!("the copy failed: {e}")));
        }
        if !m.ready {
            return Err(io::Error::other(format!(
                "the copy is not complete yet ({} of {} bytes)",
                (m.done_count * CHUNK).min(size),
                size
            )));
        }
        // Everything the guest had acknowledged is on the old disk; write the rest of it to the
        // new one and make it durable there before the guest may depend on it.
        m.queue
            .sync()
            .map_err(|e| io::Error::other(format!("the copy failed: {e}")))?;
        let progress = m.progress(disk, size);
        let mut m = g.mirror.take().expect("checked above");
        let target = m
            .finish()
            .ok_or_else(|| io::Error::other("the copy's writer is gone"))?;
        let old = std::mem::replace(&mut g.disk, target);
        Ok((old, progress, t.elapsed()))
    }

    /// See [`Mirror::note_holes`].
    fn note_holes(slot: &mut Slot, ops: &[DiskOp]) {
        if let Some(m) = slot.mirror.as_mut() {
            m.note_holes(&mut *slot.disk, slot.size, ops);
        }
    }

    /// Queue what `ops` changed for the copy (they ran on the disk already). Returns the queue
    /// if it is over [`QUEUE_LIMIT`]: the caller waits for room, without the lock, before it
    /// acknowledges the requests.
    fn mirror_ops(slot: &mut Slot, ops: &[DiskOp]) -> Option<Arc<CopyQueue>> {
        let m = slot.mirror.as_mut()?;
        let changes = || {
            ops.iter().filter(|o| {
                o.result.is_ok() && !matches!(o.kind, DiskOpKind::Read | DiskOpKind::Flush)
            })
        };
        // A write into the chunk the pass is copying: the pass copies that chunk again.
        for (c, dirtied) in m.in_flight.iter_mut() {
            let (a, b) = (*c * CHUNK, (*c + 1) * CHUNK);
            if changes().any(|o| o.offset < b && o.offset + o.len.max(1) > a) {
                *dirtied = true;
            }
        }
        let mut out = Vec::new();
        for o in changes() {
            m.copied_parts(o, &mut out);
        }
        if out.is_empty() {
            return None;
        }
        m.queue.push(out).then(|| m.queue.clone())
    }

    /// Finish the guest's requests once the copy's queue has room again.
    fn wait_for_room(full: Option<Arc<CopyQueue>>) {
        if let Some(q) = full {
            q.wait_for_room();
        }
    }
}

impl Mirror {
    /// Stop the pass and the copy's writer; the copy's handle, once the writer is through.
    fn finish(&mut self) -> Option<Box<dyn DiskBackend>> {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.close();
        let (waits, waited) = {
            let s = self.queue.state();
            (s.waits, s.waited)
        };
        tracing::info!(
            "copy of {} to {}: the guest's writes waited {waits} times for the copy, {waited:?} in all",
            self.source_path.display(),
            self.target_path.display()
        );
        self.writer.take()?.join().ok()
    }
}

/// Guest writes on their way to the copy, in the order they reached the disk, and the copy's
/// writer thread that takes them off ([`CopyQueue::write_to`]).
#[derive(Default)]
struct CopyQueue {
    state: Mutex<Queued>,
    /// The writer waits here for work.
    work: Condvar,
    /// Guests waiting for room and syncs waiting for the writer wait here.
    progress: Condvar,
}

#[derive(Default)]
struct Queued {
    ops: VecDeque<DiskOp>,
    /// Bytes of data queued or being written.
    bytes: u64,
    /// Requests queued so far, and of those the ones written (or dropped after a failure).
    pushed: u64,
    finished: u64,
    closed: bool,
    error: Option<String>,
    /// Bytes of guest writes the copy has.
    written: u64,
    /// How often, and how long in all, the guest waited for room in the queue.
    waits: u64,
    waited: Duration,
    /// The writer waits for work with nothing queued (a push wakes it; otherwise it has
    /// work, or gathers some, and needs no wake-up: that saves a system call a write).
    idle: bool,
    /// Flushes queued and not yet written: the writer gathers nothing while one waits.
    syncs: usize,
    /// Threads waiting on `progress`.
    waiting: usize,
}

impl CopyQueue {
    fn state(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `ops` for the copy; whether the queue is over [`QUEUE_LIMIT`] now. Nothing is
    /// queued once the copy failed (the mirror has failed then) or closed.
    fn push(&self, ops: Vec<DiskOp>) -> bool {
        let mut s = self.state();
        if s.error.is_some() || s.closed {
            return false;
        }
        for o in ops {
            s.bytes += o.buf.len() as u64;
            s.pushed += 1;
            s.ops.push_back(o);
        }
        if s.idle {
            self.work.notify_one();
        }
        s.bytes > QUEUE_LIMIT
    }

    /// Wait on `progress` (counted, so the writer wakes only threads that wait).
    fn wait_progress<'a>(&self, mut s: MutexGuard<'a, Queued>) -> MutexGuard<'a, Queued> {
        s.waiting += 1;
        s = self.progress.wait(s).unwrap_or_else(|p| p.into_inner());
        s.waiting -= 1;
        s
    }

    fn wait_for_room(&self) {
        let t = Instant::now();
        let mut s = self.state();
        if s.bytes <= QUEUE_LIMIT || s.error.is_some() || s.closed {
            return;
        }
        while s.bytes > QUEUE_LIMIT && s.error.is_none() && !s.closed {
            s = self.wait_progress(s);
        }
        s.waits += 1;
        s.waited += t.elapsed();
    }

    /// Write everything queued so far to the copy and flush it.
    fn sync(&self) -> Result<(), String> {
        let mut s = self.state();
        if let Some(e) = &s.error {
            return Err(e.clone());
        }
        s.ops
            .push_back(DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()));
        s.pushed += 1;
        s.syncs += 1;
        let mine = s.pushed;
        self.work.notify_one();
        while s.finished < mine && s.error.is_none() && !s.closed {
            s = self.wait_progress(s);
        }
        match (&s.error, s.finished >= mine) {
            (Some(e), _) => Err(e.clone()),
            (None, true) => Ok(()),
            (None, false) => Err("the copy was dropped".into()),
        }
    }

    fn close(&self) {
        self.state().closed = true;
        self.work.notify_all();
        self.progress.notify_all();
    }

    fn error(&self) -> Option<String> {
        self.state().error.clone()
    }

    fn written(&self) -> u64 {
        self.state().written
    }

    /// The copy's writer: queued requests a batch at a time (adjacent writes made one), until
    /// the queue closes; then the copy's handle goes back to whoever closed it. The first
    /// failure fails the copy: what is queued then is dropped.
    fn write_to(&self, mut target: Box<dyn DiskBackend>) -> Box<dyn DiskBackend> {
        // Should the writer ever die, nobody waits for it forever: the copy fails.
        struct Gone<'a>(&'a CopyQueue);
        impl Drop for Gone<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.fail("the copy's writer stopped".into());
                }
            }
        }
        let _gone = Gone(self);
        loop {
            let (mut batch, taken, bytes) = {
                let mut s = self.state();
                while s.ops.is_empty() && !s.closed {
                    s.idle = true;
                    s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                    s.idle = false;
                }
                // A little gathering: the guest's small writes then go as a few large ones.
                if s.bytes < GATHER_BYTES && s.syncs == 0 && !s.closed {
                    s = self
                        .work
                        .wait_timeout(s, GATHER)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if s.closed {
                    return target;
                }
                let b = take_batch(&mut s.ops);
                s.syncs -= b.0.iter().filter(|o| o.kind == DiskOpKind::Flush).count();
                b
            };
            target.run(&mut batch);
            let mut s = self.state();
            s.bytes -= bytes;
            s.finished += taken;
            for o in &batch {
                match &o.result {
                    Ok(()) if o.kind == DiskOpKind::Write => s.written += o.len,
                    Ok(()) => {}
                    Err(e) if s.error.is_none() => {
                        let e = format!("writing to the copy at {}: {e}", o.offset);
                        tracing::warn!("{e}");
                        s.error = Some(e);
                    }
                    Err(_) => {}
                }
            }
            if s.error.is_some() {
                drop_all(&mut s);
            }
            if s.waiting > 0 {
                self.progress.notify_all();
            }
        }
    }

    /// Fail the copy: what is queued is dropped, whoever waits for it is told.
    fn fail(&self, e: String) {
        let mut s = self.state();
        s.error.get_or_insert(e);
        drop_all(&mut s);
        self.progress.notify_all();
    }
}

/// Drop what is queued (the copy failed): every request counts as finished.
fn drop_all(s: &mut Queued) {
    let dropped = std::mem::take(&mut s.ops);
    s.finished += dropped.len() as u64;
    s.bytes = 0;
    s.syncs = 0;
}

/// The next requests off `queue`, writes that follow one another made one (up to
/// [`MERGED_WRITE`]): the batch, how many queued requests it holds, and their bytes. A backend
/// may run a batch's requests in any order, so a batch ends before a request that overlaps one
/// in it, and after a flush; and at [`WRITE_BATCH`] bytes or [`MAX_BATCH`] requests.
fn take_batch(queue: &mut VecDeque<DiskOp>) -> (Vec<DiskOp>, u64, u64) {
    let (mut batch, mut taken, mut bytes): (Vec<DiskOp>, u64, u64) = (Vec::new(), 0, 0);
    while let Some(o) = queue.front() {
        let overlaps =
            |p: &DiskOp| p.offset < o.offset + o.len.max(1) && o.offset < p.offset + p.len.max(1);
        if !batch.is_empty()
            && (bytes + o.buf.len() as u64 > WRITE_BATCH
                || batch.len() >= MAX_BATCH
                || batch.iter().any(overlaps))
        {
            break;
        }
        let o = queue.pop_front().expect("looked at it");
        taken += 1;
        bytes += o.buf.len() as u64;
        let flush = o.kind == DiskOpKind::Flush;
        match batch.last_mut() {
            Some(p)
                if p.kind == DiskOpKind::Write
                    && o.kind == DiskOpKind::Write
                    && p.offset + p.len == o.offset
                    && p.len + o.len <= MERGED_WRITE =>
            {
                p.buf.extend_from_slice(&o.buf);
                p.len += o.len;
            }
            _ => batch.push(o),
        }
        if flush {
            break;
        }
    }
    (batch, taken, bytes)
}

fn bit(v: &[u64], i: u64) -> bool {
    v[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn set_bit(v: &mut [u64], i: u64) {
    v[(i / 64) as usize] |= 1 << (i % 64);
}

/// Copy one chunk; `Ok(false)` when it was a hole or zeros (the copy reads as zeros already,
/// unless an earlier try of this chunk wrote it: `again` zeroes it then).
fn copy_chunk(
    from: &mut dyn DiskBackend,
    to: &mut dyn DiskBackend,
    off: u64,
    buf: &mut [u8],
    again: bool,
) -> io::Result<bool> {
    let len = buf.len() as u64;
    let zeros = from.is_hole(off, len)? || {
        from.read_at(buf, off)?;
        buf.iter().all(|b| *b == 0)
    };
    if zeros {
        if again {
            to.write_zeroes(off, len, false)?;
        }
        return Ok(false);
    }
    to.write_at(buf, off)?;
    Ok(true)
}

/// The pass's handle on a copy that is an image file: aligned writes (whole chunks) go around
/// the page cache (O_DIRECT), so copying a large disk neither spends the CPU on filling the
/// page cache nor evicts the host's working set from it; everything else, and a flush, goes
/// through the ordinary handle. The pass writes only chunks no guest write has reached on the
/// copy, and the copy's writer only chunks the pass is done with, so the two never meet.
pub struct DirectWriter {
    direct: File,
    file: File,
}

impl DirectWriter {
    /// `None` where the copy's file system takes no O_DIRECT (tmpfs): use `file` alone then.
    pub fn open(path: &std::path::Path, file: &File) -> io::Result<Option<DirectWriter>> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = match File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(DirectWriter {
            direct,
            file: file.try_clone()?,
        }))
    }
}

impl DiskBackend for DirectWriter {
    fn size(&self) -> io::Result<u64> {
        DiskBackend::size(&self.file)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        DiskBackend::read_at(&mut self.file, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned =
            (buf.as_ptr() as usize | buf.len() | offset as usize).is_multiple_of(DIRECT_ALIGN);
        if aligned {
            match self.direct.write_all_at(buf, offset) {
                // Finer alignment asked after all: the ordinary way.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        DiskBackend::write_at(&mut self.file, buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        DiskBackend::flush(&mut self.file)
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        DiskBackend::discard(&mut self.file, offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        DiskBackend::write_zeroes(&mut self.file, offset, len, unmap)
    }
    fn is_hole(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        DiskBackend::is_hole(&mut self.file, offset, len)
    }
}

impl DiskBackend for SwitchDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().size)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.lock().disk.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut ops = [DiskOp::new(
            DiskOpKind::Write,
            offset,
            buf.len() as u64,
            buf.to_vec(),
        )];
        self.run(&mut ops);
        let [op] = ops;
        op.result
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock().disk.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut ops = [DiskOp::new(DiskOpKind::Discard, offset, len, Vec::new())];
        self.run(&mut ops);
        let [op] = ops;
        op.result
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mut ops = [DiskOp::new(
            DiskOpKind::WriteZeroes { unmap },
            offset,
            len,
            Vec::new(),
        )];
        self.run(&mut ops);
        let [op] = ops;
        op.result
    }
    fn is_hole(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        self.lock().disk.is_hole(offset, len)
    }
    fn run(&mut self, ops: &mut [DiskOp]) {
        let mut g = self.lock();
        Self::note_holes(&mut g, ops);
        g.disk.run(ops);
        let full = Self::mirror_ops(&mut g, ops);
        drop(g);
        Self::wait_for_room(full);
    }
    fn direct_min(&self) -> Option<usize> {
        self.lock().disk.direct_min()
    }
    /// With no mirror, the stream goes to the disk (which keeps its requests in flight as it
    /// can) until someone else wants the disk (a mirror starting, the switch); while a mirror
    /// runs, a batch at a time, each write to both copies.
    fn serve_stream(&mut self, feed: &mut dyn RequestFeed, mem: &GuestMemoryMmap) {
        let mirrored = self.inner.stream(feed, |g, feed| {
            if g.mirror.is_some() {
                return true;
            }
            g.disk.serve_stream(feed, mem);
            false
        });
        if mirrored {
            serve_batches(self, feed, mem);
        }
    }
    /// With no mirror, the batch goes to the disk as one (all in flight where it can); while
    /// a mirror runs, request by request, each write to both copies.
    fn serve(&mut self, ops: &mut [DiskOp], mem: &GuestMemoryMmap) {
        {
            let mut g = self.lock();
            if g.mirror.is_none() {
                g.disk.serve(ops, mem);
                return;
            }
        }
        serve_each(self, ops, mem);
    }
    /// Reads come from the disk the guest uses, mirror or not (the backend it has now: a
    /// switch between the device's check and this read is fine, every backend can).
    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        self.lock().disk.read_to_guest(mem, segs, offset)
    }
    /// Writes go straight to the disk, or, while a mirror runs, to the disk and the copy's
    /// queue as every write does then.
    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        let mut g = self.lock();
        if g.mirror.is_none() {
            return g.disk.write_from_guest(mem, segs, offset);
        }
        let buf = gather(mem, segs)?;
        let mut ops = [DiskOp::new(
            DiskOpKind::Write,
            offset,
            buf.len() as u64,
            buf,
        )];
        Self::note_holes(&mut g, &ops);
        g.disk.run(&mut ops);
        let full = Self::mirror_ops(&mut g, &ops);
        drop(g);
        Self::wait_for_room(full);
        let [op] = ops;
        op.result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::AtomicU64;

    fn image(dir: &std::path::Path, name: &str, size: u64) -> (PathBuf, File) {
        let p = dir.join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(size).unwrap();
        (p, f)
    }

    /// The pass's handles, as the VMM makes them: the copy written around the page cache where
    /// the temporary directory's file system can.
    fn two(a: &File, b: &File, bp: &Path) -> Vec<(Box<dyn DiskBackend>, Box<dyn DiskBackend>)> {
        (0..WORKERS)
            .map(|_| {
                let w: Box<dyn DiskBackend> = match DirectWriter::open(bp, b).unwrap() {
                    Some(d) => Box::new(d),
                    None => Box::new(b.try_clone().unwrap()),
                };
                let h: (Box<dyn DiskBackend>, Box<dyn DiskBackend>) =
                    (Box::new(a.try_clone().unwrap()), w);
                h
            })
            .collect()
    }

    fn wait_ready(d: &SwitchDisk) -> MirrorProgress {
        loop {
            let p = d.mirror_progress(0).unwrap();
            if p.state != MirrorState::Copying {
                return p;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn copy_converges_with_writes_during_the_pass_and_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * CHUNK;
        let (sp, src) = image(dir.path(), "a", size);
        // Data in a few chunks; the rest is a hole.
        for c in [0u64, 5, 33, 63] {
            src.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
                .unwrap();
        }
        let (tp, dst) = image(dir.path(), "b", size);
        let mut d = SwitchDisk::new(Box::new(src.try_clone().unwrap())).unwrap();
        let handles = two(&src, &dst, &tp);
        d.start_mirror(0, Box::new(dst.try_clone().unwrap()), handles, sp, tp, 0)
            .unwrap();
        // Writes everywhere while the pass runs: before it, behind it, across chunks.
        let half = size / 2 - 8192;
        for i in 0..400u64 {
            let off = (i * 7919 * 4096) % half;
            d.write_at(&[(i % 251) as u8 + 1; 8192], off).unwrap();
            if i == 200 {
                // Let the pass get going, so the rest land behind it too.
                while d.mirror_progress(0).unwrap().done_bytes < 8 * CHUNK {
                    std::thread::yield_now();
                }
            }
        }
        d.write_zeroes(5 * CHUNK, 4096, false).unwrap();
        let p = wait_ready(&d);
        assert_eq!(p.state, MirrorState::Ready, "{p:?}");
        assert!(p.skipped_bytes >= 20 * CHUNK, "holes were skipped: {p:?}");
        assert!(
            p.mirrored_bytes > 0,
            "writes behind the pass reached the copy: {p:?}"
        );
        // After the pass, writes still reach both.
        d.write_at(&[0xee; 4096], 40 * CHUNK).unwrap();
        let (_, p, _) = d.switch(0).unwrap();
        assert_eq!(p.done_bytes, size);
        let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        src.read_exact_at(&mut a, 0).unwrap();
        dst.read_exact_at(&mut b, 0).unwrap();
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            panic!(
                "the copy differs at {i} (chunk {}): {} vs {}",
                i as u64 / CHUNK,
                a[i],
                b[i]
            );
        }
        // The device now writes the new image only.
        d.write_at(&[0x11; 512], 0).unwrap();
        let mut x = [0u8; 512];
        dst.read_exact_at(&mut x, 0).unwrap();
        assert_eq!(x, [0x11; 512]);
        src.read_exact_at(&mut x, 0).unwrap();
        assert_ne!(x, [0x11; 512]);
    }

    #[test]
    fn a_writer_racing_the_pass_never_leaves_the_copy_behind() {
        let dir = tempfile::tempdir().unwrap();
        let size = 48 * CHUNK;
        let (sp, src) = image(dir.path(), "a", size);
        for c in 0..48u64 {
            if c % 3 != 0 {
                src.write_all_at(&vec![c as u8 + 1; CHUNK as usize], c * CHUNK)
                    .unwrap();
            }
        }
        let (tp, dst) = image(dir.path(), "b", size);
        let d = SwitchDisk::new(Box::new(src.try_clone().unwrap())).unwrap();
        d.start_mirror(
            0,
            Box::new(dst.try_clone().unwrap()),
            two(&src, &dst, &tp),
            sp,
            tp,
            0,
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (mut w, s2) = (d.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut x = 12345u64;
            while !s2.load(Ordering::SeqCst) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 20) % (size - 3 * CHUNK);
                match x % 5 {
                    // Writes across chunk boundaries, whole chunks zeroed, small writes.
                    0 => w
                        .write_zeroes(off / CHUNK * CHUNK, CHUNK, x.is_multiple_of(2))
                        .unwrap(),
                    1 => w
                        .write_at(&vec![(x >> 8) as u8 | 1; 3 * 4096], off)
                        .unwrap(),
                    _ => w
                        .write_at(&[(x >> 16) as u8; 512], off / 512 * 512)
                        .unwrap(),
                }
            }
        });
        let p = wait_ready(&d);
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert_eq!(p.state, MirrorState::Ready, "{p:?}");
        d.switch(0).unwrap();
        let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        src.read_exact_at(&mut a, 0).unwrap();
        dst.read_exact_at(&mut b, 0).unwrap();
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            panic!("the copy differs at {i} (chunk {})", i as u64 / CHUNK);
        }
    }

    #[test]
    fn switch_refused_until_complete_and_cancel_keeps_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (sp, src) = image(dir.path(), "a", 4 * CHUNK);
        let (tp, dst) = image(dir.path(), "b", 4 * CHUNK);
        let (_, small) = image(dir.path(), "c", CHUNK);
        let src2 = src.try_clone().unwrap();
        let d = SwitchDisk::new(Box::new(src)).unwrap();
        let e = d
            .start_mirror(
                0,
                Box::new(small),
                two(&src2, &dst, &tp),
                sp.clone(),
                tp.clone(),
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("same size"), "{e}");
        assert!(d.switch(0).is_err());
        d.start_mirror(
            0,
            Box::new(dst.try_clone().unwrap()),
            two(&src2, &dst, &tp),
            sp,
            tp,
            0,
        )
        .unwrap();
        assert!(d.cancel_mirror());
        assert!(d.mirror_progress(0).is_none());
        assert!(d.switch(0).is_err());
    }

    /// Whether a gate is open, and whether what passes it fails.
    type GateState = Arc<(Mutex<(bool, bool)>, Condvar)>;

    /// A copy whose writes wait until the test lets them through, or fail.
    struct Gate {
        file: File,
        state: GateState,
    }

    impl Gate {
        fn new(file: &File) -> (Gate, GateState) {
            let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
            let g = Gate {
                file: file.try_clone().unwrap(),
                state: state.clone(),
            };
            (g, state)
        }

        fn pass(&self) -> io::Result<()> {
            let (m, cv) = &*self.state;
            let mut s = m.lock().unwrap();
            while !s.0 {
                s = cv.wait(s).unwrap();
            }
            if s.1 {
                return Err(io::Error::other("the copy's disk is full"));
            }
            Ok(())
        }
    }

    /// Open the gate; `fail`: every write behind it fails.
    fn open(state: &(Mutex<(bool, bool)>, Condvar), fail: bool) {
        *state.0.lock().unwrap() = (true, fail);
        state.1.notify_all();
    }

    impl DiskBackend for Gate {
        fn size(&self) -> io::Result<u64> {
            DiskBackend::size(&self.file)
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            DiskBackend::read_at(&mut self.file, buf, offset)
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.pass()?;
            DiskBackend::write_at(&mut self.file, buf, offset)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.pass()?;
            DiskBackend::flush(&mut self.file)
        }
        fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.pass()?;
            DiskBackend::discard(&mut self.file, offset, len)
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.pass()?;
            DiskBackend::write_zeroes(&mut self.file, offset, len, unmap)
        }
    }

    fn read(f: &File, len: usize, off: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).unwrap();
        v
    }

    #[test]
    fn the_guest_does_not_wait_for_the_copy_until_its_queue_is_full_and_the_switch_has_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let room = QUEUE_LIMIT / CHUNK + 6;
        let size = (room + 2) * CHUNK;
        let (sp, src) = image(dir.path(), "a", size);
        src.write_all_at(&vec![9u8; CHUNK as usize], 0).unwrap();
        let (tp, dst) = image(dir.path(), "b", size);
        let (gate, state) = Gate::new(&dst);
        let mut d = SwitchDisk::new(Box::new(src.try_clone().unwrap())).unwrap();
        d.start_mirror(0, Box::new(gate), two(&src, &dst, &tp), sp, tp, 0)
            .unwrap();
        assert_eq!(wait_ready(&d).state, MirrorState::Ready);
        // Behind the pass, with the copy's writes held: the guest's write is acknowledged.
        d.write_at(&[0x5a; 4096], 4096).unwrap();
        assert_eq!(read(&src, 4096, 4096), vec![0x5a; 4096]);
        assert_eq!(
            read(&dst, 4096, 4096),
            vec![9u8; 4096],
            "not on the copy yet"
        );
        // Past the queue's limit, the guest waits for the copy.
        let (acked, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (mut w, a, st) = (d.clone(), acked.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut off = 0u64;
            while !st.load(Ordering::SeqCst) && off < room * CHUNK {
                w.write_at(&vec![(off / CHUNK) as u8 + 1; 256 << 10], CHUNK + off)
                    .unwrap();
                off += 256 << 10;
                a.store(off, Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let held = acked.load(Ordering::SeqCst);
        assert!(
            held <= QUEUE_LIMIT + (256 << 10),
            "the guest ran {held} bytes ahead of a copy that took none"
        );
        assert!(
            held + (256 << 10) >= QUEUE_LIMIT,
            "only {held} bytes were acknowledged"
        );
        open(&state, false);
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let written = acked.load(Ordering::SeqCst);
        assert!(
            written > held,
            "the guest went on once the copy took writes"
        );
        let (_, p, _) = d.switch(0).unwrap();
        assert_eq!(p.mirrored_bytes, 4096 + written, "{p:?}");
        assert!(
            read(&src, size as usize, 0) == read(&dst, size as usize, 0),
            "the copy holds every acknowledged write at the switch"
        );
    }

    #[test]
    fn a_write_the_copy_refuses_fails_the_mirror_and_the_guest_keeps_its_disk() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * CHUNK;
        let (sp, src) = image(dir.path(), "a", size);
        src.write_all_at(&vec![3u8; CHUNK as usize], 0).unwrap();
        let (tp, dst) = image(dir.path(), "b", size);
        let (gate, state) = Gate::new(&dst);
        let mut d = SwitchDisk::new(Box::new(src.try_clone().unwrap())).unwrap();
        d.start_mirror(0, Box::new(gate), two(&src, &dst, &tp), sp, tp, 0)
            .unwrap();
        assert_eq!(wait_ready(&d).state, MirrorState::Ready);
        open(&state, true);
        d.write_at(&[0x77; 4096], 8192).unwrap();
        let p = wait_ready(&d);
        let p = if p.state == MirrorState::Ready {
            // The writer may not have taken it yet: it fails the mirror once it does.
            let t = Instant::now();
            loop {
                let p = d.mirror_progress(0).unwrap();
                if p.state == MirrorState::Failed || t.elapsed() > Duration::from_secs(10) {
                    break p;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            p
        };
        assert_eq!(p.state, MirrorState::Failed, "{p:?}");
        assert!(
            p.error.as_deref().unwrap().contains("disk is full"),
            "{p:?}"
        );
        let Err(e) = d.switch(0) else {
            panic!("switched to a copy that missed a write")
        };
        assert!(e.to_string().contains("disk is full"), "{e}");
        // The guest's disk has the write and stays the disk.
        d.write_at(&[0x78; 512], 0).unwrap();
        assert_eq!(read(&src, 4096, 8192), vec![0x77; 4096]);
        assert_eq!(read(&src, 512, 0), vec![0x78; 512]);
        assert!(d.cancel_mirror());
    }

    #[test]
    fn a_hole_the_guest_fills_ahead_of_the_pass_goes_to_both_copies_and_is_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * CHUNK;
        let (sp, src) = image(dir.path(), "a", size);
        // Data for each worker's first chunk, the rest a hole.
        src.write_all_at(&vec![1u8; (WORKERS as u64 * CHUNK) as usize], 0)
            .unwrap();
        let (tp, dst) = image(dir.path(), "b", size);
        let mut d = SwitchDisk::new(Box::new(src.try_clone().unwrap())).unwrap();
        // At 4 Mbit/s a worker rests about 2 s after its first chunk: the guest writes meanwhile.
        let cap = 4 * WORKERS as u64;
        d.start_mirror(
            0,
            Box::new(dst.try_clone().unwrap()),
            two(&src, &dst, &tp),
            sp,
            tp,
            cap,
        )
        .unwrap();
        for c in 10..20u64 {
            for i in 0..(CHUNK / 65536) {
                d.write_at(&[c as u8; 65536], c * CHUNK + i * 65536)
                    .unwrap();
            }
        }
        d.write_at(&[0xcc; 4096], 30 * CHUNK).unwrap();
        let p = wait_ready(&d);
        assert_eq!(p.state, MirrorState::Ready, "{p:?}");
        assert!(
            p.done_bytes >= 20 * CHUNK && p.elapsed_ms >= 1000,
            "the pass rested while the guest wrote: {p:?}"
        );
        assert_eq!(
            p.copied_bytes,
            WORKERS as u64 * CHUNK,
            "the pass copied the data only, not the holes the guest filled: {p:?}"
        );
        assert_eq!(p.mirrored_bytes, 10 * CHUNK + 4096, "{p:?}");
        d.switch(0).unwrap();
        assert!(read(&src, size as usize, 0) == read(&dst, size as usize, 0));
    }
}
