//! Where the guest's serial console goes: a per-sandbox log file with a size cap, plus a
//! small in-memory tail for error messages. Never holds more than [`TAIL_BYTES`] +
//! [`MAX_LINE`] bytes in memory, whatever the guest prints. The file takes at most
//! [`FILE_RATE`] bytes a second after a burst of [`FILE_BURST`]: a guest printing without
//! pause costs the host no more than that in writes, and what is over it is dropped and
//! counted (a line in the file says how much, once output fits again).
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
/// Console bytes a second the file takes, sustained.
pub const FILE_RATE: u64 = 64 * 1024;
/// Console bytes the file takes at once after a quiet spell (a boot's worth).
pub const FILE_BURST: u64 = 1024 * 1024;

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
    /// The file's byte bucket: tokens, when it was last filled.
    tokens: u64,
    filled: std::time::Instant,
    /// Bytes dropped by the rate since the last note in the file, and in all.
    dropped_pending: u64,
    dropped: u64,
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
            tokens: FILE_BURST,
            filled: std::time::Instant::now(),
            dropped_pending: 0,
            dropped: 0,
        })
    }

    /// Console bytes the rate kept out of the file so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// How many of `n` bytes the file may take now.
    fn admit(&mut self, n: usize) -> usize {
        let ms = self.filled.elapsed().as_millis() as u64;
        if ms > 0 {
            self.tokens = (self.tokens + ms * FILE_RATE / 1000).min(FILE_BURST);
            self.filled = std::time::Instant::now();
        }
        let k = (n as u64).min(self.tokens);
        self.tokens -= k;
        k as usize
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
        if self.file.is_some() {
            let k = self.admit(buf.len());
            if k > 0 && self.dropped_pending > 0 {
                let note = format!(
                    "\n[msb: {} bytes of console output dropped: over {FILE_RATE} bytes a second]\n",
                    self.dropped_pending
                );
                self.write_capped(note.as_bytes());
                self.dropped_pending = 0;
            }
            self.write_file(&buf[..k]);
            let lost = (buf.len() - k) as u64;
            self.dropped_pending += lost;
            self.dropped += lost;
        }
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

    /// Finding 16: a guest printing without pause is held to the file's rate: what is over
    /// it is dropped, counted, and said in the file once output fits again.
    #[test]
    fn a_console_flood_is_rate_limited_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = ConsoleLog::new(Some(&p), 64 << 20).unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..(4 << 20) / 4096 {
            log.write_all(&[b'x'; 4096]).unwrap();
        }
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        let allowed = FILE_BURST + (elapsed_ms + 1) * FILE_RATE / 1000;
        assert!(log.dropped() >= (4 << 20) - allowed, "dropped {}", log.dropped());
        std::thread::sleep(std::time::Duration::from_millis(50));
        log.write_all(b"after the flood\n").unwrap();
        let content = std::fs::read_to_string(&p).unwrap();
        let allowed = FILE_BURST + (t0.elapsed().as_millis() as u64 + 1) * FILE_RATE / 1000;
        assert!(content.len() as u64 <= allowed + 4096, "the file took {} bytes", content.len());
        assert!(content.contains("bytes of console output dropped"), "the drop is said");
        assert!(content.ends_with("after the flood\n"));
        assert!(log.tail().ends_with("after the flood\n"), "the tail sees everything");
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
