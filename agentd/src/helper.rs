//! The exec helper: agentd re-executes itself as `agentd --msb-exec-helper` for commands that
//! need set-up between fork and exec that the standard library cannot do without `unsafe`:
//! resource limits, and a new session whose controlling terminal is stdin (PTY sessions).
//!
//! It applies the limits, optionally starts the session, then replaces itself with the
//! command. agentd checks that the program exists and is executable before it starts the
//! helper, so spawn failures are still classified; if `exec` fails anyway the helper reports
//! it on stderr and exits 127 (not found) or 126 (any other reason), as shells do.

use std::os::unix::process::CommandExt;

use msb_protocol::{Rlimit, RlimitResource};
use rustix::process::Resource;

/// The first argument that selects helper mode.
pub const FLAG: &str = "--msb-exec-helper";

fn resource(r: RlimitResource) -> Resource {
    match r {
        RlimitResource::Core => Resource::Core,
        RlimitResource::Cpu => Resource::Cpu,
        RlimitResource::Data => Resource::Data,
        RlimitResource::Fsize => Resource::Fsize,
        RlimitResource::Memlock => Resource::Memlock,
        RlimitResource::Nofile => Resource::Nofile,
        RlimitResource::Nproc => Resource::Nproc,
        RlimitResource::Stack => Resource::Stack,
        RlimitResource::As => Resource::As,
    }
}

fn limit(v: u64) -> Option<u64> {
    (v != msb_protocol::RLIM_INFINITY).then_some(v)
}

/// Arguments that make the helper run `argv` with `rlimits`, in a new session on its stdin's
/// terminal when `ctty`.
pub fn args(ctty: bool, rlimits: &[Rlimit], argv: &[String]) -> Vec<String> {
    let mut a = vec![FLAG.to_string()];
    if ctty {
        a.push("--ctty".into());
    }
    for r in rlimits {
        a.push(format!("--rlimit={}={}:{}", r.resource.name(), r.soft, r.hard));
    }
    a.push("--".into());
    a.extend(argv.iter().cloned());
    a
}

fn fail(msg: String, code: i32) -> ! {
    eprintln!("msb: {msg}");
    std::process::exit(code)
}

/// Runs helper mode with the arguments after [`FLAG`]; never returns.
pub fn main(args: &[String]) -> ! {
    let mut it = args.iter();
    let mut ctty = false;
    for a in it.by_ref() {
        if a == "--" {
            break;
        } else if a == "--ctty" {
            ctty = true;
        } else if let Some(spec) = a.strip_prefix("--rlimit=") {
            let r = Rlimit::parse(spec).unwrap_or_else(|e| fail(e, 126));
            let new = rustix::process::Rlimit { current: limit(r.soft), maximum: limit(r.hard) };
            if let Err(e) = rustix::process::setrlimit(resource(r.resource), new) {
                fail(format!("setting ulimit {}: {e}", r.resource.name()), 126);
            }
        } else {
            fail(format!("exec helper: unknown argument {a:?}"), 126);
        }
    }
    let argv: Vec<&String> = it.collect();
    let Some(program) = argv.first() else { fail("exec helper: no command".into(), 126) };
    if ctty {
        if let Err(e) = rustix::process::setsid() {
            fail(format!("starting a session: {e}"), 126);
        }
        if let Err(e) = rustix::process::ioctl_tiocsctty(std::io::stdin()) {
            fail(format!("taking the terminal: {e}"), 126);
        }
    }
    let e = std::process::Command::new(program).args(&argv[1..]).exec();
    let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    fail(format!("{program}: {e}"), code)
}
