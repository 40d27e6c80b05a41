//! The sandbox process's seccomp filters, by thread role (shared/research/hardening.md §3.2).
//!
//! - **runtime** is installed on the main thread before any other thread exists, so every
//!   thread (tokio workers, blocking threads, vCPU threads) inherits it;
//! - **vcpu** is added by each vCPU thread on itself before its first `KVM_RUN`
//!   ([`msb_hypervisor::on_vcpu_thread_start`]); a vCPU thread is then bound by both.
//!
//! Invariants: each table is an allowlist; a call not in it traps (`SIGSYS`, reported by
//! [`msb_hypervisor::sigsys`] and fatal to the process), or runs and is recorded in
//! [`Mode::Log`] (diagnosis, never the default; [`super::seccomp_log`]). No call appears twice in a table and every
//! entry says who needs it (its unit tests check both). Arguments are checked where seccomp can see
//! them (clone flags, `PROT_EXEC`, ioctl numbers, signal targets); paths are
//! Landlock's and the jail's business. No thread may make, bind or connect a socket: the
//! control socket is bound before the filters, and host sockets come from the dialer. `clone3` answers `ENOSYS` (its flags are out of sight)
//! so the C library falls back to `clone`, whose flags are checked.

use std::collections::BTreeMap;

use msb_hypervisor::syscalls::syscall_number;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How a violation is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Trap: reported and fatal (the default).
    Trap,
    /// The call runs and is recorded (`MSB_SECCOMP=log`; for finding a missing rule, never
    /// for running untrusted guests): the runtime filter notifies the listener of
    /// [`super::seccomp_log`]; the vCPU filter leaves it to the kernel's audit log.
    Log,
}

impl Mode {
    /// `MSB_SECCOMP`'s value: unset or `trap` → trap, `log` → log.
    pub fn parse(v: Option<&str>) -> Result<Mode, String> {
        match v.map(str::trim) {
            None | Some("") | Some("trap") => Ok(Mode::Trap),
            Some("log") => Ok(Mode::Log),
            Some(other) => Err(format!("MSB_SECCOMP={other:?}: use trap (the default) or log")),
        }
    }
}

/// A thread role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Runtime,
    Vcpu,
}

/// One allowed call: its name, the argument conditions (any of the inner lists, each all of
/// its conditions; none: any arguments) and who needs it.
struct Allow {
    name: &'static str,
    when: Vec<Vec<(u8, Op, u64)>>,
    /// Who needs it: the table documents the attack surface (required non-empty by a test).
    #[cfg_attr(not(test), allow(dead_code))]
    why: &'static str,
}

fn any(name: &'static str, why: &'static str) -> Allow {
    Allow { name, when: Vec::new(), why }
}

fn when(name: &'static str, when: Vec<Vec<(u8, Op, u64)>>, why: &'static str) -> Allow {
    Allow { name, when, why }
}

const CLONE_THREAD: u64 = 0x0001_0000;
const PROT_EXEC: u64 = 4;
const SIGSYS: u64 = 31;
const PR_SET_NAME: u64 = 15;
const PR_GET_NAME: u64 = 16;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
/// `_IOC_TYPE` of every KVM ioctl.
const KVMIO: u64 = 0xAE;
#[cfg(test)]
const KVM_RUN: u64 = 0xAE80;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
const FIONCLEX: u64 = 0x5450;
const FIONREAD: u64 = 0x541B;
const TCGETS: u64 = 0x5401;

fn no_exec(arg: u8) -> Vec<Vec<(u8, Op, u64)>> {
    vec![vec![(arg, Op::MaskedEq(PROT_EXEC), 0)]]
}

/// Calls of this process's own threads only: `tgkill(pid, …)`.
fn own_pid(pid: u32) -> Vec<Vec<(u8, Op, u64)>> {
    vec![vec![(0, Op::Eq, u64::from(pid))]]
}

fn prctl_names() -> Vec<Vec<(u8, Op, u64)>> {
    vec![vec![(0, Op::Eq, PR_SET_NAME)], vec![(0, Op::Eq, PR_GET_NAME)], vec![(0, Op::Eq, PR_SET_NO_NEW_PRIVS)]]
}

