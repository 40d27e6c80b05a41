//! The gateway against a guest that is another smoltcp stack, frame by frame.

use super::*;
use crate::dns::response_for;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use smoltcp::iface::SocketHandle;

use crate::test_guest::Guest;

struct Net {
    gw: Gateway,
    guest: Guest,
    now: u64,
    events: Vec<Event>,
}

impl Net {
    fn new(policy: Policy) -> Self {
        let cfg = NetConfig::default();
        let classifier = Classifier::new(["203.0.113.77".parse().unwrap()]);
        Net { gw: Gateway::new(cfg, policy, classifier, 7, 0), guest: Guest::new(&cfg), now: 0, events: vec![] }
    }

    /// Moves frames both ways and polls both stacks, `rounds` times, 10 ms apart.
    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.now += 10;
            let t = Instant::from_millis(self.now as i64);
            self.guest.iface.poll(t, &mut self.guest.dev, &mut self.guest.sockets);
            for f in self.guest.dev.tx.drain(..).collect::<Vec<_>>() {
                assert!(self.gw.guest_frame(f, self.now));
            }
            self.gw.poll(self.now);
            self.events.extend(self.gw.take_events());
            for f in self.gw.take_frames() {
                self.guest.dev.rx.push_back(f);
            }
        }
    }

    fn dials(&self) -> Vec<(FlowId, SocketAddr)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Dial { flow, addr } => Some((*flow, *addr)),
                _ => None,
            })
            .collect()
    }

    /// The bytes the guest sent on `flow`, as the shell got them.
    fn sent(&self, flow: FlowId) -> Vec<u8> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Data { flow: f, bytes } if *f == flow => Some(bytes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn audits(&self) -> Vec<&Audit> {
        self.events.iter().filter_map(|e| if let Event::Audit(a) = e { Some(a) } else { None }).collect()
    }
}

#[test]
fn an_allowed_connection_is_dialed_and_carries_bytes_both_ways() {
    let mut n = Net::new(Policy::default());
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 40000);
    n.run(5);
    let dials = n.dials();
    assert_eq!(dials.len(), 1, "{:?}", n.events);
    let (flow, addr) = dials[0];
    assert_eq!(addr, "93.184.216.34:80".parse().unwrap());
    assert_eq!(n.audits()[0].action, Action::Allow);
    n.gw.host_connected(flow, 1 << 20);
    assert!(n.guest.sockets.get::<tcp::Socket>(h).may_send(), "the guest's connection is established");
    n.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    n.run(5);
    let sent = n.sent(flow);
    assert_eq!(sent, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(n.gw.host_data(flow, b"HTTP/1.0 200 OK\r\n\r\nhi", n.now), 21);
    n.gw.host_done(flow);
    n.run(5);
    let mut got = vec![0u8; 64];
    let k = n.guest.sockets.get_mut::<tcp::Socket>(h).recv_slice(&mut got).unwrap();
    assert_eq!(&got[..k], b"HTTP/1.0 200 OK\r\n\r\nhi");
    assert!(!n.guest.sockets.get::<tcp::Socket>(h).may_recv(), "the host's end reached the guest as FIN");
}

#[test]
fn denied_destinations_are_reset_at_once_and_never_dialed() {
    let mut n = Net::new(Policy::default());
    let mut handles = vec![];
    for (i, ip) in [
        IpAddress::v4(10, 0, 0, 1),
        IpAddress::v4(127, 0, 0, 1),
        IpAddress::v4(169, 254, 169, 254),
        IpAddress::v4(203, 0, 113, 77),
        IpAddress::v4(192, 168, 127, 1),
    ]
    .into_iter()
    .enumerate()
    {
        handles.push(n.guest.connect(ip, 80, 41000 + i as u16));
    }
    n.run(5);
    assert!(n.dials().is_empty(), "{:?}", n.dials());
    for h in handles {
        assert_eq!(n.guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Closed, "reset within 50 ms");
    }
    let why: Vec<(Group, &str)> = n.audits().iter().map(|a| (a.group, a.why.as_str())).collect();
    assert_eq!(why.len(), 5);
    assert!(n.audits().iter().all(|a| a.action == Action::Deny));
    assert_eq!(why[0], (Group::Private, "the default (deny)"));
    assert_eq!(why[3].0, Group::Host, "the host's own address");
    assert_eq!(why[4].1, "the gateway's own address");
    assert_eq!(n.gw.flow_count(), 0);
}

/// The guest asks `resolver` (UDP) for `name`; upstream answers `ips` (TTL 60). Returns
/// the answer the guest got.
fn resolve(n: &mut Net, name: &str, ips: &[[u8; 4]], resolver: IpEndpoint) -> Message {
    let meta = || vec![udp::PacketMetadata::EMPTY; 4];
    let mut s =
        udp::Socket::new(udp::PacketBuffer::new(meta(), vec![0; 4096]), udp::PacketBuffer::new(meta(), vec![0; 4096]));
    let port = 5300 + n.guest.sockets.iter().count() as u16;
    s.bind(port).unwrap();
    let h = n.guest.sockets.add(s);
    let mut q = Message::new();
    q.set_id(0x4242).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q.to_vec().unwrap(), resolver).unwrap();
    let before = n.events.len();
    n.run(5);
    let (lookup, bytes) = n.events[before..]
        .iter()
        .find_map(|e| match e {
            Event::Resolve { lookup, upstream_id, bytes } => {
                assert_eq!(Message::from_vec(bytes).unwrap().id(), *upstream_id);
                Some((*lookup, bytes.clone()))
            }
            _ => None,
        })
        .expect("a lookup upstream");
    let records = ips
        .iter()
        .map(|ip| Record::from_rdata(Name::from_ascii(name).unwrap(), 60, RData::A(A::from(Ipv4Addr::from(*ip)))))
        .collect();
    let reply = response_for(&bytes, ResponseCode::NoError, records);
    n.gw.dns_reply(lookup, Some(&reply), n.now);
    n.run(3);
    let (data, meta) = n.guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, m)| (d.to_vec(), m)).unwrap();
    assert_eq!(meta.endpoint, resolver, "the answer comes from the address the guest asked");
    Message::from_vec(&data).unwrap()
}

fn send(n: &mut Net, h: SocketHandle, bytes: &[u8]) {
    n.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(bytes).unwrap();
}

fn received(n: &mut Net, h: SocketHandle) -> Vec<u8> {
    let mut got = vec![0u8; 65536];
    let k = n.guest.sockets.get_mut::<tcp::Socket>(h).recv_slice(&mut got).unwrap_or(0);
    got.truncate(k);
    got
}

