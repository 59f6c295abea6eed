//! `ferry vm` end to end on real KVM with the real test guest.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn boots_heartbeats_and_powers_off_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());
    let mut vmm = Vmm::spawn(
        dir.path(),
        "a",
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "mode=run hb=2",
            "--memory",
            "128",
        ],
    );
    let mut con = Console::connect(&vmm.com1);
    let hb = Heartbeat::connect(&vmm.com2);
    vmm.ctl_ok("resume", &[]);
    let banner = con.wait_line("ferry-testguest", T);
    assert_eq!(field(&banner, "boot").as_deref(), Some("pvh"), "{banner}");
    assert_eq!(field(&banner, "cpus").as_deref(), Some("1"), "{banner}");
    con.wait_line("READY", T);
    hb.wait_more(500, T);
    let status = vmm.ctl_ok("status", &[]);
    assert!(status.contains("\"running\""), "{status}");
    con.send(b'p');
    let st = vmm.wait(T);
    assert!(
        st.success(),
        "poweroff must end the VMM with status 0, got {st}"
    );
    assert!(
        !vmm.api.exists() && !vmm.com1.exists() && !vmm.com2.exists(),
        "sockets left behind"
    );
}

#[test]
fn reset_ends_the_vmm_with_status_zero() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());
    let mut vmm = Vmm::spawn(
        dir.path(),
        "r",
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
        ],
    );
    let mut con = Console::connect(&vmm.com1);
    vmm.ctl_ok("resume", &[]);
    con.wait_line("READY", T);
    con.send(b'r');
    assert!(vmm.wait(T).success());
}

#[test]
fn exit_mode_prints_its_code_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());
    let out = ferry_output(
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "mode=exit code=7",
            "--memory",
            "64",
        ],
        T,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("EXIT code=7"), "{stdout}");
}

#[test]
fn all_smp_vcpus_run() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());
    let mut vmm = Vmm::spawn(
        dir.path(),
        "s",
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "4",
            "--memory",
            "128",
            "--cmdline",
            "hb=0",
        ],
    );
    let mut con = Console::connect(&vmm.com1);
    vmm.ctl_ok("resume", &[]);
    let banner = con.wait_line("ferry-testguest", T);
    assert_eq!(field(&banner, "cpus").as_deref(), Some("4"), "{banner}");
    con.wait_line("READY", T);
    let first = con.ask(b's', "STATUS");
    std::thread::sleep(Duration::from_millis(300));
    let second = con.ask(b's', "STATUS");
    let counters = |l: &str| -> Vec<u64> {
        field(l, "ap_counters")
            .unwrap()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect()
    };
    let (a, b) = (counters(&first), counters(&second));
    assert_eq!(a.len(), 3, "three APs: {first}");
    for i in 0..3 {
        assert!(
            b[i] > a[i],
            "AP {} did not make progress: {first} / {second}",
            i + 1
        );
    }
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

#[test]
fn multiboot_entry_boots_too() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let mut elf = ferry_testguest::elf().to_vec();
    // Turn the PVH note (Xen note type 18) into an unknown note, leaving only Multiboot.
    let pos = elf
        .windows(12)
        .position(|w| w[0..4] == [4, 0, 0, 0] && w[8..12] == [18, 0, 0, 0])
        .expect("PVH note");
    elf[pos + 8] = 0x7f;
    let kernel = dir.path().join("mb.elf");
    std::fs::write(&kernel, &elf).unwrap();
    let mut vmm = Vmm::spawn(
        dir.path(),
        "m",
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            "hb=0 mode=run",
        ],
    );
    let mut con = Console::connect(&vmm.com1);
    vmm.ctl_ok("resume", &[]);
    let banner = con.wait_line("ferry-testguest", T);
    assert_eq!(
        field(&banner, "boot").as_deref(),
        Some("multiboot"),
        "{banner}"
    );
    assert!(banner.contains("cmdline=\"hb=0 mode=run\""), "{banner}");
    con.wait_line("READY", T);
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

fn assert_fails(args: &[&str], needle: &str) {
    let out = ferry_output(args, T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ferry {args:?} should fail");
    assert!(
        err.contains(needle),
        "ferry {args:?}: expected {needle:?} in: {err}"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let kernel = testguest(dir.path());
    let k = kernel.to_str().unwrap();
    let api = dir.path().join("api.sock");
    let api_s = api.to_str().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x90u8; 50_000]).unwrap();
    let g = garbage.to_str().unwrap();
    assert_fails(
        &[
            "vmm",
            "run",
            "--kernel",
            "/nonexistent/kernel",
            "--api",
            api_s,
        ],
        "cannot open kernel",
    );
    assert_fails(
        &["vmm", "run", "--kernel", g, "--api", api_s],
        "not a kernel ferry can boot",
    );
    assert_fails(
        &["vmm", "run", "--kernel", k, "--memory", "1", "--api", api_s],
        "too small",
    );
    assert_fails(
        &[
            "vmm",
            "run",
            "--kernel",
            k,
            "--memory",
            "100000000",
            "--api",
            api_s,
        ],
        "available",
    );
    assert_fails(
        &["vmm", "run", "--kernel", k, "--vcpus", "0"],
        "vcpus must be between",
    );
    assert_fails(
        &["vmm", "run", "--kernel", k, "--frobnicate"],
        "unexpected argument",
    );
    assert_fails(
        &["vmm", "run", "--kernel", k, "--serial", "tcp:1"],
        "serial backend",
    );
    assert!(!api.exists(), "a failed start left its API socket");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the inputs remain: {left:?}");
}
