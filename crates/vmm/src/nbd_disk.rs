//! A virtio disk on an NBD export (`--disk nbd://HOST:PORT/EXPORT`): a ferry share or any
//! standard NBD server (qemu-nbd, nbdkit).
//!
//! The device's requests stream through the disk ([`DiskBackend::serve_stream`]): up to
//! [`STREAM_DEPTH`] are on the wire at once, and the guest's next requests go out as soon as
//! earlier ones are answered, so the guest's queue never waits for a whole batch's round trip.
//! A flush waits for the writes taken before it. When the server or the network goes away,
//! guest I/O stalls: the disk reconnects (with back-off) and sends again every request that was
//! not acknowledged, for up to the stall limit (default 60 s). Past it the requests still
//! unanswered fail with EIO, which the guest sees as I/O errors; nothing acknowledged is lost
//! (an acknowledged write is the server's) and nothing is acknowledged that was not (a request
//! is completed only by its reply). Later requests try to reconnect once, quickly, so the disk
//! comes back by itself when the server does.
//!
//! Resending is safe: NBD reads and writes are idempotent, and requests in flight together
//! have no order between them the guest may rely on (it has not seen any of them complete).
//!
//! The disk takes no request straight to or from guest memory (no `direct_min`), but it may
//! still be handed one: the device asks its backend before a stream, and a storage move can
//! switch the disk from an image file (which takes them) to this one in between. Such a
//! request goes through a buffer here, as every other one does.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_devices::virtio::block::{
    gather, DiskBackend, DiskOp, DiskOpKind, RequestFeed, StreamLock,
};
use ferry_devices::virtio::GuestMemoryMmap;
use ferry_nbd::client::{parse_uri, Client, ClientTls, Completion, Reply, Request, RequestError};

/// Most of the guest's requests a stream keeps on the wire at once.
pub const STREAM_DEPTH: usize = 64;
/// Most data bytes (reads and writes) a stream keeps on the wire at once.
const STREAM_BYTES: usize = 32 << 20;

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

/// What a reply (or its absence) means for the request it answers.
enum Outcome {
    /// The server answered: data, done, or an error the guest gets.
    Answered(Answer),
    /// The connection is gone: send the request again on a new one.
    Lost,
    /// A write refused for want of the lease: this host's VM has just moved here and the lease
    /// follows it; a new connection writes under it.
    NoLease,
}

/// A server's answer to one request.
enum Answer {
    Data(Vec<u8>),
    Done,
    Failed(io::Error),
}

impl Outcome {
    /// `quiet`: the connection is already known lost (log nothing more about it).
    fn of(c: Completion, req: &Request, uri: &str, quiet: bool) -> Outcome {
        match c {
            Ok(Reply::Data(d)) => Outcome::Answered(Answer::Data(d)),
            Ok(_) => Outcome::Answered(Answer::Done),
            Err(RequestError::Disconnected(why)) => {
                if !quiet {
                    tracing::debug!("{uri}: connection lost: {why}");
                }
                Outcome::Lost
            }
            Err(RequestError::Server { errno, .. })
                if errno == ferry_nbd::proto::Errno::EPERM
                    && matches!(
                        req,
                        Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. }
                    ) =>
            {
                if !quiet {
                    tracing::debug!("{uri}: write refused (no lease yet)");
                }
                Outcome::NoLease
            }
            Err(e) => {
                let errno = e.errno().map(|e| e.0 as i32);
                Outcome::Answered(Answer::Failed(match errno {
                    Some(n) => io::Error::from_raw_os_error(n),
                    None => io::Error::other(e.to_string()),
                }))
            }
        }
    }
}

impl Answer {
    /// Put the answer to the chunk at byte `at` of `op` into it.
    fn apply(self, op: &mut DiskOp, at: usize) {
        match self {
            Answer::Data(d) => {
                let end = (at + d.len()).min(op.buf.len());
                op.buf[at..end].copy_from_slice(&d[..end - at]);
            }
            Answer::Done => {}
            Answer::Failed(e) => op.result = Err(e),
        }
    }
}

