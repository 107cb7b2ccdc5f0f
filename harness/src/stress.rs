//! `zapvm stress`: the memory layer under sustained, seeded, concurrent teardowns.
//!
//! The test guest runs [`Workload::Stress`] on every vCPU: each data page of its slice holds a
//! known generation of a pattern (or zeros, which is what discards and re-backs leave), and the
//! guest verifies and rewrites every page forever. Meanwhile the host runs the scenarios the
//! options select, each on its own thread with its own RNG derived from the seed, until the run's
//! work is done ([`StressOptions::work`]: passes of every verifier, targets of every device storm,
//! operations of every host scenario, with a deadline that only catches hangs) or, without a work
//! goal, for the run's duration:
//!
//! - **discard**: random page-aligned ranges (4 KiB .. 2 MiB, some cutting THPs) of data pages
//!   discarded through the notifier; right after each discard the device path reads sampled
//!   pages of the range and checks that no word holds a generation the guest had written before
//!   the discard (every discarded page reads as zero until the guest rewrites it);
//! - **external chaos**: raw `madvise(DONTNEED)`, `munmap` and `mremap(MAYMOVE|FIXED)` to a scratch
//!   area on random data ranges, bypassing the VMM's API (the userfaultfd monitor reports them;
//!   the teardown guard re-backs unmapped/moved guest RAM with zeros);
//! - **mprotect**: phases where random data ranges are made read-only through the notifier and
//!   then writable again; guest writes there make `KVM_RUN` fail with `EFAULT`, the vCPU waits for
//!   the restore, and those faults are counted;
//! - with **`--seal-guest-ram`** guest RAM is sealed with `mseal(2)`. The external chaos then
//!   also tries `mprotect` and `mmap(MAP_FIXED)` blows, and the kernel must refuse every munmap,
//!   mremap, mprotect and MAP_FIXED blow with `EPERM` (counted; one that succeeds breaks the run)
//!   while its madvise blows still discard; the mprotect phases are not run (the VMM cannot
//!   re-protect sealed memory: the notifier refuses its protect operations), and a note says so;
//! - a **device-path reader** (always): random data pages read through the VMM's table, each word
//!   checked against the generations the metadata allows;
//! - **balloon storm**: a vCPU of its own runs the test guest's balloon driver over its slice (the
//!   balloon's pool; [`guest_abi::FLAG_STRESS_BALLOON`]) while the host moves the target up and
//!   down at random, waiting (bounded) for the guest's `actual` to reach each target — the guest
//!   writes it only after it checked every page it owns (pattern) and every page it got back
//!   (zeros) — and then reads sampled ballooned pages (must be zero) and owned pages (must hold
//!   the pattern) through the device path;
//! - **virtio-mem storm**: likewise a vCPU drives the virtio-mem device
//!   ([`guest_abi::FLAG_STRESS_VIRTIO_MEM`]) while the host moves `requested_size` up and down;
//!   once the guest's step is complete, sampled plugged pages must hold the pattern and sampled
//!   unplugged pages (first those just unplugged) must read zero.
//!
//! The driver vCPUs come on top of the `vcpus` verifiers, so every scenario runs together with
//! `--all`. The host attacks (discards, chaos, mprotect, device reads) only the verifiers' data
//! pages, never a driver's slice.
//!
//! At the end the run is checked against its invariants (see [`StressReport::broken`]). A
//! watchdog keeps a wedged memory layer (a reader blocked forever on an invalidation that never
//! ended) from hanging the run: threads that do not finish in time and a VMM that does not stop
//! are reported, and the harness returns anyway.
//!
//! Monitoring reads (the guests' counters, progress) use `process_vm_readv` on the host
//! addresses directly rather than the VMM's table, so that a wedged table cannot wedge the
//! watchdog.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::{
    slice_pages, stress_layout, stress_pattern, stress_role, GpaRange, StressHeader, StressLayout,
    StressRole, Workload, PAGE_SIZE,
};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use vmm::boot::test_guest::TestGuestParams;
use vmm::devices::virtio::balloon::{BalloonConfig, BalloonStats};
use vmm::devices::virtio::mem::VirtioMemStats;
use vmm::machine::{
    self, BalloonDevice, Console, RunReport, VirtioMemDevice, VirtioMemSpec, VmConfig, VmControl, VmOutcome,
};
use vmm::memory::{MemoryBackend, MemoryConfig, HUGE_PAGE_SIZE};
use vmm::mmu::{AccessError, GuestMemoryAccess, GuestMmu};
use vmm::vstate::vcpu::VcpuOutcome;

/// What `zapvm stress` runs.
#[derive(Clone, Debug)]
pub struct StressOptions {
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// vCPUs running the stress verifier (the balloon and virtio-mem storms each add a driver
    /// vCPU on top).
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// THP for guest RAM.
    pub thp: bool,
    /// Host backing of guest RAM.
    pub backend: MemoryBackend,
    /// With [`Self::work`] unset, how long the scenarios run. With it set, the deadline that
    /// catches a hang: the run ends as soon as its work is done, and work not done by then is a
    /// broken invariant.
    pub duration: Duration,
    /// The work a run does before it ends (`None`: it runs for [`Self::duration`]).
    pub work: Option<Work>,
    /// Seed of the guest's pattern and of every scenario's RNG.
    pub seed: u64,
    /// Discard storm through the notifier.
    pub discard: bool,
    /// Seal guest RAM with `mseal(2)` (see the module docs).
    pub seal_guest_ram: bool,
    /// **Fault injection for the stress test only**: with `seal_guest_ram`, skip the `mseal`
    /// call itself (everything else behaves as sealed), as a seal that silently failed would;
    /// the judge must notice the external blows that then succeed.
    #[cfg(feature = "fault-injection")]
    pub plant_skip_mseal: bool,
    /// External madvise/munmap/mremap chaos.
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    pub mprotect: bool,
    /// Balloon storm: random targets up and down, followed by the guest's driver.
    pub balloon: bool,
    /// virtio-mem plug/unplug storm: random requested sizes up and down.
    pub virtio_mem: bool,
    /// Bytes of the virtio-mem device's hot-pluggable region (whole 2 MiB blocks).
    pub virtio_mem_region: u64,
    /// Largest discard range in bytes (4 KiB .. 2 MiB by default; 4 KiB for an invalidation-rate
    /// run).
    pub discard_max: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// **Fault injection for the stress test only**: after this long, the next teardown skips its
    /// `invalidate_range_end` (`notifier::AddressSpace::plant_fault_skip_next_end`).
    #[cfg(feature = "fault-injection")]
    pub plant_skip_end_after: Option<Duration>,
    /// **Fault injection for the stress test only**: after this long, the balloon and virtio-mem
    /// storms each write a non-zero word into memory their device discarded (the next ballooned
    /// page to come back, the next unplugged block to be plugged), as a memory layer that failed
    /// to discard would leave it.
    #[cfg(feature = "fault-injection")]
    pub plant_dirty_discarded_after: Option<Duration>,
    /// **Fault injection for the stress test only**: each time verifier 0 completes a pass, the
    /// host writes [`PLANTED_WORD`] into a word of that verifier's last data page (which the guest
    /// checks last in its next pass), as memory corrupted behind the guest's back would hold it.
    /// The guest's verifier must fail the run.
    #[cfg(feature = "fault-injection")]
    pub plant_corrupt_verifier_word: bool,
    /// **Fault injection for the stress test only**: the VMM's table keeps up to this many
    /// torn-down entries per region alive, translating to the frame they had
    /// ([`vmm::mmu::GuestMmu::plant_stale_translations`]), as a table that missed an
    /// invalidation would. The device-path checks must fail the run.
    #[cfg(feature = "fault-injection")]
    pub plant_stale_translations: usize,
}

/// How much work a run does (see [`StressOptions::work`]). A zero asks for nothing of its kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Passes over its whole slice every verifier vCPU completes.
    pub passes: u64,
    /// Targets the guest's driver reaches in each device storm (balloon targets, virtio-mem
    /// requested sizes).
    pub targets: u64,
    /// Operations each host scenario completes: discards (discard storm), madvise/munmap/mremap
    /// blows (external chaos), read-only phases (mprotect) and judged reads (device reader).
    pub ops: u64,
}

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

/// The least work done of each kind (see [`WorkReport::least`]); `None` for a kind no scenario of
/// the run does.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    passes: Option<u64>,
    targets: Option<u64>,
    ops: Option<u64>,
}

impl Progress {
    /// Whether this is at least `goal` in every kind some scenario does.
    fn covers(&self, goal: &Work) -> bool {
        self.passes.is_none_or(|n| n >= goal.passes)
            && self.targets.is_none_or(|n| n >= goal.targets)
            && self.ops.is_none_or(|n| n >= goal.ops)
    }

    fn as_work(&self) -> Work {
        Work {
            passes: self.passes.unwrap_or(0),
            targets: self.targets.unwrap_or(0),
            ops: self.ops.unwrap_or(0),
        }
    }
}

/// The word [`StressOptions::plant_corrupt_verifier_word`] writes: neither zero nor, for any
/// realistic generation, the guest's pattern.
#[cfg(feature = "fault-injection")]
pub const PLANTED_WORD: u64 = 0x0bad_c0de_0bad_c0de;

