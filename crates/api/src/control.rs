//! The VMM control API: one JSON object per line over a unix socket, a request from the
//! client, a response from the VMM.
//!
//! ```text
//! -> {"cmd":"pause"}
//! <- {"ok":{"status":{"state":"paused", ...}}}
//! -> {"cmd":"save","dir":"/var/lib/ferry/snap1"}
//! <- {"ok":{"saved":{"dir":"/var/lib/ferry/snap1","memory_bytes":268435456,"ms":412}}}
//! -> {"cmd":"bogus"}
//! <- {"error":"unknown variant `bogus`, expected one of ..."}
//! ```

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request to a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Stop every vCPU; devices stay quiet while paused.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Save the complete VM (state and memory) to a directory. Pauses first if needed and
    /// leaves the VM paused.
    Save { dir: PathBuf },
    /// Stop the VM and end the VMM process.
    Quit,
    /// Move the running VM to a destination VMM. With `follow`, the answer is a stream of
    /// progress lines ending with the final report; without, one line: started.
    Migrate {
        #[serde(flatten)]
        settings: MigrateSettings,
        #[serde(default)]
        follow: bool,
    },
    /// Predict a migration to `settings.to` without moving anything: sample the guest's dirty
    /// rate for `sample_ms` and measure the link to the destination VMM (which must be
    /// waiting, as for a real move), then model what `settings.mode` would do.
    MigrateForecast {
        #[serde(flatten)]
        settings: MigrateSettings,
        #[serde(default = "default_sample")]
        sample_ms: u64,
    },
    /// The current (or last) migration's progress.
    MigrationStatus,
    /// Cancel a migration that has not committed yet; the VM keeps running here.
    MigrateCancel,
    /// Settle a migration that is in doubt (Commit sent, no answer): `committed` drops the
    /// paused guest here (the destination has it), `aborted` resumes it here. Only whoever
    /// read the destination's outcome record may say which.
    MigrateResolve { outcome: Outcome },
    /// Start copying disk `disk` (its index) to `target` while the VM runs: every guest write
    /// goes to both copies, one background pass copies the rest (skipping holes and zero
    /// blocks). `target` is an image file of the same size that reads as zeros (a new sparse
    /// file), or an NBD export; the VMM locks and opens it. The VM keeps using its disk.
    MirrorStart {
        disk: usize,
        target: PathBuf,
        /// Cap for the background pass, Mbit/s (0: none); guest writes are never held back.
        #[serde(default)]
        bandwidth_mbit: u64,
    },
    /// Every disk mirror's progress.
    MirrorStatus,
    /// Switch disk `disk` to its copy once the copy is complete: the copy is flushed, the guest
    /// uses it from the next request on, the old image is closed (its lock let go). Nothing
    /// is in flight during the switch.
    MirrorComplete { disk: usize },
    /// Stop mirroring disk `disk`: the copy is closed, the VM stays on its disk.
    MirrorCancel { disk: usize },
}

/// Where a disk mirror is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MirrorState {
    /// The background pass is copying.
    Copying,
    /// The copy is complete and kept in step with every write: it may be switched to.
    Ready,
    /// A write or copy to the target failed (see `error`); the VM is on its disk as before.
    Failed,
}

/// One disk mirror's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MirrorProgress {
    pub disk: usize,
    pub source: PathBuf,
    pub target: PathBuf,
    pub state: MirrorState,
    /// The disk's size.
    pub total_bytes: u64,
    /// How far the background pass has come (copied and skipped).
    pub done_bytes: u64,
    /// Bytes the background pass copied.
    pub copied_bytes: u64,
    /// Bytes it skipped as holes or zero blocks.
    pub skipped_bytes: u64,
    /// Guest writes sent to both copies, bytes.
    pub mirrored_bytes: u64,
    pub elapsed_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// What switching a disk to its copy did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MirrorSwitched {
    pub disk: usize,
    /// The image the VM used before (closed now).
    pub old: PathBuf,
    /// The one it uses now.
    pub new: PathBuf,
    /// How long guest I/O on the disk waited for the switch, ms.
    pub pause_ms: f64,
    pub progress: MirrorProgress,
}

/// What became of a move, as the destination's outcome record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The destination took the VM over (it runs the guest, or ran it).
    Committed,
    /// The destination will never run this move's guest.
    Aborted,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    Running,
    Paused,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmStatus {
    pub state: VmRunState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    /// CPU features the vCPUs were given (names as in /proc/cpuinfo).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The image (path or NBD URI) each disk uses now, in slot order.
    #[serde(default)]
    pub disks: Vec<PathBuf>,
}

