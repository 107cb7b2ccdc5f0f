//! Faulting readers and invalidating writers over real memory: >= 10^6 operations, no stale
//! translation. A control run with the retry check disabled shows the checker finds staleness.
//!
//! Each page's first u64 is its content tag. A reader "faults" page p: `read_begin`, translate
//! (read the tag; if it is 0 — freshly discarded — populate it with a new unique tag), take the
//! table lock, `read_retry`, install `p -> tag`. A writer discards random pages through the API.
//! Invariant checked under the table lock on every access: an installed entry's tag equals the
//! page's current tag (the page was not discarded under it). Page contents change to 0 only by a
//! discard, and 0 -> tag only when no entry for the page can exist (entries are never 0).

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

const P: usize = 4096;
const PAGES: usize = 256;

fn tag(m: usize, p: usize) -> &'static AtomicU64 {
    // SAFETY: the page is inside the test mapping, which outlives every thread using it; the tag
    // is accessed only atomically; a discard replaces the page with zeros, which is a valid u64.
    unsafe { &*((m + p * P) as *const AtomicU64) }
}

/// Returns (operations, stale translations found).
fn run(ops_target: u64, honour_retry: bool) -> (u64, u64) {
    let m = Map::anon(PAGES * P, P, false);
    let s = space(&[m.spec(false)]);
    let base = m.addr();
    let t = Arc::new(
        s.subscribe_interval(
            "table",
            base,
            PAGES * P,
            vec![0u64; PAGES],
            move |tab: &mut Vec<u64>, r: &notifier::Range| {
                let lo = (r.start.max(base) - base) / P;
                let hi = ((r.end.min(base + PAGES * P)) - base).div_ceil(P);
                tab[lo..hi].iter_mut().for_each(|e| *e = 0);
            },
        )
        .unwrap(),
    );
    let ops = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(AtomicU64::new(0));
    let next_tag = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let bar = Arc::new(Barrier::new(4));
    let mut hs = Vec::new();
    for r in 0..2u64 {
        let (t, ops, stale, next_tag, stop, bar) =
            (t.clone(), ops.clone(), stale.clone(), next_tag.clone(), stop.clone(), bar.clone());
        hs.push(std::thread::spawn(move || {
            let mut x = 0x9e3779b97f4a7c15u64 ^ r;
            bar.wait();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x as usize) % PAGES;
                let hva = base + p * P;
                loop {
                    let seq = t.read_begin_range(hva, hva + P);
                    let mut v = tag(base, p).load(Ordering::SeqCst);
                    if v == 0 {
                        let new = next_tag.fetch_add(1, Ordering::Relaxed);
                        v = match tag(base, p).compare_exchange(0, new, Ordering::SeqCst, Ordering::SeqCst) {
                            Ok(_) => new,
                            Err(cur) => cur,
                        };
                    }
                    let mut g = t.lock();
                    if honour_retry && t.read_retry(&g, seq) {
                        continue;
                    }
                    g[p] = v;
                    // Use: every installed entry must match memory.
                    for (q, e) in g.iter().enumerate().skip(p.saturating_sub(2)).take(5) {
                        if *e != 0 && *e != tag(base, q).load(Ordering::SeqCst) {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    break;
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in 0..2u64 {
        let (s, ops, stop, bar) = (s.clone(), ops.clone(), stop.clone(), bar.clone());
        hs.push(std::thread::spawn(move || {
            let mut x = 0x2545f4914f6cdd1du64 ^ (w << 32);
            bar.wait();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x as usize) % (PAGES - 4);
                let n = 1 + (x >> 40) as usize % 4;
                s.discard(base + p * P, n * P).unwrap();
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    while ops.load(Ordering::Relaxed) < ops_target && stale.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    (ops.load(Ordering::Relaxed), stale.load(Ordering::Relaxed))
}

#[test]
fn no_stale_translation_in_a_million_operations() {
    let (ops, stale) = run(1_000_000, true);
    assert!(ops >= 1_000_000);
    assert_eq!(stale, 0, "stale translations installed");
}

#[test]
fn control_without_retry_finds_stale_translations() {
    let (_, stale) = run(20_000_000, false);
    assert!(stale > 0, "the checker must be able to see a stale translation");
}
