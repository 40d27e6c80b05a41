//! The workspace's shape, checked from `cargo metadata` and the sources (all offline):
//! the dependency rules of DESIGN.md §3 and the `unsafe` confinement. A change that breaks a
//! rule fails here with the rule it broke.
//!
//! Dependency rules apply to normal and build dependencies: what ships. Dev-dependencies may
//! reach further (a shell's test builds mock virtio queues), because they never reach the
//! product.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Our crates: folder → package name.
const CRATES: &[(&str, &str)] = &[
    ("hypervisor", "msb-hypervisor"),
    ("devices", "msb-devices"),
    ("protocol", "msb-protocol"),
    ("schema", "msb-schema"),
    ("net-gateway", "msb-net-gateway"),
    ("fs-broker", "msb-fs-broker"),
    ("secret-vault", "msb-secret-vault"),
    ("images", "msb-images"),
    ("actors", "msb-actors"),
    ("control-plane", "msb-control-plane"),
    ("agentd", "msb-agentd"),
    ("cli", "msb-cli"),
    ("tests", "msb-tests"),
];

const BROKERS: &[&str] = &["msb-net-gateway", "msb-fs-broker", "msb-secret-vault"];

/// Which of our crates each crate may depend on (DESIGN.md §3.1). `cli` also uses
/// `protocol` (its lock helper and frame codec): protocol is pure and VMM-free.
fn allowed(pkg: &str) -> Option<Vec<&'static str>> {
    let brokers = BROKERS.to_vec();
    Some(match pkg {
        "msb-hypervisor" | "msb-protocol" | "msb-images" => vec![],
        "msb-devices" => vec!["msb-hypervisor", "msb-protocol"],
        "msb-schema" => vec!["msb-protocol"],
        "msb-net-gateway" | "msb-fs-broker" | "msb-secret-vault" => vec!["msb-schema"],
        "msb-actors" => {
            let mut v = vec!["msb-hypervisor", "msb-devices", "msb-protocol", "msb-schema", "msb-images"];
            v.extend(brokers);
            v
        }
        "msb-control-plane" => vec!["msb-schema", "msb-protocol", "msb-images"],
        "msb-agentd" => vec!["msb-protocol"],
        "msb-cli" => vec!["msb-control-plane", "msb-actors", "msb-images", "msb-hypervisor", "msb-protocol"],
        "msb-tests" => return None,
        _ => vec![],
    })
}

/// External crates only some of ours may name directly: crate → who may.
const EXCLUSIVE: &[(&str, &[&str])] = &[
    ("kvm-ioctls", &["msb-hypervisor"]),
    ("kvm-bindings", &["msb-hypervisor"]),
    ("linux-loader", &["msb-hypervisor"]),
    ("virtio-queue", &["msb-devices"]),
    ("virtio-bindings", &["msb-devices"]),
    ("vm-superio", &["msb-devices"]),
    ("vm-memory", &["msb-hypervisor", "msb-devices"]),
    ("rusqlite", &["msb-control-plane"]),
];

/// External crates some of ours must never name.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("msb-devices", &["tokio", "ractor"]),
    ("msb-schema", &["tokio"]),
    ("msb-net-gateway", &["vm-memory", "virtio-queue", "kvm-ioctls", "kvm-bindings"]),
    ("msb-fs-broker", &["vm-memory", "virtio-queue", "kvm-ioctls", "kvm-bindings"]),
    ("msb-secret-vault", &["vm-memory", "virtio-queue", "kvm-ioctls", "kvm-bindings"]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// The workspace's `cargo metadata` (no dependencies, offline).
fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Package name → the names of its normal and build dependencies.
fn shipped_deps() -> BTreeMap<String, BTreeSet<String>> {
    let meta = metadata();
    let mut map = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().expect("name").to_string();
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .map(|d| d["name"].as_str().expect("dependency name").to_string())
            .collect();
        map.insert(name, deps);
    }
    map
}

#[test]
fn every_crate_is_in_the_layout() {
    let deps = shipped_deps();
    let known: BTreeSet<&str> = CRATES.iter().map(|(_, p)| *p).collect();
    for name in deps.keys() {
        assert!(
            known.contains(name.as_str()),
            "{name} is not a crate of DESIGN.md §3; add it to the table there and here"
        );
    }
    for (dir, pkg) in CRATES {
        if deps.contains_key(*pkg) {
            assert!(root().join(dir).join("Cargo.toml").is_file(), "{pkg} must live in {dir}/");
        }
    }
}

