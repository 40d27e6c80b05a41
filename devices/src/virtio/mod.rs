//! Virtio devices over the virtio-mmio transport (virtio 1.x, split rings, no event index,
//! no indirect descriptors offered).

pub mod blk;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;

pub use mmio::{MmioSlot, MmioTransport};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
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
    /// Host bytes the device holds for the driver, which a reset would drop. The transport
    /// refuses such a reset and fails the device instead: whoever sent them would wait for
    /// them forever.
    fn undelivered(&self) -> usize {
        0
    }
}

/// A guest broke the virtio contract. The device is not served again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: descriptor chain {head}: {what}")]
    BadChain { queue: u16, head: u16, what: String },
    #[error("queue {queue}: {what}")]
    BadQueue { queue: u16, what: String },
}

/// What one descriptor costs a servicing round, on top of the bytes it carries, so that a
/// storm of zero-length descriptors is paid for like data.
pub const DESC_COST: usize = 64;

/// Work (bytes moved plus [`DESC_COST`] per descriptor) one servicing round of a device may
/// do, per direction.
pub const ROUND_WORK: usize = 256 * 1024;

/// `VIRTQ_DESC_F_NEXT` and `VIRTQ_DESC_F_INDIRECT` (virtio 1.x §2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;

/// Takes the next available chain of `q`. Fails (instead of logging and carrying on, as
/// `pop_descriptor_chain` does) when the available ring is broken, and when the chain uses an
/// indirect descriptor: no device offers `VIRTIO_RING_F_INDIRECT_DESC`, so a driver that
/// sends one breaks the contract, and following it would let one chain name up to 2^28
/// descriptors.
pub(crate) fn pop_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
    queue: u16,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress};
    let (table, size) = (q.desc_table(), q.size());
    let chain = match q.iter(mem) {
        Ok(mut avail) => avail.next(),
        Err(e) => return Err(DeviceError::BadQueue { queue, what: format!("available ring: {e}") }),
    };
    let Some(chain) = chain else { return Ok(None) };
    let head = chain.head_index();
    let bad = |what: String| DeviceError::BadChain { queue, head, what };
    // Walk the chain's descriptors as the driver wrote them (bounded by the queue size; a
    // loop is cut short here and by the chain iterator's own bound).
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(bad(format!("descriptor index {index} is outside the {size}-entry table")));
        }
        let at = GuestAddress(table)
            .checked_add(u64::from(index) * 16)
            .ok_or_else(|| bad("table address overflows".into()))?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at).map_err(|e| bad(format!("descriptor {index}: {e}")))?;
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        if flags & DESC_F_INDIRECT != 0 {
            return Err(bad("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was never offered".into()));
        }
        if flags & DESC_F_NEXT == 0 {
            break;
        }
        index = u16::from_le_bytes([raw[14], raw[15]]);
    }
    Ok(Some(chain))
}

/// Copies the readable part of a chain out of guest memory, at most `limit` bytes, and
/// returns its cost (bytes plus [`DESC_COST`] per descriptor).
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
    let mut descs = 0usize;
    for desc in chain {
        descs += 1;
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
    Ok(out.len() - start + descs * DESC_COST)
}

/// Fills the device-writable part of a chain from `src` (which supplies bytes on demand),
/// at most `limit` bytes. Returns how many bytes were written, and the cost (bytes plus
/// [`DESC_COST`] per descriptor visited).
pub(crate) fn write_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    queue: u16,
    limit: usize,
    src: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Result<(u32, usize), DeviceError> {
    use vm_memory::Bytes;
    let head = chain.head_index();
    let bad = |what: String| DeviceError::BadChain { queue, head, what };
    let mut written = 0usize;
    let mut buf = Vec::new();
    let mut descs = 0usize;
    for desc in chain {
        descs += 1;
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
    Ok((written as u32, written + descs * DESC_COST))
}

/// Answers a driver's read of `data.len()` bytes at `offset` of a device's config space
/// `cfg`: the bytes that fall inside it, zeros past its end.
pub(crate) fn config_window(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start < cfg.len() {
        let n = data.len().min(cfg.len() - start);
        data[..n].copy_from_slice(&cfg[start..start + n]);
    }
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
