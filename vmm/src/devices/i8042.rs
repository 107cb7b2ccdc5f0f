//! The i8042 keyboard controller, as far as a VMM needs it: the CPU reset line.
//!
//! Writing command 0xfe (pulse reset) to port 0x64 is how the test guest and Linux (`reboot=k`,
//! the default) reset the machine; the VMM treats it as the guest asking to stop. Status reads
//! say "no data, input buffer empty" so that a probing driver gives up quickly.

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// First port of the controller (data port 0x60; command/status at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

/// The controller; signals `reset` when the guest pulses the reset line.
pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    /// A controller signalling `reset`.
    pub fn new(reset: EventFd) -> Self {
        Self { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET] {
            if let Err(e) = self.reset.write(1) {
                tracing::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
