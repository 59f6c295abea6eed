//! Live migration end to end: two VMM processes in two "hosts" (network namespaces on one
//! Ethernet segment), the test guest with its memory dirtier, heartbeat, disk writer and TCP
//! server, a client in a third namespace, and failures injected at every step, each checked on
//! both sides: the copy that must run does, and the one that must not never ran. Post-copy,
//! `auto`, compression, several connections and the forecast: `migration_modes.rs`.

mod common;

use std::io::Write;
use std::time::Duration;

use common::migrate::*;
use common::netns::Lab;
use common::*;

#[test]
fn consoles_attached_before_the_switch_over_see_every_byte_the_guest_writes_after_it() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    g.hb.wait_more(200, T);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "early", &listen, &[]);
    // Both ports answer while the destination still waits for its VM.
    let dst_hb = Heartbeat::connect(&dst.com2);
    let mut con = Console::connect(&dst.com1);
    assert_eq!(dst_hb.count(), 0, "a beat before the VM arrived");
    let out = migrate(&g.vmm, &listen, &[]);
    assert!(out.status.success(), "migrate: {}", text(&out));
    assert!(g.vmm.wait(T).success());
    dst_hb.wait_more(200, T);
    // The guest counts every heartbeat byte it sent; the source's watcher and the early one
    // on the destination together must have seen them all (none lost at the switch-over).
    let status = con.ask(b's', "STATUS");
    // Beats sent before the STATUS line may still be on their way to the watcher (COM2 is
    // read on a thread of its own); 20 ms lets them land and adds at most ~20 to "seen".
    std::thread::sleep(Duration::from_millis(20));
    let sent = num(&status, "hb") as usize;
    let seen = g.hb.count() + dst_hb.count();
    eprintln!(
        "beats: sent {sent}, seen {} + {}",
        g.hb.count(),
        dst_hb.count()
    );
    assert!(
        seen >= sent,
        "the guest sent {sent} beats, the watchers saw {} on the source + {} here: the destination's port missed some",
        g.hb.count(),
        dst_hb.count()
    );
    con.send(b'p');
    assert!(dst.wait(T).success());
}

#[test]
fn a_running_guest_moves_with_memory_disk_and_tcp_intact() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(1 << 20).unwrap();
    g.hb.wait_more(300, T);
    let (writes, durable) = verify(&mut g.con, 1);

    let mut dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &format!("{}:{PORT}", Lab::HOST_B_IP),
        &[],
    );
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    // The destination tells the segment where the guest's MAC is now (a RARP broadcast
    // through its tap, virtio-net header and all): the client's namespace sees it.
    let rarp = common::netns::capture_rarp(&lab.client, Duration::from_secs(8));
    let out = migrate(&g.vmm, &format!("{}:{PORT}", Lab::HOST_B_IP), &[]);
    assert!(out.status.success(), "migrate: {}", text(&out));
    let vmm_pause = pause_ms(&out);
    assert!(
        g.vmm.wait(T).success(),
        "the source VMM exits cleanly after the hand-over"
    );
    assert!(dst.running());

    let mut con = Console::connect(&dst.com1);
    dst_hb.wait_more(300, T);
    let (src_first, src_last) = g.hb.span().unwrap();
    let (dst_first, _) = dst_hb.span().unwrap();
    let guest_gap = dst_first.saturating_duration_since(src_last);
    eprintln!(
        "moved: VMM-measured pause {vmm_pause:.1} ms, guest heartbeat gap {:.1} ms (noise floor before: {:.1} ms over {:.1} s)",
        guest_gap.as_secs_f64() * 1000.0,
        g.hb.max_gap().as_secs_f64() * 1000.0,
        (src_last - src_first).as_secs_f64()
    );
    stream.read(4 << 20).unwrap();
    let (w2, d2) = verify(&mut con, writes);
    assert!(
        d2 >= durable,
        "durable disk writes went backwards: {d2} < {durable}"
    );
    assert!(w2 > writes);
    // Broadcast, from the guest's MAC (ferry's 52:54:00:..), naming that MAC as its sender.
    let frames = rarp.join().unwrap();
    let announced = frames.iter().any(|f| {
        f.len() >= 42 && f[..6] == [0xff; 6] && f[6..9] == [0x52, 0x54, 0] && f[22..28] == f[6..12]
    });
    assert!(announced, "no RARP announcement seen: {frames:02x?}");
    con.send(b'p');
    assert!(dst.wait(T).success());
}

