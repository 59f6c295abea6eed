//! The VMM's NBD disk backend against a standard NBD server (qemu-nbd): real KVM, the test
//! guest's disk writer and verifier, the server killed and restarted under guest I/O.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry_lab::Proc;

const T: Duration = Duration::from_secs(60);

fn tool(name: &str) -> bool {
    let ok = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is not installed and CI=true (.ci/run installs it)");
        }
        eprintln!("SKIPPED: {name} is not installed (apt-get install qemu-utils)");
    }
    ok
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// qemu-nbd serving `img` as export `disk` on 127.0.0.1:`port`, up when this returns.
fn qemu_nbd(dir: &Path, img: &Path, port: u16, n: u32) -> Proc {
    let mut cmd = std::process::Command::new("qemu-nbd");
    cmd.args(["-t", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg(img);
    let p = Proc::spawn(cmd, "qemu-nbd", dir.join(format!("qemu-nbd{n}.log"))).unwrap();
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// (durable, errors) once `durable` reaches `at_least`.
fn wait_durable(con: &mut Console, at_least: u64) -> (u64, u64) {
    let deadline = Instant::now() + T;
    loop {
        let s = con.ask(b's', "STATUS");
        let d = num(&s, "disk_durable");
        if d >= at_least {
            return (d, num(&s, "disk_errors"));
        }
        assert!(Instant::now() < deadline, "disk writer stalled: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify(con: &mut Console) {
    let v = con.ask(b'd', "DISK VERIFY");
    assert!(v.starts_with("DISK VERIFY OK"), "{v}");
}

/// After the guest is gone: the image itself (opened as a local file) holds every record
/// that was durable, intact.
fn image_holds(dir: &Path, img: &Path, durable: u64) {
    let (mut vmm, mut con) =
        start_disk_guest(dir, "check", img.to_str().unwrap(), "hb=0 disk=verify");
    let found = con.wait_line("DISK found=", T);
    assert!(
        num(&found, "found") >= durable,
        "{found}: {durable} records were durable"
    );
    verify(&mut con);
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

#[test]
fn a_guest_disk_on_a_qemu_nbd_export_writes_and_verifies() {
    if !kvm_available() || !tool("qemu-nbd") {
        return;
    }
    let dir = tmp();
    let img = disk_image(dir.path(), 32);
    let port = free_port();
    let _srv = qemu_nbd(dir.path(), &img, port, 0);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let (mut vmm, mut con) =
        start_disk_guest(dir.path(), "w", &uri, "hb=0 disk=write flush=8 qd=8");
    let found = con.wait_line("DISK found=", T);
    assert_eq!(num(&found, "found"), 0, "{found}");
    let (durable, errors) = wait_durable(&mut con, 800);
    assert_eq!(errors, 0);
    verify(&mut con);
    con.send(b'p');
    assert!(vmm.wait(T).success());
    drop(con);
    image_holds(dir.path(), &img, durable);
}

#[test]
fn a_short_server_outage_stalls_guest_io_and_then_resumes_it() {
    if !kvm_available() || !tool("qemu-nbd") {
        return;
    }
    let dir = tmp();
    let img = disk_image(dir.path(), 32);
    let port = free_port();
    let mut srv = qemu_nbd(dir.path(), &img, port, 0);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let (mut vmm, mut con) =
        start_disk_guest(dir.path(), "o", &uri, "hb=0 disk=write flush=4 qd=8");
    let (before, _) = wait_durable(&mut con, 300);
    srv.kill();
    std::thread::sleep(Duration::from_secs(3));
    // Stalled, not failed: nothing new is durable and the guest saw no error.
    let s = con.ask(b's', "STATUS");
    assert_eq!(
        num(&s, "disk_errors"),
        0,
        "an outage inside the limit is not an error: {s}"
    );
    let stalled = num(&s, "disk_durable");
    std::thread::sleep(Duration::from_millis(500));
    let s2 = con.ask(b's', "STATUS");
    assert_eq!(
        num(&s2, "disk_durable"),
        stalled,
        "I/O went on without a server: {s2}"
    );
    let _srv = qemu_nbd(dir.path(), &img, port, 1);
    let (durable, errors) = wait_durable(&mut con, stalled.max(before) + 300);
    assert_eq!(errors, 0, "the writer resumed without errors");
    verify(&mut con);
    con.send(b'p');
    assert!(vmm.wait(T).success());
    assert!(
        vmm.log().contains("went away"),
        "the stall is logged: {}",
        vmm.log()
    );
    drop(con);
    image_holds(dir.path(), &img, durable);
}

#[test]
fn an_outage_past_the_stall_limit_gives_io_errors_and_loses_nothing_acknowledged() {
    if !kvm_available() || !tool("qemu-nbd") {
        return;
    }
    let dir = tmp();
    let img = disk_image(dir.path(), 32);
    let port = free_port();
    let mut srv = qemu_nbd(dir.path(), &img, port, 0);
    let uri = format!("nbd://127.0.0.1:{port}/disk,stall=1");
    let (mut vmm, mut con) =
        start_disk_guest(dir.path(), "e", &uri, "hb=0 disk=write flush=1 qd=4");
    let (durable_before, _) = wait_durable(&mut con, 200);
    srv.kill();
    // Past the limit the guest sees errors.
    let deadline = Instant::now() + T;
    loop {
        let s = con.ask(b's', "STATUS");
        if num(&s, "disk_errors") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no I/O error past the stall limit: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    con.wait_line("DISK error", T);
    // The server comes back: the disk reconnects by itself and the writer carries on.
    let _srv = qemu_nbd(dir.path(), &img, port, 1);
    let (durable, _) = wait_durable(&mut con, durable_before + 200);
    verify(&mut con);
    con.send(b'p');
    assert!(vmm.wait(T).success());
    drop(con);
    image_holds(dir.path(), &img, durable);
}
