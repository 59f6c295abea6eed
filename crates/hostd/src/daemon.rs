//! The daemon's state and its VMs: one owner of everything the host knows ([`Daemon`], a
//! mutex held only for short sections, never across an await), the VM operations, and the
//! supervisor that watches every VMM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_api::host::{
    HostInfo, HostMemory, HostSettings, HostSettingsPatch, MoveCounts, Peer, ProtocolRange,
    VmCreate, VmExitInfo, VmInfo, VmState,
};
use ferry_api::{Request, Response, ResponseBody, SerialBackend, VmConfig, VmRunState};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::{ApiError, ApiResult};
use crate::hostinfo;
use crate::incoming::InMove;
use crate::moves::OutMove;
use crate::state::{self, StateDir};
use crate::vmm::{self, RunDir};

/// A VM's definition, as kept in `vms/<name>/vm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub config: VmConfig,
    pub created_ms: u64,
    /// Arriving by this move and not this host's until it commits.
    #[serde(default)]
    pub incoming: Option<String>,
    /// CPU features the VM was started with (kept across moves).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// Where it came from, if it moved here.
    #[serde(default)]
    pub origin: Option<String>,
}

/// What the daemon knows of a VM's VMM right now (not persisted: read again from the run
/// directory and the VMM itself).
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub pid: Option<u32>,
    pub run_state: Option<VmRunState>,
    pub uptime_ms: Option<u64>,
    pub last_exit: Option<VmExitInfo>,
    /// The daemon asked it to stop.
    pub stopping: bool,
    /// Started by this daemon at this instant, and not yet seen running.
    pub starting: Option<Instant>,
    pub last_status: Option<Instant>,
    /// When its process was first seen gone without an exit record yet (the monitor writes
    /// `exit.json` a moment after the VMM ends).
    pub gone_since: Option<Instant>,
}

/// A VM on this host.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub record: VmRecord,
    pub live: Live,
}

/// Everything the daemon's state mutex guards.
pub struct Inner {
    pub settings: HostSettings,
    pub vms: BTreeMap<String, VmEntry>,
    pub outgoing: BTreeMap<String, OutMove>,
    pub incoming: BTreeMap<String, InMove>,
    /// Disk copies served for shared-nothing moves arriving here, by move id.
    pub targets: BTreeMap<String, crate::targets::Served>,
}

/// Static facts and the shared state of one host daemon.
pub struct Daemon {
    pub name: String,
    pub state: StateDir,
    /// The `ferry` binary VMMs run from.
    pub ferry: PathBuf,
    /// Known hosts: name -> daemon address.
    pub peers: BTreeMap<String, String>,
    /// This daemon's own TCP address, if it has one.
    pub listen: Option<String>,
    /// CPU features KVM offers here (before the host's `cpu_hide`).
    pub kvm_features: Vec<String>,
    pub cpu_model: String,
    /// Its place in the cluster (credentials, trust, TLS configs, maybe the authority); None
    /// for a daemon that has not joined one (it then serves only its local socket, unless run
    /// with --insecure).
    pub security: Option<crate::security::Security>,
    inner: Mutex<Inner>,
    /// Woken whenever a migration slot frees or a move changes, so queued moves look again.
    pub moves_changed: Notify,
}

/// Why a VMM ended counts as a crash unless the daemon stopped it or the guest shut down.
fn crashed(e: &VmExitInfo, stopping: bool) -> bool {
    let normal = e.code == Some(0)
        && e.reason.as_deref().is_some_and(|r| {
            matches!(r, "PowerOff" | "Reset" | "Quit" | "Signal" | "MigratedAway")
        });
    !(normal || stopping)
}

fn assign_macs(c: &mut VmConfig, seed: &str) {
    for (i, n) in c.nets.iter_mut().enumerate() {
        if n.mac.is_none() {
            let mut h: u32 = 2166136261;
            for b in format!("{seed}/{i}/{}", vmm::now_ms()).bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(16777619);
            }
            let b = h.to_le_bytes();
            n.mac = Some(ferry_api::format_mac(&[0x52, 0x54, 0x00, b[0], b[1], b[2]]));
        }
    }
}

