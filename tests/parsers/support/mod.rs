//! Shared by `tests/parsers.rs` (proptest, stable `cargo test`) and the cargo-fuzz targets in
//! `vmm/fuzz/` (which include this module with `#[path]`), one file per parser: rigs that drive the request parsers —
//! the control socket's [`handle_line`] (QMP), the balloon's PFN arrays and free page reports, the
//! virtio-mem request queue, a bare split virtqueue — from arbitrary bytes, and check their
//! invariants. A violated invariant panics (that is what both proptest and libFuzzer catch).
//!
//! The device rigs are VM-less: guest RAM, the notifier's address space, the VMM's table
//! (`GuestMmu`) and the device behind its virtio-mmio transport, driven through MMIO register
//! writes exactly as a driver would. A recording notifier subscriber sees every range the device
//! discards. Guest RAM has a hot-pluggable region above 4 GiB as `zapvm run --virtio-mem` gives
//! it, which the balloon must never touch.
//!
//! Fuzz inputs are decoded by [`Bytes`], a cursor that yields zeros once the input is exhausted,
//! so every byte string is a valid input and the decoders are biased towards interesting values
//! (addresses inside the rings' data area, PFNs inside RAM, block-aligned virtio-mem ranges).

// Each fuzz target uses one rig: the rest (and its re-export) is unused there.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm::api::{
    handle_line, ErrorClass, QmpError, RunStatus, Session, StatsGroup, VirtioMemInfo, VmHandle, MAX_LINE,
};
use vmm::devices::virtio::balloon::{
    Balloon, BalloonConfig, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use vmm::devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::devices::virtio::queue::{Popped, Queue};
use vmm::devices::virtio::{status, VirtioDevice, VirtioInterrupt};
use vmm::devices::BusDevice;
use vmm::memory::{GuestMemoryMmap, GuestRam, MemoryBackend, MemoryConfig};
use vmm::mmu::{GuestMemoryAccess, GuestMmu};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------------------------
// Input decoding

/// A cursor over fuzz input: little-endian integers, zeros once exhausted.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    /// The next `n` bytes (zero-padded past the end).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
}

fn w32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

fn r32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Status 0 (reset), then ACKNOWLEDGE, DRIVER, `features` | VERSION_1, FEATURES_OK.
fn negotiate(dev: &mut dyn BusDevice, features: u64) {
    w32(dev, reg::STATUS, 0);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(dev, reg::DRIVER_FEATURES_SEL, 0);
    w32(dev, reg::DRIVER_FEATURES, features as u32);
    w32(dev, reg::DRIVER_FEATURES_SEL, 1);
    w32(dev, reg::DRIVER_FEATURES, (features >> 32) as u32 | 1);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(r32(dev, reg::STATUS) & status::FEATURES_OK, 0, "features {features:#x} refused");
}

/// Queue `index` of `size` entries at `ring` (descriptors; avail at +0x1000, used at +0x2000).
fn setup_queue(dev: &mut dyn BusDevice, index: u32, size: u16, ring: u64) {
    w32(dev, reg::QUEUE_SEL, index);
    w32(dev, reg::QUEUE_NUM, size as u32);
    for (lo, addr) in [
        (reg::QUEUE_DESC_LOW, ring),
        (reg::QUEUE_DRIVER_LOW, ring + 0x1000),
        (reg::QUEUE_DEVICE_LOW, ring + 0x2000),
    ] {
        w32(dev, lo, addr as u32);
        w32(dev, lo + 4, (addr >> 32) as u32);
    }
    w32(dev, reg::QUEUE_READY, 1);
    assert_eq!(r32(dev, reg::QUEUE_READY), 1, "queue {index} of size {size} refused");
}

