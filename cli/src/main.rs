//! `msb`: the command line.
//!
//! Sandboxes are named and live in their own host process (`msb create/start/stop/rm/ls/
//! inspect/exec/logs`); `msb run` boots one for a single command. Exit codes of `msb run` and
//! `msb exec` follow docker's: the command's own status; 128+N if signal N killed it; 127 if
//! it was not found; 126 if it could not be executed; 124 if it ran past `--timeout`; 125 if
//! msb itself failed. Other commands exit 0 on success and 1 with a message on failure.

#![forbid(unsafe_code)]

mod attach;
mod cp;
mod images;
mod logs;
mod report;
mod sandbox_process;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use msb_control_plane::client::SANDBOX_PROCESS_ARG;
use msb_control_plane::schema::{Rlimit, WinSize};
use msb_control_plane::store::format_ms;
use msb_control_plane::wire::{FileOwner, MountSpec};
use msb_control_plane::{
    parse_guest_port, Error, ExecSpec, Msb, NamedSandbox, NetSettings, PortProto, Publish, Record, SandboxConfig,
    Status,
};

use attach::Outcome;

#[derive(Parser)]
#[command(name = "msb", version, about = "Run untrusted code in hardware-isolated microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Record a named sandbox (does not start it).
    Create(Box<CreateArgs>),
    /// Start a sandbox in the background.
    Start { name: String },
    /// Stop a sandbox: the guest syncs and powers off; forced after the timeout.
    Stop(StopArgs),
    /// Stop (if running) and start a sandbox.
    Restart(StopArgs),
    /// Remove sandboxes and their logs.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Kill running sandboxes first.
        #[arg(short, long)]
        force: bool,
    },
    /// List sandboxes.
    #[command(alias = "ps")]
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show everything known about a sandbox.
    Inspect {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Run a command in a running sandbox.
    Exec(Box<ExecArgs>),
    /// Boot a sandbox, run one command in it and stop it (removed afterwards unless named).
    Run(Box<RunArgs>),
    /// Show a sandbox's console and exec output, timestamped.
    Logs {
        name: String,
        /// Keep printing new lines until the sandbox stops.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// The network audit stream instead: one JSON line per gateway decision (time,
        /// protocol, destination, names, allow/deny, the rule that decided).
        #[arg(long)]
        net: bool,
    },
    /// The published ports of a running sandbox: `GUEST/tcp -> HOST_ADDR:PORT` (or
    /// `GUEST/udp`) per line; with --add/--rm, changes them (live, and for later starts).
    Port {
        name: String,
        /// Publish another port: `[ADDR:]HOST:GUEST` or `GUEST`, as `-p`. Repeatable.
        #[arg(long, value_name = "[ADDR:]HOST:GUEST[/udp]", value_parser = Publish::parse)]
        add: Vec<Publish>,
        /// Close the published ports leading to this guest port (`GUEST/udp`: its UDP
        /// ones). Repeatable.
        #[arg(long = "rm", value_name = "GUEST[/udp]", value_parser = parse_guest_port)]
        remove: Vec<(u16, PortProto)>,
    },
    /// Show a sandbox's egress policy, or replace it with --allow/--deny/--policy (as at
    /// `create`) or --reset (the default): live in a running sandbox, closing the flows the
    /// new policy denies, and for its later starts.
    Policy {
        name: String,
        #[command(flatten)]
        rules: RuleArgs,
        /// Back to the default policy (the public internet only).
        #[arg(long, conflicts_with_all = ["allow", "deny", "policy"])]
        reset: bool,
    },
    /// Copy files or directories between the host and a running sandbox: `msb cp SRC
    /// NAME:DST` or `msb cp NAME:SRC DST` (as docker cp).
    Cp { src: String, dst: String },
    /// Pull an image from an OCI/Docker registry into the local store.
    Pull {
        /// `[HOST[:PORT]/]NAME[:TAG][@DIGEST]` (no host: Docker Hub).
        reference: String,
        /// Trust this CA certificate (PEM) too, for a private registry.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Allow plain HTTP to this registry (loopback registries always may use it).
        #[arg(long)]
        insecure: bool,
    },
    /// Load images from an OCI layout (directory or tar) or a `docker save` tar ("-": stdin).
    Load {
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
        /// Name the image (the archive must hold one); default: the archive's own name.
        #[arg(long)]
        tag: Option<String>,
    },
    /// List the images of the local store.
    Images {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove an image from the local store (refused while a sandbox uses it).
    Rmi { reference: String },
    /// Image maintenance.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// A sandbox's secrets (`--secret`): rotate, re-scope, remove, list; a running sandbox
    /// uses the change from its next request, kept-alive connections included.
    Secret {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// Named volumes: directories that outlive sandboxes (`-v NAME:/path`).
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Report what this host can run: the kind of /dev/kvm, permissions, kernel, agent.
    Doctor,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    #[command(name = SANDBOX_PROCESS_ARG, hide = true)]
    SandboxProcess,
    /// Apply the sandbox process's lockdown to this process over DIR and attempt ACTION
    /// (used by `msb doctor` and the host tests).
    #[command(name = "lockdown-probe", hide = true)]
    LockdownProbe { dir: std::path::PathBuf, action: Option<String>, arg: Option<String> },
    /// Record what a sandbox process's seccomp filter would refuse (log mode; started by it).
    #[command(name = sandbox_process::seccomp_log::SECCOMP_LOG_ARG, hide = true)]
    SeccompLog,
    /// Serve a sandbox process's host sockets (started by it, its socket on stdin).
    #[command(name = sandbox_process::DIALER_ARG, hide = true)]
    Dialer {
        #[arg(long)]
        grants: std::path::PathBuf,
        #[arg(long)]
        dns: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// A new value for a secret, from `--from env:VAR|file:PATH` (also recorded as where
    /// later starts read it) or, without it, from stdin (used by the running sandbox only;
    /// later starts read the recorded source).
    Set {
        sandbox: String,
        name: String,
        #[arg(long, value_name = "env:VAR|file:PATH")]
        from: Option<String>,
    },
    /// The hosts a secret may go to, replacing its list.
    Hosts {
        sandbox: String,
        name: String,
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Remove a secret: its placeholder goes out unchanged from the next request.
    Rm { sandbox: String, name: String },
    /// The secrets of a sandbox (names, hosts, placeholders; never values).
    Ls { sandbox: String },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a named volume: a directory in the msb home that sandboxes mount with
    /// `-v NAME:/path` and that outlives them.
    Create { name: String },
    /// List volumes and the sandboxes that mount them.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show a volume: its directory and the sandboxes that mount it.
    Inspect { name: String },
    /// Remove volumes and their files (refused while a sandbox mounts one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Delete blobs and root filesystems no image or sandbox uses.
    Prune,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
struct MachineArgs {
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB (a limit: host memory is used only as the guest touches it).
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Guest kernel (default: $MSB_HOME/kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Extra guest kernel command-line arguments (e.g. "loglevel=7" to see the boot).
    #[arg(long)]
    kernel_args: Option<String>,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Size of an image sandbox's writable root disk, e.g. 512M or 4G (sparse; default 4G).
    #[arg(long, value_parser = parse_size_mib)]
    root_disk: Option<u64>,
    /// Refuse to start unless every protection of the sandbox process's lockdown is in force
    /// on this host (user namespace, empty root, Landlock, seccomp); without it a missing one
    /// is reported by `msb inspect` and `msb doctor`, not fatal.
    #[arg(long)]
    require_hardening: bool,
    /// How much the workload may do inside the guest: `default` (root, as in a container) or
    /// `restricted` (every command as a user other than root — `nobody` unless `-u` names
    /// one — with no capabilities and no_new_privs, so setuid programs gain nothing).
    #[arg(long, value_parser = ["default", "restricted"], default_value = "default")]
    profile: String,
    /// A read-only root file system; `/tmp` is a fresh writable tmpfs (shared directories keep
    /// their own mode).
    #[arg(long)]
    read_only: bool,
    /// Share a host directory: `HOST_DIR:GUEST_PATH[:OPTIONS]` (`./project:/work`), or a
    /// named volume (`NAME:/path`). The guest reaches nothing outside it. OPTIONS, comma
    /// separated: `ro` (enforced on the host), `uid=N[,gid=N]` (the owner files appear to have
    /// in the guest; default root, or `run -u UID[:GID]`'s). Repeatable (at most 4).
    #[arg(short = 'v', long = "volume", value_name = "HOST_DIR:GUEST_PATH[:ro][,uid=N,gid=N]")]
    volumes: Vec<String>,
    #[command(flatten)]
    net: NetArgs,
}

/// The sandbox's network (see `msb run --help`): the public internet only, unless told.
#[derive(clap::Args, Clone)]
struct NetArgs {
    /// `public` (default: the public internet, nothing private, local or the host's) or
    /// `none` (no network device at all).
    #[arg(long, value_parser = ["public", "none"], default_value = "public")]
    net: String,
    #[command(flatten)]
    rules: RuleArgs,
    /// The resolver the gateway asks for the guest (default: the host's first nameserver).
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_resolver)]
    dns: Option<std::net::SocketAddr>,
    /// Publish a guest port: `[ADDR:]HOST:GUEST` or `GUEST` (a free host port, shown by
    /// `msb port`), TCP unless it ends in `/udp`. Bound to 127.0.0.1 unless ADDR names
    /// another. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST[/udp]", value_parser = Publish::parse)]
    publish: Vec<Publish>,
    /// New connections (TCP and UDP flows) a second the sandbox may open, burst twice that
    /// (default 64). More are refused as a denial (RST / ICMP) and audited.
    #[arg(long, value_name = "N")]
    conn_rate: Option<u32>,
    /// Limit what the sandbox sends out, all flows together: bytes a second, `500k`, `10M`
    /// (1000s) or `4MiB` (1024s). TCP slows down; UDP over the limit is dropped.
    #[arg(long, value_name = "RATE", value_parser = msb_actors::net::parse_rate)]
    rate_out: Option<u64>,
    /// Limit what the sandbox receives, all flows together (same units as --rate-out).
    #[arg(long, value_name = "RATE", value_parser = msb_actors::net::parse_rate)]
    rate_in: Option<u64>,
    /// A secret the sandbox uses but never holds: `NAME@HOST[,HOST…]` takes the value from
    /// msb's own environment variable NAME; the guest's commands see NAME set to a
    /// placeholder, which the gateway replaces with the value only in requests over TLS to
    /// those hosts (`*.example.com`: any name below). Long form:
    /// `name=NAME,host=H[,host=H…][,env=VAR|file=PATH][,headers=H1+H2|all|none][,query]
    /// [,placeholder=P][,on-violation=forward|block|stop]`. Inline values are refused.
    /// Repeatable.
    #[arg(long = "secret", value_name = "NAME@HOST[,HOST…]")]
    secrets: Vec<String>,
    /// A PEM file of CA certificates that secret hosts' servers may also be verified against
    /// (private endpoints; the host's roots are always used). Repeatable.
    #[arg(long, value_name = "FILE")]
    tls_upstream_ca: Vec<PathBuf>,
}

/// The egress policy's flags, for `create`/`run` and `msb policy`.
#[derive(clap::Args, Clone, Default)]
struct RuleArgs {
    /// Allow a destination, before the defaults: `[out/][tcp/|udp/]TARGET[:PORTS]`, TARGET an
    /// address, a CIDR (`203.0.113.0/24`, `[2001:db8::/32]`), a group (`private`, `loopback`,
    /// `host`, …), a domain (`api.example.com`) or `*.example.com`; PORTS `443`, `8000-8100`
    /// or a comma list; `api.corp@private` lets a name resolve into a non-public group.
    /// Repeatable; the first matching rule wins.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<String>,
    /// Deny a destination (same syntax as --allow), before the defaults. Repeatable.
    #[arg(long = "deny", value_name = "RULE")]
    deny: Vec<String>,
    /// A policy file: one `allow RULE` / `deny RULE` per line, `default allow|deny`, `#`
    /// comments. It replaces the default policy; --allow/--deny rules go before its rules.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

impl RuleArgs {
    fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.policy.is_none()
    }

    /// The policy these flags make, checked (`None`: no flags, the default policy): --deny
    /// then --allow rules, then the file's rules and default, or `allow public` and default
    /// deny without a file.
    fn policy(&self) -> Result<Option<msb_actors::net::Policy>, Error> {
        use msb_actors::net::{Action, Policy, Rule};
        let mut rules = Vec::new();
        for (action, list) in [(Action::Deny, &self.deny), (Action::Allow, &self.allow)] {
            for r in list {
                let flag = if action == Action::Allow { "--allow" } else { "--deny" };
                rules.push(Rule::parse(action, r).map_err(|e| Error::Config(format!("{flag} {r:?}: {e}")))?);
            }
        }
        let policy = match &self.policy {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("--policy {}: {e}", path.display())))?;
                let file =
                    Policy::parse(&text).map_err(|e| Error::Config(format!("--policy {}: {e}", path.display())))?;
                rules.extend(file.rules().iter().cloned());
                Some(Policy::new(rules, file.default_action()))
            }
            None if !self.is_empty() => Some(Policy::with_rules(rules)),
            None => None,
        };
        let policy = policy.transpose().map_err(|e| Error::Config(format!("the network policy: {e}")))?;
        for w in policy.iter().flat_map(|p| p.rules().iter().filter_map(|r| r.warning())) {
            eprintln!("msb: warning: {w}");
        }
        Ok(policy)
    }
}

fn parse_resolver(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{s:?} is not an address such as 192.0.2.53 or [2001:db8::53]:5353"))
}

impl NetArgs {
    /// The recorded network settings; the rules and the file are parsed here, so a bad one
    /// is refused before anything is created.
    fn settings(&self) -> Result<NetSettings, Error> {
        let none = self.net == "none";
        let limited = self.conn_rate.is_some() || self.rate_out.is_some() || self.rate_in.is_some();
        if none && (!self.rules.is_empty() || self.dns.is_some() || !self.publish.is_empty() || limited) {
            return Err(Error::Config(
                "--net none has no network: drop --allow, --deny, --policy, --dns, -p and the rate flags".into(),
            ));
        }
        if none && (!self.secrets.is_empty() || !self.tls_upstream_ca.is_empty()) {
            return Err(Error::Config(
                "--net none has no network, so no secrets: drop --secret and --tls-upstream-ca".into(),
            ));
        }
        let mut cas = Vec::new();
        for f in &self.tls_upstream_ca {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Error::Config(format!("--tls-upstream-ca {}: {e}", f.display())))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                return Err(Error::Config(format!("--tls-upstream-ca {}: no PEM certificate in it", f.display())));
            }
            cas.push(std::path::absolute(f).unwrap_or_else(|_| f.clone()));
        }
        let policy = self.rules.policy()?;
        let settings = NetSettings {
            tls_upstream_ca: cas,
            none,
            policy: policy.map(|p| p.to_string()),
            dns: self.dns,
            publish: self.publish.clone(),
            conn_rate: self.conn_rate,
            rate_out: self.rate_out,
            rate_in: self.rate_in,
        };
        net_limits(&settings).check().map_err(|e| Error::Config(format!("--conn-rate/--rate-out/--rate-in: {e}")))?;
        Ok(settings)
    }
}

