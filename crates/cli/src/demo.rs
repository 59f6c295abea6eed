//! `ferry demo`: the main job on a fresh machine. Today it boots ferry's test guest, lets its
//! workload run, saves the whole VM, restores it in a new VMM process and proves the guest
//! carried on with its memory intact. (Live migration between hosts builds on this.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Working set the guest rewrites flat out, in MiB.
    #[arg(long, default_value_t = 64)]
    dirty: u64,
    /// Keep the snapshot and sockets here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Vmm {
    child: Child,
    api: PathBuf,
    console: UnixStream,
    text: Arc<Mutex<String>>,
    beats: Arc<Mutex<Vec<Instant>>>,
}

fn connect(path: &Path, child: &mut Child) -> Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Some(st) = child.try_wait()? {
            bail!("the VMM exited ({st}) before opening {}", path.display());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Vmm {
    fn start(dir: &Path, tag: &str, args: &[String]) -> Result<Vmm> {
        let api = dir.join(format!("{tag}.api"));
        let com1 = dir.join(format!("{tag}.com1"));
        let com2 = dir.join(format!("{tag}.com2"));
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .arg("--api")
            .arg(&api)
            .arg("--serial")
            .arg(format!("unix:{}", com1.display()))
            .arg("--serial2")
            .arg(format!("unix:{}", com2.display()))
            .arg("--paused")
            .stdin(Stdio::null())
            .spawn()?;
        let console = connect(&com1, &mut child)?;
        let hb = connect(&com2, &mut child)?;
        connect(&api, &mut child)?;
        let text = Arc::new(Mutex::new(String::new()));
        let beats = Arc::new(Mutex::new(Vec::new()));
        let (t, c) = (text.clone(), console.try_clone()?);
        std::thread::spawn(move || {
            let mut r = BufReader::new(c);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                t.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line);
                line.clear();
            }
        });
        let b = beats.clone();
        std::thread::spawn(move || {
            let mut hb = hb;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = hb.read(&mut buf) {
                let now = Instant::now();
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(std::iter::repeat_n(now, n));
            }
        });
        let vmm = Vmm {
            child,
            api,
            console,
            text,
            beats,
        };
        vmm.ctl(ferry_api::Request::Resume)?;
        Ok(vmm)
    }

    fn ctl(&self, req: ferry_api::Request) -> Result<ferry_api::ResponseBody> {
        match ferry_vmm::api_server::call(&self.api, &req)? {
            ferry_api::Response::Ok(b) => Ok(b),
            ferry_api::Response::Error(e) => bail!("{e}"),
        }
    }

    fn wait_line(&self, from: usize, prefix: &str) -> Result<(String, usize)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut off = 0;
            for line in text.split_inclusive('\n') {
                if off >= from && line.ends_with('\n') && line.starts_with(prefix) {
                    return Ok((line.trim_end().to_string(), off + line.len()));
                }
                off += line.len();
            }
            if Instant::now() > deadline {
                bail!("the guest did not print {prefix:?}; console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ask(&mut self, cmd: u8, prefix: &str) -> Result<String> {
        let from = self.text.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.console.write_all(&[cmd])?;
        Ok(self.wait_line(from, prefix)?.0)
    }

    fn beats(&self) -> (usize, Duration) {
        let b = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        let gap = b.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        (b.len(), gap)
    }

    fn wait_beats(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.beats().0 < n {
            if Instant::now() > deadline {
                bail!("heartbeat stalled at {} beats", self.beats().0);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let result = demo(&a, &dir);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo(a: &DemoArgs, dir: &Path) -> Result<()> {
    let guest = dir.join("testguest.elf");
    std::fs::write(&guest, ferry_testguest::elf())?;
    let cmdline = format!("mode=run hb=2 dirty={} rate=0", a.dirty);
    println!(
        "[1/4] booting the test guest: {} MiB, {} vCPUs, `{cmdline}`",
        a.memory, a.vcpus
    );
    let t = Instant::now();
    let args: Vec<String> = [
        "vm",
        "run",
        "--kernel",
        &guest.display().to_string(),
        "--cmdline",
        &cmdline,
        "--memory",
        &a.memory.to_string(),
        "--vcpus",
        &a.vcpus.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut src = Vmm::start(dir, "source", &args)?;
    let (banner, _) = src.wait_line(0, "ferry-testguest")?;
    src.wait_line(0, "READY")?;
    println!("      guest: {banner}");
    println!("      READY after {} ms", t.elapsed().as_millis());
    src.wait_beats(1000)?;
    let status = src.ask(b's', "STATUS")?;
    let verify = src.ask(b'v', "VERIFY")?;
    println!("      running: {status}");
    println!("      {verify}");
    if !verify.starts_with("VERIFY OK") {
        bail!("the guest's memory check failed before the snapshot");
    }

    let snap = dir.join("snapshot");
    let _ = std::fs::remove_dir_all(&snap);
    println!(
        "[2/4] pausing and saving the whole VM to {}",
        snap.display()
    );
    let saved = src.ctl(ferry_api::Request::Save { dir: snap.clone() })?;
    if let ferry_api::ResponseBody::Saved {
        memory_bytes, ms, ..
    } = saved
    {
        println!(
            "      saved in {ms} ms ({} MiB of non-zero memory)",
            memory_bytes >> 20
        );
    }
    let (src_beats, _) = src.beats();
    src.ctl(ferry_api::Request::Quit)?;
    src.child.wait()?;
    println!("      source VMM ended after {src_beats} heartbeats");

    println!("[3/4] restoring it in a new VMM process");
    let t = Instant::now();
    let mut dst = Vmm::start(
        dir,
        "restored",
        &["vm".into(), "restore".into(), snap.display().to_string()],
    )?;
    dst.wait_beats(1)?;
    println!(
        "      first heartbeat {} ms after the restore started",
        t.elapsed().as_millis()
    );
    dst.wait_beats(1000)?;
    let status = dst.ask(b's', "STATUS")?;
    let verify = dst.ask(b'v', "VERIFY")?;
    println!("      running: {status}");
    println!("      {verify}");
    let (beats, gap) = dst.beats();
    println!(
        "      {beats} heartbeats since restore, longest gap {:.1} ms",
        gap.as_secs_f64() * 1000.0
    );
    if !verify.starts_with("VERIFY OK") {
        bail!("the restored guest's memory check failed");
    }
    println!("[4/4] powering the guest off");
    dst.console.write_all(b"p")?;
    let st = dst.child.wait().context("waiting for the VMM")?;
    if !st.success() {
        bail!("the VMM ended with {st}");
    }
    println!("done: the guest ran, was saved, restored in a new process, and verified its memory intact.");
    Ok(())
}
