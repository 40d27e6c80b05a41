//! Network benchmark (`msb-bench net`): the same guest kernel, the same initramfs and the same
//! guest program (this binary, run inside the guest as `--net-client`) behind three networks:
//!
//! - msb: virtio-net into the sandbox process's smoltcp gateway (policy: the test host's
//!   range allowed, as a user would write it);
//! - QEMU `-M microvm` with its user-mode network (`-netdev user`, slirp);
//! - QEMU `-M microvm` with passt (`-netdev stream` to a `passt` process).
//!
//! Each guest sends to a test host in a network namespace this run creates (198.51.100.2 on
//! a veth pair, nothing else reachable): TCP throughput with one flow and with four (MTU
//! 1500), then short connections (connect, one byte each way, close) one after another —
//! msb once with its default new-connection rate (64/s, burst 128) and once with it raised.
//! The host side times everything (first byte to last EOF; first accept to last close).
//! Memory: the network side's host RSS, idle and under load, as the difference to the same
//! VMM booted without a network (guest RAM's mapping left out), plus passt's own process.
//! With `MSB_BENCH_NET_SYNFLOOD=N`, each guest then sends N raw SYNs that never complete
//! and makes 20 short connections after them: how many host connections the SYNs opened and
//! whether the network still carries new ones, for each network side by side.
//! Prints figures and msb's ratios to each peer; passes or fails nothing.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_actors::Sandbox;
use msb_tests::netns::TestNet;

use crate::MEMORY_MIB;

/// Argument that makes this binary the guest's traffic generator.
pub const CLIENT: &str = "--net-client";
/// Argument that makes this binary one msb sandbox process running the phases.
pub const VMM_CHILD: &str = "--net-vmm-child";

const BULK1_PORT: u16 = 5001;
const BULK4_PORT: u16 = 5004;
const CONNS_PORT: u16 = 5002;
/// Where a SYN flood goes (a sink that counts what the network dialed), and the short
/// connections after it (the network still carries new ones).
const SYN_PORT: u16 = 5005;
const AFTER_PORT: u16 = 5006;
/// Short connections made after a SYN flood.
const AFTER_CONNS: u32 = 20;
const READY: &str = "BENCH-READY";
const PHASE_DONE: &str = "BENCH-PHASE-DONE";
const DONE: &str = "BENCH-DONE";

/// Sizes of one run, from the environment (defaults suit the rig's nested guests).
#[derive(Clone, Copy)]
struct Load {
    /// MiB sent by the single flow; the four flows send a quarter each.
    mib: u64,
    conns: u32,
    /// Raw SYNs the guest sends (`MSB_BENCH_NET_SYNFLOOD`, default none), then
    /// [`AFTER_CONNS`] short connections.
    synflood: u32,
}

impl Load {
    fn from_env() -> Load {
        let get = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        Load {
            mib: get("MSB_BENCH_NET_MIB", 32).max(4),
            conns: get("MSB_BENCH_NET_CONNS", 200).max(1) as u32,
            synflood: get("MSB_BENCH_NET_SYNFLOOD", 0) as u32,
        }
    }

    /// The guest's command lines, one per phase, in order.
    fn phases(&self, host: std::net::Ipv4Addr) -> Vec<Vec<String>> {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let mut v = vec![
            s(&["bulk", &format!("{host}:{BULK1_PORT}"), "1", &self.mib.to_string()]),
            s(&["bulk", &format!("{host}:{BULK4_PORT}"), "4", &(self.mib / 4).to_string()]),
            s(&["conns", &format!("{host}:{CONNS_PORT}"), &self.conns.to_string()]),
        ];
        if self.synflood > 0 {
            v.push(s(&["synflood", &format!("{host}:{SYN_PORT}"), &self.synflood.to_string()]));
            v.push(s(&["conns", &format!("{host}:{AFTER_PORT}"), &AFTER_CONNS.to_string()]));
        }
        v
    }
}

