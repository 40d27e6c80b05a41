//! DNS as the gateway answers it: every query the guest sends (UDP or TCP, to any address)
//! is parsed here, checked against the policy by name, resolved upstream by the gateway, and
//! answered with only the addresses the policy would let the guest reach; every address kept
//! is recorded in the sandbox's [`Pins`] (name → address, TTL-bounded, size-capped), which
//! is what domain rules match flows through.
//!
//! Invariants:
//! - Guest and upstream bytes are parsed (hickory-proto) into checked values before any
//!   decision; a message over [`MAX_MESSAGE`] bytes, not a standard query, or without exactly
//!   one IN question is answered FORMERR (or NXDOMAIN for a name that is not a domain name),
//!   never forwarded.
//! - A name a domain rule denies gets NXDOMAIN without any upstream lookup, and so does a
//!   name no rule could open: when the policy's only allow rules are domain rules, only the
//!   names they match are resolved upstream (DNS is no tunnel out of an allowlist). Reverse
//!   lookups of addresses that are not `public` (RFC 6303's locally served zones and the
//!   like: private, loopback, link-local, unique-local) are answered NXDOMAIN here. An
//!   answer whose A/AAAA addresses are all removed gets NXDOMAIN, not REFUSED (which makes
//!   glibc retry and hang).
//! - Only the record types the policy needs are asked for ([`allowed_type`]): A, AAAA and
//!   CNAME under a policy of domain rules, the common public types (MX, TXT, SRV, PTR, NS,
//!   SOA, CAA) besides when an address rule opens the internet; any other type is answered
//!   here with no records (NODATA), never asked upstream, and an answer carries no record
//!   of another type than the question's but the CNAME chain.
//! - Only the question, CNAME chain and kept A/AAAA records reach the guest: authority and
//!   additional sections are dropped (glue addresses are not decided on), and SVCB/HTTPS
//!   records are dropped (their address hints would bypass this filter).
//! - TTLs the guest sees are clamped to [`MIN_TTL`]..=[`MAX_TTL`] and a pin lives exactly as
//!   long as the TTL the guest was given.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::classify::Classifier;
use crate::policy::{Action, DomainName, Policy};

/// Largest DNS message taken from the guest or from upstream.
pub const MAX_MESSAGE: usize = 4096;
/// Most (name, address) pins one sandbox holds; the soonest to expire goes first.
pub const MAX_PINS: usize = 4096;
/// Most names pinned to one address.
pub const MAX_NAMES_PER_ADDR: usize = 16;
/// Most answer records passed to the guest.
pub const MAX_ANSWERS: usize = 64;
/// TTL bounds, seconds.
pub const MIN_TTL: u32 = 5;
pub const MAX_TTL: u32 = 3600;

/// A checked query from the guest.
#[derive(Debug, Clone)]
pub struct GuestQuery {
    pub id: u16,
    pub name: DomainName,
    pub qtype: RecordType,
    recursion_desired: bool,
    query: Query,
}

/// What to do with a guest's query.
#[derive(Debug)]
pub enum Step {
    /// Answer at once with these bytes (a refusal: FORMERR or NXDOMAIN).
    Answer { bytes: Vec<u8>, why: String },
    /// Resolve upstream, then [`answer`].
    Resolve(GuestQuery),
}

fn error_reply(id: u16, query: Option<&Query>, rd: bool, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(id, OpCode::Query, code);
    if let Some(q) = query {
        m.add_query(q.clone());
    }
    m.set_recursion_desired(rd).set_recursion_available(true);
    m.to_vec().unwrap_or_default()
}

