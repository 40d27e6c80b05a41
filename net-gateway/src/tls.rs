//! TLS interception for secret hosts (`research/secrets.md` §5.2–5.6).
//!
//! Only flows the stack chose ([`crate::stack::Event::Intercept`]: allowed by the policy,
//! a ClientHello whose SNI is a secret's host, a destination pinned for that name, an ALPN
//! list that is empty or offers HTTP) come here; every other flow is relayed byte for byte.
//!
//! Order of a connection: the guest's ClientHello is read (rustls `Acceptor`); the upstream
//! is dialed with the same name and the guest's ALPN list filtered to `h2`/`http/1.1`, and
//! its certificate verified for that name against the host's roots plus the operator's
//! extra CAs (there is no way to skip this); only then is the guest's handshake finished,
//! with a leaf for that name signed by this sandbox's CA and exactly the protocol the
//! upstream chose (so HTTP/2 and gRPC keep working). An upstream that fails gets no byte of
//! the guest's, and the guest gets a TLS alert.
//!
//! Then every request head — each HTTP/1 head on a kept-alive connection, each HTTP/2
//! stream's header block as `h2` decoded it (Huffman, dynamic table and CONTINUATION
//! undone) — is checked: its authority must be the TLS name (else 403 over HTTP/1, 421
//! over HTTP/2, and nothing is forwarded), and the vault answers whether to substitute.
//! Substituted HTTP/2 fields are sent never-indexed. Bodies stream through untouched.
//! Response bytes pass the vault's [`ResponseMask`] for the host, which holds back a fixed
//! window and releases it after [`MASK_IDLE`] or at the end, whatever it holds.
//!
//! Invariants: the CA's key is made here, per gateway (one per sandbox start), and never
//! leaves memory; leaves are cached for at most [`MAX_LEAVES`] names; 0-RTT is off both
//! ways; the plaintext of a head is in zeroized buffers; nothing here logs a header value.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use msb_schema::secret::{Answer, FlowIdentity, RequestHead, ResponseMask, VaultQuery};
use ractor::DerivedActorRef;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

use crate::http1::{Requests, Step};
use crate::sniff::Sniffed;

/// Most names with a cached leaf.
pub const MAX_LEAVES: usize = 256;
/// Longest either handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the response mask holds bytes back when no more come.
pub const MASK_IDLE: Duration = Duration::from_millis(5);
/// Longest the vault may take to answer.
pub const VAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most concurrent HTTP/2 streams offered to the guest.
pub const H2_MAX_STREAMS: u32 = 128;
/// Largest HTTP/2 header list either way.
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Largest read at once from either side.
const CHUNK: usize = 16 * 1024;

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("making the sandbox's CA or a leaf: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable CA certificate in {0}")]
    NoRoots(String),
}

/// What happened on an intercepted connection, for the audit stream (never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsReport {
    /// The upstream could not be reached over TLS for `sni` (its certificate did not verify,
    /// it spoke no TLS, it timed out): the guest got an alert.
    UpstreamFailed { sni: String, why: String },
    /// A request's secrets were substituted.
    Substituted { sni: String, secrets: Vec<String> },
    /// A placeholder was seen where it is not substituted.
    Violation { sni: String, secret: String, location: String, why: String, action: String },
    /// A request was refused (authority mismatch, a blocking violation, bad framing).
    Refused { sni: String, why: String },
    /// A violation asked for the sandbox to stop.
    Stop { sni: String, secret: String },
}

/// The sandbox's interception CA: made in memory, never written anywhere.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

impl Ca {
    /// A fresh P-256 CA named after `label`, valid from an hour ago for a year, that may sign
    /// leaves only (path length 0).
    pub fn generate(label: &str) -> Result<Ca, TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cn: String = format!("msb sandbox {label} CA").chars().filter(|c| !c.is_control()).take(64).collect();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name.push(DnType::OrganizationName, "msb");
        validity(&mut p, 365);
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        Ok(Ca { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(p, key) })
    }

    /// The CA certificate, PEM (what the guest trusts).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// A leaf for `name`, valid from an hour ago for a week.
    fn leaf(&self, name: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, 7);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let der = Zeroizing::new(key.serialize_der());
        Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))))
    }
}