impl NbdDisk {
    /// Run `ops` to completion: through the stream, so in flight together, resent after
    /// reconnects, within the stall limit. Flushes are taken last, so they go after every
    /// write of the batch has been acknowledged.
    fn run_batch(&mut self, ops: &mut [DiskOp]) {
        let mut order: Vec<usize> = (0..ops.len()).collect();
        order.sort_by_key(|&i| ops[i].kind == DiskOpKind::Flush);
        let mut batch = Batch {
            ops,
            order,
            next: 0,
        };
        self.stream(&mut batch, None);
    }

    /// Serve the device's requests as they come, up to [`STREAM_DEPTH`] on the wire (see the
    /// module's documentation). `mem`: the guest memory requests taken straight to or from it
    /// live in.
    fn stream(&mut self, feed: &mut dyn RequestFeed, mem: Option<&GuestMemoryMmap>) {
        let mut st = Stream::default();
        let (tx, rx) = mpsc::channel::<(usize, u64, Completion)>();
        let mut taken = Vec::new();
        loop {
            if st.stall.is_none() {
                let (n, bytes) = (st.ops.live(), st.bytes);
                if n < STREAM_DEPTH && bytes < STREAM_BYTES {
                    feed.take(STREAM_DEPTH - n, STREAM_BYTES - bytes, &mut taken);
                    for (tag, mut op) in taken.drain(..) {
                        if let Err(e) = buffered(&mut op, mem) {
                            op.result = Err(e);
                            feed.done(tag, op);
                            continue;
                        }
                        let reqs = self.requests(&op);
                        st.add(tag, op, reqs);
                    }
                }
            }
            if st.ops.live() == 0 {
                return;
            }
            if st.lost || (!st.to_send.is_empty() && self.client.is_none()) {
                self.recover(&mut st, feed);
                continue;
            }
            if !st.to_send.is_empty() {
                let refused = st.send(self.client.as_ref().expect("checked above"), &tx);
                for (k, a) in refused {
                    st.answered(k, a, feed);
                }
                if st.lost {
                    continue;
                }
            }
            // Wait for the first answer, then take every one that is in.
            let first = match rx.recv_timeout(self.reply_timeout()) {
                Ok(m) => m,
                Err(_) => {
                    // No answer: take the connection for dead (a cut link says nothing).
                    st.lost = true;
                    continue;
                }
            };
            let mut next = Some(first);
            while let Some((part, gen, c)) = next {
                if let Some(p) = st.parts.get(part).filter(|p| p.gen == gen) {
                    match Outcome::of(c, &p.req, &self.uri, st.lost) {
                        Outcome::Answered(a) => {
                            if let Some(since) = st.stall.take() {
                                st.warned = false;
                                tracing::info!(
                                    "{}: I/O resumed after {:?}",
                                    self.uri,
                                    since.elapsed()
                                );
                            }
                            st.answered(part, a, feed);
                        }
                        Outcome::Lost => st.lost = true,
                        Outcome::NoLease => {
                            st.lost = true;
                            st.lease_wait = true;
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
        }
    }

    /// The connection is lost (or there is none): reconnect within the stall limit and send
    /// every unanswered request again, or fail them all past it.
    fn recover(&mut self, st: &mut Stream, feed: &mut dyn RequestFeed) {
        let started = *st.stall.get_or_insert_with(Instant::now);
        if !st.warned && !self.failed {
            st.warned = true;
            if st.lease_wait {
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
        self.drop_connection();
        let deadline = started + self.stall_limit;
        if st.lease_wait {
            std::thread::sleep(Duration::from_millis(10));
        }
        let connected = if st.lease_wait && Instant::now() >= deadline {
            tracing::warn!(
                "{}: this host did not get the write lease: writes fail",
                self.uri
            );
            false
        } else {
            self.ensure(deadline)
        };
        if connected {
            st.resend_all();
            return;
        }
        if !st.lease_wait && !self.failed {
            self.failed = true;
            tracing::warn!(
                "{}: unreachable for {:?} (stall limit {:?}): failing {} requests",
                self.uri,
                started.elapsed(),
                self.stall_limit,
                st.ops.live()
            );
        }
        let errno = if st.lease_wait {
            libc::EPERM
        } else {
            libc::EIO
        };
        st.fail_all(errno, feed);
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

    fn serve_stream(&mut self, feed: &mut dyn RequestFeed, mem: &GuestMemoryMmap) {
        self.stream(feed, Some(mem));
    }
}

/// Make a request meant to go straight to or from guest memory (see the module's
/// documentation) an ordinary one: a write's data copied out of the guest, a read's buffer
/// made (the device copies it into the guest when it answers).
fn buffered(op: &mut DiskOp, mem: Option<&GuestMemoryMmap>) -> io::Result<()> {
    if op.guest.is_empty() {
        return Ok(());
    }
    let segs = std::mem::take(&mut op.guest);
    match op.kind {
        DiskOpKind::Write => {
            let mem =
                mem.ok_or_else(|| io::Error::other("a write from guest memory without it"))?;
            op.buf = gather(mem, &segs)?;
        }
        DiskOpKind::Read => op.buf = vec![0; op.len as usize],
        _ => {}
    }
    Ok(())
}

/// A batch of requests as a stream's feed: all of it at once (within the stream's limits),
/// each put back in its place when answered.
struct Batch<'a> {
    ops: &'a mut [DiskOp],
    /// The order to hand them out in.
    order: Vec<usize>,
    next: usize,
}

impl RequestFeed for Batch<'_> {
    fn take(&mut self, max: usize, max_bytes: usize, out: &mut Vec<(usize, DiskOp)>) {
        let (mut n, mut bytes) = (0, 0);
        while n < max && bytes < max_bytes && self.next < self.order.len() {
            let i = self.order[self.next];
            self.next += 1;
            let op = std::mem::replace(
                &mut self.ops[i],
                DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()),
            );
            n += 1;
            bytes += op.len as usize;
            out.push((i, op));
        }
    }
    fn done(&mut self, tag: usize, op: DiskOp) {
        self.ops[tag] = op;
    }
}

/// A slab: values by index, indexes reused.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(v);
                i
            }
            None => {
                self.items.push(Some(v));
                self.items.len() - 1
            }
        }
    }
    fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i).and_then(Option::take);
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
    fn live(&self) -> usize {
        self.items.len() - self.free.len()
    }
    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
    }
}

