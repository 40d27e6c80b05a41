//! virtio-fs: the transport half. Queue 0 is the high-priority queue (FORGETs), queue 1 the
//! one request queue. The core copies each request's bytes out of guest memory and records
//! where its reply may go; the filesystem broker (which never sees guest memory) parses and
//! serves the bytes; [`Fs::complete`] writes the reply back. The FUSE protocol lives in the
//! broker, not here.
//!
//! Invariants and bounds: a chain's readable descriptors all come before its writable ones
//! (virtio 1.x §2.7.4.2), else the device fails; at most [`MAX_REQUEST`] bytes of a request
//! are copied (a longer one arrives cut short, and the broker answers it as malformed); a
//! reply room is at most [`MAX_REPLY`]; at most [`MAX_IN_FLIGHT`] requests are out at once,
//! and a head that is already out is a contract violation; a reply longer than its room is
//! refused, never written past the guest's buffers. Replies may complete in any order. A
//! reset forgets what is out: replies to requests from before it are dropped (their tokens
//! carry the generation).

use std::collections::HashMap;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{add_used, pop_chain, DeviceError, VirtioDevice, DESC_COST, ROUND_WORK};

pub const TYPE_FS: u32 = 26;
pub const HIPRIO_QUEUE: u16 = 0;
pub const REQUEST_QUEUE: u16 = 1;
pub const QUEUE_SIZE: u16 = 128;
/// Longest filesystem tag (`struct virtio_fs_config`).
pub const TAG_LEN: usize = 36;
/// Most request bytes copied from one chain: a FUSE header, its arguments and a 128 KiB
/// write, with room to spare.
pub const MAX_REQUEST: usize = 136 * 1024;
/// Most reply bytes one chain may take.
pub const MAX_REPLY: usize = 136 * 1024;
/// Most requests out to the broker at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// A tag the guest mounts by: 1..=[`TAG_LEN`] bytes of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    pub fn new(tag: &str) -> Option<Tag> {
        let ok = !tag.is_empty()
            && tag.len() <= TAG_LEN
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        ok.then(|| Tag(tag.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Identifies one request that is out: which queue, which chain, which device generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    pub queue: u16,
    pub head: u16,
    pub generation: u64,
}

/// One request copied out of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRequest {
    pub token: Token,
    /// The readable part of the chain, at most [`MAX_REQUEST`] bytes.
    pub bytes: Vec<u8>,
    /// How many reply bytes the chain's writable part takes.
    pub room: u32,
}

#[derive(Debug)]
pub struct Fs {
    tag: Tag,
    generation: u64,
    /// Writable segments of each request that is out.
    out: HashMap<(u16, u16), Vec<(GuestAddress, u32)>>,
}

impl Fs {
    pub fn new(tag: Tag) -> Fs {
        Fs { tag, generation: 0, out: HashMap::new() }
    }

    /// Requests out to the broker.
    pub fn in_flight(&self) -> usize {
        self.out.len()
    }

