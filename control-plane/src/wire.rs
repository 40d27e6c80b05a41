//! The contract between a client (the `msb` CLI or the Rust SDK) and a sandbox process.
//!
//! - Launch: the client starts `msb __sandbox-process` and writes one JSON [`Launch`] line to
//!   its stdin (never argv or the environment); the process answers with one JSON
//!   [`Announce`] line on stdout once it is up, or with why it is not.
//! - Control socket (`$MSB_HOME/sandboxes/NAME/ctl.sock`, mode 0600, [`paths`]): framing is
//!   the guest protocol's (4-byte length + postcard, at most [`msb_protocol::MAX_FRAME`] per
//!   frame, checked before buffering). One connection carries one request: an exec session
//!   (then stdin, signals and resizes from the client; [`ExecEvent`]s from the sandbox), a
//!   stop, a release or an info query. A client that closes an exec connection detaches: the
//!   command keeps running and its output goes on to the sandbox's exec log.
//!
//! The exec payloads are `msb_schema`'s: the same [`ExecSpec`] and [`ExecEvent`] the
//! in-process API uses, so an error keeps its kind across the socket.

use std::path::{Path, PathBuf};

use msb_protocol::{decode, encode, FrameDecoder, WinSize};
pub use msb_schema::fs::{FileOwner, HostIdentity, MountSpec};
use msb_schema::net::{Port, PortProto};
use msb_schema::{ExecEvent, ExecSpec, SandboxName, StopReason};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

/// From a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Starts an exec session (first message of the connection). `spec.stdin` is not used:
    /// input follows as [`ClientMsg::Stdin`] when `keep_stdin`, else stdin is closed at once.
    Exec {
        spec: ExecSpec,
        keep_stdin: bool,
    },
    /// Stdin for the session; empty closes it.
    Stdin(Vec<u8>),
    Signal(i32),
    Resize(WinSize),
    /// Stops the sandbox: gracefully within `graceful_ms`, then forced; `None` kills at once.
    Stop {
        graceful_ms: Option<u64>,
    },
    Info,
    /// Replaces the egress policy of the running sandbox (policy-file text; `None`: the
    /// default policy); flows the new policy denies are closed. Answered with [`ServerMsg::Policy`] (the policy now in
    /// force) or [`ServerMsg::Refused`] (why not; the old policy stays).
    SetPolicy {
        policy: Option<String>,
    },
    /// The egress policy in force. Answered with [`ServerMsg::Policy`].
    Policy,
    /// Publishes a port on the running sandbox. Answered with [`ServerMsg::Ports`] (every
    /// published port now) or [`ServerMsg::Refused`].
    Publish(Publish),
    /// Closes the published ports of this protocol leading to this guest port. Answered
    /// with [`ServerMsg::Ports`] (those still published) or [`ServerMsg::Refused`] (none led
    /// there).
    Unpublish {
        guest: u16,
        #[serde(default)]
        proto: PortProto,
    },
    /// An attached sandbox becomes detached: it no longer stops when its owner goes away.
    /// Answered with [`ServerMsg::Released`].
    Release,
    /// Changes a secret of the running sandbox from its next request on. Answered with
    /// [`ServerMsg::Secrets`] (the secrets now, without values) or [`ServerMsg::Refused`].
    Secret(SecretOp),
}

/// A live change to a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecretOp {
    /// A new value.
    Set { name: msb_schema::secret::SecretName, value: WireValue },
    /// New hosts.
    Hosts { name: msb_schema::secret::SecretName, hosts: Vec<msb_schema::secret::SecretHost> },
    /// Forget it.
    Remove { name: msb_schema::secret::SecretName },
    /// Only answer with the secrets as they stand.
    List,
}

/// A secret's value on the control socket (a user-only Unix socket): never in `Debug`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WireValue(pub Vec<u8>);

impl std::fmt::Debug for WireValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes, redacted>", self.0.len())
    }
}

