//! The judge: the run checked against its invariants, and the report built ([`judge`]); the
//! checks of the notifier, the devices, discard accounting, starvation, the storms and the seal,
//! some of which `zapvm stress --linux` shares.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use guest_abi::{stress_role, StressRole, PAGE_SIZE};

use vmm::devices::virtio::balloon::BalloonStats;
use vmm::devices::virtio::mem::VirtioMemStats;
use vmm::machine::{RunReport, VmOutcome};
use vmm::vstate::vcpu::VcpuOutcome;

use super::controller::{Controlled, JOIN_GRACE, READER_STALL};
use super::monitor::invalidations;
use super::scenarios::SealedBlow;
use super::{
    BalloonPool, BalloonStormReport, ChaosReport, DeviceReport, DiscardAccounting, DiscardReport,
    GuestReport, ProtectReport, SealRefusals, StormSteps, StressOptions, StressReport, VirtioMemStormReport,
    WorkReport, SEED_RNG,
};

/// Checks the invariants and builds the report.
pub(super) fn judge(
    opts: &StressOptions,
    notes: Vec<String>,
    controlled: Option<Controlled>,
    report: Option<RunReport>,
) -> StressReport {
    let mut broken = Vec::new();
    let outcome = report.as_ref().map(|r| r.outcome.clone());
    let vmm_alive = matches!(outcome, Some(VmOutcome::Quit));
    let flags = if opts.balloon { guest_abi::FLAG_STRESS_BALLOON } else { 0 }
        | if opts.virtio_mem { guest_abi::FLAG_STRESS_VIRTIO_MEM } else { 0 };
    let vcpus = opts.vcpus + u32::from(opts.balloon) + u32::from(opts.virtio_mem);
    let role = |v: u64| match stress_role(flags, u64::from(vcpus), v) {
        StressRole::Verifier => "verifier",
        StressRole::BalloonDriver => "balloon-driver",
        StressRole::VirtioMemDriver => "virtio-mem-driver",
    };
    let roles: Vec<String> = (0..u64::from(vcpus)).map(|v| role(v).to_string()).collect();
    // What the guest found wrong (its verifier or a driver's page-by-page checks) ends the VM
    // with a Failure ucall: each is a broken invariant of its own, named by the vCPU's role.
    let guest_failures: Vec<String> = report
        .iter()
        .flat_map(|r| &r.vcpus)
        .filter_map(|v| match &v.outcome {
            VcpuOutcome::GuestFailure { message } | VcpuOutcome::GuestException { message } => {
                Some(format!("guest vCPU {} ({}) failed: {message}", v.index, role(v.index as u64)))
            }
            _ => None,
        })
        .collect();
    match &outcome {
        None => broken.push("VMM not alive: it did not stop within the watchdog's grace (hung)".to_string()),
        Some(VmOutcome::Quit) => {}
        // The VMM stopped the VM because the guest reported a failure (listed below).
        Some(VmOutcome::Failed { .. }) if !guest_failures.is_empty() => {}
        Some(VmOutcome::Failed { message }) => {
            broken.push(format!("VMM not alive: the VM failed: {message}"))
        }
        Some(other) => broken.push(format!("VMM not alive: the VM ended with {other:?}")),
    }
    broken.extend(guest_failures);
    let Some(c) = controlled else {
        broken.push("the stress controller never reported (hung)".to_string());
        return StressReport {
            ok: false,
            broken,
            notes,
            scenarios: vec![],
            roles,
            seed: opts.seed,
            rng: SEED_RNG,
            duration_s: 0.0,
            work: None,
            vcpus,
            mem_bytes: opts.mem,
            backend: format!("{:?}", opts.backend).to_lowercase(),
            thp: opts.thp,
            vmm_alive,
            outcome,
            invalidations: 0,
            invalidations_per_s: 0.0,
            guest: GuestReport::default(),
            discard: None,
            external_chaos: None,
            mprotect: None,
            balloon: None,
            virtio_mem: None,
            discard_accounting: DiscardAccounting::default(),
            device: DeviceReport::default(),
            notifier: vec![],
            subscribers: vec![],
            table: report.as_ref().map(|r| r.memory_layer.table.clone()),
            kvm_delta: BTreeMap::new(),
            external_teardowns: report.as_ref().map(|r| r.memory_layer.external_teardowns.clone()),
            planted_faults_fired: 0,
        };
    };
    let ctx = &c.ctx;
    let k = &ctx.c;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for name in &c.hung_threads {
        broken.push(format!("the {name} thread did not finish within {JOIN_GRACE:?} of the end (hung)"));
    }
    notifier_invariants(&c.kinds, &c.subscribers, &mut broken);
    let guest = GuestReport {
        passes: c.headers.iter().map(|h| h.passes).collect(),
        verified: c.headers.iter().map(|h| h.verified).sum(),
        zero_pages: c.headers.iter().map(|h| h.zero_pages).sum(),
        torn_pages: c.headers.iter().map(|h| h.torn_pages).sum(),
    };
    // (When a guest failure ended the VM early, that failure is what counts.)
    if let Some(v) = guest.passes.iter().position(|&p| p == 0).filter(|_| !c.vm_ended_early) {
        broken.push(format!("guest vCPU {v} completed no pass"));
    } else if let Some(starved) =
        starved_verifier(&guest.passes).filter(|_| !c.vm_ended_early && opts.work.is_none())
    {
        // Only a run of fixed duration compares its verifiers: a run of fixed work lasts until
        // its slowest verifier made the goal's passes while the others keep going, so there
        // the ratio measures only how long the slowest took (the host's scheduler, with more
        // vCPUs than cores), and the work deadline below already judges that.
        broken.push(starved);
    }
    let work =
        opts.work.map(|goal| WorkReport { goal, least: c.least.as_work(), done: c.least.covers(&goal) });
    // (Again, when a guest failure ended the VM early, that failure is what counts.)
    if let Some(w) = work.as_ref().filter(|w| !w.done && !c.vm_ended_early) {
        broken.push(format!(
            "work not done within the deadline of {:.0} s (a hang, or a scenario starved): did at least {:?} \
             of {:?}",
            opts.duration.as_secs_f64(),
            w.least,
            w.goal
        ));
    }
    let last_read = Duration::from_millis(l(&k.dev_last_ms));
    let device = DeviceReport {
        reads: l(&k.dev_reads),
        stale: l(&k.dev_stale),
        first_stale: ctx.first_stale_device.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        raced: l(&k.dev_raced),
        unmapped: l(&k.dev_unmapped),
        // With a work goal the reader's reads are part of it: a reader that stalls keeps the
        // goal from being met.
        hung: c.hung_threads.iter().any(|n| n == "device-reader")
            || (opts.work.is_none() && c.ran_for.saturating_sub(last_read) > READER_STALL),
    };
    if device.stale > 0 {
        broken.push(format!(
            "device path: {} stale reads; first: {}",
            device.stale,
            device.first_stale.clone().unwrap_or_default()
        ));
    }
    if device.hung {
        broken.push(format!(
            "device path hung: its last read completed {:.1} s before the end",
            c.ran_for.saturating_sub(last_read).as_secs_f64()
        ));
    }
    let discard = opts.discard.then(|| DiscardReport {
        ops: l(&k.discard_ops),
        bytes: l(&k.discard_bytes),
        skipped: l(&k.discard_skipped),
        errors: l(&k.discard_errors),
        first_error: ctx.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        checked_pages: l(&k.discard_checked),
        stale_after_discard: l(&k.discard_stale),
        first_stale: ctx.first_stale_discard.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    });
    if let Some(d) = &discard {
        if d.stale_after_discard > 0 {
            broken.push(format!(
                "discarded pages not read as zero: {}; first: {}",
                d.stale_after_discard,
                d.first_stale.clone().unwrap_or_default()
            ));
        }
        if d.errors > 0 {
            broken.push(format!(
                "{} discards failed; first: {}",
                d.errors,
                d.first_error.clone().unwrap_or_default()
            ));
        }
    }
    let teardowns = report.as_ref().map(|r| r.memory_layer.external_teardowns.clone());
    let mprotect = opts.mprotect.then(|| ProtectReport {
        phases: l(&k.prot_phases),
        ranges: l(&k.prot_ranges),
        bytes: l(&k.prot_bytes),
        failed: l(&k.prot_failed),
        restore_retries: l(&k.prot_restore_retries),
        restore_failures: l(&k.prot_restore_failures),
        write_faults_while_read_only: teardowns.as_ref().map(|t| t.protect_faults).unwrap_or(0),
    });
    if let Some(p) = &mprotect {
        if p.restore_failures > 0 {
            broken.push(format!("{} ranges could not be made writable again", p.restore_failures));
        }
    }
    if let Some(t) = &teardowns {
        if let Some(f) = &t.fatal {
            broken.push(format!("external teardown guard: {f}"));
        }
    }
    let final_balloon = report.as_ref().and_then(|r| r.memory_layer.balloon.clone());
    let final_mem = report.as_ref().and_then(|r| r.memory_layer.virtio_mem.clone());
    let balloon = opts.balloon.then(|| BalloonStormReport {
        vcpu: roles.iter().position(|r| r == "balloon-driver").unwrap_or(0) as u32,
        pool_pages: ctx.balloon.as_ref().map(BalloonPool::max_target).unwrap_or(0),
        steps: k.balloon_storm.report(),
        device: final_balloon.clone(),
    });
    if let Some(b) = &balloon {
        storm_invariants("balloon", &b.steps, &mut broken);
        if let Some(d) = &b.device {
            balloon_device_invariants(d, &mut broken);
        }
    }
    let virtio_mem = opts.virtio_mem.then(|| VirtioMemStormReport {
        vcpu: roles.iter().position(|r| r == "virtio-mem-driver").unwrap_or(0) as u32,
        region_blocks: final_mem.as_ref().map(|m| m.region_size / m.block_size.max(1)).unwrap_or(0),
        steps: k.mem_storm.report(),
        device: final_mem.clone(),
    });
    if let Some(m) = &virtio_mem {
        storm_invariants("virtio-mem", &m.steps, &mut broken);
        if let Some(d) = &m.device {
            virtio_mem_device_invariants(d, &mut broken);
        }
    }
    // Every byte a requester says it discarded went through the notifier as a VMM discard
    // (the notifier may count more: it widens ranges to whole huge pages on THP). The devices
    // keep working until the VM stops, so both sides are taken from the VM's final report.
    let final_kinds = report.as_ref().map(|r| r.memory_layer.notifier.kinds.as_slice()).unwrap_or(&[]);
    let discard_accounting = DiscardAccounting {
        notifier_bytes: final_kinds
            .iter()
            .filter(|k| k.kind == "discard" && k.origin == "vmm")
            .map(|k| k.bytes)
            .sum(),
        discard_storm_bytes: l(&k.discard_bytes),
        balloon_bytes: final_balloon.as_ref().map(|d| d.bytes_discarded).unwrap_or(0),
        virtio_mem_bytes: final_mem.as_ref().map(|d| d.bytes_discarded).unwrap_or(0),
    };
    // Only for a run that ended as planned: after an early end the storms kept discarding
    // through the notifier for a moment, after the VM's final report was taken.
    if vmm_alive {
        // A lower bound only: THP widens discards to whole huge pages in the notifier, and the
        // discard storm counts the ranges it asked for.
        broken.extend(unaccounted_discards(&discard_accounting, false));
    }
    let external_chaos = opts.external_chaos.then(|| ChaosReport {
        madvise: l(&k.chaos_madvise),
        munmap: l(&k.chaos_munmap),
        mremap: l(&k.chaos_mremap),
        mprotect: l(&k.chaos_mprotect),
        map_fixed: l(&k.chaos_map_fixed),
        refused_by_seal: SealRefusals {
            munmap: l(&k.chaos_eperm[SealedBlow::Munmap as usize]),
            mremap: l(&k.chaos_eperm[SealedBlow::Mremap as usize]),
            mprotect: l(&k.chaos_eperm[SealedBlow::Mprotect as usize]),
            map_fixed: l(&k.chaos_eperm[SealedBlow::MapFixed as usize]),
        },
        failed: l(&k.chaos_failed),
        bytes: l(&k.chaos_bytes),
    });
    if opts.seal_guest_ram {
        seal_invariants(external_chaos.as_ref(), teardowns.as_ref(), &mut broken);
    }
    let invalidations = invalidations(&c.kinds);
    let ok = broken.is_empty();
    StressReport {
        ok,
        broken,
        notes,
        scenarios: c.scenarios,
        roles,
        seed: opts.seed,
        rng: SEED_RNG,
        duration_s: c.ran_for.as_secs_f64(),
        work,
        vcpus,
        mem_bytes: opts.mem,
        backend: format!("{:?}", opts.backend).to_lowercase(),
        thp: opts.thp,
        vmm_alive,
        outcome,
        invalidations,
        invalidations_per_s: invalidations as f64 / c.ran_for.as_secs_f64().max(1e-3),
        guest,
        discard,
        external_chaos,
        mprotect,
        balloon,
        virtio_mem,
        discard_accounting,
        device,
        notifier: c.kinds,
        subscribers: c.subscribers,
        table: report.as_ref().map(|r| r.memory_layer.table.clone()),
        kvm_delta: c.kvm_delta,
        external_teardowns: teardowns,
        planted_faults_fired: c.planted_fired,
    }
}

