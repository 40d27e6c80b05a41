use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use msb_schema::net::{Grants, PortProto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A `SOCK_SEQPACKET` pair, as a sandbox process makes for its dialer.
pub(crate) fn pair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap()
}

/// A dialer served on this runtime over a fresh pair, with `grants` in a temporary file.
pub(crate) fn start(grants: &Grants, resolver: Option<SocketAddr>) -> (Dialer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    grants.write(&path).unwrap();
    let (ours, theirs) = pair();
    tokio::spawn(serve_async(theirs, Config { grants: path, resolver }));
    (Dialer::remote(ours).unwrap(), dir)
}

fn grants(policy: Option<&str>) -> Grants {
    Grants { policies: vec![policy.map(str::to_string)], publish: Vec::new() }
}

#[tokio::test]
async fn loopback_is_refused_under_the_default_policy_and_opened_when_a_policy_allows_it() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let (d, _dir) = start(&grants(None), None);
    let e = d.tcp(at).await.err().expect("loopback under the default policy");
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("loopback"), "{e}");
    // 0.0.0.0 is loopback as a destination too.
    let zero = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), at.port());
    assert!(d.tcp(zero).await.is_err());

    let (d, _dir) = start(&grants(Some("allow loopback\nallow public")), None);
    let mut o = d.tcp(at).await.expect("allowed by the policy");
    assert_eq!(o.addr, at);
    let (mut server, _) = l.accept().await.unwrap();
    o.socket.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert!(o.view.host.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{:?}", o.view);
}

#[tokio::test]
async fn a_policy_that_allows_other_ports_only_does_not_open_this_one() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let other = if at.port() == 1 { 2 } else { at.port() - 1 };
    let (d, _dir) = start(&grants(Some(&format!("allow tcp/loopback:{other}"))), None);
    assert!(d.tcp(at).await.is_err());
    // A UDP rule does not open TCP, nor the reverse.
    let (d, _dir) = start(&grants(Some(&format!("allow udp/127.0.0.1:{}", at.port()))), None);
    assert!(d.tcp(at).await.is_err());
    assert!(d.udp(at).await.is_ok());
    // A domain rule opens a non-public address only with its group named.
    let (d, _dir) = start(&grants(Some("allow tcp/svc.example.com")), None);
    assert!(d.tcp(at).await.is_err());
    let (d, _dir) = start(&grants(Some("allow tcp/svc.example.com@loopback")), None);
    assert!(d.tcp(at).await.is_ok());
}

#[tokio::test]
async fn any_policy_of_the_grants_may_open_a_flow_while_a_change_is_under_way() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let g = Grants { policies: vec![None, Some("allow loopback".into())], publish: Vec::new() };
    let (d, dir) = start(&g, None);
    assert!(d.tcp(at).await.is_ok());
    // The grants are read again at each request: taking the policy back closes the door.
    grants(None).write(&dir.path().join("grants.json")).unwrap();
    assert!(d.tcp(at).await.is_err());
}

#[tokio::test]
async fn a_listener_is_bound_only_where_the_grants_publish() {
    let g = Grants {
        policies: vec![None],
        publish: vec![
            (PortProto::Tcp, "127.0.0.1:0".parse().unwrap()),
            (PortProto::Udp, "127.0.0.1:0".parse().unwrap()),
        ],
    };
    let (d, _dir) = start(&g, None);
    let l = d.bind(PortProto::Tcp, "127.0.0.1:0".parse().unwrap()).await.expect("granted");
    assert_eq!(l.proto(), PortProto::Tcp);
    assert_ne!(l.local_addr().unwrap().port(), 0);
    assert!(d.bind(PortProto::Udp, "127.0.0.1:0".parse().unwrap()).await.is_ok());
    let Err(e) = d.bind(PortProto::Tcp, "0.0.0.0:0".parse().unwrap()).await else { panic!("not granted") };
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    // A fixed port needs its own grant: port 0 grants only port 0.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert!(d.bind(PortProto::Tcp, free).await.is_err());
}

