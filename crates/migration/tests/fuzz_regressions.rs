//! Replays the fuzz regression inputs in `fuzz/regressions/<target>/` through the same receive
//! loop the fuzz targets run (`fuzz/common.rs`), on stable, under plain `cargo test`.
//!
//! `FERRY_WRITE_SEEDS=1 cargo test -p ferry-migration --test fuzz_regressions` (re)writes the
//! generated seed inputs into `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.

#[path = "../fuzz/common.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join("regressions").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, b)
        })
        .collect()
}

#[test]
fn receive_regressions_error_or_complete_without_panicking() {
    let files = inputs("receive");
    assert!(!files.is_empty(), "no regression inputs");
    for (path, bytes) in files {
        // A panic here (decoder bug or broken invariant) fails the test and names no file,
        // so say which one first.
        eprintln!("replaying {}", path.display());
        match common::receive(&bytes) {
            Ok(r) => assert!(r.start.is_some() && r.state.is_some()),
            Err(e) => eprintln!("  refused: {e:?}"),
        }
    }
}

#[test]
fn envelope_regressions_do_not_panic() {
    for (path, bytes) in inputs("envelope") {
        eprintln!("replaying {}", path.display());
        common::envelope(&bytes);
    }
}

#[test]
fn generated_seeds_behave() {
    let seeds = common::receive_seeds();
    for (name, bytes) in &seeds {
        let r = common::receive(bytes);
        if *name == "valid" {
            let r = r.expect("the valid stream is accepted");
            assert_eq!((r.pages, r.zero_pages, r.rounds), (2, 1, 1));
        } else if *name == "postcopy" {
            let r = r.expect("the post-copy stream is accepted");
            assert_eq!((r.pages, r.zero_pages, r.rounds), (4, 1, 1));
        } else if *name == "packed" {
            let r = r.expect("the stream with compressed pages is accepted");
            assert_eq!((r.pages, r.zero_pages, r.rounds), (5, 2, 1));
        } else {
            assert!(r.is_err(), "{name} accepted");
        }
    }
    let envs = common::envelope_seeds();
    for (name, bytes) in &envs {
        let r = ferry_migration::Envelope::MigrationState.decode::<serde_json::Value>(bytes);
        assert_eq!(r.is_ok(), *name == "valid", "{name}");
        common::envelope(bytes);
    }
    assert_eq!(common::crc32(b"123456789"), 0xcbf4_3926);
    if std::env::var_os("FERRY_WRITE_SEEDS").is_some() {
        for (target, seeds) in [("receive", &seeds), ("envelope", &envs)] {
            for dir in ["corpus", "regressions"] {
                let d = fuzz_dir().join(dir).join(target);
                fs::create_dir_all(&d).expect("mkdir");
                for (name, bytes) in seeds {
                    fs::write(d.join(format!("seed-{name}")), bytes).expect("write seed");
                }
            }
        }
    }
}
