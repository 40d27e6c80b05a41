//! The `msb` command line on any host, with no guest booted: the state store, names,
//! formats, completions, concurrency between `msb` processes, and the clear failure of a start
//! that cannot boot. (Commands against running guests are in the e2e suite.)

use std::path::Path;
use std::process::{Command, Output};

fn msb(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msb")).args(args).env("MSB_HOME", home).output().expect("msb runs")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = msb(home, args);
    assert!(out.status.success(), "msb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(home: &Path, args: &[&str]) -> (i32, String) {
    let out = msb(home, args);
    assert!(!out.status.success(), "msb {args:?} should fail");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn create_list_inspect_remove() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    assert_eq!(ok(h, &["create", "--name", "web", "--cpus", "2", "--memory", "512"]), "web\n");
    assert_eq!(ok(h, &["create", "base", "--name", "db.1"]), "db.1\n");
    let table = ok(h, &["ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("web ") && l.contains("created") && l.contains("512M")), "{table}");
    assert_eq!(ok(h, &["ps"]), table, "ps is ls");
    let list = json(&ok(h, &["ls", "--format", "json"]));
    let names: Vec<_> = list.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["db.1", "web"]);
    let web = json(&ok(h, &["inspect", "web"]));
    assert_eq!((web["status"].as_str(), web["config"]["cpus"].as_u64()), (Some("created"), Some(2)));
    assert_eq!(web["runs"].as_array().unwrap().len(), 0);
    assert!(ok(h, &["inspect", "--format", "table", "web"]).contains("status"));
    assert!(ok(h, &["stop", "web"]).contains("already created"));
    assert_eq!(ok(h, &["logs", "web"]), "", "no logs before the first start");
    assert_eq!(ok(h, &["rm", "web", "db.1"]), "web\ndb.1\n");
    assert_eq!(json(&ok(h, &["ls", "--format", "json"])), serde_json::json!([]));
    let (code, msg) = err(h, &["inspect", "web"]);
    assert_eq!(code, 1);
    assert!(msg.contains("no sandbox named \"web\"") && msg.contains("msb ls"), "{msg}");
}

#[test]
fn bad_names_duplicates_and_bad_config_are_refused_clearly() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    ok(h, &["create", "--name", "a"]);
    let (code, msg) = err(h, &["create", "--name", "a"]);
    assert_eq!(code, 1);
    assert!(msg.contains("already exists") && msg.contains("msb rm a"), "{msg}");
    for bad in ["-x", "a/b", "a b", &"n".repeat(64)] {
        let (_, msg) = err(h, &["create", &format!("--name={bad}")]);
        assert!(msg.contains("invalid sandbox name"), "{bad}: {msg}");
    }
    let (_, msg) = err(h, &["create", "--name", "m", "--memory", "16"]);
    assert!(msg.contains("16 MiB") && msg.contains("--memory 64"), "{msg}");
    let (_, msg) = err(h, &["create", "ubuntu", "--name", "img"]);
    assert!(msg.contains("no image \"ubuntu:latest\" in the local store") && msg.contains("msb load"), "{msg}");
    assert_eq!(json(&ok(h, &["ls", "--format", "json"])).as_array().unwrap().len(), 1, "nothing half-created");
    let (code, msg) = err(h, &["run", "--memory", "16", "--", "true"]);
    assert_eq!(code, 125, "msb's own failure in `run` is 125");
    assert!(msg.contains("--memory"), "{msg}");
}

#[test]
fn a_start_that_cannot_boot_says_why_and_records_it() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    ok(h, &["create", "--name", "nokernel"]);
    let (code, msg) = err(h, &["start", "nokernel"]);
    assert_eq!(code, 1);
    assert!(msg.contains("guest kernel not found") && msg.contains("build.sh"), "{msg}");
    let rec = json(&ok(h, &["inspect", "nokernel"]));
    assert_eq!(rec["status"], "stopped");
    let reason = rec["runs"][0]["exit_reason"].as_str().unwrap();
    assert!(reason.starts_with("failed to start") && reason.contains("kernel"), "{reason}");
    assert!(!h.join("sandboxes/nokernel/ctl.sock").exists());
    let (_, msg) = err(h, &["exec", "nokernel", "--", "true"]);
    assert!(msg.contains("is stopped") && msg.contains("msb start"), "{msg}");
    // An unnamed run that cannot boot leaves nothing behind.
    let out = msb(h, &["run", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let left: Vec<_> = json(&ok(h, &["ls", "--format", "json"])).as_array().unwrap().clone();
    assert_eq!(left.len(), 1, "only `nokernel` remains: {left:?}");
}

#[test]
fn concurrent_msb_processes_do_not_corrupt_the_store() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_path_buf();
    ok(&h, &["ls"]); // creates the store
    let procs: Vec<_> = (0..8)
        .map(|i| {
            let h = h.clone();
            std::thread::spawn(move || {
                let own = msb(&h, &["create", "--name", &format!("p{i}")]).status.success();
                let contended = msb(&h, &["create", "--name", "same"]).status.success();
                (own, contended)
            })
        })
        .collect();
    let results: Vec<_> = procs.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.iter().all(|(own, _)| *own), "every distinct name was created: {results:?}");
    assert_eq!(results.iter().filter(|(_, c)| *c).count(), 1, "exactly one `same`");
    assert_eq!(json(&ok(&h, &["ls", "--format", "json"])).as_array().unwrap().len(), 9);
}

