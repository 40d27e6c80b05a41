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
//! - requests carry host-chosen ids; every guest reply names the id it answers;
//! - flow control is per session, both ways, in [`cost`] units: agentd sends a session's
//!   output only against credit the host granted ([`OUTPUT_WINDOW`] to start, then
//!   [`HostMsg::OutputAck`]), and the host sends a session's stdin only against credit agentd
//!   granted ([`STDIN_WINDOW`] to start, then [`GuestMsg::StdinAck`] once the bytes are in the
//!   command's pipe). Either side overdrawing, or an empty [`GuestMsg::Output`], is a protocol
//!   violation. So one slow reader or writer stalls only its own session, and neither side
//!   ever buffers more than a window per session.

#![forbid(unsafe_code)]

use serde::{de::DeserializeOwned, Deserialize, Serialize};

mod codec;
pub mod sync;
pub use codec::{encode, FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest version this build can still speak.
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// Largest output chunk agentd puts in one [`GuestMsg::Output`].
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// Most arguments or environment entries in one exec request.
pub const MAX_EXEC_ITEMS: usize = 4096;

/// Fixed cost of one data message against a window, on top of its bytes, so that a stream of
/// tiny (or empty) chunks is paid for too.
pub const FRAME_COST: usize = 64;
/// Output credit (in [`cost`] units) a session starts with, and the most the host ever owes.
pub const OUTPUT_WINDOW: usize = 256 * 1024;
/// Stdin credit (in [`cost`] units) a session starts with, and the most agentd ever owes.
pub const STDIN_WINDOW: usize = 256 * 1024;

/// What a data message of `len` bytes costs against a window.
pub const fn cost(len: usize) -> usize {
    len.saturating_add(FRAME_COST)
}

/// Name of the virtio-console port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "msb.agent";

/// Kernel argument that tells agentd to boot into an image: the disk with serial
/// [`IMAGE_DISK_SERIAL`] (a read-only squashfs) under the disk with serial
/// [`ROOT_DISK_SERIAL`] (the sandbox's writable ext4), joined by overlayfs, as `/`.
pub const ROOT_CMDLINE: &str = "msb.root=overlay";

/// The kernel command-line entry that gives the guest a network:
/// `msb.net=GUEST4/PREFIX,GATEWAY4,GUEST6/PREFIX,GATEWAY6`. agentd configures `eth0`, the
/// default routes and `/etc/resolv.conf` (the gateway answers DNS) from it; without it the
/// sandbox has no network device.
pub const NET_CMDLINE: &str = "msb.net=";
/// The kernel command-line entry that lists the sandbox's shared directories:
/// `msb.mounts=TAG:GUEST_PATH[:ro],…`. agentd mounts each virtio-fs tag at its path inside
/// the sandbox's root (`nosuid,nodev`; read-only when `:ro`, though the host enforces that
/// itself).
pub const MOUNTS_CMDLINE: &str = "msb.mounts=";

/// Kernel command-line entry that makes the root file system read-only once the agent has set
/// the guest up (a fresh tmpfs on `/tmp` stays writable).
pub const READ_ONLY_CMDLINE: &str = "msb.ro=1";
/// virtio-blk serial of an image's read-only root filesystem.
pub const IMAGE_DISK_SERIAL: &str = "msb-image";
/// virtio-blk serial of a sandbox's writable disk.
pub const ROOT_DISK_SERIAL: &str = "msb-root";

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
    /// Input for request `id` (which asked for stdin); at most [`MAX_OUTPUT_CHUNK`] bytes, sent
    /// only against stdin credit. An empty chunk closes the process's stdin.
    Stdin { id: RequestId, data: Vec<u8> },
    /// The host consumed `credit` ([`cost`] units) of request `id`'s output: agentd may send
    /// that much more.
    OutputAck { id: RequestId, credit: u64 },
    /// Kill every process request `id` started (its cgroup), wherever it went; `Exited`
    /// follows.
    Kill { id: RequestId },
    /// Send `signal` (1..=64) to the process group of request `id`.
    Signal { id: RequestId, signal: i32 },
    /// New window size for the terminal of request `id` (which asked for one).
    Resize { id: RequestId, size: WinSize },
}

/// A terminal window size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// A resource limit a command runs under (`setrlimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    /// Soft limit; [`RLIM_INFINITY`] for none.
    pub soft: u64,
    /// Hard limit; [`RLIM_INFINITY`] for none.
    pub hard: u64,
}

/// "No limit" in an [`Rlimit`].
pub const RLIM_INFINITY: u64 = u64::MAX;
/// Most resource limits in one exec request.
pub const MAX_RLIMITS: usize = 16;

/// The resources an exec may limit (docker's `--ulimit` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RlimitResource {
    Core,
    Cpu,
    Data,
    Fsize,
    Memlock,
    Nofile,
    Nproc,
    Stack,
    As,
}

impl RlimitResource {
    pub const ALL: [(&'static str, RlimitResource); 9] = [
        ("core", RlimitResource::Core),
        ("cpu", RlimitResource::Cpu),
        ("data", RlimitResource::Data),
        ("fsize", RlimitResource::Fsize),
        ("memlock", RlimitResource::Memlock),
        ("nofile", RlimitResource::Nofile),
        ("nproc", RlimitResource::Nproc),
        ("stack", RlimitResource::Stack),
        ("as", RlimitResource::As),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, r)| *r == self).map(|(n, _)| *n).expect("every resource is listed")
    }
}

