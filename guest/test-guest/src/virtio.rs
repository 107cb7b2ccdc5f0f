//! The driver side of virtio over MMIO (virtio 1.2, §4.2, transport version 2) and of split
//! virtqueues (§2.7), for polling drivers: no interrupts, no allocation.
//!
//! [`Mmio`] is a device's register window: every access is one volatile, naturally aligned 32-bit
//! load or store, which at CPL 3 on zapvm is one VM exit (KVM_EXIT_MMIO, about 20 us) — callers
//! poll registers sparingly and poll rings (ordinary guest RAM) instead where they can.
//!
//! [`Virtqueue`] is a split queue whose descriptor table, available ring and used ring live in
//! one 4 KiB page of guest RAM the caller owns (identity mapped, so addresses are both virtual
//! and guest-physical). The driver here only ever has a few chains in flight and waits for them
//! in order, so it hands out descriptors by fixed index rather than keeping a free list.

use guest_abi::PAGE_SIZE;

// The contract's constants, defined once in the ABI crate the VMM's devices use too.
pub use guest_abi::virtio::features::VIRTIO_F_VERSION_1;
pub use guest_abi::virtio::mmio::{self as reg, MAGIC_VALUE as MMIO_MAGIC};
pub use guest_abi::virtio::ring::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
pub use guest_abi::virtio::status;

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// The window at guest-physical `base` (from the boot info; identity mapped).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    /// Reads the 32-bit register at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window the VMM described in the boot info; the identity
        // page tables map the MMIO hole user-accessible and the access exits to the VMM, which
        // emulates it. `offset` is one of the 4-byte aligned registers of the 0x200-byte window.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Writes a 64-bit address as the low/high register pair starting at `low`.
    pub fn write_pair(&self, low: u64, value: u64) {
        self.write(low, value as u32);
        self.write(low + 4, (value >> 32) as u32);
    }

    /// Reads the 32-bit word at `offset` of configuration space, consistently (§2.5.1: the
    /// config generation is read before and after, and the read is repeated if it moved).
    pub fn read_config(&self, offset: u64) -> u32 {
        loop {
            let before = self.read(reg::CONFIG_GENERATION);
            let value = self.read(reg::CONFIG + offset);
            if self.read(reg::CONFIG_GENERATION) == before {
                return value;
            }
        }
    }

    /// Writes the 32-bit word at `offset` of configuration space.
    pub fn write_config(&self, offset: u64, value: u32) {
        self.write(reg::CONFIG + offset, value);
    }

    /// Sets status bits (keeping the ones already set) and returns the status read back.
    pub fn add_status(&self, bits: u32) -> u32 {
        let now = self.read(reg::STATUS);
        self.write(reg::STATUS, now | bits);
        self.read(reg::STATUS)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        u64::from(low) | u64::from(high) << 32
    }

    /// Writes the 64 feature bits the driver accepts.
    pub fn set_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Tells the device that queue `index` has new buffers.
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }
}

/// Offset of the available ring in a queue's page.
const AVAIL_OFFSET: u64 = 0x400;
/// Offset of the used ring in a queue's page.
const USED_OFFSET: u64 = 0x800;

/// A split virtqueue laid out in one page of guest RAM: descriptors at +0 (16 bytes each), the
/// available ring at +0x400, the used ring at +0x800 (so at most 64 entries fit).
pub struct Virtqueue {
    /// The queue's index on its device.
    pub index: u32,
    /// Its size (a power of two).
    pub size: u16,
    page: u64,
    /// The driver's next available index (what `avail.idx` holds).
    avail_idx: u16,
    /// The used index up to which the driver has consumed used entries.
    last_used: u16,
}

/// The largest queue [`Virtqueue`]'s one-page layout holds.
pub const MAX_QUEUE_SIZE: u16 = 64;

