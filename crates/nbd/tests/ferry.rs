//! The ferry client against the ferry server: pipelining, permissions, fencing, and clients
//! that misbehave on the wire.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_nbd::export::{Export, ExportProvider, Peer, RawFileExport, Refusal, ZeroFlags};
use ferry_nbd::proto::*;
use ferry_nbd::{Client, Reply, Request, RequestError};

#[test]
fn many_requests_in_flight() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    make_empty(&img, 64 * MIB);
    let addr = serve_file(&img, false, None);
    let c = Arc::new(Client::connect(addr, "disk", None).unwrap());
    assert_eq!(c.size(), 64 * MIB);
    assert!(c.info().structured);
    assert!(c.info().base_allocation.is_some());
    assert!(c.flags() & FLAG_CAN_MULTI_CONN != 0);

    // 4 threads, each with 64 writes of 64 KiB in flight at once, at distinct offsets.
    let block = 64 * 1024usize;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let tickets: Vec<_> = (0..64u64)
                    .map(|i| {
                        let n = t * 64 + i;
                        c.submit(&Request::Write {
                            offset: n * block as u64 * 3,
                            data: pattern(n, block).into(),
                            fua: false,
                        })
                        .unwrap()
                    })
                    .collect();
                for t in tickets {
                    assert_eq!(t.wait().unwrap(), Reply::Done);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    c.flush().unwrap();
    // Read everything back, 256 reads in flight, completions via callbacks.
    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..256u64 {
        let tx = tx.clone();
        c.submit_with(
            &Request::Read {
                offset: n * block as u64 * 3,
                len: block as u32,
            },
            Box::new(move |_, r| tx.send((n, r)).unwrap()),
        )
        .unwrap();
    }
    drop(tx);
    let mut seen = 0;
    for (n, r) in rx {
        let Ok(Reply::Data(d)) = r else {
            panic!("read {n}: {r:?}")
        };
        assert_same(&d, &pattern(n, block), "pipelined read");
        seen += 1;
    }
    assert_eq!(seen, 256);
    // And the file has it.
    let f = std::fs::read(&img).unwrap();
    for n in 0..256u64 {
        let o = (n * block as u64 * 3) as usize;
        assert_same(&f[o..o + block], &pattern(n, block), "backing file");
    }
    // Large transfers are split at the maximum block size and pipelined.
    let big = pattern(1234, 40 * MIB as usize);
    c.write(MIB, &big, true).unwrap();
    let mut back = vec![0u8; big.len()];
    c.read(MIB, &mut back).unwrap();
    assert_same(&back, &big, "40 MiB round trip");
}

#[test]
fn block_status_trim_and_zeroes() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 8);
    let addr = serve_file(&img, false, None);
    let c = Client::connect(addr, "disk", None).unwrap();
    let ex = c.block_status(0, IMAGE_SIZE as u32).unwrap();
    assert_eq!(ex[0].flags & STATE_HOLE, 0);
    let mut pos = 0u64;
    let mut hole_at = false;
    for e in &ex {
        if pos <= HOLE_AT && HOLE_AT < pos + u64::from(e.len) {
            hole_at = e.flags == STATE_HOLE | STATE_ZERO;
        }
        pos += u64::from(e.len);
    }
    assert!(hole_at, "{ex:?}");
    // REQ_ONE: one extent.
    let t = c
        .submit(&Request::BlockStatus {
            offset: 0,
            len: IMAGE_SIZE as u32,
            req_one: true,
        })
        .unwrap();
    let Ok(Reply::Extents(one)) = t.wait() else {
        panic!()
    };
    assert_eq!(one.len(), 1);
    let mut got = vec![0u8; IMAGE_SIZE as usize];
    c.read(0, &mut got).unwrap();
    assert_same(&got, &want, "image via ferry client");
    c.trim(0, MIB).unwrap();
    c.write_zeroes(5 * MIB, 4096, true).unwrap();
    let mut z = vec![1u8; 4096];
    c.read(5 * MIB, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    // Fast zero is either done fast or refused with ENOTSUP, never slow.
    match c
        .submit(&Request::WriteZeroes {
            offset: 6 * MIB,
            len: 4096,
            no_hole: false,
            fast: true,
            fua: false,
        })
        .unwrap()
        .wait()
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.errno(), Some(Errno::ENOTSUP)),
    }
    let ex = c.block_status(0, MIB as u32).unwrap();
    assert_eq!(
        ex[0].flags & STATE_HOLE,
        STATE_HOLE,
        "trim made a hole: {ex:?}"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 9);
    let addr = serve_file(&img, true, None);
    let c = Client::connect(addr, "disk", None).unwrap();
    assert!(c.read_only());
    let e = c.write(0, &[1, 2, 3], false).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EPERM), "{e}");
    // Past the end: EINVAL, and the connection keeps working.
    let e = c
        .submit(&Request::Read {
            offset: IMAGE_SIZE - 10,
            len: 20,
        })
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EINVAL), "{e}");
    assert!(e.to_string().contains("past the end"), "{e}");
    let mut b = vec![0u8; 4096];
    c.read(0, &mut b).unwrap();
    assert_same(&b, &want[..4096], "read after errors");
    assert_eq!(std::fs::read(&img).unwrap(), want);
}

