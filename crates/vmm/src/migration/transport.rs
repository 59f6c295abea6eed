//! The byte stream a migration runs over: TCP today. Everything above it only needs
//! `Read + Write`, so a TLS stream can take its place later.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long a send or an awaited answer may stall before the migration gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration connection with byte counting and an optional bandwidth cap.
pub struct Transport<S = TcpStream> {
    inner: S,
    sent: u64,
    cap_bytes_per_s: Option<f64>,
    window_start: Instant,
    window_sent: u64,
}

impl Transport<TcpStream> {
    /// Connect to `addr` (host:port). A refused connection is retried until `timeout`: the
    /// destination VMM may still be starting.
    pub fn connect(addr: &str, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{addr} resolves to no address"),
            );
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => return Transport::over_tcp(s),
                    Err(e) => last = e,
                }
            }
            if last.kind() != io::ErrorKind::ConnectionRefused || Instant::now() > deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wrap an accepted or connected socket.
    pub fn over_tcp(s: TcpStream) -> io::Result<Self> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Transport::new(s))
    }

    /// Change how long a send or a read may stall.
    pub fn set_io_timeout(&self, t: Duration) {
        let _ = self.inner.set_read_timeout(Some(t));
        let _ = self.inner.set_write_timeout(Some(t));
    }

    /// Close both directions now (a cancel: the peer sees the end at once).
    pub fn shutdown(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }
}

impl<S> Transport<S> {
    /// Wrap any stream.
    pub fn new(inner: S) -> Self {
        Transport {
            inner,
            sent: 0,
            cap_bytes_per_s: None,
            window_start: Instant::now(),
            window_sent: 0,
        }
    }

    /// Cap the send rate (Mbit/s; 0 = no cap).
    pub fn set_cap_mbit(&mut self, mbit: u64) {
        self.cap_bytes_per_s = (mbit > 0).then(|| mbit as f64 * 1e6 / 8.0);
        self.window_start = Instant::now();
        self.window_sent = 0;
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
        if let Some(rate) = self.cap_bytes_per_s {
            // Token bucket over a sliding second: sleep until this write fits the cap.
            let elapsed = self.window_start.elapsed().as_secs_f64();
            let allowed = rate * elapsed;
            let ahead = self.window_sent as f64 + buf.len() as f64 - allowed;
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead / rate));
            }
            if elapsed > 1.0 {
                self.window_start = Instant::now();
                self.window_sent = 0;
            }
        }
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        self.window_sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