/// A VMM's answer.
// One answer per request or progress step, serialised at once: its size in memory does not
// matter, and boxing the body would only complicate every match on it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out.
    Ok(ResponseBody),
    /// It was not; the VM is as it was.
    Error(String),
}

/// The payload of a successful response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    Status(VmStatus),
    Saved {
        dir: PathBuf,
        memory_bytes: u64,
        ms: u64,
    },
    Migration(MigrationProgress),
    Forecast(MigrationForecast),
    Mirrors(Vec<MirrorProgress>),
    MirrorSwitched(MirrorSwitched),
    Done,
}

/// What to do when a migration does not converge in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Give up and keep the VM running on the source.
    #[default]
    Cancel,
    /// Switch over anyway, with a longer pause than the budget.
    Force,
}

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Pre-copy, switching to post-copy only when pre-copy stalls (the guest dirties memory
    /// about as fast as the link sends it) and the destination can.
    #[default]
    Auto,
    /// Copy memory while the guest runs here, then pause briefly for the rest (throttling the
    /// guest if it dirties memory too fast).
    Precopy,
    /// After one pass over memory, run the guest on the destination at once; pages it still
    /// lacks are fetched when it touches them while the rest follows. Once the guest runs
    /// there, losing the source or the link loses the guest (see docs/migration.md).
    Postcopy,
}

/// How to migrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MigrateSettings {
    /// The destination VMM's `host:port` (as given to `ferry vmm receive --listen`).
    pub to: String,
    /// Longest pause the guest may see, in ms (the switch-over happens once the rest fits).
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Bandwidth cap in Mbit/s; 0 = none.
    #[serde(default)]
    pub bandwidth_mbit: u64,
    /// Give up (or force, see `on_timeout`) after this many seconds; 0 = never.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Names the move in outcome records (the host daemon sets it); made up if empty.
    #[serde(default)]
    pub migration_id: String,
    /// Encrypt the stream (mutual TLS with the destination VMM); unset: plain TCP.
    #[serde(default)]
    pub tls: Option<MigrationTls>,
    #[serde(default)]
    pub mode: MigrationMode,
    /// Post-copy: how long (s) both sides wait for a broken connection to come back before
    /// they give up (the guest waits meanwhile); 0 = give up at once.
    #[serde(default = "default_recovery")]
    pub postcopy_recovery_s: u64,
    /// Whether pages go compressed (deltas against the copy sent before, lz4).
    #[serde(default)]
    pub compression: Compression,
    /// The cache of pages sent, for deltas, in MiB; 0 = a quarter of guest memory, at most
    /// 1 GiB.
    #[serde(default)]
    pub delta_cache_mib: u64,
    /// Connections pre-copy's pages go on (like QEMU's multifd), 1..=8; more than one pays
    /// where one connection cannot fill the link (one core's worth of TLS or compression).
    /// 0 = one. A destination older than protocol 6 gets one.
    #[serde(default)]
    pub channels: u32,
}

/// Whether a migration compresses the pages it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Where the sender measures that it pays: a page sent before goes as a delta when the
    /// guest changed little of it; lz4 is used while it moves more pages per second than
    /// sending them as they are (so a fast link never gets slower).
    #[default]
    Auto,
    /// Never (pages go as they are; zero pages are always skipped).
    Off,
    /// Deltas and lz4 on every message, measured or not.
    On,
}

/// How a VMM secures a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MigrationTls {
    /// The host's credentials directory (me.key, me.crt, ca.crt, cluster.jwt).
    pub dir: PathBuf,
    /// The host the other VMM must prove to be.
    pub peer: String,
}

fn default_downtime() -> u64 {
    300
}

fn default_timeout() -> u64 {
    600
}

fn default_recovery() -> u64 {
    60
}

fn default_sample() -> u64 {
    3000
}

