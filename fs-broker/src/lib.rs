//! The filesystem broker: serves one host directory to a guest's virtio-fs, confined to it.
//!
//! [`fuse`] parses the guest's FUSE requests into checked, owned values and encodes replies;
//! [`broker`] serves them beneath the mount's directory descriptor, denying every operation
//! it does not implement and every change on a read-only mount. The broker never sees guest
//! memory: the virtio-fs device copies a request's bytes out and the reply's bytes in.
//! [`actor`] is the FsBroker actor around the core, one per mount.

pub mod actor;
pub mod broker;
pub mod fuse;

pub use broker::{fd_budget, Broker, BrokerError, MountConfig};
