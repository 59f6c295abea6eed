//! The destination's side of a move, as one state machine that both the VMM and the fuzz
//! target run: the loop reads each message, checks it against [`ReceiverState`], decodes it
//! (start, config, pages, bitmaps, round ends, the state envelope) and hands what it means to a
//! [`Destination`]: the VMM's holds KVM and guest memory, the fuzz target's a simulated memory.
//! So the code that meets untrusted bytes is the code that is fuzzed, not a model of it.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitStart
//!     AwaitStart --> AwaitConfig: Start (version checked) / Ack
//!     AwaitConfig --> Memory: Config / Ack
//!     Memory --> Memory: Pages, Packed, RoundEnd, Channels
//!     Memory --> AwaitCommit: State / Ack
//!     AwaitCommit --> Done: Commit / Ack (the guest runs here)
//!     Memory --> PostcopyPrepared: PostcopyPrepare / Ack
//!     Memory --> AwaitPostcopyState: PostcopyStart
//!     PostcopyPrepared --> AwaitPostcopyState: PostcopyStart
//!     AwaitPostcopyState --> AwaitPostcopyCommit: State / Ack
//!     AwaitPostcopyCommit --> Postcopy: Commit / Ack (the guest runs here)
//!     Postcopy --> Postcopy: Pages, Packed (see push_pages)
//!     Postcopy --> Done: PostcopyDone
//!     AwaitStart --> Done: Cancel
//!     AwaitConfig --> Done: Cancel
//!     Memory --> Done: Cancel
//! ```
//!
//! Anything else, anywhere, is an error that ends the stream; the destination then records the
//! move as aborted and runs nothing. Pages land through [`PageMemory`], with [`Landed`] knowing
//! which pages already hold data from the stream (so a zero page is written only over data, and
//! a delta knows its base).

use std::io::{Read, Write};

use ferry_api::VmConfig;
use serde::de::DeserializeOwned;

use crate::envelope::{Envelope, EnvelopeError};
use crate::pack::{self, Page};
use crate::protocol::{
    self, AckInfo, ChannelsInfo, Command, Frame, ProtocolError, ReceiverState, RoundInfo,
    StartInfo, PAGE_SIZE,
};

/// Guest memory as the receiver sees it: whole pages at guest-physical addresses.
pub trait PageMemory {
    type Error;
    /// Whether the whole page at `gpa` (page aligned) is guest memory.
    fn holds(&self, gpa: u64) -> bool;
    /// One past the highest guest-physical address (bounds a page bitmap).
    fn end(&self) -> u64;
    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error>;
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

/// Why pages could not land: the stream's fault, or this host's memory.
#[derive(Debug)]
pub enum LandError<E> {
    Stream(ProtocolError),
    Memory(E),
}

/// Which pages hold data from the stream (one bit per guest-physical page).
#[derive(Debug, Default)]
pub struct Landed {
    written: Vec<u64>,
}

impl Landed {
    /// Take in where another receiver's pages landed (a memory connection's, once done).
    pub fn merge(&mut self, other: &Landed) {
        if other.written.len() > self.written.len() {
            self.written.resize(other.written.len(), 0);
        }
        for (w, o) in self.written.iter_mut().zip(&other.written) {
            *w |= o;
        }
    }

    fn bit(&mut self, gpa: u64) -> (&mut u64, u64) {
        let bit = (gpa / PAGE_SIZE as u64) as usize;
        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
        if word >= self.written.len() {
            self.written.resize(word + 1, 0);
        }
        (&mut self.written[word], mask)
    }

