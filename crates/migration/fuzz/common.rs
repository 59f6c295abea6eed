//! The destination's receive loop, minus KVM: shared by the `receive` fuzz target and by
//! `crates/migration/tests/fuzz_regressions.rs` (both pull this file in with `#[path]`), so the
//! fuzzed logic and the regression test cannot drift apart.
//!
//! The loop is the VMM's own: `ferry_migration::receiver::receive` (every check and decoder
//! the destination VMM runs on the source's bytes), driving a [`Sim`] destination in place of
//! the VMM's (KVM, guest memory, devices): a sparse simulated guest memory and a record of
//! what arrived. After a post-copy Commit the push runs through `receiver::push_step` and
//! `receiver::push_pages`, as in the VMM. Acknowledgements go to a sink.
//!
//! The decoders must return errors on hostile input, never panic; the simulated memory and
//! destination assert the invariants the loop promises (so a bug crashes the fuzzer).

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};

use ferry_api::VmConfig;
use ferry_migration::protocol::{
    self, Command, ProtocolError, ReceiverState, RoundInfo, StartInfo, PAGE_SIZE,
};
use ferry_migration::receiver::{self, Committed, Destination, PageMemory, Push, Received};
use ferry_migration::{pack, Envelope, EnvelopeError};

/// Guest memory of the seed streams: `[0, GUEST_MEMORY)`.
pub const GUEST_MEMORY: u64 = 64 << 20;

/// Why a stream was refused.
#[derive(Debug)]
pub enum ReceiveError {
    Protocol(ProtocolError),
    State(EnvelopeError),
    /// What the destination itself refused (the VMM's own checks, simulated).
    Refused(&'static str),
}

impl From<ProtocolError> for ReceiveError {
    fn from(e: ProtocolError) -> Self {
        ReceiveError::Protocol(e)
    }
}

impl From<EnvelopeError> for ReceiveError {
    fn from(e: EnvelopeError) -> Self {
        ReceiveError::State(e)
    }
}

impl From<std::convert::Infallible> for ReceiveError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

/// Simulated guest memory: one region `[0, end)`, pages kept only where written.
pub struct SimMemory {
    pub end: u64,
    pub pages: RefCell<HashMap<u64, Vec<u8>>>,
}

impl PageMemory for SimMemory {
    type Error = std::convert::Infallible;

    fn holds(&self, gpa: u64) -> bool {
        gpa.is_multiple_of(PAGE_SIZE as u64)
            && gpa
                .checked_add(PAGE_SIZE as u64)
                .is_some_and(|end| end <= self.end)
    }

    fn end(&self) -> u64 {
        self.end
    }

    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error> {
        assert!(
            self.holds(gpa),
            "page {gpa:#x} written outside guest memory"
        );
        assert_eq!(data.len(), PAGE_SIZE, "page {gpa:#x} not 4 KiB");
        self.pages.borrow_mut().insert(gpa, data.to_vec());
        Ok(())
    }

    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        assert!(self.holds(gpa), "page {gpa:#x} read outside guest memory");
        match self.pages.borrow().get(&gpa) {
            Some(p) => buf.copy_from_slice(p),
            None => buf.fill(0),
        }
        Ok(())
    }
}

/// The destination, simulated: what arrived, in what order.
#[derive(Default)]
pub struct Sim {
    pub start: Option<StartInfo>,
    pub config: Option<VmConfig>,
    pub memory: Option<SimMemory>,
    pub channels: Option<u32>,
    pub rounds: u32,
    pub prepared: bool,
    pub postcopy_pages: u64,
    pub state: Option<serde_json::Value>,
    pub committed: Option<Committed>,
}

impl Destination for Sim {
    type Error = ReceiveError;
    type Memory = SimMemory;
    type State = serde_json::Value;

    fn start(&mut self, info: &StartInfo) -> Result<(), ReceiveError> {
        assert!(self.start.is_none(), "Start accepted twice");
        assert!(
            (protocol::MIN_PROTOCOL_VERSION..=protocol::PROTOCOL_VERSION)
                .contains(&info.protocol_version)
        );
        self.start = Some(info.clone());
        Ok(())
    }

    fn config(&mut self, c: VmConfig, memory_bytes: u64) -> Result<(), ReceiveError> {
        assert!(
            self.start.is_some() && self.config.is_none(),
            "Config out of order"
        );
        // The VMM's check: the memory Start announced is the VM's.
        if c.memory_mib.checked_mul(1 << 20) != Some(memory_bytes) {
            return Err(ReceiveError::Refused("memory size differs from Start's"));
        }
        self.memory = Some(SimMemory {
            end: memory_bytes,
            pages: RefCell::default(),
        });
        self.config = Some(c);
        Ok(())
    }

