//! `zapvm stress` in CI: a short run of every scenario (about a minute in all), each asserting
//! that no invariant broke and that the scenario really happened, a run with a planted fault
//! (one `invalidate_range_end` skipped) that must be reported as broken — and must not hang —
//! and runs of the device storms with a planted fault (a word written into memory the balloon or
//! virtio-mem had discarded) that must be reported as broken by the host's checks.
//!
//! The runs share the machine's two cores, so they take turns (one VM at a time).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm::stress::{run, StormSteps, StressOptions, StressReport};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn stress(configure: impl FnOnce(StressOptions) -> StressOptions) -> StressReport {
    timed_stress(configure).0
}

/// [`stress`], and how long the run took (without the wait for its turn).
fn timed_stress(configure: impl FnOnce(StressOptions) -> StressOptions) -> (StressReport, Duration) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let opts =
        configure(StressOptions { seed: 0x57e55, duration: Duration::from_secs(8), ..StressOptions::new() });
    let started = Instant::now();
    let report = run(&opts).expect("the stress VM starts");
    let took = started.elapsed();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    (report, took)
}

fn assert_ok(r: &StressReport) {
    assert_ok_with_passes(r, 2);
}

/// [`assert_ok`] with every verifier completing at least `min_passes` passes.
fn assert_ok_with_passes(r: &StressReport, min_passes: u64) {
    assert!(r.ok, "broken invariants: {:#?}", r.broken);
    assert!(r.vmm_alive);
    assert!(r.guest.passes.iter().all(|&p| p >= min_passes), "every vCPU made passes: {:?}", r.guest.passes);
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

/// The storm's targets were followed and its pages checked.
fn assert_storm(s: &StormSteps) {
    assert!(s.reached >= 2 && s.timed_out == 0, "{s:?}");
    assert_eq!(s.reached + s.unfinished_at_end, s.targets, "{s:?}");
    assert!(s.discarded_pages_checked > 0 && s.discarded_not_zero == 0, "{s:?}");
    assert!(s.owned_pages_checked > 0 && s.owned_not_pattern == 0, "{s:?}");
}

#[test]
fn balloon_storm_keeps_every_invariant() {
    let r = stress(|o| StressOptions { balloon: true, duration: Duration::from_secs(5), ..o });
    assert_ok(&r);
    assert_eq!(r.roles, ["verifier", "verifier", "balloon-driver"]);
    let b = r.balloon.as_ref().unwrap();
    assert_storm(&b.steps);
    let d = b.device.as_ref().unwrap();
    assert!(d.inflated_pages > 0 && d.deflated_pages > 0, "{d:?}");
    assert_eq!(d.errors.total() + d.discard_failures, 0, "{d:?}");
    assert_eq!(r.discard_accounting.balloon_bytes, d.bytes_discarded);
    // Anonymous RAM without THP: the notifier saw exactly the balloon's discards.
    assert_eq!(r.discard_accounting.notifier_bytes, d.bytes_discarded, "{:?}", r.discard_accounting);
}

#[test]
fn virtio_mem_storm_keeps_every_invariant() {
    let r = stress(|o| StressOptions { virtio_mem: true, duration: Duration::from_secs(5), ..o });
    assert_ok(&r);
    assert_eq!(r.roles, ["verifier", "verifier", "virtio-mem-driver"]);
    let m = r.virtio_mem.as_ref().unwrap();
    assert_storm(&m.steps);
    let d = m.device.as_ref().unwrap();
    assert!(d.plug_requests > 0 && d.unplug_requests > 0, "{d:?}");
    assert_eq!(d.blocks_discarded, d.blocks_unplugged, "{d:?}");
    assert_eq!(r.discard_accounting.notifier_bytes, d.bytes_discarded, "{:?}", r.discard_accounting);
}

#[test]
fn all_scenarios_together_keep_every_invariant() {
    let r = stress(|o| StressOptions { duration: Duration::from_secs(15), ..o.all() });
    // Under every scenario at once a verifier may complete only a pass or two (mprotect phases
    // stop its writes most of the time, and it shares two cores with three vCPUs and the
    // scenario threads); none at all is a broken invariant of the run.
    assert_ok_with_passes(&r, 1);
    assert_eq!(r.scenarios, ["discard", "external-chaos", "mprotect", "balloon", "virtio-mem"]);
    assert_eq!(r.roles, ["verifier", "verifier", "virtio-mem-driver", "balloon-driver"]);
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert!(r.discard.as_ref().unwrap().ops > 0);
    assert!(r.external_chaos.as_ref().unwrap().munmap > 0);
    assert!(r.mprotect.as_ref().unwrap().phases > 0);
    for steps in [&r.balloon.as_ref().unwrap().steps, &r.virtio_mem.as_ref().unwrap().steps] {
        assert!(steps.reached > 0 && steps.timed_out == 0, "{steps:?}");
        assert_eq!((steps.discarded_not_zero, steps.owned_not_pattern), (0, 0), "{steps:?}");
    }
}

#[test]
fn a_skipped_invalidate_range_end_is_caught_and_does_not_hang_the_run() {
    let (r, took) = timed_stress(|o| StressOptions {
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
    assert!(took < Duration::from_secs(60), "the run ended in bounded time: {took:?}");
}

/// A run of one device storm in which, after half a second, the storm writes a word into memory
/// its device discarded (as a memory layer that failed to discard would leave it). The host's
/// check of the next completed step reads it; the guest's driver finds it too when it gets the
/// page back, and that failure ends the VM early.
fn planted_dirty(configure: impl FnOnce(StressOptions) -> StressOptions) -> StressReport {
    let r = stress(|o| {
        configure(StressOptions {
            duration: Duration::from_secs(10),
            plant_dirty_discarded_after: Some(Duration::from_millis(500)),
            ..o
        })
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
