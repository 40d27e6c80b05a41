//! The exec helper: agentd re-executes itself as `agentd --msb-exec-helper` for commands that
//! need set-up between fork and exec that the standard library cannot do without `unsafe`:
//! resource limits, a new session whose controlling terminal is stdin (PTY sessions), and a
//! user switch with supplementary groups.
//!
//! It applies the limits (as root, so hard limits can be raised), optionally starts the
//! session, sets groups, gid and uid in that order, enters the working directory as that user, then
//! replaces itself with the command.
//! The helper is single-threaded, so the per-thread Linux id system calls are process-wide. agentd checks that the program exists and is executable before it starts the
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

/// Who the command runs as.
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What the helper sets up before it runs the command.
pub struct Setup<'a> {
    /// A new session on stdin's terminal.
    pub ctty: bool,
    pub rlimits: &'a [Rlimit],
    pub user: Option<&'a Identity>,
    /// The working directory, entered after the user switch (so a user cannot start in a
    /// directory it could not reach itself).
    pub cwd: Option<&'a str>,
    /// The restricted profile: the capability bounding and ambient sets emptied before the
    /// user switch, `no_new_privs` after it.
    pub restricted: bool,
}

/// Arguments that make the helper run `argv` with `setup`.
pub fn args(setup: &Setup, argv: &[String]) -> Vec<String> {
    let mut a = vec![FLAG.to_string()];
    if setup.ctty {
        a.push("--ctty".into());
    }
    let (rlimits, user) = (setup.rlimits, setup.user);
    if let Some(u) = user {
        let groups: Vec<String> = u.groups.iter().map(u32::to_string).collect();
        a.push(format!("--user={}:{}:{}", u.uid, u.gid, groups.join(",")));
    }
    for r in rlimits {
        a.push(format!("--rlimit={}={}:{}", r.resource.name(), r.soft, r.hard));
    }
    if let Some(dir) = setup.cwd {
        a.push(format!("--cwd={dir}"));
    }
    if setup.restricted {
        a.push("--restricted".into());
    }
    a.push("--".into());
    a.extend(argv.iter().cloned());
    a
}

fn parse_identity(spec: &str) -> Option<Identity> {
    let mut parts = spec.splitn(3, ':');
    let uid = parts.next()?.parse().ok()?;
    let gid = parts.next()?.parse().ok()?;
    let groups = parts.next()?;
    let groups = if groups.is_empty() {
        Vec::new()
    } else {
        groups.split(',').map(|g| g.parse().ok()).collect::<Option<Vec<u32>>>()?
    };
    Some(Identity { uid, gid, groups })
}

fn fail(msg: String, code: i32) -> ! {
    eprintln!("msb: {msg}");
    std::process::exit(code)
}

/// Runs helper mode with the arguments after [`FLAG`]; never returns.
pub fn main(args: &[String]) -> ! {
    let mut it = args.iter();
    let mut ctty = false;
    let mut user = None;
    let mut cwd = None;
    let mut restricted = false;
    for a in it.by_ref() {
        if a == "--" {
            break;
        } else if a == "--restricted" {
            restricted = true;
        } else if let Some(dir) = a.strip_prefix("--cwd=") {
            cwd = Some(dir.to_string());
        } else if a == "--ctty" {
            ctty = true;
        } else if let Some(spec) = a.strip_prefix("--user=") {
            user = Some(parse_identity(spec).unwrap_or_else(|| fail(format!("exec helper: bad --user {spec:?}"), 126)));
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
    if restricted {
        if user.as_ref().is_none_or(|u| u.uid == 0) {
            fail("the restricted profile runs no command as root".into(), 126);
        }
        // Needs CAP_SETPCAP, so before the switch away from root.
        for n in 0..64u32 {
            let Some(cap) = 1u64.checked_shl(n).and_then(rustix::thread::CapabilitySet::from_bits) else { continue };
            match rustix::thread::remove_capability_from_bounding_set(cap) {
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => fail(format!("dropping capabilities: {e}"), 126),
            }
        }
        if let Err(e) = rustix::thread::clear_ambient_capability_set() {
            fail(format!("clearing ambient capabilities: {e}"), 126);
        }
    }
    if let Some(u) = user {
        use rustix::process::{Gid, Uid};
        let groups: Vec<Gid> = u.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        let switched = rustix::thread::set_thread_groups(&groups)
            .and_then(|_| rustix::thread::set_thread_gid(Gid::from_raw(u.gid)))
            .and_then(|_| rustix::thread::set_thread_uid(Uid::from_raw(u.uid)));
        if let Err(e) = switched {
            fail(format!("switching to uid {} gid {}: {e}", u.uid, u.gid), 126);
        }
    }
    // After the switch (a uid other than 0 keeps no capability) and before the exec: a
    // setuid program gains nothing.
    if restricted {
        if let Err(e) = rustix::thread::set_no_new_privs(true) {
            fail(format!("setting no_new_privs: {e}"), 126);
        }
    }
    if let Some(dir) = cwd {
        if let Err(e) = std::env::set_current_dir(&dir) {
            fail(format!("working directory {dir}: {e}"), 126);
        }
    }
    let e = std::process::Command::new(program).args(&argv[1..]).exec();
    let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    fail(format!("{program}: {e}"), code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_the_arguments() {
        let id = Identity { uid: 1000, gid: 100, groups: vec![10, 27] };
        let setup = Setup { ctty: true, rlimits: &[], user: Some(&id), cwd: Some("/home/msb"), restricted: true };
        let a = args(&setup, &["id".into()]);
        assert_eq!(a, [FLAG, "--ctty", "--user=1000:100:10,27", "--cwd=/home/msb", "--restricted", "--", "id"]);
        let back = parse_identity("1000:100:10,27").unwrap();
        assert_eq!((back.uid, back.gid, back.groups), (1000, 100, vec![10, 27]));
        assert_eq!(parse_identity("5:6:").unwrap().groups, Vec::<u32>::new());
        assert!(parse_identity("5:x:").is_none());
        assert!(parse_identity("5").is_none());
    }
}
