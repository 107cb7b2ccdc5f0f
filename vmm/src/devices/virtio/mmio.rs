//! The virtio-mmio transport, version 2 (virtio 1.2, §4.2 "Virtio Over MMIO").
//!
//! [`MmioTransport`] is a [`BusDevice`] for a [`MMIO_WINDOW_SIZE`]-byte window on the MMIO bus.
//! Registers (offsets in the window) are 32-bit and little-endian; configuration space starts at
//! [`CONFIG_SPACE_OFFSET`] and may be accessed at any width. The guest finds the device through
//! the kernel command line (`virtio_mmio.device=0x200@<base>:<irq>`) or the firmware tables; its
//! interrupt is the [`VirtioInterrupt`]'s eventfd, registered by the VMM as an irqfd.
//!
//! The transport drives the device status machine: ACKNOWLEDGE -> DRIVER -> (driver features)
//! -> FEATURES_OK (refused, i.e. not kept in Status, unless the accepted features are a subset
//! of the offered ones and include VIRTIO_F_VERSION_1) -> queue setup -> DRIVER_OK (activates the
//! device). Writing 0 to Status resets the device.
//!
//! A notify of a ready queue before DRIVER_OK is remembered, not refused: the device handles
//! that queue when it is activated. Virtio 1.2 (§3.1.1) says a driver must not notify before
//! DRIVER_OK, but Linux's virtio_balloon primes its statistics queue with a buffer and kicks it
//! during probe, before `virtio_device_ready()`; dropping that kick would leave the device
//! without the guest's statistics buffer. The device still consumes nothing before DRIVER_OK
//! (§2.1: it must not). A driver that breaks the rules (DRIVER_OK
//! without FEATURES_OK, a queue of a size that is not a power of two or exceeds QueueNumMax,
//! rings outside guest RAM, a notify of a queue that is not ready, a register access of the
//! wrong width, setup after DRIVER_OK) is counted in [`TransportStats`] and logged; the device
//! is set to DEVICE_NEEDS_RESET (with a config-change interrupt) when it cannot go on, or the
//! access is ignored. Nothing a driver writes makes the transport panic.
//!
//! # Kicks off the vCPU thread (ioeventfd)
//! The VMM registers, per queue, an ioeventfd with KVM for a 4-byte write of the queue's index
//! to QueueNotify ([`MmioTransport::attach_ioeventfds`]): KVM signals the eventfd inside the
//! guest's store and resumes the guest without an exit to userspace, and the VMM's event loop
//! processes the queue ([`MmioTransport::handle_kick`]). Where the host refuses ioeventfd the
//! write exits as before and is handled on the vCPU thread (counted: [`TransportStats`]). Two
//! threads then touch the device — the vCPU's MMIO exits (configuration, status, queue setup,
//! InterruptStatus/ACK) and the event loop's queue processing — and these invariants keep that
//! race-free:
//! - T1. All transport and device state (registers, queues, the device model, the counters) is
//!   behind the one `Mutex` the VMM holds the transport in; the bus takes it for every MMIO
//!   exit and the event loop for every kick, so queue processing never overlaps a register
//!   access, and each sees all of the other's effects. (InterruptStatus and the config
//!   generation are atomics in [`VirtioInterrupt`], also written by the device under the lock.)
//! - T2. An ioeventfd is read (its count consumed) only under that lock, by
//!   [`MmioTransport::handle_kick`] or by the drain of T3, so every kick is handled exactly
//!   once, by whichever thread reads it first; a kick that finds its count consumed does
//!   nothing.
//! - T3. A Status write handles every kick made before it first: KVM signals the ioeventfd
//!   during the guest's QueueNotify store, before that vCPU runs its next instruction, so when
//!   a later Status write of the driver exits, the kick is already counted; `write_status`
//!   drains the eventfds (T2) before it resets or activates the device. A reset or DRIVER_OK
//!   therefore never overtakes an earlier kick, exactly as when every kick exited.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::queue::Queue;
use super::{features, log_guest_error, status, VirtioDevice, VirtioInterrupt};
use crate::devices::BusDevice;
use crate::mmu::GuestMemoryAccess;

