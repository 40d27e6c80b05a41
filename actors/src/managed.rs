//! Named sandboxes that live in their own host process: create, find, list, start, stop,
//! remove, and exec into them from any process. The state store records them; each running
//! one is served by a sandbox process (see [`crate::server`]) on its Unix socket.
//!
//! ```no_run
//! # async fn demo() -> msb_actors::Result<()> {
//! use msb_actors::managed::{Msb, SandboxConfig};
//! let msb = Msb::from_env();
//! let sb = msb.create("web", SandboxConfig::default())?;
//! sb.start_detached().await?;
//! let out = msb.get("web")?.exec(msb_actors::ExecSpec { argv: vec!["uname".into()], ..Default::default() }).await?;
//! msb.get("web")?.stop(std::time::Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! Every command first reconciles the store (a sandbox whose process died is marked crashed).

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::control::{self, ClientMsg, ExecWire, Info, Reader, ServerMsg};
use crate::server::{self, Announce, Launch};
use crate::state::{validate_name, ProcessId, Record, Status, Store, StoreError};
use crate::{Error, ExecEvent, ExecOutput, ExecSpec, Result, WinSize};

/// How a named sandbox is built each time it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// The root file system image; only the built-in base image exists so far.
    pub image: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub boot_timeout_secs: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig { image: None, cpus: 1, memory_mib: 256, kernel: None, kernel_args: None, boot_timeout_secs: 60 }
    }
}

impl SandboxConfig {
    /// Checks the configuration before anything is recorded.
    pub fn validate(&self) -> Result<()> {
        if let Some(img) = &self.image {
            if img != "base" {
                return Err(Error::Config(format!(
                    "image {img:?} is not available: only the built-in \"base\" image (busybox) exists in this version"
                )));
            }
        }
        if self.cpus == 0 || self.cpus > 8 {
            return Err(Error::Config(format!("--cpus {}: choose 1 to 8", self.cpus)));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(Error::Config(format!("--memory {}: choose 64 to 65536 MiB", self.memory_mib)));
        }
        Ok(())
    }
}

/// The entry point: msb's home directory and its state store.
#[derive(Debug, Clone)]
pub struct Msb {
    home: PathBuf,
}

impl Msb {
    /// `$MSB_HOME`, default `~/.msb`.
    pub fn from_env() -> Self {
        Msb { home: crate::home::msb_home() }
    }

