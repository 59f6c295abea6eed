//! The NBD server (tokio): fixed newstyle negotiation with optional or required STARTTLS,
//! then a pipelined transmission phase over an [`Export`].
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Greeting
//!     Greeting --> Options: client flags
//!     Options --> Options: LIST / INFO / STRUCTURED_REPLY / *_META_CONTEXT / unknown
//!     Options --> Tls: STARTTLS (ACK, handshake; state reset)
//!     Tls --> Options
//!     Options --> Transmission: GO / EXPORT_NAME
//!     Options --> [*]: ABORT / error
//!     Transmission --> [*]: DISC / EOF / corrupt header
//! ```
//!
//! In transmission the connection task reads requests as they arrive and runs each on its
//! own task (the export call itself in the blocking pool), at most [`MAX_IN_FLIGHT`] at once
//! and [`BYTES_IN_FLIGHT`] bytes of payload; replies go to one writer task in completion
//! order. A request the server can answer (bad range, flags, command) gets an errno; only a
//! header it cannot frame (bad magic, a write payload over [`MAX_REQUEST`]) closes the
//! connection, and only that one.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::export::{Export, ExportProvider, Peer, Refusal, ZeroFlags};
use crate::proto::*;

/// Requests of one connection being served at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// READ/WRITE payload bytes of one connection held at once.
pub const BYTES_IN_FLIGHT: u32 = 2 * MAX_REQUEST;
/// Replies gathered into one write, at most (about).
const REPLY_BATCH: usize = 256 << 10;
/// The metadata context id of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// How long a client may take to reach transmission (TLS handshake included).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;

/// Extracts the client's identity from a finished TLS handshake (e.g. a name from its
/// certificate); the result lands in [`Peer::tls_identity`].
pub type IdentityFn = fn(&rustls::ServerConnection) -> Option<String>;