#[test]
fn shell_completions_are_printed() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let s = ok(home.path(), &["completions", shell]);
        assert!(s.contains("msb") && s.contains("inspect") && s.contains("logs"), "{shell}");
    }
}

#[test]
fn logs_show_terminal_escapes_from_the_guest_escaped() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    ok(h, &["create", "--name", "esc"]);
    let dir = h.join("sandboxes/esc");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("console.log"), "2026-12-01T00:00:00.000Z \x1b]0;owned\x07\x1b[2Jhi\rX\n").unwrap();
    std::fs::write(dir.join("exec.log"), "2026-12-01T00:00:01.000Z [exec 1 stdout] \u{9b}31mred\n").unwrap();
    let out = msb(h, &["logs", "esc"]);
    assert!(out.status.success());
    assert!(!out.stdout.iter().any(|b| *b == 0x1b || *b == 0x07 || *b == b'\r'), "raw control bytes: {:?}", out.stdout);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[console] \\x1b]0;owned\\x07\\x1b[2Jhi\\x0dX"), "{text}");
    assert!(text.contains("\\u{9b}31mred"), "{text}");
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

#[test]
fn the_home_and_everything_in_it_are_private_from_the_start() {
    let top = tempfile::tempdir().unwrap();
    let h = top.path().join("fresh/home");
    ok(&h, &["create", "--name", "m"]);
    assert_eq!(mode(&h), 0o700, "a new MSB_HOME is 0700");
    assert_eq!(mode(&h.join("state.db")) & 0o077, 0, "state.db is private");
    // A start that cannot boot (no kernel here) still made its directory and vmm.log.
    let _ = msb(&h, &["start", "m"]);
    assert_eq!(mode(&h.join("sandboxes/m")), 0o700);
    assert_eq!(mode(&h.join("sandboxes/m/vmm.log")), 0o600);
}

#[test]
fn a_home_others_can_write_to_or_that_another_user_owns_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let top = tempfile::tempdir().unwrap();
    let h = top.path().join("home");
    ok(&h, &["ls"]);
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o770)).unwrap();
    let (code, msg) = err(&h, &["ls"]);
    assert_eq!(code, 1);
    assert!(msg.contains("refusing to use") && msg.contains("group or others can write"), "{msg}");
    let (code, _) = err(&h, &["run", "--", "true"]);
    assert_eq!(code, 125, "msb's own failure in `run`");
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o700)).unwrap();
    ok(&h, &["ls"]);
    if is_root() {
        std::os::unix::fs::chown(&h, Some(4242), Some(4242)).unwrap();
        let (_, msg) = err(&h, &["ls"]);
        assert!(msg.contains("owned by uid 4242"), "{msg}");
    }
}

