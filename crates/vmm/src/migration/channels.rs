//! Pre-copy's memory on several connections (protocol version 6, like QEMU's multifd): one
//! thread per connection reads, compresses and writes the pages dealt to it, so one core's
//! worth of TLS or lz4 no longer bounds the move.
//!
//! Pages are dealt out by 2 MiB chunk: a page always goes on the same connection, so its
//! versions arrive in the order they were sent and each connection's delta cache holds the
//! copies its own deltas are made against. No ordering is needed between connections until
//! pre-copy ends: then each connection says `ChannelDone`, and the destination answers the
//! main connection's last `RoundEnd` only once all of them have landed.
//!
//! A connection that breaks fails the move (the guest runs on here), as a broken main
//! connection does in pre-copy: the pages it had in flight may or may not have landed, and
//! sending its whole share again on another one would cost more than starting over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferry_migration::protocol::{self, ChannelInfo, Command, ProtocolError};
use ferry_migration::receiver::{self, LandError};
use vm_memory::{Bytes, GuestAddress};

use super::compress::{Compressor, Totals};
use super::send::SendError;
use super::transport::Transport;
use crate::memory::{self, GuestMemory};

/// Pages are dealt to connections in chunks of this many bytes (a power of two).
const CHUNK_SHIFT: u32 = 21;
/// Messages queued for a connection's thread beyond the one it is writing.
const QUEUE: usize = 1;

/// What a connection's thread hands back once done: its compressor, and the connection itself.
/// The connection stays open until the move ends: closing it now, with the destination's TLS
/// session tickets unread in its receive queue, would reset it, and a reset can throw away
/// what the destination has not read yet.
type Done = (Option<Compressor>, Transport);

enum Job {
    Pages(Vec<u64>),
    /// A pre-copy round ended (the compressor decides whether deltas go on).
    EndRound,
}

/// What a connection's thread shares with the sender while it runs.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    /// Pages written.
    pages: AtomicU64,
    /// Its compressor's totals.
    comp: Mutex<Totals>,
    /// Why it failed, if it did.
    error: Mutex<Option<String>>,
    /// Batches given to it and not yet written.
    queued: std::sync::atomic::AtomicUsize,
}

struct Lane {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<Result<Done, SendError>>>,
    shared: Arc<Shared>,
    socket: std::net::TcpStream,
    batch: Vec<u64>,
}

/// The memory connections of one move, while pre-copy runs.
pub(super) struct Channels {
    lanes: Vec<Lane>,
    /// Pages dealt out so far (the destination counts those it landed).
    dispatched: u64,
}

/// What is needed to open the connections.
pub(super) struct Open<'a> {
    pub to: &'a str,
    pub tls: Option<&'a super::transport::MigrationTls>,
    pub migration_id: &'a str,
    pub cap: Option<Arc<Mutex<super::transport::Pacer>>>,
    pub compression: ferry_api::Compression,
    pub delta_cache_mib: u64,
    pub peer_version: u32,
}

impl Channels {
    /// Open `n` memory connections and say hello on each (the caller then sends `Channels`
    /// on the main connection and waits for its Ack).
    pub fn open(n: u32, o: &Open<'_>, mem: &GuestMemory) -> Result<Channels, SendError> {
        let mut lanes = Vec::with_capacity(n as usize);
        for index in 0..n {
            let mut t = super::send::connect(o.to, super::send::CONNECT_TIMEOUT, o.tls)?;
            // The cap is the link's: all connections of the move share it.
            t.share_cap(o.cap.clone());
            let hello = ChannelInfo {
                migration_id: o.migration_id.into(),
                recovery_ms: None,
                index: Some(index),
            };
            protocol::write_frame(&mut t, Command::MemoryChannel, &protocol::json(&hello))?;
            std::io::Write::flush(&mut t).map_err(ProtocolError::from)?;
            let comp = Compressor::new(
                o.compression,
                o.delta_cache_mib,
                mem,
                o.peer_version,
                u64::from(n),
            );
            let socket = t.socket().map_err(ProtocolError::from)?;
            let shared = Arc::new(Shared::default());
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let thread = std::thread::Builder::new()
                .name(format!("migrate-mem{index}"))
                .spawn({
                    let (mem, shared) = (mem.clone(), shared.clone());
                    move || {
                        let r = lane(t, &mem, comp, rx, &shared);
                        if let Err(e) = &r {
                            *shared.error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(crate::vm::error_chain(e));
                        }
                        r
                    }
                })
                .map_err(|e| SendError::Vm(format!("start a memory connection's thread: {e}")))?;
            lanes.push(Lane {
                jobs: Some(tx),
                thread: Some(thread),
                shared,
                socket,
                batch: Vec::with_capacity(protocol::MAX_PAGES_PER_MESSAGE),
            });
        }
        Ok(Channels {
            lanes,
            dispatched: 0,
        })
    }

    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// The first connection that failed, if one did: the move's real cause when the main
    /// connection then fails too (the destination closes it when a memory connection breaks).
    pub fn failure(&self) -> Option<SendError> {
        self.lanes.iter().enumerate().find_map(|(i, l)| {
            let e = l.shared.error.lock().unwrap_or_else(|e| e.into_inner());
            e.clone().map(|why| SendError::ChannelBroken {
                index: i as u32,
                why,
            })
        })
    }