/// TLS settings of a server.
#[derive(Clone)]
pub struct ServerTls {
    /// The rustls configuration (certificate, client verification).
    pub config: Arc<rustls::ServerConfig>,
    /// FORCEDTLS mode: every option but STARTTLS and ABORT before TLS gets
    /// `NBD_REP_ERR_TLS_REQD`. Otherwise TLS is offered but optional.
    pub required: bool,
    /// How to name the client after the handshake.
    pub identity: Option<IdentityFn>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Why a connection ended badly.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Socket error.
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    /// The client sent something we cannot frame.
    #[error("protocol violation")]
    Proto(#[from] ProtoError),
    /// Unknown client flags.
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    /// The TLS handshake failed.
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// `NBD_OPT_EXPORT_NAME` cannot report errors, so a refusal ends the session.
    #[error("NBD_OPT_EXPORT_NAME {name:?} refused")]
    ExportName {
        /// The export asked for.
        name: String,
        /// Why.
        #[source]
        refusal: Refusal,
    },
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it.
    #[error("NBD_OPT_EXPORT_NAME before the required STARTTLS")]
    TlsRequired,
    /// A non-fixed-newstyle client sent an option other than EXPORT_NAME.
    #[error("option {0} from a client without fixed newstyle")]
    NotFixedNewstyle(u32),
    /// The client did not finish negotiating within [`NEGOTIATION_TIMEOUT`].
    #[error("negotiation took too long")]
    NegotiationTimeout,
    /// A WRITE whose payload is over [`MAX_REQUEST`]: it cannot be skipped safely.
    #[error("write payload of {0} bytes exceeds the limit")]
    OversizeWrite(u32),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// Accept connections forever, serving each on its own task.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    tls: Option<ServerTls>,
) -> io::Result<()> {
    serve_until(listener, provider, tls, std::future::pending()).await
}

/// Accept connections until `shutdown` completes (connections already accepted go on
/// until their clients disconnect).
pub async fn serve_until(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, addr)) => {
                if let Err(e) = sock.set_nodelay(true) {
                    debug!(%addr, error = %e, "set_nodelay failed");
                }
                let peer = Peer {
                    addr,
                    tls_identity: None,
                };
                let (provider, tls) = (provider.clone(), tls.clone());
                tokio::spawn(async move {
                    match serve_connection(sock, provider, peer, tls).await {
                        Ok(()) => debug!(%addr, "nbd connection closed"),
                        Err(e) => info!(%addr, error = %error_chain(&e), "nbd connection ended"),
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "nbd accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How much of the socket a connection reads at once.
const READ_BUFFER: usize = 256 << 10;

/// Serve one connection: negotiate, then transmit until the client disconnects.
pub async fn serve_connection<S>(
    stream: S,
    provider: Arc<dyn ExportProvider>,
    peer: Peer,
    tls: Option<ServerTls>,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut n = Negotiation {
        // Read through a large buffer: rustls asks the socket for a few KiB at a time, so a
        // TLS client's 1 MiB write would otherwise cost hundreds of reads (a plain read of a
        // payload larger than the buffer bypasses it). Bytes buffered before STARTTLS can only
        // be TLS records to rustls, never commands.
        stream: Box::new(tokio::io::BufReader::with_capacity(READ_BUFFER, stream)),
        provider,
        peer,
        tls,
        tls_active: false,
        fixed: false,
        no_zeroes: false,
        structured: false,
        meta: None,
    };
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, n.run())
        .await
        .map_err(|_| ServerError::NegotiationTimeout)?;
    let Some(conn) = negotiated? else {
        return Ok(());
    };
    transmit(n.stream, conn).await
}

/// Negotiation state of one connection.
struct Negotiation {
    stream: Stream,
    provider: Arc<dyn ExportProvider>,
    peer: Peer,
    tls: Option<ServerTls>,
    tls_active: bool,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` was selected.
    meta: Option<String>,
}

/// What transmission needs from negotiation.
struct Conn {
    export: Arc<dyn Export>,
    size: u64,
    structured: bool,
    base_allocation: bool,
    read_only: bool,
}

enum Step {
    Continue,
    Abort,
    Transmit(Conn),
}

fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if export.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if export.can_multi_conn() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

impl Negotiation {
    async fn run(&mut self) -> Result<Option<Conn>, ServerError> {
        self.stream
            .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            .await?;
        self.stream.flush().await?;
        let cflags = self.stream.read_u32().await?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ServerError::ClientFlags(cflags));
        }
        self.fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; OPTION_HEADER_LEN];
            self.stream.read_exact(&mut h).await?;
            let h = decode_option_header(&h)?;
            let mut data = vec![0u8; h.len as usize];
            self.stream.read_exact(&mut data).await?;
            match self.option(h.option, &data).await? {
                Step::Continue => {}
                Step::Abort => return Ok(None),
                Step::Transmit(c) => return Ok(Some(c)),
            }
        }
    }

    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        self.stream
            .write_all(&encode_option_reply(option, reply, data))
            .await
    }

    async fn reply_err(&mut self, option: u32, reply: u32, msg: &str) -> io::Result<()> {
        debug!(peer = %self.peer.addr, option, reply, msg, "option refused");
        self.reply(option, reply, clip(msg, MAX_STRING).as_bytes())
            .await?;
        self.stream.flush().await
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Step, ServerError> {
        if !self.fixed && option != OPT_EXPORT_NAME {
            return Err(ServerError::NotFixedNewstyle(option));
        }
        let tls_required = self.tls.as_ref().is_some_and(|t| t.required);
        if tls_required && !self.tls_active && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(ServerError::TlsRequired);
            }
            self.reply_err(option, REP_ERR_TLS_REQD, "TLS is required: use STARTTLS")
                .await?;
            return Ok(Step::Continue);
        }
        let opt = match decode_option(option, data) {
            Ok(o) => o,
            Err(e) => {
                if option == OPT_EXPORT_NAME {
                    return Err(e.into());
                }
                self.reply_err(option, REP_ERR_INVALID, &e.to_string())
                    .await?;
                return Ok(Step::Continue);
            }
        };
        match opt {
            ClientOption::Abort => {
                // The client may already be gone: a failed ACK is not an error.
                let _ = self.reply(option, REP_ACK, &[]).await;
                let _ = self.stream.flush().await;
                let _ = self.stream.shutdown().await;
                Ok(Step::Abort)
            }
            ClientOption::ExportName(name) => {
                let export = self.provider.open(&name, &self.peer).map_err(|refusal| {
                    ServerError::ExportName {
                        name: name.clone(),
                        refusal,
                    }
                })?;
                let flags = transmission_flags(&*export, self.structured);
                self.stream
                    .write_all(&encode_export_name_reply(
                        export.size(),
                        flags,
                        self.no_zeroes,
                    ))
                    .await?;
                self.stream.flush().await?;
                Ok(Step::Transmit(self.conn(export, &name)))
            }
            ClientOption::List => {
                for name in self.provider.list(&self.peer) {
                    self.reply(
                        option,
                        REP_SERVER,
                        &encode_rep_server(clip(&name, MAX_STRING)),
                    )
                    .await?;
                }
                self.reply(option, REP_ACK, &[]).await?;
                self.stream.flush().await?;
                Ok(Step::Continue)
            }
            ClientOption::StartTls => {
                self.start_tls(option).await?;
                Ok(Step::Continue)
            }
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                let export = match self.provider.open(&name, &self.peer) {
                    Ok(e) => e,
                    Err(r) => {
                        let code = match r {
                            Refusal::Unknown(_) => REP_ERR_UNKNOWN,
                            Refusal::Policy(_) => REP_ERR_POLICY,
                        };
                        self.reply_err(option, code, &r.to_string()).await?;
                        return Ok(Step::Continue);
                    }
                };
                let flags = transmission_flags(&*export, self.structured);
                let info = encode_info(&Info::Export {
                    size: export.size(),
                    flags,
                });
                self.reply(option, REP_INFO, &info).await?;
                if requests.contains(&INFO_NAME) {
                    self.reply(option, REP_INFO, &encode_info(&Info::Name(name.clone())))
                        .await?;
                }
                let bs = encode_info(&Info::BlockSize {
                    min: 1,
                    preferred: PREFERRED_BLOCK,
                    max: MAX_REQUEST,
                });
                self.reply(option, REP_INFO, &bs).await?;
                self.reply(option, REP_ACK, &[]).await?;
                self.stream.flush().await?;
                if option == OPT_GO {
                    Ok(Step::Transmit(self.conn(export, &name)))
                } else {
                    Ok(Step::Continue)
                }
            }
            ClientOption::StructuredReply => {
                if self.structured {
                    self.reply_err(option, REP_ERR_INVALID, "structured replies already on")
                        .await?;
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]).await?;
                    self.stream.flush().await?;
                }
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext { export, queries }
            | ClientOption::SetMetaContext { export, queries } => {
                if !self.structured {
                    self.reply_err(option, REP_ERR_INVALID, "structured replies not negotiated")
                        .await?;
                    return Ok(Step::Continue);
                }
                let set = option == OPT_SET_META_CONTEXT;
                let matches = if set {
                    queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                if set {
                    self.meta = matches.then(|| export.clone());
                }
                if matches {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    self.reply(
                        option,
                        REP_META_CONTEXT,
                        &encode_rep_meta_context(id, META_BASE_ALLOCATION),
                    )
                    .await?;
                }
                self.reply(option, REP_ACK, &[]).await?;
                self.stream.flush().await?;
                Ok(Step::Continue)
            }
            ClientOption::Unknown(o) => {
                self.reply_err(o, REP_ERR_UNSUP, "option not supported")
                    .await?;
                Ok(Step::Continue)
            }
        }
    }

    fn conn(&self, export: Arc<dyn Export>, name: &str) -> Conn {
        Conn {
            size: export.size(),
            read_only: export.read_only(),
            structured: self.structured,
            base_allocation: self.structured && self.meta.as_deref() == Some(name),
            export,
        }
    }

    async fn start_tls(&mut self, option: u32) -> Result<(), ServerError> {
        let Some(tls) = self.tls.clone() else {
            self.reply_err(option, REP_ERR_UNSUP, "this server does not offer TLS")
                .await?;
            return Ok(());
        };
        if self.tls_active {
            self.reply_err(option, REP_ERR_INVALID, "TLS already active")
                .await?;
            return Ok(());
        }
        self.reply(option, REP_ACK, &[]).await?;
        self.stream.flush().await?;
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::empty()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let tls_stream = acceptor.accept(plain).await.map_err(ServerError::Tls)?;
        self.peer.tls_identity = tls.identity.and_then(|f| f(tls_stream.get_ref().1));
        debug!(peer = %self.peer.addr, identity = ?self.peer.tls_identity, "nbd TLS up");
        self.stream = Box::new(tls_stream);
        self.tls_active = true;
        // Nothing negotiated in the clear survives the upgrade.
        self.structured = false;
        self.meta = None;
        Ok(())
    }
}

/// A request's permits: released when its reply has been queued.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

async fn transmit(stream: Stream, conn: Conn) -> Result<(), ServerError> {
    let conn = Arc::new(conn);
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(BYTES_IN_FLIGHT as usize));
    let result: Result<(), ServerError> = async {
        loop {
            let mut h = [0u8; REQUEST_LEN];
            match rd.read_exact(&mut h).await {
                Ok(_) => {}
                // A client that just closes (no DISC) is common and harmless.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let req = decode_request(&h)?;
            if req.command == CMD_DISC {
                return Ok(());
            }
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(io::Error::other)?;
            let payload_len = match req.command {
                CMD_WRITE | CMD_READ if req.len <= MAX_REQUEST => req.len,
                CMD_WRITE => return Err(ServerError::OversizeWrite(req.len)),
                _ => 0,
            };
            let byte_permit = if payload_len > 0 {
                Some(
                    bytes
                        .clone()
                        .acquire_many_owned(payload_len)
                        .await
                        .map_err(io::Error::other)?,
                )
            } else {
                None
            };
            let data = if req.command == CMD_WRITE {
                let mut d = vec![0u8; payload_len as usize];
                rd.read_exact(&mut d).await?;
                d
            } else {
                Vec::new()
            };
            let permits = Permits {
                _slot: slot,
                _bytes: byte_permit,
            };
            if inline(&req) {
                // Small reads and writes go to the page cache in microseconds: cheaper here
                // than a task and a blocking-pool hop each.
                let reply = handle_inline(&conn, req, data);
                if tx.send(reply).await.is_err() {
                    return Ok(());
                }
                drop(permits);
                continue;
            }
            let (conn, tx) = (conn.clone(), tx.clone());
            tokio::spawn(async move {
                let reply = handle(&conn, req, data).await;
                // A closed writer means the connection is going away; nothing to do.
                let _ = tx.send(reply).await;
                drop(permits);
            });
        }
    }
    .await;
    drop(tx);
    match &result {
        // Soft disconnect: answer everything in flight, then close.
        Ok(()) => match writer.await {
            Ok(Err(e)) => debug!(error = %e, "nbd reply writer"),
            Err(e) => debug!(error = %e, "nbd reply writer task"),
            Ok(Ok(())) => {}
        },
        Err(_) => writer.abort(),
    }
    result
}

async fn write_replies(
    mut wr: tokio::io::WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    while let Some(mut out) = rx.recv().await {
        // Every reply ready now goes in one write: one system call and, with TLS, as few
        // records as the bytes need, not one of each per reply.
        while out.len() < REPLY_BATCH {
            match rx.try_recv() {
                Ok(buf) => out.extend_from_slice(&buf),
                Err(_) => break,
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
    wr.shutdown().await
}

type Fail = (Errno, String);

fn fail(errno: Errno, msg: impl Into<String>) -> Fail {
    (errno, msg.into())
}

fn io_fail(e: io::Error) -> Fail {
    (Errno::from_io(&e), e.to_string())
}

impl Conn {
    fn error_reply(&self, cookie: u64, (errno, msg): Fail) -> Vec<u8> {
        if self.structured {
            encode_error_chunk(cookie, errno, &msg)
        } else {
            encode_simple_reply(errno.0, cookie).to_vec()
        }
    }

    /// Checks a request can be answered at all: command, flags, range, permissions.
    fn validate(&self, r: &RequestHeader) -> Result<(), Fail> {
        let allowed = CMD_FLAG_FUA
            | match r.command {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                c => return Err(fail(Errno::EINVAL, format!("unknown command {c}"))),
            };
        if r.flags & !allowed != 0 {
            return Err(fail(
                Errno::EINVAL,
                format!("flags {:#x} not valid for command {}", r.flags, r.command),
            ));
        }
        if r.command == CMD_FLUSH {
            return Ok(());
        }
        if r.len == 0 {
            return Err(fail(Errno::EINVAL, "zero-length request"));
        }
        let writes = matches!(r.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err(fail(Errno::EPERM, "export is read-only"));
        }
        let end = r.offset.checked_add(u64::from(r.len));
        if end.is_none_or(|e| e > self.size) {
            let errno = if matches!(r.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                Errno::ENOSPC
            } else {
                Errno::EINVAL
            };
            return Err(fail(
                errno,
                format!(
                    "range {}+{} is past the end of the export ({} bytes)",
                    r.offset, r.len, self.size
                ),
            ));
        }
        if r.command == CMD_READ && r.len > MAX_REQUEST {
            return Err(fail(
                Errno::EINVAL,
                "read larger than the maximum block size",
            ));
        }
        if r.command == CMD_BLOCK_STATUS && !self.base_allocation {
            return Err(fail(Errno::EINVAL, "no metadata context negotiated"));
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(fail(Errno::EIO, format!("export task failed: {e}"))))
}

/// Largest read or write served inline by the connection's task.
const INLINE_MAX: u32 = 64 << 10;

/// Whether `r` is a small read or write without FUA (no fsync): served inline.
fn inline(r: &RequestHeader) -> bool {
    matches!(r.command, CMD_READ | CMD_WRITE) && r.len <= INLINE_MAX && r.flags & CMD_FLAG_FUA == 0
}

/// [`handle`] for the requests [`inline`] picks, without leaving the task.
fn handle_inline(conn: &Conn, r: RequestHeader, data: Vec<u8>) -> Vec<u8> {
    if let Err(f) = conn.validate(&r) {
        debug!(command = r.command, errno = %f.0, msg = %f.1, "nbd request refused");
        return conn.error_reply(r.cookie, f);
    }
    let res = if r.command == CMD_READ {
        read_reply(conn, &r)
    } else {
        conn.export
            .check_write()
            .map_err(|e| fail(e, "write refused"))
            .and_then(|()| {
                conn.export
                    .write_at(r.offset, &data, false)
                    .map_err(io_fail)
            })
            .map(|()| encode_simple_reply(0, r.cookie).to_vec())
    };
    res.unwrap_or_else(|f| conn.error_reply(r.cookie, f))
}

/// Serve one request; returns the complete encoded reply.
async fn handle(conn: &Arc<Conn>, r: RequestHeader, data: Vec<u8>) -> Vec<u8> {
    if let Err(f) = conn.validate(&r) {
        debug!(command = r.command, errno = %f.0, msg = %f.1, "nbd request refused");
        return conn.error_reply(r.cookie, f);
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let c = conn.clone();
    let res: Result<Vec<u8>, Fail> = match r.command {
        CMD_READ => {
            return match blocking(move || read_reply(&c, &r)).await {
                Ok(v) => v,
                Err(f) => conn.error_reply(r.cookie, f),
            }
        }
        CMD_WRITE => {
            blocking(move || {
                c.export
                    .check_write()
                    .map_err(|e| fail(e, "write refused"))?;
                c.export.write_at(r.offset, &data, fua).map_err(io_fail)
            })
            .await
        }
        CMD_FLUSH => blocking(move || c.export.flush().map_err(io_fail)).await,
        CMD_TRIM => {
            blocking(move || {
                c.export
                    .check_write()
                    .map_err(|e| fail(e, "trim refused"))?;
                c.export
                    .trim(r.offset, u64::from(r.len), fua)
                    .map_err(io_fail)
            })
            .await
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                no_hole: r.flags & CMD_FLAG_NO_HOLE != 0,
                fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            blocking(move || {
                c.export
                    .check_write()
                    .map_err(|e| fail(e, "write zeroes refused"))?;
                c.export
                    .write_zeroes(r.offset, u64::from(r.len), flags)
                    .map_err(io_fail)
            })
            .await
        }
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => {
            let req_one = r.flags & CMD_FLAG_REQ_ONE != 0;
            return match blocking(move || block_status(&c, &r, req_one)).await {
                Ok(v) => v,
                Err(f) => conn.error_reply(r.cookie, f),
            };
        }
        // validate() has refused every other command.
        _ => Err(fail(Errno::EINVAL, "unknown command")),
    }
    .map(|()| encode_simple_reply(0, r.cookie).to_vec());
    res.unwrap_or_else(|f| conn.error_reply(r.cookie, f))
}

/// Read into a buffer that already holds the reply header, so the data is never copied.
fn read_reply(c: &Conn, r: &RequestHeader) -> Result<Vec<u8>, Fail> {
    let len = r.len as usize;
    let head = if c.structured {
        STRUCTURED_REPLY_LEN + 8
    } else {
        SIMPLE_REPLY_LEN
    };
    let mut v = Vec::new();
    v.try_reserve_exact(head + len)
        .map_err(|_| fail(Errno::ENOMEM, "out of memory"))?;
    v.resize(head + len, 0);
    c.export
        .read_at(r.offset, &mut v[head..])
        .map_err(io_fail)?;
    if c.structured {
        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: r.cookie,
            len: r.len + 8,
        };
        v[..STRUCTURED_REPLY_LEN].copy_from_slice(&encode_chunk_header(&h));
        v[STRUCTURED_REPLY_LEN..head].copy_from_slice(&r.offset.to_be_bytes());
    } else {
        v[..SIMPLE_REPLY_LEN].copy_from_slice(&encode_simple_reply(0, r.cookie));
    }
    Ok(v)
}

fn block_status(c: &Conn, r: &RequestHeader, req_one: bool) -> Result<Vec<u8>, Fail> {
    let raw = c.export.block_status(r.offset, r.len).map_err(io_fail)?;
    // Keep the export honest: nonzero extents, within the request.
    let mut left = r.len;
    let mut extents = Vec::with_capacity(raw.len().min(4096));
    for mut e in raw {
        if left == 0 || (req_one && !extents.is_empty()) {
            break;
        }
        if e.len == 0 {
            continue;
        }
        e.len = e.len.min(left);
        left -= e.len;
        extents.push(e);
    }
    if extents.is_empty() {
        extents.push(Extent {
            len: r.len,
            flags: 0,
        });
    }
    let p = encode_block_status_payload(BASE_ALLOCATION_ID, &extents);
    Ok(encode_chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        r.cookie,
        &p,
    ))
}
