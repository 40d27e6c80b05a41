//! Boot benchmark: prints figures, passes or fails nothing.
//!
//! For N sandboxes, one after another: create() start → guest init (boot timer), → agent
//! ready, → first exec result; exec round trip on the running sandbox; and the sandbox's host
//! memory outside guest RAM (this process's RSS minus the guest memory mapping's RSS).
//! The agent channel: exec round trip with and without a stalled session beside it,
//! throughput each way (`cat` of a large stream), and host memory while a client offers stdin
//! to a command that never reads it.
//! Images: `msb run IMAGE -- true` warm and cold (its root filesystem removed first, so the
//! run builds it) beside the busybox initramfs, 1,000 creates with fsync on the writable root.
//! Usage: `msb-bench [N]` with MSB_HOME set up (hardware KVM, or inside the rig).
//!
//! `msb-bench net` (hardware KVM, or `tests/rig/run-rig.sh bench-net` in the rig): the
//! network through msb's gateway beside QEMU's slirp and passt (see `net.rs`).
//!
//! `msb-bench fs` (hardware KVM, or `tests/rig/run-rig.sh bench-fs`): filesystem workloads
//! through a shared directory beside the sandbox's writable root (see `fs.rs`).
//!
//! `msb-bench secrets` (`tests/rig/run-rig.sh bench-secrets`): what TLS interception for a
//! secret's host costs against relaying the same server (see `secrets.rs`).
//!
//! `msb-bench harden [N]` (`tests/rig/run-rig.sh bench-harden`): the sandbox process's
//! lockdown against none, alternating (see `harden.rs`).
//!
//! `msb-bench boots [N]` (`tests/rig/run-rig.sh bench-boots` in the rig): N boots of msb and
//! of QEMU `-M microvm` (same kernel and initramfs), alternating in one L1, timed to init and
//! counted where they never get there: whether lost boots are the rig's or msb's.
//!
//! `msb-bench floods [N] [MiB]` (`run-rig.sh bench-floods`): the same virtio-console flood
//! through msb's agent channel and through QEMU microvm's virtio-serial, alternating in one
//! L1, each run counted ok, stalled or died (see `floods.rs`).
//!
//! `msb-bench pull [N]` (on the host, no VM): a cold `msb pull` of the default image from a
//! loopback `docker-registry` into a fresh MSB_HOME, beside `skopeo copy` of it to an OCI
//! layout, N times each, alternating.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msb_actors::Sandbox;

mod floods;
mod fs;
mod harden;
mod net;
mod secrets;

const MEMORY_MIB: u64 = 256;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(name: &str, mut v: Vec<f64>) {
    if v.is_empty() {
        return println!("{name:<34} (no samples)");
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<34} n={:<3} min={:>8.1} p50={:>8.1} p99={:>8.1} max={:>8.1}",
        v.len(),
        v[0],
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

/// Argument that makes this binary boot one sandbox with its console on stdout and exit (the
/// msb side of the side-by-side comparison).
const VMM_CHILD: &str = "--vmm-child";

async fn vmm_child() {
    // The console log refuses symlinks (such as /proc/self/fd/1): it goes to a private file,
    // which a thread copies to stdout as it grows (polling every millisecond).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("console.log");
    let tail = log.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Seek, Write};
        let mut at = 0;
        loop {
            if let Ok(mut f) = std::fs::File::open(&tail) {
                let mut buf = Vec::new();
                if f.seek(std::io::SeekFrom::Start(at)).is_ok() && f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                    at += buf.len() as u64;
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&buf);
                    let _ = out.flush();
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let sb = Sandbox::builder().memory_mib(MEMORY_MIB).console_log(&log).create().await;
    if let Ok(sb) = sb {
        let _ = sb.exec("true", Vec::<String>::new()).await;
        let _ = sb.stop().await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(VMM_CHILD) => return vmm_child().await,
        Some(net::CLIENT) => std::process::exit(net::client(&args[1..])),
        Some(net::VMM_CHILD) => return net::vmm_child(&args[1..]).await,
        Some("net") => return tokio::task::block_in_place(net::side_by_side),
        Some("fs") => return tokio::task::block_in_place(fs::side_by_side),
        Some("secrets") => return tokio::task::block_in_place(secrets::side_by_side),
        Some("harden") => {
            let n = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
            return tokio::task::block_in_place(|| harden::side_by_side(n));
        }
        Some("pull") => return pull_side_by_side(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3)),
        Some("boots") => return side_by_side(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20)),
        Some("floods") => {
            let n = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
            return floods::side_by_side(n, args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100)).await;
        }
        _ => {}
    }
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    println!("msb-bench: {n} sandboxes, {MEMORY_MIB} MiB, 1 vCPU; KVM: {}", msb_hypervisor::classify().describe());
    let (mut to_init, mut to_ready, mut to_exec, mut rtt, mut outside) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let t0 = Instant::now();
        let sb = match Sandbox::builder().memory_mib(MEMORY_MIB).create().await {
            Ok(sb) => sb,
            Err(e) => {
                println!("boot {i}: failed: {e}");
                continue;
            }
        };
        let ready = t0.elapsed();
        let out = sb.exec("true", Vec::<String>::new()).await;
        let first = t0.elapsed();
        if out.is_err() {
            println!("boot {i}: first exec failed: {out:?}");
        }
        if let Some(d) = sb.boot_times().await.ok().and_then(|t| t.to_init) {
            to_init.push(ms(d));
        }
        to_ready.push(ms(ready));
        to_exec.push(ms(first));
        for _ in 0..20 {
            let t = Instant::now();
            if sb.exec("true", Vec::<String>::new()).await.is_ok() {
                rtt.push(ms(t.elapsed()));
            }
        }
        let m = sb.boot_times().await.ok().and_then(|t| t.memory).unwrap_or_default();
        outside.push(m.outside_guest_kib() as f64 / 1024.0);
        let _ = sb.stop().await;
        println!(
            "boot {i}: ready {:.0} ms, first exec {:.0} ms, RSS outside guest RAM {:.1} MiB (guest touched {:.1} MiB)",
            ms(ready),
            ms(first),
            m.outside_guest_kib() as f64 / 1024.0,
            m.guest_kib as f64 / 1024.0
        );
    }
    println!("--- msb figures (ms unless noted) ---");
    stats("create -> guest init (boot timer)", to_init);
    stats("create -> agent ready", to_ready);
    stats("create -> first exec result", to_exec);
    stats("exec round trip (true)", rtt);
    stats("process RSS outside guest RAM, MiB", outside);
    channel().await;
    named(n).await;
    images(n);
    side_by_side(n);
}

