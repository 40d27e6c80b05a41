//! What a flow says it is for: the server name in a TLS ClientHello (SNI) or the `Host` of a
//! plain HTTP/1 request, read from the first bytes the guest sends on a TCP flow, and the
//! denials a program can read for each (a TLS `access_denied` alert, an HTTP 403 naming the
//! rule).
//!
//! Invariants: the parsers look at most [`MAX_HELLO`] bytes of a TLS flow and [`MAX_SNIFF`]
//! of an HTTP one, never allocate from a length the guest wrote without checking it against
//! what is there, and answer [`Sniffed::NeedMore`] until they can decide; a name comes back
//! as a checked [`DomainName`] or not at all. A ClientHello with several server names, or a
//! request with several `Host` headers, or an absolute-form target (any scheme) naming
//! another authority, is [`Sniffed::Ambiguous`] (denied by the caller: which one would the
//! server use?). A ClientHello that carries an encrypted one (ECH, or the older ESNI) is
//! [`Sniffed::Encrypted`]: the server it names is not the one its outer SNI says. Anything
//! else — bytes that are not a canonical request line or ClientHello, a ClientHello past
//! [`MAX_HELLO`] — is [`Sniffed::Other`]: the caller must treat it as unnamed, never as
//! named by what it could not read.

use crate::policy::DomainName;

/// Most bytes of an HTTP request head read from a flow before deciding.
pub const MAX_SNIFF: usize = 16 * 1024;
/// Most bytes of a TLS ClientHello (its records) read before deciding: Go's bound for a
/// handshake message, four times BoringSSL's; larger ones are [`Sniffed::Other`].
pub const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello naming this server.
    Tls(DomainName),
    /// A TLS ClientHello without a server name.
    TlsNoName,
    /// An HTTP/1 request for this host.
    Http(DomainName),
    /// An HTTP/1 request without a `Host` header.
    HttpNoHost,
    /// Not enough bytes yet.
    NeedMore,
    /// Two names, or a name that is not a domain name.
    Ambiguous,
    /// A ClientHello carrying an encrypted one (ECH `0xfe0d`, ESNI `0xffce`).
    Encrypted,
    /// Neither TLS nor HTTP/1 (or past [`MAX_HELLO`] / [`MAX_SNIFF`] without an answer).
    Other,
}

/// Decides what the first bytes of a flow are.
pub fn sniff(data: &[u8]) -> Sniffed {
    match data.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls(&data[..data.len().min(MAX_HELLO)]),
        Some(b) if b.is_ascii_uppercase() => http(&data[..data.len().min(MAX_SNIFF)]),
        Some(_) => Sniffed::Other,
    }
}

/// A cursor that fails instead of reading past the end.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| s[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|s| (s[0] as usize) << 16 | (s[1] as usize) << 8 | s[2] as usize)
    }
}

fn tls(data: &[u8]) -> Sniffed {
    match join_hello(data) {
        Ok(hs) => client_hello(&hs).unwrap_or(Sniffed::Other),
        Err(s) => s,
    }
}

