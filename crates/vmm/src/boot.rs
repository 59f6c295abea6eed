//! Loading a kernel and writing what its boot protocol expects.
//!
//! Three protocols, picked from the image itself:
//! - PVH: an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note (ferry's test guest, Linux vmlinux
//!   built with `CONFIG_PVH`). Entry in 32-bit protected mode, `ebx` = `hvm_start_info`.
//! - Multiboot v1: an image with a Multiboot header in its first 8 KiB, loaded as ELF or by
//!   the header's a.out "kludge" addresses. Entry in 32-bit protected mode, `eax` =
//!   0x2BADB002, `ebx` = the Multiboot info structure.
//! - Linux bzImage: loaded by its setup header, entered at its 64-bit entry point with
//!   `rsi` = the zero page, identity page tables and a flat GDT prepared by ferry.

use std::fs::File;
use std::path::{Path, PathBuf};

use ferry_api::BootModule;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestMemory;

/// How the first vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, `ebx` = start info.
    Pvh { entry: u64 },
    /// Multiboot v1: 32-bit protected mode at `entry`, `eax` = magic, `ebx` = info.
    Multiboot { entry: u64 },
    /// Linux 64-bit boot protocol: long mode at `entry`, `rsi` = zero page.
    Linux64 { entry: u64 },
}

impl BootEntry {
    /// A short name for logs and status.
    pub fn protocol(&self) -> &'static str {
        match self {
            BootEntry::Pvh { .. } => "pvh",
            BootEntry::Multiboot { .. } => "multiboot",
            BootEntry::Linux64 { .. } => "linux",
        }
    }
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a kernel ferry can boot: expected an ELF with a PVH note or a Multiboot header, or a Linux bzImage"
    )]
    UnknownFormat { path: PathBuf },
    #[error("loading kernel {path} failed")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path}: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("a Linux bzImage takes one initrd, {0} were given (concatenate cpio archives into one file)")]
    InitrdCount(usize),
    #[error("{0} modules given; ferry passes at most {MAX_MODULES}")]
    TooManyModules(usize),
    #[error("module {path} does not fit: it would end at {end:#x}, past the VM's memory below {limit:#x} (give the VM more memory)")]
    ModulesTooLarge { path: PathBuf, end: u64, limit: u64 },
    #[error("writing boot structures to guest memory failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const MULTIBOOT_SEARCH: usize = 8192;
/// Multiboot header flags a loader must honour: modules page aligned, a memory map, a video mode.
const MB_PAGE_ALIGN: u32 = 1 << 0;
const MB_MEMORY_INFO: u32 = 1 << 1;
const MB_VIDEO_MODE: u32 = 1 << 2;
/// Multiboot information flags: mem_lower/upper, cmdline, modules, memory map, loader name.
const MBI_MEMORY: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;
/// Most modules (or initrds) a kernel is given.
pub const MAX_MODULES: usize = 64;
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// The register value a Multiboot kernel expects in `eax`.
pub const fn multiboot_eax() -> u32 {
    MULTIBOOT_BOOTLOADER_MAGIC
}

/// A Multiboot v1 header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MultibootHeader {
    file_offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn find_multiboot(image: &[u8]) -> Option<MultibootHeader> {
    let word = |o: usize| -> Option<u32> {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let limit = image.len().min(MULTIBOOT_SEARCH);
    (0..limit.saturating_sub(12)).step_by(4).find_map(|off| {
        let (magic, flags, sum) = (word(off)?, word(off + 4)?, word(off + 8)?);
        if magic != MULTIBOOT_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            return None;
        }
        Some(MultibootHeader {
            file_offset: off,
            flags,
            header_addr: word(off + 12).unwrap_or(0),
            load_addr: word(off + 16).unwrap_or(0),
            load_end_addr: word(off + 20).unwrap_or(0),
            bss_end_addr: word(off + 24).unwrap_or(0),
            entry_addr: word(off + 28).unwrap_or(0),
        })
    })
}

