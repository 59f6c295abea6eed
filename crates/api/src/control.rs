//! The VMM control API: one JSON object per line over a unix socket, a request from the
//! client, a response from the VMM.
//!
//! ```text
//! -> {"cmd":"pause"}
//! <- {"ok":{"status":{"state":"paused", ...}}}
//! -> {"cmd":"save","dir":"/var/lib/ferry/snap1"}
//! <- {"ok":{"saved":{"dir":"/var/lib/ferry/snap1","memory_bytes":268435456,"ms":412}}}
//! -> {"cmd":"bogus"}
//! <- {"error":"unknown variant `bogus`, expected one of ..."}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A request to a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Stop every vCPU; devices stay quiet while paused.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Save the complete VM (state and memory) to a directory. Pauses first if needed and
    /// leaves the VM paused.
    Save { dir: PathBuf },
    /// Stop the VM and end the VMM process.
    Quit,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    Running,
    Paused,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmRunState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub uptime_ms: u64,
}

/// A VMM's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out.
    Ok(ResponseBody),
    /// It was not; the VM is as it was.
    Error(String),
}

/// The payload of a successful response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    Status(VmStatus),
    Saved {
        dir: PathBuf,
        memory_bytes: u64,
        ms: u64,
    },
    Done,
}
