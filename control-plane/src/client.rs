//! The SDK for named sandboxes that live in their own host process: create, find, list,
//! start, stop, remove, and exec into them from any process. The state store records them;
//! each running one is served by a sandbox process on its Unix socket ([`crate::wire`]).
//!
//! Bounds: [`NamedSandbox::exec`] keeps at most
//! [`MAX_BUFFERED_OUTPUT`] output bytes, as the
//! in-process API does; every wait on a sandbox process is bounded ([`STOP_ANSWER_GRACE`],
//! [`KILL_ANSWER_GRACE`], the boot timeout plus a margin, [`ANSWER_TIMEOUT`] for connecting,
//! every question and the start of an exec), and an expired wait says what it waited for.
//! Only an exec's own run time is the command's (bounded by its `timeout` if it has one).

use std::io::{BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use msb_schema::exec::OutputCollector;
use msb_schema::limits::{MAX_BUFFERED_OUTPUT, STDIN_CHUNK};
use msb_schema::net::PortProto;
use msb_schema::secret::{SecretName, SecretValue};
use msb_schema::{ExecError, ExecEvent, ExecOutput, ExecSpec, SandboxName, WinSize};
use tokio::net::UnixStream;

use crate::store::{Action, ProcessId, Record, Status, Store, StoreError};
use crate::wire::{self, paths, Announce, ClientMsg, Info, Launch, Reader, SandboxConfig, ServerMsg};
use crate::{Error, Result};

/// The entry point: msb's home directory and its state store.
#[derive(Debug, Clone)]
pub struct Msb {
    home: PathBuf,
    /// How long to wait for a sandbox process's answer ([`ANSWER_TIMEOUT`] unless set).
    answer_timeout: Duration,
}

impl Msb {
    /// `$MSB_HOME`, default `~/.msb` (an error when neither is set).
    pub fn from_env() -> Result<Self> {
        Ok(Msb::at(msb_images::msb_home().map_err(StoreError::Home)?))
    }

    pub fn at(home: impl Into<PathBuf>) -> Self {
        Msb { home: home.into(), answer_timeout: ANSWER_TIMEOUT }
    }

    /// Waits at most `d` for a sandbox process to accept, answer or start an exec.
    pub fn answer_timeout(mut self, d: Duration) -> Self {
        self.answer_timeout = d;
        self
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Opens the store and reconciles it: sandboxes whose process died are marked crashed
    /// and their stale sockets removed.
    pub fn reconciled_store(&self) -> Result<Store> {
        let s = Store::open(&self.home)?;
        let home = self.home.clone();
        let report = move |name: &str, p: ProcessId| {
            SandboxName::new(name).ok().and_then(|n| read_exit_report(&paths::exit_path(&home, &n), p))
        };
        for name in s.reconcile_with(report)? {
            tracing::debug!("sandbox {name}: its process has ended; its run is closed");
            let Ok(name) = SandboxName::new(&name) else { continue };
            let _ = std::fs::remove_file(paths::socket_path(&self.home, &name));
            // An ephemeral sandbox would have been removed when it stopped: do it now.
            if s.get(name.as_str()).is_ok_and(|r| r.ephemeral) && s.remove(name.as_str()).is_ok() {
                let _ = std::fs::remove_dir_all(paths::sandbox_dir(&self.home, &name));
            }
        }
        // A sandbox that came up while the client starting it died before recording it (the
        // jailed process never writes the store): its socket gets its name only once it is
        // up, so a live process with its socket is running.
        for r in s.list()?.into_iter().filter(|r| r.status == Status::Starting) {
            let Some(p) = r.process.filter(|p| p.is_alive()) else { continue };
            let Ok(name) = SandboxName::new(&r.name) else { continue };
            if std::fs::symlink_metadata(paths::socket_path(&self.home, &name)).is_ok() {
                s.mark_running(&r.name, p)?;
            }
        }
        Ok(s)
    }

    /// Mirrors the image store's names into the state store's `images` table and returns
    /// the rows ([`crate::store::ImageRow`]).
    pub fn sync_images(&self) -> Result<Vec<crate::store::ImageRow>> {
        let images = msb_images::store::Store::open(&self.home).and_then(|s| s.list()).map_err(Error::Image)?;
        let rows: Vec<_> = images
            .iter()
            .map(|r| crate::store::ImageRow {
                reference: r.reference.clone(),
                id: r.config.to_string(),
                manifest: r.manifest.as_ref().map(|m| m.to_string()),
                layers: r.layers.len() as u32,
                size: r.size,
                loaded_ms: r.loaded.saturating_mul(1000),
            })
            .collect();
        let s = Store::open(&self.home)?;
        s.sync_images(&rows)?;
        s.images().map_err(Error::from)
    }

    /// Records a new named sandbox (not started).
    pub fn create(&self, name: &str, config: SandboxConfig) -> Result<NamedSandbox> {
        self.create_with(name, config, false)
    }

    /// Records a new sandbox under a generated name (`PREFIX-PID-NANOS`), kept after it stops.
    pub fn create_generated(&self, prefix: &str, config: SandboxConfig) -> Result<NamedSandbox> {
        self.create_named(SandboxName::ephemeral(prefix), config, false)
    }

    fn create_with(&self, name: &str, config: SandboxConfig, ephemeral: bool) -> Result<NamedSandbox> {
        self.create_named(SandboxName::new(name)?, config, ephemeral)
    }

    fn create_named(&self, name: SandboxName, mut config: SandboxConfig, ephemeral: bool) -> Result<NamedSandbox> {
        config.validate()?;
        config.check_host_mounts(&self.home)?;
        let sock = paths::socket_path(&self.home, &name);
        if sock.as_os_str().len() > paths::MAX_SOCKET_PATH {
            return Err(Error::Config(format!(
                "the control socket path {} is longer than {} bytes; use a shorter MSB_HOME or name",
                sock.display(),
                paths::MAX_SOCKET_PATH
            )));
        }
        self.reconciled_store()?.insert(&name, &config, ephemeral)?;
        Ok(NamedSandbox { msb: self.clone(), name })
    }

    /// Records an ephemeral sandbox with a generated name (removed when it stops).
    pub fn create_ephemeral(&self, config: SandboxConfig) -> Result<NamedSandbox> {
        self.create_named(SandboxName::ephemeral("run"), config, true)
    }

    /// A recorded sandbox.
    pub fn get(&self, name: &str) -> Result<NamedSandbox> {
        let name = SandboxName::new(name)?;
        if !self.reconciled_store()?.exists(name.as_str())? {
            return Err(StoreError::NotFound(name.to_string()).into());
        }
        Ok(NamedSandbox { msb: self.clone(), name })
    }

    /// Every recorded sandbox.
    pub fn list(&self) -> Result<Vec<Record>> {
        Ok(self.reconciled_store()?.list()?)
    }

    /// The runs of a recorded sandbox, newest first.
    pub fn runs(&self, name: &str) -> Result<Vec<crate::store::Run>> {
        Ok(self.reconciled_store()?.runs(SandboxName::new(name)?.as_str())?)
    }
}

/// The sandbox process of an attached sandbox: dropping this stops the sandbox.
pub struct Owner {
    child: Child,
    /// Our end of the sandbox process's stdin: closing it tells an attached sandbox to stop.
    owner_pipe: Option<ChildStdin>,
}

impl Owner {
    /// Waits for the sandbox process to exit.
    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.owner_pipe = None;
        self.child.wait()
    }
}

/// A named sandbox in the store.
#[derive(Debug, Clone)]
pub struct NamedSandbox {
    msb: Msb,
    name: SandboxName,
}

/// Creates `dir` (and missing parents) with mode 0700 from the first instant, and makes an
/// existing one 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Checks that the process at the other end of a control socket runs as this user.
pub fn check_peer(stream: &UnixStream) -> Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let cred = stream.peer_cred().map_err(|e| Error::Wire(format!("reading the socket's peer credentials: {e}")))?;
    if cred.uid() != me {
        return Err(Error::Wire(format!("the control socket is served by uid {}, not by you (uid {me})", cred.uid())));
    }
    Ok(())
}

