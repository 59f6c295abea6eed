//! What the server serves: the [`Export`] and [`ExportProvider`] traits, who is asking
//! ([`Peer`]), and [`RawFileExport`], a sparse raw file.
//!
//! Every method here is blocking; the server calls them from tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::proto::{Errno, Extent, STATE_HOLE, STATE_ZERO};

/// The client of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The identity of the client's TLS certificate, as the server's identity callback
    /// extracted it; `None` without TLS (or when the callback found none).
    pub tls_identity: Option<String>,
}

/// Why an export cannot be opened.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    #[error("unknown export: {0}")]
    Unknown(String),
    /// The export exists but this peer may not have it (`NBD_REP_ERR_POLICY`).
    #[error("refused: {0}")]
    Policy(String),
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with `ENOTSUP` rather than fall back to writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Persist before replying (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// One exported disk. All methods block; ranges are already checked against [`size`]
/// by the server.
///
/// [`size`]: Export::size
pub trait Export: Send + Sync + 'static {
    /// Size in bytes, fixed for the life of the export.
    fn size(&self) -> u64;
    /// Whether every write must be refused with `EPERM`.
    fn read_only(&self) -> bool;
    /// Whether several connections to this export see one consistent view, flushes
    /// included (advertised as `NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;
    /// Fill `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`; with `fua`, persist it before returning.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Persist every completed write.
    fn flush(&self) -> io::Result<()>;
    /// Discard a range (advisory; reads of it afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Make a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()>;
    /// Allocation status of `[offset, offset+len)` for `base:allocation`: consecutive
    /// extents starting at `offset`, covering at most `len` bytes (fewer is allowed).
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>>;
    /// Called before every WRITE, TRIM and WRITE_ZEROES: the owner can refuse writes at any
    /// time after open (a stale lease holder gets `EPERM`).
    fn check_write(&self) -> Result<(), Errno>;
}

/// The set of exports a server offers, and who may open which.
pub trait ExportProvider: Send + Sync + 'static {
    /// Open `name` for `peer` (called for `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`).
    fn open(&self, name: &str, peer: &Peer) -> Result<Arc<dyn Export>, Refusal>;
    /// Names `peer` may see in `NBD_OPT_LIST`.
    fn list(&self, peer: &Peer) -> Vec<String>;
}

/// A raw disk image in a (possibly sparse) file.
///
/// Reads and writes are positional (`pread`/`pwrite`), flush and FUA are `fdatasync`, trim
/// punches holes, write-zeroes punches or zero-ranges, and block status comes from
/// `SEEK_DATA`/`SEEK_HOLE`. Having no cache of its own, it is safe for several connections.
#[derive(Debug)]
pub struct RawFileExport {
    file: File,
    size: u64,
    read_only: bool,
}

/// Most extents one block-status answer returns (the client asks again for the rest).
const MAX_EXTENTS: usize = 4096;
/// Chunk size for writing literal zeroes.
const ZERO_CHUNK: usize = 1 << 20;

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

fn to_off(x: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(x).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl RawFileExport {
    /// Open the file at `path` (read-write unless `read_only`).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Serve an already open file; its current length is the export size.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(RawFileExport {
            file,
            size,
            read_only,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (o, l) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments; no
        // memory is passed to the kernel.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(last_os_error())
        }
    }

    fn datasync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)`; `Ok(None)` for ENXIO (no more data past `offset`).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let o = to_off(offset)?;
        // SAFETY: lseek on a file descriptor we own. Only the returned value is used; the
        // file position it moves is never relied upon (all I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), o, whence) };
        if r < 0 {
            let e = last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn write_literal_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl Export for RawFileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.datasync()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            // Trim is advisory: a filesystem that cannot punch simply keeps the data.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        if fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let mut done = false;
        if !flags.no_hole {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => done = true,
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
                Ok(()) => done = true,
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            if flags.fast {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            self.write_literal_zeroes(offset, len)?;
        }
        if flags.fua {
            self.datasync()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let end = (offset + u64::from(len)).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, n: u64, flags: u32| {
            // n ≤ len, which is a u32.
            let n = n as u32;
            match out.last_mut() {
                Some(l) if l.flags == flags => l.len += n,
                _ => out.push(Extent { len: n, flags }),
            }
        };
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => end,
                // No SEEK_DATA support: report everything as allocated data.
                Err(e) if unsupported(&e) => {
                    push(&mut out, end - pos, 0);
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                let h = data.min(end);
                push(&mut out, h - pos, STATE_HOLE | STATE_ZERO);
                pos = h;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).max(pos + 1);
            let d = hole.min(end);
            push(&mut out, d - pos, 0);
            pos = d;
        }
        Ok(out)
    }

    fn check_write(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EPERM)
        } else {
            Ok(())
        }
    }
}

/// A provider serving a fixed set of named exports to everyone (tests, simple daemons).
#[derive(Default)]
pub struct StaticProvider {
    exports: Vec<(String, Arc<dyn Export>)>,
}

impl StaticProvider {
    /// An empty provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export named `name`.
    pub fn with(mut self, name: impl Into<String>, export: Arc<dyn Export>) -> Self {
        self.exports.push((name.into(), export));
        self
    }
}

impl ExportProvider for StaticProvider {
    fn open(&self, name: &str, _peer: &Peer) -> Result<Arc<dyn Export>, Refusal> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .ok_or_else(|| Refusal::Unknown(name.to_string()))
    }

    fn list(&self, _peer: &Peer) -> Vec<String> {
        self.exports.iter().map(|(n, _)| n.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_block_status_sees_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 65536], 1 << 20).unwrap();
        let e = RawFileExport::from_file(f, false).unwrap();
        let ex = e.block_status(0, 4 << 20).unwrap();
        let total: u64 = ex.iter().map(|x| u64::from(x.len)).sum();
        assert_eq!(total, 4 << 20);
        assert_eq!(ex[0].flags, STATE_HOLE | STATE_ZERO);
        assert!(ex.iter().any(|x| x.flags == 0));
        // trim makes it a hole again, and it reads as zeroes
        e.trim(1 << 20, 65536, false).unwrap();
        let mut b = vec![1u8; 65536];
        e.read_at(1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let ex = e.block_status(0, 4 << 20).unwrap();
        assert_eq!(ex.len(), 1);
        // write_zeroes with no_hole keeps the range allocated (ZERO_RANGE's unwritten
        // extents may still be reported as holes by SEEK_DATA, which is allowed).
        use std::os::unix::fs::MetadataExt;
        let before = e.file.metadata().unwrap().blocks();
        e.write_zeroes(
            0,
            8192,
            ZeroFlags {
                no_hole: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(e.file.metadata().unwrap().blocks() >= before + 16);
        let mut b = vec![1u8; 8192];
        e.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}