/// One of the guest's requests in a stream.
struct StreamOp {
    tag: usize,
    op: DiskOp,
    /// Its NBD requests not answered yet.
    left: usize,
    /// Order taken (a flush waits for the writes taken before it).
    seq: u64,
    /// A flush waiting for those writes; its NBD request, to send then.
    held: Option<Request>,
}

impl StreamOp {
    fn writes(&self) -> bool {
        !matches!(self.op.kind, DiskOpKind::Read | DiskOpKind::Flush)
    }
}

/// One NBD request of a stream, and the connection (generation) it was last sent on.
struct Part {
    op: usize,
    /// Byte offset of this chunk inside the op's buffer (reads).
    at: usize,
    req: Request,
    gen: u64,
}

/// The state of one [`NbdDisk::stream`].
#[derive(Default)]
struct Stream {
    ops: Slab<StreamOp>,
    parts: Slab<Part>,
    /// Data bytes of the reads and writes in flight.
    bytes: usize,
    seq: u64,
    /// The connection's generation: answers from an earlier one are ignored (their requests
    /// were sent again).
    gen: u64,
    to_send: Vec<usize>,
    lost: bool,
    lease_wait: bool,
    /// Since when guest I/O has been waiting for the server.
    stall: Option<Instant>,
    warned: bool,
}