/// Parses a guest's query and decides by name (see the module docs).
pub fn on_query(policy: &Policy, bytes: &[u8]) -> Step {
    let id = if bytes.len() >= 2 { u16::from_be_bytes([bytes[0], bytes[1]]) } else { 0 };
    let formerr =
        |why: &str| Step::Answer { bytes: error_reply(id, None, false, ResponseCode::FormErr), why: why.into() };
    if bytes.len() > MAX_MESSAGE {
        return formerr("a query larger than 4096 bytes");
    }
    let Ok(msg) = Message::from_vec(bytes) else { return formerr("not a DNS message") };
    if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
        return formerr("not a standard query");
    }
    let [q] = msg.queries() else { return formerr("not exactly one question") };
    let rd = msg.recursion_desired();
    if q.query_class() != DNSClass::IN {
        return Step::Answer {
            bytes: error_reply(id, Some(q), rd, ResponseCode::NotImp),
            why: "a class other than IN".into(),
        };
    }
    let nx = |why: String| Step::Answer { bytes: error_reply(id, Some(q), rd, ResponseCode::NXDomain), why };
    let name = match DomainName::parse(&q.name().to_ascii()) {
        Ok(n) => n,
        Err(e) => return nx(format!("not a domain name: {e}")),
    };
    if let Some((Action::Deny, i)) = policy.decide_name(&name) {
        return nx(format!("{name} is denied by {}", policy.describe(Some(i))));
    }
    if let Some(ip) = reverse_address(&name) {
        let group = Classifier::default().classify(ip);
        if group != crate::classify::Group::Public {
            return nx(format!("a reverse lookup of a {group} address is answered here"));
        }
    }
    if !policy.may_resolve(&name) {
        return nx(format!("no allow rule could open {name}, so it is not looked up"));
    }
    if !allowed_type(policy, q.query_type()) {
        let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::NoError);
        m.add_query(q.clone());
        m.set_recursion_desired(rd).set_recursion_available(true);
        return Step::Answer {
            bytes: m.to_vec().unwrap_or_default(),
            why: format!("{} records of {name} are not asked for under this policy", q.query_type()),
        };
    }
    Step::Resolve(GuestQuery { id, name, qtype: q.query_type(), recursion_desired: rd, query: q.clone() })
}

/// Whether the guest may ask for records of type `t` under `policy` (see the module docs).
pub fn allowed_type(policy: &Policy, t: RecordType) -> bool {
    match t {
        RecordType::A | RecordType::AAAA | RecordType::CNAME => true,
        RecordType::MX
        | RecordType::TXT
        | RecordType::SRV
        | RecordType::PTR
        | RecordType::NS
        | RecordType::SOA
        | RecordType::CAA => policy.resolves_broadly(),
        _ => false,
    }
}

/// The address (or, for a partial name, the start of the network) a reverse-lookup name
/// stands for: `5.0.0.10.in-addr.arpa` is 10.0.0.5, `10.in-addr.arpa` 10.0.0.0, and nibble
/// names under `ip6.arpa` likewise. `None` for other names and malformed ones.
fn reverse_address(name: &DomainName) -> Option<IpAddr> {
    let n = name.as_str();
    if let Some(rest) = n.strip_suffix("in-addr.arpa") {
        let labels: Vec<&str> = rest.trim_end_matches('.').split('.').filter(|l| !l.is_empty()).collect();
        if labels.len() > 4 {
            return None;
        }
        let mut octets = [0u8; 4];
        for (i, l) in labels.iter().rev().enumerate() {
            octets[i] = l.parse().ok()?;
        }
        return Some(IpAddr::from(octets));
    }
    if let Some(rest) = n.strip_suffix("ip6.arpa") {
        let labels: Vec<&str> = rest.trim_end_matches('.').split('.').filter(|l| !l.is_empty()).collect();
        if labels.len() > 32 {
            return None;
        }
        let mut v = 0u128;
        for (i, l) in labels.iter().rev().enumerate() {
            let d = u128::from_str_radix(l, 16).ok().filter(|_| l.len() == 1)?;
            v |= d << (124 - 4 * i);
        }
        return Some(IpAddr::from(v.to_be_bytes()));
    }
    None
}

impl GuestQuery {
    /// The query to send upstream (a fresh id, recursion desired).
    pub fn upstream(&self, id: u16) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
        m.add_query(self.query.clone());
        m.to_vec().unwrap_or_default()
    }

    /// SERVFAIL for the guest when upstream could not answer.
    pub fn servfail(&self) -> Vec<u8> {
        error_reply(self.id, Some(&self.query), self.recursion_desired, ResponseCode::ServFail)
    }
}

/// What [`answer`] did, for the audit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub kept: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    pub code: ResponseCode,
}

