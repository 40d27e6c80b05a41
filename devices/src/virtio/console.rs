//! virtio-console, single port (no `MULTIPORT`): the agent channel.
//!
//! Queue 0 (receiveq) carries host-to-guest bytes, queue 1 (transmitq) guest-to-host bytes.
//! The core only moves bytes; framing is the agent client's job.
//!
//! Bounds: host-to-guest bytes waiting for guest buffers are capped at [`TO_GUEST_LIMIT`]
//! (a full buffer refuses new data, all or nothing, so frames are never cut); one transmit
//! chain may carry at most [`MAX_CHAIN_BYTES`]; one drain call stops at its byte budget, so
//! the caller's credit window bounds what is in flight towards the host.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{add_used, read_chain, write_chain, DeviceError, VirtioDevice, TYPE_CONSOLE};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const QUEUE_SIZE: u16 = 256;
/// Most host-to-guest bytes buffered while the guest has no receive buffers posted.
pub const TO_GUEST_LIMIT: usize = 4 * 1024 * 1024;
/// Most bytes one guest transmit chain may carry.
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;

/// The host-to-guest buffer is full; retry after the guest has consumed some.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("agent channel to the guest is full ({pending} bytes pending)")]
pub struct Full {
    pub pending: usize,
}

#[derive(Debug, Default)]
pub struct Console {
    to_guest: VecDeque<u8>,
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn reset(&mut self) {
        self.to_guest.clear();
    }
}

impl Console {
    /// Queues bytes for the guest, all or nothing.
    pub fn queue_to_guest(&mut self, data: &[u8]) -> Result<(), Full> {
        if self.to_guest.len() + data.len() > TO_GUEST_LIMIT {
            return Err(Full { pending: self.to_guest.len() });
        }
        self.to_guest.extend(data);
        Ok(())
    }

    pub fn pending_to_guest(&self) -> usize {
        self.to_guest.len()
    }

    /// Moves queued bytes into the guest's receive buffers. Returns whether any buffer was used.
    pub fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        for _ in 0..q.size() {
            if self.to_guest.is_empty() {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let to_guest = &mut self.to_guest;
            let n = write_chain(mem, chain, RX_QUEUE, MAX_CHAIN_BYTES, &mut |buf| {
                let n = buf.len().min(to_guest.len());
                for (d, s) in buf.iter_mut().zip(to_guest.drain(..n)) {
                    *d = s;
                }
                n
            })?;
            add_used(q, mem, RX_QUEUE, head, n)?;
            used = true;
        }
        Ok(used)
    }

    /// Copies guest transmit chains into `out` until `budget` bytes have been taken or the
    /// queue is empty. Returns whether any buffer was used.
    pub fn drain_tx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let start = out.len();
        for _ in 0..q.size() {
            if out.len() - start >= budget {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            read_chain(mem, chain, TX_QUEUE, MAX_CHAIN_BYTES, out)?;
            add_used(q, mem, TX_QUEUE, head, 0)?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn tx_bytes_are_copied_out_in_order() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        m.write_slice(b"world", GuestAddress(0x9000)).unwrap();
        vq.build_desc_chain(&[desc(0x8000, 6, F_NEXT, 1), desc(0x9000, 5, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut c = Console::default();
        let mut out = Vec::new();
        assert!(c.drain_tx(&mut q, &m, 1 << 20, &mut out).unwrap());
        assert_eq!(out, b"hello world");
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn tx_rejects_out_of_range_and_writable_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0xff_f000, 0x2000, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, 1 << 20, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("descriptor at 0xfff000"), "{e}");

        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x8000, 4, F_WRITE, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, 1 << 20, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("device-writable"), "{e}");
    }

    #[test]
    fn tx_rejects_oversized_chain() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x1_0000, MAX_CHAIN_BYTES as u32 + 1, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, usize::MAX, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }

    #[test]
    fn tx_stops_at_budget() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[
            desc(0x8000, 100, 0, 0),
            desc(0x9000, 100, 0, 0),
            desc(0xa000, 100, 0, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut out = Vec::new();
        Console::default().drain_tx(&mut q, &m, 150, &mut out).unwrap();
        assert_eq!(out.len(), 200, "whole chains until the budget is reached");
        assert_eq!(vq.used().idx().load(), 2);
    }

    #[test]
    fn descriptor_loop_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        // 0 -> 1 -> 0 -> ... : a loop; the chain iterator's TTL must end it.
        vq.desc_table().store(0, desc(0x8000, 8, F_NEXT, 1)).unwrap();
        vq.desc_table().store(1, desc(0x9000, 8, F_NEXT, 0)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16.into());
        vq.avail().idx().store(1u16.into());
        let mut q: Queue = vq.create_queue().unwrap();
        let mut out = Vec::new();
        let _ = Console::default().drain_tx(&mut q, &m, usize::MAX, &mut out);
        assert!(out.len() <= 4 * 8, "read {} bytes from a 2-descriptor loop", out.len());
    }

    #[test]
    fn rx_fills_guest_buffers_and_buffer_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[desc(0x8000, 4, F_WRITE, 0), desc(0x9000, 64, F_WRITE, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut c = Console::default();
        c.queue_to_guest(b"abcdefgh").unwrap();
        assert!(c.fill_rx(&mut q, &m).unwrap());
        let mut a = [0u8; 4];
        m.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(&a, b"abcd");
        m.read_slice(&mut a, GuestAddress(0x9000)).unwrap();
        assert_eq!(&a, b"efgh");
        assert_eq!(c.pending_to_guest(), 0);
        assert!(!c.fill_rx(&mut q, &m).unwrap(), "nothing to send");

        let mut c = Console::default();
        c.queue_to_guest(&vec![0; TO_GUEST_LIMIT]).unwrap();
        assert_eq!(c.queue_to_guest(b"x"), Err(Full { pending: TO_GUEST_LIMIT }));
    }
}
