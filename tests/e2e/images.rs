//! Images against real guests, through the `msb` command line: the default image runs
//! Python; an image's ENTRYPOINT, CMD, ENV, WORKDIR and USER are honoured; sandboxes of one
//! image write privately and the shared root filesystem never changes; a named sandbox keeps
//! its writes across a restart and `msb rm` deletes them; a full root disk is ENOSPC in the
//! guest and the sandbox stays healthy.
//!
//! The default image must be in the store (`scripts/setup.sh` builds and loads it; the rig
//! copies the store into L1): its absence fails the test, it never skips it.

use std::path::{Path, PathBuf};

use msb_images::oci::Digest;
use msb_images::store::Store;

use crate::cli::{code, msb, ok, start};

const DEFAULT: &str = "msb/debian:12";
const TINY: &str = "e2e/tiny:1";

fn home() -> PathBuf {
    msb_images::msb_home().unwrap()
}

fn require_default_image() {
    let images = ok(&["images", "--format", "json"]);
    assert!(
        images.contains(&format!("\"{DEFAULT}\"")),
        "the default image {DEFAULT} is not in the store ({images}); scripts/setup.sh builds and loads it"
    );
}

/// A one-layer image made of the static busybox: ENTRYPOINT `sh -c`, a CMD that reports
/// its environment, ENV, WORKDIR /work (owned by 1000) and USER 1000. Loaded once.
fn tiny_image() {
    let store = Store::open(&home()).unwrap();
    if store.get(TINY).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let busybox = std::fs::read(msb_images::busybox(&home()).unwrap()).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, uid: u64, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(data.len() as u64);
        match link {
            Some(l) => layer.append_link(&mut h, path, l).unwrap(),
            None => layer.append_data(&mut h, path, data).unwrap(),
        }
    };
    for d in ["bin", "etc", "tmp"] {
        add(d, tar::EntryType::Directory, 0o755, 0, b"", None);
    }
    add("work", tar::EntryType::Directory, 0o755, 1000, b"", None);
    add("bin/busybox", tar::EntryType::Regular, 0o755, 0, &busybox, None);
    for applet in ["sh", "cat", "echo", "id", "pwd", "dd", "sync", "ls", "sha256sum", "rm", "df"] {
        add(&format!("bin/{applet}"), tar::EntryType::Symlink, 0o777, 0, b"", Some("busybox"));
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        0,
        b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/work:/bin/sh\n",
        None,
    );
    add("etc/group", tar::EntryType::Regular, 0o644, 0, b"root:x:0:\napp:x:1000:\n", None);
    let tar = layer.into_inner().unwrap();
    let blobs = dir.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (Digest, usize) {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d, bytes.len())
    };
    let (layer_digest, layer_size) = put(&tar);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin","GREETING=hello"],"Entrypoint":["/bin/sh","-c"],"Cmd":["echo \"$GREETING from $(pwd) as $(id -u)\""],"WorkingDir":"/work","User":"1000"}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    );
    let (config_digest, config_size) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = put(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size}}}]}}"#
    );
    std::fs::write(dir.path().join("index.json"), index).unwrap();
    let loaded = ok(&["load", "-i", dir.path().to_str().unwrap(), "--tag", TINY]);
    assert!(loaded.contains(TINY), "{loaded}");
}

fn rootfs_of(reference: &str) -> PathBuf {
    let store = Store::open(&home()).unwrap();
    store.rootfs_path(&store.get(reference).unwrap())
}

