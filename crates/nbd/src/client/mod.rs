//! A blocking NBD client for threaded callers (the VMM is not async).
//!
//! [`Client::connect`] negotiates fixed newstyle, optionally STARTTLS, structured replies,
//! `base:allocation` and `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` on old
//! servers). Then requests are pipelined: [`Client::submit`] / [`Client::submit_with`] send a
//! [`Request`] and return at once; one reader thread matches replies to cookies and completes
//! them (a [`Ticket`] to wait on, or a callback run on the reader thread). The synchronous
//! wrappers ([`Client::read`], [`Client::write`], ...) are built on the same pair and split
//! large transfers into pipelined requests of at most the server's maximum block size.
//!
//! With TLS, the rustls session sits behind a mutex that is never held across socket I/O:
//! the writer encrypts under the lock and sends after releasing it; the reader receives
//! without the lock and decrypts under it. So a writer blocked on a full socket never keeps
//! the reader from draining replies (which would deadlock against a server that stops
//! reading until its replies are taken).
//!
//! Reconnection is the caller's business: [`Request`] is `Clone` so it can be resent.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::ServerName;
use thiserror::Error;
use tracing::debug;

use crate::proto::*;

mod uri;
mod wire;

pub use uri::{parse_uri, NbdUri};
use wire::{lock, NegStream, WireReader, WireWriter};

/// TLS settings of a client.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// rustls configuration (roots, client certificate).
    pub config: Arc<rustls::ClientConfig>,
    /// The name to verify the server's certificate against.
    pub server_name: ServerName<'static>,
}

/// Why a connection could not be set up.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket error.
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    /// TLS error.
    #[error("TLS failed")]
    Tls(#[from] rustls::Error),
    /// The server sent something malformed.
    #[error("protocol violation")]
    Proto(#[from] ProtoError),
    /// The server sent something well-formed but out of place.
    #[error("unexpected server behaviour: {0}")]
    Unexpected(String),
    /// The server requires TLS and we have no TLS configuration.
    #[error("server requires TLS (NBD_REP_ERR_TLS_REQD): {0}")]
    TlsRequired(String),
    /// The server would not start TLS.
    #[error("server refused STARTTLS ({code:#x}): {message}")]
    StartTlsRefused {
        /// Reply code.
        code: u32,
        /// Server's message.
        message: String,
    },
    /// The export does not exist.
    #[error("unknown export: {0}")]
    UnknownExport(String),
    /// An option was refused.
    #[error("server refused option {option} ({code:#x}): {message}")]
    Refused {
        /// The option.
        option: u32,
        /// `REP_ERR_*`.
        code: u32,
        /// Server's message.
        message: String,
    },
    /// A malformed `nbd://` URI.
    #[error("invalid NBD URI {uri:?}: {why}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `nbds://` without a TLS configuration.
    #[error("nbds:// requires a TLS configuration")]
    TlsConfigMissing,
}

/// Why one request failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The server answered with an error.
    #[error("server error {errno}: {message}")]
    Server {
        /// The errno.
        errno: Errno,
        /// Its message (structured replies only; empty otherwise).
        message: String,
    },
    /// The connection is gone (or broke before the reply came).
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    /// The export does not offer this (per its transmission flags).
    #[error("not supported by the export: {0}")]
    Unsupported(&'static str),
    /// The request cannot be sent as asked (zero or oversize length).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

impl RequestError {
    /// The server's errno, if the server refused the request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RequestError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One NBD command. Cloneable so a caller can resend it after reconnecting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length (at most [`ExportInfo::max_block`]).
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Data (at most [`ExportInfo::max_block`] bytes).
        data: Arc<[u8]>,
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Keep the range allocated.
        no_hole: bool,
        /// Fail with ENOTSUP unless fast.
        fast: bool,
        /// Force unit access.
        fua: bool,
    },
    /// `base:allocation` status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// One extent is enough.
        req_one: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The command succeeded (no data).
    Done,
    /// Data of a READ.
    Data(Vec<u8>),
    /// Extents of a BLOCK_STATUS (for `base:allocation`).
    Extents(Vec<Extent>),
}

/// The outcome of one request.
pub type Completion = Result<Reply, RequestError>;
/// A request's identifier on the wire (the NBD handle).
pub type Cookie = u64;
/// Called once, on the reader thread, when a request completes.
pub type Callback = Box<dyn FnOnce(Cookie, Completion) + Send>;

/// A submitted request to wait for.
#[derive(Debug)]
pub struct Ticket {
    /// The request's cookie.
    pub cookie: Cookie,
    rx: mpsc::Receiver<Completion>,
}

impl Ticket {
    /// Wait at most `timeout` for the request; `None` if it has not completed by then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Completion> {
        match self.rx.recv_timeout(timeout) {
            Ok(c) => Some(c),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(RequestError::Disconnected(
                "reply channel closed".into(),
            ))),
        }
    }

    /// Block until the request completes.
    pub fn wait(self) -> Completion {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(RequestError::Disconnected("reply channel closed".into())))
    }
}

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The `base:allocation` context id, if negotiated.
    pub base_allocation: Option<u32>,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload the client will send.
    pub max_block: u32,
}

