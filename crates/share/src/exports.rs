//! The shares' disks as NBD exports (`share/disk`), each connection held to the access list
//! and the disk's lease at every request.
//!
//! Who a client is comes from its TLS certificate (NBD STARTTLS, required when the file server
//! is in a cluster): a host on the share's access list with `read` gets a read-only export,
//! with `write` one it may write only while it holds the disk's write lease under the fence
//! number it had when it connected. So a stale writer (a source that gave the lease up during
//! a move, a host whose lease an admin broke) has its writes refused by the server, whatever
//! it does. Taking a host off the access list stops its open connections at their next request.

use std::io;
use std::sync::Arc;

use ferry_api::share::Access;
use ferry_nbd::export::{Export, ExportProvider, Peer, RawFileExport, Refusal, ZeroFlags};
use ferry_nbd::proto::{Errno, Extent};

use crate::store::{export_name, Store};

/// Who is connecting, as the file server names it.
#[derive(Debug, Clone)]
enum Client {
    /// A host of the cluster (by certificate).
    Host(String),
    /// An admin (by certificate): may read every share.
    Admin,
    /// No cluster: anyone who reaches the port (a lab on a trusted network).
    Anyone,
}

/// Every share's disks, for the NBD server.
pub struct Exports {
    pub store: Arc<Store>,
    /// Whether the file server is in a cluster (then identities come from certificates).
    pub secure: bool,
}

fn client(peer: &Peer, secure: bool) -> Result<Client, Refusal> {
    if !secure {
        return Ok(Client::Anyone);
    }
    let id = peer
        .tls_identity
        .as_deref()
        .and_then(|s| s.split_once(' '))
        .ok_or_else(|| Refusal::Policy("a certificate of this cluster is required".into()))?;
    match id {
        ("host", n) => Ok(Client::Host(n.into())),
        ("admin", _) => Ok(Client::Admin),
        (r, n) => Err(Refusal::Policy(format!("{r} {n} may not open disks"))),
    }
}

impl ExportProvider for Exports {
    fn open(&self, name: &str, peer: &Peer) -> Result<Arc<dyn Export>, Refusal> {
        let c = client(peer, self.secure)?;
        let (share, disk) = name
            .split_once('/')
            .ok_or_else(|| Refusal::Unknown(format!("{name}: exports are named SHARE/DISK")))?;
        let path = self
            .store
            .disk_path(share, disk)
            .map_err(|e| Refusal::Unknown(e.to_string()))?;
        if !path.exists() {
            return Err(Refusal::Unknown(format!("no disk {disk} on share {share}")));
        }
        let (access, host) = match &c {
            Client::Anyone => (Access::Write, None),
            Client::Admin => (Access::Read, None),
            Client::Host(h) => match self.store.access(share, h) {
                Some(a) => (a, Some(h.clone())),
                None => {
                    tracing::warn!(
                        "refused {name} to host {h}: not on share {share}'s access list"
                    );
                    return Err(Refusal::Policy(format!(
                        "host {h} is not on share {share}'s access list"
                    )));
                }
            },
        };
        let read_only = access == Access::Read;
        let inner = RawFileExport::open(&path, read_only)
            .map_err(|e| Refusal::Unknown(format!("{name}: {e}")))?;
        let export = export_name(share, disk);
        let lease = self.store.lease(&export);
        let fence = match &host {
            Some(h) if lease.holder.as_deref() == Some(h) => Some(lease.fence),
            _ => None,
        };
        tracing::info!(
            "{} opened {export} ({}{})",
            peer.tls_identity.as_deref().unwrap_or("a client"),
            access,
            match fence {
                Some(f) => format!(", lease fence {f}"),
                None => String::new(),
            }
        );
        Ok(Arc::new(Guarded {
            inner,
            store: self.store.clone(),
            share: share.into(),
            export,
            host,
            fence,
            read_only,
        }))
    }

    fn list(&self, peer: &Peer) -> Vec<String> {
        let Ok(c) = client(peer, self.secure) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for s in self.store.share_names() {
            let visible = match &c {
                Client::Host(h) => self.store.access(&s, h).is_some(),
                _ => true,
            };
            if visible {
                for d in self.store.disks(&s).unwrap_or_default() {
                    v.push(export_name(&s, &d));
                }
            }
        }
        v
    }
}

/// One connection's view of a disk.
struct Guarded {
    inner: RawFileExport,
    store: Arc<Store>,
    share: String,
    export: String,
    /// The host, when identities are known.
    host: Option<String>,
    /// The lease fence this connection writes under (None: it may not write).
    fence: Option<u64>,
    read_only: bool,
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl Guarded {
    fn may_read(&self) -> io::Result<()> {
        match &self.host {
            Some(h) if self.store.access(&self.share, h).is_none() => Err(eperm()),
            _ => Ok(()),
        }
    }
}

impl Export for Guarded {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.may_read()?;
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.inner.write_at(offset, data, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, flags)
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        self.may_read()?;
        self.inner.block_status(offset, len)
    }

    /// Before every write: still on the access list with write, still the lease holder, and
    /// under the same fence as when this connection opened.
    fn check_write(&self) -> Result<(), Errno> {
        let Some(h) = &self.host else {
            return Ok(()); // no cluster: anyone may write
        };
        if self.store.access(&self.share, h) != Some(Access::Write) {
            return Err(Errno::EPERM);
        }
        let l = self.store.lease(&self.export);
        match (l.holder.as_deref(), self.fence) {
            (Some(holder), Some(f)) if holder == h && l.fence == f => Ok(()),
            _ => {
                tracing::warn!(
                    "refused a write to {} from {h}: lease held by {} at fence {}, this connection has {}",
                    self.export,
                    l.holder.as_deref().unwrap_or("nobody"),
                    l.fence,
                    self.fence.map_or("none".to_string(), |f| f.to_string())
                );
                Err(Errno::EPERM)
            }
        }
    }
}
