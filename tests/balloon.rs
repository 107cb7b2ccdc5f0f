//! End-to-end: the test guest's virtio-balloon driver ([`Workload::Balloon`]) against the VMM's
//! virtio-mmio balloon, in-process.
//!
//! A controller thread (started by the VM's after-start hook) moves the balloon's target up and
//! down and, after each change, waits — polling the device's counters every few milliseconds,
//! up to a deadline — until the guest's `actual` and the device's ballooned pages both equal
//! the target. The guest writes `actual` only after it has checked every page it owns (pattern)
//! and every page it got back (zeros) and refilled the latter, so at that point the host side can
//! be checked: the resident memory of guest RAM (the `Rss` of its mappings in
//! `/proc/self/smaps`, which other tests running in this process do not disturb) fell by the
//! inflated bytes or rose by the deflated ones, and the device's counters add up (contiguous PFN
//! batches became one discard each, the guest's unrequested deflate-on-OOM and its free page
//! reports are visible). Then it stops the VM; a run that ends with anything but
//! [`VmOutcome::Quit`] means the guest failed a check (its message is in the outcome).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::devices::virtio::balloon::{BalloonConfig, BalloonStats};
use vmm::devices::virtio::mmio::TransportStats;
use vmm::machine::{run, Console, RunReport, VmConfig, VmControl, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest RAM of every test.
const RAM: u64 = 128 * MIB;
/// How long one balloon step may take (inflating 8192 pages is 32 requests plus a verify pass
/// of the guest's ~120 MiB; a loaded 2-core host needs far less than this).
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// Pages of the guest driver's free area that it reports each time (see guest balloon.rs).
const REPORTED_PAGES: u64 = 48;

/// The VMs of this file are run one at a time: each keeps a vCPU busy polling, and the RSS
/// figures are easier to read without a second VM faulting memory in meanwhile.
static SERIAL: Mutex<()> = Mutex::new(());

/// Everything the controller learned, for the final assertions and the log.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    final_stats: Option<BalloonStats>,
    transport: Option<TransportStats>,
}

/// Where the after-start hook leaves the controller thread (its log, or why it failed).
type ControllerSlot = Arc<Mutex<Option<JoinHandle<Result<Log, String>>>>>;

/// The controller's view of a running VM.
struct Controller {
    vm: Arc<VmControl>,
    /// Set by the test once `run` returned: waiting is pointless then.
    ended: Arc<AtomicBool>,
    /// vCPUs of the VM (vCPU 0 drives the balloon over its slice, the others idle).
    vcpus: u32,
    log: Log,
}

impl Controller {
    fn stats(&self) -> BalloonStats {
        self.vm.balloon().expect("the VM has a balloon").lock().unwrap().device().stats()
    }

    fn transport(&self) -> TransportStats {
        self.vm.balloon().unwrap().lock().unwrap().stats().clone()
    }

    fn set_target(&mut self, pages: u32) {
        self.vm.balloon().unwrap().lock().unwrap().update_config(|b| b.set_target_pages(pages));
        self.log.lines.push(format!("target -> {pages} pages"));
    }

