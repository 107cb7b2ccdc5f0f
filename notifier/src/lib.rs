//! Range-based invalidation of a VMM's guest-RAM mappings: a userspace `mmu_notifier`.
//!
//! The VMM's caches of guest RAM's host virtual addresses (its second-level table, device models'
//! cached pointers) are secondary MMUs of its own address space. This crate gives them the
//! contract Linux gives KVM (see `docs/memory-layer.md`):
//!
//! * every teardown — discard, unmap, remap, protection change, release — reaches every
//!   overlapping [`Subscriber`] as a [`Range`] `[start, end)` with an [`Event`] and an [`Origin`],
//!   widened to whole 2 MiB pages when it cuts a transparent huge page;
//! * the VMM's own operations go through [`AddressSpace`] in the order
//!   `invalidate_range_start` -> syscall -> `invalidate_range` -> `invalidate_range_end`;
//! * translations are installed with the seq-retry protocol of [`Interval`]
//!   (`read_begin` -> translate -> lock -> `read_retry`);
//! * teardowns by code that does not use the API reach the same subscribers through the
//!   userfaultfd [`Monitor`], whose per-event guarantees are documented there;
//! * counters ([`Stats`]) and a `tracing` record of every range (target `notifier::range`, level
//!   TRACE, one event at start and one at end).
//!
//! ```no_run
//! use notifier::{AddressSpace, Backing, Monitor, MonitorOptions, RegionSpec};
//! # fn main() -> Result<(), notifier::Error> {
//! # let (host, len) = (0x7f00_0000_0000usize, 1usize << 30);
//! // (a) one address space over guest RAM.
//! // SAFETY: guest RAM is accessed only through raw pointers and stays mapped.
//! let space = unsafe {
//!     AddressSpace::new(&[RegionSpec { host_addr: host, len, backing: Backing::PrivateAnon, thp: true }])?
//! };
//! // (b) the VMM's table: gfn -> hva, dropped under the table lock on invalidation.
//! let table = space.subscribe_interval(
//!     "gpa-table", host, len, std::collections::BTreeMap::<u64, usize>::new(),
//!     |t, r| t.retain(|_, hva| !(r.start <= *hva && *hva < r.end)),
//! )?;
//! let (gfn, hva) = (5u64, host + 5 * 4096);
//! loop {
//!     let seq = table.read_begin_range(hva, hva + 4096);
//!     // ... translate / populate hva ...
//!     let mut t = table.lock();
//!     if table.read_retry(&t, seq) { continue; }
//!     t.insert(gfn, hva);
//!     break;
//! }
//! // (c) external teardowns reach the same subscribers.
//! let monitor = Monitor::start(&space, MonitorOptions::default())?;
//! space.discard(host, 2 << 20)?; // notified once, as Origin::Vmm
//! monitor.stop()?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
// The workspace's rust-version (1.85) predates `usize::is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

mod interval;
mod ledger;
mod monitor;
mod range;
mod registry;
mod space;
mod stats;
mod subscriber;
mod sync;
pub mod uffd;

/// The subscriber registry on its own, for the loom models of `tests/loom.rs` (built only with
/// `--cfg loom`, where the registry's lock, condition variable and thread-local depth are loom's).
#[cfg(loom)]
#[doc(hidden)]
pub mod model {
    use std::sync::Arc;

    use crate::{Error, Range, Subscriber, SubscriberStats, SubscriptionId};

    /// The registry of an address space, without the address space.
    pub struct Registry(crate::registry::Registry);

    impl Default for Registry {
        fn default() -> Self {
            Registry(crate::registry::Registry::new())
        }
    }

    impl Registry {
        /// As [`crate::AddressSpace::subscribe_range`], over `[start, end)`.
        pub fn subscribe(
            &self,
            sub: Arc<dyn Subscriber>,
            start: usize,
            end: usize,
        ) -> Result<SubscriptionId, Error> {
            self.0.subscribe(sub, start, end)
        }

        /// As [`crate::AddressSpace::unsubscribe`].
        pub fn unsubscribe(&self, id: SubscriptionId) -> Result<SubscriberStats, Error> {
            self.0.unsubscribe(id)
        }

