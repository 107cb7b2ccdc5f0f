//! virtio-mem (device id 24; virtio 1.2, §5.15 "Memory Device"), unplugging through the notifier.
//!
//! The device manages one guest-physical range `[addr, addr + region_size)` **outside the RAM the
//! guest is told about** (no e820 entry, not in the test guest's RAM ranges) but backed by host
//! memory that is part of guest RAM as the VMM knows it: a KVM memslot, a region of the
//! notifier's address space and of the VMM's table ([`GuestMmu`]). The region is cut into blocks
//! of `block_size` bytes (a power of two, at least 2 MiB, so that a block is whole huge pages on
//! THP and hugetlb backings); the driver plugs and unplugs blocks to follow the host's
//! `requested_size`. The plugged blocks are a bitmap.
//!
//! One queue (requestq). Each request is a chain with a 24-byte device-readable `virtio_mem_req`
//! (le16 type, 3 x le16 padding, le64 addr, le16 nb_blocks, 3 x le16 padding) and a device-
//! writable buffer of at least 10 bytes for the `virtio_mem_resp` (le16 type, 3 x le16 padding,
//! le16 state); the device writes 10 bytes.
//!
//! - **PLUG** `nb_blocks` from `addr`: ERROR if the range is not whole blocks of the usable region
//!   (`nb_blocks` 0, `addr` not block-aligned, `addr + size` overflowing, outside the region) or
//!   if any block is already plugged; NACK if `plugged_size` would exceed `requested_size`;
//!   otherwise ACK. No syscall: the memory is mapped and faults in when the guest touches it.
//! - **UNPLUG**: the same range checks; ERROR if any block is not plugged. The range is
//!   discarded with **one** notifier operation (`space.discard`: start -> madvise/fallocate ->
//!   invalidate_range -> end), so the VMM's table and every subscriber drop their translations
//!   before the syscall; the blocks then leave the bitmap. If the discard fails the blocks stay
//!   plugged and the answer is BUSY (the driver retries later).
//! - **UNPLUG_ALL** (addr/nb_blocks ignored): every run of contiguous plugged blocks is discarded
//!   with one notifier operation; `plugged_size` drops to 0 (BUSY, with the failed runs still
//!   plugged, if a discard fails).
//! - **STATE**: the range checks, then PLUGGED, UNPLUGGED or MIXED.
//!
//! Bad guest input never reaches a syscall (docs/memory-layer.md): malformed chains, a readable
//! part shorter than a request, a response buffer that is missing, too small, not
//! device-writable or not guest RAM are counted ([`VirtioMemErrors`]), logged, and the chain is
//! returned with length 0 without acting on it; a well-formed request with a bad range or state
//! gets VIRTIO_MEM_RESP_ERROR and is counted by kind. Only a valid UNPLUG or UNPLUG_ALL of
//! plugged blocks — whose range is inside the device region, which the constructor checked is
//! guest RAM known to the table — is ever discarded by this device. (The balloon may discard
//! pages of plugged blocks the guest gives it, when the VM shares the plugged map with it:
//! `plugged.rs`.)
//!
//! `usable_region_size` is the whole region (it never grows or shrinks), `node_id` is offered
//! (VIRTIO_MEM_F_ACPI_PXM) only when configured, and VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE is
//! offered only when configured: unplugged memory stays mapped and reads zeros after its discard
//! (the device does not enforce inaccessibility). A driver reset keeps the plug state (the spec's
//! Linux driver sends UNPLUG_ALL when it finds memory plugged at probe); a VM reset should call
//! [`VirtioMem::unplug_all`].

use std::sync::Arc;

use super::queue::{read_readable, DescriptorChain, Popped, Queue, QueueError};
use super::{
    device_type, features, log_guest_error, read_config_bytes, DeviceFault, VirtioDevice, VirtioInterrupt,
};
use crate::memory::HUGE_PAGE_SIZE;
use crate::mmu::{GuestMemoryAccess, GuestMmu};

mod plugged;
mod stats;

pub use plugged::PluggedBlocks;
pub use stats::{VirtioMemErrors, VirtioMemStats};

