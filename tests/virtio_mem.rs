//! End-to-end: the test guest's virtio-mem driver ([`Workload::VirtioMem`]) against the VMM's
//! virtio-mem device and its hot-pluggable region, in-process.
//!
//! A controller thread (started by the VM's after-start hook) moves `requested_size` up and down
//! and, after each change, waits — polling the device's counters every few milliseconds, up to a
//! deadline — until the device's `plugged_size` equals the request and the guest has sent the
//! STATE requests that end its step (it sends them after it has checked that every newly plugged
//! block read zeros, filled it and verified every plugged block). At that point the host side is
//! checked: the resident memory of the region's mapping (its `Rss` in `/proc/self/smaps`) is the
//! plugged size — it rose by what the guest plugged and filled and fell by what it unplugged (the
//! device discards unplugged blocks through the notifier) — and the device's counters add up.
//! Then it stops the VM; a run that ends with anything but [`VmOutcome::Quit`] means the guest
//! failed a check (its message is in the outcome).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::devices::virtio::mem::VirtioMemStats;
use vmm::devices::virtio::mmio::TransportStats;
use vmm::machine::{run, Console, RunReport, VirtioMemSpec, VmConfig, VmControl, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};

const MIB: u64 = 1 << 20;
/// Guest RAM of every test.
const RAM: u64 = 128 * MIB;
/// The device region of every test.
const REGION: u64 = 256 * MIB;
/// The device's block size (the default).
const BLOCK: u64 = 2 * MIB;
/// Blocks per PLUG/UNPLUG request of the guest driver (see guest virtio_mem.rs).
const RUN_BLOCKS: u64 = 8;
/// How long one step may take (plugging 128 MiB is 7 requests, a zero check, a fill and two
/// verify passes of it, plus a verify pass of the driver's RAM slice).
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// The VMs of this file run one at a time (each keeps a vCPU busy polling; RSS figures are
/// easier to read without a second VM faulting memory in meanwhile).
static SERIAL: Mutex<()> = Mutex::new(());

/// Everything the controller learned, for the final assertions and the log.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    final_stats: Option<VirtioMemStats>,
    transport: Option<TransportStats>,
}

/// Where the after-start hook leaves the controller thread (its log, or why it failed).
type ControllerSlot = Arc<Mutex<Option<JoinHandle<Result<Log, String>>>>>;

/// The controller's view of a running VM.
struct Controller {
    vm: Arc<VmControl>,
    /// Set by the test once `run` returned: waiting is pointless then.
    ended: Arc<AtomicBool>,
    log: Log,
}

impl Controller {
    fn stats(&self) -> VirtioMemStats {
        self.vm.virtio_mem().expect("the VM has a virtio-mem device").lock().unwrap().device().stats()
    }

    fn transport(&self) -> TransportStats {
        self.vm.virtio_mem().unwrap().lock().unwrap().stats().clone()
    }

    fn set_requested(&mut self, bytes: u64) {
        self.vm
            .virtio_mem()
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .update_config(|m| m.set_requested_size(bytes))
            .expect("a valid requested size");
        self.log.lines.push(format!("requested_size -> {} MiB", bytes / MIB));
    }