impl StressOptions {
    /// Defaults: 2 verifier vCPUs, 256 MiB anonymous RAM, a 128 MiB virtio-mem region (used only
    /// by the virtio-mem storm), 10 s without a work goal, no scenario selected.
    pub fn new() -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            vcpus: 2,
            mem: 256 << 20,
            thp: false,
            backend: MemoryBackend::Anonymous,
            duration: DEFAULT_DURATION,
            work: None,
            seed: 0x5eed,
            discard: false,
            seal_guest_ram: false,
            #[cfg(feature = "fault-injection")]
            plant_skip_mseal: false,
            external_chaos: false,
            mprotect: false,
            balloon: false,
            virtio_mem: false,
            virtio_mem_region: 128 << 20,
            discard_max: HUGE_PAGE_SIZE as usize,
            progress: false,
            #[cfg(feature = "fault-injection")]
            plant_skip_end_after: None,
            #[cfg(feature = "fault-injection")]
            plant_dirty_discarded_after: None,
            #[cfg(feature = "fault-injection")]
            plant_corrupt_verifier_word: false,
            #[cfg(feature = "fault-injection")]
            plant_stale_translations: 0,
        }
    }

    /// When each planted fault is due (all `None` without the `fault-injection` feature).
    fn planted(&self) -> Planted {
        #[cfg(feature = "fault-injection")]
        return Planted {
            skip_end_after: self.plant_skip_end_after,
            dirty_discarded_after: self.plant_dirty_discarded_after,
            corrupt_verifier_word: self.plant_corrupt_verifier_word,
        };
        #[cfg(not(feature = "fault-injection"))]
        Planted::default()
    }

    /// Every scenario.
    pub fn all(mut self) -> Self {
        self.discard = true;
        self.external_chaos = true;
        self.mprotect = true;
        self.balloon = true;
        self.virtio_mem = true;
        self
    }
}

impl Default for StressOptions {
    fn default() -> Self {
        Self::new()
    }
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

/// The planted faults of a run (see the `plant_*` fields of [`StressOptions`]).
#[derive(Clone, Copy, Debug, Default)]
struct Planted {
    skip_end_after: Option<Duration>,
    dirty_discarded_after: Option<Duration>,
    corrupt_verifier_word: bool,
}

/// A contiguous run of data pages (guest-physical and host addresses).
#[derive(Clone, Copy, Debug)]
struct Run {
    vcpu: usize,
    first_index: u64,
    gpa: u64,
    len: u64,
    hva: usize,
}

/// What every scenario thread shares.
struct Ctx {
    mmu: Arc<GuestMmu>,
    work: Vec<GpaRange>,
    layouts: Vec<StressLayout>,
    runs: Vec<Run>,
    /// Alignment of attacks (2 MiB on hugetlb).
    granule: u64,
    /// Guest RAM is (meant to be) sealed: the external chaos adds mprotect and MAP_FIXED blows.
    sealed: bool,
    seed: u64,
    discard_max: u64,
    /// The end of the run: without a work goal its planned end, with one the deadline that
    /// catches a hang.
    deadline: Instant,
    stop: AtomicBool,
    started: Instant,
    c: Counters,
    first_error: Mutex<Option<String>>,
    first_stale_discard: Mutex<Option<String>>,
    first_stale_device: Mutex<Option<String>>,
    plant_after: Option<Duration>,
    /// The balloon and its driver's pool, when the balloon storm runs.
    balloon: Option<BalloonPool>,
    /// The virtio-mem device, when its storm runs.
    virtio_mem: Option<VirtioMemDevice>,
    /// Set when the VM ended before the scenarios did (a guest failure): waiting is pointless.
    vm_ended: Arc<AtomicBool>,
    plant_dirty_after: Option<Duration>,
    /// Times the host wrote [`Planted::corrupt_verifier_word`]'s word.
    planted_corruptions: AtomicU64,
    /// Scenario threads running (counted as each begins) and whether they may start their work
    /// (set once every one of them runs), with the condvar signalling both.
    go: (Mutex<(usize, bool)>, std::sync::Condvar),
}

/// The balloon device and the slice its guest driver balloons from.
struct BalloonPool {
    device: BalloonDevice,
    /// Guest-physical addresses of the driver's slice pages, in order: the first
    /// [`guest_abi::BALLOON_CARVED_PAGES`] are the driver's own, the balloon is a suffix of the
    /// rest.
    slice: Vec<u64>,
}

impl BalloonPool {
    /// The largest target the driver follows.
    fn max_target(&self) -> u64 {
        (self.slice.len() as u64).saturating_sub(guest_abi::BALLOON_CARVED_PAGES)
    }
}

/// The counters of a device storm (see [`StormSteps`]).
#[derive(Default)]
struct StormCounters {
    targets: AtomicU64,
    reached: AtomicU64,
    timed_out: AtomicU64,
    unfinished: AtomicU64,
    step_ms_total: AtomicU64,
    step_ms_max: AtomicU64,
    moved: AtomicU64,
    discarded_checked: AtomicU64,
    discarded_not_zero: AtomicU64,
    owned_checked: AtomicU64,
    owned_bad: AtomicU64,
    first_problem: Mutex<Option<String>>,
}

impl StormCounters {
    fn problem(&self, what: String) {
        self.first_problem.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(what);
    }

