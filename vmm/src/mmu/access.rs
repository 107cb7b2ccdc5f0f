//! The access API of guest memory on the guest's behalf: [`GuestMemoryAccess`] (what the devices
//! and the boot loaders read and write through), its [`AccessError`], the plain-data helpers
//! [`read_obj`] and [`write_obj`], and the direct implementation over vm-memory's
//! `GuestMemoryMmap` (the table's own is in `mmu.rs`).

use vm_memory::ByteValued;

#[cfg(doc)]
use super::GuestMmu;

/// Why a guest memory access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// Part of the range is not guest RAM.
    #[error("guest-physical range [{gpa:#x}, +{len:#x}) is not guest RAM")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The host mapping behind guest RAM is gone (unmapped by someone).
    #[error("guest RAM at {gpa:#x} has no host mapping (it was unmapped)")]
    Unmapped {
        /// The address.
        gpa: u64,
    },
    /// The host refused the copy.
    #[error("copying guest RAM at {gpa:#x} failed: {errno}")]
    Fault {
        /// The address.
        gpa: u64,
        /// The errno's text.
        errno: String,
    },
}

/// Reading and writing guest memory on the guest's behalf.
pub trait GuestMemoryAccess: Send + Sync {
    /// Fills `buf` from guest-physical `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes `buf` to guest-physical `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError>;
    /// Fills every buffer of `reads` from its guest-physical address, as [`read`] of each in
    /// turn would: on the first failure that error is returned (the buffers before it are
    /// filled, the others unspecified). An implementation may copy them with fewer operations
    /// ([`GuestMmu`]: one system call on its syscall path when they are all installed).
    ///
    /// [`read`]: GuestMemoryAccess::read
    fn read_scattered(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), AccessError> {
        for (gpa, buf) in reads.iter_mut() {
            self.read(*gpa, buf)?;
        }
        Ok(())
    }
}

/// Reads a plain-data `T` at `gpa`.
pub fn read_obj<T: ByteValued + Default>(mem: &dyn GuestMemoryAccess, gpa: u64) -> Result<T, AccessError> {
    let mut value = T::default();
    mem.read(gpa, value.as_mut_slice())?;
    Ok(value)
}

/// Writes a plain-data `T` at `gpa`.
pub fn write_obj<T: ByteValued>(mem: &dyn GuestMemoryAccess, value: T, gpa: u64) -> Result<(), AccessError> {
    mem.write(gpa, value.as_slice())
}

/// Direct access through vm-memory, for the boot loaders and unit tests (not on the guest's
/// behalf at run time: those go through [`GuestMmu`]).
impl GuestMemoryAccess for crate::memory::GuestMemoryMmap {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        vm_memory::Bytes::read_slice(self, buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| AccessError::OutsideRam { gpa, len: buf.len() as u64 })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        vm_memory::Bytes::write_slice(self, buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| AccessError::OutsideRam { gpa, len: buf.len() as u64 })
    }
}
