//! The one place where ferry's management traffic meets the network: every listener the
//! daemon serves (TCP address, local unix socket) and every connection a client makes (CLI to
//! daemon, daemon to daemon) goes through here. TCP is mutual TLS (the configs come from
//! `ferry_auth::tls`): a client without a certificate of this cluster, or with a revoked one,
//! is refused at the handshake; the peer's identity (`ferry://host/hv1`) is what the API
//! authorises by. The local socket is plain, and its peer is a local user (by uid). Above this,
//! everything is HTTP/1.1 over a byte stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use ferry_auth::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::rustls;

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

/// Who is on the other end of a connection the daemon accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on this host, through the local socket (with its user id).
    Local { uid: u32 },
    /// A party of the cluster over mutual TLS, as its certificate names it.
    Cert {
        identity: Identity,
        addr: SocketAddr,
    },
    /// Another machine over plain TCP (a daemon run with --insecure).
    Insecure(SocketAddr),
    /// A TLS client without a certificate (only the enrolment port accepts one).
    Anonymous(SocketAddr),
}

impl Peer {
    /// For logs and the audit trail.
    pub fn describe(&self) -> String {
        match self {
            Peer::Local { uid } => format!("local user {uid}"),
            Peer::Cert { identity, addr } => format!("{identity} ({addr})"),
            Peer::Insecure(a) => format!("unauthenticated {a}"),
            Peer::Anonymous(a) => format!("anonymous TLS client {a}"),
        }
    }
}

/// A connection, accepted or made.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Tcp($s) => $e,
            Conn::Unix($s) => $e,
            Conn::TlsServer($s) => $e,
            Conn::TlsClient($s) => $e,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A listening socket.
pub enum Listener {
    /// TCP; with a TLS config every connection must complete a (mutual) TLS handshake.
    Tcp(TcpListener, Option<tokio_rustls::TlsAcceptor>),
    Unix(UnixListener, PathBuf),
}

/// A connection accepted but not yet through its TLS handshake (done on the connection's own
/// task, so a slow or hostile client cannot hold up the accept loop).
pub enum Accepted {
    Ready(Conn, Peer),
    Handshake(Box<tokio_rustls::Accept<TcpStream>>, SocketAddr),
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Accepted {
    /// Finish the handshake: the connection and who it is from.
    pub async fn finish(self) -> io::Result<(Conn, Peer)> {
        match self {
            Accepted::Ready(c, p) => Ok((c, p)),
            Accepted::Handshake(h, addr) => {
                let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, *h)
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                let certs = s.get_ref().1.peer_certificates();
                let peer = match (certs, ferry_auth::tls::peer_identity(certs)) {
                    (_, Some(identity)) => Peer::Cert { identity, addr },
                    (None, None) => Peer::Anonymous(addr),
                    (Some(_), None) => {
                        return Err(io::Error::other(
                            "the client's certificate names no ferry identity",
                        ))
                    }
                };
                Ok((Conn::TlsServer(Box::new(s)), peer))
            }
        }
    }
}

impl Listener {
    /// Listen on a TCP address, with mutual TLS when `tls` is given.
    pub async fn tcp(addr: &str, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Listener> {
        Ok(Listener::Tcp(
            TcpListener::bind(addr).await?,
            tls.map(tokio_rustls::TlsAcceptor::from),
        ))
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

    /// Accept one connection (its TLS handshake is [`Accepted::finish`]'s).
    pub async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l, tls) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(match tls {
                    Some(a) => Accepted::Handshake(Box::new(a.accept(s)), addr),
                    None => Accepted::Ready(Conn::Tcp(s), Peer::Insecure(addr)),
                })
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let uid = s.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                Ok(Accepted::Ready(Conn::Unix(s), Peer::Local { uid }))
            }
        }
    }

    /// What it listens on.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l, tls) => format!(
                "{}{}",
                l.local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into()),
                if tls.is_some() { " (TLS)" } else { " (plain)" }
            ),
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

/// How a client secures a TCP connection: its config and the server's expected name.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The host the server must prove to be (`hv2` is checked as `hv2.ferry`).
    pub server: rustls::pki_types::ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls({:?})", self.server)
    }
}

/// Connect to a daemon (TCP with `tls` when given).
pub async fn connect(to: &Endpoint, tls: Option<&ClientTls>) -> io::Result<Conn> {
    match to {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            let _ = s.set_nodelay(true);
            match tls {
                Some(t) => {
                    let c = tokio_rustls::TlsConnector::from(t.config.clone());
                    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, c.connect(t.server.clone(), s))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                        })??;
                    Ok(Conn::TlsClient(Box::new(s)))
                }
                None => Ok(Conn::Tcp(s)),
            }
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
