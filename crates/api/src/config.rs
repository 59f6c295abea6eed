//! The VM configuration.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Smallest guest RAM ferry accepts (MiB).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 64;
/// Most virtio devices (disks + network cards) a VM may have.
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// Where a serial port's bytes go (and, for `stdio` and `unix`, come from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum SerialBackend {
    /// Discard output, no input.
    #[default]
    Null,
    /// The VMM's own stdin/stdout.
    Stdio,
    /// Append output to a file; no input.
    File(PathBuf),
    /// Listen on a unix socket and stream the port both ways to whoever connects.
    Unix(PathBuf),
}

impl fmt::Display for SerialBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialBackend::Null => write!(f, "null"),
            SerialBackend::Stdio => write!(f, "stdio"),
            SerialBackend::File(p) => write!(f, "file:{}", p.display()),
            SerialBackend::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for SerialBackend {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::SerialBackend(s.to_string());
        match s {
            "null" | "none" => Ok(SerialBackend::Null),
            "stdio" => Ok(SerialBackend::Stdio),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialBackend::File(p.into())),
                Some(("unix", p)) if !p.is_empty() => Ok(SerialBackend::Unix(p.into())),
                _ => Err(bad()),
            },
        }
    }
}

/// A virtio-blk disk on a raw image file or an NBD export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskConfig {
    /// The image file, or an NBD export as `nbd://HOST:PORT/EXPORT` (`nbds://` with TLS).
    pub path: PathBuf,
    /// Expose the disk read-only (several VMMs may then share it).
    #[serde(default)]
    pub read_only: bool,
    /// Serial number the guest reads (up to 20 bytes); default `ferry-diskN`.
    #[serde(default)]
    pub serial: Option<String>,
    /// NBD disks: how long guest I/O waits through an outage of the server or the network
    /// (reconnecting, resending what was not acknowledged) before it fails; default 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_limit_s: Option<u64>,
    /// Request queues offered to the guest (1 to 16); default one per vCPU, as QEMU does. A
    /// guest that supports multiqueue (Linux's virtio-blk does) gives each CPU its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// The default stall limit of an NBD disk.
pub const DEFAULT_STALL_LIMIT_S: u64 = 60;

impl DiskConfig {
    /// The NBD URI, when the disk is an NBD export.
    pub fn nbd_uri(&self) -> Option<&str> {
        let s = self.path.to_str()?;
        (s.starts_with("nbd://") || s.starts_with("nbds://")).then_some(s)
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `PATH|nbd://HOST:PORT/EXPORT[,readonly][,serial=S][,stall=SECONDS][,queues=N]`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError::Disk(s.into()))?;
        let mut d = DiskConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            stall_limit_s: None,
            queues: None,
        };
        for p in parts {
            match p.split_once('=') {
                None if p == "readonly" || p == "ro" => d.read_only = true,
                Some(("serial", v)) if !v.is_empty() && v.len() <= 20 => d.serial = Some(v.into()),
                Some(("stall", v)) if d.nbd_uri().is_some() => {
                    d.stall_limit_s = Some(v.parse().map_err(|_| ConfigError::Disk(s.into()))?)
                }
                Some(("queues", v)) => match v.parse() {
                    Ok(n @ 1..=16) => d.queues = Some(n),
                    _ => return Err(ConfigError::Disk(s.into())),
                },
                _ => return Err(ConfigError::Disk(s.into())),
            }
        }
        Ok(d)
    }
}

/// Where a virtio-net card is plugged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// An existing tap device (e.g. made with `ip tuntap add NAME mode tap`).
    Tap(String),
    /// A bridge: ferry makes a tap, attaches it and removes it when the VM ends.
    Bridge(String),
}

