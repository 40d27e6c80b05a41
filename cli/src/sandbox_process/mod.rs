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

mod exec_log;
pub mod vmm_log;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use msb_actors::{ExecEvent, Sandbox, StopReason};
use msb_control_plane::process::ProcessId;
use msb_control_plane::schema::limits::{EXEC_LOG_CAP, MAX_CONNECTIONS, STALLED_CLIENT_DETACH};
use msb_control_plane::store::{Status, Store};
use msb_control_plane::wire::{self, paths, Announce, ClientMsg, Info, Launch, Reader, ServerMsg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::report;
use exec_log::ExecLog;

/// Why a sandbox process could not serve its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] msb_control_plane::StoreError),
    #[error("the sandbox did not start")]
    Boot(#[source] msb_actors::Error),
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

struct Ctx {
    name: String,
    /// Where the published ports are written for `msb port`, `ls` and `inspect`.
    ports_file: std::path::PathBuf,
    sb: Sandbox,
    log: ExecLog,
    sessions: AtomicU64,
    /// An attached sandbox was released by its owner (it runs on when the owner leaves).
    released: Arc<AtomicBool>,
    stop: mpsc::Sender<(Option<Duration>, oneshot::Sender<StopReason>)>,
}

/// Runs the sandbox process for `launch` until the sandbox stops. `announce` gets the
/// readiness line.
pub async fn run(
    launch: Launch,
    secrets: Vec<(msb_control_plane::schema::secret::SecretName, msb_control_plane::schema::secret::SecretValue)>,
    mut announce: impl Write,
) -> Result<(), Error> {
    // No core dumps: guest memory and secret values must not land in a core file.
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit { current: Some(0), maximum: Some(0) },
    );
    let store = Store::open(&launch.home)?;
    let dir = paths::sandbox_dir(&launch.home, &launch.name);
    msb_control_plane::client::private_dir(&dir).map_err(io("creating", &dir))?;
    let sock = paths::socket_path(&launch.home, &launch.name);
    let me = ProcessId::current()
        .ok_or_else(|| io("reading", Path::new("/proc/self/stat"))(std::io::Error::other("unparsable")))?;
    let sb = match boot(&launch, &dir, secrets).await {
        Ok(sb) => sb,
        Err(e) => {
            let why = report::with_remedy(&e, report::boot_remedy(&e));
            let _ =
                store.mark_stopped_by(launch.name.as_str(), me, Status::Stopped, &format!("failed to start: {why}"));
            finish_ephemeral(&store, &launch, &dir);
            let _ = writeln!(announce, "{}", announce_line(Some(why)));
            return Err(Error::Boot(e));
        }
    };
    let ports_file = paths::ports_path(&launch.home, &launch.name);
    write_ports(&ports_file, &sb)?;
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io("binding", &sock))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(io("securing", &sock))?;
    // The exit path removes this very socket, not one a later start may have bound.
    let sock_inode = std::fs::metadata(&sock).map(|m| m.ino()).map_err(io("reading the metadata of", &sock))?;
    store.mark_running(launch.name.as_str(), me)?;
    let exec_log = dir.join("exec.log");
    let log = ExecLog::open(&exec_log, EXEC_LOG_CAP).map_err(io("opening", &exec_log))?;
    let _ = writeln!(announce, "{}", announce_line(None));
    let _ = announce.flush();
    drop(announce);
    tracing::info!(name = %launch.name, "sandbox up");

    let (stop_tx, mut stop_rx) = mpsc::channel(16);
    let ctx = Arc::new(Ctx {
        name: launch.name.to_string(),
        ports_file,
        sb,
        log,
        sessions: 0.into(),
        released: Arc::default(),
        stop: stop_tx,
    });
    let mut owner_gone = owner_watch(launch.detached, ctx.released.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing a SIGTERM handler for", &dir))?;
    let mut stop_waiters: Vec<oneshot::Sender<StopReason>> = Vec::new();
    let waiter = ctx.clone();
    let mut vm_done = Box::pin(async move { waiter.sb.wait().await });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let reason: StopReason = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) if msb_control_plane::client::check_peer(&stream).is_err() => {
                    tracing::warn!("refused a control connection from another user");
                    refuse(&stream, "the control socket serves only its owner");
                }
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            serve_conn(stream, ctx).await;
                            drop(slot);
                        });
                    }
                    Err(_) => refuse(&stream, &format!(
                        "the sandbox serves at most {MAX_CONNECTIONS} connections at once; retry when some end"
                    )),
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
    if std::fs::metadata(&sock).is_ok_and(|m| m.ino() == sock_inode) {
        let _ = std::fs::remove_file(&sock);
    }
    match store.mark_stopped_by(launch.name.as_str(), me, Status::Stopped, &reason.to_string()) {
        Ok(true) => {}
        Ok(false) => tracing::warn!("the record of {} names another process now; left as it is", launch.name),
        Err(e) => tracing::error!("recording the stop of {}: {}", launch.name, report::chain(&e)),
    }
    finish_ephemeral(&store, &launch, &dir);
    for w in stop_waiters {
        let _ = w.send(reason.clone());
    }
    tracing::info!(name = %launch.name, %reason, "sandbox stopped");
    Ok(())
}

