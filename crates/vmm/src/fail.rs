//! Failure injection for tests. Each hook reads an environment variable once per call and does
//! nothing unless it names the point; production never sets them.
//!
//! - `FERRY_CRASH_AT=<point>`: the process dies abruptly (as a crashed host would) at that point.
//! - `FERRY_FAIL_AT=<point>[,<point>...]`: the step at that point fails as if the host refused it.
//!
//! Points: `after-state`, `on-commit`, `after-resume` (destination, crash); `drop-ack`
//! (destination: the final acknowledgement is lost on the wire), `refuse-commit` (destination
//! refuses Commit), `release-disk-1` (source: the second disk cannot be released), `pause-vcpu-1`
//! (source: vCPU 1 does not stop).

/// Die here if `FERRY_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    if std::env::var("FERRY_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("ferry: FERRY_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

/// Whether `FERRY_FAIL_AT` names `point`.
pub fn fail_point(point: &str) -> bool {
    let hit = std::env::var("FERRY_FAIL_AT").is_ok_and(|p| p.split(',').any(|q| q == point));
    if hit {
        eprintln!("ferry: FERRY_FAIL_AT={point}: failing here");
    }
    hit
}
