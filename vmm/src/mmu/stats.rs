//! The table's counters: the monotonic [`Counters`] (with the per-thread hit counter, which keeps
//! the hit path off shared cache lines), the notifier event kinds they count teardowns by, and
//! the [`MmuStats`] snapshot [`GuestMmu::stats`](super::GuestMmu::stats) takes of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use notifier::Event;

#[cfg(doc)]
use super::readers;

/// Counters of the table (all monotonic).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: HitCounter,
    pub(super) misses: AtomicU64,
    pub(super) installs_4k: AtomicU64,
    pub(super) installs_2m: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) faults: AtomicU64,
    /// Entries dropped, per notifier event kind (discard, unmap, remap, protect, release).
    pub(super) torn_down: [AtomicU64; 5],
}

/// Hit-counter shards: the threads whose reader slot has an index below this count alone in a
/// shard of their own; the others share one atomic counter.
pub(super) const HIT_SHARDS: usize = 64;

/// One shard, alone on its cache lines (see [`readers::Slot`]).
#[derive(Debug, Default)]
#[repr(align(128))]
struct HitShard(AtomicU64);

/// The hit counter, per thread: the hit path writes only its own thread's shard, and without a
/// read-modify-write (S1: shard `i` has one writer, the owner of reader slot `i`).
#[derive(Debug)]
pub(super) struct HitCounter {
    shards: Box<[HitShard]>,
    /// Threads whose slot index is `HIT_SHARDS` or more (shared: a read-modify-write).
    overflow: AtomicU64,
}

impl Default for HitCounter {
    fn default() -> Self {
        HitCounter {
            shards: (0..HIT_SHARDS).map(|_| HitShard::default()).collect(),
            overflow: AtomicU64::new(0),
        }
    }
}

impl HitCounter {
    /// Counts `n` hits of the thread owning reader slot `slot`.
    #[inline]
    pub(super) fn add(&self, slot: usize, n: u64) {
        match self.shards.get(slot) {
            // Only this thread writes this shard (S1); `stats` only reads it.
            Some(shard) => shard.0.store(shard.0.load(Ordering::Relaxed) + n, Ordering::Relaxed),
            None => {
                self.overflow.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn sum(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).sum::<u64>()
            + self.overflow.load(Ordering::Relaxed)
    }
}

pub(super) fn kind_index(event: &Event) -> usize {
    match event {
        Event::Discard(_) => 0,
        Event::Unmap => 1,
        Event::Remap { .. } => 2,
        Event::Protect { .. } => 3,
        Event::Release => 4,
    }
}

pub(super) const KIND_NAMES: [&str; 5] = ["discard", "unmap", "remap", "protect", "release"];

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