    /// Polls the device every 5 ms until `done` holds, or fails at the deadline (or when the VM
    /// has already ended).
    fn wait(&mut self, what: &str, done: impl Fn(&BalloonStats) -> bool) -> BalloonStats {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if done(&s) {
                self.log.lines.push(format!("{what}: after {} ms", start.elapsed().as_millis()));
                return s;
            }
            assert!(!self.ended.load(Ordering::SeqCst), "the VM ended while waiting for {what}: {s:?}");
            assert!(start.elapsed() < STEP_DEADLINE, "timed out waiting for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the guest has finished a step to `target`: `actual` and the bitmap agree.
    fn wait_settled(&mut self, target: u32, extra: impl Fn(&BalloonStats) -> bool) -> BalloonStats {
        self.wait(&format!("balloon at {target} pages"), |s| {
            s.target_pages == target
                && s.actual_pages == target
                && s.ballooned_pages == u64::from(target)
                && extra(s)
        })
    }

    /// Resident bytes of guest RAM: the `Rss` of every mapping in `/proc/self/smaps` that
    /// overlaps a guest RAM region.
    fn guest_rss(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut total = 0;
        let mut inside = false;
        for line in smaps.lines() {
            let header = line.split_whitespace().next().and_then(|range| {
                let (a, b) = range.split_once('-')?;
                Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
            });
            if let Some((start, end)) = header {
                inside = self.vm.ram_regions().iter().any(|&(_, hva, len)| start < hva + len && hva < end);
            } else if let Some(kb) = line.strip_prefix("Rss:") {
                if inside {
                    total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024;
                }
            }
        }
        total
    }

    /// Waits until guest RAM's resident bytes reach `bytes` (the guest's vCPUs filled their
    /// slices).
    fn wait_rss_at_least(&mut self, bytes: u64) {
        let start = Instant::now();
        loop {
            let rss = self.guest_rss();
            if rss >= bytes {
                return;
            }
            assert!(!self.ended.load(Ordering::SeqCst), "the VM ended while filling ({rss} bytes resident)");
            assert!(start.elapsed() < STEP_DEADLINE, "guest RAM RSS stuck at {rss} bytes");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process's VmRSS (for the log).
    fn process_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line[6..].trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    }

    fn rss(&mut self, label: &str) -> u64 {
        let (guest, process) = (self.guest_rss(), Self::process_rss());
        self.log.lines.push(format!(
            "{label}: guest RAM RSS {:.1} MiB, process VmRSS {:.1} MiB",
            guest as f64 / MIB as f64,
            process as f64 / MIB as f64
        ));
        guest
    }
}

/// Runs a 128 MiB Balloon VM on `vcpus` vCPUs with `scenario` as its controller; returns the run's report
/// and the controller's log. The controller always stops the VM, also when it panics (the panic
/// is re-raised here, after the run).
fn run_balloon(
    hostile: bool,
    ioeventfd: bool,
    memory: MemoryConfig,
    vcpus: u32,
    scenario: impl FnOnce(&mut Controller) + Send + 'static,
) -> (RunReport, Log) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ended = Arc::new(AtomicBool::new(false));
    let slot: ControllerSlot = Arc::default();
    let scenario = Mutex::new(Some(scenario));
    let (hook_slot, hook_ended) = (slot.clone(), ended.clone());
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let scenario = scenario.lock().unwrap().take().expect("one VM, one start");
        let mut controller =
            Controller { vm: vm.clone(), ended: hook_ended.clone(), vcpus, log: Log::default() };
        let thread = std::thread::spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(|| {
                scenario(&mut controller);
                controller.log.final_stats = Some(controller.stats());
                controller.log.transport = Some(controller.transport());
            }));
            controller.vm.quit();
            match result {
                Ok(()) => Ok(controller.log),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!("controller panicked: {msg}\nlog: {:#?}", controller.log.lines))
                }
            }
        });
        *hook_slot.lock().unwrap() = Some(thread);
    });
    let config = VmConfig {
        memory,
        vcpus,
        timeout: Some(Duration::from_secs(300)),
        console: Console::Null,
        monitor: false,
        after_start: Some(hook),
        balloon: Some(BalloonConfig::default()),
        ioeventfd,
        ..VmConfig::test_guest(TestGuestParams {
            seed: 0xba11,
            hostile,
            ..TestGuestParams::new(Workload::Balloon)
        })
    };
    let report = run(&config).expect("the VM starts");
    ended.store(true, Ordering::SeqCst);
    let controller = slot.lock().unwrap().take().expect("the hook ran").join().expect("controller thread");
    // A guest failure ends the run first and is the real cause: report it before the
    // controller's (then inevitable) timeout.
    assert_eq!(report.outcome, VmOutcome::Quit, "controller: {controller:?}\nreport: {report:#?}");
    let log = controller.unwrap_or_else(|e| panic!("{e}"));
    for line in &log.lines {
        eprintln!("{line}");
    }
    (report, log)
}

fn anonymous() -> MemoryConfig {
    MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false }
}

/// Waits until the driver is up: the device is active, the first statistics arrived and the
/// first free page report (made after the initial fill) was discarded.
fn wait_driver_up(c: &mut Controller) -> BalloonStats {
    c.wait("driver up, slice filled, first free page report", |s| {
        s.guest_stats_updates >= 1 && s.reported_ranges >= 2
    })
}

