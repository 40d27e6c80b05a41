//! A guest's FUSE requests, as virtio-fs carries them, served by the file broker over a real
//! directory tree: the parser, then every operation. Nothing panics; every reply names the
//! request's id and fits its own length field; and nothing outside the shared directory —
//! the sibling `outside/` with its canary, reachable by a symlink inside — is read into a
//! reply, changed or added to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_fs_broker::broker::{Broker, MountConfig};

const CANARY: &[u8] = b"the host's own file";

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let (root, outside) = (tmp.path().join("share"), tmp.path().join("outside"));
    let made = std::fs::create_dir_all(root.join("dir"))
        .and_then(|()| std::fs::create_dir(&outside))
        .and_then(|()| std::fs::write(outside.join("canary"), CANARY))
        .and_then(|()| std::fs::write(root.join("a"), b"hello"))
        .and_then(|()| std::os::unix::fs::symlink("../outside", root.join("out")))
        .and_then(|()| std::os::unix::fs::symlink("/", root.join("abs")));
    if made.is_err() {
        return;
    }
    let cfg = MountConfig { max_inodes: 64, max_handles: 16, reserve: Some(0), ..MountConfig::default() };
    let Ok(mut broker) = Broker::new(&root, cfg) else { return };
    // Requests back to back, each as long as its header says (the last one cut short).
    let mut rest = data;
    for _ in 0..32 {
        if rest.len() < 4 {
            break;
        }
        let len = (u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize).clamp(4, rest.len().min(1 << 16));
        let (req, next) = rest.split_at(len);
        rest = next;
        if let Some(reply) = broker.handle(req) {
            assert!(reply.len() >= 16, "a reply has its header");
            assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize, reply.len());
            if req.len() >= 16 {
                assert_eq!(reply[8..16], req[8..16], "the reply names the request");
            }
            // (Unless the guest itself wrote those bytes into the share.)
            let planted = data.windows(CANARY.len()).any(|w| w == CANARY);
            assert!(planted || !reply.windows(CANARY.len()).any(|w| w == CANARY), "a reply carried the canary");
        }
    }
    assert_eq!(std::fs::read(outside.join("canary")).ok().as_deref(), Some(CANARY), "the canary changed");
    let names: Vec<_> =
        std::fs::read_dir(&outside).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert_eq!(names, vec![std::ffi::OsString::from("canary")], "something was made outside");
});
