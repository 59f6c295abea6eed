//! virtio-blk polling driver and the disk writer/verifier (`disk=`), and a benchmark mode
//! (`disk=bench io=... bs=...`) that keeps `qd` requests of one kind in flight and only counts
//! them (no records, no checks), so a benchmark measures the device, not the guest.
//!
//! The disk is an array of 4 KiB records; record `k` lives at sector `8k`:
//!
//! | bytes | content |
//! |-------|---------|
//! | 0..8 | magic `FERRYREC` |
//! | 8..16 | `seq` (u64 LE) = k |
//! | 16..24 | format version (u64 LE) = 1 |
//! | 24..4088 | u64 LE words `i` = 3..510: `seed(seq) + i * K` (wrapping) |
//! | 4088..4096 | FNV-1a 64 over bytes 0..4088 |

use crate::io::Uart;
use crate::virtio::{Arena, Mmio, Virtq, DESC_F_NEXT, DESC_F_WRITE, F_EVENT_IDX, F_VERSION_1};
use core::fmt::Write;

const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
/// Most request queues this driver sets up (`blkq=`).
pub const MAX_QUEUES: usize = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const ST_OK: u8 = 0;
const ST_UNSET: u8 = 0xFF;

pub const REC: u64 = 4096;
const SECTORS_PER_REC: u64 = REC / 512;
pub const MAX_QD: usize = 16;
/// Slots: 0..qd for reads/writes, slot `qd` for flush / get-id.
const SLOTS: usize = MAX_QD + 1;
/// Completions may arrive out of order; `next - acked` stays below this.
const WIN: u64 = 64;
/// During the start-up scan, records read past the first invalid one
/// (to catch valid records at the wrong place).
const SCAN_EXTRA: u64 = 32;

const MAGIC: &[u8; 8] = b"FERRYREC";
const VERSION: u64 = 1;
const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Write,
    Verify,
    /// Requests of one kind, counted (`disk=bench`).
    Bench(BenchKind),
}

/// What `disk=bench` does (`io=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    RandRead,
    RandWrite,
    Read,
    Write,
    /// A write of `bs`, then a flush, one after the other (`qd` ignored): a flush's cost.
    WriteFlush,
}

/// Largest `bs=` of the benchmark mode.
pub const MAX_BS: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Free,
    Write(u64),
    Read(u64),
    Flush(u64),
    GetId,
    /// Benchmark requests: byte offset.
    BenchRead(u64),
    BenchWrite(u64),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    GetId,
    Scan,
    Run,
    Verify,
}

/// Why a record is not what it should be.
#[derive(Clone, Copy)]
enum Bad {
    Magic,
    Checksum,
    Version,
    /// Intact record of another sequence number.
    Seq(u64),
    Payload,
    Io(u8),
}

impl core::fmt::Display for Bad {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match *self {
            Bad::Magic => f.write_str("magic"),
            Bad::Checksum => f.write_str("checksum"),
            Bad::Version => f.write_str("version"),
            Bad::Seq(s) => write!(f, "seq:{}", s),
            Bad::Payload => f.write_str("payload"),
            Bad::Io(s) => write!(f, "io:{}", s),
        }
    }
}

fn seed(seq: u64) -> u64 {
    let mut z = seq ^ 0xD15C_F0E7_7E57_0002;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fill_record(buf: &mut [u8; REC as usize], seq: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&VERSION.to_le_bytes());
    let s = seed(seq);
    for i in 3..511u64 {
        let o = i as usize * 8;
        buf[o..o + 8].copy_from_slice(&s.wrapping_add(i.wrapping_mul(K)).to_le_bytes());
    }
    let c = fnv1a(&buf[..4088]);
    buf[4088..].copy_from_slice(&c.to_le_bytes());
}

fn check_record(buf: &[u8; REC as usize], index: u64) -> Result<(), Bad> {
    let u = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
    if &buf[..8] != MAGIC {
        return Err(Bad::Magic);
    }
    if fnv1a(&buf[..4088]) != u(4088) {
        return Err(Bad::Checksum);
    }
    if u(16) != VERSION {
        return Err(Bad::Version);
    }
    let seq = u(8);
    if seq != index {
        return Err(Bad::Seq(seq));
    }
    let s = seed(seq);
    for i in 3..511u64 {
        if u(i as usize * 8) != s.wrapping_add(i.wrapping_mul(K)) {
            return Err(Bad::Payload);
        }
    }
    Ok(())
}