#[test]
fn without_msb_home_or_home_msb_says_so_instead_of_using_tmp() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_msb")).arg("ls").env_remove("MSB_HOME").env_remove("HOME").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("neither MSB_HOME nor HOME is set") && msg.contains("set MSB_HOME"), "{msg}");
}

#[test]
fn a_control_socket_served_by_another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !is_root() {
        eprintln!("needs root to run a socket server as another user; skipped");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let h = top.path().join("home");
    ok(&h, &["create", "--name", "peer"]);
    // Let uid 4242 reach sandboxes/peer/ and serve a socket there.
    for d in [top.path(), h.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let dir = h.join("sandboxes/peer");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(h.join("sandboxes"), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).unwrap();
    let sock = dir.join("ctl.sock");
    let script =
        "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\ntime.sleep(20)";
    let mut server = Command::new("python3").args(["-c", script]).arg(&sock).uid(4242).gid(4242).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "the foreign server never bound {}", sock.display());
        std::thread::yield_now();
    }
    let out = msb(&h, &["exec", "peer", "--", "true"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(125));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("served by uid 4242"), "{msg}");
}

/// Writes a one-layer OCI image layout into `dir` (a plain tar layer with `files`), named
/// `name`; returns the layer blob's path.
fn oci_layout(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> std::path::PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    oci_layout_raw(dir, name, &b.into_inner().unwrap())
}

/// [`oci_layout`] with the layer's bytes as given (hostile ones too).
fn oci_layout_raw(dir: &Path, name: &str, layer: &[u8]) -> std::path::PathBuf {
    use msb_images::oci::Digest;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d, bytes.len())
    };
    let (ld, ls) = put(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#
    );
    let (cd, cs) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{ls}}}]}}"#
    );
    let (md, ms) = put(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"{name}"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    blobs.join(ld.hex())
}

#[test]
fn images_load_list_remove_and_prune() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let src = tempfile::tempdir().unwrap();
    oci_layout(src.path(), "tiny", &[("etc/hostname", b"tiny\n"), ("bin/x", b"#!/bin/sh\n")]);
    let out = ok(h, &["load", "-i", src.path().to_str().unwrap()]);
    assert!(out.contains("Loaded image: tiny:latest"), "{out}");
    let list = json(&ok(h, &["images", "--format", "json"]));
    assert_eq!(list[0]["reference"], "tiny:latest");
    assert_eq!(list[0]["rootfs_built"], true, "load builds the root filesystem");
    // A sandbox of it is recorded; the image cannot be removed under it.
    ok(h, &["create", "tiny", "--name", "uses-tiny"]);
    assert_eq!(json(&ok(h, &["images", "--format", "json"]))[0]["sandboxes"], serde_json::json!(["uses-tiny"]));
    // The state store lists it (loaded through the CLI, mirrored in one transaction).
    let db = msb_control_plane::store::Store::open(h).unwrap().images().unwrap();
    assert_eq!(db.iter().map(|i| i.reference.as_str()).collect::<Vec<_>>(), ["tiny:latest"]);
    assert_eq!(db[0].id, list[0]["id"].as_str().unwrap());
    let (_, msg) = err(h, &["rmi", "tiny"]);
    assert!(msg.contains("used by a sandbox"), "{msg}");
    ok(h, &["rm", "uses-tiny"]);
    ok(h, &["rmi", "tiny"]);
    assert_eq!(json(&ok(h, &["images", "--format", "json"])).as_array().unwrap().len(), 0);
    assert!(
        msb_control_plane::store::Store::open(h).unwrap().images().unwrap().is_empty(),
        "rmi leaves the state store"
    );
    let freed = ok(h, &["image", "prune"]);
    assert!(freed.contains("reclaimed"), "{freed}");
    let store = h.join("images");
    for d in ["blobs/sha256", "rootfs", "tmp"] {
        assert_eq!(std::fs::read_dir(store.join(d)).unwrap().count(), 0, "{d} is not empty after prune");
    }
}

