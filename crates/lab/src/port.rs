//! A guest serial port on a unix socket (the VMM listens), read in the background.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bytes from a guest serial port on a unix socket (the VMM listens), read in the background
/// once the socket exists, each read stamped with the host's monotonic clock.
#[derive(Clone, Default)]
pub struct Port {
    text: Arc<Mutex<Vec<u8>>>,
    /// (time of a read, bytes in it)
    stamps: Arc<Mutex<Vec<(Instant, usize)>>>,
    stream: Arc<Mutex<Option<UnixStream>>>,
    closed: Arc<AtomicBool>,
}

impl Port {
    /// Connect to `path` as soon as it accepts (polling every `poll`, for up to 10 minutes)
    /// and collect what arrives.
    pub fn follow(path: PathBuf, poll: Duration) -> Port {
        let p = Port::default();
        let q = p.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            let s = loop {
                if q.closed.load(Ordering::Relaxed) {
                    return;
                }
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(poll),
                    Err(_) => return,
                }
            };
            if let Ok(w) = s.try_clone() {
                *q.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
            }
            let mut r = BufReader::new(s);
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                let now = Instant::now();
                q.text
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
                q.stamps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now, n));
            }
        });
        p
    }

    /// Follow `path` and wait until it is connected (up to `timeout`).
    pub fn connect(path: PathBuf, poll: Duration, timeout: Duration) -> Result<Port> {
        let p = Port::follow(path.clone(), poll);
        let deadline = Instant::now() + timeout;
        while !p.connected() {
            if Instant::now() > deadline {
                p.close();
                bail!("{} did not accept within {timeout:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(p)
    }

    /// Stop waiting for the socket, and stop reading.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(s) = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn connected(&self) -> bool {
        self.stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text received so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait for a whole line starting with `prefix` (heartbeat dots stripped) that begins at
    /// or after byte `from`; returns it and the offset just past it.
    pub fn line_after(
        &self,
        from: usize,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(String, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            let mut off = 0;
            for line in text.split_inclusive('\n') {
                let clean = line.trim_start_matches('.');
                if off >= from && line.ends_with('\n') && clean.starts_with(prefix) {
                    return Ok((clean.trim_end().to_string(), off + line.len()));
                }
                off += line.len();
            }
            if Instant::now() > deadline {
                let tail: String = text
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!("the guest did not print {prefix:?} within {timeout:?}; its console ends:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Another handle on the connected socket, for writing from elsewhere.
    pub fn writer(&self) -> Result<UnixStream> {
        let guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .context("the guest console is not connected")?
            .try_clone()
            .context("duplicating the console socket")
    }

    /// Send one command byte to the guest.
    pub fn send(&self, cmd: u8) -> Result<()> {
        let mut guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_mut()
            .context("the guest console is not connected")?
            .write_all(&[cmd])
            .context("writing to the guest console")
    }

    /// Send one command byte and wait for the answer line starting with `prefix`.
    pub fn ask(&self, cmd: u8, prefix: &str, timeout: Duration) -> Result<String> {
        let from = self.len();
        self.send(cmd)?;
        Ok(self.line_after(from, prefix, timeout)?.0)
    }

    /// Wait until `n` more bytes than `from` have arrived (heartbeat beats, say).
    pub fn wait_bytes(&self, from: usize, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.len() < from + n {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} bytes arrived within {timeout:?} (the guest stalled?)",
                    self.len().saturating_sub(from)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Longest gap between consecutive reads so far.
    pub fn max_gap(&self) -> Duration {
        let b = self.beats();
        b.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    /// Times of the reads so far (each brought one or more bytes).
    pub fn beats(&self) -> Vec<Instant> {
        self.stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| s.0)
            .collect()
    }
}

/// The longest gap between consecutive stamps of `beats` within `[from, to]`, counting from
/// the last stamp before `from` (if any). `beats` need not be sorted across sources: it is
/// taken in the given order, as when one port's stamps are followed by another's.
pub fn longest_gap(beats: &[Instant], from: Instant, to: Instant) -> Duration {
    let start = beats.iter().rposition(|&t| t < from).unwrap_or(0);
    let mut gap = Duration::ZERO;
    let mut prev: Option<Instant> = None;
    for &t in &beats[start..] {
        if t > to {
            break;
        }
        if let Some(p) = prev {
            gap = gap.max(t.saturating_duration_since(p));
        }
        prev = Some(t);
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_spans_ports_and_window() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Source beats every ms to 10, then the destination from 25.
        let mut beats: Vec<Instant> = (0..=10).map(ms).collect();
        beats.extend((25..=40).map(ms));
        assert_eq!(
            longest_gap(&beats, ms(5), ms(40)),
            Duration::from_millis(15)
        );
        // The window ends before the destination starts: only the source's 1 ms beats count.
        assert_eq!(longest_gap(&beats, ms(2), ms(20)), Duration::from_millis(1));
        // The last beat before the window counts as its start.
        assert_eq!(
            longest_gap(&beats, ms(20), ms(40)),
            Duration::from_millis(15)
        );
        assert_eq!(longest_gap(&[], ms(0), ms(1)), Duration::ZERO);
    }
}