#[test]
fn ping_pong_ten_moves_stays_clean() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(256 << 10).unwrap();
    let mut current = g.vmm;
    let mut con = g.con;
    let mut writes = 0;
    for i in 1..=10 {
        let (prefix, ip) = if i % 2 == 1 {
            (lab.in_host_b(), Lab::HOST_B_IP)
        } else {
            (lab.in_host(), Lab::HOST_A_IP)
        };
        let listen = format!("{ip}:{}", 7800 + i);
        let dst = Vmm::receive_in(&prefix, dir.path(), &format!("g{i}"), &listen, &[]);
        let out = migrate(&current, &listen, &[]);
        assert!(out.status.success(), "move {i}: {}", text(&out));
        assert!(current.wait(T).success(), "move {i}: source exits");
        con = Console::connect(&dst.com1);
        stream.read(256 << 10).unwrap();
        writes = verify(&mut con, writes).0;
        current = dst;
    }
    con.send(b'p');
    assert!(current.wait(T).success());
    drop(g.hb);
}

#[test]
fn destination_killed_during_memory_rounds() {
    interrupted(
        |_, dst, _| {
            std::thread::sleep(Duration::from_millis(800));
            dst.kill();
        },
        None,
        "100",
    );
}

#[test]
fn cancel_during_memory_rounds() {
    interrupted(
        |_, _, src| {
            std::thread::sleep(Duration::from_millis(800));
            src.ctl_ok("migrate-cancel", &[]);
        },
        None,
        "100",
    );
}

#[test]
fn connection_cut_during_memory_rounds() {
    interrupted(
        |lab, _, _| {
            std::thread::sleep(Duration::from_millis(800));
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.host,
                    "ss",
                    "-K",
                    "dst",
                    Lab::HOST_B_IP,
                    "dport",
                    "=",
                    ":7788",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ss -K: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
        None,
        "100",
    );
}

#[test]
fn destination_crash_during_state_transfer() {
    interrupted(|_, _, _| {}, Some("after-state"), "0");
}

/// The final acknowledgement is lost on the wire after the destination took over: the
/// destination keeps the guest running (it has run, written its disk and announced its MAC),
/// and the source, in doubt, asks the destination and learns "committed".
#[test]
fn a_lost_final_ack_is_settled_by_asking_the_destination() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(256 << 10).unwrap();
    let (writes, _) = verify(&mut g.con, 0);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &listen,
        &[("FERRY_FAIL_AT", "drop-ack")],
    );
    let out = migrate(&g.vmm, &listen, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("in doubt"), "the source was in doubt: {t}");
    assert!(t.contains("outcome record says committed"), "{t}");
    assert!(g.vmm.wait(T).success(), "the source lets go: {t}");
    assert!(dst.running(), "the destination keeps the guest");
    let mut con = Console::connect(&dst.com1);
    stream.read(1 << 20).unwrap();
    verify(&mut con, writes);
    con.send(b'p');
    assert!(dst.wait(T).success());
}

/// A destination that refuses Commit (here by injection; for real when it cannot take a disk
/// or finds the move settled as aborted) certainly does not run the guest, disks or not: the
/// source resumes it. Before the fix, a VM without disks was dropped by the source.
#[test]
fn a_refused_commit_resumes_the_guest_on_the_source_even_without_disks() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let mut g = start(&lab, dir.path(), GuestSpec::default());
    let mut stream = open_stream(&lab);
    stream.read(256 << 10).unwrap();
    let (writes, _) = verify_with(&mut g.con, 0, false);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &listen,
        &[("FERRY_FAIL_AT", "refuse-commit")],
    );
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    let out = migrate(&g.vmm, &listen, &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("refused"), "{t}");
    assert!(g.vmm.running(), "{t}");
    assert_eq!(state(&g.vmm), "running");
    g.hb.wait_more(200, T);
    stream.read(1 << 20).unwrap();
    verify_with(&mut g.con, writes, false);
    assert_never_ran(&dst, &dst_hb);
    g.con.send(b'p');
    assert!(g.vmm.wait(T).success());
}

