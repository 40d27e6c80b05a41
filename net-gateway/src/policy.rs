//! The network policy: an ordered rule list, first match wins, then a default action.
//!
//! A rule is written `[in/|out/][tcp/|udp/]TARGET[:PORTS]` after `allow` or `deny`:
//! - direction: `out/` (egress, the default; `in/` is refused: published ports are not
//!   filtered by peer, only bound to an address);
//! - protocol: `tcp/` or `udp/` (default: both, except that a domain target without one
//!   covers TCP only: UDP such as QUIC names its server in no way the gateway reads);
//! - TARGET: `any`; a group (`public`, `private`, `loopback`, `link-local`, `metadata`,
//!   `host`, `multicast`, `reserved`, see [`Group`]); an IPv4 address or CIDR; an IPv6
//!   address or CIDR in brackets (`[2001:db8::/32]`); an exact domain (`api.example.com`) or
//!   every name below one (`*.example.com`, which does not match `example.com` itself),
//!   optionally with `@GROUP[+GROUP]`: the non-public groups its names may resolve into
//!   (`api.corp@private`; without it a name opens only public addresses);
//! - PORTS: `443`, `8000-8100`, or a comma list of both (default: every port).
//!
//! Examples: `allow tcp/api.example.com:443`, `allow 203.0.113.0/24`, `deny metadata`,
//! `allow udp/[2001:db8::/32]:53`. A policy file holds one `allow RULE` or `deny RULE` per
//! line, optionally `default allow|deny`, `#` comments and blank lines.
//!
//! Invariants: a policy is at most [`MAX_RULES`] rules of at most [`MAX_RULE_LEN`] bytes;
//! every rule keeps its canonical text (its [`std::fmt::Display`], which parses back to the
//! same rule), which denials and the audit stream name. A domain target matches a flow only
//! through the names the gateway itself resolved to the flow's address for this sandbox
//! ([`Flow::names`]): what the guest claims never names a flow; and a domain target matches
//! only `public` addresses unless the rule names more groups (a name that resolves to a private
//! or loopback address needs `@private` or an address rule too). Address targets match the parsed address; groups match through the
//! one [`Classifier`].

use std::net::IpAddr;

use ipnet::IpNet;

use crate::classify::{Classifier, Group};

/// Most rules one policy may have.
pub const MAX_RULES: usize = 1024;
/// Longest rule (or policy-file line).
pub const MAX_RULE_LEN: usize = 512;
/// Longest domain name (RFC 1035, without the final dot).
pub const MAX_NAME_LEN: usize = 253;

/// Why a rule or policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network rule {rule:?}: {why}")]
    Rule { rule: String, why: String },
    #[error("policy line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("a policy has at most {MAX_RULES} rules")]
    TooMany,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the guest out.
    Egress,
    /// Into the guest, through a published port.
    Ingress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A domain name in canonical form: lowercase ASCII labels of letters, digits, `-` and `_`
/// (1 to 63 bytes, not starting or ending with `-`), at most [`MAX_NAME_LEN`] bytes, no
/// final dot. Internationalized names are written in their `xn--` form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(format!("a domain name is 1 to {MAX_NAME_LEN} characters"));
        }
        if !s.is_ascii() {
            return Err("write an internationalized domain name in its xn-- (punycode) form".into());
        }
        let s = s.to_ascii_lowercase();
        for label in s.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!("{label:?} is not a domain label (1-63 letters, digits, - or _)"));
            }
        }
        Ok(DomainName(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name is strictly below `parent` (`a.b.example.com` below `example.com`).
    pub fn is_below(&self, parent: &DomainName) -> bool {
        self.0.len() > parent.0.len() + 1
            && self.0.ends_with(parent.0.as_str())
            && self.0.as_bytes()[self.0.len() - parent.0.len() - 1] == b'.'
    }
}

impl std::fmt::Display for DomainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Any,
    Group(Group),
    Net(IpNet),
    Domain(DomainName),
    /// Every name strictly below this one.
    Below(DomainName),
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub lo: u16,
    pub hi: u16,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub direction: Direction,
    /// `None`: TCP and UDP.
    pub proto: Option<Proto>,
    pub target: Target,
    /// Empty: every port.
    pub ports: Vec<Ports>,
    /// For a domain target, the groups besides `public` its names may resolve into
    /// (`internal.corp@private`); empty for every other target.
    pub name_groups: Vec<Group>,
}