fn driver_ok(dev: &mut dyn BusDevice) {
    let s = r32(dev, reg::STATUS);
    w32(dev, reg::STATUS, s | status::DRIVER_OK);
    assert_eq!(r32(dev, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

// ---------------------------------------------------------------------------------------------
// Discard recording

/// Records every range the notifier announces (`invalidate_range_start`), host addresses.
#[derive(Default)]
pub struct Recorder {
    ranges: Mutex<Vec<(usize, usize, usize, usize)>>,
}

impl notifier::Subscriber for Recorder {
    fn invalidate_range_start(&self, range: &notifier::Range) -> Result<(), notifier::Refused> {
        self.ranges.lock().unwrap().push((range.start, range.end, range.exact_start, range.exact_end));
        Ok(())
    }
}

/// One guest RAM region: (guest-physical start, host address, size, hot-pluggable).
type Region = (u64, usize, u64, bool);

/// A discard the subscriber saw, in guest-physical terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// Exact guest-physical range the syscall named.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
    /// Whether it lies in the hot-pluggable (virtio-mem) region.
    pub hotplug: bool,
}

/// Guest RAM, the notifier, the table and the recorder: what both device rigs share.
/// Field order is drop order (RAM last), though the rigs live in statics and are never dropped.
pub struct Memory {
    /// The VMM's table over all of guest RAM.
    pub mmu: Arc<GuestMmu>,
    recorder: Arc<Recorder>,
    space: Arc<notifier::AddressSpace>,
    regions: Vec<Region>,
    /// Guest RAM.
    pub ram: GuestRam,
}

impl Memory {
    /// `size` bytes of anonymous RAM at 0 plus `hotplug` bytes at `hotplug_base(size)`.
    pub fn new(size: u64, hotplug: u64) -> Self {
        let config = MemoryConfig { size, backend: MemoryBackend::Anonymous, thp: false };
        let ram = GuestRam::with_hotplug(config, hotplug).expect("guest RAM");
        // SAFETY: `ram` outlives the address space (dropped last, and in practice never: the
        // rigs live in statics) and stays mapped; RAM is accessed only through vm-memory and
        // the table.
        let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.expect("address space");
        let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).expect("table"));
        let recorder = Arc::new(Recorder::default());
        space.subscribe(recorder.clone()).expect("subscribe");
        let hot = ram.hotplug().map(|(gpa, _)| gpa);
        let regions =
            ram.regions().map(|(gpa, hva, len)| (gpa.0, hva as usize, len, Some(gpa.0) == hot)).collect();
        Self { mmu, recorder, space, regions, ram }
    }

    /// Guest RAM through vm-memory (the driver's view).
    pub fn guest(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Writes `data` at `gpa` as the driver would (ignoring addresses outside RAM).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let _ = GuestMemoryAccess::write(self.guest(), gpa, data);
    }

    /// Reads guest memory (zeros where it is not RAM).
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let _ = GuestMemoryAccess::read(self.guest(), gpa, &mut buf);
        buf
    }

    /// The discards since the last call, checked to be whole pages inside one region of guest
    /// RAM (exact range) and announced with a page-aligned, enclosing range.
    pub fn discards(&self) -> Vec<Discard> {
        let raw = std::mem::take(&mut *self.recorder.ranges.lock().unwrap());
        raw.into_iter()
            .map(|(start, end, exact_start, exact_end)| {
                assert!(exact_start < exact_end, "empty range {exact_start:#x}..{exact_end:#x}");
                assert!(
                    start <= exact_start && exact_end <= end,
                    "announced range does not enclose the exact one"
                );
                assert!(start % 4096 == 0 && end % 4096 == 0);
                let &(gpa, hva, _, hotplug) = self
                    .regions
                    .iter()
                    .find(|&&(_, hva, len, _)| exact_start >= hva && exact_end <= hva + len as usize)
                    .unwrap_or_else(|| {
                        panic!("discard of host range {exact_start:#x}..{exact_end:#x} outside guest RAM")
                    });
                let d = Discard {
                    gpa: gpa + (exact_start - hva) as u64,
                    len: (exact_end - exact_start) as u64,
                    hotplug,
                };
                assert!(
                    d.gpa.is_multiple_of(4096) && d.len.is_multiple_of(4096),
                    "discard of partial pages: {d:x?}"
                );
                d
            })
            .collect()
    }
}

/// Where a fuzzed guest-physical address goes: mostly into `area` (the rig's scratch area, where
/// the fuzzer's bytes are), sometimes anywhere in RAM, at the hot-pluggable region, near the end
/// of RAM, or raw.
fn fuzz_addr(b: &mut Bytes, area: (u64, u64), ram: u64, hotplug: u64) -> u64 {
    let v = b.u32() as u64;
    match b.u8() % 8 {
        0..=3 => area.0 + v % area.1,
        4 => v % ram,
        5 => hotplug + v % (8 << 20),
        6 => ram - (v % 0x4000),
        _ => b.u64(),
    }
}

fn fuzz_len(b: &mut Bytes) -> u32 {
    let v = b.u16() as u32;
    match b.u8() % 8 {
        0..=2 => (v % 64) * 4,
        3 => v % 64,
        4 => v * 4,
        5 => (v % 16) * 4096,
        6 => v,
        _ => b.u32(),
    }
}

// ---------------------------------------------------------------------------------------------
// The rigs, one room per parser

mod api;
mod balloon;
mod virtio_mem;
mod virtqueue;

pub use api::*;
pub use balloon::*;
pub use virtio_mem::*;
pub use virtqueue::*;
