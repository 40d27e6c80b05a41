//! The port-I/O and MMIO bus: maps address ranges to devices and implements the
//! hypervisor's [`ExitHandler`]. Built once before the vCPUs start; immutable afterwards.

use std::sync::Arc;

use msb_hypervisor::{ExitHandler, VcpuStop};

/// A device on the bus. Offsets are relative to the device's base.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    /// `Some` stops the vCPU that did the write.
    fn write(&self, offset: u64, data: &[u8]) -> Option<VcpuStop>;
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<dyn BusDevice>,
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap { base: u64, len: u64 },
}

#[derive(Default)]
pub struct Bus {
    pio: Vec<Range>,
    mmio: Vec<Range>,
}

fn insert(v: &mut Vec<Range>, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
    let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Overlap { base, len })?;
    if v.iter().any(|r| base < r.base + r.len && r.base < end) {
        return Err(BusError::Overlap { base, len });
    }
    v.push(Range { base, len, dev });
    v.sort_by_key(|r| r.base);
    Ok(())
}

fn find(v: &[Range], addr: u64, size: usize) -> Option<(&Range, u64)> {
    let i = v.partition_point(|r| r.base <= addr).checked_sub(1)?;
    let r = &v[i];
    let off = addr - r.base;
    (off + size as u64 <= r.len).then_some((r, off))
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_pio(&mut self, base: u16, len: u16, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
        insert(&mut self.pio, base as u64, len as u64, dev)
    }

    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
        insert(&mut self.mmio, base, len, dev)
    }
}

impl ExitHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match find(&self.pio, port as u64, data.len()) {
            Some((r, off)) => r.dev.read(off, data),
            // Unclaimed ports float high, so probes of absent hardware fail fast.
            None => data.fill(0xff),
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Option<VcpuStop> {
        find(&self.pio, port as u64, data.len()).and_then(|(r, off)| r.dev.write(off, data))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match find(&self.mmio, addr, data.len()) {
            Some((r, off)) => r.dev.read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<VcpuStop> {
        find(&self.mmio, addr, data.len()).and_then(|(r, off)| r.dev.write(off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Rec {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) -> Option<VcpuStop> {
            self.0.lock().unwrap().push((offset, data.to_vec()));
            None
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let a = Arc::new(Rec::default());
        bus.add_mmio(0x1000, 0x100, a.clone()).unwrap();
        assert!(bus.add_mmio(0x10ff, 0x10, a.clone()).is_err(), "overlap");
        assert!(bus.add_mmio(0x2000, 0, a.clone()).is_err(), "empty");
        let mut d = [0u8; 4];
        bus.mmio_read(0x1010, &mut d);
        assert_eq!(d, [0x10; 4]);
        bus.mmio_read(0x10fe, &mut d);
        assert_eq!(d, [0xff; 4], "access straddling the end is unclaimed");
        bus.mmio_read(0xfff, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.mmio_write(0x1004, &[1, 2]);
        assert_eq!(a.0.lock().unwrap().as_slice(), &[(4, vec![1, 2])]);
        let mut p = [0u8; 1];
        bus.pio_read(0x80, &mut p);
        assert_eq!(p, [0xff]);
    }
}
