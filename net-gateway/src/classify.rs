//! The one address classifier: every address the gateway decides on — a new flow's
//! destination, each address in a DNS answer, the address actually dialed — goes through
//! [`Classifier::classify`] and gets exactly one [`Group`].
//!
//! Invariants:
//! - It sees parsed addresses only ([`IpAddr`]), so the spellings a guest may use (decimal,
//!   octal, hex, short forms, `0`) cannot matter: they are the parser's business, and every
//!   spelling of one address is one value here.
//! - It is total and table-driven: [`V4`] and [`V6`] are searched in order, first match
//!   wins; an IPv4 address no row names is `public`; an IPv6 address no row names is
//!   `public` only inside 2000::/3 (global unicast), `reserved` outside it.
//! - IPv4 carried in IPv6 is classified by the IPv4 address it carries, in every form:
//!   mapped `::ffff:0:0/96`, compatible `::/96`, translated `::ffff:0:0:0/96`, NAT64
//!   `64:ff9b::/96` and `64:ff9b:1::/48` (each RFC 6052 layout that fits a /48: /48, /56,
//!   /64, /96), 6to4 `2002::/16`, and Teredo `2001::/32` (server and client). Where a form
//!   carries several candidates, the strictest group among them wins ([`Group::strictest`]).
//! - `metadata` and `loopback` are decided first; then the host's own addresses (every
//!   address of its interfaces, given at construction and replaced whenever they change,
//!   see the actor) are `host`, whatever range they are in; then the rest of the table; and
//!   an address the table calls `public` that lies in a network one of the host's
//!   interfaces is on (its LAN, IPv4 or IPv6) is `host-lan`.
//! - As a destination, `0.0.0.0` and `::` are `loopback` (Linux delivers them there).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What an address is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// Globally routable unicast: the only group allowed by default.
    Public,
    /// RFC 1918, CGNAT 100.64/10, ULA fc00::/7, deprecated site-local fec0::/10.
    Private,
    /// 127/8, ::1.
    Loopback,
    /// 169.254/16, fe80::/10 (metadata addresses inside them are `metadata`).
    LinkLocal,
    /// Cloud instance-metadata and platform endpoints (169.254.169.254, fd00:ec2::254, …).
    Metadata,
    /// An address of one of the host's own interfaces.
    Host,
    /// A neighbour of the host: a public address inside a network one of the host's
    /// interfaces is on (a public IPv4 LAN, the host's IPv6 /64).
    HostLan,
    /// 224/4, ff00::/8.
    Multicast,
    /// The rest of the IANA special-purpose registries: 0/8, 192.0.0/24, the documentation
    /// ranges, 198.18/15, 240/4 and broadcast, ::, 100::/64, 2001::/23, 2001:db8::/32, …
    Reserved,
}

impl Group {
    pub const ALL: [Group; 9] = [
        Group::Public,
        Group::Private,
        Group::Loopback,
        Group::LinkLocal,
        Group::Metadata,
        Group::Host,
        Group::HostLan,
        Group::Multicast,
        Group::Reserved,
    ];

