//! vCPU configuration for PVH entry and the runner thread.
//!
//! Each vCPU runs `KVM_RUN` on its own OS thread. Port and MMIO exits are dispatched
//! synchronously to an [`ExitHandler`] (the device bus). The thread ends, reporting a
//! [`VcpuStop`], when the guest resets, triple-faults, hits a KVM error, or when the host
//! asks it to stop ([`VcpuRunner::stop`] sets a flag and kicks the thread out of
//! `KVM_RUN` with a signal until it notices).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::Entry;
use crate::memory::{GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR};
use crate::{kvm_err, Error, Result, Vm};

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (i8042 0xFE): reboot, or a panic with `panic=-1`.
    Reset,
    /// The guest said it halted or powered off (seen by a device, e.g. on its console).
    PowerOff,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    TripleFault,
    /// `KVM_EXIT_INTERNAL_ERROR` (for example an instruction KVM could not emulate).
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    EntryFailure(u64),
    /// `KVM_EXIT_SYSTEM_EVENT` of this type.
    SystemEvent(u32),
    /// The host asked the vCPU to stop.
    Requested,
    /// A device refused to go on (the guest broke a device contract); says which and why.
    DeviceFailure(String),
    /// Any other exit or ioctl error; the VM cannot safely continue.
    Error(String),
}

/// Handles the exits that need user space. Called from vCPU threads, concurrently.
pub trait ExitHandler: Send + Sync + 'static {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// Returning `Some` stops this vCPU with that reason.
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<VcpuStop>;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<VcpuStop>;
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Flat 32-bit GDT for PVH entry: null, code, data, TSS.
const GDT: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
/// Flat GDT for 64-bit entry: null, 64-bit code, data, TSS.
const GDT64: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];