    fn report(&self) -> StormSteps {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StormSteps {
            targets: l(&self.targets),
            reached: l(&self.reached),
            timed_out: l(&self.timed_out),
            unfinished_at_end: l(&self.unfinished),
            step_ms_mean: l(&self.step_ms_total) as f64 / l(&self.reached).max(1) as f64,
            step_ms_max: l(&self.step_ms_max),
            moved_per_s: l(&self.moved) as f64 * 1000.0 / l(&self.step_ms_total).max(1) as f64,
            discarded_pages_checked: l(&self.discarded_checked),
            discarded_not_zero: l(&self.discarded_not_zero),
            owned_pages_checked: l(&self.owned_checked),
            owned_not_pattern: l(&self.owned_bad),
            first_problem: self.first_problem.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

#[derive(Default)]
struct Counters {
    discard_ops: AtomicU64,
    discard_bytes: AtomicU64,
    discard_skipped: AtomicU64,
    discard_errors: AtomicU64,
    discard_checked: AtomicU64,
    discard_stale: AtomicU64,
    chaos_madvise: AtomicU64,
    chaos_munmap: AtomicU64,
    chaos_mremap: AtomicU64,
    chaos_mprotect: AtomicU64,
    chaos_map_fixed: AtomicU64,
    /// EPERM refusals: munmap, mremap, mprotect, mmap(MAP_FIXED).
    chaos_eperm: [AtomicU64; 4],
    chaos_failed: AtomicU64,
    chaos_bytes: AtomicU64,
    prot_phases: AtomicU64,
    prot_ranges: AtomicU64,
    prot_bytes: AtomicU64,
    prot_failed: AtomicU64,
    prot_restore_retries: AtomicU64,
    prot_restore_failures: AtomicU64,
    dev_reads: AtomicU64,
    dev_stale: AtomicU64,
    dev_raced: AtomicU64,
    dev_unmapped: AtomicU64,
    /// Milliseconds since start of the device reader's last completed read.
    dev_last_ms: AtomicU64,
    balloon_storm: StormCounters,
    mem_storm: StormCounters,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && !self.vm_ended.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
    }

    /// Waits until `threads` scenario threads run (see [`Self::wait_for_go`]), then lets them
    /// begin their work.
    fn go(&self, threads: usize) {
        let mut go = self.go.0.lock().unwrap_or_else(|e| e.into_inner());
        while go.0 < threads {
            go = self.go.1.wait(go).unwrap_or_else(|e| e.into_inner());
        }
        go.1 = true;
        self.go.1.notify_all();
    }

    /// Called first thing by each scenario thread: counts it as running and blocks until
    /// [`Self::go`].
    ///
    /// A spawned thread maps its signal stack when it first runs, not when it is spawned, wherever
    /// the kernel finds room — which may be a hole the external chaos just made in guest RAM (the
    /// teardown guard then rightly refuses to re-back over it: a run that failed 70 ms in). So no
    /// scenario does anything before every scenario thread is running.
    fn wait_for_go(&self) {
        let mut go = self.go.0.lock().unwrap_or_else(|e| e.into_inner());
        go.0 += 1;
        self.go.1.notify_all();
        while !go.1 {
            go = self.go.1.wait(go).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn space(&self) -> &Arc<notifier::AddressSpace> {
        self.mmu.space()
    }

    /// A random attack range inside one run: (run, gpa, len), aligned to the granule.
    fn pick(&self, rng: &mut ChaCha8Rng, max: u64) -> (Run, u64, u64) {
        let total: u64 = self.runs.iter().map(|r| r.len / self.granule).sum();
        let mut k = rng.random_range(0..total);
        let run = *self
            .runs
            .iter()
            .find(|r| {
                let n = r.len / self.granule;
                if k < n {
                    true
                } else {
                    k -= n;
                    false
                }
            })
            .expect("k < total");
        let max_units = (max / self.granule).max(1);
        // Mostly small ranges, some large: 4 KiB .. `max`.
        let units = match rng.random_range(0..10) {
            0..=5 => rng.random_range(1..=max_units.min(16)),
            _ => rng.random_range(1..=max_units),
        }
        .min(run.len / self.granule);
        let start_unit = rng.random_range(0..=(run.len / self.granule - units));
        (run, run.gpa + start_unit * self.granule, units * self.granule)
    }

    fn hva(&self, run: &Run, gpa: u64) -> usize {
        run.hva + (gpa - run.gpa) as usize
    }

    /// Splits host range `[start, start + len)` along the notifier's current regions (external
    /// teardowns and re-backs split them), skipping what is not mapped right now.
    fn pieces(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        pieces_of(self.space(), start, len)
    }

    /// The generation the guest's table holds for data page `index` of `vcpu`, read through the
    /// device path.
    fn generation(&self, vcpu: usize, index: u64) -> Result<u64, AccessError> {
        let mut b = [0u8; 4];
        self.mmu.read(self.layouts[vcpu].gen_gpa(&self.work, index), &mut b)?;
        Ok(u64::from(u32::from_le_bytes(b)))
    }

    fn note_error(&self, what: String) {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(what);
    }

    /// Arms the planted skipped end once it is due (`plant_after` is `None` without the feature
    /// `fault-injection`).
    fn maybe_plant(&self, planted: &mut bool) {
        if let Some(after) = self.plant_after {
            if !*planted && self.started.elapsed() >= after {
                #[cfg(feature = "fault-injection")]
                self.space().plant_fault_skip_next_end();
                *planted = true;
            }
        }
    }
}

/// Splits host range `[start, start + len)` along `space`'s current regions, skipping what is
/// not mapped: (start, len) of each piece.
fn pieces_of(space: &notifier::AddressSpace, start: usize, len: usize) -> Vec<(usize, usize)> {
    let end = start + len;
    space
        .regions()
        .iter()
        .filter(|r| r.start < end && start < r.end)
        .map(|r| (r.start.max(start), r.end.min(end)))
        .map(|(s, e)| (s, e - s))
        .collect()
}

/// The discard storm: random ranges through the notifier, each checked right after.
fn discard_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut planted = false;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        let (run, gpa, len) = ctx.pick(&mut rng, ctx.discard_max);
        // Generations the guest had completed before the discard, for up to 4 sampled pages.
        let pages = len / PAGE_SIZE;
        let samples: Vec<u64> = (0..pages.min(4)).map(|_| rng.random_range(0..pages)).collect();
        let before: Vec<Option<u64>> = samples
            .iter()
            .map(|&p| ctx.generation(run.vcpu, run.first_index + (gpa - run.gpa) / PAGE_SIZE + p).ok())
            .collect();
        let mut done = true;
        for (s, l) in ctx.pieces(ctx.hva(&run, gpa), len as usize) {
            match ctx.space().discard(s, l) {
                Ok(_) => {
                    bump(&c.discard_ops, 1);
                    bump(&c.discard_bytes, l as u64);
                }
                // Not mapped: an external hole the notifier knew of, or one it has not heard of
                // yet (the syscall failed with ENOMEM).
                Err(notifier::Error::NotMapped { .. }) => {
                    bump(&c.discard_skipped, 1);
                    done = false;
                }
                Err(notifier::Error::Os { source, .. }) if source.raw_os_error() == Some(libc::ENOMEM) => {
                    bump(&c.discard_skipped, 1);
                    done = false;
                }
                Err(e) => {
                    bump(&c.discard_errors, 1);
                    ctx.note_error(format!("discard {s:#x}+{l:#x}: {e}"));
                    done = false;
                }
            }
        }
        if !done
            || ctx.pieces(ctx.hva(&run, gpa), len as usize).iter().map(|p| p.1 as u64).sum::<u64>() != len
        {
            continue; // a hole came or went: the range is not known to be discarded as a whole
        }
        // Every word the guest wrote before the discard is gone: only zeros or generations
        // written after it (> the generation read before) may be found.
        for (&p, g0) in samples.iter().zip(before) {
            let Some(g0) = g0 else { continue };
            let page_gpa = gpa + p * PAGE_SIZE;
            if ctx.mmu.read(page_gpa, &mut page).is_err() {
                continue;
            }
            bump(&c.discard_checked, 1);
            let stale = page.chunks_exact(8).enumerate().find_map(|(i, w)| {
                let v = u64::from_le_bytes(w.try_into().unwrap());
                let at = page_gpa + 8 * i as u64;
                (v != 0 && (g0.saturating_sub(2)..=g0).any(|g| v == stress_pattern(ctx.seed, g, at)))
                    .then_some((at, v))
            });
            if let Some((at, v)) = stale {
                bump(&c.discard_stale, 1);
                ctx.first_stale_discard.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!(
                    "GPA {at:#x} holds {v:#x} (generation <= {g0}, written before the discard) after the discard"
                ));
            }
        }
    }
}

/// External chaos: the VMM's API is bypassed entirely.
fn external_chaos(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut planted = false;
    // The destination of every move: reserved now, while guest RAM has no hole, and kept reserved
    // (a fresh mapping made later with a NULL hint could land in a hole of guest RAM the guard has
    // not re-backed yet — and the guard rightly refuses to map over someone else's memory).
    let reserve = 2 * HUGE_PAGE_SIZE as usize;
    let none = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks; nothing else uses it.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_NONE, none, -1, 0) };
    if base == libc::MAP_FAILED {
        ctx.note_error("external chaos: cannot reserve a scratch area".into());
        return;
    }
    // 2 MiB-aligned inside the reservation (hugetlb moves need it).
    let scratch = (base as usize).next_multiple_of(HUGE_PAGE_SIZE as usize) as *mut libc::c_void;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        let (run, gpa, len) = ctx.pick(&mut rng, HUGE_PAGE_SIZE);
        let (p, l) = (ctx.hva(&run, gpa) as *mut libc::c_void, len as usize);
        // With the seal the kernel must refuse every blow but madvise; two more kinds test it.
        let kinds = if ctx.sealed { 5 } else { 3 };
        match rng.random_range(0..kinds) {
            0 => {
                // SAFETY: `p..p+l` is guest RAM (data pages only: no metadata, stack or image), which
                // the VMM accesses only through raw pointers and the fault-tolerant copies of the
                // table; dropping its contents behind the VMM's back is the scenario.
                if unsafe { libc::madvise(p, l, libc::MADV_DONTNEED) } == 0 {
                    bump(&c.chaos_madvise, 1);
                    bump(&c.chaos_bytes, len);
                } else {
                    bump(&c.chaos_failed, 1);
                }
            }
            1 => {
                // SAFETY: as above; the VMM survives an unmap of guest RAM (the teardown guard
                // re-backs it, vCPUs and device reads wait or fail cleanly meanwhile).
                if unsafe { libc::munmap(p, l) } == 0 {
                    bump(&c.chaos_munmap, 1);
                    bump(&c.chaos_bytes, len);
                    wait_rebacked(p, l);
                } else {
                    refused(c, SealedBlow::Munmap);
                }
            }
            2 => {
                // SAFETY: moves guest RAM (data pages) onto this thread's scratch reservation,
                // replacing only it (MREMAP_FIXED); as for munmap, the VMM survives the hole left
                // behind.
                let moved =
                    unsafe { libc::mremap(p, l, l, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, scratch) };
                if moved == scratch {
                    bump(&c.chaos_mremap, 1);
                    bump(&c.chaos_bytes, len);
                    wait_rebacked(p, l);
                } else {
                    refused(c, SealedBlow::Mremap);
                }
                // SAFETY: `scratch..+l` is this thread's reservation (now possibly holding the
                // moved pages, no longer guest RAM): MAP_FIXED drops them and reserves it again in
                // one step, so the range is never free for anyone else's mapping.
                let again = unsafe { libc::mmap(scratch, l, libc::PROT_NONE, none | libc::MAP_FIXED, -1, 0) };
                if again != scratch {
                    ctx.note_error("external chaos: cannot re-reserve the scratch area".into());
                    break;
                }
            }
            3 => {
                // Sealed RAM only. SAFETY: guest RAM the kernel must refuse to re-protect; were
                // the seal missing, write access is given back at once (the guest may meanwhile
                // fault on a write and wait in the teardown guard), and the run is broken anyway.
                if unsafe { libc::mprotect(p, l, libc::PROT_READ) } == 0 {
                    bump(&c.chaos_mprotect, 1);
                    // SAFETY: the same range, made writable again.
                    unsafe { libc::mprotect(p, l, libc::PROT_READ | libc::PROT_WRITE) };
                } else {
                    refused(c, SealedBlow::Mprotect);
                }
            }
            _ => {
                // Sealed RAM only. SAFETY: guest RAM the kernel must refuse to map over; were the
                // seal missing, fresh zeroed memory replaces it (the teardown guard then stops the
                // VM: a mapping it did not make sits in guest RAM), and the run is broken anyway.
                let over = unsafe {
                    libc::mmap(p, l, libc::PROT_READ | libc::PROT_WRITE, none | libc::MAP_FIXED, -1, 0)
                };
                if over == p {
                    bump(&c.chaos_map_fixed, 1);
                } else {
                    refused(c, SealedBlow::MapFixed);
                }
            }
        }
        // Let the guard re-back before the next blow (bounded: at most a few ms per operation).
        std::thread::sleep(Duration::from_micros(rng.random_range(200..3000)));
    }
    // SAFETY: the reservation (and whatever was moved into it) is this thread's alone.
    unsafe { libc::munmap(base, reserve) };
}

/// The external blows sealed guest RAM must refuse, as indices of `Counters::chaos_eperm`.
#[derive(Clone, Copy)]
enum SealedBlow {
    Munmap = 0,
    Mremap = 1,
    Mprotect = 2,
    MapFixed = 3,
}

/// Counts a failed external blow, right after the call: an `EPERM` is the seal refusing it,
/// anything else an ordinary failure (a hole not re-backed yet, a range spanning two mappings).
fn refused(c: &Counters, blow: SealedBlow) {
    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        bump(&c.chaos_eperm[blow as usize], 1);
    } else {
        bump(&c.chaos_failed, 1);
    }
}

/// Waits (up to [`REBACK_WAIT`]) until the hole at `[p, p + l)` that an external unmap or move
/// left is mapped again (the teardown guard re-backs it).
///
/// A vCPU whose access fails with a plain `EFAULT` (KVM names no address) resumes only once no
/// hole is left anywhere in guest RAM; blows faster than the guard re-backs (a loaded host) would
/// keep some hole open nearly all the time and starve the vCPUs, which is not what the scenario is
/// about.
fn wait_rebacked(p: *mut libc::c_void, l: usize) {
    let deadline = Instant::now() + REBACK_WAIT;
    let mut residency = vec![0u8; l.div_ceil(PAGE_SIZE as usize)];
    // SAFETY: mincore only writes residency bytes into `residency` (one per page of the range,
    // which is its length); it fails with ENOMEM while part of the range is unmapped and touches
    // no guest memory.
    while unsafe { libc::mincore(p, l, residency.as_mut_ptr()) } != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// How long the external chaos waits for the guard to re-back a hole before the next blow.
const REBACK_WAIT: Duration = Duration::from_millis(100);

/// mprotect phases: read-only for a while, then read-write again, through the notifier.
fn mprotect_phases(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut planted = false;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(20..120)));
        if !ctx.running() {
            break;
        }
        let mut ranges = Vec::new();
        for _ in 0..rng.random_range(1..=4) {
            let (run, gpa, len) = ctx.pick(&mut rng, 16 << 20);
            let (s, l) = (ctx.hva(&run, gpa), len as usize);
            for (ps, pl) in ctx.pieces(s, l) {
                match ctx.space().protect(ps, pl, libc::PROT_READ) {
                    Ok(_) => {
                        bump(&c.prot_ranges, 1);
                        bump(&c.prot_bytes, pl as u64);
                    }
                    Err(_) => bump(&c.prot_failed, 1),
                }
            }
            ranges.push((s, l));
        }
        bump(&c.prot_phases, 1);
        // Read-only phase (ends early at the deadline; the restore below always runs).
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(50..300)));
        for (s, l) in ranges {
            restore(ctx, s, l);
        }
    }
}

