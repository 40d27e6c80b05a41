//! What a sandbox boots from: the guest kernel, agentd and busybox found in `MSB_HOME`
//! ([`artifacts`]), the initramfs assembled from them ([`initramfs`]), and OCI images: their
//! documents as checked types ([`oci`]), the content-addressed local store that loads and
//! verifies them ([`store`]), and the read-only root filesystem built from their layers plus
//! the writable disk of each sandbox ([`rootfs`]).
//!
//! Invariants: nothing here talks to a VM or a guest; every file this crate writes is written
//! to a temporary name first and renamed, so a concurrent reader never sees a torn file.
//! Errors say what is missing and where it was looked for; how to build it is for the
//! caller to say (the CLI knows the commands).

#![forbid(unsafe_code)]

pub mod artifacts;
pub mod home;
pub mod initramfs;
pub mod oci;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod tarstream;
#[doc(hidden)]
pub mod testkit;

pub use artifacts::{agentd, busybox, kernel, Artifact};
pub use home::{ensure_private, msb_home};

/// Why an artifact could not be found or built, or the home could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither `MSB_HOME` nor `HOME` is set.
    #[error("neither MSB_HOME nor HOME is set, so msb has no home directory")]
    NoHome,
    /// The home directory is not this user's alone.
    #[error("refusing to use {} as msb's home: {why}", .path.display())]
    NotPrivate { path: std::path::PathBuf, why: String },
    /// A file a sandbox boots from is not where it is looked for.
    #[error("{what} not found at {}", .path.display())]
    Missing { what: Artifact, path: std::path::PathBuf },
    /// A layer of an image is malformed or hostile; nothing of it was kept.
    #[error("layer {layer} ({digest}){}: {why}", .entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    Layer { layer: usize, digest: oci::Digest, entry: Option<String>, why: String },
    /// An image archive or document is malformed, or does not match its digests.
    #[error("{0}")]
    Image(String),
    /// No image by that name is in the local store.
    #[error("no image {0:?} in the local store (see `msb images`; `msb load -i FILE` adds one)")]
    NoSuchImage(String),
    /// A helper tool failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// Reading, writing or running something failed.
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
