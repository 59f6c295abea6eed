//! Guest memory: allocation, KVM memory slots, dirty-page tracking, and saving to / loading
//! from a file.
//!
//! Dirty pages are the union of two sources, and missing either silently corrupts a moved
//! guest:
//! - KVM's dirty log (`KVM_GET_DIRTY_LOG`) for every write the guest's vCPUs make;
//! - vm-memory's [`AtomicBitmap`], set by every write the VMM itself makes through guest
//!   memory accessors (virtio used rings, block reads into guest buffers, boot structures).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout;

/// Guest memory with a per-page bitmap of the VMM's own writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Page size used for dirty tracking and memory files.
pub const PAGE_SIZE: usize = 4096;

/// Errors from guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot}")]
    SetSlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("reading the dirty log of slot {slot} failed")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory access failed")]
    Access(#[source] vm_memory::GuestMemoryError),
    #[error("memory file I/O failed")]
    Io(#[source] io::Error),
    #[error("memory file is {got} bytes, the VM has {expected} bytes of RAM")]
    FileSize { expected: u64, got: u64 },
    #[error("memory file checksum mismatch (expected {expected:#010x}, got {got:#010x}): the file is damaged")]
    Checksum { expected: u32, got: u32 },
}

/// Allocate guest RAM of `mem_bytes`, laid out per [`layout::ram_ranges`].
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: mem_bytes >> 20,
        source,
    })
}

/// Register (or re-register) every region with KVM as slots 0..n, with or without dirty
/// logging.
pub fn register_slots(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(MemoryError::Access)?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM holds for as long
        // as the VM fd exists; the slot covers exactly that mapping.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetSlot { slot, source })?;
    }
    Ok(())
}

/// One dirty bitmap per memory region, one bit per 4 KiB page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per region: guest-physical start, and bitmap words.
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, words)| words.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Guest-physical addresses of dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, words)| {
            words.iter().enumerate().flat_map(move |(i, &w)| {
                (0..64)
                    .filter(move |b| w & (1 << b) != 0)
                    .map(move |b| start + ((i as u64 * 64 + b) * PAGE_SIZE as u64))
            })
        })
    }

    /// Add `other`'s dirty pages (a bitmap of the same memory).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for ((_, mine), (_, theirs)) in self.regions.iter_mut().zip(&other.regions) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m |= t;
            }
        }
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.regions.iter().any(|(start, words)| {
            let Some(off) = gpa.checked_sub(*start) else {
                return false;
            };
            let page = (off / PAGE_SIZE as u64) as usize;
            words
                .get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        })
    }
}

/// Start KVM dirty logging on every slot and forget what the VMM wrote before.
pub fn start_dirty_log(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    register_slots(vm, mem, true)?;
    for region in mem.iter() {
        region.get_mmap().bitmap().reset();
    }
    Ok(())
}

/// Stop KVM dirty logging.
pub fn stop_dirty_log(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    register_slots(vm, mem, false)
}

/// Take and clear the dirty pages since the last call (or since [`start_dirty_log`]):
/// KVM's log OR the VMM's own writes.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory) -> Result<DirtyBitmap, MemoryError> {
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let len = region.len() as usize;
        let mut words = vm
            .get_dirty_log(slot, len)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        // The VMM's own writes, a word (64 pages) at a time, taken and cleared atomically.
        let vmm = region.get_mmap().bitmap().get_and_reset();
        for (w, v) in words.iter_mut().zip(vmm) {
            *w |= v;
        }
        regions.push((region.start_addr().0, words));
    }
    Ok(DirtyBitmap { regions })
}

/// Pages of guest RAM that may hold data: those the host has resident or swapped out
/// (from /proc/self/pagemap). Any other page of the anonymous mapping has never been written
/// and reads as zero, so a migration's first pass can skip it.
pub fn populated_pages(mem: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(MemoryError::Io)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(MemoryError::Access)? as u64;
        let pages = region.len() / PAGE_SIZE as u64;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(4096);
            let chunk = &mut buf[..(n * 8) as usize];
            pagemap
                .read_exact_at(chunk, (host / PAGE_SIZE as u64 + done) * 8)
                .map_err(MemoryError::Io)?;
            for (i, e) in chunk.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().unwrap_or([0xff; 8]));
                // bit 63: present, bit 62: swapped
                if entry & (3 << 62) != 0 {
                    out.push(region.start_addr().0 + (done + i as u64) * PAGE_SIZE as u64);
                }
            }
            done += n;
        }
    }
    Ok(out)
}

