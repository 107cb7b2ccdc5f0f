//! The virtio-mem device model driven through its transport, against a real memory layer.

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::mmio::tests::{driver_ok, negotiate, r32, setup_queue, w32};
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::queue::tests::TestRing;
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::test_support::{memory_layer, Recorder};
use crate::devices::virtio::INTERRUPT_CONFIG_CHANGE;
use crate::devices::BusDevice;
use crate::memory::{GuestRam, MemoryBackend, MemoryConfig};

const RAM: u64 = 64 << 20;
/// The device region: the upper 32 MiB of the test's RAM, 16 blocks of 2 MiB.
const REGION: u64 = 32 << 20;
const REGION_SIZE: u64 = 32 << 20;
const BLOCK: u64 = 2 << 20;
const QUEUE: u64 = 0x10000;
const REQ: u64 = 0x50000;
const RESP: u64 = 0x51000;

/// Guest RAM, the notifier, the table and a virtio-mem device behind the transport, with
/// requestq set up and DRIVER_OK. Field order is drop order: RAM goes last.
struct Fixture {
    t: MmioTransport<VirtioMem>,
    ring: TestRing,
    recorder: Arc<Recorder>,
    mmu: Arc<GuestMmu>,
    _space: Arc<notifier::AddressSpace>,
    ram: GuestRam,
}

/// What came back for one request: the response type and state as written (0xffff where
/// the device wrote nothing) and the used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    kind: u16,
    state: u16,
    len: u32,
}

const NO_ANSWER: Answer = Answer { kind: 0xffff, state: 0xffff, len: 0 };

fn ack(state: u16) -> Answer {
    Answer { kind: VIRTIO_MEM_RESP_ACK, state, len: RESPONSE_SIZE as u32 }
}

fn answer(kind: u16) -> Answer {
    Answer { kind, state: 0, len: RESPONSE_SIZE as u32 }
}

fn fixture(requested: u64) -> Fixture {
    let ram =
        GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false }).unwrap();
    // The fixture drops `ram` last, after the address space.
    let (space, mmu, recorder) = memory_layer(&ram);
    let config = VirtioMemConfig { requested_size: requested, ..VirtioMemConfig::new(REGION, REGION_SIZE) };
    let device = VirtioMem::new(mmu.clone(), config).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(device, mmu.clone(), irq);
    assert!(negotiate(&mut t, 0));
    let ring = TestRing::new(16, QUEUE);
    setup_queue(&mut t, 0, &ring);
    driver_ok(&mut t);
    assert_eq!(t.stats().activations, 1);
    assert_eq!(t.stats().errors(), 0);
    Fixture { t, ring, recorder, mmu, _space: space, ram }
}