/// The first handshake message, joined from the records it spans, or what the bytes are
/// instead.
fn join_hello(data: &[u8]) -> Result<Vec<u8>, Sniffed> {
    // The handshake may span records: join the fragments of the first handshake message.
    let mut hs = Vec::new();
    let mut c = Cur { b: data, at: 0 };
    loop {
        let Some(hdr) = c.take(5) else { return Err(Sniffed::NeedMore) };
        if hdr[0] != 0x16 || hdr[1] != 3 {
            return Err(Sniffed::Other);
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        if len == 0 || len > 16 * 1024 + 256 {
            return Err(Sniffed::Other);
        }
        // Records carry 5 bytes of header per 16 KiB: a hello that cannot fit the bound with
        // its headers is refused as soon as its declared length is in, not waited for.
        let too_big = |hs: &[u8]| {
            let want = 4 + ((hs[1] as usize) << 16 | (hs[2] as usize) << 8 | hs[3] as usize);
            (want + 5 * want.div_ceil(16 * 1024) > MAX_HELLO, want)
        };
        let Some(body) = c.take(len) else {
            let partial = [&hs[..], &data[c.at..]].concat();
            if data.len() >= MAX_HELLO || (partial.len() >= 4 && too_big(&partial).0) {
                return Err(Sniffed::Other);
            }
            return Err(Sniffed::NeedMore);
        };
        hs.extend_from_slice(body);
        if hs.len() >= 4 {
            let (big, want) = too_big(&hs);
            if big {
                return Err(Sniffed::Other);
            }
            if hs.len() >= want {
                hs.truncate(want);
                break;
            }
        }
    }
    Ok(hs)
}

/// The extensions block of a ClientHello handshake message: `None` when it is not a
/// well-formed ClientHello, `Some(None)` when it has no extensions at all.
fn hello_extensions(hs: &[u8]) -> Option<Option<&[u8]>> {
    let mut c = Cur { b: hs, at: 0 };
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = c.u24()?;
    let mut c = Cur { b: c.take(len)?, at: 0 };
    c.take(2 + 32)?; // version, random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    if c.at == c.b.len() {
        return Some(None);
    }
    let ext_len = c.u16()?;
    Some(Some(c.take(ext_len)?))
}

fn client_hello(hs: &[u8]) -> Option<Sniffed> {
    let Some(exts) = hello_extensions(hs)? else {
        return Some(Sniffed::TlsNoName); // no extensions at all
    };
    let mut e = Cur { b: exts, at: 0 };
    let mut found: Option<Sniffed> = None;
    while e.at < e.b.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let body = e.take(len)?;
        if kind == 0xfe0d || kind == 0xffce {
            return Some(Sniffed::Encrypted);
        }
        if kind != 0 {
            continue; // not server_name
        }
        if found.is_some() {
            return Some(Sniffed::Ambiguous);
        }
        let mut s = Cur { b: body, at: 0 };
        let list = s.u16()?;
        let mut l = Cur { b: s.take(list)?, at: 0 };
        let mut names = Vec::new();
        while l.at < l.b.len() {
            let t = l.u8()?;
            let n = l.u16()?;
            let name = l.take(n)?;
            if t == 0 {
                names.push(name);
            }
        }
        found = Some(match names.as_slice() {
            [] => Sniffed::TlsNoName,
            [one] => std::str::from_utf8(one)
                .ok()
                .and_then(|s| DomainName::parse(s).ok())
                .map_or(Sniffed::Ambiguous, Sniffed::Tls),
            _ => Sniffed::Ambiguous,
        });
    }
    Some(found.unwrap_or(Sniffed::TlsNoName))
}

/// The ALPN protocols a whole ClientHello offers (`None`: not a whole ClientHello, or a
/// malformed ALPN extension).
pub fn client_alpn(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let hs = join_hello(data).ok()?;
    let Some(exts) = hello_extensions(&hs)? else { return Some(Vec::new()) };
    let mut e = Cur { b: exts, at: 0 };
    let mut out = Vec::new();
    while e.at < e.b.len() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let body = e.take(len)?;
        if kind != 16 {
            continue; // not application_layer_protocol_negotiation
        }
        let mut a = Cur { b: body, at: 0 };
        let list = a.u16()?;
        let mut l = Cur { b: a.take(list)?, at: 0 };
        while l.at < l.b.len() {
            let n = l.u8()?;
            out.push(l.take(n)?.to_vec());
        }
    }
    Some(out)
}

/// Whether `line` (the bytes so far of a first line) can still become an HTTP/1 request
/// line: a method of capital letters, a space, a target, ` HTTP/1.`.
fn may_be_request_line(line: &[u8]) -> bool {
    let method = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match line.get(method) {
        None => method <= 16,
        Some(b' ') => {
            let rest = &line[method + 1..];
            match rest.iter().position(|b| *b == b' ') {
                None => !rest.iter().any(|b| b.is_ascii_control()),
                Some(sp) => {
                    let version = &rest[sp + 1..];
                    let want = b"HTTP/1.";
                    let n = version.len().min(want.len());
                    version[..n] == want[..n]
                }
            }
        }
        Some(_) => false,
    }
}

