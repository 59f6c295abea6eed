//! The host daemon's management API: one serde type per request and response body, shared by
//! the daemon, the CLI and the daemons talking to each other. `openapi.json` (see
//! [`crate::openapi`]) describes the same types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::{MigrationProgress, Outcome, VmConfig};

/// Default for how many live migrations a host runs at once.
pub const DEFAULT_MAX_MIGRATIONS: u32 = 2;
/// Default for how many storage moves a host runs at once.
pub const DEFAULT_MAX_STORAGE_MOVES: u32 = 2;

/// A host's migration settings: what an admin turns on and limits, kept in the daemon's state
/// directory. Live migration is off on a new host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostSettings {
    /// Whether this host may send and receive live migrations.
    #[serde(default)]
    pub live_migration: bool,
    /// Live migrations (sending and receiving together) that may run at once; more wait.
    #[serde(default = "default_max_migrations")]
    pub max_migrations: u32,
    /// Storage moves that may run at once; more wait.
    #[serde(default = "default_max_storage_moves")]
    pub max_storage_moves: u32,
    /// Networks migration traffic may use (CIDRs like `10.0.0.0/24`); empty: any.
    #[serde(default)]
    pub migration_networks: Vec<String>,
    /// Memory this host offers to its VMs, MiB (unset: whatever the host has available).
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// CPU features this host does not offer to VMs (names as in /proc/cpuinfo), so that VMs
    /// started here can move to hosts whose processors lack them.
    #[serde(default)]
    pub cpu_hide: Vec<String>,
    /// How moves from (and to) this host are authorised.
    #[serde(default)]
    pub migration_auth: MigrationAuth,
    /// Networks (CIDRs) this host trusts enough to send migration streams in the clear, if the
    /// other host trusts them too; elsewhere every stream is encrypted.
    #[serde(default)]
    pub plaintext_migration_networks: Vec<String>,
}

/// How a move is authorised on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationAuth {
    /// A move may be started only from the source host itself (its local socket, by a local
    /// admin); a destination accepts moves from hosts of the migration group.
    #[default]
    Console,
    /// A move carries a grant signed by an admin (VM, hosts, disks, expiry, single use); the
    /// source and the destination act only inside it.
    Delegated,
}

fn default_max_migrations() -> u32 {
    DEFAULT_MAX_MIGRATIONS
}

fn default_max_storage_moves() -> u32 {
    DEFAULT_MAX_STORAGE_MOVES
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            live_migration: false,
            max_migrations: DEFAULT_MAX_MIGRATIONS,
            max_storage_moves: DEFAULT_MAX_STORAGE_MOVES,
            migration_networks: Vec::new(),
            memory_limit_mib: None,
            cpu_hide: Vec::new(),
            migration_auth: MigrationAuth::Console,
            plaintext_migration_networks: Vec::new(),
        }
    }
}

/// A change to a host's settings (`PATCH /v1/host`): what is given changes, the rest stays.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSettingsPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_migration: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_migrations: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_storage_moves: Option<u32>,
    /// Replaces the list; `[]` means any network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_networks: Option<Vec<String>>,
    /// `0` removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Replaces the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_hide: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_auth: Option<MigrationAuth>,
    /// Replaces the list; `[]`: encrypt everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext_migration_networks: Option<Vec<String>>,
}

/// Memory as a host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostMemory {
    pub total_mib: u64,
    /// What the kernel says is available now.
    pub available_mib: u64,
    /// Guest RAM of the VMs defined and running here (and arriving).
    pub used_by_vms_mib: u64,
    /// What a new or arriving VM may still have.
    pub free_for_vms_mib: u64,
}

/// Another host this daemon knows, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Peer {
    pub name: String,
    /// `host:port` of its daemon.
    pub addr: String,
}

/// The live-migration protocol versions a host speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProtocolRange {
    pub min: u32,
    pub max: u32,
}

/// Moves on a host right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MoveCounts {
    /// Moves sending from here.
    pub outgoing: u32,
    /// Moves arriving here.
    pub incoming: u32,
    /// Moves waiting for a free slot.
    pub queued: u32,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostInfo {
    pub name: String,
    /// ferry's version on this host.
    pub version: String,
    pub protocol: ProtocolRange,
    /// This host's IPv4 addresses.
    pub addresses: Vec<String>,
    pub settings: HostSettings,
    pub memory: HostMemory,
    pub cpu_model: String,
    /// CPU features this host offers to VMs.
    pub cpu_features: Vec<String>,
    /// Linux bridges VMs may plug into.
    pub bridges: Vec<String>,
    pub vms_running: u32,
    pub vms_defined: u32,
    pub moves: MoveCounts,
    pub peers: Vec<Peer>,
}

