//! `zapvm stress`: the memory layer under sustained, seeded, concurrent teardowns.
//!
//! The test guest runs [`Workload::Stress`] on every vCPU: each data page of its slice holds a
//! known generation of a pattern (or zeros, which is what discards and re-backs leave), and the
//! guest verifies and rewrites every page forever. Meanwhile the host runs the scenarios the
//! options select, each on its own thread with its own RNG derived from the seed, each bounded by
//! the duration:
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
//! - a **device-path reader** (always): random data pages read through the VMM's table, each word
//!   checked against the generations the metadata allows.
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

use guest_abi::{stress_layout, stress_pattern, GpaRange, StressHeader, StressLayout, Workload, PAGE_SIZE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::boot::test_guest::TestGuestParams;
use crate::machine::{self, Console, RunReport, VmConfig, VmControl, VmOutcome};
use crate::memory::{MemoryBackend, MemoryConfig, HUGE_PAGE_SIZE};
use crate::mmu::{AccessError, GuestMemoryAccess, GuestMmu};

/// What `zapvm stress` runs.
#[derive(Clone, Debug)]
pub struct StressOptions {
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// vCPUs running the stress workload.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// THP for guest RAM.
    pub thp: bool,
    /// Host backing of guest RAM.
    pub backend: MemoryBackend,
    /// How long the scenarios run.
    pub duration: Duration,
    /// Seed of the guest's pattern and of every scenario's RNG.
    pub seed: u64,
    /// Discard storm through the notifier.
    pub discard: bool,
    /// External madvise/munmap/mremap chaos.
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    pub mprotect: bool,
    /// Balloon storm (requested; see [`run`] for what this build does with it).
    pub balloon: bool,
    /// virtio-mem plug/unplug storm (requested; not available in this build).
    pub virtio_mem: bool,
    /// Largest discard range in bytes (4 KiB .. 2 MiB by default; 4 KiB for an invalidation-rate
    /// run).
    pub discard_max: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// **Fault injection for the stress test only**: after this long, the next teardown skips its
    /// `invalidate_range_end` (`notifier::AddressSpace::plant_fault_skip_next_end`).
    #[doc(hidden)]
    pub plant_skip_end_after: Option<Duration>,
}

impl StressOptions {
    /// Defaults: 2 vCPUs, 256 MiB anonymous RAM, 10 s, no scenario selected.
    pub fn new() -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            vcpus: 2,
            mem: 256 << 20,
            thp: false,
            backend: MemoryBackend::Anonymous,
            duration: Duration::from_secs(10),
            seed: 0x5eed,
            discard: false,
            external_chaos: false,
            mprotect: false,
            balloon: false,
            virtio_mem: false,
            discard_max: HUGE_PAGE_SIZE as usize,
            progress: false,
            plant_skip_end_after: None,
        }
    }

    /// Every scenario this build can run.
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
    /// Calls that failed (the range was a hole not yet re-backed, or spanned two mappings).
    pub failed: u64,
    /// Bytes torn down.
    pub bytes: u64,
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
    /// Seed.
    pub seed: u64,
    /// Seconds the scenarios ran.
    pub duration_s: f64,
    /// vCPUs.
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
    /// Device-path reader.
    pub device: DeviceReport,
    /// Notifier starts/ends per kind and origin.
    pub notifier: Vec<notifier::KindStats>,
    /// Per subscriber.
    pub subscribers: Vec<notifier::SubscriberStats>,
    /// The VMM's table.
    pub table: Option<crate::mmu::MmuStats>,
    /// KVM statistics: end minus start (numeric leaves that changed).
    pub kvm_delta: BTreeMap<String, f64>,
    /// External teardowns and write protections, from the teardown guard.
    pub external_teardowns: Option<crate::teardown::TeardownReport>,
    /// Planted faults that fired (fault-injection runs only).
    pub planted_faults_fired: u64,
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
    seed: u64,
    discard_max: u64,
    deadline: Instant,
    stop: AtomicBool,
    started: Instant,
    c: Counters,
    first_error: Mutex<Option<String>>,
    first_stale_discard: Mutex<Option<String>>,
    first_stale_device: Mutex<Option<String>>,
    plant_after: Option<Duration>,
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
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn space(&self) -> &Arc<notifier::AddressSpace> {
        self.mmu.space()
    }

    /// A random attack range inside one run: (run, gpa, len), aligned to the granule.
    fn pick(&self, rng: &mut ChaCha8Rng, max: u64) -> (Run, u64, u64) {
        let total: u64 = self.runs.iter().map(|r| r.len / self.granule).sum();
        let mut k = rng.gen_range(0..total);
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
        let units = match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(1..=max_units.min(16)),
            _ => rng.gen_range(1..=max_units),
        }
        .min(run.len / self.granule);
        let start_unit = rng.gen_range(0..=(run.len / self.granule - units));
        (run, run.gpa + start_unit * self.granule, units * self.granule)
    }

    fn hva(&self, run: &Run, gpa: u64) -> usize {
        run.hva + (gpa - run.gpa) as usize
    }

    /// Splits host range `[start, start + len)` along the notifier's current regions (external
    /// teardowns and re-backs split them), skipping what is not mapped right now.
    fn pieces(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        let end = start + len;
        self.space()
            .regions()
            .iter()
            .filter(|r| r.start < end && start < r.end)
            .map(|r| (r.start.max(start), r.end.min(end)))
            .map(|(s, e)| (s, e - s))
            .collect()
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

    fn maybe_plant(&self, planted: &mut bool) {
        if let Some(after) = self.plant_after {
            if !*planted && self.started.elapsed() >= after {
                self.space().plant_fault_skip_next_end();
                *planted = true;
            }
        }
    }
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
        let samples: Vec<u64> = (0..pages.min(4)).map(|_| rng.gen_range(0..pages)).collect();
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
        match rng.gen_range(0..3) {
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
                } else {
                    bump(&c.chaos_failed, 1);
                }
            }
            _ => {
                // SAFETY: moves guest RAM (data pages) onto this thread's scratch reservation,
                // replacing only it (MREMAP_FIXED); as for munmap, the VMM survives the hole left
                // behind.
                let moved =
                    unsafe { libc::mremap(p, l, l, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, scratch) };
                if moved == scratch {
                    bump(&c.chaos_mremap, 1);
                    bump(&c.chaos_bytes, len);
                } else {
                    bump(&c.chaos_failed, 1);
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
        }
        // Let the guard re-back before the next blow (bounded: at most a few ms per operation).
        std::thread::sleep(Duration::from_micros(rng.gen_range(200..3000)));
    }
    // SAFETY: the reservation (and whatever was moved into it) is this thread's alone.
    unsafe { libc::munmap(base, reserve) };
}