impl Rlimit {
    /// Parses docker's `NAME=SOFT[:HARD]` (a value may be `unlimited`; HARD defaults to SOFT).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            let names: Vec<_> = RlimitResource::ALL.iter().map(|(n, _)| *n).collect();
            format!("ulimit {s:?}: want NAME=SOFT[:HARD] with NAME one of {}", names.join(", "))
        };
        let (name, limits) = s.split_once('=').ok_or_else(bad)?;
        let resource = RlimitResource::ALL.iter().find(|(n, _)| *n == name).map(|(_, r)| *r).ok_or_else(bad)?;
        let num = |v: &str| match v {
            "unlimited" | "-1" => Ok(RLIM_INFINITY),
            _ => v.parse::<u64>().map_err(|_| bad()),
        };
        let (soft, hard) = match limits.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(limits)?, num(limits)?),
        };
        if soft > hard {
            return Err(format!("ulimit {s:?}: the soft limit is above the hard limit"));
        }
        Ok(Rlimit { resource, soft, hard })
    }
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
    /// Give the process a stdin pipe fed by [`HostMsg::Stdin`]; otherwise /dev/null.
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (stdin, stdout and stderr are the terminal,
    /// which becomes the controlling terminal of a new session; output comes as stdout).
    pub tty: Option<WinSize>,
    /// Resource limits, applied before the program starts.
    pub rlimits: Vec<Rlimit>,
    /// The restricted profile: never as root (`nobody` unless `user` names another user),
    /// every capability dropped from the bounding set, `no_new_privs` (a setuid program
    /// gains nothing).
    pub restricted: bool,
}

/// A user or group: a number, or a name looked up in the guest's `/etc/passwd` / `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ident {
    Id(u32),
    Name(String),
}

/// A parsed `USER[:GROUP]`: `root`, `UID`, `UID:GID`, `NAME` or `NAME:GROUP`. Without a
/// group, a numeric user runs with gid = uid and a named user with its primary group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: Ident,
    pub group: Option<Ident>,
}

fn ident(v: &str, whole: &str) -> Result<Ident, String> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(Ident::Id(n));
    }
    let mut chars = v.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if first_ok && rest_ok && v.len() <= 32 {
        Ok(Ident::Name(v.to_string()))
    } else {
        Err(format!("user {whole:?}: want UID[:GID] (numbers) or NAME[:GROUP] (lowercase names up to 32 characters)"))
    }
}

impl UserSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((u, g)) => Ok(UserSpec { user: ident(u, s)?, group: Some(ident(g, s)?) }),
            None => Ok(UserSpec { user: ident(s, s)?, group: None }),
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
    /// A chunk of output of request `id`: 1..=[`MAX_OUTPUT_CHUNK`] bytes, sent only against
    /// output credit.
    Output { id: RequestId, stream: Stream, data: Vec<u8> },
    /// agentd moved `credit` ([`cost`] units) of request `id`'s stdin into its pipe (or
    /// dropped it because the command no longer reads): the host may send that much more.
    StdinAck { id: RequestId, credit: u64 },
    /// The process of request `id` ended; no more output follows.
    Exited { id: RequestId, status: ExitStatus },
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
        if self.rlimits.len() > MAX_RLIMITS {
            return Err(format!("more than {MAX_RLIMITS} resource limits"));
        }
        if self.rlimits.iter().any(|r| r.soft > r.hard) {
            return Err("a resource limit's soft value is above its hard value".into());
        }
        if self.tty.is_some_and(|t| t.rows == 0 || t.cols == 0) {
            return Err("a terminal needs at least one row and one column".into());
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
            stdin: false,
            tty: None,
            rlimits: vec![],
            restricted: false,
        }
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(1, 1), None, "version 1 (no terminals) is no longer spoken");
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
        r.user = Some("Nobody!".into());
        assert!(r.validate().unwrap_err().contains("UID[:GID]"));
        let mut r = req();
        r.tty = Some(WinSize { rows: 0, cols: 80 });
        assert!(r.validate().unwrap_err().contains("row"));
        let mut r = req();
        r.rlimits = vec![Rlimit { resource: RlimitResource::Nofile, soft: 10, hard: 5 }];
        assert!(r.validate().is_err());
    }

    #[test]
    fn rlimit_parsing() {
        assert_eq!(
            Rlimit::parse("nofile=64:128"),
            Ok(Rlimit { resource: RlimitResource::Nofile, soft: 64, hard: 128 })
        );
        assert_eq!(
            Rlimit::parse("core=unlimited"),
            Ok(Rlimit { resource: RlimitResource::Core, soft: RLIM_INFINITY, hard: RLIM_INFINITY })
        );
        assert!(Rlimit::parse("nofile=128:64").unwrap_err().contains("soft"));
        assert!(Rlimit::parse("files=1").unwrap_err().contains("nofile"));
        assert!(Rlimit::parse("nofile").is_err());
        assert!(Rlimit::parse("nofile=x").is_err());
    }

    #[test]
    fn user_specs() {
        let name = |n: &str| Ident::Name(n.into());
        assert_eq!(UserSpec::parse("root"), Ok(UserSpec { user: name("root"), group: None }));
        assert_eq!(UserSpec::parse("1000"), Ok(UserSpec { user: Ident::Id(1000), group: None }));
        assert_eq!(UserSpec::parse("1000:50"), Ok(UserSpec { user: Ident::Id(1000), group: Some(Ident::Id(50)) }));
        assert_eq!(UserSpec::parse("msb:users"), Ok(UserSpec { user: name("msb"), group: Some(name("users")) }));
        assert!(UserSpec::parse("1000:").is_err());
        assert!(UserSpec::parse("-1").is_err());
        assert!(UserSpec::parse("a/b").is_err());
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
