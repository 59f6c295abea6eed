//! Saved UART state: every register and the receive FIFO.

use ferry_migration::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{IrqTrigger, SerialDevice, SerialOut};

/// The registers and FIFO of one UART.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    #[serde(default)]
    pub in_buffer: Vec<u8>,
}

impl Default for SerialDeviceState {
    /// The power-on state of a 16550A.
    fn default() -> Self {
        from_superio(SerialState::default())
    }
}

fn from_superio(s: SerialState) -> SerialDeviceState {
    SerialDeviceState {
        baud_divisor_low: s.baud_divisor_low,
        baud_divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        in_buffer: s.in_buffer,
    }
}

/// Why a UART could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialPersistError {
    #[error("saved UART state is invalid: {0}")]
    Invalid(String),
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = (IrqTrigger, SerialOut);
    type Error = SerialPersistError;

    fn save(&self) -> Result<SerialDeviceState, SerialPersistError> {
        Ok(from_superio(self.inner.state()))
    }

    fn restore(
        (irq, out): (IrqTrigger, SerialOut),
        s: &SerialDeviceState,
    ) -> Result<Self, SerialPersistError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, irq, NoEvents, out)
            .map_err(|e| SerialPersistError::Invalid(e.to_string()))?;
        Ok(SerialDevice { inner })
    }
}
