//! The file server's catalogue: shares (a folder and an access list), their disks (sparse raw
//! files in the folder), and each disk's write lease, kept in `<state>/catalog.json` and
//! written atomically before any change is acknowledged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_api::share::{Access, DiskInfo, LeaseInfo, ShareInfo};
use ferry_auth::grant::GrantClaims;
use serde::{Deserialize, Serialize};

/// Why a catalogue operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] ferry_hostd::state::StateError),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ShareDef {
    path: PathBuf,
    #[serde(default)]
    access: BTreeMap<String, Access>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Catalog {
    #[serde(default)]
    shares: BTreeMap<String, ShareDef>,
    /// By export name (`share/disk`).
    #[serde(default)]
    leases: BTreeMap<String, LeaseInfo>,
    /// Grants a lease was handed over under, as `"{grant id} {export}"`, with the grant's
    /// expiry: each hands a disk over once.
    #[serde(default)]
    spent_grants: BTreeMap<String, i64>,
}

/// How long past its expiry a grant still hands a disk over (its move started in time; the
/// lease passes as the move ends), and how long its spent id is kept.
pub const GRANT_GRACE_S: u64 = 24 * 3600;

/// Whether a grant names a disk of this file server: the disk itself (its `nbd://` or
/// `nbds://` URI, by export name) or its share (`SHARE` or `FILESERVER:SHARE`).
pub fn grant_names(g: &GrantClaims, share: &str, disk: &str) -> bool {
    let export = export_name(share, disk);
    g.shares
        .iter()
        .any(|s| s == share || s.rsplit_once(':').is_some_and(|(_, s)| s == share))
        || g.disks
            .iter()
            .any(|d| ferry_nbd::client::parse_uri(d).is_ok_and(|u| u.export == export))
}

