//! `ferry move` between host daemons in a lab (network namespaces, real KVM, the test guest):
//! moves with every workload verified, refusals, checks, limits, cancel, and each daemon or VMM
//! dying at its worst moment; every failure checked on both sides.

mod common;

use std::time::{Duration, Instant};

use common::hosts::{report, text, GuestSpec, Hosts, T};
use common::kvm_available;

/// Wait until `vm`'s move, as host `host` lists it, is in one of `states`; returns the move.
fn wait_move(h: &Hosts, host: &str, vm: &str, states: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let l = h.json(&["--host", host, "move", "list"]);
        if let Some(m) = l["moves"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|m| m["vm"] == vm)
        {
            // A migrating move has its VMM copying (bytes are on their way).
            let copying = m["state"] != "migrating"
                || m["progress"]["bytes_sent"].as_u64().is_some_and(|b| b > 0);
            if states.contains(&m["state"].as_str().unwrap()) && copying {
                return m.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{vm} never reached {states:?}: {l}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest whose dirtier a capped link outpaces (16 Mbit/s), so a capped move converges.
const SLOW_DIRTIER: GuestSpec = GuestSpec {
    name: "web01",
    host: "hv1",
    k: 0,
    memory: 256,
    disk: true,
    disk_mib: 64,
    cmdline: "dirty=32 rate=500",
    extra: Vec::new(),
};

/// Two hosts whose second daemon's VMMs crash at `at` (`FERRY_CRASH_AT`) when they receive.
fn crashing_destination(at: &str) -> Hosts {
    let mut h = Hosts::new(2);
    h.lab.daemon(1).unwrap().kill();
    let p = h
        .lab
        .start_daemon_env(
            std::path::Path::new(common::ferry_bin()),
            1,
            &[],
            &[("FERRY_CRASH_AT", at)],
        )
        .unwrap();
    h.lab.set_daemon(1, p);
    h.lab.wait_daemon(1, T).unwrap();
    h
}

fn running_on(h: &Hosts, host: &str, vm: &str) {
    assert_eq!(h.state(host, vm), "running", "{vm} on {host}\n{}", h.logs());
}

#[test]
fn a_vm_moves_between_daemons_with_memory_disk_and_tcp_intact() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(GuestSpec::default());
    let mut st = g.stream(&h);
    st.read(1 << 20).unwrap();
    let w = g.verify(0);

    let out = h.ferry(&["--json", "move", "web01", "--to", "hv2"]);
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let r = report(&out);
    for key in [
        "vm",
        "from",
        "to",
        "result",
        "total_ms",
        "downtime_ms",
        "bytes",
        "rounds",
    ] {
        assert!(
            r.get(key).is_some_and(|v| !v.is_null()),
            "report lacks {key}: {r}"
        );
    }
    assert_eq!(
        (r["vm"].as_str(), r["from"].as_str(), r["to"].as_str()),
        (Some("web01"), Some("hv1"), Some("hv2"))
    );
    assert_eq!(r["result"], "done");
    assert!(r["bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    eprintln!("moved: {r}");
    assert_eq!(h.state("hv1", "web01"), "absent", "gone from the source");
    running_on(&h, "hv2", "web01");
    g.follow_on(&h, "hv2");
    st.read(4 << 20).unwrap();
    let w2 = g.verify(w);

    // And back, as people read it.
    let out = h.ok(&["move", "web01", "--to", "hv1"]);
    assert!(out.contains("moved web01 hv2 -> hv1"), "{out}");
    assert!(out.contains("pause"), "{out}");
    g.follow_on(&h, "hv1");
    st.read(4 << 20).unwrap();
    g.verify(w2);
    assert_eq!(h.state("hv2", "web01"), "absent");
}

#[test]
fn a_post_copy_move_starts_the_guest_on_the_destination_then_brings_every_page() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    // A 32 MiB working set rewritten flat out: post-copy runs the guest on hv2 after one pass
    // and fetches or pushes what it still lacks (under a cap, so that takes a while).
    let mut g = h.guest(GuestSpec {
        memory: 128,
        ..GuestSpec::default()
    });
    let mut st = g.stream(&h);
    st.read(1 << 20).unwrap();
    let w = g.verify(0);
    let before = g.wait_durable(20);

    let child = h.spawn(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--mode",
        "postcopy",
        "--bandwidth-mbit",
        "200",
    ]);
    // While its pages still come from hv1, the move has committed: hv2 runs the guest.
    let m = wait_move(&h, "hv1", "web01", &["postcopy", "done"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let r = report(&out);
    assert_eq!(r["result"], "done", "{r}");
    assert_eq!(r["runs_on"], "hv2", "{r}");
    let mig = &r["migration"];
    assert_eq!(
        mig["mode"], "postcopy",
        "the report says how memory went: {r}"
    );
    assert!(
        m["state"] == "postcopy" || mig["postcopy_pages_requested"].as_u64().is_some(),
        "{m}"
    );
    eprintln!(
        "post-copy move: {} ms, pause {} ms, {} pages fetched on demand; seen live as {}",
        r["total_ms"], r["downtime_ms"], mig["postcopy_pages_requested"], m["state"]
    );
    assert_eq!(h.state("hv1", "web01"), "absent", "gone from the source");
    running_on(&h, "hv2", "web01");
    g.follow_on(&h, "hv2");
    st.read(4 << 20).unwrap();
    g.verify(w);
    assert!(
        g.wait_durable(before + 20) > before,
        "the disk writer goes on"
    );

    // As people read it.
    let out = h.ok(&["move", "web01", "--to", "hv1", "--mode", "postcopy"]);
    assert!(out.contains("mode: post-copy ("), "{out}");
    g.follow_on(&h, "hv1");
    st.read(1 << 20).unwrap();
    g.verify(w);
}

#[test]
fn a_move_is_refused_while_either_host_has_migration_off() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::with(2, false);
    let show = h.ok(&["--host", "hv2", "host", "show"]);
    assert!(
        show.contains("live migration:     off"),
        "off on a new host: {show}"
    );
    let g = h.guest(GuestSpec {
        disk: false,
        ..Default::default()
    });
    let w = g.verify(0);
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("live migration is off on hv1"), "{t}");
    assert!(
        t.contains("ferry --host hv1 host set --live-migration on"),
        "{t}"
    );
    h.ok(&["--host", "hv1", "host", "set", "--live-migration", "on"]);
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("live migration is off on hv2"), "{t}");
    assert!(
        t.contains("ferry --host hv2 host set --live-migration on"),
        "{t}"
    );
    // Nothing changed on either side.
    running_on(&h, "hv1", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");
    assert!(!h.state_dir("hv2").join("vms/web01").exists());
    let hv2 = h.json(&["--host", "hv2", "host", "show"]);
    assert_eq!(hv2["vms_defined"], 0, "{hv2}");
    assert_eq!(hv2["settings"]["live_migration"], false);
    g.verify(w);
    // The destination refuses on its own too, whatever a source says.
    h.ok(&["--host", "hv1", "host", "set", "--live-migration", "off"]);
    h.ok(&["--host", "hv2", "host", "set", "--live-migration", "on"]);
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    assert!(
        text(&out).contains("live migration is off on hv1"),
        "{}",
        text(&out)
    );
}

#[test]
fn failed_checks_name_each_problem_and_move_nothing() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    // A second bridge that only hv1 has.
    let ns1 = &h.lab.hosts[0].ns;
    for args in [
        vec!["-n", ns1, "link", "add", "br1", "type", "bridge"],
        vec!["-n", ns1, "link", "set", "br1", "up"],
    ] {
        assert!(std::process::Command::new("ip")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let g = h.guest(GuestSpec {
        disk: false,
        extra: vec!["--net", "bridge=br1"],
        ..Default::default()
    });
    let vm = h.vm("hv1", "web01").unwrap();
    let feature = vm["cpu_features"][0]
        .as_str()
        .expect("the VM's CPU features")
        .to_string();
    h.ok(&[
        "--host",
        "hv2",
        "host",
        "set",
        "--cpu-hide",
        &feature,
        "--memory-limit-mib",
        "64",
    ]);

    let out = h.ferry(&["--json", "move", "web01", "--to", "hv2", "--check"]);
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    let failed = |name: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name && c["ok"] == false)
            .unwrap_or_else(|| panic!("no failed {name} check in {r}"))
            .clone()
    };
    assert!(failed("cpu")["detail"].as_str().unwrap().contains(&feature));
    assert!(failed("memory")["detail"]
        .as_str()
        .unwrap()
        .contains("256 MiB"));
    assert!(failed("network")["detail"]
        .as_str()
        .unwrap()
        .contains("br1"));
    assert!(failed("network")["fix"]
        .as_str()
        .unwrap()
        .contains("create bridge br1"));

    let out = h.ferry(&["move", "web01", "--to", "hv2", "--check"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("FAIL  cpu") && t.contains("FAIL  memory") && t.contains("FAIL  network"),
        "{t}"
    );
    assert!(t.contains("fix:"), "{t}");
    assert!(t.contains("cannot move to hv2 (3 problems)"), "{t}");

    // The move itself checks first and moves nothing.
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("nothing moved"), "{t}");
    running_on(&h, "hv1", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");

    // No network in common.
    h.ok(&[
        "--host",
        "hv2",
        "host",
        "set",
        "--cpu-hide",
        "none",
        "--memory-limit-mib",
        "0",
        "--migration-network",
        "10.99.0.0/24",
    ]);
    let out = h.ferry(&["move", "web01", "--to", "hv2", "--check"]);
    let t = text(&out);
    assert!(t.contains("no migration network in common"), "{t}");
    assert!(
        t.contains("FAIL  network"),
        "the bridge is still missing: {t}"
    );
    g.verify(0);
}

#[test]
fn the_check_forecasts_the_move_and_moves_nothing() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let g = h.guest(GuestSpec {
        memory: 128,
        ..GuestSpec::default()
    });
    let w = g.verify(0);
    let args = ["move", "web01", "--to", "hv2", "--bandwidth-mbit", "200"];
    let mut check = vec!["--json"];
    check.extend(args);
    check.push("--check");
    let out = h.ferry(&check);
    assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let f = &r["forecast"];
    let link = f["link_mbit"]
        .as_f64()
        .unwrap_or_else(|| panic!("no forecast: {r}"));
    assert!(
        link > 50.0 && link < 240.0,
        "the link as measured, under the cap: {f}"
    );
    assert!(
        f["dirty_rate_pps"].as_u64().unwrap() > 0,
        "the writer dirties memory: {f}"
    );
    // Nothing moved, nothing started on hv2; hv2 says what it did.
    running_on(&h, "hv1", "web01");
    assert_eq!(h.state("hv2", "web01"), "absent");
    let l = h.json(&["--host", "hv1", "move", "list"]);
    assert!(l["moves"].as_array().unwrap().is_empty(), "{l}");
    let audit = h.ok(&["--host", "hv2", "audit"]);
    assert!(
        audit.contains("answer a forecast for web01 from hv1"),
        "{audit}"
    );
    g.verify(w);

    // As people read it, then the move itself, beside what was predicted.
    let mut human = args.to_vec();
    human.push("--check");
    let t = h.ok(&human);
    assert!(
        t.contains("forecast for a move to hv2") && t.contains("predicted:"),
        "{t}"
    );
    let mut json = vec!["--json"];
    json.extend(args);
    let out = h.ferry(&json);
    let m = report(&out);
    assert_eq!(m["result"], "done", "{}", text(&out));
    let (predicted, took) = (
        f["total_ms"].as_f64().unwrap(),
        m["total_ms"].as_f64().unwrap(),
    );
    eprintln!(
        "forecast {predicted:.0} ms {} against {took:.0} ms {}",
        f["mode"], m["migration"]["mode"]
    );
    assert!(
        took / predicted < 2.0 && predicted / took < 2.0,
        "within a factor of 2: forecast {f}, move {m}"
    );
}

#[test]
fn the_third_move_waits_for_a_free_slot() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let guests: Vec<_> = (1..=3)
        .map(|i| {
            h.guest(GuestSpec {
                name: &format!("vm{i}"),
                k: i,
                disk: false,
                cmdline: "dirty=48 rate=500",
                ..Default::default()
            })
        })
        .collect();
    let moves: Vec<_> = (1..=3)
        .map(|i| {
            let m = h.spawn(&[
                "--json",
                "move",
                &format!("vm{i}"),
                "--to",
                "hv2",
                "--bandwidth-mbit",
                "150",
            ]);
            std::thread::sleep(Duration::from_millis(150));
            m
        })
        .collect();
    // While two copy, the third says it waits, and why.
    let deadline = Instant::now() + T;
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        let l = h.json(&["--host", "hv1", "move", "list"]);
        let ms = l["moves"].as_array().unwrap();
        let active = ms
            .iter()
            .filter(|m| {
                ["checking", "preparing", "migrating", "switchover"]
                    .contains(&m["state"].as_str().unwrap())
            })
            .count();
        let queued: Vec<_> = ms.iter().filter(|m| m["state"] == "queued").collect();
        if active == 2 && queued.len() == 1 {
            let why = queued[0]["waiting_for"].as_str().unwrap_or_default();
            assert!(
                why.contains("free migration slot") && why.contains("2 of 2"),
                "{why}"
            );
            seen = true;
        }
        assert!(active <= 2, "more moves than the limit at once: {l}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen, "never saw two moves running and one queued");
    let mut queued_ms = Vec::new();
    for m in moves {
        let out = m.wait_with_output().unwrap();
        assert!(out.status.success(), "{}\n{}", text(&out), h.logs());
        queued_ms.push(report(&out)["queued_ms"].as_u64().unwrap());
    }
    assert!(
        queued_ms.iter().any(|&q| q > 500),
        "one move waited: {queued_ms:?}"
    );
    for (i, mut g) in guests.into_iter().enumerate() {
        running_on(&h, "hv2", &format!("vm{}", i + 1));
        g.follow_on(&h, "hv2");
        g.verify(0);
    }
}

/// Start a slow move of web01 (a bandwidth cap), wait until it copies memory, run `breaker`,
/// and return the move's output.
fn broken_move(
    h: &Hosts,
    breaker: impl FnOnce(&serde_json::Value),
) -> (std::process::Output, String) {
    let mv = h.spawn(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--bandwidth-mbit",
        "80",
    ]);
    let m = wait_move(h, "hv1", "web01", &["migrating"]);
    std::thread::sleep(Duration::from_millis(300));
    breaker(&m);
    (
        mv.wait_with_output().unwrap(),
        m["id"].as_str().unwrap().to_string(),
    )
}

