//! The ferry test guest: a tiny freestanding x86-64 kernel used to exercise
//! the VMM (boot protocols, SMP bring-up, serial, timing, dirty-page
//! tracking and live migration).
//!
//! The guest is built by `build.rs` from `guest/` with the host rustc (no
//! extra targets) and GNU ld, and embedded here; see [`elf`].
//!
//! # Image
//!
//! ELF64 x86-64, linked and loaded at 1 MiB (one `PT_LOAD`, RWX), with
//! * a Xen PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18) — 32-bit entry,
//!   paging off, `EBX` = `hvm_start_info` (magic `0x336ec578`); command line,
//!   RSDP and memory map are taken from it;
//! * a Multiboot v1 header at file offset 0x1000 (flags `0x00010002`, a.out
//!   kludge) — `EAX` = `0x2BADB002`, `EBX` = multiboot info (cmdline flag 2,
//!   mmap flag 6, else mem_lower/mem_upper). A leading command-line token
//!   without `=` (the image path that GRUB/QEMU prepend) is dropped.
//!
//! Memory used: the image itself (about 1.3 MiB incl. bss), a 4 KiB AP
//! trampoline at 0x8000 (written only after the boot info and command line
//! have been copied), the LAPIC at 0xFEE00000, and for `dirty=` the
//! bookkeeping array + working set placed right after the image. Nothing
//! else below 1 MiB is written. The boot-time ring-0 path is ~45 straight-line
//! instructions per CPU; everything else runs in ring 3 (IF=0). Port I/O from
//! ring 3 is allowed both by IOPL=3 and by a full, all-zero I/O permission
//! bitmap in each CPU's TSS (kvm-pvm honours only the latter).
//!
//! # Command line
//!
//! Space-separated `key=value`; numbers are decimal or `0x` hex.
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `mode=run\|exit` | `run` | `exit`: print the banner, then `EXIT code=N`, power off |
//! | `code=N` | 0 | exit code printed by `mode=exit` |
//! | `hb=0\|1\|2` | 2 | heartbeat UART: off, COM1 (0x3f8), COM2 (0x2f8) |
//! | `dirty=MIB` | 0 | memory-dirtier working set in MiB (0 = none) |
//! | `rate=PAGES_PER_SEC` | 0 | dirtier pace (0 = flat out) |
//!
//! Unknown keys are reported in the banner as ` unknown=KEY`, keys with an
//! invalid value as ` bad=KEY`; both are otherwise ignored.
//!
//! # Output (COM1, 0x3f8; every line ends in `\n`)
//!
//! ```text
//! ferry-testguest v1 boot=pvh|multiboot cpus=N tsc_khz=K mem_mib=M cmdline="..."[ unknown=KEY][ bad=KEY]
//! READY                                   (after setup; mode=run only)
//! EXIT code=N                             (mode=exit, then power off)
//! ERROR dirty working set does not fit    (then power off)
//! VERIFY OK pages=P writes=W
//! VERIFY FAIL page=P gen=G word=I expected=0x%016x got=0x%016x
//! STATUS uptime_ms=U writes=W hb=H cpus=C ap_counters=a,b,c
//! FAULT vector=N error=0xE rip=0xR cr2=0xC    (then power off)
//! PANIC <message>                             (then power off)
//! ```
//!
//! * `cmdline` is the effective command line (image path stripped for
//!   Multiboot); `"` and non-printable bytes are shown as `?`.
//! * `cpus` counts the BSP plus every AP that checked in. APs are started by
//!   INIT + 2×SIPI (vector 0x08) broadcast to all-excluding-self; the BSP
//!   waits until as many CPUs as the ACPI MADT lists have checked in, or
//!   20 ms. At most 16 CPUs are used; extra ones are parked (`hlt`).
//! * `tsc_khz` comes from CPUID 0x40000010, else CPUID 0x15, else a 10 ms
//!   PIT channel-2 one-shot (ports 0x42/0x43/0x61), else CPUID 0x16, else
//!   2000000.
//! * `mem_mib` is the sum of type-1 (RAM) memory-map entries, rounded up.
//! * `uptime_ms` is measured from the first ring-3 instruction of the BSP.
//! * `writes` counts dirtier page rewrites since READY (not the initial fill).
//! * `hb` counts heartbeat bytes sent; `ap_counters` are the per-AP loop
//!   counters (APs in ticket order; empty with one CPU).
//!
//! Every UART byte is written after polling LSR THRE (bit 5). With `hb=1`
//! heartbeat dots are interleaved with the lines above (never inside a
//! line); strip `.` before parsing.
//!
//! # Heartbeat
//!
//! One `.` byte every 1 ms on the chosen UART, paced by the TSC: the next
//! deadline advances by 1 ms; when more than one period late it skips ahead
//! (no bursts). Heartbeats continue while the verifier runs.
//!
//! # Memory dirtier
//!
//! The working set starts at the first 2 MiB boundary after the image and a
//! `u32` generation array (one per 4 KiB page), must lie inside the RAM
//! region that holds the image and below 0xC0000000. Before `READY` every
//! page is written with generation 0. The dirtier then rewrites pages in
//! order (wrapping): generation += 1, then the page is rewritten so that
//! 64-bit word `i` = `seed(page, gen) + i * 0x9E3779B97F4A7C15` (wrapping),
//! `seed` = splitmix64 finaliser of `(page << 32 | gen) ^ 0x5EEDF0E77E570001`.
//! Flat out (`rate=0`) it rewrites one page per main-loop iteration;
//! otherwise it paces by TSC (resynchronising if more than ~100 ms behind).
//!
//! # Input (COM1 receive, polled about once per ms)
//!
//! | byte | action |
//! |------|--------|
//! | `v` | check every working-set page against its generation; print `VERIFY ...` |
//! | `s` | print `STATUS ...` |
//! | `p` | power off |
//! | `r` | reset (`outb(0x64, 0xFE)`) |
//! | `f` | test hook: execute `ud2` (prints `FAULT vector=6 ...`, powers off) |
//!
//! Other bytes are ignored.
//!
//! # Power off
//!
//! `outw(0x604, 0x2000)` (ACPI PM1a of ferry and QEMU pc/q35), then
//! `outw(0xB004, 0x2000)`, then `outb(0x64, 0xFE)`, then spin.