/// The default image beside the busybox initramfs, through the CLI: `msb run IMAGE -- true`
/// (root filesystem already built) against `msb run -- true`, and 1,000 small-file creates
/// with fsync on an image sandbox's writable root (timed inside the guest).
fn images(n: usize) {
    const IMAGE: &str = "msb/debian:12";
    let Some(bin) = std::env::current_exe().ok().map(|p| p.with_file_name("msb")).filter(|p| p.is_file()) else {
        return println!("images not benchmarked: no msb binary beside this one");
    };
    let listed = Command::new(&bin).args(["images", "--format", "json"]).output();
    if !listed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(IMAGE)) {
        return println!("images not benchmarked: {IMAGE} is not in the store (scripts/setup.sh loads it)");
    }
    let timed = |args: &[&str]| -> Option<(f64, String)> {
        let t = Instant::now();
        let out = Command::new(&bin).args(args).output().ok().filter(|o| o.status.success())?;
        Some((ms(t.elapsed()), String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (mut image, mut initramfs, mut creates) = (vec![], vec![], vec![]);
    let script = "import os,time\nt=time.time()\nfor i in range(1000):\n    fd=os.open(f'/tmp/f{i}',os.O_CREAT|os.O_WRONLY)\n    os.write(fd,b'x'); os.fsync(fd); os.close(fd)\nprint(round((time.time()-t)*1000))";
    for _ in 0..n {
        initramfs.extend(timed(&["run", "--", "true"]).map(|t| t.0));
        image.extend(timed(&["run", IMAGE, "--", "true"]).map(|t| t.0));
    }
    for _ in 0..n.min(3) {
        if let Some((_, out)) = timed(&["run", IMAGE, "--", "python3", "-c", script]) {
            creates.extend(out.trim().parse::<f64>().ok());
        }
    }
    // Cold: the root filesystem removed, so the run builds it from the stored layers first.
    let mut cold = vec![];
    let cold_note = match msb_images::msb_home().and_then(|h| msb_images::store::Store::open(&h)) {
        Ok(store) => match store.get(IMAGE) {
            Ok(rec) if rec.layers.iter().all(|l| store.blob_path(&l.digest).is_file()) => {
                // One run: in the rig the squashfs build is emulated and takes minutes.
                for _ in 0..n.min(1) {
                    let _ = std::fs::remove_file(store.rootfs_path(&rec));
                    cold.extend(timed(&["run", IMAGE, "--", "true"]).map(|t| t.0));
                }
                String::new()
            }
            Ok(_) => " (not run: the image's layers are not in this store)".into(),
            Err(e) => format!(" (not run: {e})"),
        },
        Err(e) => format!(" (not run: {e})"),
    };
    println!("--- images (CLI) ---");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let base = mean(&initramfs).max(f64::MIN_POSITIVE);
    let ratio = mean(&image) / base;
    stats("`msb run -- true` (busybox initramfs)", initramfs);
    stats(&format!("`msb run {IMAGE} -- true` warm"), image);
    println!("image warm / initramfs: {ratio:.2}x");
    if cold_note.is_empty() {
        let ratio = mean(&cold) / base;
        stats(&format!("`msb run {IMAGE} -- true` cold"), cold);
        println!("image cold / initramfs: {ratio:.2}x");
    } else {
        println!("`msb run {IMAGE} -- true` cold{cold_note}");
    }
    stats("1,000 file creates + fsync on the writable root, ms", creates);
}

/// A loopback `docker-registry` for the pull comparison; killed on drop.
struct Registry(std::process::Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `msb pull` (cold: a fresh MSB_HOME each time, so fetch, verify and the squashfs build)
/// beside `skopeo copy` to an OCI layout (fetch and write only), of the default image served
/// by a loopback registry.
fn pull_side_by_side(n: usize) {
    const IMAGE: &str = "msb/debian:12";
    println!("--- pull of {IMAGE} from a loopback docker-registry, {n} each ---");
    let Some(bin) = std::env::current_exe().ok().map(|p| p.with_file_name("msb")).filter(|p| p.is_file()) else {
        return println!("pull not benchmarked: no msb binary beside this one");
    };
    for tool in ["docker-registry", "skopeo"] {
        if which(tool).is_none() {
            return println!("pull not benchmarked: {tool} not found (scripts/setup.sh installs it)");
        }
    }
    let store = match msb_images::msb_home().and_then(|h| msb_images::store::Store::open(&h)) {
        Ok(s) => s,
        Err(e) => return println!("pull not benchmarked: {e}"),
    };
    let Ok(rec) = store.get(IMAGE) else {
        return println!("pull not benchmarked: {IMAGE} is not in the store (scripts/setup.sh loads it)");
    };
    let Some(manifest) = rec.manifest.clone() else { return println!("pull not benchmarked: no manifest recorded") };
    // An OCI layout over the store's own blobs, for skopeo to push.
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    std::os::unix::fs::symlink(store.root().join("blobs"), layout.join("blobs")).unwrap();
    let doc = std::fs::read(store.blob_path(&manifest)).unwrap_or_default();
    let media =
        serde_json::from_slice::<serde_json::Value>(&doc).ok().and_then(|v| v["mediaType"].as_str().map(String::from));
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": media.unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into()),
        "digest": manifest.as_str(), "size": doc.len(),
        "annotations": {"org.opencontainers.image.ref.name": "bench"}}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        work.path().join("data").display()
    );
    std::fs::write(work.path().join("config.yml"), cfg).unwrap();
    let Ok(child) = Command::new("docker-registry")
        .arg("serve")
        .arg(work.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return println!("pull not benchmarked: docker-registry did not start");
    };
    let _registry = Registry(child);
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            return println!("pull not benchmarked: the registry did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let remote = format!("127.0.0.1:{port}/{IMAGE}");
    let pushed = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:bench", layout.display()))
        .arg(format!("docker://{remote}"))
        .output();
    if !pushed.as_ref().is_ok_and(|o| o.status.success()) {
        return println!("pull not benchmarked: pushing with skopeo failed: {pushed:?}");
    }
    let (mut msb, mut skopeo) = (vec![], vec![]);
    for i in 0..n {
        let home = work.path().join(format!("home{i}"));
        std::fs::create_dir(&home).unwrap();
        let t = Instant::now();
        let o = Command::new(&bin).args(["pull", &remote]).env("MSB_HOME", &home).output();
        match o {
            Ok(o) if o.status.success() => msb.push(ms(t.elapsed())),
            other => println!("msb pull {i}: failed: {other:?}"),
        }
        let dest = work.path().join(format!("oci{i}"));
        let t = Instant::now();
        let o = Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{remote}"))
            .arg(format!("oci:{}:x", dest.display()))
            .output();
        match o {
            Ok(o) if o.status.success() => skopeo.push(ms(t.elapsed())),
            other => println!("skopeo copy {i}: failed: {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&home);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ratio = mean(&msb) / mean(&skopeo).max(f64::MIN_POSITIVE);
    stats("`msb pull` (fetch, verify, squashfs)", msb);
    stats("`skopeo copy` to an OCI layout", skopeo);
    println!("ratio msb/skopeo (mean): {ratio:.2}x");
}

async fn rtts(sb: &Sandbox, n: usize) -> (Vec<f64>, usize) {
    let (mut v, mut lost) = (Vec::new(), 0);
    for _ in 0..n {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), sb.exec("true", Vec::<String>::new())).await {
            Ok(Ok(_)) => v.push(ms(t.elapsed())),
            _ => {
                lost += 1;
                // A channel that is stalled for good answers nothing: do not wait 10 s more.
                if lost >= 3 && v.is_empty() {
                    break;
                }
            }
        }
    }
    (v, lost)
}

/// The agent channel under load (one sandbox).
async fn channel() {
    println!("--- agent channel ---");
    let sb = match Sandbox::builder().memory_mib(MEMORY_MIB).create().await {
        Ok(sb) => sb,
        Err(e) => return println!("agent channel not benchmarked: {e}"),
    };
    let (plain, _) = rtts(&sb, 30).await;
    stats("exec round trip, alone", plain);

    const STREAM: usize = 32 << 20;
    let t = Instant::now();
    let spec = msb_actors::ExecSpec::command(["head", "-c", "33554432", "/dev/zero"]);
    let mut got = 0;
    if let Ok(mut h) = sb.exec_stream(spec).await {
        while let Some(ev) = h.next().await {
            if let msb_actors::ExecEvent::Stdout(d) = ev {
                got += d.len();
            }
        }
    }
    println!(
        "guest->host throughput: {:.1} MiB/s ({} MiB)",
        got as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64(),
        got >> 20
    );

    let t = Instant::now();
    let spec = msb_actors::ExecSpec { stdin: Some(vec![b'x'; STREAM]), ..msb_actors::ExecSpec::command(["wc", "-c"]) };
    match sb.exec_spec(spec).await {
        Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == STREAM.to_string() => println!(
            "host->guest throughput: {:.1} MiB/s ({} MiB)",
            STREAM as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64(),
            STREAM >> 20
        ),
        other => println!("host->guest throughput: failed: {other:?}"),
    }

    // A client offers stdin as fast as it can to a command that never reads it.
    let before = sb.boot_times().await.ok().and_then(|b| b.memory).unwrap_or_default().outside_guest_kib();
    if let Ok(h) = sb.exec_stream(msb_actors::ExecSpec::command(["sleep", "600"])).await {
        let chunk = vec![0u8; 64 * 1024];
        let mut accepted = 0usize;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while h.write_stdin(&chunk).await.is_ok() {
                accepted += chunk.len();
            }
        })
        .await;
        let after = sb.boot_times().await.ok().and_then(|b| b.memory).unwrap_or_default().outside_guest_kib();
        println!(
            "stdin flood (5 s, unread): {:.1} MiB accepted; RSS outside guest RAM {:.1} -> {:.1} MiB",
            accepted as f64 / (1 << 20) as f64,
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
        let _ = h.signal(9).await;
    }

    // A session whose consumer stops reading a flood, beside the round trips.
    match sb.exec_stream(msb_actors::ExecSpec::command(["cat", "/dev/zero"])).await {
        Ok(mut stalled) => {
            let _ = stalled.next().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (v, lost) = rtts(&sb, 30).await;
            stats("exec round trip, one session stalled", v);
            if lost > 0 {
                println!("  {lost} round trips got no answer within 10 s");
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), stalled.signal(9)).await;
        }
        Err(e) => println!("stalled session not started: {e}"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), sb.kill()).await;
}

/// Named sandboxes: a sandbox process per sandbox, exec over its Unix socket (the API) and
/// through a fresh `msb exec` process (the CLI).
async fn named(n: usize) {
    use msb_control_plane::{Msb, SandboxConfig};
    let Ok(msb) = Msb::from_env() else { return println!("named sandboxes not benchmarked: no MSB_HOME") };
    let (mut to_exec, mut api_rtt, mut cli_rtt) = (vec![], vec![], vec![]);
    let bin = std::env::current_exe().ok().map(|p| p.with_file_name("msb")).filter(|p| p.is_file());
    for i in 0..n {
        let name = format!("bench-{}-{i}", std::process::id());
        let cfg = SandboxConfig { memory_mib: MEMORY_MIB, ..Default::default() };
        let t0 = Instant::now();
        let sb = match msb.create(&name, cfg) {
            Ok(sb) => sb,
            Err(e) => return println!("named sandboxes not benchmarked: {e}"),
        };
        if let Err(e) = sb.start_detached().await {
            println!("named {i}: start failed: {e}");
            let _ = sb.remove(true).await;
            continue;
        }
        let spec = || msb_actors::ExecSpec { argv: vec!["true".into()], ..Default::default() };
        if sb.exec(spec()).await.is_ok() {
            to_exec.push(ms(t0.elapsed()));
        }
        for _ in 0..20 {
            let t = Instant::now();
            if sb.exec(spec()).await.is_ok() {
                api_rtt.push(ms(t.elapsed()));
            }
        }
        if let Some(bin) = &bin {
            for _ in 0..5 {
                let t = Instant::now();
                let st = Command::new(bin).args(["exec", &name, "--", "true"]).status();
                if st.is_ok_and(|s| s.success()) {
                    cli_rtt.push(ms(t.elapsed()));
                }
            }
        }
        let _ = sb.remove(true).await;
    }
    println!("--- named sandboxes (own process, Unix socket) ---");
    stats("create+start -> first exec result", to_exec);
    stats("exec round trip via socket (API)", api_rtt);
    stats("`msb exec -- true` (CLI process)", cli_rtt);
}

/// Spawns `cmd`, waits for a stdout line containing `marker`, and returns the time from spawn
/// to that line and the process's RSS (KiB) at that moment. The process is killed if
/// `kill` is set, else waited for.
fn time_to_marker(cmd: &mut Command, marker: &str, kill: bool) -> Option<(Duration, u64)> {
    let t0 = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().ok()?;
    let pid = child.id();
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(&marker) {
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
                    .unwrap_or(0);
                let _ = tx.send((t0.elapsed(), rss));
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(60)).ok();
    if kill || got.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    got
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// The same kernel and initramfs booted by our VMM (`msb run`) and by QEMU `-M microvm`,
/// both timed from process spawn to agentd's first console line.
fn side_by_side(n: usize) {
    println!("--- side by side: process spawn -> guest init (agentd's first console line) ---");
    let Some(qemu) = which("qemu-system-x86_64") else {
        return println!("QEMU not found in PATH: comparison not run");
    };
    let Ok(home) = msb_images::msb_home() else { return println!("comparison not run: no MSB_HOME") };
    let (kernel, initramfs) = match (|| {
        let k = msb_images::kernel(&home)?;
        let i = msb_images::initramfs::cached(&home, &msb_images::agentd(&home)?, &msb_images::busybox(&home)?)?;
        msb_images::Result::Ok((k, i))
    })() {
        Ok(v) => v,
        Err(e) => return println!("comparison not run: {e}"),
    };
    let (mut ours, mut theirs, mut ours_rss, mut theirs_rss) = (vec![], vec![], vec![], vec![]);
    // Boots that never reached init within 60 s, each VMM's own (alternating in one L1, so a
    // bad L1 hits both alike: a difference is the VMM's).
    let (mut ours_lost, mut theirs_lost) = (0usize, 0usize);
    for _ in 0..n {
        // The VMM process: what a sandbox process runs, here on its own (this binary again).
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.arg(VMM_CHILD);
        match time_to_marker(&mut c, "msb-agentd: init", false) {
            Some((t, rss)) => {
                ours.push(ms(t));
                ours_rss.push(rss as f64 / 1024.0);
            }
            None => ours_lost += 1,
        }
        let mut q = Command::new(&qemu);
        q.args(["-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm", "-cpu", "host", "-smp", "1"])
            .args(["-m", &MEMORY_MIB.to_string(), "-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial", "stdio", "-kernel"])
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 reboot=k panic=-1 quiet"]);
        match time_to_marker(&mut q, "msb-agentd: init", true) {
            Some((t, rss)) => {
                theirs.push(ms(t));
                theirs_rss.push(rss as f64 / 1024.0);
            }
            None => theirs_lost += 1,
        }
    }
    println!("msb: {ours_lost} of {n} boots never reached init within 60 s");
    println!("qemu microvm: {theirs_lost} of {n} boots never reached init within 60 s");
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.get(v.len() / 2).copied()
    };
    stats("msb: spawn -> init, ms", ours.clone());
    stats("qemu microvm: spawn -> init, ms", theirs.clone());
    stats("msb: process RSS at init, MiB", ours_rss.clone());
    stats("qemu microvm: process RSS at init, MiB", theirs_rss.clone());
    if let (Some(a), Some(b)) = (p50(&mut ours), p50(&mut theirs)) {
        println!("ratio msb/qemu (p50 spawn -> init): {:.2}", a / b);
    }
    if let (Some(a), Some(b)) = (p50(&mut ours_rss), p50(&mut theirs_rss)) {
        println!("ratio msb/qemu (p50 RSS at init): {:.2}", a / b);
    }
}