impl Drop for WireValue {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// From the sandbox process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The exec session started; its id names it in the exec log.
    Started {
        id: u64,
    },
    /// Output, the end, or why the session failed.
    Event(ExecEvent),
    /// The sandbox stopped, for this reason.
    Stopped {
        reason: StopReason,
    },
    Info(Info),
    Released,
    /// The egress policy in force, as policy-file text (empty: the sandbox has no network).
    Policy(String),
    /// The published ports, with the host ports picked.
    Ports(Vec<Publish>),
    /// The sandbox's secrets (never their values).
    Secrets(Vec<msb_schema::secret::SecretInfo>),
    /// The request was not served (connection limit, a connection that did not start with a
    /// request); the text says why.
    Refused(String),
}

/// A sandbox process's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub pid: u32,
    /// Create → guest init, from the boot timer.
    pub boot_ms: Option<u64>,
    pub exec_sessions: u64,
    /// What the sandbox process's lockdown applied and what it could not.
    #[serde(default)]
    pub hardening: Hardening,
}

/// The protections a sandbox process runs under (`msb inspect`, `--require-hardening`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardening {
    /// Applied, in order (namespaces, empty root, privileges, Landlock, seccomp).
    pub applied: Vec<String>,
    /// Not applied on this host, each with why.
    pub missing: Vec<String>,
}

/// How a named sandbox is built each time it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxConfig {
    /// The root file system: an image of the local store (its normalized reference), or
    /// `None` (or `"base"`) for the built-in busybox initramfs.
    pub image: Option<String>,
    /// Size of the writable root disk of an image sandbox, in MiB (default
    /// [`DEFAULT_ROOT_DISK_MIB`]); sparse, so only what the guest writes uses host disk.
    #[serde(default)]
    pub root_disk_mib: Option<u64>,
    /// The image's identity (its config digest) when the sandbox was created: its writable
    /// disk is a layer over exactly that root filesystem, so a sandbox whose reference now
    /// names another image refuses to start instead of mixing the two.
    #[serde(default)]
    pub image_id: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub boot_timeout_secs: u64,
    /// The sandbox's network.
    #[serde(default)]
    pub net: NetSettings,
    /// Host directories shared with the sandbox (checked and made absolute when recorded).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Secrets: names, placeholders, hosts and where each value comes from at start (never
    /// the values).
    #[serde(default)]
    pub secrets: Vec<msb_schema::secret::SecretSpec>,
    /// Refuse to start unless every protection of the lockdown is in force
    /// (`--require-hardening`); otherwise a missing one is reported, not fatal.
    #[serde(default)]
    pub require_hardening: bool,
    /// The restricted profile (`--profile restricted`): every command runs as a user other
    /// than root (`nobody` by default), without capabilities and with `no_new_privs`.
    #[serde(default)]
    pub restricted: bool,
    /// A read-only root file system with a writable tmpfs `/tmp` (`--read-only`).
    #[serde(default)]
    pub read_only: bool,
}

/// A sandbox's network, as recorded: whether it has one, the egress policy (policy-file
/// text, checked by the client before it is recorded and parsed again by the sandbox
/// process), and the resolver its gateway asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSettings {
    /// No network device at all (`--net none`).
    #[serde(default)]
    pub none: bool,
    /// The whole policy; `None`: the default (`allow public`, default deny).
    #[serde(default)]
    pub policy: Option<String>,
    /// Where the gateway sends DNS queries (default: the host's resolver).
    #[serde(default)]
    pub dns: Option<std::net::SocketAddr>,
    /// Published ports (TCP and UDP).
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// New flows a second the gateway allows (burst: twice that); `None`: its default.
    #[serde(default)]
    pub conn_rate: Option<u32>,
    /// Bytes a second towards the host (all flows together); `None`: unlimited.
    #[serde(default)]
    pub rate_out: Option<u64>,
    /// Bytes a second towards the guest; `None`: unlimited.
    #[serde(default)]
    pub rate_in: Option<u64>,
    /// PEM files of extra CAs that upstreams of secret hosts may be verified against.
    #[serde(default)]
    pub tls_upstream_ca: Vec<PathBuf>,
}

/// One published port: a host address (127.0.0.1 unless the user named another; port 0
/// picks a free one when the sandbox starts), the guest port it leads to, and the protocol
/// (TCP when a record predates UDP ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub host: std::net::SocketAddr,
    pub guest: u16,
    #[serde(default)]
    pub proto: PortProto,
}

