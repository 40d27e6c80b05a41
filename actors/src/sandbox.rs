//! The public [`Sandbox`] handle and its builder.
//!
//! A handle holds two refs: the supervisor's (lifecycle: stop, wait, console, figures) and a
//! narrowed [`AgentRequest`] ref to the agent client (exec traffic). When a request finds the
//! agent gone, the handle asks the supervisor why and reports the stop reason. Lifecycle
//! calls are bounded ([`LIFECYCLE_CALL_TIMEOUT`], plus the graceful time for a stop); only
//! [`Sandbox::wait`] waits as long as the VM runs, which is what it is for.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use msb_devices::{DiskSpec, Machine, MachineSpec};
use msb_schema::agent::{AgentRequest, ExecId};
use msb_schema::exec::OutputCollector;
use msb_schema::limits::{check_size, LIFECYCLE_CALL_TIMEOUT, MAX_BUFFERED_OUTPUT};
use msb_schema::{ExecError, ExecEvent, ExecOutput, ExecSpec, StopReason, WinSize};
use ractor::concurrency::MpscUnboundedReceiver;
use ractor::{Actor, ActorRef, DerivedActorRef, RpcReplyPort};

use crate::supervisor::VaultHandle;
use crate::supervisor::{SandboxSupervisor, SupArgs, SupMsg};
use crate::{Error, Result};
use msb_devices::virtio::fs::Tag;
use msb_fs_broker::actor::FsBrokerArgs;
use msb_fs_broker::MountConfig;
use msb_net_gateway::actor::GatewayArgs;
use msb_net_gateway::actor::SecretsArgs;
use msb_net_gateway::dialer::Dialer;
use msb_net_gateway::limit::Limits;
use msb_net_gateway::policy::Policy;
use msb_net_gateway::stack::NetConfig;
use msb_net_gateway::tls::Interceptor;
pub use msb_schema::fs::{MountSpec, MAX_MOUNTS};
use msb_schema::net::{NetControl, Port, PortListener, PortProto};
use msb_schema::secret::{SecretHost, SecretInfo, SecretName, SecretSpec, SecretValue, VaultControl};
use msb_secret_vault::{SecretVault, Vault, VaultArgs};

/// Default time for a guest to become ready.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a graceful stop waits before forcing.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a sandbox. Defaults: 1 vCPU, 256 MiB, kernel and agent from `MSB_HOME`.
#[derive(Debug)]
pub struct SandboxBuilder {
    cpus: u8,
    memory_mib: u64,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    console_log: Option<PathBuf>,
    boot_timeout: Duration,
    extra_cmdline: String,
    root: Option<(PathBuf, PathBuf)>,
    network: Option<Network>,
    mounts: Vec<MountSpec>,
    /// Secrets with their values (moved into the vault by `create`).
    secrets: Vec<(SecretSpec, SecretValue)>,
    /// Extra CA certificates (PEM files) upstreams of secret hosts are verified against.
    upstream_ca: Vec<PathBuf>,
    read_only_root: bool,
}

/// A sandbox's network: the egress policy, the resolver the gateway asks, and where its
/// decisions are written. The default is the mission's: the public internet and nothing
/// else, the host's resolver, decisions to `tracing` only.
#[derive(Debug, Clone, Default)]
pub struct Network {
    pub policy: Policy,
    /// Where the gateway sends the guest's DNS queries (default: the host's resolver).
    pub upstream_dns: Option<std::net::SocketAddr>,
    /// The audit stream (JSON lines, appended, bounded).
    pub audit: Option<PathBuf>,
    /// The name the audit stream records.
    pub name: String,
    /// Published ports: protocol, host address (port 0 picks a free one), guest port.
    pub publish: Vec<Port>,
    /// New flows a second and optional byte rates each way (default: 64 new flows a
    /// second, burst 128, bytes unlimited).
    pub limits: Limits,
    /// Where the gateway's host sockets (connections, the resolver's, published ports'
    /// listeners) come from: this process (the default), or a dialer outside its jail.
    pub dialer: Dialer,
}

