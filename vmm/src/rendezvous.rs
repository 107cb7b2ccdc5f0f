//! The host side of the test guest's rendezvous: the VMM acts on guest RAM while a vCPU waits.
//!
//! [`Rendezvous::Discard`] is the memory layer's end-to-end check (DiscardVerify workload): the
//! vCPU has filled its slice with the pattern; the host discards a few ranges of that slice
//! *through the notifier* (start -> madvise/fallocate -> invalidate_range -> end), reads each back
//! through its own device path (the [`GuestMmu`]) and expects zeros, and replies with the ranges.
//! The guest then checks zeros inside them and its pattern everywhere else. The ranges are chosen
//! to cover the cases the contract names: a single 4 KiB page, several pages, a whole 2 MiB block,
//! and a range that crosses a 2 MiB boundary (on THP memory each of those cuts or covers huge
//! pages).

use std::sync::{Arc, Mutex};

use guest_abi::{slice_pages, BootInfo, GpaRange, Rendezvous};

use crate::kvm_stats::{KvmStatsDelta, KvmStatsReader};
use crate::memory::{HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::mmu::{GuestMemoryAccess, GuestMmu};
use crate::ucall::RendezvousHandler;

/// One discard the host performed for a guest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiscardRecord {
    /// vCPU whose slice it was.
    pub vcpu: usize,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// The host range the notifier told its subscribers (widened to 2 MiB on THP memory).
    pub notified: (usize, usize),
    /// Whether the VMM's own device path read the guest's pattern there right before the
    /// discard (so the table held translations of the range when it was torn down).
    pub device_read_pattern_before: bool,
    /// Whether the VMM's own device path read zeros there right after the discard.
    pub device_read_zeros: bool,
    /// KVM statistics that changed during the discard (VM and summed vCPU stats).
    pub kvm_delta: std::collections::BTreeMap<String, i64>,
}

/// Discards ranges of a vCPU's slice when the guest asks.
pub struct DiscardRendezvous {
    mmu: Arc<GuestMmu>,
    info: BootInfo,
    /// Guest RAM is hugetlb: discard whole huge pages only.
    huge_only: bool,
    kvm: Option<Arc<KvmStatsReader>>,
    records: Mutex<Vec<DiscardRecord>>,
}

impl DiscardRendezvous {
    /// A handler for a guest booted with `info`.
    pub fn new(
        mmu: Arc<GuestMmu>,
        info: BootInfo,
        huge_only: bool,
        kvm: Option<Arc<KvmStatsReader>>,
    ) -> Self {
        Self { mmu, info, huge_only, kvm, records: Mutex::new(Vec::new()) }
    }

    /// The discards done so far.
    pub fn records(&self) -> Vec<DiscardRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The ranges discarded in `vcpu`'s slice.
    pub fn discarded(&self, vcpu: usize) -> Vec<GpaRange> {
        self.records()
            .iter()
            .filter(|r| r.vcpu == vcpu)
            .map(|r| GpaRange { start: r.gpa, end: r.gpa + r.len })
            .collect()
    }
}

/// The ranges to discard in `vcpu`'s slice: one page, four pages, a whole 2 MiB block and four
/// pages across a 2 MiB boundary — each that the slice can hold, none overlapping. On hugetlb
/// memory (`huge_only`), where only whole huge pages can be discarded: one 2 MiB block and two
/// blocks across a 2 MiB boundary.
pub fn plan(info: &BootInfo, vcpu: usize, huge_only: bool) -> Vec<GpaRange> {
    let work = &info.work[..(info.nr_work as usize).min(info.work.len())];
    let mut pages = Vec::new();
    slice_pages(work, info.nr_vcpus, vcpu as u64, |gpa| pages.push(gpa));
    // pages[i..i + n] is one contiguous guest-physical run.
    let contiguous = |i: usize, n: usize| {
        i + n <= pages.len() && pages[i + n - 1] == pages[i] + (n as u64 - 1) * PAGE_SIZE
    };
    let range = |i: usize, n: usize| GpaRange { start: pages[i], end: pages[i] + n as u64 * PAGE_SIZE };
    let mut plan = Vec::new();
    let per_huge = (HUGE_PAGE_SIZE / PAGE_SIZE) as usize;
    if huge_only {
        let aligned = |from: usize, blocks: usize| {
            (from..pages.len()).find(|&i| pages[i] % HUGE_PAGE_SIZE == 0 && contiguous(i, blocks * per_huge))
        };
        if let Some(i) = aligned(0, 1) {
            plan.push(range(i, per_huge));
            if let Some(j) = aligned(i + 2 * per_huge, 2) {
                plan.push(range(j, 2 * per_huge));
            }
        }
        return plan;
    }
    if contiguous(1, 1) {
        plan.push(range(1, 1));
    }
    if contiguous(5, 4) {
        plan.push(range(5, 4));
    }
    let block = (10..pages.len()).find(|&i| pages[i] % HUGE_PAGE_SIZE == 0 && contiguous(i, per_huge));
    let after = match block {
        Some(i) => {
            plan.push(range(i, per_huge));
            i + per_huge + 2
        }
        None => 12,
    };
    if let Some(i) = (after..pages.len()).find(|&i| pages[i] % HUGE_PAGE_SIZE == 0 && contiguous(i - 2, 4)) {
        plan.push(range(i - 2, 4));
    }
    plan
}

