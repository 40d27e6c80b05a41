//! The sandbox process: one host process per running named sandbox. It owns the VM (the
//! actor tree of [`Sandbox`]), listens on the sandbox's Unix socket, records its own life in
//! the state store and logs exec output with timestamps.
//!
//! Its launch description arrives as one JSON line on stdin (never in argv or the
//! environment). For an attached sandbox stdin stays open: end of file means the client that
//! owns the sandbox is gone, and the sandbox stops. A detached sandbox ignores it.
//!
//! Invariants: the socket is created in a 0700 directory and set to 0600 before the sandbox
//! is announced; at most [`MAX_CONNECTIONS`] connections are served at once (more are told
//! why and closed); every way out (stop request, the guest stopping itself, SIGTERM, the owner
//! leaving) goes through one exit path that stops the VM, closes the run in the store with
//! its reason and removes the socket.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::control::{self, ClientMsg, Info, Reader, ServerMsg, WireError};
use crate::managed::SandboxConfig;
use crate::state::{ProcessId, Status, Store};
use crate::{Error, ExecEvent, Result, Sandbox, StopReason};

/// What a client tells a new sandbox process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub name: String,
    pub home: PathBuf,
    pub config: SandboxConfig,
    /// Outlives its client; otherwise stops when the client's end of stdin closes.
    pub detached: bool,
    /// Removed from the store (with its directory) when it stops.
    pub ephemeral: bool,
}

/// The one line a sandbox process prints on stdout when it is up, or why it is not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    pub ok: bool,
    pub error: Option<String>,
}

/// Directory of a sandbox's files.
pub fn sandbox_dir(home: &Path, name: &str) -> PathBuf {
    home.join("sandboxes").join(name)
}

/// The control socket of a sandbox.
pub fn socket_path(home: &Path, name: &str) -> PathBuf {
    sandbox_dir(home, name).join("ctl.sock")
}

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Most control connections served at once (each is an exec session, stop or info); more
/// wait in the listen backlog until one ends.
pub const MAX_CONNECTIONS: usize = 256;

/// Most bytes the exec log of one sandbox grows to (the guest decides what its commands
/// print); past it, one marker line and nothing more until the sandbox is removed.
pub const EXEC_LOG_CAP: u64 = 64 * 1024 * 1024;

/// Timestamped exec output, one line per output line, capped (see [`EXEC_LOG_CAP`]).
struct ExecLog {
    inner: Mutex<(std::fs::File, u64)>,
    cap: u64,
}

impl ExecLog {
    fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let len = f.metadata()?.len();
        Ok(ExecLog { inner: Mutex::new((f, len)), cap })
    }

    fn write(&self, id: u64, what: &str, data: &[u8]) {
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let text = String::from_utf8_lossy(data);
        let mut out = String::new();
        for line in text.split_inclusive('\n') {
            out.push_str(&format!("{stamp} [exec {id} {what}] {}\n", line.trim_end_matches(['\n', '\r'])));
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (f, written) = &mut *g;
        if *written >= self.cap {
            return;
        }
        let capped = *written + out.len() as u64 > self.cap;
        if capped {
            out = format!("{stamp} [msb] the exec log reached its {}-byte cap; later output is not logged\n", self.cap);
        }
        if f.write_all(out.as_bytes()).is_ok() {
            *written = if capped { self.cap } else { *written + out.len() as u64 };
        }
    }
}

struct Ctx {
    name: String,
    sb: Sandbox,
    log: ExecLog,
    sessions: AtomicU64,
    /// An attached sandbox was released by its owner (it runs on when the owner leaves).
    released: Arc<AtomicBool>,
    stop: mpsc::Sender<(Option<Duration>, oneshot::Sender<String>)>,
}

