//! `zapvm bench pressure`: the guest's memory touch rate while the host invalidates guest RAM.
//! Entry points: [`run`] (measure) and [`cli`] (the command: JSON, markdown table, SVG plot).
//!
//! # The guest
//! One vCPU runs [`Workload::TouchRate`]: it writes one word of every page of guest RAM's work
//! area (everything above the image and stacks), pass after pass, and counts the pages it
//! touched in a header the host reads from its side of guest RAM. The working set is therefore
//! the whole work area, touched cyclically; a page the host discarded costs the guest one write
//! fault the next time round (KVM's shadow entry was zapped by the kernel's mmu_notifier, the
//! host page was freed: KVM faults, the host allocates a zeroed page, KVM maps it again).
//!
//! # The pressure
//! A host thread (the benchmark's own) discards ranges of the chosen size through the notifier,
//! [`notifier::AddressSpace::discard`] — start, `madvise(MADV_DONTNEED)`, `invalidate_range`,
//! end, what the VMM's balloon and virtio-mem do — paced by a token bucket to the chosen MiB/s
//! (tokens accrue continuously, a discard spends its size, bursts are capped at the larger of
//! two ranges and 10 ms worth of tokens, so that a late wake-up is made up for; the bucket starts half a range full so that a slice of
//! `k` periods holds `k` discards centred in it). Ranges are aligned to their size (from the
//! start of the pressure area, itself 2 MiB aligned: a 2 MiB range is exactly one huge page)
//! and picked at random (seeded) inside the pressure area: the work area without its first
//! 2 MiB block, which holds the guest's header. The rate achieved is reported next to the
//! target: at high rates the host may not keep up (a 4 KiB discard with the userfaultfd monitor
//! registered is a monitor round trip).
//!
//! The per-page variant delivers the same pressure as one discard — one start, one 4 KiB
//! `madvise`, one `invalidate_range`, one end — per 4 KiB page of each range: what a VMM whose
//! invalidation API names single pages (Linux's removed `invalidate_page`) would have to do.
//!
//! # One point
//! A fresh VM per backing and range size (and one more for the per-page comparison):
//! THP-backed memory discarded in 4 KiB pieces refaults in 4 KiB pages, so an earlier point
//! must not decide a later one's memory. In that VM, once the guest has finished its cold pass
//! and one warm pass, each rate is measured as unpressured and pressured slices taking turns,
//! U P U P ... P U (`reps` pressured slices), every unpressured slice after a settle (the
//! guest completes two passes with no pressure, so the refaults of the slice before are over).
//! A slice's touch rate is the guest's page counter difference over the host's clock; each
//! pressured slice lasts at least four token periods (range / rate).
//!
//! Reported per point:
//! - `pressured_vs_unpressured`: the median over the reps of each pressured slice's rate over
//!   the mean rate of the unpressured slices right before and right after it (same VM, same
//!   memory, a second apart, so a drift of the machine's load hits both sides alike);
//!   `rep_ratios` has each rep's ratio, `pooled_ratio` all pressured pages/s over all
//!   unpressured pages/s;
//! - KVM statistics deltas of the pressured and of the unpressured slices (VM and vCPU stats
//!   by name, summed over reps; instant stats such as `pages_4k` give their net change);
//! - host cost: time spent in discard calls per MiB discarded;
//! - refault cost per page: the guest time lost in the pressured slices, `T_p - N_p / R_u`
//!   (their length minus the time the pages they touched take at the unpressured rate), over
//!   the 4 KiB pages refaulted, taken as the pages discarded (the guest passes over its whole
//!   working set far more often than a range is discarded, so every discarded page is written
//!   again; the count is capped at the pages the guest touched). `lost_ns_per_kvm_fault`
//!   divides by KVM's `pf_fixed` delta instead (with THP a 2 MiB refault is one fault; with
//!   4 KiB pages at high rates KVM counted fewer faults than pages discarded on this host, so
//!   both are given).
//!
//! What the lost time contains, besides the refault itself: each discard's TLB flush request
//! (KVM's mmu_notifier kicks the vCPU out of guest mode once per invalidated range, so 4 KiB
//! ranges cost a kick per page), and on a host with few cores the CPU time the pressure's own
//! threads (the discarding thread, the userfaultfd monitor answering every discard's REMOVE
//! event) take from the vCPU thread. Both are part of what host invalidation costs a guest, so
//! they are not subtracted; `host_busy_fraction` and the KVM deltas (`vcpu.exits`,
//! `vm.remote_tlb_flush_requests`) show how much of each there was.

