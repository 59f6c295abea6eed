//! The source side of a live migration: pre-copy rounds, switch-over, two-phase hand-over.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Connecting
//!     Connecting --> Memory: Start, Config acked
//!     Memory --> Memory: round (send dirty pages)
//!     Memory --> Switchover: rest fits the downtime budget (or forced)
//!     Switchover --> Committing: paused, last pages + state sent, destination restored
//!     Committing --> Done: destination says running
//!     Committing --> Failed: destination refuses Commit
//!     Committing --> InDoubt: no answer to Commit
//!     InDoubt --> Done: outcome record says committed
//!     InDoubt --> Failed: outcome record says aborted
//!     Connecting --> Failed
//!     Memory --> Failed: error, timeout, cancel
//!     Switchover --> Failed
//!     Failed --> [*]: disks re-locked, guest resumed here
//!     Done --> [*]: VMM exits
//! ```
//!
//! In doubt the guest stays paused here: the destination may run it, or may never. Every second
//! the sender asks the destination (a `Query` connection) for the move's outcome record, and an
//! API client that read the record (the host daemon, or an admin) may settle it with
//! `MigrateResolve`. Nothing else ends it: resuming on a guess could run the guest twice, and
//! exiting on a guess could lose it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::Outcome;
use ferry_api::{
    MigrateSettings, MigrationMode, MigrationPhase, MigrationProgress, OnTimeout, Response,
    ResponseBody, VmConfig,
};
use ferry_migration::protocol::{
    self, AckInfo, ChannelInfo, Command, ProtocolError, QueryInfo, RoundInfo, StartInfo,
};
use ferry_migration::Envelope;
use vm_memory::{Bytes, GuestAddress};

use super::forecast::{Next, PAGE_WIRE};
use super::transport::{MigrationTls, Transport};
use super::{CallReply, MigrationCall};
use crate::event::Event;
use crate::kvm_vm::KvmVm;
use crate::memory::{self, GuestMemory};

/// Pre-copy gives up (or forces, per settings) after this many rounds.
pub(super) const MAX_ROUNDS: u32 = 40;
/// The most of a vCPU's time auto-converge takes away, in percent.
pub(super) const MAX_THROTTLE: u32 = 95;
/// `auto` goes post-copy when the guest dirties memory at this share of the link's speed or
/// more: pre-copy would then take over three times as long as post-copy.
pub(super) const POSTCOPY_RATIO: f64 = 2.0 / 3.0;
/// A rest this small goes in the pause: not worth another round, nor post-copy. Sending it
/// costs about what any switch-over costs anyway (saving and restoring the state, the commit:
/// the forecast's `FIXED_PAUSE_MS`), and an idle guest's always-dirty pages (stacks, counters)
/// make a rest that more rounds barely shrink, while a round of a few ms measures a dirty rate
/// that means nothing (13 pages in 3 ms read as 68% of a 200 Mbit/s link once, and sent 52 KiB
/// by post-copy).
pub(super) const SMALL_PAUSE_MS: f64 = 5.0;
/// Before the pause, wait until at most this much of what was sent is still on its way.
const DRAINED_BYTES: u64 = 128 << 10;
/// ... but no longer than this.
const MAX_DRAIN: Duration = Duration::from_secs(1);
/// Post-copy's background push keeps at most this much on its way, so a page the guest waits
/// for (on the other connection, through the same link) is not queued behind megabytes.
const PUSH_IN_FLIGHT: u64 = 1 << 20;
/// Pages per background `Pages` message in post-copy.
const PUSH_BATCH: usize = 128;
/// Post-copy: a link that takes nothing for this long counts as broken (and is made again).
const POSTCOPY_SILENCE: Duration = Duration::from_secs(10);
/// How long connecting to the destination may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Post-copy recovery: how long one attempt to reach the destination again may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// While a round is under way, look at the dirty log this often, to skip pages that will have
/// to go again anyway (about 1.6 ms per GiB when all is dirty).
pub(super) const RESYNC_EVERY: Duration = Duration::from_millis(100);

/// Everything the sending thread needs.
pub struct SendCtx {
    pub settings: MigrateSettings,
    pub config: VmConfig,
    pub memory: GuestMemory,
    pub vm: Arc<KvmVm>,
    pub events: Sender<Event>,
    pub progress: Arc<Mutex<MigrationProgress>>,
    pub cancel: Arc<AtomicBool>,
    /// Set by `MigrateResolve` while the migration is in doubt.
    pub resolve: Arc<Mutex<Option<Outcome>>>,
    pub follow: Option<Sender<Response>>,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot reach the destination {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("dirty-page tracking failed")]
    Memory(#[from] memory::MemoryError),
    #[error("cancelled")]
    Cancelled,
    #[error("did not converge: the guest dirties memory faster than the link sends it ({0})")]
    NotConverged(String),
    #[error("the VM could not {0}")]
    Vm(String),
    #[error("cannot encode the VM state")]
    Encode(#[source] ferry_migration::EnvelopeError),
    #[error("the destination speaks migration protocol {0}, which has no post-copy (it needs {need}); use --mode precopy, or update ferry there", need = protocol::POSTCOPY_VERSION)]
    NoPostcopy(u32),
    /// Post-copy broke after the guest began to run on the destination.
    #[error("post-copy broke after the guest started on the destination, with {left} of its pages still here")]
    PostcopyBroken {
        left: u64,
        #[source]
        source: Box<SendError>,
    },
    /// The commit's answer was lost and the destination's record says it never ran the guest.
    #[error("{0}; the destination's outcome record says aborted")]
    CommitAborted(String),
    #[error("the connection broke ({first}) and could not be made again within {limit:?} (last try: {last})")]
    NotRecovered {
        limit: Duration,
        first: String,
        last: String,
    },
    #[error("memory connection {index} to the destination broke: {why}")]
    ChannelBroken { index: u32, why: String },
    #[error("the page connection to the destination broke")]
    PageChannelBroken,
    #[error("the link took nothing for {0:?}")]
    Silent(Duration),
}

struct Outgoing<'a> {
    ctx: &'a SendCtx,
    t: Transport,
    start: Instant,
    payload: Vec<u8>,
    paused: bool,
    commit_sent: bool,
    last_push: Instant,
    /// Pages found dirty in the last round, sent during the pause.
    pending: Option<memory::DirtyBitmap>,
    /// Pages found dirty again while a round is under way: they go next round, so the round
    /// skips them (no point sending a page twice in a row).
    redirtied: Option<memory::DirtyBitmap>,
    last_sync: Instant,
    tls: Option<MigrationTls>,
    /// The protocol version the destination speaks (from its answer to Start).
    peer_version: u32,
    /// Bytes sent on main connections that broke and were replaced (post-copy recovery).
    sent_before: u64,
    /// Pre-copy with a version-5 destination and compression not off: pages go `Packed`.
    comp: Option<super::compress::Compressor>,
    /// Pre-copy's memory connections (`--channels`), while pre-copy runs.
    lanes: Option<super::channels::Channels>,
    /// Bytes the memory connections sent, once they are closed.
    lanes_sent: u64,
    /// Their compressors, once they are closed: dropped after the move, since freeing their
    /// delta caches (hundreds of MiB) would take milliseconds of the pause.
    /// Their connections too: closed once the move is over (see `channels::Done`).
    retired: (Vec<super::compress::Compressor>, Vec<Transport>),
}

impl SendCtx {
    fn call(&self, call: MigrationCall) -> Result<CallReply, SendError> {
        let (tx, rx) = mpsc::channel();
        let what = format!("{call:?}");
        self.events
            .send(Event::Migration(call, tx))
            .map_err(|_| SendError::Vm(format!("{what}: VM gone")))?;
        rx.recv()
            .map_err(|_| SendError::Vm(format!("{what}: VM gone")))?
            .map_err(|e| SendError::Vm(format!("{what}: {e}")))
    }

