//! The live-migration wire protocol: framed messages over one byte stream (TCP today, TLS
//! later: anything `Read + Write`).
//!
//! Every message is a fixed 16-byte little-endian header, then its payload:
//!
//! ```text
//! offset size field
//!      0    4 magic    "FMIG" (0x47494d46)
//!      4    2 command  see `Command`
//!      6    2 flags    0
//!      8    8 length   payload bytes, bounded per command
//! ```
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source VMM
//!     participant D as destination VMM
//!     S->>D: Start {protocol version, memory size}
//!     D-->>S: Ack
//!     S->>D: Config (VmConfig)
//!     D-->>S: Ack (memory allocated, devices can be opened)
//!     loop pre-copy rounds
//!         S->>D: Pages (all, then dirtied ones)
//!         S->>D: RoundEnd
//!     end
//!     Note over S: pause guest, last dirty pages, save vCPU+device state
//!     S->>D: Pages (last), State
//!     D-->>S: Ack (restored, paused)
//!     Note over S: flush disks, release disk locks
//!     S->>D: Commit
//!     Note over D: take disk locks, record "committed", resume guest, announce MAC
//!     D-->>S: Ack (running)
//!     Note over S: discard the guest, exit
//! ```
//!
//! Before Commit is sent, any failure (cut connection, destination crash, error, cancel)
//! resumes the guest on the source, and an explicit refusal of Commit does too. Once Commit
//! may have reached the destination and no answer came, the source is *in doubt*: it keeps the
//! guest paused and asks the destination for the move's outcome record
//! ([`crate::outcome`]) on a new connection (`Query` with the migration id), until the
//! record says committed (the source drops its copy) or aborted (it resumes), or until its
//! host daemon or an admin settles it. The destination records "committed" before it resumes
//! the guest and never drops a guest that has run. So two hosts never run the guest, and the
//! guest is never dropped by both.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source VMM (in doubt)
//!     participant D as destination VMM
//!     S->>D: (new connection) Query {migration id}
//!     D-->>S: Ack {message: "committed" | "aborted" | "unknown"}
//! ```
//!
//! Post-copy (version 3): the source pauses after pre-copy, says which pages the destination
//! still lacks, and lets the guest run there at once; the destination fetches each missing
//! page the guest touches over a second connection while the source pushes the rest.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source VMM
//!     participant D as destination VMM
//!     S->>D: (second connection) PostcopyChannel {migration id}
//!     S->>D: PostcopyPrepare {bitmap of pages that will come again}
//!     D-->>S: Ack (stale copies dropped, memory registered)
//!     Note over S: pause guest, save vCPU+device state
//!     S->>D: PostcopyStart {bitmap of pages still to come}, State
//!     D-->>S: Ack (restored, paused; missing pages now fault)
//!     S->>D: Commit
//!     D-->>S: Ack (running)
//!     par on demand, second connection
//!         D->>S: PageRequest {pages the guest waits for}
//!         S->>D: Pages
//!     and background push, first connection
//!         S->>D: Pages (the rest, near the last faults first)
//!     end
//!     S->>D: PostcopyDone
//!     D-->>S: Ack (every page here)
//! ```
//!
//! From Commit on, the guest runs on the destination and only the source has the rest of its
//! memory: the source never resumes it, and the move ends only when every page has arrived.
//!
//! Versioning: `Start` carries the protocol version; a receiver accepts its own and the one
//! before it ([`PROTOCOL_VERSION`], [`MIN_PROTOCOL_VERSION`]). Version 2 added the migration id
//! and `Query`; a version-1 source sends no id (the receiver then makes one up). Version 3
//! added post-copy; a version-2 source never uses it. Version 4 added post-copy recovery: a
//! connection that breaks during post-copy is made again by the source (`PostcopyResume` on a
//! new connection, answered with `PostcopyMissing`, the bitmap of pages the destination still
//! lacks, then a new page connection), within the time `ChannelInfo::recovery_ms` names; and
//! `Probe`, with which a forecast measures the link without moving anything. Version 5 added
//! `Packed`, pages sent compressed (deltas against the destination's copy, lz4; see
//! [`crate::pack`]), which a source sends only to a version-5 destination: in pre-copy, and
//! (whole pages through lz4, no deltas) in post-copy's background push. Version 6 added
//! memory connections (like QEMU's multifd): pre-copy's pages go on several connections at
//! once, each page always on the same one (pages are dealt out by 2 MiB chunk), so a page's
//! versions arrive in order and a delta always finds its base; control stays on the main
//! connection. A memory connection that breaks fails the move (the guest runs on at the
//! source), as a broken main connection does in pre-copy.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source VMM
//!     participant D as destination VMM
//!     S->>D: (connections 1..n) MemoryChannel {migration id, index}
//!     S->>D: Channels {count: n}
//!     D-->>S: Ack (all n here)
//!     par each memory connection
//!         S->>D: Pages / Packed (its chunks), ..., ChannelDone
//!     and main connection
//!         S->>D: RoundEnd, ...
//!     end
//!     S->>D: RoundEnd {ack}
//!     D-->>S: Ack (every memory connection done and landed)
//!     Note over S,D: the pause (or post-copy) on the main connection, as before
//! ```
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source VMM
//!     participant D as destination VMM
//!     Note over S,D: post-copy under way; both connections break
//!     Note over D: guest waits on its missing pages
//!     S->>D: (new connection) PostcopyResume {migration id}
//!     D-->>S: PostcopyMissing {bitmap of pages still to come}
//!     S->>D: (new second connection) PostcopyChannel {migration id}
//!     Note over S,D: page requests and the push go on
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Frame magic.
pub const MAGIC: u32 = 0x4749_4d46;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 6;
/// The oldest version it accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// The first version with post-copy.
pub const POSTCOPY_VERSION: u32 = 3;
/// The largest payload of one `Probe`.
pub const PROBE_CHUNK: usize = 1 << 20;
/// The first version whose post-copy survives a broken connection (and that answers `Probe`).
pub const RECOVERY_VERSION: u32 = 4;
/// The first version that takes `Packed` (compressed pages).
pub const PACKED_VERSION: u32 = 5;
/// The first version that takes pre-copy's pages on several connections (`Channels`).
pub const CHANNELS_VERSION: u32 = 6;
/// Most memory connections of one move.
pub const MAX_CHANNELS: u32 = 8;
/// Guest page size on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one `Pages` message.
pub const MAX_PAGES_PER_MESSAGE: usize = 1024;
/// Flag in a page entry: the page is all zero, no data follows for it.
pub const PAGE_ZERO: u64 = 1;
/// The largest `PostcopyStart` bitmap: 1 TiB of guest-physical space.
pub const MAX_BITMAP_BYTES: usize = 32 << 20;

