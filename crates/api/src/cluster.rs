//! The cluster authority's API bodies (enrolment, removal, the migration group, the cluster
//! document) and the audit trail's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A host or file server of the cluster and where its daemon listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterMember {
    pub name: String,
    pub addr: String,
}

/// A certificate the cluster revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RevokedCert {
    pub serial: String,
    /// "host", "admin" or "fileserver".
    pub role: String,
    pub name: String,
    /// When, Unix seconds.
    pub at: i64,
}

/// `GET /v1/cluster`: the cluster document this host holds, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterInfo {
    pub cluster: String,
    pub version: u64,
    pub hosts: Vec<ClusterMember>,
    pub file_servers: Vec<ClusterMember>,
    pub migration_group: Vec<String>,
    pub revoked: Vec<RevokedCert>,
    /// This host's identity in the cluster.
    pub me: String,
    /// Whether this host holds the cluster authority.
    pub authority: bool,
}

/// `POST /v1/cluster/tokens`: a one-time join token for a party.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// "host", "admin" or "fileserver".
    pub role: String,
    pub name: String,
    /// How long it may be used, seconds (default 900).
    #[serde(default)]
    pub ttl_s: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenReply {
    pub token: String,
    pub expires_in_s: i64,
}

/// `POST /v1/cluster/join` (the authority's enrolment port): a join token and a certificate
/// request made where the key lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// PEM certificate request.
    pub csr: String,
    /// Where a joining host's or file server's daemon will listen (`host:port`).
    #[serde(default)]
    pub addr: Option<String>,
}

/// What enrolment gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JoinReply {
    /// The party's certificate (PEM).
    pub cert: String,
    /// The authority's certificate (PEM).
    pub ca: String,
    /// The signed cluster document.
    pub doc: String,
}

/// `POST /v1/cluster/remove`: take a party out of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub role: String,
    pub name: String,
}

/// `POST /v1/cluster/migration-group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    pub host: String,
    /// true adds it, false takes it out.
    pub member: bool,
}

/// `POST /v1/cluster/doc`: a newer signed cluster document (taken only if it verifies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DocPush {
    pub doc: String,
}

/// `GET /v1/cluster/version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DocVersion {
    pub version: u64,
}

/// One entry of a host's audit trail: who asked for what, and what was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Who asked: "admin alice (10.0.0.9:41234)", "host hv1 (...)", "local user 0".
    pub who: String,
    /// What: "move web01 to hv2", "receive web01 from hv1", "set live_migration=on", ...
    pub what: String,
    /// "allowed" or "refused".
    pub result: String,
    #[serde(default)]
    pub why: Option<String>,
    /// How it was authorised: "console", "grant <id> signed by admin alice", "local admin", ...
    #[serde(default)]
    pub auth: Option<String>,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}

/// `GET /v1/cluster/ca` (enrolment port): the authority's certificate, to be checked against
/// the pin in a join token before anything else is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CaInfo {
    pub ca: String,
    /// The host that holds the authority.
    pub authority: String,
}
