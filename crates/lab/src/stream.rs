//! The client's side of the test guest's TCP counter stream (port 19): little-endian u64
//! counters from 0, one after the other; any lost, repeated or reordered byte breaks the
//! sequence.

use std::io::Read;
use std::net::TcpStream;

use anyhow::{bail, Context, Result};

/// A TCP stream from the guest's counter server, checked as it is read.
pub struct Stream {
    s: TcpStream,
    /// The next counter expected.
    pub next: u64,
    carry: Vec<u8>,
}

impl Stream {
    pub fn new(s: TcpStream) -> Stream {
        Stream {
            s,
            next: 0,
            carry: Vec::new(),
        }
    }

    /// Read `bytes` more and check that every counter is the next one.
    pub fn read(&mut self, bytes: usize) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < bytes {
            let n = self
                .s
                .read(&mut buf)
                .context("reading the guest's TCP stream")?;
            if n == 0 {
                bail!(
                    "the guest closed the TCP stream after {} counters",
                    self.next
                );
            }
            got += n;
            self.carry.extend_from_slice(&buf[..n]);
            let whole = self.carry.len() / 8 * 8;
            for c in self.carry[..whole].chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                let v = u64::from_le_bytes(b);
                if v != self.next {
                    bail!(
                        "TCP stream corrupted: expected counter {}, got {v} (a byte was lost, repeated or reordered)",
                        self.next
                    );
                }
                self.next += 1;
            }
            self.carry.drain(..whole);
        }
        Ok(())
    }

    /// The socket (for timeouts).
    pub fn socket(&self) -> &TcpStream {
        &self.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn a_skipped_counter_is_caught() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for v in [0u64, 1, 2, 4] {
                s.write_all(&v.to_le_bytes()).unwrap();
            }
        });
        let mut st = Stream::new(TcpStream::connect(addr).unwrap());
        let e = st.read(32).unwrap_err().to_string();
        assert!(e.contains("expected counter 3, got 4"), "{e}");
        assert_eq!(st.next, 3);
        t.join().unwrap();
    }
}