impl Network {
    /// The kernel command-line entry that tells agentd how to configure the guest's side.
    fn cmdline(cfg: &NetConfig) -> String {
        format!(
            "{}{}/{},{},{}/{},{}",
            msb_protocol::NET_CMDLINE,
            cfg.guest_v4,
            cfg.prefix_v4,
            cfg.gateway_v4,
            cfg.guest_v6,
            cfg.prefix_v6,
            cfg.gateway_v6
        )
    }
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_mib: 256,
            kernel: None,
            initramfs: None,
            console_log: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            extra_cmdline: String::new(),
            read_only_root: false,
            root: None,
            network: Some(Network::default()),
            mounts: Vec::new(),
            secrets: Vec::new(),
            upstream_ca: Vec::new(),
        }
    }
}

impl SandboxBuilder {
    /// vCPUs (within [`VCPUS`](msb_schema::limits::VCPUS)).
    pub fn cpus(mut self, n: u8) -> Self {
        self.cpus = n;
        self
    }
    /// Guest memory in MiB (within [`MEMORY_MIB`](msb_schema::limits::MEMORY_MIB)); a limit, host memory is used only as
    /// the guest touches it.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn kernel(mut self, p: impl Into<PathBuf>) -> Self {
        self.kernel = Some(p.into());
        self
    }
    pub fn initramfs(mut self, p: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(p.into());
        self
    }
    /// Where the guest console is logged (default: not on disk, only a bounded tail in memory).
    pub fn console_log(mut self, p: impl Into<PathBuf>) -> Self {
        self.console_log = Some(p.into());
        self
    }
    pub fn boot_timeout(mut self, d: Duration) -> Self {
        self.boot_timeout = d;
        self
    }
    /// Boots into an image: `base` (the image's read-only root filesystem, shared, never
    /// written) under `writable` (this sandbox's own disk, where its writes land), joined by
    /// an overlay in the guest. Without one the sandbox runs in its initramfs.
    pub fn root(mut self, base: impl Into<PathBuf>, writable: impl Into<PathBuf>) -> Self {
        self.root = Some((base.into(), writable.into()));
        self
    }
    /// The sandbox's network (default: [`Network::default`], the public internet only).
    pub fn network(mut self, net: Network) -> Self {
        self.network = Some(net);
        self
    }
    /// No network device at all (`--net none`).
    pub fn no_network(mut self) -> Self {
        self.network = None;
        self
    }
    /// Shares a host directory at `spec.guest` (at most [`MAX_MOUNTS`] per sandbox), served
    /// by its own filesystem broker confined to it; a read-only one is enforced on the host.
    /// Files appear owned by root (the default workload user).
    pub fn mount(mut self, spec: MountSpec) -> Self {
        self.mounts.push(spec);
        self
    }

    /// A secret: the guest sees `spec.placeholder` as the environment variable
    /// `spec.name` of every command; the gateway puts `value` in its place only in requests
    /// over TLS to `spec.hosts` (see `research/secrets.md`). At most
    /// [`MAX_SECRETS`](msb_schema::secret::MAX_SECRETS); needs a network.
    pub fn secret(mut self, spec: SecretSpec, value: SecretValue) -> Self {
        self.secrets.push((spec, value));
        self
    }
    /// A PEM file of CA certificates that upstreams of secret hosts may also be verified
    /// against (private endpoints, tests); the host's roots are always used.
    pub fn tls_upstream_ca(mut self, pem: impl Into<PathBuf>) -> Self {
        self.upstream_ca.push(pem.into());
        self
    }

    /// The kernel command-line entry naming each mount's tag and guest path.
    fn mounts_cmdline(&self) -> String {
        let each: Vec<String> = self
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{}:{}{}", mount_tag(i), m.guest, if m.read_only { ":ro" } else { "" }))
            .collect();
        format!("{}{}", msb_protocol::MOUNTS_CMDLINE, each.join(","))
    }

    /// Checks the mounts: how many, guest paths distinct and valid, host paths directories.
    fn check_mounts(&self) -> Result<()> {
        msb_schema::fs::check_mounts(&self.mounts).map_err(|e| Error::Config(e.to_string()))?;
        for m in &self.mounts {
            if !m.host.is_dir() {
                return Err(Error::Config(format!(
                    "mount source {} is not a directory (or does not exist); name an existing host directory",
                    m.host.display()
                )));
            }
        }
        Ok(())
    }
    /// A read-only root file system once the agent has set the guest up; `/tmp` is a fresh
    /// writable tmpfs. Refused with secrets (their CA goes into the guest's trust store).
    pub fn read_only_root(mut self, on: bool) -> Self {
        self.read_only_root = on;
        self
    }

    /// Extra kernel command-line arguments (appended).
    pub fn kernel_args(mut self, args: impl Into<String>) -> Self {
        self.extra_cmdline = args.into();
        self
    }

    fn spec(&self) -> Result<MachineSpec> {
        check_size(self.cpus, self.memory_mib)?;
        // The home is only consulted (and checked) for what was not given explicitly.
        let home = || -> Result<std::path::PathBuf> {
            let home = msb_images::msb_home()?;
            msb_images::ensure_private(&home)?;
            Ok(home)
        };
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => msb_images::kernel(&home()?)?,
        };
        let initramfs = match &self.initramfs {
            Some(i) => i.clone(),
            None => {
                let home = home()?;
                msb_images::initramfs::cached(&home, &msb_images::agentd(&home)?, &msb_images::busybox(&home)?)?
            }
        };
        let mut extra_cmdline = self.extra_cmdline.clone();
        if self.read_only_root {
            if !self.secrets.is_empty() {
                return Err(Error::Config(
                    "a read-only root cannot take secrets (their CA is written into the guest's trust store); \
                     drop --read-only or the secrets"
                        .into(),
                ));
            }
            extra_cmdline = format!("{} {}", msb_protocol::READ_ONLY_CMDLINE, extra_cmdline).trim_end().to_string();
        }
        let disks = match &self.root {
            Some((base, writable)) => {
                extra_cmdline = format!("{} {}", msb_protocol::ROOT_CMDLINE, extra_cmdline).trim_end().to_string();
                vec![
                    DiskSpec { path: base.clone(), read_only: true },
                    DiskSpec { path: writable.clone(), read_only: false },
                ]
            }
            None => Vec::new(),
        };
        self.check_mounts()?;
        if !self.mounts.is_empty() {
            extra_cmdline = format!("{} {}", self.mounts_cmdline(), extra_cmdline).trim_end().to_string();
        }
        let net_cfg = NetConfig::default();
        if self.network.is_some() {
            extra_cmdline = format!("{} {}", Network::cmdline(&net_cfg), extra_cmdline).trim_end().to_string();
        }
        Ok(MachineSpec {
            vcpus: self.cpus,
            memory_mib: self.memory_mib,
            kernel,
            initramfs,
            console_log: self.console_log.clone(),
            extra_cmdline,
            disks,
            net: self.network.as_ref().map(|_| net_cfg.guest_mac),
            mounts: (0..self.mounts.len()).map(|i| Tag::new(&mount_tag(i)).expect("msb-fs-N is a valid tag")).collect(),
        })
    }

    /// Boots the sandbox and waits until its agent is ready.
    pub async fn create(mut self) -> Result<Sandbox> {
        let clock = Instant::now();
        let spec = self.spec()?;
        let secrets = std::mem::take(&mut self.secrets);
        let secret_env: Vec<(String, String)> =
            secrets.iter().map(|(s, _)| (s.name.to_string(), s.placeholder.to_string())).collect();
        let placeholders: Vec<_> =
            secrets.iter().map(|(s, _)| (s.name.clone(), s.placeholder.clone(), s.on_violation)).collect();
        let (vault, interception) = match (secrets.is_empty(), &self.network) {
            (true, _) => (None, None),
            (false, None) => {
                return Err(Error::Config("secrets need a network (they are substituted by its gateway)".into()))
            }
            (false, Some(n)) => {
                let (v, i) = start_vault(&n.name, secrets, &self.upstream_ca).await?;
                (Some(v), Some(i))
            }
        };
        let ca_pem = interception.as_ref().map(|(i, _)| i.ca_pem().to_string());
        let machine = tokio::task::spawn_blocking(move || Machine::build(&spec, clock))
            .await
            .map_err(|e| Error::Spawn(format!("VM setup task: {e}")))??;
        let mut published = Vec::new();
        let net = match self.network.clone() {
            None => None,
            Some(n) => {
                if n.publish.len() > msb_schema::net::MAX_PUBLISHED {
                    return Err(Error::Config(format!(
                        "{} published ports: at most {} per sandbox",
                        n.publish.len(),
                        msb_schema::net::MAX_PUBLISHED
                    )));
                }
                n.limits.check().map_err(|e| Error::Config(format!("network limits: {e}")))?;
                let mut listeners = Vec::new();
                for p in &n.publish {
                    let (l, bound) = bind_port(&n.dialer, p).await?;
                    published.push(bound);
                    listeners.push((l, p.guest));
                }
                Some(GatewayArgs {
                    sandbox: n.name,
                    net: NetConfig::default(),
                    policy: n.policy,
                    upstream_dns: n.upstream_dns,
                    audit: n.audit,
                    seed: random_seed(),
                    published: listeners,
                    limits: n.limits,
                    dialer: n.dialer.clone(),
                    secrets: interception.map(|(interceptor, hosts)| SecretsArgs {
                        hosts,
                        interceptor,
                        placeholders: placeholders.clone(),
                    }),
                })
            }
        };
        let (max_inodes, max_handles) =
            if self.mounts.is_empty() { (0, 0) } else { msb_fs_broker::fd_budget(self.mounts.len()) };
        let mounts = self
            .mounts
            .iter()
            .map(|m| {
                let owner = m.owner.unwrap_or_default();
                FsBrokerArgs {
                    root: m.host.clone(),
                    config: MountConfig {
                        read_only: m.read_only,
                        uid: owner.uid,
                        gid: owner.gid,
                        max_inodes,
                        max_handles,
                        identity: m.identity.map(|i| (i.dev, i.ino)),
                        ..MountConfig::default()
                    },
                }
            })
            .collect();
        let (sup, _) = Actor::spawn(None, SandboxSupervisor, SupArgs { machine, net, mounts, vault })
            .await
            .map_err(|e| Error::Spawn(e.to_string()))?;
        let agent = match sup.call(SupMsg::AgentRef, Some(LIFECYCLE_CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(agent)) => agent,
            _ => {
                sup.stop(None);
                return Err(Error::Spawn("the sandbox supervisor did not hand out its agent".into()));
            }
        };
        let published = std::sync::Mutex::new(published);
        let dialer = self.network.as_ref().map(|n| n.dialer.clone()).unwrap_or_default();
        let mut sb = Sandbox {
            sup: sup.clone(),
            link: AgentLink { agent, sup },
            created: clock,
            published,
            dialer,
            default_env: secret_env,
            ca_pem: ca_pem.clone(),
        };
        let ready = tokio::time::timeout(self.boot_timeout, sb.sup.call(SupMsg::WaitReady, None)).await;
        match ready {
            Ok(Ok(ractor::rpc::CallResult::Success(Ok(_agent)))) => match ca_pem {
                None => Ok(sb),
                Some(pem) => match sb.install_ca(&pem).await {
                    Ok(()) => Ok(sb),
                    Err(e) => {
                        let _ = sb.kill().await;
                        Err(e)
                    }
                },
            },
            Ok(Ok(ractor::rpc::CallResult::Success(Err(e)))) => {
                let _ = sb.kill().await;
                Err(e.into())
            }
            Ok(_) => {
                let e = sb.link.why_gone().await;
                let _ = sb.kill().await;
                Err(e.into())
            }
            Err(_) => {
                let tail = sb.console_tail().await.unwrap_or_default();
                let _ = sb.kill().await;
                Err(Error::BootTimeout { secs: self.boot_timeout.as_secs(), console_tail: tail })
            }
        }
    }
}

