//! The gateway's packet side: a smoltcp interface in any-IP mode that ends the guest's TCP
//! and DNS, and asks its shell to dial host sockets only after the policy said yes.
//!
//! The guest sees one router, [`NetConfig::gateway_v4`] / [`NetConfig::gateway_v6`], which
//! also answers DNS on port 53 (UDP, any address the guest sends it to). Every frame from the
//! guest is parsed before smoltcp sees it: a source that is not the guest's address is
//! dropped (no spoofing); a TCP SYN to a new destination is decided by [`Policy::decide`]
//! with the names this sandbox resolved to that address ([`Pins`]), and only an allowed one
//! gets a socket, and a [`Event::Dial`] once the guest's handshake is done (a SYN alone opens
//! no host connection); a denied one gets no socket, so smoltcp answers RST at once. Every
//! decision is an [`Event::Audit`].
//!
//! A flow that only a domain rule allows is decided for good by the server its first bytes
//! name (TLS SNI, HTTP `Host`, see [`crate::sniff`]): the name must be one this sandbox
//! resolved to the flow's address, and the policy must allow it there. Until then nothing is
//! dialed and none of its bytes leave; a denial is a TLS `access_denied` alert or an HTTP 403
//! naming the rule. Such a flow fails closed: first bytes that name no server the gateway
//! can read (not a whole ClientHello or canonical HTTP/1 request, an encrypted ClientHello,
//! one past [`sniff::MAX_HELLO`], nothing within [`NAME_WAIT_MS`]) are denied, never decided
//! by the address alone; a server-speaks-first protocol cannot be allowed by name.
//! When the policy has domain *deny* rules ahead of the rule that allows a flow to port 80
//! or 443, its first bytes are read too, and a server they name that such a rule denies is
//! denied (whether or not this sandbox resolved it): best effort, since a flow that names
//! nothing within [`SNIFF_WAIT_MS`] is then decided by its address.
//! On a plain-HTTP flow so allowed, every later request is framed ([`crate::http1`]) and its
//! `Host` decided the same way before it goes; a denied one resets the connection.
//! TCP to port 53 of any address is DNS over TCP, answered here like UDP, never dialed.
//!
//! Other UDP is relayed per flow (guest address and port, destination): the first datagram
//! of a flow is decided like a SYN, an allowed one gets [`Event::UdpOpen`] and its datagrams
//! [`Event::UdpSend`]; host datagrams come back through [`Gateway::udp_reply`] as frames
//! from the destination. A denied datagram goes to smoltcp, which answers ICMP unreachable.
//! At most [`MAX_UDP_FLOWS`], sharing the new-flow rate with TCP, closed after
//! [`UDP_IDLE_MS`] without a datagram.
//! Invariants (the shell relies on them): nothing here does I/O; time comes in as
//! milliseconds; queues are bounded — frames each way ([`MAX_FRAMES`]), TCP flows
//! ([`MAX_FLOWS`], new ones at most [`SYN_BURST`] then [`SYN_PER_SEC`] a second), DNS
//! lookups in flight ([`MAX_DNS_PENDING`]), events ([`MAX_EVENTS`]; audit records past it are
//! counted as dropped, never data); bytes move towards the host only against the credit the
//! shell grants per flow, and towards the guest only as fast as the flow's socket takes them.
//! A flow idle for [`IDLE_TIMEOUT_MS`] is reset.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
    IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket, UdpRepr,
};

use crate::classify::{Classifier, Group};
use crate::dns::{self, GuestQuery, Pins, Step};
use crate::http1::{self, Requests};
use crate::limit::{self, Bucket, Limits};
use crate::placeholders::{Watch, Watched};
use crate::policy::{Action, Direction, DomainName, Flow, Policy, Proto};
use crate::sniff::{self, Sniffed};
use msb_schema::secret::{OnViolation, SecretHost};

/// Most frames queued each way.
pub const MAX_FRAMES: usize = 256;
/// Most TCP flows at once.
pub const MAX_FLOWS: usize = 1024;
/// New TCP flows allowed at once, then [`SYN_PER_SEC`] a second.
pub const SYN_BURST: u32 = 128;
pub const SYN_PER_SEC: u32 = 64;
/// Most DNS lookups waiting for upstream.
pub const MAX_DNS_PENDING: usize = 64;
/// Most events waiting for the shell.
pub const MAX_EVENTS: usize = 4096;
/// A flow with no traffic this long is reset.
pub const IDLE_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Socket buffers per TCP flow, each way.
pub const FLOW_BUFFER: usize = 64 * 1024;
/// How long a flow allowed by a domain rule waits for the guest's first bytes (a TLS
/// ClientHello or HTTP request to check) before its host end is opened anyway, for protocols
/// whose server speaks first. The guest's bytes still wait to be checked.
pub const SNIFF_WAIT_MS: u64 = 1000;
/// How long a flow only a domain rule allows may take to name its server.
pub const NAME_WAIT_MS: u64 = 10_000;
/// How long a flow denied after sniffing may take to read its denial and close.
pub const DENIED_LINGER_MS: u64 = 5000;
/// Most UDP flows (guest address and port, destination) at once.
pub const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow with no datagram either way this long is closed.
pub const UDP_IDLE_MS: u64 = 60 * 1000;
/// Upstream DNS lookups a sandbox may start per second, sustained, and at once.
pub const DNS_PER_SEC: u64 = 50;
pub const DNS_BURST: u64 = 100;
/// Datagrams the guest may send a published UDP port's peer for each datagram the peer sent
/// (a NAT's response window): the guest cannot keep writing to a peer that went silent.
pub const UDP_PEER_WINDOW: u32 = 64;
/// Most DNS-over-TCP queries one connection may have waiting for upstream.
pub const MAX_DNS_PER_FLOW: usize = 8;
const DNS_PORT: u16 = 53;

/// The guest's side of the network: what agentd configures from the boot configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub guest_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub guest_v4: Ipv4Addr,
    pub gateway_v4: Ipv4Addr,
    pub prefix_v4: u8,
    pub guest_v6: Ipv6Addr,
    pub gateway_v6: Ipv6Addr,
    pub prefix_v6: u8,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            guest_mac: [0x02, 0x6d, 0x73, 0x62, 0, 2],
            gateway_mac: [0x02, 0x6d, 0x73, 0x62, 0, 1],
            guest_v4: Ipv4Addr::new(192, 168, 127, 2),
            gateway_v4: Ipv4Addr::new(192, 168, 127, 1),
            prefix_v4: 24,
            guest_v6: Ipv6Addr::new(0xfd6d, 0x7362, 0, 0, 0, 0, 0, 2),
            gateway_v6: Ipv6Addr::new(0xfd6d, 0x7362, 0, 0, 0, 0, 0, 1),
            prefix_v6: 64,
        }
    }
}

pub type FlowId = u64;

/// One decision, for the audit stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub at_ms: u64,
    pub proto: Proto,
    pub dest: SocketAddr,
    /// The names this sandbox resolved to the destination, if any.
    pub names: Vec<String>,
    pub action: Action,
    pub group: Group,
    /// What decided, in words (`rule 2 \`deny private\``, `the default (deny)`, …).
    pub why: String,
    /// The index of the policy rule that decided (`None`: the default, or a bound).
    pub rule: Option<usize>,
}

impl Audit {
    /// The record as one JSON line (no newline inside: every string is JSON-escaped) for the
    /// sandbox's audit stream.
    pub fn json_line(&self, sandbox: &str, time: &str) -> String {
        serde_json::json!({
            "time": time,
            "at_ms": self.at_ms,
            "sandbox": sandbox,
            "proto": self.proto.name(),
            "dest": self.dest.ip().to_string(),
            "port": self.dest.port(),
            "names": self.names,
            "action": self.action.name(),
            "group": self.group.name(),
            "why": self.why,
            "rule": self.rule.map(|i| i + 1),
        })
        .to_string()
    }
}

