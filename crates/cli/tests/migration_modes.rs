//! Live migration's modes end to end: post-copy (and its recovery and its failures),
//! `auto`'s choice, compression, several memory connections and the forecast, between two VMM
//! processes in two "hosts" (network namespaces on one segment), with the test guest's
//! workloads; each failure checked on both sides.

mod common;

use std::path::Path;
use std::time::Duration;

use common::migrate::*;
use common::netns::Lab;
use common::*;

/// Post-copy with the guest rewriting its working set flat out: after one pass the guest runs
/// on the destination, fetching what it touches, and arrives whole (memory, disk, TCP stream).
#[test]
fn postcopy_moves_a_busy_guest_with_memory_disk_and_tcp_intact() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(1 << 20).unwrap();
    let (writes, durable) = verify(&mut g.con, 1);
    let to = format!("{}:{PORT}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &to, &[]);
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    // Under 200 Mbit/s the 32 MiB working set is still mostly dirty when the guest moves.
    let out = migrate(
        &g.vmm,
        &to,
        &["--mode", "postcopy", "--bandwidth-mbit", "200"],
    );
    let t = text(&out);
    assert!(
        out.status.success(),
        "migrate: {t}\ndestination:\n{}",
        dst.log()
    );
    assert!(t.contains("mode: post-copy"), "{t}");
    let fetched: u64 = t
        .split("post-copy (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no on-demand count: {t}"));
    assert!(
        fetched > 0,
        "the busy guest faulted on pages still at the source: {t}"
    );
    assert!(
        g.vmm.wait(T).success(),
        "the source exits once every page is there"
    );
    assert!(dst.running());
    let log = dst.log();
    assert!(log.contains("post-copy complete"), "{log}");
    let mut con = Console::connect(&dst.com1);
    dst_hb.wait_more(200, T);
    stream.read(4 << 20).unwrap();
    let (w2, d2) = verify(&mut con, writes);
    assert!(d2 >= durable && w2 > writes);
    con.send(b'p');
    assert!(dst.wait(T).success());
}

/// `auto` moves a guest that out-dirties the link by post-copy, and says why; one that does
/// not stays pre-copy.
#[test]
fn auto_switches_to_postcopy_only_when_precopy_cannot_keep_up() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let (writes, _) = verify(&mut g.con, 1);
    let to = format!("{}:{PORT}", Lab::HOST_B_IP);
    let dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &to, &[]);
    let out = migrate(&g.vmm, &to, &["--mode", "auto", "--bandwidth-mbit", "200"]);
    let t = text(&out);
    assert!(out.status.success(), "migrate: {t}");
    assert!(
        t.contains("mode: post-copy") && t.contains("pre-copy would be slow"),
        "{t}"
    );
    assert!(g.vmm.wait(T).success());
    let mut con = Console::connect(&dst.com1);
    verify(&mut con, writes);
    con.send(b'p');
    let mut dst = dst;
    assert!(dst.wait(T).success());

    // A guest with nothing to dirty: pre-copy converges at once and auto keeps it.
    let dir2 = tmp();
    let disk2 = disk_named(dir2.path(), "idle");
    let mut idle = start(
        &lab,
        dir2.path(),
        GuestSpec {
            disks: vec![(&disk2, false)],
            extra_cmdline: "dirty=0",
            ..Default::default()
        },
    );
    verify(&mut idle.con, 0);
    let to2 = format!("{}:7791", Lab::HOST_B_IP);
    let mut dst2 = Vmm::receive_in(&lab.in_host_b(), dir2.path(), "i1", &to2, &[]);
    let out = migrate(&idle.vmm, &to2, &["--mode", "auto"]);
    let t = text(&out);
    assert!(out.status.success(), "migrate: {t}");
    assert!(t.contains("mode: pre-copy: pre-copy converged"), "{t}");
    assert!(idle.vmm.wait(T).success());
    let mut con = Console::connect(&dst2.com1);
    verify(&mut con, 0);
    con.send(b'p');
    assert!(dst2.wait(T).success());
}