impl Fixture {
    fn mem(&self) -> &crate::memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Writes a request at REQ, poisons the response at RESP, queues the chain made of
    /// `descs` (addr, len, flags; chained in order) and notifies; returns what came back.
    fn send_chain(&mut self, kind: u16, addr: u64, nb_blocks: u16, descs: &[(u64, u32, u16)]) -> Answer {
        let mut req = [0u8; REQUEST_SIZE];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[2..8].fill(0x5a); // padding: ignored
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.mem().write_slice(&req, GuestAddress(REQ)).unwrap();
        self.mem().write_slice(&[0xff; 16], GuestAddress(RESP)).unwrap();
        let mem = self.ram.memory().clone();
        for (i, &(a, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { VIRTQ_DESC_F_NEXT } else { 0 };
            self.ring.set_desc(&mem, i as u16, a, len, flags | next, i as u16 + 1);
        }
        let before = self.ring.used_idx(&mem);
        self.ring.push(&mem, 0);
        w32(&mut self.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(self.ring.used_idx(&mem), before.wrapping_add(1), "the head came back");
        let (head, len) = self.ring.used_elem(&mem, before);
        assert_eq!(head, 0);
        let kind: u16 = self.mem().read_obj(GuestAddress(RESP)).unwrap();
        let state: u16 = self.mem().read_obj(GuestAddress(RESP + 8)).unwrap();
        Answer { kind, state, len }
    }

    /// A well-formed request: 24 readable bytes, then a 16-byte writable response buffer.
    fn send(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> Answer {
        self.send_chain(
            kind,
            addr,
            nb_blocks,
            &[(REQ, REQUEST_SIZE as u32, 0), (RESP, 16, VIRTQ_DESC_F_WRITE)],
        )
    }

    fn block(&self, i: u64) -> u64 {
        REGION + i * BLOCK
    }

    fn fill(&self, gpa: u64, len: u64) {
        self.mem().write_slice(&vec![0xaau8; len as usize], GuestAddress(gpa)).unwrap();
    }

    /// Whether every byte of the 4 KiB page at `gpa` reads `byte` through the table.
    fn page_is(&self, gpa: u64, byte: u8) -> bool {
        let mut buf = vec![0x55u8; 4096];
        self.mmu.read(gpa, &mut buf).unwrap();
        buf.iter().all(|&b| b == byte)
    }

    fn config_u64(&mut self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.t.read(0x100 + offset, &mut b);
        u64::from_le_bytes(b)
    }

    fn stats(&self) -> VirtioMemStats {
        self.t.device().stats()
    }

    fn interrupts(&self) -> u64 {
        self.t.interrupt().eventfd().read().unwrap_or(0)
    }
}

#[test]
fn config_space_layout() {
    let mut f = fixture(8 << 20);
    assert_eq!(r32(&mut f.t, reg::DEVICE_ID), 24);
    assert_eq!(f.config_u64(0), BLOCK, "block_size");
    let mut node = [0xffu8; 8];
    f.t.read(0x108, &mut node);
    assert_eq!(node, [0; 8], "node_id 0 and padding");
    assert_eq!(f.config_u64(16), REGION, "addr");
    assert_eq!(f.config_u64(24), REGION_SIZE, "region_size");
    assert_eq!(f.config_u64(32), REGION_SIZE, "usable_region_size");
    assert_eq!(f.config_u64(40), 0, "plugged_size");
    assert_eq!(f.config_u64(48), 8 << 20, "requested_size");
    // Narrow reads and reads past the config.
    assert_eq!(r32(&mut f.t, 0x100 + 52), 0);
    assert_eq!(r32(&mut f.t, 0x100 + 48), 8 << 20);
    assert_eq!(r32(&mut f.t, 0x100 + 56), 0);
}

#[test]
fn plug_state_unplug_round_trip() {
    let mut f = fixture(8 << 20);
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, f.block(0), 4), ack(VIRTIO_MEM_STATE_UNPLUGGED));
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(0), 4), ack(0));
    assert_eq!(f.config_u64(40), 8 << 20, "plugged_size");
    assert!(f.recorder.take().is_empty(), "plugging is no syscall");
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, f.block(0), 4), ack(VIRTIO_MEM_STATE_PLUGGED));
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, f.block(2), 4), ack(VIRTIO_MEM_STATE_MIXED));
    // Beyond requested_size: NACK, nothing changes.
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(8), 1), answer(VIRTIO_MEM_RESP_NACK));
    assert!(!f.t.device().is_plugged(f.block(8)));
    // Unplug the middle two: one discard of exactly their range.
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG, f.block(1), 2), ack(0));
    assert_eq!(f.recorder.take(), [(f.block(1), f.block(3))]);
    assert_eq!(f.config_u64(40), 4 << 20);
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, f.block(0), 4), ack(VIRTIO_MEM_STATE_MIXED));
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, f.block(1), 2), ack(VIRTIO_MEM_STATE_UNPLUGGED));
    let d = f.t.device();
    assert!(d.is_plugged(f.block(0)) && d.is_plugged(f.block(3) + BLOCK - 1));
    assert!(!d.is_plugged(f.block(1)) && !d.is_plugged(f.block(2)));
    assert!(!d.is_plugged(REGION - 1) && !d.is_plugged(REGION + REGION_SIZE));
    // Now there is room again under requested_size.
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(8), 2), ack(0));
    let s = f.stats();
    assert_eq!((s.plugged_size, s.plugged_blocks, s.requested_size), (8 << 20, 4, 8 << 20));
    assert_eq!((s.plug_requests, s.unplug_requests, s.state_requests, s.unplug_all_requests), (3, 1, 5, 0));
    assert_eq!((s.acks, s.nacks, s.busy, s.error_responses), (8, 1, 0, 0));
    assert_eq!((s.blocks_plugged, s.blocks_unplugged), (6, 2));
    assert_eq!((s.discard_ranges, s.blocks_discarded, s.bytes_discarded), (1, 2, 4 << 20));
    assert_eq!(s.errors.total(), 0);
    assert_eq!(f.interrupts(), 9, "one used-buffer interrupt per request");
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), 1);
    serde_json::to_string(&s).unwrap();
}