/// Refuse what grant `g` does not allow for disk `share/disk`: a move from another host than
/// `from`, to another host than `to`, or a disk (and share) it does not name.
fn refuse_outside(
    g: &GrantClaims,
    share: &str,
    disk: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(), StoreError> {
    let no = |m: String| {
        Err(StoreError::Forbidden(format!(
            "grant {} refused: {m}",
            g.jti
        )))
    };
    if let Some(f) = from.filter(|f| *f != g.from) {
        return no(format!("it is for a move from {}, not from {f}", g.from));
    }
    if let Some(t) = to.filter(|t| *t != g.to) {
        return no(format!("it is for a move to {}, not to {t}", g.to));
    }
    if !grant_names(g, share, disk) {
        return no(format!("it does not name disk {share}/{disk} or its share"));
    }
    Ok(())
}

/// The catalogue, shared by the API and the NBD exports.
pub struct Store {
    root: PathBuf,
    file: PathBuf,
    cat: Mutex<Catalog>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn check_name(what: &str, n: &str) -> Result<(), StoreError> {
    if ferry_auth::identity::valid_name(n) {
        Ok(())
    } else {
        Err(StoreError::Bad(format!(
            "{n:?} is not a valid {what} name (letters, digits, '-', '_', '.'; up to 63)"
        )))
    }
}

/// Export name of a disk.
pub fn export_name(share: &str, disk: &str) -> String {
    format!("{share}/{disk}")
}

fn free_bytes(p: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `s` points to writable memory of the
    // right type; statvfs writes only into it.
    let r = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let s = unsafe { s.assume_init() };
    s.f_bavail.saturating_mul(s.f_frsize)
}

impl Store {
    /// Open (or start) the catalogue in `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let file = root.join("catalog.json");
        let cat = ferry_hostd::state::read_json::<Catalog>(&file)?.unwrap_or_default();
        Ok(Store {
            root: root.to_path_buf(),
            file,
            cat: Mutex::new(cat),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.cat.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the catalogue: `f` on a copy, written to disk, then made current.
    fn change<R>(
        &self,
        f: impl FnOnce(&mut Catalog) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut cat = self.lock();
        let mut next = cat.clone();
        let r = f(&mut next)?;
        ferry_hostd::state::write_json(&self.file, &next)?;
        *cat = next;
        Ok(r)
    }

    fn share_def(&self, name: &str) -> Result<ShareDef, StoreError> {
        self.lock()
            .shares
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("no share {name} on this file server")))
    }

    /// That share `name` exists (a 404 before the access check).
    pub fn check_share(&self, name: &str) -> Result<(), StoreError> {
        self.share_def(name).map(|_| ())
    }

    /// Where a disk's image is.
    pub fn disk_path(&self, share: &str, disk: &str) -> Result<PathBuf, StoreError> {
        check_name("disk", disk)?;
        Ok(self.share_def(share)?.path.join(format!("{disk}.raw")))
    }

    pub fn create_share(&self, name: &str, path: Option<&str>) -> Result<(), StoreError> {
        check_name("share", name)?;
        let path = match path {
            Some(p) => PathBuf::from(p),
            None => self.root.join("shares").join(name),
        };
        if !path.is_absolute() {
            return Err(StoreError::Bad(format!(
                "{} is not an absolute path",
                path.display()
            )));
        }
        self.change(|c| {
            if c.shares.contains_key(name) {
                return Err(StoreError::Conflict(format!("share {name} exists already")));
            }
            if let Some((other, _)) = c.shares.iter().find(|(_, s)| s.path == path) {
                return Err(StoreError::Conflict(format!(
                    "share {other} already uses {}",
                    path.display()
                )));
            }
            std::fs::create_dir_all(&path).map_err(|source| StoreError::Io {
                what: format!("making {}", path.display()),
                source,
            })?;
            c.shares.insert(
                name.into(),
                ShareDef {
                    path: path.clone(),
                    access: BTreeMap::new(),
                },
            );
            Ok(())
        })
    }

    pub fn delete_share(&self, name: &str) -> Result<(), StoreError> {
        let disks = self.disks(name)?;
        if !disks.is_empty() {
            return Err(StoreError::Conflict(format!(
                "share {name} still holds {} disk(s): delete them first",
                disks.len()
            )));
        }
        self.change(|c| {
            c.shares.remove(name);
            Ok(())
        })
    }

    pub fn set_access(&self, share: &str, host: &str, a: Option<Access>) -> Result<(), StoreError> {
        check_name("host", host)?;
        self.change(|c| {
            let s = c
                .shares
                .get_mut(share)
                .ok_or_else(|| StoreError::NotFound(format!("no share {share}")))?;
            match a {
                Some(a) => {
                    s.access.insert(host.into(), a);
                }
                None => {
                    if s.access.remove(host).is_none() {
                        return Err(StoreError::NotFound(format!(
                            "{host} is not on share {share}'s access list"
                        )));
                    }
                }
            }
            Ok(())
        })
    }

    /// What `host` may do on `share` (None: not on its access list).
    pub fn access(&self, share: &str, host: &str) -> Option<Access> {
        self.lock().shares.get(share)?.access.get(host).copied()
    }

    pub fn share_names(&self) -> Vec<String> {
        self.lock().shares.keys().cloned().collect()
    }

    /// The disks of a share, by name.
    pub fn disks(&self, share: &str) -> Result<Vec<String>, StoreError> {
        let def = self.share_def(share)?;
        let mut v = Vec::new();
        let rd = std::fs::read_dir(&def.path).map_err(|source| StoreError::Io {
            what: format!("reading {}", def.path.display()),
            source,
        })?;
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(d) = n.strip_suffix(".raw") {
                if ferry_auth::identity::valid_name(d) {
                    v.push(d.to_string());
                }
            }
        }
        v.sort();
        Ok(v)
    }

    pub fn lease(&self, export: &str) -> LeaseInfo {
        self.lock().leases.get(export).cloned().unwrap_or_default()
    }

    pub fn disk_info(
        &self,
        share: &str,
        disk: &str,
        nbd: Option<&str>,
    ) -> Result<DiskInfo, StoreError> {
        let p = self.disk_path(share, disk)?;
        let md = std::fs::metadata(&p)
            .map_err(|_| StoreError::NotFound(format!("no disk {disk} on share {share}")))?;
        let export = export_name(share, disk);
        use std::os::unix::fs::MetadataExt;
        Ok(DiskInfo {
            share: share.into(),
            name: disk.into(),
            size_bytes: md.len(),
            allocated_bytes: md.blocks() * 512,
            uri: nbd.map(|a| format!("nbds://{a}/{export}")),
            lease: self.lease(&export),
            export,
        })
    }

    pub fn share_info(&self, name: &str, nbd: Option<&str>) -> Result<ShareInfo, StoreError> {
        let def = self.share_def(name)?;
        let disks = self
            .disks(name)?
            .iter()
            .filter_map(|d| self.disk_info(name, d, nbd).ok())
            .collect();
        Ok(ShareInfo {
            name: name.into(),
            path: def.path.display().to_string(),
            access: def.access.clone(),
            disks,
            free_bytes: free_bytes(&def.path),
        })
    }

    pub fn create_disk(&self, share: &str, disk: &str, size: u64) -> Result<(), StoreError> {
        let p = self.disk_path(share, disk)?;
        if size == 0 || !size.is_multiple_of(512) {
            return Err(StoreError::Bad(format!(
                "a disk's size must be a positive multiple of 512 bytes, not {size}"
            )));
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    StoreError::Conflict(format!("disk {disk} exists already on share {share}"))
                }
                _ => StoreError::Io {
                    what: format!("creating {}", p.display()),
                    source: e,
                },
            })?;
        f.set_len(size)
            .and_then(|_| f.sync_all())
            .map_err(|source| StoreError::Io {
                what: format!("sizing {}", p.display()),
                source,
            })
    }

    pub fn delete_disk(&self, share: &str, disk: &str) -> Result<(), StoreError> {
        let p = self.disk_path(share, disk)?;
        let export = export_name(share, disk);
        if let Some(h) = self.lease(&export).holder {
            return Err(StoreError::Conflict(format!(
                "{h} holds disk {export}'s write lease: stop its VM first (or break the lease)"
            )));
        }
        std::fs::remove_file(&p)
            .map_err(|_| StoreError::NotFound(format!("no disk {disk} on share {share}")))?;
        self.change(|c| {
            c.leases.remove(&export);
            Ok(())
        })
    }

    /// Take the write lease of `export` for `host` (it must have write access). Taking it
    /// again while holding it raises the fence too: connections opened before cannot write.
    /// A lease handed over in a move goes only to that move's destination, and, handed over
    /// under a delegated move's grant, only with that grant (checked by the caller: signed by
    /// an admin of the cluster), once.
    pub fn acquire(
        &self,
        share: &str,
        disk: &str,
        host: &str,
        grant: Option<&GrantClaims>,
    ) -> Result<LeaseInfo, StoreError> {
        self.disk_path(share, disk)?;
        if self.access(share, host) != Some(Access::Write) {
            return Err(StoreError::Forbidden(format!(
                "{host} may not write share {share}: `ferry share grant {share} {host} write` first"
            )));
        }
        let export = export_name(share, disk);
        if let Some(g) = grant {
            refuse_outside(g, share, disk, None, Some(host))?;
        }
        self.change(|c| {
            let l = c.leases.entry(export.clone()).or_default();
            if let Some(h) = l.holder.as_ref().filter(|h| *h != host) {
                return Err(StoreError::Conflict(format!(
                    "{h} holds disk {export}'s write lease (fence {}): it gives it up when its VM stops or moves; an admin can break it",
                    l.fence
                )));
            }
            match (&l.handed_to, &l.grant, grant) {
                (Some(t), _, _) if t != host => {
                    return Err(StoreError::Conflict(format!(
                        "disk {export} was handed over to {t} in a move: only {t} may take its lease next (an admin can break it)"
                    )))
                }
                (Some(_), Some(id), g) if g.map(|g| &g.jti) != Some(id) => {
                    return Err(StoreError::Forbidden(format!(
                        "disk {export} was handed over under grant {id}: {host} takes it only with that grant"
                    )))
                }
                (None, _, Some(g)) => {
                    return Err(StoreError::Forbidden(format!(
                        "grant {} hands disk {export} to nobody now: it did so once already (a grant works once), or the disk was never handed over under it",
                        g.jti
                    )))
                }
                _ => {}
            }
            if let Some(g) = grant {
                let now = (now_ms() / 1000) as i64;
                c.spent_grants
                    .retain(|_, exp| *exp + GRANT_GRACE_S as i64 > now);
                c.spent_grants
                    .insert(format!("{} {export}", g.jti), g.exp);
            }
            let l = c.leases.entry(export.clone()).or_default();
            l.holder = Some(host.into());
            l.fence += 1;
            l.since_ms = now_ms();
            l.handed_to = None;
            l.grant = None;
            Ok(l.clone())
        })
    }

    /// Give the lease up (only its holder).
    pub fn release(&self, share: &str, disk: &str, host: &str) -> Result<LeaseInfo, StoreError> {
        self.give_up(share, disk, host, None)
    }

    /// The holder gives the lease to a move's destination `to`: from now on only `to` may
    /// take it. Under a delegated move's grant (checked by the caller), the grant must be
    /// for a move from `host` to `to` naming this disk or its share, and `to` must show it.
    pub fn hand_over(
        &self,
        share: &str,
        disk: &str,
        host: &str,
        to: &str,
        grant: Option<&GrantClaims>,
    ) -> Result<LeaseInfo, StoreError> {
        check_name("host", to)?;
        if to == host {
            return Err(StoreError::Bad(format!(
                "{host} cannot hand a lease over to itself"
            )));
        }
        if let Some(g) = grant {
            refuse_outside(g, share, disk, Some(host), Some(to))?;
            let export = export_name(share, disk);
            if self
                .lock()
                .spent_grants
                .contains_key(&format!("{} {export}", g.jti))
            {
                return Err(StoreError::Forbidden(format!(
                    "grant {} handed disk {export} over once already: a grant works once",
                    g.jti
                )));
            }
        }
        self.give_up(share, disk, host, Some((to, grant.map(|g| g.jti.clone()))))
    }

    fn give_up(
        &self,
        share: &str,
        disk: &str,
        host: &str,
        to: Option<(&str, Option<String>)>,
    ) -> Result<LeaseInfo, StoreError> {
        let export = export_name(share, disk);
        self.change(|c| {
            let l = c
                .leases
                .get_mut(&export)
                .filter(|l| l.holder.as_deref() == Some(host))
                .ok_or_else(|| {
                    StoreError::Conflict(format!(
                        "{host} does not hold disk {export}'s write lease"
                    ))
                })?;
            l.holder = None;
            l.since_ms = now_ms();
            (l.handed_to, l.grant) = match to {
                Some((t, g)) => (Some(t.to_string()), g),
                None => (None, None),
            };
            Ok(l.clone())
        })
    }

    /// An admin takes the lease from its holder: the fence rises, so nothing open can write.
    pub fn break_lease(&self, share: &str, disk: &str) -> Result<LeaseInfo, StoreError> {
        self.disk_path(share, disk)?;
        let export = export_name(share, disk);
        self.change(|c| {
            let l = c.leases.entry(export).or_default();
            l.holder = None;
            l.fence += 1;
            l.since_ms = now_ms();
            l.handed_to = None;
            l.grant = None;
            Ok(l.clone())
        })
    }

    /// Copy a disk nobody holds the lease of (a copy of a disk being written would be torn):
    /// only its data ranges are read and written, holes stay holes. Returns (copied, skipped).
    pub fn copy_disk(
        &self,
        share: &str,
        disk: &str,
        to_share: &str,
        to: &str,
    ) -> Result<(u64, u64), StoreError> {
        let src = self.disk_path(share, disk)?;
        let dst = self.disk_path(to_share, to)?;
        let export = export_name(share, disk);
        if let Some(h) = self.lease(&export).holder {
            return Err(StoreError::Conflict(format!(
                "{h} writes {export} (it holds the lease): stop its VM first, or move the disk live"
            )));
        }
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |source| StoreError::Io { what, source }
        };
        let inp = std::fs::File::open(&src)
            .map_err(|_| StoreError::NotFound(format!("no disk {disk} on share {share}")))?;
        let size = inp.metadata().map_err(io("reading", &src))?.len();
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    StoreError::Conflict(format!("disk {to} exists already on share {to_share}"))
                }
                _ => StoreError::Io {
                    what: format!("creating {}", dst.display()),
                    source: e,
                },
            })?;
        let r = copy_sparse(&inp, &out, size).and_then(|n| {
            out.set_len(size)?;
            out.sync_all()?;
            Ok(n)
        });
        match r {
            Ok(copied) => Ok((copied, size - copied)),
            Err(e) => {
                // Nothing half-made stays behind.
                let _ = std::fs::remove_file(&dst);
                Err(io("copying to", &dst)(e))
            }
        }
    }
}

