//! The sandbox process: one host process per running named sandbox. It owns the VM (the
//! actor tree of [`Sandbox`]), listens on the sandbox's Unix socket and logs exec output with
//! timestamps.
//!
//! Its launch description arrives as one JSON line on stdin (never in argv or the
//! environment). For an attached sandbox stdin stays open: end of file means the client that
//! owns the sandbox is gone, and the sandbox stops. A detached sandbox ignores it.
//!
//! Start-up is ordered for the lockdown ([`harden`], [`seccomp`]): while the process is still
//! single-threaded it resolves every path the sandbox needs, opens its exit report, locks
//! itself down and binds its control socket (under a temporary name); only then is the async
//! runtime built, the seccomp filters installed on every thread, and the VM booted.
//!
//! Invariants: the socket is created in a 0700 directory, set to 0600 and given its real name
//! only once the sandbox is up; at most [`MAX_CONNECTIONS`] connections are served at once
//! (more are told why and closed); every way out (stop request, the guest stopping itself,
//! SIGTERM, the owner leaving) goes through one exit path that stops the VM, writes the reason
//! to the exit report and removes the socket. The process holds no handle on the state store
//! (shared by every sandbox): its client records the start from the readiness line, and the
//! next client closes the run from the exit report.

mod exec_log;
pub mod harden;
#[cfg(feature = "test-hooks")]
mod hooks;
pub mod probe;
pub mod seccomp;
pub mod seccomp_log;
pub mod vmm_log;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use msb_actors::{ExecEvent, Sandbox, StopReason};
use msb_control_plane::process::ProcessId;
use msb_control_plane::schema::limits::{EXEC_LOG_CAP, MAX_CONNECTIONS, STALLED_CLIENT_DETACH};
use msb_control_plane::schema::secret::{SecretName, SecretValue};
use msb_control_plane::wire::{self, paths, Announce, ClientMsg, Hardening, Info, Launch, Reader, ServerMsg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::report;
use exec_log::ExecLog;

/// Why a sandbox process could not serve its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

type StopReply = oneshot::Sender<(StopReason, oneshot::Sender<()>)>;

/// How long an exiting process waits for its stop answers to be written.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

struct Ctx {
    name: String,
    /// Where the published ports are written for `msb port`, `ls` and `inspect`.
    ports_file: std::path::PathBuf,
    sb: Sandbox,
    log: ExecLog,
    sessions: AtomicU64,
    /// An attached sandbox was released by its owner (it runs on when the owner leaves).
    released: Arc<AtomicBool>,
    /// Stop requests: the graceful timeout, and where the reason goes (with a sender the
    /// connection fires once it has written the answer: the process waits for that before it
    /// exits, so a stop is never answered by a closed socket).
    stop: mpsc::Sender<(Option<Duration>, StopReply)>,
    hardening: Hardening,
    /// The restricted profile: forced on every command, whoever asks.
    restricted: bool,
}

/// What the sandbox needs from the host, resolved before the lockdown (after it, only the
/// plan's paths exist).
struct Prepared {
    dir: std::path::PathBuf,
    kernel: std::path::PathBuf,
    initramfs: std::path::PathBuf,
    root: Option<(std::path::PathBuf, std::path::PathBuf)>,
    mounts: Vec<msb_control_plane::schema::fs::MountSpec>,
    dns: Option<std::net::SocketAddr>,
    plan: harden::Plan,
}

/// Resolves every path of `launch` and the lockdown plan that keeps exactly those.
fn prepare(launch: &Launch, skip: harden::Skip) -> msb_actors::Result<Prepared> {
    let c = &launch.config;
    let home = &launch.home;
    let dir = paths::sandbox_dir(home, &launch.name);
    // The host side of every mount is checked again: a path swapped for a symlink or another
    // directory since the sandbox was recorded, or one now inside the msb home, is refused.
    let mounts = c
        .mounts
        .iter()
        .map(|m| {
            msb_control_plane::wire::check_host_mount(m.clone(), home)
                .map_err(|e| msb_actors::Error::Config(format!("mount at {}: {e}", m.guest)))
        })
        .collect::<msb_actors::Result<Vec<_>>>()?;
    let root = match c.image_ref() {
        Some(image) => Some(image_root(home, &dir, image, c.image_id.as_deref(), c.root_disk_mib)?),
        None => None,
    };
    let kernel = match &c.kernel {
        Some(k) => k.clone(),
        None => msb_images::kernel(home)?,
    };
    let initramfs = msb_images::initramfs::cached(home, &msb_images::agentd(home)?, &msb_images::busybox(home)?)?;
    let mut plan = harden::Plan { skip, ..Default::default() };
    let keep = |plan: &mut harden::Plan, p: &Path, write: bool| {
        plan.keep(p, write).map_err(|e| msb_actors::Error::Config(format!("the lockdown plan: {e}")))
    };
    keep(&mut plan, &dir, true)?;
    // A host without /dev/kvm gets the VMM's own error (with its remedy) when it opens it.
    if Path::new("/dev/kvm").exists() {
        keep(&mut plan, Path::new("/dev/kvm"), true)?;
    }
    keep(&mut plan, &kernel, false)?;
    keep(&mut plan, &initramfs, false)?;
    if let Some((base, _)) = &root {
        keep(&mut plan, base, false)?;
    }
    for m in &mounts {
        keep(&mut plan, &m.host, !m.read_only)?;
    }
    if !c.secrets.is_empty() && !c.net.none {
        for f in msb_actors::net::host_root_files() {
            keep(&mut plan, &f, false)?;
        }
    }
    for f in &c.net.tls_upstream_ca {
        keep(&mut plan, f, false)?;
    }
    let dns = if c.net.none { None } else { c.net.dns.or_else(msb_actors::net::host_resolver) };
    Ok(Prepared { dir, kernel, initramfs, root, mounts, dns, plan })
}

/// Starts this sandbox's dialer (`msb dialer`, in the host's namespaces) with the launch's
/// policy and published ports as its first grants; returns this process's end of the pair.
fn start_dialer(launch: &Launch, prep: &Prepared) -> std::io::Result<std::os::fd::OwnedFd> {
    let c = &launch.config;
    let grants = paths::grants_path(&launch.home, &launch.name);
    if let Some(dir) = grants.parent() {
        msb_control_plane::client::private_dir(dir)?;
    }
    let publish = c.net.publish.iter().map(|&p| msb_actors::net::Port::from(p)).map(|p| (p.proto, p.host)).collect();
    msb_actors::net::Grants { policies: vec![c.net.policy.clone()], publish }.write(&grants)?;
    let mut args = vec![std::ffi::OsString::from(DIALER_ARG), "--grants".into(), grants.into_os_string()];
    if let Some(dns) = prep.dns {
        args.extend(["--dns".into(), dns.to_string().into()]);
    }
    spawn_helper(&args)
}

/// Starts this binary with `args` as a helper of this process (before the lockdown: it
/// execs), its stdin one end of a new `SOCK_SEQPACKET` pair, its stderr this process's
/// (vmm.log); returns the other end. The helper ends when that end closes.
pub(crate) fn spawn_helper(args: &[std::ffi::OsString]) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (ours, theirs) = socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    std::process::Command::new("/proc/self/exe")
        .args(args)
        .stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null())
        .spawn()?;
    Ok(ours)
}

