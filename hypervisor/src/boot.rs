//! Loading a guest: PVH `vmlinux` (or a bare-metal PVH test guest), or, as a fallback, a
//! bzImage through the 64-bit Linux boot protocol; then the initramfs, command line, PVH start
//! info or zero page with the memory map, and the MP table.
//!
//! Invariants: everything is written through vm-memory's bounds-checked accessors; the
//! initramfs is placed page-aligned at the top of low RAM and must not overlap the kernel;
//! the command line is at most [`CMDLINE_MAX`] bytes including its NUL.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::memory::*;
use crate::{mptable, Error, Result};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u8,
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, `rbx` = start info.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = zero page.
    Linux64(GuestAddress),
}

/// Where the guest starts, and where things were put.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: Entry,
    pub kernel_end: u64,
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Loads everything `spec` names into `mem`.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<Loaded> {
    let kernel_err = |reason: String| Error::Kernel { path: spec.kernel.display().to_string(), reason };
    let mut file = File::open(spec.kernel).map_err(|e| kernel_err(e.to_string()))?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut file, &mut magic).map_err(|e| kernel_err(e.to_string()))?;
    let is_elf = magic == *b"\x7fELF";
    let (entry, kernel_end, setup) = if is_elf {
        let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| kernel_err(format!("{e} (an uncompressed ELF vmlinux is needed)")))?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Entry::Pvh(addr),
            _ => return Err(kernel_err("the ELF has no PVH entry note; build it with CONFIG_PVH=y".into())),
        };
        (entry, res.kernel_load.0 + res.kernel_end, None)
    } else {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| kernel_err(format!("neither a PVH ELF vmlinux nor a bzImage: {e}")))?;
        let setup = res.setup_header.ok_or_else(|| kernel_err("bzImage without a setup header".into()))?;
        // startup_64 sits 0x200 bytes into the protected-mode kernel.
        (Entry::Linux64(GuestAddress(res.kernel_load.0 + 0x200)), res.kernel_load.0 + res.kernel_end, Some(setup))
    };
    let low_end = low_ram_end(mem);

    let initrd = match spec.initrd {
        None => None,
        Some(path) => Some(load_initrd(mem, path, kernel_end, low_end)?),
    };
    write_cmdline(mem, spec.cmdline)?;
    mptable::write(mem, spec.vcpus)?;
    match setup {
        None => write_start_info(mem, initrd)?,
        Some(hdr) => write_zero_page(mem, hdr, spec.cmdline.len(), initrd)?,
    }
    Ok(Loaded { entry, kernel_end, initrd })
}

/// The Linux boot protocol's zero page: the kernel's own setup header, completed by the
/// loader, and the e820 map.
fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: linux_loader::loader::bootparam::setup_header,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<()> {
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = 0xff; // "other"
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(Error::Boot(format!("{} memory map entries do not fit in the zero page", map.len())));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.type_ };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(|e| Error::Boot(format!("writing the zero page: {e}")))
}

fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, low_end: u64) -> Result<(GuestAddress, u64)> {
    let err = |reason: String| Error::Initrd { path: path.display().to_string(), reason };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let size = data.len() as u64;
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end).ok_or_else(|| {
        err(format!("{size} bytes do not fit between the kernel and the end of RAM; give the sandbox more memory"))
    })?;
    mem.write_slice(&data, GuestAddress(addr)).map_err(|e| err(e.to_string()))?;
    Ok((GuestAddress(addr), size))
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    if cmdline.len() + 1 > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(Error::Boot(format!(
            "kernel command line of {} bytes is longer than {} or contains NUL",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR)).map_err(|e| Error::Boot(format!("writing cmdline: {e}")))
}

/// The e820-style memory map handed to the guest.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_| hvm_memmap_table_entry { addr, size, type_, reserved: 0 };
    let mut map = vec![entry(0, EBDA_START, E820_RAM), entry(EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED)];
    for r in mem.iter() {
        let (start, end) = (r.start_addr().0, r.start_addr().0 + r.len());
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

fn write_start_info(mem: &GuestMemoryMmap, initrd: Option<(GuestAddress, u64)>) -> Result<()> {
    let werr = |what: &str, e: vm_memory::GuestMemoryError| Error::Boot(format!("writing {what}: {e}"));
    let map = memory_map(mem);
    for (i, e) in map.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64))
            .map_err(|e| werr("memory map", e))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry { paddr: addr.0, size, ..Default::default() };
        mem.write_obj(module, GuestAddress(MODLIST_ADDR)).map_err(|e| werr("module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR)).map_err(|e| werr("start info", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_skips_the_hole_and_low_gap() {
        let mem = create(5 * 1024).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0].addr, 0);
        assert_eq!(map[0].size, EBDA_START);
        assert_eq!(map[1].type_, E820_RESERVED);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3].addr, FOUR_GIB);
        let ram: u64 = map.iter().filter(|e| e.type_ == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (5u64 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn oversized_cmdline_and_missing_kernel_are_clear_errors() {
        let mem = create(64).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        assert!(write_cmdline(&mem, &long).unwrap_err().to_string().contains("longer than"));
        let spec = BootSpec { kernel: Path::new("/nonexistent/vmlinux"), initrd: None, cmdline: "", vcpus: 1 };
        let e = load(&mem, &spec).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem = create(32).unwrap();
        let dir = std::env::temp_dir().join(format!("msb-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 40 << 20]).unwrap();
        let e = load_initrd(&mem, &dir, 0x100_0000, low_ram_end(&mem)).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(e.contains("more memory"), "{e}");
    }
}
