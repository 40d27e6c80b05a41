//! An image's root filesystem, built from its layers without extracting anything on the host.
//!
//! Design: the layers (hostile tar streams) are merged here, top layer first, into one
//! sanitized tar stream that `tar2sqfs` (squashfs-tools-ng) turns into a squashfs image: the
//! file system is written straight from the archive, so no host code creates a file, a
//! directory, a link, a setuid binary or a device node from an image entry, and no host root
//! is needed. Ownership, modes (setuid included), xattrs (file capabilities included),
//! symlinks and hardlinks are preserved inside the squashfs, where only the guest sees them.
//!
//! Merge rules (OCI image spec, layer changesets): an upper layer's entry hides the same path
//! in lower layers; `.wh.NAME` hides NAME and everything under it in lower layers;
//! `.wh..wh..opq` in a directory hides what lower layers put in it; an upper non-directory
//! hides what lower layers put below it, and an upper entry below a path makes that path a
//! directory for lower layers.
//!
//! Refused, with an error naming the layer and the entry: absolute paths, `..` components, NUL
//! bytes, an entry below a non-directory placed by an earlier entry of the same layer
//! (writing through a symlink), a non-directory at a path the layer already used as a
//! directory, the same path twice in one layer, hardlinks whose target escapes or is not a
//! regular file of the same layer, unknown entry types. Device nodes are dropped (not
//! materialized, counted). Bounds: [`MAX_ENTRIES`] entries and [`MAX_UNPACKED_BYTES`] of
//! decompressed data over all layers, [`MAX_PATH`] bytes and [`MAX_DEPTH`] components per
//! name. Each layer's decompressed stream must hash to its diff_id.
//!
//! Memory, whatever the layers: names and PAX headers are bounded before they are read
//! ([`crate::tarstream`]); every path is interned once as (parent id, component), so an entry
//! costs time and memory linear in its name's length, and the table holds at most
//! [`MAX_PATHS`] paths and [`MAX_NAME_BYTES`] of components (about 300 MiB at the very
//! worst; a 2,000-entry layer of 500-component names peaks at +132 MiB, a Debian image at a
//! few MiB). The merged stream is written with fresh headers: only the checked name and the
//! type, mode, owner, time and size every reader agrees on pass.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;
use crate::{Error, Result};

/// Most entries over all layers of an image.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Most decompressed bytes over all layers of an image (a decompression bomb stops here).
pub const MAX_UNPACKED_BYTES: u64 = 16 << 30;
/// Longest entry name or link target.
pub const MAX_PATH: usize = 4096;

/// One layer to merge: its compressed (or plain) tar blob and the digest of its tar.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: PathBuf,
    pub digest: Digest,
    pub diff_id: Digest,
}

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeStats {
    pub entries: u64,
    pub bytes: u64,
    pub devices_dropped: u64,
}

/// Hashes and counts what passes through, and stops a stream past the image's byte bound.
struct Counted<R> {
    inner: R,
    hash: Sha256,
    total: u64,
    before: u64,
    max: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.total += n as u64;
        if self.before + self.total > self.max {
            return Err(std::io::Error::other(format!(
                "the image unpacks to more than {} bytes (a decompression bomb?)",
                self.max
            )));
        }
        Ok(n)
    }
}

/// Opens a layer blob, decompressing gzip or zstd by their magic bytes (plain tar otherwise).
/// Every frame of a multi-frame zstd blob (RFC 8878 §3.1, as `pzstd` writes) is decoded;
/// skippable frames are skipped; bytes after the last frame that are no frame are refused.
fn open_layer(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&ZSTD_MAGIC) {
        Box::new(ZstdFrames { frame: None, rest: Some(r) })
    } else {
        Box::new(r)
    })
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

type Blob = BufReader<std::fs::File>;

/// A frame's decoder: the magic read ahead of it, then the blob.
type Frame =
    ruzstd::decoding::StreamingDecoder<std::io::Chain<std::io::Cursor<[u8; 4]>, Blob>, ruzstd::decoding::FrameDecoder>;

/// Decodes zstd frames one after another until the blob ends.
struct ZstdFrames {
    frame: Option<Frame>,
    rest: Option<Blob>,
}

