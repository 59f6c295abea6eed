//! Live migration end to end: two VMM processes in two "hosts" (network namespaces on one
//! Ethernet segment), the test guest with its memory dirtier, heartbeat, disk writer and TCP
//! server, a client in a third namespace, and failures injected at every step.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::Lab;
use common::*;

const T: Duration = Duration::from_secs(90);
const PORT: &str = "7788";

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .parse()
        .unwrap()
}

fn disk(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// A guest on host A with every workload running.
struct Guest {
    vmm: Vmm,
    con: Console,
    hb: Heartbeat,
}

fn start_guest(lab: &Lab, dir: &Path, disk: &Path, extra_cmdline: &str) -> Guest {
    let kernel = testguest(dir);
    let cmd = format!(
        "hb=2 dirty=32 rate=0 ip={}/24 disk=write flush=4 qd=4 {extra_cmdline}",
        lab.guest_ip
    );
    let vmm = Vmm::spawn_in(
        &lab.in_host(),
        dir,
        "g0",
        &[
            "vm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
            "--vcpus",
            "2",
            "--disk",
            disk.to_str().unwrap(),
            "--net",
            "bridge=br0",
            "--cmdline",
            &cmd,
        ],
    );
    let con = Console::connect(&vmm.com1);
    let hb = Heartbeat::connect(&vmm.com2);
    vmm.ctl_ok("resume", &[]);
    con.wait_line("READY", T);
    con.wait_line("DISK found=", T);
    Guest { vmm, con, hb }
}

/// Everything the guest can prove about itself: memory, disk, progress.
fn verify(con: &mut Console, min_writes: u64) -> (u64, u64) {
    let v = con.ask(b'v', "VERIFY");
    assert!(v.starts_with("VERIFY OK"), "memory: {v}");
    let d = con.ask(b'd', "DISK VERIFY");
    assert!(d.starts_with("DISK VERIFY OK"), "disk: {d}");
    let s = con.ask(b's', "STATUS");
    assert_eq!(num(&s, "disk_errors"), 0, "{s}");
    let writes = num(&s, "writes");
    assert!(writes >= min_writes, "guest lost progress: {s}");
    (writes, num(&s, "disk_durable"))
}

struct Stream {
    s: std::net::TcpStream,
    next: u64,
    carry: Vec<u8>,
}

impl Stream {
    fn open(lab: &Lab) -> Stream {
        let s = lab.connect_from_client(19, T);
        s.set_read_timeout(Some(T)).unwrap();
        Stream {
            s,
            next: 0,
            carry: Vec::new(),
        }
    }

    /// Read `bytes` more and check every counter is the next one.
    fn read(&mut self, bytes: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < bytes {
            let n = self.s.read(&mut buf).expect("stream read");
            assert!(n > 0, "guest closed the stream");
            got += n;
            self.carry.extend_from_slice(&buf[..n]);
            let whole = self.carry.len() / 8 * 8;
            for c in self.carry[..whole].chunks_exact(8) {
                assert_eq!(
                    u64::from_le_bytes(c.try_into().unwrap()),
                    self.next,
                    "stream byte lost or reordered"
                );
                self.next += 1;
            }
            self.carry.drain(..whole);
        }
    }
}

fn migrate(src: &Vmm, to: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "vm",
        "migrate",
        "--api",
        src.api.to_str().unwrap(),
        "--to",
        to,
    ];
    args.extend_from_slice(extra);
    ferry_output(&args, T)
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

#[test]
fn a_running_guest_moves_with_memory_disk_and_tcp_intact() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = Stream::open(&lab);
    stream.read(1 << 20);
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
    let out = migrate(&g.vmm, &format!("{}:{PORT}", Lab::HOST_B_IP), &[]);
    assert!(
        out.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    stream.read(4 << 20);
    let (w2, d2) = verify(&mut con, writes);
    assert!(
        d2 >= durable,
        "durable disk writes went backwards: {d2} < {durable}"
    );
    assert!(w2 > writes);
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
    let mut stream = Stream::open(&lab);
    stream.read(256 << 10);
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
        if !out.status.success() {
            for ns in [&lab.host, lab.host_b.as_ref().unwrap()] {
                for args in [&["neigh"][..], &["-br", "link"][..], &["-br", "addr"][..]] {
                    let o = std::process::Command::new("ip")
                        .arg("-n")
                        .arg(ns)
                        .args(args)
                        .output()
                        .unwrap();
                    eprintln!("{ns} ip {args:?}:\n{}", String::from_utf8_lossy(&o.stdout));
                }
                let o = std::process::Command::new("ip")
                    .args(["netns", "exec", ns, "ss", "-tan"])
                    .output()
                    .unwrap();
                eprintln!("{ns} ss:\n{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        assert!(
            out.status.success(),
            "move {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(current.wait(T).success(), "move {i}: source exits");
        con = Console::connect(&dst.com1);
        stream.read(256 << 10);
        writes = verify(&mut con, writes).0;
        current = dst;
    }
    con.send(b'p');
    assert!(current.wait(T).success());
    drop(g.hb);
}

/// Start a migration that cannot finish quickly (bandwidth cap), then break it with `breaker`;
/// the guest must go on on the source, intact.
fn interrupted(breaker: impl FnOnce(&Lab, &mut Vmm, &Vmm), crash_at: Option<&str>, cap: &str) {
    if !kvm_available() {
        return;
    }
    let lab = Lab::two_hosts();
    let dir = tmp();
    let disk = disk(dir.path());
    let mut g = start_guest(&lab, dir.path(), &disk, "");
    let mut stream = Stream::open(&lab);
    stream.read(256 << 10);
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
    let to = format!("{}:{PORT}", Lab::HOST_B_IP);
    let api = g.vmm.api.clone();
    let cap = cap.to_string();
    let mig = std::thread::spawn(move || {
        ferry_output(
            &[
                "vm",
                "migrate",
                "--api",
                api.to_str().unwrap(),
                "--to",
                &to,
                "--bandwidth-mbit",
                &cap,
            ],
            T,
        )
    });
    breaker(&lab, &mut dst, &g.vmm);
    let out = mig.join().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the migration must fail: {text}");
    assert!(g.vmm.running(), "the source VMM keeps the guest: {text}");
    let st = g.vmm.ctl_ok("status", &[]);
    assert!(st.contains("\"running\""), "{st}");
    g.hb.wait_more(200, T);
    stream.read(1 << 20);
    verify(&mut g.con, writes);
    // And it can still move afterwards.
    let _ = dst.child.kill();
    let _ = dst.child.wait();
    g.con.send(b'p');
    assert!(g.vmm.wait(T).success());
}

#[test]
fn destination_killed_during_memory_rounds() {
    interrupted(
        |_, dst, _| {
            std::thread::sleep(Duration::from_millis(800));
            dst.child.kill().unwrap();
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

#[test]
fn destination_crash_just_before_commit() {
    interrupted(|_, _, _| {}, Some("on-commit"), "0");
}

fn receiver_refuses(bytes: &[u8], needle: &str) {
    let dir = tmp();
    let port = 17000 + (std::process::id() % 1000) as u16 + bytes.len() as u16 % 97;
    let listen = format!("127.0.0.1:{port}");
    let mut dst = Vmm::receive_in(&[], dir.path(), "bad", &listen, &[]);
    let mut s = loop {
        match std::net::TcpStream::connect(&listen) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let st = dst.wait(T);
    let mut err = String::new();
    dst.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
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
    let start = frame(
        1,
        br#"{"protocol_version":1,"ferry_version":"t","memory_bytes":134217728}"#,
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
        &[start, frame(2, b"{not json")].concat(),
        "malformed Config",
    );
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
