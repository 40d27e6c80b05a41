//! The gateway actor with real host sockets on loopback, against a smoltcp guest whose
//! frames a stand-in virtio-net shell carries.

use super::*;
use crate::policy::{Action, Rule};
use crate::test_guest::Guest;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Stands in for the virtio-net shell: hands the gateway's frames to the test.
struct Shell;
impl Actor for Shell {
    type Msg = ToNet;
    type State = mpsc::UnboundedSender<Vec<u8>>;
    type Arguments = mpsc::UnboundedSender<Vec<u8>>;
    async fn pre_start(&self, _: ActorRef<ToNet>, tx: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle(&self, _: ActorRef<ToNet>, m: ToNet, tx: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let ToNet::Frames(frames) = m {
            for f in frames {
                let _ = tx.send(f);
            }
        }
        Ok(())
    }
}

struct Rig {
    gw: ActorRef<GatewayMsg>,
    from_gw: mpsc::UnboundedReceiver<Vec<u8>>,
    guest: Guest,
    start: Instant,
}

impl Rig {
    async fn new(policy: Policy, audit: Option<PathBuf>) -> Rig {
        Rig::with_ports(policy, audit, Vec::new()).await
    }

    async fn with_ports(policy: Policy, audit: Option<PathBuf>, published: Vec<(PortListener, u16)>) -> Rig {
        Rig::full(policy, audit, published, Dialer::Direct).await
    }

    async fn full(policy: Policy, audit: Option<PathBuf>, published: Vec<(PortListener, u16)>, dialer: Dialer) -> Rig {
        let args = GatewayArgs {
            sandbox: "t".into(),
            net: NetConfig::default(),
            policy,
            upstream_dns: None,
            audit,
            seed: 3,
            published,
            limits: Limits::default(),
            secrets: None,
            dialer,
        };
        let (gw, _) = Actor::spawn(None, NetGateway, args).await.unwrap();
        let (tx, from_gw) = mpsc::unbounded_channel();
        let (shell, _) = Actor::spawn(None, Shell, tx).await.unwrap();
        gw.cast(GatewayMsg::Attach(shell.get_derived())).unwrap();
        Rig { gw, from_gw, guest: Guest::new(&NetConfig::default()), start: Instant::now() }
    }

    /// Moves frames both ways for `ms` milliseconds.
    async fn run(&mut self, ms: u64) {
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            let t = smoltcp::time::Instant::from_millis(self.start.elapsed().as_millis() as i64);
            self.guest.iface.poll(t, &mut self.guest.dev, &mut self.guest.sockets);
            let frames: Vec<Vec<u8>> = self.guest.dev.tx.drain(..).collect();
            let mut delivered = 0;
            while let Ok(f) = self.from_gw.try_recv() {
                self.guest.dev.rx.push_back(f);
                delivered += 1;
            }
            if !frames.is_empty() || delivered > 0 {
                self.gw.cast(GatewayMsg::Guest(GuestFrames { frames, delivered })).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[tokio::test]
async fn an_allowed_flow_reaches_a_host_socket_and_a_denied_one_is_reset_without_one() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let up: Vec<u8> = buf[..n].to_ascii_uppercase();
                    if s.write_all(&up).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("net.jsonl");
    let policy =
        Policy::new(vec![Rule::parse(Action::Allow, &format!("tcp/127.0.0.1:{port}")).unwrap()], Action::Deny).unwrap();
    let mut rig = Rig::new(policy, Some(audit.clone())).await;
    let ok = rig.guest.connect(IpAddress::v4(127, 0, 0, 1), port, 40000);
    // Another port on the same address is not in the rule.
    let denied = rig.guest.connect(IpAddress::v4(127, 0, 0, 1), port.wrapping_add(1).max(1), 40001);
    rig.run(300).await;
    assert_eq!(rig.guest.sockets.get::<tcp::Socket>(denied).state(), tcp::State::Closed, "reset");
    assert!(rig.guest.sockets.get::<tcp::Socket>(ok).may_send(), "established");
    rig.guest.sockets.get_mut::<tcp::Socket>(ok).send_slice(b"hello gateway").unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        rig.run(20).await;
        let s = rig.guest.sockets.get_mut::<tcp::Socket>(ok);
        let mut buf = [0u8; 64];
        if let Ok(n) = s.recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= 13 {
            break;
        }
    }
    assert_eq!(got, b"HELLO GATEWAY");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "the denied flow never got a host socket");
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines.iter().any(|l| l["action"] == "allow" && l["port"] == port), "{text}");
    assert!(lines.iter().any(|l| l["action"] == "deny" && l["why"] == "the default (deny)"), "{text}");

