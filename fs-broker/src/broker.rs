//! The broker core: serves parsed FUSE requests against one host directory, confined to it.
//!
//! Invariants:
//! - Every inode the guest knows is an `O_PATH` file descriptor opened by this broker, found
//!   by one name component beneath an inode it already held (`openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, or `openat` with
//!   `O_NOFOLLOW` on kernels without `openat2`; names are single components, checked by
//!   [`fuse::Name`]). No host path is ever kept or re-resolved: renaming or swapping a
//!   directory for a symlink on the host changes nothing the broker already holds, and the
//!   next lookup through the new symlink opens the symlink itself, never its target.
//! - A symlink is data: READLINK returns its target, nothing on the host follows it.
//! - Only regular files and directories are opened for I/O (a host FIFO or device node in
//!   the tree is never opened); files are reopened from their held descriptor through this
//!   process's `/proc/self/fd` (checked to be procfs), which names that inode and no other,
//!   and the reopened file's identity is checked again.
//! - Read-only mounts are enforced here: nothing is opened for writing and every mutating
//!   operation is `EROFS`, whatever the guest's mount says.
//! - Nothing the guest asks creates setuid, setgid or sticky bits, device nodes, FIFOs or
//!   sockets on the host, or sets an xattr outside the `user.` namespace (`security.capability`
//!   would hand a host binary capabilities); ownership on the host never changes: every file
//!   appears owned by the mount's configured owner, and a chown to anyone else is `EPERM`.
//! - Tables are bounded: at most the mount's `max_inodes` inodes and `max_handles` open
//!   handles, themselves at most [`MAX_INODES`] and [`MAX_HANDLES`] (`ENFILE` past either,
//!   never a descriptor past the process's limit: [`fd_budget`] sizes them); each reply is
//!   at most [`fuse::MAX_READ`] bytes of data.
//! - Every operation is denied (`ENOSYS`) unless it is handled below.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::fuse::{self, Attr, Name, Out, Request, SetAttr, Time};

/// Most inodes the guest may hold at once (each is one host file descriptor).
pub const MAX_INODES: usize = 65_536;
/// Most open file and directory handles at once.
pub const MAX_HANDLES: usize = 4_096;
/// The root's node id (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;
/// procfs's `f_type`.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
/// `fuse_init_out` flags the broker may grant (when the kernel offers them):
/// ASYNC_READ, BIG_WRITES, DO_READDIRPLUS, READDIRPLUS_AUTO, PARALLEL_DIROPS, MAX_PAGES.
const INIT_FLAGS: u32 = 1 | (1 << 5) | (1 << 13) | (1 << 14) | (1 << 18) | (1 << 22);

/// How a mount presents itself and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountConfig {
    /// Refuse every change (`EROFS`), and open nothing for writing.
    pub read_only: bool,
    /// The owner every file appears to have in the guest.
    pub uid: u32,
    pub gid: u32,
    /// How long the guest may cache names and attributes (0: ask every time).
    pub cache: Duration,
    /// Most inodes and open handles held at once (each is a host file descriptor; at most
    /// [`MAX_INODES`] and [`MAX_HANDLES`]; see [`fd_budget`] for sizing them).
    pub max_inodes: usize,
    pub max_handles: usize,
    /// The root directory's `(st_dev, st_ino)` when the mount was recorded: a root that is
    /// another directory now is refused ([`BrokerError::Changed`]).
    pub identity: Option<(u64, u64)>,
    /// Host filesystem bytes the guest never takes (`None`: [`RESERVE_MAX`] or
    /// [`RESERVE_PERCENT`] of the filesystem, whichever is less).
    pub reserve: Option<u64>,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            read_only: false,
            uid: 0,
            gid: 0,
            cache: Duration::from_secs(1),
            max_inodes: MAX_INODES,
            max_handles: MAX_HANDLES,
            identity: None,
            reserve: None,
        }
    }
}

/// Descriptors kept back for everything else a sandbox process opens.
pub const FD_RESERVE: u64 = 1024;

