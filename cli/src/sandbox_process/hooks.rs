//! Test-only hooks (the `test-hooks` feature, never in a release build): once the sandbox is
//! up, `MSB_TEST_HOOK` makes the locked-down process attempt what an attacker inside it
//! would, so the e2e suite can check how the lockdown answers. Items, comma-separated:
//! - `open=PATH`: open PATH for reading; the outcome is logged (`test hook: open PATH: …`);
//! - `write=PATH`: create PATH for writing; the outcome is logged;
//! - `connect=ADDR`: a TCP connection to ADDR; the outcome is logged;
//! - `execve`: exec `/bin/true` (a seccomp violation: the process must die, reported).

use std::time::Duration;

/// Runs the hooks named in `MSB_TEST_HOOK` on a task, a moment after the sandbox is up.
pub fn start() {
    let Ok(spec) = std::env::var("MSB_TEST_HOOK") else { return };
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for item in spec.split(',').map(str::trim) {
            if let Some(path) = item.strip_prefix("open=") {
                let r = std::fs::File::open(path).map(drop);
                tracing::warn!("test hook: open {path}: {r:?}");
            } else if let Some(path) = item.strip_prefix("write=") {
                let r = std::fs::File::create(path).map(drop);
                tracing::warn!("test hook: write {path}: {r:?}");
            } else if let Some(addr) = item.strip_prefix("connect=") {
                let r = tokio::net::TcpStream::connect(addr).await.map(drop);
                tracing::warn!("test hook: connect {addr}: {r:?}");
            } else if item == "execve" {
                tracing::warn!("test hook: execve /bin/true");
                let r = nix::unistd::execv(c"/bin/true", &[c"/bin/true"]);
                tracing::warn!("test hook: execve returned {r:?}");
            }
        }
    });
}