    /// Deal `pages` out to the connections; full messages go at once.
    pub fn put(&mut self, pages: &[u64]) -> Result<(), SendError> {
        let n = self.lanes.len() as u64;
        self.dispatched += pages.len() as u64;
        for &gpa in pages {
            let i = ((gpa >> CHUNK_SHIFT) % n) as usize;
            self.lanes[i].batch.push(gpa);
            if self.lanes[i].batch.len() == protocol::MAX_PAGES_PER_MESSAGE {
                self.flush_lane(i)?;
            }
        }
        Ok(())
    }

    fn send(&mut self, i: usize, job: Job) -> Result<(), SendError> {
        let lane = &mut self.lanes[i];
        lane.shared.queued.fetch_add(1, Ordering::SeqCst);
        let sent = lane.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if sent {
            return Ok(());
        }
        lane.shared.queued.fetch_sub(1, Ordering::SeqCst);
        // The thread ended: it failed, and says why when joined.
        lane.jobs = None;
        Err(self.join(i).err().unwrap_or(SendError::ChannelBroken {
            index: i as u32,
            why: "it stopped".into(),
        }))
    }

    fn flush_lane(&mut self, i: usize) -> Result<(), SendError> {
        if self.lanes[i].batch.is_empty() {
            return Ok(());
        }
        let b = std::mem::replace(
            &mut self.lanes[i].batch,
            Vec::with_capacity(protocol::MAX_PAGES_PER_MESSAGE),
        );
        self.send(i, Job::Pages(b))
    }

    /// Send what is dealt but not yet sent.
    pub fn flush(&mut self) -> Result<(), SendError> {
        (0..self.lanes.len()).try_for_each(|i| self.flush_lane(i))
    }

    /// A round ended: flush, and let each compressor know.
    pub fn end_round(&mut self) -> Result<(), SendError> {
        self.flush()?;
        (0..self.lanes.len()).try_for_each(|i| self.send(i, Job::EndRound))
    }

    /// Pages dealt out so far.
    pub fn dispatched(&self) -> u64 {
        self.dispatched
    }

    /// Send what is dealt and wait until every connection wrote all it was given: the end of
    /// a round, so that the round's time and bytes are those of its pages, as on one connection.
    pub fn settle(&mut self) -> Result<(), SendError> {
        self.flush()?;
        let busy = |l: &Lane| {
            l.thread.as_ref().is_some_and(|t| !t.is_finished())
                && l.shared.queued.load(Ordering::SeqCst) > 0
        };
        while self.lanes.iter().any(busy) {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Send what is dealt, then wait (at most `max`) until every connection wrote all it was
    /// given and at most `below` bytes of each are still on their way: what the pause would
    /// otherwise wait behind.
    pub fn drain(&mut self, below: u64, max: std::time::Duration) -> Result<(), SendError> {
        self.flush()?;
        let start = std::time::Instant::now();
        let busy = |l: &Lane| {
            l.thread.as_ref().is_some_and(|t| !t.is_finished())
                && (l.shared.queued.load(Ordering::SeqCst) > 0
                    || super::transport::unacked(&l.socket).is_some_and(|n| n > below))
        };
        while self.lanes.iter().any(busy) && start.elapsed() < max {
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Bytes written on all memory connections so far.
    pub fn sent(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.shared.sent.load(Ordering::Relaxed))
            .sum()
    }

    /// The compressors' totals, summed.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for l in &self.lanes {
            t.add(&l.shared.comp.lock().unwrap_or_else(|e| e.into_inner()));
        }
        t
    }

    /// Pages written on all memory connections so far: over a round, with its length, what a
    /// page takes to go with the connections side by side (sharing this host's cores with the
    /// guest, as they do).
    pub fn pages_written(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.shared.pages.load(Ordering::Relaxed))
            .sum()
    }