/// A message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Start = 1,
    Config = 2,
    Pages = 3,
    RoundEnd = 4,
    State = 5,
    Commit = 6,
    Cancel = 7,
    /// The first and only message of a connection that asks for a move's outcome.
    Query = 8,
    /// Post-copy: the bitmap of pages the destination must still get (then `State`).
    PostcopyStart = 9,
    /// Post-copy: the first message of the on-demand page connection.
    PostcopyChannel = 10,
    /// Post-copy: pages the destination's guest waits for (on the page connection).
    PageRequest = 11,
    /// Post-copy: every page has been sent.
    PostcopyDone = 12,
    /// Post-copy, before the pause: pages that will come again (dirtied since sent), so the
    /// destination can drop its stale copies while the guest still runs here. Acked.
    PostcopyPrepare = 13,
    /// Post-copy recovery: the first message of a connection that replaces a broken one.
    PostcopyResume = 14,
    /// Post-copy recovery, the destination's answer to `PostcopyResume`: the bitmap of pages
    /// it still lacks.
    PostcopyMissing = 15,
    /// Version 4, a forecast measuring the link: the first message of a connection that moves
    /// nothing. Each empty `Probe` is answered with an Ack whose message is the payload bytes
    /// received on the connection so far; the receiver throws the payloads away.
    Probe = 16,
    /// Version 5: pages sent compressed (deltas and lz4), see [`crate::pack`].
    Packed = 17,
    /// Version 6: the first message of an extra memory connection (`ChannelInfo` with its
    /// `index`); pre-copy's `Pages`/`Packed` follow on it, then `ChannelDone`.
    MemoryChannel = 18,
    /// Version 6, on the main connection: `ChannelsInfo`, the memory connections opened for
    /// this move. Acked once all of them are here; from then on pre-copy's pages go on them.
    Channels = 19,
    /// Version 6, on a memory connection: no more pages on it. The source sends it on every
    /// memory connection before the `RoundEnd` (acked) that ends pre-copy, and the destination
    /// answers that `RoundEnd` only when every memory connection got here: what follows on the
    /// main connection (the pause's pages, a post-copy) lands after all of pre-copy.
    ChannelDone = 20,
    Ack = 64,
}