    // A tightened policy closes the running flow.
    let (tx, rx) = ractor::concurrency::oneshot();
    rig.gw.cast(GatewayMsg::Control(NetControl::SetPolicy { policy: "deny any\n".into(), reply: tx.into() })).unwrap();
    assert_eq!(rx.await.unwrap(), Ok(()));
    rig.run(200).await;
    assert_eq!(rig.guest.sockets.get::<tcp::Socket>(ok).state(), tcp::State::Closed, "reset by the new policy");
    let (tx, rx) = ractor::concurrency::oneshot();
    rig.gw
        .cast(GatewayMsg::Control(NetControl::SetPolicy { policy: "allow bogus!".into(), reply: tx.into() }))
        .unwrap();
    assert!(rx.await.unwrap().is_err(), "a bad policy is refused");
}

/// N10: a flood of free denials cannot blind the stream: repeats within a second are one
/// record plus a count, a full file rotates (newest records kept), and an allowed flow after
/// the flood is still recorded.
#[tokio::test]
async fn the_audit_stream_aggregates_repeats_and_rotates_instead_of_going_silent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.jsonl");
    std::fs::write(&path, vec![b'x'; (AUDIT_CAP - 300) as usize]).unwrap();
    let mut log = AuditLog::open("t".into(), Some(&path));
    let deny = |at_ms: u64, port: u16| crate::stack::Audit {
        at_ms,
        proto: crate::policy::Proto::Tcp,
        dest: std::net::SocketAddr::new("10.0.0.1".parse().unwrap(), port),
        names: vec![],
        action: Action::Deny,
        group: crate::classify::Group::Private,
        why: "the default (deny)".into(),
        rule: None,
    };
    // 100,000 denials in one second to one port of one address, and one to another port
    // (its own record: a denial of another port is not a repeat).
    for i in 0..100_000u64 {
        log.record(&deny(1000 + i % 1000, 80));
    }
    log.record(&deny(1999, 443));
    let allowed = crate::stack::Audit { action: Action::Allow, why: "rule 1 `allow public`".into(), ..deny(2500, 443) };
    log.record(&allowed);
    log.tick(3000);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.len() < 4096, "the flood took {} bytes", text.len());
    assert!(!text.contains("xxx"), "the full file was rotated away");
    let rotated = std::path::PathBuf::from(format!("{}.1", path.display()));
    assert!(rotated.exists(), "one old generation kept");
    assert!(text.contains("\"repeated\":99999"), "{text}");
    assert!(text.contains("\"port\":443"), "the other port's denial is its own record: {text}");
    assert!(text.contains("allow public"), "an allowed flow after the flood is recorded: {text}");
    log.core_dropped(7);
    log.core_dropped(7);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("\"audit\":\"dropped\"").count(), 1);
}

#[tokio::test]
async fn a_published_port_carries_a_host_client_into_the_guest_whatever_the_egress_policy() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let deny_all = Policy::parse("deny any").unwrap();
    let mut rig = Rig::with_ports(deny_all, None, vec![(PortListener::Tcp(l), 8080)]).await;
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 4096]));
    s.listen(8080).unwrap();
    let h = rig.guest.sockets.add(s);
    let mut client = TcpStream::connect(at).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        rig.run(20).await;
        let mut buf = [0u8; 16];
        if let Ok(n) = rig.guest.sockets.get_mut::<tcp::Socket>(h).recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= 4 {
            break;
        }
    }
    assert_eq!(got, b"ping");
    rig.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"pong").unwrap();
    rig.guest.sockets.get_mut::<tcp::Socket>(h).close();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.map(|_| back)
    });
    rig.run(300).await;
    let back = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap().unwrap();
    assert_eq!(back, b"pong", "the guest's answer and its close reach the client");
}

