//! virtio-mmio (modern, version 2) transport and split virtqueues, for
//! polling drivers running in ring 3 with IF=0 (VIRTIO 1.1 §2.6, §4.2.2).
//!
//! All guest memory is identity mapped, so a pointer is its own DMA
//! address. Rings and buffers come from the [`Arena`].

use core::sync::atomic::{fence, Ordering};

pub const MAGIC: u32 = 0x7472_6976; // "virt"

// Register offsets (§4.2.2).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEV_FEATURES: u64 = 0x010;
const R_DEV_FEATURES_SEL: u64 = 0x014;
const R_DRV_FEATURES: u64 = 0x020;
const R_DRV_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LO: u64 = 0x080;
const R_QUEUE_DESC_HI: u64 = 0x084;
const R_QUEUE_DRIVER_LO: u64 = 0x090;
const R_QUEUE_DRIVER_HI: u64 = 0x094;
const R_QUEUE_DEVICE_LO: u64 = 0x0a0;
const R_QUEUE_DEVICE_HI: u64 = 0x0a4;
const R_CONFIG_GEN: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

// Device status bits.
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// used_event / avail_event in the rings instead of the flags (VIRTIO 1.1 §2.6.7.1, §2.6.10).
pub const F_EVENT_IDX: u64 = 1 << 29;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

pub const DEV_NET: u32 = 1;
pub const DEV_BLOCK: u32 = 2;

/// Maximum number of `virtio_mmio.device=` tokens we keep.
pub const MAX_DEVS: usize = 8;

/// One `virtio_mmio.device=SIZE@BASE:IRQ` token (the size is only
/// validated: the registers we use fit in 0x100 + config bytes).
#[derive(Clone, Copy, Default)]
pub struct DevSpec {
    pub base: u64,
    pub irq: u32,
}

fn num(v: &[u8], radix: u32) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        let x = (d as char).to_digit(radix)? as u64;
        n = n.checked_mul(radix as u64)?.checked_add(x)?;
    }
    Some(n)
}

fn num_any(v: &[u8]) -> Option<u64> {
    match v {
        [b'0', b'x' | b'X', rest @ ..] => num(rest, 16),
        _ => num(v, 10),
    }
}

/// Parses `SIZE[K|M|G]@BASE:IRQ[:ID]` as Linux does (BASE in hex or
/// decimal with `0x`; the optional platform-device id is ignored).
pub fn parse_devspec(v: &[u8]) -> Option<DevSpec> {
    let at = v.iter().position(|&b| b == b'@')?;
    let (size_s, rest) = (&v[..at], &v[at + 1..]);
    let (size_s, mul) = match size_s.last()? {
        b'k' | b'K' => (&size_s[..size_s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&size_s[..size_s.len() - 1], 1 << 20),
        b'g' | b'G' => (&size_s[..size_s.len() - 1], 1 << 30),
        _ => (size_s, 1),
    };
    let size = num_any(size_s)?.checked_mul(mul)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = num_any(&rest[..colon])?;
    let irq_s = &rest[colon + 1..];
    let irq_s = match irq_s.iter().position(|&b| b == b':') {
        Some(p) => &irq_s[..p],
        None => irq_s,
    };
    let irq = num_any(irq_s)?;
    // Must be reachable through the identity map (below 4 GiB).
    if size < 0x100 || base.checked_add(size)? > 1 << 32 || irq > u32::MAX as u64 {
        return None;
    }
    Some(DevSpec {
        base,
        irq: irq as u32,
    })
}

// ---------------------------------------------------------------------------
// Bump allocator for DMA memory
// ---------------------------------------------------------------------------

/// Zeroed, identity-mapped guest RAM handed out after the image.
pub struct Arena {
    pub next: u64,
    pub end: u64,
}

impl Arena {
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let a = (self.next + align - 1) & !(align - 1);
        let e = a.checked_add(size)?;
        if e > self.end {
            return None;
        }
        self.next = e;
        // SAFETY: [a, e) is RAM past the image that nothing else uses (the
        // dirtier's working set is placed after `next`).
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, size as usize) };
        Some(a)
    }
}