pub struct Blk {
    q: Virtq,
    /// Queues 1.. when the device took VIRTIO_BLK_F_MQ: slot `i` goes on queue `i % nq`.
    more: [Option<Virtq>; MAX_QUEUES - 1],
    nq: usize,
    mode: Mode,
    /// Capacity in records.
    pub capacity: u64,
    has_flush: bool,
    qd: usize,
    flush_every: u64,
    ops: [Op; SLOTS],
    /// Per slot: 16-byte request header, status byte at +16 (32 bytes).
    hdr: u64,
    /// Per slot: one 4 KiB data buffer.
    data: u64,
    phase: Phase,
    // Writer.
    next: u64,
    pub acked: u64,
    pub durable: u64,
    done_mask: u64,
    flush_inflight: bool,
    flush_requested_at: u64,
    retry: [u64; MAX_QD],
    nretry: usize,
    backoff_until: u64,
    full_reported: bool,
    pub errors: u64,
    err_printed_at: u64,
    // Scan / verify.
    rd_next: u64,
    rd_end: u64,
    rd_inflight: usize,
    /// Lowest record that is not valid (scan: ends the prefix).
    first_invalid: u64,
    /// Lowest record found bad, with the reason (scan: only misplaced ones
    /// are failures; verify: any).
    first_bad: Option<(u64, Bad)>,
    verify_pending: bool,
    serial: [u8; 20],
    /// Each slot's data buffer (4 KiB, or `bs` in the benchmark mode).
    slot_bytes: u64,
    /// Benchmark mode: request size, the next sequential offset, the random state.
    bs: u64,
    cursor: u64,
    rng: u64,
}