/// A flow (or a DNS answer's address) to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub direction: Direction,
    pub proto: Proto,
    /// The remote address: the destination of an egress flow, the source of an ingress one.
    pub addr: IpAddr,
    /// The remote port of an egress flow; the guest port of an ingress one.
    pub port: u16,
    /// The names this sandbox resolved, through the gateway, to `addr` (its pin set).
    pub names: &'a [DomainName],
}

/// The outcome, with what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The index of the deciding rule; `None` for the default.
    pub rule: Option<usize>,
    /// The address's group (for the audit record).
    pub group: Group,
}

impl Rule {
    /// Parses the part after `allow` / `deny`.
    pub fn parse(action: Action, text: &str) -> Result<Rule, PolicyError> {
        let bad = |why: &str| PolicyError::Rule { rule: text.chars().take(MAX_RULE_LEN).collect(), why: why.into() };
        if text.len() > MAX_RULE_LEN {
            return Err(bad(&format!("longer than {MAX_RULE_LEN} bytes")));
        }
        let mut rest = text.trim();
        let direction = Direction::Egress;
        if rest.starts_with("in/") {
            // Published ports are reached from the address they are bound to (127.0.0.1 by
            // default) and filtered by nothing else: a rule that looked like a filter would
            // promise what is not enforced.
            return Err(bad("in/ rules are not supported: a published port is reachable from wherever it is bound (-p 127.0.0.1:HOST:GUEST, the default, keeps it on this machine)"));
        } else if let Some(r) = rest.strip_prefix("out/") {
            rest = r;
        }
        let mut proto = None;
        if let Some(r) = rest.strip_prefix("tcp/") {
            (proto, rest) = (Some(Proto::Tcp), r);
        } else if let Some(r) = rest.strip_prefix("udp/") {
            (proto, rest) = (Some(Proto::Udp), r);
        }
        let (target, ports) = if let Some(r) = rest.strip_prefix('[') {
            let (inside, after) = r.split_once(']').ok_or_else(|| bad("an IPv6 target has no closing ]"))?;
            let net = parse_net(inside).filter(|n| matches!(n, IpNet::V6(_)));
            let net = net.ok_or_else(|| bad(&format!("{inside:?} is not an IPv6 address or CIDR")))?;
            let ports = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("expected :PORTS after ]"))?),
            };
            ((Target::Net(net), Vec::new()), ports)
        } else {
            let (t, p) = match rest.split_once(':') {
                Some((t, p)) => (t, Some(p)),
                None => (rest, None),
            };
            if p.is_some_and(|p| p.contains(':')) {
                return Err(bad("write an IPv6 target in brackets: [2001:db8::/32]:443"));
            }
            let (t, groups) = match t.split_once('@') {
                Some((t, g)) => (t, Some(g)),
                None => (t, None),
            };
            let target = parse_target(t).map_err(|w| bad(&w))?;
            if groups.is_some() && !matches!(target, Target::Domain(_) | Target::Below(_)) {
                return Err(bad("@GROUP follows a domain target only (api.internal@private)"));
            }
            let mut name_groups = Vec::new();
            for g in groups.map(|g| g.split('+').collect::<Vec<_>>()).unwrap_or_default() {
                let g = Group::parse(g).ok_or_else(|| bad(&format!("{g:?} is not a group")))?;
                if g != Group::Public && !name_groups.contains(&g) {
                    name_groups.push(g);
                }
            }
            name_groups.sort_by_key(|g| g.name());
            ((target, name_groups), p)
        };
        let (target, name_groups) = target;
        let ports = match ports {
            None => Vec::new(),
            Some(p) => parse_ports(p).map_err(|w| bad(&w))?,
        };
        Ok(Rule { action, direction, proto, target, ports, name_groups })
    }

    fn matches(&self, f: &Flow<'_>, group: Group) -> bool {
        self.covers(f.direction, f.proto, f.port) && self.target_matches(f.addr, f.names, group)
    }

    /// Whether the rule's direction, protocol and ports cover a flow. A domain rule without
    /// a protocol covers TCP only: a UDP flow (QUIC) names its server in no way the gateway
    /// reads, so UDP to a name needs `udp/` written out.
    fn covers(&self, direction: Direction, proto: Proto, port: u16) -> bool {
        if self.direction != direction || self.proto.is_some_and(|p| p != proto) {
            return false;
        }
        if self.proto.is_none() && self.is_domain() && proto == Proto::Udp {
            return false;
        }
        self.ports.is_empty() || self.ports.iter().any(|r| (r.lo..=r.hi).contains(&port))
    }

    fn target_matches(&self, addr: IpAddr, names: &[DomainName], group: Group) -> bool {
        match &self.target {
            Target::Any => true,
            Target::Group(g) => *g == group,
            // The address, and every IPv4 address an IPv6 one carries (mapped, NAT64, 6to4,
            // Teredo): the forms the classifier sees through are covered by the same rule.
            Target::Net(n) => {
                n.contains(&canonical(addr))
                    || n.contains(&addr)
                    || matches!(addr, IpAddr::V6(a) if crate::classify::embedded_v4(a).iter().any(|v| n.contains(&IpAddr::V4(*v))))
            }
            // A name opens only a public address unless its rule names the group: a rebinding
            // answer (a public name that resolves to 127.0.0.1) stays denied unless an address
            // rule allows that address or the rule says `@loopback`.
            Target::Domain(d) => self.name_may_resolve_to(group) && names.iter().any(|n| n == d),
            Target::Below(d) => self.name_may_resolve_to(group) && names.iter().any(|n| n.is_below(d)),
        }
    }

    fn name_may_resolve_to(&self, group: Group) -> bool {
        group == Group::Public || self.name_groups.contains(&group)
    }

    /// Why an allow rule may open more than its writer meant, if it may: a wildcard over a
    /// zone whose names point wherever their owner likes (names that embed an address, or
    /// shared hosting where anyone gets a name). Worth a warning, not a refusal.
    pub fn warning(&self) -> Option<String> {
        /// Zones where anyone can make a name point anywhere, or host anything.
        const OPEN_ZONES: &[&str] = &[
            "amazonaws.com",
            "s3.amazonaws.com",
            "cloudfront.net",
            "nip.io",
            "sslip.io",
            "xip.io",
            "traefik.me",
            "github.io",
            "githubusercontent.com",
            "workers.dev",
            "pages.dev",
            "vercel.app",
            "netlify.app",
            "herokuapp.com",
            "azurewebsites.net",
            "blob.core.windows.net",
            "appspot.com",
            "web.app",
            "firebaseapp.com",
            "ngrok.io",
            "ngrok-free.app",
        ];
        let Target::Below(d) = &self.target else { return None };
        if self.action != Action::Allow {
            return None;
        }
        let zone = OPEN_ZONES.iter().find(|z| d.as_str() == **z || d.as_str().ends_with(&format!(".{z}")))?;
        Some(format!(
            "`{self}` allows every name under {zone}, where anyone can make a name point at any address or host anything; name the hosts you mean instead"
        ))
    }

    /// Whether this rule names domains (so a flow it allows must also name one of them in its
    /// TLS server name or HTTP `Host`).
    pub fn is_domain(&self) -> bool {
        matches!(self.target, Target::Domain(_) | Target::Below(_))
    }

    /// Whether a DNS name alone decides this rule: a domain rule that matches `name` (in any
    /// direction, protocol or port, since a lookup has none of those yet).
    fn matches_name(&self, name: &DomainName) -> bool {
        match &self.target {
            Target::Domain(d) => d == name,
            Target::Below(d) => name.is_below(d),
            _ => false,
        }
    }
}

