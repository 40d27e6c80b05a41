//! File transfer inside the guest, for `msb cp`: agentd re-executed as an ordinary command
//! (`/proc/self/exe --msb-files MODE PATH`, so it works in any image, with no tool of the
//! image's own), run by the host through the exec channel and so under the same per-session
//! flow control, user and timeout as any command. Paths are the guest's: they are resolved
//! in the guest, as the exec's user.
//!
//! Modes: `tar PATH` writes a tar of PATH (a file, or a directory and everything below it,
//! symlinks as symlinks) to stdout, its top entry named after PATH's last component;
//! `untar PATH` reads such a tar from stdin and puts its top entry at PATH, or inside PATH
//! when PATH is an existing directory (docker cp's rule). Exit status 0, or 1 with the
//! reason on stderr.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// The flag that selects this mode.
pub const FLAG: &str = "--msb-files";

pub fn main(args: &[String]) -> ! {
    let r = match args {
        [mode, path] if mode == "tar" => pack(Path::new(path), std::io::stdout().lock()),
        [mode, path] if mode == "untar" => unpack(std::io::stdin().lock(), Path::new(path)),
        _ => Err(format!("usage: {FLAG} tar|untar PATH")),
    };
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

fn pack(path: &Path, out: impl Write) -> Result<(), String> {
    let shown = path.display();
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    let name = path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("root"));
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(256 * 1024, out));
    b.follow_symlinks(false);
    let r = if md.is_dir() { b.append_dir_all(&name, path) } else { b.append_path_with_name(path, &name) };
    r.and_then(|_| b.into_inner()).and_then(|mut w| w.flush()).map_err(|e| format!("{shown}: {e}"))
}

/// Where the top entry of the tar goes: inside `dest` if it is a directory, else at `dest`.
fn unpack(input: impl Read, dest: &Path) -> Result<(), String> {
    let into_dir = dest.is_dir();
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    let entries = ar.entries().map_err(|e| format!("reading the archive: {e}"))?;
    let mut top: Option<PathBuf> = None;
    for entry in entries {
        let mut e = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let path = e.path().map_err(|e| format!("an entry's name: {e}"))?.into_owned();
        let mut parts = path.components().filter(|c| !matches!(c, Component::CurDir));
        let Some(Component::Normal(first)) = parts.next() else {
            return Err(format!("entry {} is not relative", path.display()));
        };
        let first = PathBuf::from(first);
        if top.get_or_insert_with(|| first.clone()) != &first {
            return Err(format!("entry {} is outside the archive's top entry", path.display()));
        }
        let rest: Vec<Component> = parts.collect();
        if rest.iter().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("entry {} has `..` or an absolute part", path.display()));
        }
        let rest: PathBuf = rest.into_iter().collect();
        let target = match (into_dir, rest.as_os_str().is_empty()) {
            (true, _) => dest.join(&first).join(&rest),
            (false, true) => dest.to_path_buf(),
            (false, false) => dest.join(&rest),
        };
        let parent = target.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        e.unpack(&target).map_err(|err| format!("{}: {err}", target.display()))?;
    }
    if top.is_none() {
        return Err("the archive is empty".into());
    }
    Ok(())
}