/// Load the kernel (and its initrd or modules) named by the config into `mem`, write the boot
/// structures and return how the boot vCPU must start.
///
/// `device_tokens` (`virtio_mmio.device=...`) are appended to the command line of ELF kernels
/// (PVH, Multiboot), which may not read ACPI; a bzImage finds its devices in the ACPI DSDT.
pub fn load_kernel(
    mem: &GuestMemory,
    kernel: &Path,
    cmdline: &str,
    device_tokens: &str,
    modules: &[BootModule],
) -> Result<BootEntry, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    };
    let bad = |reason: String| BootError::BadImage {
        path: kernel.to_path_buf(),
        reason,
    };
    let image = std::fs::read(kernel).map_err(open_err)?;
    let head = &image[..image.len().min(MULTIBOOT_SEARCH)];
    let with_tokens = format!("{cmdline}{device_tokens}");
    let with_tokens = with_tokens.trim_start();
    if modules.len() > MAX_MODULES {
        return Err(BootError::TooManyModules(modules.len()));
    }
    let mem_bytes = crate::memory::total_bytes(mem);
    let low_end = mem_bytes.min(MMIO_GAP_START);

    if head.get(0x202..0x206) == Some(b"HdrS") {
        if modules.len() > 1 {
            return Err(BootError::InitrdCount(modules.len()));
        }
        let mut file = File::open(kernel).map_err(open_err)?;
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
            |source| BootError::Load {
                path: kernel.to_path_buf(),
                source,
            },
        )?;
        let header = res
            .setup_header
            .ok_or_else(|| bad("bzImage without a setup header".into()))?;
        write_cmdline(mem, cmdline)?;
        let initrd = match modules.first() {
            Some(m) => {
                let data = read_module(m)?;
                let addr = place_below(low_end, data.len() as u64, low_end)?;
                write(mem, addr, &data)?;
                Some((addr, data.len() as u64))
            }
            None => None,
        };
        write_zero_page(mem, header, cmdline, initrd, mem_bytes)?;
        setup_long_mode_tables(mem)?;
        return Ok(BootEntry::Linux64 {
            entry: res.kernel_load.0 + 0x200,
        });
    }

    let mb = find_multiboot(head);
    let elf = if head.starts_with(b"\x7fELF") {
        Some(crate::elf::parse(&image).map_err(bad)?)
    } else {
        None
    };
    if let Some(mb) = &mb {
        // Bits 0-15 are requirements: a loader that cannot meet one must refuse the image.
        let unknown = mb.flags & 0xffff & !(MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_VIDEO_MODE);
        if unknown != 0 && elf.as_ref().is_none_or(|e| e.pvh_entry.is_none()) {
            return Err(bad(format!(
                "its Multiboot header asks for loader features ferry does not have (flags {unknown:#x})"
            )));
        }
    }
    let (entry, image_end) = match (&elf, &mb) {
        (Some(e @ crate::elf::ElfImage {
            pvh_entry: Some(entry),
            ..
        }), _) => {
            load_segments(mem, &image, e, low_end).map_err(bad)?;
            (BootEntry::Pvh { entry: *entry }, e.end())
        }
        // The a.out kludge addresses, where the header has them, win over the ELF headers
        // (Multiboot spec 3.1.3; GRUB and QEMU do the same).
        (_, Some(mb)) if mb.flags & MULTIBOOT_AOUT_KLUDGE != 0 => {
            let end = load_multiboot_kludge(mem, &image, mb, low_end).map_err(bad)?;
            let entry = u64::from(mb.entry_addr);
            (BootEntry::Multiboot { entry }, end)
        }
        (Some(e), Some(_)) => {
            load_segments(mem, &image, e, low_end).map_err(bad)?;
            (BootEntry::Multiboot { entry: e.entry }, e.end())
        }
        (Some(_), None) => {
            return Err(bad(
                "this ELF has neither a PVH note nor a Multiboot header, so ferry cannot tell how to start it".into(),
            ))
        }
        (None, _) => {
            return Err(BootError::UnknownFormat {
                path: kernel.to_path_buf(),
            })
        }
    };
    if let (BootEntry::Multiboot { .. }, Some(mb)) = (entry, &mb) {
        if mb.flags & MB_VIDEO_MODE != 0 {
            tracing::warn!(
                "{}: its Multiboot header asks for a video mode; ferry has no display, so the kernel gets none",
                kernel.display()
            );
        }
    }

    match entry {
        BootEntry::Pvh { .. } => {
            write_cmdline(mem, with_tokens)?;
            let mods = place_pvh_modules(mem, modules, image_end, low_end)?;
            write_pvh_start_info(mem, &mods, mem_bytes)?;
        }
        BootEntry::Multiboot { .. } => {
            // GRUB and QEMU start a Multiboot command line with the kernel's path.
            write_cmdline(mem, &format!("{} {with_tokens}", kernel.display()))?;
            let mods = place_multiboot_modules(mem, modules, image_end, low_end)?;
            write_multiboot_info(mem, &mods, mem_bytes)?;
        }
        BootEntry::Linux64 { .. } => unreachable!("returned above"),
    }
    Ok(entry)
}

