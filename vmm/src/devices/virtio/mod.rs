//! Virtio devices: the virtio-mmio transport ([`mmio`]), split virtqueues ([`queue`]) and the
//! virtio-balloon ([`balloon`]).
//!
//! Everything here reads and writes guest RAM only through a `&dyn GuestMemoryAccess` (in
//! production the VMM's table, [`crate::mmu::GuestMmu`]) and tears guest RAM down only through
//! the notifier (`mmu.space().discard`), so the memory layer's contract (docs/memory-layer.md)
//! holds: bad guest input becomes a device error, a log line and a counter, never a host syscall
//! on memory outside guest RAM and never a panic.
//!
//! How the pieces fit:
//! - a device model implements [`VirtioDevice`] (type, features, queue sizes, config space,
//!   `activate`, `process_queue`, `reset`);
//! - [`mmio::MmioTransport`] wraps it as a [`super::BusDevice`] implementing the virtio-mmio
//!   register layout, version 2 (virtio 1.2, §4.2), and drives the device status machine;
//! - both raise interrupts through one shared [`VirtioInterrupt`] (an irqfd `EventFd` plus the
//!   InterruptStatus bits and the config generation).

pub mod balloon;
pub mod mem;
pub mod mmio;
pub mod queue;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::mmu::GuestMemoryAccess;
use queue::Queue;

// The contract's constants are defined once, in the ABI crate the test guest's drivers compile
// too (see `guest_abi::virtio` for why not `virtio-bindings`).
pub use guest_abi::virtio::interrupt::{
    CONFIG_CHANGE as INTERRUPT_CONFIG_CHANGE, USED_BUFFER as INTERRUPT_USED_BUFFER,
};
pub use guest_abi::virtio::{device_type, features, status};

/// The interrupt line of one virtio device, shared by the transport and the device model.
///
/// Raising sets a bit in InterruptStatus (read by the driver at offset 0x60, cleared by its
/// write to InterruptACK) and writes the `EventFd`, which the VMM registers with KVM as an irqfd.
/// The config generation lives here too because a config change and its interrupt go together.
#[derive(Debug)]
pub struct VirtioInterrupt {
    evt: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    raised: AtomicU64,
    failed: AtomicU64,
}

impl VirtioInterrupt {
    /// An interrupt line signalling `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            evt,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            raised: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// The eventfd (to register as an irqfd, or to read in tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.evt.write(1) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("virtio: cannot signal the interrupt eventfd: {e}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_BUFFER);
    }

    /// The device changed its configuration space: bumps the config generation, then raises.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    /// Bumps the config generation without an interrupt (a change before the driver is up).
    pub fn bump_config_generation(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Interrupts raised so far, and eventfd writes that failed.
    pub fn counts(&self) -> (u64, u64) {
        (self.raised.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// A fault that stops a device until the driver resets it: the transport sets
/// DEVICE_NEEDS_RESET and raises a config-change interrupt (virtio 1.2, §2.1.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device fault: {0}")]
pub struct DeviceFault(pub String);

/// A virtio device model behind a transport (the shape of Firecracker's `VirtioDevice`).
///
/// Contract: the transport calls `activate` once per DRIVER_OK with every queue (ready or not;
/// a queue that is not ready must not be used), `process_queue` only after a successful
/// `activate` and only for a ready queue, and `reset` when the driver writes 0 to Status (after
/// which `activate` may come again). None of these may panic on guest-controlled data.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Features offered (must include [`features::VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The largest size of each queue (QueueNumMax); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads configuration space at `offset` (relative to 0x100). Bytes beyond the device's
    /// config read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: the driver accepted `acked_features` and set up `queues`. The device uses
    /// `mem` for every access to guest RAM and `interrupt` to notify the driver.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Queue>,
        mem: Arc<dyn GuestMemoryAccess>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), DeviceFault>;
    /// The driver notified queue `index`. Errors of single buffers are the device's to count;
    /// an `Err` means the queue itself is unusable (DEVICE_NEEDS_RESET).
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceFault>;
    /// Device reset: drop the queues and return to the state before `activate`.
    fn reset(&mut self);
}

/// Logs a guest error at WARN the first 16 times and then at powers of two of `count` (the
/// occurrence number, starting at 1), so a hostile guest cannot flood the log.
pub(crate) fn log_guest_error(count: u64, what: std::fmt::Arguments<'_>) {
    if count <= 16 || count.is_power_of_two() {
        tracing::warn!("virtio: guest error #{count}: {what}");
    } else {
        tracing::debug!("virtio: guest error #{count}: {what}");
    }
}

/// Fills `data` from a device's configuration image `config` at `offset`; bytes past its end
/// (or an overflowing offset) read as zero, as a driver's stray read must not fail.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|at| config.get(usize::try_from(at).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// Test support shared by the device tests: the memory layer over test RAM and a subscriber that
/// records what the notifier announces.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{Arc, Mutex};

    use crate::memory::GuestRam;
    use crate::mmu::GuestMmu;

    /// Records every range the notifier announces, as guest-physical (exact) ranges of the first
    /// RAM region.
    pub(crate) struct Recorder {
        host_base: usize,
        ranges: Mutex<Vec<(u64, u64)>>,
    }

    impl notifier::Subscriber for Recorder {
        fn invalidate_range_start(&self, range: &notifier::Range) -> Result<(), notifier::Refused> {
            // Wrapping: a region mapped below the first one (a hot-pluggable region) records
            // as a wrapped offset rather than panicking inside the notifier (e.g. at release).
            let start = range.exact_start.wrapping_sub(self.host_base) as u64;
            let end = range.exact_end.wrapping_sub(self.host_base) as u64;
            self.ranges.lock().unwrap().push((start, end));
            Ok(())
        }
    }

    impl Recorder {
        /// The ranges recorded since the last call.
        pub(crate) fn take(&self) -> Vec<(u64, u64)> {
            std::mem::take(&mut *self.ranges.lock().unwrap())
        }
    }

    /// The notifier over `ram`, the VMM's table subscribed to it, and a [`Recorder`]. The caller
    /// keeps `ram` alive (and mapped) for as long as the returned values.
    pub(crate) fn memory_layer(
        ram: &GuestRam,
    ) -> (Arc<notifier::AddressSpace>, Arc<GuestMmu>, Arc<Recorder>) {
        // SAFETY: the caller keeps `ram` mapped while the address space lives; tests touch guest
        // RAM only through vm-memory (raw pointers) and the table.
        let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.unwrap();
        let mmu = Arc::new(GuestMmu::new(ram, space.clone()).unwrap());
        let host_base = ram.regions().next().unwrap().1 as usize;
        let recorder = Arc::new(Recorder { host_base, ranges: Mutex::new(Vec::new()) });
        space.subscribe(recorder.clone()).unwrap();
        (space, mmu, recorder)
    }
}
