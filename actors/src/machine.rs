//! Assembles one microVM: memory, irqchip, the bus with its devices, ioeventfds and irqfds,
//! the kernel command line, the loaded kernel and initramfs, and configured vCPUs.
//!
//! Device map (fixed; see `msb_protocol` for the guest-visible addresses):
//! COM1 0x3f8 IRQ 4; i8042 0x60/0x64; boot timer MMIO `BOOT_TIMER_ADDR`;
//! virtio-console at slot 0 IRQ 5; virtio-rng at slot 1 IRQ 6.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use msb_devices::boot_timer::BootTimer;
use msb_devices::console_log::{ConsoleLog, ConsoleReports, DEFAULT_FILE_CAP};
use msb_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use msb_devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use msb_devices::virtio::console::Console;
use msb_devices::virtio::mmio::{MmioSlot, NOTIFY_OFFSET};
use msb_devices::virtio::rng::Rng;
use msb_devices::virtio::{MmioTransport, VirtioDevice};
use msb_devices::Bus;
use msb_hypervisor::boot::{self, BootSpec};
use msb_hypervisor::vcpu::Vcpu;
use msb_hypervisor::{Vm, VmConfig};
use msb_protocol::{BOOT_TIMER_ADDR, MMIO_SLOT_SIZE, VIRTIO_MMIO_BASE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// The kernel command line every sandbox gets (devices are appended).
/// `reboot=k` makes a guest reboot (and, with `panic=-1`, a panic) reach the i8042 reset line.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Everything needed to boot.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub console_log: Option<PathBuf>,
    pub extra_cmdline: String,
}

pub struct VirtioParts<D> {
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    pub notify: Vec<Arc<EventFd>>,
}

/// A built, not yet running, VM.
pub struct Machine {
    pub vm: Vm,
    pub bus: Arc<Bus>,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<SerialDevice>,
    pub reports: Arc<ConsoleReports>,
    pub boot_timer: Arc<BootTimer>,
    pub console: VirtioParts<Console>,
    pub rng: VirtioParts<Rng>,
    pub cmdline: String,
}

fn evt() -> Result<Arc<EventFd>> {
    EventFd::new(EFD_NONBLOCK).map(Arc::new).map_err(|e| Error::Setup(format!("eventfd: {e}")))
}

fn virtio<D: VirtioDevice + 'static>(vm: &Vm, bus: &mut Bus, slot: u64, irq: u32, dev: D) -> Result<VirtioParts<D>> {
    let base = VIRTIO_MMIO_BASE + slot * MMIO_SLOT_SIZE;
    let irq_evt = evt()?;
    vm.register_irqfd(&irq_evt, irq)?;
    let notify = (0..dev.queue_max_sizes().len()).map(|_| evt()).collect::<Result<Vec<_>>>()?;
    for (q, n) in notify.iter().enumerate() {
        vm.register_mmio_ioevent(n, base + NOTIFY_OFFSET, q as u32)?;
    }
    let transport = Arc::new(Mutex::new(MmioTransport::new(dev, vm.memory().clone(), irq_evt, notify.clone())));
    bus.add_mmio(base, MMIO_SLOT_SIZE, Arc::new(MmioSlot(transport.clone())))
        .map_err(|e| Error::Setup(e.to_string()))?;
    Ok(VirtioParts { transport, notify })
}

fn slot_arg(slot: u64, irq: u32) -> String {
    format!(" virtio_mmio.device=4K@{:#x}:{irq}", VIRTIO_MMIO_BASE + slot * MMIO_SLOT_SIZE)
}

impl Machine {
    pub fn build(spec: &MachineSpec, clock_start: Instant) -> Result<Self> {
        let vm = Vm::new(VmConfig { vcpus: spec.vcpus, memory_mib: spec.memory_mib })?;
        let mut bus = Bus::new();
        let setup = |e: msb_devices::bus::BusError| Error::Setup(e.to_string());

        let log = ConsoleLog::new(spec.console_log.as_deref(), DEFAULT_FILE_CAP)
            .map_err(|e| Error::Setup(format!("console log: {e}")))?
            .with_timestamps();
        let reports = log.reports();
        let serial_irq = evt()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = Arc::new(SerialDevice::new(serial_irq, log));
        bus.add_pio(COM1_BASE, COM1_LEN, serial.clone()).map_err(setup)?;
        bus.add_pio(I8042_BASE, I8042_LEN, Arc::new(I8042)).map_err(setup)?;
        let boot_timer = Arc::new(BootTimer::new(clock_start));
        bus.add_mmio(BOOT_TIMER_ADDR, 0x1000, boot_timer.clone()).map_err(setup)?;

        let console = virtio(&vm, &mut bus, 0, 5, Console::default())?;
        let rng = virtio(&vm, &mut bus, 1, 6, Rng)?;
        let mut cmdline = String::from(BASE_CMDLINE);
        cmdline.push_str(&slot_arg(0, 5));
        cmdline.push_str(&slot_arg(1, 6));
        if !spec.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.extra_cmdline);
        }

        let loaded = boot::load(
            vm.memory(),
            &BootSpec { kernel: &spec.kernel, initrd: Some(&spec.initramfs), cmdline: &cmdline, vcpus: spec.vcpus },
        )?;
        let vcpus =
            (0..spec.vcpus).map(|id| Vcpu::new(&vm, id, loaded.entry)).collect::<msb_hypervisor::Result<Vec<_>>>()?;
        Ok(Self { vm, bus: Arc::new(bus), vcpus, serial, reports, boot_timer, console, rng, cmdline })
    }
}