impl Command {
    fn from_u16(v: u16) -> Option<Command> {
        Some(match v {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::Pages,
            4 => Command::RoundEnd,
            5 => Command::State,
            6 => Command::Commit,
            7 => Command::Cancel,
            8 => Command::Query,
            9 => Command::PostcopyStart,
            10 => Command::PostcopyChannel,
            11 => Command::PageRequest,
            12 => Command::PostcopyDone,
            13 => Command::PostcopyPrepare,
            14 => Command::PostcopyResume,
            15 => Command::PostcopyMissing,
            16 => Command::Probe,
            17 => Command::Packed,
            18 => Command::MemoryChannel,
            19 => Command::Channels,
            20 => Command::ChannelDone,
            64 => Command::Ack,
            _ => return None,
        })
    }

    /// The largest payload this command may carry.
    pub fn max_len(self) -> u64 {
        match self {
            Command::Start
            | Command::RoundEnd
            | Command::Cancel
            | Command::Query
            | Command::PostcopyChannel
            | Command::PostcopyDone
            | Command::PostcopyResume
            | Command::MemoryChannel
            | Command::Channels
            | Command::Ack => 64 << 10,
            Command::ChannelDone => 0,
            // One bit per page of up to 1 TiB of guest-physical space.
            Command::PostcopyStart | Command::PostcopyPrepare | Command::PostcopyMissing => {
                MAX_BITMAP_BYTES as u64
            }
            Command::PageRequest => (4 + MAX_PAGES_PER_MESSAGE * 8) as u64,
            Command::Config | Command::Probe => 1 << 20,
            Command::Pages => (4 + MAX_PAGES_PER_MESSAGE * (8 + PAGE_SIZE)) as u64,
            Command::Packed => crate::pack::MAX_PAYLOAD as u64,
            Command::State => crate::envelope::MAX_PAYLOAD + crate::envelope::HEADER_LEN as u64,
            Command::Commit => 0,
        }
    }
}

