//! Security, as a table of attacks on a lab cluster (authority on hv1, every host enrolled,
//! every link mutual TLS): each asserts the refusal, its reason, and that nothing changed. Plus
//! the happy paths of both ways of authorising a move.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hosts::{report, text, GuestSpec, Hosts, T};
use common::kvm_available;
use ferry_auth::{pki, Credentials, Identity};

fn running_on(h: &Hosts, host: &str, vm: &str) {
    assert_eq!(h.state(host, vm), "running", "{vm} on {host}\n{}", h.logs());
}

fn refused(out: &std::process::Output, needle: &str) -> String {
    let t = text(out);
    assert!(!out.status.success(), "must be refused: {t}");
    assert!(t.contains(needle), "the refusal should say {needle:?}: {t}");
    t
}

/// Admin credentials for `name` from another authority (a stranger's cluster).
fn stranger(dir: &Path) -> PathBuf {
    let mut a = ferry_auth::authority::Authority::init(&dir.join("other-ca"), "other").unwrap();
    let id = Identity::admin("admin").unwrap();
    let t = a.token(&id, 60).unwrap();
    let (key, csr) = pki::new_request(&id).unwrap();
    let (_, e) = a.redeem(&t, &csr).unwrap();
    let d = dir.join("stranger");
    Credentials::save(&d, &key.serialize_pem(), &e).unwrap();
    d
}

/// Admin credentials signed by the lab's own CA but expired yesterday.
fn expired_admin(h: &Hosts) -> PathBuf {
    let adir = h.state_dir("hv1").join("authority");
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(adir.join("ca.key")).unwrap()).unwrap();
    let ca = std::fs::read_to_string(adir.join("ca.crt")).unwrap();
    let id = Identity::admin("admin").unwrap();
    let (k, csr) = pki::new_request(&id).unwrap();
    let nb = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let cert =
        pki::sign_request(&key, &ca, &csr, &id, 999_999, nb, time::Duration::days(1)).unwrap();
    let d = h.dir.path().join("expired");
    let doc = std::fs::read_to_string(adir.join("cluster.jwt")).unwrap();
    Credentials::save(
        &d,
        &k.serialize_pem(),
        &ferry_auth::authority::Enrolled { cert, ca, doc },
    )
    .unwrap();
    d
}

