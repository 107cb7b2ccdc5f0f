//! The controller thread: it starts once the VM runs, works out the verifiers' data pages from the
//! boot info, starts the scenario threads, watches the run (progress bar, work goal, deadline),
//! stops the scenarios and collects what the judge needs ([`Controlled`]); and the watchdog's
//! graces and the gate ([`RamUsers`]) that keeps scenarios off guest RAM once the VM goes away.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::{
    slice_pages, stress_layout, stress_role, GpaRange, StressHeader, StressLayout, StressRole, PAGE_SIZE,
};
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

use vmm::machine::VmControl;
use vmm::memory::{MemoryBackend, HUGE_PAGE_SIZE};

use super::monitor::{flatten, guest_headers, invalidations, progress};
use super::scenarios::{
    balloon_storm, corrupt_verifier, device_reader, discard_storm, external_chaos, mprotect_phases,
    virtio_mem_storm,
};
use super::{peek, BalloonPool, Counters, Ctx, Progress, Run, StormCounters, StressOptions};

/// What the controller thread hands back.
pub(super) struct Controlled {
    pub(super) scenarios: Vec<String>,
    /// The work done when the scenarios ended.
    pub(super) least: Progress,
    pub(super) hung_threads: Vec<String>,
    pub(super) kvm_delta: BTreeMap<String, f64>,
    pub(super) headers: Vec<StressHeader>,
    pub(super) ran_for: Duration,
    pub(super) ctx: Arc<Ctx>,
    /// The VM ended before the scenarios' deadline.
    pub(super) vm_ended_early: bool,
    /// Notifier stats after every scenario thread finished (or was given up on).
    pub(super) kinds: Vec<notifier::KindStats>,
    pub(super) subscribers: Vec<notifier::SubscriberStats>,
    pub(super) planted_fired: u64,
}

/// How long scenario threads get to finish after the deadline before they count as hung.
pub(super) const JOIN_GRACE: Duration = Duration::from_secs(5);
/// How long the VMM gets to stop after the scenarios ended before it counts as hung.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(30);
/// A device reader whose last read completed longer ago than this at the end is hung.
pub(super) const READER_STALL: Duration = Duration::from_secs(3);

/// The scenario threads that touch guest RAM by its host addresses (raw `munmap`, `mremap`,
/// `mprotect`, `madvise` and stores: the table and the notifier fail cleanly once the VM is gone,
/// raw system calls would hit whatever was mapped there next). The VM's `before_teardown` hook
/// closes the gate and waits for every such thread to leave before guest RAM is unmapped; a
/// thread that would start after that does not.
#[derive(Default)]
pub(super) struct RamUsers {
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
    pub(super) fn close_and_wait(&self, timeout: Duration) -> bool {
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

pub(super) fn controller(
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
