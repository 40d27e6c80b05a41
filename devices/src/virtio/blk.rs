//! virtio-blk: one host file as a guest disk.
//!
//! Every request is parsed once into a checked [`Request`] before any I/O: the chain's
//! layout (driver-readable descriptors, then device-writable ones, the last writable byte
//! being the status), the request type, the sector range (checked arithmetic, inside the
//! disk), the size (whole sectors, at most [`MAX_REQUEST_BYTES`]). What the guest wrote is
//! copied out of guest memory before it is acted on; what it reads is read from the file
//! into a host buffer and then copied in.
//!
//! Invariants: a read-only disk is opened read-only on the host and refuses every write and
//! discard whatever the guest negotiated (status `IOERR`), so the shared image it holds is
//! never written; a request the guest can be told about (bad range, bad size, unknown type,
//! host I/O error) is answered with a status and the device carries on; a chain the device
//! cannot even answer (no status byte, readable after writable, memory outside the guest)
//! fails the device. One servicing round does at most [`ROUND_WORK`](super::ROUND_WORK) of
//! work (bytes moved plus a cost per descriptor), at least one request.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{add_used, pop_chain, DeviceError, VirtioDevice, DESC_COST, TYPE_BLOCK};

pub const QUEUE_SIZE: u16 = 128;
pub const SECTOR: u64 = 512;
/// Largest segment the driver may use (advertised as `size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data segments per request (advertised as `seg_max`; the header and status take two
/// more descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request; larger ones are refused with `IOERR`.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// What a flush costs against a round's work budget (it is an fsync on the host), so a
/// queue full of flushes costs like a few MiB of data, not a few descriptors.
pub const FLUSH_COST: usize = 64 * 1024;
/// Most ranges in one discard request (advertised as `max_discard_seg`).
pub const MAX_DISCARD_SEGS: u32 = 16;
/// Largest discard range, in sectors (advertised as `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// Feature bits (virtio 1.x §5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

/// Request status bytes.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const HEADER: u64 = 16;
const ID_BYTES: usize = 20;

/// One parsed, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes (whole sectors) from `sector` into the writable data area.
    Read {
        sector: u64,
        len: u64,
    },
    /// Write `len` bytes (whole sectors, the readable data after the header) at `sector`.
    Write {
        sector: u64,
        len: u64,
    },
    Flush,
    /// The disk's identity string, at most `len` bytes of it.
    GetId {
        len: u64,
    },
    /// Punch out these `(sector, sectors)` ranges.
    Discard(Vec<(u64, u64)>),
}

/// Why a request is answered with an error status instead of being served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("the disk is read-only")]
    ReadOnly,
}

