//! zapvm: a minimal KVM hypervisor whose memory layer is a secondary MMU done right.
//!
//! The crate is split by concern, and data flows one way through it:
//! - [`memory`]: guest RAM (layout, host backing, THP);
//! - [`mmu`]: the VMM's own second-level table, through which it accesses guest RAM;
//! - [`rendezvous`]: the host side of the test guest's rendezvous (discards through the notifier);
//! - [`vstate`]: the KVM VM ([`vstate::vm`]) and its vCPU threads ([`vstate::vcpu`]);
//! - [`arch`]: x86_64 descriptor tables, identity page tables, vCPU registers;
//! - [`boot`]: the test guest and Linux boot paths;
//! - [`devices`]: the port/MMIO buses and the emulated devices;
//! - [`ucall`]: the test guest's channel to the VMM;
//! - [`api`]: the control socket, QMP (`zapvm run --api-socket`, the `zapvm` client commands);
//! - [`stats`]: statistics of a running VM on demand (`zapvm stats`);
//! - [`metrics`]: the same statistics for Prometheus (`zapvm run --metrics-addr`, `--metrics-file`);
//! - [`teardown`]: surviving teardowns of guest RAM by code outside the VMM;
//! - [`timestamp`]: RFC 3339 UTC timestamps for reports (`zapvm stats`, the benchmarks);
//! - [`pvm`]: the few adjustments PVM hosts need, inert elsewhere;
//! - [`machine`]: builds a VM from a [`machine::VmConfig`] and runs it to a [`machine::RunReport`];
//!   a running VM is seen through its [`machine::VmControl`] handle.
//!
//! This crate is the hypervisor only: the `zapvm` command line is the `zapvm` package (`cli/`),
//! and the stress test and the benchmarks are the `harness` package, both users of this crate's
//! public API.

pub mod api;
pub mod arch;
pub mod boot;
pub mod console_input;
pub mod devices;
// KVM binary statistics are a crate of their own; re-exported so `crate::kvm_stats::…` and
// `vmm::kvm_stats::…` keep naming them.
pub use ::kvm_stats;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod mmu;
pub mod pvm;
pub mod rendezvous;
pub mod stats;
pub mod teardown;
pub mod timestamp;
pub mod ucall;
pub mod vstate;
