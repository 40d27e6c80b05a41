//! Seccomp's user notification, for the sandbox process's log mode (`MSB_SECCOMP=log`).
//!
//! In log mode the runtime filter answers a call it does not allow with
//! `SECCOMP_RET_USER_NOTIF` instead of a trap: the calling thread waits while a listener —
//! a small process outside the sandbox process, handed the listener descriptor — records the
//! call and lets it run (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). Unlike the kernel's own
//! `SECCOMP_RET_LOG`, this needs no audit subsystem, so a diagnosis run sees every call a
//! filter would have refused.
//!
//! Invariants: the listener is only ever told to let a call continue (log mode changes no
//! outcome); a notification whose thread is gone meanwhile is skipped; the structures passed
//! to the kernel are zeroed before each receive, as the kernel requires.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One call a filter handed to the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The kernel's id for this call (valid until it is answered or the thread dies).
    pub id: u64,
    /// The calling thread's id.
    pub tid: u32,
    /// The system call's number.
    pub nr: i32,
}

/// Installs `program` on the calling thread — and, with `all_threads`, on every thread of
/// the process at once (`TSYNC`) — with a user-notification listener, which is returned.
/// The process must have `no_new_privs` set (or `CAP_SYS_ADMIN`).
pub fn install_with_listener(program: &[libc::sock_filter], all_threads: bool) -> io::Result<OwnedFd> {
    let len =
        u16::try_from(program.len()).map_err(|_| io::Error::other("a seccomp program of over 65535 instructions"))?;
    let prog = libc::sock_fprog { len, filter: program.as_ptr().cast_mut() };
    let mut flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    if all_threads {
        // TSYNC and NEW_LISTENER go together only with TSYNC_ESRCH (a failed sync is then
        // ESRCH, not a thread id, which would be taken for a descriptor).
        flags |= libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    }
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // instructions during the call and keeps no pointer into our memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(r).map_err(|_| io::Error::other("seccomp returned no descriptor"))?;
    // SAFETY: with NEW_LISTENER a successful call returns a fresh descriptor that nothing
    // else in the process holds; it is owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits for the next notification on `listener`. `ENOENT` means the thread that made the
/// call went away before it was received; callers skip it.
pub fn receive(listener: BorrowedFd<'_>) -> io::Result<Notification> {
    // SAFETY: `seccomp_notif` is plain integers; all-zero is a valid value, and the kernel
    // requires the buffer zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one `seccomp_notif` into `n`, which is exactly that type and
    // lives across the call.
    let r = unsafe {
        libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n as *mut libc::seccomp_notif)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notification { id: n.id, tid: n.pid, nr: n.data.nr })
}

/// Lets the call `id` run as if no filter had seen it. A thread that died meanwhile
/// (`ENOENT`) is not an error.
pub fn let_continue(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp { id, val: 0, error: 0, flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32 };
    // SAFETY: the ioctl reads one `seccomp_notif_resp` from `resp`, which is exactly that
    // type and lives across the call.
    let r = unsafe {
        libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp as *const libc::seccomp_notif_resp)
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}