#[test]
fn unplug_reads_zeros_through_the_table_and_notifies_exactly_the_blocks() {
    let mut f = fixture(REGION_SIZE);
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(4), 3), ack(0));
    // The guest uses its plugged memory.
    f.fill(f.block(4), 3 * BLOCK);
    // Warm the table so that the discard has translations to tear down.
    assert!(f.page_is(f.block(5), 0xaa) && f.page_is(f.block(6) - 4096, 0xaa));
    let torn_before = f.mmu.stats().torn_down["discard"];
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG, f.block(5), 1), ack(0));
    assert_eq!(f.recorder.take(), [(f.block(5), f.block(6))]);
    assert!(f.page_is(f.block(5), 0), "first page of the unplugged block reads zeros");
    assert!(f.page_is(f.block(6) - 4096, 0), "last page too");
    assert!(f.page_is(f.block(5) - 4096, 0xaa), "the block before keeps its data");
    assert!(f.page_is(f.block(6), 0xaa), "the block after keeps its data");
    assert!(f.mmu.stats().torn_down["discard"] > torn_before, "the table dropped its entries");
    let s = f.stats();
    assert_eq!((s.plugged_blocks, s.discard_ranges, s.bytes_discarded), (2, 1, BLOCK));
}

#[test]
fn unplug_all_discards_each_run_once() {
    let mut f = fixture(REGION_SIZE);
    for (first, n) in [(0, 2), (5, 1), (7, 3), (15, 1)] {
        assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(first), n), ack(0));
    }
    f.fill(f.block(0), 2 * BLOCK);
    assert_eq!(f.config_u64(40), 7 * BLOCK);
    // addr and nb_blocks of UNPLUG_ALL are ignored.
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG_ALL, 0xdead_beef, 0), ack(0));
    assert_eq!(
        f.recorder.take(),
        [
            (f.block(0), f.block(2)),
            (f.block(5), f.block(6)),
            (f.block(7), f.block(10)),
            (f.block(15), f.block(16))
        ]
    );
    assert_eq!(f.config_u64(40), 0);
    assert!(f.page_is(f.block(1), 0));
    assert_eq!(f.send(VIRTIO_MEM_REQ_STATE, REGION, 16), ack(VIRTIO_MEM_STATE_UNPLUGGED));
    // Nothing plugged: ACK, no syscall.
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0), ack(0));
    assert!(f.recorder.take().is_empty());
    let s = f.stats();
    assert_eq!((s.unplug_all_requests, s.discard_ranges, s.blocks_discarded), (2, 4, 7));
    assert_eq!((s.blocks_plugged, s.blocks_unplugged, s.plugged_size), (7, 7, 0));
    assert_eq!(s.errors.total(), 0);
}

