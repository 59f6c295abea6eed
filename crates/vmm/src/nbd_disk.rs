//! A virtio disk on an NBD export (`--disk nbd://HOST:PORT/EXPORT`): a ferry share or any
//! standard NBD server (qemu-nbd, nbdkit).
//!
//! Every request of a batch is sent before the first reply is awaited, so several are in
//! flight. When the server or the network goes away, guest I/O stalls: the disk reconnects
//! (with back-off) and sends again every request of the batch that was not acknowledged, for
//! up to the stall limit (default 60 s). Past it the requests still unanswered fail with EIO,
//! which the guest sees as I/O errors; nothing acknowledged is lost (an acknowledged write is
//! the server's) and nothing is acknowledged that was not (a request is completed only by its
//! reply). Later requests try to reconnect once, quickly, so the disk comes back by itself when
//! the server does.
//!
//! Resending is safe: NBD reads and writes are idempotent, and requests of one batch are in
//! flight together, so the guest has no order between them to rely on.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_devices::virtio::block::{DiskBackend, DiskOp, DiskOpKind};
use ferry_nbd::client::{parse_uri, Client, ClientTls, Reply, Request, RequestError, Ticket};

/// How long one connection attempt (TCP connect and handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request may go unanswered before the connection is taken for dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS client config for `nbds://` disks: this host's credentials from the directory in
/// `FERRY_TLS_DIR` (the host daemon sets it for its VMMs), accepting any file server or host of
/// the cluster. `None` when the variable is not set.
pub fn host_tls() -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let Some(dir) = std::env::var_os("FERRY_TLS_DIR") else {
        return Ok(None);
    };
    let dir = std::path::PathBuf::from(dir);
    let creds = ferry_auth::Credentials::load(&dir)
        .map_err(|e| format!("FERRY_TLS_DIR={}: {e}", dir.display()))?;
    let trust = Arc::new(creds.trust().map_err(|e| e.to_string())?);
    ferry_auth::tls::file_server_client_config(&creds, trust)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Why an NBD disk could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("NBD disk {uri}: {why}")]
pub struct NbdDiskError {
    pub uri: String,
    pub why: String,
}

/// An NBD export as a virtio disk's backend.
pub struct NbdDisk {
    uri: String,
    addr: String,
    export: String,
    tls: Option<ClientTls>,
    client: Option<Client>,
    size: u64,
    max_block: u64,
    stall_limit: Duration,
    /// Past the stall limit: the disk fails fast until a reconnect works.
    failed: bool,
}

