//! `msb cp SRC DST`, with `NAME:PATH` on one side, as `docker cp`: files and directories
//! (recursively, symlinks as symlinks). A copy is a tar stream through an ordinary exec of
//! agentd's file mode in the guest (see agentd's files.rs), so it needs no network and no
//! tool in the image, and goes under the exec channel's per-session flow control.
//!
//! Into the guest, the guest decides where names land (it is the guest's file system). Out
//! of the guest, every byte is hostile: the host extracts only below the destination the user
//! named, and refuses (naming the entry) absolute names, `..`, NUL, entries outside the
//! archive's one top entry, entries below a symlink or other non-directory (nothing is ever
//! written through a link), hardlinks; device nodes and FIFOs are skipped; modes lose
//! setuid/setgid/sticky bits; at most [`MAX_ENTRIES`] entries.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use msb_control_plane::schema::ExecEvent;
use msb_control_plane::{Error, ExecSpec, Msb, Result};

/// Most entries one copy out of a guest may create.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Most stderr kept from the guest side, for the error message.
const MAX_STDERR: usize = 16 * 1024;
const CHUNK: usize = 64 * 1024;

enum Loc {
    Host(PathBuf),
    Guest(String, String),
}

fn parse(s: &str) -> Loc {
    match s.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') && !name.starts_with('.') => {
            Loc::Guest(name.to_string(), if path.is_empty() { "/".into() } else { path.to_string() })
        }
        _ => Loc::Host(PathBuf::from(s)),
    }
}

/// agentd's file mode, as root (`/proc/self/exe` of a command agentd starts is agentd).
fn files_spec(mode: &str, path: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["/proc/self/exe".into(), "--msb-files".into(), mode.into(), path.into()],
        user: Some("root".into()),
        ..Default::default()
    }
}

pub async fn cp(msb: &Msb, src: &str, dst: &str) -> Result<()> {
    match (parse(src), parse(dst)) {
        (Loc::Host(from), Loc::Guest(name, to)) => copy_in(msb, &from, &name, &to).await,
        (Loc::Guest(name, from), Loc::Host(to)) => copy_out(msb, &name, &from, &to).await,
        (Loc::Host(_), Loc::Host(_)) => {
            Err(Error::Config("one side of `msb cp` must be NAME:PATH in a sandbox".into()))
        }
        (Loc::Guest(..), Loc::Guest(..)) => {
            Err(Error::Config("`msb cp` copies between the host and one sandbox, not between sandboxes".into()))
        }
    }
}

/// Collects the guest side's stderr (bounded) and turns a failed exit into an error.
fn guest_failure(what: &str, ev: Option<ExecEvent>, stderr: &[u8]) -> Option<Error> {
    let why = String::from_utf8_lossy(stderr).trim().to_string();
    match ev {
        Some(ExecEvent::Exited(msb_protocol::ExitStatus::Code(0))) => None,
        Some(ExecEvent::Exited(_)) => Some(Error::Config(format!("{what}: {why}"))),
        Some(ExecEvent::Failed(e)) => Some(e.into()),
        _ => Some(Error::Wire(format!("{what}: the sandbox ended the copy early"))),
    }
}

