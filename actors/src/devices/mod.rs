//! Actor shells of the virtio devices, one file and one mailbox type per device. A shell
//! only translates: queue notifications (eventfd readiness, see [`watch`]) and messages from
//! its one peer become calls into the device core's `service`, and what the core produced
//! becomes messages. Queue order, budgets and when to signal the driver are the core's.
//!
//! Invariants: a watcher never queues more than one notification per queue in a mailbox; a
//! failed device (the guest broke its contract) fails its shell, which makes the supervisor
//! stop the VM with the reason.

pub mod console;
pub mod rng;
pub mod watch;

pub use console::{ConsoleArgs, ConsoleDevice, ConsoleMsg};
pub use rng::{RngDevice, RngMsg};