    fn update(&self, f: impl FnOnce(&mut MigrationProgress)) -> MigrationProgress {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        p.clone()
    }
}

impl Outgoing<'_> {
    fn push_progress(&mut self, force: bool) {
        if !force && self.last_push.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last_push = Instant::now();
        let (elapsed, sent) = (self.start.elapsed().as_millis() as u64, self.sent());
        let p = self.ctx.update(|p| {
            p.elapsed_ms = elapsed;
            p.bytes_sent = sent;
        });
        if let Some(f) = &self.ctx.follow {
            let _ = f.send(Response::Ok(ResponseBody::Migration(p)));
        }
    }

    /// Bytes sent so far, on every connection.
    fn sent(&self) -> u64 {
        self.sent_before
            + self.t.bytes_sent()
            + self.lanes_sent
            + self.lanes.as_ref().map_or(0, |l| l.sent())
    }

    /// Open `--channels` memory connections, if asked for and the destination takes them.
    fn open_lanes(&mut self) -> Result<(), SendError> {
        let s = &self.ctx.settings;
        let n = s.channels.min(protocol::MAX_CHANNELS);
        if n < 2 {
            return Ok(());
        }
        if self.peer_version < protocol::CHANNELS_VERSION {
            tracing::info!(
                "one connection for memory: the destination speaks protocol {}, without memory connections",
                self.peer_version
            );
            return Ok(());
        }
        let o = super::channels::Open {
            to: &s.to,
            tls: self.tls.as_ref(),
            migration_id: &s.migration_id,
            cap: self.t.cap(),
            compression: s.compression,
            delta_cache_mib: s.delta_cache_mib,
            peer_version: self.peer_version,
        };
        let lanes = super::channels::Channels::open(n, &o, &self.ctx.memory)?;
        protocol::write_frame(
            &mut self.t,
            Command::Channels,
            &protocol::json(&protocol::ChannelsInfo { count: n }),
        )?;
        self.expect_ack()?;
        tracing::debug!("pre-copy's pages go on {n} memory connections");
        self.ctx.update(|p| p.channels = n);
        self.lanes = Some(lanes);
        Ok(())
    }

    /// End pre-copy on the memory connections: what they still hold goes, and the destination
    /// says when all of it landed (what follows on the main connection lands after it).
    fn close_lanes(&mut self) -> Result<(), SendError> {
        let Some(lanes) = self.lanes.take() else {
            return Ok(());
        };
        let n = lanes.count();
        let (comps, links, sent) = lanes.finish()?;
        self.lanes_sent = sent;
        if let Some(c) = self.comp.as_mut() {
            for other in &comps {
                c.absorb(other);
            }
        }
        self.retired = (comps, links);
        let r = RoundInfo {
            round: u32::MAX,
            ack: true,
            channels_done: true,
            ..Default::default()
        };
        protocol::write_frame(&mut self.t, Command::RoundEnd, &protocol::json(&r))?;
        self.expect_ack()?;
        tracing::debug!("the {n} memory connections are done");
        Ok(())
    }

    fn check(&self) -> Result<(), SendError> {
        if self.ctx.cancel.load(Ordering::SeqCst) {
            return Err(SendError::Cancelled);
        }
        let s = &self.ctx.settings;
        // With `cancel`, the timeout also ends a round that is still under way; with `force`,
        // the round ends and the switch-over follows.
        if s.on_timeout == OnTimeout::Cancel
            && s.timeout_s > 0
            && self.start.elapsed().as_secs() >= s.timeout_s
        {
            return Err(SendError::NotConverged(format!(
                "timed out after {} s, {:.1} MiB sent",
                s.timeout_s,
                self.sent() as f64 / f64::from(1 << 20)
            )));
        }
        Ok(())
    }

    fn expect_ack(&mut self) -> Result<AckInfo, SendError> {
        match protocol::read_frame(&mut self.t)? {
            Some(f) if f.command == Command::Ack => {
                let a: AckInfo = protocol::parse(&f)?;
                if a.ok {
                    Ok(a)
                } else {
                    Err(ProtocolError::Refused(a.message).into())
                }
            }
            Some(f) => Err(ProtocolError::OutOfOrder {
                got: f.command,
                state: "waiting for Ack",
            }
            .into()),
            None => Err(ProtocolError::Truncated.into()),
        }
    }