#[test]
fn dns_to_any_address_is_answered_by_the_gateway_and_pins_what_it_kept() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:443\ndefault deny\n").unwrap());
    let resolver = IpEndpoint::new(IpAddress::v4(8, 8, 8, 8), 53); // a guest-chosen resolver address
    let m = resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34], [10, 1, 2, 3]], resolver);
    assert_eq!((m.id(), m.answers().len()), (0x4242, 1), "the private answer is gone");
    assert!(n
        .audits()
        .iter()
        .any(|a| a.dest.ip() == "10.1.2.3".parse::<IpAddr>().unwrap() && a.action == Action::Deny));
    // The domain rule now opens the pinned address, on its port only, once the flow names
    // the server.
    let allowed = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 443, 42000);
    let wrong_port = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 42001);
    let unresolved = n.guest.connect(IpAddress::v4(93, 184, 216, 35), 443, 42002);
    n.run(5);
    assert!(n.dials().is_empty(), "nothing is dialed before the server is named");
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(wrong_port).state(), tcp::State::Closed);
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(unresolved).state(), tcp::State::Closed);
    let hello = crate::sniff::tests::hello(&["api.example.com"], Some(30));
    send(&mut n, allowed, &hello);
    n.run(5);
    let dialed: Vec<SocketAddr> = n.dials().into_iter().map(|d| d.1).collect();
    assert_eq!(dialed, vec!["93.184.216.34:443".parse::<SocketAddr>().unwrap()]);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 20);
    n.run(3);
    assert_eq!(n.sent(flow), hello, "the ClientHello goes to the host whole, after the check");
    let a = n.audits().into_iter().rev().find(|a| a.dest.port() == 443 && a.action == Action::Allow).unwrap().clone();
    assert_eq!((a.names.as_slice(), a.rule), (&["api.example.com".to_string()][..], Some(0)));
}

#[test]
fn a_flow_a_domain_rule_allows_must_name_an_allowed_server_it_resolved() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:443,80\ndefault deny\n").unwrap());
    let resolver = IpEndpoint::new(IpAddress::v4(192, 168, 127, 1), 53);
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], resolver);
    let ip = IpAddress::v4(93, 184, 216, 34);
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("fronted SNI", crate::sniff::tests::hello(&["other.example"], None), 443),
        ("no SNI", crate::sniff::tests::hello(&[], None), 443),
        ("two SNIs", crate::sniff::tests::hello(&["api.example.com", "other.example"], None), 443),
        ("fronted Host", b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n".to_vec(), 80),
        ("no Host", b"GET / HTTP/1.0\r\n\r\n".to_vec(), 80),
    ];
    let mut socks = vec![];
    for (i, (_, bytes, port)) in cases.iter().enumerate() {
        let h = n.guest.connect(ip, *port, 44000 + i as u16);
        n.run(3);
        send(&mut n, h, bytes);
        socks.push(h);
    }
    n.run(10);
    assert!(n.dials().is_empty(), "no denied flow got a host socket: {:?}", n.dials());
    for (i, (what, _, port)) in cases.iter().enumerate() {
        let got = received(&mut n, socks[i]);
        if *port == 443 {
            assert_eq!(got, crate::sniff::tls_access_denied(), "{what}: a TLS alert");
        } else {
            let text = String::from_utf8(got).unwrap();
            assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{what}: {text}");
            assert!(text.contains("the sandbox's network policy denies"), "{what}: {text}");
        }
        assert!(!n.guest.sockets.get::<tcp::Socket>(socks[i]).may_recv(), "{what}: the gateway closed");
    }
    let denials: Vec<&Audit> = n.audits().into_iter().filter(|a| a.action == Action::Deny).collect();
    assert_eq!(denials.len(), 5, "{denials:?}");
    assert!(denials[0].why.contains("other.example was not resolved to 93.184.216.34"), "{}", denials[0].why);
    assert!(denials[1].why.contains("without a server name"), "{}", denials[1].why);
    assert!(denials[4].why.contains("without a Host header"), "{}", denials[4].why);
    // A name that is allowed and resolved here passes by HTTP Host too.
    let ok = n.guest.connect(ip, 80, 44100);
    n.run(3);
    send(&mut n, ok, b"GET / HTTP/1.1\r\nHost: API.example.com:80\r\n\r\n");
    n.run(3);
    assert_eq!(n.dials().len(), 1);
    n.run(600); // past the linger: the denied flows are gone
    assert_eq!(n.gw.flow_count(), 1);
}

#[test]
fn a_flow_only_a_domain_rule_allows_is_never_dialed_before_it_names_its_server() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let ip = IpAddress::v4(93, 184, 216, 34);
    let silent = n.guest.connect(ip, 22, 45000);
    let fronted = n.guest.connect(ip, 443, 45001);
    n.run((SNIFF_WAIT_MS / 10) as usize + 10);
    assert!(n.dials().is_empty(), "a server that speaks first is no name: nothing is dialed");
    send(&mut n, fronted, &crate::sniff::tests::hello(&["other.example"], None));
    n.run(5);
    assert_eq!(received(&mut n, fronted), crate::sniff::tls_access_denied());
    n.run((NAME_WAIT_MS / 10) as usize);
    assert!(n.dials().is_empty(), "the silent flow was never dialed");
    let s = n.guest.sockets.get::<tcp::Socket>(silent);
    assert!(!s.is_active() || !s.may_send(), "the silent flow is ended: {:?}", s.state());
}