/// mprotect phases: read-only for a while, then read-write again, through the notifier.
fn mprotect_phases(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut planted = false;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        sleep_until_or(ctx, Duration::from_millis(rng.gen_range(20..120)));
        if !ctx.running() {
            break;
        }
        let mut ranges = Vec::new();
        for _ in 0..rng.gen_range(1..=4) {
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
        sleep_until_or(ctx, Duration::from_millis(rng.gen_range(50..300)));
        for (s, l) in ranges {
            restore(ctx, s, l);
        }
    }
}

/// Makes `[s, s + l)` writable again, retrying while an external hole makes part of it unmapped
/// for a moment (a re-backed hole is writable anyway).
fn restore(ctx: &Ctx, s: usize, l: usize) {
    let c = &ctx.c;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut failure = None;
        for (ps, pl) in ctx.pieces(s, l) {
            if let Err(e) = ctx.space().protect(ps, pl, libc::PROT_READ | libc::PROT_WRITE) {
                // A piece the kernel no longer maps (an external unmap the notifier has not
                // processed yet) needs no restore: the teardown guard re-backs it read-write.
                let mapped = crate::teardown::host_mappings(ps, ps + pl)
                    .map(|m| m.iter().map(|(a, b)| b - a).sum::<usize>() == pl)
                    .unwrap_or(true);
                if mapped {
                    failure = Some(format!("{ps:#x}+{pl:#x}: {e}"));
                }
            }
        }
        let Some(failure) = failure else { return };
        if Instant::now() >= deadline {
            bump(&c.prot_restore_failures, 1);
            ctx.note_error(format!("cannot make {s:#x}+{l:#x} writable again ({failure})"));
            return;
        }
        bump(&c.prot_restore_retries, 1);
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

/// Reads `buf.len()` bytes of this process at `hva` without the VMM's table (monitoring only).
fn peek(hva: usize, buf: &mut [u8]) -> bool {
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

/// What the controller thread hands back.
struct Controlled {
    scenarios: Vec<String>,
    hung_threads: Vec<String>,
    kvm_delta: BTreeMap<String, f64>,
    headers: Vec<StressHeader>,
    ran_for: Duration,
    ctx: Arc<Ctx>,
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

fn controller(vm: Arc<VmControl>, opts: StressOptions, tx: std::sync::mpsc::Sender<Controlled>) {
    let started = Instant::now();
    let info_work: Vec<GpaRange>;
    let layouts: Vec<StressLayout>;
    {
        // The work ranges are those the boot path gave the guest: recompute them the same way
        // from the boot info in guest RAM (at BOOT_INFO_GPA).
        let mut b = vec![0u8; std::mem::size_of::<guest_abi::BootInfo>()];
        let hva = vm.mmu.host_range(guest_abi::BOOT_INFO_GPA, b.len() as u64).expect("boot info in RAM");
        assert!(peek(hva, &mut b), "boot info readable");
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
        // BootInfo: magic, abi, nr_vcpus, workload, flags, seed, idt, nr_work, work[8] (2 words each).
        let nr_work = w(7) as usize;
        info_work = (0..nr_work.min(guest_abi::MAX_RANGES))
            .map(|i| GpaRange { start: w(8 + 2 * i), end: w(9 + 2 * i) })
            .collect();
        layouts = (0..u64::from(opts.vcpus)).map(|v| stress_layout(&info_work, w(2), v)).collect();
    }
    let mut runs = Vec::new();
    for (vcpu, l) in layouts.iter().enumerate() {
        l.data_runs(&info_work, |first_index, r| {
            // Split at RAM region boundaries (the host ranges are contiguous per region).
            let mut gpa = r.start;
            while gpa < r.end {
                let region = vm.regions.iter().find(|(g, _, len)| *g <= gpa && gpa < g + *len as u64);
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
    let ctx = Arc::new(Ctx {
        mmu: vm.mmu.clone(),
        work: info_work,
        layouts,
        runs,
        granule,
        seed: opts.seed,
        discard_max: (opts.discard_max as u64).max(granule),
        deadline: started + opts.duration,
        stop: AtomicBool::new(false),
        started,
        c: Counters::default(),
        first_error: Mutex::new(None),
        first_stale_discard: Mutex::new(None),
        first_stale_device: Mutex::new(None),
        plant_after: opts.plant_skip_end_after,
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
    let (done_tx, done_rx) = channel::<usize>();
    let mut names = Vec::new();
    if ctx.runs.is_empty() {
        chosen.clear();
    }
    for (i, (name, f)) in chosen.iter().enumerate() {
        let (thread_ctx, thread_done) = (ctx.clone(), done_tx.clone());
        let f = *f;
        // Each scenario's RNG: the seed mixed with the scenario's number (reproducible).
        let rng =
            ChaCha8Rng::seed_from_u64(opts.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)));
        names.push(name.to_string());
        let spawned = std::thread::Builder::new().name(format!("stress-{name}")).spawn(move || {
            f(&thread_ctx, rng);
            let _ = thread_done.send(i);
        });
        if spawned.is_err() {
            ctx.note_error(format!("cannot spawn the {name} thread"));
            let _ = done_tx.send(i);
        }
    }
    drop(done_tx);

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
    while Instant::now() < ctx.deadline {
        match done_rx.recv_timeout(Duration::from_millis(250)) {
            Ok(i) => finished[i] = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if let Some(bar) = &bar {
            let inv = invalidations(&ctx.space().stats().kinds);
            let rate = (inv - last_inv.1) as f64 / last_inv.0.elapsed().as_secs_f64().max(1e-3);
            last_inv = (Instant::now(), inv);
            let passes: u64 = guest_headers(&ctx).iter().map(|h| h.passes).sum();
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("passes {passes}, invalidations {inv} ({rate:.0}/s)"));
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
    let planted_fired = ctx.space().planted_faults_fired();
    vm.quit();
    let _ = tx.send(Controlled {
        scenarios: names.into_iter().filter(|n| n != "device-reader").collect(),
        hung_threads,
        kvm_delta,
        headers,
        ran_for,
        ctx,
        kinds: stats.kinds,
        subscribers: stats.subscribers,
        planted_fired,
    });
}

/// Runs `zapvm stress` and returns its report (`Err` only when the VM cannot start at all).
///
/// `balloon`: the Stress guest does not drive the balloon (its Balloon workload is another guest
/// program, with its own verification, exercised by the balloon tests), and `virtio_mem`: the
/// device is not wired in this build. Both are reported as notes ("not available in this build");
/// a run that asked only for them has nothing to run and is an error.
pub fn run(opts: &StressOptions) -> Result<StressReport, String> {
    let mut notes = Vec::new();
    if opts.balloon {
        notes.push(
            "balloon: not available in this build (the Stress guest does not drive the balloon; the \
             Balloon workload's own verification covers it)"
                .to_string(),
        );
    }
    if opts.virtio_mem {
        notes.push("virtio-mem: not available in this build (the device is not wired yet)".to_string());
    }
    if !(opts.discard || opts.external_chaos || opts.mprotect) {
        return Err(format!("no scenario this build can run was selected ({})", notes.join("; ")));
    }
    let (tx, rx) = channel::<Controlled>();
    let tx = Mutex::new(Some(tx));
    let hook_opts = opts.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (vm, opts) = (vm.clone(), hook_opts.clone());
        if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::thread::Builder::new()
                .name("stress-controller".into())
                .spawn(move || controller(vm, opts, tx))
                .expect("spawning the stress controller");
        }
    });
    let config = VmConfig {
        kvm_device: opts.kvm_device.clone(),
        memory: MemoryConfig { size: opts.mem, backend: opts.backend, thp: opts.thp },
        vcpus: opts.vcpus,
        // A backstop only: the controller quits the VM; the watchdog below judges hangs.
        timeout: Some(opts.duration + JOIN_GRACE + STOP_GRACE + Duration::from_secs(30)),
        console: Console::Null,
        monitor: true,
        teardown_policy: crate::teardown::TeardownPolicy::Reback,
        after_start: Some(hook),
        balloon: None,
        ..VmConfig::test_guest(TestGuestParams { seed: opts.seed, ..TestGuestParams::new(Workload::Stress) })
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
        Either::Vm(r) => (None, Some(r)),
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
    match &outcome {
        None => broken.push("VMM not alive: it did not stop within the watchdog's grace (hung)".to_string()),
        Some(VmOutcome::Quit) => {}
        Some(VmOutcome::Failed { message }) => {
            broken.push(format!("VMM not alive: the VM failed: {message}"))
        }
        Some(other) => broken.push(format!("VMM not alive: the VM ended with {other:?}")),
    }
    let Some(c) = controlled else {
        broken.push("the stress controller never reported (hung)".to_string());
        return StressReport {
            ok: false,
            broken,
            notes,
            scenarios: vec![],
            seed: opts.seed,
            duration_s: 0.0,
            vcpus: opts.vcpus,
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
    // Every invalidation start matched by its end, for every kind and origin, and per subscriber.
    for kind in &c.kinds {
        if kind.starts != kind.ends {
            broken.push(format!(
                "notifier: {} {} invalidations: {} starts but {} ends",
                kind.origin, kind.kind, kind.starts, kind.ends
            ));
        }
    }
    for s in &c.subscribers {
        if s.starts + s.joined != s.ends {
            broken.push(format!(
                "subscriber {}: {} starts (+{} joined) but {} ends",
                s.name, s.starts, s.joined, s.ends
            ));
        }
    }
    let guest = GuestReport {
        passes: c.headers.iter().map(|h| h.passes).collect(),
        verified: c.headers.iter().map(|h| h.verified).sum(),
        zero_pages: c.headers.iter().map(|h| h.zero_pages).sum(),
        torn_pages: c.headers.iter().map(|h| h.torn_pages).sum(),
    };
    if let Some(v) = guest.passes.iter().position(|&p| p == 0) {
        broken.push(format!("guest vCPU {v} completed no pass"));
    }
    let last_read = Duration::from_millis(l(&k.dev_last_ms));
    let device = DeviceReport {
        reads: l(&k.dev_reads),
        stale: l(&k.dev_stale),
        first_stale: ctx.first_stale_device.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        raced: l(&k.dev_raced),
        unmapped: l(&k.dev_unmapped),
        hung: c.hung_threads.iter().any(|n| n == "device-reader")
            || c.ran_for.saturating_sub(last_read) > READER_STALL,
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
    let invalidations = invalidations(&c.kinds);
    let ok = broken.is_empty();
    StressReport {
        ok,
        broken,
        notes,
        scenarios: c.scenarios,
        seed: opts.seed,
        duration_s: c.ran_for.as_secs_f64(),
        vcpus: opts.vcpus,
        mem_bytes: opts.mem,
        backend: format!("{:?}", opts.backend).to_lowercase(),
        thp: opts.thp,
        vmm_alive,
        outcome,
        invalidations,
        invalidations_per_s: invalidations as f64 / c.ran_for.as_secs_f64().max(1e-3),
        guest,
        discard,
        external_chaos: opts.external_chaos.then(|| ChaosReport {
            madvise: l(&k.chaos_madvise),
            munmap: l(&k.chaos_munmap),
            mremap: l(&k.chaos_mremap),
            failed: l(&k.chaos_failed),
            bytes: l(&k.chaos_bytes),
        }),
        mprotect,
        device,
        notifier: c.kinds,
        subscribers: c.subscribers,
        table: report.as_ref().map(|r| r.memory_layer.table.clone()),
        kvm_delta: c.kvm_delta,
        external_teardowns: teardowns,
        planted_faults_fired: c.planted_fired,
    }
}

/// `zapvm stress` on the command line.
#[derive(clap::Args, Debug)]
pub struct StressArgs {
    /// vCPUs running the stress workload.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = crate::memory::parse_size)]
    pub mem: u64,
    /// Back guest RAM with transparent huge pages.
    #[arg(long)]
    pub thp: bool,
    /// Host backing of guest RAM.
    #[arg(long, value_enum, default_value_t = MemoryBackend::Anonymous)]
    pub mem_backend: MemoryBackend,
    /// How long the scenarios run (e.g. 10s, 2m, 500ms; plain numbers are seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the guest's pattern and of every scenario's RNG (a run is reproducible from it).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Discard storm through the notifier.
    #[arg(long)]
    pub discard: bool,
    /// Largest discard range (default 2M; 4K gives the highest invalidation rate).
    #[arg(long, default_value = "2M", value_parser = crate::memory::parse_size)]
    pub discard_max: u64,
    /// madvise/munmap/mremap of guest RAM behind the VMM's back.
    #[arg(long)]
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    #[arg(long)]
    pub mprotect: bool,
    /// Balloon storm (not available in this build).
    #[arg(long)]
    pub balloon: bool,
    /// virtio-mem plug/unplug storm (not available in this build).
    #[arg(long)]
    pub virtio_mem: bool,
    /// Every scenario at once (those not available in this build are skipped with a note).
    #[arg(long)]
    pub all: bool,
    /// Write the JSON summary here instead of standard output.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
}

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
pub fn cli(args: StressArgs) -> Result<std::process::ExitCode, String> {
    let mut opts = StressOptions {
        kvm_device: args.kvm_device,
        vcpus: args.vcpus,
        mem: args.mem,
        thp: args.thp,
        backend: args.mem_backend,
        duration: args.duration,
        seed: args.seed,
        discard: args.discard,
        external_chaos: args.external_chaos,
        mprotect: args.mprotect,
        balloon: args.balloon,
        virtio_mem: args.virtio_mem,
        discard_max: args.discard_max as usize,
        progress: true,
        plant_skip_end_after: None,
    };
    if args.all {
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
