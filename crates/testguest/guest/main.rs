//! ferry-testguest: a tiny freestanding x86-64 guest used to exercise the
//! ferry VMM (boot, SMP bring-up, serial, dirty-page tracking, migration).
//!
//! Only a few dozen ring-0 instructions run at boot (see boot.S); all the
//! logic below runs in ring 3 with IOPL=3 and IF=0. See ../src/lib.rs for
//! the command line and output protocol.

#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

mod blk;
mod bootinfo;
mod io;
mod mem;
mod net;
mod virtio;

use bootinfo::{BootInfo, BOOT_MULTIBOOT, BOOT_PVH};
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use io::{inb, outb, pause, rdtsc, uart_getb, uart_putb, Uart, COM1, COM2};

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));

const MAX_CPUS: usize = 16;
const TRAMPOLINE: u64 = 0x8000;
const LAPIC: u64 = 0xFEE0_0000;
const MMIO_GAP: u64 = 0xC000_0000;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

extern "C" {
    static exc_table: [u64; 32];
    static mut idt: [u64; 512];
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static _image_end: u8;
}

#[repr(align(64))]
struct Counter(AtomicU64);

#[allow(clippy::declare_interior_mutable_const)]
const ZERO_COUNTER: Counter = Counter(AtomicU64::new(0));
static AP_COUNTERS: [Counter; MAX_CPUS] = [ZERO_COUNTER; MAX_CPUS];
static AP_CHECKIN: AtomicU32 = AtomicU32::new(0);

/// Ring-3 entry from boot.S. proto: 0 = AP, 1 = PVH, 2 = Multiboot.
#[no_mangle]
pub extern "C" fn rust_entry(proto: u64, info: u64, ticket: u64) -> ! {
    if proto == 0 {
        ap_main(ticket as usize)
    }
    bsp_main(proto, info)
}

fn ap_main(ticket: usize) -> ! {
    AP_CHECKIN.fetch_add(1, Ordering::SeqCst);
    let c = &AP_COUNTERS[ticket % MAX_CPUS].0;
    loop {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        pause();
    }
}

/// Called (in ring 3, on a per-CPU stack) by the ring-0 exception stubs.
#[no_mangle]
pub extern "C" fn fault_report(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    let _ = writeln!(
        Uart(COM1),
        "FAULT vector={} error={:#x} rip={:#x} cr2={:#x}",
        vector,
        error,
        rip,
        cr2
    );
    io::poweroff()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Uart(COM1), "PANIC {}", info);
    io::poweroff()
}

fn fill_idt() {
    for v in 0..32 {
        // SAFETY: exc_table is a read-only table emitted by boot.S.
        let h = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(exc_table[v])) };
        // Interrupt gate, DPL 0, present, selector 0x08, IST 0.
        let lo = (h & 0xFFFF) | (0x08 << 16) | (0x8E00u64 << 32) | ((h >> 16) & 0xFFFF) << 48;
        let hi = h >> 32;
        // SAFETY: the IDT lives in our bss and is user-writable; nothing else
        // touches it concurrently (APs are not started yet).
        unsafe {
            let p = core::ptr::addr_of_mut!(idt) as *mut u64;
            core::ptr::write_volatile(p.add(2 * v), lo);
            core::ptr::write_volatile(p.add(2 * v + 1), hi);
        }
    }
}

// ---------------------------------------------------------------------------
// TSC calibration
// ---------------------------------------------------------------------------

fn tsc_khz_cpuid() -> Option<u64> {
    let (_, _, ecx, _) = io::cpuid(1, 0);
    if ecx & (1 << 31) != 0 {
        let (max, ..) = io::cpuid(0x4000_0000, 0);
        if (0x4000_0010..0x4000_0100).contains(&max) {
            let (khz, ..) = io::cpuid(0x4000_0010, 0);
            if (100_000..20_000_000).contains(&khz) {
                return Some(khz as u64);
            }
        }
    }
    let (maxb, ..) = io::cpuid(0, 0);
    if maxb >= 0x15 {
        let (a, b, c, _) = io::cpuid(0x15, 0);
        if a != 0 && b != 0 && c != 0 {
            let khz = c as u64 * b as u64 / a as u64 / 1000;
            if (100_000..20_000_000).contains(&khz) {
                return Some(khz);
            }
        }
    }
    None
}