#[test]
fn internal_dependencies_follow_the_rules() {
    let deps = shipped_deps();
    let ours: BTreeSet<&str> = CRATES.iter().map(|(_, p)| *p).collect();
    let mut broken = Vec::new();
    for (pkg, uses) in &deps {
        let Some(may) = allowed(pkg) else { continue };
        for d in uses.iter().filter(|d| ours.contains(d.as_str())) {
            if !may.contains(&d.as_str()) {
                broken.push(format!("{pkg} depends on {d}, which DESIGN.md §3 does not allow (may use: {may:?})"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn exclusive_and_forbidden_external_crates() {
    let deps = shipped_deps();
    let mut broken = Vec::new();
    for (krate, owners) in EXCLUSIVE {
        for (pkg, uses) in &deps {
            if pkg != "msb-tests" && uses.contains(*krate) && !owners.contains(&pkg.as_str()) {
                broken.push(format!("{pkg} names {krate}; only {owners:?} may"));
            }
        }
    }
    for (pkg, never) in FORBIDDEN {
        for krate in never.iter().filter(|k| deps.get(*pkg).is_some_and(|u| u.contains(**k))) {
            broken.push(format!("{pkg} must not depend on {krate}"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// `.rs` files under `dir`, skipping build output.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of code that use the `unsafe` keyword (comments and string literals on the line
/// are not code; `unsafe_code` in a lint attribute is not the keyword).
fn unsafe_lines(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut in_str = false;
        let mut stripped = String::new();
        for c in code.chars() {
            if c == '"' {
                in_str = !in_str;
            } else if !in_str {
                stripped.push(c);
            }
        }
        let is_keyword = stripped.match_indices("unsafe").any(|(at, _)| {
            let before = stripped[..at].chars().next_back();
            let after = stripped[at + "unsafe".len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        });
        if is_keyword {
            found.push((i + 1, line.trim().to_string()));
        }
    }
    found
}

#[test]
fn unsafe_appears_only_in_the_hypervisor() {
    let mut files = Vec::new();
    sources(&root(), &mut files);
    assert!(files.len() > 20, "found only {} sources under {}", files.len(), root().display());
    let hv = root().join("hypervisor");
    let mut broken = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(&hv)) {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (n, line) in unsafe_lines(&text) {
            broken.push(format!("{}:{n}: {line}", f.strip_prefix(root()).unwrap_or(f).display()));
        }
    }
    assert!(broken.is_empty(), "`unsafe` outside hypervisor/ (DESIGN.md §3):\n{}", broken.join("\n"));
}

#[test]
fn every_unsafe_block_in_the_hypervisor_says_why_it_is_sound() {
    let mut files = Vec::new();
    sources(&root().join("hypervisor"), &mut files);
    let mut broken = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in unsafe_lines(&text) {
            // The SAFETY comment sits in the comment block right above the line.
            let above = lines[..n - 1].iter().rev().take_while(|l| l.trim_start().starts_with("//"));
            if !above.into_iter().any(|l| l.contains("SAFETY:")) && !line.contains("unsafe fn") {
                broken.push(format!("{}:{n}: {line}", f.display()));
            }
        }
    }
    assert!(broken.is_empty(), "unsafe without a `// SAFETY:` comment:\n{}", broken.join("\n"));
}

#[test]
fn crate_roots_outside_the_hypervisor_forbid_unsafe() {
    let roots = ["devices/src/lib.rs", "protocol/src/lib.rs", "schema/src/lib.rs", "images/src/lib.rs"]
        .into_iter()
        .chain(["actors/src/lib.rs", "control-plane/src/lib.rs", "agentd/src/main.rs", "cli/src/main.rs"])
        .chain(["tests/src/lib.rs"]);
    for r in roots {
        let text = std::fs::read_to_string(root().join(r)).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert!(text.contains("#![forbid(unsafe_code)]"), "{r} must say #![forbid(unsafe_code)]");
    }
}

#[test]
fn the_unsafe_scanner_sees_the_keyword_and_nothing_else() {
    let text = "#![forbid(unsafe_code)]\n// unsafe in a comment\nlet s = \"unsafe\";\nunsafe { x() }\n";
    assert_eq!(unsafe_lines(text), vec![(4, "unsafe { x() }".to_string())]);
}

#[test]
fn sandbox_limits_fit_what_the_vmm_supports() {
    use msb_hypervisor::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
    let mem = msb_control_plane::schema::limits::MEMORY_MIB;
    assert!(*mem.start() >= MIN_MEMORY_MIB && *mem.end() <= MAX_MEMORY_MIB, "{mem:?}");
    let cpus = msb_control_plane::schema::limits::VCPUS;
    assert!(*cpus.start() >= 1 && *cpus.end() <= msb_hypervisor::vm::MAX_VCPUS, "{cpus:?}");
}

#[test]
fn the_named_sandbox_sdk_does_not_compile_the_vmm() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "-p", "msb-control-plane", "-e", "normal", "--prefix", "none", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains("msb-schema"), "{tree}");
    for vmm in
        ["msb-hypervisor", "msb-devices", "msb-actors", "kvm-ioctls", "linux-loader", "virtio-queue", "vm-memory"]
    {
        assert!(!crates.contains(vmm), "msb-control-plane pulls in {vmm}");
    }
}

/// Cargo features that only test builds may turn on: the sandbox process's `test-hooks` make
/// it attempt what an attacker would (`cli/src/sandbox_process/hooks.rs`).
const TEST_ONLY_FEATURES: &[(&str, &str)] = &[("msb-cli", "test-hooks")];

#[test]
fn test_only_features_stay_out_of_release_builds() {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    for (pkg, feature) in TEST_ONLY_FEATURES {
        let p = packages.iter().find(|p| p["name"] == *pkg).expect("the package exists");
        let features = &p["features"];
        assert!(features.get(*feature).is_some(), "{pkg} has no feature {feature} any more: update this table");
        // Not on by default, nor pulled in by another of its features.
        for (name, enables) in features.as_object().expect("features") {
            if name == feature {
                continue;
            }
            let list: Vec<&str> = enables.as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
            assert!(!list.contains(feature), "{pkg}'s feature {name} turns on the test-only {feature}");
        }
        // No crate of the workspace turns it on through its dependency on the package.
        for other in packages {
            for d in other["dependencies"].as_array().unwrap() {
                if d["name"] == *pkg {
                    let fs: Vec<&str> = d["features"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
                    assert!(!fs.contains(feature), "{} turns on {pkg}'s test-only {feature}", other["name"]);
                }
            }
        }
    }
    // The release build script builds it only under its own name, beside the real binary.
    let script = std::fs::read_to_string(root().join("scripts/build-static.sh")).unwrap();
    for line in script.lines().filter(|l| l.contains("--features test-hooks")) {
        assert!(line.contains("cargo build"), "{line}");
    }
    assert!(script.contains("release/msb\" \"$dest/msb-hooks\""), "the hooked binary is renamed msb-hooks");
}
