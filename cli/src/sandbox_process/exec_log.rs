//! The exec log of a sandbox: one timestamped line per output line of every exec session
//! (start, output, exit, detach), appended across runs and capped (the guest decides what
//! its commands print): past [`EXEC_LOG_CAP`](msb_control_plane::schema::limits::EXEC_LOG_CAP)
//! bytes, one marker line and nothing more until the sandbox is removed.

use std::path::Path;
use std::sync::Mutex;

use msb_actors::logs::CappedLog;
use msb_protocol::sync::lock;

/// The line that ends an exec log at its cap.
const CAP_MARKER: &str = "[msb] the exec log reached its size cap; later output is not logged";

/// Timestamped exec output, shared by a sandbox's sessions.
pub struct ExecLog {
    inner: Mutex<CappedLog>,
}

impl ExecLog {
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        Ok(ExecLog { inner: Mutex::new(CappedLog::append(path, cap, CAP_MARKER)?) })
    }

    /// Logs `data` from session `id` under `what` (`stdout`, `exit`, …), a line per line.
    pub fn write(&self, id: u64, what: &str, data: &[u8]) {
        let mut log = lock(&self.inner);
        // Past the cap nothing is written: do not spend the formatting either.
        if log.is_capped() {
            return;
        }
        let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let text = String::from_utf8_lossy(data);
        let mut out = String::new();
        for line in text.split_inclusive('\n') {
            out.push_str(&format!("{stamp} [exec {id} {what}] {}\n", line.trim_end_matches(['\n', '\r'])));
        }
        log.write(out.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_log_lines_are_stamped_and_the_file_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exec.log");
        let log = ExecLog::open(&p, 400).unwrap();
        log.write(1, "stdout", b"one\ntwo\n");
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with(" [exec 1 stdout] two"), "{}", lines[1]);
        for _ in 0..100 {
            log.write(2, "stderr", b"a line that the guest repeats forever\n");
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.len() <= 400 + CAP_MARKER.len() + 2, "{} bytes", text.len());
        assert_eq!(text.matches("reached its size cap").count(), 1);
        // A new sandbox process on the same log keeps the cap.
        let again = ExecLog::open(&p, 400).unwrap();
        again.write(3, "stdout", b"more\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }
}
