//! Named volumes: directories of the msb home (`volumes/NAME`) that outlive the sandboxes
//! mounting them (`-v NAME:/path`). A volume is removed only when no recorded sandbox mounts
//! it. Names follow the sandbox-name rules ([`SandboxName`]), so a name is never a path.

use std::path::{Path, PathBuf};

use msb_schema::SandboxName;
use serde::Serialize;

use crate::client::Msb;
use crate::{Error, Result};

/// One volume: its name, where it lives, and the sandboxes that mount it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
    pub used_by: Vec<String>,
}

/// The directory holding every volume.
pub fn volumes_dir(home: &Path) -> PathBuf {
    home.join("volumes")
}

/// The directory of volume `name`, which must exist.
pub fn path_of(home: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    let n = SandboxName::named(name, "volume").map_err(|e| e.to_string())?;
    let p = volumes_dir(home).join(n.as_str());
    if !p.is_dir() {
        return Err(format!("no volume named {name}: create it with `msb volume create {name}`"));
    }
    Ok(p)
}

/// Creates volume `name` (refused if it exists).
pub fn create(msb: &Msb, name: &str) -> Result<Volume> {
    let n = SandboxName::named(name, "volume")?;
    let dir = volumes_dir(msb.home());
    std::fs::create_dir_all(&dir).map_err(|e| Error::Config(format!("creating {}: {e}", dir.display())))?;
    let p = dir.join(n.as_str());
    match std::fs::create_dir(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Config(format!("a volume named {name} exists already")));
        }
        Err(e) => return Err(Error::Config(format!("creating {}: {e}", p.display()))),
    }
    Ok(Volume { name: name.into(), path: p, used_by: Vec::new() })
}

/// Every volume, by name, with the sandboxes that mount it.
pub fn list(msb: &Msb) -> Result<Vec<Volume>> {
    let records = msb.list()?;
    let Ok(entries) = std::fs::read_dir(volumes_dir(msb.home())) else { return Ok(Vec::new()) };
    let mut out: Vec<Volume> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let used_by = records
                .iter()
                .filter(|r| r.config.mounts.iter().any(|m| m.volume.as_deref() == Some(name.as_str())))
                .map(|r| r.name.clone())
                .collect();
            Volume { name, path: e.path(), used_by }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One volume, with the sandboxes that mount it.
pub fn inspect(msb: &Msb, name: &str) -> Result<Volume> {
    path_of(msb.home(), name).map_err(Error::Config)?;
    list(msb)?.into_iter().find(|v| v.name == name).ok_or_else(|| Error::Config(format!("no volume named {name}")))
}

/// Removes volume `name` and everything in it; refused while a recorded sandbox mounts it.
pub fn remove(msb: &Msb, name: &str) -> Result<()> {
    let v = inspect(msb, name)?;
    if !v.used_by.is_empty() {
        return Err(Error::Config(format!(
            "volume {name} is mounted by {}: remove those sandboxes first (msb rm)",
            v.used_by.join(", ")
        )));
    }
    std::fs::remove_dir_all(&v.path).map_err(|e| Error::Config(format!("removing {}: {e}", v.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{MountSpec, SandboxConfig};

    #[test]
    fn a_volume_is_created_listed_with_its_users_and_removed_only_when_unused() {
        let t = tempfile::tempdir().unwrap();
        let msb = Msb::at(t.path());
        let v = create(&msb, "cache").unwrap();
        assert!(v.path.is_dir() && v.path.starts_with(t.path().join("volumes")));
        std::fs::write(v.path.join("kept"), b"x").unwrap();
        assert!(create(&msb, "cache").unwrap_err().to_string().contains("exists already"));
        for bad in ["../x", "a/b", "", ".", ".."] {
            let e = create(&msb, bad).unwrap_err().to_string();
            assert!(e.contains("invalid volume name"), "{bad:?}: the message speaks of a volume: {e}");
        }
        let mut m = MountSpec::new(&v.path, "/cache", false).unwrap();
        m.volume = Some("cache".into());
        msb.create("user", SandboxConfig { mounts: vec![m], ..Default::default() }).unwrap();
        assert_eq!(list(&msb).unwrap()[0].used_by, vec!["user".to_string()]);
        let e = remove(&msb, "cache").unwrap_err().to_string();
        assert!(e.contains("mounted by user"), "{e}");
        assert!(v.path.join("kept").exists(), "a refused rm keeps the files");
        crate::store::Store::open(t.path()).unwrap().remove("user").unwrap();
        remove(&msb, "cache").unwrap();
        assert!(!v.path.exists());
        assert!(inspect(&msb, "cache").unwrap_err().to_string().contains("no volume named cache"));
    }
}
