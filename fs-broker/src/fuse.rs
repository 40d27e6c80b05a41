//! The FUSE wire format (the kernel's `fuse.h`, protocol 7.x as virtio-fs speaks it): one
//! request parsed from the bytes the guest wrote, once, into an owned, bounded [`Request`];
//! replies encoded with their lengths computed here.
//!
//! Invariants: nothing here trusts a length the guest wrote. The header's `len` must equal
//! the bytes actually received; every argument struct must be present in full; every name is
//! one path component ([`Name`]: 1..=255 bytes, no `/`, no NUL, not `.` or `..`); a write
//! carries exactly the bytes it says, at most [`MAX_WRITE`]; reads and directory listings ask
//! for at most [`MAX_READ`] (larger asks are clamped, never allocated). A malformed request
//! is a [`Malformed`] with the errno to answer — never a panic; an opcode this module does
//! not know is [`Request::Unsupported`], answered `ENOSYS` by the broker.

use std::fmt;

/// `struct fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER: usize = 16;
/// Longest name component (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Longest symlink target accepted (Linux `PATH_MAX`).
pub const MAX_TARGET: usize = 4096;
/// Most data bytes one WRITE may carry (advertised to the guest as `max_write`).
pub const MAX_WRITE: usize = 128 * 1024;
/// Most bytes one READ, READDIR or xattr reply carries (larger asks are clamped).
pub const MAX_READ: u32 = 128 * 1024;
/// Most (node, count) pairs in one BATCH_FORGET.
pub const MAX_BATCH_FORGET: usize = 4096;
/// Largest request accepted: a header, the largest argument struct, and a write's data.
pub const MAX_REQUEST: usize = IN_HEADER + 128 + MAX_WRITE;
/// Largest xattr name or value accepted (Linux `XATTR_NAME_MAX` / `XATTR_SIZE_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// The protocol version this broker speaks.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// Opcodes (`enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// `FATTR_*` bits of a SETATTR's `valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// One path component, checked: 1..=[`MAX_NAME`] bytes, no `/`, no NUL, not `.` or `..`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Name(Vec<u8>);

