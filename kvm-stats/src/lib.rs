//! Reader of KVM's binary statistics (`KVM_GET_STATS_FD`) for a VM and its vCPUs.
//!
//! # What the stats fd gives
//!
//! Since Linux 5.14 KVM exposes its per-VM and per-vCPU counters (shadow-MMU page counts,
//! TLB-flush requests, exits, page faults, halt-polling histograms, ...) through a read-only file
//! descriptor, obtained with the `KVM_GET_STATS_FD` ioctl on a VM fd or on a vCPU fd (Linux
//! `Documentation/virt/kvm/api.rst`, section `KVM_GET_STATS_FD`). The kernel guarantees, and this
//! crate relies on:
//!
//! - the header, the id string and the descriptors never change for the life of the fd, so they
//!   are read once, when the fd is opened ([`StatsFd`]);
//! - the values live in one data block that `pread` at `data_offset` returns whole; KVM updates
//!   them concurrently, so one read is not an atomic snapshot across stats (a running vCPU keeps
//!   counting while the block is copied);
//! - the fd holds its own reference to the VM or vCPU: it stays valid, and its stats keep their
//!   values, after the `VmFd`/`VcpuFd` it came from is dropped.
//!
//! Nothing else is assumed: every count and offset the kernel supplies is checked before it is
//! used (sizes against sanity limits, offsets for the kernel's order and alignment, names for a
//! terminating NUL), so a malformed or truncated fd gives [`StatsError::Malformed`] or
//! [`StatsError::ShortRead`], never a panic or an out-of-bounds access. A kernel without the ioctl
//! gives [`StatsError::Unsupported`].
//!
//! # The binary layout
//!
//! ```text
//! offset 0            struct kvm_stats_header { flags, name_size, num_desc, id_offset,
//!                                               desc_offset, data_offset }      (6 × u32)
//! id_offset           id string ("kvm-<pid>" / "kvm-<pid>/vcpu-<n>"), name_size bytes
//! desc_offset         num_desc × { struct kvm_stats_desc (16 bytes), name[name_size] }
//! data_offset         the values: stat i is desc[i].size u64s at data_offset + desc[i].offset
//! ```
//!
//! A descriptor's `flags` combine a type (cumulative, instant, peak, linear or logarithmic
//! histogram: [`StatKind`]), a unit ([`StatUnit`]) and the base of the unit's exponent
//! ([`StatBase`]). All fields are in the host's byte order.
//!
//! # Layers
//!
//! Parsing is separate from the fd, so it is testable without KVM:
//! - [`StatsLayout::parse`] turns the fd's bytes (from offset 0 up to the end of the descriptors)
//!   into [`StatDesc`]s, checking every kernel-supplied count and offset;
//! - [`StatsFd`] obtains the fd ([`StatsFd::for_vm`], [`StatsFd::for_vcpu`]) and reads it:
//!   [`StatsFd::read`] is one `pread` of the data block, cheap enough to bracket a single operation;
//! - [`Snapshot`] holds one reading, [`Delta`] the difference of two;
//! - [`KvmStats`] / [`KvmStatsDelta`] aggregate the VM and all its vCPUs into one view, and
//!   [`KvmStatsReader`] reads all of them at once.
//!
//! With the `serde` feature (on by default) descriptors, snapshots, deltas and the aggregated
//! views implement `serde::Serialize`.
//!
//! # Safety
//!
//! No public function is `unsafe`. The crate's only unsafe code issues the ioctl on a borrowed
//! KVM fd and takes ownership of the fd it returns; each block states why it holds.
//!
//! # Example
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use kvm_stats::StatsFd;
//!
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let vcpu = vm.create_vcpu(0)?;
//! let stats = StatsFd::for_vcpu(&vcpu)?;
//! let before = stats.read()?;
//! // ... run the vCPU ...
//! let delta = stats.read()?.delta(&before);
//! println!("exits {:?}; moved: {delta}", delta.change("exits"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]
// The workspace's rust-version (1.85) predates `usize::is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

mod aggregate;
mod desc;
mod error;
mod fd;
mod layout;
#[cfg(feature = "serde")]
mod serialize;
mod snapshot;
#[cfg(test)]
mod test_image;

pub use aggregate::{KvmStats, KvmStatsDelta, KvmStatsReader};
pub use desc::{StatBase, StatDesc, StatKind, StatUnit};
pub use error::{Result, StatsError};
pub use fd::StatsFd;
pub use layout::StatsLayout;
pub use snapshot::{Delta, DeltaEntry, Snapshot};
