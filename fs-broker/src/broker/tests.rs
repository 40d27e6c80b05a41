//! The broker against real directory trees: each escape a hostile guest kernel could try,
//! read-only enforcement, and the host tree outside the mount unchanged.

use super::*;
use crate::fuse::op;
use crate::fuse::tests::request;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// A mount inside `base/mnt`, with `base/outside/secret` beside it.
struct T {
    base: tempfile::TempDir,
    b: Broker,
    unique: u64,
}

/// A reply: (errno, payload).
fn split(reply: &[u8]) -> (i32, Vec<u8>) {
    let len = u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(len, reply.len(), "a reply's length is its size");
    (-i32::from_le_bytes(reply[4..8].try_into().unwrap()), reply[16..].to_vec())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn cstr(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

impl T {
    fn new(cfg: MountConfig) -> T {
        let base = tempfile::tempdir().unwrap();
        fs::create_dir(base.path().join("mnt")).unwrap();
        fs::create_dir(base.path().join("outside")).unwrap();
        fs::write(base.path().join("outside/secret"), b"host secret").unwrap();
        fs::write(base.path().join("mnt/file"), b"hello").unwrap();
        let b = Broker::new(&base.path().join("mnt"), cfg).unwrap();
        T { base, b, unique: 0 }
    }
    fn rw() -> T {
        T::new(MountConfig { uid: 1000, gid: 1000, ..MountConfig::default() })
    }
    fn path(&self, p: &str) -> std::path::PathBuf {
        self.base.path().join(p)
    }
    fn call(&mut self, opcode: u32, node: u64, args: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let reply = self.b.handle(&request(opcode, self.unique, node, args)).expect("a reply");
        assert_eq!(u64_at(&reply, 8), self.unique, "the reply answers its request");
        split(&reply)
    }
    /// LOOKUP: the node id, or the errno.
    fn lookup(&mut self, parent: u64, name: &str) -> Result<u64, i32> {
        match self.call(op::LOOKUP, parent, &cstr(name)) {
            (0, p) => Ok(u64_at(&p, 0)),
            (e, _) => Err(e),
        }
    }
    /// The `fuse_attr` of an entry or attr reply starting at `at`: (ino, size, mode, uid, gid).
    fn attr_at(p: &[u8], at: usize) -> (u64, u64, u32, u32, u32) {
        (u64_at(p, at), u64_at(p, at + 8), u32_at(p, at + 60), u32_at(p, at + 68), u32_at(p, at + 72))
    }
    fn getattr(&mut self, node: u64) -> Result<(u64, u64, u32, u32, u32), i32> {
        match self.call(op::GETATTR, node, &[0u8; 16]) {
            (0, p) => Ok(T::attr_at(&p, 16)),
            (e, _) => Err(e),
        }
    }
    fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        let mut a = flags.to_le_bytes().to_vec();
        a.extend_from_slice(&[0; 4]);
        match self.call(op::OPEN, node, &a) {
            (0, p) => Ok(u64_at(&p, 0)),
            (e, _) => Err(e),
        }
    }
    fn read(&mut self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let mut a = fh.to_le_bytes().to_vec();
        a.extend_from_slice(&offset.to_le_bytes());
        a.extend_from_slice(&size.to_le_bytes());
        a.extend_from_slice(&[0; 20]);
        match self.call(op::READ, 0, &a) {
            (0, p) => Ok(p),
            (e, _) => Err(e),
        }
    }
    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let mut a = fh.to_le_bytes().to_vec();
        a.extend_from_slice(&offset.to_le_bytes());
        a.extend_from_slice(&(data.len() as u32).to_le_bytes());
        a.extend_from_slice(&[0; 20]);
        a.extend_from_slice(data);
        match self.call(op::WRITE, 0, &a) {
            (0, p) => Ok(u32_at(&p, 0)),
            (e, _) => Err(e),
        }
    }
    fn release(&mut self, fh: u64) {
        let mut a = fh.to_le_bytes().to_vec();
        a.extend_from_slice(&[0; 16]);
        assert_eq!(self.call(op::RELEASE, 0, &a).0, 0);
    }
    fn create(&mut self, parent: u64, name: &str, flags: u32, mode: u32) -> Result<(u64, u64), i32> {
        let mut a = Vec::new();
        for v in [flags, mode, 0, 0] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        a.extend_from_slice(&cstr(name));
        match self.call(op::CREATE, parent, &a) {
            (0, p) => Ok((u64_at(&p, 0), u64_at(&p, 128))),
            (e, _) => Err(e),
        }
    }
    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<u64, i32> {
        let mut a = mode.to_le_bytes().to_vec();
        a.extend_from_slice(&0u32.to_le_bytes());
        a.extend_from_slice(&cstr(name));
        match self.call(op::MKDIR, parent, &a) {
            (0, p) => Ok(u64_at(&p, 0)),
            (e, _) => Err(e),
        }
    }
    fn setattr(&mut self, node: u64, valid: u32, mode: u32, uid: u32, size: u64) -> i32 {
        let mut a = Vec::new();
        a.extend_from_slice(&valid.to_le_bytes());
        a.extend_from_slice(&[0; 4]);
        a.extend_from_slice(&0u64.to_le_bytes()); // fh
        a.extend_from_slice(&size.to_le_bytes());
        a.extend_from_slice(&[0; 8 * 4 + 4 * 3]); // lock_owner, a/m/ctime, nsecs
        a.extend_from_slice(&mode.to_le_bytes());
        a.extend_from_slice(&[0; 4]);
        a.extend_from_slice(&uid.to_le_bytes());
        a.extend_from_slice(&uid.to_le_bytes());
        a.extend_from_slice(&[0; 4]);
        assert_eq!(a.len(), 88);
        self.call(op::SETATTR, node, &a).0
    }
    fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        match self.call(op::READLINK, node, &[]) {
            (0, p) => Ok(p),
            (e, _) => Err(e),
        }
    }
    fn forget(&mut self, node: u64, n: u64) {
        assert!(self.b.handle(&request(op::FORGET, 0, node, &n.to_le_bytes())).is_none(), "FORGET gets no reply");
    }
    /// Every file below `base` (mount and outside), with its bytes and mode.
    fn snapshot(&self, dir: &str) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut stack = vec![self.path(dir)];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = fs::symlink_metadata(e.path()).unwrap();
                let data = if m.is_file() { fs::read(e.path()).unwrap() } else { Vec::new() };
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.push((e.path().display().to_string(), data, m.mode()));
            }
        }
        out.sort();
        out
    }
}

