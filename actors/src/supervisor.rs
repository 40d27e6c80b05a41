//! The sandbox supervisor: owns the VM and its children, and is the one place that wires
//! them together with narrowed refs.
//!
//! Children and the refs each gets (see `wire`):
//! - `AgentClient`: a `ToConsole` ref to the console shell; `Sandbox` handles get an
//!   `AgentRequest` ref to it (exec traffic), the supervisor keeps the full ref (shutdown,
//!   VM stopped).
//! - one shell per row of the device table: the console shell gets a `GuestBytes` ref to the
//!   agent client; the rng shell gets nothing; the virtio-net shell gets a `GuestFrames` ref
//!   to the network gateway, which gets a `ToNet` ref back to it and nothing else; the
//!   supervisor keeps a `NetControl` ref to the gateway (live policy); each virtio-fs shell
//!   gets an `FsRequest` ref to its own mount's broker, which gets an `FsReply` ref back to
//!   that shell and nothing else.
//! - one `VcpuActor` per vCPU, reporting its exit to the supervisor.
//!
//! Policy (fails closed): any child that fails or stops on its own stops the VM with the
//! reason; nothing is restarted against a half-changed guest. The stop reason is recorded
//! once, in `SupState::finish`, and every waiter gets that one reason. Lifecycle calls
//! to children are bounded by [`LIFECYCLE_CALL_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use msb_devices::boot_timer::BootTimer;
use msb_devices::console_log::ConsoleReports;
use msb_devices::machine::VirtioParts;
use msb_devices::serial::SerialDevice;
use msb_devices::Machine;
use msb_hypervisor::VcpuStop;
use msb_schema::agent::AgentRequest;
use msb_schema::limits::LIFECYCLE_CALL_TIMEOUT;
use msb_schema::secret::VaultControl;
use msb_schema::{ExecError, StopReason};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort, SupervisionEvent};

use crate::agent::{AgentClient, AgentMsg};
use crate::devices::{BlkDevice, ConsoleArgs, ConsoleDevice, FsArgs, FsDevice, NetArgs, NetDevice, RngDevice};
use crate::vcpu::{VcpuActor, VcpuArgs, VcpuMsg};
use crate::BootTimes;
use msb_fs_broker::actor::{FsBroker, FsBrokerArgs};
use msb_net_gateway::actor::{GatewayArgs, GatewayMsg, NetGateway};
use msb_schema::fs::FsBrokerMsg;
use msb_schema::net::NetControl;

/// The supervisor's mailbox: lifecycle only (exec traffic goes to the agent client).
pub enum SupMsg {
    /// The narrowed ref through which a `Sandbox` handle sends exec traffic.
    AgentRef(RpcReplyPort<DerivedActorRef<AgentRequest>>),
    /// Answered once the guest agent is ready (with its name), or with why it never will be.
    /// The supervisor asks the agent before any vCPU runs, so the answer cannot be lost to a
    /// guest that stops right after its handshake.
    WaitReady(RpcReplyPort<Result<String, ExecError>>),
    /// The agent's answer to the supervisor's own readiness request.
    AgentReady(Result<String, ExecError>),
    /// Stop the VM: ask the guest to shut down within `graceful`, then force; `None` forces
    /// at once. Answered with the stop reason once the VM is down.
    Stop {
        graceful: Option<Duration>,
        reply: RpcReplyPort<StopReason>,
    },
    /// Answered with the stop reason once the VM is down.
    Wait(RpcReplyPort<StopReason>),
    /// The last bytes of the serial console.
    ConsoleTail(RpcReplyPort<String>),
    BootTimes(RpcReplyPort<BootTimes>),
    /// A vCPU thread left `KVM_RUN` for good.
    VcpuStopped(VcpuStop),
    /// The graceful stop ran out of time.
    StopTimeout,
    /// The handle was dropped: stop at once and end the tree.
    Kill,
    /// For the network gateway (answered `Err` when the sandbox has no network).
    Net(NetControl),
    /// For the secret vault (answered `Err` when the sandbox has no secrets).
    Vault(VaultControl),
}