impl NbdDisk {
    /// Connect to `uri` (`nbd://HOST:PORT/EXPORT`, or `nbds://` with `tls`).
    pub fn open(
        uri: &str,
        read_only: bool,
        stall_limit: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<NbdDisk, NbdDiskError> {
        let err = |why: String| NbdDiskError {
            uri: uri.to_string(),
            why,
        };
        let u = parse_uri(uri).map_err(|e| err(e.to_string()))?;
        let tls = match (u.tls, tls) {
            (true, None) => {
                return Err(err(
                    "nbds:// needs this host's credentials: set FERRY_TLS_DIR to its tls directory (the host daemon does)".into(),
                ))
            }
            (true, Some(config)) => Some(ClientTls {
                config,
                server_name: rustls::pki_types::ServerName::try_from(u.host.clone())
                    .map_err(|_| err(format!("{} is not a valid TLS server name", u.host)))?,
            }),
            (false, _) => None,
        };
        let mut d = NbdDisk {
            uri: uri.to_string(),
            addr: u.addr(),
            export: u.export.clone(),
            tls,
            client: None,
            size: 0,
            max_block: 0,
            stall_limit,
            failed: false,
        };
        let c = d.connect().map_err(|e| err(e.to_string()))?;
        let info = c.info();
        if info.flags & ferry_nbd::proto::FLAG_READ_ONLY != 0 && !read_only {
            return Err(err(
                "the server exports it read-only: give the disk as readonly, or ask for write access to the share".into(),
            ));
        }
        d.size = info.size;
        d.max_block = u64::from(info.max_block.max(4096));
        d.client = Some(c);
        Ok(d)
    }

    /// How long a request (or a send) may go unanswered before the connection is taken for
    /// dead: [`REPLY_TIMEOUT`], shorter for a disk with a short stall limit (a mirror's copy,
    /// whose failure the guest should not wait long for), never under 5 s.
    fn reply_timeout(&self) -> Duration {
        REPLY_TIMEOUT.min(self.stall_limit.max(Duration::from_secs(5)))
    }

    fn connect(&self) -> io::Result<Client> {
        let addr = self
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{} has no address", self.addr)))?;
        let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        let c = Client::connect_stream(sock, &self.export, self.tls.clone(), CONNECT_TIMEOUT)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // A send the server does not take for as long as a reply may take: the link is dead.
        c.set_write_timeout(Some(self.reply_timeout()))?;
        if c.size() != self.size && self.size != 0 {
            c.abort();
            return Err(io::Error::other(format!(
                "the export is now {} bytes, it was {}: refusing to use a different disk",
                c.size(),
                self.size
            )));
        }
        Ok(c)
    }

    /// Get a connection, waiting for one until `deadline` (or trying once if the disk failed).
    fn ensure(&mut self, deadline: Instant) -> bool {
        if self.client.is_some() {
            return true;
        }
        let mut wait = Duration::from_millis(50);
        loop {
            match self.connect() {
                Ok(c) => {
                    if self.failed {
                        tracing::info!("{}: connected again", self.uri);
                    }
                    self.failed = false;
                    self.client = Some(c);
                    return true;
                }
                Err(e) => {
                    if self.failed || Instant::now() >= deadline {
                        tracing::debug!("{}: {e}", self.uri);
                        return false;
                    }
                    tracing::debug!("{}: reconnecting: {e}", self.uri);
                }
            }
            std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    fn drop_connection(&mut self) {
        if let Some(c) = self.client.take() {
            c.abort();
        }
    }

    /// The NBD requests for one op (reads and writes split at the server's block limit).
    fn requests(&self, op: &DiskOp) -> Vec<Request> {
        let chunks = |len: u64| {
            let step = self.max_block;
            (0..len.div_ceil(step).max(1)).map(move |i| (i * step, (len - i * step).min(step)))
        };
        match op.kind {
            DiskOpKind::Read => chunks(op.len)
                .map(|(at, n)| Request::Read {
                    offset: op.offset + at,
                    len: n as u32,
                })
                .collect(),
            DiskOpKind::Write => chunks(op.len)
                .map(|(at, n)| Request::Write {
                    offset: op.offset + at,
                    data: Arc::from(&op.buf[at as usize..(at + n) as usize]),
                    fua: false,
                })
                .collect(),
            DiskOpKind::Flush => vec![Request::Flush],
            DiskOpKind::Discard => vec![Request::Trim {
                offset: op.offset,
                len: op.len as u32,
                fua: false,
            }],
            DiskOpKind::WriteZeroes { unmap } => vec![Request::WriteZeroes {
                offset: op.offset,
                len: op.len as u32,
                no_hole: !unmap,
                fast: false,
                fua: false,
            }],
        }
    }
}

/// Where one NBD request's answer goes.
struct Slot {
    op: usize,
    /// Byte offset of this chunk inside the op's buffer (reads).
    at: usize,
    req: Request,
    done: bool,
}

impl NbdDisk {
    /// Run `ops` to completion: in flight together, resent after reconnects, within the stall
    /// limit. Flushes go after every write of the batch has been acknowledged.
    fn run_batch(&mut self, ops: &mut [DiskOp]) {
        let (flushes, rest): (Vec<usize>, Vec<usize>) =
            (0..ops.len()).partition(|&i| ops[i].kind == DiskOpKind::Flush);
        self.run_some(ops, &rest);
        self.run_some(ops, &flushes);
    }

    fn run_some(&mut self, ops: &mut [DiskOp], which: &[usize]) {
        if which.is_empty() {
            return;
        }
        let mut slots = Vec::new();
        for &i in which {
            ops[i].result = Ok(());
            let mut at = 0usize;
            for req in self.requests(&ops[i]) {
                let n = match &req {
                    Request::Read { len, .. } => *len as usize,
                    _ => 0,
                };
                slots.push(Slot {
                    op: i,
                    at,
                    req,
                    done: false,
                });
                at += n;
            }
        }
        let started = Instant::now();
        let deadline = started + self.stall_limit;
        let mut stalled = false;
        loop {
            if !self.ensure(deadline) {
                self.failed = true;
                tracing::warn!(
                    "{}: unreachable for {:?} (stall limit {:?}): failing {} requests",
                    self.uri,
                    started.elapsed(),
                    self.stall_limit,
                    slots.iter().filter(|s| !s.done).count()
                );
                for s in slots.iter().filter(|s| !s.done) {
                    ops[s.op].result = Err(io::Error::other("NBD server unreachable"));
                }
                return;
            }
            let Some(client) = self.client.as_ref() else {
                return;
            };
            // Send every request not yet answered, then collect the replies.
            let todo: Vec<usize> = (0..slots.len()).filter(|&k| !slots[k].done).collect();
            let reqs: Vec<Request> = todo.iter().map(|&k| slots[k].req.clone()).collect();
            let tickets: Vec<(usize, Result<Ticket, RequestError>)> =
                todo.into_iter().zip(client.submit_all(&reqs)).collect();
            let mut lost = false;
            let mut lease_wait = false;
            for (k, t) in tickets {
                let c = match t {
                    Ok(t) => match t.wait_timeout(self.reply_timeout()) {
                        Some(c) => c,
                        None => {
                            // No answer: take the connection for dead (a cut link says nothing).
                            client.abort();
                            t.wait()
                        }
                    },
                    Err(e) => Err(e),
                };
                let s = &mut slots[k];
                match c {
                    Ok(Reply::Data(d)) => {
                        let buf = &mut ops[s.op].buf;
                        let end = (s.at + d.len()).min(buf.len());
                        buf[s.at..end].copy_from_slice(&d[..end - s.at]);
                        s.done = true;
                    }
                    Ok(_) => s.done = true,
                    Err(RequestError::Disconnected(why)) => {
                        if !lost {
                            tracing::debug!("{}: connection lost: {why}", self.uri);
                        }
                        lost = true;
                    }
                    // A write refused for want of the lease: this host's VM has just moved
                    // here and the lease follows it; a new connection writes under it.
                    Err(RequestError::Server { errno, .. })
                        if errno == ferry_nbd::proto::Errno::EPERM
                            && matches!(
                                s.req,
                                Request::Write { .. }
                                    | Request::Trim { .. }
                                    | Request::WriteZeroes { .. }
                            ) =>
                    {
                        if !lost {
                            tracing::debug!("{}: write refused (no lease yet)", self.uri);
                        }
                        lost = true;
                        lease_wait = true;
                    }
                    Err(e) => {
                        s.done = true;
                        let errno = e.errno().map(|e| e.0 as i32);
                        ops[s.op].result = Err(match errno {
                            Some(n) => io::Error::from_raw_os_error(n),
                            None => io::Error::other(e.to_string()),
                        });
                    }
                }
            }
            if !lost {
                if stalled {
                    tracing::info!("{}: I/O resumed after {:?}", self.uri, started.elapsed());
                }
                return;
            }
            if !stalled {
                if lease_wait {
                    tracing::info!(
                        "{}: waiting for this host's write lease (up to {:?})",
                        self.uri,
                        self.stall_limit
                    );
                } else {
                    tracing::warn!(
                        "{}: the server went away; guest I/O waits (up to {:?})",
                        self.uri,
                        self.stall_limit
                    );
                }
            }
            stalled = true;
            self.drop_connection();
            if lease_wait {
                std::thread::sleep(Duration::from_millis(10));
                if Instant::now() >= deadline {
                    for s in slots.iter().filter(|s| !s.done) {
                        ops[s.op].result = Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                    tracing::warn!(
                        "{}: this host did not get the write lease: writes fail",
                        self.uri
                    );
                    return;
                }
            }
        }
    }

    fn one(
        &mut self,
        kind: DiskOpKind,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> (io::Result<()>, Vec<u8>) {
        let mut ops = [DiskOp::new(kind, offset, len, buf)];
        self.run_batch(&mut ops);
        let [op] = ops;
        (op.result, op.buf)
    }
}

impl DiskBackend for NbdDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (r, data) = self.one(
            DiskOpKind::Read,
            offset,
            buf.len() as u64,
            vec![0; buf.len()],
        );
        buf.copy_from_slice(&data);
        r
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.one(DiskOpKind::Write, offset, buf.len() as u64, buf.to_vec())
            .0
    }

    fn flush(&mut self) -> io::Result<()> {
        self.one(DiskOpKind::Flush, 0, 0, Vec::new()).0
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.one(DiskOpKind::Discard, offset, len, Vec::new()).0
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.one(DiskOpKind::WriteZeroes { unmap }, offset, len, Vec::new())
            .0
    }

    fn run(&mut self, ops: &mut [DiskOp]) {
        self.run_batch(ops);
    }
}

/// An NBD disk shared between its virtio device and the VMM (which flushes it before a
/// migration hands the disk over).
#[derive(Clone)]
pub struct SharedNbd(pub Arc<Mutex<NbdDisk>>);

impl SharedNbd {
    fn lock(&self) -> std::sync::MutexGuard<'_, NbdDisk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long guest I/O rides out an outage from now on (a mirror's copy, once it is the
    /// VM's disk, gets the disk's limit).
    pub fn set_stall_limit(&self, limit: Duration) {
        self.lock().stall_limit = limit;
    }
}

impl DiskBackend for SharedNbd {
    fn size(&self) -> io::Result<u64> {
        self.lock().size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.lock().read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.lock().write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.lock().write_zeroes(offset, len, unmap)
    }
    fn run(&mut self, ops: &mut [DiskOp]) {
        self.lock().run(ops)
    }
}