impl Refused {
    fn status(&self) -> u8 {
        match self {
            Refused::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// Parses a request from its header and the sizes of its two areas: `readable` driver bytes
/// (header included, `body` is what follows the header) and `data_room` device-writable bytes
/// before the status byte. Pure: no guest memory, no file.
pub fn parse(
    header: &[u8; 16],
    body: &[u8],
    data_room: u64,
    capacity: u64,
    read_only: bool,
) -> Result<Request, Refused> {
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let range = |len: u64| -> Result<(), Refused> {
        if len == 0 || !len.is_multiple_of(SECTOR) || len > MAX_REQUEST_BYTES {
            return Err(Refused::Invalid(format!(
                "a transfer of {len} bytes is not 1..={MAX_REQUEST_BYTES} whole sectors"
            )));
        }
        let end = sector.checked_add(len / SECTOR);
        match end {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(Refused::Invalid(format!("sectors {sector}+{} are outside the disk's {capacity}", len / SECTOR))),
        }
    };
    match kind {
        T_IN => {
            if !body.is_empty() {
                return Err(Refused::Invalid("a read carries driver data after its header".into()));
            }
            range(data_room)?;
            Ok(Request::Read { sector, len: data_room })
        }
        T_OUT => {
            if read_only {
                return Err(Refused::ReadOnly);
            }
            if data_room != 0 {
                return Err(Refused::Invalid("a write has device-writable room besides its status".into()));
            }
            let len = body.len() as u64;
            range(len)?;
            Ok(Request::Write { sector, len })
        }
        T_FLUSH => Ok(Request::Flush),
        T_GET_ID => Ok(Request::GetId { len: data_room.min(ID_BYTES as u64) }),
        T_DISCARD => {
            if read_only {
                return Err(Refused::ReadOnly);
            }
            if body.is_empty() || !body.len().is_multiple_of(16) || body.len() / 16 > MAX_DISCARD_SEGS as usize {
                return Err(Refused::Invalid(format!(
                    "a discard of {} bytes is not 1..={MAX_DISCARD_SEGS} 16-byte ranges",
                    body.len()
                )));
            }
            let mut ranges = Vec::with_capacity(body.len() / 16);
            for seg in body.chunks_exact(16) {
                let start = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes")));
                let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
                if flags != 0 {
                    return Err(Refused::Invalid(format!("discard flags {flags:#x} are not supported")));
                }
                if count == 0 || count > u64::from(MAX_DISCARD_SECTORS) {
                    return Err(Refused::Invalid(format!("a discard of {count} sectors")));
                }
                match start.checked_add(count) {
                    Some(end) if end <= capacity => ranges.push((start, count)),
                    _ => {
                        return Err(Refused::Invalid(format!(
                            "discard of sectors {start}+{count} outside the disk's {capacity}"
                        )))
                    }
                }
            }
            Ok(Request::Discard(ranges))
        }
        other => Err(Refused::Unsupported(other)),
    }
}

/// A disk: its file, size and mode.
#[derive(Debug)]
pub struct Blk {
    file: File,
    /// Size in sectors (the file's size rounded down).
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// Reused bounce buffer (at most [`MAX_REQUEST_BYTES`] plus a header).
    buf: Vec<u8>,
}

/// What one round of request processing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkProgress {
    /// Whether any request was completed.
    Served(bool),
    /// The round stopped at its work bound with requests possibly left: service again.
    More,
}

/// A chain's device-writable area: its regions, in order.
struct Writable(Vec<(GuestAddress, u64)>);

impl Writable {
    fn len(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }

    /// Writes `data` at `offset` into the area (the caller checked it fits).
    fn write(&self, mem: &GuestMemoryMmap, mut offset: u64, mut data: &[u8]) -> Result<(), String> {
        for &(addr, len) in &self.0 {
            if data.is_empty() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len());
            let at = addr.checked_add(offset).ok_or("address overflows")?;
            mem.write_slice(&data[..n], at).map_err(|e| format!("descriptor at {:#x}+{len}: {e}", addr.0))?;
            data = &data[n..];
            offset = 0;
        }
        Ok(())
    }
}

impl Blk {
    /// Opens `path` as a disk; `read_only` opens it read-only on the host.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        let mut id = [0u8; ID_BYTES];
        let name = if read_only { msb_protocol::IMAGE_DISK_SERIAL } else { msb_protocol::ROOT_DISK_SERIAL }.as_bytes();
        id[..name.len()].copy_from_slice(name);
        Ok(Blk { file, capacity: size / SECTOR, read_only, id, buf: Vec::new() })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// One servicing round over the device's one queue; the flag says whether to signal.
    pub fn service(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<(BlkProgress, bool), DeviceError> {
        let progress = self.process(&mut queues[0], mem)?;
        Ok((progress, matches!(progress, BlkProgress::Served(true) | BlkProgress::More)))
    }

    /// Serves pending requests, up to the round's work bound.
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<BlkProgress, DeviceError> {
        if !q.ready() {
            return Ok(BlkProgress::Served(false));
        }
        let mut served = false;
        let mut work = 0;
        for _ in 0..q.size() {
            if work >= super::ROUND_WORK {
                return Ok(BlkProgress::More);
            }
            let Some(chain) = pop_chain(q, mem, 0)? else { break };
            let head = chain.head_index();
            let bad = |what: String| DeviceError::BadChain { queue: 0, head, what };
            // The chain's layout: readable descriptors, then writable ones.
            let mut readable = Vec::new();
            let mut writable = Writable(Vec::new());
            for desc in chain {
                work += DESC_COST;
                let region = (desc.addr(), u64::from(desc.len()));
                if desc.is_write_only() {
                    writable.0.push(region);
                } else if writable.0.is_empty() {
                    readable.push(region);
                } else {
                    return Err(bad("a driver-readable descriptor follows a device-writable one".into()));
                }
            }
            let room = writable.len();
            if room == 0 {
                return Err(bad("no device-writable byte for the request's status".into()));
            }
            let rlen: u64 = readable.iter().map(|r| r.1).sum();
            let (status, used) = if !(HEADER..=HEADER + MAX_REQUEST_BYTES).contains(&rlen) {
                (S_IOERR, 1)
            } else {
                // Copy the driver's bytes out before looking at them.
                self.buf.clear();
                self.buf.resize(rlen as usize, 0);
                let mut at = 0usize;
                for &(addr, len) in &readable {
                    mem.read_slice(&mut self.buf[at..at + len as usize], addr)
                        .map_err(|e| bad(format!("descriptor at {:#x}+{len}: {e}", addr.0)))?;
                    at += len as usize;
                }
                work += rlen as usize;
                let header: [u8; 16] = self.buf[..16].try_into().expect("16 bytes");
                match parse(&header, &self.buf[16..], room - 1, self.capacity, self.read_only) {
                    Ok(req) => {
                        if matches!(req, Request::Flush | Request::Discard(_)) {
                            work += FLUSH_COST;
                        }
                        let (status, data) = self.serve(&req, &writable, mem).map_err(bad)?;
                        work += data as usize;
                        (status, data + 1)
                    }
                    Err(refused) => {
                        tracing::debug!(%refused, "virtio-blk request refused");
                        (refused.status(), 1)
                    }
                }
            };
            writable.write(mem, room - 1, &[status]).map_err(bad)?;
            add_used(q, mem, 0, head, used as u32)?;
            served = true;
        }
        Ok(BlkProgress::Served(served))
    }

    /// Performs a checked request. Returns its status and how many data bytes it wrote into
    /// the guest; `Err` only for guest memory the chain named but the guest does not have.
    fn serve(&mut self, req: &Request, writable: &Writable, mem: &GuestMemoryMmap) -> Result<(u8, u64), String> {
        let io = |r: std::io::Result<()>| match r {
            Ok(()) => S_OK,
            Err(e) => {
                tracing::debug!("virtio-blk host I/O: {e}");
                S_IOERR
            }
        };
        Ok(match *req {
            Request::Read { sector, len } => {
                let mut data = std::mem::take(&mut self.buf);
                data.clear();
                data.resize(len as usize, 0);
                let status = io(self.file.read_exact_at(&mut data, sector * SECTOR));
                let written = if status == S_OK {
                    writable.write(mem, 0, &data)?;
                    len
                } else {
                    0
                };
                self.buf = data;
                (status, written)
            }
            Request::Write { sector, len } => {
                debug_assert!(!self.read_only);
                let status = io(self.file.write_all_at(&self.buf[16..16 + len as usize], sector * SECTOR));
                (status, 0)
            }
            Request::Flush => (if self.read_only { S_OK } else { io(self.file.sync_data()) }, 0),
            Request::GetId { len } => {
                writable.write(mem, 0, &self.id[..len as usize])?;
                (S_OK, len)
            }
            Request::Discard(ref ranges) => {
                let mut status = S_OK;
                for &(start, count) in ranges {
                    let r = rustix::fs::fallocate(
                        &self.file,
                        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                        start * SECTOR,
                        count * SECTOR,
                    );
                    if let Err(e) = r {
                        tracing::debug!("virtio-blk discard: {e}");
                        status = S_IOERR;
                    }
                }
                (status, 0)
            }
        })
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let base = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            base | F_RO
        } else {
            base | F_DISCARD
        }
    }