/// The destination crashes right at Commit (before it records anything): nobody can say
/// whether it took over, so the source must neither resume nor drop the guest on a guess. It
/// stays paused, in doubt, until the record is settled (here by the test, as the host daemon
/// does: "aborted"), then resumes with memory, disk and stream intact, and still moves later.
#[test]
fn destination_crash_at_commit_leaves_the_source_in_doubt_until_settled() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(256 << 10).unwrap();
    let (writes, _) = verify(&mut g.con, 0);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let record = dir.path().join("move.outcome");
    let mut dst = Vmm::receive_with(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &listen,
        &["--record", record.to_str().unwrap()],
        &[("FERRY_CRASH_AT", "on-commit")],
    );
    let out = migrate(
        &g.vmm,
        &listen,
        &["--wait-in-doubt", "3", "--id", "m-crash"],
    );
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("in doubt"), "{t}");
    assert!(!dst.running(), "the destination crashed");
    assert!(g.vmm.running(), "the source keeps the paused guest: {t}");
    assert_eq!(state(&g.vmm), "paused", "no resume on a guess");
    let beats = g.hb.count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(g.hb.count(), beats, "the guest must not run while in doubt");
    assert!(!record.exists(), "the crashed destination recorded nothing");
    // Settle it as the destination's daemon would: nothing committed, so aborted for good.
    let r = ferry_migration::OutcomeRecord::File(record.clone());
    assert_eq!(
        r.decide("m-crash", ferry_api::Outcome::Aborted, "test")
            .unwrap(),
        ferry_api::Outcome::Aborted
    );
    g.vmm.ctl_ok("migrate-resolve", &["--outcome", "aborted"]);
    g.hb.wait_more(200, T);
    assert_eq!(state(&g.vmm), "running");
    stream.read(1 << 20).unwrap();
    verify(&mut g.con, writes);
    move_to_b_and_verify(&lab, dir.path(), &mut g, &mut stream, 7791);
}

/// Every disk read-only: shared locks prove nothing, so before the fix a rollback after Commit
/// always re-locked and the guest resumed on the source while the destination ran it too. Now
/// a destination that resumed and then died leaves the source in doubt; its record says
/// committed, and the source drops its copy.
#[test]
fn read_only_disks_never_let_both_hosts_run_the_guest() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let ro = disk_named(dir.path(), "ro.img");
    let mut g = start(
        &lab,
        dir.path(),
        GuestSpec {
            disks: vec![(&ro, true)],
            ..Default::default()
        },
    );
    verify_with(&mut g.con, 0, false);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let record = dir.path().join("move.outcome");
    let mut dst = Vmm::receive_with(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &listen,
        &["--record", record.to_str().unwrap()],
        &[("FERRY_CRASH_AT", "after-resume")],
    );
    let out = migrate(&g.vmm, &listen, &["--wait-in-doubt", "3", "--id", "m-ro"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("in doubt"), "{t}");
    dst.wait(T);
    assert!(
        dst.log().contains("FERRY_CRASH_AT=after-resume"),
        "the destination resumed, then died: {}",
        dst.log()
    );
    assert_eq!(state(&g.vmm), "paused", "the source must not resume: {t}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("the destination's record")).unwrap();
    assert_eq!(rec["outcome"], "committed", "{rec}");
    assert_eq!(rec["migration_id"], "m-ro");
    g.vmm.ctl_ok("migrate-resolve", &["--outcome", "committed"]);
    assert!(g.vmm.wait(T).success(), "the source drops its stale copy");
}

/// A disk release that fails half-way: the disks released so far must be locked again before
/// the guest resumes, or a second writer could open them.
#[test]
fn a_half_done_disk_release_is_undone_before_resuming() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let (d0, d1) = (
        disk_named(dir.path(), "d0.img"),
        disk_named(dir.path(), "d1.img"),
    );
    let mut g = start(
        &lab,
        dir.path(),
        GuestSpec {
            disks: vec![(&d0, false), (&d1, false)],
            env: vec![("FERRY_FAIL_AT", "release-disk-1")],
            ..Default::default()
        },
    );
    let (writes, _) = verify(&mut g.con, 0);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &listen, &[]);
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    let out = migrate(&g.vmm, &listen, &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("release"), "{t}");
    assert_eq!(state(&g.vmm), "running", "{t}");
    for d in [&d0, &d1] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d)
            .unwrap();
        assert!(
            matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            "{} must be locked by the source again",
            d.display()
        );
    }
    verify(&mut g.con, writes);
    assert_never_ran(&dst, &dst_hb);
    g.con.send(b'p');
    assert!(g.vmm.wait(T).success());
}

