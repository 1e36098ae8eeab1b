//! Where the shared secret comes from: configuration, `COURIER_COOKIE`, or a
//! file created on first use.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use courier_runtime::error::RemoteError;

/// The cookie file used when none is configured:
/// `$COURIER_COOKIE_FILE`, else `$XDG_CONFIG_HOME/courier/cookie`, else
/// `$HOME/.config/courier/cookie`.
pub fn default_cookie_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COURIER_COOKIE_FILE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("courier").join("cookie"))
}

fn config_error(reason: String) -> RemoteError {
    RemoteError::Authentication {
        peer: "this node".into(),
        reason,
    }
}

/// Reads the cookie at `path`, creating it (mode 0600, 32 random bytes,
/// hex-encoded) if it does not exist. A cookie file readable by others is
/// refused.
pub fn load_or_create_cookie(path: &Path) -> Result<Vec<u8>, RemoteError> {
    match fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(config_error(format!(
                    "cookie file {} is readable by other users; chmod 600 it",
                    path.display()
                )));
            }
            let bytes = fs::read(path).map_err(|e| {
                config_error(format!("cannot read cookie file {}: {e}", path.display()))
            })?;
            let trimmed: Vec<u8> = bytes
                .into_iter()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            if trimmed.len() < 16 {
                return Err(config_error(format!(
                    "cookie file {} holds fewer than 16 bytes",
                    path.display()
                )));
            }
            Ok(trimmed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)
                    .map_err(|e| config_error(format!("cannot create {}: {e}", dir.display())))?;
            }
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw)
                .map_err(|e| config_error(format!("no randomness for a new cookie: {e}")))?;
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match &mut f {
                Ok(f) => f.write_all(hex.as_bytes()).map_err(|e| {
                    config_error(format!("cannot write cookie file {}: {e}", path.display()))
                })?,
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_or_create_cookie(path)
                }
                Err(e) => {
                    return Err(config_error(format!(
                        "cannot create cookie file {}: {e}",
                        path.display()
                    )))
                }
            }
            Ok(hex.into_bytes())
        }
        Err(e) => Err(config_error(format!(
            "cannot read cookie file {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_owner_only_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/cookie");
        let a = load_or_create_cookie(&p).unwrap();
        assert_eq!(a.len(), 64);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_cookie(&p).unwrap(), a);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_cookie(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