    /// The configuration layout of virtio 1.x §5.2.4, up to the discard fields.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 48];
        cfg[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        cfg[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        cfg[34..36].copy_from_slice(&1u16.to_le_bytes());
        cfg[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        cfg[40..44].copy_from_slice(&MAX_DISCARD_SEGS.to_le_bytes());
        cfg[44..48].copy_from_slice(&1u32.to_le_bytes());
        super::config_window(&cfg, offset, data);
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const R: u16 = 0;
    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn disk(sectors: u64, read_only: bool) -> (tempfile::NamedTempFile, Blk) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut content = Vec::new();
        for s in 0..sectors {
            content.extend(std::iter::repeat_n(s as u8, SECTOR as usize));
        }
        f.write_all(&content).unwrap();
        let blk = Blk::open(f.path(), read_only).unwrap();
        (f, blk)
    }

    /// Runs one chain of `(addr, len, flags)` descriptors; returns the used length.
    fn run(blk: &mut Blk, m: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Result<u32, DeviceError> {
        let vq = MockSplitQueue::new(m, 16);
        let raw: Vec<RawDescriptor> =
            descs.iter().map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0))).collect();
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        blk.process(&mut q, m)?;
        Ok(vq.used().ring().ref_at(0).unwrap().load().len())
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
        m.read_obj::<u8>(GuestAddress(at)).unwrap()
    }

