//! Ranges: what subscribers are told.

use serde::Serialize;

/// The base page size of the host (x86_64).
pub const PAGE_SIZE: usize = 4096;
/// The size of a PMD-mapped transparent huge page on x86_64.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Who initiated a teardown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Origin {
    /// The VMM, through [`crate::AddressSpace`].
    Vmm,
    /// Code that did not use the API; reported by the userfaultfd [`crate::Monitor`].
    External,
}

/// How a discard was (or, for external events, may have been) performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DiscardMethod {
    /// `madvise(MADV_DONTNEED)`. Private anonymous memory reads zeros afterwards; on a shared memfd
    /// mapping the data stays in the page cache and is read back (`docs/host.md`).
    DontNeed,
    /// `madvise(MADV_REMOVE)`: frees the backing of shared memory (reads zeros afterwards).
    Remove,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the backing file of a memfd/hugetlbfs region. The
    /// kernel sends no userfaultfd event for it.
    PunchHole,
    /// `madvise(MADV_FREE)`: lazy free; the pages may stay mapped with their old contents until
    /// reclaim. Only reported for external events (the API never issues it).
    Free,
    /// An external `UFFD_EVENT_REMOVE`: the kernel does not say which of DONTNEED / REMOVE / FREE
    /// the caller used.
    Unknown,
}

/// What happens to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Event {
    /// The contents are discarded; the mapping stays (reads give zeros or, for DONTNEED on shared
    /// memory, the page-cache contents). Linux: `MMU_NOTIFY_CLEAR`.
    Discard(DiscardMethod),
    /// The mapping goes away (`munmap`). Linux: `MMU_NOTIFY_UNMAP`.
    Unmap,
    /// The mapping moves to `[new_start, new_start + (end - start))` (`mremap`); the old range is
    /// gone. Linux reports this as an unmap of the old range.
    Remap {
        /// Start of the destination.
        new_start: usize,
    },
    /// The protection changes to `prot` (`PROT_*` bits; `mprotect`). Linux:
    /// `MMU_NOTIFY_PROTECTION_VMA`.
    Protect {
        /// The new `PROT_*` bits.
        prot: i32,
    },
    /// The address space goes away; sent for every region by [`crate::AddressSpace::release`]
    /// before [`crate::Subscriber::release`]. Linux: `MMU_NOTIFY_RELEASE`.
    Release,
}

impl Event {
    /// Number of event kinds, for per-kind counters.
    pub(crate) const KINDS: usize = 5;

    /// Index for per-kind counters.
    pub(crate) fn index(&self) -> usize {
        match self {
            Event::Discard(_) => 0,
            Event::Unmap => 1,
            Event::Remap { .. } => 2,
            Event::Protect { .. } => 3,
            Event::Release => 4,
        }
    }

    /// Short name, for counters and traces.
    pub fn name(&self) -> &'static str {
        Self::name_of(self.index())
    }

    pub(crate) fn name_of(i: usize) -> &'static str {
        ["discard", "unmap", "remap", "protect", "release"][i]
    }
}

/// A range of host virtual addresses being torn down, as every subscriber sees it.
///
/// `[start, end)` is page-aligned and never empty. In a region that transparent huge pages may back,
/// a range that cuts a 2 MiB block is widened to whole 2 MiB blocks (clipped to the region): a safe
/// superset of what the kernel tears down, needed by subscribers that cache whole 2 MiB
/// translations (the kernel itself splits the PMD and zaps only the pages named: a 4 KiB DONTNEED
/// inside a THP keeps the other 511 pages, now mapped by PTEs). `exact_start..exact_end` is the
/// range the syscall named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Range {
    /// First byte (page-aligned).
    pub start: usize,
    /// One past the last byte (page-aligned, `> start`).
    pub end: usize,
    /// The range the syscall (or the kernel's event) named; inside `[start, end)`.
    pub exact_start: usize,
    /// See `exact_start`.
    pub exact_end: usize,
    /// What happens.
    pub event: Event,
    /// Who did it.
    pub origin: Origin,
    /// Whether `invalidate_range_start` may sleep. When `false`, a subscriber may refuse.
    pub blockable: bool,
}

impl Range {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Never true (a `Range` is never empty); present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `[start, end)` intersects this range.
    pub fn overlaps(&self, start: usize, end: usize) -> bool {
        overlaps(self.start, self.end, start, end)
    }
}

/// Whether `[a, b)` and `[c, d)` intersect.
pub(crate) fn overlaps(a: usize, b: usize, c: usize, d: usize) -> bool {
    a < d && c < b
}

pub(crate) fn align_down(x: usize, a: usize) -> usize {
    x & !(a - 1)
}

pub(crate) fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}
