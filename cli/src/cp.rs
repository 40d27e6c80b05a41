//! `msb cp SRC DST`, with `NAME:PATH` on one side, as `docker cp`: files and directories
//! (recursively, symlinks as symlinks), through the SDK's
//! [`copy_in`](msb_control_plane::Files::copy_in) and
//! [`copy_out`](msb_control_plane::Files::copy_out) (the host extracts a guest's copy
//! only below the destination; see `msb_control_plane::files`).

use std::path::PathBuf;

use msb_control_plane::{Error, Msb, Result};

enum Loc {
    Host(PathBuf),
    Guest(String, String),
}

/// `NAME:PATH` is a sandbox's path (relative paths are from `/`); anything else is the host's.
fn parse(s: &str) -> Loc {
    match s.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') && !name.starts_with('.') => {
            let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
            Loc::Guest(name.to_string(), path)
        }
        _ => Loc::Host(PathBuf::from(s)),
    }
}

pub async fn cp(msb: &Msb, src: &str, dst: &str) -> Result<()> {
    match (parse(src), parse(dst)) {
        (Loc::Host(from), Loc::Guest(name, to)) => msb.get(&name)?.files().copy_in(&from, &to).await,
        (Loc::Guest(name, from), Loc::Host(to)) => msb.get(&name)?.files().copy_out(&from, &to).await,
        (Loc::Host(_), Loc::Host(_)) => {
            Err(Error::Config("one side of `msb cp` must be NAME:PATH in a sandbox".into()))
        }
        (Loc::Guest(..), Loc::Guest(..)) => {
            Err(Error::Config("`msb cp` copies between the host and one sandbox, not between sandboxes".into()))
        }
    }
}
