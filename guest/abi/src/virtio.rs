//! The virtio contract both sides implement: the virtio-mmio register layout, device status and
//! feature bits, split-ring descriptor flags, device ids and the balloon's and virtio-mem's
//! constants (virtio 1.2). The VMM's devices (`vmm/src/devices/virtio/`) and the test guest's
//! polling drivers (`guest/test-guest/src/virtio*.rs`, `balloon.rs`) both use these, so a value
//! exists once.
//!
//! These are written here rather than taken from the `virtio-bindings` crate because the test
//! guest builds this crate freestanding with no dependencies, and the VMM must agree with the
//! guest bit for bit: one definition both sides compile is the point. The values are the
//! specification's; the names follow it (and Linux's uapi headers) without the `VIRTIO_` prefix
//! where the module already says it, except that the device-specific
//! feature bits and request codes keep their full spec names (`VIRTIO_MEM_REQ_PLUG`).

/// Register offsets of a virtio-mmio window, transport version 2 (virtio 1.2, §4.2.2).
pub mod mmio {
    /// `MAGIC` reads this ("virt" in little-endian).
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
    /// The transport version implemented (virtio 1.x over MMIO).
    pub const VERSION_2: u32 = 2;
    /// Bytes of a device's register window (registers up to 0x100, then configuration space).
    pub const WINDOW_SIZE: u64 = 0x200;

    /// "virt".
    pub const MAGIC: u64 = 0x000;
    /// Transport version (2).
    pub const VERSION: u64 = 0x004;
    /// Device type (see [`super::device_type`]).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Feature bits the device offers, 32 at a time (selected by `DEVICE_FEATURES_SEL`).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 device feature bits `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Feature bits the driver accepts, 32 at a time.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 driver feature bits `DRIVER_FEATURES` sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers below refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready (write 1 after setting it up).
    pub const QUEUE_READY: u64 = 0x044;
    /// Written with a queue index: new buffers are available in it.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes ([`super::interrupt`] bits).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Written with the causes the driver handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status ([`super::status`]).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (the high half follows at +4).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Changes whenever the device changes its configuration space.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;

    const _: () = assert!(CONFIG < WINDOW_SIZE && CONFIG_GENERATION < CONFIG);
}

/// Device status bits (virtio 1.2, §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Device-independent feature bits (bit numbers; virtio 1.2, §6).
pub mod features {
    /// Indirect descriptors (not offered by zapvm's devices).
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
    /// used_event / avail_event (not offered).
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    /// A virtio 1.x device; mandatory for virtio-mmio version 2.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

/// InterruptStatus bits (virtio 1.2, §4.2.2).
pub mod interrupt {
    /// The device used a buffer.
    pub const USED_BUFFER: u32 = 1;
    /// The configuration space changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Split virtqueue descriptors (virtio 1.2, §2.7.5).
pub mod ring {
    /// Descriptor flag: the chain continues at `next`.
    pub const VIRTQ_DESC_F_NEXT: u16 = 1;
    /// Descriptor flag: the buffer is device-writable.
    pub const VIRTQ_DESC_F_WRITE: u16 = 2;
    /// Descriptor flag: the buffer is a table of indirect descriptors.
    pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
    /// Bytes of one descriptor (le64 addr, le32 len, le16 flags, le16 next).
    pub const DESC_SIZE: u64 = 16;
}

/// Virtio device ids (virtio 1.2, §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// virtio-mem.
    pub const MEM: u32 = 24;
}

/// The traditional memory balloon (virtio 1.2, §5.5).
pub mod balloon {
    /// Feature: the host must be told before the guest reuses deflated pages.
    pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
    /// Feature: the statistics queue.
    pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
    /// Feature: the guest may deflate on its own under memory pressure.
    pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
    /// Feature: free page reporting (the reporting queue).
    pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u32 = 5;

    /// The balloon's page: PFNs in inflate and deflate requests count 4 KiB pages whatever the
    /// guest's page size.
    pub const PAGE: u64 = 4096;
    /// Configuration space offset of `num_pages` (le32, the host's target).
    pub const CONFIG_NUM_PAGES: u64 = 0;
    /// Configuration space offset of `actual` (le32, written by the driver).
    pub const CONFIG_ACTUAL: u64 = 4;
    /// Bytes of configuration space (num_pages, actual, free_page_hint_cmd_id, poison_val).
    pub const CONFIG_SIZE: usize = 16;
    /// Bytes of one statistics entry (le16 tag, le64 value, packed).
    pub const STAT_ENTRY_SIZE: u64 = 10;

    /// Statistics tags (virtio 1.2, §5.5.6.3), in tag order.
    pub mod tag {
        /// Pages swapped in.
        pub const SWAP_IN: u16 = 0;
        /// Pages swapped out.
        pub const SWAP_OUT: u16 = 1;
        /// Major page faults.
        pub const MAJFLT: u16 = 2;
        /// Minor page faults.
        pub const MINFLT: u16 = 3;
        /// Free memory, bytes.
        pub const MEMFREE: u16 = 4;
        /// Total memory, bytes.
        pub const MEMTOT: u16 = 5;
        /// Available memory, bytes.
        pub const AVAIL: u16 = 6;
    }
    /// The name of each statistics tag, indexed by tag.
    pub const STAT_NAMES: [&str; 16] = [
        "swap_in",
        "swap_out",
        "major_faults",
        "minor_faults",
        "free_memory",
        "total_memory",
        "available_memory",
        "disk_caches",
        "hugetlb_allocations",
        "hugetlb_failures",
        "oom_kills",
        "alloc_stalls",
        "async_scans",
        "direct_scans",
        "async_reclaims",
        "direct_reclaims",
    ];
}

/// virtio-mem (virtio 1.2, §5.15).
pub mod mem {
    /// Feature: `node_id` is an ACPI proximity domain and is valid.
    pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
    /// Feature: the driver must not read unplugged memory.
    pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;

    /// Request: plug blocks.
    pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
    /// Request: unplug blocks.
    pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
    /// Request: unplug every block.
    pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
    /// Request: the plug state of blocks.
    pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

    /// Response: done.
    pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
    /// Response: refused (e.g. plugging beyond `requested_size`).
    pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
    /// Response: cannot be done now, retry later.
    pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
    /// Response: bad request (range, alignment, state).
    pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

    /// STATE: every block is plugged.
    pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
    /// STATE: every block is unplugged.
    pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
    /// STATE: some are plugged, some not.
    pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

    /// Bytes of a `virtio_mem_req` (le16 type, 3 x le16 padding, le64 addr, le16 nb_blocks,
    /// 3 x le16 padding).
    pub const REQUEST_SIZE: usize = 24;
    /// Bytes of a `virtio_mem_resp` the device writes (le16 type, 3 x le16 padding, le16 state).
    pub const RESPONSE_SIZE: usize = 10;

    /// Configuration space offsets (all le64 but `node_id`, le16).
    pub mod config {
        /// `block_size`.
        pub const BLOCK_SIZE: u64 = 0;
        /// `node_id`.
        pub const NODE_ID: u64 = 8;
        /// `addr`: the start of the device region.
        pub const ADDR: u64 = 16;
        /// `region_size`.
        pub const REGION_SIZE: u64 = 24;
        /// `usable_region_size`.
        pub const USABLE_REGION_SIZE: u64 = 32;
        /// `plugged_size`.
        pub const PLUGGED_SIZE: u64 = 40;
        /// `requested_size`.
        pub const REQUESTED_SIZE: u64 = 48;
        /// Bytes of configuration space.
        pub const SIZE: usize = 56;
    }
}