#[test]
fn dns_over_tcp_to_any_address_is_answered_here_and_never_dialed() {
    let mut n = Net::new(Policy::default());
    let h = n.guest.connect(IpAddress::v4(9, 9, 9, 9), 53, 46000);
    n.run(3);
    let mut q = Message::new();
    q.set_id(7).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    q.add_query(Query::query(Name::from_ascii("a.example.").unwrap(), RecordType::A));
    let q = q.to_vec().unwrap();
    // Two queries in one write, the second split across writes.
    let mut wire = Vec::new();
    for _ in 0..2 {
        wire.extend_from_slice(&(q.len() as u16).to_be_bytes());
        wire.extend_from_slice(&q);
    }
    send(&mut n, h, &wire[..wire.len() - 5]);
    n.run(3);
    send(&mut n, h, &wire[wire.len() - 5..]);
    n.run(3);
    assert!(n.dials().is_empty(), "DNS over TCP is not relayed");
    let lookups: Vec<(u64, Vec<u8>)> = n
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Resolve { lookup, bytes, .. } => Some((*lookup, bytes.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(lookups.len(), 2);
    let a = |ip: [u8; 4]| {
        Record::from_rdata(Name::from_ascii("a.example.").unwrap(), 60, RData::A(A::from(Ipv4Addr::from(ip))))
    };
    n.gw.dns_reply(
        lookups[0].0,
        Some(&response_for(&lookups[0].1, ResponseCode::NoError, vec![a([93, 184, 216, 1]), a([127, 0, 0, 1])])),
        n.now,
    );
    n.gw.dns_reply(lookups[1].0, None, n.now);
    n.run(3);
    let got = received(&mut n, h);
    assert!(got.len() > 2, "{:?} {:?}", n.guest.sockets.get::<tcp::Socket>(h).state(), n.events);
    let len = u16::from_be_bytes([got[0], got[1]]) as usize;
    let first = Message::from_vec(&got[2..2 + len]).unwrap();
    assert_eq!((first.id(), first.answers().len()), (7, 1), "filtered like UDP");
    let rest = &got[2 + len..];
    let second = Message::from_vec(&rest[2..]).unwrap();
    assert_eq!(second.response_code(), ResponseCode::ServFail);
    // The guest closes; so does the gateway.
    n.guest.sockets.get_mut::<tcp::Socket>(h).close();
    n.run(10);
    assert!(!n.guest.sockets.get::<tcp::Socket>(h).may_recv());
    // A length no query needs resets the connection.
    let big = n.guest.connect(IpAddress::v4(9, 9, 9, 9), 53, 46001);
    n.run(3);
    send(&mut n, big, &[0xff, 0xff, 0]);
    n.run(3);
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(big).state(), tcp::State::Closed);
}

/// A raw SYN from the guest's address.
pub(crate) fn syn(cfg: &NetConfig, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{EthernetRepr, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};
    let tcp = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1),
        ack_number: None,
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: cfg.guest_v4,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(cfg.guest_mac),
        dst_addr: EthernetAddress(cfg.gateway_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &ChecksumCapabilities::default());
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(&mut t, &IpAddress::Ipv4(cfg.guest_v4), &IpAddress::Ipv4(dst), &ChecksumCapabilities::default());
    buf
}

#[test]
fn a_syn_flood_stays_within_the_rate_and_the_table() {
    let cfg = NetConfig::default();
    let mut gw = Gateway::new(cfg, Policy::default(), Classifier::default(), 1, 0);
    let mut dials = 0;
    let mut now = 0;
    for i in 0..10_000u32 {
        if i % 100 == 0 {
            now += 100;
            gw.poll(now);
            dials +=
                gw.take_events().iter().filter(|e| matches!(e, Event::Audit(a) if a.action == Action::Allow)).count();
            gw.take_frames();
        }
        let dst = Ipv4Addr::new(93, 184, (i >> 8) as u8, i as u8);
        gw.guest_frame(syn(&cfg, dst, 1024 + (i % 60000) as u16, 80), now);
    }
    gw.poll(now);
    dials += gw.take_events().iter().filter(|e| matches!(e, Event::Dial { .. })).count();
    // 10 s of flood: the burst plus 64 a second.
    assert!(dials <= SYN_BURST as usize + 10 * SYN_PER_SEC as usize + SYN_PER_SEC as usize, "{dials} dials");
    assert!(dials >= SYN_BURST as usize, "the burst was served: {dials}");
    assert!(gw.flow_count() <= MAX_FLOWS);
    assert!(gw.take_frames().len() <= MAX_FRAMES);
}

#[test]
fn a_spoofed_source_is_dropped_before_the_stack_sees_it() {
    let cfg = NetConfig::default();
    let mut gw = Gateway::new(cfg, Policy::default(), Classifier::default(), 1, 0);
    let mut frame = syn(&cfg, Ipv4Addr::new(93, 184, 216, 34), 1000, 80);
    frame[14 + 12..14 + 16].copy_from_slice(&[192, 168, 127, 9]); // another source address
    assert!(gw.guest_frame(frame, 0));
    gw.poll(10);
    assert_eq!(gw.spoofed, 1);
    assert!(gw.take_events().is_empty(), "no decision, no dial");
}

#[test]
fn a_policy_tightened_live_resets_the_flows_it_now_denies() {
    let mut n = Net::new(Policy::default());
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 43000);
    n.run(5);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.run(2);
    assert!(n.guest.sockets.get::<tcp::Socket>(h).may_send());
    n.gw.set_policy(Policy::parse("deny 93.184.216.0/24\nallow public\n").unwrap(), n.now);
    n.run(5);
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Closed, "reset");
    assert!(n.events.contains(&Event::Closed { flow }));
    assert_eq!(n.gw.flow_count(), 0);
}

#[test]
fn a_published_port_connects_into_the_guest_and_a_closed_one_is_refused() {
    let mut n = Net::new(Policy::default());
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 4096]));
    s.listen(8080).unwrap();
    let h = n.guest.sockets.add(s);
    let flow = n.gw.inbound(8080, 1 << 16, n.now).unwrap();
    n.run(5);
    assert!(n.guest.sockets.get::<tcp::Socket>(h).may_send(), "the guest accepted the connection");
    assert_eq!(n.gw.host_data(flow, b"GET /", n.now), 5);
    n.run(5);
    let mut buf = [0u8; 16];
    let k = n.guest.sockets.get_mut::<tcp::Socket>(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..k], b"GET /");
    n.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"200").unwrap();
    n.run(5);
    let back = n.sent(flow);
    assert_eq!(back, b"200");
    assert!(n.events.iter().all(|e| !matches!(e, Event::GuestDone { .. } | Event::Dial { .. })), "{:?}", n.events);
    // A policy change does not touch inbound flows.
    n.gw.set_policy(Policy::parse("deny any").unwrap(), n.now);
    n.run(2);
    assert!(n.gw.flow_count() == 1, "the published flow survives an egress policy change");
    // Nothing listens on 9090: the guest refuses, the flow closes.
    let refused = n.gw.inbound(9090, 1 << 16, n.now).unwrap();
    n.run(5);
    assert!(n.events.contains(&Event::Closed { flow: refused }), "{:?}", n.events);
}

fn udp_socket(n: &mut Net, port: u16) -> SocketHandle {
    let meta = || vec![udp::PacketMetadata::EMPTY; 8];
    let mut s =
        udp::Socket::new(udp::PacketBuffer::new(meta(), vec![0; 8192]), udp::PacketBuffer::new(meta(), vec![0; 8192]));
    s.bind(port).unwrap();
    n.guest.sockets.add(s)
}