pub use guest_abi::virtio::mmio::{
    CONFIG as CONFIG_SPACE_OFFSET, MAGIC_VALUE as MMIO_MAGIC, VERSION_2 as MMIO_VERSION,
    WINDOW_SIZE as MMIO_WINDOW_SIZE,
};
/// VendorID: "ZAPV" (any value is allowed; Linux ignores it). The VMM's choice, not the contract.
pub const VENDOR_ID: u32 = 0x5650_415a;

/// Register offsets (virtio 1.2, §4.2.2), defined in the ABI crate the test guest compiles too.
pub use guest_abi::virtio::mmio as reg;

/// Counters of the transport (driver errors and events).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// Register accesses of the wrong width or alignment, to unknown offsets, or writes to
    /// read-only registers.
    pub register_errors: u64,
    /// Feature negotiation errors (unoffered or missing VERSION_1 at FEATURES_OK, features
    /// written outside the DRIVER..FEATURES_OK window).
    pub feature_errors: u64,
    /// Status errors (clearing bits, DRIVER_OK without FEATURES_OK, setting DEVICE_NEEDS_RESET).
    pub status_errors: u64,
    /// Queue setup errors (bad size, misaligned rings or rings outside RAM, setup of a ready
    /// queue or after DRIVER_OK, a queue that does not exist).
    pub queue_errors: u64,
    /// Notifies of a queue that is not ready or does not exist, or after the device failed.
    pub notify_errors: u64,
    /// Notifies of a ready queue before DRIVER_OK, handled at activation (Linux's
    /// virtio_balloon sends one for its statistics queue).
    pub early_notifies: u64,
    /// Times the device was set to DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Notifies passed to the device.
    pub notifies: u64,
    /// QueueNotify writes that exited to the VMM (on the vCPU thread).
    pub kicks_exit: u64,
    /// Kicks read from an ioeventfd (processed off the vCPU thread; several guest kicks may
    /// count once).
    pub kicks_ioeventfd: u64,
    /// Queues whose QueueNotify has an ioeventfd.
    pub ioeventfd_queues: u64,
    /// Queues whose ioeventfd the host refused (their kicks exit, the fallback).
    pub ioeventfd_refused: u64,
    /// Successful activations (DRIVER_OK).
    pub activations: u64,
    /// Device resets (Status written with 0).
    pub resets: u64,
}

impl TransportStats {
    /// Sum of the error counters.
    pub fn errors(&self) -> u64 {
        self.register_errors
            + self.feature_errors
            + self.status_errors
            + self.queue_errors
            + self.notify_errors
    }
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: Arc<dyn GuestMemoryAccess>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    /// The driver set feature bits above 63 (never offered).
    acked_high: bool,
    status: u32,
    activated: bool,
    /// Queues notified before DRIVER_OK (bit per queue index), handled at activation.
    early_notified: u64,
    /// Per queue, the ioeventfd KVM signals for a QueueNotify write of its index, if any
    /// (read only under the transport's lock: T2).
    kick_fds: Vec<Option<EventFd>>,
    stats: TransportStats,
    name: String,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, accessing guest RAM through `mem` (the VMM's table in
    /// production) and interrupting through `interrupt`.
    pub fn new(device: D, mem: Arc<dyn GuestMemoryAccess>, interrupt: Arc<VirtioInterrupt>) -> Self {
        let queues = device.queue_max_sizes().iter().map(|&m| Queue::new(m)).collect();
        let name = format!("virtio-mmio(type {})", device.device_type());
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            acked_high: false,
            status: 0,
            activated: false,
            early_notified: 0,
            kick_fds: Vec::new(),
            stats: TransportStats::default(),
            name,
        }
    }

