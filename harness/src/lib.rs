//! zapvm's harness: the stress test and the benchmarks, outside the hypervisor.
//!
//! Everything here drives the `vmm` crate through its public API only: a VM is built from a
//! `vmm::machine::VmConfig`, run by `vmm::machine::run`, and watched and attacked while it runs
//! through the `vmm::machine::VmControl` handle the run's `after_start` hook receives (its guest
//! RAM regions, the VMM's table, the balloon and virtio-mem devices). The command line that
//! reaches these modules (`zapvm stress`, `zapvm bench ...`) is the `zapvm` package (`cli/`); the
//! plain options structs here are what it converts its arguments to.
//!
//! - [`stress`]: `zapvm stress` (the memory layer under seeded, concurrent teardowns);
//! - [`stress_linux`]: `zapvm stress --linux` (Linux's balloon and virtio_mem drivers under a
//!   storm, checked by programs in the guest), [`stress_linux_plot`] its plot;
//! - [`bench`]: `zapvm bench boot` (VMM start to first guest instruction, guest touch cost);
//! - [`bench_access`]: `zapvm bench access` (a device-path access through the VMM's table vs
//!   memcpy and the syscall path, system calls counted);
//! - [`bench_kick`]: `zapvm bench kick` (the guest-visible cost of a virtio queue kick, with and
//!   without ioeventfds, against one exit to the VMM);
//! - [`bench_notifier`]: `zapvm bench notifier` (the notifier's invalidation versus the raw
//!   syscalls, and the userfaultfd monitor's cost);
//! - [`bench_balloon`]: `zapvm bench balloon` (the balloon's inflate/deflate throughput vs raw
//!   madvise);
//! - [`bench_pressure`]: `zapvm bench pressure` (the guest's touch rate under host discards);
//! - [`bench_pressure_report`]: the report of `zapvm bench pressure`, which the plot draws;
//! - [`bench_overcommit`]: `zapvm bench overcommit` (a phased fleet over a memory budget: no
//!   policy, a static split, the governor), [`bench_overcommit_plot`] its plot;
//! - [`bench_plot`]: SVG plots of benchmark reports;
//! - [`bench_export`]: every bench's files for other tools (a flat `[{name, unit, value}]` list
//!   beside each JSON report, a CSV beside each plot);
//! - [`governor`]: `zapvm governor` (a fleet of VMs under a memory budget, through their
//!   balloons) and its policy;
//! - [`seconds`]: durations in reports as seconds.
//!
//! The feature `fault-injection` (tests only) turns on the planted faults of the stress test, and
//! with them those of `vmm` and the notifier.

pub mod bench;
pub mod bench_access;
pub mod bench_balloon;
pub mod bench_export;
pub mod bench_kick;
pub mod bench_notifier;
pub mod bench_overcommit;
pub mod bench_overcommit_plot;
pub mod bench_plot;
pub mod bench_pressure;
pub mod bench_pressure_report;
pub mod governor;
pub mod seconds;
pub mod stress;
pub mod stress_linux;
pub mod stress_linux_plot;
