//! VM disks on a file server's share: hosts and the file server in network namespaces, real
//! daemons, mutual TLS (NBD STARTTLS with the cluster's certificates), real KVM, the test
//! guest's disk writer and verifier.

mod common;

use std::time::{Duration, Instant};

use common::hosts::*;
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

struct Lab {
    h: Hosts,
    fs: ferry_lab::LabFileServer,
}

impl Lab {
    fn new() -> Lab {
        let mut h = Hosts::new(2);
        let fs = h
            .lab
            .add_file_server(std::path::Path::new(ferry_bin()))
            .expect("adding a file server to the lab");
        Lab { h, fs }
    }

    /// Share `vms`, writable by `hosts`.
    fn vms_share(&self, hosts: &[&str]) {
        self.share(&["share", "create", "vms"]);
        for h in hosts {
            self.share(&["share", "grant", "vms", h, "write"]);
        }
    }

    fn server(&self) -> String {
        format!("unix:{}", self.fs.socket().display())
    }

    /// `ferry --server FS ARGS` as the file server's local admin.
    fn share(&self, args: &[&str]) -> String {
        let s = self.server();
        let mut a = args.to_vec();
        a.extend(["--server", s.as_str()]);
        self.h.ok(&a)
    }

    fn disk(&self, d: &str) -> Value {
        let out = self.share(&["--json", "disk", "show", d]);
        serde_json::from_str(&out).unwrap()
    }

    fn uri(&self, d: &str) -> String {
        format!("nbds://{}/{d}", self.fs.nbd_addr())
    }

    fn fs_log(&self) -> String {
        std::fs::read_to_string(self.fs.state_dir.with_extension("log")).unwrap_or_default()
    }
}

fn status_num(g: &Guest, key: &str) -> u64 {
    let s = g.con.ask(b's', "STATUS", T).unwrap();
    field(&s, key)
        .unwrap_or_else(|| panic!("no {key} in {s}"))
        .parse()
        .unwrap()
}

