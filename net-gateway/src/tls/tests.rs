//! The interceptor with real rustls peers over in-memory pipes: a guest that trusts the
//! sandbox's CA, an upstream with its own test CA, and a stand-in vault.

use super::*;
use msb_schema::secret::{OnViolation, SecretName, Violation};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rustls::pki_types::PrivatePkcs8KeyDer;
use std::sync::Mutex as StdMutex;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

const PH: &str = "msbph_aaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A vault that substitutes `PH` with the current value in every header, when the flow is
/// `api.test`, pinned and verified, and the authority agrees (the real vault's logic is
/// tested in its crate; this one exercises the interceptor's side of the boundary).
struct TestVault;
type VaultState = Arc<StdMutex<Vec<u8>>>;

impl Actor for TestVault {
    type Msg = VaultQuery;
    type State = VaultState;
    type Arguments = VaultState;
    async fn pre_start(&self, _: ActorRef<VaultQuery>, v: VaultState) -> Result<VaultState, ActorProcessingErr> {
        Ok(v)
    }
    async fn handle(
        &self,
        _: ActorRef<VaultQuery>,
        m: VaultQuery,
        v: &mut VaultState,
    ) -> Result<(), ActorProcessingErr> {
        let value = v.lock().unwrap().clone();
        match m {
            VaultQuery::Mask { reply, .. } => {
                let _ = reply.send(ResponseMask::new([value.as_slice()]));
            }
            VaultQuery::Substitute { flow, mut head, reply } => {
                let ok = flow.sni == "api.test"
                    && flow.pinned
                    && flow.verified
                    && msb_schema::secret::authority_names(&head.authority, "api.test");
                let mut changed = false;
                let mut violations = Vec::new();
                for (n, val) in head.headers.iter_mut() {
                    let s = String::from_utf8_lossy(val).to_string();
                    if s.contains(PH) && n != "host" {
                        if ok {
                            *val = Zeroizing::new(s.replace(PH, std::str::from_utf8(&value).unwrap()).into_bytes());
                            changed = true;
                        } else {
                            violations.push(Violation {
                                secret: SecretName::new("K").unwrap(),
                                location: msb_schema::secret::Location::Header,
                                why: "not its host".into(),
                                action: OnViolation::Forward,
                            });
                        }
                    }
                }
                let _ = reply.send(Answer {
                    sensitive: if changed { vec!["authorization".into()] } else { Vec::new() },
                    rewritten: changed.then_some(head),
                    violations,
                    refuse: false,
                    stop: false,
                    mask: ResponseMask::new([value.as_slice()]),
                });
            }
        }
        Ok(())
    }
}

struct Upstream {
    ca: Ca,
}

impl Upstream {
    fn new() -> Upstream {
        Upstream { ca: Ca::generate("upstream test").unwrap() }
    }