    /// Put one page in place. Fresh guest memory is zero, so a zero page is written only over
    /// data that landed before; a delta applies to the page as it is here (zero if nothing
    /// landed there yet).
    fn land<M: PageMemory>(
        &mut self,
        m: &M,
        gpa: u64,
        page: Page<'_>,
    ) -> Result<(), LandError<M::Error>> {
        let (w, mask) = self.bit(gpa);
        let had = *w & mask != 0;
        match page {
            Page::Full(d) => {
                *w |= mask;
                m.write_page(gpa, d).map_err(LandError::Memory)
            }
            Page::Zero if !had => Ok(()),
            Page::Zero => {
                *w &= !mask;
                m.write_page(gpa, &[0u8; PAGE_SIZE])
                    .map_err(LandError::Memory)
            }
            Page::Delta(d) => {
                *w |= mask;
                let mut page = [0u8; PAGE_SIZE];
                if had {
                    m.read_page(gpa, &mut page).map_err(LandError::Memory)?;
                }
                pack::apply_delta(&mut page, d)
                    .map_err(|e| LandError::Stream(pack::bad_delta(e)))?;
                m.write_page(gpa, &page).map_err(LandError::Memory)
            }
        }
    }
}

/// Put the pages of a pre-copy `Pages` or `Packed` message in place; how many there were.
/// `unpacked`: room for a `Packed` message's data area, decompressed. A memory error stops
/// nothing else: the whole message is decoded, and the first such error returned.
pub fn land_frame<M: PageMemory>(
    frame: &Frame,
    m: &M,
    landed: &mut Landed,
    unpacked: &mut Vec<u8>,
) -> Result<u64, LandError<M::Error>> {
    let mut err = None;
    let mut land = |gpa: u64, page: Page<'_>| match landed.land(m, gpa, page) {
        Ok(()) => Ok(()),
        Err(LandError::Stream(e)) => Err(e),
        Err(LandError::Memory(e)) => {
            err.get_or_insert(e);
            Ok(())
        }
    };
    let valid = |gpa| m.holds(gpa);
    let n = match frame.command {
        Command::Pages => {
            let mut bad = None;
            let n = protocol::decode_pages(&frame.payload, valid, |gpa, data| {
                if let Err(e) = land(gpa, data.map_or(Page::Zero, Page::Full)) {
                    bad.get_or_insert(e);
                }
            });
            match bad {
                Some(e) => Err(e),
                None => n,
            }
        }
        Command::Packed => pack::decode_packed(&frame.payload, valid, unpacked, &mut land),
        c => Err(ProtocolError::OutOfOrder {
            got: c,
            state: "landing pages",
        }),
    }
    .map_err(LandError::Stream)?;
    match err {
        Some(e) => Err(LandError::Memory(e)),
        None => Ok(n as u64),
    }
}

/// Decode a post-copy push (`Pages` or `Packed` after Commit): whole and zero pages only, each
/// checked with `valid`; `place(gpa, None)` for a zero page.
pub fn push_pages(
    frame: &Frame,
    valid: impl Fn(u64) -> bool,
    scratch: &mut Vec<u8>,
    mut place: impl FnMut(u64, Option<&[u8]>),
) -> Result<usize, ProtocolError> {
    match frame.command {
        Command::Packed => pack::decode_packed(&frame.payload, valid, scratch, |gpa, page| {
            match page {
                Page::Full(d) => place(gpa, Some(d)),
                Page::Zero => place(gpa, None),
                Page::Delta(_) => return Err(pack::bad_delta("none in post-copy")),
            }
            Ok(())
        }),
        Command::Pages => protocol::decode_pages(&frame.payload, valid, place),
        c => Err(ProtocolError::OutOfOrder {
            got: c,
            state: "in post-copy",
        }),
    }
}

/// What one message of post-copy's push means, after the state machine took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Pages to place ([`push_pages`]).
    Pages,
    /// The source sent everything.
    Done,
}

/// Advance `state` (which starts at [`ReceiverState::Postcopy`]) by one message of the push.
pub fn push_step(state: &mut ReceiverState, f: &Frame) -> Result<Push, ProtocolError> {
    *state = state.next(f.command)?;
    match f.command {
        Command::Pages | Command::Packed => Ok(Push::Pages),
        Command::PostcopyDone => Ok(Push::Done),
        Command::Cancel => Err(ProtocolError::Cancelled(String::new())),
        got => Err(ProtocolError::OutOfOrder {
            got,
            state: "in post-copy",
        }),
    }
}

/// Pages received on the main connection, and where they landed.
#[derive(Debug, Default)]
pub struct Received {
    pub pages: u64,
    pub landed: Landed,
}

/// How the stream ended at Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Every page is here.
    Precopy,
    /// The guest runs here; the rest of its memory follows ([`push_step`]).
    Postcopy,
}

/// What the destination does at each step. Every method runs after the loop has checked the
/// message's place in the stream and decoded it; an `Err` ends the stream (the loop tells the
/// source why, through the caller).
pub trait Destination {
    type Error: From<ProtocolError>
        + From<EnvelopeError>
        + From<<Self::Memory as PageMemory>::Error>;
    type Memory: PageMemory;
    /// The saved vCPU and device state.
    type State: DeserializeOwned;

