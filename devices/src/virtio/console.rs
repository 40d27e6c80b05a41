//! virtio-console with `MULTIPORT` and one named port, `msb.agent`: the agent channel.
//!
//! Queue 0 (port 0 receiveq) carries host-to-guest bytes, queue 1 (port 0 transmitq)
//! guest-to-host bytes, queues 2 and 3 the control channel. A generic (non-console) port is
//! used on purpose: the guest's hvc console path busy-waits until the host consumes each
//! write, while a port's writes complete asynchronously. The core only moves bytes; framing is
//! the agent client's job.
//!
//! A driver that does not negotiate `MULTIPORT` gets the legacy single port on queues 0/1.
//!
//! Control protocol (device side): on `DEVICE_READY` announce port 0 (`DEVICE_ADD`); on
//! `PORT_READY` name it [`PORT_NAME`] and open it from the host side (`PORT_OPEN`).
//! Guest control messages are 8 bytes; anything shorter is a contract violation.
//!
//! Bounds: host-to-guest bytes waiting for guest buffers are capped at [`TO_GUEST_LIMIT`]
//! (a full buffer refuses new data, all or nothing, so frames are never cut); one transmit
//! chain may carry at most [`MAX_CHAIN_BYTES`]; one drain call stops at its byte budget, so
//! the caller's credit window bounds what is in flight towards the host. One servicing round
//! does at most [`ROUND_WORK`] of work, counting [`DESC_COST`](super::DESC_COST) per descriptor on top of the
//! bytes moved (so zero-length descriptors are not free); a round cut short says so
//! ([`Serviced::more`]) and the caller schedules the next.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{add_used, pop_chain, read_chain, write_chain, DeviceError, VirtioDevice, TYPE_CONSOLE};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const CONTROL_RX_QUEUE: u16 = 2;
pub const CONTROL_TX_QUEUE: u16 = 3;
/// The agent port's name, visible in the guest at `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = msb_protocol::AGENT_PORT_NAME;
/// Most control messages waiting for guest buffers.
pub const MAX_CONTROL_PENDING: usize = 16;
const F_MULTIPORT: u64 = 1 << 1;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME_EVENT: u16 = 7;
pub const QUEUE_SIZE: u16 = 256;
/// Most host-to-guest bytes buffered while the guest has no receive buffers posted.
pub const TO_GUEST_LIMIT: usize = 4 * 1024 * 1024;
/// Most bytes one guest transmit chain may carry.
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;
pub use super::ROUND_WORK;

/// The host-to-guest buffer is full; retry after the guest has consumed some.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("agent channel to the guest is full ({pending} bytes pending)")]
pub struct Full {
    pub pending: usize,
}

#[derive(Debug, Default)]
pub struct Console {
    to_guest: VecDeque<u8>,
    control_out: VecDeque<Vec<u8>>,
    guest_open: bool,
    multiport: bool,
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, 32, 32]
    }
    fn device_features(&self) -> u64 {
        F_MULTIPORT
    }
    fn ack_features(&mut self, features: u64) {
        self.multiport = features & F_MULTIPORT != 0;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { u16 cols; u16 rows; u32 max_nr_ports; u32 emerg_wr; }
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        super::config_window(&cfg, offset, data);
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn undelivered(&self) -> usize {
        self.to_guest.len()
    }
}

fn control(event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + extra.len());
    m.extend_from_slice(&0u32.to_le_bytes()); // port id 0
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

