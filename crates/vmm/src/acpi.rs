//! ACPI tables, so stock guests find their CPUs, interrupt controllers, virtio-mmio devices and
//! power-off without a command line: RSDP, XSDT, FADT (hardware-reduced ACPI), MADT and a DSDT.
//!
//! ```text
//! 0xe0000 RSDP -> 0xe0040 XSDT -> 0xe0100 FADT -> 0xe1000 DSDT
//!                                  0xe0300 MADT
//! ```
//! The BIOS area 0xe0000-0xfffff is reserved in the memory map, and the RSDP is 16-byte aligned
//! there, so Multiboot guests that scan for it find it; PVH and Linux guests are told its address.
//!
//! The DSDT describes each virtio-mmio device as `LNRO0005` (Linux's `virtio_mmio` binds to it
//! from ACPI, no `virtio_mmio.device=` needed, so a distribution kernel's module works), the two
//! UARTs (`PNP0501`) and the S5 sleep state. Power-off is the hardware-reduced sleep control
//! register at port 0x600 (`SLP_TYP=5 | SLP_EN`), reset the i8042 at port 0x64 (value 0xfe).

use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Where the RSDP lives.
pub const RSDP_START: u64 = 0xe0000;
const XSDT_START: u64 = 0xe0040;
const FADT_START: u64 = 0xe0100;
const MADT_START: u64 = 0xe0300;
const DSDT_START: u64 = 0xe1000;
/// End of the area the tables may use.
const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE: [u8; 8] = *b"FERRYVMM";

/// The sleep control register (hardware-reduced ACPI), served by the PM device.
const SLEEP_CONTROL_PORT: u16 =
    ferry_devices::legacy::PM_BASE + ferry_devices::legacy::SLEEP_CONTROL_OFFSET;
/// SLP_TYP for S5, as `_S5` in the DSDT says and the PM device expects.
const S5_SLEEP_TYPE: u8 = ferry_devices::legacy::S5_SLEEP_TYPE;

/// A virtio-mmio device to describe.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit below 1 MiB")]
    TooLarge,
    #[error("writing ACPI tables to guest memory failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt() -> Sdt {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, 1);
    t.write_u32(40, DSDT_START as u32);
    t.write_u16(109, (1 << 2) | (1 << 3)); // IAPC_BOOT_ARCH: no VGA, no MSI
    t.write_u32(112, (1 << 20) | (1 << 10)); // HW_REDUCED_ACPI | RESET_REG_SUP
    t.write_bytes(116, &gas_io(0x64, 8)); // RESET_REG: the i8042
    t.write_u8(128, 0xfe); // RESET_VALUE
    t.write_u8(131, 3); // minor version: ACPI 6.3
    t.write_u64(140, DSDT_START); // X_DSDT
    t.write_bytes(244, &gas_io(SLEEP_CONTROL_PORT, 8)); // SLEEP_CONTROL_REG
    t.write_bytes(256, &gas_io(SLEEP_CONTROL_PORT + 1, 8)); // SLEEP_STATUS_REG
    t.write_bytes(268, b"FERRYVMM"); // hypervisor vendor identity
    t.update_checksum();
    t
}