impl Name {
    pub fn new(bytes: &[u8]) -> Result<Name, Malformed> {
        let bad = bytes.is_empty()
            || bytes.len() > MAX_NAME
            || bytes.contains(&b'/')
            || bytes.contains(&0)
            || bytes == b"."
            || bytes == b"..";
        if bad {
            let errno = if bytes.len() > MAX_NAME { ENAMETOOLONG } else { EINVAL };
            return Err(Malformed { errno, what: "a name that is not one path component" });
        }
        Ok(Name(bytes.to_vec()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const EIO: i32 = 5;
pub const EBADF: i32 = 9;
pub const EACCES: i32 = 13;
pub const EEXIST: i32 = 17;
pub const EXDEV: i32 = 18;
pub const ENOTDIR: i32 = 20;
pub const EISDIR: i32 = 21;
pub const EINVAL: i32 = 22;
pub const ENFILE: i32 = 23;
pub const ENOSPC: i32 = 28;
pub const EROFS: i32 = 30;
pub const ERANGE: i32 = 34;
pub const ENAMETOOLONG: i32 = 36;
pub const ENOSYS: i32 = 38;
pub const ENOTEMPTY: i32 = 39;
pub const ELOOP: i32 = 40;
pub const ENODATA: i32 = 61;
pub const EOPNOTSUPP: i32 = 95;

/// A request that cannot be served as sent: answer `errno` (positive) and carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed FUSE request: {what} (errno {errno})")]
pub struct Malformed {
    pub errno: i32,
    pub what: &'static str,
}

fn malformed(what: &'static str) -> Malformed {
    Malformed { errno: EINVAL, what }
}

/// `struct fuse_in_header`, minus the length (checked against the bytes received).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A SETATTR's requested changes, each present only if its `FATTR_*` bit was set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub fh: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
}

/// A timestamp a SETATTR asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    Now,
    At { secs: u64, nsecs: u32 },
}

/// One parsed request. Names are checked components; byte payloads are owned copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Destroy,
    Lookup {
        name: Name,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        nodes: Vec<(u64, u64)>,
    },
    GetAttr {
        fh: Option<u64>,
    },
    SetAttr(SetAttr),
    ReadLink,
    Symlink {
        name: Name,
        target: Vec<u8>,
    },
    Mknod {
        name: Name,
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: Name,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: Name,
    },
    Rmdir {
        name: Name,
    },
    Rename {
        name: Name,
        newdir: u64,
        newname: Name,
        flags: u32,
    },
    Link {
        oldnode: u64,
        newname: Name,
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    },
    StatFs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Flush {
        fh: u64,
    },
    OpenDir {
        flags: u32,
    },
    ReadDir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    ReleaseDir {
        fh: u64,
    },
    FsyncDir {
        fh: u64,
        datasync: bool,
    },
    Access {
        mask: u32,
    },
    Create {
        name: Name,
        flags: u32,
        mode: u32,
        umask: u32,
    },
    GetXattr {
        name: Vec<u8>,
        size: u32,
    },
    ListXattr {
        size: u32,
    },
    SetXattr {
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        name: Vec<u8>,
    },
    Interrupt,
    /// An opcode this broker does not serve (deny by default): answered `ENOSYS`.
    Unsupported {
        opcode: u32,
    },
}

impl Request {
    /// FORGET and BATCH_FORGET get no reply (the kernel waits for none).
    pub fn expects_reply(&self) -> bool {
        !matches!(self, Request::Forget { .. } | Request::BatchForget { .. } | Request::Interrupt)
    }
}

/// Little-endian reads from the guest's bytes, each checked against what is left.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.b.len() < n {
            return Err(malformed("arguments shorter than their struct"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A NUL-terminated string of at most `max` bytes (the NUL not counted).
    fn cstr(&mut self, max: usize) -> Result<&'a [u8], Malformed> {
        let end = self.b.iter().position(|&c| c == 0).ok_or(malformed("a string without its NUL"))?;
        if end > max {
            return Err(Malformed { errno: ENAMETOOLONG, what: "a string longer than its limit" });
        }
        let s = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    fn name(&mut self) -> Result<Name, Malformed> {
        // One byte past the limit is read so that a too-long name says so.
        let s = self.cstr(MAX_NAME + 1)?;
        Name::new(s)
    }
}

/// Parses the header alone: `None` when fewer than [`IN_HEADER`] bytes arrived (there is
/// nobody to answer then: the request has no `unique`).
pub fn header(bytes: &[u8]) -> Option<Header> {
    let mut c = Cursor { b: bytes.get(..IN_HEADER)? };
    let _len = c.u32().ok()?;
    Some(Header {
        opcode: c.u32().ok()?,
        unique: c.u64().ok()?,
        nodeid: c.u64().ok()?,
        uid: c.u32().ok()?,
        gid: c.u32().ok()?,
        pid: c.u32().ok()?,
    })
}

/// Parses one request. `Err` carries the header when there was one, so that the error can
/// be answered.
pub fn parse(bytes: &[u8]) -> Result<(Header, Request), (Option<Header>, Malformed)> {
    let Some(h) = header(bytes) else {
        return Err((None, malformed("a request shorter than its header")));
    };
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if len != bytes.len() {
        return Err((Some(h), malformed("the header's length is not the request's")));
    }
    if bytes.len() > MAX_REQUEST {
        return Err((Some(h), malformed("a request longer than the broker accepts")));
    }
    let mut c = Cursor { b: &bytes[IN_HEADER..] };
    parse_args(h.opcode, &mut c).map(|r| (h, r)).map_err(|e| (Some(h), e))
}

fn datasync(flags: u32) -> bool {
    flags & 1 != 0
}

fn parse_args(opcode: u32, c: &mut Cursor<'_>) -> Result<Request, Malformed> {
    use Request as R;
    Ok(match opcode {
        op::INIT => {
            let (major, minor, max_readahead, flags) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
            R::Init { major, minor, max_readahead, flags }
        }
        op::DESTROY => R::Destroy,
        op::LOOKUP => R::Lookup { name: c.name()? },
        op::FORGET => R::Forget { nlookup: c.u64()? },
        op::BATCH_FORGET => {
            let count = c.u32()? as usize;
            c.u32()?;
            if count > MAX_BATCH_FORGET {
                return Err(malformed("a BATCH_FORGET of more nodes than the broker accepts"));
            }
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                nodes.push((c.u64()?, c.u64()?));
            }
            R::BatchForget { nodes }
        }
        op::GETATTR => {
            let flags = c.u32()?;
            c.u32()?;
            let fh = c.u64()?;
            R::GetAttr { fh: (flags & 1 != 0).then_some(fh) }
        }
        op::SETATTR => R::SetAttr(setattr(c)?),
        op::READLINK => R::ReadLink,
        op::SYMLINK => {
            let name = c.name()?;
            let target = c.cstr(MAX_TARGET)?;
            if target.is_empty() {
                return Err(Malformed { errno: ENOENT, what: "an empty symlink target" });
            }
            R::Symlink { name, target: target.to_vec() }
        }
        op::MKNOD => {
            let (mode, rdev, umask) = (c.u32()?, c.u32()?, c.u32()?);
            c.u32()?;
            R::Mknod { name: c.name()?, mode, rdev, umask }
        }
        op::MKDIR => {
            let (mode, umask) = (c.u32()?, c.u32()?);
            R::Mkdir { name: c.name()?, mode, umask }
        }
        op::UNLINK => R::Unlink { name: c.name()? },
        op::RMDIR => R::Rmdir { name: c.name()? },
        op::RENAME => {
            let newdir = c.u64()?;
            R::Rename { name: c.name()?, newdir, newname: c.name()?, flags: 0 }
        }
        op::RENAME2 => {
            let (newdir, flags) = (c.u64()?, c.u32()?);
            c.u32()?;
            R::Rename { name: c.name()?, newdir, newname: c.name()?, flags }
        }
        op::LINK => {
            let oldnode = c.u64()?;
            R::Link { oldnode, newname: c.name()? }
        }
        op::OPEN | op::OPENDIR => {
            let flags = c.u32()?;
            c.u32()?;
            if opcode == op::OPEN {
                R::Open { flags }
            } else {
                R::OpenDir { flags }
            }
        }
        op::READ | op::READDIR | op::READDIRPLUS => {
            let (fh, offset, size) = (c.u64()?, c.u64()?, c.u32()?);
            c.take(20)?; // read_flags, lock_owner, flags, padding
            let size = size.min(MAX_READ);
            match opcode {
                op::READ => R::Read { fh, offset, size },
                _ => R::ReadDir { fh, offset, size, plus: opcode == op::READDIRPLUS },
            }
        }
        op::WRITE => {
            let (fh, offset, size) = (c.u64()?, c.u64()?, c.u32()? as usize);
            c.take(20)?; // write_flags, lock_owner, flags, padding
            if size > MAX_WRITE {
                return Err(malformed("a write larger than max_write"));
            }
            let data = c.take(size)?;
            R::Write { fh, offset, data: data.to_vec() }
        }
        op::STATFS => R::StatFs,
        op::RELEASE | op::RELEASEDIR => {
            let fh = c.u64()?;
            c.take(16)?; // flags, release_flags, lock_owner
            if opcode == op::RELEASE {
                R::Release { fh }
            } else {
                R::ReleaseDir { fh }
            }
        }
        op::FSYNC | op::FSYNCDIR => {
            let (fh, flags) = (c.u64()?, c.u32()?);
            c.u32()?;
            if opcode == op::FSYNC {
                R::Fsync { fh, datasync: datasync(flags) }
            } else {
                R::FsyncDir { fh, datasync: datasync(flags) }
            }
        }
        op::FLUSH => {
            let fh = c.u64()?;
            c.take(16)?;
            R::Flush { fh }
        }
        op::ACCESS => {
            let mask = c.u32()?;
            c.u32()?;
            R::Access { mask }
        }
        op::CREATE => {
            let (flags, mode, umask) = (c.u32()?, c.u32()?, c.u32()?);
            c.u32()?; // open_flags
            R::Create { name: c.name()?, flags, mode, umask }
        }
        op::GETXATTR => {
            let size = c.u32()?;
            c.u32()?;
            R::GetXattr { name: c.cstr(MAX_XATTR_NAME)?.to_vec(), size: size.min(MAX_READ) }
        }
        op::LISTXATTR => {
            let size = c.u32()?;
            c.u32()?;
            R::ListXattr { size: size.min(MAX_READ) }
        }
        op::SETXATTR => {
            // struct fuse_setxattr_in { size, flags } (the 7.33 extended form is not negotiated).
            let (size, flags) = (c.u32()? as usize, c.u32()?);
            if size > MAX_XATTR_VALUE {
                return Err(Malformed { errno: ERANGE, what: "an xattr value larger than the limit" });
            }
            let name = c.cstr(MAX_XATTR_NAME)?.to_vec();
            let value = c.take(size)?.to_vec();
            R::SetXattr { name, value, flags }
        }
        op::REMOVEXATTR => R::RemoveXattr { name: c.cstr(MAX_XATTR_NAME)?.to_vec() },
        op::INTERRUPT => R::Interrupt,
        other => R::Unsupported { opcode: other },
    })
}

fn setattr(c: &mut Cursor<'_>) -> Result<SetAttr, Malformed> {
    let valid = c.u32()?;
    c.u32()?;
    let fh = c.u64()?;
    let size = c.u64()?;
    c.u64()?; // lock_owner
    let (atime, mtime) = (c.u64()?, c.u64()?);
    c.u64()?; // ctime
    let (atimensec, mtimensec) = (c.u32()?, c.u32()?);
    c.u32()?; // ctimensec
    let mode = c.u32()?;
    c.u32()?;
    let (uid, gid) = (c.u32()?, c.u32()?);
    c.u32()?;
    let has = |bit: u32| valid & bit != 0;
    let time = |now: u32, set: u32, secs: u64, nsecs: u32| {
        if has(now) {
            Some(Time::Now)
        } else if has(set) {
            Some(Time::At { secs, nsecs })
        } else {
            None
        }
    };
    Ok(SetAttr {
        fh: has(fattr::FH).then_some(fh),
        mode: has(fattr::MODE).then_some(mode),
        uid: has(fattr::UID).then_some(uid),
        gid: has(fattr::GID).then_some(gid),
        size: has(fattr::SIZE).then_some(size),
        atime: time(fattr::ATIME_NOW, fattr::ATIME, atime, atimensec),
        mtime: time(fattr::MTIME_NOW, fattr::MTIME, mtime, mtimensec),
    })
}

/// An error reply: `errno` is positive, sent negated.
pub fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER);
    out.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    out.extend_from_slice(&(-errno).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out
}

