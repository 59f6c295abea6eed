//! The sender's side of compression (protocol version 5, `Packed`): what to compress, decided
//! from what it measures, and the cache of pages sent that deltas are made against.
//!
//! * **Deltas** (XBZRLE-style): a page sent again goes as the words that changed since the copy
//!   the destination holds. The cache keeps the copy sent last of pages that were sent more
//!   than once (a page dirtied once is likely dirtied again; the first pass fills nothing), up
//!   to its size (then it keeps what it has). A delta costs about what copying the page costs and saves
//!   nearly all its bytes when it works; when, over a round, fewer than a quarter of the pages
//!   tried make a delta worth sending (a guest that rewrites whole pages), the cache is dropped
//!   and deltas stop for three rounds, then are tried again.
//! * **lz4** over each message. Every 16th message that goes without it, lz4 is tried on its
//!   first 64 KiB (a sample that costs next to nothing); if that shrinks by less than 10%, lz4
//!   stays off. Otherwise the sender compares what matters: input bytes moved per second, over
//!   windows of 4 messages with lz4 and 4 without, and uses the faster, trying the other again
//!   every 64 messages. So lz4 is used on a slow link and where it is faster even on a fast
//!   one, and a fast link with pages that do not compress never waits on it. Post-copy's
//!   background push goes on with lz4 alone (see [`Compressor::for_postcopy`]).

use std::collections::HashMap;
use std::time::Instant;

use ferry_api::{Compression, MigrationProgress};
use ferry_migration::pack::{self, Packer};
use ferry_migration::protocol::{self, Command, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

/// The largest default cache.
const MAX_DEFAULT_CACHE: u64 = 1 << 30;
/// Messages per measurement window (short: trying the slower way costs while it lasts).
const WINDOW: u32 = 4;
/// Messages between tries of the arm not in use.
const EXPLORE_EVERY: u32 = 64;
/// lz4 on a sample of this much of every 16th message.
const SAMPLE: usize = 64 << 10;
const SAMPLE_EVERY: u64 = 16;
/// lz4 that shrinks a sample to more than this share is not worth trying.
pub(super) const WORTH_TRYING: f64 = 0.9;

/// Copies of pages as last sent, bounded. Full, it takes no more: a guest cycling through a
/// working set larger than the cache would make any eviction order miss every page (each
/// evicted just before it comes round again), while keeping what it has hits a fixed share.
struct DeltaCache {
    data: Vec<u8>,
    slot_of: HashMap<u64, u32>,
    /// Slots never used yet start here.
    next: usize,
    slots: usize,
    free: Vec<u32>,
}

impl DeltaCache {
    fn new(bytes: u64) -> Self {
        let slots = (bytes / PAGE_SIZE as u64).max(1) as usize;
        DeltaCache {
            // Zeroed memory from the allocator is not touched until a page is cached.
            data: vec![0; slots * PAGE_SIZE],
            slot_of: HashMap::new(),
            next: 0,
            slots,
            free: Vec::new(),
        }
    }

    fn page_mut(&mut self, slot: u32) -> &mut [u8] {
        let at = slot as usize * PAGE_SIZE;
        &mut self.data[at..at + PAGE_SIZE]
    }

    /// Keep `page` as the copy of `gpa`, if there is room.
    fn insert(&mut self, gpa: u64, page: &[u8]) {
        let slot = match self.slot_of.get(&gpa) {
            Some(&s) => s,
            None => match self.free.pop() {
                Some(s) => s,
                None if self.next < self.slots => {
                    self.next += 1;
                    (self.next - 1) as u32
                }
                None => return,
            },
        };
        self.slot_of.insert(gpa, slot);
        self.page_mut(slot).copy_from_slice(page);
    }

    fn remove(&mut self, gpa: u64) {
        if let Some(s) = self.slot_of.remove(&gpa) {
            self.free.push(s);
        }
    }

    fn clear(&mut self) {
        self.slot_of.clear();
        self.free.clear();
        self.next = 0;
    }
}

/// Input bytes per second of one way of sending, over windows of messages.
#[derive(Default, Clone, Copy)]
struct Rate {
    bytes: u64,
    secs: f64,
    msgs: u32,
    /// The last full window's rate.
    last: Option<f64>,
}

impl Rate {
    fn add(&mut self, bytes: u64, secs: f64) {
        self.bytes += bytes;
        self.secs += secs;
        self.msgs += 1;
        if self.msgs >= WINDOW {
            let r = self.bytes as f64 / self.secs.max(1e-9);
            self.last = Some(self.last.map_or(r, |l| (l + r) / 2.0));
            (self.bytes, self.secs, self.msgs) = (0, 0.0, 0);
        }
    }
}

#[derive(Clone, Copy)]
struct Lz4Choice {
    on: bool,
    /// Output/input of lz4 on samples and messages (1.0 until measured).
    ratio: f64,
    rate: [Rate; 2],
    /// Messages since the arm last changed.
    since: u32,
    msgs: u64,
}

impl Lz4Choice {
    fn worth_trying(&self) -> bool {
        self.ratio <= WORTH_TRYING
    }

    /// After a message sent with (or without) lz4 in `secs`.
    fn record(&mut self, lz4: bool, bytes: u64, secs: f64) {
        self.rate[lz4 as usize].add(bytes, secs);
        self.since += 1;
        if !self.worth_trying() {
            self.on = false;
            return;
        }
        if lz4 != self.on || self.rate[self.on as usize].msgs != 0 {
            return; // the arm changed since (a sample found pages compress), or a window runs
        }
        let other = !self.on;
        let switch = match (
            self.rate[self.on as usize].last,
            self.rate[other as usize].last,
        ) {
            (_, None) => true,
            (Some(cur), Some(o)) if o > cur => true,
            _ => self.since >= EXPLORE_EVERY,
        };
        if switch {
            self.on = other;
            self.since = 0;
        }
    }
}

/// What a `Compressor` did, for the report.
#[derive(Default, Clone, Copy, Debug)]
pub(super) struct Totals {
    pub delta_pages: u64,
    pub delta_bytes: u64,
    pub lz4_in: u64,
    pub lz4_out: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.delta_pages += o.delta_pages;
        self.delta_bytes += o.delta_bytes;
        self.lz4_in += o.lz4_in;
        self.lz4_out += o.lz4_out;
    }
}