/// `POST /v1/vms`: define a VM (and start it if asked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// Letters, digits, `-`, `_` and `.`, up to 63, starting with a letter or digit.
    pub name: String,
    /// The VM. Its serial ports are the daemon's to wire (they are ignored here).
    pub config: VmConfig,
    /// Start it right away.
    #[serde(default)]
    pub start: bool,
}

/// `POST /v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStop {
    /// Kill the VMM instead of asking it to quit.
    #[serde(default)]
    pub force: bool,
}

/// Where a VM is in its life on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, no VMM runs.
    Stopped,
    /// Its VMM is starting.
    Starting,
    Running,
    Paused,
    /// Its VMM ended on its own (see `last_exit`); ferry does not restart it.
    Crashed,
    /// Arriving from another host; not this host's until the move commits.
    Incoming,
    /// Moving to another host.
    Moving,
}

/// How a VMM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmExitInfo {
    /// "exit status 0", "killed by signal 9", ...
    pub status: String,
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    /// Why, when the VMM said (PowerOff, Reset, Quit, MigratedAway).
    #[serde(default)]
    pub reason: Option<String>,
    /// When it ended, ms since the Unix epoch.
    pub at_ms: u64,
    /// The last lines it logged.
    #[serde(default)]
    pub log_tail: Vec<String>,
}

/// A VM as a host daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmInfo {
    pub name: String,
    /// The host that reports it.
    pub host: String,
    pub state: VmState,
    pub config: VmConfig,
    /// The VMM's process ID, while one runs.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub uptime_ms: Option<u64>,
    /// CPU features the VM was started with.
    #[serde(default)]
    pub cpu_features: Vec<String>,
    #[serde(default)]
    pub last_exit: Option<VmExitInfo>,
    /// The move under way, if any.
    #[serde(default)]
    pub move_id: Option<String>,
    /// The serial ports' sockets on this host (COM1, COM2).
    pub console: String,
    pub console2: String,
}

/// `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
}

/// How a move runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveSettings {
    /// Longest pause the guest may see, ms.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Bandwidth cap, Mbit/s (0: none).
    #[serde(default)]
    pub bandwidth_mbit: u64,
    /// Give up after this many seconds (0: never).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Connections for the memory copy (1..=8; 0: the daemon's choice, two for an encrypted
    /// stream, whose encryption one core bounds, and one otherwise).
    #[serde(default)]
    pub channels: u32,
    /// How memory moves: auto (pre-copy with compression and throttling, post-copy only
    /// where pre-copy could not converge), precopy, or postcopy (one pass, then the guest runs
    /// on the destination and fetches what it still lacks from the source).
    #[serde(default)]
    pub mode: crate::MigrationMode,
    /// Post-copy: how long both hosts wait for a broken migration link to come back, s (the
    /// guest on the destination waits meanwhile; past that it is lost). 0: not at all.
    #[serde(default = "default_recovery_s")]
    pub postcopy_recovery_s: u64,
}

fn default_recovery_s() -> u64 {
    60
}

fn default_downtime_ms() -> u64 {
    300
}

fn default_timeout_s() -> u64 {
    600
}

impl Default for MoveSettings {
    fn default() -> Self {
        MoveSettings {
            downtime_ms: default_downtime_ms(),
            bandwidth_mbit: 0,
            timeout_s: default_timeout_s(),
            channels: 0,
            mode: crate::MigrationMode::Auto,
            postcopy_recovery_s: default_recovery_s(),
        }
    }
}

/// Where one disk goes in a storage move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskMove {
    /// The disk: its index (`0`), its path or URI, or its file name.
    pub disk: String,
    /// A folder on the VM's host (an absolute path), or a share (`[FILESERVER:]SHARE`).
    pub to: String,
}

