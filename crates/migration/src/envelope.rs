//! The framing of a saved state: a fixed little-endian header, then the payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic     b"FERRYST\0"
//!      8     4  kind      what the payload is (snapshot state, migration state, ...)
//!     12     4  version   format version of the payload
//!     16     8  length    payload length in bytes
//!     24     4  crc32     CRC-32 (IEEE) of the payload
//!     28     4  reserved  zero
//!     32     -  payload
//! ```
//!
//! Compatibility window: a reader accepts its own [`FORMAT_VERSION`] and the one before it
//! ([`MIN_FORMAT_VERSION`]); payload types keep new fields `#[serde(default)]` for that.

use serde::{de::DeserializeOwned, Serialize};

/// The magic at the start of every envelope.
pub const MAGIC: [u8; 8] = *b"FERRYST\0";
/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// The payload format this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest payload format this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Upper bound for a payload: states are small (guest memory never goes through serde).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing an envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("state is truncated: {got} bytes, the header needs {HEADER_LEN}")]
    ShortHeader { got: usize },
    #[error("not a ferry state file (bad magic)")]
    BadMagic,
    #[error("state is a {found:?} blob, expected {expected:?}")]
    WrongKind { expected: u32, found: u32 },
    #[error(
        "state format version {found} is not supported (this ferry reads {MIN_FORMAT_VERSION}..={FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("state payload length {len} exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge { len: u64 },
    #[error("state is truncated: header announces {expected} payload bytes, {got} present")]
    Truncated { expected: u64, got: u64 },
    #[error("state has {extra} trailing bytes after the payload")]
    Trailing { extra: u64 },
    #[error("state checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is damaged")]
    Checksum { stored: u32, computed: u32 },
    #[error("state payload could not be decoded")]
    Decode(#[source] serde_json::Error),
    #[error("state payload could not be encoded")]
    Encode(#[source] serde_json::Error),
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Envelope {
    /// A VM snapshot's state file (`ferry vmm restore`).
    Snapshot = 1,
    /// The vCPU and device state sent at a migration's switch-over.
    MigrationState = 2,
}

impl Envelope {
    /// Serialise `value` and wrap it.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, EnvelopeError> {
        let payload = serde_json::to_vec(value).map_err(EnvelopeError::Encode)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(self as u32).to_le_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Check the header and checksum of `bytes`, then decode the payload.
    /// Returns the decoded value and the format version it was written with.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<(T, u32), EnvelopeError> {
        if bytes.len() < HEADER_LEN {
            return Err(EnvelopeError::ShortHeader { got: bytes.len() });
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        if bytes[0..8] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        let kind = u32_at(8);
        if kind != self as u32 {
            return Err(EnvelopeError::WrongKind {
                expected: self as u32,
                found: kind,
            });
        }
        let version = u32_at(12);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(EnvelopeError::UnsupportedVersion { found: version });
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[16..24]);
        let len = u64::from_le_bytes(len_bytes);
        if len > MAX_PAYLOAD {
            return Err(EnvelopeError::TooLarge { len });
        }
        let got = (bytes.len() - HEADER_LEN) as u64;
        if got < len {
            return Err(EnvelopeError::Truncated { expected: len, got });
        }
        if got > len {
            return Err(EnvelopeError::Trailing { extra: got - len });
        }
        let payload = &bytes[HEADER_LEN..];
        let stored = u32_at(24);
        let computed = crc32fast::hash(payload);
        if stored != computed {
            return Err(EnvelopeError::Checksum { stored, computed });
        }
        let value = serde_json::from_slice(payload).map_err(EnvelopeError::Decode)?;
        Ok((value, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        Envelope::Snapshot
            .encode(&S {
                a: 7,
                b: vec![1, 2, 3],
            })
            .unwrap()
    }

    #[test]
    fn round_trip() {
        let (s, v): (S, u32) = Envelope::Snapshot.decode(&sample()).unwrap();
        assert_eq!(
            s,
            S {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
        assert_eq!(v, FORMAT_VERSION);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert!(
                Envelope::Snapshot.decode::<S>(&bytes[..n]).is_err(),
                "prefix {n} accepted"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = sample();
        for i in 0..bytes.len() {
            if (28..32).contains(&i) {
                continue; // reserved bytes are not interpreted
            }
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    Envelope::Snapshot.decode::<S>(&b).is_err(),
                    "flip at byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn wrong_kind_version_and_size() {
        let bytes = sample();
        assert!(matches!(
            Envelope::MigrationState.decode::<S>(&bytes),
            Err(EnvelopeError::WrongKind { .. })
        ));
        let mut b = bytes.clone();
        b[12..16].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Envelope::Snapshot.decode::<S>(&b),
            Err(EnvelopeError::UnsupportedVersion { found: 99 })
        ));
        let mut b = bytes.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Envelope::Snapshot.decode::<S>(&b),
            Err(EnvelopeError::TooLarge { .. })
        ));
        let mut b = bytes;
        b.push(0);
        assert!(matches!(
            Envelope::Snapshot.decode::<S>(&b),
            Err(EnvelopeError::Trailing { extra: 1 })
        ));
    }

    #[test]
    fn added_fields_are_tolerated() {
        #[derive(serde::Serialize)]
        struct Newer {
            a: u32,
            b: Vec<u8>,
            c: String,
        }
        let bytes = Envelope::Snapshot
            .encode(&Newer {
                a: 1,
                b: vec![],
                c: "x".into(),
            })
            .unwrap();
        let (s, _): (S, u32) = Envelope::Snapshot.decode(&bytes).unwrap();
        assert_eq!(s.a, 1);
    }
}