/// 10 ms one-shot on PIT channel 2, gate via port 0x61, OUT2 read back in
/// bit 5. Port reads are slow exits (tens of us), so each event is dated at
/// the midpoint of the TSC readings around the port access, and the end at
/// the midpoint between the last "not yet" and the first "done" sample.
/// Returns (TSC ticks for 10 ms, uncertainty in ticks).
fn pit_10ms() -> Option<(u64, u64)> {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    let latch = (PIT_HZ * MS / 1000) as u16;
    let p61 = inb(0x61);
    outb(0x61, (p61 & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xB0); // channel 2, lo/hi, mode 0, binary
    outb(0x42, latch as u8);
    let a0 = rdtsc();
    outb(0x42, (latch >> 8) as u8); // counting starts here
    let b = rdtsc();
    let t0 = a0 + (b - a0) / 2;
    let mut prev = b;
    let mut polls = 0u32;
    // Give up after 100k polls or 2e8 TSC ticks (>= 20 ms even at 10 GHz):
    // a VMM without a PIT must not stall the boot.
    let (t1, unc) = loop {
        let a = rdtsc();
        let v = inb(0x61);
        let b = rdtsc();
        let mid = a + (b - a) / 2;
        if v & 0x20 != 0 {
            break (
                prev + (mid - prev) / 2,
                (mid - prev) + (b - a) + (t0 - a0) * 2,
            );
        }
        prev = mid;
        polls += 1;
        if polls > 100_000 || b - t0 > 200_000_000 {
            outb(0x61, p61 & !0x03);
            return None;
        }
    };
    outb(0x61, p61 & !0x03);
    if polls < 10 {
        return None; // bit 5 stuck at 1: no PIT
    }
    Some((t1 - t0, unc))
}

fn tsc_khz_pit() -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for _ in 0..3 {
        let Some((ticks, unc)) = pit_10ms() else {
            return None;
        };
        if best.is_none_or(|(_, u)| unc < u) {
            best = Some((ticks, unc));
        }
        // Port accesses take tens of us, so ~150 us of uncertainty is normal
        // (the midpoint estimates are much better than that); retry only if
        // we were descheduled around an edge (> 2%).
        if unc * 50 < ticks {
            break;
        }
    }
    let (ticks, _) = best?;
    let khz = ticks / 10;
    if (100_000..20_000_000).contains(&khz) {
        Some(khz)
    } else {
        None
    }
}

fn calibrate_tsc() -> u64 {
    if let Some(k) = tsc_khz_cpuid() {
        return k;
    }
    if let Some(k) = tsc_khz_pit() {
        return k;
    }
    let (maxb, ..) = io::cpuid(0, 0);
    if maxb >= 0x16 {
        let (mhz, ..) = io::cpuid(0x16, 0);
        if mhz != 0 {
            return mhz as u64 * 1000;
        }
    }
    2_000_000
}

// ---------------------------------------------------------------------------
// SMP
// ---------------------------------------------------------------------------

fn lapic_write(reg: u64, val: u32) {
    // SAFETY: the LAPIC MMIO page is identity mapped (user, uncached).
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, val) }
}

fn spin_until(t: u64) {
    while rdtsc() < t {
        pause();
    }
}

