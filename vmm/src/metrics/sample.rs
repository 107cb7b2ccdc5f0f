//! One reading of every statistic of a running VM: what `zapvm stats` prints as JSON and what the
//! Prometheus exposition encodes ([`super::exposition`]). [`crate::machine::VmControl::sample`]
//! takes it; both outputs are views of the same [`StatsSample`], so they never disagree on what
//! is collected.

use std::time::Duration;

use crate::devices::virtio::balloon::BalloonStats;
use crate::devices::virtio::mem::VirtioMemStats;
use crate::devices::virtio::mmio::TransportStats;
use crate::kvm_stats::{KvmStats, Snapshot};
use crate::mmu::MmuStats;
use crate::pvm::QuirkCounts;
use crate::teardown::TeardownReport;

/// KVM's binary statistics: one reading of the VM's stats fd and one of each vCPU's.
#[derive(Debug, Clone)]
pub struct KvmSample {
    /// The VM's stats fd.
    pub vm: Snapshot,
    /// Each vCPU's stats fd, by vCPU index.
    pub vcpus: Vec<Snapshot>,
}

impl KvmSample {
    /// The VM's stats and the vCPUs' combined (see [`KvmStats::aggregate`]).
    pub fn aggregate(&self) -> KvmStats {
        KvmStats::aggregate(&self.vm, &self.vcpus)
    }
}

/// Every statistic of a running VM at one moment (each part read under its own lock, so the
/// parts are not one atomic snapshot of the whole VM).
#[derive(Debug, Clone)]
pub struct StatsSample {
    /// The VMM's process id.
    pub pid: u32,
    /// When the sample was taken (wall clock).
    pub taken_at: std::time::SystemTime,
    /// Time since the VM was built.
    pub uptime: Duration,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// Per vCPU: (pages done, pages in its slice) of the test guest's workload.
    pub vcpu_progress_pages: Vec<(u64, u64)>,
    /// KVM's statistics; `None` where the host has no stats fds or a read failed.
    pub kvm: Option<KvmSample>,
    /// The VMM's second-level table.
    pub table: MmuStats,
    /// The notifier: per kind and origin, per subscriber, the userfaultfd monitor.
    pub notifier: notifier::Stats,
    /// Teardowns of guest RAM by code outside the VMM.
    pub external_teardowns: TeardownReport,
    /// Discards the test guest's rendezvous made.
    pub discards: usize,
    /// The balloon device, if the VM has one.
    pub balloon: Option<BalloonStats>,
    /// The balloon's virtio-mmio transport.
    pub balloon_transport: Option<TransportStats>,
    /// The virtio-mem device, if the VM has one.
    pub virtio_mem: Option<VirtioMemStats>,
    /// The virtio-mem device's virtio-mmio transport.
    pub virtio_mem_transport: Option<TransportStats>,
    /// Instructions completed for a PVM host's emulator (`None` off PVM).
    pub pvm_quirks: Option<QuirkCounts>,
}

impl StatsSample {
    /// The JSON of `zapvm stats` and the control API's `stats` operation: KVM's statistics as
    /// [`KvmStats`] (VM-wide, and the vCPUs combined), everything else as its own serialization.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "time": crate::timestamp::rfc3339(self.taken_at),
            "unix_time_s": self.taken_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "uptime_s": self.uptime.as_secs_f64(),
            "paused": self.paused,
            "vcpu_progress_pages": self.vcpu_progress_pages,
            "kvm": self.kvm.as_ref().map(KvmSample::aggregate),
            "table": self.table,
            "notifier": self.notifier,
            "external_teardowns": self.external_teardowns,
            "discards": self.discards,
            "balloon": self.balloon,
            "balloon_transport": self.balloon_transport,
            "virtio_mem": self.virtio_mem,
            "virtio_mem_transport": self.virtio_mem_transport,
            "pvm_quirks": self.pvm_quirks,
        })
    }
}