// ---------------------------------------------------------------------------
// MMIO transport
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    #[inline]
    pub fn r32(&self, off: u64) -> u32 {
        // SAFETY: base is a virtio-mmio window from the command line, below
        // 4 GiB and identity mapped (uncached, user accessible).
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }
    #[inline]
    pub fn w32(&self, off: u64, v: u32) {
        // SAFETY: as r32.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }
    pub fn magic(&self) -> u32 {
        self.r32(R_MAGIC)
    }
    pub fn version(&self) -> u32 {
        self.r32(R_VERSION)
    }
    pub fn device_id(&self) -> u32 {
        self.r32(R_DEVICE_ID)
    }
    pub fn status(&self) -> u32 {
        self.r32(R_STATUS)
    }
    fn set_status(&self, s: u32) {
        self.w32(R_STATUS, s)
    }
    pub fn fail(&self) {
        self.set_status(self.status() | S_FAILED);
    }

    /// Byte `off` of the device-specific configuration space.
    pub fn cfg8(&self, off: u64) -> u8 {
        // SAFETY: as r32 (config space is byte addressable).
        unsafe { core::ptr::read_volatile((self.base + R_CONFIG + off) as *const u8) }
    }
    pub fn cfg32(&self, off: u64) -> u32 {
        self.r32(R_CONFIG + off)
    }
    /// A 64-bit config field, read consistently (ConfigGeneration loop).
    pub fn cfg64(&self, off: u64) -> u64 {
        loop {
            let g = self.r32(R_CONFIG_GEN);
            let lo = self.cfg32(off) as u64;
            let hi = self.cfg32(off + 4) as u64;
            if self.r32(R_CONFIG_GEN) == g {
                return hi << 32 | lo;
            }
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation up to FEATURES_OK.
    /// Returns (offered, accepted) or an error word.
    pub fn negotiate(&self, want: u64) -> Result<(u64, u64), &'static str> {
        self.set_status(0);
        let mut n = 0;
        while self.status() != 0 {
            n += 1;
            if n > 100_000 {
                return Err("reset");
            }
            core::hint::spin_loop();
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        self.w32(R_DEV_FEATURES_SEL, 0);
        let lo = self.r32(R_DEV_FEATURES) as u64;
        self.w32(R_DEV_FEATURES_SEL, 1);
        let hi = self.r32(R_DEV_FEATURES) as u64;
        let offered = hi << 32 | lo;
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("no-version-1");
        }
        // ACCESS_PLATFORM is harmless with identity-mapped DMA, and a
        // device may refuse FEATURES_OK without it.
        let accepted = offered & (want | F_VERSION_1 | F_ACCESS_PLATFORM);
        self.w32(R_DRV_FEATURES_SEL, 0);
        self.w32(R_DRV_FEATURES, accepted as u32);
        self.w32(R_DRV_FEATURES_SEL, 1);
        self.w32(R_DRV_FEATURES, (accepted >> 32) as u32);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.fail();
            return Err("features-not-ok");
        }
        Ok((offered, accepted))
    }

    pub fn driver_ok(&self) {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }

    pub fn notify(&self, q: u16) {
        // Make the avail ring visible before the (trapping) notify write.
        fence(Ordering::SeqCst);
        self.w32(R_QUEUE_NOTIFY, q as u32);
    }
}

// ---------------------------------------------------------------------------
// Split virtqueue
// ---------------------------------------------------------------------------

#[repr(C)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct Virtq {
    pub dev: Mmio,
    pub index: u16,
    pub size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u32,
    avail_idx: u16,
    last_used: u16,
    /// Buffers were added since the last notify.
    pub dirty: bool,
    /// EVENT_IDX negotiated: notify by avail_event, and keep used_event behind.
    event_idx: bool,
    /// avail_idx at the last notify decision.
    kicked_idx: u16,
}