#[test]
fn strangers_are_refused_on_every_port_and_nothing_changes() {
    let h = Hosts::new(2);
    let before = h.json(&["--host", "hv1", "host", "show"]);
    let admin = h.admin_dir();
    // The real admin gets in over TLS.
    let ok = h.remote(&admin, &["--host", "hv1", "--json", "host", "show"]);
    assert!(ok.status.success(), "{}", text(&ok));

    // No certificate at all: openssl (not ferry) is refused by the server itself.
    let ca = admin.join("ca.crt");
    let mut s = ferry_lab::Lab::exec(&h.lab.client)
        .args([
            "openssl",
            "s_client",
            "-connect",
            "10.78.0.11:7700",
            "-servername",
            "hv1.ferry",
            "-CAfile",
        ])
        .arg(&ca)
        .arg("-quiet")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = s
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET /v1/host HTTP/1.1\r\nHost: hv1\r\nConnection: close\r\n\r\n");
    let out = s.wait_with_output().unwrap();
    let t = text(&out);
    assert!(
        !t.contains("HTTP/1.1"),
        "answered without a client certificate: {t}"
    );
    assert!(
        t.contains("alert") || t.contains("error"),
        "openssl saw the refusal: {t}"
    );

    // Plain HTTP against the TLS port: no answer.
    let mut c = ferry_vmm::host_io::connect_in_netns(
        &h.lab.client,
        "10.78.0.11:7700".parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /v1/host HTTP/1.1\r\nHost: hv1\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1 200"),
        "plaintext was served"
    );

    // ferry without credentials says what it needs.
    let out = h.remote(
        Path::new("/nonexistent"),
        &["--host", "10.78.0.11:7700", "host", "show"],
    );
    refused(&out, "takes an admin's credentials");
    // A certificate from another cluster's authority.
    let out = h.remote(
        &stranger(h.dir.path()),
        &[
            "--host",
            "10.78.0.11:7700",
            "host",
            "set",
            "--live-migration",
            "off",
        ],
    );
    refused(&out, "");
    // An expired certificate of this cluster.
    let out = h.remote(
        &expired_admin(&h),
        &["--host", "hv1", "host", "set", "--live-migration", "off"],
    );
    refused(&out, "");
    // An admin key others may read is not used, and the CLI says why.
    let loose = h.dir.path().join("loose");
    for f in ["me.key", "me.crt", "ca.crt", "cluster.jwt"] {
        std::fs::copy(admin.join(f), loose.join(f)).ok();
        if !loose.exists() {
            std::fs::create_dir_all(&loose).unwrap();
            std::fs::copy(admin.join(f), loose.join(f)).unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(loose.join("me.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = h.remote(&loose, &["--host", "hv1", "host", "show"]);
    let t = refused(&out, "chmod 600");
    assert!(t.contains("may be read by others"), "{t}");
    // Nothing changed.
    let after = h.json(&["--host", "hv1", "host", "show"]);
    assert_eq!(before["settings"], after["settings"]);
    assert_eq!(after["settings"]["live_migration"], true);
    let log = std::fs::read_to_string(h.lab.hosts[0].daemon_log()).unwrap();
    assert!(
        log.contains("refused a connection"),
        "the daemon logs refusals:\n{log}"
    );
}

#[test]
fn a_host_key_with_loose_permissions_is_refused_at_start() {
    let mut h = Hosts::new(2);
    use std::os::unix::fs::PermissionsExt;
    let key = h.state_dir("hv2").join("tls/me.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    h.lab.daemon(1).unwrap().kill();
    let mut p = h
        .lab
        .start_daemon(Path::new(common::ferry_bin()), 1, &[])
        .unwrap();
    assert!(p.wait_exit(T), "the daemon must not start");
    let log = p.log_text();
    assert!(log.contains("chmod 600") && log.contains("me.key"), "{log}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    h.restart_daemon(1, &[]);
}

#[test]
fn join_tokens_work_once_and_expire() {
    let h = Hosts::new(1);
    let token = |ttl: &str| {
        h.ok(&[
            "--host",
            "hv1",
            "cluster",
            "token",
            "--role",
            "admin",
            "--name",
            "bob",
            "--ttl-min",
            ttl,
        ])
        .trim()
        .to_string()
    };
    let t = token("15");
    let join = |t: &str, dir: &str| {
        let d = h.dir.path().join(dir);
        ferry_lab::Lab::exec(&h.lab.client)
            .arg(common::ferry_bin())
            .args([
                "admin",
                "join",
                "--authority",
                "10.78.0.11:7701",
                "--token",
                t,
                "--dir",
            ])
            .arg(&d)
            .output()
            .unwrap()
    };
    let out = join(&t, "bob");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("joined as admin bob"), "{}", text(&out));
    let bob = h.dir.path().join("bob");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bob.join("me.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    // Bob can manage the host remotely now.
    assert!(h
        .remote(&bob, &["--host", "hv1", "host", "show"])
        .status
        .success());
    refused(&join(&t, "bob2"), "used already");
    let short = token("0");
    std::thread::sleep(Duration::from_millis(1500));
    refused(&join(&short, "bob3"), "expired");
    // A token whose pin names another authority is not even sent.
    let t2 = token("15");
    let mut bad = t2.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == '0' { '1' } else { '0' });
    refused(&join(&bad, "bob4"), "pin mismatch");
    assert!(!h.dir.path().join("bob4/me.crt").exists());
    // The audit trail has them.
    let a = h.ok(&["--host", "hv1", "audit"]);
    assert!(a.contains("admin bob joined the cluster"), "{a}");
    assert!(a.contains("refused") && a.contains("used already"), "{a}");
}

#[test]
fn a_removed_host_is_refused_even_when_it_was_offline() {
    if !kvm_available() {
        return;
    }
    let mut h = Hosts::new(3);
    let g = h.guest(GuestSpec {
        host: "hv3",
        disk: false,
        ..Default::default()
    });
    g.verify(0);
    // hv3 is down when it is removed.
    h.lab.daemon(2).unwrap().kill();
    let out = h.ok(&["--host", "hv1", "host", "remove", "hv3"]);
    assert!(out.contains("host hv3 removed"), "{out}");
    h.restart_daemon(2, &[]);
    // It learns of it as soon as it is back (from the authority's enrolment port).
    let deadline = Instant::now() + T;
    loop {
        let c = h.json(&["--host", "hv3", "cluster", "show"]);
        if c["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "hv3")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hv3 never learnt it was removed: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And every other host refuses it.
    let out = h.ferry(&["--host", "hv3", "move", "web01", "--to", "hv2"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    running_on(&h, "hv3", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");
    let hv2 = std::fs::read_to_string(h.lab.hosts[1].daemon_log()).unwrap();
    assert!(
        hv2.contains("revoked") || hv2.contains("refused"),
        "hv2 refused hv3:\n{hv2}"
    );
    g.verify(0);
}

#[test]
fn moves_need_the_migration_group_and_in_console_mode_the_console() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    let admin = h.admin_dir();
    h.ok(&[
        "--host",
        "hv1",
        "cluster",
        "migration-group",
        "remove",
        "hv2",
    ]);
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    refused(&out, "migration group");
    running_on(&h, "hv1", "web01");
    h.ok(&["--host", "hv1", "cluster", "migration-group", "add", "hv2"]);
    // Console mode: a remote admin may not start a move, however valid their certificate.
    let out = h.remote(&admin, &["move", "web01", "--to", "hv2"]);
    let t = refused(&out, "accepts moves only from its own console");
    assert!(
        t.contains("--migration-auth delegated"),
        "says how to allow it: {t}"
    );
    running_on(&h, "hv1", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");
    let a = h.ok(&["--host", "hv1", "audit"]);
    assert!(
        a.contains("refused") && a.contains("admin admin") && a.contains("move web01 to hv2"),
        "{a}"
    );
    // On the console it works, encrypted.
    let out = h.ferry(&["--json", "move", "web01", "--to", "hv2"]);
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}", text(&out));
    assert_eq!(r["encrypted"], true);
    assert!(r["auth"].as_str().unwrap().contains("console"), "{r}");
    g.follow_on(&h, "hv2");
    g.verify(0);
}

#[test]
fn delegated_moves_need_a_valid_unused_grant_for_exactly_that_move() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(GuestSpec::default());
    let disk = g.disk.clone().unwrap().display().to_string();
    let admin = h.admin_dir();
    for host in ["hv1", "hv2"] {
        h.ok(&[
            "--host",
            host,
            "host",
            "set",
            "--migration-auth",
            "delegated",
        ]);
    }
    // No grant (the console has no admin key): refused in delegated mode.
    refused(&h.ferry(&["move", "web01", "--to", "hv2"]), "grant");
    let sign = |vm: &str, to: &str, d: &str, ttl: &str, name: &str| -> PathBuf {
        let mut a = vec![
            "grant", "--vm", vm, "--from", "hv1", "--to", to, "--ttl-s", ttl,
        ];
        if !d.is_empty() {
            a.extend(["--disk", d]);
        }
        let out = h.remote(&admin, &a);
        assert!(out.status.success(), "{}", text(&out));
        let f = h.dir.path().join(name);
        std::fs::write(&f, &out.stdout).unwrap();
        f
    };
    let attempt = |grant: &Path| {
        // The grant file must be readable inside the client namespace: it is (same filesystem).
        h.remote(
            &admin,
            &[
                "move",
                "web01",
                "--to",
                "hv2",
                "--grant",
                grant.to_str().unwrap(),
            ],
        )
    };
    for (what, vm, to, d, ttl, needle) in [
        ("expired", "web01", "hv2", disk.as_str(), "-60", "expired"),
        ("another VM", "db01", "hv2", disk.as_str(), "600", "VM db01"),
        (
            "another destination",
            "web01",
            "hv3",
            disk.as_str(),
            "600",
            "to hv3",
        ),
        (
            "another disk",
            "web01",
            "hv2",
            "/elsewhere.img",
            "600",
            "does not name disk",
        ),
        ("no disk", "web01", "hv2", "", "600", "does not name disk"),
    ] {
        let f = sign(vm, to, d, ttl, &format!("g-{}", what.replace(' ', "-")));
        let out = attempt(&f);
        let t = refused(&out, "grant refused");
        assert!(t.contains(needle), "{what}: {t}");
        running_on(&h, "hv1", "web01");
        assert_eq!(h.state("hv2", "web01"), "absent", "{what}");
    }
    // Altered: the payload changed, the signature kept.
    let good = sign("web01", "hv2", &disk, "600", "g-good");
    let tok = std::fs::read_to_string(&good).unwrap().trim().to_string();
    let p: Vec<&str> = tok.split('.').collect();
    use base64::Engine;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut body: serde_json::Value = serde_json::from_slice(&b.decode(p[1]).unwrap()).unwrap();
    body["exp"] = (body["exp"].as_i64().unwrap() + 86400).into();
    let forged = h.dir.path().join("g-forged");
    std::fs::write(
        &forged,
        format!("{}.{}.{}", p[0], b.encode(body.to_string()), p[2]),
    )
    .unwrap();
    refused(&attempt(&forged), "signature");
    // The good grant works: the happy path of delegated mode, by a remote admin.
    let out = attempt(&good);
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    g.follow_on(&h, "hv2");
    g.verify(0);
    // Back with a grant the CLI signs itself.
    let out = h.remote(&admin, &["--json", "move", "web01", "--to", "hv1"]);
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}", text(&out));
    assert!(r["auth"].as_str().unwrap().contains("grant"), "{r}");
    // Replayed: the destination has seen that grant already.
    let t = refused(&attempt(&good), "used already");
    assert!(t.contains("grant"), "{t}");
    g.follow_on(&h, "hv1");
    running_on(&h, "hv1", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");
    g.verify(0);
    let a = h.ok(&["--host", "hv2", "audit"]);
    assert!(
        a.contains("used already") && a.contains("signed by admin admin"),
        "{a}"
    );
    // A shared-nothing move under one grant: the copies hv2 makes count by the disks they
    // were copied from, which the grant names.
    let dest = h.dir.path().join("hv2-disks");
    std::fs::create_dir(&dest).unwrap();
    let d = dest.to_str().unwrap();
    let out = h.remote(
        &admin,
        &["--json", "move", "web01", "--to", "hv2", "--storage-to", d],
    );
    let r = report(&out);
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), h.logs());
    assert!(r["auth"].as_str().unwrap().contains("grant"), "{r}");
    g.follow_on(&h, "hv2");
    g.verify(0);
    assert!(dest.join("web01.img").exists() && !Path::new(&disk).exists());
}

#[test]
fn plaintext_only_where_both_hosts_trust_the_network() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    h.ok(&[
        "--host",
        "hv1",
        "host",
        "set",
        "--plaintext-migration-network",
        "10.78.0.0/24",
    ]);
    let r = report(&h.ferry(&["--json", "move", "web01", "--to", "hv2"]));
    assert_eq!(
        (r["result"].as_str(), r["encrypted"].as_bool()),
        (Some("done"), Some(true)),
        "one host is not enough: {r}"
    );
    h.ok(&[
        "--host",
        "hv1",
        "host",
        "set",
        "--plaintext-migration-network",
        "10.78.0.0/24",
    ]);
    h.ok(&[
        "--host",
        "hv2",
        "host",
        "set",
        "--plaintext-migration-network",
        "10.78.0.0/24",
    ]);
    let out = h.ferry(&["move", "web01", "--to", "hv1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("NOT encrypted"),
        "the report says so: {}",
        text(&out)
    );
    g.follow_on(&h, "hv1");
    g.verify(0);
    // A shared-nothing move on that network copies the disks in the clear too, and says so.
    let mut g = h.guest(GuestSpec {
        name: "db01",
        ..Default::default()
    });
    let dest = h.dir.path().join("hv2-disks");
    std::fs::create_dir(&dest).unwrap();
    let d = dest.to_str().unwrap();
    let out = h.ferry(&["--json", "move", "db01", "--to", "hv2", "--storage-to", d]);
    let r = report(&out);
    assert_eq!(
        (r["result"].as_str(), r["encrypted"].as_bool()),
        (Some("done"), Some(false)),
        "{}\n{}",
        text(&out),
        h.logs()
    );
    let log = std::fs::read_to_string(h.lab.hosts[1].daemon_log()).unwrap();
    assert!(
        log.contains("empty copies of db01's disks on nbd://"),
        "{log}"
    );
    assert!(log.contains("in the clear"), "{log}");
    g.follow_on(&h, "hv2");
    g.verify(0);
}

#[test]
fn a_captured_migration_stream_cannot_be_replayed_against_another_destination() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    let hv2 = h.lab.hosts[1].clone();
    // Capture what hv1's VMM sends to a listener posing as hv2's receiver.
    let l =
        ferry_vmm::host_io::in_netns(&hv2.ns, || std::net::TcpListener::bind("10.78.0.12:7791"))
            .unwrap();
    let cap = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        buf
    });
    let api = h.serial("hv1", "web01", 1).with_file_name("api");
    let out = h.ferry(&[
        "vmm",
        "migrate",
        "--api",
        api.to_str().unwrap(),
        "--to",
        "10.78.0.12:7791",
        "--tls-dir",
        h.state_dir("hv1").join("tls").to_str().unwrap(),
        "--tls-peer",
        "hv2",
        "--timeout",
        "10",
    ]);
    assert!(!out.status.success());
    let captured = cap.join().unwrap();
    assert!(!captured.is_empty(), "the source sent its TLS handshake");
    assert!(
        !captured.windows(4).any(|w| w == b"FMIG"),
        "nothing of the migration protocol is readable on the wire"
    );
    running_on(&h, "hv1", "web01");
    // Replay it against a real receiver on hv2: refused, nothing runs.
    let mut rx = common::Vmm::receive_with(
        &[
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            hv2.ns.clone(),
        ],
        h.dir.path(),
        "replay",
        "10.78.0.12:7792",
        &[
            "--tls-dir",
            h.state_dir("hv2").join("tls").to_str().unwrap(),
            "--expect-peer",
            "hv1",
            "--timeout",
            "4",
        ],
        &[],
    );
    let deadline = Instant::now() + T;
    while !rx.log().contains("waiting for a VM") {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = ferry_vmm::host_io::connect_in_netns(
        &hv2.ns,
        "10.78.0.12:7792".parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let _ = s.write_all(&captured);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let st = rx.wait(T);
    assert!(!st.success());
    let log = rx.log();
    assert!(log.contains("refused a connection"), "{log}");
    assert!(!log.contains("the guest runs here now"), "{log}");
    g.verify(0);
}
