//! The sandbox supervisor actor and the public [`Sandbox`] handle.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_devices::boot_timer::BootTimer;
use msb_devices::console_log::ConsoleReports;
use msb_devices::serial::SerialDevice;
use msb_hypervisor::VcpuStop;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::agent::{AgentClient, AgentMsg, ExecEvent, OutputCollector, StreamSink, STREAM_WINDOW};
use crate::console::{ConsoleArgs, ConsoleDevice, DeviceArgs, RngDevice};
use crate::machine::{Machine, MachineSpec};
use crate::vcpu::{VcpuActor, VcpuArgs, VcpuMsg};
use crate::{home, initramfs, Error, ExecOutput, ExecSpec, Result, StopReason};

/// Default time for a guest to become ready.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a graceful stop waits before forcing.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a sandbox. Defaults: 1 vCPU, 256 MiB, kernel and agent from `MSB_HOME`.
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    cpus: u8,
    memory_mib: u64,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    console_log: Option<PathBuf>,
    boot_timeout: Duration,
    extra_cmdline: String,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_mib: 256,
            kernel: None,
            initramfs: None,
            console_log: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            extra_cmdline: String::new(),
        }
    }
}

impl SandboxBuilder {
    pub fn cpus(mut self, n: u8) -> Self {
        self.cpus = n;
        self
    }
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn kernel(mut self, p: impl Into<PathBuf>) -> Self {
        self.kernel = Some(p.into());
        self
    }
    pub fn initramfs(mut self, p: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(p.into());
        self
    }
    /// Where the guest console is logged (default: not on disk, only a bounded tail in memory).
    pub fn console_log(mut self, p: impl Into<PathBuf>) -> Self {
        self.console_log = Some(p.into());
        self
    }
    pub fn boot_timeout(mut self, d: Duration) -> Self {
        self.boot_timeout = d;
        self
    }
    /// Extra kernel command-line arguments (appended).
    pub fn kernel_args(mut self, args: impl Into<String>) -> Self {
        self.extra_cmdline = args.into();
        self
    }

    /// Records a named sandbox with this configuration in the state store (not started; see
    /// [`crate::managed::NamedSandbox::start_detached`]). The console log path and initramfs
    /// are per-process settings and do not carry over.
    pub fn create_named(&self, name: &str) -> Result<crate::managed::NamedSandbox> {
        let config = crate::managed::SandboxConfig {
            image: None,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            kernel_args: (!self.extra_cmdline.is_empty()).then(|| self.extra_cmdline.clone()),
            boot_timeout_secs: self.boot_timeout.as_secs(),
        };
        crate::managed::Msb::from_env().create(name, config)
    }

    fn spec(&self) -> Result<MachineSpec> {
        let home = home::msb_home();
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => home::kernel(&home)?,
        };
        let initramfs = match &self.initramfs {
            Some(i) => i.clone(),
            None => initramfs::cached(&home, &home::agentd(&home)?, &home::busybox(&home)?)?,
        };
        Ok(MachineSpec {
            vcpus: self.cpus,
            memory_mib: self.memory_mib,
            kernel,
            initramfs,
            console_log: self.console_log.clone(),
            extra_cmdline: self.extra_cmdline.clone(),
        })
    }

    /// Boots the sandbox and waits until its agent is ready.
    pub async fn create(self) -> Result<Sandbox> {
        let clock = Instant::now();
        let spec = self.spec()?;
        let machine = tokio::task::spawn_blocking(move || Machine::build(&spec, clock))
            .await
            .map_err(|e| Error::Setup(format!("VM setup task: {e}")))??;
        let (sup, _) = Actor::spawn(None, Supervisor, machine).await.map_err(|e| Error::Setup(e.to_string()))?;
        let sb = Sandbox { sup, created: clock };
        let ready = tokio::time::timeout(self.boot_timeout, sb.call(SupMsg::WaitReady)).await;
        match ready {
            Ok(Ok(_agent)) => Ok(sb),
            Ok(Err(e)) => {
                let _ = sb.kill().await;
                Err(e)
            }
            Err(_) => {
                let tail = sb.console_tail().await.unwrap_or_default();
                let _ = sb.kill().await;
                Err(Error::BootTimeout { secs: self.boot_timeout.as_secs(), console_tail: tail })
            }
        }
    }
}

