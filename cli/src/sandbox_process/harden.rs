//! The sandbox process's lockdown (shared/research/hardening.md §3): what a compromised
//! sandbox process can still do once it runs guest code.
//!
//! [`lockdown`] runs while the process is still single-threaded (the tokio runtime is built
//! after it), in this order:
//! 1. **namespaces**: a new user namespace (mapping this user onto itself, `setgroups`
//!    denied), mount, IPC and UTS namespaces — as root too, so that root's capabilities
//!    never reach the host's namespaces — and, where a dialer serves the sandbox
//!    ([`Plan::net`]), a new network namespace with nothing in it: no host address, loopback
//!    service or abstract Unix socket of the host can be reached from it;
//! 2. **an empty root**: a fresh tmpfs holding only the paths of the [`Plan`], each
//!    bind-mounted at its own path (read-only where the plan says so, never setuid, never
//!    exec, device nodes only for `/dev/kvm`), becomes the root with `pivot_root`; the old
//!    root is detached. `/proc` is not mounted: only this process's own `fd`, `status` and
//!    `smaps` are bound in, at `/proc/self/…`;
//! 3. **privileges**: every capability dropped (bounding, ambient, effective, permitted,
//!    inheritable) with the secure bits locked, `no_new_privs`, not dumpable (no core
//!    files, no same-user ptrace or `/proc/PID/mem`), `RLIMIT_CORE` 0, `RLIMIT_NOFILE` capped;
//! 4. **Landlock** (best effort for the kernel's ABI): the same paths, with the same
//!    read-only/read-write split, and nothing else.
//!
//! Seccomp comes last (see [`super::seccomp`]) because it needs the exit-report descriptor.
//! A step the kernel does not offer (no unprivileged user namespaces, no Landlock) is
//! skipped and named in [`Report::missing`]: the sandbox still starts unless the launch
//! requires every protection. A step that fails half-way is an error: the process never runs
//! a guest in a state nobody described.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};
pub use msb_control_plane::wire::Hardening as Report;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use rustix::fs::{Mode, OFlags};

/// Descriptor limit of a locked-down sandbox process: above the gateway's flow budget and the
/// file brokers' handle budgets together, far below what exhausting the host would take.
pub const NOFILE_LIMIT: u64 = 8192;

/// Where the jail's tmpfs is mounted before it becomes the root (in the private mount
/// namespace only; the host's `/tmp` is untouched).
const STAGING: &str = "/tmp";

/// A path the sandbox keeps, at the same place inside its jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub write: bool,
}

/// Pieces a user can switch off for diagnosis (`MSB_HARDEN=-userns,-landlock`); seccomp is
/// switched to logging with `MSB_SECCOMP=log`, never off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skip {
    pub userns: bool,
    pub landlock: bool,
    /// No lockdown at all, seccomp included: only in builds with the test-only `test-hooks`
    /// feature, so the benchmark can measure what the lockdown costs.
    pub all: bool,
}

impl Skip {
    /// Parses `MSB_HARDEN`'s value: comma-separated `-userns` / `-landlock`.
    pub fn parse(text: &str) -> Result<Skip, String> {
        let mut s = Skip::default();
        for w in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match w {
                "-userns" => s.userns = true,
                "-landlock" => s.landlock = true,
                "-all" if cfg!(feature = "test-hooks") => s.all = true,
                "-all" => return Err("MSB_HARDEN=-all exists only in test builds (msb-hooks)".into()),
                other => return Err(format!("MSB_HARDEN: unknown item {other:?} (known: -userns, -landlock)")),
            }
        }
        Ok(s)
    }
}

/// What to keep and how.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub binds: Vec<Bind>,
    pub skip: Skip,
    /// A new, empty network namespace too (host sockets then come from a dialer).
    pub net: bool,
}

