//! The worker thread of one virtio device.
//!
//! It sleeps in epoll on: each queue's notification eventfd (a KVM ioeventfd on QueueNotify,
//! so a guest's notify never leaves the kernel), the transport's kick eventfd (activation,
//! resume), the backend's fd (a tap), and an exit eventfd. Each wake-up locks the transport and
//! runs the device; while the VM is paused the transport's `paused` flag makes that a no-op, and
//! a kick on resume catches up.
//!
//! A worker that panics stops the VMM (see [`failed`]).

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
    let me = name.clone();
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
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dev.lock().unwrap_or_else(|e| e.into_inner()).process(wake)
                }));
                if ran.is_err() {
                    failed(&me);
                }
            }
        }
    })?;
    Ok(Worker {
        exit,
        thread: Some(thread),
    })
}

/// The device's worker panicked (the panic is printed just before, to the VMM's log): the device
/// answers nothing from now on, so the requests the guest has queued would wait for good while
/// everything else (the vCPUs, the API) carries on, a hang nobody sees. Stop the VMM instead,
/// loudly: the host daemon sees it gone and says so, and the disks are as the guest last had
/// them acknowledged (nothing it was told is done is lost).
fn failed(name: &str) -> ! {
    // Straight to stderr (the VMM's log), beside the panic the default hook printed there.
    eprintln!(
        "ferry: virtio device {name}: its worker failed (see the panic above); stopping the VM rather than leave its guest waiting for a device that no longer answers"
    );
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{GuestMemoryMmap, Interrupt, Queue};
    use vm_memory::GuestAddress;

    struct Broken;

    impl VirtioDevice for Broken {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn activate(&mut self, _: u64) {}
        fn reset(&mut self) {}
        fn process(&mut self, _: Wake, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
            panic!("the device broke");
        }
    }

    const CHILD: &str = "FERRY_TEST_BROKEN_WORKER";

    #[test]
    fn a_worker_whose_device_panics_stops_the_vmm_instead_of_hanging_the_guest() {
        if std::env::var_os(CHILD).is_some() {
            // The child: a driver brings the device up; its worker runs it and panics.
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let irq = Interrupt::new(EventFd::new(0).unwrap());
            let t = MmioTransport::new(Broken, mem, irq, EventFd::new(0).unwrap()).unwrap();
            let dev = Arc::new(Mutex::new(t));
            let _w = spawn("blk0".into(), dev.clone(), vec![EventFd::new(0).unwrap()]).unwrap();
            {
                let mut d = dev.lock().unwrap();
                d.write(0x24, &1u32.to_le_bytes()); // driver features, high word:
                d.write(0x20, &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
                d.write(0x70, &15u32.to_le_bytes()); // ACK | DRIVER | FEATURES_OK | DRIVER_OK
            }
            std::thread::sleep(std::time::Duration::from_secs(10));
            std::process::exit(0); // still here: the worker did not stop the process
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "virtio::worker::tests::a_worker_whose_device_panics_stops_the_vmm_instead_of_hanging_the_guest",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(6 /* SIGABRT */),
            "{:?}\n{err}",
            out.status
        );
        assert!(
            err.contains("the device broke"),
            "the panic is in the log: {err}"
        );
        assert!(
            err.contains("virtio device blk0: its worker failed"),
            "and what became of the VM: {err}"
        );
    }
}