/// The gateway's limits a recorded network asks for (its defaults where it names none).
pub(crate) fn net_limits(n: &NetSettings) -> msb_actors::net::Limits {
    let mut l = msb_actors::net::Limits::default();
    if let Some(r) = n.conn_rate {
        (l.flows_per_sec, l.flow_burst) = (r, r.saturating_mul(2));
    }
    (l.egress_bytes_per_sec, l.ingress_bytes_per_sec) = (n.rate_out, n.rate_in);
    l
}

/// A size with an optional M or G suffix (MiB by default), in MiB.
fn parse_size_mib(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, 1024),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size such as 512M or 4G"))
}

impl MachineArgs {
    /// The `-v` mounts, each checked against the host (exists, a directory, not the home).
    fn mounts(&self) -> Result<Vec<MountSpec>, Error> {
        if self.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let home = msb_images::msb_home().map_err(|e| Error::Config(e.to_string()))?;
        self.volumes.iter().map(|v| msb_control_plane::wire::parse_mount(v, &home).map_err(Error::Config)).collect()
    }

    fn config(&self, image: Option<String>) -> Result<SandboxConfig, Error> {
        Ok(SandboxConfig {
            image,
            root_disk_mib: self.root_disk,
            image_id: None,
            cpus: self.cpus,
            memory_mib: self.memory,
            kernel: self.kernel.clone().map(|k| std::path::absolute(&k).unwrap_or(k)),
            kernel_args: self.kernel_args.clone(),
            boot_timeout_secs: self.boot_timeout,
            net: self.net.settings()?,
            mounts: self.mounts()?,
            secrets: self
                .net
                .secrets
                .iter()
                .map(|s| msb_control_plane::secrets::parse_secret(s))
                .collect::<Result<_, _>>()?,
            require_hardening: self.require_hardening,
            restricted: self.profile == "restricted",
            read_only: self.read_only,
        })
    }
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Image of the local store to boot into (`msb images`); default: the busybox
    /// initramfs.
    image: Option<String>,
    #[arg(long)]
    name: String,
    #[command(flatten)]
    machine: MachineArgs,
}