#[tokio::test]
async fn lookups_go_to_the_dialers_resolver_whatever_the_asker_names() {
    let resolver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (d, _dir) = start(&grants(None), Some(resolver.local_addr().unwrap()));
    let elsewhere: SocketAddr = "203.0.113.9:53".parse().unwrap();
    let s = d.resolver(elsewhere).await.unwrap();
    assert_eq!(s.peer_addr().unwrap(), resolver.local_addr().unwrap());
    s.send(b"q").await.unwrap();
    let mut buf = [0u8; 8];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), resolver.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"q");
    let (d, _dir) = start(&grants(None), None);
    assert!(d.resolver(elsewhere).await.is_err(), "no resolver, no socket");
}

#[tokio::test]
async fn many_requests_at_once_are_all_answered_and_a_closed_dialer_fails_fast() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let (d, _dir) = start(&grants(Some("allow loopback")), None);
    let tasks: Vec<_> = (0..2 * MAX_IN_FLIGHT)
        .map(|i| {
            let d = d.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    d.tcp(at).await.map(drop)
                } else {
                    d.tcp("127.0.0.2:1".parse().unwrap()).await.map(drop).or(Ok(()))
                }
            })
        })
        .collect();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            held.push(l.accept().await.unwrap());
        }
        held
    });
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    accept.await.unwrap();

    let (ours, theirs) = pair();
    let d = Dialer::remote(ours).unwrap();
    drop(theirs);
    let e = tokio::time::timeout(Duration::from_secs(5), d.tcp(at)).await.expect("fails, not hangs").err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
}

#[tokio::test]
async fn garbage_and_oversized_requests_are_dropped_and_the_dialer_goes_on() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    grants(Some("allow loopback")).write(&path).unwrap();
    let (ours, theirs) = pair();
    let server = tokio::spawn(serve_async(theirs, Config { grants: path, resolver: None }));
    let raw = seqpacket(ours).unwrap();
    for junk in [b"not json".to_vec(), vec![b'{'; MAX_MESSAGE + 10], br#"{"id":1,"ask":{"Tcp":"1.2.3.4"}}"#.to_vec()] {
        raw.async_io(Interest::WRITABLE, || {
            rustix::net::send(&raw, &junk, SendFlags::NOSIGNAL).map_err(io::Error::from)
        })
        .await
        .unwrap();
    }
    let d = Dialer::remote(raw.into_std().unwrap().into()).unwrap();
    assert!(d.tcp(at).await.is_ok(), "still serving");
    drop(d);
    server.abort();
}

#[test]
fn a_policy_could_allow_what_its_rules_might_and_nothing_a_leading_deny_covers() {
    let c = Classifier::new([]);
    let p = |t: &str| Policy::parse(t).unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    assert!(!Policy::default().could_allow(&c, Proto::Tcp, lo, 80));
    assert!(p("allow loopback").could_allow(&c, Proto::Tcp, lo, 80));
    assert!(!p("deny 127.0.0.0/8\nallow loopback").could_allow(&c, Proto::Tcp, lo, 80));
    // A domain deny may not match (the names are unknown): it does not stop the search.
    assert!(p("deny tcp/a.example\nallow loopback").could_allow(&c, Proto::Tcp, lo, 80));
    assert!(p("allow tcp/*.corp@loopback").could_allow(&c, Proto::Tcp, lo, 80));
    assert!(!p("allow tcp/*.corp@private").could_allow(&c, Proto::Tcp, lo, 80));
    assert!(!p("allow tcp/*.corp@loopback").could_allow(&c, Proto::Udp, lo, 80));
    assert!(p("default allow").could_allow(&c, Proto::Udp, lo, 80));
}

#[tokio::test(start_paused = true)]
async fn a_dialer_that_never_answers_times_the_asker_out_and_frees_its_slot() {
    let (ours, _silent) = pair();
    let d = Dialer::remote(ours).unwrap();
    let Err(e) = d.tcp("203.0.113.1:443".parse().unwrap()).await else { panic!("an answer from nowhere") };
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    let Dialer::Remote(r) = &d else { unreachable!() };
    assert!(r.pending.lock().unwrap().is_empty(), "the waiter was forgotten");
    assert_eq!(r.slots.available_permits(), MAX_IN_FLIGHT);
}