/// A pause that fails half-way (one vCPU does not stop): the vCPUs that stopped run again, so
/// the VM that reads Running is running on every vCPU.
#[test]
fn a_half_done_pause_is_undone() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start(
        &lab,
        dir.path(),
        GuestSpec {
            disks: vec![(&disk, false)],
            env: vec![("FERRY_FAIL_AT", "pause-vcpu-1")],
            ..Default::default()
        },
    );
    let (writes, _) = verify(&mut g.con, 0);
    let listen = format!("{}:{PORT}", Lab::HOST_B_IP);
    let dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &listen, &[]);
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    let out = migrate(&g.vmm, &listen, &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("did not pause"), "{t}");
    assert_eq!(state(&g.vmm), "running");
    // vCPU 0 answers the console; vCPU 1 spins its counter.
    let s1 = g.con.ask(b's', "STATUS");
    std::thread::sleep(Duration::from_millis(300));
    let s2 = g.con.ask(b's', "STATUS");
    assert!(
        num(&s2, "ap_counters") > num(&s1, "ap_counters"),
        "vCPU 1 runs: {s1} / {s2}"
    );
    verify(&mut g.con, writes);
    assert_never_ran(&dst, &dst_hb);
    g.con.send(b'p');
    assert!(g.vmm.wait(T).success());
}

fn receiver_refuses(bytes: &[u8], needle: &str) {
    receiver_refuses_with(bytes, needle, &[])
}

