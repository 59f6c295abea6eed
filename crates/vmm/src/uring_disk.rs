//! A disk image file whose requests go through io_uring, all of a batch in flight at once.
//!
//! The block device hands its backend every request the guest queued (up to a batch) and
//! waits for them all ([`DiskBackend::serve`]). Through a plain file that is one `pread` after
//! the other; here one `io_uring_enter` submits every read of the batch, straight into the
//! guest's buffers (no copy through a buffer), and the kernel serves them together: from the
//! page cache at once, and when they miss it, as many reads in flight on the disk as the guest
//! queued. Writes go from guest memory too, by one `pwritev` each, before the reads are
//! submitted: a buffered write is a copy into the page cache (io_uring would hand it to a
//! kernel worker, one write after the other, slower here). Completions are reaped together,
//! then the device completes the batch (one interrupt).
//!
//! What does not change: a batch is done when `serve` returns, so a paused device has no
//! request in flight (a snapshot or migration never carries one); a flush waits for every write
//! before it (`IOSQE_IO_DRAIN`) and is `fdatasync`; what a read lands in guest memory is marked
//! in the dirty bitmap once it is there. Discard and write-zeroes stay `fallocate` calls.
//! Where io_uring cannot be set up (an old kernel, a seccomp policy), the file serves requests
//! one at a time as before, and the log says so once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use ferry_devices::virtio::block::{
    serve_each, DiskBackend, DiskOp, DiskOpKind, GuestSegments, SECTOR_SIZE,
};
use ferry_devices::virtio::GuestMemoryMmap;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

/// Submission queue entries: more than a device batch (64 requests), so a batch goes in one.
const RING_ENTRIES: u32 = 128;

type Slice<'m> = VolatileSlice<'m, BS<'m, vm_memory::bitmap::AtomicBitmap>>;

/// A raw image file served through io_uring where the kernel allows it.
pub struct UringFile {
    file: File,
    ring: Option<IoUring>,
}