/// Reads every certificate of a PEM file.
pub fn load_pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::NoRoots(format!("{}: {e}", path.display())))?
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoRoots(path.display().to_string()));
    }
    Ok(certs)
}

fn root_candidates() -> impl Iterator<Item = std::path::PathBuf> {
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    env.into_iter().chain(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
            "/etc/ssl/ca-bundle.pem",
        ]
        .into_iter()
        .map(std::path::PathBuf::from),
    )
}

/// The files [`host_roots`] may read (those that exist), so that a process confined to a
/// list of paths can keep them.
pub fn host_root_files() -> Vec<std::path::PathBuf> {
    root_candidates().filter(|p| p.is_file()).collect()
}

/// The host's trust anchors: `SSL_CERT_FILE` if set, else the first system bundle found
/// (empty when the host has none).
pub fn host_roots() -> Vec<CertificateDer<'static>> {
    for c in root_candidates() {
        if let Ok(certs) = load_pem_certs(&c) {
            return certs;
        }
    }
    Vec::new()
}

/// Cached guest-side configurations by name, and the order they were made (oldest first).
type Leaves = (HashMap<String, Arc<ServerConfig>>, VecDeque<String>);

/// One gateway's interception: its CA, leaf cache, upstream client configuration and the
/// vault to ask.
pub struct Interceptor {
    ca: Ca,
    leaves: Mutex<Leaves>,
    client: ClientConfig,
    vault: DerivedActorRef<VaultQuery>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interceptor")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Interceptor {
    /// An interceptor whose upstreams are verified against the host's roots ([`host_roots`],
    /// or Mozilla's set compiled into msb where the host has none) and `extra` (the
    /// operator's CAs for private endpoints).
    pub fn new(
        label: &str,
        extra: Vec<CertificateDer<'static>>,
        vault: DerivedActorRef<VaultQuery>,
    ) -> Result<Interceptor, TlsError> {
        let mut store = RootCertStore::empty();
        let (host, _) = store.add_parsable_certificates(host_roots());
        if host == 0 {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        let (added, _) = store.add_parsable_certificates(extra.clone());
        if added < extra.len() {
            return Err(TlsError::NoRoots("a --tls-upstream-ca file (a certificate in it does not parse)".into()));
        }
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Interceptor {
            ca: Ca::generate(label)?,
            leaves: Mutex::new((HashMap::new(), VecDeque::new())),
            client,
            vault,
        })
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// The guest-side configuration for `name` (leaf cached per name, so resumption stays
    /// per name) with `alpn` as the only protocol offered.
    fn server_config(&self, name: &str, alpn: Option<&[u8]>) -> Result<Arc<ServerConfig>, TlsError> {
        let cached =
            self.leaves.lock().map_err(|_| TlsError::NoRoots("poisoned leaf cache".into()))?.0.get(name).cloned();
        let base = match cached {
            Some(c) => c,
            None => {
                let (leaf, key) = self.ca.leaf(name)?;
                let cfg = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_single_cert(vec![leaf, self.ca.der().clone()], key)?;
                let cfg = Arc::new(cfg);
                let mut g = self.leaves.lock().map_err(|_| TlsError::NoRoots("poisoned leaf cache".into()))?;
                let (map, order) = &mut *g;
                if map.len() >= MAX_LEAVES {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
                if map.insert(name.to_string(), cfg.clone()).is_none() {
                    order.push_back(name.to_string());
                }
                cfg
            }
        };
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
        cfg.max_early_data_size = 0;
        Ok(Arc::new(cfg))
    }

    /// Runs one intercepted connection: `guest` carries the guest's bytes (from its first,
    /// the ClientHello), `upstream` is the connected host socket, `sni` the name the stack
    /// read and `pinned` whether the destination was resolved for it. Reports go to
    /// `report`.
    pub async fn run<G, U>(
        self: Arc<Self>,
        guest: G,
        upstream: U,
        sni: String,
        pinned: bool,
        report: impl Fn(TlsReport) + Send + Sync + 'static,
    ) where
        G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let report: Arc<dyn Fn(TlsReport) + Send + Sync> = Arc::new(report);
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), guest);
        let Ok(Ok(start)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await else { return };
        let hello = start.client_hello();
        let named = hello.server_name().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let offered: Vec<Vec<u8>> = hello.alpn().map(|i| i.map(<[u8]>::to_vec).collect()).unwrap_or_default();
        let alpn: Vec<Vec<u8>> = offered.iter().filter(|p| *p == b"h2" || *p == b"http/1.1").cloned().collect();
        let tokio_rustls::StartHandshake { accepted, mut io, .. } = start;
        let fail = |why: String| (report)(TlsReport::UpstreamFailed { sni: sni.clone(), why });
        if named.as_deref() != Some(sni.as_str()) || (!offered.is_empty() && alpn.is_empty()) {
            // The stack read another name or protocol; nothing goes anywhere.
            let _ = io.write_all(&crate::sniff::tls_access_denied()).await;
            return fail("the ClientHello changed between the gateway's look and the handshake".into());
        }
        let mut cfg = self.client.clone();
        cfg.alpn_protocols = alpn;
        cfg.enable_early_data = false;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let server_name = match ServerName::try_from(sni.clone()) {
            Ok(n) => n,
            Err(_) => return,
        };
        let up = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = io.write_all(&crate::sniff::tls_access_denied()).await;
                let _ = io.shutdown().await;
                return fail(format!("upstream TLS for {sni} failed: {e}"));
            }
            Err(_) => {
                let _ = io.write_all(&crate::sniff::tls_access_denied()).await;
                return fail(format!("the upstream TLS handshake for {sni} took longer than {HANDSHAKE_TIMEOUT:?}"));
            }
        };
        let chosen = up.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let server_cfg = match self.server_config(&sni, chosen.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                let _ = io.write_all(&crate::sniff::tls_access_denied()).await;
                return fail(format!("minting a certificate for {sni}: {e}"));
            }
        };
        let start = tokio_rustls::StartHandshake::from_parts(accepted, io);
        let Ok(Ok(guest)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(server_cfg)).await else {
            return;
        };
        let identity = FlowIdentity { sni: sni.clone(), pinned, verified: true };
        let ctx = Conn { vault: self.vault.clone(), identity, report };
        if chosen.as_deref() == Some(b"h2") {
            h2_proxy(guest, up, ctx).await;
        } else {
            http1_proxy(guest, up, ctx).await;
        }
    }
}