    /// The name rules and audit records use.
    pub fn name(self) -> &'static str {
        match self {
            Group::Public => "public",
            Group::Private => "private",
            Group::Loopback => "loopback",
            Group::LinkLocal => "link-local",
            Group::Metadata => "metadata",
            Group::Host => "host",
            Group::HostLan => "host-lan",
            Group::Multicast => "multicast",
            Group::Reserved => "reserved",
        }
    }

    pub fn parse(s: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == s)
    }

    /// How strict a group is when one address carries several candidates: anything beats
    /// `public`; among the rest, the more dangerous to reach wins.
    fn rank(self) -> u8 {
        match self {
            Group::Public => 0,
            Group::Reserved => 1,
            Group::Multicast => 2,
            Group::Private => 3,
            Group::HostLan => 3,
            Group::LinkLocal => 4,
            Group::Loopback => 5,
            Group::Host => 6,
            Group::Metadata => 7,
        }
    }

    /// The stricter of two groups.
    pub fn strictest(self, other: Group) -> Group {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// IPv4 rows: (network, prefix length, group); first match wins.
pub const V4: &[(u32, u8, Group)] = &[
    // Metadata first: several live inside link-local.
    (v4(169, 254, 169, 254), 32, Group::Metadata), // AWS, GCP, Azure, OpenStack, DigitalOcean, …
    (v4(169, 254, 169, 253), 32, Group::Metadata), // AWS VPC DNS resolver
    (v4(169, 254, 169, 123), 32, Group::Metadata), // AWS time sync
    (v4(169, 254, 170, 2), 32, Group::Metadata),   // AWS ECS task metadata
    (v4(169, 254, 170, 23), 32, Group::Metadata),  // AWS EKS pod identity agent
    (v4(169, 254, 0, 23), 32, Group::Metadata),    // Tencent Cloud
    (v4(100, 100, 100, 200), 32, Group::Metadata), // Alibaba Cloud
    (v4(192, 0, 0, 192), 32, Group::Metadata),     // Oracle Cloud (OCI) legacy
    (v4(168, 63, 129, 16), 32, Group::Metadata),   // Azure WireServer (a public-looking address)
    (v4(127, 0, 0, 0), 8, Group::Loopback),
    (v4(169, 254, 0, 0), 16, Group::LinkLocal),
    (v4(10, 0, 0, 0), 8, Group::Private),
    (v4(172, 16, 0, 0), 12, Group::Private),
    (v4(192, 168, 0, 0), 16, Group::Private),
    (v4(100, 64, 0, 0), 10, Group::Private), // CGNAT, RFC 6598
    (v4(224, 0, 0, 0), 4, Group::Multicast),
    (v4(0, 0, 0, 0), 8, Group::Reserved), // "this network" (0.0.0.0 itself: see classify)
    (v4(192, 0, 0, 0), 24, Group::Reserved), // IETF protocol assignments
    (v4(192, 0, 2, 0), 24, Group::Reserved), // TEST-NET-1
    (v4(192, 88, 99, 0), 24, Group::Reserved), // 6to4 relay anycast (deprecated)
    (v4(198, 18, 0, 0), 15, Group::Reserved), // benchmarking
    (v4(198, 51, 100, 0), 24, Group::Reserved), // TEST-NET-2
    (v4(203, 0, 113, 0), 24, Group::Reserved), // TEST-NET-3
    (v4(240, 0, 0, 0), 4, Group::Reserved), // class E and 255.255.255.255
];

const fn v6(s: [u16; 8]) -> u128 {
    let mut out = 0u128;
    let mut i = 0;
    while i < 8 {
        out = (out << 16) | s[i] as u128;
        i += 1;
    }
    out
}

/// IPv6 rows, searched after the embedded-IPv4 forms are taken out; first match wins.
pub const V6: &[(u128, u8, Group)] = &[
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]), 128, Group::Metadata), // AWS IMDS over IPv6
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23]), 128, Group::Metadata),  // AWS DNS over IPv6
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x123]), 128, Group::Metadata), // AWS time sync over IPv6
    (v6([0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254]), 128, Group::Metadata),  // GCP metadata over IPv6
    (1, 128, Group::Loopback),
    (0, 128, Group::Reserved), // unspecified (as a destination: see classify)
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, Group::LinkLocal),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, Group::Private),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, Group::Private), // site-local (deprecated)
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Group::Multicast),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, Group::Reserved), // discard-only
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, Group::Reserved), // documentation
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, Group::Reserved), // documentation (RFC 9637)
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, Group::Reserved), // IETF protocol assignments
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, Group::Reserved), // SRv6 SIDs
    (v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3, Group::Public),   // global unicast
];

fn in_v4(ip: u32, net: u32, prefix: u8) -> bool {
    prefix == 0 || (ip ^ net) >> (32 - u32::from(prefix)) == 0
}

