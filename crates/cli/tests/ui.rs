//! The web console in a real browser (Debian's chromium through playwright-core) against a
//! real lab: host daemons in network namespaces, real KVM, the test guest with its memory,
//! disk and TCP workloads, and `ferry ui` serving HTTPS. The browser does what an admin
//! does (`tests/ui/console.mjs`); these tests check the outcome on the hosts and in the guest.
//! Screenshots of every wizard step land in `target/tmp/ui-screenshots/`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::hosts::{GuestSpec, Hosts};
use common::kvm_available;
use serde_json::Value;

/// The script, its node_modules (`cd crates/cli/tests/ui && npm ci`) and the browser.
fn browser_tests_can_run() -> bool {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let missing: Vec<String> = [
        (
            dir.join("node_modules/playwright-core").exists(),
            format!("playwright-core (cd {} && npm ci)", dir.display()),
        ),
        (
            Path::new("/usr/bin/chromium").exists(),
            "chromium (apt-get install chromium)".to_string(),
        ),
        (
            Command::new("node").arg("--version").output().is_ok(),
            "node (apt-get install nodejs)".to_string(),
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the browser tests cannot run: missing {}",
            missing.join(", ")
        );
    }
    eprintln!("SKIPPED: the browser tests need {}", missing.join(", "));
    false
}

/// `ferry ui` on a free loopback port, with the lab's CLI config; hands out the login links
/// it prints.
struct Console {
    child: Child,
    base: String,
    links: mpsc::Receiver<String>,
}

impl Console {
    fn start(h: &Hosts) -> Console {
        Console::start_with(h, &[])
    }

