//! The VMM's control socket: one JSON [`Request`] per line in, one JSON [`Response`] per line
//! out. Requests are handed to the control loop, which owns the VM, so a request never races
//! a migration or another request.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use ferry_api::{Request, Response};

use crate::event::Event;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A listening API socket; the file is removed when this is dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Requests whose answers are not fully written yet.
    inflight: Arc<AtomicUsize>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Let answers already on their way (a migration's final report) reach their clients.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.inflight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on API socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {0} is in use by a running VMM")]
    InUse(PathBuf),
}

impl ApiServer {
    /// Bind `path` and serve requests into `events`.
    pub fn start(path: &Path, events: Sender<Event>) -> Result<ApiServer, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Listen {
            path: path.into(),
            source,
        })?;
        let inflight = Arc::new(AtomicUsize::new(0));
        let counter = inflight.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let events = events.clone();
                    let inflight = counter.clone();
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            let _ = serve(stream, &events, &inflight);
                        });
                }
            })
            .map_err(|source| ApiError::Listen {
                path: path.into(),
                source,
            })?;
        Ok(ApiServer {
            path: path.into(),
            inflight,
        })
    }
}

fn serve(stream: UnixStream, events: &Sender<Event>, inflight: &AtomicUsize) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
    let mut line = String::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64);
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && line.len() >= MAX_LINE {
            write_response(
                &mut out,
                &Response::Error(format!("request longer than {MAX_LINE} bytes")),
            )?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let req = match serde_json::from_str::<Request>(&line) {
            Err(e) => {
                write_response(&mut out, &Response::Error(format!("bad request: {e}")))?;
                continue;
            }
            Ok(req) => req,
        };
        let (tx, rx) = mpsc::channel();
        inflight.fetch_add(1, Ordering::SeqCst);
        let mut answered = false;
        if events.send(Event::Api(req, tx)).is_ok() {
            // Most requests get one line; a followed migration streams several.
            for response in rx {
                answered = true;
                if write_response(&mut out, &response).is_err() {
                    break;
                }
            }
        }
        if !answered {
            let _ = write_response(
                &mut out,
                &Response::Error("the VMM is shutting down".into()),
            );
        }
        inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_response(out: &mut UnixStream, r: &Response) -> io::Result<()> {
    let mut s = serde_json::to_string(r).map_err(io::Error::other)?;
    s.push('\n');
    out.write_all(s.as_bytes())
}

/// Send one request and call `each` with every answer line until the VMM closes the stream
/// (a followed migration) or `each` returns false.
pub fn call_stream(
    path: &Path,
    req: &Request,
    mut each: impl FnMut(Response) -> bool,
) -> io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    let mut s = serde_json::to_string(req).map_err(io::Error::other)?;
    s.push('\n');
    stream.write_all(s.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    for line in BufReader::new(stream).lines() {
        let r: Response = serde_json::from_str(&line?).map_err(io::Error::other)?;
        if !each(r) {
            break;
        }
    }
    Ok(())
}

/// Send one request to the API socket at `path` and wait for the answer.
pub fn call(path: &Path, req: &Request) -> io::Result<Response> {
    let mut first = None;
    call_stream(path, req, |r| {
        first = Some(r);
        false
    })?;
    first.ok_or_else(|| io::Error::other("the VMM closed the connection without answering"))
}
