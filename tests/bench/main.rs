//! Boot benchmark: prints figures, passes or fails nothing.
//!
//! For N sandboxes, one after another: create() start → guest init (boot timer), → agent
//! ready, → first exec result; exec round trip on the running sandbox; and the sandbox's host
//! memory outside guest RAM (this process's RSS minus the guest memory mapping's RSS).
//! Usage: `msb-bench [N]` with MSB_HOME set up (hardware KVM, or inside the rig).

use std::time::{Duration, Instant};

use msb_actors::Sandbox;

const MEMORY_MIB: u64 = 256;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (total RSS, RSS of the guest RAM mapping) in KiB, from /proc/self/smaps.
fn rss_split() -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let guest_kib = MEMORY_MIB * 1024;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut cur_is_guest = false;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            let size: u64 = rest
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            cur_is_guest = size == guest_kib;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let rss: u64 = rest
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += rss;
            if cur_is_guest {
                guest += rss;
            }
        }
    }
    (total, guest)
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!(
        "msb-bench: {n} sandboxes, {MEMORY_MIB} MiB, 1 vCPU; KVM: {}",
        msb_hypervisor::classify().describe()
    );
    let (mut to_init, mut to_ready, mut to_exec, mut rtt, mut outside) =
        (vec![], vec![], vec![], vec![], vec![]);
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
        if let Ok(t) = sb.boot_times().await {
            if let Some(d) = t.to_init {
                to_init.push(ms(d));
            }
        }
        to_ready.push(ms(ready));
        to_exec.push(ms(first));
        for _ in 0..20 {
            let t = Instant::now();
            if sb.exec("true", Vec::<String>::new()).await.is_ok() {
                rtt.push(ms(t.elapsed()));
            }
        }
        let (total, guest) = rss_split();
        outside.push((total - guest) as f64 / 1024.0);
        let _ = sb.stop().await;
        println!("boot {i}: ready {:.0} ms, first exec {:.0} ms, RSS outside guest RAM {:.1} MiB (guest touched {:.1} MiB)",
            ms(ready), ms(first), (total - guest) as f64 / 1024.0, guest as f64 / 1024.0);
    }
    println!("--- msb figures (ms unless noted) ---");
    stats("create -> guest init (boot timer)", to_init);
    stats("create -> agent ready", to_ready);
    stats("create -> first exec result", to_exec);
    stats("exec round trip (true)", rtt);
    stats("process RSS outside guest RAM, MiB", outside);
}
