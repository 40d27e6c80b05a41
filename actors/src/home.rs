//! Where msb keeps its files (`MSB_HOME`, default `~/.msb`) and how it finds the guest kernel,
//! agentd and busybox. Anything missing comes back as an error that says how to make it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The msb home directory.
pub fn msb_home() -> PathBuf {
    if let Some(h) = std::env::var_os("MSB_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".msb")
}

fn must_exist(p: PathBuf, what: &str, how: &str) -> Result<PathBuf> {
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::Missing(format!("{what} not found at {}; {how}", p.display())))
    }
}

/// The guest kernel (`$MSB_HOME/kernel/vmlinux`).
pub fn kernel(home: &Path) -> Result<PathBuf> {
    must_exist(
        home.join("kernel/vmlinux"),
        "guest kernel",
        "build it with `guest/kernel/build.sh guest \"$MSB_HOME/kernel\"` (or run `scripts/setup.sh`)",
    )
}

/// The static agentd binary (`$MSB_HOME/bin/agentd`).
pub fn agentd(home: &Path) -> Result<PathBuf> {
    must_exist(
        home.join("bin/agentd"),
        "agentd",
        "build and install it with `scripts/build-agentd.sh \"$MSB_HOME/bin\"` (or run `scripts/setup.sh`)",
    )
}

/// A static busybox for the initramfs (`$MSB_HOME/bin/busybox`, else `/bin/busybox`).
pub fn busybox(home: &Path) -> Result<PathBuf> {
    let own = home.join("bin/busybox");
    if own.is_file() {
        return Ok(own);
    }
    must_exist(PathBuf::from("/bin/busybox"), "static busybox", "install Debian's busybox-static")
}
