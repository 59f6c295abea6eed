//! The ferry test guest: a tiny freestanding x86-64 kernel used to exercise
//! the VMM (boot protocols, SMP bring-up, serial, timing, dirty-page
//! tracking and live migration).
//!
//! The guest is the standalone cargo package in `guest/` (its own
//! `[workspace]`, `Cargo.lock`, dependency: smoltcp). `build.rs` builds it
//! with a nested `cargo build --release --locked --target
//! x86_64-unknown-linux-gnu` (host target only; own target dir under
//! `OUT_DIR`, outer RUSTFLAGS/wrappers scrubbed) into a static library and
//! links that with GNU ld; the image is embedded here, see [`elf`].
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
//!   without `=` (the image path that GRUB/QEMU prepend) is dropped;
//! * an ELF entry (`e_entry`) that goes the Multiboot way when `EAX` holds
//!   the Multiboot magic, else the PVH way.
//!
//! [`elf32`], [`elf32_kludge`] and [`flat`] are the same guest in the forms
//! a Multiboot kernel takes (ELF32 loaded by its program headers, ELF32 with
//! kludge addresses, a flat binary).
//!
//! Memory used: the image itself (about 1.4 MiB incl. bss), a 4 KiB AP
//! trampoline at 0x8000 (written only after the boot info and command line
//! have been copied), the LAPIC at 0xFEE00000, the virtio arena (only when a
//! virtio device is used: rings, request/packet buffers, socket buffers and
//! the network stack, about 0.1 MiB for the disk and 1.5 MiB for the
//! network, page aligned right after the image), and for `dirty=` the
//! bookkeeping array + working set placed right after that. Nothing
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
//! | `touch=WORDS` | 512 | 64-bit words of a page each rewrite changes, 1..=512 (fewer: pages that compress and delta well) |
//! | `virtio_mmio.device=SIZE@BASE:IRQ` | – | a virtio-mmio window, as Linux/Firecracker: SIZE decimal or `0x` hex with optional `K`/`M`/`G`, BASE `0x` hex below 4 GiB, optional `:ID` ignored; may repeat (at most 8 kept) |
//! | `disk=off\|write\|verify` | `off` | disk writer/verifier on the first virtio-blk device |
//! | `flush=N` | 1 | `disk=write`: FLUSH after every N acknowledged records (0 = only when the disk is full) |
//! | `qd=N` | 4 | disk requests in flight, 1..=16 |
//! | `blkq=N` | 1 | disk request queues, 1..=4, where the device offers several (VIRTIO_BLK_F_MQ); request `i` goes on queue `i % N` |
//! | `disk=bench` | – | benchmark mode: `qd` requests of one kind in flight, counted in `disk_acked`, no records or checks |
//! | `io=randread\|randwrite\|read\|write\|flush` | `randread` | `disk=bench`: random or sequential reads or writes of `bs`, or (`flush`) a write then a FLUSH, one after the other (`disk_acked` counts flushes) |
//! | `bs=BYTES` | 4096 | `disk=bench`: request size, a multiple of 4096 up to 1 MiB |
//! | `ip=A.B.C.D/PREFIX` | – | enables the first virtio-net device with this address (prefix defaults to 24) |
//! | `gw=A.B.C.D` | – | default IPv4 route |
//!
//! Unknown keys are reported in the banner as ` unknown=KEY`, keys with an
//! invalid value as ` bad=KEY`; both are otherwise ignored.
//!
//! # Output (COM1, 0x3f8; every line ends in `\n`)
//!
//! ```text
//! ferry-testguest v1 boot=pvh|multiboot cpus=N tsc_khz=K mem_mib=M cmdline="..."[ unknown=KEY][ bad=KEY]
//! MEMMAP ram=0xA+0xL[,0xA+0xL...]        (the RAM regions the loader's memory map gives)
//! MODULES count=N                         (the loader passed N modules; none: no line)
//! MODULE I start=0xA size=S fnv1a=H cmdline="..."   (each of the first 8; H = FNV-1a 64, 16 hex digits)
//! READY                                   (after setup; mode=run only)
//! EXIT code=N                             (mode=exit, then power off)
//! ERROR dirty working set does not fit    (then power off)
//! VERIFY OK pages=P writes=W
//! VERIFY FAIL page=P gen=G word=I expected=0x%016x got=0x%016x
//! STATUS uptime_ms=U writes=W hb=H cpus=C ap_counters=a,b,c[ disk_acked=A disk_durable=D disk_errors=E][ net_rx=R net_tx=T tcp_conns=N]
//! VIRTIO skip base=0xB version=V          (legacy or unknown version)
//! VIRTIO skip base=0xB magic=0xM          (no virtio-mmio device there)
//! VIRTIO skip base=0xB device=ID          (unsupported type, or a second blk/net)
//! VIRTIO dev=N base=0xB irq=I type=block|net   (first of each type; printed even if unused)
//! VIRTIO dev=N error=WHY                  (init failed; device set FAILED)
//! VIRTIO needs-reset dev=N                (DeviceStatus has DEVICE_NEEDS_RESET; once)
//! NET up mac=xx:xx:xx:xx:xx:xx ip=A.B.C.D/P csum=offload|guest   (before READY)
//! NET no ip=                              (net device present, no ip=)
//! NET none                                (ip= given, no usable net device)
//! DISK none                               (disk= on, no usable block device)
//! DISK found=N capacity=C serial="..."    (after READY, when the start-up scan ends)
//! DISK full records=C                     (disk=write: all records written and durable)
//! DISK VERIFY OK records=N
//! DISK VERIFY FAIL record=K reason=R
//! DISK error record=K status=S            (rate limited: first 10, then <= 1/s)
//! DISK off                                (`d` without disk=)
//! FAULT vector=N error=0xE rip=0xR cr2=0xC    (then power off)
//! PANIC <message>                             (then power off)
//! ```
//!
//! * `cmdline` is the effective command line (image path stripped for
//!   Multiboot); `"` and non-printable bytes are shown as `?`.
//! * Modules (Multiboot's, or PVH's module list) are checksummed before the
//!   guest writes anything outside its image, so wherever the loader put
//!   them; a module's `cmdline` is shown as the loader passed it (up to 128
//!   bytes), for Multiboot usually `PATH ARGS`.
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
//! * `dev=N` is the index of the device's token among the
//!   `virtio_mmio.device=` tokens (0-based).
//! * `disk_*` fields appear when `disk=` is not `off` and a block device
//!   was set up; `net_*`/`tcp_conns` when the network is up. `net_rx` /
//!   `net_tx` count Ethernet frames, `tcp_conns` the TCP connections
//!   currently open (not listening, closed or in TIME-WAIT).
//!
//! Every UART byte is written after polling LSR THRE (bit 5). With `hb=1`
//! heartbeat dots are interleaved with the lines above (never inside a
//! line, so they only ever precede a line's first character); strip
//! leading `.`s of each line before parsing (lines can contain dots, e.g.
//! IP addresses in `NET up` and in the banner's `cmdline`).
//!
//! In `NET up`, `csum=offload`: the card offered
//! checksum offload both ways (`CSUM` and `GUEST_CSUM`) and the driver took it: TCP checksums
//! go out for the host to finish (`NEEDS_CSUM`, the pseudo-header sum in the field), and a
//! received segment the host neither checked (`DATA_VALID`) nor left partial is checked by the
//! driver; `csum=guest`: smoltcp computes and checks them all.
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
//! With `touch=K` below 512 only words `0..K` follow that rule; words `K..512`
//! hold `seed(page, 0)` from the first fill on and a rewrite leaves them alone
//! (a page that changes a little at a time, as a real guest's often do: it
//! compresses well and its change since the last copy is small).
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
//! | `d` | re-read records 0..acked-1 and print `DISK VERIFY ...` (deferred until the start-up scan is over; writing pauses meanwhile) |
//!
//! Other bytes are ignored.
//!
//! # virtio (modern virtio-mmio, version 2 only; polling drivers)
//!
//! Every `virtio_mmio.device=` window is probed (MagicValue 0x74726976,
//! Version 2, DeviceID: 2 block, 1 net, 0 empty slot, silently skipped).
//! Only the first block device (if `disk=` is on) and the first net device
//! (if `ip=` is set) are initialised; others are not touched beyond the
//! ID registers. Init follows VIRTIO 1.1 §3.1.1: reset (waits for status
//! 0), ACKNOWLEDGE, DRIVER, DeviceFeatures (sel 0, 1), DriverFeatures =
//! offered ∩ wanted, FEATURES_OK (re-checked), queues (QueueSel,
//! QueueReady must read 0, QueueNumMax, QueueNum = min(QueueNumMax, want)
//! rounded down to a power of two, Desc/Driver/Device Low/High,
//! QueueReady=1), DRIVER_OK. A device without VIRTIO_F_VERSION_1 fails
//! init (`VIRTIO dev=N error=no-version-1`).
//!
//! * Features accepted (if offered): VERSION_1 (32, required),
//!   ACCESS_PLATFORM (33; DMA is identity mapped); block: FLUSH (9);
//!   net: MAC (5). Nothing else (no EVENT_IDX, INDIRECT_DESC, packed rings,
//!   offloads or MRG_RXBUF).
//! * Split virtqueues in the arena, `VIRTQ_AVAIL_F_NO_INTERRUPT` set (IF=0;
//!   interrupts are never acknowledged). The used rings are polled from the
//!   BSP main loop; QueueNotify is written at most once per queue per loop
//!   pass and only after adding buffers, and skipped while the device sets
//!   `VIRTQ_USED_F_NO_NOTIFY`. DeviceStatus is read every ~100 ms.
//! * Block: one queue (index 0), wants 64 entries (needs >= 8). Each request
//!   is a 3-descriptor chain: 16-byte header (device-readable), data
//!   (4096 bytes, or 20 for GET_ID), 1-byte status (device-writable); FLUSH
//!   is header + status. `qd` is capped at QueueNum/3 - 1. Types used: IN,
//!   OUT, FLUSH (only if negotiated), GET_ID (once at start; a non-OK
//!   status just means `serial=""`). Capacity from config offset 0 (u64,
//!   read under ConfigGeneration).
//! * Net: rx queue 0 and tx queue 1, 128 entries wanted each (any power of
//!   two works). 12-byte `virtio_net_hdr_v1` (all zero on tx), one
//!   2048-byte device-writable buffer per rx descriptor (the rx queue is
//!   kept full), one descriptor per tx frame. MAC from config bytes 0..6
//!   if VIRTIO_NET_F_MAC, else 02:00:00:fe:ee:01.
//!
//! # Disk writer / verifier (`disk=`)
//!
//! The disk is an array of 4 KiB records, record k at sector 8k:
//! `FERRYREC`, u64 LE seq = k, u64 LE version = 1, words 3..510 u64 LE
//! `seed(k) + i * 0x9E3779B97F4A7C15` (`seed` = splitmix64 finaliser of
//! `k ^ 0xD15CF0E77E570002`), and at 4088 the FNV-1a 64 of bytes 0..4088.
//! `capacity` = config capacity / 8.
//!
//! After READY the guest reads the serial (GET_ID), then scans from record
//! 0 with `qd` reads in flight: `found` = the length of the valid prefix
//! (records 0..found-1 intact with seq == index). It reads up to 32 records
//! past the first invalid one: an intact record with seq != index anywhere
//! in the scanned range (including at `found`) prints `DISK VERIFY FAIL
//! record=K reason=seq:S` after the `DISK found=` line. Reasons: `magic`
//! (zero/foreign), `checksum` (torn), `version`, `seq:S` (misplaced or
//! stale), `payload`, `io:S` (request status S).
//!
//! `disk=write` then appends records found, found+1, ... (up to `qd` writes
//! in flight, completions tracked out of order): `disk_acked` = length of
//! the contiguous prefix of records whose write completed OK;
//! `disk_durable` = `disk_acked` as of the last FLUSH that completed OK
//! (= `disk_acked` if the device lacks VIRTIO_BLK_F_FLUSH). A failed write
//! (IOERR/UNSUPP) counts in `disk_errors`, prints `DISK error`, and is
//! retried after 10 ms. Writing stops at capacity (`DISK full` once the
//! last flush is done). `disk=verify` only scans; then `disk_acked` =
//! `disk_durable` = found.
//!
//! # Network (`ip=`)
//!
//! smoltcp 0.14 (Ethernet, ARP, IPv4, ICMP echo replies, TCP; clock = TSC
//! ms since boot, so a VMM that preserves the TSC across pause/save/restore
//! keeps connections: smoltcp just retransmits; no TCP timeouts or
//! keep-alives are set). 64 KiB socket buffers, Nagle off.
//!
//! | port | service |
//! |------|---------|
//! | 7 | echo, 4 sockets (4 concurrent connections), any number of sequential ones |
//! | 19 | stream, 2 sockets: u64 LE counters 0, 1, 2, ... as fast as the window allows; input discarded; closes when the peer closes |
//! | 9 | discard, 1 socket |
//!
//! # Power off
//!
//! `outw(0x604, 0x2000)` (ACPI PM1a of ferry and QEMU pc/q35), then
//! `outw(0xB004, 0x2000)`, then `outb(0x64, 0xFE)`, then spin.

/// The test guest ELF image (x86-64, PVH note + Multiboot v1 header).
pub fn elf() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry-testguest.elf"))
}

/// The guest as a 32-bit ELF (i386) whose Multiboot header has no a.out kludge, so a loader
/// places it by its program headers, as GRUB and QEMU's `-kernel` load a Multiboot kernel
/// linked the usual way. No PVH note: every loader boots it by Multiboot.
pub fn elf32() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry-testguest32.elf"))
}

/// [`elf32`] with the Multiboot header's a.out kludge addresses kept (they win over the ELF
/// program headers).
pub fn elf32_kludge() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry-testguest32-kludge.elf"))
}

/// The guest as a flat binary (`objcopy -O binary`), which only its Multiboot header's a.out
/// kludge addresses describe.
pub fn flat() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry-testguest.bin"))
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
