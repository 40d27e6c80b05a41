//! Reading hostile tar streams in bounded memory: image layers, `msb load` archives and the
//! tars a guest sends for `msb cp`.
//!
//! Invariants:
//! - Extension members are read here, never buffered whole by the tar crate: a GNU long name
//!   (`L`) or long link (`K`) of more than [`MAX_PATH`]` + 1` bytes and a PAX header (`x`,
//!   `g`) of more than [`MAX_PAX`] bytes are refused before a byte of them is kept.
//! - Each member is described by one [`Meta`] whose name, link target, ownership, times and
//!   size are what every reader of the stream takes: PAX values over the header's, a ustar
//!   `prefix` joined to its name. A stream other readers could frame or name differently is
//!   refused: a PAX `size` that disagrees with the header, a member named by both a GNU long
//!   name and a PAX path, two long names or two PAX headers for one member, an extension
//!   member that describes nothing, a sparse member.
//! - Only the PAX records a sandbox keeps are carried: `path`, `linkpath`, `size`, `uid`,
//!   `gid`, `mtime` and `SCHILY.xattr.*`; global headers are read (bounded) and ignored.

use std::io::{self, Read};

use crate::rootfs::MAX_PATH;

/// Most bytes of one PAX header member (xattrs such as file capabilities and ACLs fit).
pub const MAX_PAX: u64 = 64 << 10;

/// One member of a stream, as every reader of it names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The raw name (not yet checked: see [`crate::rootfs::normalize`]).
    pub path: Vec<u8>,
    /// The raw link target (empty when none).
    pub link: Vec<u8>,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// The member's data size.
    pub size: u64,
    /// `SCHILY.xattr.*` records, as (key, value).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A tar stream's members, extension members applied (see the module docs).
pub struct Members<'a, R: Read> {
    entries: tar::Entries<'a, R>,
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads an extension member of at most `max` bytes.
fn read_bounded<R: Read>(e: &mut tar::Entry<'_, R>, max: u64, what: &str) -> io::Result<Vec<u8>> {
    let size = e.header().entry_size()?;
    if size > max {
        return Err(bad(format!("a {what} of {size} bytes (at most {max})")));
    }
    let mut out = Vec::with_capacity(size as usize);
    e.take(max).read_to_end(&mut out)?;
    if out.len() as u64 != size {
        return Err(bad(format!("a {what} cut short (the stream is truncated)")));
    }
    Ok(out)
}

/// A long name's bytes without the NUL padding GNU tar writes.
fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn number(key: &str, v: &[u8]) -> io::Result<u64> {
    let s = std::str::from_utf8(v).map_err(|_| bad(format!("the PAX {key} is not a number")))?;
    // mtime may carry a fraction; only whole seconds are kept.
    let whole = if key == "mtime" { s.split('.').next().unwrap_or("") } else { s };
    whole.parse::<u64>().map_err(|_| bad(format!("the PAX {key} {s:?} is not a number")))
}

