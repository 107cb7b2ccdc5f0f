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
//!
//! The module's files, one concern each: `options.rs` (what a run is asked to do), `report.rs`
//! (what it reports), `scenarios/` (the scenario threads), `monitor.rs` (the watchdog's reads),
//! `controller.rs` (the controller thread and the watchdog's graces), `judge.rs` (the invariants
//! and the report), `cli.rs` (the command line's side); this file holds [`run`] and what every
//! scenario thread shares (`Ctx` and its counters).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::{GpaRange, StressLayout, Workload};
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use vmm::boot::test_guest::TestGuestParams;
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::machine::{
    self, BalloonDevice, Console, RunReport, VirtioMemDevice, VirtioMemSpec, VmConfig, VmControl,
};
use vmm::memory::{MemoryBackend, MemoryConfig, HUGE_PAGE_SIZE};
use vmm::mmu::{AccessError, GuestMemoryAccess, GuestMmu};

mod cli;
mod controller;
mod judge;
mod monitor;
mod options;
mod report;
mod scenarios;

pub use cli::{cli, parse_duration, StressRequest};
#[cfg(feature = "fault-injection")]
pub use options::PLANTED_WORD;
pub use options::{StressOptions, Work};
pub use report::{
    BalloonStormReport, ChaosReport, DeviceReport, DiscardAccounting, DiscardReport, GuestReport,
    ProtectReport, SealRefusals, StormSteps, StressReport, VirtioMemStormReport, WorkReport, SEED_RNG,
};

pub(crate) use judge::{
    balloon_device_invariants, notifier_invariants, unaccounted_discards, virtio_mem_device_invariants,
};
pub(crate) use monitor::peek;
pub(crate) use scenarios::pick_target;

use controller::{controller, Controlled, RamUsers, JOIN_GRACE, STOP_GRACE};
use judge::judge;
use options::Progress;

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
