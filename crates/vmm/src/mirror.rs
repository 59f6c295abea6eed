//! I/O mirroring: moving a running VM's disk to another image without stopping it.
//!
//! Every disk's device reaches its storage through a [`SwitchDisk`]: one lock around the
//! backend the guest uses and, while a storage move runs, a [`Mirror`] to the new copy. Then
//!
//! - every guest write, discard and write-zeroes that touches a chunk already copied goes to
//!   both copies (under the lock, so both see the same order), and is acknowledged only when
//!   the disk the guest uses has it; a write the copy refuses fails the mirror, not the guest;
//! - one background pass ([`WORKERS`] chunks in flight) copies the disk chunk by chunk on its
//!   own handles, outside the lock, skipping holes and chunks that read as zeros (the copy is a
//!   new image that reads as zeros); a chunk the guest writes while it is being copied is
//!   copied again. So the copy converges whatever the guest writes: once the pass has been
//!   everywhere, the copy is the disk and stays so;
//! - the switch flushes the copy and swaps the two under the lock: the request after it goes to
//!   the new image. Guest I/O waits only for the switch (and for writes that go to both).
//!
//! The VM's own disk stays the truth until the switch: a failed or cancelled mirror just drops
//! the copy.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

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
/// The largest write the pass makes to the copy.
const WRITE_PIECE: usize = 128 << 10;
/// How much the pass copies between flushes of the copy.
const FLUSH_EVERY: u64 = 1 << 30;

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
    target: Box<dyn DiskBackend>,
    source_path: PathBuf,
    target_path: PathBuf,
    /// One bit per chunk: copied (or skipped) by the background pass.
    done: Vec<u64>,
    /// One bit per chunk not copied yet that a mirrored write reached on the copy.
    touched: Vec<u64>,
    /// The next chunk the pass looks at.
    next: u64,
    chunks: u64,
    copied: u64,
    skipped: u64,
    mirrored: u64,
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
    /// The last worker's handle of the copy, kept once the pass is through: the switch flushes
    /// through it before it takes the lock.
    flusher: Option<Box<dyn DiskBackend>>,
}

