//! Where things live in guest-physical memory.
//!
//! ```text
//! 0x0000_0500  GDT for 64-bit Linux boot (bzImage)
//! 0x0000_5000  Multiboot info, its memory map at 0x5100, modules at 0x5200, loader name 0x5600
//! 0x0000_6000  PVH hvm_start_info, module list at 0x6040
//! 0x0000_7000  PVH memory map / Linux zero page (never both)
//! 0x0000_9000  identity page tables for 64-bit Linux boot (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA (reserved)
//! 0x0010_0000  kernel (1 MiB); Multiboot modules right after it, PVH modules and a Linux
//!              initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

/// 64-bit boot GDT (bzImage path).
pub const BOOT_GDT_START: u64 = 0x500;
/// Multiboot information structure.
pub const MB_INFO_START: u64 = 0x5000;
/// Multiboot memory map.
pub const MB_MMAP_START: u64 = 0x5100;
/// Multiboot module list (16 bytes a module, up to `boot::MAX_MODULES`).
pub const MB_MODS_START: u64 = 0x5200;
/// The boot loader's name, for Multiboot.
pub const MB_LOADER_NAME_START: u64 = 0x5600;
/// PVH start info.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot stack for 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for 64-bit Linux entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, the end of usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded, and where "high memory" starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// RAM beyond the gap resumes at 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS area (three pages just below the LAPIC is conventional; we use the top of the gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page (needed by some KVM flavours before the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// E820 / PVH memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest-physical RAM ranges for `mem_bytes` of RAM.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((HIGH_RAM_START, mem_bytes - low));
    }
    ranges
}

/// The memory map a guest is told about: (address, size, type).
pub fn memory_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let ranges = ram_ranges(mem_bytes);
    let low_end = ranges[0].1;
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if let Some(&(start, size)) = ranges.get(1) {
        map.push((start, size, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_has_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn big_vm_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let map = memory_map(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (0x10_0000 - EBDA_START));
    }
}