/// Copy the data ranges of `inp` (SEEK_DATA / SEEK_HOLE) to the same offsets of `out`.
fn copy_sparse(inp: &std::fs::File, out: &std::fs::File, size: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this function borrows; no memory is involved.
        let r = unsafe { libc::lseek(inp.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut copied = 0u64;
    while off < size {
        let Some(data) = seek(off, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            inp.read_exact_at(&mut buf[..n], at)?;
            out.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
        off = end;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.create_share("vms", None).unwrap();
        for h in ["hv1", "hv2", "hv3"] {
            s.set_access("vms", h, Some(Access::Write)).unwrap();
        }
        s.create_disk("vms", "a", 1 << 20).unwrap();
        s.create_disk("vms", "b", 1 << 20).unwrap();
        (dir, s)
    }

    fn grant(jti: &str, disks: &[&str]) -> GrantClaims {
        GrantClaims {
            vm: "web01".into(),
            from: "hv1".into(),
            to: "hv2".into(),
            disks: disks
                .iter()
                .map(|d| format!("nbds://10.0.0.9:10809/{d}"))
                .collect(),
            shares: Vec::new(),
            exp: i64::MAX / 2,
            iat: 0,
            jti: jti.into(),
            admin: "alice".into(),
        }
    }

    fn refused(r: Result<LeaseInfo, StoreError>, needle: &str) {
        match r {
            Err(e) => assert!(e.to_string().contains(needle), "{e}"),
            Ok(l) => panic!("allowed: {l:?}"),
        }
    }

    #[test]
    fn a_handed_over_lease_goes_only_to_the_move_s_destination() {
        let (_d, s) = store();
        s.acquire("vms", "a", "hv1", None).unwrap();
        let f = s.lease("vms/a").fence;
        refused(s.hand_over("vms", "a", "hv2", "hv3", None), "does not hold");
        s.hand_over("vms", "a", "hv1", "hv2", None).unwrap();
        assert_eq!(s.lease("vms/a").handed_to.as_deref(), Some("hv2"));
        refused(s.acquire("vms", "a", "hv3", None), "only hv2 may take");
        refused(s.acquire("vms", "a", "hv1", None), "only hv2 may take");
        let l = s.acquire("vms", "a", "hv2", None).unwrap();
        assert_eq!((l.holder.as_deref(), l.handed_to), (Some("hv2"), None));
        assert!(l.fence > f);
        // An admin's break clears a hand-over nobody took.
        s.hand_over("vms", "a", "hv2", "hv1", None).unwrap();
        s.break_lease("vms", "a").unwrap();
        s.acquire("vms", "a", "hv3", None).unwrap();
    }

    #[test]
    fn under_a_grant_only_its_disks_pass_once_to_its_destination() {
        let (_d, s) = store();
        s.acquire("vms", "a", "hv1", None).unwrap();
        s.acquire("vms", "b", "hv1", None).unwrap();
        let g = grant("g1", &["vms/a"]);
        // The grant names disk a only, from hv1 to hv2.
        refused(
            s.hand_over("vms", "b", "hv1", "hv2", Some(&g)),
            "does not name disk vms/b",
        );
        refused(
            s.hand_over("vms", "a", "hv1", "hv3", Some(&g)),
            "to hv2, not to hv3",
        );
        s.hand_over("vms", "a", "hv1", "hv2", Some(&g)).unwrap();
        assert_eq!(s.lease("vms/a").grant.as_deref(), Some("g1"));
        // The destination must show that grant.
        refused(s.acquire("vms", "a", "hv2", None), "only with that grant");
        refused(
            s.acquire("vms", "a", "hv2", Some(&grant("g2", &["vms/a"]))),
            "only with that grant",
        );
        // Nor may it take another disk with it (b is hv1's).
        s.release("vms", "b", "hv1").unwrap();
        refused(
            s.acquire("vms", "b", "hv2", Some(&g)),
            "does not name disk vms/b",
        );
        s.acquire("vms", "a", "hv2", Some(&g)).unwrap();
        // Once the move ended the grant hands nothing over any more.
        s.release("vms", "a", "hv2").unwrap();
        refused(
            s.acquire("vms", "a", "hv2", Some(&g)),
            "hands disk vms/a to nobody",
        );
        s.acquire("vms", "a", "hv1", None).unwrap();
        refused(
            s.hand_over("vms", "a", "hv1", "hv2", Some(&g)),
            "once already",
        );
        // A share the grant names covers its disks.
        let whole = GrantClaims {
            disks: Vec::new(),
            shares: vec!["fs1:vms".into()],
            ..grant("g3", &[])
        };
        s.hand_over("vms", "a", "hv1", "hv2", Some(&whole)).unwrap();
        s.acquire("vms", "a", "hv2", Some(&whole)).unwrap();
    }
}
