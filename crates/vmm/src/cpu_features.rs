//! Named CPU features: which CPUID bits a VM was given, so a host can tell whether it can run
//! a VM that started elsewhere, and so an admin can hide features to let VMs move to older
//! hosts (what Hyper-V calls processor compatibility).
//!
//! Names are those of Linux's /proc/cpuinfo. Only features a guest can see and use are listed;
//! the hypervisor bit, topology and APIC ID fields are not features.

use kvm_bindings::kvm_cpuid_entry2;

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (name, leaf, subleaf, register, bit)
const FEATURES: &[(&str, u32, u32, Reg, u8)] = {
    use Reg::*;
    &[
        // Leaf 1 EDX
        ("fpu", 1, 0, Edx, 0),
        ("vme", 1, 0, Edx, 1),
        ("de", 1, 0, Edx, 2),
        ("pse", 1, 0, Edx, 3),
        ("tsc", 1, 0, Edx, 4),
        ("msr", 1, 0, Edx, 5),
        ("pae", 1, 0, Edx, 6),
        ("mce", 1, 0, Edx, 7),
        ("cx8", 1, 0, Edx, 8),
        ("apic", 1, 0, Edx, 9),
        ("sep", 1, 0, Edx, 11),
        ("mtrr", 1, 0, Edx, 12),
        ("pge", 1, 0, Edx, 13),
        ("mca", 1, 0, Edx, 14),
        ("cmov", 1, 0, Edx, 15),
        ("pat", 1, 0, Edx, 16),
        ("pse36", 1, 0, Edx, 17),
        ("clflush", 1, 0, Edx, 19),
        ("mmx", 1, 0, Edx, 23),
        ("fxsr", 1, 0, Edx, 24),
        ("sse", 1, 0, Edx, 25),
        ("sse2", 1, 0, Edx, 26),
        ("ss", 1, 0, Edx, 27),
        // Leaf 1 ECX
        ("pni", 1, 0, Ecx, 0),
        ("pclmulqdq", 1, 0, Ecx, 1),
        ("ssse3", 1, 0, Ecx, 9),
        ("fma", 1, 0, Ecx, 12),
        ("cx16", 1, 0, Ecx, 13),
        ("pcid", 1, 0, Ecx, 17),
        ("sse4_1", 1, 0, Ecx, 19),
        ("sse4_2", 1, 0, Ecx, 20),
        ("x2apic", 1, 0, Ecx, 21),
        ("movbe", 1, 0, Ecx, 22),
        ("popcnt", 1, 0, Ecx, 23),
        ("tsc_deadline_timer", 1, 0, Ecx, 24),
        ("aes", 1, 0, Ecx, 25),
        ("xsave", 1, 0, Ecx, 26),
        ("avx", 1, 0, Ecx, 28),
        ("f16c", 1, 0, Ecx, 29),
        ("rdrand", 1, 0, Ecx, 30),
        // Leaf 7.0 EBX
        ("fsgsbase", 7, 0, Ebx, 0),
        ("bmi1", 7, 0, Ebx, 3),
        ("hle", 7, 0, Ebx, 4),
        ("avx2", 7, 0, Ebx, 5),
        ("smep", 7, 0, Ebx, 7),
        ("bmi2", 7, 0, Ebx, 8),
        ("erms", 7, 0, Ebx, 9),
        ("invpcid", 7, 0, Ebx, 10),
        ("rtm", 7, 0, Ebx, 11),
        ("avx512f", 7, 0, Ebx, 16),
        ("avx512dq", 7, 0, Ebx, 17),
        ("rdseed", 7, 0, Ebx, 18),
        ("adx", 7, 0, Ebx, 19),
        ("smap", 7, 0, Ebx, 20),
        ("avx512ifma", 7, 0, Ebx, 21),
        ("clflushopt", 7, 0, Ebx, 23),
        ("clwb", 7, 0, Ebx, 24),
        ("avx512cd", 7, 0, Ebx, 28),
        ("sha_ni", 7, 0, Ebx, 29),
        ("avx512bw", 7, 0, Ebx, 30),
        ("avx512vl", 7, 0, Ebx, 31),
        // Leaf 7.0 ECX
        ("avx512vbmi", 7, 0, Ecx, 1),
        ("umip", 7, 0, Ecx, 2),
        ("pku", 7, 0, Ecx, 3),
        ("avx512_vbmi2", 7, 0, Ecx, 6),
        ("gfni", 7, 0, Ecx, 8),
        ("vaes", 7, 0, Ecx, 9),
        ("vpclmulqdq", 7, 0, Ecx, 10),
        ("avx512_vnni", 7, 0, Ecx, 11),
        ("avx512_bitalg", 7, 0, Ecx, 12),
        ("avx512_vpopcntdq", 7, 0, Ecx, 14),
        ("la57", 7, 0, Ecx, 16),
        ("rdpid", 7, 0, Ecx, 22),
        ("movdiri", 7, 0, Ecx, 27),
        ("movdir64b", 7, 0, Ecx, 28),
        // Leaf 7.0 EDX
        ("fsrm", 7, 0, Edx, 4),
        ("md_clear", 7, 0, Edx, 10),
        ("serialize", 7, 0, Edx, 14),
        ("arch_capabilities", 7, 0, Edx, 29),
        ("ssbd", 7, 0, Edx, 31),
        // Leaf 7.1 EAX
        ("avx_vnni", 7, 1, Eax, 4),
        ("avx512_bf16", 7, 1, Eax, 5),
        // Leaf 0xd.1 EAX
        ("xsaveopt", 0xd, 1, Eax, 0),
        ("xsavec", 0xd, 1, Eax, 1),
        ("xgetbv1", 0xd, 1, Eax, 2),
        ("xsaves", 0xd, 1, Eax, 3),
        // Leaf 0x80000001 ECX / EDX
        ("lahf_lm", 0x8000_0001, 0, Ecx, 0),
        ("abm", 0x8000_0001, 0, Ecx, 5),
        ("sse4a", 0x8000_0001, 0, Ecx, 6),
        ("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
        ("xop", 0x8000_0001, 0, Ecx, 11),
        ("fma4", 0x8000_0001, 0, Ecx, 16),
        ("tbm", 0x8000_0001, 0, Ecx, 21),
        ("syscall", 0x8000_0001, 0, Edx, 11),
        ("nx", 0x8000_0001, 0, Edx, 20),
        ("pdpe1gb", 0x8000_0001, 0, Edx, 26),
        ("rdtscp", 0x8000_0001, 0, Edx, 27),
        ("lm", 0x8000_0001, 0, Edx, 29),
    ]
};

/// Leaves whose subleaf matters (the others ignore `index`).
fn indexed(leaf: u32) -> bool {
    matches!(leaf, 4 | 7 | 0xb | 0xd | 0xf | 0x10 | 0x12 | 0x14 | 0x1f)
}

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn matches(e: &kvm_cpuid_entry2, leaf: u32, sub: u32) -> bool {
    e.function == leaf && (!indexed(leaf) || e.index == sub)
}

/// Whether `name` is a feature ferry knows.
pub fn known(name: &str) -> bool {
    FEATURES.iter().any(|f| f.0 == name)
}

/// The named features a CPUID table offers, in table order.
pub fn names(entries: &[kvm_cpuid_entry2]) -> Vec<String> {
    FEATURES
        .iter()
        .filter(|(_, leaf, sub, r, bit)| {
            entries
                .iter()
                .any(|e| matches(e, *leaf, *sub) && reg(e, *r) & (1 << bit) != 0)
        })
        .map(|f| f.0.to_string())
        .collect()
}

/// Clear the named features from a CPUID table (unknown names are ignored; configs are
/// checked with [`known`] first).
pub fn hide(entries: &mut [kvm_cpuid_entry2], hidden: &[String]) {
    for (name, leaf, sub, r, bit) in FEATURES {
        if hidden.iter().any(|h| h == name) {
            for e in entries.iter_mut().filter(|e| matches(e, *leaf, *sub)) {
                *reg_mut(e, *r) &= !(1 << bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hiding() {
        let mut t = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: (1 << 28) | (1 << 0),
                edx: 1 << 26,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: 1 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                eax: 1 << 4,
                ..Default::default()
            },
        ];
        assert_eq!(names(&t), ["sse2", "pni", "avx", "avx2", "avx_vnni"]);
        hide(&mut t, &["avx2".into(), "avx".into()]);
        assert_eq!(names(&t), ["sse2", "pni", "avx_vnni"]);
        assert!(known("avx512f") && !known("warp_drive"));
    }
}