/// What one servicing round of the console moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Serviced {
    /// Bytes the guest wrote to the agent port.
    pub from_guest: Vec<u8>,
    /// Queued host bytes the guest took.
    pub drained: usize,
    /// The round stopped at [`ROUND_WORK`] with buffers left: service again soon (the guest
    /// will not notify for buffers it already posted).
    pub more: bool,
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

    /// Whether the guest has the agent port open.
    pub fn guest_open(&self) -> bool {
        self.guest_open
    }

    fn push_control(&mut self, msg: Vec<u8>) -> Result<(), DeviceError> {
        if self.control_out.len() >= MAX_CONTROL_PENDING {
            return Err(DeviceError::BadQueue {
                queue: CONTROL_RX_QUEUE,
                what: "guest does not drain the control queue".into(),
            });
        }
        self.control_out.push_back(msg);
        Ok(())
    }

    /// Serves both control queues: reads the guest's control messages, answers them, and
    /// delivers pending answers. Returns whether any buffer was used.
    /// A driver without `MULTIPORT` has no control queues: port 0 is simply open.
    pub fn process_control(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        if !self.multiport {
            return Ok(false);
        }
        let mut used = false;
        let tx = &mut queues[CONTROL_TX_QUEUE as usize];
        for _ in 0..if tx.ready() { tx.size() } else { 0 } {
            let Some(chain) = pop_chain(tx, mem, CONTROL_TX_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let mut msg = Vec::new();
            read_chain(mem, chain, CONTROL_TX_QUEUE, 64, &mut msg)?;
            add_used(tx, mem, CONTROL_TX_QUEUE, head, 0)?;
            used = true;
            if msg.len() < 8 {
                return Err(DeviceError::BadChain {
                    queue: CONTROL_TX_QUEUE,
                    head,
                    what: format!("control message of {} bytes, want 8", msg.len()),
                });
            }
            let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let event = u16::from_le_bytes([msg[4], msg[5]]);
            let value = u16::from_le_bytes([msg[6], msg[7]]);
            match (event, id) {
                (DEVICE_READY, _) if value == 1 => self.push_control(control(DEVICE_ADD, 0, &[]))?,
                (PORT_READY, 0) if value == 1 => {
                    self.push_control(control(PORT_NAME_EVENT, 1, PORT_NAME.as_bytes()))?;
                    self.push_control(control(PORT_OPEN, 1, &[]))?;
                }
                (PORT_OPEN, 0) => self.guest_open = value == 1,
                _ => tracing::debug!(event, id, value, "virtio-console: ignored control message"),
            }
        }
        let rx = &mut queues[CONTROL_RX_QUEUE as usize];
        for _ in 0..if rx.ready() { rx.size() } else { 0 } {
            if self.control_out.is_empty() {
                break;
            }
            let Some(chain) = pop_chain(rx, mem, CONTROL_RX_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let msg = self.control_out.pop_front().expect("checked non-empty");
            let mut at = 0;
            let (n, _) = write_chain(mem, chain, CONTROL_RX_QUEUE, msg.len(), &mut |buf| {
                let n = buf.len().min(msg.len() - at);
                buf[..n].copy_from_slice(&msg[at..at + n]);
                at += n;
                n
            })?;
            add_used(rx, mem, CONTROL_RX_QUEUE, head, n)?;
            used = true;
        }
        Ok(used)
    }

    /// Moves queued bytes into the guest's receive buffers, within [`ROUND_WORK`]. Returns
    /// whether any buffer was used, and whether it stopped at the work bound.
    pub fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        if !q.ready() {
            return Ok((false, false));
        }
        let mut work = 0;
        for _ in 0..q.size() {
            if self.to_guest.is_empty() {
                break;
            }
            if work >= ROUND_WORK {
                return Ok((used, true));
            }
            let Some(chain) = pop_chain(q, mem, RX_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let to_guest = &mut self.to_guest;
            let (n, cost) = write_chain(mem, chain, RX_QUEUE, MAX_CHAIN_BYTES, &mut |buf| {
                let n = buf.len().min(to_guest.len());
                for (d, s) in buf.iter_mut().zip(to_guest.drain(..n)) {
                    *d = s;
                }
                n
            })?;
            work += cost;
            add_used(q, mem, RX_QUEUE, head, n)?;
            used = true;
        }
        Ok((used, false))
    }

    /// One servicing round, in the device's fixed order: the control queues, then receive
    /// buffers filled from what the host queued, then transmit chains drained until `budget`
    /// guest bytes have been taken (0: none). Returns the guest's bytes, how many queued host
    /// bytes the guest took, and whether the driver must be signalled.
    pub fn service(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        budget: usize,
    ) -> Result<(Serviced, bool), DeviceError> {
        let pending_before = self.to_guest.len();
        let mut signal = self.process_control(queues, mem)?;
        let (filled, more_rx) = self.fill_rx(&mut queues[RX_QUEUE as usize], mem)?;
        signal |= filled;
        let mut from_guest = Vec::new();
        let mut more_tx = false;
        if budget > 0 {
            let (drained, more) = self.drain_tx(&mut queues[TX_QUEUE as usize], mem, budget, &mut from_guest)?;
            signal |= drained;
            more_tx = more;
        }
        let drained = pending_before.saturating_sub(self.to_guest.len());
        Ok((Serviced { from_guest, drained, more: more_rx || more_tx }, signal))
    }

    /// Copies guest transmit chains into `out` until `budget` bytes have been taken, the
    /// round's [`ROUND_WORK`] is done, or the queue is empty. Returns whether any buffer was
    /// used, and whether it stopped at the work bound with chains possibly left.
    pub fn drain_tx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let start = out.len();
        if !q.ready() {
            return Ok((false, false));
        }
        let mut work = 0;
        for _ in 0..q.size() {
            if out.len() - start >= budget {
                break;
            }
            if work >= ROUND_WORK {
                return Ok((used, true));
            }
            let Some(chain) = pop_chain(q, mem, TX_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            work += read_chain(mem, chain, TX_QUEUE, MAX_CHAIN_BYTES, out)?;
            add_used(q, mem, TX_QUEUE, head, 0)?;
            used = true;
        }
        Ok((used, false))
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
        assert!(c.drain_tx(&mut q, &m, 1 << 20, &mut out).unwrap().0);
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
    fn zero_length_descriptors_are_paid_for_and_a_round_is_bounded() {
        let m = mem();
        // The storm: one chain of 256 zero-length descriptors, and every available entry
        // naming it (a chain's worth of walking for each, carrying nothing).
        let vq = MockSplitQueue::new(&m, 256);
        let descs: Vec<RawDescriptor> = (0..256u16)
            .map(|i| desc(0x8000, 0, if i == 255 { 0 } else { F_NEXT }, if i == 255 { 0 } else { i + 1 }))
            .collect();
        vq.build_desc_chain(&descs).unwrap();
        for i in 0..256 {
            vq.avail().ring().ref_at(i).unwrap().store(u16::to_le(0));
        }
        vq.avail().idx().store(u16::to_le(256));
        let mut q: Queue = vq.create_queue().unwrap();
        let per_chain = 256 * crate::virtio::DESC_COST;
        let mut rounds = 0;
        let mut dev = Console::default();
        loop {
            let mut out = Vec::new();
            let before = vq.used().idx().load();
            let (_, more) = dev.drain_tx(&mut q, &m, usize::MAX, &mut out).unwrap();
            let chains = usize::from(vq.used().idx().load().wrapping_sub(before));
            // A round stops once its work reaches the bound: at most one chain past it.
            assert!(chains <= ROUND_WORK / per_chain + 1, "one round walked {chains} chains");
            assert!(out.is_empty());
            rounds += 1;
            if !more {
                break;
            }
        }
        assert_eq!(vq.used().idx().load(), 256, "every chain is served, over several rounds");
        assert!(rounds >= 256 / ROUND_WORK.div_ceil(per_chain), "{rounds} rounds");
    }

    #[test]
    fn tx_stops_at_budget() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_multiple_desc_chains(&[desc(0x8000, 100, 0, 0), desc(0x9000, 100, 0, 0), desc(0xa000, 100, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut out = Vec::new();
        Console::default().drain_tx(&mut q, &m, 150, &mut out).unwrap();
        assert_eq!(out.len(), 200, "whole chains until the budget is reached");
        assert_eq!(vq.used().idx().load(), 2);
    }

    #[test]
    fn one_service_round_fills_rx_then_drains_tx_within_its_budget() {
        let m = mem();
        let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
        let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
        rx.build_desc_chain(&[desc(0x8000, 64, F_WRITE, 0)]).unwrap();
        m.write_slice(b"from guest", GuestAddress(0x9000)).unwrap();
        tx.build_desc_chain(&[desc(0x9000, 10, 0, 0)]).unwrap();
        let empty = |at| MockSplitQueue::create(&m, GuestAddress(at), 16).create_queue::<Queue>().unwrap();
        let mut queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap(), empty(0x30000), empty(0x40000)];
        let mut c = Console::default();
        c.queue_to_guest(b"to guest").unwrap();
        // No budget: the host bytes go out, the guest's stay queued.
        let (done, signal) = c.service(&mut queues, &m, 0).unwrap();
        assert_eq!(done, Serviced { from_guest: Vec::new(), drained: 8, more: false });
        assert!(signal, "a used receive buffer is signalled");
        assert_eq!(tx.used().idx().load(), 0);
        let (done, signal) = c.service(&mut queues, &m, 1 << 20).unwrap();
        assert_eq!(done, Serviced { from_guest: b"from guest".to_vec(), drained: 0, more: false });
        assert!(signal);
        let (done, signal) = c.service(&mut queues, &m, 1 << 20).unwrap();
        assert_eq!((done, signal), (Serviced::default(), false), "nothing to do, nothing to signal");
    }

    #[test]
    fn an_indirect_descriptor_fails_the_chain_because_it_was_never_offered() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Head points at a (plausible) indirect table of 4 descriptors.
        vq.build_desc_chain(&[desc(0x8000, 64, 4 /* VIRTQ_DESC_F_INDIRECT */, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, 1 << 20, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("indirect"), "{e}");
        // An indirect descriptor further down the chain too.
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x9000, 8, F_NEXT, 1), desc(0x8000, 64, 4, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, 1 << 20, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("indirect"), "{e}");
    }

    #[test]
    fn a_broken_available_ring_fails_the_device_instead_of_being_logged() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[desc(0x8000, 4, 0, 0)]).unwrap();
        // The driver claims far more new entries than the ring holds.
        vq.avail().idx().store(1000u16);
        let mut q: Queue = vq.create_queue().unwrap();
        let e = Console::default().drain_tx(&mut q, &m, 1 << 20, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, DeviceError::BadQueue { queue: TX_QUEUE, .. }), "{e}");
        assert!(e.to_string().contains("available ring"), "{e}");
    }

    #[test]
    fn descriptor_loop_is_bounded() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 4);
        // 0 -> 1 -> 0 -> ... : a loop; the chain iterator's TTL must end it.
        vq.desc_table().store(0, desc(0x8000, 8, F_NEXT, 1)).unwrap();
        vq.desc_table().store(1, desc(0x9000, 8, F_NEXT, 0)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16);
        vq.avail().idx().store(1u16);
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
        assert!(c.fill_rx(&mut q, &m).unwrap().0);
        let mut a = [0u8; 4];
        m.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_eq!(&a, b"abcd");
        m.read_slice(&mut a, GuestAddress(0x9000)).unwrap();
        assert_eq!(&a, b"efgh");
        assert_eq!(c.pending_to_guest(), 0);
        assert!(!c.fill_rx(&mut q, &m).unwrap().0, "nothing to send");

        let mut c = Console::default();
        c.queue_to_guest(&vec![0; TO_GUEST_LIMIT]).unwrap();
        assert_eq!(c.queue_to_guest(b"x"), Err(Full { pending: TO_GUEST_LIMIT }));
    }
}

