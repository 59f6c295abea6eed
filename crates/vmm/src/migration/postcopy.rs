//! Post-copy: the guest runs on the destination before all of its memory is there.
//!
//! The source pauses after pre-copy and names the pages the destination still lacks (those
//! dirtied since they were last sent). The destination drops its stale copies of them,
//! registers guest memory with userfaultfd and runs the guest. A page the guest (or KVM, or a
//! device) touches that is not there yet faults; the fault thread asks the source for it on the
//! page connection and fills it (`UFFDIO_COPY`, which wakes the waiter). Meanwhile the source
//! pushes every other missing page on the main connection, starting next to the last fault.
//! Pages never sent at all were zero on the source and are filled with zeros on the spot.
//!
//! Ordering that keeps it correct: a page's "still to come" bit is cleared only after the page
//! is in place, so the fault thread never zero-fills a page whose data is on its way.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migration::protocol::{self, Command, Frame, ProtocolError, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::transport::Transport;
use crate::memory::{self, GuestMemory};
use crate::uffd::Uffd;

/// A set of guest pages, one bit per page frame from address 0, shared between threads.
pub struct PageSet {
    words: Vec<AtomicU64>,
}

impl PageSet {
    /// A set from wire words (see `protocol::encode_bitmap`).
    pub fn from_words(words: &[u64]) -> PageSet {
        PageSet {
            words: words.iter().map(|w| AtomicU64::new(*w)).collect(),
        }
    }

    /// The set of `pages` (guest-physical addresses) for a guest whose memory ends below `end`.
    pub fn of(pages: impl Iterator<Item = u64>, end: u64) -> PageSet {
        let n = (end / PAGE_SIZE as u64).div_ceil(64) as usize;
        let mut w = vec![0u64; n];
        for g in pages {
            let pfn = (g / PAGE_SIZE as u64) as usize;
            if let Some(x) = w.get_mut(pfn / 64) {
                *x |= 1 << (pfn % 64);
            }
        }
        PageSet::from_words(&w)
    }

    /// Make the set exactly `words` (the destination's own list, after a recovery).
    pub fn replace(&self, words: &[u64]) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(words.get(i).copied().unwrap_or(0), Ordering::Release);
        }
    }

    /// The words, for the wire.
    pub fn words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    fn at(gpa: u64) -> (usize, u64) {
        let pfn = gpa / PAGE_SIZE as u64;
        ((pfn / 64) as usize, 1 << (pfn % 64))
    }

    /// Whether `gpa`'s page is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        let (i, m) = Self::at(gpa);
        self.words
            .get(i)
            .is_some_and(|w| w.load(Ordering::Acquire) & m != 0)
    }

    /// Put `gpa`'s page in.
    pub fn add(&self, gpa: u64) {
        let (i, m) = Self::at(gpa);
        if let Some(w) = self.words.get(i) {
            w.fetch_or(m, Ordering::AcqRel);
        }
    }

    /// Take `gpa`'s page out; true if it was in.
    pub fn take(&self, gpa: u64) -> bool {
        let (i, m) = Self::at(gpa);
        self.words
            .get(i)
            .is_some_and(|w| w.fetch_and(!m, Ordering::AcqRel) & m != 0)
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Take up to `max` pages out, starting at `from` and wrapping around; their addresses go
    /// to `out`. Returns where the next search should start.
    pub fn take_from(&self, from: u64, max: usize, out: &mut Vec<u64>) -> u64 {
        out.clear();
        let n = self.words.len();
        if n == 0 {
            return 0;
        }
        let start = ((from / PAGE_SIZE as u64 / 64) as usize) % n;
        for k in 0..=n {
            let i = (start + k) % n;
            let mut w = self.words[i].load(Ordering::Acquire);
            while w != 0 && out.len() < max {
                let b = w.trailing_zeros() as u64;
                let gpa = (i as u64 * 64 + b) * PAGE_SIZE as u64;
                if self.take(gpa) {
                    out.push(gpa);
                }
                w &= w - 1;
            }
            if out.len() >= max {
                return (i as u64 * 64) * PAGE_SIZE as u64;
            }
        }
        0
    }
}

/// Guest-physical to host addresses and back, for the regions of one guest's memory.
#[derive(Clone)]
struct Regions(Vec<(u64, u64, u64)>); // (gpa start, len, host start)

impl Regions {
    fn of(mem: &GuestMemory) -> Result<Regions, memory::MemoryError> {
        let mut v = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(memory::MemoryError::Access)? as u64;
            v.push((r.start_addr().0, r.len(), host));
        }
        Ok(Regions(v))
    }

    fn host(&self, gpa: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|(g, l, _)| gpa >= *g && gpa + PAGE_SIZE as u64 <= g + l)
            .map(|(g, _, h)| h + (gpa - g))
    }

    fn gpa(&self, host: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|(_, l, h)| host >= *h && host < h + l)
            .map(|(g, _, h)| g + (host - h))
    }
}

