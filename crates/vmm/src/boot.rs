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
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
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
    #[error("an initrd needs a Linux kernel (bzImage or PVH vmlinux); this image boots by {0}")]
    InitrdUnsupported(&'static str),
    #[error("writing boot structures to guest memory failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const MULTIBOOT_SEARCH: usize = 8192;
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

/// Load the kernel (and initrd) named by the config into `mem`, write the boot structures
/// and return how the boot vCPU must start.
///
/// `device_tokens` (`virtio_mmio.device=...`) are appended to the command line of ELF kernels
/// (PVH, Multiboot), which may not read ACPI; a bzImage finds its devices in the ACPI DSDT.
pub fn load_kernel(
    mem: &GuestMemory,
    kernel: &Path,
    cmdline: &str,
    device_tokens: &str,
    initrd: Option<&Path>,
) -> Result<BootEntry, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    };
    let mut file = File::open(kernel).map_err(open_err)?;
    let mut head = vec![0u8; MULTIBOOT_SEARCH];
    let n = read_up_to(&mut file, &mut head).map_err(open_err)?;
    head.truncate(n);
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let with_tokens = format!("{cmdline}{device_tokens}");
    let with_tokens = with_tokens.trim_start();
    if with_tokens.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: with_tokens.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let load_err = |source| BootError::Load {
        path: kernel.to_path_buf(),
        source,
    };
    let mem_bytes = crate::memory::total_bytes(mem);

    let entry = if head.starts_with(b"\x7fELF") {
        let res =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        match (res.pvh_boot_cap, find_multiboot(&head)) {
            (PvhBootCapability::PvhEntryPresent(entry), _) => BootEntry::Pvh { entry: entry.0 },
            (_, Some(mb)) => {
                let entry = if mb.flags & MULTIBOOT_AOUT_KLUDGE != 0 {
                    u64::from(mb.entry_addr)
                } else {
                    elf_entry(&head).ok_or_else(|| BootError::BadImage {
                        path: kernel.to_path_buf(),
                        reason: "ELF header has no entry point".into(),
                    })?
                };
                BootEntry::Multiboot { entry }
            }
            _ => {
                return Err(BootError::UnknownFormat {
                    path: kernel.to_path_buf(),
                })
            }
        }
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        let header = res.setup_header.ok_or_else(|| BootError::BadImage {
            path: kernel.to_path_buf(),
            reason: "bzImage without a setup header".into(),
        })?;
        write_cmdline(mem, cmdline)?;
        let initrd = initrd.map(|p| load_initrd(mem, p, mem_bytes)).transpose()?;
        write_zero_page(mem, header, cmdline, initrd, mem_bytes)?;
        setup_long_mode_tables(mem)?;
        return Ok(BootEntry::Linux64 {
            entry: res.kernel_load.0 + 0x200,
        });
    } else if let Some(mb) = find_multiboot(&head) {
        load_multiboot_kludge(mem, &mut file, kernel, &mb)?;
        BootEntry::Multiboot {
            entry: u64::from(mb.entry_addr),
        }
    } else {
        return Err(BootError::UnknownFormat {
            path: kernel.to_path_buf(),
        });
    };

    write_cmdline(mem, with_tokens)?;
    match entry {
        BootEntry::Pvh { .. } => {
            let initrd = initrd.map(|p| load_initrd(mem, p, mem_bytes)).transpose()?;
            write_pvh_start_info(mem, initrd, mem_bytes)?;
        }
        BootEntry::Multiboot { .. } => {
            if initrd.is_some() {
                return Err(BootError::InitrdUnsupported("multiboot"));
            }
            write_multiboot_info(mem, mem_bytes)?;
        }
        BootEntry::Linux64 { .. } => unreachable!("returned above"),
    }
    Ok(entry)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn elf_entry(head: &[u8]) -> Option<u64> {
    let b = head.get(24..32)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn load_multiboot_kludge(
    mem: &GuestMemory,
    file: &mut File,
    path: &Path,
    mb: &MultibootHeader,
) -> Result<(), BootError> {
    let bad = |reason: &str| BootError::BadImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if mb.flags & MULTIBOOT_AOUT_KLUDGE == 0 {
        return Err(bad(
            "Multiboot header without load addresses in a non-ELF image",
        ));
    }
    if mb.header_addr < mb.load_addr || mb.entry_addr < mb.load_addr {
        return Err(bad("Multiboot header addresses are inconsistent"));
    }
    let start = (mb.file_offset as u64)
        .checked_sub(u64::from(mb.header_addr - mb.load_addr))
        .ok_or_else(|| bad("Multiboot load address lies before the file start"))?;
    let file_len = file
        .metadata()
        .map_err(|e| BootError::OpenKernel {
            path: path.into(),
            source: e,
        })?
        .len();
    let load_len = if mb.load_end_addr == 0 {
        file_len - start
    } else {
        u64::from(
            mb.load_end_addr
                .checked_sub(mb.load_addr)
                .ok_or_else(|| bad("load_end_addr < load_addr"))?,
        )
    };
    if start + load_len > file_len {
        return Err(bad("Multiboot load range runs past the end of the file"));
    }
    let mut data = vec![0u8; load_len as usize];
    file.seek(SeekFrom::Start(start))
        .map_err(|e| BootError::OpenKernel {
            path: path.into(),
            source: e,
        })?;
    file.read_exact(&mut data)
        .map_err(|e| BootError::OpenKernel {
            path: path.into(),
            source: e,
        })?;
    let load = u64::from(mb.load_addr);
    if load < HIMEM_START {
        return Err(bad("Multiboot image loads below 1 MiB"));
    }
    mem.write_slice(&data, GuestAddress(load))
        .map_err(BootError::Memory)?;
    if mb.bss_end_addr > mb.load_addr + load_len as u32 {
        let bss = vec![0u8; (mb.bss_end_addr - mb.load_addr) as usize - load_len as usize];
        mem.write_slice(&bss, GuestAddress(load + load_len))
            .map_err(BootError::Memory)?;
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::Memory)
}

/// Put the initrd at the top of low RAM (below 3 GiB / the end of low memory), page
/// aligned. Returns (address, size).
fn load_initrd(mem: &GuestMemory, path: &Path, mem_bytes: u64) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.into(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START + (16 << 20))
        .ok_or(BootError::InitrdTooLarge {
            size,
            limit: low_end,
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    initrd: Option<(u64, u64)>,
    mem_bytes: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem_bytes);
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version: has memmap fields
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    info.extend_from_slice(&PVH_MODLIST_START.to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&crate::acpi::RSDP_START.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::Memory)?;
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
        m.extend_from_slice(&0u64.to_le_bytes());
        mem.write_slice(&m, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::Memory)?;
    }
    let mut entries = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in map {
        entries.extend_from_slice(&addr.to_le_bytes());
        entries.extend_from_slice(&size.to_le_bytes());
        entries.extend_from_slice(&ty.to_le_bytes());
        entries.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&entries, GuestAddress(PVH_MEMMAP_START))
        .map_err(BootError::Memory)
}

