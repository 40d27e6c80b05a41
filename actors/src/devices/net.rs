//! The virtio-net shell: the network's transport end. It forwards the guest's frames to the
//! gateway as [`GuestFrames`] and takes [`ToNet`] from it, the only messages either can send
//! the other.
//!
//! Flow control is credit-based in frames: at most [`NET_FRAME_WINDOW`] guest frames are in
//! flight towards the gateway (past that the core takes no transmit buffers, which pushes
//! back on the guest); the frames the guest took from the receive side are reported back as
//! the gateway's credit, so the gateway never has more than the window waiting here.

use std::sync::{Arc, Mutex};

use msb_devices::machine::Virtio;
use msb_devices::virtio::net::Net;
use msb_devices::virtio::MmioTransport;
use msb_protocol::sync::lock;
use msb_schema::net::{GuestFrames, ToNet, NET_FRAME_WINDOW};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};

use super::watch::Watchers;

/// The net shell's mailbox.
pub enum NetMsg {
    /// Queue `n` was notified.
    Notify(u16),
    /// From the gateway.
    Gateway(ToNet),
    /// The last round stopped at its work bound: service again.
    Continue,
}

impl From<ToNet> for NetMsg {
    fn from(m: ToNet) -> Self {
        NetMsg::Gateway(m)
    }
}

impl TryFrom<NetMsg> for ToNet {
    type Error = ();
    fn try_from(m: NetMsg) -> Result<Self, ()> {
        match m {
            NetMsg::Gateway(g) => Ok(g),
            NetMsg::Notify(_) | NetMsg::Continue => Err(()),
        }
    }
}

pub struct NetDevice;

pub struct NetArgs {
    pub device: Virtio<Net>,
    pub gateway: DerivedActorRef<GuestFrames>,
}

pub struct NetState {
    me: ActorRef<NetMsg>,
    continuing: bool,
    transport: Arc<Mutex<MmioTransport<Net>>>,
    watchers: Watchers,
    gateway: DerivedActorRef<GuestFrames>,
    /// Guest frames sent to the gateway and not yet credited back.
    in_flight: usize,
    /// Gateway frames queued in the core at the last look (taken or dropped since: credit).
    queued: usize,
    /// Gateway frames the core refused (credit the gateway gets back all the same).
    refused: usize,
}

impl NetState {
    fn pump(&mut self) -> Result<(), ActorProcessingErr> {
        let budget = NET_FRAME_WINDOW.saturating_sub(self.in_flight);
        let transport = &self.transport;
        let serviced = super::off_worker(|| {
            lock(transport).service(|dev, queues, mem| {
                dev.service(queues, mem, budget).map(|s| {
                    let signal = s.notify;
                    ((s, dev.pending()), signal)
                })
            })
        });
        let Some((s, pending)) = serviced.map_err(|failed| format!("virtio-net: {failed}"))? else {
            return Ok(());
        };
        if s.more && !self.continuing {
            self.continuing = true;
            let _ = self.me.send_message(NetMsg::Continue);
        }
        let delivered = self.queued.saturating_sub(pending) + std::mem::take(&mut self.refused);
        self.queued = pending;
        if !s.from_guest.is_empty() || delivered > 0 {
            self.in_flight += s.from_guest.len();
            self.gateway
                .send_message(GuestFrames { frames: s.from_guest, delivered })
                .map_err(|_| "the network gateway is gone")?;
        }
        Ok(())
    }
}

impl Actor for NetDevice {
    type Msg = NetMsg;
    type State = NetState;
    type Arguments = NetArgs;

    async fn pre_start(&self, me: ActorRef<NetMsg>, args: NetArgs) -> Result<NetState, ActorProcessingErr> {
        let watchers = Watchers::start(&me, args.device.notify, NetMsg::Notify)?;
        Ok(NetState {
            me,
            continuing: false,
            transport: args.device.transport,
            watchers,
            gateway: args.gateway,
            in_flight: 0,
            queued: 0,
            refused: 0,
        })
    }

    async fn handle(&self, _: ActorRef<NetMsg>, msg: NetMsg, st: &mut NetState) -> Result<(), ActorProcessingErr> {
        match msg {
            NetMsg::Notify(q) => st.watchers.taken(q),
            NetMsg::Continue => st.continuing = false,
            NetMsg::Gateway(ToNet::Credit(n)) => st.in_flight = st.in_flight.saturating_sub(n),
            NetMsg::Gateway(ToNet::Frames(frames)) => {
                let mut t = lock(&st.transport);
                for f in frames {
                    // The gateway sends only against credit, so the core's queue has room; a
                    // frame it refuses anyway is dropped, as a full NIC would.
                    match t.device_mut().push_frame(f) {
                        Ok(()) => st.queued += 1,
                        Err(_) => st.refused += 1,
                    }
                }
            }
        }
        st.pump()
    }
}