impl Plan {
    /// Adds `path` (canonicalized; a missing path is an error naming it).
    pub fn keep(&mut self, path: &Path, write: bool) -> Result<(), Error> {
        let path = std::fs::canonicalize(path).map_err(|e| Error::Step { step: "finding", what: path.into(), e })?;
        match self.binds.iter_mut().find(|b| b.path == path) {
            Some(b) => b.write |= write,
            None => self.binds.push(Bind { path, write }),
        }
        Ok(())
    }
}

/// A lockdown step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step} {}: {e}", .what.display())]
    Step {
        step: &'static str,
        what: PathBuf,
        #[source]
        e: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn step(step: &'static str, what: impl Into<PathBuf>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |e| Error::Step { step, what, e: std::io::Error::from_raw_os_error(e as i32) }
}

fn io_step(step: &'static str, what: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Step { step, what, e }
}

/// Applies stages 1–4 to this (single-threaded) process.
pub fn lockdown(plan: &Plan) -> Result<Report, Error> {
    let mut r = Report::default();
    if plan.skip.all {
        r.missing.push("the whole lockdown (MSB_HARDEN=-all, a test build)".into());
        return Ok(r);
    }
    let jailed = namespaces(plan.skip, plan.net, &mut r)?;
    if jailed {
        jail(&plan.binds)?;
        r.applied.push(format!("empty root ({} paths bound in)", plan.binds.len()));
    } else {
        r.missing.push("empty root (needs a mount namespace)".into());
    }
    privileges(rustix::thread::CapabilitySet::empty())?;
    r.applied.push("no capabilities, no_new_privs, not dumpable".into());
    r.applied.push(format!("at most {NOFILE_LIMIT} descriptors, no core files"));
    if plan.skip.landlock {
        r.missing.push("landlock (switched off by MSB_HARDEN)".into());
    } else {
        match landlock(&plan.binds)? {
            Ok(done) => r.applied.push(done),
            Err(why) => r.missing.push(why),
        }
    }
    Ok(r)
}

/// Stage 1. Returns whether the process now has a private mount namespace it may change.
fn namespaces(skip: Skip, net: bool, r: &mut Report) -> Result<bool, Error> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let (netns, named) = if net { (CloneFlags::CLONE_NEWNET, "+net") } else { (CloneFlags::empty(), "") };
    let why = if skip.userns {
        "switched off by MSB_HARDEN".to_string()
    } else {
        match unshare(
            CloneFlags::CLONE_NEWUSER
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | netns,
        ) {
            Ok(()) => {
                std::fs::write("/proc/self/setgroups", "deny").map_err(io_step("writing", "/proc/self/setgroups"))?;
                std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))
                    .map_err(io_step("writing", "/proc/self/uid_map"))?;
                std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
                    .map_err(io_step("writing", "/proc/self/gid_map"))?;
                r.applied.push(format!("user+mount+ipc+uts{named} namespaces"));
                return Ok(true);
            }
            Err(e) => format!(
                "the kernel refused one ({e}; unprivileged user namespaces may be off or restricted by AppArmor)"
            ),
        }
    };
    r.missing.push(format!("user namespace ({why})"));
    // Root needs no user namespace for the others.
    if uid == 0
        && unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | netns).is_ok()
    {
        r.applied.push(format!("mount+ipc+uts{named} namespaces"));
        return Ok(true);
    }
    if net {
        r.missing.push("an empty network namespace (needs a user namespace; seccomp still refuses new sockets)".into());
    }
    Ok(false)
}

