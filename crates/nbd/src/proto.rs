//! The NBD wire format: constants and pure encoders/decoders, shared by the server and the
//! client. Nothing here does I/O; decoders take bytes, check every length against a cap
//! before trusting it, and return [`ProtoError`] instead of panicking.
//!
//! All integers are big-endian ("network byte order"), as the protocol says.

use std::fmt;
use std::io;

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle negotiation magic (not supported, recognised only to say so).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Transmission request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Largest option payload we accept (the spec bounds strings at 4096 bytes; options
/// carry at most a few of them).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE payload we accept or send, also advertised as the maximum block size.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest string (export name, error message, context name) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest structured reply chunk payload we accept (a full read chunk plus its offset).
pub const MAX_CHUNK_LEN: u32 = MAX_REQUEST + 8;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of a client option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

// Handshake flags (server, 16 bits).
/// Server supports fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client wants no 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational disk.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections to the export see one consistent cache.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
/// Choose an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export.
pub const OPT_INFO: u32 = 6;
/// Ask about an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers (not supported by ferry).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Accepted / end of a list.
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of export information.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Client must honour block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option payload too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (NBD_OPT_INFO / NBD_OPT_GO).
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Discard.
pub const CMD_TRIM: u16 = 4;
/// Prefetch.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ reply must not be fragmented.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail with ENOTSUP unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks error chunks.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// base:allocation flags.
/// Unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context ferry serves.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

/// An NBD error number, as sent on the wire (Linux values, which the spec adopts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted (read-only export, fenced writer).
    pub const EPERM: Errno = Errno(1);
    /// I/O error.
    pub const EIO: Errno = Errno(5);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Invalid argument (bad bounds, flags or command).
    pub const EINVAL: Errno = Errno(22);
    /// No space (write past the end).
    pub const ENOSPC: Errno = Errno(28);
    /// Too large for an unfragmented reply.
    pub const EOVERFLOW: Errno = Errno(75);
    /// Not supported (e.g. a zero that would not be fast).
    pub const ENOTSUP: Errno = Errno(95);
    /// Server shutting down.
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The NBD errno for an I/O error: its OS code where the protocol knows it, else EIO.
    pub fn from_io(e: &io::Error) -> Errno {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Errno::EPERM,
            Some(libc::ENOMEM) => Errno::ENOMEM,
            Some(libc::EINVAL) => Errno::EINVAL,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::ENOSPC,
            Some(libc::EOVERFLOW) => Errno::EOVERFLOW,
            Some(libc::ENOTSUP) => Errno::ENOTSUP,
            Some(libc::ESHUTDOWN) => Errno::ESHUTDOWN,
            _ => match e.kind() {
                io::ErrorKind::PermissionDenied => Errno::EPERM,
                io::ErrorKind::InvalidInput => Errno::EINVAL,
                io::ErrorKind::OutOfMemory => Errno::ENOMEM,
                io::ErrorKind::Unsupported => Errno::ENOTSUP,
                _ => Errno::EIO,
            },
        }
    }

    /// Short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        // The wire values are Linux errno values; u32 → i32 cannot overflow for the
        // values we produce, and anything else becomes EIO.
        io::Error::from_raw_os_error(i32::try_from(e.0).unwrap_or(libc::EIO))
    }
}

/// A malformed message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number did not match.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A length field is over our cap.
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// What arrived.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Fewer bytes than the message needs.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Bytes left over after a message that should have consumed them all.
    #[error("trailing bytes after {0}")]
    Trailing(&'static str),
    /// A string that is not UTF-8 or contains NUL.
    #[error("invalid string in {0}")]
    BadString(&'static str),
    /// A field with a value the message does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over received bytes that never reads past the end.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor over `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string of `len` bytes (checked against [`MAX_STRING`] before use).
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::TooLong {
                what: self.what,
                len: len as u64,
                max: MAX_STRING as u64,
            });
        }
        let b = self.take(len)?;
        parse_string(b, self.what)
    }

    /// A string prefixed by a 32-bit length.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fail unless everything was consumed.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing(self.what))
        }
    }
}

fn parse_string(b: &[u8], what: &'static str) -> Result<String, ProtoError> {
    if b.contains(&0) {
        return Err(ProtoError::BadString(what));
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString(what))
}

