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

use msb_protocol::{ExecRequest, GuestMsg, RequestId, SpawnErrorKind, Stream, UserSpec, MAX_OUTPUT_CHUNK};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::reaper::Reaper;
use crate::{Sender, MAX_SESSIONS};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Stdin chunks that may wait for one session's writer.
pub const STDIN_QUEUE: usize = 64;

/// Running sessions: their stdin feeds (when they asked for one) and process ids.
#[derive(Default)]
pub struct Sessions {
    stdins: Mutex<HashMap<RequestId, SyncSender<Vec<u8>>>>,
    pids: Mutex<HashMap<RequestId, u32>>,
}

pub type Stdins = Arc<Sessions>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return sender.send(&GuestMsg::SpawnFailed {
            id,
            kind: SpawnErrorKind::BadCwd,
            message: format!("working directory {cwd} does not exist or is not a directory"),
        });
    }
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd)
        .stdin(if stdin_rx.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(user) = &req.user {
        let u = UserSpec::parse(user).expect("validated");
        cmd.uid(u.uid).gid(u.gid);
    }
    let spawned = reaper.spawn_registered(|| {
        let child = cmd.spawn()?;
        let pid = child.id();
        Ok((child, pid))
    });
    let (mut child, exited) = match spawned {
        Ok(v) => v,
        Err(e) => {
            return sender.send(&GuestMsg::SpawnFailed {
                id,
                kind: classify(&e),
                message: format!("{}: {e}", req.argv[0]),
            })
        }
    };
    let pid = child.id();
    lock(&sessions.pids).insert(id, pid);
    sender.send(&GuestMsg::Started { id, pid });
    if let (Some(rx), Some(mut pipe)) = (stdin_rx, child.stdin.take()) {
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