#[derive(clap::Args)]
struct StopArgs {
    name: String,
    /// Seconds the guest gets to shut down before it is forced.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u64,
    /// Kill at once, without asking the guest.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Clone)]
struct CommandArgs {
    /// Environment variables for the command: KEY=VALUE, or KEY alone to pass msb's own
    /// value of KEY (so that a secret need not appear in argv).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file: one KEY=VALUE (or KEY, taken from msb's own
    /// environment) per line; blank lines and lines starting with # are skipped.
    #[arg(long = "env-file")]
    env_files: Vec<PathBuf>,
    /// Working directory inside the guest.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    #[arg(short = 'u', long, help = "Run as this user: root, NAME[:GROUP] or UID[:GID]")]
    user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    #[arg(
        long = "ulimit",
        help = "Resource limit, NAME=SOFT[:HARD] (nofile, nproc, as, cpu, fsize, core, stack, data, memlock)"
    )]
    ulimits: Vec<String>,
    /// Keep stdin open and pass it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal (detach with Ctrl-P Ctrl-Q).
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments (after `--`; `msb run IMAGE` may leave it out to run
    /// the image's ENTRYPOINT/CMD).
    #[arg(last = true)]
    command: Vec<String>,
}

impl CommandArgs {
    fn spec(&self, tty: bool) -> Result<ExecSpec, String> {
        let mut env = Vec::new();
        for f in &self.env_files {
            env.extend(env_file(f)?);
        }
        for kv in &self.env {
            env.push(env_entry(kv).map_err(|why| format!("--env {kv:?}: {why}"))?);
        }
        let timeout = match self.timeout.map(Duration::try_from_secs_f64) {
            Some(Err(_)) => return Err("--timeout must be a positive number of seconds".into()),
            Some(Ok(d)) => Some(d),
            None => None,
        };
        let rlimits = self.ulimits.iter().map(|u| Rlimit::parse(u)).collect::<Result<Vec<_>, _>>()?;
        let tty = tty.then(|| attach::terminal_size().unwrap_or(WinSize { rows: 24, cols: 80 }));
        Ok(ExecSpec {
            argv: self.command.clone(),
            env,
            cwd: self.workdir.clone(),
            user: self.user.clone(),
            timeout,
            stdin: None,
            tty,
            rlimits,
            restricted: false,
        })
    }
}