/// Builds the guest's answer from upstream's response: addresses the policy would deny are
/// removed, kept ones are pinned to the query's name, NXDOMAIN if none is left.
pub fn answer(
    q: &GuestQuery,
    upstream: &[u8],
    upstream_id: u16,
    policy: &Policy,
    classifier: &Classifier,
    pins: &mut Pins,
    now_ms: u64,
) -> (Vec<u8>, Filtered) {
    let fail = |code| {
        (error_reply(q.id, Some(&q.query), q.recursion_desired, code), Filtered { kept: vec![], removed: vec![], code })
    };
    if upstream.len() > MAX_MESSAGE {
        return fail(ResponseCode::ServFail);
    }
    let Ok(mut up) = Message::from_vec(upstream) else { return fail(ResponseCode::ServFail) };
    let same_question = up.queries().len() == 1 && up.queries()[0] == q.query;
    if up.id() != upstream_id || up.message_type() != MessageType::Response || !same_question {
        return fail(ResponseCode::ServFail);
    }
    let code = up.response_code();
    if code != ResponseCode::NoError {
        return fail(if code == ResponseCode::NXDomain { code } else { ResponseCode::ServFail });
    }
    let names = [q.name.clone()];
    let (mut kept, mut removed, mut records) = (vec![], vec![], vec![]);
    for r in up.take_answers().into_iter().take(MAX_ANSWERS) {
        let ttl = r.ttl().clamp(MIN_TTL, MAX_TTL);
        let addr = match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            RData::CNAME(_) => None,
            RData::SVCB(_) | RData::HTTPS(_) => continue,
            // Other records only as the answer to a question for their type that the policy
            // lets the guest ask.
            _ if r.record_type() == q.qtype && allowed_type(policy, q.qtype) => None,
            _ => continue,
        };
        if let Some(ip) = addr {
            if !policy.address_allowed(classifier, ip, &names) {
                removed.push(ip);
                continue;
            }
            pins.insert(&q.name, ip, ttl, now_ms);
            kept.push(ip);
        }
        let mut r = r;
        r.set_ttl(ttl);
        records.push(r);
    }
    let code = if kept.is_empty() && !removed.is_empty() { ResponseCode::NXDomain } else { ResponseCode::NoError };
    let mut m = Message::new();
    m.set_id(q.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired)
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_query(q.query.clone());
    if code == ResponseCode::NoError {
        m.insert_answers(records);
    }
    (m.to_vec().unwrap_or_default(), Filtered { kept, removed, code })
}

/// A sandbox's pin set: which names it resolved (through the gateway) to which addresses,
/// until when.
#[derive(Debug, Default)]
pub struct Pins {
    by_addr: HashMap<IpAddr, Vec<(DomainName, u64)>>,
    count: usize,
}

impl Pins {
    /// Pins `name` to `ip` for `ttl` seconds from `now_ms` (a re-pin extends it).
    pub fn insert(&mut self, name: &DomainName, ip: IpAddr, ttl: u32, now_ms: u64) {
        let until = now_ms.saturating_add(u64::from(ttl) * 1000);
        if let Some(e) = self.by_addr.get_mut(&ip).and_then(|v| v.iter_mut().find(|(n, _)| n == name)) {
            e.1 = e.1.max(until);
            return;
        }
        if self.count >= MAX_PINS {
            self.expire(now_ms);
        }
        if self.count >= MAX_PINS {
            self.evict_soonest();
        }
        let names = self.by_addr.entry(ip).or_default();
        if names.len() >= MAX_NAMES_PER_ADDR {
            // The soonest to expire of this address's names makes room.
            if let Some(i) = names.iter().enumerate().min_by_key(|(_, e)| e.1).map(|(i, _)| i) {
                names.swap_remove(i);
                self.count -= 1;
            }
        }
        names.push((name.clone(), until));
        self.count += 1;
    }

    /// The names pinned to `ip` now.
    pub fn names_for(&self, ip: IpAddr, now_ms: u64) -> Vec<DomainName> {
        self.by_addr
            .get(&ip)
            .map_or_else(Vec::new, |v| v.iter().filter(|(_, until)| *until > now_ms).map(|(n, _)| n.clone()).collect())
    }

    /// Whether `name` is pinned to `ip` now.
    pub fn is_pinned(&self, name: &DomainName, ip: IpAddr, now_ms: u64) -> bool {
        self.by_addr.get(&ip).is_some_and(|v| v.iter().any(|(n, until)| n == name && *until > now_ms))
    }

