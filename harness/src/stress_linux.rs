//! `zapvm stress --linux`: Linux's own virtio_balloon driver under a storm of balloon targets,
//! with free page reporting and deflate-on-OOM offered, while programs inside the guest check
//! that no byte they own ever changes.
//!
//! The project's Linux guest (`vmm::boot::linux_guest`) boots with its /init told to start two
//! checkers (`resources/linux-guest/init`): Debian's `memtester`, one loop at a time over a few
//! MiB (each run allocates, locks, tests and frees its memory, so the guest keeps allocating and
//! freeing and free page reporting has pages to report), and `seedcheck`, which keeps seeded data
//! in a tmpfs file and re-verifies every word of it in a loop; and `churn`, which allocates
//! (fallocate on tmpfs: no zeroing) and frees 16 MiB at a time with pauses longer than
//! page_reporting's delay,
//! so that the guest keeps freeing whole blocks of 2^[`REPORT_ORDER`] pages (its /init sets
//! page_reporting's order) that free page reporting reports to the host. Linux reports a free
//! block once, and only a block freed (merged) since counts again: churn's pages come first from
//! the free fragments smaller than a block and go back to them, so a block size near churn's
//! round (2 MiB blocks, order 9: 16 MiB rounds re-formed no block in half the runs, reports 0)
//! starves reporting; 128 KiB blocks re-form in every round. Linux also reports a zone's free
//! blocks only while it has 32 of them free beyond its low watermark (4 MiB at order 5).
//! Once all run, the host sets
//! seeded random balloon targets, up and down, some of them beyond what the guest can give
//! (toward OOM: the driver then runs out of pages, "Out of puff!", and Linux's OOM path deflates
//! the balloon), and waits (bounded) for each. With a virtio-mem region
//! ([`LinuxStressOptions::virtio_mem_region`]) it also sets, before one target in two (never
//! while the balloon fights for a target toward OOM), a random requested size that Linux's
//! virtio_mem must plug or unplug to; hot-plugged memory is onlined movable, so Linux can empty
//! a block to unplug it, and Linux's balloon inflates from it and reports its free blocks (the
//! device accepts that only in plugged blocks).
//!
//! At the end [`judge`] checks: no checker reported a mismatch (or was killed), each made
//! progress, the guest kernel logged no Oops, BUG or "Bad page", every target was reached or the
//! driver said why (it logged that it ran out of pages, or deflated on OOM during the step), the
//! balloon's inflated/deflated counters agree with the guest's /proc/vmstat (migrations
//! counted: each is an inflate and a deflate to the device), every virtio-mem requested size was
//! reached and the guest's MemTotal is its boot MemTotal plus what stays plugged, free page
//! reporting reported memory during the storm (when churn ran), the bytes the
//! balloon discarded are its inflated pages and free page reports, virtio-mem's are its
//! unplugged blocks, and together they are exactly the VMM discards the notifier saw, and every invalidation start was matched by its end. The shared
//! parts of that judgement are those of [`crate::stress`].

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use vmm::devices::virtio::balloon::{BalloonConfig, BalloonStats};
use vmm::devices::virtio::mem::VirtioMemStats;
use vmm::machine::{
    self, BootSource, Console, RunReport, VirtioMemDevice, VirtioMemSpec, VmConfig, VmControl, VmOutcome,
};
use vmm::memory::{MemoryConfig, PAGE_SIZE};

#[cfg(feature = "fault-injection")]
use crate::stress::peek;
use crate::stress::{
    balloon_device_invariants, notifier_invariants, pick_target, unaccounted_discards,
    virtio_mem_device_invariants, DiscardAccounting,
};

/// What `zapvm stress --linux` runs.
#[derive(Clone, Debug)]
pub struct LinuxStressOptions {
    /// The KVM device.
    pub kvm_device: std::path::PathBuf,
    /// Guest RAM bytes.
    pub mem: u64,
    /// Balloon targets to set. The storm ends after this many once free page reporting has
    /// reported during it (when churn runs, so that it does), or at `duration` at the latest.
    pub targets: u64,
    /// How long the storm may run once the checkers run.
    pub duration: Duration,
    /// Seed of the targets and of seedcheck's data.
    pub seed: u64,
    /// MiB memtester tests per run (0: no memtester).
    pub memtest_mib: u64,
    /// MiB of seeded data seedcheck keeps (0: no seedcheck).
    pub seedcheck_mib: u64,
    /// MiB churn allocates and frees per round (0: no churn; then free page reporting is not
    /// required to report anything).
    pub churn_mib: u64,
    /// How long the driver gets to reach one target (a target it cannot reach ends
    /// [`EXPLAINED_STEP_END`] after it said why, out of pages or deflating on OOM).
    pub step_wait: Duration,
    /// The largest target meant to be reachable, in bytes (`None`: all the guest can give
    /// beside the checkers and some headroom). Targets beyond what the guest can give (toward
    /// OOM) are set whatever this is.
    pub max_target: Option<u64>,
    /// Set targets beyond what the guest can give (toward OOM), one in `oom_one_in`: the driver
    /// then logs that it ran out of pages and Linux deflates on OOM (when the guest allocates:
    /// churn, memtester); such a target ends [`EXPLAINED_STEP_END`] after the driver said so, or
    /// at `step_wait`. Each costs the driver inflating all the guest's free memory, and the next
    /// target deflating most of it: minutes on a large guest where guest ring 0 is emulated.
    pub oom_targets: bool,
    /// See `oom_targets` (at least 1).
    pub oom_one_in: u64,
    /// How long the boot may take, to the checkers' first progress.
    pub boot_wait: Duration,
    /// A virtio-mem device with a region of this many bytes (whole [`LINUX_MEMORY_BLOCK`]s:
    /// Linux hot-plugs memory in those), and before one in two balloon targets a random
    /// requested size (whole 2 MiB blocks, 0 to the region) that Linux's virtio_mem must follow
    /// within `step_wait`. `None`: no virtio-mem.
    pub virtio_mem_region: Option<u64>,
    /// Echo the guest's own lines (`zapvm-guest: `) and each target's outcome on stderr, with
    /// the seconds since the VM started.
    pub progress: bool,
    /// **Fault injection for tests only**: after the first target reached, the balloon discards
    /// one page of seedcheck's data (found by its marker in guest RAM) with its next inflate,
    /// a PFN the driver did not give it ([`vmm::devices::virtio::balloon::Balloon::plant_stray_discard`]).
    #[cfg(feature = "fault-injection")]
    pub plant_stray_discard: bool,
}

impl LinuxStressOptions {
    /// A CI-sized run: 192 MiB of RAM, 12 targets or 60 s of storm, 4 MiB checkers, 16 MiB of
    /// churn.
    pub fn new() -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            mem: 192 << 20,
            targets: 12,
            duration: Duration::from_secs(60),
            seed: 0x5eed,
            memtest_mib: 4,
            seedcheck_mib: 4,
            churn_mib: 16,
            step_wait: Duration::from_secs(60),
            max_target: None,
            oom_targets: true,
            oom_one_in: 4,
            boot_wait: Duration::from_secs(600),
            virtio_mem_region: None,
            progress: false,
            #[cfg(feature = "fault-injection")]
            plant_stray_discard: false,
        }
    }
}