/// Runs the sandbox process for `launch` until the sandbox stops. `announce` gets the
/// readiness line.
pub async fn run(launch: Launch, mut announce: impl Write) -> Result<()> {
    let store = Store::open(&launch.home)?;
    let dir = sandbox_dir(&launch.home, &launch.name);
    let setup = |what: &str, e: std::io::Error| Error::Setup(format!("{what} {}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(|e| setup("creating", e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| setup("securing", e))?;
    let sock = socket_path(&launch.home, &launch.name);
    let booted = boot(&launch, &dir).await;
    let sb = match booted {
        Ok(sb) => sb,
        Err(e) => {
            let _ = store.mark_stopped(&launch.name, Status::Stopped, &format!("failed to start: {e}"));
            finish_ephemeral(&store, &launch, &dir);
            let _ = writeln!(announce, "{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| Error::Setup(format!("binding {}: {e}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup("securing socket in", e))?;
    let me = ProcessId::current().ok_or_else(|| Error::Setup("cannot read /proc/self/stat".into()))?;
    store.mark_running(&launch.name, me)?;
    let log = ExecLog::open(&dir.join("exec.log"), EXEC_LOG_CAP).map_err(|e| setup("opening exec.log in", e))?;
    let _ = writeln!(announce, "{}", serde_json::json!({"ok": true}));
    let _ = announce.flush();
    drop(announce);
    tracing::info!(name = %launch.name, "sandbox up");

    let (stop_tx, mut stop_rx) = mpsc::channel(16);
    let ctx = Arc::new(Ctx {
        name: launch.name.clone(),
        sb,
        log,
        sessions: 0.into(),
        released: Arc::default(),
        stop: stop_tx,
    });
    let mut owner_gone = owner_watch(launch.detached, ctx.released.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Setup(format!("SIGTERM handler: {e}")))?;
    let mut stop_waiters: Vec<oneshot::Sender<String>> = Vec::new();
    let waiter = ctx.clone();
    let mut vm_done = Box::pin(async move { waiter.sb.wait().await });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let reason: StopReason = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            serve_conn(stream, ctx).await;
                            drop(slot);
                        });
                    }
                    Err(_) => refuse(&stream),
                },
                Err(e) => tracing::warn!("accept on {}: {e}", sock.display()),
            },
            r = &mut vm_done => break r.unwrap_or(StopReason::Killed),
            Some((graceful, reply)) = stop_rx.recv() => {
                stop_waiters.push(reply);
                break stop_vm(&ctx.sb, graceful).await;
            }
            _ = term.recv() => break ctx.sb.stop().await.unwrap_or(StopReason::Killed),
            _ = &mut owner_gone => {
                tracing::info!("the client that owns this attached sandbox is gone; stopping");
                break ctx.sb.stop().await.unwrap_or(StopReason::Killed);
            }
        }
    };
    let _ = std::fs::remove_file(&sock);
    let why = reason.to_string();
    if let Err(e) = store.mark_stopped(&launch.name, Status::Stopped, &why) {
        tracing::error!("recording the stop of {}: {e}", launch.name);
    }
    finish_ephemeral(&store, &launch, &dir);
    for w in stop_waiters {
        let _ = w.send(why.clone());
    }
    tracing::info!(name = %launch.name, %why, "sandbox stopped");
    Ok(())
}

/// Tells a client over the connection limit why, without waiting on it, and closes.
fn refuse(stream: &tokio::net::UnixStream) {
    let why = format!("the sandbox serves at most {MAX_CONNECTIONS} connections at once; retry when some end");
    if let Ok(frame) = msb_protocol::encode(&ServerMsg::Failed(WireError::Other(why))) {
        let _ = stream.try_write(&frame);
    }
}

async fn stop_vm(sb: &Sandbox, graceful: Option<Duration>) -> StopReason {
    match graceful {
        Some(t) => sb.stop_timeout(t).await.unwrap_or(StopReason::Killed),
        None => sb.kill().await.unwrap_or(StopReason::Killed),
    }
}

fn finish_ephemeral(store: &Store, launch: &Launch, dir: &Path) {
    if launch.ephemeral {
        let _ = store.remove(&launch.name);
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn boot(launch: &Launch, dir: &Path) -> Result<Sandbox> {
    let c = &launch.config;
    let mut b = Sandbox::builder()
        .cpus(c.cpus)
        .memory_mib(c.memory_mib)
        .boot_timeout(Duration::from_secs(c.boot_timeout_secs))
        .console_log(dir.join("console.log"));
    if let Some(k) = &c.kernel {
        b = b.kernel(k);
    }
    if let Some(a) = &c.kernel_args {
        b = b.kernel_args(a.clone());
    }
    b.create().await
}

/// Resolves when the owner of an attached sandbox goes away (its end of our stdin closes);
/// never for a detached one, nor for one released (see [`ClientMsg::Release`]) before that.
fn owner_watch(
    detached: bool,
    released: Arc<AtomicBool>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    if detached {
        return Box::pin(std::future::pending());
    }
    Box::pin(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
        if released.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    })
}

async fn serve_conn(stream: tokio::net::UnixStream, ctx: Arc<Ctx>) {
    let (rd, mut wr) = stream.into_split();
    let mut reader = Reader::new(rd);
    let first = match reader.next::<ClientMsg>().await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("control connection: {e}");
            return;
        }
    };
    match first {
        ClientMsg::Exec(wire) => exec_session(wire, reader, wr, &ctx).await,
        ClientMsg::Stop { graceful_ms } => {
            let (tx, rx) = oneshot::channel();
            if ctx.stop.send((graceful_ms.map(Duration::from_millis), tx)).await.is_ok() {
                if let Ok(reason) = rx.await {
                    let _ = control::send(&mut wr, &ServerMsg::Stopped { reason }).await;
                }
            }
        }
        ClientMsg::Release => {
            ctx.released.store(true, Ordering::SeqCst);
            tracing::info!("released by its owner: the sandbox now outlives it");
            let _ = control::send(&mut wr, &ServerMsg::Released).await;
        }
        ClientMsg::Info => {
            let boot_ms = ctx.sb.boot_times().await.ok().and_then(|b| b.to_init).map(|d| d.as_millis() as u64);
            let info = Info {
                name: ctx.name.clone(),
                pid: std::process::id(),
                boot_ms,
                exec_sessions: ctx.sessions.load(Ordering::Relaxed),
            };
            let _ = control::send(&mut wr, &ServerMsg::Info(info)).await;
        }
        other => {
            let msg = format!("a connection must start with Exec, Stop or Info, not {other:?}");
            let _ = control::send(&mut wr, &ServerMsg::Failed(WireError::Other(msg))).await;
        }
    }
}

