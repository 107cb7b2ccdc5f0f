//! The VMM's own second-level table: guest frame -> host virtual address.
//!
//! zapvm is a secondary MMU of its own address space. Every access the VMM makes to guest RAM on
//! the guest's behalf (ucall records, virtqueues, balloon PFN arrays, the host's check of guest
//! pages) goes through a [`GuestMmu`], which translates guest-physical addresses with a table of
//! 4 KiB and 2 MiB entries that is
//! - **filled on demand** through the notifier's sequence-retry read: `read_begin` (waits while
//!   an invalidation of the range runs) -> translate (check that the host range is still mapped,
//!   pick the entry size) -> take the table lock -> `read_retry` (start over if an overlapping
//!   invalidation began or ended meanwhile) -> install;
//! - **torn down only** by the notifier's `invalidate_range_start` callback, under the table lock,
//!   for every range that overlaps an entry — a 4 KiB discard inside a 2 MiB entry drops the
//!   whole 2 MiB entry (the notifier also widens ranges that cut a THP to whole huge pages).
//!
//! # Invariants
//! - M1. An access copies guest memory only while it holds the table lock of the region and the
//!   entry covering the address is installed. `invalidate_range_start` takes the same lock to drop
//!   entries, so when start returns no copy through a dropped entry is in flight, and none starts
//!   until a new entry is installed, which `read_begin` delays until the invalidation's end. For
//!   the VMM's own operations (start -> syscall -> end) no device access ever sees a half-done
//!   teardown: it completes before the syscall or begins after the end.
//! - M2. External teardowns (the userfaultfd monitor) reach the table after the kernel acted (see
//!   `notifier::Monitor`), so a copy may race an external munmap. Copies therefore use
//!   `process_vm_readv`/`process_vm_writev` on this process, which fail with EFAULT on an
//!   unmapped address instead of raising SIGSEGV: an external munmap of guest RAM is an access
//!   error for the device, never a crash of the VMM.
//! - M3. The translation is linear per region (guest RAM regions are contiguous in both spaces),
//!   so an entry needs no payload: its presence says "this host range was mapped when the entry
//!   was installed, and no teardown has touched it since".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier::{AddressSpace, Event, IntervalHandle, Range};
use vm_memory::ByteValued;

use crate::memory::{GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};

/// Why a guest memory access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// Part of the range is not guest RAM.
    #[error("guest-physical range [{gpa:#x}, +{len:#x}) is not guest RAM")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The host mapping behind guest RAM is gone (unmapped by someone).
    #[error("guest RAM at {gpa:#x} has no host mapping (it was unmapped)")]
    Unmapped {
        /// The address.
        gpa: u64,
    },
    /// The host refused the copy.
    #[error("copying guest RAM at {gpa:#x} failed: {errno}")]
    Fault {
        /// The address.
        gpa: u64,
        /// The errno's text.
        errno: String,
    },
}

/// Reading and writing guest memory on the guest's behalf.
pub trait GuestMemoryAccess: Send + Sync {
    /// Fills `buf` from guest-physical `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes `buf` to guest-physical `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError>;
}

/// Reads a plain-data `T` at `gpa`.
pub fn read_obj<T: ByteValued + Default>(mem: &dyn GuestMemoryAccess, gpa: u64) -> Result<T, AccessError> {
    let mut value = T::default();
    mem.read(gpa, value.as_mut_slice())?;
    Ok(value)
}

/// Writes a plain-data `T` at `gpa`.
pub fn write_obj<T: ByteValued>(mem: &dyn GuestMemoryAccess, value: T, gpa: u64) -> Result<(), AccessError> {
    mem.write(gpa, value.as_slice())
}

/// Counters of the table (all monotonic).
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    installs_4k: AtomicU64,
    installs_2m: AtomicU64,
    retries: AtomicU64,
    faults: AtomicU64,
    /// Entries dropped, per notifier event kind (discard, unmap, remap, protect, release).
    torn_down: [AtomicU64; 5],
}

fn kind_index(event: &Event) -> usize {
    match event {
        Event::Discard(_) => 0,
        Event::Unmap => 1,
        Event::Remap { .. } => 2,
        Event::Protect { .. } => 3,
        Event::Release => 4,
    }
}

const KIND_NAMES: [&str; 5] = ["discard", "unmap", "remap", "protect", "release"];

/// A snapshot of the table's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MmuStats {
    /// Accesses whose translation was installed.
    pub hits: u64,
    /// Accesses that had to install a translation.
    pub misses: u64,
    /// 4 KiB entries installed.
    pub installs_4k: u64,
    /// 2 MiB entries installed.
    pub installs_2m: u64,
    /// Installs that started over because an invalidation overlapped them.
    pub retries: u64,
    /// Accesses that failed (host mapping gone).
    pub faults: u64,
    /// Entries currently installed.
    pub entries: u64,
    /// Entries torn down, per event kind.
    pub torn_down: BTreeMap<String, u64>,
}

