//! File operations inside the guest, for `msb cp` and the SDK's file API: agentd re-executed
//! as an ordinary command
//! (`/proc/self/exe --msb-files MODE PATH`, so it works in any image, with no tool of the
//! image's own), run by the host through the exec channel and so under the same per-session
//! flow control, user and timeout as any command. Paths are the guest's: they are resolved
//! in the guest, as the exec's user.
//!
//! Modes: `tar PATH` writes a tar of PATH (a file, or a directory and everything below it,
//! symlinks as symlinks) to stdout, its top entry named after PATH's last component;
//! `untar PATH` reads such a tar from stdin and puts its top entry at PATH, or inside PATH
//! when PATH is an existing directory (docker cp's rule). Exit status 0, or 1 with the
//! reason on stderr.
//!
//! The SDK's other modes: `cat PATH` (a regular file's bytes to stdout), `write PATH MODE`
//! (stdin into a new file beside PATH, synced, then renamed onto PATH, so a reader never
//! sees half a file and a failed write leaves the old one; stdin is [`write_frames`]: chunks
//! each after its length, ended by an empty one, so that input which stops without that end
//! — a client that went away — is never committed), `ls PATH` and `stat PATH`
//! (one [`entry_line`] per entry; `ls` stops after [`MAX_LIST`]), `mkdir PATH 0|1`
//! (1: with parents, existing is fine), `rm PATH 0|1` (1: a directory with everything
//! below it), `mv FROM TO` (rename(2)). Failures exit with a status naming the kind
//! ([`status_of`]): the host maps it to a typed error.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// The flag that selects this mode.
pub const FLAG: &str = "--msb-files";

/// Most entries `ls` reports; the host refuses a longer listing.
pub const MAX_LIST: usize = 100_000;

/// A failure: the exit status that names its kind, and the text for stderr.
#[derive(Debug)]
struct Failure(i32, String);

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(1, s)
    }
}

/// The exit status for an I/O error's kind (the host's `FileErrorKind` reads it back):
/// 2 not found, 3 exists, 4 not a directory, 5 is a directory, 6 permission denied,
/// 7 directory not empty, 1 anything else.
pub fn status_of(e: &std::io::Error) -> i32 {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => 2,
        K::AlreadyExists => 3,
        K::NotADirectory => 4,
        K::IsADirectory => 5,
        K::PermissionDenied => 6,
        K::DirectoryNotEmpty => 7,
        _ => 1,
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure(status_of(&e), format!("{}: {e}", path.display()))
}

pub fn main(args: &[String]) -> ! {
    let out = || std::io::stdout().lock();
    let flag = |s: &str| match s {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(Failure(1, format!("{s}: expected 0 or 1"))),
    };
    let r = match args {
        [mode, path] if mode == "tar" => pack(Path::new(path), out()).map_err(Failure::from),
        [mode, path] if mode == "untar" => unpack(std::io::stdin().lock(), Path::new(path)).map_err(Failure::from),
        [mode, path] if mode == "cat" => cat(Path::new(path), out()),
        [mode, path, perm] if mode == "write" => match u32::from_str_radix(perm, 8) {
            Ok(perm) if perm <= 0o7777 => write(std::io::stdin().lock(), Path::new(path), perm),
            _ => Err(Failure(1, format!("{perm}: not an octal mode"))),
        },
        [mode, path] if mode == "ls" => list(Path::new(path), out()),
        [mode, path] if mode == "stat" => stat(Path::new(path), out()),
        [mode, path, p] if mode == "mkdir" => flag(p).and_then(|p| mkdir(Path::new(path), p)),
        [mode, path, r] if mode == "rm" => flag(r).and_then(|r| remove(Path::new(path), r)),
        [mode, from, to] if mode == "mv" => {
            std::fs::rename(from, to).map_err(|e| Failure(status_of(&e), format!("{from} -> {to}: {e}")))
        }
        _ => Err(Failure(
            1,
            format!("usage: {FLAG} tar|untar|cat|ls|stat PATH, write PATH MODE, mkdir|rm PATH 0|1, mv FROM TO"),
        )),
    };
    match r {
        Ok(()) => std::process::exit(0),
        Err(Failure(code, e)) => {
            eprintln!("{e}");
            std::process::exit(code)
        }
    }
}

