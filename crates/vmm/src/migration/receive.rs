//! The destination side of a live migration: accept one connection, take the guest's memory
//! and state, and run the guest once the source commits (and only if this side gets every disk
//! lock and records the commit first). Anything wrong before that (a bad or truncated stream, a
//! cut connection, a cancel) ends here with an error, the move recorded as aborted, and nothing
//! running.
//!
//! The listener stays open afterwards: a source that lost the last acknowledgement asks here
//! (`Query`) what became of the move, for as long as this VMM runs the guest. A receiver that
//! had restored the state when its source went away keeps answering "aborted" for a while before
//! it exits, so a source in doubt learns it at once.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::{Outcome, VmConfig};
use ferry_migration::outcome::{outcome_str, OutcomeRecord};
use ferry_migration::protocol::{
    self, AckInfo, ChannelInfo, Command, Frame, ProtocolError, QueryInfo, ReceiverState, RoundInfo,
    StartInfo, PAGE_SIZE,
};
use ferry_migration::receiver::{self, Committed, Destination, PageMemory, Push, Received};

use crate::fail::crash_point;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::postcopy::{self, Incoming};
use super::transport::{MigrationTls, Transport};
use crate::memory::{self, GuestMemory};
use crate::snapshot::Snapshot;
use crate::vm::{RestoreOverrides, RunOptions, Vm, VmError};

