//! The sandbox process's own log (`vmm.log`, its stderr): every line, msb's and third-party
//! crates' alike (virtio-queue's `log` lines arrive through tracing), goes through one
//! limiter. A guest can make the VMM log (a device it breaks, a protocol error it causes),
//! so the file is capped across runs ([`VMM_LOG_CAP`], counting what is already there) and
//! lines are rate-limited ([`MAX_LINES_PER_SECOND`]); what is dropped is counted and said
//! once the window passes.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_control_plane::schema::limits::VMM_LOG_CAP;
use msb_protocol::sync::lock;

/// Log lines written per second at most; more are dropped and counted.
pub const MAX_LINES_PER_SECOND: u32 = 50;

struct State {
    sink: Box<dyn Write + Send>,
    written: u64,
    cap: u64,
    capped: bool,
    window: Instant,
    in_window: u32,
    dropped: u64,
}

/// A cheap, cloneable writer for the tracing subscriber (one `write` per log line).
#[derive(Clone)]
pub struct VmmLog(Arc<Mutex<State>>);

impl VmmLog {
    /// Writes to `sink`, which already holds `already` bytes, up to `cap` bytes in all.
    pub fn new(sink: Box<dyn Write + Send>, already: u64, cap: u64) -> Self {
        VmmLog(Arc::new(Mutex::new(State {
            sink,
            written: already,
            cap,
            capped: already >= cap,
            window: Instant::now(),
            in_window: 0,
            dropped: 0,
        })))
    }

    /// The sandbox process's stderr (the vmm.log file its client opened for it).
    pub fn stderr() -> Self {
        let already = std::fs::metadata("/proc/self/fd/2").map(|m| m.len()).unwrap_or(0);
        Self::new(Box::new(std::io::stderr()), already, VMM_LOG_CAP)
    }
}

impl State {
    fn put(&mut self, buf: &[u8]) {
        if self.capped {
            return;
        }
        if self.written + buf.len() as u64 > self.cap {
            self.capped = true;
            let _ = writeln!(self.sink, "[msb] vmm.log reached its {}-byte cap; later lines are dropped", self.cap);
            return;
        }
        if self.sink.write_all(buf).is_ok() {
            self.written += buf.len() as u64;
        }
    }
}

impl Write for VmmLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = lock(&self.0);
        let now = Instant::now();
        if now.duration_since(st.window) >= Duration::from_secs(1) {
            if st.dropped > 0 {
                let note =
                    format!("[msb] {} log lines dropped (more than {MAX_LINES_PER_SECOND} a second)\n", st.dropped);
                st.put(note.as_bytes());
                st.dropped = 0;
            }
            st.window = now;
            st.in_window = 0;
        }
        if st.in_window >= MAX_LINES_PER_SECOND {
            st.dropped += 1;
        } else {
            st.in_window += 1;
            st.put(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_lines_is_rate_limited_and_counted() {
        let out = Shared::default();
        let mut log = VmmLog::new(Box::new(out.clone()), 0, 1 << 20);
        for _ in 0..10_000 {
            log.write_all(b"virtio queue descriptor table breaks alignment constraints\n").unwrap();
        }
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert_eq!(text.lines().count(), MAX_LINES_PER_SECOND as usize, "one second's worth");
        // The next window says how many were dropped.
        lock(&log.0).window -= Duration::from_secs(1);
        log.write_all(b"later\n").unwrap();
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert!(text.contains(&format!("[msb] {} log lines dropped", 10_000 - MAX_LINES_PER_SECOND)), "{text}");
        assert!(text.ends_with("later\n"));
    }

    #[test]
    fn the_file_is_capped_counting_what_it_already_held() {
        let out = Shared::default();
        let mut log = VmmLog::new(Box::new(out.clone()), 900, 1000);
        for _ in 0..20 {
            log.write_all(b"0123456789\n").unwrap();
            lock(&log.0).in_window = 0; // not the rate limit under test
        }
        let text = String::from_utf8(lock(&out.0).clone()).unwrap();
        assert_eq!(text.matches("0123456789").count(), 9, "{text}");
        assert_eq!(text.matches("reached its 1000-byte cap").count(), 1);
        let full = VmmLog::new(Box::new(out.clone()), 1000, 1000);
        assert!(lock(&full.0).capped);
    }
}
