//! Small legacy PC devices: the i8042 reset line and the ACPI power-management control port.

mod persist;

pub use persist::{I8042State, PmState};

use crate::bus::{PioDevice, VmAction};

/// The i8042 keyboard controller, as far as a VM needs it: status reads say "no data",
/// and command 0xFE (pulse the reset line) resets the machine. Base port 0x60, 5 ports
/// (0x60 data, 0x64 command/status).
#[derive(Debug, Default)]
pub struct I8042 {
    pub(crate) last_command: u8,
}

/// i8042 command: pulse the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xfe;

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmAction> {
        if offset == 4 && data.len() == 1 {
            self.last_command = data[0];
            if data[0] == I8042_CMD_RESET {
                return Some(VmAction::Reset);
            }
        }
        None
    }
}

/// The ACPI PM1a control register block at port 0x600 (8 ports: PM1a event at 0x600, control
/// at 0x604), the place QEMU's q35 machine and ferry's ACPI tables put it. Writing SLP_EN
/// (bit 13) powers the VM off; ferry has only the S5 sleep state.
#[derive(Debug, Default)]
pub struct PowerManagement {
    pub(crate) control: u16,
}

/// Base port of the PM1a block.
pub const PM_BASE: u16 = 0x600;
/// Offset of PM1a_CNT within the block.
pub const PM1A_CNT_OFFSET: u16 = 4;
/// SLP_EN bit of PM1a_CNT.
pub const SLP_EN: u16 = 1 << 13;

impl PioDevice for PowerManagement {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if offset == PM1A_CNT_OFFSET {
            let v = self.control.to_le_bytes();
            let n = data.len().min(2);
            data[..n].copy_from_slice(&v[..n]);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmAction> {
        if offset != PM1A_CNT_OFFSET || data.is_empty() {
            return None;
        }
        let mut v = [0u8; 2];
        let n = data.len().min(2);
        v[..n].copy_from_slice(&data[..n]);
        let value = u16::from_le_bytes(v);
        self.control = value & !SLP_EN;
        (value & SLP_EN != 0).then_some(VmAction::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset() {
        let mut d = I8042::default();
        assert_eq!(d.write(4, &[0x01]), None);
        assert_eq!(d.write(0, &[0xfe]), None);
        assert_eq!(d.write(4, &[0xfe]), Some(VmAction::Reset));
        let mut s = [0xffu8];
        d.read(4, &mut s);
        assert_eq!(s, [0]);
    }

    #[test]
    fn pm_poweroff_only_on_slp_en() {
        let mut d = PowerManagement::default();
        assert_eq!(d.write(4, &0x0001u16.to_le_bytes()), None);
        let mut r = [0u8; 2];
        d.read(4, &mut r);
        assert_eq!(u16::from_le_bytes(r), 1);
        assert_eq!(d.write(0, &SLP_EN.to_le_bytes()), None);
        assert_eq!(d.write(4, &SLP_EN.to_le_bytes()), Some(VmAction::PowerOff));
        // The high byte alone (an 8-bit write to 0x605) carries SLP_EN too.
        assert_eq!(d.write(4, &[0x00]), None);
    }
}
