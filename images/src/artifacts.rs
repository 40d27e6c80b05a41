//! Where msb finds the guest kernel, agentd and busybox under its home. A missing file is an [`crate::Error::Missing`]
//! that names the artifact, so that a caller can say how to make it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file a sandbox boots from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    Kernel,
    Agentd,
    Busybox,
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Artifact::Kernel => "guest kernel",
            Artifact::Agentd => "agentd",
            Artifact::Busybox => "static busybox",
        })
    }
}

fn must_exist(path: PathBuf, what: Artifact) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing { what, path })
    }
}

/// The guest kernel (`$MSB_HOME/kernel/vmlinux`).
pub fn kernel(home: &Path) -> Result<PathBuf> {
    must_exist(home.join("kernel/vmlinux"), Artifact::Kernel)
}

/// The static agentd binary (`$MSB_HOME/bin/agentd`).
pub fn agentd(home: &Path) -> Result<PathBuf> {
    must_exist(home.join("bin/agentd"), Artifact::Agentd)
}

/// A static busybox for the initramfs (`$MSB_HOME/bin/busybox`, else `/bin/busybox`).
pub fn busybox(home: &Path) -> Result<PathBuf> {
    let own = home.join("bin/busybox");
    if own.is_file() {
        return Ok(own);
    }
    must_exist(PathBuf::from("/bin/busybox"), Artifact::Busybox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_artifact_is_named_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        match kernel(dir.path()) {
            Err(Error::Missing { what: Artifact::Kernel, path }) => assert_eq!(path, dir.path().join("kernel/vmlinux")),
            other => panic!("{other:?}"),
        }
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/agentd"), b"x").unwrap();
        assert_eq!(agentd(dir.path()).unwrap(), dir.path().join("bin/agentd"));
    }
}
