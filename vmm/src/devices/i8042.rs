//! The i8042 keyboard controller, as far as a VMM needs it: the CPU reset line.
//!
//! Writing command 0xfe (pulse reset) to port 0x64 is how the test guest and Linux (`reboot=k`,
//! the default) reset the machine; the VMM treats it as the guest asking to stop. The device is
//! vm-superio's [`I8042Device`] (which signals its trigger on that command and reads 0 at every
//! port, "no data, input buffer empty", so that a probing driver gives up quickly); this module
//! puts it on the port bus.

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// First port of the controller (data port 0x60; command/status at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

/// The eventfd the controller signals when the guest pulses the reset line.
struct ResetLine(EventFd);

impl Trigger for ResetLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The controller on the port bus; signals `reset` when the guest pulses the reset line.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// A controller signalling `reset`.
    pub fn new(reset: EventFd) -> Self {
        Self(I8042Device::new(ResetLine(reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus checked `offset < I8042_LEN`; every port reads the same.
        data.fill(self.0.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // One-byte port writes only (an `out dx, al`); wider ones are not a command.
        let &[value] = data else { return };
        if let Err(e) = self.0.write(offset as u8, value) {
            tracing::error!("i8042: cannot signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command port's offset on the bus (port 0x64).
    const COMMAND_OFFSET: u64 = 4;
    /// "Pulse the CPU reset line".
    const CMD_RESET: u8 = 0xfe;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET, 0]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut status = [0xffu8; 1];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0], "no data, input buffer empty");
    }
}