/// The entries of one region: host address of the entry -> its size.
#[derive(Default)]
struct Table {
    entries: BTreeMap<usize, usize>,
}

impl Table {
    fn covers(&self, hva: usize) -> bool {
        let page = hva & !(PAGE_SIZE as usize - 1);
        let huge = hva & !(HUGE_PAGE_SIZE as usize - 1);
        self.entries.get(&page) == Some(&(PAGE_SIZE as usize))
            || self.entries.get(&huge) == Some(&(HUGE_PAGE_SIZE as usize))
    }

    /// Drops every entry overlapping `[start, end)`; returns how many.
    fn drop_overlapping(&mut self, start: usize, end: usize) -> u64 {
        let from = start.saturating_sub(HUGE_PAGE_SIZE as usize - 1);
        let doomed: Vec<usize> =
            self.entries.range(from..end).filter(|(&s, &len)| s + len > start).map(|(&s, _)| s).collect();
        for s in &doomed {
            self.entries.remove(s);
        }
        doomed.len() as u64
    }
}

struct MmuRegion {
    gpa: u64,
    len: u64,
    hva: usize,
    /// Host memory comes in 2 MiB pages (THP or hugetlb): install 2 MiB entries.
    huge: bool,
    table: IntervalHandle<Table>,
}

/// Guest-physical -> host-virtual translation for the VMM's accesses to guest RAM.
pub struct GuestMmu {
    space: Arc<AddressSpace>,
    regions: Vec<MmuRegion>,
    counters: Arc<Counters>,
}

