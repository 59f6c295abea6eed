//! Virtio disks and network end to end: real KVM, the test guest's own drivers, real files,
//! real taps on bridges in network namespaces, real TCP from another namespace.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::netns::Lab;
use common::*;

const T: Duration = Duration::from_secs(60);

fn wait_durable(con: &mut Console, at_least: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let s = con.ask(b's', "STATUS");
        let d = num(&s, "disk_durable");
        assert_eq!(num(&s, "disk_errors"), 0, "{s}");
        if d >= at_least {
            return d;
        }
        assert!(Instant::now() < deadline, "disk writer stalled: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Written through two request queues (the device offers them, the guest's driver takes
/// VIRTIO_BLK_F_MQ and alternates), verified after a restart through one (a one-vCPU VM's
/// default).
#[test]
fn disk_writes_survive_a_restart_and_verify() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let disk = disk_image(dir.path(), 32);
    let (mut vmm, mut con) = start_disk_guest(
        dir.path(),
        "w",
        &format!("{},queues=2", disk.display()),
        "hb=0 disk=write flush=8 qd=8 blkq=2",
    );
    let found = con.wait_line("DISK found=", T);
    assert_eq!(
        num(&found, "found"),
        0,
        "a fresh disk holds nothing: {found}"
    );
    assert!(found.contains("serial=\"ferry-disk0\""), "{found}");
    assert_eq!(num(&found, "queues"), 2, "{found}");
    let durable = wait_durable(&mut con, 500);
    let v = con.ask(b'd', "DISK VERIFY");
    assert!(v.starts_with("DISK VERIFY OK"), "{v}");
    con.send(b'p');
    assert!(vmm.wait(T).success());
    drop(con);

    let (mut vmm, mut con) = start_disk_guest(
        dir.path(),
        "v",
        disk.to_str().unwrap(),
        "hb=0 disk=verify blkq=4",
    );
    let found = con.wait_line("DISK found=", T);
    assert!(
        num(&found, "found") >= durable,
        "{found}, but {durable} records were durable"
    );
    assert_eq!(
        num(&found, "queues"),
        1,
        "one vCPU, no queues= given: one queue, whatever the driver asks: {found}"
    );
    let v = con.ask(b'd', "DISK VERIFY");
    assert!(v.starts_with("DISK VERIFY OK"), "{v}");
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

/// The guest's benchmark mode (what `ferry bench io` measures with): each kind keeps its
/// requests going with no errors (a write-then-flush counts flushes), and the writes reach
/// the image.
#[test]
fn the_guest_s_benchmark_mode_keeps_each_kind_of_request_going() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let disk = disk_image(dir.path(), 16);
    for (k, io) in [
        "io=randread bs=4096 qd=16",
        "io=randwrite bs=4096 qd=1",
        "io=read bs=1048576 qd=4",
        "io=write bs=1048576 qd=4",
        "io=flush",
    ]
    .into_iter()
    .enumerate()
    {
        let cmdline = format!("hb=0 disk=bench {io}");
        let (mut vmm, mut con) = start_disk_guest(
            dir.path(),
            &format!("b{k}"),
            disk.to_str().unwrap(),
            &cmdline,
        );
        let found = con.wait_line("DISK found=", T);
        assert!(found.contains("capacity=4096"), "{found}");
        let s0 = con.ask(b's', "STATUS");
        std::thread::sleep(Duration::from_millis(300));
        let s1 = con.ask(b's', "STATUS");
        assert_eq!(num(&s1, "disk_errors"), 0, "{io}: {s1}");
        let done = num(&s1, "disk_acked") - num(&s0, "disk_acked");
        assert!(
            done >= 10,
            "{io}: only {done} requests in 300 ms: {s0} / {s1}"
        );
        con.send(b'p');
        assert!(vmm.wait(T).success());
    }
    // The writers' requests reached the image (a sparse file before: blocks were allocated for
    // them), and nothing beyond the disk's end was touched.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&disk).unwrap();
    assert_eq!(m.len(), 16 << 20);
    assert!(m.blocks() * 512 >= 4 << 20, "{} blocks", m.blocks());
}

#[test]
fn flushed_writes_survive_sigkill_of_the_vmm() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let disk = disk_image(dir.path(), 32);
    let (mut vmm, mut con) = start_disk_guest(
        dir.path(),
        "k",
        disk.to_str().unwrap(),
        "hb=0 disk=write flush=1 qd=4",
    );
    let durable = wait_durable(&mut con, 200);
    vmm.kill(); // SIGKILL
    drop(con);
    let (mut vmm, mut con) =
        start_disk_guest(dir.path(), "k2", disk.to_str().unwrap(), "hb=0 disk=verify");
    let found = con.wait_line("DISK found=", T);
    assert!(
        num(&found, "found") >= durable,
        "{found}: {durable} flushed records must survive"
    );
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

#[test]
fn a_second_writer_is_refused_naming_the_holder() {
    if !kvm_available() {
        return;
    }
    let dir = tmp();
    let disk = disk_image(dir.path(), 8);
    let (mut vmm, mut con) =
        start_disk_guest(dir.path(), "a", disk.to_str().unwrap(), "hb=0 disk=verify");
    let kernel = testguest(dir.path());
    let out = ferry_output(
        &[
            "vmm",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--serial",
            "null",
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("in use by process") && err.contains(&vmm.proc.pid().to_string()),
        "{err}"
    );
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

fn net_vmm(lab: &Lab, dir: &std::path::Path, tag: &str, extra: &[&str]) -> (Vmm, Console) {
    let kernel = testguest(dir);
    let mut args = vec![
        "vmm",
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "128",
        "--net",
        "bridge=br0",
    ];
    args.extend_from_slice(extra);
    let vmm = Vmm::spawn_in(&lab.in_host(), dir, tag, &args);
    let con = Console::connect(&vmm.com1);
    vmm.ctl_ok("resume", &[]);
    (vmm, con)
}

#[test]
fn tcp_echo_and_stream_from_another_namespace() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::new();
    let dir = tmp();
    let cmd = format!("hb=0 ip={}/24", lab.guest_ip);
    let (mut vmm, mut con) = net_vmm(&lab, dir.path(), "n", &["--cmdline", &cmd]);
    let up = con.wait_line("NET up", T);
    assert!(up.contains(&lab.guest_ip), "{up}");
    // ferry's card offers checksum offload through the tap's header and the guest takes it:
    // every TCP segment below goes out for the host kernel to checksum.
    assert!(up.contains("csum=offload"), "{up}");
    con.wait_line("READY", T);

    let mut echo = lab.connect_from_client(7, T);
    echo.set_read_timeout(Some(T)).unwrap();
    for round in 0..50u32 {
        let msg: Vec<u8> = (0..(1 + round * 97) as usize)
            .map(|i| (i as u32 ^ round) as u8)
            .collect();
        echo.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        echo.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echo round {round}");
    }

    let stream = lab.connect_from_client(19, T);
    stream.set_read_timeout(Some(T)).unwrap();
    let mut stream = Stream::new(stream);
    stream.read(8 << 20).unwrap();
    let s = con.ask(b's', "STATUS");
    assert!(num(&s, "tcp_conns") >= 1, "{s}");
    drop((echo, stream));
    con.send(b'p');
    assert!(vmm.wait(T).success());
}

#[test]
fn save_and_restore_keep_the_disk_writer_and_a_tcp_stream_going() {
    if !kvm_available() {
        return;
    }
    let lab = Lab::new();
    let dir = tmp();
    let disk = disk_image(dir.path(), 64);
    let cmd = format!("hb=2 ip={}/24 disk=write flush=4 qd=4", lab.guest_ip);
    let disk_arg = disk.to_str().unwrap().to_string();
    let (vmm, mut con) = net_vmm(
        &lab,
        dir.path(),
        "src",
        &["--cmdline", &cmd, "--disk", &disk_arg],
    );
    con.wait_line("READY", T);
    let stream = lab.connect_from_client(19, T);
    stream.set_read_timeout(Some(T)).unwrap();
    let mut stream = Stream::new(stream);
    stream.read(1 << 20).unwrap();
    let before = wait_durable(&mut con, 100);

    let snap = dir.path().join("snap");
    vmm.ctl_ok("save", &[snap.to_str().unwrap()]);
    vmm.ctl_ok("quit", &[]);
    let mut vmm = vmm;
    assert!(vmm.wait(T).success());
    drop(con);

    // Same host, new process: the tap is made again on the bridge; the client's TCP
    // connection was never closed.
    let restored = Vmm::spawn_in(
        &lab.in_host(),
        dir.path(),
        "dst",
        &["vmm", "restore", snap.to_str().unwrap()],
    );
    let mut con = Console::connect(&restored.com1);
    restored.ctl_ok("resume", &[]);
    stream.read(4 << 20).unwrap();
    let after = wait_durable(&mut con, before + 100);
    assert!(after > before);
    let v = con.ask(b'd', "DISK VERIFY");
    assert!(v.starts_with("DISK VERIFY OK"), "{v}");
    con.send(b'p');
    let mut restored = restored;
    assert!(restored.wait(T).success());
}
