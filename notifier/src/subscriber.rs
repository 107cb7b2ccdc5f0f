//! The subscriber trait: the userspace counterpart of `struct mmu_notifier_ops`.

use crate::Range;

/// A subscriber refused a non-blockable `invalidate_range_start`; the caller retries or reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// A secondary MMU of the VMM's address space: anything that caches translations of guest RAM's
/// host virtual addresses (the VMM's second-level table, a device model's cached descriptor
/// pointers, ...).
///
/// For every teardown overlapping the subscriber's interval, callbacks run in this order, each at
/// most once per teardown: `invalidate_range_start` -> (the host operation) -> `invalidate_range` ->
/// `invalidate_range_end`. A subscriber whose start returned `Ok` always gets the matching end; one
/// that refused gets neither `invalidate_range` nor end; one whose start panicked gets its end (it
/// may have begun). Callbacks of different teardowns may run concurrently on different threads,
/// and their ranges may overlap.
///
/// A panicking callback does not cost any other subscriber its callbacks (R6 in `registry.rs`):
/// for external teardowns and Release the panic is caught and counted (`KindStats::panics`); for
/// the VMM's own operations it reaches the caller of the operation after every end was delivered
/// (a panicking start aborts the operation before its syscall).
///
/// Callbacks must not subscribe, unsubscribe, release, or start/stop the monitor (those wait for
/// callbacks to finish; unsubscribe, release and stop fail with [`crate::Error::InCallback`] and
/// change nothing). `invalidate_range_start`/`_end` may perform operations on the
/// [`crate::AddressSpace`]; `invalidate_range` must not (for the VMM's own operations it runs under
/// the mapping lock).
pub trait Subscriber: Send + Sync {
    /// A name for counters and traces.
    fn name(&self) -> &str {
        "subscriber"
    }

    /// The range is about to be torn down (VMM operations: before the syscall; external ones: see
    /// [`crate::Monitor`] for what the kernel guarantees per event kind). From now until
    /// `invalidate_range_end` the subscriber must drop what it holds inside `[range.start,
    /// range.end)` and install nothing new there. May sleep if `range.blockable`; otherwise it must
    /// not sleep and may return `Err(Refused)` (e.g. a lock is contended), which aborts the
    /// operation before any syscall. Refusing a blockable range is a bug: it is counted, logged and
    /// ignored.
    fn invalidate_range_start(&self, range: &Range) -> Result<(), Refused> {
        let _ = range;
        Ok(())
    }

    /// The host page tables of the range have just changed. For the VMM's own operations it is
    /// called right after the syscall with the address space's mapping lock held; for external
    /// teardowns (on the monitor's worker, after the kernel acted) and for Release it is called
    /// right after the start callbacks, with no lock of the crate held. Must not sleep or take
    /// locks that are held across an address-space operation.
    fn invalidate_range(&self, range: &Range) {
        let _ = range;
    }

    /// The teardown is complete; translations of the range may be installed again. Called with no
    /// lock of the crate held, also for non-blockable teardowns: `blockable == false` constrains
    /// `invalidate_range_start` only, and an end may block (e.g. [`crate::Interval`]'s end waits
    /// for its table lock, held at most for a reader's install).
    fn invalidate_range_end(&self, range: &Range) {
        let _ = range;
    }

    /// Called instead of `invalidate_range_start` when the subscriber was registered while an
    /// overlapping teardown was already in progress (its start had run); `invalidate_range_end`
    /// follows when that teardown ends. It runs with the registry lock held: it must not sleep for
    /// long and must not call into the crate. Default: nothing (a subscriber that installs nothing
    /// it did not see being torn down needs nothing); [`crate::Interval`] uses it to make
    /// `read_begin` wait for the in-progress teardown.
    fn invalidate_range_joined(&self, range: &Range) {
        let _ = range;
    }

    /// The address space goes away. The last callback this subscriber receives.
    fn release(&self) {}

    /// Seq-retry reads that had to start over (for counters); 0 for subscribers without reads.
    fn read_retries(&self) -> u64 {
        0
    }
}
