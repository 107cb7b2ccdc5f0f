//! End-to-end: code the VMM did not initiate unmaps or moves part of guest RAM while the guest
//! runs its Touch workload and a device path keeps reading the same memory through the VMM's
//! table. The VMM never crashes; with the default policy it re-backs the range with zeroed
//! memory and the guest finishes; with `stop` it ends the VM with an error naming the range.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, Console, VmConfig, VmControl, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::mmu::{AccessError, GuestMemoryAccess};
use vmm::teardown::TeardownPolicy;

/// Guest-physical range the outside code tears down: 2 MiB inside the Touch workload's pages.
const HOLE_GPA: u64 = 64 << 20;
const HOLE_LEN: usize = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Attack {
    Munmap,
    Mremap,
}

/// What the device-path thread saw.
#[derive(Debug, Default)]
struct DeviceView {
    reads: u64,
    unmapped_errors: u64,
    /// A read of the hole after the teardown that returned only zeros (the re-backed memory).
    zeros_after: bool,
    /// The VM's `__org.zapvm_EXTERNAL_TEARDOWN` QMP events (their data).
    events: Vec<serde_json::Value>,
}

fn config(
    backend: MemoryBackend,
    policy: TeardownPolicy,
    monitor: bool,
    attack: Attack,
) -> (VmConfig, Arc<Mutex<Option<JoinHandle<DeviceView>>>>) {
    let device: Arc<Mutex<Option<JoinHandle<DeviceView>>>> = Arc::default();
    let slot = device.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (gpa, hva, _) = vm.ram_regions()[0];
        let hole = hva + (HOLE_GPA - gpa) as usize;
        let mmu = vm.guest_mmu().clone();
        let queue = vm.events().clone();
        let thread = std::thread::spawn(move || {
            let mut view = DeviceView::default();
            let mut buf = vec![0u8; 4096];
            // The device path has the range's translations before the teardown.
            assert!(mmu.read(HOLE_GPA, &mut buf).is_ok());
            match attack {
                // SAFETY (test): the range is guest RAM the VMM mapped; tearing it down from
                // outside the VMM's API is exactly what the test is about.
                Attack::Munmap => assert_eq!(unsafe { libc::munmap(hole as *mut libc::c_void, HOLE_LEN) }, 0),
                Attack::Mremap => {
                    // SAFETY (test): a fresh reservation to move the pages to; it is left mapped.
                    let scratch = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            HOLE_LEN,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    assert_ne!(scratch, libc::MAP_FAILED);
                    // SAFETY (test): moves guest RAM away from under the VMM.
                    let moved = unsafe {
                        libc::mremap(
                            hole as *mut libc::c_void,
                            HOLE_LEN,
                            HOLE_LEN,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                            scratch,
                        )
                    };
                    assert_eq!(moved, scratch);
                }
            }
            // Keep reading through the device path until the hole reads back as zeros, or for a
            // bounded number of reads (the guard may have stopped the VM instead).
            for _ in 0..2_000_000 {
                view.reads += 1;
                match mmu.read(HOLE_GPA, &mut buf) {
                    Ok(()) if buf.iter().all(|&b| b == 0) => {
                        view.zeros_after = true;
                        break;
                    }
                    Ok(()) => panic!("the device path read old data from a torn-down range"),
                    Err(AccessError::Unmapped { .. }) => view.unmapped_errors += 1,
                    Err(e) => panic!("unexpected device error {e}"),
                }
                std::thread::yield_now();
            }
            // The guard reports the teardown once it handled it (no control socket drains the
            // VM's event queue in this test, so the events wait there).
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while view.events.is_empty() && std::time::Instant::now() < deadline {
                for line in queue.drain() {
                    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if event["event"] == "__org.zapvm_EXTERNAL_TEARDOWN" {
                        view.events.push(event["data"].clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            view
        });
        *slot.lock().unwrap() = Some(thread);
    });
    let config = VmConfig {
        memory: MemoryConfig { size: 256 << 20, backend, thp: false },
        vcpus: 2,
        timeout: Some(Duration::from_secs(60)),
        console: Console::Null,
        monitor,
        teardown_policy: policy,
        after_start: Some(hook),
        balloon: None,
        ..VmConfig::test_guest(TestGuestParams { seed: 1, ..TestGuestParams::new(Workload::Touch) })
    };
    (config, device)
}

fn run_attack(
    backend: MemoryBackend,
    policy: TeardownPolicy,
    attack: Attack,
) -> (vmm::machine::RunReport, DeviceView) {
    let (config, device) = config(backend, policy, true, attack);
    let report = run(&config).expect("the VM starts");
    let view = device.lock().unwrap().take().expect("hook ran").join().expect("device thread");
    (report, view)
}

#[test]
fn external_munmap_is_rebacked_and_the_guest_finishes() {
    let (report, view) = run_attack(MemoryBackend::Anonymous, TeardownPolicy::Reback, Attack::Munmap);
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    let t = &report.memory_layer.external_teardowns;
    assert_eq!((t.events, t.rebacked_bytes), (1, HOLE_LEN as u64), "{t:?}");
    assert!(view.zeros_after, "the device path reads the re-backed zeros: {view:?}");
    assert_eq!(
        view.events,
        [serde_json::json!({ "kind": "unmap", "gpa": HOLE_GPA, "length": HOLE_LEN, "action": "rebacked" })],
        "one QMP event for the teardown, naming the guest range"
    );
    assert!(report
        .memory_layer
        .notifier
        .kinds
        .iter()
        .any(|k| k.kind == "unmap" && k.origin == "external" && k.ends == 1));
}

#[test]
fn external_munmap_of_memfd_ram_is_rebacked() {
    let (report, view) = run_attack(MemoryBackend::Memfd, TeardownPolicy::Reback, Attack::Munmap);
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    assert_eq!(report.memory_layer.external_teardowns.rebacked_bytes, HOLE_LEN as u64);
    assert!(view.zeros_after, "{view:?}");
}

#[test]
fn external_mremap_is_rebacked_and_the_guest_finishes() {
    let (report, view) = run_attack(MemoryBackend::Anonymous, TeardownPolicy::Reback, Attack::Mremap);
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    let t = &report.memory_layer.external_teardowns;
    assert_eq!((t.events, t.rebacked_bytes), (1, HOLE_LEN as u64), "{t:?}");
    assert!(view.zeros_after, "{view:?}");
    assert_eq!(view.events.len(), 1, "{view:?}");
    assert_eq!((&view.events[0]["kind"], &view.events[0]["action"]), (&"remap".into(), &"rebacked".into()));
}

#[test]
fn external_munmap_with_policy_stop_ends_the_vm_naming_the_range() {
    let (report, view) = run_attack(MemoryBackend::Anonymous, TeardownPolicy::Stop, Attack::Munmap);
    let VmOutcome::Failed { message } = &report.outcome else { panic!("{report:#?}") };
    assert!(
        message.contains("guest RAM [0x4000000, 0x4200000) was unmapped by code outside the VMM"),
        "{message}"
    );
    assert!(!view.zeros_after, "nothing re-backs the range under policy stop");
    assert!(view.unmapped_errors > 0, "the device path got errors, not a crash: {view:?}");
    assert_eq!(view.events.len(), 1, "{view:?}");
    assert_eq!(view.events[0]["action"], "stop", "{view:?}");
}

#[test]
fn external_mremap_with_policy_stop_ends_the_vm() {
    let (report, _) = run_attack(MemoryBackend::Anonymous, TeardownPolicy::Stop, Attack::Mremap);
    let VmOutcome::Failed { message } = &report.outcome else { panic!("{report:#?}") };
    assert!(message.contains("was moved away by code outside the VMM"), "{message}");
}