/// Builds and sends `Packed` messages.
pub(super) struct Compressor {
    mode: Compression,
    pk: Packer,
    scratch: Vec<u8>,
    cache: DeltaCache,
    deltas: bool,
    rounds_off: u32,
    /// This round: deltas tried, and those that were worth sending.
    tried: u64,
    made: u64,
    /// The round under way (0 = the first pass).
    round: u32,
    lz4: Lz4Choice,
    totals: Totals,
    /// This round: time spent reading, compressing and writing pages that are not zero, and
    /// how many.
    round_secs: f64,
    round_full: u64,
    /// The last round's seconds per page that is not zero.
    last_spp: Option<f64>,
    /// When the last message was written: a message's time runs from there, so what the
    /// caller waits for between messages (post-copy's in-flight limit) counts too.
    last_end: Option<Instant>,
}

impl Compressor {
    /// `None` when compression is off or the destination does not take `Packed`. `parts`:
    /// how many compressors share the delta cache's memory (one per memory connection).
    pub fn new(
        mode: Compression,
        cache_mib: u64,
        mem: &GuestMemory,
        peer: u32,
        parts: u64,
    ) -> Option<Self> {
        if mode == Compression::Off || peer < protocol::PACKED_VERSION {
            return None;
        }
        let bytes = if cache_mib > 0 {
            cache_mib << 20
        } else {
            (memory::total_bytes(mem) / 4).min(MAX_DEFAULT_CACHE)
        } / parts.max(1);
        Some(Compressor {
            mode,
            pk: Packer::default(),
            scratch: Vec::with_capacity(PAGE_SIZE),
            cache: DeltaCache::new(bytes),
            deltas: true,
            rounds_off: 0,
            tried: 0,
            made: 0,
            round: 0,
            lz4: Lz4Choice {
                on: mode == Compression::On,
                ratio: 1.0,
                rate: [Rate::default(); 2],
                since: 0,
                msgs: 0,
            },
            totals: Totals::default(),
            round_secs: 0.0,
            round_full: 0,
            last_spp: None,
            last_end: None,
        })
    }

    /// The same for post-copy's background push: lz4 only (the destination's guest changes its
    /// copies from now on, so no deltas), keeping what was learnt about lz4 and what it did.
    pub fn for_postcopy(mut self) -> Self {
        self.deltas = false;
        self.cache = DeltaCache::new(PAGE_SIZE as u64);
        self.last_end = None;
        self
    }

    /// Seconds a page that holds data took to go (read, compressed, written: what the link
    /// and this CPU allow together), over the round under way, else the last one; `None`
    /// before enough pages went.
    pub fn secs_per_page(&self) -> Option<f64> {
        if self.round_full >= 64 {
            Some(self.round_secs / self.round_full as f64)
        } else {
            self.last_spp
        }
    }

