//! Reading what the loader handed us: PVH hvm_start_info or Multiboot v1
//! info, the command line, the memory map and (for the CPU count) ACPI MADT.
//! All physical memory below 4 GiB is identity mapped.

pub const BOOT_PVH: u64 = 1;
pub const BOOT_MULTIBOOT: u64 = 2;

pub const CMDLINE_MAX: usize = 1024;
pub const MAX_REGIONS: usize = 32;

fn rd32(addr: u64) -> u32 {
    // SAFETY: identity-mapped physical memory handed to us by the loader.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}
fn rd64(addr: u64) -> u64 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}
fn rd8(addr: u64) -> u8 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Modules (Multiboot modules, PVH modules) the guest checksums and reports.
pub const MAX_MODULES: usize = 8;
pub const MODULE_CMDLINE_MAX: usize = 128;

/// A module the loader handed over, checksummed while it is still intact.
#[derive(Clone, Copy)]
pub struct Module {
    pub start: u64,
    pub size: u64,
    /// FNV-1a (64-bit) of its bytes.
    pub fnv: u64,
    pub cmdline: [u8; MODULE_CMDLINE_MAX],
    pub cmdline_len: usize,
}

impl Module {
    const EMPTY: Module = Module {
        start: 0,
        size: 0,
        fnv: 0,
        cmdline: [0; MODULE_CMDLINE_MAX],
        cmdline_len: 0,
    };

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }
}

