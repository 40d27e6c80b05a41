//! The virtio-fs shell: the transport end of one mount. It copies requests out through the
//! core and forwards them to its mount's FsBroker as [`FsRequest`] (the only message it may
//! send it), and writes each [`FsReply`] back. At most the core's `MAX_IN_FLIGHT` requests
//! are out; past that the core takes no chains, which pushes back on the guest. A reply for
//! a request the shell no longer knows (after a driver reset) is dropped.
//!
//! Its servicing rounds run inline on the async worker: a round copies at most the in-flight
//! cap's requests out of guest memory and touches no host file (the broker does), so it
//! never blocks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use msb_devices::machine::Virtio;
use msb_devices::virtio::fs::{Fs, Token};
use msb_devices::virtio::MmioTransport;
use msb_protocol::sync::lock;
use msb_schema::fs::{FsReply, FsRequest};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};

use super::watch::Watchers;

/// The virtio-fs shell's mailbox.
pub enum FsMsg {
    /// Queue `n` was notified (or a round is to be continued).
    Notify(u16),
    /// The broker's answer.
    Reply(FsReply),
}

impl From<FsReply> for FsMsg {
    fn from(r: FsReply) -> Self {
        FsMsg::Reply(r)
    }
}

impl TryFrom<FsMsg> for FsReply {
    type Error = ();
    fn try_from(m: FsMsg) -> Result<Self, ()> {
        match m {
            FsMsg::Reply(r) => Ok(r),
            FsMsg::Notify(_) => Err(()),
        }
    }
}

pub struct FsDevice;

pub struct FsArgs {
    pub device: Virtio<Fs>,
    pub broker: DerivedActorRef<FsRequest>,
}

pub struct FsState {
    me: ActorRef<FsMsg>,
    transport: Arc<Mutex<MmioTransport<Fs>>>,
    watchers: Watchers,
    broker: DerivedActorRef<FsRequest>,
    /// Requests out to the broker (bounded by the core's in-flight cap).
    out: HashMap<u64, Token>,
    next_id: u64,
}

impl FsState {
    /// Takes what the guest offered (within the in-flight cap) and sends it to the broker.
    fn pump(&mut self) -> Result<(), ActorProcessingErr> {
        let transport = &self.transport;
        let taken =
            lock(transport).service(|dev, queues, mem| dev.take(queues, mem).map(|t| ((t, dev.in_flight()), false)));
        let Some(((reqs, more), in_flight)) = taken.map_err(|failed| format!("virtio-fs: {failed}"))? else {
            return Ok(());
        };
        for r in reqs {
            let id = self.next_id;
            self.next_id += 1;
            self.out.insert(id, r.token);
            self.broker
                .send_message(FsRequest { id, bytes: r.bytes, room: r.room })
                .map_err(|_| "the filesystem broker is gone")?;
        }
        // More is left and the cap has room: the round stopped at its work bound, so go on
        // (at the cap, the next reply does).
        let room = in_flight < msb_devices::virtio::fs::MAX_IN_FLIGHT;
        if more && room && self.watchers.claim(1) {
            let _ = self.me.send_message(FsMsg::Notify(1));
        }
        Ok(())
    }
}

impl Actor for FsDevice {
    type Msg = FsMsg;
    type State = FsState;
    type Arguments = FsArgs;

    async fn pre_start(&self, me: ActorRef<FsMsg>, args: FsArgs) -> Result<FsState, ActorProcessingErr> {
        Ok(FsState {
            watchers: Watchers::start(&me, args.device.notify, FsMsg::Notify)?,
            me,
            transport: args.device.transport,
            broker: args.broker,
            out: HashMap::new(),
            next_id: 0,
        })
    }

    async fn handle(&self, _: ActorRef<FsMsg>, msg: FsMsg, st: &mut FsState) -> Result<(), ActorProcessingErr> {
        match msg {
            FsMsg::Notify(q) => st.watchers.taken(q),
            FsMsg::Reply(r) => {
                if let Some(token) = st.out.remove(&r.id) {
                    let transport = &st.transport;
                    let done = lock(transport)
                        .service(|dev, queues, mem| dev.complete(queues, mem, token, &r.bytes).map(|used| ((), used)));
                    done.map_err(|failed| format!("virtio-fs: {failed}"))?;
                }
            }
        }
        st.pump()
    }
}
