//! Counters, as plain serialisable snapshots (for `zapvm stats`).

use serde::Serialize;

/// Per event kind and origin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindStats {
    /// `discard`, `unmap`, `remap`, `protect` or `release`.
    pub kind: &'static str,
    /// `vmm` or `external`.
    pub origin: &'static str,
    /// Teardowns begun (including refused ones).
    pub starts: u64,
    /// Teardowns ended (including refused ones, whose accepting subscribers get an end).
    pub ends: u64,
    /// Refusals by subscribers.
    pub refusals: u64,
    /// Operations retried after a refusal.
    pub retries: u64,
    /// Bytes of completed teardowns (notified ranges, i.e. after THP widening).
    pub bytes: u64,
    /// Subscriber callbacks that panicked (contained for external teardowns and Release, handed
    /// to the caller after every end for the VMM's own operations).
    pub panics: u64,
}

/// Per subscriber.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SubscriberStats {
    /// Subscription id.
    pub id: u64,
    /// `Subscriber::name`.
    pub name: String,
    /// Interval start.
    pub start: usize,
    /// Interval end.
    pub end: usize,
    /// Accepted `invalidate_range_start`s.
    pub starts: u64,
    /// `invalidate_range` calls.
    pub invalidates: u64,
    /// `invalidate_range_end` calls.
    pub ends: u64,
    /// Refused starts.
    pub refusals: u64,
    /// Teardowns joined while in progress.
    pub joined: u64,
    /// Seq-retry reads that started over.
    pub read_retries: u64,
}

/// The userfaultfd monitor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MonitorStats {
    /// `read(2)` calls that returned events.
    pub reads: u64,
    /// Events read.
    pub events: u64,
    /// Largest number of events one read returned.
    pub max_batch: u64,
    /// UFFD_EVENT_REMOVE read.
    pub remove: u64,
    /// UFFD_EVENT_UNMAP read.
    pub unmap: u64,
    /// UFFD_EVENT_REMAP read.
    pub remap: u64,
    /// Other events (page faults, fork): unexpected with the registration used; ignored.
    pub other: u64,
    /// Events caused by the VMM's own operations (already notified by the API; not notified again).
    pub own: u64,
    /// External events turned into notifications.
    pub external: u64,
    /// External events outside every registered region.
    pub outside: u64,
    /// UNMAPs of the old range that `mremap` queues after its REMAP: part of that move, folded
    /// into it by the reader and not notified.
    pub remap_unmaps: u64,
    /// External `mremap(MREMAP_DONTUNMAP)` moves: REMAP with no UNMAP to follow (the old range
    /// stays mapped); the old range is unregistered and leaves the regions.
    pub remap_dontunmap: u64,
    /// Events on which the worker panicked outside any subscriber callback (subscribers' own
    /// panics are counted per kind, in `KindStats::panics`).
    pub worker_panics: u64,
    /// Why the monitor stopped intercepting before `Monitor::stop` (a failed userfaultfd read, a
    /// lost worker), if it did. It then released the userfaultfd, so no teardown waits for it.
    pub failed: Option<String>,
}

/// A snapshot of all counters of an [`crate::AddressSpace`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Per event kind and origin.
    pub kinds: Vec<KindStats>,
    /// Per current subscriber.
    pub subscribers: Vec<SubscriberStats>,
    /// The monitor's, if one ran.
    pub monitor: Option<MonitorStats>,
}