/// The source's side: which pages still have to go, and where the guest last faulted.
pub struct Outgoing {
    pub left: PageSet,
    /// Just past the last page the destination asked for: the push continues from there.
    pub hint: AtomicU64,
    pub requested: AtomicU64,
    pub stop: AtomicBool,
}

/// Answer the destination's page requests on `t` until it hangs up (or the socket is shut
/// down from elsewhere, see [`Transport::socket`]).
pub fn serve_requests(mut t: Transport, mem: GuestMemory, out: Arc<Outgoing>) {
    let valid = |gpa: u64| {
        gpa.is_multiple_of(PAGE_SIZE as u64)
            && memory::region_of(&mem, gpa)
                .is_some_and(|r| gpa + PAGE_SIZE as u64 <= r.start_addr().0 + r.len())
    };
    let mut payload = Vec::new();
    // The guest may sit idle for long: no read timeout here.
    t.set_io_timeout(Duration::from_secs(3600));
    while !out.stop.load(Ordering::SeqCst) {
        let f = match protocol::read_frame(&mut t) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("post-copy page connection: {e}");
                return;
            }
        };
        if f.command != Command::PageRequest {
            tracing::warn!(
                "post-copy: unexpected {:?} on the page connection",
                f.command
            );
            return;
        }
        let gpas = match protocol::decode_request(&f.payload, valid) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("post-copy: bad page request: {e}");
                return;
            }
        };
        for g in &gpas {
            out.left.take(*g);
        }
        if let Some(last) = gpas.last() {
            out.hint.store(last + PAGE_SIZE as u64, Ordering::Relaxed);
        }
        out.requested
            .fetch_add(gpas.len() as u64, Ordering::Relaxed);
        let r = protocol::encode_pages_with(&gpas, &mut payload, |gpa, slot| {
            mem.read_slice(slot, GuestAddress(gpa))
        });
        if r.is_err() || protocol::write_frame(&mut t, Command::Pages, &payload).is_err() {
            return;
        }
        if t.flush().is_err() {
            return;
        }
    }
}

/// The destination's side of post-copy.
pub struct Incoming {
    uffd: Uffd,
    regions: Regions,
    /// Pages still to come.
    pub left: PageSet,
    pub stop: AtomicBool,
    /// Pages fetched on demand, and the longest and total wait for one (µs).
    pub fetched: AtomicU64,
    pub longest_wait_us: AtomicU64,
    pub pushed: AtomicU64,
    /// Broken connections made again.
    pub recoveries: AtomicU64,
}

impl Incoming {
    /// Post-copy state for `mem`: nothing missing yet, nothing registered.
    pub fn new(mem: &GuestMemory) -> Result<Incoming, std::io::Error> {
        let uffd = Uffd::new()?;
        let regions = Regions::of(mem).map_err(std::io::Error::other)?;
        let words = (memory_end(mem) / PAGE_SIZE as u64).div_ceil(64) as usize;
        Ok(Incoming {
            uffd,
            regions,
            left: PageSet::from_words(&vec![0; words]),
            stop: AtomicBool::new(false),
            fetched: AtomicU64::new(0),
            longest_wait_us: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
        })
    }

    /// Have every access to a missing page of guest memory reported.
    pub fn register(&self) -> std::io::Result<()> {
        for (_, len, host) in &self.regions.0 {
            self.uffd.register(*host, *len)?;
        }
        Ok(())
    }