/// Total bytes of guest RAM.
pub fn total_bytes(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

const CHUNK: usize = 1 << 20;

/// Write all of guest memory to `file` (regions back to back), leaving holes where pages
/// are zero. Returns the CRC-32 of the full contents and the bytes actually written.
pub fn save_to_file(mem: &GuestMemory, file: &mut File) -> Result<(u32, u64), MemoryError> {
    let total = total_bytes(mem);
    file.set_len(total).map_err(MemoryError::Io)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = CHUNK.min((len - off) as usize);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + off))
                .map_err(MemoryError::Access)?;
            crc.update(chunk);
            for (i, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, file_off + (i * PAGE_SIZE) as u64)
                        .map_err(MemoryError::Io)?;
                    written += page.len() as u64;
                }
            }
            off += n as u64;
            file_off += n as u64;
        }
    }
    file.flush().map_err(MemoryError::Io)?;
    Ok((crc.finalize(), written))
}

/// Check that `file` holds exactly the RAM of `mem_bytes` with checksum `crc`, without
/// touching any guest memory.
pub fn verify_file(file: &mut File, mem_bytes: u64, crc: u32) -> Result<(), MemoryError> {
    let got = file.metadata().map_err(MemoryError::Io)?.len();
    if got != mem_bytes {
        return Err(MemoryError::FileSize {
            expected: mem_bytes,
            got,
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(MemoryError::Io)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).map_err(MemoryError::Io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let computed = hasher.finalize();
    if computed != crc {
        return Err(MemoryError::Checksum {
            expected: crc,
            got: computed,
        });
    }
    Ok(())
}

/// Fill guest memory from a file written by [`save_to_file`]. Zero pages are skipped (fresh
/// guest memory is already zero), so they cost no host memory.
pub fn load_from_file(mem: &GuestMemory, file: &mut File) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = CHUNK.min((len - off) as usize);
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, file_off)
                .map_err(MemoryError::Io)?;
            for (i, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let gpa = region.start_addr().0 + off + (i * PAGE_SIZE) as u64;
                    mem.write_slice(page, GuestAddress(gpa))
                        .map_err(MemoryError::Access)?;
                }
            }
            off += n as u64;
            file_off += n as u64;
        }
    }
    Ok(())
}

/// The region holding `gpa`, if any (for tests and diagnostics).
pub fn region_of(mem: &GuestMemory, gpa: u64) -> Option<&GuestRegionMmap<AtomicBitmap>> {
    mem.iter()
        .find(|r| gpa >= r.start_addr().0 && gpa < r.start_addr().0 + r.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_sparse() {
        let mem = create_guest_memory(32 << 20).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x1234_u64, GuestAddress((32 << 20) - 8))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("ferry-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let (crc, written) = save_to_file(&mem, &mut f).unwrap();
        assert_eq!(
            written,
            2 * PAGE_SIZE as u64,
            "only non-zero pages are written"
        );
        verify_file(&mut f, 32 << 20, crc).unwrap();
        let other = create_guest_memory(32 << 20).unwrap();
        load_from_file(&other, &mut f).unwrap();
        assert_eq!(
            other.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            other.read_obj::<u64>(GuestAddress((32 << 20) - 8)).unwrap(),
            0x1234
        );
        // A flipped byte or a truncation is caught before anything is loaded.
        f.write_all_at(&[1], 0x5000).unwrap();
        assert!(matches!(
            verify_file(&mut f, 32 << 20, crc),
            Err(MemoryError::Checksum { .. })
        ));
        f.set_len(16 << 20).unwrap();
        assert!(matches!(
            verify_file(&mut f, 32 << 20, crc),
            Err(MemoryError::FileSize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vmm_writes_are_tracked() {
        let mem = create_guest_memory(16 << 20).unwrap();
        for r in mem.iter() {
            r.get_mmap().bitmap().reset();
        }
        mem.write_obj(7u32, GuestAddress(0x3000 + 12)).unwrap();
        let r = region_of(&mem, 0x3000).unwrap();
        assert!(r.get_mmap().bitmap().is_addr_set(0x3000));
        assert!(!r.get_mmap().bitmap().is_addr_set(0x4000));
    }

    #[test]
    fn populated_pages_are_the_written_ones() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert!(
            populated_pages(&mem).unwrap().is_empty(),
            "fresh memory holds nothing"
        );
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x80_0123)).unwrap();
        assert_eq!(populated_pages(&mem).unwrap(), vec![0x5000, 0x80_0000]);
    }

    #[test]
    fn bitmap_helpers() {
        let b = DirtyBitmap {
            regions: vec![(0, vec![0b101, 0]), (1 << 32, vec![1 << 63])],
        };
        assert_eq!(b.count(), 3);
        let pages: Vec<u64> = b.pages().collect();
        assert_eq!(pages, vec![0, 2 * 4096, (1 << 32) + 63 * 4096]);
        assert!(b.is_dirty(2 * 4096 + 5));
        assert!(!b.is_dirty(4096));
        let mut m = DirtyBitmap {
            regions: vec![(0, vec![0b010, 0]), (1 << 32, vec![0])],
        };
        m.merge(&b);
        assert_eq!(m.count(), 4);
        assert!(m.is_dirty(4096) && m.is_dirty((1 << 32) + 63 * 4096));
    }
}
