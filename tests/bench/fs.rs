//! `msb-bench fs`: the same filesystem workloads through a shared directory (virtio-fs and
//! the FsBroker) and on the sandbox's own writable root (overlay on virtio-blk), in one
//! sandbox of the default image, timed inside the guest; prints each and the ratio.
//! Workloads: 1,000 small-file creates, a 10,000-file tree made, then walked with a `stat`
//! of every entry (caches dropped first), 100 MiB written with fsync and read back (caches
//! dropped), and `rm -rf` of the tree.

use std::collections::BTreeMap;
use std::process::Command;

const IMAGE: &str = "msb/debian:12";

/// The guest's script: `run WHERE DIR` prints `WHERE WORKLOAD MS` lines.
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
run virtiofs /work/bench
run root /bench
"#;

pub fn side_by_side() {
    println!("--- shared directory (virtio-fs + FsBroker) vs the writable root, ms, timed in the guest ---");
    let Some(bin) = std::env::current_exe().ok().map(|p| p.with_file_name("msb")).filter(|p| p.is_file()) else {
        return println!("filesystem comparison not run: no msb binary beside this one");
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mount = format!("{}:/work", dir.path().display());
    let child = Command::new(&bin)
        .args(["run", IMAGE, "--net", "none", "--boot-timeout", "120", "-v", &mount, "--", "sh", "-c", SCRIPT])
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return println!("filesystem comparison not run: {e}"),
    };
    // Each figure is printed as the guest reports it, so a slow run still shows what it did.
    let mut lines = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            println!("  {line}");
            lines.push(line);
        }
    }
    if !child.wait().is_ok_and(|st| st.success()) {
        println!("filesystem comparison: the guest script failed (figures above are what it reported)");
    }
    let mut figures: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for line in &lines {
        let mut w = line.split_whitespace();
        let (Some(where_), Some(what), Some(ms)) = (w.next(), w.next(), w.next().and_then(|m| m.parse::<f64>().ok()))
        else {
            continue;
        };
        let e = figures.entry(what.to_string()).or_default();
        match where_ {
            "virtiofs" => e.0 = Some(ms),
            "root" => e.1 = Some(ms),
            _ => {}
        }
    }
    println!("{:<22} {:>12} {:>12} {:>8}", "workload", "virtio-fs", "root", "ratio");
    for (what, (fs, root)) in figures {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ratio = match (fs, root) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!("{what:<22} {:>12} {:>12} {ratio:>8}", show(fs), show(root));
    }
    println!("virtiofsd (QEMU) on the same directory: not measured yet (needs vhost-user-fs in the rig's QEMU)");
}
