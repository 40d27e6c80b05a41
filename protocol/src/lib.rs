//! The guest protocol: what the host and `agentd` say to each other over the agent channel
//! (a virtio-console port), and the fixed facts of the guest contract (device addresses).
//!
//! Wire format: a stream of frames, each a 4-byte little-endian payload length followed by a
//! postcard-encoded message. Invariants:
//! - no frame payload is longer than [`MAX_FRAME`]; a longer header is an error before a single
//!   payload byte is buffered, so a peer can never make the other side allocate more than
//!   `MAX_FRAME + HEADER_LEN` bytes per channel;
//! - a frame that does not decode into the expected message type is an error; the channel is
//!   closed, never resynchronised (a hostile peer could otherwise smuggle frames);
//! - the guest speaks first ([`GuestMsg::Ready`] with the range of versions it speaks), the host
//!   answers [`HostMsg::Hello`] with the version it picked, or closes the channel;
//! - requests carry host-chosen ids; every guest reply names the id it answers.

#![forbid(unsafe_code)]

use serde::{de::DeserializeOwned, Deserialize, Serialize};

mod codec;
pub use codec::{encode, FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build can still speak.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Largest output chunk agentd puts in one [`GuestMsg::Output`].
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// Most arguments or environment entries in one exec request.
pub const MAX_EXEC_ITEMS: usize = 4096;

/// Name of the virtio-console port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "msb.agent";

/// Guest physical address of the boot-timer device: agentd writes one byte here as soon as
/// it runs, and the VMM records the time since its own start.
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// Guest physical base of the first virtio-mmio device; each device takes [`MMIO_SLOT_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_1000;
/// Size of one MMIO slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// A request id chosen by the host.
pub type RequestId = u64;

/// Messages from the host to agentd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// Answer to [`GuestMsg::Ready`]: the version both sides will speak.
    Hello { version: u16 },
    /// Run a command.
    Exec(ExecRequest),
    /// Sync file systems and power off; answered by [`GuestMsg::ShutdownAck`].
    Shutdown { id: RequestId },
    /// Input for request `id` (which asked for stdin); at most [`MAX_OUTPUT_CHUNK`] bytes.
    /// An empty chunk closes the process's stdin.
    Stdin { id: RequestId, data: Vec<u8> },
    /// Send `signal` (1..=64) to the process group of request `id`.
    Signal { id: RequestId, signal: i32 },
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: RequestId,
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, applied over agentd's defaults.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
    /// `uid[:gid]` (numbers) or `root`; the agent's own (root) when absent.
    pub user: Option<String>,
    /// Kill the process (SIGKILL to its process group) after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Give the process a stdin pipe fed by [`HostMsg::Stdin`]; otherwise /dev/null.
    pub stdin: bool,
}

/// A parsed `uid[:gid]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
}

impl UserSpec {
    /// Parses `root`, `UID` (gid = uid) or `UID:GID`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "root" {
            return Ok(UserSpec { uid: 0, gid: 0 });
        }
        let num = |v: &str| v.parse::<u32>().map_err(|_| format!("user {s:?}: want root, UID or UID:GID (numbers)"));
        match s.split_once(':') {
            Some((u, g)) => Ok(UserSpec { uid: num(u)?, gid: num(g)? }),
            None => {
                let uid = num(s)?;
                Ok(UserSpec { uid, gid: uid })
            }
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Why a process could not be started (as opposed to "it ran and failed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpawnErrorKind {
    NotFound,
    PermissionDenied,
    NotExecutable,
    BadCwd,
    InvalidRequest,
    Other,
}

/// Messages from agentd to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// First message: agentd is up and speaks versions `min..=max`.
    Ready { min_version: u16, max_version: u16, agent: String },
    /// The process for request `id` started.
    Started { id: RequestId, pid: u32 },
    /// A chunk of output of request `id`.
    Output { id: RequestId, stream: Stream, data: Vec<u8> },
    /// The process of request `id` ended; no more output follows.
    Exited { id: RequestId, status: ExitStatus },
    /// The process of request `id` ran past its timeout and was killed; `Exited` follows.
    TimedOut { id: RequestId },
    /// The process of request `id` could not be started.
    SpawnFailed { id: RequestId, kind: SpawnErrorKind, message: String },
    /// File systems are synced; the guest powers off next.
    ShutdownAck { id: RequestId },
    /// agentd could not make sense of a host message.
    Error { message: String },
}

