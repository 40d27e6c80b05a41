//! A named sandbox's files, from the host: read and write streamed in chunks, list, stat,
//! mkdir, remove, rename, and whole-tree copies both ways (`msb cp`, as `docker cp`).
//!
//! Every operation is an ordinary exec of agentd's file mode in the guest
//! (`/proc/self/exe --msb-files …`, see agentd's files.rs), as root: it needs no network and
//! no tool of the image's own, goes under the exec channel's per-session flow control, and
//! paths are resolved in the guest by the guest's kernel. Paths given to this API must be
//! absolute, without NUL, at most [`MAX_PATH`] bytes.
//!
//! Everything the guest sends back is hostile. Listings and stats are parsed line by line
//! into [`FileInfo`] (checked kinds, numbers, hex-coded names without `/`, NUL, `.` or `..`)
//! with a bound on line length and count; a failure's exit status becomes a
//! [`FileErrorKind`]; its stderr is kept to [`MAX_STDERR`] bytes. A copy out of a guest is
//! extracted only below the destination the user named ([`extract`]): the host derives the
//! top entry's name from the path the user asked for ([`copy_top_name`]) and refuses any
//! other; absolute names, `..`, NUL, entries below a symlink or other non-directory and
//! hardlinks are refused, naming the entry; every entry is created from directory
//! descriptors held from the destination down, one component at a time without following
//! links, so a directory a guest swaps for a symlink mid-copy (in a shared mount) is refused,
//! not written through; device nodes and FIFOs are skipped; modes lose setuid/setgid/sticky
//! bits; at most [`MAX_COPY_ENTRIES`] entries and [`MAX_COPY_BYTES`] of data; names and PAX
//! headers are bounded before they are read. A copy in is packed the same way ([`pack`]):
//! from descriptors, never through a link swapped in while it runs.
//!
//! A write goes to a new file beside its target and is renamed onto it only once all of it
//! is synced, so a failed or abandoned write never leaves half a file at the path: its bytes
//! go framed (length, bytes; an empty chunk commits), so input that stops early — a client
//! that went away, a writer dropped unfinished — is never taken for the whole file. Dropping a
//! [`FileReader`] or an unfinished [`FileWriter`] kills its command in the guest.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use msb_schema::{ExecEvent, ExecSpec};

use crate::client::{ExecInput, NamedSandbox, RemoteExec};
use crate::{Error, Result};

/// Longest path this API sends to a guest.
pub const MAX_PATH: usize = 4096;
/// Most entries a listing may have (agentd's own bound).
pub const MAX_LIST: usize = 100_000;
/// Longest line of a listing: a 255-byte name and a 4095-byte link target in hex, and numbers.
pub const MAX_LINE: usize = 9 * 1024;
/// Most entries one copy out of a guest may create.
pub const MAX_COPY_ENTRIES: u64 = 1_000_000;
/// How long a copy waits for the sandbox to send (out) or take (in) a byte before it gives
/// up: a guest that stalls leaves no `msb cp` waiting for ever.
pub const COPY_STALL: std::time::Duration = std::time::Duration::from_secs(120);
/// How long a copy in waits, once all is sent, for the guest to finish writing it.
pub const COPY_FINISH: std::time::Duration = std::time::Duration::from_secs(600);
/// Most bytes of file data one copy out of a guest may write on the host.
pub const MAX_COPY_BYTES: u64 = 16 << 30;
/// Most stderr kept from the guest side, for the error message.
pub const MAX_STDERR: usize = 16 * 1024;
const CHUNK: usize = 64 * 1024;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// A device node, FIFO or socket.
    Other,
}

/// One entry, as the guest's `lstat` saw it (links are not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The entry's name (a stat of `/` says `/`); bytes that are not UTF-8 are shown as U+FFFD.
    pub name: String,
    pub kind: FileKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Last modification, in seconds since the Unix epoch.
    pub modified: i64,
    /// A symlink's target.
    pub link_target: Option<String>,
}

/// Why a file operation failed in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileErrorKind {
    NotFound,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    PermissionDenied,
    DirectoryNotEmpty,
    Other,
}

impl FileErrorKind {
    /// The kind agentd's file mode names by its exit status.
    pub fn from_status(code: i32) -> Self {
        match code {
            2 => Self::NotFound,
            3 => Self::AlreadyExists,
            4 => Self::NotADirectory,
            5 => Self::IsADirectory,
            6 => Self::PermissionDenied,
            7 => Self::DirectoryNotEmpty,
            _ => Self::Other,
        }
    }
}

/// A file operation the guest refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} {path} in the sandbox: {reason}")]
pub struct FileError {
    /// What was asked (`reading`, `listing`, …).
    pub op: &'static str,
    pub path: String,
    pub kind: FileErrorKind,
    /// The guest's own words (at most [`MAX_STDERR`] bytes of its stderr): hostile text,
    /// which may hold terminal escapes; escape it before printing it to a terminal (the CLI
    /// does).
    pub reason: String,
}

/// Checks a guest path given to this API.
fn guest_path(path: &str) -> Result<&str> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_PATH {
        return Err(Error::Config(format!(
            "{:?} is not a usable sandbox path: it must be absolute, without NUL, at most {MAX_PATH} bytes",
            path.chars().take(200).collect::<String>()
        )));
    }
    Ok(path)
}