/// An IPv4-mapped address is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        // Canonical: the host bits dropped (10.1.2.3/8 is 10.0.0.0/8).
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

fn parse_target(t: &str) -> Result<Target, String> {
    if t.is_empty() {
        return Err("no target (use any, a group, an address, a CIDR or a domain)".into());
    }
    if t == "any" {
        return Ok(Target::Any);
    }
    if let Some(g) = Group::parse(t) {
        return Ok(Target::Group(g));
    }
    if t.bytes().next().is_some_and(|b| b.is_ascii_digit()) && (t.contains('/') || t.parse::<IpAddr>().is_ok()) {
        return parse_net(t).map(Target::Net).ok_or_else(|| format!("{t:?} is not an IPv4 address or CIDR"));
    }
    if let Some(d) = t.strip_prefix("*.") {
        return DomainName::parse(d).map(Target::Below);
    }
    if t.contains('*') {
        return Err("a wildcard is only *.DOMAIN".into());
    }
    // Spellings such as 0x7f.1 or 2130706433 are not names a resolver would return for a
    // rule to bind to, and not addresses: refuse them rather than guess.
    if t.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_hexdigit() || b == b'x' || b == b'X'))
        && t.bytes().next().is_some_and(|b| b.is_ascii_digit())
    {
        return Err(format!("{t:?} is neither a dotted-quad address nor a domain name"));
    }
    DomainName::parse(t).map(Target::Domain)
}

