//! Discards on the guest's behalf through the table: [`GuestMmu::discard`], the devices' one
//! handle for giving guest RAM back to the host, and its [`DiscardError`].

use super::GuestMmu;

/// Why [`GuestMmu::discard`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is empty, overflows, or is not inside one guest RAM region: refused before any
    /// syscall.
    #[error("guest-physical range [{gpa:#x}, +{len:#x}) is not inside one guest RAM region")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The notifier refused the operation (e.g. not aligned to the region's page size) or the
    /// kernel failed it.
    #[error("discard of guest-physical [{gpa:#x}, +{len:#x}): {source}")]
    Notifier {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// What the notifier said.
        #[source]
        source: notifier::Error,
    },
}

/// Discards on the guest's behalf: the one handle through which devices give guest RAM back to
/// the host (the balloon, virtio-mem), as Firecracker's `remove_range` is.
impl GuestMmu {
    /// Discards guest-physical `[gpa, gpa + len)`: the range is translated and checked once (it
    /// must lie inside one guest RAM region, which makes the host range linear), then the host
    /// range goes to **one** notifier operation (`invalidate_range_start` -> madvise/fallocate ->
    /// `invalidate_range` -> end), so this table and every other subscriber drop their
    /// translations before the syscall. A range outside guest RAM never reaches a syscall.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<notifier::OpReport, DiscardError> {
        let outside = DiscardError::OutsideRam { gpa, len };
        let hva = self.host_range(gpa, len).filter(|_| len > 0).ok_or(outside)?;
        let host_len = usize::try_from(len).map_err(|_| DiscardError::OutsideRam { gpa, len })?;
        self.space().discard(hva, host_len).map_err(|source| DiscardError::Notifier { gpa, len, source })
    }
}