/// Longest exit report read (a reason line is far shorter).
const EXIT_REPORT_CAP: u64 = 4096;

/// What the exit report at `path` says about process `p`: `None` if it is missing, names
/// another process or says nothing.
pub fn read_exit_report(path: &Path, p: ProcessId) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(EXIT_REPORT_CAP).read_to_string(&mut text).ok()?;
    let (head, rest) = text.split_once('\n')?;
    let mut w = head.split_whitespace();
    let (pid, start) = (w.next()?.parse::<u32>().ok()?, w.next()?.parse::<u64>().ok()?);
    let reason = rest.trim();
    (pid == p.pid && start == p.start && !reason.is_empty())
        .then(|| reason.lines().next().unwrap_or(reason).to_string())
}

/// Finds the `msb` binary that runs sandbox processes: `$MSB_BIN`, this executable if it is
/// `msb`, an `msb` beside it, then `$MSB_HOME/bin/msb`.
fn msb_binary(home: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MSB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Spawn(format!("locating this executable: {e}")))?;
    if exe.file_name().is_some_and(|n| n == "msb") {
        return Ok(exe);
    }
    for c in [exe.with_file_name("msb"), home.join("bin/msb")] {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(Error::Spawn("the msb binary (which runs sandbox processes) was not found; set MSB_BIN".into()))
}

impl NamedSandbox {
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The current record.
    pub fn record(&self) -> Result<Record> {
        Ok(self.msb.reconciled_store()?.get(self.name())?)
    }

    /// The directory with its logs and socket.
    pub fn dir(&self) -> PathBuf {
        paths::sandbox_dir(&self.msb.home, &self.name)
    }

    /// What its dialer may open ([`paths::grants_path`]).
    fn grants(&self) -> msb_schema::net::Grants {
        msb_schema::net::Grants::read(&paths::grants_path(&self.msb.home, &self.name))
    }

    fn write_grants(&self, g: &msb_schema::net::Grants) -> Result<()> {
        let path = paths::grants_path(&self.msb.home, &self.name);
        path.parent()
            .map_or(Ok(()), private_dir)
            .and_then(|()| g.write(&path))
            .map_err(|e| Error::Config(format!("writing {} (what its dialer may open): {e}", path.display())))
    }

    /// Starts it in a sandbox process that outlives this process.
    pub async fn start_detached(&self) -> Result<()> {
        self.start_detached_with(Vec::new()).await
    }

