//! The subscriber list, the in-flight teardowns, and the grace period of unsubscribe.
//!
//! Why hand-written instead of an RCU crate: the guarantee needed is not "no reader still sees the
//! old list" (what `arc-swap`/`crossbeam-epoch` give) but "no teardown that delivered, or will
//! deliver, a callback to this subscriber is still in flight" — the start..end pair is one
//! read-side section, so that a subscriber that got `start` always gets `end` before `unsubscribe`
//! returns. That needs the set of in-flight teardowns anyway (late joiners are added to it), so one
//! mutex-protected list of them is both the SRCU read-side bookkeeping and the grace-period test.
//!
//! # Invariants (all kept under `Registry::state`)
//!
//! * R1. `subs` is replaced, never mutated in place: a teardown's snapshot (an `Arc` clone taken in
//!   `begin`) never changes, so its start, range and end callbacks go to the same subscribers.
//! * R2. A teardown is in `inflight` from before its first callback until after its last one, and
//!   its record names every subscriber it may still call: the snapshot plus `late`.
//! * R3. `unsubscribe` removes the entry from `subs` (so no teardown that begins later sees it),
//!   then waits until no record in `inflight` names it. With R2 this means no callback of that
//!   subscriber runs after `unsubscribe` returns (the SRCU guarantee of mm/mmu_notifier.c, with
//!   the whole start..end as the read-side section so ends are never lost).
//! * R4. A subscriber registered while a teardown overlapping its interval is in flight is added to
//!   that teardown's `late` list and told `invalidate_range_joined` under the lock, so it gets the
//!   teardown's `invalidate_range_end` and never installs a translation of the range before that
//!   end. Records whose ends are being delivered (`ending`) accept no late joiners: the joiner
//!   could otherwise miss the end.
//! * R5. `waiters` counts threads blocked on `cv`; `notify_all` is only issued when it is non-zero,
//!   which keeps the futex syscall off the fast path.
//! * R6. A panicking subscriber never leaves a start without its end nor a record in flight:
//!   `accepted` counts each subscriber before its start is called (so one whose start panics, and
//!   every earlier one, gets an end), `finish` calls every end even if some panic, then retires the
//!   record and leaves the thread's teardown depth. Teardowns nobody can abort (external, Release)
//!   contain panics: caught, counted in `KindStats::panics`, logged, and every other subscriber is
//!   still called. For the VMM's own operations the first panic reaches the caller after that
//!   cleanup (a panicking start aborts the operation before its syscall).
//! * R7. A teardown calls exactly the subscribers of its snapshot whose interval overlaps its
//!   range, in subscription order, found through the snapshot's [`SubIndex`] (an interval tree
//!   built with each new list, R1): the cost of finding them grows with the overlapping
//!   subscribers (times log n), not with all of them.

// loom's `thread_local!` does not accept a `const { }` initializer.
#![allow(clippy::missing_const_for_thread_local)]

use std::cell::Cell;

use crate::range::overlaps;
use crate::stats::{KindStats, SubscriberStats};
use crate::subscriber::Subscriber;
use std::sync::Arc;

use crate::sync::{self, thread_local, Condvar, Mutex};
// Counters are not part of the protocol: plain std atomics, which loom does not interleave (the
// model explores the registry's lock, condition variable and records, not statistics).
use crate::{Error, Event, Origin, Range};
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// Depth of teardowns (begin..end) running on this thread; `unsubscribe` and `release` refuse
    /// to wait inside one (they would wait for themselves).
    static IN_TEARDOWN: Cell<u32> = Cell::new(0);
}

pub(crate) fn in_teardown() -> bool {
    IN_TEARDOWN.with(|c| c.get() > 0)
}

/// Identifies a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SubscriptionId(pub u64);

#[derive(Default)]
pub(crate) struct SubCounters {
    pub starts: AtomicU64,
    pub invalidates: AtomicU64,
    pub ends: AtomicU64,
    pub refusals: AtomicU64,
    pub joined: AtomicU64,
}

pub(crate) struct Entry {
    pub id: u64,
    pub start: usize,
    pub end: usize,
    pub sub: Arc<dyn Subscriber>,
    pub c: SubCounters,
}

impl Entry {
    fn covers(&self, r: &Range) -> bool {
        overlaps(self.start, self.end, r.start, r.end)
    }
}

