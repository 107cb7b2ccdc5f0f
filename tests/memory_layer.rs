//! End-to-end: the memory layer seen from both sides. The test guest fills its pages; the host
//! discards ranges of them through the notifier (a 4 KiB page, 16 KiB, a whole 2 MiB block, and
//! 16 KiB across a 2 MiB boundary); the guest then reads zeros exactly there and its data
//! everywhere else, and so does the VMM's own device path. KVM, the other secondary MMU, shows
//! the discard in its statistics.

use std::time::Duration;

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, Console, RunReport, VmConfig, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::vstate::vcpu::VcpuOutcome;

fn discard_verify(backend: MemoryBackend, thp: bool, vcpus: u32, mem_mib: u64) -> RunReport {
    let config = VmConfig {
        memory: MemoryConfig { size: mem_mib << 20, backend, thp },
        vcpus,
        timeout: Some(Duration::from_secs(120)),
        console: Console::Null,
        balloon: None,
        ..VmConfig::test_guest(TestGuestParams {
            seed: 0xd15c,
            ..TestGuestParams::new(Workload::DiscardVerify)
        })
    };
    run(&config).expect("the VM starts")
}

/// What every DiscardVerify run must show, whatever the backing.
fn assert_guest_and_device_path_see_zeros(report: &RunReport, vcpus: u32) {
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    for v in &report.vcpus {
        assert!(matches!(v.outcome, VcpuOutcome::Done { .. }), "vCPU {}: {:?}", v.index, v.outcome);
    }
    let layer = &report.memory_layer;
    assert_eq!(layer.discards.len(), 4 * vcpus as usize, "{:#?}", layer.discards);
    for d in &layer.discards {
        assert!(d.device_read_pattern_before, "device path saw the guest's data before: {d:?}");
        assert!(d.device_read_zeros, "device path reads zeros after the discard: {d:?}");
        // The notified range covers the discarded one (exactly, or widened to huge pages).
        let (start, end) = d.notified;
        assert!(end - start >= d.len as usize, "{d:?}");
    }
    let check = report.host_check.as_ref().expect("checked by the host");
    assert_eq!(check.bad_pages, 0, "{:?}", check.first_bad);
    // Every discard went through the notifier as a VMM-origin start/end pair.
    let vmm_discards =
        layer.notifier.kinds.iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert_eq!((vmm_discards.starts, vmm_discards.ends), (4 * vcpus as u64, 4 * vcpus as u64));
    // The table had translations of the discarded ranges (the device path read them first) and
    // dropped them.
    assert!(layer.table.torn_down["discard"] >= 4 * vcpus as u64, "{:?}", layer.table);
}

/// KVM dropped its shadow mappings of the discarded pages the guest had touched: `stat` fell by
/// at least `at_least` for every 2 MiB discard. KVM's page counters are VM-wide, so this holds
/// only for one vCPU (parked in the rendezvous while the host discards); with more, another
/// vCPU's faults land in the same window.
fn assert_kvm_dropped_mappings(report: &RunReport, stat: &str, at_least: i64) {
    assert_eq!(report.vcpus.len(), 1, "KVM's counters are VM-wide: one vCPU only");
    for d in report.memory_layer.discards.iter().filter(|d| d.len >= 2 << 20) {
        let dropped = -d.kvm_delta.get(stat).copied().unwrap_or(0);
        let flushes = d.kvm_delta.get("vm.remote_tlb_flush_requests").copied().unwrap_or(0);
        assert!(dropped >= at_least && flushes > 0, "a 2 MiB discard of touched memory: {d:?}");
    }
}

#[test]
fn anonymous_memory_reads_zeros_after_a_discard() {
    let report = discard_verify(MemoryBackend::Anonymous, false, 1, 64);
    assert_guest_and_device_path_see_zeros(&report, 1);
    // 512 shadow PTEs for the 2 MiB the guest had touched.
    assert_kvm_dropped_mappings(&report, "vm.pages_4k", 512);
    // 4 KiB memory: the notified range is exactly the discarded one.
    assert!(report.memory_layer.discards.iter().all(|d| d.notified.1 - d.notified.0 == d.len as usize));
}

