//! virtio-net: Ethernet frames between the guest and the network gateway (which is the only
//! thing on the other side: no TAP, no host bridge).
//!
//! Queue 0 (receiveq) carries host-to-guest frames, queue 1 (transmitq) guest-to-host
//! frames. Offered features: `MAC`, `MTU` and `STATUS` (link up); no checksum or
//! segmentation offload, so every frame is a whole Ethernet frame of at most [`MAX_FRAME`]
//! bytes with a correct checksum, and the gateway never has to trust a "checksum partial"
//! claim. Each frame in a chain is preceded by the 12-byte `virtio_net_hdr_v1`.
//!
//! Invariants: every transmit chain is copied out of guest memory (at most [`MAX_CHAIN`]
//! bytes; a longer chain or a device-writable descriptor in it breaks the contract and
//! fails the device) before it is looked at; a frame whose header asks for an offload that
//! was never offered, or whose size is not that of an Ethernet frame, is dropped and
//! counted, and the device carries on. Host-to-guest frames wait in a queue of at most
//! [`MAX_PENDING`] frames (a full queue refuses the frame: the gateway keeps it or drops it,
//! its choice); a receive chain too small for its frame gets the frame dropped and counted.
//! One servicing round does at most [`ROUND_WORK`] of work per direction.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{add_used, pop_chain, read_chain, write_chain, DeviceError, VirtioDevice, ROUND_WORK, TYPE_NET};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const QUEUE_SIZE: u16 = 256;
/// The MTU the device announces.
pub const MTU: u16 = 1500;
/// Largest Ethernet frame (no FCS): MTU plus the 14-byte header.
pub const MAX_FRAME: usize = MTU as usize + 14;
/// Smallest frame taken: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HEADER: usize = 12;
/// Longest transmit chain: a header and a whole frame.
pub const MAX_CHAIN: usize = HEADER + MAX_FRAME;
/// Most host-to-guest frames waiting for receive buffers.
pub const MAX_PENDING: usize = 256;

/// Feature bits (virtio 1.x §5.1.3).
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

/// The queue of frames for the guest is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest's receive queue is full ({MAX_PENDING} frames)")]
pub struct Full;

/// Frames dropped, by reason (a guest can drive these; they are counted, not logged).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Transmit frames whose header asked for an offload never offered.
    pub bad_header: u64,
    /// Transmit frames shorter than an Ethernet header or longer than [`MAX_FRAME`].
    pub bad_size: u64,
    /// Receive frames that did not fit the guest's buffer.
    pub rx_too_small: u64,
}

/// What one servicing round moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetServiced {
    /// Frames the guest sent, checked for size, header stripped.
    pub from_guest: Vec<Vec<u8>>,
    /// Queued frames the guest took.
    pub delivered: usize,
    /// Used buffers were published: signal the guest.
    pub notify: bool,
    /// A round stopped at its work bound with chains left: service again soon.
    pub more: bool,
}

#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    to_guest: VecDeque<Vec<u8>>,
    dropped: Dropped,
    buf: Vec<u8>,
}

impl Net {
    pub fn new(mac: [u8; 6]) -> Self {
        Net { mac, to_guest: VecDeque::new(), dropped: Dropped::default(), buf: Vec::new() }
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Frames waiting for the guest.
    pub fn pending(&self) -> usize {
        self.to_guest.len()
    }

    /// Queues a frame for the guest. Frames outside [`MIN_FRAME`]..=[`MAX_FRAME`] are a host
    /// bug and refused the same way as a full queue.
    pub fn push_frame(&mut self, frame: Vec<u8>) -> Result<(), Full> {
        if self.to_guest.len() >= MAX_PENDING || !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(Full);
        }
        self.to_guest.push_back(frame);
        Ok(())
    }

    /// One round over both queues, taking at most `tx_budget` frames from the guest (the
    /// credit its consumer has left; at 0 the guest's transmit buffers stay where they are,
    /// which pushes back on its sender).
    pub fn service(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        tx_budget: usize,
    ) -> Result<NetServiced, DeviceError> {
        let mut out = NetServiced::default();
        let (rx, tx) = queues.split_at_mut(1);
        self.transmit(&mut tx[0], mem, tx_budget, &mut out)?;
        self.receive(&mut rx[0], mem, &mut out)?;
        Ok(out)
    }

