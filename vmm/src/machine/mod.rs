//! Building a VM from a [`VmConfig`] and running it to an outcome, in three rooms, as
//! Firecracker keeps its resources, builder and running VM apart:
//! - [`config`]: what the user asked for ([`VmConfig`], plain values);
//! - [`builder`]: config -> a [`BuiltVm`] ([`build`]): guest RAM, the memory layer, the devices,
//!   the boot image, the vCPUs, all made and checked, nothing running;
//! - [`vm`]: the running VM ([`BuiltVm::run`]): the control socket, the metrics, the vCPU
//!   threads, the event loop, the stop, the host's check, the [`RunReport`];
//!
//! and [`control`], the [`VmControl`] handle controllers hold while it runs, and [`report`],
//! what a run ends with.
//!
//! Data flows one way: the config makes guest RAM, the VM and its devices; the boot path fills
//! RAM and says how each vCPU enters; vCPU threads run and report to the event loop on the
//! calling thread; the loop decides when the VM ends and returns a [`RunReport`].

pub mod builder;
pub mod config;
pub mod control;
pub mod report;
pub mod vm;

pub use crate::boot::test_guest::HostCheck;
pub use builder::{build, BuiltVm};
pub use config::{BootSource, Console, VirtioMemSpec, VmConfig};
pub use control::{
    AfterStart, BalloonDevice, VirtioMemDevice, VmControl, VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_STRIDE,
};
pub use report::{Error, MemoryLayerReport, RunReport, VmOutcome};

use crate::boot::test_guest::check_workload;
use report::{first_failure, host};
use vm::{RawFdI32, Watcher};

/// Builds the VM `config` describes and runs it to the end: [`build`], then [`BuiltVm::run`].
pub fn run(config: &VmConfig) -> Result<RunReport, Error> {
    build(config)?.run()
}
