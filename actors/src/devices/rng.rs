//! The virtio-rng shell: services the core when its queue is notified. While the host's CRNG
//! is not ready it retries on a timer (one retry pending at a time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use msb_devices::machine::Virtio;
use msb_devices::virtio::rng::{Rng, RngProgress};
use msb_devices::virtio::MmioTransport;
use msb_protocol::sync::lock;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::watch::Watchers;

/// How long the shell waits before retrying a request the host CRNG could not serve.
pub const CRNG_RETRY: Duration = Duration::from_millis(500);

/// The rng shell's mailbox.
pub enum RngMsg {
    /// Queue `n` was notified (or a retry is due).
    Notify(u16),
}

pub struct RngDevice;

pub struct RngState {
    transport: Arc<Mutex<MmioTransport<Rng>>>,
    watchers: Watchers,
}

impl Actor for RngDevice {
    type Msg = RngMsg;
    type State = RngState;
    type Arguments = Virtio<Rng>;

    async fn pre_start(&self, me: ActorRef<RngMsg>, args: Virtio<Rng>) -> Result<RngState, ActorProcessingErr> {
        Ok(RngState { watchers: Watchers::start(&me, args.notify, RngMsg::Notify)?, transport: args.transport })
    }

    async fn handle(&self, me: ActorRef<RngMsg>, msg: RngMsg, st: &mut RngState) -> Result<(), ActorProcessingErr> {
        let RngMsg::Notify(q) = msg;
        st.watchers.taken(q);
        let progress = super::off_worker(|| lock(&st.transport).service(|dev, queues, mem| dev.service(queues, mem)));
        let progress = progress.map_err(|failed| format!("virtio-rng: {failed}"))?;
        if progress == Some(RngProgress::More) && st.watchers.claim(0) {
            // The round stopped at its budget: continue after whatever else is queued.
            let _ = me.send_message(RngMsg::Notify(0));
        }
        if progress == Some(RngProgress::HostNotReady) {
            tracing::debug!("host CRNG not ready; guest entropy request deferred");
            if st.watchers.claim(0) {
                tokio::spawn(async move {
                    tokio::time::sleep(CRNG_RETRY).await;
                    let _ = me.send_message(RngMsg::Notify(0));
                });
            }
        }
        Ok(())
    }
}
