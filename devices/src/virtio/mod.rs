//! Virtio devices over the virtio-mmio transport (virtio 1.x, split rings, no event index,
//! no indirect descriptors offered).

pub mod console;
pub mod mmio;
pub mod rng;

pub use mmio::{MmioSlot, MmioTransport};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;

/// A device behind the transport: its identity and its queue processing.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Device-specific feature bits (the transport adds `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// The driver accepted these feature bits (at `FEATURES_OK`).
    fn ack_features(&mut self, _features: u64) {}
    /// Forget all in-flight state (driver reset).
    fn reset(&mut self);
}

/// A guest broke the virtio contract. The device is not served again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: descriptor chain {head}: {what}")]
    BadChain { queue: u16, head: u16, what: String },
    #[error("queue {queue}: {what}")]
    BadQueue { queue: u16, what: String },
}

/// Copies the readable part of a chain out of guest memory, at most `limit` bytes.
/// Errors if the chain holds a device-writable descriptor, exceeds `limit`, or points
/// outside guest memory.
pub(crate) fn read_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    queue: u16,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<usize, DeviceError> {
    use vm_memory::Bytes;
    let head = chain.head_index();
    let bad = |what: String| DeviceError::BadChain { queue, head, what };
    let start = out.len();
    for desc in chain {
        if desc.is_write_only() {
            return Err(bad("device-writable descriptor in a driver-to-device chain".into()));
        }
        let len = desc.len() as usize;
        if out.len() - start + len > limit {
            return Err(bad(format!("chain is longer than the {limit}-byte limit")));
        }
        let at = out.len();
        out.resize(at + len, 0);
        mem.read_slice(&mut out[at..], desc.addr())
            .map_err(|e| bad(format!("descriptor at {:#x}+{len}: {e}", desc.addr().0)))?;
    }
    Ok(out.len() - start)
}

/// Fills the device-writable part of a chain from `src` (which supplies bytes on demand),
/// at most `limit` bytes. Returns how many bytes were written.
pub(crate) fn write_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    queue: u16,
    limit: usize,
    src: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Result<u32, DeviceError> {
    use vm_memory::Bytes;
    let head = chain.head_index();
    let bad = |what: String| DeviceError::BadChain { queue, head, what };
    let mut written = 0usize;
    let mut buf = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(bad("driver-readable descriptor in a device-to-driver chain".into()));
        }
        let room = (desc.len() as usize).min(limit - written);
        if room == 0 {
            continue;
        }
        buf.resize(room, 0);
        let n = src(&mut buf);
        if n == 0 {
            break;
        }
        mem.write_slice(&buf[..n], desc.addr())
            .map_err(|e| bad(format!("descriptor at {:#x}+{}: {e}", desc.addr().0, desc.len())))?;
        written += n;
    }
    Ok(written as u32)
}

/// Marks `head` used on `q`, mapping queue errors to a device error.
pub(crate) fn add_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    queue: u16,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    use virtio_queue::QueueT;
    q.add_used(mem, head, len)
        .map_err(|e| DeviceError::BadQueue { queue, what: format!("cannot publish used entry: {e}") })
}