impl Mirror {
    fn is_done(&self, chunk: u64) -> bool {
        self.done[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Whether chunk `c` (in flight) was written since it was last asked; clears the mark.
    fn clear_dirtied(&mut self, c: u64) -> bool {
        match self.in_flight.iter_mut().find(|(x, _)| *x == c) {
            Some((_, d)) => std::mem::replace(d, false),
            None => false,
        }
    }

    fn set_done(&mut self, chunk: u64) {
        self.done[(chunk / 64) as usize] |= 1 << (chunk % 64);
    }

    /// Whether any chunk of the range has been copied (so a write there must reach the copy;
    /// elsewhere the pass will copy it later from the disk).
    fn touches_copied(&self, offset: u64, len: u64) -> bool {
        let first = offset / CHUNK;
        let last = (offset + len.max(1) - 1) / CHUNK;
        (first..=last.min(self.chunks.saturating_sub(1))).any(|c| self.is_done(c))
    }

    fn progress(&self, disk: usize, size: u64) -> MirrorProgress {
        MirrorProgress {
            disk,
            source: self.source_path.clone(),
            target: self.target_path.clone(),
            state: if self.error.is_some() {
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
            mirrored_bytes: self.mirrored,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            error: self.error.clone(),
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
        g.mirror = Some(Mirror {
            target,
            source_path,
            target_path,
            done: vec![0; chunks.div_ceil(64) as usize],
            touched: vec![0; chunks.div_ceil(64) as usize],
            next: 0,
            chunks,
            copied: 0,
            skipped: 0,
            mirrored: 0,
            started: Instant::now(),
            error: None,
            stop: stop.clone(),
            in_flight: Vec::new(),
            done_count: 0,
            workers: handles.len(),
            ready: false,
            flusher: None,
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
        if m.workers > 0 || m.error.is_some() || m.done_count < m.chunks {
            return;
        }
        // The last worker, the pass through: make the copy durable (outside the lock).
        drop(g);
        let r = writer.flush();
        let mut g = self.lock();
        if let Some(m) = g.mirror.as_mut() {
            match r {
                Ok(()) => {
                    m.ready = true;
                    m.flusher = Some(writer);
                }
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
        let mut buf = vec![0u8; CHUNK as usize];
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
            let (c, off, len, names, touched) = {
                let mut g = self.lock();
                let size = g.size;
                let Some(m) = g.mirror.as_mut() else {
                    return Ok(());
                };
                if m.error.is_some() || m.next >= m.chunks {
                    return Ok(());
                }
                let c = m.next;
                m.next += 1;
                m.in_flight.push((c, false));
                let off = c * CHUNK;
                let touched = m.touched[(c / 64) as usize] & (1 << (c % 64)) != 0;
                (
                    c,
                    off,
                    CHUNK.min(size - off),
                    (m.source_path.clone(), m.target_path.clone()),
                    touched,
                )
            };
            let buf = &mut buf[..len as usize];
            let mut tries = 0u32;
            let copied = loop {
                let again = tries > 0 || touched;
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
        if let Some(e) = &m.error {
            return Err(io::Error::other(format!("disk {disk}'s copy failed: {e}")));
        }
        if !m.ready {
            return Err(io::Error::other(format!(
                "disk {disk}'s copy is not complete ({} of {size} bytes)",
                (m.done_count * CHUNK).min(size)
            )));
        }
        m.target
            .flush()
            .map_err(|e| io::Error::other(format!("flushing disk {disk}'s copy: {e}")))
    }

    /// Drop the copy; the disk stays as it is.
    pub fn cancel_mirror(&self) -> bool {
        let mut g = self.lock();
        match g.mirror.take() {
            Some(m) => {
                m.stop.store(true, Ordering::SeqCst);
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
        // Most of the copy's unflushed writes go to stable storage while the guest still runs:
        // the flush under the lock then finds only what the guest wrote in between.
        let flusher = self.lock().mirror.as_mut().and_then(|m| m.flusher.take());
        if let Some(mut f) = flusher {
            f.flush()?;
        }
        let mut g = self.lock();
        let t = Instant::now();
        let size = g.size;
        let Some(m) = g.mirror.as_mut() else {
            return Err(io::Error::other(format!("disk {disk} is not being copied")));
        };
        if let Some(e) = &m.error {
            return Err(io::Error::other(format!("the copy failed: {e}")));
        }
        if !m.ready {
            return Err(io::Error::other(format!(
                "the copy is not complete yet ({} of {} bytes)",
                (m.done_count * CHUNK).min(size),
                size
            )));
        }
        // Everything the guest had acknowledged is on the old disk; make it durable on the new
        // one before the guest may depend on it.
        m.target.flush()?;
        let progress = m.progress(disk, size);
        let m = g.mirror.take().expect("checked above");
        m.stop.store(true, Ordering::SeqCst);
        let old = std::mem::replace(&mut g.disk, m.target);
        Ok((old, progress, t.elapsed()))
    }

    /// Send what `ops` changed to the copy (they ran on the disk already).
    fn mirror_ops(slot: &mut Slot, ops: &[DiskOp]) {
        let Some(m) = slot.mirror.as_mut() else {
            return;
        };
        if m.error.is_some() {
            return;
        }
        // A write into the chunk the pass is copying: the pass copies that chunk again.
        for (c, dirtied) in m.in_flight.iter_mut() {
            let (a, b) = (*c * CHUNK, (*c + 1) * CHUNK);
            if ops.iter().any(|o| {
                o.result.is_ok()
                    && !matches!(o.kind, DiskOpKind::Read | DiskOpKind::Flush)
                    && o.offset < b
                    && o.offset + o.len.max(1) > a
            }) {
                *dirtied = true;
            }
        }
        // A write that reaches the copy in a chunk the pass has not copied yet: that chunk
        // may no longer read as zeros there, so the pass must write it even if it is zeros.
        let mut out: Vec<DiskOp> = ops
            .iter()
            .filter(|o| {
                o.result.is_ok()
                    && !matches!(o.kind, DiskOpKind::Read | DiskOpKind::Flush)
                    && m.touches_copied(o.offset, o.len)
            })
            .map(|o| DiskOp::new(o.kind, o.offset, o.len, o.buf.clone()))
            .collect();
        if out.is_empty() {
            return;
        }
        for o in &out {
            let last = ((o.offset + o.len.max(1) - 1) / CHUNK).min(m.chunks.saturating_sub(1));
            for c in o.offset / CHUNK..=last {
                if !m.is_done(c) {
                    m.touched[(c / 64) as usize] |= 1 << (c % 64);
                }
            }
        }
        m.target.run(&mut out);
        for o in &out {
            match &o.result {
                Ok(()) if o.kind == DiskOpKind::Write => m.mirrored += o.len,
                Ok(()) => {}
                Err(e) => {
                    m.error = Some(format!(
                        "writing to the copy {} at {}: {e}",
                        m.target_path.display(),
                        o.offset
                    ));
                    tracing::warn!("{}", m.error.as_deref().unwrap_or_default());
                    break;
                }
            }
        }
    }
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
    // In pieces: a guest write mirrored to the copy meanwhile waits for one piece (the file's
    // lock is held for each write), not for the whole chunk.
    for (i, piece) in buf.chunks(WRITE_PIECE).enumerate() {
        to.write_at(piece, off + (i * WRITE_PIECE) as u64)?;
    }
    Ok(true)
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
        g.disk.run(ops);
        if g.mirror.is_some() {
            Self::mirror_ops(&mut g, ops);
        }
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
    /// Writes go straight to the disk, or, while a mirror runs, to both copies as every write
    /// does then.
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
        g.disk.run(&mut ops);
        Self::mirror_ops(&mut g, &ops);
        let [op] = ops;
        op.result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

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

    fn two(a: &File, b: &File) -> Vec<(Box<dyn DiskBackend>, Box<dyn DiskBackend>)> {
        (0..WORKERS)
            .map(|_| {
                let h: (Box<dyn DiskBackend>, Box<dyn DiskBackend>) = (
                    Box::new(a.try_clone().unwrap()),
                    Box::new(b.try_clone().unwrap()),
                );
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
        let handles = two(&src, &dst);
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
            two(&src, &dst),
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
                two(&src2, &dst),
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
            two(&src2, &dst),
            sp,
            tp,
            0,
        )
        .unwrap();
        assert!(d.cancel_mirror());
        assert!(d.mirror_progress(0).is_none());
        assert!(d.switch(0).is_err());
    }
}
