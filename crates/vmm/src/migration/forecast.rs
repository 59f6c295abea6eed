//! What a migration would do, before it starts, and the one rule that decides after every
//! pre-copy round what happens next ([`decide`]): the sender runs it on what it measures, the
//! forecast on what it predicts, so the two cannot drift apart.
//!
//! The forecast moves nothing. It asks the destination VMM (which waits for a move, as for a
//! real one) for its protocol version, measures the link with `Probe` messages (through TLS and
//! the bandwidth cap, like the real stream), watches the guest's dirty log for a few seconds,
//! and plays the rounds forward:
//! - the first pass sends every page that may hold data (zero pages as an 8-byte mark);
//! - a round of `t` seconds finds `d(t)` pages dirty, where `d` is the measured curve of distinct
//!   pages dirtied in windows of 50 ms, 250 ms, 1 s and the whole sample (flat past it for a
//!   guest that keeps rewriting one working set);
//! - after each round [`decide`] says: switch over, go post-copy, throttle, or go on;
//! - a round skips what the guest dirtied again since it began (read every 100 ms, as the
//!   sender does): those pages go next round anyway;
//! - the pause is the rest at link speed plus a fixed cost (state, commit, two round trips).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::{MigrateSettings, MigrationForecast, MigrationMode};
use ferry_migration::protocol::{self, AckInfo, Command, ProtocolError, QueryInfo, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::send::{
    connect, SendError, CONNECT_TIMEOUT, MAX_ROUNDS, MAX_THROTTLE, POSTCOPY_RATIO, RESYNC_EVERY,
    SMALL_PAUSE_MS,
};
use super::transport::{MigrationTls, Transport};
use crate::kvm_vm::KvmVm;
use crate::memory::{self, DirtyBitmap, GuestMemory};

/// Bytes on the wire per page that holds data.
pub const PAGE_WIRE: f64 = PAGE_SIZE as f64 + 8.0;
/// How long the link is measured.
const PROBE_TIME: Duration = Duration::from_secs(1);
/// What a switch-over costs besides sending the rest: saving and restoring the state, the
/// commit (measured here: 2-6 ms for a small guest on loopback).
const FIXED_PAUSE_MS: f64 = 5.0;
/// Connecting, Start and Config, the destination making its VM (an idle 1 GiB move takes
/// 11 ms in all here, release build, pause included).
const SETUP_MS: f64 = 5.0;
/// How often the dirty log is read while sampling.
const TICK: Duration = Duration::from_millis(50);

/// What a round found (see [`decide`]).
pub struct RoundFacts {
    pub round: u32,
    /// Pages dirty now, and after the round before (none after the first pass).
    pub n: u64,
    pub prev: Option<u64>,
    /// Sending them now would pause the guest this long (ms).
    pub expected_ms: f64,
    /// The dirty rate as a share of the link's rate.
    pub ratio: f64,
    /// The link's rate in the round, bytes/s.
    pub bw: f64,
    /// The throttle in force (percent).
    pub throttle: u32,
    /// The time limit has passed.
    pub out_of_time: bool,
}

/// What comes after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Pause and send the rest.
    SwitchOver,
    /// Switch over to post-copy, for this reason.
    Postcopy(String),
    /// Another round, with this throttle.
    Continue { throttle: u32 },
    /// Out of rounds or time without converging (the settings say what then).
    OutOfTime(String),
}