/// The hidden subcommand that runs a dialer.
pub const DIALER_ARG: &str = "dialer";

/// `msb dialer`: serves the sandbox process whose pair end is stdin, confined first.
pub fn dialer_main(grants: &Path, dns: Option<std::net::SocketAddr>) -> std::process::ExitCode {
    use std::os::fd::AsFd;
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("msb dialer: its socket: {e}");
            return std::process::ExitCode::from(125);
        }
    };
    let dir = grants.parent().unwrap_or(Path::new("/"));
    match harden::confine_dialer(dir) {
        Ok(r) => tracing::debug!(applied = ?r.applied, missing = ?r.missing, "the dialer is confined"),
        Err(e) => {
            // No dialer, no host sockets: the sandbox runs on without a network.
            eprintln!("msb dialer: confining it: {}", report::chain(&e));
            return std::process::ExitCode::from(1);
        }
    }
    let config = msb_actors::net::DialerConfig { grants: grants.to_path_buf(), resolver: dns };
    match msb_actors::net::serve_dialer(sock, config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msb dialer: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The exit report: this process's identity, then (at [`ExitReport::offset`]) why it ended.
struct ExitReport {
    file: std::fs::File,
    offset: u64,
}

impl ExitReport {
    fn create(path: &Path, me: ProcessId) -> std::io::Result<ExitReport> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)?;
        let head = format!("{} {}\n", me.pid, me.start);
        file.write_all_at(head.as_bytes(), 0)?;
        Ok(ExitReport { file, offset: head.len() as u64 })
    }

    fn write(&self, reason: &str) {
        let line = format!("{}\n", reason.replace('\n', " "));
        let _ = self.file.write_all_at(line.as_bytes(), self.offset);
        let _ = self.file.set_len(self.offset + line.len() as u64);
    }
}

