//! A 16550A UART at 0x3f8 (vm-superio), interrupting through an irqfd, writing into a
//! [`ConsoleLog`]. Guest input is not wired: the console is output-only.

use std::sync::{Arc, Mutex};

use msb_hypervisor::VcpuStop;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console_log::ConsoleLog;
use crate::BusDevice;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    inner: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleLog>>,
}

impl SerialDevice {
    pub fn new(irq: Arc<EventFd>, log: ConsoleLog) -> Self {
        Self { inner: Mutex::new(Serial::new(IrqTrigger(irq), log)) }
    }

    /// The last bytes the guest printed.
    pub fn tail(&self) -> String {
        self.inner.lock().map(|s| s.writer().tail()).unwrap_or_default()
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let Ok(mut s) = self.inner.lock() else {
            return data.fill(0xff);
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = s.read(offset as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VcpuStop> {
        let mut s = self.inner.lock().ok()?;
        if let Some(&b) = data.first() {
            if let Err(e) = s.write(offset as u8, b) {
                tracing::debug!("serial write: {e:?}");
            }
        }
        s.writer_mut().take_halt().then_some(VcpuStop::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_log_and_halt_stops() {
        let irq = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let dev = SerialDevice::new(irq, ConsoleLog::new(None, 0).unwrap());
        for b in b"hello\n" {
            assert_eq!(dev.write(0, &[*b]), None);
        }
        assert_eq!(dev.tail(), "hello\n");
        let mut stop = None;
        for b in b"reboot: System halted\n" {
            stop = dev.write(0, &[*b]);
        }
        assert_eq!(stop, Some(VcpuStop::PowerOff));
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }
}