    fn memory(&self) -> Option<&SimMemory> {
        self.memory.as_ref()
    }

    fn channels(&mut self, count: u32) -> Result<(), ReceiveError> {
        assert!(self.memory.is_some(), "Channels accepted before Config");
        assert!(self.channels.is_none(), "Channels accepted twice");
        assert!((2..=protocol::MAX_CHANNELS).contains(&count));
        self.channels = Some(count);
        Ok(())
    }

    fn round_end(&mut self, _: &RoundInfo, _: &mut Received) -> Result<(), ReceiveError> {
        assert!(self.memory.is_some(), "RoundEnd accepted before Config");
        self.rounds += 1;
        Ok(())
    }

    fn postcopy_prepare(&mut self, words: Vec<u64>) -> Result<(), ReceiveError> {
        assert!(!self.prepared, "PostcopyPrepare accepted twice");
        self.bitmap(&words);
        self.prepared = true;
        Ok(())
    }

    fn postcopy_start(&mut self, words: Vec<u64>) -> Result<(), ReceiveError> {
        self.postcopy_pages = self.bitmap(&words);
        Ok(())
    }

    fn state(&mut self, state: serde_json::Value) -> Result<(), ReceiveError> {
        assert!(self.memory.is_some(), "State accepted before Config");
        assert!(self.state.is_none(), "State accepted twice");
        self.state = Some(state);
        Ok(())
    }

    fn commit(&mut self, how: Committed) -> Result<(), ReceiveError> {
        assert!(self.start.is_some() && self.config.is_some() && self.state.is_some());
        assert!(self.committed.is_none(), "Commit accepted twice");
        self.committed = Some(how);
        Ok(())
    }

    fn read_failed(&mut self, e: ProtocolError) -> ReceiveError {
        e.into()
    }
}

impl Sim {
    /// A decoded bitmap names only pages inside guest memory.
    fn bitmap(&self, words: &[u64]) -> u64 {
        let m = self
            .memory
            .as_ref()
            .expect("a bitmap accepted before Config");
        let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let top = words
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i as u64 * 64 + 63 - u64::from(w.leading_zeros())) * PAGE_SIZE as u64);
        assert!(
            top.is_none_or(|gpa| m.holds(gpa)),
            "bitmap past guest memory"
        );
        pages
    }
}

/// The source's bytes to read, and where the acknowledgements go.
struct Wire<'a> {
    input: &'a [u8],
    acks: usize,
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.acks += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a completed stream delivered.
pub struct Delivered {
    pub sim: Sim,
    pub pages: u64,
}

/// Run the receive loop over `input`. `Ok` only for a stream that reached Commit (and, after
/// a post-copy Commit, PostcopyDone).
pub fn receive(input: &[u8]) -> Result<Delivered, ReceiveError> {
    let mut wire = Wire { input, acks: 0 };
    let mut sim = Sim::default();
    let (how, got) = receiver::receive(&mut wire, None, &mut sim)?;
    assert!(wire.acks > 0, "a committed stream was never acknowledged");
    let mut pages = got.pages;
    if how == Committed::Postcopy {
        let mut state = ReceiverState::Postcopy;
        let mut scratch = Vec::new();
        let m = sim.memory.as_ref().expect("memory after Commit");
        loop {
            let f = protocol::read_frame(&mut wire)?.ok_or(ProtocolError::Truncated)?;
            match receiver::push_step(&mut state, &f)? {
                Push::Pages => {
                    let mut calls = 0u64;
                    let n = receiver::push_pages(
                        &f,
                        |g| m.holds(g),
                        &mut scratch,
                        |gpa, d| {
                            calls += 1;
                            let _ = m.write_page(gpa, d.unwrap_or(&[0u8; PAGE_SIZE]));
                        },
                    )?;
                    assert_eq!(n as u64, calls, "count != placed pages");
                    assert!(n <= protocol::MAX_PAGES_PER_MESSAGE);
                    pages += n as u64;
                }
                Push::Done => {
                    assert_eq!(state, ReceiverState::Done);
                    break;
                }
            }
        }
    }
    Ok(Delivered { sim, pages })
}