/// Errors receiving a VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no source connected within {0:?}")]
    NoSource(Duration),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the source sent {got} bytes of memory for a VM of {expected}")]
    MemorySize { expected: u64, got: u64 },
    #[error("the migrated state is invalid")]
    State(#[source] ferry_migration::EnvelopeError),
    #[error("cannot take the VM's disks at commit")]
    Disks(#[source] Box<VmError>),
    #[error("this receiver waits for move {expected}, not {got:?}")]
    WrongMove { expected: String, got: String },
    #[error(transparent)]
    Outcome(#[from] ferry_migration::OutcomeError),
    #[error("move {0} was already settled as aborted on this host; refusing to run the guest")]
    AlreadyAborted(String),
    #[error("refused Commit (failure injected by FERRY_FAIL_AT=refuse-commit)")]
    InjectedRefusal,
    #[error("cannot start post-copy here")]
    Postcopy(#[source] std::io::Error),
    #[error("the source's post-copy page connection did not arrive within {0:?}")]
    NoPageChannel(Duration),
    #[error("{0}")]
    MemoryChannel(String),
    #[error("{got} of the source's {want} memory connections arrived within {wait:?}")]
    NoMemoryChannels { want: u32, got: u32, wait: Duration },
    #[error("the connection broke ({first}) and the source did not come back within {limit:?}")]
    NotRecovered { limit: Duration, first: String },
}

/// Where the receiver listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Bind this `host:port`.
    Addr(String),
    /// A listening TCP socket inherited from the parent (the host daemon binds it).
    Fd(i32),
}

/// How to receive.
#[derive(Clone, Default)]
pub struct ReceiveOptions {
    /// Give up if no source connects within this long.
    pub accept_timeout: Option<Duration>,
    /// Accept only this move (the host daemon names it); any otherwise.
    pub expect_id: Option<String>,
    /// The move's outcome record (a file the host daemon also reads); kept in memory if unset.
    pub record: Option<PathBuf>,
    /// Mutual TLS with the source (which must be the host named there).
    pub tls: Option<MigrationTls>,
}

/// How long a receiver whose source vanished after the state transfer keeps answering queries.
const LINGER: Duration = Duration::from_secs(30);

fn ack(t: &mut Transport, ok: bool, message: String) -> Result<(), ProtocolError> {
    let a = AckInfo {
        ok,
        message,
        protocol_version: None,
    };
    protocol::write_frame(t, Command::Ack, &protocol::json(&a))
}

/// How long the destination waits for its memory connections to catch up before the pause.
const CHANNEL_CATCH_UP: Duration = Duration::from_secs(1);
/// How long the destination waits for the source's page connection once post-copy begins.
const CHANNEL_WAIT: Duration = Duration::from_secs(10);

/// Accept the source's memory connections and its post-copy page connection on `listener`
/// (answering queries meanwhile) until `stop` or the page connection came; memory connections
/// go to `memory`, the page connection to `found`.
fn accept_page_channel(
    listener: TcpListener,
    tls: Option<MigrationTls>,
    record: OutcomeRecord,
    id: String,
    stop: Arc<AtomicBool>,
    found: mpsc::Sender<(Transport, ChannelInfo)>,
    memory: mpsc::Sender<(Transport, ChannelInfo)>,
) {
    while !stop.load(Ordering::SeqCst) {
        let s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_for_connection(&listener, 10);
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = s.set_nonblocking(false);
        let Ok(mut t) = Transport::server(s, tls.as_ref()) else {
            continue;
        };
        t.set_io_timeout(Duration::from_secs(3));
        let Ok(Some(f)) = protocol::read_frame(&mut t) else {
            continue;
        };
        match f.command {
            Command::Query => {
                answer_query(&mut t, &f, &record);
            }
            Command::PostcopyChannel => match protocol::parse::<ChannelInfo>(&f) {
                Ok(c) if c.migration_id == id => {
                    t.set_io_timeout(super::transport::IO_TIMEOUT);
                    let _ = found.send((t, c));
                    return;
                }
                _ => tracing::warn!("refused a page connection for another move"),
            },
            Command::MemoryChannel => match protocol::parse::<ChannelInfo>(&f) {
                Ok(c) if c.migration_id == id => {
                    t.set_io_timeout(super::transport::IO_TIMEOUT);
                    let _ = memory.send((t, c));
                }
                _ => tracing::warn!("refused a memory connection for another move"),
            },
            _ => {}
        }
    }
}

/// A post-copy under way on this side.
struct PostcopyRx {
    incoming: Arc<Incoming>,
    faults: Option<std::thread::JoinHandle<Result<(), ProtocolError>>>,
    relinks: Arc<Relinks>,
}

/// Post-copy recovery on the destination: the two connections to the source, each of which
/// the listener's thread replaces when the source makes it again.
struct Relinks {
    id: String,
    /// How long a broken connection is waited for; zero: not at all.
    limit: Duration,
    main: Link,
    pages: Link,
    /// Every page is here and the source was told.
    done: AtomicBool,
}

/// One post-copy connection: the socket in use, and where its replacement arrives.
struct Link {
    name: &'static str,
    current: Mutex<Option<TcpStream>>,
    tx: mpsc::Sender<Transport>,
    rx: Mutex<mpsc::Receiver<Transport>>,
}

impl Link {
    fn new(name: &'static str) -> Link {
        let (tx, rx) = mpsc::channel();
        Link {
            name,
            current: Mutex::new(None),
            tx,
            rx: Mutex::new(rx),
        }
    }

    /// `t` is the connection in use now.
    fn track(&self, t: &Transport) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = t.socket().ok();
    }

    /// Close the connection in use (which may hang on a silent link).
    fn close(&self) {
        if let Some(old) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A replacement arrived: close the one it replaces and hand it over.
    fn arrived(&self, t: Transport) {
        self.close();
        let _ = self.tx.send(t);
    }

    /// Wait up to `limit` for the replacement of this broken connection; `None` past it, or
    /// when `give_up` says so.
    fn wait(
        &self,
        limit: Duration,
        e: &ProtocolError,
        give_up: impl Fn() -> bool,
    ) -> Option<Transport> {
        if limit.is_zero() {
            return None;
        }
        eprintln!(
            "ferry: post-copy: the {} connection to the source broke ({e}); the guest waits \
             for its missing pages; waiting up to {} s for the source to reconnect",
            self.name,
            limit.as_secs()
        );
        let deadline = Instant::now() + limit;
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        while Instant::now() < deadline && !give_up() {
            if let Ok(t) = rx.recv_timeout(Duration::from_millis(100)) {
                self.track(&t);
                eprintln!(
                    "ferry: post-copy: the source reconnected ({} connection)",
                    self.name
                );
                return Some(t);
            }
        }
        None
    }
}

impl Relinks {
    fn new(id: String, limit: Duration) -> Relinks {
        Relinks {
            id,
            limit,
            main: Link::new("main"),
            pages: Link::new("page"),
            done: AtomicBool::new(false),
        }
    }
}

impl Drop for PostcopyRx {
    /// A receive that fails before the guest runs here stops the fault thread too.
    fn drop(&mut self) {
        self.incoming.stop.store(true, Ordering::SeqCst);
    }
}

fn valid_page(mem: &GuestMemory, gpa: u64) -> bool {
    gpa.is_multiple_of(PAGE_SIZE as u64)
        && memory::region_of(mem, gpa).is_some_and(|r| {
            use vm_memory::GuestMemoryRegion;
            gpa + PAGE_SIZE as u64 <= r.start_addr().0 + r.len()
        })
}

fn bind(listen: &Listen) -> Result<TcpListener, ReceiveError> {
    let name = match listen {
        Listen::Addr(a) => a.clone(),
        Listen::Fd(fd) => format!("inherited socket {fd}"),
    };
    let err = |source| ReceiveError::Listen {
        addr: name.clone(),
        source,
    };
    let l = match listen {
        Listen::Addr(a) => TcpListener::bind(a).map_err(err)?,
        Listen::Fd(fd) => crate::host_io::inherited_listener(*fd).map_err(err)?,
    };
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Answer one `Query` on `t` from `record` (`id`: the move this receiver knows, if any).
fn answer_query(t: &mut Transport, f: &Frame, record: &OutcomeRecord) -> Option<String> {
    let q: QueryInfo = protocol::parse(f).ok()?;
    let answer = match record.get(&q.migration_id) {
        Ok(Some(o)) => outcome_str(o),
        _ => protocol::ANSWER_UNKNOWN,
    };
    // The version too: a forecast asks before it probes.
    let a = AckInfo {
        ok: true,
        message: answer.into(),
        protocol_version: Some(protocol::PROTOCOL_VERSION),
    };
    let _ = protocol::write_frame(t, Command::Ack, &protocol::json(&a));
    Some(q.migration_id)
}

/// After the commit: answer queries about the move on `listener`, and in post-copy take the
/// source's replacements of broken connections.
fn serve_after_commit(
    listener: &TcpListener,
    record: &OutcomeRecord,
    tls: Option<&MigrationTls>,
    relinks: Option<Arc<Relinks>>,
) {
    let _ = listener.set_nonblocking(false);
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let Ok(mut t) = Transport::server(s, tls) else {
            continue;
        };
        t.set_io_timeout(Duration::from_secs(3));
        let Ok(Some(f)) = protocol::read_frame(&mut t) else {
            continue;
        };
        match (f.command, &relinks) {
            (Command::Query, _) => {
                answer_query(&mut t, &f, record);
            }
            (Command::PostcopyResume | Command::PostcopyChannel, Some(r))
                if protocol::parse::<ChannelInfo>(&f).is_ok_and(|c| c.migration_id == r.id) =>
            {
                t.set_io_timeout(super::transport::IO_TIMEOUT);
                let done = r.done.load(Ordering::SeqCst);
                match f.command {
                    Command::PostcopyResume if done => finish_again(t),
                    Command::PostcopyResume => r.main.arrived(t),
                    _ if done => {}
                    _ => r.pages.arrived(t),
                }
            }
            (Command::PostcopyResume, _) => {
                let _ = ack(
                    &mut t,
                    false,
                    "no post-copy of that move is under way here".into(),
                );
            }
            _ => {}
        }
    }
}

/// A source that missed the last acknowledgement of a finished post-copy resumes it: nothing
/// is missing; acknowledge its `PostcopyDone` again.
fn finish_again(mut t: Transport) {
    let none = protocol::encode_bitmap(&[]);
    if protocol::write_frame(&mut t, Command::PostcopyMissing, &none).is_err() || t.flush().is_err()
    {
        return;
    }
    if let Ok(Some(f)) = protocol::read_frame(&mut t) {
        if f.command == Command::PostcopyDone {
            let _ = ack(&mut t, true, String::new());
        }
    }
}

/// A forecast measures the link: count what arrives (and put it in fresh memory, as pages
/// are), answer each empty `Probe` with the count so far, until the source hangs up.
fn answer_probe(t: &mut Transport, first: Frame) {
    t.set_io_timeout(Duration::from_secs(5));
    let mut got = first.payload.len() as u64;
    let mut f = first;
    loop {
        if f.command != Command::Probe {
            return;
        }
        if f.payload.is_empty() && (ack(t, true, got.to_string()).is_err() || t.flush().is_err()) {
            return;
        }
        f = match protocol::read_frame(t) {
            Ok(Some(f)) => f,
            _ => return,
        };
        // Do what a move does with pages: copy them into memory never touched before (a
        // fresh mapping each time; the allocator would hand back the same pages).
        into_fresh_memory(&f.payload);
        got += f.payload.len() as u64;
    }
}

/// Answer forecasts on `listener` for `time`, receiving nothing: a host daemon runs this for
/// a `ferry move --check`, so the source's VMM can measure the link (its `Query` for the
/// protocol version, then `Probe`s on as many connections as the move would use) without a
/// receiving VMM, a migration slot or a move. Anything else is hung up on.
pub fn answer_forecasts(listener: TcpListener, tls: Option<MigrationTls>, time: Duration) {
    let deadline = Instant::now() + time;
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        wait_for_connection(&listener, left.as_millis().min(200) as i32);
        let Ok((s, peer)) = listener.accept() else {
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut t = match Transport::server(s, tls.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                tracing::info!("forecast: refused a connection from {peer}: {e}");
                continue;
            }
        };
        match protocol::read_frame(&mut t) {
            Ok(Some(f)) if f.command == Command::Query => {
                let a = AckInfo {
                    ok: true,
                    message: protocol::ANSWER_UNKNOWN.into(),
                    protocol_version: Some(protocol::PROTOCOL_VERSION),
                };
                let _ = protocol::write_frame(&mut t, Command::Ack, &protocol::json(&a));
                let _ = t.flush();
            }
            Ok(Some(f)) if f.command == Command::Probe => {
                if probes.load(Ordering::SeqCst) >= protocol::MAX_CHANNELS as usize {
                    continue;
                }
                probes.fetch_add(1, Ordering::SeqCst);
                let count = probes.clone();
                let spawned = std::thread::Builder::new()
                    .name("forecast-probe".into())
                    .spawn(move || {
                        answer_probe(&mut t, f);
                        count.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    probes.fetch_sub(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
    }
}

/// Wait up to `ms` for a connection on the (non-blocking) `listener`: returns as soon as one
/// is there, rather than sleeping a fixed time between tries.
fn wait_for_connection(listener: &TcpListener, ms: i32) {
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Copy `data` into a fresh anonymous mapping, then drop it.
fn into_fresh_memory(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // SAFETY: a new private anonymous mapping of `data.len()` bytes, written only within its
    // length and unmapped before returning; nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return;
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), data.len());
        libc::munmap(p, data.len());
    }
}

/// Wait on `listen` for one incoming VM and return it running.
pub fn receive(
    listen: &Listen,
    ropts: &ReceiveOptions,
    overrides: &RestoreOverrides,
    mut opts: RunOptions,
    mut log: impl FnMut(&str),
) -> Result<Vm, VmError> {
    let listener = bind(listen)?;
    // The serial sockets this host gives the VM exist from now on, not from the switch-over:
    // a console attached early sees every byte the guest writes here.
    if opts.ports.is_none() {
        let here = [&overrides.serial, &overrides.serial2];
        let ports = crate::serial_backend::Ports::open(here.into_iter().flatten())
            .map_err(|e| VmError::Devices(e.into()))?;
        opts.ports = Some(std::sync::Arc::new(ports));
    }
    let record = match &ropts.record {
        Some(p) => OutcomeRecord::File(p.clone()),
        None => OutcomeRecord::in_memory(),
    };
    log(&format!(
        "waiting for a VM on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let started = Instant::now();
    let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (mut t, first) = loop {
        match listener.accept() {
            Ok((s, peer)) => {
                let _ = s.set_nonblocking(false);
                let mut t = match Transport::server(s, ropts.tls.as_ref()) {
                    Ok(t) => t,
                    Err(e) => {
                        // Not the expected host (or no TLS at all): refuse it, keep waiting.
                        log(&format!("refused a connection from {peer}: {e}"));
                        continue;
                    }
                };
                let first = protocol::read_frame(&mut t)
                    .and_then(|f| f.ok_or(ProtocolError::Truncated))
                    .map_err(ReceiveError::from);
                match first {
                    // A source in doubt about an earlier move asks; this receiver knows none.
                    Ok(f) if f.command == Command::Query => {
                        answer_query(&mut t, &f, &record);
                        continue;
                    }
                    Ok(f) if f.command == Command::Probe => {
                        // A forecast for several memory connections probes on as many at
                        // once: answer each in its own thread, a few at a time.
                        if probes.load(Ordering::SeqCst) < protocol::MAX_CHANNELS as usize {
                            probes.fetch_add(1, Ordering::SeqCst);
                            let count = probes.clone();
                            let spawned = std::thread::Builder::new()
                                .name("migrate-probe".into())
                                .spawn(move || {
                                    answer_probe(&mut t, f);
                                    count.fetch_sub(1, Ordering::SeqCst);
                                });
                            if spawned.is_err() {
                                // The thread never ran (the probe's connection closed with
                                // it): the forecast fails and says so; nothing else moves.
                                probes.fetch_sub(1, Ordering::SeqCst);
                                tracing::warn!("could not start a thread to answer a probe");
                            }
                        } else {
                            answer_probe(&mut t, f);
                        }
                        continue;
                    }
                    Ok(f) if f.command == Command::PostcopyResume => {
                        let _ = ack(
                            &mut t,
                            false,
                            "this receiver has no post-copy under way".into(),
                        );
                        continue;
                    }
                    Ok(f) => {
                        log(&format!("source {peer} connected"));
                        break (t, f);
                    }
                    Err(e) => {
                        let _ = ack(&mut t, false, crate::vm::error_chain(&e));
                        return Err(e.into());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if ropts.accept_timeout.is_some_and(|t| started.elapsed() > t) {
                    return Err(
                        ReceiveError::NoSource(ropts.accept_timeout.unwrap_or_default()).into(),
                    );
                }
                if crate::vm::stop_requested() {
                    return Err(ReceiveError::NoSource(started.elapsed()).into());
                }
                wait_for_connection(&listener, 20);
            }
            Err(source) => {
                return Err(ReceiveError::Listen {
                    addr: format!("{listen:?}"),
                    source,
                }
                .into())
            }
        }
    };
    let mut rx = Receiving {
        record,
        id: None,
        restored: false,
        channel: None,
        memory: None,
    };
    let result = receive_on(
        &mut t, first, &listener, ropts, &mut rx, overrides, opts, &mut log,
    );
    if let Some((stop, h, _)) = rx.channel.take() {
        stop.store(true, Ordering::SeqCst);
        let _ = h.join();
    }
    match result {
        Ok((mut vm, pc)) => {
            let relinks = pc.as_ref().map(|p| p.relinks.clone());
            if let Some(pc) = pc {
                let fail = vm.failure_sender();
                let mem = vm.memory().clone();
                let done = vm.memory_complete_flag();
                done.store(false, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("postcopy-rx".into())
                    .spawn(move || match finish_postcopy(t, pc, &mem) {
                        Ok(()) => done.store(true, Ordering::SeqCst),
                        Err(e) => {
                            let msg = format!(
                                "post-copy lost its source ({}): the guest cannot go on without \
                                 the pages still there; stopping it",
                                crate::vm::error_chain(&e)
                            );
                            tracing::error!("{msg}");
                            fail(msg);
                        }
                    });
                if let Err(e) = spawned {
                    return Err(ReceiveError::Postcopy(e).into());
                }
            }
            let record = rx.record.clone();
            if let Ok(t) = std::thread::Builder::new()
                .name("migrate-query".into())
                .spawn({
                    let tls = ropts.tls.clone();
                    move || serve_after_commit(&listener, &record, tls.as_ref(), relinks)
                })
            {
                vm.keep_query_server(t);
            }
            Ok(vm)
        }
        Err(e) => {
            // Tell the source why, if it still listens.
            let _ = ack(&mut t, false, crate::vm::error_chain(&e));
            drop(t);
            if let Some(id) = rx.id.clone() {
                // Whatever comes later, this host will not run this move's guest.
                if let Err(r) = rx.record.decide(&id, Outcome::Aborted, "destination VMM") {
                    tracing::warn!("recording move {id} as aborted: {r}");
                }
                if rx.restored {
                    // Commit may have been on its way: let a source in doubt learn the outcome.
                    log(&format!(
                        "move {id} aborted; answering the source's queries for up to {LINGER:?}"
                    ));
                    let deadline = Instant::now() + LINGER;
                    let l = listener;
                    let _ = l.set_nonblocking(true);
                    let record = rx.record.clone();
                    let mut answered = false;
                    while Instant::now() < deadline && !answered {
                        match l.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nonblocking(false);
                                if let Ok(mut qt) = Transport::server(s, ropts.tls.as_ref()) {
                                    qt.set_io_timeout(Duration::from_secs(3));
                                    if let Ok(Some(f)) = protocol::read_frame(&mut qt) {
                                        if f.command == Command::Query {
                                            answered = answer_query(&mut qt, &f, &record)
                                                .is_some_and(|q| q == id);
                                        }
                                    }
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                wait_for_connection(&l, 20)
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                }
            }
            Err(e)
        }
    }
}

/// Where the source's post-copy page connection arrives, with its hello.
type PageChannels = mpsc::Receiver<(Transport, ChannelInfo)>;

/// What the receive loop learned that matters after it ends.
struct Receiving {
    record: OutcomeRecord,
    /// The move's id, once Start named it.
    id: Option<String>,
    /// Whether the VM's state was restored here (Commit could follow any moment).
    restored: bool,
    /// The thread waiting for a post-copy page connection: its stop flag, handle, and where
    /// the connection arrives.
    channel: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>, PageChannels)>,
    /// Where the source's memory connections arrive (version 6).
    memory: Option<PageChannels>,
}

/// The rest of a post-copy, after the guest started here: place what the source pushes until
/// it says everything was sent and every page is here.
fn finish_postcopy(mut t: Transport, mut pc: PostcopyRx, mem: &GuestMemory) -> Result<(), VmError> {
    // The data area of a `Packed` message, decompressed.
    let mut unpacked = Vec::new();
    let started = Instant::now();
    let mut state = ReceiverState::Postcopy;
    let relinks = pc.relinks.clone();
    relinks.main.track(&t);
    // The source pushes without a break until it is done: a silent link shows within this.
    t.set_io_timeout(Duration::from_secs(10));
    let result = (|| -> Result<(), VmError> {
        loop {
            let f = match protocol::read_frame(&mut t)
                .and_then(|f| f.ok_or(ProtocolError::Truncated))
            {
                Ok(f) => f,
                Err(e @ (ProtocolError::Io(_) | ProtocolError::Truncated)) => {
                    let e = match e {
                        ProtocolError::Io(io)
                            if matches!(
                                io.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            ProtocolError::Io(std::io::Error::other("nothing arrived for 10 s"))
                        }
                        e => e,
                    };
                    let faults_gone = || pc.faults.as_ref().is_none_or(|f| f.is_finished());
                    let Some(nt) = relinks.main.wait(relinks.limit, &e, faults_gone) else {
                        return Err(if relinks.limit.is_zero() {
                            ReceiveError::from(e).into()
                        } else {
                            ReceiveError::NotRecovered {
                                limit: relinks.limit,
                                first: crate::vm::error_chain(&e),
                            }
                            .into()
                        });
                    };
                    t = nt;
                    t.set_io_timeout(Duration::from_secs(10));
                    // What is still missing here, so the source sends it (again).
                    protocol::write_frame(
                        &mut t,
                        Command::PostcopyMissing,
                        &protocol::encode_bitmap(&pc.incoming.left.words()),
                    )
                    .and_then(|_| t.flush().map_err(ProtocolError::from))
                    .map_err(ReceiveError::from)?;
                    pc.incoming.recoveries.fetch_add(1, Ordering::Relaxed);
                    state = ReceiverState::Postcopy;
                    continue;
                }
                Err(e) => return Err(ReceiveError::from(e).into()),
            };
            match receiver::push_step(&mut state, &f).map_err(ReceiveError::from)? {
                Push::Pages => {
                    let n = pc
                        .incoming
                        .place_all(&f, mem, &mut unpacked)
                        .map_err(ReceiveError::from)?;
                    pc.incoming.pushed.fetch_add(n as u64, Ordering::Relaxed);
                }
                Push::Done => break,
            }
        }
        // A page fetched on demand may still be on its way.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pc.incoming.left.count() > 0 {
            if Instant::now() > deadline || pc.faults.as_ref().is_none_or(|f| f.is_finished()) {
                return Err(ReceiveError::Protocol(ProtocolError::Malformed(
                    Command::PostcopyDone,
                    format!("{} pages never arrived", pc.incoming.left.count()),
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })();
    if result.is_err() {
        // Never close the userfaultfd of a guest whose pages are missing: closing it would let
        // its waiting accesses go on with zero-filled pages. The VM is stopped instead.
        std::mem::forget(pc.incoming.clone());
    }
    pc.incoming.stop.store(true, Ordering::SeqCst);
    if result.is_err() {
        // The fault thread may hang on a silent page connection: end it now.
        relinks.pages.close();
    }
    let faults = pc.faults.take().map(|f| f.join());
    result?;
    if let Some(Ok(Err(e))) = faults {
        return Err(ReceiveError::from(e).into());
    }
    pc.incoming.finish();
    relinks.done.store(true, Ordering::SeqCst);
    // A lost acknowledgement is not an error: the source resumes, and learns it is done.
    if let Err(e) = ack(&mut t, true, String::new()) {
        tracing::warn!(
            "post-copy: the last acknowledgement did not go out ({e}); every page is here"
        );
    }
    let i = &pc.incoming;
    let recovered = match i.recoveries.load(Ordering::Relaxed) {
        0 => String::new(),
        n => format!(", recovered from {n} broken connection(s)"),
    };
    // Said where the receiver's other progress lines go (its `log` stays with the caller).
    eprintln!(
        "ferry: post-copy complete after {:.2?}: {} pages fetched on demand (longest wait {:.1} ms), {} pushed{recovered}",
        started.elapsed(),
        i.fetched.load(Ordering::Relaxed),
        i.longest_wait_us.load(Ordering::Relaxed) as f64 / 1000.0,
        i.pushed.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Guest memory as the receive loop writes it (`ferry_migration::receiver`).
#[derive(Clone)]
pub(super) struct Mem(pub GuestMemory);

impl PageMemory for Mem {
    type Error = GuestMemoryError;

    fn holds(&self, gpa: u64) -> bool {
        valid_page(&self.0, gpa)
    }

    fn end(&self) -> u64 {
        postcopy::memory_end(&self.0)
    }

    fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.0.write_slice(data, GuestAddress(gpa))
    }

    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.0.read_slice(buf, GuestAddress(gpa))
    }
}

/// The VMM's side of the receive loop: what each step of the stream does to this host (the
/// loop itself, and every check of the bytes, is `ferry_migration::receiver::receive`).
struct Arriving<'a> {
    /// The main connection's socket, to cut it (failure injection) and hand to the memory
    /// connections (which close it when they fail).
    socket: std::net::TcpStream,
    listener: &'a TcpListener,
    ropts: &'a ReceiveOptions,
    rx: &'a mut Receiving,
    overrides: &'a RestoreOverrides,
    opts: RunOptions,
    log: &'a mut dyn FnMut(&str),
    config: Option<VmConfig>,
    mem: Option<Mem>,
    /// The KVM VM, made while pages arrive.
    prepared: Option<crate::kvm_vm::KvmVm>,
    vm: Option<Vm>,
    post: Option<PostcopyRx>,
    /// Post-copy prepared before the pause: stale pages dropped, memory registered.
    prepared_pc: Option<Arc<Incoming>>,
    /// Pre-copy's memory connections, while they run.
    lanes: Option<super::channels::Landing>,
}

impl From<ProtocolError> for VmError {
    fn from(e: ProtocolError) -> Self {
        ReceiveError::Protocol(e).into()
    }
}

impl From<ferry_migration::EnvelopeError> for VmError {
    fn from(e: ferry_migration::EnvelopeError) -> Self {
        ReceiveError::State(e).into()
    }
}

impl From<GuestMemoryError> for VmError {
    fn from(e: GuestMemoryError) -> Self {
        memory::MemoryError::Access(e).into()
    }
}

impl Arriving<'_> {
    fn guest_memory(&self) -> Result<&GuestMemory, ReceiveError> {
        self.mem
            .as_ref()
            .map(|m| &m.0)
            .ok_or(ReceiveError::Protocol(ProtocolError::Truncated))
    }
}

impl Destination for Arriving<'_> {
    type Error = VmError;
    type Memory = Mem;
    type State = Snapshot;

    fn start(&mut self, info: &StartInfo) -> Result<(), VmError> {
        let id = if info.migration_id.is_empty() {
            super::send::new_migration_id()
        } else {
            info.migration_id.clone()
        };
        if let Some(want) = &self.ropts.expect_id {
            if *want != id {
                return Err(ReceiveError::WrongMove {
                    expected: want.clone(),
                    got: info.migration_id.clone(),
                }
                .into());
            }
        }
        if self.rx.record.get(&id).map_err(ReceiveError::from)? == Some(Outcome::Aborted) {
            return Err(ReceiveError::AlreadyAborted(id).into());
        }
        self.rx.id = Some(id.clone());
        if info.protocol_version >= protocol::POSTCOPY_VERSION {
            // The source may go post-copy: take its page connection whenever it comes.
            let l = self
                .listener
                .try_clone()
                .map_err(|source| ReceiveError::Listen {
                    addr: "the migration listener".into(),
                    source,
                })?;
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx_ch) = mpsc::channel();
            let (mem_tx, mem_rx) = mpsc::channel();
            let h = std::thread::Builder::new()
                .name("migrate-pages-accept".into())
                .spawn({
                    let (tls, record, stop) =
                        (self.ropts.tls.clone(), self.rx.record.clone(), stop.clone());
                    move || accept_page_channel(l, tls, record, id, stop, tx, mem_tx)
                })
                .map_err(ReceiveError::Postcopy)?;
            self.rx.channel = Some((stop, h, rx_ch));
            self.rx.memory = Some(mem_rx);
        }
        Ok(())
    }

    fn config(&mut self, c: VmConfig, memory_bytes: u64) -> Result<(), VmError> {
        let c = self.overrides.apply(c)?;
        if c.memory_mib << 20 != memory_bytes {
            return Err(ReceiveError::MemorySize {
                expected: c.memory_mib << 20,
                got: memory_bytes,
            }
            .into());
        }
        let m = memory::create_guest_memory(memory_bytes)?;
        // The KVM VM is made now, while pages arrive, not during the pause.
        self.prepared = Some(Vm::prepare(&m)?);
        self.mem = Some(Mem(m));
        (self.log)(&format!(
            "receiving a {} MiB, {}-vCPU VM",
            c.memory_mib, c.vcpus
        ));
        self.config = Some(c);
        Ok(())
    }

    fn memory(&self) -> Option<&Mem> {
        self.mem.as_ref()
    }

    fn channels(&mut self, count: u32) -> Result<(), VmError> {
        let m = self.guest_memory()?;
        let found = self
            .rx
            .memory
            .as_ref()
            .ok_or(ReceiveError::Protocol(ProtocolError::Truncated))?;
        let conns = super::channels::gather(found, count, CHANNEL_WAIT)?;
        let main = self.socket.try_clone().map_err(ProtocolError::from)?;
        self.lanes = Some(super::channels::Landing::start(conns, m, main)?);
        (self.log)(&format!("pre-copy's pages come on {count} connections"));
        Ok(())
    }

    fn round_end(&mut self, r: &RoundInfo, got: &mut Received) -> Result<(), VmError> {
        if r.ack {
            if r.channels_done {
                // Pre-copy ends: everything on the memory connections lands first.
                if let Some(l) = self.lanes.take() {
                    let (their, n) = l.finish()?;
                    got.landed.merge(&their);
                    got.pages += n;
                }
            } else if let (Some(l), Some(want)) = (self.lanes.as_ref(), r.channel_pages) {
                // Before the pause: let them catch up too.
                l.wait_for(want, CHANNEL_CATCH_UP);
            }
        } else {
            let more = self.lanes.as_ref().map_or(0, |l| l.pages());
            (self.log)(&format!(
                "round {}: {} pages received so far, {} dirty",
                r.round,
                got.pages + more,
                r.pages
            ));
        }
        Ok(())
    }

    fn postcopy_prepare(&mut self, words: Vec<u64>) -> Result<(), VmError> {
        let t_prep = Instant::now();
        let i = Incoming::new(self.guest_memory()?).map_err(ReceiveError::Postcopy)?;
        let n = i.discard(&words).map_err(ReceiveError::Postcopy)?;
        i.register().map_err(ReceiveError::Postcopy)?;
        tracing::debug!(
            "post-copy prepared: {n} stale pages dropped, memory registered in {:?}",
            t_prep.elapsed()
        );
        self.prepared_pc = Some(Arc::new(i));
        Ok(())
    }

    fn postcopy_start(&mut self, words: Vec<u64>) -> Result<(), VmError> {
        let m = self.guest_memory()?.clone();
        let channel = self
            .rx
            .channel
            .as_ref()
            .ok_or(ReceiveError::Protocol(ProtocolError::Truncated))?;
        let (pc, hello) = channel
            .2
            .recv_timeout(CHANNEL_WAIT)
            .map_err(|_| ReceiveError::NoPageChannel(CHANNEL_WAIT))?;
        let relinks = Arc::new(Relinks::new(
            hello.migration_id.clone(),
            Duration::from_millis(hello.recovery_ms.unwrap_or(0)),
        ));
        relinks.pages.track(&pc);
        let t_prep = Instant::now();
        let incoming = match self.prepared_pc.take() {
            Some(i) => i,
            None => {
                let i = Incoming::new(&m).map_err(ReceiveError::Postcopy)?;
                i.register().map_err(ReceiveError::Postcopy)?;
                Arc::new(i)
            }
        };
        let late = incoming.discard(&words).map_err(ReceiveError::Postcopy)?;
        tracing::debug!(
            "post-copy: {late} more stale pages dropped in {:?}",
            t_prep.elapsed()
        );
        (self.log)(&format!(
            "post-copy: {} pages follow after the guest starts here",
            incoming.left.count()
        ));
        let faults = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn({
                let (i, r) = (incoming.clone(), relinks.clone());
                move || {
                    let stop = || i.stop.load(Ordering::SeqCst);
                    let relink = |e: &ProtocolError| r.pages.wait(r.limit, e, stop);
                    let r = i.serve_faults(pc, &m, relink);
                    if let Err(e) = &r {
                        tracing::error!("post-copy: fetching pages failed: {e}");
                    }
                    r
                }
            })
            .map_err(ReceiveError::Postcopy)?;
        self.post = Some(PostcopyRx {
            incoming,
            faults: Some(faults),
            relinks,
        });
        Ok(())
    }

    fn state(&mut self, snap: Snapshot) -> Result<(), VmError> {
        let (Some(c), Some(m), Some(k)) =
            (self.config.take(), self.mem.take(), self.prepared.take())
        else {
            return Err(ReceiveError::Protocol(ProtocolError::Truncated).into());
        };
        let paused = RunOptions {
            paused: true,
            ..self.opts.clone()
        };
        let t_restore = Instant::now();
        let Snapshot {
            vm: vm_state,
            vcpus,
            devices,
            ..
        } = snap;
        self.vm = Some(Vm::restore_into(
            k,
            c,
            m.0,
            (vm_state, vcpus, devices),
            false,
            paused,
        )?);
        tracing::debug!("restored the VM in {:?}", t_restore.elapsed());
        self.rx.restored = true;
        crash_point("after-state");
        Ok(())
    }

    fn commit(&mut self, _: Committed) -> Result<(), VmError> {
        let v = self
            .vm
            .as_mut()
            .ok_or(ReceiveError::Protocol(ProtocolError::Truncated))?;
        let id = self.rx.id.clone().unwrap_or_default();
        crash_point("on-commit");
        if crate::fail::fail_point("refuse-commit") {
            return Err(ReceiveError::InjectedRefusal.into());
        }
        v.take_disks()
            .map_err(|e| ReceiveError::Disks(Box::new(e)))?;
        // The moment of hand-over: from here this host owns the guest.
        match self
            .rx
            .record
            .decide(&id, Outcome::Committed, "destination VMM")
            .map_err(ReceiveError::from)?
        {
            Outcome::Committed => {}
            Outcome::Aborted => {
                v.release_disks();
                return Err(ReceiveError::AlreadyAborted(id).into());
            }
        }
        v.resume()?;
        crash_point("after-resume");
        v.announce_macs();
        (self.log)("the guest runs here now");
        Ok(())
    }

    fn read_failed(&mut self, e: ProtocolError) -> VmError {
        // A memory connection that failed closes this one: say why it did.
        match self.lanes.as_ref().and_then(|l| l.failure()) {
            Some(why) => ReceiveError::MemoryChannel(why).into(),
            None => ReceiveError::from(e).into(),
        }
    }

    fn before_final_ack(&mut self) {
        if crate::fail::fail_point("drop-ack") {
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn receive_on(
    t: &mut Transport,
    first: Frame,
    listener: &TcpListener,
    ropts: &ReceiveOptions,
    rx: &mut Receiving,
    overrides: &RestoreOverrides,
    opts: RunOptions,
    log: &mut impl FnMut(&str),
) -> Result<(Vm, Option<PostcopyRx>), VmError> {
    let socket = t.socket().map_err(ProtocolError::from)?;
    let mut d = Arriving {
        socket,
        listener,
        ropts,
        rx,
        overrides,
        opts,
        log,
        config: None,
        mem: None,
        prepared: None,
        vm: None,
        post: None,
        prepared_pc: None,
        lanes: None,
    };
    receiver::receive(t, Some(first), &mut d)?;
    let vm =
        d.vm.take()
            .ok_or(ReceiveError::Protocol(ProtocolError::Truncated))?;
    Ok((vm, d.post.take()))
}
