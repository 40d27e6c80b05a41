//! The dialer: the host sockets of a locked-down sandbox process, opened outside its jail.
//!
//! A locked-down sandbox process lives in an empty network namespace and may not make
//! sockets. Its gateway asks a small per-sandbox process in the host's network namespace
//! (`msb dialer`, [`serve`]) for each host socket it needs — a TCP connection, a connected
//! UDP socket, a socket to the upstream resolver, a published port's listener — over a
//! `SOCK_SEQPACKET` pair, and gets the socket back over `SCM_RIGHTS`. [`Dialer`] is the
//! gateway's side; [`Dialer::Direct`] opens sockets in-process (an unconfined sandbox, the
//! actor API, tests).
//!
//! Invariants:
//! - The dialer decides on its own: the sandbox process asks, it never grants. A destination
//!   the one classifier calls anything but `public` (with the host's addresses as the dialer
//!   sees them, read afresh for each request) is opened only if a policy in the trusted
//!   [`Grants`] could allow it ([`Policy::could_allow`]); the address actually connected is
//!   decided again the same way before the socket is handed over. The grants are written by
//!   the starting process before its lockdown and by the client on each change, in a file
//!   the jail does not contain.
//! - Upstream DNS goes only to the resolver the dialer was started with: the asker names none.
//! - A listener is bound only at an address and protocol the grants publish (port 0 only
//!   where a grant says 0).
//! - Bounded: a request is at most [`MAX_MESSAGE`] bytes (a longer one is dropped); at most
//!   [`MAX_IN_FLIGHT`] requests are open at once (more wait on the asker's side, and the
//!   dialer reads no further request until one ends); a connection takes at most
//!   [`CONNECT_TIMEOUT`], and an asker waits at most [`ASK_TIMEOUT`] for any answer; a host
//!   view carries at most [`MAX_VIEW`] entries of each kind.
//! - The dialer ends when the sandbox process's end of the pair closes.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use msb_schema::net::{Grants, PortListener, PortProto};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{TcpStream, UdpSocket, UnixStream};
use tokio::sync::{oneshot, Semaphore};

use crate::classify::{Classifier, Extras, Group};
use crate::policy::{Policy, Proto};

pub use crate::actor::CONNECT_TIMEOUT;

/// Largest request or reply.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most requests open at once per sandbox.
pub const MAX_IN_FLIGHT: usize = 256;
/// Longest the gateway waits for any answer of the dialer.
pub const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(CONNECT_TIMEOUT.as_secs() + 5);
/// Most host addresses (and, separately, networks) in one host view.
pub const MAX_VIEW: usize = 512;

/// Whether `proto` to `addr` is within what one of `grants`' policies could allow.
fn grants_allow(grants: &Grants, c: &Classifier, proto: Proto, addr: SocketAddr) -> bool {
    grants.policies.iter().any(|text| {
        let policy = match text {
            None => Ok(Policy::default()),
            Some(t) => Policy::parse(t),
        };
        policy.is_ok_and(|p| p.could_allow(c, proto, addr.ip(), addr.port()))
    })
}

/// The host's addresses, as the dialer sees them from the host's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Every address of the host's interfaces.
    pub host: Vec<IpAddr>,
    /// The networks its other-than-loopback interfaces are on (prefixes shorter than /8 or,
    /// for IPv6, /32 left out: no LAN is that wide).
    pub lans: Vec<(IpAddr, u8)>,
}