fn put_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}
/// A string with a 32-bit length prefix. Strings are bounded by [`MAX_STRING`] everywhere
/// we build them, so the length always fits.
fn put_string32(v: &mut Vec<u8>, s: &str) {
    put_u32(v, u32::try_from(s.len()).unwrap_or(u32::MAX));
    v.extend_from_slice(s.as_bytes());
}

/// Truncate `s` to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------
// Handshake

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Decode the server's greeting, returning its handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let mut c = Cursor::new(b, "greeting");
    let m = c.u64()?;
    if m != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "NBDMAGIC",
            got: m,
        });
    }
    let m = c.u64()?;
    if m == OLDSTYLE_MAGIC {
        return Err(ProtoError::Invalid("oldstyle negotiation (unsupported)"));
    }
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "IHAVEOPT",
            got: m,
        });
    }
    c.u16()
}

// ---------------------------------------------------------------------------------------
// Options

/// A client option header: `IHAVEOPT`, option, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Decode a client option header; fails on a wrong magic or a length over
/// [`MAX_OPTION_LEN`].
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(b, "option header");
    let m = c.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            got: m,
        });
    }
    let option = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            what: "option",
            len: len.into(),
            max: MAX_OPTION_LEN.into(),
        });
    }
    Ok(OptionHeader { option, len })
}

/// Encode a client option with its data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    put_u64(&mut v, IHAVEOPT);
    put_u32(&mut v, option);
    put_u32(&mut v, u32::try_from(data.len()).unwrap_or(u32::MAX));
    v.extend_from_slice(data);
    v
}

/// An option, decoded from its number and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info {
        /// Export.
        name: String,
        /// Requested information types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_GO`.
    Go {
        /// Export.
        name: String,
        /// Requested information types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext {
        /// Export.
        export: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext {
        /// Export.
        export: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// Anything else (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

fn no_data(data: &[u8], what: &'static str) -> Result<(), ProtoError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(ProtoError::Trailing(what))
    }
}

fn decode_info_request(data: &[u8], what: &'static str) -> Result<(String, Vec<u16>), ProtoError> {
    let mut c = Cursor::new(data, what);
    let name = c.string32()?;
    let n = c.u16()? as usize;
    // Each request is 2 bytes: checking against what is left bounds the allocation.
    if n * 2 != c.remaining() {
        return Err(ProtoError::Invalid("information request count"));
    }
    let mut requests = Vec::with_capacity(n);
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    Ok((name, requests))
}

fn decode_meta_request(
    data: &[u8],
    what: &'static str,
) -> Result<(String, Vec<String>), ProtoError> {
    let mut c = Cursor::new(data, what);
    let export = c.string32()?;
    let n = c.u32()? as usize;
    // Each query takes at least its 4-byte length.
    if n > c.remaining() / 4 {
        return Err(ProtoError::Invalid("query count"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string32()?);
    }
    c.finish()?;
    Ok((export, queries))
}

/// Decode an option's data. An error means the option is known but its data is malformed
/// (`NBD_REP_ERR_INVALID`).
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
    Ok(match option {
        OPT_EXPORT_NAME => {
            if data.len() > MAX_STRING {
                return Err(ProtoError::TooLong {
                    what: "export name",
                    len: data.len() as u64,
                    max: MAX_STRING as u64,
                });
            }
            ClientOption::ExportName(parse_string(data, "export name")?)
        }
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST => {
            no_data(data, "NBD_OPT_LIST")?;
            ClientOption::List
        }
        OPT_STARTTLS => {
            no_data(data, "NBD_OPT_STARTTLS")?;
            ClientOption::StartTls
        }
        OPT_INFO => {
            let (name, requests) = decode_info_request(data, "NBD_OPT_INFO")?;
            ClientOption::Info { name, requests }
        }
        OPT_GO => {
            let (name, requests) = decode_info_request(data, "NBD_OPT_GO")?;
            ClientOption::Go { name, requests }
        }
        OPT_STRUCTURED_REPLY => {
            no_data(data, "NBD_OPT_STRUCTURED_REPLY")?;
            ClientOption::StructuredReply
        }
        OPT_LIST_META_CONTEXT => {
            let (export, queries) = decode_meta_request(data, "NBD_OPT_LIST_META_CONTEXT")?;
            ClientOption::ListMetaContext { export, queries }
        }
        OPT_SET_META_CONTEXT => {
            let (export, queries) = decode_meta_request(data, "NBD_OPT_SET_META_CONTEXT")?;
            ClientOption::SetMetaContext { export, queries }
        }
        other => ClientOption::Unknown(other),
    })
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    put_string32(&mut v, name);
    put_u16(&mut v, u16::try_from(requests.len()).unwrap_or(0));
    for r in requests {
        put_u16(&mut v, *r);
    }
    v
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    put_string32(&mut v, export);
    put_u32(&mut v, u32::try_from(queries.len()).unwrap_or(0));
    for q in queries {
        put_string32(&mut v, q);
    }
    v
}

/// An option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// Length of the data that follows (at most [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Encode an option reply.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    put_u64(&mut v, OPTION_REPLY_MAGIC);
    put_u32(&mut v, option);
    put_u32(&mut v, reply);
    put_u32(&mut v, u32::try_from(data.len()).unwrap_or(u32::MAX));
    v.extend_from_slice(data);
    v
}