/// A guest that rewrites its pages flat out but changes only 64 bytes of each: over a slow link
/// plain pre-copy would send its whole working set every round. With compression (`auto`, the
/// default) lz4 shrinks its pages and the move converges in pre-copy with far fewer bytes than
/// the working set; with `on`, pages sent again go as deltas from the first round after the
/// first pass; in post-copy the background push goes through lz4 too. Memory verified on the
/// destination every time.
#[test]
fn compression_moves_a_sparse_writer_in_fewer_bytes_than_its_working_set() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    for (port, compression, mode) in [
        (PORT, "auto", "precopy"),
        ("7792", "on", "precopy"),
        ("7793", "auto", "postcopy"),
    ] {
        let dir = tmp();
        let disk = disk(dir.path());
        let mut g = start_guest(&lab, dir.path(), &disk, "dirty=32 rate=0 touch=8");
        let (writes, _) = verify(&mut g.con, 1);
        let to = format!("{}:{port}", Lab::HOST_B_IP);
        let dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &to, &[]);
        let args = [
            "--bandwidth-mbit",
            "200",
            "--compression",
            compression,
            "--mode",
            mode,
        ];
        let out = migrate(&g.vmm, &to, &args);
        let t = text(&out);
        eprintln!("--compression {compression} --mode {mode}: {t}");
        assert!(out.status.success(), "migrate: {t}");
        let expect = if mode == "postcopy" {
            "mode: post-copy"
        } else {
            "mode: pre-copy"
        };
        assert!(t.contains(expect), "{t}");
        // "migration Done: 2.31 s total, pause 5.1 ms, 12.3 MiB in 4 rounds"
        let mib: f64 = t
            .split(" MiB in ")
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN);
        assert!(mib < 32.0, "sent {mib} MiB for a 32 MiB working set: {t}");
        // "compression: N pages as deltas (avg B B), lz4 R.Rx on ..."
        let note = t.split("compression: ").nth(1).unwrap_or("");
        let lz4: f64 = note
            .split("lz4 ")
            .nth(1)
            .and_then(|r| r.split('x').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        assert!(lz4 > 5.0, "lz4 should shrink these pages: {t}");
        if compression == "on" {
            let deltas: u64 = note
                .split(" pages as deltas")
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(deltas > 1000, "{t}");
        }
        assert!(g.vmm.wait(T).success());
        let mut con = Console::connect(&dst.com1);
        verify(&mut con, writes);
        con.send(b'p');
        let mut dst = dst;
        assert!(dst.wait(T).success());
    }
}

/// Pre-copy's pages on two memory connections (`--channels 2`, no cap: where they pay): the
/// busy guest (memory dirtier, heartbeat, disk writer, TCP stream) moves intact, with
/// compression as by default and without, and the report counts every connection's bytes.
#[test]
fn two_memory_connections_move_a_busy_guest_intact() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    for (port, compression) in [(PORT, "auto"), ("7794", "off")] {
        let dir = tmp();
        let disk = disk(dir.path());
        let mut g = start_guest(&lab, dir.path(), &disk, "");
        let mut stream = open_stream(&lab);
        stream.read(1 << 20).unwrap();
        let (writes, durable) = verify(&mut g.con, 1);
        let to = format!("{}:{port}", Lab::HOST_B_IP);
        let dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &to, &[]);
        let args = [
            "--channels",
            "2",
            "--mode",
            "precopy",
            "--compression",
            compression,
        ];
        let out = migrate(&g.vmm, &to, &args);
        let t = text(&out);
        eprintln!("--channels 2 --compression {compression}: {t}");
        assert!(out.status.success(), "migrate: {t}");
        assert!(dst.log().contains("on 2 connections"), "{}", dst.log());
        assert!(
            t.contains("memory on 2 connections"),
            "the report says so: {t}"
        );
        // The guest's memory is 64 MiB and mostly written: the first pass alone is more
        // than half of it, whichever connections carried it.
        let mib: f64 = t
            .split(" MiB in ")
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN);
        assert!(
            mib > 4.0,
            "the report must count the memory connections' bytes: {t}"
        );
        assert!(g.vmm.wait(T).success());
        let mut con = Console::connect(&dst.com1);
        stream.read(4 << 20).unwrap();
        let (w2, d2) = verify(&mut con, writes);
        assert!(d2 >= durable && w2 > writes);
        con.send(b'p');
        let mut dst = dst;
        assert!(dst.wait(T).success());
    }
}