/// A success reply carrying `payload`.
pub fn ok_reply(unique: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER + payload.len());
    out.extend_from_slice(&((OUT_HEADER + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// `struct fuse_attr`, as the broker presents a host inode to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (u64, u32),
    pub mtime: (u64, u32),
    pub ctime: (u64, u32),
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Little-endian writer for reply payloads.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// `struct fuse_attr` (88 bytes).
    pub fn attr(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(a.atime.0).u64(a.mtime.0).u64(a.ctime.0);
        self.u32(a.atime.1).u32(a.mtime.1).u32(a.ctime.1);
        self.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid).u32(a.rdev).u32(a.blksize).u32(0)
    }
    /// `struct fuse_entry_out` (128 bytes): the node, its generation, cache lifetimes, attrs.
    pub fn entry(&mut self, nodeid: u64, valid: (u64, u32), a: &Attr) -> &mut Self {
        self.u64(nodeid).u64(0).u64(valid.0).u64(valid.0).u32(valid.1).u32(valid.1).attr(a)
    }
    /// `struct fuse_attr_out` (104 bytes).
    pub fn attr_out(&mut self, valid: (u64, u32), a: &Attr) -> &mut Self {
        self.u64(valid.0).u32(valid.1).u32(0).attr(a)
    }
    /// `struct fuse_dirent` plus its name, padded to 8 bytes.
    pub fn dirent(&mut self, ino: u64, off: u64, kind: u32, name: &[u8]) -> &mut Self {
        self.u64(ino).u64(off).u32(name.len() as u32).u32(kind).bytes(name);
        let pad = (8 - self.0.len() % 8) % 8;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
}

/// Size of one `fuse_dirent` record with a name of `len` bytes, padded.
pub fn dirent_size(len: usize) -> usize {
    (24 + len).div_ceil(8) * 8
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request as the kernel would lay it out: header with the right length, then `args`.
    pub(crate) fn request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((IN_HEADER + args.len()) as u32).to_le_bytes());
        v.extend_from_slice(&opcode.to_le_bytes());
        v.extend_from_slice(&unique.to_le_bytes());
        v.extend_from_slice(&nodeid.to_le_bytes());
        v.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
        v.extend_from_slice(args);
        v
    }

    fn errno_of(bytes: &[u8]) -> i32 {
        parse(bytes).expect_err("malformed").1.errno
    }

    #[test]
    fn a_lookup_parses_into_a_checked_name() {
        let (h, r) = parse(&request(op::LOOKUP, 7, 1, b"file.txt\0")).unwrap();
        assert_eq!((h.unique, h.nodeid), (7, 1));
        assert_eq!(r, Request::Lookup { name: Name::new(b"file.txt").unwrap() });
    }

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        for bad in [&b"..\0"[..], b".\0", b"a/b\0", b"/etc\0", b"\0", b"../x\0"] {
            assert_eq!(errno_of(&request(op::LOOKUP, 1, 1, bad)), EINVAL, "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [vec![b'a'; 256], vec![0]].concat();
        assert_eq!(errno_of(&request(op::LOOKUP, 1, 1, &long)), ENAMETOOLONG);
        assert!(parse(&request(op::LOOKUP, 1, 1, &[vec![b'a'; 255], vec![0]].concat())).is_ok());
        // A name without its terminator.
        assert_eq!(errno_of(&request(op::LOOKUP, 1, 1, b"abc")), EINVAL);
        // Both names of a rename are checked.
        let mut args = 1u64.to_le_bytes().to_vec();
        args.extend_from_slice(b"ok\0..\0");
        assert_eq!(errno_of(&request(op::RENAME, 1, 1, &args)), EINVAL);
    }

    #[test]
    fn truncated_headers_and_lying_lengths_are_refused() {
        let r = request(op::GETATTR, 9, 1, &[0u8; 16]);
        for n in 0..IN_HEADER {
            assert_eq!(parse(&r[..n]).unwrap_err().0, None, "a {n}-byte request has no header");
        }
        // The header says more (or fewer) bytes than arrived.
        for cut in [1, 8, 15] {
            let e = parse(&r[..r.len() - cut]).unwrap_err();
            assert_eq!((e.0.map(|h| h.unique), e.1.errno), (Some(9), EINVAL));
        }
        let mut long = r.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(parse(&long).is_err());
        // Arguments shorter than their struct (with a header that tells the truth).
        assert_eq!(errno_of(&request(op::GETATTR, 1, 1, &[0u8; 15])), EINVAL);
        assert_eq!(errno_of(&request(op::SETATTR, 1, 1, &[0u8; 87])), EINVAL);
        assert_eq!(errno_of(&request(op::READ, 1, 1, &[0u8; 39])), EINVAL);
    }

    #[test]
    fn a_write_carries_exactly_what_it_says_and_no_more_than_max_write() {
        let args = |size: u32, data: &[u8]| {
            let mut a = Vec::new();
            a.extend_from_slice(&3u64.to_le_bytes());
            a.extend_from_slice(&10u64.to_le_bytes());
            a.extend_from_slice(&size.to_le_bytes());
            a.extend_from_slice(&[0u8; 20]);
            a.extend_from_slice(data);
            a
        };
        let (_, r) = parse(&request(op::WRITE, 1, 2, &args(5, b"hello"))).unwrap();
        assert_eq!(r, Request::Write { fh: 3, offset: 10, data: b"hello".to_vec() });
        assert_eq!(errno_of(&request(op::WRITE, 1, 2, &args(6, b"hello"))), EINVAL, "size past the data");
        assert_eq!(errno_of(&request(op::WRITE, 1, 2, &args(u32::MAX, b"x"))), EINVAL);
        let big = vec![0u8; MAX_WRITE + 1];
        assert!(parse(&request(op::WRITE, 1, 2, &args(big.len() as u32, &big))).is_err());
    }

    #[test]
    fn reads_are_clamped_and_unknown_opcodes_are_unsupported() {
        let mut a = Vec::new();
        a.extend_from_slice(&1u64.to_le_bytes());
        a.extend_from_slice(&0u64.to_le_bytes());
        a.extend_from_slice(&u32::MAX.to_le_bytes());
        a.extend_from_slice(&[0u8; 20]);
        let (_, r) = parse(&request(op::READ, 1, 2, &a)).unwrap();
        assert_eq!(r, Request::Read { fh: 1, offset: 0, size: MAX_READ });
        for opcode in [0, 7, 19, 39, 40, 48, 999, u32::MAX] {
            assert_eq!(parse(&request(opcode, 1, 1, &[])).unwrap().1, Request::Unsupported { opcode });
        }
    }

    #[test]
    fn batch_forget_is_bounded_by_its_count_and_its_bytes() {
        let mut a = 2u32.to_le_bytes().to_vec();
        a.extend_from_slice(&[0; 4]);
        for (n, c) in [(5u64, 1u64), (6, 2)] {
            a.extend_from_slice(&n.to_le_bytes());
            a.extend_from_slice(&c.to_le_bytes());
        }
        assert_eq!(
            parse(&request(op::BATCH_FORGET, 0, 0, &a)).unwrap().1,
            Request::BatchForget { nodes: vec![(5, 1), (6, 2)] }
        );
        // A count past the pairs sent, and one past the limit, allocate nothing.
        let mut lie = (MAX_BATCH_FORGET as u32 + 1).to_le_bytes().to_vec();
        lie.extend_from_slice(&[0; 4]);
        assert!(parse(&request(op::BATCH_FORGET, 0, 0, &lie)).is_err());
        a[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(parse(&request(op::BATCH_FORGET, 0, 0, &a)).is_err());
    }

    #[test]
    fn replies_have_the_lengths_they_say() {
        let e = error_reply(42, ENOENT);
        assert_eq!(e.len(), OUT_HEADER);
        assert_eq!(u32::from_le_bytes(e[..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_le_bytes(e[4..8].try_into().unwrap()), -ENOENT);
        assert_eq!(u64::from_le_bytes(e[8..16].try_into().unwrap()), 42);
        let mut o = Out::default();
        o.entry(5, (1, 0), &Attr::default());
        assert_eq!(o.0.len(), 128);
        let mut o = Out::default();
        o.attr_out((1, 0), &Attr::default());
        assert_eq!(o.0.len(), 104);
        let mut o = Out::default();
        o.dirent(1, 1, 4, b"abc");
        assert_eq!(o.0.len(), dirent_size(3));
        assert_eq!(o.0.len() % 8, 0);
        let ok = ok_reply(3, b"xyz");
        assert_eq!(u32::from_le_bytes(ok[..4].try_into().unwrap()) as usize, ok.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        // A deterministic spray of lengths, opcodes and argument bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let opcode = (x % 50) as u32;
            let n = (x >> 8) as usize % 300;
            let args: Vec<u8> = (0..n).map(|i| (x.rotate_left(i as u32) & 0xff) as u8).collect();
            let _ = parse(&request(opcode, 1, 1, &args));
            let mut raw = request(opcode, 1, 1, &args);
            raw.truncate((x >> 20) as usize % (raw.len() + 1));
            let _ = parse(&raw);
        }
    }
}