impl Daemon {
    pub fn new(
        name: String,
        state: StateDir,
        ferry: PathBuf,
        peers: BTreeMap<String, String>,
        listen: Option<String>,
        kvm_features: Vec<String>,
        security: Option<crate::security::Security>,
    ) -> Result<Daemon, state::StateError> {
        let settings: HostSettings = state::read_json(&state.settings_path())?.unwrap_or_default();
        let d = Daemon {
            name,
            ferry,
            peers,
            listen,
            kvm_features,
            security,
            cpu_model: hostinfo::cpu_model(),
            inner: Mutex::new(Inner {
                settings,
                vms: BTreeMap::new(),
                outgoing: BTreeMap::new(),
                incoming: BTreeMap::new(),
                targets: BTreeMap::new(),
            }),
            moves_changed: Notify::new(),
            state,
        };
        d.load_vms()?;
        Ok(d)
    }

    /// The state, for a short section.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run_dir(&self, vm: &str) -> RunDir {
        RunDir(self.state.run_dir(vm))
    }

    /// Read every VM definition and find its VMM again, if one runs.
    fn load_vms(&self) -> Result<(), state::StateError> {
        let mut vms = BTreeMap::new();
        for e in std::fs::read_dir(self.state.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(record) = state::read_json::<VmRecord>(&self.state.vm_record(&name))? else {
                continue;
            };
            let run = self.run_dir(&name);
            let pid = vmm::running_pid(&run);
            let live = Live {
                pid,
                last_exit: if pid.is_none() {
                    vmm::exit_info(&run)
                } else {
                    None
                },
                ..Default::default()
            };
            if let Some(p) = pid {
                tracing::info!("found VM {name} running (VMM pid {p})");
            }
            vms.insert(name, VmEntry { record, live });
        }
        self.lock().vms = vms;
        Ok(())
    }

    /// Free memory for VMs, and what VMs here take.
    pub fn memory(&self, inner: &Inner) -> HostMemory {
        let (total, available) = hostinfo::memory_mib();
        let used: u64 = inner
            .vms
            .values()
            .filter(|v| {
                v.live.pid.is_some() || v.live.starting.is_some() || v.record.incoming.is_some()
            })
            .map(|v| v.record.config.memory_mib)
            .sum();
        let free = match inner.settings.memory_limit_mib {
            Some(limit) => limit.saturating_sub(used).min(available),
            None => available,
        };
        HostMemory {
            total_mib: total,
            available_mib: available,
            used_by_vms_mib: used,
            free_for_vms_mib: free,
        }
    }

    /// CPU features this host offers VMs (KVM's minus the host's `cpu_hide`).
    pub fn offered_features(&self, settings: &HostSettings) -> Vec<String> {
        self.kvm_features
            .iter()
            .filter(|f| !settings.cpu_hide.contains(f))
            .cloned()
            .collect()
    }

    /// Live migrations in progress here (sending and receiving), and queued ones.
    pub fn move_counts(&self, inner: &Inner) -> MoveCounts {
        MoveCounts {
            outgoing: inner
                .outgoing
                .values()
                .filter(|m| m.holds_slot && !m.storage_only)
                .count() as u32,
            incoming: inner.incoming.values().filter(|m| m.active()).count() as u32,
            queued: inner
                .outgoing
                .values()
                .filter(|m| m.info.state == ferry_api::host::MoveState::Queued)
                .count() as u32,
        }
    }

    pub fn host_info(&self) -> HostInfo {
        let g = self.lock();
        let running = g.vms.values().filter(|v| v.live.pid.is_some()).count() as u32;
        HostInfo {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: protocol_range(),
            addresses: hostinfo::addresses()
                .iter()
                .map(|a| a.net.to_string())
                .collect(),
            settings: g.settings.clone(),
            memory: self.memory(&g),
            cpu_model: self.cpu_model.clone(),
            cpu_features: self.offered_features(&g.settings),
            bridges: hostinfo::bridges(),
            vms_running: running,
            vms_defined: g
                .vms
                .values()
                .filter(|v| v.record.incoming.is_none())
                .count() as u32,
            moves: self.move_counts(&g),
            peers: self
                .peers
                .iter()
                .map(|(n, a)| Peer {
                    name: n.clone(),
                    addr: a.clone(),
                })
                .collect(),
        }
    }

    /// Change the host's settings (checked first; nothing changes on a bad value).
    pub fn set_settings(&self, p: HostSettingsPatch) -> ApiResult<HostInfo> {
        {
            let mut g = self.lock();
            let mut s = g.settings.clone();
            if let Some(v) = p.live_migration {
                s.live_migration = v;
            }
            if let Some(v) = p.max_migrations {
                if v == 0 {
                    return Err(ApiError::bad_request(
                        "max_migrations must be at least 1 (turn live migration off instead)",
                    ));
                }
                s.max_migrations = v;
            }
            if let Some(v) = p.max_storage_moves {
                if v == 0 {
                    return Err(ApiError::bad_request(
                        "max_storage_moves must be at least 1",
                    ));
                }
                s.max_storage_moves = v;
            }
            if let Some(v) = p.migration_networks {
                hostinfo::parse_nets(&v).map_err(ApiError::bad_request)?;
                s.migration_networks = v;
            }
            if let Some(v) = p.memory_limit_mib {
                s.memory_limit_mib = (v > 0).then_some(v);
            }
            if let Some(v) = p.cpu_hide {
                if let Some(bad) = v.iter().find(|f| !ferry_vmm::cpu_features::known(f)) {
                    return Err(ApiError::bad_request(format!(
                        "CPU feature {bad:?} is not one ferry knows (names as in /proc/cpuinfo, e.g. avx2)"
                    )));
                }
                s.cpu_hide = v;
            }
            if let Some(v) = p.migration_auth {
                s.migration_auth = v;
            }
            if let Some(v) = p.plaintext_migration_networks {
                hostinfo::parse_nets(&v).map_err(ApiError::bad_request)?;
                s.plaintext_migration_networks = v;
            }
            state::write_json(&self.state.settings_path(), &s)?;
            tracing::info!("settings changed: {s:?}");
            g.settings = s;
        }
        self.moves_changed.notify_waiters();
        Ok(self.host_info())
    }

    /// A VM's public view.
    pub fn vm_info(&self, inner: &Inner, name: &str) -> Option<VmInfo> {
        let v = inner.vms.get(name)?;
        let moving = inner
            .outgoing
            .values()
            .find(|m| m.info.vm == name && !m.info.state.is_final());
        let run = self.run_dir(name);
        let state = if v.record.incoming.is_some() {
            VmState::Incoming
        } else if moving.is_some_and(|m| m.holds_slot) {
            VmState::Moving
        } else if v.live.pid.is_some() {
            match v.live.run_state {
                Some(VmRunState::Paused) => VmState::Paused,
                Some(VmRunState::Running) => VmState::Running,
                None => VmState::Starting,
            }
        } else if v.live.starting.is_some() {
            VmState::Starting
        } else {
            match &v.live.last_exit {
                Some(e) if crashed(e, v.live.stopping) => VmState::Crashed,
                _ => VmState::Stopped,
            }
        };
        Some(VmInfo {
            name: name.into(),
            host: self.name.clone(),
            state,
            config: v.record.config.clone(),
            pid: v.live.pid,
            uptime_ms: v.live.uptime_ms,
            cpu_features: v.record.cpu_features.clone(),
            last_exit: v.live.last_exit.clone(),
            move_id: moving
                .map(|m| m.info.id.clone())
                .or_else(|| v.record.incoming.clone()),
            console: run.con().display().to_string(),
            console2: run.con2().display().to_string(),
        })
    }

    pub fn vm(&self, name: &str) -> ApiResult<VmInfo> {
        let g = self.lock();
        self.vm_info(&g, name)
            .ok_or_else(|| ApiError::not_found(format!("no VM named {name:?} on {}", self.name)))
    }

    pub fn vms(&self) -> Vec<VmInfo> {
        let g = self.lock();
        g.vms.keys().filter_map(|n| self.vm_info(&g, n)).collect()
    }

    /// Define a VM.
    pub async fn create(self: &Arc<Self>, req: VmCreate) -> ApiResult<VmInfo> {
        let name = req.name.clone();
        if !ferry_api::host::valid_vm_name(&name) {
            return Err(ApiError::bad_request(format!(
                "{name:?} is not a VM name: use letters, digits, '-', '_' and '.', up to 63, starting with a letter or digit"
            )));
        }
        let mut config = req.config;
        config
            .validate()
            .map_err(|e| ApiError::bad_request(format!("invalid VM config: {e}")))?;
        if let Some(bad) = config
            .cpu_hide
            .iter()
            .find(|f| !ferry_vmm::cpu_features::known(f))
        {
            return Err(ApiError::bad_request(format!(
                "CPU feature {bad:?} is not one ferry knows (names as in /proc/cpuinfo, e.g. avx2)"
            )));
        }
        let kernel = std::path::absolute(&config.kernel).unwrap_or(config.kernel.clone());
        if !kernel.is_file() {
            return Err(ApiError::bad_request(format!(
                "kernel {} does not exist on {} (give a path on this host)",
                kernel.display(),
                self.name
            )));
        }
        config.kernel = kernel;
        for m in &mut config.initrd {
            let p = std::path::absolute(&m.path).unwrap_or(m.path.clone());
            if !p.is_file() {
                return Err(ApiError::bad_request(format!(
                    "initrd {} does not exist on {} (give a path on this host)",
                    p.display(),
                    self.name
                )));
            }
            if m.cmdline.is_none() && p != m.path {
                // What the kernel is told stays what the admin wrote.
                m.cmdline = Some(m.path.display().to_string());
            }
            m.path = p;
        }
        for d in &mut config.disks {
            if let Some(uri) = d.nbd_uri() {
                // On a file server: checked when the VM starts (its lease, its access list).
                ferry_nbd::client::parse_uri(uri)
                    .map_err(|e| ApiError::bad_request(format!("disk {uri}: {e}")))?;
                continue;
            }
            let p = std::path::absolute(&d.path).unwrap_or(d.path.clone());
            if !p.is_file() {
                return Err(ApiError::bad_request(format!(
                    "disk image {} does not exist on {} (make it first, e.g. `truncate -s 8G {}`)",
                    p.display(),
                    self.name,
                    p.display()
                )));
            }
            d.path = p;
        }
        for n in &config.nets {
            let (kind, ifname) = match &n.backend {
                ferry_api::NetBackend::Bridge(b) => ("bridge", b),
                ferry_api::NetBackend::Tap(t) => ("tap", t),
            };
            if !hostinfo::interface_exists(ifname) {
                return Err(ApiError::bad_request(format!(
                    "{kind} {ifname} does not exist on {}",
                    self.name
                )));
            }
        }
        let sock = self.run_dir(&name).con2();
        if sock.as_os_str().len() > 100 {
            return Err(ApiError::bad_request(format!(
                "the VM's socket path {} would be too long for a unix socket; use a shorter --state-dir or VM name",
                sock.display()
            )));
        }
        assign_macs(&mut config, &format!("{}/{name}", self.name));
        let run = self.run_dir(&name);
        config.serial = SerialBackend::Unix(run.con());
        config.serial2 = SerialBackend::Unix(run.con2());
        let record = VmRecord {
            name: name.clone(),
            config,
            created_ms: vmm::now_ms(),
            incoming: None,
            cpu_features: Vec::new(),
            origin: None,
        };
        {
            let mut g = self.lock();
            if g.vms.contains_key(&name) {
                return Err(ApiError::conflict(format!(
                    "a VM named {name:?} already exists on {}",
                    self.name
                )));
            }
            let dir = self.state.vm_dir(&name);
            std::fs::create_dir_all(dir.join("run"))
                .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
            state::write_json(&self.state.vm_record(&name), &record)?;
            g.vms.insert(
                name.clone(),
                VmEntry {
                    record,
                    live: Live::default(),
                },
            );
        }
        tracing::info!("VM {name} defined");
        if req.start {
            return self.start(&name).await;
        }
        self.vm(&name)
    }

    /// The config a VMM runs with: the VM's, with this host's serial sockets and hidden CPU
    /// features.
    fn effective_config(&self, record: &VmRecord, settings: &HostSettings) -> VmConfig {
        let run = self.run_dir(&record.name);
        let mut c = record.config.clone();
        c.serial = SerialBackend::Unix(run.con());
        c.serial2 = SerialBackend::Unix(run.con2());
        for f in &settings.cpu_hide {
            if !c.cpu_hide.contains(f) {
                c.cpu_hide.push(f.clone());
            }
        }
        c
    }

    /// Start a VM's VMM.
    pub async fn start(self: &Arc<Self>, name: &str) -> ApiResult<VmInfo> {
        let (config, run) = {
            let mut g = self.lock();
            let info = self.vm_info(&g, name).ok_or_else(|| {
                ApiError::not_found(format!("no VM named {name:?} on {}", self.name))
            })?;
            match info.state {
                VmState::Stopped | VmState::Crashed => {}
                s => return Err(ApiError::conflict(format!("{name} is {s:?}, not stopped",))),
            }
            let mem = self.memory(&g);
            let want = info.config.memory_mib;
            if want > mem.free_for_vms_mib {
                return Err(ApiError::conflict(format!(
                    "{name} needs {want} MiB but {} offers only {} MiB more to VMs",
                    self.name, mem.free_for_vms_mib
                )));
            }
            let settings = g.settings.clone();
            let v = g
                .vms
                .get_mut(name)
                .ok_or_else(|| ApiError::not_found(name))?;
            let config = self.effective_config(&v.record, &settings);
            v.live = Live {
                starting: Some(Instant::now()),
                ..Default::default()
            };
            (config, self.run_dir(name))
        };
        std::fs::create_dir_all(&run.0)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", run.0.display())))?;
        state::write_json(&run.config(), &config)?;
        if let Err(e) = crate::leases::acquire(self, &config).await {
            if let Some(v) = self.lock().vms.get_mut(name) {
                v.live.starting = None;
            }
            return Err(ApiError::conflict(e));
        }
        let args = vec![
            "vmm".into(),
            "run".into(),
            "--config".into(),
            run.config().into_os_string(),
            "--api".into(),
            run.api().into_os_string(),
        ];
        match vmm::spawn(&self.ferry, &run, args, None) {
            Ok(child) => reap(child),
            Err(e) => {
                if let Some(v) = self.lock().vms.get_mut(name) {
                    v.live.starting = None;
                }
                return Err(ApiError::internal(format!(
                    "cannot start {}: {e}",
                    self.ferry.display()
                )));
            }
        }
        tracing::info!("VM {name} starting");
        // Wait (a little) for it to come up, so the answer says running or why not.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.poll_vm(name).await;
            let info = self.vm(name)?;
            if info.state != VmState::Starting || Instant::now() > deadline {
                if info.state == VmState::Crashed {
                    let why = info
                        .last_exit
                        .as_ref()
                        .map(|e| format!("{}: {}", e.status, e.log_tail.join(" / ")))
                        .unwrap_or_default();
                    return Err(ApiError::conflict(format!(
                        "{name} failed to start ({why})"
                    )));
                }
                return Ok(info);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop a VM: ask its VMM to quit (or kill it with `force`), then wait for it to end.
    pub async fn stop(self: &Arc<Self>, name: &str, force: bool) -> ApiResult<VmInfo> {
        let (pid, api) = {
            let mut g = self.lock();
            let info = self.vm_info(&g, name).ok_or_else(|| {
                ApiError::not_found(format!("no VM named {name:?} on {}", self.name))
            })?;
            match info.state {
                VmState::Running | VmState::Paused | VmState::Starting => {}
                VmState::Moving => {
                    return Err(ApiError::conflict(format!(
                        "{name} is moving; cancel the move first (`ferry move cancel {name}`)"
                    )))
                }
                s => return Err(ApiError::conflict(format!("{name} is {s:?}, not running"))),
            }
            let v = g
                .vms
                .get_mut(name)
                .ok_or_else(|| ApiError::not_found(name))?;
            v.live.stopping = true;
            (v.live.pid, self.run_dir(name).api())
        };
        if force {
            if let Some(p) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        } else if let Err(e) = vmm::call(&api, &Request::Quit).await {
            tracing::warn!("asking {name}'s VMM to quit: {e}; killing it");
            if let Some(p) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.poll_vm(name).await;
            let info = self.vm(name)?;
            if !matches!(
                info.state,
                VmState::Running | VmState::Paused | VmState::Starting
            ) {
                tracing::info!("VM {name} stopped");
                return Ok(info);
            }
            if Instant::now() > deadline {
                return Err(ApiError::internal(format!(
                    "{name}'s VMM did not end within 15 s; try `ferry vm stop --force {name}`"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Forget a stopped VM (its disk images stay where they are).
    pub fn delete(&self, name: &str) -> ApiResult<()> {
        let mut g = self.lock();
        let info = self
            .vm_info(&g, name)
            .ok_or_else(|| ApiError::not_found(format!("no VM named {name:?} on {}", self.name)))?;
        if !matches!(info.state, VmState::Stopped | VmState::Crashed) {
            return Err(ApiError::conflict(format!(
                "{name} is {:?}; stop it first (`ferry vm stop {name}`)",
                info.state
            )));
        }
        let dir = self.state.vm_dir(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
        g.vms.remove(name);
        tracing::info!("VM {name} deleted");
        Ok(())
    }

    /// Bring the daemon's view of one VM up to date (its process, its run state).
    pub async fn poll_vm(&self, name: &str) {
        let run = self.run_dir(name);
        let pid = vmm::running_pid(&run);
        let mut ask = None;
        // The VM's VMM has just ended here (stopped, powered off, crashed): its disks' write
        // leases go, so another host may start it.
        let mut ended_here = None;
        {
            let mut g = self.lock();
            let Some(v) = g.vms.get_mut(name) else {
                return;
            };
            if v.record.incoming.is_some() {
                return; // the incoming watcher owns it
            }
            match pid {
                Some(p) => {
                    if v.live.pid != Some(p) {
                        v.live.pid = Some(p);
                        v.live.last_exit = None;
                    }
                    let due = v
                        .live
                        .last_status
                        .is_none_or(|t| t.elapsed() > Duration::from_millis(500));
                    if due && run.api().exists() {
                        ask = Some(run.api());
                    }
                }
                None => {
                    let ended = vmm::exit_info(&run);
                    if ended.is_none() && v.live.pid.is_some() {
                        // Gone, but its monitor has not said how yet: report it as it was for
                        // a moment rather than as stopped for no reason.
                        let since = *v.live.gone_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < Duration::from_secs(3) {
                            return;
                        }
                    }
                    v.live.gone_since = None;
                    let ended = ended.or_else(|| vmm::exit_info(&run));
                    let was_running = v.live.pid.take().is_some();
                    let gave_up = v
                        .live
                        .starting
                        .is_some_and(|t| t.elapsed() > Duration::from_secs(15));
                    if ended.is_some() || gave_up {
                        v.live.starting = None;
                        v.live.run_state = None;
                        v.live.uptime_ms = None;
                    }
                    if ended.is_some() && was_running {
                        ended_here = Some(v.record.config.clone());
                    }
                    if let Some(e) = ended {
                        if was_running || v.live.last_exit.as_ref() != Some(&e) {
                            if crashed(&e, v.live.stopping) {
                                tracing::warn!(
                                    "VM {name} crashed: {}; last log lines:\n{}",
                                    e.status,
                                    e.log_tail.join("\n")
                                );
                            }
                            v.live.last_exit = Some(e);
                        }
                    }
                }
            }
        }
        if let Some(config) = ended_here {
            crate::leases::release(self, &config).await;
        }
        if let Some(api) = ask {
            let status = vmm::call(&api, &Request::Status).await;
            let mut g = self.lock();
            if let Some(v) = g.vms.get_mut(name) {
                v.live.last_status = Some(Instant::now());
                if let Ok(Response::Ok(ResponseBody::Status(s))) = status {
                    v.live.run_state = Some(s.state);
                    v.live.uptime_ms = Some(s.uptime_ms);
                    v.live.starting = None;
                    v.live.stopping = false;
                    // The features a VM was started with are learnt once, from its first
                    // VMM; a VM that arrived brought them along.
                    if v.record.cpu_features.is_empty() && !s.cpu_features.is_empty() {
                        v.record.cpu_features = s.cpu_features;
                        let _ = state::write_json(&self.state.vm_record(name), &v.record);
                    }
                }
            }
        }
    }

    /// Ask a VM's VMM for its state now (after a move, say), not at the next poll.
    pub async fn refresh(&self, name: &str) {
        if let Some(v) = self.lock().vms.get_mut(name) {
            v.live.last_status = None;
        }
        self.poll_vm(name).await;
    }

    /// Watch every VMM, for as long as the daemon runs.
    pub async fn supervise(self: Arc<Self>) {
        loop {
            let names: Vec<String> = self.lock().vms.keys().cloned().collect();
            for n in names {
                self.poll_vm(&n).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A peer's daemon address: a known name, or `host:port` as given.
    pub fn resolve_host(&self, to: &str) -> ApiResult<(String, String)> {
        if let Some(sec) = &self.security {
            let doc = sec.trust.doc();
            if let Some(m) = doc.host(to) {
                return Ok((m.name.clone(), m.addr.clone()));
            }
            if let Some(m) = doc.hosts.iter().find(|m| m.addr == to) {
                return Ok((m.name.clone(), m.addr.clone()));
            }
        }
        if let Some(a) = self.peers.get(to) {
            return Ok((to.into(), a.clone()));
        }
        if let Some((n, a)) = self.peers.iter().find(|(_, a)| a.as_str() == to) {
            return Ok((n.clone(), a.clone()));
        }
        if to == self.name || self.listen.as_deref() == Some(to) {
            return Err(ApiError::bad_request(format!(
                "{to} is this host ({}); name another host",
                self.name
            )));
        }
        if self.security.is_none()
            && crate::transport::Endpoint::parse(to)
                .is_some_and(|e| matches!(e, crate::transport::Endpoint::Tcp(_)))
        {
            return Ok((to.into(), to.into()));
        }
        let mut known: Vec<String> = self.peers.keys().cloned().collect();
        if let Some(sec) = &self.security {
            known.extend(
                sec.trust
                    .doc()
                    .hosts
                    .into_iter()
                    .map(|m| m.name)
                    .filter(|n| n != &self.name),
            );
        }
        Err(ApiError::bad_request(format!(
            "unknown host {to:?}: {} knows {} (give a host of the cluster by name, or a peer's name or address; add peers with `ferry host run --peer NAME=ADDR`)",
            self.name,
            if known.is_empty() {
                "no peers".to_string()
            } else {
                known.join(", ")
            }
        )))
    }
}

impl Daemon {
    /// A client of host `name`'s daemon at `addr`: mutual TLS when this host is in a cluster.
    pub fn client_for(&self, name: &str, addr: &str) -> crate::client::Client {
        let e = crate::transport::Endpoint::Tcp(addr.into());
        match &self.security {
            Some(s) => crate::client::Client::with_tls(e, s.client_tls(name).ok()),
            None => crate::client::Client::new(e),
        }
    }
}

/// The live-migration protocol versions this build speaks.
pub fn protocol_range() -> ProtocolRange {
    ProtocolRange {
        min: ferry_migration::protocol::MIN_PROTOCOL_VERSION,
        max: ferry_migration::protocol::PROTOCOL_VERSION,
    }
}

/// Wait for a monitor process in the background, so it leaves no zombie.
pub fn reap(mut child: tokio::process::Child) {
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
}