fn parse_ports(p: &str) -> Result<Vec<Ports>, String> {
    let num = |s: &str| -> Result<u16, String> {
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?} is not a port"));
        }
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{s} is not a port (1-65535)")),
            Ok(n) => Ok(n),
        }
    };
    let mut out = Vec::new();
    for part in p.split(',') {
        let r = match part.split_once('-') {
            Some((a, b)) => Ports { lo: num(a)?, hi: num(b)? },
            None => {
                let n = num(part)?;
                Ports { lo: n, hi: n }
            }
        };
        if r.lo > r.hi {
            return Err(format!("{}-{} is an empty range", r.lo, r.hi));
        }
        if out.len() == 64 {
            return Err("at most 64 port ranges in a rule".into());
        }
        out.push(r);
    }
    Ok(out)
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.action.name())?;
        if self.direction == Direction::Ingress {
            f.write_str("in/")?;
        }
        if let Some(p) = self.proto {
            write!(f, "{}/", p.name())?;
        }
        match &self.target {
            Target::Any => f.write_str("any")?,
            Target::Group(g) => f.write_str(g.name())?,
            Target::Net(IpNet::V6(n)) if n.prefix_len() == 128 => write!(f, "[{}]", n.addr())?,
            Target::Net(IpNet::V6(n)) => write!(f, "[{n}]")?,
            Target::Net(IpNet::V4(n)) if n.prefix_len() == 32 => write!(f, "{}", n.addr())?,
            Target::Net(n) => write!(f, "{n}")?,
            Target::Domain(d) => write!(f, "{d}")?,
            Target::Below(d) => write!(f, "*.{d}")?,
        }
        for (i, g) in self.name_groups.iter().enumerate() {
            f.write_str(if i == 0 { "@" } else { "+" })?;
            f.write_str(g.name())?;
        }
        for (i, p) in self.ports.iter().enumerate() {
            f.write_str(if i == 0 { ":" } else { "," })?;
            if p.lo == p.hi {
                write!(f, "{}", p.lo)?;
            } else {
                write!(f, "{}-{}", p.lo, p.hi)?;
            }
        }
        Ok(())
    }
}

/// Rules in order, then the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    default: Action,
}

impl Default for Policy {
    /// The mission's default: the public internet, nothing else.
    fn default() -> Self {
        Policy::public()
    }
}

impl Policy {
    /// `allow public`, default deny.
    pub fn public() -> Self {
        Policy {
            rules: vec![Rule {
                action: Action::Allow,
                direction: Direction::Egress,
                proto: None,
                target: Target::Group(Group::Public),
                ports: Vec::new(),
                name_groups: Vec::new(),
            }],
            default: Action::Deny,
        }
    }

    /// `rules` in order before the default [`Policy::public`] rule, default deny: what
    /// `--allow` and `--deny` build.
    pub fn with_rules(rules: Vec<Rule>) -> Result<Self, PolicyError> {
        let mut all = rules;
        all.extend(Policy::public().rules);
        Policy::new(all, Action::Deny)
    }

    pub fn new(rules: Vec<Rule>, default: Action) -> Result<Self, PolicyError> {
        if rules.len() > MAX_RULES {
            return Err(PolicyError::TooMany);
        }
        Ok(Policy { rules, default })
    }

    /// Parses a policy file (see the module docs). Without a `default` line the default is
    /// deny; the file's rules are the whole policy (no implicit `allow public`).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut rules = Vec::new();
        let mut default = Action::Deny;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |why: String| PolicyError::Line { line, why };
            if raw.len() > MAX_RULE_LEN {
                return Err(bad(format!("longer than {MAX_RULE_LEN} bytes")));
            }
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            let (word, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            let rest = rest.trim();
            match word {
                "allow" | "deny" => {
                    let action = if word == "allow" { Action::Allow } else { Action::Deny };
                    rules.push(Rule::parse(action, rest).map_err(|e| bad(e.to_string()))?);
                    if rules.len() > MAX_RULES {
                        return Err(PolicyError::TooMany);
                    }
                }
                "default" => {
                    default = match rest {
                        "allow" => Action::Allow,
                        "deny" => Action::Deny,
                        other => return Err(bad(format!("default is allow or deny, not {other:?}"))),
                    }
                }
                other => {
                    return Err(bad(format!("{other:?}: a line is `allow RULE`, `deny RULE` or `default allow|deny`")))
                }
            }
        }
        Policy::new(rules, default)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Decides a flow: the first rule that matches, else the default.
    pub fn decide(&self, c: &Classifier, flow: &Flow<'_>) -> Decision {
        let group = c.classify(flow.addr);
        match self.rules.iter().position(|r| r.matches(flow, group)) {
            Some(i) => Decision { action: self.rules[i].action, rule: Some(i), group },
            None => Decision { action: self.default, rule: None, group },
        }
    }

