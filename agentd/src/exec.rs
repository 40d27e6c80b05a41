//! One command session: validate, spawn, feed stdin, stream stdout and stderr in bounded
//! chunks, enforce the timeout, report the exit status.
//!
//! Bounds: at most [`STDIN_QUEUE`] stdin chunks wait per session (the host's send window
//! bounds it further); a timeout kills the whole process group.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use msb_protocol::sync::lock;
use msb_protocol::{ExecRequest, GuestMsg, RequestId, SpawnErrorKind, Stream, UserSpec, WinSize, MAX_OUTPUT_CHUNK};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::reaper::Reaper;
use crate::{helper, users, Sender, MAX_SESSIONS};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Stdin chunks that may wait for one session's writer.
pub const STDIN_QUEUE: usize = 64;

/// Running sessions: their stdin feeds (when they asked for one), process ids, and terminal
/// masters (PTY sessions).
#[derive(Default)]
pub struct Sessions {
    stdins: Mutex<HashMap<RequestId, SyncSender<Vec<u8>>>>,
    pids: Mutex<HashMap<RequestId, u32>>,
    ttys: Mutex<HashMap<RequestId, File>>,
}

fn winsize(size: WinSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// Sets the window size of session `id`'s terminal (the kernel signals SIGWINCH to its
/// foreground process group). Sessions without a terminal, and zero sizes, are ignored.
pub fn resize(sessions: &Stdins, id: RequestId, size: WinSize) {
    if size.rows == 0 || size.cols == 0 {
        return;
    }
    if let Some(master) = lock(&sessions.ttys).get(&id) {
        let _ = rustix::termios::tcsetwinsize(master, winsize(size));
    }
}

/// Opens a pseudo-terminal of `size`: (master, slave). Both are close-on-exec; the slave is
/// handed to the child as its stdio.
fn open_pty(size: WinSize) -> std::io::Result<(File, File)> {
    use rustix::pty::OpenptFlags;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let path = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes());
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(path)?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    Ok((File::from(master), slave))
}

/// Checks that `program` resolves (in `path`, or relative to `cwd` when it has a slash) to an
/// executable file, for commands started through the exec helper (which cannot report the
/// exact exec error).
fn precheck(program: &str, path: &str, cwd: &str) -> Result<(), (SpawnErrorKind, String)> {
    let candidates: Vec<std::path::PathBuf> = if program.contains('/') {
        vec![Path::new(cwd).join(program)]
    } else {
        path.split(':').filter(|d| !d.is_empty()).map(|d| Path::new(d).join(program)).collect()
    };
    let mut denied = None;
    for c in candidates {
        if let Ok(m) = std::fs::metadata(&c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(());
            }
            denied.get_or_insert(c);
        }
    }
    match denied {
        Some(c) => Err((SpawnErrorKind::PermissionDenied, format!("{}: permission denied", c.display()))),
        None => Err((SpawnErrorKind::NotFound, format!("{program}: not found"))),
    }
}

pub type Stdins = Arc<Sessions>;

/// Sends `signal` to the process group of session `id`; unknown sessions and signal numbers
/// outside 1..=64 are ignored.
pub fn signal(sessions: &Stdins, id: RequestId, signal: i32) {
    let Ok(sig) = Signal::try_from(signal) else { return };
    if let Some(pid) = lock(&sessions.pids).get(&id).copied() {
        let _ = killpg(Pid::from_raw(pid as i32), sig);
    }
}

/// Hands a stdin chunk to session `id` (an empty chunk closes its stdin). Input for a session
/// that has ended, or never asked for stdin, is dropped.
pub fn feed_stdin(stdins: &Stdins, id: RequestId, data: Vec<u8>) {
    let tx = {
        let mut map = lock(&stdins.stdins);
        if data.is_empty() {
            map.remove(&id)
        } else {
            map.get(&id).cloned()
        }
    };
    if let Some(tx) = tx {
        let _ = tx.send(data);
    }
}

pub fn start(req: ExecRequest, sender: Sender, reaper: Reaper, stdins: Stdins) {
    let id = req.id;
    let fail = |kind, message: String| GuestMsg::SpawnFailed { id, kind, message };
    if let Err(e) = req.validate() {
        return sender.send(&fail(SpawnErrorKind::InvalidRequest, e));
    }
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return sender.send(&fail(SpawnErrorKind::Other, format!("more than {MAX_SESSIONS} commands running")));
    }
    // Registered now, before the host's first stdin chunk can be read.
    let stdin_rx = req.stdin.then(|| {
        let (tx, rx) = sync_channel(STDIN_QUEUE);
        lock(&stdins.stdins).insert(id, tx);
        rx
    });
    let spawned = std::thread::Builder::new().name(format!("exec-{id}")).spawn(move || {
        run(req, stdin_rx, &sender, &reaper, &stdins);
        lock(&stdins.stdins).remove(&id);
        lock(&stdins.pids).remove(&id);
        lock(&stdins.ttys).remove(&id);
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        crate::log(&format!("exec {id}: cannot start session thread: {e}"));
    }
}

fn classify(e: &std::io::Error) -> SpawnErrorKind {
    match e.raw_os_error() {
        Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR) => SpawnErrorKind::NotFound,
        Some(nix::libc::EACCES) | Some(nix::libc::EPERM) => SpawnErrorKind::PermissionDenied,
        Some(nix::libc::ENOEXEC) => SpawnErrorKind::NotExecutable,
        _ => SpawnErrorKind::Other,
    }
}

