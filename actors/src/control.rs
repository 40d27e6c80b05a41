//! The control protocol between a client (the `msb` CLI or the Rust API) and a sandbox
//! process, over the sandbox's Unix socket (`$MSB_HOME/sandboxes/NAME/ctl.sock`, mode 0600).
//!
//! Framing is the guest protocol's (4-byte length + postcard, at most
//! [`msb_protocol::MAX_FRAME`] per frame). One connection carries one request: an exec
//! session (then stdin, signals and resizes from the client; output events and the end from
//! the sandbox), a stop, or an info query. A client that closes an exec connection detaches:
//! the command keeps running and its output goes on to the sandbox's exec log.

use msb_protocol::{decode, encode, ExitStatus, FrameDecoder, Rlimit, SpawnErrorKind, WinSize};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, ExecSpec, Result};

/// Largest stdin chunk a client sends in one message.
pub const STDIN_CHUNK: usize = 64 * 1024;

/// From a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Starts an exec session (first message of the connection).
    Exec(ExecWire),
    /// Stdin for the session; empty closes it.
    Stdin(Vec<u8>),
    Signal(i32),
    Resize(WinSize),
    /// Stops the sandbox: gracefully within `graceful_ms`, then forced; `None` kills at once.
    Stop {
        graceful_ms: Option<u64>,
    },
    Info,
    /// An attached sandbox becomes detached: it no longer stops when its owner goes away.
    /// Answered with [`ServerMsg::Released`].
    Release,
}

/// An exec request as it crosses the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecWire {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Keep stdin open for [`ClientMsg::Stdin`]; otherwise it is closed at once.
    pub stdin: bool,
    pub tty: Option<WinSize>,
    pub rlimits: Vec<Rlimit>,
}

impl ExecWire {
    pub fn from_spec(spec: &ExecSpec, stdin: bool) -> Self {
        ExecWire {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            timeout_ms: spec.timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
            stdin,
            tty: spec.tty,
            rlimits: spec.rlimits.clone(),
        }
    }

    pub fn into_spec(self) -> ExecSpec {
        ExecSpec {
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            timeout: self.timeout_ms.map(std::time::Duration::from_millis),
            stdin: None,
            tty: self.tty,
            rlimits: self.rlimits,
        }
    }
}

/// From the sandbox process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The exec session started; its id names it in the exec log.
    Started {
        id: u64,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
    Failed(WireError),
    /// The sandbox stopped, for this reason.
    Stopped {
        reason: String,
    },
    Info(Info),
    Released,
}

/// A sandbox process's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub pid: u32,
    /// Create → guest init, from the boot timer.
    pub boot_ms: Option<u64>,
    pub exec_sessions: u64,
}

/// An error as it crosses the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    Spawn { kind: SpawnErrorKind, message: String },
    TimedOut { after_ms: u64 },
    StdinClosed,
    Other(String),
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::SpawnFailed { kind, message } => WireError::Spawn { kind: *kind, message: message.clone() },
            Error::TimedOut { after } => WireError::TimedOut { after_ms: after.as_millis() as u64 },
            Error::StdinClosed => WireError::StdinClosed,
            other => WireError::Other(other.to_string()),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Spawn { kind, message } => Error::SpawnFailed { kind, message },
            WireError::TimedOut { after_ms } => Error::TimedOut { after: std::time::Duration::from_millis(after_ms) },
            WireError::StdinClosed => Error::StdinClosed,
            WireError::Other(m) => Error::Remote(m),
        }
    }
}

/// Writes one message.
pub async fn send<W: AsyncWriteExt + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    let frame = encode(msg).map_err(|e| Error::Control(format!("encoding a message: {e}")))?;
    w.write_all(&frame).await.map_err(|e| Error::Control(format!("socket write: {e}")))
}

/// Reads messages from one side of a connection.
pub struct Reader<R> {
    inner: R,
    decoder: FrameDecoder,
    ready: std::collections::VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl<R: AsyncReadExt + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader { inner, decoder: FrameDecoder::new(), ready: Default::default(), buf: vec![0; 64 * 1024] }
    }

    /// The next message; `Ok(None)` at a clean end of stream. Cancel-safe: bytes read are
    /// kept in the decoder.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return decode(&f).map(Some).map_err(|e| Error::Control(e.to_string()));
            }
            let n = self.inner.read(&mut self.buf).await.map_err(|e| Error::Control(format!("socket read: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            let ready = &mut self.ready;
            self.decoder
                .feed(&self.buf[..n], &mut |f| ready.push_back(f))
                .map_err(|e| Error::Control(e.to_string()))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_cross_a_socket_pair_in_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_, mut w) = a.into_split();
        let (r, _) = b.into_split();
        let msgs = vec![
            ClientMsg::Exec(ExecWire::from_spec(&ExecSpec { argv: vec!["sh".into()], ..Default::default() }, true)),
            ClientMsg::Stdin(vec![7; STDIN_CHUNK]),
            ClientMsg::Resize(WinSize { rows: 40, cols: 120 }),
            ClientMsg::Stop { graceful_ms: Some(5000) },
        ];
        for m in &msgs {
            send(&mut w, m).await.unwrap();
        }
        drop(w);
        let mut r = Reader::new(r);
        for m in &msgs {
            assert_eq!(r.next::<ClientMsg>().await.unwrap().as_ref(), Some(m));
        }
        assert_eq!(r.next::<ClientMsg>().await.unwrap(), None);
    }

    #[test]
    fn errors_keep_their_kind_across_the_socket() {
        let e = Error::SpawnFailed { kind: SpawnErrorKind::NotFound, message: "nope: not found".into() };
        assert!(matches!(Error::from(WireError::from(&e)), Error::SpawnFailed { kind: SpawnErrorKind::NotFound, .. }));
        let e = Error::TimedOut { after: std::time::Duration::from_millis(1500) };
        assert!(matches!(Error::from(WireError::from(&e)), Error::TimedOut { after } if after.as_millis() == 1500));
    }
}