/// Makes `[s, s + l)` writable again (see [`restore_writable`]), counting retries and failures.
fn restore(ctx: &Ctx, s: usize, l: usize) {
    let c = &ctx.c;
    let deadline = Instant::now() + RESTORE_WAIT;
    match restore_writable(ctx.space(), s, l, deadline) {
        Ok(retries) => bump(&c.prot_restore_retries, retries),
        Err((retries, failure)) => {
            bump(&c.prot_restore_retries, retries);
            bump(&c.prot_restore_failures, 1);
            ctx.note_error(format!("cannot make {s:#x}+{l:#x} writable again ({failure})"));
        }
    }
}

/// How long a restore retries while external teardowns keep changing the range.
const RESTORE_WAIT: Duration = Duration::from_secs(15);

/// Makes every page of `[s, s + l)` that the kernel maps writable again, through the notifier,
/// retrying (until `deadline`) while external teardowns change the range under it. Returns the
/// retries, or the retries and the last failure.
///
/// Invariant: when this returns `Ok`, no page of the range that the kernel mapped at the last
/// pass is left read-only. A guest write to a page left read-only faults forever, and its vCPU
/// waits in the teardown guard for a restore that never comes (a verifier that stops making
/// passes and a VM that does not stop). Unmapped pages need nothing (the teardown guard re-backs
/// holes read-write), but a piece that is only *partly* unmapped does: `mprotect` fails with
/// `ENOMEM` at the first gap, having changed only the mappings before it, and a piece the notifier
/// split meanwhile fails validation without any change. So a piece whose restore fails is restored
/// again mapping by mapping, as the kernel maps it now.
fn restore_writable(
    space: &notifier::AddressSpace,
    s: usize,
    l: usize,
    deadline: Instant,
) -> Result<u64, (u64, String)> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let mut retries = 0;
    loop {
        let mut failure = None;
        for (ps, pl) in pieces_of(space, s, l) {
            if space.protect(ps, pl, rw).is_ok() {
                continue;
            }
            match vmm::teardown::host_mappings(ps, ps + pl) {
                Ok(mapped) => {
                    for (a, b) in mapped {
                        if let Err(e) = space.protect(a, b - a, rw) {
                            failure = Some(format!("{a:#x}+{:#x}: {e}", b - a));
                        }
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(failure) = failure else { return Ok(retries) };
        if Instant::now() >= deadline {
            return Err((retries, failure));
        }
        retries += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sleep_until_or(ctx: &Ctx, d: Duration) {
    let until = (Instant::now() + d).min(ctx.deadline);
    while !ctx.stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(20)));
    }
}

/// The device path: random data pages through the VMM's table, judged against the metadata.
fn device_reader(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    while ctx.running() {
        let (run, gpa, _) = ctx.pick(&mut rng, PAGE_SIZE);
        let index = run.first_index + (gpa - run.gpa) / PAGE_SIZE;
        let judged = (|| -> Result<bool, AccessError> {
            let g1 = ctx.generation(run.vcpu, index)?;
            ctx.mmu.read(gpa, &mut page)?;
            let g2 = ctx.generation(run.vcpu, index)?;
            if g2 < g1 || g2 > g1 + 1 {
                return Ok(false);
            }
            // Data the guest completed (g1), or is writing (up to g2 + 1), or zeros.
            let bad = page.chunks_exact(8).enumerate().find_map(|(i, w)| {
                let v = u64::from_le_bytes(w.try_into().unwrap());
                let at = gpa + 8 * i as u64;
                (v != 0 && !(g1..=g2 + 1).any(|g| v == stress_pattern(ctx.seed, g, at))).then_some((at, v))
            });
            if let Some((at, v)) = bad {
                bump(&c.dev_stale, 1);
                ctx.first_stale_device.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!(
                    "device read of GPA {at:#x} returned {v:#x}, not 0 nor generation {g1}..={}",
                    g2 + 1
                ));
            }
            Ok(true)
        })();
        match judged {
            Ok(true) => bump(&c.dev_reads, 1),
            Ok(false) => bump(&c.dev_raced, 1),
            Err(AccessError::Unmapped { .. }) => bump(&c.dev_unmapped, 1),
            Err(e) => {
                ctx.note_error(format!("device read of {gpa:#x}: {e}"));
                bump(&c.dev_unmapped, 1);
            }
        }
        c.dev_last_ms.store(ctx.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// How long a device storm waits for the guest's driver to reach one target (a step of the
/// largest size is well under a second on an idle host).
const STEP_WAIT: Duration = Duration::from_secs(120);
/// Pages of each kind a device storm reads through the device path after each step.
const STEP_SAMPLES: usize = 8;

/// A random target in `0..=max` other than `current` (`max` > 0): mostly anywhere, sometimes
/// empty or full, sometimes a small move.
pub(crate) fn pick_target(rng: &mut ChaCha8Rng, current: u64, max: u64) -> u64 {
    assert!(max > 0, "no target other than {current} in 0..={max}");
    loop {
        let t = match rng.random_range(0..10) {
            0 => 0,
            1 => max,
            2..=4 => {
                let step = rng.random_range(1..=(max / 16).max(1));
                if rng.random_bool(0.5) {
                    current.saturating_sub(step)
                } else {
                    (current + step).min(max)
                }
            }
            _ => rng.random_range(0..=max),
        };
        if t != current {
            return t;
        }
    }
}

/// Polls `reached` every 2 ms until it returns `Ok`, the run ends (`Err(None)`) or [`STEP_WAIT`]
/// passes (`Err(Some(state))`, with the state `reached` gave last). Returns how long it took.
fn poll_step(ctx: &Ctx, mut reached: impl FnMut() -> Result<(), String>) -> Result<Duration, Option<String>> {
    let started = Instant::now();
    loop {
        let state = match reached() {
            Ok(()) => return Ok(started.elapsed()),
            Err(state) => state,
        };
        if !ctx.running() {
            return Err(None);
        }
        if started.elapsed() >= STEP_WAIT {
            return Err(Some(state));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// [`poll_step`] for one target of a storm that moves `moved` units, counted in `s`; returns
/// whether it was reached.
fn wait_step(
    ctx: &Ctx,
    s: &StormCounters,
    what: &str,
    moved: u64,
    reached: impl FnMut() -> Result<(), String>,
) -> bool {
    match poll_step(ctx, reached) {
        Ok(took) => {
            let ms = took.as_millis() as u64;
            bump(&s.reached, 1);
            bump(&s.moved, moved);
            bump(&s.step_ms_total, ms);
            s.step_ms_max.fetch_max(ms, Ordering::Relaxed);
            true
        }
        Err(None) => {
            bump(&s.unfinished, 1);
            false
        }
        Err(Some(state)) => {
            bump(&s.timed_out, 1);
            s.problem(format!("{what} not reached within {} s: {state}", STEP_WAIT.as_secs()));
            false
        }
    }
}

/// Reads the page at `gpa` through the device path; `None` if it cannot be read.
fn read_page(ctx: &Ctx, gpa: u64) -> Option<Vec<u8>> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    ctx.mmu.read(gpa, &mut page).ok().map(|_| page)
}

/// The first non-zero word of `page` (at `gpa`) as (address, value).
fn first_non_zero(gpa: u64, page: &[u8]) -> Option<(u64, u64)> {
    page.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        (v != 0).then_some((gpa + 8 * i as u64, v))
    })
}

/// The first word of `page` (at `gpa`) that is not the drivers' [`guest_abi::pattern`].
fn first_not_pattern(seed: u64, gpa: u64, page: &[u8]) -> Option<(u64, u64)> {
    page.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let (v, at) = (u64::from_le_bytes(w.try_into().unwrap()), gpa + 8 * i as u64);
        (v != guest_abi::pattern(seed, at)).then_some((at, v))
    })
}

/// Writes a non-zero word into the discarded page at `gpa` once the planted fault is due (fault
/// injection for the stress test); returns whether it did.
fn maybe_dirty(ctx: &Ctx, planted: &mut bool, gpa: u64) -> bool {
    let due = ctx.plant_dirty_after.is_some_and(|after| ctx.started.elapsed() >= after);
    if *planted || !due {
        return false;
    }
    *planted = ctx.mmu.write(gpa, &0x0bad_0bad_0bad_0badu64.to_le_bytes()).is_ok();
    *planted
}

/// The planted fault of [`StressOptions::plant_corrupt_verifier_word`]: each time verifier 0
/// completes a pass, [`PLANTED_WORD`] goes into the middle of its last data page, which the guest
/// checks last in its next pass. (A plant that lands while the guest rewrites that very page, or
/// that a discard zeroes, is lost; the next pass brings the next one.)
fn corrupt_verifier(ctx: &Ctx, _rng: ChaCha8Rng) {
    #[cfg(feature = "fault-injection")]
    {
        let Some(layout) = ctx.layouts.first() else { return };
        let gpa = layout.data_gpa(&ctx.work, layout.data_pages() - 1) + PAGE_SIZE / 2;
        let mut planted_after = None;
        while ctx.running() {
            let passes = guest_headers(ctx)[0].passes;
            if planted_after != Some(passes) {
                if ctx.mmu.write(gpa, &PLANTED_WORD.to_le_bytes()).is_ok() {
                    bump(&ctx.planted_corruptions, 1);
                    tracing::warn!("planted fault: word {PLANTED_WORD:#x} written at GPA {gpa:#x}");
                }
                planted_after = Some(passes);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = ctx;
}

/// The balloon storm: random targets, each followed by the guest's driver, then checked.
fn balloon_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let Some(pool) = &ctx.balloon else { return };
    let s = &ctx.c.balloon_storm;
    let lock = || pool.device.lock().unwrap_or_else(|e| e.into_inner());
    let (pages, max) = (pool.slice.len() as u64, pool.max_target());
    if max == 0 {
        s.problem(format!(
            "the balloon driver's slice has {pages} pages, no more than the {} it keeps for itself: \
             give the guest more RAM",
            guest_abi::BALLOON_CARVED_PAGES
        ));
        return;
    }
    let mut current = 0u64;
    let mut planted = false;
    while ctx.running() {
        let target = pick_target(&mut rng, current, max);
        lock().update_config(|b| b.set_target_pages(target as u32));
        bump(&s.targets, 1);
        let what = format!("balloon target {target} pages (from {current})");
        let reached = wait_step(ctx, s, &what, target.abs_diff(current), || {
            let st = lock().device().stats();
            if u64::from(st.actual_pages) == target && st.ballooned_pages == target {
                Ok(())
            } else {
                Err(format!("actual {} pages, {} ballooned", st.actual_pages, st.ballooned_pages))
            }
        });
        if !reached {
            break;
        }
        current = target;
        // The balloon is the last `target` pages of the slice; the guest deflates its lowest
        // page first. Pages stay as they are until the next target (but for the driver's one
        // unrequested deflate-on-OOM, which the bitmap check after each read covers).
        let first = pages - target;
        if target > 0 && maybe_dirty(ctx, &mut planted, pool.slice[first as usize]) {
            tracing::warn!("planted fault: ballooned page {:#x} dirtied", pool.slice[first as usize]);
        }
        let mut ballooned: Vec<u64> = Vec::new();
        if target > 0 {
            ballooned.push(first);
            ballooned.extend((1..STEP_SAMPLES).map(|_| rng.random_range(first..pages)));
        }
        // Judged only if the page was in the balloon all along: ballooned before and after the
        // read with no deflate in between (the driver touches a page only after the device
        // processed its deflate, MUST_TELL_HOST; its one unrequested deflate-on-OOM deflates,
        // refills and re-inflates pages while the host samples).
        let still_ballooned = |pfn: u64| {
            let b = lock();
            b.device().is_ballooned(pfn).then(|| b.device().stats().deflated_pages)
        };
        for index in ballooned {
            let gpa = pool.slice[index as usize];
            let Some(deflated) = still_ballooned(gpa / PAGE_SIZE) else { continue };
            let Some(page) = read_page(ctx, gpa) else { continue };
            if still_ballooned(gpa / PAGE_SIZE) != Some(deflated) {
                continue;
            }
            bump(&s.discarded_checked, 1);
            if let Some((at, v)) = first_non_zero(gpa, &page) {
                bump(&s.discarded_not_zero, 1);
                s.problem(format!(
                    "ballooned page {gpa:#x} (pool page {index} of {pages}, balloon {target} pages) holds \
                     {v:#x} at {at:#x}, not zero"
                ));
            }
        }
        let carved = guest_abi::BALLOON_CARVED_PAGES;
        if first > carved {
            for _ in 0..STEP_SAMPLES {
                let index = rng.random_range(carved..first);
                let gpa = pool.slice[index as usize];
                let Some(page) = read_page(ctx, gpa) else { continue };
                bump(&s.owned_checked, 1);
                if let Some((at, v)) = first_not_pattern(ctx.seed, gpa, &page) {
                    bump(&s.owned_bad, 1);
                    s.problem(format!(
                        "owned pool page {gpa:#x} (pool page {index}, balloon {target} pages) holds {v:#x} \
                         at {at:#x}, not the pattern"
                    ));
                }
            }
        }
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(0..20)));
    }
}

/// STATE requests the guest's virtio-mem driver sends over `blocks` blocks of one state (it
/// asks about at most 32768 blocks at a time).
fn state_requests(blocks: u64) -> u64 {
    blocks.div_ceil(0x8000)
}

/// The virtio-mem storm: random requested sizes, each followed by the guest's driver, then
/// checked.
fn virtio_mem_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let Some(device) = &ctx.virtio_mem else { return };
    let s = &ctx.c.mem_storm;
    let lock = || device.lock().unwrap_or_else(|e| e.into_inner());
    let st = lock().device().stats();
    let (addr, block) = (st.addr, st.block_size);
    let blocks = st.region_size / block;
    let pages_per_block = block / PAGE_SIZE;
    // The driver's probe ends with STATE requests over the whole (unplugged) region: a step's
    // own STATE requests can only be counted after those.
    let probed = poll_step(ctx, || {
        let st = lock().device().stats();
        if st.state_requests >= state_requests(blocks) {
            Ok(())
        } else {
            Err(format!("{} STATE requests", st.state_requests))
        }
    });
    match probed {
        Ok(_) => {}
        Err(None) => return,
        Err(Some(state)) => {
            bump(&s.timed_out, 1);
            s.problem(format!(
                "the virtio-mem driver did not probe within {} s: {state}",
                STEP_WAIT.as_secs()
            ));
            return;
        }
    }
    let mut current = 0u64;
    let mut planted = false;
    while ctx.running() {
        let target = pick_target(&mut rng, current, blocks);
        let bytes = target * block;
        let before = lock().device().stats().state_requests;
        let states = state_requests(target) + state_requests(blocks - target);
        if let Err(e) = lock().update_config(|m| m.set_requested_size(bytes)) {
            s.problem(format!("requested size {bytes:#x} refused: {e}"));
            break;
        }
        bump(&s.targets, 1);
        let what = format!("virtio-mem requested size {target} blocks (from {current})");
        let reached = wait_step(ctx, s, &what, target.abs_diff(current), || {
            let st = lock().device().stats();
            if st.plugged_size == bytes && st.state_requests >= before + states {
                Ok(())
            } else {
                Err(format!(
                    "plugged {} blocks, {} of {states} STATE requests",
                    st.plugged_size / block,
                    st.state_requests - before
                ))
            }
        });
        if !reached {
            break;
        }
        let old = std::mem::replace(&mut current, target);
        // Blocks [0, target) are plugged and hold the pattern; the rest are unplugged: the
        // driver plugs the lowest (block `target`) next.
        if target < blocks && maybe_dirty(ctx, &mut planted, addr + target * block) {
            tracing::warn!("planted fault: unplugged block {target} dirtied");
        }
        if target > 0 {
            for _ in 0..STEP_SAMPLES {
                let gpa = addr + rng.random_range(0..target * pages_per_block) * PAGE_SIZE;
                let Some(page) = read_page(ctx, gpa) else { continue };
                bump(&s.owned_checked, 1);
                if let Some((at, v)) = first_not_pattern(ctx.seed, gpa, &page) {
                    bump(&s.owned_bad, 1);
                    s.problem(format!(
                        "plugged page {gpa:#x} (block {} of {target} plugged) holds {v:#x} at {at:#x}, not \
                         the pattern",
                        (gpa - addr) / block
                    ));
                }
            }
        }
        if target < blocks {
            // The next block to be plugged, then pages of the blocks just unplugged (if any),
            // else of any unplugged block.
            let (lo, hi) = if old > target { (target, old) } else { (target, blocks) };
            let mut sampled = vec![addr + target * block];
            sampled
                .extend((1..STEP_SAMPLES).map(|_| {
                    addr + rng.random_range(lo * pages_per_block..hi * pages_per_block) * PAGE_SIZE
                }));
            // Judged only if the block stayed unplugged all along (it does: the host changes
            // nothing until the next target; checked anyway, as for the balloon).
            let still_unplugged = |gpa: u64| {
                let m = lock();
                (!m.device().is_plugged(gpa)).then(|| m.device().stats().blocks_plugged)
            };
            for gpa in sampled {
                let Some(plugged) = still_unplugged(gpa) else { continue };
                let Some(page) = read_page(ctx, gpa) else { continue };
                if still_unplugged(gpa) != Some(plugged) {
                    continue;
                }
                bump(&s.discarded_checked, 1);
                if let Some((at, v)) = first_non_zero(gpa, &page) {
                    bump(&s.discarded_not_zero, 1);
                    s.problem(format!(
                        "unplugged page {gpa:#x} (block {}, {target} plugged, {old} before) holds {v:#x} at \
                         {at:#x}, not zero",
                        (gpa - addr) / block
                    ));
                }
            }
        }
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(0..20)));
    }
}