    pub fn at(home: impl Into<PathBuf>) -> Self {
        Msb { home: home.into() }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Opens the store and marks sandboxes whose process died as crashed.
    pub fn store(&self) -> Result<Store> {
        let s = Store::open(&self.home)?;
        for name in s.reconcile()? {
            tracing::warn!("sandbox {name}: its process died; marked crashed");
            let _ = std::fs::remove_file(server::socket_path(&self.home, &name));
        }
        Ok(s)
    }

    /// Records a new named sandbox (not started).
    pub fn create(&self, name: &str, config: SandboxConfig) -> Result<NamedSandbox> {
        self.create_with(name, config, false)
    }

    fn create_with(&self, name: &str, config: SandboxConfig, ephemeral: bool) -> Result<NamedSandbox> {
        validate_name(name)?;
        config.validate()?;
        let sock = server::socket_path(&self.home, name);
        if sock.as_os_str().len() > server::MAX_SOCKET_PATH {
            return Err(Error::Config(format!(
                "the control socket path {} is longer than {} bytes; use a shorter MSB_HOME or name",
                sock.display(),
                server::MAX_SOCKET_PATH
            )));
        }
        let json = serde_json::to_value(&config).map_err(|e| Error::Config(e.to_string()))?;
        self.store()?.insert(name, &json, ephemeral)?;
        Ok(NamedSandbox { msb: self.clone(), name: name.to_string() })
    }

    /// Records an ephemeral sandbox with a generated name (removed when it stops).
    pub fn create_ephemeral(&self, config: SandboxConfig) -> Result<NamedSandbox> {
        // Unique among live processes: pid plus the sub-second clock.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let name = format!("run-{}-{nanos:08x}", std::process::id());
        self.create_with(&name, config, true)
    }

    /// A recorded sandbox.
    pub fn get(&self, name: &str) -> Result<NamedSandbox> {
        validate_name(name)?;
        self.store()?.get(name)?;
        Ok(NamedSandbox { msb: self.clone(), name: name.to_string() })
    }

    /// Every recorded sandbox.
    pub fn list(&self) -> Result<Vec<Record>> {
        Ok(self.store()?.list()?)
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
    name: String,
}

/// Finds the `msb` binary that runs sandbox processes: `$MSB_BIN`, this executable if it is
/// `msb`, an `msb` beside it, then `$MSB_HOME/bin/msb`.
fn msb_binary(home: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MSB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Setup(format!("locating this executable: {e}")))?;
    if exe.file_name().is_some_and(|n| n == "msb") {
        return Ok(exe);
    }
    for c in [exe.with_file_name("msb"), home.join("bin/msb")] {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(Error::Missing("the msb binary (which runs sandbox processes) was not found; set MSB_BIN".into()))
}

impl NamedSandbox {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current record.
    pub fn record(&self) -> Result<Record> {
        Ok(self.msb.store()?.get(&self.name)?)
    }

    /// The directory with its logs and socket.
    pub fn dir(&self) -> PathBuf {
        server::sandbox_dir(&self.msb.home, &self.name)
    }

    /// Starts it in a sandbox process that outlives this process.
    pub async fn start_detached(&self) -> Result<()> {
        let owner = self.start(true).await?;
        // Reaped when it ends, so that a long-lived client does not collect zombies.
        std::thread::spawn(move || owner.wait());
        Ok(())
    }

    /// Starts it in a sandbox process that stops the sandbox when the returned [`Owner`] is
    /// dropped or this process exits.
    pub async fn start_attached(&self) -> Result<Owner> {
        self.start(false).await
    }

    async fn start(&self, detached: bool) -> Result<Owner> {
        let store = self.msb.store()?;
        let rec = store.claim_start(&self.name)?;
        let config: SandboxConfig = serde_json::from_value(rec.config.clone())
            .map_err(|e| Error::State(StoreError::Corrupt(self.name.clone(), e.to_string())))?;
        let launch = Launch {
            name: self.name.clone(),
            home: self.msb.home.clone(),
            config: config.clone(),
            detached,
            ephemeral: rec.ephemeral,
        };
        let spawned = self.spawn(&launch);
        let (mut child, stdin, stdout) = match spawned {
            Ok(v) => v,
            Err(e) => {
                let _ = store.mark_stopped(&self.name, Status::Stopped, &format!("failed to start: {e}"));
                return Err(e);
            }
        };
        if let Some(p) = ProcessId::of(child.id()) {
            let _ = store.set_process(&self.name, p);
        }
        let wait = Duration::from_secs(config.boot_timeout_secs + 30);
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
                let _ = self.msb.store();
                return Err(Error::Setup(format!(
                    "sandbox process did not report within {wait:?}; see {}",
                    self.vmm_log().display()
                )));
            }
        };
        match serde_json::from_str::<Announce>(&line) {
            Ok(Announce { ok: true, .. }) => Ok(Owner { child, owner_pipe: (!detached).then_some(stdin) }),
            Ok(Announce { error, .. }) => {
                let _ = child.wait();
                Err(Error::Remote(error.unwrap_or_else(|| "the sandbox failed to start".into())))
            }
            Err(_) => {
                let _ = child.wait();
                let _ = self.msb.store();
                Err(Error::Setup(format!(
                    "the sandbox process exited before it was up; see {}",
                    self.vmm_log().display()
                )))
            }
        }
    }

    fn vmm_log(&self) -> PathBuf {
        self.dir().join("vmm.log")
    }

