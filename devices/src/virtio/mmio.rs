//! The virtio-mmio transport (version 2 register layout).
//!
//! Register state is touched by vCPU threads (through the bus) and queue state by the
//! device's actor shell; both go through the one `Mutex` that owns this struct. That lock is
//! internal to a single device, never shared with another component.
//!
//! Invariants: only 32-bit register accesses are honoured (others read as zero and are
//! ignored); feature negotiation only accepts offered bits and requires `VERSION_1`; queue
//! addresses and sizes can only change while the queue is not ready; `DRIVER_OK` with an
//! invalid ready queue, or any [`DeviceError`](super::DeviceError), marks the device "needs reset" and it is not
//! served again.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4d53_4221; // "!BSM"
pub const NOTIFY_OFFSET: u64 = 0x50;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device that failed (the guest broke its contract); the text says how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceFailed(pub String);

pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    irq: Arc<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    failure: Option<String>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `notify[i]` is signalled when the driver notifies queue `i` (by KVM through an
    /// ioeventfd, or by this transport when the write reaches user space).
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Arc<EventFd>, notify: Vec<Arc<EventFd>>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue max sizes are powers of two"))
            .collect::<Vec<_>>();
        assert_eq!(queues.len(), notify.len(), "one notify eventfd per queue");
        Self {
            device,
            mem,
            queues,
            notify,
            irq,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            failure: None,
        }
    }

    /// The driver has set `DRIVER_OK` and the device has not failed.
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.failure.is_none()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The device and its queues, for processing.
    pub fn parts(&mut self) -> (&mut D, &mut [Queue], &GuestMemoryMmap) {
        (&mut self.device, &mut self.queues, &self.mem)
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio irq: {e}");
        }
    }

    /// Runs one servicing round of the device: `f` gets the device, its queues and guest
    /// memory and returns what it did and whether the driver must be signalled. Nothing runs
    /// before `DRIVER_OK` (`Ok(None)`). A [`DeviceError`](super::DeviceError) fails the device;
    /// a failed device is never serviced again, and both come back as [`DeviceFailed`].
    pub fn service<T>(
        &mut self,
        f: impl FnOnce(&mut D, &mut [Queue], &GuestMemoryMmap) -> Result<(T, bool), super::DeviceError>,
    ) -> Result<Option<T>, DeviceFailed> {
        if let Some(why) = &self.failure {
            return Err(DeviceFailed(why.clone()));
        }
        if !self.is_active() {
            return Ok(None);
        }
        match f(&mut self.device, &mut self.queues, &self.mem) {
            Ok((done, signal)) => {
                if signal {
                    self.signal_used();
                }
                Ok(Some(done))
            }
            Err(e) => {
                let why = e.to_string();
                self.fail(why.clone());
                Err(DeviceFailed(why))
            }
        }
    }

    /// Marks the device failed: it reports "needs reset" and is not served again.
    pub fn fail(&mut self, why: String) {
        // Logged once: a guest can keep poking a failed device.
        if self.failure.is_none() {
            tracing::warn!(device = self.device.device_type(), "virtio device failed: {why}");
            self.failure = Some(why);
        }
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt_status |= INT_CONFIG;
        let _ = self.irq.write(1);
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        let undelivered = self.device.undelivered();
        if undelivered > 0 {
            return self.fail(format!(
                "driver reset the device with {undelivered} host bytes undelivered; they cannot be taken back"
            ));
        }
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= 0x100 {
            return self.device.read_config(offset - 0x100, data);
        }
        if data.len() != 4 {
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected().map_or(0, |q| q.max_size() as u32),
            0x44 => self.selected().map_or(0, |q| q.ready() as u32),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => 0, // config generation: config never changes
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 || data.len() != 4 {
            return; // config space is read-only for our devices
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let configurable = |q: &Queue| !q.ready();
        let queue_register = matches!(offset, 0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4);
        if queue_register && self.status & STATUS_DRIVER_OK != 0 {
            // Rings are validated once, at DRIVER_OK; re-arming a queue afterwards would serve
            // rings nobody checked. Only a full reset (status 0) may change them.
            let sel = self.queue_sel;
            return self.fail(format!("queue {sel}: register {offset:#x} written after DRIVER_OK (reset first)"));
        }
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                if self.status & STATUS_FEATURES_OK == 0 {
                    self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | ((v as u64) << shift);
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                let sel = self.queue_sel;
                let refused = match self.selected().filter(|q| configurable(q)) {
                    Some(q) => q.try_set_size(v.min(u16::MAX as u32 + 1) as u16).is_err(),
                    None => false,
                };
                if refused || v > u16::MAX as u32 {
                    self.fail(format!("queue {sel}: size {v} is not a power of two within the maximum"));
                }
            }
            0x44 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            NOTIFY_OFFSET => {
                if let Some(evt) = self.notify.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt_status &= !v,
            0x70 => self.write_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let (low, high) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                let (what, align) = match offset & !4 {
                    0x80 => ("descriptor table", 16),
                    0x90 => ("available ring", 2),
                    _ => ("used ring", 4),
                };
                // A misaligned address fails the device here (virtio-queue would drop it and
                // log a line per write, which a guest can repeat at will).
                if low.is_some_and(|l| l % align != 0) {
                    let sel = self.queue_sel;
                    return self.fail(format!("queue {sel}: {what} address {v:#x} is not {align}-byte aligned"));
                }
                if let Some(q) = self.selected().filter(|q| configurable(q)) {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(low, high),
                        0x90 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            return self.reset();
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if new & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                self.fail("driver set DRIVER_OK before FEATURES_OK".into());
            }
            for (i, q) in self.queues.iter().enumerate() {
                if !q.ready() {
                    continue;
                }
                let checked = check_rings(q, &self.mem);
                if let Err(why) = checked.and_then(|()| {
                    q.is_valid(&self.mem).then_some(()).ok_or_else(|| "rejected by virtio-queue".to_string())
                }) {
                    self.status = v;
                    self.fail(format!("queue {i} is not valid: {why}"));
                    return;
                }
            }
        }
        self.status = v | (self.status & STATUS_NEEDS_RESET);
    }
}

/// Checks a ready queue's rings against the split-ring rules (virtio 1.x §2.7): a power-of-two
/// size, the descriptor table 16-byte, the available ring 2-byte and the used ring 4-byte
/// aligned, each wholly inside guest RAM. Done here, with a reason, so that a bad ring fails
/// the device instead of making virtio-queue log a line per access.
fn check_rings(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
    use vm_memory::{GuestAddress, GuestMemory, Permissions};
    let size = u64::from(q.size());
    if size == 0 || !size.is_power_of_two() || size > u64::from(q.max_size()) {
        return Err(format!("size {size}"));
    }
    let rings = [
        ("descriptor table", q.desc_table(), 16, 16 * size),
        ("available ring", q.avail_ring(), 2, 6 + 2 * size),
        ("used ring", q.used_ring(), 4, 6 + 8 * size),
    ];
    for (what, addr, align, len) in rings {
        if addr % align != 0 {
            return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
        }
        let inside =
            usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, Permissions::ReadWrite));
        if !inside {
            return Err(format!("{what} at {addr:#x}+{len:#x} is outside guest memory"));
        }
    }
    Ok(())
}

