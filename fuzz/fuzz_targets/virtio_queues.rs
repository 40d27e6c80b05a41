//! Every virtio device core over guest memory the guest wrote as it liked: descriptor
//! tables, rings and buffers all from the fuzzer, queues of any size the transport would
//! take. A device either serves, or fails with a `DeviceError` (the guest broke the
//! contract); it never panics, loops, or touches memory outside the guest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_devices::virtio::{blk, console::Console, fs, net::Net, rng::Rng};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 256 * 1024;

/// A ready queue of `size` whose areas lie where `at` says (inside or across the edge of
/// guest memory: the device must cope either way).
fn queue(size: u16, at: [u64; 3], mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut q = Queue::new(size).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(at[0] as u32), Some(0));
    q.set_avail_ring_address(Some(at[1] as u32), Some(0));
    q.set_used_ring_address(Some(at[2] as u32), Some(0));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, image) = data.split_at(8);
    let device = head[0] % 5;
    let size = 1u16 << (head[1] % 9); // 1..=256
    let at = |b: u8| u64::from(b) * 0x400;
    let areas = [at(head[2]), at(head[3]), at(head[4])];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = image.len().min(MEM);
    mem.write_slice(&image[..n], GuestAddress(0)).expect("inside");
    // Four queues over the same areas (a console has four): they race for the same rings.
    let Some(mut queues) = (0..4).map(|_| queue(size, areas, &mem)).collect::<Option<Vec<_>>>() else { return };
    for _ in 0..4 {
        let r = match device {
            0 => Rng.service(&mut queues[..1], &mem).map(drop),
            1 => {
                let mut c = Console::default();
                let _ = c.queue_to_guest(b"hello");
                c.service(&mut queues, &mem, 64 * 1024).map(drop)
            }
            2 => {
                let mut n = Net::new([2, 0, 0, 0, 0, 1]);
                let _ = n.push_frame(vec![0u8; 60]);
                n.service(&mut queues[..2], &mem, 64 * 1024).map(drop)
            }
            3 => fs::Fs::new(fs::Tag::new("fuzz").expect("a valid tag")).take(&mut queues[..2], &mem).map(drop),
            _ => {
                let Ok(file) = tempfile::NamedTempFile::new() else { return };
                let _ = file.as_file().set_len(64 * 1024);
                let Ok(mut b) = blk::Blk::open(file.path(), head[5] & 1 == 1) else { return };
                b.service(&mut queues[..1], &mem).map(drop)
            }
        };
        if r.is_err() {
            break;
        }
    }
});
