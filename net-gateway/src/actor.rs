//! The gateway's actor shell: runs the [`Gateway`] core for one sandbox, opens host sockets
//! for the flows it allows, asks the upstream resolver what the guest asked, and writes the
//! audit stream.
//!
//! Its peers, and only these: the virtio-net shell ([`GuestFrames`] in, [`ToNet`] out) and
//! the control side ([`NetControl`]). Host sockets belong to tasks of this actor, one per
//! flow and one per DNS lookup; they talk to it by message only.
//!
//! Invariants:
//! - A host socket is opened only for an [`Event::Dial`], i.e. after the policy allowed the
//!   flow; once connected, the address actually reached is decided again
//!   ([`Gateway::dial_point`]) before a byte moves.
//! - Bounded per flow: towards the host at most [`FLOW_BUFFER`] bytes are unwritten (the
//!   writer grants credit back as it writes); towards the guest a flow's reader holds one
//!   chunk of at most [`HOST_CHUNK`] bytes until the guest's socket took all of it, then
//!   reads again. Frames towards the guest go only against the shell's credit
//!   ([`NET_FRAME_WINDOW`]); the core's own queue bounds the rest.
//! - The audit stream is one JSON line per decision, appended to a file of at most
//!   [`AUDIT_CAP`] bytes, rotated (one old generation, `NAME.1`) rather than silenced past
//!   it; a denial repeated within a second is written once and then as one record with a
//!   `repeated` count, so a flood of free denials cannot push out the rest; audits the core
//!   dropped are written as a count.
//! - A UDP flow's task holds one host socket connected to the flow's destination; at most
//!   [`UDP_QUEUE`] datagrams wait each way (more are dropped, as a congested link would).
//! - A published UDP port is one host socket; each host peer that sends to it is a UDP flow
//!   of the core (so the UDP table bounds them, and they idle out like any), whose guest
//!   datagrams go back to that peer only. At most [`UDP_QUEUE`] datagrams per port wait for
//!   the actor.
//! - Upstream DNS is asked with the core's own query (a fresh id, one question); an answer
//!   is taken only from the resolver's address, and a lookup that gets none within
//!   [`DNS_TIMEOUT`] is answered SERVFAIL.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_schema::net::{GuestFrames, NetControl, PortListener, PortProto, ToNet, MAX_PUBLISHED, NET_FRAME_WINDOW};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::classify::{Classifier, Extras};
use crate::dialer::{Dialer, HostView};
use crate::limit::Limits;
use crate::policy::Policy;
use crate::stack::{Event, FlowId, Gateway, NetConfig, FLOW_BUFFER};

/// Largest chunk a flow's reader takes from its host socket at once.
pub const HOST_CHUNK: usize = 16 * 1024;
/// Longest a host connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the upstream resolver may take to answer.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest audit stream per sandbox.
pub const AUDIT_CAP: u64 = 16 * 1024 * 1024;
/// Largest DNS message taken from upstream.
const DNS_MAX: usize = 4096;
/// Datagrams queued per UDP flow each way (past it they are dropped, as a network would).
pub const UDP_QUEUE: usize = 64;
/// Largest datagram read from a host UDP socket (more than one frame can carry is dropped
/// by the core anyway).
const UDP_MAX: usize = 2048;

/// What the gateway is started with.
#[derive(Debug)]
pub struct GatewayArgs {
    /// The sandbox's name, for the audit stream.
    pub sandbox: String,
    pub net: NetConfig,
    pub policy: Policy,
    /// Where lookups go (default: the host's first resolver in `/etc/resolv.conf`).
    pub upstream_dns: Option<SocketAddr>,
    /// The audit stream's file (appended); `None`: decisions go to `tracing` only.
    pub audit: Option<PathBuf>,
    pub seed: u64,
    /// Published ports: host listeners (already bound, so a taken port fails the sandbox's
    /// creation, not later) and the guest port each leads to.
    pub published: Vec<(PortListener, u16)>,
    /// New-flow rate and byte rates (checked by the caller with [`Limits::check`]).
    pub limits: Limits,
    /// Where host sockets come from: this process, or a dialer outside its jail.
    pub dialer: Dialer,
    /// TLS interception for the secrets' hosts, when the sandbox has secrets.
    pub secrets: Option<SecretsArgs>,
}

/// What the gateway needs for secrets: the hosts they may go to and the interceptor (its CA,
/// upstream trust and the vault ref).
pub struct SecretsArgs {
    pub hosts: Vec<msb_schema::secret::SecretHost>,
    /// Each secret's name, placeholder and what a misplaced placeholder does.
    pub placeholders:
        Vec<(msb_schema::secret::SecretName, msb_schema::secret::Placeholder, msb_schema::secret::OnViolation)>,
    pub interceptor: Arc<crate::tls::Interceptor>,
}