impl LinuxStressOptions {
    /// The memory the guest's checkers and churn hold at once, in bytes.
    pub fn checkers_bytes(&self) -> u64 {
        (self.memtest_mib + self.seedcheck_mib + self.churn_mib) << 20
    }

    /// Refuses options no run can judge, with what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.memtest_mib == 0 && self.seedcheck_mib == 0 {
            return Err("a Linux storm needs a checker: give memtester or seedcheck some MiB".into());
        }
        if self.targets == 0 {
            return Err("a Linux storm needs at least one balloon target (--targets)".into());
        }
        if self.duration.is_zero() {
            return Err("a Linux storm needs a storm: the duration must be more than 0".into());
        }
        if self.step_wait.is_zero() || self.boot_wait.is_zero() {
            return Err("the waits for a target and for the boot must be more than 0".into());
        }
        // The guest kernel and its initramfs take ~30 MiB; the balloon needs room beside the
        // checkers and the headroom (the run checks the guest's own MemTotal once it booted).
        let least = self.checkers_bytes() + HEADROOM_BYTES + MIN_GUEST_OVERHEAD_BYTES;
        if self.mem < least {
            return Err(format!(
                "guest RAM of {} MiB is too small for {} MiB of checkers and churn: give it at least {} MiB \
                 (--mem), or the checkers less",
                self.mem >> 20,
                self.checkers_bytes() >> 20,
                least.div_ceil(1 << 20)
            ));
        }
        if self.oom_targets && self.oom_one_in == 0 {
            return Err("targets toward OOM one in 0 makes no sense: give 1 or more (--oom-one-in)".into());
        }
        if self.max_target.is_some_and(|m| m < 1 << 20) {
            return Err("the largest reachable target must be at least 1 MiB (--max-target)".into());
        }
        if let Some(region) = self.virtio_mem_region {
            if region == 0 || !region.is_multiple_of(LINUX_MEMORY_BLOCK) {
                return Err(format!(
                    "a virtio-mem region of {region} bytes: Linux hot-plugs whole memory blocks of {} MiB, give a \
                     multiple of that (--virtio-mem-region)",
                    LINUX_MEMORY_BLOCK >> 20
                ));
            }
        }
        if self.mem > u64::from(u32::MAX) * PAGE_SIZE {
            return Err(format!("guest RAM of {} bytes is more than a balloon target can name", self.mem));
        }
        Ok(())
    }
}

impl Default for LinuxStressOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// One balloon target of the storm.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStep {
    /// Milliseconds from the storm's start to the step's.
    pub at_ms: u64,
    /// The target, in pages.
    pub target_pages: u64,
    /// `actual` when it was set.
    pub from_pages: u64,
    /// Whether the driver reached it (actual and the device's bitmap) within the wait.
    pub reached: bool,
    /// Milliseconds to reach it (or waited).
    pub ms: u64,
    /// `actual` at the end of the step.
    pub actual_pages: u64,
    /// Pages deflated during a step that asked for more (deflate-on-OOM).
    pub oom_deflated_pages: u64,
    /// "Out of puff" lines the driver logged during the step.
    pub out_of_puff: u64,
}

/// One virtio-mem requested size of the storm.
#[derive(Debug, Clone, Serialize)]
pub struct MemStep {
    /// Milliseconds from the storm's start to the step's.
    pub at_ms: u64,
    /// The requested size, in bytes.
    pub requested_bytes: u64,
    /// The plugged size when it was set.
    pub from_bytes: u64,
    /// Whether Linux's virtio_mem plugged or unplugged to it within the wait.
    pub reached: bool,
    /// Milliseconds to reach it (or waited).
    pub ms: u64,
    /// The plugged size at the end of the step.
    pub plugged_bytes: u64,
}

/// What the guest's checkers reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckerReport {
    /// memtester runs that passed.
    pub memtest_passes: u64,
    /// memtester runs skipped (it could not get or lock its memory).
    pub memtest_skipped: u64,
    /// seedcheck's passes (its last report).
    pub seedcheck_passes: u64,
    /// Bytes seedcheck verified (its last report).
    pub seedcheck_verified_bytes: u64,
    /// churn's rounds (its last report).
    pub churn_rounds: u64,
    /// Bytes churn allocated and freed (its last report).
    pub churn_bytes: u64,
    /// Every failure line of a checker.
    pub failures: Vec<String>,
}

/// What `zapvm stress --linux` found; printed as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct LinuxStressReport {
    /// No invariant broken.
    pub ok: bool,
    /// The invariants that broke, one line each.
    pub broken: Vec<String>,
    /// Seed.
    pub seed: u64,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Seconds from the VM's start to the checkers' first progress.
    pub boot_s: f64,
    /// Seconds of storm.
    pub storm_s: f64,
    /// Of those, seconds the balloon held its last target waiting for free page reporting's
    /// first report of the storm (churn starved while the targets came).
    pub report_wait_s: f64,
    /// The guest's MemTotal (KiB) at its first report.
    pub mem_total_kib: u64,
    /// Targets set.
    pub targets: u64,
    /// Targets reached.
    pub reached: u64,
    /// Targets not reached, with the driver's reason seen.
    pub not_reached_explained: u64,
    /// Mean and longest milliseconds to reach a target.
    pub step_ms_mean: f64,
    /// See `step_ms_mean`.
    pub step_ms_max: u64,
    /// Pages the driver moved (inflated + deflated) per second of reached steps.
    pub pages_per_s: f64,
    /// Deflate-on-OOM events (steps that asked for more but saw deflates) and their pages.
    pub oom_deflate_events: u64,
    /// See `oom_deflate_events`.
    pub oom_deflated_pages: u64,
    /// "Out of puff" lines of the driver.
    pub out_of_puff_lines: u64,
    /// Every step.
    pub steps: Vec<TargetStep>,
    /// The checkers.
    pub checkers: CheckerReport,
    /// The guest's last /proc/vmstat balloon_inflate and balloon_deflate, each plus
    /// balloon_migrate ([`GuestMemReport::told_host`]).
    pub guest_vmstat: Option<(u64, u64)>,
    /// The balloon's counters at the end.
    pub balloon: Option<BalloonStats>,
    /// VMM discards accounted to their requesters.
    pub discard_accounting: DiscardAccounting,
    /// Notifier starts/ends per kind and origin.
    pub notifier: Vec<notifier::KindStats>,
    /// How the VM ended.
    pub outcome: Option<VmOutcome>,
    /// Kernel log lines that broke the run (Oops, BUG, Bad page), the first few.
    pub kernel_problems: Vec<String>,
    /// Planted faults that fired (fault-injection runs only).
    pub planted_faults_fired: u64,
    /// Free page reports the balloon received during the storm (after the checkers ran), and
    /// their bytes.
    pub reported_ranges_storm: u64,
    /// See `reported_ranges_storm`.
    pub reported_bytes_storm: u64,
    /// Free page report requests (the reporting queue's buffers) during the storm.
    pub report_requests_storm: u64,
    /// The guest's last memory report.
    pub guest_mem_last: Option<GuestMemReport>,
    /// virtio-mem requested sizes set (`virtio_mem_region` runs), and how many were reached.
    pub virtio_mem_steps: Vec<MemStep>,
    /// See `virtio_mem_steps`.
    pub virtio_mem_reached: u64,
    /// Mean milliseconds Linux's virtio_mem took to reach a requested size.
    pub virtio_mem_step_ms_mean: f64,
    /// virtio-mem's counters at the end.
    pub virtio_mem: Option<VirtioMemStats>,
    /// The guest's MemTotal (KiB) at the end, which must be its MemTotal at the first report
    /// plus what virtio-mem has plugged.
    pub mem_total_kib_final: u64,
}