    /// Copies out available requests, high-priority queue first, until [`MAX_IN_FLIGHT`]
    /// are out or the round's work is done. Returns them and whether requests may be left.
    pub fn take(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<(Vec<FsRequest>, bool), DeviceError> {
        let mut got = Vec::new();
        let mut work = 0;
        for queue in [HIPRIO_QUEUE, REQUEST_QUEUE] {
            let q = &mut queues[usize::from(queue)];
            if !q.ready() {
                continue;
            }
            loop {
                if self.out.len() >= MAX_IN_FLIGHT || work >= ROUND_WORK {
                    return Ok((got, true));
                }
                let Some(req) = self.take_one(q, mem, queue, &mut work)? else { break };
                got.push(req);
            }
        }
        Ok((got, false))
    }

    fn take_one(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        queue: u16,
        work: &mut usize,
    ) -> Result<Option<FsRequest>, DeviceError> {
        let Some(chain) = pop_chain(q, mem, queue)? else { return Ok(None) };
        let head = chain.head_index();
        let bad = |what: String| DeviceError::BadChain { queue, head, what };
        if self.out.contains_key(&(queue, head)) {
            return Err(bad("a descriptor chain offered again while its request is out".into()));
        }
        let (mut bytes, mut writable, mut room) = (Vec::new(), Vec::new(), 0usize);
        for desc in chain {
            *work += DESC_COST;
            let len = desc.len() as usize;
            if desc.is_write_only() {
                let take = len.min(MAX_REPLY - room);
                if take > 0 {
                    writable.push((desc.addr(), take as u32));
                    room += take;
                }
                continue;
            }
            if !writable.is_empty() {
                return Err(bad("a readable descriptor after a writable one".into()));
            }
            let take = len.min(MAX_REQUEST - bytes.len());
            let at = bytes.len();
            bytes.resize(at + take, 0);
            mem.read_slice(&mut bytes[at..], desc.addr())
                .map_err(|e| bad(format!("descriptor at {:#x}+{len}: {e}", desc.addr().0)))?;
            *work += take;
        }
        self.out.insert((queue, head), writable);
        let token = Token { queue, head, generation: self.generation };
        Ok(Some(FsRequest { token, bytes, room: room as u32 }))
    }

    /// Writes `reply` (empty: none) into the request's buffers and marks its chain used.
    /// Returns whether a buffer was used (false for a stale token).
    pub fn complete(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        token: Token,
        reply: &[u8],
    ) -> Result<bool, DeviceError> {
        if token.generation != self.generation {
            return Ok(false);
        }
        let Some(segments) = self.out.remove(&(token.queue, token.head)) else { return Ok(false) };
        let bad = |what: String| DeviceError::BadChain { queue: token.queue, head: token.head, what };
        let room: usize = segments.iter().map(|(_, l)| *l as usize).sum();
        if reply.len() > room {
            return Err(bad(format!("a {}-byte reply for a {room}-byte buffer", reply.len())));
        }
        let mut at = 0;
        for (addr, len) in segments {
            if at == reply.len() {
                break;
            }
            let n = (len as usize).min(reply.len() - at);
            mem.write_slice(&reply[at..at + n], addr)
                .map_err(|e| bad(format!("reply buffer at {:#x}: {e}", addr.0)))?;
            at += n;
        }
        add_used(&mut queues[usize::from(token.queue)], mem, token.queue, token.head, reply.len() as u32)?;
        Ok(true)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..self.tag.0.len()].copy_from_slice(self.tag.0.as_bytes());
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        super::config_window(&cfg, offset, data);
    }
    fn reset(&mut self) {
        self.out.clear();
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A device with one ready request queue over `m`; returns the mock too.
    fn rig(m: &GuestMemoryMmap) -> (MockSplitQueue<'_, GuestMemoryMmap>, Vec<Queue>) {
        let vq = MockSplitQueue::new(m, 16);
        let q = vq.create_queue().unwrap();
        let mut hiprio = Queue::new(QUEUE_SIZE).unwrap();
        hiprio.set_ready(false);
        (vq, vec![hiprio, q])
    }

    #[test]
    fn a_request_is_copied_out_and_its_reply_written_into_the_writable_part() {
        let m = mem();
        let (vq, mut qs) = rig(&m);
        m.write_slice(b"request!", GuestAddress(0x1000)).unwrap();
        vq.build_desc_chain(&[d(0x1000, 8, N, 1), d(0x2000, 4, W | N, 2), d(0x3000, 16, W, 0)]).unwrap();
        let mut fs = Fs::new(Tag::new("work").unwrap());
        let (reqs, more) = fs.take(&mut qs, &m).unwrap();
        assert!(!more);
        assert_eq!(reqs.len(), 1);
        assert_eq!((reqs[0].bytes.as_slice(), reqs[0].room), (&b"request!"[..], 20));
        assert_eq!(fs.in_flight(), 1);
        assert!(fs.complete(&mut qs, &m, reqs[0].token, b"0123456789").unwrap());
        let mut a = [0u8; 4];
        let mut b = [0u8; 6];
        m.read_slice(&mut a, GuestAddress(0x2000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!((&a, &b), (b"0123", b"456789"));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 10);
        // Completing twice, or a token from before a reset, does nothing.
        assert!(!fs.complete(&mut qs, &m, reqs[0].token, b"").unwrap());
        assert_eq!(fs.in_flight(), 0);
    }

    #[test]
    fn a_reply_longer_than_its_room_is_refused_and_nothing_is_written_past_it() {
        let m = mem();
        let (vq, mut qs) = rig(&m);
        vq.build_desc_chain(&[d(0x1000, 8, N, 1), d(0x2000, 4, W, 0)]).unwrap();
        m.write_slice(&[0xee; 8], GuestAddress(0x2000)).unwrap();
        let mut fs = Fs::new(Tag::new("t").unwrap());
        let (reqs, _) = fs.take(&mut qs, &m).unwrap();
        assert!(fs.complete(&mut qs, &m, reqs[0].token, b"too long").is_err());
        let mut after = [0u8; 8];
        m.read_slice(&mut after, GuestAddress(0x2000)).unwrap();
        assert_eq!(after, [0xee; 8], "nothing written");
    }

    #[test]
    fn readable_after_writable_is_a_contract_violation() {
        let m = mem();
        let (vq, mut qs) = rig(&m);
        vq.build_desc_chain(&[d(0x1000, 8, N, 1), d(0x2000, 4, W | N, 2), d(0x3000, 8, 0, 0)]).unwrap();
        let mut fs = Fs::new(Tag::new("t").unwrap());
        assert!(fs.take(&mut qs, &m).is_err());
    }

    #[test]
    fn an_oversized_request_is_cut_at_the_bound_and_in_flight_is_capped() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&m, 256);
        vq.build_desc_chain(&[d(0x100000, (MAX_REQUEST + 4096) as u32, N, 1), d(0x200000, 64, W, 0)]).unwrap();
        for i in 0..(MAX_IN_FLIGHT + 4) as u16 {
            let (at, first) = (0x300000 + u64::from(i) * 0x100, 2 + 2 * i);
            vq.add_desc_chains(&[d(at, 16, N, first + 1), d(at + 0x80, 16, W, 0)], first).unwrap();
        }
        let mut hiprio = Queue::new(QUEUE_SIZE).unwrap();
        hiprio.set_ready(false);
        let mut qs = vec![hiprio, vq.create_queue().unwrap()];
        let mut fs = Fs::new(Tag::new("t").unwrap());
        let (reqs, more) = fs.take(&mut qs, &m).unwrap();
        assert_eq!(reqs[0].bytes.len(), MAX_REQUEST, "copied up to the bound only");
        assert_eq!(reqs.len(), MAX_IN_FLIGHT);
        assert!(more, "requests are left");
        // Completing one lets one more out.
        fs.complete(&mut qs, &m, reqs[5].token, b"").unwrap();
        let (again, _) = fs.take(&mut qs, &m).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_reset_drops_what_is_out() {
        let m = mem();
        let (vq, mut qs) = rig(&m);
        vq.build_desc_chain(&[d(0x1000, 8, N, 1), d(0x2000, 64, W, 0)]).unwrap();
        let mut fs = Fs::new(Tag::new("t").unwrap());
        let (reqs, _) = fs.take(&mut qs, &m).unwrap();
        fs.reset();
        assert!(!fs.complete(&mut qs, &m, reqs[0].token, b"late").unwrap(), "a stale reply is dropped");
        assert_eq!(fs.in_flight(), 0);
    }

    #[test]
    fn tags_are_short_and_plain_and_the_config_carries_one() {
        assert!(Tag::new("msb-fs-0").is_some());
        for bad in ["", "a b", "x/y", "é", &"x".repeat(37)] {
            assert!(Tag::new(bad).is_none(), "{bad:?}");
        }
        let fs = Fs::new(Tag::new("work").unwrap());
        let mut cfg = [0u8; 40];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..5], b"work\0");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
    }
}