/// Stage 2: the empty root with the plan's paths bound in.
fn jail(binds: &[Bind]) -> Result<(), Error> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(step("making private", "/"))?;
    // Every source is opened before the staging tmpfs can hide one (a home under /tmp).
    let mut sources: Vec<(PathBuf, OwnedFd, bool, bool)> = Vec::new();
    let pid = std::process::id();
    let own_proc = [("fd", false), ("status", false), ("smaps", false)]
        .map(|(f, w)| (PathBuf::from(format!("/proc/{pid}/{f}")), PathBuf::from(format!("/proc/self/{f}")), w));
    for (src, at, write) in
        own_proc.iter().cloned().chain(binds.iter().map(|b| (b.path.clone(), b.path.clone(), b.write)))
    {
        let fd = rustix::fs::open(&src, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).map_err(|e| Error::Step {
            step: "opening",
            what: src.clone(),
            e: e.into(),
        })?;
        let dir =
            rustix::fs::fstat(&fd).map(|s| rustix::fs::FileType::from_raw_mode(s.st_mode).is_dir()).unwrap_or(false);
        sources.push((at, fd, write, dir));
    }
    // Parents before children: a path inside another bound one lands on the bound view.
    sources.sort_by_key(|(at, ..)| at.components().count());
    mount(Some("tmpfs"), STAGING, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755,size=1m"))
        .map_err(step("mounting the jail's tmpfs on", STAGING))?;
    for (at, fd, write, dir) in &sources {
        let target = Path::new(STAGING).join(at.strip_prefix("/").unwrap_or(at));
        if target.symlink_metadata().is_err() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_step("creating", parent))?;
            }
            if *dir {
                std::fs::create_dir(&target).map_err(io_step("creating", &target))?;
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_step("creating", &target))?;
            }
        }
        let src = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(Some(src.as_str()), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(step("binding", at))?;
        // A bind keeps the flags its source mount locked (a user namespace may only add);
        // ours are added on top.
        let locked = nix::sys::statvfs::statvfs(&target).map_err(step("reading the flags of", at))?.flags();
        use nix::sys::statvfs::FsFlags;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        for (f, m) in [
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        ] {
            if locked.contains(f) {
                flags |= m;
            }
        }
        if at != Path::new("/dev/kvm") {
            flags |= MsFlags::MS_NODEV;
        }
        if !write {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(step("restricting", at))?;
    }
    drop(sources);
    std::env::set_current_dir(STAGING).map_err(io_step("entering", STAGING))?;
    std::fs::create_dir(".old").map_err(io_step("creating", "/.old"))?;
    match nix::unistd::pivot_root(".", ".old") {
        Ok(()) => {
            std::env::set_current_dir("/").map_err(io_step("entering", "/"))?;
            umount2("/.old", MntFlags::MNT_DETACH).map_err(step("detaching", "the old root"))?;
            std::fs::remove_dir("/.old").map_err(io_step("removing", "/.old"))?;
        }
        // The host runs from its initramfs (rootfs cannot be pivoted away from): the jail is
        // moved over the root instead and entered with chroot, as switch_root does. Without
        // capabilities (dropped below) there is no second chroot to climb out with.
        Err(nix::Error::EINVAL) => {
            std::fs::remove_dir(".old").map_err(io_step("removing", "/.old"))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("moving the jail over", "/"))?;
            nix::unistd::chroot(".").map_err(step("entering the jail at", STAGING))?;
            std::env::set_current_dir("/").map_err(io_step("entering", "/"))?;
        }
        Err(e) => return Err(step("pivoting the root to", STAGING)(e)),
    }
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, "/", None::<&str>, ro | MsFlags::MS_NOEXEC, None::<&str>)
        .map_err(step("making read-only", "the jail's root"))?;
    Ok(())
}