/// What a migration would do, predicted from what was measured (`Request::MigrateForecast`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct MigrationForecast {
    /// The link to the destination as measured (Mbit/s, with the bandwidth cap applied), and
    /// its round-trip time (ms).
    pub link_mbit: f64,
    pub rtt_ms: f64,
    /// How long the guest's memory was watched (ms).
    pub sample_ms: u64,
    /// Pages the guest dirtied per second (distinct pages per 250 ms window, scaled).
    pub dirty_rate_pps: u64,
    /// Distinct pages dirtied over the whole sample: the working set the rounds chase.
    pub working_set_pages: u64,
    /// Bytes the first pass would send (pages that hold data in full, zero pages as a mark).
    pub first_pass_bytes: u64,
    /// The mode the move would use, and why.
    pub mode: MigrationMode,
    pub reason: String,
    /// Pre-copy rounds after the first pass.
    pub rounds: u32,
    /// Predicted total time (ms), pause (ms) and bytes sent.
    pub total_ms: f64,
    pub pause_ms: f64,
    pub bytes: u64,
    /// Post-copy: pages still to go once the guest runs on the destination.
    pub postcopy_pages: u64,
    /// False if the move would not finish (pre-copy only, the guest out-dirties the link).
    pub converges: bool,
}

impl MigrateSettings {
    /// Settings with the defaults (300 ms downtime budget, no cap, 10 min, cancel on timeout).
    pub fn to(addr: impl Into<String>) -> Self {
        MigrateSettings {
            to: addr.into(),
            downtime_ms: default_downtime(),
            bandwidth_mbit: 0,
            timeout_s: default_timeout(),
            on_timeout: OnTimeout::Cancel,
            migration_id: String::new(),
            tls: None,
            mode: MigrationMode::Auto,
            postcopy_recovery_s: default_recovery(),
            compression: Compression::Auto,
            delta_cache_mib: 0,
            channels: 0,
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    #[default]
    Connecting,
    Memory,
    Switchover,
    Committing,
    /// The guest runs on the destination, which still fetches the pages it lacks from here;
    /// this VMM keeps serving them until every page is there.
    Postcopy,
    /// Commit was sent and no answer came: the guest stays paused here until the
    /// destination's outcome record is known (queried every second, or `MigrateResolve`).
    InDoubt,
    /// The destination runs the guest; this VMM is about to exit.
    Done,
    /// It failed; the guest runs on here as before.
    Failed,
    /// It was cancelled; the guest runs on here as before.
    Cancelled,
}

/// A migration's progress and, at the end, its report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
pub struct MigrationProgress {
    #[serde(default)]
    pub migration_id: String,
    pub phase: MigrationPhase,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages found dirty at the start of the current round.
    pub dirty_pages: u64,
    /// Pages the guest dirties per second (last round).
    pub dirty_rate_pps: u64,
    /// Measured link throughput, Mbit/s.
    pub bandwidth_mbit: f64,
    /// What switching over now would cost, ms.
    pub expected_downtime_ms: f64,
    pub elapsed_ms: u64,
    /// The pause, measured by the source from pausing to the destination's "running".
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    pub converged: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// How memory moved: `precopy` or `postcopy` (`auto` until it is decided).
    #[serde(default)]
    pub mode: MigrationMode,
    /// Why that mode (for `auto`).
    #[serde(default)]
    pub mode_reason: Option<String>,
    /// Post-copy: pages the destination still lacks.
    #[serde(default)]
    pub postcopy_pages_left: u64,
    /// Post-copy: pages the destination's guest asked for on demand.
    #[serde(default)]
    pub postcopy_pages_requested: u64,
    /// Post-copy: how many times a broken connection was made again.
    #[serde(default)]
    pub postcopy_recoveries: u32,
    /// Post-copy: the connection is broken and the source is making it again (the guest on
    /// the destination waits for its missing pages meanwhile).
    #[serde(default)]
    pub postcopy_reconnecting: bool,
    /// Post-copy broke past its limit after the guest had started on the destination: it
    /// cannot go on there without the pages it lacked, and must not resume here (it ran there
    /// since). The guest is lost; this VMM keeps its paused copy as of the switch-over.
    #[serde(default)]
    pub guest_lost: bool,
    /// Pages sent as deltas against the copy the destination had.
    #[serde(default)]
    pub delta_pages: u64,
    /// Bytes those deltas took (a page is 4096).
    #[serde(default)]
    pub delta_bytes: u64,
    /// Bytes of pages and deltas that went through lz4, and what lz4 made of them.
    #[serde(default)]
    pub lz4_in_bytes: u64,
    #[serde(default)]
    pub lz4_out_bytes: u64,
    /// What compression did and why (`auto`), for the report.
    #[serde(default)]
    pub compression_note: Option<String>,
    /// Connections pre-copy's pages went on (0 or 1: the main one alone).
    #[serde(default)]
    pub channels: u32,
}
