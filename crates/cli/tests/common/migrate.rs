//! What the live migration tests share: a guest on lab host A with its workloads, what it
//! proves about itself, and `vmm migrate` run against it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::netns::Lab;
use super::*;

pub const T: Duration = Duration::from_secs(90);
pub const PORT: &str = "7788";

pub fn disk(dir: &Path) -> PathBuf {
    disk_named(dir, "disk.img")
}

pub fn disk_named(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    p
}

/// A guest on host A with its workloads running.
pub struct Guest {
    pub vmm: Vmm,
    pub con: Console,
    pub hb: Heartbeat,
    /// Whether its disk writer runs (it has a writable first disk).
    pub writes_disk: bool,
}

/// What to boot.
#[derive(Default)]
pub struct GuestSpec<'a> {
    /// Disks: (image, read-only).
    pub disks: Vec<(&'a Path, bool)>,
    pub extra_cmdline: &'a str,
    pub env: Vec<(&'a str, &'a str)>,
}

pub fn start_guest(lab: &Lab, dir: &Path, disk: &Path, extra_cmdline: &str) -> Guest {
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

pub fn start(lab: &Lab, dir: &Path, spec: GuestSpec) -> Guest {
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
pub fn verify(con: &mut Console, min_writes: u64) -> (u64, u64) {
    verify_with(con, min_writes, true)
}

pub fn verify_with(con: &mut Console, min_writes: u64, disk: bool) -> (u64, u64) {
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

pub fn open_stream(lab: &Lab) -> Stream {
    let s = lab.connect_from_client(19, T);
    s.set_read_timeout(Some(T)).unwrap();
    Stream::new(s)
}

/// Migrate with `vmm migrate`: pre-copy unless `extra` names a `--mode` (these tests pin down
/// pre-copy's failure handling; post-copy has its own below, and `auto` is pre-copy until it
/// switches).
pub fn migrate(src: &Vmm, to: &str, extra: &[&str]) -> std::process::Output {
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
pub fn migrate_in_background(
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

pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn pause_ms(out: &std::process::Output) -> f64 {
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
pub fn assert_never_ran(dst: &Vmm, dst_hb: &Heartbeat) {
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
pub fn state(vmm: &Vmm) -> String {
    let st = vmm.ctl_ok("status", &[]);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    v["state"].as_str().unwrap().to_string()
}

/// Move the guest to a fresh receiver on host B and check it there: the move that proves a
/// guest that stayed on the source after a failure can still move.
pub fn move_to_b_and_verify(lab: &Lab, dir: &Path, g: &mut Guest, stream: &mut Stream, port: u16) {
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

/// Start a migration that cannot finish quickly (bandwidth cap), then break it with `breaker`;
/// the guest must go on on the source, intact, the destination must never have run it, and
/// the guest must still move afterwards.
pub fn interrupted(breaker: impl FnOnce(&Lab, &mut Vmm, &Vmm), crash_at: Option<&str>, cap: &str) {
    interrupted_with(
        breaker,
        crash_at,
        &["--mode", "precopy", "--bandwidth-mbit", cap],
    );
}

/// As [`interrupted`], the move made with `args`; returns what `vmm migrate` printed.
pub fn interrupted_with(
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
