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
            Ok(r) => assert!(r.sim.start.is_some() && r.sim.state.is_some()),
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
        let page = |r: &common::Delivered, gpa: u64| {
            r.sim
                .memory
                .as_ref()
                .unwrap()
                .pages
                .borrow()
                .get(&gpa)
                .cloned()
        };
        if *name == "valid" {
            let r = r.expect("the valid stream is accepted");
            assert_eq!((r.pages, r.sim.rounds), (2, 1));
            // The zero page lands as nothing (fresh memory is zero), the data page as sent.
            assert_eq!(page(&r, 0x1000), None);
            assert_eq!(page(&r, 0x20_0000).unwrap()[..3], [1, 2, 3]);
        } else if *name == "postcopy" {
            let r = r.expect("the post-copy stream is accepted");
            assert_eq!((r.pages, r.sim.rounds, r.sim.postcopy_pages), (4, 1, 2));
            assert!(r.sim.prepared);
            assert_eq!(page(&r, 0x2000).unwrap()[..3], [0, 1, 2]);
        } else if *name == "packed" {
            let r = r.expect("the stream with compressed pages is accepted");
            assert_eq!((r.pages, r.sim.rounds), (5, 1));
            // The delta applied to the full page sent before it.
            let p = page(&r, 0x3000).unwrap();
            assert_eq!((p[7], p[8], p[23], p[24]), (0, 0xee, 0xee, 24 % 7));
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