    /// A round ended: decide whether deltas go on.
    pub fn end_round(&mut self) {
        if self.mode == Compression::Auto {
            if self.deltas && self.tried >= 64 && self.made * 4 < self.tried {
                tracing::debug!(
                    "compression: {} of {} deltas worth sending in round {}; deltas off",
                    self.made,
                    self.tried,
                    self.round
                );
                self.deltas = false;
                self.cache.clear();
                self.rounds_off = 0;
            } else if !self.deltas {
                self.rounds_off += 1;
                if self.rounds_off >= 3 {
                    self.deltas = true;
                }
            }
        }
        (self.tried, self.made) = (0, 0);
        self.last_spp = self.secs_per_page();
        (self.round_secs, self.round_full) = (0.0, 0);
        self.last_end = None;
        self.round += 1;
    }

    /// Read `batch` from guest memory and write it as one `Packed` message.
    pub fn write(
        &mut self,
        batch: &[u64],
        mem: &GuestMemory,
        w: &mut impl std::io::Write,
    ) -> Result<(), super::send::SendError> {
        let t0 = Instant::now();
        self.pk.clear();
        // The first pass fills nothing (a page sent once may never change again); `on` caches
        // from the start.
        let cache_new = self.deltas && (self.round > 0 || self.mode == Compression::On);
        // No lookups while there is nothing to find and nothing to keep (the first pass).
        let use_cache = cache_new || (self.deltas && !self.cache.slot_of.is_empty());
        let (mut zero, mut deltas, mut delta_bytes) = (0usize, 0u64, 0u64);
        for &gpa in batch {
            mem.read_slice(self.pk.slot(), GuestAddress(gpa))
                .map_err(|e| super::send::SendError::Memory(memory::MemoryError::Access(e)))?;
            if protocol::is_zero(self.pk.last_slot()) {
                self.pk.keep_zero(gpa);
                self.cache.remove(gpa);
                zero += 1;
                continue;
            }
            if !use_cache {
                self.pk.keep_full(gpa);
                continue;
            }
            match self.cache.slot_of.get(&gpa).copied() {
                Some(slot) => {
                    self.scratch.clear();
                    let new = self.pk.last_slot();
                    let old = self.cache.page_mut(slot);
                    let ok = pack::encode_delta(old, new, &mut self.scratch, pack::MAX_DELTA);
                    old.copy_from_slice(new);
                    self.tried += 1;
                    if ok {
                        self.made += 1;
                        deltas += 1;
                        delta_bytes += 2 + self.scratch.len() as u64;
                        self.pk.put_delta(gpa, &self.scratch);
                    } else {
                        self.pk.keep_full(gpa);
                    }
                }
                None => {
                    if cache_new {
                        self.cache.insert(gpa, self.pk.last_slot());
                    }
                    self.pk.keep_full(gpa);
                }
            }
        }
        let lz4 = self.lz4.on;
        let sample = !lz4
            && self.mode == Compression::Auto
            && self.lz4.msgs.is_multiple_of(SAMPLE_EVERY)
            && self.pk.data().len() >= SAMPLE;
        self.lz4.msgs += 1;
        if sample {
            let r = pack::lz4_ratio(&self.pk.data()[..SAMPLE]);
            self.lz4.ratio = (self.lz4.ratio + r) / 2.0;
            if self.lz4.worth_trying() && self.lz4.rate[1].last.is_none() {
                // Compressible: measure lz4 first (from the next message on).
                self.lz4.on = true;
                self.lz4.since = 0;
            }
        }
        let (head, data, st) = self.pk.finish(lz4);
        protocol::write_frame_parts(w, Command::Packed, &[head, data])?;
        let secs = self.last_end.unwrap_or(t0).elapsed().as_secs_f64();
        self.last_end = Some(Instant::now());
        if lz4 && st.data_bytes > 0 {
            let r = (st.wire_bytes - head.len()) as f64 / st.data_bytes as f64;
            self.lz4.ratio = (self.lz4.ratio + r) / 2.0;
            self.totals.lz4_in += st.data_bytes as u64;
            self.totals.lz4_out += (st.wire_bytes - head.len()) as u64;
        }
        let full = batch.len() - zero;
        self.round_secs += secs;
        self.round_full += full as u64;
        if self.mode == Compression::Auto && full > 0 {
            self.lz4
                .record(lz4, (full * PAGE_SIZE) as u64, secs.max(1e-9));
        }
        self.totals.delta_pages += deltas;
        self.totals.delta_bytes += delta_bytes;
        Ok(())
    }