const O_WRONLY: u32 = 1;
const O_RDWR: u32 = 2;

#[test]
fn a_file_is_looked_up_read_and_shown_with_the_mounts_owner_not_the_hosts() {
    let mut t = T::rw();
    let n = t.lookup(ROOT, "file").unwrap();
    let (_, size, mode, uid, gid) = t.getattr(n).unwrap();
    assert_eq!((size, mode & 0o170000, uid, gid), (5, 0o100000, 1000, 1000));
    let fh = t.open(n, 0).unwrap();
    assert_eq!(t.read(fh, 0, 4096).unwrap(), b"hello");
    assert_eq!(t.read(fh, 3, 4096).unwrap(), b"lo");
    t.release(fh);
    assert_eq!(t.b.handle_count(), 0);
    assert_eq!(t.lookup(ROOT, "missing"), Err(fuse::ENOENT));
    // The same inode is the same node, counted; forgetting both lookups drops it.
    assert_eq!(t.lookup(ROOT, "file").unwrap(), n);
    t.forget(n, 2);
    assert_eq!(t.getattr(n), Err(fuse::ENOENT));
    assert_eq!(t.b.inode_count(), 1, "only the root is held");
    t.forget(ROOT, 100);
    assert!(t.getattr(ROOT).is_ok(), "the root is never forgotten");
}

#[test]
fn symlinks_are_data_and_never_lead_out_of_the_mount() {
    let mut t = T::rw();
    std::os::unix::fs::symlink("../outside", t.path("mnt/rel")).unwrap();
    std::os::unix::fs::symlink("/", t.path("mnt/root")).unwrap();
    std::os::unix::fs::symlink(t.path("outside/secret"), t.path("mnt/abs")).unwrap();
    for (name, target) in [
        ("rel", "../outside".to_string()),
        ("root", "/".into()),
        ("abs", t.path("outside/secret").display().to_string()),
    ] {
        let n = t.lookup(ROOT, name).unwrap();
        let (_, _, mode, _, _) = t.getattr(n).unwrap();
        assert_eq!(mode & 0o170000, 0o120000, "{name} is presented as the symlink it is");
        assert_eq!(t.readlink(n).unwrap(), target.as_bytes(), "readlink returns the target as data");
        assert_eq!(t.open(n, 0), Err(fuse::ELOOP), "{name} is never opened through");
        assert_eq!(t.lookup(n, "secret"), Err(fuse::ENOTDIR), "nothing is looked up through {name}");
        assert_eq!(t.lookup(n, "etc"), Err(fuse::ENOTDIR));
    }
    // A regular file's readlink is refused.
    let f = t.lookup(ROOT, "file").unwrap();
    assert_eq!(t.readlink(f), Err(fuse::EINVAL));
}

