//! A TLS test server for the secrets tests: its own CA (which msb is given with
//! `--tls-upstream-ca`), certificates by SNI (`api.test`, `other.test` valid; `wrong.test`
//! answered with a certificate for another name), HTTP/1.1 and h2 by ALPN, and an echo of
//! every request head as the answer's body. Every head it receives is logged with its SNI
//! and ALPN, so a test sees exactly what reached the server. Port 80 serves the same echo in
//! plain HTTP.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One request as the server got it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The TLS server name (`None`: plain HTTP).
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// The request head as text (HTTP/1), or `name: value` lines (h2).
    pub head: String,
    /// Which connection it came on (numbered from 1 in accept order).
    pub conn: usize,
}

/// The server's log, and its CA certificate (PEM).
pub struct TlsHost {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TLS handshakes begun (whether or not a request followed).
    pub handshakes: Arc<Mutex<Vec<Option<String>>>>,
    pub ca_pem: String,
}

#[derive(Debug)]
struct BySni {
    certs: Vec<(String, Arc<CertifiedKey>)>,
    wrong: Arc<CertifiedKey>,
    /// `*.api.test`, for any name one label below api.test.
    below: Arc<CertifiedKey>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        if name == "wrong.test" {
            return Some(self.wrong.clone());
        }
        if name.ends_with(".api.test") && name.matches('.').count() == 2 {
            return Some(self.below.clone());
        }
        self.certs.iter().find(|(n, _)| n == name).map(|(_, k)| k.clone())
    }
}

fn leaf(issuer: &Issuer<'_, KeyPair>, name: &str) -> Arc<CertifiedKey> {
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(der).unwrap();
    Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
}

impl TlsHost {
    /// Serves TLS on `tls` and plain HTTP on `plain` (listeners bound in the test
    /// namespace) until the process ends.
    pub fn start(tls: TcpListener, plain: TcpListener) -> TlsHost {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p.distinguished_name.push(DnType::CommonName, "msb e2e test CA");
        let key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&key).unwrap();
        let ca_pem = ca.pem();
        let issuer = Issuer::new(p, key);
        let resolver = BySni {
            certs: vec![
                ("api.test".into(), leaf(&issuer, "api.test")),
                ("other.test".into(), leaf(&issuer, "other.test")),
            ],
            wrong: leaf(&issuer, "nothing.test"),
            below: leaf(&issuer, "*.api.test"),
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let (s, h) = (seen.clone(), handshakes.clone());
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                tls.set_nonblocking(true).unwrap();
                plain.set_nonblocking(true).unwrap();
                let tls = tokio::net::TcpListener::from_std(tls).unwrap();
                let plain = tokio::net::TcpListener::from_std(plain).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                loop {
                    tokio::select! {
                        c = tls.accept() => {
                            let Ok((c, _)) = c else { continue };
                            let (acceptor, s, h) = (acceptor.clone(), s.clone(), h.clone());
                            let conn = conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            tokio::spawn(async move {
                                let Ok(t) = acceptor.accept(c).await else {
                                    h.lock().unwrap().push(None);
                                    return;
                                };
                                let sni = t.get_ref().1.server_name().map(str::to_string);
                                let alpn = t.get_ref().1.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned());
                                h.lock().unwrap().push(sni.clone());
                                if alpn.as_deref() == Some("h2") {
                                    serve_h2(t, sni, conn, s).await;
                                } else {
                                    serve_h1(t, sni, alpn, conn, s).await;
                                }
                            });
                        }
                        c = plain.accept() => {
                            let Ok((c, _)) = c else { continue };
                            let s = s.clone();
                            let conn = conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            tokio::spawn(async move { serve_h1(c, None, None, conn, s).await });
                        }
                    }
                }
            });
        });
        TlsHost { seen, handshakes, ca_pem }
    }

    /// Every head received so far.
    pub fn heads(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_h1(
    io: impl AsyncRead + AsyncWrite + Unpin,
    sni: Option<String>,
    alpn: Option<String>,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let text = String::from_utf8_lossy(&head).into_owned();
            // A body (uploads) is read and dropped; `/big/N` answers N bytes.
            let length: usize = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok()).flatten()
                })
                .unwrap_or(0);
            let mut left = length;
            while left > 0 {
                if buf.is_empty() {
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let n = left.min(buf.len());
                buf.drain(..n);
                left -= n;
            }
            let target = text.split_whitespace().nth(1).unwrap_or("");
            let big: Option<usize> = target.strip_prefix("/big/").and_then(|n| n.parse().ok());
            if length == 0 && big.is_none() {
                seen.lock().unwrap().push(Seen { sni: sni.clone(), alpn: alpn.clone(), head: text.clone(), conn });
            }
            let body_len = big.unwrap_or(text.len());
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {body_len}\r\n\r\n");
            if wr.write_all(resp.as_bytes()).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            let mut n = big.unwrap_or(0);
            if big.is_none() && (wr.write_all(text.as_bytes()).await.is_err() || wr.flush().await.is_err()) {
                return;
            }
            let block = vec![b'x'; 64 * 1024];
            while n > 0 {
                let k = n.min(block.len());
                if wr.write_all(&block[..k]).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                n -= k;
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve_h2(
    io: impl AsyncRead + AsyncWrite + Unpin,
    sni: Option<String>,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let Ok(mut h2conn) = h2::server::handshake(io).await else { return };
    while let Some(Ok((req, mut respond))) = h2conn.accept().await {
        let mut text = format!(
            ":authority: {}\n:path: {}\n",
            req.uri().authority().map(|a| a.as_str()).unwrap_or(""),
            req.uri().path()
        );
        for (n, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", n, String::from_utf8_lossy(v.as_bytes())));
        }
        seen.lock().unwrap().push(Seen { sni: sni.clone(), alpn: Some("h2".into()), head: text.clone(), conn });
        let resp = http::Response::builder().status(200).body(()).unwrap();
        if let Ok(mut s) = respond.send_response(resp, false) {
            let _ = s.send_data(Bytes::from(text), true);
        }
    }
}

/// The DER of a PEM certificate (for comparisons).
pub fn pem_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}
