//! Actor shells of the virtio devices: they turn ioeventfd readiness into queue processing.
//!
//! [`ConsoleDevice`] forwards guest bytes to the agent client as [`GuestBytes`] and accepts
//! [`ToConsole`] from it — the only messages either can send the other. Flow control is
//! credit-based: at most [`CREDIT_WINDOW`] guest bytes are in flight towards the agent; past
//! that the device stops taking transmit buffers, which pushes back on the guest's writer.
//!
//! Eventfd watchers never queue more than one notification per queue in a mailbox.
//! A [`DeviceError`](msb_devices::virtio::DeviceError) fails the actor, which makes the
//! supervisor stop the VM with the reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use msb_devices::virtio::console::{Console, RX_QUEUE, TX_QUEUE};
use msb_devices::virtio::rng::{Rng, RngProgress};
use msb_devices::virtio::MmioTransport;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// Most guest bytes handed to the agent client and not yet credited back.
pub const CREDIT_WINDOW: usize = 1024 * 1024;

/// Guest-to-host bytes of the agent channel, and how many host-to-guest bytes the guest has
/// taken since the last report (the agent client's send credit).
#[derive(Debug)]
pub struct GuestBytes {
    pub data: Vec<u8>,
    pub drained: usize,
}

/// What the agent client may send the console device.
#[derive(Debug)]
pub enum ToConsole {
    /// Host-to-guest bytes (whole frames).
    Bytes(Vec<u8>),
    /// The agent consumed this many guest bytes.
    Credit(usize),
}

pub enum DeviceMsg {
    /// Queue `n` was notified.
    Notify(u16),
    Console(ToConsole),
}

impl From<ToConsole> for DeviceMsg {
    fn from(m: ToConsole) -> Self {
        DeviceMsg::Console(m)
    }
}

impl TryFrom<DeviceMsg> for ToConsole {
    type Error = ();
    fn try_from(m: DeviceMsg) -> Result<Self, ()> {
        match m {
            DeviceMsg::Console(c) => Ok(c),
            _ => Err(()),
        }
    }
}

/// Watches one queue's notify eventfd; sends at most one pending `Notify` at a time.
fn watch(
    evt: Arc<EventFd>,
    queue: u16,
    pending: Arc<AtomicBool>,
    me: ActorRef<DeviceMsg>,
) -> std::io::Result<JoinHandle<()>> {
    // `AsyncFd::new` is deprecated because a caller could close the fd while it is
    // registered; here the AsyncFd owns the only path to the Arc'd EventFd it watches.
    #[allow(deprecated)]
    let fd = AsyncFd::new(evt)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            let _ = guard.try_io(|inner| inner.get_ref().read());
            if !pending.swap(true, Ordering::SeqCst) && me.send_message(DeviceMsg::Notify(queue)).is_err() {
                return;
            }
        }
    }))
}

/// Arguments shared by both device shells.
pub struct DeviceArgs<D> {
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    pub notify: Vec<Arc<EventFd>>,
}

pub struct DeviceState<D> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    pending: Vec<Arc<AtomicBool>>,
    watchers: Vec<JoinHandle<()>>,
}

fn start_watchers<D>(me: &ActorRef<DeviceMsg>, args: DeviceArgs<D>) -> Result<DeviceState<D>, ActorProcessingErr> {
    let mut st = DeviceState { transport: args.transport, pending: Vec::new(), watchers: Vec::new() };
    for (q, evt) in args.notify.into_iter().enumerate() {
        let pending = Arc::new(AtomicBool::new(false));
        st.watchers.push(watch(evt, q as u16, pending.clone(), me.clone())?);
        st.pending.push(pending);
    }
    Ok(st)
}

fn stop_watchers<D>(st: &mut DeviceState<D>) {
    for w in st.watchers.drain(..) {
        w.abort();
    }
}

fn lock<D>(t: &Mutex<MmioTransport<D>>) -> std::sync::MutexGuard<'_, MmioTransport<D>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct ConsoleDevice;

pub struct ConsoleArgs {
    pub device: DeviceArgs<Console>,
    pub agent: DerivedActorRef<GuestBytes>,
}

pub struct ConsoleState {
    dev: DeviceState<Console>,
    agent: DerivedActorRef<GuestBytes>,
    in_flight: usize,
}

impl ConsoleState {
    /// Serves both queues as far as credit allows.
    fn pump(&mut self) -> Result<(), ActorProcessingErr> {
        let mut t = lock(&self.dev.transport);
        if !t.is_active() {
            return match t.failure() {
                Some(why) => Err(format!("virtio-console: {why}").into()),
                None => Ok(()),
            };
        }
        let mut signal = false;
        let mut out = Vec::new();
        let pending_before = t.device().pending_to_guest();
        let result = {
            let (dev, queues, mem) = t.parts();
            dev.process_control(queues, mem)
                .and_then(|used| {
                    signal |= used;
                    dev.fill_rx(&mut queues[RX_QUEUE as usize], mem)
                })
                .and_then(|used| {
                    signal |= used;
                    let budget = CREDIT_WINDOW.saturating_sub(self.in_flight);
                    if budget == 0 {
                        return Ok(());
                    }
                    signal |= dev.drain_tx(&mut queues[TX_QUEUE as usize], mem, budget, &mut out)?;
                    Ok(())
                })
        };
        if let Err(e) = result {
            t.fail(e.to_string());
            return Err(format!("virtio-console: {e}").into());
        }
        if signal {
            t.signal_used();
        }
        let drained = pending_before.saturating_sub(t.device().pending_to_guest());
        drop(t);
        if !out.is_empty() || drained > 0 {
            self.in_flight += out.len();
            self.agent.send_message(GuestBytes { data: out, drained }).map_err(|_| "agent client is gone")?;
        }
        Ok(())
    }
}

