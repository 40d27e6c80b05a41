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
    assert!(msg.contains("image \"ubuntu\" is not available"), "{msg}");
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
