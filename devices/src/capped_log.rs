//! The one capped log file: bytes are written until the file holds `cap` bytes, then one
//! marker line says that later output is dropped, and nothing more is written. The guest
//! decides what reaches the console log and the exec log, so neither may grow without bound.
//!
//! Invariant: the file never exceeds `cap` plus one marker line, including across reopenings
//! with [`CappedLog::append`] (what is already there counts against the cap).

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Opens a log private to its owner from the first instant (mode 0600 on creation, and made
/// 0600 if it existed), never through a symlink.
fn private(opts: &mut std::fs::OpenOptions, path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = opts.mode(0o600).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A log file with a size cap.
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    written: u64,
    cap: u64,
    marker: &'static str,
    capped: bool,
}

impl CappedLog {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, cap: u64, marker: &'static str) -> std::io::Result<Self> {
        let file = private(std::fs::OpenOptions::new().write(true).create(true).truncate(true), path)?;
        Ok(CappedLog { file, written: 0, cap, marker, capped: false })
    }

    /// Opens `path` for appending; what it already holds counts against `cap`.
    pub fn append(path: &Path, cap: u64, marker: &'static str) -> std::io::Result<Self> {
        let file = private(std::fs::OpenOptions::new().create(true).append(true), path)?;
        let written = file.metadata()?.len();
        Ok(CappedLog { file, written, cap, marker, capped: written >= cap })
    }

    /// Writes what fits under the cap (best effort: a failed write loses only that write).
    pub fn write(&mut self, buf: &[u8]) {
        if self.capped {
            return;
        }
        let room = self.cap.saturating_sub(self.written);
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        if n > 0 && self.file.write_all(&buf[..n]).is_ok() {
            self.written += n as u64;
        }
        if n < buf.len() {
            self.capped = true;
            let _ = write!(self.file, "\n{}\n", self.marker);
        }
    }

    /// Whether the cap has been reached.
    pub fn is_capped(&self) -> bool {
        self.capped
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: &str = "[capped]";

    #[test]
    fn the_file_stops_at_the_cap_with_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut log = CappedLog::create(&p, 100, MARK).unwrap();
        for _ in 0..50 {
            log.write(b"0123456789");
        }
        assert!(log.is_capped());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.len(), 100 + MARK.len() + 2);
        assert_eq!(text.matches(MARK).count(), 1);
    }

    #[test]
    fn logs_are_private_and_never_written_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        CappedLog::create(&p, 10, MARK).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        CappedLog::append(&p, 10, MARK).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(CappedLog::append(&link, 10, MARK).is_err());
        assert!(CappedLog::create(&link, 10, MARK).is_err());
    }

    #[test]
    fn a_reopened_log_keeps_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        CappedLog::append(&p, 10, MARK).unwrap().write(b"0123456789abc");
        let before = std::fs::read(&p).unwrap();
        let mut again = CappedLog::append(&p, 10, MARK).unwrap();
        assert!(again.is_capped());
        again.write(b"more");
        assert_eq!(std::fs::read(&p).unwrap(), before);
        let mut fresh = CappedLog::create(&p, 10, MARK).unwrap();
        fresh.write(b"new");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }
}