/// Starts the vault with `secrets` and makes the gateway's interceptor (the sandbox's CA,
/// upstream trust: the host's roots plus `upstream_ca`); returns the vault for the
/// supervisor, and the interceptor with the hosts for the gateway.
async fn start_vault(
    label: &str,
    secrets: Vec<(SecretSpec, SecretValue)>,
    upstream_ca: &[PathBuf],
) -> Result<(VaultHandle, (std::sync::Arc<Interceptor>, Vec<msb_schema::secret::SecretHost>))> {
    let vault = Vault::new(secrets).map_err(|e| Error::Config(e.to_string()))?;
    let hosts = vault.hosts();
    let mut roots = Vec::new();
    for f in upstream_ca {
        let certs = msb_net_gateway::tls::load_pem_certs(f)
            .map_err(|e| Error::Config(format!("--tls-upstream-ca {}: {e}", f.display())))?;
        roots.extend(certs);
    }
    let (actor, _) =
        Actor::spawn(None, SecretVault, VaultArgs { vault }).await.map_err(|e| Error::Spawn(e.to_string()))?;
    let interceptor = match Interceptor::new(label, roots, actor.get_derived()) {
        Ok(i) => std::sync::Arc::new(i),
        Err(e) => {
            actor.stop(None);
            return Err(Error::Config(format!("secrets: {e}")));
        }
    };
    let handle = VaultHandle { cell: actor.get_cell(), control: actor.get_derived() };
    Ok((handle, (interceptor, hosts)))
}