fn write_multiboot_info(mem: &GuestMemory, mem_bytes: u64) -> Result<(), BootError> {
    let map = memory_map(mem_bytes);
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes()); // size of the entry without this field
        mmap.extend_from_slice(&addr.to_le_bytes());
        mmap.extend_from_slice(&size.to_le_bytes());
        mmap.extend_from_slice(&ty.to_le_bytes());
    }
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let mut info = [0u8; 52];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, 1 | (1 << 2) | (1 << 6)); // mem_lower/upper, cmdline, mmap
    put(4, (EBDA_START / 1024) as u32);
    put(8, ((low_end - HIMEM_START) / 1024) as u32);
    put(16, CMDLINE_START as u32);
    put(44, mmap.len() as u32);
    put(48, MB_MMAP_START as u32);
    mem.write_slice(&info, GuestAddress(MB_INFO_START))
        .map_err(BootError::Memory)?;
    mem.write_slice(&mmap, GuestAddress(MB_MMAP_START))
        .map_err(BootError::Memory)
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
        let e = load_kernel(&mem, &k, "", "", None).unwrap_err();
        assert!(matches!(e, BootError::UnknownFormat { .. }), "{e}");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(load_kernel(&mem, &k, "", "", None).is_err());
        assert!(matches!(
            load_kernel(&mem, &dir.join("missing"), "", "", None),
            Err(BootError::OpenKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
