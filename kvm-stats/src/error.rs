//! The crate's error type.

use std::io;

/// Errors from reading KVM statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl is unknown to this kernel (ENOTTY/EINVAL/ENOSYS/EOPNOTSUPP): KVM older than
    /// Linux 5.14, or a KVM flavour without binary stats.
    #[error("KVM_GET_STATS_FD is not supported by this host's KVM ({0})")]
    Unsupported(#[source] io::Error),
    /// The ioctl exists but failed (e.g. EMFILE: out of file descriptors).
    #[error("KVM_GET_STATS_FD failed: {0}")]
    GetFd(#[source] io::Error),
    /// `pread` of the stats fd failed.
    #[error("reading {len} bytes at offset {offset} of the KVM stats fd failed: {source}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// How many bytes were asked for.
        len: usize,
        /// The read's error.
        #[source]
        source: io::Error,
    },
    /// The stats fd ended before the bytes its own header promised.
    #[error("the KVM stats fd returned {got} of {want} bytes at offset {offset}")]
    ShortRead {
        /// Where the read started.
        offset: u64,
        /// How many bytes were needed.
        want: usize,
        /// How many there were.
        got: usize,
    },
    /// The header or a descriptor is inconsistent (offsets/counts out of range, missing NUL, ...).
    #[error("malformed KVM stats data: {0}")]
    Malformed(String),
}

/// Result of this crate's operations.
pub type Result<T> = std::result::Result<T, StatsError>;

pub(crate) fn malformed(msg: impl Into<String>) -> StatsError {
    StatsError::Malformed(msg.into())
}
