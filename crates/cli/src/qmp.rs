//! A small QMP (QEMU Machine Protocol) client, for benchmarks that drive QEMU beside ferry.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_lab::Proc;
use serde_json::{json, Value};

/// A QEMU Machine Protocol client on a unix socket: one JSON object per line each way.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, p: &mut Proc) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    p.alive()?;
                    if Instant::now() > deadline {
                        return Err(e)
                            .with_context(|| format!("connecting to QMP at {}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).context("reading from QMP")? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Run a command; events that arrive meanwhile are skipped.
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let mut s = json!({"execute": name, "arguments": args}).to_string();
        s.push('\n');
        self.w.write_all(s.as_bytes()).context("writing to QMP")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {}", e.get("desc").unwrap_or(e));
            }
        }
    }
}
