//! Types shared by ferry's VMM, host daemon and CLI.
//!
//! [`VmConfig`] is at once the config file, the REST body and the config a snapshot or a
//! migration carries: one type, one meaning everywhere.

pub mod cluster;
mod config;
mod control;
pub mod host;
pub mod openapi;
pub mod share;

pub use config::{
    format_mac, parse_mac, BootModule, ConfigError, DiskConfig, NetBackend, NetConfig,
    SerialBackend, VmConfig, DEFAULT_STALL_LIMIT_S, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};
pub use control::{
    Compression, MigrateSettings, MigrationForecast, MigrationMode, MigrationPhase,
    MigrationProgress, MigrationTls, MirrorProgress, MirrorState, MirrorSwitched, OnTimeout,
    Outcome, Request, Response, ResponseBody, VmRunState, VmStatus,
};
