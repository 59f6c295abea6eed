//! `Packed` (protocol version 5): pages sent compressed.
//!
//! Two ways to send fewer bytes, each used only where the sender measured that it pays:
//! * a **delta** (XBZRLE-style): a page the destination already holds, sent as the words that
//!   changed since that copy. The destination applies it to the page it has; the sender keeps
//!   a bounded cache of what it sent last, so it knows what the destination holds.
//! * **lz4** over the message's data area (the pages and deltas together).
//!
//! ```text
//! count   u32       pages in the message, at most MAX_PAGES_PER_MESSAGE
//! entries count×u64 gpa | flags: PAGE_ZERO (no data), PAGE_DELTA (a delta), else a full page
//! codec   u8        CODEC_RAW: the data area follows as is; CODEC_LZ4: an lz4 block of it
//! length  u32       the data area's length once decoded
//! data    ...       per entry in order: full page: 4096 bytes; delta: u16 length, then the delta
//! ```
//!
//! A delta is a list of runs until its length is used up: `skip` (ULEB128, words left as they
//! are), `copy` (ULEB128, words replaced), then `copy` × 8 bytes. The runs cover at most the
//! page's 512 words, and a run that neither skips nor copies is refused.

use crate::protocol::{Command, ProtocolError, MAX_PAGES_PER_MESSAGE, PAGE_SIZE, PAGE_ZERO};

/// Flag in a page entry: the data is a delta against the destination's copy.
pub const PAGE_DELTA: u64 = 2;
/// The data area follows uncompressed.
pub const CODEC_RAW: u8 = 0;
/// The data area is one lz4 block.
pub const CODEC_LZ4: u8 = 1;

const WORDS: usize = PAGE_SIZE / 8;
/// The head before the data area: count, entries, codec, length.
fn head_len(count: usize) -> usize {
    4 + count * 8 + 1 + 4
}
/// The largest data area: every page a delta as long as a page.
pub const MAX_DATA: usize = MAX_PAGES_PER_MESSAGE * (2 + PAGE_SIZE);
/// The largest `Packed` payload (an lz4 block may grow a little on data that does not compress).
pub const MAX_PAYLOAD: usize = 4 + MAX_PAGES_PER_MESSAGE * 8 + 5 + MAX_DATA + MAX_DATA / 255 + 64;
/// A delta longer than this goes as the full page.
pub const MAX_DELTA: usize = PAGE_SIZE / 2;

