//! Secrets: what the network gateway and the secret vault say to each other, and the checked
//! types a secret is described by.
//!
//! - A [`SecretSpec`] is everything about a secret except its value: name, placeholder, the
//!   hosts it may go to, where in a request it may be substituted, what a misplaced
//!   placeholder does. It is serialisable (it is stored with the sandbox).
//! - A [`SecretValue`] is the value: never `Clone`, never `Serialize`, redacted in `Debug`,
//!   zeroized when dropped. Values are checked by [`SecretValue::new`]: not empty, at most
//!   [`MAX_SECRET_VALUE`] bytes, no control byte (so a value can never split a header line).
//! - The gateway holds a ref narrowed to [`VaultQuery`]: one question per request head
//!   ("substitute here, or not, and why") and one for the response mask of a host. The
//!   control side holds a ref narrowed to [`VaultControl`]: rotate, re-scope, remove,
//!   describe. Neither can ask the other's questions.
//! - [`ResponseMask`] is the length-preserving filter the vault builds for a host's
//!   responses: every occurrence of a value (raw, base64 at each alignment, standard and
//!   URL-safe alphabets) is overwritten; it always holds back exactly the last `W - 1` bytes
//!   (W: its longest pattern), whatever they contain, so what it emits and when never
//!   depends on whether a partial match is present.
//!
//! Invariant: placeholders are `msbph_` and 26 characters of `[a-z2-7]` (or a checked custom
//! string); a placeholder contains no byte that percent-encoding, JSON escaping or shell
//! quoting changes, so an encoded placeholder can only miss a substitution, never make one.

use std::fmt;

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Largest secret value in bytes.
pub const MAX_SECRET_VALUE: usize = 16 * 1024;
/// Most secrets per sandbox.
pub const MAX_SECRETS: usize = 64;
/// Most hosts per secret.
pub const MAX_SECRET_HOSTS: usize = 32;
/// Most header names a secret's scope lists.
pub const MAX_SCOPE_HEADERS: usize = 32;
/// Prefix of a generated placeholder.
pub const PLACEHOLDER_PREFIX: &str = "msbph_";
/// Characters after the prefix of a generated placeholder (base32: 130 bits).
pub const PLACEHOLDER_RANDOM: usize = 26;
/// Shortest value whose base64 forms the response mask looks for (shorter ones would mask
/// ordinary text; the raw value is always looked for).
pub const MIN_BASE64_MASK: usize = 6;

/// Why a secret's description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?} is not valid: use a letter or `_` first, then letters, digits or `_`, at most 64 in all (it becomes an environment variable)")]
    Name(String),
    #[error("secret host {0:?} is not valid: use a DNS name (`api.example.com`) or `*.` and a name for every name below it; IP addresses cannot be secret hosts (TLS names no IP)")]
    Host(String),
    #[error("secret {0}: {1}")]
    Value(String, String),
    #[error("placeholder {0:?} is not valid: use 16 to 256 printable ASCII characters without spaces, quotes or backslashes")]
    Placeholder(String),
    #[error("header name {0:?} is not a valid HTTP field name")]
    Header(String),
    #[error("secret {0}: {1}")]
    Spec(String, String),
}

/// A secret's name: the environment variable the guest's placeholder is given as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretName(String);

