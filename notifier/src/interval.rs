//! Interval subscriptions with sequence retry: `mmu_interval_notifier` and KVM's
//! `mmu_invalidate_seq` / `mmu_invalidate_in_progress` / `mmu_invalidate_range_*` in one type.
//!
//! # The protocol
//!
//! A reader that installs a translation of an address inside the interval does:
//!
//! ```text
//! loop {
//!     let seq = sub.read_begin();          // waits while an invalidation of the interval runs
//!     let hva = translate(...);            // no lock held: may fault pages in, may sleep
//!     let mut table = sub.lock();          // the table lock
//!     if sub.read_retry(&table, seq) { continue; }   // an overlapping invalidation began or ended
//!     table.install(gfn, hva);             // safe: no invalidation can remove hva until unlock
//!     break;
//! }
//! ```
//!
//! The invalidation side (this type's [`Subscriber`] impl) runs `on_invalidate` — which drops the
//! table's entries in the range — under the same table lock.
//!
//! # Invariants (the reasoning mm/mmu_notifier.c gives above `mn_itree_inv_start_range`)
//!
//! * I1. `Inner::seq` changes (under the table lock) at every `invalidate_range_start` and every
//!   `invalidate_range_end` delivered to this subscription; `Inner::in_progress` counts the starts
//!   without their end yet (several overlapping invalidations may run at once), and
//!   `inv_start..inv_end` is the union of their ranges (reset when the count leaves 0, as KVM does).
//! * I2. Entries of a range are dropped by `on_invalidate` at start, under the lock, in the same
//!   critical section that bumps `seq`. Hence: a reader whose `read_retry` (under the lock) finds
//!   `seq` unchanged since `read_begin` saw no start since `read_begin`; its translation was
//!   computed after every earlier invalidation of the interval *ended* (`read_begin` returns only
//!   when `in_progress` was 0, or its overlapping part was), so it is not stale; and any later
//!   start must take the lock after the reader releases it, and will drop what it installed.
//! * I3. The atomics `seq`/`in_progress` mirror `Inner` for `read_begin`'s lock-free fast path.
//!   Writers store `in_progress` before `seq` (Release, under the lock); the reader loads `seq`
//!   (Acquire) then `in_progress`. If the reader saw the new `seq` of a start, it also sees that
//!   start's `in_progress` and takes the slow path; if it saw the old `seq`, `read_retry` sees the
//!   change. Either way no stale translation is installed. `tests/loom.rs` checks this.
//! * I4. `waiters` (under the lock) counts readers blocked in `read_begin`; an end notifies only
//!   when it is non-zero.

use std::ops::{Deref, DerefMut};

use crate::range::overlaps;
use crate::subscriber::{Refused, Subscriber};
use crate::sync::{self, AtomicU32, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};
// Statistics only (not part of the protocol, so not interleaved by loom).
use crate::Range;
use std::sync::atomic::AtomicU64 as CounterU64;

/// A sequence number returned by [`Interval::read_begin`], checked by [`Interval::read_retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct ReadSeq(u64);

struct Inner<T> {
    table: T,
    seq: u64,
    in_progress: u32,
    inv_start: usize,
    inv_end: usize,
    waiters: u32,
}

type InvalidateFn<T> = Box<dyn Fn(&mut T, &Range) + Send + Sync>;

/// An interval subscription over `[start, end)` owning the subscriber's table `T` and its lock.
///
/// Subscribe it with [`crate::AddressSpace::subscribe_interval`]; it is told only of ranges that
/// overlap its interval. `on_invalidate(&mut table, &range)` runs under the table lock at each
/// overlapping `invalidate_range_start` (and when the subscription joins an invalidation already in
/// progress); it must drop every entry inside `[range.start, range.end)` and must not call into the
/// address space (a nested operation on the same interval would wait for this very lock).
pub struct Interval<T> {
    name: String,
    start: usize,
    end: usize,
    seq: AtomicU64,
    in_progress: AtomicU32,
    inner: Mutex<Inner<T>>,
    cv: Condvar,
    on_invalidate: InvalidateFn<T>,
    retries: CounterU64,
    waits: CounterU64,
    /// Planted fault, loom models only: the in-progress range is overwritten instead of unioned
    /// (I1 broken); `tests/loom.rs` proves its model catches it.
    #[cfg(loom)]
    overwrite_in_progress: bool,
}

/// The table lock of an [`Interval`]; dereferences to the table.
pub struct IntervalGuard<'a, T> {
    g: MutexGuard<'a, Inner<T>>,
    owner: usize,
}

impl<T> Deref for IntervalGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.g.table
    }
}

impl<T> DerefMut for IntervalGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.g.table
    }
}