    /// With more `ferry ui` options.
    fn start_with(h: &Hosts, extra: &[&str]) -> Console {
        let mut args = vec!["ui", "--listen", "127.0.0.1:0"];
        args.extend(extra);
        let mut child = h.spawn(&args);
        let out = child.stdout.take().unwrap();
        let (tx, links) = mpsc::channel();
        let (btx, brx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("ferry ui: {line}");
                if let Some(b) = line.strip_prefix("ferry ui: the web console is at ") {
                    let _ = btx.send(b.trim_end_matches('/').to_string());
                }
                if let Some(i) = line
                    .find("https://")
                    .filter(|_| line.contains("/login?token="))
                {
                    let _ = tx.send(line[i..].trim().to_string());
                }
            }
        });
        let base = brx
            .recv_timeout(Duration::from_secs(30))
            .expect("ferry ui never said where it listens");
        Console { child, base, links }
    }

    fn link(&self) -> String {
        self.links
            .recv_timeout(Duration::from_secs(30))
            .expect("ferry ui printed no login link")
    }

    /// Run one scenario of console.mjs in the browser; its result.
    fn run(&self, scenario: &str, env: &[(&str, &str)]) -> Value {
        // This scenario's screenshots from an earlier run would mislead.
        if let Ok(d) = std::fs::read_dir(shots()) {
            for f in d.flatten() {
                if f.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{scenario}-"))
                {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        let out = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/console.mjs"))
            .arg(scenario)
            .env("FERRY_UI_BASE", &self.base)
            .env("FERRY_UI_LINK", self.link())
            .env("FERRY_UI_SHOTS", shots())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the browser scenario {scenario} failed:\n{stdout}\n{}\n(screenshots in {})",
            String::from_utf8_lossy(&out.stderr),
            shots().display()
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("{scenario} printed no RESULT: {stdout}"));
        let v: Value = serde_json::from_str(line).unwrap();
        eprintln!("{scenario}: {v}");
        v
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots")
}

/// A guest whose dirtier an 80 Mbit/s move cannot outrun in a second: a move to cancel.
fn guest() -> GuestSpec<'static> {
    GuestSpec {
        cmdline: "dirty=32 rate=500",
        ..GuestSpec::default()
    }
}

#[test]
fn the_web_console_refuses_everything_before_login_and_cross_site_calls_after() {
    if !kvm_available() || !browser_tests_can_run() {
        return;
    }
    let h = Hosts::with(2, false);
    let c = Console::start(&h);
    let r = c.run("refusals", &[]);
    assert_eq!(r["api_status"], 401, "{r}");
    assert_eq!(r["api_code"], "login_required", "{r}");
    assert_eq!(r["post_status"], 401, "{r}");
    assert_eq!(
        r["page_url"].as_str().unwrap(),
        format!("{}/login", c.base),
        "{r}"
    );
    assert_eq!(r["bad_token_status"], 403, "{r}");
    assert_eq!(r["no_csrf"]["status"], 403, "{r}");
    assert_eq!(r["no_csrf"]["code"], "csrf", "{r}");
    assert_eq!(r["cross_origin_status"], 403, "{r}");
    assert_eq!(r["reused_link_status"], 403, "a login link works once: {r}");
    // Nothing those calls asked for happened.
    let s = h.json(&["--host", "hv1", "host", "show"]);
    assert_eq!(s["settings"]["live_migration"], false, "{s}");
    let l = h.json(&["--host", "hv1", "move", "list"]);
    assert_eq!(l["moves"].as_array().unwrap().len(), 0, "{l}");
}

#[test]
fn the_move_wizard_moves_a_live_vm_and_cancel_or_a_failed_check_leave_it_in_place() {
    if !kvm_available() || !browser_tests_can_run() {
        return;
    }
    // Live migration off on both hosts, as on new hosts.
    let h = Hosts::with(2, false);
    let mut g = h.guest(guest());
    let mut st = g.stream(&h);
    st.read(256 << 10).unwrap();
    let w = g.verify(0);
    let c = Console::start(&h);

    // A failed check shows its reasons and starts nothing.
    let r = c.run("failed-check", &[]);
    let problems = r["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{r}");
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("live migration")),
        "the check names live migration being off: {r}"
    );
    assert!(!r["fixes"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["can_go_on"], 0, "{r}");
    assert_eq!(r["can_start"], 0, "{r}");
    let l = h.json(&["--host", "hv1", "move", "list"]);
    assert_eq!(
        l["moves"].as_array().unwrap().len(),
        0,
        "nothing started: {l}"
    );
    assert_eq!(h.state("hv1", "web01"), "running");
    assert_eq!(h.state("hv2", "web01"), "absent");

    // Turn live migration on for both hosts from the Hosts page (a bad network refused first).
    let r = c.run("settings", &[]);
    assert!(
        r["hv1_bad_networks"]
            .as_str()
            .unwrap()
            .contains("not-a-network"),
        "{r}"
    );
    for host in ["hv1", "hv2"] {
        let s = h.json(&["--host", host, "host", "show"]);
        assert_eq!(s["settings"]["live_migration"], true, "{host}: {s}");
        assert_eq!(
            s["settings"]["migration_networks"]
                .as_array()
                .unwrap()
                .len(),
            0,
            "{host}: the bad value changed nothing: {s}"
        );
    }

    // The wizard moves the VM with its TCP stream, memory and disk intact.
    let r = c.run("move", &[]);
    assert!(
        r["console"].as_str().unwrap().starts_with("STATUS"),
        "the console showed the guest's answer: {r}"
    );
    let rep = &r["report"];
    assert!(rep["Result"].as_str().unwrap().contains("done"), "{r}");
    assert_eq!(rep["Runs on"], "hv2", "{r}");
    assert!(rep["Pause"].as_str().unwrap().ends_with(" ms"), "{r}");
    assert_eq!(r["host_after"], "hv2", "{r}");
    let id = r["id"].as_str().unwrap();
    let m = h.json(&["--host", "hv1", "move", "list"]);
    let m = m["moves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("move {id} not on hv1: {m}"));
    assert_eq!(m["state"], "done", "{m}");
    assert_eq!(h.state("hv1", "web01"), "absent", "gone from the source");
    assert_eq!(h.state("hv2", "web01"), "running");
    g.follow_on(&h, "hv2");
    st.read(4 << 20).unwrap();
    let w = g.verify(w);

    // Cancel mid-move (back to hv1, capped so it takes a while): the VM stays on hv2.
    let r = c.run("cancel", &[("FERRY_UI_TO", "hv1")]);
    assert_eq!(r["from"], "hv2", "{r}");
    let rep = &r["report"];
    assert!(rep["Result"].as_str().unwrap().contains("cancelled"), "{r}");
    assert_eq!(rep["Runs on"], "hv2", "{r}");
    let id = r["id"].as_str().unwrap();
    assert_eq!(h.state("hv2", "web01"), "running");
    st.read(1 << 20).unwrap();
    g.verify(w);
    h.assert_never_ran_on("hv1", "web01", id);
    eprintln!("screenshots: {}", shots().display());
}

#[test]
fn shares_a_storage_move_and_an_evacuation_from_the_console_then_logout_ends_the_session() {
    if !kvm_available() || !browser_tests_can_run() {
        return;
    }
    let mut h = Hosts::new(2);
    let fs = h
        .lab
        .add_file_server(Path::new(common::ferry_bin()))
        .expect("adding a file server to the lab");
    let server = format!("unix:{}", fs.socket().display());
    let share = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--server", server.as_str()]);
        h.ok(&a)
    };
    let share_json = |args: &[&str]| -> Value {
        let mut a = vec!["--json"];
        a.extend(args);
        serde_json::from_str(&share(&a)).unwrap()
    };
    share(&["share", "create", "vms"]);
    share(&["share", "grant", "vms", "hv1", "write"]);
    share(&["share", "create", "scratch"]);
    share(&["share", "grant", "scratch", "hv1", "read"]);
    let mut g = h.guest(GuestSpec {
        memory: 128,
        cmdline: "dirty=16 rate=2000",
        ..GuestSpec::default()
    });
    let mut g2 = h.guest(GuestSpec {
        name: "web02",
        k: 1,
        memory: 128,
        disk: false,
        cmdline: "dirty=8 rate=1000",
        ..GuestSpec::default()
    });
    let local = g.disk.clone().unwrap();
    let before = g.wait_durable(50);
    // The lab's CLI is the hosts' local admin: it names the file server by its socket.
    let c = Console::start_with(&h, &["--share-server", &server]);

    // The Shares page: grant hv2 write access to vms, revoke hv1's read access to scratch.
    let r = c.run("shares", &[]);
    let vms = share_json(&["share", "show", "vms"]);
    assert_eq!(vms["access"]["hv2"], "write", "{vms}\n{r}");
    assert_eq!(vms["access"]["hv1"], "write", "unchanged: {vms}");
    let scratch = share_json(&["share", "show", "scratch"]);
    assert!(
        scratch["access"].as_object().unwrap().is_empty(),
        "hv1's access to scratch is gone: {scratch}\n{r}"
    );

    // The wizard moves web01's disk onto the share while its writer runs; it stays on hv1.
    let r = c.run("storage", &[("FERRY_UI_DEST", "fs1:vms")]);
    let rep = &r["report"];
    assert!(rep["Result"].as_str().unwrap().contains("done"), "{r}");
    assert_eq!(rep["Runs on"], "hv1", "{r}");
    let uri = format!("nbds://{}/vms/web01.img", fs.nbd_addr());
    let disk = &rep["disks"][0];
    assert_eq!(
        disk[1],
        local.to_str().unwrap(),
        "the report's disk row: {r}"
    );
    assert_eq!(disk[2], uri.as_str(), "the report's disk row: {r}");
    assert_eq!(disk[3], "yes", "switched: {r}");
    assert_eq!(disk[7], "removed", "the old copy: {r}");
    let path = h.vm("hv1", "web01").unwrap()["config"]["disks"][0]["path"].clone();
    assert_eq!(path, uri.as_str(), "the VM's disk is on the share");
    assert!(!local.exists(), "the old copy was removed");
    assert_eq!(r["disk_row"][1], uri.as_str(), "{r}");
    assert_eq!(r["disk_row"][2], "share fs1:vms", "{r}");
    assert!(
        r["disk_row"][3]
            .as_str()
            .unwrap()
            .starts_with("hv1 (fence "),
        "the VM page names the lease holder: {r}"
    );
    let d = share_json(&["disk", "show", "vms/web01.img"]);
    assert_eq!(d["lease"]["holder"], "hv1", "{d}");
    let mid = g.wait_durable(before + 100);
    let w = g.verify(0);

    // Evacuate hv1 from the Hosts page: one progress row and one report per VM.
    let r = c.run("evacuate", &[]);
    let bars: Vec<&str> = r["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert!(
        bars.contains(&"Move of web01") && bars.contains(&"Move of web02"),
        "{r}"
    );
    for vm in ["web01", "web02"] {
        let rep = &r["reports"][format!("{vm} → hv2")];
        assert!(
            rep["Result"].as_str().unwrap().contains("done"),
            "{vm}: {r}"
        );
        assert_eq!(rep["Runs on"], "hv2", "{vm}: {r}");
        assert_eq!(h.state("hv1", vm), "absent", "{vm} left hv1");
        assert_eq!(h.state("hv2", vm), "running", "{vm} runs on hv2");
    }
    let d = share_json(&["disk", "show", "vms/web01.img"]);
    assert_eq!(d["lease"]["holder"], "hv2", "the lease followed web01: {d}");
    g.follow_on(&h, "hv2");
    g2.follow_on(&h, "hv2");
    g.wait_durable(mid + 100);
    g.verify(w);
    g2.verify(0);

    // Log out: the page goes to the login form, and the old cookie no longer works anywhere.
    let r = c.run("logout", &[]);
    assert_eq!(
        r["after_url"].as_str().unwrap(),
        format!("{}/login", c.base),
        "{r}"
    );
    assert_eq!(r["old_cookie_status"], 401, "{r}");
}
