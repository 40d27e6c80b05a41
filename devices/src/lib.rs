//! Device models for msb's VMM. Each device is a plain synchronous core that a vCPU thread
//! (register access) or an actor shell in `msb-actors` (queue processing on ioeventfd
//! readiness) drives; nothing here knows about tokio or actors.
//!
//! Invariants shared by every device:
//! - guest bytes are copied out of guest memory (bounds-checked by vm-memory) before any
//!   decision is made on them;
//! - every loop a guest can drive has a named bound (descriptors per chain are bounded by the
//!   queue size in virtio-queue, chains per notification and bytes per chain by constants here);
//! - a guest that breaks the virtio contract (bad addresses, oversized chains) marks the device
//!   as failed ("needs reset"); it is not served again, and the VM is stopped with the reason.
//!
//! This crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod boot_timer;
pub mod bus;
pub mod capped_log;
pub mod console_log;
pub mod i8042;
pub mod layout;
pub mod machine;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use machine::{DiskSpec, Machine, MachineError, MachineSpec};