/// Every invalidation start matched by its end, for every kind and origin of `kinds`, and per
/// subscriber; each mismatch is pushed onto `broken`.
pub(crate) fn notifier_invariants(
    kinds: &[notifier::KindStats],
    subscribers: &[notifier::SubscriberStats],
    broken: &mut Vec<String>,
) {
    for kind in kinds {
        if kind.starts != kind.ends {
            broken.push(format!(
                "notifier: {} {} invalidations: {} starts but {} ends",
                kind.origin, kind.kind, kind.starts, kind.ends
            ));
        }
    }
    for s in subscribers {
        if s.starts + s.joined != s.ends {
            broken.push(format!(
                "subscriber {}: {} starts (+{} joined) but {} ends",
                s.name, s.starts, s.joined, s.ends
            ));
        }
    }
}

/// The balloon's own invariants with a well-behaved driver: no failed discard, no guest error,
/// and every byte it discarded an inflated page or a free page report.
pub(crate) fn balloon_device_invariants(d: &BalloonStats, broken: &mut Vec<String>) {
    if d.discard_failures > 0 {
        broken.push(format!("balloon: {} discards failed", d.discard_failures));
    }
    if d.errors.total() > 0 {
        broken.push(format!(
            "balloon: {} guest errors from a well-behaved driver: {:?}",
            d.errors.total(),
            d.errors
        ));
    }
    let accounted = d.inflated_pages * PAGE_SIZE + d.reported_bytes;
    if d.bytes_discarded != accounted {
        broken.push(format!(
            "balloon: {} bytes discarded, but inflated pages and free page reports account for {accounted}",
            d.bytes_discarded
        ));
    }
}