fn in_v6(ip: u128, net: u128, prefix: u8) -> bool {
    prefix == 0 || (ip ^ net) >> (128 - u32::from(prefix)) == 0
}

fn table_v4(ip: Ipv4Addr) -> Group {
    let ip = u32::from(ip);
    V4.iter().find(|(net, p, _)| in_v4(ip, *net, *p)).map_or(Group::Public, |r| r.2)
}

fn table_v6(ip: Ipv6Addr) -> Group {
    let ip = u128::from(ip);
    // Outside 2000::/3 and every row: not allocated for unicast.
    V6.iter().find(|(net, p, _)| in_v6(ip, *net, *p)).map_or(Group::Reserved, |r| r.2)
}

/// The IPv4 addresses an IPv6 address carries, in every embedding form it is in (none for
/// a plain IPv6 address). `::` and `::1` carry none.
pub fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let x = u128::from(ip);
    let low32 = Ipv4Addr::from(x as u32);
    let mut out = Vec::new();
    if x >> 32 == 0xffff {
        out.push(low32); // mapped ::ffff:a.b.c.d
    }
    if x >> 32 == 0 && x > 1 {
        out.push(low32); // compatible ::a.b.c.d
    }
    if x >> 32 == 0xffff_0000 {
        out.push(low32); // translated ::ffff:0:a.b.c.d
    }
    if in_v6(x, v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96) {
        out.push(low32); // NAT64 well-known prefix
    }
    if in_v6(x, v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48) {
        // RFC 6052 layouts within a /48: the IPv4 address around the u-octet (bits 64..72).
        let b = ip.octets();
        out.push(Ipv4Addr::new(b[6], b[7], b[9], b[10])); // /48
        out.push(Ipv4Addr::new(b[7], b[9], b[10], b[11])); // /56
        out.push(Ipv4Addr::new(b[9], b[10], b[11], b[12])); // /64
        out.push(low32); // /96
    }
    if x >> 112 == 0x2002 {
        out.push(Ipv4Addr::from((x >> 80) as u32)); // 6to4: bits 16..48
    }
    if x >> 96 == 0x2001_0000 {
        out.push(Ipv4Addr::from((x >> 64) as u32)); // Teredo server
        out.push(Ipv4Addr::from(!(x as u32))); // Teredo client, obfuscated
    }
    out
}

/// The IPv4 address an ISATAP interface ID under a global (2000::/3) prefix names.
fn isatap_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    (s[0] >> 13 == 1 && s[4] & 0xfdff == 0 && s[5] == 0x5efe)
        .then(|| Ipv4Addr::from((u128::from(ip) as u32).to_be_bytes()))
}

/// The classifier: the tables plus the host's own addresses and networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classifier {
    host: HashSet<IpAddr>,
    lans: Vec<ipnet::IpNet>,
    /// What the operator added ([`Extras`]).
    extras: Extras,
}

/// What an operator tells the classifier beyond its tables (see [`Extras::from_env`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// Networks that are the host too (a 1:1-NAT public address on no interface).
    pub host: Vec<ipnet::IpNet>,
    /// Networks that are metadata endpoints (public-address ones the table lacks).
    pub metadata: Vec<ipnet::IpNet>,
    /// NAT64 network-specific /96 prefixes: an address in one is classified by the IPv4
    /// address in its last 32 bits (the strictest of that and the table).
    pub nat64: Vec<ipnet::Ipv6Net>,
}

impl Extras {
    /// Reads `MSB_HOST_ADDRS`, `MSB_METADATA_ADDRS` and `MSB_NAT64_PREFIXES` ([`Extras::parse`]).
    pub fn from_env() -> Result<Extras, String> {
        let v = |k: &str| std::env::var(k).unwrap_or_default();
        Extras::parse(&v("MSB_HOST_ADDRS"), &v("MSB_METADATA_ADDRS"), &v("MSB_NAT64_PREFIXES"))
    }

