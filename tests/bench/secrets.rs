//! `msb-bench secrets` (`tests/rig/run-rig.sh bench-secrets` in the rig, or hardware KVM):
//! what interception costs, in one run against one TLS test host in a namespace: the same
//! server reached (a) relayed (`other.test`, no secret), (b) intercepted with no placeholder
//! in the request (`api.test`), (c) intercepted with one substitution per request; over
//! HTTP/1.1 (Python `http.client`) and h2 (`curl --http2`, one connection): requests a second
//! and p50/p99 latency on one kept-alive connection, new connections a second and time to
//! first byte, the first connection to a never-seen name (leaf minting) against a cached
//! one, bulk transfer each way, and the sandbox process's CPU per 1,000 requests. Prints
//! (b)/(a) and (c)/(b). Passes or fails nothing.

use std::process::{Command, Stdio};

use msb_tests::dns::dns_server;
use msb_tests::netns::TestNet;
use msb_tests::tls_host::TlsHost;

fn msb_bin() -> std::path::PathBuf {
    std::env::var_os("MSB_BIN").map(std::path::PathBuf::from).unwrap_or_else(|| "msb".into())
}

fn msb(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(msb_bin());
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("msb runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

const GUEST: &str = r#"
import http.client, ssl, time, os, sys, json
mode, host, n, auth = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
ctx = ssl.create_default_context(cafile="/tmp/testca.pem") if host == "other.test" else ssl.create_default_context()
hdr = {"Authorization": "Bearer " + os.environ["API_KEY"]} if auth else {}
def pct(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))] * 1000
out = {}
if mode == "keep":
    c = http.client.HTTPSConnection(host, context=ctx, timeout=120)
    c.request("GET", "/warm", headers=hdr); c.getresponse().read()
    lat = []; t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter(); c.request("GET", "/r", headers=hdr); c.getresponse().read(); lat.append(time.perf_counter() - t)
    out = {"rps": n / (time.perf_counter() - t0), "p50": pct(lat, .5), "p99": pct(lat, .99)}
elif mode == "new":
    ttfb = []; t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter(); c = http.client.HTTPSConnection(host, context=ctx, timeout=120)
        c.request("GET", "/n", headers=hdr); r = c.getresponse(); ttfb.append(time.perf_counter() - t); r.read(); c.close()
    out = {"cps": n / (time.perf_counter() - t0), "ttfb50": pct(ttfb, .5), "ttfb99": pct(ttfb, .99)}
elif mode == "mint":
    first, again = [], []
    for i in range(n):
        name = "m%d-%d.api.test" % (i, os.getpid())
        for l in (first, again):
            t = time.perf_counter(); c = http.client.HTTPSConnection(name, context=ctx, timeout=120)
            c.request("GET", "/m", headers=hdr); r = c.getresponse(); l.append(time.perf_counter() - t); r.read(); c.close()
    out = {"first": pct(first, .5), "cached": pct(again, .5)}
elif mode == "down":
    c = http.client.HTTPSConnection(host, context=ctx, timeout=600)
    t = time.perf_counter(); c.request("GET", "/big/%d" % (n << 20), headers=hdr); r = c.getresponse(); got = 0
    while True:
        b = r.read(1 << 16)
        if not b: break
        got += len(b)
    out = {"mibs": got / (1 << 20) / (time.perf_counter() - t)}