impl UringFile {
    /// Serve `file` through a ring of its own (one per device: only its worker uses it).
    pub fn new(file: File) -> UringFile {
        let ring = match IoUring::new(RING_ENTRIES) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    "io_uring is not available ({e}): disk requests are served one at a time"
                );
                None
            }
        };
        UringFile { file, ring }
    }

    /// Whether requests go through io_uring.
    pub fn uses_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Serve `ops` (reads and writes on guest memory where `mem` is given and an op has
    /// `guest` segments) through the ring, `RING_ENTRIES` at a time.
    fn serve_ring(&mut self, ops: &mut [DiskOp], mem: Option<&GuestMemoryMmap>) {
        for chunk in ops.chunks_mut(RING_ENTRIES as usize) {
            self.serve_chunk(chunk, mem);
        }
    }

    fn serve_chunk(&mut self, ops: &mut [DiskOp], mem: Option<&GuestMemoryMmap>) {
        let Some(ring) = self.ring.as_mut() else {
            // The ring was given up on during an earlier chunk: one at a time from here.
            match mem {
                Some(m) => serve_each(&mut self.file, ops, m),
                None => {
                    for op in ops.iter_mut() {
                        op.result = op.run_on(&mut self.file);
                    }
                }
            }
            return;
        };
        let fd = types::Fd(self.file.as_raw_fd());
        // Everything a submitted entry points at lives here until every entry completed:
        // every op's guest buffers, as slices (to mark what reads land in) and as iovecs, in
        // vectors sized once so that no push moves them.
        let total = ops.iter().map(|o| o.guest.len()).sum();
        let mut slices: Vec<Slice<'_>> = Vec::with_capacity(total);
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(total);
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(ops.len());
        let mut results: Vec<Option<io::Result<()>>> = Vec::with_capacity(ops.len());
        let mut entries = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            let start = iovecs.len();
            let entry = match op.kind {
                DiskOpKind::Read | DiskOpKind::Write if !op.guest.is_empty() => {
                    match mem.map(|m| guest_slices(m, &op.guest, &mut slices, &mut iovecs)) {
                        Some(Ok(())) => {
                            let v = &iovecs[start..];
                            if op.kind == DiskOpKind::Write {
                                // Now, from guest memory (see `write_now`).
                                results.push(Some(write_now(&mut self.file, v, op, mem)));
                                None
                            } else if let [one] = v {
                                // One buffer (the usual case): no vector for the kernel to copy.
                                Some(
                                    opcode::Read::new(fd, one.iov_base.cast(), one.iov_len as u32)
                                        .offset(op.offset)
                                        .build(),
                                )
                            } else {
                                Some(
                                    opcode::Readv::new(fd, v.as_ptr(), v.len() as u32)
                                        .offset(op.offset)
                                        .build(),
                                )
                            }
                        }
                        Some(Err(e)) => {
                            slices.truncate(start);
                            iovecs.truncate(start);
                            results.push(Some(Err(e)));
                            None
                        }
                        None => {
                            results.push(Some(Err(io::Error::other("no guest memory given"))));
                            None
                        }
                    }
                }
                DiskOpKind::Read => Some(
                    opcode::Read::new(fd, op.buf.as_mut_ptr(), op.buf.len() as u32)
                        .offset(op.offset)
                        .build(),
                ),
                DiskOpKind::Write => {
                    results.push(Some(op.run_on(&mut self.file)));
                    None
                }
                // Durable: every write submitted before it has completed first.
                DiskOpKind::Flush => Some(
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN),
                ),
                // fallocate, now: requests of one batch have no order among them but a
                // flush's, and this is done before the flush is submitted.
                DiskOpKind::Discard | DiskOpKind::WriteZeroes { .. } => {
                    results.push(Some(op.run_on(&mut self.file)));
                    None
                }
            };
            if let Some(e) = entry {
                results.push(None);
                entries.push(e.user_data(i as u64));
            }
            spans.push((start, iovecs.len()));
        }
        let mut in_flight = 0usize;
        for e in &entries {
            // SAFETY: the entry points at `iovecs` (and through them guest memory, mapped for
            // as long as `mem` is borrowed) or at an op's `buf`; none of them is touched, moved
            // or freed until the loop below has reaped this entry's completion.
            if unsafe { ring.submission().push(e) }.is_err() {
                // Cannot happen: a chunk is no larger than the ring.
                results[e.get_user_data() as usize] =
                    Some(Err(io::Error::other("io_uring submission queue full")));
                continue;
            }
            in_flight += 1;
        }
        let mut retries = 0u32;
        let mut submitted = 0usize;
        let mut give_up = false;
        while in_flight > 0 {
            match ring.submit_and_wait(1) {
                Ok(n) => submitted += n,
                Err(e)
                    if submitted == 0
                        && !matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) =>
                {
                    // The kernel took none of them and will not: serve them without the ring.
                    tracing::warn!(
                        "io_uring_enter failed ({e}): disk requests are served one at a time"
                    );
                    give_up = true;
                    break;
                }
                Err(e) => {
                    // Entries already submitted are still the kernel's: wait on, whatever the
                    // error, rather than hand their buffers back while it may write them.
                    retries += 1;
                    if retries == 1 || retries.is_power_of_two() {
                        tracing::warn!("io_uring_enter failed ({e}); waiting for the disk");
                    }
                    if e.kind() != io::ErrorKind::Interrupted {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    continue;
                }
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                let res = cqe.result();
                let op = &ops[i];
                results[i] = Some(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if matches!(op.kind, DiskOpKind::Read | DiskOpKind::Write)
                    && (res as u64) < op.len
                {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof))
                } else {
                    Ok(())
                });
                in_flight -= 1;
            }
        }
        // Every entry is back (or none was taken): the buffers are the device's again.
        drop(iovecs);
        if give_up {
            self.ring = None;
        }
        for (i, op) in ops.iter_mut().enumerate() {
            // None: never taken by the kernel, served below like a short transfer.
            let r = results[i]
                .take()
                .unwrap_or_else(|| Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
            op.result = match r {
                // A short transfer (the kernel may stop early): do the whole request again,
                // one call at a time, which finishes it or says why not.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => match (mem, op.kind) {
                    (Some(m), DiskOpKind::Read) if !op.guest.is_empty() => {
                        self.file.read_to_guest(m, &op.guest, op.offset)
                    }
                    (Some(m), DiskOpKind::Write) if !op.guest.is_empty() => {
                        self.file.write_from_guest(m, &op.guest, op.offset)
                    }
                    _ => op.run_on(&mut self.file),
                },
                Ok(()) if op.kind == DiskOpKind::Read => {
                    // The kernel wrote guest memory behind vm-memory's back: mark it.
                    let (a, b) = spans[i];
                    for sl in &slices[a..b] {
                        sl.bitmap().mark_dirty(0, sl.len());
                    }
                    Ok(())
                }
                r => r,
            };
        }
    }
}

