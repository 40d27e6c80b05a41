//! `msb-bench fs`: the same filesystem workloads, in one run, through
//! - msb's shared directory (virtio-fs served by the FsBroker), in a sandbox of the default
//!   image;
//! - Debian's `virtiofsd` with QEMU `-M microvm` (`vhost-user-fs-device`, its default
//!   `cache=auto`, the same 1 s attribute/entry timeouts as ours) on L1's KVM, booting the same
//!   guest kernel, with the same image's root filesystem (its squashfs as a read-only disk under
//!   a tmpfs overlay) so the workloads run the same dash, coreutils and findutils binaries;
//! - the sandbox's own writable root (overlay on virtio-blk).
//!
//! Workloads (timed inside the guest): 1,000 small-file creates, a 10,000-file tree made, then
//! walked with a `stat` of every entry (caches dropped first), 100 MiB written with fsync and
//! read back (caches dropped), and `rm -rf` of the tree. Prints each figure as the guest
//! reports it, then a table with the ratios.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "msb/debian:12";
const MEMORY_MIB: u64 = 256; // msb run's default, given to QEMU too
const DONE: &str = "BENCH-FS-DONE";

/// The guest's script: `sh -c SCRIPT - WHERE DIR [WHERE DIR…]` prints `WHERE WORKLOAD MS`.
const SCRIPT: &str = r#"
set -e
ms() { date +%s%N | cut -c1-13; }
run() {
  where=$1; d=$2; mkdir -p "$d"
  t=$(ms); i=0; while [ $i -lt 1000 ]; do echo x > "$d/f$i"; i=$((i+1)); done
  echo "$where create-1000 $(( $(ms) - t ))"
  t=$(ms); mkdir "$d/tree"; i=0
  while [ $i -lt 100 ]; do mkdir "$d/tree/$i"; j=0; while [ $j -lt 100 ]; do : > "$d/tree/$i/$j"; j=$((j+1)); done; i=$((i+1)); done
  echo "$where tree-10000 $(( $(ms) - t ))"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t=$(ms); n=$(find "$d/tree" -printf '%s\n' | wc -l)
  echo "$where find-stat-$n $(( $(ms) - t ))"
  t=$(ms); dd if=/dev/zero of="$d/big" bs=1M count=100 conv=fsync 2>/dev/null
  echo "$where write-100MiB $(( $(ms) - t ))"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t=$(ms); dd if="$d/big" of=/dev/null bs=1M 2>/dev/null
  echo "$where read-100MiB $(( $(ms) - t ))"
  t=$(ms); rm -rf "$d/tree"
  echo "$where rm-rf-tree $(( $(ms) - t ))"
  rm -rf "$d"
}
while [ $# -ge 2 ]; do run "$1" "$2"; shift 2; done
"#;

/// QEMU's guest init (busybox, from the initramfs): the image's root filesystem read-only
/// under a tmpfs overlay, the virtio-fs tag at /work inside it, then the script chrooted there.
const QEMU_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
echo "virtiofsd guest up after $(cut -d' ' -f1 /proc/uptime) s"
mkdir -p /lower /upper /r
mount -t squashfs -o ro /dev/vda /lower && mount -t tmpfs -o size=200m up /upper &&
mkdir -p /upper/u /upper/w && mount -t overlay root -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /r &&
mkdir -p /r/work && mount -t virtiofs work /r/work && mount --bind /proc /r/proc && mount --bind /dev /r/dev &&
mount --bind /sys /r/sys && cp /bench-fs.sh /r/bench-fs.sh && chroot /r /bin/sh /bench-fs.sh virtiofsd /work/bench ||
echo "virtiofsd setup or script failed"
echo BENCH-FS-DONE
poweroff -f
"#;

#[derive(Default)]
struct Row {
    msb: Option<f64>,
    virtiofsd: Option<f64>,
    root: Option<f64>,
}

/// Reads `WHERE WORKLOAD MS` lines into `rows` (other lines are ignored).
fn record(rows: &mut BTreeMap<String, Row>, line: &str) {
    let mut w = line.split_whitespace();
    let (Some(where_), Some(what), Some(ms), None) =
        (w.next(), w.next(), w.next().and_then(|m| m.parse::<f64>().ok()), w.next())
    else {
        return;
    };
    let row = rows.entry(what.to_string()).or_default();
    match where_ {
        "virtiofs" => row.msb = Some(ms),
        "virtiofsd" => row.virtiofsd = Some(ms),
        "root" => row.root = Some(ms),
        _ => {}
    }
}

pub fn side_by_side() {
    println!(
        "--- shared directory: msb virtio-fs + FsBroker vs Debian's virtiofsd + QEMU vs the writable root, ms, timed in the guest ---"
    );
    // MSB_BENCH_FS=msb,virtiofsd (the default) picks which shared directories run.
    let wanted = std::env::var("MSB_BENCH_FS").unwrap_or_else(|_| "msb,virtiofsd".into());
    let want = |v: &str| wanted.split(',').any(|w| w.trim() == v);
    let mut rows = BTreeMap::new();
    if want("msb") {
        run_msb(&mut rows);
    }
    if want("virtiofsd") {
        run_virtiofsd(&mut rows);
    }
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>14} {:>10}",
        "workload", "msb", "virtiofsd", "root", "msb/virtiofsd", "msb/root"
    );
    for (what, r) in rows {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "{what:<22} {:>10} {:>10} {:>10} {:>14} {:>10}",
            show(r.msb),
            show(r.virtiofsd),
            show(r.root),
            ratio(r.msb, r.virtiofsd),
            ratio(r.msb, r.root)
        );
    }
}

