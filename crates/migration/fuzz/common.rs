//! The destination's receive loop, minus KVM: shared by the `receive` fuzz target and by
//! `crates/migration/tests/fuzz_regressions.rs` (both pull this file in with `#[path]`), so the
//! fuzzed logic and the regression test cannot drift apart.
//!
//! It mirrors `crates/vmm/src/migration/receive.rs::receive_on`: read_frame -> state.next ->
//! by command: Start -> check_start; Config -> parse (a JSON value stands in for `VmConfig`);
//! Pages -> decode_pages against a simulated guest memory; Packed -> decode_packed, deltas
//! applied to a scratch page; RoundEnd -> parse::<RoundInfo>;
//! State -> Envelope::MigrationState.decode (a JSON value stands in for `Snapshot`);
//! Commit / Cancel end the stream. Acks are not written (there is no peer).
//!
//! The decoders must return errors on hostile input, never panic; the sink asserts the
//! invariants `decode_pages` promises (so a decoder bug crashes the fuzzer).

#![allow(dead_code)]

use ferry_migration::protocol::{
    self, Command, ProtocolError, ReceiverState, RoundInfo, StartInfo, PAGE_SIZE,
};
use ferry_migration::{pack, Envelope, EnvelopeError};

/// Simulated guest memory: one region `[0, GUEST_MEMORY)`; only bounds are checked.
pub const GUEST_MEMORY: u64 = 64 << 20;

/// Why a stream was refused.
#[derive(Debug)]
pub enum ReceiveError {
    Protocol(ProtocolError),
    State(EnvelopeError),
}

impl From<ProtocolError> for ReceiveError {
    fn from(e: ProtocolError) -> Self {
        ReceiveError::Protocol(e)
    }
}

/// What a completed (committed) stream delivered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub start: Option<StartInfo>,
    pub config: Option<serde_json::Value>,
    pub pages: u64,
    pub zero_pages: u64,
    pub rounds: u32,
    pub state: Option<serde_json::Value>,
}

/// The receiver's page check: page aligned and the whole page inside guest memory.
pub fn valid_page(gpa: u64) -> bool {
    gpa.is_multiple_of(PAGE_SIZE as u64)
        && gpa
            .checked_add(PAGE_SIZE as u64)
            .is_some_and(|end| end <= GUEST_MEMORY)
}