/// The allowlist of `role`, for process `pid`.
fn table(role: Role, pid: u32) -> Vec<Allow> {
    let common = [
        any("read", "every actor and device: descriptors opened before the lockdown"),
        any("write", "logs, eventfd notifications, sockets"),
        any("pwrite64", "the violation reporter's exit report; block writes"),
        any("pread64", "block reads"),
        any("lseek", "capped logs"),
        any("ftruncate", "the violation reporter; capped logs"),
        any("futex", "every lock and channel"),
        any("close", "every descriptor"),
        any("fcntl", "flags, close-on-exec, duplicating; the file broker's locks; debug builds check a descriptor before closing it"),
        when("mmap", no_exec(2), "the allocator; never executable"),
        when("mprotect", no_exec(2), "thread stacks' guard pages; never executable"),
        any("munmap", "the allocator"),
        any("mremap", "the allocator"),
        any("madvise", "the allocator"),
        any("brk", "the allocator"),
        any("rt_sigreturn", "returning from the vCPU kick and other handlers"),
        any("rt_sigprocmask", "threads mask signals"),
        any("sigaltstack", "the standard library's stack-overflow guard on each thread"),
        any("sched_yield", "spin loops in locks and vCPU stop"),
        any("clock_gettime", "time, when the vDSO falls back"),
        any("clock_nanosleep", "sleeps"),
        any("nanosleep", "sleeps"),
        any("getrandom", "hash maps, TLS, DNS ids"),
        any("gettid", "the standard library; tracing"),
        any("getpid", "the standard library"),
        when("tgkill", own_pid(pid), "kicking a vCPU thread out of KVM_RUN; abort"),
        when("prctl", prctl_names(), "naming threads; the violation reporter reads the name; installing the vcpu filter sets no_new_privs (already set)"),
        any("exit", "a thread ends"),
        any("exit_group", "the process ends; the violation reporter"),
        any("restart_syscall", "a call interrupted by the vCPU kick"),
        when(
            "seccomp",
            vec![vec![(0, Op::Eq, SECCOMP_SET_MODE_FILTER)]],
            "each vCPU thread adds its filter (a filter only ever narrows what a thread may do)",
        ),
    ];
    let mut t: Vec<Allow> = common.into_iter().collect();
    match role {
        Role::Vcpu => t.push(when(
            "ioctl",
            msb_hypervisor::THREAD_IOCTLS.iter().map(|(_, nr)| vec![(1, Op::Eq, *nr)]).collect(),
            "KVM_RUN, and the register reads of a triple-fault report: nothing else",
        )),
        Role::Runtime => t.extend([
            when(
                "ioctl",
                vec![
                    vec![(1, Op::MaskedEq(0xff00), KVMIO << 8)],
                    vec![(1, Op::Eq, FIONBIO)],
                    vec![(1, Op::Eq, FIOCLEX)],
                    vec![(1, Op::Eq, FIONCLEX)],
                    vec![(1, Op::Eq, FIONREAD)],
                    vec![(1, Op::Eq, TCGETS)],
                ],
                "KVM (VM setup, irqfd/ioeventfd at device activation); non-blocking and close-on-exec flags; isatty",
            ),
            when(
                "clone",
                vec![vec![(0, Op::MaskedEq(CLONE_THREAD), CLONE_THREAD)]],
                "threads only: never a new process",
            ),
            any("clone3", "answered ENOSYS by the second filter, so the C library falls back to clone"),
            any("set_robust_list", "new threads"),
            any("rseq", "new threads"),
            any("sched_getaffinity", "the standard library's available_parallelism"),
            when("rt_sigaction", vec![vec![(0, Op::Ne, SIGSYS)]], "tokio's SIGTERM handler; never SIGSYS"),
            any("epoll_create1", "tokio's reactor"),
            any("epoll_ctl", "tokio's reactor"),
            any("epoll_wait", "tokio's reactor"),
            any("epoll_pwait", "tokio's reactor"),
            any("epoll_pwait2", "tokio's reactor"),
            any("eventfd2", "ioeventfds and irqfds; tokio's waker"),
            any("pipe2", "tokio's signal self-pipe"),
            any("poll", "the standard library"),
            any("ppoll", "the standard library"),
            any("readv", "sockets and files"),
            any("writev", "sockets and files, tracing"),
            any("preadv", "block reads"),
            any("pwritev", "block writes"),
            any("preadv2", "block reads"),
            any("pwritev2", "block writes"),
            any("fsync", "block flush"),
            any("fdatasync", "block flush"),
            any("fallocate", "block discard; the file broker"),
            any("dup", "the standard library"),
            any("dup3", "the standard library"),
            any("fstat", "files already open"),
            any("newfstatat", "stat of the sandbox directory and below the mount roots"),
            any("statx", "the standard library's metadata"),
            any("fstatfs", "the file broker"),
            any("statfs", "the file broker"),
            any("open", "paths inside the jail (Landlock decides which)"),
            any("openat", "paths inside the jail, the file broker below its roots"),
            any("openat2", "the file broker (RESOLVE_BENEATH)"),
            any("getdents64", "the file broker"),
            any("mkdirat", "the file broker"),
            any("mknodat", "the file broker (FIFOs and sockets in a mount)"),
            any("unlinkat", "the file broker; the control socket at exit"),
            any("unlink", "the control socket at exit (the C library's unlink)"),
            any("rename", "the ports file and the control socket (the C library's rename)"),
            any("renameat", "the ports file"),
            any("renameat2", "the file broker"),
            any("symlinkat", "the file broker"),
            any("readlinkat", "the file broker"),
            any("readlink", "the standard library"),
            any("linkat", "the file broker"),
            any("fchmod", "the file broker"),
            any("fchmodat", "the file broker; the ports file"),
            any("flock", "the file broker (a guest's flock on a shared file)"),
            any("syncfs", "the file broker (a guest's sync of a shared directory)"),
            any("fchown", "the file broker"),
            any("fchownat", "the file broker"),
            any("utimensat", "the file broker"),
            any("faccessat", "the standard library"),
            any("faccessat2", "the standard library"),
            any("access", "the standard library"),
            any("stat", "the C library's stat"),
            any("lstat", "the C library's lstat"),
            any("getxattr", "the file broker (through /proc/self/fd)"),
            any("lgetxattr", "the file broker"),
            any("fgetxattr", "the file broker"),
            any("setxattr", "the file broker"),
            any("lsetxattr", "the file broker"),
            any("fsetxattr", "the file broker"),
            any("listxattr", "the file broker"),
            any("llistxattr", "the file broker"),
            any("flistxattr", "the file broker"),
            any("removexattr", "the file broker"),
            any("lremovexattr", "the file broker"),
            any("fremovexattr", "the file broker"),
            any("copy_file_range", "the file broker"),
            any("mlock", "secret values are kept out of swap"),
            any("munlock", "secret values, after they are wiped"),
            any("getuid", "the control socket's peer check"),
            any("geteuid", "the control socket's peer check"),
            any("getgid", "the standard library"),
            any("getegid", "the standard library"),
            any("prlimit64", "the standard library"),
            any("uname", "the C library"),
            any("accept4", "the control socket; published ports"),
            any("accept", "published ports"),
            any("sendto", "the gateway; netlink"),
            any("recvfrom", "the gateway; netlink"),
            any("sendmsg", "the gateway"),
            any("recvmsg", "the gateway; netlink"),
            any("sendmmsg", "the gateway (UDP)"),
            any("recvmmsg", "the gateway (UDP)"),
            any("getsockopt", "the gateway"),
            any("setsockopt", "the gateway"),
            any("getsockname", "the gateway; published ports"),
            any("getpeername", "the control socket; the gateway"),
            any("shutdown", "the gateway; the control socket"),
        ]),
    }
    t
}