/// After a round: what next, under `s` (mode, pause budget), given whether the destination can
/// do post-copy.
pub fn decide(s: &MigrateSettings, can_postcopy: bool, f: &RoundFacts) -> Next {
    let (n, expected_ms, round) = (f.n, f.expected_ms, f.round);
    if s.mode == MigrationMode::Postcopy {
        return Next::Postcopy(format!(
            "asked for: after the first pass, {n} pages went on demand"
        ));
    }
    // The rest fits the budget. Switch over now unless more rounds still shrink it: the
    // budget is a ceiling, not a target. A link only a little faster than the guest's
    // dirtying shrinks the rest by a few percent a round, and the rounds get shorter as it
    // does, so following that costs little time and halves the pause. Unknown after the
    // first pass: try one more round.
    let shrinking = f.prev.is_none_or(|p| n * 100 < p * 95);
    // Auto-converge: a guest that dirties memory about as fast as the link carries it (the
    // rest barely shrinks) gets a growing share of its vCPU time taken away, so the rest can
    // shrink; rounds stop when even that does not help any more.
    let stalled = f.prev.is_some_and(|p| n * 100 >= p * 90) && expected_ms > s.downtime_ms as f64;
    let can_throttle = f.throttle < MAX_THROTTLE;
    // The rest fits and no longer shrinks: switching over now costs a pause within the
    // budget; throttling or post-copy would only buy a shorter one.
    if expected_ms <= s.downtime_ms as f64
        && (expected_ms <= SMALL_PAUSE_MS || !shrinking || round + 2 >= MAX_ROUNDS)
    {
        return Next::SwitchOver;
    }
    // The rest shrinks by the ratio of the dirty rate to the link's each round, so pre-copy
    // needs about expected / (1 - ratio) more; post-copy sends the rest once.
    let auto = s.mode == MigrationMode::Auto && can_postcopy;
    let mbit = f.bw * 8.0 / 1e6;
    // Post-copy only where pre-copy cannot make the budget: its price is not in this time
    // model (the guest stalls on every page it touches before the page arrives), and pre-copy
    // keeps a runnable copy on the source until the end.
    let slow = f.ratio >= POSTCOPY_RATIO && expected_ms > s.downtime_ms as f64;
    if auto && (stalled || slow) && f.throttle == 0 {
        // Pre-copy would take several times as long as post-copy, or have to slow the guest
        // down to finish at all: post-copy moves it at full speed instead.
        return Next::Postcopy(if stalled {
            format!(
                "pre-copy stalled: {n} pages still dirty after round {round} (was {}), \
                 {expected_ms:.0} ms to send at {mbit:.0} Mbit/s, over the {} ms budget",
                f.prev.unwrap_or_default(),
                s.downtime_ms
            )
        } else {
            format!(
                "pre-copy would be slow: the guest dirties memory at {:.0}% of the link's \
                 {mbit:.0} Mbit/s, so the {n} pages left after round {round} would take {} \
                 more rounds, post-copy {expected_ms:.0} ms",
                f.ratio * 100.0,
                if f.ratio < 1.0 {
                    format!("~{:.0} ms in", expected_ms / (1.0 - f.ratio))
                } else {
                    "ever".into()
                }
            )
        });
    }
    let throttle = match f.throttle {
        t if !(stalled && can_throttle) => t,
        0 => 30,
        t => (t + 20).min(MAX_THROTTLE),
    };
    if f.out_of_time || round + 1 >= MAX_ROUNDS {
        if auto {
            return Next::Postcopy(format!(
                "pre-copy ran out of time after round {round}: {n} pages still dirty"
            ));
        }
        return Next::OutOfTime(format!(
            "after {} rounds, {n} pages still dirty, {expected_ms:.0} ms to send",
            round + 1
        ));
    }
    Next::Continue { throttle }
}

/// Distinct pages dirtied within a window of `t` seconds, as measured.
#[derive(Debug, Clone)]
pub struct DirtyCurve {
    /// (window in s, pages), rising.
    points: Vec<(f64, f64)>,
}

impl DirtyCurve {
    /// Pages dirty after `t` seconds of a round.
    pub fn at(&self, t: f64) -> f64 {
        let mut prev = (0.0, 0.0);
        for &(x, y) in &self.points {
            if t <= x {
                let k = if x > prev.0 {
                    (t - prev.0) / (x - prev.0)
                } else {
                    1.0
                };
                return prev.1 + k * (y - prev.1);
            }
            prev = (x, y);
        }
        // Past the sample: it went on growing at the rate between its last two points.
        let n = self.points.len();
        if n >= 2 {
            let (a, b) = (self.points[n - 2], self.points[n - 1]);
            let slope = ((b.1 - a.1) / (b.0 - a.0).max(1e-3)).max(0.0);
            return b.1 + slope * (t - b.0);
        }
        prev.1
    }
}

/// How fast pages go, and how many bytes of the wire each byte of them takes: the link (and
/// reading the pages), or lz4 where it moves pages faster (as the sender decides).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Bytes of pages per second.
    pub bw: f64,
    /// Bytes on the wire per byte of pages (1 without lz4).
    pub wire: f64,
}

impl Pace {
    pub fn plain(bw: f64) -> Pace {
        Pace { bw, wire: 1.0 }
    }
}