fn http(data: &[u8]) -> Sniffed {
    // Decide early on a first line that cannot be HTTP (an SSH banner, say): its client may
    // wait for the server before it sends more.
    let line_end = data.iter().position(|b| *b == b'\r' || *b == b'\n');
    let first = line_end.map_or(data, |e| &data[..e]);
    let whole_line_ok = || {
        let mut parts = first.split(|b| *b == b' ');
        let (_, target, version) = (parts.next(), parts.next(), parts.next());
        target.is_some_and(|t| !t.is_empty())
            && version.is_some_and(|v| v.starts_with(b"HTTP/1."))
            && parts.next().is_none()
    };
    if !may_be_request_line(first) || (line_end.is_some() && !whole_line_ok()) {
        return Sniffed::Other;
    }
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if data.len() >= MAX_SNIFF { Sniffed::Other } else { Sniffed::NeedMore };
    };
    let Ok(head) = std::str::from_utf8(&data[..end]) else { return Sniffed::Other };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let mut parts = request.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Sniffed::Other;
    };
    if parts.next().is_some() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !version.starts_with("HTTP/1.") {
        return Sniffed::Other;
    }
    let mut hosts = lines.filter_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("host").then(|| v.trim())
    });
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Sniffed::HttpNoHost,
        (Some(_), Some(_)) => return Sniffed::Ambiguous,
    };
    // An absolute-form target (any scheme: servers route by its authority, RFC 9112 3.2.2)
    // must name the same host, and carry no userinfo.
    if let Some((scheme, rest)) = target.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if scheme.is_empty() || authority.contains('@') || !authority.eq_ignore_ascii_case(host) {
            return Sniffed::Ambiguous;
        }
    } else if !target.starts_with('/') && target != "*" {
        return Sniffed::Ambiguous; // an authority-form (CONNECT) or other target
    }
    let name = strip_port(host);
    DomainName::parse(name).map_or(Sniffed::Ambiguous, Sniffed::Http)
}

/// `host:port` → `host` (IPv6 literals in brackets are not domain names and fail later).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A fatal TLS alert `access_denied` (49), as a TLS 1.2 record (every TLS version reads it
/// before the handshake).
pub fn tls_access_denied() -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49]
}

