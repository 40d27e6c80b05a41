//! Secrets against a real guest, through the `msb` command line, without `-k`: a TLS test
//! host in a network namespace with its own CA (given to msb with `--tls-upstream-ca`),
//! serving `api.test` (the secret's host), `other.test` (not its host) and `wrong.test`
//! (a secret host whose server shows a certificate for another name), echoing every request
//! head back, and logging what it received.
//!
//! What must hold: the allowed host receives the value over HTTP/1.1, HTTP/2 (both sides
//! agree on h2) and Python, and the guest never sees it (the echo comes back masked); a
//! non-allowed host and plain HTTP receive only the placeholder; `--resolve` to an address
//! the sandbox never resolved gets nothing; a server with a wrong certificate gets no
//! request; rotation and removal apply to the next request of a kept-alive connection; two
//! sandboxes have different CAs, each installed once in the guest's bundle; after the run
//! the value is in no file under the sandbox's directory or the msb home's top level, not
//! in the sandbox process's argv or environment, not in the guest's RAM, and the vault's
//! pages are locked; a value with a CR is refused at start, naming the secret.

use std::io::{Read, Seek};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use msb_tests::netns::TestNet;
use msb_tests::tls_host::{Seen, TlsHost};

use crate::cli::{code, msb, ok};
use msb_tests::dns::dns_server;

const IMAGE: &str = "msb/debian:12";

/// `msb` with extra environment variables (the values' sources).
fn msb_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    msb_tests::require_linux_capable_kvm();
    let mut c = Command::new(crate::cli::msb_bin());
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("msb runs")
}

/// A value unique to this run, so a scan cannot be fooled by an earlier one.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{nanos:x}-{}", std::process::id())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether any data extent of `path` holds one of `needles` (holes are skipped, so a sparse
/// disk image costs what it holds).
fn file_holds(path: &Path, needles: &[&[u8]]) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(_) => break, // no data past `at`
        };
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data)).unwrap_or(len);
        let mut pos = data;
        while pos < hole {
            f.seek(std::io::SeekFrom::Start(pos)).unwrap();
            let want = ((hole - pos) as usize).min(buf.len());
            let n = f.read(&mut buf[..want]).unwrap_or(0);
            if n == 0 {
                break;
            }
            if needles.iter().any(|nd| contains(&buf[..n], nd)) {
                return true;
            }
            pos += n.saturating_sub(overlap).max(1) as u64;
        }
        at = hole;
    }
    false
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// The guest RAM regions (host address, length) the sandbox process logged at its last
/// start (`guest memory region … host=ADDR len=LEN` in its vmm.log).
fn guest_regions(vmm_log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(vmm_log).unwrap();
    let field = |l: &str, k: &str| -> Option<u64> {
        let at = l.find(&format!("{k}="))? + k.len() + 1;
        l[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("guest memory region")).collect();
    // The last start's regions: those logged after the last region at guest address 0.
    let first = lines.iter().rposition(|l| field(l, "guest") == Some(0)).expect("the sandbox logged its guest memory");
    lines[first..].iter().filter_map(|l| Some((field(l, "host")?, field(l, "len")?))).collect()
}

/// Whether the guest memory of sandbox process `pid` (its `regions`) holds one of `needles`.
fn guest_ram_holds(pid: u32, regions: &[(u64, u64)], needles: &[&[u8]]) -> bool {
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(1) as u64;
    let mut buf = vec![0u8; 4 << 20];
    let mut scanned = 0u64;
    for &(start, len) in regions {
        let end = start + len;
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            mem.seek(std::io::SeekFrom::Start(at)).unwrap();
            let n = mem.read(&mut buf[..want]).unwrap_or(0);
            if n == 0 {
                at += 4096;
                continue;
            }
            scanned += n as u64;
            if needles.iter().any(|nd| contains(&buf[..n], nd)) {
                return true;
            }
            if at + n as u64 >= end {
                break;
            }
            at += (n as u64).saturating_sub(overlap).max(1);
        }
    }
    assert!(scanned >= 64 << 20, "only {scanned} bytes of guest memory could be read");
    false
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn head_for<'a>(heads: &'a [Seen], path: &str) -> Option<&'a Seen> {
    heads.iter().find(|s| s.head.contains(&format!("GET {path} ")) || s.head.contains(&format!(":path: {path}\n")))
}