/// `msb run`'s mounts without an owner of their own get the command's user when it is
/// numeric (`-u UID[:GID]`, or the image's USER), so what the workload makes and is given
/// in a shared directory is its own; otherwise they stay root's (a user name is resolved in
/// the guest, which the host does not ask).
fn owned_by(mut mounts: Vec<MountSpec>, user: Option<&str>) -> Vec<MountSpec> {
    use msb_protocol::{Ident, UserSpec};
    let owner = user.and_then(|u| UserSpec::parse(u).ok()).and_then(|spec| match spec {
        UserSpec { user: Ident::Id(uid), group: None } => Some(FileOwner { uid, gid: uid }),
        UserSpec { user: Ident::Id(uid), group: Some(Ident::Id(gid)) } => Some(FileOwner { uid, gid }),
        _ => None,
    });
    for m in mounts.iter_mut().filter(|m| m.owner.is_none()) {
        m.owner = owner;
    }
    mounts
}

/// Longest `--env-file` msb reads.
const MAX_ENV_FILE: u64 = 1024 * 1024;

/// One environment entry: `KEY=VALUE`, or `KEY` with the value from msb's own environment.
fn env_entry(entry: &str) -> Result<(String, String), String> {
    let (key, value) = match entry.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (entry, None),
    };
    if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == '\0') {
        return Err("the name must be non-empty, without spaces".into());
    }
    let value = match value {
        Some(v) => v,
        None => std::env::var(key).map_err(|_| format!("{key} is not set in msb's environment (or not UTF-8)"))?,
    };
    Ok((key.to_string(), value))
}

/// The entries of an `--env-file`.
fn env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    use std::io::Read;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("--env-file {shown}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_ENV_FILE + 1).read_to_string(&mut text).map_err(|e| format!("--env-file {shown}: {e}"))?;
    if text.len() as u64 > MAX_ENV_FILE {
        return Err(format!("--env-file {shown} is larger than {MAX_ENV_FILE} bytes"));
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        out.push(env_entry(line).map_err(|why| format!("--env-file {shown}, line {}: {why}", n + 1))?);
    }
    Ok(out)
}