/// virtio-mem's own invariants with a well-behaved driver: no failed discard, no guest error or
/// ERROR answer, and every unplugged block discarded, once, and nothing else.
pub(crate) fn virtio_mem_device_invariants(d: &VirtioMemStats, broken: &mut Vec<String>) {
    if d.discard_failures > 0 {
        broken.push(format!("virtio-mem: {} discards failed", d.discard_failures));
    }
    if d.errors.total() > 0 || d.error_responses > 0 {
        broken.push(format!(
            "virtio-mem: {} guest errors and {} ERROR answers to a well-behaved driver: {:?}",
            d.errors.total(),
            d.error_responses,
            d.errors
        ));
    }
    if d.blocks_discarded != d.blocks_unplugged || d.bytes_discarded != d.blocks_discarded * d.block_size {
        broken.push(format!(
            "virtio-mem: {} blocks unplugged but {} discarded ({} bytes)",
            d.blocks_unplugged, d.blocks_discarded, d.bytes_discarded
        ));
    }
}

/// Every byte a requester says it discarded went through the notifier as a VMM discard, and
/// with `exact` (memory of 4 KiB pages, where the notifier widens nothing) the notifier saw no
/// VMM discard nobody accounts for either. `None` when that holds, else the gap.
pub(crate) fn unaccounted_discards(a: &DiscardAccounting, exact: bool) -> Option<String> {
    let requested = a.discard_storm_bytes + a.balloon_bytes + a.virtio_mem_bytes;
    if a.notifier_bytes < requested {
        Some(format!(
            "discards unaccounted: the discard storm, the balloon and virtio-mem discarded {requested} bytes, \
             the notifier saw {} bytes of VMM discards",
            a.notifier_bytes
        ))
    } else if exact && a.notifier_bytes > requested {
        Some(format!(
            "discards unaccounted: the notifier saw {} bytes of VMM discards, but the discard storm, the balloon \
             and virtio-mem account for {requested} ({} bytes discarded on nobody's account)",
            a.notifier_bytes,
            a.notifier_bytes - requested
        ))
    } else {
        None
    }
}