/// Splits a `/tcp` or `/udp` suffix off `spec` (none: TCP).
pub fn split_proto(spec: &str) -> std::result::Result<(&str, PortProto), String> {
    match spec.rsplit_once('/') {
        Some((b, "tcp")) => Ok((b, PortProto::Tcp)),
        Some((b, "udp")) => Ok((b, PortProto::Udp)),
        Some((_, p)) => Err(format!("unknown protocol {p:?} (tcp or udp)")),
        None => Ok((spec, PortProto::Tcp)),
    }
}

/// Parses `GUEST[/tcp|/udp]`, a published port's guest side (as `msb port --rm` takes it).
pub fn parse_guest_port(spec: &str) -> std::result::Result<(u16, PortProto), String> {
    let bad = |why: String| format!("{spec:?}: {why}; write GUEST or GUEST/udp, e.g. 8080 or 53/udp");
    let (port, proto) = split_proto(spec).map_err(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((p, proto)),
        _ => Err(bad(format!("{port:?} is not a port 1..=65535"))),
    }
}

impl From<Port> for Publish {
    fn from(p: Port) -> Publish {
        Publish { host: p.host, guest: p.guest, proto: p.proto }
    }
}

impl From<Publish> for Port {
    fn from(p: Publish) -> Port {
        Port { host: p.host, guest: p.guest, proto: p.proto }
    }
}

impl Publish {
    /// Parses `[ADDR:]HOST:GUEST[/tcp|/udp]` or `GUEST[/udp]` (docker's `-p`); ADDR defaults
    /// to 127.0.0.1 (an IPv6 one in brackets), HOST 0 or absent picks a free port.
    pub fn parse(spec: &str) -> std::result::Result<Publish, String> {
        let bad = |why: &str| format!("-p {spec:?}: {why}; write [ADDR:]HOST:GUEST[/udp] or GUEST, e.g. 8080:80");
        let (body, proto) = split_proto(spec).map_err(|e| bad(&e))?;
        let port =
            |p: &str, what: &str| p.parse::<u16>().map_err(|_| bad(&format!("{what} port {p:?} is not 0..=65535")));
        let (addr, rest): (std::net::IpAddr, &str) = match body.strip_prefix('[') {
            Some(v6) => {
                let (a, rest) = v6.split_once("]:").ok_or_else(|| bad("an IPv6 address is [ADDR]:HOST:GUEST"))?;
                (a.parse().map_err(|_| bad(&format!("{a:?} is not an IPv6 address")))?, rest)
            }
            None => match body.matches(':').count() {
                2 => {
                    let (a, rest) = body.split_once(':').expect("counted");
                    (a.parse().map_err(|_| bad(&format!("{a:?} is not an IP address")))?, rest)
                }
                _ => (std::net::Ipv4Addr::LOCALHOST.into(), body),
            },
        };
        let (host, guest) = match rest.split_once(':') {
            Some((h, g)) => (port(h, "the host")?, port(g, "the guest")?),
            None => (0, port(rest, "the guest")?),
        };
        if guest == 0 {
            return Err(bad("the guest port must not be 0"));
        }
        Ok(Publish { host: (addr, host).into(), guest, proto })
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            image: None,
            root_disk_mib: None,
            image_id: None,
            cpus: 1,
            memory_mib: 256,
            kernel: None,
            kernel_args: None,
            boot_timeout_secs: 60,
            net: NetSettings::default(),
            mounts: Vec::new(),
            secrets: Vec::new(),
            require_hardening: false,
            restricted: false,
            read_only: false,
        }
    }
}

#[cfg(test)]
mod mount_tests {
    use super::{check_host_mount, parse_mount, FileOwner, MountSpec, SandboxConfig};

