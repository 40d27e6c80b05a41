//! Named sandboxes from any process, without the VMM: the client ↔ sandbox-process contract
//! ([`wire`]), the SQLite state store ([`store`], the only user of SQLite), and the SDK
//! ([`client`]: [`Msb`], [`NamedSandbox`], [`RemoteExec`]; [`files`]: a sandbox's files).
//!
//! ```no_run
//! # async fn demo() -> msb_control_plane::Result<()> {
//! use msb_control_plane::{ExecSpec, Msb, SandboxConfig};
//! let msb = Msb::from_env()?;
//! let sb = msb.create("web", SandboxConfig::default())?;
//! sb.start_detached().await?;
//! let out = msb.get("web")?.exec(ExecSpec::command(["uname", "-a"])).await?;
//! msb.get("web")?.stop(std::time::Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! Invariants: every command first reconciles the store (a sandbox whose process died is
//! marked crashed, its stale socket removed); the store is the only shared state between
//! clients and sandbox processes, and every change to it is one transaction. Errors say
//! what failed; remedies ("run `msb start`") are the CLI's to add.

#![forbid(unsafe_code)]

pub mod client;
pub mod files;
pub mod process;
pub mod secrets;
pub mod store;
pub mod volumes;
pub mod wire;

pub use client::{ExecEvents, ExecInput, Msb, NamedSandbox, Owner, RemoteExec};
pub use files::{FileError, FileErrorKind, FileInfo, FileKind, FileReader, FileWriter, Files};
/// The schema crate, for its limits and exec vocabulary.
pub use msb_schema as schema;
pub use msb_schema::net::PortProto;
pub use msb_schema::{ExecError, ExecEvent, ExecOutput, ExecSpec, SandboxName, StopReason};
pub use store::{Record, Status, StoreError};
pub use wire::{parse_guest_port, NetSettings, Publish, SandboxConfig};

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or request is not acceptable; the text says why.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Name(#[from] msb_schema::NameError),
    #[error(transparent)]
    Size(#[from] msb_schema::limits::SizeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// Talking to a sandbox process failed.
    #[error("talking to the sandbox process: {0}")]
    Wire(String),
    /// The sandbox process could not be started or did not come up.
    #[error("starting the sandbox process: {0}")]
    Spawn(String),
    /// The sandbox process started but reported that the sandbox could not.
    #[error("{0}")]
    StartFailed(String),
    /// A file operation in a sandbox failed there.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// The image store refused or failed.
    #[error(transparent)]
    Image(msb_images::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
