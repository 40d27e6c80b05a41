//! The sandbox process's lockdown, seen from outside on a running sandbox: every thread
//! confined (no_new_privs, seccomp filters, no capabilities), its own namespaces, no core
//! files, the limits; and, through the test-only `msb-hooks` build, what happens when the
//! jailed process tries what an attacker would.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cli::{msb, msb_bin, ok, record, start, wait_status};

fn pid_of(name: &str) -> u32 {
    record(name).and_then(|r| r["pid"].as_u64()).unwrap_or_else(|| panic!("{name} has no process")) as u32
}

/// The processes whose parent is `pid` (from `/proc/*/stat`: kernels without
/// `CONFIG_PROC_CHILDREN` have no `children` file).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // `PID (COMM) STATE PPID …`: COMM may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_else(|| panic!("no {key} in {status}"))
}

fn inspect(name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["inspect", name, "--format", "json"])).unwrap()
}

#[test]
fn harden_every_thread_of_a_running_sandbox_process_is_confined() {
    let n = "hard-inventory";
    let _ = msb(&["rm", "--force", n]);
    let shared = tempfile::tempdir().unwrap();
    let vol = format!("{}:/data:ro", shared.path().display());
    ok(&["create", "--name", n, "--boot-timeout", "45", "--cpus", "2", "-v", &vol, "--require-hardening"]);
    start(n);
    let pid = pid_of(n);
    let mut vcpus = 0;
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() >= 4, "{} threads", tasks.len());
    for t in &tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap().trim().to_string();
        assert_eq!(field(&status, "NoNewPrivs:"), "1", "{comm}");
        assert_eq!(field(&status, "Seccomp:"), "2", "{comm}: not in filter mode");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&status, caps), "0000000000000000", "{comm} {caps}");
        }
        let filters: u32 = field(&status, "Seccomp_filters:").parse().unwrap();
        if comm.starts_with("vcpu") {
            vcpus += 1;
            assert!(filters >= 3, "{comm} has {filters} filters: the vcpu filter is missing");
        } else {
            assert!(filters >= 2, "{comm} has {filters} filters");
        }
    }
    assert_eq!(vcpus, 2, "both vCPU threads were seen");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line =
        |what: &str| limits.lines().find(|l| l.starts_with(what)).unwrap().split_whitespace().collect::<Vec<_>>();
    assert_eq!(line("Max core file size")[4..6], ["0", "0"], "{limits}");
    // The cap, or this host's hard limit where that is lower (it cannot be raised).
    let ours = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(u64::MAX);
    let cap = ours.min(8192).to_string();
    assert_eq!(line("Max open files")[3..5], [cap.as_str(), cap.as_str()], "{limits}");
    for ns in ["mnt", "ipc", "uts", "user", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the sandbox process shares our {ns} namespace");
    }
    // Its dialer: a child in the host's network namespace, confined too.
    let dialer = children(pid).into_iter().next().unwrap_or_else(|| panic!("{n} has no dialer"));
    let cmdline = std::fs::read_to_string(format!("/proc/{dialer}/cmdline")).unwrap().replace('\0', " ");
    assert!(cmdline.contains(" dialer --grants "), "{cmdline}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{dialer}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "the dialer dials from the host's network"
    );
    let status = std::fs::read_to_string(format!("/proc/{dialer}/status")).unwrap();
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    // Nothing but CAP_NET_BIND_SERVICE (bit 10), and that only for root.
    let eff = u64::from_str_radix(field(&status, "CapEff:"), 16).unwrap();
    assert_eq!(eff & !(1 << 10), 0, "{status}");
    // Its root is the jail: the host's files are not there.
    let bin = std::fs::canonicalize(msb_bin()).unwrap();
    assert!(std::fs::metadata(format!("/proc/{pid}/root{}", bin.display())).is_err(), "the host's tree is in its root");
    assert!(std::fs::metadata(format!("/proc/{pid}/root/dev/kvm")).is_ok(), "/dev/kvm is in its root");
    let h = &inspect(n)["hardening"];
    let applied = h["applied"].to_string();
    for piece in ["namespaces", "empty root", "no capabilities", "landlock", "seccomp"] {
        assert!(applied.contains(piece), "{piece} missing from {h}");
    }
    assert_eq!(h["missing"], serde_json::json!([]), "--require-hardening started it with pieces missing");
    // Still a working sandbox: exec, and a read-only share refuses writes.
    std::fs::write(shared.path().join("f"), b"host").unwrap();
    assert_eq!(ok(&["exec", n, "--", "cat", "/data/f"]), "host");
    let o = msb(&["exec", n, "--", "sh", "-c", "echo x > /data/g"]);
    assert!(!o.status.success());
    assert!(!shared.path().join("g").exists());
    ok(&["stop", n]);
    let rec = record(n).unwrap();
    assert_eq!(rec["status"], "stopped", "{rec}");
    let _ = msb(&["rm", "--force", n]);
}