/// After a move broke: the guest runs on hv1 with everything intact, hv2 never ran it, and a
/// move afterwards works.
fn stays_on_source(
    h: &Hosts,
    g: &mut common::hosts::Guest,
    st: &mut ferry_lab::Stream,
    w: u64,
    id: &str,
) {
    running_on(h, "hv1", "web01");
    st.read(1 << 20).unwrap();
    g.verify(w);
    h.assert_never_ran_on("hv2", "web01", id);
    let out = h.ferry(&["move", "web01", "--to", "hv2"]);
    assert!(
        out.status.success(),
        "the move afterwards: {}\n{}",
        text(&out),
        h.logs()
    );
    g.follow_on(h, "hv2");
    st.read(1 << 20).unwrap();
    g.verify(w);
}

#[test]
fn cancel_mid_move_keeps_the_vm_on_the_source() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(SLOW_DIRTIER);
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let (out, id) = broken_move(&h, |_| {
        let c = h.ok(&["move", "cancel", "web01"]);
        assert!(c.contains("the VM stays on hv1"), "{c}");
    });
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(report(&out)["result"], "cancelled", "{}", text(&out));
    stays_on_source(&h, &mut g, &mut st, w, &id);
}

#[test]
fn the_destination_daemon_dying_mid_move_leaves_the_vm_on_the_source() {
    if !kvm_available() {
        return;
    }
    let mut h = Hosts::new(2);
    let mut g = h.guest(SLOW_DIRTIER);
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let mv = h.spawn(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--bandwidth-mbit",
        "80",
    ]);
    let m = wait_move(&h, "hv1", "web01", &["migrating"]);
    h.lab.daemon(1).unwrap().kill();
    let out = mv.wait_with_output().unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("lost contact with hv2's daemon"), "{t}");
    // hv2's daemon comes back and finds nothing it may run.
    let p = h
        .lab
        .start_daemon(std::path::Path::new(common::ferry_bin()), 1, &[])
        .unwrap();
    h.lab.set_daemon(1, p);
    h.lab.wait_daemon(1, T).unwrap();
    stays_on_source(&h, &mut g, &mut st, w, m["id"].as_str().unwrap());
}