/// Reads `buf.len()` bytes of this process at `hva` without the VMM's table (monitoring only).
pub(crate) fn peek(hva: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` is `buf`, writable for its length; the remote side is this process's memory,
    // checked by the kernel (EFAULT if unmapped), so no Rust reference to guest RAM is made.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == buf.len() as isize
}

/// The guest's counters of every vCPU.
fn guest_headers(ctx: &Ctx) -> Vec<StressHeader> {
    ctx.layouts
        .iter()
        .map(|l| {
            let gpa = l.header_gpa(&ctx.work);
            let mut b = [0u8; std::mem::size_of::<StressHeader>()];
            let Some(hva) = ctx.mmu.host_range(gpa, b.len() as u64) else { return StressHeader::default() };
            if !peek(hva, &mut b) {
                return StressHeader::default();
            }
            let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
            StressHeader { magic: w(0), passes: w(1), verified: w(2), zero_pages: w(3), torn_pages: w(4) }
        })
        .collect()
}

fn invalidations(kinds: &[notifier::KindStats]) -> u64 {
    kinds.iter().filter(|k| k.kind != "release").map(|k| k.starts).sum()
}

/// Flattens the numeric leaves of a JSON value into `out` as `path -> number`.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out)
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), x, out)
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

/// The least work done of each kind by the scenarios `names` (see [`Progress`]).
/// `write_faults_while_read_only` is the teardown guard's count: mprotect phases count as work
/// only once a guest write has faulted on a read-only range (what the scenario exists to cause),
/// so a goal met by phases alone, with every write landing between phases, is not met.
fn progress(ctx: &Ctx, names: &[String], write_faults_while_read_only: u64) -> Progress {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let k = &ctx.c;
    let ops: Vec<u64> = names
        .iter()
        .filter_map(|n| match n.as_str() {
            "device-reader" => Some(l(&k.dev_reads)),
            "discard" => Some(l(&k.discard_ops)),
            "external-chaos" => Some(l(&k.chaos_madvise) + l(&k.chaos_munmap) + l(&k.chaos_mremap)),
            "mprotect" => Some(if write_faults_while_read_only > 0 { l(&k.prot_phases) } else { 0 }),
            _ => None,
        })
        .collect();
    let targets: Vec<u64> = names
        .iter()
        .filter_map(|n| match n.as_str() {
            "balloon" => Some(l(&k.balloon_storm.reached)),
            "virtio-mem" => Some(l(&k.mem_storm.reached)),
            _ => None,
        })
        .collect();
    Progress {
        passes: guest_headers(ctx).iter().map(|h| h.passes).min(),
        targets: targets.into_iter().min(),
        ops: ops.into_iter().min(),
    }
}

/// What the controller thread hands back.
struct Controlled {
    scenarios: Vec<String>,
    /// The work done when the scenarios ended.
    least: Progress,
    hung_threads: Vec<String>,
    kvm_delta: BTreeMap<String, f64>,
    headers: Vec<StressHeader>,
    ran_for: Duration,
    ctx: Arc<Ctx>,
    /// The VM ended before the scenarios' deadline.
    vm_ended_early: bool,
    /// Notifier stats after every scenario thread finished (or was given up on).
    kinds: Vec<notifier::KindStats>,
    subscribers: Vec<notifier::SubscriberStats>,
    planted_fired: u64,
}

/// How long scenario threads get to finish after the deadline before they count as hung.
const JOIN_GRACE: Duration = Duration::from_secs(5);
/// How long the VMM gets to stop after the scenarios ended before it counts as hung.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// A device reader whose last read completed longer ago than this at the end is hung.
const READER_STALL: Duration = Duration::from_secs(3);

/// The scenario threads that touch guest RAM by its host addresses (raw `munmap`, `mremap`,
/// `mprotect`, `madvise` and stores: the table and the notifier fail cleanly once the VM is gone,
/// raw system calls would hit whatever was mapped there next). The VM's `before_teardown` hook
/// closes the gate and waits for every such thread to leave before guest RAM is unmapped; a
/// thread that would start after that does not.
#[derive(Default)]
struct RamUsers {
    /// (threads inside, closed)
    state: Mutex<(usize, bool)>,
    left: std::sync::Condvar,
}

impl RamUsers {
    /// Counts the caller in, unless the VM has ended.
    fn enter(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 {
            return false;
        }
        s.0 += 1;
        true
    }

    fn leave(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        self.left.notify_all();
    }

    /// Closes the gate and waits (at most `timeout`) until every thread inside left; false if
    /// some did not.
    fn close_and_wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = true;
        while s.0 > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.left.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

/// Leaves [`RamUsers`] when dropped (a scenario that panics leaves too).
struct RamUse(Arc<RamUsers>);

impl Drop for RamUse {
    fn drop(&mut self) {
        self.0.leave();
    }
}

fn controller(
    vm: Arc<VmControl>,
    opts: StressOptions,
    vm_ended: Arc<AtomicBool>,
    ram_users: Arc<RamUsers>,
    tx: std::sync::mpsc::Sender<Controlled>,
) {
    let started = Instant::now();
    let info_work: Vec<GpaRange>;
    let layouts: Vec<StressLayout>;
    let mut balloon_slice = Vec::new();
    let all_vcpus: u64;
    {
        // The work ranges are those the boot path gave the guest: recompute them the same way
        // from the boot info in guest RAM (at BOOT_INFO_GPA).
        let mut b = vec![0u8; std::mem::size_of::<guest_abi::BootInfo>()];
        let hva =
            vm.guest_mmu().host_range(guest_abi::BOOT_INFO_GPA, b.len() as u64).expect("boot info in RAM");
        assert!(peek(hva, &mut b), "boot info readable");
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        // BootInfo: magic, abi, nr_vcpus, workload, flags, seed, idt, nr_work, work[8] (2 words each).
        let nr_work = w(7) as usize;
        info_work = (0..nr_work.min(guest_abi::MAX_RANGES))
            .map(|i| GpaRange { start: w(8 + 2 * i), end: w(9 + 2 * i) })
            .collect();
        // The verifiers are vCPUs 0..opts.vcpus; the drivers come after them.
        let (nr_vcpus, flags) = (w(2), w(4));
        all_vcpus = nr_vcpus;
        layouts = (0..u64::from(opts.vcpus)).map(|v| stress_layout(&info_work, nr_vcpus, v)).collect();
        if let Some(v) = (0..nr_vcpus).find(|&v| stress_role(flags, nr_vcpus, v) == StressRole::BalloonDriver)
        {
            slice_pages(&info_work, nr_vcpus, v, |gpa| balloon_slice.push(gpa));
        }
    }
    // Every vCPU thread runs before any scenario does: a thread maps its signal stack when it
    // first runs, possibly into a hole of guest RAM (see `Ctx::wait_for_go`). Bounded: a VM that
    // cannot start its vCPUs ends, and the judge reports it.
    let until = Instant::now() + Duration::from_secs(10);
    while (vm.vcpus_running() as u64) < all_vcpus
        && !vm_ended.load(Ordering::Relaxed)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut runs = Vec::new();
    for (vcpu, l) in layouts.iter().enumerate() {
        l.data_runs(&info_work, |first_index, r| {
            // Split at RAM region boundaries (the host ranges are contiguous per region).
            let mut gpa = r.start;
            while gpa < r.end {
                let region = vm.ram_regions().iter().find(|(g, _, len)| *g <= gpa && gpa < g + *len as u64);
                let Some(&(g, hva, len)) = region else { break };
                let end = r.end.min(g + len as u64);
                runs.push(Run {
                    vcpu,
                    first_index: first_index + (gpa - r.start) / PAGE_SIZE,
                    gpa,
                    len: end - gpa,
                    hva: hva + (gpa - g) as usize,
                });
                gpa = end;
            }
        });
    }
    let granule = if opts.backend == MemoryBackend::Hugetlb { HUGE_PAGE_SIZE } else { PAGE_SIZE };
    // Attack only whole granules inside each run.
    let runs: Vec<Run> = runs
        .into_iter()
        .filter_map(|r| {
            let s = r.gpa.div_ceil(granule) * granule;
            let e = (r.gpa + r.len) / granule * granule;
            (e > s).then(|| Run {
                first_index: r.first_index + (s - r.gpa) / PAGE_SIZE,
                gpa: s,
                len: e - s,
                hva: r.hva + (s - r.gpa) as usize,
                ..r
            })
        })
        .collect();
    let planted = opts.planted();
    #[cfg(feature = "fault-injection")]
    if opts.plant_stale_translations > 0 {
        vm.guest_mmu().plant_stale_translations(opts.plant_stale_translations);
    }
    let ctx = Arc::new(Ctx {
        mmu: vm.guest_mmu().clone(),
        work: info_work,
        layouts,
        runs,
        granule,
        sealed: opts.seal_guest_ram,
        seed: opts.seed,
        discard_max: (opts.discard_max as u64).max(granule),
        deadline: started + opts.duration,
        stop: AtomicBool::new(false),
        started,
        c: Counters::default(),
        first_error: Mutex::new(None),
        first_stale_discard: Mutex::new(None),
        first_stale_device: Mutex::new(None),
        plant_after: planted.skip_end_after,
        balloon: vm
            .balloon()
            .cloned()
            .filter(|_| opts.balloon && !balloon_slice.is_empty())
            .map(|device| BalloonPool { device, slice: balloon_slice }),
        virtio_mem: vm.virtio_mem().cloned().filter(|_| opts.virtio_mem),
        vm_ended,
        plant_dirty_after: planted.dirty_discarded_after,
        planted_corruptions: AtomicU64::new(0),
        go: Default::default(),
    });
    let kvm_before = vm.stats().get("kvm").cloned().unwrap_or_default();

    type Scenario = fn(&Ctx, ChaCha8Rng);
    let mut chosen: Vec<(&str, Scenario)> = vec![("device-reader", device_reader)];
    if opts.discard {
        chosen.push(("discard", discard_storm));
    }
    if opts.external_chaos {
        chosen.push(("external-chaos", external_chaos));
    }
    if opts.mprotect {
        chosen.push(("mprotect", mprotect_phases));
    }
    if planted.corrupt_verifier_word {
        chosen.push(("corrupt-verifier", corrupt_verifier));
    }
    if ctx.runs.is_empty() {
        chosen.clear();
    }
    // The device storms drive their own vCPUs' memory, not the verifiers' data pages.
    if ctx.balloon.is_some() {
        chosen.push(("balloon", balloon_storm));
    }
    if ctx.virtio_mem.is_some() {
        chosen.push(("virtio-mem", virtio_mem_storm));
    }
    let (done_tx, done_rx) = channel::<usize>();
    let mut names = Vec::new();
    let mut running = 0;
    for (i, (name, f)) in chosen.iter().enumerate() {
        let (thread_ctx, thread_done) = (ctx.clone(), done_tx.clone());
        let f = *f;
        // Each scenario's RNG: the seed mixed with the scenario's number (reproducible).
        let rng =
            ChaCha8Rng::seed_from_u64(opts.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)));
        names.push(name.to_string());
        if !ram_users.enter() {
            // The VM ended already: no scenario starts over guest RAM that is going away.
            let _ = done_tx.send(i);
            continue;
        }
        let ram_use = RamUse(ram_users.clone());
        let spawned = std::thread::Builder::new().name(format!("stress-{name}")).spawn(move || {
            let _ram_use = ram_use;
            thread_ctx.wait_for_go();
            f(&thread_ctx, rng);
            let _ = thread_done.send(i);
        });
        match spawned {
            Ok(_) => running += 1,
            Err(_) => {
                // `spawn` dropped the closure, and with it `ram_use`.
                ctx.note_error(format!("cannot spawn the {name} thread"));
                let _ = done_tx.send(i);
            }
        }
    }
    drop(done_tx);
    // Every thread runs (and so has its signal stack: see `Ctx::wait_for_go`): the scenarios may
    // begin.
    ctx.go(running);

    // Progress: a bar on a terminal, nothing otherwise.
    let bar = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(opts.duration.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut finished = vec![false; names.len()];
    let mut last_inv = (Instant::now(), 0u64);
    while Instant::now() < ctx.deadline && !ctx.vm_ended.load(Ordering::Relaxed) {
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(i) => {
                finished[i] = true;
                // A scenario that gave up before the end does no more work: waiting for the
                // goal until the deadline would only delay the verdict.
                if opts.work.is_some() {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let write_faults = vm.external_teardowns().protect_faults;
        if opts.work.is_some_and(|goal| progress(&ctx, &names, write_faults).covers(&goal)) {
            break;
        }
        if let Some(bar) = &bar {
            let inv = invalidations(&ctx.space().stats().kinds);
            let rate = (inv - last_inv.1) as f64 / last_inv.0.elapsed().as_secs_f64().max(1e-3);
            last_inv = (Instant::now(), inv);
            let passes: u64 = guest_headers(&ctx).iter().map(|h| h.passes).sum();
            bar.set_position(started.elapsed().as_millis() as u64);
            let mut msg = format!("passes {passes}, invalidations {inv} ({rate:.0}/s)");
            let storm =
                |c: &StormCounters| (c.reached.load(Ordering::Relaxed), c.targets.load(Ordering::Relaxed));
            if ctx.balloon.is_some() {
                let (reached, targets) = storm(&ctx.c.balloon_storm);
                msg.push_str(&format!(", balloon targets {reached}/{targets}"));
            }
            if ctx.virtio_mem.is_some() {
                let (reached, targets) = storm(&ctx.c.mem_storm);
                msg.push_str(&format!(", virtio-mem sizes {reached}/{targets}"));
            }
            bar.set_message(msg);
        }
    }
    ctx.stop.store(true, Ordering::SeqCst);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let ran_for = started.elapsed();
    let join_deadline = Instant::now() + JOIN_GRACE;
    while finished.iter().any(|f| !f) {
        match done_rx.recv_timeout(join_deadline.saturating_duration_since(Instant::now())) {
            Ok(i) => finished[i] = true,
            Err(_) => break,
        }
    }
    let hung_threads: Vec<String> =
        names.iter().zip(&finished).filter(|(_, f)| !**f).map(|(n, _)| n.clone()).collect();
    // Everything the scenarios began has ended, or never will: the monitor may still be turning
    // the last external events into notifications, so wait (bounded) for the counters to settle.
    let settle = Instant::now() + Duration::from_secs(2);
    let mut stats = ctx.space().stats();
    while Instant::now() < settle
        && (stats.kinds.iter().any(|k| k.starts != k.ends)
            || stats.subscribers.iter().any(|s| s.starts + s.joined != s.ends))
    {
        std::thread::sleep(Duration::from_millis(10));
        stats = ctx.space().stats();
    }
    let headers = guest_headers(&ctx);
    let kvm_after = vm.stats().get("kvm").cloned().unwrap_or_default();
    let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &kvm_before, &mut before);
    flatten("", &kvm_after, &mut after);
    let kvm_delta = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect();
    let planted_fired = ctx.space().planted_faults_fired() + ctx.planted_corruptions.load(Ordering::Relaxed);
    let least = progress(&ctx, &names, vm.external_teardowns().protect_faults);
    vm.quit();
    let _ = tx.send(Controlled {
        scenarios: names.into_iter().filter(|n| n != "device-reader" && n != "corrupt-verifier").collect(),
        least,
        hung_threads,
        kvm_delta,
        headers,
        ran_for,
        vm_ended_early: ctx.vm_ended.load(Ordering::SeqCst),
        ctx,
        kinds: stats.kinds,
        subscribers: stats.subscribers,
        planted_fired,
    });
}

/// Runs `zapvm stress` and returns its report (`Err` when nothing can run: no scenario, bad
/// options, or a VM that cannot start at all).
///
/// The balloon storm is not run on hugetlb RAM (a note says so): the guest's driver balloons
/// and reports single 4 KiB pages, which hugetlb memory cannot discard.
pub fn run(opts: &StressOptions) -> Result<StressReport, String> {
    let mut notes = Vec::new();
    let mut opts = opts.clone();
    if opts.balloon && opts.backend == MemoryBackend::Hugetlb {
        notes.push(
            "balloon: not run on hugetlb RAM (the guest's driver balloons and reports single 4 KiB \
             pages, which hugetlb memory cannot discard)"
                .to_string(),
        );
        opts.balloon = false;
    }
    if opts.mprotect && opts.seal_guest_ram {
        notes.push(
            "mprotect: not run with --seal-guest-ram (sealed guest RAM cannot be re-protected: the \
             notifier refuses the VMM's protect operations before any syscall, and the kernel would \
             refuse the mprotect)"
                .to_string(),
        );
        opts.mprotect = false;
    }
    let opts = &opts;
    if !(opts.discard || opts.external_chaos || opts.mprotect || opts.balloon || opts.virtio_mem) {
        return Err(format!(
            "no scenario selected: choose --discard, --external-chaos, --mprotect, --balloon, --virtio-mem \
             or --all{}",
            notes.iter().map(|n| format!(" ({n})")).collect::<String>()
        ));
    }
    if opts.vcpus == 0 {
        return Err("--vcpus must be at least 1 (the stress verifiers)".into());
    }
    if opts.virtio_mem
        && (opts.virtio_mem_region == 0 || !opts.virtio_mem_region.is_multiple_of(HUGE_PAGE_SIZE))
    {
        return Err(format!(
            "--virtio-mem-region {} must be a positive multiple of 2 MiB (the device's block size)",
            opts.virtio_mem_region
        ));
    }
    if opts.external_chaos {
        keep_allocations_off_mmap();
    }
    let extra_flags = if opts.balloon { guest_abi::FLAG_STRESS_BALLOON } else { 0 }
        | if opts.virtio_mem { guest_abi::FLAG_STRESS_VIRTIO_MEM } else { 0 };
    let vcpus = opts.vcpus + u32::from(opts.balloon) + u32::from(opts.virtio_mem);
    let vm_ended = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel::<Controlled>();
    let tx = Mutex::new(Some(tx));
    let ram_users = Arc::new(RamUsers::default());
    let (hook_opts, hook_ended, hook_users) = (opts.clone(), vm_ended.clone(), ram_users.clone());
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (vm, opts, ended, users) =
            (vm.clone(), hook_opts.clone(), hook_ended.clone(), hook_users.clone());
        if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::thread::Builder::new()
                .name("stress-controller".into())
                .spawn(move || controller(vm, opts, ended, users, tx))
                .expect("spawning the stress controller");
        }
    });
    // Before guest RAM is unmapped (however the VM ended): the scenarios stop touching it.
    let (end_flag, end_users) = (vm_ended.clone(), ram_users.clone());
    let before_teardown = Arc::new(move |_: &Arc<VmControl>| {
        end_flag.store(true, Ordering::SeqCst);
        if !end_users.close_and_wait(JOIN_GRACE + STOP_GRACE) {
            tracing::error!("stress: scenario threads still run as guest RAM goes away");
        }
    });
    let config = VmConfig {
        kvm_device: opts.kvm_device.clone(),
        memory: MemoryConfig { size: opts.mem, backend: opts.backend, thp: opts.thp },
        vcpus,
        // A backstop only: the controller quits the VM; the watchdog below judges hangs.
        timeout: Some(opts.duration + JOIN_GRACE + STOP_GRACE + Duration::from_secs(30)),
        console: Console::Null,
        monitor: true,
        teardown_policy: vmm::teardown::TeardownPolicy::Reback,
        seal_guest_ram: opts.seal_guest_ram,
        #[cfg(feature = "fault-injection")]
        plant_skip_mseal: opts.plant_skip_mseal,
        after_start: Some(hook),
        before_teardown: Some(before_teardown),
        balloon: opts.balloon.then(BalloonConfig::default),
        virtio_mem: opts
            .virtio_mem
            .then_some(VirtioMemSpec { region_size: opts.virtio_mem_region, requested_size: 0 }),
        ..VmConfig::test_guest(TestGuestParams {
            seed: opts.seed,
            extra_flags,
            ..TestGuestParams::new(Workload::Stress)
        })
    };
    // The VM runs on its own thread, so that a VMM that never stops cannot hang the harness.
    let (vm_tx, vm_rx) = channel::<Result<RunReport, machine::Error>>();
    std::thread::Builder::new()
        .name("stress-vmm".into())
        .spawn(move || {
            let _ = vm_tx.send(machine::run(&config));
        })
        .map_err(|e| format!("cannot spawn the VMM thread: {e}"))?;
    let started = Instant::now();
    let wait = opts.duration + JOIN_GRACE + Duration::from_secs(60);
    // The controller reports when the scenarios are over; the VM may also end before (a failure).
    let controlled = wait_either(&rx, &vm_rx, started + wait);
    let (controlled, early) = match controlled {
        Either::Controlled(c) => (Some(c), None),
        Either::Vm(r) => {
            vm_ended.store(true, Ordering::SeqCst);
            (None, Some(r))
        }
        Either::Neither => (None, None),
    };
    let report = match early {
        Some(r) => Some(r.map_err(|e| e.to_string())?),
        None => match vm_rx.recv_timeout(STOP_GRACE) {
            Ok(r) => Some(r.map_err(|e| e.to_string())?),
            Err(_) => None,
        },
    };
    // If the VM ended first (a failure), the controller still reports once its deadline passes.
    let controlled = match controlled {
        Some(c) => Some(c),
        None => rx.recv_timeout(opts.duration.saturating_sub(started.elapsed()) + JOIN_GRACE * 2).ok(),
    };
    Ok(judge(opts, notes, controlled, report))
}

/// Makes the allocator serve blocks up to 32 MiB (glibc's ceiling for the threshold) from its
/// heaps instead of fresh `mmap`s, for the rest of the process.
///
/// The external chaos unmaps guest RAM behind the VMM's back, and until the teardown guard
/// re-backs it the kernel may place any new mapping of the process in that hole: a large `Vec`
/// the VMM allocates meanwhile (the notifier's region list, say) is then unmapped by the next blow
/// (a crash), or makes the guard refuse to re-back over memory it did not map (the VM stops). A
/// VMM attacked by another process would not face its own allocations there; this harness does
/// the attacking in-process, so it keeps its own allocations out of the way.
fn keep_allocations_off_mmap() {
    // SAFETY: mallopt only changes glibc malloc's tuning; it is thread-safe and any value is
    // accepted or refused with a return of 0.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) } == 0 {
        tracing::warn!("mallopt(M_MMAP_THRESHOLD) refused: large allocations may land in guest RAM holes");
    }
}

/// What [`wait_either`] got first. The VM's report is the big variant; one value lives for a
/// moment per run, so it is not boxed.
#[allow(clippy::large_enum_variant)]
enum Either {
    Controlled(Controlled),
    Vm(Result<RunReport, machine::Error>),
    Neither,
}

fn wait_either(
    rx: &Receiver<Controlled>,
    vm_rx: &Receiver<Result<RunReport, machine::Error>>,
    until: Instant,
) -> Either {
    while Instant::now() < until {
        if let Ok(c) = rx.recv_timeout(Duration::from_millis(100)) {
            return Either::Controlled(c);
        }
        if let Ok(r) = vm_rx.try_recv() {
            return Either::Vm(r);
        }
    }
    Either::Neither
}

/// Checks the invariants and builds the report.
fn judge(
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

/// What `zapvm stress` was asked for on the command line, before [`cli`] applies the defaults
/// (a fixed amount of work when neither a duration nor a work goal is given). The `zapvm`
/// command's arguments convert to it; each field is the option of the same name.
#[derive(Clone, Debug)]
pub struct StressRequest {
    /// Verifier vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// THP for guest RAM.
    pub thp: bool,
    /// Host backing of guest RAM.
    pub mem_backend: MemoryBackend,
    /// How long the scenarios run; with a work goal, the deadline for it.
    pub duration: Option<Duration>,
    /// Passes every verifier completes.
    pub passes: Option<u64>,
    /// Targets each device storm reaches.
    pub targets: Option<u64>,
    /// Operations each host scenario does.
    pub ops: Option<u64>,
    /// Seed of the guest's pattern and of every scenario's RNG.
    pub seed: u64,
    /// Discard storm through the notifier.
    pub discard: bool,
    /// Largest discard range in bytes.
    pub discard_max: u64,
    /// External madvise/munmap/mremap chaos.
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    pub mprotect: bool,
    /// Balloon storm.
    pub balloon: bool,
    /// virtio-mem plug/unplug storm.
    pub virtio_mem: bool,
    /// Bytes of the virtio-mem device's hot-pluggable region.
    pub virtio_mem_region: u64,
    /// Every scenario at once (also when no scenario is named).
    pub all: bool,
    /// Seal guest RAM with `mseal(2)`.
    pub seal_guest_ram: bool,
    /// Where the JSON summary goes instead of standard output.
    pub json_out: Option<PathBuf>,
    /// The KVM device.
    pub kvm_device: PathBuf,
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

/// What `zapvm stress` does when given neither `--duration` nor a work goal.
const DEFAULT_WORK: Work = Work { passes: 2, targets: 3, ops: 5 };
/// How long `zapvm stress` runs without a work goal.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The deadline of `zapvm stress --passes/--targets/--ops` unless `--duration` says otherwise.
const DEFAULT_WORK_DEADLINE: Duration = Duration::from_secs(600);

/// Parses `10s`, `2m`, `500ms`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs `zapvm stress`: the JSON summary goes to standard output (or `--json-out`); the exit
/// status is non-zero when an invariant broke, and `Err` when nothing could run.
pub fn cli(args: StressRequest) -> Result<std::process::ExitCode, String> {
    let asked = args.passes.is_some() || args.targets.is_some() || args.ops.is_some();
    let work = if asked {
        Some(Work {
            passes: args.passes.unwrap_or(0),
            targets: args.targets.unwrap_or(0),
            ops: args.ops.unwrap_or(0),
        })
    } else if args.duration.is_none() {
        // Neither a time nor an amount of work: a fixed amount of work, so that a slow host runs
        // longer instead of reporting starved verifiers.
        Some(DEFAULT_WORK)
    } else {
        None
    };
    let default_duration = if work.is_some() { DEFAULT_WORK_DEADLINE } else { DEFAULT_DURATION };
    let mut opts = StressOptions {
        kvm_device: args.kvm_device,
        vcpus: args.vcpus,
        mem: args.mem,
        thp: args.thp,
        backend: args.mem_backend,
        duration: args.duration.unwrap_or(default_duration),
        work,
        seed: args.seed,
        discard: args.discard,
        seal_guest_ram: args.seal_guest_ram,
        external_chaos: args.external_chaos,
        mprotect: args.mprotect,
        balloon: args.balloon,
        virtio_mem: args.virtio_mem,
        virtio_mem_region: args.virtio_mem_region,
        discard_max: args.discard_max as usize,
        progress: true,
        ..StressOptions::new()
    };
    // No scenario named: every scenario (what a user who types `zapvm stress` wants to see).
    let named = args.discard || args.external_chaos || args.mprotect || args.balloon || args.virtio_mem;
    if args.all || !named {
        opts = opts.all();
    }
    let report = run(&opts)?;
    for note in &report.notes {
        eprintln!("zapvm: note: {note}");
    }
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    match &args.json_out {
        Some(path) => {
            std::fs::write(path, json + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?
        }
        None => println!("{json}"),
    }
    for b in &report.broken {
        eprintln!("zapvm: broken invariant: {b}");
    }
    Ok(if report.ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
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

    use super::*;

    const PAGE: usize = PAGE_SIZE as usize;

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

    /// A kind of work no scenario of the run does never holds the run up; one that some
    /// scenario does must reach the goal.
    #[test]
    fn work_progress_covers_only_the_kinds_the_run_does() {
        let goal = Work { passes: 2, targets: 3, ops: 10 };
        let p = Progress { passes: Some(2), targets: None, ops: Some(10) };
        assert!(p.covers(&goal));
        assert_eq!(p.as_work(), Work { passes: 2, targets: 0, ops: 10 });
        assert!(!Progress { ops: Some(9), ..p }.covers(&goal));
        assert!(!Progress { passes: Some(1), ..p }.covers(&goal));
        assert!(!Progress { targets: Some(2), ..p }.covers(&goal));
    }

    /// The permissions (`rw-p`, ...) of every mapping of this process overlapping `[start, end)`.
    fn permissions(start: usize, end: usize) -> Vec<(usize, usize, String)> {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
        maps.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (a, b) = fields.next()?.split_once('-')?;
                let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
                (a < end && start < b)
                    .then(|| (a.max(start), b.min(end), fields.next().unwrap_or("").to_string()))
            })
            .collect()
    }

    /// A restore racing an external unmap the notifier has not processed yet: `mprotect` of the
    /// whole range fails with `ENOMEM` at the hole, having changed at most what lies before it.
    /// Every page the kernel still maps must be writable afterwards (a page left read-only is a
    /// verifier stuck forever on its write fault).
    #[test]
    fn restore_leaves_no_mapped_page_read_only_around_a_hole_the_notifier_has_not_seen() {
        for hole_page in [0, 3] {
            let len = 8 * PAGE;
            // SAFETY: a fresh anonymous mapping at an address the kernel picks; only this test uses it.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let base = base as usize;
            let spec = notifier::RegionSpec {
                host_addr: base,
                len,
                backing: notifier::Backing::PrivateAnon,
                thp: false,
            };
            // SAFETY: the mapping is this test's alone and is touched only through syscalls.
            let space = unsafe { notifier::AddressSpace::new(&[spec]) }.expect("address space");
            space.protect(base, len, libc::PROT_READ).expect("read-only");
            let hole = base + hole_page * PAGE;
            // SAFETY: one page of this test's mapping; no monitor runs, so the notifier never
            // hears of it (as before the monitor's worker gets to the event).
            assert_eq!(unsafe { libc::munmap(hole as *mut libc::c_void, PAGE) }, 0);

            let restored = restore_writable(&space, base, len, Instant::now() + Duration::from_secs(2));

            let maps = permissions(base, base + len);
            assert_eq!(maps.iter().map(|(a, b, _)| b - a).sum::<usize>(), 7 * PAGE, "{maps:x?}");
            assert!(restored.is_ok(), "hole at page {hole_page}: {restored:?}");
            for (a, b, perms) in &maps {
                assert!(perms.starts_with("rw"), "hole at page {hole_page}: [{a:#x}, {b:#x}) is {perms}");
            }
            drop(space);
            // SAFETY: the rest of the test's mapping (munmap skips the hole).
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}