/// msb: one sandbox of the default image, a temporary directory mounted at /work.
fn run_msb(rows: &mut BTreeMap<String, Row>) {
    let Some(bin) = std::env::current_exe().ok().map(|p| p.with_file_name("msb")).filter(|p| p.is_file()) else {
        return println!("msb not run: no msb binary beside this one");
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mount = format!("{}:/work", dir.path().display());
    let child = Command::new(&bin)
        .args(["run", IMAGE, "--net", "none", "--boot-timeout", "120", "-v", &mount, "--", "sh", "-c", SCRIPT])
        .args(["-", "virtiofs", "/work/bench", "root", "/bench"])
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return println!("msb not run: {e}"),
    };
    // Each figure is printed as the guest reports it, so a slow run still shows what it did.
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("  {line}");
            record(rows, &line);
        }
    }
    if !child.wait().is_ok_and(|st| st.success()) {
        println!("msb: the guest script failed (figures above are what it reported)");
    }
}

fn find_virtiofsd() -> Option<PathBuf> {
    crate::which("virtiofsd").or_else(|| {
        ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"].into_iter().map(PathBuf::from).find(|p| p.is_file())
    })
}

/// Debian's virtiofsd serving a fresh temporary directory to QEMU `-M microvm` on KVM.
fn run_virtiofsd(rows: &mut BTreeMap<String, Row>) {
    let (Some(qemu), Some(vfsd)) = (crate::which("qemu-system-x86_64"), find_virtiofsd()) else {
        return println!(
            "virtiofsd not run: needs qemu-system-x86_64 in PATH and Debian's virtiofsd (qemu-system-common)"
        );
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (kernel, init, rootfs) = match guest(dir.path()) {
        Ok(g) => g,
        Err(e) => return println!("virtiofsd not run: {e}"),
    };
    let shared = dir.path().join("shared");
    let sock = dir.path().join("vfsd.sock");
    if let Err(e) = std::fs::create_dir(&shared) {
        return println!("virtiofsd not run: {}: {e}", shared.display());
    }
    let log = dir.path().join("virtiofsd.log");
    let daemon = Command::new(&vfsd)
        .arg(format!("--socket-path={}", sock.display()))
        .args(["-o", &format!("source={}", shared.display()), "-o", "cache=auto"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map(Stdio::from).unwrap_or(Stdio::null()))
        .spawn();
    let mut daemon = match daemon {
        Ok(d) => Reaped(d),
        Err(e) => return println!("virtiofsd not run: {}: {e}", vfsd.display()),
    };
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !sock.exists() {
        let _ = daemon.0.kill();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        return println!("virtiofsd not run: it made no socket; it said: {}", said.trim());
    }
    let mem = format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on");
    let mut q = Command::new(&qemu);
    q.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem", "-accel", "kvm", "-cpu", "host"])
        .args(["-smp", "1", "-m", &format!("{MEMORY_MIB}M"), "-object", &mem])
        // virtio 1.0 over MMIO (QEMU's default is legacy, which vhost-user-fs refuses).
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&init)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 loglevel=4 rdinit=/fs-init {}",
            std::env::var("MSB_BENCH_FS_KARGS").unwrap_or_default()
        ))
        .arg("-drive")
        .arg(format!("file={},if=none,id=root,format=raw,readonly=on", rootfs.display()))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", sock.display()))
        .args(["-device", "vhost-user-fs-device,chardev=vfs,tag=work"]);
    let qemu_child = q.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut qemu_child = match qemu_child {
        Ok(c) => Reaped(c),
        Err(e) => return println!("virtiofsd not run: QEMU did not start: {e}"),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let out = qemu_child.0.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let limit =
        Duration::from_secs(std::env::var("MSB_BENCH_FS_LIMIT").ok().and_then(|v| v.parse().ok()).unwrap_or(1800));
    loop {
        match rx.recv_timeout(limit.saturating_sub(start.elapsed())) {
            Ok(line) if line.trim() == DONE => break,
            Ok(line) => {
                // Everything the guest says (its figures, or why it failed).
                let line = line.trim().to_string();
                if !line.is_empty() {
                    println!("  {line}");
                    record(rows, &line);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                println!("virtiofsd: no {DONE} within {limit:?}; virtiofsd said: {}", said.trim());
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let mut err = String::new();
                if let Some(mut e) = qemu_child.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                println!("virtiofsd: QEMU exited before {DONE}: {}", err.trim());
                break;
            }
        }
    }
}

/// A child killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest kernel, an initramfs (msb's busybox, `/fs-init`, the script) and the default
/// image's root filesystem.
fn guest(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let home = msb_images::msb_home().map_err(|e| e.to_string())?;
    let kernel = msb_images::kernel(&home).map_err(|e| e.to_string())?;
    let store = msb_images::store::Store::open(&home).map_err(|e| e.to_string())?;
    let rec = store.get(IMAGE).map_err(|e| e.to_string())?;
    let rootfs = store.rootfs_path(&rec);
    if !rootfs.is_file() {
        return Err(format!(
            "{IMAGE} has no root filesystem at {} (run `msb run {IMAGE} -- true` once)",
            rootfs.display()
        ));
    }
    let agentd = msb_images::agentd(&home).map_err(|e| e.to_string())?;
    let busybox = msb_images::busybox(&home).map_err(|e| e.to_string())?;
    let mut bytes = msb_images::initramfs::build(&agentd, &busybox).map_err(|e| e.to_string())?;
    let mut c = msb_images::initramfs::Cpio::default();
    c.file("fs-init", 0o755, QEMU_INIT.as_bytes());
    c.file("bench-fs.sh", 0o644, SCRIPT.as_bytes());
    bytes.extend(c.finish());
    let init = dir.join("fs.cpio");
    std::fs::write(&init, bytes).map_err(|e| e.to_string())?;
    Ok((kernel, init, rootfs))
}
