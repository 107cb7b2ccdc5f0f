//! `zapvm stress` in CI: a run of every scenario for a fixed amount of work (passes of every
//! verifier, targets of every device storm, operations of every host scenario), each asserting
//! that no invariant broke and that the scenario really happened; a run with a planted fault (one
//! `invalidate_range_end` skipped) that must be reported as broken — and must not hang; runs of
//! the device storms with a planted fault (a word written into memory the balloon or virtio-mem
//! had discarded) that the host's checks must report; and a run in which the host corrupts a word
//! of a verifier's page, which the guest's verifier must report.
//!
//! No run is judged by the time it took: a run ends when its work is done, and its deadline
//! ([`HANG_DEADLINE`]) only catches a hang. A starved verifier is caught by the harness comparing
//! the verifiers of the same run.
//!
//! The runs share the machine's two cores, so they take turns (one VM at a time).

use std::sync::Mutex;
use std::time::Duration;

use harness::stress::{run, StormSteps, StressOptions, StressReport, Work, PLANTED_WORD};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The deadline of a fixed-work run: only a hang comes near it (the work of each run here takes
/// seconds).
const HANG_DEADLINE: Duration = Duration::from_secs(300);

/// A run (after the runs before it) of `configure`d options: seed 0x57e55, the given work, the
/// hang deadline.
fn stress(work: Work, configure: impl FnOnce(StressOptions) -> StressOptions) -> StressReport {
    run_alone(configure(StressOptions {
        seed: 0x57e55,
        duration: HANG_DEADLINE,
        work: Some(work),
        ..StressOptions::new()
    }))
}

fn run_alone(opts: StressOptions) -> StressReport {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = run(&opts).expect("the stress VM starts");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    report
}

/// No invariant broke and the run did all its work.
fn assert_ok(r: &StressReport) {
    assert!(r.ok, "broken invariants: {:#?}", r.broken);
    assert!(r.vmm_alive);
    let work = r.work.as_ref().expect("a fixed-work run");
    assert!(work.done, "{work:?}");
    assert!(r.guest.passes.iter().all(|&p| p >= work.goal.passes), "{:?} {work:?}", r.guest.passes);
    assert!(r.device.reads >= work.goal.ops && r.device.stale == 0, "{:?}", r.device);
    for k in &r.notifier {
        assert_eq!(k.starts, k.ends, "{k:?}");
    }
}

#[test]
fn discard_storm_keeps_every_invariant() {
    let r = stress(Work { passes: 2, ops: 300, targets: 0 }, |o| StressOptions { discard: true, ..o });
    assert_ok(&r);
    let d = r.discard.as_ref().unwrap();
    assert!(d.ops >= 300, "{d:?}");
    assert!(d.checked_pages > 0 && d.stale_after_discard == 0, "{d:?}");
    assert!(r.guest.zero_pages > 0, "the guest saw discarded pages as zeros: {:?}", r.guest);
    let vmm_discards = r.notifier.iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert!(vmm_discards.starts >= d.ops, "{vmm_discards:?}");
}

#[test]
fn external_chaos_keeps_every_invariant() {
    let r = stress(Work { passes: 2, ops: 150, targets: 0 }, |o| StressOptions { external_chaos: true, ..o });
    assert_ok(&r);
    let c = r.external_chaos.as_ref().unwrap();
    assert!(c.madvise + c.munmap + c.mremap >= 150, "{c:?}");
    assert!(c.madvise > 0 && c.munmap > 0 && c.mremap > 0, "{c:?}");
    let t = r.external_teardowns.as_ref().unwrap();
    assert!(t.events > 0 && t.rebacked_bytes > 0 && t.fatal.is_none(), "{t:?}");
    assert!(r.notifier.iter().any(|k| k.origin == "external" && k.kind == "unmap" && k.ends > 0));
    assert!(r.guest.zero_pages > 0, "{:?}", r.guest);
}

#[test]
fn mprotect_phases_fault_guest_writes_and_keep_every_invariant() {
    let r = stress(Work { passes: 2, ops: 10, targets: 0 }, |o| StressOptions { mprotect: true, ..o });
    assert_ok(&r);
    let p = r.mprotect.as_ref().unwrap();
    assert!(p.phases >= 10 && p.ranges > 0, "{p:?}");
    assert!(p.write_faults_while_read_only > 0, "guest writes faulted while read-only: {p:?}");
    assert_eq!(p.restore_failures, 0);
    let t = r.external_teardowns.as_ref().unwrap();
    assert_eq!(t.protections, p.ranges, "the guard saw every protection: {t:?}");
}

/// The storm's `targets` were followed and its pages checked.
fn assert_storm(s: &StormSteps, targets: u64) {
    assert!(s.reached >= targets && s.timed_out == 0, "{s:?}");
    assert_eq!(s.reached + s.unfinished_at_end, s.targets, "{s:?}");
    assert!(s.discarded_pages_checked > 0 && s.discarded_not_zero == 0, "{s:?}");
    assert!(s.owned_pages_checked > 0 && s.owned_not_pattern == 0, "{s:?}");
}

#[test]
fn balloon_storm_keeps_every_invariant() {
    let r = stress(Work { passes: 2, ops: 0, targets: 6 }, |o| StressOptions { balloon: true, ..o });
    assert_ok(&r);
    assert_eq!(r.roles, ["verifier", "verifier", "balloon-driver"]);
    let b = r.balloon.as_ref().unwrap();
    assert_storm(&b.steps, 6);
    let d = b.device.as_ref().unwrap();
    assert!(d.inflated_pages > 0 && d.deflated_pages > 0, "{d:?}");
    assert_eq!(d.errors.total() + d.discard_failures, 0, "{d:?}");
    assert_eq!(r.discard_accounting.balloon_bytes, d.bytes_discarded);
    // Anonymous RAM without THP: the notifier saw exactly the balloon's discards.
    assert_eq!(r.discard_accounting.notifier_bytes, d.bytes_discarded, "{:?}", r.discard_accounting);
}

#[test]
fn virtio_mem_storm_keeps_every_invariant() {
    let r = stress(Work { passes: 2, ops: 0, targets: 6 }, |o| StressOptions { virtio_mem: true, ..o });
    assert_ok(&r);
    assert_eq!(r.roles, ["verifier", "verifier", "virtio-mem-driver"]);
    let m = r.virtio_mem.as_ref().unwrap();
    assert_storm(&m.steps, 6);
    let d = m.device.as_ref().unwrap();
    assert!(d.plug_requests > 0 && d.unplug_requests > 0, "{d:?}");
    assert_eq!(d.blocks_discarded, d.blocks_unplugged, "{d:?}");
    assert_eq!(r.discard_accounting.notifier_bytes, d.bytes_discarded, "{:?}", r.discard_accounting);
}

#[test]
fn all_scenarios_together_keep_every_invariant() {
    // Under every scenario at once a verifier's passes are slow (mprotect phases stop its writes
    // most of the time, and it shares two cores with three vCPUs and the scenario threads).
    let r = stress(Work { passes: 2, ops: 5, targets: 3 }, StressOptions::all);
    assert_ok(&r);
    assert_eq!(r.scenarios, ["discard", "external-chaos", "mprotect", "balloon", "virtio-mem"]);
    assert_eq!(r.roles, ["verifier", "verifier", "virtio-mem-driver", "balloon-driver"]);
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert!(r.discard.as_ref().unwrap().ops >= 5);
    let c = r.external_chaos.as_ref().unwrap();
    assert!(c.madvise + c.munmap + c.mremap >= 5, "{c:?}");
    assert!(r.mprotect.as_ref().unwrap().phases >= 5);
    for steps in [&r.balloon.as_ref().unwrap().steps, &r.virtio_mem.as_ref().unwrap().steps] {
        assert!(steps.reached >= 3 && steps.timed_out == 0, "{steps:?}");
        assert_eq!((steps.discarded_not_zero, steps.owned_not_pattern), (0, 0), "{steps:?}");
    }
}

/// The planted fault wedges the memory layer, so this run has no work goal (it could never be
/// met): it runs for its 6 s, and the watchdog must end it and say what hung. That the test
/// returns at all is the "does not hang" part; its time is not judged.
#[test]
fn a_skipped_invalidate_range_end_is_caught_and_does_not_hang_the_run() {
    let r = run_alone(StressOptions {
        seed: 0x57e55,
        discard: true,
        duration: Duration::from_secs(6),
        plant_skip_end_after: Some(Duration::from_secs(2)),
        ..StressOptions::new()
    });
    assert!(!r.ok, "the planted fault went unnoticed: {r:#?}");
    assert_eq!(r.planted_faults_fired, 1);
    assert!(
        r.broken.iter().any(|b| b.contains("starts but") && b.contains("ends")),
        "the unmatched start is reported: {:#?}",
        r.broken
    );
    // The table's interval never saw the end: readers of the range block, and the watchdog says so
    // instead of hanging.
    assert!(r.broken.iter().any(|b| b.contains("hung")), "{:#?}", r.broken);
}

/// A run of one device storm in which, at the first step that discards, the storm writes a word
/// into memory its device discarded (as a memory layer that failed to discard would leave it).
/// The host's check of that step reads it; the guest's driver finds it too when it gets the page
/// back, and that failure ends the VM early.
fn planted_dirty(configure: impl FnOnce(StressOptions) -> StressOptions) -> StressReport {
    let r = stress(Work { passes: 1, ops: 0, targets: 20 }, |o| {
        configure(StressOptions { plant_dirty_discarded_after: Some(Duration::ZERO), ..o })
    });
    assert!(!r.ok, "the planted fault went unnoticed: {r:#?}");
    r
}

#[test]
fn a_ballooned_page_holding_data_breaks_the_run() {
    let r = planted_dirty(|o| StressOptions { balloon: true, ..o });
    assert!(
        r.broken.iter().any(|b| b.starts_with("balloon:") && b.contains("not read as zero")),
        "the dirtied ballooned page is reported: {:#?}",
        r.broken
    );
    assert!(r.balloon.as_ref().unwrap().steps.discarded_not_zero >= 1);
}

#[test]
fn an_unplugged_block_holding_data_breaks_the_run() {
    let r = planted_dirty(|o| StressOptions { virtio_mem: true, ..o });
    assert!(
        r.broken.iter().any(|b| b.starts_with("virtio-mem:") && b.contains("not read as zero")),
        "the dirtied unplugged block is reported: {:#?}",
        r.broken
    );
    assert!(r.virtio_mem.as_ref().unwrap().steps.discarded_not_zero >= 1);
}

/// The guest's verifier is the check of last resort: a word of its page that the host changed
/// behind its back must fail the run, named by the vCPU and the word it found.
#[test]
fn a_corrupted_word_in_a_verifiers_page_fails_the_run() {
    // The goal is far beyond what a run needs to catch the plant (its first or second pass).
    let r = stress(Work { passes: 1_000, ops: 0, targets: 0 }, |o| StressOptions {
        discard: true,
        plant_corrupt_verifier_word: true,
        ..o
    });
    assert!(!r.ok, "the planted fault went unnoticed: {r:#?}");
    assert!(r.planted_faults_fired >= 1, "{r:#?}");
    let found = format!("found {PLANTED_WORD:#018x}");
    assert!(
        r.broken
            .iter()
            .any(|b| b.starts_with("guest vCPU 0 (verifier) failed: stress: corrupted word")
                && b.contains(&found)),
        "the guest's verifier reports the planted word: {:#?}",
        r.broken
    );
}

#[test]
fn bad_options_are_refused_before_a_vm_starts() {
    let err = run(&StressOptions::new()).unwrap_err();
    assert!(err.contains("no scenario selected"), "{err}");
    let err = run(&StressOptions { virtio_mem: true, virtio_mem_region: 3 << 20, ..StressOptions::new() })
        .unwrap_err();
    assert!(err.contains("multiple of 2 MiB"), "{err}");
    let err = run(&StressOptions { discard: true, vcpus: 0, ..StressOptions::new() }).unwrap_err();
    assert!(err.contains("--vcpus"), "{err}");
}

/// The device-path checks fire: with the table keeping torn-down entries alive (planted), the
/// discard storm's read-back after each discard sees the old data and the run is broken (every
/// torn-down page with an entry keeps it: early pages the guest has not written yet read zero
/// either way).
#[test]
fn a_stale_translation_in_the_table_breaks_the_run() {
    let r = stress(Work { passes: 1, ops: 300, targets: 0 }, |o| StressOptions {
        discard: true,
        plant_stale_translations: 1 << 20,
        ..o
    });
    assert!(!r.ok, "a planted stale translation must break the run: {:#?}", r.broken);
    let d = r.discard.as_ref().unwrap();
    assert!(d.stale_after_discard > 0 || r.device.stale > 0, "the device path saw it: {d:?} {:?}", r.device);
}