impl std::fmt::Debug for SecretsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsArgs({} hosts)", self.hosts.len())
    }
}

/// The gateway's mailbox. Its peers hold refs narrowed to [`GuestFrames`] (the virtio-net
/// shell) or [`NetControl`] (the control side); the rest are its own tasks'.
pub enum GatewayMsg {
    Guest(GuestFrames),
    Control(NetControl),
    /// The virtio-net shell to send frames to.
    Attach(DerivedActorRef<ToNet>),
    /// Time for the stack (a timer of generation `n`; stale ones are ignored).
    Tick(u64),
    /// A flow's host connection is up, to `peer`; `view` is the host as it was then.
    Connected {
        flow: FlowId,
        peer: SocketAddr,
        view: HostView,
    },
    /// A UDP flow's host socket is connected, to `peer` (as the kernel reports it): `go`
    /// says whether a datagram may go.
    UdpConnected {
        flow: FlowId,
        peer: SocketAddr,
        view: HostView,
        go: oneshot::Sender<bool>,
    },
    /// The host's addresses changed (netlink said so).
    HostChanged,
    /// What happened on an intercepted flow (for the audit stream).
    Tls {
        flow: FlowId,
        report: crate::tls::TlsReport,
    },
    /// A flow's host connection failed to open, or broke.
    Failed {
        flow: FlowId,
    },
    /// Bytes a flow's host socket read; `taken` fires once the guest's socket took them all.
    HostData {
        flow: FlowId,
        bytes: Vec<u8>,
        taken: oneshot::Sender<()>,
    },
    /// A flow's host socket reached end of stream.
    HostDone {
        flow: FlowId,
    },
    /// A flow's writer wrote this many bytes to its host socket.
    Written {
        flow: FlowId,
        bytes: usize,
    },
    /// Upstream's answer to a lookup (`None`: none came).
    Dns {
        lookup: u64,
        answer: Option<Vec<u8>>,
    },
    /// A datagram a UDP flow's host socket received; `permit` is held until it is framed.
    UdpData {
        flow: FlowId,
        bytes: Vec<u8>,
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// A host client connected to a published port leading to `guest_port`.
    Inbound {
        guest_port: u16,
        stream: TcpStream,
    },
    /// A datagram from host peer `peer` to the published UDP port `sock` (leading to
    /// `guest_port`); `permit` is held until it is framed.
    InboundUdp {
        guest_port: u16,
        sock: Arc<UdpSocket>,
        peer: SocketAddr,
        bytes: Vec<u8>,
        permit: tokio::sync::OwnedSemaphorePermit,
    },
}

impl From<GuestFrames> for GatewayMsg {
    fn from(m: GuestFrames) -> Self {
        GatewayMsg::Guest(m)
    }
}
impl TryFrom<GatewayMsg> for GuestFrames {
    type Error = ();
    fn try_from(m: GatewayMsg) -> Result<Self, ()> {
        match m {
            GatewayMsg::Guest(g) => Ok(g),
            _ => Err(()),
        }
    }
}
impl From<NetControl> for GatewayMsg {
    fn from(m: NetControl) -> Self {
        GatewayMsg::Control(m)
    }
}
impl TryFrom<GatewayMsg> for NetControl {
    type Error = ();
    fn try_from(m: GatewayMsg) -> Result<Self, ()> {
        match m {
            GatewayMsg::Control(c) => Ok(c),
            _ => Err(()),
        }
    }
}

/// What a flow's task is told to do with its host socket.
enum ToHost {
    Data(Vec<u8>),
    /// The guest finished sending: shut down the write side.
    Shutdown,
}

/// How a flow's task is fed: a TCP stream's bytes (bounded by the core's credit) or a UDP
/// flow's datagrams (at most [`UDP_QUEUE`] waiting).
enum FlowTx {
    Tcp(mpsc::UnboundedSender<ToHost>),
    Udp(mpsc::Sender<Vec<u8>>),
    /// A host peer of a published UDP port: the guest's datagrams go back to `peer` from
    /// the published socket (whose local address, with `peer`, keys [`GatewayState::peers`]).
    Peer {
        sock: Arc<UdpSocket>,
        peer: SocketAddr,
        local: SocketAddr,
    },
}

struct HostFlow {
    tx: FlowTx,
    /// The flow's own task, if it has one (a published UDP port's peer has none).
    task: Option<AbortHandle>,
    /// Host bytes the guest's socket has not taken yet (from `at`), and whom to tell.
    parked: Option<(Vec<u8>, usize, oneshot::Sender<()>)>,
    /// The host finished; tell the core once the parked bytes are in.
    done: bool,
}

impl Drop for HostFlow {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The audit stream's file, bounded and never silenced: denials repeated within one second
/// (same protocol, destination address and port, names, rule and reason) are written once,
/// then once more with a `repeated` count when the second is over; at [`AUDIT_CAP`] bytes the
/// file is rotated to `NAME.1` (one old generation kept), so the newest records are there.
struct AuditLog {
    sandbox: String,
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    written: u64,
    /// The second (on the core's clock) being aggregated, and its repeated denials.
    second: u64,
    repeats: HashMap<RepeatKey, (u64, crate::stack::Audit)>,
    /// Audits the core dropped for a full event queue, as last reported.
    core_dropped: u64,
}

/// What makes two denials "the same" for aggregation: protocol, destination address and
/// port, names, rule, reason.
type RepeatKey = (&'static str, SocketAddr, Vec<String>, Option<usize>, String);

/// Most distinct denials aggregated per second (past it, records are written one by one).
const MAX_REPEAT_KEYS: usize = 1024;

impl AuditLog {
    fn open(sandbox: String, path: Option<&PathBuf>) -> Self {
        let mut log = AuditLog {
            sandbox,
            path: path.cloned(),
            file: None,
            written: 0,
            second: 0,
            repeats: HashMap::new(),
            core_dropped: 0,
        };
        log.reopen();
        log
    }

    fn reopen(&mut self) {
        self.file = self.path.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| tracing::warn!(path = %p.display(), "cannot open the network audit stream: {e}"))
                .ok()
        });
        self.written = self.file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    }