    /// What it did so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Take in what another compressor did (one of the memory connections', once they are
    /// done): its totals, and what it learnt about lz4 if this one has sent nothing yet.
    pub fn absorb(&mut self, other: &Compressor) {
        self.totals.add(&other.totals);
        if self.lz4.msgs == 0 {
            self.lz4 = other.lz4;
        }
    }

    /// Fill a progress report's compression fields.
    pub fn report(&self, p: &mut MigrationProgress) {
        Self::report_totals(&self.totals, p);
    }

    /// Fill a progress report's compression fields from `t`.
    pub fn report_totals(t: &Totals, p: &mut MigrationProgress) {
        p.delta_pages = t.delta_pages;
        p.delta_bytes = t.delta_bytes;
        p.lz4_in_bytes = t.lz4_in;
        p.lz4_out_bytes = t.lz4_out;
    }

    /// What compression did and why, for the report.
    pub fn note(&self) -> String {
        let mut parts = Vec::new();
        let t = &self.totals;
        if t.delta_pages > 0 {
            parts.push(format!(
                "{} pages as deltas (avg {} B)",
                t.delta_pages,
                t.delta_bytes / t.delta_pages
            ));
        } else {
            parts.push("no deltas (no page was sent again with few changes)".into());
        }
        let rate = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.0} MB/s", r / 1e6));
        let (raw, with) = (self.lz4.rate[0].last, self.lz4.rate[1].last);
        if t.lz4_in > 0 {
            parts.push(format!(
                "lz4 {:.1}x on {:.1} MiB ({} with it, {} without)",
                t.lz4_in as f64 / t.lz4_out.max(1) as f64,
                t.lz4_in as f64 / f64::from(1 << 20),
                rate(with),
                rate(raw)
            ));
        } else if !self.lz4.worth_trying() {
            parts.push(format!(
                "no lz4 (pages do not compress: {:.0}% left of a sample)",
                self.lz4.ratio * 100.0
            ));
        } else {
            parts.push("no lz4 (sending pages as they are was faster)".into());
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(ratio: f64) -> Lz4Choice {
        Lz4Choice {
            on: false,
            ratio,
            rate: [Rate::default(); 2],
            since: 0,
            msgs: 0,
        }
    }

    /// Share of `n` messages sent with lz4 when it moves `with` bytes/s and raw `without`.
    fn share_on(c: &mut Lz4Choice, with: f64, without: f64, n: usize) -> f64 {
        let bytes = 4u64 << 20;
        let mut on = 0;
        for _ in 0..n {
            let arm = c.on;
            on += arm as usize;
            let rate = if arm { with } else { without };
            c.record(arm, bytes, bytes as f64 / rate);
        }
        on as f64 / n as f64
    }

    #[test]
    fn lz4_is_used_where_it_moves_pages_faster_and_only_there() {
        // A slow link: lz4 moves three times as much.
        assert!(share_on(&mut choice(0.3), 300e6, 100e6, 1000) > 0.8);
        // A fast link: sending pages as they are is faster; lz4 is only tried now and then.
        assert!(share_on(&mut choice(0.3), 800e6, 2000e6, 1000) < 0.2);
        // Pages that do not compress: never tried, whatever the rates say.
        assert_eq!(share_on(&mut choice(0.95), 300e6, 100e6, 1000), 0.0);
    }

    #[test]
    fn the_delta_cache_keeps_what_it_has_room_for() {
        let mut c = DeltaCache::new(2 * PAGE_SIZE as u64);
        let page = |b: u8| vec![b; PAGE_SIZE];
        c.insert(0x1000, &page(1));
        c.insert(0x2000, &page(2));
        c.insert(0x3000, &page(3)); // full: not kept
        assert!(!c.slot_of.contains_key(&0x3000));
        c.insert(0x1000, &page(4)); // a newer copy replaces the old
        let s = c.slot_of[&0x1000];
        assert_eq!(c.page_mut(s), &page(4)[..]);
        c.remove(0x2000); // sent as zero: its slot is free again
        c.insert(0x3000, &page(3));
        assert_eq!(c.page_mut(c.slot_of[&0x3000]), &page(3)[..]);
        assert_eq!(c.slot_of.len(), 2);
        c.clear();
        assert!(c.slot_of.is_empty());
    }
}