#[test]
fn images_a_tampered_layer_or_a_hostile_one_loads_nothing() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let src = tempfile::tempdir().unwrap();
    let layer = oci_layout(src.path(), "tampered", &[("etc/passwd", b"root:x:0:0::/:/bin/sh\n")]);
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&layer, bytes).unwrap();
    let (code, msg) = err(h, &["load", "-i", src.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(msg.contains("tampered"), "{msg}");
    assert_eq!(json(&ok(h, &["images", "--format", "json"])).as_array().unwrap().len(), 0);
    // A layer with an absolute path: refused naming the layer and the entry.
    let src = tempfile::tempdir().unwrap();
    let mut evil = Vec::new();
    let mut hd = tar::Header::new_gnu();
    hd.as_old_mut().name[..11].copy_from_slice(b"/etc/shadow");
    hd.set_size(0);
    hd.set_mode(0o644);
    hd.set_cksum();
    evil.extend_from_slice(hd.as_bytes());
    evil.extend_from_slice(&[0u8; 1024]);
    oci_layout_raw(src.path(), "evil", &evil);
    let (code, msg) = err(h, &["load", "-i", src.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(msg.contains("layer 0") && msg.contains("/etc/shadow") && msg.contains("absolute"), "{msg}");
    assert_eq!(std::fs::read_dir(h.join("images/rootfs")).unwrap().count(), 0, "no root filesystem");
    assert_eq!(std::fs::read_dir(h.join("images/tmp")).unwrap().count(), 0, "staging is cleaned up");
    assert_eq!(json(&ok(h, &["images", "--format", "json"])).as_array().unwrap().len(), 0, "no image recorded");
}

/// Debian's docker-registry on a free loopback port, optionally behind htpasswd basic auth
/// and TLS; killed on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test certificates: a CA and a leaf for 127.0.0.1 signed by it (openssl).
fn test_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=msb test CA",
    ]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    (dir.join("ca.crt"), dir.join("leaf.crt"), dir.join("leaf.key"))
}

fn registry(auth: Option<(&str, &str)>, tls: bool) -> (Registry, Option<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("data").display()
    );
    let mut ca = None;
    if tls {
        let (c, cert, key) = test_ca(dir.path());
        cfg.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
        ca = Some(c);
    }
    if let Some((user, pass)) = auth {
        let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output().expect("htpasswd runs (apache2-utils)");
        std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
        cfg.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: msb-test\n    path: {}\n",
            dir.path().join("htpasswd").display()
        ));
    }
    std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
    let child = Command::new("docker-registry")
        .args(["serve", dir.path().join("config.yml").to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry runs (Debian package docker-registry; scripts/setup.sh installs it)");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < end, "the test registry did not come up");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (Registry { child, port, dir }, ca)
}

/// Pushes the OCI layout `src` (named `tiny`) to `dest` with skopeo.
fn push(src: &Path, dest: &str, extra: &[&str]) {
    let out = Command::new("skopeo")
        .arg("copy")
        .args(extra)
        .arg(format!("oci:{}:tiny", src.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("skopeo runs (Debian package skopeo)");
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn images_pull_from_a_loopback_registry_twice_at_once() {
    let (reg, _) = registry(None, false);
    let src = tempfile::tempdir().unwrap();
    oci_layout(src.path(), "tiny", &[("etc/hostname", b"pulled\n")]);
    let image = format!("127.0.0.1:{}/team/tiny:1", reg.port);
    push(src.path(), &image, &["--dest-tls-verify=false"]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Two pulls of one image at once: both succeed, one image results.
    let bin = env!("CARGO_BIN_EXE_msb");
    let spawn = || Command::new(bin).args(["pull", &image]).env("MSB_HOME", h).output().unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Pulled image"));
    }
    // Not on a terminal: plain lines, a blob's start and its verified end (one of the two
    // pulls fetched each blob; the other may have found it stored).
    let lines = format!("{}{}", String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    assert!(lines.contains(": fetching (") && lines.contains(": verified"), "{lines}");
    assert!(!lines.contains('\r') && !lines.contains('\x1b'), "no terminal control off a terminal: {lines:?}");
    let list = json(&ok(h, &["images", "--format", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["reference"], image.as_str());
    assert_eq!(list[0]["rootfs_built"], true);
    assert_eq!(std::fs::read_dir(h.join("images/tmp")).unwrap().count(), 0, "staging is empty");
    let (_, msg) = err(h, &["pull", &format!("127.0.0.1:{}/team/absent:1", reg.port)]);
    assert!(msg.contains("not found"), "{msg}");
}

/// Every stored blob hashes to its name (nothing unverified was published).
fn blobs_verify(home: &Path) {
    for e in std::fs::read_dir(home.join("images/blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let d = msb_images::oci::Digest::of(&std::fs::read(&p).unwrap());
        assert_eq!(d.hex(), p.file_name().unwrap().to_str().unwrap(), "a stored blob does not match its name");
    }
}

#[test]
fn images_a_killed_pull_leaves_no_image_and_tampered_or_mislabelled_layers_are_refused() {
    use std::io::BufRead;
    let (reg, _) = registry(None, false);
    let src = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..48u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    oci_layout(src.path(), "tiny", &[("big", &big)]);
    let image = format!("127.0.0.1:{}/team/big:1", reg.port);
    push(src.path(), &image, &["--dest-tls-verify=false"]);
    // Killed as soon as the layer starts to arrive.
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb"))
        .args(["pull", &image])
        .env("MSB_HOME", h)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(c.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let big_blob = line.contains(": fetching (") && !line.contains("(0.0MB)");
        seen.push(line);
        if big_blob {
            break;
        }
    }
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(seen.iter().any(|l| l.contains(": fetching (")), "{seen:?}");
    assert_eq!(json(&ok(h, &["images", "--format", "json"])).as_array().unwrap().len(), 0, "{seen:?}");
    assert_eq!(std::fs::read_dir(h.join("images/refs")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(h.join("images/rootfs")).unwrap().count(), 0);
    blobs_verify(h);
    // The same pull afterwards completes.
    ok(h, &["pull", &image]);
    assert_eq!(json(&ok(h, &["images", "--format", "json"]))[0]["reference"], image.as_str());
    // A layer changed in the registry's storage: refused, nothing named.
    let blobs = reg.dir.path().join("data/docker/registry/v2/blobs/sha256");
    let mut biggest = (0u64, std::path::PathBuf::new());
    for sub in std::fs::read_dir(&blobs).unwrap() {
        for b in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let data = b.unwrap().path().join("data");
            let len = std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
            if len > biggest.0 {
                biggest = (len, data);
            }
        }
    }
    let mut bytes = std::fs::read(&biggest.1).unwrap();
    bytes[4096] ^= 1;
    std::fs::write(&biggest.1, bytes).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let (_, msg) = err(fresh.path(), &["pull", &image]);
    assert!(msg.contains("tampered"), "{msg}");
    assert_eq!(json(&ok(fresh.path(), &["images", "--format", "json"])).as_array().unwrap().len(), 0);
    blobs_verify(fresh.path());
    // A gzip layer whose config names the compressed digest as its diff_id: refused.
    let lying = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut hd = tar::Header::new_gnu();
    hd.set_size(3);
    hd.set_mode(0o644);
    tar.append_data(&mut hd, "etc/x", &b"abc"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    oci_layout_raw(lying.path(), "tiny", &gz.finish().unwrap());
    let lie = format!("127.0.0.1:{}/team/lying:1", reg.port);
    push(lying.path(), &lie, &["--dest-tls-verify=false"]);
    let (_, msg) = err(fresh.path(), &["pull", &lie]);
    assert!(msg.contains("diff_id") || msg.contains("hashes to"), "{msg}");
    assert_eq!(json(&ok(fresh.path(), &["images", "--format", "json"])).as_array().unwrap().len(), 0);
}

#[test]
fn images_pull_with_basic_auth_over_tls_with_a_test_ca() {
    let (reg, ca) = registry(Some(("alice", "s3cret")), true);
    let ca = ca.unwrap();
    let src = tempfile::tempdir().unwrap();
    oci_layout(src.path(), "tiny", &[("etc/hostname", b"private\n")]);
    let image = format!("127.0.0.1:{}/private/tiny:2", reg.port);
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, certs.path().join("ca.crt")).unwrap();
    push(src.path(), &image, &["--dest-creds", "alice:s3cret", "--dest-cert-dir", certs.path().to_str().unwrap()]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let docker = tempfile::tempdir().unwrap();
    let pull = |extra: &[&str], config: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msb"));
        c.arg("pull").arg(&image).args(extra).env("MSB_HOME", h).env("DOCKER_CONFIG", docker.path());
        if let Some(cfg) = config {
            std::fs::write(docker.path().join("config.json"), cfg).unwrap();
        }
        c.output().unwrap()
    };
    let ca_arg = ["--ca-cert", ca.to_str().unwrap()];
    // Without the CA the registry's certificate is not trusted; with it but without
    // credentials the registry refuses and msb says how to log in.
    let o = pull(&[], None);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).to_lowercase().contains("certificate"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = pull(&ca_arg, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("docker login"), "{}", String::from_utf8_lossy(&o.stderr));
    // Docker's stored credentials (base64 of user:password).
    let auth = "YWxpY2U6czNjcmV0"; // alice:s3cret
    let cfg = format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#, reg.port);
    let o = pull(&ca_arg, Some(&cfg));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&ok(h, &["images", "--format", "json"]))[0]["reference"], image.as_str());
    // A credential helper (docker's protocol: the server on stdin, JSON on stdout), named
    // for this registry; it checks which server it was asked about.
    ok(h, &["rmi", &image]);
    let bin = tempfile::tempdir().unwrap();
    let helper = bin.path().join("docker-credential-msbtest");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = 127.0.0.1:{} ] || exit 1\necho '{{\"ServerURL\":\"x\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}'\n",
        reg.port
    );
    std::fs::write(&helper, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let cfg = format!(r#"{{"credHelpers":{{"127.0.0.1:{}":"msbtest"}},"auths":{{}}}}"#, reg.port);
    std::fs::write(docker.path().join("config.json"), cfg).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_msb"))
        .arg("pull")
        .arg(&image)
        .args(ca_arg)
        .env("MSB_HOME", h)
        .env("DOCKER_CONFIG", docker.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(o.status.success(), "through the helper: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn images_a_sandbox_refuses_to_start_over_another_image_under_its_name() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let first = tempfile::tempdir().unwrap();
    oci_layout(first.path(), "app", &[("v", b"1")]);
    ok(h, &["load", "-i", first.path().to_str().unwrap()]);
    ok(h, &["create", "app", "--name", "over-v1"]);
    let second = tempfile::tempdir().unwrap();
    oci_layout(second.path(), "app", &[("v", b"2")]);
    ok(h, &["load", "-i", second.path().to_str().unwrap()]);
    let (_, msg) = err(h, &["start", "over-v1"]);
    assert!(msg.contains("image app:latest is now") && msg.contains("msb rm"), "{msg}");
    // Pruning keeps the root filesystem that sandbox's disk was made over.
    ok(h, &["image", "prune"]);
    assert_eq!(std::fs::read_dir(h.join("images/rootfs")).unwrap().count(), 2);
}

#[test]
fn images_a_docker_save_tar_loads_from_stdin() {
    use std::io::Write;
    let entry = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let mut layer = tar::Builder::new(Vec::new());
    entry(&mut layer, "etc/saved", b"yes\n");
    let layer = layer.into_inner().unwrap();
    let diff_id = msb_images::oci::Digest::of(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["cat","/etc/saved"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let cfg_name = format!("{}.json", msb_images::oci::Digest::of(config.as_bytes()).hex());
    let manifest = format!(r#"[{{"Config":"{cfg_name}","RepoTags":["saved:1"],"Layers":["abc/layer.tar"]}}]"#);
    let mut archive = tar::Builder::new(Vec::new());
    entry(&mut archive, "abc/layer.tar", &layer);
    entry(&mut archive, &cfg_name, config.as_bytes());
    entry(&mut archive, "manifest.json", manifest.as_bytes());
    let archive = archive.into_inner().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb"))
        .args(["load", "-i", "-"])
        .env("MSB_HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(&archive).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Loaded image: saved:1"));
    let list = json(&ok(home.path(), &["images", "--format", "json"]));
    assert_eq!(list[0]["reference"], "saved:1");
    assert_eq!(list[0]["manifest"], serde_json::Value::Null, "docker save has no manifest digest");
}

#[test]
fn images_a_load_killed_midway_leaves_no_image() {
    use std::io::Write;
    let src = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    oci_layout(src.path(), "killed", &[("big", &big)]);
    // The layout as a tar, fed on stdin: half of it, then the loader is killed.
    let mut archive = tar::Builder::new(Vec::new());
    archive.append_dir_all(".", src.path()).unwrap();
    let archive = archive.into_inner().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb"))
        .args(["load", "-i", "-"])
        .env("MSB_HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(&archive[..archive.len() / 2]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.kill().unwrap();
    c.wait().unwrap();
    drop(stdin);
    assert_eq!(json(&ok(home.path(), &["images", "--format", "json"])).as_array().unwrap().len(), 0);
    assert_eq!(std::fs::read_dir(home.path().join("images/rootfs")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(home.path().join("images/refs")).unwrap().count(), 0);
    // The whole archive loads afterwards.
    let mut c = Command::new(env!("CARGO_BIN_EXE_msb"))
        .args(["load", "-i", "-"])
        .env("MSB_HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(&archive).unwrap();
    assert!(c.wait_with_output().unwrap().status.success());
    assert_eq!(json(&ok(home.path(), &["images", "--format", "json"]))[0]["reference"], "killed:latest");
}

/// Finding FS3 (review): `msb load` of a hostile image whose one layer (a ~9 KB zstd blob)
/// names a 256 MiB long name, and of one whose entries are thousands of components deep, is
/// refused with the reason while the process stays small (it peaked at +768 MiB before).
#[test]
fn images_a_hostile_image_that_would_need_gigabytes_to_merge_is_refused_in_bounded_memory() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let long = msb_images::testkit::zstd_long_name(256 << 20);
    let deep = {
        let mut b = tar::Builder::new(Vec::new());
        let path = format!("{}f", "a/".repeat(2040));
        for i in 0..48 {
            let mut hd = tar::Header::new_gnu();
            hd.set_size(0);
            hd.set_mode(0o644);
            b.append_data(&mut hd, format!("{i:04}/{path}"), &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    for (what, layer, why) in [("long", long, "long name of 268435456 bytes"), ("deep", deep, "components")] {
        let src = tempfile::tempdir().unwrap();
        oci_layout_raw(src.path(), what, &layer);
        let mut child = Command::new(env!("CARGO_BIN_EXE_msb"))
            .args(["load", "-i", src.path().to_str().unwrap()])
            .env("MSB_HOME", h)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The process's peak resident size, read while it runs (VmHWM only grows).
        let status = format!("/proc/{}/status", child.id());
        let mut peak_kib = 0u64;
        while child.try_wait().unwrap().is_none() {
            if let Ok(s) = std::fs::read_to_string(&status) {
                if let Some(v) = s.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                    peak_kib = peak_kib.max(v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let out = child.wait_with_output().unwrap();
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && msg.contains(why), "{what}: {msg}");
        assert!(peak_kib < 128 * 1024, "{what}: msb load peaked at {} MiB", peak_kib / 1024);
        assert_eq!(
            json(&ok(h, &["images", "--format", "json"])).as_array().unwrap().len(),
            0,
            "{what}: nothing loaded"
        );
    }
}