    /// Like [`NamedSandbox::start_detached`], with values for secrets whose source is
    /// [`SecretSource::Given`](msb_schema::secret::SecretSource) (or that override theirs).
    pub async fn start_detached_with(&self, values: Vec<(SecretName, SecretValue)>) -> Result<()> {
        let owner = self.start(true, values).await?;
        // Reaped when it ends, so that a long-lived client does not collect zombies.
        std::thread::spawn(move || owner.wait());
        Ok(())
    }

    /// Starts it in a sandbox process that stops the sandbox when the returned [`Owner`] is
    /// dropped or this process exits.
    pub async fn start_attached(&self) -> Result<Owner> {
        self.start(false, Vec::new()).await
    }

    /// Like [`NamedSandbox::start_attached`], with values for secrets (see
    /// [`NamedSandbox::start_detached_with`]).
    pub async fn start_attached_with(&self, values: Vec<(SecretName, SecretValue)>) -> Result<Owner> {
        self.start(false, values).await
    }

    async fn start(&self, detached: bool, mut given: Vec<(SecretName, SecretValue)>) -> Result<Owner> {
        // Every value is read before anything starts: a missing one fails here, naming it.
        let rec = self.record()?;
        let mut values = Vec::new();
        for spec in &rec.config.secrets {
            values.push((spec.name.clone(), crate::secrets::resolve(spec, &mut given)?));
        }
        let store = self.msb.reconciled_store()?;
        let rec = store.claim_start(self.name())?;
        let config = rec.config.clone();
        let launch = Launch {
            name: self.name.clone(),
            home: self.msb.home.clone(),
            config: config.clone(),
            detached,
            ephemeral: rec.ephemeral,
        };
        let spawned = self.spawn(&launch, &values);
        drop(values); // wiped
        let (mut child, stdin, stdout) = match spawned {
            Ok(v) => v,
            Err(e) => {
                let _ = store.mark_stopped(self.name(), Status::Stopped, &format!("failed to start: {e}"));
                return Err(e);
            }
        };
        let process = ProcessId::of(child.id());
        if let Some(p) = process {
            let _ = store.set_process(self.name(), p);
        }
        let wait = Duration::from_secs(config.boot_timeout_secs.saturating_add(30));
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            line
        });
        let line = match tokio::time::timeout(wait, line).await {
            Ok(Ok(l)) => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = self.msb.reconciled_store();
                return Err(Error::Spawn(format!(
                    "sandbox process did not report within {wait:?}; see {}",
                    self.vmm_log().display()
                )));
            }
        };
        // The jailed process holds no handle on the store: its client records what it says.
        match serde_json::from_str::<Announce>(&line) {
            Ok(Announce { ok: true, .. }) => {
                if let Some(p) = process {
                    store.mark_running(self.name(), p)?;
                }
                Ok(Owner { child, owner_pipe: (!detached).then_some(stdin) })
            }
            Ok(Announce { error, .. }) => {
                let _ = child.wait();
                let why = error.unwrap_or_else(|| "the sandbox failed to start".into());
                let _ = store.mark_stopped(self.name(), Status::Stopped, &format!("failed to start: {why}"));
                if rec.ephemeral && store.remove(self.name()).is_ok() {
                    let _ = std::fs::remove_dir_all(self.dir());
                }
                Err(Error::StartFailed(why))
            }
            Err(_) => {
                let _ = child.wait();
                let _ = self.msb.reconciled_store();
                let why = process.and_then(|p| read_exit_report(&paths::exit_path(&self.msb.home, &self.name), p));
                Err(Error::Spawn(format!(
                    "the sandbox process exited before it was up{}; see {}",
                    why.map(|w| format!(" ({w})")).unwrap_or_default(),
                    self.vmm_log().display()
                )))
            }
        }
    }

    fn vmm_log(&self) -> PathBuf {
        self.dir().join("vmm.log")
    }

    fn spawn(
        &self,
        launch: &Launch,
        values: &[(SecretName, SecretValue)],
    ) -> Result<(Child, ChildStdin, std::process::ChildStdout)> {
        let dir = self.dir();
        private_dir(&dir).map_err(|e| Error::Spawn(format!("creating {}: {e}", dir.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(self.vmm_log())
            .map_err(|e| Error::Spawn(format!("opening {}: {e}", self.vmm_log().display())))?;
        let bin = msb_binary(&self.msb.home)?;
        // A cleared environment: only what the sandbox process reads passes, so a secret's
        // source variable never stays in its /proc/PID/environ.
        let sources: Vec<&str> = launch
            .config
            .secrets
            .iter()
            .filter_map(|s| match &s.source {
                msb_schema::secret::SecretSource::Env(v) => Some(v.as_str()),
                _ => None,
            })
            .collect();
        let kept = std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy();
            let ours = k.starts_with("MSB_")
                || k.starts_with("SSL_CERT_")
                || matches!(&*k, "PATH" | "HOME" | "RUST_LOG" | "TMPDIR" | "USER" | "LANG");
            ours && !sources.contains(&&*k)
        });
        let mut child = Command::new(&bin)
            .arg(SANDBOX_PROCESS_ARG)
            .env_clear()
            .envs(kept)
            .env("MSB_HOME", &self.msb.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Spawn(format!("running {}: {e}", bin.display())))?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let json = serde_json::to_string(launch).map_err(|e| Error::Config(e.to_string()))?;
        writeln!(stdin, "{json}").map_err(|e| Error::Spawn(format!("configuring the sandbox process: {e}")))?;
        crate::secrets::write_frame(&mut stdin, values)
            .map_err(|e| Error::Spawn(format!("handing the sandbox process its secrets: {e}")))?;
        Ok((child, stdin, stdout))
    }

    /// Connects to the sandbox process. The socket exists only while it runs, so the store is
    /// consulted (and reconciled) only to explain a failure, not on every exec.
    async fn connect(&self) -> Result<UnixStream> {
        let sock = paths::socket_path(&self.msb.home, &self.name);
        let connected = tokio::time::timeout(self.msb.answer_timeout, UnixStream::connect(&sock)).await.map_err(|_| {
            Error::Wire(format!(
                "the sandbox process of {} did not accept a connection on {} within {:.0}s; it may be stuck (`msb stop --force {}` ends it)",
                self.name,
                sock.display(),
                self.msb.answer_timeout.as_secs_f32(),
                self.name
            ))
        })?;
        let err = match connected {
            Ok(s) => {
                check_peer(&s)?;
                return Ok(s);
            }
            Err(e) => e,
        };
        let rec = self.record()?;
        if rec.status != Status::Running {
            return Err(StoreError::WrongStatus {
                name: self.name().to_string(),
                status: rec.status,
                action: Action::Connect,
            }
            .into());
        }
        Err(Error::Wire(format!("connecting to {}: {err}", sock.display())))
    }

    /// Sends `msg` and waits at most [`ANSWER_TIMEOUT`] for the first answer, saying `what`
    /// it waited for if none comes.
    async fn ask(
        &self,
        msg: &ClientMsg,
        what: &str,
    ) -> Result<(Option<ServerMsg>, Reader<tokio::net::unix::OwnedReadHalf>, tokio::net::unix::OwnedWriteHalf)> {
        let (rd, mut wr) = self.connect().await?.into_split();
        let late = || {
            Error::Wire(format!(
                "the sandbox process of {} did not answer {what} within {:.0}s; it may be stuck (`msb stop --force {}` ends it)",
                self.name,
                self.msb.answer_timeout.as_secs_f32(),
                self.name
            ))
        };
        tokio::time::timeout(self.msb.answer_timeout, wire::send(&mut wr, msg)).await.map_err(|_| late())??;
        let mut reader = Reader::new(rd);
        let answer =
            tokio::time::timeout(self.msb.answer_timeout, reader.next::<ServerMsg>()).await.map_err(|_| late())??;
        Ok((answer, reader, wr))
    }

    /// Starts a streaming exec. With `stdin`, input stays open for [`RemoteExec::write_stdin`].
    pub async fn exec_stream(&self, spec: ExecSpec, stdin: bool) -> Result<RemoteExec> {
        let mut spec = spec;
        let initial = spec.stdin.take();
        let keep_stdin = stdin || initial.is_some();
        let (answer, reader, wr) = self.ask(&ClientMsg::Exec { spec, keep_stdin }, "the start of a command").await?;
        let id = match answer {
            Some(ServerMsg::Started { id }) => id,
            Some(ServerMsg::Event(ExecEvent::Failed(e))) => return Err(e.into()),
            Some(ServerMsg::Refused(why)) => return Err(ExecError::Refused(why).into()),
            other => return Err(Error::Wire(format!("unexpected answer to exec: {other:?}"))),
        };
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        if let Some(data) = initial {
            // Written in the background (the caller reads output meanwhile); the lock is taken
            // now, so the caller's own input queues behind it.
            let mut guard = wr.clone().lock_owned().await;
            tokio::spawn(async move {
                for chunk in data.chunks(STDIN_CHUNK) {
                    if wire::send(&mut *guard, &ClientMsg::Stdin(chunk.to_vec())).await.is_err() {
                        return;
                    }
                }
                if !stdin {
                    let _ = wire::send(&mut *guard, &ClientMsg::Stdin(Vec::new())).await;
                }
            });
        }
        Ok(RemoteExec { id, events: ExecEvents { reader }, input: ExecInput { wr } })
    }

    /// Runs a command and collects its output (at most
    /// [`MAX_BUFFERED_OUTPUT`] bytes).
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecOutput> {
        Ok(self.exec_stream(spec, false).await?.wait().await?)
    }

    /// Stops it: graceful within `graceful`, then forced. A stopped sandbox is left as is. If
    /// the sandbox process itself does not answer, it is killed (SIGKILL).
    pub async fn stop(&self, graceful: Duration) -> Result<String> {
        match self.request_stop(Some(graceful)).await {
            Err(Error::Wire(why)) => self.kill_process(&why).await,
            r => r,
        }
    }

    /// Stops it at once. If its process does not answer, it is killed (SIGKILL).
    pub async fn kill(&self) -> Result<String> {
        match self.request_stop(None).await {
            Err(Error::Wire(why)) => self.kill_process(&why).await,
            r => r,
        }
    }

    /// SIGKILL for a sandbox process that does not answer; the store then records it crashed.
    async fn kill_process(&self, why: &str) -> Result<String> {
        tracing::warn!(sandbox = %self.name, "{why}; killing its process");
        // Only a live process with the recorded start time, run by this user from the msb
        // binary, is signalled: a pid in the store is a claim, not a proof.
        let bin = msb_binary(&self.msb.home)?;
        if let Some(p) = self.record()?.process.filter(|p| p.is_our_process(&bin)) {
            if let Some(pid) = rustix::process::Pid::from_raw(p.pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            for _ in 0..50 {
                if !p.is_alive() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.msb.reconciled_store()?;
        Ok(format!("killed its process ({why})"))
    }

    async fn request_stop(&self, graceful: Option<Duration>) -> Result<String> {
        let rec = self.record()?;
        if !rec.status.is_live() {
            return Ok(format!("already {}", rec.status));
        }
        if rec.status == Status::Starting {
            // No socket yet: nothing can be asked, the process (if any) is stopped by force.
            return Err(Error::Wire("it is still starting".into()));
        }
        let (rd, mut wr) = self.connect().await?.into_split();
        let graceful_ms = graceful.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        wire::send(&mut wr, &ClientMsg::Stop { graceful_ms }).await?;
        // The sandbox process forces the VM after `graceful`; one that does not answer well
        // after that is itself stuck (and `kill` falls back to SIGKILL).
        let patience = graceful.map_or(KILL_ANSWER_GRACE, |g| g.saturating_add(STOP_ANSWER_GRACE));
        let answer = tokio::time::timeout(patience, Reader::new(rd).next::<ServerMsg>()).await;
        let reason = match answer {
            Ok(Ok(Some(ServerMsg::Stopped { reason }))) => reason.to_string(),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(other)) => return Err(Error::Wire(format!("unexpected answer to stop: {other:?}"))),
            Err(_) => return Err(Error::Wire(format!("the sandbox process did not stop within {patience:?}"))),
        };
        // The process records the stop as it exits; wait for that so that the next command
        // sees it.
        for _ in 0..100 {
            if !self.record().map(|r| r.status.is_live()).unwrap_or(false) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(reason)
    }

    /// Turns an attached sandbox into a detached one: it keeps running when its owner (the
    /// [`Owner`] from [`NamedSandbox::start_attached`]) goes away.
    pub async fn release(&self) -> Result<()> {
        let (rd, mut wr) = self.connect().await?.into_split();
        wire::send(&mut wr, &ClientMsg::Release).await?;
        match Reader::new(rd).next::<ServerMsg>().await? {
            Some(ServerMsg::Released) => Ok(()),
            other => Err(Error::Wire(format!("unexpected answer to release: {other:?}"))),
        }
    }

    /// What the sandbox process says about itself.
    pub async fn info(&self) -> Result<Info> {
        match self.ask(&ClientMsg::Info, "a request for its state").await?.0 {
            Some(ServerMsg::Info(i)) => Ok(i),
            other => Err(Error::Wire(format!("unexpected answer to info: {other:?}"))),
        }
    }

    /// The egress policy in force in the running sandbox, as policy-file text (empty: it has
    /// no network).
    pub async fn live_policy(&self) -> Result<String> {
        match self.ask(&ClientMsg::Policy, "a request for its policy").await?.0 {
            Some(ServerMsg::Policy(p)) => Ok(p),
            other => Err(Error::Wire(format!("unexpected answer to a policy query: {other:?}"))),
        }
    }

    /// Replaces the sandbox's egress policy (policy-file text; `None`: the default): in the
    /// running sandbox first, closing the flows it now denies, then in its record, so later
    /// starts use it too. A sandbox that is starting is refused (try again once it runs);
    /// one with `--net none` has no policy to change. Returns whether it was changed live.
    pub async fn set_policy(&self, policy: Option<String>) -> Result<bool> {
        let rec = self.record()?;
        if rec.config.net.none {
            return Err(Error::Config(format!("{} has no network (--net none): it has no policy", self.name)));
        }
        let live = match rec.status {
            Status::Starting => {
                return Err(Error::Config(format!("{} is starting: change its policy once it runs", self.name)))
            }
            s if s.is_live() => {
                // The dialer may open what either policy allows while the change is under
                // way, then what the one in force does.
                let before = self.grants();
                let mut during = before.clone();
                during.policies.retain(|p| *p != policy);
                during.policies.push(policy.clone());
                let excess = during.policies.len().saturating_sub(msb_schema::net::MAX_GRANT_POLICIES);
                during.policies.drain(..excess);
                self.write_grants(&during)?;
                match self.ask(&ClientMsg::SetPolicy { policy: policy.clone() }, "a policy change").await?.0 {
                    Some(ServerMsg::Policy(_)) => {
                        self.write_grants(&msb_schema::net::Grants { policies: vec![policy.clone()], ..during })?;
                        true
                    }
                    Some(ServerMsg::Refused(why)) => {
                        self.write_grants(&before)?;
                        return Err(Error::Config(format!("the new policy: {why}")));
                    }
                    other => return Err(Error::Wire(format!("unexpected answer to a policy change: {other:?}"))),
                }
            }
            _ => false,
        };
        let mut config = rec.config;
        config.net.policy = policy;
        self.msb.reconciled_store()?.set_config(self.name(), &config)?;
        Ok(live)
    }

    /// The secrets of the running sandbox as its vault holds them (names, hosts,
    /// placeholders, whether locked; never values).
    pub async fn secrets(&self) -> Result<Vec<msb_schema::secret::SecretInfo>> {
        self.secret_op(wire::SecretOp::List).await
    }

    async fn secret_op(&self, op: wire::SecretOp) -> Result<Vec<msb_schema::secret::SecretInfo>> {
        match self.ask(&ClientMsg::Secret(op), "a secret change").await?.0 {
            Some(ServerMsg::Secrets(list)) => Ok(list),
            Some(ServerMsg::Refused(why)) => Err(Error::Config(why)),
            other => Err(Error::Wire(format!("unexpected answer to a secret change: {other:?}"))),
        }
    }

    fn spec_index(config: &SandboxConfig, name: &SecretName) -> Result<usize> {
        config
            .secrets
            .iter()
            .position(|s| s.name == *name)
            .ok_or_else(|| Error::Config(format!("no secret named {name} in this sandbox (`msb inspect` lists them)")))
    }

    /// A new value for secret `name`: used by the running sandbox from its next request
    /// (kept-alive connections included). With `source`, the record reads the value from
    /// there at later starts (else from where it did).
    pub async fn secret_set(
        &self,
        name: &SecretName,
        value: SecretValue,
        source: Option<msb_schema::secret::SecretSource>,
    ) -> Result<bool> {
        let rec = self.record()?;
        let i = Self::spec_index(&rec.config, name)?;
        let live = rec.status.is_live();
        if live {
            let op = wire::SecretOp::Set { name: name.clone(), value: wire::WireValue(value.expose().to_vec()) };
            self.secret_op(op).await?;
        }
        if let Some(src) = source {
            let mut config = rec.config;
            config.secrets[i].source = src;
            self.msb.reconciled_store()?.set_config(self.name(), &config)?;
        }
        Ok(live)
    }

    /// New hosts for secret `name`: live from the next request, and recorded.
    pub async fn secret_hosts(&self, name: &SecretName, hosts: Vec<msb_schema::secret::SecretHost>) -> Result<bool> {
        let rec = self.record()?;
        let i = Self::spec_index(&rec.config, name)?;
        let mut config = rec.config.clone();
        config.secrets[i].hosts = hosts.clone();
        config.secrets[i].check().map_err(|e| Error::Config(e.to_string()))?;
        let live = rec.status.is_live();
        if live {
            self.secret_op(wire::SecretOp::Hosts { name: name.clone(), hosts }).await?;
        }
        self.msb.reconciled_store()?.set_config(self.name(), &config)?;
        Ok(live)
    }

    /// Removes secret `name`: live from the next request (its placeholder then goes out
    /// unchanged), and from the record.
    pub async fn secret_rm(&self, name: &SecretName) -> Result<bool> {
        let rec = self.record()?;
        let i = Self::spec_index(&rec.config, name)?;
        let live = rec.status.is_live();
        if live {
            self.secret_op(wire::SecretOp::Remove { name: name.clone() }).await?;
        }
        let mut config = rec.config;
        config.secrets.remove(i);
        self.msb.reconciled_store()?.set_config(self.name(), &config)?;
        Ok(live)
    }

    /// Publishes a port: on the running sandbox at once (a taken address is refused), and in
    /// its record for later starts. Returns the ports published now (empty when it is not
    /// running: the port opens at its next start).
    pub async fn publish(&self, p: wire::Publish) -> Result<Vec<wire::Publish>> {
        self.change_ports(ClientMsg::Publish(p), |ports| {
            if ports.len() >= msb_schema::net::MAX_PUBLISHED {
                return Err(format!("at most {} published ports per sandbox", msb_schema::net::MAX_PUBLISHED));
            }
            ports.push(p);
            Ok(())
        })
        .await
    }

    /// Closes the published `proto` ports leading to guest port `guest`, live and in the
    /// record. TCP connections made through them stay up; a UDP port's peers go with it.
    pub async fn unpublish(&self, proto: PortProto, guest: u16) -> Result<Vec<wire::Publish>> {
        self.change_ports(ClientMsg::Unpublish { guest, proto }, |ports| {
            let before = ports.len();
            ports.retain(|p| (p.proto, p.guest) != (proto, guest));
            if ports.len() == before {
                return Err(format!("no published port leads to guest port {guest}/{proto}"));
            }
            Ok(())
        })
        .await
    }

    async fn change_ports(
        &self,
        live: ClientMsg,
        record: impl FnOnce(&mut Vec<wire::Publish>) -> std::result::Result<(), String>,
    ) -> Result<Vec<wire::Publish>> {
        let rec = self.record()?;
        if rec.config.net.none {
            return Err(Error::Config(format!("{} has no network (--net none): it has no ports", self.name)));
        }
        let mut config = rec.config;
        record(&mut config.net.publish).map_err(Error::Config)?;
        let now = match rec.status {
            Status::Starting => {
                return Err(Error::Config(format!("{} is starting: change its ports once it runs", self.name)))
            }
            s if s.is_live() => {
                // The dialer binds only what the grants publish: the new port first, then
                // exactly the ports published now (a port 0 as the one picked).
                let before = self.grants();
                let mut during = before.clone();
                if let ClientMsg::Publish(p) = &live {
                    during.publish.push((p.proto, p.host));
                    self.write_grants(&during)?;
                }
                match self.ask(&live, "a port change").await?.0 {
                    Some(ServerMsg::Ports(p)) => {
                        during.publish = p.iter().map(|p| (p.proto, p.host)).collect();
                        self.write_grants(&during)?;
                        p
                    }
                    Some(ServerMsg::Refused(why)) => {
                        self.write_grants(&before)?;
                        return Err(Error::Config(why));
                    }
                    other => return Err(Error::Wire(format!("unexpected answer to a port change: {other:?}"))),
                }
            }
            _ => Vec::new(),
        };
        self.msb.reconciled_store()?.set_config(self.name(), &config)?;
        Ok(now)
    }

    /// Deletes it and its files; `force` kills it first if it is running.
    pub async fn remove(&self, force: bool) -> Result<()> {
        match self.record() {
            Ok(rec) if force && rec.status.is_live() => drop(self.kill().await?),
            // An unreadable record cannot be live-checked; the store deletes it.
            Ok(_) | Err(Error::Store(StoreError::Corrupt(..))) => {}
            Err(e) => return Err(e),
        }
        self.msb.reconciled_store()?.remove(self.name())?;
        let _ = std::fs::remove_dir_all(self.dir());
        let _ = std::fs::remove_file(paths::grants_path(&self.msb.home, &self.name));
        Ok(())
    }
}

/// A running exec in a named sandbox: its events and its input, which
/// [`RemoteExec::split`] separates for concurrent use. Dropping it detaches (the command runs on).
pub struct RemoteExec {
    id: u64,
    events: ExecEvents,
    input: ExecInput,
}

/// The output side of a [`RemoteExec`].
pub struct ExecEvents {
    reader: Reader<tokio::net::unix::OwnedReadHalf>,
}

/// The input side of a [`RemoteExec`]: stdin, signals, terminal size. Read events on
/// another task while writing large input: the sandbox takes input only as fast as the
/// command reads it. Clones share the connection.
#[derive(Clone)]
pub struct ExecInput {
    wr: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>,
}

impl ExecEvents {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        match self.reader.next::<ServerMsg>().await {
            Ok(Some(ServerMsg::Event(ev))) => Some(ev),
            Ok(Some(ServerMsg::Refused(why))) => Some(ExecEvent::Failed(ExecError::Refused(why))),
            Ok(Some(other)) => {
                Some(ExecEvent::Failed(ExecError::Disconnected(format!("unexpected message {other:?}"))))
            }
            Ok(None) => None,
            Err(e) => Some(ExecEvent::Failed(ExecError::Disconnected(e.to_string()))),
        }
    }
}

impl ExecInput {
    /// Sends stdin (in chunks of at most [`STDIN_CHUNK`]).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        let mut wr = self.wr.lock().await;
        for chunk in data.chunks(STDIN_CHUNK) {
            wire::send(&mut *wr, &ClientMsg::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: ClientMsg) -> Result<()> {
        wire::send(&mut *self.wr.lock().await, &msg).await
    }

    pub async fn close_stdin(&mut self) -> Result<()> {
        self.send(ClientMsg::Stdin(Vec::new())).await
    }

    /// Sends a signal (1..=64) to the command's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        self.send(ClientMsg::Signal(signal)).await
    }

    /// Resizes the command's terminal.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.send(ClientMsg::Resize(WinSize { rows, cols })).await
    }
}

impl RemoteExec {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub async fn next(&mut self) -> Option<ExecEvent> {
        self.events.next().await
    }

    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        self.input.write_stdin(data).await
    }

    pub async fn close_stdin(&mut self) -> Result<()> {
        self.input.close_stdin().await
    }

    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        self.input.signal(signal).await
    }

    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.input.resize(rows, cols).await
    }

    pub fn split(self) -> (ExecEvents, ExecInput) {
        (self.events, self.input)
    }

    /// Leaves the command running and closes the connection.
    pub fn detach(self) {}

    /// Collects the rest of the output (at most
    /// [`MAX_BUFFERED_OUTPUT`] bytes) and the exit
    /// status.
    pub async fn wait(mut self) -> std::result::Result<ExecOutput, ExecError> {
        let mut out = OutputCollector::new(MAX_BUFFERED_OUTPUT);
        while let Some(ev) = self.next().await {
            if let Some(done) = out.take(ev) {
                return done;
            }
        }
        Err(ExecError::Disconnected("the sandbox process closed the session without an exit status".into()))
    }
}