#[derive(clap::Args)]
struct ExecArgs {
    name: String,
    #[command(flatten)]
    cmd: CommandArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image of the local store to run (`msb images`); without one, the busybox initramfs.
    image: Option<String>,
    /// Replace the image's ENTRYPOINT (docker's rule: it also drops the image's CMD).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Keep the sandbox under this name (stopped afterwards; with -d, left running).
    #[arg(long)]
    name: Option<String>,
    /// Start the command in the background, print the sandbox's name and leave it running.
    #[arg(short = 'd', long)]
    detach: bool,
    #[command(flatten)]
    machine: MachineArgs,
    #[command(flatten)]
    cmd: CommandArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MSB_LOG").unwrap_or_else(|_| "warn".into());
    if matches!(cli.cmd, Cmd::SandboxProcess) {
        // The sandbox process's stderr is vmm.log: capped and rate-limited (the guest can
        // make the VMM log).
        let log = sandbox_process::vmm_log::VmmLog::stderr();
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(move || log.clone()).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    // Everything msb creates (store, sockets, logs, sandbox directories) is private to this
    // user from the first instant; the sandbox processes inherit this.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if matches!(cli.cmd, Cmd::SandboxProcess) {
        // Single-threaded until its lockdown is done: it builds its own runtime after.
        return sandbox_process::main();
    }
    if let Cmd::LockdownProbe { dir, action, arg } = &cli.cmd {
        return sandbox_process::probe::run(dir, action.as_deref(), arg.as_deref());
    }
    if let Cmd::SeccompLog = &cli.cmd {
        return sandbox_process::seccomp_log::main();
    }
    if let Cmd::Dialer { grants, dns } = &cli.cmd {
        return sandbox_process::dialer_main(grants, *dns);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("msb: cannot start the runtime: {e}");
            return ExitCode::from(125);
        }
    };
    // Commands that need no home directory.
    match cli.cmd {
        Cmd::Doctor => return doctor(),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "msb", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let msb = match Msb::from_env() {
        Ok(msb) => msb,
        Err(e) => {
            eprintln!("msb: {}; set MSB_HOME to a directory of your own", report::message(&e));
            return ExitCode::from(if matches!(cli.cmd, Cmd::Run(_) | Cmd::Exec(_)) { 125 } else { 1 });
        }
    };
    let r = match cli.cmd {
        Cmd::Exec(a) => return rt.block_on(exec(&msb, *a)),
        Cmd::Run(a) => return rt.block_on(run(&msb, *a)),
        Cmd::Doctor
        | Cmd::SandboxProcess
        | Cmd::LockdownProbe { .. }
        | Cmd::Dialer { .. }
        | Cmd::SeccompLog
        | Cmd::Completions { .. } => {
            unreachable!("served above")
        }
        Cmd::Create(a) => resolve_image(&msb, a.image.as_deref())
            .and_then(|(image, id)| msb.create(&a.name, SandboxConfig { image_id: id, ..a.machine.config(image)? }))
            .map(|sb| println!("{}", sb.name())),
        Cmd::Load { input, tag } => images::load(&msb, &input, tag.as_deref()),
        Cmd::Cp { src, dst } => rt.block_on(cp::cp(&msb, &src, &dst)),
        Cmd::Pull { reference, ca_cert, insecure } => images::pull(&msb, &reference, ca_cert, insecure),
        Cmd::Images { format } => images::list(&msb, matches!(format, Format::Json)),
        Cmd::Rmi { reference } => images::remove(&msb, &reference),
        Cmd::Image { cmd: ImageCmd::Prune } => images::prune(&msb),
        Cmd::Volume { cmd } => volume(&msb, cmd),
        Cmd::Secret { cmd } => rt.block_on(secret(&msb, cmd)),
        Cmd::Start { name } => rt.block_on(async {
            let sb = msb.get(&name)?;
            sb.start_detached().await?;
            println!("{name}");
            Ok(())
        }),
        Cmd::Stop(a) => rt.block_on(stop(&msb, &a)).map(|why| println!("{}: {}", a.name, report::for_terminal(&why))),
        Cmd::Restart(a) => rt.block_on(async {
            stop(&msb, &a).await?;
            msb.get(&a.name)?.start_detached().await?;
            println!("{}", a.name);
            Ok(())
        }),
        Cmd::Rm { names, force } => rt.block_on(async {
            let mut first_err = None;
            for n in names {
                match async { msb.get(&n)?.remove(force).await }.await {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("msb: {}", report::message(&e));
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        }),
        Cmd::Ls { format } => msb.list().map(|l| print_list(&msb, &l, format)),
        Cmd::Inspect { name, format } => rt.block_on(inspect(&msb, &name, format)),
        Cmd::Port { name, add, remove } if add.is_empty() && remove.is_empty() => ports(&msb, &name).map(|ports| {
            for p in ports {
                println!("{}/{} -> {}", p.guest, p.proto, p.host);
            }
        }),
        Cmd::Port { name, add, remove } => rt.block_on(change_ports(&msb, &name, &add, &remove)),
        Cmd::Policy { name, rules, reset } => rt.block_on(policy(&msb, &name, &rules, reset)),
        Cmd::Logs { name, follow, tail, net: false } => {
            rt.block_on(async { logs::logs(&msb.get(&name)?, follow, tail).await })
        }
        Cmd::Logs { name, follow, tail, net: true } => {
            rt.block_on(async { logs::net_logs(&msb.get(&name)?, follow, tail).await })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msb: {}", report::message(&e));
            ExitCode::FAILURE
        }
    }
}

/// `msb policy`: prints the policy in force (live if running, else as recorded), or sets it.
async fn policy(msb: &Msb, name: &str, rules: &RuleArgs, reset: bool) -> msb_control_plane::Result<()> {
    let sb = msb.get(name)?;
    if !reset && rules.is_empty() {
        let rec = sb.record()?;
        if rec.config.net.none {
            println!("# {name} has no network (--net none)");
            return Ok(());
        }
        let text = if rec.status == msb_control_plane::Status::Running {
            sb.live_policy().await?
        } else {
            let p = match rec.config.net.policy.as_deref() {
                Some(t) => {
                    msb_actors::net::Policy::parse(t).map_err(|e| Error::Config(format!("the recorded policy: {e}")))?
                }
                None => msb_actors::net::Policy::default(),
            };
            p.to_string()
        };
        print!("{text}");
        return Ok(());
    }
    let policy = if reset { None } else { rules.policy()?.map(|p| p.to_string()) };
    let live = sb.set_policy(policy).await?;
    println!(
        "{name}: policy {}",
        if live { "changed, live and for later starts" } else { "recorded for its next start" }
    );
    Ok(())
}

async fn stop(msb: &Msb, a: &StopArgs) -> msb_control_plane::Result<String> {
    let sb = msb.get(&a.name)?;
    if a.force {
        sb.kill().await
    } else {
        sb.stop(Duration::from_secs(a.time)).await
    }
}

fn status_line(r: &Record) -> String {
    match (&r.status, &r.last_run) {
        (Status::Running, Some(run)) => format!("running since {}", format_ms(run.started_ms)),
        (s, Some(run)) if run.exit_reason.is_some() => {
            format!("{s} ({})", run.exit_reason.as_deref().unwrap_or_default())
        }
        (s, _) => s.to_string(),
    }
}

/// `msb secret …`.
async fn secret(msb: &Msb, cmd: SecretCmd) -> msb_control_plane::Result<()> {
    use msb_control_plane::schema::secret::{SecretHost, SecretName, SecretSource, SecretValue};
    let name_of = |n: &str| SecretName::new(n).map_err(|e| Error::Config(e.to_string()));
    let said = |live: bool, what: &str| {
        if live {
            println!("{what}: in use from the next request");
        } else {
            println!("{what}: recorded for the next start");
        }
    };
    match cmd {
        SecretCmd::Set { sandbox, name, from } => {
            let sb = msb.get(&sandbox)?;
            let name = name_of(&name)?;
            let (value, source) = match from.as_deref() {
                Some(f) => {
                    let source = match f.split_once(':') {
                        Some(("env", v)) if !v.is_empty() => SecretSource::Env(v.to_string()),
                        Some(("file", p)) if !p.is_empty() => {
                            SecretSource::File(std::path::absolute(p).unwrap_or_else(|_| p.into()))
                        }
                        _ => return Err(Error::Config(format!("--from {f:?}: use env:VAR or file:PATH"))),
                    };
                    let spec = msb_control_plane::schema::secret::SecretSpec {
                        name: name.clone(),
                        placeholder: msb_control_plane::secrets::random_placeholder()?,
                        hosts: Vec::new(),
                        scope: Default::default(),
                        on_violation: Default::default(),
                        source: source.clone(),
                    };
                    (msb_control_plane::secrets::resolve(&spec, &mut Vec::new())?, Some(source))
                }
                None => {
                    use std::io::Read;
                    let mut v = Vec::new();
                    std::io::stdin()
                        .take(msb_control_plane::schema::secret::MAX_SECRET_VALUE as u64 + 2)
                        .read_to_end(&mut v)
                        .map_err(|e| Error::Config(format!("reading the value from stdin: {e}")))?;
                    let v = SecretValue::from_file_bytes(name.as_str(), v).map_err(|e| Error::Config(e.to_string()))?;
                    (v, None)
                }
            };
            let live = sb.secret_set(&name, value, source).await?;
            if !live && from.is_none() {
                return Err(Error::Config(format!(
                    "{sandbox} is not running, and a value from stdin is not stored: use --from env:VAR|file:PATH"
                )));
            }
            said(live, &format!("secret {name} of {sandbox}"));
            Ok(())
        }
        SecretCmd::Hosts { sandbox, name, hosts } => {
            let sb = msb.get(&sandbox)?;
            let hosts = hosts
                .iter()
                .map(|h| SecretHost::parse(h))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(e.to_string()))?;
            let live = sb.secret_hosts(&name_of(&name)?, hosts).await?;
            said(live, &format!("the hosts of secret {name} of {sandbox}"));
            Ok(())
        }
        SecretCmd::Rm { sandbox, name } => {
            let live = msb.get(&sandbox)?.secret_rm(&name_of(&name)?).await?;
            said(live, &format!("removing secret {name} of {sandbox}"));
            Ok(())
        }
        SecretCmd::Ls { sandbox } => {
            let sb = msb.get(&sandbox)?;
            let rec = sb.record()?;
            let live = if rec.status.is_live() { Some(sb.secrets().await?) } else { None };
            println!("{:<24} {:<34} {:<8} HOSTS", "NAME", "PLACEHOLDER", "LOCKED");
            for s in &rec.config.secrets {
                let locked = match &live {
                    Some(l) => match l.iter().find(|i| i.name == s.name) {
                        Some(i) if i.locked => "yes",
                        Some(_) => "no",
                        None => "removed",
                    },
                    None => "-",
                };
                let hosts: Vec<String> = s.hosts.iter().map(|h| h.to_string()).collect();
                println!("{:<24} {:<34} {:<8} {}", s.name, s.placeholder, locked, hosts.join(","));
            }
            Ok(())
        }
    }
}

/// `msb volume …`.
fn volume(msb: &Msb, cmd: VolumeCmd) -> msb_control_plane::Result<()> {
    use msb_control_plane::volumes;
    match cmd {
        VolumeCmd::Create { name } => volumes::create(msb, &name).map(|v| println!("{}", v.name)),
        VolumeCmd::Ls { format: Format::Json } => {
            volumes::list(msb).map(|l| println!("{}", serde_json::to_string_pretty(&l).unwrap_or_default()))
        }
        VolumeCmd::Ls { format: Format::Table } => volumes::list(msb).map(|l| {
            println!("{:<24} USED BY", "NAME");
            for v in l {
                println!("{:<24} {}", v.name, v.used_by.join(","));
            }
        }),
        VolumeCmd::Inspect { name } => {
            volumes::inspect(msb, &name).map(|v| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()))
        }
        VolumeCmd::Rm { names } => {
            let mut first_err = None;
            for n in names {
                match volumes::remove(msb, &n) {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("msb: {}", report::message(&e));
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        }
    }
}

fn record_json(r: &Record) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "status": r.status,
        "pid": r.process.map(|p| p.pid),
        "config": serde_json::to_value(&r.config).unwrap_or_default(),
        "ephemeral": r.ephemeral,
        "created": format_ms(r.created_ms),
        "last_run": r.last_run.as_ref().map(|run| serde_json::json!({
            "started": format_ms(run.started_ms),
            "ended": run.ended_ms.map(format_ms),
            "exit_reason": run.exit_reason,
        })),
    })
}

