//! The byte stream a migration runs over: TCP, or mutual TLS over TCP (rustls) between two
//! hosts of a cluster. Everything above it only needs `Read + Write`.
//!
//! With TLS each side proves who it is with its host's certificate, and checks the other is
//! the host its daemon expects (`--expect-peer` on the receiver, `MigrationTls.peer` on the
//! sender), so a stream captured on the wire can be neither read nor replayed elsewhere.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a send or an awaited answer may stall before the migration gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection: plain TCP, or TLS either way.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<rustls::StreamOwned<rustls::ClientConnection, BufSock>>),
    Server(Box<rustls::StreamOwned<rustls::ServerConnection, BufSock>>),
}

/// A socket read through a large buffer. rustls asks for at most a few KiB a read; filling
/// those from here rather than from the kernel cuts the receiver's syscalls for a migration
/// stream from one per 4 KiB to one per [`BufSock::READ_BUF`].
pub struct BufSock {
    sock: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl BufSock {
    const READ_BUF: usize = 256 << 10;

    fn new(sock: TcpStream) -> Self {
        BufSock {
            sock,
            buf: vec![0; Self::READ_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }
}

impl Read for BufSock {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = self.sock.read(&mut self.buf)?;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for BufSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// How much plaintext rustls may hold encrypted and unsent: enough that one page message
/// goes out in a few large writes.
const TLS_SEND_BUFFER: usize = 4 << 20;

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Client(s) => &s.sock.sock,
            Stream::Server(s) => &s.sock.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// Bytes the kernel holds for `s` that the peer has not acknowledged yet (TIOCOUTQ: unsent
/// plus in flight); `None` if the kernel does not say.
pub fn unacked(s: &TcpStream) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(s), libc::TIOCOUTQ, &mut n) };
    (r == 0 && n >= 0).then_some(n as u64)
}

/// A host's TLS for migration streams: its configs, and the host the other side must be.
#[derive(Clone)]
pub struct MigrationTls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// The other VMM's host.
    pub peer: String,
}

impl MigrationTls {
    /// Load a host's credentials from `dir` (its daemon's `tls` directory).
    pub fn load(dir: &Path, peer: &str) -> Result<MigrationTls, ferry_auth::AuthError> {
        let creds = ferry_auth::Credentials::load(dir)?;
        let trust = Arc::new(creds.trust()?);
        Ok(MigrationTls {
            client: ferry_auth::tls::client_config(&creds, trust.clone())?,
            server: ferry_auth::tls::server_config(&creds, trust)?,
            peer: peer.into(),
        })
    }
}

fn tls_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS: {e}"))
}

/// A bandwidth cap, which several connections of one move may share.
pub struct Pacer {
    bytes_per_s: f64,
    window_start: Instant,
    window_sent: u64,
}

impl Pacer {
    /// How long to wait before `n` more bytes fit the cap (they are counted now).
    fn take(&mut self, n: usize) -> Duration {
        // Token bucket over a sliding second.
        let elapsed = self.window_start.elapsed().as_secs_f64();
        let ahead = self.window_sent as f64 + n as f64 - self.bytes_per_s * elapsed;
        if elapsed > 1.0 {
            self.window_start = Instant::now();
            self.window_sent = 0;
        }
        self.window_sent += n as u64;
        Duration::from_secs_f64(ahead.max(0.0) / self.bytes_per_s)
    }
}

/// A migration connection with byte counting and an optional bandwidth cap.
pub struct Transport<S = Stream> {
    inner: S,
    sent: u64,
    cap: Option<Arc<std::sync::Mutex<Pacer>>>,
}

