//! Storage moves to another folder of the VM's host: `ferry move VM --storage-to DIR` while
//! the guest's disk writer runs (real daemons in a network namespace, real KVM, the test
//! guest's writer and verifier), and a cancel mid-copy.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hosts::*;
use common::*;

fn same(p: &Path, want: &[u8]) -> bool {
    std::fs::read(p).unwrap() == want
}

fn disks(h: &Hosts) -> Vec<String> {
    h.vm("hv1", "web01").unwrap()["config"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect()
}

/// One host, the test guest with its own disk and a data disk of `mib` MiB (and its bytes).
fn one_host_guest(mib: usize) -> (Hosts, PathBuf, Vec<u8>, Guest) {
    let h = Hosts::new(1);
    let (data, sum) = data_disk(h.dir.path(), mib, 0x9e37_79b9);
    let data_arg = data.display().to_string();
    let g = h.guest(GuestSpec {
        memory: 128,
        extra: vec!["--disk", &data_arg],
        ..Default::default()
    });
    (h, data, sum, g)
}

#[test]
fn a_running_vm_s_disks_move_to_another_folder_while_it_writes() {
    if !kvm_available() {
        return;
    }
    let (h, _, sum, g) = one_host_guest(24);
    let old = disks(&h);
    let before = g.wait_durable(100);
    let fast = h.dir.path().join("fast");
    std::fs::create_dir(&fast).unwrap();

    // The check names each disk's way and the space it needs.
    let out = h.ok(&[
        "move",
        "web01",
        "--storage-to",
        fast.to_str().unwrap(),
        "--check",
    ]);
    assert!(
        out.contains("web01.img -> ") && out.contains("MiB free"),
        "{out}"
    );

    let out = h.ferry(&[
        "--json",
        "move",
        "web01",
        "--storage-to",
        fast.to_str().unwrap(),
    ]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), h.logs());
    let new = disks(&h);
    assert_eq!(
        new,
        vec![
            fast.join("web01.img").display().to_string(),
            fast.join("data.img").display().to_string()
        ],
        "the definition names the new copies"
    );
    for (i, d) in r["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["switched"], true, "{d}");
        assert_eq!(d["old_copy"], "removed", "{d}");
        assert!(!Path::new(&old[i]).exists(), "{} was removed", old[i]);
    }
    let dd = &r["disks"][1];
    assert!(
        dd["copied_bytes"].as_u64().unwrap() >= 18 << 20,
        "the data was copied: {dd}"
    );
    assert!(
        dd["skipped_bytes"].as_u64().unwrap() >= 6 << 20,
        "zero blocks were skipped: {dd}"
    );
    assert!(
        same(&fast.join("data.img"), &sum),
        "the copy equals the original"
    );
    // The guest never stopped: it goes on writing, now to the new copy, and every
    // acknowledged record (before, during and after the move) reads back intact.
    let after = g.wait_durable(before + 200);
    let img = std::fs::metadata(fast.join("web01.img")).unwrap();
    assert!(img.len() == 64 << 20, "{img:?}");
    g.verify(0);
    assert!(g.durable() >= after);
    assert_eq!(h.state("hv1", "web01"), "running");
}

/// `ferry --json move web01 --storage-to DIR/slow` at 40 Mbit/s (36 MiB of data: about 7 s),
/// once it has copied something. The caller waits for the child.
fn slow_move(h: &Hosts) -> (PathBuf, std::process::Child) {
    let slow = h.dir.path().join("slow");
    std::fs::create_dir(&slow).unwrap();
    let child = h.spawn_until_copying(&[
        "--json",
        "move",
        "web01",
        "--storage-to",
        slow.to_str().unwrap(),
        "--bandwidth-mbit",
        "40",
    ]);
    (slow, child)
}

#[test]
fn a_cancelled_storage_move_leaves_the_vm_on_its_disks_and_no_copies() {
    if !kvm_available() {
        return;
    }
    let (h, data, sum, g) = one_host_guest(48);
    let old = disks(&h);
    let before = g.wait_durable(50);
    let (slow, child) = slow_move(&h);
    assert!(slow.join("data.img").exists(), "the copy is being made");
    let out = h.ok(&["move", "cancel", "web01"]);
    assert!(out.contains("stays"), "{out}");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move reports it did not happen");
    let r = report(&out);
    assert_eq!(r["result"], "cancelled", "{}", text(&out));
    assert_eq!(r["runs_on"], "hv1");
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["switched"], false, "{d}");
    }
    assert_eq!(disks(&h), old, "the VM is on its disks");
    assert_eq!(
        std::fs::read_dir(&slow).unwrap().count(),
        0,
        "no half-made copy stays"
    );
    assert!(same(&data, &sum), "the disk is as it was");
    g.wait_durable(before + 100);
    g.verify(0);
    assert_eq!(h.state("hv1", "web01"), "running");
    // A destination that cannot take the disk is refused by the check, before anything.
    let out = h.ferry(&["move", "web01", "--storage-to", "/nonexistent/dir"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is not a folder"), "{}", text(&out));
    let out = h.ferry(&["move", "web01", "--disk-to", "7=/tmp"]);
    assert!(text(&out).contains("has no disk \"7\""), "{}", text(&out));
}

#[test]
fn a_daemon_restarting_mid_copy_drops_the_copy_and_the_vm_stays_on_its_disks() {
    if !kvm_available() {
        return;
    }
    let (mut h, data, sum, g) = one_host_guest(48);
    let old = disks(&h);
    let before = g.wait_durable(50);
    let (slow, mut child) = slow_move(&h);
    // The daemon dies mid-copy (its VMM, in its own session, runs on) and comes back.
    h.restart_daemon(0, &[]);
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + T;
    while std::fs::read_dir(&slow).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the half-made copy stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(disks(&h), old, "the VM is on its disks");
    assert_eq!(h.state("hv1", "web01"), "running");
    assert!(same(&data, &sum));
    g.wait_durable(before + 100);
    // The VMM's mirror was stopped: a new move runs, to the end (keeping the old disks).
    let out = h.ferry(&[
        "--json",
        "move",
        "web01",
        "--storage-to",
        slow.to_str().unwrap(),
        "--keep-source",
    ]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}", text(&out));
    assert!(same(&slow.join("data.img"), &sum));
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["old_copy"], "kept", "{d}");
    }
    assert!(same(&data, &sum), "the old data disk is kept, intact");
    g.verify(0);
}