/// A virtio-net card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The card's MAC, `52:54:00:xx:xx:xx` style; ferry picks one if unset, and keeps it for
    /// the VM's lifetime (it travels with snapshots and moves).
    #[serde(default)]
    pub mac: Option<String>,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// `tap=NAME[,mac=MAC]` or `bridge=BR[,mac=MAC]`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Net(s.into());
        let mut backend = None;
        let mut mac = None;
        for p in s.split(',') {
            match p.split_once('=') {
                Some(("tap", v)) if valid_ifname(v) => backend = Some(NetBackend::Tap(v.into())),
                Some(("bridge", v)) if valid_ifname(v) => {
                    backend = Some(NetBackend::Bridge(v.into()))
                }
                Some(("mac", v)) => {
                    parse_mac(v).ok_or_else(bad)?;
                    mac = Some(v.to_ascii_lowercase());
                }
                _ => return Err(bad()),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or_else(bad)?,
            mac,
        })
    }
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parse `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut it = s.split(':');
    for b in mac.iter_mut() {
        let part = it.next()?;
        if part.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    if it.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// Format a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A file loaded into guest memory beside the kernel: a Linux initrd, or a Multiboot (or PVH)
/// module, which the kernel is told about with its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BootModule {
    pub path: PathBuf,
    /// What the kernel is told with the module; without one, the path (GRUB and QEMU hand a
    /// module's whole `PATH ARGS` line to the kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl BootModule {
    /// A module without arguments.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BootModule {
            path: path.into(),
            cmdline: None,
        }
    }

    /// The command line the kernel sees for this module.
    pub fn cmdline(&self) -> String {
        self.cmdline
            .clone()
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// Modules as QEMU's `-initrd` takes them: a comma list (`,,` is a comma in a name) of
    /// `PATH [ARGS]`, the whole item being the module's command line.
    ///
    /// ```
    /// let m = ferry_api::BootModule::parse_list("mod1.bin speed=3,mod2.bin");
    /// assert_eq!(m[0].path.to_str(), Some("mod1.bin"));
    /// assert_eq!(m[0].cmdline(), "mod1.bin speed=3");
    /// assert_eq!(m[1].cmdline(), "mod2.bin");
    /// ```
    pub fn parse_list(s: &str) -> Vec<BootModule> {
        let mut items = vec![String::new()];
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    items.last_mut().expect("one item").push(',');
                } else {
                    items.push(String::new());
                }
            } else {
                items.last_mut().expect("one item").push(c);
            }
        }
        items
            .into_iter()
            .map(|i| i.trim().to_string())
            .filter(|i| !i.is_empty())
            .map(|item| {
                let path = item.split(' ').next().unwrap_or_default().to_string();
                let cmdline = (item != path).then_some(item);
                BootModule {
                    path: PathBuf::from(path),
                    cmdline,
                }
            })
            .collect()
    }
}

/// `initrd` as configs before modules wrote it (null or one path), or as now (a list).
fn modules_compat<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<BootModule>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Path(PathBuf),
        Module(BootModule),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Field {
        One(PathBuf),
        Many(Vec<Item>),
    }
    Ok(match Option::<Field>::deserialize(d)? {
        None => Vec::new(),
        Some(Field::One(p)) => vec![BootModule::new(p)],
        Some(Field::Many(v)) => v
            .into_iter()
            .map(|i| match i {
                Item::Path(p) => BootModule::new(p),
                Item::Module(m) => m,
            })
            .collect(),
    })
}

/// A VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VmConfig {
    /// Kernel image: ELF with a PVH note or a Multiboot header, or a Linux bzImage.
    pub kernel: PathBuf,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Files loaded beside the kernel: a Linux initrd (one), or Multiboot / PVH modules,
    /// each with its command line. An older config's single path (or null) still reads.
    #[serde(default, deserialize_with = "modules_compat")]
    pub initrd: Vec<BootModule>,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// COM1 (0x3f8, IRQ 4).
    #[serde(default)]
    pub serial: SerialBackend,
    /// COM2 (0x2f8, IRQ 3).
    #[serde(default)]
    pub serial2: SerialBackend,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// CPU features to hide from the guest (names as in /proc/cpuinfo, e.g. `avx512f`), so it
    /// can move to hosts whose processors lack them.
    #[serde(default)]
    pub cpu_hide: Vec<String>,
}

fn default_memory_mib() -> u64 {
    256
}