/// As [`Guest::wait_durable`], with the hosts' and the file server's logs when it fails.
fn wait_durable_or_logs(l: &Lab, g: &Guest, at_least: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let s = g.con.ask(b's', "STATUS", T).unwrap();
        let d: u64 = field(&s, "disk_durable").unwrap().parse().unwrap();
        let bad = field(&s, "disk_errors").as_deref() != Some("0");
        if bad || Instant::now() > deadline {
            panic!(
                "the disk writer failed or stalled: {s}\n{}\n{}",
                l.h.logs(),
                l.fs_log()
            );
        }
        if d >= at_least {
            return d;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disk_verify(g: &Guest) {
    let d = g.con.ask(b'd', "DISK VERIFY", T).unwrap();
    assert!(d.starts_with("DISK VERIFY OK"), "{d}");
}

fn share_guest<'a>(l: &Lab, host: &'a str, disk_arg: &'a str) -> Guest {
    l.h.guest(GuestSpec {
        host,
        disk: false,
        cmdline: "dirty=16 rate=2000 disk=write flush=1 qd=4",
        extra: vec!["--disk", disk_arg],
        ..Default::default()
    })
}

#[test]
fn a_vm_on_a_share_moves_memory_only_and_the_write_lease_follows_it() {
    if !kvm_available() {
        return;
    }
    let l = Lab::new();
    l.vms_share(&["hv1", "hv2"]);
    let made = l.share(&["disk", "create", "vms/web01", "--size", "256M"]);
    assert!(made.contains("--disk nbds://"), "{made}");
    let uri = l.uri("vms/web01");
    let mut g = share_guest(&l, "hv1", &uri);
    let before = g.wait_durable(200);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv1", "{d}");
    let fence = d["lease"]["fence"].as_u64().unwrap();

    let out = l.h.ferry(&["--json", "move", "web01", "--to", "hv2"]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), l.h.logs());
    g.follow_on(&l.h, "hv2");
    // The guest goes on writing on hv2, over the same disk: only memory moved.
    let after = g.wait_durable(before + 300);
    assert!(after > before);
    let v = g.con.ask(b'v', "VERIFY", T).unwrap();
    assert!(v.starts_with("VERIFY OK"), "{v}");
    disk_verify(&g);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv2", "the lease follows the VM: {d}");
    assert!(
        d["lease"]["fence"].as_u64().unwrap() > fence,
        "the fence rises on every hand-over: {d}"
    );
    assert!(l.h.vm("hv1", "web01").is_none(), "gone from hv1");
    assert_eq!(status_num(&g, "disk_errors"), 0);
    // The guest powers itself off: its host gives the lease up (so another host may start it).
    g.con.send(b'p').unwrap();
    l.h.wait_state("hv2", "web01", "stopped", T);
    let deadline = Instant::now() + T;
    while l.disk("vms/web01")["lease"]["holder"] != Value::Null {
        assert!(
            Instant::now() < deadline,
            "the lease stayed: {}",
            l.disk("vms/web01")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_post_copy_move_hands_the_share_disk_s_lease_over_as_the_guest_starts_there() {
    if !kvm_available() {
        return;
    }
    let l = Lab::new();
    l.vms_share(&["hv1", "hv2"]);
    l.share(&["disk", "create", "vms/web01", "--size", "256M"]);
    let uri = l.uri("vms/web01");
    let mut g = share_guest(&l, "hv1", &uri);
    let before = g.wait_durable(200);
    let fence = l.disk("vms/web01")["lease"]["fence"].as_u64().unwrap();

    // Under a cap, post-copy's pages take a while after the guest has started on hv2; its
    // writes must not wait for them, so the lease goes over as it starts.
    let out = l.h.ferry(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--mode",
        "postcopy",
        "--bandwidth-mbit",
        "100",
    ]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), l.h.logs());
    assert_eq!(r["migration"]["mode"], "postcopy", "{r}");
    // hv1's daemon logs the move's end just after it told the CLI.
    let deadline = Instant::now() + T;
    let (logs, done) = loop {
        let logs = l.h.daemon_log("hv1");
        if let Some(at) = logs.find("web01 runs on hv2 now") {
            break (logs, at);
        }
        assert!(Instant::now() < deadline, "no end logged:\n{logs}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let handed = logs
        .find("handed over to hv2")
        .unwrap_or_else(|| panic!("no hand-over logged:\n{logs}"));
    assert!(
        handed < done,
        "the lease went over before the last page had:\n{logs}"
    );
    g.follow_on(&l.h, "hv2");
    let after = wait_durable_or_logs(&l, &g, before + 300);
    assert!(after > before);
    let v = g.con.ask(b'v', "VERIFY", T).unwrap();
    assert!(v.starts_with("VERIFY OK"), "{v}");
    disk_verify(&g);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv2", "{d}");
    assert!(d["lease"]["fence"].as_u64().unwrap() > fence, "{d}");
    assert_eq!(status_num(&g, "disk_errors"), 0);
    assert!(l.h.vm("hv1", "web01").is_none(), "gone from hv1");
}

#[test]
fn the_file_server_refuses_strangers_readers_writing_and_stale_writers() {
    if !kvm_available() {
        return;
    }
    let l = Lab::new();
    l.vms_share(&["hv1"]);
    l.share(&["disk", "create", "vms/web01", "--size", "256M"]);
    let uri = l.uri("vms/web01");
    let kernel = l.h.dir.path().join("k.elf");
    std::fs::write(&kernel, ferry_testguest::elf()).unwrap();
    let k = kernel.to_str().unwrap();

    // hv2 is not on the access list: it cannot take the lease, the VM does not start.
    let out = l.h.ferry(&[
        "--host", "hv2", "vm", "create", "db01", "--kernel", k, "--memory", "128", "--disk", &uri,
        "--start",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("hv2 may not write share vms"),
        "{}",
        text(&out)
    );
    // Nor can it open the disk at all (a VMM on hv2 with hv2's certificate).
    l.h.ok(&["--host", "hv2", "vm", "delete", "db01"]);
    let ro = format!("{uri},readonly");
    let out = l.h.ferry(&[
        "--host", "hv2", "vm", "create", "db01", "--kernel", k, "--memory", "128", "--disk", &ro,
        "--start",
    ]);
    // The VMM on hv2 (hv2's certificate) is refused at the NBD handshake and ends: reported
    // as crashed with the file server's reason.
    let deadline = Instant::now() + T;
    loop {
        let shown = text(&l.h.ferry(&["--host", "hv2", "vm", "show", "db01"]));
        if shown.contains("access list") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a host off the list opened the disk: {}\n{shown}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        l.fs_log().contains("not on share vms's access list"),
        "{}",
        l.fs_log()
    );
    let _ =
        l.h.ferry(&["--host", "hv2", "vm", "stop", "--force", "db01"]);
    let _ = l.h.ferry(&["--host", "hv2", "vm", "delete", "db01"]);

    // A reader may read but not write: a writable disk is refused at open.
    l.share(&["share", "grant", "vms", "hv2", "read"]);
    let out = l.h.ferry(&[
        "--host", "hv2", "vm", "create", "db02", "--kernel", k, "--memory", "128", "--disk", &uri,
        "--start",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("may not write"), "{}", text(&out));

    // hv1 writes; an admin breaks its lease (as for a host gone for good): from then on the
    // file server refuses hv1's writes, whatever hv1's VMM does.
    let g = share_guest(&l, "hv1", &uri);
    g.wait_durable(200);
    // A disk being written is not copied (the copy would be torn).
    let s = l.server();
    let out =
        l.h.ferry(&["disk", "copy", "vms/web01", "vms/torn", "--server", &s]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("holds the lease"), "{}", text(&out));
    assert!(!l.fs.state_dir.join("shares/vms/torn.raw").exists());
    l.share(&["disk", "break-lease", "vms/web01"]);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], Value::Null, "{d}");
    std::thread::sleep(Duration::from_millis(500));
    let img = l.fs.state_dir.join("shares/vms/web01.raw");
    let sum = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
            (h ^ x as u64).wrapping_mul(0x100000001b3)
        })
    };
    let a = sum(&img);
    let durable = status_num(&g, "disk_durable");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sum(&img), a, "a stale writer changed the disk");
    assert_eq!(
        status_num(&g, "disk_durable"),
        durable,
        "writes were acknowledged without the lease"
    );
    assert!(l.fs_log().contains("refused a write"), "{}", l.fs_log());
    l.h.ok(&["vm", "stop", "--force", "web01"]);
    // Everything hv1 had durable before the break is intact: a reader checks.
    let v = l.h.guest(GuestSpec {
        name: "check",
        host: "hv2",
        disk: false,
        cmdline: "disk=verify",
        extra: vec!["--disk", &ro],
        ..Default::default()
    });
    let d = v.con.ask(b'd', "DISK VERIFY", T).unwrap();
    assert!(d.starts_with("DISK VERIFY OK"), "{d}");
    let n: u64 = field(&d, "records").unwrap().parse().unwrap();
    assert!(n >= durable, "{d}: {durable} records were durable");
}