#[test]
fn hostile_requests_change_only_error_counters() {
    let mut f = fixture(REGION_SIZE);
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(2), 2), ack(0));
    f.fill(f.block(2), 2 * BLOCK);
    let err = answer(VIRTIO_MEM_RESP_ERROR);
    let before = f.stats();
    let aligned_top = !(BLOCK - 1);
    for (kind, addr, n) in [
        // Out of range: below the region, at its end, straddling its end, all of RAM.
        (VIRTIO_MEM_REQ_UNPLUG, 0, 1),
        (VIRTIO_MEM_REQ_PLUG, REGION + REGION_SIZE, 1),
        (VIRTIO_MEM_REQ_UNPLUG, f.block(15), 2),
        (VIRTIO_MEM_REQ_STATE, 0, 32),
        // Misaligned.
        (VIRTIO_MEM_REQ_UNPLUG, f.block(2) + 4096, 1),
        (VIRTIO_MEM_REQ_PLUG, f.block(5) + BLOCK / 2, 1),
        // Zero blocks.
        (VIRTIO_MEM_REQ_UNPLUG, f.block(2), 0),
        (VIRTIO_MEM_REQ_STATE, f.block(2), 0),
        // addr + size overflows.
        (VIRTIO_MEM_REQ_UNPLUG, aligned_top, 1),
        (VIRTIO_MEM_REQ_PLUG, aligned_top, u16::MAX),
        // Plug twice (partly), unplug never-plugged (partly and wholly).
        (VIRTIO_MEM_REQ_PLUG, f.block(3), 2),
        (VIRTIO_MEM_REQ_UNPLUG, f.block(1), 2),
        (VIRTIO_MEM_REQ_UNPLUG, f.block(9), 1),
        // Unknown request type.
        (7, f.block(2), 1),
    ] {
        assert_eq!(f.send(kind, addr, n), err, "request {kind} of {n} blocks at {addr:#x}");
    }
    // Malformed chains: each refers to a valid UNPLUG of the plugged blocks, which must not
    // happen. Short request; response read-only; response too small; response outside RAM;
    // no response at all; request outside RAM.
    let unplug = |f: &mut Fixture, descs: &[(u64, u32, u16)]| {
        f.send_chain(VIRTIO_MEM_REQ_UNPLUG, f.block(2), 2, descs)
    };
    let w = VIRTQ_DESC_F_WRITE;
    for descs in [
        &[(REQ, 16, 0), (RESP, 16, w)][..],
        &[(REQ, 24, 0), (RESP, 16, 0)],
        &[(REQ, 24, 0), (RESP, 4, w)],
        &[(REQ, 24, 0), (0x1_0000_0000, 16, w)],
        &[(REQ, 24, 0)],
        &[(RAM - 8, 24, 0), (RESP, 16, w)],
    ] {
        assert_eq!(unplug(&mut f, descs), NO_ANSWER, "{descs:x?}");
    }
    // A descriptor loop 0 -> 1 -> 0.
    let mem = f.ram.memory().clone();
    f.ring.set_desc(&mem, 0, REQ, 24, VIRTQ_DESC_F_NEXT, 1);
    f.ring.set_desc(&mem, 1, RESP, 16, w | VIRTQ_DESC_F_NEXT, 0);
    let used = f.ring.used_idx(&mem);
    f.ring.push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.ring.used_elem(&mem, used), (0, 0));
    // Config writes are refused.
    w32(&mut f.t, 0x100 + 48, 0);
    w32(&mut f.t, 0x100 + 40, 0);

    assert!(f.recorder.take().is_empty(), "no hostile input reached a syscall");
    assert!(f.page_is(f.block(2), 0xaa) && f.page_is(f.block(4) - 4096, 0xaa));
    assert_eq!(f.config_u64(40), 2 * BLOCK);
    assert_eq!(f.config_u64(48), REGION_SIZE);
    let s = f.stats();
    assert_eq!((s.plugged_blocks, s.blocks_plugged, s.blocks_unplugged, s.discard_ranges), (2, 2, 0, 0));
    assert_eq!(s.acks, before.acks);
    assert_eq!(s.error_responses, 14);
    let e = &s.errors;
    assert_eq!((e.out_of_range, e.misaligned, e.zero_blocks, e.overflow), (4, 2, 2, 2), "{e:?}");
    assert_eq!((e.plug_plugged, e.unplug_unplugged, e.unknown_request), (1, 2, 1), "{e:?}");
    assert_eq!(
        (e.bad_request_buffer, e.bad_response_buffer, e.unreadable, e.bad_chain, e.config_write),
        (1, 4, 1, 1, 2),
        "{e:?}"
    );
    assert_eq!(e.total(), 23);
    assert_eq!(f.t.stats().needs_reset, 0, "bad requests do not break the queue");
    // The queue still works, and the blocks are still plugged.
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG, f.block(2), 2), ack(0));
    assert_eq!(f.recorder.take(), [(f.block(2), f.block(4))]);
}

#[test]
fn requested_size_change_raises_the_config_interrupt() {
    let mut f = fixture(0);
    let generation = r32(&mut f.t, reg::CONFIG_GENERATION);
    f.t.update_config(|m| m.set_requested_size(16 << 20)).unwrap();
    assert_ne!(r32(&mut f.t, reg::CONFIG_GENERATION), generation);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(f.interrupts(), 1);
    assert_eq!(f.config_u64(48), 16 << 20);
    w32(&mut f.t, reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    // Not whole blocks, or beyond the region: refused, unchanged.
    assert!(f.t.device_mut().set_requested_size((16 << 20) + 4096).is_err());
    assert!(f.t.device_mut().set_requested_size(REGION_SIZE + BLOCK).is_err());
    assert_eq!(f.t.device().requested_size(), 16 << 20);
    // The driver follows; lowering the request leaves plugged memory to the driver.
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(0), 8), ack(0));
    f.t.update_config(|m| m.set_requested_size(4 << 20)).unwrap();
    assert_eq!((f.config_u64(40), f.config_u64(48)), (16 << 20, 4 << 20));
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(8), 1), answer(VIRTIO_MEM_RESP_NACK));
    assert_eq!(f.send(VIRTIO_MEM_REQ_UNPLUG, f.block(2), 6), ack(0));
    assert_eq!(f.stats().plugged_size, f.stats().requested_size);
}

