//! Shared-nothing moves: `ferry move VM --to HOST --storage-to DIR` moves a running VM and its
//! disks into a folder of the other host, in one move and one pause, while the guest's disk
//! writer runs (real daemons in network namespaces, mutual TLS, real KVM, the test guest's
//! writer and verifier); and a cancel, a destination daemon lost and a link cut mid-copy, after
//! which the VM runs on at the source on its disks and the destination keeps nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hosts::*;
use common::*;

fn disks(h: &Hosts, host: &str) -> Vec<String> {
    h.vm(host, "web01").unwrap()["config"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect()
}

/// Two hosts; the test guest on hv1 with its own disk and a data disk of `mib` MiB; an empty
/// folder for hv2's copies.
fn two_hosts(mib: usize) -> (Hosts, PathBuf, Vec<u8>, Guest, PathBuf) {
    let h = Hosts::new(2);
    let (data, sum) = data_disk(h.dir.path(), mib, 0x2545_f491);
    let data_arg = data.display().to_string();
    let g = h.guest(GuestSpec {
        memory: 128,
        // Room for the writer through four moves.
        disk_mib: 256,
        extra: vec!["--disk", &data_arg],
        ..Default::default()
    });
    let dest = h.dir.path().join("hv2-disks");
    std::fs::create_dir(&dest).unwrap();
    (h, data, sum, g, dest)
}

/// `ferry --json move web01 --to hv2 --storage-to DEST ARGS...`.
fn move_args<'a>(dest: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--storage-to",
        dest.to_str().unwrap(),
    ];
    args.extend(more);
    args
}