/// agentd's file mode, as root (`/proc/self/exe` of a command agentd starts is agentd).
fn files_spec(args: &[&str]) -> ExecSpec {
    let mut argv = vec!["/proc/self/exe".to_string(), "--msb-files".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    ExecSpec { argv, user: Some("root".into()), ..Default::default() }
}

/// A command's next event, waiting at most [`COPY_STALL`]; `None` when none came, after the
/// command is killed (a stalled guest leaves no caller waiting for ever).
async fn next_or_kill(ex: &mut RemoteExec) -> Option<Option<ExecEvent>> {
    match tokio::time::timeout(COPY_STALL, ex.next()).await {
        Ok(n) => Some(n),
        Err(_) => {
            let _ = ex.signal(9).await;
            None
        }
    }
}

/// What `what` says when its sandbox sent nothing for [`COPY_STALL`].
fn stalled(what: &str) -> Error {
    Error::Wire(format!("{what}: the sandbox sent nothing for {}s; it may be stuck", COPY_STALL.as_secs()))
}

fn keep(buf: &mut Vec<u8>, d: &[u8]) {
    let room = MAX_STDERR.saturating_sub(buf.len());
    buf.extend_from_slice(&d[..d.len().min(room)]);
}

/// Turns the end of a file command into the result: its exit status names the failure.
fn outcome(op: &'static str, path: &str, end: Option<ExecEvent>, stderr: &[u8]) -> Result<()> {
    let reason = String::from_utf8_lossy(stderr).trim().to_string();
    let fail = |kind, reason: String| Err(Error::File(FileError { op, path: path.to_string(), kind, reason }));
    match end {
        Some(ExecEvent::Exited(msb_protocol::ExitStatus::Code(0))) => Ok(()),
        Some(ExecEvent::Exited(msb_protocol::ExitStatus::Code(c))) => fail(FileErrorKind::from_status(c), reason),
        Some(ExecEvent::Exited(msb_protocol::ExitStatus::Signal(s))) => {
            fail(FileErrorKind::Other, format!("the file command was killed by signal {s}"))
        }
        Some(ExecEvent::Failed(e)) => Err(e.into()),
        _ => Err(Error::Wire(format!("{op} {path}: the sandbox ended the command early"))),
    }
}

/// Kills a file command left running (best effort, off the caller's path).
fn kill_behind(mut input: ExecInput) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = input.signal(9).await;
        });
    }
}

/// A file being read out of a sandbox, in chunks as they arrive.
pub struct FileReader {
    events: crate::client::ExecEvents,
    input: Option<ExecInput>,
    path: String,
    stderr: Vec<u8>,
}

impl FileReader {
    /// The next chunk of the file; `None` at its end (after which the read succeeded).
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>> {
        if self.input.is_none() {
            return Ok(None);
        }
        loop {
            match self.events.next().await {
                Some(ExecEvent::Stdout(d)) => return Ok(Some(d)),
                Some(ExecEvent::Stderr(d)) => keep(&mut self.stderr, &d),
                end => {
                    self.input = None;
                    return outcome("reading", &self.path, end, &self.stderr).map(|_| None);
                }
            }
        }
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        if let Some(input) = self.input.take() {
            kill_behind(input);
        }
    }
}

/// One chunk of a write as agentd's write mode reads it: its length (`u32` little-endian),
/// then its bytes. An empty chunk ends the write and commits it.
fn frame(chunk: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + chunk.len());
    f.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    f.extend_from_slice(chunk);
    f
}

type Drain = tokio::task::JoinHandle<(Option<ExecEvent>, Vec<u8>)>;

/// A file being written into a sandbox; [`FileWriter::finish`] puts it in place.
pub struct FileWriter {
    input: Option<ExecInput>,
    drain: Option<Drain>,
    path: String,
}

impl FileWriter {
    /// Sends more of the file. The sandbox takes it only as fast as the guest writes it.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let Some(input) = self.input.as_mut() else {
            return Err(Error::Config(format!("the write of {} has already ended", self.path)));
        };
        for chunk in data.chunks(CHUNK) {
            if input.write_stdin(&frame(chunk)).await.is_err() {
                // The guest side stopped reading: it failed, and its status says why.
                self.input = None;
                return self
                    .end()
                    .await
                    .and(Err(Error::Wire(format!("writing {}: the sandbox stopped reading", self.path))));
            }
        }
        Ok(())
    }

    /// Ends the file and waits until the guest has synced it and renamed it onto its path.
    pub async fn finish(mut self) -> Result<()> {
        let Some(mut input) = self.input.take() else {
            return Err(Error::Config(format!("the write of {} has already ended", self.path)));
        };
        // The empty chunk commits the write; input that stops without it never does.
        input.write_stdin(&frame(&[])).await?;
        input.close_stdin().await?;
        self.end().await
    }

    async fn end(&mut self) -> Result<()> {
        let drain = self.drain.take().expect("ended once");
        let (end, stderr) = drain.await.map_err(|e| Error::Wire(format!("reading the write's events: {e}")))?;
        outcome("writing", &self.path, end, &stderr)
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if let Some(input) = self.input.take() {
            kill_behind(input);
        }
    }
}

/// Reads a command's events on their own task (never raced against its input: a read of the
/// socket cut short by a select would lose part of a frame), keeping stderr.
fn drain_events(mut events: crate::client::ExecEvents) -> Drain {
    tokio::spawn(async move { to_end(&mut events).await })
}

/// Reads a command's events to its end, ignoring stdout and keeping stderr (bounded).
async fn to_end(events: &mut crate::client::ExecEvents) -> (Option<ExecEvent>, Vec<u8>) {
    let mut stderr = Vec::new();
    let end = loop {
        match events.next().await {
            Some(ExecEvent::Stderr(d)) => keep(&mut stderr, &d),
            Some(ExecEvent::Stdout(_)) => {}
            other => break other,
        }
    };
    (end, stderr)
}