/// The standard run: 0 -> 4096 -> 1024 -> 8192 -> 0 pages with the host-side checks after each
/// step (see the crate docs), a statistics request, and the 2 MiB block counts.
fn standard_scenario(c: &mut Controller) {
    let up = wait_driver_up(c);
    assert_eq!(c.transport().activations, 1);
    assert_eq!(up.guest_stats["free_memory"], 64 * PAGE, "{:?}", up.guest_stats);
    // vCPU 0's slice.
    let total = up.guest_stats["total_memory"];
    assert!(total > 100 * MIB / u64::from(c.vcpus) && total < RAM, "total_memory {total}");
    // Every vCPU fills its slice: the work area is all RAM above 6 MiB (122 MiB).
    c.wait_rss_at_least(RAM - 7 * MIB);
    let filled = c.rss("filled");

    // 0 -> 4096. The first non-zero target also triggers the guest's deflate-on-OOM
    // simulation (a quarter, without a host request) and the re-inflate to the target.
    c.set_target(4096);
    let s = c.wait_settled(4096, |s| s.deflated_pages >= 1024);
    assert_eq!(s.deflated_pages, 1024, "deflate-on-OOM: a quarter came back unrequested");
    assert_eq!(s.inflated_pages, 4096 + 1024);
    let inflated = c.rss("4096 pages ballooned");
    assert!(
        filled - inflated >= 4096 * PAGE * 8 / 10,
        "RSS fell by {} KiB only",
        (filled.saturating_sub(inflated)) / 1024
    );

    // The host asks for fresh statistics: the device returns the held buffer, the guest
    // refills and re-queues it.
    let asked = c.vm.balloon().unwrap().lock().unwrap().device_mut().request_guest_stats().unwrap();
    assert!(asked, "the device held a statistics buffer");
    let before = s.guest_stats_updates;
    c.wait("fresh guest statistics", |s| s.guest_stats_updates > before);

    // 4096 -> 1024: the guest takes 3072 pages back, finds zeros, refills them.
    c.set_target(1024);
    c.wait_settled(1024, |_| true);
    let deflated = c.rss("1024 pages ballooned");
    assert!(
        deflated - inflated >= 3072 * PAGE * 8 / 10,
        "RSS rose by {} KiB only",
        deflated.saturating_sub(inflated) / 1024
    );

    // 1024 -> 8192: a large inflate.
    c.set_target(8192);
    let s = c.wait_settled(8192, |_| true);
    if c.vcpus == 1 {
        // The balloon is the last 8192 pages of RAM: 16 whole 2 MiB guest blocks.
        assert_eq!((s.huge_blocks_full, s.huge_blocks_partial), (16, 0));
    }
    let big = c.rss("8192 pages ballooned");
    assert!(
        deflated - big >= 7168 * PAGE * 8 / 10,
        "RSS fell by {} KiB only",
        deflated.saturating_sub(big) / 1024
    );

    // 8192 -> 0.
    c.set_target(0);
    c.wait_settled(0, |_| true);
    let empty = c.rss("balloon empty");
    assert!(empty - big >= 8192 * PAGE * 8 / 10, "RSS rose by {} KiB only", empty.saturating_sub(big) / 1024);
}

