//! msb's hypervisor layer: everything that talks to `/dev/kvm`.
//!
//! - [`kind`] classifies the host's `/dev/kvm` (hardware AMD-V/VT-x, or the PVM software
//!   hypervisor, on which ordinary guests are instruction-emulated).
//! - [`memory`] fixes the guest physical layout and creates guest memory as a *limit*: the
//!   mapping is `MAP_NORESERVE`, host pages exist only once the guest touches them.
//! - [`vm`] creates the VM (irqchip, PIT, memory slots) and registers ioeventfds and irqfds.
//! - [`boot`] loads a PVH `vmlinux` (or a bare-metal PVH test guest), the initramfs, the
//!   command line, the PVH start info, the memory map and an MP table.
//! - [`vcpu`] configures vCPUs for PVH entry and runs each on its own OS thread, dispatching
//!   port and MMIO exits to an [`vcpu::ExitHandler`] and reporting why it stopped.
//!
//! This crate is the only place with `unsafe` (msb-devices needs none: vm-memory does its
//! guest-memory access);
//! every block carries a `SAFETY:` comment.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod boot;
pub mod kind;
pub mod memory;
mod mptable;
pub mod seccomp_notify;
pub mod sigsys;
pub mod syscalls;
pub mod vcpu;
pub mod vm;

pub use kind::{classify, KvmKind};
pub use vcpu::{on_vcpu_thread_start, ExitHandler, VcpuRunner, VcpuStop, THREAD_IOCTLS};
pub use vm::{Vm, VmConfig};

/// Errors of the hypervisor layer. Each says what failed; a cause is its `source()`, never
/// repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {what} failed")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("cannot load kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("cannot load initramfs {path}: {reason}")]
    Initrd { path: String, reason: String },
    #[error("boot setup: {0}")]
    Boot(String),
    #[error("vCPU thread: {0}")]
    Thread(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
