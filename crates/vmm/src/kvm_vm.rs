//! The VM-wide KVM state: the in-kernel interrupt controllers (two PICs, IOAPIC), the PIT
//! and the KVM clock.

use ferry_migration::Persist;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::layout;

/// Errors creating or restoring the VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("{what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError::Kvm { what, source }
}

/// Saved in-kernel irqchip, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its in-kernel irqchip and PIT.
pub struct KvmVm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl KvmVm {
    /// Open /dev/kvm and create a VM with an in-kernel irqchip and PIT.
    pub fn create() -> Result<KvmVm, KvmVmError> {
        let kvm = Kvm::new().map_err(KvmVmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(KvmVmError::ApiVersion(v));
        }
        let fd = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
        // KVM_PIT_SPEAKER_DUMMY makes KVM answer port 0x61 itself, with PIT channel 2's gate
        // and output bits: guests (Linux, the test guest) calibrate their TSC through it.
        // Without it the port exits to userspace on every poll (measured here: a calibration
        // loop that never ends).
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))?;
        Ok(KvmVm { kvm, fd })
    }
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl Persist for KvmVm {
    type State = KvmVmState;
    /// A freshly created VM (see [`KvmVm::create`]).
    type ConstructorArgs = KvmVm;
    type Error = KvmVmError;

    fn save(&self) -> Result<KvmVmState, KvmVmError> {
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        self.fd
            .get_irqchip(&mut pic_master)
            .map_err(err("KVM_GET_IRQCHIP (PIC master)"))?;
        self.fd
            .get_irqchip(&mut pic_slave)
            .map_err(err("KVM_GET_IRQCHIP (PIC slave)"))?;
        self.fd
            .get_irqchip(&mut ioapic)
            .map_err(err("KVM_GET_IRQCHIP (IOAPIC)"))?;
        let pit = self.fd.get_pit2().map_err(err("KVM_GET_PIT2"))?;
        let mut clock = self.fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        // Only the value travels; the flags describe this host's clock source.
        clock.flags = 0;
        Ok(KvmVmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    fn restore(vm: KvmVm, s: &KvmVmState) -> Result<KvmVm, KvmVmError> {
        for (c, id) in [
            (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            let mut c = *c;
            c.chip_id = id;
            vm.fd.set_irqchip(&c).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        vm.fd.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(vm)
    }
}