    fn write(&mut self, line: &str) {
        if self.written + line.len() as u64 > AUDIT_CAP {
            if let Some(p) = &self.path {
                let mut old = p.clone().into_os_string();
                old.push(".1");
                let _ = std::fs::rename(p, old);
            }
            self.reopen();
        }
        let Some(f) = &mut self.file else { return };
        if f.write_all(line.as_bytes()).is_ok() {
            self.written += line.len() as u64;
        }
    }

    fn record(&mut self, audit: &crate::stack::Audit) {
        tracing::debug!(action = audit.action.name(), dest = %audit.dest, why = %audit.why, "network decision");
        if self.file.is_none() {
            return;
        }
        self.tick(audit.at_ms);
        if audit.action == crate::policy::Action::Deny {
            let key = (audit.proto.name(), audit.dest, audit.names.clone(), audit.rule, audit.why.clone());
            if let Some((n, _)) = self.repeats.get_mut(&key) {
                *n += 1;
                return;
            }
            if self.repeats.len() < MAX_REPEAT_KEYS {
                self.repeats.insert(key, (0, audit.clone()));
            }
        }
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let line = audit.json_line(&self.sandbox, &time) + "\n";
        self.write(&line);
    }

    /// One record of what happened on an intercepted flow (never a value or a path).
    fn record_tls(&mut self, flow: FlowId, r: &crate::tls::TlsReport) {
        use crate::tls::TlsReport as R;
        let v = match r {
            R::UpstreamFailed { sni, why } => serde_json::json!({"event": "upstream-failed", "sni": sni, "why": why}),
            R::Substituted { sni, secrets } => {
                serde_json::json!({"event": "substituted", "sni": sni, "headers": secrets})
            }
            R::Violation { sni, secret, location, why, action } => serde_json::json!({
                "event": "placeholder-misplaced", "sni": sni, "secret": secret, "location": location, "why": why, "action": action,
            }),
            R::Refused { sni, why } => serde_json::json!({"event": "refused", "sni": sni, "why": why}),
            R::Stop { sni, secret } => serde_json::json!({"event": "stop", "sni": sni, "secret": secret}),
        };
        tracing::debug!(flow, record = %v, "secret interception");
        if self.file.is_none() {
            return;
        }
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut v = v;
        v["time"] = serde_json::json!(time);
        v["sandbox"] = serde_json::json!(self.sandbox);
        v["proto"] = serde_json::json!("tls");
        v["flow"] = serde_json::json!(flow);
        self.write(&format!("{v}\n"));
    }

    /// Time passed to `now_ms` (the core's clock): the last second's repeats are written.
    fn tick(&mut self, now_ms: u64) {
        let second = now_ms / 1000;
        if second == self.second {
            return;
        }
        self.second = second;
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        for (_, (n, a)) in std::mem::take(&mut self.repeats) {
            if n == 0 {
                continue;
            }
            let mut v: serde_json::Value = serde_json::from_str(&a.json_line(&self.sandbox, &time)).unwrap_or_default();
            v["repeated"] = serde_json::json!(n);
            self.write(&format!("{v}\n"));
        }
    }

    /// The core's count of audits it dropped (a full event queue): written when it grows.
    fn core_dropped(&mut self, n: u64) {
        if n > self.core_dropped && self.file.is_some() {
            let note =
                serde_json::json!({"sandbox": self.sandbox, "audit": "dropped", "records": n - self.core_dropped});
            self.write(&format!("{note}\n"));
            self.core_dropped = n;
        }
    }
}

