//! `ferry demo`: the main job on a fresh machine, the whole story through the host daemons. It
//! brings up a lab of two hosts (network namespaces on one segment, a `ferry host run` in each,
//! live migration turned on) and a client, creates a VM on hv1 running ferry's test guest with
//! all its workloads (memory dirtier, disk writer, heartbeat, TCP server), holds a TCP stream
//! to it from the client, runs `ferry move` to hv2 and back exactly as an admin would, has the
//! guest prove after each move that its memory, disk and the stream are intact, and removes
//! the lab.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_api::host::MoveReport;
use ferry_lab::{longest_gap, Lab, LabOptions, Port, Stream};

/// How long the guest may take to answer.
const ANSWER: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Working set the guest rewrites flat out, in MiB.
    #[arg(long, default_value_t = 64)]
    dirty: u64,
    /// Keep the lab's state, disk image and logs here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn check(con: &Port) -> Result<(String, String, String)> {
    let v = con.ask(b'v', "VERIFY", ANSWER)?;
    let d = con.ask(b'd', "DISK VERIFY", ANSWER)?;
    let s = con.ask(b's', "STATUS", ANSWER)?;
    if !v.starts_with("VERIFY OK") || !d.starts_with("DISK VERIFY OK") {
        bail!("the guest found damage: {v} / {d}");
    }
    Ok((v, d, s))
}

pub fn run(a: DemoArgs) -> Result<()> {
    ferry_lab::require_root("ferry demo")?;
    let tmp = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    let dir = a.dir.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let result = demo(&a, &dir);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// `ferry ARGS` as the admin types it, shown, with the lab's CLI config.
fn ferry(config: &Path, args: &[&str]) -> Result<String> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.to_string()
            }
        })
        .collect();
    println!("      $ ferry {}", shown.join(" "));
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .env("FERRY_CONFIG", config)
        .env_remove("FERRY_HOST")
        .output()
        .context("running ferry")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "`ferry {}` failed:\n{}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn socket(lab: &Lab, host: usize, port: &str) -> PathBuf {
    lab.hosts[host].state_dir.join("vms/web01/run").join(port)
}

