//! Host ends of the serial ports: stdio, a file, or a unix socket that streams the port both
//! ways to whoever connects (like QEMU's `-chardev socket,server=on,wait=off`, but several
//! clients may watch at once: the host daemon's console, an admin's `ferry vm console`, a
//! test's reader; each gets every byte, and what any of them types reaches the guest). Output
//! to a socket nobody reads is dropped rather than stalling the guest, as a UART with no cable
//! would.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::SerialBackend;
use ferry_devices::serial::{SerialDevice, SerialOut};

/// Errors opening a serial backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open serial output file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on serial socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot duplicate stdout")]
    Stdout(#[source] io::Error),
}

/// An opened backend: the writer the UART gets, and where its input comes from.
pub struct OpenedBackend {
    pub out: SerialOut,
    input: Input,
    /// A socket path to remove when the VMM ends.
    pub socket: Option<PathBuf>,
}

enum Input {
    None,
    Stdin,
    Unix(UnixListener, Clients),
}

/// Open the host end of a serial port.
pub fn open(backend: &SerialBackend) -> Result<OpenedBackend, BackendError> {
    match backend {
        SerialBackend::Null => Ok(OpenedBackend {
            out: Box::new(io::sink()),
            input: Input::None,
            socket: None,
        }),
        SerialBackend::Stdio => {
            // Unbuffered: a heartbeat byte must leave when the guest writes it.
            let file = File::from(
                io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(BackendError::Stdout)?,
            );
            Ok(OpenedBackend {
                out: Box::new(file),
                input: Input::Stdin,
                socket: None,
            })
        }
        SerialBackend::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BackendError::File {
                    path: path.clone(),
                    source,
                })?;
            Ok(OpenedBackend {
                out: Box::new(f),
                input: Input::None,
                socket: None,
            })
        }
        SerialBackend::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = UnixListener::bind(path).map_err(|source| BackendError::Listen {
                path: path.clone(),
                source,
            })?;
            let client: Clients = Arc::new(Mutex::new(Vec::new()));
            Ok(OpenedBackend {
                out: Box::new(SocketOut {
                    clients: client.clone(),
                }),
                input: Input::Unix(listener, client),
                socket: Some(path.clone()),
            })
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), BackendError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| BackendError::Listen {
                path: path.into(),
                source,
            })
        }
        Ok(_) => Err(BackendError::NotASocket(path.into())),
        Err(_) => Ok(()),
    }
}

impl OpenedBackend {
    /// Start feeding host input into `device`, if this backend has input.
    pub fn start_input(&mut self, name: &str, device: Arc<Mutex<SerialDevice>>) -> io::Result<()> {
        match std::mem::replace(&mut self.input, Input::None) {
            Input::None => Ok(()),
            Input::Stdin => spawn(name, move || pump(io::stdin(), &device)),
            Input::Unix(listener, client) => spawn(name, move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    {
                        let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
                        // The oldest watcher makes room once the port has many.
                        if c.len() >= MAX_CLIENTS {
                            let old = c.remove(0);
                            let _ = old.shutdown(std::net::Shutdown::Both);
                        }
                        c.push(stream);
                    }
                    let device = device.clone();
                    let _ = std::thread::Builder::new()
                        .name("serial-client".into())
                        .spawn(move || pump(reader, &device));
                }
            }),
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("{name}-in"))
        .spawn(f)
        .map(|_| ())
}

/// Copy bytes from `src` into the UART's receive FIFO, waiting while the FIFO is full.
fn pump(mut src: impl Read, device: &Mutex<SerialDevice>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut done = 0;
        while done < n {
            let k = device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue(&buf[done..n]);
            done += k;
            if k == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The clients of a serial socket.
type Clients = Arc<Mutex<Vec<UnixStream>>>;

/// Most clients one serial socket serves at once.
const MAX_CLIENTS: usize = 8;

/// UART output to every connected socket client, never blocking the vCPU.
struct SocketOut {
    clients: Clients,
}

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut guard = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        guard.retain(|stream| {
            // SAFETY: `buf` is a valid slice for its length and the fd belongs to `stream`,
            // which the guard keeps alive for the duration of the call.
            let r = unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            // A client that went away is dropped; one that is merely slow misses these bytes.
            r >= 0 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