fn cat(path: &Path, mut out: impl Write) -> Result<(), Failure> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let md = f.metadata().map_err(io(path))?;
    if md.is_dir() {
        return Err(Failure(5, format!("{}: is a directory", path.display())));
    }
    if !md.is_file() {
        return Err(Failure(1, format!("{}: not a regular file", path.display())));
    }
    std::io::copy(&mut f, &mut out).map_err(io(path))?;
    out.flush().map_err(io(path))
}

/// Largest chunk of a framed write.
pub const MAX_WRITE_FRAME: usize = 1 << 20;

/// Copies framed input (`u32` little-endian length, then that many bytes; a zero length
/// ends it) to `out`. Input that ends without the zero length is an abandoned write.
pub fn write_frames(input: &mut impl Read, out: &mut impl Write) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => std::io::Error::other("the write was abandoned before its end"),
            _ => e,
        })?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            return Ok(());
        }
        if len > MAX_WRITE_FRAME {
            return Err(std::io::Error::other(format!("a write chunk of {len} bytes (at most {MAX_WRITE_FRAME})")));
        }
        buf.resize(len, 0);
        input.read_exact(&mut buf)?;
        out.write_all(&buf)?;
    }
}

/// Writes framed stdin to a fresh file beside `path`, syncs it and renames it onto `path`.
fn write(mut input: impl Read, path: &Path, perm: u32) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.is_dir() {
        return Err(Failure(5, format!("{}: is a directory", path.display())));
    }
    let name = path.file_name().ok_or_else(|| Failure(1, format!("{}: names no file", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".msb-write-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(perm).open(&tmp).map_err(io(path))?;
    let r = (|| {
        write_frames(&mut input, &mut f)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(perm))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io(path))
}

/// One entry: `KIND MODE UID GID SIZE MTIME NAME [TARGET]`, kind `f` `d` `l` or `o`, mode in
/// octal (permission bits), mtime in seconds since the epoch (negative before it), the name
/// and a symlink's target in lowercase hex (any byte survives).
pub fn entry_line(name: &[u8], md: &std::fs::Metadata, target: Option<&[u8]>) -> String {
    use std::os::unix::fs::MetadataExt;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        'f'
    } else if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else {
        'o'
    };
    let mut line =
        format!("{kind} {:o} {} {} {} {} {}", md.mode() & 0o7777, md.uid(), md.gid(), md.size(), md.mtime(), hex(name));
    if let Some(t) = target {
        line.push(' ');
        line.push_str(&hex(t));
    }
    line.push('\n');
    line
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn describe(path: &Path, name: &[u8]) -> Result<String, Failure> {
    use std::os::unix::ffi::OsStrExt;
    let md = std::fs::symlink_metadata(path).map_err(io(path))?;
    let target = if md.file_type().is_symlink() { Some(std::fs::read_link(path).map_err(io(path))?) } else { None };
    Ok(entry_line(name, &md, target.as_ref().map(|t| t.as_os_str().as_bytes())))
}

fn stat(path: &Path, mut out: impl Write) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let name = path.file_name().map(|n| n.as_bytes()).unwrap_or(b"/");
    let line = describe(path, name)?;
    out.write_all(line.as_bytes()).and_then(|_| out.flush()).map_err(io(path))
}

/// A directory's entries (not `.` and `..`), in the order the file system gives them.
fn list(path: &Path, out: impl Write) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = std::io::BufWriter::new(out);
    let dir = std::fs::read_dir(path).map_err(io(path))?;
    for (n, entry) in dir.enumerate() {
        if n == MAX_LIST {
            return Err(Failure(1, format!("{}: more than {MAX_LIST} entries", path.display())));
        }
        let entry = entry.map_err(io(path))?;
        let line = match describe(&entry.path(), entry.file_name().as_bytes()) {
            Ok(l) => l,
            // Gone since the directory was read: not an entry any more.
            Err(Failure(2, _)) => continue,
            Err(f) => return Err(f),
        };
        out.write_all(line.as_bytes()).map_err(io(path))?;
    }
    out.flush().map_err(io(path))
}

fn mkdir(path: &Path, parents: bool) -> Result<(), Failure> {
    let r = if parents { std::fs::create_dir_all(path) } else { std::fs::create_dir(path) };
    r.map_err(io(path))
}

fn remove(path: &Path, recursive: bool) -> Result<(), Failure> {
    if path.parent().is_none() {
        return Err(Failure(1, "refusing to remove /".into()));
    }
    let md = std::fs::symlink_metadata(path).map_err(io(path))?;
    let r = match (md.is_dir(), recursive) {
        (true, true) => std::fs::remove_dir_all(path),
        (true, false) => std::fs::remove_dir(path),
        (false, _) => std::fs::remove_file(path),
    };
    r.map_err(io(path))
}