    /// One `Pages` message with `batch` (at most 1024 pages) read from guest memory.
    fn write_pages(&mut self, batch: &[u64]) -> Result<(), SendError> {
        let mem = &self.ctx.memory;
        if let Some(c) = self.comp.as_mut() {
            return c.write(batch, mem, &mut self.t);
        }
        protocol::encode_pages_with(batch, &mut self.payload, |gpa, slot| {
            mem.read_slice(slot, GuestAddress(gpa))
                .map_err(|e| SendError::Memory(memory::MemoryError::Access(e)))
        })?;
        protocol::write_frame(&mut self.t, Command::Pages, &self.payload)?;
        Ok(())
    }

    /// Send `pages` (guest-physical addresses), in messages of up to 1024 pages.
    fn send_pages(&mut self, pages: impl Iterator<Item = u64>) -> Result<u64, SendError> {
        let mut batch: Vec<u64> = Vec::with_capacity(protocol::MAX_PAGES_PER_MESSAGE);
        let mut count = 0u64;
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            if !self.paused && self.last_sync.elapsed() >= RESYNC_EVERY {
                self.last_sync = Instant::now();
                let d = memory::take_dirty(&self.ctx.vm.fd, &self.ctx.memory)?;
                match &mut self.redirtied {
                    Some(r) => r.merge(&d),
                    None => self.redirtied = Some(d),
                }
            }
            batch.clear();
            let skip = self.redirtied.as_ref().filter(|_| !self.paused);
            batch.extend(
                pages
                    .by_ref()
                    .filter(|g| !skip.is_some_and(|r| r.is_dirty(*g)))
                    .take(protocol::MAX_PAGES_PER_MESSAGE),
            );
            if batch.is_empty() {
                break;
            }
            match self.lanes.as_mut() {
                Some(l) => l.put(&batch)?,
                None => self.write_pages(&batch)?,
            }
            count += batch.len() as u64;
            let n = batch.len() as u64;
            let comp = self.comp.as_ref();
            let lanes = self.lanes.as_ref();
            self.ctx.update(|p| {
                p.pages_sent += n;
                if let Some(l) = lanes {
                    super::compress::Compressor::report_totals(&l.totals(), p);
                } else if let Some(c) = comp {
                    c.report(p);
                }
            });
            self.push_progress(false);
            if !self.paused {
                self.check()?;
            }
        }
        if let Some(l) = self.lanes.as_mut() {
            l.flush()?;
        }
        Ok(count)
    }

    fn run(&mut self) -> Result<f64, SendError> {
        let s = &self.ctx.settings;
        let info = StartInfo {
            protocol_version: protocol::PROTOCOL_VERSION,
            ferry_version: env!("CARGO_PKG_VERSION").into(),
            memory_bytes: memory::total_bytes(&self.ctx.memory),
            migration_id: self.ctx.settings.migration_id.clone(),
        };
        protocol::write_frame(&mut self.t, Command::Start, &protocol::json(&info))?;
        self.peer_version = self
            .expect_ack()?
            .protocol_version
            .unwrap_or(protocol::MIN_PROTOCOL_VERSION);
        let can_postcopy = self.peer_version >= protocol::POSTCOPY_VERSION;
        self.comp = super::compress::Compressor::new(
            s.compression,
            s.delta_cache_mib,
            &self.ctx.memory,
            self.peer_version,
            1,
        );
        if s.mode == MigrationMode::Postcopy && !can_postcopy {
            return Err(SendError::NoPostcopy(self.peer_version));
        }
        protocol::write_frame(
            &mut self.t,
            Command::Config,
            &protocol::json(&self.ctx.config),
        )?;
        self.expect_ack()?;
        self.open_lanes()?;
        self.check()?;

        self.ctx.update(|p| p.phase = MigrationPhase::Memory);
        memory::start_dirty_log(&self.ctx.vm.fd, &self.ctx.memory)?;
        // First pass: every page that may hold data; never-written memory is zero there too.
        let all = memory::populated_pages(&self.ctx.memory)?;
        let mut round_start = Instant::now();
        let mut round_bytes_start = self.sent();
        let mut round_pages_start = 0;
        self.send_pages(all.into_iter())?;
        let mut round = 0u32;
        let deadline = (s.timeout_s > 0).then(|| self.start + Duration::from_secs(s.timeout_s));
        let mut converged = true;
        let mut prev_dirty: Option<u64> = None;
        let mut throttle = 0u32;
        let mut postcopy: Option<String> = None;
        let mut best_spp = f64::INFINITY;
        loop {
            if let Some(l) = self.lanes.as_mut() {
                // The round ends when its pages are written, not when they are dealt out.
                l.settle()?;
            }
            let secs = round_start.elapsed().as_secs_f64().max(1e-3);
            let bw = (self.sent() - round_bytes_start) as f64 / secs; // bytes/s
            let mut dirty = memory::take_dirty(&self.ctx.vm.fd, &self.ctx.memory)?;
            if let Some(r) = self.redirtied.take() {
                dirty.merge(&r);
            }
            self.last_sync = Instant::now();
            let n = dirty.count();
            // What a dirty page takes to go: a page at the link's speed, or, compressed, what
            // the pages of this round took (compressing them included).
            // The first pass's pages are not the dirty ones (those it skipped, or sent before
            // they changed): after it, a dirty page is reckoned a whole page on the wire.
            let spp = match &self.lanes {
                Some(l) => {
                    let pages = l.pages_written() - round_pages_start;
                    (pages >= 256).then(|| secs / pages as f64)
                }
                None => self.comp.as_ref().and_then(|c| c.secs_per_page()),
            }
            .filter(|_| round > 0)
            .unwrap_or(PAGE_WIRE / bw.max(1.0));
            // The pause goes with the guest stopped, so at the best pace a round has shown: a
            // round the guest's vCPUs starved of CPU (two busy vCPUs on a busy host) reads as a
            // slow link, and would make a rest that takes 65 ms look like 2.7 s.
            best_spp = best_spp.min(spp);
            let expected_ms = n as f64 * best_spp * 1000.0;
            self.ctx.update(|p| {
                p.round = round;
                p.dirty_pages = n;
                p.dirty_rate_pps = (n as f64 / secs) as u64;
                p.bandwidth_mbit = bw * 8.0 / 1e6;
                p.expected_downtime_ms = expected_ms;
            });
            self.push_progress(true);
            protocol::write_frame(
                &mut self.t,
                Command::RoundEnd,
                &protocol::json(&RoundInfo {
                    round,
                    pages: n,
                    ..Default::default()
                }),
            )?;
            let facts = super::forecast::RoundFacts {
                round,
                n,
                prev: prev_dirty,
                expected_ms,
                ratio: n as f64 / secs * spp,
                bw,
                throttle,
                out_of_time: deadline.is_some_and(|d| Instant::now() > d),
            };
            let next = super::forecast::decide(s, can_postcopy, &facts);
            match next {
                Next::SwitchOver => {
                    // What is left goes during the pause.
                    self.resend_later(dirty);
                    break;
                }
                Next::Postcopy(why) => {
                    postcopy = Some(why);
                    self.resend_later(dirty);
                    break;
                }
                Next::OutOfTime(why) => match s.on_timeout {
                    OnTimeout::Cancel => return Err(SendError::NotConverged(why)),
                    OnTimeout::Force => {
                        converged = false;
                        self.resend_later(dirty);
                        break;
                    }
                },
                Next::Continue { throttle: t } => {
                    if t != throttle {
                        throttle = t;
                        self.ctx.call(MigrationCall::Throttle(throttle))?;
                        tracing::debug!(
                            "round {round}: {n} pages still dirty, throttling the guest by {throttle}%"
                        );
                    }
                }
            }
            prev_dirty = Some(n);
            if let Some(c) = self.comp.as_mut() {
                c.end_round();
            }
            if let Some(l) = self.lanes.as_mut() {
                l.end_round()?;
            }
            round += 1;
            round_start = Instant::now();
            round_bytes_start = self.sent();
            round_pages_start = self.lanes.as_ref().map_or(0, |l| l.pages_written());
            self.send_pages(dirty.pages())?;
        }

        if let Some(why) = postcopy {
            // Post-copy goes on the main connection (and its page connection).
            self.close_lanes()?;
            self.note_compression();
            tracing::info!("post-copy: {why}");
            // From here the destination's guest changes its copies: no more deltas. Its
            // background push may still use lz4 (a page fetched on demand goes on the other
            // connection, as it is, and never waits on a compressor).
            self.comp = self.comp.take().map(|c| c.for_postcopy());
            return self.postcopy(why);
        }
        self.ctx.update(|p| {
            p.mode = MigrationMode::Precopy;
            if s.mode == MigrationMode::Auto {
                p.mode_reason = Some(if can_postcopy {
                    "pre-copy converged".into()
                } else {
                    format!(
                        "the destination speaks protocol {}, without post-copy",
                        self.peer_version
                    )
                });
            }
        });

        // Switch-over. First let what is already written reach the destination while the
        // guest still runs: under a slow link the socket and the link's queue hold megabytes,
        // which would otherwise go out during the pause (tens of ms at 1 Gbit/s). Pages
        // dirtied meanwhile join the last set.
        let waited = self
            .t
            .wait_delivered(DRAINED_BYTES, MAX_DRAIN)
            .map_err(ProtocolError::from)?;
        if let Some(l) = self.lanes.as_mut() {
            l.drain(DRAINED_BYTES, MAX_DRAIN)?;
        }
        let caught_up = Instant::now();
        if self.peer_version >= protocol::POSTCOPY_VERSION {
            // Wait until the destination has taken in all of it, not only its kernel: on a
            // fast link it may still be copying megabytes into guest memory.
            let r = RoundInfo {
                round: u32::MAX,
                ack: true,
                channel_pages: self.lanes.as_ref().map(|l| l.dispatched()),
                ..Default::default()
            };
            protocol::write_frame(&mut self.t, Command::RoundEnd, &protocol::json(&r))?;
            self.expect_ack()?;
        }
        tracing::debug!(
            "switch-over: send queue drained in {waited:?}, the destination caught up {:?} later",
            caught_up.elapsed()
        );
        self.check()?;
        self.ctx.update(|p| {
            p.phase = MigrationPhase::Switchover;
            p.converged = converged;
        });
        self.ctx.call(MigrationCall::SyncDisks)?;
        if let Some(c) = self.comp.as_mut() {
            c.end_round(); // the wait above is not a message's time
        }
        if let Some(l) = self.lanes.as_mut() {
            l.end_round()?;
        }
        let pause_at = Instant::now();
        self.ctx.call(MigrationCall::Pause)?;
        self.paused = true;
        let mut last = self
            .pending
            .take()
            .map(|d| d.pages().collect::<Vec<_>>())
            .unwrap_or_default();
        last.extend(memory::take_dirty(&self.ctx.vm.fd, &self.ctx.memory)?.pages());
        last.sort_unstable();
        last.dedup();
        let n_last = last.len();
        self.send_pages(last.into_iter())?;
        tracing::debug!(
            "switch-over: paused, {n_last} last pages sent at {:?}",
            pause_at.elapsed()
        );
        let CallReply::State(state) = self.ctx.call(MigrationCall::SaveState)? else {
            return Err(SendError::Vm("save its state".into()));
        };
        // One more pass after saving device state: anything written while saving goes too.
        let after = memory::take_dirty(&self.ctx.vm.fd, &self.ctx.memory)?;
        self.send_pages(after.pages())?;
        // Every page is in place there before the state that runs on them.
        self.close_lanes()?;
        self.note_compression();
        let bytes = Envelope::MigrationState
            .encode(&*state)
            .map_err(SendError::Encode)?;
        tracing::debug!(
            "switch-over: state saved, {} bytes, at {:?}",
            bytes.len(),
            pause_at.elapsed()
        );
        protocol::write_frame(&mut self.t, Command::State, &bytes)?;
        self.expect_ack()?;
        tracing::debug!(
            "switch-over: destination restored at {:?}",
            pause_at.elapsed()
        );

        // Two-phase hand-over: let go of the disks, then let the destination run. From the
        // moment Commit may have left, only the destination's answer (or its outcome record)
        // says whether it took over.
        self.ctx.call(MigrationCall::ReleaseDisks)?;
        self.ctx.update(|p| p.phase = MigrationPhase::Committing);
        self.commit_sent = true;
        protocol::write_frame(&mut self.t, Command::Commit, &[])?;
        self.expect_ack()?;
        tracing::debug!("switch-over: destination runs at {:?}", pause_at.elapsed());
        Ok(pause_at.elapsed().as_secs_f64() * 1000.0)
    }

    /// Put what compression did in the report.
    fn note_compression(&self) {
        let s = &self.ctx.settings;
        let note = match &self.comp {
            Some(c) => c.note(),
            None if s.compression == ferry_api::Compression::Off => "off".into(),
            None => format!(
                "none (the destination speaks protocol {}, without it)",
                self.peer_version
            ),
        };
        tracing::debug!("compression: {note}");
        self.ctx.update(|p| p.compression_note = Some(note));
    }

    fn resend_later(&mut self, dirty: memory::DirtyBitmap) {
        self.pending = Some(dirty);
    }

    /// Switch over to post-copy: pause, name the pages still to go, let the guest run on the
    /// destination, then serve its faults and push the rest.
    fn postcopy(&mut self, why: String) -> Result<f64, SendError> {
        let to = self.ctx.settings.to.clone();
        self.ctx.update(|p| {
            p.mode = MigrationMode::Postcopy;
            p.mode_reason = Some(why.clone());
            p.converged = true;
        });
        // The page connection, while the guest still runs: its handshake costs no pause.
        let mut pc = connect(&to, CONNECT_TIMEOUT, self.tls.as_ref())?;
        self.say_hello(&mut pc)?;
        // The pages known to come again: the destination drops its stale copies now, while
        // the guest still runs here, not during the pause.
        if let Some(d) = &self.pending {
            let known = super::postcopy::PageSet::of(
                d.pages(),
                super::postcopy::memory_end(&self.ctx.memory),
            );
            protocol::write_frame(
                &mut self.t,
                Command::PostcopyPrepare,
                &protocol::encode_bitmap(&known.words()),
            )?;
            self.expect_ack()?;
        }

        let waited = self
            .t
            .wait_delivered(DRAINED_BYTES, MAX_DRAIN)
            .map_err(ProtocolError::from)?;
        tracing::debug!("post-copy switch-over: send queue drained in {waited:?}");
        self.check()?;
        self.ctx.update(|p| p.phase = MigrationPhase::Switchover);
        self.ctx.call(MigrationCall::SyncDisks)?;
        let pause_at = Instant::now();
        self.ctx.call(MigrationCall::Pause)?;
        self.paused = true;
        let CallReply::State(state) = self.ctx.call(MigrationCall::SaveState)? else {
            return Err(SendError::Vm("save its state".into()));
        };
        tracing::debug!(
            "post-copy switch-over: paused and saved at {:?}",
            pause_at.elapsed()
        );
        let mut left: Vec<u64> = self
            .pending
            .take()
            .map(|d| d.pages().collect())
            .unwrap_or_default();
        left.extend(memory::take_dirty(&self.ctx.vm.fd, &self.ctx.memory)?.pages());
        let set = super::postcopy::PageSet::of(
            left.into_iter(),
            super::postcopy::memory_end(&self.ctx.memory),
        );
        let n_left = set.count();
        // Serve page requests from now on: restoring and resuming the guest there may already
        // touch pages that are still here.
        let out = Arc::new(super::postcopy::Outgoing {
            left: set,
            hint: std::sync::atomic::AtomicU64::new(0),
            requested: std::sync::atomic::AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let words = out.left.words();
        let mut server = self.serve_pages(pc, &out)?;
        let downtime = match self.postcopy_hand_over(&out, &words, state, pause_at, n_left) {
            Ok(d) => d,
            Err(e) => {
                server.stop(&out);
                return Err(e);
            }
        };
        // From here the guest runs there: nothing may resume it here.
        self.ctx.update(|p| {
            p.phase = MigrationPhase::Postcopy;
            p.downtime_ms = Some(downtime);
            p.postcopy_pages_left = n_left;
        });
        self.push_progress(true);
        let recovery = if self.peer_version >= protocol::RECOVERY_VERSION {
            Duration::from_secs(self.ctx.settings.postcopy_recovery_s)
        } else {
            Duration::ZERO
        };
        loop {
            let r = self.push(&out, &server);
            server.stop(&out);
            let broken = |e| SendError::PostcopyBroken {
                left: out.left.count(),
                source: Box::new(e),
            };
            match r {
                Ok(()) => break,
                // A refusal is the destination's word, not a broken link.
                Err(e @ SendError::Protocol(ProtocolError::Refused(_))) => return Err(broken(e)),
                Err(e) if recovery.is_zero() => return Err(broken(e)),
                Err(e) => {
                    let pc = self.reconnect(&out, recovery, &e).map_err(broken)?;
                    out.stop.store(false, Ordering::SeqCst);
                    server = self.serve_pages(pc, &out)?;
                }
            }
        }
        tracing::info!(
            "post-copy done: {} pages on demand, {n_left} in all",
            out.requested.load(Ordering::Relaxed)
        );
        if let Some(c) = &self.comp {
            // The note as of the switch-over, now with the push's lz4 too.
            let note = c.note();
            self.ctx.update(|p| p.compression_note = Some(note));
        }
        Ok(downtime)
    }

    /// Post-copy's hand-over: the bitmap and the state, then Commit. Returns the pause.
    fn postcopy_hand_over(
        &mut self,
        out: &super::postcopy::Outgoing,
        words: &[u64],
        state: Box<crate::snapshot::Snapshot>,
        pause_at: Instant,
        n_left: u64,
    ) -> Result<f64, SendError> {
        let bytes = Envelope::MigrationState
            .encode(&*state)
            .map_err(SendError::Encode)?;
        protocol::write_frame(
            &mut self.t,
            Command::PostcopyStart,
            &protocol::encode_bitmap(words),
        )?;
        protocol::write_frame(&mut self.t, Command::State, &bytes)?;
        self.expect_ack()?;
        tracing::debug!(
            "post-copy switch-over: {n_left} pages to follow, destination restored at {:?}",
            pause_at.elapsed()
        );
        self.ctx.call(MigrationCall::ReleaseDisks)?;
        self.ctx.update(|p| p.phase = MigrationPhase::Committing);
        self.commit_sent = true;
        let committed = protocol::write_frame(&mut self.t, Command::Commit, &[])
            .map_err(SendError::from)
            .and_then(|_| self.expect_ack());
        match committed {
            Ok(_) => {}
            // It will not run the guest: it goes on here.
            Err(e @ SendError::Protocol(ProtocolError::Refused(_))) => return Err(e),
            // It may run the guest, which then needs the pages only this side has: as in
            // pre-copy, only the destination's outcome record can say.
            Err(e) => {
                let why = format!("then: {}", crate::vm::error_chain(&e));
                match settle(self.ctx, &why, self.tls.clone()) {
                    // It never ran there: the guest goes on here, as after any failure
                    // before the commit (the record is read once: it will not change).
                    Outcome::Aborted => {
                        self.commit_sent = false;
                        return Err(SendError::CommitAborted(crate::vm::error_chain(&e)));
                    }
                    // It runs there: the pages follow, over connections made again if need be.
                    Outcome::Committed => {
                        tracing::info!(
                            "post-copy: the destination's record says committed; its pages follow"
                        );
                        self.ctx.update(|p| p.error = None);
                    }
                }
            }
        }
        let downtime = pause_at.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(
            "post-copy: the destination runs the guest at {downtime:.1} ms ({} pages asked for so far)",
            out.requested.load(Ordering::Relaxed)
        );
        Ok(downtime)
    }

    /// Post-copy's background push: every page still to go, from next to the last fault on.
    /// Ends with an error if either connection breaks (`server` is the page server).
    fn push(
        &mut self,
        out: &super::postcopy::Outgoing,
        server: &PageServer,
    ) -> Result<(), SendError> {
        let mut batch = Vec::with_capacity(PUSH_BATCH);
        let (mut cursor, mut last_hint) = (0u64, 0u64);
        // On an error, pages taken from `out.left` may not have arrived: a recovery replaces
        // `out.left` with the destination's own list of what it lacks.
        loop {
            let h = out.hint.load(Ordering::Relaxed);
            if h != last_hint {
                (cursor, last_hint) = (h, h);
            }
            cursor = out.left.take_from(cursor, PUSH_BATCH, &mut batch);
            if batch.is_empty() {
                break;
            }
            let since = Instant::now();
            while self.t.unacked().is_some_and(|n| n > PUSH_IN_FLIGHT) {
                if server.broken() {
                    return Err(SendError::PageChannelBroken);
                }
                if since.elapsed() > POSTCOPY_SILENCE {
                    return Err(SendError::Silent(POSTCOPY_SILENCE));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            self.write_pages(&batch)?;
            if server.broken() {
                return Err(SendError::PageChannelBroken);
            }
            let (left, asked) = (out.left.count(), out.requested.load(Ordering::Relaxed));
            let n = batch.len() as u64;
            let comp = self.comp.as_ref();
            self.ctx.update(|p| {
                p.pages_sent += n;
                p.postcopy_pages_left = left;
                p.postcopy_pages_requested = asked;
                if let Some(c) = comp {
                    c.report(p);
                }
            });
            self.push_progress(false);
        }
        protocol::write_frame(&mut self.t, Command::PostcopyDone, b"{}")?;
        self.expect_ack()?;
        let asked = out.requested.load(Ordering::Relaxed);
        self.ctx.update(|p| {
            p.postcopy_pages_left = 0;
            p.postcopy_pages_requested = asked;
        });
        Ok(())
    }
}

/// The source's post-copy page server: a thread answering the destination's page requests on
/// the page connection.
struct PageServer {
    socket: std::net::TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageServer {
    /// Whether the page connection ended (the destination hung up, or it broke).
    fn broken(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stop serving and close the page connection.
    fn stop(&mut self, out: &super::postcopy::Outgoing) {
        out.stop.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Outgoing<'_> {
    /// The first message of a page connection: which move, and how long a broken post-copy
    /// connection is waited for.
    fn say_hello(&self, pc: &mut Transport) -> Result<(), SendError> {
        let recovery_ms = (self.peer_version >= protocol::RECOVERY_VERSION)
            .then(|| self.ctx.settings.postcopy_recovery_s * 1000);
        let hello = ChannelInfo {
            migration_id: self.ctx.settings.migration_id.clone(),
            recovery_ms,
            index: None,
        };
        protocol::write_frame(pc, Command::PostcopyChannel, &protocol::json(&hello))?;
        std::io::Write::flush(pc).map_err(ProtocolError::from)?;
        Ok(())
    }

    /// Answer page requests on `pc` from now on.
    fn serve_pages(
        &self,
        pc: Transport,
        out: &Arc<super::postcopy::Outgoing>,
    ) -> Result<PageServer, SendError> {
        let socket = pc.socket().map_err(ProtocolError::from)?;
        let thread = std::thread::Builder::new()
            .name("postcopy-pages".into())
            .spawn({
                let (mem, out) = (self.ctx.memory.clone(), out.clone());
                move || super::postcopy::serve_requests(pc, mem, out)
            })
            .map_err(|e| SendError::Vm(format!("start the post-copy page server: {e}")))?;
        Ok(PageServer {
            socket,
            thread: Some(thread),
        })
    }

    /// Post-copy recovery: make both connections again within `limit`, learning from the
    /// destination which pages it still lacks. Returns the new page connection.
    fn reconnect(
        &mut self,
        out: &super::postcopy::Outgoing,
        limit: Duration,
        why: &SendError,
    ) -> Result<Transport, SendError> {
        let first = crate::vm::error_chain(why);
        tracing::warn!("post-copy: {first}; reconnecting for up to {limit:?}");
        self.sent_before += self.t.bytes_sent();
        self.t.shutdown();
        self.ctx.update(|p| {
            p.postcopy_reconnecting = true;
            p.postcopy_pages_left = out.left.count();
            p.error = Some(format!(
                "post-copy: {first}; trying again for up to {} s",
                limit.as_secs()
            ));
        });
        self.push_progress(true);
        let deadline = Instant::now() + limit;
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.resume(out) {
                Ok(pc) => {
                    let p = self.ctx.update(|p| {
                        p.postcopy_reconnecting = false;
                        p.postcopy_recoveries += 1;
                        p.postcopy_pages_left = out.left.count();
                        p.error = None;
                    });
                    tracing::info!(
                        "post-copy: connection made again after {tries} tries; {} pages still to go",
                        p.postcopy_pages_left
                    );
                    self.push_progress(true);
                    return Ok(pc);
                }
                // The destination answered and will not go on (it stopped the guest).
                Err(e @ SendError::Protocol(ProtocolError::Refused(_))) => return Err(e),
                Err(e) if Instant::now() >= deadline => {
                    return Err(SendError::NotRecovered {
                        limit,
                        first,
                        last: crate::vm::error_chain(&e),
                    })
                }
                Err(e) => {
                    tracing::debug!("post-copy: reconnect try {tries}: {e}");
                    self.push_progress(false);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// One try at resuming post-copy: a new main connection (`PostcopyResume`, answered with
    /// the pages the destination lacks), then a new page connection.
    fn resume(&mut self, out: &super::postcopy::Outgoing) -> Result<Transport, SendError> {
        let to = &self.ctx.settings.to;
        let mut t = connect(to, RECONNECT_TIMEOUT, self.tls.as_ref())?;
        t.set_io_timeout(Duration::from_secs(5));
        let hello = ChannelInfo {
            migration_id: self.ctx.settings.migration_id.clone(),
            recovery_ms: None,
            index: None,
        };
        protocol::write_frame(&mut t, Command::PostcopyResume, &protocol::json(&hello))?;
        std::io::Write::flush(&mut t).map_err(ProtocolError::from)?;
        let f = protocol::read_frame(&mut t)?.ok_or(ProtocolError::Truncated)?;
        let words = match f.command {
            Command::PostcopyMissing => {
                protocol::decode_bitmap(&f.payload, super::postcopy::memory_end(&self.ctx.memory))?
            }
            Command::Ack => {
                let a: AckInfo = protocol::parse(&f)?;
                return Err(ProtocolError::Refused(a.message).into());
            }
            got => {
                return Err(ProtocolError::OutOfOrder {
                    got,
                    state: "resuming post-copy",
                }
                .into())
            }
        };
        let mut pc = connect(to, RECONNECT_TIMEOUT, self.tls.as_ref())?;
        self.say_hello(&mut pc)?;
        t.set_io_timeout(super::transport::IO_TIMEOUT);
        t.set_cap_mbit(self.ctx.settings.bandwidth_mbit);
        out.left.replace(&words);
        self.t = t;
        Ok(pc)
    }
}

/// Connect to the destination VMM at `to`.
pub(super) fn connect(
    to: &str,
    timeout: Duration,
    tls: Option<&MigrationTls>,
) -> Result<Transport, SendError> {
    Transport::connect(to, timeout, tls).map_err(|source| SendError::Connect {
        addr: to.into(),
        source,
    })
}

/// A fresh migration id: 128 random bits in hex.
pub fn new_migration_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Ask the destination at `addr` what became of move `id`: `None` if it cannot say (not
/// reachable, or it knows nothing of the move).
pub fn query_outcome(addr: &str, id: &str, tls: Option<&MigrationTls>) -> Option<Outcome> {
    let mut t = Transport::connect(addr, Duration::from_secs(1), tls).ok()?;
    t.set_io_timeout(Duration::from_secs(3));
    let q = QueryInfo {
        migration_id: id.into(),
    };
    protocol::write_frame(&mut t, Command::Query, &protocol::json(&q)).ok()?;
    let f = protocol::read_frame(&mut t).ok()??;
    if f.command != Command::Ack {
        return None;
    }
    let a: AckInfo = protocol::parse(&f).ok()?;
    ferry_migration::outcome::parse_outcome(&a.message)
}

/// Hold the paused guest until the move's outcome is known: asked of the destination every
/// second, or said through the API by whoever read the record.
fn settle(ctx: &SendCtx, why: &str, tls: Option<MigrationTls>) -> Outcome {
    let id = ctx.settings.migration_id.clone();
    let p = ctx.update(|p| {
        p.phase = MigrationPhase::InDoubt;
        p.error = Some(format!(
            "in doubt: Commit was sent to {} and {why}; the guest stays paused here until the \
             destination's outcome record for move {id} is known (asked every second; or \
             `ferry vmm migrate-resolve --outcome committed|aborted` once you have read it)",
            ctx.settings.to
        ));
    });
    tracing::warn!("{}", p.error.as_deref().unwrap_or_default());
    if let Some(f) = &ctx.follow {
        let _ = f.send(Response::Ok(ResponseBody::Migration(p)));
    }
    let mut next_query = Instant::now();
    let since = Instant::now();
    loop {
        if let Some(o) = ctx.resolve.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tracing::info!("move {id} settled through the API: {o:?}");
            return o;
        }
        if Instant::now() >= next_query {
            if let Some(o) = query_outcome(&ctx.settings.to, &id, tls.as_ref()) {
                tracing::info!("move {id} settled by the destination's record: {o:?}");
                return o;
            }
            next_query = Instant::now() + Duration::from_secs(1);
            // Still in doubt: say so again, so a follower knows the VMM is alive and waiting.
            let p = ctx.update(|p| p.elapsed_ms = p.elapsed_ms.max(1));
            tracing::debug!("move {id}: still in doubt after {:?}", since.elapsed());
            if let Some(f) = &ctx.follow {
                let _ = f.send(Response::Ok(ResponseBody::Migration(p)));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Take every released disk back and resume the guest; a disk briefly held elsewhere (a
/// destination letting go after it refused) is waited for, up to 10 s.
fn roll_back(ctx: &SendCtx) -> Result<(), SendError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ctx.call(MigrationCall::Rollback) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("rollback: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Run a migration to the end; the VM either leaves (Done) or runs on here.
pub fn run(mut ctx: SendCtx) {
    let start = Instant::now();
    if ctx.settings.migration_id.is_empty() {
        ctx.settings.migration_id = new_migration_id();
    }
    let id = ctx.settings.migration_id.clone();
    ctx.update(|p| {
        *p = MigrationProgress {
            migration_id: id,
            ..Default::default()
        }
    });
    let tls = match &ctx.settings.tls {
        Some(t) => match MigrationTls::load(&t.dir, &t.peer) {
            Ok(x) => Some(x),
            Err(e) => {
                let p = ctx.update(|p| {
                    p.phase = MigrationPhase::Failed;
                    p.error = Some(format!(
                        "cannot load this host's TLS credentials from {}: {e}; the guest runs on here",
                        t.dir.display()
                    ));
                });
                send_final(&ctx, p);
                return;
            }
        },
        None => None,
    };
    let (result, state) = match connect(&ctx.settings.to, CONNECT_TIMEOUT, tls.as_ref()) {
        Err(e) => (Err(e), None),
        Ok(mut t) => {
            t.set_cap_mbit(ctx.settings.bandwidth_mbit);
            let mut s = Outgoing {
                ctx: &ctx,
                t,
                start,
                payload: Vec::new(),
                paused: false,
                commit_sent: false,
                last_push: Instant::now(),
                pending: None,
                redirtied: None,
                last_sync: Instant::now(),
                tls: tls.clone(),
                peer_version: protocol::MIN_PROTOCOL_VERSION,
                sent_before: 0,
                comp: None,
                lanes: None,
                lanes_sent: 0,
                retired: (Vec::new(), Vec::new()),
            };
            let mut r = s.run();
            if let (Err(e), Some(l)) = (&r, &s.lanes) {
                if !matches!(e, SendError::ChannelBroken { .. } | SendError::Cancelled) {
                    // A memory connection that broke closes the main one too (the destination hangs up
                    // on a move whose memory connection failed): give it a moment, then name it.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Some(cause) = l.failure() {
                        r = Err(cause);
                    }
                }
            }
            if r.is_err() && !s.commit_sent {
                // Tell the destination, if it still listens, then hang up.
                let _ = protocol::write_frame(&mut s.t, Command::Cancel, b"{}");
            }
            if r.is_err() {
                s.t.shutdown();
            }
            let bytes = s.sent();
            (r, Some((s.paused, s.commit_sent, bytes)))
        }
    };
    let _ = memory::stop_dirty_log(&ctx.vm.fd, &ctx.memory);
    let (paused, commit_sent, bytes) = state.unwrap_or((false, false, 0));
    let elapsed = || start.elapsed().as_millis() as u64;
    // Whatever happens next, the guest runs at full speed again (once it runs).
    let unthrottle = || {
        let _ = ctx.call(MigrationCall::Throttle(0));
    };
    let (ended, msg) = match result {
        Ok(downtime) => {
            let p = ctx.update(|p| {
                p.phase = MigrationPhase::Done;
                p.downtime_ms = Some(downtime);
                p.elapsed_ms = elapsed();
                p.bytes_sent = bytes;
            });
            send_final(&ctx, p);
            let _ = ctx.call(MigrationCall::Finished);
            return;
        }
        Err(e @ SendError::PostcopyBroken { .. }) => {
            // The guest ran on the destination: resuming it here would run a stale copy
            // beside (or after) a newer one. Say plainly where things stand, and keep this
            // copy of its memory in case the destination can still be reached by hand.
            let p = ctx.update(|p| {
                p.phase = MigrationPhase::Failed;
                p.guest_lost = true;
                p.elapsed_ms = elapsed();
                p.bytes_sent = bytes;
                p.error = Some(format!(
                    "{}; the guest cannot go on there without those pages and must not resume \
                     here (it ran there since): it is lost. This VMM keeps its paused copy as of \
                     the switch-over; stop it with `ferry vmm stop` once you have what you need",
                    crate::vm::error_chain(&e)
                ));
            });
            tracing::error!("{}", p.error.as_deref().unwrap_or_default());
            send_final(&ctx, p);
            return;
        }
        Err(e) => {
            unthrottle();
            let refused = matches!(e, SendError::Protocol(ProtocolError::Refused(_)));
            if commit_sent && !refused {
                // Commit may have arrived: only the destination's record can tell.
                let why = format!("then: {}", crate::vm::error_chain(&e));
                match settle(&ctx, &why, tls.clone()) {
                    Outcome::Committed => {
                        let p = ctx.update(|p| {
                            p.phase = MigrationPhase::Done;
                            p.elapsed_ms = elapsed();
                            p.bytes_sent = bytes;
                            p.error = Some(format!(
                                "the destination's outcome record says committed ({why}); \
                                 the guest runs there"
                            ));
                        });
                        send_final(&ctx, p);
                        let _ = ctx.call(MigrationCall::Finished);
                        return;
                    }
                    Outcome::Aborted => (
                        MigrationPhase::Failed,
                        format!(
                            "{}; the destination's outcome record says aborted",
                            crate::vm::error_chain(&e)
                        ),
                    ),
                }
            } else {
                let cancelled = matches!(e, SendError::Cancelled);
                (
                    if cancelled {
                        MigrationPhase::Cancelled
                    } else {
                        MigrationPhase::Failed
                    },
                    crate::vm::error_chain(&e),
                )
            }
        }
    };
    // The destination does not run the guest: take the disks back and run it here.
    let mut msg = msg;
    if paused {
        match roll_back(&ctx) {
            Ok(()) => msg.push_str("; the guest runs on here"),
            Err(r) => msg.push_str(&format!(
                "; ROLLBACK FAILED, the guest stays paused here: {r}"
            )),
        }
    } else {
        msg.push_str("; the guest runs on here");
    }
    let p = ctx.update(|p| {
        p.phase = ended;
        p.error = Some(msg);
        p.elapsed_ms = elapsed();
    });
    send_final(&ctx, p);
}

fn send_final(ctx: &SendCtx, p: MigrationProgress) {
    if let Some(f) = &ctx.follow {
        let _ = f.send(Response::Ok(ResponseBody::Migration(p)));
    }
}