#[test]
fn names_that_walk_out_are_refused_before_any_host_call() {
    let mut t = T::rw();
    for bad in ["..", ".", "../outside", "a/b", "/etc"] {
        assert_eq!(t.lookup(ROOT, bad), Err(fuse::EINVAL), "{bad}");
        assert_eq!(t.mkdir(ROOT, bad, 0o755), Err(fuse::EINVAL), "{bad}");
    }
    // A rename to `..`-named targets, and into a node that is not a directory.
    let mut a = ROOT.to_le_bytes().to_vec();
    a.extend_from_slice(b"file\0..\0");
    assert_eq!(t.call(op::RENAME, ROOT, &a).0, fuse::EINVAL);
    let f = t.lookup(ROOT, "file").unwrap();
    let mut a = f.to_le_bytes().to_vec();
    a.extend_from_slice(b"file\0x\0");
    assert_eq!(t.call(op::RENAME, ROOT, &a).0, fuse::ENOTDIR);
    // Node ids the guest never got are not inodes.
    assert_eq!(t.getattr(999), Err(fuse::ENOENT));
    assert_eq!(t.lookup(999, "file"), Err(fuse::ENOENT));
    let mut a = 999u64.to_le_bytes().to_vec();
    a.extend_from_slice(b"stolen\0");
    assert_eq!(t.call(op::LINK, ROOT, &a).0, fuse::ENOENT, "a link to a node never looked up");
    assert!(!t.path("mnt/stolen").exists());
}

#[test]
fn a_read_only_mount_refuses_every_change_whatever_the_guest_sends() {
    let mut t = T::new(MountConfig { read_only: true, ..MountConfig::default() });
    let before = t.snapshot(".");
    let f = t.lookup(ROOT, "file").unwrap();
    assert_eq!(t.open(f, O_WRONLY), Err(fuse::EROFS));
    assert_eq!(t.open(f, O_RDWR), Err(fuse::EROFS));
    assert_eq!(t.open(f, 0o1000), Err(fuse::EROFS), "O_TRUNC");
    let fh = t.open(f, 0).unwrap();
    assert_eq!(t.write(fh, 0, b"owned"), Err(fuse::EROFS));
    assert_eq!(t.create(ROOT, "new", O_WRONLY, 0o644), Err(fuse::EROFS));
    assert_eq!(t.mkdir(ROOT, "d", 0o755), Err(fuse::EROFS));
    assert_eq!(t.setattr(f, fuse::fattr::SIZE, 0, 0, 0), fuse::EROFS);
    assert_eq!(t.setattr(f, fuse::fattr::MODE, 0o777, 0, 0), fuse::EROFS);
    assert_eq!(t.call(op::UNLINK, ROOT, b"file\0").0, fuse::EROFS);
    assert_eq!(t.call(op::SYMLINK, ROOT, b"l\0/\0").0, fuse::EROFS);
    let mut a = ROOT.to_le_bytes().to_vec();
    a.extend_from_slice(b"file\0moved\0");
    assert_eq!(t.call(op::RENAME, ROOT, &a).0, fuse::EROFS);
    let mut a = f.to_le_bytes().to_vec();
    a.extend_from_slice(b"hard\0");
    assert_eq!(t.call(op::LINK, ROOT, &a).0, fuse::EROFS);
    let mut a = 1u32.to_le_bytes().to_vec();
    a.extend_from_slice(&0u32.to_le_bytes());
    a.extend_from_slice(b"user.x\0v");
    assert_eq!(t.call(op::SETXATTR, f, &a).0, fuse::EROFS);
    assert_eq!(t.call(op::ACCESS, f, &[2, 0, 0, 0, 0, 0, 0, 0]).0, fuse::EROFS);
    assert_eq!(t.read(fh, 0, 100).unwrap(), b"hello", "reading still works");
    assert_eq!(t.snapshot("."), before, "nothing on the host changed");
}

