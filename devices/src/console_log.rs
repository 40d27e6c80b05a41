//! Where the guest's serial console goes: a per-sandbox log file with a size cap, plus a
//! small in-memory tail for error messages. Never holds more than [`TAIL_BYTES`] +
//! [`MAX_LINE`] bytes in memory, whatever the guest prints.
//!
//! It also watches complete lines for the kernel's own shutdown messages, so that a guest
//! that halts (which on x86 without ACPI never exits to the VMM) or panics is reported as
//! such. These are the guest's claims about itself: they only ever stop or label *this*
//! guest's VM.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes of console kept in memory for error reports.
pub const TAIL_BYTES: usize = 16 * 1024;
/// Longest line examined for markers; longer lines are cut.
pub const MAX_LINE: usize = 512;
/// Default cap of the log file.
pub const DEFAULT_FILE_CAP: u64 = 8 * 1024 * 1024;

/// What the guest said about itself on its console.
#[derive(Debug, Default)]
pub struct ConsoleReports {
    panicked: AtomicBool,
    halted: AtomicBool,
}

impl ConsoleReports {
    pub fn panicked(&self) -> bool {
        self.panicked.load(Ordering::SeqCst)
    }
    pub fn halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }
}

use crate::capped_log::CappedLog;

/// The line that ends a console log at its cap.
const CAP_MARKER: &str = "[msb: console log reached its size cap; further output dropped]";

pub struct ConsoleLog {
    file: Option<CappedLog>,
    tail: VecDeque<u8>,
    line: Vec<u8>,
    reports: Arc<ConsoleReports>,
    /// Set when the last completed line was a halt message; taken by the serial device.
    halt_pending: bool,
    /// Prefix each line in the file with the host's wall-clock time (RFC 3339, UTC).
    timestamps: bool,
    at_line_start: bool,
}

impl ConsoleLog {
    /// Logs to `path` (created or truncated), or only to memory when `path` is `None`.
    pub fn new(path: Option<&Path>, cap: u64) -> std::io::Result<Self> {
        let file = path.map(|p| CappedLog::create(p, cap, CAP_MARKER)).transpose()?;
        Ok(Self {
            file,
            tail: VecDeque::with_capacity(TAIL_BYTES),
            line: Vec::with_capacity(MAX_LINE),
            reports: Arc::default(),
            halt_pending: false,
            timestamps: false,
            at_line_start: true,
        })
    }

    /// Prefixes every line in the file with the time it started arriving
    /// (`2026-01-01T00:00:00.000Z `); the in-memory tail stays verbatim.
    pub fn with_timestamps(mut self) -> Self {
        self.timestamps = true;
        self
    }

    pub fn reports(&self) -> Arc<ConsoleReports> {
        self.reports.clone()
    }

    /// The last bytes the guest printed, lossily decoded.
    pub fn tail(&self) -> String {
        let (a, b) = self.tail.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// True once after a line announcing that the guest halted or powered off.
    pub fn take_halt(&mut self) -> bool {
        std::mem::take(&mut self.halt_pending)
    }

    fn push(&mut self, b: u8) {
        if self.tail.len() == TAIL_BYTES {
            self.tail.pop_front();
        }
        self.tail.push_back(b);
        if b == b'\n' {
            self.end_line();
        } else if self.line.len() < MAX_LINE {
            self.line.push(b);
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        if line.contains("Kernel panic - not syncing") {
            self.reports.panicked.store(true, Ordering::SeqCst);
        }
        if line.contains("reboot: System halted") || line.contains("reboot: Power down") {
            self.reports.halted.store(true, Ordering::SeqCst);
            self.halt_pending = true;
        }
        self.line.clear();
    }

    fn write_file(&mut self, buf: &[u8]) {
        if !self.timestamps {
            return self.write_capped(buf);
        }
        for piece in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                let stamp = format!("{} ", humantime::format_rfc3339_millis(std::time::SystemTime::now()));
                self.write_capped(stamp.as_bytes());
            }
            self.write_capped(piece);
            self.at_line_start = piece.ends_with(b"\n");
        }
    }

    fn write_capped(&mut self, buf: &[u8]) {
        if let Some(file) = self.file.as_mut() {
            file.write(buf);
        }
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.push(b);
        }
        self.write_file(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_capped_and_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = ConsoleLog::new(Some(&p), 1000).unwrap();
        for _ in 0..100 {
            log.write_all(&[b'x'; 1000]).unwrap();
        }
        log.write_all(b"\nlast line\n").unwrap();
        let content = std::fs::read(&p).unwrap();
        assert!(content.len() < 1200, "file grew to {}", content.len());
        assert!(String::from_utf8_lossy(&content).contains("size cap"));
        assert_eq!(log.tail().len(), TAIL_BYTES);
        assert!(log.tail().ends_with("last line\n"));
    }

    #[test]
    fn markers_are_recognised_on_complete_lines_only() {
        let mut log = ConsoleLog::new(None, 0).unwrap();
        let r = log.reports();
        log.write_all(b"[    1.0] Kernel panic - not syncing: Attempted to kill init").unwrap();
        assert!(!r.panicked());
        log.write_all(b"\n").unwrap();
        assert!(r.panicked());
        assert!(!log.take_halt());
        log.write_all(b"[   2.0] reboot: System halted\n").unwrap();
        assert!(log.take_halt());
        assert!(!log.take_halt(), "taken once");
        assert!(r.halted());
    }

    #[test]
    fn timestamps_prefix_each_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = ConsoleLog::new(Some(&p), 1 << 20).unwrap().with_timestamps();
        log.write_all(b"one\ntw").unwrap();
        log.write_all(b"o\nthree\n").unwrap();
        let content = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = content.lines().collect();
        assert_eq!(lines.len(), 3);
        for (l, want) in lines.iter().zip(["one", "two", "three"]) {
            let (stamp, text) = l.split_once(' ').unwrap();
            assert!(humantime::parse_rfc3339(stamp).is_ok(), "{stamp}");
            assert_eq!(text, want);
        }
        assert_eq!(log.tail(), "one\ntwo\nthree\n");
    }

    #[test]
    fn long_lines_do_not_grow_memory() {
        let mut log = ConsoleLog::new(None, 0).unwrap();
        log.write_all(&vec![b'a'; 100_000]).unwrap();
        assert!(log.line.capacity() <= MAX_LINE.max(64) * 2);
    }
}