// The contract (feature bits, request, response and state codes, the request, response and
// config layouts) is defined once in the ABI crate the test guest's driver compiles too.
use guest_abi::virtio::mem::config;
pub use guest_abi::virtio::mem::{
    REQUEST_SIZE, RESPONSE_SIZE, VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY, VIRTIO_MEM_RESP_ERROR, VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED, VIRTIO_MEM_STATE_PLUGGED, VIRTIO_MEM_STATE_UNPLUGGED,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 128;
/// The smallest block size (and the default): one 2 MiB huge page.
pub const MIN_BLOCK_SIZE: u64 = HUGE_PAGE_SIZE;
/// Bytes of configuration space (block_size, node_id, padding, addr, region_size,
/// usable_region_size, plugged_size, requested_size).
pub const CONFIG_SIZE: usize = config::SIZE;
/// Largest device-readable part of a request chain accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// The device region and the host's initial request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMemConfig {
    /// Guest-physical start of the region (block-aligned).
    pub addr: u64,
    /// Bytes of the region (a non-zero multiple of the block size).
    pub region_size: u64,
    /// Block size: a power of two, at least [`MIN_BLOCK_SIZE`].
    pub block_size: u64,
    /// The NUMA node as an ACPI PXM: offers VIRTIO_MEM_F_ACPI_PXM when set.
    pub node_id: Option<u16>,
    /// The host's initial `requested_size` (a multiple of the block size, at most the region).
    pub requested_size: u64,
    /// Offer VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE.
    pub unplugged_inaccessible: bool,
}

impl VirtioMemConfig {
    /// A region of `region_size` bytes at `addr`, 2 MiB blocks, nothing requested, no node, no
    /// optional features.
    pub fn new(addr: u64, region_size: u64) -> Self {
        Self {
            addr,
            region_size,
            block_size: MIN_BLOCK_SIZE,
            node_id: None,
            requested_size: 0,
            unplugged_inaccessible: false,
        }
    }
}

/// Why a device or a requested size cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioMemError {
    /// Block size not a power of two of at least 2 MiB.
    #[error("virtio-mem block size {0:#x} is not a power of two of at least 2 MiB")]
    BlockSize(u64),
    /// Region empty, misaligned, or not whole blocks.
    #[error(
        "virtio-mem region [{addr:#x}, +{size:#x}) is empty or not aligned to the block size {block_size:#x}"
    )]
    Alignment {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// The region is not inside one region of guest RAM known to the table.
    #[error("virtio-mem region [{addr:#x}, +{size:#x}) is not inside one guest RAM region of the table")]
    NotRam {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// A requested size that is not whole blocks or exceeds the region.
    #[error("requested size {requested:#x} is not a multiple of the block size {block_size:#x} or exceeds the region size {region_size:#x}")]
    RequestedSize {
        /// What was asked.
        requested: u64,
        /// Block size.
        block_size: u64,
        /// Region size.
        region_size: u64,
    },
}

/// What the device answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Response {
    Ack,
    Nack,
    Busy,
    Error,
    State(u16),
}

impl Response {
    fn bytes(self) -> [u8; RESPONSE_SIZE] {
        let (kind, state) = match self {
            Self::Ack => (VIRTIO_MEM_RESP_ACK, 0),
            Self::Nack => (VIRTIO_MEM_RESP_NACK, 0),
            Self::Busy => (VIRTIO_MEM_RESP_BUSY, 0),
            Self::Error => (VIRTIO_MEM_RESP_ERROR, 0),
            Self::State(s) => (VIRTIO_MEM_RESP_ACK, s),
        };
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..2].copy_from_slice(&kind.to_le_bytes());
        b[8..10].copy_from_slice(&state.to_le_bytes());
        b
    }
}