/// An HTTP 403 whose body names what denied the request.
pub fn http_forbidden(host: &str, why: &str) -> Vec<u8> {
    let body = format!("msb: the sandbox's network policy denies {host}: {why}\n");
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nX-Msb-Denied: {}\r\n\r\n{body}",
        body.len(),
        why.replace(['\r', '\n'], " ")
    )
    .into_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello with the given server names (none: no SNI extension).
    pub(crate) fn hello(names: &[&str], split_at: Option<usize>) -> Vec<u8> {
        let mut ext = Vec::new();
        if !names.is_empty() {
            let mut list = Vec::new();
            for n in names {
                list.push(0);
                list.extend_from_slice(&(n.len() as u16).to_be_bytes());
                list.extend_from_slice(n.as_bytes());
            }
            let mut sni = (list.len() as u16).to_be_bytes().to_vec();
            sni.extend_from_slice(&list);
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
            ext.extend_from_slice(&sni);
        }
        ext.extend_from_slice(&[0, 10, 0, 2, 0, 0]); // another extension after it
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = match split_at {
            Some(k) => vec![&hs[..k], &hs[k..]],
            None => vec![&hs[..]],
        };
        for c in chunks {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn tls_server_names_are_read_whole_or_not_at_all() {
        assert_eq!(sniff(&hello(&["API.Example.com"], None)), Sniffed::Tls(name("api.example.com")));
        assert_eq!(sniff(&hello(&["api.example.com"], Some(20))), Sniffed::Tls(name("api.example.com")), "two records");
        assert_eq!(sniff(&hello(&[], None)), Sniffed::TlsNoName);
        assert_eq!(sniff(&hello(&["a.example", "b.example"], None)), Sniffed::Ambiguous);
        assert_eq!(sniff(&hello(&["bad name"], None)), Sniffed::Ambiguous);
        let whole = hello(&["api.example.com"], None);
        for cut in 1..whole.len() {
            assert_eq!(sniff(&whole[..cut]), Sniffed::NeedMore, "cut at {cut}");
        }
        // Lengths that point past the data never read past it.
        let mut lying = whole.clone();
        lying[5 + 1..5 + 4].copy_from_slice(&[0, 0xff, 0xff]);
        assert!(matches!(sniff(&lying), Sniffed::NeedMore | Sniffed::Other));
        assert_eq!(sniff(&[0x16, 3, 1, 0, 0]), Sniffed::Other, "an empty record");
    }

    #[test]
    fn http_hosts_must_be_one_and_agree_with_the_target() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n"), Sniffed::Http(name("example.com")));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n"), Sniffed::Http(name("a.example")));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"), Sniffed::Ambiguous);
        assert_eq!(sniff(b"GET http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"), Sniffed::Ambiguous);
        assert_eq!(
            sniff(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            Sniffed::Http(name("a.example"))
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a.exa"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::HttpNoHost);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"), Sniffed::HttpNoHost);
        // A first line that cannot be a request line is decided at once.
        assert_eq!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"SSH-2.0"), Sniffed::Other);
        assert_eq!(sniff(b"EHLO x\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"GET / SMTP\r\n"), Sniffed::Other);
        for partial in [&b"G"[..], b"GET", b"GET ", b"GET /x", b"GET /x HT", b"GET /x HTTP/1.1"] {
            assert_eq!(sniff(partial), Sniffed::NeedMore, "{:?}", String::from_utf8_lossy(partial));
        }
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Other);
        let long = vec![b'G'; MAX_SNIFF + 10];
        assert_eq!(sniff(&long), Sniffed::Other, "undecided within the bound");
    }

    #[test]
    fn absolute_form_targets_of_any_scheme_must_agree_with_host() {
        for req in [
            &b"GET HTTP://other.example/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n"[..],
            b"GET https://other.example/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            b"GET hTtP://other.example/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            b"GET http://api.example.com@other.example/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            b"CONNECT other.example:443 HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        ] {
            assert_eq!(sniff(req), Sniffed::Ambiguous, "{}", String::from_utf8_lossy(req));
        }
        assert_eq!(
            sniff(b"GET HTTP://API.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n"),
            Sniffed::Http(name("api.example.com"))
        );
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n"), Sniffed::Http(name("a.example")));
    }

    /// The review's ClientHellos: one carrying ECH is not decided by its outer name; one
    /// larger than what servers accept, or than [`MAX_HELLO`], is never a name.
    #[test]
    fn encrypted_and_oversized_client_hellos_are_not_names() {
        let ech =
            crate::review_tests::hello_with("api.example.com", &[(0xfe0d, vec![0, 0, 1, 0, 1, 7, 0, 0, 0, 0])], 16384);
        assert_eq!(sniff(&ech), Sniffed::Encrypted);
        let esni = crate::review_tests::hello_with("api.example.com", &[(0xffce, vec![0; 8])], 16384);
        assert_eq!(sniff(&esni), Sniffed::Encrypted);
        // 20,000 bytes of padding: within MAX_HELLO, so it is read whole and named.
        let big = crate::review_tests::hello_with("other.example", &[(21, vec![0; 20_000])], 16384);
        assert_eq!(sniff(&big), Sniffed::Tls(name("other.example")));
        let huge =
            crate::review_tests::hello_with("other.example", &[(21, vec![0; 40_000]), (22, vec![0; 40_000])], 16384);
        assert_eq!(sniff(&huge[..MAX_HELLO.min(huge.len())]), Sniffed::Other, "past the bound");
        assert_eq!(sniff(&huge[..100]), Sniffed::Other, "refused from its declared length");
    }

    #[test]
    fn denials_are_what_programs_read() {
        assert_eq!(tls_access_denied(), [0x15, 3, 3, 0, 2, 2, 49]);
        let r = String::from_utf8(http_forbidden("evil.example", "rule 2 `deny *.example`")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(r.ends_with("denies evil.example: rule 2 `deny *.example`\n"));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        assert!(r.contains(&format!("Content-Length: {}\r\n", body.len())));
    }
}
