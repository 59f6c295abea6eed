//! The VM's device set: two UARTs, the i8042 reset line and the ACPI PM1a control port,
//! placed on the port-I/O bus, wired to interrupts, saved and restored together.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::SerialBackend;
use ferry_devices::legacy::{I8042State, PmState, PowerManagement, I8042, PM_BASE};
use ferry_devices::serial::{IrqTrigger, SerialDevice, SerialDeviceState, SERIAL_PORT_LEN};
use ferry_migration::Persist;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioBus;
use crate::serial_backend::{self, BackendError, OpenedBackend};

/// COM1 base port and IRQ.
pub const COM1: (u16, u32) = (0x3f8, 4);
/// COM2 base port and IRQ.
pub const COM2: (u16, u32) = (0x2f8, 3);

/// Errors building or restoring the device set.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("serial backend")]
    Backend(#[from] BackendError),
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot wire IRQ {irq}")]
    Irqfd {
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("device bus")]
    Bus(#[from] crate::bus::Overlap),
    #[error("serial device state")]
    Serial(#[from] ferry_devices::serial::persist::SerialPersistError),
    #[error("cannot start serial input thread")]
    Thread(#[source] std::io::Error),
}

/// Saved state of every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub com1: SerialDeviceState,
    pub com2: SerialDeviceState,
    #[serde(default)]
    pub i8042: I8042State,
    #[serde(default)]
    pub pm: PmState,
}

/// The device set of a VM.
pub struct Devices {
    pub com1: Arc<Mutex<SerialDevice>>,
    pub com2: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub pm: Arc<Mutex<PowerManagement>>,
    /// Socket files to remove when the VMM ends.
    pub sockets: Vec<PathBuf>,
}

impl Drop for Devices {
    fn drop(&mut self) {
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn irq(vm: &VmFd, irq: u32) -> Result<IrqTrigger, DevicesError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DevicesError::EventFd)?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| DevicesError::Irqfd { irq, source })?;
    Ok(IrqTrigger(evt))
}

/// What the devices need from their surroundings.
pub struct DevicesArgs<'a> {
    pub vm: &'a VmFd,
    pub serial: &'a SerialBackend,
    pub serial2: &'a SerialBackend,
}

impl Devices {
    /// Devices in their power-on state.
    pub fn new(args: DevicesArgs<'_>) -> Result<Devices, DevicesError> {
        let state = DevicesState {
            com1: SerialDeviceState::default(),
            com2: SerialDeviceState::default(),
            i8042: I8042State::default(),
            pm: PmState::default(),
        };
        Devices::restore(args, &state)
    }

    /// Place every device on `bus`.
    pub fn attach(&self, bus: &mut PioBus) -> Result<(), DevicesError> {
        bus.insert(COM1.0, SERIAL_PORT_LEN, self.com1.clone())?;
        bus.insert(COM2.0, SERIAL_PORT_LEN, self.com2.clone())?;
        bus.insert(0x60, 5, self.i8042.clone())?;
        bus.insert(PM_BASE, 8, self.pm.clone())?;
        Ok(())
    }

    /// Save every device's state.
    pub fn save(&self) -> Result<DevicesState, DevicesError> {
        let serial =
            |s: &Arc<Mutex<SerialDevice>>| s.lock().unwrap_or_else(|e| e.into_inner()).save();
        let i8042 = match self.i8042.lock().unwrap_or_else(|e| e.into_inner()).save() {
            Ok(s) => s,
            Err(e) => match e {},
        };
        let pm = match self.pm.lock().unwrap_or_else(|e| e.into_inner()).save() {
            Ok(s) => s,
            Err(e) => match e {},
        };
        Ok(DevicesState {
            com1: serial(&self.com1)?,
            com2: serial(&self.com2)?,
            i8042,
            pm,
        })
    }

    /// Rebuild the devices from a saved state, with host backends from `args`.
    pub fn restore(args: DevicesArgs<'_>, state: &DevicesState) -> Result<Devices, DevicesError> {
        let mut sockets = vec![];
        let mut port = |backend: &SerialBackend, irq_no: u32, s: &SerialDeviceState, name: &str| {
            let mut opened: OpenedBackend = serial_backend::open(backend)?;
            if let Some(p) = opened.socket.take() {
                sockets.push(p);
            }
            let out = std::mem::replace(&mut opened.out, Box::new(std::io::sink()));
            let dev = Arc::new(Mutex::new(SerialDevice::restore(
                (irq(args.vm, irq_no)?, out),
                s,
            )?));
            opened
                .start_input(name, dev.clone())
                .map_err(DevicesError::Thread)?;
            Ok::<_, DevicesError>(dev)
        };
        let com1 = port(args.serial, COM1.1, &state.com1, "com1")?;
        let com2 = port(args.serial2, COM2.1, &state.com2, "com2")?;
        let i8042 = match I8042::restore((), &state.i8042) {
            Ok(d) => d,
            Err(e) => match e {},
        };
        let pm = match PowerManagement::restore((), &state.pm) {
            Ok(d) => d,
            Err(e) => match e {},
        };
        Ok(Devices {
            com1,
            com2,
            i8042: Arc::new(Mutex::new(i8042)),
            pm: Arc::new(Mutex::new(pm)),
            sockets,
        })
    }
}