/// `POST /v1/moves` and `POST /v1/moves/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub vm: String,
    /// The destination host: a peer's name or its daemon's `host:port`. Empty (or this host)
    /// with `storage_to`/`disk_to`: a storage move, the VM stays where it runs.
    #[serde(default)]
    pub to: String,
    /// Move every disk too: to a folder on the VM's host (an absolute path) or to a share
    /// (`[FILESERVER:]SHARE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_to: Option<String>,
    /// Per-disk destinations (override `storage_to` for the disks they name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_to: Vec<DiskMove>,
    /// Keep each moved disk's old copy (default: removed once the VM uses the new one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_source: bool,
    #[serde(default)]
    pub settings: MoveSettings,
    /// An admin's signed grant for this move (hosts in delegated mode require one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// One item of a compatibility check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CheckItem {
    /// What was checked (e.g. "cpu", "memory", "network").
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Whether a VM can move from one host to another; a failed check moves nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CheckReport {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub ok: bool,
    pub checks: Vec<CheckItem>,
}

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Waiting for a free migration slot (on either host).
    Queued,
    Checking,
    /// The destination is starting its receiving VMM.
    Preparing,
    /// Memory is being copied.
    Migrating,
    /// The guest is paused for the hand-over.
    Switchover,
    /// Post-copy: the guest runs on the destination (the move has committed), which still
    /// fetches the pages it lacks from the source while the rest follows.
    Postcopy,
    /// The hand-over's last answer was lost; the daemons are settling who has the VM.
    Settling,
    Done,
    Failed,
    Cancelled,
}

impl MoveState {
    /// Whether the move has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MoveState::Done | MoveState::Failed | MoveState::Cancelled
        )
    }
}

/// What a move did, at its end (`ferry move --json` prints this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MoveReport {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// "done", "failed" or "cancelled".
    pub result: String,
    pub total_ms: u64,
    /// The pause, as ferry measured it (from pausing to the destination's "running").
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    pub bytes: u64,
    pub rounds: u32,
    /// Time spent waiting for a free slot, ms.
    #[serde(default)]
    pub queued_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// Where the VM runs now.
    pub runs_on: String,
    /// Whether the migration stream was encrypted (false only on a network both hosts trust
    /// for plaintext migration).
    #[serde(default)]
    pub encrypted: bool,
    /// How the move was authorised ("console", "grant ... signed by admin alice").
    #[serde(default)]
    pub auth: Option<String>,
    /// The disks a storage move moved (or tried to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskMoveReport>,
    /// The source VMM's last report of the memory copy: the mode it used and why,
    /// compression, connections, post-copy's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}

/// What a storage move did with one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiskMoveReport {
    pub disk: usize,
    pub from: String,
    pub to: String,
    /// Whether the VM uses the new copy now.
    pub switched: bool,
    /// Bytes the background pass copied, and skipped as holes or zeros.
    pub copied_bytes: u64,
    pub skipped_bytes: u64,
    /// Guest writes sent to both copies meanwhile.
    pub mirrored_bytes: u64,
    /// How long guest I/O on the disk waited for the switch, ms.
    #[serde(default)]
    pub pause_ms: Option<f64>,
    /// What became of the old copy ("removed", "kept", or why it stays).
    #[serde(default)]
    pub old_copy: Option<String>,
}

/// A move: a resource with an id, a state and progress (`GET /v1/moves/{id}`; its
/// `/events` stream sends one of these at every change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MoveInfo {
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub state: MoveState,
    /// Why it waits, while queued.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// The memory copy, as the VMM reports it.
    #[serde(default)]
    pub progress: Option<MigrationProgress>,
    /// The disk copies of a storage move, as the VMM reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<crate::MirrorProgress>,
    #[serde(default)]
    pub check: Option<CheckReport>,
    #[serde(default)]
    pub report: Option<MoveReport>,
    #[serde(default)]
    pub error: Option<String>,
    /// When it was asked for, ms since the Unix epoch.
    pub created_ms: u64,
}

/// `GET /v1/moves`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MoveList {
    pub moves: Vec<MoveInfo>,
}

/// `POST /v1/evacuate`: move every running VM off this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvacuateRequest {
    /// Destinations to spread the VMs over (peer names or `host:port`); empty: every peer.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub settings: MoveSettings,
}

/// A VM an evacuation leaves where it is, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Skipped {
    pub vm: String,
    pub reason: String,
}

