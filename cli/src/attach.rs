//! Attaching the terminal to an exec session: output to stdout/stderr, stdin (piped, or raw
//! keystrokes on a PTY session), window resizes (SIGWINCH), and the detach keys.
//!
//! On a PTY session the host terminal is put in raw mode for the session and restored on
//! every way out. The detach sequence (Ctrl-P Ctrl-Q) is never forwarded; a lone Ctrl-P is.

use std::io::{IsTerminal, Read, Write};

use msb_control_plane::schema::{ExitStatus, SpawnErrorKind, WinSize};
use msb_control_plane::{Error, ExecError, ExecEvent, ExecInput, RemoteExec};
use tokio::sync::mpsc;

/// Ctrl-P, Ctrl-Q: docker's detach keys.
pub const DETACH: [u8; 2] = [0x10, 0x11];

/// How a session ended for the client.
pub enum Outcome {
    Exited(ExitStatus),
    Failed(Error),
    Detached,
    /// Our stdout was closed (the reader of a pipeline left): the command was sent SIGPIPE,
    /// as a local writer would get.
    BrokenPipe,
}

impl Outcome {
    /// The process exit code for `msb exec`/`msb run` (docker's conventions).
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Exited(ExitStatus::Code(c)) => (*c).clamp(0, 255) as u8,
            Outcome::Exited(ExitStatus::Signal(s)) => (128 + *s).clamp(0, 255) as u8,
            Outcome::Detached => 0,
            Outcome::BrokenPipe => 128 + 13,
            Outcome::Failed(e) => error_code(e),
        }
    }
}

pub fn error_code(e: &Error) -> u8 {
    match e {
        Error::Exec(ExecError::TimedOut { .. }) => 124,
        Error::Exec(ExecError::SpawnFailed { kind: SpawnErrorKind::NotFound, .. }) => 127,
        Error::Exec(ExecError::SpawnFailed {
            kind: SpawnErrorKind::PermissionDenied | SpawnErrorKind::NotExecutable,
            ..
        }) => 126,
        _ => 125,
    }
}

/// Puts a terminal in raw mode until dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else { return RawMode(None) };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, saved);
        }
    }
}

/// The host terminal's size, if stdout or stdin is a terminal.
pub fn terminal_size() -> Option<WinSize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(WinSize { rows: ws.ws_row, cols: ws.ws_col })
}

/// Scans keystrokes for the detach sequence; returns the bytes to forward and whether the
/// user detached. A Ctrl-P at the end of a chunk is held until the next byte decides.
#[derive(Default)]
pub struct DetachScanner {
    held: bool,
}

impl DetachScanner {
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.held {
                self.held = false;
                if b == DETACH[1] {
                    return (out, true);
                }
                out.push(DETACH[0]);
            }
            if b == DETACH[0] {
                self.held = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Reads this process's stdin on a thread (std's stdin is blocking) into a channel; an empty
/// chunk is end of file.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Vec::new());
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Runs the client side of a session until it ends or the user detaches. Output is read
/// on this task and input is fed on another, so that a command that echoes its input (`cat`
/// of 10 MiB) can never stall both directions at once.
pub async fn attach(ex: RemoteExec, forward_stdin: bool, tty: bool) -> Outcome {
    let _raw = tty.then(RawMode::enter);
    let (mut events, input) = ex.split();
    let (detach_tx, mut detach_rx) = mpsc::channel::<()>(1);
    let mut signals = input.clone();
    let feeder = tokio::spawn(feed_input(input, forward_stdin, tty, detach_tx));
    let mut feeding = true;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let broken = |r: std::io::Result<()>| r.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
    let outcome = loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ExecEvent::Stdout(d)) => {
                    if broken(out.write_all(&d).and_then(|_| out.flush())) {
                        let _ = signals.signal(13).await;
                        break Outcome::BrokenPipe;
                    }
                }
                Some(ExecEvent::Stderr(d)) => { let _ = err.write_all(&d); let _ = err.flush(); }
                Some(ExecEvent::Exited(s)) => break Outcome::Exited(s),
                Some(ExecEvent::Failed(e)) => break Outcome::Failed(e.into()),
                None => {
                    let why = ExecError::Disconnected("the sandbox process ended the session".into());
                    break Outcome::Failed(why.into());
                }
            },
            d = detach_rx.recv(), if feeding => match d {
                Some(()) => break Outcome::Detached,
                None => feeding = false,
            },
        }
    };
    feeder.abort();
    outcome
}

/// Feeds stdin (scanning for the detach keys on a terminal) and window resizes.
async fn feed_input(mut input: ExecInput, forward_stdin: bool, tty: bool, detach: mpsc::Sender<()>) {
    let mut stdin = if forward_stdin { Some(stdin_chunks()) } else { None };
    let mut winch =
        if tty { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok() } else { None };
    let mut scanner = DetachScanner::default();
    loop {
        tokio::select! {
            chunk = async { stdin.as_mut().expect("guarded").recv().await }, if stdin.is_some() => match chunk {
                Some(d) if !d.is_empty() => {
                    let (fwd, detached) = if tty { scanner.feed(&d) } else { (d, false) };
                    if !fwd.is_empty() && input.write_stdin(&fwd).await.is_err() {
                        stdin = None;
                    }
                    if detached {
                        let _ = detach.send(()).await;
                        return;
                    }
                }
                _ => {
                    // End of our stdin: the command's stdin ends too (a terminal session
                    // keeps running until it exits).
                    if !tty {
                        let _ = input.close_stdin().await;
                    }
                    stdin = None;
                }
            },
            _ = async { winch.as_mut().expect("guarded").recv().await }, if winch.is_some() => {
                if let Some(size) = terminal_size() {
                    let _ = input.resize(size.rows, size.cols).await;
                }
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_caught_across_chunks_and_never_forwarded() {
        let mut s = DetachScanner::default();
        assert_eq!(s.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(s.feed(b"a\x10"), (b"a".to_vec(), false), "Ctrl-P held");
        assert_eq!(s.feed(b"\x11rest"), (Vec::new(), true));
        let mut s = DetachScanner::default();
        assert_eq!(s.feed(b"\x10x"), (b"\x10x".to_vec(), false), "a lone Ctrl-P is forwarded");
        assert_eq!(s.feed(b"\x10\x10\x11"), (b"\x10".to_vec(), true));
    }

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(Outcome::Exited(ExitStatus::Code(3)).code(), 3);
        assert_eq!(Outcome::Exited(ExitStatus::Signal(9)).code(), 137);
        let timed_out = ExecError::TimedOut { after: std::time::Duration::from_secs(1) };
        assert_eq!(Outcome::Failed(timed_out.into()).code(), 124);
        let nf = ExecError::SpawnFailed { kind: SpawnErrorKind::NotFound, message: String::new() };
        assert_eq!(Outcome::Failed(nf.into()).code(), 127);
        let denied = ExecError::SpawnFailed { kind: SpawnErrorKind::PermissionDenied, message: String::new() };
        assert_eq!(Outcome::Failed(denied.into()).code(), 126);
        assert_eq!(Outcome::Failed(ExecError::Gone.into()).code(), 125);
        assert_eq!(Outcome::Detached.code(), 0);
    }
}