/// Stage 3.
fn privileges(keep: rustix::thread::CapabilitySet) -> Result<(), Error> {
    use rustix::thread::{self as t, CapabilitySet, CapabilitySets};
    let fail = |what: &str, e: rustix::io::Errno| Error::Other(format!("{what}: {e}"));
    for cap in 0..64u32 {
        // Numbers past the kernel's last capability answer EINVAL: the set is then empty.
        if let Some(c) = capability(cap).filter(|c| !keep.contains(*c)) {
            match t::remove_capability_from_bounding_set(c) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                // Without CAP_SETPCAP (no user namespace, not root) the bounding set cannot
                // shrink; nothing in it can be gained either (no_new_privs, no setuid exec).
                Err(rustix::io::Errno::PERM) => break,
                Err(e) => return Err(fail("dropping a capability from the bounding set", e)),
            }
        }
    }
    t::clear_ambient_capability_set().map_err(|e| fail("clearing the ambient capabilities", e))?;
    let _ = t::set_capabilities_secure_bits(
        t::CapabilitiesSecureBits::NO_ROOT
            | t::CapabilitiesSecureBits::NO_ROOT_LOCKED
            | t::CapabilitiesSecureBits::NO_SETUID_FIXUP
            | t::CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED
            | t::CapabilitiesSecureBits::KEEP_CAPS_LOCKED,
    );
    let none = CapabilitySets { effective: keep, permitted: keep, inheritable: CapabilitySet::empty() };
    t::set_capabilities(None, none).map_err(|e| fail("dropping the capabilities", e))?;
    t::set_no_new_privs(true).map_err(|e| fail("setting no_new_privs", e))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| fail("making the process not dumpable", e))?;
    let lim = |n| rustix::process::Rlimit { current: Some(n), maximum: Some(n) };
    rustix::process::setrlimit(rustix::process::Resource::Core, lim(0)).map_err(|e| fail("limiting core files", e))?;
    let cur = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let cap = cur.maximum.map_or(NOFILE_LIMIT, |m| m.min(NOFILE_LIMIT));
    rustix::process::setrlimit(rustix::process::Resource::Nofile, lim(cap))
        .map_err(|e| fail("limiting descriptors", e))?;
    Ok(())
}

fn capability(n: u32) -> Option<rustix::thread::CapabilitySet> {
    rustix::thread::CapabilitySet::from_bits(1u64.checked_shl(n)?)
}

/// The dialer's confinement. It stays in the host's namespaces (it dials there), so it gets
/// the rest: every capability dropped but `CAP_NET_BIND_SERVICE` where it is held (root
/// publishing a port below 1024), `no_new_privs`, not dumpable, no core files, a descriptor
/// limit, and Landlock allowing nothing but reads beneath the directory of its grants.
pub fn confine_dialer(grants_dir: &Path) -> Result<Report, Error> {
    use rustix::thread::CapabilitySet;
    let mut r = Report::default();
    let keep =
        if rustix::process::geteuid().is_root() { CapabilitySet::NET_BIND_SERVICE } else { CapabilitySet::empty() };
    privileges(keep)?;
    r.applied.push("no capabilities but binding low ports, no_new_privs, not dumpable, no core files".into());
    match landlock(&[Bind { path: grants_dir.to_path_buf(), write: false }])? {
        Ok(done) => r.applied.push(done),
        Err(why) => r.missing.push(why),
    }
    Ok(r)
}

/// Stage 4. `Ok(Err(why))`: Landlock is not there; `Ok(Ok(what))`: applied.
fn landlock(binds: &[Bind]) -> Result<Result<String, String>, Error> {
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| Error::Other(format!("landlock: {e}"));
    let mut set = Ruleset::default().handle_access(AccessFs::from_all(abi)).map_err(err)?.create().map_err(err)?;
    let own = ["/proc/self/fd", "/proc/self/status", "/proc/self/smaps"];
    let rules = own.iter().map(|p| (PathBuf::from(p), false)).chain(binds.iter().map(|b| (b.path.clone(), b.write)));
    for (path, write) in rules {
        let fd = PathFd::new(&path).map_err(|e| Error::Other(format!("landlock: opening {}: {e}", path.display())))?;
        let dir = std::fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        let access = match (dir, write) {
            (true, true) => AccessFs::from_all(abi),
            (true, false) => AccessFs::from_read(abi),
            (false, true) => AccessFs::from_file(abi),
            (false, false) => AccessFs::from_read(abi) & AccessFs::from_file(abi),
        };
        set = set.add_rule(PathBeneath::new(fd, access)).map_err(err)?;
    }
    let status = set.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Ok("landlock (full)".into()),
        RulesetStatus::PartiallyEnforced => Ok("landlock (partial: the kernel's ABI is older than v5)".into()),
        RulesetStatus::NotEnforced => Err("landlock (the kernel does not offer it)".into()),
    })
}
