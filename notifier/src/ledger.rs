//! The own-operation ledger: how the VMM's own discards, unmaps and remaps are told apart from
//! external ones when the userfaultfd monitor reads their events. The address space records
//! each own operation here around its syscall; the monitor matches each event it reads against
//! it (invariants O1-O2 on [`OwnOps`]). Neither owns the other: both use the ledger.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::stats::MonitorStats;

/// An event read from the userfaultfd, with plain addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RawEvent {
    Remove {
        start: usize,
        end: usize,
    },
    Unmap {
        start: usize,
        end: usize,
    },
    /// `dontunmap`: the old range is still mapped (`MREMAP_DONTUNMAP`, no UNMAP follows).
    Remap {
        from: usize,
        to: usize,
        len: usize,
        dontunmap: bool,
    },
}

/// Which uffd events an own operation produces, for the monitor's matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OwnKind {
    Remove,
    Unmap,
    Remap { dst: usize },
}

#[derive(Debug)]
pub(crate) struct OwnOp {
    id: u64,
    kind: OwnKind,
    start: usize,
    end: usize,
    /// `reads_started` after the syscall returned; `None` while it runs.
    done_at: Option<u64>,
}

/// How the VMM's own operations are told apart from external ones by the monitor.
///
/// Invariants:
/// * O1. An own operation that can produce events is recorded in `ops` (under the mapping lock,
///   with `active` true) before its syscall, and gets `done_at = reads_started` after it returns.
/// * O2. The monitor's reader increments `reads_started` before each `read(2)`. The kernel lets
///   the syscall return only after each of its events was consumed by some read, and that read
///   started before the return; so all events of an operation are returned by reads numbered
///   `<= done_at`. The reader processes reads in order, matching read `k`'s events against the
///   operations that are running or have `done_at >= k`; after read `k` it sets
///   `reads_processed = k`, and an operation with `done_at <= reads_processed` can produce no more
///   events and is dropped.
#[derive(Default)]
pub(crate) struct OwnOps {
    pub active: AtomicBool,
    pub reads_started: AtomicU64,
    pub reads_processed: AtomicU64,
    ops: Mutex<Vec<OwnOp>>,
    next: AtomicU64,
    pub counters: MonitorCounters,
    pub ever_started: AtomicBool,
    /// Why the monitor stopped intercepting on its own, if it did.
    failure: Mutex<Option<String>>,
    /// Fault injection: the reader's next read fails.
    #[cfg(feature = "fault-injection")]
    planted_read_failure: AtomicBool,
}

#[derive(Default)]
pub(crate) struct MonitorCounters {
    pub reads: AtomicU64,
    pub events: AtomicU64,
    pub max_batch: AtomicU64,
    pub remove: AtomicU64,
    pub unmap: AtomicU64,
    pub remap: AtomicU64,
    pub other: AtomicU64,
    pub own: AtomicU64,
    pub external: AtomicU64,
    pub outside: AtomicU64,
    pub remap_unmaps: AtomicU64,
    pub remap_dontunmap: AtomicU64,
    pub worker_panics: AtomicU64,
}

impl OwnOps {
    pub(crate) fn record(&self, kind: OwnKind, start: usize, end: usize) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let processed = self.reads_processed.load(Ordering::SeqCst);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|o| o.done_at.is_none_or(|d| d > processed));
        ops.push(OwnOp { id, kind, start, end, done_at: None });
        id
    }

    pub(crate) fn done(&self, id: u64) {
        let at = self.reads_started.load(Ordering::SeqCst);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = ops.iter_mut().find(|o| o.id == id) {
            o.done_at = Some(at);
        }
    }

    /// O2: whether an event read by read number `k` belongs to an own operation.
    pub(crate) fn matches(&self, k: u64, ev: &RawEvent) -> bool {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.iter().any(|o| {
            if o.done_at.is_some_and(|d| d < k) {
                return false;
            }
            match (*ev, o.kind) {
                (RawEvent::Remove { start, end }, OwnKind::Remove) => o.start <= start && end <= o.end,
                (RawEvent::Unmap { start, end }, OwnKind::Unmap | OwnKind::Remap { .. }) => {
                    o.start <= start && end <= o.end
                }
                (RawEvent::Remap { from, to, len, .. }, OwnKind::Remap { dst }) => {
                    o.start <= from
                        && from + len <= o.end
                        && to.wrapping_sub(from) == dst.wrapping_sub(o.start)
                }
                _ => false,
            }
        })
    }

    /// O2: read `k` is processed.
    pub(crate) fn processed(&self, k: u64) {
        self.reads_processed.store(k, Ordering::SeqCst);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|o| o.done_at.is_none_or(|d| d > k));
    }

    pub(crate) fn set_failure(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match f.as_mut() {
            Some(f) => {
                f.push_str("; ");
                f.push_str(&why);
            }
            None => *f = Some(why),
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets a failure of an earlier monitor (a new one starts).
    pub(crate) fn clear_failure(&self) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn plant_read_failure(&self) {
        self.planted_read_failure.store(true, Ordering::SeqCst);
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn take_planted_read_failure(&self) -> bool {
        self.planted_read_failure.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn snapshot(&self) -> MonitorStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MonitorStats {
            reads: l(&c.reads),
            events: l(&c.events),
            max_batch: l(&c.max_batch),
            remove: l(&c.remove),
            unmap: l(&c.unmap),
            remap: l(&c.remap),
            other: l(&c.other),
            own: l(&c.own),
            external: l(&c.external),
            outside: l(&c.outside),
            remap_unmaps: l(&c.remap_unmaps),
            remap_dontunmap: l(&c.remap_dontunmap),
            worker_panics: l(&c.worker_panics),
            failed: self.failure(),
        }
    }
}