#[test]
fn the_file_server_restarting_under_guest_io_stalls_it_and_loses_nothing() {
    if !kvm_available() {
        return;
    }
    let mut l = Lab::new();
    l.vms_share(&["hv1"]);
    l.share(&["disk", "create", "vms/web01", "--size", "256M"]);
    let uri = l.uri("vms/web01");
    let g = share_guest(&l, "hv1", &uri);
    let before = g.wait_durable(200);
    let fence = l.disk("vms/web01")["lease"]["fence"].as_u64().unwrap();
    l.h.lab.file_server_proc(0).unwrap().kill();
    std::thread::sleep(Duration::from_secs(3));
    // Stalled, not failed; the guest itself runs on (its console answers).
    let s = g.con.ask(b's', "STATUS", T).unwrap();
    assert_eq!(field(&s, "disk_errors").as_deref(), Some("0"), "{s}");
    let fs = l.fs.clone();
    let p =
        l.h.lab
            .start_file_server(std::path::Path::new(ferry_bin()), &fs)
            .unwrap();
    l.h.lab.set_file_server_proc(0, p);
    // The lease survived the restart (it is in the catalogue), so the same VMM writes on.
    let after = g.wait_durable(before + 300);
    assert!(after > before);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv1", "{d}");
    assert_eq!(d["lease"]["fence"].as_u64().unwrap(), fence, "{d}");
    disk_verify(&g);
    let v = g.con.ask(b'v', "VERIFY", T).unwrap();
    assert!(v.starts_with("VERIFY OK"), "{v}");
}

