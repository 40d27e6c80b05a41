//! Firecracker-style boot timer: the guest's init writes one byte to this MMIO page and the
//! VMM records the time since its own process start. Only the first write counts.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use msb_hypervisor::VcpuStop;

use crate::BusDevice;

pub struct BootTimer {
    start: Instant,
    hit: OnceLock<Duration>,
}

impl BootTimer {
    /// `start` is when the clock started (the VMM process start, or the VM creation).
    pub fn new(start: Instant) -> Self {
        Self { start, hit: OnceLock::new() }
    }

    /// Time from `start` to the guest's first write, once it happened.
    pub fn elapsed(&self) -> Option<Duration> {
        self.hit.get().copied()
    }
}

impl BusDevice for BootTimer {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> Option<VcpuStop> {
        let now = self.start.elapsed();
        if self.hit.set(now).is_ok() {
            tracing::info!(ms = now.as_secs_f64() * 1e3, "guest init reached the boot timer");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_wins() {
        let t = BootTimer::new(Instant::now());
        assert_eq!(t.elapsed(), None);
        t.write(0, &[1]);
        let first = t.elapsed().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        t.write(0, &[1]);
        assert_eq!(t.elapsed(), Some(first));
    }
}