/// Figures of a sandbox, for benchmarks and diagnostics.
#[derive(Debug, Clone)]
pub struct BootTimes {
    /// From `create()` to the guest init's boot-timer write.
    pub to_init: Option<Duration>,
    /// Host virtual address ranges (start, length) backing guest RAM, so that a benchmark
    /// can tell the VMM's own memory from the guest's in `/proc/self/smaps`.
    pub guest_ram: Vec<(usize, u64)>,
}

/// A running sandbox. Dropping it kills the VM.
pub struct Sandbox {
    sup: ActorRef<SupMsg>,
    created: Instant,
}

impl Sandbox {
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// A named sandbox from the state store in `MSB_HOME` (running in its own process or not).
    pub fn get(name: &str) -> Result<crate::managed::NamedSandbox> {
        crate::managed::Msb::from_env().get(name)
    }

    /// Every named sandbox in the state store in `MSB_HOME`.
    pub fn list() -> Result<Vec<crate::state::Record>> {
        crate::managed::Msb::from_env().list()
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(RpcReplyPort<Result<T>>) -> SupMsg) -> Result<T> {
        match self.sup.call(f, None).await {
            Ok(ractor::rpc::CallResult::Success(Err(Error::Gone))) => self.why_gone().await,
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => self.why_gone().await,
        }
    }

    /// A request was dropped because the tree is going down: give the supervisor a moment
    /// to record why, and report that.
    async fn why_gone<T>(&self) -> Result<T> {
        let reason = match self.sup.call(SupMsg::Wait, Some(Duration::from_secs(5))).await {
            Ok(ractor::rpc::CallResult::Success(Ok(reason))) => reason,
            _ => return Err(Error::Gone),
        };
        let console_tail = match self.sup.call(SupMsg::ConsoleTail, None).await {
            Ok(ractor::rpc::CallResult::Success(Ok(t))) => t,
            _ => String::new(),
        };
        Err(Error::VmStopped { reason, console_tail })
    }

    /// Runs `program args…` and waits for it, collecting its output.
    pub async fn exec<I, S>(&self, program: &str, args: I) -> Result<ExecOutput>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut argv = vec![program.to_string()];
        argv.extend(args.into_iter().map(Into::into));
        self.exec_argv(argv, Vec::new(), None).await
    }

    /// Runs `argv` with extra environment and an optional working directory.
    pub async fn exec_argv(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
    ) -> Result<ExecOutput> {
        self.exec_spec(ExecSpec { argv, env, cwd, ..Default::default() }).await
    }

    /// Runs a command described in full (user, timeout, stdin, …) and collects its output.
    pub async fn exec_spec(&self, spec: ExecSpec) -> Result<ExecOutput> {
        self.call(|reply| SupMsg::Exec { spec, reply }).await
    }

    /// Starts a command and returns a handle that streams its output as it arrives and takes
    /// stdin and signals while it runs. `spec.stdin` is written first; stdin stays open until
    /// [`ExecHandle::close_stdin`].
    pub async fn exec_stream(&self, spec: ExecSpec) -> Result<ExecHandle> {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let unconsumed = Arc::new(AtomicUsize::new(0));
        let sink = StreamSink { events, unconsumed: unconsumed.clone() };
        let id = self.call(|reply| SupMsg::ExecStream { spec, sink, reply }).await?;
        Ok(ExecHandle { id, rx, unconsumed, sup: self.sup.clone() })
    }

    /// Asks the guest to sync and shut down, forcing it after the default timeout.
    pub async fn stop(&self) -> Result<StopReason> {
        self.stop_timeout(DEFAULT_STOP_TIMEOUT).await
    }

    pub async fn stop_timeout(&self, graceful: Duration) -> Result<StopReason> {
        let r = self.call(|reply| SupMsg::Stop { graceful: Some(graceful), reply }).await;
        self.sup.stop(None);
        r
    }

    /// Stops the VM at once.
    pub async fn kill(&self) -> Result<StopReason> {
        let r = self.call(|reply| SupMsg::Stop { graceful: None, reply }).await;
        self.sup.stop(None);
        r
    }

    /// Waits until the VM stops by itself (or is stopped).
    pub async fn wait(&self) -> Result<StopReason> {
        self.call(SupMsg::Wait).await
    }

    /// The last bytes the guest printed on its serial console.
    pub async fn console_tail(&self) -> Result<String> {
        self.call(SupMsg::ConsoleTail).await
    }

    /// Boot figures.
    pub async fn boot_times(&self) -> Result<BootTimes> {
        self.call(SupMsg::BootTimes).await
    }

    /// When `create()` started.
    pub fn created_at(&self) -> Instant {
        self.created
    }
}