/// One of two memory connections cut mid-move: the move fails and says which, the guest runs
/// on at the source (memory, disk, TCP intact), the destination never ran it, and a move
/// afterwards works.
#[test]
fn a_cut_memory_connection_fails_the_move_cleanly() {
    let t = interrupted_with(
        |lab, _, _| {
            std::thread::sleep(Duration::from_millis(800));
            // The memory connection: the one to the destination that carried the most.
            let ns = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &lab.host])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let list = ns(&["ss", "-tni", "state", "established", "dst", Lab::HOST_B_IP]);
            let mut best: Option<(u64, String)> = None;
            let mut local = None;
            for line in list.lines() {
                let w: Vec<&str> = line.split_whitespace().collect();
                if w.len() >= 4 && w[3].ends_with(":7788") {
                    local = w[2].rsplit(':').next().map(String::from);
                } else if let Some(port) = local.take() {
                    let acked = line
                        .split("bytes_acked:")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    if best.as_ref().is_none_or(|(b, _)| acked > *b) {
                        best = Some((acked, port));
                    }
                }
            }
            let (acked, port) = best.expect("the move's connections");
            eprintln!("cutting the connection from port {port} ({acked} bytes acked)");
            let sport = format!(":{port}");
            ns(&["ss", "-K", "dst", Lab::HOST_B_IP, "sport", "=", &sport]);
        },
        None,
        &[
            "--channels",
            "2",
            "--mode",
            "precopy",
            "--bandwidth-mbit",
            "100",
        ],
    );
    if !t.is_empty() {
        assert!(
            t.contains("memory connection"),
            "the report says which: {t}"
        );
    }
}

/// Start a post-copy move over a slow link (`extra`: more `vmm migrate` flags) and break it
/// once the guest runs on the destination: `breaker` gets the lab, the source and the
/// destination.
fn postcopy_broken(
    extra: &[&str],
    breaker: impl FnOnce(&Lab, &mut Vmm, &mut Vmm),
) -> (Lab, tempfile::TempDir, Guest, Vmm, String) {
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    verify(&mut g.con, 1);
    let to = format!("{}:{PORT}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir.path(), "g1", &to, &[]);
    let mut args = vec!["--mode", "postcopy", "--bandwidth-mbit", "30"];
    args.extend(extra);
    let mig = migrate_in_background(&g.vmm, &to, &args);
    let deadline = std::time::Instant::now() + T;
    while !dst.log().contains("the guest runs here now") {
        assert!(std::time::Instant::now() < deadline, "{}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    breaker(&lab, &mut g.vmm, &mut dst);
    let out = text(&mig.join().unwrap());
    (lab, dir, g, dst, out)
}

/// Cut host A off host B: its link down (nothing gets through, reconnects time out) and its
/// connections to B aborted.
fn cut_link(lab: &Lab) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.host])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ip", "link", "set", "eth0", "down"]);
    run(&["ss", "-K", "dst", Lab::HOST_B_IP]);
}