elif mode == "up":
    c = http.client.HTTPSConnection(host, context=ctx, timeout=600)
    block = b"u" * (1 << 16)
    def body():
        for i in range((n << 20) // len(block)): yield block
    h = dict(hdr); h["Content-Length"] = str(n << 20)
    t = time.perf_counter(); c.request("POST", "/up", body=body(), headers=h); c.getresponse().read()
    out = {"mibs": n / (time.perf_counter() - t)}
print(json.dumps(out))
"#;

fn guest(name: &str, args: &[&str]) -> Option<serde_json::Value> {
    let mut argv = vec!["exec", name, "--", "python3", "-c", GUEST];
    argv.extend_from_slice(args);
    let (ok, out, err) = msb(&argv, &[]);
    if !ok {
        println!("  {args:?} failed: {}", err.trim());
        return None;
    }
    serde_json::from_str(out.trim().lines().last().unwrap_or("")).ok()
}

/// Latencies of `n` h2 requests on one connection (curl reuses it for the URLs in order).
fn h2_latencies(name: &str, host: &str, n: usize, auth: bool) -> Option<(f64, f64, f64)> {
    let urls: String = (0..n).map(|i| format!(" https://{host}/h2-{i}")).collect();
    let cacert = if host == "other.test" { "--cacert /tmp/testca.pem" } else { "" };
    let header = if auth { r#"-H "Authorization: Bearer $API_KEY""# } else { "" };
    let script = format!(
        "start=$(date +%s%N); curl -sS --http2 {cacert} {header} -o /dev/null -w '%{{time_total}} %{{http_version}}\\n'{urls}; end=$(date +%s%N); echo total $(( (end-start)/1000000 ))"
    );
    let (ok, out, err) = msb(&["exec", name, "--", "sh", "-c", &script], &[]);
    if !ok {
        println!("  h2 {host} failed: {}", err.trim());
        return None;
    }
    let mut lat: Vec<f64> = Vec::new();
    let mut total_ms = 0.0;
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w[..] {
            ["total", ms] => total_ms = ms.parse().unwrap_or(0.0),
            [t, "2"] => lat.push(t.parse::<f64>().unwrap_or(0.0) * 1000.0),
            _ => {}
        }
    }
    if lat.len() != n {
        println!("  h2 {host}: {} of {n} requests over h2: {out}", lat.len());
        return None;
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rps = n as f64 / (total_ms / 1000.0);
    Some((rps, lat[n / 2], lat[(n * 99 / 100).min(n - 1)]))
}

pub fn side_by_side() {
    let n: usize = std::env::var("MSB_BENCH_SECRETS_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mib: usize = std::env::var("MSB_BENCH_SECRETS_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    println!(
        "msb-bench secrets: {n} requests per kept-alive run, {mib} MiB each way; KVM: {}",
        msb_hypervisor::classify().describe()
    );
    let net = TestNet::new(9);
    let tls = TlsHost::start(net.tcp(443), net.tcp(80));
    dns_server(net.udp(53), net.host);
    let dir = std::env::temp_dir().join(format!("msb-bench-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let name = "bench-secrets";
    let h = net.host.to_string();
    let _ = msb(&["rm", "--force", name], &[]);
    let allow = format!("tcp/{h}:443");
    let create = [
        "create",
        "msb/debian:12",
        "--name",
        name,
        "--boot-timeout",
        "60",
        "--allow",
        &allow,
        "--dns",
        &h,
        "--secret",
        "API_KEY@api.test,*.api.test",
        "--tls-upstream-ca",
        ca.to_str().unwrap(),
    ];
    let (ok, _, err) = msb(&create, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = msb(&["start", name], &[("API_KEY", "sk-bench-value-0123456789")]);
    assert!(ok, "{err}");
    let pem = tls.ca_pem.trim().to_string();
    let (ok, _, err) =
        msb(&["exec", name, "--", "sh", "-c", &format!("cat > /tmp/testca.pem <<'EOF'\n{pem}\nEOF")], &[]);
    assert!(ok, "{err}");
    let rec: serde_json::Value =
        serde_json::from_str(&msb(&["inspect", name, "--format", "json"], &[]).1).unwrap_or_default();
    let pid = rec["pid"].as_u64().unwrap_or(0) as u32;

    let modes =
        [("a relayed", "other.test", false), ("b intercepted", "api.test", false), ("c substituted", "api.test", true)];
    let ns = n.to_string();
    println!("\nHTTP/1.1, one kept-alive connection ({n} requests):");
    println!("{:<16} {:>9} {:>9} {:>9} {:>14}", "mode", "req/s", "p50 ms", "p99 ms", "CPU s/1k req");
    let mut rps = Vec::new();
    for (label, host, auth) in modes {
        let before = cpu_secs(pid);
        let r = guest(name, &["keep", host, &ns, if auth { "1" } else { "0" }]);
        let cpu = (cpu_secs(pid) - before) / n as f64 * 1000.0;
        match r {
            Some(v) => {
                let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
                println!("{label:<16} {:>9.1} {:>9.2} {:>9.2} {:>14.3}", f("rps"), f("p50"), f("p99"), cpu);
                rps.push(f("rps"));
            }
            None => rps.push(0.0),
        }
    }
    let ratio = |i: usize, j: usize, v: &[f64]| if v[i] > 0.0 { v[j] / v[i] } else { 0.0 };
    println!("throughput (b)/(a) {:.2}, (c)/(b) {:.2}", ratio(0, 1, &rps), ratio(1, 2, &rps));

    println!("\nh2, one connection (curl --http2, {n} requests):");
    println!("{:<16} {:>9} {:>9} {:>9}", "mode", "req/s", "p50 ms", "p99 ms");
    let mut rps2 = Vec::new();
    for (label, host, auth) in modes {
        match h2_latencies(name, host, n, auth) {
            Some((r, p50, p99)) => {
                println!("{label:<16} {r:>9.1} {p50:>9.2} {p99:>9.2}");
                rps2.push(r);
            }
            None => rps2.push(0.0),
        }
    }
    println!("throughput (b)/(a) {:.2}, (c)/(b) {:.2}", ratio(0, 1, &rps2), ratio(1, 2, &rps2));

    let conns = (n / 10).max(5).to_string();
    println!("\nNew connections ({conns} each, a request on each):");
    println!("{:<16} {:>9} {:>12} {:>12}", "mode", "conn/s", "TTFB p50 ms", "TTFB p99 ms");
    for (label, host, auth) in modes {
        if let Some(v) = guest(name, &["new", host, &conns, if auth { "1" } else { "0" }]) {
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            println!("{label:<16} {:>9.1} {:>12.2} {:>12.2}", f("cps"), f("ttfb50"), f("ttfb99"));
        }
    }
    if let Some(v) = guest(name, &["mint", "x", "10", "1"]) {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "first connection to a never-seen name (leaf minted) p50 {:.2} ms, the same name again (cached) {:.2} ms",
            f("first"),
            f("cached")
        );
    }

    let m = mib.to_string();
    println!("\n{mib} MiB each way, one connection:");
    println!("{:<16} {:>12} {:>12}", "mode", "down MiB/s", "up MiB/s");
    for (label, host, auth) in [modes[0], modes[2]] {
        let a = if auth { "1" } else { "0" };
        let down = guest(name, &["down", host, &m, a]).and_then(|v| v["mibs"].as_f64()).unwrap_or(0.0);
        let up = guest(name, &["up", host, &m, a]).and_then(|v| v["mibs"].as_f64()).unwrap_or(0.0);
        println!("{label:<16} {down:>12.1} {up:>12.1}");
    }
    let _ = msb(&["rm", "--force", name], &[]);
    let _ = std::fs::remove_dir_all(&dir);
}