/// Where an ELF image's segments go, checked against guest memory, then copied there. The
/// memory is freshly mapped (zero), so a segment's .bss needs no writing.
fn load_segments(
    mem: &GuestMemory,
    image: &[u8],
    elf: &crate::elf::ElfImage,
    low_end: u64,
) -> Result<(), String> {
    for s in &elf.segments {
        check_range(s.paddr, s.memsz, low_end)?;
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(data, GuestAddress(s.paddr))
            .map_err(|e| format!("writing a segment at {:#x}: {e}", s.paddr))?;
    }
    Ok(())
}

/// A kernel range must lie in RAM above 1 MiB (below it live ferry's boot structures) and
/// below the end of low memory.
fn check_range(addr: u64, len: u64, low_end: u64) -> Result<(), String> {
    let end = addr.saturating_add(len);
    if addr < HIMEM_START {
        return Err(format!(
            "it loads at {addr:#x}, below 1 MiB, where the boot structures are (link it at 1 MiB or above)"
        ));
    }
    if end > low_end {
        return Err(format!(
            "it loads at {addr:#x}..{end:#x}, beyond the VM's memory below {low_end:#x} (give the VM more memory)"
        ));
    }
    Ok(())
}

/// A module's bytes and where its command line will sit.
struct PlacedModule {
    addr: u64,
    size: u64,
    cmdline_addr: u64,
}

fn read_module(m: &BootModule) -> Result<Vec<u8>, BootError> {
    std::fs::read(&m.path).map_err(|source| BootError::ReadInitrd {
        path: m.path.clone(),
        source,
    })
}

fn write(mem: &GuestMemory, addr: u64, data: &[u8]) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(BootError::Memory)
}

/// The page-aligned address `size` bytes below `top`, if it stays clear of the kernel's
/// first 16 MiB.
fn place_below(top: u64, size: u64, low_end: u64) -> Result<u64, BootError> {
    top.checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START + (16 << 20))
        .ok_or(BootError::InitrdTooLarge {
            size,
            limit: low_end,
        })
}

/// Multiboot modules go right after the kernel, page aligned, as GRUB and QEMU place them,
/// then their command lines.
fn place_multiboot_modules(
    mem: &GuestMemory,
    modules: &[BootModule],
    image_end: u64,
    low_end: u64,
) -> Result<Vec<PlacedModule>, BootError> {
    let align = |a: u64| (a + 0xfff) & !0xfff;
    let mut next = align(image_end);
    let mut placed = Vec::with_capacity(modules.len());
    for m in modules {
        let data = read_module(m)?;
        let size = data.len() as u64;
        if next + size > low_end {
            return Err(BootError::ModulesTooLarge {
                path: m.path.clone(),
                end: next + size,
                limit: low_end,
            });
        }
        write(mem, next, &data)?;
        placed.push(PlacedModule {
            addr: next,
            size,
            cmdline_addr: 0,
        });
        next = align(next + size);
    }
    for (p, m) in placed.iter_mut().zip(modules) {
        let mut line = m.cmdline().into_bytes();
        line.push(0);
        if next + line.len() as u64 > low_end {
            return Err(BootError::ModulesTooLarge {
                path: m.path.clone(),
                end: next + line.len() as u64,
                limit: low_end,
            });
        }
        write(mem, next, &line)?;
        p.cmdline_addr = next;
        next += line.len() as u64;
    }
    Ok(placed)
}