/// The test guest ELF image (x86-64, PVH note + Multiboot v1 header).
pub fn elf() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry-testguest.elf"))
}

#[cfg(test)]
mod tests {
    use super::elf;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn elf_header_and_segments() {
        let e = elf();
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e[4], 2, "ELF64");
        assert_eq!(u16_at(e, 18), 62, "x86-64");
        let phoff = u64_at(e, 32) as usize;
        let phentsize = u16_at(e, 54) as usize;
        let phnum = u16_at(e, 56) as usize;
        let mut loads = 0;
        let mut pvh_entry = None;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            match u32_at(e, ph) {
                1 => {
                    loads += 1;
                    assert_eq!(u64_at(e, ph + 24), 0x10_0000, "loaded at 1 MiB");
                }
                4 => {
                    let off = u64_at(e, ph + 8) as usize;
                    let size = u64_at(e, ph + 32) as usize;
                    let mut p = off;
                    while p + 12 <= off + size {
                        let namesz = u32_at(e, p) as usize;
                        let descsz = u32_at(e, p + 4) as usize;
                        let ty = u32_at(e, p + 8);
                        let name = &e[p + 12..p + 12 + namesz];
                        let desc = p + 12 + namesz.div_ceil(4) * 4;
                        if name == b"Xen\0" && ty == 18 {
                            pvh_entry = Some(u32_at(e, desc));
                        }
                        p = desc + descsz.div_ceil(4) * 4;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(loads, 1, "one contiguous PT_LOAD");
        let entry = pvh_entry.expect("PVH note");
        assert!((0x10_0000..0x20_0000).contains(&entry));
    }

    #[test]
    fn multiboot_header() {
        let e = elf();
        let off = (0..8192)
            .step_by(4)
            .find(|&o| u32_at(e, o) == 0x1BAD_B002)
            .expect("multiboot magic in first 8 KiB");
        let flags = u32_at(e, off + 4);
        assert_ne!(flags & (1 << 16), 0, "a.out kludge");
        assert_eq!(
            u32_at(e, off)
                .wrapping_add(flags)
                .wrapping_add(u32_at(e, off + 8)),
            0
        );
        let (header_addr, load_addr) = (u32_at(e, off + 12), u32_at(e, off + 16));
        let (load_end, bss_end) = (u32_at(e, off + 20), u32_at(e, off + 24));
        assert_eq!(load_addr, 0x10_0000);
        assert!(header_addr >= load_addr && load_end > load_addr && bss_end >= load_end);
        // The file bytes at the header offset must be what loads at header_addr.
        assert_eq!(off as u32 - (header_addr - load_addr), 0x1000);
    }
}