    /// `Start`, version already checked: is this the move we wait for?
    fn start(&mut self, info: &StartInfo) -> Result<(), Self::Error>;
    /// `Config`: make guest memory of `memory_bytes` (from Start) for this VM.
    fn config(&mut self, config: VmConfig, memory_bytes: u64) -> Result<(), Self::Error>;
    /// Guest memory, once `config` made it.
    fn memory(&self) -> Option<&Self::Memory>;
    /// `Channels`: pre-copy's pages also come on `count` more connections (2..=MAX_CHANNELS,
    /// checked, once).
    fn channels(&mut self, count: u32) -> Result<(), Self::Error>;
    /// `RoundEnd`. With `ack` set the source waits for this side to have taken in every page
    /// (with `channels_done`: the memory connections end, their pages join `got`).
    fn round_end(&mut self, r: &RoundInfo, got: &mut Received) -> Result<(), Self::Error>;
    /// `PostcopyPrepare`: the pages in `bitmap` will come again.
    fn postcopy_prepare(&mut self, bitmap: Vec<u64>) -> Result<(), Self::Error>;
    /// `PostcopyStart`: the pages in `bitmap` come after the guest starts here.
    fn postcopy_start(&mut self, bitmap: Vec<u64>) -> Result<(), Self::Error>;
    /// `State`: restore the VM, paused.
    fn state(&mut self, state: Self::State) -> Result<(), Self::Error>;
    /// `Commit`: take over the guest (disks, the outcome record) and run it. From `Ok` on the
    /// guest runs here, whether or not the acknowledgement reaches the source.
    fn commit(&mut self, how: Committed) -> Result<(), Self::Error>;
    /// A message could not be read: the error to end with (a failed memory connection may
    /// explain the main one closing).
    fn read_failed(&mut self, e: ProtocolError) -> Self::Error;
    /// Just before the last acknowledgement goes (the VMM's failure injection).
    fn before_final_ack(&mut self) {}
}

fn ack(t: &mut impl Write, version: Option<u32>) -> Result<(), ProtocolError> {
    let a = AckInfo {
        ok: true,
        message: String::new(),
        protocol_version: version,
    };
    protocol::write_frame(t, Command::Ack, &protocol::json(&a))
}