/// How long a client waits for a sandbox process to accept a connection, answer a question
/// (info, policy, ports) or start an exec.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long past the graceful timeout a client waits for a sandbox process to report a stop.
pub const STOP_ANSWER_GRACE: Duration = Duration::from_secs(30);
/// How long a client waits for a sandbox process to report a kill.
pub const KILL_ANSWER_GRACE: Duration = Duration::from_secs(10);

/// The hidden first argument with which `msb` runs as a sandbox process.
pub const SANDBOX_PROCESS_ARG: &str = "__sandbox-process";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_validates_before_recording_anything() {
        let dir = tempfile::tempdir().unwrap();
        let msb = Msb::at(dir.path());
        assert!(matches!(msb.create("a/b", SandboxConfig::default()), Err(Error::Name(_))));
        assert!(matches!(msb.create("web", SandboxConfig { cpus: 0, ..Default::default() }), Err(Error::Size(_))));
        assert!(msb.list().unwrap().is_empty(), "nothing half-created");
        let sb = msb.create("web", SandboxConfig::default()).unwrap();
        assert_eq!(sb.record().unwrap().status, Status::Created);
        assert!(matches!(msb.create("web", SandboxConfig::default()), Err(Error::Store(StoreError::Exists(_)))));
        let gen = msb.create_generated("sb", SandboxConfig::default()).unwrap();
        assert!(gen.name().starts_with("sb-") && !gen.record().unwrap().ephemeral);
        assert!(msb.create_ephemeral(SandboxConfig::default()).unwrap().record().unwrap().ephemeral);
    }

    #[tokio::test]
    async fn exec_on_a_sandbox_that_is_not_running_says_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let msb = Msb::at(dir.path());
        let sb = msb.create("idle", SandboxConfig::default()).unwrap();
        match sb.exec(ExecSpec::command(["true"])).await {
            Err(Error::Store(StoreError::WrongStatus { status: Status::Created, action: Action::Connect, .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_graceful_time_too_long_to_add_to_saturates_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let msb = Msb::at(dir.path());
        let sb = msb.create("s", SandboxConfig::default()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.claim_start("s").unwrap();
        store.mark_running("s", ProcessId::current().unwrap()).unwrap();
        std::fs::create_dir_all(sb.dir()).unwrap();
        let listener = tokio::net::UnixListener::bind(paths::socket_path(dir.path(), &sb.name)).unwrap();
        let home = dir.path().to_path_buf();
        // Stands in for the sandbox process: answers one stop and records it.
        let server = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = conn.into_split();
            let asked = Reader::new(rd).next::<ClientMsg>().await.unwrap();
            Store::open(&home).unwrap().mark_stopped("s", Status::Stopped, "shut down on request").unwrap();
            wire::send(&mut wr, &ServerMsg::Stopped { reason: msb_schema::StopReason::Shutdown }).await.unwrap();
            asked
        });
        assert_eq!(sb.stop(Duration::MAX).await.unwrap(), "shut down on request");
        assert_eq!(server.await.unwrap(), Some(ClientMsg::Stop { graceful_ms: Some(u64::MAX) }));
    }

    /// A sandbox process that accepts and never answers leaves no command waiting for ever:
    /// each question gives up after the answer timeout and says what it waited for.
    #[tokio::test]
    async fn a_sandbox_process_that_never_answers_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let msb = Msb::at(dir.path()).answer_timeout(Duration::from_millis(300));
        let sb = msb.create("mute", SandboxConfig::default()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.claim_start("mute").unwrap();
        store.mark_running("mute", ProcessId::current().unwrap()).unwrap();
        std::fs::create_dir_all(sb.dir()).unwrap();
        let listener = tokio::net::UnixListener::bind(paths::socket_path(dir.path(), &sb.name)).unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                held.push(c); // accepted, never answered
            }
        });
        let t0 = std::time::Instant::now();
        let e = sb.info().await.unwrap_err().to_string();
        assert!(e.contains("did not answer a request for its state"), "{e}");
        let e = sb.exec(ExecSpec::command(["echo", "hi"])).await.unwrap_err().to_string();
        assert!(e.contains("did not answer the start of a command"), "{e}");
        let e = sb.live_policy().await.unwrap_err().to_string();
        assert!(e.contains("did not answer a request for its policy") && e.contains("msb stop --force mute"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        server.abort();
    }

    #[test]
    fn a_socket_path_too_long_for_sun_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(90));
        let msb = Msb::at(&deep);
        assert!(matches!(msb.create(&"n".repeat(40), SandboxConfig::default()), Err(Error::Config(_))));
    }
}

