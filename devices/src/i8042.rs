//! The minimum of an i8042 controller a Linux guest needs to reboot: the status port reads
//! "input buffer empty" and the "pulse reset line" command (0xFE to port 0x64) stops the VM.

use msb_hypervisor::VcpuStop;

use crate::BusDevice;

/// Ports 0x60..=0x64 (data at offset 0, command/status at offset 4).
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

pub struct I8042;

impl BusDevice for I8042 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<VcpuStop> {
        (offset == 4 && data.first() == Some(&0xfe)).then_some(VcpuStop::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_and_status_is_idle() {
        let mut s = [0xffu8];
        I8042.read(4, &mut s);
        assert_eq!(s, [0]);
        assert_eq!(I8042.write(4, &[0xfe]), Some(VcpuStop::Reset));
        assert_eq!(I8042.write(4, &[0xd1]), None);
        assert_eq!(I8042.write(0, &[0xfe]), None);
    }
}