    #[test]
    fn reads_and_writes_whole_sectors() {
        let m = mem();
        let (f, mut blk) = disk(8, false);
        m.write_slice(&header(T_IN, 2), GuestAddress(0x1000)).unwrap();
        let used = run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 1024, W), (0x3000, 1, W)]).unwrap();
        assert_eq!(used, 1025);
        assert_eq!(status(&m, 0x3000), S_OK);
        let mut got = [0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 2) && got[512..].iter().all(|b| *b == 3));

        m.write_slice(&header(T_OUT, 7), GuestAddress(0x1000)).unwrap();
        m.write_slice(&[0xabu8; 512], GuestAddress(0x2000)).unwrap();
        assert_eq!(run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 512, R), (0x3000, 1, W)]).unwrap(), 1);
        assert_eq!(status(&m, 0x3000), S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[7 * 512..].iter().all(|b| *b == 0xab));
        assert!(on_disk[6 * 512..7 * 512].iter().all(|b| *b == 6), "only the named sector changed");
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_discards_on_the_host() {
        let m = mem();
        let (f, mut blk) = disk(4, true);
        assert_ne!(blk.device_features() & F_RO, 0);
        let before = std::fs::read(f.path()).unwrap();
        m.write_slice(&header(T_OUT, 0), GuestAddress(0x1000)).unwrap();
        run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 512, R), (0x3000, 1, W)]).unwrap();
        assert_eq!(status(&m, 0x3000), S_IOERR);
        let mut discard = header(T_DISCARD, 0).to_vec();
        discard.extend_from_slice(&0u64.to_le_bytes());
        discard.extend_from_slice(&4u32.to_le_bytes());
        discard.extend_from_slice(&0u32.to_le_bytes());
        m.write_slice(&discard, GuestAddress(0x1000)).unwrap();
        run(&mut blk, &m, &[(0x1000, 32, R), (0x3000, 1, W)]).unwrap();
        assert_eq!(status(&m, 0x3000), S_IOERR);
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
    }

    #[test]
    fn ranges_outside_the_disk_and_odd_sizes_get_ioerr_and_the_device_carries_on() {
        let (_f, mut blk) = disk(4, false);
        let cap = blk.capacity();
        for (h, body, room) in [
            (header(T_IN, 3), 0, 1024),                    // runs past the end
            (header(T_IN, u64::MAX), 0, 512),              // sector + count overflows
            (header(T_IN, 0), 0, 100),                     // not whole sectors
            (header(T_OUT, 4), 512, 0),                    // starts at the end
            (header(T_IN, 0), 512, 512),                   // a read with driver data
            (header(T_OUT, 0), 512, 512),                  // a write with room to write
            (header(T_IN, 0), 0, MAX_REQUEST_BYTES + 512), // too large
        ] {
            let r = parse(&h, &vec![0; body], room, cap, false);
            assert!(matches!(r, Err(Refused::Invalid(_))), "{h:?} {body} {room}: {r:?}");
        }
        assert_eq!(parse(&header(99, 0), &[], 0, cap, false), Err(Refused::Unsupported(99)));
        let m = mem();
        m.write_slice(&header(T_IN, 3), GuestAddress(0x1000)).unwrap();
        run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 1024, W), (0x3000, 1, W)]).unwrap();
        assert_eq!(status(&m, 0x3000), S_IOERR);
        m.write_slice(&header(99, 0), GuestAddress(0x1000)).unwrap();
        run(&mut blk, &m, &[(0x1000, 16, R), (0x3000, 1, W)]).unwrap();
        assert_eq!(status(&m, 0x3000), S_UNSUPP);
    }

    #[test]
    fn chains_that_cannot_be_answered_fail_the_device() {
        let m = mem();
        let (_f, mut blk) = disk(4, false);
        m.write_slice(&header(T_IN, 0), GuestAddress(0x1000)).unwrap();
        assert!(run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 512, R)]).is_err(), "no status byte");
        let (_f, mut blk) = disk(4, false);
        assert!(run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 512, W), (0x3000, 1, R)]).is_err(), "readable last");
        let (_f, mut blk) = disk(4, false);
        assert!(run(&mut blk, &m, &[(0x1000, 16, R), (0xff_f000_0000, 512, W), (0x3000, 1, W)]).is_err(), "outside");
    }

    #[test]
    fn discard_punches_holes_and_get_id_names_the_disk() {
        let m = mem();
        let (f, mut blk) = disk(8, false);
        let mut discard = header(T_DISCARD, 0).to_vec();
        discard.extend_from_slice(&2u64.to_le_bytes());
        discard.extend_from_slice(&2u32.to_le_bytes());
        discard.extend_from_slice(&0u32.to_le_bytes());
        m.write_slice(&discard, GuestAddress(0x1000)).unwrap();
        run(&mut blk, &m, &[(0x1000, 32, R), (0x3000, 1, W)]).unwrap();
        assert_eq!(status(&m, 0x3000), S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[1024..2048].iter().all(|b| *b == 0));
        assert!(on_disk[2048..2560].iter().all(|b| *b == 4));
        m.write_slice(&header(T_GET_ID, 0), GuestAddress(0x1000)).unwrap();
        assert_eq!(run(&mut blk, &m, &[(0x1000, 16, R), (0x2000, 20, W), (0x3000, 1, W)]).unwrap(), 21);
        let mut id = [0u8; 8];
        m.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"msb-root");
    }

    #[test]
    fn a_queue_of_flushes_is_served_over_several_rounds() {
        let m = mem();
        let (_f, mut blk) = disk(4, false);
        m.write_slice(&header(T_FLUSH, 0), GuestAddress(0x1000)).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        // Eight chains of (header with NEXT -> status): descriptor 2i points at 2i+1.
        let mut raw = Vec::new();
        for i in 0..8u16 {
            raw.push(RawDescriptor::from(SplitDescriptor::new(0x1000, 16, 1, 2 * i + 1)));
            raw.push(RawDescriptor::from(SplitDescriptor::new(0x3000 + u64::from(i), 1, W, 0)));
        }
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let per_round = super::super::ROUND_WORK.div_ceil(FLUSH_COST);
        assert_eq!(blk.process(&mut q, &m).unwrap(), BlkProgress::More);
        assert_eq!(vq.used().idx().load(), per_round as u16, "a round stops at its budget");
        while blk.process(&mut q, &m).unwrap() == BlkProgress::More {}
        assert_eq!(vq.used().idx().load(), 8);
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let (_f, blk) = disk(8, false);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let mut past = [0xffu8; 4];
        blk.read_config(4096, &mut past);
        assert_eq!(past, [0; 4]);
    }
}