fn uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn read_uleb(d: &mut &[u8]) -> Option<usize> {
    let mut v = 0usize;
    for shift in (0..14).step_by(7) {
        let (&b, rest) = d.split_first()?;
        *d = rest;
        v |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None // more than two bytes: never needed for 512 words
}

fn word(p: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(p[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// Append the delta from `old` to `new` (both one page) to `out`; `false` (and `out` as it was)
/// when it would be longer than `limit` bytes. A page that did not change gives an empty delta.
pub fn encode_delta(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    let start = out.len();
    let mut i = 0;
    while i < WORDS {
        let s = i;
        while i < WORDS && word(old, i) == word(new, i) {
            i += 1;
        }
        if i == WORDS {
            break; // the rest is unchanged: no trailing skip
        }
        let c = i;
        while i < WORDS && word(old, i) != word(new, i) {
            i += 1;
        }
        uleb(out, c - s);
        uleb(out, i - c);
        out.extend_from_slice(&new[c * 8..i * 8]);
        if out.len() - start > limit {
            out.truncate(start);
            return false;
        }
    }
    true
}

/// Apply `delta` to `page` (one page). On an error the page may be partly changed.
pub fn apply_delta(page: &mut [u8], mut delta: &[u8]) -> Result<(), &'static str> {
    if page.len() != PAGE_SIZE {
        return Err("not a page");
    }
    let mut i = 0usize;
    while !delta.is_empty() {
        let skip = read_uleb(&mut delta).ok_or("bad skip")?;
        let copy = read_uleb(&mut delta).ok_or("bad copy")?;
        if skip == 0 && copy == 0 {
            return Err("empty run");
        }
        i = i
            .checked_add(skip)
            .filter(|&e| e + copy <= WORDS)
            .ok_or("run past the page")?;
        let bytes = delta.get(..copy * 8).ok_or("run data truncated")?;
        page[i * 8..(i + copy) * 8].copy_from_slice(bytes);
        delta = &delta[copy * 8..];
        i += copy;
    }
    Ok(())
}

/// Builds one `Packed` message.
#[derive(Default)]
pub struct Packer {
    entries: Vec<u64>,
    data: Vec<u8>,
    /// Scratch for the lz4 block.
    packed: Vec<u8>,
    head: Vec<u8>,
}

/// What went into a message, for the sender's accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Bytes of the data area before compression.
    pub data_bytes: usize,
    /// Bytes of the whole payload.
    pub wire_bytes: usize,
}

impl Packer {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.data.clear();
    }

    /// Room for one full page at the end of the data area, to be filled in by the caller and
    /// then kept with [`Packer::keep_full`], [`Packer::keep_zero`] or [`Packer::keep_delta`].
    pub fn slot(&mut self) -> &mut [u8] {
        let at = self.data.len();
        self.data.resize(at + PAGE_SIZE, 0);
        &mut self.data[at..]
    }

    /// The page in the last slot.
    pub fn last_slot(&self) -> &[u8] {
        &self.data[self.data.len() - PAGE_SIZE..]
    }

    /// Keep the last slot as a full page.
    pub fn keep_full(&mut self, gpa: u64) {
        self.entries.push(gpa);
    }

    /// Drop the last slot: the page is all zero.
    pub fn keep_zero(&mut self, gpa: u64) {
        self.data.truncate(self.data.len() - PAGE_SIZE);
        self.entries.push(gpa | PAGE_ZERO);
    }

    /// Replace the last slot with the delta from `old` to it; `false` (the slot kept as a full
    /// page) when the delta would be longer than [`MAX_DELTA`].
    pub fn keep_delta(&mut self, gpa: u64, old: &[u8], scratch: &mut Vec<u8>) -> bool {
        scratch.clear();
        if !encode_delta(old, self.last_slot(), scratch, MAX_DELTA) {
            self.entries.push(gpa);
            return false;
        }
        self.put_delta(gpa, scratch);
        true
    }

    /// Replace the last slot with `delta` (from [`encode_delta`], at most [`MAX_DELTA`] bytes).
    pub fn put_delta(&mut self, gpa: u64, delta: &[u8]) {
        let at = self.data.len() - PAGE_SIZE;
        self.data.truncate(at);
        self.data
            .extend_from_slice(&(delta.len() as u16).to_le_bytes());
        self.data.extend_from_slice(delta);
        self.entries.push(gpa | PAGE_DELTA);
    }

    /// The data area so far.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The head and the data area of the message, the data compressed with lz4 when `lz4`.
    /// Write them one after the other as the payload of one `Packed` frame.
    pub fn finish(&mut self, lz4: bool) -> (&[u8], &[u8], Packed) {
        let count = self.entries.len();
        self.head.clear();
        self.head.reserve(head_len(count));
        self.head.extend_from_slice(&(count as u32).to_le_bytes());
        for e in &self.entries {
            self.head.extend_from_slice(&e.to_le_bytes());
        }
        let mut codec = CODEC_RAW;
        if lz4 {
            let max = lz4_flex::block::get_maximum_output_size(self.data.len());
            self.packed.resize(max, 0);
            if let Ok(n) = lz4_flex::block::compress_into(&self.data, &mut self.packed) {
                self.packed.truncate(n);
                codec = CODEC_LZ4;
            }
        }
        self.head.push(codec);
        self.head
            .extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        let data: &[u8] = if codec == CODEC_LZ4 {
            &self.packed
        } else {
            &self.data
        };
        let stats = Packed {
            data_bytes: self.data.len(),
            wire_bytes: self.head.len() + data.len(),
        };
        (&self.head, data, stats)
    }
}

/// What lz4 makes of `data`: output bytes per input byte (a sample, to see if it pays).
pub fn lz4_ratio(data: &[u8]) -> f64 {
    lz4_flex::block::compress(data).len() as f64 / data.len().max(1) as f64
}

/// One page of a decoded `Packed` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page<'a> {
    Zero,
    Full(&'a [u8]),
    /// Apply with [`apply_delta`] to the page the destination holds.
    Delta(&'a [u8]),
}

/// Decode a `Packed` payload, checking every address with `valid`; `scratch` holds the
/// decompressed data area. Calls `sink` once per page, in order.
pub fn decode_packed(
    payload: &[u8],
    valid: impl Fn(u64) -> bool,
    scratch: &mut Vec<u8>,
    mut sink: impl FnMut(u64, Page<'_>) -> Result<(), ProtocolError>,
) -> Result<usize, ProtocolError> {
    let bad = |m: &str| ProtocolError::Malformed(Command::Packed, m.to_string());
    let (count, entries, rest) = crate::protocol::page_list(payload, Command::Packed)?;
    let (&codec, rest) = rest.split_first().ok_or_else(|| bad("no codec"))?;
    let l = rest.get(..4).ok_or_else(|| bad("no data length"))?;
    let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
    if len > MAX_DATA {
        return Err(bad("data area too long"));
    }
    let body = &rest[4..];
    let mut data: &[u8] = match codec {
        CODEC_RAW if body.len() == len => body,
        CODEC_RAW => return Err(bad("data area length does not match")),
        CODEC_LZ4 => {
            scratch.resize(len, 0);
            match lz4_flex::block::decompress_into(body, scratch) {
                Ok(n) if n == len => &scratch[..],
                Ok(_) => return Err(bad("lz4 data shorter than its length")),
                Err(e) => return Err(bad(&format!("lz4: {e}"))),
            }
        }
        c => return Err(bad(&format!("unknown codec {c}"))),
    };
    for e in entries.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let raw = u64::from_le_bytes(b);
        let gpa = raw & !(PAGE_SIZE as u64 - 1);
        let flags = raw & (PAGE_SIZE as u64 - 1);
        if flags & !(PAGE_ZERO | PAGE_DELTA) != 0 || flags == PAGE_ZERO | PAGE_DELTA || !valid(gpa)
        {
            return Err(ProtocolError::BadPage { gpa: raw });
        }
        let page = if flags & PAGE_ZERO != 0 {
            Page::Zero
        } else if flags & PAGE_DELTA != 0 {
            let n = data.get(..2).ok_or_else(|| bad("delta length truncated"))?;
            let n = u16::from_le_bytes([n[0], n[1]]) as usize;
            let d = data.get(2..2 + n).ok_or_else(|| bad("delta truncated"))?;
            data = &data[2 + n..];
            Page::Delta(d)
        } else {
            let d = data
                .get(..PAGE_SIZE)
                .ok_or_else(|| bad("page data truncated"))?;
            data = &data[PAGE_SIZE..];
            Page::Full(d)
        };
        sink(gpa, page)?;
    }
    if !data.is_empty() {
        return Err(bad("data left over after the last page"));
    }
    Ok(count)
}

/// The error for a delta that does not apply.
pub fn bad_delta(why: &str) -> ProtocolError {
    ProtocolError::Malformed(Command::Packed, format!("delta: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        (0..WORDS as u64)
            .flat_map(|i| (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i).to_ne_bytes())
            .collect()
    }

    fn decode(payload: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, ProtocolError> {
        let mut mem = std::collections::HashMap::<u64, Vec<u8>>::new();
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        decode_packed(
            payload,
            |g| g < 1 << 30,
            &mut scratch,
            |gpa, p| {
                let cur = mem.entry(gpa).or_insert_with(|| vec![0; PAGE_SIZE]);
                match p {
                    Page::Zero => cur.fill(0),
                    Page::Full(d) => cur.copy_from_slice(d),
                    Page::Delta(d) => apply_delta(cur, d).map_err(bad_delta)?,
                }
                out.push((gpa, cur.clone()));
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn payload(p: &mut Packer, lz4: bool) -> Vec<u8> {
        let (h, d, _) = p.finish(lz4);
        [h, d].concat()
    }

    #[test]
    fn deltas_carry_only_the_words_that_changed() {
        let old = page(1);
        let mut new = old.clone();
        new[8..16].copy_from_slice(&7u64.to_ne_bytes());
        new[4000..4016].fill(0xab);
        let mut d = Vec::new();
        assert!(encode_delta(&old, &new, &mut d, MAX_DELTA));
        // Two runs: (skip 1, copy 1, 8 bytes) and (skip 498, copy 2, 16 bytes).
        assert_eq!(d.len(), 2 + 8 + 3 + 16);
        let mut got = old.clone();
        apply_delta(&mut got, &d).unwrap();
        assert_eq!(got, new);
        // Unchanged: empty delta; everything changed: too long.
        d.clear();
        assert!(encode_delta(&old, &old, &mut d, MAX_DELTA) && d.is_empty());
        assert!(!encode_delta(&old, &page(2), &mut d, MAX_DELTA) && d.is_empty());
    }

    #[test]
    fn a_message_round_trips_raw_and_lz4() {
        for lz4 in [false, true] {
            let mut p = Packer::default();
            let base = page(3);
            let mut changed = base.clone();
            changed[0..8].fill(1);
            p.slot().copy_from_slice(&base);
            p.keep_full(0x1000);
            p.slot().fill(0);
            p.keep_zero(0x2000);
            p.slot().copy_from_slice(&changed);
            let mut s = Vec::new();
            assert!(p.keep_delta(0x1000, &base, &mut s));
            p.slot().copy_from_slice(&page(4));
            assert!(!p.keep_delta(0x3000, &base, &mut s), "too different");
            let got = decode(&payload(&mut p, lz4)).unwrap();
            assert_eq!(
                got,
                vec![
                    (0x1000, base.clone()),
                    (0x2000, vec![0; PAGE_SIZE]),
                    (0x1000, changed.clone()),
                    (0x3000, page(4)),
                ]
            );
        }
    }

    #[test]
    fn edge_case_pages_round_trip() {
        // Random bytes (xorshift), all zero, all equal, and one byte changed at either end.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut first = random.clone();
        first[0] ^= 1;
        // Against what the destination then holds (`first`).
        let mut last = first.clone();
        last[PAGE_SIZE - 1] ^= 0x80;
        let fulls = [random.clone(), vec![0; PAGE_SIZE], vec![0xff; PAGE_SIZE]];
        for lz4 in [false, true] {
            let mut p = Packer::default();
            let mut want = Vec::new();
            for (i, f) in fulls.iter().enumerate() {
                let gpa = (i as u64 + 1) << 12;
                p.slot().copy_from_slice(f);
                p.keep_full(gpa);
                want.push((gpa, f.clone()));
            }
            let mut s = Vec::new();
            for (base, changed) in [(&random, &first), (&first, &last)] {
                p.slot().copy_from_slice(changed);
                assert!(p.keep_delta(0x1000, base, &mut s), "one byte: a delta");
                want.push((0x1000, changed.clone()));
            }
            assert_eq!(decode(&payload(&mut p, lz4)).unwrap(), want, "lz4 {lz4}");
        }
        // A one-byte change costs one word on the wire, not a page.
        let mut d = Vec::new();
        assert!(encode_delta(&first, &last, &mut d, MAX_DELTA));
        assert!(d.len() <= 2 + 3 + 8, "{} bytes", d.len());
    }

    #[test]
    fn lz4_shrinks_pages_that_repeat() {
        let mut p = Packer::default();
        for i in 0..64u64 {
            p.slot().fill(i as u8 + 1);
            p.keep_full(i << 12);
        }
        let (_, _, s) = p.finish(true);
        assert!(s.wire_bytes < s.data_bytes / 20, "{s:?}");
    }

    #[test]
    fn hostile_messages_are_refused() {
        let mut p = Packer::default();
        p.slot().copy_from_slice(&page(5));
        p.keep_full(0x1000);
        let good = payload(&mut p, false);
        let good_lz4 = payload(&mut p, true);
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            good[..good.len() - 1].to_vec(),
            [&good[..], &[0]].concat(),
            good_lz4[..good_lz4.len() - 3].to_vec(),
        ];
        let mut c = good.clone();
        c[4 + 8] = 9; // unknown codec
        cases.push(c);
        let mut c = good.clone();
        c[4..12].copy_from_slice(&(0x1000u64 | 3).to_le_bytes()); // zero and delta
        cases.push(c);
        let mut c = good.clone();
        c[4..12].copy_from_slice(&(2u64 << 30).to_le_bytes()); // outside memory
        cases.push(c);
        let mut c = good_lz4.clone();
        c[13..17].copy_from_slice(&(MAX_DATA as u32 + 1).to_le_bytes());
        cases.push(c);
        for (i, c) in cases.iter().enumerate() {
            assert!(decode(c).is_err(), "case {i} accepted");
        }
        // Deltas that run past the page, or loop without progress.
        let mut pg = vec![0; PAGE_SIZE];
        for d in [
            &[0u8, 0][..],
            &[0x80, 0x04, 1][..],
            &[0xff, 0x03, 1, 0][..],
            &[0, 2, 1],
        ] {
            assert!(apply_delta(&mut pg, d).is_err(), "{d:?}");
        }
    }
}