/// Decode an option reply header.
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let mut c = Cursor::new(b, "option reply");
    let m = c.u64()?;
    if m != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: m,
        });
    }
    let option = c.u32()?;
    let reply = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: len.into(),
            max: MAX_OPTION_LEN.into(),
        });
    }
    Ok(OptionReplyHeader { option, reply, len })
}

/// `NBD_REP_SERVER` data.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    put_string32(&mut v, name);
    v
}

/// `NBD_REP_META_CONTEXT` data.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    put_u32(&mut v, id);
    v.extend_from_slice(name.as_bytes());
    v
}

/// Decode `NBD_REP_META_CONTEXT` data into (id, name).
pub fn decode_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut c = Cursor::new(data, "NBD_REP_META_CONTEXT");
    let id = c.u32()?;
    let n = c.remaining();
    let name = c.string(n)?;
    Ok((id, name))
}

/// Decode `NBD_REP_SERVER` data: the export name (any trailing description is dropped).
pub fn decode_rep_server(data: &[u8]) -> Result<String, ProtoError> {
    let mut c = Cursor::new(data, "NBD_REP_SERVER");
    c.string32()
}

/// One `NBD_REP_INFO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// An information type we do not know.
    Unknown(u16),
}

/// Encode an `NBD_REP_INFO` payload.
pub fn encode_info(info: &Info) -> Vec<u8> {
    let mut v = Vec::new();
    match info {
        Info::Export { size, flags } => {
            put_u16(&mut v, INFO_EXPORT);
            put_u64(&mut v, *size);
            put_u16(&mut v, *flags);
        }
        Info::Name(n) => {
            put_u16(&mut v, INFO_NAME);
            v.extend_from_slice(clip(n, MAX_STRING).as_bytes());
        }
        Info::Description(d) => {
            put_u16(&mut v, INFO_DESCRIPTION);
            v.extend_from_slice(clip(d, MAX_STRING).as_bytes());
        }
        Info::BlockSize {
            min,
            preferred,
            max,
        } => {
            put_u16(&mut v, INFO_BLOCK_SIZE);
            put_u32(&mut v, *min);
            put_u32(&mut v, *preferred);
            put_u32(&mut v, *max);
        }
        Info::Unknown(t) => put_u16(&mut v, *t),
    }
    v
}

/// Decode an `NBD_REP_INFO` payload.
pub fn decode_info(data: &[u8]) -> Result<Info, ProtoError> {
    let mut c = Cursor::new(data, "NBD_REP_INFO");
    let t = c.u16()?;
    let info = match t {
        INFO_EXPORT => Info::Export {
            size: c.u64()?,
            flags: c.u16()?,
        },
        INFO_NAME => {
            let n = c.remaining();
            Info::Name(c.string(n)?)
        }
        INFO_DESCRIPTION => {
            let n = c.remaining();
            Info::Description(c.string(n)?)
        }
        INFO_BLOCK_SIZE => Info::BlockSize {
            min: c.u32()?,
            preferred: c.u32()?,
            max: c.u32()?,
        },
        other => {
            c.rest();
            Info::Unknown(other)
        }
    };
    c.finish()?;
    Ok(info)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless `no_zeroes`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    put_u64(&mut v, size);
    put_u16(&mut v, flags);
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

// ---------------------------------------------------------------------------------------
// Transmission

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// `CMD_FLAG_*`.
    pub flags: u16,
    /// `CMD_*`.
    pub command: u16,
    /// The client's handle ("cookie"), echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (for WRITE, the payload length that follows).
    pub len: u32,
}

