//! Live migration end to end: two VMM processes in two "hosts" (network namespaces on one
//! Ethernet segment), the test guest with its memory dirtier, heartbeat, disk writer and TCP
//! server, a client in a third namespace, and failures injected at every step, each checked on
//! both sides: the copy that must run does, and the one that must not never ran.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::Lab;
use common::*;

const T: Duration = Duration::from_secs(90);
const PORT: &str = "7788";

fn disk(dir: &Path) -> PathBuf {
    disk_named(dir, "disk.img")
}

fn disk_named(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// A guest on host A with its workloads running.
struct Guest {
    vmm: Vmm,
    con: Console,
    hb: Heartbeat,
    /// Whether its disk writer runs (it has a writable first disk).
    writes_disk: bool,
}

/// What to boot.
#[derive(Default)]
struct GuestSpec<'a> {
    /// Disks: (image, read-only).
    disks: Vec<(&'a Path, bool)>,
    extra_cmdline: &'a str,
    env: Vec<(&'a str, &'a str)>,
}

fn start_guest(lab: &Lab, dir: &Path, disk: &Path, extra_cmdline: &str) -> Guest {
    start(
        lab,
        dir,
        GuestSpec {
            disks: vec![(disk, false)],
            extra_cmdline,
            ..Default::default()
        },
    )
}

fn start(lab: &Lab, dir: &Path, spec: GuestSpec) -> Guest {
    let kernel = testguest(dir);
    let writes_disk = spec.disks.first().is_some_and(|d| !d.1);
    let cmd = format!(
        "hb=2 dirty=32 rate=0 ip={}/24 {} {}",
        lab.guest_ip,
        if writes_disk {
            "disk=write flush=4 qd=4"
        } else {
            ""
        },
        spec.extra_cmdline
    );
    let disk_args: Vec<String> = spec
        .disks
        .iter()
        .map(|(p, ro)| format!("{}{}", p.display(), if *ro { ",readonly" } else { "" }))
        .collect();
    let mut args = vec![
        "vmm",
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256",
        "--vcpus",
        "2",
        "--net",
        "bridge=br0",
        "--cmdline",
        &cmd,
    ];
    for d in &disk_args {
        args.extend(["--disk", d.as_str()]);
    }
    let vmm = Vmm::spawn_env(&lab.in_host(), dir, "g0", &args, &spec.env);
    let con = Console::connect(&vmm.com1);
    let hb = Heartbeat::connect(&vmm.com2);
    vmm.ctl_ok("resume", &[]);
    con.wait_line("READY", T);
    if writes_disk {
        con.wait_line("DISK found=", T);
    }
    Guest {
        vmm,
        con,
        hb,
        writes_disk,
    }
}

/// Everything the guest can prove about itself: memory, disk, progress.
fn verify(con: &mut Console, min_writes: u64) -> (u64, u64) {
    verify_with(con, min_writes, true)
}

fn verify_with(con: &mut Console, min_writes: u64, disk: bool) -> (u64, u64) {
    let v = con.ask(b'v', "VERIFY");
    assert!(v.starts_with("VERIFY OK"), "memory: {v}");
    if disk {
        let d = con.ask(b'd', "DISK VERIFY");
        assert!(d.starts_with("DISK VERIFY OK"), "disk: {d}");
    }
    let s = con.ask(b's', "STATUS");
    let writes = num(&s, "writes");
    assert!(writes >= min_writes, "guest lost progress: {s}");
    if disk {
        assert_eq!(num(&s, "disk_errors"), 0, "{s}");
        (writes, num(&s, "disk_durable"))
    } else {
        (writes, 0)
    }
}

fn open_stream(lab: &Lab) -> Stream {
    let s = lab.connect_from_client(19, T);
    s.set_read_timeout(Some(T)).unwrap();
    Stream::new(s)
}

/// Migrate with `vmm migrate`: pre-copy unless `extra` names a `--mode` (these tests pin down
/// pre-copy's failure handling; post-copy has its own below, and `auto` is pre-copy until it
/// switches).
fn migrate(src: &Vmm, to: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vmm",
        "migrate",
        "--api",
        src.api.to_str().unwrap(),
        "--to",
        to,
    ];
    if !extra.contains(&"--mode") {
        args.extend(["--mode", "precopy"]);
    }
    args.extend_from_slice(extra);
    ferry_output(&args, T)
}

