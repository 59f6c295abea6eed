//! The host daemon on its own: VMs by name, a daemon restart, a VMM crash, the console, the
//! management API's answers (checked against the OpenAPI document) and its refusals.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::hosts::{text, GuestSpec, Hosts, T};
use common::kvm_available;
use serde_json::{json, Value};

/// One raw HTTP/1.1 request on a daemon's unix socket: (status, JSON body or Null).
fn http(h: &Hosts, host: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = UnixStream::connect(h.state_dir(host).join("hostd.sock")).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
        {
            chunked = true;
        }
        if l == "\r\n" {
            break;
        }
    }
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).unwrap();
    let bytes = if chunked { dechunk(&raw) } else { raw };
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)))
    };
    (code, v)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 4 + n..];
    }
    out
}

/// Check `v` against component `schema` of the OpenAPI document.
fn conforms(doc: &Value, schema: &str, v: &Value) {
    let s = ferry_api::openapi::component_schema(doc, schema);
    let validator =
        jsonschema::validator_for(&s).unwrap_or_else(|e| panic!("schema {schema}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{schema} does not match the answer:\n{}\n{v:#}",
        errors.join("\n")
    );
}

#[test]
fn real_answers_match_the_openapi_document() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let (code, doc) = http(&h, "hv1", "GET", "/v1/openapi.json", None);
    assert_eq!(code, 200);
    assert_eq!(
        doc,
        ferry_api::openapi::document(),
        "the daemon serves the document of its types"
    );
    let checked_in: Value = serde_json::from_str(include_str!("../../api/openapi.json")).unwrap();
    assert_eq!(doc, checked_in, "crates/api/openapi.json is current");
    // The validator really checks: a wrong answer is caught.
    let v =
        jsonschema::validator_for(&ferry_api::openapi::component_schema(&doc, "MoveInfo")).unwrap();
    assert!(
        !v.is_valid(&json!({"id": "x", "state": "flying"})),
        "a bad MoveInfo must fail"
    );
    let g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    let mut seen = 0;
    let mut check =
        |method: &str, path: &str, body: Option<Value>, want: u16, schema: &str| -> Value {
            let b = body.map(|b| b.to_string());
            let (code, v) = http(&h, "hv1", method, path, b.as_deref());
            assert_eq!(code, want, "{method} {path}: {v}");
            conforms(&doc, schema, &v);
            seen += 1;
            v
        };
    check("GET", "/v1/host", None, 200, "HostInfo");
    check(
        "PATCH",
        "/v1/host",
        Some(json!({"max_migrations": 3})),
        200,
        "HostInfo",
    );
    check("GET", "/v1/vms", None, 200, "VmList");
    check("GET", "/v1/vms/web01", None, 200, "VmInfo");
    check(
        "POST",
        "/v1/moves/check",
        Some(json!({"vm": "web01", "to": "hv2"})),
        200,
        "CheckReport",
    );
    let m = check(
        "POST",
        "/v1/moves",
        Some(json!({"vm": "web01", "to": "hv2"})),
        202,
        "MoveInfo",
    );
    let id = m["id"].as_str().unwrap().to_string();
    check("GET", &format!("/v1/moves/{id}"), None, 200, "MoveInfo");
    let deadline = Instant::now() + T;
    loop {
        let v = check("GET", &format!("/v1/moves/{id}"), None, 200, "MoveInfo");
        if v["state"] == "done" {
            conforms(&doc, "MoveReport", &v["report"]);
            break;
        }
        assert!(Instant::now() < deadline && v["state"] != "failed", "{v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    check("GET", "/v1/moves", None, 200, "MoveList");
    check("GET", "/v1/vms/web01", None, 404, "ErrorBody");
    check(
        "POST",
        "/v1/vms",
        Some(json!({"name": "x"})),
        400,
        "ErrorBody",
    );
    check(
        "POST",
        "/v1/evacuate",
        Some(json!({"to": ["hv2"]})),
        202,
        "EvacuateInfo",
    );
    let (code, v) = http(&h, "hv2", "GET", &format!("/v1/incoming/{id}"), None);
    assert_eq!(code, 200);
    conforms(&doc, "IncomingInfo", &v);
    assert_eq!(v["state"], "committed");
    let (code, v) = http(
        &h,
        "hv2",
        "POST",
        &format!("/v1/incoming/{id}/settle"),
        None,
    );
    assert_eq!(code, 200);
    conforms(&doc, "SettleReply", &v);
    assert_eq!(
        v["outcome"], "committed",
        "a committed move stays committed"
    );
    assert!(seen >= 12);
    drop(g);
}

#[test]
fn malformed_and_unknown_requests_get_4xx_with_a_reason_and_change_nothing() {
    let h = Hosts::with(2, false);
    let before = (
        http(&h, "hv1", "GET", "/v1/host", None).1["settings"].clone(),
        http(&h, "hv1", "GET", "/v1/vms", None).1,
    );
    let doc = ferry_api::openapi::document();
    for (method, path, body, want, needle) in [
        (
            "POST",
            "/v1/vms",
            Some("{not json"),
            400,
            "bad request body",
        ),
        (
            "POST",
            "/v1/vms",
            Some(r#"{"name":"a","config":{"kernel":"/k"},"frobnicate":1}"#),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/vms",
            Some(r#"{"name":"../etc","config":{"kernel":"/k"}}"#),
            400,
            "is not a VM name",
        ),
        (
            "POST",
            "/v1/vms",
            Some(r#"{"name":"a","config":{"kernel":"/nonexistent"}}"#),
            400,
            "does not exist",
        ),
        (
            "POST",
            "/v1/vms",
            Some(r#"{"name":"a","config":{"kernel":"/k","memory_mib":1}}"#),
            400,
            "too small",
        ),
        (
            "PATCH",
            "/v1/host",
            Some(r#"{"live_migraton":true}"#),
            400,
            "unknown field",
        ),
        (
            "PATCH",
            "/v1/host",
            Some(r#"{"max_migrations":0}"#),
            400,
            "at least 1",
        ),
        (
            "PATCH",
            "/v1/host",
            Some(r#"{"migration_networks":["10.0.0/8"]}"#),
            400,
            "not an IPv4 network",
        ),
        (
            "PATCH",
            "/v1/host",
            Some(r#"{"cpu_hide":["warp_drive"]}"#),
            400,
            "not one ferry knows",
        ),
        ("GET", "/v1/nope", None, 404, "no such endpoint"),
        ("DELETE", "/v1/host", None, 405, "not allowed"),
        ("GET", "/v1/vms/ghost", None, 404, "no VM named"),
        ("POST", "/v1/vms/ghost/start", None, 404, "no VM named"),
        (
            "POST",
            "/v1/moves",
            Some(r#"{"vm":"ghost","to":"hv2"}"#),
            404,
            "no VM named",
        ),
        (
            "POST",
            "/v1/moves",
            Some(r#"{"vm":"ghost","to":"nowhere"}"#),
            400,
            "unknown host",
        ),
        ("GET", "/v1/moves/123", None, 404, "no move"),
        (
            "POST",
            "/v1/incoming",
            Some(r#"{"move_id":"x"}"#),
            400,
            "bad request body",
        ),
        (
            "POST",
            "/v1/evacuate",
            Some("{}"),
            403,
            "live migration is off",
        ),
    ] {
        let (code, v) = http(&h, "hv1", method, path, body);
        assert_eq!(code, want, "{method} {path} {body:?}: {v}");
        conforms(&doc, "ErrorBody", &v);
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} should say {needle:?}"
        );
    }
    let after = (
        http(&h, "hv1", "GET", "/v1/host", None).1["settings"].clone(),
        http(&h, "hv1", "GET", "/v1/vms", None).1,
    );
    assert_eq!(before, after, "nothing changed");
    assert_eq!(before.0["live_migration"], false);
}

#[test]
fn a_daemon_restart_keeps_its_vms_running_and_a_second_daemon_is_refused() {
    if !kvm_available() {
        return;
    }
    let mut h = Hosts::new(1);
    let g = h.guest(GuestSpec::default());
    let w = g.verify(0);
    let pid = h.vm("hv1", "web01").unwrap()["pid"].as_u64().unwrap();

    // A second daemon on the same state directory refuses to start and says why.
    let state = h.state_dir("hv1");
    let out = std::process::Command::new(common::ferry_bin())
        .args(["host", "run", "--name", "again", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("already uses state directory"), "{e}");
    assert!(
        e.contains(&h.lab.daemon(0).unwrap().pid().to_string()),
        "names the holder: {e}"
    );

    h.lab.daemon(0).unwrap().kill();
    // The VM does not notice.
    let w = g.verify(w);
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM outlives its daemon"
    );
    let p = h
        .lab
        .start_daemon(std::path::Path::new(common::ferry_bin()), 0, &[])
        .unwrap();
    h.lab.set_daemon(0, p);
    h.lab.wait_daemon(0, T).unwrap();
    let v = h.vm("hv1", "web01").unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "the same VMM, found again");
    g.verify(w);
    let out = h.ok(&["vm", "stop", "web01"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    );
    assert_eq!(h.state("hv1", "web01"), "stopped");
    h.ok(&["vm", "delete", "web01"]);
    assert_eq!(h.state("hv1", "web01"), "absent");
}

#[test]
fn a_crashed_vmm_is_reported_with_its_status_and_not_restarted() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(1);
    let g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    g.verify(0);
    let pid = h.vm("hv1", "web01").unwrap()["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the VMM this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    h.wait_state("hv1", "web01", "crashed", T);
    std::thread::sleep(Duration::from_secs(1));
    let v = h.vm("hv1", "web01").unwrap();
    assert_eq!(v["state"], "crashed", "never silently restarted: {v}");
    assert!(v["pid"].is_null(), "{v}");
    assert_eq!(v["last_exit"]["status"], "killed by signal 9", "{v}");
    assert!(
        !v["last_exit"]["log_tail"].as_array().unwrap().is_empty(),
        "{v}"
    );
    let show = h.ok(&["vm", "show", "web01"]);
    assert!(
        show.contains("crashed")
            && show.contains("killed by signal 9")
            && show.contains("last log lines"),
        "{show}"
    );
    // An admin starts it again (a cold boot).
    let out = h.ok(&["vm", "start", "web01"]);
    assert!(out.contains("running"), "{out}");
}

#[test]
fn the_console_attaches_through_the_daemon() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(1);
    let g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    g.verify(0);
    let mut c = h.spawn(&["vm", "console", "web01"]);
    let mut stdin = c.stdin.take();
    let out = c.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(line.clone());
            line.clear();
        }
    });
    // What is typed into the console reaches the guest; its answer comes back.
    std::thread::sleep(Duration::from_millis(300));
    stdin.as_mut().unwrap().write_all(b"s").unwrap();
    let deadline = Instant::now() + T;
    loop {
        let l = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        if l.contains("STATUS uptime_ms=") {
            break;
        }
        assert!(Instant::now() < deadline, "no STATUS through the console");
    }
    let _ = c.kill();
    let _ = c.wait();
    // Not a VM: a clear error.
    let out = h.ferry(&["vm", "console", "ghost"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no host has a VM named \"ghost\""),
        "{}",
        text(&out)
    );
}

/// The README's main job: `ferry demo` runs the whole story through the daemons and says so.
#[test]
fn the_demo_moves_a_vm_through_the_daemons_and_back() {
    if !kvm_available() {
        return;
    }
    let out = common::ferry_output(
        &["demo", "--memory", "256", "--dirty", "16"],
        Duration::from_secs(240),
    );
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{t}");
    for needle in [
        "$ ferry --host hv1 host set --live-migration on",
        "$ ferry --json move web01 --to hv2",
        "$ ferry --json move web01 --to hv1",
        "done: hv1 -> hv2",
        "done: hv2 -> hv1",
        "none lost or reordered",
        "web01 is stopped (PowerOff)",
        "done: web01 moved hv1 -> hv2 -> hv1 through the daemons while running",
    ] {
        assert!(t.contains(needle), "the demo did not say {needle:?}:\n{t}");
    }
    assert_eq!(
        t.matches("VERIFY OK").count(),
        3 * 2,
        "memory and disk verified three times:\n{t}"
    );
}