/// Decode a request header. Only the magic is checked: command-specific checks (bounds,
/// flags, payload size) belong to the server, which answers them with an errno.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, ProtoError> {
    let mut c = Cursor::new(b, "request");
    let m = c.u32()?;
    if m != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            got: m.into(),
        });
    }
    Ok(RequestHeader {
        flags: c.u16()?,
        command: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        len: c.u32()?,
    })
}

/// Encode a request header.
pub fn encode_request(r: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// Encode a simple reply header (read data, if any, follows it).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length (at most [`MAX_CHUNK_LEN`]).
    pub len: u32,
}

/// A reply header as the client sees it: the first 4 bytes tell which kind follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: errno and cookie (16 bytes in all).
    Simple {
        /// Errno (0 = success).
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// A structured chunk (20 bytes in all).
    Chunk(ChunkHeader),
}

/// Decode the rest of a simple reply header (after its magic): 12 bytes.
pub fn decode_simple_reply_rest(b: &[u8; 12]) -> (u32, u64) {
    let mut e = [0u8; 4];
    e.copy_from_slice(&b[..4]);
    let mut h = [0u8; 8];
    h.copy_from_slice(&b[4..]);
    (u32::from_be_bytes(e), u64::from_be_bytes(h))
}

/// Decode the rest of a structured chunk header (after its magic): 16 bytes.
pub fn decode_chunk_rest(b: &[u8; 16]) -> Result<ChunkHeader, ProtoError> {
    let mut c = Cursor::new(b, "structured reply");
    let h = ChunkHeader {
        flags: c.u16()?,
        kind: c.u16()?,
        cookie: c.u64()?,
        len: c.u32()?,
    };
    if h.len > MAX_CHUNK_LEN {
        return Err(ProtoError::TooLong {
            what: "structured reply",
            len: h.len.into(),
            max: MAX_CHUNK_LEN.into(),
        });
    }
    Ok(h)
}

/// Decode a full reply header from the first bytes: `Ok(None)` if more bytes are needed
/// (a structured header is 20 bytes, a simple one 16).
pub fn decode_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtoError> {
    if b.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let Some(rest) = b.get(4..SIMPLE_REPLY_LEN) else {
                return Ok(None);
            };
            let mut a = [0u8; 12];
            a.copy_from_slice(rest);
            let (error, cookie) = decode_simple_reply_rest(&a);
            Ok(Some((
                ReplyHeader::Simple { error, cookie },
                SIMPLE_REPLY_LEN,
            )))
        }
        STRUCTURED_REPLY_MAGIC => {
            let Some(rest) = b.get(4..STRUCTURED_REPLY_LEN) else {
                return Ok(None);
            };
            let mut a = [0u8; 16];
            a.copy_from_slice(rest);
            Ok(Some((
                ReplyHeader::Chunk(decode_chunk_rest(&a)?),
                STRUCTURED_REPLY_LEN,
            )))
        }
        other => Err(ProtoError::BadMagic {
            what: "reply",
            got: other.into(),
        }),
    }
}

/// Encode a structured chunk header.
pub fn encode_chunk_header(h: &ChunkHeader) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..20].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// A whole structured chunk (header and payload) of `kind` with `payload`.
pub fn encode_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        flags,
        kind,
        cookie,
        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
    };
    let mut v = Vec::with_capacity(STRUCTURED_REPLY_LEN + payload.len());
    v.extend_from_slice(&encode_chunk_header(&h));
    v.extend_from_slice(payload);
    v
}