impl SecretName {
    pub fn new(s: &str) -> Result<SecretName, SecretError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if ok {
            Ok(SecretName(s.to_string()))
        } else {
            Err(SecretError::Name(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SecretName {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, SecretError> {
        SecretName::new(&s)
    }
}

impl From<SecretName> for String {
    fn from(n: SecretName) -> String {
        n.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DNS name as TLS and HTTP carry it, normalised: ASCII, lowercase, no trailing dot,
/// labels of letters, digits, `-` and `_` (1..=63 bytes each, 253 in all), at least two
/// labels... or one (`localhost`-style test names are allowed), never an IP literal.
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() || n.len() > 253 || n.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let labels_ok = n.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    // All-numeric last label: an address-like string, not a name.
    let last_numeric = n.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (labels_ok && !last_numeric).then_some(n)
}

/// Whether `authority` (a `Host` value or `:authority`, with or without a port) names
/// `sni` (normalised already).
pub fn authority_names(authority: &str, sni: &str) -> bool {
    if sni.is_empty() {
        return false;
    }
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return false,
        None => authority,
    };
    normalize_name(host).is_some_and(|h| h == sni)
}

/// Where a secret may go: one exact name, or `*.name` for every name below `name` (never
/// `name` itself, as in the egress policy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SecretHost {
    Exact(String),
    Below(String),
}

impl SecretHost {
    pub fn parse(s: &str) -> Result<SecretHost, SecretError> {
        let bad = || SecretError::Host(s.to_string());
        match s.strip_prefix("*.") {
            Some(rest) => normalize_name(rest).map(SecretHost::Below).ok_or_else(bad),
            None => normalize_name(s).map(SecretHost::Exact).ok_or_else(bad),
        }
    }

    /// Whether `name` (normalised already) is this host.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            SecretHost::Exact(h) => h == name,
            SecretHost::Below(d) => {
                name.len() > d.len() + 1 && name.ends_with(d.as_str()) && {
                    let cut = name.len() - d.len() - 1;
                    name.as_bytes()[cut] == b'.'
                }
            }
        }
    }
}

impl TryFrom<String> for SecretHost {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, SecretError> {
        SecretHost::parse(&s)
    }
}

impl From<SecretHost> for String {
    fn from(h: SecretHost) -> String {
        h.to_string()
    }
}

impl fmt::Display for SecretHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretHost::Exact(h) => f.write_str(h),
            SecretHost::Below(d) => write!(f, "*.{d}"),
        }
    }
}

/// The string the guest sees in place of a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Placeholder(String);

impl Placeholder {
    /// A generated placeholder from 26 random base32 characters (`random`: at least 17
    /// bytes of randomness; 5 bits of each of the first 26 are used).
    pub fn generated(random: &[u8; 26]) -> Placeholder {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let tail: String = random.iter().map(|b| ALPHABET[(b & 31) as usize] as char).collect();
        Placeholder(format!("{PLACEHOLDER_PREFIX}{tail}"))
    }

    /// A custom placeholder: 16..=256 printable ASCII bytes without spaces, quotes or
    /// backslashes (it loses the generated form's guarantee that no encoding alters it).
    pub fn custom(s: &str) -> Result<Placeholder, SecretError> {
        let ok = (16..=256).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'`'));
        if ok {
            Ok(Placeholder(s.to_string()))
        } else {
            Err(SecretError::Placeholder(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Placeholder {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, SecretError> {
        Placeholder::custom(&s)
    }
}

impl From<Placeholder> for String {
    fn from(p: Placeholder) -> String {
        p.0
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which request headers a secret may be substituted in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderScope {
    /// Every header but `Host` and the pseudo-headers.
    #[default]
    All,
    /// Only these (lowercase names).
    Only(Vec<String>),
    /// No header.
    None,
}

impl HeaderScope {
    /// `names` (any case) checked as HTTP field names.
    pub fn only(names: &[&str]) -> Result<HeaderScope, SecretError> {
        if names.len() > MAX_SCOPE_HEADERS {
            return Err(SecretError::Spec("headers".into(), format!("at most {MAX_SCOPE_HEADERS} header names")));
        }
        let mut out = Vec::new();
        for n in names {
            let ok = !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !ok {
                return Err(SecretError::Header(n.to_string()));
            }
            out.push(n.to_ascii_lowercase());
        }
        Ok(HeaderScope::Only(out))
    }

    pub fn allows(&self, lowercase_name: &str) -> bool {
        match self {
            HeaderScope::All => true,
            HeaderScope::Only(l) => l.iter().any(|n| n == lowercase_name),
            HeaderScope::None => false,
        }
    }
}

/// Where in a request a secret may be substituted. Never the path; never a body (body
/// substitution is not offered).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretScope {
    #[serde(default)]
    pub headers: HeaderScope,
    /// The query part of the request target.
    #[serde(default)]
    pub query: bool,
}

/// What a placeholder seen where it is not substituted does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    /// Forwarded unchanged (it is meaningless there) and written to the audit stream.
    #[default]
    Forward,
    /// The request is refused (403 over HTTP/1, 421... reset over HTTP/2) and audited.
    Block,
    /// The request is refused and the sandbox stopped.
    Stop,
}

impl std::str::FromStr for OnViolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "forward" => Ok(OnViolation::Forward),
            "block" => Ok(OnViolation::Block),
            "stop" => Ok(OnViolation::Stop),
            _ => Err(format!("on-violation={s}: use forward, block or stop")),
        }
    }
}