/// A transport on the bus: the vCPU side of the device's lock.
pub struct MmioSlot<D>(pub Arc<std::sync::Mutex<MmioTransport<D>>>);

impl<D: VirtioDevice> crate::BusDevice for MmioSlot<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.0.lock() {
            Ok(mut t) => t.read(offset, data),
            Err(_) => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<msb_hypervisor::VcpuStop> {
        let mut t = self.0.lock().ok()?;
        t.write(offset, data);
        t.failure().map(|why| msb_hypervisor::VcpuStop::DeviceFailure(why.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use vm_memory::GuestAddress;

    pub(crate) fn w(t: &mut MmioTransport<impl VirtioDevice>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    pub(crate) fn r(t: &mut MmioTransport<impl VirtioDevice>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn transport() -> MmioTransport<Rng> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = || Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        MmioTransport::new(Rng, mem, evt(), vec![evt()])
    }

    #[test]
    fn a_reset_that_would_drop_host_bytes_fails_the_device_instead() {
        use crate::virtio::console::Console;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = || Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(Console::default(), mem, evt(), (0..4).map(|_| evt()).collect());
        init(&mut t, 16, 0x1000, 0x2000, 0x3000);
        // Nothing in flight: a reset is a reset.
        w(&mut t, 0x70, 0);
        assert!(t.failure().is_none());
        init(&mut t, 16, 0x1000, 0x2000, 0x3000);
        t.device_mut().queue_to_guest(b"hello").unwrap();
        w(&mut t, 0x70, 0);
        let why = t.failure().expect("the device failed").to_string();
        assert!(why.contains("5 host bytes undelivered"), "{why}");
        assert_eq!(t.device().pending_to_guest(), 5, "nothing was dropped silently");
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn service_runs_only_while_active_and_a_device_error_fails_the_device_for_good() {
        let mut t = transport();
        let ran = std::cell::Cell::new(0);
        let round = |_: &mut Rng, _: &mut [Queue], _: &GuestMemoryMmap| {
            ran.set(ran.get() + 1);
            Ok(((), false))
        };
        assert_eq!(t.service(round), Ok(None), "nothing runs before DRIVER_OK");
        init(&mut t, 16, 0x1000, 0x2000, 0x3000);
        assert!(t.is_active());
        assert_eq!(t.service(round), Ok(Some(())));
        let bad =
            |_: &mut Rng, _: &mut [Queue], _: &GuestMemoryMmap| -> Result<((), bool), super::super::DeviceError> {
                Err(super::super::DeviceError::BadQueue { queue: 0, what: "broken".into() })
            };
        assert_eq!(t.service(bad), Err(DeviceFailed("queue 0: broken".into())));
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(t.service(round), Err(DeviceFailed("queue 0: broken".into())), "never serviced again");
        assert_eq!(ran.get(), 1);
    }

    /// Drives the standard init sequence with the given queue addresses.
    pub(crate) fn init(t: &mut MmioTransport<impl VirtioDevice>, size: u32, desc: u64, avail: u64, used: u64) {
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        let nq = t.queues.len() as u32;
        for q in 0..nq {
            w(t, 0x30, q);
            w(t, 0x38, size);
            let off = q as u64 * 0x1000;
            w(t, 0x80, (desc + off) as u32);
            w(t, 0x90, (avail + off) as u32);
            w(t, 0xa0, (used + off) as u32);
            w(t, 0x44, 1);
        }
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    #[test]
    fn identity_and_negotiation() {
        let mut t = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), crate::virtio::TYPE_RNG);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 offered");
        // Unoffered feature bit: FEATURES_OK must not stick.
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 28);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        // Partial-width accesses are ignored.
        let mut b = [0xaau8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn good_init_activates_and_reset_clears() {
        let mut t = transport();
        init(&mut t, 16, 0x1000, 0x2000, 0x3000);
        assert!(t.is_active());
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x44), 1);
        w(&mut t, 0x70, 0);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, 0x44), 0, "reset unreadies queues");
    }

    #[test]
    fn rings_outside_memory_fail_the_device() {
        let mut t = transport();
        init(&mut t, 16, 0x1000, 0x2000, 0x7fff_0000);
        assert!(!t.is_active());
        assert!(t.failure().unwrap().contains("not valid"));
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_cannot_change_after_driver_ok() {
        // Re-arming: unready, point the rings elsewhere, ready again.
        for (reg, value) in [(0x44u64, 0u32), (0x80, 0x5000), (0x90, 0x5000), (0xa0, 0x5000), (0x38, 8)] {
            let mut t = transport();
            init(&mut t, 16, 0x1000, 0x2000, 0x3000);
            assert!(t.is_active());
            w(&mut t, 0x30, 0);
            w(&mut t, reg, value);
            assert!(!t.is_active(), "register {reg:#x} after DRIVER_OK");
            assert!(t.failure().unwrap().contains("after DRIVER_OK"), "{:?}", t.failure());
            assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        }
        // After a full reset the driver may configure again.
        let mut t = transport();
        init(&mut t, 16, 0x1000, 0x2000, 0x3000);
        w(&mut t, 0x70, 0);
        init(&mut t, 16, 0x4000, 0x5000, 0x6000);
        assert!(t.is_active());
    }

    #[test]
    fn misaligned_rings_fail_the_device_with_the_reason() {
        for (desc, avail, used, what) in [
            (0x1008, 0x2000, 0x3000, "descriptor table"),
            (0x1000, 0x2001, 0x3000, "available ring"),
            (0x1000, 0x2000, 0x3002, "used ring"),
        ] {
            let mut t = transport();
            init(&mut t, 16, desc, avail, used);
            assert!(!t.is_active());
            let why = t.failure().unwrap();
            assert!(why.contains(what) && why.contains("aligned"), "{why}");
        }
    }

    #[test]
    fn bogus_queue_size_is_rejected() {
        let mut t = transport();
        init(&mut t, 3, 0x1000, 0x2000, 0x3000); // not a power of two
        assert!(!t.is_active());
        let mut t = transport();
        init(&mut t, 4096, 0x1000, 0x2000, 0x3000); // above max
        assert!(!t.is_active());
    }

    #[test]
    fn notify_write_signals_the_queue_eventfd_and_unknown_queue_is_ignored() {
        let mut t = transport();
        w(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(t.notify[0].read().unwrap(), 1);
        w(&mut t, NOTIFY_OFFSET, 7);
        assert!(t.notify[0].read().is_err(), "no further signal");
    }
}