/// The subscriber list of one snapshot, with a static interval tree over the subscribers'
/// intervals (R7): `order` holds the entries' indices sorted by interval start, read as an
/// implicit balanced binary tree (the node of `order[lo..hi]` is its middle), and `max_end[i]` is
/// the largest interval end in the subtree whose node is `order[i]` — the augmented tree Linux
/// keeps its interval notifiers in, built once per list (lists are replaced, never changed: R1).
#[derive(Default)]
pub(crate) struct SubIndex {
    /// In subscription order.
    entries: Vec<Arc<Entry>>,
    order: Vec<u32>,
    max_end: Vec<usize>,
}

impl SubIndex {
    fn new(entries: Vec<Arc<Entry>>) -> SubIndex {
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        order.sort_by_key(|&i| entries[i as usize].start);
        let mut ix = SubIndex { max_end: vec![0; entries.len()], entries, order };
        ix.build(0, ix.order.len());
        ix
    }

    /// Fills `max_end` for the subtree of `order[lo..hi]`; returns its largest end.
    fn build(&mut self, lo: usize, hi: usize) -> usize {
        if lo >= hi {
            return 0;
        }
        let mid = lo + (hi - lo) / 2;
        let m =
            self.entries[self.order[mid] as usize].end.max(self.build(lo, mid)).max(self.build(mid + 1, hi));
        self.max_end[mid] = m;
        m
    }

    /// The indices (into `entries`) of the entries whose interval overlaps `[start, end)`, in
    /// subscription order. Indices, not `Arc` clones: a teardown keeps the snapshot alive (it
    /// holds the `Arc<SubIndex>`), so its subscribers cost no reference count each.
    fn overlapping(&self, start: usize, end: usize) -> Vec<u32> {
        let mut found: Vec<u32> = Vec::new();
        self.collect(0, self.order.len(), start, end, &mut found);
        found.sort_unstable();
        found
    }

    /// The entry at index `i` of [`SubIndex::overlapping`]'s answer.
    fn entry(&self, i: u32) -> &Entry {
        &self.entries[i as usize]
    }

    fn collect(&self, lo: usize, hi: usize, start: usize, end: usize, out: &mut Vec<u32>) {
        if lo >= hi {
            return;
        }
        let mid = lo + (hi - lo) / 2;
        // No interval of this subtree ends after `start`.
        if self.max_end[mid] <= start {
            return;
        }
        self.collect(lo, mid, start, end, out);
        let e = &self.entries[self.order[mid] as usize];
        // Sorted by start: the right subtree starts at or after this node.
        if e.start < end {
            if start < e.end {
                out.push(self.order[mid]);
            }
            self.collect(mid + 1, hi, start, end, out);
        }
    }
}

#[derive(Default)]
pub(crate) struct KindCounters {
    pub starts: AtomicU64,
    pub ends: AtomicU64,
    pub refusals: AtomicU64,
    pub retries: AtomicU64,
    pub bytes: AtomicU64,
    pub panics: AtomicU64,
}

struct Inflight {
    id: u64,
    range: Range,
    snapshot: Arc<SubIndex>,
    late: Vec<Arc<Entry>>,
    /// The ends are being delivered; no more late joiners (R4).
    ending: bool,
}

struct State {
    subs: Arc<SubIndex>,
    inflight: Vec<Inflight>,
    next_teardown: u64,
    waiters: u32,
    released: bool,
}

pub(crate) struct Registry {
    state: Mutex<State>,
    cv: Condvar,
    next_sub: AtomicU64,
    kinds: Vec<KindCounters>,
    /// Fault injection (see `AddressSpace::plant_fault_skip_next_end`): teardowns whose ends are
    /// still to be skipped.
    #[cfg(feature = "fault-injection")]
    skip_ends: AtomicU64,
    /// Teardowns whose ends were skipped by that fault injection.
    skipped_ends: AtomicU64,
}