impl GuestMmu {
    /// A table over every region of `ram`, subscribed to `space` (which must cover `ram`).
    pub fn new(ram: &GuestRam, space: Arc<AddressSpace>) -> Result<Self, notifier::Error> {
        let counters = Arc::new(Counters::default());
        let mut regions = Vec::new();
        for (gpa, hva, len) in ram.regions() {
            let c = counters.clone();
            let table = space.subscribe_interval(
                &format!("vmm-table@{:#x}", gpa.0),
                hva as usize,
                len as usize,
                Table::default(),
                move |table: &mut Table, range: &Range| {
                    // M1: runs under the table lock, at invalidate_range_start.
                    let dropped = table.drop_overlapping(range.start, range.end);
                    c.torn_down[kind_index(&range.event)].fetch_add(dropped, Ordering::Relaxed);
                },
            )?;
            regions.push(MmuRegion { gpa: gpa.0, len, hva: hva as usize, huge: ram.huge_pages(), table });
        }
        Ok(Self { space, regions, counters })
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

    fn region_of(&self, gpa: u64, len: u64) -> Option<&MmuRegion> {
        let end = gpa.checked_add(len)?;
        self.regions.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
    }

    /// The counters.
    pub fn stats(&self) -> MmuStats {
        let c = &self.counters;
        MmuStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            installs_4k: c.installs_4k.load(Ordering::Relaxed),
            installs_2m: c.installs_2m.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            entries: self.regions.iter().map(|r| r.table.lock().entries.len() as u64).sum(),
            torn_down: KIND_NAMES
                .iter()
                .zip(&c.torn_down)
                .map(|(name, n)| (name.to_string(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Whether `hva` (inside `region`) is still mapped according to the notifier, and the size
    /// of the entry to install for it.
    fn translate(&self, region: &MmuRegion, hva: usize) -> Option<usize> {
        let huge = HUGE_PAGE_SIZE as usize;
        let huge_start = hva & !(huge - 1);
        let inside = |s: usize, e: usize| self.space.is_mapped(s, e);
        if region.huge
            && huge_start >= region.hva
            && huge_start + huge <= region.hva + region.len as usize
            && inside(huge_start, huge_start + huge)
        {
            return Some(huge);
        }
        let page = hva & !(PAGE_SIZE as usize - 1);
        inside(page, page + PAGE_SIZE as usize).then_some(PAGE_SIZE as usize)
    }

    /// Runs `copy(hva)` for the piece of guest memory at `gpa` (inside one 4 KiB page) with an
    /// installed translation, holding the table lock (M1).
    fn with_translation(
        &self,
        gpa: u64,
        len: usize,
        copy: &mut dyn FnMut(usize) -> Result<(), AccessError>,
    ) -> Result<(), AccessError> {
        let region =
            self.region_of(gpa, len as u64).ok_or(AccessError::OutsideRam { gpa, len: len as u64 })?;
        let hva = region.hva + (gpa - region.gpa) as usize;
        {
            let table = region.table.lock();
            if table.covers(hva) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return copy(hva);
            }
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        loop {
            let page = hva & !(PAGE_SIZE as usize - 1);
            let seq = region.table.read_begin_range(page, page + PAGE_SIZE as usize);
            let Some(size) = self.translate(region, hva) else {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                return Err(AccessError::Unmapped { gpa });
            };
            let mut table = region.table.lock();
            if region.table.read_retry(&table, seq) {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            table.entries.insert(hva & !(size - 1), size);
            let installs = if size == PAGE_SIZE as usize {
                &self.counters.installs_4k
            } else {
                &self.counters.installs_2m
            };
            installs.fetch_add(1, Ordering::Relaxed);
            return copy(hva);
        }
    }

    /// Drops every entry (for tests and for the end of a run).
    pub fn clear(&self) {
        for r in &self.regions {
            r.table.lock().entries.clear();
        }
    }
}

fn pages(gpa: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    // (gpa of the piece, offset into the buffer, length of the piece), each inside one page.
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let at = gpa + offset as u64;
        let piece = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - offset);
        let item = (at, offset, piece);
        offset += piece;
        Some(item)
    })
}

/// `process_vm_readv`/`writev` on this process: a copy that reports EFAULT instead of faulting.
fn safe_copy(gpa: u64, local: *mut u8, remote: usize, len: usize, write: bool) -> Result<(), AccessError> {
    let local_iov = libc::iovec { iov_base: local.cast(), iov_len: len };
    let remote_iov = libc::iovec { iov_base: remote as *mut libc::c_void, iov_len: len };
    // SAFETY: `local` points at `len` bytes of a buffer the caller owns (read side: writable).
    // The remote side is this process's own memory; the kernel checks it and returns EFAULT if
    // it is not mapped, so no Rust reference to guest memory is created.
    let done = unsafe {
        if write {
            libc::process_vm_writev(libc::getpid(), &local_iov, 1, &remote_iov, 1, 0)
        } else {
            libc::process_vm_readv(libc::getpid(), &local_iov, 1, &remote_iov, 1, 0)
        }
    };
    if done == len as isize {
        Ok(())
    } else if done < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT) || done >= 0 {
        Err(AccessError::Unmapped { gpa })
    } else {
        Err(AccessError::Fault { gpa, errno: std::io::Error::last_os_error().to_string() })
    }
}

impl GuestMemoryAccess for GuestMmu {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let base = buf.as_mut_ptr();
        for (at, offset, len) in pages(gpa, buf.len()) {
            // SAFETY (pointer arithmetic): offset + len <= buf.len().
            let local = unsafe { base.add(offset) };
            self.with_translation(at, len, &mut |hva| safe_copy(at, local, hva, len, false))?;
        }
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        let base = buf.as_ptr() as *mut u8;
        for (at, offset, len) in pages(gpa, buf.len()) {
            // SAFETY (pointer arithmetic): offset + len <= buf.len(); the buffer is only read.
            let local = unsafe { base.add(offset) };
            self.with_translation(at, len, &mut |hva| safe_copy(at, local, hva, len, true))?;
        }
        Ok(())
    }
}

/// Direct access through vm-memory, for the boot loaders and unit tests (not on the guest's
/// behalf at run time: those go through [`GuestMmu`]).
impl GuestMemoryAccess for crate::memory::GuestMemoryMmap {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        vm_memory::Bytes::read_slice(self, buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| AccessError::OutsideRam { gpa, len: buf.len() as u64 })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        vm_memory::Bytes::write_slice(self, buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| AccessError::OutsideRam { gpa, len: buf.len() as u64 })
    }
}

/// Why [`GuestMmu::discard`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is empty, overflows, or is not inside one guest RAM region: refused before any
    /// syscall.
    #[error("guest-physical range [{gpa:#x}, +{len:#x}) is not inside one guest RAM region")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The notifier refused the operation (e.g. not aligned to the region's page size) or the
    /// kernel failed it.
    #[error("discard of guest-physical [{gpa:#x}, +{len:#x}): {source}")]
    Notifier {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// What the notifier said.
        #[source]
        source: notifier::Error,
    },
}

/// Discards on the guest's behalf: the one handle through which devices give guest RAM back to
/// the host (the balloon, virtio-mem), as Firecracker's `remove_range` is.
impl GuestMmu {
    /// Discards guest-physical `[gpa, gpa + len)`: the range is translated and checked once (it
    /// must lie inside one guest RAM region, which makes the host range linear), then the host
    /// range goes to **one** notifier operation (`invalidate_range_start` -> madvise/fallocate ->
    /// `invalidate_range` -> end), so this table and every other subscriber drop their
    /// translations before the syscall. A range outside guest RAM never reaches a syscall.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<notifier::OpReport, DiscardError> {
        let outside = DiscardError::OutsideRam { gpa, len };
        let hva = self.host_range(gpa, len).filter(|_| len > 0).ok_or(outside)?;
        let host_len = usize::try_from(len).map_err(|_| DiscardError::OutsideRam { gpa, len })?;
        self.space().discard(hva, host_len).map_err(|source| DiscardError::Notifier { gpa, len, source })
    }
}