#[test]
fn udp_is_relayed_per_flow_when_allowed_and_refused_with_icmp_when_not() {
    let mut n = Net::new(Policy::default());
    let h = udp_socket(&mut n, 5000);
    let public = IpEndpoint::new(IpAddress::v4(93, 184, 216, 34), 123);
    let private = IpEndpoint::new(IpAddress::v4(10, 0, 0, 1), 123);
    n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"one", public).unwrap();
    n.run(2);
    n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"two", public).unwrap();
    n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"no", private).unwrap();
    // Frames the gateway sends back, looked at before the guest stack takes them.
    n.guest.iface.poll(Instant::from_millis(n.now as i64), &mut n.guest.dev, &mut n.guest.sockets);
    for f in n.guest.dev.tx.drain(..).collect::<Vec<_>>() {
        assert!(n.gw.guest_frame(f, n.now));
    }
    n.gw.poll(n.now);
    n.events.extend(n.gw.take_events());
    let back = n.gw.take_frames();
    let icmp = back.iter().any(|f| {
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        ip.next_header() == IpProtocol::Icmp
    });
    let shown: Vec<String> = back
        .iter()
        .map(|f| {
            format!("{:?}", Ipv4Packet::new_checked(&f[14..]).map(|p| (p.src_addr(), p.dst_addr(), p.next_header())))
        })
        .collect();
    assert!(icmp, "the denied datagram is answered ICMP unreachable: {shown:?}");
    let opened: Vec<(FlowId, SocketAddr)> = n
        .events
        .iter()
        .filter_map(|e| match e {
            Event::UdpOpen { flow, addr } => Some((*flow, *addr)),
            _ => None,
        })
        .collect();
    assert_eq!(opened.len(), 1, "one flow for the public destination: {:?}", n.events);
    let (flow, addr) = opened[0];
    assert_eq!(addr, "93.184.216.34:123".parse().unwrap());
    let sent: Vec<&[u8]> = n
        .events
        .iter()
        .filter_map(|e| match e {
            Event::UdpSend { flow: f, bytes } if *f == flow => Some(bytes.as_slice()),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [&b"one"[..], b"two"]);
    assert!(n.audits().iter().any(|a| a.proto == Proto::Udp && a.group == Group::Private && a.action == Action::Deny));
    // The host's answer comes back from the destination.
    assert!(n.gw.udp_reply(flow, b"pong", n.now));
    assert!(!n.gw.udp_reply(flow, &[0u8; 1473], n.now), "no fragments: larger than one frame is dropped");
    n.run(3);
    let (data, meta) = n.guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, m)| (d.to_vec(), m)).unwrap();
    assert_eq!((data.as_slice(), meta.endpoint), (&b"pong"[..], public));
    // Idle flows close.
    n.run((UDP_IDLE_MS / 10) as usize + 200);
    assert!(n.events.contains(&Event::Closed { flow }), "idle for a minute: closed");
    assert!(!n.gw.udp_reply(flow, b"late", n.now));
}

#[test]
fn udp_flows_are_capped_and_a_tightened_policy_closes_them() {
    let mut n = Net::new(Policy::default());
    let h = udp_socket(&mut n, 5001);
    for i in 0..(MAX_UDP_FLOWS + 20) {
        let dst = IpEndpoint::new(IpAddress::v4(93, 184, (i >> 8) as u8, i as u8), 9);
        n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"x", dst).unwrap();
        if i % 4 == 3 {
            n.run(1);
        }
        if i % 64 == 63 {
            n.run(100); // let the new-flow rate refill
        }
    }
    n.run(2);
    let opened = n.events.iter().filter(|e| matches!(e, Event::UdpOpen { .. })).count();
    assert_eq!(opened, MAX_UDP_FLOWS, "the table's cap");
    assert!(n.audits().iter().any(|a| a.why.contains("UDP table is full")));
    n.gw.set_policy(Policy::parse("deny 93.184.0.0/16\nallow public\n").unwrap(), n.now);
    let closed = n.gw.take_events().iter().filter(|e| matches!(e, Event::Closed { .. })).count();
    assert_eq!(closed, MAX_UDP_FLOWS, "every flow the new policy denies is closed");
}

#[test]
fn a_flow_whose_syn_ack_the_guest_resets_is_reaped_and_takes_no_other_syn() {
    let cfg = NetConfig::default();
    let mut n = Net::new(Policy::default());
    let dst = Ipv4Addr::new(93, 184, 216, 34);
    // A raw SYN (no guest socket behind it): the guest stack answers the SYN-ACK with RST.
    assert!(n.gw.guest_frame(syn(&cfg, dst, 30000, 80), n.now));
    n.run(5);
    assert!(n.events.iter().any(|e| matches!(e, Event::Closed { .. })), "reaped: {:?}", n.events);
    assert_eq!(n.gw.flow_count(), 0);
    // A real connection to the same destination gets its own flow and works.
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 30001);
    n.run(5);
    let (flow, _) = *n.dials().last().unwrap();
    n.gw.host_connected(flow, 1 << 16);
    n.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"mine").unwrap();
    n.run(5);
    assert_eq!(n.sent(flow), b"mine");
}

#[test]
fn after_a_raw_syn_flood_a_real_connection_still_works_end_to_end() {
    let cfg = NetConfig::default();
    let mut n = Net::new(Policy::default());
    let dst = Ipv4Addr::new(93, 184, 216, 34);
    for i in 0..3000u32 {
        let _ = n.gw.guest_frame(syn(&cfg, dst, 20000 + i as u16, 80), n.now);
        if i % 50 == 49 {
            n.run(1);
        }
    }
    n.run(300); // three seconds: the rate refills
    assert_eq!(n.gw.flow_count(), 0, "every flooded flow was reaped");
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 40001);
    n.run(5);
    let (flow, addr) = *n.dials().last().unwrap();
    assert_eq!(addr.port(), 80);
    n.gw.host_connected(flow, 1 << 16);
    n.guest.sockets.get_mut::<tcp::Socket>(h).send_slice(b"GET").unwrap();
    n.run(5);
    assert_eq!(n.sent(flow), b"GET", "the real connection's bytes reach its own flow");
    n.gw.host_done(flow);
    n.run(5);
    assert!(!n.guest.sockets.get::<tcp::Socket>(h).may_recv(), "the host's close reaches the guest");
}

#[test]
fn a_flow_is_dialed_only_after_the_guests_handshake_and_a_host_that_closes_at_once_closes_it() {
    let mut n = Net::new(Policy::default());
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 47000);
    while n.dials().is_empty() {
        // ARP, the SYN, the SYN-ACK: no dial while the guest has not ACKed (N15).
        assert_ne!(n.guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Established, "dialed late");
        n.run(1);
    }
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Established);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.gw.host_done(flow);
    n.run(10);
    let s = n.guest.sockets.get::<tcp::Socket>(h);
    assert!(!s.may_recv(), "the host's close reached the guest: {:?}", s.state());
}