    /// The number of queues (what QueueNumMax answers for).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Takes `fds[i]` as the ioeventfd of queue `i` (`None`: its kicks exit); `refused` counts
    /// the queues whose registration the host refused. The eventfds must be non-blocking.
    pub fn attach_ioeventfds(&mut self, fds: Vec<Option<EventFd>>, refused: u64) {
        self.stats.ioeventfd_queues = fds.iter().filter(|f| f.is_some()).count() as u64;
        self.stats.ioeventfd_refused = refused;
        self.kick_fds = fds;
    }

    /// The ioeventfd of queue `index` signalled (the event loop calls this holding the
    /// transport's lock, T1): consumes its count and, if there was one, processes the queue as
    /// a QueueNotify write would. Does nothing when the count was consumed already (T2).
    pub fn handle_kick(&mut self, index: usize) {
        if self.take_kick(index) {
            self.stats.kicks_ioeventfd += 1;
            self.notify_queue(index as u32);
        }
    }

    /// Consumes queue `index`'s ioeventfd count; whether there was one.
    fn take_kick(&mut self, index: usize) -> bool {
        let Some(Some(fd)) = self.kick_fds.get(index) else {
            return false;
        };
        match fd.read() {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                tracing::warn!("{}: reading the ioeventfd of queue {index}: {e}", self.name);
                false
            }
        }
    }

    /// T3: handles the kicks signalled so far, in queue order, before a Status write.
    fn drain_kicks(&mut self) {
        for index in 0..self.kick_fds.len() {
            self.handle_kick(index);
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (prefer [`MmioTransport::update_config`] for config changes).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Runs `change` on the device, then announces a configuration change: the config
    /// generation moves and, once the driver is up (DRIVER_OK), a config-change interrupt is
    /// raised. How the VMM changes device configuration (e.g. the balloon target).
    pub fn update_config<R>(&mut self, change: impl FnOnce(&mut D) -> R) -> R {
        let result = change(&mut self.device);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        } else {
            self.interrupt.bump_config_generation();
        }
        result
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The counters.
    pub fn stats(&self) -> TransportStats {
        self.stats.clone()
    }

    fn offered(&self) -> u64 {
        self.device.avail_features() | (1 << features::VIRTIO_F_VERSION_1)
    }

    /// A queue notification for `index` (what a write to QueueNotify does; also the entry
    /// point for an ioeventfd handler).
    pub fn notify_queue(&mut self, index: u32) {
        let i = index as usize;
        let ready = self.queues.get(i).is_some_and(|q| q.ready);
        if ready && self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET) == 0 && i < 64 {
            // Before DRIVER_OK: the device takes the queue's buffers once it is activated.
            self.stats.early_notifies += 1;
            self.early_notified |= 1 << i;
            return;
        }
        let usable = self.status & status::DRIVER_OK != 0
            && self.status & status::DEVICE_NEEDS_RESET == 0
            && self.activated
            && self.queues.get(i).is_some_and(|q| q.ready);
        if !usable {
            self.stats.notify_errors += 1;
            log_guest_error(
                self.stats.notify_errors,
                format_args!("{}: notify of queue {index}, which is not ready/usable", self.name),
            );
            return;
        }
        self.stats.notifies += 1;
        if let Err(e) = self.device.process_queue(i) {
            self.needs_reset(format_args!("queue {index}: {e}"));
        }
    }

    fn needs_reset(&mut self, why: std::fmt::Arguments<'_>) {
        self.stats.needs_reset += 1;
        log_guest_error(self.stats.needs_reset, format_args!("{}: DEVICE_NEEDS_RESET: {why}", self.name));
        self.status |= status::DEVICE_NEEDS_RESET;
        // Virtio 1.2, §2.1.2: with DRIVER_OK set, the device must send a config-change
        // notification.
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        self.stats.resets += 1;
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.early_notified = 0;
        self.status = 0;
        self.acked_features = 0;
        self.acked_high = false;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.interrupt.reset();
    }

    fn write_status(&mut self, value: u32) {
        // T3: every kick the driver made before this write is handled before it.
        self.drain_kicks();
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let cleared = old & !value & !status::DEVICE_NEEDS_RESET;
        if cleared != 0 || value & status::DEVICE_NEEDS_RESET & !old != 0 {
            self.stats.status_errors += 1;
            log_guest_error(
                self.stats.status_errors,
                format_args!("{}: status {old:#x} -> {value:#x} clears bits or sets NEEDS_RESET", self.name),
            );
            return;
        }
        let mut value = value | (old & status::DEVICE_NEEDS_RESET);
        let new = value & !old;
        if new & status::FEATURES_OK != 0 {
            let offered = self.offered();
            let ok = self.acked_features & !offered == 0
                && !self.acked_high
                && self.acked_features & (1 << features::VIRTIO_F_VERSION_1) != 0
                && value & status::DRIVER != 0;
            if !ok {
                self.stats.feature_errors += 1;
                log_guest_error(
                    self.stats.feature_errors,
                    format_args!(
                        "{}: FEATURES_OK refused: accepted {:#x}, offered {offered:#x}",
                        self.name, self.acked_features
                    ),
                );
                value &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                self.stats.status_errors += 1;
                self.status = value & !status::DRIVER_OK;
                self.needs_reset(format_args!("DRIVER_OK without FEATURES_OK"));
                return;
            }
            self.status = value;
            if self.status & status::DEVICE_NEEDS_RESET == 0 {
                let queues = self.queues.clone();
                match self.device.activate(
                    self.acked_features,
                    queues,
                    self.mem.clone(),
                    self.interrupt.clone(),
                ) {
                    Ok(()) => {
                        self.activated = true;
                        self.stats.activations += 1;
                        // Queues the driver notified before DRIVER_OK, in index order.
                        let early = std::mem::take(&mut self.early_notified);
                        for i in (0..64).filter(|i| early & (1 << i) != 0) {
                            if self.status & status::DEVICE_NEEDS_RESET != 0 {
                                break;
                            }
                            self.notify_queue(i);
                        }
                    }
                    Err(e) => self.needs_reset(format_args!("activation failed: {e}")),
                }
            }
            return;
        }
        self.status = value;
    }

    fn queue_setup_allowed(&mut self) -> Option<usize> {
        let i = self.queue_select as usize;
        let ok = self.status & status::DRIVER_OK == 0 && self.queues.get(i).is_some_and(|q| !q.ready);
        if !ok {
            self.stats.queue_errors += 1;
            log_guest_error(
                self.stats.queue_errors,
                format_args!("{}: setup of queue {i} ignored (absent, ready, or after DRIVER_OK)", self.name),
            );
            return None;
        }
        Some(i)
    }

    fn set_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(i) = self.queue_setup_allowed() {
            f(&mut self.queues[i]);
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let i = self.queue_select as usize;
        if value == 0 {
            // Disabling a queue is allowed before DRIVER_OK only (no VIRTIO_F_RING_RESET).
            if self.status & status::DRIVER_OK == 0 {
                if let Some(q) = self.queues.get_mut(i) {
                    q.ready = false;
                    return;
                }
            }
            self.stats.queue_errors += 1;
            log_guest_error(self.stats.queue_errors, format_args!("{}: QueueReady=0 ignored", self.name));
            return;
        }
        let Some(i) = self.queue_setup_allowed() else {
            return;
        };
        match self.queues[i].validate(self.mem.as_ref()) {
            Ok(()) => self.queues[i].mark_ready(),
            Err(why) => {
                self.stats.queue_errors += 1;
                self.needs_reset(format_args!("queue {i} refused: {why}"));
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let window = self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        if !window {
            self.stats.feature_errors += 1;
            log_guest_error(
                self.stats.feature_errors,
                format_args!("{}: driver features written outside DRIVER..FEATURES_OK", self.name),
            );
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value as u64,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value as u64) << 32,
            _ => self.acked_high |= value != 0,
        }
    }

    fn bad_register(&mut self, offset: u64, len: usize, write: bool) {
        self.stats.register_errors += 1;
        let what = if write { "write" } else { "read" };
        log_guest_error(
            self.stats.register_errors,
            format_args!("{}: bad register {what} at {offset:#x} ({len} bytes)", self.name),
        );
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let q = self.queues.get(self.queue_select as usize);
        Some(match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| q.max_size as u32),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length -1 means "this region does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => return None,
        })
    }

    fn write_register(&mut self, offset: u64, value: u32) -> bool {
        let low = |old: u64| (old & !0xffff_ffff) | value as u64;
        let high = |old: u64| (old & 0xffff_ffff) | (value as u64) << 32;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => self.set_queue(|q| q.size = value.min(u16::MAX as u32 + 1) as u16),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => {
                self.stats.kicks_exit += 1;
                self.notify_queue(value)
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self.set_queue(|q| q.desc_table = low(q.desc_table)),
            reg::QUEUE_DESC_HIGH => self.set_queue(|q| q.desc_table = high(q.desc_table)),
            reg::QUEUE_DRIVER_LOW => self.set_queue(|q| q.avail_ring = low(q.avail_ring)),
            reg::QUEUE_DRIVER_HIGH => self.set_queue(|q| q.avail_ring = high(q.avail_ring)),
            reg::QUEUE_DEVICE_LOW => self.set_queue(|q| q.used_ring = low(q.used_ring)),
            reg::QUEUE_DEVICE_HIGH => self.set_queue(|q| q.used_ring = high(q.used_ring)),
            reg::SHM_SEL => {}
            _ => return false,
        }
        true
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let end = offset.checked_add(data.len() as u64);
            if end.is_some_and(|e| e <= MMIO_WINDOW_SIZE) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                data.fill(0);
                self.bad_register(offset, data.len(), false);
            }
            return;
        }
        let value =
            if data.len() == 4 && offset.is_multiple_of(4) { self.read_register(offset) } else { None };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                data.fill(0);
                self.bad_register(offset, data.len(), false);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let end = offset.checked_add(data.len() as u64);
            if end.is_some_and(|e| e <= MMIO_WINDOW_SIZE) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.bad_register(offset, data.len(), true);
            }
            return;
        }
        let handled = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => false,
        };
        if !handled {
            self.bad_register(offset, data.len(), true);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::TestRing;
    use crate::devices::virtio::DeviceFault;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    pub(crate) fn r32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn w32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
        dev.write(offset, &value.to_le_bytes());
    }

    /// Sets up queue `index` like a driver: select, size, ring addresses, ready.
    pub(crate) fn setup_queue(dev: &mut dyn BusDevice, index: u32, ring: &TestRing) {
        w32(dev, reg::QUEUE_SEL, index);
        w32(dev, reg::QUEUE_NUM, ring.size as u32);
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, ring.desc),
            (reg::QUEUE_DRIVER_LOW, ring.avail),
            (reg::QUEUE_DEVICE_LOW, ring.used),
        ] {
            w32(dev, lo, addr as u32);
            w32(dev, lo + 4, (addr >> 32) as u32);
        }
        w32(dev, reg::QUEUE_READY, 1);
    }

    /// ACKNOWLEDGE, DRIVER, accept `features` (plus VERSION_1), FEATURES_OK; returns whether
    /// FEATURES_OK stuck.
    pub(crate) fn negotiate(dev: &mut dyn BusDevice, features: u64) -> bool {
        w32(dev, reg::STATUS, status::ACKNOWLEDGE);
        w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(dev, reg::DRIVER_FEATURES_SEL, 0);
        w32(dev, reg::DRIVER_FEATURES, features as u32);
        w32(dev, reg::DRIVER_FEATURES_SEL, 1);
        w32(dev, reg::DRIVER_FEATURES, (features >> 32) as u32 | 1);
        w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        r32(dev, reg::STATUS) & status::FEATURES_OK != 0
    }

    pub(crate) fn driver_ok(dev: &mut dyn BusDevice) {
        let s = r32(dev, reg::STATUS);
        w32(dev, reg::STATUS, s | status::DRIVER_OK);
    }

    /// A device that returns every chain with its readable length.
    #[derive(Default)]
    struct Echo {
        queues: Vec<Queue>,
        mem: Option<Arc<dyn GuestMemoryAccess>>,
        irq: Option<Arc<VirtioInterrupt>>,
        config: [u8; 8],
        resets: u32,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            0x42
        }
        fn avail_features(&self) -> u64 {
            (1 << features::VIRTIO_F_VERSION_1) | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _acked: u64,
            queues: Vec<Queue>,
            mem: Arc<dyn GuestMemoryAccess>,
            irq: Arc<VirtioInterrupt>,
        ) -> Result<(), DeviceFault> {
            self.queues = queues;
            self.mem = Some(mem);
            self.irq = Some(irq);
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> Result<(), DeviceFault> {
            let mem = self.mem.clone().unwrap();
            let q = &mut self.queues[index];
            while let Some(p) = q.pop(mem.as_ref()).map_err(|e| DeviceFault(e.to_string()))? {
                if let crate::devices::virtio::queue::Popped::Chain(c) = p {
                    let len = c.readable().map(|d| d.len).sum();
                    q.add_used(mem.as_ref(), c.head, len).map_err(|e| DeviceFault(e.to_string()))?;
                }
            }
            self.irq.as_ref().unwrap().signal_used_queue();
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.queues.clear();
        }
    }

    fn transport() -> (MmioTransport<Echo>, Arc<GuestMemoryMmap>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(Echo::default(), mem.clone(), irq), mem)
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r32(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 0x42);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0b101);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 8);
        w32(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        // Config space at any width.
        t.write(0x102, &[7, 8]);
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 7, 8]);
        // A 2-byte register read is an error, not a panic.
        let mut two = [0u8; 2];
        t.read(reg::STATUS, &mut two);
        t.write(0x1fe, &[1, 2, 3, 4]);
        assert_eq!(t.stats().register_errors, 2);
    }

    #[test]
    fn full_driver_sequence_uses_buffers_and_interrupts() {
        let (mut t, mem) = transport();
        let mut ring = TestRing::new(8, 0x10000);
        assert!(negotiate(&mut t, 0b100));
        setup_queue(&mut t, 0, &ring);
        driver_ok(&mut t);
        assert_eq!(t.stats().activations, 1);
        ring.set_desc(&mem, 0, 0x30000, 12, 0, 0);
        ring.push(&mem, 0);
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(ring.used_idx(&mem), 1);
        assert_eq!(ring.used_elem(&mem, 0), (0, 12));
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 1);
        assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
        w32(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        // Queue 1 was never made ready: notify is counted and ignored.
        w32(&mut t, reg::QUEUE_NOTIFY, 1);
        w32(&mut t, reg::QUEUE_NOTIFY, 77);
        assert_eq!(t.stats().notify_errors, 2);
        // Setup after DRIVER_OK is ignored.
        w32(&mut t, reg::QUEUE_SEL, 1);
        w32(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.stats().queue_errors, 1);
        // Reset.
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(t.device().resets, 1);
        w32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.stats().errors(), 3);
    }

    /// Linux's virtio_balloon kicks its statistics queue during probe, before DRIVER_OK: the
    /// buffer must not be used before DRIVER_OK, and must be used once the device is activated.
    #[test]
    fn a_notify_before_driver_ok_is_handled_at_activation() {
        let (mut t, mem) = transport();
        let mut ring = TestRing::new(8, 0x10000);
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &ring);
        ring.set_desc(&mem, 0, 0x30000, 40, 0, 0);
        ring.push(&mem, 0);
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(ring.used_idx(&mem), 0, "nothing is consumed before DRIVER_OK");
        assert_eq!(t.stats().early_notifies, 1);
        // A queue that is not ready is still an error, before DRIVER_OK too.
        w32(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.stats().notify_errors, 1);
        driver_ok(&mut t);
        assert_eq!(ring.used_idx(&mem), 1, "the early notify is handled at activation");
        assert_eq!(ring.used_elem(&mem, 0), (0, 40));
        assert_eq!((t.stats().notifies, t.stats().errors()), (1, 1));
        // A reset forgets early notifies.
        w32(&mut t, reg::STATUS, 0);
        assert!(negotiate(&mut t, 0));
        let mut ring = TestRing::new(8, 0x20000);
        setup_queue(&mut t, 0, &ring);
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        w32(&mut t, reg::STATUS, 0);
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &ring);
        ring.set_desc(&mem, 0, 0x30000, 40, 0, 0);
        ring.push(&mem, 0);
        driver_ok(&mut t);
        assert_eq!(ring.used_idx(&mem), 0, "the notify before the reset is gone");
    }

    fn kick_fds(n: usize) -> (Vec<Option<EventFd>>, Vec<EventFd>) {
        let fds: Vec<EventFd> = (0..n).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let guest_side = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        (fds.into_iter().map(Some).collect(), guest_side)
    }

    /// T2 and T3: a kick signalled on the ioeventfd is processed once, by whoever reads it
    /// first, and a later Status write (here: a reset) handles it before it acts.
    #[test]
    fn ioeventfd_kicks_are_handled_once_and_before_a_later_status_write() {
        let (mut t, mem) = transport();
        let (fds, kvm) = kick_fds(2);
        t.attach_ioeventfds(fds, 0);
        let mut ring = TestRing::new(8, 0x10000);
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &ring);
        driver_ok(&mut t);
        ring.set_desc(&mem, 0, 0x30000, 12, 0, 0);
        ring.push(&mem, 0);
        // What KVM does for the guest's QueueNotify store: signal, no exit.
        kvm[0].write(1).unwrap();
        t.handle_kick(0);
        assert_eq!(ring.used_idx(&mem), 1);
        t.handle_kick(0);
        t.handle_kick(1);
        let s = t.stats();
        assert_eq!((s.kicks_ioeventfd, s.kicks_exit, s.notifies, s.errors()), (1, 0, 1, 0), "{s:?}");
        // A kick, then the driver resets before the event loop ran: the reset handles it first.
        ring.set_desc(&mem, 1, 0x30000, 20, 0, 0);
        ring.push(&mem, 1);
        kvm[0].write(1).unwrap();
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(ring.used_idx(&mem), 2, "the kick before the reset was handled before it");
        assert_eq!(ring.used_elem(&mem, 1), (1, 20));
        t.handle_kick(0);
        let s = t.stats();
        assert_eq!((s.kicks_ioeventfd, s.notifies, s.resets, s.errors()), (2, 2, 1, 0), "{s:?}");
        assert_eq!((s.ioeventfd_queues, s.ioeventfd_refused), (2, 0));
    }

    /// T1 and T2 under real concurrency: one thread plays the vCPU (makes buffers available,
    /// kicks through the ioeventfd, reads and acknowledges InterruptStatus, reads config and
    /// status through MMIO), another the event loop (handles kicks). Every buffer comes back
    /// exactly once, in order, and no access is a driver error.
    #[test]
    fn ioeventfd_kicks_race_free_with_the_vcpus_register_accesses() {
        const BUFFERS: u16 = 20_000;
        let (mut t, mem) = transport();
        let (fds, kvm) = kick_fds(1);
        t.attach_ioeventfds(fds, 0);
        let mut ring = TestRing::new(8, 0x10000);
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &ring);
        driver_ok(&mut t);
        for d in 0..8u16 {
            ring.set_desc(&mem, d, 0x30000 + 0x100 * d as u64, 1 + d as u32, 0, 0);
        }
        let t = Arc::new(std::sync::Mutex::new(t));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let event_loop = {
            let (t, stop) = (t.clone(), stop.clone());
            let fd = kvm[0].try_clone().unwrap();
            std::thread::spawn(move || {
                let mut polls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    // Wait for the eventfd like epoll would, without consuming it.
                    let mut pfd = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                    t.lock().unwrap().handle_kick(0);
                    polls += 1;
                }
                polls
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut reaped = 0u16;
        let mut next_used = 0u16;
        while reaped < BUFFERS {
            // At most the ring's size in flight.
            while ring.avail_idx.wrapping_sub(reaped) < 8 && ring.avail_idx < BUFFERS {
                let d = ring.avail_idx % 8;
                ring.push(&mem, d);
                kvm[0].write(1).unwrap();
            }
            {
                let mut dev = t.lock().unwrap();
                let pending = r32(&mut *dev, reg::INTERRUPT_STATUS);
                w32(&mut *dev, reg::INTERRUPT_ACK, pending);
                assert_eq!(r32(&mut *dev, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
                let mut cfg = [0u8; 4];
                dev.read(CONFIG_SPACE_OFFSET, &mut cfg);
            }
            let used = ring.used_idx(&mem);
            while next_used != used {
                let (id, len) = ring.used_elem(&mem, next_used);
                assert_eq!(
                    (id, len),
                    ((next_used % 8) as u32, 1 + (next_used % 8) as u32),
                    "used {next_used}"
                );
                next_used = next_used.wrapping_add(1);
                reaped += 1;
            }
            assert!(std::time::Instant::now() < deadline, "hung at {reaped} of {BUFFERS}");
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        event_loop.join().unwrap();
        let s = t.lock().unwrap().stats();
        assert_eq!(s.errors(), 0, "{s:?}");
        assert_eq!((s.kicks_exit, s.needs_reset), (0, 0));
        assert!(s.kicks_ioeventfd >= 1 && s.kicks_ioeventfd <= BUFFERS as u64, "{s:?}");
        assert_eq!(ring.used_idx(&mem), BUFFERS);
    }

    #[test]
    fn bad_negotiation_is_refused() {
        let (mut t, _) = transport();
        // Bit 1 is not offered.
        assert!(!negotiate(&mut t, 0b10));
        assert_eq!(t.stats().feature_errors, 1);
        // DRIVER_OK without FEATURES_OK: DEVICE_NEEDS_RESET, no activation.
        driver_ok(&mut t);
        assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.stats().activations, 0);
        assert_eq!(t.stats().status_errors, 1);
        w32(&mut t, reg::STATUS, 0);
        // Without VERSION_1.
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Features written after FEATURES_OK are ignored.
        w32(&mut t, reg::STATUS, 0);
        assert!(negotiate(&mut t, 1));
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 0b10);
        assert_eq!(t.acked_features() & 0b10, 0);
        assert_eq!(t.stats().feature_errors, 3);
    }

    #[test]
    fn bad_queues_set_needs_reset() {
        for (size, base) in [(3u16, 0x10000u64), (16, 0x10000), (8, 0xff000), (8, 0x1_0000_0000)] {
            let (mut t, _) = transport();
            assert!(negotiate(&mut t, 0));
            setup_queue(&mut t, 0, &TestRing::new(size, base));
            assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "size {size} at {base:#x}");
            assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
            assert_eq!(t.stats().queue_errors, 1);
            driver_ok(&mut t);
            assert_eq!(t.stats().activations, 0, "no activation while NEEDS_RESET");
            w32(&mut t, reg::QUEUE_NOTIFY, 0);
            assert_eq!(t.stats().notifies, 0);
        }
    }
}
