//! ELF kernel images of either class, read by their program headers: ELF32 as GRUB and
//! QEMU's `-kernel` load a Multiboot kernel, ELF64 as Linux's vmlinux (PVH) and ferry's test
//! guest. Segments go to their physical addresses (`p_paddr`), as every x86 boot loader does.
//!
//! linux-loader's `Elf` reads ELF64 only (an ELF32 image fails with "Invalid program header
//! size"), so ferry parses the two headers itself: a few dozen lines of bounds-checked reads.

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where it goes in guest-physical memory.
    pub paddr: u64,
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest, after `filesz`, is zeroes: .bss).
    pub memsz: u64,
}

/// What a loader needs from an ELF image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    /// 32 or 64.
    pub class: u8,
    /// `e_entry`.
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// The PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), if the image has one.
    pub pvh_entry: Option<u64>,
}

impl ElfImage {
    /// The first byte past everything the image occupies in memory.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0)
    }
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// More program headers than any kernel has; a bound on what a hostile image makes us read.
const MAX_PHDRS: u16 = 256;

/// Parse `image` (the whole file). The error says what is wrong, for a user's message.
pub fn parse(image: &[u8]) -> Result<ElfImage, String> {
    let rd = |off: u64, len: usize| -> Result<u64, String> {
        let start = usize::try_from(off).map_err(|_| "offset out of range".to_string())?;
        let b = image
            .get(start..start.saturating_add(len))
            .filter(|b| b.len() == len)
            .ok_or_else(|| format!("ELF field at offset {off:#x} lies past the end of the file"))?;
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    };
    if image.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    let class = match image.get(4) {
        Some(1) => 32,
        Some(2) => 64,
        _ => return Err("ELF class is neither 32-bit nor 64-bit".into()),
    };
    if image.get(5) != Some(&1) {
        return Err("ELF image is not little-endian, so not an x86 kernel".into());
    }
    let machine = rd(18, 2)? as u16;
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(format!(
            "ELF machine {machine} is not x86 (3, i386) or x86-64 (62)"
        ));
    }
    let (entry, phoff, phentsize, phnum, want) = if class == 32 {
        (rd(24, 4)?, rd(28, 4)?, rd(42, 2)?, rd(44, 2)?, 32)
    } else {
        (rd(24, 8)?, rd(32, 8)?, rd(54, 2)?, rd(56, 2)?, 56)
    };
    if phentsize != want {
        return Err(format!(
            "ELF{class} program headers are {want} bytes, this image says {phentsize}"
        ));
    }
    if phnum == 0 || phnum > u64::from(MAX_PHDRS) {
        return Err(format!("ELF image has {phnum} program headers"));
    }
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or("program header offset overflows")?;
        let (ty, offset, paddr, filesz, memsz) = if class == 32 {
            (
                rd(ph, 4)? as u32,
                rd(ph + 4, 4)?,
                rd(ph + 12, 4)?,
                rd(ph + 16, 4)?,
                rd(ph + 20, 4)?,
            )
        } else {
            (
                rd(ph, 4)? as u32,
                rd(ph + 8, 8)?,
                rd(ph + 24, 8)?,
                rd(ph + 32, 8)?,
                rd(ph + 40, 8)?,
            )
        };
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= image.len() as u64);
        if !in_file {
            return Err(format!(
                "program header {i} takes {filesz} bytes at offset {offset:#x}, past the end of the file ({} bytes)",
                image.len()
            ));
        }
        match ty {
            PT_LOAD if memsz > 0 => {
                if filesz > memsz {
                    return Err(format!(
                        "program header {i} has more bytes in the file ({filesz}) than in memory ({memsz})"
                    ));
                }
                paddr
                    .checked_add(memsz)
                    .ok_or_else(|| format!("segment {i} runs past the end of the address space"))?;
                segments.push(Segment {
                    paddr,
                    offset,
                    filesz,
                    memsz,
                });
            }
            PT_NOTE => {
                let notes = &image[offset as usize..(offset + filesz) as usize];
                if let Some(e) = pvh_note(notes) {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err("ELF image has nothing to load (no PT_LOAD segment)".into());
    }
    Ok(ElfImage {
        class,
        entry,
        segments,
        pvh_entry,
    })
}

/// The PVH entry point in a run of ELF notes, if there is one.
fn pvh_note(mut notes: &[u8]) -> Option<u64> {
    let word = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let pad = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let ty = word(notes, 8)?;
        let name_end = 12usize.checked_add(pad(namesz)?)?;
        let desc_end = name_end.checked_add(pad(descsz)?)?;
        let name = notes.get(12..12 + namesz)?;
        let desc = notes.get(name_end..name_end + descsz)?;
        if name == b"Xen\0" && ty == XEN_ELFNOTE_PHYS32_ENTRY {
            return match descsz {
                4 => Some(u64::from(word(desc, 0)?)),
                8 => Some(u64::from_le_bytes(desc.try_into().ok()?)),
                _ => None,
            };
        }
        notes = notes.get(desc_end.min(notes.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF of `class` with one PT_LOAD of `data` at `paddr` (+ `bss` zeroes) and,
    /// if `pvh`, a PVH note.
    fn build(class: u8, paddr: u64, data: &[u8], bss: u64, pvh: Option<u32>) -> Vec<u8> {
        let (ehsize, phsize) = if class == 32 { (52, 32) } else { (64, 56) };
        let phnum = 1 + u64::from(pvh.is_some());
        let note_off = ehsize + phsize * phnum;
        let note: Vec<u8> = match pvh {
            Some(e) => [4u32, 4, 18]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .chain(*b"Xen\0")
                .chain(e.to_le_bytes())
                .collect(),
            None => vec![],
        };
        let data_off = (note_off + note.len() as u64 + 15) & !15;
        let mut img = vec![0u8; data_off as usize];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = if class == 32 { 1 } else { 2 };
        img[5] = 1;
        img[6] = 1;
        let put = |img: &mut Vec<u8>, off: u64, v: u64, len: usize| {
            img[off as usize..off as usize + len].copy_from_slice(&v.to_le_bytes()[..len]);
        };
        put(&mut img, 16, 2, 2);
        put(&mut img, 18, if class == 32 { 3 } else { 62 }, 2);
        let phs = [
            (
                PT_LOAD,
                data_off,
                paddr,
                data.len() as u64,
                data.len() as u64 + bss,
            ),
            (PT_NOTE, note_off, 0, note.len() as u64, note.len() as u64),
        ];
        if class == 32 {
            put(&mut img, 24, paddr, 4);
            put(&mut img, 28, ehsize, 4);
            put(&mut img, 42, phsize, 2);
            put(&mut img, 44, phnum, 2);
        } else {
            put(&mut img, 24, paddr, 8);
            put(&mut img, 32, ehsize, 8);
            put(&mut img, 54, phsize, 2);
            put(&mut img, 56, phnum, 2);
        }
        for (i, (ty, off, pa, fs, ms)) in phs.iter().take(phnum as usize).enumerate() {
            let ph = ehsize + i as u64 * phsize;
            put(&mut img, ph, u64::from(*ty), 4);
            if class == 32 {
                put(&mut img, ph + 4, *off, 4);
                put(&mut img, ph + 12, *pa, 4);
                put(&mut img, ph + 16, *fs, 4);
                put(&mut img, ph + 20, *ms, 4);
            } else {
                put(&mut img, ph + 8, *off, 8);
                put(&mut img, ph + 24, *pa, 8);
                put(&mut img, ph + 32, *fs, 8);
                put(&mut img, ph + 40, *ms, 8);
            }
        }
        img[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
        img.extend_from_slice(data);
        img
    }

    #[test]
    fn both_classes_parse_with_their_segments_and_notes() {
        for class in [32, 64] {
            let img = build(class, 0x10_0000, b"kernel", 4096, Some(0x10_0040));
            let e = parse(&img).unwrap();
            assert_eq!(e.class, class);
            assert_eq!(e.entry, 0x10_0000);
            assert_eq!(e.pvh_entry, Some(0x10_0040));
            assert_eq!(e.segments.len(), 1);
            let s = e.segments[0];
            assert_eq!((s.paddr, s.filesz, s.memsz), (0x10_0000, 6, 4102));
            assert_eq!(&img[s.offset as usize..][..6], b"kernel");
            assert_eq!(e.end(), 0x10_0000 + 4102);
            let plain = build(class, 0x20_0000, b"k", 0, None);
            assert_eq!(parse(&plain).unwrap().pvh_entry, None);
        }
    }

    #[test]
    fn broken_images_say_what_is_wrong() {
        let mut img = build(32, 0x10_0000, b"kernel", 0, None);
        img[42] = 56; // an ELF64 header size in an ELF32 image
        assert!(parse(&img).unwrap_err().contains("32 bytes"));
        let img = build(64, 0x10_0000, b"kernel", 0, None);
        let cut = &img[..img.len() - 3];
        assert!(parse(cut).unwrap_err().contains("past the end of the file"));
        let mut img = build(64, 0x10_0000, b"kernel", 0, None);
        img[18] = 40; // ARM
        assert!(parse(&img).unwrap_err().contains("not x86"));
        assert!(parse(b"\x7fELF\x02\x01").is_err());
        assert!(parse(b"MZ").is_err());
    }
}
