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
//!   **before** the PLUG that plugged it is answered, and cleared (its unplug count bumped
//!   first) **after** the UNPLUG's discard (on BUSY it stays plugged). What makes a balloon
//!   request naming a page of a just-plugged block see it plugged is not the atomics' ordering
//!   but the chain around it: the bit is set before the used ring's release fence and index
//!   store that answer the PLUG, the guest sees the answer and only then queues and kicks its
//!   balloon request, and the balloon reads the bit after its queue's acquire fence on the
//!   available index. A reader that sees a block unplugged just refuses; Acquire/Release on
//!   the words adds nothing the queues do not give, and costs nothing on x86.
//! - P2. A reader that saw a block plugged may act on it after it was unplugged, even after it
//!   was plugged again (the guest raced its own UNPLUG and PLUG against its own balloon
//!   request). That is harmless to the host: the balloon discards only pages or ranges the
//!   guest itself gave (or 2 MiB blocks it gave whole), inside guest RAM the table covers (the
//!   device's constructor checked it), and `GuestMmu::discard` refuses anything else before any
//!   syscall. The guest can lose only its own data, and only by racing its own requests.
//! - P3. Each block's unplug count tells the balloon that the block was unplugged since it last
//!   looked: its record of ballooned and held pages there is then stale (virtio-mem discarded
//!   the block whole) and it forgets them without a discard, so that a page held before an
//!   unplug is never discarded after a re-plug (balloon module, B1).

use std::sync::atomic::{AtomicU64, Ordering};

/// The plugged bit of every block of one virtio-mem region.
#[derive(Debug)]
pub struct PluggedBlocks {
    addr: u64,
    block_size: u64,
    nr_blocks: u64,
    words: Box<[AtomicU64]>,
    /// Per block: how many times it was unplugged (P3).
    unplugs: Box<[AtomicU64]>,
}

impl PluggedBlocks {
    /// `nr_blocks` blocks of `block_size` bytes from guest-physical `addr`, none plugged.
    pub(crate) fn new(addr: u64, block_size: u64, nr_blocks: u64) -> Self {
        let words = (0..nr_blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let unplugs = (0..nr_blocks).map(|_| AtomicU64::new(0)).collect();
        Self { addr, block_size, nr_blocks, words, unplugs }
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
        if on {
            return word.fetch_or(bit, Ordering::Release) & bit == 0;
        }
        if word.load(Ordering::Relaxed) & bit == 0 {
            return false;
        }
        // P3: counted before the bit clears, so a reader that sees it unplugged sees the count.
        self.unplugs[block as usize].fetch_add(1, Ordering::Release);
        word.fetch_and(!bit, Ordering::Release);
        true
    }

    /// How many times the block holding guest-physical `gpa` was unplugged (0 outside the
    /// region; P3).
    pub fn unplugs_at(&self, gpa: u64) -> u64 {
        let (start, size) = self.region();
        if gpa < start || gpa >= start + size {
            return 0;
        }
        self.unplugs[((gpa - start) / self.block_size) as usize].load(Ordering::Acquire)
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
        assert_eq!(p.unplugs_at((1 << 30) + 2 * MIB), 0);
        assert!(p.set(1, false) && !p.test(1) && p.test(2));
        assert!(!p.set(1, false), "clearing a clear block changes nothing");
        assert_eq!(p.unplugs_at((1 << 30) + 3 * MIB), 1, "one unplug of block 1");
        assert_eq!((p.unplugs_at((1 << 30) + 4 * MIB), p.unplugs_at(0)), (0, 0));
    }
}
