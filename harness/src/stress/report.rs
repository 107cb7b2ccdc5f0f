//! What `zapvm stress` reports: [`StressReport`] (always printed as JSON) and the report of each
//! scenario, of the work goal and of the guest's counters; [`SEED_RNG`], the generator a seed
//! drives.

use std::collections::BTreeMap;

use serde::Serialize;

use vmm::devices::virtio::balloon::BalloonStats;
use vmm::devices::virtio::mem::VirtioMemStats;
use vmm::machine::VmOutcome;

#[cfg(doc)]
use guest_abi::StressHeader;

#[cfg(doc)]
use super::StressOptions;
use super::Work;

/// A run's work goal and what it did (see [`StressOptions::work`]).
#[derive(Clone, Debug, Serialize)]
pub struct WorkReport {
    /// What the run was asked to do.
    pub goal: Work,
    /// The least done of each kind when the run ended: passes of the slowest verifier, targets
    /// of the slower device storm, operations of the slowest host scenario (0 for a kind no
    /// scenario of the run does).
    pub least: Work,
    /// Every scenario did its share before the deadline.
    pub done: bool,
}

/// The discard storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiscardReport {
    /// Discards through the notifier that completed.
    pub ops: u64,
    /// Bytes discarded.
    pub bytes: u64,
    /// Pieces skipped because the range was not mapped (an external hole) at that moment.
    pub skipped: u64,
    /// Other errors.
    pub errors: u64,
    /// The first such error.
    pub first_error: Option<String>,
    /// Pages read through the device path right after their discard.
    pub checked_pages: u64,
    /// Of those, pages holding a generation written before the discard (must be 0).
    pub stale_after_discard: u64,
    /// The first such page.
    pub first_stale: Option<String>,
}

/// The external chaos.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosReport {
    /// `madvise(MADV_DONTNEED)` calls that succeeded.
    pub madvise: u64,
    /// `munmap` calls that succeeded.
    pub munmap: u64,
    /// `mremap` calls that succeeded (the moved pages are then unmapped at their destination).
    pub mremap: u64,
    /// With the seal only: `mprotect(PROT_READ)` and `mmap(MAP_FIXED)` blows that succeeded
    /// (must be 0).
    pub mprotect: u64,
    /// See `mprotect`.
    pub map_fixed: u64,
    /// With the seal: munmap, mremap, mprotect and mmap(MAP_FIXED) blows the kernel refused with
    /// `EPERM`, per kind (the seal at work).
    pub refused_by_seal: SealRefusals,
    /// Calls that failed otherwise (the range was a hole not yet re-backed, or spanned two
    /// mappings).
    pub failed: u64,
    /// Bytes torn down.
    pub bytes: u64,
}

/// External blows at sealed guest RAM that the kernel refused with `EPERM`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SealRefusals {
    /// `munmap`.
    pub munmap: u64,
    /// `mremap(MAYMOVE | FIXED)`.
    pub mremap: u64,
    /// `mprotect(PROT_READ)`.
    pub mprotect: u64,
    /// `mmap(MAP_FIXED)` of fresh anonymous memory over it.
    pub map_fixed: u64,
}

impl SealRefusals {
    /// All refusals.
    pub fn total(&self) -> u64 {
        self.munmap + self.mremap + self.mprotect + self.map_fixed
    }
}

/// The mprotect phases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProtectReport {
    /// Read-only phases.
    pub phases: u64,
    /// Ranges made read-only.
    pub ranges: u64,
    /// Bytes made read-only, summed over phases.
    pub bytes: u64,
    /// Protect calls that failed (a hole at that moment).
    pub failed: u64,
    /// Restores retried because part of the range was a hole for a moment.
    pub restore_retries: u64,
    /// Restores that never succeeded (must be 0).
    pub restore_failures: u64,
    /// vCPU write faults while read-only (from the teardown guard).
    pub write_faults_while_read_only: u64,
}

/// The device-path reader.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceReport {
    /// Pages read and judged.
    pub reads: u64,
    /// Reads whose page held a value no allowed generation explains (must be 0).
    pub stale: u64,
    /// The first such read.
    pub first_stale: Option<String>,
    /// Reads not judged because the guest rewrote the page more than once meanwhile.
    pub raced: u64,
    /// Reads that found the host mapping gone (an external hole): fine.
    pub unmapped: u64,
    /// Whether the reader was blocked at the end (its last read finished long ago).
    pub hung: bool,
}

/// How a device storm went (the balloon's or virtio-mem's).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormSteps {
    /// Targets set (each differs from the previous one).
    pub targets: u64,
    /// Targets the guest's driver reached, with its checks done, within the bound.
    pub reached: u64,
    /// Targets not reached within the bound (must be 0; the storm stops at the first).
    pub timed_out: u64,
    /// 1 if the deadline came while the driver was still following the last target (fine).
    pub unfinished_at_end: u64,
    /// Mean and longest milliseconds from setting a target to the driver reaching it.
    pub step_ms_mean: f64,
    /// See `step_ms_mean`.
    pub step_ms_max: u64,
    /// Units (balloon pages, virtio-mem blocks) the reached targets moved (|target - previous|)
    /// per second of those steps: the driver's pace, to compare with another driver's.
    pub moved_per_s: f64,
    /// Pages the device had discarded (ballooned / unplugged) read through the device path
    /// once a target was reached.
    pub discarded_pages_checked: u64,
    /// Of those, pages not all zero (must be 0).
    pub discarded_not_zero: u64,
    /// Pages the guest owns (owned balloon pool pages / plugged blocks) read through the device
    /// path once a target was reached.
    pub owned_pages_checked: u64,
    /// Of those, pages not holding the guest's pattern (must be 0).
    pub owned_not_pattern: u64,
    /// The first problem (timeout or bad page), precisely.
    pub first_problem: Option<String>,
}

