//! Which blocks of a virtio-mem region are plugged, shared read-only with the balloon.
//!
//! A guest's memory manager treats plugged virtio-mem memory as ordinary RAM: Linux's
//! virtio_balloon inflates pages from it and free page reporting reports its free blocks. The
//! balloon may therefore act on a page of the region only while its block is plugged; it reads
//! that here, without taking the virtio-mem device's lock (the two devices are processed on
//! different threads and neither lock is ever held while taking the other).
//!
//! # Invariants
//! - P1. Only the virtio-mem device writes the map, under its own lock, and a block's bit is set
//!   **before** the PLUG that plugged it is answered (the driver uses a block only after its
//!   ACK, so a balloon request naming one of its pages sees it plugged) and cleared **after**
//!   the UNPLUG's discard.
//! - P2. A reader that saw a block plugged may act on it after it was unplugged (the guest
//!   raced its own UNPLUG against its own balloon request). That is harmless to the host: the
//!   block lies in guest RAM the table covers (the device's constructor checked it), so the
//!   balloon's discard is one more discard of memory that is discarded already, never a
//!   syscall outside guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

/// The plugged bit of every block of one virtio-mem region.
#[derive(Debug)]
pub struct PluggedBlocks {
    addr: u64,
    block_size: u64,
    nr_blocks: u64,
    words: Box<[AtomicU64]>,
}

impl PluggedBlocks {
    /// `nr_blocks` blocks of `block_size` bytes from guest-physical `addr`, none plugged.
    pub(crate) fn new(addr: u64, block_size: u64, nr_blocks: u64) -> Self {
        let words = (0..nr_blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { addr, block_size, nr_blocks, words }
    }

    /// The region as (guest-physical start, size).
    pub fn region(&self) -> (u64, u64) {
        (self.addr, self.nr_blocks * self.block_size)
    }

    /// Whether block `block` (an index below the region's block count) is plugged.
    pub(super) fn test(&self, block: u64) -> bool {
        self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Sets or clears block `block`; whether it changed. Only the virtio-mem device, under its
    /// lock (P1), and tests.
    pub(crate) fn set(&self, block: u64, on: bool) -> bool {
        let (word, bit) = (&self.words[(block / 64) as usize], 1u64 << (block % 64));
        let old =
            if on { word.fetch_or(bit, Ordering::Release) } else { word.fetch_and(!bit, Ordering::Release) };
        (old & bit != 0) != on
    }

    /// Whether `[gpa, gpa + len)` (len > 0) lies inside the region with every block it touches
    /// plugged.
    pub fn all_plugged(&self, gpa: u64, len: u64) -> bool {
        let (start, size) = self.region();
        let Some(end) = gpa.checked_add(len) else { return false };
        if len == 0 || gpa < start || end > start + size {
            return false;
        }
        let (first, last) = ((gpa - start) / self.block_size, (end - 1 - start) / self.block_size);
        (first..=last).all(|b| self.test(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_range_is_plugged_only_when_every_block_it_touches_is() {
        let p = PluggedBlocks::new(1 << 30, 2 * MIB, 4);
        assert_eq!(p.region(), (1 << 30, 8 * MIB));
        assert!(!p.all_plugged(1 << 30, 4096), "nothing plugged at first");
        assert!(p.set(1, true) && !p.set(1, true), "set reports a change once");
        assert!(p.all_plugged((1 << 30) + 2 * MIB, 2 * MIB));
        assert!(!p.all_plugged((1 << 30) + 2 * MIB - 4096, 8192), "straddles unplugged block 0");
        assert!(!p.all_plugged((1 << 30) + 4 * MIB - 4096, 8192), "straddles unplugged block 2");
        assert!(p.set(2, true));
        assert!(p.all_plugged((1 << 30) + 4 * MIB - 4096, 8192));
        assert!(!p.all_plugged((1 << 30) + 6 * MIB, 4 * MIB), "runs past the region");
        assert!(!p.all_plugged((1 << 30) - 4096, 4096), "before the region");
        assert!(!p.all_plugged(u64::MAX - 4095, 4096), "overflow");
        assert!(!p.all_plugged((1 << 30) + 2 * MIB, 0), "empty");
        assert!(p.set(1, false) && !p.test(1) && p.test(2));
    }
}