#[cfg(test)]
mod exit_report_tests {
    use super::*;

    #[test]
    fn a_live_starting_sandbox_with_its_socket_is_running() {
        let home = tempfile::tempdir().unwrap();
        let msb = Msb::at(home.path());
        msb.create("orphaned", SandboxConfig::default()).unwrap();
        let store = Store::open(home.path()).unwrap();
        store.claim_start("orphaned").unwrap();
        store.set_process("orphaned", ProcessId::current().unwrap()).unwrap();
        assert_eq!(msb.reconciled_store().unwrap().get("orphaned").unwrap().status, Status::Starting);
        let name = SandboxName::new("orphaned").unwrap();
        private_dir(&paths::sandbox_dir(home.path(), &name)).unwrap();
        std::fs::write(paths::socket_path(home.path(), &name), b"").unwrap();
        assert_eq!(msb.reconciled_store().unwrap().get("orphaned").unwrap().status, Status::Running);
    }

    #[test]
    fn an_exit_report_counts_only_for_the_process_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("exit");
        let p = ProcessId { pid: 42, start: 1000 };
        assert_eq!(read_exit_report(&f, p), None, "no file");
        std::fs::write(&f, "42 1000\nstopped by request\n").unwrap();
        assert_eq!(read_exit_report(&f, p).as_deref(), Some("stopped by request"));
        assert_eq!(read_exit_report(&f, ProcessId { pid: 42, start: 999 }), None, "a recycled pid");
        std::fs::write(&f, "42 1000\n").unwrap();
        assert_eq!(read_exit_report(&f, p), None, "said nothing (died before writing)");
        std::fs::write(&f, "42 1000\nfirst line\nsecond\n").unwrap();
        assert_eq!(read_exit_report(&f, p).as_deref(), Some("first line"));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_exit_report(&f, p), None);
    }
}