/// What both proxies need.
#[derive(Clone)]
struct Conn {
    vault: DerivedActorRef<VaultQuery>,
    identity: FlowIdentity,
    report: Arc<dyn Fn(TlsReport) + Send + Sync>,
}

impl Conn {
    async fn ask(&self, head: RequestHead) -> Option<Answer> {
        let flow = self.identity.clone();
        let q = ractor::call_t!(
            self.vault,
            |reply| VaultQuery::Substitute { flow, head, reply },
            VAULT_TIMEOUT.as_millis() as u64
        );
        q.ok()
    }

    async fn mask(&self) -> ResponseMask {
        let sni = self.identity.sni.clone();
        ractor::call_t!(self.vault, |reply| VaultQuery::Mask { sni, reply }, VAULT_TIMEOUT.as_millis() as u64)
            .unwrap_or_default()
    }

    /// Reports the answer's violations and substitutions.
    fn note(&self, a: &Answer) {
        let sni = &self.identity.sni;
        for v in &a.violations {
            (self.report)(TlsReport::Violation {
                sni: sni.clone(),
                secret: v.secret.to_string(),
                location: v.location.to_string(),
                why: v.why.clone(),
                action: format!("{:?}", v.action).to_lowercase(),
            });
            if v.action == msb_schema::secret::OnViolation::Stop {
                (self.report)(TlsReport::Stop { sni: sni.clone(), secret: v.secret.to_string() });
            }
        }
        if a.rewritten.is_some() {
            (self.report)(TlsReport::Substituted { sni: sni.clone(), secrets: a.sensitive.clone() });
        }
    }

    fn refused(&self, why: String) {
        (self.report)(TlsReport::Refused { sni: self.identity.sni.clone(), why });
    }
}