    fn config(&self, name: &str, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let (leaf, key) = self.ca.leaf(name).unwrap();
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf], key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// What the upstream saw: each request's head (HTTP/1 text, or h2 fields as `name: value`
/// lines), and the protocol it negotiated.
#[derive(Debug)]
enum Seen {
    Alpn(Option<Vec<u8>>),
    Head(String),
}

/// Serves echo: each request is answered 200 with its head as the body.
async fn serve_upstream(io: DuplexStream, cfg: Arc<ServerConfig>, seen: mpsc::UnboundedSender<Seen>) {
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(io).await else { return };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let _ = seen.send(Seen::Alpn(alpn.clone()));
    if alpn.as_deref() == Some(b"h2") {
        let Ok(mut conn) = h2::server::handshake(tls).await else { return };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let mut text = format!(":authority: {}\n", req.uri().authority().map(|a| a.as_str()).unwrap_or(""));
            for (n, v) in req.headers() {
                text.push_str(&format!("{}: {}\n", n, String::from_utf8_lossy(v.as_bytes())));
            }
            let _ = seen.send(Seen::Head(text.clone()));
            let grpc = req.uri().path() == "/grpc";
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let mut s = respond.send_response(resp, false).unwrap();
            if grpc {
                // gRPC's shape: a message, then the status in trailers.
                let _ = s.send_data(Bytes::from(text), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = s.send_trailers(trailers);
            } else {
                let _ = s.send_data(Bytes::from(text), true);
            }
        }
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let text = String::from_utf8_lossy(&head).to_string();
            let _ = seen.send(Seen::Head(text.clone()));
            if text.starts_with("GET /big ") {
                let n = 8 << 20;
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                if wr.write_all(resp.as_bytes()).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                let block = vec![b'x'; 65536];
                for _ in 0..n / block.len() {
                    if wr.write_all(&block).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                }
                continue;
            }
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}", text.len());
            if wr.write_all(resp.as_bytes()).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

struct Setup {
    interceptor: Arc<Interceptor>,
    value: VaultState,
    upstream: Upstream,
}

async fn setup() -> Setup {
    let value: VaultState = Arc::new(StdMutex::new(b"REAL-SECRET-VALUE-123".to_vec()));
    let (vault, _) = Actor::spawn(None, TestVault, value.clone()).await.unwrap();
    let upstream = Upstream::new();
    let interceptor = Interceptor::new("test", vec![upstream.ca.der().clone()], vault.get_derived()).unwrap();
    Setup { interceptor: Arc::new(interceptor), value, upstream }
}

fn guest_config(ca_pem: &str, alpn: &[&[u8]], fragment: Option<usize>) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.max_fragment_size = fragment;
    Arc::new(cfg)
}

/// A guest connection through the interceptor to an upstream serving `upstream_name` with
/// `upstream_alpn`; returns the guest's TLS stream (or its handshake error) and what the
/// upstream saw.
async fn connect(
    s: &Setup,
    upstream_name: &str,
    upstream_alpn: &[&[u8]],
    guest_alpn: &[&[u8]],
    fragment: Option<usize>,
) -> (
    std::io::Result<tokio_rustls::client::TlsStream<DuplexStream>>,
    mpsc::UnboundedReceiver<Seen>,
    mpsc::UnboundedReceiver<TlsReport>,
) {
    let (guest_end, gw_guest) = tokio::io::duplex(64 * 1024);
    let (gw_up, up_end) = tokio::io::duplex(64 * 1024);
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(serve_upstream(up_end, s.upstream.config(upstream_name, upstream_alpn), seen_tx));
    let (rep_tx, reports) = mpsc::unbounded_channel();
    let report = move |r| {
        let _ = rep_tx.send(r);
    };
    tokio::spawn(s.interceptor.clone().run(gw_guest, gw_up, "api.test".into(), true, report));
    let connector = tokio_rustls::TlsConnector::from(guest_config(s.interceptor.ca_pem(), guest_alpn, fragment));
    let r = connector.connect(ServerName::try_from("api.test").unwrap(), guest_end).await;
    (r, seen, reports)
}

async fn h1_request(tls: &mut tokio_rustls::client::TlsStream<DuplexStream>, req: &str) -> String {
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).to_string();
            }
        }
        let n = tls.read(&mut chunk).await.unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&buf).to_string();
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn heads(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(s) = seen.try_recv() {
        if let Seen::Head(h) = s {
            out.push(h);
        }
    }
    out
}

#[tokio::test]
async fn http1_requests_are_substituted_and_echoes_masked_on_a_kept_alive_connection() {
    let s = setup().await;
    for fragment in [None, Some(32)] {
        let (tls, mut seen, _) = connect(&s, "api.test", &[b"http/1.1"], &[b"http/1.1"], fragment).await;
        let mut tls = tls.unwrap();
        let req = format!("GET /v1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {PH}\r\n\r\n");
        let answer = h1_request(&mut tls, &req).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = heads(&mut seen);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("Authorization: Bearer REAL-SECRET-VALUE-123"), "{}", got[0]);
        assert!(!answer.contains("REAL-SECRET"), "the echo is masked: {answer}");
        assert!(answer.contains("Bearer *********************"), "{answer}");
        // Rotation applies to the next request on the same connection.
        *s.value.lock().unwrap() = b"ROTATED-VALUE-456".to_vec();
        let answer = h1_request(&mut tls, &req).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = heads(&mut seen);
        assert!(got[0].contains("Bearer ROTATED-VALUE-456"), "{got:?}");
        assert!(!answer.contains("ROTATED"), "{answer}");
        *s.value.lock().unwrap() = b"REAL-SECRET-VALUE-123".to_vec();
    }
}