#[test]
fn a_partial_client_hello_waits_for_its_rest_then_is_denied_if_it_stalls() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:443\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let ip = IpAddress::v4(93, 184, 216, 34);
    let hello = crate::sniff::tests::hello(&["api.example.com"], None);
    let slow = n.guest.connect(ip, 443, 48000);
    let stalled = n.guest.connect(ip, 443, 48001);
    n.run(3);
    send(&mut n, slow, &hello[..20]);
    send(&mut n, stalled, &hello[..20]);
    n.run((NAME_WAIT_MS / 10) as usize + 50); // past the wait: a slow client's rest may come
    assert!(n.dials().is_empty());
    send(&mut n, slow, &hello[20..]);
    n.run(5);
    assert_eq!(n.dials().len(), 1, "the slow client's whole ClientHello is allowed");
    n.run((DENIED_LINGER_MS / 10) as usize);
    assert_eq!(received(&mut n, stalled), crate::sniff::tls_access_denied(), "the stalled one is denied");
    assert_eq!(n.dials().len(), 1);
}

#[test]
fn every_request_of_a_kept_alive_http_flow_must_name_an_allowed_host() {
    let mut n = Net::new(Policy::parse("allow tcp/*.example.com:80\ndefault deny\n").unwrap());
    let r = IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53);
    resolve(&mut n, "a.example.com.", &[[93, 184, 216, 34]], r);
    resolve(&mut n, "b.example.com.", &[[93, 184, 216, 34]], r);
    let ip = IpAddress::v4(93, 184, 216, 34);
    let h = n.guest.connect(ip, 80, 49000);
    n.run(3);
    let first = b"POST / HTTP/1.1\r\nHost: a.example.com\r\nContent-Length: 4\r\n\r\nbody";
    let second = b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n"; // another allowed name, resolved here
    let fronted = b"GET /x HTTP/1.1\r\nHost: other.example\r\n\r\n";
    send(&mut n, h, first);
    n.run(3);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.run(3);
    send(&mut n, h, second);
    n.run(3);
    assert_eq!(n.sent(flow), [&first[..], second].concat(), "allowed requests go through");
    send(&mut n, h, fronted);
    n.run(3);
    assert_eq!(n.sent(flow), [&first[..], second].concat(), "the fronted request never left");
    assert_eq!(n.guest.sockets.get::<tcp::Socket>(h).state(), tcp::State::Closed, "reset");
    assert!(n.events.contains(&Event::Closed { flow }));
    let names: Vec<(String, Action)> =
        n.audits().iter().filter(|a| a.dest.port() == 80).map(|a| (a.names.join(","), a.action)).collect();
    assert_eq!(
        names,
        [
            ("a.example.com".to_string(), Action::Allow),
            ("b.example.com".to_string(), Action::Allow),
            ("other.example".to_string(), Action::Deny)
        ]
    );
}

#[test]
fn byte_limits_pace_each_direction_and_lose_nothing() {
    let mut n = Net::new(Policy::default());
    let limits =
        Limits { egress_bytes_per_sec: Some(20_000), ingress_bytes_per_sec: Some(40_000), ..Limits::default() };
    assert_eq!(limits.check(), Ok(()));
    n.gw.set_limits(limits, n.now);
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 40000);
    n.run(5);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 20);
    // Out: 60,000 bytes from the guest; one second lets the burst (5,000) and 20,000 through.
    let out: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    send(&mut n, h, &out);
    n.run(100);
    let first_second = n.sent(flow).len();
    assert!((18_000..=26_500).contains(&first_second), "{first_second} bytes in the first second");
    let delay = n.gw.poll_delay(n.now).expect("a wake-up while bytes wait");
    assert!(delay <= 75, "woken when a frame's worth is back (1500 B at 20 kB/s), not at the 1 s floor: {delay}");
    n.run(300);
    assert_eq!(n.sent(flow), out, "everything arrives, in order, once");
    // In: 100,000 bytes offered by the host as the shell does (what is not taken is offered
    // again); one second takes the burst (10,000) and 40,000.
    let back: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let (mut at, mut got) = (0, Vec::new());
    for round in 0..400 {
        at += n.gw.host_data(flow, &back[at..], n.now);
        n.run(1);
        got.extend(received(&mut n, h));
        if round == 99 {
            assert!((45_000..=52_000).contains(&at), "{at} bytes taken in the first second");
        }
    }
    assert_eq!(at, back.len());
    assert_eq!(got, back, "everything reaches the guest, in order, once");
}

#[test]
fn the_new_flow_rate_is_the_sandboxs_own() {
    let cfg = NetConfig::default();
    let mut gw = Gateway::new(cfg, Policy::default(), Classifier::default(), 1, 0);
    gw.set_limits(Limits { flows_per_sec: 10, flow_burst: 5, ..Limits::default() }, 0);
    let mut dials = 0;
    for i in 0..200u32 {
        let now = u64::from(i) * 10;
        gw.guest_frame(syn(&cfg, Ipv4Addr::new(93, 184, 1, i as u8), 2000 + i as u16, 80), now);
        gw.poll(now);
        // Raw SYNs never finish their handshake (so nothing is dialed): count the flows allowed.
        dials += gw.take_events().iter().filter(|e| matches!(e, Event::Audit(a) if a.action == Action::Allow)).count();
        gw.take_frames();
    }
    // Two seconds: the burst of 5 plus 10 a second.
    assert!((20..=26).contains(&dials), "{dials} dials");
}

// ---- regressions of the 2026-12 review (net findings N1, N4, N6, N8, N15) ----

/// Connects from `port` to `ip:dport`, sends `bytes`, lets the gateway decide; if it dialed,
/// the host side connects and what reached the host is returned.
fn review_try(n: &mut Net, ip: IpAddress, dport: u16, port: u16, bytes: &[u8]) -> Option<Vec<u8>> {
    let before: Vec<FlowId> = n.dials().iter().map(|d| d.0).collect();
    let h = n.guest.connect(ip, dport, port);
    n.run(3);
    send(n, h, bytes);
    n.run(20);
    let new: Vec<FlowId> = n.dials().iter().map(|d| d.0).filter(|f| !before.contains(f)).collect();
    let flow = *new.first()?;
    n.gw.host_connected(flow, 1 << 16);
    n.run(20);
    Some(n.sent(flow))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// N1: on a flow only a domain rule allows, first bytes the sniffer cannot read as a named
/// server are denied, never decided by the pinned address: a ClientHello past what is read,
/// a leading CRLF, two spaces in the request line, the HTTP/2 preface. A 20 KB ClientHello
/// (within what servers take) is read whole and decided by its name.
#[test]
fn first_bytes_the_sniffer_cannot_read_never_pass_a_domain_only_flow() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:80,443\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let ip = IpAddress::v4(93, 184, 216, 34);
    let hello = crate::review_tests::hello_with;
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        (
            "a ClientHello for other.example padded past 16 KiB",
            443,
            hello("other.example", &[(21, vec![0; 20_000])], 16384),
        ),
        (
            "a ClientHello for other.example of 16,382 bytes",
            443,
            hello("other.example", &[(21, vec![0; 16_382 - 69])], 16384),
        ),
        (
            "a ClientHello past 64 KiB",
            443,
            hello("api.example.com", &[(21, vec![0; 40_000]), (22, vec![0; 40_000])], 16384),
        ),
        (
            "an encrypted ClientHello under an allowed outer name",
            443,
            hello("api.example.com", &[(0xfe0d, vec![0; 10])], 16384),
        ),
        ("a leading CRLF", 80, b"\r\nGET / HTTP/1.1\r\nHost: other.example\r\n\r\n".to_vec()),
        ("two spaces after the method", 80, b"GET  / HTTP/1.1\r\nHost: other.example\r\n\r\n".to_vec()),
        ("the HTTP/2 prior-knowledge preface", 80, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        (
            "an https:// absolute-form target",
            80,
            b"GET https://other.example/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(),
        ),
    ];
    let mut leaked = vec![];
    for (i, (what, port, bytes)) in cases.iter().enumerate() {
        if let Some(sent) = review_try(&mut n, ip, *port, 47000 + i as u16, bytes) {
            leaked.push(format!("{what}: dialed, {} of {} bytes reached the host", sent.len(), bytes.len()));
        }
    }
    assert!(leaked.is_empty(), "{leaked:#?}");
    // The allowed name in a large ClientHello goes.
    let big = hello("api.example.com", &[(21, vec![0; 20_000])], 16384);
    let sent =
        review_try(&mut n, ip, 443, 47100, &big).expect("a 20 KB ClientHello naming the allowed server is dialed");
    assert_eq!(sent.len(), big.len());
}

