//! The worker thread of one virtio device.
//!
//! It sleeps in epoll on: each queue's notification eventfd (a KVM ioeventfd on QueueNotify,
//! so a guest's notify never leaves the kernel), the transport's kick eventfd (activation,
//! resume), the backend's fd (a tap), and an exit eventfd. Each wake-up locks the transport and
//! runs the device; while the VM is paused the transport's `paused` flag makes that a no-op, and
//! a kick on resume catches up.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{VirtioDevice, Wake};

const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_KICK: u64 = u64::MAX - 1;
const TOKEN_BACKEND: u64 = u64::MAX - 2;

/// A running worker; dropping it stops the thread.
pub struct Worker {
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start the worker for `dev`, woken by `queue_evts[i]` for queue i.
pub fn spawn<D: VirtioDevice>(
    name: String,
    dev: Arc<Mutex<MmioTransport<D>>>,
    queue_evts: Vec<EventFd>,
) -> std::io::Result<Worker> {
    let exit = EventFd::new(0)?;
    let epoll = Epoll::new()?;
    let (kick, backend) = {
        let d = dev.lock().unwrap_or_else(|e| e.into_inner());
        (d.kick_fd().try_clone()?, d.device().backend_fd())
    };
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(exit.as_raw_fd(), TOKEN_EXIT)?;
    add(kick.as_raw_fd(), TOKEN_KICK)?;
    if let Some(fd) = backend {
        // Edge-triggered: the device reads the tap until it would block.
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_BACKEND),
        )?;
    }
    for (i, e) in queue_evts.iter().enumerate() {
        add(e.as_raw_fd(), i as u64)?;
    }
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let wake = match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_KICK => {
                        let _ = kick.read();
                        Wake::All
                    }
                    TOKEN_BACKEND => Wake::Backend,
                    i => {
                        if let Some(e) = queue_evts.get(i as usize) {
                            let _ = e.read();
                        }
                        Wake::Queue(i as usize)
                    }
                };
                dev.lock().unwrap_or_else(|e| e.into_inner()).process(wake);
            }
        }
    })?;
    Ok(Worker {
        exit,
        thread: Some(thread),
    })
}