impl<'a, R: Read> Members<'a, R> {
    /// The members of `ar` (read raw: this type applies the extension members itself).
    pub fn new(ar: &'a mut tar::Archive<R>) -> io::Result<Members<'a, R>> {
        Ok(Members { entries: ar.entries()?.raw(true) })
    }

    /// The next member and its data, or `None` at the end of the archive.
    #[allow(clippy::type_complexity)]
    pub fn next_member(&mut self) -> io::Result<Option<(Meta, tar::Entry<'a, R>)>> {
        let (mut long_name, mut long_link, mut pax): (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>) =
            (None, None, None);
        loop {
            let Some(e) = self.entries.next() else {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(bad("an extension member describes no member (the stream ends)".into()));
                }
                return Ok(None);
            };
            let mut e = e?;
            let kind = e.header().entry_type();
            match kind {
                tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                    let slot = if kind == tar::EntryType::GNULongName { &mut long_name } else { &mut long_link };
                    if slot.is_some() {
                        return Err(bad("two long names for one member".into()));
                    }
                    *slot = Some(trim_nul(read_bounded(&mut e, MAX_PATH as u64 + 1, "long name")?));
                    continue;
                }
                tar::EntryType::XHeader => {
                    if pax.is_some() {
                        return Err(bad("two PAX headers for one member".into()));
                    }
                    pax = Some(read_bounded(&mut e, MAX_PAX, "PAX header")?);
                    continue;
                }
                tar::EntryType::XGlobalHeader => {
                    read_bounded(&mut e, MAX_PAX, "PAX global header")?;
                    continue;
                }
                tar::EntryType::GNUSparse => return Err(bad("sparse members are not supported".into())),
                _ => {}
            }
            let h = e.header();
            let mut meta = Meta {
                path: h.path_bytes().into_owned(),
                link: h.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default(),
                kind,
                // Empty or unreadable numeric fields (writers leave some blank) read as
                // 0 (0644 for the mode); the size alone frames the stream and must parse.
                mode: h.mode().unwrap_or(0o644),
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                mtime: h.mtime().unwrap_or(0),
                size: h.entry_size()?,
                xattrs: Vec::new(),
            };
            let (mut pax_path, mut pax_link) = (false, false);
            if let Some(p) = &pax {
                for ext in tar::PaxExtensions::new(p) {
                    let ext = ext.map_err(|e| bad(format!("a malformed PAX record: {e}")))?;
                    let key = ext.key().map_err(|_| bad("a PAX key that is not UTF-8".into()))?;
                    let v = ext.value_bytes();
                    match key {
                        "path" => (meta.path, pax_path) = (v.to_vec(), true),
                        "linkpath" => (meta.link, pax_link) = (v.to_vec(), true),
                        "size" if number(key, v)? != meta.size => {
                            return Err(bad(format!(
                                "a PAX size of {} bytes where the header says {}",
                                number(key, v)?,
                                meta.size
                            )))
                        }
                        "uid" => meta.uid = number(key, v)?,
                        "gid" => meta.gid = number(key, v)?,
                        "mtime" => meta.mtime = number(key, v)?,
                        k if k.starts_with("SCHILY.xattr.") => meta.xattrs.push((k.to_string(), v.to_vec())),
                        _ => {}
                    }
                }
            }
            if let Some(n) = long_name {
                if pax_path {
                    return Err(bad("a member named by both a GNU long name and a PAX path".into()));
                }
                meta.path = n;
            }
            if let Some(l) = long_link {
                if pax_link {
                    return Err(bad("a link target given by both a GNU long link and a PAX linkpath".into()));
                }
                meta.link = l;
            }
            if meta.path.len() > MAX_PATH || meta.link.len() > MAX_PATH {
                return Err(bad(format!("a name or link target longer than {MAX_PATH} bytes")));
            }
            return Ok(Some((meta, e)));
        }
    }
}

/// Reads exactly `size` bytes of a member: a stream that ends sooner is an error that says
/// the archive is truncated (not a digest mismatch further on).
pub struct Exact<R> {
    inner: R,
    left: u64,
    size: u64,
}

impl<R: Read> Exact<R> {
    pub fn new(inner: R, size: u64) -> Exact<R> {
        Exact { inner, left: size, size }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive is truncated: it ends after {} of this member's {} bytes",
                    self.size - self.left,
                    self.size
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(data: &[u8]) -> io::Result<Vec<Meta>> {
        let mut ar = tar::Archive::new(data);
        let mut m = Members::new(&mut ar)?;
        let mut out = Vec::new();
        while let Some((meta, _)) = m.next_member()? {
            out.push(meta);
        }
        Ok(out)
    }

    fn header(kind: tar::EntryType, name: &[u8], size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// One PAX record, its length prefix computed.
    fn rec(k: &str, v: &str) -> String {
        let body = format!(" {k}={v}\n");
        let mut n = body.len() + 1;
        while format!("{n}").len() + body.len() != n {
            n += 1;
        }
        format!("{n}{body}")
    }

    fn member(out: &mut Vec<u8>, h: &tar::Header, data: &[u8]) {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    /// A reader that fails once more than `left` bytes are asked of it: proves an oversized
    /// extension member is refused from its header, before its bytes are read.
    struct Limited<'a>(&'a [u8], usize);
    impl Read for Limited<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(self.1);
            if n == 0 && !self.0.is_empty() {
                return Err(io::Error::other("read past the bound"));
            }
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 -= n;
            Ok(n)
        }
    }

