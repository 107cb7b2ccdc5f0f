//! The address space: guest-RAM regions, the VMM's operations on them, and subscriptions.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::interval::Interval;
use crate::ledger::{OwnKind, OwnOps, RawEvent};
use crate::range::{align_down, align_up, overlaps, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::registry::{Registry, SubscriptionId};
use crate::stats::{Stats, SubscriberStats};
use crate::{DiscardMethod, Error, Event, Origin, Range, Subscriber};

/// What backs a region of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`. Discard: `MADV_DONTNEED`.
    PrivateAnon,
    /// `MAP_SHARED` mapping of a memfd (or other shmem file) at `offset`. Discard:
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` (no userfaultfd event) or `MADV_REMOVE`. The address
    /// space keeps its own duplicate of `fd`.
    SharedMemfd {
        /// The file.
        fd: RawFd,
        /// File offset of the region's first byte.
        offset: u64,
    },
    /// hugetlb pages of `page_size` bytes (2 MiB or 1 GiB), from a hugetlbfs/`MFD_HUGETLB` file
    /// (`file` = fd and offset; discard by `PUNCH_HOLE`) or `MAP_HUGETLB` anonymous memory
    /// (`file` = None; discard by `MADV_DONTNEED`). Every operation must be aligned to
    /// `page_size`.
    Hugetlb {
        /// 2 MiB or 1 GiB.
        page_size: usize,
        /// Backing file and offset, if any.
        file: Option<(RawFd, u64)>,
    },
}

/// A region of guest RAM as the VMM mapped it.
#[derive(Clone, Copy, Debug)]
pub struct RegionSpec {
    /// Host virtual address (page-aligned).
    pub host_addr: usize,
    /// Length (page-aligned, non-zero).
    pub len: usize,
    /// Backing.
    pub backing: Backing,
    /// Whether `MADV_HUGEPAGE` was applied (transparent huge pages may back it): ranges that cut
    /// a 2 MiB-aligned block are then notified as whole 2 MiB blocks.
    pub thp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Anon,
    Shared,
    Hugetlb(usize),
}

#[derive(Clone, Debug)]
pub(crate) struct Region {
    start: usize,
    end: usize,
    kind: Kind,
    /// Duplicated fd and the file offset of `start`.
    file: Option<(Arc<OwnedFd>, u64)>,
    thp: bool,
}

impl Region {
    pub(crate) fn span(&self) -> (usize, usize) {
        (self.start, self.end)
    }

    fn align(&self) -> usize {
        match self.kind {
            Kind::Hugetlb(p) => p,
            _ => PAGE_SIZE,
        }
    }

    /// The part `[s, e)` of this region as a region of its own.
    fn slice(&self, s: usize, e: usize) -> Region {
        Region {
            start: s,
            end: e,
            kind: self.kind,
            file: self.file.as_ref().map(|(f, off)| (f.clone(), off + (s - self.start) as u64)),
            thp: self.thp,
        }
    }

    /// The range notified for `[s, e)`: whole 2 MiB blocks if THP may back it (a safe superset of
    /// what the kernel zaps, needed by subscribers that cache 2 MiB translations; see [`Range`]).
    fn widen(&self, s: usize, e: usize) -> (usize, usize) {
        if self.thp {
            (align_down(s, HUGE_PAGE_SIZE).max(self.start), align_up(e, HUGE_PAGE_SIZE).min(self.end))
        } else {
            (s, e)
        }
    }
}

/// Information about a region (for tests and `zapvm stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegionInfo {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Whether THP widening applies.
    pub thp: bool,
}

/// Options of one VMM operation.
#[derive(Clone, Copy, Debug)]
pub struct OpOptions {
    /// Whether subscribers' `invalidate_range_start` may sleep. When false they may refuse.
    pub blockable: bool,
    /// How often to retry after a refusal (yielding in between) before returning
    /// [`Error::Refused`].
    pub max_retries: u32,
    /// Discard method; `None` picks by backing (anon: DONTNEED; memfd and hugetlb with a file:
    /// PUNCH_HOLE; anonymous hugetlb: DONTNEED).
    pub discard: Option<DiscardMethod>,
}

impl Default for OpOptions {
    fn default() -> Self {
        OpOptions { blockable: true, max_retries: 0, discard: None }
    }
}

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpReport {
    /// The range subscribers were told of.
    pub range: Range,
    /// Retries after refusals.
    pub retries: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Discard(Option<DiscardMethod>),
    Unmap,
    Remap { dst: usize },
    Protect { prot: i32 },
}

/// A handle to an [`Interval`] subscription; dereferences to it.
pub struct IntervalHandle<T> {
    /// The subscription id (for [`AddressSpace::unsubscribe`]).
    pub id: SubscriptionId,
    /// The subscription.
    pub sub: Arc<Interval<T>>,
}

impl<T> std::ops::Deref for IntervalHandle<T> {
    type Target = Interval<T>;
    fn deref(&self) -> &Interval<T> {
        &self.sub
    }
}

/// The VMM's guest-RAM mappings, the subscribers of their teardowns, and the operations that tear
/// them down (the userspace counterpart of an `mm_struct` with its `mmu_notifier_subscriptions`).
///
/// Every operation runs: validation (no syscall on bad input) -> `invalidate_range_start` of every
/// overlapping subscriber (no lock of the crate held) -> the mapping lock -> the syscall ->
/// `invalidate_range` (mapping lock held) -> the mapping lock released -> `invalidate_range_end`.
/// External teardowns (the monitor's worker) and [`AddressSpace::release`] run start ->
/// `invalidate_range` -> end with no lock of the crate held.
///
/// # Invariants
///
/// * S1. An operation never maps over memory it was not given: a remap's destination is reserved
///   with `MAP_FIXED_NOREPLACE` (failing if anything is mapped there) before `MREMAP_FIXED`
///   replaces that reservation, under the mapping lock.
pub struct AddressSpace {
    regions: RwLock<Vec<Region>>,
    pub(crate) reg: Registry,
    pub(crate) own: OwnOps,
    pub(crate) uffd: Mutex<Option<Arc<crate::uffd::Userfaultfd>>>,
    released: AtomicBool,
    /// Host ranges the caller sealed with `mseal(2)` ([`AddressSpace::mark_sealed`]): the own
    /// unmap, remap and protect operations refuse any range overlapping one of them.
    sealed: RwLock<Vec<(usize, usize)>>,
    /// The first and one-past-last byte of each region given to [`AddressSpace::new`]: regions
    /// never merge across them (see `coalesce_around`).
    seams: Vec<usize>,
}

fn check_range(start: usize, len: usize) -> Result<(usize, usize), Error> {
    if len == 0 {
        return Err(Error::Empty);
    }
    if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Error::Unaligned { start, len, align: PAGE_SIZE });
    }
    let end = start.checked_add(len).ok_or(Error::Overflow)?;
    Ok((start, end))
}