#[cfg(test)]
mod control_tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn handshake_names_and_opens_the_port() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let empty = |at| MockSplitQueue::create(&m, GuestAddress(at), 16);
        let (q0, q1) = (empty(0x10000), empty(0x20000));
        let ctl_rx = MockSplitQueue::create(&m, GuestAddress(0x30000), 16);
        let ctl_tx = MockSplitQueue::create(&m, GuestAddress(0x40000), 16);
        // Guest: DEVICE_READY(1), then PORT_READY(port 0, 1).
        m.write_slice(&control(DEVICE_READY, 1, &[]), GuestAddress(0x50000)).unwrap();
        m.write_slice(&control(PORT_READY, 1, &[]), GuestAddress(0x50100)).unwrap();
        ctl_tx.build_multiple_desc_chains(&[desc(0x50000, 8, 0), desc(0x50100, 8, 0)]).unwrap();
        ctl_rx.build_multiple_desc_chains(&[desc(0x60000, 64, 2), desc(0x60100, 64, 2), desc(0x60200, 64, 2)]).unwrap();
        let mut queues: Vec<Queue> = vec![
            q0.create_queue().unwrap(),
            q1.create_queue().unwrap(),
            ctl_rx.create_queue().unwrap(),
            ctl_tx.create_queue().unwrap(),
        ];
        let mut c = Console::default();
        assert!(!c.process_control(&mut queues, &m).unwrap(), "no control queues without MULTIPORT");
        c.ack_features(F_MULTIPORT);
        assert!(c.process_control(&mut queues, &m).unwrap());
        let read = |at: u64, n: usize| {
            let mut b = vec![0u8; n];
            m.read_slice(&mut b, GuestAddress(at)).unwrap();
            b
        };
        assert_eq!(read(0x60000, 8), control(DEVICE_ADD, 0, &[]));
        assert_eq!(read(0x60100, 8 + PORT_NAME.len()), control(PORT_NAME_EVENT, 1, PORT_NAME.as_bytes()));
        assert_eq!(read(0x60200, 8), control(PORT_OPEN, 1, &[]));
        let mut cfg = [0u8; 4];
        c.read_config(4, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 1, "one port");
    }

    #[test]
    fn short_control_message_is_a_violation() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut queues = control_queues(&m, &[desc(0x50000, 4, 0)]);
        let mut c = Console::default();
        c.ack_features(F_MULTIPORT);
        let e = c.process_control(&mut queues, &m).unwrap_err();
        assert!(e.to_string().contains("want 8"), "{e}");
    }

    /// Four empty queues, the control transmit queue holding `ctl_tx` (one chain each).
    fn control_queues(m: &GuestMemoryMmap, ctl_tx: &[RawDescriptor]) -> Vec<Queue> {
        let mk = |at| MockSplitQueue::create(m, GuestAddress(at), 32);
        let qs = [mk(0x10000), mk(0x20000), mk(0x30000), mk(0x40000)];
        qs[3].build_multiple_desc_chains(ctl_tx).unwrap();
        qs.iter().map(|q| q.create_queue().unwrap()).collect()
    }

    #[test]
    fn control_answers_the_guest_never_collects_are_bounded() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // 20 DEVICE_READY messages and no control receive buffers: answers pile up.
        m.write_slice(&control(DEVICE_READY, 1, &[]), GuestAddress(0x50000)).unwrap();
        let mut queues = control_queues(&m, &vec![desc(0x50000, 8, 0); 20]);
        let mut c = Console::default();
        c.ack_features(F_MULTIPORT);
        let e = c.process_control(&mut queues, &m).unwrap_err();
        assert!(e.to_string().contains("does not drain"), "{e}");
        assert!(c.control_out.len() <= MAX_CONTROL_PENDING);
    }
}