/// What the supervisor is started with: the built VM, and the gateway's arguments when the
/// VM has a network device.
pub struct SupArgs {
    pub machine: Machine,
    pub net: Option<GatewayArgs>,
    /// One broker's arguments per virtio-fs device, in device order.
    pub mounts: Vec<FsBrokerArgs>,
    /// The secret vault, already running (the gateway's interceptor holds its query ref):
    /// linked here, stopped with the VM.
    pub vault: Option<VaultHandle>,
}

/// A running secret vault as the supervisor holds it: the cell (to link and stop) and the
/// ref narrowed to control.
pub struct VaultHandle {
    pub cell: ActorCell,
    pub control: DerivedActorRef<VaultControl>,
}

pub struct SandboxSupervisor;

struct Running {
    runners: Vec<ActorRef<VcpuMsg>>,
    agent: ActorRef<AgentMsg>,
    devices: Vec<ActorCell>,
    net: Option<DerivedActorRef<NetControl>>,
    vault: Option<DerivedActorRef<VaultControl>>,
    // Keeps the VM (fds, memory) alive until the vCPUs are stopped.
    vm: msb_hypervisor::Vm,
}

pub struct SupState {
    running: Option<Running>,
    /// Handed to every `Sandbox` handle; kept after the VM stops, so that a handle that asks
    /// late still gets a ref (its requests then fail with the stop reason).
    requests: DerivedActorRef<AgentRequest>,
    serial: Arc<SerialDevice>,
    reports: Arc<ConsoleReports>,
    boot_timer: Arc<BootTimer>,
    stopped: Option<StopReason>,
    shutdown_requested: bool,
    waiters: Vec<RpcReplyPort<StopReason>>,
    ready: Option<Result<String, ExecError>>,
    ready_waiters: Vec<RpcReplyPort<Result<String, ExecError>>>,
    /// The agent failed before it was ready; the answer waits for the stop reason.
    ready_failed: bool,
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

    fn set_ready(&mut self, r: Result<String, ExecError>) {
        for w in self.ready_waiters.drain(..) {
            let _ = w.send(r.clone());
        }
        self.ready = Some(r);
    }

    /// Answers readiness with the stop reason once the agent failed and the VM is down.
    fn resolve_failed_readiness(&mut self) {
        if let (true, None, Some(reason)) = (self.ready_failed, &self.ready, &self.stopped) {
            let failed = ExecError::VmStopped { reason: reason.clone(), console_tail: self.serial.tail() };
            self.set_ready(Err(failed));
        }
    }

