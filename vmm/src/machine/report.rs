//! What a run ends with: [`RunReport`] and its parts, the errors that keep a VM from starting,
//! and the host's check of what the guest wrote.

use crate::boot::test_guest::HostCheck;

use crate::arch::cpu;
use crate::boot::BootError;
use crate::devices::virtio::balloon::BalloonStats;
use crate::devices::virtio::mem::VirtioMemStats;
use crate::devices::virtio::mmio::TransportStats;
use crate::devices::BusError;
use crate::memory::MemoryError;
use crate::mmu::MmuStats;
use crate::rendezvous::DiscardRecord;
use crate::teardown::TeardownReport;
use crate::vstate::vcpu::{VcpuOutcome, VcpuReport};
use crate::vstate::vm::VmError;

/// Errors that keep a VM from starting (bad input or a host problem), each a one-line message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the VMM's descriptor layout holds.
    #[error("{wanted} vCPUs requested; zapvm supports at most {max}")]
    TooManyVcpus {
        /// Asked for.
        wanted: u32,
        /// Most supported.
        max: u32,
    },
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be set up.
    #[error("vCPU {index}: {source}")]
    Cpu {
        /// Which vCPU.
        index: usize,
        /// What failed.
        #[source]
        source: cpu::CpuSetupError,
    },
    /// A device could not be placed on its bus.
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    /// An interrupt line (irqfd) could not be registered with KVM.
    #[error("KVM_IRQFD for {what} on GSI {gsi}: {source}")]
    Irqfd {
        /// Whose interrupt.
        what: String,
        /// Its line.
        gsi: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The virtio-mem device refused its configuration.
    #[error("virtio-mem: {0}")]
    VirtioMem(#[from] crate::devices::virtio::mem::VirtioMemError),
    /// The memory layer could not be set up.
    #[error("memory layer: {0}")]
    Notifier(#[from] notifier::Error),
    /// The event loop could not be made.
    #[error("the event loop (epoll): {0:?}")]
    EventLoop(event_manager::Error),
    /// The metrics exporter could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The control socket could not be created.
    #[error("control socket {path}: {source}")]
    ApiSocket {
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Threads, eventfds, epoll.
    #[error("{what}: {source}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmOutcome {
    /// Every vCPU finished its workload and the host saw what the guest wrote.
    Success,
    /// The guest reset the machine (how a Linux guest ends).
    Reset,
    /// A vCPU failed; the message says which and why.
    Failed {
        /// What went wrong.
        message: String,
    },
    /// The VMM was asked to stop the VM (control API, `VmControl::quit`).
    Quit,
    /// The timeout expired.
    TimedOut {
        /// After how many seconds.
        seconds: f64,
    },
}

/// What the memory layer did during a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryLayerReport {
    /// Whether the userfaultfd monitor watched guest RAM.
    pub monitor: bool,
    /// Whether guest RAM was sealed with `mseal(2)` (`--seal-guest-ram`).
    pub sealed: bool,
    /// The VMM's table.
    pub table: MmuStats,
    /// The notifier's counters.
    pub notifier: notifier::Stats,
    /// Discards the host performed for the guest, with what KVM's stats did meanwhile.
    pub discards: Vec<DiscardRecord>,
    /// Teardowns of guest RAM by code outside the VMM, and what the policy did.
    pub external_teardowns: TeardownReport,
    /// The balloon's counters, if the VM had one.
    pub balloon: Option<BalloonStats>,
    /// The virtio-mem device's counters, if the VM had one.
    pub virtio_mem: Option<VirtioMemStats>,
    /// The balloon's transport counters (kicks by exit / by ioeventfd, ioeventfd fallback).
    pub balloon_transport: Option<TransportStats>,
    /// The virtio-mem device's transport counters.
    pub virtio_mem_transport: Option<TransportStats>,
}

/// The result of running a VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// How it ended.
    pub outcome: VmOutcome,
    /// What was booted.
    pub boot: String,
    /// Each vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// The host's check of the workload's pages.
    pub host_check: Option<HostCheck>,
    /// Bytes of RAM.
    pub mem_bytes: u64,
    /// Whether RAM is mapped so that THP can back it with whole 2 MiB pages.
    pub thp_aligned: bool,
    /// Microseconds the run took, from the start of the VM build.
    pub wall_us: u64,
    /// The memory layer's view of the run.
    pub memory_layer: MemoryLayerReport,
    /// On PVM hosts: the instructions the VMM completed for the host's emulator.
    pub pvm_quirks: Option<crate::pvm::QuirkCounts>,
}

impl RunReport {
    /// Whether the run succeeded.
    pub fn success(&self) -> bool {
        matches!(self.outcome, VmOutcome::Success | VmOutcome::Reset | VmOutcome::Quit)
    }
}

pub(super) fn first_failure(reports: &[VcpuReport]) -> Option<VmOutcome> {
    reports.iter().find_map(|r| {
        let what = match &r.outcome {
            VcpuOutcome::GuestFailure { message } => format!("guest failure: {message}"),
            VcpuOutcome::GuestException { message } => format!("guest exception: {message}"),
            VcpuOutcome::Error { message } => message.clone(),
            VcpuOutcome::Stopped | VcpuOutcome::Done { .. } => return None,
        };
        Some(VmOutcome::Failed { message: format!("vCPU {}: {what}", r.index) })
    })
}