/// Marker in word 0 of every page of seedcheck's data (resources/linux-guest/seedcheck.c).
#[cfg(feature = "fault-injection")]
const SEEDCHECK_MARKER: u64 = 0x6b63_6568_6465_6573;
/// Kernel log lines that break a run.
pub const KERNEL_PROBLEMS: [&str; 6] =
    ["Oops", "BUG:", "Bad page", "kernel BUG", "general protection fault", "Kernel panic"];
/// What the guest keeps beyond the checkers' memory when a target is meant to be reachable.
const HEADROOM_BYTES: u64 = 24 << 20;
/// Guest RAM the kernel and initramfs take beyond MemTotal's share for the checkers, at least
/// (with 1 MiB of balloon room), for [`LinuxStressOptions::validate`].
const MIN_GUEST_OVERHEAD_BYTES: u64 = 40 << 20;
/// Seconds between the guest's memory reports.
const REPORT_S: u64 = 10;
/// page_reporting's order in the guest (128 KiB blocks of 4 KiB pages), set by its /init: the
/// order Linux's virtio_balloon chooses itself where the host's pages are large (arm64 with 64
/// KiB pages). See the module's documentation for why not pageblock_order (9).
pub const REPORT_ORDER: u32 = 5;
/// Linux's memory block on x86-64 (`memory_block_size_bytes()` of a guest this small): the unit
/// in which its virtio_mem adds and removes memory, whatever the device's block size.
pub const LINUX_MEMORY_BLOCK: u64 = 128 << 20;
/// How long a step goes on once the driver said why it cannot reach its target.
const EXPLAINED_STEP_END: Duration = Duration::from_secs(5);
/// churn's pause between rounds: longer than the 2 s page_reporting waits after a free.
const CHURN_PAUSE_MS: u64 = 3000;

/// The console, split into lines as they come.
struct ConsoleLines {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: Option<Instant>,
    at: usize,
    partial: String,
    all: Vec<String>,
}

impl ConsoleLines {
    /// New complete lines since the last call.
    fn poll(&mut self) -> Vec<String> {
        let bytes = {
            let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
            let new = b[self.at..].to_vec();
            self.at = b.len();
            new
        };
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial[..i].trim_end_matches('\r').to_string();
            self.partial.drain(..=i);
            if let Some(t) = self.echo.filter(|_| line.contains("zapvm-guest: ")) {
                eprintln!("[{:7.1} s] {line}", t.elapsed().as_secs_f64());
            }
            out.push(line);
        }
        self.all.extend(out.iter().cloned());
        out
    }
}

/// The guest's memory report (resources/linux-guest/init), every [`REPORT_S`] seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestMemReport {
    /// MemTotal (KiB).
    pub mem_total_kib: u64,
    /// MemFree (KiB).
    pub mem_free_kib: u64,
    /// /proc/vmstat balloon_inflate and balloon_deflate: pages the balloon driver took from and
    /// gave back to the kernel since boot.
    pub balloon_inflate: u64,
    /// See `balloon_inflate`.
    pub balloon_deflate: u64,
    /// /proc/vmstat balloon_migrate: ballooned pages compaction or memory offlining moved. The
    /// driver tells the host each move as one inflate (the new page) and one deflate (the old),
    /// which balloon_inflate and balloon_deflate do not count.
    pub balloon_migrate: u64,
    /// Free blocks of 2^[`REPORT_ORDER`] pages in the guest's buddy allocator, all zones
    /// (/proc/buddyinfo: a free block of a higher order counts as the blocks it holds): what
    /// free page reporting can report, reported already or not.
    pub free_blocks: u64,
}

impl GuestMemReport {
    /// The report in a console line (anywhere in it), if the line holds one.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find("zapvm-guest: mem ")? + "zapvm-guest: mem ".len()..];
        Some(GuestMemReport {
            mem_total_kib: word_value(rest, "MemTotal")?,
            mem_free_kib: word_value(rest, "MemFree")?,
            balloon_inflate: word_value(rest, "balloon_inflate")?,
            balloon_deflate: word_value(rest, "balloon_deflate")?,
            balloon_migrate: word_value(rest, "balloon_migrate")?,
            free_blocks: word_value(rest, "free_blocks")?,
        })
    }

    /// Pages in the balloon by the guest kernel's count.
    pub fn ballooned(&self) -> u64 {
        self.balloon_inflate.saturating_sub(self.balloon_deflate)
    }

    /// The pages the driver told the host it inflated and deflated, by the guest kernel's
    /// count: what the device's inflated and deflated pages must equal (a migration is one of
    /// each).
    pub fn told_host(&self) -> (u64, u64) {
        (self.balloon_inflate + self.balloon_migrate, self.balloon_deflate + self.balloon_migrate)
    }
}