fn kind_slot(ev: &Event, origin: Origin) -> usize {
    ev.index() * 2 + (origin == Origin::External) as usize
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            state: Mutex::new(State {
                subs: Arc::new(SubIndex::default()),
                inflight: Vec::new(),
                next_teardown: 0,
                waiters: 0,
                released: false,
            }),
            cv: Condvar::new(),
            next_sub: AtomicU64::new(1),
            kinds: (0..Event::KINDS * 2).map(|_| KindCounters::default()).collect(),
            #[cfg(feature = "fault-injection")]
            skip_ends: AtomicU64::new(0),
            skipped_ends: AtomicU64::new(0),
        }
    }

    /// Fault injection: the next teardown to finish skips its `invalidate_range_end`s.
    #[cfg(feature = "fault-injection")]
    pub fn plant_skip_next_end(&self) {
        self.skip_ends.fetch_add(1, Ordering::SeqCst);
    }

    /// Teardowns whose ends the fault injection skipped.
    pub fn skipped_ends(&self) -> u64 {
        self.skipped_ends.load(Ordering::SeqCst)
    }

    /// Takes one pending skip, if any (never one without the feature `fault-injection`).
    fn take_skip(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            let mut n = self.skip_ends.load(Ordering::SeqCst);
            while n > 0 {
                match self.skip_ends.compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => {
                        self.skipped_ends.fetch_add(1, Ordering::SeqCst);
                        return true;
                    }
                    Err(now) => n = now,
                }
            }
        }
        false
    }

    pub fn kind(&self, ev: &Event, origin: Origin) -> &KindCounters {
        &self.kinds[kind_slot(ev, origin)]
    }

    /// Registers `sub` for ranges overlapping `[start, end)`.
    pub fn subscribe(
        &self,
        sub: Arc<dyn Subscriber>,
        start: usize,
        end: usize,
    ) -> Result<SubscriptionId, Error> {
        if start >= end {
            return Err(Error::Empty);
        }
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry { id, start, end, sub, c: SubCounters::default() });
        let mut st = sync::lock(&self.state);
        if st.released {
            return Err(Error::Released);
        }
        // R1: publish a new list.
        let mut v: Vec<Arc<Entry>> = st.subs.entries.clone();
        v.push(entry.clone());
        st.subs = Arc::new(SubIndex::new(v));
        // R4: join overlapping teardowns whose start has run (all records in `inflight` that are
        // not yet ending: a record is pushed before its first start callback, so joining one whose
        // starts are still running is merely conservative).
        for rec in st.inflight.iter_mut() {
            if !rec.ending && entry.covers(&rec.range) {
                entry.sub.invalidate_range_joined(&rec.range);
                entry.c.joined.fetch_add(1, Ordering::Relaxed);
                rec.late.push(entry.clone());
            }
        }
        Ok(SubscriptionId(id))
    }

    /// Removes a subscription and waits until none of its callbacks can still run (R3).
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<SubscriberStats, Error> {
        if in_teardown() {
            return Err(Error::InCallback);
        }
        let mut st = sync::lock(&self.state);
        let Some(pos) = st.subs.entries.iter().position(|e| e.id == id.0) else {
            return Err(Error::NoSuchSubscriber);
        };
        let mut v: Vec<Arc<Entry>> = st.subs.entries.clone();
        let entry = v.remove(pos);
        st.subs = Arc::new(SubIndex::new(v));
        st = self.wait_unreferenced(st, id.0);
        drop(st);
        Ok(stats_of(&entry))
    }

    /// Blocks until no in-flight record names subscriber `id` (R2, R3).
    fn wait_unreferenced<'a>(
        &self,
        mut st: sync::MutexGuard<'a, State>,
        id: u64,
    ) -> sync::MutexGuard<'a, State> {
        while st.inflight.iter().any(|rec| {
            rec.snapshot.entries.iter().any(|e| e.id == id && e.covers(&rec.range))
                || rec.late.iter().any(|e| e.id == id)
        }) {
            st.waiters += 1;
            st = sync::wait(&self.cv, st);
            st.waiters -= 1;
        }
        st
    }

    /// Removes every subscriber, waits for each one's callbacks to finish, then calls its
    /// `release`. Later subscriptions fail with [`Error::Released`].
    pub fn release_all(&self) -> Result<(), Error> {
        if in_teardown() {
            return Err(Error::InCallback);
        }
        let mut st = sync::lock(&self.state);
        st.released = true;
        let subs = std::mem::replace(&mut st.subs, Arc::new(SubIndex::default()));
        for e in subs.entries.iter() {
            st = self.wait_unreferenced(st, e.id);
        }
        drop(st);
        // R6: one subscriber's panicking `release` does not keep the others from theirs.
        let mut first_panic = None;
        for e in subs.entries.iter() {
            if let Err(p) = call(|| e.sub.release()) {
                tracing::error!(subscriber = e.sub.name(), "subscriber release panicked");
                first_panic.get_or_insert(p);
            }
        }
        if let Some(p) = first_panic {
            std::panic::resume_unwind(p);
        }
        Ok(())
    }

    /// Starts a teardown of `range`: records it in flight, then calls `invalidate_range_start` of
    /// every overlapping subscriber. On refusal (only honoured when `!range.blockable`) the
    /// subscribers that accepted get their end, the record is dropped and `Err` names the refuser.
    pub fn begin(&self, range: Range) -> Result<Teardown<'_>, Error> {
        let kc = self.kind(&range.event, range.origin);
        let (id, snapshot) = {
            let mut st = sync::lock(&self.state);
            let id = st.next_teardown;
            st.next_teardown += 1;
            let snapshot = st.subs.clone();
            // R2: in flight before the first callback.
            st.inflight.push(Inflight {
                id,
                range,
                snapshot: snapshot.clone(),
                late: Vec::new(),
                ending: false,
            });
            (id, snapshot)
        };
        // R7: only the subscribers whose interval overlaps the range, found by the index (outside
        // the lock: the snapshot never changes, R1), in subscription order.
        let subs = snapshot.overlapping(range.start, range.end);
        IN_TEARDOWN.with(|c| c.set(c.get() + 1));
        kc.starts.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(
            target: "notifier::range",
            phase = "start",
            start = range.start,
            end = range.end,
            exact_start = range.exact_start,
            exact_end = range.exact_end,
            event = range.event.name(),
            origin = ?range.origin,
            blockable = range.blockable,
            "invalidate_range_start"
        );
        let mut td = Teardown { reg: self, id, range, snapshot, subs, accepted: 0, ended: false };
        let contained = contains_panics(&range);
        let snapshot = td.snapshot.clone();
        for (i, &ix) in td.subs.iter().enumerate() {
            let e = snapshot.entry(ix);
            // R6: counted before the call, so a start that panics (or any later one) still leaves
            // this subscriber among those `finish` ends.
            td.accepted = i + 1;
            match call(|| e.sub.invalidate_range_start(&range)) {
                Ok(Ok(())) => {
                    e.c.starts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(crate::Refused)) => {
                    e.c.refusals.fetch_add(1, Ordering::Relaxed);
                    kc.refusals.fetch_add(1, Ordering::Relaxed);
                    if range.blockable {
                        tracing::warn!(
                            subscriber = e.sub.name(),
                            "refusal of a blockable invalidate_range_start ignored"
                        );
                        e.c.starts.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let err = Error::Refused {
                            subscriber: SubscriptionId(e.id),
                            name: e.sub.name().to_string(),
                        };
                        tracing::trace!(target: "notifier::range", subscriber = e.sub.name(), "refused");
                        // Only the first `i` got a start: `end` delivers to those.
                        td.accepted = i;
                        td.abort();
                        return Err(err);
                    }
                }
                Err(payload) => {
                    self.panicked(e, &range, "invalidate_range_start");
                    if !contained {
                        // R6: no syscall follows; every subscriber that may have begun gets its
                        // end, then the caller sees the panic.
                        let _ = td.finish(false);
                        std::panic::resume_unwind(payload);
                    }
                }
            }
        }
        td.accepted = td.subs.len();
        Ok(td)
    }

    /// A subscriber's callback panicked: counted, logged.
    fn panicked(&self, e: &Entry, range: &Range, callback: &'static str) {
        self.kind(&range.event, range.origin).panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            subscriber = e.sub.name(),
            callback,
            origin = ?range.origin,
            event = range.event.name(),
            "subscriber callback panicked"
        );
    }
}