    fn join(&mut self, i: usize) -> Result<Done, SendError> {
        let lane = &mut self.lanes[i];
        lane.jobs = None;
        match lane.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(|e| SendError::ChannelBroken {
                index: i as u32,
                why: crate::vm::error_chain(&e),
            }),
            Some(Err(_)) => Err(SendError::ChannelBroken {
                index: i as u32,
                why: "its thread panicked".into(),
            }),
            None => Err(SendError::ChannelBroken {
                index: i as u32,
                why: "it stopped".into(),
            }),
        }
    }

    /// End pre-copy on every connection: send what is left, then `ChannelDone`; wait for the
    /// threads. Returns the compressors (to fold their totals into the report), the
    /// connections (to close once the move is over) and the bytes they sent.
    pub fn finish(mut self) -> Result<(Vec<Compressor>, Vec<Transport>, u64), SendError> {
        self.flush()?;
        let (mut comps, mut links) = (Vec::new(), Vec::new());
        for i in 0..self.lanes.len() {
            let (c, t) = self.join(i)?;
            comps.extend(c);
            links.push(t);
        }
        Ok((comps, links, self.sent()))
    }
}

impl Drop for Channels {
    /// On failure or cancel: close every connection at once (the destination sees the end)
    /// and wait for the threads.
    fn drop(&mut self) {
        for l in &mut self.lanes {
            if l.thread.is_some() {
                let _ = l.socket.shutdown(std::net::Shutdown::Both);
            }
            l.jobs = None;
        }
        for l in &mut self.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// One connection's thread: write each batch it is given, then `ChannelDone` once the sender
/// hangs up its queue.
fn lane(
    mut t: Transport,
    mem: &GuestMemory,
    mut comp: Option<Compressor>,
    jobs: Receiver<Job>,
    shared: &Shared,
) -> Result<Done, SendError> {
    let mut payload = Vec::new();
    for job in jobs {
        match job {
            Job::Pages(batch) => {
                match comp.as_mut() {
                    Some(c) => c.write(&batch, mem, &mut t)?,
                    None => {
                        protocol::encode_pages_with(&batch, &mut payload, |gpa, slot| {
                            mem.read_slice(slot, GuestAddress(gpa))
                                .map_err(|e| SendError::Memory(memory::MemoryError::Access(e)))
                        })?;
                        protocol::write_frame(&mut t, Command::Pages, &payload)?;
                    }
                }
                shared.sent.store(t.bytes_sent(), Ordering::Relaxed);
                shared
                    .pages
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                if let Some(c) = &comp {
                    *shared.comp.lock().unwrap_or_else(|e| e.into_inner()) = c.totals();
                }
            }
            Job::EndRound => {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                if let Some(c) = comp.as_mut() {
                    c.end_round();
                }
            }
        }
    }
    protocol::write_frame(&mut t, Command::ChannelDone, &[])?;
    std::io::Write::flush(&mut t).map_err(ProtocolError::from)?;
    shared.sent.store(t.bytes_sent(), Ordering::Relaxed);
    Ok((comp, t))
}

// The destination's side.

type Arrivals = mpsc::Receiver<(Transport, ChannelInfo)>;

/// Wait (at most `wait`) for the source's `count` memory connections, each index once, and
/// return them in index order.
pub(super) fn gather(
    found: &Arrivals,
    count: u32,
    wait: std::time::Duration,
) -> Result<Vec<Transport>, super::receive::ReceiveError> {
    let deadline = std::time::Instant::now() + wait;
    let mut conns: Vec<Option<Transport>> = (0..count).map(|_| None).collect();
    let mut got = 0;
    while got < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok((t, hello)) = found.recv_timeout(left) else {
            return Err(super::receive::ReceiveError::NoMemoryChannels {
                want: count,
                got,
                wait,
            });
        };
        match hello.index.and_then(|i| conns.get_mut(i as usize)) {
            Some(slot @ None) => {
                *slot = Some(t);
                got += 1;
            }
            _ => {
                let e = ProtocolError::Malformed(
                    Command::MemoryChannel,
                    format!(
                        "index {:?} (of {count}) is out of range or came twice",
                        hello.index
                    ),
                );
                return Err(e.into());
            }
        }
    }
    Ok(conns.into_iter().flatten().collect())
}

type Landed = (receiver::Landed, u64);
type LandingThread = JoinHandle<Result<Landed, String>>;

/// Pre-copy's memory connections on the destination: one thread each lands its pages.
pub(super) struct Landing {
    /// Each connection's thread, and its socket (to close it on failure).
    threads: Vec<(Option<LandingThread>, std::net::TcpStream)>,
    failed: Arc<Mutex<Option<String>>>,
    /// Pages landed so far, on all of them.
    pages: Arc<AtomicU64>,
}

impl Landing {
    /// Start landing what comes on `conns`. A connection that fails closes `main`, so the
    /// receive loop ends at once and [`Landing::failure`] says why.
    pub fn start(
        conns: Vec<Transport>,
        mem: &GuestMemory,
        main: std::net::TcpStream,
    ) -> Result<Landing, super::receive::ReceiveError> {
        let failed = Arc::new(Mutex::new(None));
        let pages = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (i, t) in conns.into_iter().enumerate() {
            let socket = t.socket().map_err(ProtocolError::from)?;
            let main = main.try_clone().map_err(ProtocolError::from)?;
            let h = std::thread::Builder::new()
                .name(format!("migrate-land{i}"))
                .spawn({
                    let (mem, failed, pages) = (mem.clone(), failed.clone(), pages.clone());
                    move || {
                        let r = land_lane(t, &mem, &pages);
                        if let Err(e) = &r {
                            let why = format!("memory connection {i} from the source: {e}");
                            tracing::warn!("{why}");
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(why);
                            let _ = main.shutdown(std::net::Shutdown::Both);
                        }
                        r
                    }
                })
                .map_err(super::receive::ReceiveError::Postcopy)?;
            threads.push((Some(h), socket));
        }
        Ok(Landing {
            threads,
            failed,
            pages,
        })
    }

