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
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// What was opened.
    pub backend: SerialBackend,
    pub out: SerialOut,
    input: Input,
    /// A socket path to remove when the VMM ends.
    pub socket: Option<PathBuf>,
}

enum Input {
    None,
    Stdin,
    /// A socket's clients, accepted from the moment it was opened; their input waits here
    /// until the UART exists.
    Unix(Arc<DeviceSlot>),
}

/// The UART a socket's clients type into, once there is one.
#[derive(Default)]
struct DeviceSlot {
    device: Mutex<Option<Arc<Mutex<SerialDevice>>>>,
    ready: std::sync::Condvar,
}

impl DeviceSlot {
    fn set(&self, device: Arc<Mutex<SerialDevice>>) {
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Some(device);
        self.ready.notify_all();
    }

    fn wait(&self) -> Arc<Mutex<SerialDevice>> {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(dev) = d.as_ref() {
                return dev.clone();
            }
            d = self.ready.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Serial sockets opened ahead of their VM: a migration's destination listens on them from
/// the start of `vmm receive`, so a console attached before the switch-over sees every byte
/// the guest writes after it. What the VM does not take is closed and its socket removed.
#[derive(Default)]
pub struct Ports(Mutex<Vec<OpenedBackend>>);

impl Ports {
    /// Open the socket backends among `backends` now (others open with their VM).
    pub fn open<'a>(
        backends: impl IntoIterator<Item = &'a SerialBackend>,
    ) -> Result<Ports, BackendError> {
        let ports = Ports::default();
        for b in backends {
            if matches!(b, SerialBackend::Unix(_)) {
                let opened = open(b)?;
                ports
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(opened);
            }
        }
        Ok(ports)
    }

    /// The port opened for `backend`, if there is one.
    pub fn take(&self, backend: &SerialBackend) -> Option<OpenedBackend> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = v.iter().position(|o| o.backend == *backend)?;
        Some(v.remove(i))
    }
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(v.iter().map(|o| &o.backend))
            .finish()
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        for o in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            if let Some(p) = &o.socket {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Open the host end of a serial port.
pub fn open(backend: &SerialBackend) -> Result<OpenedBackend, BackendError> {
    match backend {
        SerialBackend::Null => Ok(OpenedBackend {
            backend: backend.clone(),
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
                backend: backend.clone(),
                out: Box::new(StdoutOut(file)),
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
                backend: backend.clone(),
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
            let clients: Clients = Arc::new(Mutex::new(Vec::new()));
            let slot = Arc::new(DeviceSlot::default());
            accept_clients(listener, clients.clone(), slot.clone()).map_err(|source| {
                BackendError::Listen {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(OpenedBackend {
                backend: backend.clone(),
                out: Box::new(SocketOut { clients }),
                input: Input::Unix(slot),
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
            Input::Stdin => {
                let tty = terminal::enter_raw_mode();
                spawn(name, move || {
                    if tty {
                        pump_terminal(&device)
                    } else {
                        pump(io::stdin(), &device)
                    }
                })
            }
            Input::Unix(slot) => {
                slot.set(device);
                Ok(())
            }
        }
    }
}

/// Accept a socket's clients from now on: each gets every byte the UART sends from the
/// moment it connects, and what it types reaches the UART once there is one.
fn accept_clients(
    listener: UnixListener,
    clients: Clients,
    slot: Arc<DeviceSlot>,
) -> io::Result<()> {
    spawn("serial-accept", move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            {
                let mut c = clients.lock().unwrap_or_else(|e| e.into_inner());
                // The oldest watcher makes room once the port has many.
                if c.len() >= MAX_CLIENTS {
                    let old = c.remove(0);
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                c.push(stream);
            }
            let slot = slot.clone();
            let _ = std::thread::Builder::new()
                .name("serial-client".into())
                .spawn(move || {
                    let device = slot.wait();
                    pump(reader, &device)
                });
        }
    })
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
        feed(&buf[..n], device);
    }
}

/// Put `bytes` into the UART's receive FIFO, waiting while it is full.
fn feed(bytes: &[u8], device: &Mutex<SerialDevice>) {
    let mut done = 0;
    while done < bytes.len() {
        let k = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue(&bytes[done..]);
        done += k;
        if k == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The byte that detaches a terminal from the serial port: Ctrl-], as telnet's escape and
/// `ferry vm console`'s.
pub const DETACH_KEY: u8 = 0x1d;

/// Whether the terminal was detached: the guest's output to stdout is dropped from then on.
static DETACHED: AtomicBool = AtomicBool::new(false);

/// Stdin is a terminal in raw mode: forward every byte, up to Ctrl-], which gives the
/// terminal back (its settings restored) while the VM runs on.
fn pump_terminal(device: &Mutex<SerialDevice>) {
    let mut buf = [0u8; 256];
    let mut stdin = io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (bytes, detach) = match buf[..n].iter().position(|&b| b == DETACH_KEY) {
            Some(p) => (&buf[..p], true),
            None => (&buf[..n], false),
        };
        feed(bytes, device);
        if detach {
            DETACHED.store(true, Ordering::SeqCst);
            terminal::restore();
            eprintln!(
                "\r\nferry: detached from the serial console; the VM keeps running (Ctrl-C stops it)"
            );
            return;
        }
    }
}

/// UART output to stdout, until a terminal detaches.
struct StdoutOut(File);

impl Write for StdoutOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if DETACHED.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A serial port on the terminal the VMM runs in: raw mode while the VM runs (every key,
/// Ctrl-C included, goes to the guest, as on a real serial line), and the terminal's own
/// settings back on every way out: the VM ending, an error, a panic, a signal that stops the
/// VMM (SIGINT, SIGTERM end it through its normal exit), or Ctrl-].
pub mod terminal {
    use std::sync::Mutex;

    static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

    /// Put stdin's terminal in raw mode, if stdin is a terminal; false if it is not.
    pub fn enter_raw_mode() -> bool {
        // SAFETY: a termios is plain data; all zeroes is a valid value to be overwritten.
        let mut old: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: isatty only asks about fd 0.
        let tty = unsafe { libc::isatty(0) } == 1;
        // SAFETY: tcgetattr reads fd 0's settings into a termios we own.
        if !tty || unsafe { libc::tcgetattr(0, &mut old) } != 0 {
            return false;
        }
        let mut raw = old;
        // As QEMU's stdio backend: no line editing, echo or signals; output processing kept,
        // so a guest's "\n" still starts a new line.
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_oflag |= libc::OPOST;
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN | libc::ISIG);
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        {
            let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
            if saved.is_none() {
                *saved = Some(old);
                // SAFETY: `restore_at_exit` is an extern "C" fn that lives for the program.
                unsafe { libc::atexit(restore_at_exit) };
                let hook = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    restore();
                    hook(info)
                }));
            }
        }
        // SAFETY: sets fd 0's attributes from a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return false;
        }
        eprintln!("ferry: the serial console is this terminal; Ctrl-] detaches\r");
        true
    }

    /// Give the terminal its own settings back (once; later calls do nothing).
    pub fn restore() {
        let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = saved {
            // SAFETY: sets fd 0's attributes from the termios read from it before.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }

    extern "C" fn restore_at_exit() {
        restore();
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