    /// Comma lists of addresses or CIDRs (NAT64 prefixes must be /96); a malformed entry is
    /// an error naming its variable and itself.
    pub fn parse(host: &str, metadata: &str, nat64: &str) -> Result<Extras, String> {
        let list = |k: &str, v: &str| -> Result<Vec<ipnet::IpNet>, String> {
            v.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| {
                    x.parse::<ipnet::IpNet>()
                        .or_else(|_| x.parse::<IpAddr>().map(ipnet::IpNet::from))
                        .map(|n| n.trunc())
                        .map_err(|_| format!("{k}: {x:?} is not an address or CIDR"))
                })
                .collect()
        };
        let nat64 = list("MSB_NAT64_PREFIXES", nat64)?
            .into_iter()
            .map(|n| match n {
                ipnet::IpNet::V6(n) if n.prefix_len() == 96 => Ok(n),
                n => Err(format!("MSB_NAT64_PREFIXES: {n} is not an IPv6 /96")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Extras { host: list("MSB_HOST_ADDRS", host)?, metadata: list("MSB_METADATA_ADDRS", metadata)?, nat64 })
    }
}

impl Classifier {
    /// `host`: every address of the host's own interfaces.
    pub fn new(host: impl IntoIterator<Item = IpAddr>) -> Self {
        Classifier { host: host.into_iter().map(canonical).collect(), lans: Vec::new(), extras: Extras::default() }
    }

    /// `host` as for [`Classifier::new`], and `lans`: the networks the host's interfaces
    /// are on (their public neighbours are `host-lan`).
    pub fn with_lans(host: impl IntoIterator<Item = IpAddr>, lans: impl IntoIterator<Item = ipnet::IpNet>) -> Self {
        Classifier { lans: lans.into_iter().map(|n| n.trunc()).collect(), ..Classifier::new(host) }
    }

    /// This classifier with the operator's `extras`.
    pub fn with_extras(self, extras: Extras) -> Self {
        Classifier { extras, ..self }
    }

    pub fn classify(&self, ip: IpAddr) -> Group {
        // connect() or sendto() to 0.0.0.0 reaches 127.0.0.1 on Linux, and :: reaches ::1:
        // as destinations they are what they reach (an embedded candidate of 0.0.0.0 in an
        // IPv6 form stays reserved, as the table says).
        let unspecified = match ip {
            IpAddr::V4(a) => a.is_unspecified(),
            IpAddr::V6(a) => a.is_unspecified() || a.to_ipv4_mapped().is_some_and(|v| v.is_unspecified()),
        };
        if unspecified {
            return Group::Loopback;
        }
        let canon = canonical(ip);
        if self.extras.metadata.iter().any(|n| n.contains(&canon)) {
            return Group::Metadata;
        }
        if self.extras.host.iter().any(|n| n.contains(&canon)) {
            return Group::Host;
        }
        if let IpAddr::V6(a) = ip {
            if self.extras.nat64.iter().any(|n| n.contains(&a)) {
                let v4 = Ipv4Addr::from((u128::from(a) as u32).to_be_bytes());
                return self.classify_v4(v4).strictest(table_v6(a));
            }
        }
        match ip {
            IpAddr::V4(a) => self.classify_v4(a),
            IpAddr::V6(a) => {
                let carried = embedded_v4(a);
                if !carried.is_empty() {
                    return carried.into_iter().map(|v| self.classify_v4(v)).fold(Group::Public, Group::strictest);
                }
                let g = match table_v6(a) {
                    g @ (Group::Metadata | Group::Loopback) => g,
                    _ if self.host.contains(&IpAddr::V6(a)) => Group::Host,
                    Group::Public if self.on_lan(IpAddr::V6(a)) => Group::HostLan,
                    g => g,
                };
                // An ISATAP interface ID (`…:0:5efe:a.b.c.d`, `…:200:5efe:a.b.c.d`) under a
                // global prefix reaches that IPv4 address on a host with an ISATAP tunnel:
                // the stricter of the two decides.
                match isatap_v4(a) {
                    Some(v4) => g.strictest(self.classify_v4(v4)),
                    None => g,
                }
            }
        }
    }

