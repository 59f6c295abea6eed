//! `ferry vm ...`: VMs by name, through their host's daemon.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use ferry_api::host::{VmCreate, VmInfo, VmList, VmState, VmStop};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::host_cmd::rt;
use crate::target::Targets;
use crate::vmm_cmd::VmOptions;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define a VM on a host (and start it with --start). Takes the options of `ferry vmm run`
    /// or a config file; the daemon wires the serial ports (see `ferry vm console`).
    ///
    /// Example: ferry --host hv1 vm create web01 --kernel /srv/guest.elf --memory 1024 --vcpus 2 \
    ///     --disk /srv/web01.img --net bridge=br0 --start
    Create(CreateArgs),
    /// Start a defined VM.
    Start(NameArg),
    /// Stop a VM (its VMM quits; --force kills it).
    Stop {
        #[command(flatten)]
        name: NameArg,
        /// Kill the VMM at once instead of asking it to quit.
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped VM's definition (its disk images stay).
    Delete(NameArg),
    /// The VMs of a host (with no --host: of every host in the CLI config).
    List,
    /// Everything about one VM: state, config, VMM, last exit, move.
    Show(NameArg),
    /// Attach to a VM's serial port: what the guest prints appears here, what you type goes to
    /// the guest. On a terminal, Ctrl-] detaches.
    Console {
        #[command(flatten)]
        name: NameArg,
        /// Which serial port: 1 (COM1, the console) or 2.
        #[arg(long, default_value_t = 1)]
        port: u8,
    },
}

#[derive(Args)]
pub struct NameArg {
    /// The VM's name.
    pub name: String,
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name (letters, digits, '-', '_', '.').
    name: String,
    #[command(flatten)]
    vm: VmOptions,
    /// Start it right away.
    #[arg(long)]
    start: bool,
}

pub fn run(cmd: VmCmd, t: &Targets, json: bool) -> Result<()> {
    rt()?.block_on(async {
        match cmd {
            VmCmd::Create(a) => {
                let (_, c) = t.default()?;
                let req = VmCreate {
                    name: a.name,
                    config: a.vm.config()?,
                    start: a.start,
                };
                let v: VmInfo = c.post("/v1/vms", &req).await?;
                show(&v, json, false)
            }
            VmCmd::Start(n) => {
                let (_, c, _) = t.find_vm(&n.name).await?;
                let v: VmInfo = c
                    .post(&format!("/v1/vms/{}/start", n.name), &serde_json::json!({}))
                    .await?;
                show(&v, json, false)
            }
            VmCmd::Stop { name, force } => {
                let (_, c, _) = t.find_vm(&name.name).await?;
                let v: VmInfo = c
                    .post(&format!("/v1/vms/{}/stop", name.name), &VmStop { force })
                    .await?;
                show(&v, json, false)
            }
            VmCmd::Delete(n) => {
                let (h, c, _) = t.find_vm(&n.name).await?;
                c.delete(&format!("/v1/vms/{}", n.name)).await?;
                if !json {
                    println!("deleted {} from {h}", n.name);
                }
                Ok(())
            }
            VmCmd::Show(n) => {
                let (_, _, v) = t.find_vm(&n.name).await?;
                show(&v, json, true)
            }
            VmCmd::List => list(t, json).await,
            VmCmd::Console { name, port } => {
                let (_, c, _) = t.find_vm(&name.name).await?;
                console(&c, &name.name, port).await
            }
        }
    })
}

