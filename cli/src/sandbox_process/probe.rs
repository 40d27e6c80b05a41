//! `msb lockdown-probe` (hidden): applies the sandbox process's very lockdown — namespaces,
//! empty root, privileges, Landlock, the runtime seccomp filter and the violation reporter —
//! to itself over one directory, then attempts one action and says how it went. `msb doctor`
//! runs it without an action to learn what this host enforces; the host tests run it once
//! per attack (a violation kills only that probe).
//!
//! Output: the lockdown report as one JSON line, then `allowed` or `denied: ERROR` for the
//! action. A seccomp violation ends the probe with [`VIOLATION_EXIT_CODE`] and the report
//! line on stderr instead.
//!
//! [`VIOLATION_EXIT_CODE`]: msb_hypervisor::sigsys::VIOLATION_EXIT_CODE

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use super::{harden, seccomp};

/// Locks this process down over `dir` and attempts `action` (with `arg`).
pub fn run(dir: &Path, action: Option<&str>, arg: Option<&str>) -> ExitCode {
    let mut plan = harden::Plan {
        skip: harden::Skip::parse(&std::env::var("MSB_HARDEN").unwrap_or_default()).unwrap_or_default(),
        // As a sandbox process with a network is: its host sockets would come from a dialer.
        net: true,
        ..Default::default()
    };
    if let Err(e) = plan.keep(dir, true) {
        eprintln!("msb lockdown-probe: {e}");
        return ExitCode::from(2);
    }
    // The seccomp mode the sandbox process would take (log mode needs its listener first).
    let mode = match seccomp::Mode::parse(std::env::var("MSB_SECCOMP").ok().as_deref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("msb lockdown-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let logger = match mode {
        seccomp::Mode::Log => match super::seccomp_log::spawn() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("msb lockdown-probe: {e}");
                return ExitCode::from(2);
            }
        },
        seccomp::Mode::Trap => None,
    };
    let mut report = match harden::lockdown(&plan) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("msb lockdown-probe: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = msb_hypervisor::sigsys::install_violation_reporter(2, None) {
        eprintln!("msb lockdown-probe: {e}");
        return ExitCode::from(2);
    }
    match super::seccomp_log::install_runtime(mode, std::process::id(), logger.as_ref()) {
        Ok(()) => report.applied.push(if logger.is_some() { "seccomp (log mode)" } else { "seccomp" }.into()),
        Err(e) => {
            eprintln!("msb lockdown-probe: {e}");
            return ExitCode::from(2);
        }
    }
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    let Some(action) = action else { return ExitCode::SUCCESS };
    let _ = std::io::stdout().flush();
    let r = attempt(dir, action, arg.unwrap_or_default());
    match r {
        Ok(()) => println!("allowed"),
        Err(e) => println!("denied: {e}"),
    }
    ExitCode::SUCCESS
}

fn attempt(dir: &Path, action: &str, arg: &str) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match action {
        // What the sandbox needs.
        "write-inside" => {
            let f = dir.join("probe.tmp");
            std::fs::write(&f, b"x").map_err(|x| e(&x))?;
            std::fs::rename(&f, dir.join("probe")).map_err(|x| e(&x))
        }
        "thread" => std::thread::spawn(|| 7).join().map(drop).map_err(|_| "the thread panicked".into()),
        "random" => {
            let mut b = [0u8; 16];
            rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).map(drop).map_err(|x| e(&x))
        }
        "tcp-connect" => std::net::TcpStream::connect(arg).map(drop).map_err(|x| e(&x)),
        // What an attacker would try.
        "read" => std::fs::read(arg).map(drop).map_err(|x| e(&x)),
        "exec" => nix::unistd::execv(c"/bin/true", &[c"/bin/true"]).map(drop).map_err(|x| e(&x)),
        "spawn" => std::process::Command::new("/bin/true").status().map(drop).map_err(|x| e(&x)),
        "unix-socket" => std::os::unix::net::UnixStream::connect(arg).map(drop).map_err(|x| e(&x)),
        "netlink-audit" => nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Netlink,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::empty(),
            nix::sys::socket::SockProtocol::NetlinkAudit,
        )
        .map(drop)
        .map_err(|x| e(&x)),
        "kill" => {
            let pid = arg.parse::<i32>().map_err(|x| e(&x))?;
            let pid = rustix::process::Pid::from_raw(pid).ok_or("pid 0")?;
            rustix::process::kill_process(pid, rustix::process::Signal::CONT).map_err(|x| e(&x))
        }
        "ptrace" => {
            let pid = arg.parse::<i32>().map_err(|x| e(&x))?;
            nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(pid)).map_err(|x| e(&x))
        }
        "mount" => nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|x| e(&x)),
        other => Err(format!("unknown action {other}")),
    }
}
