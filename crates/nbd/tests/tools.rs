//! Interoperability with real NBD tools: qemu-img, nbdinfo and nbdcopy against the ferry
//! server; the ferry client against qemu-nbd and nbdkit.

mod common;

use common::*;
use ferry_nbd::proto::{Extent, FLAG_SEND_TRIM, STATE_HOLE};
use ferry_nbd::Client;

fn uri(addr: std::net::SocketAddr) -> String {
    format!("nbd://{addr}/disk")
}

#[test]
fn qemu_img_info_reports_size() {
    if !have_tool("qemu-img") {
        return;
    }
    let d = tmp();
    let img = path(&d, "disk.raw");
    make_image(&img, 1);
    let addr = serve_file(&img, true, None);
    let out = run_ok("qemu-img", &["info", "--output=json", &uri(addr)]);
    let want = format!("\"virtual-size\": {IMAGE_SIZE}");
    assert!(out.contains(&want), "no {want} in {out}");
}

#[test]
fn qemu_img_convert_reads_export() {
    if !have_tool("qemu-img") {
        return;
    }
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 2);
    let addr = serve_file(&img, true, None);
    let out = path(&d, "out.raw");
    run_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri(addr), out.to_str().unwrap()],
    );
    assert_same(
        &std::fs::read(&out).unwrap(),
        &want,
        "qemu-img convert from ferry",
    );
}

#[test]
fn qemu_img_convert_writes_export() {
    if !have_tool("qemu-img") {
        return;
    }
    let d = tmp();
    let src = path(&d, "src.raw");
    let want = make_image(&src, 3);
    let dst = path(&d, "dst.raw");
    // Start from non-zero data so zero ranges must really be written.
    std::fs::write(&dst, pattern(99, IMAGE_SIZE as usize)).unwrap();
    let addr = serve_file(&dst, false, None);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri(addr),
        ],
    );
    assert_same(
        &std::fs::read(&dst).unwrap(),
        &want,
        "qemu-img convert to ferry",
    );
}

#[test]
fn nbdinfo_shows_size_and_map() {
    if !have_tool("nbdinfo") {
        return;
    }
    let d = tmp();
    let img = path(&d, "disk.raw");
    make_image(&img, 4);
    let addr = serve_file(&img, true, None);
    let out = run_ok("nbdinfo", &[&uri(addr)]);
    assert!(out.contains(&IMAGE_SIZE.to_string()), "size missing: {out}");
    assert!(out.contains("base:allocation"), "no base:allocation: {out}");
    let map = run_ok("nbdinfo", &["--map", &uri(addr)]);
    // Lines: offset length type description
    let mut saw_hole_at = false;
    let mut saw_data_at_0 = false;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let kind: u32 = f[2].parse().unwrap();
        if off <= HOLE_AT && HOLE_AT < off + len {
            assert_eq!(
                kind & STATE_HOLE,
                STATE_HOLE,
                "no hole at {HOLE_AT}: {line}"
            );
            assert!(line.contains("hole"), "{line}");
            saw_hole_at = true;
        }
        if off == 0 {
            assert_eq!(kind, 0, "offset 0 should be data: {line}");
            assert!(line.contains("data"), "{line}");
            saw_data_at_0 = true;
        }
    }
    assert!(saw_hole_at && saw_data_at_0, "map incomplete:\n{map}");
}

#[test]
fn nbdcopy_reads_and_writes() {
    if !have_tool("nbdcopy") {
        return;
    }
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 5);
    let addr = serve_file(&img, true, None);
    let out = path(&d, "out.raw");
    make_empty(&out, 0);
    run_ok("nbdcopy", &[&uri(addr), out.to_str().unwrap()]);
    assert_same(&std::fs::read(&out).unwrap(), &want, "nbdcopy from ferry");

    let dst = path(&d, "dst.raw");
    std::fs::write(&dst, pattern(77, IMAGE_SIZE as usize)).unwrap();
    let addr = serve_file(&dst, false, None);
    run_ok(
        "nbdcopy",
        &["--requests=32", img.to_str().unwrap(), &uri(addr)],
    );
    assert_same(&std::fs::read(&dst).unwrap(), &want, "nbdcopy to ferry");
}