fn rules(table: &[Allow]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut map = BTreeMap::new();
    for a in table {
        let nr = syscall_number(a.name).ok_or_else(|| format!("no system call named {}", a.name))?;
        let mut rules = Vec::new();
        for conds in &a.when {
            let conds = conds
                .iter()
                .map(|(arg, op, v)| Cond::new(*arg, Len::Qword, op.clone(), *v).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(SeccompRule::new(conds).map_err(|e| e.to_string())?);
        }
        if map.insert(nr, rules).is_some() {
            return Err(format!("{} is listed twice", a.name));
        }
    }
    Ok(map)
}

/// The compiled filters of `role` (installed in order).
pub fn programs(role: Role, mode: Mode, pid: u32) -> Result<Vec<BpfProgram>, String> {
    let miss = match mode {
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let arch = TargetArch::x86_64;
    let main =
        SeccompFilter::new(rules(&table(role, pid))?, miss, SeccompAction::Allow, arch).map_err(|e| e.to_string())?;
    let mut out = vec![BpfProgram::try_from(main).map_err(|e| e.to_string())?];
    if role == Role::Runtime {
        let clone3 = BTreeMap::from([(syscall_number("clone3").expect("known"), Vec::new())]);
        let f = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(38), arch)
            .map_err(|e| e.to_string())?;
        out.push(BpfProgram::try_from(f).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// Installs `role`'s filters on the calling thread (and the threads it creates later).
pub fn install(role: Role, mode: Mode, pid: u32) -> Result<(), String> {
    for p in programs(role, mode, pid)? {
        seccompiler::apply_filter(&p).map_err(|e| format!("installing the {role:?} seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(role: Role, name: &str) -> bool {
        table(role, 1).iter().any(|a| a.name == name)
    }

    #[test]
    fn every_table_compiles_lists_each_call_once_and_says_why() {
        for role in [Role::Runtime, Role::Vcpu] {
            let t = table(role, 1);
            rules(&t).unwrap();
            assert!(t.iter().all(|a| !a.why.trim().is_empty()));
            for mode in [Mode::Trap, Mode::Log] {
                assert!(!programs(role, mode, 1).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn no_role_may_exec_trace_mount_or_escape_its_namespaces() {
        for role in [Role::Runtime, Role::Vcpu] {
            for name in [
                "execve",
                "execveat",
                "ptrace",
                "process_vm_readv",
                "process_vm_writev",
                "mount",
                "umount2",
                "pivot_root",
                "unshare",
                "setns",
                "bpf",
                "perf_event_open",
                "io_uring_setup",
                "userfaultfd",
                "open_by_handle_at",
                "name_to_handle_at",
                "kill",
                "setuid",
                "capset",
                "keyctl",
                "fork",
                "vfork",
                "socketpair",
                "chroot",
                "init_module",
                "memfd_create",
            ] {
                assert!(!allowed(role, name), "{role:?} allows {name}");
            }
        }
    }

    #[test]
    fn only_the_vcpu_role_is_limited_to_kvm_run_and_no_unix_or_raw_sockets() {
        let vcpu = table(Role::Vcpu, 1);
        let ioctl = vcpu.iter().find(|a| a.name == "ioctl").unwrap();
        assert!(ioctl.when.contains(&vec![(1, Op::Eq, KVM_RUN)]));
        // Only reads besides KVM_RUN: _IOR, type KVMIO.
        for alt in &ioctl.when {
            let nr = alt[0].2;
            assert!(nr == KVM_RUN || (nr >> 30 == 2 && (nr >> 8) & 0xff == KVMIO), "{nr:#x}");
        }
        assert!(!allowed(Role::Vcpu, "socket"));
        let rt = table(Role::Runtime, 1);
        // Host sockets come from the dialer: no thread makes, binds or connects one.
        for call in ["socket", "socketpair", "connect", "bind", "listen"] {
            assert!(!allowed(Role::Runtime, call), "{call} allowed");
        }
        let sigaction = rt.iter().find(|a| a.name == "rt_sigaction").unwrap();
        assert_eq!(sigaction.when, vec![vec![(0, Op::Ne, SIGSYS)]]);
    }

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse(None), Ok(Mode::Trap));
        assert_eq!(Mode::parse(Some("log")), Ok(Mode::Log));
        assert!(Mode::parse(Some("off")).is_err());
    }
}
