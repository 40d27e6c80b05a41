//! The seccomp log mode (`MSB_SECCOMP=log`): for diagnosis, never for untrusted guests.
//!
//! The runtime filter's "not allowed" answer becomes a user notification
//! ([`msb_hypervisor::seccomp_notify`]); its listener goes to a small process started before
//! the lockdown (`msb seccomp-log`, [`main`]), which writes `seccomp (log mode): NAME (NR) on
//! thread T` to its stderr (the sandbox's `vmm.log`) and, where `MSB_SECCOMP_LOG_FILE` names
//! one, appends it to that file, then lets the call run. So a diagnosis run records every
//! call the filter would have refused, on any kernel, audit or not. The vCPU filter keeps the
//! kernel's own log action in this mode (its listener would be a second one per thread).
//!
//! Invariants: a call is never refused or changed in log mode, only recorded; the process
//! records each (call, thread name) once and then counts it (a line per thousand), so a
//! looping violation cannot fill the disk; it ends when the sandbox process does.

use std::io::{IoSlice, IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use seccompiler::BpfProgram;

use super::seccomp::{self, Mode, Role};

/// The hidden subcommand that runs the listener.
pub const SECCOMP_LOG_ARG: &str = "seccomp-log";

/// What every recorded line starts with.
pub const LOG_PREFIX: &str = "seccomp (log mode): ";

/// `SECCOMP_RET_LOG`, as seccompiler compiles a [`Mode::Log`] filter's default answer.
const RET_LOG: u32 = 0x7ffc_0000;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;

/// Starts the listener process (before the lockdown: it execs this binary); returns this
/// process's end of its socket pair, over which the listener descriptor goes once the filter
/// is in.
pub fn spawn() -> std::io::Result<OwnedFd> {
    super::spawn_helper(&[SECCOMP_LOG_ARG.into()])
}

/// `program` with its log answers turned into user notifications.
fn notifying(program: &BpfProgram) -> Vec<libc::sock_filter> {
    program
        .iter()
        .map(|i| {
            let k = if i.code == BPF_RET_K && i.k == RET_LOG { libc::SECCOMP_RET_USER_NOTIF } else { i.k };
            libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k }
        })
        .collect()
}

/// Installs the runtime role's filters on every thread of this process. In log mode with a
/// `listener` process, the main filter notifies it instead of logging (its descriptor is
/// sent over `listener` at once); otherwise as [`seccomp::programs`] says.
pub fn install_runtime(mode: Mode, pid: u32, listener: Option<&OwnedFd>) -> Result<(), String> {
    for (i, p) in seccomp::programs(Role::Runtime, mode, pid)?.iter().enumerate() {
        match listener {
            Some(sock) if mode == Mode::Log && i == 0 => {
                let fd = msb_hypervisor::seccomp_notify::install_with_listener(&notifying(p), true)
                    .map_err(|e| format!("installing the seccomp filter in log mode: {e}"))?;
                let passed = [fd.as_fd()];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut cmsg = SendAncillaryBuffer::new(&mut space);
                cmsg.push(SendAncillaryMessage::ScmRights(&passed));
                rustix::net::sendmsg(sock, &[IoSlice::new(b"L")], &mut cmsg, rustix::net::SendFlags::NOSIGNAL)
                    .map_err(|e| format!("handing the seccomp listener over: {e}"))?;
            }
            _ => seccompiler::apply_filter_all_threads(p).map_err(|e| format!("installing the seccomp filter: {e}"))?,
        }
    }
    Ok(())
}

/// `msb seccomp-log`: takes the listener from stdin, then records and lets through every
/// call it is told of until the sandbox process ends.
pub fn main() -> ExitCode {
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("msb seccomp-log: its socket: {e}");
            return ExitCode::from(125);
        }
    };
    let listener = {
        let mut buf = [0u8; 8];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        if rustix::net::recvmsg(&sock, &mut [IoSliceMut::new(&mut buf)], &mut cmsg, RecvFlags::CMSG_CLOEXEC).is_err() {
            return ExitCode::from(1);
        }
        let mut fds = Vec::new();
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = m {
                fds.extend(passed);
            }
        }
        match fds.pop() {
            Some(fd) => fd,
            // The sandbox process ended (or failed) before its filter was in.
            None => return ExitCode::SUCCESS,
        }
    };
    let file = std::env::var_os("MSB_SECCOMP_LOG_FILE");
    let mut seen: std::collections::HashMap<(i32, String), u64> = std::collections::HashMap::new();
    loop {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&listener, PollFlags::IN), PollFd::new(&sock, PollFlags::IN)];
        if poll(&mut fds, None).is_err() {
            continue;
        }
        let (notified, hangup) = (fds[0].revents(), fds[1].revents());
        if notified.contains(PollFlags::IN) {
            let n = match msb_hypervisor::seccomp_notify::receive(listener.as_fd()) {
                Ok(n) => n,
                // The thread went away before its call was received.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(_) => break,
            };
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", n.tid)).map(|c| c.trim().to_string());
            let comm = comm.unwrap_or_else(|_| "?".into());
            let count = seen.entry((n.nr, comm.clone())).or_insert(0);
            *count += 1;
            if *count == 1 || count.is_multiple_of(1000) {
                let name = msb_hypervisor::syscalls::syscall_name(i64::from(n.nr)).unwrap_or("?");
                let line = format!("{LOG_PREFIX}{name} ({}) on thread {comm} ({}), {} so far", n.nr, n.tid, count);
                eprintln!("{line}");
                if let Some(path) = &file {
                    let f = std::fs::OpenOptions::new().create(true).append(true).open(path);
                    let _ = f.and_then(|mut f| writeln!(f, "{line}"));
                }
            }
            if msb_hypervisor::seccomp_notify::let_continue(listener.as_fd(), n.id).is_err() {
                break;
            }
        } else if notified.intersects(PollFlags::HUP | PollFlags::ERR)
            || hangup.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
        {
            // The filter has no thread left, or the sandbox process closed its end.
            break;
        }
    }
    ExitCode::SUCCESS
}