    fn spawn(&self, launch: &Launch) -> Result<(Child, ChildStdin, std::process::ChildStdout)> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Setup(format!("creating {}: {e}", dir.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.vmm_log())
            .map_err(|e| Error::Setup(format!("opening {}: {e}", self.vmm_log().display())))?;
        let bin = msb_binary(&self.msb.home)?;
        let mut child = Command::new(&bin)
            .arg(SANDBOX_PROCESS_ARG)
            .env("MSB_HOME", &self.msb.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Setup(format!("starting {}: {e}", bin.display())))?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let json = serde_json::to_string(launch).map_err(|e| Error::Config(e.to_string()))?;
        writeln!(stdin, "{json}").map_err(|e| Error::Setup(format!("configuring the sandbox process: {e}")))?;
        Ok((child, stdin, stdout))
    }

    /// Connects to the sandbox process. The socket exists only while it runs, so the store is
    /// consulted (and reconciled) only to explain a failure, not on every exec.
    async fn connect(&self) -> Result<UnixStream> {
        let sock = server::socket_path(&self.msb.home, &self.name);
        let err = match UnixStream::connect(&sock).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let rec = self.record()?;
        if rec.status != Status::Running {
            return Err(StoreError::WrongStatus {
                name: self.name.clone(),
                status: rec.status,
                hint: "start it with `msb start`",
            }
            .into());
        }
        Err(Error::Control(format!("connecting to {}: {err}", sock.display())))
    }

    /// Starts a streaming exec. With `stdin`, input stays open for [`RemoteExec::write_stdin`].
    pub async fn exec_stream(&self, spec: ExecSpec, stdin: bool) -> Result<RemoteExec> {
        let (rd, mut wr) = self.connect().await?.into_split();
        let initial = spec.stdin.clone();
        control::send(&mut wr, &ClientMsg::Exec(ExecWire::from_spec(&spec, stdin || initial.is_some()))).await?;
        let mut reader = Reader::new(rd);
        let id = match reader.next::<ServerMsg>().await? {
            Some(ServerMsg::Started { id }) => id,
            Some(ServerMsg::Failed(e)) => return Err(e.into()),
            other => return Err(Error::Control(format!("unexpected answer to exec: {other:?}"))),
        };
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        if let Some(data) = initial {
            // Written in the background (the caller reads output meanwhile); the lock is taken
            // now, so the caller's own input queues behind it.
            let mut guard = wr.clone().lock_owned().await;
            tokio::spawn(async move {
                for chunk in data.chunks(control::STDIN_CHUNK) {
                    if control::send(&mut *guard, &ClientMsg::Stdin(chunk.to_vec())).await.is_err() {
                        return;
                    }
                }
                if !stdin {
                    let _ = control::send(&mut *guard, &ClientMsg::Stdin(Vec::new())).await;
                }
            });
        }
        Ok(RemoteExec { id, events: ExecEvents { reader }, input: ExecInput { wr } })
    }

