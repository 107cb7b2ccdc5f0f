//! `zapvm stress` in CI: a short run of every scenario (about a minute in all), each asserting
//! that no invariant broke and that the scenario really happened, and a run with a planted fault
//! (one `invalidate_range_end` skipped) that must be reported as broken — and must not hang.
//!
//! The runs share the machine's two cores, so they take turns (one VM at a time).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::stress::{run, StressOptions, StressReport};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn stress(configure: impl FnOnce(StressOptions) -> StressOptions) -> StressReport {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let opts =
        configure(StressOptions { seed: 0x57e55, duration: Duration::from_secs(8), ..StressOptions::new() });
    let report = run(&opts).expect("the stress VM starts");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    report
}

fn assert_ok(r: &StressReport) {
    assert!(r.ok, "broken invariants: {:#?}", r.broken);
    assert!(r.vmm_alive);
    assert!(r.guest.passes.iter().all(|&p| p > 1), "every vCPU made passes: {:?}", r.guest.passes);
    assert!(r.device.reads > 0 && r.device.stale == 0, "{:?}", r.device);
    for k in &r.notifier {
        assert_eq!(k.starts, k.ends, "{k:?}");
    }
}

#[test]
fn discard_storm_keeps_every_invariant() {
    let r = stress(|o| StressOptions { discard: true, ..o });
    assert_ok(&r);
    let d = r.discard.as_ref().unwrap();
    assert!(d.ops > 100, "{d:?}");
    assert!(d.checked_pages > 0 && d.stale_after_discard == 0, "{d:?}");
    assert!(r.guest.zero_pages > 0, "the guest saw discarded pages as zeros: {:?}", r.guest);
    let vmm_discards = r.notifier.iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert!(vmm_discards.starts >= d.ops, "{vmm_discards:?}");
}

#[test]
fn external_chaos_keeps_every_invariant() {
    let r = stress(|o| StressOptions { external_chaos: true, ..o });
    assert_ok(&r);
    let c = r.external_chaos.as_ref().unwrap();
    assert!(c.madvise > 0 && c.munmap > 0 && c.mremap > 0, "{c:?}");
    let t = r.external_teardowns.as_ref().unwrap();
    assert!(t.events > 0 && t.rebacked_bytes > 0 && t.fatal.is_none(), "{t:?}");
    assert!(r.notifier.iter().any(|k| k.origin == "external" && k.kind == "unmap" && k.ends > 0));
    assert!(r.guest.zero_pages > 0, "{:?}", r.guest);
}

#[test]
fn mprotect_phases_fault_guest_writes_and_keep_every_invariant() {
    let r = stress(|o| StressOptions { mprotect: true, ..o });
    assert_ok(&r);
    let p = r.mprotect.as_ref().unwrap();
    assert!(p.phases > 5 && p.ranges > 0, "{p:?}");
    assert!(p.write_faults_while_read_only > 0, "guest writes faulted while read-only: {p:?}");
    assert_eq!(p.restore_failures, 0);
    let t = r.external_teardowns.as_ref().unwrap();
    assert_eq!(t.protections, p.ranges, "the guard saw every protection: {t:?}");
}

#[test]
fn all_scenarios_together_keep_every_invariant() {
    let r = stress(|o| StressOptions { duration: Duration::from_secs(10), ..o.all() });
    assert_ok(&r);
    assert_eq!(r.scenarios, ["discard", "external-chaos", "mprotect"]);
    assert!(r.notes.iter().any(|n| n.contains("virtio-mem: not available")), "{:?}", r.notes);
    assert!(r.discard.as_ref().unwrap().ops > 0);
    assert!(r.external_chaos.as_ref().unwrap().munmap > 0);
    assert!(r.mprotect.as_ref().unwrap().phases > 0);
}

#[test]
fn a_skipped_invalidate_range_end_is_caught_and_does_not_hang_the_run() {
    let started = Instant::now();
    let r = stress(|o| StressOptions {
        discard: true,
        duration: Duration::from_secs(6),
        plant_skip_end_after: Some(Duration::from_secs(2)),
        ..o
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
    assert!(started.elapsed() < Duration::from_secs(60), "the run ended in bounded time");
}

#[test]
fn scenarios_this_build_lacks_are_refused_alone() {
    let err = run(&StressOptions { virtio_mem: true, ..StressOptions::new() }).unwrap_err();
    assert!(err.contains("virtio-mem: not available in this build"), "{err}");
}