/// What the shell must do or record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Open a host connection for `flow` to `addr` (check the address actually connected
    /// with the classifier again at the dial point), then [`Gateway::host_connected`] or
    /// [`Gateway::host_failed`].
    Dial {
        flow: FlowId,
        addr: SocketAddr,
    },
    /// Like [`Event::Dial`], but the flow is TLS to `name`, one of the secrets' hosts: once
    /// connected (and checked at the dial point), the shell terminates TLS on both sides
    /// ([`crate::tls`]). `pinned`: `addr` was resolved for `name` by this sandbox.
    Intercept {
        flow: FlowId,
        addr: SocketAddr,
        name: String,
        pinned: bool,
    },
    /// Bytes the guest sent on `flow`, for the host socket.
    Data {
        flow: FlowId,
        bytes: Vec<u8>,
    },
    /// The guest finished sending on `flow` (shut down the host socket's write side).
    GuestDone {
        flow: FlowId,
    },
    /// `flow` is gone (reset, closed both ways, idle): drop its host socket.
    Closed {
        flow: FlowId,
    },
    /// Open a host UDP socket for `flow`, connected to `addr` (the policy allowed it);
    /// datagrams from there go to [`Gateway::udp_reply`].
    UdpOpen {
        flow: FlowId,
        addr: SocketAddr,
    },
    /// A datagram the guest sent on UDP `flow`, for its host socket.
    UdpSend {
        flow: FlowId,
        bytes: Vec<u8>,
    },
    /// Send `bytes` to the upstream resolver; its answer goes to [`Gateway::dns_reply`].
    Resolve {
        lookup: u64,
        upstream_id: u16,
        bytes: Vec<u8>,
    },
    Audit(Audit),
    /// A placeholder went where its secret says `on-violation=stop`: stop the sandbox.
    Stop {
        why: String,
    },
}