impl Read for ZstdFrames {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(f) = &mut self.frame {
                let n = f.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.rest = self.frame.take().map(|f| f.into_inner().into_inner().1);
            }
            let Some(mut r) = self.rest.take() else { return Ok(0) };
            if r.fill_buf()?.is_empty() {
                return Ok(0);
            }
            // The next frame's magic, read whole (a buffer may end inside it).
            let mut magic = [0u8; 4];
            r.read_exact(&mut magic).map_err(|_| std::io::Error::other("trailing bytes after the last zstd frame"))?;
            if magic == ZSTD_MAGIC {
                let again = std::io::Cursor::new(magic).chain(r);
                self.frame = Some(ruzstd::decoding::StreamingDecoder::new(again).map_err(std::io::Error::other)?);
            } else if (0x184D_2A50..=0x184D_2A5F).contains(&u32::from_le_bytes(magic)) {
                // A skippable frame: magic, a 4-byte length, that many bytes.
                let mut len = [0u8; 4];
                r.read_exact(&mut len)?;
                let len = u64::from(u32::from_le_bytes(len));
                let skipped = std::io::copy(&mut (&mut r).take(len), &mut std::io::sink())?;
                if skipped != len {
                    return Err(std::io::Error::other("a skippable zstd frame is cut short"));
                }
                self.rest = Some(r);
            } else {
                return Err(std::io::Error::other("bytes after the last zstd frame are not a zstd frame"));
            }
        }
    }
}

