//! The file server's API bodies (`ferry share run`): shares, their access lists, their disks
//! and each disk's write lease.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a host may do with a share's disks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Open its disks read-only.
    Read,
    /// Open them for writing too (the share's "Full Control"); writing needs the disk's lease.
    Write,
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" | "r" => Ok(Access::Read),
            "write" | "rw" | "w" => Ok(Access::Write),
            _ => Err(format!("{s:?} is not read or write")),
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// The file server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ShareServerInfo {
    pub name: String,
    pub version: String,
    /// Where NBD clients connect (host:port).
    pub nbd: Option<String>,
    /// Whether NBD needs TLS (STARTTLS with a cluster certificate).
    pub nbd_tls: bool,
    pub shares: usize,
}

/// `POST /v1/shares`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ShareCreate {
    pub name: String,
    /// The folder on the file server (made if missing; default `<state>/shares/<name>`).
    #[serde(default)]
    pub path: Option<String>,
}

/// A share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ShareInfo {
    pub name: String,
    pub path: String,
    /// Hosts by certificate name, and what each may do.
    pub access: BTreeMap<String, Access>,
    pub disks: Vec<DiskInfo>,
    /// Free bytes on the share's filesystem.
    pub free_bytes: u64,
}

/// `GET /v1/shares`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ShareList {
    pub shares: Vec<ShareInfo>,
}

/// `PUT /v1/shares/{share}/access/{host}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AccessSet {
    pub access: Access,
}

/// `POST /v1/shares/{share}/disks`: a sparse raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskCreate {
    pub name: String,
    pub size_bytes: u64,
}

/// Who may write a disk now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseInfo {
    /// The host holding the write lease, if any.
    pub holder: Option<String>,
    /// Rises on every hand-over: a connection opened under an older number cannot write.
    pub fence: u64,
    /// When it last changed, Unix ms.
    pub since_ms: u64,
    /// A move's destination its last holder handed the lease to: only that host may take it
    /// next (an admin may break it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_to: Option<String>,
    /// The grant (its id) of the delegated move that handed it over: the destination must
    /// show that grant to take the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

impl LeaseRequest {
    pub fn new(action: LeaseAction) -> LeaseRequest {
        LeaseRequest {
            action,
            to: None,
            grant: None,
        }
    }
}

/// A disk on a share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskInfo {
    pub share: String,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes actually allocated (the image is sparse).
    pub allocated_bytes: u64,
    /// Its NBD export name (`share/disk`), and the URI to give `--disk`.
    pub export: String,
    pub uri: Option<String>,
    pub lease: LeaseInfo,
}

/// `POST /v1/shares/{share}/disks/{disk}/lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseAction {
    /// Take the write lease for the calling host (it must have write access; refused while
    /// another host holds it).
    Acquire,
    /// Give it up (only its holder).
    Release,
    /// Its holder gives it to a move's destination (`to`): nobody else may take it next. In a
    /// delegated move the holder shows the move's grant, which must name this disk (or its
    /// share), the holder as source and `to` as destination; `to` must then show it too.
    HandOver,
    /// An admin takes it from whoever holds it (a host that is gone for good): its open
    /// connections can no longer write.
    Break,
}

/// `POST /v1/shares/{share}/disks/{disk}/lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseRequest {
    pub action: LeaseAction,
    /// HandOver: the host it is handed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A delegated move's grant (the JWS the admin signed), with HandOver and with the
    /// destination's Acquire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// `POST /v1/shares/{share}/disks/{disk}/copy`: a copy on this file server (holes stay holes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskCopy {
    /// The share to copy to (default: the same share).
    #[serde(default)]
    pub to_share: Option<String>,
    /// The new disk's name.
    pub to_name: String,
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskCopyReport {
    pub disk: DiskInfo,
    /// Bytes read and written.
    pub bytes_copied: u64,
    /// Bytes skipped as holes.
    pub bytes_skipped: u64,
    pub total_ms: u64,
}
