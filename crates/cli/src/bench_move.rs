//! `ferry bench move`: what the host daemons add to a live move. The same guest and workload
//! moved in one run (a) directly VMM to VMM (`ferry vmm migrate`, as `bench migrate` does) and
//! (b) by `ferry move` through the daemons (check, receiving VMM started by the destination
//! daemon, ownership hand-over), timed as an admin sees it: from the command's start to its
//! end. The guest-observed pause is the longest gap of its 1 ms heartbeat on the host, beside
//! the noise floor measured with no move. Then an evacuation of 4 idle VMs (limit 2) against
//! the sum of their single moves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_api::host::MoveReport;
use ferry_lab::{longest_gap, Lab, LabOptions, Port, Proc};

#[derive(Args)]
pub struct MoveArgs {
    /// Moves per path and workload (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u64,
    /// Fewer runs (2) and a smaller guest (256 MiB).
    #[arg(long)]
    quick: bool,
    /// One JSON object per row.
    #[arg(long)]
    json: bool,
    /// Keep the lab's files here.
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Sample {
    wall_ms: f64,
    downtime_ms: f64,
    gap_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The workloads: (name, guest command line tail) for a guest of `memory` MiB: idle, and
/// rewriting a working set (256 MiB, or half the guest if smaller) at 100 MiB/s.
fn workloads(memory: u64) -> Vec<(&'static str, String)> {
    vec![
        ("idle", "dirty=0".into()),
        (
            "100MiB/s",
            format!("dirty={} rate=25600", (memory / 2).min(256)),
        ),
    ]
}

pub fn run(a: MoveArgs) -> Result<()> {
    ferry_lab::require_root("ferry bench move")?;
    let tmp = std::env::temp_dir().join(format!("ferry-bench-move-{}", std::process::id()));
    let dir = a.dir.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let r = bench(&a, &dir);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

struct Ctx<'a> {
    lab: &'a Lab,
    dir: &'a Path,
    ferry: PathBuf,
    config: PathBuf,
    guest: PathBuf,
    memory: u64,
}

impl Ctx<'_> {
    fn ferry(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.ferry)
            .args(args)
            .env("FERRY_CONFIG", &self.config)
            .env_remove("FERRY_HOST")
            .output()?;
        if !out.status.success() {
            bail!(
                "ferry {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into())
    }

    fn sock(&self, host: usize, vm: &str, port: &str) -> PathBuf {
        self.lab.hosts[host]
            .state_dir
            .join("vms")
            .join(vm)
            .join("run")
            .join(port)
    }
}

/// Wait until the guest on `con` answers.
fn answering(con: &Port) -> Result<()> {
    let t = Instant::now();
    while con.ask(b's', "STATUS", Duration::from_secs(2)).is_err() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the guest never answered: {}", con.text());
        }
    }
    Ok(())
}

fn verify(con: &Port) -> Result<()> {
    let v = con.ask(b'v', "VERIFY", Duration::from_secs(60))?;
    if !v.starts_with("VERIFY OK") {
        bail!("the guest's memory check failed after the move: {v}");
    }
    Ok(())
}