fn announce_line(error: Option<String>) -> String {
    serde_json::to_string(&Announce { ok: error.is_none(), error }).unwrap_or_default()
}

/// Tells a client it is refused and why, without waiting on it, and closes.
fn refuse(stream: &tokio::net::UnixStream, why: &str) {
    if let Ok(frame) = msb_protocol::encode(&ServerMsg::Refused(why.to_string())) {
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
        let _ = store.remove(launch.name.as_str());
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn boot(
    launch: &Launch,
    dir: &Path,
    mut secrets: Vec<(msb_control_plane::schema::secret::SecretName, msb_control_plane::schema::secret::SecretValue)>,
) -> msb_actors::Result<Sandbox> {
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
    // The host side of every mount is checked again: a path swapped for a symlink or another
    // directory since the sandbox was recorded, or one now inside the msb home, is refused.
    for m in &c.mounts {
        let m = msb_control_plane::wire::check_host_mount(m.clone(), &launch.home)
            .map_err(|e| msb_actors::Error::Config(format!("mount at {}: {e}", m.guest)))?;
        b = b.mount(m);
    }
    if let Some(image) = c.image_ref() {
        let (base, writable) = image_root(&launch.home, dir, image, c.image_id.as_deref(), c.root_disk_mib)?;
        b = b.root(base, writable);
    }
    for spec in &c.secrets {
        let i = secrets.iter().position(|(n, _)| *n == spec.name).ok_or_else(|| {
            msb_actors::Error::Config(format!("secret {}: its value was not handed over at start", spec.name))
        })?;
        b = b.secret(spec.clone(), secrets.swap_remove(i).1);
    }
    for f in &c.net.tls_upstream_ca {
        b = b.tls_upstream_ca(f);
    }
    b = if c.net.none {
        b.no_network()
    } else {
        let policy = match &c.net.policy {
            Some(text) => msb_actors::net::Policy::parse(text)
                .map_err(|e| msb_actors::Error::Config(format!("the recorded network policy: {e}")))?,
            None => msb_actors::net::Policy::default(),
        };
        b.network(msb_actors::Network {
            policy,
            upstream_dns: c.net.dns,
            audit: Some(paths::net_audit_path(&launch.home, &launch.name)),
            name: launch.name.to_string(),
            publish: c.net.publish.iter().map(|&p| p.into()).collect(),
            limits: crate::net_limits(&c.net),
        })
    };
    b.create().await
}

/// The disks of an image sandbox: the image's shared read-only root filesystem (built on
/// first use) and this sandbox's writable disk (`root.img` in its directory, created on its
/// first start and kept until `msb rm`).
fn image_root(
    home: &Path,
    dir: &Path,
    image: &str,
    image_id: Option<&str>,
    disk_mib: Option<u64>,
) -> msb_actors::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let store = msb_images::store::Store::open(home)?;
    let rec = store.get(image)?;
    if let Some(id) = image_id.filter(|id| *id != rec.config.as_str()) {
        return Err(msb_actors::Error::Config(format!(
            "image {image} is now {}, but this sandbox's disk is a layer over {id}; load that image again \
             or remove the sandbox (`msb rm`)",
            rec.config
        )));
    }
    let base = store.rootfs(&rec)?;
    let writable = dir.join("root.img");
    if !writable.exists() {
        let mib = disk_mib.unwrap_or(msb_control_plane::wire::DEFAULT_ROOT_DISK_MIB);
        msb_images::rootfs::create_writable_disk(&writable, mib << 20)?;
    }
    Ok((base, writable))
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

/// Writes the sandbox's published ports (whole, then renamed into place) and returns them.
fn write_ports(file: &Path, sb: &Sandbox) -> Result<Vec<wire::Publish>, Error> {
    let ports: Vec<wire::Publish> = sb.published().into_iter().map(wire::Publish::from).collect();
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&ports).unwrap_or_default()).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, file).map_err(io("writing", file))?;
    Ok(ports)
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
        ClientMsg::Exec { spec, keep_stdin } => exec_session(spec, keep_stdin, reader, wr, &ctx).await,
        ClientMsg::Stop { graceful_ms } => {
            let (tx, rx) = oneshot::channel();
            if ctx.stop.send((graceful_ms.map(Duration::from_millis), tx)).await.is_ok() {
                if let Ok(reason) = rx.await {
                    let _ = wire::send(&mut wr, &ServerMsg::Stopped { reason }).await;
                }
            }
        }
        ClientMsg::Release => {
            ctx.released.store(true, Ordering::SeqCst);
            tracing::info!("released by its owner: the sandbox now outlives it");
            let _ = wire::send(&mut wr, &ServerMsg::Released).await;
        }
        ClientMsg::Info => {
            let boot_ms = ctx
                .sb
                .boot_times()
                .await
                .ok()
                .and_then(|b| b.to_init)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let info = Info {
                name: ctx.name.clone(),
                pid: std::process::id(),
                boot_ms,
                exec_sessions: ctx.sessions.load(Ordering::Relaxed),
            };
            let _ = wire::send(&mut wr, &ServerMsg::Info(info)).await;
        }
        ClientMsg::SetPolicy { policy } => {
            let parsed = match policy.as_deref() {
                None => Ok(msb_actors::net::Policy::default()),
                Some(text) => msb_actors::net::Policy::parse(text),
            };
            let answer = match parsed {
                Err(e) => ServerMsg::Refused(format!("not a policy: {e}")),
                Ok(p) => match ctx.sb.set_policy(&p).await {
                    Ok(()) => {
                        tracing::info!("the network policy was changed live");
                        ServerMsg::Policy(p.to_string())
                    }
                    Err(e) => ServerMsg::Refused(e.to_string()),
                },
            };
            let _ = wire::send(&mut wr, &answer).await;
        }
        ClientMsg::Publish(p) => {
            let answer = match ctx.sb.publish(p.into()).await {
                Ok(bound) => {
                    tracing::info!(%bound, guest = p.guest, proto = %p.proto, "a port was published live");
                    ports_answer(&ctx)
                }
                Err(e) => ServerMsg::Refused(e.to_string()),
            };
            let _ = wire::send(&mut wr, &answer).await;
        }
        ClientMsg::Unpublish { guest, proto } => {
            let answer = match ctx.sb.unpublish(proto, guest).await {
                Ok(closed) if closed.is_empty() => {
                    ServerMsg::Refused(format!("no published port leads to guest port {guest}/{proto}"))
                }
                Ok(_) => ports_answer(&ctx),
                Err(e) => ServerMsg::Refused(e.to_string()),
            };
            let _ = wire::send(&mut wr, &answer).await;
        }
        ClientMsg::Policy => {
            let answer = match ctx.sb.policy().await {
                Ok(p) => ServerMsg::Policy(p),
                Err(e) => ServerMsg::Refused(e.to_string()),
            };
            let _ = wire::send(&mut wr, &answer).await;
        }
        ClientMsg::Secret(op) => {
            use msb_control_plane::wire::SecretOp;
            let done = match op {
                SecretOp::Set { name, value } => {
                    match msb_control_plane::schema::secret::SecretValue::new(name.as_str(), value.0.clone()) {
                        Ok(v) => ctx.sb.rotate_secret(&name, v).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                SecretOp::Hosts { name, hosts } => {
                    ctx.sb.set_secret_hosts(&name, hosts).await.map_err(|e| e.to_string())
                }
                SecretOp::Remove { name } => ctx.sb.remove_secret(&name).await.map_err(|e| e.to_string()),
                SecretOp::List => Ok(()),
            };
            let answer = match done {
                Ok(()) => match ctx.sb.secrets().await {
                    Ok(list) => ServerMsg::Secrets(list),
                    Err(e) => ServerMsg::Refused(e.to_string()),
                },
                Err(e) => ServerMsg::Refused(e),
            };
            let _ = wire::send(&mut wr, &answer).await;
        }
        other => {
            let msg =
                format!("a connection must start with Exec, Stop, Release, Info, SetPolicy or Policy, not {other:?}");
            let _ = wire::send(&mut wr, &ServerMsg::Refused(msg)).await;
        }
    }
}