/// Where a value comes from when the sandbox starts (stored; the value is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    /// An environment variable of the process that starts the sandbox.
    Env(String),
    /// A file (one trailing newline stripped).
    File(std::path::PathBuf),
    /// Handed over by an API caller at every start (never stored).
    Given,
}

/// Everything about a secret but its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    pub name: SecretName,
    pub placeholder: Placeholder,
    pub hosts: Vec<SecretHost>,
    #[serde(default)]
    pub scope: SecretScope,
    #[serde(default)]
    pub on_violation: OnViolation,
    pub source: SecretSource,
}

impl SecretSpec {
    /// Checks the parts that relate to each other (at least one host, bounded lists).
    pub fn check(&self) -> Result<(), SecretError> {
        let err = |m: &str| SecretError::Spec(self.name.to_string(), m.to_string());
        if self.hosts.is_empty() {
            return Err(err("name at least one host it may be sent to"));
        }
        if self.hosts.len() > MAX_SECRET_HOSTS {
            return Err(err(&format!("at most {MAX_SECRET_HOSTS} hosts")));
        }
        if matches!(self.scope.headers, HeaderScope::None) && !self.scope.query {
            return Err(err("it may be substituted nowhere (no headers and no query)"));
        }
        Ok(())
    }

    /// Whether `name` (normalised) is one of this secret's hosts.
    pub fn allows_host(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(name))
    }
}

/// Checks a set of secrets together: at most [`MAX_SECRETS`], unique names, and no
/// placeholder that contains another (so one can never be found inside another).
pub fn check_secrets(specs: &[SecretSpec]) -> Result<(), SecretError> {
    if specs.len() > MAX_SECRETS {
        return Err(SecretError::Spec("*".into(), format!("at most {MAX_SECRETS} secrets per sandbox")));
    }
    for (i, a) in specs.iter().enumerate() {
        a.check()?;
        for b in &specs[i + 1..] {
            if a.name == b.name {
                return Err(SecretError::Spec(a.name.to_string(), "named twice".into()));
            }
            if a.placeholder.as_str().contains(b.placeholder.as_str())
                || b.placeholder.as_str().contains(a.placeholder.as_str())
            {
                return Err(SecretError::Spec(
                    a.name.to_string(),
                    format!("its placeholder and that of {} contain one another", b.name),
                ));
            }
        }
    }
    Ok(())
}

/// A secret's value. Not `Clone`, not `Serialize`; `Debug` shows only its length; wiped
/// when dropped.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Checks `bytes` as the value of secret `name`: not empty, at most
    /// [`MAX_SECRET_VALUE`] bytes, no control byte. The error names the secret, never the
    /// value; `bytes` is wiped either way.
    pub fn new(name: &str, bytes: Vec<u8>) -> Result<SecretValue, SecretError> {
        let bytes = Zeroizing::new(bytes);
        let why = if bytes.is_empty() {
            Some("the value is empty".to_string())
        } else if bytes.len() > MAX_SECRET_VALUE {
            Some(format!("the value is longer than {MAX_SECRET_VALUE} bytes"))
        } else if let Some(at) = bytes.iter().position(|b| b.is_ascii_control()) {
            let what = match bytes[at] {
                b'\r' => "a carriage return (CR)".to_string(),
                b'\n' => "a line feed (LF)".to_string(),
                0 => "a NUL byte".to_string(),
                b => format!("the control byte 0x{b:02x}"),
            };
            Some(format!(
                "the value holds {what} at byte {at}; control bytes could split an HTTP header, so they are refused"
            ))
        } else {
            None
        };
        match why {
            Some(w) => Err(SecretError::Value(name.to_string(), w)),
            None => Ok(SecretValue(bytes)),
        }
    }

    /// Like [`SecretValue::new`] for a value read from a file: one trailing `\n` or `\r\n`
    /// is stripped first.
    pub fn from_file_bytes(name: &str, mut bytes: Vec<u8>) -> Result<SecretValue, SecretError> {
        if bytes.ends_with(b"\r\n") {
            bytes.truncate(bytes.len() - 2);
        } else if bytes.ends_with(b"\n") {
            bytes.truncate(bytes.len() - 1);
        }
        SecretValue::new(name, bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes, redacted>)", self.0.len())
    }
}

/// What the gateway knows about the flow a request head came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowIdentity {
    /// The TLS server name the guest asked for (normalised), which the gateway's leaf
    /// certificate named.
    pub sni: String,
    /// The destination address is one the gateway resolved for `sni` for this sandbox.
    pub pinned: bool,
    /// The upstream's certificate was verified for `sni`.
    pub verified: bool,
}

