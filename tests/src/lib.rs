//! Shared helpers of msb's test suites.

#![forbid(unsafe_code)]

pub mod netns;

use std::time::Duration;

use msb_actors::{Error, ExecError, Sandbox, SandboxBuilder};

/// Fails (never skips) when this host cannot boot Linux guests, saying where to run instead.
pub fn require_linux_capable_kvm() {
    let kind = msb_hypervisor::classify();
    assert!(
        kind.boots_linux() || std::env::var_os("MSB_E2E_FORCE").is_some(),
        "the e2e suite boots real Linux guests and needs hardware KVM, but this host has: {}. \
         Run it through the rig: tests/rig/run-rig.sh e2e",
        kind.describe()
    );
}

/// Boot timeout for e2e sandboxes (nested TCG boots take a few seconds).
pub const E2E_BOOT_TIMEOUT: Duration = Duration::from_secs(45);

/// Creates a sandbox, retrying once if the guest does not come up (see below). Retries are
/// printed so that the rig's report can count them.
pub async fn boot_with(b: impl Fn() -> SandboxBuilder) -> Sandbox {
    require_linux_capable_kvm();
    init_tracing();
    match b().boot_timeout(E2E_BOOT_TIMEOUT).create().await {
        Ok(sb) => sb,
        // A boot that timed out or died before its agent was ready gets one retry: nested TCG
        // loses an interrupt about once in 200 boots.
        Err(e @ (Error::BootTimeout { .. } | Error::Exec(ExecError::VmStopped { .. }))) => {
            eprintln!("E2E-RETRY: first boot failed: {e}");
            b().boot_timeout(E2E_BOOT_TIMEOUT).create().await.expect("sandbox boots on retry")
        }
        Err(e) => panic!("sandbox did not boot: {e}"),
    }
}

/// Whether this suite runs in the rig (nested TCG; the rig's L1 sets `MSB_RIG`).
pub fn in_rig() -> bool {
    std::env::var_os("MSB_RIG").is_some()
}

/// Whether a failed first attempt of `name` (its panic `payload`) is the rig's known limit —
/// the nested guest triple-faulted, as the API (`TripleFault`) or the CLI (`triple-faulted`)
/// says it, or the whole sandbox stopped answering (`sandbox stalled`: not even an exec gets
/// through) — and so gets one more run; says so when it does (the rig's report counts it).
/// Nested SVM under TCG has triple-faulted and stalled guests under a sustained agent-channel
/// flood (README, known rig limit); outside the rig either fails the test at once, so that
/// limit cannot hide a VMM bug on hardware KVM. A command that stalls while its guest still
/// answers is never rerun.
fn rerun_in_rig(name: &str, attempt: u32, payload: &(dyn std::any::Any + Send)) -> bool {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let known = msg.contains("TripleFault") || msg.contains("triple-faulted") || msg.contains("(sandbox stalled)");
    let again = attempt == 1 && in_rig() && known;
    if again {
        eprintln!("E2E-RETRY: {name}: the nested guest triple-faulted or stalled (known rig limit); once more:\n{msg}");
    }
    again
}

/// Runs a flood scenario, once more in the rig if its guest triple-faulted: the rig's known
/// limit, see `rerun_in_rig` (outside the rig a triple fault fails at once).
pub async fn rig_flood<F, Fut>(name: &str, scenario: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    for attempt in 1..=2 {
        match tokio::spawn(scenario()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                if !rerun_in_rig(name, attempt, &*p) {
                    std::panic::resume_unwind(p);
                }
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

/// The blocking form of [`rig_flood`], for tests that drive the CLI.
pub fn rig_flood_blocking(name: &str, scenario: impl Fn() + std::panic::RefUnwindSafe) {
    for attempt in 1..=2 {
        match std::panic::catch_unwind(&scenario) {
            Ok(()) => return,
            Err(p) => {
                if !rerun_in_rig(name, attempt, &*p) {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}

pub async fn boot() -> Sandbox {
    boot_with(|| Sandbox::builder().memory_mib(256).cpus(1)).await
}

/// Logs to stderr at the level `MSB_LOG` names (default: warnings), once per process.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MSB_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    });
}
