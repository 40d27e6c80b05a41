//! The sandbox process's lockdown on this host, with no guest: `msb lockdown-probe` applies
//! the very lockdown a sandbox process runs under (namespaces, empty root, privileges,
//! Landlock, the runtime seccomp filter and its reporter) over a temporary directory, then
//! attempts one thing — what a sandbox needs, or what an attacker in the process would try.
//! One probe per attempt: a violation ends only that probe.

use std::path::Path;
use std::process::Command;

const VIOLATION: i32 = 159;

struct Probe {
    code: i32,
    stdout: String,
    stderr: String,
}

fn probe(dir: &Path, action: &str, arg: &str) -> Probe {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb"));
    c.args(["lockdown-probe", dir.to_str().unwrap(), action]);
    if !arg.is_empty() {
        c.arg(arg);
    }
    let o = c.output().expect("msb runs");
    Probe {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn report(p: &Probe) -> serde_json::Value {
    serde_json::from_str(p.stdout.lines().next().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {}", p.stdout))
}

#[test]
fn lockdown_keeps_what_a_sandbox_needs() {
    let dir = tempfile::tempdir().unwrap();
    for (action, arg) in [("write-inside", ""), ("thread", ""), ("random", "")] {
        let p = probe(dir.path(), action, arg);
        assert_eq!(p.code, 0, "{action}: {}", p.stderr);
        assert_eq!(p.stdout.lines().nth(1), Some("allowed"), "{action}: {}{}", p.stdout, p.stderr);
    }
    assert!(dir.path().join("probe").is_file(), "the write inside the kept directory landed on the host");
    let r = report(&probe(dir.path(), "thread", ""));
    let applied = r["applied"].to_string();
    for piece in ["no capabilities, no_new_privs, not dumpable", "no core files", "seccomp"] {
        assert!(applied.contains(piece), "{piece} not applied: {r}");
    }
}

#[test]
fn lockdown_refuses_what_an_attacker_would_try() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let canary = outside.path().join("canary");
    std::fs::write(&canary, b"host secret").unwrap();
    let sock = outside.path().join("host.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let mut sibling = Command::new("sleep").arg("60").spawn().unwrap();
    let sib = sibling.id().to_string();
    // Killed by the seccomp filter, reported by name.
    for (action, arg, call) in [
        ("exec", "", "execve"),
        ("unix-socket", sock.to_str().unwrap(), "socket"),
        ("netlink-audit", "", "socket"),
        // Host sockets come from the dialer only: not even TCP to a listener on loopback.
        ("tcp-connect", addr.as_str(), "socket"),
        ("kill", sib.as_str(), "kill"),
        ("ptrace", sib.as_str(), "ptrace"),
        ("mount", "", "mount"),
    ] {
        let p = probe(dir.path(), action, arg);
        assert_eq!(p.code, VIOLATION, "{action} was not stopped: {}{}", p.stdout, p.stderr);
        assert!(
            p.stderr.contains(&format!("seccomp violation: {call} (")) && p.stderr.contains("on thread msb"),
            "{action}: {}",
            p.stderr
        );
        assert!(!p.stdout.contains("allowed"), "{action}: {}", p.stdout);
    }
    // A new process is refused too (the C library blocks signals around it, so the kernel's
    // SIGSYS kills outright instead of reaching the reporter).
    let p = probe(dir.path(), "spawn", "");
    assert!(p.code == VIOLATION || p.code == -1, "a spawn was not stopped: {}{}", p.stdout, p.stderr);
    assert!(!p.stdout.contains("allowed"));
    // A file outside the kept directory does not exist for the process, where the namespace
    // stage ran; elsewhere Landlock refuses it.
    let p = probe(dir.path(), "read", canary.to_str().unwrap());
    assert_eq!(p.code, 0, "{}", p.stderr);
    let answer = p.stdout.lines().nth(1).unwrap_or_default();
    assert!(answer.starts_with("denied: "), "the canary was readable: {}", p.stdout);
    assert!(sibling.try_wait().unwrap().is_none(), "the sibling was touched");
    let _ = sibling.kill();
    let _ = sibling.wait();
}

#[test]
fn lockdown_without_landlock_or_namespaces_still_confines_and_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_msb"))
        .args(["lockdown-probe", dir.path().to_str().unwrap(), "exec"])
        .env("MSB_HARDEN", "-userns,-landlock")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap();
    let missing = r["missing"].to_string();
    assert!(missing.contains("user namespace") && missing.contains("landlock"), "{r}");
    assert_eq!(o.status.code(), Some(VIOLATION), "seccomp is never switched off");
}

#[test]
fn log_mode_records_what_the_filter_would_refuse_and_lets_it_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let record = dir.path().join("record");
    let run = |action: &str, arg: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_msb"))
            .args(["lockdown-probe", dir.path().to_str().unwrap(), action, arg])
            .env("MSB_SECCOMP", "log")
            .env("MSB_SECCOMP_LOG_FILE", &record)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Not fatal: the call runs, and fails only as the jail makes it (nothing to exec there).
    let (code, stdout, stderr) = run("exec", "");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("seccomp (log mode)"), "{stdout}");
    assert!(stdout.lines().nth(1).is_some_and(|l| l.starts_with("denied: ")), "{stdout}");
    assert!(stderr.contains("seccomp (log mode): execve (59) on thread msb"), "{stderr}");
    // The socket is made and connects nowhere: the empty network namespace holds on its own.
    let (code, stdout, stderr) = run("tcp-connect", &addr);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.lines().nth(1).is_some_and(|l| l.starts_with("denied: ")), "{stdout}");
    assert!(stderr.contains("seccomp (log mode): socket (41)"), "{stderr}");
    assert!(server.accept().is_err(), "the probe reached a listener on the host's loopback");
    let recorded = std::fs::read_to_string(&record).unwrap();
    assert!(recorded.contains("execve (59)") && recorded.contains("socket (41)"), "{recorded}");
    // What a sandbox needs records nothing.
    std::fs::remove_file(&record).unwrap();
    let (code, stdout, _) = run("thread", "");
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().nth(1), Some("allowed"));
    assert!(!record.exists(), "{}", std::fs::read_to_string(&record).unwrap_or_default());
}