    /// The addresses `name` is pinned to now (what the dialer may use for it).
    pub fn addrs_for(&self, name: &DomainName, now_ms: u64) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .by_addr
            .iter()
            .filter(|(_, v)| v.iter().any(|(n, until)| n == name && *until > now_ms))
            .map(|(ip, _)| *ip)
            .collect();
        out.sort();
        out
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Drops every pin that has expired.
    pub fn expire(&mut self, now_ms: u64) {
        let mut count = 0;
        self.by_addr.retain(|_, v| {
            v.retain(|(_, until)| *until > now_ms);
            count += v.len();
            !v.is_empty()
        });
        self.count = count;
    }

    fn evict_soonest(&mut self) {
        let soonest = self
            .by_addr
            .iter()
            .flat_map(|(ip, v)| v.iter().enumerate().map(move |(i, e)| (e.1, *ip, i)))
            .min_by_key(|e| e.0);
        if let Some((_, ip, i)) = soonest {
            if let Some(v) = self.by_addr.get_mut(&ip) {
                v.swap_remove(i);
                if v.is_empty() {
                    self.by_addr.remove(&ip);
                }
                self.count -= 1;
            }
        }
    }
}

/// Test helper and upstream stand-in: a response to `query` with these records.
pub fn response_for(query: &[u8], code: ResponseCode, records: Vec<Record>) -> Vec<u8> {
    let q = Message::from_vec(query).expect("a query");
    let mut m = Message::new();
    m.set_id(q.id()).set_message_type(MessageType::Response).set_op_code(OpCode::Query).set_response_code(code);
    for query in q.queries() {
        m.add_query(query.clone());
    }
    m.insert_answers(records);
    m.to_vec().expect("encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SVCB};
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234).set_message_type(MessageType::Query).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn a(name: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, RData::A(A::from_str(ip).unwrap()))
    }

    fn aaaa(name: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, RData::AAAA(AAAA::from_str(ip).unwrap()))
    }

    fn resolve(policy: &Policy, name: &str, t: RecordType) -> GuestQuery {
        match on_query(policy, &query(name, t)) {
            Step::Resolve(q) => q,
            other => panic!("{other:?}"),
        }
    }

    /// Runs a query through on_query, a fake upstream with `records`, and answer().
    fn roundtrip(policy: &Policy, name: &str, records: Vec<Record>, pins: &mut Pins) -> (Message, Filtered) {
        let q = resolve(policy, name, RecordType::A);
        let up = q.upstream(77);
        let reply = response_for(&up, ResponseCode::NoError, records);
        let (bytes, f) = answer(&q, &reply, 77, policy, &Classifier::default(), pins, 1_000);
        (Message::from_vec(&bytes).unwrap(), f)
    }

    #[test]
    fn private_and_rebinding_answers_are_removed_and_an_empty_answer_is_nxdomain() {
        let p = Policy::default();
        let mut pins = Pins::default();
        let (m, f) = roundtrip(
            &p,
            "mixed.example.",
            vec![a("mixed.example.", "93.184.216.34", 60), a("mixed.example.", "10.0.0.5", 60)],
            &mut pins,
        );
        assert_eq!(m.id(), 0x1234, "the guest's id");
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(m.answers().len(), 1);
        assert_eq!(f.removed, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        let n = DomainName::parse("mixed.example").unwrap();
        assert!(pins.is_pinned(&n, "93.184.216.34".parse().unwrap(), 2_000));
        assert!(!pins.is_pinned(&n, "10.0.0.5".parse().unwrap(), 2_000));
        let (m, f) = roundtrip(&p, "rebind.example.", vec![a("rebind.example.", "127.0.0.1", 0)], &mut pins);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "not REFUSED");
        assert!(m.answers().is_empty() && f.kept.is_empty());
        let (m, _) =
            roundtrip(&p, "meta.example.", vec![aaaa("meta.example.", "::ffff:169.254.169.254", 60)], &mut pins);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "an embedded metadata address");
    }

    #[test]
    fn a_denied_name_is_nxdomain_without_a_lookup() {
        let p = Policy::parse("deny *.evil.example\nallow public\n").unwrap();
        match on_query(&p, &query("x.EVIL.example.", RecordType::A)) {
            Step::Answer { bytes, why } => {
                let m = Message::from_vec(&bytes).unwrap();
                assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::NXDomain));
                assert!(why.contains("rule 1"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(on_query(&p, &query("evil.example.", RecordType::A)), Step::Resolve(_)), "not the apex");
    }

    #[test]
    fn malformed_queries_are_refused_not_forwarded() {
        let p = Policy::default();
        for (bytes, what) in [
            (vec![0u8; 3], "short"),
            (vec![0u8; MAX_MESSAGE + 1], "too big"),
            (response_for(&query("a.example.", RecordType::A), ResponseCode::NoError, vec![]), "a response"),
        ] {
            assert!(matches!(on_query(&p, &bytes), Step::Answer { .. }), "{what} was forwarded");
        }
        let mut two = Message::new();
        two.set_id(1).set_message_type(MessageType::Query);
        two.add_query(Query::query(Name::from_ascii("a.example.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("b.example.").unwrap(), RecordType::A));
        assert!(matches!(on_query(&p, &two.to_vec().unwrap()), Step::Answer { .. }), "two questions");
    }

    #[test]
    fn upstream_replies_must_match_and_cnames_pass_svcb_does_not() {
        let p = Policy::default();
        let mut pins = Pins::default();
        let q = resolve(&p, "www.example.", RecordType::A);
        let up = q.upstream(9);
        let good = response_for(
            &up,
            ResponseCode::NoError,
            vec![
                Record::from_rdata(
                    Name::from_ascii("www.example.").unwrap(),
                    30,
                    RData::CNAME(CNAME(Name::from_ascii("cdn.example.").unwrap())),
                ),
                a("cdn.example.", "93.184.216.34", 100_000),
                Record::from_rdata(
                    Name::from_ascii("www.example.").unwrap(),
                    30,
                    RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), vec![]))),
                ),
            ],
        );
        let c = Classifier::default();
        let (bytes, f) = answer(&q, &good, 9, &p, &c, &mut pins, 0);
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.answers().len(), 2, "the CNAME and the A record; the HTTPS record is dropped");
        assert!(m.answers().iter().all(|r| r.record_type() != RecordType::HTTPS));
        assert_eq!(m.answers()[1].ttl(), MAX_TTL, "clamped");
        assert_eq!(f.kept.len(), 1);
        // The pin is for the name the guest asked, and lives as long as the TTL it was told.
        let www = DomainName::parse("www.example").unwrap();
        assert!(pins.is_pinned(&www, f.kept[0], u64::from(MAX_TTL) * 1000 - 1));
        assert!(!pins.is_pinned(&www, f.kept[0], u64::from(MAX_TTL) * 1000));
        // A reply with another id or question is not taken.
        let (bytes, _) = answer(&q, &good, 10, &p, &c, &mut pins, 0);
        assert_eq!(Message::from_vec(&bytes).unwrap().response_code(), ResponseCode::ServFail);
        let other =
            response_for(&resolve(&p, "other.example.", RecordType::A).upstream(9), ResponseCode::NoError, vec![]);
        let (bytes, _) = answer(&q, &other, 9, &p, &c, &mut pins, 0);
        assert_eq!(Message::from_vec(&bytes).unwrap().response_code(), ResponseCode::ServFail);
        let nx = response_for(&up, ResponseCode::NXDomain, vec![]);
        assert_eq!(
            Message::from_vec(&answer(&q, &nx, 9, &p, &c, &mut pins, 0).0).unwrap().response_code(),
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn pins_expire_and_stay_within_their_caps() {
        let mut pins = Pins::default();
        let n = |i: usize| DomainName::parse(&format!("n{i}.example")).unwrap();
        let ip = |i: usize| IpAddr::from([8, 8, (i >> 8) as u8, i as u8]);
        for i in 0..MAX_PINS + 100 {
            pins.insert(&n(i), ip(i), 60 + i as u32, 0);
        }
        assert_eq!(pins.len(), MAX_PINS, "capped");
        assert!(pins.names_for(ip(0), 1).is_empty(), "the soonest to expire went first");
        assert_eq!(pins.names_for(ip(MAX_PINS + 99), 1), vec![n(MAX_PINS + 99)]);
        let shared: IpAddr = "9.9.9.9".parse().unwrap();
        for i in 0..MAX_NAMES_PER_ADDR + 5 {
            pins.insert(&n(i), shared, 600, 0);
        }
        assert_eq!(pins.names_for(shared, 1).len(), MAX_NAMES_PER_ADDR);
        assert_eq!(pins.addrs_for(&n(MAX_NAMES_PER_ADDR + 4), 1), vec![shared]);
        pins.expire(u64::MAX);
        assert!(pins.is_empty());
    }
}