/// What was measured, for [`simulate`].
pub struct Measured {
    /// The link's rate for pages sent as they are (bytes/s).
    pub bw: f64,
    pub rtt_ms: f64,
    pub first_pass_bytes: u64,
    pub curve: DirtyCurve,
    /// How the first pass's pages go, and how the dirty ones do.
    pub first: Pace,
    pub dirty: Pace,
}

/// Play the move forward under `s`.
pub fn simulate(s: &MigrateSettings, can_postcopy: bool, m: &Measured) -> MigrationForecast {
    let bw = m.dirty.bw.max(1.0);
    let wire = m.dirty.wire;
    let fixed = FIXED_PAUSE_MS + 2.0 * m.rtt_ms;
    // A round of `bytes` skips the pages dirtied again since it began, once it has run for
    // a resync interval: returns how long it takes and what it sends.
    let resync = RESYNC_EVERY.as_secs_f64();
    let round_of = |bytes: f64, pace: Pace| -> (f64, f64) {
        let bw = pace.bw.max(1.0);
        let full = bytes / bw;
        let skipped =
            (m.curve.at(resync) * PAGE_WIRE).min(bytes) * (1.0 - (resync / full).min(1.0));
        let sent = bytes - skipped;
        ((sent / bw).max(1e-3), sent * pace.wire)
    };
    let (mut secs, first) = round_of(m.first_pass_bytes as f64, m.first);
    let mut total = SETUP_MS / 1000.0 + secs;
    let mut bytes = first;
    let (mut round, mut prev, mut throttle) = (0u32, None, 0u32);
    let limit = (s.timeout_s > 0).then_some(s.timeout_s as f64);
    let mut f = MigrationForecast {
        link_mbit: m.bw * 8.0 / 1e6,
        rtt_ms: m.rtt_ms,
        first_pass_bytes: m.first_pass_bytes,
        converges: true,
        ..Default::default()
    };
    loop {
        // A throttled guest dirties less in the same time.
        let n = m
            .curve
            .at(secs * (1.0 - f64::from(throttle) / 100.0))
            .round() as u64;
        // As the sender: after the first pass it reckons a dirty page a whole page at the
        // link's speed (the first pass's pages are not the dirty ones), later at what the
        // last round's pages took; what follows goes at the pace they really go.
        let judge = if round == 0 { m.bw.max(1.0) } else { bw };
        let expected_ms = n as f64 * PAGE_WIRE / judge * 1000.0;
        let real_ms = n as f64 * PAGE_WIRE / bw * 1000.0;
        let facts = RoundFacts {
            round,
            n,
            prev,
            expected_ms,
            ratio: n as f64 * PAGE_WIRE / secs.max(1e-3) / judge,
            bw: judge,
            throttle,
            out_of_time: limit.is_some_and(|l| total > l),
        };
        match decide(s, can_postcopy, &facts) {
            Next::SwitchOver => {
                f.mode = MigrationMode::Precopy;
                f.reason = "pre-copy converges".into();
                f.pause_ms = real_ms + fixed;
                bytes += n as f64 * PAGE_WIRE * wire;
                total += f.pause_ms / 1000.0;
                break;
            }
            Next::Postcopy(why) => {
                f.mode = MigrationMode::Postcopy;
                f.reason = why;
                f.pause_ms = fixed;
                f.postcopy_pages = n;
                bytes += n as f64 * PAGE_WIRE * wire;
                // The rest's bytes shrink with lz4 but its time is bounded by the guest
                // waiting on pages fetched as they are: reckoned at whole pages (an upper
                // bound; measured real moves of compressible guests took 0.2-0.7x of it).
                total += (f.pause_ms + expected_ms) / 1000.0;
                break;
            }
            Next::OutOfTime(why) => {
                f.mode = MigrationMode::Precopy;
                f.reason = format!("pre-copy does not converge: {why}");
                f.converges = false;
                f.pause_ms = expected_ms + fixed;
                break;
            }
            Next::Continue { throttle: t } => {
                throttle = t;
                prev = Some(n);
                round += 1;
                let (t, sent) = round_of(n as f64 * PAGE_WIRE, m.dirty);
                secs = t;
                total += secs;
                bytes += sent;
            }
        }
    }
    f.rounds = round;
    f.total_ms = total * 1000.0;
    f.bytes = bytes as u64;
    f
}