#[test]
fn the_destination_vmm_dying_mid_move_leaves_the_vm_on_the_source() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(SLOW_DIRTIER);
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let pidfile = h.serial("hv2", "web01", 1).with_file_name("vmm.pid");
    let (out, id) = broken_move(&h, |_| {
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the receiving VMM this test's lab started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    });
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(report(&out)["result"], "failed");
    stays_on_source(&h, &mut g, &mut st, w, &id);
}

#[test]
fn the_source_daemon_dying_mid_move_still_ends_with_one_running_copy() {
    if !kvm_available() {
        return;
    }
    let mut h = Hosts::new(2);
    let mut g = h.guest(SLOW_DIRTIER);
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let mv = h.spawn(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--bandwidth-mbit",
        "150",
    ]);
    wait_move(&h, "hv1", "web01", &["migrating"]);
    h.lab.daemon(0).unwrap().kill();
    let out = mv.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the CLI lost its daemon: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("lost contact with hv1's daemon"),
        "{}",
        text(&out)
    );
    // The VMMs finish the move on their own; hv2's daemon sees it commit.
    h.wait_state("hv2", "web01", "running", T);
    // hv1's daemon comes back, learns the move committed, and lets go of the VM.
    let p = h
        .lab
        .start_daemon(std::path::Path::new(common::ferry_bin()), 0, &[])
        .unwrap();
    h.lab.set_daemon(0, p);
    h.lab.wait_daemon(0, T).unwrap();
    h.wait_state("hv1", "web01", "absent", T);
    let l = h.json(&["--host", "hv1", "move", "list"]);
    assert_eq!(l["moves"][0]["state"], "done", "{l}");
    running_on(&h, "hv2", "web01");
    g.follow_on(&h, "hv2");
    st.read(1 << 20).unwrap();
    g.verify(w);
}

