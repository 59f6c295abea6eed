//! The 16550A-compatible UART (COM1 at 0x3f8 / IRQ 4, COM2 at 0x2f8 / IRQ 3), built on
//! vm-superio's register model. Output goes to any `Write`; input is pushed in by the VMM's
//! backend thread with [`SerialDevice::enqueue`].

pub mod persist;

pub use persist::SerialDeviceState;

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{PioDevice, VmAction};

/// Number of ports a UART occupies.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Raises the UART's interrupt line through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where a UART's output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// One UART.
pub struct SerialDevice {
    pub(crate) inner: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART in its power-on state.
    pub fn new(irq: IrqTrigger, out: SerialOut) -> Self {
        SerialDevice {
            inner: Serial::new(irq, out),
        }
    }

    /// Push bytes typed by the host into the receive FIFO; returns how many fit.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if self.inner.fifo_capacity() == 0 {
            return 0;
        }
        let n = bytes.len().min(self.inner.fifo_capacity());
        self.inner.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmAction> {
        if let (Some(&byte), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failing backend (closed pipe, full disk) must not stop the guest; vm-superio
            // already dropped the byte, as a UART with nobody listening would.
            if let Err(e) = self.inner.write(off, byte) {
                tracing::trace!("serial write failed: {e}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::Persist;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device(out: Shared) -> SerialDevice {
        SerialDevice::new(IrqTrigger(EventFd::new(0).unwrap()), Box::new(out))
    }

    #[test]
    fn output_and_input() {
        let out = Shared::default();
        let mut d = device(out.clone());
        for b in b"hi" {
            d.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert_eq!(d.enqueue(b"xy"), 2);
        let mut lsr = [0u8];
        d.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let mut d = device(Shared::default());
        d.write(3, &[0x80]); // DLAB
        d.write(0, &[0x0c]); // divisor low
        d.write(3, &[0x03]); // 8N1
        d.write(7, &[0x5a]); // scratch
        d.enqueue(b"abc");
        let state = d.save().unwrap();
        let out = Shared::default();
        let args = (
            IrqTrigger(EventFd::new(0).unwrap()),
            Box::new(out) as SerialOut,
        );
        let mut r = SerialDevice::restore(args, &state).unwrap();
        assert_eq!(r.save().unwrap(), state);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }

    #[test]
    fn oversized_fifo_in_state_is_refused() {
        let mut state = device(Shared::default()).save().unwrap();
        state.in_buffer = vec![0; 4096];
        let args = (
            IrqTrigger(EventFd::new(0).unwrap()),
            Box::new(Shared::default()) as SerialOut,
        );
        assert!(SerialDevice::restore(args, &state).is_err());
    }
}
