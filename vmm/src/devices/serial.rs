//! The 16550A UART at COM1 (port 0x3f8, IRQ 4), from vm-superio.
//!
//! Output goes to the writer the VMM chose (stdout for `zapvm run`). Its interrupt line is an
//! eventfd registered with KVM as an irqfd, so raising it needs no VMM thread.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1's port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's IRQ (GSI).
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port bus.
pub struct SerialDevice {
    serial: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART writing to `out` and raising `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self { serial: Serial::new(IrqLine(irq), out) }
    }
}

impl SerialDevice {
    /// Puts what fits of `input` into the receive FIFO (raising the receive interrupt if the
    /// guest enabled it) and returns how many bytes it took; 0 when the FIFO is full.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let fits = input.len().min(self.serial.fifo_capacity());
        if fits == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                // Only the interrupt failed (the FIFO had room): the bytes are in the FIFO and
                // the line status shows them.
                tracing::warn!("serial: receive interrupt: {e:?}");
                fits
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_writer() {
        let out = Capture::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // LSR says the transmitter is empty, as drivers poll for.
        let mut lsr = [0];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
