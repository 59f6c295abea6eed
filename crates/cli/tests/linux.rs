//! A stock Linux kernel through ferry's bzImage path. On these machines kvm-pvm emulates guest
//! ring-0 code (../shared/PLATFORM.md), so Linux cannot boot fully here; what can be shown is
//! that ferry's 64-bit boot protocol set-up is right: the kernel decompresses, starts, reads the
//! zero page and command line, prints its memory map, and finds and parses ferry's ACPI tables
//! (RSDP, XSDT, FADT, DSDT, MADT) before the emulator stops it.
//! .ci/run fetches Debian's cloud kernel and sets FERRY_LINUX_KERNEL.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn linux_bzimage_starts_and_prints_its_first_lines() {
    if !kvm_available() {
        return;
    }
    let Ok(kernel) = std::env::var("FERRY_LINUX_KERNEL") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "FERRY_LINUX_KERNEL must name a bzImage in CI (.ci/run fetches one)"
        );
        eprintln!("SKIPPED: set FERRY_LINUX_KERNEL to a bzImage (see .ci/run)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("console.txt");
    let mut child = std::process::Command::new(ferry_bin())
        .args(["vmm", "run", "--kernel", &kernel, "--memory", "512"])
        .args([
            "--cmdline",
            "earlyprintk=serial,ttyS0,115200 console=ttyS0 loglevel=8",
        ])
        .arg("--serial")
        .arg(format!("file:{}", out.display()))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Decompressing a 14 MB kernel with an emulated ring 0 takes minutes here.
    let deadline = Instant::now() + Duration::from_secs(420);
    let (ok, text) = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("Using ACPI (MADT) for SMP configuration") {
            break (true, text);
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break (false, text);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "no Linux console lines from {kernel}; console:\n{text}");
    assert!(text.contains("Linux version"), "{text}");
    // The memory map ferry gave it, as Linux read it from the zero page.
    assert!(
        text.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{text}"
    );
    assert!(
        text.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{text}"
    );
    // ferry's ACPI tables, as Linux found and parsed them.
    assert!(text.contains("ACPI: RSDP 0x00000000000E0000"), "{text}");
    assert!(text.contains("ACPI: DSDT 0x00000000000E1000"), "{text}");
    assert!(
        text.contains("IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23"),
        "{text}"
    );
}
