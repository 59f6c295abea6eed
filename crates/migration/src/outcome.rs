//! The one durable decision of a move: did the destination take the VM over, or will it never?
//!
//! A move's hand-over has a moment where one message can be lost (the destination's last
//! acknowledgement), and from that moment the source cannot tell on its own whether the
//! destination runs the guest. Disk locks cannot tell either: a lock taken by a destination that
//! then died is released with it. So the destination keeps an *outcome record*, one file per
//! move, that is written exactly once and never changes afterwards:
//!
//! - the destination VMM writes `committed` just before it resumes the guest;
//! - whoever gives up on the move on the destination host (the VMM when its source goes away
//!   before Commit, or the host daemon asked to settle a move) writes `aborted`.
//!
//! Whichever comes first wins: the file is made complete under a temporary name and then
//! hard-linked into place, which fails if the name exists. So a late Commit finds `aborted`
//! and refuses, and a late settle finds `committed` and reports it. The source asks for the
//! record (through the destination VMM or its daemon) whenever it is in doubt, and only then
//! drops or resumes its paused copy.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Undecided
//!     Undecided --> Committed: destination VMM, before resuming the guest
//!     Undecided --> Aborted: destination gives up / daemon settles
//!     Committed --> [*]
//!     Aborted --> [*]
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use ferry_api::Outcome;

/// How an outcome is written in a record and in a `Query` answer.
pub fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Committed => "committed",
        Outcome::Aborted => "aborted",
    }
}

/// The outcome a `Query` answer names, if any.
pub fn parse_outcome(s: &str) -> Option<Outcome> {
    match s {
        "committed" => Some(Outcome::Committed),
        "aborted" => Some(Outcome::Aborted),
        _ => None,
    }
}

/// The record's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeFile {
    pub migration_id: String,
    pub outcome: Outcome,
    /// Who decided (e.g. "destination VMM", "host daemon: settle").
    #[serde(default)]
    pub by: String,
}

/// Errors reading or writing an outcome record.
#[derive(Debug, thiserror::Error)]
pub enum OutcomeError {
    #[error("cannot write the move's outcome record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the move's outcome record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the outcome record {path} is damaged: {msg}")]
    Damaged { path: PathBuf, msg: String },
    #[error("the outcome record {path} belongs to move {found}, not {wanted}")]
    OtherMove {
        path: PathBuf,
        found: String,
        wanted: String,
    },
}

/// Where a move's outcome is kept: a file (durable, shared by the VMM and its host daemon) or,
/// for a VMM started by hand without one, its own memory (lost with the process).
#[derive(Debug, Clone)]
pub enum OutcomeRecord {
    File(PathBuf),
    Memory(Arc<Mutex<Option<OutcomeFile>>>),
}

impl OutcomeRecord {
    /// A record kept only in this process.
    pub fn in_memory() -> OutcomeRecord {
        OutcomeRecord::Memory(Arc::new(Mutex::new(None)))
    }

    /// Decide `want` for move `id` unless the move is decided already; returns the decision
    /// that stands.
    pub fn decide(&self, id: &str, want: Outcome, by: &str) -> Result<Outcome, OutcomeError> {
        let rec = OutcomeFile {
            migration_id: id.into(),
            outcome: want,
            by: by.into(),
        };
        match self {
            OutcomeRecord::Memory(m) => {
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                match &*g {
                    Some(r) if r.migration_id == id => Ok(r.outcome),
                    _ => {
                        *g = Some(rec);
                        Ok(want)
                    }
                }
            }
            OutcomeRecord::File(path) => {
                if let Some(r) = read_file(path)? {
                    return check_id(path, r, id);
                }
                let werr = |source| OutcomeError::Write {
                    path: path.clone(),
                    source,
                };
                static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
                {
                    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
                    f.write_all(&serde_json::to_vec(&rec).unwrap_or_default())
                        .and_then(|_| f.sync_all())
                        .map_err(werr)?;
                }
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        sync_dir(path).map_err(werr)?;
                        Ok(want)
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let r = read_file(path)?.ok_or_else(|| OutcomeError::Damaged {
                            path: path.clone(),
                            msg: "vanished while being decided".into(),
                        })?;
                        check_id(path, r, id)
                    }
                    Err(e) => Err(werr(e)),
                }
            }
        }
    }

    /// The decision for move `id`, if there is one.
    pub fn get(&self, id: &str) -> Result<Option<Outcome>, OutcomeError> {
        match self {
            OutcomeRecord::Memory(m) => Ok(m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|r| r.migration_id == id)
                .map(|r| r.outcome)),
            OutcomeRecord::File(path) => match read_file(path)? {
                Some(r) => check_id(path, r, id).map(Some),
                None => Ok(None),
            },
        }
    }
}

fn check_id(path: &Path, r: OutcomeFile, id: &str) -> Result<Outcome, OutcomeError> {
    if r.migration_id != id {
        return Err(OutcomeError::OtherMove {
            path: path.into(),
            found: r.migration_id,
            wanted: id.into(),
        });
    }
    Ok(r.outcome)
}

/// Read a record file; `None` if there is none.
pub fn read_file(path: &Path) -> Result<Option<OutcomeFile>, OutcomeError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| OutcomeError::Damaged {
                path: path.into(),
                msg: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OutcomeError::Read {
            path: path.into(),
            source,
        }),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_decision_wins_in_a_file() {
        let dir = std::env::temp_dir().join(format!("ferry-outcome-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m1.outcome");
        let _ = std::fs::remove_file(&path);
        let r = OutcomeRecord::File(path.clone());
        assert_eq!(r.get("m1").unwrap(), None);
        assert_eq!(
            r.decide("m1", Outcome::Aborted, "test").unwrap(),
            Outcome::Aborted
        );
        // A late commit finds the abort and must not run the guest.
        assert_eq!(
            r.decide("m1", Outcome::Committed, "test").unwrap(),
            Outcome::Aborted
        );
        assert_eq!(r.get("m1").unwrap(), Some(Outcome::Aborted));
        assert!(matches!(r.get("m2"), Err(OutcomeError::OtherMove { .. })));
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(matches!(r.get("m1"), Err(OutcomeError::Damaged { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn first_decision_wins_in_memory() {
        let r = OutcomeRecord::in_memory();
        assert_eq!(
            r.decide("x", Outcome::Committed, "t").unwrap(),
            Outcome::Committed
        );
        assert_eq!(
            r.decide("x", Outcome::Aborted, "t").unwrap(),
            Outcome::Committed
        );
        assert_eq!(r.get("y").unwrap(), None);
    }

    #[test]
    fn racing_deciders_agree() {
        let dir = std::env::temp_dir().join(format!("ferry-outcome-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..20 {
            let path = dir.join(format!("r{round}"));
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let r = OutcomeRecord::File(path.clone());
                    std::thread::spawn(move || {
                        let want = if i % 2 == 0 {
                            Outcome::Committed
                        } else {
                            Outcome::Aborted
                        };
                        r.decide("id", want, "t").unwrap()
                    })
                })
                .collect();
            let got: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert!(got.iter().all(|o| *o == got[0]), "round {round}: {got:?}");
            assert_eq!(OutcomeRecord::File(path).get("id").unwrap(), Some(got[0]));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
