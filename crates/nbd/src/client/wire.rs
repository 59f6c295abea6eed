//! The client's byte transport: plain TCP or rustls, split into a sending and a receiving
//! half so the reader thread never waits on the writer (see the module docs of
//! [`super`]).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The stream during negotiation (single-threaded).
pub(super) enum NegStream {
    Plain(TcpStream),
    Tls(Box<rustls::ClientConnection>, TcpStream),
}

impl Read for NegStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NegStream::Plain(s) => s.read(buf),
            NegStream::Tls(c, s) => rustls::Stream::new(&mut **c, s).read(buf),
        }
    }
}

impl Write for NegStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NegStream::Plain(s) => s.write(buf),
            NegStream::Tls(c, s) => rustls::Stream::new(&mut **c, s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            NegStream::Plain(s) => s.flush(),
            NegStream::Tls(c, s) => rustls::Stream::new(&mut **c, s).flush(),
        }
    }
}

/// Plaintext size handed to rustls at once (below its default 64 KiB buffer limit).
const TLS_CHUNK: usize = 16 * 1024;
/// Encrypted bytes gathered before a socket write.
const TLS_BATCH: usize = 256 * 1024;

/// The sending half.
pub(super) enum WireWriter {
    Plain(TcpStream),
    Tls(Arc<Mutex<rustls::ClientConnection>>, TcpStream),
}

impl WireWriter {
    pub(super) fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            WireWriter::Plain(s) => {
                // One write for small requests (a batch of them), not one per part.
                let total: usize = parts.iter().map(|p| p.len()).sum();
                if total <= 1 << 20 {
                    let mut buf = Vec::with_capacity(total);
                    for p in parts {
                        buf.extend_from_slice(p);
                    }
                    return s.write_all(&buf);
                }
                for p in parts {
                    s.write_all(p)?;
                }
                Ok(())
            }
            WireWriter::Tls(conn, sock) => {
                let mut out = Vec::new();
                let mut c = lock(conn);
                for p in parts {
                    for chunk in p.chunks(TLS_CHUNK) {
                        c.writer().write_all(chunk)?;
                        while c.wants_write() {
                            c.write_tls(&mut out)?;
                        }
                        if out.len() >= TLS_BATCH {
                            drop(c);
                            sock.write_all(&out)?;
                            out.clear();
                            c = lock(conn);
                        }
                    }
                }
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
                drop(c);
                sock.write_all(&out)
            }
        }
    }

    pub(super) fn close_notify(&mut self) {
        if let WireWriter::Tls(conn, sock) = self {
            let mut out = Vec::new();
            {
                let mut c = lock(conn);
                c.send_close_notify();
                while c.wants_write() {
                    if c.write_tls(&mut out).is_err() {
                        break;
                    }
                }
            }
            let _ = sock.write_all(&out);
        }
    }
}

/// The receiving half.
pub(super) enum WireReader {
    Plain(TcpStream),
    Tls {
        conn: Arc<Mutex<rustls::ClientConnection>>,
        sock: TcpStream,
        raw: Vec<u8>,
        start: usize,
        end: usize,
    },
}

impl Read for WireReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            WireReader::Plain(s) => s.read(out),
            WireReader::Tls {
                conn,
                sock,
                raw,
                start,
                end,
            } => loop {
                {
                    let mut c = lock(conn);
                    match c.reader().read(out) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if *start < *end {
                        let mut s = &raw[*start..*end];
                        let n = c.read_tls(&mut s)?;
                        *start += n;
                        c.process_new_packets().map_err(io::Error::other)?;
                        continue;
                    }
                }
                let n = sock.read(raw)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                *start = 0;
                *end = n;
            },
        }
    }
}
