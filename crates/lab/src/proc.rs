//! A process started for a lab (a VMM, a daemon, QEMU), killed by its PID when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A process started in the lab (e.g. a VMM under `ip netns exec`), its stderr in a log file;
/// killed (by its PID) when dropped.
pub struct Proc {
    child: Child,
    pub what: String,
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd` with stdin and stdout on /dev/null and stderr into `log`.
    pub fn spawn(mut cmd: Command, what: impl Into<String>, log: PathBuf) -> Result<Proc> {
        let what = what.into();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .with_context(|| format!("creating {}", log.display()))?,
            )
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what, log })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fail if it has ended.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} ended ({st}); its log {}:\n{}",
                self.what,
                self.log.display(),
                self.log_text().trim()
            );
        }
        Ok(())
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status once it has ended.
    pub fn status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait up to `timeout` for it to end.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether it ended within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.wait(timeout).is_some()
    }

    /// Kill it now (SIGKILL, as a crash would) and reap it.
    pub fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
