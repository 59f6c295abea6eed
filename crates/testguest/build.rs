//! Builds the freestanding test guest (the standalone cargo package in
//! `guest/`, which depends on smoltcp) with a nested
//! `cargo build --release --target x86_64-unknown-linux-gnu` (no extra
//! targets needed), and links the resulting static library with GNU ld into
//! `$OUT_DIR/ferry-testguest.elf`.
//!
//! The nested build uses its own target directory under `OUT_DIR` (so it
//! never waits for the outer build's lock) and `--locked` (guest/Cargo.lock).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Rust flags for the guest code (not for build scripts: `--target` is
/// always passed, so cargo applies these to target crates only).
const GUEST_RUSTFLAGS: &[&str] = &[
    "-Crelocation-model=static",
    "-Ccode-model=small",
    "-Cforce-frame-pointers=no",
    "-Cdebuginfo=0",
];

/// Variables of the outer build that must not leak into the nested one.
const SCRUB_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_BUILD_DIR",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_PKG_NAME",
    "CARGO_CRATE_NAME",
    "CARGO_PROFILE_RELEASE_LTO",
    "CARGO_INCREMENTAL",
    "CARGO_LLVM_COV",
    "CARGO_LLVM_COV_TARGET_DIR",
    "LLVM_PROFILE_FILE",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "__CARGO_FIX_PLZ",
    "__CARGO_DEFAULT_LIB_METADATA",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to spawn {cmd:?}: {e}"));
    if !status.success() {
        panic!("command failed ({status}): {cmd:?}");
    }
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ld = env::var_os("FERRY_TESTGUEST_LD").unwrap_or_else(|| "ld".into());
    let guest = manifest.join("guest");

    // Every guest source (new files too: the directory itself is watched).
    println!("cargo:rerun-if-changed={}", guest.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&guest)
        .expect("read guest/")
        .map(|e| e.expect("guest/ entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_TESTGUEST_LD");
    println!("cargo:rerun-if-env-changed=CARGO_NET_OFFLINE");

    let target_dir = out.join("guest-target");
    let mut c = Command::new(&cargo);
    c.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--target=x86_64-unknown-linux-gnu")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&guest);
    if env::var_os("CARGO_NET_OFFLINE").is_some_and(|v| v == "true" || v == "1") {
        c.arg("--offline");
    }
    for v in SCRUB_ENV {
        c.env_remove(v);
    }
    // Also drop per-profile overrides meant for the outer workspace.
    for (k, _) in env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("CARGO_PROFILE_")
                || (k.starts_with("CARGO_TARGET_") && k.ends_with("_RUSTFLAGS"))
            {
                c.env_remove(k);
            }
        }
    }
    c.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));
    run(&mut c);

    let lib = target_dir.join("x86_64-unknown-linux-gnu/release/libferry_testguest_guest.a");
    let elf = out.join("ferry-testguest.elf");

    let mut l = Command::new(&ld);
    l.arg("-T")
        .arg(guest.join("link.ld"))
        .args([
            "--gc-sections",
            "-static",
            "-nostdlib",
            "--build-id=none",
            "-z",
            "max-page-size=4096",
            "-z",
            "noexecstack",
            "-z",
            "noseparate-code",
            "--strip-debug",
            "--no-warn-rwx-segments",
            "-o",
        ])
        .arg(&elf)
        .arg(&lib);
    run(&mut l);

    check(&elf);
    multiboot_copies(&elf, &out);
}

/// The same guest as the images a Multiboot user boots with GRUB or QEMU's `-kernel`:
/// - `ferry-testguest32.elf`: ELF32 i386 (`objcopy -O elf32-i386`), its Multiboot header
///   without the a.out kludge, so a loader places it by its program headers ("linked the
///   usual way");
/// - `ferry-testguest32-kludge.elf`: the same ELF32 with the kludge addresses kept;
/// - `ferry-testguest.bin`: a flat binary (`objcopy -O binary`) that only the kludge
///   addresses describe.
///
/// Both ELF32 copies lose the PVH note (its program header becomes PT_NULL), so every loader
/// boots them by Multiboot.
fn multiboot_copies(elf: &Path, out: &Path) {
    let objcopy = env::var_os("FERRY_TESTGUEST_OBJCOPY").unwrap_or_else(|| "objcopy".into());
    println!("cargo:rerun-if-env-changed=FERRY_TESTGUEST_OBJCOPY");
    let elf32 = out.join("ferry-testguest32-kludge.elf");
    run(Command::new(&objcopy)
        .args(["-O", "elf32-i386"])
        .arg(elf)
        .arg(&elf32));
    let mut img = std::fs::read(&elf32).expect("read ELF32 copy");
    drop_pvh_note(&mut img);
    std::fs::write(&elf32, &img).expect("write ELF32 copy");
    clear_kludge(&mut img);
    std::fs::write(out.join("ferry-testguest32.elf"), &img).expect("write ELF32 copy");
    run(Command::new(&objcopy)
        .args(["-O", "binary"])
        .arg(elf)
        .arg(out.join("ferry-testguest.bin")));
}

fn u16_at(img: &[u8], o: usize) -> usize {
    u16::from_le_bytes(img[o..o + 2].try_into().unwrap()) as usize
}

fn u32_at(img: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(img[o..o + 4].try_into().unwrap())
}

/// Turn an ELF32 image's PT_NOTE program headers into PT_NULL.
fn drop_pvh_note(img: &mut [u8]) {
    assert_eq!(img[4], 1, "not an ELF32 image");
    let (phoff, phentsize, phnum) = (u32_at(img, 28) as usize, u16_at(img, 42), u16_at(img, 44));
    let mut dropped = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(img, ph) == 4 {
            img[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes());
            dropped += 1;
        }
    }
    assert_eq!(dropped, 1, "expected one PT_NOTE in the ELF32 copy");
}

/// Clear the Multiboot header's a.out kludge flag (bit 16), with its checksum.
fn clear_kludge(img: &mut [u8]) {
    let at = (0..8192usize.min(img.len() - 12))
        .step_by(4)
        .find(|&i| u32_at(img, i) == 0x1BAD_B002)
        .expect("Multiboot header");
    let flags = u32_at(img, at + 4) & !(1 << 16);
    img[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
    let sum = 0u32.wrapping_sub(0x1BAD_B002u32.wrapping_add(flags));
    img[at + 8..at + 12].copy_from_slice(&sum.to_le_bytes());
}

/// Sanity checks on the produced image so a broken link fails the build.
fn check(elf: &Path) {
    let img = std::fs::read(elf).expect("read guest ELF");
    assert!(img.len() > 0x1100 && &img[..4] == b"\x7fELF", "not an ELF");
    // Multiboot header must be in the first 8 KiB, 4-byte aligned.
    let found = (0..8192usize.min(img.len() - 12)).step_by(4).any(|i| {
        let w = |o: usize| u32::from_le_bytes(img[i + o..i + o + 4].try_into().unwrap());
        w(0) == 0x1BAD_B002 && w(0).wrapping_add(w(4)).wrapping_add(w(8)) == 0
    });
    assert!(found, "multiboot header not found in the first 8 KiB");
}
