//! The VM: KVM fd, in-kernel irqchip and PIT, guest memory slots, ioeventfds and irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::{kvm_err, memory, Error, Result};

/// Most vCPUs a sandbox may have.
pub const MAX_VCPUS: u8 = 8;

/// What the VM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
}

impl VmConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("{} vCPUs is outside 1..={MAX_VCPUS}", self.vcpus)));
        }
        memory::ram_ranges(self.memory_mib).map(|_| ())
    }
}

/// A created VM with its memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    config: VmConfig,
}

impl Vm {
    pub fn new(config: VmConfig) -> Result<Self> {
        config.validate()?;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(0xfffb_d000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let mem = memory::create(config.memory_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let host =
                region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|e| Error::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host+len` is a live anonymous mapping owned by `mem`, which this
            // `Vm` keeps alive for as long as the VM fd (and so the slot) exists; slots do not
            // overlap because vm-memory rejects overlapping regions.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { kvm, fd, mem, config })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// This process's resident memory, split at guest RAM.
    pub fn resident(&self) -> memory::Resident {
        memory::resident(&self.mem)
    }

    pub fn config(&self) -> VmConfig {
        self.config
    }

    pub(crate) fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Routes writes of `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("KVM_IRQFD"))
    }

    /// Signals `evt` when the guest writes the 32-bit value `value` to MMIO address `addr`,
    /// without an exit to user space.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<()> {
        self.fd.register_ioevent(evt, &IoEventAddress::Mmio(addr), value).map_err(kvm_err("KVM_IOEVENTFD"))
    }
}