/// The placeholders as the core watches for them.
fn watched(
    p: Vec<(msb_schema::secret::SecretName, msb_schema::secret::Placeholder, msb_schema::secret::OnViolation)>,
) -> Vec<crate::placeholders::Watched> {
    p.into_iter()
        .map(|(n, ph, on)| crate::placeholders::Watched {
            secret: n.to_string(),
            placeholder: ph.to_string(),
            on_violation: on,
        })
        .collect()
}

pub struct NetGateway;

pub struct GatewayState {
    me: ActorRef<GatewayMsg>,
    core: Gateway,
    start: Instant,
    shell: Option<DerivedActorRef<ToNet>>,
    /// Frames the shell can still take.
    credit: usize,
    flows: HashMap<FlowId, HostFlow>,
    upstream: Option<SocketAddr>,
    audit: AuditLog,
    /// The timer in flight: its generation and when it fires (ms on `start`'s clock).
    timer: Option<(u64, u64)>,
    timer_gen: u64,
    /// Guest frames the core's queue refused (counted; the guest's TCP retransmits).
    pub refused: u64,
    /// The published ports' accept loops.
    listeners: Vec<Listening>,
    /// TLS interception for secret hosts.
    interceptor: Option<Arc<crate::tls::Interceptor>>,
    /// Host peers of published UDP ports (published socket's address, peer) and their
    /// flows; an entry lives exactly as long as its flow, so the core's UDP table bounds it.
    peers: HashMap<(SocketAddr, SocketAddr), FlowId>,
    /// Set to stop the thread that watches the host's addresses ([`watch_host`]).
    host_watch: Arc<std::sync::atomic::AtomicBool>,
    dialer: Dialer,
}

/// A published port's accept (or receive) loop.
struct Listening {
    proto: PortProto,
    host: SocketAddr,
    guest: u16,
    task: AbortHandle,
}

impl GatewayState {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Polls the core, acts on what it produced, sends the guest what credit allows, and
    /// keeps one timer for the next poll.
    fn run(&mut self) {
        let now = self.now();
        self.core.poll(now);
        self.feed_parked(now);
        for ev in self.core.take_events() {
            self.on_event(ev);
        }
        self.audit.tick(now);
        self.audit.core_dropped(self.core.audits_dropped);
        self.flush();
        let Some(delay) = self.core.poll_delay(now) else { return };
        let due = now + delay.max(1);
        if self.timer.is_some_and(|(_, at)| at <= due) {
            return;
        }
        self.timer_gen += 1;
        self.timer = Some((self.timer_gen, due));
        let (me, generation) = (self.me.clone(), self.timer_gen);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay.max(1))).await;
            let _ = me.cast(GatewayMsg::Tick(generation));
        });
    }

    fn flush(&mut self) {
        let Some(shell) = &self.shell else { return };
        if self.credit == 0 {
            return;
        }
        let frames = self.core.take_frames_upto(self.credit);
        if frames.is_empty() {
            return;
        }
        self.credit -= frames.len();
        let _ = shell.send_message(ToNet::Frames(frames));
    }

    /// Offers parked host bytes to the guest's sockets again.
    fn feed_parked(&mut self, now: u64) {
        let mut finished = Vec::new();
        for (id, f) in self.flows.iter_mut() {
            if let Some((bytes, at, _)) = &mut f.parked {
                *at += self.core.host_data(*id, &bytes[*at..], now);
                if *at >= bytes.len() {
                    if let Some((_, _, taken)) = f.parked.take() {
                        let _ = taken.send(());
                    }
                    if f.done {
                        finished.push(*id);
                    }
                }
            }
        }
        for id in finished {
            self.core.host_done(id);
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Dial { flow, addr } => self.start_flow(flow, HostEnd::Dial(addr)),
            Event::Intercept { flow, addr, name, pinned } => match &self.interceptor {
                Some(tls) => {
                    let tls = tls.clone();
                    self.start_flow(flow, HostEnd::Intercept { addr, name, pinned, tls });
                }
                None => self.start_flow(flow, HostEnd::Dial(addr)),
            },
            Event::Data { flow, bytes } => {
                if let Some(FlowTx::Tcp(tx)) = self.flows.get(&flow).map(|f| &f.tx) {
                    let _ = tx.send(ToHost::Data(bytes));
                }
            }
            Event::GuestDone { flow } => {
                if let Some(FlowTx::Tcp(tx)) = self.flows.get(&flow).map(|f| &f.tx) {
                    let _ = tx.send(ToHost::Shutdown);
                }
            }
            Event::UdpOpen { flow, addr } => {
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                let task =
                    Some(tokio::spawn(udp_task(flow, addr, self.dialer.clone(), self.me.clone(), rx)).abort_handle());
                self.flows.insert(flow, HostFlow { tx: FlowTx::Udp(tx), task, parked: None, done: false });
            }
            Event::UdpSend { flow, bytes } => match self.flows.get(&flow).map(|f| &f.tx) {
                // Full: dropped, as a congested link would.
                Some(FlowTx::Udp(tx)) => drop(tx.try_send(bytes)),
                Some(FlowTx::Peer { sock, peer, .. }) => drop(sock.try_send_to(&bytes, *peer)),
                _ => {}
            },
            Event::Closed { flow } => {
                if let Some(FlowTx::Peer { peer, local, .. }) = self.flows.remove(&flow).as_ref().map(|f| &f.tx) {
                    self.peers.remove(&(*local, *peer));
                }
            }
            Event::Resolve { lookup, upstream_id, bytes } => {
                let (me, upstream, dialer) = (self.me.clone(), self.upstream, self.dialer.clone());
                tokio::spawn(async move {
                    let answer = match upstream {
                        Some(server) => ask_upstream(&dialer, server, upstream_id, &bytes).await,
                        None => None,
                    };
                    let _ = me.cast(GatewayMsg::Dns { lookup, answer });
                });
            }
            Event::Audit(a) => self.audit.record(&a),
            Event::Stop { why } => self.me.stop(Some(why)),
        }
    }
}