    /// Stops everything once; later calls do nothing.
    async fn finish(&mut self, reason: StopReason) {
        if self.stopped.is_some() {
            return;
        }
        tracing::info!(%reason, "sandbox VM stopped");
        self.stopped = Some(reason.clone());
        self.resolve_failed_readiness();
        if let Some(mut running) = self.running.take() {
            for vcpu in std::mem::take(&mut running.runners) {
                if vcpu.call(VcpuMsg::Stop, Some(LIFECYCLE_CALL_TIMEOUT)).await.is_err() {
                    tracing::warn!("a vCPU actor did not confirm its stop");
                }
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
            let _ = w.send(reason.clone());
        }
    }
}

/// Spawns the agent client and one shell per device-table row, linked to `me`, and hands
/// each the narrowed refs it may use (and no others).
async fn wire(
    me: &ActorRef<SupMsg>,
    virtio: Vec<VirtioParts>,
    mut net: Option<GatewayArgs>,
    mounts: Vec<FsBrokerArgs>,
) -> Result<Wired, ActorProcessingErr> {
    let mut mounts = mounts.into_iter();
    let (agent, _) = Actor::spawn_linked(None, AgentClient, (), me.get_cell()).await?;
    let mut devices = Vec::new();
    let mut control = None;
    for parts in virtio {
        match parts {
            VirtioParts::Console(device) => {
                let args = ConsoleArgs { device, agent: agent.get_derived() };
                let (console, _) = Actor::spawn_linked(None, ConsoleDevice, args, me.get_cell()).await?;
                agent.cast(AgentMsg::Attach(console.get_derived()))?;
                devices.push(console.get_cell());
            }
            VirtioParts::Rng(device) => {
                let (rng, _) = Actor::spawn_linked(None, RngDevice, device, me.get_cell()).await?;
                devices.push(rng.get_cell());
            }
            VirtioParts::Blk(device) => {
                let (blk, _) = Actor::spawn_linked(None, BlkDevice, device, me.get_cell()).await?;
                devices.push(blk.get_cell());
            }
            VirtioParts::Net(device) => {
                let args = net.take().ok_or("a network device without gateway arguments")?;
                let (gw, _) = Actor::spawn_linked(None, NetGateway, args, me.get_cell()).await?;
                let args = NetArgs { device, gateway: gw.get_derived() };
                let (shell, _) = Actor::spawn_linked(None, NetDevice, args, me.get_cell()).await?;
                gw.cast(GatewayMsg::Attach(shell.get_derived()))?;
                control = Some(gw.get_derived());
                devices.push(shell.get_cell());
                devices.push(gw.get_cell());
            }
            VirtioParts::Fs(device) => {
                let args = mounts.next().ok_or("a virtio-fs device without a mount")?;
                let (broker, _) = Actor::spawn_linked(None, FsBroker, args, me.get_cell()).await?;
                let args = FsArgs { device, broker: broker.get_derived() };
                let (shell, _) = Actor::spawn_linked(None, FsDevice, args, me.get_cell()).await?;
                broker.cast(FsBrokerMsg::Attach(shell.get_derived()))?;
                devices.push(shell.get_cell());
                devices.push(broker.get_cell());
            }
        }
    }
    Ok(Wired { agent, devices, net: control })
}

struct Wired {
    agent: ActorRef<AgentMsg>,
    devices: Vec<ActorCell>,
    net: Option<DerivedActorRef<NetControl>>,
}

impl Actor for SandboxSupervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = SupArgs;

    async fn pre_start(&self, me: ActorRef<SupMsg>, args: SupArgs) -> Result<SupState, ActorProcessingErr> {
        let m = args.machine;
        let Wired { agent, mut devices, net } = wire(&me, m.virtio, args.net, args.mounts).await?;
        let vault = args.vault.map(|v| {
            v.cell.link(me.get_cell());
            devices.push(v.cell);
            v.control
        });
        // Registered before the guest runs a single instruction (see `SupMsg::WaitReady`).
        let (tx, rx) = ractor::concurrency::oneshot();
        agent.cast(AgentMsg::Request(AgentRequest::WaitReady(tx.into())))?;
        let sup = me.clone();
        tokio::spawn(async move {
            let ready = rx.await.unwrap_or(Err(ExecError::Gone));
            let _ = sup.cast(SupMsg::AgentReady(ready));
        });
        let mut runners = Vec::new();
        for vcpu in m.vcpus {
            let sup = me.clone();
            let on_exit = Box::new(move |stop| {
                let _ = sup.cast(SupMsg::VcpuStopped(stop));
            });
            let args = VcpuArgs { vcpu, bus: m.bus.clone(), on_exit };
            let (vcpu, _) = Actor::spawn_linked(None, VcpuActor, args, me.get_cell()).await?;
            runners.push(vcpu);
        }
        tracing::debug!(cmdline = %m.cmdline, "sandbox VM started");
        Ok(SupState {
            requests: agent.get_derived(),
            running: Some(Running { runners, agent, devices, net, vault, vm: m.vm }),
            serial: m.serial,
            reports: m.reports,
            boot_timer: m.boot_timer,
            stopped: None,
            shutdown_requested: false,
            waiters: Vec::new(),
            ready: None,
            ready_waiters: Vec::new(),
            ready_failed: false,
        })
    }

