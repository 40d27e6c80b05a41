//! Assembles the sandbox initramfs: agentd as `/init`, a static busybox with its applet
//! links, device nodes and mount points, as an uncompressed newc cpio.
//!
//! The archive is cached under `$MSB_HOME/cache`, keyed by the size and mtime of its inputs,
//! and written to a temporary file then renamed, so concurrent `msb` runs never see a torn file.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const FORMAT: u32 = 2;
const DIRS: &[&str] =
    &["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "home"];
/// The guest's users: root, an unprivileged `msb` (1000) and `nobody`.
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nmsb:x:1000:1000:msb:/home/msb:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
const GROUP: &str = "root:x:0:\nusers:x:100:msb\nmsb:x:1000:\nnogroup:x:65534:\n";

/// A newc cpio archive being written.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.owned_entry(name, mode, (0, 0), rdev, data)
    }

    fn owned_entry(&mut self, name: &str, mode: u32, owner: (u32, u32), rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields =
            [self.ino, mode, owner.0, owner.1, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }
    /// A directory owned by `uid:gid` (mode 0755).
    pub fn dir_owned(&mut self, name: &str, uid: u32, gid: u32) {
        self.owned_entry(name, 0o040755, (uid, gid), (0, 0), &[]);
    }
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, (0, 0), data);
    }
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | mode, (major, minor), &[]);
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

fn stamp(p: &Path, h: &mut DefaultHasher) -> Result<()> {
    let md = std::fs::metadata(p).map_err(io("reading the metadata of", p))?;
    md.len().hash(h);
    md.modified().ok().hash(h);
    p.hash(h);
    Ok(())
}

fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new(busybox).arg("--list").output().map_err(io("running --list on", busybox))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.[".contains(c)))
        .map(String::from)
        .collect())
}

/// Builds the archive bytes.
pub fn build(agentd: &Path, busybox: &Path) -> Result<Vec<u8>> {
    let read = |p: &Path| std::fs::read(p).map_err(io("reading", p));
    let mut c = Cpio::default();
    for d in DIRS {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.dir_owned("home/msb", 1000, 1000);
    c.file("etc/passwd", 0o644, PASSWD.as_bytes());
    c.file("etc/group", 0o644, GROUP.as_bytes());
    c.file("init", 0o755, &read(agentd)?);
    c.file("bin/busybox", 0o755, &read(busybox)?);
    for a in applets(busybox)? {
        if a != "busybox" {
            c.symlink(&format!("bin/{a}"), "busybox");
        }
    }
    Ok(c.finish())
}

/// Returns the cached archive for these inputs, building it if needed.
pub fn cached(home: &Path, agentd: &Path, busybox: &Path) -> Result<PathBuf> {
    let mut h = DefaultHasher::new();
    FORMAT.hash(&mut h);
    stamp(agentd, &mut h)?;
    stamp(busybox, &mut h)?;
    let dir = home.join("cache");
    let path = dir.join(format!("initramfs-{:016x}.cpio", h.finish()));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".initramfs-{}-{seq}.tmp", std::process::id()));
    std::fs::write(&tmp, build(agentd, busybox)?).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"abc");
        c.symlink("bin/sh", "busybox");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("TRAILER!!!"));
        // The file entry: header (110 bytes) + "init\0" padded, then "abc" padded.
        let at = s.find("init\0").unwrap();
        let hdr = &s[at - 110..at];
        assert_eq!(&hdr[6 + 8 * 6..6 + 8 * 7], "00000003", "filesize field");
        assert_eq!(&hdr[6 + 8..6 + 16], "000081ed", "regular file 0755");
    }

    #[test]
    fn cpio_extracts_with_the_system_tool() {
        if std::process::Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; layout checked by the unit test above");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("bin/hello", 0o755, b"hello world\n");
        c.symlink("bin/hi", "hello");
        let arc = dir.path().join("a.cpio");
        std::fs::write(&arc, c.finish()).unwrap();
        let out = dir.path().join("x");
        std::fs::create_dir(&out).unwrap();
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cd {} && cpio -id --quiet < {}", out.display(), arc.display()))
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(out.join("bin/hello")).unwrap(), b"hello world\n");
        assert_eq!(std::fs::read_link(out.join("bin/hi")).unwrap(), Path::new("hello"));
    }
}