fn word_value(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

impl CheckerReport {
    /// What the checkers said in the console `lines` (every line since boot).
    pub fn from_console(lines: &[String]) -> Self {
        let mut c = CheckerReport::default();
        note_checkers(lines, &mut c);
        c
    }
}

/// The guest kernel's log lines in `console` that break a run (an Oops, a BUG, a bad page, a
/// panic: [`KERNEL_PROBLEMS`]), at most 8.
pub fn kernel_problems(console: &[String]) -> Vec<String> {
    console
        .iter()
        .filter(|l| !l.contains("zapvm-guest:") && KERNEL_PROBLEMS.iter().any(|p| l.contains(p)))
        .take(8)
        .cloned()
        .collect()
}

/// Reads what the checkers said in `lines` into `c`.
fn note_checkers(lines: &[String], c: &mut CheckerReport) {
    for l in lines {
        if let Some(i) = l.find("zapvm-guest: FAIL") {
            c.failures.push(l[i..].to_string());
        } else if l.contains("zapvm-guest: memtest pass=") {
            if l.ends_with(" ok") {
                c.memtest_passes += 1;
            } else if l.contains(" skipped ") {
                c.memtest_skipped += 1;
            }
        } else if l.contains("zapvm-guest: seedcheck pass=") {
            c.seedcheck_passes = word_value(l, "pass").unwrap_or(c.seedcheck_passes);
            c.seedcheck_verified_bytes =
                word_value(l, "verified_bytes").unwrap_or(c.seedcheck_verified_bytes);
        } else if l.contains("zapvm-guest: churn round=") {
            c.churn_rounds = word_value(l, "round").unwrap_or(c.churn_rounds);
            c.churn_bytes = word_value(l, "churned_bytes").unwrap_or(c.churn_bytes);
        }
    }
}

/// Runs `zapvm stress --linux` and judges it (`Err` when the VM cannot start at all).
pub fn run(opts: &LinuxStressOptions) -> Result<LinuxStressReport, String> {
    opts.validate()?;
    let guest = vmm::boot::linux_guest::build()?;
    let mut cmdline = vmm::boot::linux::default_cmdline();
    cmdline.push_str(&format!(
        " memhp_default_state=online_movable {}={REPORT_S} zapvm.memtest={} zapvm.seedcheck={} zapvm.seed={} \
         zapvm.checkreport=5 zapvm.churn={} zapvm.churnpause={CHURN_PAUSE_MS} zapvm.reportorder={REPORT_ORDER}",
        vmm::boot::linux_guest::REPORT_OPTION,
        opts.memtest_mib,
        opts.seedcheck_mib,
        opts.seed,
        opts.churn_mib,
    ));
    // Hot-plugged memory goes to ZONE_MOVABLE (memhp_default_state above), so that Linux can
    // always empty a block to unplug it: only movable pages live there.
    let console = Arc::new(Mutex::new(Vec::new()));
    let (vm_tx, vm_rx) = channel::<Arc<VmControl>>();
    let vm_tx = Mutex::new(Some(vm_tx));
    let config = VmConfig {
        kvm_device: opts.kvm_device.clone(),
        memory: MemoryConfig { size: opts.mem, backend: Default::default(), thp: false },
        vcpus: 1,
        // The storm's last balloon and virtio-mem steps and the settles may each run a step
        // wait past the storm's duration.
        timeout: Some(opts.boot_wait + opts.duration + opts.step_wait * 3 + Duration::from_secs(180)),
        console: Console::Buffer(console.clone()),
        // Free page reporting and deflate-on-OOM offered (the defaults), and statistics.
        balloon: Some(BalloonConfig::default()),
        balloon_stats_interval: Some(Duration::from_secs(5)),
        virtio_mem: opts
            .virtio_mem_region
            .map(|region_size| VirtioMemSpec { region_size, requested_size: 0 }),
        after_start: Some(Arc::new(move |vm: &Arc<VmControl>| {
            if let Some(tx) = vm_tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(vm.clone());
            }
        })),
        ..VmConfig::new(BootSource::Linux { kernel: guest.vmlinux, initrd: Some(guest.initramfs), cmdline })
    };
    let (done_tx, done_rx) = channel::<Result<RunReport, machine::Error>>();
    std::thread::Builder::new()
        .name("stress-linux-vmm".into())
        .spawn(move || {
            let _ = done_tx.send(machine::run(&config));
        })
        .map_err(|e| format!("cannot spawn the VMM thread: {e}"))?;
    let vm = match vm_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(vm) => vm,
        Err(_) => {
            return match done_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Err(e)) => Err(e.to_string()),
                _ => Err("the Linux VM did not start".into()),
            }
        }
    };
    let echo = opts.progress.then(Instant::now);
    let mut lines = ConsoleLines { buf: console, echo, at: 0, partial: String::new(), all: Vec::new() };
    let storm = drive(opts, &vm, &mut lines);
    vm.quit();
    let report = done_rx.recv_timeout(Duration::from_secs(60)).ok().and_then(Result::ok);
    lines.poll();
    Ok(judge(opts, storm, &lines.all, report))
}

/// What [`drive`] hands the judge.
#[derive(Default)]
struct Storm {
    broken: Vec<String>,
    boot_s: f64,
    storm_s: f64,
    report_wait_s: f64,
    mem_total_kib: u64,
    steps: Vec<TargetStep>,
    checkers: CheckerReport,
    /// The guest's last memory report.
    last_mem: Option<GuestMemReport>,
    guest_vmstat: Option<(u64, u64)>,
    device_at_vmstat: Option<(u64, u64)>,
    planted_fired: u64,
    /// The balloon's (reported ranges, reported bytes) when the storm began.
    reported_at_start: (u64, u64),
    /// The balloon's free page report requests when the storm began.
    report_requests_at_start: u64,
    mem_steps: Vec<MemStep>,
    /// The guest's MemTotal due at the end: at the first report plus virtio-mem's plugged size.
    mem_total_want_kib: u64,
}

impl Storm {
    /// Reads new console lines: the checkers' and the memory reports. Whether a memory report
    /// came.
    fn note(&mut self, lines: &[String]) -> bool {
        note_checkers(lines, &mut self.checkers);
        let mut reported = false;
        for report in lines.iter().filter_map(|l| GuestMemReport::parse(l)) {
            self.last_mem = Some(report);
            reported = true;
        }
        reported
    }
}

