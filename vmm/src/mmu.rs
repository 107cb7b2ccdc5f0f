//! The VMM's own second-level table: guest frame -> host virtual address.
//!
//! zapvm is a secondary MMU of its own address space. Every access the VMM makes to guest RAM on
//! the guest's behalf (ucall records, virtqueues, balloon PFN arrays, the host's check of guest
//! pages) goes through a [`GuestMmu`], which translates guest-physical addresses with a table of
//! 4 KiB and 2 MiB entries and copies with a fault-tolerant routine
//! ([`fault_tolerant_copy`]). Per region the table is two bitmaps, one bit per 4 KiB page and one
//! per 2 MiB block of the region's host range (M3: the translation is linear, so a set bit is the
//! whole entry), looked up in O(1). It is
//! - **read on the hit path** inside a *read section* of the calling thread's reader slot (the
//!   [`readers`] module: one slot per thread, written only by its thread, so readers share no
//!   cache line and make no read-modify-write), then the copy runs inside that same section;
//! - **filled on demand** (the miss path) through the notifier's sequence-retry read:
//!   `read_begin_range` over the whole block the install may create (waits while an invalidation
//!   of it runs) -> translate (check that the host range is still mapped, pick the entry size) ->
//!   take the table lock -> `read_retry` (start over if an overlapping invalidation began or ended
//!   meanwhile) -> set the bit -> open the read section (still under the table lock);
//! - **torn down only** by the notifier's `invalidate_range_start` callback, under the table lock,
//!   for every range that overlaps an entry — a 4 KiB discard inside a 2 MiB entry drops the whole
//!   2 MiB entry (the notifier also widens ranges that cut a THP to whole huge pages) — which then
//!   waits for the read sections of the region that may have seen the dropped bits.
//!
//! # The read-side protocol (a "brlock" / percpu-rwsem with asymmetric fences)
//!
//! A reader (the hit path, [`readers::Slot::enter`]): **announce** (store the region into its
//! slot, then make the slot's section count odd) -> *light barrier* -> **look** at the bits ->
//! copy -> **leave** (make the count even, a release store). A writer
//! ([`Entries::drop_overlapping`], under the table lock): **clear** the bits -> *heavy barrier* ->
//! **wait**: for every slot whose count is odd with this region announced, spin until that count
//! changes. The light barrier is only a compiler fence and the heavy one is
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which runs a full memory barrier on every CPU
//! that runs a thread of this process (the pairing of Linux's `rcu_sync`/percpu-rwsem, of
//! liburcu's membarrier flavour and of folly's asymmetric fences); where the kernel refuses
//! to register for membarrier both are a full fence (`fence(SeqCst)`: one serialising
//! instruction per access). A registered process's membarrier may still fail (`ENOMEM`,
//! `EINTR`: retried a few times; a seccomp filter installed later: for good); the heavy barrier
//! is then made by an mprotect TLB shootdown (an IPI to every CPU running the process, as
//! folly and liburcu fall back to), and if that fails too the process aborts: the heavy barrier
//! never fails and never unwinds out of a half-finished wait (M1).
//!
//! - S1. A slot's section count and announced region are written only by the thread that owns
//!   the slot ([`readers::SlotList::claim`] gives a slot to one live thread at a time); the count
//!   is odd exactly while that thread is inside a section. Sections do not nest and never block:
//!   no lock is taken and nothing waits inside one (the miss path leaves its section before it
//!   waits on the notifier and opens a new one under the table lock), so a writer that waits for
//!   a section always sees it end, and a thread never invalidates inside its own section.
//! - S2. Announce -> barrier -> look against clear -> barrier -> wait is Dekker's pattern: of a
//!   reader's look and a writer's wait, at least one sees the other's store. So a reader that saw
//!   a bit the writer clears is a reader whose open section the writer sees and waits for, and a
//!   reader the writer does not see looks after the clear and misses. The barriers are the only
//!   ordering between the two sides (every other access is relaxed, acquire or release).
//! - S3. The writer waits for the section it saw to end (the count to change), not for the slot to
//!   be idle, so a thread that reads in a loop cannot starve it.
//! - S4. Only a writer that dropped at least one set bit waits. Writers are serialised by the
//!   table lock and every one that drops a bit waits, so a reader that saw a bit which is already
//!   clear when a later writer looks was waited for by the writer that cleared it.
//!
//! `tests/loom.rs` (in this package, built with `--cfg loom`) model-checks this protocol on this
//! module's own code, with planted faults (the writer not waiting; the barriers left out) that it
//! must catch.
//!
//! # Invariants
//! - M1. An access copies guest memory only inside a read section of its thread's slot and every
//!   4 KiB piece it copies is covered by a set bit it saw inside that section.
//!   `invalidate_range_start` clears the bits of the range and waits for every section that may
//!   have seen them (S2, S4), so when start returns no copy through a dropped entry is in flight,
//!   and none starts until a new entry is installed, which `read_begin_range` delays until the
//!   invalidation's end. For the VMM's own operations (start -> syscall -> end) no device access
//!   ever sees a half-done teardown: it completes before the syscall or begins after the end.
//!   Reads and writes are kept alike: a write through a dropped entry into a reused hole is
//!   impossible because the writer's wait covers it as it covers a read.
//! - M2. External teardowns (the userfaultfd monitor) reach the table after the kernel acted (see
//!   `notifier::Monitor`), so a copy may race an external munmap or a truncation of a memfd.
//!   Copies therefore use [`fault_tolerant_copy::Copier`]: a fault of the copy routine ends the copy
//!   and is an [`AccessError::Unmapped`] for the device, counted in `faults`, never a crash of the
//!   VMM, and no syscall is made on the way. What M2 does not cover without a sealed guest RAM: a
//!   mapping someone else made in an externally unmapped hole before the monitor delivered the
//!   teardown is reachable through the old entry until then (as it was with `process_vm_readv`).
//! - M3. The translation is linear per region (guest RAM regions are contiguous in both spaces),
//!   so an entry needs no payload: its presence says "this host range was mapped when the entry
//!   was installed, and no teardown has touched it since".
//!
//! Lock order: table lock (the notifier interval's mutex) -> waiting for read sections. The hit
//! path takes no lock; the miss path opens its section under the table lock (no writer runs then:
//! writers hold the table lock) and keeps it for the copy.
//!
//! Hit counters are per thread (one cache-line-sized shard per slot, written only by the slot's
//! owner; [`GuestMmu::stats`] sums them), so the hit path writes no shared cache line.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fault_tolerant_copy::Copier;

