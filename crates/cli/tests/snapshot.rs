//! Save a running guest, restore it in a new process, and refuse damaged snapshots.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// Boot a 2-vCPU guest with a 16 MiB dirtier, let it run, save it to `snap`; the source ends.
fn save_running_guest(dir: &std::path::Path, snap: &std::path::Path) -> (u64, String) {
    let kernel = testguest(dir);
    let mut vmm = Vmm::spawn(
        dir,
        "src",
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
            "--vcpus",
            "2",
            "--cmdline",
            "mode=run hb=2 dirty=16 rate=0",
        ],
    );
    let mut con = Console::connect(&vmm.com1);
    let hb = Heartbeat::connect(&vmm.com2);
    vmm.ctl_ok("resume", &[]);
    con.wait_line("READY", T);
    hb.wait_more(300, T);
    let before = con.ask(b'v', "VERIFY");
    assert!(before.starts_with("VERIFY OK"), "{before}");
    let status = con.ask(b's', "STATUS");
    let writes: u64 = field(&status, "writes").unwrap().parse().unwrap();
    assert!(writes > 0, "the dirtier runs: {status}");
    let out = vmm.ctl_ok("save", &[snap.to_str().unwrap()]);
    assert!(out.contains("saved to"), "{out}");
    let st = vmm.ctl_ok("status", &[]);
    assert!(st.contains("\"paused\""), "save leaves the VM paused: {st}");
    vmm.ctl_ok("quit", &[]);
    assert!(vmm.wait(T).success());
    (writes, status)
}

#[test]
fn save_and_restore_in_a_new_process_carries_on() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let snap = dir.path().join("snap");
    let (writes_before, _) = save_running_guest(dir.path(), &snap);

    let mut vmm = Vmm::spawn(
        dir.path(),
        "dst",
        &["vmm", "restore", snap.to_str().unwrap()],
    );
    let mut con = Console::connect(&vmm.com1);
    let hb = Heartbeat::connect(&vmm.com2);
    vmm.ctl_ok("resume", &[]);
    // The guest prints nothing on its own after READY: it answers, so it is alive.
    let status = con.ask(b's', "STATUS");
    let writes: u64 = field(&status, "writes").unwrap().parse().unwrap();
    assert!(
        writes >= writes_before,
        "restored guest lost progress: {writes} < {writes_before}"
    );
    assert_eq!(field(&status, "cpus").as_deref(), Some("2"));
    hb.wait_more(300, T);
    let verdict = con.ask(b'v', "VERIFY");
    assert!(
        verdict.starts_with("VERIFY OK"),
        "memory not intact after restore: {verdict}"
    );
    // Both vCPUs still run after restore.
    let a = con.ask(b's', "STATUS");
    std::thread::sleep(Duration::from_millis(200));
    let b = con.ask(b's', "STATUS");
    let ap = |l: &str| field(l, "ap_counters").unwrap().parse::<u64>().unwrap();
    assert!(ap(&b) > ap(&a), "AP stalled after restore: {a} / {b}");
    let w2: u64 = field(&b, "writes").unwrap().parse().unwrap();
    assert!(w2 > writes, "dirtier stalled after restore");
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

#[test]
fn damaged_snapshots_are_refused_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let snap = dir.path().join("snap");
    save_running_guest(dir.path(), &snap);
    let state = std::fs::read(snap.join("state")).unwrap();
    let memory_len = std::fs::metadata(snap.join("memory")).unwrap().len();

    let restore = |tag: &str| {
        let api = dir.path().join(format!("{tag}.api"));
        let out = ferry_output(
            &[
                "vmm",
                "restore",
                snap.to_str().unwrap(),
                "--api",
                api.to_str().unwrap(),
                "--serial",
                "null",
            ],
            T,
        );
        assert!(
            !api.exists(),
            "{tag}: a refused restore left its API socket"
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // A flipped byte in the state.
    let mut bad = state.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(snap.join("state"), &bad).unwrap();
    let (ok, err) = restore("flip");
    assert!(!ok && err.contains("checksum"), "{err}");

    // A truncated state.
    std::fs::write(snap.join("state"), &state[..state.len() - 100]).unwrap();
    let (ok, err) = restore("trunc");
    assert!(!ok && err.contains("truncated"), "{err}");

    // A foreign file.
    std::fs::write(
        snap.join("state"),
        b"this is not a ferry snapshot, just text. ",
    )
    .unwrap();
    let (ok, err) = restore("foreign");
    assert!(!ok && err.contains("not a ferry state file"), "{err}");

    // Intact state, truncated memory.
    std::fs::write(snap.join("state"), &state).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    f.set_len(memory_len / 2).unwrap();
    let (ok, err) = restore("mem");
    assert!(!ok && err.contains("memory file is"), "{err}");

    // Intact state, one flipped bit in guest memory (in the kernel image at 1 MiB).
    f.set_len(memory_len).unwrap();
    drop(f);
    let mut m = std::fs::read(snap.join("memory")).unwrap();
    m[0x10_0000] ^= 1;
    std::fs::write(snap.join("memory"), &m).unwrap();
    let (ok, err) = restore("memflip");
    assert!(!ok && err.contains("checksum"), "{err}");

    // No snapshot at all.
    let (ok, err) = {
        let out = ferry_output(
            &[
                "vmm",
                "restore",
                dir.path().join("nothing").to_str().unwrap(),
            ],
            T,
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert!(!ok && err.contains("holds no snapshot"), "{err}");
}