fn receiver_refuses_with(bytes: &[u8], needle: &str, extra: &[&str]) {
    let dir = tmp();
    let port = 17000 + (std::process::id() % 1000) as u16 + bytes.len() as u16 % 97;
    let listen = format!("127.0.0.1:{port}");
    let mut dst = Vmm::receive_with(&[], dir.path(), "bad", &listen, extra, &[]);
    let mut s = loop {
        match std::net::TcpStream::connect(&listen) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let st = dst.wait(T);
    let err = dst.log();
    assert!(!st.success(), "receiver accepted {bytes:?}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!dst.api.exists(), "no VM may appear");
}

fn frame(cmd: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x4749_4d46u32.to_le_bytes());
    v.extend_from_slice(&cmd.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn bad_streams_are_refused_and_nothing_runs() {
    if !kvm_available() {
        return;
    }
    receiver_refuses(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic");
    // Version 2 (the one before this ferry's) is still accepted; 1 no longer.
    let start = frame(
        1,
        br#"{"protocol_version":2,"ferry_version":"t","memory_bytes":134217728}"#,
    );
    receiver_refuses(
        &frame(
            1,
            br#"{"protocol_version":1,"ferry_version":"t","memory_bytes":1}"#,
        ),
        "version 1 is not supported",
    );
    receiver_refuses(&start[..start.len() - 5], "truncated");
    receiver_refuses(
        &frame(
            1,
            br#"{"protocol_version":99,"ferry_version":"t","memory_bytes":1}"#,
        ),
        "version 99",
    );
    let mut huge = frame(2, b"");
    huge[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    receiver_refuses(&[start.clone(), huge].concat(), "exceeds its limit");
    receiver_refuses(
        &[start.clone(), frame(3, b"\x01\x00\x00\x00")].concat(),
        "unexpected Pages",
    );
    receiver_refuses(
        &[start.clone(), frame(2, b"{not json")].concat(),
        "malformed Config",
    );
    // Compressed pages (version 5) whose delta runs past its page: skip 512 words, copy 1.
    let config = frame(2, br#"{"kernel":"/none","memory_mib":128}"#);
    let delta = [&[0x80u8, 0x04, 0x01][..], &[0xaa; 8]].concat();
    let mut packed = 1u32.to_le_bytes().to_vec();
    packed.extend_from_slice(&(0x1000u64 | 2).to_le_bytes());
    packed.push(0);
    packed.extend_from_slice(&(2 + delta.len() as u32).to_le_bytes());
    packed.extend_from_slice(&(delta.len() as u16).to_le_bytes());
    packed.extend_from_slice(&delta);
    receiver_refuses(
        &[start, config.clone(), frame(17, &packed)].concat(),
        "delta: run past the page",
    );
    // Memory connections (version 6): too many, and their end marker on the main connection.
    let start6 = frame(
        1,
        br#"{"protocol_version":6,"ferry_version":"t","memory_bytes":134217728}"#,
    );
    receiver_refuses(
        &[start6.clone(), config.clone(), frame(19, br#"{"count":9}"#)].concat(),
        "9 memory connections",
    );
    receiver_refuses(
        &[start6, config, frame(20, b"")].concat(),
        "unexpected ChannelDone",
    );
    // A receiver the host daemon started for one move takes no other.
    receiver_refuses_with(
        &frame(
            1,
            br#"{"protocol_version":2,"ferry_version":"t","memory_bytes":1,"migration_id":"other"}"#,
        ),
        "waits for move m-1",
        &["--expect-id", "m-1"],
    );
}

/// A source in doubt about an earlier move may ask any receiver: one that knows nothing says
/// so ("unknown") and goes on waiting for its own move.
#[test]
fn a_query_to_a_fresh_receiver_is_answered_unknown() {
    let dir = tmp();
    let listen = format!("127.0.0.1:{}", 18000 + std::process::id() % 1000);
    let mut dst = Vmm::receive_in(&[], dir.path(), "q", &listen, &[]);
    let mut s = loop {
        match std::net::TcpStream::connect(&listen) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.write_all(&frame(8, br#"{"migration_id":"x"}"#)).unwrap();
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut s, &mut head).unwrap();
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(&mut s, &mut body).unwrap();
    assert_eq!(u16::from_le_bytes([head[4], head[5]]), 64, "an Ack");
    let ack: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ack["message"], "unknown", "{ack}");
    assert!(dst.running(), "the receiver goes on waiting");
    dst.kill();
}

/// Block reads land in guest memory through the VMM, not the guest's vCPUs: KVM's dirty log
/// never sees them, only the VMM's own bitmap does. Keep the guest re-reading its whole disk
/// (the `d` command) throughout a move; a read whose buffer missed the last pass would fail
/// the guest's check on the destination.
#[test]
fn disk_reads_by_the_vmm_during_a_move_verify_clean() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    // Let the disk fill up a little so each `d` reads thousands of records.
    std::thread::sleep(Duration::from_millis(500));
    verify(&mut g.con, 0);
    let dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &format!("{}:{PORT}", Lab::HOST_B_IP),
        &[],
    );
    let dst_com1 = dst.com1.clone();
    let dst_con = std::thread::spawn(move || Console::connect(&dst_com1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, mut tx) = (stop.clone(), g.con.sender());
    let poker = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            if tx.write_all(b"d").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let out = migrate(&g.vmm, &format!("{}:{PORT}", Lab::HOST_B_IP), &[]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    poker.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(g.vmm.wait(T).success());
    let before = g.con.text();
    assert!(
        before.contains("DISK VERIFY OK"),
        "the guest was verifying during the move"
    );
    let mut con = dst_con.join().unwrap();
    verify(&mut con, 0);
    let after = con.text();
    assert!(
        !after.contains("FAIL") && !before.contains("FAIL"),
        "source:\n{before}\ndestination:\n{after}"
    );
    let mut dst = dst;
    con.send(b'p');
    assert!(dst.wait(T).success());
}

/// A guest that dirties memory faster than a 20 Mbit/s cap lets it move: with the default
/// `--on-timeout cancel` the migration gives up at its timeout and the guest runs on here.
#[test]
fn a_migration_that_cannot_converge_times_out_and_stays() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let (writes, _) = verify(&mut g.con, 0);
    let mut dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &format!("{}:{PORT}", Lab::HOST_B_IP),
        &[],
    );
    let out = migrate(
        &g.vmm,
        &format!("{}:{PORT}", Lab::HOST_B_IP),
        &[
            "--bandwidth-mbit",
            "20",
            "--timeout",
            "3",
            "--on-timeout",
            "cancel",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("did not converge"), "{text}");
    assert!(g.vmm.running());
    verify(&mut g.con, writes);
    let st = dst.wait(T);
    assert!(!st.success(), "the destination gives up too");
    g.con.send(b'p');
    assert!(g.vmm.wait(T).success());
}
