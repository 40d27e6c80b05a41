//! The virtio-blk shell: services the disk core when its queue is notified. The core does
//! the file I/O of one round (bounded by its work budget) off the async worker; a round cut
//! short is continued by a message to itself, so other messages interleave.

use std::sync::{Arc, Mutex};

use msb_devices::machine::Virtio;
use msb_devices::virtio::blk::{Blk, BlkProgress};
use msb_devices::virtio::MmioTransport;
use msb_protocol::sync::lock;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::watch::Watchers;

/// The blk shell's mailbox.
pub enum BlkMsg {
    /// Queue `n` was notified (or a round is to be continued).
    Notify(u16),
}

pub struct BlkDevice;

pub struct BlkState {
    transport: Arc<Mutex<MmioTransport<Blk>>>,
    watchers: Watchers,
}

impl Actor for BlkDevice {
    type Msg = BlkMsg;
    type State = BlkState;
    type Arguments = Virtio<Blk>;

    async fn pre_start(&self, me: ActorRef<BlkMsg>, args: Virtio<Blk>) -> Result<BlkState, ActorProcessingErr> {
        Ok(BlkState { watchers: Watchers::start(&me, args.notify, BlkMsg::Notify)?, transport: args.transport })
    }

    async fn handle(&self, me: ActorRef<BlkMsg>, msg: BlkMsg, st: &mut BlkState) -> Result<(), ActorProcessingErr> {
        let BlkMsg::Notify(q) = msg;
        st.watchers.taken(q);
        let progress = super::off_worker(|| lock(&st.transport).service(|dev, queues, mem| dev.service(queues, mem)));
        let progress = progress.map_err(|failed| format!("virtio-blk: {failed}"))?;
        if progress == Some(BlkProgress::More) && st.watchers.claim(0) {
            let _ = me.send_message(BlkMsg::Notify(0));
        }
        Ok(())
    }
}