/// The guest paths agentd's `--msb-ca` mode puts the CA in, and the variables that point
/// programs at them.
fn ca_env(bundle: &str) -> Vec<(String, String)> {
    let bare = "/usr/local/share/ca-certificates/msb-sandbox.crt";
    let mut env: Vec<(String, String)> =
        ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "AWS_CA_BUNDLE"]
            .iter()
            .map(|k| (k.to_string(), bundle.to_string()))
            .collect();
    env.push(("NODE_EXTRA_CA_CERTS".into(), bare.into()));
    env.push(("DENO_CERT".into(), bare.into()));
    env
}

/// The virtio-fs tag of a sandbox's `i`th mount.
fn mount_tag(i: usize) -> String {
    format!("msb-fs-{i}")
}

/// A seed for the gateway's TCP sequence numbers and DNS ids (std seeds `RandomState` from
/// the OS's randomness).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Figures of a sandbox, for benchmarks and diagnostics.
#[derive(Debug, Clone)]
pub struct BootTimes {
    /// From `create()` to the guest init's boot-timer write.
    pub to_init: Option<Duration>,
    /// This process's resident memory, split into guest RAM and the rest (while it runs).
    pub memory: Option<msb_hypervisor::memory::Resident>,
}

/// The exec path of a handle: a narrowed ref to the agent client, and the supervisor to ask
/// why when the agent is gone.
#[derive(Clone)]
struct AgentLink {
    agent: DerivedActorRef<AgentRequest>,
    sup: ActorRef<SupMsg>,
}