async fn copy_in(msb: &Msb, from: &Path, name: &str, to: &str) -> Result<()> {
    let md = std::fs::symlink_metadata(from).map_err(|e| Error::Config(format!("{}: {e}", from.display())))?;
    let sb = msb.get(name)?;
    let ex = sb.exec_stream(files_spec("untar", to), true).await?;
    let (mut events, mut input) = ex.split();
    // The tar is built on a blocking thread and handed over in chunks.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let shown = from.display().to_string();
    let from = from.to_path_buf();
    let top = from.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("root"));
    let packer = tokio::task::spawn_blocking(move || {
        let w = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        let r = if md.is_dir() { b.append_dir_all(&top, &from) } else { b.append_path_with_name(&from, &top) };
        let r = r.and_then(|_| b.into_inner()).and_then(|mut w| w.flush());
        if let Err(e) = r {
            let _ = tx.blocking_send(Err(e));
        }
    });
    // The events are read on their own task, never raced against the input (a read of the
    // socket cut short by a select would lose part of a frame).
    let drain = tokio::spawn(async move {
        let mut stderr = Vec::new();
        let end = loop {
            match events.next().await {
                Some(ExecEvent::Stderr(d)) => keep(&mut stderr, &d),
                Some(ExecEvent::Stdout(_)) => {}
                other => break other,
            }
        };
        (end, stderr)
    });
    let mut sent: Result<()> = Ok(());
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(data) => {
                // A refused write means the guest side stopped reading (it failed): its exit
                // status and stderr say why.
                if input.write_stdin(&data).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                sent = Err(Error::Config(format!("reading {shown}: {e}")));
                break;
            }
        }
    }
    drop(rx);
    if sent.is_ok() {
        let _ = input.close_stdin().await;
    } else {
        let _ = input.signal(9).await;
    }
    let (end, stderr) = drain.await.map_err(|e| Error::Wire(format!("reading the copy's events: {e}")))?;
    sent?;
    let _ = packer.await;
    match guest_failure(&format!("copying into {name}:{to}"), end, &stderr) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn keep(buf: &mut Vec<u8>, d: &[u8]) {
    let room = MAX_STDERR.saturating_sub(buf.len());
    buf.extend_from_slice(&d[..d.len().min(room)]);
}

struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx.blocking_send(Ok(chunk)).map_err(|_| std::io::Error::other("the copy was abandoned"))?;
        }
        Ok(())
    }
}