/// An export whose writes can be fenced at any time (a lost lease).
struct Fenced {
    inner: RawFileExport,
    fenced: AtomicBool,
}

impl Export for Fenced {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, o: u64, b: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(o, b)
    }
    fn write_at(&self, o: u64, d: &[u8], fua: bool) -> io::Result<()> {
        self.inner.write_at(o, d, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, o: u64, l: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(o, l, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> io::Result<()> {
        self.inner.write_zeroes(o, l, f)
    }
    fn block_status(&self, o: u64, l: u32) -> io::Result<Vec<Extent>> {
        self.inner.block_status(o, l)
    }
    fn check_write(&self) -> Result<(), Errno> {
        if self.fenced.load(Ordering::SeqCst) {
            Err(Errno::EPERM)
        } else {
            Ok(())
        }
    }
}

struct One(Arc<Fenced>);

impl ExportProvider for One {
    fn open(&self, name: &str, _peer: &Peer) -> Result<Arc<dyn Export>, Refusal> {
        match name {
            "disk" => Ok(self.0.clone()),
            "secret" => Err(Refusal::Policy("not for you".into())),
            _ => Err(Refusal::Unknown(name.into())),
        }
    }
    fn list(&self, _peer: &Peer) -> Vec<String> {
        vec!["disk".into()]
    }
}

#[test]
fn fenced_writer_gets_eperm_mid_connection() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    make_empty(&img, 4 * MIB);
    let e = Arc::new(Fenced {
        inner: RawFileExport::open(&img, false).unwrap(),
        fenced: AtomicBool::new(false),
    });
    let addr = start_server(Arc::new(One(e.clone())), None);
    let c = Client::connect(addr, "disk", None).unwrap();
    c.write(0, &[7u8; 4096], false).unwrap();
    e.fenced.store(true, Ordering::SeqCst);
    let err = c.write(0, &[9u8; 4096], true).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EPERM), "{err}");
    assert_eq!(
        c.write_zeroes(0, 4096, false).unwrap_err().errno(),
        Some(Errno::EPERM)
    );
    assert_eq!(c.trim(0, 4096).unwrap_err().errno(), Some(Errno::EPERM));
    let mut b = vec![0u8; 4096];
    c.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7), "fenced write changed data");
    assert!(std::fs::read(&img).unwrap()[..4096].iter().all(|&x| x == 7));
    // Refusals reach the client with their message.
    match Client::connect(addr, "secret", None).unwrap_err() {
        ferry_nbd::ClientError::Refused { code, message, .. } => {
            assert_eq!(code, REP_ERR_POLICY);
            assert!(message.contains("not for you"), "{message}");
        }
        e => panic!("{e}"),
    }
    assert!(matches!(
        Client::connect(addr, "nope", None).unwrap_err(),
        ferry_nbd::ClientError::UnknownExport(_)
    ));
}

// ---------------------------------------------------------------------------------------
// Raw wire clients

fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Greeting and client flags; returns the stream in option haggling.
fn raw_handshake(addr: SocketAddr) -> TcpStream {
    let mut s = raw_connect(addr);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    let f = decode_greeting(&g).unwrap();
    assert_eq!(f, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn option_reply(s: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = decode_option_reply_header(&h).unwrap();
    let mut d = vec![0u8; h.len as usize];
    s.read_exact(&mut d).unwrap();
    (h, d)
}

/// Whether the server closed the connection (EOF or reset) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A raw connection in transmission via NBD_OPT_EXPORT_NAME (simple replies).
fn raw_transmission(addr: SocketAddr) -> (TcpStream, u64, u16) {
    let mut s = raw_handshake(addr);
    s.write_all(&encode_option(OPT_EXPORT_NAME, b"disk"))
        .unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    let size = u64::from_be_bytes(b[..8].try_into().unwrap());
    let flags = u16::from_be_bytes(b[8..].try_into().unwrap());
    (s, size, flags)
}

fn req(s: &mut TcpStream, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    s.write_all(&encode_request(&RequestHeader {
        flags,
        command,
        cookie,
        offset,
        len,
    }))
    .unwrap();
}

fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    decode_simple_reply_rest(b[4..].try_into().unwrap())
}

#[test]
fn bad_clients_only_hurt_themselves() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    let want = make_image(&img, 10);
    let addr = serve_file(&img, false, None);
    let good = Client::connect(addr, "disk", None).unwrap();
    let check_good = |what: &str| {
        let mut b = vec![0u8; 8192];
        good.read(0, &mut b).unwrap();
        assert_same(&b, &want[..8192], what);
    };

    // Garbage instead of an option.
    let mut s = raw_handshake(addr);
    s.write_all(&pattern(1, 64)).unwrap();
    assert!(closed(&mut s), "garbage option not closed");
    check_good("after garbage option");

    // Unknown client flags.
    let mut s = raw_connect(addr);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));

    // Oversize option length.
    let mut s = raw_handshake(addr);
    let mut h = encode_option(OPT_GO, &[]);
    h[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&h).unwrap();
    assert!(closed(&mut s), "oversize option not closed");
    check_good("after oversize option");

    // Options answered per spec, connection stays.
    let mut s = raw_handshake(addr);
    s.write_all(&encode_option(99, b"whatever")).unwrap();
    let (h, _) = option_reply(&mut s);
    assert_eq!((h.option, h.reply), (99, REP_ERR_UNSUP));
    s.write_all(&encode_option(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(
        option_reply(&mut s).0.reply,
        REP_ERR_UNSUP,
        "no TLS offered"
    );
    s.write_all(&encode_option(OPT_LIST, b"junk")).unwrap();
    assert_eq!(option_reply(&mut s).0.reply, REP_ERR_INVALID);
    s.write_all(&encode_option(OPT_LIST, &[])).unwrap();
    let (h, data) = option_reply(&mut s);
    assert_eq!(h.reply, REP_SERVER);
    assert_eq!(decode_rep_server(&data).unwrap(), "disk");
    assert_eq!(option_reply(&mut s).0.reply, REP_ACK);
    s.write_all(&encode_option(
        OPT_SET_META_CONTEXT,
        &encode_meta_request("disk", &[META_BASE_ALLOCATION]),
    ))
    .unwrap();
    assert_eq!(
        option_reply(&mut s).0.reply,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    s.write_all(&encode_option(OPT_INFO, &encode_info_request("nope", &[])))
        .unwrap();
    assert_eq!(option_reply(&mut s).0.reply, REP_ERR_UNKNOWN);
    s.write_all(&encode_option(OPT_ABORT, &[])).unwrap();
    assert_eq!(option_reply(&mut s).0.reply, REP_ACK);
    assert!(closed(&mut s));

    // Transmission with simple replies: errors keep the connection.
    let (mut s, size, flags) = raw_transmission(addr);
    assert_eq!(size, IMAGE_SIZE);
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF without structured replies");
    req(&mut s, CMD_READ, 0, 1, IMAGE_SIZE - 1, 2);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 1));
    req(&mut s, CMD_READ, 0, 2, u64::MAX - 1, 4096);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 2));
    req(&mut s, 42, 0, 3, 0, 0);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 3));
    req(&mut s, CMD_READ, 1 << 9, 4, 0, 512);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 4), "unknown flag");
    req(&mut s, CMD_READ, 0, 5, 0, MAX_REQUEST + 1);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 5), "oversize read");
    req(&mut s, CMD_BLOCK_STATUS, 0, 6, 0, 4096);
    assert_eq!(simple_reply(&mut s), (Errno::EINVAL.0, 6), "no context");
    req(&mut s, CMD_WRITE, 0, 7, IMAGE_SIZE - 2, 4);
    s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(simple_reply(&mut s), (Errno::ENOSPC.0, 7));
    req(&mut s, CMD_READ, 0, 8, 0, 16);
    assert_eq!(simple_reply(&mut s), (0, 8));
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, &want[..16]);
    check_good("during a bad transmission");
    // Oversize write: cannot be skipped, so that connection closes.
    req(&mut s, CMD_WRITE, 0, 9, 0, 64 << 20);
    assert!(closed(&mut s), "oversize write not closed");

    // Corrupt request magic closes the connection.
    let (mut s, _, _) = raw_transmission(addr);
    s.write_all(&pattern(3, 28)).unwrap();
    assert!(closed(&mut s));

    // A flood of random garbage connections.
    for i in 0..20u64 {
        let mut s = raw_connect(addr);
        let _ = s.write_all(&pattern(100 + i, 10 + (i as usize) * 37));
        drop(s);
    }
    check_good("after garbage connections");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        want,
        "bad clients changed data"
    );

    // Soft disconnect answers in-flight requests first.
    let (mut s, _, _) = raw_transmission(addr);
    for i in 0..8 {
        req(&mut s, CMD_READ, 0, 100 + i, 0, 65536);
    }
    req(&mut s, CMD_DISC, 0, 0, 0, 0);
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    for _ in 0..8 {
        let (err, _) = simple_reply(&mut s);
        assert_eq!(err, 0);
        s.read_exact(&mut buf).unwrap();
        got += 1;
    }
    assert_eq!(got, 8);
    assert!(closed(&mut s));
    check_good("at the end");
}

#[test]
fn unsupported_requests_fail_locally() {
    let d = tmp();
    let img = path(&d, "disk.raw");
    make_empty(&img, MIB);
    let addr = serve_file(&img, true, None);
    let c = Client::connect(addr, "disk", None).unwrap();
    assert!(matches!(c.trim(0, 4096), Err(RequestError::Unsupported(_))));
    assert!(matches!(
        c.submit(&Request::Read { offset: 0, len: 0 }),
        Err(RequestError::Invalid(_))
    ));
    let ticket = c
        .submit(&Request::Cache {
            offset: 0,
            len: 4096,
        })
        .unwrap();
    assert_eq!(ticket.wait().unwrap(), Reply::Done);
}
