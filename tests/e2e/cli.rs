//! The `msb` command line against real guests: named sandboxes in their own processes, the
//! state store, crash detection, forced stops, PTY sessions and `msb run`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use msb_actors::{ExecSpec, ExitStatus};
use msb_control_plane::wire::paths;
use msb_control_plane::{Msb, SandboxName};

/// The `msb` binary beside this test binary (or `$MSB_BIN`).
pub(crate) fn msb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MSB_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe().unwrap().with_file_name("msb")
}

pub(crate) fn msb(args: &[&str]) -> Output {
    msb_tests::require_linux_capable_kvm();
    Command::new(msb_bin()).args(args).stdin(Stdio::null()).output().expect("msb runs")
}

fn msb_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut c = Command::new(msb_bin()).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut w = c.stdin.take().unwrap();
    let data = input.to_vec();
    let t = std::thread::spawn(move || w.write_all(&data));
    let out = c.wait_with_output().unwrap();
    t.join().unwrap().unwrap();
    out
}

pub(crate) fn ok(args: &[&str]) -> String {
    let out = msb(args);
    assert!(out.status.success(), "msb {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub(crate) fn record(name: &str) -> Option<serde_json::Value> {
    let list: serde_json::Value = serde_json::from_str(&ok(&["ls", "--format", "json"])).unwrap();
    list.as_array().unwrap().iter().find(|r| r["name"] == name).cloned()
}

pub(crate) fn status(name: &str) -> String {
    record(name).map(|r| r["status"].as_str().unwrap().to_string()).unwrap_or_else(|| "absent".into())
}

pub(crate) fn wait_status(name: &str, want: &str, within: Duration) {
    let end = Instant::now() + within;
    while status(name) != want {
        assert!(Instant::now() < end, "{name} did not become {want} within {within:?}: {:?}", record(name));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `msb start`, retried once like the other e2e boots (nested TCG loses a boot rarely).
pub(crate) fn start(name: &str) {
    let out = msb(&["start", name]);
    if !out.status.success() {
        eprintln!("E2E-RETRY: msb start {name}: {}", String::from_utf8_lossy(&out.stderr));
        ok(&["start", name]);
    }
}

fn create_and_start(name: &str) {
    let _ = msb(&["rm", "--force", name]);
    ok(&["create", "--name", name, "--boot-timeout", "45"]);
    start(name);
}

#[test]
fn cli_lifecycle_exec_logs_and_store() {
    let n = "e2e-life";
    let _ = msb(&["rm", "--force", n]);
    assert_eq!(ok(&["create", "--name", n, "--memory", "192", "--boot-timeout", "45"]).trim(), n);
    let dup = msb(&["create", "--name", n]);
    assert_eq!(code(&dup), 1);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"), "{dup:?}");
    let bad = msb(&["create", "--name", "no/slashes"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid sandbox name"), "{bad:?}");
    let long = "x".repeat(64);
    assert_eq!(code(&msb(&["create", "--name", &long])), 1);
    assert_eq!(status(n), "created");
    let exec_stopped = msb(&["exec", n, "--", "true"]);
    assert!(String::from_utf8_lossy(&exec_stopped.stderr).contains("msb start"), "{exec_stopped:?}");

    start(n);
    let rec = record(n).unwrap();
    assert_eq!(rec["status"], "running");
    assert!(rec["pid"].as_u64().is_some());
    assert_eq!(rec["config"]["memory_mib"], 192);
    assert!(ok(&["ls"]).lines().any(|l| l.starts_with(n) && l.contains("running")));
    assert_eq!(code(&msb(&["start", n])), 1, "starting a running sandbox is refused");

    // Exec: output, status, spawn failures, timeout, user, rlimits, env, cwd.
    let out = msb(&["exec", n, "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!((code(&out), &out.stdout[..], &out.stderr[..]), (7, &b"out\n"[..], &b"err\n"[..]));
    let missing = msb(&["exec", n, "--", "no-such-binary"]);
    assert_eq!(code(&missing), 127, "{missing:?}");
    let t0 = Instant::now();
    let slow = msb(&["exec", n, "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(code(&slow), 124, "{slow:?}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(ok(&["exec", n, "-u", "msb", "--", "id", "-u"]).trim(), "1000");
    assert_eq!(ok(&["exec", n, "-u", "msb", "--", "sh", "-c", "echo $HOME"]).trim(), "/home/msb");
    assert_eq!(ok(&["exec", n, "-u", "msb", "--", "id", "-G"]).trim(), "1000 100", "with its supplementary group");
    assert_eq!(ok(&["exec", n, "-u", "1000:1001", "--", "id", "-G"]).trim(), "1001 100");
    let unknown = msb(&["exec", n, "-u", "nosuchuser", "--", "true"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("/etc/passwd"), "{unknown:?}");
    assert_eq!(ok(&["exec", n, "--ulimit", "nofile=64:128", "--", "sh", "-c", "ulimit -n; ulimit -Hn"]), "64\n128\n");
    assert_eq!(ok(&["exec", n, "-e", "A=b c", "-w", "/tmp", "--", "sh", "-c", "echo $A; pwd"]), "b c\n/tmp\n");

    // 10 MiB through `msb exec -i` and back, intact.
    let big: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let out = msb_stdin(&["exec", "-i", n, "--", "cat"], &big);
    assert!(out.status.success());
    assert!(out.stdout == big, "10 MiB round trip differs ({} bytes back)", out.stdout.len());

    // 100 sequential and 10 concurrent sessions through the sandbox process (Rust API).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sb = Msb::from_env().unwrap().get(n).unwrap();
        assert!(Msb::from_env().unwrap().list().unwrap().iter().any(|r| r.name == n));
        // A streaming session through the sandbox process: output as it comes, a signal.
        // (A loop, not `sleep & wait`: ash only notices a signal that lands between `&` and
        // `wait` when the wait ends.)
        let script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.1; done";
        let spec = ExecSpec { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
        let mut h = sb.exec_stream(spec, true).await.unwrap();
        match h.next().await {
            Some(msb_actors::ExecEvent::Stdout(d)) => assert_eq!(d, b"ready\n"),
            other => panic!("expected the first output, got {other:?}"),
        }
        h.signal(15).await.unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(30), h.wait()).await.expect("the signal ended it").unwrap();
        assert_eq!((rest.status, rest.stdout), (ExitStatus::Code(5), b"got-term\n".to_vec()));
        for i in 0..100 {
            let spec = ExecSpec { argv: vec!["echo".into(), i.to_string()], ..Default::default() };
            let out = sb.exec(spec).await.unwrap();
            assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        }
        let runs = (0..10).map(|i| {
            let sb = sb.clone();
            async move {
                let script = format!("sleep 1; echo session-{i}");
                let spec = ExecSpec { argv: vec!["sh".into(), "-c".into(), script], ..Default::default() };
                sb.exec(spec).await.unwrap()
            }
        });
        let outs = futures::future::join_all(runs).await;
        for (i, o) in outs.iter().enumerate() {
            assert_eq!((o.status, o.stdout.clone()), (ExitStatus::Code(0), format!("session-{i}\n").into_bytes()));
        }
    });

    // Logs: console and exec output, timestamped.
    let logs = ok(&["logs", n]);
    assert!(logs.lines().any(|l| l.contains("[console]") && l.contains("msb-agentd")), "console in logs");
    assert!(logs.lines().any(|l| l.contains("stdout] session-3")), "exec output in logs");
    for l in logs.lines().take(5) {
        let stamp = l.split(' ').next().unwrap();
        assert!(stamp.len() >= 20 && stamp.ends_with('Z') && stamp.contains('T'), "timestamp on {l:?}");
    }
    assert_eq!(ok(&["logs", "--tail", "3", n]).lines().count(), 3);

    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", n])).unwrap();
    assert!(inspect["boot_ms"].as_u64().is_some(), "{inspect}");
    assert!(inspect["exec_sessions"].as_u64().unwrap() >= 110);

    // Stop, restart, stop, remove.
    let stopped = ok(&["stop", "-t", "10", n]);
    assert!(stopped.contains("shut down on request"), "{stopped}");
    assert_eq!(status(n), "stopped");
    assert!(
        !paths::socket_path(Msb::from_env().unwrap().home(), &SandboxName::new(n).unwrap()).exists(),
        "socket removed"
    );
    ok(&["restart", n]);
    assert_eq!(status(n), "running");
    assert_eq!(ok(&["exec", n, "--", "echo", "again"]), "again\n");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", n])).unwrap();
    assert_eq!(inspect["runs"].as_array().unwrap().len(), 2, "{inspect}");
    assert_eq!(code(&msb(&["rm", n])), 1, "a running sandbox is not removed without --force");

    // `logs -f` follows new output and ends by itself when the sandbox stops; `stop --force`
    // does not ask the guest.
    let follower = Command::new(msb_bin())
        .args(["logs", "-f", "--tail", "5", n])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    ok(&["exec", n, "--", "echo", "followed-line"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(ok(&["stop", "--force", n]).contains("killed by the host"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(follower.wait_with_output());
    });
    let followed = rx.recv_timeout(Duration::from_secs(20)).expect("logs -f ended after the stop").unwrap();
    let followed = String::from_utf8_lossy(&followed.stdout);
    // Printed once, whether the follower started before the exec (followed) or after (tail).
    assert_eq!(followed.matches("stdout] followed-line").count(), 1, "{followed}");
    assert!(!followed.contains("session-3"), "--tail 5 printed only recent history: {followed}");
    assert_eq!(status(n), "stopped");
    ok(&["rm", n]);
    assert_eq!(status(n), "absent");
}

#[test]
fn cli_doctor_reports_a_usable_host() {
    let out = ok(&["doctor"]);
    assert!(out.contains("verdict: sandboxes boot directly"), "{out}");
    assert!(out.contains("state store:"), "{out}");
}

#[test]
fn cli_sigkilled_sandbox_process_is_marked_crashed() {
    let n = "e2e-crash";
    create_and_start(n);
    let pid = record(n).unwrap()["pid"].as_u64().unwrap();
    let st = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(st.success());
    wait_status(n, "crashed", Duration::from_secs(10));
    let rec = record(n).unwrap();
    assert!(rec["last_run"]["exit_reason"].as_str().unwrap().contains("crashed"), "{rec}");
    assert!(
        !paths::socket_path(Msb::from_env().unwrap().home(), &SandboxName::new(n).unwrap()).exists(),
        "stale socket removed"
    );
    // A crashed sandbox starts again.
    start(n);
    assert_eq!(ok(&["exec", n, "--", "echo", "back"]), "back\n");
    // A sandbox process that no longer answers (stopped with SIGSTOP) is killed by
    // `rm --force` after a bounded wait.
    let pid = record(n).unwrap()["pid"].as_u64().unwrap();
    assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
    let t0 = Instant::now();
    ok(&["rm", "--force", n]);
    assert!(t0.elapsed() < Duration::from_secs(40), "took {:?}", t0.elapsed());
    assert_eq!(status(n), "absent");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(state.is_empty() || state.contains(") Z"), "the stuck process is gone: {state}");
}

#[test]
fn cli_stop_of_a_hung_guest_is_forced_after_the_timeout() {
    let n = "e2e-hung";
    create_and_start(n);
    // Freeze agentd (PID 1) in a cgroup a moment after this exec returns: the guest kernel
    // runs on, but nothing answers the host any more.
    let freeze = "(sleep 1; mount -t cgroup2 none /sys/fs/cgroup; mkdir /sys/fs/cgroup/hang; \
                  echo 1 > /sys/fs/cgroup/hang/cgroup.procs; echo 1 > /sys/fs/cgroup/hang/cgroup.freeze) \
                  >/dev/null 2>&1 &";
    ok(&["exec", n, "--", "sh", "-c", freeze]);
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    let out = ok(&["stop", "-t", "3", n]);
    let took = t0.elapsed();
    assert!(out.contains("killed by the host"), "forced, not graceful: {out}");
    assert!(took >= Duration::from_secs(3), "waited for the graceful timeout first ({took:?})");
    assert!(took < Duration::from_secs(30), "forced promptly after it ({took:?})");
    assert_eq!(status(n), "stopped");
    ok(&["rm", n]);
}

/// Reads from a terminal master on a thread, so reads can time out.
struct PtyReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl PtyReader {
    fn new(mut master: std::fs::File) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        PtyReader { rx, seen: Vec::new() }
    }

    fn until(&mut self, want: &str, within: Duration) {
        let end = Instant::now() + within;
        let from = self.seen.len();
        while !String::from_utf8_lossy(&self.seen[from..]).contains(want) {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(d) => self.seen.extend(d),
                Err(_) => panic!("no {want:?} on the terminal; got {:?}", String::from_utf8_lossy(&self.seen[from..])),
            }
        }
    }
}

/// A host terminal (pty pair) of `rows` x `cols` with `msb ARGS` running on it: the client,
/// the master for writing keystrokes and resizing, and a reader of what the terminal shows.
fn on_terminal(args: &[&str], rows: u16, cols: u16) -> (std::process::Child, std::fs::File, PtyReader) {
    use rustix::pty::OpenptFlags;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    rustix::pty::grantpt(&master).unwrap();
    rustix::pty::unlockpt(&master).unwrap();
    let slave_path = rustix::pty::ptsname(&master, Vec::new()).unwrap();
    let slave_path = PathBuf::from(slave_path.to_str().unwrap());
    rustix::termios::tcsetwinsize(&master, winsize(rows, cols)).unwrap();
    let slave = std::fs::OpenOptions::new().read(true).write(true).open(&slave_path).unwrap();
    let child = Command::new(msb_bin())
        .args(args)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let master = std::fs::File::from(master);
    let reader = PtyReader::new(master.try_clone().unwrap());
    (child, master, reader)
}

fn winsize(rows: u16, cols: u16) -> rustix::termios::Winsize {
    rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// Sends the detach keys and checks that the client leaves with status 0.
fn detach(child: &mut std::process::Child, master: &mut std::fs::File, reader: &mut PtyReader) {
    master.write_all(b"\x10\x11").unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the client did not detach");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    reader.until("detached", Duration::from_secs(5));
}

/// Counts the guest processes whose stdin is a terminal.
fn guest_terminal_sessions(name: &str) -> u32 {
    let out = ok(&["exec", name, "--", "sh", "-c", "ls -l /proc/[0-9]*/fd/0 2>/dev/null | grep -c /dev/pts || true"]);
    out.trim().parse().unwrap_or(0)
}

#[test]
fn cli_pty_session_resize_reaches_the_guest_and_detach_keys_leave_it() {
    let n = "e2e-tty";
    create_and_start(n);
    let (mut child, mut master, mut reader) = on_terminal(&["exec", "-t", n, "--", "sh"], 30, 100);
    master.write_all(b"stty size; tty\r").unwrap();
    reader.until("30 100", Duration::from_secs(30));
    reader.until("/dev/pts/", Duration::from_secs(10));

    rustix::termios::tcsetwinsize(&master, winsize(40, 120)).unwrap();
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::WINCH).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"stty size\r").unwrap();
    reader.until("40 120", Duration::from_secs(30));

    // Ctrl-P Ctrl-Q: the client leaves, the shell runs on in the guest.
    detach(&mut child, &mut master, &mut reader);
    assert!(guest_terminal_sessions(n) >= 1, "the detached shell still runs");
    ok(&["stop", n]);
    ok(&["rm", n]);

    // `msb run` from a terminal gets a guest terminal by itself; detaching leaves the
    // sandbox running (it is no longer owned by the client).
    let r = "e2e-runtty";
    let _ = msb(&["rm", "--force", r]);
    let (mut child, mut master, mut reader) =
        on_terminal(&["run", "--name", r, "--boot-timeout", "45", "--", "sh"], 25, 90);
    master.write_all(b"echo in-run-$((6*7)); stty size\r").unwrap();
    reader.until("in-run-42", Duration::from_secs(90));
    reader.until("25 90", Duration::from_secs(10));
    detach(&mut child, &mut master, &mut reader);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(r), "running", "released by its client");
    assert_eq!(ok(&["exec", r, "--", "echo", "still"]), "still\n");
    assert!(guest_terminal_sessions(r) >= 1, "the run's shell still runs");
    ok(&["rm", "--force", r]);
}

/// Starts `msb run --name NAME -- sleep 1000` and waits until its sandbox runs (one retry if
/// the boot fails, as elsewhere in the suite).
fn owned_client(name: &str) -> std::process::Child {
    for attempt in 0..2 {
        let _ = msb(&["rm", "--force", name]);
        let mut client = Command::new(msb_bin())
            .args(["run", "--name", name, "--boot-timeout", "45", "--", "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if status(name) == "running" {
                return client;
            }
            if let Some(st) = client.try_wait().unwrap() {
                eprintln!("E2E-RETRY: msb run --name {name} exited before its sandbox ran ({st:?}), attempt {attempt}");
                break;
            }
            assert!(Instant::now() < end, "{name} never ran");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    panic!("msb run --name {name} failed twice")
}

#[test]
fn cli_run_ephemeral_named_detached_and_attached_owner() {
    // Unnamed: ephemeral, removed afterwards; the command's status is msb's.
    let out = msb(&["run", "--boot-timeout", "45", "--", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!((code(&out), &out.stdout[..]), (3, &b"hi\n"[..]), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_str(&ok(&["ls", "--format", "json"])).unwrap();
    assert!(list.as_array().unwrap().iter().all(|r| r["ephemeral"] == false), "ephemeral sandbox left behind: {list}");

    // Named: kept, stopped.
    let _ = msb(&["rm", "--force", "e2e-kept"]);
    assert_eq!(ok(&["run", "--name", "e2e-kept", "--boot-timeout", "45", "--", "echo", "kept"]), "kept\n");
    assert_eq!(status("e2e-kept"), "stopped");
    ok(&["rm", "e2e-kept"]);

    // Detached: the sandbox outlives the client and the command runs in the background.
    let _ = msb(&["rm", "--force", "e2e-bg"]);
    let name = ok(&["run", "-d", "--name", "e2e-bg", "--boot-timeout", "45", "--", "sh", "-c", "echo bg-out"]);
    assert_eq!(name.trim(), "e2e-bg");
    assert_eq!(status("e2e-bg"), "running");
    let end = Instant::now() + Duration::from_secs(20);
    while !ok(&["logs", "e2e-bg"]).contains("stdout] bg-out") {
        assert!(Instant::now() < end, "the detached command's output never reached the logs");
        std::thread::sleep(Duration::from_millis(250));
    }
    ok(&["rm", "--force", "e2e-bg"]);

    // Attached: killing the client (even with SIGKILL) stops its sandbox.
    let mut client = owned_client("e2e-owned");
    std::thread::sleep(Duration::from_secs(1));
    client.kill().unwrap();
    client.wait().unwrap();
    wait_status("e2e-owned", "stopped", Duration::from_secs(60));
    let rec = record("e2e-owned").unwrap();
    assert_eq!(rec["last_run"]["exit_reason"], "shut down on request", "{rec}");
    ok(&["rm", "e2e-owned"]);
}

/// Resident memory of a named sandbox's process, KiB.
fn sandbox_rss_kib(name: &str) -> u64 {
    let pid = record(name).unwrap()["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `msb exec NAME -- echo hi` answers within `within`.
fn still_answers(name: &str, within: Duration) {
    let t = Instant::now();
    assert_eq!(ok(&["exec", name, "--", "echo", "hi"]), "hi\n");
    assert!(t.elapsed() < within, "an exec took {:?} beside a stalled session", t.elapsed());
}

/// `msb exec NAME -- cat /dev/zero` with its stdout on a pipe that the test reads, or not.
fn flood_client(name: &str) -> std::process::Child {
    Command::new(msb_bin())
        .args(["exec", name, "--", "cat", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a sandbox process may grow by while one client floods or stalls it (guest RAM the
/// guest touches included): a few windows, never what was offered.
const CLI_RSS_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn cli_clients_that_leave_stall_or_flood_stall_only_themselves() {
    let n = "e2e-flow";
    create_and_start(n);
    let before = sandbox_rss_kib(n);

    // The reader of a pipeline leaves (`| head -c 1000000`): the client exits 141, as a local
    // writer killed by SIGPIPE would, and the command is sent SIGPIPE.
    let mut c = flood_client(n);
    let mut out = c.stdout.take().unwrap();
    let mut buf = vec![0u8; 1_000_000];
    out.read_exact(&mut buf).unwrap();
    drop(out);
    let t = Instant::now();
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(141), "a broken pipe ends the client like SIGPIPE");
    assert!(t.elapsed() < Duration::from_secs(20));
    still_answers(n, Duration::from_secs(10));
    let ps = ok(&["exec", n, "--", "sh", "-c", "ps -o args | grep '[c]at /dev/zero' || true"]);
    assert_eq!(ps, "", "the command of a closed pipeline got SIGPIPE");

    // A reader that stalls (`| sleep 8`): other sessions keep being answered meanwhile, and
    // the client ends once its reader does.
    let mut c = flood_client(n);
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        still_answers(n, Duration::from_secs(10));
    }
    let grown = sandbox_rss_kib(n).saturating_sub(before);
    assert!(grown < CLI_RSS_BOUND_KIB, "a stalled client made the sandbox process grow {grown} KiB");
    drop(c.stdout.take());
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(141));
    still_answers(n, Duration::from_secs(10));

    // Stdin offered by the GiB to a command that never reads it: the client is held back.
    let mut c = Command::new(msb_bin())
        .args(["exec", "-i", n, "--", "sleep", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut w = c.stdin.take().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = written.clone();
    std::thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..(4u64 << 30) / chunk.len() as u64 {
            if w.write_all(&chunk).is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_secs(6));
    let taken = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(taken < 8 << 20, "{taken} bytes of stdin taken for a command that reads none");
    still_answers(n, Duration::from_secs(10));
    let grown = sandbox_rss_kib(n).saturating_sub(before);
    assert!(grown < CLI_RSS_BOUND_KIB, "an unread stdin flood made the sandbox process grow {grown} KiB");
    c.kill().unwrap();
    let _ = c.wait();
    still_answers(n, Duration::from_secs(10));

    // `--timeout` is the host's: a child that left the session dies with the exec, and the
    // client gets 124 in time.
    let t = Instant::now();
    let o = msb(&["exec", "--timeout", "3", "-u", "msb", n, "--", "sh", "-c", "setsid sleep 600 & sleep 600"]);
    assert_eq!(code(&o), 124, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(8), "the timeout answered after {:?}", t.elapsed());
    ok(&["rm", "--force", n]);
}

#[test]
fn cli_a_guest_writing_garbage_mmio_for_a_minute() {
    let n = "e2e-mmio";
    create_and_start(n);
    let home = msb_images::msb_home().unwrap();
    let vmm_log = paths::sandbox_dir(&home, &SandboxName::new(n).unwrap()).join("vmm.log");
    // For a minute, guest root writes random values to the MMIO hole around the devices:
    // addresses with no device, and the boot timer. None of it reaches a device's state, so
    // the VM stays healthy, and none of it is logged.
    let script = "end=$(( $(date +%s) + 60 )); i=0; \
        while [ $(date +%s) -lt $end ]; do \
          a=$(( 0xd0008000 + (RANDOM % 0x7ff) * 16 )); devmem $a 32 $RANDOM; devmem 0xd0000000 8 $RANDOM; \
          i=$((i+1)); done; echo $i";
    let out = msb(&["exec", n, "--", "sh", "-c", script]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let writes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(writes > 10, "only {writes} rounds of writes");
    assert_eq!(status(n), "running");
    still_answers(n, Duration::from_secs(10));
    let size = std::fs::metadata(&vmm_log).unwrap().len();
    assert!(size < msb_control_plane::schema::limits::VMM_LOG_CAP, "vmm.log is {size} bytes");
    // Then garbage over the registers of every device: the first write a device cannot take
    // (a queue register after DRIVER_OK, say) fails it, and the VM stops with that reason.
    let script = "while :; do a=$(( 0xd0001000 + (RANDOM % 0x2000) / 4 * 4 )); devmem $a 32 $RANDOM; done";
    let _ = msb(&["exec", "--timeout", "60", n, "--", "sh", "-c", script]);
    wait_status(n, "stopped", Duration::from_secs(60));
    let rec = record(n).unwrap();
    let reason = rec["last_run"]["exit_reason"].as_str().unwrap().to_string();
    assert!(reason.contains("device failure"), "stopped with {reason:?}");
    let log = std::fs::read_to_string(&vmm_log).unwrap();
    assert_eq!(log.matches("virtio device failed").count(), 1, "a failure is logged once:\n{log}");
    assert!((log.len() as u64) < msb_control_plane::schema::limits::VMM_LOG_CAP);
    ok(&["rm", "--force", n]);
}