fn dup_fd(fd: RawFd) -> Result<OwnedFd, Error> {
    // SAFETY: F_DUPFD_CLOEXEC takes no pointer; an invalid fd yields EBADF.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(Error::Os { op: "fcntl(F_DUPFD_CLOEXEC)", source: std::io::Error::last_os_error() });
    }
    // SAFETY: `n` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn os(op: &'static str, r: libc::c_int) -> Result<(), Error> {
    if r != 0 {
        Err(Error::Os { op, source: std::io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

impl AddressSpace {
    /// An address space over `regions`.
    ///
    /// # Safety
    ///
    /// Each region must be a mapping the caller owns that stays mapped until it is unmapped or
    /// moved through this address space (or the program no longer uses it), and whose contents
    /// no Rust reference (`&`/`&mut`) points into while an operation of this address space or an
    /// external teardown may run: guest RAM is accessed through raw pointers / volatile accesses
    /// only (as `vm-memory` does), because the operations discard, unmap, move and re-protect it.
    pub unsafe fn new(regions: &[RegionSpec]) -> Result<Arc<AddressSpace>, Error> {
        // SAFETY: sysconf takes no pointer.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if ps != PAGE_SIZE as libc::c_long {
            return Err(Error::PageSize(ps as usize));
        }
        let space = AddressSpace {
            regions: RwLock::new(Vec::new()),
            reg: Registry::new(),
            own: OwnOps::default(),
            uffd: Mutex::new(None),
            released: AtomicBool::new(false),
            sealed: RwLock::new(Vec::new()),
            seams: regions.iter().flat_map(|r| [r.host_addr, r.host_addr.wrapping_add(r.len)]).collect(),
        };
        for r in regions {
            // SAFETY: forwarded from this function's contract.
            unsafe { space.add_region(r)? };
        }
        Ok(Arc::new(space))
    }

    /// Adds a region (e.g. hot-plugged memory). If the monitor runs, the region is registered
    /// with it.
    ///
    /// # Safety
    ///
    /// As for [`AddressSpace::new`].
    pub unsafe fn add_region(&self, r: &RegionSpec) -> Result<(), Error> {
        let (start, end) = check_range(r.host_addr, r.len)?;
        let (kind, file) = match r.backing {
            Backing::PrivateAnon => (Kind::Anon, None),
            Backing::SharedMemfd { fd, offset } => (Kind::Shared, Some((dup_fd(fd)?, offset))),
            Backing::Hugetlb { page_size, file } => {
                if page_size != HUGE_PAGE_SIZE && page_size != 1 << 30 {
                    return Err(Error::BadHugePageSize(page_size));
                }
                if start % page_size != 0 || r.len % page_size != 0 {
                    return Err(Error::Unaligned { start, len: r.len, align: page_size });
                }
                let file = match file {
                    Some((fd, off)) => Some((dup_fd(fd)?, off)),
                    None => None,
                };
                (Kind::Hugetlb(page_size), file)
            }
        };
        let region = Region {
            start,
            end,
            kind,
            file: file.map(|(f, o)| (Arc::new(f), o)),
            thp: r.thp && !matches!(kind, Kind::Hugetlb(_)),
        };
        let mut g = self.write_regions();
        // Under the mapping lock, which `release` takes to empty the regions after it set
        // `released`: no region is added to a released space (its memory may be gone).
        if self.released.load(Ordering::Acquire) {
            return Err(Error::Released);
        }
        if g.iter().any(|x| overlaps(x.start, x.end, start, end)) {
            return Err(Error::RegionsOverlap { start, end });
        }
        if self.own.active.load(Ordering::SeqCst) {
            if let Some(u) = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                crate::uffd::register_range(u, start, end)?;
            }
        }
        g.push(region);
        g.sort_by_key(|x| x.start);
        let i = g.iter().position(|x| x.start == start).expect("the region just added");
        coalesce_around(&mut g, i, &self.seams);
        Ok(())
    }

    pub(crate) fn read_regions(&self) -> RwLockReadGuard<'_, Vec<Region>> {
        self.regions.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write_regions(&self) -> RwLockWriteGuard<'_, Vec<Region>> {
        self.regions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The current regions.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.read_regions().iter().map(|r| RegionInfo { start: r.start, end: r.end, thp: r.thp }).collect()
    }

    /// Whether `[start, end)` lies inside one current region (mapped and known to the address
    /// space). Allocation-free, for translation paths.
    pub fn is_mapped(&self, start: usize, end: usize) -> bool {
        self.read_regions().iter().any(|r| r.start <= start && end <= r.end)
    }

    /// Records that `[start, start + len)` (inside one region) is sealed with `mseal(2)`: the
    /// kernel refuses every `munmap`, `mremap`, `mprotect` and `mmap(MAP_FIXED)` over it, by
    /// anyone, for the life of the process. From now on [`Self::unmap`], [`Self::remap`] and
    /// [`Self::protect`] of a range overlapping it fail with [`Error::Sealed`] before any
    /// notification or syscall, rather than notifying subscribers of a teardown the kernel then
    /// refuses. Discards are unaffected: `MADV_DONTNEED` on writable private memory,
    /// `MADV_REMOVE` and `fallocate(PUNCH_HOLE)` work on sealed memory.
    ///
    /// The address space does not seal anything itself (the caller owns the mapping and seals
    /// it where it creates it); marking a range that is not sealed only makes these operations
    /// refuse it. The mark is never lifted: a seal cannot be.
    pub fn mark_sealed(&self, start: usize, len: usize) -> Result<(), Error> {
        let (start, end) = check_range(start, len)?;
        if !self.is_mapped(start, end) {
            return Err(Error::NotMapped { start, end });
        }
        self.sealed.write().unwrap_or_else(|p| p.into_inner()).push((start, end));
        Ok(())
    }

    /// Whether any part of `[start, end)` was marked sealed ([`Self::mark_sealed`]).
    pub fn is_sealed(&self, start: usize, end: usize) -> bool {
        self.sealed.read().unwrap_or_else(|p| p.into_inner()).iter().any(|&(s, e)| overlaps(s, e, start, end))
    }

    /// Subscribes `sub` to every range.
    pub fn subscribe(&self, sub: Arc<dyn Subscriber>) -> Result<SubscriptionId, Error> {
        self.reg.subscribe(sub, 0, usize::MAX)
    }

    /// Subscribes `sub` to ranges overlapping `[start, start + len)`.
    pub fn subscribe_range(
        &self,
        sub: Arc<dyn Subscriber>,
        start: usize,
        len: usize,
    ) -> Result<SubscriptionId, Error> {
        let end = start.checked_add(len).ok_or(Error::Overflow)?;
        self.reg.subscribe(sub, start, end)
    }

    /// Creates and subscribes an [`Interval`] over `[start, start + len)` owning `table`.
    pub fn subscribe_interval<T: Send + 'static>(
        &self,
        name: &str,
        start: usize,
        len: usize,
        table: T,
        on_invalidate: impl Fn(&mut T, &Range) + Send + Sync + 'static,
    ) -> Result<IntervalHandle<T>, Error> {
        let end = start.checked_add(len).ok_or(Error::Overflow)?;
        let sub = Arc::new(Interval::new(name, start, end, table, on_invalidate));
        let id = self.reg.subscribe(sub.clone(), start, end)?;
        Ok(IntervalHandle { id, sub })
    }

    /// Removes a subscription. Returns after no callback of it can still run (it got an end for
    /// every start it accepted). Fails with [`Error::InCallback`] when called from inside a
    /// teardown (it would wait for itself).
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<SubscriberStats, Error> {
        self.reg.unsubscribe(id)
    }

    /// Discards `[start, start + len)` (contents become zero, or the page-cache contents for
    /// DONTNEED on shared memory); the mapping stays.
    pub fn discard(&self, start: usize, len: usize) -> Result<OpReport, Error> {
        self.run(Op::Discard(None), start, len, OpOptions::default())
    }

    /// Unmaps `[start, start + len)` and removes it from the regions.
    pub fn unmap(&self, start: usize, len: usize) -> Result<OpReport, Error> {
        self.run(Op::Unmap, start, len, OpOptions::default())
    }

    /// Moves `[start, start + len)` to `dst` (`mremap(MAYMOVE | FIXED)`). The destination must be
    /// free address space: it must not overlap any region ([`Error::DestinationOverlaps`]) and
    /// nothing may be mapped there ([`Error::DestinationOccupied`], checked by reserving it with
    /// `MAP_FIXED_NOREPLACE`, invariant S1), so a remap never replaces anyone's memory.
    pub fn remap(&self, start: usize, len: usize, dst: usize) -> Result<OpReport, Error> {
        self.run(Op::Remap { dst }, start, len, OpOptions::default())
    }

    /// Changes the protection of `[start, start + len)` to `prot` (`PROT_*`).
    pub fn protect(&self, start: usize, len: usize, prot: i32) -> Result<OpReport, Error> {
        self.run(Op::Protect { prot }, start, len, OpOptions::default())
    }

    /// [`Self::discard`] with options.
    pub fn discard_with(&self, start: usize, len: usize, o: OpOptions) -> Result<OpReport, Error> {
        self.run(Op::Discard(o.discard), start, len, o)
    }

    /// [`Self::unmap`] with options.
    pub fn unmap_with(&self, start: usize, len: usize, o: OpOptions) -> Result<OpReport, Error> {
        self.run(Op::Unmap, start, len, o)
    }

    /// [`Self::remap`] with options.
    pub fn remap_with(&self, start: usize, len: usize, dst: usize, o: OpOptions) -> Result<OpReport, Error> {
        self.run(Op::Remap { dst }, start, len, o)
    }

    /// [`Self::protect`] with options.
    pub fn protect_with(&self, start: usize, len: usize, prot: i32, o: OpOptions) -> Result<OpReport, Error> {
        self.run(Op::Protect { prot }, start, len, o)
    }

    /// Validates `op` against the regions: the region index, the notified range and the event.
    fn plan(
        &self,
        regions: &[Region],
        op: Op,
        start: usize,
        end: usize,
    ) -> Result<(usize, (usize, usize), Event), Error> {
        let Some(i) = regions.iter().position(|r| r.start <= start && end <= r.end) else {
            return Err(Error::NotMapped { start, end });
        };
        let r = &regions[i];
        let a = r.align();
        if start % a != 0 || (end - start) % a != 0 {
            return Err(Error::Unaligned { start, len: end - start, align: a });
        }
        let event = match op {
            Op::Discard(m) => {
                let m = match m {
                    Some(m) => m,
                    None => match (r.kind, &r.file) {
                        (Kind::Anon, _) | (Kind::Hugetlb(_), None) => DiscardMethod::DontNeed,
                        _ => DiscardMethod::PunchHole,
                    },
                };
                match m {
                    DiscardMethod::DontNeed => {}
                    DiscardMethod::PunchHole if r.file.is_some() => {}
                    DiscardMethod::Remove if r.kind != Kind::Anon => {}
                    _ => return Err(Error::Method(m)),
                }
                Event::Discard(m)
            }
            Op::Unmap => Event::Unmap,
            Op::Remap { dst } => {
                let dend = dst.checked_add(end - start).ok_or(Error::Overflow)?;
                if dst % a != 0 {
                    return Err(Error::Unaligned { start: dst, len: end - start, align: a });
                }
                if overlaps(dst, dend, start, end)
                    || regions.iter().any(|x| overlaps(x.start, x.end, dst, dend))
                {
                    return Err(Error::DestinationOverlaps { dst });
                }
                Event::Remap { new_start: dst }
            }
            Op::Protect { prot } => Event::Protect { prot },
        };
        Ok((i, r.widen(start, end), event))
    }

    fn run(&self, op: Op, start: usize, len: usize, o: OpOptions) -> Result<OpReport, Error> {
        let (start, end) = check_range(start, len)?;
        // Sealed memory: refused here, before any subscriber hears of a teardown the kernel
        // would refuse with EPERM (see `mark_sealed`).
        let what = match op {
            Op::Unmap => Some("unmap"),
            Op::Remap { .. } => Some("remap"),
            Op::Protect { .. } => Some("protect"),
            Op::Discard(_) => None,
        };
        if let Some(op) = what.filter(|_| self.is_sealed(start, end)) {
            return Err(Error::Sealed { op, start, end });
        }
        let mut retries = 0;
        loop {
            if self.released.load(Ordering::Acquire) {
                return Err(Error::Released);
            }
            let (_, (ws, we), event) = self.plan(&self.read_regions(), op, start, end)?;
            let range = Range {
                start: ws,
                end: we,
                exact_start: start,
                exact_end: end,
                event,
                origin: Origin::Vmm,
                blockable: o.blockable,
            };
            let td = match self.reg.begin(range) {
                Ok(td) => td,
                Err(Error::Refused { .. }) if retries < o.max_retries => {
                    retries += 1;
                    self.reg.kind(&event, Origin::Vmm).retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let res = match op {
                Op::Unmap | Op::Remap { .. } => {
                    let mut g = self.write_regions();
                    self.execute(&mut g, op, start, end, &td)
                }
                _ => {
                    let mut g = self.read_regions();
                    // Discard and protect leave the regions as they are.
                    self.execute_ro(&mut g, op, start, end, &td)
                }
            };
            match res {
                Ok(()) => {
                    td.end();
                    return Ok(OpReport { range, retries });
                }
                Err(e) => {
                    td.abort();
                    return Err(e);
                }
            }
        }
    }

    fn execute_ro(
        &self,
        g: &mut RwLockReadGuard<'_, Vec<Region>>,
        op: Op,
        start: usize,
        end: usize,
        td: &crate::registry::Teardown<'_>,
    ) -> Result<(), Error> {
        // Re-validate under the mapping lock: an external unmap may have removed the range
        // after `start` was sent.
        let (i, _, event) = self.plan(g, op, start, end)?;
        let r = &g[i];
        let len = end - start;
        let p = start as *mut libc::c_void;
        match event {
            Event::Discard(m) => {
                let own = if m != DiscardMethod::PunchHole {
                    self.own_record(OwnKind::Remove, start, end)
                } else {
                    None
                };
                let res = match m {
                    DiscardMethod::PunchHole => {
                        let (f, off) = r.file.as_ref().expect("checked by plan");
                        let off = off + (start - r.start) as u64;
                        // SAFETY: no pointer; the caller's contract (`AddressSpace::new`) makes
                        // dropping the file's contents in this range acceptable.
                        os("fallocate(PUNCH_HOLE)", unsafe {
                            libc::fallocate(
                                f.as_raw_fd(),
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                off as libc::off_t,
                                len as libc::off_t,
                            )
                        })
                    }
                    _ => {
                        let adv =
                            if m == DiscardMethod::Remove { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
                        // SAFETY: `[start, end)` lies in a region the caller handed us under
                        // `AddressSpace::new`'s contract: no Rust reference points into it, so
                        // replacing its contents with zeros (or the page cache) breaks no
                        // borrow; the mapping itself stays.
                        os("madvise", unsafe { libc::madvise(p, len, adv) })
                    }
                };
                self.own_done(own);
                res?;
            }
            Event::Protect { prot } => {
                // SAFETY: as above; the caller's contract covers changed protections (accesses
                // go through raw pointers, and a fault there is the VMM's to handle).
                os("mprotect", unsafe { libc::mprotect(p, len, prot) })?;
            }
            _ => unreachable!("execute_ro handles discard and protect"),
        }
        td.invalidate_range();
        Ok(())
    }

    fn execute(
        &self,
        g: &mut RwLockWriteGuard<'_, Vec<Region>>,
        op: Op,
        start: usize,
        end: usize,
        td: &crate::registry::Teardown<'_>,
    ) -> Result<(), Error> {
        let (i, _, _) = self.plan(g, op, start, end)?;
        let len = end - start;
        let p = start as *mut libc::c_void;
        match op {
            Op::Unmap => {
                let own = self.own_record(OwnKind::Unmap, start, end);
                // SAFETY: `[start, end)` is guest RAM the caller handed us under
                // `AddressSpace::new`'s contract (no Rust reference into it; it may be unmapped
                // through this API). It is removed from the regions below, so the crate never
                // touches it again.
                let r = unsafe { libc::munmap(p, len) };
                self.own_done(own);
                os("munmap", r)?;
                split_out(g, i, start, end);
            }
            Op::Remap { dst } => {
                // S1: the destination must be free. Reserving it with MAP_FIXED_NOREPLACE fails
                // (EEXIST) if anything is mapped there, and the reservation keeps every other
                // thread's mmap out of it until MREMAP_FIXED replaces it (which then unmaps only
                // our own reservation).
                reserve(dst, len)?;
                let own = self.own_record(OwnKind::Remap { dst }, start, end);
                // SAFETY: `[start, end)` is guest RAM the caller handed us under
                // `AddressSpace::new`'s contract (no Rust reference into it; it may be moved
                // through this API). The destination is our own PROT_NONE reservation (S1), so
                // MREMAP_FIXED unmaps nothing but it.
                let q = unsafe {
                    libc::mremap(
                        p,
                        len,
                        len,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dst as *mut libc::c_void,
                    )
                };
                let failed = (q == libc::MAP_FAILED).then(std::io::Error::last_os_error);
                if failed.is_some() {
                    // SAFETY: the failed mremap left our reservation at `dst` as it was; nothing
                    // else can be mapped there.
                    unsafe { libc::munmap(dst as *mut libc::c_void, len) };
                }
                self.own_done(own);
                if let Some(source) = failed {
                    return Err(Error::Os { op: "mremap", source });
                }
                let moved = g[i].slice(start, end);
                split_out(g, i, start, end);
                let d = Region { start: dst, end: dst + len, ..moved };
                g.push(d);
                g.sort_by_key(|x| x.start);
            }
            _ => unreachable!("execute handles unmap and remap"),
        }
        td.invalidate_range();
        Ok(())
    }

    /// O1: records an own operation if the monitor is active (called under the mapping lock).
    fn own_record(&self, kind: OwnKind, start: usize, end: usize) -> Option<u64> {
        if self.own.active.load(Ordering::SeqCst) {
            Some(self.own.record(kind, start, end))
        } else {
            None
        }
    }

    fn own_done(&self, id: Option<u64>) {
        if let Some(id) = id {
            self.own.done(id);
        }
    }

    /// Turns an external event into notifications (called by the monitor's worker).
    pub(crate) fn external(&self, ev: RawEvent) {
        let c = &self.own.counters;
        let mut pieces: Vec<Range> = Vec::new();
        let mk = |s: usize, e: usize, r: &Region, event: Event| {
            let (ws, we) = r.widen(s, e);
            Range {
                start: ws,
                end: we,
                exact_start: s,
                exact_end: e,
                event,
                origin: Origin::External,
                blockable: true,
            }
        };
        match ev {
            RawEvent::Remove { start, end } => {
                let g = self.read_regions();
                for r in g.iter().filter(|r| overlaps(r.start, r.end, start, end)) {
                    let (s, e) = (start.max(r.start), end.min(r.end));
                    pieces.push(mk(s, e, r, Event::Discard(DiscardMethod::Unknown)));
                }
            }
            RawEvent::Unmap { start, end } => {
                let mut g = self.write_regions();
                while let Some(i) = g.iter().position(|r| overlaps(r.start, r.end, start, end)) {
                    let (s, e) = (start.max(g[i].start), end.min(g[i].end));
                    pieces.push(mk(s, e, &g[i], Event::Unmap));
                    split_out(&mut g, i, s, e);
                }
            }
            RawEvent::Remap { from, to, len, dontunmap } => {
                let end = from + len;
                let mut g = self.write_regions();
                if dontunmap {
                    // U3 (monitor.rs): the old range stays mapped (empty) but is no longer guest RAM: it leaves
                    // the regions like a moved range and is unregistered here, before any
                    // subscriber hears of the move (a subscriber that maps guest RAM there again
                    // registers it anew through `add_region`).
                    c.remap_dontunmap.fetch_add(1, Ordering::Relaxed);
                    if let Some(u) = self.uffd.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        if let Err(e) = u.unregister(from, len) {
                            tracing::warn!(%e, from, len, "cannot unregister the range mremap(DONTUNMAP) left");
                        }
                    }
                }
                let mut moved = Vec::new();
                while let Some(i) = g.iter().position(|r| overlaps(r.start, r.end, from, end)) {
                    let (s, e) = (from.max(g[i].start), end.min(g[i].end));
                    let ns = to + (s - from);
                    pieces.push(mk(s, e, &g[i], Event::Remap { new_start: ns }));
                    let m = g[i].slice(s, e);
                    moved.push(Region { start: ns, end: ns + (e - s), ..m });
                    split_out(&mut g, i, s, e);
                }
                g.extend(moved);
                g.sort_by_key(|x| x.start);
            }
        }
        if pieces.is_empty() {
            c.outside.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.external.fetch_add(1, Ordering::Relaxed);
        for r in pieces {
            if let Ok(td) = self.reg.begin(r) {
                td.invalidate_range();
                td.end();
            }
        }
    }

    /// Tells every subscriber that the address space goes away: an [`Event::Release`] range per
    /// region, then [`Subscriber::release`] once no other callback of it can run. Later operations
    /// and subscriptions fail with [`Error::Released`]. Also done on drop.
    ///
    /// The regions are emptied before the first `Release` range is notified, as an external
    /// unmap updates them before its start (so [`Self::is_mapped`] says no from then on): a
    /// subscriber's seq-retry install that looked at the regions before that retries once the
    /// range's invalidation ran and then finds nothing mapped, so no translation is installed
    /// after the release. The owner of the memory unmaps it only after this returns; handles
    /// that outlive it (a table, a device) then fail cleanly instead of touching memory that
    /// may have been reused.
    /// Fails with [`Error::InCallback`], changing nothing, when called from inside a teardown.
    pub fn release(&self) -> Result<(), Error> {
        // Refused before `released` is set: from inside a callback `release_all` could not wait,
        // and a release that set the flag and then failed would leave every subscriber without
        // its `release()` forever (a later call would return at once).
        if crate::registry::in_teardown() {
            return Err(Error::InCallback);
        }
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Emptied under the mapping lock: an own operation that planned with the regions before
        // finishes its syscall first, one that plans after finds nothing (`NotMapped`), and
        // `add_region` sees `released` under the same lock.
        let spans: Vec<Region> = std::mem::take(&mut *self.write_regions());
        for r in spans {
            let range = Range {
                start: r.start,
                end: r.end,
                exact_start: r.start,
                exact_end: r.end,
                event: Event::Release,
                origin: Origin::Vmm,
                blockable: true,
            };
            if let Ok(td) = self.reg.begin(range) {
                td.invalidate_range();
                td.end();
            }
        }
        self.reg.release_all()
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> Stats {
        Stats {
            kinds: self.reg.kind_stats(),
            subscribers: self.reg.subscriber_stats(),
            monitor: self.own.ever_started.load(Ordering::Relaxed).then(|| self.own.snapshot()),
        }
    }

    /// **Fault injection, for the stress test only**: the next teardown (of any kind and origin)
    /// that completes skips delivering `invalidate_range_end` to its subscribers, and its end is
    /// not counted in [`Stats`] (so the per-kind `ends` fall short of the `starts`, as they would
    /// with the bug). An interval subscriber then keeps that invalidation "in progress" forever and
    /// its readers block in `read_begin` on the range: exactly the failure a missing end causes.
    /// `zapvm stress` must detect it; never call this elsewhere. Only with the feature
    /// `fault-injection`.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn plant_fault_skip_next_end(&self) {
        self.reg.plant_skip_next_end();
    }

    /// Teardowns whose `invalidate_range_end` was skipped by `Self::plant_fault_skip_next_end`
    /// (always 0 without the feature `fault-injection`, which nothing can plant then).
    #[doc(hidden)]
    pub fn planted_faults_fired(&self) -> u64 {
        self.reg.skipped_ends()
    }

    /// Number of current subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.reg.subscriber_count()
    }

    /// Delivers one teardown's callbacks for `range` and nothing else: `invalidate_range_start`,
    /// `invalidate_range` and `invalidate_range_end` reach every subscriber `range` overlaps, and
    /// [`Stats`] counts a start and an end of `range.event`, but no host operation is done and
    /// the mapping is not looked at. It measures what notifying costs on its own (the benchmark
    /// times the `invalidate_page` way of old: one host operation over a whole range, then one
    /// notification per 4 KiB page). A caller that tore host memory down itself must have
    /// delivered the start before doing so; this cannot order the two, so it is not a way to
    /// report a teardown. On a refusal (only with `!range.blockable`) the subscribers that
    /// accepted get their end and the refusal is returned.
    pub fn notify_only(&self, range: Range) -> Result<(), Error> {
        let td = self.reg.begin(range)?;
        td.invalidate_range();
        td.end();
        Ok(())
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// S1: maps an inaccessible placeholder at exactly `[dst, dst + len)`, or fails with
/// [`Error::DestinationOccupied`] if any of it is mapped.
fn reserve(dst: usize, len: usize) -> Result<(), Error> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a fresh anonymous
    // PROT_NONE mapping is created or nothing happens.
    let q = unsafe {
        libc::mmap(
            dst as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if q == libc::MAP_FAILED {
        let source = std::io::Error::last_os_error();
        return Err(if source.raw_os_error() == Some(libc::EEXIST) {
            Error::DestinationOccupied { dst, end: dst + len }
        } else {
            Error::Os { op: "mmap(MAP_FIXED_NOREPLACE)", source }
        });
    }
    if q as usize != dst {
        // A kernel older than 4.17 treats the flag as a hint and maps elsewhere.
        // SAFETY: `q` is the mapping just created, owned by nobody else.
        unsafe { libc::munmap(q, len) };
        return Err(Error::DestinationOccupied { dst, end: dst + len });
    }
    Ok(())
}

/// Merges the region at `i` of the sorted `g` with its neighbours where they touch, are one
/// kind of memory (private anonymous, with equal THP widening) and the place where they touch
/// is not in `seams` (the bounds of the regions given to [`AddressSpace::new`]). So a piece of
/// guest RAM given back (an unmap, then `add_region` of the same range) merges again with the
/// rest of the region it came from, and two regions the caller gave separately stay separate
/// even where the kernel placed them back to back: the caller (the VMM's teardown guard) keeps
/// one record per region it gave, and an external event's pieces must not span two of them.
/// Without the merge, the list grows at every give-back round, and every later event walks it
/// while holding the lock that device accesses and the VMM's own operations wait on.
/// File-backed and hugetlb pieces keep their own entries: their offsets and descriptors belong
/// to each piece.
fn coalesce_around(g: &mut Vec<Region>, mut i: usize, seams: &[usize]) {
    let mergeable = |a: &Region, b: &Region| {
        a.end == b.start
            && a.kind == Kind::Anon
            && b.kind == Kind::Anon
            && a.thp == b.thp
            && !seams.contains(&a.end)
    };
    if i > 0 && mergeable(&g[i - 1], &g[i]) {
        let r = g.remove(i);
        i -= 1;
        g[i].end = r.end;
    }
    if i + 1 < g.len() && mergeable(&g[i], &g[i + 1]) {
        let r = g.remove(i + 1);
        g[i].end = r.end;
    }
}

/// Removes `[s, e)` (inside `g[i]`) from the regions, splitting `g[i]` if needed.
fn split_out(g: &mut Vec<Region>, i: usize, s: usize, e: usize) {
    let r = g.remove(i);
    if r.start < s {
        g.push(r.slice(r.start, s));
    }
    if e < r.end {
        g.push(r.slice(e, r.end));
    }
    g.sort_by_key(|x| x.start);
}
