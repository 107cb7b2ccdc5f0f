//! Loom models of the seq-retry protocol of `notifier::Interval` and of the subscriber registry
//! (the crate's own code, built with loom's primitives under `--cfg loom`):
//!
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p zapvm-notifier --release --test loom`
//!
//! A page has a generation (a zap bumps it). Invalidators run start -> zap -> invalidate_range ->
//! end (through the registry, `notifier::model::Registry`, or on the interval directly); a reader
//! runs read_begin -> translate (read the generation) -> lock -> read_retry -> install, and starts
//! over until it installs: a retry needs an invalidation to begin or end meanwhile, and there are
//! finitely many, so every interleaving ends with an installed translation and is checked (no
//! reader gives up, which would make the interleaving check nothing). Checked in every
//! interleaving: the installed translation equals the page's generation at the end, i.e. no
//! reader installed a translation that an invalidation removed, and no invalidation is left in
//! progress.
//!
//! `overwritten_in_progress_range_is_caught` proves the model of two disjoint invalidators fails
//! when the interval overwrites its in-progress range instead of unioning it (a planted fault that
//! exists only under `--cfg loom`).
#![cfg(loom)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::thread;
use std::sync::Arc;

use notifier::model::Registry;
use notifier::{DiscardMethod, Error, Event, Interval, Origin, Range, Refused, Subscriber};

const P: usize = 4096;

fn range(start: usize, end: usize) -> Range {
    Range {
        start,
        end,
        exact_start: start,
        exact_end: end,
        event: Event::Discard(DiscardMethod::DontNeed),
        origin: Origin::Vmm,
        blockable: true,
    }
}

/// Table: the installed generation of page 0 (None = no translation).
type Table = Option<u64>;

/// An interval over `[0, 4P)` caching a translation of page 0.
fn table() -> Interval<Table> {
    Interval::new("t", 0, 4 * P, None, |tab: &mut Table, r: &Range| {
        if r.overlaps(0, P) {
            *tab = None;
        }
    })
}

/// The seq-retry reader: installs page 0's generation, starting over until it may; returns the
/// number of attempts.
fn install(t: &Interval<Table>, page: &AtomicU64, rs: usize, re: usize) -> usize {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let seq = t.read_begin_range(rs, re);
        let v = page.load(Ordering::SeqCst);
        let mut g = t.lock();
        if t.read_retry(&g, seq) {
            continue;
        }
        *g = Some(v);
        return attempts;
    }
}

/// The end-of-execution check (after the reader installed): what is still installed is current
/// (an invalidation that began after the install dropped it), nothing is in progress.
fn check(t: &Interval<Table>, page: &AtomicU64) {
    let g = t.lock();
    if let Some(v) = *g {
        assert_eq!(v, page.load(Ordering::SeqCst), "stale translation survived");
    }
    drop(g);
    assert_eq!(t.in_progress(), 0, "an invalidation was left in progress");
}

fn builder(preemptions: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b
}

/// Invalidators on the interval directly (overlapping ranges [0, 2P) and [0, P)) and readers.
fn interval_model(invalidators: usize, reader_ranges: &'static [(usize, usize)], preemptions: usize) {
    builder(preemptions).check(move || {
        let page = Arc::new(AtomicU64::new(0));
        let t = Arc::new(table());
        let mut hs = Vec::new();
        for i in 0..invalidators {
            let (t, page) = (t.clone(), page.clone());
            hs.push(thread::spawn(move || {
                let r = range(0, (2 - (i % 2)) * P);
                t.invalidate_range_start(&r).unwrap();
                page.fetch_add(1, Ordering::SeqCst); // the zap
                t.invalidate_range(&r);
                t.invalidate_range_end(&r);
            }));
        }
        let readers: Vec<_> = reader_ranges
            .iter()
            .map(|&(rs, re)| {
                let (t, page) = (t.clone(), page.clone());
                thread::spawn(move || install(&t, &page, rs, re))
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        for h in readers {
            // Each retry needs a start or an end of an invalidation meanwhile.
            assert!(h.join().unwrap() <= 2 * invalidators + 1);
        }
        check(&t, &page);
    });
}

#[test]
fn one_invalidator_one_reader() {
    interval_model(1, &[(0, P)], 3);
}

#[test]
fn two_overlapping_invalidators_one_reader() {
    interval_model(2, &[(0, P)], 3);
}

#[test]
fn one_invalidator_whole_interval_and_ranged_readers() {
    interval_model(1, &[(0, 4 * P), (0, P)], 2);
}

/// Two invalidators of disjoint parts of one interval through the registry ([0, P) zaps page 0,
/// [2P, 3P) another page) and a reader of page 0: while the first is in progress the reader must
/// wait, whatever the second does to the in-progress range (I1: the union of the ranges).
fn disjoint_invalidators(planted_overwrite: bool) {
    builder(3).check(move || {
        let reg = Arc::new(Registry::default());
        let page = Arc::new(AtomicU64::new(0));
        let other_page = Arc::new(AtomicU64::new(0));
        let t = if planted_overwrite { table().plant_fault_overwrite_in_progress() } else { table() };
        let t = Arc::new(t);
        reg.subscribe(t.clone(), 0, 4 * P).unwrap();
        let inv = |r: Range, page: Arc<AtomicU64>| {
            let reg = reg.clone();
            thread::spawn(move || {
                reg.invalidate(r, || {
                    page.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap()
            })
        };
        let a = inv(range(0, P), page.clone());
        let b = inv(range(2 * P, 3 * P), other_page.clone());
        let (rt, rpage) = (t.clone(), page.clone());
        let reader = thread::spawn(move || install(&rt, &rpage, 0, P));
        a.join().unwrap();
        b.join().unwrap();
        assert!(reader.join().unwrap() <= 5);
        check(&t, &page);
    });
}

#[test]
fn two_disjoint_invalidators_through_the_registry() {
    disjoint_invalidators(false);
}

/// The planted fault (in-progress range overwritten, not unioned) must make the model fail.
#[test]
fn overwritten_in_progress_range_is_caught() {
    let r = catch_unwind(AssertUnwindSafe(|| disjoint_invalidators(true)));
    assert!(r.is_err(), "the model did not catch an overwritten in-progress range");
}

/// R4: a subscriber registered while an overlapping teardown is in flight joins it, so its reader
/// cannot install a translation of the range before that teardown ends.
#[test]
fn late_joiner_waits_for_the_teardown_in_flight() {
    builder(3).check(|| {
        let reg = Arc::new(Registry::default());
        let page = Arc::new(AtomicU64::new(0));
        let inv = {
            let (reg, page) = (reg.clone(), page.clone());
            thread::spawn(move || {
                reg.invalidate(range(0, P), || {
                    page.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap()
            })
        };
        let t = Arc::new(table());
        let (jreg, jt, jpage) = (reg.clone(), t.clone(), page.clone());
        let joiner = thread::spawn(move || {
            jreg.subscribe(jt.clone(), 0, 4 * P).unwrap();
            install(&jt, &jpage, 0, P)
        });
        inv.join().unwrap();
        assert!(joiner.join().unwrap() <= 3);
        check(&t, &page);
    });
}

/// Counts its callbacks and asserts none runs once it is marked gone.
struct Watched {
    gone: AtomicBool,
    starts: AtomicU64,
    ends: AtomicU64,
}

impl Subscriber for Watched {
    fn invalidate_range_start(&self, _: &Range) -> Result<(), Refused> {
        assert!(!self.gone.load(Ordering::SeqCst), "start after unsubscribe returned");
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn invalidate_range(&self, _: &Range) {
        assert!(!self.gone.load(Ordering::SeqCst), "invalidate_range after unsubscribe returned");
    }
    fn invalidate_range_end(&self, _: &Range) {
        assert!(!self.gone.load(Ordering::SeqCst), "end after unsubscribe returned");
        self.ends.fetch_add(1, Ordering::SeqCst);
    }
}

/// R3: when unsubscribe returns, no callback of the subscriber runs any more and every start it
/// got has its end (the grace period covers the whole start..end).
#[test]
fn unsubscribe_waits_out_the_teardowns_in_flight() {
    builder(3).check(|| {
        let reg = Arc::new(Registry::default());
        let w = Arc::new(Watched {
            gone: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            ends: AtomicU64::new(0),
        });
        let id = reg.subscribe(w.clone(), 0, 4 * P).unwrap();
        let inv = {
            let reg = reg.clone();
            thread::spawn(move || reg.invalidate(range(0, P), || {}).unwrap())
        };
        let (ureg, uw) = (reg.clone(), w.clone());
        let unsub = thread::spawn(move || {
            let st = ureg.unsubscribe(id).unwrap();
            assert_eq!(
                uw.starts.load(Ordering::SeqCst),
                uw.ends.load(Ordering::SeqCst),
                "a start without its end"
            );
            uw.gone.store(true, Ordering::SeqCst);
            st
        });
        inv.join().unwrap();
        let st = unsub.join().unwrap();
        assert_eq!(st.starts + st.joined, st.ends);
    });
}

/// A non-blockable teardown meets a reader holding the second interval's table lock: the second
/// refuses, and the first (which accepted) must get its end; no zap happens on refusal, and either
/// way both readers' translations are current.
#[test]
fn refused_non_blockable_start_ends_those_that_accepted() {
    builder(3).check(|| {
        let reg = Arc::new(Registry::default());
        let page = Arc::new(AtomicU64::new(0));
        let first = Arc::new(table());
        let second = Arc::new(table());
        reg.subscribe(first.clone(), 0, 4 * P).unwrap();
        reg.subscribe(second.clone(), 0, 4 * P).unwrap();
        let inv = {
            let (reg, page) = (reg.clone(), page.clone());
            thread::spawn(move || {
                let r = Range { blockable: false, ..range(0, P) };
                match reg.invalidate(r, || {
                    page.fetch_add(1, Ordering::SeqCst);
                }) {
                    Ok(()) => false,
                    Err(Error::Refused { .. }) => true,
                    Err(e) => panic!("{e}"),
                }
            })
        };
        let (rs, rpage) = (second.clone(), page.clone());
        let reader = thread::spawn(move || install(&rs, &rpage, 0, P));
        let refused = inv.join().unwrap();
        reader.join().unwrap();
        if refused {
            assert_eq!(page.load(Ordering::SeqCst), 0, "no zap after a refusal");
        }
        assert_eq!(first.in_progress(), 0, "the subscriber that accepted got its end");
        check(&second, &page);
    });
}
