//! End-to-end: the VMM boots the built-in test guest and its workload verifies every page it
//! owns, for each memory backing, with and without THP, on one and two vCPUs; the host then
//! reads the same pages back through its own mapping.

use std::time::{Duration, Instant};

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, Console, RunReport, VmConfig, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::mmu::GuestMemoryAccess;
use vmm::vstate::vcpu::VcpuOutcome;

fn config(mem_mib: u64, vcpus: u32, backend: MemoryBackend, thp: bool, workload: Workload) -> VmConfig {
    VmConfig {
        memory: MemoryConfig { size: mem_mib << 20, backend, thp },
        vcpus,
        timeout: Some(Duration::from_secs(120)),
        console: Console::Null,
        ..VmConfig::test_guest(TestGuestParams { seed: 0xfeed ^ mem_mib, ..TestGuestParams::new(workload) })
    }
}

/// Pages the test guest's workload owns: all RAM from the first 2 MiB boundary after its
/// image and stacks (6 MiB for the built-in guest with up to 2 vCPUs; see boot::test_guest).
fn expected_work_pages(report: &RunReport) -> u64 {
    let (_, from) = report.boot.rsplit_once("from ").expect("boot summary names the work start");
    let start = u64::from_str_radix(from.trim_start_matches("0x"), 16).unwrap();
    (report.mem_bytes - start) / 4096
}

fn assert_verified(report: &RunReport, vcpus: u32) {
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    assert_eq!(report.vcpus.len(), vcpus as usize);
    let total = expected_work_pages(report);
    let mut sum = 0;
    for v in &report.vcpus {
        let VcpuOutcome::Done { pages, .. } = v.outcome else { panic!("vCPU {}: {:?}", v.index, v.outcome) };
        // Slices differ by at most one page.
        assert!(
            pages.abs_diff(total / u64::from(vcpus)) <= 1,
            "vCPU {} verified {pages} of {total}",
            v.index
        );
        assert!(v.first_exit_us.is_some(), "vCPU {} never said hello", v.index);
        sum += pages;
    }
    assert_eq!(sum, total, "the slices cover the work area exactly");
    let check = report.host_check.as_ref().expect("Verify runs are checked by the host");
    assert_eq!((check.pages, check.bad_pages), (total, 0), "{:?}", check.first_bad);
}

#[test]
fn one_vcpu_anonymous() {
    let report = run(&config(64, 1, MemoryBackend::Anonymous, false, Workload::Verify)).unwrap();
    assert_verified(&report, 1);
}

#[test]
fn two_vcpus_anonymous() {
    let report = run(&config(64, 2, MemoryBackend::Anonymous, false, Workload::Verify)).unwrap();
    assert_verified(&report, 2);
}

#[test]
fn one_vcpu_memfd() {
    let report = run(&config(64, 1, MemoryBackend::Memfd, false, Workload::Verify)).unwrap();
    assert_verified(&report, 1);
}

#[test]
fn two_vcpus_memfd() {
    let report = run(&config(64, 2, MemoryBackend::Memfd, false, Workload::Verify)).unwrap();
    assert_verified(&report, 2);
}

#[test]
fn one_vcpu_anonymous_thp() {
    let report = run(&config(64, 1, MemoryBackend::Anonymous, true, Workload::Verify)).unwrap();
    assert!(report.thp_aligned, "guest RAM must be 2 MiB aligned for THP to back it");
    assert_verified(&report, 1);
}

#[test]
fn two_vcpus_memfd_thp() {
    let report = run(&config(64, 2, MemoryBackend::Memfd, true, Workload::Verify)).unwrap();
    assert_verified(&report, 2);
}

#[test]
fn memory_above_the_32_bit_hole_is_used() {
    // 3 GiB + 64 MiB: the last 64 MiB live at 4 GiB; THP keeps the fill fast.
    let report = run(&config(3 * 1024 + 64, 2, MemoryBackend::Anonymous, true, Workload::Verify)).unwrap();
    assert_verified(&report, 2);
}

#[test]
fn touch_workload_reports_three_timed_passes() {
    let report = run(&config(32, 1, MemoryBackend::Anonymous, false, Workload::Touch)).unwrap();
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    let v = &report.vcpus[0];
    let passes: Vec<_> = v.timings.iter().map(|t| vmm::vstate::vcpu::pass_name(t.pass)).collect();
    assert_eq!(passes, ["cold_write", "warm_write", "warm_read"]);
    let total = expected_work_pages(&report);
    assert!(v.timings.iter().all(|t| t.pages == total && t.cycles > 0), "{:?}", v.timings);
}

#[test]
fn guest_assertion_failure_fails_the_run_with_its_message() {
    let report = run(&config(16, 1, MemoryBackend::Anonymous, false, Workload::AssertFail)).unwrap();
    let VmOutcome::Failed { message } = &report.outcome else { panic!("{report:#?}") };
    assert!(message.contains("deliberate assertion failure"), "{message}");
    assert!(message.contains("vCPU 0"), "{message}");
}