/// The published ports, after a change: written for the other commands, and answered.
fn ports_answer(ctx: &Ctx) -> ServerMsg {
    match write_ports(&ctx.ports_file, &ctx.sb) {
        Ok(ports) => ServerMsg::Ports(ports),
        Err(e) => ServerMsg::Refused(format!("the ports changed but could not be recorded: {e}")),
    }
}

/// Runs one exec session for a client. Input (stdin, signals, resizes) is forwarded by its own
/// task, so a stdin write waiting for guest room never holds up output. If the client goes
/// away, or leaves output unread for [`STALLED_CLIENT_DETACH`], it is detached: the command
/// keeps running and its output still reaches the exec log (and credits the guest).
async fn exec_session(
    mut spec: msb_actors::ExecSpec,
    keep_stdin: bool,
    reader: Reader<tokio::net::unix::OwnedReadHalf>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    ctx: &Ctx,
) {
    // Input arrives as messages, never inside the request.
    spec.stdin = None;
    let tty = spec.tty.is_some();
    let argv = spec.argv.join(" ");
    let mut h = match ctx.sb.exec_stream(spec).await {
        Ok(h) => h,
        Err(e) => {
            let _ = wire::send(&mut wr, &ServerMsg::Event(ExecEvent::Failed(e))).await;
            return;
        }
    };
    ctx.sessions.fetch_add(1, Ordering::Relaxed);
    let id = h.id();
    ctx.log.write(id, "start", argv.as_bytes());
    if !keep_stdin {
        let _ = h.close_stdin().await;
    }
    let mut attached = wire::send(&mut wr, &ServerMsg::Started { id }).await.is_ok();
    let input = attached.then(|| tokio::spawn(forward_input(reader, h.control(), tty)));
    while let Some(ev) = h.next().await {
        let last = match &ev {
            ExecEvent::Stdout(d) => {
                ctx.log.write(id, "stdout", d);
                false
            }
            ExecEvent::Stderr(d) => {
                ctx.log.write(id, "stderr", d);
                false
            }
            ExecEvent::Exited(s) => {
                ctx.log.write(id, "exit", format!("{s:?}").as_bytes());
                true
            }
            ExecEvent::Failed(e) => {
                ctx.log.write(id, "failed", e.to_string().as_bytes());
                true
            }
        };
        if attached {
            let why =
                match tokio::time::timeout(STALLED_CLIENT_DETACH, wire::send(&mut wr, &ServerMsg::Event(ev))).await {
                    Ok(Ok(())) => None,
                    Ok(Err(_)) => Some("client detached".to_string()),
                    Err(_) => {
                        Some(format!("client left output unread for {} s: detached", STALLED_CLIENT_DETACH.as_secs()))
                    }
                };
            if let Some(why) = why {
                attached = false;
                tracing::info!(exec = id, "{why}");
                ctx.log.write(id, "detached", why.as_bytes());
                // Its input is still forwarded until it ends (a client that leaves may have sent
                // a last signal on its way out); then stdin gets its end of file.
                let _ = wr.shutdown().await;
            }
        }
        if last {
            break;
        }
    }
    if let Some(t) = input {
        t.abort();
    }
}

/// Forwards a client's input to the command until the client stops sending. A pipe-fed stdin
/// then gets its end of file; a terminal stays as it is. Input for a command whose stdin has
/// closed is dropped.
async fn forward_input(
    mut reader: Reader<tokio::net::unix::OwnedReadHalf>,
    control: msb_actors::ExecControl,
    tty: bool,
) {
    loop {
        match reader.next::<ClientMsg>().await {
            Ok(Some(ClientMsg::Stdin(d))) if d.is_empty() => {
                let _ = control.close_stdin().await;
            }
            Ok(Some(ClientMsg::Stdin(d))) => {
                // Answered once the guest has room: this is what paces a client's stdin.
                let _ = control.write_stdin(&d).await;
            }
            Ok(Some(ClientMsg::Signal(s))) => {
                let _ = control.signal(s).await;
            }
            Ok(Some(ClientMsg::Resize(size))) => {
                let _ = control.resize(size.rows, size.cols).await;
            }
            Ok(Some(_)) | Err(_) | Ok(None) => {
                if !tty {
                    let _ = control.close_stdin().await;
                }
                return;
            }
        }
    }
}