/// (b): `ferry move` through the daemons, `runs` times back and forth.
fn daemon_path(c: &Ctx, workload: &str, runs: usize) -> Result<(Vec<Sample>, f64)> {
    let cmdline = format!("hb=2 {workload}");
    let mem = c.memory.to_string();
    let g = c.guest.display().to_string();
    c.ferry(&[
        "--host",
        "hv1",
        "vm",
        "create",
        "bm",
        "--kernel",
        &g,
        "--memory",
        &mem,
        "--vcpus",
        "2",
        "--cmdline",
        &cmdline,
        "--start",
    ])?;
    let mut con = Port::connect(
        c.sock(0, "bm", "con"),
        Duration::from_millis(2),
        Duration::from_secs(30),
    )?;
    let mut hb = Port::follow(c.sock(0, "bm", "con2"), Duration::from_millis(1));
    answering(&con)?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let noise = longest_gap(&hb.beats(), t, Instant::now());
    let mut out = Vec::new();
    let mut here = 0usize;
    for _ in 0..runs {
        let to = 1 - here;
        let next = Port::follow(c.sock(to, "bm", "con2"), Duration::from_micros(250));
        let t0 = Instant::now();
        let o = c.ferry(&["--json", "move", "bm", "--to", &format!("hv{}", to + 1)])?;
        let wall = t0.elapsed();
        let r: MoveReport = serde_json::from_str(o.lines().last().unwrap_or_default())?;
        if r.result != "done" {
            bail!("the move failed: {:?}", r.error);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while next.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut beats = hb.beats();
        beats.extend(next.beats());
        out.push(Sample {
            wall_ms: ms(wall),
            downtime_ms: r.downtime_ms.unwrap_or(f64::NAN),
            gap_ms: ms(longest_gap(&beats, t0, Instant::now())),
        });
        hb.close();
        con.close();
        hb = next;
        con = Port::connect(
            c.sock(to, "bm", "con"),
            Duration::from_millis(2),
            Duration::from_secs(30),
        )?;
        verify(&con)?;
        here = to;
    }
    c.ferry(&[
        "--host",
        &format!("hv{}", here + 1),
        "vm",
        "stop",
        "--force",
        "bm",
    ])?;
    c.ferry(&["--host", &format!("hv{}", here + 1), "vm", "delete", "bm"])?;
    hb.close();
    con.close();
    Ok((out, ms(noise)))
}

/// (a): direct VMM-to-VMM migration with `ferry vmm`, `runs` times back and forth.
fn direct_path(c: &Ctx, workload: &str, runs: usize) -> Result<(Vec<Sample>, f64)> {
    let cmdline = format!("hb=2 {workload}");
    let spawn = |host: usize, tag: &str, args: &[String]| -> Result<(Proc, Port, Port, PathBuf)> {
        let d = c.dir.join(tag);
        std::fs::create_dir_all(&d)?;
        let (api, c1, c2) = (d.join("api"), d.join("con"), d.join("con2"));
        for p in [&api, &c1, &c2] {
            let _ = std::fs::remove_file(p);
        }
        let mut cmd = Lab::exec(&c.lab.hosts[host].ns);
        cmd.arg(&c.ferry)
            .args(args)
            .arg("--api")
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", c1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", c2.display()));
        let p = Proc::spawn(cmd, tag.to_string(), d.join("log"))?;
        let hb = Port::follow(c2, Duration::from_micros(250));
        let con = Port::follow(c1, Duration::from_millis(2));
        Ok((p, con, hb, api))
    };
    let run_args: Vec<String> = [
        "vmm",
        "run",
        "--kernel",
        &c.guest.display().to_string(),
        "--memory",
        &c.memory.to_string(),
        "--vcpus",
        "2",
        "--cmdline",
        &cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut p, mut con, mut hb, mut api) = spawn(0, "direct0", &run_args)?;
    while !con.connected() {
        p.alive()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    answering(&con)?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let noise = longest_gap(&hb.beats(), t, Instant::now());
    let mut out = Vec::new();
    let mut here = 0usize;
    for i in 0..runs {
        let to = 1 - here;
        let listen = format!("{}:{}", c.lab.hosts[to].ip, 7900 + i);
        let rargs: Vec<String> = ["vmm", "receive", "--listen", &listen, "--timeout", "60"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (mut dp, dcon, dhb, dapi) = spawn(to, &format!("direct{}", i + 1), &rargs)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dp.log_text().contains("waiting for a VM") {
            dp.alive()?;
            if Instant::now() > deadline {
                bail!("the receiver did not listen");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let t0 = Instant::now();
        let mut last = None;
        ferry_vmm::api_server::call_stream(
            &api,
            &ferry_api::Request::Migrate {
                settings: ferry_api::MigrateSettings::to(listen),
                follow: true,
            },
            |r| {
                if let ferry_api::Response::Ok(ferry_api::ResponseBody::Migration(m)) = r {
                    let end = matches!(
                        m.phase,
                        ferry_api::MigrationPhase::Done
                            | ferry_api::MigrationPhase::Failed
                            | ferry_api::MigrationPhase::Cancelled
                    );
                    last = Some(m);
                    return !end;
                }
                true
            },
        )?;
        let wall = t0.elapsed();
        let m = last.context("no report from the VMM")?;
        if m.phase != ferry_api::MigrationPhase::Done {
            bail!("the direct migration failed: {:?}", m.error);
        }
        let _ = p.wait(Duration::from_secs(10));
        while dhb.is_empty() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut beats = hb.beats();
        beats.extend(dhb.beats());
        out.push(Sample {
            wall_ms: ms(wall),
            downtime_ms: m.downtime_ms.unwrap_or(f64::NAN),
            gap_ms: ms(longest_gap(&beats, t0, Instant::now())),
        });
        hb.close();
        con.close();
        while !dcon.connected() {
            std::thread::sleep(Duration::from_millis(2));
        }
        verify(&dcon)?;
        (p, con, hb, api) = (dp, dcon, dhb, dapi);
        here = to;
    }
    p.kill();
    Ok((out, ms(noise)))
}

/// Evacuate 4 idle VMs from hv1 (limit 2) against the sum of moving them one by one.
fn evacuation(c: &Ctx) -> Result<(f64, f64)> {
    let g = c.guest.display().to_string();
    for i in 0..4 {
        c.ferry(&[
            "--host",
            "hv1",
            "vm",
            "create",
            &format!("ev{i}"),
            "--kernel",
            &g,
            "--memory",
            "256",
            "--cmdline",
            "hb=2 dirty=0",
            "--start",
        ])?;
    }
    std::thread::sleep(Duration::from_secs(1));
    // One by one, hv1 -> hv2.
    let mut single = 0.0;
    for i in 0..4 {
        let t = Instant::now();
        c.ferry(&["--json", "move", &format!("ev{i}"), "--to", "hv2"])?;
        single += ms(t.elapsed());
    }
    // All at once, hv2 -> hv1, by evacuation.
    let t = Instant::now();
    let out = c.ferry(&["--json", "host", "evacuate", "hv2", "--to", "hv1"])?;
    let evac = ms(t.elapsed());
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    let moved = v["moved"].as_array().map(|m| m.len()).unwrap_or(0);
    if moved != 4 {
        bail!("the evacuation moved {moved} of 4 VMs: {v}");
    }
    for i in 0..4 {
        c.ferry(&["--host", "hv1", "vm", "stop", "--force", &format!("ev{i}")])?;
    }
    Ok((single, evac))
}

fn bench(a: &MoveArgs, dir: &Path) -> Result<()> {
    let (runs, memory) = if a.quick {
        (2, 256)
    } else {
        (a.runs.max(1), a.memory)
    };
    let ferry = std::env::current_exe()?;
    let lab = Lab::new(LabOptions::new(2, dir.join("lab")).with_daemons(&ferry))?;
    let config = dir.join("cli.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&crate::lab_cmd::cli_config(&lab))?,
    )?;
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let c = Ctx {
        lab: &lab,
        dir,
        ferry,
        config,
        guest,
        memory,
    };
    for h in ["hv1", "hv2"] {
        c.ferry(&[
            "--host",
            h,
            "host",
            "set",
            "--live-migration",
            "on",
            "--max-migrations",
            "2",
        ])?;
    }
    if !a.json {
        println!(
            "ferry move (daemons) beside ferry vmm migrate (direct), {memory} MiB guest, 2 vCPUs, {runs} moves each, lab veth, uncapped; medians"
        );
        println!(
            "{:<10} {:<8} {:>10} {:>12} {:>12} {:>12}",
            "workload", "path", "wall ms", "vmm pause", "guest gap", "noise floor"
        );
    }
    for (name, workload) in workloads(memory) {
        let (direct, dn) = direct_path(&c, &workload, runs)?;
        let (daemon, mn) = daemon_path(&c, &workload, runs)?;
        let row = |s: &[Sample]| {
            (
                median(s.iter().map(|x| x.wall_ms).collect()),
                median(s.iter().map(|x| x.downtime_ms).collect()),
                median(s.iter().map(|x| x.gap_ms).collect()),
            )
        };
        let (dw, dd, dg) = row(&direct);
        let (mw, md, mg) = row(&daemon);
        if a.json {
            for (path, w, d, g, n) in [("direct", dw, dd, dg, dn), ("daemon", mw, md, mg, mn)] {
                println!(
                    "{}",
                    serde_json::json!({"workload": name, "path": path, "memory_mib": memory, "runs": runs,
                        "wall_ms": w, "downtime_ms": d, "guest_gap_ms": g, "noise_floor_ms": n})
                );
            }
        } else {
            println!(
                "{name:<10} {:<8} {dw:>10.1} {dd:>12.1} {dg:>12.1} {dn:>12.1}",
                "direct"
            );
            println!(
                "{name:<10} {:<8} {mw:>10.1} {md:>12.1} {mg:>12.1} {mn:>12.1}",
                "daemon"
            );
            println!(
                "{name:<10} the daemon path adds {:+.1} ms to the total time and {:+.1} ms to the guest-observed pause (target: <= 50 ms, nothing beyond the noise floor)",
                mw - dw,
                mg - dg
            );
        }
    }
    let (single, evac) = evacuation(&c)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"evacuation_vms": 4, "limit": 2, "evacuation_ms": evac, "sum_of_single_moves_ms": single})
        );
    } else {
        println!(
            "evacuation of 4 idle 256 MiB VMs (limit 2): {evac:.0} ms; the same 4 moved one by one: {single:.0} ms in all ({:.2}x)",
            evac / single
        );
    }
    Ok(())
}