fn show(v: &VmInfo, json: bool, long: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let state = format!("{:?}", v.state).to_lowercase();
    println!(
        "{} on {}: {state}{}",
        v.name,
        v.host,
        v.pid.map(|p| format!(" (VMM pid {p})")).unwrap_or_default()
    );
    if !long {
        return Ok(());
    }
    let c = &v.config;
    println!(
        "  {} MiB, {} vCPUs, kernel {}{}",
        c.memory_mib,
        c.vcpus,
        c.kernel.display(),
        if c.cmdline.is_empty() {
            String::new()
        } else {
            format!(" `{}`", c.cmdline)
        }
    );
    for d in &c.disks {
        println!(
            "  disk {}{}",
            d.path.display(),
            if d.read_only { " (read-only)" } else { "" }
        );
    }
    for n in &c.nets {
        println!(
            "  net {:?} mac {}",
            n.backend,
            n.mac.as_deref().unwrap_or("-")
        );
    }
    if let Some(u) = v.uptime_ms {
        println!("  up {:.1} s", u as f64 / 1000.0);
    }
    if let Some(m) = &v.move_id {
        println!("  move {m}");
    }
    println!("  console {} (COM2 {})", v.console, v.console2);
    if let Some(e) = &v.last_exit {
        println!(
            "  last exit: {}{}",
            e.status,
            e.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        if v.state == VmState::Crashed {
            println!("  its last log lines:");
            for l in &e.log_tail {
                println!("    {l}");
            }
        }
    }
    Ok(())
}

async fn list(t: &Targets, json: bool) -> Result<()> {
    let hosts: Vec<(String, ferry_hostd::Client)> = if t.host.is_some() || t.config.hosts.is_empty()
    {
        vec![t.default()?]
    } else {
        t.config
            .hosts
            .keys()
            .map(|n| t.resolve(n))
            .collect::<Result<_>>()?
    };
    let mut all = Vec::new();
    let mut errors = Vec::new();
    let asked = hosts.len();
    for (h, c) in hosts {
        match c.get::<VmList>("/v1/vms").await {
            Ok(l) => all.extend(l.vms),
            Err(e) => {
                eprintln!("ferry: {h}: {e}");
                errors.push(h);
            }
        }
    }
    if errors.len() == asked {
        bail!("no host answered");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&VmList { vms: all })?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<10} {:>7} {:>5}  MOVE",
        "NAME", "HOST", "STATE", "MiB", "vCPU"
    );
    for v in all {
        println!(
            "{:<20} {:<10} {:<10} {:>7} {:>5}  {}",
            v.name,
            v.host,
            format!("{:?}", v.state).to_lowercase(),
            v.config.memory_mib,
            v.config.vcpus,
            v.move_id.unwrap_or_default()
        );
    }
    Ok(())
}

/// The terminal in raw mode for as long as this lives.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(old) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = old.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        RawMode(Some(old))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                old,
            );
        }
    }
}

/// Ctrl-], the byte that detaches from a console (as telnet's escape).
const DETACH: u8 = 0x1d;

async fn console(c: &ferry_hostd::Client, name: &str, port: u8) -> Result<()> {
    let ws = c
        .websocket(&format!("/v1/vms/{name}/console?port={port}"))
        .await?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("ferry: attached to {name}'s COM{port}; Ctrl-] detaches\r");
    }
    let raw = RawMode::enter();
    let (mut tx, mut rx) = ws.split();
    // Stdin is read on a thread of its own (blocking reads), into a channel.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut detached = false;
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Ok(Message::Text(t))) => {
                    print!("{t}");
                    let _ = std::io::stdout().flush();
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            i = in_rx.recv() => match i {
                Some(bytes) => {
                    let (bytes, stop) = match bytes.iter().position(|&b| b == DETACH && tty) {
                        Some(p) => (bytes[..p].to_vec(), true),
                        None => (bytes, false),
                    };
                    if !bytes.is_empty() && tx.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                    if stop {
                        detached = true;
                        break;
                    }
                }
                // Input ended (a script's stdin): keep showing output until the VM ends it.
                None => std::future::pending::<()>().await,
            },
        }
    }
    drop(raw);
    if detached {
        eprintln!("\r\nferry: detached from {name}");
        return Ok(());
    }
    let _ = tx.close().await;
    bail!("{name}'s console closed (the VM stopped or moved)")
}