fn pack(path: &Path, out: impl Write) -> Result<(), String> {
    let shown = path.display();
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    let name = path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("root"));
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(256 * 1024, out));
    b.follow_symlinks(false);
    let r = if md.is_dir() { b.append_dir_all(&name, path) } else { b.append_path_with_name(path, &name) };
    r.and_then(|_| b.into_inner()).and_then(|mut w| w.flush()).map_err(|e| format!("{shown}: {e}"))
}

/// Where the top entry of the tar goes: inside `dest` if it is a directory, else at `dest`.
fn unpack(input: impl Read, dest: &Path) -> Result<(), String> {
    let into_dir = dest.is_dir();
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    let entries = ar.entries().map_err(|e| format!("reading the archive: {e}"))?;
    let mut top: Option<PathBuf> = None;
    for entry in entries {
        let mut e = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let path = e.path().map_err(|e| format!("an entry's name: {e}"))?.into_owned();
        let mut parts = path.components().filter(|c| !matches!(c, Component::CurDir));
        let Some(Component::Normal(first)) = parts.next() else {
            return Err(format!("entry {} is not relative", path.display()));
        };
        let first = PathBuf::from(first);
        if top.get_or_insert_with(|| first.clone()) != &first {
            return Err(format!("entry {} is outside the archive's top entry", path.display()));
        }
        let rest: Vec<Component> = parts.collect();
        if rest.iter().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("entry {} has `..` or an absolute part", path.display()));
        }
        let rest: PathBuf = rest.into_iter().collect();
        let target = match (into_dir, rest.as_os_str().is_empty()) {
            (true, _) => dest.join(&first).join(&rest),
            (false, true) => dest.to_path_buf(),
            (false, false) => dest.join(&rest),
        };
        let parent = target.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        e.unpack(&target).map_err(|err| format!("{}: {err}", target.display()))?;
    }
    if top.is_none() {
        return Err("the archive is empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("the host went away"))
        }
    }

    fn framed(chunks: &[&[u8]], end: bool) -> Vec<u8> {
        let mut v = Vec::new();
        for c in chunks {
            v.extend_from_slice(&(c.len() as u32).to_le_bytes());
            v.extend_from_slice(c);
        }
        if end {
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    #[test]
    fn a_write_replaces_the_file_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write(&framed(&[b"fi", b"rst"], true)[..], &p, 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o600);
        assert!(write(Broken, &p, 0o644).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"first", "a failed write leaves the old file");
        let e = write(&framed(&[b"abandoned"], false)[..], &p, 0o644).unwrap_err();
        assert!(e.1.contains("abandoned"), "{e:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"first", "input that stops without its end is not committed");
        let mut huge = framed(&[], false);
        huge.extend_from_slice(&(MAX_WRITE_FRAME as u32 + 1).to_le_bytes());
        assert!(write(&huge[..], &p, 0o644).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "and no temporary file");
        let x = framed(&[b"x"], true);
        let Err(Failure(code, _)) = write(&x[..], dir.path(), 0o644) else { panic!("wrote over a directory") };
        assert_eq!(code, 5);
        let Err(Failure(code, _)) = write(&x[..], &dir.path().join("no/such"), 0o644) else { panic!() };
        assert_eq!(code, 2);
    }

    #[test]
    fn listing_and_stat_lines_carry_names_in_hex() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a\nb"), b"12").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let mut out = Vec::new();
        list(dir.path(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines.len(), 2, "{text}");
        let f: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!((f[0], f[4], f[6]), ("f", "2", "610a62"), "{text}");
        assert!(lines[1].starts_with("l 777 ") && lines[1].ends_with(" 6c 2f6574632f706173737764"), "{text}");
        let mut out = Vec::new();
        stat(Path::new("/"), &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with("d "));
    }

    #[test]
    fn mkdir_rm_and_their_failures_name_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("x/y");
        assert_eq!(mkdir(&d, false).map_err(|f| f.0), Err(2));
        mkdir(&d, true).unwrap();
        mkdir(&d, true).unwrap();
        assert_eq!(mkdir(&d, false).map_err(|f| f.0), Err(3));
        assert_eq!(remove(&dir.path().join("x"), false).map_err(|f| f.0), Err(7));
        remove(&dir.path().join("x"), true).unwrap();
        assert!(!dir.path().join("x").exists());
        assert!(remove(Path::new("/"), true).is_err());
    }
}
