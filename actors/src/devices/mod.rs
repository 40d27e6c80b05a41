//! Actor shells of the virtio devices, one file and one mailbox type per device. A shell
//! only translates: queue notifications (eventfd readiness, see [`watch`]) and messages from
//! its one peer become calls into the device core's `service`, and what the core produced
//! becomes messages. Queue order, budgets and when to signal the driver are the core's.
//!
//! Invariants: a watcher never queues more than one notification per queue in a mailbox; a
//! failed device (the guest broke its contract) fails its shell, which makes the supervisor
//! stop the VM with the reason. A servicing round runs through `off_worker`, so the guest
//! memory work it does (bounded by the core's round budget) never holds an async worker
//! thread's other tasks; a round cut short at its budget is continued by a message the shell
//! sends itself, so other messages interleave.

pub mod blk;
pub mod console;
pub mod fs;
pub mod net;
pub mod rng;
pub mod watch;

pub use blk::{BlkDevice, BlkMsg};
pub use console::{ConsoleArgs, ConsoleDevice, ConsoleMsg};
pub use fs::{FsArgs, FsDevice, FsMsg};
pub use net::{NetArgs, NetDevice, NetMsg};
pub use rng::{RngDevice, RngMsg};

/// Runs blocking device work (a servicing round, with the transport lock held) without
/// stalling the async tasks of the worker thread it is called on: on a multi-threaded
/// runtime those move to another thread meanwhile.
pub(crate) fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
