//! ferry's saved-state formats.
//!
//! - [`envelope`]: the framing every saved or migrated state blob travels in (magic, format
//!   version, length, checksum), so a damaged or foreign file is refused before anything is
//!   restored from it.
//! - [`persist`]: the one save/restore trait every stateful piece of a VM implements;
//! - [`protocol`]: the live-migration wire protocol (framing, page lists, receiver state machine);
//! - [`pack`]: pages sent compressed (`Packed`: deltas and lz4);
//! - [`receiver`]: the destination's receive loop, generic over where the VM lands (the VMM,
//!   or the fuzz target's simulated memory);
//! - [`outcome`]: a move's one durable decision (committed or aborted), written once.
//!
//! This crate has no KVM dependency: it is unit-tested (and later fuzzed) on its own.

pub mod envelope;
pub mod outcome;
pub mod pack;
pub mod persist;
pub mod protocol;
pub mod receiver;

pub use envelope::{Envelope, EnvelopeError};
pub use outcome::{Outcome, OutcomeError, OutcomeRecord};
pub use persist::Persist;