/// The `envelope` target: decode the bytes as they are, then again with the checksum fixed
/// up so the payload decoder is reached too.
pub fn envelope(data: &[u8]) {
    let _ = Envelope::MigrationState.decode::<serde_json::Value>(data);
    let _ = Envelope::Snapshot.decode::<serde_json::Value>(data);
    let header = ferry_migration::envelope::HEADER_LEN;
    if data.len() >= header {
        let mut b = data.to_vec();
        let crc = crc32(&b[header..]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        if let Ok((v, _)) = Envelope::MigrationState.decode::<serde_json::Value>(&b) {
            // A decoded value re-encodes and decodes to itself (floats up to rounding).
            let again = Envelope::MigrationState.encode(&v).expect("re-encode");
            let (w, _) = Envelope::MigrationState
                .decode::<serde_json::Value>(&again)
                .expect("decode of a fresh encoding");
            assert!(same_value(&v, &w), "round trip changed {v} into {w}");
        }
    }
}

/// JSON equality, except that floats may differ in the last bit: serde_json's default float
/// parser (without its `float_roundtrip` feature) is best-effort and does not always read back
/// the shortest representation it wrote (found by this fuzzer:
/// `regressions/envelope/crash-float-roundtrip-53-digit-integer`). ferry's states hold no
/// floats, so this is harmless for it.
pub fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 4.0 * f64::EPSILON
        }
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// CRC-32 (IEEE), bitwise: enough for fuzz inputs, and no extra dependency.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn frame(out: &mut Vec<u8>, command: Command, payload: &[u8]) {
    protocol::write_frame(out, command, payload).expect("write to a Vec");
}

/// A well-formed stream: Start, Config, Pages (a zero and a data page), RoundEnd, State, Commit.
pub fn valid_stream() -> Vec<u8> {
    let mut s = Vec::new();
    let start = StartInfo {
        protocol_version: protocol::PROTOCOL_VERSION,
        ferry_version: "0.1.0".into(),
        memory_bytes: GUEST_MEMORY,
        migration_id: "fuzz".into(),
    };
    frame(&mut s, Command::Start, &protocol::json(&start));
    frame(
        &mut s,
        Command::Config,
        br#"{"vcpus":1,"memory_mib":64,"kernel":"/boot/vmlinuz","cmdline":"console=ttyS0"}"#,
    );
    let zero = vec![0u8; PAGE_SIZE];
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    let mut pages = Vec::new();
    protocol::encode_pages(&[(0x1000, &zero), (0x20_0000, &data)], &mut pages);
    frame(&mut s, Command::Pages, &pages);
    frame(
        &mut s,
        Command::RoundEnd,
        &protocol::json(&RoundInfo {
            round: 0,
            pages: 2,
            ..Default::default()
        }),
    );
    let state = serde_json::json!({"vcpus": [{"regs": [1, 2, 3]}], "devices": {"serial": "x"}});
    let env = Envelope::MigrationState.encode(&state).expect("encode");
    frame(&mut s, Command::State, &env);
    frame(&mut s, Command::Commit, &[]);
    s
}

