//! One command session: validate, spawn into its own cgroup, feed stdin, stream stdout and
//! stderr in bounded chunks, report the exit status.
//!
//! Flow control (see the protocol's crate docs): output is read from the command's pipes only
//! against the session's output credit, so a host consumer that stops reading stalls this
//! session's pumps and nothing else. Stdin is queued without blocking the port reader; the
//! host may queue at most [`STDIN_WINDOW`] cost units per session (an overdraw is refused and
//! reported), and each chunk is acknowledged once it is in the pipe or dropped.
//!
//! Every exec runs in its own cgroup under [`CGROUP_ROOT`], so
//! [`HostMsg::Kill`](msb_protocol::HostMsg::Kill) reaches every process it started, including
//! those that left its process group or session. The command is born there: agentd moves
//! itself into the exec's cgroup for the fork and back right after, with the reaper's spawn
//! lock held, so no other spawn can interleave (no controllers are enabled, so the move only
//! sets membership; PID 1 is immune to a concurrent `cgroup.kill`). Without cgroup v2 (agentd
//! run outside a sandbox) kill falls back to the process group.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender as ChanSender};
use std::sync::{Arc, Condvar, Mutex};

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use msb_protocol::sync::lock;
use msb_protocol::{
    cost, ExecRequest, GuestMsg, RequestId, SpawnErrorKind, Stream, UserSpec, WinSize, MAX_OUTPUT_CHUNK, OUTPUT_WINDOW,
    STDIN_WINDOW,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::reaper::Reaper;
use crate::{helper, users, Sender, MAX_SESSIONS};

/// The user the restricted profile runs a command as when none is named.
const NOBODY: u32 = 65534;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where cgroup v2 is mounted; each exec gets `exec-ID` below it.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// A session's output credit, shared by its pumps. A pump reserves a whole chunk's cost
/// before it reads, and gives back what the chunk did not use, so the pumps together never
/// overdraw. Once the host has killed the session, output is read and dropped (the host
/// no longer wants it, and the pipes must drain for the session to end).
#[derive(Default)]
pub struct Credit {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Credit {
    fn new() -> Self {
        Credit { state: Mutex::new((OUTPUT_WINDOW, false)), cv: Condvar::new() }
    }

    /// Waits for `n` units; `false` means "discard" (the session was killed).
    fn reserve(&self, n: usize) -> bool {
        let mut g = lock(&self.state);
        loop {
            if g.1 {
                return false;
            }
            if g.0 >= n {
                g.0 -= n;
                return true;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Adds credit (returned by a pump, or acknowledged by the host); never above the window.
    fn grant(&self, n: usize) {
        let mut g = lock(&self.state);
        g.0 = g.0.saturating_add(n).min(OUTPUT_WINDOW);
        self.cv.notify_all();
    }

    fn discard(&self) {
        lock(&self.state).1 = true;
        self.cv.notify_all();
    }
}

/// One running session as the port reader sees it.
struct Session {
    /// Stdin chunks for the writer thread (absent without stdin, or after end of input).
    stdin: Option<ChanSender<Vec<u8>>>,
    /// Stdin cost units queued and not yet acknowledged.
    stdin_owed: Arc<AtomicUsize>,
    credit: Arc<Credit>,
    pid: Option<u32>,
    tty: Option<File>,
    cgroup: Option<PathBuf>,
}

/// Running sessions, by request id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<RequestId, Session>>,
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
    if let Some(master) = lock(&sessions.map).get(&id).and_then(|s| s.tty.as_ref()) {
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
    if let Some(pid) = lock(&sessions.map).get(&id).and_then(|s| s.pid) {
        let _ = killpg(Pid::from_raw(pid as i32), sig);
    }
}

/// Kills every process of session `id` (its cgroup; its process group without one) and
/// drops its further output, so that its pipes drain and `Exited` follows.
pub fn kill(sessions: &Stdins, id: RequestId) {
    let map = lock(&sessions.map);
    let Some(s) = map.get(&id) else { return };
    s.credit.discard();
    match &s.cgroup {
        Some(cg) => {
            if let Err(e) = std::fs::write(cg.join("cgroup.kill"), "1") {
                crate::log(&format!("exec {id}: killing its cgroup: {e}"));
            }
        }
        None => {
            if let Some(pid) = s.pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// Adds output credit the host acknowledged for session `id`.
pub fn output_ack(sessions: &Stdins, id: RequestId, credit: u64) {
    if let Some(s) = lock(&sessions.map).get(&id) {
        s.credit.grant(usize::try_from(credit).unwrap_or(usize::MAX));
    }
}

/// Queues a stdin chunk for session `id` (an empty chunk closes its stdin) without blocking.
/// A chunk past the session's stdin window is a host protocol violation: it is dropped and
/// reported. Input for a session whose stdin is closed is dropped and acknowledged (so the
/// host's account stays right while the session lasts); for an ended session, ignored.
pub fn feed_stdin(sessions: &Stdins, sender: &Sender, id: RequestId, data: Vec<u8>) {
    let units = cost(data.len());
    let mut map = lock(&sessions.map);
    let Some(s) = map.get_mut(&id) else { return };
    let owed = s.stdin_owed.load(Ordering::SeqCst);
    if owed.saturating_add(units) > STDIN_WINDOW {
        drop(map);
        return sender.send(&GuestMsg::Error {
            message: format!("stdin for exec {id} overdraws its window ({owed} + {units} > {STDIN_WINDOW})"),
        });
    }
    let eof = data.is_empty();
    let queued = match &s.stdin {
        Some(tx) => {
            s.stdin_owed.fetch_add(units, Ordering::SeqCst);
            let ok = tx.send(data).is_ok();
            if !ok {
                s.stdin_owed.fetch_sub(units, Ordering::SeqCst);
            }
            ok
        }
        None => false,
    };
    if eof {
        s.stdin = None;
    }
    drop(map);
    if !queued {
        sender.send(&GuestMsg::StdinAck { id, credit: units as u64 });
    }
}

/// Creates session `id`'s cgroup, or `None` where cgroup v2 is not mounted.
fn make_cgroup(id: RequestId) -> Option<PathBuf> {
    if !Path::new(CGROUP_ROOT).join("cgroup.kill").exists() && !Path::new(CGROUP_ROOT).join("cgroup.procs").exists() {
        return None;
    }
    let dir = Path::new(CGROUP_ROOT).join(format!("exec-{id}"));
    match std::fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Some(dir),
        Err(e) => {
            crate::log(&format!("exec {id}: no cgroup ({e}); a kill reaches only its process group"));
            None
        }
    }
}

pub fn start(req: ExecRequest, sender: Sender, reaper: Reaper, sessions: Stdins) {
    let id = req.id;
    let fail = |kind, message: String| GuestMsg::SpawnFailed { id, kind, message };
    if let Err(e) = req.validate() {
        return sender.send(&fail(SpawnErrorKind::InvalidRequest, e));
    }
    if lock(&sessions.map).contains_key(&id) {
        return sender.send(&GuestMsg::Error { message: format!("exec {id} is already running") });
    }
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return sender.send(&fail(SpawnErrorKind::Other, format!("more than {MAX_SESSIONS} commands running")));
    }
    // Registered now, before the host's first stdin chunk can be read.
    let (stdin_tx, stdin_rx) = match req.stdin {
        true => {
            let (tx, rx) = channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let session = Session {
        stdin: stdin_tx,
        stdin_owed: Arc::default(),
        credit: Arc::new(Credit::new()),
        pid: None,
        tty: None,
        cgroup: make_cgroup(id),
    };
    let (owed, credit, cgroup) = (session.stdin_owed.clone(), session.credit.clone(), session.cgroup.clone());
    lock(&sessions.map).insert(id, session);
    let spawned = std::thread::Builder::new().name(format!("exec-{id}")).spawn(move || {
        let ctx = Ctx { sender: &sender, sessions: &sessions, credit, cgroup: cgroup.clone() };
        run(req, stdin_rx.map(|rx| (rx, owed)), &ctx, &reaper);
        lock(&sessions.map).remove(&id);
        if let Some(cg) = cgroup {
            // Fails while something the command left behind still runs there; it stays.
            let _ = std::fs::remove_dir(cg);
        }
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

/// agentd inside an exec's cgroup, for one spawn: it moves back to the root when dropped.
struct Inside;

impl Inside {
    fn enter(cgroup: &Path) -> std::io::Result<Inside> {
        let me = std::process::id().to_string();
        std::fs::write(cgroup.join("cgroup.procs"), &me).map_err(|e| {
            std::io::Error::new(e.kind(), format!("joining the exec's cgroup {}: {e}", cgroup.display()))
        })?;
        Ok(Inside)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        if let Err(e) = std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.procs"), me) {
            crate::log(&format!("leaving an exec's cgroup: {e}"));
        }
    }
}

/// What a session thread works with.
struct Ctx<'a> {
    sender: &'a Sender,
    sessions: &'a Sessions,
    credit: Arc<Credit>,
    cgroup: Option<PathBuf>,
}

type StdinFeed = (Receiver<Vec<u8>>, Arc<AtomicUsize>);

/// Writes queued stdin chunks to the command, acknowledging each once written (or dropped,
/// after the command stopped reading); ends at end of input or when the feed closes, which
/// closes the pipe (the end of file the command reads).
fn stdin_writer(
    id: RequestId,
    rx: Receiver<Vec<u8>>,
    owed: Arc<AtomicUsize>,
    pipe: Box<dyn Write + Send>,
    sender: Sender,
) {
    let mut pipe = Some(pipe);
    for chunk in rx {
        let units = cost(chunk.len());
        let eof = chunk.is_empty();
        if eof || pipe.as_mut().is_some_and(|p| p.write_all(&chunk).is_err()) {
            pipe = None;
        }
        let _ = owed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| Some(o.saturating_sub(units)));
        sender.send(&GuestMsg::StdinAck { id, credit: units as u64 });
        if eof {
            break;
        }
    }
}

/// Reads one output stream against the session's credit until end of file.
fn pump(id: RequestId, stream: Stream, mut r: Box<dyn Read + Send>, credit: Arc<Credit>, sender: Sender) {
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    let full = cost(MAX_OUTPUT_CHUNK);
    loop {
        let sending = credit.reserve(full);
        let n = loop {
            match r.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(n) => break n,
                // A terminal master reads EIO once every slave is closed: the end.
                Err(_) => break 0,
            }
        };
        if sending {
            credit.grant(if n == 0 { full } else { full - cost(n) });
        }
        if n == 0 {
            return;
        }
        if sending {
            sender.send(&GuestMsg::Output { id, stream, data: buf[..n].to_vec() });
        }
    }
}

fn run(req: ExecRequest, stdin: Option<StdinFeed>, ctx: &Ctx, reaper: &Reaper) {
    let id = req.id;
    let sender = ctx.sender;
    let spawn_failed = |kind, message| sender.send(&GuestMsg::SpawnFailed { id, kind, message });
    let user = match req.user.as_deref().map(|u| UserSpec::parse(u).and_then(|s| users::resolve(&s))) {
        Some(Err(e)) => return spawn_failed(SpawnErrorKind::InvalidRequest, e),
        Some(Ok(u)) => Some(u),
        None => None,
    };
    // The restricted profile never runs a command as root: nobody, unless a user is named.
    let user = match (req.restricted, user) {
        (true, Some(u)) if u.uid == 0 => {
            return spawn_failed(
                SpawnErrorKind::InvalidRequest,
                "the restricted profile runs no command as root; name another user (-u) or leave it out (nobody)"
                    .into(),
            )
        }
        (true, None) => Some(users::Resolved { uid: NOBODY, gid: NOBODY, groups: Vec::new(), home: "/".into() }),
        (_, u) => u,
    };
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return spawn_failed(
            SpawnErrorKind::BadCwd,
            format!("working directory {cwd} does not exist or is not a directory"),
        );
    }
    // The helper does what std's Command cannot without `unsafe` (see helper.rs): limits,
    // terminals, users.
    let via_helper = req.tty.is_some() || !req.rlimits.is_empty() || user.is_some() || req.restricted;
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
        // With a user switch the helper enters the working directory as that user.
        let setup = helper::Setup {
            ctty: pty.is_some(),
            rlimits: &req.rlimits,
            user: identity.as_ref(),
            restricted: req.restricted,
            cwd: user.is_some().then_some(cwd.as_str()),
        };
        c.args(helper::args(&setup, &req.argv));
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
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if user.is_none() {
        cmd.current_dir(&cwd);
    }
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
            cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
    }
    let spawned = reaper.spawn_registered(|| {
        let _inside = ctx.cgroup.as_deref().map(Inside::enter).transpose()?;
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
    if let Some(s) = lock(&ctx.sessions.map).get_mut(&id) {
        s.pid = Some(pid);
        s.tty = master.as_ref().and_then(|m| m.try_clone().ok());
    }
    sender.send(&GuestMsg::Started { id, pid });
    if let Some((rx, owed)) = stdin {
        // Without a pipe (none could be cloned) input is still acknowledged, then dropped.
        let pipe: Box<dyn Write + Send> = match &master {
            Some(m) => m.try_clone().map_or_else(|_| Box::new(std::io::sink()) as _, |f| Box::new(f) as _),
            None => child.stdin.take().map_or_else(|| Box::new(std::io::sink()) as _, |p| Box::new(p) as _),
        };
        let sender = sender.clone();
        std::thread::spawn(move || stdin_writer(id, rx, owed, pipe, sender));
    }
    let pumps: Vec<_> = [
        master.map(|m| (Stream::Stdout, Box::new(m) as Box<dyn Read + Send>)),
        child.stdout.take().map(|r| (Stream::Stdout, Box::new(r) as Box<dyn Read + Send>)),
        child.stderr.take().map(|r| (Stream::Stderr, Box::new(r) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .map(|(stream, r)| {
        let (sender, credit) = (sender.clone(), ctx.credit.clone());
        std::thread::spawn(move || pump(id, stream, r, credit, sender))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pumps_share_credit_without_overdrawing() {
        let c = Arc::new(Credit::new());
        let full = cost(MAX_OUTPUT_CHUNK);
        let fit = OUTPUT_WINDOW / full;
        for _ in 0..fit {
            assert!(c.reserve(full));
        }
        // The next reservation waits until the host acknowledges.
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.reserve(full));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished(), "a pump waits for credit");
        c.grant(full);
        assert!(t.join().unwrap());
        // Credit never exceeds the window, whatever the host claims.
        c.grant(usize::MAX);
        assert_eq!(lock(&c.state).0, OUTPUT_WINDOW);
    }

    #[test]
    fn a_killed_session_stops_waiting_for_credit() {
        let c = Arc::new(Credit::new());
        while c.reserve(cost(MAX_OUTPUT_CHUNK)) && lock(&c.state).0 >= cost(MAX_OUTPUT_CHUNK) {}
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.reserve(OUTPUT_WINDOW));
        c.discard();
        assert!(!t.join().unwrap(), "discard releases a waiting pump, which then drops output");
    }
}