/// The guest side: `bulk ADDR FLOWS MIB` (each flow sends MIB MiB, half-closes and waits for
/// the sink's EOF) or `conns ADDR N`. Exits non-zero on any failure.
pub fn client(args: &[String]) -> i32 {
    let run = || -> std::io::Result<()> {
        let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).ok_or(std::io::ErrorKind::InvalidInput)?;
        let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).ok_or(std::io::ErrorKind::InvalidInput);
        match args.first().map(String::as_str) {
            Some("bulk") => {
                let (flows, mib) = (num(2)?, num(3)?);
                let handles: Vec<_> = (0..flows)
                    .map(|_| {
                        std::thread::spawn(move || -> std::io::Result<()> {
                            let mut s = TcpStream::connect(addr)?;
                            let buf = vec![0x5a_u8; 64 << 10];
                            for _ in 0..mib * 16 {
                                s.write_all(&buf)?;
                            }
                            s.shutdown(std::net::Shutdown::Write)?;
                            let mut rest = Vec::new();
                            s.read_to_end(&mut rest)?;
                            Ok(())
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().map_err(|_| std::io::ErrorKind::Other)??;
                }
                Ok(())
            }
            Some("synflood") => synflood(addr, num(2)?),
            Some("conns") => {
                for _ in 0..num(2)? {
                    let mut s = TcpStream::connect(addr)?;
                    s.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)?;
                }
                Ok(())
            }
            _ => Err(std::io::ErrorKind::InvalidInput.into()),
        }
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("net-client {args:?}: {e}");
            1
        }
    }
}

/// `synflood ADDR N`: N TCP SYNs from a raw socket (root in the guest), each from its own
/// port; the guest kernel resets the SYN-ACKs, so no handshake completes. Waits out a full
/// transmit queue (ENOBUFS) and gives up after 150 s; says how far it got.
fn synflood(addr: SocketAddr, n: u64) -> std::io::Result<()> {
    use rustix::net::{socket, AddressFamily, SendFlags, SocketType};
    let SocketAddr::V4(dst) = addr else { return Err(std::io::ErrorKind::InvalidInput.into()) };
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(addr)?;
    let std::net::IpAddr::V4(src) = probe.local_addr()?.ip() else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let fd = socket(AddressFamily::INET, SocketType::RAW, Some(rustix::net::ipproto::TCP))?;
    let csum = |b: &[u8]| {
        let mut v: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while v >> 16 != 0 {
            v = (v & 0xffff) + (v >> 16);
        }
        !(v as u16)
    };
    let (t0, mut sent, mut busy) = (Instant::now(), 0u64, 0u64);
    let mut seq: u32 = 0x1234_5678;
    'flood: for i in 0..n {
        seq = seq.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&(20000 + (i % 40000) as u16).to_be_bytes());
        h[2..4].copy_from_slice(&dst.port().to_be_bytes());
        h[4..8].copy_from_slice(&seq.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = 0x02; // SYN
        h[14..16].copy_from_slice(&1024u16.to_be_bytes());
        let mut pseudo = Vec::with_capacity(32);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.ip().octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&h);
        h[16..18].copy_from_slice(&csum(&pseudo).to_be_bytes());
        loop {
            if t0.elapsed() > Duration::from_secs(150) {
                break 'flood;
            }
            match rustix::net::sendto(&fd, &h, SendFlags::empty(), &std::net::SocketAddrV4::new(*dst.ip(), 0)) {
                Ok(_) => break,
                Err(rustix::io::Errno::NOBUFS) => {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        sent += 1;
    }
    println!(
        "net-client synflood: sent {sent} of {n} SYNs in {:.1} s (transmit queue full {busy} times)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The msb side as its own process (so that its RSS is one sandbox's): boots a sandbox with
/// the bench initramfs, with the test range allowed (its second argument is the test host, or
/// `none` for no network), prints READY, runs each phase
/// through exec, then DONE.
pub async fn vmm_child(args: &[String]) {
    let initramfs = PathBuf::from(&args[0]);
    let host: Option<std::net::Ipv4Addr> = args.get(1).and_then(|a| a.parse().ok());
    let mut b = Sandbox::builder().memory_mib(MEMORY_MIB).initramfs(&initramfs);
    if host.is_some() {
        let policy = msb_actors::net::Policy::parse("allow tcp/198.51.100.0/24\n").expect("the bench policy");
        let mut limits = msb_actors::net::Limits::default();
        if let Some(rate) = args.get(2).and_then(|a| a.parse::<u32>().ok()) {
            (limits.flows_per_sec, limits.flow_burst) = (rate, rate.saturating_mul(2));
        }
        b = b.network(msb_actors::Network { policy, limits, ..Default::default() });
    } else {
        b = b.no_network();
    }
    let sb = match b.create().await {
        Ok(sb) => sb,
        Err(e) => return println!("net bench: sandbox failed: {e}"),
    };
    println!("{READY}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(host) = host {
        for phase in Load::from_env().phases(host) {
            let mut argv = vec![CLIENT.to_string()];
            argv.extend(phase);
            match sb.exec("/bin/msb-bench", argv).await {
                Ok(o) if o.success() => {
                    for l in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("net-client")) {
                        println!("{l}");
                    }
                }
                o => println!("net bench: guest phase failed: {o:?}"),
            }
            println!("{PHASE_DONE}");
        }
    }
    println!("{DONE}");
    let _ = sb.kill().await;
}

/// What the sink saw of one connection.
#[derive(Clone, Copy)]
struct Conn {
    first: Instant,
    last: Instant,
    bytes: u64,
}

/// A listener in the test namespace recording its connections (bulk: read to EOF, then
/// close; echo: one byte back).
#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<Conn>>>);

impl Sink {
    fn start(l: TcpListener, echo: bool) -> Sink {
        let seen = Sink(Arc::default());
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let s = s.clone();
                let mut serve = move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = vec![0u8; 256 << 10];
                    let (mut first, mut bytes) = (None, 0);
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                first.get_or_insert_with(Instant::now);
                                bytes += n as u64;
                                if echo {
                                    let _ = c.write_all(b"y");
                                }
                            }
                        }
                    }
                    let last = Instant::now();
                    s.0.lock().unwrap().push(Conn { first: first.unwrap_or(last), last, bytes });
                };
                // Short connections come one at a time: served inline, no thread each.
                if echo {
                    serve()
                } else {
                    std::thread::spawn(serve);
                }
            }
        });
        seen
    }

    fn take(&self) -> Vec<Conn> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// One variant's figures.