/// Ask the destination which protocol it speaks (a `Query` any receiver answers).
fn peer_version(to: &str, tls: Option<&MigrationTls>) -> Result<u32, SendError> {
    let mut t = connect(to, CONNECT_TIMEOUT, tls)?;
    t.set_io_timeout(Duration::from_secs(5));
    let q = QueryInfo {
        migration_id: "forecast".into(),
    };
    protocol::write_frame(&mut t, Command::Query, &protocol::json(&q))?;
    let f = protocol::read_frame(&mut t)?.ok_or(ProtocolError::Truncated)?;
    let a: AckInfo = protocol::parse(&f)?;
    Ok(a.protocol_version.unwrap_or(protocol::MIN_PROTOCOL_VERSION))
}

/// Measure the link to `to` over `n` connections at once (a move's memory connections), all
/// under one cap: (bytes/s, round trip ms).
fn probe(
    to: &str,
    cap_mbit: u64,
    tls: Option<&MigrationTls>,
    n: u32,
) -> Result<(f64, f64), SendError> {
    let mut t = connect(to, CONNECT_TIMEOUT, tls)?;
    t.set_io_timeout(Duration::from_secs(10));
    t.set_cap_mbit(cap_mbit);
    let ask = |t: &mut Transport| -> Result<u64, SendError> {
        protocol::write_frame(t, Command::Probe, &[])?;
        std::io::Write::flush(t).map_err(ProtocolError::from)?;
        let f = protocol::read_frame(t)?.ok_or(ProtocolError::Truncated)?;
        let a: AckInfo = protocol::parse(&f)?;
        a.message
            .parse()
            .map_err(|_| ProtocolError::Malformed(Command::Ack, a.message.clone()).into())
    };
    // The least of a few: the first waits for the receiver to accept the connection.
    let mut rtt_ms = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        ask(&mut t)?;
        rtt_ms = rtt_ms.min(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let mut others = Vec::new();
    for _ in 1..n {
        let mut o = connect(to, CONNECT_TIMEOUT, tls)?;
        o.set_io_timeout(Duration::from_secs(10));
        o.share_cap(t.cap());
        ask(&mut o)?;
        others.push(o);
    }
    let chunk = vec![0u8; protocol::PROBE_CHUNK];
    let start = Instant::now();
    let bulk = |t: &mut Transport| -> Result<u64, SendError> {
        while start.elapsed() < PROBE_TIME {
            protocol::write_frame(t, Command::Probe, &chunk)?;
        }
        ask(t)
    };
    let got = std::thread::scope(|sc| {
        let hs: Vec<_> = others.iter_mut().map(|o| sc.spawn(|| bulk(o))).collect();
        let mut got = bulk(&mut t)?;
        for h in hs {
            got += h
                .join()
                .map_err(|_| SendError::Vm("probe the link: a thread panicked".into()))??;
        }
        Ok::<u64, SendError>(got)
    })?;
    Ok((got as f64 / start.elapsed().as_secs_f64(), rtt_ms))
}

/// Watch the guest's dirty log for `sample`, and build the curve of distinct pages dirtied
/// per window; also every page dirtied over it. Dirty logging is on only meanwhile.
fn sample_dirty(
    vm: &KvmVm,
    mem: &GuestMemory,
    sample: Duration,
    cancel: &AtomicBool,
) -> Result<(DirtyCurve, Option<DirtyBitmap>), SendError> {
    memory::start_dirty_log(&vm.fd, mem)?;
    let r = (|| {
        let mut ticks: Vec<DirtyBitmap> = Vec::new();
        let start = Instant::now();
        let mut next = start + TICK;
        while start.elapsed() < sample {
            if cancel.load(Ordering::SeqCst) {
                return Err(SendError::Cancelled);
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += TICK;
            ticks.push(memory::take_dirty(&vm.fd, mem)?);
        }
        Ok(ticks)
    })();
    let _ = memory::stop_dirty_log(&vm.fd, mem);
    let ticks = r?;
    let mut union = ticks.first().cloned();
    if let Some(u) = union.as_mut() {
        for t in &ticks[1..] {
            u.merge(t);
        }
    }
    let window = |k: usize| -> f64 {
        // Mean distinct pages over windows of k ticks.
        let chunks: Vec<u64> = ticks
            .chunks_exact(k)
            .map(|c| {
                let mut b = c[0].clone();
                for x in &c[1..] {
                    b.merge(x);
                }
                b.count()
            })
            .collect();
        chunks.iter().sum::<u64>() as f64 / chunks.len().max(1) as f64
    };
    let tick = TICK.as_secs_f64();
    let mut points = Vec::new();
    for k in [1usize, 5, 20, ticks.len()] {
        if k > 0 && k <= ticks.len() {
            let x = k as f64 * tick;
            if points.last().is_none_or(|&(px, _)| x > px) {
                points.push((x, window(k)));
            }
        }
    }
    // A curve never falls: a longer window holds at least what a shorter one did.
    for i in 1..points.len() {
        points[i].1 = points[i].1.max(points[i - 1].1);
    }
    Ok((DirtyCurve { points }, union))
}

/// lz4 on a sample of up to 64 of `pages` that hold data, spread over them: (compressed
/// share, input bytes per second of one core); `None` if none holds data.
fn lz4_sample(mem: &GuestMemory, pages: &[u64]) -> Option<(f64, f64)> {
    const PAGES: usize = 64;
    let step = (pages.len() / PAGES).max(1);
    let mut buf = Vec::with_capacity(PAGES * PAGE_SIZE);
    let mut page = [0u8; PAGE_SIZE];
    for &gpa in pages.iter().step_by(step) {
        if buf.len() >= PAGES * PAGE_SIZE {
            break;
        }
        if mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() && !protocol::is_zero(&page) {
            buf.extend_from_slice(&page);
        }
    }
    if buf.is_empty() {
        return None;
    }
    // The least of a few runs: the speed of lz4 here, not of whatever else ran meanwhile.
    let (mut ratio, mut secs) = (1.0, f64::MAX);
    for _ in 0..4 {
        let t0 = Instant::now();
        ratio = ferry_migration::pack::lz4_ratio(&buf);
        secs = secs.min(t0.elapsed().as_secs_f64());
    }
    Some((ratio, buf.len() as f64 / secs.max(1e-9)))
}

/// How pages go over `link` (bytes/s), read at `read` (bytes/s, all connections), with lz4
/// where the sender would use it: their sample shrinks to `lz4.0`, lz4 takes in `lz4.1` bytes/s
/// per connection, and the faster way wins.
fn pace(link: f64, read: Option<f64>, lz4: Option<(f64, f64)>, n: u32) -> Pace {
    let read_s = read.map_or(0.0, |r| 1.0 / r);
    let plain = Pace::plain(1.0 / (1.0 / link.max(1.0) + read_s));
    match lz4 {
        // As the sender: pages that do not shrink by 10% never wait on lz4.
        Some((ratio, rate)) if ratio <= super::compress::WORTH_TRYING => {
            let with = 1.0 / (ratio / link.max(1.0) + read_s + 1.0 / (rate * f64::from(n)));
            if with > plain.bw {
                Pace {
                    bw: with,
                    wire: ratio,
                }
            } else {
                plain
            }
        }
        _ => plain,
    }
}

/// Bytes the first pass would send: every page that may hold data, zero ones as a mark; and
/// how fast this host reads and checks pages (bytes/s), which the sender does for each page it
/// sends, besides writing it (`None` if too little was read to say).
fn first_pass_bytes(mem: &GuestMemory) -> Result<(u64, Option<f64>), SendError> {
    let mut page = [0u8; PAGE_SIZE];
    let mut bytes = 0u64;
    let pages = memory::populated_pages(mem)?;
    let t0 = Instant::now();
    for &gpa in &pages {
        mem.read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| SendError::Memory(memory::MemoryError::Access(e)))?;
        bytes += if protocol::is_zero(&page) {
            8
        } else {
            PAGE_WIRE as u64
        };
    }
    let read = (pages.len() * PAGE_SIZE) as f64;
    let rate = (read >= f64::from(16 << 20)).then(|| read / t0.elapsed().as_secs_f64().max(1e-6));
    Ok((bytes, rate))
}

/// Forecast a move of the guest in `mem` under `s`, sampling for `sample`.
pub fn forecast(
    s: &MigrateSettings,
    mem: &GuestMemory,
    vm: &Arc<KvmVm>,
    sample: Duration,
    cancel: &AtomicBool,
) -> Result<MigrationForecast, SendError> {
    let tls = match &s.tls {
        Some(t) => Some(
            MigrationTls::load(&t.dir, &t.peer)
                .map_err(|e| SendError::Vm(format!("load this host's TLS credentials: {e}")))?,
        ),
        None => None,
    };
    let version = peer_version(&s.to, tls.as_ref())?;
    if version < protocol::RECOVERY_VERSION {
        return Err(SendError::Vm(format!(
            "forecast a move to {}: the destination speaks migration protocol {version}, which \
             cannot be probed (it needs {}); update ferry there",
            s.to,
            protocol::RECOVERY_VERSION
        )));
    }
    // A move on several memory connections sends (and reads pages) on all of them at once.
    let n = if version >= protocol::CHANNELS_VERSION {
        s.channels.clamp(1, protocol::MAX_CHANNELS)
    } else {
        1
    };
    let (bw, rtt_ms) = probe(&s.to, s.bandwidth_mbit, tls.as_ref(), n)?;
    let (curve, dirtied) = sample_dirty(vm, mem, sample, cancel)?;
    let (first, page_rate) = first_pass_bytes(mem)?;
    let page_rate = page_rate.map(|c| c * f64::from(n));
    // Sending a page costs reading it as well as the link's time (on a fast link the first
    // outweighs the second), and compressing it where that pays.
    let compress =
        s.compression != ferry_api::Compression::Off && version >= protocol::PACKED_VERSION;
    let (lz4_first, lz4_dirty) = if compress {
        let populated = memory::populated_pages(mem)?;
        let dirty: Vec<u64> = dirtied.map(|d| d.pages().collect()).unwrap_or_default();
        (lz4_sample(mem, &populated), lz4_sample(mem, &dirty))
    } else {
        (None, None)
    };
    let first_pace = pace(bw, page_rate, lz4_first, n);
    let dirty_pace = pace(bw, page_rate, lz4_dirty, n);
    tracing::debug!(
        "forecast: link {:.0} Mbit/s, pages read at {:?} MB/s, lz4 {lz4_first:?} / {lz4_dirty:?}: \
         first pass {first_pace:?}, dirty pages {dirty_pace:?}",
        bw * 8.0 / 1e6,
        page_rate.map(|c| (c / 1e6) as u64),
    );
    let m = Measured {
        bw: Pace::plain(1.0 / (1.0 / bw.max(1.0) + page_rate.map_or(0.0, |r| 1.0 / r))).bw,
        rtt_ms,
        first_pass_bytes: first,
        curve: curve.clone(),
        first: first_pace,
        dirty: dirty_pace,
    };
    let mut f = simulate(s, version >= protocol::POSTCOPY_VERSION, &m);
    f.sample_ms = sample.as_millis() as u64;
    f.dirty_rate_pps = curve.at(1.0) as u64;
    f.working_set_pages = curve.at(sample.as_secs_f64()) as u64;
    tracing::info!("forecast: {f:?} from {curve:?}");
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(bw_mbit: f64, curve: &[(f64, f64)], first: u64) -> Measured {
        let bw = bw_mbit * 1e6 / 8.0;
        Measured {
            bw,
            rtt_ms: 0.1,
            first_pass_bytes: first,
            curve: DirtyCurve {
                points: curve.to_vec(),
            },
            first: Pace::plain(bw),
            dirty: Pace::plain(bw),
        }
    }

    #[test]
    fn compressible_pages_go_faster_where_lz4_pays_and_only_there() {
        let link = 25e6; // 200 Mbit/s
        let p = pace(link, Some(1e9), Some((0.05, 1e9)), 1);
        assert_eq!(p.wire, 0.05);
        assert!(p.bw > 5.0 * link, "{p:?}");
        // Pages that do not shrink by 10% go as they are.
        assert_eq!(pace(link, Some(1e9), Some((0.95, 1e9)), 1).wire, 1.0);
        // A link faster than lz4 on one core: as they are; on eight connections lz4 pays.
        assert_eq!(pace(2e9, None, Some((0.5, 1e9)), 1).wire, 1.0);
        assert_eq!(pace(2e9, None, Some((0.5, 1e9)), 8).wire, 0.5);
        // A guest rewriting 32 MiB flat out, its pages shrinking 20x: a fraction of the
        // bytes, in less time (post-copy's rest still reckoned at whole pages), same mode.
        let curve = [(0.05, 8192.0), (3.0, 8192.0)];
        let s = MigrateSettings::to("x:1");
        let plain = simulate(&s, true, &measured(200.0, &curve, 40 << 20));
        let mut m = measured(200.0, &curve, 40 << 20);
        m.first = pace(link, Some(1e9), Some((0.05, 1e9)), 1);
        m.dirty = m.first;
        let packed = simulate(&s, true, &m);
        assert!(packed.bytes * 5 < plain.bytes, "{packed:?} {plain:?}");
        assert!(packed.total_ms < plain.total_ms, "{packed:?} {plain:?}");
        assert_eq!(packed.mode, plain.mode);
        assert_eq!(packed.link_mbit, plain.link_mbit, "the link is the link");
    }

    #[test]
    fn an_idle_guest_converges_in_one_pass() {
        let s = MigrateSettings::to("x:1");
        let f = simulate(
            &s,
            true,
            &measured(1000.0, &[(0.05, 0.0), (3.0, 0.0)], 100 << 20),
        );
        assert_eq!(f.mode, MigrationMode::Precopy);
        assert!(f.converges);
        // Setup, 100 MiB at 125 MB/s, then a pause of the fixed cost only.
        assert!((f.total_ms - 849.0).abs() < 20.0, "{f:?}");
        assert!(f.pause_ms < 10.0, "{f:?}");
    }

    #[test]
    fn a_guest_that_out_dirties_the_link_goes_postcopy_under_auto_only() {
        // 8192 pages rewritten in a blink: 32 MiB dirty whatever the round's length.
        let curve = [(0.05, 8192.0), (3.0, 8192.0)];
        let mut s = MigrateSettings::to("x:1");
        let f = simulate(&s, true, &measured(200.0, &curve, 40 << 20));
        assert_eq!(f.mode, MigrationMode::Postcopy, "{f:?}");
        assert_eq!(f.postcopy_pages, 8192);
        // Without post-copy (an old destination) auto stays pre-copy and throttles the guest
        // over several rounds until the rest fits the pause budget.
        s.timeout_s = 60;
        let f = simulate(&s, false, &measured(200.0, &curve, 40 << 20));
        assert_eq!(f.mode, MigrationMode::Precopy);
        assert!(f.converges && f.rounds >= 2, "{f:?}");
        assert!(f.pause_ms <= 300.0, "{f:?}");
    }

    #[test]
    fn decide_follows_the_budget_and_the_ratio() {
        let s = MigrateSettings::to("x:1");
        let facts = |n: u64, prev: Option<u64>, ratio: f64| RoundFacts {
            round: 1,
            n,
            prev,
            expected_ms: n as f64 * PAGE_WIRE / 125e6 * 1000.0,
            ratio,
            bw: 125e6,
            throttle: 0,
            out_of_time: false,
        };
        assert_eq!(decide(&s, true, &facts(0, Some(10), 0.0)), Next::SwitchOver);
        assert!(matches!(
            decide(&s, true, &facts(100_000, Some(200_000), 0.9)),
            Next::Postcopy(_)
        ));
        assert!(matches!(
            decide(&s, false, &facts(100_000, Some(101_000), 0.9)),
            Next::Continue { throttle: 30 }
        ));
        assert_eq!(
            decide(&s, true, &facts(100_000, Some(200_000), 0.3)),
            Next::Continue { throttle: 0 }
        );
        // A fast dirtier whose rest fits the budget stays in pre-copy (99 ms at 70% of the
        // link): post-copy's stalls would cost the guest more than the pause.
        assert_eq!(
            decide(&s, true, &facts(3_000, Some(6_000), 0.7)),
            Next::Continue { throttle: 0 }
        );
        // A rest of a few ms goes in the pause, whatever dirty rate a short round measured.
        assert_eq!(
            decide(&s, true, &facts(120, Some(190), 0.7)),
            Next::SwitchOver
        );
        // A rest that fits the budget (164 ms) but no longer shrinks: switch over, however
        // fast the guest dirties (compressed rounds of a busy guest end this way).
        assert_eq!(
            decide(&s, true, &facts(5_000, Some(5_000), 0.9)),
            Next::SwitchOver
        );
    }

    #[test]
    fn the_dirty_curve_interpolates_and_holds_past_the_sample() {
        let c = DirtyCurve {
            points: vec![(0.05, 100.0), (0.25, 300.0), (1.0, 400.0), (3.0, 400.0)],
        };
        assert_eq!(c.at(0.025), 50.0);
        assert_eq!(c.at(0.15), 200.0);
        assert_eq!(c.at(10.0), 400.0);
    }
}