fn tune(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

impl Transport<Stream> {
    /// Connect to `addr` (host:port), over TLS when `tls` is given. A refused connection is
    /// retried until `timeout`: the destination VMM may still be starting.
    pub fn connect(addr: &str, timeout: Duration, tls: Option<&MigrationTls>) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{addr} resolves to no address"),
            );
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => return Transport::client(s, tls),
                    Err(e) => last = e,
                }
            }
            if last.kind() != io::ErrorKind::ConnectionRefused || Instant::now() > deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connected socket, over TLS (this side the client) when `tls` is given; the server
    /// must be `tls.peer`.
    pub fn client(s: TcpStream, tls: Option<&MigrationTls>) -> io::Result<Self> {
        tune(&s)?;
        let Some(t) = tls else {
            return Ok(Transport::new(Stream::Plain(s)));
        };
        let name = ferry_auth::tls::server_name(&t.peer).map_err(tls_err)?;
        let mut c = rustls::ClientConnection::new(t.client.clone(), name).map_err(tls_err)?;
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let mut s = BufSock::new(s);
        while c.is_handshaking() {
            c.complete_io(&mut s).map_err(tls_err)?;
        }
        Ok(Transport::new(Stream::Client(Box::new(
            rustls::StreamOwned::new(c, s),
        ))))
    }

    /// An accepted socket, over TLS (this side the server) when `tls` is given; the client
    /// must be `tls.peer`.
    pub fn server(s: TcpStream, tls: Option<&MigrationTls>) -> io::Result<Self> {
        tune(&s)?;
        let Some(t) = tls else {
            return Ok(Transport::new(Stream::Plain(s)));
        };
        let mut c = rustls::ServerConnection::new(t.server.clone()).map_err(tls_err)?;
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let mut s = BufSock::new(s);
        while c.is_handshaking() {
            c.complete_io(&mut s).map_err(tls_err)?;
        }
        let who = ferry_auth::tls::peer_identity(c.peer_certificates())
            .ok_or_else(|| tls_err("the other VMM presented no ferry identity"))?;
        if !(who.role == ferry_auth::Role::Host && who.name == t.peer) {
            return Err(tls_err(format!(
                "the other VMM is {who}, not host {} as expected",
                t.peer
            )));
        }
        Ok(Transport::new(Stream::Server(Box::new(
            rustls::StreamOwned::new(c, s),
        ))))
    }

    /// Wrap an accepted or connected socket without TLS.
    pub fn over_tcp(s: TcpStream) -> io::Result<Self> {
        Transport::client(s, None)
    }

    /// Whether the stream is encrypted.
    pub fn encrypted(&self) -> bool {
        !matches!(self.inner, Stream::Plain(_))
    }

    /// Change how long a send or a read may stall.
    pub fn set_io_timeout(&self, t: Duration) {
        let _ = self.inner.tcp().set_read_timeout(Some(t));
        let _ = self.inner.tcp().set_write_timeout(Some(t));
    }

    /// Bytes the kernel holds for this connection that the peer has not acknowledged yet
    /// (TIOCOUTQ: unsent plus in flight); `None` if the kernel does not say.
    pub fn unacked(&self) -> Option<u64> {
        unacked(self.inner.tcp())
    }

    /// Flush, then wait (at most `max`) until at most `below` bytes are still on their way to
    /// the peer. Returns how long it waited.
    pub fn wait_delivered(&mut self, below: u64, max: Duration) -> io::Result<Duration> {
        let start = Instant::now();
        self.inner.flush()?;
        while self.unacked().is_some_and(|n| n > below) && start.elapsed() < max {
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(start.elapsed())
    }

    /// Another handle on the socket, to shut it down from another thread.
    pub fn socket(&self) -> io::Result<TcpStream> {
        self.inner.tcp().try_clone()
    }

    /// Close both directions now (a cancel: the peer sees the end at once).
    pub fn shutdown(&self) {
        let _ = self.inner.tcp().shutdown(std::net::Shutdown::Both);
    }
}

impl<S> Transport<S> {
    /// Wrap any stream.
    pub fn new(inner: S) -> Self {
        Transport {
            inner,
            sent: 0,
            cap: None,
        }
    }

    /// Cap the send rate (Mbit/s; 0 = no cap).
    pub fn set_cap_mbit(&mut self, mbit: u64) {
        self.cap = (mbit > 0).then(|| {
            Arc::new(std::sync::Mutex::new(Pacer {
                bytes_per_s: mbit as f64 * 1e6 / 8.0,
                window_start: Instant::now(),
                window_sent: 0,
            }))
        });
    }

    /// This connection's cap, to share with another connection of the same move.
    pub fn cap(&self) -> Option<Arc<std::sync::Mutex<Pacer>>> {
        self.cap.clone()
    }

    /// Share `cap` (another connection's): the two together stay under it.
    pub fn share_cap(&mut self, cap: Option<Arc<std::sync::Mutex<Pacer>>>) {
        self.cap = cap;
    }

    /// Bytes written so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }
}

impl<S: Read> Read for Transport<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Transport<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(cap) = &self.cap {
            let wait = cap
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(buf.len());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