/// `msb ls`'s words for the published ports of a running sandbox (`127.0.0.1:8080->80`).
fn ports_text(msb: &Msb, r: &Record) -> Vec<String> {
    if r.status != Status::Running {
        return Vec::new();
    }
    let bound = msb.get(&r.name).and_then(|sb| bound_ports(&sb)).unwrap_or_default();
    bound.iter().map(|p| format!("{}->{}/{}", p.host, p.guest, p.proto)).collect()
}

fn print_list(msb: &Msb, list: &[Record], format: Format) {
    match format {
        Format::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|r| {
                    let mut v = record_json(r);
                    v["ports"] = serde_json::json!(ports_text(msb, r));
                    v
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Table => {
            println!(
                "{:<24} {:<8} {:>4} {:>7} {:>8}  {:<20}  STATUS",
                "NAME", "STATE", "CPUS", "MEMORY", "PID", "CREATED"
            );
            for r in list {
                let (cpus, mem) = (r.config.cpus, r.config.memory_mib);
                let pid = r.process.map(|p| p.pid.to_string()).unwrap_or_else(|| "-".into());
                let mut status = status_line(r);
                let ports = ports_text(msb, r);
                if !ports.is_empty() {
                    status = format!("{status}, ports {}", ports.join(" "));
                }
                println!(
                    "{:<24} {:<8} {:>4} {:>6}M {:>8}  {:<20}  {}",
                    r.name,
                    r.status.as_str(),
                    cpus,
                    mem,
                    pid,
                    format_ms(r.created_ms),
                    report::for_terminal(&status)
                );
            }
        }
    }
}

/// The published ports of a running sandbox, as its process bound them.
/// `msb port NAME --add/--rm`: each change in order; prints the ports published after them.
async fn change_ports(
    msb: &Msb,
    name: &str,
    add: &[Publish],
    remove: &[(u16, PortProto)],
) -> msb_control_plane::Result<()> {
    let sb = msb.get(name)?;
    let mut now = Vec::new();
    for &(guest, proto) in remove {
        now = sb.unpublish(proto, guest).await?;
    }
    for p in add {
        now = sb.publish(*p).await?;
    }
    if sb.record()?.status != Status::Running {
        println!("{name} is not running: the change applies at its next start");
    }
    for p in now {
        println!("{}/{} -> {}", p.guest, p.proto, p.host);
    }
    Ok(())
}

fn ports(msb: &Msb, name: &str) -> msb_control_plane::Result<Vec<Publish>> {
    let sb = msb.get(name)?;
    if sb.record()?.status != Status::Running {
        return Err(Error::Config(format!("{name} is not running: its ports are bound only while it runs")));
    }
    bound_ports(&sb)
}

/// What the sandbox process wrote in `ports.json` (the caller knows it is running).
fn bound_ports(sb: &NamedSandbox) -> msb_control_plane::Result<Vec<Publish>> {
    let path = sb.dir().join("ports.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "[]".into());
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

async fn inspect(msb: &Msb, name: &str, format: Format) -> msb_control_plane::Result<()> {
    let sb = msb.get(name)?;
    let rec = sb.record()?;
    let runs = msb.runs(name)?;
    let info = if rec.status == Status::Running { sb.info().await.ok() } else { None };
    let mut v = record_json(&rec);
    v["runs"] = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "started": format_ms(r.started_ms),
                "ended": r.ended_ms.map(format_ms),
                "exit_reason": r.exit_reason,
            })
        })
        .collect();
    v["dir"] = serde_json::json!(sb.dir());
    if rec.status == Status::Running {
        v["ports"] = bound_ports(&sb)?
            .into_iter()
            .map(|p| serde_json::json!({"host": p.host.to_string(), "guest": p.guest, "proto": p.proto}))
            .collect();
    }
    if rec.status == Status::Running && !rec.config.secrets.is_empty() {
        // As the running vault holds them: hosts now, and whether each value is locked in
        // memory (never a value).
        if let Ok(live) = sb.secrets().await {
            v["secrets"] = serde_json::to_value(&live).unwrap_or_default();
        }
    }
    if let Some(i) = info {
        v["boot_ms"] = serde_json::json!(i.boot_ms);
        v["exec_sessions"] = serde_json::json!(i.exec_sessions);
        // What the sandbox process's lockdown put in force, and what this host lacks.
        v["hardening"] = serde_json::json!({"applied": i.hardening.applied, "missing": i.hardening.missing});
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Format::Table => {
            if let Some(o) = v.as_object() {
                for (k, val) in o {
                    println!("{k:<14} {}", report::for_terminal(&val.to_string()));
                }
            }
        }
    }
    Ok(())
}

