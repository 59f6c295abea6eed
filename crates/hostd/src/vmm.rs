//! The daemon's side of its VMM processes: starting one (through a small monitor process that
//! outlives the daemon and records how the VMM ended), finding it again after a daemon
//! restart, and talking to its control socket.
//!
//! ```text
//! ferry host run ──spawns──> ferry host monitor (own session) ──spawns──> ferry vmm run|receive
//!                                  │ writes vmm.pid, then waits            (own process, runs the VM)
//!                                  └ writes exit.json when the VMM ends
//! ```
//! Neither the monitor nor the VMM dies with the daemon (they are in their own session, and
//! nothing ties their life to the daemon's), and the daemon finds them again from the run
//! directory, not from memory.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_api::host::VmExitInfo;
use ferry_api::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::state;

/// How long a control request to a VMM may take.
const VMM_TIMEOUT: Duration = Duration::from_secs(10);
/// How many log lines a crash report carries.
const LOG_TAIL: usize = 20;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The files of one VMM run.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }
    pub fn api(&self) -> PathBuf {
        self.0.join("api")
    }
    pub fn con(&self) -> PathBuf {
        self.0.join("con")
    }
    pub fn con2(&self) -> PathBuf {
        self.0.join("con2")
    }
    pub fn pid(&self) -> PathBuf {
        self.0.join("vmm.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    pub fn exit(&self) -> PathBuf {
        self.0.join("exit.json")
    }
}

/// What the monitor writes when its VMM ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorExit {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    pub at_ms: u64,
    /// Set when the VMM could not even be started.
    #[serde(default)]
    pub error: Option<String>,
}

/// The monitor process: run the VMM (`argv`, this same binary) with its output in the run
/// directory's log, record its PID, wait for it, record how it ended. `close` lists inherited
/// descriptors meant only for the VMM.
pub fn monitor_main(run: &Path, close: &[i32], argv: &[OsString]) -> i32 {
    let _ = nix::unistd::setsid();
    let run = RunDir(run.to_path_buf());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.log());
    let started = match (log, std::env::current_exe()) {
        (Ok(log), Ok(exe)) => {
            let err = log.try_clone();
            match err {
                Ok(err) => std::process::Command::new(exe)
                    .args(argv)
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(err)
                    .spawn(),
                Err(e) => Err(e),
            }
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let mut child = match started {
        Ok(c) => c,
        Err(e) => {
            let _ = state::write_json(
                &run.exit(),
                &MonitorExit {
                    code: None,
                    signal: None,
                    at_ms: now_ms(),
                    error: Some(format!("cannot start the VMM: {e}")),
                },
            );
            return 1;
        }
    };
    let _ = state::atomic_write(&run.pid(), format!("{}\n", child.id()).as_bytes());
    for fd in close {
        let _ = nix::unistd::close(*fd);
    }
    let status = child.wait();
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match &status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    let _ = state::write_json(
        &run.exit(),
        &MonitorExit {
            code,
            signal,
            at_ms: now_ms(),
            error: status.err().map(|e| format!("waiting for the VMM: {e}")),
        },
    );
    0
}

/// Start a VMM for `run` through a monitor: `ferry host monitor --run-dir DIR -- ARGS`.
/// `listener`, if given, becomes descriptor 3 of the VMM (its migration socket).
pub fn spawn(
    ferry: &Path,
    run: &RunDir,
    args: Vec<OsString>,
    listener: Option<OwnedFd>,
) -> std::io::Result<tokio::process::Child> {
    use command_fds::{CommandFdExt, FdMapping};
    for stale in [run.pid(), run.exit(), run.api(), run.con(), run.con2()] {
        let _ = std::fs::remove_file(stale);
    }
    let mut cmd = std::process::Command::new(ferry);
    cmd.args(["host", "monitor", "--run-dir"]).arg(&run.0);
    if listener.is_some() {
        cmd.args(["--close", "3"]);
    }
    cmd.arg("--").args(args);
    // The host's credentials, for disks on a file server's share (`nbds://`).
    if let Some(root) = run.0.ancestors().nth(3) {
        let tls = crate::security::tls_dir(root);
        if ferry_auth::Credentials::exists(&tls) {
            cmd.env("FERRY_TLS_DIR", tls);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(fd) = listener {
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: fd,
            child_fd: 3,
        }])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn()
}

/// The VMM's PID, if it has one recorded and that process is still this VMM.
pub fn running_pid(run: &RunDir) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(run.pid())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if run.exit().exists() {
        return None;
    }
    // The PID must still name a `ferry vmm` for this run directory, not a reused number.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let ours = cmdline.contains(&*run.0.to_string_lossy());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    (ours && !zombie).then_some(pid)
}

/// Whether a VMM was started for `run` and has not ended yet (it may still be starting).
pub fn started(run: &RunDir) -> bool {
    run.pid().exists() && !run.exit().exists()
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// How the VMM of `run` ended, if it did (from its monitor's record and its log).
pub fn exit_info(run: &RunDir) -> Option<VmExitInfo> {
    let e: MonitorExit = state::read_json(&run.exit()).ok()??;
    let log_tail = tail(&run.log(), LOG_TAIL);
    let reason = log_tail
        .iter()
        .rev()
        .find_map(|l| l.split("ferry: VM ended: ").nth(1))
        .map(|r| r.trim().to_string());
    let status = match (&e.error, e.code, e.signal) {
        (Some(err), _, _) => err.clone(),
        (None, Some(c), _) => format!("exit status {c}"),
        (None, None, Some(s)) => format!("killed by signal {s}"),
        (None, None, None) => "ended".into(),
    };
    Some(VmExitInfo {
        status,
        code: e.code,
        signal: e.signal,
        reason,
        at_ms: e.at_ms,
        log_tail,
    })
}

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot reach the VMM's control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's control socket {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the VMM answered garbage: {0}")]
    Garbage(String),
    #[error("the VMM closed its control socket without answering")]
    NoAnswer,
}

/// A connection to a VMM's control socket with one request sent.
pub struct VmmStream {
    lines: tokio::io::Lines<BufReader<UnixStream>>,
    path: PathBuf,
}

impl VmmStream {
    /// The next answer line; `None` when the VMM closes the stream.
    pub async fn next(&mut self) -> Option<Result<Response, VmmError>> {
        match self.lines.next_line().await {
            Ok(Some(l)) => {
                Some(serde_json::from_str(&l).map_err(|e| VmmError::Garbage(e.to_string())))
            }
            Ok(None) => None,
            Err(source) => Some(Err(VmmError::Io {
                path: self.path.clone(),
                source,
            })),
        }
    }
}

/// Send `req` to the VMM at `api` and return the answer stream.
pub async fn open(api: &Path, req: &Request) -> Result<VmmStream, VmmError> {
    let mut s = UnixStream::connect(api)
        .await
        .map_err(|source| VmmError::Connect {
            path: api.into(),
            source,
        })?;
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    s.write_all(line.as_bytes())
        .await
        .map_err(|source| VmmError::Io {
            path: api.into(),
            source,
        })?;
    Ok(VmmStream {
        lines: BufReader::new(s).lines(),
        path: api.into(),
    })
}

/// Send `req` and wait for the one answer.
pub async fn call(api: &Path, req: &Request) -> Result<Response, VmmError> {
    let fut = async {
        let mut s = open(api, req).await?;
        s.next().await.unwrap_or(Err(VmmError::NoAnswer))
    };
    tokio::time::timeout(VMM_TIMEOUT, fut)
        .await
        .map_err(|_| VmmError::Timeout(VMM_TIMEOUT))?
}
