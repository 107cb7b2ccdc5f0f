//! Loom models of the read-side protocol of the VMM's table (`vmm/src/mmu.rs`, S1-S4 and M1),
//! on the module's own code built with loom's atomics (`vmm::mmu::model`, only with
//! `--cfg loom`):
//!
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmm --release --test loom`
//!
//! A page of guest RAM is a "frame" atomic: a teardown's syscall (after `invalidate_range_start`
//! returned) marks it torn, and a copy is a load of it. Readers take the hit path
//! (`Table::open`: announce, barrier, look at the bits) and copy when the page is covered; the
//! writer runs `drop_overlapping` (clear, barrier, wait for the sections that may have seen the
//! bits) and then tears the frame down. In every interleaving and every value the memory model
//! allows a load to return, a copy through the entry must not see the frame torn: the copy
//! happens before the teardown (the writer waited for its section), or the reader missed
//! (it looked after the clear). The loads are relaxed on purpose: only the protocol's own
//! ordering may keep them from reading the teardown.
//!
//! The model with the notifier's `Interval` adds the miss path (seq-retry install, section
//! opened under the table lock) and a whole start -> zap -> end invalidation, and checks that no
//! copy overlaps the zap.
//!
//! Planted faults (exist only under `--cfg loom`, `vmm::mmu::model::PlantedFault`): a writer
//! that does not wait for the readers it saw, and both sides without their barriers; the models
//! must fail with each.
#![cfg(loom)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::thread;

use notifier::{DiscardMethod, Event, Interval, Origin, Range, Subscriber};
use vmm::mmu::model::{PlantedFault, SlotList, Table};

const P: usize = 4096;
/// The region: 4 pages from host address 1 MiB.
const HVA: usize = 1 << 20;
const LEN: usize = 4 * P;

const MAPPED: u64 = 0;
const TORN: u64 = 1;

fn builder(preemptions: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b
}

/// One hit-path access of page 0 by `reader` of `slots`: returns whether it copied.
fn hit(table: &Table, slots: &SlotList, frame: &AtomicU64) -> bool {
    let slot = slots.claim();
    let (section, run) = table.open(slot, HVA, 8);
    let copied = run > 0;
    if copied {
        // The copy.
        assert_eq!(
            frame.load(Ordering::Relaxed),
            MAPPED,
            "a copy through a dropped entry after start returned"
        );
    }
    drop(section);
    slots.release(slot);
    copied
}

/// `readers` threads each make `accesses` hit-path accesses of page 0 (installed at the start)
/// while one writer drops it and then tears the frame down.
fn hit_path_model(readers: usize, accesses: usize, fault: PlantedFault, preemptions: usize) {
    builder(preemptions).check(move || {
        let slots = Arc::new(SlotList::with_planted_fault(fault));
        let table = Arc::new(Table::new(HVA, LEN));
        table.preinstall_page(HVA);
        let frame = Arc::new(AtomicU64::new(MAPPED));
        let hs: Vec<_> = (0..readers)
            .map(|_| {
                let (slots, table, frame) = (slots.clone(), table.clone(), frame.clone());
                thread::spawn(move || {
                    for _ in 0..accesses {
                        hit(&table, &slots, &frame);
                    }
                })
            })
            .collect();
        assert_eq!(table.drop_overlapping(&slots, HVA, HVA + P), 1);
        // invalidate_range_start returned: the syscall.
        frame.store(TORN, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(table.covered(HVA, P), 0);
    });
}

#[test]
fn one_reader_hit_path_against_a_drop() {
    hit_path_model(1, 1, PlantedFault::None, 3);
}

#[test]
fn one_reader_two_accesses_against_a_drop() {
    hit_path_model(1, 2, PlantedFault::None, 3);
}

#[test]
fn two_readers_hit_path_against_a_drop() {
    hit_path_model(2, 1, PlantedFault::None, 3);
}

/// Runs a model that must fail, and checks it failed with the copy check's message (not some
/// other panic).
fn assert_caught(model: impl FnOnce(), message: &str) {
    let payload =
        catch_unwind(AssertUnwindSafe(model)).expect_err("the model did not catch the planted fault");
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(text.contains(message), "the model failed, but not with {message:?}: {text}");
}

/// PLANTED FAULT: a writer that does not wait for the sections it saw lets a copy through the
/// dropped entry run after start returned.
#[test]
fn a_writer_that_does_not_wait_is_caught() {
    assert_caught(
        || hit_path_model(1, 1, PlantedFault::WriterDoesNotWait, 3),
        "a copy through a dropped entry after start returned",
    );
}

/// PLANTED FAULT: without the barriers (S2), the reader may look before the clear is visible to
/// it while the writer's scan misses the reader's announcement (store buffering).
#[test]
fn missing_barriers_are_caught() {
    assert_caught(
        || hit_path_model(1, 1, PlantedFault::NoBarriers, 3),
        "a copy through a dropped entry after start returned",
    );
}

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

/// The whole table: the notifier's interval over the region, its table lock guarding installs,
/// its invalidate callback `drop_overlapping` (as `GuestMmu::new` subscribes it). The writer runs
/// start -> zap (the frame is torn for the syscall's duration, then mapped again: a discard
/// leaves the mapping) -> invalidate_range -> end; the reader reads page 0 (installed at the
/// start) twice, on the hit path and, when it misses, through the seq-retry install that opens
/// its section under the table lock, exactly as `GuestMmu::access` and `GuestMmu::install` do.
/// No copy may see the frame torn: it completes before the zap or begins after it.
fn interval_model(fault: PlantedFault, preemptions: usize) {
    builder(preemptions).check(move || {
        let slots = Arc::new(SlotList::with_planted_fault(fault));
        let table = Arc::new(Table::new(HVA, LEN));
        table.preinstall_page(HVA);
        let frame = Arc::new(AtomicU64::new(MAPPED));
        let cb_slots = slots.clone();
        let interval = Arc::new(Interval::new(
            "t",
            HVA,
            HVA + LEN,
            table.clone(),
            move |t: &mut Arc<Table>, r: &Range| {
                t.drop_overlapping(&cb_slots, r.start, r.end);
            },
        ));
        let reader = {
            let (slots, table, frame, interval) =
                (slots.clone(), table.clone(), frame.clone(), interval.clone());
            thread::spawn(move || {
                let slot = slots.claim();
                for _ in 0..2 {
                    let (mut section, mut run) = table.open(slot, HVA, 8);
                    if run == 0 {
                        drop(section);
                        loop {
                            let seq = interval.read_begin_range(HVA, HVA + P);
                            let g = interval.lock();
                            if interval.read_retry(&g, seq) {
                                continue;
                            }
                            section = g.install_page(slot, HVA);
                            drop(g);
                            break;
                        }
                        run = table.covered(HVA, 8);
                    }
                    assert!(run > 0);
                    assert_eq!(frame.load(Ordering::Relaxed), MAPPED, "a copy overlapped the teardown");
                    drop(section);
                }
                slots.release(slot);
            })
        };
        let r = range(HVA, HVA + P);
        interval.invalidate_range_start(&r).unwrap();
        frame.store(TORN, Ordering::Relaxed);
        frame.store(MAPPED, Ordering::Relaxed);
        interval.invalidate_range(&r);
        interval.invalidate_range_end(&r);
        reader.join().unwrap();
    });
}

#[test]
fn hit_and_install_paths_against_a_whole_invalidation() {
    interval_model(PlantedFault::None, 4);
}

/// PLANTED FAULT: the same with a writer that does not wait.
#[test]
fn a_writer_that_does_not_wait_is_caught_with_the_interval() {
    assert_caught(|| interval_model(PlantedFault::WriterDoesNotWait, 2), "a copy overlapped the teardown");
}