/// An HTTP/1 head (exactly the bytes the framer handed out: request line, at most 128
/// fields, the blank line) as a [`RequestHead`] with its `Host` as the authority, and the
/// version byte (`0`: HTTP/1.0); `None` when it does not parse whole or has no `Host`.
pub fn parse_head(bytes: &[u8]) -> Option<(RequestHead, u8)> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) if n == bytes.len() => {}
        _ => return None,
    }
    let mut authority = None;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            authority = Some(std::str::from_utf8(h.value).ok()?.trim().to_string());
        }
        headers.push((h.name.to_string(), Zeroizing::new(h.value.to_vec())));
    }
    let head = RequestHead {
        method: req.method?.to_string(),
        target: Zeroizing::new(req.path?.as_bytes().to_vec()),
        authority: authority?,
        headers,
    };
    Some((head, req.version?))
}

/// A head written out as HTTP/1 (`method target HTTP/1.x`, each field as `name: value`).
pub fn serialize_head(h: &RequestHead, version: u8) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(256));
    out.extend_from_slice(h.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&h.target);
    out.extend_from_slice(if version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    for (n, v) in &h.headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn status_page(code: u16, reason: &str, why: &str) -> Vec<u8> {
    let body = format!("msb: {why}\n");
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

type Pending = Pin<Box<dyn Future<Output = Option<Answer>> + Send>>;

/// Writes `bytes` and flushes: a TLS writer keeps records it could not hand to a full pipe
/// until the next write or a flush, so without one the end of a stream could wait forever.
async fn send(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// HTTP/1.1 over the two TLS sessions: one loop owns both, so a head waits for the vault
/// while responses keep flowing.
async fn http1_proxy<G, U>(guest: G, up: U, ctx: Conn)
where
    G: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut grd, mut gwr) = tokio::io::split(guest);
    let (mut urd, mut uwr) = tokio::io::split(up);
    let mut requests = Requests::default();
    let mut mask = ctx.mask().await;
    let mut gbuf: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::new());
    let mut gchunk = Zeroizing::new(vec![0u8; CHUNK]);
    let mut uchunk = vec![0u8; CHUNK];
    let mut pending: Option<(Pending, usize, u8)> = None;
    // Bytes of an accepted head still to be dropped from `gbuf` (the rewritten one went).
    let mut skip = 0usize;
    let (mut guest_open, mut up_open, mut up_shut) = (true, true, false);
    loop {
        // Frame what the guest sent, as far as it goes without the vault.
        while pending.is_none() && !gbuf.is_empty() {
            match requests.step(&gbuf) {
                Step::Forward(n) => {
                    let (drop_n, send_n) = if skip > 0 { (n.min(skip), 0) } else { (0, n) };
                    if send_n > 0 && send(&mut uwr, &gbuf[..send_n]).await.is_err() {
                        return;
                    }
                    skip -= drop_n;
                    let used = drop_n + send_n;
                    gbuf[..used].zeroize();
                    gbuf.drain(..used);
                }
                Step::Head { len, host } => {
                    let name_ok = matches!(&host, Sniffed::Http(n) if n.to_string() == ctx.identity.sni);
                    let parsed = if name_ok { parse_head(&gbuf[..len]) } else { None };
                    let Some((head, version)) = parsed else {
                        let why = format!(
                            "a request on this connection names another host than {}, or no single Host",
                            ctx.identity.sni
                        );
                        let _ = send(&mut gwr, &status_page(403, "Forbidden", &why)).await;
                        let _ = gwr.shutdown().await;
                        return ctx.refused(why);
                    };
                    let c = ctx.clone();
                    pending = Some((Box::pin(async move { c.ask(head).await }), len, version));
                }
                Step::NeedMore => break,
                Step::Bad(why) => {
                    let _ = send(&mut gwr, &status_page(400, "Bad Request", why)).await;
                    let _ = gwr.shutdown().await;
                    return ctx.refused(why.to_string());
                }
            }
        }
        if !guest_open && !up_shut && pending.is_none() && gbuf.is_empty() {
            up_shut = true;
            let _ = uwr.shutdown().await;
        }
        if !up_open && !guest_open {
            return;
        }
        let held = mask.held() > 0;
        tokio::select! {
            r = async { pending.as_mut().expect("guarded").0.as_mut().await }, if pending.is_some() => {
                let (_, len, version) = pending.take().expect("guarded");
                let Some(answer) = r else {
                    let _ = send(&mut gwr, &status_page(503, "Service Unavailable", "the secret vault did not answer")).await;
                    return ctx.refused("the vault did not answer".into());
                };
                ctx.note(&answer);
                mask.update(answer.mask);
                if answer.refuse {
                    let why = "a secret's placeholder is where its policy blocks it".to_string();
                    let _ = send(&mut gwr, &status_page(403, "Forbidden", &why)).await;
                    let _ = gwr.shutdown().await;
                    return ctx.refused(why);
                }
                requests.accept_head(len);
                if let Some(h) = &answer.rewritten {
                    if send(&mut uwr, &serialize_head(h, version)).await.is_err() {
                        return;
                    }
                    skip = len;
                }
            }
            n = grd.read(&mut gchunk[..]), if guest_open && pending.is_none() && gbuf.len() < crate::sniff::MAX_SNIFF + CHUNK => match n {
                Ok(0) | Err(_) => guest_open = false,
                Ok(n) => {
                    gbuf.extend_from_slice(&gchunk[..n]);
                    gchunk[..n].zeroize();
                }
            },
            n = urd.read(&mut uchunk), if up_open => match n {
                Ok(0) | Err(_) => {
                    up_open = false;
                    let rest = mask.flush();
                    let _ = send(&mut gwr, &rest).await;
                    let _ = gwr.shutdown().await;
                }
                Ok(n) => {
                    requests.response(&uchunk[..n]);
                    let out = mask.push(&uchunk[..n]);
                    if send(&mut gwr, &out).await.is_err() {
                        return;
                    }
                }
            },
            _ = tokio::time::sleep(MASK_IDLE), if held => {
                let rest = mask.flush();
                if send(&mut gwr, &rest).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// HTTP/2 over the two TLS sessions: `h2` is the server towards the guest and the client
/// towards the upstream; each guest stream becomes one upstream stream.
async fn h2_proxy<G, U>(guest: G, up: U, ctx: Conn)
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let server = h2::server::Builder::new()
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .handshake::<_, Bytes>(guest);
    let Ok(Ok(mut server)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, server).await else { return };
    let client = h2::client::Builder::new().max_header_list_size(H2_MAX_HEADER_LIST).handshake::<_, Bytes>(up);
    let Ok(Ok((client, conn))) = tokio::time::timeout(HANDSHAKE_TIMEOUT, client).await else { return };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut streams = tokio::task::JoinSet::new();
    while let Some(next) = server.accept().await {
        let Ok((req, respond)) = next else { break };
        let (ctx, client) = (ctx.clone(), client.clone());
        streams.spawn(async move { h2_stream(req, respond, client, ctx).await });
        while streams.try_join_next().is_some() {}
    }
    streams.abort_all();
    driver.abort();
}

fn h2_refuse(mut respond: h2::server::SendResponse<Bytes>, code: u16, why: &str) {
    let body = Bytes::from(format!("msb: {why}\n"));
    let resp = http::Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .header("content-length", body.len())
        .body(())
        .expect("static response");
    if let Ok(mut s) = respond.send_response(resp, false) {
        let _ = s.send_data(body, true);
    }
}

async fn h2_stream(
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    client: h2::client::SendRequest<Bytes>,
    ctx: Conn,
) {
    let (parts, body) = req.into_parts();
    let sni = ctx.identity.sni.clone();
    let authority = parts.uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let host_ok = parts
        .headers
        .get_all(http::header::HOST)
        .iter()
        .all(|h| h.to_str().is_ok_and(|h| msb_schema::secret::authority_names(h, &sni)));
    if !msb_schema::secret::authority_names(&authority, &sni) || !host_ok || parts.method == http::Method::CONNECT {
        let why =
            format!("this stream names {authority:?}, not {sni} (a connection to one host carries only its requests)");
        h2_refuse(respond, 421, &why);
        return ctx.refused(why);
    }
    let target = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let headers: Vec<(String, Zeroizing<Vec<u8>>)> =
        parts.headers.iter().map(|(n, v)| (n.as_str().to_string(), Zeroizing::new(v.as_bytes().to_vec()))).collect();
    let head = RequestHead {
        method: parts.method.as_str().to_string(),
        target: Zeroizing::new(target.into_bytes()),
        authority: authority.clone(),
        headers,
    };
    let Some(answer) = ctx.ask(head).await else {
        h2_refuse(respond, 503, "the secret vault did not answer");
        return ctx.refused("the vault did not answer".into());
    };
    ctx.note(&answer);
    if answer.refuse {
        let why = "a secret's placeholder is where its policy blocks it";
        h2_refuse(respond, 403, why);
        return ctx.refused(why.into());
    }
    let Answer { rewritten, sensitive, mask, .. } = answer;
    let mut out = http::Request::builder().method(parts.method.clone()).version(http::Version::HTTP_2);
    let (target, fields) = match &rewritten {
        Some(h) => (h.target.to_vec(), h.headers.iter().map(|(n, v)| (n.clone(), v.to_vec())).collect::<Vec<_>>()),
        None => (
            parts.uri.path_and_query().map(|p| p.as_str().as_bytes().to_vec()).unwrap_or_else(|| b"/".to_vec()),
            parts.headers.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect(),
        ),
    };
    let uri = format!("https://{authority}{}", String::from_utf8_lossy(&target));
    out = out.uri(uri);
    for (n, v) in fields {
        let Ok(mut value) = http::HeaderValue::from_bytes(&v) else { continue };
        if sensitive.iter().any(|s| s.eq_ignore_ascii_case(&n)) {
            value.set_sensitive(true); // never indexed in the upstream's HPACK table
        }
        out = out.header(n, value);
    }
    let Ok(request) = out.body(()) else {
        h2_refuse(respond, 400, "the request could not be rebuilt");
        return;
    };
    drop(rewritten);
    let end = body.is_end_stream();
    let mut client = match client.ready().await {
        Ok(c) => c,
        Err(_) => return,
    };
    let Ok((response, send)) = client.send_request(request, end) else { return };
    let upload = (!end).then(|| tokio::spawn(pipe_h2(body, send, None)));
    let mut respond = respond;
    let Ok(response) = response.await else {
        if let Some(u) = upload {
            u.abort();
        }
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let (rparts, rbody) = response.into_parts();
    let mut back = http::Response::builder().status(rparts.status);
    for (n, v) in rparts.headers.iter() {
        let mut m = mask.same_patterns();
        let mut bytes = m.push(v.as_bytes());
        bytes.extend(m.flush());
        if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
            back = back.header(n, v);
        }
    }
    let Ok(back) = back.body(()) else { return };
    let end = rbody.is_end_stream();
    let Ok(send) = respond.send_response(back, end) else { return };
    if !end {
        pipe_h2(rbody, send, Some(mask)).await;
    }
    if let Some(u) = upload {
        let _ = u.await;
    }
}

/// Moves one stream's DATA (and trailers) from `recv` to `send`, through `mask` when given,
/// releasing flow-control capacity only as `send` takes the bytes.
async fn pipe_h2(mut recv: h2::RecvStream, mut send: h2::SendStream<Bytes>, mut mask: Option<ResponseMask>) {
    loop {
        let next = match &mask {
            Some(m) if m.held() > 0 => match tokio::time::timeout(MASK_IDLE, recv.data()).await {
                Ok(d) => d,
                Err(_) => {
                    let rest = mask.as_mut().expect("some").flush();
                    if !rest.is_empty() && send_all(&mut send, Bytes::from(rest), false).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            _ => recv.data().await,
        };
        match next {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let out = match mask.as_mut() {
                    Some(m) => Bytes::from(m.push(&chunk)),
                    None => chunk,
                };
                if !out.is_empty() && send_all(&mut send, out, false).await.is_err() {
                    return;
                }
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(_)) => {
                send.send_reset(h2::Reason::CANCEL);
                return;
            }
            None => break,
        }
    }
    if let Some(m) = mask.as_mut() {
        let rest = m.flush();
        if !rest.is_empty() && send_all(&mut send, Bytes::from(rest), false).await.is_err() {
            return;
        }
    }
    match recv.trailers().await {
        Ok(Some(t)) => {
            let _ = send.send_trailers(t);
        }
        _ => {
            let _ = send.send_data(Bytes::new(), true);
        }
    }
}

/// Sends `data` as the peer's window allows.
async fn send_all(send: &mut h2::SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        };
        let part = data.split_to(cap.min(data.len()));
        send.send_data(part, end && data.is_empty())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
