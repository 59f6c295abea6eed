//! CPUID and MSR set-up: what each vCPU is told about its processor, and which MSRs make up
//! its saveable state.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// IA32_TSC: must be restored before TSC_DEADLINE, so it goes first in the MSR list.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_ARCH_CAPABILITIES, which some KVM flavours advertise in CPUID but cannot save.
pub const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// MTRR default type.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Errors setting up CPUID / MSRs.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM cannot report its supported CPUID")]
    Supported(#[source] kvm_ioctls::Error),
    #[error("KVM cannot list its MSRs")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("building the CPUID table failed")]
    Fam,
}

/// The host's KVM-supported CPUID, the base every vCPU's table is derived from.
pub fn supported(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    Ok(cpuid.as_slice().to_vec())
}

/// KVM's paravirtual CPUID base, and the timing leaf (TSC and APIC bus kHz) ferry adds.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const CPUID_TIMING_LEAF: u32 = 0x4000_0010;

/// Add the hypervisor timing leaf 0x40000010 (eax = TSC kHz, ebx = APIC bus kHz), so a guest
/// knows its TSC frequency without calibrating against the PIT.
pub fn add_timing_leaf(base: &mut Vec<kvm_cpuid_entry2>, tsc_khz: u32) {
    if tsc_khz == 0 || !base.iter().any(|e| e.function == KVM_CPUID_SIGNATURE) {
        return;
    }
    for e in base
        .iter_mut()
        .filter(|e| e.function == KVM_CPUID_SIGNATURE)
    {
        e.eax = e.eax.max(CPUID_TIMING_LEAF);
    }
    base.retain(|e| e.function != CPUID_TIMING_LEAF);
    base.push(kvm_cpuid_entry2 {
        function: CPUID_TIMING_LEAF,
        eax: tsc_khz,
        ebx: 1_000_000, // KVM's LAPIC timer runs at 1 GHz
        ..Default::default()
    });
}

/// The CPUID table of vCPU `id` out of `count`: the supported table with this vCPU's APIC
/// ID and topology, and the hypervisor bit set.
pub fn for_vcpu(base: &[kvm_cpuid_entry2], id: u8, count: u8) -> Result<CpuId, CpuidError> {
    let mut entries = base.to_vec();
    let apic_id = u32::from(id);
    let count = u32::from(count);
    let shift = 32 - (count.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field above is valid
                }
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            4 => {
                // Cores per package - 1 in eax[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | ((count.max(1) - 1) << 26);
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::Fam)
}

/// Drop a feature the host advertises but cannot deliver: ARCH_CAPABILITIES when its MSR
/// is not usable (kvm-pvm advertises it; QEMU's `-cpu host` trips over the same).
pub fn hide_unusable(base: &mut [kvm_cpuid_entry2], msrs: &[u32]) {
    if !msrs.contains(&MSR_IA32_ARCH_CAPABILITIES) {
        for e in base.iter_mut().filter(|e| e.function == 7 && e.index == 0) {
            e.edx &= !(1 << 29);
        }
    }
}

/// The MSRs that make up a vCPU's state on this host: every MSR KVM lists that this vCPU
/// can both read and write back, with IA32_TSC first.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, CpuidError> {
    let list = kvm.get_msr_index_list().map_err(CpuidError::MsrList)?;
    let mut out = vec![];
    for &index in list.as_slice() {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if vcpu.get_msrs(&mut one) != Ok(1) {
            continue;
        }
        if vcpu.set_msrs(&one) != Ok(1) {
            continue;
        }
        out.push(index);
    }
    out.sort_by_key(|&i| (i != MSR_IA32_TSC, i));
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_and_apic_id() {
        let base = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                edx: 1 << 29,
                ..Default::default()
            },
        ];
        let c = for_vcpu(&base, 3, 4).unwrap();
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[1].ebx, 4);
        assert_eq!(e[1].eax, 2);
        let mut b = base.clone();
        hide_unusable(&mut b, &[MSR_IA32_TSC]);
        assert_eq!(b[2].edx & (1 << 29), 0);
        let mut b = base;
        hide_unusable(&mut b, &[MSR_IA32_ARCH_CAPABILITIES]);
        assert_ne!(b[2].edx & (1 << 29), 0);
    }
}