/// N4a: after an `Upgrade` the server ignored, the next request is still checked.
#[test]
fn an_upgrade_the_server_ignored_does_not_end_the_per_request_check() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:80\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 48000);
    n.run(3);
    send(&mut n, h, b"GET / HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\n\r\n");
    n.run(5);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.run(3);
    n.gw.host_data(flow, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", n.now);
    n.run(3);
    send(&mut n, h, b"GET /x HTTP/1.1\r\nHost: other.example\r\n\r\n");
    n.run(5);
    assert!(!contains(&n.sent(flow), b"other.example"), "the fronted request reached the host");
    assert!(contains(&n.sent(flow), b"Upgrade: websocket"), "the upgrade request itself went");
}

/// N4c: a chunk-size line ended by a bare LF cannot smuggle a request past the framer.
#[test]
fn a_chunk_extension_ending_in_a_bare_lf_smuggles_nothing() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:80\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let wire = crate::review_tests::bare_lf_smuggle();
    let sent = review_try(&mut n, IpAddress::v4(93, 184, 216, 34), 80, 48100, &wire).unwrap_or_default();
    assert!(!contains(&sent, b"Host: other.example"), "smuggled past the framer: {}", String::from_utf8_lossy(&sent));
}

/// N6: `allow api.example.com` (no protocol) opens no UDP to the pinned address.
#[test]
fn a_domain_rule_without_udp_opens_no_udp() {
    let mut n = Net::new(Policy::parse("allow api.example.com\ndefault deny\n").unwrap());
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let h = udp_socket(&mut n, 5100);
    let dst = IpEndpoint::new(IpAddress::v4(93, 184, 216, 34), 443);
    n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"QUIC Initial naming other.example", dst).unwrap();
    n.run(3);
    let opened = n.events.iter().filter(|e| matches!(e, Event::UdpOpen { .. })).count();
    assert_eq!(opened, 0, "a UDP flow was opened with no name check");
}

/// N8: `--deny '*.evil.example'` before the default `allow public` holds against a flow that
/// names the denied server through an alias this sandbox resolved, on TLS and plain HTTP;
/// a flow naming another server still goes.
#[test]
fn a_domain_deny_rule_holds_against_a_flow_naming_that_domain() {
    let mut n = Net::new(
        Policy::with_rules(vec![crate::policy::Rule::parse(Action::Deny, "*.evil.example").unwrap()]).unwrap(),
    );
    resolve(&mut n, "alias.attacker.example.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let ip = IpAddress::v4(93, 184, 216, 34);
    let hello = crate::sniff::tests::hello(&["www.evil.example"], None);
    assert_eq!(review_try(&mut n, ip, 443, 48200, &hello), None, "a ClientHello naming www.evil.example was dialed");
    let get = b"GET / HTTP/1.1\r\nHost: www.evil.example\r\n\r\n";
    assert_eq!(review_try(&mut n, ip, 80, 48201, get), None, "a request naming www.evil.example was dialed");
    let fine = crate::sniff::tests::hello(&["alias.attacker.example"], None);
    assert_eq!(review_try(&mut n, ip, 443, 48202, &fine).map(|s| s.len()), Some(fine.len()));
    // A later request on an allowed plain-HTTP flow naming the denied server is reset.
    let first =
        b"GET / HTTP/1.1\r\nHost: alias.attacker.example\r\n\r\nGET / HTTP/1.1\r\nHost: www.evil.example\r\n\r\n";
    let sent = review_try(&mut n, ip, 80, 48203, first).unwrap();
    assert!(!contains(&sent, b"www.evil.example"), "{}", String::from_utf8_lossy(&sent));
}

/// N15: a request head larger than the egress bucket's burst is framed whole and goes,
/// instead of stalling the flow for good.
#[test]
fn a_head_larger_than_the_rate_burst_still_goes() {
    let mut n = Net::new(Policy::parse("allow tcp/api.example.com:80\ndefault deny\n").unwrap());
    let now = n.now;
    n.gw.set_limits(Limits { egress_bytes_per_sec: Some(4000), ..Limits::default() }, now);
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let head = format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Big: {}\r\n\r\n", "x".repeat(3000));
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 48300);
    n.run(3);
    send(&mut n, h, head.as_bytes());
    n.run(50);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.run(300);
    assert_eq!(n.sent(flow).len(), head.len(), "the whole head reached the host");
}

/// N14: a published UDP port's peer flow lives on the peer's datagrams, not the guest's:
/// the guest writing to a silent peer neither keeps it open nor sends past its window.
#[test]
fn a_published_udp_peer_flow_idles_out_when_the_peer_is_silent() {
    let mut n = Net::new(Policy::default());
    let h = udp_socket(&mut n, 5353);
    let flow = n.gw.inbound_udp(5353, n.now).unwrap();
    assert!(n.gw.udp_reply(flow, b"one query", n.now));
    n.run(3);
    let (_, meta) = n.guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, m)| (d.to_vec(), m)).unwrap();
    for _ in 0..6 {
        n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"to the host peer", meta.endpoint).unwrap();
        n.run(3000);
    }
    assert!(n.events.contains(&Event::Closed { flow }), "the silent peer's flow is closed");
    // The window: at most UDP_PEER_WINDOW guest datagrams per peer datagram.
    let flow = n.gw.inbound_udp(5353, n.now).unwrap();
    assert!(n.gw.udp_reply(flow, b"again", n.now));
    n.run(3);
    let (_, meta) = n.guest.sockets.get_mut::<udp::Socket>(h).recv().map(|(d, m)| (d.to_vec(), m)).unwrap();
    let before = n.events.len();
    for _ in 0..(UDP_PEER_WINDOW + 20) {
        n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(b"x", meta.endpoint).unwrap();
        n.run(1);
    }
    let sends = n.events[before..].iter().filter(|e| matches!(e, Event::UdpSend { flow: f, .. } if *f == flow)).count();
    assert_eq!(sends, UDP_PEER_WINDOW as usize);
}

