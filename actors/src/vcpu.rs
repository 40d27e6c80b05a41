//! The actor that fronts one vCPU runner thread.
//!
//! The thread sits in `KVM_RUN` and serves port/MMIO exits synchronously; the actor is how
//! the rest of the tree talks to it: ask its state, stop it (which waits until the thread has
//! left `KVM_RUN` for good). A vCPU actor that stops for any reason stops its thread first,
//! so no vCPU ever runs without an owner.

use std::sync::{Arc, Mutex};

use msb_devices::Bus;
use msb_hypervisor::vcpu::Vcpu;
use msb_hypervisor::{VcpuRunner, VcpuStop};
use msb_protocol::sync::lock;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Where a vCPU is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Stopped(VcpuStop),
}

pub enum VcpuMsg {
    State(RpcReplyPort<VcpuState>),
    /// Stop the thread and answer once it has ended.
    Stop(RpcReplyPort<()>),
}

pub struct VcpuArgs {
    pub vcpu: Vcpu,
    pub bus: Arc<Bus>,
    /// Called once, on the vCPU thread, with the reason it stopped.
    pub on_exit: Box<dyn FnOnce(VcpuStop) + Send>,
}

pub struct VcpuActor;

pub struct VcpuActorState {
    runner: Option<VcpuRunner>,
    exited: Arc<Mutex<Option<VcpuStop>>>,
}

async fn stop_runner(st: &mut VcpuActorState) {
    if let Some(mut runner) = st.runner.take() {
        let _ = tokio::task::spawn_blocking(move || runner.stop()).await;
    }
}

impl Actor for VcpuActor {
    type Msg = VcpuMsg;
    type State = VcpuActorState;
    type Arguments = VcpuArgs;

    async fn pre_start(&self, _: ActorRef<VcpuMsg>, a: VcpuArgs) -> Result<VcpuActorState, ActorProcessingErr> {
        let exited = Arc::new(Mutex::new(None));
        let record = exited.clone();
        let on_exit = a.on_exit;
        let runner = VcpuRunner::spawn(
            a.vcpu,
            a.bus,
            Box::new(move |stop: VcpuStop| {
                *lock(&record) = Some(stop.clone());
                on_exit(stop);
            }),
        )?;
        Ok(VcpuActorState { runner: Some(runner), exited })
    }

    async fn post_stop(&self, _: ActorRef<VcpuMsg>, st: &mut VcpuActorState) -> Result<(), ActorProcessingErr> {
        stop_runner(st).await;
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<VcpuMsg>,
        msg: VcpuMsg,
        st: &mut VcpuActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            VcpuMsg::State(reply) => {
                let exited = lock(&st.exited).clone();
                let _ = reply.send(exited.map_or(VcpuState::Running, VcpuState::Stopped));
            }
            VcpuMsg::Stop(reply) => {
                stop_runner(st).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}