/// Checks an entry name: relative, no `..`, no NUL, at most [`MAX_PATH`] bytes. Returns it
/// without `./` prefixes, empty components or a trailing slash ("" is the root).
pub fn normalize(raw: &[u8]) -> std::result::Result<String, String> {
    if raw.len() > MAX_PATH {
        return Err(format!("a name of {} bytes is longer than {MAX_PATH}", raw.len()));
    }
    if raw.contains(&0) {
        return Err("the name contains a NUL byte".into());
    }
    let s = std::str::from_utf8(raw).map_err(|_| "the name is not UTF-8".to_string())?;
    if s.starts_with('/') {
        return Err("the name is absolute".into());
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("the name has a `..` component".into()),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Most components in an entry name of an image (deeper names are refused).
pub const MAX_DEPTH: usize = 512;
/// Most distinct paths (and path prefixes) the merge keeps track of over all layers.
pub const MAX_PATHS: usize = 2 * MAX_ENTRIES as usize;
/// Most bytes of name components the merge keeps over all layers.
pub const MAX_NAME_BYTES: usize = 128 << 20;

/// Every path the merge has seen, interned: id 0 is the root, and each other path is its
/// parent's id and its last component. An entry costs time and memory linear in the length
/// of its name, and the whole table stays under [`MAX_PATHS`] ids and [`MAX_NAME_BYTES`].
struct Paths {
    ids: HashMap<(u32, Box<str>), u32>,
    name_bytes: usize,
}

impl Paths {
    fn new() -> Paths {
        Paths { ids: HashMap::new(), name_bytes: 0 }
    }

    /// The ids of the root, each ancestor of `path` and `path` itself ("" is the root alone).
    fn chain(&mut self, path: &str) -> std::result::Result<Vec<u32>, String> {
        let mut chain = vec![0u32];
        if path.is_empty() {
            return Ok(chain);
        }
        for c in path.split('/') {
            if chain.len() > MAX_DEPTH {
                return Err(format!("the name has more than {MAX_DEPTH} components"));
            }
            let parent = *chain.last().expect("the root");
            let next = self.ids.len() as u32 + 1;
            let id = match self.ids.get(&(parent, Box::from(c))) {
                Some(&id) => id,
                None => {
                    if self.ids.len() >= MAX_PATHS || self.name_bytes + c.len() > MAX_NAME_BYTES {
                        return Err(format!(
                            "the image names more than {MAX_PATHS} paths or {MAX_NAME_BYTES} bytes of names"
                        ));
                    }
                    self.name_bytes += c.len();
                    self.ids.insert((parent, Box::from(c)), next);
                    next
                }
            };
            chain.push(id);
        }
        Ok(chain)
    }

    /// The id of `path` if the merge has seen it.
    fn find(&self, path: &str) -> Option<u32> {
        let mut id = 0u32;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            id = *self.ids.get(&(id, Box::from(c)))?;
        }
        Some(id)
    }
}

#[derive(Default)]
struct Merged {
    /// Paths emitted (by an upper layer): lower layers' entries there are hidden.
    seen: HashSet<u32>,
    /// Paths upper layers made directories (ancestors of their entries).
    dirs: HashSet<u32>,
    /// Whiteouts: the path and everything below it are hidden in lower layers.
    gone: HashSet<u32>,
    /// Opaque directories (the root included) and upper non-directories: what is below is
    /// hidden.
    covered: HashSet<u32>,
    stats: MergeStats,
    max_entries: u64,
}

impl Merged {
    /// Whether upper layers hid `chain`'s path (its last id) from lower ones.
    fn hidden(&self, chain: &[u32]) -> bool {
        let (path, ancestors) = chain.split_last().expect("a chain has the root");
        self.gone.contains(path) || ancestors.iter().any(|a| self.gone.contains(a) || self.covered.contains(a))
    }
}

/// Merges `layers` (bottom first, as in a manifest) into one tar stream on `out`.
pub fn merge<W: Write>(layers: &[Layer], out: W) -> Result<MergeStats> {
    merge_within(layers, out, MAX_ENTRIES, MAX_UNPACKED_BYTES)
}

/// [`merge`] with other bounds (tests use small ones).
pub fn merge_within<W: Write>(layers: &[Layer], out: W, max_entries: u64, max_bytes: u64) -> Result<MergeStats> {
    let mut m = Merged { max_entries, ..Merged::default() };
    let mut paths = Paths::new();
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    for (index, layer) in layers.iter().enumerate().rev() {
        let fail_layer = |why: String| Error::Layer { layer: index, digest: layer.digest.clone(), entry: None, why };
        let reader = open_layer(&layer.blob).map_err(|e| fail_layer(format!("cannot open: {e}")))?;
        let mut counted =
            Counted { inner: reader, hash: Sha256::new(), total: 0, before: m.stats.bytes, max: max_bytes };
        merge_layer(&mut m, &mut paths, &mut b, index, layer, &mut counted)?;
        // The tar's trailing blocks and padding count towards the diff_id too.
        std::io::copy(&mut counted, &mut std::io::sink()).map_err(|e| fail_layer(format!("reading: {e}")))?;
        let got = Digest::from_hasher(counted.hash);
        if got != layer.diff_id {
            return Err(fail_layer(format!(
                "its content hashes to {got}, but the image config says {}",
                layer.diff_id
            )));
        }
        m.stats.bytes += counted.total;
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(|e| Error::Tool(format!("writing the merged tar: {e}")))?;
    Ok(m.stats)
}

fn merge_layer<W: Write, R: Read>(
    m: &mut Merged,
    paths: &mut Paths,
    b: &mut tar::Builder<W>,
    index: usize,
    layer: &Layer,
    input: &mut R,
) -> Result<()> {
    let err = |entry: Option<&str>, why: String| Error::Layer {
        layer: index,
        digest: layer.digest.clone(),
        entry: entry.map(String::from),
        why,
    };
    let mut ar = tar::Archive::new(input);
    let (mut names, mut nondirs, mut parents, mut regulars) =
        (HashSet::new(), HashSet::new(), HashSet::<u32>::new(), HashSet::new());
    let (mut gone, mut covered) = (Vec::new(), Vec::new());
    let mut members =
        crate::tarstream::Members::new(&mut ar).map_err(|e| err(None, format!("not a tar archive: {e}")))?;
    loop {
        let (meta, mut e) = match members.next_member() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => return Err(err(None, format!("unreadable entry: {e}"))),
        };
        m.stats.entries += 1;
        if m.stats.entries > m.max_entries {
            return Err(err(None, format!("the image has more than {} entries", m.max_entries)));
        }
        let shown = String::from_utf8_lossy(&meta.path).chars().take(200).collect::<String>();
        let path = normalize(&meta.path).map_err(|why| err(Some(&shown), why))?;
        let kind = meta.kind;
        if path.is_empty() {
            continue; // the root directory: the squashfs root stays root:root 0755
        }
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        if let Some(target) = name.strip_prefix(".wh.") {
            if target == ".wh..opq" {
                covered.push(*paths.chain(dir).map_err(|why| err(Some(&shown), why))?.last().expect("root"));
            } else if target.is_empty() || target == "." || target == ".." {
                return Err(err(Some(&shown), "a whiteout without a name".into()));
            } else {
                let hidden = if dir.is_empty() { target.to_string() } else { format!("{dir}/{target}") };
                gone.push(*paths.chain(&hidden).map_err(|why| err(Some(&shown), why))?.last().expect("root"));
            }
            continue;
        }
        let chain = paths.chain(&path).map_err(|why| err(Some(&shown), why))?;
        let (&id, ancestors) = chain.split_last().expect("a chain has the root");
        if ancestors.iter().any(|a| nondirs.contains(a)) {
            return Err(err(Some(&shown), "it lies below a path this layer made a non-directory".into()));
        }
        if !names.insert(id) {
            return Err(err(Some(&shown), "the layer holds this path twice".into()));
        }
        let is_dir = kind == tar::EntryType::Directory;
        if !is_dir && parents.contains(&id) {
            return Err(err(Some(&shown), "the layer already used this path as a directory".into()));
        }
        // Nearest first: once one is known, all above it are too (each entry costs O(new)).
        for a in ancestors.iter().rev() {
            if !parents.insert(*a) {
                break;
            }
        }
        if !is_dir {
            nondirs.insert(id);
        }
        if m.hidden(&chain) || m.seen.contains(&id) || (!is_dir && m.dirs.contains(&id)) {
            continue; // an upper layer decided this path
        }
        // A fresh header: only what was checked (the name) and what every reader agrees on
        // (type, mode, owner, time, size: PAX values first) reach the merged stream.
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(0);
        let emit = |b: &mut tar::Builder<W>| -> std::io::Result<()> {
            if !meta.xattrs.is_empty() {
                b.append_pax_extensions(meta.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
            }
            Ok(())
        };
        let io = |e: std::io::Error| err(Some(&shown), format!("{e}"));
        match kind {
            tar::EntryType::Directory | tar::EntryType::Fifo => {
                header.set_entry_type(kind);
                emit(b).map_err(io)?;
                b.append_data(&mut header, &path, std::io::empty()).map_err(io)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(meta.size);
                emit(b).map_err(io)?;
                b.append_data(&mut header, &path, crate::tarstream::Exact::new(&mut e, meta.size)).map_err(io)?;
                regulars.insert(id);
            }
            tar::EntryType::Symlink => {
                let target = &meta.link;
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(err(Some(&shown), "a symlink with an empty, overlong or NUL target".into()));
                }
                let target = std::str::from_utf8(target)
                    .map_err(|_| err(Some(&shown), "the symlink target is not UTF-8".into()))?
                    .to_string();
                header.set_entry_type(tar::EntryType::Symlink);
                emit(b).map_err(io)?;
                b.append_link(&mut header, &path, &target).map_err(io)?;
            }
            tar::EntryType::Link => {
                let target =
                    normalize(&meta.link).map_err(|why| err(Some(&shown), format!("hardlink target: {why}")))?;
                if !paths.find(&target).is_some_and(|t| regulars.contains(&t)) {
                    return Err(err(
                        Some(&shown),
                        format!("a hardlink to {target}, which is not a regular file of this layer"),
                    ));
                }
                header.set_entry_type(tar::EntryType::Link);
                emit(b).map_err(io)?;
                b.append_link(&mut header, &path, &target).map_err(io)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                m.stats.devices_dropped += 1;
                continue;
            }
            other => return Err(err(Some(&shown), format!("unsupported entry type {other:?}"))),
        }
        m.seen.insert(id);
    }
    // What this layer decided applies to the layers below it.
    m.gone.extend(gone);
    m.covered.extend(covered);
    m.covered.extend(nondirs);
    m.dirs.extend(parents);
    Ok(())
}

/// Builds the squashfs root filesystem of `layers` at `dest` (zstd level 6: for the default
/// image, 175 MB of files, level 15, the tool's default, took 50.5 s for 50.8 MB, level 6
/// 3.8 s for 54.9 MB): the merged stream is written
/// to `tar2sqfs` as `staging/name` (a private directory, a name no other writer uses) and
/// the result renamed into place, so
/// `dest` never exists half-written.
pub fn build(layers: &[Layer], staging: &Path, dest: &Path, name: &str) -> Result<MergeStats> {
    let tmp = staging.join(name);
    let tool = which("tar2sqfs").ok_or_else(|| {
        Error::Tool(
            "tar2sqfs (Debian package squashfs-tools-ng) is not installed; it builds image root filesystems".into(),
        )
    })?;
    let mut child = std::process::Command::new(tool)
        .args(["-q", "-f", "-s", "-c", "zstd", "-X", "level=6", "-j", "2"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool(format!("starting tar2sqfs: {e}")))?;
    let stdin = child.stdin.take().expect("piped");
    let merged = merge(layers, std::io::BufWriter::with_capacity(1 << 20, stdin));
    let out = child.wait_with_output().map_err(|e| Error::Tool(format!("waiting for tar2sqfs: {e}")))?;
    let stats = match merged {
        Ok(s) if out.status.success() => s,
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Tool(format!("tar2sqfs failed: {}", why.trim().chars().take(500).collect::<String>())));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dest).map_err(|source| Error::Io { what: "publishing", path: dest.to_path_buf(), source })?;
    Ok(stats)
}

/// Creates a sparse writable disk of `bytes` at `path` (mode 0600) with an empty ext4 file
/// system on it (`mke2fs`, which only ever writes that file). Fails if `path` exists.
pub fn create_writable_disk(path: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if bytes < MIN_DISK_BYTES {
        return Err(Error::Tool(format!("a root disk of {bytes} bytes is smaller than {MIN_DISK_BYTES}")));
    }
    let io = |what: &'static str| move |source| Error::Io { what, path: path.to_path_buf(), source };
    let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io("creating"))?;
    f.set_len(bytes).map_err(io("sizing"))?;
    drop(f);
    let tool = which("mke2fs").ok_or_else(|| {
        Error::Tool("mke2fs (Debian package e2fsprogs) is not installed; it formats sandbox root disks".into())
    })?;
    let out = std::process::Command::new(tool)
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(|e| Error::Tool(format!("starting mke2fs: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Tool(format!("mke2fs failed: {}", why.trim().chars().take(500).collect::<String>())));
    }
    Ok(())
}

/// Smallest writable disk.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

/// Finds a tool on `PATH` or in the sbin directories.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_relative_and_never_climb() {
        assert_eq!(normalize(b"./a//b/").unwrap(), "a/b");
        assert_eq!(normalize(b"./").unwrap(), "");
        for bad in [&b"/etc/passwd"[..], b"a/../../x", b"..", b"a/\0b"] {
            assert!(normalize(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(normalize(&vec![b'a'; MAX_PATH + 1]).is_err());
    }

    /// A test entry: name, type, link target, content, mode.
    type E = (String, tar::EntryType, String, Vec<u8>, u32);

    /// A raw tar entry: any name (even one the tar crate refuses to write), any type.
    fn raw(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn f(name: &str, data: &[u8]) -> E {
        (name.into(), tar::EntryType::Regular, String::new(), data.to_vec(), 0o644)
    }
    fn d(name: &str) -> E {
        (name.into(), tar::EntryType::Directory, String::new(), Vec::new(), 0o755)
    }
    fn l(name: &str, kind: tar::EntryType, target: &str) -> E {
        (name.into(), kind, target.into(), Vec::new(), 0o777)
    }

    /// Writes a layer (gzip-compressed when `gz`) into `dir`; returns it with its true diff_id.
    fn layer(dir: &Path, n: usize, entries: &[E], gz: bool) -> Layer {
        let mut tar = Vec::new();
        for (name, kind, link, data, mode) in entries {
            raw(&mut tar, name, *kind, link, data, *mode);
        }
        tar.extend_from_slice(&[0u8; 1024]);
        let diff_id = Digest::of(&tar);
        let bytes = if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        } else {
            tar
        };
        let blob = dir.join(format!("layer{n}"));
        std::fs::write(&blob, &bytes).unwrap();
        Layer { blob, digest: Digest::of(&bytes), diff_id }
    }

    /// The merged tree: path → (type, link target, content, mode).
    fn tree(layers: &[Layer]) -> std::collections::BTreeMap<String, (tar::EntryType, String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        merge(layers, &mut out).unwrap();
        let mut ar = tar::Archive::new(&out[..]);
        let mut t = std::collections::BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let link = e.link_name_bytes().map(|b| String::from_utf8(b.into_owned()).unwrap()).unwrap_or_default();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let h = e.header();
            t.insert(path, (h.entry_type(), link, data, h.mode().unwrap()));
        }
        t
    }

    fn refused(layers: &[Layer]) -> String {
        match merge(layers, std::io::sink()) {
            Err(e) => e.to_string(),
            Ok(s) => panic!("merged: {s:?}"),
        }
    }

    #[test]
    fn upper_layers_win_whiteouts_delete_and_opaque_dirs_hide() {
        let dir = tempfile::tempdir().unwrap();
        let base = layer(
            dir.path(),
            0,
            &[
                d("etc"),
                f("etc/keep", b"base"),
                f("etc/gone", b"x"),
                d("etc/sub"),
                f("etc/sub/deep", b"x"),
                d("opq"),
                f("opq/old", b"x"),
                f("replaced", b"old"),
                d("becomes-file"),
                f("becomes-file/child", b"x"),
                (String::from("bin/su"), tar::EntryType::Regular, String::new(), b"suid".to_vec(), 0o4755),
            ],
            true,
        );
        let top = layer(
            dir.path(),
            1,
            &[
                f("etc/.wh.gone", b""),
                f("etc/.wh.sub", b""),
                f("opq/.wh..wh..opq", b""),
                f("opq/new", b"n"),
                f("replaced", b"new"),
                f("becomes-file", b"file"),
            ],
            false,
        );
        let t = tree(&[base, top]);
        let names: Vec<_> = t.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec!["becomes-file", "bin/su", "etc", "etc/keep", "opq", "opq/new", "replaced"],
            "whiteouts, opaque dirs and replaced directories hide what was below"
        );
        assert_eq!(t["replaced"].2, b"new");
        assert_eq!(t["becomes-file"].0, tar::EntryType::Regular);
        assert_eq!(t["bin/su"].3 & 0o7777, 0o4755, "setuid is kept (inside the image)");
    }

    #[test]
    fn escapes_and_bad_entries_are_refused_naming_layer_and_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<E>, &str)> = vec![
            (vec![f("/etc/passwd", b"x")], "absolute"),
            (vec![f("a/../../x", b"x")], "`..`"),
            (vec![l("link", tar::EntryType::Symlink, "/etc"), f("link/passwd", b"x")], "non-directory"),
            (vec![f("a", b"x"), l("h", tar::EntryType::Link, "../../etc/shadow")], "hardlink target"),
            (vec![l("h", tar::EntryType::Link, "etc/shadow")], "not a regular file of this layer"),
            (vec![f("a", b"1"), f("a", b"2")], "twice"),
            (vec![f("d/x", b"1"), l("d", tar::EntryType::Symlink, "/")], "as a directory"),
        ];
        for (i, (entries, why)) in cases.into_iter().enumerate() {
            let e = refused(&[layer(dir.path(), i, &entries, false)]);
            assert!(e.contains(why) && e.contains("layer 0"), "{why}: {e}");
        }
    }

    #[test]
    fn device_nodes_are_dropped_and_links_kept() {
        let dir = tempfile::tempdir().unwrap();
        let lay = layer(
            dir.path(),
            0,
            &[
                l("dev-null", tar::EntryType::Char, ""),
                l("disk", tar::EntryType::Block, ""),
                f("a", b"data"),
                l("hard", tar::EntryType::Link, "a"),
                l("sym", tar::EntryType::Symlink, "/anywhere/at/all"),
            ],
            false,
        );
        let mut sink = Vec::new();
        let stats = merge(std::slice::from_ref(&lay), &mut sink).unwrap();
        assert_eq!(stats.devices_dropped, 2);
        let t = tree(&[lay]);
        assert_eq!(t.keys().map(String::as_str).collect::<Vec<_>>(), vec!["a", "hard", "sym"]);
        assert_eq!((t["hard"].0, t["hard"].1.as_str()), (tar::EntryType::Link, "a"));
        assert_eq!(t["sym"].1, "/anywhere/at/all", "a symlink target is the guest's business");
    }

    #[test]
    fn a_wrong_diff_id_and_a_bomb_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut lay = layer(dir.path(), 0, &[f("a", b"x")], true);
        lay.diff_id = Digest::of(b"something else");
        assert!(refused(&[lay]).contains("hashes to"));
        let big = layer(dir.path(), 1, &[f("zeros", &vec![0u8; 1 << 20])], true);
        assert!(std::fs::metadata(&big.blob).unwrap().len() < 8192, "compresses well");
        let e = merge_within(&[big], std::io::sink(), MAX_ENTRIES, 256 * 1024).unwrap_err().to_string();
        assert!(e.contains("decompression bomb"), "{e}");
        let many: Vec<_> = (0..50).map(|i| f(&format!("f{i}"), b"")).collect();
        let many = layer(dir.path(), 2, &many, false);
        let e = merge_within(&[many], std::io::sink(), 10, MAX_UNPACKED_BYTES).unwrap_err().to_string();
        assert!(e.contains("more than 10 entries"), "{e}");
    }

    /// A zstd layer whose entries carry ownership, setuid, a file capability (pax
    /// SCHILY.xattr.security.capability), a hardlink and a symlink: the squashfs tar2sqfs
    /// builds from the merge holds every one of them, as `rdsquashfs` reads it back.
    #[test]
    fn a_zstd_layer_keeps_owners_setuid_capabilities_and_links_in_the_squashfs() {
        if which("tar2sqfs").is_none() || which("rdsquashfs").is_none() {
            panic!("tar2sqfs and rdsquashfs (squashfs-tools-ng; scripts/setup.sh installs it) are needed");
        }
        let dir = tempfile::tempdir().unwrap();
        let cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "bin", &b""[..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_size(4);
        b.append_data(&mut h, "bin/ping", &b"ping"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "bin/ping2", "bin/ping").unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "bin/p", "ping").unwrap();
        let tar = b.into_inner().unwrap();
        let bytes = ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
        assert_eq!(&bytes[..4], b"\x28\xb5\x2f\xfd", "a zstd frame");
        let blob = dir.path().join("layer");
        std::fs::write(&blob, &bytes).unwrap();
        let lay = Layer { blob, digest: Digest::of(&bytes), diff_id: Digest::of(&tar) };
        let dest = dir.path().join("root.sqfs");
        build(&[lay], dir.path(), &dest, "staging").unwrap();
        let rd = |args: &[&str]| {
            let o = std::process::Command::new("rdsquashfs").args(args).arg(&dest).output().unwrap();
            assert!(o.status.success(), "rdsquashfs {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let st = rd(&["-s", "/bin/ping"]);
        let field = |name: &str| st.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        assert!(field("Access").contains("04755"), "setuid survived: {st}");
        assert!(field("UID").contains("1000") && field("GID").contains("1001"), "{st}");
        assert!(field("Hard link count").contains('2'), "the hardlink is one inode: {st}");
        let x = rd(&["-x", "/bin/ping"]);
        assert!(x.contains("security.capability"), "the file capability survived: {x:?}");
        assert!(rd(&["-s", "/bin/p"]).contains("ping"), "the symlink target survived");
        assert_eq!(rd(&["-c", "/bin/ping2"]), "ping");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "the staging file is gone");
    }

    #[test]
    fn paths_are_interned_by_component_and_bounded_in_depth() {
        let mut p = Paths::new();
        let a = p.chain("a/b/c").unwrap();
        assert_eq!(a.len(), 4, "the root, a, a/b, a/b/c");
        assert_eq!(p.chain("a/b").unwrap(), a[..3].to_vec(), "a prefix keeps its ids");
        assert_eq!(p.find("a/b/c"), Some(a[3]));
        assert_eq!(p.find("a/x"), None);
        assert_eq!(p.chain("").unwrap(), vec![0]);
        assert!(p.chain(&"d/".repeat(MAX_DEPTH + 1)).unwrap_err().contains("components"));
    }

    fn status_kb(key: &str) -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn names_of(out: &[u8]) -> Vec<String> {
        let mut ar = tar::Archive::new(out);
        ar.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap()).collect()
    }

    /// FS3 (review): deep distinct names cost memory and time linear in their length, and
    /// names deeper than MAX_DEPTH are refused: 48 entries of 2,040 components (a 1.2 KB
    /// gzip layer that took +198 MiB and 4.3 s before) are refused at once in little memory.
    #[test]
    fn deep_names_cost_linear_memory_and_are_bounded_in_depth() {
        let dir = tempfile::tempdir().unwrap();
        let build = |depth: usize, n: usize| {
            let deep = "a/".repeat(depth);
            let mut b = tar::Builder::new(Vec::new());
            for i in 0..n {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("{i:04}/{deep}f"), &[][..]).unwrap();
            }
            let tar = b.into_inner().unwrap();
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&tar).unwrap();
            (e.finish().unwrap(), tar)
        };
        let (gz, tar) = build(2040, 48);
        let p = dir.path().join("deep");
        std::fs::write(&p, &gz).unwrap();
        let lay = Layer { blob: p, digest: Digest::of(&gz), diff_id: Digest::of(&tar) };
        let e = merge(&[lay], std::io::sink()).unwrap_err().to_string();
        assert!(e.contains("components"), "{e}");
        // Within the depth bound: 2,000 entries of 500 components merge in bounded memory.
        let (gz, tar) = build(500, 2000);
        let p = dir.path().join("deep2");
        std::fs::write(&p, &gz).unwrap();
        let lay = Layer { blob: p, digest: Digest::of(&gz), diff_id: Digest::of(&tar) };
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = status_kb("VmRSS:");
        let t0 = std::time::Instant::now();
        let stats = merge(&[lay], std::io::sink()).unwrap();
        let grew = status_kb("VmHWM:").saturating_sub(before);
        eprintln!(
            "deep names: {} entries, gzip {} B, {:?}, peak RSS +{} MiB",
            stats.entries,
            gz.len(),
            t0.elapsed(),
            grew / 1024
        );
        assert_eq!(stats.entries, 2000);
        assert!(grew < 200 * 1024, "a {}-byte layer made the merge hold {} MiB", gz.len(), grew / 1024);
    }

    /// FS3 (review): a GNU long name is refused from its header, before it is read: a ~9 KB
    /// zstd layer naming one 256 MiB long name (it took +768 MiB before) costs nothing.
    #[test]
    fn a_long_name_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let blob = crate::testkit::zstd_long_name(256 << 20);
        let p = dir.path().join("longname");
        std::fs::write(&p, &blob).unwrap();
        let lay = Layer { blob: p, digest: Digest::of(&blob), diff_id: Digest::of(b"unknown") };
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = status_kb("VmRSS:");
        let e = merge(&[lay], std::io::sink()).unwrap_err().to_string();
        let grew = status_kb("VmHWM:").saturating_sub(before);
        assert!(e.contains("long name of 268435456 bytes"), "{e}");
        assert!(
            grew < 16 * 1024,
            "a {}-byte layer made the merge hold {} MiB before refusing it",
            blob.len(),
            grew / 1024
        );
    }

    /// FS8 (review): a ustar `prefix` is part of the checked name, and the merged stream
    /// names exactly what was checked (a fresh header, never the input's name fields).
    #[test]
    fn the_merged_stream_names_what_was_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = tar::Header::new_ustar();
        h.as_ustar_mut().unwrap().prefix[..3].copy_from_slice(b"etc");
        h.as_ustar_mut().unwrap().name[..6].copy_from_slice(b"passwd");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(b"x");
        tar.resize(1024, 0);
        tar.extend_from_slice(&[0u8; 1024]);
        let p = dir.path().join("prefix");
        std::fs::write(&p, &tar).unwrap();
        let lay = Layer { blob: p, digest: Digest::of(&tar), diff_id: Digest::of(&tar) };
        let mut out = Vec::new();
        merge(&[lay], &mut out).unwrap();
        assert_eq!(names_of(&out), vec!["etc/passwd"]);
    }

    /// FS9 (review): `.wh..wh..opq` at the top of a layer hides every lower layer.
    #[test]
    fn an_opaque_marker_at_the_layer_root_hides_the_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let lower = layer(dir.path(), 0, &[f("old", b"lower"), d("etc"), f("etc/x", b"")], false);
        let upper = layer(dir.path(), 1, &[f(".wh..wh..opq", b""), f("new", b"upper")], false);
        let mut out = Vec::new();
        merge(&[lower, upper], &mut out).unwrap();
        assert_eq!(names_of(&out), vec!["new"]);
    }

    /// A frame boundary that falls inside the last bytes of the reader's buffer (256 KiB)
    /// is read like any other: the next magic is read whole, not peeked.
    #[test]
    fn a_zstd_frame_ending_where_the_buffer_does_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        raw(&mut tar, "big", tar::EntryType::Regular, "", &vec![7u8; 300_000], 0o644);
        tar.extend_from_slice(&[0u8; 1024]);
        // Frame 1: header (6) + two raw blocks (3 + 131,072 and 3 + 131,058): 262,142 bytes,
        // two short of the buffer's end; frame 2 the rest.
        let (a, rest) = tar.split_at(131_072);
        let (b, rest) = rest.split_at(131_058);
        let mut blob = crate::testkit::zstd_blocks(&[(false, a, 0), (false, b, 0)]);
        assert_eq!(blob.len(), 262_142);
        blob.extend(crate::testkit::zstd_blocks(&[(false, rest, 0)]));
        let p = dir.path().join("edge");
        std::fs::write(&p, &blob).unwrap();
        let lay = Layer { blob: p, digest: Digest::of(&blob), diff_id: Digest::of(&tar) };
        let mut out = Vec::new();
        merge(std::slice::from_ref(&lay), &mut out).unwrap();
        assert_eq!(names_of(&out), vec!["big"]);
    }

    /// FS10 (review): every frame of a multi-frame zstd layer is read (skippable frames
    /// skipped), and bytes after the last frame that are no frame are refused.
    #[test]
    fn a_multi_frame_zstd_layer_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        raw(&mut tar, "a", tar::EntryType::Regular, "", b"first", 0o644);
        let cut = tar.len();
        raw(&mut tar, "b", tar::EntryType::Regular, "", b"second", 0o644);
        tar.extend_from_slice(&[0u8; 1024]);
        let z = |b: &[u8]| ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest);
        let mut blob = z(&tar[..cut]);
        blob.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]); // skippable
        blob.extend(z(&tar[cut..]));
        let p = dir.path().join("frames");
        std::fs::write(&p, &blob).unwrap();
        let lay = Layer { blob: p.clone(), digest: Digest::of(&blob), diff_id: Digest::of(&tar) };
        let mut out = Vec::new();
        merge(std::slice::from_ref(&lay), &mut out).unwrap();
        assert_eq!(names_of(&out), vec!["a", "b"]);
        blob.extend_from_slice(b"junk");
        std::fs::write(&p, &blob).unwrap();
        let e = merge(&[lay], std::io::sink()).unwrap_err().to_string();
        assert!(e.contains("not a zstd frame"), "{e}");
    }
}