/// A flow's host end: an address to dial, or a client a published port accepted.
enum HostEnd {
    Dial(SocketAddr),
    /// Dial, then terminate TLS for `name` on both sides ([`crate::tls`]).
    Intercept {
        addr: SocketAddr,
        name: String,
        pinned: bool,
        tls: Arc<crate::tls::Interceptor>,
    },
    Accepted(TcpStream),
}

impl GatewayState {
    fn start_flow(&mut self, flow: FlowId, end: HostEnd) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Some(tokio::spawn(flow_task(flow, end, self.dialer.clone(), self.me.clone(), rx)).abort_handle());
        self.flows.insert(flow, HostFlow { tx: FlowTx::Tcp(tx), task, parked: None, done: false });
    }

    /// A datagram from a host peer of a published UDP port: framed to the guest on the
    /// peer's flow, which is made on its first datagram (dropped if the table is full).
    fn inbound_udp(&mut self, guest_port: u16, sock: Arc<UdpSocket>, peer: SocketAddr, bytes: &[u8], now: u64) {
        let Ok(local) = sock.local_addr() else { return };
        let flow = match self.peers.get(&(local, peer)) {
            Some(&flow) => flow,
            None => {
                let Some(flow) = self.core.inbound_udp(guest_port, now) else { return };
                self.peers.insert((local, peer), flow);
                let tx = FlowTx::Peer { sock, peer, local };
                self.flows.insert(flow, HostFlow { tx, task: None, parked: None, done: false });
                flow
            }
        };
        self.core.udp_reply(flow, bytes, now);
    }
}

/// One flow's host side: connect (or take the accepted client), then copy both ways under
/// the actor's credit.
async fn flow_task(
    flow: FlowId,
    end: HostEnd,
    dialer: Dialer,
    me: ActorRef<GatewayMsg>,
    rx: mpsc::UnboundedReceiver<ToHost>,
) {
    let (addr, intercept) = match end {
        HostEnd::Accepted(s) => {
            let _ = s.set_nodelay(true);
            let (rd, wr) = s.into_split();
            return relay(flow, rd, wr, me, rx).await;
        }
        HostEnd::Dial(addr) => (addr, None),
        HostEnd::Intercept { addr, name, pinned, tls } => (addr, Some((name, pinned, tls))),
    };
    let (stream, peer, view) = match tokio::time::timeout(CONNECT_TIMEOUT, dialer.tcp(addr)).await {
        Ok(Ok(o)) => (o.socket, o.addr, o.view),
        Ok(Err(e)) => {
            tracing::debug!(%addr, "no host connection: {e}");
            let _ = me.cast(GatewayMsg::Failed { flow });
            return;
        }
        Err(_) => {
            let _ = me.cast(GatewayMsg::Failed { flow });
            return;
        }
    };
    let _ = me.cast(GatewayMsg::Connected { flow, peer, view });
    let _ = stream.set_nodelay(true);
    match intercept {
        None => {
            let (rd, wr) = stream.into_split();
            relay(flow, rd, wr, me, rx).await
        }
        Some((name, pinned, tls)) => {
            // The guest's bytes reach the interceptor through a pipe (the same credit
            // as any flow's), and the interceptor owns the host socket.
            let (ours, theirs) = tokio::io::duplex(FLOW_BUFFER);
            let (rd, wr) = tokio::io::split(ours);
            let reporter = me.clone();
            let report = move |report| {
                let _ = reporter.cast(GatewayMsg::Tls { flow, report });
            };
            tokio::join!(relay(flow, rd, wr, me, rx), tls.run(theirs, stream, name, pinned, report));
        }
    }
}

