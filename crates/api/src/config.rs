//! The VM configuration.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Smallest guest RAM ferry accepts (MiB).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 64;

/// Where a serial port's bytes go (and, for `stdio` and `unix`, come from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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

/// A VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel image: ELF with a PVH note or a Multiboot header, or a Linux bzImage.
    pub kernel: PathBuf,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Initial ramdisk (Linux).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
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
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            cmdline: String::new(),
            initrd: None,
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            serial: SerialBackend::Null,
            serial2: SerialBackend::Null,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn config_json_is_tolerant() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k","future":1}"#).unwrap();
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.vcpus, 1);
    }
}