/// A verifier with fewer than 1 in [`STARVATION_RATIO`] of the passes of its busiest sibling is
/// starved (the run's other vCPUs ran, so its memory layer kept it from running), once the
/// busiest has made [`STARVATION_MIN_PASSES`] (below that, the spread of a short run says
/// nothing). Compared within the run, never against a clock.
const STARVATION_RATIO: u64 = 10;
const STARVATION_MIN_PASSES: u64 = 20;

/// The starved verifier among `passes` (each verifier's passes), if any, as a broken invariant.
fn starved_verifier(passes: &[u64]) -> Option<String> {
    let (busiest, &most) = passes.iter().enumerate().max_by_key(|(_, &p)| p)?;
    let (starved, &least) = passes.iter().enumerate().min_by_key(|(_, &p)| p)?;
    (most >= STARVATION_MIN_PASSES && least * STARVATION_RATIO < most).then(|| {
        format!(
            "guest vCPU {starved} starved: {least} passes against {most} of vCPU {busiest} in the same run \
             (less than 1 in {STARVATION_RATIO})"
        )
    })
}

/// The invariants every device storm keeps: each target reached (or the run ended while the
/// driver followed the last one), at least one reached, no discarded page read non-zero, no
/// owned page without the guest's pattern.
fn storm_invariants(name: &str, s: &StormSteps, broken: &mut Vec<String>) {
    let first = s.first_problem.clone().unwrap_or_default();
    if s.timed_out > 0 {
        broken.push(format!("{name}: a target was not reached: {first}"));
    } else if s.reached == 0 {
        broken.push(format!(
            "{name}: no target reached in the whole run ({} set, {} unfinished at the end)",
            s.targets, s.unfinished_at_end
        ));
    }
    if s.discarded_not_zero > 0 {
        broken.push(format!(
            "{name}: {} discarded pages not read as zero; first: {first}",
            s.discarded_not_zero
        ));
    }
    if s.owned_not_pattern > 0 {
        broken.push(format!(
            "{name}: {} guest-owned pages lost their pattern; first: {first}",
            s.owned_not_pattern
        ));
    }
}