impl Vcpu {
    /// Creates vCPU `id` and prepares it for `entry` (only vCPU 0 gets registers; the others
    /// wait for the guest's INIT/SIPI).
    pub fn new(vm: &Vm, id: u8, entry: Entry) -> Result<Self> {
        let fd = vm.fd().create_vcpu(id as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let vcpu = Self { fd, id };
        vcpu.set_cpuid(vm)?;
        vcpu.set_msrs()?;
        vcpu.set_fpu()?;
        vcpu.set_lapic()?;
        if id == 0 {
            match entry {
                Entry::Pvh(at) => vcpu.set_boot_registers(vm, at)?,
                Entry::Linux64(at) => vcpu.set_long_mode_registers(vm, at)?,
            }
        }
        Ok(vcpu)
    }

    fn set_cpuid(&self, vm: &Vm) -> Result<()> {
        let mut cpuid: CpuId =
            vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpus = vm.config().vcpus as u32;
        let tsc_deadline = vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ecx |= 1 << 31; // hypervisor present: use kvm-clock, skip PIT calibration
                    if tsc_deadline {
                        // The in-kernel LAPIC emulates the TSC-deadline timer; with it the guest
                        // needs no LAPIC timer calibration against the PIT.
                        e.ecx |= 1 << 24;
                    }
                    e.ebx = (e.ebx & 0x0000_ffff) | (cpus << 16) | ((self.id as u32) << 24);
                }
                0xb | 0x1f => e.edx = self.id as u32,
                _ => {}
            }
        }
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self) -> Result<()> {
        let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_STAR, 0),
            entry(MSR_CSTAR, 0),
            entry(MSR_KERNEL_GS_BASE, 0),
            entry(MSR_SYSCALL_MASK, 0),
            entry(MSR_LSTAR, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, 1),
            entry(MSR_MTRR_DEF_TYPE, 0x806),
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(Error::Config(format!("KVM accepted only {set} of {} boot MSRs", entries.len())));
        }
        Ok(())
    }

    fn set_fpu(&self) -> Result<()> {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
    }

    /// LVT0 = ExtINT and LVT1 = NMI, so PIC interrupts reach the guest in virtual-wire mode.
    fn set_lapic(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(0x350usize, 0b111u32), (0x360, 0b100)] {
            let mut raw = [0u8; 4];
            for (i, b) in raw.iter_mut().enumerate() {
                *b = lapic.regs[offset + i] as u8;
            }
            let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
    }

    /// Writes `gdt` (null, code, data, TSS) and returns sregs with flat segments loaded from
    /// it; `long` selects a 64-bit code segment. Control registers are the caller's.
    fn flat_segments(&self, vm: &Vm, gdt: &[u64; 4], long: bool) -> Result<kvm_sregs> {
        use vm_memory::Bytes;
        for (i, d) in gdt.iter().enumerate() {
            vm.memory()
                .write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
                .map_err(|e| Error::Boot(format!("writing GDT: {e}")))?;
        }
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let seg = |selector: u16, type_: u8, s: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = if long { kvm_segment { l: 1, db: 0, ..seg(0x08, 0xb, 1) } } else { seg(0x08, 0xb, 1) };
        let data = seg(0x10, 0x3, 1);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment { limit: 0x67, db: 0, g: 0, ..seg(0x18, 0xb, 0) };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        Ok(sregs)
    }

    /// 32-bit protected mode, paging off, flat segments, `rbx` = PVH start info.
    fn set_boot_registers(&self, vm: &Vm, entry: GuestAddress) -> Result<()> {
        let mut sregs = self.flat_segments(vm, &GDT, false)?;
        sregs.cr0 = 0x11; // PE | ET; caching enabled (reset value has CD|NW)
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_regs { rflags: 0x2, rip: entry.0, rbx: PVH_INFO_ADDR, ..Default::default() };
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// 64-bit long mode with the first 1 GiB identity-mapped, `rsi` = zero page: the state the
    /// Linux boot protocol's 64-bit entry expects.
    fn set_long_mode_registers(&self, vm: &Vm, entry: GuestAddress) -> Result<()> {
        use vm_memory::Bytes;
        let mem = vm.memory();
        let werr = |e: vm_memory::GuestMemoryError| Error::Boot(format!("writing boot page tables: {e}"));
        mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR)).map_err(werr)?;
        mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR)).map_err(werr)?;
        for i in 0..512u64 {
            // 2 MiB pages: present, writable, page size.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8)).map_err(werr)?;
        }
        let mut sregs = self.flat_segments(vm, &GDT64, true)?;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 0x20; // PAE
        sregs.cr0 = 0x8000_0011; // PG | ET | PE
        sregs.efer = 0x500; // LME | LMA
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs =
            kvm_regs { rflags: 0x2, rip: entry.0, rsp: 0x8ff0, rbp: 0x8ff0, rsi: ZERO_PAGE_ADDR, ..Default::default() };
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    pub fn id(&self) -> u8 {
        self.id
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| Error::Thread(format!("installing the vCPU kick signal handler: {e}")));
    });
    result
}

/// The ioctls a vCPU thread makes once it runs, by name and request number: `KVM_RUN`, and
/// the register reads of the triple-fault report (`log_shutdown_state`). The sandbox
/// process's per-vCPU seccomp filter allows exactly these.
pub const THREAD_IOCTLS: [(&str, u64); 3] =
    [("KVM_RUN", 0xAE80), ("KVM_GET_REGS", 0x8090_AE81), ("KVM_GET_SREGS", 0x8138_AE83)];

/// What each vCPU thread runs first, before its first `KVM_RUN` (the sandbox process's
/// per-thread seccomp filter); set at most once per process.
static THREAD_START: std::sync::OnceLock<Box<dyn Fn() -> std::result::Result<(), String> + Send + Sync>> =
    std::sync::OnceLock::new();

/// Sets what every vCPU thread started from now on runs on itself before it enters the guest.
/// If it fails, that vCPU stops with the error and never runs guest code. Returns `false`
/// (and changes nothing) if one was set already.
pub fn on_vcpu_thread_start(f: impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static) -> bool {
    THREAD_START.set(Box::new(f)).is_ok()
}

