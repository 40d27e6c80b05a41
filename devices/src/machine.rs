//! Assembles one microVM: memory, irqchip, the bus with its devices, ioeventfds and irqfds,
//! the kernel command line, the loaded kernel and initramfs, and configured vCPUs. The
//! virtio devices come from the device table ([`crate::layout::VIRTIO_DEVICES`]), so their
//! slot, IRQ and command-line entry are written once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use msb_hypervisor::boot::{self, BootSpec};
use msb_hypervisor::vcpu::Vcpu;
use msb_hypervisor::{Vm, VmConfig};
use msb_protocol::{BOOT_TIMER_ADDR, MMIO_SLOT_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot_timer::BootTimer;
use crate::bus::BusError;
use crate::console_log::{ConsoleLog, ConsoleReports, DEFAULT_FILE_CAP};
use crate::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::layout::{VirtioKind, VirtioSlot, MAX_DISKS, MAX_FS, VIRTIO_DEVICES};
use crate::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::virtio::blk::Blk;
use crate::virtio::console::Console;
use crate::virtio::fs::{Fs, Tag};
use crate::virtio::mmio::{MmioSlot, NOTIFY_OFFSET};
use crate::virtio::net::Net;
use crate::virtio::rng::Rng;
use crate::virtio::{MmioTransport, VirtioDevice};
use crate::Bus;

/// The kernel command line every sandbox gets (devices are appended).
/// `reboot=k` makes a guest reboot (and, with `panic=-1`, a panic) reach the i8042 reset line.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Why a VM could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Hypervisor(#[from] msb_hypervisor::Error),
    #[error("device layout")]
    Bus(#[from] BusError),
    #[error("a sandbox has at most {MAX_DISKS} disks, not {0}")]
    TooManyDisks(usize),
    #[error("a sandbox has at most {MAX_FS} shared directories, not {0}")]
    TooManyMounts(usize),
    #[error("opening disk {}", .path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, MachineError>;

/// Everything needed to boot.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub console_log: Option<PathBuf>,
    pub extra_cmdline: String,
    /// The sandbox's disks, in order (at most [`MAX_DISKS`]; the guest names them by their
    /// serial, `msb-image` for a read-only one and `msb-root` for a writable one).
    pub disks: Vec<DiskSpec>,
    /// The guest's MAC address when it has a network device; `None`: no network device at
    /// all (`--net none`).
    pub net: Option<[u8; 6]>,
    /// The tags of the sandbox's shared directories, in order (at most [`MAX_FS`]); one
    /// virtio-fs device each.
    pub mounts: Vec<Tag>,
}

/// One disk: a host file, and whether the guest may write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a device shell needs: the transport (registers and queues) and the queue-notify
/// eventfds it watches.
pub struct Virtio<D> {
    pub transport: Arc<Mutex<MmioTransport<D>>>,
    pub notify: Vec<Arc<EventFd>>,
}

/// One built virtio device, by kind.
pub enum VirtioParts {
    Console(Virtio<Console>),
    Rng(Virtio<Rng>),
    Blk(Virtio<Blk>),
    Net(Virtio<Net>),
    Fs(Virtio<Fs>),
}

/// A built, not yet running, VM.
pub struct Machine {
    pub vm: Vm,
    pub bus: Arc<Bus>,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<SerialDevice>,
    pub reports: Arc<ConsoleReports>,
    pub boot_timer: Arc<BootTimer>,
    /// One entry per row of the device table, in its order.
    pub virtio: Vec<VirtioParts>,
    pub cmdline: String,
}

fn evt() -> Result<Arc<EventFd>> {
    EventFd::new(EFD_NONBLOCK).map(Arc::new).map_err(|source| MachineError::Io { what: "creating an eventfd", source })
}

fn virtio<D: VirtioDevice + 'static>(vm: &Vm, bus: &mut Bus, at: &VirtioSlot, dev: D) -> Result<Virtio<D>> {
    let base = at.base();
    let irq_evt = evt()?;
    vm.register_irqfd(&irq_evt, at.irq)?;
    let notify = (0..dev.queue_max_sizes().len()).map(|_| evt()).collect::<Result<Vec<_>>>()?;
    for (q, n) in notify.iter().enumerate() {
        vm.register_mmio_ioevent(n, base + NOTIFY_OFFSET, q as u32)?;
    }
    let transport = Arc::new(Mutex::new(MmioTransport::new(dev, vm.memory().clone(), irq_evt, notify.clone())));
    bus.add_mmio(base, MMIO_SLOT_SIZE, Arc::new(MmioSlot(transport.clone())))?;
    Ok(Virtio { transport, notify })
}

impl Machine {
    pub fn build(spec: &MachineSpec, clock_start: Instant) -> Result<Self> {
        if spec.disks.len() > MAX_DISKS {
            return Err(MachineError::TooManyDisks(spec.disks.len()));
        }
        if spec.mounts.len() > MAX_FS {
            return Err(MachineError::TooManyMounts(spec.mounts.len()));
        }
        let vm = Vm::new(VmConfig { vcpus: spec.vcpus, memory_mib: spec.memory_mib })?;
        let mut bus = Bus::new();

        let log = ConsoleLog::new(spec.console_log.as_deref(), DEFAULT_FILE_CAP)
            .map_err(|source| MachineError::Io { what: "opening the console log", source })?
            .with_timestamps();
        let reports = log.reports();
        let serial_irq = evt()?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = Arc::new(SerialDevice::new(serial_irq, log));
        bus.add_pio(COM1_BASE, COM1_LEN, serial.clone())?;
        bus.add_pio(I8042_BASE, I8042_LEN, Arc::new(I8042))?;
        let boot_timer = Arc::new(BootTimer::new(clock_start));
        bus.add_mmio(BOOT_TIMER_ADDR, 0x1000, boot_timer.clone())?;

        let mut cmdline = String::from(BASE_CMDLINE);
        let mut devices = Vec::with_capacity(VIRTIO_DEVICES.len());
        for at in VIRTIO_DEVICES {
            devices.push(match at.kind {
                VirtioKind::Console => VirtioParts::Console(virtio(&vm, &mut bus, at, Console::default())?),
                VirtioKind::Rng => VirtioParts::Rng(virtio(&vm, &mut bus, at, Rng)?),
                VirtioKind::Blk(n) => {
                    let Some(disk) = spec.disks.get(usize::from(n)) else { continue };
                    let blk = Blk::open(&disk.path, disk.read_only)
                        .map_err(|source| MachineError::Disk { path: disk.path.clone(), source })?;
                    VirtioParts::Blk(virtio(&vm, &mut bus, at, blk)?)
                }
                VirtioKind::Net => {
                    let Some(mac) = spec.net else { continue };
                    VirtioParts::Net(virtio(&vm, &mut bus, at, Net::new(mac))?)
                }
                VirtioKind::Fs(n) => {
                    let Some(tag) = spec.mounts.get(usize::from(n)) else { continue };
                    VirtioParts::Fs(virtio(&vm, &mut bus, at, Fs::new(tag.clone()))?)
                }
            });
            cmdline.push(' ');
            cmdline.push_str(&at.cmdline());
        }
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
        Ok(Self { vm, bus: Arc::new(bus), vcpus, serial, reports, boot_timer, virtio: devices, cmdline })
    }
}