/// Write, read back, flush, trim, zero and query a foreign server through the ferry client.
fn exercise_client(c: &Client, can_trim_holes: bool) {
    let size = c.size();
    assert!(size >= 8 * MIB);
    assert!(c.info().structured, "no structured replies");
    assert!(c.info().base_allocation.is_some(), "no base:allocation");
    let data = pattern(11, 3 * MIB as usize + 123);
    c.write(MIB, &data, false).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(MIB, &mut back).unwrap();
    assert_same(&back, &data, "read back");
    c.write(0, &data[..4096], true).unwrap();
    c.flush().unwrap();
    if c.flags() & FLAG_SEND_TRIM != 0 {
        c.trim(MIB, MIB).unwrap();
    }
    c.write_zeroes(2 * MIB, MIB, false).unwrap();
    let mut z = vec![1u8; MIB as usize];
    c.read(2 * MIB, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0), "write_zeroes did not zero");
    {
        let ex: Vec<Extent> = c.block_status(0, 8 * MIB as u32).unwrap();
        assert!(!ex.is_empty());
        let total: u64 = ex.iter().map(|e| u64::from(e.len)).sum();
        assert!(total <= 8 * MIB);
        assert_eq!(ex[0].flags & STATE_HOLE, 0, "offset 0 was written: {ex:?}");
        if can_trim_holes {
            assert!(ex.iter().any(|e| e.flags & STATE_HOLE != 0), "{ex:?}");
        }
    }
}

#[test]
fn client_against_qemu_nbd() {
    if !have_tool("qemu-nbd") {
        return;
    }
    let d = tmp();
    let img = path(&d, "q.raw");
    make_empty(&img, 16 * MIB);
    let port = free_port();
    let p = port.to_string();
    let _q = start_daemon(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-p",
            &p,
            "--bind",
            "127.0.0.1",
            "-x",
            "name",
            "-t",
            "--discard=unmap",
            img.to_str().unwrap(),
        ],
        port,
    );
    let c = Client::connect(("127.0.0.1", port), "name", None).unwrap();
    assert_eq!(c.size(), 16 * MIB);
    assert!(c.info().structured);
    exercise_client(&c, true);
    drop(c);
    // The data went to the file.
    let f = std::fs::read(&img).unwrap();
    assert_same(&f[..4096], &pattern(11, 4096), "qemu-nbd file");
    // Unknown export names are refused with a message.
    let e = Client::connect(("127.0.0.1", port), "nope", None).unwrap_err();
    eprintln!("unknown export: {e}");
}

#[test]
fn client_against_nbdkit_memory_and_file() {
    if !have_tool("nbdkit") {
        return;
    }
    let port = free_port();
    let p = port.to_string();
    {
        let _k = start_daemon(
            "nbdkit",
            &["-f", "-p", &p, "-i", "127.0.0.1", "memory", "64M"],
            port,
        );
        let c = Client::connect(("127.0.0.1", port), "", None).unwrap();
        assert_eq!(c.size(), 64 * MIB);
        exercise_client(&c, true);
    }
    let d = tmp();
    let img = path(&d, "k.raw");
    make_empty(&img, 16 * MIB);
    let port = free_port();
    let p = port.to_string();
    let _k = start_daemon(
        "nbdkit",
        &[
            "-f",
            "-p",
            &p,
            "-i",
            "127.0.0.1",
            "file",
            img.to_str().unwrap(),
        ],
        port,
    );
    let c = Client::connect(("127.0.0.1", port), "", None).unwrap();
    assert_eq!(c.size(), 16 * MIB);
    exercise_client(&c, true);
    drop(c);
    let f = std::fs::read(&img).unwrap();
    assert_same(&f[..4096], &pattern(11, 4096), "nbdkit file");
}