/// The frame queues smoltcp reads and writes.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        if self.tx.len() >= MAX_FRAMES {
            return None;
        }
        let f = self.rx.pop_front()?;
        Some((Rx(f), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        if self.tx.len() < MAX_FRAMES {
            Some(Tx(&mut self.tx))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct TcpFlow {
    handle: SocketHandle,
    key: (SocketAddr, SocketAddr),
    /// Bytes the shell can take towards the host now.
    credit: usize,
    connected: bool,
    guest_done: bool,
    last_ms: u64,
    /// A connection into the guest through a published port (the policy's egress rules do
    /// not apply to it).
    inbound: bool,
    kind: FlowKind,
    /// The stack has run since the flow's SYN was queued, so its socket has left `Listen`;
    /// back in `Listen` (smoltcp's answer to a RST in SYN-RECEIVED) it is stale and reaped,
    /// so it never takes another connection's SYN.
    armed: bool,
    /// The host finished before the guest's handshake did: close once it has.
    close_pending: bool,
    /// A plain-HTTP flow a domain rule allowed by its `Host`: every later request on it is
    /// framed and decided too (`bool`: the first head, decided already, is yet to come).
    http: Option<(Requests, bool)>,
    /// The server name the flow's first bytes named (TLS SNI or HTTP `Host`), once checked:
    /// what a later policy change decides it by.
    name: Option<DomainName>,
    /// The end of what the flow sent last, for placeholders split across writes.
    tail: Vec<u8>,
}

enum FlowKind {
    /// Bytes move both ways.
    Relay,
    /// Allowed by its address: dialed once the guest's handshake is done (a SYN alone opens
    /// no host connection); reset at `until_ms` if it never is.
    Handshake { until_ms: u64 },
    /// The guest's bytes wait until its first ones name a server (TLS SNI, HTTP `Host`):
    /// `mode` says what the name decides. `seen`: how many bytes were queued at the last
    /// look (the flow is looked at again only when more came or its time is up).
    Sniff { until_ms: u64, seen: usize, mode: SniffMode },
    /// Denied after sniffing: the denial (TLS alert, HTTP 403) is on its way and the socket
    /// closes; nothing is relayed, and it is reset at `until_ms`.
    Denied { until_ms: u64 },
    /// DNS over TCP, answered here: the bytes of a partial message, lookups in flight.
    Dns { buf: Vec<u8>, pending: usize },
}

/// What a sniffed flow's first bytes decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SniffMode {
    /// Only a domain rule allows the flow: the name must be read and allowed, or it is
    /// denied (by [`NAME_WAIT_MS`] at the latest).
    ByName,
    /// An address rule allows it, but domain deny rules come first: a name they deny is
    /// denied; a flow that names nothing within [`SNIFF_WAIT_MS`] goes by its address.
    DenyCheck,
    /// An address rule allows it and no name rule applies, but the address was resolved for
    /// a secret's host: the name only decides whether the flow is intercepted; whatever the
    /// first bytes are (no name, an IP literal, two names, nothing within
    /// [`SNIFF_WAIT_MS`]), the flow goes by its address and is relayed as it is.
    SecretCheck,
}

/// Where a DNS answer goes.
#[derive(Clone, Copy)]
enum Reply {
    Udp { guest: IpEndpoint, local: IpAddress },
    Tcp(FlowId),
}

impl Reply {
    /// The protocol the query came over.
    fn proto(self) -> Proto {
        match self {
            Reply::Udp { .. } => Proto::Udp,
            Reply::Tcp(_) => Proto::Tcp,
        }
    }
}

/// First local port the gateway uses for connections into the guest.
const INBOUND_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// A gateway address and port for an inbound flow that `taken` says no live flow uses
/// (there are fewer flows than ports, so one is found); `next` is where the search starts.
fn free_inbound_port(next: &mut u16, gateway: Ipv4Addr, taken: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    loop {
        let port = *next;
        *next = if port == *INBOUND_PORTS.end() { *INBOUND_PORTS.start() } else { port + 1 };
        let local = SocketAddr::new(IpAddr::V4(gateway), port);
        if !taken(local) {
            return local;
        }
    }
}

struct PendingLookup {
    query: GuestQuery,
    upstream_id: u16,
    reply: Reply,
    /// Where the guest sent the query (for the audit record).
    dest: SocketAddr,
}

struct UdpFlow {
    /// Guest address and port, destination.
    key: (SocketAddr, SocketAddr),
    last_ms: u64,
    /// A host peer of a published port (the egress policy does not apply to it).
    inbound: bool,
    /// For a peer: guest datagrams left before the peer sends again ([`UDP_PEER_WINDOW`]).
    window: u32,
}

/// A SYN a guest frame carries, parsed.
struct Syn {
    src: SocketAddr,
    dst: SocketAddr,
}

/// The gateway core for one sandbox.
pub struct Gateway {
    cfg: NetConfig,
    iface: Interface,
    dev: Frames,
    sockets: SocketSet<'static>,
    policy: Policy,
    classifier: Classifier,
    pins: Pins,
    flows: HashMap<FlowId, TcpFlow>,
    by_key: HashMap<(SocketAddr, SocketAddr), FlowId>,
    udp: HashMap<FlowId, UdpFlow>,
    udp_by_key: HashMap<(SocketAddr, SocketAddr), FlowId>,
    dns: SocketHandle,
    lookups: HashMap<u64, PendingLookup>,
    events: VecDeque<Event>,
    next_id: u64,
    limits: Limits,
    /// New flows (TCP and UDP share it).
    new_flows: Bucket,
    /// Upstream DNS lookups ([`DNS_PER_SEC`], burst [`DNS_BURST`]).
    lookups_rate: Bucket,
    /// Bytes towards the host and towards the guest, where limited.
    egress: Option<Bucket>,
    ingress: Option<Bucket>,
    /// Upstream DNS ids come from here (xorshift, seeded per sandbox).
    rng: u64,
    /// The next local port to try for a connection into the guest.
    next_inbound: u16,
    /// The hosts secrets may go to: TLS flows to them are intercepted.
    secret_hosts: Vec<SecretHost>,
    /// The secrets' placeholders, looked for in what leaves in the clear.
    watch: Watch,
    /// Frames dropped for a spoofed source, audits dropped for a full event queue.
    pub spoofed: u64,
    pub audits_dropped: u64,
}

impl Gateway {
    pub fn new(cfg: NetConfig, policy: Policy, classifier: Classifier, seed: u64, now_ms: u64) -> Self {
        let mut dev = Frames::default();
        let mut c = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.gateway_mac)));
        c.random_seed = seed;
        let now = Instant::from_millis(now_ms as i64);
        let mut iface = Interface::new(c, &mut dev, now);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(cfg.gateway_v4), cfg.prefix_v4));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(cfg.gateway_v6), cfg.prefix_v6));
        });
        // Any-IP: packets to every address are ours, routed "via" our own address.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.gateway_v4);
        let _ = iface.routes_mut().add_default_ipv6_route(cfg.gateway_v6);
        let mut sockets = SocketSet::new(Vec::new());
        let meta = || vec![udp::PacketMetadata::EMPTY; 32];
        let mut dns_sock = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; 32 * 1024]),
            udp::PacketBuffer::new(meta(), vec![0; 64 * 1024]),
        );
        dns_sock.bind(IpListenEndpoint { addr: None, port: DNS_PORT }).expect("port 53 binds");
        let dns = sockets.add(dns_sock);
        Gateway {
            cfg,
            iface,
            dev,
            sockets,
            policy,
            classifier,
            pins: Pins::default(),
            flows: HashMap::new(),
            by_key: HashMap::new(),
            udp: HashMap::new(),
            udp_by_key: HashMap::new(),
            dns,
            lookups: HashMap::new(),
            events: VecDeque::new(),
            next_id: 1,
            next_inbound: *INBOUND_PORTS.start(),
            limits: Limits::default(),
            new_flows: Bucket::new(u64::from(SYN_PER_SEC), u64::from(SYN_BURST), now_ms),
            lookups_rate: Bucket::new(DNS_PER_SEC, DNS_BURST, now_ms),
            egress: None,
            ingress: None,
            rng: seed | 1,
            secret_hosts: Vec::new(),
            watch: Watch::default(),
            spoofed: 0,
            audits_dropped: 0,
        }
    }

    /// The hosts the sandbox's secrets may go to (from the next flow on): TLS flows whose
    /// server name is one of them, to an address resolved for it, are intercepted.
    pub fn set_secret_hosts(&mut self, hosts: Vec<SecretHost>) {
        self.secret_hosts = hosts;
    }

    /// The placeholders to look for in what leaves in the clear (see [`crate::placeholders`]).
    pub fn set_placeholders(&mut self, watched: Vec<Watched>) {
        self.watch = Watch::new(watched);
    }

    /// A placeholder seen in the clear on a flow to `dest`: one audit record, and a stop
    /// when its secret says so. Returns whether the bytes must not go (block or stop).
    fn placeholder_seen(
        &mut self,
        proto: Proto,
        dest: SocketAddr,
        names: Vec<String>,
        w: Watched,
        now_ms: u64,
    ) -> bool {
        let refuse = w.on_violation != OnViolation::Forward;
        let what = match w.on_violation {
            OnViolation::Forward => "forwarded unchanged",
            OnViolation::Block => "refused (on-violation=block): the flow is reset",
            OnViolation::Stop => "refused (on-violation=stop): the sandbox stops",
        };
        let why = format!(
            "the placeholder of secret {} went in the clear (not a TLS request to one of its hosts, so not substituted): {what}",
            w.secret
        );
        let group = self.classifier.classify(dest.ip());
        let action = if refuse { Action::Deny } else { Action::Allow };
        self.push(Event::Audit(Audit {
            at_ms: now_ms,
            proto,
            dest,
            names,
            action,
            group,
            why: why.clone(),
            rule: None,
        }));
        if w.on_violation == OnViolation::Stop {
            self.push(Event::Stop { why });
        }
        refuse
    }

    fn is_secret_host(&self, name: &DomainName) -> bool {
        let n = name.to_string();
        let n = n.strip_suffix('.').unwrap_or(&n).to_ascii_lowercase();
        self.secret_hosts.iter().any(|h| h.matches(&n))
    }

    /// Whether `ip` was resolved for a secret's host.
    fn secret_pinned(&self, ip: IpAddr, now_ms: u64) -> bool {
        !self.secret_hosts.is_empty() && self.pins.names_for(ip, now_ms).iter().any(|n| self.is_secret_host(n))
    }

    /// Sets the sandbox's rate limits (checked with [`Limits::check`] by the caller); the
    /// buckets start full.
    pub fn set_limits(&mut self, limits: Limits, now_ms: u64) {
        self.limits = limits;
        self.new_flows = Bucket::new(u64::from(limits.flows_per_sec), u64::from(limits.flow_burst), now_ms);
        self.egress = limits.egress_bytes_per_sec.map(|r| Bucket::bytes(r, now_ms));
        self.ingress = limits.ingress_bytes_per_sec.map(|r| Bucket::bytes(r, now_ms));
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the classifier (the host's addresses and networks changed); flows it now
    /// denies are reset, as for a policy change.
    pub fn set_classifier(&mut self, classifier: Classifier, now_ms: u64) {
        if classifier == self.classifier {
            return;
        }
        self.classifier = classifier;
        self.redecide(now_ms);
    }

    /// The dial point of UDP `flow`: its host socket is connected to `peer` (what the kernel
    /// reports, so 0.0.0.0 shows as 127.0.0.1). Decided again as for TCP; a denied flow is
    /// closed and false returned (the shell drops its socket before a datagram goes).
    pub fn udp_dial_point(&mut self, flow: FlowId, peer: SocketAddr, now_ms: u64) -> bool {
        let Some(f) = self.udp.get(&flow) else { return false };
        let ok = self.dial_decision(Proto::Udp, f.key.1, peer, now_ms);
        if !ok {
            self.close_udp(flow);
        }
        ok
    }

    /// Whether a host socket dialed for `dialed` and connected to `peer` may carry the flow
    /// (decided again, with the names this sandbox resolved to `peer`); a denial is audited.
    fn dial_decision(&mut self, proto: Proto, dialed: SocketAddr, peer: SocketAddr, now_ms: u64) -> bool {
        let (action, mut audit) = self.decide(proto, peer, now_ms);
        if action == Action::Allow && peer == dialed {
            return true;
        }
        audit.action = Action::Deny;
        audit.why = format!("the dial point: connected to {peer} for {dialed} ({})", audit.why);
        self.push(Event::Audit(audit));
        false
    }

    /// Replaces the policy; flows it now denies are reset.
    pub fn set_policy(&mut self, policy: Policy, now_ms: u64) {
        self.policy = policy;
        self.redecide(now_ms);
    }

    /// Decides every live outbound flow again (the policy or the classifier changed); those
    /// now denied are reset (TCP) or closed (UDP).
    fn redecide(&mut self, now_ms: u64) {
        let denied: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                !f.inbound && !matches!(f.kind, FlowKind::Dns { .. }) && self.decide_flow(f, now_ms).0 == Action::Deny
            })
            .map(|(id, _)| *id)
            .collect();
        for id in denied {
            self.reset(id);
        }
        let denied: Vec<FlowId> = self
            .udp
            .iter()
            .filter(|(_, f)| !f.inbound && self.decide(Proto::Udp, f.key.1, now_ms).0 == Action::Deny)
            .map(|(id, _)| *id)
            .collect();
        for id in denied {
            self.close_udp(id);
        }
    }

    fn close_udp(&mut self, id: FlowId) {
        if let Some(f) = self.udp.remove(&id) {
            self.udp_by_key.remove(&f.key);
            self.push(Event::Closed { flow: id });
        }
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn push(&mut self, ev: Event) {
        if self.events.len() >= MAX_EVENTS {
            // Data and lifecycle events are bounded by the flows' credit and the flow table;
            // only audit records can outrun the shell, and they are counted when dropped.
            if matches!(ev, Event::Audit(_)) {
                self.audits_dropped += 1;
                return;
            }
        }
        self.events.push_back(ev);
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Frames for the guest (at most [`MAX_FRAMES`] wait here).
    pub fn take_frames(&mut self) -> Vec<Vec<u8>> {
        self.dev.tx.drain(..).collect()
    }

    /// At most `n` frames for the guest, oldest first; the rest keep waiting (and while
    /// [`MAX_FRAMES`] wait, smoltcp sends nothing more: the data stays in its sockets).
    pub fn take_frames_upto(&mut self, n: usize) -> Vec<Vec<u8>> {
        let n = n.min(self.dev.tx.len());
        self.dev.tx.drain(..n).collect()
    }

    /// Milliseconds until the stack next needs [`Gateway::poll`] (a retransmission, a delayed
    /// ACK, an idle check); `None` when nothing is due.
    pub fn poll_delay(&mut self, now_ms: u64) -> Option<u64> {
        let now = Instant::from_millis(now_ms as i64);
        let stack = self.iface.poll_delay(now, &self.sockets).map(|d| d.total_millis());
        // Idle timeouts are checked at least once a second while flows live, and a flow's
        // own deadline (the sniff wait, a denial's linger) when it is due.
        let deadline = self
            .flows
            .values()
            .filter_map(|f| match f.kind {
                FlowKind::Sniff { until_ms, .. } | FlowKind::Handshake { until_ms } => Some(until_ms),
                FlowKind::Denied { until_ms } => Some(until_ms),
                _ => None,
            })
            .min()
            .map(|at| at.saturating_sub(now_ms).max(1));
        // A byte limit that held data back wakes the gateway when it can send a frame again.
        let starved = [&self.egress, &self.ingress].into_iter().flatten().filter_map(Bucket::wake_in).min();
        let deadline = match (deadline, starved) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let live = !self.flows.is_empty() || !self.udp.is_empty();
        let floor = live.then_some(deadline.unwrap_or(1000).min(1000));
        match (stack, floor) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The dial point: the host connection of `flow` reached `peer`. The address actually
    /// connected is decided again (with the names this sandbox resolved to it); a denied one
    /// resets the guest's connection and returns false (the shell drops the host socket).
    pub fn dial_point(&mut self, flow: FlowId, peer: SocketAddr, now_ms: u64) -> bool {
        let Some(f) = self.flows.get(&flow) else { return false };
        let ok = self.dial_decision(Proto::Tcp, f.key.1, peer, now_ms);
        if !ok {
            self.reset(flow);
        }
        ok
    }

    fn decide(&self, proto: Proto, dst: SocketAddr, now_ms: u64) -> (Action, Audit) {
        let names = self.pins.names_for(dst.ip(), now_ms);
        self.decide_names(proto, dst, names, now_ms)
    }

    /// A flow decided again: by the server name it named, if it was checked for one.
    fn decide_flow(&self, f: &TcpFlow, now_ms: u64) -> (Action, Audit) {
        match &f.name {
            Some(n) => self.decide_named(f.key.1, n, now_ms),
            None => self.decide(Proto::Tcp, f.key.1, now_ms),
        }
    }

    /// Decides a TCP flow to `dst` that named server `name`: the name counts only if this
    /// sandbox resolved it to `dst` (what the guest claims never opens an address).
    fn decide_named(&self, dst: SocketAddr, name: &DomainName, now_ms: u64) -> (Action, Audit) {
        let pinned = self.pins.is_pinned(name, dst.ip(), now_ms);
        let names = if pinned { vec![name.clone()] } else { Vec::new() };
        let (mut action, mut audit) = self.decide_names(Proto::Tcp, dst, names, now_ms);
        audit.names = vec![name.to_string()];
        if !pinned {
            audit.why = format!("{name} was not resolved to {} by this sandbox; {}", dst.ip(), audit.why);
        }
        // A name the guest sends can only make a flow stricter: a domain deny rule ahead of
        // what allowed it holds whether or not this sandbox resolved the name.
        if action == Action::Allow {
            if let Some(i) = self.policy.denies_name(Proto::Tcp, dst.port(), name, audit.rule) {
                (action, audit.action, audit.rule) = (Action::Deny, Action::Deny, Some(i));
                audit.why = format!("{name} is denied by {}", self.policy.describe(Some(i)));
            }
        }
        (action, audit)
    }

    fn decide_names(&self, proto: Proto, dst: SocketAddr, names: Vec<DomainName>, now_ms: u64) -> (Action, Audit) {
        let flow = Flow { direction: Direction::Egress, proto, addr: dst.ip(), port: dst.port(), names: &names };
        let d = self.policy.decide(&self.classifier, &flow);
        let why = self.policy.describe(d.rule);
        let audit = Audit {
            at_ms: now_ms,
            proto,
            dest: dst,
            names: names.iter().map(|n| n.to_string()).collect(),
            action: d.action,
            group: d.group,
            why,
            rule: d.rule,
        };
        (d.action, audit)
    }

    /// Whether [`Gateway::guest_frame`] would take a frame now.
    pub fn has_room(&self) -> bool {
        self.dev.rx.len() < MAX_FRAMES
    }

    /// Takes a frame from the guest. Returns false when the queue is full (the device keeps
    /// or drops it).
    pub fn guest_frame(&mut self, frame: Vec<u8>, now_ms: u64) -> bool {
        if self.dev.rx.len() >= MAX_FRAMES {
            return false;
        }
        match self.inspect(&frame) {
            Inspect::Spoofed => {
                self.spoofed += 1;
                return true;
            }
            Inspect::Syn(syn) => self.on_syn(syn, now_ms),
            Inspect::Udp { src, dst, payload } => {
                if self.on_udp(src, dst, payload, now_ms) {
                    return true; // relayed: smoltcp never sees it
                }
                // Denied: smoltcp, with no socket for it, answers ICMP port unreachable.
            }
            Inspect::Other => {}
        }
        self.dev.rx.push_back(frame);
        true
    }

    fn inspect(&self, frame: &[u8]) -> Inspect {
        let Ok(eth) = EthernetFrame::new_checked(frame) else { return Inspect::Other };
        let (src, dst, proto, payload): (IpAddr, IpAddr, IpProtocol, &[u8]) = match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return Inspect::Other };
                (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), ip.next_header(), ip.payload())
            }
            EthernetProtocol::Ipv6 => {
                let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else { return Inspect::Other };
                (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), ip.next_header(), ip.payload())
            }
            // ARP and the rest: smoltcp's business.
            _ => return Inspect::Other,
        };
        let ours = src == IpAddr::V4(self.cfg.guest_v4) || src == IpAddr::V6(self.cfg.guest_v6);
        // Link-local and unspecified sources are what IPv6 neighbour discovery uses: allowed
        // for ICMPv6 only.
        let nd = matches!(src, IpAddr::V6(a) if a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80)
            && proto == IpProtocol::Icmpv6;
        if !ours && !nd {
            return Inspect::Spoofed;
        }
        // An IPv6 extension header first (Hop-by-Hop, routing, fragments, …) would let
        // smoltcp reach a TCP or UDP header this check never saw: such packets are dropped.
        if src.is_ipv6() && !matches!(proto, IpProtocol::Tcp | IpProtocol::Udp | IpProtocol::Icmpv6) {
            return Inspect::Spoofed;
        }
        if proto == IpProtocol::Udp {
            let Ok(udp) = UdpPacket::new_checked(payload) else { return Inspect::Other };
            if udp.dst_port() == DNS_PORT {
                return Inspect::Other; // the gateway's own DNS socket answers it
            }
            return Inspect::Udp {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                payload: udp.payload().to_vec(),
            };
        }
        if proto != IpProtocol::Tcp {
            return Inspect::Other;
        }
        let Ok(tcp) = TcpPacket::new_checked(payload) else { return Inspect::Other };
        if tcp.syn() && !tcp.ack() {
            return Inspect::Syn(Syn {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
            });
        }
        Inspect::Other
    }

    fn on_syn(&mut self, syn: Syn, now_ms: u64) {
        if self.by_key.contains_key(&(syn.src, syn.dst)) {
            return; // a retransmitted SYN
        }
        // DNS over TCP, to any address, is answered here like DNS over UDP.
        let dns = syn.dst.port() == DNS_PORT;
        let gateway =
            syn.dst.ip() == IpAddr::V4(self.cfg.gateway_v4) || syn.dst.ip() == IpAddr::V6(self.cfg.gateway_v6);
        let (mut action, mut audit) = self.decide(Proto::Tcp, syn.dst, now_ms);
        if dns {
            (action, audit.action, audit.rule) = (Action::Allow, Action::Allow, None);
            audit.why = "DNS over TCP, answered by the gateway".into();
        } else if gateway {
            (action, audit.rule, audit.why) = (Action::Deny, None, "the gateway's own address".into());
        }
        // Rate and table bounds come after the policy: a denied SYN costs no token.
        if action == Action::Allow {
            if self.flows.len() >= MAX_FLOWS {
                (action, audit.rule, audit.why) = (Action::Deny, None, format!("the {MAX_FLOWS}-flow table is full"));
            } else if !take_token(&mut self.new_flows, now_ms) {
                (action, audit.rule, audit.why) =
                    (Action::Deny, None, format!("more than {} new connections a second", self.limits.flows_per_sec));
            }
        }
        audit.action = action;
        // A flow a domain rule allows is decided for good, and audited, once its first bytes
        // named the server; so is one on 80/443 that domain deny rules ahead may still deny.
        let by_name = !dns && audit.rule.is_some_and(|i| self.policy.rules()[i].is_domain());
        let deny_check = !dns
            && !by_name
            && action == Action::Allow
            && matches!(syn.dst.port(), 80 | 443)
            && self.policy.has_name_denials(Proto::Tcp, syn.dst.port(), audit.rule);
        // A flow to an address resolved for a secret's host is looked at too: its name
        // decides whether it is intercepted (and nothing else).
        let secret_check =
            !dns && !by_name && !deny_check && action == Action::Allow && self.secret_pinned(syn.dst.ip(), now_ms);
        let deny_check = deny_check || secret_check;
        if action == Action::Deny || !(by_name || deny_check) {
            self.push(Event::Audit(audit));
        }
        if action == Action::Deny {
            return; // no socket: smoltcp answers the SYN with RST
        }
        let mut sock = flow_socket();
        let local = IpListenEndpoint { addr: Some(syn.dst.ip().into()), port: syn.dst.port() };
        if sock.listen(local).is_err() {
            return;
        }
        let kind = if dns {
            FlowKind::Dns { buf: Vec::new(), pending: 0 }
        } else if by_name {
            FlowKind::Sniff { until_ms: now_ms + NAME_WAIT_MS, seen: 0, mode: SniffMode::ByName }
        } else if secret_check {
            FlowKind::Sniff { until_ms: now_ms + SNIFF_WAIT_MS, seen: 0, mode: SniffMode::SecretCheck }
        } else if deny_check {
            FlowKind::Sniff { until_ms: now_ms + SNIFF_WAIT_MS, seen: 0, mode: SniffMode::DenyCheck }
        } else {
            FlowKind::Handshake { until_ms: now_ms + SNIFF_WAIT_MS + DENIED_LINGER_MS }
        };
        self.add_flow(sock, (syn.src, syn.dst), false, kind, 0, now_ms);
    }

    /// A guest datagram not for DNS: relayed on its flow, or a new flow if the policy allows
    /// it (and the table and the new-flow rate have room). Returns false when denied.
    fn on_udp(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>, now_ms: u64) -> bool {
        if let Some(&id) = self.udp_by_key.get(&(src, dst)) {
            if let Some(f) = self.udp.get_mut(&id) {
                if f.inbound {
                    // A published port's peer: only its own datagrams keep the flow, and the
                    // guest may answer each with a bounded number.
                    if f.window == 0 {
                        return true; // dropped, as a NAT past its window would
                    }
                    f.window -= 1;
                } else {
                    f.last_ms = now_ms;
                }
            }
            if let Some(w) = self.watch.find(&payload).cloned() {
                if self.placeholder_seen(Proto::Udp, dst, Vec::new(), w, now_ms) {
                    return true; // dropped
                }
            }
            if limit::admit(&mut self.egress, payload.len(), now_ms) {
                self.push(Event::UdpSend { flow: id, bytes: payload });
            }
            return true;
        }
        let gateway = dst.ip() == IpAddr::V4(self.cfg.gateway_v4) || dst.ip() == IpAddr::V6(self.cfg.gateway_v6);
        let (mut action, mut audit) = self.decide(Proto::Udp, dst, now_ms);
        if gateway {
            (action, audit.rule, audit.why) = (Action::Deny, None, "the gateway's own address".into());
        } else if action == Action::Allow && dst.port() == 443 && self.secret_pinned(dst.ip(), now_ms) {
            // HTTP/3 would carry a placeholder past interception: refused, so clients fall
            // back to TCP.
            (action, audit.rule, audit.why) = (
                Action::Deny,
                None,
                "QUIC to a secret's host is refused, so the client falls back to TLS over TCP".into(),
            );
        }
        if action == Action::Allow {
            if self.udp.len() >= MAX_UDP_FLOWS {
                (action, audit.rule, audit.why) =
                    (Action::Deny, None, format!("the {MAX_UDP_FLOWS}-flow UDP table is full"));
            } else if !take_token(&mut self.new_flows, now_ms) {
                (action, audit.rule, audit.why) =
                    (Action::Deny, None, format!("more than {} new connections a second", self.limits.flows_per_sec));
            }
        }
        audit.action = action;
        self.push(Event::Audit(audit));
        if action == Action::Deny {
            return false;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.udp.insert(id, UdpFlow { key: (src, dst), last_ms: now_ms, inbound: false, window: 0 });
        self.udp_by_key.insert((src, dst), id);
        self.push(Event::UdpOpen { flow: id, addr: dst });
        if let Some(w) = self.watch.find(&payload).cloned() {
            if self.placeholder_seen(Proto::Udp, dst, Vec::new(), w, now_ms) {
                return true;
            }
        }
        if limit::admit(&mut self.egress, payload.len(), now_ms) {
            self.push(Event::UdpSend { flow: id, bytes: payload });
        }
        true
    }

    /// An audit record of a DNS decision: for `name` (if the query had a checked one), asked
    /// of `dest` (or, for a removed answer, that address).
    fn dns_audit(
        &mut self,
        now_ms: u64,
        proto: Proto,
        dest: SocketAddr,
        name: Option<&DomainName>,
        action: Action,
        why: String,
    ) {
        let group = self.classifier.classify(dest.ip());
        let names = name.map(|n| vec![n.to_string()]).unwrap_or_default();
        self.push(Event::Audit(Audit { at_ms: now_ms, proto, dest, names, action, group, why, rule: None }));
    }

    /// A datagram from the host for UDP `flow`: framed to the guest from the flow's
    /// destination. Dropped (false) when the flow is gone, the frame queue is full, or it
    /// does not fit one frame (no fragments are made).
    pub fn udp_reply(&mut self, flow: FlowId, payload: &[u8], now_ms: u64) -> bool {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::EthernetRepr;
        let Some(f) = self.udp.get_mut(&flow) else { return false };
        f.last_ms = now_ms;
        if f.inbound {
            f.window = UDP_PEER_WINDOW;
        }
        let (guest, remote) = f.key;
        if self.dev.tx.len() >= MAX_FRAMES || !limit::admit(&mut self.ingress, payload.len(), now_ms) {
            return false;
        }
        let udp = UdpRepr { src_port: remote.port(), dst_port: guest.port() };
        let udp_len = 8 + payload.len();
        let (ethertype, ip_len) = match remote {
            SocketAddr::V4(_) => (EthernetProtocol::Ipv4, 20),
            SocketAddr::V6(_) => (EthernetProtocol::Ipv6, 40),
        };
        if ip_len + udp_len > 1500 {
            return false;
        }
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.cfg.gateway_mac),
            dst_addr: EthernetAddress(self.cfg.guest_mac),
            ethertype,
        };
        let mut buf = vec![0u8; 14 + ip_len + udp_len];
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut frame);
        let caps = ChecksumCapabilities::default();
        let (src, dst): (IpAddress, IpAddress) = (remote.ip().into(), guest.ip().into());
        if remote.is_ipv4() != guest.is_ipv4() {
            return false;
        }
        smoltcp::wire::IpRepr::new(src, dst, IpProtocol::Udp, udp_len, 64).emit(frame.payload_mut(), &caps);
        let ip_payload = &mut buf[14 + ip_len..];
        let mut p = UdpPacket::new_unchecked(ip_payload);
        udp.emit(&mut p, &src, &dst, payload.len(), |b| b.copy_from_slice(payload), &caps);
        self.dev.tx.push_back(buf);
        true
    }

    /// A flow waiting for its first bytes: decides it by the server they name, once they
    /// name one (or cannot), and dials or denies (see the module docs).
    fn sniff_flow(&mut self, id: FlowId, now_ms: u64) {
        let Some(f) = self.flows.get(&id) else { return };
        let FlowKind::Sniff { until_ms, seen, mode } = f.kind else { return };
        let (handle, dst) = (f.handle, f.key.1);
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        if matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived) {
            if now_ms >= until_ms + DENIED_LINGER_MS {
                sock.abort(); // the handshake never finished
            }
            return;
        }
        let queued = sock.recv_queue();
        let ended = !sock.may_recv();
        let late = now_ms >= until_ms;
        // Looked at again only when new bytes came, the guest closed, or time is up.
        if queued == seen && !ended && !late {
            return;
        }
        let mut first = vec![0u8; queued.min(sniff::MAX_HELLO)];
        let n = sock.peek_slice(&mut first).unwrap_or(0);
        first.truncate(n);
        let verdict = sniff::sniff(&first);
        let wait = match verdict {
            // Part of a ClientHello or request: the rest gets until the linger is over too.
            Sniffed::NeedMore if n > 0 => !ended && now_ms < until_ms + DENIED_LINGER_MS,
            Sniffed::NeedMore => !ended && !late,
            _ => false,
        };
        if wait {
            if let Some(f) = self.flows.get_mut(&id) {
                f.kind = FlowKind::Sniff { until_ms, seen: queued, mode };
            }
            return;
        }
        // Unnamed bytes on a flow an address rule allows go by that address, as before any
        // sniffing (deny rules by name are best effort), unless they stopped short or named
        // two servers; on a flow only a domain rule allows they are denied.
        let unnamed_ok = mode == SniffMode::SecretCheck
            || (mode == SniffMode::DenyCheck
                && !(matches!(verdict, Sniffed::NeedMore) && n > 0)
                && verdict != Sniffed::Ambiguous);
        let (name, what) = match verdict {
            Sniffed::Tls(name) | Sniffed::Http(name) => (Some(name), ""),
            Sniffed::NeedMore if n > 0 => {
                (None, "the first bytes stopped short of a whole TLS ClientHello or HTTP request")
            }
            Sniffed::NeedMore => (None, "no bytes naming a server came in time (a protocol whose server speaks first cannot be allowed by name)"),
            Sniffed::Other => (None, "the first bytes are neither a TLS ClientHello nor a canonical HTTP/1 request, so the server's name cannot be read"),
            Sniffed::Encrypted => (None, "an encrypted ClientHello (ECH): the server it names cannot be read"),
            Sniffed::TlsNoName => (None, "a TLS ClientHello without a server name"),
            Sniffed::HttpNoHost => (None, "an HTTP request without a Host header"),
            Sniffed::Ambiguous => (None, "two server names, one that is not a domain name, or a request target naming another"),
        };
        let (action, mut audit) = match &name {
            Some(name) => self.decide_named(dst, name, now_ms),
            None if unnamed_ok => self.decide(Proto::Tcp, dst, now_ms),
            None => {
                let (_, mut audit) = self.decide(Proto::Tcp, dst, now_ms);
                (audit.action, audit.rule, audit.why) =
                    (Action::Deny, None, format!("{what}, for a flow only a domain rule allows or a name rule checks"));
                (Action::Deny, audit)
            }
        };
        audit.action = action;
        let f = self.flows.get_mut(&id).expect("listed");
        if action == Action::Allow {
            f.kind = FlowKind::Relay;
            // (A flow looked at only for a secret's host stays a plain relay.)
            if first.first().is_some_and(|b| b.is_ascii_uppercase()) && name.is_some() && mode != SniffMode::SecretCheck
            {
                f.http = Some((Requests::default(), true));
            }
            // TLS to a secret's host, with a protocol the gateway can read inside, is
            // intercepted; everything else is relayed as it is.
            let intercept = match &name {
                Some(n) if first.first() == Some(&0x16) && self.is_secret_host(n) => sniff::client_alpn(&first)
                    .filter(|a| a.is_empty() || a.iter().any(|p| p == b"h2" || p == b"http/1.1"))
                    .map(|_| (n.to_string(), self.pins.is_pinned(n, dst.ip(), now_ms))),
                _ => None,
            };
            let f = self.flows.get_mut(&id).expect("listed");
            f.name = name;
            self.push(Event::Audit(audit));
            match intercept {
                Some((name, pinned)) => self.push(Event::Intercept { flow: id, addr: dst, name, pinned }),
                None => self.push(Event::Dial { flow: id, addr: dst }),
            }
            return;
        }
        // A denial the guest's program can read: TLS gets an alert, HTTP a 403 naming what
        // denied it, anything else a reset.
        f.kind = FlowKind::Denied { until_ms: now_ms + DENIED_LINGER_MS };
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        let shown = name.as_ref().map_or_else(|| dst.ip().to_string(), |n| n.to_string());
        match first.first() {
            Some(0x16) => {
                let _ = sock.send_slice(&sniff::tls_access_denied());
                sock.close();
            }
            Some(b) if b.is_ascii_uppercase() => {
                let _ = sock.send_slice(&sniff::http_forbidden(&shown, &audit.why));
                sock.close();
            }
            _ => sock.abort(),
        }
        self.push(Event::Audit(audit));
    }

    /// A plain-HTTP flow allowed by its `Host`: forwards what its framer classified, and
    /// decides each new request head before it goes; one naming a server the policy denies
    /// there resets the connection (responses may be in flight: a 403 could not be told
    /// from them).
    fn http_flow(&mut self, id: FlowId, now_ms: u64) {
        loop {
            let Some(f) = self.flows.get_mut(&id) else { return };
            if !f.connected || f.credit == 0 {
                return;
            }
            let (handle, dst) = (f.handle, f.key.1);
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            let want = f.credit.min(FLOW_BUFFER).min(sock.recv_queue());
            let room = limit::room(&mut self.egress, want, now_ms);
            if room == 0 {
                return;
            }
            // A head is framed whole even past the byte bucket's burst (else a head larger
            // than the burst would never be seen whole): it goes in one piece, the rest of
            // the stream no faster than the bucket allows.
            let mut data = vec![0u8; want];
            let k = sock.peek_slice(&mut data).unwrap_or(0);
            data.truncate(k);
            let Some((req, _)) = f.http.as_mut() else { return };
            let (mut at, mut head, mut bad) = (0, None, None);
            loop {
                let end = if req.at_head() { data.len() } else { room.max(at).min(data.len()) };
                if at >= end {
                    break;
                }
                match req.step(&data[at..end]) {
                    http1::Step::Forward(n) => at += n,
                    http1::Step::Head { len, host } => {
                        head = Some((len, host));
                        break;
                    }
                    http1::Step::NeedMore => break,
                    http1::Step::Bad(why) => {
                        bad = Some(why);
                        break;
                    }
                }
            }
            if at > 0 {
                let n = sock.recv_slice(&mut data[..at]).unwrap_or(0);
                limit::spend(&mut self.egress, n);
                f.credit -= n;
                f.last_ms = now_ms;
                let hit = self.watch.scan(&mut f.tail, &data[..n]).cloned();
                let names: Vec<String> = f.name.iter().map(|n| n.to_string()).collect();
                if let Some(w) = hit {
                    if self.placeholder_seen(Proto::Tcp, dst, names, w, now_ms) {
                        let f = self.flows.get_mut(&id).expect("listed");
                        self.sockets.get_mut::<tcp::Socket>(handle).abort();
                        f.kind = FlowKind::Denied { until_ms: now_ms };
                        self.push(Event::Closed { flow: id });
                        return;
                    }
                }
                self.push(Event::Data { flow: id, bytes: data[..n].to_vec() });
            }
            let (decided, audit) = match (head, bad) {
                (Some((len, Sniffed::Http(name))), _) => {
                    let (action, mut audit) = self.decide_named(dst, &name, now_ms);
                    audit.action = action;
                    if action == Action::Allow {
                        (Some((len, name, audit)), None)
                    } else {
                        (None, Some(audit))
                    }
                }
                (Some(_), _) => self.http_denial(dst, "a later request without one Host", now_ms),
                (None, Some(why)) => self.http_denial(dst, why, now_ms),
                (None, None) => return,
            };
            let f = self.flows.get_mut(&id).expect("listed");
            match decided {
                Some((len, name, a)) => {
                    let Some((req, first)) = f.http.as_mut() else { return };
                    req.accept_head(len);
                    // The first head was audited when the flow was sniffed.
                    let audit_it = !std::mem::take(first);
                    f.name = Some(name);
                    if audit_it {
                        self.push(Event::Audit(a));
                    }
                }
                None => {
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    f.kind = FlowKind::Denied { until_ms: now_ms };
                    if let Some(a) = audit {
                        self.push(Event::Audit(a));
                    }
                    self.push(Event::Closed { flow: id });
                    return;
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn http_denial(
        &self,
        dst: SocketAddr,
        why: &str,
        now_ms: u64,
    ) -> (Option<(usize, DomainName, Audit)>, Option<Audit>) {
        let (_, mut audit) = self.decide(Proto::Tcp, dst, now_ms);
        (audit.action, audit.rule, audit.why) =
            (Action::Deny, None, format!("{why}, on a flow only a domain rule allows"));
        (None, Some(audit))
    }

    /// A DNS-over-TCP connection: takes whole length-prefixed queries from the guest (at
    /// most [`MAX_DNS_PER_FLOW`] waiting at once) and closes once the guest is done and
    /// every answer is sent.
    fn dns_flow(&mut self, id: FlowId, now_ms: u64) {
        let mut queries = Vec::new();
        {
            let Some(f) = self.flows.get_mut(&id) else { return };
            let FlowKind::Dns { buf, pending } = &mut f.kind else { return };
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            loop {
                if *pending + queries.len() >= MAX_DNS_PER_FLOW {
                    break;
                }
                if buf.len() >= 2 {
                    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                    if len > dns::MAX_MESSAGE {
                        sock.abort(); // a message no query needs
                        return;
                    }
                    if buf.len() >= 2 + len {
                        queries.push(buf[2..2 + len].to_vec());
                        buf.drain(..2 + len);
                        continue;
                    }
                }
                let want = 2 + dns::MAX_MESSAGE - buf.len();
                let mut chunk = vec![0u8; want];
                match sock.recv_slice(&mut chunk) {
                    Ok(k) if k > 0 => {
                        buf.extend_from_slice(&chunk[..k]);
                        f.last_ms = now_ms;
                    }
                    _ => break,
                }
            }
            // The guest sent FIN (not merely: the handshake is not done yet).
            let guest_done = sock.state() == tcp::State::CloseWait;
            if guest_done && *pending + queries.len() == 0 && sock.send_queue() == 0 {
                sock.close();
            }
        }
        for q in queries {
            self.query(&q, Reply::Tcp(id), now_ms);
        }
    }

    /// Enters a flow's socket in the tables; `inbound` flows (published ports) are connected
    /// on the host side from the start, with `credit`.
    fn add_flow(
        &mut self,
        sock: tcp::Socket<'static>,
        key: (SocketAddr, SocketAddr),
        inbound: bool,
        kind: FlowKind,
        credit: usize,
        now_ms: u64,
    ) -> FlowId {
        let handle = self.sockets.add(sock);
        let id = self.next_id;
        self.next_id += 1;
        let flow = TcpFlow {
            handle,
            key,
            credit,
            connected: inbound,
            guest_done: false,
            last_ms: now_ms,
            inbound,
            kind,
            armed: false,
            close_pending: false,
            http: None,
            name: None,
            tail: Vec::new(),
        };
        self.flows.insert(id, flow);
        self.by_key.insert(key, id);
        id
    }

    /// A host client connected to a published port: opens a connection from the gateway to
    /// the guest's `guest_port` (IPv4). The flow is connected on the host side from the
    /// start, with `credit` bytes the shell can take towards the client; if the guest
    /// refuses, the flow closes ([`Event::Closed`]). `None` when the flow table is full.
    pub fn inbound(&mut self, guest_port: u16, credit: usize, now_ms: u64) -> Option<FlowId> {
        let guest = SocketAddr::new(IpAddr::V4(self.cfg.guest_v4), guest_port);
        let mut audit = Audit {
            at_ms: now_ms,
            proto: Proto::Tcp,
            dest: guest,
            names: vec![],
            action: Action::Allow,
            group: self.classifier.classify(guest.ip()),
            why: format!("published port to guest port {guest_port}"),
            rule: None,
        };
        if self.flows.len() >= MAX_FLOWS {
            (audit.action, audit.why) = (Action::Deny, format!("the {MAX_FLOWS}-flow table is full"));
            self.push(Event::Audit(audit));
            return None;
        }
        let local =
            free_inbound_port(&mut self.next_inbound, self.cfg.gateway_v4, |l| self.by_key.contains_key(&(guest, l)));
        let mut sock = flow_socket();
        let remote = IpEndpoint::new(guest.ip().into(), guest_port);
        let local_ep = IpListenEndpoint { addr: Some(local.ip().into()), port: local.port() };
        if sock.connect(self.iface.context(), remote, local_ep).is_err() {
            return None;
        }
        self.push(Event::Audit(audit));
        Some(self.add_flow(sock, (guest, local), true, FlowKind::Relay, credit, now_ms))
    }

    /// A new host peer of a published UDP port leading to `guest_port`: a UDP flow whose
    /// guest side is that port and whose far side is a gateway port of its own, so the
    /// guest's replies to it find the way back ([`Event::UdpSend`] on the returned flow).
    /// Its datagrams reach the guest through [`Gateway::udp_reply`]. `None` when the UDP
    /// table is full (the peer's datagram is dropped).
    pub fn inbound_udp(&mut self, guest_port: u16, now_ms: u64) -> Option<FlowId> {
        let guest = SocketAddr::new(IpAddr::V4(self.cfg.guest_v4), guest_port);
        let mut audit = Audit {
            at_ms: now_ms,
            proto: Proto::Udp,
            dest: guest,
            names: vec![],
            action: Action::Allow,
            group: self.classifier.classify(guest.ip()),
            why: format!("published port to guest port {guest_port}"),
            rule: None,
        };
        if self.udp.len() >= MAX_UDP_FLOWS {
            (audit.action, audit.why) = (Action::Deny, format!("the {MAX_UDP_FLOWS}-flow UDP table is full"));
            self.push(Event::Audit(audit));
            return None;
        }
        let local = free_inbound_port(&mut self.next_inbound, self.cfg.gateway_v4, |l| {
            self.udp_by_key.contains_key(&(guest, l))
        });
        self.push(Event::Audit(audit));
        let id = self.next_id;
        self.next_id += 1;
        self.udp.insert(id, UdpFlow { key: (guest, local), last_ms: now_ms, inbound: true, window: 0 });
        self.udp_by_key.insert((guest, local), id);
        Some(id)
    }

    /// The host connection of `flow` is up; the shell can take `credit` bytes towards it.
    pub fn host_connected(&mut self, flow: FlowId, credit: usize) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.connected = true;
            f.credit = credit;
        }
    }

    /// The shell can take `bytes` more towards the host on `flow`.
    pub fn grant(&mut self, flow: FlowId, bytes: usize) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.credit = f.credit.saturating_add(bytes);
        }
    }

    /// The host connection failed or was refused: the guest's connection is reset (a UDP
    /// flow is closed).
    pub fn host_failed(&mut self, flow: FlowId) {
        self.reset(flow);
        self.close_udp(flow);
    }

    /// Bytes from the host for `flow`; returns how many the guest's socket took (the shell
    /// keeps the rest and offers it again).
    pub fn host_data(&mut self, flow: FlowId, bytes: &[u8], now_ms: u64) -> usize {
        let Some(f) = self.flows.get_mut(&flow) else { return 0 };
        f.last_ms = now_ms;
        let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
        let want = bytes.len().min(sock.send_capacity() - sock.send_queue());
        let room = limit::room(&mut self.ingress, want, now_ms);
        let n = sock.send_slice(&bytes[..room]).unwrap_or(0);
        limit::spend(&mut self.ingress, n);
        if let Some((req, _)) = f.http.as_mut() {
            req.response(&bytes[..n]); // a websocket Upgrade waits on the server's status
        }
        n
    }

    /// The host finished sending on `flow`: the guest gets FIN after what was sent.
    pub fn host_done(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.get_mut(&flow) {
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            if matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent) {
                // The guest's handshake is not done (a host that closes at once can be
                // quicker): smoltcp would lose a FIN asked for now, so it waits for it.
                f.close_pending = true;
            } else {
                sock.close();
            }
        }
    }

    fn reset(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.get(&flow) {
            self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
        }
    }

    /// Upstream's answer to lookup `lookup` (or `None`: it failed or timed out).
    pub fn dns_reply(&mut self, lookup: u64, answer: Option<&[u8]>, now_ms: u64) {
        self.pins.expire(now_ms);
        let Some(p) = self.lookups.remove(&lookup) else { return };
        let bytes = match answer {
            Some(a) => {
                let (bytes, f) =
                    dns::answer(&p.query, a, p.upstream_id, &self.policy, &self.classifier, &mut self.pins, now_ms);
                // Every lookup is audited, allowed ones included (the stream aggregates
                // repeats, see the actor).
                let name = Some(&p.query.name);
                let why = format!(
                    "DNS {} lookup: {}, {} address(es) kept, {} removed",
                    p.query.qtype,
                    f.code,
                    f.kept.len(),
                    f.removed.len()
                );
                self.dns_audit(now_ms, Proto::Udp, p.dest, name, Action::Allow, why);
                for ip in f.removed {
                    let dest = SocketAddr::new(ip, 0);
                    self.dns_audit(now_ms, Proto::Udp, dest, name, Action::Deny, "removed from a DNS answer".into());
                }
                bytes
            }
            None => p.query.servfail(),
        };
        self.send_dns(p.reply, &bytes);
    }

    /// Sends a DNS answer where its query came from. A TCP connection whose send buffer has
    /// no room for it (the guest does not read) loses it, as a UDP one would.
    fn send_dns(&mut self, reply: Reply, bytes: &[u8]) {
        match reply {
            Reply::Udp { guest, local } => {
                let m = udp::UdpMetadata { endpoint: guest, local_address: Some(local), meta: Default::default() };
                let _ = self.sockets.get_mut::<udp::Socket>(self.dns).send_slice(bytes, m);
            }
            Reply::Tcp(id) => {
                let Some(f) = self.flows.get_mut(&id) else { return };
                if let FlowKind::Dns { pending, .. } = &mut f.kind {
                    *pending = pending.saturating_sub(1);
                }
                let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
                let Ok(len) = u16::try_from(bytes.len()) else { return };
                if sock.send_capacity() - sock.send_queue() >= 2 + bytes.len() {
                    let _ = sock.send_slice(&len.to_be_bytes());
                    let _ = sock.send_slice(bytes);
                }
            }
        }
    }

    /// Runs the stack: frames in, frames out, socket work, events.
    pub fn poll(&mut self, now_ms: u64) {
        let now = Instant::from_millis(now_ms as i64);
        for b in [&mut self.egress, &mut self.ingress].into_iter().flatten() {
            b.settle();
        }
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        if self.dev.rx.is_empty() {
            // Every queued frame was processed, every SYN with it.
            for f in self.flows.values_mut() {
                f.armed = true;
            }
        }
        self.serve_dns(now_ms);
        let mut gone = Vec::new();
        let mut buf = vec![0u8; FLOW_BUFFER];
        let mut seen: Vec<(SocketAddr, Vec<String>, Watched)> = Vec::new();
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            match self.flows[&id].kind {
                FlowKind::Sniff { .. } => self.sniff_flow(id, now_ms),
                FlowKind::Handshake { until_ms } => {
                    let f = self.flows.get_mut(&id).expect("listed");
                    let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
                    if matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived) {
                        if now_ms >= until_ms {
                            sock.abort(); // the handshake never finished: nothing was dialed
                        }
                    } else {
                        f.kind = FlowKind::Relay;
                        let addr = f.key.1;
                        self.push(Event::Dial { flow: id, addr });
                    }
                }
                FlowKind::Dns { .. } => self.dns_flow(id, now_ms),
                FlowKind::Relay if self.flows[&id].http.is_some() => self.http_flow(id, now_ms),
                FlowKind::Relay | FlowKind::Denied { .. } => {}
            }
            let f = self.flows.get_mut(&id).expect("listed");
            let sock = self.sockets.get_mut::<tcp::Socket>(f.handle);
            let mut out = Vec::new();
            if f.close_pending && sock.may_send() {
                f.close_pending = false;
                sock.close();
            }
            match f.kind {
                FlowKind::Relay => {
                    if f.connected && f.credit > 0 && sock.can_recv() && f.http.is_none() {
                        let want = f.credit.min(FLOW_BUFFER).min(sock.recv_queue());
                        let room = limit::room(&mut self.egress, want, now_ms);
                        let n = sock.recv_slice(&mut buf[..room]).unwrap_or(0);
                        limit::spend(&mut self.egress, n);
                        if n > 0 {
                            f.credit -= n;
                            f.last_ms = now_ms;
                            let hit = self.watch.scan(&mut f.tail, &buf[..n]).cloned();
                            let go = hit.as_ref().is_none_or(|w| w.on_violation == OnViolation::Forward);
                            if let Some(w) = hit {
                                seen.push((f.key.1, f.name.iter().map(|n| n.to_string()).collect(), w));
                            }
                            if go {
                                out.push(Event::Data { flow: id, bytes: buf[..n].to_vec() });
                            } else {
                                sock.abort();
                                f.kind = FlowKind::Denied { until_ms: now_ms };
                            }
                        }
                    }
                    if f.connected
                        && !f.guest_done
                        && !sock.may_recv()
                        && sock.recv_queue() == 0
                        && sock.state() != tcp::State::Listen
                        && sock.state() != tcp::State::SynReceived
                        && sock.state() != tcp::State::SynSent
                    {
                        f.guest_done = true;
                        out.push(Event::GuestDone { flow: id });
                    }
                }
                FlowKind::Denied { until_ms } => {
                    // What the guest still sends is dropped; it has its denial.
                    while sock.recv_slice(&mut buf).unwrap_or(0) > 0 {}
                    if now_ms >= until_ms {
                        sock.abort();
                    }
                }
                FlowKind::Sniff { .. } | FlowKind::Handshake { .. } | FlowKind::Dns { .. } => {}
            }
            if now_ms.saturating_sub(f.last_ms) > IDLE_TIMEOUT_MS {
                sock.abort();
            }
            for ev in out {
                self.push(ev);
            }
            for (dest, names, w) in seen.drain(..) {
                self.placeholder_seen(Proto::Tcp, dest, names, w, now_ms);
            }
        }
        let idle: Vec<FlowId> = self
            .udp
            .iter()
            .filter(|(_, f)| now_ms.saturating_sub(f.last_ms) > UDP_IDLE_MS)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close_udp(id);
        }
        // What the socket work produced (ACKs, data, FINs, RSTs).
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        // A socket is gone once closed and its RST (if it was reset) is sent: smoltcp forgets
        // the remote end only after sending it.
        for (id, f) in &self.flows {
            let sock = self.sockets.get::<tcp::Socket>(f.handle);
            let closed = sock.state() == tcp::State::Closed && sock.remote_endpoint().is_none();
            let stale = f.armed && !f.inbound && sock.state() == tcp::State::Listen;
            if closed || stale || sock.state() == tcp::State::TimeWait {
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(f) = self.flows.remove(&id) {
                self.by_key.remove(&f.key);
                self.sockets.remove(f.handle);
                self.push(Event::Closed { flow: id });
            }
        }
    }

    fn serve_dns(&mut self, now_ms: u64) {
        loop {
            let sock = self.sockets.get_mut::<udp::Socket>(self.dns);
            let Ok((data, meta)) = sock.recv() else { break };
            let (data, guest, local) = (data.to_vec(), meta.endpoint, meta.local_address);
            let Some(local) = local else { continue };
            self.query(&data, Reply::Udp { guest, local }, now_ms);
        }
    }

    /// One DNS query from the guest: answered at once (a denial, a malformed query) or
    /// looked up upstream, at most [`MAX_DNS_PENDING`] at a time (SERVFAIL past that).
    fn query(&mut self, data: &[u8], reply: Reply, now_ms: u64) {
        let dest = match reply {
            Reply::Udp { local, .. } => SocketAddr::new(local.into(), DNS_PORT),
            Reply::Tcp(id) => {
                self.flows.get(&id).map_or(SocketAddr::new(self.cfg.gateway_v4.into(), DNS_PORT), |f| f.key.1)
            }
        };
        if let Some(w) = self.watch.find(data).cloned() {
            // A placeholder as a DNS label: meaningless there, but said.
            let w = Watched { on_violation: OnViolation::Forward, ..w };
            self.placeholder_seen(reply.proto(), dest, Vec::new(), w, now_ms);
        }
        match dns::on_query(&self.policy, data) {
            Step::Answer { bytes, why } => {
                if let Reply::Tcp(id) = reply {
                    if let Some(FlowKind::Dns { pending, .. }) = self.flows.get_mut(&id).map(|f| &mut f.kind) {
                        *pending += 1; // send_dns takes it back
                    }
                }
                self.send_dns(reply, &bytes);
                self.dns_audit(now_ms, reply.proto(), dest, None, Action::Deny, why);
            }
            Step::Resolve(q) => {
                if let Reply::Tcp(id) = reply {
                    if let Some(FlowKind::Dns { pending, .. }) = self.flows.get_mut(&id).map(|f| &mut f.kind) {
                        *pending += 1;
                    }
                }
                if self.lookups.len() >= MAX_DNS_PENDING {
                    self.send_dns(reply, &q.servfail());
                    return;
                }
                if !take_token(&mut self.lookups_rate, now_ms) {
                    self.send_dns(reply, &q.servfail());
                    let why = format!("more than {DNS_PER_SEC} DNS lookups a second");
                    self.dns_audit(now_ms, reply.proto(), dest, Some(&q.name), Action::Deny, why);
                    return;
                }
                let lookup = self.next_id;
                self.next_id += 1;
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let upstream_id = self.rng as u16;
                let bytes = q.upstream(upstream_id);
                self.lookups.insert(lookup, PendingLookup { query: q, upstream_id, reply, dest });
                self.push(Event::Resolve { lookup, upstream_id, bytes });
            }
        }
    }
}