fn hooked(name: &str, hook: &str, extra: &[&str]) {
    hooked_with(name, hook, extra, &[])
}

fn hooked_with(name: &str, hook: &str, extra: &[&str], env: &[(&str, &str)]) {
    let _ = msb(&["rm", "--force", name]);
    let mut args = vec!["create", "--name", name, "--boot-timeout", "45"];
    args.extend_from_slice(extra);
    ok(&args);
    let hooks = msb_bin().with_file_name("msb-hooks");
    assert!(hooks.is_file(), "{} is built by scripts/build-static.sh", hooks.display());
    let o = Command::new(msb_bin())
        .args(["start", name])
        .env("MSB_BIN", &hooks)
        .env("MSB_TEST_HOOK", hook)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "start {name}: {}", String::from_utf8_lossy(&o.stderr));
}

fn vmm_log(name: &str) -> String {
    let dir = PathBuf::from(inspect(name)["dir"].as_str().unwrap());
    std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
}

#[test]
fn harden_a_seccomp_violation_ends_only_that_sandbox_and_says_so() {
    let bystander = "hard-bystander";
    let _ = msb(&["rm", "--force", bystander]);
    ok(&["create", "--name", bystander, "--boot-timeout", "45"]);
    start(bystander);
    let victim = "hard-victim";
    let shared = tempfile::tempdir().unwrap();
    let canary = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(canary.path(), b"the host's").unwrap();
    let vol = format!("{}:/data:ro", shared.path().display());
    let hook = format!("open={},write={}/planted,execve", canary.path().display(), shared.path().display());
    hooked(victim, &hook, &["-v", &vol]);
    wait_status(victim, "crashed", Duration::from_secs(30));
    let rec = record(victim).unwrap();
    let reason = rec["last_run"]["exit_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("seccomp violation: execve (59) on thread "), "{rec}");
    let log = vmm_log(victim);
    assert!(log.contains("seccomp violation: execve (59) on thread"), "{log}");
    // Before the exec, the hooks tried the host's files: a file outside the jail is not
    // there, and the read-only share refuses a write even from the process itself.
    assert!(log.contains(&format!("test hook: open {}: Err", canary.path().display())), "{log}");
    assert!(log.contains("test hook: write") && log.contains("ReadOnlyFilesystem"), "{log}");
    assert!(!shared.path().join("planted").exists());
    // The other sandbox never noticed.
    assert_eq!(ok(&["exec", bystander, "--", "echo", "still here"]), "still here\n");
    assert_eq!(crate::cli::status(bystander), "running");
    let _ = msb(&["rm", "--force", bystander, victim]);
}

#[test]
fn harden_the_sandbox_process_cannot_reach_the_hosts_loopback_even_when_it_tries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let at = listener.local_addr().unwrap();
    let hook = format!("connect={at}");
    // With the filters on, its first socket call ends the process, reported.
    let trapped = "hard-dial-trap";
    hooked(trapped, &hook, &[]);
    wait_status(trapped, "crashed", Duration::from_secs(30));
    let rec = record(trapped).unwrap();
    let reason = rec["last_run"]["exit_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("seccomp violation: socket (41) on thread "), "{rec}");
    // With seccomp only logging, the empty network namespace still holds: the socket is
    // made, and there is nowhere for it to go.
    let logged = "hard-dial-netns";
    hooked_with(logged, &hook, &[], &[("MSB_SECCOMP", "log")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let tried = format!("test hook: connect {at}: ");
    let log = loop {
        let log = vmm_log(logged);
        if log.contains(&tried) || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log.contains(&format!("{tried}Err")), "the hook's connect did not fail: {log}");
    // Log mode recorded the calls it let through.
    assert!(log.contains("seccomp (log mode): socket (41) on thread "), "{log}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something reached the host's loopback listener: {other:?}"),
    }
    // The sandbox itself is unharmed: it runs, and its guest is served.
    assert_eq!(ok(&["exec", logged, "--", "echo", "up"]), "up\n");
    let _ = msb(&["rm", "--force", trapped, logged]);
}

#[test]
fn harden_the_release_binary_has_no_test_hooks() {
    let n = "hard-nohooks";
    let _ = msb(&["rm", "--force", n]);
    ok(&["create", "--name", n, "--boot-timeout", "45"]);
    let o = Command::new(msb_bin())
        .args(["start", n])
        .env("MSB_TEST_HOOK", "execve")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ok(&["exec", n, "--", "echo", "up"]), "up\n", "the hook ran in a release build");
    assert!(!vmm_log(n).contains("test hook"));
    let _ = msb(&["rm", "--force", n]);
}

#[test]
fn harden_the_restricted_profile_and_a_read_only_root_hold_inside_the_guest() {
    let n = "hard-restricted";
    let _ = msb(&["rm", "--force", n]);
    ok(&["create", "msb/debian:12", "--name", n, "--boot-timeout", "45", "--profile", "restricted", "--read-only"]);
    start(n);
    // Not root, no capability at all, no_new_privs: a setuid program gains nothing.
    let who = ok(&["exec", n, "--", "sh", "-c", "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status"]);
    assert!(who.starts_with("65534\n"), "{who}");
    for line in ["CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "NoNewPrivs:\t1"] {
        assert!(who.contains(line), "{line} missing: {who}");
    }
    // Asking for root is refused, whoever asks.
    let o = msb(&["exec", "-u", "root", n, "--", "id", "-u"]);
    assert!(!o.status.success(), "root ran: {}", String::from_utf8_lossy(&o.stdout));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("restricted profile"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The root is read-only (even a root-owned path the user could not write anyway says
    // EROFS, not EACCES), /tmp is writable.
    let o = msb(&["exec", n, "--", "sh", "-c", "touch /var/tmp/x 2>&1; touch /tmp/y && echo tmp-ok"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Read-only file system") && text.contains("tmp-ok"), "{text}");
    // msb's own file operations still work (they act for the owner, as root): into /tmp and
    // back out; the file is the owner's, not the workload's.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("in"), b"from the host").unwrap();
    ok(&["cp", local.path().join("in").to_str().unwrap(), &format!("{n}:/tmp/in")]);
    assert_eq!(ok(&["exec", n, "--", "stat", "-c", "%u", "/tmp/in"]), "0\n");
    ok(&["cp", &format!("{n}:/tmp/in"), local.path().join("back").to_str().unwrap()]);
    assert_eq!(std::fs::read(local.path().join("back")).unwrap(), b"from the host");
    let _ = msb(&["rm", "--force", n]);
}

/// The uid and gid a rootless run uses: this test's own where it is not root; else a uid of
/// no one, with `/dev/kvm`'s group where that is how the node is shared.
fn unprivileged() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    if me != 0 {
        return (me, rustix::process::getegid().as_raw());
    }
    let kvm = std::fs::metadata("/dev/kvm").expect("/dev/kvm");
    let uid = 4242;
    if kvm.mode() & 0o006 == 0o006 {
        (uid, uid)
    } else {
        assert_eq!(kvm.mode() & 0o060, 0o060, "/dev/kvm is usable by neither its group nor everyone: the rootless check needs one of them (the rig makes it 0666)");
        (uid, kvm.gid())
    }
}

fn chown_tree(p: &std::path::Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

#[test]
fn harden_a_rootless_sandbox_is_locked_down_the_same() {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = unprivileged();
    // Its own home, seeded with the kernel and the agent from ours (which it may not read).
    let ours = std::env::var_os("MSB_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".msb"));
    let home = tempfile::tempdir().unwrap();
    for f in ["kernel/vmlinux", "bin/agentd", "bin/busybox"] {
        let from = ours.join(f);
        if !from.is_file() {
            assert_ne!(f, "kernel/vmlinux", "{} is missing", from.display());
            assert_ne!(f, "bin/agentd", "{} is missing", from.display());
            continue;
        }
        let to = home.path().join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    if rustix::process::geteuid().is_root() {
        chown_tree(home.path(), uid, gid);
    }
    let as_user = |args: &[&str]| {
        let o = Command::new(msb_bin())
            .args(args)
            .uid(uid)
            .gid(gid)
            .env("MSB_HOME", home.path())
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "msb {args:?} as {uid}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let n = "hard-rootless";
    as_user(&["create", "--name", n, "--boot-timeout", "45", "--require-hardening"]);
    as_user(&["start", n]);
    let list: serde_json::Value = serde_json::from_str(&as_user(&["ls", "--format", "json"])).unwrap();
    let pid = list.as_array().unwrap().iter().find(|r| r["name"] == n).and_then(|r| r["pid"].as_u64()).unwrap() as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(field(&status, "Uid:").starts_with(&format!("{uid}\t")), "{status}");
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    assert_eq!(field(&status, "Seccomp:"), "2");
    assert_eq!(field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(field(&status, "CapBnd:"), "0000000000000000");
    for ns in ["mnt", "user", "net"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let dialer = children(pid).into_iter().next().expect("a dialer");
    let ds = std::fs::read_to_string(format!("/proc/{dialer}/status")).unwrap();
    assert!(field(&ds, "Uid:").starts_with(&format!("{uid}\t")), "{ds}");
    assert_eq!(field(&ds, "CapEff:"), "0000000000000000", "a rootless dialer holds nothing");
    let info: serde_json::Value = serde_json::from_str(&as_user(&["inspect", n, "--format", "json"])).unwrap();
    assert_eq!(info["hardening"]["missing"], serde_json::json!([]), "{info}");
    assert_eq!(as_user(&["exec", n, "--", "echo", "rootless"]), "rootless\n");
    as_user(&["stop", n]);
    as_user(&["rm", n]);
    if rustix::process::geteuid().is_root() {
        // Back to us, so that it can be removed.
        chown_tree(home.path(), 0, 0);
    }
}