    /// Runs a command and collects its output.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecOutput> {
        self.exec_stream(spec, false).await?.wait().await
    }

    /// Stops it: graceful within `graceful`, then forced. A stopped sandbox is left as is. If
    /// the sandbox process itself does not answer, it is killed (SIGKILL).
    pub async fn stop(&self, graceful: Duration) -> Result<String> {
        match self.request_stop(Some(graceful)).await {
            Err(Error::Control(why)) => self.kill_process(&why).await,
            r => r,
        }
    }

    /// Stops it at once. If its process does not answer, it is killed (SIGKILL).
    pub async fn kill(&self) -> Result<String> {
        match self.request_stop(None).await {
            Err(Error::Control(why)) => self.kill_process(&why).await,
            r => r,
        }
    }

    /// SIGKILL for a sandbox process that does not answer; the store then records it crashed.
    async fn kill_process(&self, why: &str) -> Result<String> {
        tracing::warn!(sandbox = %self.name, "{why}; killing its process");
        if let Some(p) = self.record()?.process.filter(|p| p.is_alive()) {
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
        self.msb.store()?;
        Ok(format!("killed its process ({why})"))
    }

    async fn request_stop(&self, graceful: Option<Duration>) -> Result<String> {
        let rec = self.record()?;
        if !rec.status.is_live() {
            return Ok(format!("already {}", rec.status));
        }
        let (rd, mut wr) = self.connect().await?.into_split();
        let graceful_ms = graceful.map(|d| d.as_millis() as u64);
        control::send(&mut wr, &ClientMsg::Stop { graceful_ms }).await?;
        // The sandbox process forces the VM after `graceful`; one that does not answer well
        // after that is itself stuck (and `kill` falls back to SIGKILL).
        let patience = graceful.map_or(KILL_ANSWER_GRACE, |g| g + STOP_ANSWER_GRACE);
        let answer = tokio::time::timeout(patience, Reader::new(rd).next::<ServerMsg>()).await;
        let reason = match answer {
            Ok(Ok(Some(ServerMsg::Stopped { reason }))) => reason,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(other)) => return Err(Error::Control(format!("unexpected answer to stop: {other:?}"))),
            Err(_) => return Err(Error::Control(format!("the sandbox process did not stop within {patience:?}"))),
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
        control::send(&mut wr, &ClientMsg::Release).await?;
        match Reader::new(rd).next::<ServerMsg>().await? {
            Some(ServerMsg::Released) => Ok(()),
            other => Err(Error::Control(format!("unexpected answer to release: {other:?}"))),
        }
    }

    /// What the sandbox process says about itself.
    pub async fn info(&self) -> Result<Info> {
        let (rd, mut wr) = self.connect().await?.into_split();
        control::send(&mut wr, &ClientMsg::Info).await?;
        match Reader::new(rd).next::<ServerMsg>().await? {
            Some(ServerMsg::Info(i)) => Ok(i),
            other => Err(Error::Control(format!("unexpected answer to info: {other:?}"))),
        }
    }

    /// Deletes it and its files; `force` kills it first if it is running.
    pub async fn remove(&self, force: bool) -> Result<()> {
        if force && self.record()?.status.is_live() {
            self.kill().await?;
        }
        self.msb.store()?.remove(&self.name)?;
        let _ = std::fs::remove_dir_all(self.dir());
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
/// another task while writing large input: the sandbox stops reading input while its output
/// is not read.
pub struct ExecInput {
    wr: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>,
}

impl ExecEvents {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        match self.reader.next::<ServerMsg>().await {
            Ok(Some(ServerMsg::Stdout(d))) => Some(ExecEvent::Stdout(d)),
            Ok(Some(ServerMsg::Stderr(d))) => Some(ExecEvent::Stderr(d)),
            Ok(Some(ServerMsg::Exited(s))) => Some(ExecEvent::Exited(s)),
            Ok(Some(ServerMsg::Failed(e))) => Some(ExecEvent::Failed(e.into())),
            Ok(Some(other)) => Some(ExecEvent::Failed(Error::Control(format!("unexpected message {other:?}")))),
            Ok(None) => None,
            Err(e) => Some(ExecEvent::Failed(e)),
        }
    }
}

impl ExecInput {
    /// Sends stdin (in chunks of at most [`control::STDIN_CHUNK`]).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        let mut wr = self.wr.lock().await;
        for chunk in data.chunks(control::STDIN_CHUNK) {
            control::send(&mut *wr, &ClientMsg::Stdin(chunk.to_vec())).await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: ClientMsg) -> Result<()> {
        control::send(&mut *self.wr.lock().await, &msg).await
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

    /// Collects the rest of the output and the exit status.
    pub async fn wait(mut self) -> Result<ExecOutput> {
        let mut out = crate::agent::OutputCollector::default();
        while let Some(ev) = self.next().await {
            if let Some(done) = out.take(ev) {
                return done;
            }
        }
        Err(Error::Control("the sandbox process closed the session without an exit status".into()))
    }
}

/// How long past the graceful timeout a client waits for a sandbox process to report a stop.
pub const STOP_ANSWER_GRACE: Duration = Duration::from_secs(30);
/// How long a client waits for a sandbox process to report a kill.
pub const KILL_ANSWER_GRACE: Duration = Duration::from_secs(10);

/// The hidden first argument with which `msb` runs as a sandbox process.
pub const SANDBOX_PROCESS_ARG: &str = "__sandbox-process";