    fn classify_v4(&self, a: Ipv4Addr) -> Group {
        let ip = IpAddr::V4(a);
        if self.extras.metadata.iter().any(|n| n.contains(&ip)) {
            return Group::Metadata;
        }
        if self.extras.host.iter().any(|n| n.contains(&ip)) {
            return Group::Host;
        }
        match table_v4(a) {
            g @ (Group::Metadata | Group::Loopback) => g,
            _ if self.host.contains(&IpAddr::V4(a)) => Group::Host,
            Group::Public if self.on_lan(IpAddr::V4(a)) => Group::HostLan,
            g => g,
        }
    }

    fn on_lan(&self, ip: IpAddr) -> bool {
        self.lans.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4-mapped IPv6 host address is kept as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Group::*;

    fn c(s: &str) -> Group {
        Classifier::new(["203.0.113.7".parse().unwrap(), "2001:db8::7".parse().unwrap(), "8.8.4.4".parse().unwrap()])
            .classify(s.parse().unwrap())
    }

    #[test]
    fn ipv4_range_edges() {
        for (ip, g) in [
            ("0.0.0.0", Loopback),
            ("0.255.255.255", Reserved),
            ("1.0.0.0", Public),
            ("9.255.255.255", Public),
            ("10.0.0.0", Private),
            ("10.255.255.255", Private),
            ("11.0.0.0", Public),
            ("100.63.255.255", Public),
            ("100.64.0.0", Private),
            ("100.127.255.255", Private),
            ("100.128.0.0", Public),
            ("100.100.100.200", Metadata),
            ("126.255.255.255", Public),
            ("127.0.0.0", Loopback),
            ("127.0.0.1", Loopback),
            ("127.255.255.255", Loopback),
            ("128.0.0.0", Public),
            ("168.63.129.16", Metadata),
            ("169.253.255.255", Public),
            ("169.254.0.0", LinkLocal),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("169.254.255.255", LinkLocal),
            ("169.255.0.0", Public),
            ("172.15.255.255", Public),
            ("172.16.0.0", Private),
            ("172.31.255.255", Private),
            ("172.32.0.0", Public),
            ("192.0.0.0", Reserved),
            ("192.0.0.192", Metadata),
            ("192.0.0.255", Reserved),
            ("192.0.1.0", Public),
            ("192.0.2.0", Reserved),
            ("192.0.2.255", Reserved),
            ("192.0.3.0", Public),
            ("192.88.99.1", Reserved),
            ("192.167.255.255", Public),
            ("192.168.0.0", Private),
            ("192.168.255.255", Private),
            ("192.169.0.0", Public),
            ("198.17.255.255", Public),
            ("198.18.0.0", Reserved),
            ("198.19.255.255", Reserved),
            ("198.20.0.0", Public),
            ("198.51.100.0", Reserved),
            ("198.51.100.255", Reserved),
            ("203.0.112.255", Public),
            ("203.0.113.0", Reserved),
            ("203.0.114.0", Public),
            ("223.255.255.255", Public),
            ("224.0.0.0", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.0", Reserved),
            ("255.255.255.255", Reserved),
            ("8.8.8.8", Public),
        ] {
            assert_eq!(c(ip), g, "{ip}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_host_whatever_their_range() {
        assert_eq!(c("8.8.4.4"), Host, "a public address of the host's");
        assert_eq!(c("203.0.113.7"), Host);
        assert_eq!(c("203.0.113.8"), Reserved);
        assert_eq!(c("2001:db8::7"), Host);
        assert_eq!(c("::ffff:8.8.4.4"), Host, "mapped");
        assert_eq!(c("64:ff9b::8.8.4.4"), Host, "NAT64");
        let mapped = Classifier::new(["::ffff:8.8.4.4".parse().unwrap()]);
        assert_eq!(mapped.classify("8.8.4.4".parse().unwrap()), Host, "a mapped host address is its IPv4");
        assert_eq!(c("127.0.0.1"), Loopback, "loopback stays loopback");
    }

    #[test]
    fn ipv6_ranges() {
        for (ip, g) in [
            ("::", Loopback),
            ("::1", Loopback),
            ("::2", Reserved), // compatible 0.0.0.2
            ("fe80::", LinkLocal),
            ("febf:ffff::1", LinkLocal),
            ("fec0::1", Private),
            ("fc00::", Private),
            ("fdff:ffff::1", Private),
            ("fd00:ec2::254", Metadata),
            ("fd20:ce::254", Metadata),
            ("fd00:ec2::255", Private),
            ("ff02::1", Multicast),
            ("100::", Reserved),
            ("100::ffff:ffff:ffff:ffff", Reserved),
            ("100:0:0:1::", Reserved),
            ("2001:db8::1", Reserved),
            ("2001:10::1", Reserved),
            ("2001:1ff::1", Reserved),
            ("2001:200::1", Public),
            ("3fff::1", Reserved),
            ("2606:4700::1111", Public),
            ("2a00:1450::1", Public),
            ("1fff::1", Reserved),
            ("4000::1", Reserved),
            ("5f00::1", Reserved),
        ] {
            assert_eq!(c(ip), g, "{ip}");
        }
    }

    #[test]
    fn every_ipv4_in_ipv6_form_is_classified_by_what_it_carries() {
        for (ip, g) in [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Loopback),
            ("::10.1.2.3", Private),
            ("::8.8.8.8", Public),
            ("::ffff:0:127.0.0.1", Loopback),
            ("::ffff:0:169.254.169.254", Metadata),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::169.254.169.254", Metadata),
            ("64:ff9b::8.8.8.8", Public),
            ("64:ff9b::10.0.0.1", Private),
            // Local-use NAT64 in its /96 layout and its /48 layout (10.0.0.1 around the u-octet).
            ("64:ff9b:1::10.0.0.1", Private),
            ("64:ff9b:1:a00:0:1::", Private),
            ("64:ff9b:1::8.8.8.8", Reserved), // its /48 decoding is 0.0.x.x: not public
            // 6to4: 2002:AABB:CCDD::
            ("2002:7f00:1::", Loopback),
            ("2002:a9fe:a9fe::1", Metadata),
            ("2002:0808:0808::1", Public),
            ("2002:c0a8:0101::", Private),
            // Teredo: server in bits 32..64, client XORed in the last 32 bits.
            ("2001:0:7f00:1::", Loopback),             // server 127.0.0.1
            ("2001:0:0808:0808::f7f7:f7f7", Public),   // server 8.8.8.8, client 8.8.8.8
            ("2001:0:0808:0808::f5ff:fffe", Private),  // client 10.0.0.1
            ("2001:0:0808:0808::5601:5601", Metadata), // client 169.254.169.254 xor
        ] {
            assert_eq!(c(ip), g, "{ip}");
        }
    }

    #[test]
    fn odd_spellings_are_one_parsed_value() {
        // Whatever the guest typed, the gateway holds the address the resolver or packet
        // carried; these are the values such spellings denote.
        for (spelled, same) in [
            (u32::from(Ipv4Addr::new(127, 0, 0, 1)), "127.0.0.1"), // 2130706433, 0x7f000001, 0177.0.0.1, 127.1
            (0, "0.0.0.0"),                                        // "0"
        ] {
            assert_eq!(Classifier::default().classify(IpAddr::V4(Ipv4Addr::from(spelled))), c(same));
        }
        assert_eq!(c("0:0:0:0:0:ffff:7f00:1"), Loopback, "the long form of ::ffff:127.0.0.1");
    }

    #[test]
    fn group_names_round_trip() {
        for g in Group::ALL {
            assert_eq!(Group::parse(g.name()), Some(g));
        }
        assert_eq!(Group::parse("Public"), None);
    }
}
