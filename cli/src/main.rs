//! `msb`: the command line.
//!
//! Exit codes of `msb run` follow docker's: the command's own status; 128+N if a signal N
//! killed it; 127 if it was not found; 126 if it could not be executed; 124 if it ran past
//! `--timeout`; 125 if msb itself
//! failed (bad configuration, VM did not boot, …).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use msb_actors::{Error, ExecSpec, ExitStatus, Sandbox, SpawnErrorKind};

#[derive(Parser)]
#[command(name = "msb", version, about = "Run untrusted code in hardware-isolated microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a sandbox, run one command in it, print its output, and exit with its status.
    Run(Box<RunArgs>),
    /// Report what this host can run: the kind of /dev/kvm, permissions, kernel, agent.
    Doctor,
}

#[derive(clap::Args)]
struct RunArgs {
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB (a limit: host memory is used only as the guest touches it).
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Environment variables for the command (KEY=VALUE).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory inside the guest.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// Run as this user: root, UID or UID:GID.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Pass this process's stdin to the command (read to the end first).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Guest kernel (default: $MSB_HOME/kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Write the guest's serial console here.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Extra guest kernel command-line arguments (e.g. "loglevel=7" to see the boot).
    #[arg(long)]
    kernel_args: Option<String>,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MSB_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("msb: cannot start the runtime: {e}");
            return ExitCode::from(125);
        }
    };
    match cli.cmd {
        Cmd::Run(args) => rt.block_on(run(*args)),
        Cmd::Doctor => doctor(),
    }
}

async fn run(a: RunArgs) -> ExitCode {
    let mut env = Vec::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => {
                eprintln!("msb: --env {kv:?} is not KEY=VALUE");
                return ExitCode::from(125);
            }
        }
    }
    let mut b = Sandbox::builder().cpus(a.cpus).memory_mib(a.memory).boot_timeout(Duration::from_secs(a.boot_timeout));
    if let Some(k) = a.kernel {
        b = b.kernel(k);
    }
    if let Some(k) = a.kernel_args {
        b = b.kernel_args(k);
    }
    if let Some(c) = a.console_log {
        b = b.console_log(c);
    }
    let sb = match b.create().await {
        Ok(sb) => sb,
        Err(e) => {
            eprintln!("msb: {e}");
            return ExitCode::from(125);
        }
    };
    let stdin = if a.interactive {
        let mut buf = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
            eprintln!("msb: reading stdin: {e}");
            return ExitCode::from(125);
        }
        Some(buf)
    } else {
        None
    };
    let timeout = match a.timeout.map(Duration::try_from_secs_f64) {
        Some(Err(_)) => {
            eprintln!("msb: --timeout must be a positive number of seconds");
            return ExitCode::from(125);
        }
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let spec = ExecSpec { argv: a.command.clone(), env, cwd: a.workdir, user: a.user, timeout, stdin };
    let result = sb.exec_spec(spec).await;
    let _ = sb.stop().await;
    match result {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
            let _ = std::io::stdout().flush();
            match out.status {
                ExitStatus::Code(c) => ExitCode::from(c.clamp(0, 255) as u8),
                ExitStatus::Signal(s) => ExitCode::from((128 + s).clamp(0, 255) as u8),
            }
        }
        Err(e @ Error::TimedOut { .. }) => {
            eprintln!("msb: {e}");
            ExitCode::from(124)
        }
        Err(Error::SpawnFailed { kind, message }) => {
            eprintln!("msb: {message}");
            ExitCode::from(match kind {
                SpawnErrorKind::NotFound => 127,
                SpawnErrorKind::PermissionDenied | SpawnErrorKind::NotExecutable => 126,
                _ => 125,
            })
        }
        Err(e) => {
            eprintln!("msb: {e}");
            ExitCode::from(125)
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
    let home = msb_actors::home::msb_home();
    println!("MSB_HOME: {}", home.display());
    let mut ok = access.is_ok();
    for (what, r) in [
        ("guest kernel", msb_actors::home::kernel(&home)),
        ("agentd", msb_actors::home::agentd(&home)),
        ("busybox", msb_actors::home::busybox(&home)),
    ] {
        match r {
            Ok(p) => println!("{what}: {}", p.display()),
            Err(e) => {
                ok = false;
                println!("{what}: MISSING: {e}");
            }
        }
    }
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
