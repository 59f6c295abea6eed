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

/// Power management at port 0x600 (8 ports). Two ways to power off, both S5:
/// - 0x600, the hardware-reduced ACPI sleep control register ferry's FADT declares (Linux):
///   a byte with SLP_TYP = 5 and SLP_EN (bit 5);
/// - 0x604, a PM1a control register where QEMU's q35 machine has it (the test guest, which
///   runs under both): a word with SLP_EN (bit 13).
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
/// Offset of the hardware-reduced ACPI sleep control register (the FADT points there).
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
/// SLP_EN of the sleep control register.
pub const HW_SLP_EN: u8 = 1 << 5;
/// The S5 sleep type ferry's DSDT declares.
pub const S5_SLEEP_TYPE: u8 = 5;

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
        if offset == SLEEP_CONTROL_OFFSET && data.len() == 1 {
            // Hardware-reduced ACPI sleep control: SLP_TYP in bits 2-4, SLP_EN bit 5.
            let v = data[0];
            return (v & HW_SLP_EN != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE)
                .then_some(VmAction::PowerOff);
        }
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
        assert_eq!(d.write(4, &[0x00]), None);
        // Hardware-reduced sleep control: only S5 with SLP_EN powers off.
        assert_eq!(d.write(0, &[5 << 2]), None);
        assert_eq!(d.write(0, &[(3 << 2) | HW_SLP_EN]), None);
        assert_eq!(
            d.write(0, &[(5 << 2) | HW_SLP_EN]),
            Some(VmAction::PowerOff)
        );
    }
}
