//! The balloon's counters: guest errors by kind and the state `zapvm stats` shows.

use std::collections::BTreeMap;

use super::STAT_NAMES;

/// Guest errors, by kind (each also logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonErrors {
    /// PFNs outside guest RAM.
    pub pfn_outside_ram: u64,
    /// PFNs given twice in one request.
    pub pfn_duplicate: u64,
    /// Inflated PFNs in virtio-mem's region whose block is not plugged.
    pub pfn_unplugged: u64,
    /// Descriptors whose length is not a multiple of the element size, or whose direction is
    /// wrong, or requests larger than the limit.
    pub bad_buffer: u64,
    /// Malformed chains (loops, indices outside the table, overflowing buffers, indirect).
    pub bad_chain: u64,
    /// Buffers that could not be read (outside guest RAM, unmapped).
    pub unreadable: u64,
    /// Deflated PFNs that were not ballooned (no effect).
    pub deflate_not_ballooned: u64,
    /// Reported ranges that are unaligned, empty or not inside guest RAM.
    pub bad_report_range: u64,
    /// Driver writes to the read-only `num_pages`, or beyond `actual`.
    pub config_write: u64,
    /// Notifies of a queue the negotiated features do not define.
    pub unknown_queue: u64,
}

impl BalloonErrors {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.pfn_outside_ram
            + self.pfn_duplicate
            + self.pfn_unplugged
            + self.bad_buffer
            + self.bad_chain
            + self.unreadable
            + self.deflate_not_ballooned
            + self.bad_report_range
            + self.config_write
            + self.unknown_queue
    }
}

/// The balloon's counters and state, for `zapvm stats` (serde-serialisable).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonStats {
    /// The host's target (`num_pages`).
    pub target_pages: u32,
    /// What the guest says it has (`actual`).
    pub actual_pages: u32,
    /// Pages currently in the balloon (the bitmap).
    pub ballooned_pages: u64,
    /// Pages inflated (monotonic; valid requests only).
    pub inflated_pages: u64,
    /// Pages deflated (monotonic).
    pub deflated_pages: u64,
    /// Inflated pages that were already in the balloon (discarded again).
    pub reinflated_pages: u64,
    /// Ballooned pages forgotten because virtio-mem unplugged their block (a guest that
    /// unplugged memory it had given to the balloon; `mem/plugged.rs`, P3).
    pub forgotten_pages: u64,
    /// Inflate requests accepted / refused.
    pub inflate_requests: u64,
    /// Inflate requests refused (any bad PFN or buffer).
    pub inflate_refused: u64,
    /// Deflate requests accepted.
    pub deflate_requests: u64,
    /// Deflate requests refused.
    pub deflate_refused: u64,
    /// Notifier discard operations issued (one per coalesced range).
    pub discard_ranges: u64,
    /// Bytes those operations discarded.
    pub bytes_discarded: u64,
    /// Discard operations the notifier or the kernel failed.
    pub discard_failures: u64,
    /// Free page report requests: the reporting queue's buffers (one scatter list of the
    /// driver's each) received and returned, whether or not their ranges were valid.
    pub report_requests: u64,
    /// Free page reports: ranges discarded and their bytes.
    pub reported_ranges: u64,
    /// See `reported_ranges`.
    pub reported_bytes: u64,
    /// Guest 2 MiB blocks now wholly in the balloon (on THP memory: huge pages the host freed).
    pub huge_blocks_full: u64,
    /// Guest 2 MiB blocks now partly in the balloon (on THP memory: split huge pages whose
    /// memory the kernel returns only when it completes the deferred split).
    pub huge_blocks_partial: u64,
    /// Whether guest RAM is THP-backed (the two counters above matter then).
    pub thp: bool,
    /// Pages in the balloon not discarded yet: on huge-page-backed memory, the pages of blocks
    /// the guest has not given whole (B1); 0 on 4 KiB pages.
    pub held_pages: u64,
    /// Guest errors.
    pub errors: BalloonErrors,
    /// Statistics buffers received from the guest.
    pub guest_stats_updates: u64,
    /// The latest guest statistics (tag name -> value).
    pub guest_stats: BTreeMap<String, u64>,
}

/// The name of a virtio-balloon statistics tag (virtio 1.2, §5.5.6.3).
pub fn stat_name(tag: u16) -> String {
    STAT_NAMES
        .get(tag as usize)
        .copied()
        .or_else(|| guest_abi::phased::tag_name(tag))
        .map_or_else(|| format!("tag_{tag}"), |n| n.to_string())
}