impl Virtq {
    /// Sets up queue `index` with at most `want` entries (rounded down to a
    /// power of two, limited by QueueNumMax). None if the queue is missing.
    pub fn new(dev: Mmio, index: u16, want: u16, arena: &mut Arena) -> Option<Virtq> {
        dev.w32(R_QUEUE_SEL, index as u32);
        if dev.r32(R_QUEUE_READY) != 0 {
            return None;
        }
        let max = dev.r32(R_QUEUE_NUM_MAX).min(want as u32).min(32768);
        if max == 0 {
            return None;
        }
        let size = 1u32 << (31 - max.leading_zeros());
        let n = size as u64;
        let desc = arena.alloc(16 * n, 4096)?;
        let avail = arena.alloc(6 + 2 * n, 4096)?;
        let used = arena.alloc(6 + 8 * n, 4096)?;
        dev.w32(R_QUEUE_NUM, size);
        dev.w32(R_QUEUE_DESC_LO, desc as u32);
        dev.w32(R_QUEUE_DESC_HI, (desc >> 32) as u32);
        dev.w32(R_QUEUE_DRIVER_LO, avail as u32);
        dev.w32(R_QUEUE_DRIVER_HI, (avail >> 32) as u32);
        dev.w32(R_QUEUE_DEVICE_LO, used as u32);
        dev.w32(R_QUEUE_DEVICE_HI, (used >> 32) as u32);
        let q = Virtq {
            dev,
            index,
            size: size as u16,
            desc: desc as *mut Desc,
            avail: avail as *mut u16,
            used: used as *mut u32,
            avail_idx: 0,
            last_used: 0,
            dirty: false,
            event_idx: false,
            kicked_idx: 0,
        };
        // We poll: ask the device not to interrupt.
        // SAFETY: avail ring header, ours.
        unsafe { q.avail.write_volatile(AVAIL_F_NO_INTERRUPT) };
        dev.w32(R_QUEUE_READY, 1);
        Some(q)
    }

    /// Use EVENT_IDX (the device offered it and FEATURES_OK accepted it): this driver polls,
    /// so used_event is kept just behind what it has consumed, which no new entry reaches.
    pub fn use_event_idx(&mut self) {
        self.event_idx = true;
        self.set_used_event();
    }

    fn set_used_event(&self) {
        // SAFETY: used_event is the u16 after the avail ring's `size` entries, ours.
        unsafe {
            self.avail
                .add(2 + self.size as usize)
                .write_volatile(self.last_used.wrapping_sub(1))
        };
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        // SAFETY: i < size; the table is ours.
        unsafe {
            self.desc.add(i as usize).write_volatile(Desc {
                addr,
                len,
                flags,
                next,
            })
        }
    }

    /// Makes the chain starting at `head` available (no notify).
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: slot < size; avail ring is ours: flags, idx, ring[size].
        unsafe {
            self.avail.add(2 + slot).write_volatile(head);
            // Descriptor and buffer contents before the index update.
            fence(Ordering::Release);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.avail.add(1).write_volatile(self.avail_idx);
        }
        self.dirty = true;
    }

    /// Notifies the device if buffers were added since the last call and
    /// the device has not set VIRTQ_USED_F_NO_NOTIFY (it is busy with the
    /// queue and will see the new buffers anyway).
    pub fn kick(&mut self) {
        if self.dirty {
            self.dirty = false;
            // Avail index store before the used-flags / avail_event load (§2.6.10.1).
            fence(Ordering::SeqCst);
            let notify = if self.event_idx {
                // SAFETY: avail_event is the u16 after the used ring's `size` 8-byte entries.
                let event = unsafe {
                    ((self.used as *const u8).add(4 + 8 * self.size as usize) as *const u16)
                        .read_volatile()
                };
                let (new, old) = (self.avail_idx, self.kicked_idx);
                // vring_need_event: the device asked to hear of entry `event`, added now.
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                // SAFETY: used ring header, ours.
                let flags = unsafe { (self.used as *const u16).read_volatile() };
                flags & USED_F_NO_NOTIFY == 0
            };
            self.kicked_idx = self.avail_idx;
            if notify {
                self.dev.notify(self.index);
            }
        }
    }

    /// Next used element (descriptor head, bytes written), if any.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used ring is ours: flags u16, idx u16, ring[size] of
        // {id u32, len u32}.
        unsafe {
            let idx = (self.used as *const u16).add(1).read_volatile();
            if idx == self.last_used {
                return None;
            }
            // Read the element (and the buffer it names) after the index.
            fence(Ordering::Acquire);
            let slot = (self.last_used % self.size) as usize;
            let id = self.used.add(1 + 2 * slot).read_volatile();
            let len = self.used.add(2 + 2 * slot).read_volatile();
            self.last_used = self.last_used.wrapping_add(1);
            if self.event_idx {
                self.set_used_event();
            }
            Some((id as u16, len))
        }
    }
}