/// A request head: method, target (origin form, or absolute form over HTTP/1) and fields in
/// order. `authority` is the `Host` field (HTTP/1, present exactly once) or `:authority`
/// (HTTP/2), as the gateway read it; it is not among `headers` for HTTP/2.
pub struct RequestHead {
    pub method: String,
    pub target: Zeroizing<Vec<u8>>,
    pub authority: String,
    pub headers: Vec<(String, Zeroizing<Vec<u8>>)>,
}

impl fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestHead({} … for {}, {} fields)", self.method, self.authority, self.headers.len())
    }
}

/// Where a placeholder was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    Header,
    Query,
    Path,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Location::Header => "header",
            Location::Query => "query",
            Location::Path => "path",
        })
    }
}

/// A placeholder seen where it is not substituted, and why (never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub secret: SecretName,
    pub location: Location,
    pub why: String,
    pub action: OnViolation,
}

/// The vault's answer for one request head.
pub struct Answer {
    /// The head to send upstream when something was substituted (`None`: send it as it
    /// came).
    pub rewritten: Option<RequestHead>,
    /// Names of the header fields that now hold a value (to be sent never-indexed).
    pub sensitive: Vec<String>,
    /// Placeholders seen where they were not substituted.
    pub violations: Vec<Violation>,
    /// The request must not be forwarded (a violation said block or stop).
    pub refuse: bool,
    /// Stop the sandbox (a violation said stop).
    pub stop: bool,
    /// The mask for this host's responses, with the values in force now.
    pub mask: ResponseMask,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("rewritten", &self.rewritten.is_some())
            .field("sensitive", &self.sensitive)
            .field("violations", &self.violations)
            .field("refuse", &self.refuse)
            .finish()
    }
}

/// What the gateway may ask the vault.
#[derive(Debug)]
pub enum VaultQuery {
    /// One request head on an intercepted flow.
    Substitute { flow: FlowIdentity, head: RequestHead, reply: RpcReplyPort<Answer> },
    /// The mask for responses from `sni` (empty when no secret goes there).
    Mask { sni: String, reply: RpcReplyPort<ResponseMask> },
}

/// What the control side may ask the vault. Each change applies from the next request,
/// kept-alive connections included.
#[derive(Debug)]
pub enum VaultControl {
    /// A new value for a secret.
    Rotate { name: SecretName, value: SecretValue, reply: RpcReplyPort<Result<(), String>> },
    /// New hosts for a secret.
    SetHosts { name: SecretName, hosts: Vec<SecretHost>, reply: RpcReplyPort<Result<(), String>> },
    /// Forget a secret (its placeholder then goes out unchanged).
    Remove { name: SecretName, reply: RpcReplyPort<Result<(), String>> },
    /// The secrets as they stand (no values).
    Describe(RpcReplyPort<Vec<SecretInfo>>),
}

/// A secret as `inspect` shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: SecretName,
    pub placeholder: Placeholder,
    pub hosts: Vec<SecretHost>,
    pub scope: SecretScope,
    pub on_violation: OnViolation,
    /// Whether the value's memory is locked against swapping.
    pub locked: bool,
}

/// A length-preserving filter over one response stream: see the module doc.
#[derive(Default)]
pub struct ResponseMask {
    patterns: Vec<Zeroizing<Vec<u8>>>,
    held: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for ResponseMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseMask({} patterns)", self.patterns.len())
    }
}

/// The byte a masked value is overwritten with.
pub const MASK_BYTE: u8 = b'*';