    /// Whether some egress flow to `addr` (any protocol, any port) could be allowed, with
    /// `names` resolved to it: what keeps an address in a DNS answer. A deny rule stops the
    /// search only when it covers every protocol and port.
    pub fn address_allowed(&self, c: &Classifier, addr: IpAddr, names: &[DomainName]) -> bool {
        let group = c.classify(addr);
        for r in self.rules.iter().filter(|r| r.direction == Direction::Egress) {
            if !r.target_matches(addr, names, group) {
                continue;
            }
            match r.action {
                Action::Allow => return true,
                Action::Deny if r.proto.is_none() && r.ports.is_empty() => return false,
                Action::Deny => {}
            }
        }
        self.default == Action::Allow
    }

    /// Whether this policy could allow some egress `proto` flow to `addr`:`port`, for any
    /// names the gateway might have resolved to it: an over-approximation of
    /// [`Policy::decide`] (a domain allow rule counts as matching wherever its groups admit
    /// the address's group; a domain deny rule never stops the search, since the names it
    /// needs may be absent). The dialer's floor: what no policy of the sandbox's could ever
    /// allow is refused there, whatever the sandbox process asks.
    pub fn could_allow(&self, c: &Classifier, proto: Proto, addr: IpAddr, port: u16) -> bool {
        let group = c.classify(addr);
        for r in &self.rules {
            if !r.covers(Direction::Egress, proto, port) {
                continue;
            }
            if r.is_domain() {
                if r.action == Action::Allow && r.name_may_resolve_to(group) {
                    return true;
                }
                continue;
            }
            if r.target_matches(addr, &[], group) {
                return r.action == Action::Allow;
            }
        }
        self.default == Action::Allow
    }

    /// The first domain *deny* rule ahead of rule `before` (`None`: the default, so every
    /// rule) that covers an egress `proto` flow to `port` naming `name`, whether or not the
    /// sandbox resolved it: a name a flow claims can only make it stricter. An allow domain
    /// rule for the name ahead of it ends the search.
    pub fn denies_name(&self, proto: Proto, port: u16, name: &DomainName, before: Option<usize>) -> Option<usize> {
        let limit = before.unwrap_or(self.rules.len()).min(self.rules.len());
        for (i, r) in self.rules[..limit].iter().enumerate() {
            if !r.is_domain() || !r.covers(Direction::Egress, proto, port) || !r.matches_name(name) {
                continue;
            }
            return (r.action == Action::Deny).then_some(i);
        }
        None
    }

    /// Whether any domain deny rule ahead of rule `before` covers an egress `proto` flow to
    /// `port` (so the names such a flow sends are worth reading).
    pub fn has_name_denials(&self, proto: Proto, port: u16, before: Option<usize>) -> bool {
        let limit = before.unwrap_or(self.rules.len()).min(self.rules.len());
        self.rules[..limit]
            .iter()
            .any(|r| r.action == Action::Deny && r.is_domain() && r.covers(Direction::Egress, proto, port))
    }

    /// Whether an allow rule that is not a domain rule (an address, CIDR, group or `any`), or
    /// a default of allow, may open egress flows: then any name may lead somewhere allowed
    /// and is resolved (the answer's addresses are still decided one by one).
    pub fn resolves_broadly(&self) -> bool {
        self.default == Action::Allow
            || self
                .rules
                .iter()
                .any(|r| r.action == Action::Allow && r.direction == Direction::Egress && !r.is_domain())
    }

    /// Whether a lookup of `name` may go upstream: some allow rule could open a flow it
    /// resolves to (an address rule, or a domain rule matching it ahead of any domain rule
    /// denying it). Under an allowlist of domain rules, no other name leaves the sandbox.
    pub fn may_resolve(&self, name: &DomainName) -> bool {
        match self.decide_name(name) {
            Some((Action::Deny, _)) => false,
            Some((Action::Allow, _)) => true,
            None => self.resolves_broadly(),
        }
    }

    /// Decides a DNS lookup by name alone: the first domain rule matching `name`, if any.
    /// `None`: no domain rule names it, so its answers are decided address by address.
    pub fn decide_name(&self, name: &DomainName) -> Option<(Action, usize)> {
        self.rules.iter().position(|r| r.matches_name(name)).map(|i| (self.rules[i].action, i))
    }

