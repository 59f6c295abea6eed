//! Booting the kernel forms QEMU's `-kernel` boots, on real KVM: the test guest as an ELF32
//! Multiboot kernel placed by its program headers, as ELF32 with a.out kludge addresses, as a
//! flat binary, and as its own ELF64 (PVH), each with two modules whose bytes the guest
//! checksums. Each Multiboot form also boots under QEMU in the same test, and the guest must
//! report the same thing under both: boot protocol, command line, memory map, modules.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);
const CMDLINE: &str = "mode=exit code=7 hb=0";

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The lines of the guest's report that must not depend on the loader's choices of address:
/// the banner without the TSC frequency, the memory map, the modules without where they sit.
fn report(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| {
            ["ferry-testguest", "MEMMAP", "MODULE", "EXIT"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.starts_with("tsc_khz=") && !w.starts_with("start="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Two modules: 100003 random-ish bytes with arguments, and a short one without.
fn modules(dir: &Path) -> (Vec<(PathBuf, Vec<u8>)>, String) {
    let mut big = vec![0u8; 100_003];
    let mut x: u32 = 0x1234_5678;
    for b in &mut big {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let m1 = dir.join("mod1.bin");
    let m2 = dir.join("mod2.bin");
    std::fs::write(&m1, &big).unwrap();
    std::fs::write(&m2, b"hello, module").unwrap();
    let arg = format!("{} speed=3 mode=fast,{}", m1.display(), m2.display());
    (vec![(m1, big), (m2, b"hello, module".to_vec())], arg)
}

/// Boot `kernel` under ferry with COM1 on stdout, to its EXIT line.
/// `ferry vmm run --kernel KERNEL --memory MIB EXTRA...`.
fn vmm_run<'a>(kernel: &'a Path, mib: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["vmm", "run", "--kernel", kernel.to_str().unwrap()];
    args.extend(["--memory", mib]);
    args.extend(extra);
    args
}

fn ferry_boot(kernel: &Path, initrd: Option<&str>) -> String {
    let mut args = vmm_run(kernel, "64", &["--cmdline", CMDLINE, "--serial", "stdio"]);
    if let Some(m) = initrd {
        args.extend(["--initrd", m]);
    }
    let out = ferry_output(&args, T);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ferry could not boot {}: {}\n{text}",
        kernel.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// QEMU, if installed (in CI it must be: .ci/run installs it).
fn qemu() -> Option<&'static str> {
    let bin = "qemu-system-x86_64";
    let found = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{bin} is not installed and CI=true: the boot comparison must run in CI");
        }
        eprintln!(
            "SKIPPED the QEMU half: {bin} is not installed (apt-get install qemu-system-x86)"
        );
        return None;
    }
    Some(bin)
}

/// Boot `kernel` under QEMU (microvm, COM1 on stdout) until the guest's EXIT line.
fn qemu_boot(bin: &str, kernel: &Path, initrd: &str) -> String {
    let mut child = Command::new(bin)
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,pit=on,pic=on,isa-serial=on",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            "64",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-append",
            CMDLINE,
            "-initrd",
            initrd,
            "-kernel",
        ])
        .arg(kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + T;
    let mut text = Vec::new();
    // The microvm has no ACPI power-off, so QEMU keeps running after the guest's EXIT line.
    let exited = |t: &[u8]| {
        let t = String::from_utf8_lossy(t);
        t.find("EXIT code=").is_some_and(|i| t[i..].contains('\n'))
    };
    while !exited(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => text.extend_from_slice(&b),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(
        text.contains("EXIT code=7"),
        "QEMU did not boot {}: {}\n{text}",
        kernel.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn every_multiboot_form_boots_with_its_modules_and_reports_what_it_reports_under_qemu() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let (mods, initrd) = modules(dir.path());
    let qemu = qemu();
    let forms: [(&str, &[u8], &str); 4] = [
        ("guest32.elf", ferry_testguest::elf32(), "multiboot"),
        (
            "guest32-kludge.elf",
            ferry_testguest::elf32_kludge(),
            "multiboot",
        ),
        ("guest.bin", ferry_testguest::flat(), "multiboot"),
        ("guest64.elf", ferry_testguest::elf(), "pvh"),
    ];
    for (name, image, boot) in forms {
        let kernel = dir.path().join(name);
        std::fs::write(&kernel, image).unwrap();
        let out = ferry_boot(&kernel, Some(&initrd));
        let lines = report(&out);
        let banner = &lines[0];
        assert_eq!(
            field(banner, "boot").as_deref(),
            Some(boot),
            "{name}: {out}"
        );
        assert!(
            banner.contains(&format!("cmdline=\"{CMDLINE}\"")),
            "{name}: {out}"
        );
        assert!(
            lines.contains(&"MODULES count=2".to_string()),
            "{name}: {out}"
        );
        let m1_args = format!("{} speed=3 mode=fast", mods[0].0.display());
        let m2_args = mods[1].0.display().to_string();
        for (i, ((_, bytes), args)) in mods.iter().zip([m1_args, m2_args]).enumerate() {
            let want = format!(
                "MODULE {i} size={} fnv1a={:016x} cmdline=\"{args}\"",
                bytes.len(),
                fnv1a(bytes)
            );
            assert!(lines.contains(&want), "{name}: no {want:?} in {out}");
        }
        assert!(
            lines.contains(&"MEMMAP ram=0x0+0x9fc00,0x100000+0x3f00000".to_string()),
            "{name}: {out}"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("EXIT code=7"),
            "{out}"
        );
        // QEMU boots the ELF64 by its Multiboot header, ferry by PVH: only the others compare.
        if let (Some(bin), "multiboot") = (qemu, boot) {
            let theirs = report(&qemu_boot(bin, &kernel, &initrd));
            assert_eq!(lines, theirs, "{name}: ferry and QEMU disagree");
        }
    }
}

/// `ferry vmm run` must fail with `needle` in its error, leaving no socket behind.
fn refused(dir: &Path, kernel: &Path, initrd: &[&str], memory: &str, needle: &str) {
    let api = dir.join("refused.api");
    let mut args = vmm_run(
        kernel,
        memory,
        &["--serial", "null", "--api", api.to_str().unwrap()],
    );
    for m in initrd {
        args.extend(["--initrd", m]);
    }
    let out = ferry_output(&args, T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
    assert!(!api.exists(), "a refused boot left its API socket");
}

#[test]
fn broken_kernels_and_modules_are_refused_with_the_reason() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let d = dir.path();
    let good = d.join("guest32.elf");
    std::fs::write(&good, ferry_testguest::elf32()).unwrap();

    let mut img = ferry_testguest::elf32().to_vec();
    img[42] = 56; // e_phentsize of an ELF64 in an ELF32
    let k = d.join("bad-phentsize.elf");
    std::fs::write(&k, &img).unwrap();
    refused(d, &k, &[], "64", "ELF32 program headers are 32 bytes");

    let img = ferry_testguest::elf32();
    let k = d.join("truncated.elf");
    std::fs::write(&k, &img[..img.len() / 2]).unwrap();
    refused(d, &k, &[], "64", "past the end of the file");

    // A Multiboot header asking for a loader feature nobody defined (flag bit 5).
    let mut img = ferry_testguest::elf32().to_vec();
    let at = (0..8192)
        .step_by(4)
        .find(|&i| img[i..i + 4] == 0x1BAD_B002u32.to_le_bytes())
        .unwrap();
    let flags = u32::from_le_bytes(img[at + 4..at + 8].try_into().unwrap()) | (1 << 5);
    img[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
    let sum = 0u32.wrapping_sub(0x1BAD_B002u32.wrapping_add(flags));
    img[at + 8..at + 12].copy_from_slice(&sum.to_le_bytes());
    let k = d.join("needs-more.elf");
    std::fs::write(&k, &img).unwrap();
    refused(d, &k, &[], "64", "loader features ferry does not have");

    let missing = d.join("no-such-module");
    refused(
        d,
        &good,
        &[missing.to_str().unwrap()],
        "64",
        "cannot read initrd",
    );
    let huge = d.join("huge.bin");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(70 << 20)
        .unwrap();
    refused(d, &good, &[huge.to_str().unwrap()], "64", "does not fit");
    // A command line that, with the kernel's path in front (Multiboot), passes the limit.
    let long = format!("x={}", "y".repeat(4090));
    let out = ferry_output(
        &vmm_run(&good, "64", &["--serial", "null", "--cmdline", &long]),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the limit is 4095"),
        "{err}"
    );
    // Good again with the same files: nothing above changed anything.
    let out = ferry_boot(&good, None);
    assert!(
        out.contains("EXIT code=7") && !out.contains("MODULES"),
        "{out}"
    );
}