impl AgentLink {
    /// Sends a request and waits for its answer; a dropped request reports why.
    async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(RpcReplyPort<std::result::Result<T, ExecError>>) -> AgentRequest,
    ) -> std::result::Result<T, ExecError> {
        let (tx, rx) = ractor::concurrency::oneshot();
        if self.agent.send_message(f(tx.into())).is_err() {
            return Err(self.why_gone().await);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.why_gone().await),
        }
    }

    /// A request was dropped because the tree is going down: give the supervisor a moment
    /// to record why, and report that.
    async fn why_gone(&self) -> ExecError {
        let reason = match self.sup.call(SupMsg::Wait, Some(Duration::from_secs(5))).await {
            Ok(ractor::rpc::CallResult::Success(reason)) => reason,
            _ => return ExecError::Gone,
        };
        let console_tail = match self.sup.call(SupMsg::ConsoleTail, Some(LIFECYCLE_CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(t)) => t,
            _ => String::new(),
        };
        ExecError::VmStopped { reason, console_tail }
    }
}

/// A running sandbox. Dropping it kills the VM.
pub struct Sandbox {
    sup: ActorRef<SupMsg>,
    link: AgentLink,
    created: Instant,
    /// Changed only by [`Sandbox::publish`] / [`Sandbox::unpublish`], after the gateway did.
    published: std::sync::Mutex<Vec<Port>>,
    /// Where a port published live gets its listener.
    dialer: Dialer,
    /// Environment every command gets unless it sets the variable itself: each secret's
    /// placeholder, and where the sandbox's CA is.
    default_env: Vec<(String, String)>,
    /// The sandbox's interception CA (PEM), when it has secrets.
    ca_pem: Option<String>,
}

/// Binds a published port's host socket; returns it and the port as bound (a port 0
/// resolved).
async fn bind_port(dialer: &Dialer, p: &Port) -> Result<(PortListener, Port)> {
    let why = |e: std::io::Error| {
        Error::Config(format!("publishing {}/{} (to guest port {}): {e}", p.host, p.proto, p.guest))
    };
    let l = dialer.bind(p.proto, p.host).await.map_err(why)?;
    let host = l.local_addr().map_err(why)?;
    Ok((l, Port { host, ..*p }))
}