/// A write, served at once by the calling thread with one `pwritev` from guest memory.
///
/// Not through the ring: a buffered write lands in the page cache (the kernel writes it back
/// later, whatever the caller does), and io_uring hands buffered writes to one kernel worker
/// per file, one after the other, which measured slower here than the call itself
/// (`ferry bench io`, docs/benchmarks.md).
fn write_now(
    file: &mut File,
    iov: &[libc::iovec],
    op: &DiskOp,
    mem: Option<&GuestMemoryMmap>,
) -> io::Result<()> {
    // SAFETY: `iov` points at guest memory slices that stay mapped while `mem` is borrowed;
    // the kernel only reads them, during this call.
    let n = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
            op.offset as libc::off_t,
        )
    };
    if n >= 0 && n as u64 == op.len {
        return Ok(());
    }
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Short: the whole request again through the file's own loop.
    match mem {
        Some(m) => file.write_from_guest(m, &op.guest, op.offset),
        None => Err(io::Error::other("no guest memory given")),
    }
}

/// `segs` of guest memory, appended to `slices` and as iovecs to `iov` (each within one
/// memory region); on an error, what was appended stays for the caller to drop.
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &GuestSegments,
    slices: &mut Vec<Slice<'m>>,
    iov: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    for &(a, n) in segs {
        let sl = mem
            .get_slice(GuestAddress(a), n)
            .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
        iov.push(libc::iovec {
            iov_base: sl.ptr_guard_mut().as_ptr().cast(),
            iov_len: sl.len(),
        });
        slices.push(sl);
    }
    Ok(())
}