fn run(req: ExecRequest, stdin_rx: Option<Receiver<Vec<u8>>>, sender: &Sender, reaper: &Reaper, sessions: &Sessions) {
    let id = req.id;
    let spawn_failed = |kind, message| sender.send(&GuestMsg::SpawnFailed { id, kind, message });
    let user = match req.user.as_deref().map(|u| UserSpec::parse(u).and_then(|s| users::resolve(&s))) {
        Some(Err(e)) => return spawn_failed(SpawnErrorKind::InvalidRequest, e),
        Some(Ok(u)) => Some(u),
        None => None,
    };
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return spawn_failed(
            SpawnErrorKind::BadCwd,
            format!("working directory {cwd} does not exist or is not a directory"),
        );
    }
    // The helper does what std's Command cannot without `unsafe` (see helper.rs); users go
    // through it too, for their supplementary groups.
    let via_helper = req.tty.is_some() || !req.rlimits.is_empty() || user.is_some();
    let path_var = req.env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    if via_helper {
        if let Err((kind, message)) = precheck(&req.argv[0], path_var, &cwd) {
            return spawn_failed(kind, message);
        }
    }
    let pty = match req.tty.map(open_pty).transpose() {
        Ok(p) => p,
        Err(e) => return spawn_failed(SpawnErrorKind::Other, format!("opening a terminal: {e}")),
    };
    let mut cmd = if via_helper {
        let mut c = Command::new("/proc/self/exe");
        let identity = user.as_ref().map(|u| helper::Identity { uid: u.uid, gid: u.gid, groups: u.groups.clone() });
        c.args(helper::args(pty.is_some(), &req.rlimits, identity.as_ref(), &req.argv));
        c
    } else {
        let mut c = Command::new(&req.argv[0]);
        c.args(&req.argv[1..]);
        c
    };
    let home = user.as_ref().map_or("/root", |u| u.home.as_str());
    cmd.env_clear().env("PATH", DEFAULT_PATH).env("HOME", home);
    if pty.is_some() {
        cmd.env("TERM", "xterm");
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v))).current_dir(&cwd);
    match &pty {
        Some((_, slave)) => {
            // The helper starts a new session (so no process group of its own here).
            let stdio = || slave.try_clone().map(Stdio::from);
            match (stdio(), stdio(), stdio()) {
                (Ok(i), Ok(o), Ok(e)) => cmd.stdin(i).stdout(o).stderr(e),
                _ => return spawn_failed(SpawnErrorKind::Other, "duplicating the terminal".into()),
            };
        }
        None => {
            cmd.stdin(if stdin_rx.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
    }
    let spawned = reaper.spawn_registered(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok((child, pid))
    });
    // The parent's copies of the terminal's slave side must close, or the master never sees
    // the end of the session.
    drop(cmd);
    let master = pty.map(|(m, _slave)| m);
    let (mut child, exited) = match spawned {
        Ok(v) => v,
        Err(e) => return spawn_failed(classify(&e), format!("{}: {e}", req.argv[0])),
    };
    let pid = child.id();
    lock(&sessions.pids).insert(id, pid);
    sender.send(&GuestMsg::Started { id, pid });
    let input: Option<Box<dyn Write + Send>> = match &master {
        Some(m) => {
            if let Ok(c) = m.try_clone() {
                lock(&sessions.ttys).insert(id, c);
            }
            m.try_clone().ok().map(|f| Box::new(f) as Box<dyn Write + Send>)
        }
        None => child.stdin.take().map(|p| Box::new(p) as Box<dyn Write + Send>),
    };
    if let (Some(rx), Some(mut pipe)) = (stdin_rx, input) {
        std::thread::spawn(move || {
            for chunk in rx {
                // An empty chunk is EOF. After a write error (the process closed its stdin or
                // exited) the rest is drained and dropped.
                if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = sync_channel::<()>(1);
    if let Some(ms) = req.timeout_ms {
        let flag = timed_out.clone();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_millis(ms)) {
                flag.store(true, Ordering::SeqCst);
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
    }
    let pumps: Vec<_> = [
        master.map(|m| (Stream::Stdout, Box::new(m) as Box<dyn Read + Send>)),
        child.stdout.take().map(|r| (Stream::Stdout, Box::new(r) as Box<dyn Read + Send>)),
        child.stderr.take().map(|r| (Stream::Stderr, Box::new(r) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .map(|(stream, mut r)| {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sender.send(&GuestMsg::Output { id, stream, data: buf[..n].to_vec() }),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // A terminal master reads EIO once every slave is closed: the end.
                    Err(_) => break,
                }
            }
        })
    })
    .collect();
    for p in pumps {
        let _ = p.join();
    }
    // The reaper owns waiting; `child` is only dropped (which neither waits nor kills).
    drop(child);
    let status = exited.recv();
    drop(done_tx);
    if timed_out.load(Ordering::SeqCst) {
        sender.send(&GuestMsg::TimedOut { id });
    }
    match status {
        Ok(status) => sender.send(&GuestMsg::Exited { id, status }),
        Err(_) => crate::log(&format!("exec {id}: reaper lost the exit status")),
    }
}
