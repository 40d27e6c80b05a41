//! The exec vocabulary: what to run ([`ExecSpec`]), what comes back ([`ExecEvent`],
//! [`ExecOutput`]), why it failed ([`ExecError`]) and why a VM stopped ([`StopReason`]).
//! The same types cross the in-process API, the control socket (serialized) and the agent
//! client, so there is nothing to convert and an error keeps its kind end to end.

use std::time::Duration;

use msb_protocol::{ExitStatus, Rlimit, SpawnErrorKind, WinSize};
use serde::{Deserialize, Serialize};

/// What to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// `root`, `NAME[:GROUP]` or `UID[:GID]` (default: root).
    pub user: Option<String>,
    /// Kill the command (SIGKILL to its process group) after this long; the exec then fails
    /// with [`ExecError::TimedOut`].
    pub timeout: Option<Duration>,
    /// Bytes for the command's stdin, which is closed after them (default: /dev/null).
    pub stdin: Option<Vec<u8>>,
    /// Run on a pseudo-terminal of this size (output arrives as stdout).
    pub tty: Option<WinSize>,
    /// Resource limits (`setrlimit`) the command starts under.
    pub rlimits: Vec<Rlimit>,
    /// The restricted profile: never root (`nobody` unless `user` names another user), no
    /// capabilities, `no_new_privs`. A sandbox created with `--profile restricted` forces it on
    /// every command.
    #[serde(default)]
    pub restricted: bool,
}

impl ExecSpec {
    /// Runs `argv` with everything else at its default.
    pub fn command<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecSpec { argv: argv.into_iter().map(Into::into).collect(), ..Default::default() }
    }

    /// The timeout in whole milliseconds, as the guest protocol carries it.
    pub fn timeout_ms(&self) -> Option<u64> {
        self.timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The result of a buffered exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// The exit code, if the process exited (rather than being killed by a signal).
    pub fn code(&self) -> Option<i32> {
        match self.status {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }

    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }
}

/// One event of a streaming exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The process ended; nothing follows.
    Exited(ExitStatus),
    /// The exec failed (spawn failure, timeout, VM stopped); nothing follows.
    Failed(ExecError),
}

/// Folds a stream of exec events into an [`ExecOutput`], keeping at most `limit` output
/// bytes (the `wait` of every exec handle).
#[derive(Debug)]
pub struct OutputCollector {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl OutputCollector {
    pub fn new(limit: usize) -> Self {
        OutputCollector { stdout: Vec::new(), stderr: Vec::new(), limit, overflowed: false }
    }

    /// Takes one event; returns the result once the exec has ended. Output past the limit is
    /// dropped and the exec then fails with [`ExecError::OutputTooLarge`].
    pub fn take(&mut self, ev: ExecEvent) -> Option<Result<ExecOutput, ExecError>> {
        match ev {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d)
                if self.overflowed || self.stdout.len() + self.stderr.len() + d.len() > self.limit =>
            {
                self.overflowed = true;
                self.stdout = Vec::new();
                self.stderr = Vec::new();
            }
            ExecEvent::Stdout(d) => self.stdout.extend(d),
            ExecEvent::Stderr(d) => self.stderr.extend(d),
            ExecEvent::Exited(_) if self.overflowed => {
                return Some(Err(ExecError::OutputTooLarge { limit: self.limit as u64 }))
            }
            ExecEvent::Exited(status) => {
                let (stdout, stderr) = (std::mem::take(&mut self.stdout), std::mem::take(&mut self.stderr));
                return Some(Ok(ExecOutput { status, stdout, stderr }));
            }
            ExecEvent::Failed(e) => return Some(Err(e)),
        }
        None
    }
}