/// INIT + 2x SIPI broadcast (all excluding self); returns the number of CPUs
/// (including the BSP) that checked in.
fn start_aps(tsc_khz: u64, expected: Option<u32>) -> u32 {
    if expected == Some(1) {
        return 1;
    }
    // Both symbols delimit the trampoline bytes in our image.
    let (start, end) = (
        core::ptr::addr_of!(ap_tramp_start),
        core::ptr::addr_of!(ap_tramp_end),
    );
    let len = end as usize - start as usize;
    // SAFETY: 0x8000..0x9000 is reserved for the trampoline by the boot
    // protocol we follow; boot info has already been consumed.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };

    let us = tsc_khz / 1000;
    lapic_write(0xF0, 0x1FF); // SVR: software enable, spurious vector 0xFF
    lapic_write(0x310, 0);
    lapic_write(0x300, 0x000C_4500); // INIT, assert, all excluding self
    spin_until(rdtsc() + 10 * us);
    let sipi = 0x000C_4600 | (TRAMPOLINE >> 12) as u32;
    lapic_write(0x300, sipi);
    spin_until(rdtsc() + 200 * us);
    lapic_write(0x300, sipi);

    let deadline = rdtsc() + 20 * tsc_khz;
    let want = expected.map(|n| n.saturating_sub(1));
    while rdtsc() < deadline {
        if let Some(w) = want {
            if AP_CHECKIN.load(Ordering::SeqCst) >= w {
                break;
            }
        }
        pause();
    }
    (1 + AP_CHECKIN.load(Ordering::SeqCst)).min(MAX_CPUS as u32)
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

struct Config {
    exit: bool,
    code: u64,
    hb: u8,
    dirty_mib: u64,
    rate: u64,
    touch: u64,
    disk: Option<blk::Mode>,
    bench: blk::BenchKind,
    bs: u64,
    flush: u64,
    qd: usize,
    /// Request queues the disk driver sets up when the device has them (`blkq=`).
    blkq: usize,
    ip: Option<([u8; 4], u8)>,
    gw: Option<[u8; 4]>,
    devs: [virtio::DevSpec; virtio::MAX_DEVS],
    ndevs: usize,
}

/// `A.B.C.D`
fn parse_ipv4(v: &[u8]) -> Option<[u8; 4]> {
    let mut a = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for x in a.iter_mut() {
        let p = parts.next()?;
        if p.len() > 3 || p.first() == Some(&b'0') && p.len() > 1 {
            return None;
        }
        *x = u8::try_from(parse_num(p)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(a)
}

/// `A.B.C.D/PREFIX` (prefix defaults to 24).
fn parse_cidr(v: &[u8]) -> Option<([u8; 4], u8)> {
    let (a, p) = match v.iter().position(|&b| b == b'/') {
        Some(i) => (&v[..i], parse_num(&v[i + 1..])?),
        None => (v, 24),
    };
    if p > 32 {
        return None;
    }
    Some((parse_ipv4(a)?, p as u8))
}

fn parse_num(v: &[u8]) -> Option<u64> {
    let (digits, radix) = match v {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (v, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        let x = (d as char).to_digit(radix)? as u64;
        n = n.checked_mul(radix as u64)?.checked_add(x)?;
    }
    Some(n)
}

fn parse_cmdline(s: &[u8], out: &mut Uart) -> Config {
    let mut c = Config {
        exit: false,
        code: 0,
        hb: 2,
        dirty_mib: 0,
        rate: 0,
        touch: 512,
        disk: None,
        bench: blk::BenchKind::RandRead,
        bs: blk::REC,
        flush: 1,
        qd: 4,
        blkq: 1,
        ip: None,
        gw: None,
        devs: [virtio::DevSpec::default(); virtio::MAX_DEVS],
        ndevs: 0,
    };
    for tok in s.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if tok.is_empty() {
            continue;
        }
        let (k, v) = match tok.iter().position(|&b| b == b'=') {
            Some(i) => (&tok[..i], &tok[i + 1..]),
            None => (tok, &b""[..]),
        };
        let ok = match k {
            b"mode" => match v {
                b"run" => {
                    c.exit = false;
                    true
                }
                b"exit" => {
                    c.exit = true;
                    true
                }
                _ => false,
            },
            b"code" => parse_num(v).map(|n| c.code = n).is_some(),
            b"hb" => match parse_num(v) {
                Some(n @ 0..=2) => {
                    c.hb = n as u8;
                    true
                }
                _ => false,
            },
            b"dirty" => parse_num(v).map(|n| c.dirty_mib = n).is_some(),
            b"rate" => parse_num(v).map(|n| c.rate = n).is_some(),
            b"touch" => match parse_num(v) {
                Some(n @ 1..=512) => {
                    c.touch = n;
                    true
                }
                _ => false,
            },
            b"disk" => match v {
                b"off" => {
                    c.disk = None;
                    true
                }
                b"write" => {
                    c.disk = Some(blk::Mode::Write);
                    true
                }
                b"verify" => {
                    c.disk = Some(blk::Mode::Verify);
                    true
                }
                b"bench" => {
                    c.disk = Some(blk::Mode::Bench(c.bench));
                    true
                }
                _ => false,
            },
            b"io" => {
                let k = match v {
                    b"randread" => Some(blk::BenchKind::RandRead),
                    b"randwrite" => Some(blk::BenchKind::RandWrite),
                    b"read" => Some(blk::BenchKind::Read),
                    b"write" => Some(blk::BenchKind::Write),
                    b"flush" => Some(blk::BenchKind::WriteFlush),
                    _ => None,
                };
                k.map(|k| c.bench = k).is_some()
            }
            b"bs" => match parse_num(v) {
                Some(n) if (blk::REC..=blk::MAX_BS).contains(&n) && n.is_multiple_of(blk::REC) => {
                    c.bs = n;
                    true
                }
                _ => false,
            },
            b"flush" => parse_num(v).map(|n| c.flush = n).is_some(),
            b"qd" => match parse_num(v) {
                Some(n @ 1..=16) => {
                    c.qd = n as usize;
                    true
                }
                _ => false,
            },
            b"blkq" => match parse_num(v) {
                Some(n) if (1..=blk::MAX_QUEUES as u64).contains(&n) => {
                    c.blkq = n as usize;
                    true
                }
                _ => false,
            },
            b"ip" => parse_cidr(v).map(|n| c.ip = Some(n)).is_some(),
            b"gw" => parse_ipv4(v).map(|n| c.gw = Some(n)).is_some(),
            b"virtio_mmio.device" => match virtio::parse_devspec(v) {
                Some(d) if c.ndevs < virtio::MAX_DEVS => {
                    c.devs[c.ndevs] = d;
                    c.ndevs += 1;
                    true
                }
                _ => false,
            },
            _ => {
                let _ = out.write_str(" unknown=");
                put_sanitized(out, k);
                continue;
            }
        };
        if !ok {
            let _ = out.write_str(" bad=");
            put_sanitized(out, k);
        }
    }
    // `io=` may come after `disk=bench`.
    if let Some(blk::Mode::Bench(_)) = c.disk {
        c.disk = Some(blk::Mode::Bench(c.bench));
    }
    c
}

fn put_sanitized(out: &mut Uart, s: &[u8]) {
    for &b in s {
        uart_putb(
            out.0,
            if (0x20..0x7f).contains(&b) && b != b'"' {
                b
            } else {
                b'?'
            },
        );
    }
}

// ---------------------------------------------------------------------------
// Memory dirtier / verifier
// ---------------------------------------------------------------------------

const K: u64 = 0x9E37_79B9_7F4A_7C15;

fn page_seed(page: u64, gen: u32) -> u64 {
    let mut z = (page << 32 | gen as u64) ^ 0x5EED_F0E7_7E57_0001;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Expected value of 64-bit word `i` of a page with seed `seed`.
#[inline(always)]
fn word(seed: u64, i: u64) -> u64 {
    seed.wrapping_add(i.wrapping_mul(K))
}

struct Dirty {
    base: u64,
    pages: u64,
    gens: *mut u32,
    cursor: u64,
    writes: u64,
    rate: u64,
    rate_t0: u64,
    rate_done: u64,
    /// Words a rewrite changes (`touch=`); the rest of the page keeps its first value.
    touch: u64,
}

impl Dirty {
    /// Word `i` of page `p` at generation `gen`.
    fn expected(&self, p: u64, gen: u32, i: u64) -> u64 {
        if i < self.touch {
            word(page_seed(p, gen), i)
        } else {
            page_seed(p, 0)
        }
    }

    #[inline(never)]
    fn write_page(&self, p: u64, gen: u32) {
        let ptr = (self.base + p * PAGE) as *mut u64;
        let words = if gen == 0 { 512 } else { self.touch };
        for i in 0..words {
            // SAFETY: page p lies inside the working set, which we own.
            unsafe { ptr.add(i as usize).write(self.expected(p, gen, i)) };
        }
    }

    fn gen(&self, p: u64) -> u32 {
        // SAFETY: p < pages; the gens array is ours.
        unsafe { self.gens.add(p as usize).read_volatile() }
    }

    fn set_gen(&self, p: u64, g: u32) {
        // SAFETY: as gen().
        unsafe { self.gens.add(p as usize).write_volatile(g) }
    }

    fn step(&mut self) {
        let p = self.cursor;
        let g = self.gen(p).wrapping_add(1);
        self.write_page(p, g);
        self.set_gen(p, g);
        self.writes += 1;
        self.cursor = if p + 1 == self.pages { 0 } else { p + 1 };
    }

    /// First mismatch as (word index, expected, got).
    #[inline(never)]
    fn check_page(&self, p: u64) -> Option<(u64, u64, u64)> {
        let g = self.gen(p);
        let ptr = (self.base + p * PAGE) as *const u64;
        let mut bad = false;
        for i in 0..512u64 {
            // SAFETY: as write_page.
            bad |= unsafe { ptr.add(i as usize).read() } != self.expected(p, g, i);
        }
        if !bad {
            return None;
        }
        for i in 0..512u64 {
            // SAFETY: as write_page.
            let got = unsafe { ptr.add(i as usize).read_volatile() };
            if got != self.expected(p, g, i) {
                return Some((i, self.expected(p, g, i), got));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------
// BSP
// ---------------------------------------------------------------------------

struct Guest {
    tsc_khz: u64,
    tsc0: u64,
    cpus: u32,
    hb_port: u16,
    hb_next: u64,
    hb_count: u64,
    poll_next: u64,
    dirty: Option<Dirty>,
    blk: Option<blk::Blk>,
    net: Option<&'static mut net::Net>,
    /// Devices whose status is checked for DEVICE_NEEDS_RESET:
    /// (transport, index on the command line, already reported).
    watched: [(virtio::Mmio, usize, bool); 2],
    nwatched: usize,
    watch_next: u64,
}

impl Guest {
    /// Heartbeat if due. Called often from every loop.
    #[inline]
    fn tick(&mut self, now: u64) {
        if self.hb_port != 0 && now >= self.hb_next {
            uart_putb(self.hb_port, b'.');
            self.hb_count += 1;
            self.hb_next += self.tsc_khz;
            if now >= self.hb_next {
                // Late by more than a period: skip ahead instead of bursting.
                self.hb_next = now + self.tsc_khz;
            }
        }
    }

    fn verify(&mut self) {
        let mut out = Uart(COM1);
        let Some(d) = self.dirty.as_ref() else {
            let _ = writeln!(out, "VERIFY OK pages=0 writes=0");
            return;
        };
        let (pages, writes) = (d.pages, d.writes);
        for p in 0..pages {
            let r = self
                .dirty
                .as_ref()
                .and_then(|d| d.check_page(p).map(|r| (r, d.gen(p))));
            if let Some(((i, exp, got), g)) = r {
                let _ = writeln!(
                    out,
                    "VERIFY FAIL page={} gen={} word={} expected={:#018x} got={:#018x}",
                    p, g, i, exp, got
                );
                return;
            }
            self.tick(rdtsc());
        }
        let _ = writeln!(out, "VERIFY OK pages={} writes={}", pages, writes);
    }

    fn status(&mut self) {
        let mut out = Uart(COM1);
        let uptime = (rdtsc() - self.tsc0) / self.tsc_khz;
        let writes = self.dirty.as_ref().map_or(0, |d| d.writes);
        let _ = write!(
            out,
            "STATUS uptime_ms={} writes={} hb={} cpus={} ap_counters=",
            uptime, writes, self.hb_count, self.cpus
        );
        for i in 1..self.cpus as usize {
            if i > 1 {
                let _ = out.write_str(",");
            }
            let _ = write!(out, "{}", AP_COUNTERS[i].0.load(Ordering::Relaxed));
        }
        if let Some(b) = self.blk.as_ref() {
            let _ = write!(
                out,
                " disk_acked={} disk_durable={} disk_errors={}",
                b.acked, b.durable, b.errors
            );
        }
        if let Some(n) = self.net.as_mut() {
            let conns = n.conns();
            let _ = write!(
                out,
                " net_rx={} net_tx={} tcp_conns={}",
                n.rx_frames(),
                n.tx_frames(),
                conns
            );
        }
        let _ = out.write_str("\n");
    }

    fn now_ms(&self, now: u64) -> u64 {
        (now - self.tsc0) / self.tsc_khz
    }

    /// Device I/O: completions, new requests, network stack. Bounded work.
    fn poll_devices(&mut self, now: u64) {
        if self.blk.is_none() && self.net.is_none() {
            return;
        }
        let ms = self.now_ms(now);
        if let Some(b) = self.blk.as_mut() {
            b.poll(ms);
        }
        if let Some(n) = self.net.as_mut() {
            n.poll(ms);
        }
        if now >= self.watch_next {
            self.watch_next = now + 100 * self.tsc_khz;
            for (dev, idx, reported) in self.watched[..self.nwatched].iter_mut() {
                if !*reported && dev.status() & virtio::S_NEEDS_RESET != 0 {
                    *reported = true;
                    let _ = writeln!(Uart(COM1), "VIRTIO needs-reset dev={}", idx);
                }
            }
        }
    }

    fn run(&mut self) -> ! {
        loop {
            let now = rdtsc();
            self.tick(now);
            if now >= self.poll_next {
                self.poll_next = now + self.tsc_khz;
                if let Some(b) = uart_getb(COM1) {
                    match b {
                        b'v' => self.verify(),
                        b's' => self.status(),
                        b'd' => match self.blk.as_mut() {
                            Some(b) => b.request_verify(),
                            None => {
                                let _ = writeln!(Uart(COM1), "DISK off");
                            }
                        },
                        b'p' => io::poweroff(),
                        b'r' => io::reset(),
                        // Test hook: take an exception (#UD) to exercise the fault path.
                        // SAFETY: ud2 just raises #UD, which the IDT reports.
                        b'f' => unsafe { core::arch::asm!("ud2") },
                        _ => {}
                    }
                }
            }
            self.poll_devices(now);
            match self.dirty.as_mut() {
                Some(d) if d.rate == 0 => d.step(),
                Some(d) => {
                    let hz = self.tsc_khz as u128 * 1000;
                    let allowed = ((now - d.rate_t0) as u128 * d.rate as u128 / hz) as u64;
                    if allowed > d.rate_done {
                        if allowed - d.rate_done > d.rate / 10 + 1 {
                            // More than ~100 ms behind: resynchronise.
                            d.rate_t0 = now;
                            d.rate_done = 0;
                        } else {
                            d.rate_done += 1;
                        }
                        d.step();
                    } else {
                        pause();
                    }
                }
                None => pause(),
            }
        }
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Lay out the gens array and the working set after the image and the
/// virtio arena (which ends at `after`); None if it does not fit in the RAM
/// region holding the image (or crosses 3 GiB).
fn place_working_set(bi: &BootInfo, after: u64, mib: u64) -> Option<(u64, u64)> {
    let pages = mib.checked_mul(MIB / PAGE)?;
    let gens = align_up(after, PAGE);
    let ws = align_up(gens.checked_add(pages * 4)?, 2 * MIB);
    let ws_end = ws.checked_add(mib * MIB)?;
    if ws_end > MMIO_GAP {
        return None;
    }
    let fits = bi.ram[..bi.nram]
        .iter()
        .any(|&(a, l)| a <= 0x10_0000 && a + l >= ws_end);
    if fits {
        Some((gens, ws))
    } else {
        None
    }
}

fn bsp_main(proto: u64, info: u64) -> ! {
    let tsc0 = rdtsc();
    // Consume the loader's data before touching any memory outside the image.
    let mut bi = BootInfo::parse(proto, info);
    let expected_cpus = bi.madt_cpus();
    fill_idt();
    io::uart_init(COM1);
    let tsc_khz = calibrate_tsc();
    let cpus = start_aps(tsc_khz, expected_cpus);

    let mut out = Uart(COM1);
    let boot = match proto {
        BOOT_PVH => "pvh",
        BOOT_MULTIBOOT => "multiboot",
        _ => "unknown",
    };
    let mem_mib = bi.ram_bytes().div_ceil(MIB);
    let _ = write!(
        out,
        "ferry-testguest v1 boot={} cpus={} tsc_khz={} mem_mib={} cmdline=\"",
        boot, cpus, tsc_khz, mem_mib
    );
    put_sanitized(&mut out, bi.cmdline());
    let _ = out.write_str("\"");
    let cfg = parse_cmdline(bi.cmdline(), &mut out);
    let _ = out.write_str("\n");
    let _ = out.write_str("MEMMAP ram=");
    for (i, (a, l)) in bi.ram[..bi.nram].iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}{a:#x}+{l:#x}");
    }
    let _ = out.write_str("\n");
    if bi.nmodules > 0 {
        let _ = writeln!(out, "MODULES count={}", bi.nmodules);
    }
    for (i, m) in bi.modules().iter().enumerate() {
        let _ = write!(
            out,
            "MODULE {} start={:#x} size={} fnv1a={:016x} cmdline=\"",
            i, m.start, m.size, m.fnv
        );
        put_sanitized(&mut out, m.cmdline());
        let _ = out.write_str("\"\n");
    }

    if cfg.exit {
        let _ = writeln!(out, "EXIT code={}", cfg.code);
        io::poweroff();
    }

    let hb_port = match cfg.hb {
        1 => COM1,
        2 => COM2,
        _ => 0,
    };
    if hb_port == COM2 {
        io::uart_init(COM2);
    }

    let mut arena = arena_for(&bi);
    let (blk, net, watched, nwatched) = setup_virtio(&cfg, &mut arena, tsc0, tsc_khz);

    let mut dirty = None;
    if cfg.dirty_mib > 0 {
        let Some((gens, base)) = place_working_set(&bi, arena.next, cfg.dirty_mib) else {
            let _ = writeln!(out, "ERROR dirty working set does not fit");
            io::poweroff();
        };
        let d = Dirty {
            base,
            pages: cfg.dirty_mib * (MIB / PAGE),
            gens: gens as *mut u32,
            cursor: 0,
            writes: 0,
            rate: cfg.rate,
            rate_t0: 0,
            rate_done: 0,
            touch: cfg.touch,
        };
        for p in 0..d.pages {
            d.set_gen(p, 0);
            d.write_page(p, 0);
        }
        dirty = Some(d);
    }

    let now = rdtsc();
    if let Some(d) = dirty.as_mut() {
        d.rate_t0 = now;
    }
    let mut g = Guest {
        tsc_khz,
        tsc0,
        cpus,
        hb_port,
        hb_next: now,
        hb_count: 0,
        poll_next: now,
        dirty,
        blk,
        net,
        watched,
        nwatched,
        watch_next: now,
    };
    let _ = writeln!(out, "READY");
    g.run()
}

/// DMA memory for virtio rings, buffers and the network stack: from the end
/// of the image to the end of its RAM region (below the MMIO gap).
fn arena_for(bi: &BootInfo) -> virtio::Arena {
    let start = align_up(core::ptr::addr_of!(_image_end) as u64, PAGE);
    let end = bi.ram[..bi.nram]
        .iter()
        .find(|&&(a, l)| a <= 0x10_0000 && a + l > start)
        .map_or(start, |&(a, l)| (a + l).min(MMIO_GAP));
    virtio::Arena { next: start, end }
}

type Watched = [(virtio::Mmio, usize, bool); 2];

/// Probes the `virtio_mmio.device=` windows and brings up the first block
/// device (if `disk=` is on) and the first network device (if `ip=` is set).
fn setup_virtio(
    cfg: &Config,
    arena: &mut virtio::Arena,
    tsc0: u64,
    tsc_khz: u64,
) -> (
    Option<blk::Blk>,
    Option<&'static mut net::Net>,
    Watched,
    usize,
) {
    let mut out = Uart(COM1);
    let mut blk = None;
    let mut net = None;
    let mut watched: Watched = [(virtio::Mmio { base: 0 }, 0, false); 2];
    let mut nw = 0;
    let mut saw_blk = false;
    let mut saw_net = false;
    for (i, d) in cfg.devs[..cfg.ndevs].iter().enumerate() {
        let m = virtio::Mmio { base: d.base };
        let magic = m.magic();
        if magic != virtio::MAGIC {
            let _ = writeln!(out, "VIRTIO skip base={:#x} magic={:#x}", d.base, magic);
            continue;
        }
        let version = m.version();
        if version != 2 {
            let _ = writeln!(out, "VIRTIO skip base={:#x} version={}", d.base, version);
            continue;
        }
        let id = m.device_id();
        let kind = match id {
            0 => continue,
            virtio::DEV_BLOCK if !saw_blk => {
                saw_blk = true;
                "block"
            }
            virtio::DEV_NET if !saw_net => {
                saw_net = true;
                "net"
            }
            _ => {
                let _ = writeln!(out, "VIRTIO skip base={:#x} device={}", d.base, id);
                continue;
            }
        };
        let _ = writeln!(
            out,
            "VIRTIO dev={} base={:#x} irq={} type={}",
            i, d.base, d.irq, kind
        );
        let now_ms = (rdtsc() - tsc0) / tsc_khz;
        let r = if id == virtio::DEV_BLOCK {
            let Some(mode) = cfg.disk else { continue };
            blk::Blk::new(m, arena, mode, cfg.qd, cfg.flush, cfg.bs, cfg.blkq).map(|b| blk = Some(b))
        } else {
            let Some((addr, prefix)) = cfg.ip else {
                let _ = writeln!(out, "NET no ip=");
                continue;
            };
            let ip = net::IpConf {
                addr,
                prefix,
                gw: cfg.gw,
            };
            net::Net::new(m, arena, ip, now_ms).map(|n| net = Some(n))
        };
        match r {
            Ok(()) => {
                watched[nw] = (m, i, false);
                nw += 1;
            }
            Err(e) => {
                let _ = writeln!(out, "VIRTIO dev={} error={}", i, e);
            }
        }
    }
    if cfg.disk.is_some() && blk.is_none() {
        let _ = writeln!(out, "DISK none");
    }
    if cfg.ip.is_some() && net.is_none() {
        let _ = writeln!(out, "NET none");
    }
    (blk, net, watched, nw)
}