/// A blocking reader over chunks from the exec's output.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.cur.len() {
            match self.rx.recv() {
                Ok(c) => (self.cur, self.at) = (c, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.at);
        out[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

async fn copy_out(msb: &Msb, name: &str, from: &str, to: &Path) -> Result<()> {
    let sb = msb.get(name)?;
    let mut ex = sb.exec_stream(files_spec("tar", from), false).await?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let dest = to.to_path_buf();
    let extractor = tokio::task::spawn_blocking(move || extract(ChunkReader { rx, cur: Vec::new(), at: 0 }, &dest));
    let mut stderr = Vec::new();
    let end = loop {
        match ex.next().await {
            Some(ExecEvent::Stdout(d)) => {
                let tx = tx.clone();
                // A full channel means the extractor is behind: wait for it off the runtime.
                if tokio::task::spawn_blocking(move || tx.send(d)).await.map_or(true, |r| r.is_err()) {
                    break None;
                }
            }
            Some(ExecEvent::Stderr(d)) => keep(&mut stderr, &d),
            other => break other,
        }
    };
    drop(tx);
    let extracted = extractor.await.map_err(|e| Error::Wire(format!("the extractor failed: {e}")))?;
    if let Some(e) = guest_failure(&format!("copying {name}:{from}"), end, &stderr) {
        return Err(e);
    }
    extracted.map_err(Error::Config)
}

/// Checks an entry name from the guest with the image unpacker's rule (relative, no `..`,
/// no NUL, UTF-8, bounded length) and splits it; the root itself is no entry.
fn entry_parts(raw: &[u8]) -> std::result::Result<Vec<String>, String> {
    let name = msb_images::rootfs::normalize(raw)?;
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    Ok(name.split('/').map(String::from).collect())
}

/// Extracts a tar from the guest below `dest` (see the module docs for what is refused).
pub fn extract(input: impl Read, dest: &Path) -> std::result::Result<(), String> {
    let into_dir = dest.is_dir();
    let root = if into_dir { dest.to_path_buf() } else { dest.parent().map(Path::to_path_buf).unwrap_or_default() };
    let root = if root.as_os_str().is_empty() { PathBuf::from(".") } else { root };
    let mut ar = tar::Archive::new(input);
    let mut top: Option<String> = None;
    let mut count = 0u64;
    for entry in ar.entries().map_err(|e| format!("reading the copy: {e}"))? {
        let mut e = entry.map_err(|e| format!("reading the copy: {e}"))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(format!("the copy has more than {MAX_ENTRIES} entries"));
        }
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).chars().take(200).collect::<String>();
        let refuse = |why: &str| format!("refusing entry {shown:?} from the sandbox: {why}");
        let mut parts = entry_parts(&raw).map_err(|w| refuse(&w))?;
        if top.get_or_insert_with(|| parts[0].clone()) != &parts[0] {
            return Err(refuse("it is outside the copy's top entry"));
        }
        if !into_dir {
            // The top entry takes the destination's own name.
            parts[0] =
                dest.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| refuse("bad destination"))?;
        }
        // Every ancestor below `root` must be a real directory (never a link).
        let mut at = root.clone();
        for p in &parts[..parts.len() - 1] {
            at.push(p);
            match std::fs::symlink_metadata(&at) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(refuse(&format!("{} is not a directory", at.display()))),
                Err(_) => return Err(refuse(&format!("its directory {} did not come first", at.display()))),
            }
        }
        let target = at.join(parts.last().expect("non-empty"));
        let mode = e.header().mode().unwrap_or(0o644) & 0o777;
        let io = |err: std::io::Error| refuse(&format!("{}: {err}", target.display()));
        match e.header().entry_type() {
            tar::EntryType::Directory => match std::fs::symlink_metadata(&target) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(refuse("a directory would replace a file or link")),
                Err(_) => std::fs::DirBuilder::new().mode(mode | 0o700).create(&target).map_err(io)?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_symlink()) {
                    std::fs::remove_file(&target).map_err(io)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&target)
                    .map_err(io)?;
                std::io::copy(&mut e, &mut f).map_err(io)?;
            }
            tar::EntryType::Symlink => {
                let link = e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                if link.is_empty() || link.contains(&0) {
                    return Err(refuse("a symlink with an empty or NUL target"));
                }
                let _ = std::fs::remove_file(&target);
                std::os::unix::fs::symlink(std::ffi::OsStr::new(&String::from_utf8_lossy(&link).into_owned()), &target)
                    .map_err(io)?;
            }
            tar::EntryType::Link => return Err(refuse("hardlinks are not copied out of a sandbox")),
            _ => continue, // device nodes, FIFOs, others: skipped
        }
    }
    if top.is_none() {
        return Err("the sandbox sent an empty copy".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o4755);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut t = Vec::new();
        for (n, k, l, d) in entries {
            raw(&mut t, n, *k, l, d);
        }
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn a_copy_out_lands_below_the_destination_without_setuid() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_of(&[("top", D, "", b""), ("top/a", F, "", b"data"), ("top/l", S, "/etc/passwd", b"")]);
        extract(&t[..], dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("top/a")).unwrap(), b"data");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("top/a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7000, 0, "no setuid on the host");
        assert_eq!(std::fs::read_link(dir.path().join("top/l")).unwrap(), Path::new("/etc/passwd"));
        // A destination that does not exist takes the top entry's place.
        extract(&t[..], &dir.path().join("renamed")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("renamed/a")).unwrap(), b"data");
    }

    #[test]
    fn hostile_copies_are_refused_and_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_of(&[("/abs", F, "", b"x")]), "absolute"),
            (tar_of(&[("top/../../victim", F, "", b"x")]), "`..`"),
            (tar_of(&[("top", D, "", b""), ("other", F, "", b"x")]), "outside the copy's top entry"),
            (
                tar_of(&[
                    ("top", D, "", b""),
                    ("top/l", S, outside.path().to_str().unwrap(), b""),
                    ("top/l/victim", F, "", b"x"),
                ]),
                "not a directory",
            ),
            (tar_of(&[("top", D, "", b""), ("top/h", H, "/etc/shadow", b"")]), "hardlinks"),
            (tar_of(&[("top/deep/x", F, "", b"x")]), "did not come first"),
        ];
        for (t, why) in cases {
            let dest = tempfile::tempdir().unwrap();
            let e = extract(&t[..], dest.path()).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!victim.exists(), "{why}: wrote outside the destination");
        }
    }
}