#[test]
fn driver_reset_keeps_the_plug_state_and_host_unplug_all_clears_it() {
    let mut f = fixture(REGION_SIZE);
    assert_eq!(f.send(VIRTIO_MEM_REQ_PLUG, f.block(3), 2), ack(0));
    w32(&mut f.t, reg::STATUS, 0);
    assert_eq!(f.t.status(), 0);
    assert_eq!(f.config_u64(40), 2 * BLOCK, "still plugged after a driver reset");
    // Before DRIVER_OK a config change bumps the generation without an interrupt.
    let generation = r32(&mut f.t, reg::CONFIG_GENERATION);
    f.interrupts();
    f.t.update_config(|m| m.set_requested_size(0)).unwrap();
    assert_ne!(r32(&mut f.t, reg::CONFIG_GENERATION), generation);
    assert_eq!(f.interrupts(), 0);
    // A VM reset.
    assert!(f.t.device_mut().unplug_all());
    assert_eq!(f.recorder.take(), [(f.block(3), f.block(5))]);
    assert_eq!(f.config_u64(40), 0);
    assert_eq!(f.stats().blocks_unplugged, 2);
    assert!(f.t.device_mut().unplug_all(), "nothing left: no discard");
    assert!(f.recorder.take().is_empty());
}

#[test]
fn constructor_refuses_bad_regions_and_offers_configured_features() {
    let ram =
        GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false }).unwrap();
    // SAFETY: `ram` is declared first, so it is dropped after the address space.
    let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.unwrap();
    let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).unwrap());
    let new = |c: VirtioMemConfig| VirtioMem::new(mmu.clone(), c).map(|_| ());
    let base = VirtioMemConfig::new(REGION, REGION_SIZE);
    assert_eq!(new(base), Ok(()));
    assert_eq!(new(VirtioMemConfig { block_size: 4 << 20, ..base }), Ok(()));
    for block_size in [0, 4096, 1 << 20, 3 << 20] {
        assert_eq!(new(VirtioMemConfig { block_size, ..base }), Err(VirtioMemError::BlockSize(block_size)));
    }
    for (addr, size) in [(REGION + 4096, BLOCK), (REGION, BLOCK + 4096), (REGION, 0)] {
        assert!(matches!(new(VirtioMemConfig::new(addr, size)), Err(VirtioMemError::Alignment { .. })));
    }
    for (addr, size) in [(RAM - BLOCK, 2 * BLOCK), (0x1_0000_0000, BLOCK), (!(BLOCK - 1), BLOCK)] {
        assert_eq!(new(VirtioMemConfig::new(addr, size)), Err(VirtioMemError::NotRam { addr, size }));
    }
    for requested_size in [4096, REGION_SIZE + BLOCK] {
        assert!(matches!(
            new(VirtioMemConfig { requested_size, ..base }),
            Err(VirtioMemError::RequestedSize { .. })
        ));
    }
    // Optional features are offered only when configured.
    let plain = VirtioMem::new(mmu.clone(), base).unwrap();
    assert_eq!(plain.avail_features(), 1 << features::VIRTIO_F_VERSION_1);
    assert_eq!(plain.queue_max_sizes(), [QUEUE_SIZE]);
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(plain, mmu.clone(), irq.clone());
    assert!(!negotiate(&mut t, 1 << VIRTIO_MEM_F_ACPI_PXM));
    let config = VirtioMemConfig { node_id: Some(3), unplugged_inaccessible: true, ..base };
    let mut t = MmioTransport::new(VirtioMem::new(mmu.clone(), config).unwrap(), mmu.clone(), irq);
    assert!(negotiate(&mut t, (1 << VIRTIO_MEM_F_ACPI_PXM) | (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)));
    let mut node = [0u8; 2];
    t.read(0x108, &mut node);
    assert_eq!(u16::from_le_bytes(node), 3);
    let _: &dyn BusDevice = &t;
    drop(t);
    drop(mmu);
    drop(space);
}