/// A running streaming exec (see [`Sandbox::exec_stream`]).
pub struct ExecHandle {
    id: u64,
    rx: tokio::sync::mpsc::UnboundedReceiver<ExecEvent>,
    unconsumed: Arc<AtomicUsize>,
    sup: ActorRef<SupMsg>,
}

impl ExecHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the final `Exited`/`Failed`.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        let ev = self.rx.recv().await?;
        if let ExecEvent::Stdout(d) | ExecEvent::Stderr(d) = &ev {
            let before = self.unconsumed.fetch_sub(d.len(), Ordering::SeqCst);
            if before > STREAM_WINDOW && before - d.len() <= STREAM_WINDOW {
                let _ = self.sup.cast(SupMsg::StreamConsumed);
            }
        }
        Some(ev)
    }

    async fn call(&self, f: impl FnOnce(RpcReplyPort<Result<()>>) -> SupMsg) -> Result<()> {
        match self.sup.call(f, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(Error::Gone),
        }
    }

    /// Writes to the command's stdin; fails with `Error::StdinClosed` once it has exited.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let (id, data) = (self.id, data.to_vec());
        self.call(|reply| SupMsg::Stdin { id, data, reply }).await
    }

    /// Closes the command's stdin (it reads end of file).
    pub async fn close_stdin(&self) -> Result<()> {
        let id = self.id;
        self.call(|reply| SupMsg::Stdin { id, data: Vec::new(), reply }).await
    }

    /// Sends a signal (1..=64) to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        let id = self.id;
        self.call(|reply| SupMsg::Signal { id, signal, reply }).await
    }

    /// Resizes the command's terminal (a PTY exec); the guest sees SIGWINCH.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let (id, size) = (self.id, msb_protocol::WinSize { rows, cols });
        self.call(|reply| SupMsg::Resize { id, size, reply }).await
    }

    /// Reads everything that is left and returns it with the exit status.
    pub async fn wait(mut self) -> Result<ExecOutput> {
        let mut out = OutputCollector::default();
        while let Some(ev) = self.next().await {
            if let Some(done) = out.take(ev) {
                return done;
            }
        }
        Err(Error::Gone)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.sup.cast(SupMsg::Kill);
    }
}

pub enum SupMsg {
    WaitReady(RpcReplyPort<Result<String>>),
    Exec {
        spec: ExecSpec,
        reply: RpcReplyPort<Result<ExecOutput>>,
    },
    Stop {
        graceful: Option<Duration>,
        reply: RpcReplyPort<Result<StopReason>>,
    },
    Wait(RpcReplyPort<Result<StopReason>>),
    ConsoleTail(RpcReplyPort<Result<String>>),
    BootTimes(RpcReplyPort<Result<BootTimes>>),
    VcpuStopped(VcpuStop),
    /// The graceful stop ran out of time.
    StopTimeout,
    /// The handle was dropped.
    Kill,
    ExecStream {
        spec: ExecSpec,
        sink: StreamSink,
        reply: RpcReplyPort<Result<u64>>,
    },
    Stdin {
        id: u64,
        data: Vec<u8>,
        reply: RpcReplyPort<Result<()>>,
    },
    Signal {
        id: u64,
        signal: i32,
        reply: RpcReplyPort<Result<()>>,
    },
    Resize {
        id: u64,
        size: msb_protocol::WinSize,
        reply: RpcReplyPort<Result<()>>,
    },
    StreamConsumed,
}

struct Supervisor;

