//! The balloon's per-region state: which 4 KiB pages are in the balloon, how many of each 2 MiB
//! block, and which are held but not yet discarded (invariant B1 of the module above).

use super::PAGES_PER_BLOCK;
use crate::memory::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// How guest RAM is backed, for the discard policy (B1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backing {
    /// 4 KiB pages: every inflated run is discarded at once.
    Small,
    /// THP: a 2 MiB block is discarded whole once the guest has given all of it; pages of a
    /// partial block are held (discarded if the guest takes them back first).
    Thp,
    /// hugetlb: nothing smaller than a 2 MiB page can be discarded; pages of a partial block
    /// are held and come back with their contents.
    Hugetlb,
}

/// One guest RAM region's balloon state.
pub(super) struct RegionMap {
    pub(super) gpa: u64,
    pub(super) pages: u64,
    /// One bit per 4 KiB page: in the balloon.
    pub(super) bitmap: Vec<u64>,
    /// Ballooned pages per 2 MiB guest block (blocks indexed from `gpa` rounded down).
    pub(super) per_block: Vec<u16>,
    /// One bit per 4 KiB page: in the balloon but not discarded yet (on huge-page-backed
    /// memory, a page of a block the guest has not given whole; B1 below).
    pub(super) held: Vec<u64>,
}

impl RegionMap {
    pub(super) fn new(gpa: u64, len: u64) -> Self {
        let pages = len / PAGE_SIZE;
        let first_block = gpa / HUGE_PAGE_SIZE;
        let last_block = (gpa + len).div_ceil(HUGE_PAGE_SIZE);
        Self {
            gpa,
            pages,
            bitmap: vec![0; pages.div_ceil(64) as usize],
            per_block: vec![0; (last_block - first_block) as usize],
            held: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Guest-physical end.
    pub(super) fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }

    /// Pages of block `b` inside the region (the region may start or end mid-block).
    pub(super) fn block_len(&self, b: usize) -> u64 {
        let block_start = (self.gpa / HUGE_PAGE_SIZE + b as u64) * PAGES_PER_BLOCK;
        let first = self.gpa / PAGE_SIZE;
        let end = (block_start + PAGES_PER_BLOCK).min(first + self.pages);
        end - block_start.max(first)
    }

    /// Whether every page of block `b` inside the region is in the balloon.
    pub(super) fn block_full(&self, b: usize) -> bool {
        self.per_block[b] as u64 == self.block_len(b)
    }

    /// The guest-physical range of block `b`, clipped to the region.
    pub(super) fn block_range(&self, b: usize) -> (u64, u64) {
        let start = ((self.gpa / HUGE_PAGE_SIZE + b as u64) * HUGE_PAGE_SIZE).max(self.gpa);
        let end = (start / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE + HUGE_PAGE_SIZE).min(self.end());
        (start, end)
    }

    pub(super) fn is_held(&self, pfn: u64) -> bool {
        let i = self.index(pfn);
        self.held[i / 64] & (1 << (i % 64)) != 0
    }

    pub(super) fn set_held(&mut self, pfn: u64, on: bool) {
        let i = self.index(pfn);
        if on {
            self.held[i / 64] |= 1 << (i % 64);
        } else {
            self.held[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Clears the held bits of block `b` (it is being discarded whole).
    pub(super) fn release_block(&mut self, b: usize) {
        let (start, end) = self.block_range(b);
        for pfn in start / PAGE_SIZE..end / PAGE_SIZE {
            self.set_held(pfn, false);
        }
    }

    pub(super) fn held_pages(&self) -> u64 {
        self.held.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub(super) fn contains(&self, pfn: u64) -> bool {
        let first = self.gpa / PAGE_SIZE;
        pfn >= first && pfn < first + self.pages
    }

    pub(super) fn index(&self, pfn: u64) -> usize {
        (pfn - self.gpa / PAGE_SIZE) as usize
    }

    pub(super) fn block(&self, pfn: u64) -> usize {
        (pfn / PAGES_PER_BLOCK - self.gpa / HUGE_PAGE_SIZE) as usize
    }

    pub(super) fn test(&self, pfn: u64) -> bool {
        let i = self.index(pfn);
        self.bitmap[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets or clears `pfn`; returns whether it changed.
    pub(super) fn set(&mut self, pfn: u64, on: bool) -> bool {
        let i = self.index(pfn);
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if (self.bitmap[word] & bit != 0) == on {
            return false;
        }
        self.bitmap[word] ^= bit;
        let b = self.block(pfn);
        if on {
            self.per_block[b] += 1;
        } else {
            self.per_block[b] -= 1;
        }
        true
    }

    /// Forgets block `b`: no page of it is ballooned or held any more (virtio-mem unplugged it,
    /// which discarded it whole: nothing is left to discard).
    pub(super) fn forget_block(&mut self, b: usize) {
        let (start, end) = self.block_range(b);
        for pfn in start / PAGE_SIZE..end / PAGE_SIZE {
            let i = self.index(pfn);
            self.bitmap[i / 64] &= !(1 << (i % 64));
            self.held[i / 64] &= !(1 << (i % 64));
        }
        self.per_block[b] = 0;
    }

    pub(super) fn clear(&mut self) {
        self.bitmap.fill(0);
        self.per_block.fill(0);
        self.held.fill(0);
    }
}