fn digest_of(path: &Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

fn stdout_of(args: &[&str]) -> String {
    let out = msb(args);
    assert!(out.status.success(), "msb {args:?}: {} {}", code(&out), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn images_the_default_image_runs_python() {
    require_default_image();
    let out = stdout_of(&["run", DEFAULT, "--boot-timeout", "60", "--", "python3", "-c", "print(6*7)"]);
    assert_eq!(out, "42\n");
    // Its own userland, not the initramfs: Debian's os-release and a CA bundle for curl.
    let out = stdout_of(&[
        "run",
        DEFAULT,
        "--boot-timeout",
        "60",
        "--",
        "sh",
        "-c",
        ". /etc/os-release; echo $ID $VERSION_ID; test -s /etc/ssl/certs/ca-certificates.crt && echo certs",
    ]);
    assert_eq!(out, "debian 12\ncerts\n");
}

#[test]
fn images_entrypoint_cmd_env_workdir_and_user_are_honoured() {
    tiny_image();
    assert_eq!(stdout_of(&["run", TINY, "--boot-timeout", "60"]), "hello from /work as 1000\n");
    // A command replaces CMD (ENTRYPOINT stays); -e, -w and -u override the image's.
    let out = stdout_of(&[
        "run",
        TINY,
        "--boot-timeout",
        "60",
        "-e",
        "GREETING=bye",
        "-w",
        "/",
        "-u",
        "0",
        "--",
        "echo $GREETING $(pwd) $(id -u)",
    ]);
    assert_eq!(out, "bye / 0\n");
    let out = stdout_of(&["run", TINY, "--boot-timeout", "60", "--entrypoint", "/bin/echo", "--", "plain"]);
    assert_eq!(out, "plain\n");
}

#[test]
fn images_sandboxes_of_one_image_diverge_privately_and_keep_writes_until_rm() {
    tiny_image();
    let base = rootfs_of(TINY);
    let before = digest_of(&base);
    for n in ["e2e-img-a", "e2e-img-b"] {
        let _ = msb(&["rm", "--force", n]);
        ok(&["create", TINY, "--name", n, "--boot-timeout", "60"]);
        start(n);
    }
    // `msb exec` runs its command as given (no ENTRYPOINT), as the image's USER unless -u.
    ok(&[
        "exec",
        "-u",
        "0",
        "e2e-img-a",
        "--",
        "sh",
        "-c",
        "echo a-was-here > /work/mine; echo changed > /etc/motd; sync",
    ]);
    assert_eq!(stdout_of(&["exec", "e2e-img-a", "--", "id", "-u"]), "1000\n");
    let b = msb(&["exec", "e2e-img-b", "--", "cat", "/work/mine"]);
    assert_ne!(code(&b), 0, "b sees a's file: {}", String::from_utf8_lossy(&b.stdout));
    assert_eq!(
        stdout_of(&["exec", "e2e-img-b", "--", "sh", "-c", "cat /etc/motd 2>&1 || echo none"]),
        "cat: can't open '/etc/motd': No such file or directory\nnone\n"
    );
    assert_eq!(digest_of(&base), before, "the shared root filesystem changed");
    // A restart keeps a's writes; rm deletes its disk.
    ok(&["stop", "e2e-img-a"]);
    start("e2e-img-a");
    assert_eq!(stdout_of(&["exec", "e2e-img-a", "--", "cat", "/work/mine", "/etc/motd"]), "a-was-here\nchanged\n");
    let dir = msb_control_plane::wire::paths::sandbox_dir(
        &home(),
        &msb_control_plane::SandboxName::new("e2e-img-a").unwrap(),
    );
    assert!(dir.join("root.img").is_file());
    for n in ["e2e-img-a", "e2e-img-b"] {
        ok(&["rm", "--force", n]);
    }
    assert!(!dir.join("root.img").exists(), "rm left the root disk behind");
    assert_eq!(digest_of(&base), before);
}

#[test]
fn images_a_full_root_disk_is_enospc_and_the_sandbox_stays_healthy() {
    tiny_image();
    let out = msb(&[
        "run", TINY, "--boot-timeout", "60", "--root-disk", "64M", "-u", "0", "--",
        "dd if=/dev/zero of=/work/fill bs=1M count=200 2>&1; echo rc=$?; rm /work/fill; echo ok > /work/after && cat /work/after",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("No space left on device"), "{text}");
    assert!(text.contains("rc=1") && text.ends_with("ok\n"), "{text}");
}

/// Runs `msb ARGS` (the child) until it exits or `secs` pass; returns its status and stderr,
/// or `None` (after killing it) when it ran out of time.
fn run_within(args: &[&str], secs: u64) -> Option<(std::process::ExitStatus, String)> {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap().with_file_name("msb"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let out = c.wait_with_output().unwrap();
            return Some((st, String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        if std::time::Instant::now() > end {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The last `n` lines of a sandbox's file `name` (its vmm.log or console.log), for a report.
fn tail_of(sandbox: &str, name: &str, n: usize) -> String {
    let dir =
        msb_control_plane::wire::paths::sandbox_dir(&home(), &msb_control_plane::SandboxName::new(sandbox).unwrap());
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| format!("({name}: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `msb ARGS`, which works on `sandbox`, must succeed within `secs`. A hang fails the test,
/// saying which command and whether the guest still answers an exec: a guest that answers
/// means the command itself stalled (a bug, never rerun); one that does not is reported as
/// the sandbox having stopped answering, with its VMM log and console tail.
fn ok_within(sandbox: &str, args: &[&str], secs: u64) {
    match run_within(args, secs) {
        Some((st, stderr)) => assert!(st.success(), "msb {args:?} failed: {stderr}"),
        None => {
            let probe = run_within(&["exec", sandbox, "--", "true"], 30);
            let vmm = tail_of(sandbox, "vmm.log", 20);
            let console = tail_of(sandbox, "console.log", 10);
            match probe {
                Some((st, _)) if st.success() => panic!(
                    "msb {args:?} did not finish within {secs} s while the guest still answers an exec: \
                     the command stalled\nvmm.log:\n{vmm}\nconsole.log:\n{console}"
                ),
                _ => panic!(
                    "msb {args:?} did not finish within {secs} s and the guest no longer answers an exec \
                     (sandbox stalled)\nvmm.log:\n{vmm}\nconsole.log:\n{console}"
                ),
            }
        }
    }
}

/// 8 MiB with directories and links both ways.
#[test]
fn images_msb_cp_round_trips_a_file_and_a_directory_both_ways() {
    msb_tests::rig_flood_blocking("msb cp 8 MiB", || cp_round_trip("e2e-cp", 8));
}

/// The issue's 100 MiB round trip. In the rig a long host-to-guest flood triple-faults or
/// stalls the nested guest in most runs (README, known rig limit), so `run-rig.sh` leaves it
/// out and says so; it runs where `/dev/kvm` is hardware (`RIG_ALL=1` runs it in the rig).
#[test]
fn images_msb_cp_round_trips_100_mib() {
    msb_tests::rig_flood_blocking("msb cp 100 MiB", || cp_round_trip("e2e-cp-big", 100));
}

fn cp_round_trip(n: &str, mib: u32) {
    tiny_image();
    let _ = msb(&["rm", "--force", n]);
    // No network device: copying is the agent channel's work (the network has its own tests;
    // the rig triple-faulted the 100 MiB copy three times in one run once every sandbox had one).
    ok(&["create", TINY, "--name", n, "--boot-timeout", "60", "--net", "none"]);
    start(n);
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..mib << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let src = dir.path().join("big");
    std::fs::write(&src, &big).unwrap();
    let t = std::time::Instant::now();
    ok_within(n, &["cp", src.to_str().unwrap(), &format!("{n}:/work/big")], 180);
    let into = t.elapsed();
    let want = Digest::of(&big);
    let guest_sum = stdout_of(&["exec", n, "--", "sha256sum", "/work/big"]);
    assert!(guest_sum.starts_with(want.hex()), "{guest_sum} vs {want}");
    let back = dir.path().join("back");
    let t = std::time::Instant::now();
    ok_within(n, &["cp", &format!("{n}:/work/big"), back.to_str().unwrap()], 180);
    let out = t.elapsed();
    assert_eq!(digest_of(&back), want, "the round trip changed the bytes");
    println!(
        "msb cp {mib} MiB: into the guest {:.1} MiB/s, out {:.1} MiB/s",
        f64::from(mib) / into.as_secs_f64(),
        f64::from(mib) / out.as_secs_f64()
    );
    // A directory, with a symlink, both ways (docker cp's rules for existing directories).
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), b"in a tree\n").unwrap();
    std::os::unix::fs::symlink("sub/file", tree.join("link")).unwrap();
    ok(&["cp", tree.to_str().unwrap(), &format!("{n}:/work/")]);
    assert_eq!(stdout_of(&["exec", n, "--", "cat", "/work/tree/link"]), "in a tree\n");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    ok(&["cp", &format!("{n}:/work/tree"), out_dir.to_str().unwrap()]);
    assert_eq!(std::fs::read(out_dir.join("tree/sub/file")).unwrap(), b"in a tree\n");
    assert_eq!(std::fs::read_link(out_dir.join("tree/link")).unwrap(), Path::new("sub/file"));
    // A missing guest path is a clear error.
    let o = msb(&["cp", &format!("{n}:/no/such"), out_dir.to_str().unwrap()]);
    assert_ne!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such"), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&["rm", "--force", n]);
}

/// The SDK's file API on a running named sandbox: streamed write and read, stat, list,
/// mkdir, rename, remove, and each failure with its kind; an abandoned write leaves the old
/// file.
#[test]
fn images_the_sdk_file_api_reads_writes_lists_and_names_failures() {
    use msb_control_plane::{Error, FileErrorKind, FileKind, Msb};
    tiny_image();
    let n = "e2e-files";
    let _ = msb(&["rm", "--force", n]);
    ok(&["create", TINY, "--name", n, "--boot-timeout", "60"]);
    start(n);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kind = |r: msb_control_plane::Result<()>| match r {
        Err(Error::File(f)) => f.kind,
        other => panic!("expected a file error, got {other:?}"),
    };
    rt.block_on(async {
        let sb = Msb::from_env().unwrap().get(n).unwrap();
        let fs = sb.files();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        let mut w = fs.write_file("/work/a.bin", 0o640).await.unwrap();
        for c in data.chunks(100_000) {
            w.write(c).await.unwrap();
        }
        w.finish().await.unwrap();
        assert_eq!(fs.read("/work/a.bin", 4 << 20).await.unwrap(), data, "the bytes came back changed");
        assert!(matches!(fs.read("/work/a.bin", 1 << 20).await, Err(Error::Config(_))), "the read limit holds");
        let st = fs.stat("/work/a.bin").await.unwrap();
        assert_eq!((st.name.as_str(), st.kind, st.size, st.mode), ("a.bin", FileKind::File, data.len() as u64, 0o640));
        // An abandoned write leaves the old file whole.
        let mut w = fs.write_file("/work/a.bin", 0o644).await.unwrap();
        w.write(b"partial").await.unwrap();
        drop(w);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(fs.stat("/work/a.bin").await.unwrap().size, data.len() as u64);
        fs.mkdir("/work/d/e", true).await.unwrap();
        assert_eq!(kind(fs.mkdir("/work/d/e", false).await), FileErrorKind::AlreadyExists);
        fs.write("/work/d/e/small", b"hi\n", 0o600).await.unwrap();
        let mut names: Vec<(String, FileKind)> =
            fs.list("/work").await.unwrap().into_iter().map(|e| (e.name, e.kind)).collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(names, [("a.bin".to_string(), FileKind::File), ("d".to_string(), FileKind::Dir)]);
        fs.rename("/work/a.bin", "/work/d/b.bin").await.unwrap();
        assert!(matches!(fs.stat("/work/a.bin").await, Err(Error::File(f)) if f.kind == FileErrorKind::NotFound));
        assert_eq!(kind(fs.read("/work/d", 10).await.map(|_| ())), FileErrorKind::IsADirectory);
        assert_eq!(kind(fs.write("/work/no/such", b"x", 0o644).await), FileErrorKind::NotFound);
        assert_eq!(kind(fs.remove("/work/d", false).await), FileErrorKind::DirectoryNotEmpty);
        let out = sb.exec(msb_control_plane::ExecSpec::command(["busybox", "ln", "-s", "/etc/passwd", "/work/l"]));
        assert_eq!(out.await.unwrap().status, msb_protocol::ExitStatus::Code(0));
        let l = fs.stat("/work/l").await.unwrap();
        assert_eq!((l.kind, l.link_target.as_deref()), (FileKind::Symlink, Some("/etc/passwd")));
        fs.remove("/work/d", true).await.unwrap();
        fs.remove("/work/l", false).await.unwrap();
        assert!(fs.list("/work").await.unwrap().is_empty());
        assert!(matches!(fs.stat("work").await, Err(Error::Config(_))), "a relative path is refused on the host");
    });
    ok(&["rm", "--force", n]);
}