impl Sandbox {
    /// The published ports: protocol, the host address each is bound to (with the port
    /// picked for a port 0) and the guest port it leads to.
    pub fn published(&self) -> Vec<Port> {
        self.published.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Publishes `port` (host port 0: a free one) while the sandbox runs; returns the
    /// address bound. Refused if the address is taken, past
    /// [`msb_schema::net::MAX_PUBLISHED`] ports, or without a network.
    pub async fn publish(&self, port: Port) -> Result<std::net::SocketAddr> {
        let (listener, bound) = bind_port(&self.dialer, &port).await?;
        let guest = port.guest;
        self.call(|reply| SupMsg::Net(NetControl::Publish { listener, guest, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?
            .map_err(Error::Config)?;
        if let Ok(mut p) = self.published.lock() {
            p.push(bound);
        }
        Ok(bound.host)
    }

    /// Closes the published `proto` ports leading to guest port `guest`; returns the host
    /// addresses closed (none: nothing led there). TCP connections made through them stay
    /// up; a UDP port's peers go with it.
    pub async fn unpublish(&self, proto: PortProto, guest: u16) -> Result<Vec<std::net::SocketAddr>> {
        let closed = self
            .call(|reply| SupMsg::Net(NetControl::Unpublish { proto, guest, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?;
        if let Ok(mut p) = self.published.lock() {
            p.retain(|p| (p.proto, p.guest) != (proto, guest));
        }
        Ok(closed)
    }

    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(RpcReplyPort<T>) -> SupMsg, within: Duration) -> Result<T> {
        match self.sup.call(f, Some(within)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            _ => Err(self.link.why_gone().await.into()),
        }
    }

    /// Runs `program args…` and waits for it, collecting its output.
    pub async fn exec<I, S>(&self, program: &str, args: I) -> std::result::Result<ExecOutput, ExecError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut argv = vec![program.to_string()];
        argv.extend(args.into_iter().map(Into::into));
        self.exec_argv(argv, Vec::new(), None).await
    }

    /// Runs `argv` with extra environment and an optional working directory.
    pub async fn exec_argv(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
    ) -> std::result::Result<ExecOutput, ExecError> {
        self.exec_spec(ExecSpec { argv, env, cwd, ..Default::default() }).await
    }

    /// Runs a command described in full (user, timeout, stdin, …) and collects its output
    /// (at most [`MAX_BUFFERED_OUTPUT`] bytes).
    pub async fn exec_spec(&self, mut spec: ExecSpec) -> std::result::Result<ExecOutput, ExecError> {
        self.with_defaults(&mut spec);
        self.link.ask(|reply| AgentRequest::Exec { spec, reply }).await
    }

    /// Starts a command and returns a handle that streams its output as it arrives and takes
    /// stdin and signals while it runs. `spec.stdin` is written first; stdin stays open until
    /// [`ExecHandle::close_stdin`].
    pub async fn exec_stream(&self, mut spec: ExecSpec) -> std::result::Result<ExecHandle, ExecError> {
        self.with_defaults(&mut spec);
        let (events, rx) = ractor::concurrency::mpsc_unbounded();
        let id = self.link.ask(|reply| AgentRequest::ExecStream { spec, events, reply }).await?;
        Ok(ExecHandle { id, rx, control: ExecControl { id, link: self.link.clone() }, done: false })
    }

    /// Asks the guest to sync and shut down, forcing it after the default timeout.
    pub async fn stop(&self) -> Result<StopReason> {
        self.stop_timeout(DEFAULT_STOP_TIMEOUT).await
    }

    /// Asks the guest to sync and shut down, forcing it after `graceful`.
    pub async fn stop_timeout(&self, graceful: Duration) -> Result<StopReason> {
        let within = graceful.saturating_add(LIFECYCLE_CALL_TIMEOUT);
        let r = self.call(|reply| SupMsg::Stop { graceful: Some(graceful), reply }, within).await;
        self.sup.stop(None);
        r
    }

    /// Stops the VM at once.
    pub async fn kill(&self) -> Result<StopReason> {
        let r = self.call(|reply| SupMsg::Stop { graceful: None, reply }, LIFECYCLE_CALL_TIMEOUT).await;
        self.sup.stop(None);
        r
    }

    /// Waits until the VM stops by itself (or is stopped).
    pub async fn wait(&self) -> Result<StopReason> {
        match self.sup.call(SupMsg::Wait, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            _ => Err(ExecError::Gone.into()),
        }
    }

    /// The last bytes the guest printed on its serial console.
    pub async fn console_tail(&self) -> Result<String> {
        self.call(SupMsg::ConsoleTail, LIFECYCLE_CALL_TIMEOUT).await
    }

    /// Boot and memory figures.
    pub async fn boot_times(&self) -> Result<BootTimes> {
        self.call(SupMsg::BootTimes, LIFECYCLE_CALL_TIMEOUT).await
    }

    /// When `create()` started.
    pub fn created_at(&self) -> Instant {
        self.created
    }

    /// Replaces the egress policy of the running sandbox; flows the new policy denies are
    /// reset at once. Refused (nothing changes) for a sandbox without a network.
    pub async fn set_policy(&self, policy: &Policy) -> Result<()> {
        let text = policy.to_string();
        self.call(|reply| SupMsg::Net(NetControl::SetPolicy { policy: text, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?
            .map_err(Error::Config)
    }

    /// Adds the sandbox's default environment to `spec` (its own variables win).
    fn with_defaults(&self, spec: &mut ExecSpec) {
        for (k, v) in &self.default_env {
            if !spec.env.iter().any(|(n, _)| n == k) {
                spec.env.push((k.clone(), v.clone()));
            }
        }
    }

    /// Puts the sandbox's CA into the guest's trust store (agentd's `--msb-ca` mode,
    /// replacing the CA of an earlier start) and points every command at it.
    async fn install_ca(&mut self, pem: &str) -> Result<()> {
        let spec = ExecSpec {
            argv: vec!["/proc/self/exe".into(), "--msb-ca".into()],
            stdin: Some(pem.as_bytes().to_vec()),
            timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let out = self.link.ask(|reply| AgentRequest::Exec { spec, reply }).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status != msb_schema::ExitStatus::Code(0) || !stdout.starts_with('/') {
            return Err(Error::Config(format!(
                "installing the sandbox's CA in the guest failed ({:?}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        self.default_env.extend(ca_env(&stdout));
        Ok(())
    }

    /// The sandbox's interception CA (PEM), when it has secrets.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The secrets as they stand (names, hosts, placeholders; never values).
    pub async fn secrets(&self) -> Result<Vec<SecretInfo>> {
        self.call(|reply| SupMsg::Vault(VaultControl::Describe(reply)), LIFECYCLE_CALL_TIMEOUT).await
    }

    /// A new value for secret `name`, used from the next request (kept-alive connections
    /// included); the old value is wiped.
    pub async fn rotate_secret(&self, name: &SecretName, value: SecretValue) -> Result<()> {
        let name = name.clone();
        self.call(|reply| SupMsg::Vault(VaultControl::Rotate { name, value, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?
            .map_err(Error::Config)
    }

    /// New hosts for secret `name`, from the next request on.
    pub async fn set_secret_hosts(&self, name: &SecretName, hosts: Vec<SecretHost>) -> Result<()> {
        let name = name.clone();
        self.call(|reply| SupMsg::Vault(VaultControl::SetHosts { name, hosts, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?
            .map_err(Error::Config)?;
        self.sync_secret_hosts().await
    }

    /// Forgets secret `name`: its placeholder goes out unchanged from the next request.
    pub async fn remove_secret(&self, name: &SecretName) -> Result<()> {
        let name = name.clone();
        self.call(|reply| SupMsg::Vault(VaultControl::Remove { name, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await?
            .map_err(Error::Config)?;
        self.sync_secret_hosts().await
    }

    /// Tells the gateway the hosts the vault's secrets now go to.
    async fn sync_secret_hosts(&self) -> Result<()> {
        let secrets = self.secrets().await?;
        let placeholders = secrets.iter().map(|s| (s.name.clone(), s.placeholder.clone(), s.on_violation)).collect();
        let hosts: Vec<SecretHost> = secrets.into_iter().flat_map(|s| s.hosts).collect();
        self.call(|reply| SupMsg::Net(NetControl::SecretHosts { hosts, placeholders, reply }), LIFECYCLE_CALL_TIMEOUT)
            .await
    }

    /// The egress policy in force, as policy-file text (empty without a network).
    pub async fn policy(&self) -> Result<String> {
        self.call(|reply| SupMsg::Net(NetControl::Policy(reply)), LIFECYCLE_CALL_TIMEOUT).await
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.sup.cast(SupMsg::Kill);
    }
}

/// A running streaming exec (see [`Sandbox::exec_stream`]).
///
/// Reading an event credits the guest for it; a handle that is not read stalls only its own
/// command once [`OUTPUT_WINDOW`](msb_protocol::OUTPUT_WINDOW) is unread. Dropping the handle
/// before the end lets go of the output: the command runs on and what it prints is dropped.
/// Stdin writes wait until the guest has room, so a writer that is not also reading output
/// (from another task, through [`ExecHandle::control`]) can wait on a command that is itself
/// waiting to be read.
pub struct ExecHandle {
    id: ExecId,
    rx: MpscUnboundedReceiver<ExecEvent>,
    control: ExecControl,
    done: bool,
}

/// The input side of a streaming exec: stdin, signals, terminal size. It can be cloned and
/// used from another task while the [`ExecHandle`] is read.
#[derive(Clone)]
pub struct ExecControl {
    id: ExecId,
    link: AgentLink,
}

impl ExecControl {
    /// Writes to the command's stdin, in chunks of at most
    /// [`STDIN_CHUNK`](msb_schema::limits::STDIN_CHUNK), each answered once the guest has
    /// taken it; fails with [`ExecError::StdinClosed`] once the command has exited.
    pub async fn write_stdin(&self, data: &[u8]) -> std::result::Result<(), ExecError> {
        for chunk in data.chunks(msb_schema::limits::STDIN_CHUNK) {
            let (id, data) = (self.id, chunk.to_vec());
            self.link.ask(|reply| AgentRequest::Stdin { id, data, reply }).await?;
        }
        Ok(())
    }

    /// Closes the command's stdin (it reads end of file).
    pub async fn close_stdin(&self) -> std::result::Result<(), ExecError> {
        let id = self.id;
        self.link.ask(|reply| AgentRequest::Stdin { id, data: Vec::new(), reply }).await
    }

    /// Sends a signal (1..=64) to the command's process group.
    pub async fn signal(&self, signal: i32) -> std::result::Result<(), ExecError> {
        let id = self.id;
        self.link.ask(|reply| AgentRequest::Signal { id, signal, reply }).await
    }

    /// Resizes the command's terminal (a PTY exec); the guest sees SIGWINCH.
    pub async fn resize(&self, rows: u16, cols: u16) -> std::result::Result<(), ExecError> {
        let (id, size) = (self.id, WinSize { rows, cols });
        self.link.ask(|reply| AgentRequest::Resize { id, size, reply }).await
    }
}

impl ExecHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The input side, for another task.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// The next event; `None` after the final `Exited`/`Failed`.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        let ev = self.rx.recv().await;
        match &ev {
            Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => {
                let _ = self.control.link.agent.send_message(AgentRequest::Consumed { id: self.id, bytes: d.len() });
            }
            Some(ExecEvent::Exited(_) | ExecEvent::Failed(_)) | None => self.done = true,
        }
        ev
    }

    /// See [`ExecControl::write_stdin`].
    pub async fn write_stdin(&self, data: &[u8]) -> std::result::Result<(), ExecError> {
        self.control.write_stdin(data).await
    }

    /// See [`ExecControl::close_stdin`].
    pub async fn close_stdin(&self) -> std::result::Result<(), ExecError> {
        self.control.close_stdin().await
    }

    /// See [`ExecControl::signal`].
    pub async fn signal(&self, signal: i32) -> std::result::Result<(), ExecError> {
        self.control.signal(signal).await
    }

    /// See [`ExecControl::resize`].
    pub async fn resize(&self, rows: u16, cols: u16) -> std::result::Result<(), ExecError> {
        self.control.resize(rows, cols).await
    }

    /// Reads everything that is left (at most [`MAX_BUFFERED_OUTPUT`] bytes) and returns it
    /// with the exit status.
    pub async fn wait(mut self) -> std::result::Result<ExecOutput, ExecError> {
        let mut out = OutputCollector::new(MAX_BUFFERED_OUTPUT);
        while let Some(ev) = self.next().await {
            if let Some(done) = out.take(ev) {
                return done;
            }
        }
        Err(ExecError::Gone)
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if !self.done {
            // Events still queued were never read: the agent acknowledges what it is owed.
            let _ = self.control.link.agent.send_message(AgentRequest::Release { id: self.id });
        }
    }
}
