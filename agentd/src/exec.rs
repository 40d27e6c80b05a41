//! One command session: validate, spawn, stream stdout and stderr in bounded chunks, report
//! the exit status.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use msb_protocol::{ExecRequest, GuestMsg, SpawnErrorKind, Stream, MAX_OUTPUT_CHUNK};

use crate::reaper::Reaper;
use crate::{Sender, MAX_SESSIONS};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static RUNNING: AtomicUsize = AtomicUsize::new(0);

pub fn start(req: ExecRequest, sender: Sender, reaper: Reaper) {
    let id = req.id;
    let fail = |kind, message: String| GuestMsg::SpawnFailed { id, kind, message };
    if let Err(e) = req.validate() {
        return sender.send(&fail(SpawnErrorKind::InvalidRequest, e));
    }
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return sender.send(&fail(SpawnErrorKind::Other, format!("more than {MAX_SESSIONS} commands running")));
    }
    let spawned = std::thread::Builder::new().name(format!("exec-{id}")).spawn(move || {
        run(req, &sender, &reaper);
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

fn run(req: ExecRequest, sender: &Sender, reaper: &Reaper) {
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
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
    sender.send(&GuestMsg::Started { id, pid: child.id() });
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
    match exited.recv() {
        Ok(status) => sender.send(&GuestMsg::Exited { id, status }),
        Err(_) => crate::log(&format!("exec {id}: reaper lost the exit status")),
    }
}
