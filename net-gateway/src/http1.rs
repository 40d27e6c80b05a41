//! Follows the requests of a plain-HTTP/1 flow that a domain rule allowed by its `Host`, so
//! that every request on the connection is checked, not only the first: a second, pipelined
//! or kept-alive request naming another host is what domain fronting over plain HTTP sends.
//!
//! The guest's bytes are framed as requests: a head (request line and headers, at most
//! [`MAX_SNIFF`] bytes), then a body framed by `Content-Length` or `Transfer-Encoding:
//! chunked`, then the next head. Each head is handed to the caller to decide
//! ([`Step::Head`]) before a byte of it is forwarded.
//!
//! Invariants: nothing is forwarded that the framer has not classified; a head is forwarded
//! only after [`Requests::accept_head`]; framing a request could read two ways (both
//! `Content-Length` and `Transfer-Encoding`, two different lengths, an encoding other than
//! chunked, `Transfer-Encoding` in HTTP/1.0, a malformed chunk, a bare CR or LF or another
//! control byte in a head, a chunk-size line or trailers, a folded header line) is refused
//! ([`Step::Bad`]) rather than guessed, since a server might read it the other way (request
//! smuggling). `CONNECT` is refused, and so is an `Upgrade` other than `websocket` (h2c would
//! hide later requests' authorities); a websocket `Upgrade` is taken only as the first
//! request of a connection the server has not yet spoken on, and the stream becomes opaque
//! only once the server's first bytes are a `101` ([`Requests::response`]): until then the
//! guest's later bytes wait, and without a `101` they are framed as requests again.

use crate::sniff::{sniff, Sniffed, MAX_SNIFF};

/// Longest chunk-size line or trailer section.
const MAX_LINE: usize = 1024;

/// What the caller may do with the bytes offered to [`Requests::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The first this many bytes belong to what was allowed already: forward them.
    Forward(usize),
    /// A whole request head of `len` bytes, for this host: decide, then
    /// [`Requests::accept_head`] (its bytes come back as a [`Step::Forward`]) or refuse.
    Head { len: usize, host: Sniffed },
    /// Not enough bytes to classify any.
    NeedMore,
    /// The requests cannot be framed safely; why.
    Bad(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Head,
    /// A head was decided on and accepted; forward it, then its body.
    Accepted {
        len: usize,
        then: Body,
    },
    /// `n` more body bytes.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// `n` more bytes of chunk data, then its CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
    /// An `Upgrade` request went: the guest's bytes wait until the server's first bytes
    /// say whether it switched.
    AwaitSwitch,
    /// Forwarded as it is (the server switched protocols).
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    /// A websocket `Upgrade` request (no body).
    Upgrade,
}

/// One flow's request framer.
#[derive(Debug)]
pub struct Requests {
    state: State,
    /// The framing of the head handed out last, until it is accepted.
    pending: Option<Body>,
    /// Heads accepted so far.
    heads: u64,
    /// The server's bytes seen so far (only the first [`STATUS_LINE`] are kept).
    response: Vec<u8>,
    /// Whether the server has sent anything yet.
    server_spoke: bool,
}

/// How much of the server's first bytes decides whether it switched: `HTTP/1.1 101`.
const STATUS_LINE: usize = 12;

impl Default for Requests {
    fn default() -> Self {
        Requests { state: State::Head, pending: None, heads: 0, response: Vec::new(), server_spoke: false }
    }
}

