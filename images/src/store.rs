//! The local image store under `$MSB_HOME/images`:
//!
//! ```text
//! blobs/sha256/HEX     every blob (layer, config, manifest), by the digest of its bytes
//! refs/HEX.json        one image record per reference (HEX: the reference's bytes in hex)
//! rootfs/HEX.sqfs      the read-only root filesystem of an image, by its config digest
//! tmp/                 staging: nothing here is ever looked up
//! ```
//!
//! Invariants: a blob is hashed while it is written to `tmp/` and renamed to its digest only
//! after the hash is known (and matched what the archive claimed), so a blob file always
//! holds its digest's bytes and a killed load leaves nothing that looks complete; records
//! and root filesystems are written the same way; two loads of one image at once write the
//! same names with the same bytes. Every name under the store comes from a checked
//! [`Digest`] or is hex, never from an archive's entry names.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::oci::{self, Descriptor, Digest, ImageConfig, Index, Manifest, RunConfig, MAX_DOCUMENT};
use crate::rootfs::{self, Layer};
use crate::{Error, Result};

/// Most entries in an image archive (`msb load`).
pub const MAX_ARCHIVE_ENTRIES: u64 = 100_000;
/// Longest image reference.
pub const MAX_REFERENCE: usize = 255;
/// Age after which `prune` removes a staging file (left by a killed load or pull).
pub const STALE_STAGING_SECS: u64 = 3600;
/// Largest blob stored (a registry or archive that streams more is cut off here).
pub const MAX_BLOB_BYTES: u64 = 16 << 30;

/// One layer of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub reference: String,
    /// The image's identity: the digest of its config.
    pub config: Digest,
    pub manifest: Option<Digest>,
    pub layers: Vec<LayerRecord>,
    /// Sum of the layer blobs' sizes.
    pub size: u64,
    /// When it was loaded (seconds since the epoch).
    pub loaded: u64,
}

/// Checks an image reference (`name[:tag]`, docker's characters) and adds `:latest` when it
/// has no tag.
pub fn normalize_reference(r: &str) -> Result<String> {
    let bad = |why: &str| Error::Image(format!("image reference {r:?} {why}"));
    if r.is_empty() || r.len() > MAX_REFERENCE {
        return Err(bad(&format!("is not 1..={MAX_REFERENCE} characters")));
    }
    if !r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@[]".contains(&b)) {
        return Err(bad("has characters other than letters, digits and . _ - / : @"));
    }
    if r.starts_with(['.', '-', '/', ':']) {
        return Err(bad("must start with a letter or digit"));
    }
    check_grammar(r).map_err(|why| {
        bad(&format!("{why} (references are [HOST[:PORT]/]path/name[:TAG][@sha256:HEX], e.g. ghcr.io/org/app:1.2)"))
    })?;
    let last = r.rsplit('/').next().unwrap_or(r);
    Ok(if last.contains(':') || r.contains('@') { r.to_string() } else { format!("{r}:latest") })
}

/// Checks a reference against the distribution grammar (docker/distribution `reference`):
/// an optional registry host (a domain, an IPv4 address or a bracketed IPv6 one, with an
/// optional port), lowercase path components (alphanumeric runs joined by `.`, `_`, `__` or
/// dashes), an optional tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`) and an optional digest
/// (`ALGORITHM:HEX`, at least 32 hex digits). The reason comes back in words.
fn check_grammar(r: &str) -> std::result::Result<(), String> {
    let (name_tag, digest) = match r.split_once('@') {
        Some((a, d)) => (a, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let (alg, hex) = d.split_once(':').ok_or("has a digest that is not ALGORITHM:HEX")?;
        let alg_ok = !alg.is_empty()
            && alg
                .split(['+', '.', '_', '-'])
                .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        if !alg_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("has a malformed digest {d:?}"));
        }
    }
    let (name, tag) = match name_tag.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') && !t.contains(']') => (n, Some(t)),
        _ => (name_tag, None),
    };
    if let Some(t) = tag {
        let first_ok = t.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if t.len() > 128 || !first_ok || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Err(format!(
                "has a malformed tag {t:?} (1 to 128 of letters, digits, _ . -, not starting with . or -)"
            ));
        }
    }
    if name.len() > 255 {
        return Err("has a name longer than 255 characters".into());
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 && (parts[0].contains(['.', ':', '[']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        check_host(host)?;
    }
    for p in parts {
        check_path_component(p)?;
    }
    Ok(())
}

fn check_host(host: &str) -> std::result::Result<(), String> {
    let bad = || format!("has a malformed registry host {host:?}");
    let (h, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    if let Some(h) = h {
        let ok = h.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        });
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_path_component(c: &str) -> std::result::Result<(), String> {
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "has a repository path component {c:?} with capital letters: repository names are lowercase ({:?})",
            c.to_ascii_lowercase()
        ));
    }
    let bad = || {
        format!("has a malformed repository path component {c:?} (lowercase letters and digits, joined by one . or _, two _, or dashes)")
    };
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return Err(bad());
        }
    }
    Ok(())
}

