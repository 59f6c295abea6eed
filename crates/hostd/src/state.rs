//! The daemon's state directory: the only memory that survives a daemon restart. Every change
//! that must survive is written here atomically (temporary file, fsync, rename, fsync of the
//! directory) before it is acknowledged.
//!
//! ```text
//! <state>/hostd.lock            held (flock) by the one daemon using this directory
//! <state>/hostd.sock            the local API socket
//! <state>/settings.json         host settings (HostSettings)
//! <state>/vms/<name>/vm.json    a VM's definition (VmRecord)
//! <state>/vms/<name>/run/       its running VMM: config.json, api, con, con2, vmm.pid,
//!                               vmm.log, exit.json (written by the VMM's monitor)
//! <state>/moves/<id>.json       a move sent from here (MoveRecord)
//! <state>/moves/<id>.in.json    a move arriving here (IncomingRecord)
//! <state>/moves/<id>.outcome    an arriving move's outcome record (written once)
//! ```

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors opening or using the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another ferry host daemon ({holder}) already uses state directory {path}; stop it first, or give this one its own --state-dir")]
    Locked { path: PathBuf, holder: String },
    #[error("{path} is damaged: {msg}")]
    Damaged { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.into(),
        source,
    }
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new contents.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Write `v` as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    atomic_write(path, &b).map_err(io_err(path))
}

/// Read JSON from `path`; `None` if there is no such file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StateError::Damaged {
                path: path.into(),
                msg: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// An open state directory, locked for this daemon.
pub struct StateDir {
    pub root: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Open (and create) `root` and take its lock; a second daemon is refused, naming the first.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        let root = std::path::absolute(root).map_err(io_err(root))?;
        for d in [root.clone(), root.join("vms"), root.join("moves")] {
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let lock_path = root.join("hostd.lock");
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StateError::Locked {
                    path: root,
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        format!("process {holder}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(StateDir { root, _lock: lock })
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("hostd.sock")
    }

    pub fn settings_path(&self) -> PathBuf {
        self.root.join("settings.json")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    pub fn vm_record(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.json")
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("run")
    }

    pub fn moves_dir(&self) -> PathBuf {
        self.root.join("moves")
    }

    /// A move sent from here.
    pub fn move_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.json"))
    }

    /// A storage move running here.
    pub fn storage_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.storage.json"))
    }

    /// A shared-nothing move's copies on its destination, sent from here.
    pub fn remote_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.remote.json"))
    }

    /// The disk copies this host serves for a shared-nothing move arriving here.
    pub fn targets_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.targets.json"))
    }

    /// The records of one kind (`.storage.json`, `.remote.json`, ...): (move id, path).
    pub fn records(&self, suffix: &str) -> Vec<(String, PathBuf)> {
        std::fs::read_dir(self.moves_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let id = p.file_name()?.to_str()?.strip_suffix(suffix)?.to_string();
                Some((id, p))
            })
            .collect()
    }

    /// A move arriving here.
    pub fn incoming_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.in.json"))
    }

    /// An arriving move's outcome record (see `ferry_migration::outcome`).
    pub fn outcome_record(&self, id: &str) -> PathBuf {
        self.moves_dir().join(format!("{id}.outcome"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_is_refused_and_writes_are_atomic() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        match StateDir::open(d.path()) {
            Err(StateError::Locked { holder, .. }) => {
                assert!(holder.contains(&std::process::id().to_string()), "{holder}")
            }
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
        let p = s.root.join("x.json");
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        let v: serde_json::Value = read_json(&p).unwrap().unwrap();
        assert_eq!(v["a"], 1);
        assert!(read_json::<serde_json::Value>(&s.root.join("none"))
            .unwrap()
            .is_none());
        std::fs::write(&p, b"{bad").unwrap();
        assert!(matches!(
            read_json::<serde_json::Value>(&p),
            Err(StateError::Damaged { .. })
        ));
        drop(s);
        StateDir::open(d.path()).expect("free again once the first is gone");
    }
}