    /// What decided, in words, for a denial's message and the audit stream.
    pub fn describe(&self, rule: Option<usize>) -> String {
        match rule.and_then(|i| self.rules.get(i).map(|r| (i, r))) {
            Some((i, r)) => format!("rule {} `{r}`", i + 1),
            None => format!("the default ({})", self.default.name()),
        }
    }
}

impl std::fmt::Display for Policy {
    /// The policy-file form, which [`Policy::parse`] reads back to the same policy.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.rules {
            writeln!(f, "{r}")?;
        }
        writeln!(f, "default {}", self.default.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        let (a, r) = s.split_once(' ').unwrap();
        Rule::parse(if a == "allow" { Action::Allow } else { Action::Deny }, r).unwrap()
    }

    fn names(v: &[&str]) -> Vec<DomainName> {
        v.iter().map(|n| DomainName::parse(n).unwrap()).collect()
    }

    fn out<'a>(proto: Proto, ip: &str, port: u16, names: &'a [DomainName]) -> Flow<'a> {
        Flow { direction: Direction::Egress, proto, addr: ip.parse().unwrap(), port, names }
    }

    #[test]
    fn rules_parse_and_print_back_canonically() {
        for (written, canonical) in [
            ("tcp/api.example.com:443", "allow tcp/api.example.com:443"),
            ("203.0.113.0/24", "allow 203.0.113.0/24"),
            ("203.0.113.9/24", "allow 203.0.113.0/24"),
            ("203.0.113.9", "allow 203.0.113.9"),
            ("udp/[2001:db8::/32]:53", "allow udp/[2001:db8::/32]:53"),
            ("[2001:DB8::1]", "allow [2001:db8::1]"),
            ("out/*.Example.COM.", "allow *.example.com"),
            ("metadata", "allow metadata"),
            ("link-local:80", "allow link-local:80"),
            ("tcp/api.corp@private+reserved:443", "allow tcp/api.corp@private+reserved:443"),
            ("*.corp@reserved+private+public", "allow *.corp@private+reserved"),
        ] {
            let r = rule(&format!("allow {written}"));
            assert_eq!(r.to_string(), canonical, "{written}");
            assert_eq!(rule(canonical), r, "{canonical} parses back");
        }
    }

    #[test]
    fn bad_rules_say_why() {
        for (bad, why) in [
            ("", "no target"),
            ("tcp/", "no target"),
            ("2001:db8::/32", "brackets"),
            ("[2001:db8::/32", "closing"),
            ("[10.0.0.1]", "not an IPv6"),
            ("[2001:db8::]443", "expected :PORTS"),
            ("10.0.0.0/33", "not an IPv4"),
            ("host.example.com:0", "not a port"),
            ("host.example.com:65536", "not a port"),
            ("host.example.com:90-80", "empty range"),
            ("host.example.com:+80", "not a port"),
            ("ex*ample.com", "wildcard"),
            ("*", "wildcard"),
            ("0x7f.1", "neither"),
            ("2130706433", "neither"),
            ("exa mple.com", "domain label"),
            ("-bad.com", "domain label"),
            ("bücher.de", "xn--"),
            ("10.0.0.1@private", "domain target only"),
            ("private@private", "domain target only"),
            ("api.corp@intranet", "not a group"),
        ] {
            let e = Rule::parse(Action::Allow, bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(Rule::parse(Action::Allow, &"a".repeat(MAX_RULE_LEN + 1)).is_err());
    }

    #[test]
    fn a_domain_rule_opens_a_non_public_address_only_when_it_names_the_group() {
        let c = Classifier::new(Vec::<IpAddr>::new());
        let n = names(&["api.corp"]);
        let plain = Policy::new(vec![rule("allow api.corp")], Action::Deny).unwrap();
        let widened = Policy::new(vec![rule("allow api.corp@private")], Action::Deny).unwrap();
        for (ip, plain_ok, widened_ok) in
            [("93.184.216.34", true, true), ("10.1.2.3", false, true), ("127.0.0.1", false, false)]
        {
            let f = out(Proto::Tcp, ip, 443, &n);
            assert_eq!(plain.decide(&c, &f).action == Action::Allow, plain_ok, "{ip}");
            assert_eq!(widened.decide(&c, &f).action == Action::Allow, widened_ok, "{ip} @private");
            assert_eq!(widened.address_allowed(&c, ip.parse().unwrap(), &n), widened_ok, "{ip} kept in an answer");
        }
    }

    #[test]
    fn the_default_allows_public_only() {
        let p = Policy::default();
        let c = Classifier::new(["192.0.2.50".parse().unwrap()]);
        for (ip, allowed) in [
            ("8.8.8.8", true),
            ("2606:4700::1111", true),
            ("10.0.0.1", false),
            ("127.0.0.1", false),
            ("169.254.169.254", false),
            ("fd00:ec2::254", false),
            ("::ffff:127.0.0.1", false),
            ("64:ff9b::a9fe:a9fe", false),
            ("192.0.2.50", false),
            ("198.51.100.1", false),
            ("224.0.0.1", false),
        ] {
            let d = p.decide(&c, &out(Proto::Tcp, ip, 443, &[]));
            assert_eq!(d.action == Action::Allow, allowed, "{ip}: {d:?}");
        }
    }

    #[test]
    fn first_match_wins_over_groups_cidrs_protocols_and_ports() {
        let p = Policy::with_rules(vec![
            rule("deny tcp/8.8.8.8:25"),
            rule("allow udp/198.51.100.0/24:53"),
            rule("allow tcp/198.51.100.0/24:80,8000-8100"),
            rule("deny 1.1.1.0/24"),
        ])
        .unwrap();
        let c = Classifier::default();
        let d = |proto, ip, port| p.decide(&c, &out(proto, ip, port, &[]));
        assert_eq!(
            d(Proto::Tcp, "8.8.8.8", 25),
            Decision { action: Action::Deny, rule: Some(0), group: Group::Public }
        );
        assert_eq!(d(Proto::Udp, "8.8.8.8", 25).rule, Some(4), "the public rule, for UDP");
        assert_eq!(d(Proto::Udp, "198.51.100.9", 53).action, Action::Allow);
        assert_eq!(d(Proto::Tcp, "198.51.100.9", 53).action, Action::Deny, "UDP only");
        assert_eq!(d(Proto::Tcp, "198.51.100.9", 8050).rule, Some(2));
        assert_eq!(
            d(Proto::Tcp, "198.51.100.9", 8101),
            Decision { action: Action::Deny, rule: None, group: Group::Reserved }
        );
        assert_eq!(d(Proto::Tcp, "1.1.1.1", 443).rule, Some(3));
        assert_eq!(d(Proto::Tcp, "::ffff:1.1.1.1", 443).rule, Some(3), "a mapped address matches its IPv4 CIDR");
        assert_eq!(p.describe(Some(3)), "rule 4 `deny 1.1.1.0/24`");
        assert_eq!(p.describe(None), "the default (deny)");
    }

    #[test]
    fn domain_rules_match_only_names_the_sandbox_resolved_to_that_address() {
        let p = Policy::new(vec![rule("allow tcp/api.example.com:443"), rule("allow *.cdn.example.net")], Action::Deny)
            .unwrap();
        let c = Classifier::default();
        let pinned = names(&["api.example.com"]);
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 443, &pinned)).action, Action::Allow);
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 443, &[])).action, Action::Deny, "never resolved");
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 80, &pinned)).action, Action::Deny, "port");
        let below = names(&["a.b.cdn.example.net"]);
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 53, &below)).action, Action::Allow);
        assert_eq!(p.decide(&c, &out(Proto::Udp, "93.184.216.34", 53, &below)).action, Action::Deny, "TCP unless udp/");
        let apex = names(&["cdn.example.net"]);
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 443, &apex)).action, Action::Deny, "not the apex");
        let rebound = p.decide(&c, &out(Proto::Tcp, "127.0.0.1", 443, &pinned));
        assert_eq!(rebound.action, Action::Deny, "a name never opens a loopback address");
        let lookalike = names(&["evilcdn.example.net"]);
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 443, &lookalike)).action, Action::Deny);
        // By name alone, for DNS.
        let n = |s: &str| DomainName::parse(s).unwrap();
        assert_eq!(p.decide_name(&n("API.example.com.")), Some((Action::Allow, 0)));
        assert_eq!(p.decide_name(&n("x.cdn.example.net")), Some((Action::Allow, 1)));
        assert_eq!(p.decide_name(&n("example.com")), None);
    }

    #[test]
    fn an_address_stays_in_a_dns_answer_if_some_flow_to_it_could_be_allowed() {
        let c = Classifier::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let p = Policy::with_rules(vec![rule("deny tcp/8.8.8.8:25"), rule("deny 1.1.1.1")]).unwrap();
        assert!(p.address_allowed(&c, ip("8.8.8.8"), &[]), "only port 25 is denied");
        assert!(!p.address_allowed(&c, ip("1.1.1.1"), &[]), "a blanket deny");
        assert!(!p.address_allowed(&c, ip("10.0.0.1"), &[]));
        let p = Policy::new(vec![rule("allow tcp/api.example.com:443")], Action::Deny).unwrap();
        let api = names(&["api.example.com"]);
        assert!(p.address_allowed(&c, ip("93.184.216.34"), &api));
        assert!(!p.address_allowed(&c, ip("93.184.216.34"), &[]));
        assert!(!p.address_allowed(&c, ip("192.168.1.1"), &api), "rebinding to a private address");
    }

    #[test]
    fn wildcards_over_open_zones_are_warned_about() {
        assert!(rule("allow *.amazonaws.com").warning().unwrap().contains("under amazonaws.com"));
        assert!(rule("allow tcp/*.nip.io:443").warning().is_some());
        assert!(rule("allow *.eu-west-1.compute.amazonaws.com").warning().is_some());
        assert!(rule("allow api.example.com").warning().is_none(), "an exact name");
        assert!(rule("allow *.example.com").warning().is_none());
        assert!(rule("deny *.nip.io").warning().is_none(), "a denial opens nothing");
    }

    #[test]
    fn ingress_rules_are_refused_and_name_rules_cover_tcp_unless_told() {
        for r in ["in/tcp/any:22", "in/any"] {
            let e = Rule::parse(Action::Deny, r).unwrap_err().to_string();
            assert!(e.contains("in/ rules are not supported"), "{e}");
        }
        // N6: a domain rule without a protocol opens TCP only; `udp/` opens UDP.
        let c = Classifier::default();
        let api = names(&["api.example.com"]);
        let p = Policy::new(vec![rule("allow api.example.com")], Action::Deny).unwrap();
        assert_eq!(p.decide(&c, &out(Proto::Tcp, "93.184.216.34", 443, &api)).action, Action::Allow);
        assert_eq!(p.decide(&c, &out(Proto::Udp, "93.184.216.34", 443, &api)).action, Action::Deny, "QUIC");
        let p = Policy::new(vec![rule("allow udp/api.example.com:443")], Action::Deny).unwrap();
        assert_eq!(p.decide(&c, &out(Proto::Udp, "93.184.216.34", 443, &api)).action, Action::Allow);
        // N8: a claimed name meets the domain deny rules ahead of what allowed the flow.
        let p = Policy::with_rules(vec![rule("deny *.evil.example"), rule("allow tcp/ok.evil.example")]).unwrap();
        let www = DomainName::parse("www.evil.example").unwrap();
        assert_eq!(p.denies_name(Proto::Tcp, 443, &www, Some(2)), Some(0));
        assert_eq!(p.denies_name(Proto::Tcp, 443, &www, Some(0)), None, "nothing ahead of rule 1");
        assert!(p.has_name_denials(Proto::Tcp, 443, None));
        assert!(!p.has_name_denials(Proto::Tcp, 443, Some(0)));
    }

    #[test]
    fn policy_files_parse_print_back_and_name_the_bad_line() {
        let text =
            "# team policy\nallow tcp/api.example.com:443\n\ndeny private   # no LAN\nallow public\ndefault deny\n";
        let p = Policy::parse(text).unwrap();
        assert_eq!(p.rules().len(), 3);
        assert_eq!(Policy::parse(&p.to_string()).unwrap(), p, "{p}");
        let e = Policy::parse("allow public\nallow 10.0.0.0/40\n").unwrap_err().to_string();
        assert!(e.starts_with("policy line 2:") && e.contains("not an IPv4"), "{e}");
        assert!(Policy::parse("permit public").unwrap_err().to_string().contains("`allow RULE`"));
        assert!(Policy::parse("default maybe").is_err());
        let many = "allow public\n".repeat(MAX_RULES + 1);
        assert_eq!(Policy::parse(&many), Err(PolicyError::TooMany));
        assert_eq!(Policy::parse("default allow").unwrap().default_action(), Action::Allow);
    }

    #[test]
    fn domain_names_are_checked_and_canonical() {
        assert_eq!(DomainName::parse("Example.COM.").unwrap().as_str(), "example.com");
        assert!(DomainName::parse(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(DomainName::parse(&["a"; 128].join(".")).is_err(), "longer than 253");
        assert!(DomainName::parse("a..b").is_err());
        assert!(DomainName::parse("a.b\0.c").is_err());
        let n = |s: &str| DomainName::parse(s).unwrap();
        assert!(n("a.example.com").is_below(&n("example.com")));
        assert!(!n("example.com").is_below(&n("example.com")));
        assert!(!n("badexample.com").is_below(&n("example.com")));
    }
}