impl Stream {
    fn add(&mut self, tag: usize, mut op: DiskOp, reqs: Vec<Request>) {
        op.result = Ok(());
        self.seq += 1;
        if matches!(op.kind, DiskOpKind::Read | DiskOpKind::Write) {
            self.bytes += op.len as usize;
        }
        let flush = op.kind == DiskOpKind::Flush;
        let i = self.ops.insert(StreamOp {
            tag,
            op,
            left: reqs.len(),
            seq: self.seq,
            held: None,
        });
        if flush && self.ops.iter().any(|(_, o)| o.writes()) {
            self.ops.get_mut(i).expect("just added").held = reqs.into_iter().next();
            return;
        }
        let mut at = 0usize;
        for req in reqs {
            let n = match &req {
                Request::Read { len, .. } => *len as usize,
                _ => 0,
            };
            let k = self.parts.insert(Part {
                op: i,
                at,
                req,
                gen: self.gen,
            });
            self.to_send.push(k);
            at += n;
        }
    }

    /// Send what waits to be sent, in one write; a request that cannot go marks the
    /// connection lost. Returns the requests refused before they went out (the server does
    /// not offer them), with the guest's error.
    fn send(
        &mut self,
        client: &Client,
        tx: &mpsc::Sender<(usize, u64, Completion)>,
    ) -> Vec<(usize, Answer)> {
        let gen = self.gen;
        // Each part still waiting, beside its request (the two lists stay in step).
        let (ks, reqs): (Vec<usize>, Vec<Request>) = std::mem::take(&mut self.to_send)
            .into_iter()
            .filter_map(|k| self.parts.get(k).map(|p| (k, p.req.clone())))
            .unzip();
        let sent = client.submit_all_with(&reqs, |i| {
            let (tx, k) = (tx.clone(), ks[i]);
            Box::new(move |_, c| {
                let _ = tx.send((k, gen, c));
            })
        });
        let mut refused = Vec::new();
        for (k, r) in ks.into_iter().zip(sent) {
            match r {
                Ok(_) => {}
                Err(RequestError::Disconnected(_)) => self.lost = true,
                Err(e) => refused.push((k, Answer::Failed(io::Error::other(e.to_string())))),
            }
        }
        refused
    }

    /// The server answered part `k`; a request whose parts are all answered goes back to the
    /// device.
    fn answered(&mut self, k: usize, a: Answer, feed: &mut dyn RequestFeed) {
        let Some(p) = self.parts.remove(k) else {
            return;
        };
        let Some(o) = self.ops.get_mut(p.op) else {
            return;
        };
        a.apply(&mut o.op, p.at);
        o.left -= 1;
        if o.left == 0 {
            self.finish(p.op, feed);
        }
    }

    fn finish(&mut self, i: usize, feed: &mut dyn RequestFeed) {
        let Some(o) = self.ops.remove(i) else {
            return;
        };
        if matches!(o.op.kind, DiskOpKind::Read | DiskOpKind::Write) {
            self.bytes -= o.op.len as usize;
        }
        let wrote = o.writes();
        feed.done(o.tag, o.op);
        if wrote {
            self.release_flushes();
        }
    }

    /// Send each held flush that no longer has a write taken before it in flight.
    fn release_flushes(&mut self) {
        let held: Vec<(usize, u64)> = self
            .ops
            .iter()
            .filter(|(_, o)| o.held.is_some())
            .map(|(i, o)| (i, o.seq))
            .collect();
        for (i, seq) in held {
            if self.ops.iter().any(|(_, o)| o.writes() && o.seq < seq) {
                continue;
            }
            let Some(req) = self.ops.get_mut(i).and_then(|o| o.held.take()) else {
                continue;
            };
            let k = self.parts.insert(Part {
                op: i,
                at: 0,
                req,
                gen: self.gen,
            });
            self.to_send.push(k);
        }
    }

    /// A new connection: every unanswered request goes again on it.
    fn resend_all(&mut self) {
        self.gen += 1;
        self.lost = false;
        self.lease_wait = false;
        let gen = self.gen;
        self.to_send.clear();
        for (k, p) in self.parts.items.iter_mut().enumerate() {
            if let Some(p) = p {
                p.gen = gen;
                self.to_send.push(k);
            }
        }
    }