    fn transmit(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        budget: usize,
        out: &mut NetServiced,
    ) -> Result<(), DeviceError> {
        if !q.ready() {
            return Ok(());
        }
        let mut work = 0;
        for _ in 0..q.size() {
            if out.from_guest.len() >= budget {
                return Ok(());
            }
            if work >= ROUND_WORK {
                out.more = true;
                return Ok(());
            }
            let Some(chain) = pop_chain(q, mem, TX_QUEUE)? else { return Ok(()) };
            let head = chain.head_index();
            self.buf.clear();
            work += read_chain(mem, chain, TX_QUEUE, MAX_CHAIN, &mut self.buf)?;
            add_used(q, mem, TX_QUEUE, head, 0)?;
            out.notify = true;
            if self.buf.len() < HEADER {
                self.dropped.bad_size += 1;
                continue;
            }
            let (hdr, frame) = self.buf.split_at(HEADER);
            // flags (NEEDS_CSUM, DATA_VALID) and gso_type must be zero: nothing was offered.
            if hdr[0] != 0 || hdr[1] != 0 {
                self.dropped.bad_header += 1;
                continue;
            }
            if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
                self.dropped.bad_size += 1;
                continue;
            }
            out.from_guest.push(frame.to_vec());
        }
        Ok(())
    }

    fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, out: &mut NetServiced) -> Result<(), DeviceError> {
        if !q.ready() {
            return Ok(());
        }
        let mut work = 0;
        while let Some(frame) = self.to_guest.front() {
            if work >= ROUND_WORK {
                out.more = true;
                return Ok(());
            }
            let Some(chain) = pop_chain(q, mem, RX_QUEUE)? else { return Ok(()) };
            let head = chain.head_index();
            let mut hdr = [0u8; HEADER];
            hdr[10] = 1; // num_buffers
            let whole: Vec<u8> = hdr.iter().chain(frame.iter()).copied().collect();
            let mut at = 0;
            let (written, cost) = write_chain(mem, chain, RX_QUEUE, whole.len(), &mut |dst| {
                let n = dst.len().min(whole.len() - at);
                dst[..n].copy_from_slice(&whole[at..at + n]);
                at += n;
                n
            })?;
            work += cost;
            let len = if written as usize == whole.len() {
                out.delivered += 1;
                written
            } else {
                self.dropped.rx_too_small += 1;
                0
            };
            self.to_guest.pop_front();
            add_used(q, mem, RX_QUEUE, head, len)?;
            out.notify = true;
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        F_MAC | F_MTU | F_STATUS
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&MTU.to_le_bytes());
        super::config_window(&cfg, offset, data);
    }
    fn reset(&mut self) {
        // Frames in flight are network traffic: losing them on a reset is what a NIC does.
        self.to_guest.clear();
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    /// Puts `chains` (each a list of (addr, len, flags) descriptors) on a mock queue.
    fn chains<'a>(m: &'a GuestMemoryMmap, chains: &[&[(u64, u32, u16)]]) -> MockSplitQueue<'a, GuestMemoryMmap> {
        let vq = MockSplitQueue::new(m, 16);
        let mut raw = Vec::new();
        for c in chains {
            for (i, &(a, l, f)) in c.iter().enumerate() {
                let next = raw.len() as u16 + 1;
                let f = if i + 1 < c.len() { f | 1 } else { f }; // VRING_DESC_F_NEXT
                raw.push(RawDescriptor::from(SplitDescriptor::new(a, l, f, next)));
            }
        }
        vq.add_desc_chains(&raw, 0).unwrap();
        vq
    }

    /// Sends `chains` on the transmit queue.
    fn transmit(net: &mut Net, m: &GuestMemoryMmap, c: &[&[(u64, u32, u16)]]) -> Result<NetServiced, DeviceError> {
        let vq = chains(m, c);
        let mut qs = [Queue::new(16).unwrap(), vq.create_queue().unwrap()];
        net.service(&mut qs, m, usize::MAX)
    }

    #[test]
    fn transmitted_frames_are_checked_and_stripped_of_their_header() {
        let m = mem();
        let mut net = Net::new([2, 0, 0, 0, 0, 1]);
        let f = frame(60);
        m.write_slice(&[0u8; HEADER], GuestAddress(0x1000)).unwrap();
        m.write_slice(&f, GuestAddress(0x1000 + HEADER as u64)).unwrap();
        // A frame split over two descriptors is one frame.
        m.write_slice(&[0u8; HEADER], GuestAddress(0x3000)).unwrap();
        m.write_slice(&f[..20], GuestAddress(0x3000 + HEADER as u64)).unwrap();
        m.write_slice(&f[20..], GuestAddress(0x4000)).unwrap();
        // An offload the device never offered: dropped.
        let mut hdr = [0u8; HEADER];
        hdr[0] = 1; // NEEDS_CSUM
        m.write_slice(&hdr, GuestAddress(0x5000)).unwrap();
        m.write_slice(&f, GuestAddress(0x5000 + HEADER as u64)).unwrap();
        let out = transmit(
            &mut net,
            &m,
            &[
                &[(0x1000, (HEADER + 60) as u32, 0)],
                &[(0x3000, (HEADER + 20) as u32, 0), (0x4000, 40, 0)],
                &[(0x5000, (HEADER + 60) as u32, 0)],
                &[(0x6000, (HEADER + 5) as u32, 0)],
            ],
        )
        .unwrap();
        assert_eq!(out.from_guest, vec![f.clone(), f]);
        assert!(out.notify);
        assert_eq!(net.dropped(), Dropped { bad_header: 1, bad_size: 1, rx_too_small: 0 });
    }

    #[test]
    fn the_transmit_budget_leaves_the_rest_of_the_guests_frames_in_its_ring() {
        let m = mem();
        let mut net = Net::new([2, 0, 0, 0, 0, 1]);
        for (i, at) in [0x1000u64, 0x2000, 0x3000].into_iter().enumerate() {
            m.write_slice(&[0u8; HEADER], GuestAddress(at)).unwrap();
            m.write_slice(&[i as u8; 60], GuestAddress(at + HEADER as u64)).unwrap();
        }
        let len = (HEADER + 60) as u32;
        let vq = chains(&m, &[&[(0x1000, len, 0)], &[(0x2000, len, 0)], &[(0x3000, len, 0)]]);
        let mut qs = [Queue::new(16).unwrap(), vq.create_queue().unwrap()];
        let out = net.service(&mut qs, &m, 2).unwrap();
        assert_eq!(out.from_guest, vec![vec![0u8; 60], vec![1u8; 60]]);
        assert_eq!(vq.used().idx().load(), 2, "the third chain is not taken");
        assert!(net.service(&mut qs, &m, 0).unwrap().from_guest.is_empty(), "no credit, nothing taken");
        assert_eq!(net.service(&mut qs, &m, 1).unwrap().from_guest, vec![vec![2u8; 60]]);
    }

    #[test]
    fn a_chain_longer_than_a_frame_or_with_a_writable_part_fails_the_device() {
        let m = mem();
        let mut net = Net::new([2, 0, 0, 0, 0, 1]);
        let long = transmit(&mut net, &m, &[&[(0x1000, (MAX_CHAIN + 1) as u32, 0)]]);
        assert!(matches!(long, Err(DeviceError::BadChain { .. })), "{long:?}");
        let writable = transmit(&mut net, &m, &[&[(0x1000, 100, W)]]);
        assert!(matches!(writable, Err(DeviceError::BadChain { .. })), "{writable:?}");
        let outside = transmit(&mut net, &m, &[&[(2 << 20, 100, 0)]]);
        assert!(matches!(outside, Err(DeviceError::BadChain { .. })), "{outside:?}");
    }

    #[test]
    fn frames_for_the_guest_are_bounded_and_delivered_whole_or_dropped() {
        let m = mem();
        let mut net = Net::new([2, 0, 0, 0, 0, 1]);
        for _ in 0..MAX_PENDING {
            net.push_frame(frame(100)).unwrap();
        }
        assert_eq!(net.push_frame(frame(100)), Err(Full), "bounded");
        assert_eq!(Net::new([0; 6]).push_frame(frame(MAX_FRAME + 1)), Err(Full));
        assert_eq!(Net::new([0; 6]).push_frame(frame(13)), Err(Full));
        let mut net = Net::new([2, 0, 0, 0, 0, 1]);
        net.push_frame(frame(100)).unwrap();
        net.push_frame(frame(1000)).unwrap();
        let vq = chains(&m, &[&[(0x1000, 2048, W)], &[(0x2000, 200, W)]]);
        let mut qs = [vq.create_queue().unwrap(), Queue::new(16).unwrap()];
        let out = net.service(&mut qs, &m, usize::MAX).unwrap();
        assert_eq!(out.delivered, 1);
        assert_eq!(net.dropped().rx_too_small, 1, "1,000 bytes do not fit 200");
        assert_eq!(net.pending(), 0);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, HEADER + 100);
        let mut got = vec![0u8; HEADER + 100];
        m.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[HEADER..], &frame(100)[..]);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 0, "the dropped frame's buffer comes back empty");
    }

    #[test]
    fn config_space_says_mac_link_up_and_mtu() {
        let net = Net::new([2, 1, 2, 3, 4, 5]);
        let mut cfg = [0u8; 12];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), MTU);
        let mut tail = [0xffu8; 4];
        net.read_config(10, &mut tail);
        assert_eq!(tail, [0xdc, 0x05, 0, 0]);
        assert_eq!(net.device_features() & (1 << 0), 0, "no checksum offload offered");
    }
}