/// Errors on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection lost")]
    Io(#[from] io::Error),
    #[error("stream ended in the middle of a message (truncated)")]
    Truncated,
    #[error("not a ferry migration stream (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("{command:?} message of {len} bytes exceeds its limit of {max}")]
    TooLong {
        command: Command,
        len: u64,
        max: u64,
    },
    #[error("unexpected {got:?} while {state}")]
    OutOfOrder { got: Command, state: &'static str },
    #[error("protocol version {0} is not supported (this ferry speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    Version(u32),
    #[error("malformed {0:?} message: {1}")]
    Malformed(Command, String),
    #[error("page {gpa:#x} lies outside guest memory or is not page aligned")]
    BadPage { gpa: u64 },
    #[error("the other side refused: {0}")]
    Refused(String),
    #[error("the source cancelled the migration: {0}")]
    Cancelled(String),
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub payload: Vec<u8>,
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, ProtocolError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Read one frame. `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    if !read_full(r, &mut h)? {
        return Ok(None);
    }
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let cmd = u16::from_le_bytes([h[4], h[5]]);
    let command = Command::from_u16(cmd).ok_or(ProtocolError::UnknownCommand(cmd))?;
    let mut l = [0u8; 8];
    l.copy_from_slice(&h[8..16]);
    let len = u64::from_le_bytes(l);
    let max = command.max_len();
    if len > max {
        return Err(ProtocolError::TooLong { command, len, max });
    }
    // Grow the buffer as bytes arrive: a header alone must not make us allocate its length
    // beyond a few MiB (a full `Pages` message is allocated at once: regrowing it would copy
    // every page again on the destination's busiest path).
    let first = if matches!(command, Command::Pages | Command::Packed) {
        max
    } else {
        1 << 20
    };
    let mut payload = Vec::with_capacity((len as usize).min(first as usize));
    r.take(len).read_to_end(&mut payload)?;
    if (payload.len() as u64) < len {
        return Err(ProtocolError::Truncated);
    }
    Ok(Some(Frame { command, payload }))
}

/// Write one frame whose payload is `parts`, one after the other.
pub fn write_frame_parts(
    w: &mut impl Write,
    command: Command,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&(command as u16).to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    w.write_all(&h)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Write one frame.
pub fn write_frame(
    w: &mut impl Write,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    write_frame_parts(w, command, &[payload])
}

/// `Start`: who is talking and what is coming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInfo {
    pub protocol_version: u32,
    pub ferry_version: String,
    pub memory_bytes: u64,
    /// Names this move in outcome records and queries (version 2).
    #[serde(default)]
    pub migration_id: String,
}

/// `Query`: what became of this move?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryInfo {
    pub migration_id: String,
}

/// The answer to a `Query`, in an Ack's message.
pub const ANSWER_UNKNOWN: &str = "unknown";

/// `RoundEnd`: a pre-copy round is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoundInfo {
    pub round: u32,
    pub pages: u64,
    /// Version 3: answer with an Ack once everything before this message is in guest memory
    /// (the source waits for that before it pauses, so the pause does not wait behind the
    /// destination's receive backlog).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    /// Version 6, with `ack` while memory connections are open: answer once this many pages
    /// (all the source sent on them so far) have landed from them too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_pages: Option<u64>,
    /// Version 6, with `ack`: every memory connection ends with `ChannelDone` before this;
    /// answer once all of them did and their pages landed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub channels_done: bool,
}

/// `Ack`: the answer to Start, Config, State and Commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckInfo {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    /// In the answer to Start (version 3 on): the version the receiver speaks, so the source
    /// knows whether it may use post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
}

/// Serialise a small control payload.
pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Parse a small control payload.
pub fn parse<T: for<'de> Deserialize<'de>>(f: &Frame) -> Result<T, ProtocolError> {
    serde_json::from_slice(&f.payload)
        .map_err(|e| ProtocolError::Malformed(f.command, e.to_string()))
}

/// Whether a page is all zero (a word at a time).
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

/// Encode a `Pages` payload: `count: u32`, `count` entries of `gpa | flags` (u64), then the
/// data of every non-zero page in order.
pub fn encode_pages(pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    let zero: Vec<bool> = pages.iter().map(|(_, d)| is_zero(d)).collect();
    for ((gpa, _), z) in pages.iter().zip(&zero) {
        out.extend_from_slice(&(gpa | if *z { PAGE_ZERO } else { 0 }).to_le_bytes());
    }
    for ((_, data), z) in pages.iter().zip(&zero) {
        if !z {
            out.extend_from_slice(data);
        }
    }
}

/// Encode a `Pages` payload for `gpas` straight into `out`: `fill` copies each page into its
/// place (one copy, no staging buffer); zero pages are then dropped from the data area.
pub fn encode_pages_with<E>(
    gpas: &[u64],
    out: &mut Vec<u8>,
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    let head = 4 + gpas.len() * 8;
    out.clear();
    out.resize(head + gpas.len() * PAGE_SIZE, 0);
    out[0..4].copy_from_slice(&(gpas.len() as u32).to_le_bytes());
    let mut data_end = head;
    for (i, gpa) in gpas.iter().enumerate() {
        let slot = &mut out[data_end..data_end + PAGE_SIZE];
        fill(*gpa, slot)?;
        let zero = is_zero(slot);
        if !zero {
            data_end += PAGE_SIZE;
        }
        let entry = gpa | if zero { PAGE_ZERO } else { 0 };
        out[4 + i * 8..12 + i * 8].copy_from_slice(&entry.to_le_bytes());
    }
    out.truncate(data_end);
    Ok(())
}

/// The page list that opens a `Pages` or `Packed` payload (`count: u32`, then `count` entries
/// of 8 bytes): the count, the entries and what follows them.
pub(crate) fn page_list(
    payload: &[u8],
    command: Command,
) -> Result<(usize, &[u8], &[u8]), ProtocolError> {
    let bad = |m: &str| ProtocolError::Malformed(command, m.to_string());
    let count = payload.get(0..4).ok_or_else(|| bad("no page count"))?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count > MAX_PAGES_PER_MESSAGE {
        return Err(bad("too many pages"));
    }
    let entries = payload
        .get(4..4 + count * 8)
        .ok_or_else(|| bad("page list truncated"))?;
    Ok((count, entries, &payload[4 + count * 8..]))
}

/// Decode a `Pages` payload, checking every address with `valid` (page aligned, inside guest
/// memory). Calls `sink(gpa, Some(data))` for data pages and `sink(gpa, None)` for zero pages.
pub fn decode_pages(
    payload: &[u8],
    valid: impl Fn(u64) -> bool,
    mut sink: impl FnMut(u64, Option<&[u8]>),
) -> Result<usize, ProtocolError> {
    let bad = |m: &str| ProtocolError::Malformed(Command::Pages, m.to_string());
    let (count, entries, mut data) = page_list(payload, Command::Pages)?;
    let mut gpas = Vec::with_capacity(count);
    for e in entries.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let raw = u64::from_le_bytes(b);
        let gpa = raw & !(PAGE_SIZE as u64 - 1);
        if raw & (PAGE_SIZE as u64 - 1) & !PAGE_ZERO != 0 || !valid(gpa) {
            return Err(ProtocolError::BadPage { gpa: raw });
        }
        gpas.push((gpa, raw & PAGE_ZERO != 0));
    }
    let needed = gpas.iter().filter(|(_, z)| !z).count() * PAGE_SIZE;
    if data.len() != needed {
        return Err(bad("page data length does not match the page list"));
    }
    for (gpa, zero) in gpas {
        if zero {
            sink(gpa, None);
        } else {
            sink(gpa, Some(&data[..PAGE_SIZE]));
            data = &data[PAGE_SIZE..];
        }
    }
    Ok(count)
}

/// Where a receiver is in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    AwaitStart,
    AwaitConfig,
    Memory,
    AwaitCommit,
    /// Post-copy prepared: the pause and `PostcopyStart` come next.
    PostcopyPrepared,
    /// Post-copy announced: the state comes next.
    AwaitPostcopyState,
    /// Post-copy: restored, waiting for Commit.
    AwaitPostcopyCommit,
    /// Post-copy: the guest runs here, the rest of its memory arrives.
    Postcopy,
    Done,
}

impl ReceiverState {
    fn name(self) -> &'static str {
        match self {
            ReceiverState::AwaitStart => "waiting for Start",
            ReceiverState::AwaitConfig => "waiting for Config",
            ReceiverState::Memory => "receiving memory",
            ReceiverState::AwaitCommit => "waiting for Commit",
            ReceiverState::PostcopyPrepared => "waiting for PostcopyStart",
            ReceiverState::AwaitPostcopyState => "waiting for the post-copy State",
            ReceiverState::AwaitPostcopyCommit => "waiting for the post-copy Commit",
            ReceiverState::Postcopy => "in post-copy",
            ReceiverState::Done => "done",
        }
    }

    /// The state after `cmd`, or an error if `cmd` is not allowed now.
    pub fn next(self, cmd: Command) -> Result<ReceiverState, ProtocolError> {
        use Command as C;
        use ReceiverState as S;
        Ok(match (self, cmd) {
            (_, C::Cancel) if self != S::Done => S::Done,
            (S::AwaitStart, C::Start) => S::AwaitConfig,
            (S::AwaitStart, C::Query) => S::Done,
            (S::AwaitConfig, C::Config) => S::Memory,
            (S::Memory, C::Pages | C::Packed | C::RoundEnd | C::Channels) => S::Memory,
            (S::Memory, C::State) => S::AwaitCommit,
            (S::AwaitCommit, C::Commit) => S::Done,
            (S::Memory, C::PostcopyPrepare) => S::PostcopyPrepared,
            (S::Memory | S::PostcopyPrepared, C::PostcopyStart) => S::AwaitPostcopyState,
            (S::AwaitPostcopyState, C::State) => S::AwaitPostcopyCommit,
            (S::AwaitPostcopyCommit, C::Commit) => S::Postcopy,
            (S::Postcopy, C::Pages | C::Packed) => S::Postcopy,
            (S::Postcopy, C::PostcopyDone) => S::Done,
            (state, got) => {
                return Err(ProtocolError::OutOfOrder {
                    got,
                    state: state.name(),
                })
            }
        })
    }
}

/// `PostcopyChannel` and `MemoryChannel`: which move this connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub migration_id: String,
    /// Version 4: how long (ms) both sides wait for a broken post-copy connection to be made
    /// again before they give up; unset or 0: no recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<u64>,
    /// Version 6, `MemoryChannel`: which of the move's memory connections this is (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
}

/// `Channels`: how many memory connections the source opened (2..=[`MAX_CHANNELS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsInfo {
    pub count: u32,
}

/// Encode a page bitmap (bit `n` = the page at `n * PAGE_SIZE`) as little-endian words.
pub fn encode_bitmap(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decode a `PostcopyStart` bitmap for a guest whose pages all lie below `limit` (bytes of
/// guest-physical space): any bit at or past it is an error.
pub fn decode_bitmap(payload: &[u8], limit: u64) -> Result<Vec<u64>, ProtocolError> {
    let bad = |m: &str| ProtocolError::Malformed(Command::PostcopyStart, m.to_string());
    if !payload.len().is_multiple_of(8) {
        return Err(bad("bitmap is not a whole number of words"));
    }
    let words: Vec<u64> = payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let pages = limit / PAGE_SIZE as u64;
    for (i, w) in words.iter().enumerate() {
        let first = i as u64 * 64;
        if *w != 0 && first + 64 > pages {
            let keep = pages.saturating_sub(first);
            let mask = if keep >= 64 {
                u64::MAX
            } else {
                (1u64 << keep) - 1
            };
            if w & !mask != 0 {
                return Err(bad("bitmap names pages outside guest memory"));
            }
        }
    }
    Ok(words)
}

/// Encode a `PageRequest`: `count: u32`, then `count` page addresses (u64).
pub fn encode_request(gpas: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + gpas.len() * 8);
    out.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
    for g in gpas {
        out.extend_from_slice(&g.to_le_bytes());
    }
    out
}

/// Decode a `PageRequest`, checking every address with `valid`.
pub fn decode_request(
    payload: &[u8],
    valid: impl Fn(u64) -> bool,
) -> Result<Vec<u64>, ProtocolError> {
    let bad = |m: &str| ProtocolError::Malformed(Command::PageRequest, m.to_string());
    let count = payload.get(0..4).ok_or_else(|| bad("no page count"))?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count > MAX_PAGES_PER_MESSAGE {
        return Err(bad("too many pages"));
    }
    if payload.len() != 4 + count * 8 {
        return Err(bad("length does not match the page count"));
    }
    payload[4..]
        .chunks_exact(8)
        .map(|c| {
            let g = u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8]));
            if valid(g) {
                Ok(g)
            } else {
                Err(ProtocolError::BadPage { gpa: g })
            }
        })
        .collect()
}