/// Parses one line of a listing or stat from the guest; `top` allows the name `/`.
pub fn parse_entry(line: &[u8], top: bool) -> std::result::Result<FileInfo, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not text".to_string())?;
    let f: Vec<&str> = line.split(' ').collect();
    if f.len() != 7 && f.len() != 8 {
        return Err(format!("{} fields, expected 7 or 8", f.len()));
    }
    let kind = match f[0] {
        "f" => FileKind::File,
        "d" => FileKind::Dir,
        "l" => FileKind::Symlink,
        "o" => FileKind::Other,
        k => return Err(format!("unknown kind {k:?}")),
    };
    let num = |s: &str, what: &str| -> std::result::Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("bad {what} {s:?}"));
        }
        s.parse::<u64>().map_err(|_| format!("bad {what} {s:?}"))
    };
    let mode = u32::from_str_radix(f[1], 8).ok().filter(|m| *m <= 0o7777 && !f[1].starts_with('+'));
    let mode = mode.ok_or_else(|| format!("bad mode {:?}", f[1]))?;
    let uid = u32::try_from(num(f[2], "uid")?).map_err(|_| "uid out of range".to_string())?;
    let gid = u32::try_from(num(f[3], "gid")?).map_err(|_| "gid out of range".to_string())?;
    let size = num(f[4], "size")?;
    let modified = match f[5].strip_prefix('-') {
        Some(n) => -(i64::try_from(num(n, "mtime")?).map_err(|_| "mtime out of range".to_string())?),
        None => i64::try_from(num(f[5], "mtime")?).map_err(|_| "mtime out of range".to_string())?,
    };
    let name = unhex(f[6])?;
    let name_ok = (top && name == b"/")
        || (!name.is_empty()
            && name.len() <= 255
            && !name.contains(&b'/')
            && !name.contains(&0)
            && name != b"."
            && name != b"..");
    if !name_ok {
        return Err("a name that is empty, too long, or has `/` or NUL, or is `.` or `..`".into());
    }
    let link_target = match (kind, f.get(7)) {
        (FileKind::Symlink, Some(t)) => {
            let t = unhex(t)?;
            if t.is_empty() || t.len() > 4095 || t.contains(&0) {
                return Err("a link target that is empty, too long or has NUL".into());
            }
            Some(String::from_utf8_lossy(&t).into_owned())
        }
        (FileKind::Symlink, None) => return Err("a symlink without its target".into()),
        (_, Some(_)) => return Err("a link target on what is not a symlink".into()),
        (_, None) => None,
    };
    Ok(FileInfo {
        name: String::from_utf8_lossy(&name).into_owned(),
        kind,
        mode,
        uid,
        gid,
        size,
        modified,
        link_target,
    })
}

fn unhex(s: &str) -> std::result::Result<Vec<u8>, String> {
    if s.len() & 1 == 1 {
        return Err("odd-length hex".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            let d = &s[i..i + 2];
            if d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                u8::from_str_radix(d, 16).map_err(|_| "bad hex".to_string())
            } else {
                Err("bad hex".to_string())
            }
        })
        .collect()
}

impl NamedSandbox {
    /// This sandbox's files.
    pub fn files(&self) -> Files<'_> {
        Files { sb: self }
    }
}

/// A named sandbox's files ([`NamedSandbox::files`]); the sandbox must be running.
pub struct Files<'a> {
    sb: &'a NamedSandbox,
}