#[test]
fn guest_exception_fails_the_run_naming_the_vector() {
    let report = run(&config(16, 2, MemoryBackend::Anonymous, false, Workload::Exception)).unwrap();
    let VmOutcome::Failed { message } = &report.outcome else { panic!("{report:#?}") };
    assert!(message.contains("#UD"), "{message}");
}

#[test]
fn a_paused_vm_makes_no_progress_and_quit_ends_the_run() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let mut cfg = config(2048, 2, MemoryBackend::Anonymous, false, Workload::Touch);
    cfg.after_start = Some(Arc::new(move |vm: &Arc<vmm::machine::VmControl>| {
        let vm = vm.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            vm.pause().expect("every vCPU parks");
            let exits = |vm: &vmm::machine::VmControl| vm.stats()["kvm"]["vcpus"]["exits"].as_u64().unwrap();
            let before = exits(&vm);
            // Give a broken pause the time to show itself: a running Touch vCPU exits thousands
            // of times in 50 ms (one exit per page fault); a parked one not at all.
            std::thread::sleep(Duration::from_millis(50));
            let after = exits(&vm);
            log.lock().unwrap().push(format!("paused exits {before} -> {after}"));
            assert_eq!(before, after, "no vCPU ran while paused");
            assert!(vm.paused());
            vm.resume();
            vm.quit();
        });
    }));
    let report = run(&cfg).unwrap();
    assert_eq!(report.outcome, VmOutcome::Quit, "{report:#?} {:?}", seen.lock().unwrap());
    assert!(report.success());
    assert_eq!(seen.lock().unwrap().len(), 1, "the controller thread ran to its end");
}

#[test]
fn a_vm_is_built_whole_before_it_runs_and_a_built_vm_that_never_runs_leaves_nothing() {
    // Built: guest RAM, the table, the devices and the boot image are there, nothing runs.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let config = VmConfig {
        api_socket: Some(socket.clone()),
        ..config(64, 2, MemoryBackend::Anonymous, false, Workload::Verify)
    };
    let built = vmm::machine::build(&config).expect("the VM builds");
    let control = built.control().clone();
    assert_eq!(control.ram_regions().iter().map(|r| r.2 as u64).sum::<u64>(), 64 << 20);
    assert!(built.boot_summary().contains("workload Verify"), "{}", built.boot_summary());
    assert_eq!(control.vcpus_running(), 0, "no vCPU thread runs before `run`");
    assert!(control.balloon().is_some());
    assert!(!socket.exists(), "the control socket is served by the running VM only");
    // The device path works on the built VM's RAM (the boot image is in it).
    let mut word = [0u8; 8];
    control.guest_mmu().read(0x20_0000, &mut word).expect("the image's first page is readable");
    assert_ne!(word, [0; 8], "the test guest's image was loaded");
    let mmu = control.guest_mmu().clone();
    drop(built);
    assert!(!socket.exists());
    // Guest RAM is gone; the handles that outlived the VM no longer reach it (the host addresses
    // may hold someone else's memory by now): the table fails the access, the notifier refuses.
    let err = mmu.read(0x20_0000, &mut word).expect_err("no access through the table after the VM");
    assert!(matches!(err, vmm::mmu::AccessError::Unmapped { gpa: 0x20_0000 }), "{err:?}");
    assert_eq!(mmu.stats().entries, 0, "the release dropped every entry");
    let hva = mmu.host_range(0x20_0000, 4096).unwrap();
    assert!(!mmu.space().is_mapped(hva, hva + 4096), "the released space maps nothing");
    assert!(mmu.space().discard(hva, 4096).is_err(), "no host operation on released memory");

    // The same config, built again, runs to its end.
    let report = vmm::machine::build(&config).unwrap().run().expect("the VM runs");
    assert_verified(&report, 2);
    assert!(!socket.exists(), "the running VM removed its socket");
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn a_panic_while_the_vm_runs_stops_and_joins_its_vcpus_before_guest_ram_goes() {
    use std::sync::Arc;
    // The hook parks both vCPUs, then panics: the panic unwinds through `run`. Parked vCPUs
    // would stay parked forever (over guest RAM that `run`'s unwinding unmaps) unless `run`
    // stops and joins them on that path too.
    let mut cfg = config(64, 2, MemoryBackend::Anonymous, false, Workload::Touch);
    cfg.after_start = Some(Arc::new(|vm: &Arc<vmm::machine::VmControl>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while vm.vcpus_running() < 2 {
            assert!(Instant::now() < deadline, "the vCPUs did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().expect("every vCPU parks");
        assert!(thread_names().iter().filter(|n| n.starts_with("vcpu")).count() == 2);
        panic!("planted: the hook panics while the vCPUs are parked");
    }));
    let built = vmm::machine::build(&cfg).expect("the VM builds");
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| built.run()));
    assert!(unwound.is_err(), "the hook's panic unwinds through run");
    let vcpus: Vec<String> = thread_names().into_iter().filter(|n| n.starts_with("vcpu")).collect();
    assert!(vcpus.is_empty(), "vCPU threads outlived the run (and its guest RAM): {vcpus:?}");
}