/// What sealed guest RAM must show: no external munmap, mremap, mprotect or MAP_FIXED blow
/// succeeded, and the teardown guard saw no external unmap or move of guest RAM (there can be
/// none).
fn seal_invariants(
    chaos: Option<&ChaosReport>,
    teardowns: Option<&vmm::teardown::TeardownReport>,
    broken: &mut Vec<String>,
) {
    if let Some(c) = chaos {
        let succeeded = c.munmap + c.mremap + c.mprotect + c.map_fixed;
        if succeeded > 0 {
            broken.push(format!(
                "the seal did not hold: {succeeded} external blows at sealed guest RAM succeeded \
                 (munmap {}, mremap {}, mprotect {}, mmap(MAP_FIXED) {})",
                c.munmap, c.mremap, c.mprotect, c.map_fixed
            ));
        }
    }
    if let Some(t) = teardowns {
        if t.events > 0 {
            broken.push(format!(
                "the seal did not hold: the teardown guard saw {} external unmaps or moves of sealed guest RAM",
                t.events
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The starvation check compares the verifiers of one run: the starved verifier of a real
    /// CI run (1 pass against its sibling's 211) is caught, a fair run (96 and 100) and a run too
    /// short to say anything (1 and 9) are not.
    #[test]
    fn a_starved_verifier_is_told_from_its_siblings() {
        let starved = starved_verifier(&[211, 1]).expect("1 pass against 211 is starvation");
        assert!(starved.starts_with("guest vCPU 1 starved: 1 passes against 211 of vCPU 0"), "{starved}");
        assert_eq!(starved_verifier(&[96, 100]), None);
        assert_eq!(starved_verifier(&[1, 9]), None);
        assert_eq!(starved_verifier(&[50, 4, 48]).map(|s| s.contains("vCPU 1 starved")), Some(true));
        assert_eq!(starved_verifier(&[]), None);
    }
}