// The workspace's rust-version (1.85) predates `u64::is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::{GpaRange, TouchRateHeader, Workload, PAGE_SIZE, TOUCH_RATE_MAGIC};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::bench::median;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{self, Console, RunReport, VmConfig, VmControl, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig, HUGE_PAGE_SIZE};

/// The key point of the issue: 2 MiB discards at 1 GiB/s.
pub const KEY_RANGE: u64 = 2 << 20;
/// The key point's rate, MiB/s.
pub const KEY_RATE_MIB_S: f64 = 1024.0;
/// The target of `pressured_vs_unpressured` at the key point.
pub const TARGET_RATIO: f64 = 0.5;

// The report's types live in their own module, which the plot uses too; re-exported so that
// `bench_pressure::PressureReport` and the rest keep naming them.
pub use crate::bench_pressure_report::{
    size_label, Delivery, DeliveryFigures, PerPageVsRange, PressureBacking, PressureOptions, PressurePoint,
    PressureReport, PressureVm,
};

/// Reads `buf.len()` bytes of this process at `hva` with `process_vm_readv`, without the VMM's
/// table (the benchmark's reads must not count as device accesses or wait for invalidations).
fn peek(hva: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` is `buf`, writable for its length; the remote side is this process's memory,
    // checked by the kernel (EFAULT if unmapped), so no Rust reference to guest RAM is made.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == buf.len() as isize
}

fn read_words(hva: usize, words: usize) -> Option<Vec<u64>> {
    let mut b = vec![0u8; 8 * words];
    peek(hva, &mut b).then(|| b.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect())
}

/// Bytes of anonymous huge pages this process maps (`AnonHugePages` of smaps_rollup).
fn anon_huge_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0)
        * 1024
}

/// KVM's statistics of the VM, flattened to `vm.NAME` / `vcpu.NAME` (vCPUs summed).
fn kvm_counters(vm: &VmControl) -> BTreeMap<String, i128> {
    let stats = vm.stats();
    let mut out = BTreeMap::new();
    for (scope, prefix) in [("vm", "vm."), ("vcpus", "vcpu.")] {
        if let Some(map) = stats.get("kvm").and_then(|k| k.get(scope)).and_then(|m| m.as_object()) {
            for (name, v) in map {
                if let Some(n) = v.as_u64() {
                    out.insert(format!("{prefix}{name}"), i128::from(n));
                }
            }
        }
    }
    out
}

fn add_delta(
    sum: &mut BTreeMap<String, i128>,
    before: &BTreeMap<String, i128>,
    after: &BTreeMap<String, i128>,
) {
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d != 0 {
            *sum.entry(k.clone()).or_insert(0) += d;
        }
    }
}

/// The guest side as the host sees it: where the header is, what may be discarded.
struct Guest {
    vm: Arc<VmControl>,
    header_hva: usize,
    working_set_pages: u64,
    /// The pressure area: host address and length (2 MiB aligned).
    area: (usize, u64),
}

impl Guest {
    /// Finds the work area from the boot info in guest RAM (at `BOOT_INFO_GPA`).
    fn locate(vm: Arc<VmControl>) -> Result<Guest, String> {
        let words = std::mem::size_of::<guest_abi::BootInfo>() / 8;
        let hva = vm
            .guest_mmu()
            .host_range(guest_abi::BOOT_INFO_GPA, 8 * words as u64)
            .ok_or("the boot info is not in guest RAM")?;
        let w = read_words(hva, words).ok_or("cannot read the boot info")?;
        // BootInfo: magic, abi, nr_vcpus, workload, flags, seed, idt, nr_work, work[8] (2 words each).
        let work: Vec<GpaRange> = (0..(w[7] as usize).min(guest_abi::MAX_RANGES))
            .map(|i| GpaRange { start: w[8 + 2 * i], end: w[9 + 2 * i] })
            .collect();
        let first = work.first().filter(|r| r.pages() >= 2).ok_or("the guest has no work area")?;
        let header_hva =
            vm.guest_mmu().host_range(first.start, PAGE_SIZE).ok_or("the work area is not in RAM")?;
        let working_set_pages = work.iter().map(GpaRange::pages).sum::<u64>() - 1;
        // The largest host-contiguous piece of the work area past the header's 2 MiB block.
        let skip_to = (first.start + 1).next_multiple_of(HUGE_PAGE_SIZE);
        let mut area = (0usize, 0u64);
        for r in &work {
            for &(gpa, hva, len) in vm.ram_regions() {
                let s = r.start.max(gpa).max(skip_to).next_multiple_of(HUGE_PAGE_SIZE);
                let e = r.end.min(gpa + len as u64) / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE;
                if e > s && e - s > area.1 {
                    area = (hva + (s - gpa) as usize, e - s);
                }
            }
        }
        if area.1 == 0 {
            return Err("the work area has no 2 MiB block past the header's".into());
        }
        Ok(Guest { vm, header_hva, working_set_pages, area })
    }

    fn header(&self) -> TouchRateHeader {
        match read_words(self.header_hva, 4) {
            Some(w) => TouchRateHeader { magic: w[0], passes: w[1], pages: w[2], last_pass_cycles: w[3] },
            None => TouchRateHeader::default(),
        }
    }

    /// Waits until the guest has completed `passes` more passes than `from`.
    fn wait_passes(&self, from: u64, passes: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.header();
            if h.magic == TOUCH_RATE_MAGIC && h.passes >= from + passes {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the guest completed {} of {passes} passes in {timeout:?} (header magic {:#x})",
                    h.passes.saturating_sub(from),
                    h.magic
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// What one slice measured.
#[derive(Default)]
struct Slice {
    seconds: f64,
    pages: u64,
    passes: u64,
    discards: u64,
    bytes: u64,
    busy: Duration,
    failed: u64,
    first_error: Option<String>,
}

/// The discarding side of a pressured slice.
struct Pressure {
    range: u64,
    bytes_per_s: f64,
    delivery: Delivery,
}

/// Measures one slice of `length` (pressured when `pressure` is given) and adds KVM's deltas to
/// `kvm`.
fn slice(
    g: &Guest,
    pressure: Option<&Pressure>,
    length: Duration,
    rng: &mut ChaCha8Rng,
    kvm: &mut BTreeMap<String, i128>,
) -> Slice {
    let kvm_before = kvm_counters(&g.vm);
    let h0 = g.header();
    let t0 = Instant::now();
    let end = t0 + length;
    let mut s = Slice::default();
    match pressure {
        None => std::thread::sleep(length),
        Some(p) => {
            let space = g.vm.guest_mmu().space();
            let slots = (g.area.1 / p.range).max(1);
            let cap = (2.0 * p.range as f64).max(p.bytes_per_s * 0.01);
            let mut tokens = p.range as f64 / 2.0;
            let mut last = t0;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                tokens = (tokens + p.bytes_per_s * (now - last).as_secs_f64()).min(cap);
                last = now;
                if tokens < p.range as f64 {
                    let wait = Duration::from_secs_f64((p.range as f64 - tokens) / p.bytes_per_s);
                    std::thread::sleep(wait.min(end - now));
                    continue;
                }
                tokens -= p.range as f64;
                let start = g.area.0 + (rng.random_range(0..slots) * p.range) as usize;
                let piece = match p.delivery {
                    Delivery::Range => p.range as usize,
                    Delivery::PerPage => PAGE_SIZE as usize,
                };
                let busy = Instant::now();
                for at in (start..start + p.range as usize).step_by(piece) {
                    match space.discard(at, piece) {
                        Ok(_) => {
                            s.discards += 1;
                            s.bytes += piece as u64;
                        }
                        Err(e) => {
                            s.failed += 1;
                            s.first_error.get_or_insert_with(|| format!("discard {at:#x}+{piece:#x}: {e}"));
                        }
                    }
                }
                s.busy += busy.elapsed();
            }
        }
    }
    let h1 = g.header();
    s.seconds = t0.elapsed().as_secs_f64();
    s.pages = h1.pages - h0.pages;
    s.passes = h1.passes - h0.passes;
    add_delta(kvm, &kvm_before, &kvm_counters(&g.vm));
    s
}

/// The rate of a planned point.
#[derive(Clone, Copy, Debug)]
enum PlanRate {
    /// This many MiB/s.
    Fixed(f64),
    /// The rate the previous point of the same VM achieved (equal pressure, other delivery).
    AchievedByPrevious,
}

/// One point to measure in a VM.
#[derive(Clone, Copy, Debug)]
struct Plan {
    delivery: Delivery,
    rate: PlanRate,
}

fn accumulate(sum: &mut Slice, one: Slice) {
    sum.seconds += one.seconds;
    sum.pages += one.pages;
    sum.passes += one.passes;
    sum.discards += one.discards;
    sum.bytes += one.bytes;
    sum.busy += one.busy;
    sum.failed += one.failed;
    if sum.first_error.is_none() {
        sum.first_error = one.first_error;
    }
}

/// The points of one VM, measured by the benchmark's thread while the VM runs.
#[allow(clippy::too_many_arguments)]
fn measure_vm(
    opts: &PressureOptions,
    vm: Arc<VmControl>,
    started: Instant,
    backing: PressureBacking,
    range: u64,
    plans: &[Plan],
    purpose: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(PressureVm, Vec<PressurePoint>), String> {
    let g = Guest::locate(vm)?;
    if g.area.1 < range {
        return Err(format!(
            "a {} range does not fit the {} MiB pressure area (more --mem)",
            size_label(range),
            g.area.1 >> 20
        ));
    }
    // The cold pass and one warm pass (cold writes cost up to ~10 us per page here).
    g.wait_passes(0, 2, Duration::from_secs(60) + Duration::from_micros(40 * g.working_set_pages))?;
    let warmup_s = started.elapsed().as_secs_f64();
    let mem = opts.mem as f64;
    let thp_fraction_start = (anon_huge_bytes() as f64 / mem).min(1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ range ^ ((backing as u64) << 40));
    let mut points: Vec<PressurePoint> = Vec::new();
    // Settle, then an unpressured slice: the refaults of a pressured slice are over once the
    // guest has made two passes without pressure.
    let unpressured = |rng: &mut ChaCha8Rng, kvm: &mut BTreeMap<String, i128>| -> Result<Slice, String> {
        let passes = g.header().passes;
        g.wait_passes(passes, 2, Duration::from_secs(120))?;
        Ok(slice(&g, None, opts.slice, rng, kvm))
    };
    for plan in plans {
        let rate = match plan.rate {
            PlanRate::Fixed(r) => r,
            PlanRate::AchievedByPrevious => match points.last() {
                Some(p) if p.achieved_mib_s > 0.0 => p.achieved_mib_s,
                _ => continue,
            },
        };
        let p = Pressure { range, bytes_per_s: rate * (1 << 20) as f64, delivery: plan.delivery };
        let period = Duration::from_secs_f64(range as f64 / p.bytes_per_s);
        let pressured_len = opts.slice.max(period * 4);
        let (mut un, mut pr) = (Slice::default(), Slice::default());
        let (mut kvm_un, mut kvm_pr) = (BTreeMap::new(), BTreeMap::new());
        let mut rep_ratios = Vec::new();
        // U P U P ... U: each pressured slice against the mean of the unpressured ones on either
        // side of it, so that a drift of the machine's load hits both sides alike.
        let mut before = unpressured(&mut rng, &mut kvm_un)?;
        for _ in 0..opts.reps {
            let q = slice(&g, Some(&p), pressured_len, &mut rng, &mut kvm_pr);
            let after = unpressured(&mut rng, &mut kvm_un)?;
            let baseline = (before.pages as f64 / before.seconds + after.pages as f64 / after.seconds) / 2.0;
            rep_ratios.push((q.pages as f64 / q.seconds) / baseline.max(1e-9));
            accumulate(&mut un, std::mem::replace(&mut before, after));
            accumulate(&mut pr, q);
        }
        accumulate(&mut un, before);
        let r_u = un.pages as f64 / un.seconds.max(1e-9);
        let r_p = pr.pages as f64 / pr.seconds.max(1e-9);
        let lost_s = pr.seconds - pr.pages as f64 / r_u.max(1e-9);
        let refaulted = (pr.bytes / PAGE_SIZE).min(pr.pages);
        let pf_fixed = kvm_pr.get("vcpu.pf_fixed").copied().unwrap_or(0)
            - (kvm_un.get("vcpu.pf_fixed").copied().unwrap_or(0) as f64 * pr.seconds / un.seconds.max(1e-9))
                as i128;
        let point = PressurePoint {
            backing,
            range_bytes: range,
            range: size_label(range),
            delivery: plan.delivery,
            rate_matched_to_previous: matches!(plan.rate, PlanRate::AchievedByPrevious),
            target_mib_s: rate,
            achieved_mib_s: pr.bytes as f64 / (1 << 20) as f64 / pr.seconds.max(1e-9),
            discards: pr.discards,
            discarded_bytes: pr.bytes,
            failed_discards: pr.failed,
            first_error: pr.first_error,
            unpressured_s: un.seconds,
            pressured_s: pr.seconds,
            unpressured_pages_per_s: r_u,
            pressured_pages_per_s: r_p,
            pressured_vs_unpressured: median(rep_ratios.clone()),
            pooled_ratio: r_p / r_u.max(1e-9),
            rep_ratios,
            pressured_passes: pr.passes,
            host_us_per_mib: if pr.bytes > 0 {
                pr.busy.as_secs_f64() * 1e6 / (pr.bytes as f64 / (1 << 20) as f64)
            } else {
                0.0
            },
            host_busy_fraction: pr.busy.as_secs_f64() / pr.seconds.max(1e-9),
            refault_ns_per_page: (refaulted > 0).then(|| lost_s.max(0.0) * 1e9 / refaulted as f64),
            lost_ns_per_kvm_fault: (pf_fixed > 0).then(|| lost_s.max(0.0) * 1e9 / pf_fixed as f64),
            kvm_pressured: kvm_pr,
            kvm_unpressured: kvm_un,
        };
        progress(&format!(
            "bench pressure: {} {} {} @ {:.0} MiB/s: achieved {:.0} MiB/s, touch rate {:.2} -> {:.2} Mpages/s (x{:.3}), refault {} ns/page",
            backing.name(),
            point.range,
            point.delivery_label(),
            rate,
            point.achieved_mib_s,
            r_u / 1e6,
            r_p / 1e6,
            point.pressured_vs_unpressured,
            point.refault_ns_per_page.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into())
        ));
        if let Some(e) = &point.first_error {
            return Err(format!("{} discards failed; the first: {e}", point.failed_discards));
        }
        points.push(point);
    }
    let vm_info = PressureVm {
        backing,
        range_bytes: range,
        purpose: purpose.to_string(),
        working_set_pages: g.working_set_pages,
        pressure_area_bytes: g.area.1,
        thp_fraction_start,
        thp_fraction_end: (anon_huge_bytes() as f64 / mem).min(1.0),
        warmup_s,
    };
    Ok((vm_info, points))
}

/// What the VMM thread reports to the benchmark's thread.
enum VmEvent {
    Started(Arc<VmControl>),
    Ended(Box<Result<RunReport, machine::Error>>),
}

/// Boots a VM running the TouchRate guest and measures `plans` in it.
#[allow(clippy::too_many_arguments)]
fn one_vm(
    opts: &PressureOptions,
    backing: PressureBacking,
    range: u64,
    plans: &[Plan],
    purpose: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(PressureVm, Vec<PressurePoint>), String> {
    let (tx, rx) = channel::<VmEvent>();
    let started_tx = Mutex::new(Some(tx.clone()));
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        if let Some(tx) = started_tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(VmEvent::Started(vm.clone()));
        }
    });
    // A backstop only: the benchmark quits the VM when its points are done.
    let budget: f64 = plans
        .iter()
        .map(|p| {
            let period = match p.rate {
                PlanRate::Fixed(r) => range as f64 / (r * (1 << 20) as f64),
                PlanRate::AchievedByPrevious => opts.max_period.as_secs_f64(),
            };
            (opts.reps + 1) as f64
                * (opts.slice.as_secs_f64() + opts.slice.as_secs_f64().max(4.0 * period) + 5.0)
        })
        .sum();
    let config = VmConfig {
        kvm_device: opts.kvm_device.clone(),
        memory: MemoryConfig {
            size: opts.mem,
            backend: MemoryBackend::Anonymous,
            thp: backing == PressureBacking::Thp,
        },
        vcpus: 1,
        timeout: Some(Duration::from_secs_f64(budget + 300.0)),
        console: Console::Null,
        monitor: opts.monitor,
        after_start: Some(hook),
        balloon: None,
        balloon_stats_interval: None,
        ..VmConfig::test_guest(TestGuestParams {
            seed: opts.seed,
            ..TestGuestParams::new(Workload::TouchRate)
        })
    };
    let started = Instant::now();
    std::thread::Builder::new()
        .name("pressure-vmm".into())
        .spawn(move || {
            let _ = tx.send(VmEvent::Ended(Box::new(machine::run(&config))));
        })
        .map_err(|e| format!("cannot spawn the VMM thread: {e}"))?;
    let vm = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(VmEvent::Started(vm)) => vm,
        Ok(VmEvent::Ended(r)) => {
            return Err(match *r {
                Ok(r) => format!("the bench VM ended before it started: {:?}", r.outcome),
                Err(e) => format!("the bench VM did not start: {e}"),
            })
        }
        Err(_) => return Err("the bench VM did not start within 120 s".into()),
    };
    let measured = measure_vm(opts, vm.clone(), started, backing, range, plans, purpose, progress);
    vm.quit();
    drop(vm);
    let ended = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(VmEvent::Ended(r)) => break *r,
            Ok(VmEvent::Started(_)) => continue,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return Err("the bench VM did not stop within 60 s of the quit".into())
            }
        }
    };
    let report = ended.map_err(|e| e.to_string())?;
    match (&report.outcome, measured) {
        (VmOutcome::Quit, measured) => measured,
        (other, Err(e)) => Err(format!("{e} (the VM ended with {other:?})")),
        (other, Ok(_)) => Err(format!("the bench VM ended with {other:?} instead of being stopped")),
    }
}

/// Checks `opts` before any VM starts.
fn validate(opts: &PressureOptions) -> Result<(), String> {
    if opts.ranges.is_empty() || opts.rates_mib_s.is_empty() || opts.backings.is_empty() {
        return Err("at least one range size, one rate and one backing are needed".into());
    }
    if let Some(r) = opts.ranges.iter().find(|&&r| r == 0 || r % PAGE_SIZE != 0) {
        return Err(format!("range size {r} is not a positive multiple of 4 KiB"));
    }
    if let Some(r) = opts.rates_mib_s.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        return Err(format!("rate {r} MiB/s is not a positive number"));
    }
    if opts.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if opts.slice < Duration::from_millis(50) {
        return Err("--slice must be at least 50 ms".into());
    }
    if opts.mem < 16 << 20 || opts.mem % HUGE_PAGE_SIZE != 0 {
        return Err("--mem must be a multiple of 2 MiB and at least 16 MiB".into());
    }
    Ok(())
}

/// Runs `zapvm bench pressure`; `progress` hears about every point.
pub fn run(opts: &PressureOptions, progress: &mut dyn FnMut(&str)) -> Result<PressureReport, String> {
    validate(opts)?;
    let date = vmm::timestamp::utc_now();
    let mut notes = Vec::new();
    let (mut points, mut vms) = (Vec::new(), Vec::new());
    // The per-page comparison: at the key point when it is measured, else at the largest range
    // above 4 KiB and the highest rate.
    let compare_range = if opts.ranges.contains(&KEY_RANGE) {
        Some(KEY_RANGE)
    } else {
        opts.ranges.iter().copied().filter(|&r| r > PAGE_SIZE).max()
    };
    let compare_rate = opts.rates_mib_s.iter().copied().fold(f64::MIN, f64::max);
    for &backing in &opts.backings {
        for &range in &opts.ranges {
            let rates: Vec<f64> = opts
                .rates_mib_s
                .iter()
                .copied()
                .filter(|&r| {
                    let period = Duration::from_secs_f64(range as f64 / (r * (1 << 20) as f64));
                    let keep = period <= opts.max_period;
                    if !keep {
                        notes.push(format!(
                            "{} {} at {r} MiB/s skipped: one discard every {:.1} s is longer than --max-period",
                            backing.name(),
                            size_label(range),
                            period.as_secs_f64()
                        ));
                    }
                    keep
                })
                .collect();
            if rates.is_empty() {
                continue;
            }
            let sweep: Vec<Plan> =
                rates.iter().map(|&r| Plan { delivery: Delivery::Range, rate: PlanRate::Fixed(r) }).collect();
            let mut vm_plans = vec![("sweep", sweep)];
            if opts.per_page && Some(range) == compare_range {
                vm_plans.push((
                    "per-page comparison",
                    vec![
                        Plan { delivery: Delivery::PerPage, rate: PlanRate::Fixed(compare_rate) },
                        Plan { delivery: Delivery::Range, rate: PlanRate::AchievedByPrevious },
                    ],
                ));
            }
            for (purpose, plans) in vm_plans {
                progress(&format!(
                    "bench pressure: {} backing, {} ranges, {purpose}: booting a {} MiB VM",
                    backing.name(),
                    size_label(range),
                    opts.mem >> 20
                ));
                let (vm, mut p) = one_vm(opts, backing, range, &plans, purpose, progress)?;
                vms.push(vm);
                points.append(&mut p);
            }
        }
    }
    let find = |b: PressureBacking, range: u64, rate: f64, d: Delivery| {
        points.iter().find(|p| {
            p.backing == b
                && p.range_bytes == range
                && p.target_mib_s == rate
                && p.delivery == d
                && !p.rate_matched_to_previous
        })
    };
    let mut key = BTreeMap::new();
    for &b in &opts.backings {
        if let Some(p) = find(b, KEY_RANGE, KEY_RATE_MIB_S, Delivery::Range) {
            key.insert(b.name().to_string(), p.pressured_vs_unpressured);
        }
    }
    if key.is_empty() {
        notes.push("the key point (2M ranges at 1024 MiB/s) was not measured in this run".into());
    }
    let mut per_page_vs_range = Vec::new();
    if let Some(range) = compare_range.filter(|_| opts.per_page) {
        for &b in &opts.backings {
            let Some(pp) = find(b, range, compare_rate, Delivery::PerPage) else { continue };
            let equal = points.iter().find(|p| {
                p.backing == b
                    && p.range_bytes == range
                    && p.delivery == Delivery::Range
                    && p.rate_matched_to_previous
            });
            per_page_vs_range.push(PerPageVsRange {
                backing: b,
                range_bytes: range,
                target_mib_s: compare_rate,
                per_page: DeliveryFigures::of(pp),
                range_equal_pressure: equal.map(DeliveryFigures::of),
                range_at_target: find(b, range, compare_rate, Delivery::Range).map(DeliveryFigures::of),
            });
        }
    }
    Ok(PressureReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date,
        options: opts.clone(),
        target_met: key.iter().map(|(k, &v)| (k.clone(), v >= TARGET_RATIO)).collect(),
        pressured_vs_unpressured: key,
        target: TARGET_RATIO,
        points,
        vms,
        per_page_vs_range,
        notes,
    })
}

/// What `zapvm bench pressure` was asked for on the command line; [`cli`] fills what is `None`
/// from [`PressureOptions::quick`] or, with `full`, [`PressureOptions::full`]. The `zapvm`
/// command's arguments convert to it; each field is the option of the same name.
#[derive(Clone, Debug)]
pub struct PressureRequest {
    /// The full sweep instead of the quick one.
    pub full: bool,
    /// Guest RAM bytes.
    pub mem: Option<u64>,
    /// Range sizes, bytes.
    pub ranges: Option<Vec<u64>>,
    /// Pressure rates, MiB/s.
    pub rates: Option<Vec<f64>>,
    /// Host backings.
    pub backings: Option<Vec<PressureBacking>>,
    /// Length of an unpressured slice and least length of a pressured one.
    pub slice: Option<Duration>,
    /// Unpressured/pressured slice pairs per point.
    pub reps: Option<usize>,
    /// Skip the per-page versus range comparison.
    pub no_per_page: bool,
    /// Do not register guest RAM with the userfaultfd monitor.
    pub no_monitor: bool,
    /// Seed of the range picks.
    pub seed: u64,
    /// Measure nothing: rewrite the table and plot of this `pressure.json`.
    pub from_json: Option<PathBuf>,
    /// Where `pressure.json`, `pressure.md` and `pressure.svg` go.
    pub out: PathBuf,
    /// The KVM device.
    pub kvm_device: PathBuf,
}

/// Runs `zapvm bench pressure`: progress on stderr, the markdown on stdout, JSON, markdown and
/// the SVG plot under `--out`.
pub fn cli(args: PressureRequest) -> Result<std::process::ExitCode, String> {
    if let Some(path) = &args.from_json {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let report: PressureReport = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a report of `zapvm bench pressure`: {e}", path.display()))?;
        crate::bench_export::print_and_write(&report, &args.out, write_outputs)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let base = if args.full { PressureOptions::full() } else { PressureOptions::quick() };
    let opts = PressureOptions {
        kvm_device: args.kvm_device,
        mem: args.mem.unwrap_or(base.mem),
        ranges: args.ranges.unwrap_or(base.ranges),
        rates_mib_s: args.rates.unwrap_or(base.rates_mib_s),
        backings: args.backings.unwrap_or(base.backings),
        slice: args.slice.unwrap_or(base.slice),
        reps: args.reps.unwrap_or(base.reps),
        per_page: !args.no_per_page,
        monitor: !args.no_monitor,
        seed: args.seed,
        max_period: base.max_period,
    };
    let report = crate::bench_export::run_with_progress(None, |progress| run(&opts, progress))?;
    crate::bench_export::print_and_write(&report, &args.out, write_outputs)?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Writes `pressure.json` (and its flat export `pressure.flat.json`), `pressure.md`,
/// `pressure.svg` and the plotted points as `pressure.csv` into `dir` (created if missing).
pub fn write_outputs(report: &PressureReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    crate::bench_export::write_outputs(report, dir, crate::bench_plot::pressure_svg, &report.points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn bad_options_are_refused_before_any_vm() {
        let ok = PressureOptions::quick();
        assert!(validate(&ok).is_ok());
        for bad in [
            PressureOptions { ranges: vec![6000], ..ok.clone() },
            PressureOptions { ranges: vec![], ..ok.clone() },
            PressureOptions { rates_mib_s: vec![0.0], ..ok.clone() },
            PressureOptions { rates_mib_s: vec![f64::NAN], ..ok.clone() },
            PressureOptions { reps: 0, ..ok.clone() },
            PressureOptions { mem: 15 << 20, ..ok.clone() },
            PressureOptions { slice: Duration::from_millis(10), ..ok.clone() },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
