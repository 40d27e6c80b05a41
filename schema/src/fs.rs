//! Messages between a virtio-fs device shell and its mount's filesystem broker, and the
//! description of a mount.
//!
//! - The shell sends its broker [`FsRequest`]s (the bytes of one FUSE request, copied out of
//!   guest memory, and how many reply bytes the guest's buffers take) and nothing else; the
//!   broker answers each with one [`FsReply`] and sends the shell nothing else. At most
//!   [`MAX_FS_IN_FLIGHT`] requests are out per mount (the device takes no more chains past
//!   it, which pushes back on the guest).
//! - The broker never sees guest memory, guest addresses or other mounts.
//!
//! Invariant: a request's bytes are at most [`MAX_FS_REQUEST`] and a reply's at most the
//! request's `room`; [`MountSpec`]s are checked when built ([`MountSpec::new`]).

use std::path::{Path, PathBuf};

/// Most FUSE requests out to one mount's broker at once.
pub const MAX_FS_IN_FLIGHT: usize = 64;
/// Largest FUSE request bytes carried to a broker (a 128 KiB write and its headers).
pub const MAX_FS_REQUEST: usize = 136 * 1024;
/// Most mounts (host directories and volumes) per sandbox.
pub const MAX_MOUNTS: usize = 4;
/// Longest guest mount path.
pub const MAX_GUEST_PATH: usize = 256;

/// One request for the broker: `id` names it in the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRequest {
    pub id: u64,
    pub bytes: Vec<u8>,
    /// The most reply bytes the guest's buffers take.
    pub room: u32,
}

/// The broker's answer to request `id`: the reply bytes (empty when the request gets none,
/// as FORGET does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsReply {
    pub id: u64,
    pub bytes: Vec<u8>,
}

/// What a broker's mailbox takes.
#[derive(Debug)]
pub enum FsBrokerMsg {
    /// The shell to answer (sent once, by the supervisor, before any request).
    Attach(ractor::DerivedActorRef<FsReply>),
    Request(FsRequest),
}

impl From<FsRequest> for FsBrokerMsg {
    fn from(r: FsRequest) -> Self {
        FsBrokerMsg::Request(r)
    }
}

impl TryFrom<FsBrokerMsg> for FsRequest {
    type Error = ();
    fn try_from(m: FsBrokerMsg) -> Result<Self, ()> {
        match m {
            FsBrokerMsg::Request(r) => Ok(r),
            FsBrokerMsg::Attach(_) => Err(()),
        }
    }
}

/// Why a mount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("the mount's host path {0} is not absolute")]
    HostNotAbsolute(PathBuf),
    #[error("{0} mounts: a sandbox has at most {MAX_MOUNTS}")]
    TooMany(usize),
    #[error("two mounts at {0}: give each its own guest path")]
    SameGuestPath(String),
    #[error("the guest path {0:?} must be absolute, normalized (no `.`, `..` or `//`), at most {MAX_GUEST_PATH} bytes, not `/`, and without `,`, `:` or whitespace")]
    GuestPath(String),
}

/// One host directory the sandbox sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    /// The host directory, absolute (resolved by whoever built the spec).
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    /// The host refuses every change.
    pub read_only: bool,
    /// The named volume this directory is (`None`: a host directory the user named).
    #[serde(default)]
    pub volume: Option<String>,
    /// The owner every file appears to have in the guest (`None`: root, the default
    /// workload user). Host ownership never changes whatever it is.
    #[serde(default)]
    pub owner: Option<FileOwner>,
    /// The host directory's identity when the sandbox was created: every start opens `host`
    /// without following symlinks and refuses a directory that is not this one (`None`:
    /// recorded before identities were, checked for symlinks only).
    #[serde(default)]
    pub identity: Option<HostIdentity>,
}

/// A host directory's `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// The guest uid and gid files of a mount appear to have (default: root's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileOwner {
    pub uid: u32,
    pub gid: u32,
}

impl MountSpec {
    pub fn new(host: &Path, guest: &str, read_only: bool) -> Result<MountSpec, MountError> {
        if !host.is_absolute() {
            return Err(MountError::HostNotAbsolute(host.to_path_buf()));
        }
        check_guest_path(guest)?;
        Ok(MountSpec {
            host: host.to_path_buf(),
            guest: guest.to_string(),
            read_only,
            volume: None,
            owner: None,
            identity: None,
        })
    }
}

/// Checks a sandbox's mounts: at most [`MAX_MOUNTS`], each guest path valid and its own.
pub fn check_mounts(mounts: &[MountSpec]) -> Result<(), MountError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(MountError::TooMany(mounts.len()));
    }
    for (i, m) in mounts.iter().enumerate() {
        check_guest_path(&m.guest)?;
        if mounts[..i].iter().any(|o| o.guest == m.guest) {
            return Err(MountError::SameGuestPath(m.guest.clone()));
        }
    }
    Ok(())
}

/// A guest mount path: absolute, normalized, not the root, and safe to carry on the kernel
/// command line (no separators or whitespace).
pub fn check_guest_path(p: &str) -> Result<(), MountError> {
    let bad = || MountError::GuestPath(p.to_string());
    if !p.starts_with('/') || p == "/" || p.len() > MAX_GUEST_PATH || p.ends_with('/') {
        return Err(bad());
    }
    if p.chars().any(|c| c == ',' || c == ':' || c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    if p[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_absolute_normalized_and_plain() {
        for ok in ["/work", "/home/msb/project", "/a-b_c.d"] {
            assert_eq!(check_guest_path(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/", "work", "/work/", "/a/../b", "/a/./b", "//a", "/a//b", "/a b", "/a,b", "/a:b", "/a\nb"] {
            assert!(check_guest_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_guest_path(&format!("/{}", "a".repeat(MAX_GUEST_PATH))).is_err());
        assert!(MountSpec::new(Path::new("relative"), "/work", false).is_err());
        let m = |g: &str| MountSpec::new(Path::new("/tmp"), g, false).unwrap();
        assert_eq!(check_mounts(&[m("/a"), m("/b")]), Ok(()));
        assert_eq!(check_mounts(&[m("/a"), m("/a")]), Err(MountError::SameGuestPath("/a".into())));
        assert_eq!(check_mounts(&vec![m("/a"); MAX_MOUNTS + 1]), Err(MountError::TooMany(MAX_MOUNTS + 1)));
        assert!(MountSpec::new(Path::new("/tmp"), "/work", true).unwrap().read_only);
    }
}