/// Starts `cmd` in `sb` and attaches to it (or leaves it running with `detach`).
async fn exec_in(sb: &NamedSandbox, cmd: &CommandArgs, tty_default: bool, detach: bool) -> Outcome {
    let tty = cmd.tty || tty_default;
    let spec = match cmd.spec(tty) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(Error::Config(e)),
    };
    let forward = !detach && (cmd.interactive || tty);
    match sb.exec_stream(spec, forward).await {
        Ok(ex) if detach => {
            ex.detach();
            Outcome::Detached
        }
        Ok(ex) => attach::attach(ex, forward, tty).await,
        Err(e) => Outcome::Failed(e),
    }
}

fn finish(o: Outcome) -> ExitCode {
    match &o {
        Outcome::Failed(e) => eprintln!("msb: {}", report::message(e)),
        Outcome::Detached => eprintln!("msb: detached; the command keeps running (see `msb logs`)"),
        // A closed pipe is how a pipeline ends: nothing to say.
        Outcome::Exited(_) | Outcome::BrokenPipe => {}
    }
    ExitCode::from(o.code())
}

async fn exec(msb: &Msb, mut a: ExecArgs) -> ExitCode {
    if a.cmd.command.is_empty() {
        return finish(Outcome::Failed(Error::Config("give the command to run after `--`".into())));
    }
    let sb = match msb.get(&a.name) {
        Ok(sb) => sb,
        Err(e) => return finish(Outcome::Failed(e)),
    };
    // The image's ENV, WORKDIR and USER are an exec's defaults, as with `docker exec`.
    let image = sb.record().map(|r| r.config.image_ref().map(String::from));
    match image.and_then(|i| images::defaults(msb, i.as_deref(), &mut a.cmd, None, false)) {
        Ok(()) => finish(exec_in(&sb, &a.cmd, false, false).await),
        Err(e) => finish(Outcome::Failed(e)),
    }
}

/// The normalized reference of an image the store holds; `None` and "base" are the
/// built-in initramfs.
fn resolve_image(msb: &Msb, image: Option<&str>) -> msb_control_plane::Result<(Option<String>, Option<String>)> {
    match image.filter(|i| *i != "base") {
        None => Ok((image.map(String::from), None)),
        Some(i) => {
            let rec = images::store(msb)?.get(i).map_err(images::err)?;
            Ok((Some(rec.reference), Some(rec.config.to_string())))
        }
    }
}