fn madt(vcpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, 1);
    t.write_u32(36, crate::layout::APIC_START as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..vcpus {
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(crate::layout::IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2.
    t.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // LINT1 of every processor is NMI.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Sdt {
    let mut body: Vec<u8> = Vec::new();
    let mut sb_children: Vec<Box<dyn Aml>> = Vec::new();
    for (i, (port, irq)) in [(0x3f8u16, 4u32), (0x2f8, 3)].into_iter().enumerate() {
        let io = aml::IO::new(port, port, 1, 8);
        let int = aml::Interrupt::new(true, true, false, false, irq);
        let crs = aml::ResourceTemplate::new(vec![&io, &int]);
        let mut bytes = Vec::new();
        aml::Device::new(
            format!("COM{}", i + 1).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &(i as u8 + 1)),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut bytes);
        sb_children.push(Box::new(RawAml(bytes)));
    }
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        let int = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
        let mut bytes = Vec::new();
        aml::Device::new(
            format!("V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u8)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut bytes);
        sb_children.push(Box::new(RawAml(bytes)));
    }
    let children: Vec<&dyn Aml> = sb_children.iter().map(|c| c.as_ref() as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&body);
    t.update_checksum();
    t
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn rsdp() -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2; // ACPI 2.0+: XSDT
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&XSDT_START.to_le_bytes());
    r[8] = checksum(&r[0..20]);
    r[32] = checksum(&r);
    r
}

/// All tables, as (guest address, bytes).
pub fn tables(vcpus: u8, devices: &[MmioDeviceInfo]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let fadt = fadt();
    let madt = madt(vcpus);
    let dsdt = dsdt(devices);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    xsdt.append(FADT_START);
    xsdt.append(MADT_START);
    xsdt.update_checksum();
    let out = vec![
        (RSDP_START, rsdp().to_vec()),
        (XSDT_START, xsdt.as_slice().to_vec()),
        (FADT_START, fadt.as_slice().to_vec()),
        (MADT_START, madt.as_slice().to_vec()),
        (DSDT_START, dsdt.as_slice().to_vec()),
    ];
    let fits = out
        .windows(2)
        .all(|w| w[0].0 + w[0].1.len() as u64 <= w[1].0)
        && DSDT_START + out[4].1.len() as u64 <= ACPI_END;
    if !fits {
        return Err(AcpiError::TooLarge);
    }
    Ok(out)
}

/// Write the tables into guest memory.
pub fn write(mem: &GuestMemory, vcpus: u8, devices: &[MmioDeviceInfo]) -> Result<(), AcpiError> {
    for (addr, bytes) in tables(vcpus, devices)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_consistent_and_checksummed() {
        let devs = [MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }];
        let t = tables(4, &devs).unwrap();
        let (_, rsdp) = &t[0];
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, table) in &t[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
            assert_eq!(
                sum(table),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&table[..4])
            );
        }
        let madt = &t[3].1;
        let lapics = madt[44..].chunks(1).count(); // walk entries properly below
        assert!(lapics > 0);
        let mut off = 44;
        let mut cpus = 0;
        while off < madt.len() {
            if madt[off] == 0 {
                cpus += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(cpus, 4);
        let dsdt = &t[4].1;
        let text = String::from_utf8_lossy(dsdt);
        assert!(
            text.contains("LNRO0005") && text.contains("_S5_"),
            "DSDT describes virtio and S5"
        );
    }

    #[test]
    fn many_cpus_and_devices_still_fit() {
        let devs: Vec<_> = (0..16)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect();
        tables(64, &devs).unwrap();
    }
}

#[cfg(test)]
mod iasl {
    use super::*;

    /// The DSDT, FADT and MADT disassemble cleanly with ACPICA's `iasl` (Debian's
    /// acpica-tools, installed by .ci/run). Required in CI; skipped elsewhere without it.
    #[test]
    fn tables_disassemble_with_iasl() {
        let have = std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_ok();
        if !have {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "iasl (acpica-tools) missing in CI"
            );
            eprintln!("SKIPPED: iasl not installed (apt-get install acpica-tools)");
            return;
        }
        let devs = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        for (_, t) in tables(2, &devs).unwrap().into_iter().skip(2) {
            let name = String::from_utf8_lossy(&t[..4]).to_lowercase();
            let path = dir.path().join(format!("{name}.dat"));
            std::fs::write(&path, &t).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {name}: {log}");
            let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
            assert!(
                !dsl.contains("Invalid") && !dsl.contains("**** Unknown"),
                "{name}:\n{dsl}"
            );
            if name == "dsdt" {
                assert!(
                    dsl.contains("\"LNRO0005\"")
                        && dsl.contains("0xD0001000")
                        && dsl.contains("_S5_"),
                    "{dsl}"
                );
            }
            if name == "apic" {
                assert!(
                    dsl.contains("Processor Local APIC") && dsl.contains("I/O APIC"),
                    "{dsl}"
                );
            }
            if name == "facp" {
                assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
            }
        }
    }
}
