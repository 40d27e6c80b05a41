//! The broker boundary: every message that crosses between components inside a sandbox
//! process, with the payload types it carries, and the named limits on that traffic.
//!
//! - [`exec`]: the one exec vocabulary ([`ExecSpec`], [`ExecOutput`], [`ExecEvent`],
//!   [`ExecError`], [`StopReason`]), shared by the in-process API, the control socket and the
//!   agent client. All of it is serializable, so an error keeps its kind across the socket.
//! - [`agent`]: what the virtio-console shell and the agent client may send each other
//!   ([`agent::GuestBytes`], [`agent::ToConsole`]) and the exec traffic a `Sandbox` handle
//!   may send the agent client ([`agent::AgentRequest`]).
//! - [`fs`]: FUSE requests between a virtio-fs shell and its mount's broker, and
//!   [`fs::MountSpec`].
//! - [`ids`]: validated names ([`SandboxName`]).
//! - [`limits`]: every bound on traffic between components, in one file.
//! - [`net`]: frames between the virtio-net shell and the gateway, and the gateway's controls.
//! - [`secret`]: secrets without their values, the vault's questions and answers, and the
//!   response mask.
//!
//! Invariants: this crate does no I/O and holds no state; payload types that need checking
//! are constructed only through a validating constructor; every enum that crosses a
//! component boundary is documented per variant. Components hold refs narrowed to one of
//! these enums (ractor derived refs), never each other's full mailbox types.

#![forbid(unsafe_code)]

pub mod agent;
pub mod exec;
pub mod fs;
pub mod ids;
pub mod limits;
pub mod net;
pub mod secret;

pub use exec::{ExecError, ExecEvent, ExecOutput, ExecSpec, StopReason};
pub use ids::{NameError, SandboxName};
pub use msb_protocol::{ExitStatus, Rlimit, SpawnErrorKind, WinSize};
