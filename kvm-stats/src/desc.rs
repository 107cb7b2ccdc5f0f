//! What the kernel says about one statistic: its name, kind, unit and where its values are.

use std::fmt;

use kvm_bindings::{
    KVM_STATS_BASE_MASK, KVM_STATS_BASE_POW10, KVM_STATS_BASE_POW2, KVM_STATS_TYPE_CUMULATIVE,
    KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST, KVM_STATS_TYPE_MASK,
    KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES,
    KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE, KVM_STATS_UNIT_SECONDS,
};

/// What a stat's values mean (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum StatKind {
    /// Monotonic counter since the VM/vCPU was created (exits, remote_tlb_flush_requests, ...).
    Cumulative,
    /// Current level, may go up and down (pages_4k, ...).
    Instant,
    /// Highest level seen so far (max_mmu_rmap_size, ...).
    Peak,
    /// Histogram with `size` equal-width buckets of `bucket_size` each; the values are
    /// per-bucket sample counts (cumulative).
    LinearHist,
    /// Histogram with `size` buckets of power-of-two width; per-bucket sample counts (cumulative).
    LogHist,
    /// A type this crate does not know (newer kernel); treated like [`StatKind::Instant`].
    Unknown(u32),
}

impl StatKind {
    /// The type bits of a descriptor's `flags`.
    pub fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_TYPE_MASK {
            KVM_STATS_TYPE_CUMULATIVE => Self::Cumulative,
            KVM_STATS_TYPE_INSTANT => Self::Instant,
            KVM_STATS_TYPE_PEAK => Self::Peak,
            KVM_STATS_TYPE_LINEAR_HIST => Self::LinearHist,
            KVM_STATS_TYPE_LOG_HIST => Self::LogHist,
            other => Self::Unknown(other),
        }
    }

    /// Whether the values are histogram buckets.
    pub fn is_histogram(self) -> bool {
        matches!(self, Self::LinearHist | Self::LogHist)
    }

    /// Whether differences of two readings are meaningful as "events in between" (counters and
    /// histogram bucket counts); otherwise the stat is a level (instant, peak, unknown).
    pub fn is_counter(self) -> bool {
        matches!(self, Self::Cumulative | Self::LinearHist | Self::LogHist)
    }
}

impl fmt::Display for StatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cumulative => f.write_str("cumulative"),
            Self::Instant => f.write_str("instant"),
            Self::Peak => f.write_str("peak"),
            Self::LinearHist => f.write_str("linear-hist"),
            Self::LogHist => f.write_str("log-hist"),
            Self::Unknown(t) => write!(f, "unknown({t})"),
        }
    }
}

/// Unit of a stat's values (`KVM_STATS_UNIT_*`), scaled by [`StatDesc::base`]^[`StatDesc::exponent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum StatUnit {
    /// A plain count.
    None,
    /// Bytes.
    Bytes,
    /// Seconds.
    Seconds,
    /// CPU cycles.
    Cycles,
    /// 0 or 1 (for histograms: the buckets count samples of a boolean).
    Boolean,
    /// A unit this crate does not know (newer kernel): the raw unit bits.
    Unknown(u32),
}

impl StatUnit {
    /// The unit bits of a descriptor's `flags`.
    pub fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_UNIT_MASK {
            KVM_STATS_UNIT_NONE => Self::None,
            KVM_STATS_UNIT_BYTES => Self::Bytes,
            KVM_STATS_UNIT_SECONDS => Self::Seconds,
            KVM_STATS_UNIT_CYCLES => Self::Cycles,
            KVM_STATS_UNIT_BOOLEAN => Self::Boolean,
            other => Self::Unknown(other),
        }
    }
}

/// Base of a stat's unit exponent (`KVM_STATS_BASE_*`): value × base^exponent is in [`StatUnit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "snake_case"))]
pub enum StatBase {
    /// Powers of ten (e.g. exponent -9 with seconds: nanoseconds).
    Pow10,
    /// Powers of two (e.g. exponent 10 with bytes: KiB).
    Pow2,
    /// A base this crate does not know (newer kernel): the raw base bits.
    Unknown(u32),
}

impl StatBase {
    /// The base bits of a descriptor's `flags`.
    pub fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_BASE_MASK {
            KVM_STATS_BASE_POW10 => Self::Pow10,
            KVM_STATS_BASE_POW2 => Self::Pow2,
            other => Self::Unknown(other),
        }
    }
}

/// One statistic as described by the kernel (`struct kvm_stats_desc` and its name), checked by
/// [`StatsLayout::parse`](crate::StatsLayout::parse).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StatDesc {
    /// Name, unique within one stats fd (e.g. `"pages_4k"`, `"exits"`): non-empty printable ASCII.
    pub name: String,
    /// What the values mean.
    pub kind: StatKind,
    /// Unit of the values.
    pub unit: StatUnit,
    /// Base of the unit's exponent.
    pub base: StatBase,
    /// Value × base^exponent is in `unit` (e.g. -9 with Pow10 and Seconds: nanoseconds).
    pub exponent: i16,
    /// Number of u64 values (1 for scalars, the bucket count for histograms); at least 1.
    pub size: usize,
    /// Byte offset of the first value within the data block; a multiple of 8.
    pub offset: usize,
    /// Bucket width of a [`StatKind::LinearHist`]; 0 otherwise.
    pub bucket_size: u32,
    /// Raw `flags` of `struct kvm_stats_desc` (type | unit | base).
    pub flags: u32,
}