pub struct Store {
    root: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A staging name no other writer uses.
fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl Store {
    /// Opens (creating, mode 0700) the store under `home`.
    pub fn open(home: &Path) -> Result<Self> {
        let root = home.join("images");
        for d in ["blobs/sha256", "refs", "rootfs", "tmp"] {
            let p = root.join(d);
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&p).map_err(|source| Error::Io {
                what: "creating",
                path: p.clone(),
                source,
            })?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob with digest `d` is stored (it may not be).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root.join("refs").join(format!("{}.json", hex(reference.as_bytes())))
    }

    /// The root filesystem path of an image (it may not be built yet).
    pub fn rootfs_path(&self, rec: &ImageRecord) -> PathBuf {
        self.rootfs_of(&rec.config)
    }

    /// The root filesystem path of the image with config digest `id`.
    pub fn rootfs_of(&self, id: &Digest) -> PathBuf {
        self.root.join("rootfs").join(format!("{}.sqfs", id.hex()))
    }

    /// Writes `r` into the store as a blob; if `expected` is given the bytes must hash to it.
    fn put_blob(&self, mut r: impl Read, expected: Option<&Digest>, what: &str) -> Result<(Digest, u64)> {
        if let Some(d) = expected {
            if self.blob_path(d).is_file() {
                // Already stored (and verified when it was): skip the copy, keep the bytes
                // flowing so an archive reader can go on.
                let n =
                    std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| Error::Image(format!("{what}: {e}")))?;
                return Ok((d.clone(), n));
            }
        }
        let tmp = self.root.join("tmp").join(unique("blob"));
        let io = |source| Error::Io { what: "writing", path: tmp.clone(), source };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        let copied: std::io::Result<()> = (|| loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                return Ok(());
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k])?;
            n += k as u64;
            if n > MAX_BLOB_BYTES {
                return Err(std::io::Error::other(format!("it is larger than {MAX_BLOB_BYTES} bytes")));
            }
        })();
        if let Err(e) = copied.and_then(|_| f.sync_data()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Image(format!("{what}: {e}")));
        }
        let got = Digest::from_hasher(h);
        if let Some(d) = expected {
            if &got != d {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Image(format!(
                    "{what} should have digest {d} but its content hashes to {got}: the archive is corrupt or was tampered with"
                )));
            }
        }
        let dest = self.blob_path(&got);
        std::fs::rename(&tmp, &dest).map_err(|source| Error::Io { what: "publishing", path: dest, source })?;
        Ok((got, n))
    }

    /// Whether the blob `d` is stored.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Stores a document already in memory under its digest `d` (checked).
    pub fn put_document(&self, bytes: &[u8], d: &Digest) -> Result<()> {
        self.put_blob(bytes, Some(d), &format!("document {d}")).map(|_| ())
    }

    /// Streams a blob that must hash to `d` into the store; returns how many bytes it read.
    pub fn put_verified(&self, r: impl Read, d: &Digest) -> Result<u64> {
        self.put_blob(r, Some(d), &format!("blob {d}")).map(|(_, n)| n)
    }

    /// Names `reference` the image whose top document (an index or a manifest) is the stored
    /// blob `top`; `fetch` stores the blobs it needs that are missing. The root filesystem is
    /// built before the name is recorded.
    pub fn load_documents(
        &self,
        top: &Digest,
        reference: &str,
        fetch: &dyn Fn(&Store, &Digest) -> Result<()>,
    ) -> Result<ImageRecord> {
        let size = std::fs::metadata(self.blob_path(top)).map(|m| m.len()).unwrap_or(0);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": top.as_str(), "size": size}]});
        let docs = HashMap::from([("index.json".to_string(), index.to_string().into_bytes())]);
        let mut recs = self.resolve(&docs, &HashMap::new(), Some(normalize_reference(reference)?), fetch)?;
        recs.pop().ok_or_else(|| Error::Image("the registry named no image".into()))
    }

    /// A stored document blob, re-hashed on reading.
    fn document(&self, d: &Digest, what: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        let f = std::fs::File::open(&p).map_err(|_| Error::Image(format!("{what} {d} is missing from the archive")))?;
        let mut bytes = Vec::new();
        f.take(MAX_DOCUMENT + 1).read_to_end(&mut bytes).map_err(|source| Error::Io {
            what: "reading",
            path: p,
            source,
        })?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(Error::Image(format!("{what} {d} is larger than {MAX_DOCUMENT} bytes")));
        }
        if &Digest::of(&bytes) != d {
            return Err(Error::Image(format!("stored {what} {d} does not match its digest")));
        }
        Ok(bytes)
    }

    /// Loads the images of an archive: an OCI image layout (a directory, or a tar of one)
    /// or a `docker save` tar; `-` reads the tar from stdin. `tag` names the image (the
    /// archive must then hold exactly one); otherwise the archive's own names are used.
    /// Each image's root filesystem is built before the image is named in the store.
    pub fn load(&self, input: &Path, tag: Option<&str>) -> Result<Vec<ImageRecord>> {
        let tag = tag.map(normalize_reference).transpose()?;
        let mut docs = HashMap::new();
        let mut files = HashMap::new();
        if input.is_dir() {
            for name in ["index.json", "manifest.json"] {
                if let Ok(b) = std::fs::read(input.join(name)) {
                    docs.insert(name.to_string(), b);
                }
            }
            let dir = input.to_path_buf();
            let fetch = |s: &Store, d: &Digest| -> Result<()> {
                let p = dir.join("blobs/sha256").join(d.hex());
                let f = std::fs::File::open(&p)
                    .map_err(|_| Error::Image(format!("blob {d} is not in {}", dir.display())))?;
                s.put_blob(f, Some(d), &format!("blob {d}")).map(|_| ())
            };
            self.resolve(&docs, &files, tag, &fetch)
        } else {
            let reader: Box<dyn Read> = if input == Path::new("-") {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::fs::File::open(input).map_err(|source| Error::Io {
                    what: "opening",
                    path: input.to_path_buf(),
                    source,
                })?)
            };
            self.import_tar(reader, &mut docs, &mut files)?;
            self.resolve(&docs, &files, tag, &|_, _| Ok(()))
        }
    }

    /// Streams every file of an archive into the store (blobs) or memory (documents).
    fn import_tar(
        &self,
        reader: impl Read,
        docs: &mut HashMap<String, Vec<u8>>,
        files: &mut HashMap<String, Digest>,
    ) -> Result<()> {
        let mut ar = tar::Archive::new(reader);
        let bad = |e: std::io::Error| Error::Image(format!("the archive is not a readable tar: {e}"));
        // Bounded reading of names and PAX headers (crate::tarstream); every member's data
        // is read exactly, so a cut archive says so.
        let mut members = crate::tarstream::Members::new(&mut ar).map_err(bad)?;
        let mut i = 0u64;
        while let Some((meta, e)) = members.next_member().map_err(bad)? {
            i += 1;
            if i > MAX_ARCHIVE_ENTRIES {
                return Err(Error::Image(format!("the archive has more than {MAX_ARCHIVE_ENTRIES} entries")));
            }
            if meta.kind != tar::EntryType::Regular {
                continue;
            }
            let mut e = crate::tarstream::Exact::new(e, meta.size);
            let Ok(name) = rootfs::normalize(&meta.path) else { continue };
            if matches!(name.as_str(), "index.json" | "manifest.json" | "oci-layout" | "repositories") {
                let mut b = Vec::new();
                (&mut e).take(MAX_DOCUMENT + 1).read_to_end(&mut b).map_err(bad)?;
                if b.len() as u64 > MAX_DOCUMENT {
                    return Err(Error::Image(format!("{name} in the archive is larger than {MAX_DOCUMENT} bytes")));
                }
                docs.insert(name, b);
            } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let d = Digest::parse(&format!("sha256:{hex}")).map_err(Error::Image)?;
                self.put_blob(&mut e, Some(&d), &format!("blob {name}"))?;
                files.insert(name, d);
            } else {
                let (d, _) = self.put_blob(&mut e, None, &format!("archive file {name}"))?;
                files.insert(name, d);
            }
        }
        Ok(())
    }

    /// Turns an archive's documents into image records.
    fn resolve(
        &self,
        docs: &HashMap<String, Vec<u8>>,
        files: &HashMap<String, Digest>,
        tag: Option<String>,
        fetch: &dyn Fn(&Store, &Digest) -> Result<()>,
    ) -> Result<Vec<ImageRecord>> {
        // (name in the archive, manifest, config, layers) per image.
        type Found = (Option<String>, Option<Digest>, Digest, Vec<Digest>);
        let mut found: Vec<Found> = Vec::new();
        if let Some(index) = docs.get("index.json") {
            let index: Index = oci::parse("index.json", index).map_err(Error::Image)?;
            for desc in &index.manifests {
                let name = desc.annotations.get(oci::REF_NAME).cloned();
                let (digest, manifest) = self.manifest_for(desc, fetch, 0)?;
                let layers = layers_of(&manifest);
                found.push((name, Some(digest), manifest.config.digest, layers));
            }
        } else if let Some(m) = docs.get("manifest.json") {
            #[derive(Deserialize)]
            struct DockerEntry {
                #[serde(rename = "Config")]
                config: String,
                #[serde(rename = "RepoTags", default)]
                repo_tags: Option<Vec<String>>,
                #[serde(rename = "Layers")]
                layers: Vec<String>,
            }
            let entries: Vec<DockerEntry> = oci::parse("manifest.json", m).map_err(Error::Image)?;
            let file = |name: &str| -> Result<Digest> {
                let name = rootfs::normalize(name.as_bytes()).map_err(Error::Image)?;
                files
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| Error::Image(format!("manifest.json names {name}, which the archive lacks")))
            };
            for e in entries {
                let layers = e.layers.iter().map(|l| file(l)).collect::<Result<Vec<_>>>()?;
                let name = e.repo_tags.and_then(|t| t.into_iter().next());
                found.push((name, None, file(&e.config)?, layers));
            }
        } else {
            return Err(Error::Image(
                "the archive has neither index.json (an OCI layout) nor manifest.json (docker save)".into(),
            ));
        }
        if found.is_empty() {
            return Err(Error::Image("the archive holds no image".into()));
        }
        if tag.is_some() && found.len() > 1 {
            return Err(Error::Image(format!("the archive holds {} images; --tag names only one", found.len())));
        }
        let mut out = Vec::new();
        for (name, manifest, config, layers) in found {
            let reference = match tag.clone().or(name) {
                Some(r) => normalize_reference(&r)?,
                None => return Err(Error::Image("the archive does not name its image; give it one with --tag".into())),
            };
            fetch(self, &config)?;
            let cfg: ImageConfig =
                oci::parse("image config", &self.document(&config, "image config")?).map_err(Error::Image)?;
            cfg.check(layers.len()).map_err(Error::Image)?;
            let mut records = Vec::new();
            for (l, diff_id) in layers.iter().zip(&cfg.rootfs.diff_ids) {
                fetch(self, l)?;
                let size = std::fs::metadata(self.blob_path(l))
                    .map_err(|_| Error::Image(format!("layer {l} is missing from the archive")))?
                    .len();
                records.push(LayerRecord { digest: l.clone(), diff_id: diff_id.clone(), size });
            }
            let rec = ImageRecord {
                reference,
                config,
                manifest,
                size: records.iter().map(|l| l.size).sum(),
                layers: records,
                loaded: now(),
            };
            // Named only once its root filesystem is built: a bad layer leaves no image.
            self.rootfs(&rec)?;
            self.put_record(&rec)?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Follows an index entry to the linux/amd64 manifest (nested indexes at most 4 deep).
    fn manifest_for(
        &self,
        desc: &Descriptor,
        fetch: &dyn Fn(&Store, &Digest) -> Result<()>,
        depth: usize,
    ) -> Result<(Digest, Manifest)> {
        if depth > 4 {
            return Err(Error::Image("image indexes are nested more than 4 deep".into()));
        }
        fetch(self, &desc.digest)?;
        let bytes = self.document(&desc.digest, "manifest")?;
        if desc.is_index() || serde_json::from_slice::<Index>(&bytes).is_ok() {
            let index: Index = oci::parse("image index", &bytes).map_err(Error::Image)?;
            let pick = index
                .manifests
                .iter()
                .find(|m| m.is_linux_amd64() && m.platform.is_some())
                .or_else(|| index.manifests.iter().find(|m| m.is_linux_amd64()))
                .ok_or_else(|| Error::Image(format!("index {} has no linux/amd64 image", desc.digest)))?;
            return self.manifest_for(pick, fetch, depth + 1);
        }
        let m: Manifest = oci::parse("manifest", &bytes).map_err(Error::Image)?;
        Ok((desc.digest.clone(), m))
    }

    fn put_record(&self, rec: &ImageRecord) -> Result<()> {
        let dest = self.ref_path(&rec.reference);
        let tmp = self.root.join("tmp").join(unique("ref"));
        let bytes = serde_json::to_vec_pretty(rec).expect("records serialize");
        std::fs::write(&tmp, bytes).map_err(|source| Error::Io { what: "writing", path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &dest).map_err(|source| Error::Io { what: "publishing", path: dest, source })
    }

    /// Every stored image, by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|source| Error::Io { what: "listing", path: dir.clone(), source })? {
            let Ok(e) = e else { continue };
            if let Ok(bytes) = std::fs::read(e.path()) {
                if let Ok(rec) = serde_json::from_slice::<ImageRecord>(&bytes) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// The image named `reference`.
    pub fn get(&self, reference: &str) -> Result<ImageRecord> {
        let r = normalize_reference(reference)?;
        let bytes = std::fs::read(self.ref_path(&r)).map_err(|_| Error::NoSuchImage(r.clone()))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Image(format!("the record of {r} is damaged: {e}")))
    }

    /// Removes the reference (blobs stay until [`Store::prune`]).
    pub fn remove(&self, reference: &str) -> Result<ImageRecord> {
        let rec = self.get(reference)?;
        let p = self.ref_path(&rec.reference);
        std::fs::remove_file(&p).map_err(|source| Error::Io { what: "removing", path: p, source })?;
        Ok(rec)
    }

    /// What the image runs, from its config.
    pub fn run_config(&self, rec: &ImageRecord) -> Result<RunConfig> {
        let cfg: ImageConfig =
            oci::parse("image config", &self.document(&rec.config, "image config")?).map_err(Error::Image)?;
        Ok(cfg.config)
    }

    /// The image's read-only root filesystem, built from its layers on first use.
    pub fn rootfs(&self, rec: &ImageRecord) -> Result<PathBuf> {
        let dest = self.rootfs_path(rec);
        if dest.is_file() {
            return Ok(dest);
        }
        let layers: Vec<Layer> = rec
            .layers
            .iter()
            .map(|l| Layer { blob: self.blob_path(&l.digest), digest: l.digest.clone(), diff_id: l.diff_id.clone() })
            .collect();
        let staging = self.root.join("tmp");
        let stats = rootfs::build(&layers, &staging, &dest, &unique("rootfs"))?;
        tracing::info!(image = %rec.reference, entries = stats.entries, bytes = stats.bytes, devices_dropped = stats.devices_dropped, "root filesystem built");
        Ok(dest)
    }

    /// Removes blobs and root filesystems no stored image uses, except the root filesystems
    /// of `in_use` configs (images of existing sandboxes). Returns the bytes freed.
    pub fn prune(&self, in_use: &BTreeSet<Digest>) -> Result<u64> {
        let images = self.list()?;
        let mut keep_blobs = BTreeSet::new();
        let mut keep_roots: BTreeSet<String> = in_use.iter().map(|d| format!("{}.sqfs", d.hex())).collect();
        for r in &images {
            keep_blobs.insert(r.config.hex().to_string());
            if let Some(m) = &r.manifest {
                keep_blobs.insert(m.hex().to_string());
            }
            for l in &r.layers {
                keep_blobs.insert(l.digest.hex().to_string());
            }
            keep_roots.insert(format!("{}.sqfs", r.config.hex()));
        }
        let mut freed = 0;
        // Staging files of loads that were killed: anything older than an hour (a load in
        // progress keeps writing its file).
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(|source| Error::Io { what: "listing", path: tmp.clone(), source })? {
            let Ok(e) = e else { continue };
            let Ok(md) = e.metadata() else { continue };
            if md.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age.as_secs() > STALE_STAGING_SECS) {
                freed += md.len();
                let _ = std::fs::remove_file(e.path());
            }
        }
        for (dir, keep) in [("blobs/sha256", &keep_blobs), ("rootfs", &keep_roots)] {
            let dir = self.root.join(dir);
            for e in
                std::fs::read_dir(&dir).map_err(|source| Error::Io { what: "listing", path: dir.clone(), source })?
            {
                let Ok(e) = e else { continue };
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(freed)
    }
}

fn layers_of(m: &Manifest) -> Vec<Digest> {
    m.layers.iter().map(|l| l.digest.clone()).collect()
}