    /// Fail every request in flight with `errno`.
    fn fail_all(&mut self, errno: i32, feed: &mut dyn RequestFeed) {
        self.parts = Slab::default();
        self.to_send.clear();
        let all: Vec<usize> = self.ops.iter().map(|(i, _)| i).collect();
        for i in all {
            if let Some(mut o) = self.ops.remove(i) {
                o.op.result = Err(io::Error::from_raw_os_error(errno));
                feed.done(o.tag, o.op);
            }
        }
        self.bytes = 0;
        self.lost = false;
        self.lease_wait = false;
        self.stall = None;
        self.warned = false;
    }
}

/// An NBD disk shared between its virtio device and the VMM (which flushes it before a
/// migration hands the disk over).
#[derive(Clone)]
pub struct SharedNbd(pub Arc<StreamLock<NbdDisk>>);

impl SharedNbd {
    fn lock(&self) -> std::sync::MutexGuard<'_, NbdDisk> {
        self.0.lock()
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
    fn serve_stream(&mut self, feed: &mut dyn RequestFeed, mem: &GuestMemoryMmap) {
        self.0.stream(feed, |d, feed| d.serve_stream(feed, mem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Answers(Vec<(usize, io::Result<()>)>);

    impl RequestFeed for Answers {
        fn take(&mut self, _: usize, _: usize, _: &mut Vec<(usize, DiskOp)>) {}
        fn done(&mut self, tag: usize, op: DiskOp) {
            self.0.push((tag, op.result));
        }
    }

    fn write(at: u64) -> (DiskOp, Vec<Request>) {
        let op = DiskOp::new(DiskOpKind::Write, at, 512, vec![7; 512]);
        let req = Request::Write {
            offset: at,
            data: Arc::from(&op.buf[..]),
            fua: false,
        };
        (op, vec![req])
    }

    fn queued(st: &Stream) -> Vec<&'static str> {
        st.to_send
            .iter()
            .map(|&k| match st.parts.get(k).map(|p| &p.req) {
                Some(Request::Write { .. }) => "write",
                Some(Request::Read { .. }) => "read",
                Some(Request::Flush) => "flush",
                _ => "other",
            })
            .collect()
    }

    /// The requests given, once; those answered.
    struct Given(Vec<DiskOp>, Vec<DiskOp>);

    impl RequestFeed for Given {
        fn take(&mut self, _: usize, _: usize, out: &mut Vec<(usize, DiskOp)>) {
            out.extend(self.0.drain(..).enumerate());
        }
        fn done(&mut self, _: usize, op: DiskOp) {
            self.1.push(op);
        }
    }

    /// `path` served as export "disk" by ferry's NBD server on 127.0.0.1; its address.
    fn serve(path: &std::path::Path) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let export = ferry_nbd::export::RawFileExport::open(path, false).unwrap();
        let provider = ferry_nbd::export::StaticProvider::new().with("disk", Arc::new(export));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                ferry_nbd::server::serve(l, Arc::new(provider), None)
                    .await
                    .unwrap();
            });
        });
        addr
    }

    #[test]
    fn requests_the_device_meant_for_guest_memory_go_through_a_buffer() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestAddress};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let addr = serve(&path);
        let mut disk = NbdDisk::open(
            &format!("nbd://{addr}/disk"),
            false,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let data: Vec<u8> = (0..128u32 << 10)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        mem.write_slice(&data[..64 << 10], GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(&data[64 << 10..], GuestAddress(0x40000))
            .unwrap();
        // A write from two pieces of guest memory, as the device parses one for an image file
        // (the disk it had when it asked), then a read of it into guest memory.
        let mut w = DiskOp::new(DiskOpKind::Write, 1 << 19, 128 << 10, Vec::new());
        w.guest = vec![(0x10000, 64 << 10), (0x40000, 64 << 10)];
        let mut feed = Given(vec![w], Vec::new());
        disk.serve_stream(&mut feed, &mem);
        assert_eq!(feed.1.len(), 1, "the write was answered");
        assert!(feed.1[0].result.is_ok(), "{:?}", feed.1[0].result);
        let mut on_disk = vec![0u8; 128 << 10];
        file.read_exact_at(&mut on_disk, 1 << 19).unwrap();
        assert!(on_disk == data, "the guest's data is on the disk");

        let mut r = DiskOp::new(DiskOpKind::Read, 1 << 19, 128 << 10, Vec::new());
        r.guest = vec![(0x80000, 128 << 10)];
        let mut feed = Given(vec![r], Vec::new());
        disk.serve_stream(&mut feed, &mem);
        let r = &feed.1[0];
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            r.guest.is_empty() && r.buf == data,
            "the read is in its buffer, for the device to copy into the guest"
        );
    }

    #[test]
    fn a_flush_goes_out_once_the_writes_taken_before_it_are_answered() {
        let mut st = Stream::default();
        let mut feed = Answers::default();
        let (w, reqs) = write(0);
        st.add(0, w, reqs);
        let read = DiskOp::new(DiskOpKind::Read, 4096, 512, vec![0; 512]);
        st.add(
            1,
            read,
            vec![Request::Read {
                offset: 4096,
                len: 512,
            }],
        );
        st.add(
            2,
            DiskOp::new(DiskOpKind::Flush, 0, 0, Vec::new()),
            vec![Request::Flush],
        );
        let (w, reqs) = write(8192);
        st.add(3, w, reqs);
        assert_eq!(queued(&st), ["write", "read", "write"], "the flush waits");
        st.to_send.clear();
        // The read answered: the flush still waits for the first write.
        st.answered(1, Answer::Data(vec![5; 512]), &mut feed);
        assert!(st.to_send.is_empty());
        st.answered(0, Answer::Done, &mut feed);
        assert_eq!(
            queued(&st),
            ["flush"],
            "the write after the flush does not hold it"
        );
        let flush = st.to_send[0];
        st.answered(flush, Answer::Done, &mut feed);
        st.answered(2, Answer::Done, &mut feed);
        let tags: Vec<usize> = feed.0.iter().map(|a| a.0).collect();
        assert_eq!(tags, [1, 0, 2, 3], "each answered as it finished");
        assert!(feed.0.iter().all(|a| a.1.is_ok()));
        assert_eq!((st.ops.live(), st.parts.live(), st.bytes), (0, 0, 0));
    }

    #[test]
    fn after_a_lost_connection_every_unanswered_request_goes_again_or_fails_whole() {
        let mut st = Stream::default();
        let mut feed = Answers::default();
        // A 1 MiB read in two chunks, and a write.
        let read = DiskOp::new(DiskOpKind::Read, 0, 1 << 20, vec![0; 1 << 20]);
        let half = 1u32 << 19;
        st.add(
            0,
            read,
            vec![
                Request::Read {
                    offset: 0,
                    len: half,
                },
                Request::Read {
                    offset: u64::from(half),
                    len: half,
                },
            ],
        );
        let (w, reqs) = write(1 << 20);
        st.add(1, w, reqs);
        st.to_send.clear();
        // The first chunk came back, then the connection went.
        st.answered(0, Answer::Data(vec![9; half as usize]), &mut feed);
        assert!(feed.0.is_empty(), "half a read is not an answer");
        st.lost = true;
        let gen = st.gen;
        st.resend_all();
        assert!(!st.lost);
        assert_eq!(st.gen, gen + 1);
        assert_eq!(queued(&st), ["read", "write"], "only what was not answered");
        assert!(st
            .to_send
            .iter()
            .all(|&k| st.parts.get(k).unwrap().gen == st.gen));
        // Past the stall limit: both fail, the half-read too.
        st.fail_all(libc::EIO, &mut feed);
        assert_eq!(feed.0.len(), 2);
        assert!(feed
            .0
            .iter()
            .all(|(_, r)| r.as_ref().unwrap_err().raw_os_error() == Some(libc::EIO)));
        assert_eq!((st.ops.live(), st.parts.live(), st.bytes), (0, 0, 0));
    }
}