/// Hands a request to the agent client; if it is gone, answers the request here with why.
fn forward(st: &SupState, msg: AgentMsg) {
    let back = match &st.running {
        Some(r) => match r.agent.cast(msg) {
            Err(ractor::MessagingErr::SendErr(m)) => Some(m),
            _ => None,
        },
        None => Some(msg),
    };
    let gone = || match &st.stopped {
        Some(r) => Error::VmStopped { reason: r.clone(), console_tail: st.serial.tail() },
        None => Error::Gone,
    };
    // Every request variant carries a reply port; answer it with why the agent is gone.
    match back {
        Some(AgentMsg::ExecStream { reply, .. }) => {
            let _ = reply.send(Err(gone()));
        }
        Some(AgentMsg::Stdin { reply, .. })
        | Some(AgentMsg::Signal { reply, .. })
        | Some(AgentMsg::Resize { reply, .. }) => {
            let _ = reply.send(Err(gone()));
        }
        Some(AgentMsg::WaitReady(reply)) => {
            let _ = reply.send(Err(gone()));
        }
        Some(AgentMsg::Exec { reply, .. }) => {
            let _ = reply.send(Err(gone()));
        }
        _ => {}
    }
}

struct Running {
    runners: Vec<ActorRef<VcpuMsg>>,
    agent: ActorRef<AgentMsg>,
    devices: Vec<ActorRef<crate::console::DeviceMsg>>,
    // Keeps the VM (fds, memory) alive until the vCPUs are stopped.
    _vm: msb_hypervisor::Vm,
}

struct SupState {
    running: Option<Running>,
    serial: Arc<SerialDevice>,
    reports: Arc<ConsoleReports>,
    boot_timer: Arc<BootTimer>,
    guest_ram: Vec<(usize, u64)>,
    stopped: Option<StopReason>,
    shutdown_requested: bool,
    waiters: Vec<RpcReplyPort<Result<StopReason>>>,
}

impl SupState {
    fn classify(&self, stop: VcpuStop) -> StopReason {
        let panicked = self.reports.panicked();
        match stop {
            VcpuStop::Reset | VcpuStop::PowerOff if self.shutdown_requested => StopReason::Shutdown,
            VcpuStop::Reset | VcpuStop::TripleFault if panicked => StopReason::GuestPanic,
            VcpuStop::Reset => StopReason::GuestReboot,
            VcpuStop::PowerOff => StopReason::GuestPowerOff,
            VcpuStop::TripleFault => StopReason::TripleFault,
            VcpuStop::Requested => StopReason::Killed,
            VcpuStop::DeviceFailure(why) => StopReason::DeviceFailure(why),
            VcpuStop::InternalError => StopReason::KvmError("KVM_EXIT_INTERNAL_ERROR".into()),
            VcpuStop::EntryFailure(r) => StopReason::KvmError(format!("VM entry failed, hardware reason {r:#x}")),
            VcpuStop::SystemEvent(t) => StopReason::KvmError(format!("unexpected system event {t}")),
            VcpuStop::Error(e) => StopReason::KvmError(e),
        }
    }

