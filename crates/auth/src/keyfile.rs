//! Private key files: written 0600 where they were made, never sent anywhere, and refused when
//! anyone else may read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::AuthError;

/// Write a private key (or any secret) to `path`, readable by its owner only.
pub fn write_private(path: &Path, data: &str) -> Result<(), AuthError> {
    write_mode(path, data, 0o600)
}

/// Write a public file (a certificate, the cluster document).
pub fn write_public(path: &Path, data: &str) -> Result<(), AuthError> {
    write_mode(path, data, 0o644)
}

fn write_mode(path: &Path, data: &str, mode: u32) -> Result<(), AuthError> {
    let io = |source| AuthError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io)?;
        // The mode of an existing file is not changed by open(): set it.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(data.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Read a private key, refusing one that others may read or write.
pub fn read_private(path: &Path) -> Result<String, AuthError> {
    let io = |source| AuthError::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::LooseKey {
            path: path.into(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Read a public file.
pub fn read_public(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|source| AuthError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_keys_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.pem");
        write_private(&p, "secret").unwrap();
        assert_eq!(read_private(&p).unwrap(), "secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&p).unwrap_err();
        assert!(matches!(e, AuthError::LooseKey { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        // Writing again puts it right.
        write_private(&p, "again").unwrap();
        assert_eq!(read_private(&p).unwrap(), "again");
    }
}
