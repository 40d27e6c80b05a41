//! virtio-rng: fills the guest's buffers from the host's `getrandom`.
//!
//! Never blocks and never hands out weak bytes: while the host's CRNG is not yet initialised
//! (`getrandom` with `GRND_NONBLOCK` says `EAGAIN`), requests stay queued and the caller is
//! told to retry later. Bounds: at most [`MAX_CHAIN_BYTES`] per chain and one queue's worth of
//! chains per call.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{add_used, pop_chain, write_chain, DeviceError, VirtioDevice, TYPE_RNG};

pub const QUEUE_SIZE: u16 = 64;
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Rng;

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE]
    }
    fn reset(&mut self) {}
}

/// What one round of request processing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngProgress {
    /// Whether any buffer was used.
    Served(bool),
    /// The host CRNG is not ready; try again later.
    HostNotReady,
    /// The round stopped at its work bound with requests possibly left: service again.
    More,
}

fn host_random(buf: &mut [u8]) -> usize {
    use rustix::rand::{getrandom, GetRandomFlags};
    getrandom(&mut *buf, GetRandomFlags::NONBLOCK).unwrap_or_default()
}

impl Rng {
    /// One servicing round over the device's one queue; the flag says whether to signal.
    pub fn service(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<(RngProgress, bool), DeviceError> {
        let progress = self.process(&mut queues[0], mem)?;
        Ok((progress, matches!(progress, RngProgress::Served(true) | RngProgress::More)))
    }

    /// Serves pending requests.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<RngProgress, DeviceError> {
        if !q.ready() {
            return Ok(RngProgress::Served(false));
        }
        if host_random(&mut [0u8; 16]) == 0 {
            return Ok(RngProgress::HostNotReady);
        }
        let mut used = false;
        let mut work = 0;
        for _ in 0..q.size() {
            if work >= super::ROUND_WORK {
                return Ok(RngProgress::More);
            }
            let Some(chain) = pop_chain(q, mem, 0)? else {
                break;
            };
            let head = chain.head_index();
            let (n, cost) = write_chain(mem, chain, 0, MAX_CHAIN_BYTES, &mut host_random)?;
            work += cost;
            add_used(q, mem, 0, head, n)?;
            used = true;
        }
        Ok(RngProgress::Served(used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_up_to_the_bound() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let big = RawDescriptor::from(SplitDescriptor::new(0x10000, 0x80000, 2, 0));
        vq.build_desc_chain(&[big]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(Rng.process(&mut q, &m).unwrap(), RngProgress::Served(true));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), MAX_CHAIN_BYTES as u32);
        let mut buf = [0u8; 64];
        m.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert!(buf.iter().any(|b| *b != 0));
    }
}