/// A panic payload caught from a subscriber's callback.
type Panic = Box<dyn std::any::Any + Send + 'static>;

/// R6: whether panics of subscribers are contained (caught, counted, the other subscribers still
/// called) rather than handed to the caller once every end has been delivered. Teardowns nobody
/// can abort are contained: external ones (the kernel already acted, and the monitor's worker must
/// keep delivering) and Release.
fn contains_panics(range: &Range) -> bool {
    range.origin == Origin::External || range.event == Event::Release
}

/// Runs a subscriber's callback, catching its panic (R6). Under loom the callback runs as is: the
/// model checker reports failures by panicking inside callbacks, which must not be caught.
#[cfg(not(loom))]
fn call<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

#[cfg(loom)]
fn call<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    Ok(f())
}

/// An in-flight teardown. Dropping it delivers `invalidate_range_end` (so an early return or a
/// panic between start and end still pairs every start with an end).
pub(crate) struct Teardown<'a> {
    reg: &'a Registry,
    id: u64,
    range: Range,
    /// The subscriber list the teardown began with (R1: never changed).
    snapshot: Arc<SubIndex>,
    /// The indices in `snapshot` of the subscribers whose interval overlaps the range (R7).
    subs: Vec<u32>,
    /// Subscribers `subs[..accepted]` got a start.
    accepted: usize,
    ended: bool,
}

