//! End-to-end: the memory layer seen from both sides. The test guest fills its pages; the host
//! discards ranges of them through the notifier (a 4 KiB page, 16 KiB, a whole 2 MiB block, and
//! 16 KiB across a 2 MiB boundary); the guest then reads zeros exactly there and its data
//! everywhere else, and so does the VMM's own device path. KVM, the other secondary MMU, shows
//! the discard in its statistics.

#[path = "support/skip.rs"]
mod skip;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, AfterStart, Console, RunReport, VmConfig, VmControl, VmOutcome};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::vstate::vcpu::VcpuOutcome;

use skip::skip;

fn discard_verify(backend: MemoryBackend, thp: bool, vcpus: u32, mem_mib: u64) -> RunReport {
    discard_verify_then(backend, thp, vcpus, mem_mib, None)
}

/// [`discard_verify`] with a hook run on the VMM's thread once the vCPUs run: until it returns
/// the VMM does nothing else, so guest RAM stays mapped whatever the guest does meanwhile.
fn discard_verify_then(
    backend: MemoryBackend,
    thp: bool,
    vcpus: u32,
    mem_mib: u64,
    after_start: Option<AfterStart>,
) -> RunReport {
    let config = VmConfig {
        memory: MemoryConfig { size: mem_mib << 20, backend, thp },
        vcpus,
        timeout: Some(Duration::from_secs(120)),
        console: Console::Null,
        balloon: None,
        after_start,
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

/// Bytes of `AnonHugePages` (transparent huge pages the kernel really maps) in the mappings of
/// this process that lie inside `[start, start + len)`, from /proc/self/smaps.
fn anon_huge_bytes_in(start: usize, len: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("reading /proc/self/smaps");
    let mut inside = false;
    let mut bytes = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        // A mapping's header line: `start-end perms offset dev inode [path]`.
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = start <= a && b <= start + len;
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().expect("a size in kB");
            bytes += kib << 10;
        }
    }
    bytes
}

#[test]
fn thp_memory_reads_zeros_and_huge_entries_are_dropped_whole() {
    // Once the host has made every discard (the guest filled its slice before asking for the
    // first), the kernel's own account of guest RAM: how much of it is transparent huge pages.
    let vcpus = 2;
    let huge_bytes = Arc::new(Mutex::new(None));
    let seen = huge_bytes.clone();
    let hook: AfterStart = Arc::new(move |vm: &Arc<VmControl>| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while vm.stats()["discards"].as_u64() < Some(4 * vcpus as u64) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let bytes: u64 = vm.ram_regions().iter().map(|&(_, hva, len)| anon_huge_bytes_in(hva, len)).sum();
        *seen.lock().unwrap() = Some(bytes);
    });
    let report = discard_verify_then(MemoryBackend::Anonymous, true, vcpus, 64, Some(hook));
    assert!(report.thp_aligned);
    assert_guest_and_device_path_see_zeros(&report, vcpus);
    let huge = huge_bytes.lock().unwrap().expect("the hook ran");
    assert!(huge >= 2 << 20, "guest RAM is backed by transparent huge pages: AnonHugePages {huge} bytes");
    let layer = &report.memory_layer;
    assert!(layer.table.installs_2m > 0, "the table installs 2 MiB entries for THP RAM: {:?}", layer.table);
    for d in &layer.discards {
        let (start, end) = d.notified;
        // A discard cutting a huge page is notified as whole huge pages.
        assert_eq!((start % (2 << 20), end % (2 << 20)), (0, 0), "{d:?}");
    }
}

/// 2 MiB hugetlb pages reserved for one test and given back when it ends, also when it fails
/// (this machine reserves none: docs/host.md). Needs root.
struct HugePages {
    before: u64,
}

impl HugePages {
    const DIR: &'static str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

    fn read(name: &str) -> Result<u64, String> {
        let path = format!("{}/{name}", Self::DIR);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        text.trim().parse().map_err(|e| format!("{path} holds {text:?}: {e}"))
    }

    /// Raises the pool by `extra` pages and checks that at least that many are free.
    fn reserve(extra: u64) -> Result<Self, String> {
        let before = Self::read("nr_hugepages")?;
        let path = format!("{}/nr_hugepages", Self::DIR);
        std::fs::write(&path, (before + extra).to_string()).map_err(|e| format!("writing {path}: {e}"))?;
        // From here on the pool is put back on every path out.
        let pages = Self { before };
        let free = Self::read("free_hugepages")?;
        if free < extra {
            return Err(format!(
                "asked the kernel for {extra} more 2 MiB pages, but only {free} are free (memory too fragmented?)"
            ));
        }
        Ok(pages)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let path = format!("{}/nr_hugepages", Self::DIR);
        if let Err(e) = std::fs::write(&path, self.before.to_string()) {
            eprintln!("cannot put {path} back to {}: {e}", self.before);
        }
    }
}

#[test]
fn hugetlb_memory_reads_zeros_after_whole_huge_page_discards() {
    // 64 MiB of guest RAM: 32 pages, and some to spare.
    let _pages = match HugePages::reserve(40) {
        Ok(p) => p,
        Err(e) => {
            return skip(
                "hugetlb_memory_reads_zeros_after_whole_huge_page_discards",
                &format!("cannot reserve hugetlb pages ({e}); this test needs root"),
            )
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