/// Moves one TCP flow's bytes between the core's messages and a host stream.
async fn relay(
    flow: FlowId,
    mut rd: impl tokio::io::AsyncRead + Unpin,
    mut wr: impl tokio::io::AsyncWrite + Unpin,
    me: ActorRef<GatewayMsg>,
    mut rx: mpsc::UnboundedReceiver<ToHost>,
) {
    let mut buf = vec![0u8; HOST_CHUNK];
    let mut reading = true;
    let mut waiting: Option<oneshot::Receiver<()>> = None;
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(ToHost::Data(bytes)) => {
                    if wr.write_all(&bytes).await.is_err() {
                        let _ = me.cast(GatewayMsg::Failed { flow });
                        return;
                    }
                    let _ = me.cast(GatewayMsg::Written { flow, bytes: bytes.len() });
                }
                Some(ToHost::Shutdown) => { let _ = wr.shutdown().await; }
                None => return,
            },
            r = async { waiting.as_mut().expect("guarded").await }, if waiting.is_some() => {
                waiting = None;
                if r.is_err() { return; }
            }
            n = rd.read(&mut buf), if reading && waiting.is_none() => match n {
                Ok(0) => {
                    reading = false;
                    let _ = me.cast(GatewayMsg::HostDone { flow });
                }
                Ok(n) => {
                    let (taken, rx_taken) = oneshot::channel();
                    waiting = Some(rx_taken);
                    let _ = me.cast(GatewayMsg::HostData { flow, bytes: buf[..n].to_vec(), taken });
                }
                Err(_) => {
                    let _ = me.cast(GatewayMsg::Failed { flow });
                    return;
                }
            },
        }
    }
}

/// One UDP flow's host side: a socket connected to `addr`; datagrams out as the guest sent
/// them, datagrams in at most [`UDP_QUEUE`] ahead of the actor (the kernel's socket buffer
/// drops the rest).
async fn udp_task(
    flow: FlowId,
    addr: SocketAddr,
    dialer: Dialer,
    me: ActorRef<GatewayMsg>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let (sock, peer, view) = match dialer.udp(addr).await {
        Ok(o) => (o.socket, o.addr, o.view),
        Err(e) => {
            tracing::debug!(%addr, "no host socket: {e}");
            let _ = me.cast(GatewayMsg::Failed { flow });
            return;
        }
    };
    // The dial point: the address the kernel connected to is decided again before a
    // datagram goes (0.0.0.0 reads back as 127.0.0.1).
    let (go, verdict) = oneshot::channel();
    if me.cast(GatewayMsg::UdpConnected { flow, peer, view, go }).is_err() || verdict.await != Ok(true) {
        return;
    }
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(UDP_QUEUE));
    let mut permit = None;
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                // A send error (ICMP unreachable from an earlier datagram, say) is the
                // guest's to retry; the flow stays.
                Some(d) => { let _ = sock.send(&d).await; }
                None => return,
            },
            p = permits.clone().acquire_owned(), if permit.is_none() => match p {
                Ok(p) => permit = Some(p),
                Err(_) => return,
            },
            r = sock.recv(&mut buf), if permit.is_some() => {
                // An error (ECONNREFUSED after an ICMP unreachable) is consumed; reading goes on.
                if let Ok(n) = r {
                    let p = permit.take().expect("guarded by is_some");
                    if me.cast(GatewayMsg::UdpData { flow, bytes: buf[..n].to_vec(), permit: p }).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Sends `query` to the resolver and waits for the answer with `id` from its address.
async fn ask_upstream(dialer: &Dialer, server: SocketAddr, id: u16, query: &[u8]) -> Option<Vec<u8>> {
    let sock = match dialer.resolver(server).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no socket to the upstream resolver: {e}");
            return None;
        }
    };
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; DNS_MAX];
    tokio::time::timeout(DNS_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await.ok()?;
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Some(buf[..n].to_vec());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The host's first resolver, from `/etc/resolv.conf`.
pub fn host_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver")).then(|| w.next()?.parse::<IpAddr>().ok()).flatten().map(|ip| (ip, 53).into())
    })
}

/// The classifier for the host as it is now: the operator's [`Extras`] (from the
/// environment), every address of its interfaces (`host`) and
/// the networks its other-than-loopback interfaces are on (`host-lan`; prefixes shorter than
/// /8 or, for IPv6, /32 are ignored: no LAN is that wide).
pub fn host_view() -> Classifier {
    HostView::current().classifier()
}