impl Teardown<'_> {
    /// The non-sleeping callback right after the host page tables changed.
    pub fn invalidate_range(&self) {
        let contained = contains_panics(&self.range);
        for e in self.subs[..self.accepted].iter().map(|&i| self.snapshot.entry(i)) {
            e.c.invalidates.fetch_add(1, Ordering::Relaxed);
            if let Err(payload) = call(|| e.sub.invalidate_range(&self.range)) {
                self.reg.panicked(e, &self.range, "invalidate_range");
                if !contained {
                    // Unwinds through the caller; dropping `self` delivers every end (R6).
                    std::panic::resume_unwind(payload);
                }
            }
        }
        // Late joiners are not told: they hold nothing of the range (they joined after its start
        // and cannot install into it before its end).
    }

    /// Delivers the ends (also done by `Drop`). If a subscriber's end panicked (and the teardown
    /// does not contain panics, R6), the panic is resumed here, after every other end was
    /// delivered and the teardown retired.
    pub fn end(mut self) {
        if let Some(p) = self.finish(true) {
            std::panic::resume_unwind(p);
        }
    }

    /// Delivers the ends of a teardown whose operation failed (not counted in `bytes`).
    pub fn abort(mut self) {
        if let Some(p) = self.finish(false) {
            std::panic::resume_unwind(p);
        }
    }

    /// Calls one subscriber's end; a panic is counted and kept (the first one) for the caller.
    fn end_one(&self, e: &Entry, first_panic: &mut Option<Panic>) {
        match call(|| e.sub.invalidate_range_end(&self.range)) {
            Ok(()) => {}
            Err(p) => {
                self.reg.panicked(e, &self.range, "invalidate_range_end");
                if !contains_panics(&self.range) && first_panic.is_none() {
                    *first_panic = Some(p);
                }
            }
        }
        e.c.ends.fetch_add(1, Ordering::Relaxed);
    }

    /// R6: delivers every end, retires the record and leaves the thread's teardown depth, whatever
    /// the subscribers do; returns the first panic of an end that is not contained.
    fn finish(&mut self, completed: bool) -> Option<Panic> {
        if self.ended {
            return None;
        }
        self.ended = true;
        let range = self.range;
        let reg = self.reg;
        let mut first_panic = None;
        // Fault injection: no subscriber hears the end and it is not counted (the record is
        // still retired, so unsubscribe and release do not wait for it forever).
        let planted = completed && reg.take_skip();
        if planted {
            tracing::warn!(target: "notifier::range", "planted fault: invalidate_range_end skipped");
        }
        if !planted {
            for e in self.subs[..self.accepted].iter().map(|&i| self.snapshot.entry(i)) {
                self.end_one(e, &mut first_panic);
            }
        }
        let mut st = sync::lock(&reg.state);
        let pos = st
            .inflight
            .iter()
            .position(|r| r.id == self.id)
            .expect("in-flight record present until finish (R2)");
        if !planted && !st.inflight[pos].late.is_empty() {
            // R4: close the record to joiners, deliver their ends without the lock, then retire.
            // The record keeps naming them (R2) until it is removed below, after their ends.
            st.inflight[pos].ending = true;
            let late = st.inflight[pos].late.clone();
            drop(st);
            for e in late.iter() {
                self.end_one(e, &mut first_panic);
            }
            st = sync::lock(&reg.state);
        }
        let pos = st.inflight.iter().position(|r| r.id == self.id).unwrap();
        st.inflight.swap_remove(pos);
        if st.waiters > 0 {
            // R5
            reg.cv.notify_all();
        }
        drop(st);
        IN_TEARDOWN.with(|c| c.set(c.get() - 1));
        let kc = reg.kind(&range.event, range.origin);
        if planted {
            return None;
        }
        kc.ends.fetch_add(1, Ordering::Relaxed);
        if completed {
            kc.bytes.fetch_add(range.len() as u64, Ordering::Relaxed);
        }
        tracing::trace!(
            target: "notifier::range",
            phase = "end",
            start = range.start,
            end = range.end,
            event = range.event.name(),
            origin = ?range.origin,
            completed,
            "invalidate_range_end"
        );
        first_panic
    }
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        // Reached on an early return or while unwinding (a panic between start and end): not a
        // completed operation.
        let completed = !std::thread::panicking();
        if let Some(p) = self.finish(completed) {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
            // Already unwinding: a second panic would abort; the end's panic was counted and
            // logged by `end_one`.
        }
    }
}

