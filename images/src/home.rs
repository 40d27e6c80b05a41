//! Where msb keeps its files (`MSB_HOME`, default `$HOME/.msb`), and the one check that it is
//! ours alone. Everything under it (the state store, sandbox directories with their control
//! sockets and logs, the initramfs cache) is only as safe as the directory itself: another
//! user who can write to it, or to a directory above it, could swap a socket or an image.
//!
//! Invariants: there is no fallback location (no `/tmp`); [`ensure_private`] creates a
//! missing home with mode 0700 and refuses, saying why, a home that is not a directory, is
//! owned by another user, or is writable by group or others, and a home below a directory
//! that another user (other than root) owns or that group or others can write to without
//! the sticky bit (the rule ssh's StrictModes applies to `~/.ssh`, relaxed for `/tmp`-style
//! sticky directories, where others cannot rename or delete our entries).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The msb home directory: `$MSB_HOME`, else `$HOME/.msb`.
pub fn msb_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("MSB_HOME").filter(|h| !h.is_empty()) {
        return Ok(absolute(PathBuf::from(h)));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(absolute(PathBuf::from(home)).join(".msb")),
        None => Err(Error::NoHome),
    }
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// Creates `home` (mode 0700) if it is missing, then checks that it and every directory
/// above it are safe for this user (see the module docs).
pub fn ensure_private(home: &Path) -> Result<()> {
    let home = absolute(home.to_path_buf());
    let io = |what: &'static str| {
        let path = home.clone();
        move |source| Error::Io { what, path, source }
    };
    if !home.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&home).map_err(io("creating"))?;
    }
    let me = rustix::process::geteuid().as_raw();
    let md = std::fs::symlink_metadata(&home).map_err(io("reading the metadata of"))?;
    let refuse = |path: &Path, why: String| Err(Error::NotPrivate { path: path.to_path_buf(), why });
    if !md.is_dir() {
        return refuse(&home, "it is not a directory (a symlink or a file)".into());
    }
    if md.uid() != me {
        return refuse(&home, format!("it is owned by uid {}, not by you (uid {me})", md.uid()));
    }
    if md.permissions().mode() & 0o022 != 0 {
        return refuse(&home, format!("group or others can write to it (mode {:o})", md.permissions().mode() & 0o7777));
    }
    for dir in home.ancestors().skip(1) {
        let md = std::fs::metadata(dir).map_err(|source| Error::Io {
            what: "reading the metadata of",
            path: dir.to_path_buf(),
            source,
        })?;
        let mode = md.permissions().mode();
        if md.uid() != me && md.uid() != 0 {
            return refuse(&home, format!("{} above it is owned by uid {}", dir.display(), md.uid()));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return refuse(
                &home,
                format!(
                    "group or others can write to {} above it (mode {:o}, not sticky)",
                    dir.display(),
                    mode & 0o7777
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[test]
    fn a_missing_home_is_created_private() {
        let d = private_dir();
        let home = d.path().join("a/b/.msb");
        ensure_private(&home).unwrap();
        assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o700);
        ensure_private(&home).unwrap();
    }

    #[test]
    fn a_home_others_can_write_to_is_refused() {
        let d = private_dir();
        let home = d.path().join(".msb");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o775)).unwrap();
        match ensure_private(&home) {
            Err(Error::NotPrivate { why, .. }) => assert!(why.contains("group or others"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Below a group-writable directory (not sticky): refused too.
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        match ensure_private(&home) {
            Err(Error::NotPrivate { why, .. }) => assert!(why.contains("above it"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A sticky world-writable parent (like /tmp) is fine.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_private(&home).unwrap();
    }

    #[test]
    fn a_home_owned_by_another_user_is_refused() {
        let d = private_dir();
        let home = d.path().join(".msb");
        std::fs::create_dir(&home).unwrap();
        let other = if rustix::process::geteuid().is_root() { 4242 } else { 0 };
        if std::os::unix::fs::chown(&home, Some(other), None).is_err() {
            // Only root can give a directory away; as another user, root's own directory is
            // the foreign one.
            assert!(matches!(
                ensure_private(Path::new("/root")),
                Err(Error::NotPrivate { .. }) | Err(Error::Io { .. })
            ));
            return;
        }
        match ensure_private(&home) {
            Err(Error::NotPrivate { why, .. }) => assert!(why.contains("owned by uid"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_symlinked_home_is_refused() {
        let d = private_dir();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join(".msb");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(ensure_private(&link), Err(Error::NotPrivate { .. })));
    }
}
