//! Replays `fuzz/regressions/server/` through the same server loop the fuzz target runs
//! (`fuzz/common.rs`), on stable, under plain `cargo test`.
//!
//! `FERRY_WRITE_SEEDS=1 cargo test -p ferry-nbd --test fuzz_regressions` (re)writes the
//! generated seeds into `fuzz/regressions/server/` (and `fuzz/corpus/server/`).

#[path = "../fuzz/common.rs"]
mod common;

use std::path::Path;

#[test]
fn server_regressions_end_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    if std::env::var("FERRY_WRITE_SEEDS").is_ok() {
        for sub in ["regressions/server", "corpus/server"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            for (name, bytes) in common::seeds() {
                std::fs::write(dir.join(sub).join(name), bytes).unwrap();
            }
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(dir.join("regressions/server"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "no regression inputs in {}",
        dir.display()
    );
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        eprintln!("replaying {}", f.display());
        common::serve_bytes(&bytes);
    }
    // Generated seeds run too, so a change of the seeds is covered before they are written.
    for (_, bytes) in common::seeds() {
        common::serve_bytes(&bytes);
    }
}