impl HostView {
    /// The host as it is now (nothing, where its interfaces cannot be read).
    pub fn current() -> HostView {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return HostView::default() };
        let mut view = HostView::default();
        for a in addrs {
            let Some(sa) = a.address else { continue };
            let (ip, prefix) = if let Some(v4) = sa.as_sockaddr_in() {
                let p = a.netmask.and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones() as u8));
                (IpAddr::V4(v4.ip()), p.filter(|p| *p >= 8))
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                let p = a.netmask.and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones() as u8));
                (IpAddr::V6(v6.ip()), p.filter(|p| *p >= 32))
            } else {
                continue;
            };
            view.host.push(ip);
            if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK) {
                if let Some(p) = prefix {
                    view.lans.push((ip, p));
                }
            }
        }
        view.host.truncate(MAX_VIEW);
        view.lans.truncate(MAX_VIEW);
        view
    }

    /// The classifier for this view, with the operator's [`Extras`] from the environment.
    pub fn classifier(&self) -> Classifier {
        let lans: Vec<ipnet::IpNet> = self.lans.iter().filter_map(|&(ip, p)| ipnet::IpNet::new(ip, p).ok()).collect();
        // Checked when the gateway starts (a bad list fails the start): here it parses.
        let extras = Extras::from_env().unwrap_or_default();
        Classifier::with_lans(self.host.iter().copied().take(MAX_VIEW), lans).with_extras(extras)
    }
}

/// One request to the dialer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Ask {
    /// A TCP connection to this address.
    Tcp(SocketAddr),
    /// A UDP socket connected to this address.
    Udp(SocketAddr),
    /// A UDP socket connected to the dialer's upstream resolver.
    Dns,
    /// A listener bound at this address.
    Bind(PortProto, SocketAddr),
    /// The host's addresses.
    View,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    id: u64,
    ask: Ask,
}

/// What came back: the address reached or bound, and the host as the dialer saw it then.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Answer {
    addr: Option<SocketAddr>,
    view: Option<HostView>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    id: u64,
    result: Result<Answer, String>,
}

/// A socket the dialer handed over, with what it said about it.
pub struct Opened<S> {
    pub socket: S,
    /// The address reached (a connection) or bound (a listener).
    pub addr: SocketAddr,
    /// The host's addresses, as seen when the socket was opened.
    pub view: HostView,
}

/// Where the gateway's host sockets come from.
#[derive(Clone, Default)]
pub enum Dialer {
    /// Opened in this process (no lockdown: the actor API, an unconfined sandbox, tests).
    #[default]
    Direct,
    /// Asked of a dialer process over a socket pair.
    Remote(Arc<Remote>),
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_remote() { "Dialer::Remote" } else { "Dialer::Direct" })
    }
}

/// Who waits for the reply to one request: the answer and the socket it carried, or why not.
type Waiter = oneshot::Sender<Result<(Answer, Option<OwnedFd>), String>>;

/// The gateway's end of a dialer's socket pair.
pub struct Remote {
    fd: UnixStream,
    pending: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
    slots: Semaphore,
    gone: AtomicBool,
}

