//! Seq-retry rules of `Interval`, and subscribe/unsubscribe during invalidation storms.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};

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

fn iv() -> Arc<Interval<Vec<usize>>> {
    Arc::new(Interval::new("t", 0, 100 * P, Vec::new(), |t: &mut Vec<usize>, r: &Range| {
        t.retain(|a| !r.overlaps(*a, *a + P))
    }))
}

#[test]
fn retry_when_an_invalidation_began_or_ended_meanwhile() {
    let t = iv();
    let r = range(0, P);
    // Nothing happened: no retry.
    let s = t.read_begin();
    assert!(!t.read_retry(&t.lock(), s));
    // Began meanwhile (still running): retry.
    let s = t.read_begin();
    t.invalidate_range_start(&r).unwrap();
    assert!(t.read_retry(&t.lock(), s));
    // Ended meanwhile (began before read_begin is impossible: read_begin would wait): retry.
    let s2 = t.read_begin_range(50 * P, 51 * P); // not overlapping: does not wait
    t.invalidate_range_end(&r);
    assert!(t.read_retry(&t.lock(), s2));
    // Began and ended meanwhile: retry.
    let s = t.read_begin();
    t.invalidate_range_start(&r).unwrap();
    t.invalidate_range_end(&r);
    assert!(t.read_retry(&t.lock(), s));
    assert_eq!(t.read_retries(), 3);
    // Entries are dropped at start, under the lock.
    t.lock().extend([0, P, 2 * P]);
    t.invalidate_range_start(&range(P, 2 * P)).unwrap();
    assert_eq!(*t.lock(), vec![0, 2 * P]);
    t.invalidate_range_end(&range(P, 2 * P));
}

#[test]
fn read_begin_waits_for_overlapping_invalidations_to_end() {
    let t = iv();
    let (a, b) = (range(0, 2 * P), range(P, 3 * P));
    // Two concurrent overlapping invalidations.
    t.invalidate_range_start(&a).unwrap();
    t.invalidate_range_start(&b).unwrap();
    assert_eq!(t.in_progress(), 2);
    // A reader elsewhere in the interval does not wait.
    let s = t.read_begin_range(10 * P, 11 * P);
    assert!(!t.read_retry(&t.lock(), s));
    let (tx, rx) = mpsc::channel();
    let t2 = t.clone();
    let reader = std::thread::spawn(move || {
        let s = t2.read_begin_range(2 * P, 3 * P);
        tx.send(()).unwrap();
        let g = t2.lock();
        !t2.read_retry(&g, s)
    });
    // Rendezvous: the reader is blocked inside read_begin.
    while t.waiting_readers() == 0 {
        std::thread::yield_now();
    }
    t.invalidate_range_end(&a);
    // b still covers [P, 3P): the reader must still be waiting.
    assert_eq!(t.waiting_readers(), 1);
    assert!(rx.try_recv().is_err());
    t.invalidate_range_end(&b);
    rx.recv().unwrap();
    assert!(reader.join().unwrap(), "read after both ends needs no retry");
    assert_eq!(t.waits(), 1);
}

#[test]
fn non_blockable_start_refuses_when_the_table_lock_is_held() {
    let t = iv();
    let mut r = range(0, P);
    r.blockable = false;
    let g = t.lock();
    assert!(t.invalidate_range_start(&r).is_err());
    drop(g);
    assert!(t.invalidate_range_start(&r).is_ok());
    t.invalidate_range_end(&r);
    assert_eq!(t.in_progress(), 0);
}

/// Subscribers come and go while several threads invalidate: no deadlock, no callback after
/// unsubscribe returns, every start paired with an end, late joiners wait for the end.
#[test]
fn unsubscribe_during_invalidation_storm() {
    let m = Map::anon(64 * P, P, false);
    m.fill(1);
    let s = space(&[m.spec(false)]);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (s, stop, ops, a) = (s.clone(), stop.clone(), ops.clone(), m.addr());
            std::thread::spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    s.discard(a + (i % 60) * P, 4 * P).unwrap();
                    ops.fetch_add(1, Ordering::Relaxed);
                    i += 7;
                }
            })
        })
        .collect();
    struct Guarded {
        gone: AtomicBool,
        violations: Arc<AtomicU64>,
        seen: AtomicU64,
    }
    impl Subscriber for Guarded {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), notifier::Refused> {
            if self.gone.load(Ordering::SeqCst) {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
            // Widen the window in which unsubscribe must wait.
            std::thread::yield_now();
            self.seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn invalidate_range(&self, _: &Range) {
            if self.gone.load(Ordering::SeqCst) {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn invalidate_range_end(&self, _: &Range) {
            if self.gone.load(Ordering::SeqCst) {
                self.violations.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let violations = Arc::new(AtomicU64::new(0));
    for round in 0..300 {
        let g = Arc::new(Guarded {
            gone: AtomicBool::new(false),
            violations: violations.clone(),
            seen: AtomicU64::new(0),
        });
        let id = s.subscribe(g.clone()).unwrap();
        // An interval subscription that may join in-flight invalidations.
        let iv = s.subscribe_interval("iv", m.addr(), 64 * P, (), |_, _| {}).unwrap();
        while g.seen.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let st = s.unsubscribe(id).unwrap();
        g.gone.store(true, Ordering::SeqCst);
        assert_eq!(st.starts + st.joined, st.ends, "round {round}: {st:?}");
        let ist = s.unsubscribe(iv.id).unwrap();
        assert_eq!(ist.starts + ist.joined, ist.ends, "{ist:?}");
        assert_eq!(iv.in_progress(), 0, "every start/join of the interval got its end");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(violations.load(Ordering::SeqCst), 0, "a removed subscriber was called");
    assert!(ops.load(Ordering::Relaxed) > 300);
    assert_eq!(s.subscriber_count(), 0);
}

/// Concurrent overlapping VMM invalidations and a barrier-started reader: the interval's
/// in-progress count returns to zero and readers proceed.
#[test]
fn concurrent_overlapping_invalidations() {
    let m = Map::anon(16 * P, P, false);
    let s = space(&[m.spec(false)]);
    let t = s.subscribe_interval("t", m.addr(), 16 * P, 0u64, |n: &mut u64, _| *n += 1).unwrap();
    let bar = Arc::new(Barrier::new(4));
    let hs: Vec<_> = (0..4)
        .map(|i| {
            let (s, bar, a) = (s.clone(), bar.clone(), m.addr());
            std::thread::spawn(move || {
                bar.wait();
                for _ in 0..1000 {
                    s.discard(a + i * P, 8 * P).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(*t.lock(), 4000);
    assert_eq!(t.in_progress(), 0);
    let seq = t.read_begin();
    assert!(!t.read_retry(&t.lock(), seq));
}