#[tokio::test]
async fn ports_published_and_closed_live_open_and_close_their_listeners() {
    let mut rig = Rig::new(Policy::default(), None).await;
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 4096]));
    s.listen(9000).unwrap();
    let h = rig.guest.sockets.add(s);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let r = ractor::call!(rig.gw, |reply| GatewayMsg::Control(NetControl::Publish {
        listener: PortListener::Tcp(l),
        guest: 9000,
        reply
    }));
    assert_eq!(r.unwrap(), Ok(()));
    let _client = TcpStream::connect(at).await.unwrap();
    for _ in 0..50 {
        rig.run(20).await;
        if rig.guest.sockets.get::<tcp::Socket>(h).may_send() {
            break;
        }
    }
    assert!(rig.guest.sockets.get::<tcp::Socket>(h).may_send(), "the live port reaches the guest");
    let closed = ractor::call!(rig.gw, |reply| GatewayMsg::Control(NetControl::Unpublish {
        proto: PortProto::Tcp,
        guest: 9000,
        reply
    }));
    assert_eq!(closed.unwrap(), vec![at]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(at).await.is_err(), "the listener is gone");
    let closed = ractor::call!(rig.gw, |reply| GatewayMsg::Control(NetControl::Unpublish {
        proto: PortProto::Tcp,
        guest: 9000,
        reply
    }));
    assert!(closed.unwrap().is_empty());
    // Past the cap, refused.
    for i in 0..=MAX_PUBLISHED {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let r = ractor::call!(rig.gw, |reply| GatewayMsg::Control(NetControl::Publish {
            listener: PortListener::Tcp(l),
            guest: 1000 + i as u16,
            reply
        }))
        .unwrap();
        assert_eq!(r.is_ok(), i < MAX_PUBLISHED, "port {i}: {r:?}");
    }
}

#[tokio::test]
async fn an_allowed_udp_flow_reaches_a_host_socket_and_hears_its_answers() {
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let up = buf[..n].to_ascii_uppercase();
            let _ = echo.send_to(&up, from).await;
        }
    });
    let policy =
        Policy::new(vec![Rule::parse(Action::Allow, &format!("udp/127.0.0.1:{port}")).unwrap()], Action::Deny).unwrap();
    let mut rig = Rig::new(policy, None).await;
    let meta = || vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8];
    let mut s = smoltcp::socket::udp::Socket::new(
        smoltcp::socket::udp::PacketBuffer::new(meta(), vec![0; 8192]),
        smoltcp::socket::udp::PacketBuffer::new(meta(), vec![0; 8192]),
    );
    s.bind(6000).unwrap();
    let h = rig.guest.sockets.add(s);
    let to = smoltcp::wire::IpEndpoint::new(IpAddress::v4(127, 0, 0, 1), port);
    let mut got = Vec::new();
    for i in 0..3 {
        rig.guest
            .sockets
            .get_mut::<smoltcp::socket::udp::Socket>(h)
            .send_slice(format!("ping{i}").as_bytes(), to)
            .unwrap();
        for _ in 0..100 {
            rig.run(10).await;
            if let Ok((d, m)) = rig.guest.sockets.get_mut::<smoltcp::socket::udp::Socket>(h).recv() {
                assert_eq!(m.endpoint, to, "the answer comes from the destination");
                got.push(String::from_utf8(d.to_vec()).unwrap());
                break;
            }
        }
    }
    assert_eq!(got, ["PING0", "PING1", "PING2"]);
}