#[tokio::test]
async fn a_request_for_another_host_gets_403_and_goes_nowhere() {
    let s = setup().await;
    let (tls, mut seen, mut reports) = connect(&s, "api.test", &[], &[], None).await;
    let mut tls = tls.unwrap();
    let answer = h1_request(&mut tls, &format!("GET / HTTP/1.1\r\nHost: other.test\r\nX-Key: {PH}\r\n\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(heads(&mut seen).is_empty());
    assert!(matches!(reports.try_recv(), Ok(TlsReport::Refused { .. })));
}

#[tokio::test]
async fn an_upstream_with_a_wrong_certificate_gets_nothing_and_the_guest_an_alert() {
    let s = setup().await;
    let (tls, mut seen, mut reports) = connect(&s, "other.test", &[], &[], None).await;
    assert!(tls.is_err(), "the guest's handshake fails");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(heads(&mut seen).is_empty(), "no request reached the upstream");
    match reports.try_recv() {
        Ok(TlsReport::UpstreamFailed { why, .. }) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn alpn_ends_with_both_sides_agreeing() {
    let s = setup().await;
    let guests: [&[&[u8]]; 4] = [&[b"h2", b"http/1.1"], &[b"h2"], &[b"http/1.1"], &[]];
    let ups: [&[&[u8]]; 3] = [&[b"h2"], &[b"http/1.1"], &[]];
    for g in guests {
        for u in ups {
            let (tls, mut seen, _) = connect(&s, "api.test", u, g, None).await;
            let up_alpn = match seen.recv().await {
                Some(Seen::Alpn(a)) => Some(a),
                None => None, // the upstream's handshake failed
                other => panic!("{other:?}"),
            };
            match (tls, up_alpn) {
                (Ok(t), Some(up)) => {
                    let guest_alpn = t.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    assert_eq!(guest_alpn, up, "guest {g:?} upstream {u:?}");
                }
                // An upstream that shares no protocol with the guest's list refuses the
                // handshake; the guest then gets an alert too.
                (Err(_), None) => {
                    let shared = g.iter().any(|p| u.contains(p));
                    assert!(!shared && !u.is_empty() && !g.is_empty(), "guest {g:?} upstream {u:?}");
                }
                (t, up) => panic!("guest {g:?} upstream {u:?}: {:?} / {up:?}", t.is_ok()),
            }
        }
    }
}

#[tokio::test]
async fn http2_streams_are_substituted_checked_and_masked() {
    let s = setup().await;
    let (tls, mut seen, _) = connect(&s, "api.test", &[b"h2", b"http/1.1"], &[b"h2", b"http/1.1"], None).await;
    let tls = tls.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    // The same field twice: the second is an HPACK index into the guest's table.
    for i in 0..2 {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://api.test/v1/chat")
            .header("authorization", format!("Bearer {PH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"body bytes"), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200, "stream {i}");
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            let _ = body.flow_control().release_capacity(d.len());
            text.extend_from_slice(&d);
        }
        let text = String::from_utf8(text).unwrap();
        assert!(!text.contains("REAL-SECRET"), "{text}");
        assert!(text.contains("authorization: Bearer *****"), "{text}");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let got = heads(&mut seen);
    assert_eq!(got.len(), 2);
    for h in &got {
        assert!(h.contains("authorization: Bearer REAL-SECRET-VALUE-123"), "{h}");
        assert!(h.contains(":authority: api.test"), "{h}");
    }
    // A later stream naming another host: 421, never forwarded.
    let req = http::Request::builder()
        .uri("https://other.test/")
        .header("authorization", format!("Bearer {PH}"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 421);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(heads(&mut seen).is_empty());
}

#[test]
fn the_ca_signs_leaves_for_one_name_and_differs_per_gateway() {
    let a = Ca::generate("a").unwrap();
    let b = Ca::generate("b").unwrap();
    assert_ne!(a.pem(), b.pem());
    assert!(!a.pem().contains("PRIVATE KEY"));
    let (leaf, key) = a.leaf("api.test").unwrap();
    assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
    let _ = PrivatePkcs8KeyDer::from(vec![0u8]);
    // The leaf verifies for its name under its CA, and not under another.
    let verify = |ca: &Ca, name: &str| {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        v.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .is_ok()
    };
    assert!(verify(&a, "api.test"));
    assert!(!verify(&a, "other.test"));
    assert!(!verify(&b, "api.test"));
}

#[tokio::test]
async fn a_large_answer_streams_through_whole() {
    let s = setup().await;
    let (tls, _seen, _) = connect(&s, "api.test", &[b"http/1.1"], &[b"http/1.1"], None).await;
    let mut tls = tls.unwrap();
    tls.write_all(format!("GET /big HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {PH}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    let want = (8 << 20) + "HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\n".len();
    while got < want {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("stalled after {got} bytes"))
            .unwrap();
        assert!(n > 0, "ended after {got} bytes");
        got += n;
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn an_h2_answer_with_trailers_keeps_them() {
    let s = setup().await;
    let (tls, _seen, _) = connect(&s, "api.test", &[b"h2"], &[b"h2"], None).await;
    let (client, conn) = h2::client::handshake(tls.unwrap()).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("https://api.test/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {PH}"))
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(Bytes::from_static(b"\0\0\0\0\0"), true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut text = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        text.extend_from_slice(&d);
    }
    let trailers = body.trailers().await.unwrap().expect("the trailers came through");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("authorization: Bearer *****") && !text.contains("REAL-SECRET"), "{text}");
}