/// An `NBD_REPLY_TYPE_ERROR` chunk, final, with a message (clipped to fit).
pub fn encode_error_chunk(cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
    let msg = clip(message, MAX_STRING);
    let mut p = Vec::with_capacity(6 + msg.len());
    put_u32(&mut p, errno.0);
    put_u16(&mut p, u16::try_from(msg.len()).unwrap_or(0));
    p.extend_from_slice(msg.as_bytes());
    encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &p)
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk payload.
pub fn encode_block_status_payload(context: u32, extents: &[Extent]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 8 * extents.len());
    put_u32(&mut p, context);
    for e in extents {
        put_u32(&mut p, e.len);
        put_u32(&mut p, e.flags);
    }
    p
}

/// One block status extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub len: u32,
    /// `STATE_*` flags.
    pub flags: u32,
}

/// A decoded structured chunk payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Export offset of `data`.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Export offset.
        offset: u64,
        /// Length of zeroes.
        len: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// Extents.
        extents: Vec<Extent>,
    },
    /// An error chunk (`NBD_REPLY_TYPE_ERROR`, `_ERROR_OFFSET` or unknown with bit 15).
    Error {
        /// Errno.
        errno: Errno,
        /// Message.
        message: String,
        /// Offset, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

/// Decode a structured chunk payload of `kind`. Unknown non-error types are an error (the
/// client must hard-disconnect); unknown error types decode as [`Chunk::Error`].
pub fn decode_chunk(kind: u16, payload: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    let mut c = Cursor::new(payload, "structured reply chunk");
    let chunk = match kind {
        REPLY_TYPE_NONE => Chunk::None,
        REPLY_TYPE_OFFSET_DATA => {
            let offset = c.u64()?;
            let data = c.rest();
            if data.is_empty() {
                return Err(ProtoError::Invalid("empty OFFSET_DATA chunk"));
            }
            Chunk::OffsetData { offset, data }
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let offset = c.u64()?;
            let len = c.u32()?;
            if len == 0 {
                return Err(ProtoError::Invalid("empty OFFSET_HOLE chunk"));
            }
            Chunk::OffsetHole { offset, len }
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let context = c.u32()?;
            let rest = c.rest();
            if rest.is_empty() || !rest.len().is_multiple_of(8) {
                return Err(ProtoError::Invalid("BLOCK_STATUS chunk length"));
            }
            let mut d = Cursor::new(rest, "BLOCK_STATUS chunk");
            let mut extents = Vec::with_capacity(rest.len() / 8);
            while d.remaining() > 0 {
                let len = d.u32()?;
                let flags = d.u32()?;
                if len == 0 {
                    return Err(ProtoError::Invalid("zero-length extent"));
                }
                extents.push(Extent { len, flags });
            }
            Chunk::BlockStatus { context, extents }
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            let errno = Errno(c.u32()?);
            let mlen = c.u16()? as usize;
            let message = c.string(mlen)?;
            let offset = if k == REPLY_TYPE_ERROR_OFFSET {
                Some(c.u64()?)
            } else {
                c.rest();
                None
            };
            Chunk::Error {
                errno,
                message,
                offset,
            }
        }
        _ => return Err(ProtoError::Invalid("structured reply type")),
    };
    c.finish()?;
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0xdead_beef_0011_2233,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(decode_request(&encode_request(&r)).unwrap(), r);
        let mut b = encode_request(&r);
        b[0] ^= 1;
        assert!(matches!(
            decode_request(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_header_caps_length() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::TooLong { .. })
        ));
        b[12..].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 7
            }
        );
    }

    #[test]
    fn options_roundtrip() {
        let d = encode_info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            decode_option(OPT_GO, &d).unwrap(),
            ClientOption::Go {
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        let d = encode_meta_request("disk", &["base:allocation", "qemu:dirty"]);
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &d).unwrap(),
            ClientOption::SetMetaContext {
                export: "disk".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty".into()]
            }
        );
        // A huge query count with no bytes behind it is refused, not allocated.
        let mut d = encode_meta_request("disk", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_option(OPT_SET_META_CONTEXT, &d).is_err());
        assert!(decode_option(OPT_LIST, b"x").is_err());
        assert!(decode_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert_eq!(decode_option(99, b"zz").unwrap(), ClientOption::Unknown(99));
    }

    #[test]
    fn info_roundtrip() {
        for i in [
            Info::Export {
                size: 1 << 33,
                flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            },
            Info::Name("n".into()),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_REQUEST,
            },
        ] {
            assert_eq!(decode_info(&encode_info(&i)).unwrap(), i);
        }
    }

    #[test]
    fn chunks_roundtrip() {
        let e = encode_error_chunk(7, Errno::EPERM, "fenced");
        let (h, n) = decode_reply_header(&e).unwrap().unwrap();
        let ReplyHeader::Chunk(h) = h else {
            panic!("not a chunk")
        };
        assert_eq!(h.cookie, 7);
        assert_eq!(h.flags, REPLY_FLAG_DONE);
        assert_eq!(
            decode_chunk(h.kind, &e[n..]).unwrap(),
            Chunk::Error {
                errno: Errno::EPERM,
                message: "fenced".into(),
                offset: None
            }
        );
        let ex = [
            Extent { len: 512, flags: 0 },
            Extent {
                len: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let p = encode_block_status_payload(1, &ex);
        assert_eq!(
            decode_chunk(REPLY_TYPE_BLOCK_STATUS, &p).unwrap(),
            Chunk::BlockStatus {
                context: 1,
                extents: ex.to_vec()
            }
        );
        assert!(decode_chunk(REPLY_TYPE_BLOCK_STATUS, &p[..7]).is_err());
        assert!(decode_chunk(77, &[]).is_err());
    }

    /// xorshift64*: a dependency-free generator for the decoder fuzz loop.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Random bytes (and random mutations of valid messages) never make a decoder panic.
    #[test]
    fn decoders_survive_random_input() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds: Vec<Vec<u8>> = vec![
            encode_info_request("disk", &[INFO_BLOCK_SIZE]),
            encode_meta_request("disk", &["base:allocation"]),
            encode_info(&Info::Export { size: 5, flags: 1 }),
            encode_error_chunk(1, Errno::EIO, "x"),
            encode_block_status_payload(1, &[Extent { len: 1, flags: 3 }]),
        ];
        for i in 0..100_000u32 {
            let n = (r.next() % 64) as usize;
            let mut b = if i % 2 == 0 {
                r.bytes(n)
            } else {
                let mut s = seeds[(r.next() % seeds.len() as u64) as usize].clone();
                for _ in 0..1 + r.next() % 4 {
                    if !s.is_empty() {
                        let at = (r.next() % s.len() as u64) as usize;
                        s[at] = r.next() as u8;
                    }
                }
                s.truncate((r.next() % (s.len() as u64 + 1)) as usize);
                s
            };
            let opt = (r.next() % 14) as u32;
            let _ = decode_option(opt, &b);
            let _ = decode_info(&b);
            let _ = decode_rep_meta_context(&b);
            let _ = decode_rep_server(&b);
            let kind = match r.next() % 6 {
                0 => REPLY_TYPE_NONE,
                1 => REPLY_TYPE_OFFSET_DATA,
                2 => REPLY_TYPE_OFFSET_HOLE,
                3 => REPLY_TYPE_BLOCK_STATUS,
                4 => REPLY_TYPE_ERROR,
                _ => REPLY_TYPE_ERROR_OFFSET,
            };
            let _ = decode_chunk(kind, &b);
            let _ = decode_reply_header(&b);
            b.resize(28, 0);
            if i % 3 == 0 {
                b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let mut h = [0u8; REQUEST_LEN];
            h.copy_from_slice(&b[..REQUEST_LEN]);
            let _ = decode_request(&h);
            let mut o = [0u8; OPTION_HEADER_LEN];
            o.copy_from_slice(&b[..OPTION_HEADER_LEN]);
            if i % 3 == 1 {
                o[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            }
            if let Ok(h) = decode_option_header(&o) {
                assert!(h.len <= MAX_OPTION_LEN);
            }
            let mut g = [0u8; 18];
            g.copy_from_slice(&b[..18]);
            let _ = decode_greeting(&g);
            let mut q = [0u8; OPTION_REPLY_HEADER_LEN];
            q.copy_from_slice(&b[..OPTION_REPLY_HEADER_LEN]);
            let _ = decode_option_reply_header(&q);
        }
    }
}