fn stats_of(e: &Entry) -> SubscriberStats {
    SubscriberStats {
        id: e.id,
        name: e.sub.name().to_string(),
        start: e.start,
        end: e.end,
        starts: e.c.starts.load(Ordering::Relaxed),
        invalidates: e.c.invalidates.load(Ordering::Relaxed),
        ends: e.c.ends.load(Ordering::Relaxed),
        refusals: e.c.refusals.load(Ordering::Relaxed),
        joined: e.c.joined.load(Ordering::Relaxed),
        read_retries: e.sub.read_retries(),
    }
}

impl Registry {
    pub fn subscriber_stats(&self) -> Vec<SubscriberStats> {
        let subs = sync::lock(&self.state).subs.clone();
        subs.entries.iter().map(|e| stats_of(e)).collect()
    }

    pub fn kind_stats(&self) -> Vec<KindStats> {
        (0..Event::KINDS * 2)
            .map(|i| {
                let k = &self.kinds[i];
                KindStats {
                    kind: Event::name_of(i / 2),
                    origin: if i % 2 == 0 { "vmm" } else { "external" },
                    starts: k.starts.load(Ordering::Relaxed),
                    ends: k.ends.load(Ordering::Relaxed),
                    refusals: k.refusals.load(Ordering::Relaxed),
                    retries: k.retries.load(Ordering::Relaxed),
                    bytes: k.bytes.load(Ordering::Relaxed),
                    panics: k.panics.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn subscriber_count(&self) -> usize {
        sync::lock(&self.state).subs.entries.len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Nop;
    impl Subscriber for Nop {}

    fn entry(id: u64, start: usize, end: usize) -> Arc<Entry> {
        Arc::new(Entry { id, start, end, sub: Arc::new(Nop), c: SubCounters::default() })
    }

    /// R7: the interval tree finds exactly what a scan finds, in subscription order, over random
    /// lists (nested, overlapping, equal, whole-space intervals) and random queries.
    #[test]
    fn index_finds_exactly_the_overlapping_entries() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for n in [0usize, 1, 2, 3, 7, 64, 200] {
            let entries: Vec<Arc<Entry>> = (0..n)
                .map(|i| {
                    if rnd(10) == 0 {
                        entry(i as u64, 0, usize::MAX)
                    } else {
                        let s = rnd(1000) as usize;
                        entry(i as u64, s, s + 1 + rnd(100) as usize)
                    }
                })
                .collect();
            let ix = SubIndex::new(entries.clone());
            for _ in 0..500 {
                let s = rnd(1100) as usize;
                let e = s + 1 + rnd(50) as usize;
                let want: Vec<u64> =
                    entries.iter().filter(|en| overlaps(en.start, en.end, s, e)).map(|en| en.id).collect();
                let got: Vec<u64> = ix.overlapping(s, e).into_iter().map(|i| ix.entry(i).id).collect();
                assert_eq!(got, want, "n={n} query {s}..{e}");
            }
        }
    }
}
