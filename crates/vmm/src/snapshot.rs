//! A VM snapshot on disk: a directory with
//! - `memory`: guest RAM, regions back to back, zero pages left as holes;
//! - `state`: everything else (config, vCPUs, irqchip, PIT, clock, devices, the memory file's
//!   size and checksum) in a [`ferry_migration::Envelope`].
//!
//! `state` is written last, after `memory` is complete and synced, so a directory with a
//! `state` file always holds a whole snapshot. Reading checks the envelope and the memory
//! checksum before anything is created, so a damaged snapshot never half-restores.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_api::VmConfig;
use ferry_migration::{Envelope, EnvelopeError};
use serde::{Deserialize, Serialize};

use crate::devices::DevicesState;
use crate::kvm_vm::KvmVmState;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::VcpuState;

/// File name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// File name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub config: VmConfig,
    pub memory_bytes: u64,
    pub memory_crc32: u32,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} already holds a snapshot; choose an empty directory")]
    Exists(PathBuf),
    #[error("{path}: {action} failed")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no snapshot (no `state` file)")]
    Missing(PathBuf),
    #[error("snapshot state {0} is not valid")]
    State(PathBuf, #[source] EnvelopeError),
    #[error("snapshot memory {0} is not valid")]
    Memory(PathBuf, #[source] MemoryError),
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

fn io<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Write a snapshot of a paused VM to `dir`. Returns the bytes of memory actually written.
pub fn write(dir: &Path, mem: &GuestMemory, mut snap: Snapshot) -> Result<u64, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
    let state_path = dir.join(STATE_FILE);
    if state_path.exists() {
        return Err(SnapshotError::Exists(dir.into()));
    }
    let mem_tmp = dir.join(".memory.tmp");
    let mem_path = dir.join(MEMORY_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&mem_tmp)
        .map_err(io(&mem_tmp, "creating"))?;
    let (crc, written) =
        memory::save_to_file(mem, &mut f).map_err(|e| SnapshotError::Memory(mem_tmp.clone(), e))?;
    f.sync_all().map_err(io(&mem_tmp, "syncing"))?;
    std::fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path, "renaming"))?;
    snap.memory_bytes = memory::total_bytes(mem);
    snap.memory_crc32 = crc;

    let bytes = Envelope::Snapshot
        .encode(&snap)
        .map_err(|e| SnapshotError::State(state_path.clone(), e))?;
    let state_tmp = dir.join(".state.tmp");
    let mut f = File::create(&state_tmp).map_err(io(&state_tmp, "creating"))?;
    f.write_all(&bytes).map_err(io(&state_tmp, "writing"))?;
    f.sync_all().map_err(io(&state_tmp, "syncing"))?;
    std::fs::rename(&state_tmp, &state_path).map_err(io(&state_path, "renaming"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing"))?;
    Ok(written)
}

/// Read and check a snapshot: the state envelope, its consistency, and the memory file's
/// size and checksum. Returns the state and the open memory file.
pub fn read(dir: &Path) -> Result<(Snapshot, File), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.exists() {
        return Err(SnapshotError::Missing(dir.into()));
    }
    let len = std::fs::metadata(&state_path)
        .map_err(io(&state_path, "reading"))?
        .len();
    if len > ferry_migration::envelope::MAX_PAYLOAD + ferry_migration::envelope::HEADER_LEN as u64 {
        return Err(SnapshotError::State(
            state_path,
            EnvelopeError::TooLarge { len },
        ));
    }
    let bytes = std::fs::read(&state_path).map_err(io(&state_path, "reading"))?;
    let (snap, _version): (Snapshot, u32) = Envelope::Snapshot
        .decode(&bytes)
        .map_err(|e| SnapshotError::State(state_path.clone(), e))?;
    snap.config
        .validate()
        .map_err(|e| SnapshotError::Inconsistent(e.to_string()))?;
    if snap.memory_bytes != snap.config.memory_mib << 20 {
        return Err(SnapshotError::Inconsistent(format!(
            "memory size {} does not match the config's {} MiB",
            snap.memory_bytes, snap.config.memory_mib
        )));
    }
    if snap.vcpus.len() != usize::from(snap.config.vcpus)
        || snap
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            snap.vcpus.len(),
            snap.config.vcpus
        )));
    }
    let mem_path = dir.join(MEMORY_FILE);
    let mut f = File::open(&mem_path).map_err(io(&mem_path, "opening"))?;
    memory::verify_file(&mut f, snap.memory_bytes, snap.memory_crc32)
        .map_err(|e| SnapshotError::Memory(mem_path, e))?;
    Ok((snap, f))
}