/// PVH modules (a Linux initrd first) go at the top of low memory, out of the way of a
/// kernel that decompresses itself upwards; their command lines above them.
fn place_pvh_modules(
    mem: &GuestMemory,
    modules: &[BootModule],
    image_end: u64,
    low_end: u64,
) -> Result<Vec<PlacedModule>, BootError> {
    let lines: Vec<Vec<u8>> = modules
        .iter()
        .map(|m| {
            let mut l = m.cmdline().into_bytes();
            l.push(0);
            l
        })
        .collect();
    let total: u64 = lines.iter().map(|l| l.len() as u64).sum();
    let mut top = if modules.is_empty() {
        low_end
    } else {
        place_below(low_end, total, low_end)?
    };
    let mut at = top;
    let mut placed = Vec::with_capacity(modules.len());
    for line in &lines {
        write(mem, at, line)?;
        placed.push(PlacedModule {
            addr: 0,
            size: 0,
            cmdline_addr: at,
        });
        at += line.len() as u64;
    }
    for (p, m) in placed.iter_mut().zip(modules) {
        let data = read_module(m)?;
        let addr = place_below(top, data.len() as u64, low_end)?;
        if addr < image_end {
            return Err(BootError::ModulesTooLarge {
                path: m.path.clone(),
                end: image_end,
                limit: low_end,
            });
        }
        write(mem, addr, &data)?;
        p.addr = addr;
        p.size = data.len() as u64;
        top = addr;
    }
    Ok(placed)
}

fn load_multiboot_kludge(
    mem: &GuestMemory,
    image: &[u8],
    mb: &MultibootHeader,
    low_end: u64,
) -> Result<u64, String> {
    if mb.header_addr < mb.load_addr || mb.entry_addr < mb.load_addr {
        return Err("its Multiboot header addresses are inconsistent".into());
    }
    let start = (mb.file_offset as u64)
        .checked_sub(u64::from(mb.header_addr - mb.load_addr))
        .ok_or("its Multiboot load address lies before the start of the file")?;
    let file_len = image.len() as u64;
    let load_len = if mb.load_end_addr == 0 {
        file_len - start
    } else {
        u64::from(
            mb.load_end_addr
                .checked_sub(mb.load_addr)
                .ok_or("its Multiboot load_end_addr lies below load_addr")?,
        )
    };
    if start + load_len > file_len {
        return Err("its Multiboot load range runs past the end of the file".into());
    }
    let load = u64::from(mb.load_addr);
    let end = if mb.bss_end_addr == 0 {
        load + load_len
    } else {
        u64::from(mb.bss_end_addr).max(load + load_len)
    };
    check_range(load, end - load, low_end)?;
    if u64::from(mb.entry_addr) >= end {
        return Err("its Multiboot entry address lies outside the loaded image".into());
    }
    mem.write_slice(
        &image[start as usize..(start + load_len) as usize],
        GuestAddress(load),
    )
    .map_err(|e| format!("writing the image at {load:#x}: {e}"))?;
    // The .bss up to bss_end_addr is fresh guest memory, so already zero.
    Ok(end)
}

/// The command line at CMDLINE_START, NUL-terminated, if it fits.
fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(mem, CMDLINE_START, &bytes)
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    modules: &[PlacedModule],
    mem_bytes: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem_bytes);
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version: has memmap fields
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(modules.len() as u32).to_le_bytes()); // nr_modules
    info.extend_from_slice(&PVH_MODLIST_START.to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&crate::acpi::RSDP_START.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    write(mem, PVH_INFO_START, &info)?;
    let mut list = Vec::with_capacity(modules.len() * 32);
    for m in modules {
        list.extend_from_slice(&m.addr.to_le_bytes());
        list.extend_from_slice(&m.size.to_le_bytes());
        list.extend_from_slice(&m.cmdline_addr.to_le_bytes());
        list.extend_from_slice(&0u64.to_le_bytes());
    }
    write(mem, PVH_MODLIST_START, &list)?;
    let mut entries = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in map {
        entries.extend_from_slice(&addr.to_le_bytes());
        entries.extend_from_slice(&size.to_le_bytes());
        entries.extend_from_slice(&ty.to_le_bytes());
        entries.extend_from_slice(&0u32.to_le_bytes());
    }
    write(mem, PVH_MEMMAP_START, &entries)
}