// ---------------------------------------------------------------------------------------
// Negotiation

fn read_option_reply(s: &mut NegStream, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h)?;
    let h = decode_option_reply_header(&h)?;
    if h.option != option {
        return Err(ClientError::Unexpected(format!(
            "reply to option {} while waiting for {option}",
            h.option
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data)?;
    Ok((h.reply, data))
}

fn message(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]).into_owned()
}

/// An error reply as a [`ClientError`].
fn refused(option: u32, code: u32, data: &[u8]) -> ClientError {
    let message = message(data);
    match code {
        REP_ERR_TLS_REQD => ClientError::TlsRequired(message),
        REP_ERR_UNKNOWN => ClientError::UnknownExport(message),
        _ => ClientError::Refused {
            option,
            code,
            message,
        },
    }
}

fn send_option(s: &mut NegStream, option: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&encode_option(option, data))?;
    s.flush()
}

struct Negotiated {
    stream: NegStream,
    info: ExportInfo,
}

fn negotiate(
    sock: TcpStream,
    export: &str,
    tls: Option<ClientTls>,
) -> Result<Negotiated, ClientError> {
    let mut s = NegStream::Plain(sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    let hflags = decode_greeting(&g)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Unexpected(
            "server does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;

    if let Some(tls) = tls {
        send_option(&mut s, OPT_STARTTLS, &[])?;
        let (code, data) = read_option_reply(&mut s, OPT_STARTTLS)?;
        if code != REP_ACK {
            return Err(ClientError::StartTlsRefused {
                code,
                message: message(&data),
            });
        }
        let NegStream::Plain(mut sock) = s else {
            return Err(ClientError::Unexpected("TLS started twice".into()));
        };
        let mut conn = rustls::ClientConnection::new(tls.config, tls.server_name)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        s = NegStream::Tls(Box::new(conn), sock);
    }

    send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
    let (code, data) = read_option_reply(&mut s, OPT_STRUCTURED_REPLY)?;
    let structured = match code {
        REP_ACK => true,
        REP_ERR_TLS_REQD => return Err(refused(OPT_STRUCTURED_REPLY, code, &data)),
        c if c & REP_FLAG_ERROR != 0 => false,
        c => {
            return Err(ClientError::Unexpected(format!(
                "reply {c} to NBD_OPT_STRUCTURED_REPLY"
            )))
        }
    };

    let mut base_allocation = None;
    if structured {
        let q = encode_meta_request(export, &[META_BASE_ALLOCATION]);
        send_option(&mut s, OPT_SET_META_CONTEXT, &q)?;
        loop {
            let (code, data) = read_option_reply(&mut s, OPT_SET_META_CONTEXT)?;
            match code {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    let (id, name) = decode_rep_meta_context(&data)?;
                    if name == META_BASE_ALLOCATION {
                        base_allocation = Some(id);
                    }
                }
                REP_ERR_TLS_REQD => return Err(refused(OPT_SET_META_CONTEXT, code, &data)),
                c if c & REP_FLAG_ERROR != 0 => break,
                c => {
                    return Err(ClientError::Unexpected(format!(
                        "reply {c} to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }

    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        structured,
        base_allocation,
        min_block: 1,
        preferred_block: PREFERRED,
        max_block: DEFAULT_MAX_BLOCK,
    };
    send_option(
        &mut s,
        OPT_GO,
        &encode_info_request(export, &[INFO_BLOCK_SIZE]),
    )?;
    let mut got_export = false;
    loop {
        let (code, data) = read_option_reply(&mut s, OPT_GO)?;
        match code {
            REP_ACK => break,
            REP_INFO => match decode_info(&data)? {
                Info::Export { size, flags } => {
                    info.size = size;
                    info.flags = flags;
                    got_export = true;
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    info.min_block = min.max(1);
                    info.preferred_block = preferred;
                    info.max_block = max.clamp(1, MAX_REQUEST);
                }
                _ => {}
            },
            REP_ERR_UNSUP => {
                // A server without NBD_OPT_GO: the old way, which cannot report errors.
                send_option(&mut s, OPT_EXPORT_NAME, export.as_bytes())?;
                let mut b = [0u8; 10];
                s.read_exact(&mut b)?;
                let mut c = Cursor::new(&b, "NBD_OPT_EXPORT_NAME reply");
                info.size = c.u64()?;
                info.flags = c.u16()?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z)?;
                }
                got_export = true;
                break;
            }
            c if c & REP_FLAG_ERROR != 0 => return Err(refused(OPT_GO, c, &data)),
            c => return Err(ClientError::Unexpected(format!("reply {c} to NBD_OPT_GO"))),
        }
    }
    if !got_export {
        return Err(ClientError::Unexpected(
            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
        ));
    }
    if info.flags & FLAG_HAS_FLAGS == 0 {
        info.flags = FLAG_HAS_FLAGS;
    }
    Ok(Negotiated { stream: s, info })
}

const PREFERRED: u32 = 4096;
/// Payload limit when the server states none (the spec's safe default).
const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------------------
// The client

/// What a pending request expects.
#[derive(Clone, Copy)]
enum Expect {
    Read { offset: u64, len: u32 },
    BlockStatus,
    Other,
}

struct Entry {
    expect: Expect,
    done: Callback,
}

#[derive(Default)]
struct Pending {
    map: HashMap<Cookie, Entry>,
    /// Set once the connection is dead: the reason.
    closed: Option<String>,
}

struct Shared {
    writer: Mutex<WireWriter>,
    pending: Mutex<Pending>,
    next_cookie: AtomicU64,
    /// For shutting the socket down from any thread.
    sock: TcpStream,
    info: ExportInfo,
}

/// A connection to one export. `Sync`: any number of threads may submit at once.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    reader_done: Mutex<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

/// A request's wire form: header and borrowed payload.
struct Wire<'a> {
    header: RequestHeader,
    payload: &'a [u8],
    expect: Expect,
}

impl Client {
    /// Connect to `addr` and open `export`, with TLS if `tls` is given.
    pub fn connect(
        addr: impl ToSocketAddrs,
        export: &str,
        tls: Option<ClientTls>,
    ) -> Result<Client, ClientError> {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let n = negotiate(sock, export, tls)?;
        Client::start(n)
    }

    /// Open `export` over a connected socket; the handshake must finish within `timeout`.
    pub fn connect_stream(
        sock: TcpStream,
        export: &str,
        tls: Option<ClientTls>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let same = sock.try_clone()?;
        let n = negotiate(sock, export, tls)?;
        same.set_read_timeout(None)?;
        same.set_write_timeout(None)?;
        Client::start(n)
    }

    /// Fail a send that cannot go on for `t` (the peer stopped reading: a cut link, a server
    /// that hangs) instead of blocking until TCP gives up, minutes later. `None`: block.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.shared.sock.set_write_timeout(t)
    }

    /// Break the connection now: every request in flight fails as disconnected, and dropping
    /// the client afterwards does not wait for the server.
    pub fn abort(&self) {
        let _ = self.shared.sock.shutdown(Shutdown::Both);
    }

    /// Connect to an `nbd://` / `nbds://` URI. `tls` is required for `nbds://` and used
    /// whenever given; the server's certificate is checked against the URI's host.
    pub fn connect_uri(
        uri: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let u = parse_uri(uri)?;
        let tls = match tls {
            Some(config) => {
                let server_name =
                    ServerName::try_from(u.host.clone()).map_err(|_| ClientError::Uri {
                        uri: uri.to_string(),
                        why: "host is not a valid TLS server name",
                    })?;
                Some(ClientTls {
                    config,
                    server_name,
                })
            }
            None if u.tls => return Err(ClientError::TlsConfigMissing),
            None => None,
        };
        Client::connect(u.addr(), &u.export, tls)
    }

    fn start(n: Negotiated) -> Result<Client, ClientError> {
        let (reader, writer, sock) = match n.stream {
            NegStream::Plain(s) => (
                WireReader::Plain(s.try_clone()?),
                WireWriter::Plain(s.try_clone()?),
                s,
            ),
            NegStream::Tls(conn, s) => {
                let conn = Arc::new(Mutex::new(*conn));
                (
                    WireReader::Tls {
                        conn: conn.clone(),
                        sock: s.try_clone()?,
                        raw: vec![0u8; 64 * 1024],
                        start: 0,
                        end: 0,
                    },
                    WireWriter::Tls(conn, s.try_clone()?),
                    s,
                )
            }
        };
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            next_cookie: AtomicU64::new(1),
            sock,
            info: n.info,
        });
        let (done_tx, reader_done) = mpsc::channel();
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-client-rx".into())
            .spawn(move || {
                let why = match receive(&s, reader) {
                    Ok(()) => "server closed the connection".to_string(),
                    Err(e) => e,
                };
                debug!(reason = %why, "nbd client reader stopped");
                fail_all(&s, &why);
                let _ = s.sock.shutdown(Shutdown::Both);
                let _ = done_tx.send(());
            })?;
        Ok(Client {
            shared,
            reader: Some(reader),
            reader_done: Mutex::new(reader_done),
        })
    }

    /// The export's size, flags and limits.
    pub fn info(&self) -> ExportInfo {
        self.shared.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.info.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.shared.info.flags
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags() & FLAG_READ_ONLY != 0
    }

    fn wire<'a>(&self, req: &'a Request) -> Result<Wire<'a>, RequestError> {
        let info = &self.shared.info;
        let has = |f: u16| info.flags & f != 0;
        let fua_flag = |fua: bool| -> Result<u16, RequestError> {
            match (fua, has(FLAG_SEND_FUA)) {
                (false, _) => Ok(0),
                (true, true) => Ok(CMD_FLAG_FUA),
                (true, false) => Err(RequestError::Unsupported("FUA")),
            }
        };
        let check_len = |len: usize, max: u32| -> Result<u32, RequestError> {
            if len == 0 {
                return Err(RequestError::Invalid("zero length"));
            }
            u32::try_from(len)
                .ok()
                .filter(|l| *l <= max)
                .ok_or(RequestError::Invalid("length over the maximum block size"))
        };
        let h = |command, flags, offset, len| RequestHeader {
            flags,
            command,
            cookie: 0,
            offset,
            len,
        };
        Ok(match req {
            Request::Read { offset, len } => Wire {
                header: h(
                    CMD_READ,
                    0,
                    *offset,
                    check_len(*len as usize, info.max_block)?,
                ),
                payload: &[],
                expect: Expect::Read {
                    offset: *offset,
                    len: *len,
                },
            },
            Request::Write { offset, data, fua } => Wire {
                header: h(
                    CMD_WRITE,
                    fua_flag(*fua)?,
                    *offset,
                    check_len(data.len(), info.max_block)?,
                ),
                payload: data,
                expect: Expect::Other,
            },
            Request::Flush => {
                if !has(FLAG_SEND_FLUSH) {
                    return Err(RequestError::Unsupported("FLUSH"));
                }
                Wire {
                    header: h(CMD_FLUSH, 0, 0, 0),
                    payload: &[],
                    expect: Expect::Other,
                }
            }
            Request::Trim { offset, len, fua } => {
                if !has(FLAG_SEND_TRIM) {
                    return Err(RequestError::Unsupported("TRIM"));
                }
                Wire {
                    header: h(
                        CMD_TRIM,
                        fua_flag(*fua)?,
                        *offset,
                        check_len(*len as usize, u32::MAX)?,
                    ),
                    payload: &[],
                    expect: Expect::Other,
                }
            }
            Request::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            } => {
                if !has(FLAG_SEND_WRITE_ZEROES) {
                    return Err(RequestError::Unsupported("WRITE_ZEROES"));
                }
                let mut flags = fua_flag(*fua)?;
                if *no_hole {
                    flags |= CMD_FLAG_NO_HOLE;
                }
                if *fast {
                    if !has(FLAG_SEND_FAST_ZERO) {
                        return Err(RequestError::Unsupported("FAST_ZERO"));
                    }
                    flags |= CMD_FLAG_FAST_ZERO;
                }
                Wire {
                    header: h(
                        CMD_WRITE_ZEROES,
                        flags,
                        *offset,
                        check_len(*len as usize, u32::MAX)?,
                    ),
                    payload: &[],
                    expect: Expect::Other,
                }
            }
            Request::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                if info.base_allocation.is_none() {
                    return Err(RequestError::Unsupported("BLOCK_STATUS (base:allocation)"));
                }
                let flags = if *req_one { CMD_FLAG_REQ_ONE } else { 0 };
                Wire {
                    header: h(
                        CMD_BLOCK_STATUS,
                        flags,
                        *offset,
                        check_len(*len as usize, u32::MAX)?,
                    ),
                    payload: &[],
                    expect: Expect::BlockStatus,
                }
            }
            Request::Cache { offset, len } => {
                if !has(FLAG_SEND_CACHE) {
                    return Err(RequestError::Unsupported("CACHE"));
                }
                Wire {
                    header: h(CMD_CACHE, 0, *offset, check_len(*len as usize, u32::MAX)?),
                    payload: &[],
                    expect: Expect::Other,
                }
            }
        })
    }

    /// Register `w` and send it. `Err` means `done` was not (and will not be) called.
    fn send(&self, mut w: Wire<'_>, done: Callback) -> Result<Cookie, RequestError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        w.header.cookie = cookie;
        {
            let mut p = lock(&self.shared.pending);
            if let Some(why) = &p.closed {
                return Err(RequestError::Disconnected(why.clone()));
            }
            p.map.insert(
                cookie,
                Entry {
                    expect: w.expect,
                    done,
                },
            );
        }
        let hdr = encode_request(&w.header);
        let sent = lock(&self.shared.writer).send(&[&hdr, w.payload]);
        if let Err(e) = sent {
            // A half-sent request leaves the stream unusable: kill it. The reader then fails
            // everything still pending, unless we take ours back first.
            let _ = self.shared.sock.shutdown(Shutdown::Both);
            let mine = lock(&self.shared.pending).map.remove(&cookie);
            if mine.is_some() {
                return Err(RequestError::Disconnected(e.to_string()));
            }
        }
        Ok(cookie)
    }

    /// Send `req`; `done` runs on the reader thread when it completes (keep it short).
    pub fn submit_with(&self, req: &Request, done: Callback) -> Result<Cookie, RequestError> {
        let w = self.wire(req)?;
        self.send(w, done)
    }

    /// Send `req` and return a ticket to wait on.
    pub fn submit(&self, req: &Request) -> Result<Ticket, RequestError> {
        let w = self.wire(req)?;
        self.ticket(w)
    }

    /// Send every request of `reqs` in one write (one TLS flight, one syscall where they fit);
    /// `done(i)` makes the callback that runs on the reader thread when request `i` completes
    /// (asked once per request, in order). `Err` for a request means its callback was not (and
    /// will not be) called.
    pub fn submit_all_with(
        &self,
        reqs: &[Request],
        mut done: impl FnMut(usize) -> Callback,
    ) -> Vec<Result<Cookie, RequestError>> {
        let mut out: Vec<Result<Cookie, RequestError>> = Vec::with_capacity(reqs.len());
        let mut wires: Vec<(usize, Wire<'_>, Callback)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let cb = done(i);
            match self.wire(r) {
                Ok(mut w) => {
                    w.header.cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
                    out.push(Ok(w.header.cookie));
                    wires.push((i, w, cb));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        let hdrs: Vec<[u8; REQUEST_LEN]> = wires
            .iter()
            .map(|(_, w, _)| encode_request(&w.header))
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(wires.len() * 2);
        for (k, (_, w, _)) in wires.iter().enumerate() {
            parts.push(&hdrs[k]);
            if !w.payload.is_empty() {
                parts.push(w.payload);
            }
        }
        let cookies: Vec<(usize, Cookie)> = wires
            .iter()
            .map(|(i, w, _)| (*i, w.header.cookie))
            .collect();
        {
            let mut p = lock(&self.shared.pending);
            if let Some(why) = p.closed.clone() {
                for (i, _) in &cookies {
                    out[*i] = Err(RequestError::Disconnected(why.clone()));
                }
                return out;
            }
            for (_, w, cb) in wires {
                p.map.insert(
                    w.header.cookie,
                    Entry {
                        expect: w.expect,
                        done: cb,
                    },
                );
            }
        }
        if let Err(e) = lock(&self.shared.writer).send(&parts) {
            let _ = self.shared.sock.shutdown(Shutdown::Both);
            let mut p = lock(&self.shared.pending);
            for (i, cookie) in &cookies {
                if p.map.remove(cookie).is_some() {
                    out[*i] = Err(RequestError::Disconnected(e.to_string()));
                }
            }
        }
        out
    }

    fn ticket(&self, w: Wire<'_>) -> Result<Ticket, RequestError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let cookie = self.send(
            w,
            Box::new(move |_, c| {
                let _ = tx.send(c);
            }),
        )?;
        Ok(Ticket { cookie, rx })
    }

    fn max_block(&self) -> usize {
        self.shared.info.max_block as usize
    }

    /// Read `buf.len()` bytes at `offset` (split into pipelined requests as needed).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut tickets = Vec::new();
        for (i, chunk) in buf.chunks(self.max_block()).enumerate() {
            let off = offset + (i * self.max_block()) as u64;
            tickets.push(self.submit(&Request::Read {
                offset: off,
                len: chunk.len() as u32,
            })?);
        }
        let mut first_err = None;
        for (t, chunk) in tickets.into_iter().zip(buf.chunks_mut(self.max_block())) {
            match t.wait() {
                Ok(Reply::Data(d)) if d.len() == chunk.len() => chunk.copy_from_slice(&d),
                Ok(_) => {
                    first_err.get_or_insert(RequestError::Disconnected("bad read reply".into()));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Write `data` at `offset` (split into pipelined requests as needed; no copy).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), RequestError> {
        let flags = if !fua {
            0
        } else if self.flags() & FLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            return Err(RequestError::Unsupported("FUA"));
        };
        let mut tickets = Vec::new();
        let mut first_err = None;
        for (i, chunk) in data.chunks(self.max_block()).enumerate() {
            let w = Wire {
                header: RequestHeader {
                    flags,
                    command: CMD_WRITE,
                    cookie: 0,
                    offset: offset + (i * self.max_block()) as u64,
                    len: chunk.len() as u32,
                },
                payload: chunk,
                expect: Expect::Other,
            };
            match self.ticket(w) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        for t in tickets {
            if let Err(e) = t.wait() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn run(&self, req: &Request) -> Result<Reply, RequestError> {
        self.submit(req)?.wait()
    }

    /// Flush.
    pub fn flush(&self) -> Result<(), RequestError> {
        self.run(&Request::Flush).map(|_| ())
    }

    fn ranged(
        &self,
        offset: u64,
        len: u64,
        make: impl Fn(u64, u32) -> Request,
    ) -> Result<(), RequestError> {
        // Large ranges go in 1 GiB steps (well within u32 and every server's patience).
        const STEP: u64 = 1 << 30;
        let mut tickets = Vec::new();
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let n = (end - pos).min(STEP);
            tickets.push(self.submit(&make(pos, n as u32))?);
            pos += n;
        }
        let mut first_err = None;
        for t in tickets {
            if let Err(e) = t.wait() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Discard `len` bytes at `offset`.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), RequestError> {
        self.ranged(offset, len, |offset, len| Request::Trim {
            offset,
            len,
            fua: false,
        })
    }

    /// Make `len` bytes at `offset` read as zeroes (`no_hole`: keep them allocated).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), RequestError> {
        self.ranged(offset, len, |offset, len| Request::WriteZeroes {
            offset,
            len,
            no_hole,
            fast: false,
            fua: false,
        })
    }

    /// `base:allocation` extents from `offset`, covering at most `len` bytes (servers may
    /// answer for less; ask again from where it stopped).
    pub fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, RequestError> {
        match self.run(&Request::BlockStatus {
            offset,
            len,
            req_one: false,
        })? {
            Reply::Extents(e) => Ok(e),
            _ => Err(RequestError::Disconnected("bad block status reply".into())),
        }
    }

    /// Soft disconnect: send `NBD_CMD_DISC`, let the server finish what is in flight, close.
    /// Dropping the client does the same.
    pub fn disconnect(mut self) {
        self.close();
    }

    fn close(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        {
            let disc = encode_request(&RequestHeader {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            });
            let mut w = lock(&self.shared.writer);
            if w.send(&[&disc]).is_ok() {
                w.close_notify();
            }
        }
        let _ = self.shared.sock.shutdown(Shutdown::Write);
        // The server closes once in-flight requests are answered; do not wait forever.
        if lock(&self.reader_done)
            .recv_timeout(Duration::from_secs(5))
            .is_err()
        {
            let _ = self.shared.sock.shutdown(Shutdown::Both);
        }
        let _ = reader.join();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

fn fail_all(s: &Shared, why: &str) {
    let entries: Vec<(Cookie, Entry)> = {
        let mut p = lock(&s.pending);
        p.closed.get_or_insert_with(|| why.to_string());
        p.map.drain().collect()
    };
    for (cookie, e) in entries {
        (e.done)(cookie, Err(RequestError::Disconnected(why.to_string())));
    }
}

/// A structured reply being assembled.
struct Partial {
    entry: Entry,
    /// Read buffer (READ only).
    data: Vec<u8>,
    /// Byte ranges of `data` covered so far, as (start, end).
    covered: Vec<(u64, u64)>,
    extents: Option<Vec<Extent>>,
    error: Option<RequestError>,
}

/// The reader thread: returns why it stopped.
fn receive(s: &Shared, rd: WireReader) -> Result<(), String> {
    // Reply headers are 16 to 20 bytes: read them from a buffer, not one system call (or one
    // lock of the TLS session) each.
    let mut rd = io::BufReader::with_capacity(256 << 10, rd);
    let mut partial: HashMap<Cookie, Partial> = HashMap::new();
    let ctx = s.info.base_allocation;
    loop {
        let mut magic = [0u8; 4];
        match rd.read_exact(&mut magic) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let io = |e: io::Error| e.to_string();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut b = [0u8; 12];
                rd.read_exact(&mut b).map_err(io)?;
                let (error, cookie) = decode_simple_reply_rest(&b);
                let entry = lock(&s.pending)
                    .map
                    .remove(&cookie)
                    .ok_or_else(|| format!("reply for unknown cookie {cookie}"))?;
                let result = if error != 0 {
                    Err(RequestError::Server {
                        errno: Errno(error),
                        message: String::new(),
                    })
                } else {
                    match entry.expect {
                        Expect::Read { len, .. } => {
                            if s.info.structured {
                                return Err("simple reply to READ with structured replies".into());
                            }
                            let mut d = vec![0u8; len as usize];
                            rd.read_exact(&mut d).map_err(io)?;
                            Ok(Reply::Data(d))
                        }
                        Expect::BlockStatus => {
                            return Err("simple success reply to BLOCK_STATUS".into())
                        }
                        Expect::Other => Ok(Reply::Done),
                    }
                };
                (entry.done)(cookie, result);
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut b = [0u8; 16];
                rd.read_exact(&mut b).map_err(io)?;
                let h = decode_chunk_rest(&b).map_err(|e| e.to_string())?;
                let mut p = match partial.remove(&h.cookie) {
                    Some(p) => p,
                    None => {
                        let entry = lock(&s.pending)
                            .map
                            .remove(&h.cookie)
                            .ok_or_else(|| format!("reply for unknown cookie {}", h.cookie))?;
                        let data = match entry.expect {
                            Expect::Read { len, .. } => vec![0u8; len as usize],
                            _ => Vec::new(),
                        };
                        Partial {
                            entry,
                            data,
                            covered: Vec::new(),
                            extents: None,
                            error: None,
                        }
                    }
                };
                chunk(&mut rd, &h, &mut p, ctx)?;
                if h.flags & REPLY_FLAG_DONE == 0 {
                    partial.insert(h.cookie, p);
                    continue;
                }
                let result = finish(p.entry.expect, p.data, &p.covered, p.extents, p.error)?;
                (p.entry.done)(h.cookie, result);
            }
            other => return Err(format!("bad reply magic {other:#x}")),
        }
    }
}

/// Take in one structured chunk.
fn chunk(
    rd: &mut io::BufReader<WireReader>,
    h: &ChunkHeader,
    p: &mut Partial,
    ctx: Option<u32>,
) -> Result<(), String> {
    let io = |e: io::Error| e.to_string();
    if h.kind == REPLY_TYPE_OFFSET_DATA {
        // Read straight into the destination buffer.
        let Expect::Read { offset, len } = p.entry.expect else {
            return Err("OFFSET_DATA chunk for a request that is not a READ".into());
        };
        if h.len < 9 {
            return Err("short OFFSET_DATA chunk".into());
        }
        let mut o = [0u8; 8];
        rd.read_exact(&mut o).map_err(io)?;
        let at = u64::from_be_bytes(o);
        let n = u64::from(h.len - 8);
        let (start, end) = (
            at.wrapping_sub(offset),
            at.wrapping_sub(offset).wrapping_add(n),
        );
        if at < offset || end > u64::from(len) || start > end {
            return Err("OFFSET_DATA chunk outside the request".into());
        }
        cover(&mut p.covered, start, end)?;
        rd.read_exact(&mut p.data[start as usize..end as usize])
            .map_err(io)?;
        return Ok(());
    }
    let mut payload = vec![0u8; h.len as usize];
    rd.read_exact(&mut payload).map_err(io)?;
    match decode_chunk(h.kind, &payload).map_err(|e| e.to_string())? {
        Chunk::None => {}
        Chunk::OffsetData { .. } => return Err("OFFSET_DATA chunk decoded twice".into()),
        Chunk::OffsetHole { offset: at, len: n } => {
            let Expect::Read { offset, len } = p.entry.expect else {
                return Err("OFFSET_HOLE chunk for a request that is not a READ".into());
            };
            let start = at.wrapping_sub(offset);
            let end = start.wrapping_add(u64::from(n));
            if at < offset || end > u64::from(len) || start > end {
                return Err("OFFSET_HOLE chunk outside the request".into());
            }
            cover(&mut p.covered, start, end)?;
            // The buffer starts zeroed; nothing to copy.
        }
        Chunk::BlockStatus { context, extents } => {
            if !matches!(p.entry.expect, Expect::BlockStatus) {
                return Err("BLOCK_STATUS chunk for another command".into());
            }
            if Some(context) == ctx {
                p.extents = Some(extents);
            }
        }
        Chunk::Error { errno, message, .. } => {
            p.error
                .get_or_insert(RequestError::Server { errno, message });
        }
    }
    Ok(())
}

fn cover(covered: &mut Vec<(u64, u64)>, start: u64, end: u64) -> Result<(), String> {
    if covered.iter().any(|&(a, b)| start < b && a < end) {
        return Err("overlapping read chunks".into());
    }
    covered.push((start, end));
    Ok(())
}

fn finish(
    expect: Expect,
    data: Vec<u8>,
    covered: &[(u64, u64)],
    extents: Option<Vec<Extent>>,
    error: Option<RequestError>,
) -> Result<Completion, String> {
    if let Some(e) = error {
        return Ok(Err(e));
    }
    Ok(Ok(match expect {
        Expect::Read { len, .. } => {
            let got: u64 = covered.iter().map(|(a, b)| b - a).sum();
            if got != u64::from(len) {
                return Err(format!("READ reply covered {got} of {len} bytes"));
            }
            Reply::Data(data)
        }
        Expect::BlockStatus => match extents {
            Some(e) => Reply::Extents(e),
            None => return Err("BLOCK_STATUS reply without our context".into()),
        },
        Expect::Other => Reply::Done,
    }))
}
