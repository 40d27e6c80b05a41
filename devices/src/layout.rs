//! The device table: every virtio device of a sandbox with its MMIO slot, its interrupt line
//! and its kernel command-line entry, in one place. [`crate::machine`] builds the devices
//! from this table and the actor tree spawns one shell per entry, so adding a device is one
//! row here, one [`VirtioKind`] variant and one shell.
//!
//! Fixed legacy devices (not in the table, their addresses are the PC's): COM1 at 0x3f8 on
//! IRQ 4, the i8042 at 0x60/0x64, the boot timer at [`msb_protocol::BOOT_TIMER_ADDR`].
//!
//! Invariants (checked by the tests below): slots and IRQs are distinct, IRQs avoid the
//! legacy lines, and every slot lies inside the MMIO window that follows the boot timer.

use msb_protocol::{MMIO_SLOT_SIZE, VIRTIO_MMIO_BASE};

/// Which virtio device a table entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-console carrying the agent channel.
    Console,
    /// virtio-rng fed from the host's CRNG.
    Rng,
    /// The sandbox's `n`th disk (present only when the sandbox has that many, see
    /// [`crate::machine::MachineSpec::disks`]).
    Blk(u8),
    /// Present only when the sandbox has a network ([`crate::MachineSpec::net`]).
    Net,
    /// The sandbox's `n`th shared directory (present only when it has that many, see
    /// [`crate::machine::MachineSpec::mounts`]).
    Fs(u8),
}

/// One virtio device's place in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    pub kind: VirtioKind,
    /// Index of its 4 KiB MMIO window from [`VIRTIO_MMIO_BASE`].
    pub slot: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
}

/// Every virtio device of a sandbox, in the order the guest probes them.
pub const VIRTIO_DEVICES: &[VirtioSlot] = &[
    VirtioSlot { kind: VirtioKind::Console, slot: 0, irq: 5 },
    VirtioSlot { kind: VirtioKind::Rng, slot: 1, irq: 6 },
    VirtioSlot { kind: VirtioKind::Blk(0), slot: 2, irq: 10 },
    VirtioSlot { kind: VirtioKind::Blk(1), slot: 3, irq: 11 },
    VirtioSlot { kind: VirtioKind::Net, slot: 4, irq: 9 },
    VirtioSlot { kind: VirtioKind::Fs(0), slot: 5, irq: 13 },
    VirtioSlot { kind: VirtioKind::Fs(1), slot: 6, irq: 14 },
    VirtioSlot { kind: VirtioKind::Fs(2), slot: 7, irq: 15 },
    VirtioSlot { kind: VirtioKind::Fs(3), slot: 8, irq: 7 },
];

/// Most disks a sandbox has (the `Blk` rows of the table).
pub const MAX_DISKS: usize = 2;
/// Most shared directories a sandbox has (the `Fs` rows of the table).
pub const MAX_FS: usize = 4;

/// Most virtio slots the MMIO window holds.
pub const MAX_SLOTS: u64 = 32;

impl VirtioSlot {
    /// Guest physical address of its register window.
    pub fn base(&self) -> u64 {
        VIRTIO_MMIO_BASE + self.slot * MMIO_SLOT_SIZE
    }

    /// Its kernel command-line entry (the guest finds virtio-mmio devices only from these).
    pub fn cmdline(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base(), self.irq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_irqs_are_distinct_and_clear_of_legacy_devices() {
        let mut slots: Vec<_> = VIRTIO_DEVICES.iter().map(|d| d.slot).collect();
        let mut irqs: Vec<_> = VIRTIO_DEVICES.iter().map(|d| d.irq).collect();
        slots.dedup();
        irqs.sort();
        irqs.dedup();
        assert_eq!(slots.len(), VIRTIO_DEVICES.len());
        assert_eq!(irqs.len(), VIRTIO_DEVICES.len());
        for d in VIRTIO_DEVICES {
            assert!(d.slot < MAX_SLOTS, "{d:?}");
            assert!(![0, 1, 2, 4, 8, 12].contains(&d.irq) && d.irq < 24, "{d:?} collides with a legacy IRQ");
            assert!(d.base() > msb_protocol::BOOT_TIMER_ADDR);
        }
    }

    #[test]
    fn the_table_has_a_row_for_every_disk_and_shared_directory() {
        let count = |f: fn(&VirtioKind) -> bool| VIRTIO_DEVICES.iter().filter(|d| f(&d.kind)).count();
        assert_eq!(count(|k| matches!(k, VirtioKind::Blk(_))), MAX_DISKS);
        assert_eq!(count(|k| matches!(k, VirtioKind::Fs(_))), MAX_FS);
    }

    #[test]
    fn the_command_line_entry_names_the_window_and_the_irq() {
        let d = VirtioSlot { kind: VirtioKind::Rng, slot: 1, irq: 6 };
        assert_eq!(d.cmdline(), format!("virtio_mmio.device=4K@{:#x}:6", VIRTIO_MMIO_BASE + 0x1000));
    }
}
