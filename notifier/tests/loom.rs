//! Loom model of the seq-retry protocol of `notifier::Interval` (the crate's own code, built with
//! loom's primitives under `--cfg loom`):
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p zapvm-notifier --release --test loom`
//!
//! A page has a generation (a zap bumps it). Invalidators run start -> zap -> invalidate_range ->
//! end; a reader runs read_begin -> translate (read the generation) -> lock -> read_retry ->
//! install. Checked in every interleaving: an installed translation always equals the page's
//! current generation while it is installed (checked at install, under the lock, and at the end),
//! i.e. no reader ever installs a translation that an overlapping invalidation removed.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

use notifier::{DiscardMethod, Event, Interval, Origin, Range, Subscriber};

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

fn model(invalidators: usize, reader_ranges: &'static [(usize, usize)], tries: usize, preemptions: usize) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.check(move || {
        let page = Arc::new(AtomicU64::new(0));
        let t: Arc<Interval<Table>> =
            Arc::new(Interval::new("t", 0, 4 * P, None, |tab: &mut Table, r: &Range| {
                if r.overlaps(0, P) {
                    *tab = None;
                }
            }));
        let mut hs = Vec::new();
        for i in 0..invalidators {
            let (t, page) = (t.clone(), page.clone());
            hs.push(thread::spawn(move || {
                // Overlapping ranges: [0, 2P) and [0, P) ...
                let r = range(0, (2 - (i % 2)) * P);
                t.invalidate_range_start(&r).unwrap();
                page.fetch_add(1, Ordering::SeqCst); // the zap
                t.invalidate_range(&r);
                t.invalidate_range_end(&r);
            }));
        }
        for &(rs, re) in reader_ranges {
            let (t, page) = (t.clone(), page.clone());
            hs.push(thread::spawn(move || {
                for _ in 0..tries {
                    let seq = t.read_begin_range(rs, re);
                    let v = page.load(Ordering::SeqCst);
                    let mut g = t.lock();
                    if t.read_retry(&g, seq) {
                        continue;
                    }
                    *g = Some(v);
                    assert_eq!(
                        page.load(Ordering::SeqCst),
                        v,
                        "installed a translation an invalidation already removed"
                    );
                    return;
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let g = t.lock();
        if let Some(v) = *g {
            assert_eq!(v, page.load(Ordering::SeqCst), "stale translation survived");
        }
        assert_eq!(t.in_progress(), 0);
    });
}

#[test]
fn one_invalidator_one_reader() {
    model(1, &[(0, P)], 3, 3);
}

#[test]
fn two_overlapping_invalidators_one_reader() {
    model(2, &[(0, P)], 3, 3);
}

#[test]
fn one_invalidator_whole_interval_and_ranged_readers() {
    model(1, &[(0, 4 * P), (0, P)], 2, 2);
}
