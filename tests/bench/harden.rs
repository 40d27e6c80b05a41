//! `msb-bench harden [N]` (`tests/rig/run-rig.sh bench-harden`, or hardware KVM): what the
//! sandbox process's lockdown costs. The same sandbox, N times each way, alternating, run by
//! the test-only `msb-hooks` build: locked down (the default) and with `MSB_HARDEN=-all` (no
//! lockdown at all; only that build accepts it). Per run: `msb start` to ready (process
//! start, lockdown, boot), exec round trip (`msb exec -- true`, p50 of 20), and through the
//! gateway to a test host in a network namespace: new TCP connections a second (Python in the
//! guest, 100 connects) and a 32 MiB download. Prints both columns and their ratio; passes or
//! fails nothing.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use msb_tests::netns::TestNet;

const IMAGE: &str = "msb/debian:12";
const DOWNLOAD_MIB: usize = 32;

fn hooks_bin() -> std::path::PathBuf {
    let msb = std::env::var_os("MSB_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().map(|e| e.with_file_name("msb")).unwrap_or_else(|_| "msb".into()));
    msb.with_file_name("msb-hooks")
}

fn msb(args: &[&str], locked: bool) -> (bool, String, String) {
    let mut c = Command::new(hooks_bin());
    c.args(args).stdin(Stdio::null()).env("MSB_BIN", hooks_bin());
    if !locked {
        c.env("MSB_HARDEN", "-all");
    }
    let o = c.output().expect("msb-hooks runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const GUEST: &str = r#"
import socket, sys, time
socket.setdefaulttimeout(60)
host, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
for i in range(n):
    s = socket.create_connection((host, 7000)); s.sendall(b"0\n"); s.recv(1); s.close()
rate = n / (time.perf_counter() - t)
s = socket.create_connection((host, 7000)); s.sendall(b"%d\n" % (mib << 20))
t = time.perf_counter(); got = 0
while True:
    b = s.recv(1 << 16)
    if not b: break
    got += len(b)
print("%.1f %.2f %d" % (rate, got / (1 << 20) / (time.perf_counter() - t), got))
"#;

/// Serves the test host: each connection sends `N\n` and gets N zero bytes (at least one,
/// so a connect-only client sees the answer), then the close.
fn serve(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while c.read(&mut b).is_ok_and(|n| n == 1) && b[0] != b'\n' && line.len() < 32 {
                    line.push(b[0]);
                }
                let n: usize = String::from_utf8_lossy(&line).trim().parse().unwrap_or(0);
                let chunk = vec![0u8; 1 << 16];
                let mut left = n.max(1);
                while left > 0 {
                    let k = left.min(chunk.len());
                    if c.write_all(&chunk[..k]).is_err() {
                        break;
                    }
                    left -= k;
                }
            });
        }
    });
}

struct Sample {
    start_ms: f64,
    exec_ms: f64,
    conns_per_s: f64,
    mib_per_s: f64,
}

fn one(name: &str, locked: bool, host: &str) -> Option<Sample> {
    let _ = msb(&["rm", "--force", name], locked);
    let allow = format!("tcp/{host}:7000");
    let (ok, _, err) = msb(&["create", IMAGE, "--name", name, "--boot-timeout", "90", "--allow", &allow], locked);
    if !ok {
        println!("{name}: create failed: {err}");
        return None;
    }
    let t = Instant::now();
    let (ok, _, err) = msb(&["start", name], locked);
    let start_ms = t.elapsed().as_secs_f64() * 1e3;
    if !ok {
        println!("{name}: start failed: {err}");
        return None;
    }
    let mut rtt = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        if msb(&["exec", name, "--", "true"], locked).0 {
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let exec_ms = rtt.get(rtt.len() / 2).copied().unwrap_or(f64::NAN);
    println!("{name}: up in {start_ms:.0} ms, exec round trip {exec_ms:.1} ms");
    let (ok, out, err) = msb(
        &["exec", "--timeout", "300", name, "--", "python3", "-c", GUEST, host, "100", &DOWNLOAD_MIB.to_string()],
        locked,
    );
    println!("{name}: network: {} {}", out.trim(), err.trim());
    let _ = msb(&["rm", "--force", name], locked);
    let f: Vec<f64> = out.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    if !ok || f.len() != 3 || f[2] as usize != DOWNLOAD_MIB << 20 {
        println!("{name}: the network run failed: {out} {err}");
        return Some(Sample { start_ms, exec_ms, conns_per_s: f64::NAN, mib_per_s: f64::NAN });
    }
    Some(Sample { start_ms, exec_ms, conns_per_s: f[0], mib_per_s: f[1] })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the comparison `n` times each way.
pub fn side_by_side(n: usize) {
    println!(
        "msb-bench harden: {n} runs each way, alternating, {IMAGE}; KVM: {}",
        msb_hypervisor::classify().describe()
    );
    let net = TestNet::new(10);
    serve(net.tcp(7000));
    println!("test host {} listening", net.host);
    let host = net.host.to_string();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..n {
        if let Some(s) = one(&format!("bench-harden-off-{i}"), false, &host) {
            off.push(s);
        }
        if let Some(s) = one(&format!("bench-harden-on-{i}"), true, &host) {
            on.push(s);
        }
    }
    println!("{:<34} {:>12} {:>12} {:>8}", "", "lockdown off", "lockdown on", "on/off");
    let row = |what: &str, f: &dyn Fn(&Sample) -> f64| {
        let (a, b) = (median(off.iter().map(f).collect()), median(on.iter().map(f).collect()));
        println!("{what:<34} {a:>12.1} {b:>12.1} {:>8.2}", b / a);
    };
    row("msb start to ready (ms, p50)", &|s| s.start_ms);
    row("exec round trip (ms, p50)", &|s| s.exec_ms);
    row("new TCP connections per s", &|s| s.conns_per_s);
    row(&format!("{DOWNLOAD_MIB} MiB download (MiB/s)"), &|s| s.mib_per_s);
    println!("runs: {} locked down, {} without", on.len(), off.len());
}