#[test]
fn kvm_drops_its_huge_mappings_of_a_discarded_thp() {
    let report = discard_verify(MemoryBackend::Anonymous, true, 1, 64);
    assert_guest_and_device_path_see_zeros(&report, 1);
    // One 2 MiB shadow mapping for the huge page.
    assert_kvm_dropped_mappings(&report, "vm.pages_2m", 1);
}

#[test]
fn memfd_memory_reads_zeros_after_a_discard() {
    // Shared memory is discarded with fallocate(PUNCH_HOLE): MADV_DONTNEED would leave the data in
    // the page cache, and the guest would read it again.
    let report = discard_verify(MemoryBackend::Memfd, false, 2, 64);
    assert_guest_and_device_path_see_zeros(&report, 2);
}

#[test]
fn thp_memory_reads_zeros_and_huge_entries_are_dropped_whole() {
    let report = discard_verify(MemoryBackend::Anonymous, true, 2, 64);
    assert!(report.thp_aligned);
    assert_guest_and_device_path_see_zeros(&report, 2);
    let layer = &report.memory_layer;
    assert!(layer.table.installs_2m > 0, "THP memory gets 2 MiB table entries: {:?}", layer.table);
    for d in &layer.discards {
        let (start, end) = d.notified;
        // A discard cutting a huge page is notified as whole huge pages.
        assert_eq!((start % (2 << 20), end % (2 << 20)), (0, 0), "{d:?}");
    }
}

/// Reserves 2 MiB hugetlb pages for one test and gives them back (docs/host.md: none are reserved
/// here; `nr_hugepages` must be put back).
struct HugePages {
    before: String,
}

impl HugePages {
    const PATH: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve(extra: u64) -> Result<Self, String> {
        let before = std::fs::read_to_string(Self::PATH).map_err(|e| e.to_string())?;
        let now: u64 = before.trim().parse().map_err(|e| format!("{e}"))?;
        std::fs::write(Self::PATH, (now + extra).to_string())
            .map_err(|e| format!("writing {}: {e}", Self::PATH))?;
        Ok(Self { before })
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.before.trim());
    }
}

#[test]
fn hugetlb_memory_reads_zeros_after_whole_huge_page_discards() {
    let _pages = match HugePages::reserve(40) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED: cannot reserve hugetlb pages ({e}); this test needs root");
            return;
        }
    };
    let report = discard_verify(MemoryBackend::Hugetlb, false, 2, 64);
    assert_eq!(report.outcome, VmOutcome::Success, "{report:#?}");
    let layer = &report.memory_layer;
    // Whole huge pages only: one 2 MiB block and two blocks across a boundary per vCPU.
    let lens: Vec<u64> = layer.discards.iter().map(|d| d.len).collect();
    assert_eq!(lens.iter().filter(|&&l| l == 2 << 20).count(), 2, "{lens:?}");
    assert_eq!(lens.iter().filter(|&&l| l == 4 << 20).count(), 2, "{lens:?}");
    for d in &layer.discards {
        assert!(d.device_read_pattern_before && d.device_read_zeros, "{d:?}");
        assert_eq!((d.notified.1 - d.notified.0) as u64, d.len, "{d:?}");
    }
    assert!(layer.table.installs_2m > 0 && layer.table.installs_4k == 0, "{:?}", layer.table);
    assert!(layer.table.torn_down["discard"] >= 4, "{:?}", layer.table);
    assert_eq!(report.host_check.as_ref().unwrap().bad_pages, 0);
}

#[test]
fn hugetlb_without_free_huge_pages_is_a_clear_error() {
    // Ask for more than any test reserves.
    let config = MemoryConfig { size: 16 << 30, backend: MemoryBackend::Hugetlb, thp: false };
    let err = vmm::memory::GuestRam::new(config).unwrap_err().to_string();
    assert!(err.contains("cannot reserve 8192 huge pages of 2 MiB"), "{err}");
}
