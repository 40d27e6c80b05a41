//! Shared host directories (`-v`), from inside a real guest as root: every escape a hostile
//! workload can try fails, read-only holds on the host, and the host tree outside the mount
//! is unchanged (hashed before and after).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::cli::{code, msb};

/// Every entry below `dir`: path → (kind, mode, bytes or link target).
fn tree(dir: &Path) -> BTreeMap<String, (String, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let (kind, data) = if m.file_type().is_symlink() {
                ("link", std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes())
            } else if m.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&p).unwrap())
            };
            out.insert(p.display().to_string(), (kind.to_string(), m.mode(), data));
        }
    }
    out
}

/// The layout: `base/outside/secret` (never reachable), `base/mnt` (shared read-write at
/// /work, with links pointing out), `base/ro` (shared read-only at /ro).
fn layout() -> tempfile::TempDir {
    let base = tempfile::tempdir().unwrap();
    let b = base.path();
    for d in ["outside", "mnt/d", "ro"] {
        std::fs::create_dir_all(b.join(d)).unwrap();
    }
    std::fs::write(b.join("outside/secret"), "HOST-SECRET\n").unwrap();
    std::fs::write(b.join("outside/f"), "HOST-SECRET\n").unwrap();
    std::fs::write(b.join("mnt/file"), "shared\n").unwrap();
    std::fs::write(b.join("mnt/d/f"), "inside\n").unwrap();
    std::fs::write(b.join("ro/file"), "read-only\n").unwrap();
    std::os::unix::fs::symlink(b.join("outside/secret"), b.join("mnt/abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", b.join("mnt/rel")).unwrap();
    std::os::unix::fs::symlink("/", b.join("mnt/root")).unwrap();
    base
}

/// The escapes, as one guest script: each line prints what it got, so the test can check
/// that no host secret ever appeared and that each refusal happened.
const ESCAPES: &str = r#"
cat /work/file
cat /work/../outside/secret 2>&1 | head -c 200; echo "dotdot=$?"
cat /work/abs 2>&1 | head -c 200; echo
cat /work/rel 2>&1 | head -c 200; echo
readlink /work/abs; readlink /work/rel; readlink /work/root
ls /work/root/ | head -c 400; echo
cat /work/root/outside/secret 2>&1 | head -c 200; echo
mknod /work/null c 1 3 && echo mknod=made || echo mknod=refused
mknod /work/fifo p && echo fifo=made || echo fifo=refused
cp /bin/busybox /work/tool && chmod 4755 /work/tool && echo suid=made || echo suid=refused
ln /etc/passwd /work/hard 2>/dev/null && echo hardlink-in=made || echo hardlink-in=refused
ln /work/file /work/file2 && echo hardlink-within=made
echo new > /work/new && echo write=ok
echo x > /ro/file 2>/dev/null && echo ro-write=made || echo ro-write=refused
mount -o remount,rw /ro 2>/dev/null; echo remount=$?
echo x > /ro/file 2>/dev/null && echo ro-write-after-remount=made || echo ro-write-after-remount=refused
echo x > /ro/new 2>/dev/null && echo ro-create=made || echo ro-create=refused
rm -f /ro/file 2>/dev/null; cat /ro/file
stat -c owner=%u:%g /work/file
: > /work/walking
end=$(( $(date +%s) + 6 ))
while [ $(date +%s) -lt $end ]; do cat /work/d/f 2>/dev/null; done | sort | uniq -c | sed 's/^ */walk /'
echo done
"#;

#[test]
fn mounts_no_escape_from_a_shared_directory_and_read_only_holds_on_the_host() {
    let base = layout();
    let b = base.path().to_path_buf();
    let before_outside = tree(&b.join("outside"));
    let before_ro = tree(&b.join("ro"));
    // Once the guest walks /work/d (it says so with /work/walking), the host swaps it for a
    // symlink out and back for 1.5 s, then leaves the directory; the guest walks for 6 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, mnt) = (stop.clone(), b.join("mnt"));
        std::thread::spawn(move || {
            let mut flips = 0u32;
            while !mnt.join("walking").exists() && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until {
                let _ = std::fs::rename(mnt.join("d"), mnt.join("d.real"));
                let _ = std::os::unix::fs::symlink("../outside", mnt.join("d"));
                std::thread::sleep(std::time::Duration::from_millis(2));
                let _ = std::fs::remove_file(mnt.join("d"));
                let _ = std::fs::rename(mnt.join("d.real"), mnt.join("d"));
                std::thread::sleep(std::time::Duration::from_millis(2));
                flips += 1;
            }
            flips
        })
    };
    let out = msb(&[
        "run",
        "--boot-timeout",
        "60",
        "--net",
        "none",
        "-v",
        &format!("{}:/work", b.join("mnt").display()),
        "-v",
        &format!("{}:/ro:ro", b.join("ro").display()),
        "--",
        "sh",
        "-c",
        ESCAPES,
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && text.contains("done"), "{text}\n{err}");
    assert!(!text.contains("HOST-SECRET"), "a host secret reached the guest:\n{text}");
    assert!(text.starts_with("shared\n"), "{text}");
    for want in [
        "mknod=refused",
        "fifo=refused",
        "suid=refused",
        "hardlink-in=refused",
        "hardlink-within=made",
        "write=ok",
        "ro-write=refused",
        "ro-write-after-remount=refused",
        "ro-create=refused",
        "owner=0:0",
    ] {
        assert!(text.lines().any(|l| l == want), "missing {want:?}:\n{text}");
    }
    // Symlinks are the guest's data: readlink shows the host's targets as text.
    let abs_target = b.join("outside/secret").display().to_string();
    assert!(text.lines().any(|l| l == abs_target) && text.lines().any(|l| l == "../outside/secret"), "{text}");
    assert!(text.contains("read-only\n"), "the read-only file survived rm: {text}");
    // The walk saw only the directory's own file (or nothing mid-swap), never the outside,
    // and the directory again once the swapping stopped.
    assert!(text.lines().any(|l| l.starts_with("walk ") && l.ends_with(" inside")), "{text}");
    assert!(flips > 0, "the host never swapped the directory while the guest walked it");
    // The host: nothing outside changed, the read-only tree is as it was, the writes landed
    // where they were meant to, and no special or setuid file appeared.
    assert_eq!(tree(&b.join("outside")), before_outside, "the host tree outside the mount changed");
    assert_eq!(tree(&b.join("ro")), before_ro, "the read-only mount changed on the host");
    assert_eq!(std::fs::read(b.join("mnt/new")).unwrap(), b"new\n");
    assert!(!b.join("mnt/null").exists() && !b.join("mnt/fifo").exists() && !b.join("mnt/hard").exists());
    if let Ok(m) = std::fs::metadata(b.join("mnt/tool")) {
        assert_eq!(m.permissions().mode() & 0o7000, 0, "a setuid bit reached the host");
    }
    assert_eq!(
        std::fs::metadata(b.join("mnt/file2")).unwrap().ino(),
        std::fs::metadata(b.join("mnt/file")).unwrap().ino()
    );
}

#[test]
fn mounts_a_missing_file_or_home_path_is_refused_with_a_clear_message() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("file"), b"").unwrap();
    let home = msb_images::msb_home().unwrap();
    for (spec, why) in [
        (format!("{}/missing:/work", t.path().display()), "No such file"),
        (format!("{}/file:/work", t.path().display()), "not a directory"),
        (format!("{}:/work", home.display()), "msb home"),
        (format!("{}:work", t.path().display()), "guest path"),
    ] {
        let o = msb(&["run", "--net", "none", "-v", &spec, "--", "true"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(code(&o), 0, "{spec}");
        assert!(err.contains(why), "{spec}: {err}");
    }
}

#[test]
fn mounts_a_named_volume_outlives_its_sandbox_is_shared_by_the_next_and_rm_waits_for_its_users() {
    let (vol, user) = ("e2e-vol", "e2e-vol-user");
    let _ = msb(&["rm", "--force", user]);
    let _ = msb(&["volume", "rm", vol]);
    let created = msb(&["volume", "create", vol]);
    assert_eq!(code(&created), 0, "{}", String::from_utf8_lossy(&created.stderr));
    let spec = format!("{vol}:/data");
    let w = msb(&["run", "--net", "none", "-v", &spec, "--", "sh", "-c", "echo kept > /data/f"]);
    assert_eq!(code(&w), 0, "{}", String::from_utf8_lossy(&w.stderr));
    let r = msb(&["run", "--net", "none", "-v", &format!("{spec}:ro"), "--", "cat", "/data/f"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "kept\n", "{}", String::from_utf8_lossy(&r.stderr));
    // A recorded sandbox that mounts it keeps it; its removal frees it.
    let c = msb(&["create", "--name", user, "--net", "none", "-v", &spec]);
    assert_eq!(code(&c), 0, "{}", String::from_utf8_lossy(&c.stderr));
    let inspect = String::from_utf8_lossy(&msb(&["volume", "inspect", vol]).stdout).into_owned();
    assert!(inspect.contains(user), "{inspect}");
    let refused = msb(&["volume", "rm", vol]);
    assert_ne!(code(&refused), 0);
    assert!(String::from_utf8_lossy(&refused.stderr).contains(user), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(code(&msb(&["rm", user])), 0);
    assert_eq!(code(&msb(&["volume", "rm", vol])), 0);
    assert!(!msb_images::msb_home().unwrap().join("volumes").join(vol).exists());
    let gone = msb(&["run", "--net", "none", "-v", &spec, "--", "true"]);
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("msb volume create"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

#[test]
fn mounts_files_appear_with_the_configured_owner_and_a_dropped_user_works_in_its_own() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(dir.join("f"), b"host\n").unwrap();
    let host_uid = std::fs::metadata(dir.join("f")).unwrap().uid();
    let out = |args: &[&str]| {
        let o = msb(args);
        (code(&o), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // uid=/gid= set the owner root sees; a chown to it passes, to anyone else is refused.
    let owned = format!("{}:/work:uid=1000,gid=1001", dir.display());
    let script = "stat -c owner=%u:%g /work/f /work; chown 1000:1001 /work/f && echo chown-owner=ok; \
                  chown 0:0 /work/f 2>/dev/null || echo chown-root=refused";
    let (c, so, se) = out(&["run", "--net", "none", "-v", &owned, "--", "sh", "-c", script]);
    assert_eq!(c, 0, "{se}");
    assert_eq!(so, "owner=1000:1001\nowner=1000:1001\nchown-owner=ok\nchown-root=refused\n", "{se}");
    // `run -u UID` makes the mount that user's: it reads and writes in a 0700 directory.
    let plain = format!("{}:/work", dir.display());
    let script = "id -u; stat -c owner=%u /work/f; cat /work/f; echo guest > /work/new && echo wrote";
    let (c, so, se) = out(&["run", "--net", "none", "-u", "1000", "-v", &plain, "--", "sh", "-c", script]);
    assert_eq!(c, 0, "{se}");
    assert_eq!(so, "1000\nowner=1000\nhost\nwrote\n", "{se}");
    // An explicit owner wins over -u: root's 0700 directory is closed to user 1000.
    let rooted = format!("{}:/work:uid=0", dir.display());
    let (c, so, _) =
        out(&["run", "--net", "none", "-u", "1000", "-v", &rooted, "--", "sh", "-c", "cat /work/f || echo denied"]);
    assert_eq!((c, so.as_str()), (0, "denied\n"));
    // On the host nothing changed owner: the new file is the broker's, like every other.
    assert_eq!(std::fs::read(dir.join("new")).unwrap(), b"guest\n");
    for f in ["f", "new"] {
        assert_eq!(std::fs::metadata(dir.join(f)).unwrap().uid(), host_uid, "{f}");
    }
}

/// FS2 (review): a guest with a read-write mount of a directory holding another mount's host
/// path cannot swap that path while it runs (the sandbox process's jail has it mounted: EBUSY);
/// swapped for a symlink out while it is stopped, the next start refuses, naming the path,
/// instead of sharing what the link points at.
#[test]
fn mounts_a_host_path_swapped_for_a_symlink_is_refused_at_the_next_start() {
    let name = "e2e-mount-swap";
    let _ = msb(&["rm", "--force", name]);
    let t = tempfile::tempdir().unwrap();
    let b = std::fs::canonicalize(t.path()).unwrap();
    std::fs::create_dir_all(b.join("proj/sub")).unwrap();
    std::fs::create_dir(b.join("outside")).unwrap();
    std::fs::write(b.join("outside/secret"), "HOST-SECRET\n").unwrap();
    std::fs::write(b.join("proj/sub/f"), "sub\n").unwrap();
    let proj = format!("{}:/src", b.join("proj").display());
    let sub = format!("{}:/data:ro", b.join("proj/sub").display());
    let c = msb(&["create", "--name", name, "--net", "none", "--boot-timeout", "45", "-v", &proj, "-v", &sub]);
    assert_eq!(code(&c), 0, "{}", String::from_utf8_lossy(&c.stderr));
    crate::cli::start(name);
    // The guest cannot move the other share's host directory away while the sandbox runs:
    // the locked-down sandbox process has it mounted (its jail), so the rename is EBUSY.
    let script = format!(
        "cat /data/f; mv /src/sub /src/sub.old && ln -s {} /src/sub && echo swapped",
        b.join("outside").display()
    );
    let o = msb(&["exec", name, "--", "sh", "-c", &script]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "sub\n", "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("busy"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(b.join("proj/sub")).unwrap().is_dir(), "the guest moved a share's directory");
    assert_eq!(code(&msb(&["stop", name])), 0);
    // Stopped, the path can change under it (by anyone on the host): swapped for a link out.
    std::fs::rename(b.join("proj/sub"), b.join("proj/sub.old")).unwrap();
    std::os::unix::fs::symlink(b.join("outside"), b.join("proj/sub")).unwrap();
    let again = msb(&["start", name]);
    let msg = String::from_utf8_lossy(&again.stderr);
    assert_ne!(code(&again), 0, "the sandbox started over a swapped mount");
    assert!(msg.contains(&b.join("proj/sub").display().to_string()) && msg.contains("canonical"), "{msg}");
    // Put back (the same directory): it starts again, and shares what it did.
    std::fs::remove_file(b.join("proj/sub")).unwrap();
    std::fs::rename(b.join("proj/sub.old"), b.join("proj/sub")).unwrap();
    crate::cli::start(name);
    let o = msb(&["exec", name, "--", "cat", "/data/f"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "sub\n", "{}", String::from_utf8_lossy(&o.stderr));
    let _ = msb(&["rm", "--force", name]);
}

/// FS1 (review): a guest that answers `msb cp NAME:/build/out.tar DIR` with another top entry
/// (here `.ssh/authorized_keys`: its root replaced `/proc/self/exe`, the file mode's program,
/// with a script of its own) gets the copy refused, and nothing in `DIR` changes.
#[test]
fn mounts_a_copy_out_takes_only_the_entry_asked_for_from_a_lying_guest() {
    let name = "e2e-cp-liar";
    let _ = msb(&["rm", "--force", name]);
    let c = msb(&["create", "msb/debian:12", "--name", name, "--net", "none", "--boot-timeout", "45"]);
    assert_eq!(code(&c), 0, "{}", String::from_utf8_lossy(&c.stderr));
    crate::cli::start(name);
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    std::fs::write(home.path().join(".ssh/authorized_keys"), "ssh-ed25519 AAAA user@laptop\n").unwrap();
    // An honest copy first: the entry asked for lands.
    let script = "mkdir -p /build && echo real > /build/out.tar";
    assert_eq!(code(&msb(&["exec", name, "--", "sh", "-c", script])), 0);
    let from = format!("{name}:/build/out.tar");
    let o = msb(&["cp", &from, home.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(home.path().join("out.tar")).unwrap(), "real\n");
    // The guest lies from now on.
    let script = r#"
mkdir -p /evil/.ssh && echo 'ssh-ed25519 EVIL attacker' > /evil/.ssh/authorized_keys
printf '#!/bin/sh\ncd /evil && exec tar -cf - .ssh\n' > /evil.sh && chmod 755 /evil.sh
mount -t tmpfs none /proc && mkdir /proc/self && ln -s /evil.sh /proc/self/exe && echo lying
"#;
    let o = msb(&["exec", name, "--", "sh", "-c", script]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "lying\n", "{}", String::from_utf8_lossy(&o.stderr));
    let o = msb(&["cp", &from, home.path().to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_ne!(code(&o), 0, "the lying copy was taken");
    assert!(
        msg.contains("top entry must be \\\"out.tar\\\"") || msg.contains("top entry must be \"out.tar\""),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(home.path().join(".ssh/authorized_keys")).unwrap(),
        "ssh-ed25519 AAAA user@laptop\n",
        "the user's keys were overwritten"
    );
    let _ = msb(&["rm", "--force", name]);
}