/// The balloon storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BalloonStormReport {
    /// The vCPU driving the balloon.
    pub vcpu: u32,
    /// The largest target: the pages of the driver's pool.
    pub pool_pages: u64,
    /// Targets and checks.
    #[serde(flatten)]
    pub steps: StormSteps,
    /// The device's counters at the end (inflated/deflated pages, discards, ...).
    pub device: Option<BalloonStats>,
}

/// The virtio-mem storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VirtioMemStormReport {
    /// The vCPU driving the device.
    pub vcpu: u32,
    /// Blocks of the region (the largest target).
    pub region_blocks: u64,
    /// Requested sizes and checks.
    #[serde(flatten)]
    pub steps: StormSteps,
    /// The device's counters at the end (plug/unplug requests, blocks, discards, ...).
    pub device: Option<VirtioMemStats>,
}

/// Bytes discarded through the notifier on the VMM's behalf, and who asked for them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiscardAccounting {
    /// The notifier's completed VMM-origin discards, in bytes (after THP widening).
    pub notifier_bytes: u64,
    /// The discard storm's bytes.
    pub discard_storm_bytes: u64,
    /// The balloon's (inflated pages and free page reports).
    pub balloon_bytes: u64,
    /// virtio-mem's (unplugged blocks).
    pub virtio_mem_bytes: u64,
}

/// The guest's view, summed over vCPUs (from each vCPU's [`StressHeader`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestReport {
    /// Passes over the slice, per vCPU.
    pub passes: Vec<u64>,
    /// Pages verified.
    pub verified: u64,
    /// Pages found all zero after having been written: discards the guest saw.
    pub zero_pages: u64,
    /// Pages a discard tore while the guest rewrote them (allowed).
    pub torn_pages: u64,
}

/// The generator behind every seeded choice of `zapvm stress` (and `zapvm bench pressure`), as
/// the report names it: the same seed gives the same run only with the same rand minor version
/// (rand changes its value streams between minor versions). A test keeps it equal to the rand
/// of Cargo.lock.
pub const SEED_RNG: &str = "rand 0.10 ChaCha8Rng";

/// What `zapvm stress` found; always printed as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StressReport {
    /// No invariant broken.
    pub ok: bool,
    /// The invariants that broke, one line each.
    pub broken: Vec<String>,
    /// Scenarios requested but not run, and why.
    pub notes: Vec<String>,
    /// Scenarios that ran.
    pub scenarios: Vec<String>,
    /// What each vCPU ran: `verifier`, `balloon-driver` or `virtio-mem-driver`.
    pub roles: Vec<String>,
    /// Seed.
    pub seed: u64,
    /// The generator the seed drives ([`SEED_RNG`]): a seed reproduces a run with the same one.
    pub rng: &'static str,
    /// Seconds the scenarios ran.
    pub duration_s: f64,
    /// The work goal and what was done of it (runs with [`StressOptions::work`] only).
    pub work: Option<WorkReport>,
    /// vCPUs in all (verifiers and drivers).
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Backing and THP.
    pub backend: String,
    /// THP.
    pub thp: bool,
    /// The run ended with Quit (not a failure, timeout or hang).
    pub vmm_alive: bool,
    /// How the VM ended (`None`: it did not stop in time).
    pub outcome: Option<VmOutcome>,
    /// Invalidations (teardown starts of every kind and origin).
    pub invalidations: u64,
    /// Invalidations per second.
    pub invalidations_per_s: f64,
    /// The guest's counters.
    pub guest: GuestReport,
    /// Discard storm.
    pub discard: Option<DiscardReport>,
    /// External chaos.
    pub external_chaos: Option<ChaosReport>,
    /// mprotect phases.
    pub mprotect: Option<ProtectReport>,
    /// Balloon storm.
    pub balloon: Option<BalloonStormReport>,
    /// virtio-mem storm.
    pub virtio_mem: Option<VirtioMemStormReport>,
    /// VMM discards accounted to their requesters.
    pub discard_accounting: DiscardAccounting,
    /// Device-path reader.
    pub device: DeviceReport,
    /// Notifier starts/ends per kind and origin.
    pub notifier: Vec<notifier::KindStats>,
    /// Per subscriber.
    pub subscribers: Vec<notifier::SubscriberStats>,
    /// The VMM's table.
    pub table: Option<vmm::mmu::MmuStats>,
    /// KVM statistics: end minus start (numeric leaves that changed).
    pub kvm_delta: BTreeMap<String, f64>,
    /// External teardowns and write protections, from the teardown guard.
    pub external_teardowns: Option<vmm::teardown::TeardownReport>,
    /// Planted faults that fired (fault-injection runs only).
    pub planted_faults_fired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`SEED_RNG`] names the rand that Cargo.lock holds (one version of it): a report's
    /// generator is the one that made the run.
    #[test]
    fn seed_rng_names_the_locked_rand() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let versions: Vec<&str> = lock
            .split("[[package]]")
            .filter(|p| p.contains("\nname = \"rand\"\n"))
            .filter_map(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .map(|v| v.trim_end_matches('"'))
            .collect();
        assert_eq!(versions.len(), 1, "one rand in Cargo.lock: {versions:?}");
        let minor: Vec<&str> = versions[0].split('.').take(2).collect();
        assert_eq!(SEED_RNG, format!("rand {} ChaCha8Rng", minor.join(".")), "{versions:?}");
    }
}