/// Why an exec (or a request about one) failed. Serializable: it crosses the control socket
/// with its kind intact. Messages say what happened; what to do about it is the caller's to
/// say (the CLI adds remedies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ExecError {
    /// The request was refused before anything ran in the guest.
    #[error("invalid exec request: {0}")]
    Invalid(String),
    /// The command could not be started.
    #[error("command could not be started ({kind:?}): {message}")]
    SpawnFailed { kind: SpawnErrorKind, message: String },
    /// A buffered exec printed more than it may keep.
    #[error("command output exceeded the {limit}-byte limit for a buffered exec")]
    OutputTooLarge { limit: u64 },
    /// The command ran past its timeout and was killed.
    #[error("command ran past its {after:?} timeout and was killed (SIGKILL to its process group)")]
    TimedOut { after: Duration },
    /// The command's stdin is closed (it exited, or was not started for streaming).
    #[error("the command's stdin is closed: it has exited or was not started for streaming (broken pipe)")]
    StdinClosed,
    /// No exec with this id is running.
    #[error("exec {id} is not running")]
    NotRunning { id: u64 },
    /// The guest agent has not said it is ready.
    #[error("the guest agent is not ready yet")]
    NotReady,
    /// Too many requests are in flight on the agent channel.
    #[error("more than {limit} requests are in flight on this sandbox")]
    TooManyRequests { limit: u64 },
    /// The agent channel closed (the guest broke the protocol); nothing more is served.
    #[error("the agent channel closed: {0}")]
    ChannelClosed(String),
    /// The sandbox's VM stopped.
    #[error("the sandbox stopped: {reason}; last console output:\n{}", tail_or_nothing(.console_tail))]
    VmStopped { reason: StopReason, console_tail: String },
    /// The sandbox process refused the request.
    #[error("the sandbox process refused the request: {0}")]
    Refused(String),
    /// The connection to the sandbox process broke.
    #[error("the connection to the sandbox process broke: {0}")]
    Disconnected(String),
    /// The sandbox's components are gone.
    #[error("the sandbox is gone (its actors have stopped)")]
    Gone,
}

/// Sandboxes boot with a quiet kernel: say so when the console printed nothing.
pub fn tail_or_nothing(tail: &str) -> &str {
    if tail.trim().is_empty() {
        "(nothing: the kernel boots quietly; kernel argument \"loglevel=7\" shows its log)"
    } else {
        tail
    }
}

/// Why a sandbox's VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_kind_across_a_serialization() {
        for e in [
            ExecError::SpawnFailed { kind: SpawnErrorKind::NotFound, message: "nope".into() },
            ExecError::TimedOut { after: Duration::from_millis(1500) },
            ExecError::VmStopped { reason: StopReason::GuestPanic, console_tail: "Kernel panic".into() },
            ExecError::StdinClosed,
        ] {
            let bytes = postcard::to_allocvec(&e).unwrap();
            assert_eq!(postcard::from_bytes::<ExecError>(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn an_empty_console_tail_says_so() {
        let e = ExecError::VmStopped { reason: StopReason::Killed, console_tail: String::new() };
        assert!(e.to_string().contains("loglevel=7"), "{e}");
        let e = ExecError::VmStopped { reason: StopReason::Killed, console_tail: "Kernel panic".into() };
        assert!(e.to_string().ends_with("Kernel panic"), "{e}");
    }

    #[test]
    fn the_collector_keeps_streams_apart_and_bounds_them() {
        let mut c = OutputCollector::new(8);
        assert!(c.take(ExecEvent::Stdout(b"out".to_vec())).is_none());
        assert!(c.take(ExecEvent::Stderr(b"err".to_vec())).is_none());
        let out = c.take(ExecEvent::Exited(ExitStatus::Code(3))).unwrap().unwrap();
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.code()), (&b"out"[..], &b"err"[..], Some(3)));

        let mut c = OutputCollector::new(8);
        c.take(ExecEvent::Stdout(vec![0; 6]));
        c.take(ExecEvent::Stdout(vec![0; 6]));
        assert!(c.stdout.is_empty(), "overflowed output is dropped, not kept");
        c.take(ExecEvent::Stdout(vec![0; 1]));
        assert_eq!(c.take(ExecEvent::Exited(ExitStatus::Code(0))), Some(Err(ExecError::OutputTooLarge { limit: 8 })));
    }

    #[test]
    fn timeouts_in_milliseconds_saturate() {
        let s = ExecSpec { timeout: Some(Duration::MAX), ..ExecSpec::command(["true"]) };
        assert_eq!(s.timeout_ms(), Some(u64::MAX));
        assert_eq!(ExecSpec::command(["true"]).timeout_ms(), None);
    }
}