#[derive(Default, Clone, Copy)]
struct Figures {
    bulk1_mibs: Option<f64>,
    bulk4_mibs: Option<f64>,
    conns_per_s: Option<f64>,
    idle_kib: Option<u64>,
    load_kib: Option<u64>,
    /// A helper process's RSS (passt), idle and peak.
    helper_kib: Option<(u64, u64)>,
    /// With a SYN flood: host connections the flood's SYNs opened, and the short
    /// connections that completed after it.
    flood: Option<(usize, usize)>,
}

fn throughput(conns: &[Conn], flows: usize) -> Option<f64> {
    if conns.len() != flows || conns.iter().any(|c| c.bytes == 0) {
        return None;
    }
    let start = conns.iter().map(|c| c.first).min()?;
    let end = conns.iter().map(|c| c.last).max()?;
    let bytes: u64 = conns.iter().map(|c| c.bytes).sum();
    Some(bytes as f64 / (1 << 20) as f64 / end.duration_since(start).as_secs_f64())
}

fn rate(conns: &[Conn], expect: u32) -> Option<f64> {
    if conns.len() != expect as usize || expect < 2 {
        return None;
    }
    let start = conns.iter().map(|c| c.first).min()?;
    let end = conns.iter().map(|c| c.last).max()?;
    Some(expect as f64 / end.duration_since(start).as_secs_f64())
}

/// RSS in KiB of `pid` outside mappings at least as large as guest RAM (the guest's memory).
fn rss_outside_guest(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut size, mut total) = (0u64, 0u64);
    let kib = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    for l in smaps.lines() {
        if l.starts_with("Size:") {
            size = kib(l);
        } else if l.starts_with("Rss:") && size < MEMORY_MIB * 1024 {
            total += kib(l);
        }
    }
    Some(total)
}

fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Runs one VMM process to DONE: idle RSS 1.5 s after READY, peak RSS while the phases run
/// (sampled every 50 ms), the same for `helper`; kills both after.
fn drive(mut vmm: Command, mut helper: Option<Child>, limit: Duration) -> Figures {
    let mut f = Figures::default();
    let mut child = match vmm.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("net bench: could not start {vmm:?}: {e}");
            return f;
        }
    };
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("BENCH-") || line.starts_with("net bench:") || line.starts_with("net-client") {
                let _ = tx.send(line);
            }
        }
    });
    let deadline = Instant::now() + limit;
    let hpid = helper.as_ref().map(Child::id);
    let mut ready = None::<Instant>;
    let (mut peak, mut hpeak) = (0, 0);
    loop {
        let now = Instant::now();
        if now > deadline {
            println!("net bench: no {DONE} within {limit:?}");
            break;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(l) if l == READY => ready = Some(Instant::now()),
            Ok(l) if l == DONE => break,
            Ok(l) if l == PHASE_DONE => {}
            Ok(l) => println!("  {l}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => {
                println!("net bench: the VMM exited before {DONE}");
                break;
            }
        }
        if let Some(r) = ready {
            if f.idle_kib.is_none() && r.elapsed() >= Duration::from_millis(1500) {
                f.idle_kib = rss_outside_guest(pid);
                f.helper_kib = hpid.and_then(rss).map(|h| (h, h));
            } else if f.idle_kib.is_some() {
                peak = peak.max(rss_outside_guest(pid).unwrap_or(0));
                hpeak = hpeak.max(hpid.and_then(rss).unwrap_or(0));
            }
        }
    }
    if peak > 0 {
        f.load_kib = Some(peak);
    }
    if let Some((idle, _)) = f.helper_kib {
        f.helper_kib = Some((idle, hpeak.max(idle)));
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(h) = helper.as_mut() {
        let _ = h.kill();
        let _ = h.wait();
    }
    f
}