/// N16: a TCP SYN from a link-local IPv6 source, or behind an IPv6 extension header, never
/// reaches smoltcp.
#[test]
fn link_local_sources_and_extension_headers_are_dropped_for_tcp_and_udp() {
    let cfg = NetConfig::default();
    let mut gw = Gateway::new(cfg, Policy::default(), Classifier::default(), 1, 0);
    // An IPv6 SYN: Ethernet, IPv6 (next header TCP), TCP.
    let v6_syn = |src: std::net::Ipv6Addr, next: u8| {
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        f[14 + 4..14 + 6].copy_from_slice(&20u16.to_be_bytes());
        f[14 + 6] = next;
        f[14 + 7] = 64;
        f[14 + 8..14 + 24].copy_from_slice(&src.octets());
        f[14 + 24..14 + 40].copy_from_slice(&"2606:4700::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let t = 14 + 40;
        f[t..t + 2].copy_from_slice(&1000u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&443u16.to_be_bytes());
        f[t + 12] = 5 << 4;
        f[t + 13] = 0x02; // SYN
        f
    };
    assert!(gw.guest_frame(v6_syn("fe80::1".parse().unwrap(), 6), 0));
    assert!(gw.guest_frame(v6_syn(cfg.guest_v6, 0), 0)); // Hop-by-Hop first
    gw.poll(10);
    assert_eq!(gw.spoofed, 2);
    assert!(gw.take_events().is_empty(), "no decision, no dial");
}

/// N11: DNS lookups are rate-limited per sandbox; past the burst, SERVFAIL without a lookup.
#[test]
fn dns_lookups_are_rate_limited() {
    let mut n = Net::new(Policy::default());
    let meta = || vec![udp::PacketMetadata::EMPTY; 256];
    let mut s = udp::Socket::new(
        udp::PacketBuffer::new(meta(), vec![0; 65536]),
        udp::PacketBuffer::new(meta(), vec![0; 65536]),
    );
    s.bind(5400).unwrap();
    let h = n.guest.sockets.add(s);
    let resolver = IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53);
    for i in 0..(DNS_BURST + 50) {
        let mut q = Message::new();
        q.set_id(i as u16).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
        q.add_query(Query::query(Name::from_ascii(format!("n{i}.example.com.")).unwrap(), RecordType::A));
        n.guest.sockets.get_mut::<udp::Socket>(h).send_slice(&q.to_vec().unwrap(), resolver).unwrap();
        if i % 32 == 31 {
            n.run(1);
            // Answer what went upstream so the in-flight bound is not what stops them.
            let pending: Vec<(u64, Vec<u8>)> = n
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Resolve { lookup, bytes, .. } => Some((*lookup, bytes.clone())),
                    _ => None,
                })
                .collect();
            for (lookup, bytes) in pending {
                let reply = response_for(&bytes, ResponseCode::NoError, vec![]);
                n.gw.dns_reply(lookup, Some(&reply), n.now);
            }
        }
    }
    n.run(3);
    let lookups = n.events.iter().filter(|e| matches!(e, Event::Resolve { .. })).count() as u64;
    assert!(lookups <= DNS_BURST + 2, "{lookups} lookups went upstream at once");
    let limited = n.audits().iter().filter(|a| a.why.contains("DNS lookups a second")).count();
    assert!(limited > 0, "the refusals are audited");
    let audited = n.audits().iter().filter(|a| a.why.starts_with("DNS A lookup")).count();
    assert!(audited > 0, "allowed lookups are audited too");
}

/// N3: when the host takes an address a live flow goes to, the flow is reset; N12: a UDP
/// flow whose socket the kernel connected elsewhere (0.0.0.0 reads back as 127.0.0.1) is
/// closed at its dial point before a datagram goes.
#[test]
fn a_new_host_address_resets_its_flows_and_udp_has_a_dial_point() {
    let mut n = Net::new(Policy::default());
    let h = n.guest.connect(IpAddress::v4(93, 184, 216, 34), 80, 43100);
    n.run(5);
    let (flow, _) = n.dials()[0];
    n.gw.host_connected(flow, 1 << 16);
    n.run(5);
    assert!(n.guest.sockets.get::<tcp::Socket>(h).may_send());
    let now = n.now;
    n.gw.set_classifier(Classifier::new(["93.184.216.34".parse::<IpAddr>().unwrap()]), now);
    n.run(5);
    assert!(!n.guest.sockets.get::<tcp::Socket>(h).is_active(), "the flow to the host's new address was reset");
    // UDP: allowed to a public address, but the kernel connected it to loopback.
    let u = udp_socket(&mut n, 5600);
    let dst = IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 5000);
    n.guest.sockets.get_mut::<udp::Socket>(u).send_slice(b"x", dst).unwrap();
    n.run(3);
    let flow = n.events.iter().find_map(|e| match e {
        Event::UdpOpen { flow, .. } => Some(*flow),
        _ => None,
    });
    let flow = flow.expect("a UDP flow");
    let now = n.now;
    assert!(!n.gw.udp_dial_point(flow, "127.0.0.1:5000".parse().unwrap(), now));
    assert!(n.events.contains(&Event::Closed { flow }) || n.gw.take_events().contains(&Event::Closed { flow }));
}

// ---- secrets: which flows are intercepted ----

fn alpn_ext(protos: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for p in protos {
        list.push(p.len() as u8);
        list.extend_from_slice(p);
    }
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend(list);
    (16, body)
}

fn intercepts(n: &Net) -> Vec<(FlowId, SocketAddr, String, bool)> {
    n.events
        .iter()
        .filter_map(|e| match e {
            Event::Intercept { flow, addr, name, pinned } => Some((*flow, *addr, name.clone(), *pinned)),
            _ => None,
        })
        .collect()
}