#[test]
fn no_setuid_device_node_fifo_host_chown_or_privileged_xattr_is_created() {
    let mut t = T::rw();
    // mknod: a character device, a block device, a FIFO, a socket.
    for mode in [0o020644u32, 0o060644, 0o010644, 0o140644] {
        let mut a = Vec::new();
        for v in [mode, 0x0101, 0, 0] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        a.extend_from_slice(b"node\0");
        assert_eq!(t.call(op::MKNOD, ROOT, &a).0, fuse::EPERM, "mode {mode:o}");
        assert!(fs::symlink_metadata(t.path("mnt/node")).is_err());
    }
    // A setuid create comes out without the bits; a setuid chmod is refused.
    let (n, fh) = t.create(ROOT, "tool", O_WRONLY, 0o106755).unwrap();
    assert_eq!(fs::metadata(t.path("mnt/tool")).unwrap().permissions().mode() & 0o7777, 0o755);
    t.release(fh);
    for mode in [0o4755, 0o2755, 0o1777] {
        assert_eq!(t.setattr(n, fuse::fattr::MODE, mode, 0, 0), fuse::EPERM, "{mode:o}");
    }
    assert_eq!(fs::metadata(t.path("mnt/tool")).unwrap().permissions().mode() & 0o7777, 0o755);
    // A plain chmod is mirrored onto the host.
    assert_eq!(t.setattr(n, fuse::fattr::MODE, 0o600, 0, 0), 0);
    assert_eq!(fs::metadata(t.path("mnt/tool")).unwrap().permissions().mode() & 0o7777, 0o600);
    // Ownership: only a no-op chown to the mount's owner passes; the host's owner stays.
    let host_uid = fs::metadata(t.path("mnt/tool")).unwrap().uid();
    assert_eq!(t.setattr(n, fuse::fattr::UID | fuse::fattr::GID, 0, 1000, 0), 0);
    assert_eq!(t.setattr(n, fuse::fattr::UID, 0, 0, 0), fuse::EPERM);
    assert_eq!(fs::metadata(t.path("mnt/tool")).unwrap().uid(), host_uid);
    // xattrs outside `user.` are refused.
    for name in ["security.capability", "trusted.x", "system.posix_acl_access"] {
        let mut a = 4u32.to_le_bytes().to_vec();
        a.extend_from_slice(&0u32.to_le_bytes());
        a.extend_from_slice(&cstr(name));
        a.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(t.call(op::SETXATTR, n, &a).0, fuse::EPERM, "{name}");
    }
    // A host setuid file shows without the bit in the guest.
    fs::write(t.path("mnt/suid"), b"x").unwrap();
    fs::set_permissions(t.path("mnt/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    let s = t.lookup(ROOT, "suid").unwrap();
    assert_eq!(t.getattr(s).unwrap().2 & 0o7777, 0o755);
}

#[test]
fn a_host_fifo_or_special_file_in_the_tree_is_visible_but_never_opened() {
    let mut t = T::rw();
    rustix::fs::mknodat(rustix::fs::CWD, t.path("mnt/pipe"), FileType::Fifo, Mode::from_bits_truncate(0o644), 0)
        .unwrap();
    let n = t.lookup(ROOT, "pipe").unwrap();
    assert_eq!(t.getattr(n).unwrap().2 & 0o170000, 0o010000);
    // Opening a FIFO would block the broker until a writer came: refused at once.
    assert_eq!(t.open(n, 0), Err(fuse::EACCES));
    assert_eq!(t.open(n, O_WRONLY), Err(fuse::EACCES));
}

#[test]
fn files_and_directories_are_made_changed_and_removed_beneath_the_mount() {
    let mut t = T::rw();
    let d = t.mkdir(ROOT, "dir", 0o755).unwrap();
    let (f, fh) = t.create(d, "new", O_RDWR, 0o644).unwrap();
    assert_eq!(t.write(fh, 0, b"written by the guest").unwrap(), 20);
    assert_eq!(t.read(fh, 0, 100).unwrap(), b"written by the guest");
    t.release(fh);
    assert_eq!(fs::read(t.path("mnt/dir/new")).unwrap(), b"written by the guest");
    // Truncate, then a hard link inside the mount, then rename within it.
    assert_eq!(t.setattr(f, fuse::fattr::SIZE, 0, 0, 7), 0);
    assert_eq!(fs::read(t.path("mnt/dir/new")).unwrap(), b"written");
    let mut a = f.to_le_bytes().to_vec();
    a.extend_from_slice(b"hard\0");
    assert_eq!(t.call(op::LINK, ROOT, &a).0, 0);
    assert_eq!(fs::read(t.path("mnt/hard")).unwrap(), b"written");
    let mut a = d.to_le_bytes().to_vec();
    a.extend_from_slice(b"hard\0moved\0");
    assert_eq!(t.call(op::RENAME, ROOT, &a).0, 0);
    assert!(t.path("mnt/dir/moved").is_file() && !t.path("mnt/hard").exists());
    // A directory cannot be hard-linked; create without O_EXCL never follows a symlink.
    let mut a = d.to_le_bytes().to_vec();
    a.extend_from_slice(b"dirlink\0");
    assert_eq!(t.call(op::LINK, ROOT, &a).0, fuse::EPERM);
    std::os::unix::fs::symlink(t.path("outside/secret"), t.path("mnt/trap")).unwrap();
    assert_eq!(t.create(ROOT, "trap", O_WRONLY | 0o1000, 0o644), Err(fuse::ELOOP));
    assert_eq!(fs::read(t.path("outside/secret")).unwrap(), b"host secret", "the trap's target is untouched");
    // Symlinks are created as data.
    assert_eq!(t.call(op::SYMLINK, ROOT, b"link\0/etc/passwd\0").0, 0);
    assert_eq!(fs::read_link(t.path("mnt/link")).unwrap(), std::path::Path::new("/etc/passwd"));
    // Removal.
    assert_eq!(t.call(op::UNLINK, d, b"new\0").0, 0);
    assert_eq!(t.call(op::RMDIR, ROOT, b"dir\0").0, fuse::ENOTEMPTY);
    assert_eq!(t.call(op::UNLINK, d, b"moved\0").0, 0);
    assert_eq!(t.call(op::RMDIR, ROOT, b"dir\0").0, 0);
    assert!(!t.path("mnt/dir").exists());
}

/// Lists a directory through READDIR(PLUS) in pages of `page` bytes.
fn list(t: &mut T, node: u64, page: u32, plus: bool) -> Vec<(String, u64)> {
    let (e, p) = t.call(op::OPENDIR, node, &[0; 8]);
    assert_eq!(e, 0);
    let fh = u64_at(&p, 0);
    let (mut out, mut offset) = (Vec::new(), 0u64);
    loop {
        let mut a = fh.to_le_bytes().to_vec();
        a.extend_from_slice(&offset.to_le_bytes());
        a.extend_from_slice(&page.to_le_bytes());
        a.extend_from_slice(&[0; 20]);
        let (e, p) = t.call(if plus { op::READDIRPLUS } else { op::READDIR }, node, &a);
        assert_eq!(e, 0);
        if p.is_empty() {
            break;
        }
        let mut at = 0;
        while at < p.len() {
            let nodeid = if plus { u64_at(&p, at) } else { 0 };
            if plus {
                at += 128;
            }
            let (off, len) = (u64_at(&p, at + 8), u32_at(&p, at + 16) as usize);
            let name = String::from_utf8(p[at + 24..at + 24 + len].to_vec()).unwrap();
            out.push((name, nodeid));
            offset = off;
            at += fuse::dirent_size(len);
        }
        assert!(p.len() <= page as usize, "a page holds at most what was asked");
    }
    let mut a = fh.to_le_bytes().to_vec();
    a.extend_from_slice(&[0; 16]);
    assert_eq!(t.call(op::RELEASEDIR, node, &a).0, 0);
    out
}

#[test]
fn a_listing_in_small_pages_returns_every_entry_exactly_once() {
    let mut t = T::rw();
    for i in 0..300 {
        fs::write(t.path(&format!("mnt/f{i:03}")), b"").unwrap();
    }
    for plus in [false, true] {
        let mut names: Vec<String> = list(&mut t, ROOT, 512, plus).into_iter().map(|(n, _)| n).collect();
        names.sort();
        let mut want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
        want.extend([".".into(), "..".into(), "file".into()]);
        want.sort();
        assert_eq!(names, want, "plus={plus}");
    }
    // READDIRPLUS hands out looked-up nodes (not for . and ..), each counted once.
    let entries = list(&mut t, ROOT, 4096, true);
    for (name, node) in &entries {
        if name == "." || name == ".." {
            assert_eq!(*node, 0);
        } else {
            assert!(*node > ROOT, "{name}");
        }
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_never_redirects_the_broker() {
    let mut t = T::rw();
    fs::create_dir(t.path("mnt/d")).unwrap();
    fs::write(t.path("mnt/d/f"), b"inside").unwrap();
    fs::write(t.path("outside/f"), b"host secret").unwrap();
    // A node held across the swap keeps naming the directory it was.
    let held = t.lookup(ROOT, "d").unwrap();
    fs::rename(t.path("mnt/d"), t.path("mnt/d.old")).unwrap();
    std::os::unix::fs::symlink("../outside", t.path("mnt/d")).unwrap();
    let f = t.lookup(held, "f").unwrap();
    let fh = t.open(f, 0).unwrap();
    assert_eq!(t.read(fh, 0, 100).unwrap(), b"inside");
    t.release(fh);
    // A fresh lookup of the swapped name finds the symlink, and stops there.
    let now = t.lookup(ROOT, "d").unwrap();
    assert_eq!(t.lookup(now, "f"), Err(fuse::ENOTDIR));
    fs::remove_file(t.path("mnt/d")).unwrap();
    fs::rename(t.path("mnt/d.old"), t.path("mnt/d")).unwrap();

    // The race, many times: the host flips `d` between the directory and a symlink out while
    // the broker walks d/f; the secret is never read, whatever the interleaving.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mnt, stop2) = (t.path("mnt"), stop.clone());
    let flipper = std::thread::spawn(move || {
        let mut flips = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = fs::rename(mnt.join("d"), mnt.join("d.real"));
            let _ = std::os::unix::fs::symlink("../outside", mnt.join("d"));
            let _ = fs::remove_file(mnt.join("d"));
            let _ = fs::rename(mnt.join("d.real"), mnt.join("d"));
            flips += 1;
        }
        flips
    });
    let (mut inside, mut refused) = (0, 0);
    for _ in 0..3000 {
        let Ok(d) = t.lookup(ROOT, "d") else {
            refused += 1;
            continue;
        };
        match t.lookup(d, "f") {
            Ok(f) => {
                if let Ok(fh) = t.open(f, 0) {
                    let got = t.read(fh, 0, 100).unwrap();
                    assert_ne!(got, b"host secret", "the broker read outside its mount");
                    assert_eq!(got, b"inside");
                    inside += 1;
                    t.release(fh);
                }
                t.forget(f, 1);
            }
            Err(_) => refused += 1,
        }
        t.forget(d, 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    assert!(inside > 0 && flips > 0, "the race ran: {inside} reads inside, {refused} refused, {flips} flips");
    assert_eq!(fs::read(t.path("outside/f")).unwrap(), b"host secret");
}

#[test]
fn malformed_unknown_and_short_requests_get_answers_not_panics() {
    let mut t = T::rw();
    assert_eq!(t.call(999, ROOT, &[]).0, fuse::ENOSYS, "an unknown opcode");
    assert_eq!(t.call(op::GETATTR, ROOT, &[0; 3]).0, fuse::EINVAL, "arguments cut short");
    assert!(t.b.handle(&[1, 2, 3]).is_none(), "no header, nobody to answer");
    // A header whose length lies is answered with its unique.
    let mut r = request(op::GETATTR, 77, ROOT, &[0; 16]);
    r.truncate(50);
    let reply = t.b.handle(&r).unwrap();
    assert_eq!((split(&reply).0, u64_at(&reply, 8)), (fuse::EINVAL, 77));
    // Handles never opened.
    assert_eq!(t.read(12345, 0, 10), Err(fuse::EBADF));
    assert_eq!(t.write(12345, 0, b"x"), Err(fuse::EBADF));
}

#[test]
fn init_grants_only_what_the_kernel_offered_and_bounds_writes() {
    let mut t = T::rw();
    let mut a = Vec::new();
    for v in [7u32, 38, 1 << 20, u32::MAX] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    let (e, p) = t.call(op::INIT, 0, &a);
    assert_eq!(e, 0);
    assert_eq!(p.len(), 64);
    assert_eq!((u32_at(&p, 0), u32_at(&p, 4)), (7, fuse::KERNEL_MINOR_VERSION));
    assert_eq!(u32_at(&p, 12) & !INIT_FLAGS, 0);
    assert_eq!(u32_at(&p, 20) as usize, fuse::MAX_WRITE);
    let mut a = Vec::new();
    for v in [7u32, 38, 0, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    let (_, p) = t.call(op::INIT, 0, &a);
    assert_eq!(u32_at(&p, 12), 0, "nothing the kernel did not offer");
}

#[test]
fn the_inode_and_handle_tables_stop_at_their_caps_and_forgetting_frees_room() {
    let mut t = T::new(MountConfig { max_inodes: 8, max_handles: 2, ..MountConfig::default() });
    for i in 0..20 {
        fs::write(t.path(&format!("mnt/f{i}")), b"x").unwrap();
    }
    let mut held = Vec::new();
    for i in 0..7 {
        held.push(t.lookup(ROOT, &format!("f{i}")).unwrap());
    }
    assert_eq!(t.b.inode_count(), 8, "the root and seven files");
    assert_eq!(t.lookup(ROOT, "f7"), Err(fuse::ENFILE), "the table is full");
    assert_eq!(t.lookup(ROOT, "f0"), Ok(held[0]), "a node already held is still found");
    let (a, b) = (t.open(held[1], 0).unwrap(), t.open(held[2], 0).unwrap());
    assert_eq!(t.open(held[3], 0), Err(fuse::ENFILE), "two handles at most");
    t.release(a);
    t.release(b);
    t.forget(held[4], 1);
    assert!(t.lookup(ROOT, "f7").is_ok(), "a forgotten node made room");
}

#[test]
fn the_descriptor_budget_fits_the_process_limit() {
    let (inodes, handles) = fd_budget(2);
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        (inodes + handles) as u64 * 2 <= soft.saturating_sub(FD_RESERVE).max(160),
        "{inodes}+{handles} x2 vs {soft}"
    );
    assert!(inodes <= MAX_INODES && handles <= MAX_HANDLES && inodes >= 64 && handles >= 16);
}

// ---- regressions of the 2026-12 review (FS2, FS5, FS12, FS13) ----

/// FS5: CREATE of an existing host FIFO without the guest's O_EXCL never opens it (an
/// `O_RDONLY` open of a FIFO would block the broker until a writer came): it answers at once
/// with the refusal OPEN gives a non-regular file; an existing regular file is opened.
#[test]
fn create_never_opens_an_existing_fifo() {
    let mut t = T::rw();
    let fifo = t.path("mnt/pipe");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, Mode::from_bits_truncate(0o644), 0).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let th = std::thread::spawn(move || {
        let r = t.create(ROOT, "pipe", 0, 0o644);
        let r2 = t.create(ROOT, "file", 0, 0o644).map(|_| ());
        let r3 = t.create(ROOT, "file", OFlags::EXCL.bits(), 0o644).map(|_| ());
        tx.send((r, r2, r3)).unwrap();
        t
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    if got.is_err() {
        // Unblock the broker so the test ends; the finding is back.
        let _w = std::fs::OpenOptions::new().write(true).open(&fifo);
    }
    let t = th.join().unwrap();
    let (r, r2, r3) = got.expect("CREATE of an existing FIFO blocked the broker");
    assert_eq!(r.map(|_| ()), Err(fuse::EACCES), "a FIFO is never opened");
    assert_eq!(r2, Ok(()), "an existing regular file without O_EXCL is opened");
    assert_eq!(r3, Err(fuse::EEXIST), "with the guest's O_EXCL it is EEXIST");
    assert_eq!(fs::read(t.path("mnt/file")).unwrap(), b"hello", "opened without O_TRUNC: unchanged");
}

/// FS2: a guest with a read-write mount of a directory above another mount's host path
/// swaps that path for a symlink; the next start of the second mount refuses it (its path
/// is opened without following symlinks), and a directory put back by another name (a
/// different inode) is refused by the recorded identity.
#[test]
fn a_swapped_mount_root_is_refused_at_the_next_start() {
    let base = tempfile::tempdir().unwrap();
    let base_path = fs::canonicalize(base.path()).unwrap();
    fs::create_dir_all(base_path.join("proj/sub")).unwrap();
    fs::create_dir(base_path.join("outside")).unwrap();
    fs::write(base_path.join("outside/secret"), b"host secret").unwrap();
    let recorded = base_path.join("proj/sub");
    let id = key_of(&rfs::stat(&recorded).unwrap());
    let cfg = MountConfig { identity: Some(id), ..MountConfig::default() };
    assert!(Broker::new(&recorded, cfg.clone()).is_ok(), "the recorded directory starts");
    // The guest, through a mount of proj: RENAME sub -> sub.old, SYMLINK sub -> outside.
    let mut a = T {
        base: tempfile::tempdir().unwrap(),
        b: Broker::new(&base_path.join("proj"), MountConfig::default()).unwrap(),
        unique: 0,
    };
    let mut args = ROOT.to_le_bytes().to_vec();
    args.extend_from_slice(b"sub\0sub.old\0");
    assert_eq!(a.call(op::RENAME, ROOT, &args).0, 0);
    let mut args = b"sub\0".to_vec();
    args.extend_from_slice(base_path.join("outside").to_str().unwrap().as_bytes());
    args.push(0);
    assert_eq!(a.call(op::SYMLINK, ROOT, &args).0, 0);
    match Broker::new(&recorded, cfg.clone()) {
        Err(BrokerError::NotReal { .. }) => {}
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("the mount started on the symlink's target"),
    }
    // Even without an identity, no symlink is followed.
    assert!(Broker::new(&recorded, MountConfig::default()).is_err());
    // A real directory of the same name, but not the recorded one.
    fs::remove_file(&recorded).unwrap();
    fs::create_dir(&recorded).unwrap();
    match Broker::new(&recorded, cfg.clone()) {
        Err(e @ BrokerError::Changed { .. }) => assert!(e.to_string().contains("recreate the sandbox"), "{e}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("another directory started as the recorded mount"),
    }
    // The original moved back: it starts again.
    fs::remove_dir(&recorded).unwrap();
    fs::rename(base_path.join("proj/sub.old"), &recorded).unwrap();
    assert!(Broker::new(&recorded, cfg).is_ok());
}

/// FS12: only `user.` xattrs are read or listed; ACLs and `security.` stay on the host.
#[test]
fn only_user_xattrs_are_read_or_listed() {
    let mut t = T::rw();
    let n = t.lookup(ROOT, "file").unwrap();
    let p = t.path("mnt/file");
    if rustix::fs::setxattr(&p, "user.note", b"v", rustix::fs::XattrFlags::empty()).is_err() {
        eprintln!("this filesystem has no user xattrs: skipping");
        return;
    }
    // A trusted./security. xattr needs privilege to set; where the test may, it sets one.
    let privileged = rustix::fs::setxattr(&p, "trusted.host", b"label", rustix::fs::XattrFlags::empty()).is_ok();
    let list = |t: &mut T, size: u32| {
        let mut a = size.to_le_bytes().to_vec();
        a.extend_from_slice(&[0; 4]);
        t.call(op::LISTXATTR, n, &a)
    };
    let (e, p0) = list(&mut t, 0);
    assert_eq!((e, u32_at(&p0, 0)), (0, b"user.note\0".len() as u32), "the size counts user. names only");
    let (e, names) = list(&mut t, 4096);
    assert_eq!((e, names.as_slice()), (0, &b"user.note\0"[..]));
    assert_eq!(list(&mut t, 3).0, fuse::ERANGE);
    let get = |t: &mut T, name: &str| {
        let mut a = 64u32.to_le_bytes().to_vec();
        a.extend_from_slice(&[0; 4]);
        a.extend_from_slice(&cstr(name));
        t.call(op::GETXATTR, n, &a)
    };
    assert_eq!(get(&mut t, "user.note"), (0, b"v".to_vec()));
    for name in ["trusted.host", "system.posix_acl_access", "security.selinux"] {
        assert_eq!(get(&mut t, name).0, fuse::ENODATA, "{name} (set on the host: {privileged})");
    }
}

/// FS13: a guest chmod is masked by the process umask, as a creation is: a shared file
/// never becomes writable by the host's other users.
#[test]
fn a_guest_chmod_is_masked_like_a_creation() {
    let mut t = T::rw();
    let n = t.lookup(ROOT, "file").unwrap();
    let mask = process_umask();
    assert_eq!(t.setattr(n, fuse::fattr::MODE, 0o777, 0, 0), 0);
    let mode = fs::metadata(t.path("mnt/file")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777 & !mask, "chmod 0777 under umask {mask:03o}");
    if mask & 0o002 != 0 {
        assert_eq!(mode & 0o002, 0, "world-writable");
    }
}

/// FS7: guest writes stop (ENOSPC) before they take the host filesystem's reserve; reads,
/// removals and renames still work.
#[test]
fn writes_stop_at_the_host_filesystems_reserve() {
    let mut t = T::new(MountConfig { reserve: Some(u64::MAX), ..MountConfig::default() });
    assert_eq!(t.create(ROOT, "new", 1, 0o644).map(|_| ()), Err(fuse::ENOSPC));
    assert_eq!(t.mkdir(ROOT, "d", 0o755).map(|_| ()), Err(fuse::ENOSPC));
    let n = t.lookup(ROOT, "file").unwrap();
    let fh = t.open(n, 2).unwrap();
    assert_eq!(t.write(fh, 0, b"more"), Err(fuse::ENOSPC));
    assert_eq!(t.read(fh, 0, 5).unwrap(), b"hello", "reads still work");
    assert_eq!(t.call(op::UNLINK, ROOT, &cstr("file")).0, 0, "removing frees space: allowed");
    let mut t = T::new(MountConfig { reserve: Some(0), ..MountConfig::default() });
    assert!(t.create(ROOT, "new", 1, 0o644).is_ok());
}
