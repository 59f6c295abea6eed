//! The audit trail: who asked this host for what, how it was authorised, and what was decided,
//! one JSON line per decision in `<state>/audit.jsonl` (appended, never rewritten). Refusals
//! are logged too, with who, what and why.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use ferry_api::cluster::AuditEntry;

use crate::transport::Peer;

static LOCK: Mutex<()> = Mutex::new(());

fn path(state: &Path) -> std::path::PathBuf {
    state.join("audit.jsonl")
}

/// Record a decision.
pub fn record(state: &Path, who: &Peer, what: &str, refused: Option<&str>, auth: Option<&str>) {
    let e = AuditEntry {
        at_ms: crate::vmm::now_ms(),
        who: who.describe(),
        what: what.into(),
        result: if refused.is_some() {
            "refused"
        } else {
            "allowed"
        }
        .into(),
        why: refused.map(|s| s.to_string()),
        auth: auth.map(|s| s.to_string()),
    };
    match refused {
        Some(why) => tracing::warn!("refused {}: {what}: {why}", e.who),
        None => tracing::info!(
            "allowed {}: {what}{}",
            e.who,
            auth.map(|a| format!(" ({a})")).unwrap_or_default()
        ),
    }
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let line = serde_json::to_string(&e).unwrap_or_default();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path(state))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The last `n` entries.
pub fn read(state: &Path, n: usize) -> Vec<AuditEntry> {
    let text = std::fs::read_to_string(path(state)).unwrap_or_default();
    let all: Vec<AuditEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    all[all.len().saturating_sub(n)..].to_vec()
}
