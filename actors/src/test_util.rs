//! Helpers for actor tests: waiting for an effect without fixed sleeps.

use std::time::Duration;

/// Polls `cond` until it holds, failing after 10 s with `what`. The wait ends as soon as the
/// condition does: it bounds a test, it does not pace it.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
