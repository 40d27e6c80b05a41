//! msb's sandbox actor tree and its Rust API.
//!
//! ```no_run
//! # async fn demo() -> msb_actors::Result<()> {
//! let sb = msb_actors::Sandbox::builder().memory_mib(256).cpus(1).create().await?;
//! let out = sb.exec("uname", ["-a"]).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! sb.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The tree (one per sandbox): a `Supervisor` owning the VM, with linked children
//! `VcpuActor` (one per vCPU runner thread), `ConsoleDevice`, `RngDevice` (virtio device shells) and
//! `AgentClient` (the guest protocol). Components only hold the narrowest refs they need:
//! the console device can send the agent client [`console::GuestBytes`] and nothing else,
//! the agent client can send the console [`console::ToConsole`] and nothing else.
//!
//! Named sandboxes ([`managed`]) run this tree in their own host process ([`server`]),
//! reached over a per-sandbox Unix socket ([`control`]) and recorded in SQLite ([`state`]).
//!
//! Supervision fails closed: if a child dies (a guest broke a device or protocol contract),
//! the supervisor stops the VM and reports why; nothing is restarted against a half-changed
//! guest.

#![forbid(unsafe_code)]

mod agent;
pub mod console;
pub mod control;
mod error;
pub mod home;
pub mod initramfs;
pub mod machine;
pub mod managed;
pub mod sandbox;
pub mod server;
pub mod state;
pub mod vcpu;

pub use agent::{AgentCore, AgentEvent, ExecEvent, MAX_BUFFERED_OUTPUT, MAX_PENDING, STREAM_WINDOW};
pub use error::{Error, Result};
pub use msb_protocol::{ExitStatus, Rlimit, SpawnErrorKind, WinSize};
pub use sandbox::BootTimes;
pub use sandbox::{ExecHandle, Sandbox, SandboxBuilder};

/// What to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// `root`, `UID` or `UID:GID` (default: root).
    pub user: Option<String>,
    /// Kill the command (SIGKILL) after this long; the exec then fails with `Error::TimedOut`.
    pub timeout: Option<std::time::Duration>,
    /// Bytes for the command's stdin, which is closed after them (default: /dev/null).
    pub stdin: Option<Vec<u8>>,
    /// Run on a pseudo-terminal of this size (output arrives as stdout).
    pub tty: Option<msb_protocol::WinSize>,
    /// Resource limits (`setrlimit`) the command starts under.
    pub rlimits: Vec<msb_protocol::Rlimit>,
}

/// The result of a buffered exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a sandbox's VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The host asked, and the guest synced and shut down.
    Shutdown,
    /// The host stopped the VM without the guest's cooperation (timeout or kill).
    Killed,
    /// The guest halted or powered itself off.
    GuestPowerOff,
    /// The guest rebooted itself (a sandbox does not restart).
    GuestReboot,
    /// The guest kernel panicked.
    GuestPanic,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM reported an error it could not handle for this guest.
    KvmError(String),
    /// A device or the agent channel failed because the guest broke its contract.
    DeviceFailure(String),
    /// The guest did not become ready in time.
    BootTimeout,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Shutdown => write!(f, "shut down on request"),
            StopReason::Killed => write!(f, "killed by the host"),
            StopReason::GuestPowerOff => write!(f, "the guest powered off"),
            StopReason::GuestReboot => write!(f, "the guest rebooted (sandboxes do not restart)"),
            StopReason::GuestPanic => write!(f, "the guest kernel panicked"),
            StopReason::TripleFault => write!(f, "the guest triple-faulted"),
            StopReason::KvmError(e) => write!(f, "KVM error: {e}"),
            StopReason::DeviceFailure(e) => write!(f, "device failure: {e}"),
            StopReason::BootTimeout => write!(f, "the guest did not become ready in time"),
        }
    }
}
