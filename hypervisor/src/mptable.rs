//! An Intel MP table (spec 1.4): CPUs, one ISA bus, one IOAPIC with ISA IRQ i on pin i (the
//! timer, IRQ 0, on pin 2 where KVM wires it), and
//! LINT0 = ExtINT, LINT1 = NMI. Without it Linux runs in "virtual wire, no configuration"
//! mode, where L1 KVM's PIC/LVT0 race can lose the first timer interrupt forever
//! (`shared/research/tcg-rig.md` §3.1), and it cannot start more than one CPU.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::{Error, Result};

/// IOAPIC pins described (ISA IRQs 1..=23 map one to one, IRQ 0 to pin 2).
const IOAPIC_PINS: u8 = 24;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` CPUs, to be placed at
/// [`EBDA_START`]. Returns the bytes.
pub(crate) fn build(cpus: u8) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > 254 {
        return Err(Error::Config(format!("{cpus} vCPUs cannot be described in an MP table")));
    }
    let ioapic_id = cpus + 1;
    let table_addr = EBDA_START as u32 + FLOATING_LEN as u32;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // KVM wires the PIT (GSI 0) to IOAPIC pin 2, as PC firmware describes with an
        // interrupt source override; pin 2 is therefore not IRQ 2 (the PIC cascade).
        let pin = match irq {
            0 => 2,
            2 => continue,
            n => n,
        };
        // I/O interrupt: vectored INT, flags "conforms to bus", ISA bus 0.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT on the BSP, LINT1 NMI on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MSB     ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out[..FLOATING_LEN]);
    out.extend_from_slice(&table);
    if out.len() > 1024 {
        return Err(Error::Config(format!("MP table for {cpus} vCPUs does not fit in the EBDA")));
    }
    Ok(out)
}

/// Writes the MP table for `cpus` CPUs into guest memory.
pub(crate) fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(|e| Error::Boot(format!("writing MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_consistent() {
        for cpus in [1u8, 2, 8] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 23 + 2);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (count - cpus as usize));
        }
        assert!(build(0).is_err());
    }
}