/// The virtio-mem device model.
pub struct VirtioMem {
    mmu: Arc<GuestMmu>,
    addr: u64,
    region_size: u64,
    usable_region_size: u64,
    block_size: u64,
    node_id: u16,
    requested_size: u64,
    nr_blocks: u64,
    /// One bit per block: plugged (shared read-only with the balloon: [`PluggedBlocks`]).
    plugged: Arc<PluggedBlocks>,
    plugged_blocks: u64,
    avail_features: u64,
    queue_sizes: [u16; 1],
    queues: Vec<Queue>,
    mem: Option<Arc<dyn GuestMemoryAccess>>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    stats: VirtioMemStats,
    /// Told the new plugged size (bytes) whenever a request changed it.
    on_plugged: Option<Box<dyn Fn(u64) + Send>>,
}

impl VirtioMem {
    /// A device for `config`'s region, which must lie inside one region of guest RAM that `mmu`
    /// (the VMM's table, subscribed to the notifier that covers that RAM) translates; blocks are
    /// discarded through `mmu.space()`. Every block starts unplugged.
    pub fn new(mmu: Arc<GuestMmu>, config: VirtioMemConfig) -> Result<Self, VirtioMemError> {
        let VirtioMemConfig { addr, region_size, block_size, .. } = config;
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(VirtioMemError::BlockSize(block_size));
        }
        if region_size == 0 || addr % block_size != 0 || region_size % block_size != 0 {
            return Err(VirtioMemError::Alignment { addr, size: region_size, block_size });
        }
        if mmu.host_range(addr, region_size).is_none() {
            return Err(VirtioMemError::NotRam { addr, size: region_size });
        }
        let mut avail_features = 1u64 << features::VIRTIO_F_VERSION_1;
        if config.node_id.is_some() {
            avail_features |= 1 << VIRTIO_MEM_F_ACPI_PXM;
        }
        if config.unplugged_inaccessible {
            avail_features |= 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        }
        let nr_blocks = region_size / block_size;
        let mut device = Self {
            mmu,
            addr,
            region_size,
            usable_region_size: region_size,
            block_size,
            node_id: config.node_id.unwrap_or(0),
            requested_size: 0,
            nr_blocks,
            plugged: Arc::new(PluggedBlocks::new(addr, block_size, nr_blocks)),
            plugged_blocks: 0,
            avail_features,
            queue_sizes: [QUEUE_SIZE],
            queues: Vec::new(),
            mem: None,
            interrupt: None,
            stats: VirtioMemStats::default(),
            on_plugged: None,
        };
        device.set_requested_size(config.requested_size)?;
        Ok(device)
    }

    /// Sets the host's `requested_size` (bytes: whole blocks, at most the region size). Call it
    /// through `MmioTransport::update_config` so the driver gets a config-change interrupt. On
    /// error nothing changes.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), VirtioMemError> {
        if !bytes.is_multiple_of(self.block_size) || bytes > self.region_size {
            return Err(VirtioMemError::RequestedSize {
                requested: bytes,
                block_size: self.block_size,
                region_size: self.region_size,
            });
        }
        self.requested_size = bytes;
        Ok(())
    }

    /// Calls `observer` with the new plugged size (bytes) each time the guest's requests change
    /// it, on the thread that processes the queue: it must not block.
    pub fn on_plugged_change(&mut self, observer: Box<dyn Fn(u64) + Send>) {
        self.on_plugged = Some(observer);
    }

    /// The host's request.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Bytes plugged now.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_blocks * self.block_size
    }

    /// The region as (guest-physical start, size).
    pub fn region(&self) -> (u64, u64) {
        (self.addr, self.region_size)
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether the block holding guest-physical `gpa` is plugged (false outside the region).
    pub fn is_plugged(&self, gpa: u64) -> bool {
        gpa.checked_sub(self.addr)
            .filter(|&off| off < self.region_size)
            .is_some_and(|off| self.test(off / self.block_size))
    }

    /// The counters and state.
    pub fn stats(&self) -> VirtioMemStats {
        VirtioMemStats {
            addr: self.addr,
            block_size: self.block_size,
            region_size: self.region_size,
            usable_region_size: self.usable_region_size,
            plugged_size: self.plugged_size(),
            requested_size: self.requested_size,
            plugged_blocks: self.plugged_blocks,
            ..self.stats.clone()
        }
    }

    /// Unplugs every plugged block on the host's behalf (a VM reset: the guest starts with
    /// nothing plugged), discarding each run through the notifier. Returns false if a discard
    /// failed (those blocks stay plugged).
    pub fn unplug_all(&mut self) -> bool {
        let mut ok = true;
        for (first, count) in self.plugged_runs() {
            if self.discard(first, count) {
                self.set_range(first, count, false);
            } else {
                ok = false;
            }
        }
        ok
    }

    fn test(&self, block: u64) -> bool {
        self.plugged.test(block)
    }

    /// The plugged map, for the balloon ([`PluggedBlocks`]).
    pub fn plugged_blocks(&self) -> Arc<PluggedBlocks> {
        self.plugged.clone()
    }

    fn count_plugged(&self, first: u64, count: u64) -> u64 {
        (first..first + count).filter(|&b| self.test(b)).count() as u64
    }

    /// Sets or clears `count` blocks from `first`, all currently in the other state.
    fn set_range(&mut self, first: u64, count: u64, on: bool) {
        for b in first..first + count {
            if self.plugged.set(b, on) {
                if on {
                    self.plugged_blocks += 1;
                    self.stats.blocks_plugged += 1;
                } else {
                    self.plugged_blocks -= 1;
                    self.stats.blocks_unplugged += 1;
                }
            }
        }
    }

    /// Runs of contiguous plugged blocks as (first block, count).
    fn plugged_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in (0..self.nr_blocks).filter(|&b| self.test(b)) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == b => *count += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }

    /// Discards `count` blocks from `first` (inside the region, which the constructor checked is
    /// guest RAM of the table) with one notifier operation, through the table's one handle
    /// (`GuestMmu::discard`, which also refuses anything outside guest RAM before any syscall).
    fn discard(&mut self, first: u64, count: u64) -> bool {
        let (gpa, len) = (self.addr + first * self.block_size, count * self.block_size);
        match self.mmu.discard(gpa, len) {
            Ok(_) => {
                self.stats.discard_ranges += 1;
                self.stats.blocks_discarded += count;
                self.stats.bytes_discarded += len;
                true
            }
            Err(e) => {
                self.stats.discard_failures += 1;
                tracing::warn!("virtio-mem: {e}");
                false
            }
        }
    }

    /// Checks that `nb_blocks` from `addr` are whole blocks of the usable region; returns them
    /// as (first block, count), or counts and logs the error.
    fn blocks(&mut self, what: &str, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let bs = self.block_size;
        let usable_end = self.addr + self.usable_region_size;
        let e = &mut self.stats.errors;
        let (counter, why) = if nb_blocks == 0 {
            (&mut e.zero_blocks, "zero blocks")
        } else if !addr.is_multiple_of(bs) {
            (&mut e.misaligned, "address not block-aligned")
        } else {
            match (nb_blocks as u64).checked_mul(bs).and_then(|len| addr.checked_add(len)) {
                None => (&mut e.overflow, "range overflows"),
                Some(end) if addr < self.addr || end > usable_end => {
                    (&mut e.out_of_range, "range outside the usable region")
                }
                Some(_) => return Some(((addr - self.addr) / bs, nb_blocks as u64)),
            }
        };
        *counter += 1;
        log_guest_error(
            *counter,
            format_args!(
                "virtio-mem: {what} of {nb_blocks} blocks at {addr:#x}: {why} [{:#x}, +{:#x})",
                self.addr, self.usable_region_size
            ),
        );
        None
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        self.stats.plug_requests += 1;
        let Some((first, count)) = self.blocks("PLUG", addr, nb_blocks) else {
            return Response::Error;
        };
        if self.count_plugged(first, count) != 0 {
            let e = &mut self.stats.errors;
            e.plug_plugged += 1;
            log_guest_error(
                e.plug_plugged,
                format_args!("virtio-mem: PLUG of {nb_blocks} blocks at {addr:#x}, some already plugged"),
            );
            return Response::Error;
        }
        if (self.plugged_blocks + count) * self.block_size > self.requested_size {
            return Response::Nack;
        }
        // P1 (plugged.rs): plugged in the shared map before the driver hears ACK.
        self.set_range(first, count, true);
        Response::Ack
    }

    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> Response {
        self.stats.unplug_requests += 1;
        let Some((first, count)) = self.blocks("UNPLUG", addr, nb_blocks) else {
            return Response::Error;
        };
        if self.count_plugged(first, count) != count {
            let e = &mut self.stats.errors;
            e.unplug_unplugged += 1;
            log_guest_error(
                e.unplug_unplugged,
                format_args!("virtio-mem: UNPLUG of {nb_blocks} blocks at {addr:#x}, some not plugged"),
            );
            return Response::Error;
        }
        if !self.discard(first, count) {
            return Response::Busy;
        }
        // P1 (plugged.rs): unplugged in the shared map only once discarded.
        self.set_range(first, count, false);
        Response::Ack
    }

    fn state(&mut self, addr: u64, nb_blocks: u16) -> Response {
        self.stats.state_requests += 1;
        let Some((first, count)) = self.blocks("STATE", addr, nb_blocks) else {
            return Response::Error;
        };
        Response::State(match self.count_plugged(first, count) {
            0 => VIRTIO_MEM_STATE_UNPLUGGED,
            n if n == count => VIRTIO_MEM_STATE_PLUGGED,
            _ => VIRTIO_MEM_STATE_MIXED,
        })
    }

    /// Where the response goes: the first [`RESPONSE_SIZE`] bytes of the device-writable
    /// buffers, each piece inside guest RAM (checked against the table, no access).
    fn response_pieces(&self, chain: &DescriptorChain) -> Option<Vec<(u64, usize)>> {
        let mut pieces = Vec::new();
        let mut need = RESPONSE_SIZE;
        for d in chain.writable() {
            if need == 0 {
                break;
            }
            let n = (d.len as usize).min(need);
            if n == 0 {
                continue;
            }
            self.mmu.host_range(d.addr, n as u64)?;
            pieces.push((d.addr, n));
            need -= n;
        }
        (need == 0).then_some(pieces)
    }

    /// Handles one request chain; returns the used length (0 when nothing was answered).
    fn handle(&mut self, mem: &dyn GuestMemoryAccess, chain: &DescriptorChain) -> u32 {
        let Some(pieces) = self.response_pieces(chain) else {
            let e = &mut self.stats.errors;
            e.bad_response_buffer += 1;
            log_guest_error(
                e.bad_response_buffer,
                format_args!(
                    "virtio-mem: request {} has no device-writable response buffer of {RESPONSE_SIZE} bytes in guest RAM",
                    chain.head
                ),
            );
            return 0;
        };
        let readable: u64 = chain.readable().map(|d| d.len as u64).sum();
        if readable < REQUEST_SIZE as u64 || readable > MAX_REQUEST_BYTES as u64 {
            let e = &mut self.stats.errors;
            e.bad_request_buffer += 1;
            log_guest_error(
                e.bad_request_buffer,
                format_args!(
                    "virtio-mem: request {} has {readable} readable bytes (a request is {REQUEST_SIZE})",
                    chain.head
                ),
            );
            return 0;
        }
        let bytes = match read_readable(mem, chain, MAX_REQUEST_BYTES) {
            Ok(b) => b,
            Err(why) => {
                let e = &mut self.stats.errors;
                e.unreadable += 1;
                log_guest_error(e.unreadable, format_args!("virtio-mem: request {}: {why}", chain.head));
                return 0;
            }
        };
        let kind = u16::from_le_bytes([bytes[0], bytes[1]]);
        let addr = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
        let response = match kind {
            VIRTIO_MEM_REQ_PLUG => self.plug(addr, nb_blocks),
            VIRTIO_MEM_REQ_UNPLUG => self.unplug(addr, nb_blocks),
            VIRTIO_MEM_REQ_UNPLUG_ALL => {
                self.stats.unplug_all_requests += 1;
                if self.unplug_all() {
                    Response::Ack
                } else {
                    Response::Busy
                }
            }
            VIRTIO_MEM_REQ_STATE => self.state(addr, nb_blocks),
            _ => {
                let e = &mut self.stats.errors;
                e.unknown_request += 1;
                log_guest_error(e.unknown_request, format_args!("virtio-mem: unknown request type {kind}"));
                Response::Error
            }
        };
        match response {
            Response::Ack | Response::State(_) => self.stats.acks += 1,
            Response::Nack => self.stats.nacks += 1,
            Response::Busy => self.stats.busy += 1,
            Response::Error => self.stats.error_responses += 1,
        }
        let out = response.bytes();
        let mut at = 0;
        for (gpa, n) in pieces {
            if let Err(why) = mem.write(gpa, &out[at..at + n]) {
                let e = &mut self.stats.errors;
                e.unwritable += 1;
                log_guest_error(
                    e.unwritable,
                    format_args!("virtio-mem: response to request {}: {why}", chain.head),
                );
                return 0;
            }
            at += n;
        }
        RESPONSE_SIZE as u32
    }
}