/// The device's counters after [`standard_scenario`].
fn check_standard(log: Log, ioeventfd: bool) {
    let s = log.final_stats.expect("controller finished");
    let t = log.transport.expect("controller finished");
    eprintln!("device: {s:#?}\ntransport: {t:?}");
    assert_eq!(t.errors(), 0, "{t:?}");
    assert_eq!(t.needs_reset, 0);
    // Kicks: through an ioeventfd none exits (the event loop processes them); without one
    // (not asked for, or refused by the host: counted) every kick exits.
    let through_ioeventfd = ioeventfd && t.ioeventfd_refused == 0;
    assert_eq!(t.ioeventfd_queues, if through_ioeventfd { 4 } else { 0 }, "{t:?}");
    if through_ioeventfd {
        assert!(t.kicks_exit == 0 && t.kicks_ioeventfd > 0, "{t:?}");
    } else {
        assert_eq!(t.ioeventfd_refused, if ioeventfd { 4 } else { 0 }, "{t:?}");
        assert!(t.kicks_exit > 0 && t.kicks_ioeventfd == 0, "{t:?}");
    }
    assert_eq!(s.errors.total(), 0, "{:?}", s.errors);
    // 4096 + 1024 (back after the OOM deflate) + 7168.
    assert_eq!(s.inflated_pages, 12288);
    assert_eq!(s.deflated_pages, 1024 + 3072 + 8192);
    assert_eq!(s.reinflated_pages, 0);
    assert_eq!((s.inflate_refused, s.deflate_refused), (0, 0));
    // Batches of 256 PFNs.
    assert_eq!(s.inflate_requests, 12288 / 256);
    assert_eq!(s.deflate_requests, (1024 + 3072 + 8192) / 256);
    // Each batch is a run of contiguous pages: exactly one discard per inflate request (the
    // driver kicks once per request). On THP memory a request is half a 2 MiB block: the first
    // half is held, the second completes the block, which is discarded whole (B1): one discard
    // per two requests, and no page is left held.
    let per_discard = if s.thp { 2 } else { 1 };
    assert_eq!((s.discard_ranges - s.reported_ranges) * per_discard, s.inflate_requests, "{s:?}");
    assert_eq!(s.bytes_discarded - s.reported_bytes, s.inflated_pages * PAGE);
    assert_eq!(s.held_pages, 0);
    assert_eq!(s.discard_failures, 0);
    // Free page reports: after the fill and after each deflate (OOM, 1024, 0); each report is
    // two separate ranges of the guest's free area.
    assert_eq!(s.reported_ranges, 4 * 2);
    assert_eq!(s.reported_bytes, 4 * REPORTED_PAGES * PAGE);
    assert_eq!((s.target_pages, s.actual_pages, s.ballooned_pages), (0, 0, 0));
    assert!(s.guest_stats_updates >= 2);
}

#[test]
fn balloon_follows_the_target_and_the_host_gets_the_memory() {
    let (_, log) = run_balloon(false, true, anonymous(), 1, standard_scenario);
    check_standard(log, true);
}

#[test]
fn memfd_ram_and_an_idle_second_vcpu() {
    let memory = MemoryConfig { size: RAM, backend: MemoryBackend::Memfd, thp: false };
    // Without ioeventfds: every kick exits and is processed on the vCPU thread (the fallback
    // where the host refuses KVM_IOEVENTFD).
    let (_, log) = run_balloon(false, false, memory, 2, standard_scenario);
    check_standard(log, false);
}

#[test]
fn thp_ram_counts_whole_2mib_blocks() {
    let memory = MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: true };
    let (report, log) = run_balloon(false, true, memory, 1, standard_scenario);
    assert!(report.thp_aligned);
    assert!(log.final_stats.as_ref().unwrap().thp);
    check_standard(log, true);
}

#[test]
fn hostile_requests_are_counted_and_change_nothing() {
    let (_, log) = run_balloon(true, true, anonymous(), 1, |c| {
        // The guest sends its five malformed requests right after the fill, checks that none of
        // its pages changed (it fails the run otherwise), then reports free pages.
        let s = c.wait("hostile requests answered", |s| s.errors.total() >= 5 && s.reported_ranges >= 2);
        let e = &s.errors;
        assert_eq!(
            (e.pfn_outside_ram, e.pfn_duplicate, e.bad_buffer, e.bad_chain, e.unreadable),
            (1, 1, 1, 1, 1),
            "{e:?}"
        );
        assert_eq!(e.total(), 5, "{e:?}");
        // Beyond RAM, duplicate, length 3, outside RAM; the loop is a bad chain, not a request.
        assert_eq!(s.inflate_refused, 4);
        assert_eq!((s.inflate_requests, s.inflated_pages, s.ballooned_pages), (0, 0, 0));
        assert_eq!(s.discard_ranges, s.reported_ranges, "only the free page report was discarded");
        let t = c.transport();
        assert_eq!((t.needs_reset, t.errors()), (0, 0), "bad buffers do not break the device: {t:?}");

        // The VM keeps running and the driver does its normal steps.
        c.set_target(2048);
        c.wait_settled(2048, |s| s.deflated_pages >= 512);
        c.set_target(0);
        c.wait_settled(0, |_| true);
    });
    let s = log.final_stats.unwrap();
    assert_eq!(s.errors.total(), 5, "no further errors: {:?}", s.errors);
    assert_eq!(s.inflated_pages, 2048 + 512);
    assert_eq!(s.discard_ranges - s.reported_ranges, s.inflate_requests);
}