async fn run(msb: &Msb, mut a: RunArgs) -> ExitCode {
    let (image, image_id) = match resolve_image(msb, a.image.as_deref()) {
        Ok(i) => i,
        Err(e) => return finish(Outcome::Failed(e)),
    };
    let image_ref = image.as_deref().filter(|i| *i != "base");
    if image_ref.is_none() && a.cmd.command.is_empty() {
        return finish(Outcome::Failed(Error::Config(
            "give the command to run after `--` (or an image whose CMD it runs)".into(),
        )));
    }
    if let Err(e) = images::defaults(msb, image_ref, &mut a.cmd, a.entrypoint.as_deref(), true) {
        return finish(Outcome::Failed(e));
    }
    let config = match a.machine.config(image) {
        Ok(c) => SandboxConfig { image_id, mounts: owned_by(c.mounts, a.cmd.user.as_deref()), ..c },
        Err(e) => return finish(Outcome::Failed(e)),
    };
    let created = match (&a.name, a.detach) {
        (Some(n), _) => msb.create(n, config),
        (None, true) => msb.create_generated("sb", config),
        (None, false) => msb.create_ephemeral(config),
    };
    let sb = match created {
        Ok(sb) => sb,
        Err(e) => return finish(Outcome::Failed(e)),
    };
    if a.detach {
        if let Err(e) = sb.start_detached().await {
            return finish(Outcome::Failed(e));
        }
        let o = exec_in(&sb, &a.cmd, false, true).await;
        if let Outcome::Failed(e) = o {
            return finish(Outcome::Failed(e));
        }
        println!("{}", sb.name());
        return ExitCode::SUCCESS;
    }
    let owner = match sb.start_attached().await {
        Ok(o) => o,
        Err(e) => return finish(Outcome::Failed(e)),
    };
    let tty_default = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let outcome = exec_in(&sb, &a.cmd, tty_default, false).await;
    if matches!(outcome, Outcome::Detached) {
        // The detach keys leave the sandbox and its session running, as `docker run -it`
        // does: the sandbox stops being owned by this client.
        match sb.release().await {
            Ok(()) => {
                drop(owner);
                eprintln!(
                    "msb: detached; sandbox {} keeps running (`msb exec -t {0} -- sh`, `msb stop {0}`)",
                    sb.name()
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => eprintln!("msb: could not leave the sandbox running ({}); stopping it", report::message(&e)),
        }
    }
    let _ = sb.stop(Duration::from_secs(10)).await;
    let _ = tokio::task::spawn_blocking(move || owner.wait()).await;
    // The process has ended: its run is closed from its exit report (and an ephemeral
    // sandbox removed) now, not by whichever command comes next.
    let _ = msb.reconciled_store();
    finish(outcome)
}

/// Runs the sandbox process's lockdown in a probe (over an empty directory of the home) and
/// says what this host enforces.
fn lockdown_check(home: &std::path::Path) {
    let dir = home.join("tmp").join(format!("doctor-{}", std::process::id()));
    let probe = msb_control_plane::client::private_dir(&dir)
        .and_then(|()| std::process::Command::new(std::env::current_exe()?).arg("lockdown-probe").arg(&dir).output());
    let _ = std::fs::remove_dir_all(&dir);
    let report = probe.ok().and_then(|o| {
        serde_json::from_str::<msb_control_plane::wire::Hardening>(String::from_utf8_lossy(&o.stdout).lines().next()?)
            .ok()
    });
    match report {
        Some(r) => {
            println!("sandbox process lockdown: {}", r.applied.join(", "));
            if r.missing.is_empty() {
                println!("lockdown missing: nothing (--require-hardening can be used)");
            } else {
                println!(
                    "lockdown missing: {} (sandboxes still start; --require-hardening refuses them)",
                    r.missing.join(", ")
                );
            }
        }
        None => {
            println!("sandbox process lockdown: FAILED: the probe could not lock itself down; sandboxes will not start")
        }
    }
}

fn doctor() -> ExitCode {
    let kind = msb_hypervisor::classify();
    println!("/dev/kvm: {}", kind.describe());
    let access = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    match &access {
        Ok(_) => println!("/dev/kvm access: read-write OK"),
        Err(e) => println!("/dev/kvm access: {e} (add yourself to the kvm group or run as root)"),
    }
    let home = match msb_images::msb_home() {
        Ok(home) => home,
        Err(e) => {
            println!("MSB_HOME: {}", report::chain(&e));
            println!("verdict: set MSB_HOME (or HOME) before running sandboxes.");
            return ExitCode::from(1);
        }
    };
    println!("MSB_HOME: {}", home.display());
    let mut ok = access.is_ok();
    for (what, r) in [
        ("guest kernel", msb_images::kernel(&home)),
        ("agentd", msb_images::agentd(&home)),
        ("busybox", msb_images::busybox(&home)),
    ] {
        match r {
            Ok(p) => println!("{what}: {}", p.display()),
            Err(e) => {
                ok = false;
                let remedy = match &e {
                    msb_images::Error::Missing { what, .. } => Some(report::artifact_remedy(*what).to_string()),
                    _ => None,
                };
                println!("{what}: MISSING: {}", report::with_remedy(&e, remedy));
            }
        }
    }
    match msb_control_plane::store::Store::open(&home) {
        Ok(_) => println!("state store: {}", home.join("state.db").display()),
        Err(e) => {
            ok = false;
            println!("state store: {}", report::chain(&e));
        }
    }
    lockdown_check(&home);
    if kind.boots_linux() && ok {
        println!("verdict: sandboxes boot directly on this host (`msb run -- echo hi`).");
        ExitCode::SUCCESS
    } else if kind == msb_hypervisor::KvmKind::Pvm {
        println!(
            "verdict: this host's KVM is the PVM software hypervisor. A standard guest kernel would be \
             instruction-emulated and never finish booting, so `msb run` here will time out. Use a \
             machine with hardware KVM, or the TCG rig: `tests/rig/run-rig.sh demo` (see README)."
        );
        ExitCode::from(1)
    } else {
        println!("verdict: fix the items above before running sandboxes.");
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_gives_mounts_without_an_owner_the_numeric_user() {
        let m = |owner| MountSpec { owner, ..MountSpec::new(std::path::Path::new("/tmp"), "/work", false).unwrap() };
        let own = |uid, gid| Some(FileOwner { uid, gid });
        let got = |user| owned_by(vec![m(None), m(own(7, 8))], user).iter().map(|m| m.owner).collect::<Vec<_>>();
        assert_eq!(got(Some("1000")), vec![own(1000, 1000), own(7, 8)]);
        assert_eq!(got(Some("1000:50")), vec![own(1000, 50), own(7, 8)]);
        for named in [None, Some("root"), Some("app"), Some("app:1"), Some("1:staff"), Some("-1")] {
            assert_eq!(got(named), vec![None, own(7, 8)], "{named:?}");
        }
    }

    fn net(args: &[&str]) -> Result<NetSettings, Error> {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            net: NetArgs,
        }
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        T::try_parse_from(argv).map_err(|e| Error::Config(e.to_string()))?.net.settings()
    }

    #[test]
    fn network_flags_become_one_checked_policy() {
        assert_eq!(net(&[]).unwrap(), NetSettings::default(), "the default is recorded as the default");
        assert!(net(&["--net", "none"]).unwrap().none);
        let s =
            net(&["--allow", "203.0.113.0/24", "--deny", "tcp/*.example.com:443", "--dns", "198.51.100.2"]).unwrap();
        let p = msb_actors::net::Policy::parse(s.policy.as_deref().unwrap()).unwrap();
        let rules: Vec<String> = p.rules().iter().map(|r| r.to_string()).collect();
        assert_eq!(rules, ["deny tcp/*.example.com:443", "allow 203.0.113.0/24", "allow public"], "denies first");
        assert_eq!(p.default_action(), msb_actors::net::Action::Deny);
        assert_eq!(s.dns, Some("198.51.100.2:53".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p");
        std::fs::write(&file, "allow tcp/198.51.100.0/24:80\ndefault deny\n").unwrap();
        let s = net(&["--policy", file.to_str().unwrap(), "--allow", "10.1.2.3"]).unwrap();
        let p = msb_actors::net::Policy::parse(s.policy.as_deref().unwrap()).unwrap();
        assert_eq!(p.rules().len(), 2, "the file replaces the default: no implicit allow public");
        for bad in [
            &["--allow", "300.1.1.1"][..],
            &["--deny", "tcp/"],
            &["--net", "none", "--allow", "public"],
            &["--net", "bridge"],
            &["--dns", "resolver.example"],
            &["--policy", "/nonexistent/policy"],
            &["--rate-out", "100"],
            &["--rate-in", "fast"],
            &["--conn-rate", "0"],
            &["--net", "none", "--rate-out", "1M"],
        ] {
            let e = net(bad).expect_err(&format!("{bad:?}"));
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn rate_flags_become_the_gateways_limits() {
        let s = net(&["--conn-rate", "10", "--rate-out", "2MiB", "--rate-in", "500k"]).unwrap();
        let l = net_limits(&s);
        assert_eq!((l.flows_per_sec, l.flow_burst), (10, 20));
        assert_eq!((l.egress_bytes_per_sec, l.ingress_bytes_per_sec), (Some(2 << 20), Some(500_000)));
        assert_eq!(net_limits(&net(&[]).unwrap()), msb_actors::net::Limits::default(), "no flags: the defaults");
    }

    #[test]
    fn env_entries_take_a_bare_key_from_msbs_own_environment() {
        assert_eq!(env_entry("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(env_entry("PATH"), Ok(("PATH".into(), std::env::var("PATH").unwrap())));
        assert!(env_entry("MSB_SURELY_UNSET_VARIABLE").unwrap_err().contains("not set"));
        assert!(env_entry("=x").is_err());
        assert!(env_entry("A B=x").is_err());
    }

    #[test]
    fn env_files_skip_comments_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("env");
        std::fs::write(&f, "# secrets\n\nTOKEN=s3cr3t\r\nPATH\n").unwrap();
        let got = env_file(&f).unwrap();
        assert_eq!(got[0], ("TOKEN".into(), "s3cr3t".into()));
        assert_eq!(got[1].0, "PATH");
        std::fs::write(&f, "OK=1\nnot a var\n").unwrap();
        assert!(env_file(&f).unwrap_err().contains("line 2"));
        std::fs::write(&f, vec![b'x'; MAX_ENV_FILE as usize + 1]).unwrap();
        assert!(env_file(&f).unwrap_err().contains("larger than"));
        assert!(env_file(&dir.path().join("missing")).is_err());
    }
}