/// A KVM statistics delta as `vm.<name>` / `vcpu.<name>` -> change.
pub fn flatten(delta: &KvmStatsDelta) -> std::collections::BTreeMap<String, i64> {
    let vm = delta.vm.iter().map(|(n, e)| (format!("vm.{n}"), e.change as i64));
    let vcpu = delta.vcpus.iter().map(|(n, e)| (format!("vcpu.{n}"), e.change as i64));
    vm.chain(vcpu).collect()
}

impl RendezvousHandler for DiscardRendezvous {
    fn handle(&self, vcpu: usize, kind: Rendezvous, mut args: [u64; 6]) -> Result<[u64; 6], String> {
        match kind {
            Rendezvous::Discard => {
                let (array, capacity) = (args[1], args[2]);
                let ranges: Vec<GpaRange> =
                    plan(&self.info, vcpu, self.huge_only).into_iter().take(capacity as usize).collect();
                for r in &ranges {
                    let len = r.end - r.start;
                    let hva = self.mmu.host_range(r.start, len).ok_or_else(|| {
                        format!("discard plan [{:#x}, {:#x}) is not in one RAM region", r.start, r.end)
                    })?;
                    let mut back = vec![0u8; len as usize];
                    let device_read_pattern_before = self.mmu.read(r.start, &mut back).is_ok()
                        && back.chunks_exact(8).enumerate().all(|(i, w)| {
                            u64::from_le_bytes(w.try_into().unwrap())
                                == guest_abi::pattern(self.info.seed, r.start + 8 * i as u64)
                        });
                    let before = self.kvm.as_ref().and_then(|k| k.read().ok());
                    let op = self
                        .mmu
                        .space()
                        .discard(hva, len as usize)
                        .map_err(|e| format!("discard of guest [{:#x}, {:#x}): {e}", r.start, r.end))?;
                    let kvm_delta = match (&self.kvm, before) {
                        (Some(k), Some(before)) => {
                            k.read().map(|after| flatten(&after.delta(&before))).unwrap_or_default()
                        }
                        _ => Default::default(),
                    };
                    back.fill(0xa5);
                    let device_read_zeros =
                        self.mmu.read(r.start, &mut back).is_ok() && back.iter().all(|&b| b == 0);
                    self.records.lock().unwrap_or_else(|e| e.into_inner()).push(DiscardRecord {
                        vcpu,
                        gpa: r.start,
                        len,
                        notified: (op.range.start, op.range.end),
                        device_read_pattern_before,
                        device_read_zeros,
                        kvm_delta,
                    });
                }
                let bytes: Vec<u8> = ranges
                    .iter()
                    .flat_map(|r| [r.start.to_le_bytes(), r.end.to_le_bytes()])
                    .flatten()
                    .collect();
                self.mmu
                    .write(array, &bytes)
                    .map_err(|e| format!("cannot write the discarded ranges: {e}"))?;
                args[3] = ranges.len() as u64;
                Ok(args)
            }
            // The vCPU loop answers Idle itself; it never reaches a handler.
            Rendezvous::Idle => Ok(args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_page_pages_block_and_boundary_without_overlap() {
        let mut work = [GpaRange::default(); guest_abi::MAX_RANGES];
        work[0] = GpaRange { start: 0x60_0000, end: 0x400_0000 };
        let info = BootInfo {
            magic: 0,
            abi_version: 0,
            nr_vcpus: 2,
            workload: 5,
            flags: 0,
            seed: 1,
            idt_gpa: 0,
            nr_work: 1,
            work,
            nr_virtio: 0,
            virtio: Default::default(),
            phase: Default::default(),
        };
        for vcpu in 0..2 {
            let plan = plan(&info, vcpu, false);
            let lens: Vec<u64> = plan.iter().map(|r| r.end - r.start).collect();
            assert_eq!(lens, [4096, 16384, 2 << 20, 16384], "vCPU {vcpu}: {plan:x?}");
            assert_eq!(plan[2].start % HUGE_PAGE_SIZE, 0);
            assert!(plan[3].start / HUGE_PAGE_SIZE != (plan[3].end - 1) / HUGE_PAGE_SIZE, "crosses 2 MiB");
            for w in plan.windows(2) {
                assert!(w[0].end <= w[1].start, "ordered, disjoint: {plan:x?}");
            }
            let mut slice = Vec::new();
            slice_pages(&info.work[..1], 2, vcpu as u64, |g| slice.push(g));
            assert!(plan.iter().all(|r| slice.contains(&r.start) && slice.contains(&(r.end - 4096))));
            let huge = super::plan(&info, vcpu, true);
            let lens: Vec<u64> = huge.iter().map(|r| r.end - r.start).collect();
            assert_eq!(lens, [2 << 20, 4 << 20], "vCPU {vcpu}: {huge:x?}");
            assert!(huge.iter().all(|r| r.start % HUGE_PAGE_SIZE == 0 && slice.contains(&(r.end - 4096))));
        }
    }
}