/// Seed inputs for the `receive` target (name, bytes): the valid stream and some damaged ones.
pub fn receive_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let v = valid_stream();
    let mut seeds = vec![("valid", v.clone())];
    // Offsets of each frame header in the valid stream.
    let mut offs = Vec::new();
    let mut o = 0;
    while o < v.len() {
        offs.push(o);
        let len = u64::from_le_bytes(v[o + 8..o + 16].try_into().expect("8 bytes"));
        o += protocol::HEADER_LEN + len as usize;
    }
    let (pages_at, state_at) = (offs[2], offs[4]);
    seeds.push(("truncated-mid-pages", v[..pages_at + 40].to_vec()));
    seeds.push(("truncated-before-commit", v[..offs[5]].to_vec()));
    seeds.push(("truncated-header", v[..offs[1] + 7].to_vec()));
    let mut m = v.clone();
    m[pages_at + 16] = 3; // page count 3 with 2 entries
    seeds.push(("pages-count-mismatch", m));
    let mut m = v.clone();
    // First page entry -> just past the end of guest memory.
    m[pages_at + 20..pages_at + 28].copy_from_slice(&GUEST_MEMORY.to_le_bytes());
    seeds.push(("page-out-of-range", m));
    let mut m = v.clone();
    m[state_at + 16 + 40] ^= 0x20; // flip a payload byte: checksum mismatch
    seeds.push(("state-bad-crc", m));
    let mut m = v.clone();
    m[offs[1] + 4] = 6; // Config -> Commit: out of order (and length over its limit)
    seeds.push(("config-as-commit", m));
    let mut c = Vec::new();
    frame(&mut c, Command::Start, &v[offs[0] + 16..offs[1]]);
    frame(&mut c, Command::Cancel, b"{}");
    seeds.push(("start-cancel", c));
    let p = postcopy_stream();
    seeds.push(("postcopy", p.clone()));
    seeds.push((
        "postcopy-truncated",
        p[..p.len() - protocol::HEADER_LEN].to_vec(),
    ));
    let mut c = v[..state_at].to_vec();
    let mut words = vec![0u64; (GUEST_MEMORY / PAGE_SIZE as u64 / 64) as usize + 1];
    words[(GUEST_MEMORY / PAGE_SIZE as u64 / 64) as usize] = 1; // the page just past the end
    frame(
        &mut c,
        Command::PostcopyStart,
        &protocol::encode_bitmap(&words),
    );
    seeds.push(("postcopy-bitmap-out-of-range", c));
    // Connection-opening messages of recovery and the forecast, where a move's stream is
    // expected, and in the middle of post-copy.
    let mut c = Vec::new();
    frame(&mut c, Command::PostcopyResume, br#"{"migration_id":"m"}"#);
    seeds.push(("resume-first", c));
    let mut c = Vec::new();
    frame(&mut c, Command::Probe, &[0u8; 4096]);
    seeds.push(("probe-first", c));
    let mut c = p[..p.len() - protocol::HEADER_LEN - 2].to_vec();
    frame(
        &mut c,
        Command::PostcopyMissing,
        &protocol::encode_bitmap(&[1]),
    );
    seeds.push(("postcopy-missing-mid-stream", c));
    // Compressed pages (version 5): a full page, a delta and a zero page, through lz4; then a
    // message whose one delta runs past its page (skip 512 words, copy 1).
    let with = |payload: &[u8]| {
        let mut c = v[..state_at].to_vec();
        frame(&mut c, Command::Packed, payload);
        c.extend_from_slice(&v[state_at..]);
        c
    };
    let mut p = pack::Packer::default();
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 7) as u8).collect();
    p.slot().copy_from_slice(&data);
    p.keep_full(0x3000);
    let mut changed = data.clone();
    changed[8..24].fill(0xee);
    p.slot().copy_from_slice(&changed);
    let mut scratch = Vec::new();
    assert!(p.keep_delta(0x3000, &data, &mut scratch));
    p.slot().fill(0);
    p.keep_zero(0x4000);
    let (head, body, _) = p.finish(true);
    let good = [head, body].concat();
    let delta = [&[0x80u8, 0x04, 0x01][..], &[0xaa; 8]].concat();
    let mut bad = 1u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&(0x3000u64 | pack::PAGE_DELTA).to_le_bytes());
    bad.push(pack::CODEC_RAW);
    bad.extend_from_slice(&(2 + delta.len() as u32).to_le_bytes());
    bad.extend_from_slice(&(delta.len() as u16).to_le_bytes());
    bad.extend_from_slice(&delta);
    seeds.push(("packed", with(&good)));
    seeds.push(("packed-delta-past-the-page", with(&bad)));
    seeds
}

/// A well-formed post-copy stream: pre-copy as in [`valid_stream`], then PostcopyPrepare,
/// PostcopyStart (two pages still missing), State, Commit, the two pages, PostcopyDone.
pub fn postcopy_stream() -> Vec<u8> {
    let v = valid_stream();
    // Everything up to State.
    let mut o = 0;
    let mut offs = Vec::new();
    while o < v.len() {
        offs.push(o);
        let len = u64::from_le_bytes(v[o + 8..o + 16].try_into().expect("8 bytes"));
        o += protocol::HEADER_LEN + len as usize;
    }
    let mut s = v[..offs[4]].to_vec();
    let mut words = vec![0u64; (GUEST_MEMORY / PAGE_SIZE as u64 / 64) as usize];
    words[0] = 0b010; // page 0x1000 known dirty before the pause
    frame(
        &mut s,
        Command::PostcopyPrepare,
        &protocol::encode_bitmap(&words),
    );
    words[0] = 0b110; // and 0x2000 dirtied since
    frame(
        &mut s,
        Command::PostcopyStart,
        &protocol::encode_bitmap(&words),
    );
    s.extend_from_slice(&v[offs[4]..offs[5]]); // State
    frame(&mut s, Command::Commit, &[]);
    let data: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 13) as u8).collect();
    let mut pages = Vec::new();
    protocol::encode_pages(&[(0x1000, &data), (0x2000, &data)], &mut pages);
    frame(&mut s, Command::Pages, &pages);
    frame(&mut s, Command::PostcopyDone, b"{}");
    s
}

/// Seed inputs for the `envelope` target (name, bytes).
pub fn envelope_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let state = serde_json::json!({"vcpus": [{"regs": [1, 2, 3]}], "devices": {"serial": "x"}});
    let v = Envelope::MigrationState.encode(&state).expect("encode");
    let mut bad_crc = v.clone();
    bad_crc[40] ^= 1;
    let mut long = v.clone();
    long[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    vec![
        ("valid", v.clone()),
        ("truncated", v[..v.len() - 3].to_vec()),
        ("bad-crc", bad_crc),
        ("length-max", long),
        (
            "snapshot-kind",
            Envelope::Snapshot.encode(&state).expect("encode"),
        ),
    ]
}