/// Run the receive loop over `input`. `Ok` only for a stream that reached Commit.
pub fn receive(mut input: &[u8]) -> Result<Received, ReceiveError> {
    let r = &mut input;
    let mut state = ReceiverState::AwaitStart;
    let mut got = Received::default();
    let mut have_memory = false;
    let mut scratch = Vec::new();
    loop {
        let frame = protocol::read_frame(r)?.ok_or(ProtocolError::Truncated)?;
        let before = state;
        state = state.next(frame.command)?;
        match frame.command {
            Command::Start => {
                assert_eq!(before, ReceiverState::AwaitStart);
                got.start = Some(protocol::check_start(&frame)?);
            }
            Command::Config => {
                assert_eq!(before, ReceiverState::AwaitConfig);
                let c: serde_json::Value = protocol::parse(&frame)?;
                got.config = Some(c);
                have_memory = true;
            }
            Command::Pages => {
                assert!(have_memory, "Pages accepted before Config");
                let (mut data_pages, mut zero_pages) = (0u64, 0u64);
                let n = protocol::decode_pages(&frame.payload, valid_page, |gpa, data| {
                    assert!(
                        valid_page(gpa),
                        "sink got page {gpa:#x} outside guest memory"
                    );
                    match data {
                        Some(d) => {
                            assert_eq!(d.len(), PAGE_SIZE, "data page {gpa:#x} not 4 KiB");
                            data_pages += 1;
                        }
                        None => zero_pages += 1,
                    }
                })?;
                assert_eq!(n as u64, data_pages + zero_pages, "count != sink calls");
                assert!(n <= protocol::MAX_PAGES_PER_MESSAGE);
                got.pages += n as u64;
                got.zero_pages += zero_pages;
            }
            Command::Packed => {
                assert!(have_memory, "Packed accepted before Config");
                let mut page = vec![0u8; PAGE_SIZE];
                let mut calls = 0u64;
                let n = pack::decode_packed(&frame.payload, valid_page, &mut scratch, |gpa, p| {
                    assert!(
                        valid_page(gpa),
                        "sink got page {gpa:#x} outside guest memory"
                    );
                    calls += 1;
                    match p {
                        pack::Page::Zero => got.zero_pages += 1,
                        pack::Page::Full(d) => assert_eq!(d.len(), PAGE_SIZE),
                        pack::Page::Delta(d) => {
                            pack::apply_delta(&mut page, d).map_err(pack::bad_delta)?
                        }
                    }
                    Ok(())
                })?;
                assert_eq!(n as u64, calls, "count != sink calls");
                assert!(n <= protocol::MAX_PAGES_PER_MESSAGE);
                got.pages += n as u64;
            }
            Command::RoundEnd => {
                let _: RoundInfo = protocol::parse(&frame)?;
                got.rounds += 1;
            }
            Command::State => {
                assert!(have_memory, "State accepted before Config");
                let (v, version): (serde_json::Value, u32) = Envelope::MigrationState
                    .decode(&frame.payload)
                    .map_err(ReceiveError::State)?;
                assert!((ferry_migration::envelope::MIN_FORMAT_VERSION
                    ..=ferry_migration::envelope::FORMAT_VERSION)
                    .contains(&version));
                got.state = Some(v);
            }
            Command::Commit if before == ReceiverState::AwaitPostcopyCommit => {
                assert_eq!(state, ReceiverState::Postcopy);
                assert!(got.state.is_some());
            }
            Command::Commit => {
                assert_eq!(before, ReceiverState::AwaitCommit);
                assert_eq!(state, ReceiverState::Done);
                assert!(got.start.is_some() && got.config.is_some() && got.state.is_some());
                return Ok(got);
            }
            Command::PostcopyPrepare => {
                assert_eq!(before, ReceiverState::Memory);
                protocol::decode_bitmap(&frame.payload, GUEST_MEMORY)?;
            }
            Command::PostcopyStart => {
                assert!(matches!(
                    before,
                    ReceiverState::Memory | ReceiverState::PostcopyPrepared
                ));
                let words = protocol::decode_bitmap(&frame.payload, GUEST_MEMORY)?;
                let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                assert!(pages <= GUEST_MEMORY / PAGE_SIZE as u64);
            }
            Command::PostcopyDone => {
                assert_eq!(before, ReceiverState::Postcopy);
                assert!(got.start.is_some() && got.config.is_some() && got.state.is_some());
                return Ok(got);
            }
            Command::Channels => {
                assert_eq!(before, ReceiverState::Memory);
                let c: protocol::ChannelsInfo = protocol::parse(&frame)?;
                if !(2..=protocol::MAX_CHANNELS).contains(&c.count) {
                    return Err(ProtocolError::Malformed(Command::Channels, "count".into()).into());
                }
            }
            Command::PostcopyChannel
            | Command::PageRequest
            | Command::PostcopyResume
            | Command::PostcopyMissing
            | Command::MemoryChannel
            | Command::ChannelDone
            | Command::Probe => {
                panic!("the state machine accepted a connection-opening or page-connection message mid-stream")
            }
            Command::Cancel => {
                assert_eq!(state, ReceiverState::Done);
                return Err(ProtocolError::Cancelled(String::new()).into());
            }
            Command::Query => {
                assert_eq!(before, ReceiverState::AwaitStart);
                let _: protocol::QueryInfo = protocol::parse(&frame)?;
                return Err(ProtocolError::Truncated.into());
            }
            Command::Ack => panic!("the state machine accepted an Ack from the source"),
        }
    }
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