fn any_local(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

impl Dialer {
    /// The gateway's side of a dialer, over `sock` (its end of a `SOCK_SEQPACKET` pair).
    /// Must be called inside a tokio runtime (a task reads the replies).
    pub fn remote(sock: OwnedFd) -> io::Result<Dialer> {
        let remote = Arc::new(Remote {
            fd: seqpacket(sock)?,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            gone: AtomicBool::new(false),
        });
        tokio::spawn(remote.clone().read_replies());
        Ok(Dialer::Remote(remote))
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Dialer::Remote(_))
    }

    /// A TCP connection to `addr`.
    pub async fn tcp(&self, addr: SocketAddr) -> io::Result<Opened<TcpStream>> {
        match self {
            Dialer::Direct => {
                let socket = TcpStream::connect(addr).await?;
                let addr = socket.peer_addr()?;
                Ok(Opened { socket, addr, view: HostView::current() })
            }
            Dialer::Remote(r) => {
                let (answer, fd) = r.ask(Ask::Tcp(addr)).await?;
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                let socket = TcpStream::from_std(std)?;
                let addr = socket.peer_addr()?;
                Ok(Opened { socket, addr, view: answer.view.unwrap_or_default() })
            }
        }
    }

    /// A UDP socket connected to `addr`.
    pub async fn udp(&self, addr: SocketAddr) -> io::Result<Opened<UdpSocket>> {
        match self {
            Dialer::Direct => {
                let socket = UdpSocket::bind(any_local(addr)).await?;
                socket.connect(addr).await?;
                let addr = socket.peer_addr()?;
                Ok(Opened { socket, addr, view: HostView::current() })
            }
            Dialer::Remote(r) => {
                let (answer, fd) = r.ask(Ask::Udp(addr)).await?;
                let socket = udp_from(fd)?;
                let addr = socket.peer_addr()?;
                Ok(Opened { socket, addr, view: answer.view.unwrap_or_default() })
            }
        }
    }

    /// A UDP socket connected to the upstream resolver: `server` in-process; the dialer's
    /// own resolver (chosen by the trusted side at start) otherwise.
    pub async fn resolver(&self, server: SocketAddr) -> io::Result<UdpSocket> {
        match self {
            Dialer::Direct => {
                let socket = UdpSocket::bind(any_local(server)).await?;
                socket.connect(server).await?;
                Ok(socket)
            }
            Dialer::Remote(r) => udp_from(r.ask(Ask::Dns).await?.1),
        }
    }

    /// A published port's listener, bound at `addr`.
    pub async fn bind(&self, proto: PortProto, addr: SocketAddr) -> io::Result<PortListener> {
        match self {
            Dialer::Direct => PortListener::bind(proto, addr),
            Dialer::Remote(r) => {
                let fd = r.ask(Ask::Bind(proto, addr)).await?.1;
                Ok(match proto {
                    PortProto::Tcp => PortListener::Tcp(std::net::TcpListener::from(fd)),
                    PortProto::Udp => PortListener::Udp(std::net::UdpSocket::from(fd)),
                })
            }
        }
    }

    /// The host's addresses now.
    pub async fn host_view(&self) -> HostView {
        match self {
            Dialer::Direct => HostView::current(),
            Dialer::Remote(r) => match r.ask_raw(Ask::View).await {
                Ok((a, _)) => a.view.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!("the dialer gave no host view: {e}");
                    HostView::default()
                }
            },
        }
    }
}

/// A `SOCK_SEQPACKET` socket on the runtime's reactor. Tokio has no type of its own for one;
/// its Unix stream type only registers the descriptor, and every read and write here goes
/// through `async_io` with the message calls, so the stream semantics are never used.
fn seqpacket(sock: OwnedFd) -> io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(sock);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