/// `ferry vmm migrate` from `src` to `to` with `args`, on a thread.
fn migrate_in_background(
    src: &Vmm,
    to: &str,
    args: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let api = src.api.to_str().unwrap().to_string();
    let mut a: Vec<String> = ["vmm", "migrate", "--api", &api, "--to", to]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(args.iter().map(|s| s.to_string()));
    std::thread::spawn(move || {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ferry_output(&a, T)
    })
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pause_ms(out: &std::process::Output) -> f64 {
    let text = String::from_utf8_lossy(&out.stdout);
    let p = text
        .split("pause ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .unwrap_or("nan");
    p.parse().unwrap_or(f64::NAN)
}

/// The destination never ran the guest: it never said so, and its heartbeat port (open from
/// the start of `vmm receive`) never saw a beat.
fn assert_never_ran(dst: &Vmm, dst_hb: &Heartbeat) {
    let log = dst.log();
    assert!(
        !log.contains("the guest runs here now"),
        "the destination ran the guest:\n{log}"
    );
    assert_eq!(
        dst_hb.count(),
        0,
        "the destination's guest beat its heartbeat; its log:\n{log}"
    );
}

/// The VMM's state as `vmm status` prints it ("running" or "paused").
fn state(vmm: &Vmm) -> String {
    let st = vmm.ctl_ok("status", &[]);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    v["state"].as_str().unwrap().to_string()
}

/// Move the guest to a fresh receiver on host B and check it there: the move that proves a
/// guest that stayed on the source after a failure can still move.
fn move_to_b_and_verify(lab: &Lab, dir: &Path, g: &mut Guest, stream: &mut Stream, port: u16) {
    let listen = format!("{}:{port}", Lab::HOST_B_IP);
    let mut dst = Vmm::receive_in(&lab.in_host_b(), dir, &format!("again{port}"), &listen, &[]);
    let out = migrate(&g.vmm, &listen, &[]);
    assert!(out.status.success(), "the move afterwards: {}", text(&out));
    assert!(g.vmm.wait(T).success(), "the source exits after the move");
    let mut con = Console::connect(&dst.com1);
    stream.read(1 << 20).unwrap();
    verify_with(&mut con, 0, g.writes_disk);
    con.send(b'p');
    assert!(dst.wait(T).success());
}

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

/// Start a migration that cannot finish quickly (bandwidth cap), then break it with `breaker`;
/// the guest must go on on the source, intact, the destination must never have run it, and
/// the guest must still move afterwards.
fn interrupted(breaker: impl FnOnce(&Lab, &mut Vmm, &Vmm), crash_at: Option<&str>, cap: &str) {
    interrupted_with(
        breaker,
        crash_at,
        &["--mode", "precopy", "--bandwidth-mbit", cap],
    );
}

/// As [`interrupted`], the move made with `args`; returns what `vmm migrate` printed.
fn interrupted_with(
    breaker: impl FnOnce(&Lab, &mut Vmm, &Vmm),
    crash_at: Option<&str>,
    args: &[&str],
) -> String {
    if !kvm_available() {
        return String::new();
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = open_stream(&lab);
    stream.read(256 << 10).unwrap();
    let (writes, _) = verify(&mut g.con, 0);
    let env: Vec<(&str, &str)> = crash_at
        .map(|c| vec![("FERRY_CRASH_AT", c)])
        .unwrap_or_default();
    let mut dst = Vmm::receive_in(
        &lab.in_host_b(),
        dir.path(),
        "g1",
        &format!("{}:{PORT}", Lab::HOST_B_IP),
        &env,
    );
    let dst_hb = Heartbeat::connect_when_ready(&dst.com2);
    let to = format!("{}:{PORT}", Lab::HOST_B_IP);
    let mig = migrate_in_background(&g.vmm, &to, args);
    breaker(&lab, &mut dst, &g.vmm);
    let out = mig.join().unwrap();
    let text = text(&out);
    assert!(!out.status.success(), "the migration must fail: {text}");
    assert!(g.vmm.running(), "the source VMM keeps the guest: {text}");
    assert_eq!(state(&g.vmm), "running", "{text}");
    g.hb.wait_more(200, T);
    stream.read(1 << 20).unwrap();
    verify(&mut g.con, writes);
    assert_never_ran(&dst, &dst_hb);
    dst.kill();
    move_to_b_and_verify(&lab, dir.path(), &mut g, &mut stream, 7790);
    text
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
