//! Every named bound on traffic between components of a sandbox process, and between a
//! client and that process. ractor mailboxes are unbounded, so each data path is bounded by
//! one of these credits or caps; device-level bounds (descriptor chains, the console's own
//! buffers) live beside their cores in `msb-devices`, which cannot see this crate.

use std::time::Duration;

/// Guest-to-host agent-channel bytes the console shell hands the agent client before the
/// client credits them back ([`crate::agent::ToConsole::Credit`]); past it the shell stops
/// taking transmit buffers, which pushes back on the guest's writer.
pub const CREDIT_WINDOW: usize = 1024 * 1024;

/// Host-to-guest bytes the agent client hands the console shell that the guest has not yet
/// taken (below the device's own buffer limit, so the guest can never make it overflow).
pub const TO_GUEST_WINDOW: usize = 1024 * 1024;

/// Requests in flight on one sandbox's agent channel (agentd runs as many sessions). With
/// the protocol's per-exec windows this bounds what one sandbox's execs can make the host
/// hold: `MAX_PENDING * OUTPUT_WINDOW` of unread output.
pub const MAX_PENDING: usize = 256;

/// Stdin writes of one exec that may wait for guest credit; more are refused.
pub const MAX_PARKED_STDIN: usize = 4;

/// Host-to-guest frames (bytes) the agent client queues while the guest does not read its
/// channel; past it, signals and resizes are refused (stdin and acknowledgements are bounded
/// by their windows).
pub const MAX_OUTBOX: usize = 4 * 1024 * 1024;

/// How long a control client may leave exec output unread before the sandbox process
/// detaches it (the command runs on; its output goes to the exec log only).
pub const STALLED_CLIENT_DETACH: Duration = Duration::from_secs(30);

/// Stdin bytes one buffered exec may carry.
pub const MAX_STDIN: usize = 64 * 1024 * 1024;

/// Output bytes (stdout plus stderr) one buffered exec keeps.
pub const MAX_BUFFERED_OUTPUT: usize = 64 * 1024 * 1024;

/// Guest-reported errors logged per sandbox (the guest can send them at will).
pub const MAX_GUEST_LOGS: u64 = 16;

/// Longest stdin chunk a client sends the sandbox process in one message.
pub const STDIN_CHUNK: usize = 64 * 1024;

/// Control connections one sandbox process serves at once; more are refused with why.
pub const MAX_CONNECTIONS: usize = 256;

/// Bytes the exec log of one sandbox grows to (the guest decides what its commands print).
pub const EXEC_LOG_CAP: u64 = 64 * 1024 * 1024;

/// Bytes the sandbox process's own log (`vmm.log`) grows to, across runs.
pub const VMM_LOG_CAP: u64 = 16 * 1024 * 1024;

/// How long a lifecycle request to a component (stop, wait for readiness, state) may take
/// before the caller treats the component as stuck.
pub const LIFECYCLE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// vCPUs a sandbox may have.
pub const VCPUS: std::ops::RangeInclusive<u8> = 1..=8;

/// Guest memory a sandbox may have, in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 64..=65536;

/// A machine size outside the sandbox limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0} vCPUs is outside what a sandbox may have ({min} to {max})", min = VCPUS.start(), max = VCPUS.end())]
    Vcpus(u8),
    #[error("{0} MiB of memory is outside what a sandbox may have ({min} to {max} MiB)", min = MEMORY_MIB.start(), max = MEMORY_MIB.end())]
    Memory(u64),
}

/// Checks a machine size against [`VCPUS`] and [`MEMORY_MIB`] (the one place that does).
pub fn check_size(vcpus: u8, memory_mib: u64) -> Result<(), SizeError> {
    if !VCPUS.contains(&vcpus) {
        return Err(SizeError::Vcpus(vcpus));
    }
    if !MEMORY_MIB.contains(&memory_mib) {
        return Err(SizeError::Memory(memory_mib));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_at_both_ends() {
        assert_eq!(check_size(1, 64), Ok(()));
        assert_eq!(check_size(8, 65536), Ok(()));
        assert_eq!(check_size(0, 256), Err(SizeError::Vcpus(0)));
        assert_eq!(check_size(9, 256), Err(SizeError::Vcpus(9)));
        assert_eq!(check_size(1, 63), Err(SizeError::Memory(63)));
        assert_eq!(check_size(1, 65537), Err(SizeError::Memory(65537)));
    }
}