/// The sandbox process's `main`: reads the launch, locks the process down, then runs the
/// sandbox until it stops.
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("msb sandbox process: reading the launch description: {e}");
        return ExitCode::from(125);
    }
    let launch: Launch = match serde_json::from_str(&line) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("msb sandbox process: bad launch description: {e}");
            return ExitCode::from(125);
        }
    };
    // The secrets' values follow on the same pipe (never argv or the environment).
    let secrets = match msb_control_plane::secrets::read_frame(&mut std::io::stdin().lock()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("msb sandbox process: {e}");
            return ExitCode::from(125);
        }
    };
    let mut announce = std::io::stdout();
    let refuse = |announce: &mut std::io::Stdout, why: String| {
        tracing::error!("the sandbox did not start: {why}");
        let _ = writeln!(announce, "{}", announce_line(Some(why)));
        ExitCode::from(1)
    };
    let knobs = harden::Skip::parse(&std::env::var("MSB_HARDEN").unwrap_or_default())
        .and_then(|skip| Ok((skip, seccomp::Mode::parse(std::env::var("MSB_SECCOMP").ok().as_deref())?)));
    let (skip, mode) = match knobs {
        Ok(k) => k,
        Err(e) => return refuse(&mut announce, e),
    };
    let mut prep = match prepare(&launch, skip) {
        Ok(p) => p,
        Err(e) => return refuse(&mut announce, report::with_remedy(&e, report::boot_remedy(&e))),
    };
    if let Err(e) = msb_control_plane::client::private_dir(&prep.dir) {
        return refuse(&mut announce, format!("creating {}: {e}", prep.dir.display()));
    }
    let Some(me) = ProcessId::current() else {
        return refuse(&mut announce, "reading /proc/self/stat: unparsable".into());
    };
    let exit_path = paths::exit_path(&launch.home, &launch.name);
    let exit = match ExitReport::create(&exit_path, me) {
        Ok(x) => x,
        Err(e) => return refuse(&mut announce, format!("creating {}: {e}", exit_path.display())),
    };
    // The dialer is started while this process still sees the host: from here on, host
    // sockets come from it, and this process moves into an empty network namespace.
    let dialer = if prep.plan.skip.all || launch.config.net.none {
        None
    } else {
        match start_dialer(&launch, &prep) {
            Ok(fd) => Some(fd),
            Err(e) => return refuse(&mut announce, format!("starting the dialer: {e}")),
        }
    };
    // In log mode, the listener that records what the filter would refuse (started while
    // this binary can still be run; its socket stays open as long as this process runs).
    let seccomp_logger = match (mode, prep.plan.skip.all) {
        (seccomp::Mode::Log, false) => match seccomp_log::spawn() {
            Ok(fd) => Some(fd),
            Err(e) => return refuse(&mut announce, format!("starting the seccomp log listener: {e}")),
        },
        _ => None,
    };
    // No sandbox process needs the host's network itself: with a network its dialer serves
    // it, without one nothing does.
    prep.plan.net = true;
    let mut hardening = match harden::lockdown(&prep.plan) {
        Ok(r) => r,
        Err(e) => return refuse(&mut announce, format!("locking the sandbox process down: {}", report::chain(&e))),
    };
    let unconfined = prep.plan.skip.all;
    // The control socket is bound now, while Unix sockets may still be made, under a name no
    // client uses until the sandbox is up.
    let sock = paths::socket_path(&launch.home, &launch.name);
    let pending = sock.with_extension("sock.new");
    let _ = std::fs::remove_file(&pending);
    // A socket left by a crashed earlier run is no one's (one start at a time): a client must
    // not take it for this run's before this run is up.
    let _ = std::fs::remove_file(&sock);
    let listener = match std::os::unix::net::UnixListener::bind(&pending).and_then(|l| {
        std::fs::set_permissions(&pending, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(l) => l,
        Err(e) => return refuse(&mut announce, format!("binding {}: {e}", pending.display())),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return refuse(&mut announce, format!("starting the runtime: {e}")),
    };
    let pid = std::process::id();
    let confined = rt.block_on(async {
        // Registered before the filters: the handler (and tokio's pipe for it) exists already.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("installing a SIGTERM handler: {e}"))?;
        if unconfined {
            return Ok(term);
        }
        msb_hypervisor::sigsys::install_violation_reporter(2, Some((exit.file.as_raw_fd(), exit.offset)))
            .map_err(|e| format!("installing the seccomp violation reporter: {e}"))?;
        seccomp_log::install_runtime(mode, pid, seccomp_logger.as_ref())?;
        msb_hypervisor::on_vcpu_thread_start(move || seccomp::install(seccomp::Role::Vcpu, mode, pid));
        Ok::<_, String>(term)
    });
    let term = match confined {
        Ok(t) => t,
        Err(e) => return refuse(&mut announce, e),
    };
    if !unconfined {
        hardening.applied.push(match mode {
            seccomp::Mode::Trap => "seccomp (runtime + vcpu filters; a violation ends the process)".into(),
            seccomp::Mode::Log => {
                "seccomp in log mode (MSB_SECCOMP=log: violations are only recorded, in vmm.log)".into()
            }
        });
    } else {
        hardening.missing.push("seccomp (MSB_HARDEN=-all, a test build)".into());
    }
    if mode == seccomp::Mode::Log {
        hardening.missing.push("seccomp enforcement (MSB_SECCOMP=log)".into());
    }
    if launch.config.require_hardening && !hardening.missing.is_empty() {
        let why = format!(
            "--require-hardening: this host lacks {}; run `msb doctor`, or start without --require-hardening",
            hardening.missing.join(", ")
        );
        exit.write(&format!("failed to start: {why}"));
        return refuse(&mut announce, why);
    }
    tracing::info!(applied = ?hardening.applied, missing = ?hardening.missing, "locked down");
    if dialer.is_some() {
        hardening.applied.push("host sockets only from the dialer, which checks each against the policy".into());
    }
    let boot = Boot { prep, secrets, listener, pending, sock, term, hardening, exit, dialer };
    match rt.block_on(run(launch, boot, announce)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msb sandbox process: {}", report::chain(&e));
            ExitCode::from(1)
        }
    }
}