/// Raises this process's open-file limit as far as it may go (every inode a guest knows is
/// one descriptor) and splits what is left after [`FD_RESERVE`] between `mounts` mounts:
/// `(max_inodes, max_handles)` for each, at most [`MAX_INODES`] and [`MAX_HANDLES`].
pub fn fd_budget(mounts: usize) -> (usize, usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let target = (MAX_INODES + MAX_HANDLES) as u64 * 4 + FD_RESERVE;
    let l = getrlimit(Resource::Nofile);
    if l.maximum.is_some_and(|h| h < target) {
        // Root may raise the hard limit; others keep theirs.
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: Some(target) });
    }
    let l = getrlimit(Resource::Nofile);
    if l.current < l.maximum || (l.current.is_some() && l.maximum.is_none()) {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: l.maximum, maximum: l.maximum });
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(target);
    let each = (soft.saturating_sub(FD_RESERVE) / mounts.max(1) as u64) as usize;
    let handles = (each / 8).clamp(16, MAX_HANDLES);
    let inodes = each.saturating_sub(handles).clamp(64, MAX_INODES);
    (inodes, handles)
}

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot open the mount's directory: {0}")]
    Root(#[source] std::io::Error),
    #[error("cannot open this process's /proc/self/fd (procfs is needed to reopen files): {0}")]
    Proc(#[source] std::io::Error),
    #[error("/proc/self/fd is not procfs")]
    NotProc,
    #[error("the mount's host path {path} is not a real directory now ({why}): it was replaced since the sandbox was created; move it back, or recreate the sandbox to share what is there now")]
    NotReal { path: String, why: String },
    #[error("the mount's host path {path} is another directory than the one recorded when the sandbox was created (device/inode {want:?}, now {got:?}): it was moved or replaced; move it back, or recreate the sandbox to share what is there now")]
    Changed { path: String, want: (u64, u64), got: (u64, u64) },
}

/// Opens the absolute directory `root` as an `O_PATH` descriptor one component at a time,
/// following no symlink in any component (the recorded path is canonical, so a symlink in
/// it now means something was swapped in).
fn open_root(root: &Path) -> Result<OwnedFd, BrokerError> {
    use std::path::Component;
    let shown = root.display().to_string();
    let not_real = |why: String| BrokerError::NotReal { path: shown.clone(), why };
    if !root.is_absolute() {
        return Err(not_real("it is not absolute".into()));
    }
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rfs::open("/", flags, Mode::empty()).map_err(|e| BrokerError::Root(e.into()))?;
    let mut at = std::path::PathBuf::from("/");
    for c in root.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => {
                at.push(name);
                fd = rfs::openat(&fd, name, flags, Mode::empty()).map_err(|e| match e {
                    Errno::NOTDIR | Errno::LOOP => {
                        not_real(format!("{} is a symlink or not a directory", at.display()))
                    }
                    e => BrokerError::Root(e.into()),
                })?;
            }
            _ => return Err(not_real("it has `.` or `..` components".into())),
        }
    }
    Ok(fd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    /// FIFOs, sockets and device nodes: visible, never opened.
    Other,
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
    kind: Kind,
    lookups: u64,
}

enum Handle {
    File { fd: OwnedFd, node: u64 },
    Dir { dir: Dir, node: u64 },
}

/// One mount's broker core. Feed it requests with [`Broker::handle`].
pub struct Broker {
    cfg: MountConfig,
    proc_fd: OwnedFd,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    handles: HashMap<u64, Handle>,
    next_node: u64,
    next_fh: u64,
    /// Whether this kernel has `openat2` (cleared on the first `ENOSYS`).
    openat2: std::cell::Cell<bool>,
    /// This process's umask, applied to the guest's chmod as to its creations.
    umask: u32,
    /// The last look at the host filesystem's free space: when, and whether it was under
    /// the reserve.
    space: std::cell::Cell<(Option<std::time::Instant>, bool)>,
}

/// The host filesystem space a mount's guest never takes: [`RESERVE_MAX`] or
/// [`RESERVE_PERCENT`] of the filesystem, whichever is less.
pub const RESERVE_MAX: u64 = 2 << 30;
pub const RESERVE_PERCENT: u64 = 5;

/// Longest xattr name list the kernel returns (`XATTR_LIST_MAX`).
const XATTR_LIST_MAX: usize = 65_536;

/// This process's umask, read without changing it (`Umask:` in `/proc/self/status`); 022
/// where the kernel does not say.
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

type Res<T> = Result<T, i32>;

fn errno(e: Errno) -> i32 {
    e.raw_os_error()
}