impl<T: Send> Interval<T> {
    /// A subscription over `[start, end)` with `table` and its invalidate callback.
    pub fn new(
        name: impl Into<String>,
        start: usize,
        end: usize,
        table: T,
        on_invalidate: impl Fn(&mut T, &Range) + Send + Sync + 'static,
    ) -> Self {
        Interval {
            name: name.into(),
            start,
            end,
            seq: AtomicU64::new(0),
            in_progress: AtomicU32::new(0),
            inner: Mutex::new(Inner { table, seq: 0, in_progress: 0, inv_start: 0, inv_end: 0, waiters: 0 }),
            cv: Condvar::new(),
            on_invalidate: Box::new(on_invalidate),
            retries: CounterU64::new(0),
            waits: CounterU64::new(0),
            #[cfg(loom)]
            overwrite_in_progress: false,
        }
    }

    /// **Planted fault, loom models only**: every start overwrites the in-progress range instead
    /// of unioning it with the ranges still in progress (breaks I1).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn plant_fault_overwrite_in_progress(mut self) -> Self {
        self.overwrite_in_progress = true;
        self
    }

    /// The interval `[start, end)`.
    pub fn interval(&self) -> (usize, usize) {
        (self.start, self.end)
    }

    /// Begins a read of any address of the interval: waits while an invalidation overlapping the
    /// interval is in progress, then returns the sequence to pass to [`Self::read_retry`].
    pub fn read_begin(&self) -> ReadSeq {
        self.read_begin_range(self.start, self.end)
    }

    /// Like [`Self::read_begin`] for a reader that will install translations only inside
    /// `[start, end)`: it waits only while an in-progress invalidation overlaps that sub-range
    /// (KVM's per-gfn check), so faults elsewhere in a large interval proceed.
    pub fn read_begin_range(&self, start: usize, end: usize) -> ReadSeq {
        // I3: fast path.
        let s = self.seq.load(Ordering::Acquire);
        if self.in_progress.load(Ordering::Acquire) == 0 {
            return ReadSeq(s);
        }
        let mut g = sync::lock(&self.inner);
        let mut waited = false;
        while g.in_progress > 0 && overlaps(g.inv_start, g.inv_end, start, end) {
            waited = true;
            g.waiters += 1;
            g = sync::wait(&self.cv, g);
            g.waiters -= 1;
        }
        if waited {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        ReadSeq(g.seq)
    }

    /// Takes the table lock.
    pub fn lock(&self) -> IntervalGuard<'_, T> {
        IntervalGuard { g: sync::lock(&self.inner), owner: self as *const Self as usize }
    }

    /// Under the table lock: whether an overlapping invalidation began or ended since
    /// `read_begin` returned `seq`, in which case the translation must not be installed and the
    /// read starts over. `false` means: install now, before releasing the lock.
    pub fn read_retry(&self, guard: &IntervalGuard<'_, T>, seq: ReadSeq) -> bool {
        assert_eq!(guard.owner, self as *const Self as usize, "read_retry with another subscription's guard");
        let retry = guard.g.seq != seq.0;
        if retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        retry
    }

    /// Number of invalidations of this interval in progress.
    pub fn in_progress(&self) -> u32 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Readers currently blocked in `read_begin` (for tests and diagnostics).
    pub fn waiting_readers(&self) -> u32 {
        sync::lock(&self.inner).waiters
    }

    /// Reads that had to wait in `read_begin`.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// I1, I3: account a start under the lock. Stores `in_progress` before `seq`.
    fn begin_locked(&self, g: &mut Inner<T>, range: &Range) {
        #[cfg(loom)]
        let fresh = g.in_progress == 0 || self.overwrite_in_progress;
        #[cfg(not(loom))]
        let fresh = g.in_progress == 0;
        if fresh {
            g.inv_start = range.start;
            g.inv_end = range.end;
        } else {
            g.inv_start = g.inv_start.min(range.start);
            g.inv_end = g.inv_end.max(range.end);
        }
        g.in_progress += 1;
        g.seq += 1;
        self.in_progress.store(g.in_progress, Ordering::Release);
        self.seq.store(g.seq, Ordering::Release);
        // I2: drop the entries in the same critical section that bumped seq.
        (self.on_invalidate)(&mut g.table, range);
    }
}

impl<T: Send> Subscriber for Interval<T> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Blockable: takes the table lock. Not blockable: refuses if the lock is contended.
    fn invalidate_range_start(&self, range: &Range) -> Result<(), Refused> {
        let mut g = if range.blockable {
            sync::lock(&self.inner)
        } else {
            match self.inner.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::WouldBlock) => return Err(Refused),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            }
        };
        self.begin_locked(&mut g, range);
        Ok(())
    }

    fn invalidate_range_joined(&self, range: &Range) {
        let mut g = sync::lock(&self.inner);
        self.begin_locked(&mut g, range);
    }

    /// Takes the table lock, blocking, whatever `range.blockable` says: a non-blockable teardown's
    /// end waits for a reader's install (or an `on_invalidate`) to release it.
    fn invalidate_range_end(&self, _range: &Range) {
        let mut g = sync::lock(&self.inner);
        debug_assert!(g.in_progress > 0, "end without start");
        g.in_progress = g.in_progress.saturating_sub(1);
        g.seq += 1;
        self.in_progress.store(g.in_progress, Ordering::Release);
        self.seq.store(g.seq, Ordering::Release);
        if g.waiters > 0 {
            // I4
            self.cv.notify_all();
        }
    }

    fn read_retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}
