//! Emulated devices and the buses that route vCPU exits to them.
//!
//! A device implements [`BusDevice`]: reads and writes at an offset inside the window it was
//! inserted at. Port I/O and MMIO each have a [`Bus`]; a vCPU exit looks the address up and calls
//! the device under its lock. An access no device claims reads as all ones (a floating bus, which
//! is how real hardware answers and how Linux's probes expect "nothing here") and is counted.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset` inside the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The window overlaps another device's.
    #[error("bus window [{base:#x}, +{len:#x}) overlaps an existing device")]
    Overlap {
        /// Start of the window.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Empty or overflowing window.
    #[error("bus window [{base:#x}, +{len:#x}) is empty or overflows")]
    BadWindow {
        /// Start of the window.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// An address space of devices (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    /// Window start -> (length, device).
    devices: BTreeMap<u64, (u64, SharedDevice)>,
    /// Accesses no device claimed.
    unclaimed: AtomicU64,
}

impl Bus {
    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadWindow { base, len })?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (size, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + len as u64 <= *size).then_some((offset, device))
    }

    /// Routes a read; returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Routes a write; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many accesses no device claimed.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Register(Vec<u8>);
    impl BusDevice for Register {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset as usize..offset as usize + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn routes_by_window_and_refuses_overlaps() {
        let mut bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Register(vec![0; 4])))).unwrap();
        assert!(matches!(
            bus.insert(0x12, 4, Arc::new(Mutex::new(Register(vec![0; 4])))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0e, 4, Arc::new(Mutex::new(Register(vec![0; 4])))),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x14, 4, Arc::new(Mutex::new(Register(vec![0; 4])))).unwrap();
        assert!(bus.write(0x12, &[7, 8]));
        let mut out = [0; 2];
        assert!(bus.read(0x12, &mut out));
        assert_eq!(out, [7, 8]);
        // Straddling the end of a window is not claimed; unclaimed reads float high.
        let mut wide = [0; 4];
        assert!(!bus.read(0x12, &mut wide));
        assert_eq!(wide, [0xff; 4]);
        assert!(!bus.write(0x100, &[1]));
        assert_eq!(bus.unclaimed(), 2);
    }
}
