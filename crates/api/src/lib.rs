//! Types shared by ferry's VMM, host daemon and CLI.
//!
//! [`VmConfig`] is at once the config file, the REST body and the config a snapshot or a
//! migration carries: one type, one meaning everywhere.

mod config;
mod control;

pub use config::{ConfigError, SerialBackend, VmConfig, MAX_VCPUS, MIN_MEMORY_MIB};
pub use control::{Request, Response, ResponseBody, VmRunState, VmStatus};