fn udp_from(fd: OwnedFd) -> io::Result<UdpSocket> {
    let std = std::net::UdpSocket::from(fd);
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

impl Remote {
    /// Sends one request and waits for its reply, which must carry a socket.
    async fn ask(&self, ask: Ask) -> io::Result<(Answer, OwnedFd)> {
        match self.ask_raw(ask).await? {
            (answer, Some(fd)) => Ok((answer, fd)),
            (_, None) => Err(io::Error::other("the dialer sent no socket")),
        }
    }

    async fn ask_raw(&self, ask: Ask) -> io::Result<(Answer, Option<OwnedFd>)> {
        let _slot = self.slots.acquire().await.map_err(io::Error::other)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().map_err(|_| io::Error::other("dialer table poisoned"))?.insert(id, tx);
        let forget = || {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
        };
        if self.gone.load(Ordering::Acquire) {
            forget();
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the dialer is gone"));
        }
        let bytes = serde_json::to_vec(&Request { id, ask }).map_err(io::Error::other)?;
        let sent = self
            .fd
            .async_io(Interest::WRITABLE, || {
                rustix::net::send(&self.fd, &bytes, SendFlags::NOSIGNAL).map_err(io::Error::from)
            })
            .await;
        if let Err(e) = sent {
            forget();
            return Err(e);
        }
        // The dialer answers every request within its connect timeout; one that does not is
        // stuck, and its askers must not wait forever (they hold in-flight slots).
        match tokio::time::timeout(ASK_TIMEOUT, rx).await {
            Ok(Ok(Ok(x))) => Ok(x),
            Ok(Ok(Err(why))) => Err(refused(why)),
            Ok(Err(_)) => Err(io::Error::new(io::ErrorKind::BrokenPipe, "the dialer is gone")),
            Err(_) => {
                forget();
                Err(io::Error::new(io::ErrorKind::TimedOut, "the dialer did not answer"))
            }
        }
    }

    async fn read_replies(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let got = self
                .fd
                .async_io(Interest::READABLE, || {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
                    let r = rustix::net::recvmsg(
                        &self.fd,
                        &mut [IoSliceMut::new(&mut buf)],
                        &mut cmsg,
                        RecvFlags::CMSG_CLOEXEC,
                    )?;
                    let mut fds = Vec::new();
                    for m in cmsg.drain() {
                        if let RecvAncillaryMessage::ScmRights(passed) = m {
                            fds.extend(passed);
                        }
                    }
                    Ok((r.bytes, fds))
                })
                .await;
            let (n, mut fds) = match got {
                Ok((n, fds)) if n > 0 => (n, fds),
                _ => break,
            };
            let Ok(reply) = serde_json::from_slice::<Reply>(&buf[..n.min(buf.len())]) else {
                tracing::warn!("the dialer sent an unreadable reply ({n} bytes)");
                continue;
            };
            let fd = if fds.len() == 1 { fds.pop() } else { None };
            let tx = self.pending.lock().ok().and_then(|mut p| p.remove(&reply.id));
            if let Some(tx) = tx {
                let _ = tx.send(reply.result.map(|a| (a, fd)));
            }
        }
        self.gone.store(true, Ordering::Release);
        if let Ok(mut p) = self.pending.lock() {
            for (_, tx) in p.drain() {
                let _ = tx.send(Err("the dialer is gone".into()));
            }
        }
        tracing::warn!("the dialer's socket closed: no new host sockets from now on");
    }
}

/// What a dialer process is started with (by the trusted side, before any lockdown).
#[derive(Debug, Clone)]
pub struct Config {
    /// The grants file ([`Grants`]).
    pub grants: PathBuf,
    /// The upstream resolver lookups go to.
    pub resolver: Option<SocketAddr>,
}

/// Runs a dialer over `sock` (its end of the pair) until the other end closes.
pub fn serve(sock: OwnedFd, config: Config) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve_async(sock, config))
}

/// [`serve`] on the caller's runtime.
pub async fn serve_async(sock: OwnedFd, config: Config) -> io::Result<()> {
    let fd = Arc::new(seqpacket(sock)?);
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    // Requests dropped so far: the first few are logged, then one line per thousand (the
    // asker may be hostile, and the log is a file).
    let mut dropped = 0u64;
    let mut drop_one = |why: String| {
        dropped += 1;
        if dropped <= 8 || dropped.is_multiple_of(1000) {
            tracing::warn!("dialer: a request was dropped ({dropped} so far): {why}");
        }
    };
    loop {
        let permit = slots.clone().acquire_owned().await.map_err(io::Error::other)?;
        // Descriptors sent along with a request are refused by the kernel (no room for them).
        let n = fd
            .async_io(Interest::READABLE, || {
                rustix::net::recv(&*fd, &mut buf[..], RecvFlags::empty()).map(|(n, _)| n).map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_MESSAGE {
            drop_one(format!("more than {MAX_MESSAGE} bytes"));
            continue;
        }
        let req: Request = match serde_json::from_slice(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                drop_one(format!("unreadable: {e}"));
                continue;
            }
        };
        let (fd, config) = (fd.clone(), config.clone());
        tokio::spawn(async move {
            let (result, socket) = match answer(&config, req.ask).await {
                Ok((a, s)) => (Ok(a), s),
                Err(why) => (Err(why), None),
            };
            send_reply(&fd, &Reply { id: req.id, result }, socket.as_ref().map(|s| s.as_fd())).await;
            drop(permit);
        });
    }
}

async fn send_reply(fd: &UnixStream, reply: &Reply, socket: Option<BorrowedFd<'_>>) {
    let Ok(bytes) = serde_json::to_vec(reply) else { return };
    let passed: Vec<BorrowedFd<'_>> = socket.into_iter().collect();
    let r = fd
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            if !passed.is_empty() {
                cmsg.push(SendAncillaryMessage::ScmRights(&passed));
            }
            rustix::net::sendmsg(fd, &[IoSlice::new(&bytes)], &mut cmsg, SendFlags::NOSIGNAL).map_err(io::Error::from)
        })
        .await;
    if let Err(e) = r {
        // Only when the sandbox process is gone or stopped reading: it ends the dialer soon.
        tracing::debug!("dialer: a reply could not be sent: {e}");
    }
}