#[test]
fn a_lost_final_ack_is_settled_by_the_daemons() {
    if !kvm_available() {
        return;
    }
    // hv2's VMMs die right after resuming a guest, before the source hears of it.
    let h = crashing_destination("after-resume");
    let g = h.guest(GuestSpec::default());
    g.verify(0);
    // Pre-copy: the guest's memory is all on hv2 when it resumes there.
    let out = h.ferry(&[
        "--json", "move", "web01", "--to", "hv2", "--mode", "precopy",
    ]);
    let r = report(&out);
    // The destination committed (its record says so), so the source let go: the move is done
    // and the guest, which crashed with its VMM on hv2, is reported there as crashed.
    assert_eq!(r["result"], "done", "{}\n{}", text(&out), h.logs());
    assert_eq!(h.state("hv1", "web01"), "absent");
    h.wait_state("hv2", "web01", "crashed", T);
    let v = h.vm("hv2", "web01").unwrap();
    let tail = v["last_exit"]["log_tail"].to_string();
    assert!(tail.contains("FERRY_CRASH_AT=after-resume"), "{v}");
}

#[test]
fn a_destination_crash_at_commit_is_settled_as_aborted() {
    if !kvm_available() {
        return;
    }
    let h = crashing_destination("on-commit");
    let g = h.guest(GuestSpec::default());
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let mut w = g.verify(0);
    // Either way the commit never happened, so the guest goes on here, with nothing lost:
    // post-copy too, whose hand-over reads the destination's record as pre-copy's does.
    for mode in ["precopy", "postcopy"] {
        let out = h.ferry(&["--json", "move", "web01", "--to", "hv2", "--mode", mode]);
        let r = report(&out);
        assert_eq!(r["result"], "failed", "{mode}: {}", text(&out));
        assert!(
            r["error"].as_str().unwrap().contains("aborted"),
            "{mode}: {r}"
        );
        assert_eq!(r["runs_on"], "hv1", "{mode}: {r}");
        running_on(&h, "hv1", "web01");
        st.read(1 << 20).unwrap();
        w = g.verify(w);
        let l = h.json(&["--host", "hv1", "move", "list"]);
        let m = l["moves"].as_array().unwrap().last().unwrap();
        assert_eq!(m["report"]["migration"]["mode"], mode, "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        h.assert_never_ran_on("hv2", "web01", &id);
    }
}

#[test]
fn the_destination_dying_in_post_copy_loses_the_guest_and_both_hosts_say_so() {
    if !kvm_available() {
        return;
    }
    // hv2's VMMs die right after resuming a guest: in post-copy, with pages still on hv1.
    let h = crashing_destination("after-resume");
    let g = h.guest(GuestSpec::default());
    g.verify(0);
    let out = h.ferry(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--mode",
        "postcopy",
        "--postcopy-recovery",
        "2",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let r = report(&out);
    // The one case no system saves (docs/migration.md): the guest ran on hv2, which died with
    // pages only hv1 had. hv1 must not resume its older copy, and says where things stand.
    assert_eq!(r["result"], "failed", "{r}");
    assert_eq!(r["migration"]["guest_lost"], true, "{r}");
    assert!(r["runs_on"].as_str().unwrap().contains("nowhere"), "{r}");
    assert!(r["error"].as_str().unwrap().contains("it is lost"), "{r}");
    assert_eq!(
        h.state("hv1", "web01"),
        "absent",
        "no stale copy left to run on hv1"
    );
    h.wait_state("hv2", "web01", "crashed", T);
    // And hv1's paused copy was stopped, not left holding its memory.
    let run = h.state_dir("hv1").join("vms/web01");
    let deadline = Instant::now() + T;
    while run.exists() {
        assert!(
            Instant::now() < deadline,
            "{} stays\n{}",
            run.display(),
            h.daemon_log("hv1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn evacuating_a_host_moves_every_vm_within_the_limit() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut guests: Vec<_> = (1..=3)
        .map(|i| {
            h.guest(GuestSpec {
                name: &format!("vm{i}"),
                k: i,
                disk: false,
                cmdline: "dirty=32 rate=500",
                ..Default::default()
            })
        })
        .collect();
    // One VM no destination can take: a bridge only hv1 has.
    let ns1 = &h.lab.hosts[0].ns;
    for args in [
        vec!["-n", ns1, "link", "add", "br1", "type", "bridge"],
        vec!["-n", ns1, "link", "set", "br1", "up"],
    ] {
        assert!(std::process::Command::new("ip")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    let stuck = h.guest(GuestSpec {
        name: "pinned",
        k: 9,
        disk: false,
        extra: vec!["--net", "bridge=br1"],
        ..Default::default()
    });
    let out = h.ferry(&[
        "host",
        "evacuate",
        "hv1",
        "--to",
        "hv2",
        "--bandwidth-mbit",
        "200",
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "hv1 is not empty: pinned stays: {t}");
    assert!(
        t.contains("pinned") && t.contains("stays") && t.contains("br1"),
        "{t}"
    );
    for i in 1..=3 {
        assert!(t.contains(&format!("moved vm{i} hv1 -> hv2")), "{t}");
    }
    assert!(
        t.contains("summary: 3 of 4 VMs moved off hv1, 0 failed, 1 could not move"),
        "{t}"
    );
    assert!(t.contains("queued"), "the third waited for a slot: {t}");
    for (i, g) in guests.iter_mut().enumerate() {
        let name = format!("vm{}", i + 1);
        running_on(&h, "hv2", &name);
        assert_eq!(h.state("hv1", &name), "absent");
        g.follow_on(&h, "hv2");
        g.verify(0);
    }
    running_on(&h, "hv1", "pinned");
    stuck.verify(0);
}

#[test]
fn ctrl_c_on_ferry_move_cancels_it_and_the_vm_stays() {
    if !kvm_available() {
        return;
    }
    let h = Hosts::new(2);
    let mut g = h.guest(SLOW_DIRTIER);
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let mv = h.spawn(&[
        "--json",
        "move",
        "web01",
        "--to",
        "hv2",
        "--bandwidth-mbit",
        "80",
    ]);
    let m = wait_move(&h, "hv1", "web01", &["migrating"]);
    // SAFETY: kill(2) sends SIGINT (Ctrl-C) to the `ferry move` this test started.
    assert_eq!(unsafe { libc::kill(mv.id() as i32, libc::SIGINT) }, 0);
    let out = mv.wait_with_output().unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("cancelling (Ctrl-C)"), "{t}");
    assert_eq!(report(&out)["result"], "cancelled", "{t}");
    stays_on_source(&h, &mut g, &mut st, w, m["id"].as_str().unwrap());
}