#[test]
fn a_secret_reaches_only_its_host_over_tls_never_the_guest_and_no_file() {
    // A value with a CR is refused at start, naming the secret and not the value.
    let bad = "e2e-secret-bad";
    let _ = msb(&["rm", "--force", bad]);
    ok(&["create", "--name", bad, "--secret", "BAD_KEY@api.test"]);
    let o = msb_env(&["start", bad], &[("BAD_KEY", "sk-bad\rinjected")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(code(&o), 0);
    assert!(err.contains("BAD_KEY") && err.contains("carriage return") && !err.contains("injected"), "{err}");
    let _ = msb(&["rm", "--force", bad]);

    let net = TestNet::new(7);
    let tls = TlsHost::start(net.tcp(443), net.tcp(80));
    dns_server(net.udp(53), net.host);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("test-ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let value = unique("sk-e2e-value");
    let value2 = unique("sk-e2e-rotated");
    let name = "e2e-secrets";
    let h = net.host.to_string();
    let _ = msb(&["rm", "--force", name]);
    ok(&[
        "create",
        IMAGE,
        "--name",
        name,
        "--boot-timeout",
        "45",
        "--allow",
        &format!("tcp/{h}:80,443"),
        "--dns",
        &h,
        "--secret",
        "API_KEY@api.test,wrong.test",
        "--tls-upstream-ca",
        ca.to_str().unwrap(),
    ]);
    // The sandbox process logs where the guest's RAM is, for the scan below.
    let start_env = [("API_KEY", value.as_str()), ("MSB_LOG", "warn,msb_hypervisor::memory=info")];
    let o = msb_env(&["start", name], &start_env);
    if code(&o) != 0 {
        eprintln!("E2E-RETRY: msb start {name}: {}", String::from_utf8_lossy(&o.stderr));
        let o = msb_env(&["start", name], &start_env);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    }
    let rec: serde_json::Value = serde_json::from_str(&ok(&["inspect", name, "--format", "json"])).unwrap();
    let placeholder = rec["config"]["secrets"][0]["placeholder"].as_str().unwrap().to_string();
    assert!(placeholder.starts_with("msbph_"), "{rec}");
    assert!(!rec.to_string().contains(&value), "inspect shows no value");

    let script = format!(
        r#"
cat > /tmp/testca.pem <<'EOF'
{pem}
EOF
echo "ph=$API_KEY"
t() {{ curl -sS --max-time 15 "$@" 2>&1; r=$?; echo; echo "exit=$r"; }}
echo "== resolve"; t --resolve api.test:443:{h} -H "Authorization: Bearer $API_KEY" https://api.test/resolve
echo "== h1"; t --http1.1 -H "Authorization: Bearer $API_KEY" https://api.test/h1
echo "== h2"; t --http2 -w 'version=%{{http_version}}' -H "x-path: /h2" -H "Authorization: Bearer $API_KEY" https://api.test/h2
echo "== plain"; t -H "Authorization: Bearer $API_KEY" http://api.test/plain
echo "== other"; t --cacert /tmp/testca.pem -H "Authorization: Bearer $API_KEY" https://other.test/other
echo "== wrong"; t -H "Authorization: Bearer $API_KEY" https://wrong.test/wrong
echo "== py"; python3 -c '
import os, urllib.request
r = urllib.request.Request("https://api.test/py", headers={{"Authorization": "Bearer " + os.environ["API_KEY"]}})
print(urllib.request.urlopen(r, timeout=15).read().decode())'
echo "== end"
"#,
        pem = tls.ca_pem.trim()
    );
    let o = msb(&["exec", name, "--", "sh", "-c", &script]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let section = |k: &str| -> String {
        let start = out.find(&format!("== {k}\n")).unwrap_or_else(|| panic!("{k}: {out} {err}"));
        let rest = &out[start + k.len() + 4..];
        rest[..rest.find("== ").unwrap_or(rest.len())].to_string()
    };
    assert!(out.contains(&format!("ph={placeholder}")), "the guest sees the placeholder: {out}");
    assert!(!out.contains(&value) && !err.contains(&value), "the guest never sees the value: {out} {err}");
    let heads = tls.heads();
    let seen = |path: &str| head_for(&heads, path).cloned();
    // An address never resolved through the gateway: relayed untouched, and the guest does
    // not trust the test host's own CA, so nothing is sent.
    assert!(!section("resolve").contains("exit=0"), "{out}");
    assert!(seen("/resolve").is_none(), "{heads:?}");
    // HTTP/1.1 and HTTP/2: the host gets the value; the echo comes back masked.
    for (path, alpn) in [("/h1", "http/1.1"), ("/h2", "h2")] {
        let s = seen(path).unwrap_or_else(|| panic!("{path} never arrived: {heads:?} {out} {err}"));
        assert!(
            s.head.to_lowercase().contains(&format!("authorization: bearer {}", value.to_lowercase())),
            "{path}: {s:?}"
        );
        assert_eq!((s.sni.as_deref(), s.alpn.as_deref()), (Some("api.test"), Some(alpn)), "{path}");
        let sec = section(path.trim_start_matches('/'));
        assert!(sec.contains("exit=0") && sec.to_lowercase().contains("bearer *****"), "{path}: {sec}");
    }
    assert!(section("h2").contains("version=2"), "curl --http2 spoke h2: {out}");
    let py = seen("/py").expect("python's request arrived");
    assert!(py.head.contains(&value), "{py:?}");
    assert!(section("py").contains("Bearer *****"), "{out}");
    // Plain HTTP and another host: the placeholder only.
    for path in ["/plain", "/other"] {
        let s = seen(path).unwrap_or_else(|| panic!("{path}: {heads:?} {out}"));
        assert!(s.head.contains(&placeholder) && !s.head.contains(&value), "{path}: {s:?}");
    }
    // A secret host whose server is not who it says: the guest's TLS fails, no request.
    assert!(!section("wrong").contains("exit=0"), "{out}");
    assert!(seen("/wrong").is_none(), "{heads:?}");

    // Rotation, then removal, on one kept-alive connection.
    let py = r#"
import http.client, os, time
c = http.client.HTTPSConnection("api.test", timeout=30)
def req(p):
    c.request("GET", p, headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
    r = c.getresponse(); r.read()
req("/keep1")
for f in ["/tmp/rotated", "/tmp/removed"]:
    for _ in range(900):
        if os.path.exists(f): break
        time.sleep(0.1)
    req("/keep2" if f == "/tmp/rotated" else "/keep3")
print("done")
"#;
    let keep = Command::new(crate::cli::msb_bin())
        .args(["exec", name, "--", "python3", "-c", py])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("/keep1", Duration::from_secs(60), || head_for(&tls.heads(), "/keep1").is_some());
    let o = msb_env(&["secret", "set", name, "API_KEY", "--from", "env:API_KEY_NEXT"], &[("API_KEY_NEXT", &value2)]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    ok(&["exec", name, "--", "touch", "/tmp/rotated"]);
    wait_for("/keep2", Duration::from_secs(60), || head_for(&tls.heads(), "/keep2").is_some());
    ok(&["secret", "rm", name, "API_KEY"]);
    ok(&["exec", name, "--", "touch", "/tmp/removed"]);
    let done = keep.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&done.stdout).contains("done"), "{}", String::from_utf8_lossy(&done.stderr));
    let heads = tls.heads();
    let (k1, k2, k3) = (seen_in(&heads, "/keep1"), seen_in(&heads, "/keep2"), seen_in(&heads, "/keep3"));
    assert!(k1.head.contains(&value), "{k1:?}");
    assert!(k2.head.contains(&value2) && !k2.head.contains(&value), "rotated on the same connection: {k2:?}");
    assert!(k3.head.contains(&placeholder) && !k3.head.contains(&value2), "removed: {k3:?}");
    assert!(k1.conn == k2.conn && k2.conn == k3.conn, "one kept-alive connection: {k1:?} {k2:?} {k3:?}");

    // The sandbox process: no value in argv or environ, locked pages, none in guest RAM.
    let rec: serde_json::Value = serde_json::from_str(&ok(&["inspect", name, "--format", "json"])).unwrap();
    let pid = rec["pid"].as_u64().expect("a running sandbox has a pid") as u32;
    let needles: [&[u8]; 2] = [value.as_bytes(), value2.as_bytes()];
    for f in ["cmdline", "environ"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
        assert!(!needles.iter().any(|n| contains(&bytes, n)), "/proc/{pid}/{f} holds a value");
    }
    let home = std::env::var_os("MSB_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".msb"));
    let regions = guest_regions(&home.join("sandboxes").join(name).join("vmm.log"));
    assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), 256 << 20, "{regions:?}");
    // The placeholder is there (the guest's environment holds it): the scan reads guest RAM.
    assert!(guest_ram_holds(pid, &regions, &[placeholder.as_bytes()]), "the scan finds the placeholder");
    assert!(!guest_ram_holds(pid, &regions, &needles), "the guest's RAM holds a value");
    let audit = ok(&["logs", "--net", name]);
    assert!(audit.contains("\"event\":\"substituted\""), "{audit}");
    assert!(audit.contains("\"event\":\"upstream-failed\""), "{audit}");

    // A second sandbox has another CA; each guest bundle holds its CA once.
    let ca_of = |n: &str| ok(&["exec", n, "--", "cat", "/usr/local/share/ca-certificates/msb-sandbox.crt"]);
    let first = ca_of(name);
    let blocks = ok(&["exec", name, "--", "sh", "-c", "grep -c 'msb sandbox CA: begin' $SSL_CERT_FILE"]);
    assert_eq!(blocks.trim(), "1");
    let second = "e2e-secrets-2";
    let _ = msb(&["rm", "--force", second]);
    ok(&["create", "--name", second, "--boot-timeout", "45", "--secret", "API_KEY@api.test"]);
    let o = msb_env(&["start", second], &[("API_KEY", &value)]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let other = ca_of(second);
    assert!(first.contains("BEGIN CERTIFICATE") && other.contains("BEGIN CERTIFICATE"));
    assert_ne!(first, other, "two sandboxes, two CAs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let rec2: serde_json::Value = serde_json::from_str(&ok(&["inspect", second, "--format", "json"])).unwrap();
    let pid2 = rec2["pid"].as_u64().unwrap() as u32;
    let status2 = std::fs::read_to_string(format!("/proc/{pid2}/status")).unwrap();
    assert!(status2.lines().any(|l| l.starts_with("VmLck:") && !l.ends_with(" 0 kB")), "{status2}");
    let _ = locked; // the first sandbox's only secret was removed: its pages are unlocked again

    // After the run: no value in the home's top-level files (the state store) or anything
    // under the sandboxes' directories (logs, audit, writable disk).
    let _ = msb(&["stop", name]);
    let _ = msb(&["stop", second]);
    let mut files = Vec::new();
    for d in [home.join("sandboxes").join(name), home.join("sandboxes").join(second)] {
        files_under(&d, &mut files);
    }
    files.extend(std::fs::read_dir(&home).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()));
    assert!(files.iter().any(|f| f.ends_with("root.img")), "the writable disk is scanned: {files:?}");
    for f in &files {
        assert!(!file_holds(f, &needles), "{} holds a secret value", f.display());
    }
    let _ = msb(&["rm", "--force", name]);
    let _ = msb(&["rm", "--force", second]);
}

fn seen_in<'a>(heads: &'a [Seen], path: &str) -> &'a Seen {
    head_for(heads, path).unwrap_or_else(|| panic!("{path} never arrived: {heads:?}"))
}