/// Boots to the checkers, runs the storm, and reads the guest's final vmstat.
fn drive(opts: &LinuxStressOptions, vm: &Arc<VmControl>, lines: &mut ConsoleLines) -> Storm {
    let mut s = Storm::default();
    let started = Instant::now();
    let Some(balloon) = vm.balloon().cloned() else {
        s.broken.push("the VM has no balloon".into());
        return s;
    };
    let lock = || balloon.lock().unwrap_or_else(|e| e.into_inner());
    let stats = || lock().device().stats();
    // Boot: the first memory report and the checkers' first progress.
    let (mut memtest_ok, mut seedcheck_ok) = (opts.memtest_mib == 0, opts.seedcheck_mib == 0);
    let mut churn_ok = opts.churn_mib == 0;
    while !(memtest_ok && seedcheck_ok && churn_ok && s.mem_total_kib > 0) {
        if started.elapsed() > opts.boot_wait {
            s.broken.push(format!(
                "boot: the checkers did not all make progress within {} s (memtester: {memtest_ok}, \
                 seedcheck: {seedcheck_ok}, churn: {churn_ok}, memory report: {})",
                opts.boot_wait.as_secs(),
                s.mem_total_kib > 0
            ));
            return s;
        }
        let new = lines.poll();
        if s.note(&new) {
            s.mem_total_kib = s.last_mem.map_or(0, |m| m.mem_total_kib);
        }
        for l in &new {
            memtest_ok |= l.contains("zapvm-guest: memtest pass=");
            seedcheck_ok |= l.contains("zapvm-guest: seedcheck ready");
            churn_ok |= l.contains("zapvm-guest: churn round=");
        }
        if !s.checkers.failures.is_empty() {
            s.broken.push(format!("boot: a checker failed: {}", s.checkers.failures[0]));
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    s.boot_s = started.elapsed().as_secs_f64();
    // The targets: reachable ones leave the checkers and some headroom; one in four asks for
    // nearly everything (toward OOM).
    let total = s.mem_total_kib * 1024;
    let checkers = opts.checkers_bytes();
    let mut reachable = total.saturating_sub(checkers + HEADROOM_BYTES) / PAGE_SIZE;
    if let Some(max) = opts.max_target {
        reachable = reachable.min(max / PAGE_SIZE);
    }
    // Toward OOM: more than the guest has free beside the checkers.
    let greedy = total.saturating_sub(4 << 20) / PAGE_SIZE;
    let greedy_from = (total.saturating_sub(checkers + (8 << 20)) / PAGE_SIZE).min(greedy);
    if reachable < 256 {
        s.broken.push(format!(
            "guest RAM too small: MemTotal {} KiB leaves no room for the balloon beside {} MiB of checkers",
            s.mem_total_kib,
            checkers >> 20
        ));
        return s;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let storm_started = Instant::now();
    {
        let at = stats();
        s.reported_at_start = (at.reported_ranges, at.reported_bytes);
        s.report_requests_at_start = at.report_requests;
    }
    let mut current = 0u64;
    #[cfg(feature = "fault-injection")]
    let mut plant_due = opts.plant_stray_discard;
    // A run with a planted fault ends its storm once the fault fired: the judge's verdict on it
    // is what that run exists for.
    #[cfg(feature = "fault-injection")]
    let planted_run = opts.plant_stray_discard;
    #[cfg(not(feature = "fault-injection"))]
    let planted_run = false;
    let goal_met = |s: &Storm| (planted_run && s.planted_fired > 0) || (s.steps.len() as u64) >= opts.targets;
    // virtio-mem's requested sizes come from their own stream, so that a run with virtio-mem
    // sets the balloon targets a run without it sets.
    let virtio_mem = vm.virtio_mem().cloned();
    let mut mem_unit = 0;
    if let Some(device) = &virtio_mem {
        let block = device.lock().unwrap_or_else(|e| e.into_inner()).device().block_size();
        match linux_virtio_mem_unit(&lines.all) {
            Some(unit) if unit % block == 0 => mem_unit = unit,
            other => {
                s.broken.push(format!(
                    "Linux's virtio_mem logged no usable plug unit at probe ({other:?}; the device's block is \
                     {block:#x})"
                ));
                return s;
            }
        }
    }
    let mut mem_rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x7669_7274_696f_6d65);
    while !goal_met(&s) && storm_started.elapsed() < opts.duration {
        // Before one balloon target in two, a virtio-mem step; never while the balloon fights
        // for a target toward OOM (Linux could not empty a block to unplug it).
        if let Some(device) = virtio_mem.as_ref().filter(|_| current <= reachable) {
            if mem_rng.random_range(0..2) == 0 {
                let at = storm_started.elapsed();
                let step = virtio_mem_step(opts, device, mem_unit, at, &mut mem_rng, &mut s, lines);
                let failed = !step.reached || !s.checkers.failures.is_empty();
                s.mem_steps.push(step);
                if failed {
                    break;
                }
            }
        }
        // A planted stray discard fires with the next inflate: the next target asks for more.
        #[cfg(feature = "fault-injection")]
        let inflate_next =
            !plant_due && opts.plant_stray_discard && s.planted_fired == 0 && current < reachable;
        #[cfg(not(feature = "fault-injection"))]
        let inflate_next = false;
        let target = loop {
            if inflate_next {
                break rng.random_range(current + 1..=reachable);
            }
            let t = if opts.oom_targets && rng.random_range(0..opts.oom_one_in) == 0 {
                // Beyond what the guest has now: hot-plugged memory counts (without it such a
                // target is reachable whenever virtio-mem has plugged more than the margin).
                let plugged = virtio_mem.as_ref().map_or(0, |m| {
                    m.lock().unwrap_or_else(|e| e.into_inner()).device().plugged_size() / PAGE_SIZE
                });
                rng.random_range(greedy_from + plugged..=greedy + plugged)
            } else if rng.random_range(0..8) == 0 {
                0
            } else {
                rng.random_range(1..=reachable)
            };
            if t != current {
                break t;
            }
        };
        let before = stats();
        let from = u64::from(before.actual_pages);
        lock().update_config(|b| b.set_target_pages(target as u32));
        let step_started = Instant::now();
        let mut step = TargetStep {
            at_ms: storm_started.elapsed().as_millis() as u64,
            target_pages: target,
            from_pages: from,
            reached: false,
            ms: 0,
            actual_pages: from,
            oom_deflated_pages: 0,
            out_of_puff: 0,
        };
        let mut explained_at: Option<Instant> = None;
        loop {
            let now = stats();
            let new = lines.poll();
            step.out_of_puff += new.iter().filter(|l| l.contains("Out of puff")).count() as u64;
            s.note(&new);
            step.actual_pages = u64::from(now.actual_pages);
            if target > from {
                step.oom_deflated_pages = now.deflated_pages - before.deflated_pages;
            }
            if u64::from(now.actual_pages) == target && now.ballooned_pages == target {
                step.reached = true;
                break;
            }
            if step_started.elapsed() >= opts.step_wait || !s.checkers.failures.is_empty() {
                break;
            }
            // A target the driver cannot reach: once it said why (it ran out of pages, or Linux
            // deflated on OOM), a few seconds more of the fight, then the next target.
            if target > from && (step.out_of_puff > 0 || step.oom_deflated_pages > 0) {
                let since = *explained_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= EXPLAINED_STEP_END {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        step.ms = step_started.elapsed().as_millis() as u64;
        current = target;
        let failed = !s.checkers.failures.is_empty();
        if opts.progress {
            eprintln!("stress --linux: {step:?}");
        }
        s.steps.push(step);
        if failed {
            break;
        }
        #[cfg(feature = "fault-injection")]
        {
            s.planted_fired = lock().device().planted_stray_discards();
        }
        #[cfg(feature = "fault-injection")]
        if plant_due && s.steps.last().is_some_and(|st| st.reached) {
            if let Some(pfn) = find_seedcheck_page(vm, &mut rng) {
                lock().device_mut().plant_stray_discard(pfn);
                plant_due = false;
                tracing::warn!("planted fault: the balloon will discard seedcheck's page at PFN {pfn:#x}");
            }
        }
    }
    // Free page reporting during the storm, which the judge requires when churn runs: churn runs
    // at nice 19, so the driver's work starves it while targets come one after another (where
    // guest ring 0 is emulated a 16 MiB round takes tens of seconds). When nothing was reported
    // yet, the balloon holds its last target while churn finishes a round and Linux reports the
    // blocks it freed, up to `duration` from the storm's start.
    let targets_done = storm_started.elapsed();
    if opts.churn_mib > 0 && !planted_run {
        while stats().reported_bytes <= s.reported_at_start.1
            && storm_started.elapsed() < opts.duration
            && s.checkers.failures.is_empty()
        {
            s.note(&lines.poll());
            std::thread::sleep(Duration::from_millis(100));
        }
        s.report_wait_s = (storm_started.elapsed() - targets_done).as_secs_f64();
    }
    s.storm_s = storm_started.elapsed().as_secs_f64();
    #[cfg(feature = "fault-injection")]
    {
        s.planted_fired = lock().device().planted_stray_discards();
    }
    // A last target the guest can give, so that the balloon comes to rest (after a target
    // toward OOM the driver keeps trying, and Linux keeps deflating on OOM).
    let settle_target = u64::from(stats().actual_pages).min(reachable);
    lock().update_config(|b| b.set_target_pages(settle_target as u32));
    let settle_until = Instant::now() + opts.step_wait;
    loop {
        let now = stats();
        s.note(&lines.poll());
        if u64::from(now.actual_pages) == settle_target && now.ballooned_pages == settle_target {
            break;
        }
        if Instant::now() >= settle_until {
            s.broken.push(format!(
                "the balloon did not come to rest at {settle_target} pages within {} s (actual {}, {} ballooned)",
                opts.step_wait.as_secs(),
                now.actual_pages,
                now.ballooned_pages
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // virtio-mem at rest too: plugged what was last requested.
    let plugged =
        || virtio_mem.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).device().stats());
    let settle_until = Instant::now() + opts.step_wait;
    while let Some(m) = plugged().filter(|m| m.plugged_size != m.requested_size) {
        s.note(&lines.poll());
        if Instant::now() >= settle_until {
            s.broken.push(format!(
                "virtio-mem did not come to rest within {} s: {} MiB plugged of {} MiB requested",
                opts.step_wait.as_secs(),
                m.plugged_size >> 20,
                m.requested_size >> 20
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest's vmstat must agree with the device once the balloon is still, and its MemTotal
    // with what virtio-mem plugged: a report that comes after a reading of the devices, with
    // the devices unchanged since.
    let boot_total_kib = s.mem_total_kib;
    let mem_total_due =
        |plugged: Option<VirtioMemStats>| boot_total_kib + plugged.map_or(0, |m| m.plugged_size >> 10);
    let until = Instant::now() + Duration::from_secs(REPORT_S * 6);
    let mut device = stats();
    let mut mem_total_want = mem_total_due(plugged());
    let mut seen_since = false;
    while Instant::now() < until {
        seen_since |= s.note(&lines.poll());
        let now = stats();
        let want = mem_total_due(plugged());
        if (now.inflated_pages, now.deflated_pages) != (device.inflated_pages, device.deflated_pages)
            || want != mem_total_want
        {
            (device, mem_total_want) = (now, want);
            seen_since = false;
        } else if seen_since
            && s.last_mem.is_some_and(|m| {
                m.told_host() == (device.inflated_pages, device.deflated_pages) && m.mem_total_kib == want
            })
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    s.mem_total_want_kib = mem_total_want;
    // A last look at the checkers: a pass or report period more.
    let settle = Instant::now() + Duration::from_secs(6);
    while Instant::now() < settle {
        s.note(&lines.poll());
        std::thread::sleep(Duration::from_millis(100));
    }
    s.guest_vmstat = s.last_mem.map(|m| m.told_host());
    s.device_at_vmstat = Some((device.inflated_pages, device.deflated_pages));
    s
}

/// Sets a random virtio-mem requested size (whole `unit`s, 0 to the region, other than the
/// current one) and waits, at most `step_wait`, for Linux's virtio_mem to plug or unplug to it.
fn virtio_mem_step(
    opts: &LinuxStressOptions,
    device: &VirtioMemDevice,
    unit: u64,
    at: Duration,
    rng: &mut ChaCha8Rng,
    s: &mut Storm,
    lines: &mut ConsoleLines,
) -> MemStep {
    let lock = || device.lock().unwrap_or_else(|e| e.into_inner());
    let st = lock().device().stats();
    let requested = pick_target(rng, st.requested_size / unit, st.region_size / unit) * unit;
    let mut step = MemStep {
        at_ms: at.as_millis() as u64,
        requested_bytes: requested,
        from_bytes: st.plugged_size,
        reached: false,
        ms: 0,
        plugged_bytes: st.plugged_size,
    };
    if opts.progress {
        eprintln!(
            "stress --linux: virtio-mem requested size {} MiB (plugged {} MiB)",
            requested >> 20,
            st.plugged_size >> 20
        );
    }
    let started = Instant::now();
    if let Err(e) = lock().update_config(|m| m.set_requested_size(requested)) {
        s.broken.push(format!("virtio-mem refused the requested size {requested:#x}: {e}"));
        return step;
    }
    loop {
        s.note(&lines.poll());
        step.plugged_bytes = lock().device().plugged_size();
        if step.plugged_bytes == requested {
            step.reached = true;
            break;
        }
        if started.elapsed() >= opts.step_wait || !s.checkers.failures.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    step.ms = started.elapsed().as_millis() as u64;
    if opts.progress {
        eprintln!("stress --linux: {step:?}");
    }
    step
}

/// The unit in which the guest's virtio_mem plugs and unplugs, from its probe's log line
/// ("virtio_mem virtioN: subblock size: 0x..." or "big block size: 0x..."): the larger of the
/// device's block and the guest's pageblock (2^(MAX_ORDER - 1) pages, 4 MiB, in a guest
/// without hugetlbfs such as this one). A requested size between two multiples of it is
/// followed only to the lower one (seen: 44 MiB plugged for 46 requested, for good), so the
/// storm requests whole units.
fn linux_virtio_mem_unit(console: &[String]) -> Option<u64> {
    console.iter().filter(|l| l.contains("virtio_mem")).find_map(|l| {
        let i = l
            .find("subblock size: 0x")
            .map(|i| i + "subblock size: 0x".len())
            .or_else(|| l.find("big block size: 0x").map(|i| i + "big block size: 0x".len()))?;
        let hex: String = l[i..].chars().take_while(char::is_ascii_hexdigit).collect();
        u64::from_str_radix(&hex, 16).ok().filter(|&u| u > 0)
    })
}

/// A guest page holding seedcheck's data (word 0 its marker), read without the VMM's table; one
/// at random among the first few found.
#[cfg(feature = "fault-injection")]
fn find_seedcheck_page(vm: &VmControl, rng: &mut ChaCha8Rng) -> Option<u64> {
    let mut found = Vec::new();
    for &(gpa, hva, len) in vm.ram_regions() {
        let mut word = [0u8; 8];
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            if peek(hva + off, &mut word) && u64::from_le_bytes(word) == SEEDCHECK_MARKER {
                found.push((gpa + off as u64) / PAGE_SIZE);
                if found.len() >= 64 {
                    break;
                }
            }
        }
    }
    (!found.is_empty()).then(|| found[rng.random_range(0..found.len())])
}

/// Checks the invariants and builds the report.
fn judge(
    opts: &LinuxStressOptions,
    storm: Storm,
    console: &[String],
    report: Option<RunReport>,
) -> LinuxStressReport {
    let mut broken = storm.broken;
    let outcome = report.as_ref().map(|r| r.outcome.clone());
    match &outcome {
        Some(VmOutcome::Quit) => {}
        None => broken.push("VMM not alive: it did not stop within 60 s of the end".into()),
        Some(other) => broken.push(format!("VMM not alive: the VM ended with {other:?}")),
    }
    // The checkers: no failure, and progress from each.
    let c = &storm.checkers;
    for f in &c.failures {
        broken.push(format!("guest checker: {f}"));
    }
    if opts.memtest_mib > 0 && c.memtest_passes == 0 {
        broken.push(format!("memtester passed no run ({} skipped)", c.memtest_skipped));
    }
    if opts.seedcheck_mib > 0 && c.seedcheck_passes == 0 {
        broken.push("seedcheck reported no pass".into());
    }
    let kernel_problems = kernel_problems(console);
    if let Some(first) = kernel_problems.first() {
        broken.push(format!("guest kernel log: {first}"));
    }
    // Every target reached, or the driver said why.
    let mut not_reached_explained = 0;
    for (i, st) in storm.steps.iter().enumerate() {
        if st.reached {
            continue;
        }
        if st.out_of_puff > 0 || st.oom_deflated_pages > 0 {
            not_reached_explained += 1;
        } else if c.failures.is_empty() {
            broken.push(format!(
                "target {i} ({} pages, from {}) not reached within {} s (actual {}) and the driver said \
                 nothing (no \"Out of puff\", no deflate on OOM)",
                st.target_pages,
                st.from_pages,
                opts.step_wait.as_secs(),
                st.actual_pages
            ));
        }
    }
    let reached: Vec<&TargetStep> = storm.steps.iter().filter(|s| s.reached).collect();
    if reached.is_empty() && storm.mem_total_kib > 0 && broken.is_empty() {
        broken.push("no target reached in the whole storm".into());
    }
    let balloon = report.as_ref().and_then(|r| r.memory_layer.balloon.clone());
    if let Some(d) = &balloon {
        balloon_device_invariants(d, &mut broken);
    }
    if let (Some(guest), Some(device)) = (storm.guest_vmstat, storm.device_at_vmstat) {
        if guest != device {
            broken.push(format!(
                "the guest's /proc/vmstat balloon_inflate/balloon_deflate (+ balloon_migrate) {guest:?} disagree with the device's \
                 inflated/deflated pages {device:?}"
            ));
        }
    }
    // virtio-mem: every requested size reached, the device's own invariants, and the guest's
    // MemTotal its boot MemTotal plus what is plugged.
    let virtio_mem = report.as_ref().and_then(|r| r.memory_layer.virtio_mem.clone());
    for (i, st) in storm.mem_steps.iter().enumerate().filter(|(_, st)| !st.reached) {
        if c.failures.is_empty() {
            broken.push(format!(
                "virtio-mem step {i}: requested {} MiB (from {} MiB) not reached within {} s: {} MiB plugged",
                st.requested_bytes >> 20,
                st.from_bytes >> 20,
                opts.step_wait.as_secs(),
                st.plugged_bytes >> 20
            ));
        }
    }
    if let Some(d) = &virtio_mem {
        virtio_mem_device_invariants(d, &mut broken);
    }
    let mem_total_kib_final = storm.last_mem.map_or(0, |m| m.mem_total_kib);
    if storm.mem_total_want_kib > 0 && mem_total_kib_final != storm.mem_total_want_kib {
        broken.push(format!(
            "the guest's MemTotal is {mem_total_kib_final} KiB at the end, not {} KiB (its MemTotal at boot plus \
             what virtio-mem plugged)",
            storm.mem_total_want_kib
        ));
    }
    let kinds = report.as_ref().map(|r| r.memory_layer.notifier.kinds.clone()).unwrap_or_default();
    let subscribers =
        report.as_ref().map(|r| r.memory_layer.notifier.subscribers.clone()).unwrap_or_default();
    notifier_invariants(&kinds, &subscribers, &mut broken);
    let discard_accounting = DiscardAccounting {
        notifier_bytes: kinds
            .iter()
            .filter(|k| k.kind == "discard" && k.origin == "vmm")
            .map(|k| k.bytes)
            .sum(),
        discard_storm_bytes: 0,
        balloon_bytes: balloon.as_ref().map(|d| d.bytes_discarded).unwrap_or(0),
        virtio_mem_bytes: virtio_mem.as_ref().map_or(0, |d| d.bytes_discarded),
    };
    if matches!(outcome, Some(VmOutcome::Quit)) {
        // 4 KiB pages without THP: the notifier saw exactly what the balloon and virtio-mem
        // discarded.
        broken.extend(unaccounted_discards(&discard_accounting, true));
    }
    let (ranges_at_start, bytes_at_start) = storm.reported_at_start;
    let reported_ranges_storm =
        balloon.as_ref().map_or(0, |b| b.reported_ranges.saturating_sub(ranges_at_start));
    let reported_bytes_storm =
        balloon.as_ref().map_or(0, |b| b.reported_bytes.saturating_sub(bytes_at_start));
    let report_requests_storm =
        balloon.as_ref().map_or(0, |b| b.report_requests.saturating_sub(storm.report_requests_at_start));
    if balloon.is_some() && storm.boot_s > 0.0 {
        if let Some(why) = reporting_invariant(opts.churn_mib, c.churn_bytes, reported_bytes_storm) {
            // What tells a driver that never asked (no request: nothing to report, or it was
            // not woken) from a device that refused what it asked.
            let free = storm.last_mem.map_or("no memory report".into(), |m| {
                format!(
                    "{} free blocks of 2^{REPORT_ORDER} pages, MemFree {} KiB",
                    m.free_blocks, m.mem_free_kib
                )
            });
            broken.push(format!(
                "{why} (report requests during the storm: {report_requests_storm}; the guest's last memory \
                 report: {free})"
            ));
        }
    }
    let reached_ms: u64 = reached.iter().map(|s| s.ms).sum();
    let mem_reached: Vec<&MemStep> = storm.mem_steps.iter().filter(|s| s.reached).collect();
    let moved: u64 = reached.iter().map(|s| s.target_pages.abs_diff(s.from_pages)).sum();
    LinuxStressReport {
        ok: broken.is_empty(),
        broken,
        seed: opts.seed,
        mem_bytes: opts.mem,
        boot_s: storm.boot_s,
        storm_s: storm.storm_s,
        report_wait_s: storm.report_wait_s,
        mem_total_kib: storm.mem_total_kib,
        targets: storm.steps.len() as u64,
        reached: reached.len() as u64,
        not_reached_explained,
        step_ms_mean: if reached.is_empty() { 0.0 } else { reached_ms as f64 / reached.len() as f64 },
        step_ms_max: reached.iter().map(|s| s.ms).max().unwrap_or(0),
        pages_per_s: if reached_ms == 0 { 0.0 } else { moved as f64 * 1000.0 / reached_ms as f64 },
        oom_deflate_events: storm.steps.iter().filter(|s| s.oom_deflated_pages > 0).count() as u64,
        oom_deflated_pages: storm.steps.iter().map(|s| s.oom_deflated_pages).sum(),
        out_of_puff_lines: storm.steps.iter().map(|s| s.out_of_puff).sum(),
        steps: storm.steps,
        checkers: storm.checkers,
        guest_vmstat: storm.guest_vmstat,
        balloon,
        discard_accounting,
        notifier: kinds,
        outcome,
        kernel_problems,
        planted_faults_fired: storm.planted_fired,
        reported_ranges_storm,
        reported_bytes_storm,
        report_requests_storm,
        guest_mem_last: storm.last_mem,
        virtio_mem_reached: mem_reached.len() as u64,
        virtio_mem_step_ms_mean: if mem_reached.is_empty() {
            0.0
        } else {
            mem_reached.iter().map(|s| s.ms).sum::<u64>() as f64 / mem_reached.len() as f64
        },
        virtio_mem_steps: storm.mem_steps,
        virtio_mem,
        mem_total_kib_final,
    }
}

/// Free page reporting worked during the storm: with churn running (`churn_mib` > 0), the
/// balloon received reports (`reported_bytes_storm` > 0), each of whole blocks of
/// page_reporting's order ([`REPORT_ORDER`]; the device coalesces adjacent ones, so their sum is
/// a multiple of that block). `None` when that holds, else what broke.
pub fn reporting_invariant(churn_mib: u64, churn_bytes: u64, reported_bytes_storm: u64) -> Option<String> {
    let block = PAGE_SIZE << REPORT_ORDER;
    if churn_mib == 0 {
        None
    } else if churn_bytes == 0 {
        Some("churn reported no memory allocated and freed: free page reporting had nothing to report".into())
    } else if reported_bytes_storm == 0 {
        Some(format!(
            "free page reporting: the balloon received no report during the storm, although churn allocated \
             and freed {churn_bytes} bytes"
        ))
    } else if !reported_bytes_storm.is_multiple_of(block) {
        Some(format!(
            "free page reporting: {reported_bytes_storm} bytes reported during the storm, not whole blocks of \
             {block} bytes (page_reporting_order {REPORT_ORDER})"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reporting_is_required_when_churn_runs() {
        let block = PAGE_SIZE << REPORT_ORDER;
        assert_eq!(reporting_invariant(16, 64 << 20, 3 * block), None);
        assert_eq!(reporting_invariant(0, 0, 0), None, "no churn: no report required");
        assert!(reporting_invariant(16, 64 << 20, 0).unwrap().contains("no report during the storm"));
        assert!(reporting_invariant(16, 0, 0).unwrap().contains("churn reported no memory"));
        assert!(reporting_invariant(16, 64 << 20, block + PAGE_SIZE).unwrap().contains("not whole blocks"));
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        assert_eq!(LinuxStressOptions::new().validate(), Ok(()));
        let bad = |o: LinuxStressOptions| o.validate().unwrap_err();
        assert!(bad(LinuxStressOptions { memtest_mib: 0, seedcheck_mib: 0, ..LinuxStressOptions::new() })
            .contains("needs a checker"));
        assert!(bad(LinuxStressOptions { targets: 0, ..LinuxStressOptions::new() }).contains("--targets"));
        assert!(bad(LinuxStressOptions { duration: Duration::ZERO, ..LinuxStressOptions::new() })
            .contains("duration"));
        assert!(bad(LinuxStressOptions { mem: 64 << 20, ..LinuxStressOptions::new() }).contains("too small"));
        assert!(bad(LinuxStressOptions { mem: 128 << 20, churn_mib: 64, ..LinuxStressOptions::new() })
            .contains("--mem"));
        assert!(
            bad(LinuxStressOptions { oom_one_in: 0, ..LinuxStressOptions::new() }).contains("--oom-one-in")
        );
        for region in [0, 64 << 20, (128 << 20) + (2 << 20)] {
            let o = LinuxStressOptions { virtio_mem_region: Some(region), ..LinuxStressOptions::new() };
            assert!(bad(o).contains("--virtio-mem-region"), "{region}");
        }
        let whole = LinuxStressOptions { virtio_mem_region: Some(256 << 20), ..LinuxStressOptions::new() };
        assert_eq!(whole.validate(), Ok(()));
    }

    #[test]
    fn the_memory_report_is_read_from_its_line() {
        let line = "[   12.5] zapvm-guest: mem MemTotal=180224 MemFree=150000 balloon_inflate=900 \
                    balloon_deflate=100 balloon_migrate=7 free_blocks=61";
        let m = GuestMemReport::parse(line).unwrap();
        assert_eq!(
            (m.mem_total_kib, m.mem_free_kib, m.told_host(), m.free_blocks, m.ballooned()),
            (180224, 150000, (907, 107), 61, 800)
        );
        assert_eq!(GuestMemReport::parse(&line.replace(" free_blocks=61", "")), None, "every field required");
        assert_eq!(GuestMemReport::parse("zapvm-guest: memtest pass=1 mib=4 tested=4MB ok"), None);
    }

    #[test]
    fn virtio_mem_unit_is_read_from_the_drivers_probe_line() {
        let lines =
            |l: &str| vec!["[    1.0] virtio_mem virtio1: start address: 0x1c0000000".to_string(), l.into()];
        assert_eq!(
            linux_virtio_mem_unit(&lines("[    1.1] virtio_mem virtio1: subblock size: 0x400000")),
            Some(4 << 20)
        );
        assert_eq!(
            linux_virtio_mem_unit(&lines("virtio_mem virtio1: big block size: 0x8000000")),
            Some(128 << 20)
        );
        assert_eq!(linux_virtio_mem_unit(&lines("virtio_mem virtio1: subblock size: 0x")), None);
        assert_eq!(linux_virtio_mem_unit(&lines("virtio_balloon virtio0: subblock size: 0x1000")), None);
    }

    #[test]
    fn churn_progress_is_read_from_its_line() {
        let mut c = CheckerReport::default();
        let lines =
            ["zapvm-guest: churn round=7 mib=16 churned_bytes=117440512 short_rounds=0 ok".to_string()];
        note_checkers(&lines, &mut c);
        assert_eq!((c.churn_rounds, c.churn_bytes), (7, 117440512));
        note_checkers(
            &["zapvm-guest: FAIL churn round=8 page=1 word=2 holds=0x0 expected=0x1".into()],
            &mut c,
        );
        assert_eq!(c.failures.len(), 1);
    }
}
