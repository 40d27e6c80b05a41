//! Shared helpers of msb's test suites.

#![forbid(unsafe_code)]

pub mod dns;
pub mod netns;
pub mod tls_host;

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

/// Says, in the rig, that a flood scenario's nested guest triple-faulted or stalled: the
/// rig's known limit (README). The test still fails; `run-rig.sh` ends that L1 (a nested
/// triple fault damages it: the next floods stall and it resets itself) and runs the test
/// again in a fresh one, printed and counted. Nothing is rerun inside a test, and outside
/// the rig nothing is rerun at all, so the limit cannot hide a VMM bug on hardware KVM.
fn note_rig_limit(name: &str, payload: &(dyn std::any::Any + Send)) {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let known = msg.contains("TripleFault") || msg.contains("triple-faulted") || msg.contains("(sandbox stalled)");
    if in_rig() && known {
        eprintln!("E2E-RIG-LIMIT: {name}: the nested guest triple-faulted or stalled (known rig limit)");
    }
}

/// Runs a flood scenario (see `note_rig_limit`).
pub async fn rig_flood<F, Fut>(name: &str, scenario: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match tokio::spawn(scenario()).await {
        Ok(()) => {}
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            note_rig_limit(name, &*p);
            std::panic::resume_unwind(p);
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

/// The blocking form of [`rig_flood`], for tests that drive the CLI.
pub fn rig_flood_blocking(name: &str, scenario: impl Fn() + std::panic::RefUnwindSafe) {
    if let Err(p) = std::panic::catch_unwind(&scenario) {
        note_rig_limit(name, &*p);
        std::panic::resume_unwind(p);
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