    #[test]
    fn long_names_and_pax_records_are_applied_and_bounded_before_reading() {
        let mut t = Vec::new();
        let long = "d/".repeat(100) + "f";
        member(
            &mut t,
            &header(tar::EntryType::GNULongName, b"././@LongLink", long.len() as u64 + 1),
            &[long.as_bytes(), b"\0"].concat(),
        );
        member(&mut t, &header(tar::EntryType::Regular, b"short", 2), b"hi");
        let pax = rec("path", "from/pax.txt") + &rec("uid", "123456789") + &rec("SCHILY.xattr.user.a", "bc");
        let pax = pax.as_bytes();
        member(&mut t, &header(tar::EntryType::XHeader, b"pax", pax.len() as u64), pax);
        member(&mut t, &header(tar::EntryType::Regular, b"plain", 0), b"");
        t.extend_from_slice(&[0; 1024]);
        let m = members(&t).unwrap();
        assert_eq!(m[0].path, long.as_bytes());
        assert_eq!(m[0].size, 2);
        assert_eq!(m[1].path, b"from/pax.txt");
        assert_eq!(m[1].uid, 123_456_789);
        assert_eq!(m[1].xattrs, vec![("SCHILY.xattr.user.a".to_string(), b"bc".to_vec())]);

        // A 1 GiB long name is refused from its header: the reader is never asked for it.
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::GNULongName, b"././@LongLink", 1 << 30), b"");
        let mut ar = tar::Archive::new(Limited(&t, 2048));
        let e = Members::new(&mut ar).unwrap().next_member().err().expect("refused");
        assert!(e.to_string().contains("long name of 1073741824 bytes"), "{e}");
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::XHeader, b"pax", MAX_PAX + 1), b"");
        assert!(members(&t).unwrap_err().to_string().contains("PAX header of"));
    }

    #[test]
    fn streams_other_readers_would_frame_or_name_differently_are_refused() {
        let refused = |t: Vec<u8>, why: &str| {
            let e = members(&t).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        };
        let pax = rec("size", "99");
        let pax = pax.as_bytes();
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::XHeader, b"pax", pax.len() as u64), pax);
        member(&mut t, &header(tar::EntryType::Regular, b"f", 0), b"");
        refused(t, "PAX size of 99");
        let mut t = Vec::new();
        let pax = rec("path", "a");
        let pax = pax.as_bytes();
        member(&mut t, &header(tar::EntryType::XHeader, b"pax", pax.len() as u64), pax);
        member(&mut t, &header(tar::EntryType::GNULongName, b"././@LongLink", 2), b"b\0");
        member(&mut t, &header(tar::EntryType::Regular, b"f", 0), b"");
        refused(t, "both a GNU long name and a PAX path");
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::GNULongName, b"././@LongLink", 2), b"b\0");
        refused(t, "describes no member");
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::GNUSparse, b"s", 0), b"");
        refused(t, "sparse");
    }

    #[test]
    fn a_ustar_prefix_is_part_of_the_name() {
        let mut h = tar::Header::new_ustar();
        h.as_ustar_mut().unwrap().prefix[..3].copy_from_slice(b"etc");
        h.as_ustar_mut().unwrap().name[..6].copy_from_slice(b"passwd");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_cksum();
        let mut t = Vec::new();
        member(&mut t, &h, b"");
        assert_eq!(members(&t).unwrap()[0].path, b"etc/passwd");
    }

    #[test]
    fn a_member_cut_short_reads_as_truncated() {
        let mut t = Vec::new();
        member(&mut t, &header(tar::EntryType::Regular, b"f", 1000), &[7; 1000]);
        t.truncate(512 + 300);
        let mut ar = tar::Archive::new(&t[..]);
        let mut m = Members::new(&mut ar).unwrap();
        let (meta, e) = m.next_member().unwrap().unwrap();
        let e = std::io::copy(&mut Exact::new(e, meta.size), &mut std::io::sink()).unwrap_err();
        assert!(e.to_string().contains("truncated: it ends after 300 of this member's 1000 bytes"), "{e}");
    }
}