    /// Pages landed so far.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Wait (at most `max`) until `want` pages have landed, or one connection failed.
    pub fn wait_for(&self, want: u64, max: std::time::Duration) {
        let start = std::time::Instant::now();
        while self.pages() < want && self.failure().is_none() && start.elapsed() < max {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Why a memory connection failed, if one did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait until every connection said `ChannelDone`; where their pages landed, and how many.
    pub fn finish(mut self) -> Result<Landed, super::receive::ReceiveError> {
        let mut all = receiver::Landed::default();
        let mut pages = 0;
        for (i, (h, _)) in self.threads.iter_mut().enumerate() {
            let r = h
                .take()
                .map(|h| h.join())
                .unwrap_or_else(|| Ok(Err("gone".into())));
            match r {
                Ok(Ok((l, n))) => {
                    all.merge(&l);
                    pages += n;
                }
                Ok(Err(e)) => {
                    return Err(super::receive::ReceiveError::MemoryChannel(
                        self.failure()
                            .unwrap_or_else(|| format!("memory connection {i}: {e}")),
                    ))
                }
                Err(_) => {
                    return Err(super::receive::ReceiveError::MemoryChannel(format!(
                        "memory connection {i}: its thread panicked"
                    )))
                }
            }
        }
        Ok((all, pages))
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        for (h, s) in &mut self.threads {
            if h.is_some() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        for (h, _) in &mut self.threads {
            if let Some(h) = h.take() {
                let _ = h.join();
            }
        }
    }
}

/// One memory connection: land `Pages`/`Packed` until `ChannelDone`.
fn land_lane(mut t: Transport, mem: &GuestMemory, count: &AtomicU64) -> Result<Landed, String> {
    let mem = super::receive::Mem(mem.clone());
    let mut landed = receiver::Landed::default();
    let mut unpacked = Vec::new();
    let mut pages = 0;
    loop {
        let f = protocol::read_frame(&mut t)
            .map_err(|e| crate::vm::error_chain(&e))?
            .ok_or("it ended before ChannelDone")?;
        match f.command {
            Command::Pages | Command::Packed => {
                let n = receiver::land_frame(&f, &mem, &mut landed, &mut unpacked).map_err(
                    |e| match e {
                        LandError::Stream(e) => crate::vm::error_chain(&e),
                        LandError::Memory(e) => format!("cannot write guest memory: {e}"),
                    },
                )?;
                pages += n;
                count.fetch_add(n, Ordering::Relaxed);
            }
            Command::ChannelDone => return Ok((landed, pages)),
            c => return Err(format!("unexpected {c:?} on a memory connection")),
        }
    }
}