    /// Stops everything once; later calls do nothing.
    async fn finish(&mut self, reason: StopReason) {
        if self.stopped.is_some() {
            return;
        }
        tracing::info!(%reason, "sandbox VM stopped");
        self.stopped = Some(reason.clone());
        if let Some(mut running) = self.running.take() {
            for vcpu in std::mem::take(&mut running.runners) {
                let _ = vcpu.call(VcpuMsg::Stop, None).await;
                vcpu.stop(None);
            }
            // The agent fails its pending requests with the reason, then stops itself (a
            // stop signal would overtake the message and lose the reason).
            let _ = running.agent.cast(AgentMsg::VmStopped(reason.clone(), self.serial.tail()));
            for d in running.devices {
                d.stop(None);
            }
        }
        for w in self.waiters.drain(..) {
            let _ = w.send(Ok(reason.clone()));
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = Machine;

    async fn pre_start(&self, me: ActorRef<SupMsg>, m: Machine) -> std::result::Result<SupState, ActorProcessingErr> {
        let (agent, _) = Actor::spawn_linked(None, AgentClient, (), me.get_cell()).await?;
        let console_args = ConsoleArgs {
            device: DeviceArgs { transport: m.console.transport, notify: m.console.notify },
            agent: agent.get_derived(),
        };
        let (console, _) = Actor::spawn_linked(None, ConsoleDevice, console_args, me.get_cell()).await?;
        agent.cast(AgentMsg::Attach(console.get_derived()))?;
        let rng_args = DeviceArgs { transport: m.rng.transport, notify: m.rng.notify };
        let (rng, _) = Actor::spawn_linked(None, RngDevice, rng_args, me.get_cell()).await?;

        let mut runners = Vec::new();
        for vcpu in m.vcpus {
            let me2 = me.clone();
            let on_exit = Box::new(move |stop| {
                let _ = me2.cast(SupMsg::VcpuStopped(stop));
            });
            let args = VcpuArgs { vcpu, bus: m.bus.clone(), on_exit };
            let (vcpu, _) = Actor::spawn_linked(None, VcpuActor, args, me.get_cell()).await?;
            runners.push(vcpu);
        }
        tracing::debug!(cmdline = %m.cmdline, "sandbox VM started");
        let guest_ram = {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
            m.vm.memory()
                .iter()
                .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok().map(|p| (p as usize, r.len())))
                .collect()
        };
        Ok(SupState {
            running: Some(Running { runners, agent, devices: vec![console, rng], _vm: m.vm }),
            serial: m.serial,
            reports: m.reports,
            boot_timer: m.boot_timer,
            guest_ram,
            stopped: None,
            shutdown_requested: false,
            waiters: Vec::new(),
        })
    }

    async fn post_stop(&self, _: ActorRef<SupMsg>, st: &mut SupState) -> std::result::Result<(), ActorProcessingErr> {
        st.finish(StopReason::Killed).await;
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<SupMsg>,
        msg: SupMsg,
        st: &mut SupState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            // A child that is already gone hands the request back; it is answered here (the
            // supervisor never fails over it).
            SupMsg::WaitReady(reply) => forward(st, AgentMsg::WaitReady(reply)),
            SupMsg::Exec { spec, reply } => forward(st, AgentMsg::Exec { spec, reply }),
            SupMsg::ExecStream { spec, sink, reply } => forward(st, AgentMsg::ExecStream { spec, sink, reply }),
            SupMsg::Stdin { id, data, reply } => forward(st, AgentMsg::Stdin { id, data, reply }),
            SupMsg::Signal { id, signal, reply } => forward(st, AgentMsg::Signal { id, signal, reply }),
            SupMsg::Resize { id, size, reply } => forward(st, AgentMsg::Resize { id, size, reply }),
            SupMsg::StreamConsumed => forward(st, AgentMsg::StreamConsumed),
            SupMsg::Stop { graceful, reply } => {
                if let Some(r) = &st.stopped {
                    let _ = reply.send(Ok(r.clone()));
                    return Ok(());
                }
                st.waiters.push(reply);
                match (graceful, &st.running) {
                    (Some(timeout), Some(r)) if !st.shutdown_requested => {
                        st.shutdown_requested = true;
                        let (tx, rx) = ractor::concurrency::oneshot();
                        r.agent.cast(AgentMsg::Shutdown(tx.into()))?;
                        let me2 = me.clone();
                        tokio::spawn(async move {
                            // Either the agent refuses (not ready) or time runs out: force.
                            let acked = matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(Ok(()))));
                            if !acked {
                                let _ = me2.cast(SupMsg::StopTimeout);
                                return;
                            }
                            tokio::time::sleep(timeout).await;
                            let _ = me2.cast(SupMsg::StopTimeout);
                        });
                    }
                    (Some(_), Some(_)) => {}
                    _ => st.finish(StopReason::Killed).await,
                }
            }
            SupMsg::Wait(reply) => match &st.stopped {
                Some(r) => {
                    let _ = reply.send(Ok(r.clone()));
                }
                None => st.waiters.push(reply),
            },
            SupMsg::ConsoleTail(reply) => {
                let _ = reply.send(Ok(st.serial.tail()));
            }
            SupMsg::BootTimes(reply) => {
                let _ = reply.send(Ok(BootTimes { to_init: st.boot_timer.elapsed(), guest_ram: st.guest_ram.clone() }));
            }
            SupMsg::VcpuStopped(stop) => {
                let reason = st.classify(stop);
                st.finish(reason).await;
            }
            SupMsg::StopTimeout => st.finish(StopReason::Killed).await,
            SupMsg::Kill => {
                st.finish(StopReason::Killed).await;
                me.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        st: &mut SupState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                tracing::warn!(actor = ?who.get_id(), "sandbox component failed: {err}");
                st.finish(StopReason::DeviceFailure(err.to_string())).await;
            }
            SupervisionEvent::ActorTerminated(..) if st.stopped.is_none() => {
                st.finish(StopReason::DeviceFailure("a sandbox component stopped unexpectedly".into())).await;
            }
            _ => {}
        }
        Ok(())
    }
}
