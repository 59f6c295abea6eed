//! Builds the freestanding test guest (guest/*.rs + boot.S) with the same
//! rustc that builds this crate, for the host target (x86_64-unknown-linux-gnu,
//! no extra targets needed), and links it with GNU ld into
//! `$OUT_DIR/ferry-testguest.elf`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "guest/main.rs",
    "guest/bootinfo.rs",
    "guest/io.rs",
    "guest/mem.rs",
    "guest/boot.S",
    "guest/link.ld",
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
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let ld = env::var_os("FERRY_TESTGUEST_LD").unwrap_or_else(|| "ld".into());

    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", manifest.join(s).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_TESTGUEST_LD");

    let lib = out.join("libferry_testguest_guest.a");
    let elf = out.join("ferry-testguest.elf");
    let main_rs = manifest.join("guest/main.rs");

    let mut rc = Command::new(&rustc);
    rc.args([
        "--edition=2021",
        "--crate-type=staticlib",
        "--crate-name=ferry_testguest_guest",
        "--target=x86_64-unknown-linux-gnu",
        "-Cpanic=abort",
        "-Copt-level=2",
        "-Crelocation-model=static",
        "-Ccode-model=small",
        "-Ccodegen-units=1",
        "-Cdebuginfo=0",
        "-Cforce-frame-pointers=no",
    ])
    .arg("-o")
    .arg(&lib)
    .arg(&main_rs);
    // Don't let the outer build's flags (e.g. coverage, sanitizers) leak in.
    rc.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    run(&mut rc);

    let mut l = Command::new(&ld);
    l.arg("-T")
        .arg(manifest.join("guest/link.ld"))
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
