//! Guest physical layout and guest memory creation.
//!
//! Layout (x86_64, no PCI, no ACPI):
//! - `0x500` GDT, `0x6000` PVH start info, `0x6040` module list, `0x6100` memory map,
//!   `0x7000` bzImage zero page, `0x9000..0xc000` bzImage identity page tables,
//!   `0x20000` kernel command line, `0x9fc00..0xa0000` MP table (the last KiB of base memory);
//! - RAM is `[0, EBDA_START)` plus `[1 MiB, min(size, MMIO_HOLE_START))`, and anything beyond
//!   the hole continues at 4 GiB;
//! - `[MMIO_HOLE_START, 4 GiB)` holds device MMIO (boot timer and virtio-mmio slots from
//!   `0xd000_0000`), the IOAPIC and the LAPIC.
//!
//! Invariant: guest memory is mapped `MAP_NORESERVE | MAP_PRIVATE | MAP_ANONYMOUS` (vm-memory's
//! anonymous regions), so the configured size is a limit, and host RSS grows only with pages
//! the guest (or a loader) touches.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

pub const GDT_ADDR: u64 = 0x500;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const MODLIST_ADDR: u64 = 0x6040;
pub const MEMMAP_ADDR: u64 = 0x6100;
/// Linux boot protocol (bzImage) zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity-mapping page tables for a 64-bit bzImage entry: PML4, PDPT, PD (first 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest kernel command line accepted, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB, where RAM continues above the hole.
pub const FOUR_GIB: u64 = 1 << 32;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Smallest and largest guest RAM this layout supports. What a sandbox may have is narrower
/// (`msb_schema::limits::MEMORY_MIB`, which a test keeps within these).
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// This process's resident memory, split into the part backing guest RAM and the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resident {
    pub total_kib: u64,
    /// Resident pages of mappings that overlap guest RAM (an upper bound: the kernel may
    /// merge the guest mapping with a neighbouring anonymous one).
    pub guest_kib: u64,
}

impl Resident {
    /// What the VMM itself holds.
    pub fn outside_guest_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_kib)
    }
}

/// Reads `/proc/self/smaps` and splits its resident memory at `mem`'s mappings. Host
/// addresses of guest RAM stay inside this crate.
pub fn resident(mem: &GuestMemoryMmap) -> Resident {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    let ranges: Vec<(usize, usize)> = mem
        .iter()
        .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok().map(|p| (p as usize, r.len() as usize)))
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    split_smaps(&smaps, &ranges)
}

fn split_smaps(smaps: &str, guest: &[(usize, usize)]) -> Resident {
    let mut out = Resident::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !line.ends_with("kB")) {
            let (a, b) = (usize::from_str_radix(a, 16).unwrap_or(0), usize::from_str_radix(b, 16).unwrap_or(0));
            in_guest = guest.iter().any(|&(s, l)| a < s.saturating_add(l) && s < b);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let rss: u64 = rest.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            out.total_kib += rss;
            if in_guest {
                out.guest_kib += rss;
            }
        }
    }
    out
}

/// The RAM ranges (start, length) for a guest of `mib` MiB.
pub fn ram_ranges(mib: u64) -> Result<Vec<(GuestAddress, usize)>> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(Error::Config(format!("memory of {mib} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")));
    }
    let bytes = mib << 20;
    let low = bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if bytes > low {
        ranges.push((GuestAddress(FOUR_GIB), (bytes - low) as usize));
    }
    Ok(ranges)
}

/// Creates guest memory of `mib` MiB (a limit: nothing is touched here).
pub fn create(mib: u64) -> Result<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(mib)?).map_err(|e| Error::Memory(e.to_string()))?;
    // Where the guest's RAM is in this process (for leak scans of guest memory from the host,
    // through /proc/PID/mem): host address and length of each region.
    {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        for r in mem.iter() {
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                tracing::info!(guest = r.start_addr().0, host = host as usize, len = r.len(), "guest memory region");
            }
        }
    }
    Ok(mem)
}

/// End of RAM below the hole (exclusive).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().filter(|r| r.start_addr().0 < MMIO_HOLE_START).map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0)
}

#[cfg(test)]
mod resident_tests {
    use super::*;

    #[test]
    fn smaps_is_split_at_guest_mappings() {
        let smaps = "1000-2000 rw-p 00000000 00:00 0\nSize: 4 kB\nRss: 4 kB\n\
                     10000-20000 rw-p 00000000 00:00 0\nRss: 40 kB\n";
        let r = split_smaps(smaps, &[(0x10000, 0x10000)]);
        assert_eq!(r, Resident { total_kib: 44, guest_kib: 40 });
        assert_eq!(r.outside_guest_kib(), 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(128).unwrap(), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4096).unwrap();
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(FOUR_GIB), ((4096u64 << 20) - MMIO_HOLE_START) as usize));
        assert!(ram_ranges(1).is_err());
        assert!(ram_ranges(MAX_MEMORY_MIB + 1).is_err());
    }

    #[test]
    fn memory_is_a_limit_not_a_reservation() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            l.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        let before = rss_kib();
        let mem = create(8192).unwrap();
        let after = rss_kib();
        assert!(after < before + 16 * 1024, "8 GiB guest grew RSS by {} KiB", after - before);
        assert_eq!(low_ram_end(&mem), MMIO_HOLE_START);
    }
}
