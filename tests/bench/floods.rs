//! `msb-bench floods N [MiB]`: the same virtio-console flood through msb and through QEMU
//! `-M microvm`, alternating in one L1 (finding 18 of the December review: is a nested guest
//! that stalls or triple-faults under an agent-channel flood the rig's doing or msb's?).
//!
//! - msb: a sandbox (256 MiB, the default kernel and initramfs) runs `head -c SIZE /dev/zero`
//!   and the host reads its stdout over the agent channel (virtio-console), then asks the
//!   guest for `true`.
//! - QEMU: the same kernel, msb's busybox and a one-line init write SIZE bytes to the first
//!   port of a `virtio-serial-device` (`/dev/hvc0`), whose chardev is a Unix socket this
//!   process reads as fast as it can.
//!
//! Each run ends `ok` (every byte, and for msb the guest answered afterwards), `stalled` (no
//! byte for 60 s), or `died` (the guest or its VMM went away: a triple fault ends QEMU under
//! `-no-reboot`, and msb reports it). Prints the counts side by side; passes or fails nothing.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msb_actors::{ExecEvent, ExecSpec, Sandbox};

const MEMORY_MIB: u64 = 256;
/// No byte for this long is a stall.
const SILENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Stalled,
    Died,
}

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t devtmpfs dev /dev 2>/dev/null
echo FLOOD-START
dd if=/dev/zero of=/dev/hvc0 bs=65536 count=$FLOOD_BLOCKS 2>/dev/null
echo FLOOD-DONE
poweroff -f
"#;