impl Virtqueue {
    /// A queue of `size` entries (a power of two, at most [`MAX_QUEUE_SIZE`]) in the page at
    /// `page`, which it zeroes. Not yet known to the device: see [`Virtqueue::setup`].
    ///
    /// # Safety
    /// `page` must be a page-aligned, identity-mapped page of guest RAM that the caller owns
    /// and does not otherwise use for as long as the device may use the queue.
    pub unsafe fn new(index: u32, size: u16, page: u64) -> Self {
        assert!(size.is_power_of_two() && size <= MAX_QUEUE_SIZE, "bad virtqueue size");
        let words = page as *mut u64;
        let mut i = 0;
        while i < PAGE_SIZE / 8 {
            // SAFETY: the caller guarantees the page is ours; i < 512 stays inside it.
            unsafe { words.add(i as usize).write_volatile(0) };
            i += 1;
        }
        Self { index, size, page, avail_idx: 0, last_used: 0 }
    }

    fn desc_addr(&self) -> u64 {
        self.page
    }

    fn avail_addr(&self) -> u64 {
        self.page + AVAIL_OFFSET
    }

    fn used_addr(&self) -> u64 {
        self.page + USED_OFFSET
    }

    /// Sets the queue up on the device (virtio 1.2, §4.2.3.2): select, check QueueNumMax and
    /// that the queue is not in use, size, ring addresses, ready. Returns a description of the
    /// problem when the device does not take it.
    pub fn setup(&self, mmio: &Mmio) -> Result<(), &'static str> {
        mmio.write(reg::QUEUE_SEL, self.index);
        if mmio.read(reg::QUEUE_READY) != 0 {
            return Err("queue is already ready before setup");
        }
        let max = mmio.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue does not exist (QueueNumMax 0)");
        }
        if max < u32::from(self.size) {
            return Err("QueueNumMax is below the size the driver uses");
        }
        mmio.write(reg::QUEUE_NUM, u32::from(self.size));
        mmio.write_pair(reg::QUEUE_DESC_LOW, self.desc_addr());
        mmio.write_pair(reg::QUEUE_DRIVER_LOW, self.avail_addr());
        mmio.write_pair(reg::QUEUE_DEVICE_LOW, self.used_addr());
        mmio.write(reg::QUEUE_READY, 1);
        if mmio.read(reg::QUEUE_READY) != 1 {
            return Err("QueueReady did not stick");
        }
        Ok(())
    }

    /// Writes descriptor `i` (< size).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size, "descriptor index out of range");
        let at = self.desc_addr() + 16 * u64::from(i);
        // SAFETY: descriptor `i` < size <= 64 lies in the first 1 KiB of the queue's page, which
        // `new`'s caller gave us; the fields are naturally aligned.
        unsafe {
            (at as *mut u64).write_volatile(addr);
            ((at + 8) as *mut u32).write_volatile(len);
            ((at + 12) as *mut u16).write_volatile(flags);
            ((at + 14) as *mut u16).write_volatile(next);
        }
    }

    /// Makes the chain starting at descriptor `head` available (entry first, then the index:
    /// §2.7.13). The caller notifies the device.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_addr() + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the slot and the index (avail + 2) lie in the available ring inside the
        // queue's page. Volatile stores are not reordered with each other by the compiler and
        // x86 keeps stores in order, so the device sees the entry before the index.
        unsafe {
            (slot as *mut u16).write_volatile(head);
            ((self.avail_addr() + 2) as *mut u16).write_volatile(self.avail_idx);
        }
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: `used.idx` at used + 2 lies in the queue's page; the device writes it, hence
        // the volatile read.
        unsafe { ((self.used_addr() + 2) as *const u16).read_volatile() }
    }

    /// The next used entry (id, len) the driver has not consumed yet, if any.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let at = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: used entry `last_used % size` lies in the used ring inside the queue's page.
        // The device writes the entry before the index (and x86 keeps loads in order), so it
        // is complete once the index shows it.
        unsafe { Some(((at as *const u32).read_volatile(), ((at + 4) as *const u32).read_volatile())) }
    }
}

/// Asks the host to keep this vCPU stopped for about `us` microseconds
/// ([`guest_abi::Rendezvous::Idle`]): how a polling driver waits between two polls without
/// spinning (a CPL 3 guest cannot halt).
pub fn idle(vcpu: u64, us: u64) {
    crate::report(
        vcpu,
        guest_abi::UcallKind::Rendezvous,
        &[guest_abi::Rendezvous::Idle as u64, us.min(guest_abi::MAX_IDLE_US)],
    );
}