/// The Multiboot information structure (spec section 3.3) with its memory map, module list
/// and the loader's name.
fn write_multiboot_info(
    mem: &GuestMemory,
    modules: &[PlacedModule],
    mem_bytes: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem_bytes);
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes()); // size of the entry without this field
        mmap.extend_from_slice(&addr.to_le_bytes());
        mmap.extend_from_slice(&size.to_le_bytes());
        mmap.extend_from_slice(&ty.to_le_bytes());
    }
    let mut mods = Vec::with_capacity(modules.len() * 16);
    for m in modules {
        mods.extend_from_slice(&(m.addr as u32).to_le_bytes());
        mods.extend_from_slice(&((m.addr + m.size) as u32).to_le_bytes());
        mods.extend_from_slice(&(m.cmdline_addr as u32).to_le_bytes());
        mods.extend_from_slice(&0u32.to_le_bytes());
    }
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut info = [0u8; 72];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
    );
    put(4, (EBDA_START / 1024) as u32); // mem_lower: KiB from 0
    put(8, ((low_end - HIMEM_START) / 1024) as u32); // mem_upper: KiB from 1 MiB to the first hole
    put(16, CMDLINE_START as u32);
    put(20, modules.len() as u32);
    put(24, MB_MODS_START as u32);
    put(44, mmap.len() as u32);
    put(48, MB_MMAP_START as u32);
    put(64, MB_LOADER_NAME_START as u32);
    write(mem, MB_INFO_START, &info)?;
    write(mem, MB_MMAP_START, &mmap)?;
    write(mem, MB_MODS_START, &mods)?;
    write(
        mem,
        MB_LOADER_NAME_START,
        concat!("ferry ", env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
    )
}

fn write_zero_page(
    mem: &GuestMemory,
    header: linux_loader::loader::bootparam::setup_header,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    mem_bytes: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff; // "undefined" loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.acpi_rsdp_addr = crate::acpi::RSDP_START;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, ty)) in memory_map(mem_bytes).into_iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = ty;
        params.e820_entries = i as u8 + 1;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Memory)
}

/// The flat GDT used for 64-bit Linux entry: null, code64, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];

/// Identity-map the first 1 GiB with 2 MiB pages, and write the boot GDT.
fn setup_long_mode_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(BootError::Memory);
    w(PDPTE_START | 0x03, PML4_START)?;
    w(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    for (i, d) in BOOT_GDT.iter().enumerate() {
        w(*d, BOOT_GDT_START + i as u64 * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiboot_header_is_found_and_checksummed() {
        let mut img = vec![0u8; 4096];
        let hdr = [
            MULTIBOOT_MAGIC,
            MULTIBOOT_AOUT_KLUDGE,
            0u32.wrapping_sub(MULTIBOOT_MAGIC + MULTIBOOT_AOUT_KLUDGE),
        ];
        for (i, w) in hdr.iter().enumerate() {
            img[64 + i * 4..68 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        let mb = find_multiboot(&img).unwrap();
        assert_eq!(mb.file_offset, 64);
        img[72] ^= 1;
        assert_eq!(find_multiboot(&img), None);
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("ferry-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("garbage");
        std::fs::write(&k, vec![0x5au8; 10000]).unwrap();
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        let e = load_kernel(&mem, &k, "", "", &[]).unwrap_err();
        assert!(matches!(e, BootError::UnknownFormat { .. }), "{e}");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(load_kernel(&mem, &k, "", "", &[]).is_err());
        assert!(matches!(
            load_kernel(&mem, &dir.join("missing"), "", "", &[]),
            Err(BootError::OpenKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
