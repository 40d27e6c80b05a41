//! Errors of the sandbox API. Each one says what failed and what to do about it.

use msb_protocol::SpawnErrorKind;

use crate::StopReason;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Hypervisor(#[from] msb_hypervisor::Error),
    #[error("setting up the sandbox: {0}")]
    Setup(String),
    #[error("the guest did not become ready within {secs} s; last console output:\n{}", tail_or_hint(.console_tail))]
    BootTimeout { secs: u64, console_tail: String },
    #[error("the sandbox stopped: {reason}; last console output:\n{}", tail_or_hint(.console_tail))]
    VmStopped { reason: StopReason, console_tail: String },
    #[error("agent protocol: {0}")]
    Agent(String),
    #[error("command could not be started ({kind:?}): {message}")]
    SpawnFailed { kind: SpawnErrorKind, message: String },
    #[error("command output exceeded the {limit}-byte limit for a buffered exec; stream it instead or print less")]
    OutputTooLarge { limit: usize },
    #[error("command ran past its {after:?} timeout and was killed (SIGKILL to its process group)")]
    TimedOut { after: std::time::Duration },
    #[error("the command's stdin is closed: it has exited or was not started for streaming (broken pipe)")]
    StdinClosed,
    #[error("the sandbox is gone (its actors have stopped)")]
    Gone,
    #[error(transparent)]
    State(#[from] crate::state::StoreError),
    #[error("talking to the sandbox process: {0}")]
    Control(String),
    #[error("{0}")]
    Remote(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Sandboxes boot with a quiet kernel; say how to see more when it printed nothing.
fn tail_or_hint(tail: &str) -> &str {
    if tail.trim().is_empty() {
        "(nothing: the kernel boots quietly; rerun with kernel args \"loglevel=7\", e.g. `msb run --kernel-args loglevel=7`, to see its log)"
    } else {
        tail
    }
}

impl<T> From<ractor::MessagingErr<T>> for Error {
    fn from(_: ractor::MessagingErr<T>) -> Self {
        Error::Gone
    }
}

impl From<ractor::RactorErr<crate::sandbox::SupMsg>> for Error {
    fn from(_: ractor::RactorErr<crate::sandbox::SupMsg>) -> Self {
        Error::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_console_tail_comes_with_a_hint() {
        let e = Error::BootTimeout { secs: 5, console_tail: String::new() };
        assert!(e.to_string().contains("loglevel=7"), "{e}");
        let e = Error::BootTimeout { secs: 5, console_tail: "Kernel panic".into() };
        assert!(e.to_string().ends_with("Kernel panic"), "{e}");
    }
}