use notifier::{AddressSpace, IntervalHandle, Range};

use crate::memory::{GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};

mod access;
mod discard;
mod stats;
mod syscall_path;

pub use access::{read_obj, write_obj, AccessError, GuestMemoryAccess};
pub use discard::DiscardError;
pub use stats::MmuStats;

use stats::{kind_index, Counters, KIND_NAMES};
use syscall_path::{own_pid, syscall_copy};

const PAGE: usize = PAGE_SIZE as usize;
const HUGE: usize = HUGE_PAGE_SIZE as usize;
const PAGE_SHIFT: u32 = PAGE.trailing_zeros();
const HUGE_SHIFT: u32 = HUGE.trailing_zeros();

/// The read side of M1: per-thread reader slots, asymmetric barriers, the writer's wait (the
/// protocol and S1-S4 are in the module documentation).
pub(crate) mod readers;

/// The process's reader slots (every `GuestMmu`'s regions share them).
#[cfg(not(loom))]
fn reader_slots() -> &'static readers::SlotList {
    static SLOTS: readers::SlotList = readers::SlotList::new();
    &SLOTS
}

/// The process's reader slots (loom builds: `GuestMmu` is not run under loom; the models make
/// their own lists).
#[cfg(loom)]
fn reader_slots() -> &'static readers::SlotList {
    unreachable!("GuestMmu is not run under loom: the models make their own slot lists")
}

/// Runs `f` with the calling thread's reader slot.
#[cfg(not(loom))]
#[inline]
fn with_reader_slot<R>(f: impl FnOnce(&readers::Slot) -> R) -> R {
    readers::with_slot(f)
}

/// Runs `f` with a reader slot (loom builds: claimed for the call).
#[cfg(loom)]
fn with_reader_slot<R>(f: impl FnOnce(&readers::Slot) -> R) -> R {
    let slot = reader_slots().claim();
    let r = f(slot);
    reader_slots().release(slot);
    r
}

/// A bitmap of atomics (one bit per entry slot; loom's atomics in loom builds).
struct Bits(Box<[BitWord]>);

#[cfg(loom)]
use loom::sync::atomic::AtomicU64 as BitWord;
#[cfg(not(loom))]
use std::sync::atomic::AtomicU64 as BitWord;

impl Bits {
    fn new(slots: usize) -> Self {
        Bits((0..slots.div_ceil(64)).map(|_| BitWord::new(0)).collect())
    }