impl DiskBackend for UringFile {
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        DiskBackend::flush(&mut self.file)
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.file.write_zeroes(offset, len, unmap)
    }
    fn is_hole(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        self.file.is_hole(offset, len)
    }
    fn run(&mut self, ops: &mut [DiskOp]) {
        if self.ring.is_some() {
            self.serve_ring(ops, None);
        } else {
            for op in ops.iter_mut() {
                op.result = op.run_on(&mut self.file);
            }
        }
    }
    /// Every read and write goes straight to or from guest memory through the ring.
    fn direct_min(&self) -> Option<usize> {
        if self.ring.is_some() {
            Some(SECTOR_SIZE as usize)
        } else {
            self.file.direct_min()
        }
    }
    fn serve(&mut self, ops: &mut [DiskOp], mem: &GuestMemoryMmap) {
        if self.ring.is_some() {
            self.serve_ring(ops, Some(mem));
        } else {
            serve_each(&mut self.file, ops, mem);
        }
    }
    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        self.file.read_to_guest(mem, segs, offset)
    }
    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &GuestSegments,
        offset: u64,
    ) -> io::Result<()> {
        self.file.write_from_guest(mem, segs, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn image(size: usize) -> (tempfile::NamedTempFile, File) {
        let t = tempfile::NamedTempFile::new().unwrap();
        let f = t.reopen().unwrap();
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&pattern, 0).unwrap();
        (t, f)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn dirty(m: &GuestMemoryMmap, addr: usize) -> bool {
        m.iter().next().unwrap().bitmap().is_addr_set(addr)
    }

    /// One batch of every kind: reads into one and into several guest buffers (and the pages
    /// they land on marked dirty), writes from guest memory and from a buffer, a flush, a
    /// discard; a read past the end fails alone.
    #[test]
    fn a_batch_goes_in_flight_at_once_and_lands_where_the_guest_asked() {
        let (_t, f) = image(1 << 20);
        let mut d = UringFile::new(f.try_clone().unwrap());
        if !d.uses_ring() {
            // Without io_uring the file path is the one tested in ferry-devices; CI's machines
            // have io_uring (PLATFORM.md), so there its absence is a failure.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring is not available"
            );
            eprintln!("skipped: io_uring is not available here");
            return;
        }
        assert_eq!(d.direct_min(), Some(512));
        let m = mem();
        m.iter().next().unwrap().bitmap().reset();
        m.write_slice(&[0xabu8; 8192], GuestAddress(0x80000))
            .unwrap();
        let op = |kind, offset: u64, len: u64, guest: Vec<(u64, usize)>| {
            let mut o = DiskOp::new(kind, offset, len, Vec::new());
            o.guest = guest;
            o
        };
        let mut ops = vec![
            op(DiskOpKind::Read, 4096, 4096, vec![(0x10000, 4096)]),
            op(
                DiskOpKind::Read,
                65536,
                12288,
                vec![(0x20000, 4096), (0x30000, 8192)],
            ),
            op(DiskOpKind::Write, 200 * 4096, 8192, vec![(0x80000, 8192)]),
            DiskOp::new(DiskOpKind::Write, 220 * 4096, 4096, vec![0x77u8; 4096]),
            op(
                DiskOpKind::Read,
                (1 << 20) - 512,
                4096,
                vec![(0x40000, 4096)],
            ),
            DiskOp::new(DiskOpKind::Discard, 240 * 4096, 4096, Vec::new()),
            DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()),
        ];
        d.serve(&mut ops, &m);
        for (i, o) in ops.iter().enumerate() {
            if i == 4 {
                assert!(o.result.is_err(), "a read past the end fails");
            } else {
                assert!(o.result.is_ok(), "op {i}: {:?}", o.result);
            }
        }
        let want = |off: usize, len: usize| -> Vec<u8> {
            (off..off + len).map(|i| (i % 251) as u8).collect()
        };
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert_eq!(got, want(4096, 4096));
        let mut got = vec![0u8; 12288];
        m.read_slice(&mut got[..4096], GuestAddress(0x20000))
            .unwrap();
        m.read_slice(&mut got[4096..], GuestAddress(0x30000))
            .unwrap();
        assert_eq!(got, want(65536, 12288));
        assert!(dirty(&m, 0x10000) && dirty(&m, 0x20000) && dirty(&m, 0x31000));
        assert!(!dirty(&m, 0x50000), "untouched memory");
        let mut back = vec![0u8; 8192];
        f.read_exact_at(&mut back, 200 * 4096).unwrap();
        assert_eq!(back, vec![0xabu8; 8192]);
        f.read_exact_at(&mut back[..4096], 220 * 4096).unwrap();
        assert_eq!(&back[..4096], &[0x77u8; 4096][..]);
        f.read_exact_at(&mut back[..4096], 240 * 4096).unwrap();
        assert_eq!(
            &back[..4096],
            &[0u8; 4096][..],
            "the discarded range reads as zeros"
        );
    }

    /// Once the ring is given up on (the kernel refused a batch outright), the chunks after
    /// are still served, one request at a time: none is left reading as done but undone.
    #[test]
    fn chunks_after_the_ring_is_given_up_are_served_without_it() {
        let (_t, f) = image(1 << 20);
        let mut d = UringFile {
            file: f,
            ring: None,
        };
        let m = mem();
        let mut ops: Vec<DiskOp> = (0..RING_ENTRIES as usize + 5)
            .map(|i| {
                let mut o = DiskOp::new(DiskOpKind::Read, (i * 512) as u64, 512, Vec::new());
                o.guest = vec![((i * 512) as u64, 512)];
                o
            })
            .collect();
        ops.push(DiskOp::new(DiskOpKind::Read, 4096, 512, vec![0u8; 512]));
        d.serve_ring(&mut ops, Some(&m));
        assert!(ops.iter().all(|o| o.result.is_ok()));
        let n = RING_ENTRIES as usize + 5;
        let mut got = vec![0u8; n * 512];
        m.read_slice(&mut got, GuestAddress(0)).unwrap();
        let want: Vec<u8> = (0..n * 512).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        let last = ops.last().unwrap();
        assert_eq!(last.buf, want[4096..4096 + 512].to_vec());
    }

    /// More requests than the ring holds go in turns, every one served.
    #[test]
    fn a_batch_larger_than_the_ring_is_served_whole() {
        let (_t, f) = image(1 << 20);
        let mut d = UringFile::new(f);
        let m = mem();
        let n = RING_ENTRIES as usize * 2 + 3;
        let mut ops: Vec<DiskOp> = (0..n)
            .map(|i| {
                let mut o = DiskOp::new(DiskOpKind::Read, (i * 512) as u64, 512, Vec::new());
                o.guest = vec![((i * 512) as u64, 512)];
                o
            })
            .collect();
        d.serve(&mut ops, &m);
        assert!(ops.iter().all(|o| o.result.is_ok()));
        let mut got = vec![0u8; n * 512];
        m.read_slice(&mut got, GuestAddress(0)).unwrap();
        let want: Vec<u8> = (0..n * 512).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }
}