fn demo(a: &DemoArgs, dir: &Path) -> Result<()> {
    let ferry_bin = std::env::current_exe()?;
    let lab = Lab::new(LabOptions::new(2, dir.join("lab")).with_daemons(&ferry_bin))?;
    println!(
        "[1/6] lab: hosts hv1 ({}) and hv2 ({}) with a ferry host daemon each, and a client ({}), on one segment;\n      a cluster: its authority on hv1 (`ferry cluster init`), hv2 enrolled with a one-time token (`ferry host join`), both in the migration group",
        lab.hosts[0].ip,
        lab.hosts[1].ip,
        ferry_lab::CLIENT_IP
    );
    let config = dir.join("cli.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&crate::lab_cmd::cli_config(&lab))?,
    )?;
    for h in ["hv1", "hv2"] {
        ferry(
            &config,
            &["--host", h, "host", "set", "--live-migration", "on"],
        )?;
    }

    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let disk = dir.join("web01.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    let ip = ferry_lab::guest_ip(0);
    let cmdline = format!(
        "hb=2 dirty={} rate=0 disk=write flush=8 qd=8 ip={ip}/24",
        a.dirty
    );
    println!(
        "[2/6] a VM on hv1 running ferry's test guest: {} MiB, {} vCPUs, disk {}, a network card on br0\n      workloads: `{cmdline}`",
        a.memory,
        a.vcpus,
        disk.display()
    );
    let (mem, vcpus) = (a.memory.to_string(), a.vcpus.to_string());
    let (g, d) = (guest.display().to_string(), disk.display().to_string());
    ferry(
        &config,
        &[
            "--host",
            "hv1",
            "vm",
            "create",
            "web01",
            "--kernel",
            &g,
            "--memory",
            &mem,
            "--vcpus",
            &vcpus,
            "--disk",
            &d,
            "--net",
            "bridge=br0",
            "--cmdline",
            &cmdline,
            "--start",
        ],
    )?;
    let mut con = Port::connect(socket(&lab, 0, "con"), Duration::from_millis(2), ANSWER)?;
    let mut hb = Port::follow(socket(&lab, 0, "con2"), Duration::from_millis(2));
    let t = Instant::now();
    let ready = loop {
        if let Ok(s) = con.ask(b's', "STATUS", Duration::from_secs(2)) {
            break s;
        }
        if t.elapsed() > ANSWER {
            bail!("the guest did not answer on its console: {}", con.text());
        }
    };
    println!(
        "      the guest answers {} ms after `vm create` (its dirtier fills its working set first): {ready}",
        t.elapsed().as_millis()
    );
    let s = lab
        .connect_from_client(&format!("{ip}:19"), Duration::from_secs(10))
        .context("the client cannot reach the guest's TCP server")?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut stream = Stream::new(s);
    stream.read(4 << 20)?;
    std::thread::sleep(Duration::from_millis(500));
    let (v, d, s) = check(&con)?;
    println!(
        "      the client holds a TCP stream from the guest: {} counters verified",
        stream.next
    );
    println!("      {v}\n      {d}\n      {s}");
    print!("{}", ferry(&config, &["vm", "list"])?);

    let mut noise = hb.max_gap();
    for (step, (from, to, to_i)) in [("hv1", "hv2", 1usize), ("hv2", "hv1", 0)]
        .into_iter()
        .enumerate()
    {
        println!("[{}/6] live move {from} -> {to}", 3 + step);
        noise = noise.max(hb.max_gap());
        // The destination's serial sockets appear during the switch-over: watch them closely.
        let next_hb = Port::follow(socket(&lab, to_i, "con2"), Duration::from_micros(250));
        let t0 = Instant::now();
        let out = ferry(&config, &["--json", "move", "web01", "--to", to])?;
        let r: MoveReport = serde_json::from_str(out.lines().last().unwrap_or_default())
            .context("reading the move's report")?;
        while next_hb.is_empty() && t0.elapsed() < ANSWER {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut beats = hb.beats();
        beats.extend(next_hb.beats());
        let gap = longest_gap(&beats, t0, Instant::now());
        con.close();
        hb.close();
        con = Port::connect(socket(&lab, to_i, "con"), Duration::from_millis(2), ANSWER)?;
        hb = next_hb;
        stream.read(4 << 20)?;
        let (v, d, s) = check(&con)?;
        println!(
            "      {}: {} -> {} in {:.2} s, {:.1} MiB in {} rounds{}; pause {:.1} ms measured by ferry, {:.1} ms seen by the guest's heartbeat",
            r.result,
            r.from,
            r.to,
            r.total_ms as f64 / 1000.0,
            r.bytes as f64 / f64::from(1 << 20),
            r.rounds,
            if r.encrypted { ", encrypted (mutual TLS)" } else { ", NOT encrypted" },
            r.downtime_ms.unwrap_or_default(),
            gap.as_secs_f64() * 1000.0
        );
        if let Some(m) = r
            .migration
            .as_ref()
            .filter(|m| m.mode == ferry_api::MigrationMode::Postcopy)
        {
            // The guest ran on the destination before all its pages were there: what it saw
            // includes waiting for pages it touched first.
            println!(
                "      post-copy: {}",
                m.mode_reason
                    .as_deref()
                    .unwrap_or("the rest did not fit the pause")
            );
        }
        println!(
            "      TCP stream: {} counters, none lost or reordered",
            stream.next
        );
        println!("      {v}\n      {d}\n      {s}");
        print!("{}", ferry(&config, &["vm", "list"])?);
    }
    println!("[5/6] powering the guest off on hv1");
    con.send(b'p')?;
    let deadline = Instant::now() + ANSWER;
    loop {
        let out = ferry(&config, &["--json", "--host", "hv1", "vm", "show", "web01"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        if v["state"] == "stopped" {
            println!(
                "      web01 is stopped ({})",
                v["last_exit"]["reason"].as_str().unwrap_or("?")
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("the guest did not power off: {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("[6/6] removing the lab");
    drop(lab);
    println!(
        "done: web01 moved hv1 -> hv2 -> hv1 through the daemons while running; memory, disk and TCP verified after each move\n      (heartbeat noise floor with no move: {:.1} ms)",
        noise.as_secs_f64() * 1000.0
    );
    Ok(())
}