impl Files<'_> {
    async fn file_command(&self, args: &[&str], stdin: bool) -> Result<RemoteExec> {
        self.sb.exec_stream(files_spec(args), stdin).await
    }

    /// Runs a file command that says nothing on success.
    async fn file_op(&self, op: &'static str, shown: &str, args: &[&str]) -> Result<()> {
        let (mut events, _input) = self.file_command(args, false).await?.split();
        let (end, stderr) = tokio::time::timeout(COPY_FINISH, to_end(&mut events)).await.map_err(|_| {
            Error::Wire(format!(
                "{op} {shown}: the sandbox did not finish within {}s; it may be stuck",
                COPY_FINISH.as_secs()
            ))
        })?;
        outcome(op, shown, end, &stderr)
    }

    /// Runs `ls` or `stat` and parses its lines (at most `max`).
    async fn entries(&self, op: &'static str, path: &str, mode: &str, max: usize) -> Result<Vec<FileInfo>> {
        let mut ex = self.file_command(&[mode, path], false).await?;
        let (mut line, mut stderr, mut found) = (Vec::new(), Vec::new(), Vec::new());
        let hostile = |why: String| Error::Wire(format!("{op} {path}: the sandbox sent a bad entry: {why}"));
        let end = loop {
            let Some(next) = next_or_kill(&mut ex).await else {
                return Err(stalled(&format!("{op} {path}")));
            };
            match next {
                Some(ExecEvent::Stdout(d)) => {
                    for &b in &d {
                        if b != b'\n' {
                            line.push(b);
                            if line.len() > MAX_LINE {
                                let _ = ex.signal(9).await;
                                return Err(hostile(format!("a line longer than {MAX_LINE} bytes")));
                            }
                            continue;
                        }
                        if found.len() == max {
                            let _ = ex.signal(9).await;
                            return Err(hostile(format!("more than {max} entries")));
                        }
                        found.push(parse_entry(&line, mode == "stat").map_err(&hostile)?);
                        line.clear();
                    }
                }
                Some(ExecEvent::Stderr(d)) => keep(&mut stderr, &d),
                other => break other,
            }
        };
        outcome(op, path, end, &stderr)?;
        if !line.is_empty() {
            return Err(hostile("an unfinished line".into()));
        }
        Ok(found)
    }

    /// Streams a regular file out of the sandbox.
    pub async fn read_file(&self, path: &str) -> Result<FileReader> {
        let path = guest_path(path)?;
        let (events, input) = self.file_command(&["cat", path], false).await?.split();
        Ok(FileReader { events, input: Some(input), path: path.to_string(), stderr: Vec::new() })
    }

    /// Reads a whole regular file of at most `limit` bytes.
    pub async fn read(&self, path: &str, limit: usize) -> Result<Vec<u8>> {
        let mut r = self.read_file(path).await?;
        let mut data = Vec::new();
        while let Some(chunk) = r.chunk().await? {
            if data.len() + chunk.len() > limit {
                return Err(Error::Config(format!(
                    "{path} in the sandbox is larger than {limit} bytes; stream it with read_file"
                )));
            }
            data.extend_from_slice(&chunk);
        }
        Ok(data)
    }

    /// Starts writing a file (permission bits `mode`, e.g. `0o644`); it replaces `path` when
    /// [`FileWriter::finish`] succeeds, and not before.
    pub async fn write_file(&self, path: &str, mode: u32) -> Result<FileWriter> {
        let path = guest_path(path)?;
        if mode > 0o7777 {
            return Err(Error::Config(format!("{mode:o} is not a file mode (0 to 7777 octal)")));
        }
        let (events, input) = self.file_command(&["write", path, &format!("{mode:o}")], true).await?.split();
        Ok(FileWriter { input: Some(input), drain: Some(drain_events(events)), path: path.to_string() })
    }

    /// Writes a whole file (permission bits `mode`).
    pub async fn write(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let mut w = self.write_file(path, mode).await?;
        for chunk in data.chunks(CHUNK) {
            w.write(chunk).await?;
        }
        w.finish().await
    }

    /// A directory's entries (not `.` and `..`), at most [`MAX_LIST`].
    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>> {
        let path = guest_path(path)?;
        self.entries("listing", path, "ls", MAX_LIST).await
    }

    /// One entry, without following a final symlink.
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let path = guest_path(path)?;
        let mut found = self.entries("inspecting", path, "stat", 1).await?;
        found.pop().ok_or_else(|| Error::Wire(format!("inspecting {path}: the sandbox said nothing")))
    }

    /// Makes a directory; with `parents`, its missing parents too, and an existing one is fine.
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<()> {
        let path = guest_path(path)?;
        self.file_op("making", path, &["mkdir", path, if parents { "1" } else { "0" }]).await
    }

    /// Removes a file, link or empty directory; with `recursive`, a directory and everything in it.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let path = guest_path(path)?;
        self.file_op("removing", path, &["rm", path, if recursive { "1" } else { "0" }]).await
    }

    /// Renames within the sandbox (rename(2): replaces a file at `to`).
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from, to) = (guest_path(from)?, guest_path(to)?);
        self.file_op("renaming", &format!("{from} -> {to}"), &["mv", from, to]).await
    }

    /// Copies a host file or directory into the sandbox at `to` (inside `to` when it is an
    /// existing directory), as `docker cp`.
    pub async fn copy_in(&self, from: &Path, to: &str) -> Result<()> {
        let to = guest_path(to)?;
        std::fs::symlink_metadata(from).map_err(|e| Error::Config(format!("{}: {e}", from.display())))?;
        let (events, mut input) = self.file_command(&["untar", to], true).await?.split();
        // The tar is built on a blocking thread and handed over in chunks.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let shown = from.display().to_string();
        let from = from.to_path_buf();
        let top = from.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("root"));
        let packer = tokio::task::spawn_blocking(move || {
            let w = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
            if let Err(e) = pack(&from, &top, w) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let drain = drain_events(events);
        let mut sent: Result<()> = Ok(());
        while let Some(chunk) = rx.recv().await {
            match chunk {
                // A refused write means the guest side stopped reading (it failed): its exit
                // status and stderr say why.
                Ok(data) => match tokio::time::timeout(COPY_STALL, input.write_stdin(&data)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        sent = Err(Error::Wire(format!(
                            "copying into {to}: the sandbox took nothing for {}s; it may be stuck",
                            COPY_STALL.as_secs()
                        )));
                        break;
                    }
                },
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
        let (end, stderr) = match tokio::time::timeout(COPY_FINISH, drain).await {
            Ok(r) => r.map_err(|e| Error::Wire(format!("reading the copy's events: {e}")))?,
            Err(_) => {
                sent?;
                return Err(Error::Wire(format!(
                    "copying into {to}: the sandbox did not finish writing within {}s of the last byte",
                    COPY_FINISH.as_secs()
                )));
            }
        };
        sent?;
        let _ = packer.await;
        outcome("copying into", to, end, &stderr)
    }

    /// Copies a file or directory out of the sandbox to `to` on the host (inside `to` when it
    /// is an existing directory), extracting only below it ([`extract`]).
    pub async fn copy_out(&self, from: &str, to: &Path) -> Result<()> {
        let from = guest_path(from)?;
        let mut ex = self.file_command(&["tar", from], false).await?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let dest = to.to_path_buf();
        let top = copy_top_name(from);
        let extractor = tokio::task::spawn_blocking(move || {
            extract(ChunkReader { rx, cur: Vec::new(), at: 0 }, &dest, &top, MAX_COPY_BYTES)
        });
        let mut stderr = Vec::new();
        let end = loop {
            let Some(next) = next_or_kill(&mut ex).await else {
                drop(tx);
                let _ = extractor.await;
                return Err(stalled(&format!("copying {from}")));
            };
            match next {
                Some(ExecEvent::Stdout(d)) => {
                    let tx = tx.clone();
                    // A full channel means the extractor is behind: wait for it off the runtime.
                    if tokio::task::spawn_blocking(move || tx.send(d)).await.map_or(true, |r| r.is_err()) {
                        let _ = ex.signal(9).await;
                        break None;
                    }
                }
                Some(ExecEvent::Stderr(d)) => keep(&mut stderr, &d),
                other => break other,
            }
        };
        drop(tx);
        let extracted = extractor.await.map_err(|e| Error::Wire(format!("the extractor failed: {e}")))?;
        // The guest's own failure (a missing path) says more than what the host made of it.
        outcome("copying", from, end, &stderr)?;
        extracted.map_err(Error::Config)
    }
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

/// Checks an entry name from the guest with the image unpacker's rule (relative, no `..`,
/// no NUL, UTF-8, bounded length) and splits it; the root itself is no entry.
fn entry_parts(raw: &[u8]) -> std::result::Result<Vec<String>, String> {
    let name = msb_images::rootfs::normalize(raw)?;
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    Ok(name.split('/').map(String::from).collect())
}

/// The name the guest's side gives a copy's top entry for the guest path `from` (agentd
/// names it the same way): its last component, or `root`. The host derives it itself and
/// takes no other from the guest.
pub fn copy_top_name(from: &str) -> String {
    Path::new(from).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into())
}

/// Opens directory `name` beneath the directory `parent`: one component, never through a
/// symlink (`O_NOFOLLOW`), so a directory swapped for a link while a copy runs is refused,
/// not followed.
fn open_dir_beneath(parent: &OwnedFd, name: impl rustix::path::Arg) -> std::io::Result<OwnedFd> {
    Ok(rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Extracts a tar from the guest below `dest` (see the module docs for what is refused),
/// taking only the top entry named `top` (what the user asked for: [`copy_top_name`]).
///
/// Every entry is created relative to directory descriptors held from `dest` down, one
/// component at a time with `O_NOFOLLOW`: nothing is written through a symlink, even one
/// swapped in while the copy runs. At most [`MAX_COPY_ENTRIES`] entries and `max_bytes` of
/// file data.
pub fn extract(input: impl Read, dest: &Path, top: &str, max_bytes: u64) -> std::result::Result<(), String> {
    let into_dir = dest.is_dir();
    let root = if into_dir { dest.to_path_buf() } else { dest.parent().map(Path::to_path_buf).unwrap_or_default() };
    let root = if root.as_os_str().is_empty() { PathBuf::from(".") } else { root };
    let root_fd = rfs::open(&root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| format!("opening the destination {}: {e}", root.display()))?;
    let final_top = if into_dir {
        top.to_string()
    } else {
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or("the destination has no name")?
    };
    let mut ar = tar::Archive::new(input);
    let mut members = msb_images::tarstream::Members::new(&mut ar).map_err(|e| format!("reading the copy: {e}"))?;
    let (mut count, mut bytes, mut any) = (0u64, 0u64, false);
    loop {
        let (meta, e) = match members.next_member() {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => return Err(format!("reading the copy: {e}")),
        };
        count += 1;
        if count > MAX_COPY_ENTRIES {
            return Err(format!("the copy has more than {MAX_COPY_ENTRIES} entries"));
        }
        let shown = String::from_utf8_lossy(&meta.path).chars().take(200).collect::<String>();
        let refuse = |why: &str| format!("refusing entry {shown:?} from the sandbox: {why}");
        let mut parts = entry_parts(&meta.path).map_err(|w| refuse(&w))?;
        if parts[0] != top {
            return Err(refuse(&format!("the copy's top entry must be {top:?}, what was asked for")));
        }
        any = true;
        parts[0] = final_top.clone();
        // Every ancestor below `root` must be a real directory: opened one component at a
        // time, never through a link.
        let mut parent = root_fd.try_clone().map_err(|e| refuse(&e.to_string()))?;
        let mut at = root.clone();
        for p in &parts[..parts.len() - 1] {
            at.push(p);
            parent = open_dir_beneath(&parent, p).map_err(|e| {
                if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) {
                    refuse(&format!("its directory {} did not come first", at.display()))
                } else {
                    refuse(&format!("{} is not a directory", at.display()))
                }
            })?;
        }
        let name = parts.last().expect("non-empty").as_str();
        let target = at.join(name);
        let mode = Mode::from_bits_truncate(meta.mode & 0o777);
        let io = |err: Errno| refuse(&format!("{}: {err}", target.display()));
        let existing =
            rfs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).ok().map(|st| FileType::from_raw_mode(st.st_mode));
        match meta.kind {
            tar::EntryType::Directory => match existing {
                Some(FileType::Directory) => {}
                Some(_) => return Err(refuse("a directory would replace a file or link")),
                None => rfs::mkdirat(&parent, name, mode | Mode::RWXU).map_err(io)?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                bytes = bytes.saturating_add(meta.size);
                if bytes > max_bytes {
                    return Err(refuse(&format!("the copy holds more than {max_bytes} bytes of files")));
                }
                match existing {
                    Some(FileType::Symlink) => rfs::unlinkat(&parent, name, AtFlags::empty()).map_err(io)?,
                    Some(FileType::RegularFile) | None => {}
                    Some(_) => return Err(refuse("a file would replace a directory or a special file")),
                }
                // O_NONBLOCK: a FIFO swapped in is refused (ENXIO), never waited on.
                let fd = rfs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::TRUNC
                        | OFlags::NOFOLLOW
                        | OFlags::NOCTTY
                        | OFlags::NONBLOCK
                        | OFlags::CLOEXEC,
                    mode,
                )
                .map_err(io)?;
                if FileType::from_raw_mode(rfs::fstat(&fd).map_err(io)?.st_mode) != FileType::RegularFile {
                    return Err(refuse("it is not a regular file on the host"));
                }
                let mut f = std::fs::File::from(fd);
                std::io::copy(&mut msb_images::tarstream::Exact::new(e, meta.size), &mut f)
                    .map_err(|err| refuse(&format!("{}: {err}", target.display())))?;
            }
            tar::EntryType::Symlink => {
                let link = &meta.link;
                if link.is_empty() || link.contains(&0) {
                    return Err(refuse("a symlink with an empty or NUL target"));
                }
                match existing {
                    Some(FileType::Directory) => return Err(refuse("a link would replace a directory")),
                    Some(_) => rfs::unlinkat(&parent, name, AtFlags::empty()).map_err(io)?,
                    None => {}
                }
                rfs::symlinkat(link.as_slice(), &parent, name).map_err(io)?;
            }
            tar::EntryType::Link => return Err(refuse("hardlinks are not copied out of a sandbox")),
            _ => continue, // device nodes, FIFOs, others: skipped
        }
    }
    if !any {
        return Err("the sandbox sent an empty copy".into());
    }
    Ok(())
}