/// Check a `Start` message.
pub fn check_start(f: &Frame) -> Result<StartInfo, ProtocolError> {
    let s: StartInfo = parse(f)?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&s.protocol_version) {
        return Err(ProtocolError::Version(s.protocol_version));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(cmd: Command, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, cmd, payload).unwrap();
        v
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut bytes = frame(Command::Start, b"{}");
        bytes.extend(frame(Command::Commit, b""));
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).unwrap().unwrap().command, Command::Start);
        assert_eq!(
            read_frame(&mut r).unwrap().unwrap().command,
            Command::Commit
        );
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn bad_streams_are_errors() {
        let good = frame(Command::Config, b"0123456789");
        for cut in 1..good.len() {
            assert!(
                matches!(read_frame(&mut &good[..cut]), Err(ProtocolError::Truncated)),
                "cut at {cut}"
            );
        }
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4] = 99;
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(ProtocolError::UnknownCommand(99))
        ));
        let mut b = good;
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(ProtocolError::TooLong { .. })
        ));
        let commit_with_payload = frame(Command::Commit, b"x");
        assert!(matches!(
            read_frame(&mut &commit_with_payload[..]),
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn pages_round_trip_with_zero_pages_elided() {
        let a = vec![7u8; PAGE_SIZE];
        let z = vec![0u8; PAGE_SIZE];
        let mut out = Vec::new();
        encode_pages(&[(0x1000, &a), (0x2000, &z), (0x3000, &a)], &mut out);
        assert_eq!(out.len(), 4 + 3 * 8 + 2 * PAGE_SIZE);
        let mut got = vec![];
        let n = decode_pages(&out, |g| g < 0x10000, |g, d| got.push((g, d.map(|d| d[0])))).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            got,
            vec![(0x1000, Some(7)), (0x2000, None), (0x3000, Some(7))]
        );
    }

    #[test]
    fn encode_with_matches_encode() {
        let a = vec![7u8; PAGE_SIZE];
        let z = vec![0u8; PAGE_SIZE];
        let mut want = Vec::new();
        encode_pages(&[(0x1000, &a), (0x2000, &z), (0x3000, &a)], &mut want);
        let mut got = Vec::new();
        encode_pages_with::<()>(&[0x1000, 0x2000, 0x3000], &mut got, |g, slot| {
            slot.copy_from_slice(if g == 0x2000 { &z } else { &a });
            Ok(())
        })
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn hostile_page_lists_are_refused() {
        let a = vec![7u8; PAGE_SIZE];
        let mut out = Vec::new();
        encode_pages(&[(0x1000, &a)], &mut out);
        assert!(matches!(
            decode_pages(&out, |g| g < 0x1000, |_, _| {}),
            Err(ProtocolError::BadPage { .. })
        ));
        let mut unaligned = out.clone();
        unaligned[4] = 0x10;
        assert!(decode_pages(&unaligned, |_| true, |_, _| {}).is_err());
        assert!(decode_pages(&out[..out.len() - 1], |_| true, |_, _| {}).is_err());
        let mut huge = out.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_pages(&huge, |_| true, |_, _| {}).is_err());
        assert!(decode_pages(&[], |_| true, |_, _| {}).is_err());
    }

    #[test]
    fn receiver_state_machine_refuses_out_of_order() {
        use Command as C;
        let mut s = ReceiverState::AwaitStart;
        assert!(s.next(C::Pages).is_err());
        for c in [
            C::Start,
            C::Config,
            C::Pages,
            C::RoundEnd,
            C::Pages,
            C::State,
            C::Commit,
        ] {
            s = s.next(c).unwrap();
        }
        assert_eq!(s, ReceiverState::Done);
        assert!(ReceiverState::Memory.next(C::Commit).is_err());
        assert_eq!(
            ReceiverState::AwaitStart.next(C::Query).unwrap(),
            ReceiverState::Done
        );
        assert!(ReceiverState::Memory.next(C::Query).is_err());
        assert!(ReceiverState::AwaitCommit.next(C::Pages).is_err());
        assert_eq!(
            ReceiverState::Memory.next(C::Cancel).unwrap(),
            ReceiverState::Done
        );
    }

    #[test]
    fn versions_n_and_n_minus_one_only() {
        let f = |v: u32| Frame {
            command: Command::Start,
            payload: json(&StartInfo {
                protocol_version: v,
                ferry_version: "x".into(),
                memory_bytes: 1,
                migration_id: String::new(),
            }),
        };
        assert!(check_start(&f(PROTOCOL_VERSION)).is_ok());
        assert!(check_start(&f(PROTOCOL_VERSION - 1)).is_ok());
        assert!(matches!(
            check_start(&f(PROTOCOL_VERSION + 1)),
            Err(ProtocolError::Version(_))
        ));
        assert!(matches!(check_start(&f(0)), Err(ProtocolError::Version(0))));
    }

    #[test]
    fn bitmaps_round_trip_and_stay_inside_guest_memory() {
        let words = vec![0b1011u64, 0, u64::MAX, 1 << 63];
        let limit = 4 * 64 * PAGE_SIZE as u64;
        assert_eq!(decode_bitmap(&encode_bitmap(&words), limit).unwrap(), words);
        // One page less of guest memory: the last bit now lies outside.
        assert!(decode_bitmap(&encode_bitmap(&words), limit - PAGE_SIZE as u64).is_err());
        // A word past the end that is zero is harmless; a set bit there is not.
        assert!(decode_bitmap(&encode_bitmap(&[0, 0]), 64 * PAGE_SIZE as u64).is_ok());
        assert!(decode_bitmap(&encode_bitmap(&[0, 1]), 64 * PAGE_SIZE as u64).is_err());
        assert!(decode_bitmap(&[1, 2, 3], limit).is_err());
        assert!(decode_bitmap(&[], limit).unwrap().is_empty());
    }

    #[test]
    fn page_requests_round_trip_and_refuse_bad_pages() {
        let ok = |g: u64| g.is_multiple_of(PAGE_SIZE as u64) && g < 1 << 30;
        let r = encode_request(&[0, 0x1000, 0x3fff_f000]);
        assert_eq!(
            decode_request(&r, ok).unwrap(),
            vec![0, 0x1000, 0x3fff_f000]
        );
        assert!(matches!(
            decode_request(&encode_request(&[0x1001]), ok),
            Err(ProtocolError::BadPage { gpa: 0x1001 })
        ));
        assert!(decode_request(&r[..r.len() - 1], ok).is_err());
        let mut many = encode_request(&[]);
        many[0..4].copy_from_slice(&(MAX_PAGES_PER_MESSAGE as u32 + 1).to_le_bytes());
        assert!(decode_request(&many, ok).is_err());
    }

    #[test]
    fn postcopy_follows_its_order() {
        use Command as C;
        let mut s = ReceiverState::AwaitStart;
        for c in [
            C::Start,
            C::Config,
            C::Pages,
            C::RoundEnd,
            C::PostcopyPrepare,
            C::PostcopyStart,
            C::State,
            C::Commit,
            C::Pages,
            C::Pages,
            C::PostcopyDone,
        ] {
            s = s.next(c).unwrap();
        }
        assert_eq!(s, ReceiverState::Done);
        // No pages between PostcopyStart and State, no second State, no RoundEnd in post-copy.
        assert!(ReceiverState::AwaitPostcopyState.next(C::Pages).is_err());
        assert!(ReceiverState::Postcopy.next(C::State).is_err());
        assert!(ReceiverState::Postcopy.next(C::RoundEnd).is_err());
        assert!(ReceiverState::Memory.next(C::PostcopyDone).is_err());
        assert!(ReceiverState::Memory.next(C::PageRequest).is_err());
        // Prepare is optional, once, and only before the pause.
        assert!(ReceiverState::PostcopyPrepared.next(C::Pages).is_err());
        assert!(ReceiverState::PostcopyPrepared
            .next(C::PostcopyPrepare)
            .is_err());
        assert!(ReceiverState::Postcopy.next(C::PostcopyPrepare).is_err());
        // Recovery messages open a connection; they never come in the middle of one.
        for st in [
            ReceiverState::AwaitStart,
            ReceiverState::Memory,
            ReceiverState::Postcopy,
        ] {
            assert!(st.next(C::Probe).is_err());
        }
        for st in [ReceiverState::Memory, ReceiverState::Postcopy] {
            assert!(st.next(C::PostcopyResume).is_err());
            assert!(st.next(C::PostcopyMissing).is_err());
        }
    }

    #[test]
    fn recovery_messages_round_trip_and_older_channels_mean_no_recovery() {
        let mut b = Vec::new();
        write_frame(&mut b, Command::PostcopyMissing, &encode_bitmap(&[5, 0])).unwrap();
        let f = read_frame(&mut &b[..]).unwrap().unwrap();
        assert_eq!(f.command, Command::PostcopyMissing);
        assert_eq!(
            decode_bitmap(&f.payload, 128 * PAGE_SIZE as u64).unwrap(),
            [5, 0]
        );
        let old: ChannelInfo = serde_json::from_str(r#"{"migration_id":"m"}"#).unwrap();
        assert_eq!(old.recovery_ms, None);
    }
}