impl ResponseMask {
    /// A mask for `values`: each raw, and its base64 forms (standard and URL-safe, at the
    /// three alignments) when at least [`MIN_BASE64_MASK`] bytes long.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> ResponseMask {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        for v in values {
            if v.is_empty() {
                continue;
            }
            patterns.push(Zeroizing::new(v.to_vec()));
            if v.len() >= MIN_BASE64_MASK {
                for form in base64_forms(v) {
                    if !patterns.iter().any(|p| **p == *form) {
                        patterns.push(form);
                    }
                }
            }
        }
        ResponseMask { patterns, held: Zeroizing::new(Vec::new()) }
    }

    /// A mask with the same patterns and nothing held.
    pub fn same_patterns(&self) -> ResponseMask {
        ResponseMask { patterns: self.patterns.clone(), held: Zeroizing::new(Vec::new()) }
    }

    /// Whether it looks for anything.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Bytes held back: the longest pattern less one.
    pub fn window(&self) -> usize {
        self.patterns.iter().map(|p| p.len()).max().unwrap_or(1).saturating_sub(1)
    }

    /// Replaces the patterns (a rotation), keeping what is held: held bytes are masked
    /// against the new patterns as they leave.
    pub fn update(&mut self, new: ResponseMask) {
        self.patterns = new.patterns;
    }

    /// Takes `data`, returns what may go on: everything but the last [`Self::window`]
    /// bytes of what is held plus `data`, with every whole occurrence of a pattern masked.
    /// The length returned depends only on the lengths given, never on the content.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let w = self.window();
        let mut buf = std::mem::take(&mut *self.held);
        buf.extend_from_slice(data);
        self.mask_all(&mut buf);
        let keep = buf.len().min(w);
        let tail = buf.split_off(buf.len() - keep);
        *self.held = tail;
        let out = buf.clone();
        buf.zeroize();
        out
    }

    /// Everything held (the stream ended or went idle); a partial match is never masked.
    pub fn flush(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut *self.held);
        self.mask_all(&mut buf);
        let out = buf.clone();
        buf.zeroize();
        out
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn mask_all(&self, buf: &mut [u8]) {
        for p in &self.patterns {
            let n = p.len();
            if n == 0 || n > buf.len() {
                continue;
            }
            let mut i = 0;
            while i + n <= buf.len() {
                if buf[i..i + n] == p[..] {
                    buf[i..i + n].fill(MASK_BYTE);
                    i += n;
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// The base64 text that `v` always turns into, whatever bytes come before or after it: for
/// each of the three alignments, the characters of the groups that lie wholly inside `v`,
/// in the standard and the URL-safe alphabet.
fn base64_forms(v: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for skip in 0..3 {
        // Bytes of `v` from `skip` on are group-aligned when `skip` bytes of `v` complete
        // the group the prefix started.
        let body = &v[skip.min(v.len())..];
        let groups = body.len() / 3;
        if groups < 2 {
            continue;
        }
        let mut s = Zeroizing::new(Vec::with_capacity(groups * 4));
        for g in body[..groups * 3].chunks_exact(3) {
            let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
            for k in (0..4).rev() {
                s.push(STD[((n >> (6 * k)) & 63) as usize]);
            }
        }
        let url: Zeroizing<Vec<u8>> = Zeroizing::new(
            s.iter()
                .map(|&c| match c {
                    b'+' => b'-',
                    b'/' => b'_',
                    c => c,
                })
                .collect(),
        );
        if *url != *s {
            out.push(url);
        }
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &[u8]) -> String {
        const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for g in v.chunks(3) {
            let b = [g[0], *g.get(1).unwrap_or(&0), *g.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for k in 0..=g.len() {
                s.push(STD[((n >> (6 * (3 - k))) & 63) as usize] as char);
            }
        }
        s
    }

    #[test]
    fn names_and_hosts_are_checked() {
        assert!(SecretName::new("API_KEY").is_ok());
        assert!(SecretName::new("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A=B", &"A".repeat(65)] {
            assert!(SecretName::new(bad).is_err(), "{bad}");
        }
        assert_eq!(SecretHost::parse("API.Example.COM.").unwrap(), SecretHost::Exact("api.example.com".into()));
        for bad in ["1.2.3.4", "::1", "*.", "a..b", "-a.com", "a b", "*.*.a.com"] {
            assert!(SecretHost::parse(bad).is_err(), "{bad}");
        }
        let below = SecretHost::parse("*.example.com").unwrap();
        assert!(below.matches("a.example.com") && below.matches("a.b.example.com"));
        assert!(!below.matches("example.com") && !below.matches("badexample.com") && !below.matches("com"));
        let exact = SecretHost::parse("api.test").unwrap();
        assert!(exact.matches("api.test") && !exact.matches("x.api.test") && !exact.matches("test"));
    }

    #[test]
    fn values_with_control_bytes_are_refused_naming_the_secret_not_the_value() {
        let e = SecretValue::new("TOKEN", b"abc\rdef".to_vec()).unwrap_err().to_string();
        assert!(e.contains("TOKEN") && e.contains("carriage return") && !e.contains("abc"), "{e}");
        assert!(SecretValue::new("T", b"a\nb".to_vec()).is_err());
        assert!(SecretValue::new("T", b"a\0b".to_vec()).is_err());
        assert!(SecretValue::new("T", Vec::new()).is_err());
        assert!(SecretValue::new("T", vec![b'a'; MAX_SECRET_VALUE + 1]).is_err());
        let v = SecretValue::from_file_bytes("T", b"sk-123\n".to_vec()).unwrap();
        assert_eq!(v.expose(), b"sk-123");
        let v = SecretValue::from_file_bytes("T", b"sk-123\r\n".to_vec()).unwrap();
        assert_eq!(v.expose(), b"sk-123");
        assert!(SecretValue::from_file_bytes("T", b"sk\n\n".to_vec()).is_err(), "only one newline goes");
        assert_eq!(format!("{v:?}"), "SecretValue(<6 bytes, redacted>)");
    }

    #[test]
    fn placeholders_are_checked_and_never_contain_one_another() {
        let p = Placeholder::generated(&[7; 26]);
        assert!(p.as_str().starts_with(PLACEHOLDER_PREFIX) && p.as_str().len() == 32);
        assert!(p.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        assert!(Placeholder::custom("short").is_err());
        assert!(Placeholder::custom("has a space in it....").is_err());
        assert!(Placeholder::custom("sk-placeholder-0123456789").is_ok());
        let spec = |n: &str, p: &str| SecretSpec {
            name: SecretName::new(n).unwrap(),
            placeholder: Placeholder::custom(p).unwrap(),
            hosts: vec![SecretHost::parse("a.test").unwrap()],
            scope: SecretScope::default(),
            on_violation: OnViolation::Forward,
            source: SecretSource::Given,
        };
        assert!(check_secrets(&[spec("A", "placeholder-aaaa-1"), spec("B", "placeholder-aaaa-2")]).is_ok());
        assert!(check_secrets(&[spec("A", "placeholder-aaaa-1"), spec("B", "placeholder-aaaa-12")]).is_err());
        assert!(check_secrets(&[spec("A", "placeholder-aaaa-1"), spec("A", "placeholder-aaaa-2")]).is_err());
        let mut nowhere = spec("A", "placeholder-aaaa-1");
        nowhere.scope = SecretScope { headers: HeaderScope::None, query: false };
        assert!(nowhere.check().is_err());
    }

    #[test]
    fn the_mask_catches_a_value_and_its_base64_at_every_split() {
        let value = b"sk-live-0123456789abcdef";
        let encoded = [b64(value), b64(&[b"x".as_slice(), value].concat()), b64(&[b"xy".as_slice(), value].concat())];
        let mut texts: Vec<Vec<u8>> = vec![[b"pre ".as_slice(), value, b" post"].concat()];
        for e in &encoded {
            texts.push(format!("Authorization: Basic {e}\r\n").into_bytes());
        }
        for text in texts {
            for split in 0..=text.len() {
                let mut m = ResponseMask::new([value.as_slice()]);
                let mut out = m.push(&text[..split]);
                out.extend(m.push(&text[split..]));
                out.extend(m.flush());
                assert_eq!(out.len(), text.len());
                let s = String::from_utf8_lossy(&out);
                assert!(!s.contains("0123456789abcdef"), "split {split}: {s}");
                for e in &encoded {
                    assert!(!s.contains(&e[8..e.len() - 8]), "split {split}: {s}");
                }
            }
        }
    }

    #[test]
    fn the_mask_emits_the_same_lengths_whether_or_not_a_partial_match_is_there() {
        let value = b"sk-live-0123456789abcdef";
        let with_prefix = [b"0123456789".as_slice(), &value[..10]].concat();
        let without = [b"0123456789".as_slice(), b"qqqqqqqqqq"].concat();
        assert_eq!(with_prefix.len(), without.len());
        let lens = |input: &[u8]| {
            let mut m = ResponseMask::new([value.as_slice()]);
            let a = m.push(&input[..7]).len();
            let b = m.push(&input[7..]).len();
            let c = m.push(b"tail bytes of the answer").len();
            (a, b, c, m.flush().len())
        };
        assert_eq!(lens(&with_prefix), lens(&without));
        let mut m = ResponseMask::new([value.as_slice()]);
        let mut out = m.push(&with_prefix);
        out.extend(m.flush());
        assert_eq!(out, with_prefix, "a partial match is never masked");
    }
}