impl Actor for ConsoleDevice {
    type Msg = DeviceMsg;
    type State = ConsoleState;
    type Arguments = ConsoleArgs;

    async fn pre_start(&self, me: ActorRef<DeviceMsg>, args: ConsoleArgs) -> Result<ConsoleState, ActorProcessingErr> {
        Ok(ConsoleState { dev: start_watchers(&me, args.device)?, agent: args.agent, in_flight: 0 })
    }

    async fn post_stop(&self, _: ActorRef<DeviceMsg>, st: &mut ConsoleState) -> Result<(), ActorProcessingErr> {
        stop_watchers(&mut st.dev);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        st: &mut ConsoleState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Notify(q) => {
                if let Some(p) = st.dev.pending.get(q as usize) {
                    p.store(false, Ordering::SeqCst);
                }
            }
            DeviceMsg::Console(ToConsole::Credit(n)) => st.in_flight = st.in_flight.saturating_sub(n),
            DeviceMsg::Console(ToConsole::Bytes(b)) => {
                let mut t = lock(&st.dev.transport);
                if let Err(e) = t.device_mut().queue_to_guest(&b) {
                    let why = format!("the guest is not reading its agent channel: {e}");
                    t.fail(why.clone());
                    return Err(why.into());
                }
            }
        }
        st.pump()
    }
}

pub struct RngDevice;

impl Actor for RngDevice {
    type Msg = DeviceMsg;
    type State = DeviceState<Rng>;
    type Arguments = DeviceArgs<Rng>;

    async fn pre_start(
        &self,
        me: ActorRef<DeviceMsg>,
        args: DeviceArgs<Rng>,
    ) -> Result<DeviceState<Rng>, ActorProcessingErr> {
        start_watchers(&me, args)
    }

    async fn post_stop(&self, _: ActorRef<DeviceMsg>, st: &mut DeviceState<Rng>) -> Result<(), ActorProcessingErr> {
        stop_watchers(st);
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        st: &mut DeviceState<Rng>,
    ) -> Result<(), ActorProcessingErr> {
        if let DeviceMsg::Notify(q) = msg {
            if let Some(p) = st.pending.get(q as usize) {
                p.store(false, Ordering::SeqCst);
            }
        }
        let mut t = lock(&st.transport);
        if !t.is_active() {
            return match t.failure() {
                Some(why) => Err(format!("virtio-rng: {why}").into()),
                None => Ok(()),
            };
        }
        let (dev, queues, mem) = t.parts();
        match dev.process(&mut queues[0], mem) {
            Ok(RngProgress::Served(true)) => t.signal_used(),
            Ok(RngProgress::Served(false)) => {}
            Ok(RngProgress::HostNotReady) => {
                tracing::debug!("host CRNG not ready; guest entropy request deferred");
                // One retry timer at a time: the notify flag doubles as "a retry is pending".
                if let Some(p) = st.pending.first() {
                    if !p.swap(true, Ordering::SeqCst) {
                        let me2 = me.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            let _ = me2.send_message(DeviceMsg::Notify(0));
                        });
                    }
                }
            }
            Err(e) => {
                t.fail(e.to_string());
                return Err(format!("virtio-rng: {e}").into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Stands in for the agent client: counts guest bytes, never credits them.
    struct Sink;
    impl Actor for Sink {
        type Msg = GuestBytes;
        type State = Arc<AtomicUsize>;
        type Arguments = Arc<AtomicUsize>;
        async fn pre_start(
            &self,
            _: ActorRef<GuestBytes>,
            n: Arc<AtomicUsize>,
        ) -> Result<Arc<AtomicUsize>, ActorProcessingErr> {
            Ok(n)
        }
        async fn handle(
            &self,
            _: ActorRef<GuestBytes>,
            m: GuestBytes,
            n: &mut Arc<AtomicUsize>,
        ) -> Result<(), ActorProcessingErr> {
            n.fetch_add(m.data.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn guest_to_host_bytes_stop_at_the_credit_window() {
        const CHAIN: usize = 60 * 1024;
        const CHAINS: u16 = 32; // ~1.9 MiB offered, more than the window
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let evt = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let notify: Vec<_> = (0..4).map(|_| evt()).collect();
        let mut t = MmioTransport::new(Console::default(), mem.clone(), evt(), notify.clone());
        for (off, v) in [(0x70u64, 1u32), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 0xb), (0x70, 0xf)] {
            t.write(off, &v.to_le_bytes());
        }
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x10000), 64);
        let descs: Vec<RawDescriptor> = (0..CHAINS)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0x100000 + i as u64 * CHAIN as u64, CHAIN as u32, 0, 0)))
            .collect();
        vq.build_multiple_desc_chains(&descs).unwrap();
        t.parts().1[TX_QUEUE as usize] = vq.create_queue().unwrap();
        assert!(t.is_active());

        let got = Arc::new(AtomicUsize::new(0));
        let (sink, _) = Actor::spawn(None, Sink, got.clone()).await.unwrap();
        let transport = Arc::new(Mutex::new(t));
        let args = ConsoleArgs { device: DeviceArgs { transport, notify }, agent: sink.get_derived() };
        let (console, _) = Actor::spawn(None, ConsoleDevice, args).await.unwrap();
        console.cast(DeviceMsg::Notify(TX_QUEUE)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let first = got.load(Ordering::SeqCst);
        assert!(
            (CREDIT_WINDOW - CHAIN..=CREDIT_WINDOW + CHAIN).contains(&first),
            "forwarded {first} bytes without credit"
        );
        // Crediting what was consumed lets the rest through.
        console.cast(DeviceMsg::Console(ToConsole::Credit(first))).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(got.load(Ordering::SeqCst), CHAIN * CHAINS as usize);
    }
}