/// Picks the version to speak with a guest that offers `min..=max`, or `None`.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let hi = max.min(PROTOCOL_VERSION);
    (hi >= min.max(MIN_PROTOCOL_VERSION)).then_some(hi)
}

/// Decodes one frame payload into a message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

impl ExecRequest {
    /// Checks the request before anything acts on it.
    pub fn validate(&self) -> Result<(), String> {
        if self.argv.is_empty() {
            return Err("argv is empty: name a program to run".into());
        }
        if self.argv.len() > MAX_EXEC_ITEMS || self.env.len() > MAX_EXEC_ITEMS {
            return Err(format!("more than {MAX_EXEC_ITEMS} arguments or environment entries"));
        }
        let nul = |s: &String| s.contains('\0');
        if self.argv.iter().any(nul) || self.env.iter().any(|(k, v)| nul(k) || nul(v)) {
            return Err("arguments and environment must not contain NUL bytes".into());
        }
        if self.env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
            return Err("environment names must be non-empty and contain no '='".into());
        }
        if let Some(user) = &self.user {
            UserSpec::parse(user)?;
        }
        if let Some(cwd) = &self.cwd {
            if nul(cwd) || !cwd.starts_with('/') {
                return Err(format!("cwd {cwd:?} must be an absolute path without NUL"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ExecRequest {
        ExecRequest {
            id: 7,
            argv: vec!["echo".into(), "hi".into()],
            env: vec![],
            cwd: None,
            user: None,
            timeout_ms: None,
            stdin: false,
        }
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate(0, 0), None);
        assert_eq!(negotiate(3, 2), None);
    }

    #[test]
    fn exec_validation_rejects_bad_requests() {
        assert!(req().validate().is_ok());
        let mut r = req();
        r.argv.clear();
        assert!(r.validate().unwrap_err().contains("argv is empty"));
        let mut r = req();
        r.argv.push("a\0b".into());
        assert!(r.validate().unwrap_err().contains("NUL"));
        let mut r = req();
        r.env.push(("A=B".into(), "x".into()));
        assert!(r.validate().unwrap_err().contains("'='"));
        let mut r = req();
        r.cwd = Some("relative".into());
        assert!(r.validate().unwrap_err().contains("absolute"));
        let mut r = req();
        r.argv = vec!["x".into(); MAX_EXEC_ITEMS + 1];
        assert!(r.validate().is_err());
        let mut r = req();
        r.user = Some("nobody".into());
        assert!(r.validate().unwrap_err().contains("UID:GID"));
    }

    #[test]
    fn user_specs() {
        assert_eq!(UserSpec::parse("root"), Ok(UserSpec { uid: 0, gid: 0 }));
        assert_eq!(UserSpec::parse("1000"), Ok(UserSpec { uid: 1000, gid: 1000 }));
        assert_eq!(UserSpec::parse("1000:50"), Ok(UserSpec { uid: 1000, gid: 50 }));
        assert!(UserSpec::parse("1000:").is_err());
        assert!(UserSpec::parse("-1").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![HostMsg::Hello { version: 1 }, HostMsg::Exec(req()), HostMsg::Shutdown { id: 3 }];
        for m in msgs {
            let frame = encode(&m).unwrap();
            let mut d = FrameDecoder::new();
            let mut out = Vec::new();
            d.feed(&frame, &mut |p| out.push(decode::<HostMsg>(&p).unwrap())).unwrap();
            assert_eq!(out, vec![m]);
        }
    }
}
