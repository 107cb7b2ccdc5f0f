//! Sealed guest RAM (`--seal-guest-ram`) and the reused-hole window it closes.
//!
//! Without the seal an external munmap of guest RAM leaves a hole the kernel may fill with any
//! other mapping before the monitor's worker gets to the UNMAP event; a device write through the
//! table's old entry then lands in that foreign page, and the teardown guard can only stop the VM
//! afterwards. With the seal the munmap fails (EPERM), nothing can land there, and the same write
//! reaches guest RAM. Then the stress suite with the seal: every external munmap/mremap/mprotect/
//! MAP_FIXED blow refused, madvise blows and every discard path still working.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use harness::stress::{run, StressOptions};
use notifier::{Event, Origin, Range, Refused, Subscriber};
use vmm::memory::{GuestRam, MemoryBackend, MemoryConfig};
use vmm::mmu::{GuestMemoryAccess, GuestMmu};
use vmm::teardown::{GuardedRegion, TeardownGuard, TeardownPolicy};

const PAGE: usize = 4096;
/// The guest page the tests tear down.
const GPA: u64 = 0x20_0000;

/// Holds the monitor's worker in its first external UNMAP start until released.
#[derive(Default)]
struct SlowSubscriber {
    state: Mutex<(bool, bool)>, // (holding, released)
    changed: Condvar,
}