fn kind_of(st: &rfs::Stat) -> Kind {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn key_of(st: &rfs::Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl Broker {
    /// A broker for the directory at `root` (absolute and canonical: the user's choice,
    /// resolved when the mount was recorded), opened without following any symlink and
    /// checked against the recorded identity.
    pub fn new(root: &Path, cfg: MountConfig) -> Result<Broker, BrokerError> {
        let fd = open_root(root)?;
        let st = rfs::fstat(&fd).map_err(|e| BrokerError::Root(e.into()))?;
        if let Some(want) = cfg.identity.filter(|w| *w != key_of(&st)) {
            return Err(BrokerError::Changed { path: root.display().to_string(), want, got: key_of(&st) });
        }
        let proc_fd = rfs::open("/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| BrokerError::Proc(e.into()))?;
        let fs = rfs::fstatfs(&proc_fd).map_err(|e| BrokerError::Proc(e.into()))?;
        #[allow(clippy::unnecessary_cast)]
        if fs.f_type as i64 != PROC_SUPER_MAGIC {
            return Err(BrokerError::NotProc);
        }
        let mut b = Broker {
            cfg,
            proc_fd,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            handles: HashMap::new(),
            next_node: ROOT + 1,
            next_fh: 1,
            openat2: std::cell::Cell::new(true),
            umask: process_umask(),
            space: std::cell::Cell::new((None, false)),
        };
        b.by_key.insert(key_of(&st), ROOT);
        b.inodes.insert(ROOT, Inode { fd, key: key_of(&st), kind: Kind::Dir, lookups: 1 });
        Ok(b)
    }

    /// Inodes held (the root included), for tests and metrics.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Open handles, for tests and metrics.
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// Serves one request as the guest sent it; returns the reply to write back, or `None`
    /// when the request gets none (FORGET, BATCH_FORGET, INTERRUPT, or one too short to name
    /// its sender).
    pub fn handle(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let (h, req) = match fuse::parse(bytes) {
            Ok(p) => p,
            Err((Some(h), e)) => {
                tracing::debug!(opcode = h.opcode, "virtio-fs: {e}");
                return Some(fuse::error_reply(h.unique, e.errno));
            }
            Err((None, _)) => return None,
        };
        if !req.expects_reply() {
            self.serve_forget(h.nodeid, &req);
            return None;
        }
        Some(match self.serve(h.nodeid, req) {
            Ok(payload) => fuse::ok_reply(h.unique, &payload),
            Err(e) => fuse::error_reply(h.unique, e),
        })
    }

    fn serve_forget(&mut self, node: u64, req: &Request) {
        match req {
            Request::Forget { nlookup } => self.forget(node, *nlookup),
            Request::BatchForget { nodes } => {
                for &(n, c) in nodes {
                    self.forget(n, c);
                }
            }
            _ => {}
        }
    }

    fn forget(&mut self, node: u64, n: u64) {
        if node == ROOT {
            return;
        }
        let Some(i) = self.inodes.get_mut(&node) else { return };
        i.lookups = i.lookups.saturating_sub(n);
        if i.lookups == 0 {
            let i = self.inodes.remove(&node).expect("present");
            self.by_key.remove(&i.key);
        }
    }

    fn serve(&mut self, node: u64, req: Request) -> Res<Vec<u8>> {
        use Request as R;
        let ro = self.cfg.read_only;
        // One classification: what changes the host tree, and of that what may take space.
        let (mutating, grows) = match &req {
            R::SetAttr(a) => (true, a.size.is_some()),
            R::Symlink { .. }
            | R::Mknod { .. }
            | R::Mkdir { .. }
            | R::Link { .. }
            | R::Write { .. }
            | R::Create { .. }
            | R::SetXattr { .. } => (true, true),
            R::Unlink { .. } | R::Rmdir { .. } | R::Rename { .. } | R::RemoveXattr { .. } => (true, false),
            _ => (false, false),
        };
        // Guest writes stop short of filling the host's filesystem (it may hold the msb
        // home, the state store, other sandboxes' disks): ENOSPC once what is left falls under
        // the reserve.
        if grows && !ro && self.host_full() {
            return Err(fuse::ENOSPC);
        }
        if ro && mutating {
            return Err(fuse::EROFS);
        }
        match req {
            R::Init { major, minor: _, max_readahead, flags } => self.init(major, max_readahead, flags),
            R::Destroy => {
                self.handles.clear();
                self.inodes.retain(|&n, _| n == ROOT);
                self.by_key.retain(|_, &mut n| n == ROOT);
                Ok(Vec::new())
            }
            R::Lookup { name } => {
                let n = self.lookup(node, &name)?;
                self.entry(n)
            }
            R::GetAttr { .. } => {
                let a = self.attr(node)?;
                Ok(Out::default().attr_out(self.valid(), &a).0.clone())
            }
            R::SetAttr(s) => self.setattr(node, s),
            R::ReadLink => {
                let i = self.inode(node)?;
                if i.kind != Kind::Symlink {
                    return Err(fuse::EINVAL);
                }
                let t = rfs::readlinkat(&i.fd, "", Vec::new()).map_err(errno)?;
                Ok(t.into_bytes())
            }
            R::Symlink { name, target } => {
                let dir = self.dir(node)?;
                rfs::symlinkat(target.as_slice(), &dir.fd, name.as_bytes()).map_err(errno)?;
                let n = self.lookup(node, &name)?;
                self.entry(n)
            }
            R::Mknod { name, mode, umask, .. } => {
                // Only regular files: no device nodes, FIFOs or sockets on the host.
                if FileType::from_raw_mode(mode) != FileType::RegularFile {
                    return Err(fuse::EPERM);
                }
                let fd = self.create_file(node, &name, OFlags::WRONLY | OFlags::EXCL, mode, umask)?;
                drop(fd);
                let n = self.lookup(node, &name)?;
                self.entry(n)
            }
            R::Mkdir { name, mode, umask } => {
                let dir = self.dir(node)?;
                rfs::mkdirat(&dir.fd, name.as_bytes(), Mode::from_bits_truncate(mode & 0o777 & !umask))
                    .map_err(errno)?;
                let n = self.lookup(node, &name)?;
                self.entry(n)
            }
            R::Unlink { name } => {
                let dir = self.dir(node)?;
                rfs::unlinkat(&dir.fd, name.as_bytes(), AtFlags::empty()).map_err(errno)?;
                Ok(Vec::new())
            }
            R::Rmdir { name } => {
                let dir = self.dir(node)?;
                rfs::unlinkat(&dir.fd, name.as_bytes(), AtFlags::REMOVEDIR).map_err(errno)?;
                Ok(Vec::new())
            }
            R::Rename { name, newdir, newname, flags } => {
                let allowed = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE;
                let flags = RenameFlags::from_bits(flags).filter(|f| allowed.contains(*f)).ok_or(fuse::EINVAL)?;
                let (from, to) = (self.dir(node)?, self.dir(newdir)?);
                rfs::renameat_with(&from.fd, name.as_bytes(), &to.fd, newname.as_bytes(), flags).map_err(errno)?;
                Ok(Vec::new())
            }
            R::Link { oldnode, newname } => {
                let old = self.inode(oldnode)?;
                if old.kind != Kind::File {
                    return Err(fuse::EPERM); // no directory, symlink or special-file links
                }
                let proc_name = fd_name(&old.fd);
                let dir = self.dir(node)?;
                rfs::linkat(&self.proc_fd, proc_name.as_str(), &dir.fd, newname.as_bytes(), AtFlags::SYMLINK_FOLLOW)
                    .map_err(errno)?;
                let n = self.lookup(node, &newname)?;
                self.entry(n)
            }
            R::Open { flags } => {
                let fd = self.reopen(node, flags)?;
                let fh = self.add_handle(Handle::File { fd, node })?;
                Ok(Out::default().u64(fh).u32(0).u32(0).0.clone())
            }
            R::Read { fh, offset, size } => {
                let Some(Handle::File { fd, .. }) = self.handles.get(&fh) else { return Err(fuse::EBADF) };
                let mut buf = vec![0u8; size as usize];
                let n = rustix::io::pread(fd, &mut buf, offset).map_err(errno)?;
                buf.truncate(n);
                Ok(buf)
            }
            R::Write { fh, offset, data } => {
                let Some(Handle::File { fd, .. }) = self.handles.get(&fh) else { return Err(fuse::EBADF) };
                let n = rustix::io::pwrite(fd, &data, offset).map_err(errno)?;
                Ok(Out::default().u32(n as u32).u32(0).0.clone())
            }
            R::StatFs => {
                let root = self.inode(ROOT)?;
                let s = rfs::fstatvfs(&root.fd).map_err(errno)?;
                let mut o = Out::default();
                o.u64(s.f_blocks).u64(s.f_bfree).u64(s.f_bavail).u64(s.f_files).u64(s.f_ffree);
                o.u32(s.f_bsize as u32).u32(s.f_namemax as u32).u32(s.f_frsize as u32).u32(0);
                o.bytes(&[0u8; 24]);
                Ok(o.0)
            }
            R::Release { fh } | R::ReleaseDir { fh } => {
                self.handles.remove(&fh);
                Ok(Vec::new())
            }
            R::Flush { fh } => match self.handles.get(&fh) {
                Some(_) => Ok(Vec::new()),
                None => Err(fuse::EBADF),
            },
            R::Fsync { fh, datasync } | R::FsyncDir { fh, datasync } => {
                let fd = match self.handles.get(&fh) {
                    Some(Handle::File { fd, .. }) => fd.as_fd(),
                    Some(Handle::Dir { dir, .. }) => dir.fd().map_err(errno)?,
                    None => return Err(fuse::EBADF),
                };
                if datasync { rfs::fdatasync(fd) } else { rfs::fsync(fd) }.map_err(errno)?;
                Ok(Vec::new())
            }
            R::OpenDir { .. } => {
                let i = self.dir(node)?;
                let fd = rfs::openat(&i.fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(errno)?;
                let dir = Dir::new(fd).map_err(errno)?;
                let fh = self.add_handle(Handle::Dir { dir, node })?;
                Ok(Out::default().u64(fh).u32(0).u32(0).0.clone())
            }
            R::ReadDir { fh, offset, size, plus } => self.readdir(fh, offset, size as usize, plus),
            R::Access { mask } => {
                self.inode(node)?;
                // W_OK on a read-only mount; the guest kernel checks the mode bits itself.
                if ro && mask & 2 != 0 {
                    return Err(fuse::EROFS);
                }
                Ok(Vec::new())
            }
            R::Create { name, flags, mode, umask } => {
                // The creating open always carries O_EXCL, so it never opens what is already
                // there (a host FIFO would block the broker, a device would be opened). An
                // existing name without the guest's O_EXCL is looked up and opened as OPEN
                // does, which opens regular files only (virtiofsd's CVE-2020-35517 fix).
                let (fd, n) = match self.create_file(node, &name, open_flags(flags) | OFlags::EXCL, mode, umask) {
                    Ok(fd) => (fd, self.lookup(node, &name)?),
                    Err(fuse::EEXIST) if flags & OFlags::EXCL.bits() == 0 => {
                        let n = self.lookup(node, &name)?;
                        match self.reopen(n, flags) {
                            Ok(fd) => (fd, n),
                            Err(e) => {
                                self.forget(n, 1);
                                return Err(e);
                            }
                        }
                    }
                    Err(e) => return Err(e),
                };
                let fh = match self.add_handle(Handle::File { fd, node: n }) {
                    Ok(fh) => fh,
                    Err(e) => {
                        self.forget(n, 1);
                        return Err(e);
                    }
                };
                let mut o = Out(self.entry(n)?);
                o.u64(fh).u32(0).u32(0);
                Ok(o.0)
            }
            R::GetXattr { name, size } => {
                let path = self.xattr_path(node)?;
                // Only `user.` xattrs are the guest's to read: ACLs name host users and
                // groups, `security.` carries host labels and capabilities.
                let name = user_xattr(&name).map_err(|_| fuse::ENODATA)?;
                if size == 0 {
                    let n = rfs::getxattr_query(path.as_str(), name).map_err(errno)?;
                    return Ok(Out::default().u32(n as u32).u32(0).0.clone());
                }
                let mut buf = vec![0u8; size as usize];
                let n = rfs::getxattr(path.as_str(), name, &mut buf[..]).map_err(errno)?;
                buf.truncate(n);
                Ok(buf)
            }
            R::ListXattr { size } => {
                let path = self.xattr_path(node)?;
                // The host's whole list (at most XATTR_LIST_MAX), then only its `user.` names.
                let mut all = vec![0u8; XATTR_LIST_MAX];
                let n = rfs::listxattr(path.as_str(), &mut all[..]).map_err(errno)?;
                let mut list = Vec::new();
                for name in all[..n].split(|&b| b == 0).filter(|x| x.starts_with(b"user.")) {
                    list.extend_from_slice(name);
                    list.push(0);
                }
                if size == 0 {
                    return Ok(Out::default().u32(list.len() as u32).u32(0).0.clone());
                }
                if list.len() > size as usize {
                    return Err(fuse::ERANGE);
                }
                Ok(list)
            }
            R::SetXattr { name, value, flags } => {
                let path = self.xattr_path(node)?;
                let name = user_xattr(&name)?;
                let flags = rfs::XattrFlags::from_bits(flags).ok_or(fuse::EINVAL)?;
                rfs::setxattr(path.as_str(), name, &value, flags).map_err(errno)?;
                Ok(Vec::new())
            }
            R::RemoveXattr { name } => {
                let path = self.xattr_path(node)?;
                rfs::removexattr(path.as_str(), user_xattr(&name)?).map_err(errno)?;
                Ok(Vec::new())
            }
            R::Forget { .. } | R::BatchForget { .. } | R::Interrupt => Ok(Vec::new()),
            R::Unsupported { .. } => Err(fuse::ENOSYS),
        }
    }

    fn init(&mut self, major: u32, max_readahead: u32, flags: u32) -> Res<Vec<u8>> {
        if major < fuse::KERNEL_VERSION {
            return Err(fuse::EIO);
        }
        let mut o = Out::default();
        o.u32(fuse::KERNEL_VERSION).u32(fuse::KERNEL_MINOR_VERSION).u32(max_readahead).u32(flags & INIT_FLAGS);
        o.u16(16).u16(12); // max_background, congestion_threshold
        o.u32(fuse::MAX_WRITE as u32).u32(1); // max_write, time_gran
        o.u16((fuse::MAX_WRITE / 4096) as u16).u16(0); // max_pages, map_alignment
        o.u32(0).u32(0).bytes(&[0u8; 24]); // flags2, max_stack_depth, unused
        Ok(o.0)
    }

    fn valid(&self) -> (u64, u32) {
        (self.cfg.cache.as_secs(), self.cfg.cache.subsec_nanos())
    }

    fn inode(&self, node: u64) -> Res<&Inode> {
        self.inodes.get(&node).ok_or(fuse::ENOENT)
    }

    /// Whether the host filesystem of the mount has less free space than the reserve
    /// (looked at most once a second).
    fn host_full(&self) -> bool {
        let (at, full) = self.space.get();
        if at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return full;
        }
        let full = match self.inodes.get(&ROOT).map(|i| rfs::fstatvfs(&i.fd)) {
            Some(Ok(st)) => {
                let total = st.f_blocks.saturating_mul(st.f_frsize);
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                free < self.cfg.reserve.unwrap_or(RESERVE_MAX.min(total / 100 * RESERVE_PERCENT))
            }
            _ => false,
        };
        self.space.set((Some(std::time::Instant::now()), full));
        full
    }

    fn dir(&self, node: u64) -> Res<&Inode> {
        let i = self.inode(node)?;
        if i.kind != Kind::Dir {
            return Err(fuse::ENOTDIR);
        }
        Ok(i)
    }

    /// Opens `name` beneath the directory `parent` as an `O_PATH` descriptor of the entry
    /// itself (a symlink is opened, not followed).
    fn open_beneath(&self, parent: &OwnedFd, name: &[u8], flags: OFlags, mode: Mode) -> Res<OwnedFd> {
        let mut flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if !flags.contains(OFlags::PATH) {
            flags |= OFlags::NOCTTY;
        }
        if self.openat2.get() {
            let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rfs::openat2(parent, name, flags, mode, how) {
                Err(Errno::NOSYS) => self.openat2.set(false),
                r => return r.map_err(errno),
            }
        }
        // Without openat2: `name` is one component (no `/`, not `..`), so O_NOFOLLOW alone
        // keeps the open beneath `parent`.
        rfs::openat(parent, name, flags, mode).map_err(errno)
    }

    /// Looks `name` up beneath `parent`, counting one lookup on the node it returns.
    fn lookup(&mut self, parent: u64, name: &Name) -> Res<u64> {
        let fd = self.open_beneath(&self.dir(parent)?.fd, name.as_bytes(), OFlags::PATH, Mode::empty())?;
        self.adopt(fd)
    }

    /// Takes `fd` (an `O_PATH` descriptor) as a node: the existing one if the guest already
    /// holds this inode, else a new one if the table has room.
    fn adopt(&mut self, fd: OwnedFd) -> Res<u64> {
        let st = rfs::fstat(&fd).map_err(errno)?;
        if let Some(&n) = self.by_key.get(&key_of(&st)) {
            let i = self.inodes.get_mut(&n).expect("by_key and inodes agree");
            i.lookups += 1;
            return Ok(n);
        }
        if self.inodes.len() >= self.cfg.max_inodes.min(MAX_INODES) {
            return Err(fuse::ENFILE);
        }
        let n = self.next_node;
        self.next_node += 1;
        self.by_key.insert(key_of(&st), n);
        self.inodes.insert(n, Inode { fd, key: key_of(&st), kind: kind_of(&st), lookups: 1 });
        Ok(n)
    }

    fn attr(&self, node: u64) -> Res<Attr> {
        let i = self.inode(node)?;
        let st = rfs::fstat(&i.fd).map_err(errno)?;
        Ok(self.present(&st))
    }

    /// A host `stat` as the guest sees it: the mount's owner, no setuid/setgid/sticky bits.
    fn present(&self, st: &rfs::Stat) -> Attr {
        let t = |s: i64, ns: i64| (s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
        Attr {
            ino: st.st_ino,
            size: st.st_size.max(0) as u64,
            blocks: st.st_blocks.max(0) as u64,
            atime: t(st.st_atime, st.st_atime_nsec as i64),
            mtime: t(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: t(st.st_ctime, st.st_ctime_nsec as i64),
            mode: st.st_mode & !0o7000,
            nlink: st.st_nlink as u32,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: st.st_blksize as u32,
        }
    }

    fn entry(&self, node: u64) -> Res<Vec<u8>> {
        let a = self.attr(node)?;
        Ok(Out::default().entry(node, self.valid(), &a).0.clone())
    }

    fn add_handle(&mut self, h: Handle) -> Res<u64> {
        if self.handles.len() >= self.cfg.max_handles.min(MAX_HANDLES) {
            return Err(fuse::ENFILE);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        Ok(fh)
    }

    /// Opens node `node` (a regular file) for I/O with the guest's `flags` (access mode,
    /// append, truncate), through `/proc/self/fd`, and checks it is still that inode.
    fn reopen(&self, node: u64, flags: u32) -> Res<OwnedFd> {
        let i = self.inode(node)?;
        match i.kind {
            Kind::File => {}
            Kind::Dir => return Err(fuse::EISDIR),
            Kind::Symlink => return Err(fuse::ELOOP),
            Kind::Other => return Err(fuse::EACCES),
        }
        let mut o = open_flags(flags);
        let writes = flags & 3 != 0 || o.contains(OFlags::TRUNC);
        if writes && self.cfg.read_only {
            return Err(fuse::EROFS);
        }
        if flags & 3 == 0 {
            o.remove(OFlags::TRUNC); // an existing file opened read-only is not truncated
        }
        let fd =
            rfs::openat(&self.proc_fd, fd_name(&i.fd).as_str(), o | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())
                .map_err(errno)?;
        let st = rfs::fstat(&fd).map_err(errno)?;
        if key_of(&st) != i.key {
            return Err(fuse::EIO);
        }
        Ok(fd)
    }

    /// Creates regular file `name` beneath `parent` (callers pass `O_EXCL`: nothing that
    /// exists is opened here), never through a symlink, with no setuid/setgid/sticky bits.
    fn create_file(&self, parent: u64, name: &Name, flags: OFlags, mode: u32, umask: u32) -> Res<OwnedFd> {
        let mode = Mode::from_bits_truncate(mode & 0o777 & !umask);
        let fd = self.open_beneath(&self.dir(parent)?.fd, name.as_bytes(), flags | OFlags::CREATE, mode)?;
        let st = rfs::fstat(&fd).map_err(errno)?;
        if kind_of(&st) != Kind::File {
            return Err(fuse::EACCES);
        }
        Ok(fd)
    }

    fn setattr(&mut self, node: u64, s: SetAttr) -> Res<Vec<u8>> {
        let (kind, proc_name) = {
            let i = self.inode(node)?;
            (i.kind, fd_name(&i.fd))
        };
        let plain = matches!(kind, Kind::File | Kind::Dir);
        if let Some(mode) = s.mode {
            if mode & 0o7000 != 0 {
                return Err(fuse::EPERM); // no setuid, setgid or sticky bits on the host
            }
            if !plain {
                return Err(fuse::EOPNOTSUPP);
            }
            // Masked as a creation is (the process umask): a guest cannot make shared files
            // writable by the host's other users.
            let mode = mode & 0o777 & !self.umask;
            rfs::chmodat(&self.proc_fd, proc_name.as_str(), Mode::from_bits_truncate(mode), AtFlags::empty())
                .map_err(errno)?;
        }
        // Ownership on the host never changes; only a no-op chown to the mount's owner passes.
        if s.uid.is_some_and(|u| u != self.cfg.uid) || s.gid.is_some_and(|g| g != self.cfg.gid) {
            return Err(fuse::EPERM);
        }
        if let Some(size) = s.size {
            if kind != Kind::File {
                return Err(fuse::EISDIR);
            }
            match s.fh.and_then(|fh| self.handles.get(&fh)) {
                Some(Handle::File { fd, node: of }) if *of == node => rfs::ftruncate(fd, size).map_err(errno)?,
                _ => {
                    let fd = self.reopen(node, 1)?;
                    rfs::ftruncate(&fd, size).map_err(errno)?;
                }
            }
        }
        if s.atime.is_some() || s.mtime.is_some() {
            if !plain {
                return Err(fuse::EOPNOTSUPP);
            }
            let ts = |t: Option<Time>| match t {
                None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
                Some(Time::Now) => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
                Some(Time::At { secs, nsecs }) => {
                    Timespec { tv_sec: secs.min(i64::MAX as u64) as i64, tv_nsec: i64::from(nsecs.min(999_999_999)) }
                }
            };
            let times = Timestamps { last_access: ts(s.atime), last_modification: ts(s.mtime) };
            rfs::utimensat(&self.proc_fd, proc_name.as_str(), &times, AtFlags::empty()).map_err(errno)?;
        }
        let a = self.attr(node)?;
        Ok(Out::default().attr_out(self.valid(), &a).0.clone())
    }

    /// The path through which a node's xattrs are reached (files and directories only).
    fn xattr_path(&self, node: u64) -> Res<String> {
        let i = self.inode(node)?;
        if !matches!(i.kind, Kind::File | Kind::Dir) {
            return Err(fuse::EOPNOTSUPP);
        }
        Ok(format!("/proc/self/fd/{}", fd_name(&i.fd)))
    }

    fn readdir(&mut self, fh: u64, offset: u64, size: usize, plus: bool) -> Res<Vec<u8>> {
        let Some(Handle::Dir { dir, node }) = self.handles.get_mut(&fh) else { return Err(fuse::EBADF) };
        let parent = *node;
        dir.seek(offset as i64).map_err(errno)?;
        // Collect the entries that fit, then (for READDIRPLUS) look each up.
        let mut picked: Vec<(Vec<u8>, u64, u32, i64)> = Vec::new();
        let mut used = 0usize;
        let per = if plus { 128 } else { 0 };
        for e in dir.by_ref() {
            let e = e.map_err(errno)?;
            let name = e.file_name().to_bytes().to_vec();
            let need = per + fuse::dirent_size(name.len());
            if used + need > size {
                break;
            }
            used += need;
            picked.push((name, e.ino(), dirent_type(e.file_type()), e.offset()));
        }
        let mut o = Out::default();
        for (name, ino, kind, off) in picked {
            if plus {
                let dot = name == b"." || name == b"..";
                let looked = if dot { None } else { Name::new(&name).ok().and_then(|n| self.lookup(parent, &n).ok()) };
                match looked.map(|n| (n, self.attr(n))) {
                    Some((n, Ok(a))) => {
                        o.entry(n, self.valid(), &a);
                    }
                    _ => {
                        o.bytes(&[0u8; 128]); // no node: the guest looks it up itself
                    }
                }
            }
            o.dirent(ino, off as u64, kind, &name);
        }
        Ok(o.0)
    }
}

/// The host flags for the guest's open flags: the access mode, `O_APPEND` and `O_TRUNC`
/// (nothing else of what the guest sends: no `O_PATH`, `O_DIRECTORY`, `O_NOFOLLOW` games).
fn open_flags(flags: u32) -> OFlags {
    let mut o = match flags & 3 {
        0 => OFlags::RDONLY,
        1 => OFlags::WRONLY,
        _ => OFlags::RDWR,
    };
    for f in [OFlags::APPEND, OFlags::TRUNC] {
        if flags & f.bits() != 0 {
            o |= f;
        }
    }
    o
}

/// The guest may set and remove only `user.` xattrs (not `security.`, `trusted.` or
/// `system.`: those grant capabilities, ACLs and privileges on the host).
fn user_xattr(name: &[u8]) -> Res<&str> {
    let name = xattr_name(name)?;
    if !name.starts_with("user.") {
        return Err(fuse::EPERM);
    }
    Ok(name)
}

fn xattr_name(name: &[u8]) -> Res<&str> {
    std::str::from_utf8(name).map_err(|_| fuse::EINVAL)
}

/// The decimal name of `fd` in `/proc/self/fd`.
fn fd_name(fd: &OwnedFd) -> String {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd().to_string()
}

/// `DT_*` for a directory entry's type.
fn dirent_type(t: FileType) -> u32 {
    match t {
        FileType::Fifo => 1,
        FileType::CharacterDevice => 2,
        FileType::Directory => 4,
        FileType::BlockDevice => 6,
        FileType::RegularFile => 8,
        FileType::Symlink => 10,
        FileType::Socket => 12,
        FileType::Unknown => 0,
    }
}

#[cfg(test)]
mod tests;