/// FNV-1a, 64-bit, of `len` bytes at physical `addr`.
fn fnv1a(addr: u64, len: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..len {
        h ^= u64::from(rd8(addr + i));
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Copy a NUL-terminated string at `addr` into `out`; returns its length (cut at `out`'s).
fn copy_str(addr: u64, out: &mut [u8]) -> usize {
    if addr == 0 || addr >= 0xC000_0000 {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        let b = rd8(addr + n as u64);
        if b == 0 {
            break;
        }
        out[n] = b;
        n += 1;
    }
    n
}

pub struct BootInfo {
    pub proto: u64,
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    /// RAM regions (type 1): (start, length).
    pub ram: [(u64, u64); MAX_REGIONS],
    pub nram: usize,
    pub rsdp: u64,
    /// How many modules the loader passed (more than `MAX_MODULES` are counted, not kept).
    pub nmodules: usize,
    pub modules: [Module; MAX_MODULES],
}

impl BootInfo {
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram[..self.nram].iter().map(|r| r.1).sum()
    }

    fn add_ram(&mut self, addr: u64, len: u64, ty: u32) {
        if ty == 1 && len > 0 && self.nram < MAX_REGIONS {
            self.ram[self.nram] = (addr, len);
            self.nram += 1;
        }
    }

    fn copy_cmdline(&mut self, addr: u64) {
        self.cmdline_len = copy_str(addr, &mut self.cmdline);
    }

    fn add_module(&mut self, start: u64, size: u64, cmdline: u64) {
        if self.nmodules < MAX_MODULES && start.saturating_add(size) <= 0xC000_0000 {
            let m = &mut self.modules[self.nmodules];
            m.start = start;
            m.size = size;
            m.fnv = fnv1a(start, size);
            m.cmdline_len = copy_str(cmdline, &mut m.cmdline);
        }
        self.nmodules += 1;
    }

    /// The modules kept (at most `MAX_MODULES`).
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.nmodules.min(MAX_MODULES)]
    }

    /// Must run before the guest writes anything outside its image (the
    /// loader's structures may live right after it).
    pub fn parse(proto: u64, info: u64) -> BootInfo {
        let mut bi = BootInfo {
            proto,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            ram: [(0, 0); MAX_REGIONS],
            nram: 0,
            rsdp: 0,
            nmodules: 0,
            modules: [Module::EMPTY; MAX_MODULES],
        };
        if info == 0 {
            return bi;
        }
        if proto == BOOT_PVH {
            if rd32(info) != 0x336e_c578 {
                return bi;
            }
            let version = rd32(info + 4);
            bi.copy_cmdline(rd64(info + 24));
            bi.rsdp = rd64(info + 32);
            let nmods = rd32(info + 12) as u64;
            let list = rd64(info + 16);
            for i in 0..nmods.min(64) {
                let e = list + i * 32;
                bi.add_module(rd64(e), rd64(e + 8), rd64(e + 16));
            }
            if version >= 1 {
                let map = rd64(info + 40);
                let n = rd32(info + 48) as u64;
                for i in 0..n.min(128) {
                    let e = map + i * 24;
                    bi.add_ram(rd64(e), rd64(e + 8), rd32(e + 16));
                }
            }
        } else if proto == BOOT_MULTIBOOT {
            let flags = rd32(info);
            if flags & (1 << 2) != 0 {
                bi.copy_cmdline(rd32(info + 16) as u64);
                bi.strip_image_name();
            }
            if flags & (1 << 3) != 0 {
                let n = rd32(info + 20) as u64;
                let list = rd32(info + 24) as u64;
                for i in 0..n.min(64) {
                    let e = list + i * 16;
                    let (start, end) = (rd32(e) as u64, rd32(e + 4) as u64);
                    bi.add_module(start, end.saturating_sub(start), rd32(e + 8) as u64);
                }
            }
            if flags & (1 << 6) != 0 {
                let len = rd32(info + 44) as u64;
                let base = rd32(info + 48) as u64;
                let mut off = 0u64;
                while off + 24 <= len {
                    let e = base + off;
                    let size = rd32(e) as u64;
                    bi.add_ram(rd64(e + 4), rd64(e + 12), rd32(e + 20));
                    off += size + 4;
                    if size == 0 {
                        break;
                    }
                }
            } else if flags & 1 != 0 {
                bi.add_ram(0, rd32(info + 4) as u64 * 1024, 1);
                bi.add_ram(0x10_0000, rd32(info + 8) as u64 * 1024, 1);
            }
        }
        bi
    }

    /// Multiboot loaders (GRUB, QEMU) put the image path first: drop a
    /// leading token that has no '='.
    fn strip_image_name(&mut self) {
        let s = &self.cmdline[..self.cmdline_len];
        let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
        let end = s[start..]
            .iter()
            .position(|&b| b == b' ')
            .map_or(s.len(), |p| start + p);
        if start < end && !s[start..end].contains(&b'=') {
            let rest_start = s[end..]
                .iter()
                .position(|&b| b != b' ')
                .map_or(s.len(), |p| end + p);
            let n = s.len() - rest_start;
            self.cmdline.copy_within(rest_start..rest_start + n, 0);
            self.cmdline_len = n;
        }
    }

    /// Number of enabled CPUs according to the ACPI MADT, if we can find it.
    pub fn madt_cpus(&mut self) -> Option<u32> {
        if self.rsdp == 0 && self.proto == BOOT_MULTIBOOT {
            self.rsdp = find_rsdp();
        }
        let rsdp = self.rsdp;
        if rsdp == 0 || rsdp >= 0xC000_0000 || rd64(rsdp) != u64::from_le_bytes(*b"RSD PTR ") {
            return None;
        }
        let rev = rd8(rsdp + 15);
        let (root, entsz) = if rev >= 2 && rd64(rsdp + 24) != 0 {
            (rd64(rsdp + 24), 8)
        } else {
            (rd32(rsdp + 16) as u64, 4)
        };
        if root == 0 || root >= 0xC000_0000 {
            return None;
        }
        let len = rd32(root + 4) as u64;
        let mut off = 36;
        while off + entsz <= len.min(4096) {
            let t = if entsz == 8 {
                rd64(root + off)
            } else {
                rd32(root + off) as u64
            };
            off += entsz;
            if t == 0 || t >= 0xC000_0000 || rd32(t) != u32::from_le_bytes(*b"APIC") {
                continue;
            }
            let tlen = (rd32(t + 4) as u64).min(65536);
            let mut p = 44;
            let mut cpus = 0;
            while p + 2 <= tlen {
                let ty = rd8(t + p);
                let l = rd8(t + p + 1) as u64;
                if l < 2 {
                    break;
                }
                if ty == 0 && l >= 8 && rd32(t + p + 4) & 3 != 0 {
                    cpus += 1;
                }
                if ty == 9 && l >= 16 && rd32(t + p + 8) & 3 != 0 {
                    cpus += 1;
                }
                p += l;
            }
            return if cpus > 0 { Some(cpus) } else { None };
        }
        None
    }
}

/// Legacy BIOS search: EBDA first KiB, then 0xE0000..0xFFFFF.
fn find_rsdp() -> u64 {
    let sig = u64::from_le_bytes(*b"RSD PTR ");
    let ebda = (rd8(0x40E) as u64 | (rd8(0x40F) as u64) << 8) << 4;
    if (0x80000..0xA0000).contains(&ebda) {
        let mut a = ebda;
        while a < ebda + 1024 {
            if rd64(a) == sig {
                return a;
            }
            a += 16;
        }
    }
    let mut a = 0xE0000;
    while a < 0x100000 {
        if rd64(a) == sig {
            return a;
        }
        a += 16;
    }
    0
}