/// What [`main`] hands the async part.
struct Boot {
    prep: Prepared,
    secrets: Vec<(SecretName, SecretValue)>,
    listener: std::os::unix::net::UnixListener,
    pending: std::path::PathBuf,
    sock: std::path::PathBuf,
    term: tokio::signal::unix::Signal,
    hardening: Hardening,
    exit: ExitReport,
    /// This process's end of the dialer's pair, when a dialer serves it.
    dialer: Option<std::os::fd::OwnedFd>,
}

/// Runs the sandbox of `launch` until it stops. `announce` gets the readiness line.
async fn run(launch: Launch, boot_args: Boot, mut announce: impl Write) -> Result<(), Error> {
    let Boot { prep, secrets, listener, pending, sock, mut term, hardening, exit, dialer } = boot_args;
    let dir = prep.dir.clone();
    let dialer = match dialer.map(msb_actors::net::Dialer::remote).transpose() {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            let why = format!("the dialer's socket: {e}");
            exit.write(&format!("failed to start: {why}"));
            let _ = writeln!(announce, "{}", announce_line(Some(why.clone())));
            return Err(Error::Io { what: "registering", path: "the dialer's socket".into(), source: e });
        }
    };
    let sb = match boot(&launch, prep, secrets, dialer).await {
        Ok(sb) => sb,
        Err(e) => {
            let why = report::with_remedy(&e, report::boot_remedy(&e));
            exit.write(&format!("failed to start: {why}"));
            let _ = std::fs::remove_file(&pending);
            let _ = writeln!(announce, "{}", announce_line(Some(why)));
            return Err(Error::Boot(e));
        }
    };
    let ports_file = paths::ports_path(&launch.home, &launch.name);
    write_ports(&ports_file, &sb)?;
    let listener = UnixListener::from_std(listener).map_err(io("listening on", &pending))?;
    std::fs::rename(&pending, &sock).map_err(io("naming", &sock))?;
    // The exit path removes this very socket, not one a later start may have bound.
    let sock_inode = std::fs::metadata(&sock).map(|m| m.ino()).map_err(io("reading the metadata of", &sock))?;
    let exec_log = dir.join("exec.log");
    let log = ExecLog::open(&exec_log, EXEC_LOG_CAP).map_err(io("opening", &exec_log))?;
    let _ = writeln!(announce, "{}", announce_line(None));
    let _ = announce.flush();
    drop(announce);
    tracing::info!(name = %launch.name, "sandbox up");
    #[cfg(feature = "test-hooks")]
    hooks::start();

    let (stop_tx, mut stop_rx) = mpsc::channel(16);
    let ctx = Arc::new(Ctx {
        name: launch.name.to_string(),
        ports_file,
        sb,
        log,
        sessions: 0.into(),
        released: Arc::default(),
        stop: stop_tx,
        hardening,
        restricted: launch.config.restricted,
    });
    let mut owner_gone = owner_watch(launch.detached, ctx.released.clone());
    let mut stop_waiters: Vec<StopReply> = Vec::new();
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
    exit.write(&reason.to_string());
    let mut written = Vec::new();
    for w in stop_waiters {
        let (ack, done) = oneshot::channel();
        if w.send((reason.clone(), ack)).is_ok() {
            written.push(done);
        }
    }
    for done in written {
        let _ = tokio::time::timeout(ANSWER_GRACE, done).await;
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

async fn boot(
    launch: &Launch,
    prep: Prepared,
    mut secrets: Vec<(SecretName, SecretValue)>,
    dialer: msb_actors::net::Dialer,
) -> msb_actors::Result<Sandbox> {
    let c = &launch.config;
    let mut b = Sandbox::builder()
        .cpus(c.cpus)
        .memory_mib(c.memory_mib)
        .boot_timeout(Duration::from_secs(c.boot_timeout_secs))
        .console_log(prep.dir.join("console.log"))
        .kernel(&prep.kernel)
        .initramfs(&prep.initramfs)
        .read_only_root(c.read_only);
    if let Some(a) = &c.kernel_args {
        b = b.kernel_args(a.clone());
    }
    for m in prep.mounts {
        b = b.mount(m);
    }
    if let Some((base, writable)) = prep.root {
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
            upstream_dns: prep.dns,
            audit: Some(paths::net_audit_path(&launch.home, &launch.name)),
            name: launch.name.to_string(),
            publish: c.net.publish.iter().map(|&p| p.into()).collect(),
            limits: crate::net_limits(&c.net),
            dialer,
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
                if let Ok((reason, written)) = rx.await {
                    let _ = wire::send(&mut wr, &ServerMsg::Stopped { reason }).await;
                    let _ = written.send(());
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
                hardening: ctx.hardening.clone(),
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
    // msb's own file operations (`msb cp`, the SDK's file API: agentd's file mode, which a
    // guest cannot stand in for) act for the owner, not the workload.
    let own_files = spec.argv.first().is_some_and(|a| a == "/proc/self/exe")
        && spec.argv.get(1).is_some_and(|a| a == "--msb-files");
    spec.restricted |= ctx.restricted && !own_files;
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
