//! The virtio-console shell: the agent channel's transport end. It forwards guest bytes to
//! the agent client as [`GuestBytes`] and takes [`ToConsole`] from it, the only messages
//! either can send the other.
//!
//! Flow control is credit-based: at most [`CREDIT_WINDOW`] guest bytes are in flight towards
//! the agent client; past that the core takes no transmit buffers, which pushes back on the
//! guest's writer. Host bytes the guest does not take fail the device (all or nothing, see
//! the core's `queue_to_guest`).

use std::sync::{Arc, Mutex};

use msb_devices::machine::Virtio;
use msb_devices::virtio::console::Console;
use msb_devices::virtio::MmioTransport;
use msb_protocol::sync::lock;
use msb_schema::agent::{GuestBytes, ToConsole};
use msb_schema::limits::CREDIT_WINDOW;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};

use super::watch::Watchers;

/// The console shell's mailbox.
pub enum ConsoleMsg {
    /// Queue `n` was notified.
    Notify(u16),
    /// From the agent client.
    Agent(ToConsole),
    /// The last round stopped at its work bound: service again.
    Continue,
}

impl From<ToConsole> for ConsoleMsg {
    fn from(m: ToConsole) -> Self {
        ConsoleMsg::Agent(m)
    }
}

impl TryFrom<ConsoleMsg> for ToConsole {
    type Error = ();
    fn try_from(m: ConsoleMsg) -> Result<Self, ()> {
        match m {
            ConsoleMsg::Agent(c) => Ok(c),
            ConsoleMsg::Notify(_) | ConsoleMsg::Continue => Err(()),
        }
    }
}

pub struct ConsoleDevice;

pub struct ConsoleArgs {
    pub device: Virtio<Console>,
    pub agent: DerivedActorRef<GuestBytes>,
}

pub struct ConsoleState {
    me: ActorRef<ConsoleMsg>,
    /// A `Continue` is in this shell's mailbox.
    continuing: bool,
    transport: Arc<Mutex<MmioTransport<Console>>>,
    watchers: Watchers,
    agent: DerivedActorRef<GuestBytes>,
    /// Guest bytes sent to the agent client and not yet credited back.
    in_flight: usize,
}

impl ConsoleState {
    /// One servicing round of the core, as far as credit allows; forwards what it produced.
    fn pump(&mut self) -> Result<(), ActorProcessingErr> {
        let budget = CREDIT_WINDOW.saturating_sub(self.in_flight);
        let transport = &self.transport;
        let serviced =
            super::off_worker(|| lock(transport).service(|dev, queues, mem| dev.service(queues, mem, budget)));
        let Some(s) = serviced.map_err(|failed| format!("virtio-console: {failed}"))? else {
            return Ok(());
        };
        if s.more && !self.continuing {
            self.continuing = true;
            let _ = self.me.send_message(ConsoleMsg::Continue);
        }
        if !s.from_guest.is_empty() || s.drained > 0 {
            self.in_flight += s.from_guest.len();
            self.agent
                .send_message(GuestBytes { data: s.from_guest, drained: s.drained })
                .map_err(|_| "agent client is gone")?;
        }
        Ok(())
    }
}

impl Actor for ConsoleDevice {
    type Msg = ConsoleMsg;
    type State = ConsoleState;
    type Arguments = ConsoleArgs;

    async fn pre_start(&self, me: ActorRef<ConsoleMsg>, args: ConsoleArgs) -> Result<ConsoleState, ActorProcessingErr> {
        let watchers = Watchers::start(&me, args.device.notify, ConsoleMsg::Notify)?;
        Ok(ConsoleState {
            me,
            continuing: false,
            transport: args.device.transport,
            watchers,
            agent: args.agent,
            in_flight: 0,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ConsoleMsg>,
        msg: ConsoleMsg,
        st: &mut ConsoleState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConsoleMsg::Notify(q) => st.watchers.taken(q),
            ConsoleMsg::Continue => st.continuing = false,
            ConsoleMsg::Agent(ToConsole::Credit(n)) => st.in_flight = st.in_flight.saturating_sub(n),
            ConsoleMsg::Agent(ToConsole::Bytes(b)) => {
                let mut t = lock(&st.transport);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Stands in for the agent client: counts guest bytes and messages, never credits them.
    struct Sink;
    impl Actor for Sink {
        type Msg = GuestBytes;
        type State = Arc<(AtomicUsize, AtomicUsize)>;
        type Arguments = Arc<(AtomicUsize, AtomicUsize)>;
        async fn pre_start(
            &self,
            _: ActorRef<GuestBytes>,
            n: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(n)
        }
        async fn handle(
            &self,
            _: ActorRef<GuestBytes>,
            m: GuestBytes,
            n: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            n.0.fetch_add(m.data.len(), Ordering::SeqCst);
            n.1.fetch_add(1, Ordering::SeqCst);
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
        t.parts().1[msb_devices::virtio::console::TX_QUEUE as usize] = vq.create_queue().unwrap();
        assert!(t.is_active());

        let got = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (sink, _) = Actor::spawn(None, Sink, got.clone()).await.unwrap();
        let transport = Arc::new(Mutex::new(t));
        let args = ConsoleArgs { device: Virtio { transport, notify }, agent: sink.get_derived() };
        let (console, _) = Actor::spawn(None, ConsoleDevice, args).await.unwrap();
        console.cast(ConsoleMsg::Notify(msb_devices::virtio::console::TX_QUEUE)).unwrap();
        // One notification is served in rounds of bounded work that continue by themselves,
        // until the credit window is full; then nothing more moves.
        crate::test_util::eventually("the window filled", || got.0.load(Ordering::SeqCst) >= CREDIT_WINDOW - CHAIN)
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let first = got.0.load(Ordering::SeqCst);
        assert!(
            (CREDIT_WINDOW - CHAIN..=CREDIT_WINDOW + CHAIN).contains(&first),
            "forwarded {first} bytes without credit"
        );
        let rounds = got.1.load(Ordering::SeqCst);
        assert!(rounds > 1, "a round is bounded below the window ({rounds} rounds)");
        // Crediting what was consumed lets the rest through.
        console.cast(ConsoleMsg::Agent(ToConsole::Credit(first))).unwrap();
        crate::test_util::eventually("everything arrived", || got.0.load(Ordering::SeqCst) == CHAIN * CHAINS as usize)
            .await;
    }
}
