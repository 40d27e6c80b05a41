//! Reporting a seccomp violation of the sandbox process.
//!
//! The filters (installed by the `msb` binary) trap every call they do not allow; the kernel
//! then delivers `SIGSYS` to the offending thread without running the call. The handler here
//! writes one line — `seccomp violation: NAME (NR) on thread T` — to the log descriptor
//! (`vmm.log`) and to the exit-report descriptor at its fixed offset, then ends the whole
//! process with [`VIOLATION_EXIT_CODE`].
//!
//! Invariants: the handler allocates nothing and takes no lock (it formats into a stack
//! buffer and uses only `write`, `pwrite64`, `ftruncate`, `prctl(PR_GET_NAME)` and
//! `exit_group`, which every filter allows); the process never returns to the thread that
//! made the call; once the filters are in, `rt_sigaction` for `SIGSYS` is itself a violation,
//! so a compromised thread cannot swap the handler out to survive one.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};

use vmm_sys_util::signal::register_signal_handler;

use crate::syscalls::syscall_name;

/// The sandbox process's exit status after a seccomp violation.
pub const VIOLATION_EXIT_CODE: i32 = 159;

/// What every report line starts with (the reader of the exit report keys on it).
pub const VIOLATION_PREFIX: &str = "seccomp violation: ";

static LOG_FD: AtomicI32 = AtomicI32::new(-1);
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
static REPORT_OFFSET: AtomicI64 = AtomicI64::new(0);

/// Installs the `SIGSYS` reporter. `log` gets every report line; `report`, if given, is a
/// file written at `offset` (and cut there) with the line. The descriptors must stay open for
/// the life of the process.
pub fn install_violation_reporter(log: RawFd, report: Option<(RawFd, u64)>) -> std::io::Result<()> {
    LOG_FD.store(log, Ordering::SeqCst);
    if let Some((fd, off)) = report {
        REPORT_OFFSET.store(i64::try_from(off).unwrap_or(0), Ordering::SeqCst);
        REPORT_FD.store(fd, Ordering::SeqCst);
    }
    register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A fixed-size line buffer: formatting without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Formats the report for call `nr` on thread `thread` (its name, NUL-padded).
fn format_report(nr: i64, thread: &[u8]) -> Line {
    let mut l = Line { buf: [0; 192], len: 0 };
    l.push(VIOLATION_PREFIX.as_bytes());
    l.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    l.push(b" (");
    if nr < 0 {
        l.push(b"-");
    }
    l.push_num(nr.unsigned_abs());
    l.push(b") on thread ");
    let name = thread.split(|b| *b == 0).next().unwrap_or_default();
    if name.is_empty() {
        l.push(b"?");
    } else {
        // Thread names are ours, but only printable ASCII goes into the report all the same.
        for &b in name {
            let c = if b.is_ascii_graphic() { b } else { b'_' };
            l.push(&[c]);
        }
    }
    l.push(b"\n");
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The `_sigsys` member of the siginfo union on x86_64: the call address (8 bytes) at
    // offset 16, then the call number (an int) at 24 and the audit arch at 28.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid, readable siginfo_t (128 bytes) to an SA_SIGINFO
        // handler; for SIGSYS from seccomp the int at offset 24 is the call number. It is read
        // unaligned-safe and only within the struct.
        i64::from(unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) })
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (the name and its NUL) into the buffer
    // given, which is 16 bytes long and lives for the call.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let line = format_report(nr, &thread);
    let bytes = &line.buf[..line.len];
    let log = LOG_FD.load(Ordering::SeqCst);
    if log >= 0 {
        // SAFETY: writes `bytes` (a live stack buffer of that length) to a descriptor; a bad
        // descriptor only makes the call fail.
        unsafe { libc::write(log, bytes.as_ptr().cast(), bytes.len()) };
    }
    let report = REPORT_FD.load(Ordering::SeqCst);
    if report >= 0 {
        let off = REPORT_OFFSET.load(Ordering::SeqCst);
        // SAFETY: as above, at an offset of a regular file; the cut only shortens that file.
        unsafe {
            libc::pwrite(report, bytes.as_ptr().cast(), bytes.len(), off);
            libc::ftruncate(report, off + bytes.len() as i64);
        }
    }
    // SAFETY: ends the process at once, without unwinding or running atexit handlers (none of
    // which would be safe in a signal handler).
    unsafe { libc::_exit(VIOLATION_EXIT_CODE) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_the_call_its_number_and_the_thread() {
        let mut t = [0u8; 16];
        t[..7].copy_from_slice(b"vcpu0\0x");
        let l = format_report(59, &t);
        assert_eq!(&l.buf[..l.len], b"seccomp violation: execve (59) on thread vcpu0\n");
        let l = format_report(9999, b"a\nb\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&l.buf[..l.len], b"seccomp violation: unknown (9999) on thread a_b\n");
        let l = format_report(-1, &[0; 16]);
        assert_eq!(&l.buf[..l.len], b"seccomp violation: unknown (-1) on thread ?\n");
    }
}