/// The floor: a destination that is not public needs a grant.
fn check(config: &Config, c: &Classifier, proto: Proto, addr: SocketAddr) -> Result<(), String> {
    let group = c.classify(addr.ip());
    if group == Group::Public || grants_allow(&Grants::read(&config.grants), c, proto, addr) {
        return Ok(());
    }
    Err(format!("the dialer refused {addr} ({}): no network policy of this sandbox could allow it", group.name()))
}

async fn answer(config: &Config, ask: Ask) -> Result<(Answer, Option<OwnedFd>), String> {
    let failed = |what: &str, e: io::Error| format!("{what}: {e}");
    match ask {
        Ask::Tcp(addr) => {
            check(config, &HostView::current().classifier(), Proto::Tcp, addr)?;
            let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(r) => r.map_err(|e| failed("connecting", e))?,
                Err(_) => return Err(format!("connecting to {addr}: timed out")),
            };
            let peer = s.peer_addr().map_err(|e| failed("reading the peer", e))?;
            // The dial point: what was actually reached, with the host as it is now.
            let view = HostView::current();
            check(config, &view.classifier(), Proto::Tcp, peer)?;
            let fd = s.into_std().map_err(|e| failed("handing over", e))?;
            Ok((Answer { addr: Some(peer), view: Some(view) }, Some(fd.into())))
        }
        Ask::Udp(addr) => {
            check(config, &HostView::current().classifier(), Proto::Udp, addr)?;
            let s = std::net::UdpSocket::bind(any_local(addr)).map_err(|e| failed("binding", e))?;
            s.connect(addr).map_err(|e| failed("connecting", e))?;
            let peer = s.peer_addr().map_err(|e| failed("reading the peer", e))?;
            let view = HostView::current();
            check(config, &view.classifier(), Proto::Udp, peer)?;
            Ok((Answer { addr: Some(peer), view: Some(view) }, Some(s.into())))
        }
        Ask::Dns => {
            let server = config.resolver.ok_or("this dialer has no upstream resolver")?;
            let s = std::net::UdpSocket::bind(any_local(server)).map_err(|e| failed("binding", e))?;
            s.connect(server).map_err(|e| failed("connecting to the resolver", e))?;
            Ok((Answer { addr: Some(server), view: None }, Some(s.into())))
        }
        Ask::Bind(proto, addr) => {
            if !Grants::read(&config.grants).publish.contains(&(proto, addr)) {
                return Err(format!(
                    "the dialer refused to bind {addr}/{proto}: no published port of this sandbox is there"
                ));
            }
            let l = PortListener::bind(proto, addr).map_err(|e| failed(&format!("binding {addr}/{proto}"), e))?;
            let local = l.local_addr().map_err(|e| failed("reading the bound address", e))?;
            let fd: OwnedFd = match l {
                PortListener::Tcp(t) => t.into(),
                PortListener::Udp(u) => u.into(),
            };
            Ok((Answer { addr: Some(local), view: None }, Some(fd)))
        }
        Ask::View => Ok((Answer { addr: None, view: Some(HostView::current()) }, None)),
    }
}

#[cfg(test)]
pub(crate) mod tests;
