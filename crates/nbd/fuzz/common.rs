//! Shared by the fuzz target and `tests/fuzz_regressions.rs`: run ferry's NBD server on one
//! connection whose client sends `data` and then closes, over an in-memory pipe, against a
//! 1 MiB in-memory export. Whatever the bytes, the server must end (with an error or not)
//! without panicking, and never write outside the export.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_nbd::export::{Export, Peer, StaticProvider, ZeroFlags};
use ferry_nbd::proto::{Errno, Extent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SIZE: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

impl Mem {
    fn range(&self, off: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let end = off.checked_add(len as u64).filter(|e| *e <= SIZE);
        // The server checks ranges before calling: a range outside is a server bug.
        assert!(
            end.is_some(),
            "server passed an out-of-range request: {off}+{len}"
        );
        Ok(off as usize..off as usize + len)
    }
}

impl Export for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, len as usize)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _f: ZeroFlags) -> io::Result<()> {
        self.trim(offset, len, false)
    }
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        self.range(offset, len as usize)?;
        Ok(vec![Extent { len, flags: 0 }])
    }
    fn check_write(&self) -> Result<(), Errno> {
        Ok(())
    }
}

/// Serve one connection fed with `data`.
pub fn serve_bytes(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let export: Arc<dyn Export> = Arc::new(Mem(Mutex::new(vec![0u8; SIZE as usize])));
        let provider = Arc::new(StaticProvider::new().with("disk", export));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let peer = Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            tls_identity: None,
        };
        let srv = tokio::spawn(ferry_nbd::server::serve_connection(
            server, provider, peer, None,
        ));
        let input = data.to_vec();
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let feed = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let drain = async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        // A server that neither ends nor answers within this is stuck: a bug.
        let both = async { tokio::join!(feed, drain) };
        let _ = tokio::time::timeout(Duration::from_secs(10), both).await;
        match tokio::time::timeout(Duration::from_secs(10), srv).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(_)) => {}
            Err(_) => panic!("the server did not end after the client closed"),
        }
    });
}

/// Seed inputs: valid sessions and their broken variants.
#[allow(dead_code)] // used by the regression test, not the fuzz target
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    // Client flags (fixed newstyle + no zeroes), then options.
    let mut hello = 3u32.to_be_bytes().to_vec();
    let opt = |o: u32, data: &[u8]| {
        let mut b = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        b.extend(o.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    };
    let req = |cmd: u16, off: u64, len: u32, payload: &[u8]| {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(cmd.to_be_bytes());
        b.extend(7u64.to_be_bytes());
        b.extend(off.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        b
    };
    // NBD_OPT_STRUCTURED_REPLY (8), NBD_OPT_SET_META_CONTEXT (10) base:allocation, NBD_OPT_GO (7).
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend(1u32.to_be_bytes());
    meta.extend(15u32.to_be_bytes());
    meta.extend(b"base:allocation");
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend(b"disk");
    go.extend(0u16.to_be_bytes());
    hello.extend(opt(8, &[]));
    hello.extend(opt(10, &meta));
    hello.extend(opt(7, &go));
    let mut session = hello.clone();
    session.extend(req(1, 4096, 512, &[0xab; 512])); // write
    session.extend(req(0, 4096, 512, &[])); // read
    session.extend(req(3, 0, 0, &[])); // flush
    session.extend(req(4, 0, 4096, &[])); // trim
    session.extend(req(6, 0, 4096, &[])); // write zeroes
    session.extend(req(7, 0, 65536, &[])); // block status
    session.extend(req(0, SIZE - 512, 1024, &[])); // past the end
    session.extend(req(2, 0, 0, &[])); // disc
    v.push(("seed-session".into(), session.clone()));
    v.push(("seed-handshake-only".into(), hello.clone()));
    for cut in [
        3,
        11,
        20,
        hello.len() - 3,
        hello.len() + 10,
        session.len() - 5,
    ] {
        v.push((
            format!("seed-cut-{cut}"),
            session[..cut.min(session.len())].to_vec(),
        ));
    }
    let mut huge = hello.clone();
    huge.extend(req(1, 0, u32::MAX, &[]));
    v.push(("seed-oversize-write".into(), huge));
    let mut bad_opt = 3u32.to_be_bytes().to_vec();
    bad_opt.extend(opt(0xdead, &[0; 8]));
    let mut big = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    big.extend(7u32.to_be_bytes());
    big.extend(u32::MAX.to_be_bytes());
    bad_opt.extend(big);
    v.push(("seed-bad-options".into(), bad_opt));
    v
}