impl Requests {
    /// Classifies the start of `data` (the guest's bytes not yet forwarded).
    pub fn step(&mut self, data: &[u8]) -> Step {
        if data.is_empty() {
            return Step::NeedMore;
        }
        match self.state {
            State::Head => {
                let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return if data.len() >= MAX_SNIFF {
                        Step::Bad("a request head over 16 KiB")
                    } else {
                        Step::NeedMore
                    };
                };
                let len = end + 4;
                if len > MAX_SNIFF {
                    return Step::Bad("a request head over 16 KiB");
                }
                let head = &data[..len];
                let body = match framing(head) {
                    Ok(b) => b,
                    Err(why) => return Step::Bad(why),
                };
                if body == Body::Upgrade && (self.heads > 0 || self.server_spoke) {
                    return Step::Bad("an Upgrade after other requests or server bytes on one connection");
                }
                self.pending = Some(body);
                Step::Head { len, host: sniff(trim_leading_lines(head)) }
            }
            State::Accepted { len, then } => {
                self.state = match then {
                    Body::None | Body::Length(0) => State::Head,
                    Body::Length(n) => State::Body(n),
                    Body::Chunked => State::ChunkSize,
                    Body::Upgrade => State::AwaitSwitch,
                };
                Step::Forward(len)
            }
            State::Body(n) => {
                let k = (data.len() as u64).min(n);
                self.state = if k == n { State::Head } else { State::Body(n - k) };
                Step::Forward(k as usize)
            }
            State::ChunkSize => {
                let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
                    return if data.len() > MAX_LINE {
                        Step::Bad("a chunk-size line over 1 KiB")
                    } else {
                        Step::NeedMore
                    };
                };
                let line = &data[..eol];
                if line.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
                    return Step::Bad("a bare CR or LF or a control byte in a chunk-size line");
                }
                let hex = line.split(|b| *b == b';').next().unwrap_or_default();
                let hex = std::str::from_utf8(hex).unwrap_or("").trim_end_matches([' ', '\t']);
                if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Step::Bad("a malformed chunk size");
                }
                let size = u64::from_str_radix(hex, 16).unwrap_or(u64::MAX);
                self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                Step::Forward(eol + 2)
            }
            State::ChunkData(n) => {
                let k = (data.len() as u64).min(n);
                self.state = if k == n { State::ChunkEnd } else { State::ChunkData(n - k) };
                Step::Forward(k as usize)
            }
            State::ChunkEnd => match data {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Step::Forward(2)
                }
                [b'\r'] => Step::NeedMore,
                _ => Step::Bad("chunk data longer than its size"),
            },
            State::Trailers => {
                // No trailers: an empty line at once; else lines up to an empty one.
                if data.starts_with(b"\r\n") {
                    self.state = State::Head;
                    return Step::Forward(2);
                }
                match data.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(end) if bare_line_ends(&data[..end + 4]) => Step::Bad("a bare CR or LF in trailers"),
                    Some(end) if end + 4 <= MAX_LINE * 8 => {
                        self.state = State::Head;
                        Step::Forward(end + 4)
                    }
                    Some(_) => Step::Bad("trailers over 8 KiB"),
                    None if data.len() > MAX_LINE * 8 => Step::Bad("trailers over 8 KiB"),
                    None => Step::NeedMore,
                }
            }
            State::AwaitSwitch => Step::NeedMore,
            State::Opaque => Step::Forward(data.len()),
        }
    }

    /// Whether the next step frames or forwards a head (which goes whole, whatever a byte
    /// bucket's burst).
    pub fn at_head(&self) -> bool {
        matches!(self.state, State::Head | State::Accepted { .. })
    }

    /// The server's bytes on this connection, as they go to the guest: after a websocket
    /// `Upgrade`, its first 12 bytes decide whether the stream is the server's
    /// (`HTTP/1.1 101`) or requests again.
    pub fn response(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.server_spoke = true;
        if self.response.len() < STATUS_LINE {
            let take = (STATUS_LINE - self.response.len()).min(data.len());
            self.response.extend_from_slice(&data[..take]);
        }
        if self.state == State::AwaitSwitch && self.response.len() >= STATUS_LINE {
            self.state = if self.response == b"HTTP/1.1 101" { State::Opaque } else { State::Head };
        }
    }

    /// The head handed out by the last [`Step::Head`] is allowed: the next step forwards it.
    pub fn accept_head(&mut self, len: usize) {
        if let Some(then) = self.pending.take() {
            self.state = State::Accepted { len, then };
            self.heads += 1;
        }
    }
}

/// Empty lines before a request line are allowed (and ignored) by servers.
fn trim_leading_lines(mut head: &[u8]) -> &[u8] {
    while let Some(rest) = head.strip_prefix(b"\r\n") {
        head = rest;
    }
    head
}

/// Whether `b` holds a CR not followed by LF, or an LF not preceded by CR.
fn bare_line_ends(b: &[u8]) -> bool {
    b.iter()
        .enumerate()
        .any(|(i, &c)| (c == b'\r' && b.get(i + 1) != Some(&b'\n')) || (c == b'\n' && (i == 0 || b[i - 1] != b'\r')))
}

