//! virtio-mem's counters: guest errors by kind and the state `zapvm stats` shows.

/// Guest errors, by kind (each also logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VirtioMemErrors {
    /// Ranges not inside the usable region (answered ERROR).
    pub out_of_range: u64,
    /// `addr` not block-aligned (ERROR).
    pub misaligned: u64,
    /// `nb_blocks` 0 (ERROR).
    pub zero_blocks: u64,
    /// `addr + nb_blocks * block_size` overflows (ERROR).
    pub overflow: u64,
    /// PLUG of a range with a plugged block (ERROR).
    pub plug_plugged: u64,
    /// UNPLUG of a range with an unplugged block (ERROR).
    pub unplug_unplugged: u64,
    /// Unknown request types (ERROR).
    pub unknown_request: u64,
    /// Readable part shorter than a request or longer than [`super::MAX_REQUEST_BYTES`] (no answer).
    pub bad_request_buffer: u64,
    /// Response buffer missing, smaller than a response, or not guest RAM (no answer).
    pub bad_response_buffer: u64,
    /// Malformed chains (loops, indices outside the table, overflowing buffers, indirect).
    pub bad_chain: u64,
    /// Request buffers that could not be read.
    pub unreadable: u64,
    /// Responses that could not be written after the request was carried out.
    pub unwritable: u64,
    /// Driver writes to the (read-only) configuration space.
    pub config_write: u64,
    /// Notifies of a queue other than requestq.
    pub unknown_queue: u64,
}

impl VirtioMemErrors {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.out_of_range
            + self.misaligned
            + self.zero_blocks
            + self.overflow
            + self.plug_plugged
            + self.unplug_unplugged
            + self.unknown_request
            + self.bad_request_buffer
            + self.bad_response_buffer
            + self.bad_chain
            + self.unreadable
            + self.unwritable
            + self.config_write
            + self.unknown_queue
    }
}

/// The device's state and counters, for `zapvm stats` (serde-serialisable).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VirtioMemStats {
    /// Guest-physical start of the region.
    pub addr: u64,
    /// Block size.
    pub block_size: u64,
    /// Region size.
    pub region_size: u64,
    /// Usable region size.
    pub usable_region_size: u64,
    /// Bytes plugged now.
    pub plugged_size: u64,
    /// The host's request.
    pub requested_size: u64,
    /// Blocks plugged now.
    pub plugged_blocks: u64,
    /// PLUG requests received (well-formed chains, whatever the answer).
    pub plug_requests: u64,
    /// UNPLUG requests received.
    pub unplug_requests: u64,
    /// UNPLUG_ALL requests received.
    pub unplug_all_requests: u64,
    /// STATE requests received.
    pub state_requests: u64,
    /// Answers by type.
    pub acks: u64,
    /// See `acks`.
    pub nacks: u64,
    /// See `acks`.
    pub busy: u64,
    /// See `acks`.
    pub error_responses: u64,
    /// Blocks plugged (monotonic).
    pub blocks_plugged: u64,
    /// Blocks unplugged (monotonic; by UNPLUG, UNPLUG_ALL and the host's unplug-all).
    pub blocks_unplugged: u64,
    /// Notifier discard operations issued (one per contiguous run of blocks).
    pub discard_ranges: u64,
    /// Blocks those operations discarded.
    pub blocks_discarded: u64,
    /// Bytes those operations discarded.
    pub bytes_discarded: u64,
    /// Discard operations the notifier or the kernel failed.
    pub discard_failures: u64,
    /// Guest errors.
    pub errors: VirtioMemErrors,
}
