//! A VM's stats and its vCPUs' stats as one view: reading them together, combining the vCPUs,
//! and the difference of two such views.

use std::collections::BTreeMap;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::desc::StatKind;
use crate::error::Result;
use crate::fd::StatsFd;
use crate::snapshot::{DeltaEntry, Snapshot};

/// The VM's stats and the vCPUs' stats summed, as one view.
///
/// Values are [`Snapshot::value`]s (histograms: sample counts). vCPU stats are combined per name:
/// cumulative, instant and histogram stats are summed over vCPUs, peak stats take the maximum.
/// With the `serde` feature it serializes as `{ "vm": {..}, "vcpus": {..}, "nr_vcpus": n }`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KvmStats {
    /// VM-wide stats by name.
    pub vm: BTreeMap<String, u64>,
    /// vCPU stats by name, combined over all vCPUs.
    pub vcpus: BTreeMap<String, u64>,
    /// Number of vCPU snapshots combined.
    pub nr_vcpus: usize,
    #[cfg_attr(feature = "serde", serde(skip))]
    kinds_vm: BTreeMap<String, StatKind>,
    #[cfg_attr(feature = "serde", serde(skip))]
    kinds_vcpu: BTreeMap<String, StatKind>,
}

impl KvmStats {
    /// Combines a VM snapshot and any number of vCPU snapshots.
    pub fn aggregate<'a>(vm: &Snapshot, vcpus: impl IntoIterator<Item = &'a Snapshot>) -> Self {
        let mut out = KvmStats {
            vm: vm.to_map(),
            vcpus: BTreeMap::new(),
            nr_vcpus: 0,
            kinds_vm: vm.layout().descs.iter().map(|d| (d.name.clone(), d.kind)).collect(),
            kinds_vcpu: BTreeMap::new(),
        };
        for snap in vcpus {
            out.nr_vcpus += 1;
            for d in &snap.layout().descs {
                let v = snap.scalar(d);
                out.kinds_vcpu.entry(d.name.clone()).or_insert(d.kind);
                let slot = out.vcpus.entry(d.name.clone()).or_insert(0);
                *slot = if d.kind == StatKind::Peak { (*slot).max(v) } else { slot.saturating_add(v) };
            }
        }
        out
    }

    /// Changes from `earlier` to `self`, only the stats that moved; semantics as
    /// [`Delta`](crate::Delta) (counters: the change; instant/peak: the change and the later value).
    pub fn delta(&self, earlier: &KvmStats) -> KvmStatsDelta {
        fn diff(
            now: &BTreeMap<String, u64>,
            before: &BTreeMap<String, u64>,
            kinds: &BTreeMap<String, StatKind>,
        ) -> BTreeMap<String, DeltaEntry> {
            now.iter()
                .filter_map(|(name, &v)| {
                    let kind = kinds.get(name).copied().unwrap_or(StatKind::Unknown(u32::MAX));
                    let change = i128::from(v) - i128::from(before.get(name).copied().unwrap_or(0));
                    (change != 0).then(|| {
                        let entry = DeltaEntry {
                            name: name.clone(),
                            kind,
                            change,
                            now: (!kind.is_counter()).then_some(v),
                            buckets: None,
                        };
                        (name.clone(), entry)
                    })
                })
                .collect()
        }
        KvmStatsDelta {
            vm: diff(&self.vm, &earlier.vm, &self.kinds_vm),
            vcpus: diff(&self.vcpus, &earlier.vcpus, &self.kinds_vcpu),
        }
    }
}

/// What moved between two [`KvmStats`]: per name, the [`DeltaEntry`] (change, and the later value
/// of instant/peak stats). Stats that did not move are absent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KvmStatsDelta {
    /// VM-wide stats that moved.
    pub vm: BTreeMap<String, DeltaEntry>,
    /// Combined vCPU stats that moved.
    pub vcpus: BTreeMap<String, DeltaEntry>,
}

impl KvmStatsDelta {
    /// Whether nothing moved.
    pub fn is_empty(&self) -> bool {
        self.vm.is_empty() && self.vcpus.is_empty()
    }
}

/// The stats fds of a VM and its vCPUs, read together into a [`KvmStats`].
#[derive(Debug)]
pub struct KvmStatsReader {
    /// The VM's stats.
    pub vm: StatsFd,
    /// Each vCPU's stats, in the order given to [`KvmStatsReader::new`].
    pub vcpus: Vec<StatsFd>,
}

impl KvmStatsReader {
    /// Opens the stats of `vm` and of each vCPU in `vcpus`.
    pub fn new<'a>(vm: &VmFd, vcpus: impl IntoIterator<Item = &'a VcpuFd>) -> Result<Self> {
        Ok(Self {
            vm: StatsFd::for_vm(vm)?,
            vcpus: vcpus.into_iter().map(StatsFd::for_vcpu).collect::<Result<_>>()?,
        })
    }

    /// Reads every fd (1 + nr_vcpus preads) and aggregates.
    pub fn read(&self) -> Result<KvmStats> {
        let vm = self.vm.read()?;
        let vcpus = self.vcpus.iter().map(StatsFd::read).collect::<Result<Vec<_>>>()?;
        Ok(KvmStats::aggregate(&vm, &vcpus))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_image::{sample_layout, snapshot};

    /// Aggregation sums every kind over the vCPUs but peaks (the maximum); the aggregated delta
    /// holds only what moved, with the later value of levels.
    #[test]
    fn aggregate_and_delta() {
        let layout = sample_layout();
        let a = snapshot(&layout, &[10, 100, 7, 1, 2, 3]);
        let b = snapshot(&layout, &[15, 90, 9, 1, 4, 3]);
        let s1 = KvmStats::aggregate(&a, [&a, &b]);
        assert_eq!(s1.nr_vcpus, 2);
        assert_eq!(s1.vcpus["exits"], 25);
        assert_eq!(s1.vcpus["max_rmap"], 9);
        assert_eq!(s1.vcpus["hist"], 14);
        let s2 = KvmStats::aggregate(&b, [&b, &b]);
        let d = s2.delta(&s1);
        assert_eq!(d.vm["exits"].change, 5);
        assert_eq!(d.vcpus["exits"].change, 5);
        assert_eq!(d.vcpus["pages_4k"].now, Some(180));
        assert!(!d.vcpus.contains_key("max_rmap"));
        assert!(!d.is_empty());
        assert!(s2.delta(&s2).is_empty());
    }
}