/// The initramfs every guest boots: msb's (agentd as /init, busybox) plus this binary and a
/// `/bench-init` script that QEMU's guests run instead of agentd (static addressing as
/// slirp's and passt's defaults expect, then the same phases msb's child runs via exec).
/// Linux unpacks concatenated archives in order.
fn initramfs(dir: &Path, load: Load, host: std::net::Ipv4Addr) -> Result<PathBuf, String> {
    let home = msb_images::msb_home().map_err(|e| e.to_string())?;
    let agentd = msb_images::agentd(&home).map_err(|e| e.to_string())?;
    let busybox = msb_images::busybox(&home).map_err(|e| e.to_string())?;
    let mut bytes = msb_images::initramfs::build(&agentd, &busybox).map_err(|e| e.to_string())?;
    let mut script = String::from(
        "#!/bin/sh\nmount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null\n\
         ip link set lo up; ip link set eth0 up\n\
         ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2\n",
    );
    script += &format!(
        "echo {READY}\nsleep 2\ngrep -q msb.bench.nonet /proc/cmdline && {{ echo {DONE}; exec sleep 100000; }}\n"
    );
    for p in load.phases(host) {
        script += &format!("/bin/msb-bench {CLIENT} {}; echo {PHASE_DONE}\n", p.join(" "));
    }
    script += &format!("echo {DONE}\nexec sleep 100000\n");
    let me = std::fs::read(std::env::current_exe().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let mut c = msb_images::initramfs::Cpio::default();
    c.file("bench-init", 0o755, script.as_bytes());
    c.file("bin/msb-bench", 0o755, &me);
    bytes.extend(c.finish());
    let path = dir.join("bench.cpio");
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

fn qemu_cmd(qemu: &Path, kernel: &Path, initramfs: &Path, netdev: Option<&str>) -> Command {
    let accel = std::env::var("MSB_BENCH_QEMU_ACCEL").unwrap_or_else(|_| "kvm".into());
    let mut q = Command::new(qemu);
    q.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel", &accel, "-smp", "1"])
        .args(if accel == "kvm" { &["-cpu", "host"][..] } else { &[][..] })
        .args(["-m", &MEMORY_MIB.to_string(), "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append");
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet rdinit=/bench-init";
    match netdev {
        Some(n) => q.arg(cmdline).args(["-netdev", n, "-device", "virtio-net-device,netdev=n0"]),
        None => q.arg(format!("{cmdline} msb.bench.nonet")),
    };
    q
}

/// Starts passt on a UNIX socket in `dir` for QEMU to connect to; the guest's addresses as
/// slirp's (10.0.2.15/24 via 10.0.2.2), its traffic leaving through the test's veth.
fn passt(bin: &Path, dir: &Path, link: &str) -> Option<(Child, PathBuf)> {
    // passt binds its socket after switching to `nobody`: a directory that user may write.
    let dir = dir.join("passt");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::os::unix::fs::chown(&dir, Some(65534), Some(65534)))
        .map_err(|e| println!("net bench: passt's directory {}: {e}", dir.display()))
        .ok()?;
    let sock = dir.join("passt.sock");
    let log = dir.join("passt.log");
    let child = Command::new(bin)
        .args(["-f", "-q", "-s"])
        .arg(&sock)
        .args(["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2", "-i", link, "--runas", "65534:65534"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map(Stdio::from).unwrap_or(Stdio::null()))
        .spawn()
        .map_err(|e| println!("net bench: passt did not start: {e}"))
        .ok()?;
    for _ in 0..100 {
        if sock.exists() {
            return Some((child, sock));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    println!("net bench: passt made no socket at {}; it said: {}", sock.display(), said.trim());
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `msb-bench net`: the three variants side by side (see the module docs).
pub fn side_by_side() {
    let load = Load::from_env();
    println!(
        "--- network: TCP guest -> test host ({} MiB one flow, 4 x {} MiB four flows), {} short connections, MTU 1500 ---",
        load.mib,
        load.mib / 4,
        load.conns
    );
    let net = TestNet::new(0);
    let sinks = [
        Sink::start(net.tcp(BULK1_PORT), false),
        Sink::start(net.tcp(BULK4_PORT), false),
        Sink::start(net.tcp(CONNS_PORT), true),
        Sink::start(net.tcp(SYN_PORT), false),
        Sink::start(net.tcp(AFTER_PORT), true),
    ];
    let dir = tempfile::tempdir().expect("a temporary directory");
    let init = match initramfs(dir.path(), load, net.host) {
        Ok(p) => p,
        Err(e) => return println!("network comparison not run: {e}"),
    };
    let kernel = match msb_images::msb_home().and_then(|h| msb_images::kernel(&h)) {
        Ok(k) => k,
        Err(e) => return println!("network comparison not run: {e}"),
    };
    let limit =
        Duration::from_secs(std::env::var("MSB_BENCH_NET_LIMIT").ok().and_then(|v| v.parse().ok()).unwrap_or(600));
    let me = std::env::current_exe().unwrap();
    let collect = |mut f: Figures| {
        let got: Vec<Vec<Conn>> = sinks.iter().map(Sink::take).collect();
        f.bulk1_mibs = throughput(&got[0], 1);
        f.bulk4_mibs = throughput(&got[1], 4);
        f.conns_per_s = rate(&got[2], load.conns);
        if load.synflood > 0 {
            // The SYN sink's connections end when the VMM goes; wait a moment for them.
            std::thread::sleep(Duration::from_millis(500));
            f.flood = Some((got[3].len() + sinks[3].take().len(), got[4].len()));
        }
        f
    };
    // MSB_BENCH_NET_VARIANTS=msb,slirp,passt (the default) picks which networks run.
    let wanted = std::env::var("MSB_BENCH_NET_VARIANTS").unwrap_or_else(|_| "msb,slirp,passt".into());
    let want = |v: &str| wanted.split(',').any(|w| w.trim() == v);
    let mut runs: Vec<(&str, Figures)> = Vec::new();
    let vmm = |args: &[String]| {
        let mut c = Command::new(&me);
        c.arg(VMM_CHILD).arg(&init).args(args);
        c
    };
    if want("msb") {
        let host = net.host.to_string();
        runs.push(("msb, no network", collect(drive(vmm(&["none".into()]), None, limit))));
        runs.push(("msb gateway", collect(drive(vmm(std::slice::from_ref(&host)), None, limit))));
        // The default new-connection rate (64/s, burst 128) bounds short connections by
        // design; the gateway's own rate shows with it raised (--conn-rate 100000).
        let raised = vmm(&[host, "100000".into()]);
        runs.push(("msb, conn-rate 1e5", collect(drive(raised, None, limit))));
    }
    match crate::which("qemu-system-x86_64") {
        None => println!("QEMU not found in PATH: slirp and passt not run"),
        Some(_) if !want("slirp") && !want("passt") => {}
        Some(qemu) => {
            runs.push(("qemu, no network", collect(drive(qemu_cmd(&qemu, &kernel, &init, None), None, limit))));
            if want("slirp") {
                let slirp = qemu_cmd(&qemu, &kernel, &init, Some("user,id=n0"));
                runs.push(("qemu slirp", collect(drive(slirp, None, limit))));
            }
            match crate::which("passt") {
                _ if !want("passt") => {}
                None => println!("passt not found in PATH: passt not run"),
                Some(bin) => {
                    if let Some((p, sock)) = passt(&bin, dir.path(), &net.link) {
                        let spec = format!("stream,id=n0,server=off,addr.type=unix,addr.path={}", sock.display());
                        let q = qemu_cmd(&qemu, &kernel, &init, Some(&spec));
                        let f = collect(drive(q, Some(p), limit));
                        if f.bulk1_mibs.is_none() {
                            let log = std::fs::read_to_string(dir.path().join("passt/passt.log")).unwrap_or_default();
                            println!("net bench: passt carried nothing; its log: {}", log.trim());
                        }
                        runs.push(("qemu passt", f));
                    }
                }
            }
        }
    }
    report(&runs);
    if load.synflood > 0 {
        println!("--- SYN flood: {} raw SYNs from the guest, then {AFTER_CONNS} short connections ---", load.synflood);
        for (name, f) in &runs {
            if let Some((dialed, after)) = f.flood {
                println!("{name:<18} host connections the SYNs opened {dialed:>6}; after the flood {after} of {AFTER_CONNS} connected");
            }
        }
    }
}

fn report(runs: &[(&str, Figures)]) {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1024.0));
    println!(
        "{:<18} {:>11} {:>11} {:>9} {:>10} {:>10} {:>13}",
        "network", "1 flow MiB/s", "4 flows", "conns/s", "idle MiB", "load MiB", "helper MiB"
    );
    for (name, f) in runs {
        println!(
            "{:<18} {:>11} {:>11} {:>9} {:>10} {:>10} {:>13}",
            name,
            opt(f.bulk1_mibs),
            opt(f.bulk4_mibs),
            opt(f.conns_per_s),
            mib(f.idle_kib),
            mib(f.load_kib),
            f.helper_kib.map_or("-".to_string(), |(i, p)| format!("{:.1}/{:.1}", i as f64 / 1024.0, p as f64 / 1024.0))
        );
    }
    let get = |n: &str| runs.iter().find(|(name, _)| *name == n).map(|(_, f)| *f);
    // The network's own memory: RSS over the same VMM without a network (+ passt's process).
    let delta = |with: Option<Figures>, without: Option<Figures>| {
        let (w, wo) = (with?, without?.idle_kib? as i64);
        let h = w.helper_kib.unwrap_or((0, 0));
        Some((w.idle_kib? as i64 - wo + h.0 as i64, w.load_kib? as i64 - wo + h.1 as i64))
    };
    let ours = delta(get("msb gateway"), get("msb, no network"));
    if let Some((i, l)) = ours {
        println!(
            "msb gateway memory over no network: idle {:.1} MiB, under load {:.1} MiB",
            i as f64 / 1024.0,
            l as f64 / 1024.0
        );
    }
    let Some(m) = get("msb gateway") else { return };
    let raised = get("msb, conn-rate 1e5").and_then(|f| f.conns_per_s);
    for peer in ["qemu slirp", "qemu passt"] {
        let Some(p) = get(peer) else { continue };
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let mem = match (ours, delta(Some(p), get("qemu, no network"))) {
            (Some((_, a)), Some((_, b))) if b > 0 => format!("{:.2}", a as f64 / b as f64),
            _ => "-".into(),
        };
        println!(
            "ratio msb/{peer}: 1 flow {}, 4 flows {}, conns/s {} (default rate limit; {} raised), network memory under load {mem}",
            r(m.bulk1_mibs, p.bulk1_mibs),
            r(m.bulk4_mibs, p.bulk4_mibs),
            r(m.conns_per_s, p.conns_per_s),
            r(raised, p.conns_per_s)
        );
    }
}