fn restore_link(lab: &Lab) {
    let st = std::process::Command::new("ip")
        .args([
            "netns", "exec", &lab.host, "ip", "link", "set", "eth0", "up",
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

/// After a lost post-copy the source keeps its paused copy and never runs it.
fn assert_source_keeps_a_paused_copy(g: &mut Guest) {
    assert!(g.vmm.running(), "the source keeps its copy");
    assert_eq!(state(&g.vmm), "paused");
    let beats = g.hb.count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(g.hb.count(), beats, "the source's guest must not run");
    g.vmm.kill();
}

/// Post-copy survives a cut: both connections aborted and the link down for two seconds. The
/// guest waits on the destination meanwhile; the source reconnects, the destination names
/// what it still lacks, and the move ends with memory, disk and TCP intact.
#[test]
fn postcopy_recovers_from_a_connection_cut_mid_way() {
    if !kvm_available() {
        return;
    }
    let (lab, _dir, mut g, mut dst, out) = postcopy_broken(&[], |lab, _, dst| {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !dst.log().contains("post-copy complete"),
            "the move ended before the cut; it must still be under way"
        );
        cut_link(lab);
        std::thread::sleep(Duration::from_secs(2));
        restore_link(lab);
    });
    assert!(
        out.contains("mode: post-copy") && out.contains("recovered from"),
        "{out}\ndestination:\n{}",
        dst.log()
    );
    assert!(
        g.vmm.wait(T).success(),
        "the source exits once every page is there"
    );
    let log = dst.log();
    assert!(
        log.contains("connection to the source broke") && log.contains("the source reconnected"),
        "{log}"
    );
    assert!(
        log.contains("post-copy complete") && log.contains("recovered from"),
        "{log}"
    );
    assert!(dst.running());
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    dst_hb.wait_more(100, T);
    let mut con = Console::connect(&dst.com1);
    let mut stream = open_stream(&lab);
    stream.read(1 << 20).unwrap();
    verify(&mut con, 1);
    con.send(b'p');
    assert!(dst.wait(T).success());
}

/// A link that stays down past the recovery limit ends as documented: the destination stops
/// the guest and says the source did not come back; the source says the guest is lost and
/// keeps its paused copy, never resuming it.
#[test]
fn postcopy_past_its_recovery_limit_ends_as_documented() {
    if !kvm_available() {
        return;
    }
    let (_lab, _dir, mut g, mut dst, out) =
        postcopy_broken(&["--postcopy-recovery", "3"], |lab, _, _| cut_link(lab));
    assert!(
        out.contains("could not be made again within 3s") && out.contains("it is lost"),
        "{out}"
    );
    let st = dst.wait(T);
    assert!(!st.success(), "the destination must not go on");
    let log = dst.log();
    assert!(
        log.contains("post-copy lost its source") && log.contains("did not come back within 3s"),
        "{log}"
    );
    assert_source_keeps_a_paused_copy(&mut g);
}

/// The source dies while the guest runs on the destination with pages still missing: once the
/// recovery limit passes, the destination stops the guest (it cannot go on with holes in its
/// memory) and says why; it never goes on with zero-filled pages.
#[test]
fn postcopy_without_its_source_stops_the_guest_and_says_so() {
    if !kvm_available() {
        return;
    }
    let (_lab, _dir, _g, mut dst, _) =
        postcopy_broken(&["--postcopy-recovery", "2"], |_, src, _| src.kill());
    let st = dst.wait(T);
    assert!(!st.success(), "the destination must not go on");
    let log = dst.log();
    assert!(log.contains("post-copy lost its source"), "{log}");
}

/// The destination dies in post-copy: the source reports the guest lost and keeps its paused
/// copy; it never resumes it (the guest ran on the destination since).
#[test]
fn postcopy_without_its_destination_never_resumes_the_source() {
    if !kvm_available() {
        return;
    }
    let (_lab, _dir, mut g, _dst, out) =
        postcopy_broken(&["--postcopy-recovery", "2"], |_, _, dst| dst.kill());
    assert!(
        out.contains("post-copy broke") && out.contains("it is lost"),
        "{out}"
    );
    assert_source_keeps_a_paused_copy(&mut g);
}

/// `vmm migrate --forecast --json` with `extra`: the forecast as JSON.
fn forecast(src: &Vmm, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--forecast", "--json", "--sample-ms", "2000"];
    args.extend_from_slice(extra);
    let out = migrate(src, to, &args);
    assert!(out.status.success(), "forecast: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn total_s(out: &std::process::Output) -> f64 {
    let t = String::from_utf8_lossy(&out.stdout);
    t.split(" s total")
        .next()
        .and_then(|r| r.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in {t}"))
}

/// Forecast a move, check that it moved nothing, then move for real: the prediction names the
/// mode the move used and its total time is within a factor of 2.
fn forecast_then_move(lab: &Lab, g: &mut Guest, dir: &Path, port: u16, extra: &[&str]) {
    let to = format!("{}:{port}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir, &format!("f{port}"), &to, &[]);
    let f = forecast(&g.vmm, &to, extra);
    // Nothing moved: the destination still waits, the guest still runs here.
    assert!(!dst.log().contains("receiving a"), "{}", dst.log());
    assert_eq!(state(&g.vmm), "running");
    g.hb.wait_more(20, T);
    let out = migrate(&g.vmm, &to, extra);
    let t = text(&out);
    assert!(out.status.success(), "migrate: {t}");
    let (predicted, real) = (f["total_ms"].as_f64().unwrap() / 1000.0, total_s(&out));
    eprintln!("forecast {f}\nreal: {t}");
    let mode = if t.contains("mode: post-copy") {
        "postcopy"
    } else {
        "precopy"
    };
    assert_eq!(f["mode"], mode, "forecast {f}\nreal: {t}");
    assert!(
        (0.5..=2.0).contains(&(predicted / real)),
        "predicted {predicted:.2} s, took {real:.2} s\nforecast {f}\nreal: {t}"
    );
    assert!(g.vmm.wait(T).success());
    let mut con = Console::connect(&dst.com1);
    verify(&mut con, 0);
    con.send(b'p');
    assert!(dst.wait(T).success());
}

/// The forecast moves nothing and predicts the move: a guest that out-dirties a 200 Mbit/s
/// link (post-copy), and one that filled 64 MiB once and then stays idle (pre-copy, on two
/// memory connections), as in the benchmark's rows.
#[test]
fn the_forecast_moves_nothing_and_predicts_the_move_within_2x() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut busy = start_guest(&lab, dir.path(), &disk, "");
    verify(&mut busy.con, 1);
    let capped = ["--mode", "auto", "--bandwidth-mbit", "200"];
    forecast_then_move(&lab, &mut busy, dir.path(), 7788, &capped);

    let dir2 = tmp();
    let disk2 = disk_named(dir2.path(), "idle");
    let mut idle = start(
        &lab,
        dir2.path(),
        GuestSpec {
            disks: vec![(&disk2, false)],
            extra_cmdline: "dirty=64 rate=1",
            ..Default::default()
        },
    );
    verify(&mut idle.con, 0);
    // On two memory connections: the forecast probes on two at once, under the one cap.
    let two = [
        "--mode",
        "auto",
        "--bandwidth-mbit",
        "200",
        "--channels",
        "2",
    ];
    forecast_then_move(&lab, &mut idle, dir2.path(), 7791, &two);

    // --forecast-first sets the forecast beside the outcome in the move's report.
    let dir3 = tmp();
    let disk3 = disk_named(dir3.path(), "third");
    let mut g = start_guest(&lab, dir3.path(), &disk3, "");
    verify(&mut g.con, 1);
    let to = format!("{}:7792", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir3.path(), "t3", &to, &[]);
    let out = migrate(
        &g.vmm,
        &to,
        &["--mode", "auto", "--forecast-first", "--sample-ms", "1000"],
    );
    let t = text(&out);
    assert!(out.status.success(), "migrate: {t}");
    assert!(
        t.contains("forecast for a move to") && t.contains("forecast beforehand:"),
        "{t}"
    );
    assert!(g.vmm.wait(T).success());
    let mut con = Console::connect(&dst.com1);
    verify(&mut con, 0);
    con.send(b'p');
    assert!(dst.wait(T).success());
}