async fn msb_flood(bytes: u64) -> (Outcome, f64) {
    let sb = match Sandbox::builder().memory_mib(MEMORY_MIB).create().await {
        Ok(sb) => sb,
        Err(e) => {
            println!("  msb: boot failed: {e}");
            return (Outcome::Died, 0.0);
        }
    };
    let t = Instant::now();
    let mut got = 0u64;
    let mut outcome = Outcome::Died;
    if let Ok(mut h) = sb.exec_stream(ExecSpec::command(["head", "-c", &bytes.to_string(), "/dev/zero"])).await {
        loop {
            match tokio::time::timeout(SILENCE, h.next()).await {
                Ok(Some(ExecEvent::Stdout(d))) => got += d.len() as u64,
                Ok(Some(ExecEvent::Exited(_))) | Ok(None) => {
                    outcome = if got == bytes { Outcome::Ok } else { Outcome::Died };
                    break;
                }
                Ok(Some(_)) => {}
                Err(_) => {
                    outcome = Outcome::Stalled;
                    break;
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if outcome == Outcome::Ok {
        // The guest still answers after the flood.
        let probe = tokio::time::timeout(Duration::from_secs(30), sb.exec("true", Vec::<String>::new())).await;
        if !matches!(probe, Ok(Ok(_))) {
            outcome = Outcome::Stalled;
        }
    }
    let stopped = tokio::time::timeout(Duration::from_secs(30), sb.stop()).await;
    if outcome != Outcome::Ok {
        // How the sandbox ended says whether the guest triple-faulted, panicked or stalled.
        println!("  msb: {outcome:?} after {got} of {bytes} bytes in {secs:.1} s; the sandbox: {stopped:?}");
    }
    (outcome, got as f64 / (1 << 20) as f64 / secs)
}

fn qemu_flood(qemu: &Path, kernel: &Path, init: &Path, dir: &Path, i: usize, bytes: u64) -> (Outcome, f64) {
    let sock = dir.join(format!("hvc{i}.sock"));
    let listener = match std::os::unix::net::UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            println!("  qemu: socket: {e}");
            return (Outcome::Died, 0.0);
        }
    };
    let blocks = bytes / 65536;
    let child = Command::new(qemu)
        // acpi=off: QEMU names the virtio-mmio devices on the command line (the guest
        // kernel has no ACPI).
        .args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-enable-kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &MEMORY_MIB.to_string(), "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(init)
        .arg("-append")
        .arg(format!("console=ttyS0 reboot=k panic=-1 quiet rdinit=/flood-init FLOOD_BLOCKS={blocks}"))
        .args(["-device", "virtio-serial-device", "-chardev"])
        .arg(format!("socket,id=c,path={}", sock.display()))
        .args(["-device", "virtconsole,chardev=c"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("  qemu: did not start: {e}");
            return (Outcome::Died, 0.0);
        }
    };
    // QEMU connects to the socket as a client.
    let _ = listener.set_nonblocking(false);
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let _ = s.set_read_timeout(Some(SILENCE));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(n as u64).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let out = child.stdout.take().expect("piped");
    std::thread::spawn(move || for _ in std::io::BufReader::new(out).lines().map_while(Result::ok) {});
    let t = Instant::now();
    let mut got = 0u64;
    let outcome = loop {
        if got >= bytes {
            break Outcome::Ok;
        }
        match rx.recv_timeout(SILENCE) {
            Ok(n) => got += n,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break Outcome::Stalled,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Outcome::Died,
        }
    };
    let secs = t.elapsed().as_secs_f64();
    if outcome != Outcome::Ok {
        println!("  qemu: {outcome:?} after {got} of {bytes} bytes in {secs:.1} s");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    (outcome, got as f64 / (1 << 20) as f64 / secs)
}

pub async fn side_by_side(n: usize, mib: u64) {
    let bytes = mib << 20;
    println!("--- virtio-console flood of {mib} MiB, msb vs QEMU -M microvm, alternating, {n} runs each ---");
    let Some(qemu) = crate::which("qemu-system-x86_64") else {
        return println!("QEMU not found in PATH: comparison not run");
    };
    let Ok(home) = msb_images::msb_home() else { return println!("comparison not run: no MSB_HOME") };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (kernel, init) = match (|| {
        let k = msb_images::kernel(&home)?;
        let mut bytes = msb_images::initramfs::build(&msb_images::agentd(&home)?, &msb_images::busybox(&home)?)?;
        let mut c = msb_images::initramfs::Cpio::default();
        c.file("flood-init", 0o755, INIT.as_bytes());
        bytes.extend(c.finish());
        let p = dir.path().join("flood.cpio");
        std::fs::write(&p, bytes).map_err(|source| msb_images::Error::Io {
            what: "writing",
            path: p.clone(),
            source,
        })?;
        msb_images::Result::Ok((k, p))
    })() {
        Ok(v) => v,
        Err(e) => return println!("comparison not run: {e}"),
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Each goes first every other round, so neither always runs in the fresher L1.
        if i % 2 == 0 {
            ours.push(msb_flood(bytes).await);
        }
        let (q, k, d) = (qemu.clone(), kernel.clone(), init.clone());
        let dir = dir.path().to_path_buf();
        let qemu_run = tokio::task::spawn_blocking(move || qemu_flood(&q, &k, &d, &dir, i, bytes));
        theirs.push(qemu_run.await.unwrap_or((Outcome::Died, 0.0)));
        if i % 2 == 1 {
            ours.push(msb_flood(bytes).await);
        }
        println!("  after round {}: msb {:?}, qemu {:?}", i + 1, ours.last().map(|r| r.0), theirs.last().map(|r| r.0));
    }
    for (who, runs) in [("msb", &ours), ("qemu microvm", &theirs)] {
        let count = |o: Outcome| runs.iter().filter(|r| r.0 == o).count();
        let mut rates: Vec<f64> = runs.iter().filter(|r| r.0 == Outcome::Ok).map(|r| r.1).collect();
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p50 = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
        println!(
            "{who:<13} ok {} stalled {} died {} of {n}; p50 {p50:.1} MiB/s",
            count(Outcome::Ok),
            count(Outcome::Stalled),
            count(Outcome::Died)
        );
    }
}