#[test]
fn a_disk_copy_keeps_holes_and_every_byte() {
    let l = Lab::new();
    l.share(&["share", "create", "vms"]);
    l.share(&["share", "create", "backup"]);
    l.share(&["disk", "create", "vms/a", "--size", "64M"]);
    // Data at 0, a hole, data at 40 MiB (written on the share's folder, as a VM would have).
    let src = l.fs.state_dir.join("shares/vms/a.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[0x11; 1 << 20], 0).unwrap();
        f.write_all_at(&[0x22; 4096], 40 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let out = l.share(&["--json", "disk", "copy", "vms/a", "backup/a-copy"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    let copied = r["bytes_copied"].as_u64().unwrap();
    let skipped = r["bytes_skipped"].as_u64().unwrap();
    assert_eq!(copied + skipped, 64 << 20, "{r}");
    assert!(copied < 8 << 20, "holes were copied: {r}");
    let dst = l.fs.state_dir.join("shares/backup/a-copy.raw");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(r["disk"]["export"], "backup/a-copy");
    // The copy is sparse too.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
    // An existing name is refused, and nothing changes.
    let s = l.server();
    let again =
        l.h.ferry(&["disk", "copy", "vms/a", "backup/a-copy", "--server", &s]);
    assert!(!again.status.success());
    assert!(text(&again).contains("exists already"), "{}", text(&again));
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

fn vm_disk(l: &Lab, host: &str, i: usize) -> String {
    l.h.vm(host, "web01").unwrap()["config"]["disks"][i]["path"]
        .as_str()
        .unwrap()
        .to_string()
}

fn share_disks(l: &Lab, share: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&l.share(&["--json", "share", "show", share])).unwrap();
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_running_vm_s_disk_moves_to_a_share_then_with_the_vm_then_back_to_a_host() {
    if !kvm_available() {
        return;
    }
    let l = Lab::new();
    l.vms_share(&["hv1", "hv2"]);
    let mut g = l.h.guest(GuestSpec {
        memory: 128,
        cmdline: "dirty=16 rate=2000",
        ..Default::default()
    });
    let local = vm_disk(&l, "hv1", 0);
    let before = g.wait_durable(100);

    // The VM to hv2 and its disk onto the share, in one command (disks first, then the VM),
    // while the writer runs.
    let out = l.h.ferry(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--storage-to",
        "fs1:vms",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), l.h.logs());
    let reports: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(reports.len(), 2, "one report per step: {}", text(&out));
    assert_eq!(reports[0]["to"], "hv1", "the disks moved first, on hv1");
    assert_eq!(reports[0]["disks"][0]["old_copy"], "removed");
    assert_eq!(reports[1]["to"], "hv2");
    assert_eq!(reports[1]["result"], "done");
    g.follow_on(&l.h, "hv2");
    assert_eq!(
        vm_disk(&l, "hv2", 0),
        l.uri("vms/web01.img"),
        "the VM's disk is on the share"
    );
    assert!(
        !std::path::Path::new(&local).exists(),
        "the old copy was removed"
    );
    let mid = wait_durable_or_logs(&l, &g, before + 200);
    assert_eq!(
        l.disk("vms/web01.img")["lease"]["holder"],
        "hv2",
        "the lease followed the VM"
    );
    // From the share into a folder of the other host, with the VM: one shared-nothing move
    // (only checked here; tests/shared_nothing.rs runs them).
    let hv1_disks = l.h.dir.path().join("hv1-disks");
    std::fs::create_dir(&hv1_disks).unwrap();
    let out = l.h.ok(&[
        "--host",
        "hv2",
        "move",
        "web01",
        "--to",
        "hv1",
        "--storage-to",
        hv1_disks.to_str().unwrap(),
        "--check",
    ]);
    assert!(out.contains("-> hv1:"), "{out}");

    // Share -> hv2's own disk: the share's copy and its lease go.
    let back = l.h.dir.path().join("hv2-disks");
    std::fs::create_dir(&back).unwrap();
    let out = l.h.ferry(&[
        "--json",
        "--host",
        "hv2",
        "move",
        "web01",
        "--storage-to",
        back.to_str().unwrap(),
    ]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), l.h.logs());
    assert_eq!(r["disks"][0]["old_copy"], "removed", "{r}");
    assert_eq!(
        vm_disk(&l, "hv2", 0),
        back.join("web01.img").display().to_string()
    );
    assert!(
        share_disks(&l, "vms").is_empty(),
        "the share's copy was removed"
    );
    g.wait_durable(mid + 200);
    g.verify(0);
}

#[test]
fn a_storage_move_to_a_share_that_goes_away_fails_and_leaves_the_vm_on_its_disks() {
    if !kvm_available() {
        return;
    }
    let mut l = Lab::new();
    l.vms_share(&["hv1"]);
    // A second disk full of data, so the copy takes a while at 40 Mbit/s.
    let data = l.h.dir.path().join("data.img");
    let bytes: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(&data, &bytes).unwrap();
    let data_arg = data.display().to_string();
    let g = l.h.guest(GuestSpec {
        memory: 128,
        cmdline: "dirty=16 rate=2000",
        extra: vec!["--disk", &data_arg],
        ..Default::default()
    });
    let local = vm_disk(&l, "hv1", 0);
    let before = g.wait_durable(100);
    let child = l.h.spawn(&[
        "--json",
        "move",
        "web01",
        "--storage-to",
        "vms",
        "--bandwidth-mbit",
        "40",
    ]);
    let deadline = Instant::now() + T;
    while share_disks(&l, "vms").len() < 2 || {
        let v = l.h.json(&["move", "list"]);
        v["moves"].as_array().unwrap().last().unwrap()["storage"]
            .as_array()
            .is_none_or(|s| s.iter().all(|x| x["copied_bytes"] == 0))
    } {
        assert!(Instant::now() < deadline, "the copy never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The file server dies mid-copy.
    l.h.lab.file_server_proc(0).unwrap().kill();
    let out = child.wait_with_output().unwrap();
    let r = report(&out);
    assert_eq!(r["result"], "failed", "{}", text(&out));
    assert_eq!(r["runs_on"], "hv1");
    assert_eq!(vm_disk(&l, "hv1", 0), local, "the VM stays on its disk");
    assert_eq!(vm_disk(&l, "hv1", 1), data_arg);
    assert!(
        std::fs::read(&data).unwrap() == bytes,
        "the data disk is as it was"
    );
    // The guest never saw an error and goes on writing to its own disk.
    let mid = g.wait_durable(before + 200);
    assert_eq!(l.h.state("hv1", "web01"), "running");
    // The file server comes back: the half-made copies on it are removed.
    let fs = l.fs.clone();
    let p =
        l.h.lab
            .start_file_server(std::path::Path::new(ferry_bin()), &fs)
            .unwrap();
    l.h.lab.set_file_server_proc(0, p);
    let deadline = Instant::now() + T;
    while !share_disks(&l, "vms").is_empty() {
        assert!(
            Instant::now() < deadline,
            "half-made copies stayed: {:?}",
            share_disks(&l, "vms")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    g.wait_durable(mid + 100);
    g.verify(0);
}

/// `curl` in `host`'s namespace with that host's own certificate and key, against the file
/// server's API: what a misbehaving host could ask, not what ferry's client does.
fn as_host(l: &Lab, host: &str, path: &str, body: &Value) -> (u16, String) {
    let lh = l.h.lab.hosts.iter().find(|h| h.name == host).unwrap();
    let tls = lh.state_dir.join("tls");
    let out = ferry_lab::Lab::exec(&lh.ns)
        .args([
            "curl",
            "-sS",
            "-k",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cert",
        ])
        .arg(tls.join("me.crt"))
        .arg("--key")
        .arg(tls.join("me.key"))
        .args(["-H", "content-type: application/json", "--data"])
        .arg(body.to_string())
        .arg(format!("https://{}{path}", l.fs.api_addr()))
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = t.rsplit_once('\n').unwrap_or((&t, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn a_delegated_move_hands_the_share_disk_s_lease_over_only_under_its_grant() {
    if !kvm_available() {
        return;
    }
    let l = Lab::new();
    l.vms_share(&["hv1", "hv2"]);
    l.share(&["disk", "create", "vms/web01", "--size", "256M"]);
    l.share(&["disk", "create", "vms/other", "--size", "16M"]);
    for host in ["hv1", "hv2"] {
        l.h.ok(&[
            "--host",
            host,
            "host",
            "set",
            "--migration-auth",
            "delegated",
        ]);
    }
    let uri = l.uri("vms/web01");
    let mut g = share_guest(&l, "hv1", &uri);
    let before = g.wait_durable(200);
    let fence = l.disk("vms/web01")["lease"]["fence"].as_u64().unwrap();
    // The admin signs a grant for this move (the VM, hv1 -> hv2, its disk) and moves it from
    // the client namespace.
    let admin = l.h.admin_dir();
    let out = l.h.remote(
        &admin,
        &[
            "grant", "--vm", "web01", "--from", "hv1", "--to", "hv2", "--disk", &uri,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let gf = l.h.dir.path().join("grant");
    std::fs::write(&gf, &token).unwrap();
    let out = l.h.remote(
        &admin,
        &[
            "--json",
            "move",
            "web01",
            "--to",
            "hv2",
            "--grant",
            gf.to_str().unwrap(),
        ],
    );
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), l.h.logs());
    assert!(r["auth"].as_str().unwrap().contains("grant"), "{r}");
    g.follow_on(&l.h, "hv2");
    let after = wait_durable_or_logs(&l, &g, before + 300);
    assert!(after > before);
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv2", "{d}");
    assert!(d["lease"]["fence"].as_u64().unwrap() > fence, "{d}");
    let fence = d["lease"]["fence"].as_u64().unwrap();
    // The file server saw the grant on both sides of the hand-over.
    let audit = std::fs::read_to_string(l.fs.state_dir.join("audit.jsonl")).unwrap();
    let jti = {
        use base64::Engine;
        let p = token.split('.').nth(1).unwrap();
        let c: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap(),
        )
        .unwrap();
        c["jti"].as_str().unwrap().to_string()
    };
    for side in [
        "handover lease of vms/web01 to hv2",
        "acquire lease of vms/web01",
    ] {
        assert!(
            audit
                .lines()
                .any(|e| e.contains(side) && e.contains(&jti) && !e.contains("refused\":\"")),
            "{side} under grant {jti}:\n{audit}"
        );
    }

    // hv2, with its own certificate, tries to use the grant beyond the move: another disk of
    // the share (free, and hv2 may write the share), then the moved disk again.
    let lease = |disk: &str| format!("/v1/shares/vms/disks/{disk}/lease");
    let body = serde_json::json!({"action": "acquire", "grant": token});
    let (code, b) = as_host(&l, "hv2", &lease("other"), &body);
    assert_eq!(code, 403, "{b}");
    assert!(b.contains("does not name disk vms/other"), "{b}");
    let (code, b) = as_host(&l, "hv2", &lease("web01"), &body);
    assert_eq!(code, 403, "{b}");
    assert!(b.contains("hands disk vms/web01 to nobody"), "{b}");
    // hv1 cannot hand the disk over under it again (it did once; it does not hold it now).
    let body = serde_json::json!({"action": "hand_over", "to": "hv2", "grant": token});
    let (code, b) = as_host(&l, "hv1", &lease("web01"), &body);
    assert_eq!(code, 403, "{b}");
    assert!(b.contains("once already"), "{b}");
    // An altered grant is not the admin's.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let body = serde_json::json!({"action": "acquire", "grant": forged});
    let (code, b) = as_host(&l, "hv2", &lease("other"), &body);
    assert_eq!(code, 403, "{b}");
    // Nothing changed: the other disk is free at its fence, the moved one hv2's, and the guest
    // writes on.
    let o = l.disk("vms/other");
    assert_eq!(
        (o["lease"]["holder"].clone(), o["lease"]["fence"].as_u64()),
        (Value::Null, Some(0)),
        "{o}"
    );
    let d = l.disk("vms/web01");
    assert_eq!(d["lease"]["holder"], "hv2", "{d}");
    assert_eq!(d["lease"]["fence"].as_u64(), Some(fence), "{d}");
    let audit = std::fs::read_to_string(l.fs.state_dir.join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|e| e.contains("acquire lease of vms/other") && e.contains("does not name")),
        "every refusal is audited:\n{audit}"
    );
    wait_durable_or_logs(&l, &g, after + 100);
    let v = g.con.ask(b'v', "VERIFY", T).unwrap();
    assert!(v.starts_with("VERIFY OK"), "{v}");
    disk_verify(&g);
    assert!(l.h.vm("hv1", "web01").is_none(), "gone from hv1");
}