    /// The pages in `words` will come again: forget their stale copies (so they fault on
    /// their next touch) and count them as missing. Returns how many were new.
    pub fn discard(&self, words: &[u64]) -> std::io::Result<u64> {
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: (u64, u64)| -> std::io::Result<()> {
            // SAFETY: the range lies inside guest memory this VMM mapped; its old contents
            // are stale and about to be replaced.
            let r = unsafe {
                libc::madvise(
                    run.0 as *mut libc::c_void,
                    run.1 as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        let mut new = 0;
        for (i, w) in words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                let gpa = (i as u64 * 64 + b) * PAGE_SIZE as u64;
                let Some(h) = self.regions.host(gpa) else {
                    continue;
                };
                if self.left.contains(gpa) {
                    continue;
                }
                self.left.add(gpa);
                new += 1;
                run = match run {
                    Some((s, l)) if s + l == h => Some((s, l + PAGE_SIZE as u64)),
                    Some(r) => {
                        flush(r)?;
                        Some((h, PAGE_SIZE as u64))
                    }
                    None => Some((h, PAGE_SIZE as u64)),
                };
            }
        }
        if let Some(r) = run {
            flush(r)?;
        }
        Ok(new)
    }

    /// Put a page from the stream in place (`None`: a zero page), then mark it arrived.
    pub fn place(&self, gpa: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        let Some(h) = self.regions.host(gpa) else {
            return Ok(());
        };
        match data {
            Some(d) => self.uffd.copy(h, d)?,
            None => self.uffd.zero(h, PAGE_SIZE as u64)?,
        };
        self.left.take(gpa);
        Ok(())
    }

    /// Place every page of a `Pages` or `Packed` message (post-copy's push: whole pages and
    /// zero pages, lz4 or not; a delta has no base here and is refused).
    pub fn place_all(
        &self,
        f: &Frame,
        mem: &GuestMemory,
        scratch: &mut Vec<u8>,
    ) -> Result<usize, ProtocolError> {
        let mut err = None;
        let mut place = |gpa: u64, page: Option<&[u8]>| {
            if let Err(e) = self.place(gpa, page) {
                err.get_or_insert(e);
            }
        };
        let valid = |gpa| self.regions.host(gpa).is_some() && memory::region_of(mem, gpa).is_some();
        let n = ferry_migration::receiver::push_pages(f, valid, scratch, &mut place)?;
        match err {
            Some(e) => Err(ProtocolError::Io(e)),
            None => Ok(n),
        }
    }

    /// Serve faults until every page has arrived and `stop` is set, fetching what the guest
    /// waits for over `t`. When the page connection breaks, `relink` gives its replacement
    /// (or `None`: give up), and the pages still waited for are asked for again.
    pub fn serve_faults(
        &self,
        mut t: Transport,
        mem: &GuestMemory,
        mut relink: impl FnMut(&ProtocolError) -> Option<Transport>,
    ) -> Result<(), ProtocolError> {
        let mut faults = Vec::new();
        // Asked for and not yet here.
        let mut want: Vec<u64> = Vec::new();
        let mut t0 = Instant::now();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if want.is_empty() {
                self.uffd.faults(50, &mut faults)?;
                t0 = Instant::now();
                for h in &faults {
                    let Some(gpa) = self.regions.gpa(*h) else {
                        continue;
                    };
                    if self.left.contains(gpa) {
                        if !want.contains(&gpa) && want.len() < protocol::MAX_PAGES_PER_MESSAGE {
                            want.push(gpa);
                        }
                    } else {
                        // Never sent (zero on the source), or it arrived meanwhile.
                        self.uffd.zero(*h, PAGE_SIZE as u64)?;
                    }
                }
                if want.is_empty() {
                    continue;
                }
            }
            match self.fetch(&mut t, &want, mem) {
                Ok(n) => {
                    let us = t0.elapsed().as_micros() as u64;
                    self.fetched.fetch_add(n as u64, Ordering::Relaxed);
                    self.longest_wait_us.fetch_max(us, Ordering::Relaxed);
                    want.clear();
                }
                Err(e @ (ProtocolError::Io(_) | ProtocolError::Truncated)) => {
                    t = relink(&e).ok_or(e)?;
                    // What arrived meanwhile (pushed) is in place and its waiters woken.
                    want.retain(|g| self.left.contains(*g));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ask for `want` on `t` and place the answer.
    fn fetch(
        &self,
        t: &mut Transport,
        want: &[u64],
        mem: &GuestMemory,
    ) -> Result<usize, ProtocolError> {
        protocol::write_frame(t, Command::PageRequest, &protocol::encode_request(want))?;
        t.flush()?;
        let f = protocol::read_frame(t)?.ok_or(ProtocolError::Truncated)?;
        if f.command != Command::Pages {
            return Err(ProtocolError::OutOfOrder {
                got: f.command,
                state: "waiting for requested pages",
            });
        }
        self.place_all(&f, mem, &mut Vec::new())
    }

    /// Stop reporting faults (every page is here).
    pub fn finish(&self) {
        for (_, len, host) in &self.regions.0 {
            let _ = self.uffd.unregister(*host, *len);
        }
    }
}

/// The end of guest-physical memory (for page bitmaps).
pub fn memory_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_take_each_page_once_from_anywhere() {
        let pages = [0u64, 0x1000, 0x40_0000, 0x3fff_f000];
        let s = PageSet::of(pages.iter().copied(), 1 << 30);
        assert_eq!(s.count(), 4);
        assert!(s.contains(0x40_0000) && !s.contains(0x2000));
        let mut out = Vec::new();
        // From the middle, wrapping: the later pages first.
        s.take_from(0x40_0000, 2, &mut out);
        assert_eq!(out, vec![0x40_0000, 0x3fff_f000]);
        assert!(s.take(0x1000));
        assert!(!s.take(0x1000));
        s.take_from(0, 10, &mut out);
        assert_eq!(out, vec![0]);
        assert_eq!(s.count(), 0);
        s.take_from(0, 10, &mut out);
        assert!(out.is_empty());
        assert_eq!(PageSet::from_words(&s.words()).count(), 0);
    }
}
