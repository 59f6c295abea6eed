//! The destination side of a live migration: accept one connection, take the guest's memory
//! and state, and run the guest once the source commits (and only if this side gets every disk
//! lock). Anything wrong before that (a bad or truncated stream, a cut connection, a cancel)
//! ends here with an error and nothing running.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use ferry_api::VmConfig;
use ferry_migration::protocol::{
    self, AckInfo, Command, ProtocolError, ReceiverState, RoundInfo, PAGE_SIZE,
};
use ferry_migration::Envelope;
use vm_memory::{Bytes, GuestAddress};

use super::transport::Transport;
use crate::memory::{self, GuestMemory};
use crate::snapshot::Snapshot;
use crate::vm::{RestoreOverrides, RunOptions, Vm, VmError};

/// Errors receiving a VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no source connected within {0:?}")]
    NoSource(Duration),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the source sent {got} bytes of memory for a VM of {expected}")]
    MemorySize { expected: u64, got: u64 },
    #[error("the migrated state is invalid")]
    State(#[source] ferry_migration::EnvelopeError),
    #[error("cannot take the VM's disks at commit")]
    Disks(#[source] Box<VmError>),
}

/// Failure injection for tests: `FERRY_CRASH_AT=<point>` makes a receiving VMM die abruptly
/// (as a crashed host would) at that point of the protocol. Not for production use.
fn crash_point(point: &str) {
    if std::env::var("FERRY_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("ferry: FERRY_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

fn ack(t: &mut Transport, ok: bool, message: String) -> Result<(), ProtocolError> {
    protocol::write_frame(t, Command::Ack, &protocol::json(&AckInfo { ok, message }))
}

fn valid_page(mem: &GuestMemory, gpa: u64) -> bool {
    gpa.is_multiple_of(PAGE_SIZE as u64)
        && memory::region_of(mem, gpa).is_some_and(|r| {
            use vm_memory::GuestMemoryRegion;
            gpa + PAGE_SIZE as u64 <= r.start_addr().0 + r.len()
        })
}

/// Wait on `listen` for one incoming VM and return it running.
pub fn receive(
    listen: &str,
    accept_timeout: Option<Duration>,
    overrides: &RestoreOverrides,
    opts: RunOptions,
    mut log: impl FnMut(&str),
) -> Result<Vm, VmError> {
    let listener = TcpListener::bind(listen).map_err(|source| ReceiveError::Listen {
        addr: listen.into(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ReceiveError::Listen {
            addr: listen.into(),
            source,
        })?;
    log(&format!(
        "waiting for a VM on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let started = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, peer)) => {
                log(&format!("source {peer} connected"));
                break s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if accept_timeout.is_some_and(|t| started.elapsed() > t) {
                    return Err(ReceiveError::NoSource(accept_timeout.unwrap_or_default()).into());
                }
                if crate::vm::stop_requested() {
                    return Err(ReceiveError::NoSource(started.elapsed()).into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(ReceiveError::Listen {
                    addr: listen.into(),
                    source,
                }
                .into())
            }
        }
    };
    drop(listener);
    let _ = stream.set_nonblocking(false);
    let mut t = Transport::over_tcp(stream).map_err(|e| ReceiveError::Protocol(e.into()))?;
    let result = receive_on(&mut t, overrides, opts, &mut log);
    if let Err(e) = &result {
        // Tell the source why, if it still listens.
        let _ = ack(&mut t, false, crate::vm::error_chain(e));
    }
    result
}

fn receive_on(
    t: &mut Transport,
    overrides: &RestoreOverrides,
    opts: RunOptions,
    log: &mut impl FnMut(&str),
) -> Result<Vm, VmError> {
    let mut state = ReceiverState::AwaitStart;
    let mut memory_bytes = 0;
    let mut config: Option<VmConfig> = None;
    let mut mem: Option<GuestMemory> = None;
    let mut prepared = None;
    let mut vm: Option<Vm> = None;
    let mut pages = 0u64;
    let zero = [0u8; PAGE_SIZE];
    // Pages that hold data from the stream (one bit per guest-physical page).
    let mut written: Vec<u64> = Vec::new();
    loop {
        let frame = protocol::read_frame(t)
            .and_then(|f| f.ok_or(ProtocolError::Truncated))
            .map_err(ReceiveError::from)?;
        state = state.next(frame.command).map_err(ReceiveError::from)?;
        match frame.command {
            Command::Start => {
                let info = protocol::check_start(&frame).map_err(ReceiveError::from)?;
                memory_bytes = info.memory_bytes;
                ack(t, true, String::new()).map_err(ReceiveError::from)?;
            }
            Command::Config => {
                let c: VmConfig = protocol::parse(&frame).map_err(ReceiveError::from)?;
                let c = overrides.apply(c)?;
                if c.memory_mib << 20 != memory_bytes {
                    return Err(ReceiveError::MemorySize {
                        expected: c.memory_mib << 20,
                        got: memory_bytes,
                    }
                    .into());
                }
                let m = memory::create_guest_memory(memory_bytes)?;
                // The KVM VM is made now, while pages arrive, not during the pause.
                prepared = Some(Vm::prepare(&m)?);
                mem = Some(m);
                log(&format!(
                    "receiving a {} MiB, {}-vCPU VM",
                    c.memory_mib, c.vcpus
                ));
                config = Some(c);
                ack(t, true, String::new()).map_err(ReceiveError::from)?;
            }
            Command::Pages => {
                let m = mem
                    .as_ref()
                    .ok_or(ProtocolError::Truncated)
                    .map_err(ReceiveError::from)?;
                let mut err = None;
                let n = protocol::decode_pages(
                    &frame.payload,
                    |gpa| valid_page(m, gpa),
                    |gpa, data| {
                        // Fresh memory is zero: a zero page needs writing only where data
                        // landed before. Skipping the rest keeps untouched guest memory
                        // unallocated here, and the first round fast.
                        let bit = (gpa / PAGE_SIZE as u64) as usize;
                        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
                        if word >= written.len() {
                            written.resize(word + 1, 0);
                        }
                        let page = match data {
                            Some(d) => {
                                written[word] |= mask;
                                d
                            }
                            None if written[word] & mask != 0 => {
                                written[word] &= !mask;
                                &zero[..]
                            }
                            None => return,
                        };
                        if let Err(e) = m.write_slice(page, GuestAddress(gpa)) {
                            err = Some(e);
                        }
                    },
                )
                .map_err(ReceiveError::from)?;
                if let Some(e) = err {
                    return Err(memory::MemoryError::Access(e).into());
                }
                pages += n as u64;
            }
            Command::RoundEnd => {
                let r: RoundInfo = protocol::parse(&frame).map_err(ReceiveError::from)?;
                log(&format!(
                    "round {}: {} pages received so far, {} dirty",
                    r.round, pages, r.pages
                ));
            }
            Command::State => {
                let (snap, _): (Snapshot, u32) = Envelope::MigrationState
                    .decode(&frame.payload)
                    .map_err(ReceiveError::State)?;
                let (Some(c), Some(m), Some(k)) = (config.take(), mem.take(), prepared.take())
                else {
                    return Err(ReceiveError::Protocol(ProtocolError::Truncated).into());
                };
                let paused = RunOptions {
                    paused: true,
                    ..opts.clone()
                };
                let t_restore = Instant::now();
                let Snapshot {
                    vm: vm_state,
                    vcpus,
                    devices,
                    ..
                } = snap;
                vm = Some(Vm::restore_into(
                    k,
                    c,
                    m,
                    (vm_state, vcpus, devices),
                    false,
                    paused,
                )?);
                tracing::debug!("restored the VM in {:?}", t_restore.elapsed());
                crash_point("after-state");
                ack(t, true, String::new()).map_err(ReceiveError::from)?;
            }
            Command::Commit => {
                let mut v = vm
                    .take()
                    .ok_or(ProtocolError::Truncated)
                    .map_err(ReceiveError::from)?;
                crash_point("on-commit");
                v.take_disks()
                    .map_err(|e| ReceiveError::Disks(Box::new(e)))?;
                v.resume()?;
                v.announce_macs();
                ack(t, true, String::new()).map_err(ReceiveError::from)?;
                log("the guest runs here now");
                return Ok(v);
            }
            Command::Cancel => {
                return Err(ReceiveError::Protocol(ProtocolError::Cancelled(String::new())).into())
            }
            Command::Ack => {
                let e = ProtocolError::OutOfOrder {
                    got: Command::Ack,
                    state: "receiving",
                };
                return Err(ReceiveError::Protocol(e).into());
            }
        }
    }
}
