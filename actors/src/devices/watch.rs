//! Queue-notify watchers: one task per queue turns its ioeventfd's readiness into at most
//! one pending notification message for the device's shell.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ractor::{ActorRef, Message};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// The watchers of one device's queues. Dropping it stops them.
pub struct Watchers {
    pending: Vec<Arc<AtomicBool>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Watches `notify[q]` for every queue `q`, sending `msg(q)` to `me` when it fires and
    /// no notification of that queue is pending already.
    pub fn start<M: Message>(me: &ActorRef<M>, notify: Vec<Arc<EventFd>>, msg: fn(u16) -> M) -> std::io::Result<Self> {
        let mut w = Watchers { pending: Vec::new(), tasks: Vec::new() };
        for (q, evt) in notify.into_iter().enumerate() {
            let q = u16::try_from(q).map_err(|_| std::io::Error::other("more than 65536 queues"))?;
            let pending = Arc::new(AtomicBool::new(false));
            w.tasks.push(watch(evt, q, pending.clone(), me.clone(), msg)?);
            w.pending.push(pending);
        }
        Ok(w)
    }

    /// The shell took queue `q`'s notification: the next one is sent again.
    pub fn taken(&self, q: u16) {
        if let Some(p) = self.pending.get(q as usize) {
            p.store(false, Ordering::SeqCst);
        }
    }

    /// Marks queue `q` as notified without an eventfd (a retry the shell schedules itself);
    /// false if a notification is pending already.
    pub fn claim(&self, q: u16) -> bool {
        self.pending.get(q as usize).is_some_and(|p| !p.swap(true, Ordering::SeqCst))
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

fn watch<M: Message>(
    evt: Arc<EventFd>,
    queue: u16,
    pending: Arc<AtomicBool>,
    me: ActorRef<M>,
    msg: fn(u16) -> M,
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
            if !pending.swap(true, Ordering::SeqCst) && me.send_message(msg(queue)).is_err() {
                return;
            }
        }
    }))
}