        /// One teardown as the address space runs it: start (refusals as `Err`, nothing else
        /// done), `zap` (the host operation), `invalidate_range`, end.
        pub fn invalidate(&self, range: Range, zap: impl FnOnce()) -> Result<(), Error> {
            let td = self.0.begin(range)?;
            zap();
            td.invalidate_range();
            td.end();
            Ok(())
        }
    }
}

pub use interval::{Interval, IntervalGuard, ReadSeq};
pub use monitor::{open_userfaultfd, Monitor, MonitorOptions};
pub use range::{DiscardMethod, Event, Origin, Range, HUGE_PAGE_SIZE, PAGE_SIZE};
pub use registry::SubscriptionId;
pub use space::{AddressSpace, Backing, IntervalHandle, OpOptions, OpReport, RegionInfo, RegionSpec};
pub use stats::{KindStats, MonitorStats, Stats, SubscriberStats};
pub use subscriber::{Refused, Subscriber};

/// Errors. Bad input (empty, unaligned, unmapped ranges) is reported before any syscall.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A zero-length range or interval.
    #[error("empty range")]
    Empty,
    /// Start or length not aligned.
    #[error("range {start:#x} + {len:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// Start.
        start: usize,
        /// Length.
        len: usize,
        /// Required alignment.
        align: usize,
    },
    /// `start + len` overflows.
    #[error("range overflows the address space")]
    Overflow,
    /// The range is not inside one registered region.
    #[error("range {start:#x}..{end:#x} is not inside one registered guest-RAM region")]
    NotMapped {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// A new region overlaps an existing one.
    #[error("region {start:#x}..{end:#x} overlaps a registered region")]
    RegionsOverlap {
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
    /// A remap destination overlaps guest RAM or the source.
    #[error("remap destination {dst:#x} overlaps guest RAM or the source")]
    DestinationOverlaps {
        /// Destination.
        dst: usize,
    },
    /// The discard method does not apply to the region's backing.
    #[error("discard method {0:?} does not apply to this region's backing")]
    Method(DiscardMethod),
    /// Unsupported huge page size.
    #[error("unsupported hugetlb page size {0:#x}")]
    BadHugePageSize(usize),
    /// The host page size is not 4 KiB.
    #[error("host page size {0} is not 4096")]
    PageSize(usize),
    /// A subscriber refused a non-blockable start (after the allowed retries).
    #[error("invalidation refused by subscriber {subscriber:?} ({name})")]
    Refused {
        /// Who refused.
        subscriber: SubscriptionId,
        /// Its name.
        name: String,
    },
    /// A syscall failed.
    #[error("{op} failed: {source}")]
    Os {
        /// Which.
        op: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Called from inside a teardown callback, where it would wait for itself.
    #[error("called from inside an invalidation callback (would deadlock)")]
    InCallback,
    /// No such subscription.
    #[error("no such subscription")]
    NoSuchSubscriber,
    /// The address space was released.
    #[error("the address space was released")]
    Released,
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// A monitor already runs on this address space.
    #[error("a monitor already runs on this address space")]
    MonitorRunning,
    /// The monitor stopped intercepting external teardowns before it was stopped, or one of its
    /// threads panicked; external teardowns after that point were not notified.
    #[error("the userfaultfd monitor failed: {0}")]
    MonitorFailed(String),
    /// A remap destination is not free: something is mapped there.
    #[error("remap destination {dst:#x}..{end:#x} is not free (something is mapped there)")]
    DestinationOccupied {
        /// Destination.
        dst: usize,
        /// One past its last byte.
        end: usize,
    },
    /// An unmap, remap or protect of guest RAM that is sealed with `mseal(2)`
    /// ([`AddressSpace::mark_sealed`]); refused before any notification or syscall.
    #[error("cannot {op} {start:#x}..{end:#x}: guest RAM there is sealed (mseal), so it can never be unmapped, moved or re-protected")]
    Sealed {
        /// `unmap`, `remap` or `protect`.
        op: &'static str,
        /// Start.
        start: usize,
        /// End.
        end: usize,
    },
}