    /// Relaxed: the ordering that matters comes from the read sections' barriers (M1, S2); see
    /// `Entries`.
    #[inline]
    fn get(&self, i: usize) -> bool {
        self.0[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    fn set(&self, i: usize) {
        self.0[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// Clears slots `[from, to)`; returns how many were set.
    fn clear_range(&self, from: usize, to: usize) -> u64 {
        let mut dropped = 0;
        let mut i = from;
        while i < to {
            let word = i / 64;
            let lo = i % 64;
            let hi = (to - word * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            dropped += (self.0[word].fetch_and(!mask, Ordering::Relaxed) & mask).count_ones() as u64;
            i = word * 64 + hi;
        }
        dropped
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// The entries of one region (host range `[hva, hva + len)`): bit `i` of `pages` is the 4 KiB
/// entry of the page at `hva + i * 4 KiB`; bit `j` of `blocks` is the 2 MiB entry of the block at
/// `(hva >> 21 << 21) + j * 2 MiB` (installed only for blocks inside the region).
///
/// Bits are set and cleared under the table lock (the notifier interval's mutex); they are read
/// inside read sections ([`readers`]). Relaxed atomics suffice: a reader that sees a bit set inside
/// its section is seen by the writer that clears it, which waits for the section to end (S2, M1);
/// a bit set by an install is set before that install opens its section, under the table lock.
struct Entries {
    hva: usize,
    len: usize,
    pages: Bits,
    blocks: Bits,
    #[cfg(feature = "fault-injection")]
    planted: planted::StaleTranslations,
}

impl Entries {
    fn new(hva: usize, len: usize) -> Self {
        let first_block = hva >> HUGE_SHIFT;
        let last_block = (hva + len - 1) >> HUGE_SHIFT;
        Entries {
            hva,
            len,
            pages: Bits::new(len.div_ceil(PAGE)),
            blocks: Bits::new(last_block - first_block + 1),
            #[cfg(feature = "fault-injection")]
            planted: planted::StaleTranslations::default(),
        }
    }

    /// The region's name in the reader slots: its address (stable: entries live in an `Arc`, and
    /// are not dropped while a section of theirs is open, which borrows them).
    #[inline]
    fn id(&self) -> usize {
        self as *const Entries as usize
    }

    #[inline]
    fn page_index(&self, hva: usize) -> usize {
        (hva - self.hva) >> PAGE_SHIFT
    }

    #[inline]
    fn block_index(&self, hva: usize) -> usize {
        (hva >> HUGE_SHIFT) - (self.hva >> HUGE_SHIFT)
    }

    /// How many bytes from `hva` (at most `len`, inside the region) are covered by installed
    /// entries without a gap. Call inside a read section of the region (or under the table lock)
    /// for the answer to stay true while the section is open.
    #[inline]
    fn covered(&self, hva: usize, len: usize) -> usize {
        let end = hva + len;
        let mut at = hva;
        while at < end {
            if self.blocks.get(self.block_index(at)) {
                at = ((at >> HUGE_SHIFT) + 1) << HUGE_SHIFT;
            } else if self.pages.get(self.page_index(at)) {
                at = ((at >> PAGE_SHIFT) + 1) << PAGE_SHIFT;
            } else {
                break;
            }
        }
        at.min(end) - hva
    }

    /// The hit path's look (M1): opens a read section of `slot` over this region, then returns
    /// it with how many bytes from `hva` (at most `len`) are covered by entries seen inside it.
    /// Those entries stay installed until the section is dropped.
    #[inline]
    fn open<'s>(&self, slot: &'s readers::Slot, hva: usize, len: usize) -> (readers::Section<'s>, usize) {
        // S2: announce (and the light barrier) before the look.
        let section = slot.enter(self.id());
        let run = self.covered(hva, len);
        (section, run)
    }

    /// The miss path's install, under the table lock after `read_retry` said yes: sets the entry
    /// of `[entry, entry + size)` (4 KiB or 2 MiB) and opens a read section of `slot`, still under
    /// the lock, so the entry stays installed until the caller drops the section (M1: the next
    /// writer, which takes the lock after this, sees the section and waits for it).
    fn install_locked<'s>(&self, slot: &'s readers::Slot, entry: usize, size: usize) -> readers::Section<'s> {
        if size == PAGE {
            self.pages.set(self.page_index(entry));
        } else {
            self.blocks.set(self.block_index(entry));
        }
        slot.enter(self.id())
    }

    /// Drops every entry overlapping `[start, end)` (clipped to the region); returns how many.
    /// Called at `invalidate_range_start`, under the table lock; when it dropped any, waits for
    /// every read section of the region that may have seen them (M1: when this returns no copy
    /// through a dropped entry is in flight, and no later section sees them).
    fn drop_overlapping(&self, slots: &readers::SlotList, start: usize, end: usize) -> u64 {
        let start = start.max(self.hva);
        let end = end.min(self.hva + self.len);
        if start >= end {
            return 0;
        }
        #[cfg(feature = "fault-injection")]
        self.planted.keep_alive(self, start, end);
        let pages = self.pages.clear_range(self.page_index(start), self.page_index(end - 1) + 1);
        let blocks = self.blocks.clear_range(self.block_index(start), self.block_index(end - 1) + 1);
        let dropped = pages + blocks;
        if dropped > 0 {
            // M1 (S2, S4): the sections that saw a dropped bit end before this returns.
            slots.wait_for_readers(self.id());
        }
        dropped
    }

    /// Drops every entry (under the table lock), as [`Entries::drop_overlapping`] does.
    fn clear(&self, slots: &readers::SlotList) {
        let pages = self.pages.clear_range(0, self.len.div_ceil(PAGE));
        let blocks = self.blocks.clear_range(0, self.block_index(self.hva + self.len - 1) + 1);
        if pages + blocks > 0 {
            // M1, as in drop_overlapping.
            slots.wait_for_readers(self.id());
        }
    }

    fn count(&self) -> u64 {
        self.pages.count() + self.blocks.count()
    }
}

struct MmuRegion {
    gpa: u64,
    len: u64,
    hva: usize,
    /// Host memory comes in 2 MiB pages (THP or hugetlb): install 2 MiB entries.
    huge: bool,
    entries: Arc<Entries>,
    /// The notifier subscription; its table lock guards installs (its table is `entries`).
    table: IntervalHandle<Arc<Entries>>,
}

/// How [`GuestMmu`] copies guest memory once the translation is installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum CopyPath {
    /// Loads and stores of the fault-tolerant copy routine: no syscall (M2 by the fault handler).
    #[default]
    Direct,
    /// `process_vm_readv`/`process_vm_writev` on this process, one call per contiguous run: the
    /// kernel walks the page tables for every copy, so a copy never goes through a translation the
    /// copying CPU's TLB kept (M2 by EFAULT). About 1.7-2 us per call (`docs/host.md`); the path
    /// of earlier versions, kept for hosts whose remote TLB flushes cannot be trusted and as the
    /// baseline of `zapvm bench access`.
    Syscall,
}

/// Guest-physical -> host-virtual translation for the VMM's accesses to guest RAM.
pub struct GuestMmu {
    space: Arc<AddressSpace>,
    regions: Vec<MmuRegion>,
    counters: Arc<Counters>,
    copier: Copier,
    path: CopyPath,
}

/// Which way a copy goes.
#[derive(Clone, Copy)]
enum Direction {
    /// Guest memory -> the buffer.
    Read(*mut u8),
    /// The buffer -> guest memory.
    Write(*const u8),
}

impl GuestMmu {
    /// A table over every region of `ram`, subscribed to `space` (which must cover `ram`), copying
    /// with [`CopyPath::Syscall`].
    ///
    /// Not [`CopyPath::Direct`] by default: on this project's machines (PVM inside a VM with
    /// paravirtual remote TLB flushes) a user-space load on one CPU was seen to read through a
    /// translation that another thread's `MADV_DONTNEED` had already torn down — stale data, and
    /// sometimes another page's data — even with no table involved (`docs/host.md`, "Copying
    /// guest memory"). A direct copy is then only as correct as the host's TLB shootdown; the
    /// kernel's page-table walk of `process_vm_readv` is not. Choose `Direct` with
    /// [`GuestMmu::with_copy_path`] on hosts whose remote TLB flushes are trusted.
    pub fn new(ram: &GuestRam, space: Arc<AddressSpace>) -> Result<Self, notifier::Error> {
        Self::with_copy_path(ram, space, CopyPath::Syscall)
    }

    /// [`GuestMmu::new`] with a chosen copy path. Installs the fault-tolerant copy's signal handler
    /// (once per process) if not done yet, whatever the path.
    pub fn with_copy_path(
        ram: &GuestRam,
        space: Arc<AddressSpace>,
        path: CopyPath,
    ) -> Result<Self, notifier::Error> {
        let copier = fault_tolerant_copy::install().map_err(|e| notifier::Error::Os {
            op: "sigaction (the fault-tolerant copy's SIGSEGV/SIGBUS handler)",
            source: match e {
                fault_tolerant_copy::InstallError::Sigaction(errno) => {
                    std::io::Error::from_raw_os_error(errno)
                }
                other => std::io::Error::other(other.to_string()),
            },
        })?;
        let counters = Arc::new(Counters::default());
        let mut regions = Vec::new();
        for (gpa, hva, len) in ram.regions() {
            let c = counters.clone();
            let entries = Arc::new(Entries::new(hva as usize, len as usize));
            let table = space.subscribe_interval(
                &format!("vmm-table@{:#x}", gpa.0),
                hva as usize,
                len as usize,
                entries.clone(),
                move |entries: &mut Arc<Entries>, range: &Range| {
                    // M1: runs under the table lock, at invalidate_range_start; waits for the read
                    // sections that may have seen the dropped entries.
                    let dropped = entries.drop_overlapping(reader_slots(), range.start, range.end);
                    c.torn_down[kind_index(&range.event)].fetch_add(dropped, Ordering::Relaxed);
                },
            )?;
            regions.push(MmuRegion {
                gpa: gpa.0,
                len,
                hva: hva as usize,
                huge: ram.huge_pages(),
                entries,
                table,
            });
        }
        Ok(Self { space, regions, counters, copier, path })
    }

    /// The copy path.
    pub fn copy_path(&self) -> CopyPath {
        self.path
    }

    /// The notifier address space the table is subscribed to.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The host address guest-physical `gpa` translates to (for the VMM's own operations on
    /// guest RAM, which go through the notifier), when `[gpa, gpa + len)` is inside one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<usize> {
        let r = self.region_of(gpa, len)?;
        Some(r.hva + (gpa - r.gpa) as usize)
    }

    #[inline]
    fn region_of(&self, gpa: u64, len: u64) -> Option<&MmuRegion> {
        let end = gpa.checked_add(len)?;
        self.regions.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
    }

    /// The counters.
    pub fn stats(&self) -> MmuStats {
        let c = &self.counters;
        MmuStats {
            hits: c.hits.sum(),
            misses: c.misses.load(Ordering::Relaxed),
            installs_4k: c.installs_4k.load(Ordering::Relaxed),
            installs_2m: c.installs_2m.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            entries: self.regions.iter().map(|r| r.entries.count()).sum(),
            torn_down: KIND_NAMES
                .iter()
                .zip(&c.torn_down)
                .map(|(name, n)| (name.to_string(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// The 2 MiB block of `hva` when `region` installs 2 MiB entries and the block lies inside it.
    fn huge_block(region: &MmuRegion, hva: usize) -> Option<usize> {
        let block = hva & !(HUGE - 1);
        (region.huge && block >= region.hva && block + HUGE <= region.hva + region.len as usize)
            .then_some(block)
    }

    /// Whether `hva` (inside `region`) is still mapped according to the notifier, and the entry to
    /// install for it: (its start, its size).
    fn translate(&self, region: &MmuRegion, hva: usize) -> Option<(usize, usize)> {
        if let Some(block) = Self::huge_block(region, hva) {
            if self.space.is_mapped(block, block + HUGE) {
                return Some((block, HUGE));
            }
        }
        let page = hva & !(PAGE - 1);
        self.space.is_mapped(page, page + PAGE).then_some((page, PAGE))
    }

    /// The miss path: installs the entry covering `hva` with the sequence-retry protocol and
    /// returns a read section of `slot`, opened before the table lock was released, so the entry
    /// is still installed when the caller copies through it (M1).
    fn install<'s>(
        &self,
        slot: &'s readers::Slot,
        region: &MmuRegion,
        hva: usize,
        gpa: u64,
    ) -> Result<readers::Section<'s>, AccessError> {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        // read_begin_range's precondition: the reader installs only inside the range it waits on.
        // An install here may create the 2 MiB entry of hva's block, so wait on the whole block
        // (issue 14 defect 8); else on the page.
        let (wait_start, wait_len) = match Self::huge_block(region, hva) {
            Some(block) => (block, HUGE),
            None => (hva & !(PAGE - 1), PAGE),
        };
        loop {
            // S1: no section is open here (the caller left its own before calling), so waiting
            // for an invalidation cannot hold up that invalidation's wait for readers.
            let seq = region.table.read_begin_range(wait_start, wait_start + wait_len);
            let Some((entry, size)) = self.translate(region, hva) else {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                return Err(AccessError::Unmapped { gpa });
            };
            debug_assert!(entry >= wait_start && entry + size <= wait_start + wait_len);
            let table = region.table.lock();
            if region.table.read_retry(&table, seq) {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // M1: the section opens under the table lock and keeps the entry installed until the
            // copy is done.
            let section = region.entries.install_locked(slot, entry, size);
            drop(table);
            let installs = if size == PAGE { &self.counters.installs_4k } else { &self.counters.installs_2m };
            installs.fetch_add(1, Ordering::Relaxed);
            return Ok(section);
        }
    }

    /// Copies `len` bytes between guest-physical `gpa` and the buffer of `dir` through installed
    /// translations (M1), installing the missing ones; the whole range is checked first.
    #[inline]
    fn access(&self, gpa: u64, len: usize, dir: Direction) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let region =
            self.region_of(gpa, len as u64).ok_or(AccessError::OutsideRam { gpa, len: len as u64 })?;
        with_reader_slot(|slot| {
            let entries = &*region.entries;
            #[cfg(feature = "fault-injection")]
            if entries.planted.armed() {
                return self.access_with(slot, region, gpa, len, dir);
            }
            // The common case first: the whole range covered by entries seen in one section.
            let hva = region.hva + (gpa - region.gpa) as usize;
            // M1: the hit path's read section; the copy below runs inside it.
            let (section, run) = entries.open(slot, hva, len);
            if run < len {
                drop(section);
                return self.access_with(slot, region, gpa, len, dir);
            }
            self.counters.hits.add(slot.index(), pieces(hva, len));
            // M1, M3: `section` keeps the entries covering [hva, hva + len) installed.
            let copied = self.copy_run(hva, len, dir, 0);
            // M1: the copy is over.
            drop(section);
            copied.map_err(|(not_copied, errno)| self.copy_error(gpa, 0, len, not_copied, errno))
        })
    }

    /// Copies `[hva, hva + run)` (guest RAM of one region, covered by entries an open read section
    /// of the caller saw: M1) with the buffer of `dir` at offset `done`; on failure, the bytes
    /// not copied and the errno when the host refused the copy for another reason than a fault.
    #[inline]
    fn copy_run(
        &self,
        hva: usize,
        run: usize,
        dir: Direction,
        done: usize,
    ) -> Result<(), (usize, Option<i32>)> {
        match self.path {
            // SAFETY: [hva, hva + run) is guest RAM of this region, covered by entries installed
            // while it was mapped and not torn down since (M1, M3: the caller's open section keeps
            // them installed); guest RAM is never the target of a Rust reference (the guest and
            // the VMM access it only with volatile or raw accesses), so the routine's loads and
            // stores alias nothing Rust assumes unchanged, and any byte is a valid u8. If the
            // mapping went away externally since (M2), the routine faults and returns an error
            // instead. The buffer side, `run` bytes at offset `done`, lies inside the caller's
            // buffer (done + run <= its length, the caller's contract): exclusively borrowed for a
            // read, only read for a write.
            CopyPath::Direct => unsafe {
                match dir {
                    Direction::Read(buf) => self.copier.copy(buf.add(done), hva as *const u8, run),
                    Direction::Write(buf) => self.copier.copy(hva as *mut u8, buf.add(done), run),
                }
            }
            .map_err(|fault| (fault.not_copied, None)),
            CopyPath::Syscall => syscall_copy(hva, run, dir, done),
        }
    }

    /// The error of a copy of `run` bytes at offset `done` of an access at `gpa` that failed with
    /// `not_copied` bytes left (and `errno` when the host refused it); counted in `faults`.
    #[cold]
    fn copy_error(
        &self,
        gpa: u64,
        done: usize,
        run: usize,
        not_copied: usize,
        errno: Option<i32>,
    ) -> AccessError {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let at = gpa + (done + (run - not_copied)) as u64;
        match errno {
            // Not "unmapped": the host refused the copy for another reason (a seccomp filter's
            // EPERM or ENOSYS, ...).
            Some(e) => {
                AccessError::Fault { gpa: at, errno: std::io::Error::from_raw_os_error(e).to_string() }
            }
            None => AccessError::Unmapped { gpa: at },
        }
    }

    /// [`GuestMmu::access`] with the calling thread's reader slot, piece by piece: any range,
    /// installing the missing entries.
    #[inline(never)]
    fn access_with(
        &self,
        slot: &readers::Slot,
        region: &MmuRegion,
        gpa: u64,
        len: usize,
        dir: Direction,
    ) -> Result<(), AccessError> {
        let entries = &*region.entries;
        let base = region.hva + (gpa - region.gpa) as usize;
        let mut done = 0;
        while done < len {
            let hva = base + done;
            let piece_gpa = gpa + done as u64;
            #[cfg(feature = "fault-injection")]
            if let Some(n) = entries.planted.access(self.copier, hva, len - done, dir, done) {
                self.counters.hits.add(slot.index(), 1);
                done += n;
                continue;
            }
            // M1: the hit path's read section; the copy below runs inside it.
            let (mut section, mut run) = entries.open(slot, hva, len - done);
            let mut hit_pieces = pieces(hva, run);
            if run == 0 {
                // S1: leave before the miss path waits on the notifier.
                drop(section);
                section = self.install(slot, region, hva, piece_gpa)?;
                run = entries.covered(hva, len - done);
                debug_assert!(run > 0, "the entry just installed is kept by the open section");
                hit_pieces = pieces(hva, run) - 1;
            }
            if hit_pieces > 0 {
                self.counters.hits.add(slot.index(), hit_pieces);
            }
            // M1, M3: `section` keeps the entries covering [hva, hva + run) installed.
            let copied = self.copy_run(hva, run, dir, done);
            // M1: the copy is over; a writer waiting for this section may go on.
            drop(section);
            if let Err((not_copied, errno)) = copied {
                return Err(self.copy_error(gpa, done, run, not_copied, errno));
            }
            done += run;
        }
        Ok(())
    }

    /// Drops every entry (for tests and for the end of a run).
    pub fn clear(&self) {
        for r in &self.regions {
            let _table = r.table.lock();
            r.entries.clear(reader_slots());
        }
    }
}

/// The number of 4 KiB pages `[hva, hva + len)` touches (0 for `len == 0`).
#[inline]
fn pieces(hva: usize, len: usize) -> u64 {
    if len == 0 {
        0
    } else {
        (((hva + len - 1) >> PAGE_SHIFT) - (hva >> PAGE_SHIFT) + 1) as u64
    }
}

impl GuestMemoryAccess for GuestMmu {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.access(gpa, buf.len(), Direction::Read(buf.as_mut_ptr()))
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        self.access(gpa, buf.len(), Direction::Write(buf.as_ptr()))
    }

    /// All the reads in one read section and, on [`CopyPath::Syscall`], one
    /// `process_vm_readv`, when they lie in one region and are all installed; else (or if that
    /// copy comes up short) one [`GuestMemoryAccess::read`] each, which installs what is
    /// missing and reports errors as a single read does.
    fn read_scattered(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), AccessError> {
        if !self.read_installed_at_once(reads) {
            for (gpa, buf) in reads.iter_mut() {
                self.read(*gpa, buf)?;
            }
        }
        Ok(())
    }
}

/// At most this many buffers are read at once by [`GuestMmu::read_scattered`] (Linux's
/// `IOV_MAX`, the most `process_vm_readv` takes).
const MAX_SCATTERED: usize = 1024;

impl GuestMmu {
    /// [`GuestMemoryAccess::read_scattered`]'s one-operation case: whether it copied every
    /// buffer (all inside one region, all covered by entries seen in one read section). Counts
    /// the hits only when it did; any failure leaves the work (and its counting) to single reads.
    fn read_installed_at_once(&self, reads: &mut [(u64, &mut [u8])]) -> bool {
        let Some((gpa0, buf0)) = reads.first() else { return true };
        if reads.len() > MAX_SCATTERED {
            return false;
        }
        let Some(region) = self.region_of(*gpa0, buf0.len() as u64) else { return false };
        let entries = &*region.entries;
        #[cfg(feature = "fault-injection")]
        if entries.planted.armed() {
            return false;
        }
        let mut hvas = Vec::with_capacity(reads.len());
        for (gpa, buf) in reads.iter() {
            match self.region_of(*gpa, buf.len() as u64) {
                Some(r) if std::ptr::eq(r, region) => hvas.push(region.hva + (gpa - region.gpa) as usize),
                _ => return false,
            }
        }
        with_reader_slot(|slot| {
            // M1 (S2): announce, then look; every buffer is copied inside this one section.
            let section = slot.enter(entries.id());
            if !reads.iter().zip(&hvas).all(|((_, buf), &hva)| entries.covered(hva, buf.len()) == buf.len()) {
                return false;
            }
            let copied = match self.path {
                CopyPath::Direct => reads.iter_mut().zip(&hvas).all(|((_, buf), &hva)| {
                    // SAFETY: as in `copy_run`: [hva, hva + buf.len()) is guest RAM of this
                    // region covered by entries `section` keeps installed (M1, M3), never the
                    // target of a Rust reference; a fault is returned (M2); `buf` is ours.
                    unsafe { self.copier.read(buf, hva as *const u8) }.is_ok()
                }),
                CopyPath::Syscall => {
                    let total: usize = reads.iter().map(|(_, b)| b.len()).sum();
                    let local: Vec<libc::iovec> = reads
                        .iter_mut()
                        .map(|(_, b)| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
                        .collect();
                    let remote: Vec<libc::iovec> = reads
                        .iter()
                        .zip(&hvas)
                        .map(|((_, b), &hva)| libc::iovec {
                            iov_base: hva as *mut libc::c_void,
                            iov_len: b.len(),
                        })
                        .collect();
                    // SAFETY: every local iovec is one of the caller's exclusively borrowed
                    // buffers; the remote side is this process's own guest RAM, covered by
                    // entries `section` keeps installed (M1), which the kernel checks (EFAULT or
                    // a short count if not mapped); no Rust reference to guest memory is made.
                    let n = unsafe {
                        libc::process_vm_readv(
                            own_pid(),
                            local.as_ptr(),
                            local.len() as libc::c_ulong,
                            remote.as_ptr(),
                            remote.len() as libc::c_ulong,
                            0,
                        )
                    };
                    n == total as isize
                }
            };
            // M1: the copies are over.
            drop(section);
            if copied {
                let hits = reads.iter().zip(&hvas).map(|((_, b), &hva)| pieces(hva, b.len())).sum();
                self.counters.hits.add(slot.index(), hits);
            }
            copied
        })
    }
}

/// **Planted fault, for tests only** (cargo feature `fault-injection`): stale translations.
///
/// Armed with [`GuestMmu::plant_stale_translations`], the next invalidations keep the entries of
/// up to `pages` pages alive: the table keeps translating those pages to the frame they had when
/// the teardown began, as a table that missed the invalidation would keep pointing at a frame the
/// kernel freed. zapvm's entries carry no pointer (M3: they only say "the linear mapping is
/// valid"), so the old frame is modelled by a copy of the page taken at `invalidate_range_start`;
/// from then on every access to the page goes to that copy (reads see the old data, writes are
/// lost to the guest). The table race test and the stress run's device-path check must see it.
#[cfg(feature = "fault-injection")]
mod planted;

#[cfg(feature = "fault-injection")]
impl GuestMmu {
    /// **Planted fault, for tests only**: the next invalidations keep up to `pages` pages' entries
    /// alive per region, translating to the frame they had (see the `planted` module).
    pub fn plant_stale_translations(&self, pages: usize) {
        for r in &self.regions {
            r.entries.planted.arm(pages);
        }
    }

    /// How many stale translations the planted fault has kept alive so far.
    pub fn planted_stale_translations(&self) -> u64 {
        self.regions.iter().map(|r| r.entries.planted.fired()).sum()
    }
}

/// The read-side protocol on its own, for the loom models of `tests/loom.rs` (built only with
/// `--cfg loom`, where the slots' and the bitmaps' atomics are loom's): the very functions the
/// hit path, the install and `invalidate_range_start` call.
#[cfg(loom)]
#[doc(hidden)]
pub mod model {
    pub use super::readers::{PlantedFault, Section, Slot, SlotList};

    /// The entries of one region.
    pub struct Table(super::Entries);

    impl Table {
        /// No entries over host `[hva, hva + len)`.
        pub fn new(hva: usize, len: usize) -> Self {
            Table(super::Entries::new(hva, len))
        }

        /// The hit path's look: a section of `slot` and the bytes from `hva` covered inside it.
        pub fn open<'s>(&self, slot: &'s Slot, hva: usize, len: usize) -> (Section<'s>, usize) {
            self.0.open(slot, hva, len)
        }

        /// The install's last step (call under the table lock): sets the 4 KiB entry of `page`
        /// and opens a section of `slot`.
        pub fn install_page<'s>(&self, slot: &'s Slot, page: usize) -> Section<'s> {
            self.0.install_locked(slot, page, super::PAGE)
        }

        /// Sets the 4 KiB entry of `page` without a section (the state before a model starts).
        pub fn preinstall_page(&self, page: usize) {
            self.0.pages.set(self.0.page_index(page));
        }

        /// `invalidate_range_start`'s work (call under the table lock).
        pub fn drop_overlapping(&self, slots: &SlotList, start: usize, end: usize) -> u64 {
            self.0.drop_overlapping(slots, start, end)
        }

        /// Bytes from `hva` covered, looked at outside any section (for the end-of-model checks).
        pub fn covered(&self, hva: usize, len: usize) -> usize {
            self.0.covered(hva, len)
        }
    }
}

#[cfg(test)]
mod tests;