impl Blk {
    /// Negotiates features, sets up the request queue and starts reading the
    /// serial (then the start-up scan) from `poll`.
    pub fn new(
        dev: Mmio,
        arena: &mut Arena,
        mode: Mode,
        qd: usize,
        flush_every: u64,
        bs: u64,
        queues: usize,
    ) -> Result<Blk, &'static str> {
        let mq = if queues > 1 { F_MQ } else { 0 };
        let (_, acc) = dev.negotiate(F_VERSION_1 | F_FLUSH | F_EVENT_IDX | mq)?;
        let want = (3 * (qd as u16 + 1)).next_power_of_two();
        let Some(mut q) = Virtq::new(dev, 0, want, arena) else {
            dev.fail();
            return Err("queue");
        };
        if acc & F_EVENT_IDX != 0 {
            q.use_event_idx();
        }
        // num_queues (config offset 34) bounds how many the device has.
        let offered = if acc & F_MQ != 0 {
            (dev.cfg32(32) >> 16) as usize
        } else {
            1
        };
        let mut more = [None, None, None];
        let mut nq = 1;
        while nq < queues.min(offered).min(MAX_QUEUES) {
            let Some(mut extra) = Virtq::new(dev, nq as u16, want, arena) else {
                dev.fail();
                return Err("queue");
            };
            if acc & F_EVENT_IDX != 0 {
                extra.use_event_idx();
            }
            // Each queue's table holds every slot's descriptors (a slot uses its own queue's).
            if extra.size != q.size {
                dev.fail();
                return Err("queue-sizes-differ");
            }
            more[nq - 1] = Some(extra);
            nq += 1;
        }
        if q.size < 8 {
            dev.fail();
            return Err("queue-too-small");
        }
        // Three descriptors per request, plus one request for flush/get-id.
        let qd = qd.min(q.size as usize / 3 - 1);
        let bs = bs.clamp(REC, MAX_BS) / REC * REC;
        let slot_bytes = if matches!(mode, Mode::Bench(_)) {
            bs
        } else {
            REC
        };
        let (Some(hdr), Some(data)) = (
            arena.alloc(32 * SLOTS as u64, 4096),
            arena.alloc(slot_bytes * SLOTS as u64, 4096),
        ) else {
            dev.fail();
            return Err("no-memory");
        };
        let capacity = dev.cfg64(0) / SECTORS_PER_REC;
        dev.driver_ok();
        let mut b = Blk {
            q,
            more,
            nq,
            mode,
            capacity,
            has_flush: acc & F_FLUSH != 0,
            qd,
            flush_every,
            ops: [Op::Free; SLOTS],
            hdr,
            data,
            phase: Phase::GetId,
            next: 0,
            acked: 0,
            durable: 0,
            done_mask: 0,
            flush_inflight: false,
            flush_requested_at: 0,
            retry: [0; MAX_QD],
            nretry: 0,
            backoff_until: 0,
            full_reported: false,
            errors: 0,
            err_printed_at: 0,
            rd_next: 0,
            rd_end: capacity,
            rd_inflight: 0,
            first_invalid: u64::MAX,
            first_bad: None,
            verify_pending: false,
            serial: [0; 20],
            slot_bytes,
            bs,
            cursor: 0,
            rng: 0x2545_F491_4F6C_DD1D ^ crate::io::rdtsc(),
        };
        b.submit(b.qd, Op::GetId);
        b.kick_all();
        Ok(b)
    }

    /// The queue slot `slot`'s requests go on.
    fn queue(&mut self, slot: usize) -> &mut Virtq {
        match slot % self.nq {
            0 => &mut self.q,
            i => self.more[i - 1].as_mut().unwrap_or(&mut self.q),
        }
    }

    fn kick_all(&mut self) {
        self.q.kick();
        for q in self.more.iter_mut().flatten() {
            q.kick();
        }
    }

    /// A completed request from any queue.
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        if let Some(u) = self.q.pop_used() {
            return Some(u);
        }
        self.more.iter_mut().flatten().find_map(|q| q.pop_used())
    }

    fn buf(&mut self, slot: usize) -> &mut [u8; REC as usize] {
        // SAFETY: slot < SLOTS; each slot's buffer is a distinct arena page
        // that the device only touches while the slot's request is in flight.
        unsafe { &mut *((self.data + slot as u64 * self.slot_bytes) as *mut [u8; REC as usize]) }
    }

    fn status_ptr(&self, slot: usize) -> *mut u8 {
        (self.hdr + slot as u64 * 32 + 16) as *mut u8
    }

    fn submit(&mut self, slot: usize, op: Op) {
        let (ty, sector, len, wr) = match op {
            Op::Write(r) => {
                fill_record(self.buf(slot), r);
                (T_OUT, r * SECTORS_PER_REC, REC as u32, false)
            }
            Op::Read(r) => (T_IN, r * SECTORS_PER_REC, REC as u32, true),
            Op::Flush(_) => (T_FLUSH, 0, 0, false),
            Op::GetId => (T_GET_ID, 0, 20, true),
            Op::BenchRead(o) => (T_IN, o / 512, self.bs as u32, true),
            Op::BenchWrite(o) => (T_OUT, o / 512, self.bs as u32, false),
            Op::Free => return,
        };
        let h = self.hdr + slot as u64 * 32;
        // SAFETY: the slot's header/status area is ours while the slot is free.
        unsafe {
            (h as *mut u32).write_volatile(ty);
            ((h + 4) as *mut u32).write_volatile(0);
            ((h + 8) as *mut u64).write_volatile(sector);
            self.status_ptr(slot).write_volatile(ST_UNSET);
        }
        let d = (slot * 3) as u16;
        let buf = self.data + slot as u64 * self.slot_bytes;
        self.ops[slot] = op;
        let q = self.queue(slot);
        if len == 0 {
            q.set_desc(d, h, 16, DESC_F_NEXT, d + 2);
        } else {
            q.set_desc(d, h, 16, DESC_F_NEXT, d + 1);
            let flags = DESC_F_NEXT | if wr { DESC_F_WRITE } else { 0 };
            q.set_desc(d + 1, buf, len, flags, d + 2);
        }
        q.set_desc(d + 2, h + 16, 1, DESC_F_WRITE, 0);
        q.push(d);
    }

    fn free_slot(&self) -> Option<usize> {
        self.ops[..self.qd].iter().position(|&o| o == Op::Free)
    }

    fn error(&mut self, rec: u64, st: u8, now_ms: u64) {
        self.errors += 1;
        if self.errors <= 10 || now_ms >= self.err_printed_at + 1000 {
            self.err_printed_at = now_ms;
            let _ = writeln!(Uart(crate::io::COM1), "DISK error record={} status={}", rec, st);
        }
    }

    fn complete(&mut self, slot: usize, now_ms: u64) {
        let op = core::mem::replace(&mut self.ops[slot], Op::Free);
        // SAFETY: the device is done with this slot (it's in the used ring).
        let st = unsafe { self.status_ptr(slot).read_volatile() };
        match op {
            Op::Free => {}
            Op::GetId => {
                if st == ST_OK {
                    let b = self.buf(slot);
                    let mut s = [0u8; 20];
                    s.copy_from_slice(&b[..20]);
                    self.serial = s;
                }
                self.start_scan();
                if matches!(self.mode, Mode::Bench(_)) {
                    // Nothing to find: report the disk and go.
                    self.first_invalid = 0;
                    self.rd_end = 0;
                }
            }
            Op::BenchRead(_) | Op::BenchWrite(_) => {
                if st == ST_OK {
                    if let Mode::Bench(BenchKind::WriteFlush) = self.mode {
                        // The write is done: its flush next (counted when it is).
                        self.flush_inflight = true;
                        self.submit(self.qd, Op::Flush(self.acked + 1));
                    } else {
                        self.acked += 1;
                        self.durable = self.acked;
                    }
                } else {
                    self.error(self.acked, st, now_ms);
                }
            }
            Op::Flush(target) => {
                self.flush_inflight = false;
                if st == ST_OK {
                    self.durable = self.durable.max(target);
                    if matches!(self.mode, Mode::Bench(_)) {
                        self.acked = target;
                    }
                } else {
                    self.error(target, st, now_ms);
                    self.flush_requested_at = self.durable;
                }
            }
            Op::Write(r) => {
                if st == ST_OK {
                    self.done_mask |= 1 << (r % WIN);
                    while self.acked < self.next && self.done_mask & (1 << (self.acked % WIN)) != 0
                    {
                        self.done_mask &= !(1 << (self.acked % WIN));
                        self.acked += 1;
                    }
                    if !self.has_flush {
                        self.durable = self.acked;
                    }
                } else {
                    self.error(r, st, now_ms);
                    self.retry[self.nretry] = r;
                    self.nretry += 1;
                    self.backoff_until = now_ms + 10;
                }
            }
            Op::Read(r) => {
                self.rd_inflight -= 1;
                let res = if st != ST_OK {
                    self.error(r, st, now_ms);
                    Err(Bad::Io(st))
                } else {
                    check_record(self.buf(slot), r)
                };
                if let Err(why) = res {
                    self.first_invalid = self.first_invalid.min(r);
                    let report = self.phase == Phase::Verify || matches!(why, Bad::Seq(_));
                    if report && self.first_bad.is_none_or(|(k, _)| r < k) {
                        self.first_bad = Some((r, why));
                    }
                }
            }
        }
    }

    fn start_scan(&mut self) {
        self.phase = Phase::Scan;
        self.rd_next = 0;
        self.rd_end = self.capacity;
        self.first_invalid = u64::MAX;
        self.first_bad = None;
    }

    /// Starts the `d` verification of records 0..acked-1 (deferred until
    /// the start-up scan or a running verification is over).
    pub fn request_verify(&mut self) {
        self.verify_pending = true;
    }

    fn issue_reads(&mut self) {
        while self.rd_next < self.rd_end {
            if self.phase == Phase::Scan
                && self.rd_next >= self.first_invalid.saturating_add(SCAN_EXTRA)
            {
                break;
            }
            let Some(s) = self.free_slot() else { break };
            self.submit(s, Op::Read(self.rd_next));
            self.rd_next += 1;
            self.rd_inflight += 1;
        }
    }

    fn reads_done(&self) -> bool {
        self.rd_inflight == 0
            && (self.rd_next >= self.rd_end
                || (self.phase == Phase::Scan
                    && self.rd_next >= self.first_invalid.saturating_add(SCAN_EXTRA)))
    }

    fn finish_scan(&mut self) {
        let mut out = Uart(crate::io::COM1);
        let found = self.first_invalid.min(self.capacity);
        let _ = write!(
            out,
            "DISK found={} capacity={} serial=\"",
            found, self.capacity
        );
        for &c in self.serial.iter().take_while(|&&c| c != 0) {
            crate::io::uart_putb(
                crate::io::COM1,
                if (0x20..0x7f).contains(&c) && c != b'"' {
                    c
                } else {
                    b'?'
                },
            );
        }
        let _ = writeln!(out, "\" queues={}", self.nq);
        if let Some((k, why)) = self.first_bad {
            let _ = writeln!(out, "DISK VERIFY FAIL record={} reason={}", k, why);
        }
        self.next = found;
        self.acked = found;
        self.durable = found;
        self.flush_requested_at = found;
        self.done_mask = 0;
        self.phase = Phase::Run;
    }

    fn finish_verify(&mut self) {
        let mut out = Uart(crate::io::COM1);
        match self.first_bad {
            Some((k, why)) => {
                let _ = writeln!(out, "DISK VERIFY FAIL record={} reason={}", k, why);
            }
            None => {
                let _ = writeln!(out, "DISK VERIFY OK records={}", self.rd_end);
            }
        }
        self.phase = Phase::Run;
    }

    fn issue_writes(&mut self, now_ms: u64) {
        if now_ms < self.backoff_until {
            return;
        }
        while self.nretry > 0 {
            let Some(s) = self.free_slot() else { return };
            self.nretry -= 1;
            self.submit(s, Op::Write(self.retry[self.nretry]));
        }
        while self.next < self.capacity && self.next - self.acked < WIN {
            let Some(s) = self.free_slot() else { break };
            self.submit(s, Op::Write(self.next));
            self.next += 1;
        }
        let all_acked = self.next == self.capacity && self.acked == self.capacity;
        if all_acked && !self.full_reported && self.durable == self.acked {
            self.full_reported = true;
            let _ = writeln!(Uart(crate::io::COM1), "DISK full records={}", self.capacity);
        }
        // Flush every `flush_every` acked records, and once at the end.
        if self.has_flush && !self.flush_inflight && self.ops[self.qd] == Op::Free {
            let due = self.acked - self.flush_requested_at;
            let every = self.flush_every;
            if (every > 0 && due >= every) || (all_acked && due > 0) {
                self.flush_inflight = true;
                self.flush_requested_at = self.acked;
                self.submit(self.qd, Op::Flush(self.acked));
            }
        }
    }

    /// Benchmark mode: keep `qd` requests of the kind in flight (one write-then-flush).
    fn issue_bench(&mut self, kind: BenchKind) {
        let span = (self.capacity * REC / self.bs).max(1);
        if kind == BenchKind::WriteFlush {
            if self.ops[0] == Op::Free && !self.flush_inflight {
                let o = (self.cursor % span) * self.bs;
                self.cursor += 1;
                self.submit(0, Op::BenchWrite(o));
            }
            return;
        }
        while let Some(s) = self.free_slot() {
            let i = match kind {
                BenchKind::RandRead | BenchKind::RandWrite => {
                    self.rng ^= self.rng << 13;
                    self.rng ^= self.rng >> 7;
                    self.rng ^= self.rng << 17;
                    self.rng % span
                }
                _ => {
                    self.cursor += 1;
                    (self.cursor - 1) % span
                }
            };
            let op = match kind {
                BenchKind::RandRead | BenchKind::Read => Op::BenchRead(i * self.bs),
                _ => Op::BenchWrite(i * self.bs),
            };
            self.submit(s, op);
        }
    }

    /// Handles completions and issues new requests; bounded work.
    pub fn poll(&mut self, now_ms: u64) {
        let mut n = 0;
        while let Some((head, _)) = self.pop_used() {
            let slot = head as usize / 3;
            if slot < SLOTS {
                self.complete(slot, now_ms);
            }
            n += 1;
            if n >= 2 * SLOTS {
                break;
            }
        }
        match self.phase {
            Phase::GetId => {}
            Phase::Scan => {
                self.issue_reads();
                if self.reads_done() {
                    self.finish_scan();
                }
            }
            Phase::Verify => {
                self.issue_reads();
                if self.reads_done() {
                    self.finish_verify();
                }
            }
            Phase::Run => {
                if self.verify_pending {
                    self.verify_pending = false;
                    self.phase = Phase::Verify;
                    self.rd_next = 0;
                    self.rd_end = self.acked;
                    self.first_invalid = u64::MAX;
                    self.first_bad = None;
                    self.issue_reads();
                } else if self.mode == Mode::Write {
                    self.issue_writes(now_ms);
                } else if let Mode::Bench(kind) = self.mode {
                    self.issue_bench(kind);
                }
            }
        }
        self.kick_all();
    }
}
