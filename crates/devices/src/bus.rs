//! What a port-I/O device looks like to the vCPU loop.

/// Something a device asks of the whole VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// The guest powered off (ACPI sleep state S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, triple fault).
    Reset,
}

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`; the device may ask the VM to stop.
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<VmAction>;
}