/// That move, to its end.
fn move_to_hv2(h: &Hosts, dest: &Path, more: &[&str]) -> std::process::Output {
    h.ferry(&move_args(dest, more))
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

#[test]
fn a_vm_and_its_disks_move_into_the_other_host_s_folder_in_one_move() {
    if !kvm_available() {
        return;
    }
    let (h, _, sum, mut g, dest) = two_hosts(24);
    let old = disks(&h, "hv1");
    let before = g.wait_durable(100);

    // The check asks both hosts: each disk's way into hv2's folder and the space it needs.
    let out = h.ok(&[
        "move",
        "web01",
        "--to",
        "hv2",
        "--storage-to",
        dest.to_str().unwrap(),
        "--check",
    ]);
    assert!(out.contains("-> hv2:") && out.contains("MiB free"), "{out}");
    // A folder hv2 lacks is refused before anything happens.
    let out = h.ferry(&[
        "move",
        "web01",
        "--to",
        "hv2",
        "--storage-to",
        "/nonexistent",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a folder on hv2"),
        "{}",
        text(&out)
    );

    let out = move_to_hv2(&h, &dest, &[]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), h.logs());
    assert_eq!(r["runs_on"], "hv2");
    assert_eq!(r["encrypted"], true, "{r}");
    // Nothing else moved: it never waited, and its disk copy is not counted as waiting.
    assert_eq!(r["queued_ms"], 0, "{r}");
    g.follow_on(&h, "hv2");
    assert!(h.vm("hv1", "web01").is_none(), "hv1 has no VM web01 now");
    assert_eq!(
        disks(&h, "hv2"),
        vec![
            dest.join("web01.img").display().to_string(),
            dest.join("data.img").display().to_string()
        ],
        "hv2's definition names its own copies"
    );
    let reports = r["disks"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "{r}");
    for (i, d) in reports.iter().enumerate() {
        assert_eq!(d["switched"], true, "{d}");
        assert_eq!(d["old_copy"], "removed", "{d}");
        assert!(!Path::new(&old[i]).exists(), "{} was removed", old[i]);
    }
    assert!(
        reports[1]["copied_bytes"].as_u64().unwrap() >= 18 << 20,
        "{r}"
    );
    assert!(
        reports[1]["skipped_bytes"].as_u64().unwrap() >= 6 << 20,
        "{r}"
    );
    assert!(
        std::fs::read(dest.join("data.img")).unwrap() == sum,
        "the copy of the data disk equals the original"
    );
    // The guest never restarted: it goes on writing on hv2, to its copy, and every
    // acknowledged record (before, during and after the move) reads back intact.
    let after = g.wait_durable(before + 200);
    g.verify(0);
    assert!(g.durable() >= after);
    assert_eq!(h.state("hv2", "web01"), "running");
}

/// That move at 40 Mbit/s, once its copy has begun (the caller waits for the child).
fn slow_move(h: &Hosts, dest: &Path) -> std::process::Child {
    h.spawn_until_copying(&move_args(dest, &["--bandwidth-mbit", "40"]))
}

/// What must be as it was after a move that did not happen.
struct Before {
    old: Vec<String>,
    data: PathBuf,
    sum: Vec<u8>,
    dest: PathBuf,
}

/// The interrupted move `child` ended as `result`: the VM runs on hv1 on its own disks,
/// untouched, and hv2 has neither it nor any copy.
fn ended_on_hv1(h: &Hosts, g: &Guest, b: &Before, child: std::process::Child, result: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the move reports it did not happen");
    let r = report(&out);
    assert_eq!(r["result"], result, "{}", text(&out));
    assert_eq!(r["runs_on"], "hv1");
    still_on_hv1(h, g, b);
}

/// The VM runs on hv1 on its own disks, untouched, and hv2 has neither it nor any copy.
fn still_on_hv1(h: &Hosts, g: &Guest, b: &Before) {
    let dest = &b.dest;
    assert_eq!(h.state("hv1", "web01"), "running");
    assert_eq!(disks(h, "hv1"), b.old, "the VM is on its disks");
    assert!(h.vm("hv2", "web01").is_none(), "hv2 has no VM web01");
    let deadline = Instant::now() + T;
    while !files_in(dest).is_empty() {
        assert!(
            Instant::now() < deadline,
            "copies stayed on hv2: {:?}\n{}",
            files_in(dest),
            h.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read(&b.data).unwrap() == b.sum,
        "the data disk is as it was"
    );
    let d = g.durable();
    g.wait_durable(d + 50);
    g.verify(0);
}

#[test]
fn a_shared_nothing_move_cancelled_or_cut_off_mid_copy_leaves_the_vm_where_it_was() {
    if !kvm_available() {
        return;
    }
    let (mut h, data, sum, mut g, dest) = two_hosts(48);
    let b = Before {
        old: disks(&h, "hv1"),
        data,
        sum,
        dest,
    };
    g.wait_durable(50);

    // Cancelled mid-copy.
    let child = slow_move(&h, &b.dest);
    assert!(!files_in(&b.dest).is_empty(), "hv2 makes the copies");
    let out = h.ok(&["move", "cancel", "web01"]);
    assert!(out.contains("stays"), "{out}");
    ended_on_hv1(&h, &g, &b, child, "cancelled");

    // hv2's daemon dies mid-copy (and comes back): the copy fails, the move with it.
    let child = slow_move(&h, &b.dest);
    h.restart_daemon(1, &[]);
    ended_on_hv1(&h, &g, &b, child, "failed");

    // hv2's link is cut mid-copy (and mended): the move fails, and the copies go once hv2
    // answers again.
    let child = slow_move(&h, &b.dest);
    let ns = h.lab.hosts[1].ns.clone();
    let link = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ip", "link", "set", "eth0", state])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link set eth0 {state} in {ns}");
    };
    link("down");
    let out = child.wait_with_output().unwrap();
    link("up");
    let r = report(&out);
    assert!(!out.status.success(), "the move reports it did not happen");
    assert_eq!(r["result"], "failed", "{}", text(&out));
    assert_eq!(r["runs_on"], "hv1");
    still_on_hv1(&h, &g, &b);

    // Nothing is left in the way: the move runs to the end, keeping the old disks.
    let (data, sum, dest) = (&b.data, &b.sum, &b.dest);
    let out = move_to_hv2(&h, dest, &["--keep-source"]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), h.logs());
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["old_copy"], "kept", "{d}");
    }
    assert!(
        std::fs::read(data).unwrap() == *sum,
        "the old data disk is kept, intact"
    );
    assert!(std::fs::read(dest.join("data.img")).unwrap() == *sum);
    g.follow_on(&h, "hv2");
    g.verify(0);
}