/// Only TLS to a secret's host, at an address resolved for it, offering HTTP or no ALPN, is
/// intercepted; another name at that address, an unresolved address with the secret's
/// name, and a non-HTTP ALPN are relayed as they are; QUIC to the secret's host is refused.
#[test]
fn only_tls_to_a_secret_host_at_its_resolved_address_is_intercepted() {
    let mut n = Net::new(Policy::default());
    n.gw.set_secret_hosts(vec![SecretHost::parse("api.example.com").unwrap()]);
    resolve(&mut n, "api.example.com.", &[[93, 184, 216, 34]], IpEndpoint::new(IpAddress::v4(1, 1, 1, 1), 53));
    let ip = IpAddress::v4(93, 184, 216, 34);
    let hello = crate::review_tests::hello_with;
    let cases: Vec<(&str, IpAddress, Vec<u8>, bool)> = vec![
        (
            "the secret's host, h2 and http/1.1",
            ip,
            hello("api.example.com", &[alpn_ext(&[b"h2", b"http/1.1"])], 16384),
            true,
        ),
        ("the secret's host, no ALPN", ip, hello("API.example.com", &[], 16384), true),
        ("the secret's host, only imap", ip, hello("api.example.com", &[alpn_ext(&[b"imap"])], 16384), false),
        ("another name at that address", ip, hello("other.example", &[], 16384), false),
        (
            "the secret's name at an unresolved address",
            IpAddress::v4(93, 184, 216, 99),
            hello("api.example.com", &[], 16384),
            false,
        ),
        ("plain HTTP to the secret's host", ip, b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(), false),
        // Whatever else comes first goes by the address, as without secrets.
        ("an IP literal as SNI", ip, hello("93.184.216.34", &[], 16384), false),
        ("two server names", ip, crate::sniff::tests::hello(&["api.example.com", "other.example"], None), false),
        ("no SNI", ip, crate::sniff::tests::hello(&[], None), false),
        ("not TLS nor HTTP", ip, b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), false),
    ];
    for (i, (what, dst, bytes, want)) in cases.into_iter().enumerate() {
        let before = (n.dials().len(), intercepts(&n).len());
        let h = n.guest.connect(dst, if bytes[0] == 0x16 { 443 } else { 80 }, 46000 + i as u16);
        n.run(3);
        send(&mut n, h, &bytes);
        n.run((SNIFF_WAIT_MS / 10) as usize + 5);
        let after = (n.dials().len(), intercepts(&n).len());
        if want {
            assert_eq!(after, (before.0, before.1 + 1), "{what}");
            let (_, addr, name, pinned) = intercepts(&n).pop().unwrap();
            assert_eq!(
                (addr.ip(), name.as_str(), pinned),
                ("93.184.216.34".parse().unwrap(), "api.example.com", true),
                "{what}"
            );
        } else {
            assert_eq!(after, (before.0 + 1, before.1), "{what}: relayed untouched");
        }
    }
    // QUIC to the secret host's address is refused; UDP/443 elsewhere is not.
    let u = udp_socket(&mut n, 5443);
    n.guest.sockets.get_mut::<udp::Socket>(u).send_slice(b"quic", IpEndpoint::new(ip, 443)).unwrap();
    n.guest
        .sockets
        .get_mut::<udp::Socket>(u)
        .send_slice(b"quic", IpEndpoint::new(IpAddress::v4(93, 184, 216, 99), 443))
        .unwrap();
    n.run(3);
    let opened: Vec<SocketAddr> =
        n.events.iter().filter_map(|e| if let Event::UdpOpen { addr, .. } = e { Some(*addr) } else { None }).collect();
    assert_eq!(opened, vec!["93.184.216.99:443".parse::<SocketAddr>().unwrap()]);
    assert!(n.audits().iter().any(|a| a.why.contains("QUIC to a secret's host is refused")));
}

/// A placeholder leaving in the clear is audited and forwarded by default; with
/// `on-violation=block` the flow is reset before the bytes holding it go; `stop` asks the
/// sandbox to stop; a split placeholder is still seen; UDP and DNS are looked at too.
#[test]
fn placeholders_in_the_clear_are_audited_blocked_or_stop_the_sandbox() {
    use crate::placeholders::Watched;
    use msb_schema::secret::OnViolation;
    let ph = |c: char| format!("msbph_{}", c.to_string().repeat(26));
    for (on, goes) in [(OnViolation::Forward, true), (OnViolation::Block, false), (OnViolation::Stop, false)] {
        let mut n = Net::new(Policy::default());
        n.gw.set_placeholders(vec![Watched { secret: "API_KEY".into(), placeholder: ph('a'), on_violation: on }]);
        let ip = IpAddress::v4(93, 184, 216, 34);
        let h = n.guest.connect(ip, 80, 47000);
        n.run(5);
        let (flow, _) = *n.dials().last().expect("dialed by its address");
        n.gw.host_connected(flow, 1 << 20);
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", ph('a'));
        let (a, b) = req.split_at(40); // the placeholder is split across two writes
        send(&mut n, h, a.as_bytes());
        n.run(3);
        send(&mut n, h, b.as_bytes());
        n.run(5);
        let sent = n.sent(flow);
        assert_eq!(contains(&sent, ph('a').as_bytes()), goes, "{on:?}");
        let audit = n.audits().into_iter().find(|a| a.why.contains("placeholder of secret API_KEY")).cloned();
        let audit = audit.unwrap_or_else(|| panic!("{on:?}: audited"));
        assert_eq!(audit.action, if goes { Action::Allow } else { Action::Deny });
        let stopped = n.events.iter().any(|e| matches!(e, Event::Stop { .. }));
        assert_eq!(stopped, on == OnViolation::Stop);
        if !goes {
            assert!(
                !n.guest.sockets.get::<tcp::Socket>(h).is_open() || !n.guest.sockets.get::<tcp::Socket>(h).may_send()
            );
        }
    }
    // UDP: audited (and dropped when blocking); an unrelated string is nothing.
    let mut n = Net::new(Policy::default());
    n.gw.set_placeholders(vec![Watched { secret: "K".into(), placeholder: ph('b'), on_violation: OnViolation::Block }]);
    let u = udp_socket(&mut n, 5555);
    let to = IpEndpoint::new(IpAddress::v4(93, 184, 216, 34), 9999);
    n.guest.sockets.get_mut::<udp::Socket>(u).send_slice(ph('b').as_bytes(), to).unwrap();
    n.guest.sockets.get_mut::<udp::Socket>(u).send_slice(b"plain datagram", to).unwrap();
    n.run(3);
    let sends: Vec<Vec<u8>> = n
        .events
        .iter()
        .filter_map(|e| if let Event::UdpSend { bytes, .. } = e { Some(bytes.clone()) } else { None })
        .collect();
    assert_eq!(sends, vec![b"plain datagram".to_vec()]);
    assert!(n.audits().iter().any(|a| a.why.contains("placeholder of secret K") && a.action == Action::Deny));
}