    /// FS2/FS14: a recorded mount is checked again at start and by the SDK: a host path
    /// swapped for a symlink or another directory, a non-canonical path and one inside the
    /// msb home are refused, whoever built the spec.
    #[test]
    fn a_recorded_mount_is_checked_again_by_identity_and_against_the_home() {
        let t = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(t.path()).unwrap();
        let (home, dir) = (base.join("home"), base.join("project"));
        std::fs::create_dir_all(home.join("sandboxes")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let m = parse_mount(&format!("{}:/work", dir.display()), &home).unwrap();
        assert!(m.identity.is_some(), "recorded at create");
        assert_eq!(check_host_mount(m.clone(), &home).unwrap(), m, "the same directory starts");
        std::fs::rename(&dir, base.join("project.old")).unwrap();
        std::os::unix::fs::symlink(base.join("home"), &dir).unwrap();
        let e = check_host_mount(m.clone(), &home).unwrap_err();
        assert!(e.contains("not a canonical path"), "{e}");
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let e = check_host_mount(m.clone(), &home).unwrap_err();
        assert!(e.contains("another directory than the one recorded"), "{e}");
        // The SDK's own specs: the home, a non-canonical path.
        let mut c = SandboxConfig { mounts: vec![MountSpec::new(&home, "/h", true).unwrap()], ..Default::default() };
        assert!(c.check_host_mounts(&home).unwrap_err().to_string().contains("msb home"));
        c.mounts = vec![MountSpec::new(&base.join("project/../project"), "/p", true).unwrap()];
        assert!(c.check_host_mounts(&home).unwrap_err().to_string().contains("canonical"));
        c.mounts = vec![MountSpec::new(&dir, "/p", true).unwrap()];
        c.check_host_mounts(&home).unwrap();
        assert!(c.mounts[0].identity.is_some(), "the SDK's spec gets its identity");
    }

    #[test]
    fn a_mount_names_an_existing_directory_outside_the_home_and_a_clean_guest_path() {
        let t = tempfile::tempdir().unwrap();
        let (home, dir) = (t.path().join("home"), t.path().join("project"));
        std::fs::create_dir_all(home.join("sandboxes")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(t.path().join("file"), b"").unwrap();
        let m = parse_mount(&format!("{}:/work", dir.display()), &home).unwrap();
        assert_eq!((m.host, m.guest.as_str(), m.read_only), (std::fs::canonicalize(&dir).unwrap(), "/work", false));
        assert!(parse_mount(&format!("{}:/work:ro", dir.display()), &home).unwrap().read_only);
        let refused = |spec: String, why: &str| {
            let e = parse_mount(&spec, &home).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
        };
        refused(format!("{}/missing:/work", t.path().display()), "No such file");
        refused(format!("{}/file:/work", t.path().display()), "not a directory");
        refused(format!("{}:/work", home.display()), "msb home");
        refused(format!("{}/sandboxes:/work", home.display()), "msb home");
        refused(format!("{}:/work", t.path().display()), "msb home");
        refused(format!("{}:work", dir.display()), "guest path");
        refused(format!("{}:/a/../b", dir.display()), "guest path");
        refused(format!("{}:/", dir.display()), "guest path");
        refused("project:/work".into(), "no volume named project");
        std::fs::create_dir_all(home.join("volumes/project")).unwrap();
        let v = parse_mount("project:/work:ro", &home).unwrap();
        assert_eq!((v.volume.as_deref(), v.read_only), (Some("project"), true));
        assert_eq!(v.host, home.join("volumes/project"));
        refused("../x:/work".into(), "No such file");
        refused("/nowhere".into(), "HOST_DIR:GUEST_PATH");
        refused(format!("{}:ro", dir.display()), "guest path \"ro\" must be absolute");
        // Options: ro/rw and the owner files appear to have.
        let o = |spec: &str| parse_mount(&format!("{}:{spec}", dir.display()), &home);
        let owned = o("/work:uid=1000").unwrap();
        assert_eq!((owned.owner, owned.read_only), (Some(FileOwner { uid: 1000, gid: 1000 }), false));
        let both = o("/work:ro,uid=1000,gid=50").unwrap();
        assert_eq!((both.owner, both.read_only), (Some(FileOwner { uid: 1000, gid: 50 }), true));
        assert!(!o("/work:rw").unwrap().read_only);
        assert_eq!(o("/work").unwrap().owner, None, "root unless told");
        assert!(parse_mount("project:/work:uid=7", &home).unwrap().owner.is_some_and(|w| w.uid == 7));
        for (spec, why) in [
            ("/work:gid=5", "needs a uid"),
            ("/work:uid=-1", "not a number"),
            ("/work:uid=4294967296", "not a number"),
            ("/work:uid=", "not a number"),
            ("/work:exec", "unknown mount option"),
            ("/work:ro,suid", "unknown mount option"),
            ("/work:ro:rw", "guest path"),
        ] {
            let e = o(spec).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}

#[cfg(test)]
mod publish_tests {
    use super::{parse_guest_port, Publish};
    use msb_schema::net::PortProto;

    #[test]
    fn published_ports_default_to_loopback_and_refuse_what_cannot_work() {
        let p = |s: &str| Publish::parse(s).map(|p| (p.host.to_string(), p.guest));
        assert_eq!(p("8080:80"), Ok(("127.0.0.1:8080".into(), 80)));
        assert_eq!(p("80"), Ok(("127.0.0.1:0".into(), 80)), "a free port");
        assert_eq!(p("0:80/tcp"), Ok(("127.0.0.1:0".into(), 80)));
        assert_eq!(p("0.0.0.0:8080:80"), Ok(("0.0.0.0:8080".into(), 80)), "only when named");
        assert_eq!(p("[::1]:8080:80"), Ok(("[::1]:8080".into(), 80)));
        for bad in ["8080:0", "70000:80", "a:b", "localhost:8080:80", "[::1]8080:80", "80/sctp", "80/", "/udp", ""] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_udp_suffix_publishes_udp_and_tcp_stays_the_default() {
        let proto = |s: &str| Publish::parse(s).map(|p| (p.host.to_string(), p.guest, p.proto));
        assert_eq!(proto("5353:53/udp"), Ok(("127.0.0.1:5353".into(), 53, PortProto::Udp)));
        assert_eq!(proto("53/udp"), Ok(("127.0.0.1:0".into(), 53, PortProto::Udp)));
        assert_eq!(proto("[::1]:53:53/udp"), Ok(("[::1]:53".into(), 53, PortProto::Udp)));
        assert_eq!(proto("8080:80"), Ok(("127.0.0.1:8080".into(), 80, PortProto::Tcp)));
        // A record written before UDP ports reads as TCP.
        let old: Publish = serde_json::from_str(r#"{"host":"127.0.0.1:8080","guest":80}"#).unwrap();
        assert_eq!(old.proto, PortProto::Tcp);
        assert_eq!(parse_guest_port("53/udp"), Ok((53, PortProto::Udp)));
        assert_eq!(parse_guest_port("80"), Ok((80, PortProto::Tcp)));
        for bad in ["0", "0/udp", "x", "80/icmp", "70000"] {
            assert!(parse_guest_port(bad).unwrap_err().contains(&format!("{bad:?}")), "{bad}");
        }
    }
}

/// Parses `-v HOST:GUEST[:OPTIONS]`: HOST an existing directory (made absolute, symlinks
/// resolved once, here), never the msb home, inside it, or above it (a sandbox must not
/// reach other sandboxes' disks or the state store), or the name of a volume
/// ([`crate::volumes`]); GUEST an absolute, normalized path; OPTIONS a comma list of `ro`,
/// `rw` (the default), `uid=N` and `gid=N` (the owner files appear to have in the guest;
/// a `gid` without a `uid` is refused, and `uid=N` alone means `N:N`).
pub fn parse_mount(s: &str, home: &Path) -> std::result::Result<MountSpec, String> {
    let bad = |why: String| format!("-v {s:?}: {why}");
    let usage =
        "want HOST_DIR:GUEST_PATH[:ro|rw][,uid=N[,gid=N]], e.g. ./project:/work, /data:/data:ro or ./p:/work:uid=1000";
    let Some((front, last)) = s.rsplit_once(':') else {
        return Err(bad(usage.into()));
    };
    // A guest path is absolute, and options never start with `/`: the last field is one or
    // the other (with no field before it to be the guest path, it is a guest path gone
    // wrong, and said so).
    let (rest, options) = if last.starts_with('/') || !front.contains(':') { (s, "") } else { (front, last) };
    let (mut read_only, mut uid, mut gid) = (false, None, None);
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        let id = |v: &str, what: &str| {
            v.parse::<u32>().map_err(|_| bad(format!("{what}={v:?} is not a number from 0 to {}", u32::MAX)))
        };
        match opt.split_once('=') {
            None if opt == "ro" => read_only = true,
            None if opt == "rw" => read_only = false,
            Some(("uid", v)) => uid = Some(id(v, "uid")?),
            Some(("gid", v)) => gid = Some(id(v, "gid")?),
            _ => return Err(bad(format!("unknown mount option {opt:?}; {usage}"))),
        }
    }
    let owner = match (uid, gid) {
        (None, None) => None,
        (Some(uid), gid) => Some(FileOwner { uid, gid: gid.unwrap_or(uid) }),
        (None, Some(_)) => return Err(bad("gid= needs a uid= beside it".into())),
    };
    let Some((host, guest)) = rest.rsplit_once(':') else {
        return Err(bad(usage.into()));
    };
    if host.is_empty() {
        return Err(bad("the host directory is empty".into()));
    }
    msb_schema::fs::check_guest_path(guest).map_err(|e| bad(e.to_string()))?;
    let m = if !host.contains('/') && !host.starts_with('.') {
        let dir = crate::volumes::path_of(home, host)
            .map_err(|e| bad(format!("{e} (or, for a host directory here, write ./{host})")))?;
        let dir = std::fs::canonicalize(&dir).map_err(|e| bad(format!("volume {host}: {e}")))?;
        let mut m = MountSpec::new(&dir, guest, read_only).map_err(|e| bad(e.to_string()))?;
        m.volume = Some(host.to_string());
        m
    } else {
        let abs = std::fs::canonicalize(host).map_err(|e| bad(format!("host directory {host}: {e}")))?;
        if !abs.is_dir() {
            return Err(bad(format!("{} is not a directory", abs.display())));
        }
        MountSpec::new(&abs, guest, read_only).map_err(|e| bad(e.to_string()))?
    };
    let mut m = check_host_mount(m, home).map_err(&bad)?;
    m.owner = owner;
    Ok(m)
}

/// Checks a mount's host side and records its identity where it has none yet: the path is
/// absolute and canonical (no symlink in it: every start opens it without following one),
/// a directory, and neither is, holds nor lies inside the msb `home` (only a named volume,
/// at its own place under `home`, may). Run when a sandbox is recorded (CLI and SDK alike)
/// and again at every start, so a path swapped since is refused.
pub fn check_host_mount(mut m: MountSpec, home: &Path) -> std::result::Result<MountSpec, String> {
    use std::os::unix::fs::MetadataExt;
    let shown = m.host.display().to_string();
    let canon = std::fs::canonicalize(&m.host).map_err(|e| format!("host directory {shown}: {e}"))?;
    if canon != m.host {
        return Err(format!(
            "host directory {shown} is not a canonical path (it resolves to {}): a symlink in it may be swapped later; name the directory itself",
            canon.display()
        ));
    }
    let md = std::fs::symlink_metadata(&canon).map_err(|e| format!("host directory {shown}: {e}"))?;
    if !md.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    match &m.volume {
        Some(v) if canon != crate::volumes::volumes_dir(&home).join(v) => {
            return Err(format!("volume {v} is recorded at {shown}, which is not its place in the msb home"));
        }
        Some(_) => {}
        None if canon.starts_with(&home) || home.starts_with(&canon) => {
            return Err(format!(
                "{shown} is, holds or lies inside the msb home {}: sharing it would hand the sandbox other sandboxes' disks",
                home.display()
            ));
        }
        None => {}
    }
    let id = HostIdentity { dev: md.dev(), ino: md.ino() };
    match m.identity {
        None => m.identity = Some(id),
        Some(want) if want != id => {
            return Err(format!(
                "host directory {shown} is another directory than the one recorded when the sandbox was created: it was moved or replaced; move it back, or recreate the sandbox to share what is there now"
            ))
        }
        Some(_) => {}
    }
    Ok(m)
}

/// Writable root disk size when none is given (sparse: 4 GiB of room, not of host disk).
pub const DEFAULT_ROOT_DISK_MIB: u64 = 4096;
pub const MIN_ROOT_DISK_MIB: u64 = 64;
pub const MAX_ROOT_DISK_MIB: u64 = 1 << 20;

impl SandboxConfig {
    /// Whether the sandbox boots into an image of the store (not the busybox initramfs).
    pub fn image_ref(&self) -> Option<&str> {
        self.image.as_deref().filter(|i| *i != "base")
    }

    /// Checks the configuration against the sandbox limits before anything is recorded.
    pub fn validate(&self) -> Result<()> {
        if let Some(img) = self.image.as_deref().filter(|i| *i != "base") {
            msb_images::store::normalize_reference(img).map_err(|e| Error::Config(e.to_string()))?;
        }
        if let Some(mib) = self.root_disk_mib {
            if !(MIN_ROOT_DISK_MIB..=MAX_ROOT_DISK_MIB).contains(&mib) {
                return Err(Error::Config(format!(
                    "a root disk of {mib} MiB is outside {MIN_ROOT_DISK_MIB}..={MAX_ROOT_DISK_MIB} MiB"
                )));
            }
        }
        msb_schema::fs::check_mounts(&self.mounts).map_err(|e| Error::Config(e.to_string()))?;
        msb_schema::secret::check_secrets(&self.secrets).map_err(|e| Error::Config(e.to_string()))?;
        if !self.secrets.is_empty() && self.net.none {
            return Err(Error::Config("secrets need a network: drop --net none or the --secret flags".into()));
        }
        if !self.secrets.is_empty() && self.read_only {
            return Err(Error::Config(
                "a read-only root cannot take secrets (their CA is written into the guest's trust store): \
                 drop --read-only or the --secret flags"
                    .into(),
            ));
        }
        Ok(msb_schema::limits::check_size(self.cpus, self.memory_mib)?)
    }

    /// Checks every mount's host side against `home` ([`check_host_mount`]), recording the
    /// identities of those that have none.
    pub fn check_host_mounts(&mut self, home: &Path) -> Result<()> {
        for m in &mut self.mounts {
            *m = check_host_mount(m.clone(), home).map_err(|e| Error::Config(format!("mount at {}: {e}", m.guest)))?;
        }
        Ok(())
    }
}

/// What a client tells a new sandbox process (one JSON line on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub name: SandboxName,
    pub home: PathBuf,
    pub config: SandboxConfig,
    /// Outlives its client; otherwise stops when the client's end of stdin closes.
    pub detached: bool,
    /// Removed from the store (with its directory) when it stops.
    pub ephemeral: bool,
}

/// The one line a sandbox process prints on stdout when it is up, or why it is not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    pub ok: bool,
    pub error: Option<String>,
}

/// Where a sandbox's files are.
pub mod paths {
    use super::*;

    /// Longest path a Unix socket address holds (`sun_path` less its NUL).
    pub const MAX_SOCKET_PATH: usize = 107;

    /// Directory of a sandbox's files (0700: logs, socket).
    pub fn sandbox_dir(home: &Path, name: &SandboxName) -> PathBuf {
        home.join("sandboxes").join(name.as_str())
    }

    /// The network audit stream of a sandbox (JSON lines, one per gateway decision).
    pub fn net_audit_path(home: &Path, name: &SandboxName) -> PathBuf {
        sandbox_dir(home, name).join("net.jsonl")
    }

    /// The published ports of a running sandbox, as bound (JSON: `[{host, guest}]`).
    pub fn ports_path(home: &Path, name: &SandboxName) -> PathBuf {
        sandbox_dir(home, name).join("ports.json")
    }

    /// The exit report of a sandbox's current or last process: its identity on the first
    /// line (`PID START`), then why it ended (written by the process itself as it ends, or by
    /// its seccomp violation reporter). The jailed process holds no handle on the state
    /// store: the next client reads this to close the run.
    pub fn exit_path(home: &Path, name: &SandboxName) -> PathBuf {
        sandbox_dir(home, name).join("exit")
    }

    /// What a sandbox's dialer may open beyond the public internet (its policies and published
    /// ports, JSON): written by the client and, at start, by the sandbox process before its
    /// lockdown; outside the sandbox directory, so never inside the jail.
    pub fn grants_path(home: &Path, name: &SandboxName) -> PathBuf {
        home.join("grants").join(format!("{}.json", name.as_str()))
    }

    /// The control socket of a sandbox.
    pub fn socket_path(home: &Path, name: &SandboxName) -> PathBuf {
        sandbox_dir(home, name).join("ctl.sock")
    }
}

/// Writes one message.
pub async fn send<W: AsyncWriteExt + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    let frame = encode(msg).map_err(|e| Error::Wire(format!("encoding a message: {e}")))?;
    w.write_all(&frame).await.map_err(|e| Error::Wire(format!("socket write: {e}")))
}

/// Reads messages from one side of a connection.
pub struct Reader<R> {
    inner: R,
    decoder: FrameDecoder,
    ready: std::collections::VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl<R: AsyncReadExt + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader { inner, decoder: FrameDecoder::new(), ready: Default::default(), buf: vec![0; 64 * 1024] }
    }

    /// The next message; `Ok(None)` at a clean end of stream. Cancel-safe: bytes read are
    /// kept in the decoder.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return decode(&f).map(Some).map_err(|e| Error::Wire(e.to_string()));
            }
            let n = self.inner.read(&mut self.buf).await.map_err(|e| Error::Wire(format!("socket read: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            let ready = &mut self.ready;
            self.decoder.feed(&self.buf[..n], &mut |f| ready.push_back(f)).map_err(|e| Error::Wire(e.to_string()))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_schema::limits::STDIN_CHUNK;
    use msb_schema::{ExecError, SpawnErrorKind};

    #[tokio::test]
    async fn messages_cross_a_socket_pair_in_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_, mut w) = a.into_split();
        let (r, _) = b.into_split();
        let msgs = vec![
            ClientMsg::Exec { spec: ExecSpec::command(["sh"]), keep_stdin: true },
            ClientMsg::Stdin(vec![7; STDIN_CHUNK]),
            ClientMsg::Resize(WinSize { rows: 40, cols: 120 }),
            ClientMsg::Stop { graceful_ms: Some(5000) },
        ];
        for m in &msgs {
            send(&mut w, m).await.unwrap();
        }
        drop(w);
        let mut r = Reader::new(r);
        for m in &msgs {
            assert_eq!(r.next::<ClientMsg>().await.unwrap().as_ref(), Some(m));
        }
        assert_eq!(r.next::<ClientMsg>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn exec_errors_keep_their_kind_across_the_socket() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_, mut w) = a.into_split();
        let (r, _) = b.into_split();
        let failed = ExecError::SpawnFailed { kind: SpawnErrorKind::NotFound, message: "nope: not found".into() };
        send(&mut w, &ServerMsg::Event(ExecEvent::Failed(failed.clone()))).await.unwrap();
        let mut r = Reader::new(r);
        assert_eq!(r.next::<ServerMsg>().await.unwrap(), Some(ServerMsg::Event(ExecEvent::Failed(failed))));
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_before_it_is_buffered() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_, mut w) = a.into_split();
        let (r, _) = b.into_split();
        w.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let e = Reader::new(r).next::<ClientMsg>().await.unwrap_err();
        assert!(matches!(e, Error::Wire(_)), "{e}");
    }

    #[test]
    fn a_launch_line_with_a_bad_name_is_refused() {
        let line = r#"{"name":"../x","home":"/h","config":{},"detached":true,"ephemeral":false}"#;
        assert!(serde_json::from_str::<Launch>(line).is_err());
        let line = r#"{"name":"web","home":"/h","config":{},"detached":true,"ephemeral":false}"#;
        assert_eq!(serde_json::from_str::<Launch>(line).unwrap().config, SandboxConfig::default());
    }

    #[test]
    fn configs_outside_the_sandbox_limits_are_refused() {
        assert!(SandboxConfig::default().validate().is_ok());
        for bad in [
            SandboxConfig { cpus: 0, ..Default::default() },
            SandboxConfig { cpus: 9, ..Default::default() },
            SandboxConfig { memory_mib: 16, ..Default::default() },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Size(_))), "{bad:?}");
        }
        let image = SandboxConfig { image: Some("../ubuntu".into()), ..Default::default() };
        assert!(matches!(image.validate(), Err(Error::Config(_))));
        let disk = SandboxConfig { image: Some("debian".into()), root_disk_mib: Some(1), ..Default::default() };
        assert!(matches!(disk.validate(), Err(Error::Config(_))));
    }
}
