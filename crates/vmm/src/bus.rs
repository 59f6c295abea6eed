//! The port-I/O bus: which device answers which port.

use std::sync::{Arc, Mutex};

use ferry_devices::{PioDevice, VmAction};

/// A shared device on the bus.
pub type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port ranges and their devices. Built once at VM creation; lookups are a short scan.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<(u16, u16, SharedDevice)>,
}

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps another device")]
pub struct Overlap {
    base: u16,
    len: u16,
}

impl PioBus {
    /// Place `dev` at ports `base..base+len`.
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedDevice) -> Result<(), Overlap> {
        let end = u32::from(base) + u32::from(len);
        if self
            .ranges
            .iter()
            .any(|&(b, l, _)| u32::from(base) < u32::from(b) + u32::from(l) && u32::from(b) < end)
        {
            return Err(Overlap { base, len });
        }
        self.ranges.push((base, len, dev));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| port >= *b && u32::from(port) < u32::from(*b) + u32::from(*l))
            .map(|(b, _, d)| (port - b, d))
    }

    /// A guest read. Ports nobody decodes read as all ones, like an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((off, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(off, data),
            None => {
                tracing::trace!("unclaimed port read {port:#x}");
                data.fill(0xff)
            }
        }
    }

    /// A guest write. Ports nobody decodes swallow it.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<VmAction> {
        let (off, dev) = self.find(port)?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(off, data)
    }
}

/// A device on the MMIO bus (virtio-mmio transports). `offset` is relative to its base.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// A virtio-mmio transport on the bus: the registers a driver polls while the device works
/// are served without the transport's lock, everything else under it.
pub struct VirtioMmio<D> {
    fast: ferry_devices::virtio::mmio::FastRegisters,
    inner: Arc<Mutex<ferry_devices::virtio::mmio::MmioTransport<D>>>,
}

impl<D: ferry_devices::virtio::VirtioDevice> VirtioMmio<D> {
    pub fn new(inner: Arc<Mutex<ferry_devices::virtio::mmio::MmioTransport<D>>>) -> Self {
        let fast = inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fast_registers();
        VirtioMmio { fast, inner }
    }
}

impl<D: ferry_devices::virtio::VirtioDevice> MmioDevice for VirtioMmio<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if self.fast.read(offset, data) {
            return;
        }
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if self.fast.write(offset, data) {
            return;
        }
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

/// Address ranges and their MMIO devices.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<(u64, u64, Arc<dyn MmioDevice>)>,
}

impl MmioBus {
    /// Place `dev` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<dyn MmioDevice>) -> Result<(), Overlap> {
        if self
            .ranges
            .iter()
            .any(|&(b, l, _)| base < b + l && b < base + len)
        {
            return Err(Overlap { base: 0, len: 0 });
        }
        self.ranges.push((base, len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<dyn MmioDevice>)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| addr >= *b && addr < b + l)
            .map(|(b, _, d)| (addr - b, d))
    }

    /// A guest read; false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.read(off, data);
                true
            }
            None => false,
        }
    }

    /// A guest write; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_devices::legacy::I8042;

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = PioBus::default();
        bus.insert(0x60, 5, Arc::new(Mutex::new(I8042::default())))
            .unwrap();
        assert!(bus
            .insert(0x64, 1, Arc::new(Mutex::new(I8042::default())))
            .is_err());
        assert_eq!(bus.write(0x64, &[0xfe]), Some(VmAction::Reset));
        assert_eq!(bus.write(0x65, &[0xfe]), None);
        let mut d = [0u8; 1];
        bus.read(0x70, &mut d);
        assert_eq!(d, [0xff]);
    }
}