#[tokio::test]
async fn after_a_raw_syn_flood_a_new_connection_gets_the_hosts_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s); // closes at once, as the e2e test host does
        }
    });
    let policy =
        Policy::new(vec![Rule::parse(Action::Allow, &format!("tcp/127.0.0.1:{port}")).unwrap()], Action::Deny).unwrap();
    let mut rig = Rig::new(policy, None).await;
    let cfg = NetConfig::default();
    for i in 0..3000u32 {
        rig.guest.dev.tx.push_back(crate::stack::tests::syn(&cfg, Ipv4Addr::LOCALHOST, 20000 + i as u16, port));
        if i % 100 == 99 {
            rig.run(5).await;
        }
    }
    rig.run(3000).await;
    let h = rig.guest.connect(IpAddress::v4(127, 0, 0, 1), port, 40000);
    rig.run(300).await;
    assert!(rig.guest.sockets.get::<tcp::Socket>(h).may_send(), "established");
    rig.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"GET").unwrap();
    for _ in 0..100 {
        rig.run(20).await;
        if !rig.guest.sockets.get::<tcp::Socket>(h).may_recv() {
            break;
        }
    }
    let s = rig.guest.sockets.get::<tcp::Socket>(h);
    assert!(!s.may_recv(), "the host's close reached the guest: {:?}", s.state());
}

fn guest_udp(rig: &mut Rig, port: u16) -> smoltcp::iface::SocketHandle {
    let meta = || vec![smoltcp::socket::udp::PacketMetadata::EMPTY; 8];
    let mut s = smoltcp::socket::udp::Socket::new(
        smoltcp::socket::udp::PacketBuffer::new(meta(), vec![0; 8192]),
        smoltcp::socket::udp::PacketBuffer::new(meta(), vec![0; 8192]),
    );
    s.bind(port).unwrap();
    rig.guest.sockets.add(s)
}

#[tokio::test]
async fn a_published_udp_port_carries_each_host_peers_datagrams_and_the_guests_answers() {
    use smoltcp::socket::udp;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = sock.local_addr().unwrap();
    let deny_all = Policy::parse("deny any").unwrap();
    let mut rig = Rig::with_ports(deny_all, None, vec![(PortListener::Udp(sock), 5353)]).await;
    let h = guest_udp(&mut rig, 5353);
    let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a.send_to(b"from a", at).await.unwrap();
    b.send_to(b"from b", at).await.unwrap();
    // The guest answers each datagram, upper-cased, to whoever sent it.
    let mut seen = Vec::new();
    for _ in 0..200 {
        rig.run(10).await;
        while let Ok((d, m)) = rig.guest.sockets.get_mut::<udp::Socket>(h).recv() {
            let (d, from) = (d.to_vec(), m.endpoint);
            seen.push((String::from_utf8(d.clone()).unwrap(), from));
            rig.guest.sockets.get_mut::<udp::Socket>(h).send_slice(&d.to_ascii_uppercase(), from).unwrap();
        }
        if seen.len() == 2 {
            break;
        }
    }
    let mut texts: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    texts.sort();
    assert_eq!(texts, ["from a", "from b"], "both peers' datagrams reached the guest port, deny-all egress or not");
    assert_ne!(seen[0].1, seen[1].1, "each host peer is its own flow");
    rig.run(100).await;
    let mut buf = [0u8; 64];
    for (peer, want) in [(&a, b"FROM A"), (&b, b"FROM B")] {
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!((&buf[..n], from), (&want[..], at), "the answer comes back from the published address");
    }
    // Closed live: nothing more reaches the guest.
    let closed = ractor::call!(rig.gw, |reply| GatewayMsg::Control(NetControl::Unpublish {
        proto: PortProto::Udp,
        guest: 5353,
        reply
    }));
    assert_eq!(closed.unwrap(), vec![at]);
    a.send_to(b"late", at).await.unwrap();
    rig.run(300).await;
    assert!(rig.guest.sockets.get_mut::<udp::Socket>(h).recv().is_err(), "an unpublished port carries nothing");
    std::net::UdpSocket::bind(at).expect("the unpublished address is free again");
}