/// A running vCPU thread.
pub struct VcpuRunner {
    id: u8,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuRunner {
    /// Starts `vcpu` on its own thread; `on_exit` is called once, on that thread, with the
    /// reason it stopped.
    pub fn spawn(
        mut vcpu: Vcpu,
        handler: Arc<dyn ExitHandler>,
        on_exit: Box<dyn FnOnce(VcpuStop) + Send>,
    ) -> Result<Self> {
        install_kick_handler()?;
        let stop = Arc::new(AtomicBool::new(false));
        let id = vcpu.id;
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Some(Err(e)) = THREAD_START.get().map(|f| f()) {
                    on_exit(VcpuStop::Error(format!("vCPU {id} could not be confined: {e}")));
                    return;
                }
                let reason = run_loop(&mut vcpu.fd, &*handler, &flag);
                tracing::debug!(vcpu = id, ?reason, "vCPU stopped");
                on_exit(reason);
            })
            .map_err(|e| Error::Thread(format!("spawning vCPU {id}: {e}")))?;
        Ok(Self { id, stop, thread: Some(thread) })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Asks the vCPU to stop and waits until its thread has ended.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The signal only interrupts KVM_RUN if it arrives while the thread is inside it,
            // so keep kicking until the thread notices the flag.
            while !thread.is_finished() {
                let _ = thread.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = thread.join();
        }
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_loop(fd: &mut VcpuFd, handler: &dyn ExitHandler, stop: &AtomicBool) -> VcpuStop {
    loop {
        if stop.load(Ordering::SeqCst) {
            return VcpuStop::Requested;
        }
        let exit = match fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return VcpuStop::Error(format!("KVM_RUN failed: {e}")),
        };
        let outcome = match exit {
            VcpuExit::IoIn(port, data) => {
                handler.pio_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => handler.pio_write(port, data),
            VcpuExit::MmioRead(addr, data) => {
                handler.mmio_read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => handler.mmio_write(addr, data),
            VcpuExit::Shutdown => Some(VcpuStop::TripleFault),
            VcpuExit::InternalError => Some(VcpuStop::InternalError),
            VcpuExit::FailEntry(reason, _) => Some(VcpuStop::EntryFailure(reason)),
            VcpuExit::SystemEvent(kind, _) => Some(VcpuStop::SystemEvent(kind)),
            VcpuExit::Hlt => Some(VcpuStop::PowerOff),
            other => Some(VcpuStop::Error(format!("unexpected vCPU exit {other:?}"))),
        };
        if let Some(reason) = outcome {
            if matches!(reason, VcpuStop::TripleFault) {
                log_shutdown_state(fd);
            }
            return reason;
        }
    }
}

/// Logs where the vCPU was when KVM reported a shutdown (a triple fault), so that one seen in
/// the field can be told apart: a guest kernel bug (a sane RIP in the kernel), or a broken
/// nested hypervisor (garbage control registers).
fn log_shutdown_state(fd: &kvm_ioctls::VcpuFd) {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => tracing::warn!(
            rip = format_args!("{:#x}", r.rip),
            rsp = format_args!("{:#x}", r.rsp),
            rflags = format_args!("{:#x}", r.rflags),
            cr0 = format_args!("{:#x}", s.cr0),
            cr2 = format_args!("{:#x}", s.cr2),
            cr3 = format_args!("{:#x}", s.cr3),
            cr4 = format_args!("{:#x}", s.cr4),
            efer = format_args!("{:#x}", s.efer),
            idt = format_args!("{:#x}+{:#x}", s.idt.base, s.idt.limit),
            "vCPU shut down (triple fault)"
        ),
        (r, s) => tracing::warn!("vCPU shut down (triple fault); registers unreadable: {:?} {:?}", r.err(), s.err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOR(KVMIO, nr, size)`.
    fn ior(nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
    }

    #[test]
    fn the_thread_ioctl_numbers_are_the_kernels() {
        assert_eq!(THREAD_IOCTLS[0].1, (0xAE << 8) | 0x80);
        assert_eq!(THREAD_IOCTLS[1].1, ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()));
        assert_eq!(THREAD_IOCTLS[2].1, ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()));
    }
}