fn default_vcpus() -> u8 {
    1
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("serial backend {0:?} is not one of: stdio, null, file:PATH, unix:PATH")]
    SerialBackend(String),
    #[error("memory {0} MiB is too small: a VM needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("COM1 and COM2 cannot both use stdio")]
    TwoStdio,
    #[error("COM1 and COM2 cannot share {0}")]
    SharedPath(String),
    #[error("disk {0:?} is not PATH|nbd://HOST:PORT/EXPORT[,readonly][,serial=S][,stall=SECONDS][,queues=N] (serial up to 20 bytes; stall only for NBD; queues 1 to 16)")]
    Disk(String),
    #[error("network card {0:?} is not tap=NAME[,mac=MAC] or bridge=BR[,mac=MAC]")]
    Net(String),
    #[error("too many devices: at most {MAX_VIRTIO_DEVICES} disks and network cards together")]
    TooManyDevices,
    #[error("disk {0} is given twice")]
    DuplicateDisk(String),
    #[error("MAC {0} is not a unicast address like 52:54:00:12:34:56")]
    Mac(String),
    #[error("CPU feature {0:?} is not one ferry knows (names as in /proc/cpuinfo, e.g. avx2)")]
    CpuFeature(String),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            cmdline: String::new(),
            initrd: Vec::new(),
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            serial: SerialBackend::Null,
            serial2: SerialBackend::Null,
            disks: Vec::new(),
            nets: Vec::new(),
            cpu_hide: Vec::new(),
        }
    }

    /// Check what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        match (&self.serial, &self.serial2) {
            (SerialBackend::Stdio, SerialBackend::Stdio) => return Err(ConfigError::TwoStdio),
            (SerialBackend::File(a), SerialBackend::File(b))
            | (SerialBackend::Unix(a), SerialBackend::Unix(b))
                if a == b =>
            {
                return Err(ConfigError::SharedPath(a.display().to_string()))
            }
            _ => {}
        }
        if self.disks.len() + self.nets.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices);
        }
        for (i, d) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|o| o.path == d.path) {
                return Err(ConfigError::DuplicateDisk(d.path.display().to_string()));
            }
        }
        for n in &self.nets {
            if let Some(m) = &n.mac {
                parse_mac(m).ok_or_else(|| ConfigError::Mac(m.clone()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_as_qemu_takes_them_and_old_configs_still_read() {
        let m = BootModule::parse_list(" a.bin x=1 y ,b,,c.bin,, ,");
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].path, PathBuf::from("a.bin"));
        assert_eq!(m[0].cmdline(), "a.bin x=1 y");
        assert_eq!(m[1].path, PathBuf::from("b,c.bin,"));
        assert_eq!(m[1].cmdline, None);
        let old: VmConfig = serde_json::from_str(r#"{"kernel":"k","initrd":"/boot/i"}"#).unwrap();
        assert_eq!(old.initrd, vec![BootModule::new("/boot/i")]);
        let none: VmConfig = serde_json::from_str(r#"{"kernel":"k","initrd":null}"#).unwrap();
        assert!(none.initrd.is_empty());
        let mut c = VmConfig::new("k");
        c.initrd = m;
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn serial_backends_parse() {
        assert_eq!("stdio".parse(), Ok(SerialBackend::Stdio));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialBackend::File("/tmp/x".into()))
        );
        assert_eq!(
            "unix:/run/s".parse(),
            Ok(SerialBackend::Unix("/run/s".into()))
        );
        assert!("file:".parse::<SerialBackend>().is_err());
        assert!("tcp:1.2.3.4:5".parse::<SerialBackend>().is_err());
    }

    #[test]
    fn validate_refuses_bad_configs() {
        let mut c = VmConfig::new("k");
        assert_eq!(c.validate(), Ok(()));
        c.memory_mib = 1;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(1)));
        c.memory_mib = 64;
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 2;
        c.serial = SerialBackend::Stdio;
        c.serial2 = SerialBackend::Stdio;
        assert_eq!(c.validate(), Err(ConfigError::TwoStdio));
    }

    #[test]
    fn disks_and_nets_parse() {
        let d: DiskConfig = "/img/a.raw,readonly,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img/a.raw".into(),
                read_only: true,
                serial: Some("abc".into()),
                stall_limit_s: None,
                queues: None,
            }
        );
        let d: DiskConfig = "/img/a.raw,queues=4".parse().unwrap();
        assert_eq!(d.queues, Some(4));
        assert!("/a,queues=0".parse::<DiskConfig>().is_err());
        assert!("/a,queues=17".parse::<DiskConfig>().is_err());
        let d: DiskConfig = "nbd://fs1:10809/web01,stall=5".parse().unwrap();
        assert_eq!(d.nbd_uri(), Some("nbd://fs1:10809/web01"));
        assert_eq!(d.stall_limit_s, Some(5));
        assert!("/a,stall=5".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
        assert!("/a,bogus".parse::<DiskConfig>().is_err());
        let n: NetConfig = "bridge=br0,mac=52:54:00:AA:bb:01".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Bridge("br0".into()));
        assert_eq!(n.mac.as_deref(), Some("52:54:00:aa:bb:01"));
        assert!("tap=".parse::<NetConfig>().is_err());
        assert!(
            "tap=x,mac=01:00:00:00:00:00".parse::<NetConfig>().is_err(),
            "multicast"
        );
        assert!("tap=waytoolonginterfacename".parse::<NetConfig>().is_err());
        assert!(
            "mac=52:54:00:00:00:01".parse::<NetConfig>().is_err(),
            "no backend"
        );
        assert_eq!(
            format_mac(&parse_mac("52:54:00:0a:0b:0c").unwrap()),
            "52:54:00:0a:0b:0c"
        );
    }

    #[test]
    fn config_json_is_tolerant() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k","future":1}"#).unwrap();
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.vcpus, 1);
    }
}
