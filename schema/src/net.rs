//! Messages between the virtio-net shell and the network gateway, and the gateway's
//! control vocabulary.
//!
//! - The virtio-net shell sends the gateway [`GuestFrames`] and nothing else; the gateway
//!   sends the shell [`ToNet`] and nothing else. Both directions are credit-bounded in
//!   frames: at most [`NET_FRAME_WINDOW`] guest frames are in flight towards the gateway
//!   (the shell stops taking transmit buffers past it, which pushes back on the guest), and
//!   the gateway sends at most [`NET_FRAME_WINDOW`] frames the guest has not yet taken.
//! - The supervisor and the control plane send the gateway [`NetControl`].
//!
//! Invariant: every frame here is a whole Ethernet frame of [`MIN_FRAME`]..=[`MAX_FRAME`]
//! bytes, copied out of guest memory before anything looks at it.

use ractor::RpcReplyPort;

/// Most frames in flight each way between the virtio-net shell and the gateway.
pub const NET_FRAME_WINDOW: usize = 256;
/// Most published ports per sandbox.
pub const MAX_PUBLISHED: usize = 64;
/// Smallest and largest Ethernet frame (no FCS; MTU 1500).
pub const MIN_FRAME: usize = 14;
pub const MAX_FRAME: usize = 1514;

/// Guest-to-host frames, and how many host-to-guest frames the guest has taken since the
/// last report (the gateway's send credit).
#[derive(Debug, Default)]
pub struct GuestFrames {
    pub frames: Vec<Vec<u8>>,
    pub delivered: usize,
}

/// What the gateway may send the virtio-net shell.
#[derive(Debug)]
pub enum ToNet {
    /// Frames for the guest (at most the credit the shell reported).
    Frames(Vec<Vec<u8>>),
    /// The gateway took this many guest frames.
    Credit(usize),
}

/// What the control side may ask of the gateway.
#[derive(Debug)]
pub enum NetControl {
    /// Replaces the egress policy (policy-file text); flows the new policy denies are reset.
    /// Answered with the parse error, if any (then nothing changed).
    SetPolicy { policy: String, reply: RpcReplyPort<Result<(), String>> },
    /// The policy in force, as policy-file text.
    Policy(RpcReplyPort<String>),
    /// Publishes a port: host clients of `listener` (bound already, by the caller) reach
    /// the guest's `guest` port over the listener's protocol. Refused past [`MAX_PUBLISHED`]
    /// ports.
    Publish { listener: PortListener, guest: u16, reply: RpcReplyPort<Result<(), String>> },
    /// Closes the published `proto` ports leading to guest port `guest`; answered with the
    /// host addresses closed. TCP connections already made through them stay; a UDP port's
    /// peers go with it (its socket closes, so the address can be bound again).
    Unpublish { proto: PortProto, guest: u16, reply: RpcReplyPort<Vec<std::net::SocketAddr>> },
    /// The hosts the sandbox's secrets may go to now (TLS flows to them are intercepted
    /// from the next flow on), and the placeholders to look for in what leaves in the clear
    /// (name, placeholder, what a misplaced one does).
    SecretHosts {
        hosts: Vec<crate::secret::SecretHost>,
        placeholders: Vec<(crate::secret::SecretName, crate::secret::Placeholder, crate::secret::OnViolation)>,
        reply: RpcReplyPort<()>,
    },
}

/// The protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProto {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for PortProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortProto::Tcp => "tcp",
            PortProto::Udp => "udp",
        })
    }
}

/// One published port: its protocol, the host address (port 0: any free one, until bound)
/// and the guest port it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub proto: PortProto,
    pub host: std::net::SocketAddr,
    pub guest: u16,
}

/// A published port's host socket, bound by the caller before the gateway sees it (so a
/// taken address fails the caller, not the gateway).
#[derive(Debug)]
pub enum PortListener {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl PortListener {
    /// Binds `proto` on `host`.
    pub fn bind(proto: PortProto, host: std::net::SocketAddr) -> std::io::Result<PortListener> {
        Ok(match proto {
            PortProto::Tcp => PortListener::Tcp(std::net::TcpListener::bind(host)?),
            PortProto::Udp => PortListener::Udp(std::net::UdpSocket::bind(host)?),
        })
    }

    /// The address bound (with the port picked for a port 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            PortListener::Tcp(l) => l.local_addr(),
            PortListener::Udp(u) => u.local_addr(),
        }
    }

    pub fn proto(&self) -> PortProto {
        match self {
            PortListener::Tcp(_) => PortProto::Tcp,
            PortListener::Udp(_) => PortProto::Udp,
        }
    }
}

/// Most policies a grants file holds (the one in force and the ones being changed to).
pub const MAX_GRANT_POLICIES: usize = 8;

/// What the trusted side allows the dialer to open beyond the public internet: every policy
/// the sandbox may have in force (while a change is under way, the old and the new one), and
/// the published ports. Kept as JSON in a file only the client and the dialer see (never
/// inside a sandbox process's jail). At most [`MAX_GRANT_POLICIES`] policies and
/// [`MAX_PUBLISHED`] ports are read back.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grants {
    /// Policy-file texts; `None` is the default policy.
    pub policies: Vec<Option<String>>,
    /// Addresses a listener may be bound at.
    pub publish: Vec<(PortProto, std::net::SocketAddr)>,
}

impl Grants {
    /// Reads the grants at `path`; a missing or unreadable file grants nothing (only public
    /// destinations, no listener).
    pub fn read(path: &std::path::Path) -> Grants {
        let mut g: Grants = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        g.policies.truncate(MAX_GRANT_POLICIES);
        g.publish.truncate(MAX_PUBLISHED * 2);
        g
    }

    /// Writes the grants at `path` whole (a new file renamed into place, mode 0600).
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("new");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}