/// Guest IPv6 through the whole gateway: the guest's IPv6 frames, its SYN decided by the
/// policy on the IPv6 destination, the host dial, bytes both ways. The host end is an IPv4
/// listener reached through its IPv4-mapped address, which the host dials over a dual-stack
/// socket (a guest never sends `::1` out of its interface, so the host's own IPv6 loopback
/// cannot be the destination). The default denies the same destination (loopback, carried in
/// IPv6) at once, and never dials it.
#[tokio::test]
async fn guest_ipv6_egress_reaches_an_allowed_host_socket_and_the_default_denies_loopback_over_ipv6() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    let mapped = IpAddress::Ipv6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    // The default policy (public only) resets it and never dials.
    let mut rig = Rig::new(Policy::default(), None).await;
    let denied = rig.guest.connect(mapped, port, 40002);
    rig.run(300).await;
    assert_eq!(rig.guest.sockets.get::<tcp::Socket>(denied).state(), tcp::State::Closed, "reset by default");
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a denied IPv6 flow was dialed");
    // A rule for the IPv4 address allows the address that carries it.
    let policy =
        Policy::new(vec![Rule::parse(Action::Allow, &format!("tcp/127.0.0.1:{port}")).unwrap()], Action::Deny).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("net.jsonl");
    let mut rig = Rig::new(policy, Some(audit.clone())).await;
    let ok = rig.guest.connect(mapped, port, 40000);
    rig.run(300).await;
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let state = rig.guest.sockets.get::<tcp::Socket>(ok).state();
    assert!(rig.guest.sockets.get::<tcp::Socket>(ok).may_send(), "established over IPv6: {state:?}\n{log}");
    assert!(log.contains("::ffff:127.0.0.1") && log.contains("\"allow\""), "{log}");
    rig.guest.sockets.get_mut::<tcp::Socket>(ok).send_slice(b"six").unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        rig.run(20).await;
        let mut buf = [0u8; 16];
        if let Ok(n) = rig.guest.sockets.get_mut::<tcp::Socket>(ok).recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= 3 {
            break;
        }
    }
    assert_eq!(got, b"SIX", "the host's answer came back over IPv6");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A dialer process stand-in on this runtime, granting `policy` (policy-file text).
fn remote_dialer(policy: &str) -> (Dialer, tempfile::TempDir) {
    let grants = msb_schema::net::Grants { policies: vec![Some(policy.into())], publish: Vec::new() };
    crate::dialer::tests::start(&grants, None)
}

#[tokio::test]
async fn behind_a_dialer_a_flow_works_as_before_and_the_dialer_refuses_what_its_grants_do_not_allow() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let rule = format!("allow tcp/127.0.0.1:{port}");
    let policy = Policy::parse(&rule).unwrap();
    // The grants allow what the gateway's policy does: the flow is up and echoes.
    let (dialer, _dir) = remote_dialer(&rule);
    let mut rig = Rig::full(policy.clone(), None, Vec::new(), dialer).await;
    let ok = rig.guest.connect(IpAddress::v4(127, 0, 0, 1), port, 40000);
    let (mut got, mut sent) = (Vec::new(), false);
    for _ in 0..200 {
        rig.run(20).await;
        let s = rig.guest.sockets.get_mut::<tcp::Socket>(ok);
        if s.may_send() && !sent {
            sent = s.send_slice(b"through the dialer").is_ok_and(|n| n == 18);
        }
        let mut buf = [0u8; 64];
        if let Ok(n) = s.recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= 18 {
            break;
        }
    }
    assert_eq!(got, b"through the dialer");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // A sandbox process whose own policy was subverted to allow loopback still gets no
    // socket: the dialer's grants (the trusted side's) say public only.
    let (dialer, _dir) = remote_dialer("allow public");
    let mut rig = Rig::full(policy, None, Vec::new(), dialer).await;
    let refused = rig.guest.connect(IpAddress::v4(127, 0, 0, 1), port, 40001);
    rig.run(500).await;
    assert_eq!(rig.guest.sockets.get::<tcp::Socket>(refused).state(), tcp::State::Closed, "reset");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "no connection reached the listener");
}
