//! Putting a guest into RAM and deciding how each vCPU enters it.
//!
//! - [`test_guest`]: the project's freestanding test guest (an ELF), entered in 64-bit mode at
//!   CPL 3 by default, with a [`guest_abi::BootInfo`] describing its workload.
//! - [`linux`]: a Linux kernel (bzImage or vmlinux ELF) per the x86 64-bit boot protocol.
//! - [`linux_guest`]: the project's own Linux guest (kernel and initramfs built from
//!   `resources/linux-guest/`).

pub mod linux;
pub mod linux_guest;
pub mod test_guest;

use crate::arch::cpu::EntryState;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel", "initrd", "test guest ELF".
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The image is not what it should be.
    #[error("{what} {path} is not a valid image: {reason}")]
    BadImage {
        /// "kernel", "test guest ELF".
        what: &'static str,
        /// Its path (or "built-in").
        path: String,
        /// Why.
        reason: String,
    },
    /// RAM too small.
    #[error("{mem} bytes of RAM is too small for {what}: it needs at least {needed} bytes")]
    MemoryTooSmall {
        /// What did not fit.
        what: String,
        /// Bytes of RAM configured.
        mem: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// Too much RAM for the identity tables the test guest gets.
    #[error("the test guest maps at most {max} bytes of guest-physical space; {top} requested")]
    AddressSpaceTooLarge {
        /// Most supported.
        max: u64,
        /// Top of RAM.
        top: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Write {
        /// What.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel command line is invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

/// How the VM's vCPUs start.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// Entry state of each vCPU; `None` for an application processor that waits for the boot
    /// processor to start it (INIT/SIPI), as Linux's secondary CPUs do.
    pub entries: Vec<Option<EntryState>>,
    /// One line saying what was loaded where.
    pub summary: String,
}