impl Subscriber for SlowSubscriber {
    fn name(&self) -> &str {
        "slow"
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Refused> {
        if r.origin == Origin::External && r.event == Event::Unmap {
            let mut s = self.state.lock().unwrap();
            s.0 = true;
            self.changed.notify_all();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.1 && Instant::now() < deadline {
                s = self.changed.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
            }
        }
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {}
}

impl SlowSubscriber {
    fn wait_holding(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = self.state.lock().unwrap();
        while !s.0 && Instant::now() < deadline {
            s = self.changed.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
        }
        assert!(s.0, "the worker never delivered the UNMAP");
    }
    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
    /// Holds the next external UNMAP start again.
    fn rearm(&self) {
        *self.state.lock().unwrap() = (false, false);
    }
}

struct Layer {
    ram: GuestRam,
    mmu: GuestMmu,
    guard: Arc<TeardownGuard>,
    slow: Arc<SlowSubscriber>,
    _monitor: notifier::Monitor,
    hva: usize,
}

/// Guest RAM with the notifier, the monitor, the slow subscriber first, the table and the guard.
fn layer(sealed: bool) -> Layer {
    let cfg = MemoryConfig { size: 8 << 20, backend: MemoryBackend::Anonymous, thp: false };
    let ram = if sealed { GuestRam::sealed_with_hotplug(cfg, 0) } else { GuestRam::new(cfg) }.unwrap();
    // SAFETY: guest RAM outlives the address space (dropped after it) and is touched only
    // through raw pointers and the table's copies.
    let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.unwrap();
    if sealed {
        for r in ram.notifier_regions() {
            space.mark_sealed(r.host_addr, r.len).unwrap();
        }
    }
    let monitor =
        notifier::Monitor::start(&space, notifier::MonitorOptions::default()).expect("monitor (root)");
    let slow = Arc::new(SlowSubscriber::default());
    space.subscribe(slow.clone()).unwrap();
    let mmu = GuestMmu::new(&ram, space.clone()).unwrap();
    let regions = ram
        .regions()
        .zip(ram.notifier_regions())
        .map(|((gpa, _, _), spec)| GuardedRegion { gpa: gpa.0, spec })
        .collect();
    let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let guard = Arc::new(TeardownGuard::new(TeardownPolicy::Reback, &space, regions, stop));
    space.subscribe(guard.clone()).unwrap();
    let hva = ram.regions().next().unwrap().1 as usize + GPA as usize;
    Layer { ram, mmu, guard, slow, _monitor: monitor, hva }
}

/// Waits (at most 30 s) until `guard` stops the VM, and checks that it did so for a mapping it
/// did not make in the page at [`GPA`].
fn assert_stops_for_a_foreign_mapping(guard: &TeardownGuard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while guard.fatal().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let fatal = guard.fatal().expect("the guard stops the VM");
    assert!(fatal.contains("guest RAM [0x200000, 0x201000)"), "{fatal}");
    assert!(fatal.contains("a mapping the VMM did not make"), "{fatal}");
}

/// A fresh page at exactly `at` (MAP_FIXED_NOREPLACE: only if nothing is mapped there), filled
/// with 0xAA; `None` if something is mapped there.
fn foreign_page_at(at: usize) -> Option<*mut u8> {
    // SAFETY: NOREPLACE never replaces a mapping; the page is this test's own.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    assert_eq!(p as usize, at);
    // SAFETY: the page just mapped.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0xAA, PAGE) };
    Some(p as *mut u8)
}

/// What is NOT guaranteed without the seal (see `vmm::teardown`'s docs): in the window before the
/// worker delivers the UNMAP, a device write through the old entry reaches a foreign mapping that
/// landed in the hole. What is: the guard then finds it and stops the VM naming the range.
#[test]
fn without_the_seal_a_device_write_in_the_window_reaches_a_foreign_page_and_the_guard_stops_the_vm() {
    let l = layer(false);
    l.mmu.write(GPA, &[0x11; 16]).unwrap(); // the table holds an entry for the page
                                            // SAFETY (test): an external munmap of one page of guest RAM, the scenario itself.
    assert_eq!(unsafe { libc::munmap(l.hva as *mut libc::c_void, PAGE) }, 0);
    l.slow.wait_holding();
    let foreign = foreign_page_at(l.hva).expect("the hole is free for another mapping");
    assert!(l.mmu.write(GPA, &[0x55; 16]).is_ok(), "the old entry is still used in the window");
    // SAFETY: the test's foreign page.
    assert_eq!(unsafe { foreign.read_volatile() }, 0x55, "the write landed in the foreign page");
    l.slow.release();
    assert_stops_for_a_foreign_mapping(&l.guard);
    // SAFETY: the guard never touched it: still the test's page with the device's bytes.
    assert_eq!(unsafe { foreign.add(16).read_volatile() }, 0xAA);
    drop(l.ram);
}

/// A hole the guard re-backed before is no safer than a new one: after a second external munmap
/// of the re-backed page, a foreign mapping that lands there before the worker gets to the event
/// must stop the VM, not be taken for the guard's own re-back (it sits where the re-back was, but
/// is not a mapping of the VMM's file) and handed to the notifier, the table and KVM as guest RAM.
#[test]
fn a_foreign_mapping_in_a_hole_re_backed_before_is_not_adopted_as_guest_ram() {
    let l = layer(false);
    l.mmu.write(GPA, &[0x11; 16]).unwrap();
    // SAFETY (test): an external munmap of one page of guest RAM, the scenario itself.
    assert_eq!(unsafe { libc::munmap(l.hva as *mut libc::c_void, PAGE) }, 0);
    l.slow.wait_holding();
    l.slow.rearm();
    l.slow.release();
    let deadline = Instant::now() + Duration::from_secs(30);
    while l.guard.report().rebacked_bytes < PAGE as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(l.guard.report().rebacked_bytes, PAGE as u64, "the first hole is re-backed");
    assert!(l.guard.fatal().is_none());
    l.mmu.write(GPA, &[0x22; 16]).expect("the re-backed page is guest RAM again");
    l.slow.rearm();

    // SAFETY (test): the second external munmap, of the re-backed page.
    assert_eq!(unsafe { libc::munmap(l.hva as *mut libc::c_void, PAGE) }, 0);
    l.slow.wait_holding();
    let foreign = foreign_page_at(l.hva).expect("the hole is free for another mapping");
    l.slow.release();
    assert_stops_for_a_foreign_mapping(&l.guard);
    assert!(
        !l.mmu.space().is_mapped(l.hva, l.hva + PAGE),
        "the foreign page was not handed to the notifier as guest RAM"
    );
    assert!(l.mmu.read(GPA, &mut [0u8; 16]).is_err(), "nor does the table reach it");
    // SAFETY: the test's foreign page, untouched by the VMM.
    assert_eq!(unsafe { foreign.read_volatile() }, 0xAA);
    drop(l.ram);
}

/// With the seal the same sequence cannot start: munmap, mremap, mprotect and MAP_FIXED all fail
/// with EPERM, nothing can be mapped into guest RAM, the device write reaches guest RAM, and a
/// discard through the notifier still reads zeros after.
#[test]
fn with_the_seal_external_teardowns_fail_and_the_device_write_reaches_guest_ram() {
    let l = layer(true);
    l.mmu.write(GPA, &[0x11; 16]).unwrap();
    let addr = l.hva;
    let eperm = |failed: bool| failed && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    std::thread::scope(|s| {
        s.spawn(move || {
            let p = addr as *mut libc::c_void;
            // SAFETY (test, all four): external teardowns the kernel must refuse.
            assert!(eperm(unsafe { libc::munmap(p, PAGE) } != 0), "munmap");
            let moved = unsafe { libc::mremap(p, PAGE, PAGE, libc::MREMAP_MAYMOVE) };
            assert!(eperm(moved == libc::MAP_FAILED), "mremap");
            assert!(eperm(unsafe { libc::mprotect(p, PAGE, libc::PROT_READ) } != 0), "mprotect");
            let over = unsafe {
                libc::mmap(
                    p,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            assert!(eperm(over == libc::MAP_FAILED), "mmap(MAP_FIXED)");
        });
    });
    assert!(foreign_page_at(l.hva).is_none(), "guest RAM is still mapped there");
    l.mmu.write(GPA, &[0x55; 16]).unwrap();
    let mut b = [0u8; 16];
    l.mmu.read(GPA, &mut b).unwrap();
    assert_eq!(b, [0x55; 16]);
    let space = l.mmu.space().clone();
    assert!(matches!(space.unmap(l.hva, PAGE), Err(notifier::Error::Sealed { .. })));
    space.discard(l.hva, PAGE).unwrap();
    l.mmu.read(GPA, &mut b).unwrap();
    assert_eq!(b, [0; 16], "the discard still works on sealed RAM");
    assert_eq!(l.guard.report().events, 0);
    assert!(l.guard.fatal().is_none());
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sealed_stress(plant_skip_mseal: bool) -> harness::stress::StressReport {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let opts = StressOptions {
        seed: 0x5ea1,
        // A fixed amount of work; the duration is only the deadline that catches a hang.
        duration: Duration::from_secs(300),
        work: Some(harness::stress::Work { passes: 2, ops: 5, targets: 3 }),
        seal_guest_ram: true,
        plant_skip_mseal,
        ..StressOptions::new().all()
    };
    let r = run(&opts).expect("the stress VM starts");
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    r
}

/// `zapvm stress --all --seal-guest-ram`, short: every invariant holds, the kernel refused the
/// external munmap/mremap/mprotect/MAP_FIXED blows, madvise blows, discards, the balloon and
/// virtio-mem still worked, and the mprotect phases were skipped with a note.
#[test]
fn stress_all_with_the_seal_keeps_every_invariant_and_the_kernel_refuses_every_unmap() {
    let r = sealed_stress(false);
    assert!(r.ok, "broken invariants: {:#?}", r.broken);
    assert!(r.vmm_alive);
    assert!(
        r.notes.iter().any(|n| n.starts_with("mprotect: not run with --seal-guest-ram")),
        "{:?}",
        r.notes
    );
    assert!(r.mprotect.is_none());
    let c = r.external_chaos.as_ref().unwrap();
    assert!(c.madvise > 0, "{c:?}");
    assert_eq!((c.munmap, c.mremap, c.mprotect, c.map_fixed), (0, 0, 0, 0), "{c:?}");
    let refused = &c.refused_by_seal;
    assert!(
        refused.munmap > 0 && refused.mremap > 0 && refused.mprotect > 0 && refused.map_fixed > 0,
        "{c:?}"
    );
    assert_eq!(r.external_teardowns.as_ref().unwrap().events, 0);
    assert!(r.discard.as_ref().unwrap().ops > 0 && r.discard.as_ref().unwrap().stale_after_discard == 0);
    let b = r.balloon.as_ref().unwrap();
    assert!(b.steps.discarded_pages_checked > 0 && b.steps.discarded_not_zero == 0, "{b:?}");
    let m = r.virtio_mem.as_ref().unwrap();
    assert!(m.steps.discarded_not_zero == 0, "{m:?}");
    assert!(r.device.reads > 0 && r.device.stale == 0, "{:?}", r.device);
    for k in &r.notifier {
        assert_eq!(k.starts, k.ends, "{k:?}");
    }
}

/// The seal's checker fires: with the mseal call skipped (planted), the blows succeed and the run
/// is reported broken.
#[test]
fn stress_with_a_seal_that_did_not_hold_is_reported_broken() {
    let r = sealed_stress(true);
    assert!(!r.ok);
    assert!(r.broken.iter().any(|b| b.starts_with("the seal did not hold")), "{:#?}", r.broken);
}

/// `zapvm run --seal-guest-ram` boots the test guest and passes its check.
#[test]
fn zapvm_run_with_the_seal_succeeds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zapvm"))
        .args(["run", "--seal-guest-ram", "--mem", "64M", "--timeout", "120", "--no-api", "--json"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("zapvm runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"sealed\": true"), "{stdout}");
}