/// How the body after `head` is framed, or why it cannot be told safely.
fn framing(head: &[u8]) -> Result<Body, &'static str> {
    let head = trim_leading_lines(head);
    if bare_line_ends(head) {
        return Err("a bare CR or LF in a request head");
    }
    if head.iter().any(|b| b.is_ascii_control() && !matches!(b, b'\r' | b'\n' | b'\t')) {
        return Err("a control byte in a request head");
    }
    let text = std::str::from_utf8(head).map_err(|_| "a request head that is not text")?;
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or("");
    let method = request.split(' ').next().unwrap_or("");
    if method == "CONNECT" {
        return Err("CONNECT on a flow decided by name");
    }
    let http10 = request.ends_with(" HTTP/1.0");
    let (mut length, mut chunked, mut upgrade) = (None::<u64>, false, false);
    for l in lines.filter(|l| !l.is_empty()) {
        if l.starts_with([' ', '\t']) {
            return Err("a folded header line");
        }
        let Some((k, v)) = l.split_once(':') else { return Err("a header line without a colon") };
        if k.ends_with([' ', '\t']) {
            return Err("whitespace before a header's colon");
        }
        let v = v.trim_matches([' ', '\t']);
        if k.eq_ignore_ascii_case("content-length") {
            if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err("a malformed Content-Length");
            }
            let n = v.parse::<u64>().map_err(|_| "a malformed Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths");
            }
            length = Some(n);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            if !v.eq_ignore_ascii_case("chunked") || chunked {
                return Err("a Transfer-Encoding other than one chunked");
            }
            if http10 {
                return Err("Transfer-Encoding in an HTTP/1.0 request");
            }
            chunked = true;
        } else if k.eq_ignore_ascii_case("upgrade") {
            if !v.eq_ignore_ascii_case("websocket") || upgrade {
                return Err("an Upgrade other than one websocket (h2c and others would hide later requests)");
            }
            upgrade = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err("both Content-Length and Transfer-Encoding"),
        (Some(n), false) if upgrade && n > 0 => Err("an Upgrade request with a body"),
        (_, true) if upgrade => Err("an Upgrade request with a body"),
        _ if upgrade => Ok(Body::Upgrade),
        (_, true) => Ok(Body::Chunked),
        (Some(n), false) => Ok(Body::Length(n)),
        (None, false) => Ok(Body::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DomainName;

    /// Runs `data` through a framer that accepts every head; returns the hosts seen and
    /// how many bytes were forwarded, or the refusal.
    fn frame(data: &[u8], chunk: usize) -> Result<(Vec<Sniffed>, usize), &'static str> {
        let mut r = Requests::default();
        let (mut hosts, mut at, mut avail) = (Vec::new(), 0, chunk.min(data.len()));
        loop {
            match r.step(&data[at..avail]) {
                Step::Forward(n) => {
                    assert!(n > 0 && at + n <= avail, "forwards only what it was offered");
                    at += n;
                }
                Step::Head { len, host } => {
                    hosts.push(host);
                    r.accept_head(len);
                }
                Step::NeedMore if avail == data.len() => return Ok((hosts, at)),
                Step::NeedMore => avail = (avail + chunk).min(data.len()),
                Step::Bad(why) => return Err(why),
            }
            if at == avail && avail < data.len() {
                avail = (avail + chunk).min(data.len());
            }
        }
    }

    fn host(s: &str) -> Sniffed {
        Sniffed::Http(DomainName::parse(s).unwrap())
    }

    #[test]
    fn every_request_of_a_connection_is_shown_whatever_the_segmentation() {
        let wire = b"POST /a HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: b.example\r\n\r\n\
POST /c HTTP/1.1\r\nHost: c.example\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
\r\nGET /d HTTP/1.1\r\nHost: d.example\r\n\r\n";
        for chunk in [1, 2, 3, 7, 64, wire.len()] {
            let (hosts, fwd) = frame(wire, chunk).unwrap();
            assert_eq!(hosts, [host("a.example"), host("b.example"), host("c.example"), host("d.example")], "{chunk}");
            assert_eq!(fwd, wire.len(), "{chunk}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_forwarded_as_a_body() {
        let inner = b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        let mut wire =
            format!("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: {}\r\n\r\n", inner.len()).into_bytes();
        wire.extend_from_slice(inner);
        assert_eq!(frame(&wire, 5).unwrap().0, [host("a.example")]);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
        ] {
            assert!(frame(bad, 4).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let huge = [&b"GET / HTTP/1.1\r\nHost: a\r\nX: "[..], &vec![b'x'; MAX_SNIFF], b"\r\n\r\n"].concat();
        assert!(frame(&huge, 4096).is_err());
    }

    #[test]
    fn after_an_upgrade_the_stream_is_the_servers_once_it_switched() {
        let ws = b"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n";
        let wire = [&ws[..], b"\x81\x05hello GET / HTTP/1.1\r\nHost: b\r\n\r\n"].concat();
        // Until the server answers, nothing after the upgrade request goes.
        let (hosts, fwd) = frame(&wire, 8).unwrap();
        assert_eq!((hosts, fwd), (vec![host("a.example")], ws.len()));
        let mut r = Requests::default();
        let Step::Head { len, .. } = r.step(&wire) else { panic!() };
        r.accept_head(len);
        assert_eq!(r.step(&wire), Step::Forward(len));
        r.response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(r.step(&wire[len..]), Step::Forward(wire.len() - len));
    }
}