/// Runs one exec session for a client. If the client goes away (detaches), the command keeps
/// running and its output still reaches the exec log.
async fn exec_session(
    wire: control::ExecWire,
    mut reader: Reader<tokio::net::unix::OwnedReadHalf>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
) {
    let keep_stdin = wire.stdin;
    let tty = wire.tty.is_some();
    let argv = wire.argv.join(" ");
    let mut h = match ctx.sb.exec_stream(wire.into_spec()).await {
        Ok(h) => h,
        Err(e) => {
            let _ = control::send(&mut wr, &ServerMsg::Failed(WireError::from(&e))).await;
            return;
        }
    };
    ctx.sessions.fetch_add(1, Ordering::Relaxed);
    let id = h.id();
    ctx.log.write(id, "start", argv.as_bytes());
    if !keep_stdin {
        let _ = h.close_stdin().await;
    }
    let mut attached = control::send(&mut wr, &ServerMsg::Started { id }).await.is_ok();
    // The client's input may end before the command does; only a failed send (the client is
    // gone) detaches the session.
    let mut reading = attached;
    loop {
        tokio::select! {
            ev = h.next() => {
                let Some(ev) = ev else { break };
                let (msg, last) = match ev {
                    ExecEvent::Stdout(d) => {
                        ctx.log.write(id, "stdout", &d);
                        (ServerMsg::Stdout(d), false)
                    }
                    ExecEvent::Stderr(d) => {
                        ctx.log.write(id, "stderr", &d);
                        (ServerMsg::Stderr(d), false)
                    }
                    ExecEvent::Exited(s) => {
                        ctx.log.write(id, "exit", format!("{s:?}").as_bytes());
                        (ServerMsg::Exited(s), true)
                    }
                    ExecEvent::Failed(e) => {
                        ctx.log.write(id, "failed", e.to_string().as_bytes());
                        (ServerMsg::Failed(WireError::from(&e)), true)
                    }
                };
                if attached && control::send(&mut wr, &msg).await.is_err() {
                    attached = false;
                    reading = false;
                    ctx.log.write(id, "detached", b"client detached");
                }
                if last {
                    break;
                }
            }
            m = reader.next::<ClientMsg>(), if reading => match m {
                Ok(Some(ClientMsg::Stdin(d))) if d.is_empty() => { let _ = h.close_stdin().await; }
                Ok(Some(ClientMsg::Stdin(d))) => {
                    if let Err(e) = h.write_stdin(&d).await {
                        let _ = control::send(&mut wr, &ServerMsg::Failed(WireError::from(&e))).await;
                    }
                }
                Ok(Some(ClientMsg::Signal(s))) => { let _ = h.signal(s).await; }
                Ok(Some(ClientMsg::Resize(size))) => { let _ = h.resize(size.rows, size.cols).await; }
                Ok(Some(_)) | Err(_) | Ok(None) => {
                    // No more input (the client closed its side, left, or broke the
                    // protocol): the command runs on; a pipe-fed stdin gets its end of file,
                    // a terminal stays as it is.
                    reading = false;
                    if !tty {
                        let _ = h.close_stdin().await;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_log_lines_are_stamped_and_the_file_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exec.log");
        let log = ExecLog::open(&p, 400).unwrap();
        log.write(1, "stdout", b"one\ntwo\n");
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with(" [exec 1 stdout] two"), "{}", lines[1]);
        for _ in 0..100 {
            log.write(2, "stderr", b"a line that the guest repeats forever\n");
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.len() < 400 + 200, "{} bytes", text.len());
        assert_eq!(text.matches("reached its 400-byte cap").count(), 1);
        // A new sandbox process on the same log keeps the cap.
        let again = ExecLog::open(&p, 400).unwrap();
        again.write(3, "stdout", b"more\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }
}