/// Packs the host file or directory `from` as `top` into `b` for a copy in, walking by
/// descriptor: each directory is opened beneath its parent with `O_NOFOLLOW`, each file with
/// `O_NOFOLLOW | O_NONBLOCK` and described by `fstat` of what was opened, so a directory
/// swapped for a symlink while the copy runs (a source a guest shares read-write) is never
/// read through. Symlinks are packed as links; FIFOs, sockets and devices are skipped. A file
/// that changes size while it is read fails the copy. At most [`MAX_COPY_ENTRIES`] entries
/// and [`MAX_PACK_DEPTH`] levels of directories (a guest may shape a shared tree); the walk
/// keeps its own stack (one open directory a level), so no tree can exhaust the thread's.
pub fn pack(from: &Path, top: &Path, out: impl Write) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    let cwd = rfs::open(".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mut count = 0u64;
    let mut stack: Vec<Walking> = pack_entry(&mut b, &cwd, from.as_os_str(), top, &mut count)?.into_iter().collect();
    while let Some((dir, arc, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let child = arc.join(&name);
        if let Some(sub) = pack_entry(&mut b, dir, &name, &child, &mut count)? {
            if stack.len() >= MAX_PACK_DEPTH {
                return Err(std::io::Error::other(format!(
                    "{} is more than {MAX_PACK_DEPTH} directories deep",
                    child.display()
                )));
            }
            stack.push(sub);
        }
    }
    b.into_inner()?.flush()
}

/// Deepest directory a copy into a sandbox descends into.
pub const MAX_PACK_DEPTH: usize = 256;

/// A directory being packed: its descriptor, its name in the archive, the names left.
type Walking = (OwnedFd, PathBuf, std::vec::IntoIter<std::ffi::OsString>);

fn header_of(st: &rfs::Stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(size);
    h
}

/// Packs entry `name` of `parent` as `arc`; a directory comes back to be walked.
fn pack_entry<W: Write>(
    b: &mut tar::Builder<W>,
    parent: &OwnedFd,
    name: &std::ffi::OsStr,
    arc: &Path,
    count: &mut u64,
) -> std::io::Result<Option<Walking>> {
    *count += 1;
    if *count > MAX_COPY_ENTRIES {
        return Err(std::io::Error::other(format!("the copy has more than {MAX_COPY_ENTRIES} entries")));
    }
    let st = rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let same = |o: &rfs::Stat| o.st_dev == st.st_dev && o.st_ino == st.st_ino;
    let changed = || std::io::Error::other(format!("{} changed while it was copied", arc.display()));
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => {
            let target = rfs::readlinkat(parent, name, Vec::new())?;
            let mut h = header_of(&st, tar::EntryType::Symlink, 0);
            b.append_link(&mut h, arc, std::ffi::OsStr::from_bytes(target.as_bytes()))?;
            Ok(None)
        }
        FileType::Directory => {
            let fd = open_dir_beneath(parent, name)?;
            let st2 = rfs::fstat(&fd)?;
            if !same(&st2) {
                return Err(changed());
            }
            let mut h = header_of(&st2, tar::EntryType::Directory, 0);
            b.append_data(&mut h, arc, std::io::empty())?;
            let mut names = Vec::new();
            for e in rfs::Dir::read_from(&fd)? {
                let e = e?;
                let n = e.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(std::ffi::OsStr::from_bytes(n).to_os_string());
                }
            }
            names.sort();
            Ok(Some((fd, arc.to_path_buf(), names.into_iter())))
        }
        FileType::RegularFile => {
            let fd = rfs::openat(
                parent,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let st2 = rfs::fstat(&fd)?;
            if !same(&st2) || FileType::from_raw_mode(st2.st_mode) != FileType::RegularFile {
                return Err(changed());
            }
            let size = st2.st_size.max(0) as u64;
            let mut h = header_of(&st2, tar::EntryType::Regular, size);
            b.append_data(&mut h, arc, msb_images::tarstream::Exact::new(std::fs::File::from(fd), size))?;
            Ok(None)
        }
        _ => Ok(None), // FIFOs, sockets, device nodes: not copied
    }
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
        extract(&t[..], dir.path(), "top", MAX_COPY_BYTES).unwrap();
        assert_eq!(std::fs::read(dir.path().join("top/a")).unwrap(), b"data");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("top/a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7000, 0, "no setuid on the host");
        assert_eq!(std::fs::read_link(dir.path().join("top/l")).unwrap(), Path::new("/etc/passwd"));
        // A destination that does not exist takes the top entry's place.
        extract(&t[..], &dir.path().join("renamed"), "top", MAX_COPY_BYTES).unwrap();
        assert_eq!(std::fs::read(dir.path().join("renamed/a")).unwrap(), b"data");
    }

    #[test]
    fn hostile_copies_are_refused_and_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_of(&[("/abs", F, "", b"x")]), "absolute"),
            (tar_of(&[("top/../../victim", F, "", b"x")]), "`..`"),
            (tar_of(&[("top", D, "", b""), ("other", F, "", b"x")]), "top entry must be \"top\""),
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
            let e = extract(&t[..], dest.path(), "top", MAX_COPY_BYTES).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!victim.exists(), "{why}: wrote outside the destination");
        }
    }

    /// FS1 (review): `msb cp dev:/build/out.tar ~`: a guest answering with `.ssh/...`
    /// instead of `out.tar` writes nothing; the host names the top entry itself.
    #[test]
    fn the_guest_cannot_name_the_top_entry_of_a_copy_out() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".ssh")).unwrap();
        std::fs::write(home.path().join(".ssh/authorized_keys"), b"ssh-ed25519 AAAA user@laptop\n").unwrap();
        let t = tar_of(&[(".ssh", D, "", b""), (".ssh/authorized_keys", F, "", b"ssh-ed25519 EVIL attacker\n")]);
        let top = copy_top_name("/build/out.tar");
        assert_eq!(top, "out.tar");
        let e = extract(&t[..], home.path(), &top, MAX_COPY_BYTES).unwrap_err();
        assert!(e.contains("top entry must be \"out.tar\""), "{e}");
        let keys = std::fs::read_to_string(home.path().join(".ssh/authorized_keys")).unwrap();
        assert!(!keys.contains("EVIL"), "the guest chose what `msb cp` wrote");
        assert_eq!(copy_top_name("/"), "root");
        assert_eq!(copy_top_name("/a/b/"), "b");
        // The same refusal always reads the same (finding 17).
        let again = extract(&t[..], home.path(), &top, MAX_COPY_BYTES).unwrap_err();
        assert_eq!(e, again);
    }

    /// FS7: a copy out stops at its byte bound, naming it.
    #[test]
    fn a_copy_out_stops_at_its_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_of(&[("top", D, "", b""), ("top/a", F, "", &[1; 600]), ("top/b", F, "", &[2; 600])]);
        let e = extract(&t[..], dir.path(), "top", 1000).unwrap_err();
        assert!(e.contains("more than 1000 bytes"), "{e}");
        assert!(!dir.path().join("top/b").exists());
    }

    fn swapper(top: PathBuf) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let th = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    top.join("d"),
                    rustix::fs::CWD,
                    top.join("link"),
                    rustix::fs::RenameFlags::EXCHANGE,
                );
            }
        });
        (stop, th)
    }

    /// FS4 (review): a directory swapped for a symlink while the extractor runs (a guest
    /// flipping them with RENAME_EXCHANGE in a shared mount) is never written through
    /// (60 of 200 escaped before).
    #[test]
    fn a_swapped_ancestor_is_never_followed_by_the_extractor() {
        let base = tempfile::tempdir().unwrap();
        let dest = base.path().join("shared");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(dest.join("top/d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("top/link")).unwrap();
        let (stop, th) = swapper(dest.join("top"));
        let mut escaped = 0;
        for i in 0..200 {
            let name = format!("top/d/f{i}");
            let t = tar_of(&[("top", D, "", b""), (name.as_str(), F, "", b"written by the guest")]);
            let _ = extract(&t[..], &dest, "top", MAX_COPY_BYTES);
            if outside.join(format!("f{i}")).exists() {
                escaped += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        th.join().unwrap();
        assert_eq!(escaped, 0, "the extractor wrote through a swapped symlink");
    }

    /// FS4 (review): a copy in whose source directory a guest swaps for a symlink while it
    /// is packed never packs what the link names (23 of 300 leaked before).
    #[test]
    fn a_copy_in_never_packs_through_a_swapped_directory() {
        use std::io::Read as _;
        let base = tempfile::tempdir().unwrap();
        let src = base.path().join("shared");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), b"inside").unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), b"host secret").unwrap();
        std::os::unix::fs::symlink(&outside, src.join("link")).unwrap();
        let (stop, th) = swapper(src.clone());
        let (mut leaked, mut packed) = (0, 0);
        for _ in 0..300 {
            let mut t = Vec::new();
            if pack(&src, Path::new("shared"), &mut t).is_err() {
                continue;
            }
            packed += 1;
            let mut ar = tar::Archive::new(&t[..]);
            for e in ar.entries().unwrap() {
                let mut e = e.unwrap();
                let mut d = Vec::new();
                e.read_to_end(&mut d).unwrap();
                if d == b"host secret" {
                    leaked += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        th.join().unwrap();
        assert!(packed > 0, "some copies complete");
        assert_eq!(leaked, 0, "a copy in packed a file from outside the source");
    }

    /// A source tree deeper than MAX_PACK_DEPTH (a guest may build one in a shared
    /// directory) is refused with the reason, not followed until the stack runs out.
    #[test]
    fn a_copy_in_refuses_a_tree_deeper_than_its_bound() {
        let base = tempfile::tempdir().unwrap();
        let top = base.path().join("p");
        // Made relative to a held directory, one level at a time (paths this long would
        // pass PATH_MAX).
        let mut d = rfs::open(base.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for name in std::iter::once("p").chain(std::iter::repeat_n("d", MAX_PACK_DEPTH + 1)) {
            rfs::mkdirat(&d, name, Mode::RWXU).unwrap();
            d = open_dir_beneath(&d, name).unwrap();
        }
        let e = pack(&top, Path::new("p"), std::io::sink()).unwrap_err().to_string();
        assert!(e.contains("directories deep"), "{e}");
    }

    #[test]
    fn a_copy_in_packs_files_dirs_and_links_with_their_modes() {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let src = base.path().join("p");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/x"), b"data").unwrap();
        std::fs::set_permissions(src.join("sub/x"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("sub/x", src.join("l")).unwrap();
        let mut t = Vec::new();
        pack(&src, Path::new("p"), &mut t).unwrap();
        let mut ar = tar::Archive::new(&t[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let (name, kind, mode) =
                (e.path().unwrap().display().to_string(), e.header().entry_type(), e.header().mode().unwrap());
            let mut d = String::new();
            e.read_to_string(&mut d).unwrap();
            let link = e.link_name().unwrap().map(|l| l.display().to_string()).unwrap_or_default();
            seen.push(format!("{name} {kind:?} {mode:o} {d}{link}"));
        }
        assert_eq!(
            seen,
            vec!["p Directory 755 ", "p/l Symlink 777 sub/x", "p/sub Directory 755 ", "p/sub/x Regular 750 data"]
        );
    }

    #[test]
    fn entries_from_the_guest_are_parsed_into_checked_values() {
        let e = parse_entry(b"f 644 0 0 12 1700000000 612e747874", false).unwrap();
        assert_eq!(
            (e.name.as_str(), e.kind, e.mode, e.size, e.link_target),
            ("a.txt", FileKind::File, 0o644, 12, None)
        );
        let l = parse_entry(b"l 777 1000 1000 3 -5 6c 2f6574632f706173737764", false).unwrap();
        assert_eq!(
            (l.kind, l.uid, l.modified, l.link_target.as_deref()),
            (FileKind::Symlink, 1000, -5, Some("/etc/passwd"))
        );
        assert_eq!(parse_entry(b"d 755 0 0 4096 0 2f", true).unwrap().name, "/");
        for (bad, why) in [
            (&b"d 755 0 0 4096 0 2f"[..], "`/` as a listed name"),
            (b"f 644 0 0 1 0 2f2e2e", "a `/` in a name"),
            (b"f 644 0 0 1 0 2e2e", "`..`"),
            (b"f 644 0 0 1 0 2e", "`.`"),
            (b"f 644 0 0 1 0 6100", "NUL"),
            (b"f 644 0 0 1 0 ", "an empty name"),
            (b"f 644 0 0 1 0 6", "odd hex"),
            (b"f 644 0 0 1 0 6G", "bad hex"),
            (b"f 644 0 0 1 0 4A", "uppercase hex"),
            (b"f 17777 0 0 1 0 61", "a mode past 7777"),
            (b"f +644 0 0 1 0 61", "a signed mode"),
            (b"f 644 -1 0 1 0 61", "a negative uid"),
            (b"f 644 4294967296 0 1 0 61", "a uid past u32"),
            (b"f 644 0 0 +1 0 61", "a signed size"),
            (b"x 644 0 0 1 0 61", "an unknown kind"),
            (b"f 644 0 0 1 0 61 62", "a target on a file"),
            (b"l 777 0 0 1 0 61", "a symlink without target"),
            (b"f 644 0 0 1 61", "too few fields"),
            (b"f  644 0 0 1 0 61", "a double space"),
            (b"f 644 0 0 1 0 61\xff", "non-text"),
        ] {
            assert!(parse_entry(bad, false).is_err(), "accepted {why}");
        }
        let long = format!("f 644 0 0 1 0 {}", "61".repeat(256));
        assert!(parse_entry(long.as_bytes(), false).is_err(), "a 256-byte name");
    }

    #[test]
    fn write_chunks_are_framed_as_agentd_reads_them() {
        // The same layout agentd's write_frames test builds: length, bytes; empty ends.
        assert_eq!(frame(b"fi"), [2, 0, 0, 0, b'f', b'i']);
        assert_eq!(frame(&[]), [0, 0, 0, 0]);
        assert_eq!(frame(&vec![7; CHUNK])[..4], (CHUNK as u32).to_le_bytes());
    }

    #[test]
    fn guest_paths_must_be_absolute_without_nul_and_bounded() {
        assert!(guest_path("/work/a").is_ok());
        for bad in ["work/a", "", "/a\0b"] {
            assert!(matches!(guest_path(bad), Err(Error::Config(_))), "{bad:?}");
        }
        assert!(guest_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn exit_statuses_name_the_failure() {
        let e = outcome("reading", "/x", Some(ExecEvent::Exited(msb_protocol::ExitStatus::Code(2))), b"/x: gone\n");
        match e {
            Err(Error::File(f)) => assert_eq!((f.kind, f.reason.as_str()), (FileErrorKind::NotFound, "/x: gone")),
            other => panic!("{other:?}"),
        }
        assert!(outcome("reading", "/x", Some(ExecEvent::Exited(msb_protocol::ExitStatus::Code(0))), b"").is_ok());
        assert!(matches!(outcome("reading", "/x", None, b""), Err(Error::Wire(_))));
    }
}