/// The moves an evacuation started, and the VMs it could not move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EvacuateInfo {
    pub moves: Vec<MoveInfo>,
    pub skipped: Vec<Skipped>,
}

/// Every error answer: a 4xx or 5xx status with this body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// What was wrong, and what to do about it.
    pub error: String,
    /// A stable word for scripts: bad_request, not_found, conflict, migration_disabled,
    /// check_failed, busy, internal.
    pub code: String,
    /// A failed compatibility check, when that was the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Box<CheckReport>>,
}

// ---- daemon to daemon ----

/// What a destination needs to know to check and receive a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingCheck {
    pub vm: String,
    /// The source's plaintext migration networks (see HostSettings).
    #[serde(default)]
    pub plaintext_networks: Vec<String>,
    pub config: VmConfig,
    /// CPU features the VM was started with.
    pub cpu_features: Vec<String>,
    /// The source host's name.
    pub from: String,
    /// The source host's addresses, inside its migration networks.
    pub from_addresses: Vec<String>,
    pub version: String,
    pub protocol: ProtocolRange,
    /// Disks that come along into the destination's own folders (a shared-nothing move): the
    /// destination checks the folder instead of the disk's path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks_to: Vec<DiskTargetSpec>,
}

/// The destination's side of a compatibility check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncomingCheckReply {
    /// The destination's name.
    pub host: String,
    pub checks: Vec<CheckItem>,
    /// The address the destination would receive on.
    #[serde(default)]
    pub listen_ip: Option<String>,
}

/// `POST /v1/incoming`: get ready to receive move `move_id`. Also the body of `POST
/// /v1/disk-targets`, where a shared-nothing move's destination checks again, then makes the
/// empty copies `check.disks_to` asks for and serves them to the source for that move only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    pub move_id: String,
    pub check: IncomingCheck,
    /// The admin's grant for this move (a destination in delegated mode requires one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// One disk a shared-nothing move brings to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskTargetSpec {
    /// The disk's index in the VM.
    pub index: usize,
    /// The destination's folder (absolute).
    pub folder: PathBuf,
    /// The file name the copy gets there.
    pub name: String,
    pub size_bytes: u64,
    /// What the source has allocated: the most space the copy may take.
    pub allocated_bytes: u64,
}

/// The copies the destination made and serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskTargetReply {
    pub disks: Vec<DiskTarget>,
}

/// One empty copy made and served for a shared-nothing move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskTarget {
    pub index: usize,
    /// The copy's path on the destination (what the VM's definition names there after the move).
    pub path: PathBuf,
    /// Where the source VMM writes it (`nbds://IP:PORT/EXPORT` or `nbd://` without a cluster).
    pub uri: String,
}

/// Where the destination's VMM waits for the source's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncomingReply {
    /// `ip:port` for the source VMM.
    pub listen: String,
    /// Whether the stream must be encrypted (mutual TLS between the VMMs).
    #[serde(default = "yes")]
    pub encrypted: bool,
}

fn yes() -> bool {
    true
}

/// An arriving move, as the destination sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncomingState {
    /// The receiving VMM waits or receives.
    Receiving,
    /// The move committed: the VM is this host's.
    Committed,
    /// It will never run here.
    Aborted,
}

/// `GET /v1/incoming/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IncomingInfo {
    pub move_id: String,
    pub vm: String,
    pub from: String,
    pub state: IncomingState,
}

/// `POST /v1/incoming/{id}/settle`: the move's outcome, decided now if it was not yet
/// (aborted, unless the destination had committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SettleReply {
    pub outcome: Outcome,
}

/// Check a VM name.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_vm_name("web01"));
        assert!(valid_vm_name("a.b-c_d"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name("-x"));
        assert!(!valid_vm_name("../etc"));
        assert!(!valid_vm_name("a/b"));
        assert!(!valid_vm_name(&"x".repeat(64)));
    }

    #[test]
    fn settings_default_to_migration_off() {
        let s: HostSettings = serde_json::from_str("{}").unwrap();
        assert!(!s.live_migration);
        assert_eq!(s.max_migrations, 2);
        assert_eq!(s.max_storage_moves, 2);
        let p: Result<HostSettingsPatch, _> = serde_json::from_str(r#"{"live_migraton":true}"#);
        assert!(p.is_err(), "a misspelt setting is refused, not ignored");
    }
}