/// Run the stream on `t` (its first message already read, if `first`) into `d`, up to and
/// including Commit. After `Committed::Postcopy` the caller takes the push with [`push_step`].
pub fn receive<D: Destination, T: Read + Write>(
    t: &mut T,
    mut first: Option<Frame>,
    d: &mut D,
) -> Result<(Committed, Received), D::Error> {
    let mut state = ReceiverState::AwaitStart;
    let mut memory_bytes = 0;
    let mut got = Received::default();
    let mut unpacked = Vec::new();
    let mut channels = false;
    loop {
        let frame = match first.take() {
            Some(f) => f,
            None => match protocol::read_frame(t).and_then(|f| f.ok_or(ProtocolError::Truncated)) {
                Ok(f) => f,
                Err(e) => return Err(d.read_failed(e)),
            },
        };
        let before = state;
        state = state.next(frame.command)?;
        match frame.command {
            Command::Start => {
                let info = protocol::check_start(&frame)?;
                d.start(&info)?;
                memory_bytes = info.memory_bytes;
                ack(t, Some(protocol::PROTOCOL_VERSION))?;
            }
            Command::Config => {
                let c: VmConfig = protocol::parse(&frame)?;
                d.config(c, memory_bytes)?;
                ack(t, None)?;
            }
            Command::Pages | Command::Packed => {
                let m = d.memory().ok_or(ProtocolError::Truncated)?;
                got.pages += match land_frame(&frame, m, &mut got.landed, &mut unpacked) {
                    Ok(n) => n,
                    Err(LandError::Stream(e)) => return Err(e.into()),
                    Err(LandError::Memory(e)) => return Err(e.into()),
                };
            }
            Command::Channels => {
                let info: ChannelsInfo = protocol::parse(&frame)?;
                if channels || !(2..=protocol::MAX_CHANNELS).contains(&info.count) {
                    let e = ProtocolError::Malformed(
                        Command::Channels,
                        format!(
                            "{} memory connections (again, or not 2..={})",
                            info.count,
                            protocol::MAX_CHANNELS
                        ),
                    );
                    return Err(e.into());
                }
                channels = true;
                d.channels(info.count)?;
                ack(t, None)?;
            }
            Command::PostcopyPrepare | Command::PostcopyStart => {
                let end = d.memory().ok_or(ProtocolError::Truncated)?.end();
                let words = protocol::decode_bitmap(&frame.payload, end)?;
                if frame.command == Command::PostcopyPrepare {
                    d.postcopy_prepare(words)?;
                    ack(t, None)?;
                } else {
                    d.postcopy_start(words)?;
                }
            }
            Command::RoundEnd => {
                let r: RoundInfo = protocol::parse(&frame)?;
                d.round_end(&r, &mut got)?;
                if r.ack {
                    ack(t, None)?;
                }
            }
            Command::State => {
                let (s, _): (D::State, u32) = Envelope::MigrationState.decode(&frame.payload)?;
                d.state(s)?;
                ack(t, None)?;
            }
            Command::Commit => {
                let how = if before == ReceiverState::AwaitPostcopyCommit {
                    Committed::Postcopy
                } else {
                    Committed::Precopy
                };
                d.commit(how)?;
                d.before_final_ack();
                // The guest runs here now, whatever happens to this last message: a source
                // that misses it asks again (Query) and learns "committed".
                if let Err(e) = ack(t, None) {
                    tracing::warn!(
                        "the final acknowledgement did not go out ({e}); the guest runs here, \
                         the source will ask"
                    );
                }
                return Ok((how, got));
            }
            Command::Cancel => return Err(ProtocolError::Cancelled(String::new()).into()),
            Command::Ack
            | Command::Query
            | Command::PostcopyChannel
            | Command::PageRequest
            | Command::PostcopyResume
            | Command::PostcopyMissing
            | Command::Probe
            | Command::MemoryChannel
            | Command::ChannelDone
            | Command::PostcopyDone => {
                let e = ProtocolError::OutOfOrder {
                    got: frame.command,
                    state: "receiving",
                };
                return Err(e.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// 16 pages of memory, each write recorded.
    struct Mem(RefCell<Vec<u8>>);

    impl PageMemory for Mem {
        type Error = std::convert::Infallible;
        fn holds(&self, gpa: u64) -> bool {
            gpa.is_multiple_of(PAGE_SIZE as u64) && gpa + (PAGE_SIZE as u64) <= self.end()
        }
        fn end(&self) -> u64 {
            16 * PAGE_SIZE as u64
        }
        fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), Self::Error> {
            let g = gpa as usize;
            self.0.borrow_mut()[g..g + PAGE_SIZE].copy_from_slice(data);
            Ok(())
        }
        fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
            let g = gpa as usize;
            buf.copy_from_slice(&self.0.borrow()[g..g + PAGE_SIZE]);
            Ok(())
        }
    }

    fn frame(command: Command, payload: Vec<u8>) -> Frame {
        Frame { command, payload }
    }

    #[test]
    fn zero_pages_clear_only_data_that_landed_and_deltas_apply_to_it() {
        let m = Mem(RefCell::new(vec![0u8; 16 * PAGE_SIZE]));
        let mut landed = Landed::default();
        let mut scratch = Vec::new();
        let data = vec![7u8; PAGE_SIZE];
        let mut p = Vec::new();
        protocol::encode_pages(&[(0x1000, &data)], &mut p);
        assert_eq!(
            land_frame(&frame(Command::Pages, p), &m, &mut landed, &mut scratch).unwrap(),
            1
        );
        assert_eq!(m.0.borrow()[0x1000], 7);
        // A delta against what landed: words 1 and 2 change.
        let mut new = data.clone();
        new[8..24].fill(9);
        let mut pk = pack::Packer::default();
        pk.slot().copy_from_slice(&new);
        assert!(pk.keep_delta(0x1000, &data, &mut scratch));
        let (head, body, _) = pk.finish(false);
        let packed = [head, body].concat();
        land_frame(
            &frame(Command::Packed, packed),
            &m,
            &mut landed,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(&m.0.borrow()[0x1000..0x1000 + 32], &new[..32]);
        // A zero page over it clears it.
        let mut z = Vec::new();
        protocol::encode_pages(&[(0x1000, &[0u8; PAGE_SIZE][..])], &mut z);
        land_frame(&frame(Command::Pages, z), &m, &mut landed, &mut scratch).unwrap();
        assert!(m.0.borrow()[0x1000..0x2000].iter().all(|&b| b == 0));
        // A page past the end is the stream's fault.
        let mut far = Vec::new();
        protocol::encode_pages(&[(0x10000, &data)], &mut far);
        assert!(matches!(
            land_frame(&frame(Command::Pages, far), &m, &mut landed, &mut scratch),
            Err(LandError::Stream(ProtocolError::BadPage { .. }))
        ));
    }

    #[test]
    fn the_push_takes_pages_until_done_and_nothing_else() {
        let mut s = ReceiverState::Postcopy;
        let mut p = Vec::new();
        protocol::encode_pages(&[(0x1000, &[1u8; PAGE_SIZE][..])], &mut p);
        let pages = frame(Command::Pages, p);
        assert_eq!(push_step(&mut s, &pages).unwrap(), Push::Pages);
        let mut placed = Vec::new();
        let n = push_pages(
            &pages,
            |g| g < 0x10000,
            &mut Vec::new(),
            |g, d| placed.push((g, d.map(|d| d[0]))),
        )
        .unwrap();
        assert_eq!((n, placed), (1, vec![(0x1000, Some(1))]));
        assert!(push_step(&mut s, &frame(Command::State, vec![])).is_err());
        let mut s = ReceiverState::Postcopy;
        assert_eq!(
            push_step(&mut s, &frame(Command::PostcopyDone, b"{}".to_vec())).unwrap(),
            Push::Done
        );
        assert_eq!(s, ReceiverState::Done);
    }
}
