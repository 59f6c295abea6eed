//! The one place where ferry's management traffic meets the network: every listener the
//! daemon serves (TCP address, local unix socket) and every connection a client makes (CLI to
//! daemon, daemon to daemon) goes through here, so that mutual TLS can wrap both ends in one
//! change. Above this, everything is HTTP/1.1 over a byte stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where a daemon is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port` over TCP.
    Tcp(String),
    /// A local unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// `unix:PATH`, an absolute path (a unix socket), or `host:port`.
    pub fn parse(s: &str) -> Option<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            return (!p.is_empty()).then(|| Endpoint::Unix(p.into()));
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Some(Endpoint::Unix(s.into()));
        }
        let (host, port) = s.rsplit_once(':')?;
        (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| Endpoint::Tcp(s.into()))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Who is on the other end of a connection the daemon accepted. (With mutual TLS this will
/// also carry the peer's certificate identity.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on this host, through the local socket (with its user id).
    Local { uid: u32 },
    /// Another machine, over TCP.
    Remote(SocketAddr),
}

/// A connection, accepted or made.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listen on a TCP address.
    pub async fn tcp(addr: &str) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Listen on a unix socket, replacing a stale socket file (one nobody answers on).
    pub async fn unix(path: PathBuf) -> io::Result<Listener> {
        if path.exists() {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(Listener::Unix(UnixListener::bind(&path)?, path))
    }

    /// Accept one connection and say who it is from.
    pub async fn accept(&self) -> io::Result<(Conn, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), Peer::Remote(addr)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let uid = s.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                Ok((Conn::Unix(s), Peer::Local { uid }))
            }
        }
    }

    /// What it listens on.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Connect to a daemon.
pub async fn connect(to: &Endpoint) -> io::Result<Conn> {
    match to {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            let _ = s.set_nodelay(true);
            Ok(Conn::Tcp(s))
        }
        Endpoint::Unix(p) => Ok(Conn::Unix(UnixStream::connect(p).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:/run/x.sock"),
            Some(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("/run/x.sock"),
            Some(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("10.0.0.2:7700"),
            Some(Endpoint::Tcp("10.0.0.2:7700".into()))
        );
        assert_eq!(Endpoint::parse("hv2"), None);
        assert_eq!(Endpoint::parse("hv2:x"), None);
        assert_eq!(Endpoint::parse("unix:"), None);
    }
}