/// Watches the host's addresses (rtnetlink `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`) on a
/// thread of its own: any change tells the actor, which reads [`host_view`] again. The
/// thread looks at `stop` at least once a second. Without netlink (a kernel or sandbox
/// that refuses it) the dial point's fresh look is what remains.
fn watch_host(me: ActorRef<GatewayMsg>, stop: Arc<std::sync::atomic::AtomicBool>) {
    use nix::sys::socket::{
        bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;
    let fd = match socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("no netlink: the host's addresses are read again at each dial only: {e}");
            return;
        }
    };
    if bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0x10 | 0x100)).is_err()
        || setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(1, 0)).is_err()
    {
        return;
    }
    let spawned = std::thread::Builder::new().name("msb-net-hostwatch".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // The content does not matter, only that something changed.
            if recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).is_ok_and(|n| n > 0) {
                // Changes come in bursts (an address and its routes): let them settle.
                std::thread::sleep(Duration::from_millis(50));
                while recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
                if me.cast(GatewayMsg::HostChanged).is_err() {
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the host's addresses: {e}");
    }
}

/// Starts the loop of a published port (bound already) for guest port `guest`: accepting
/// host clients (TCP) or receiving host peers' datagrams (UDP, at most [`UDP_QUEUE`] ahead
/// of the actor per port; the kernel's socket buffer drops the rest).
fn listen(me: &ActorRef<GatewayMsg>, l: PortListener, guest: u16) -> std::io::Result<Listening> {
    let (proto, host) = (l.proto(), l.local_addr()?);
    let me = me.clone();
    let task = match l {
        PortListener::Tcp(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = l.accept().await else {
                        // Out of fds or the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if me.cast(GatewayMsg::Inbound { guest_port: guest, stream }).is_err() {
                        return;
                    }
                }
            })
        }
        PortListener::Udp(u) => {
            u.set_nonblocking(true)?;
            let sock = Arc::new(UdpSocket::from_std(u)?);
            let permits = Arc::new(tokio::sync::Semaphore::new(UDP_QUEUE));
            tokio::spawn(async move {
                let mut buf = vec![0u8; UDP_MAX];
                loop {
                    let Ok(permit) = permits.clone().acquire_owned().await else { return };
                    // An error (ECONNREFUSED after an ICMP unreachable) is consumed.
                    let Ok((n, peer)) = sock.recv_from(&mut buf).await else { continue };
                    let msg = GatewayMsg::InboundUdp {
                        guest_port: guest,
                        sock: sock.clone(),
                        peer,
                        bytes: buf[..n].to_vec(),
                        permit,
                    };
                    if me.cast(msg).is_err() {
                        return;
                    }
                }
            })
        }
    };
    Ok(Listening { proto, host, guest, task: task.abort_handle() })
}

impl Actor for NetGateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(&self, me: ActorRef<GatewayMsg>, a: GatewayArgs) -> Result<GatewayState, ActorProcessingErr> {
        // The operator's extra addresses: a malformed list fails the start, saying which.
        Extras::from_env()?;
        let mut core = Gateway::new(a.net, a.policy, a.dialer.host_view().await.classifier(), a.seed, 0);
        core.set_limits(a.limits, 0);
        let interceptor = a.secrets.map(|s| {
            core.set_secret_hosts(s.hosts);
            core.set_placeholders(watched(s.placeholders));
            s.interceptor
        });
        let mut listeners = Vec::new();
        for (l, guest_port) in a.published {
            listeners.push(listen(&me, l, guest_port)?);
        }
        let host_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Behind a dialer this process has no network of its own to watch (and may not
        // make the socket): the host's addresses come with each socket the dialer opens.
        if !a.dialer.is_remote() {
            watch_host(me.clone(), host_watch.clone());
        }
        Ok(GatewayState {
            me,
            core,
            start: Instant::now(),
            shell: None,
            credit: NET_FRAME_WINDOW,
            flows: HashMap::new(),
            upstream: a.upstream_dns.or_else(host_resolver),
            audit: AuditLog::open(a.sandbox, a.audit.as_ref()),
            timer: None,
            timer_gen: 0,
            refused: 0,
            listeners,
            interceptor,
            peers: HashMap::new(),
            host_watch,
            dialer: a.dialer,
        })
    }