fn fault(e: QueueError) -> DeviceFault {
    DeviceFault(e.to_string())
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        device_type::MEM
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; CONFIG_SIZE];
        let mut put =
            |at: u64, bytes: &[u8]| space[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        put(config::BLOCK_SIZE, &self.block_size.to_le_bytes());
        put(config::NODE_ID, &self.node_id.to_le_bytes());
        put(config::ADDR, &self.addr.to_le_bytes());
        put(config::REGION_SIZE, &self.region_size.to_le_bytes());
        put(config::USABLE_REGION_SIZE, &self.usable_region_size.to_le_bytes());
        put(config::PLUGGED_SIZE, &self.plugged_size().to_le_bytes());
        put(config::REQUESTED_SIZE, &self.requested_size.to_le_bytes());
        read_config_bytes(&space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let e = &mut self.stats.errors;
        e.config_write += 1;
        log_guest_error(
            e.config_write,
            format_args!(
                "virtio-mem: write of {} bytes at config offset {offset:#x} (read-only)",
                data.len()
            ),
        );
    }

    fn activate(
        &mut self,
        _acked_features: u64,
        queues: Vec<Queue>,
        mem: Arc<dyn GuestMemoryAccess>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), DeviceFault> {
        self.queues = queues;
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceFault> {
        let (Some(mem), Some(irq)) = (self.mem.clone(), self.interrupt.clone()) else {
            return Err(DeviceFault("virtio-mem notified before activation".into()));
        };
        if index != 0 || self.queues.is_empty() {
            let e = &mut self.stats.errors;
            e.unknown_queue += 1;
            log_guest_error(e.unknown_queue, format_args!("virtio-mem: notify of undefined queue {index}"));
            return Ok(());
        }
        let plugged_before = self.plugged_size();
        let mut used_any = false;
        loop {
            // One notify's requests, read in bulk, handled in ring order; their heads go back
            // in one used-ring update.
            let batch = self.queues[0].pop_all(mem.as_ref()).map_err(fault)?;
            if batch.is_empty() {
                break;
            }
            let mut used = Vec::with_capacity(batch.len());
            for popped in batch {
                let done = match popped {
                    Popped::Chain(chain) => Some((chain.head, self.handle(mem.as_ref(), &chain))),
                    Popped::Bad { head, error } => {
                        let e = &mut self.stats.errors;
                        e.bad_chain += 1;
                        log_guest_error(e.bad_chain, format_args!("virtio-mem: requestq: {error}"));
                        head.map(|h| (h, 0))
                    }
                };
                used.extend(done);
            }
            self.queues[0].add_used_all(mem.as_ref(), &used).map_err(fault)?;
            used_any |= !used.is_empty();
        }
        if used_any {
            irq.signal_used_queue();
        }
        let plugged = self.plugged_size();
        if plugged != plugged_before {
            if let Some(observer) = &self.on_plugged {
                observer(plugged);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        // The plug state survives a driver reset (virtio-mem memory is not the driver's to
        // forget); a driver that finds memory plugged at probe sends UNPLUG_ALL.
        self.queues.clear();
        self.mem = None;
        self.interrupt = None;
    }
}

#[cfg(test)]
mod tests;