/// One token of a rate (the new-flow rate TCP and UDP share, the DNS lookup rate), if there
/// is one. A refusal waits for nothing: it leaves no wake-up behind.
fn take_token(bucket: &mut Bucket, now_ms: u64) -> bool {
    let ok = bucket.take_one(now_ms);
    bucket.settle();
    ok
}

/// A TCP socket with a flow's buffers ([`FLOW_BUFFER`] each way).
fn flow_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]), tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]))
}

enum Inspect {
    Spoofed,
    Syn(Syn),
    Udp { src: SocketAddr, dst: SocketAddr, payload: Vec<u8> },
    Other,
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod audit_tests {
    use super::*;

    #[test]
    fn an_audit_record_is_one_json_line() {
        let a = Audit {
            at_ms: 5,
            proto: Proto::Tcp,
            dest: "10.0.0.1:80".parse().unwrap(),
            names: vec!["a.example".into()],
            action: Action::Deny,
            group: Group::Private,
            why: "rule 1 `deny private`\n(injected)".into(),
            rule: Some(0),
        };
        let line = a.json_line("web", "2026-12-02T08:00:00.000Z");
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["dest"], "10.0.0.1");
        assert_eq!(v["time"], "2026-12-02T08:00:00.000Z");
        assert_eq!(v["port"], 80);
        assert_eq!(v["action"], "deny");
        assert_eq!(v["group"], "private");
        assert_eq!(v["names"][0], "a.example");
    }
}