    async fn post_stop(&self, _: ActorRef<GatewayMsg>, st: &mut GatewayState) -> Result<(), ActorProcessingErr> {
        for l in &st.listeners {
            l.task.abort();
        }
        st.host_watch.store(true, std::sync::atomic::Ordering::Relaxed);
        st.flows.clear();
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        st: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.now();
        match msg {
            GatewayMsg::Attach(shell) => st.shell = Some(shell),
            GatewayMsg::Guest(g) => {
                st.credit = (st.credit + g.delivered).min(NET_FRAME_WINDOW);
                let n = g.frames.len();
                for frame in g.frames {
                    if !st.core.has_room() {
                        // The core's queue is full: run it, then try once more.
                        st.core.poll(now);
                    }
                    if !st.core.has_room() || !st.core.guest_frame(frame, now) {
                        st.refused += 1;
                    }
                }
                if n > 0 {
                    if let Some(shell) = &st.shell {
                        let _ = shell.send_message(ToNet::Credit(n));
                    }
                }
            }
            GatewayMsg::Control(NetControl::SetPolicy { policy, reply }) => match Policy::parse(&policy) {
                Ok(p) => {
                    st.core.set_policy(p, now);
                    let _ = reply.send(Ok(()));
                }
                Err(e) => drop(reply.send(Err(e.to_string()))),
            },
            GatewayMsg::Control(NetControl::Policy(reply)) => drop(reply.send(st.core.policy().to_string())),
            GatewayMsg::Control(NetControl::Publish { listener, guest, reply }) => {
                let r = if st.listeners.len() >= MAX_PUBLISHED {
                    Err(format!("at most {MAX_PUBLISHED} published ports per sandbox"))
                } else {
                    listen(&st.me, listener, guest).map(|l| st.listeners.push(l)).map_err(|e| e.to_string())
                };
                let _ = reply.send(r);
            }
            GatewayMsg::Control(NetControl::SecretHosts { hosts, placeholders, reply }) => {
                st.core.set_secret_hosts(hosts);
                st.core.set_placeholders(watched(placeholders));
                let _ = reply.send(());
            }
            GatewayMsg::Control(NetControl::Unpublish { proto, guest, reply }) => {
                let mut closed = Vec::new();
                st.listeners.retain(|l| {
                    if (l.proto, l.guest) != (proto, guest) {
                        return true;
                    }
                    l.task.abort();
                    closed.push(l.host);
                    false
                });
                // A UDP port's peers go with it, so its socket closes now and the address
                // can be published again.
                let gone: Vec<FlowId> = st
                    .flows
                    .iter()
                    .filter(|(_, f)| matches!(&f.tx, FlowTx::Peer { local, .. } if closed.contains(local)))
                    .map(|(id, _)| *id)
                    .collect();
                for flow in gone {
                    st.core.host_failed(flow);
                }
                let _ = reply.send(closed);
            }
            GatewayMsg::Tick(generation) => {
                if st.timer.is_some_and(|(g, _)| g == generation) {
                    st.timer = None;
                }
            }
            GatewayMsg::HostChanged => st.core.set_classifier(host_view(), now),
            GatewayMsg::Connected { flow, peer, view } => {
                // The host as it was at the dial: an address it took since the last look is
                // `host`.
                st.core.set_classifier(view.classifier(), now);
                if st.core.dial_point(flow, peer, now) {
                    st.core.host_connected(flow, FLOW_BUFFER);
                } else {
                    st.flows.remove(&flow);
                }
            }
            GatewayMsg::Tls { flow, report } => {
                let stop = matches!(report, crate::tls::TlsReport::Stop { .. });
                st.audit.record_tls(flow, &report);
                if stop {
                    // The supervisor takes the VM down when the gateway stops.
                    st.me.stop(Some(format!(
                        "a secret's placeholder went where on-violation=stop forbids ({report:?})"
                    )));
                }
            }
            GatewayMsg::Failed { flow } => {
                st.core.host_failed(flow);
                st.flows.remove(&flow);
            }
            GatewayMsg::UdpConnected { flow, peer, view, go } => {
                st.core.set_classifier(view.classifier(), now);
                let ok = st.core.udp_dial_point(flow, peer, now);
                let _ = go.send(ok);
                if !ok {
                    st.flows.remove(&flow);
                }
            }
            GatewayMsg::UdpData { flow, bytes, permit } => {
                st.core.udp_reply(flow, &bytes, now);
                drop(permit);
            }
            GatewayMsg::HostData { flow, bytes, taken } => {
                let took = st.core.host_data(flow, &bytes, now);
                match st.flows.get_mut(&flow) {
                    Some(f) if took < bytes.len() => f.parked = Some((bytes, took, taken)),
                    _ => drop(taken.send(())),
                }
            }
            GatewayMsg::HostDone { flow } => match st.flows.get_mut(&flow) {
                Some(f) if f.parked.is_some() => f.done = true,
                _ => st.core.host_done(flow),
            },
            GatewayMsg::Written { flow, bytes } => st.core.grant(flow, bytes),
            GatewayMsg::Dns { lookup, answer } => st.core.dns_reply(lookup, answer.as_deref(), now),
            GatewayMsg::Inbound { guest_port, stream } => {
                // No flow (the table is full): the client's connection is dropped.
                if let Some(flow) = st.core.inbound(guest_port, FLOW_BUFFER, now) {
                    st.start_flow(flow, HostEnd::Accepted(stream));
                }
            }
            GatewayMsg::InboundUdp { guest_port, sock, peer, bytes, permit } => {
                st.inbound_udp(guest_port, sock, peer, &bytes, now);
                drop(permit);
            }
        }
        st.run();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
