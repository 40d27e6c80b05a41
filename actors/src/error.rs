//! Errors of the in-process sandbox API: building and booting the VM, and its lifecycle.
//! Exec failures are [`ExecError`]s (serializable, shared with the control socket); an
//! [`Error`] wraps one transparently when a lifecycle call meets it. Messages say what
//! happened; remedies for a person are the CLI's to add.

use msb_schema::exec::tail_or_nothing;
use msb_schema::ExecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sandbox configuration is not acceptable; the text says why.
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
    /// The machine size is outside the sandbox limits.
    #[error(transparent)]
    Size(#[from] msb_schema::limits::SizeError),
    /// A file the sandbox boots from is missing or unreadable.
    #[error(transparent)]
    Artifacts(#[from] msb_images::Error),
    /// The VM could not be assembled.
    #[error(transparent)]
    Machine(#[from] msb_devices::MachineError),
    /// The actor tree could not be started.
    #[error("starting the sandbox's actors: {0}")]
    Spawn(String),
    /// The guest did not become ready in time.
    #[error("the guest did not become ready within {secs} s; last console output:\n{}", tail_or_nothing(.console_tail))]
    BootTimeout { secs: u64, console_tail: String },
    /// The sandbox stopped, is gone, or refused an exec.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<msb_hypervisor::Error> for Error {
    fn from(e: msb_hypervisor::Error) -> Self {
        Error::Machine(e.into())
    }
}