    async fn post_stop(&self, _: ActorRef<SupMsg>, st: &mut SupState) -> Result<(), ActorProcessingErr> {
        st.finish(StopReason::Killed).await;
        Ok(())
    }

    async fn handle(&self, me: ActorRef<SupMsg>, msg: SupMsg, st: &mut SupState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::AgentRef(reply) => drop(reply.send(st.requests.clone())),
            SupMsg::WaitReady(reply) => match &st.ready {
                Some(r) => drop(reply.send(r.clone())),
                None => st.ready_waiters.push(reply),
            },
            SupMsg::AgentReady(r) => match r {
                Err(e) if !matches!(e, ExecError::VmStopped { .. }) => {
                    // The agent died (a guest that broke the protocol): say why the VM stopped,
                    // now if it has, or once it has.
                    st.ready_failed = true;
                    st.resolve_failed_readiness();
                }
                r => st.set_ready(r),
            },
            SupMsg::Stop { graceful, reply } => {
                if let Some(r) = &st.stopped {
                    let _ = reply.send(r.clone());
                    return Ok(());
                }
                st.waiters.push(reply);
                match (graceful, &st.running) {
                    (Some(timeout), Some(r)) if !st.shutdown_requested => {
                        st.shutdown_requested = true;
                        let (tx, rx) = ractor::concurrency::oneshot();
                        r.agent.cast(AgentMsg::Shutdown(tx.into()))?;
                        let sup = me.clone();
                        tokio::spawn(async move {
                            // Either the agent refuses (not ready) or time runs out: force.
                            let acked = matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(Ok(()))));
                            if acked {
                                tokio::time::sleep(timeout).await;
                            }
                            let _ = sup.cast(SupMsg::StopTimeout);
                        });
                    }
                    (Some(_), Some(_)) => {}
                    _ => st.finish(StopReason::Killed).await,
                }
            }
            SupMsg::Wait(reply) => match &st.stopped {
                Some(r) => drop(reply.send(r.clone())),
                None => st.waiters.push(reply),
            },
            SupMsg::ConsoleTail(reply) => drop(reply.send(st.serial.tail())),
            SupMsg::BootTimes(reply) => {
                let memory = st.running.as_ref().map(|r| r.vm.resident());
                let _ = reply.send(BootTimes { to_init: st.boot_timer.elapsed(), memory });
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
            SupMsg::Vault(c) => match st.running.as_ref().and_then(|r| r.vault.as_ref()) {
                Some(v) => drop(v.send_message(c)),
                None => {
                    let none = "this sandbox has no secrets".to_string();
                    match c {
                        VaultControl::Rotate { reply, .. }
                        | VaultControl::SetHosts { reply, .. }
                        | VaultControl::Remove { reply, .. } => drop(reply.send(Err(none))),
                        VaultControl::Describe(reply) => drop(reply.send(Vec::new())),
                    }
                }
            },
            SupMsg::Net(c) => match st.running.as_ref().and_then(|r| r.net.as_ref()) {
                Some(gw) => drop(gw.send_message(c)),
                None => match c {
                    NetControl::SetPolicy { reply, .. } => {
                        drop(reply.send(Err("this sandbox has no network (--net none)".into())))
                    }
                    NetControl::Policy(reply) => drop(reply.send(String::new())),
                    NetControl::Publish { reply, .. } => {
                        drop(reply.send(Err("this sandbox has no network (--net none)".into())))
                    }
                    NetControl::Unpublish { reply, .. } => drop(reply.send(Vec::new())),
                    NetControl::SecretHosts { reply, .. } => drop(reply.send(())),
                },
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                tracing::warn!(actor = ?who.get_id(), "sandbox component failed: {err}");
                st.finish(StopReason::DeviceFailure(err.to_string())).await;
            }
            SupervisionEvent::ActorTerminated(_, _, reason) if st.stopped.is_none() => {
                let why = reason.unwrap_or_else(|| "a sandbox component stopped unexpectedly".into());
                st.finish(StopReason::DeviceFailure(why)).await;
            }
            _ => {}
        }
        Ok(())
    }
}
