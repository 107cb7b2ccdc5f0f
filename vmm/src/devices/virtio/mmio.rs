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
pub(crate) mod tests;