    /// Polls the device every 5 ms until `done` holds, or fails at the deadline (or when the VM
    /// has already ended).
    fn wait(&mut self, what: &str, done: impl Fn(&VirtioMemStats) -> bool) -> VirtioMemStats {
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

    /// Asks for `bytes` and waits until the guest's step is complete: plugged == requested and
    /// the step's STATE requests (one over the plugged prefix if any, one over the rest if any)
    /// arrived.
    fn step(&mut self, bytes: u64) -> VirtioMemStats {
        let before = self.stats().state_requests;
        let states = u64::from(bytes > 0) + u64::from(bytes < REGION);
        self.set_requested(bytes);
        self.wait(&format!("{} MiB plugged", bytes / MIB), |s| {
            s.requested_size == bytes && s.plugged_size == bytes && s.state_requests == before + states
        })
    }

    /// The region's host range.
    fn region_hva(&self) -> (usize, usize) {
        let s = self.stats();
        let &(_, hva, len) = self
            .vm
            .ram_regions()
            .iter()
            .find(|&&(gpa, _, _)| gpa == s.addr)
            .expect("the device region is a region of the VM");
        assert_eq!(len as u64, s.region_size);
        (hva, len)
    }

    /// Resident bytes of the host range `[start, start + len)` (page aligned), by `mincore`: the
    /// region's own pages only (the kernel may merge the region's mapping with the RAM mapping
    /// next to it, so the `Rss` of its mapping in smaps would count RAM too). A page the guest
    /// only read would count (the zero page); at the points where the test measures, every page
    /// is either plugged and written or unplugged and discarded.
    fn rss_of(start: usize, len: usize) -> u64 {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `[start, start + len)` is the region's mapping, which lives as long as the VM
        // (the controller runs before `run` returns); mincore only reads the page tables and
        // writes one byte per page into `vec`, which is that long.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64
    }

    /// The region's resident bytes, logged with `label`.
    fn region_rss(&mut self, label: &str) -> u64 {
        let (hva, len) = self.region_hva();
        let rss = Self::rss_of(hva, len);
        self.log.lines.push(format!("{label}: region RSS {:.1} MiB", rss as f64 / MIB as f64));
        rss
    }
}

/// Runs a VM with 128 MiB of RAM and a 256 MiB virtio-mem region (of which `requested` is
/// requested at boot) on `vcpus` vCPUs with `scenario` as its controller; returns the run's
/// report and the controller's log. The controller always stops the VM, also when it panics
/// (the panic is re-raised here, after the run).
fn run_mem(
    hostile: bool,
    backend: MemoryBackend,
    vcpus: u32,
    requested: u64,
    scenario: impl FnOnce(&mut Controller) + Send + 'static,
) -> (RunReport, Log) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ended = Arc::new(AtomicBool::new(false));
    let slot: ControllerSlot = Arc::default();
    let scenario = Mutex::new(Some(scenario));
    let (hook_slot, hook_ended) = (slot.clone(), ended.clone());
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let scenario = scenario.lock().unwrap().take().expect("one VM, one start");
        let mut controller = Controller { vm: vm.clone(), ended: hook_ended.clone(), log: Log::default() };
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
        memory: MemoryConfig { size: RAM, backend, thp: false },
        vcpus,
        timeout: Some(Duration::from_secs(300)),
        console: Console::Null,
        monitor: false,
        after_start: Some(hook),
        virtio_mem: Some(VirtioMemSpec { region_size: REGION, requested_size: requested }),
        ..VmConfig::test_guest(TestGuestParams {
            seed: 0x3e3,
            hostile,
            ..TestGuestParams::new(Workload::VirtioMem)
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

/// Asserts that the region's resident bytes are the plugged bytes (within 2 MiB).
fn assert_rss_is(rss: u64, plugged: u64) {
    assert!(
        rss + 2 * MIB >= plugged && rss <= plugged + 2 * MIB,
        "region RSS {} KiB, plugged {} KiB",
        rss / 1024,
        plugged / 1024
    );
}

/// The standard run: 0 -> 64 -> 16 -> 128 -> 0 MiB with the region's RSS after each step.
fn standard_scenario(c: &mut Controller) {
    // Driver up: activated, and the probe's STATE of the whole (unplugged) region.
    let up = c.wait("driver up", |s| s.state_requests >= 1);
    assert_eq!(c.transport().activations, 1);
    assert_eq!((up.addr % (1 << 30), up.region_size, up.block_size), (0, REGION, BLOCK), "{up:?}");
    assert!(up.addr >= 4 << 30, "the region lies above all RAM and the 32-bit hole: {:#x}", up.addr);
    assert_eq!((up.plugged_size, up.unplug_all_requests), (0, 0), "nothing plugged at probe");
    let mut rss = c.region_rss("probe");
    assert_rss_is(rss, 0);
    let mut plugged = 0;
    for req in [64 * MIB, 16 * MIB, 128 * MIB, 0] {
        c.step(req);
        let now = c.region_rss(&format!("{} MiB plugged", req / MIB));
        assert_rss_is(now, req);
        if req > plugged {
            assert!(now - rss >= (req - plugged) * 9 / 10, "RSS rose by {} KiB only", (now - rss) / 1024);
        } else {
            assert!(rss - now >= (plugged - req) * 9 / 10, "RSS fell by {} KiB only", (rss - now) / 1024);
        }
        (rss, plugged) = (now, req);
    }
}

/// The device's counters after [`standard_scenario`].
fn check_standard(log: Log) {
    let s = log.final_stats.expect("controller finished");
    let t = log.transport.expect("controller finished");
    eprintln!("device: {s:#?}\ntransport: {t:?}");
    assert_eq!((t.errors(), t.needs_reset), (0, 0), "{t:?}");
    assert_eq!(s.errors.total(), 0, "{:?}", s.errors);
    // 32 + 56 blocks plugged, 24 + 64 unplugged, in runs of 8.
    let runs = |blocks: u64| blocks.div_ceil(RUN_BLOCKS);
    assert_eq!(s.plug_requests, runs(32) + runs(56));
    assert_eq!(s.unplug_requests, runs(24) + runs(64));
    assert_eq!((s.blocks_plugged, s.blocks_unplugged), (88, 88));
    // Probe (1), 64 MiB (2), 16 MiB (2), 128 MiB (2), 0 (1).
    assert_eq!(s.state_requests, 8);
    assert_eq!((s.unplug_all_requests, s.nacks, s.busy, s.error_responses), (0, 0, 0, 0));
    assert_eq!(s.acks, s.plug_requests + s.unplug_requests + s.state_requests);
    // Every UNPLUG is a contiguous run: one notifier discard each.
    assert_eq!(s.discard_ranges, s.unplug_requests);
    assert_eq!((s.blocks_discarded, s.bytes_discarded, s.discard_failures), (88, 88 * BLOCK, 0));
    assert_eq!((s.plugged_size, s.plugged_blocks, s.requested_size), (0, 0, 0));
}

#[test]
fn virtio_mem_follows_the_request_and_the_host_gets_the_memory() {
    let (report, log) = run_mem(false, MemoryBackend::Anonymous, 1, 0, standard_scenario);
    assert_eq!(report.memory_layer.virtio_mem.as_ref().map(|s| s.bytes_discarded), Some(88 * BLOCK));
    check_standard(log);
}

#[test]
fn memfd_backing_and_an_idle_second_vcpu() {
    let (_, log) = run_mem(false, MemoryBackend::Memfd, 2, 0, standard_scenario);
    check_standard(log);
}

#[test]
fn hostile_requests_are_counted_and_change_nothing() {
    // 32 MiB requested at boot: the guest's hostile phase needs one block plugged.
    let (_, log) = run_mem(true, MemoryBackend::Anonymous, 1, 32 * MIB, |c| {
        // Probe STATE (1), the hostile phase's STATE check with block 0 plugged (2), then the
        // first normal step to 32 MiB (2).
        let s = c.wait("hostile phase and the first step", |s| {
            s.plugged_size == 32 * MIB && s.state_requests == 5
        });
        let e = &s.errors;
        assert_eq!((e.out_of_range, e.misaligned, e.zero_blocks, e.overflow), (2, 1, 1, 1), "{e:?}");
        assert_eq!((e.unplug_unplugged, e.plug_plugged, e.unknown_request), (1, 1, 0), "{e:?}");
        assert_eq!(
            (e.bad_request_buffer, e.bad_response_buffer, e.bad_chain, e.unreadable),
            (1, 2, 0, 0),
            "{e:?}"
        );
        assert_eq!(e.total(), 10, "{e:?}");
        assert_eq!(s.error_responses, 7);
        // Nothing was discarded, nothing unplugged; block 0 then 15 more were plugged (8 + 7).
        assert_eq!((s.discard_ranges, s.bytes_discarded, s.blocks_unplugged), (0, 0, 0));
        assert_eq!((s.blocks_plugged, s.nacks), (16, 0));
        let t = c.transport();
        assert_eq!((t.needs_reset, t.errors()), (0, 0), "bad requests do not break the device: {t:?}");
        let rss = c.region_rss("32 MiB plugged after the hostile phase");
        assert_rss_is(rss, 32 * MIB);

        // The VM keeps running and the driver does its normal steps.
        c.step(0);
        assert_rss_is(c.region_rss("0 MiB plugged"), 0);
        c.step(8 * MIB);
    });
    let s = log.final_stats.unwrap();
    assert_eq!(s.errors.total(), 10, "no further errors: {:?}", s.errors);
    // The never-plugged UNPLUG of the hostile phase, then 16 blocks in two runs.
    assert_eq!((s.unplug_requests, s.discard_ranges, s.bytes_discarded), (1 + 2, 2, 32 * MIB));
    assert_eq!((s.plugged_size, s.blocks_plugged), (8 * MIB, 20));
}
