//! The balloon device model driven through its transport, against a real memory layer.

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::mmio::tests::{driver_ok, negotiate, r32, setup_queue, w32};
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::queue::tests::TestRing;
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::test_support::{memory_layer, Recorder};
use crate::devices::virtio::{status, INTERRUPT_CONFIG_CHANGE};
use crate::devices::BusDevice;
use crate::memory::{MemoryBackend, MemoryConfig};

const RAM: u64 = 16 << 20;
const INFLATE: u64 = 0x10000;
const DEFLATE: u64 = 0x20000;
const STATSQ: u64 = 0x30000;
const REPORT: u64 = 0x40000;
const ARRAYS: u64 = 0x50000;

/// Guest RAM, the notifier, the table and a balloon behind the transport, with all four
/// queues set up and DRIVER_OK. Field order is drop order: RAM goes last.
struct Fixture {
    t: MmioTransport<Balloon>,
    rings: Vec<TestRing>,
    recorder: Arc<Recorder>,
    mmu: Arc<GuestMmu>,
    _space: Arc<notifier::AddressSpace>,
    ram: GuestRam,
}

fn fixture(thp: bool) -> Fixture {
    let ram = GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp }).unwrap();
    fixture_on(ram)
}

fn fixture_on(ram: GuestRam) -> Fixture {
    // The fixture drops `ram` last, after the address space.
    let (space, mmu, recorder) = memory_layer(&ram);
    let balloon = Balloon::new(mmu.clone(), &ram, BalloonConfig::default());
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(balloon, mmu.clone(), irq);
    let all = (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST)
        | (1 << VIRTIO_BALLOON_F_STATS_VQ)
        | (1 << VIRTIO_BALLOON_F_PAGE_REPORTING);
    assert!(negotiate(&mut t, all));
    let rings: Vec<TestRing> =
        [INFLATE, DEFLATE, STATSQ, REPORT].iter().map(|&b| TestRing::new(16, b)).collect();
    for (i, ring) in rings.iter().enumerate() {
        setup_queue(&mut t, i as u32, ring);
    }
    driver_ok(&mut t);
    assert_eq!(t.stats().activations, 1);
    assert_eq!(t.stats().errors(), 0);
    Fixture { t, rings, recorder, mmu, _space: space, ram }
}

impl Fixture {
    fn mem(&self) -> &crate::memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Queues a one-descriptor PFN request on queue `q` (descriptor `desc`, its array at
    /// `ARRAYS + 0x1000 * desc`) without notifying.
    fn queue_pfns(&mut self, q: usize, desc: u16, pfns: &[u32]) {
        let array = ARRAYS + 0x1000 * desc as u64;
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem().write_slice(&bytes, GuestAddress(array)).unwrap();
        let mem = self.ram.memory().clone();
        self.rings[q].set_desc(&mem, desc, array, bytes.len() as u32, 0, 0);
        self.rings[q].push(&mem, desc);
    }

    /// Queues a one-descriptor PFN request on queue `q` and notifies.
    fn send_pfns(&mut self, q: usize, desc: u16, pfns: &[u32]) {
        self.queue_pfns(q, desc, pfns);
        w32(&mut self.t, reg::QUEUE_NOTIFY, q as u32);
    }

    fn fill(&self, pfn: u64, pages: u64) {
        let data = vec![0xaau8; (pages * 4096) as usize];
        self.mem().write_slice(&data, GuestAddress(pfn * 4096)).unwrap();
    }

    /// Whether every byte of the page reads `byte` through the table.
    fn page_is(&self, pfn: u64, byte: u8) -> bool {
        let mut buf = vec![0x55u8; 4096];
        self.mmu.read(pfn * 4096, &mut buf).unwrap();
        buf.iter().all(|&b| b == byte)
    }

    fn stats(&self) -> BalloonStats {
        self.t.device().stats()
    }

    fn interrupts(&self) -> u64 {
        self.t.interrupt().eventfd().read().unwrap_or(0)
    }
}

#[test]
fn contiguous_pfns_are_one_discard_and_read_zeros() {
    let mut f = fixture(false);
    f.fill(0x200, 8);
    // Warm the table so that the discard has a translation to tear down.
    assert!(f.page_is(0x201, 0xaa));
    f.send_pfns(0, 0, &[0x203, 0x200, 0x202, 0x201]);
    assert_eq!(f.recorder.take(), [(0x200000, 0x204000)]);
    for pfn in 0x200..0x204 {
        assert!(f.page_is(pfn, 0), "PFN {pfn:#x} reads zeros");
        assert!(f.t.device().is_ballooned(pfn));
    }
    assert!(f.page_is(0x204, 0xaa), "the next page keeps its data");
    assert!(!f.t.device().is_ballooned(0x204));
    assert_eq!(f.rings[0].used_idx(f.mem()), 1);
    assert_eq!(f.rings[0].used_elem(f.mem(), 0), (0, 0));
    assert_eq!(f.interrupts(), 1);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS) & 1, 1);
    let s = f.stats();
    assert_eq!((s.inflated_pages, s.ballooned_pages, s.discard_ranges, s.bytes_discarded), (4, 4, 1, 0x4000));
    assert_eq!(s.errors.total(), 0);
    assert!(f.mmu.stats().torn_down["discard"] >= 1, "the table dropped its entry");
}

#[test]
fn scattered_pfns_are_several_discards() {
    let mut f = fixture(false);
    f.send_pfns(0, 0, &[0x300, 0x302, 0x303, 0x400]);
    assert_eq!(f.recorder.take(), [(0x300000, 0x301000), (0x302000, 0x304000), (0x400000, 0x401000)]);
    assert_eq!(f.stats().discard_ranges, 3);
    // Deflate two of them: no syscall, the bitmap follows.
    f.send_pfns(1, 0, &[0x302, 0x400]);
    assert!(f.recorder.take().is_empty());
    let s = f.stats();
    assert_eq!((s.deflated_pages, s.ballooned_pages), (2, 2));
    assert!(f.t.device().is_ballooned(0x303) && !f.t.device().is_ballooned(0x302));
    // Deflating a page that is not ballooned is counted, nothing else.
    f.send_pfns(1, 1, &[0x500]);
    assert_eq!(f.stats().errors.deflate_not_ballooned, 1);
    assert_eq!(f.rings[1].used_idx(f.mem()), 2);
}

#[test]
fn hostile_requests_change_only_error_counters() {
    let mut f = fixture(false);
    f.fill(0x200, 4);
    // A PFN beyond RAM (16 MiB = PFN 0x1000) next to a valid one: the request is refused.
    f.send_pfns(0, 0, &[0x200, 0x1000]);
    // Far beyond (4 GiB, the MMIO hole).
    f.send_pfns(0, 1, &[0xfff_ffff]);
    // A duplicate.
    f.send_pfns(0, 2, &[0x201, 0x201]);
    let mem = f.ram.memory().clone();
    // A descriptor of length 3.
    f.rings[0].set_desc(&mem, 3, ARRAYS, 3, 0, 0);
    f.rings[0].push(&mem, 3);
    // A loop 4 -> 5 -> 4.
    f.rings[0].set_desc(&mem, 4, ARRAYS, 4, VIRTQ_DESC_F_NEXT, 5);
    f.rings[0].set_desc(&mem, 5, ARRAYS, 4, VIRTQ_DESC_F_NEXT, 4);
    f.rings[0].push(&mem, 4);
    // A write-only buffer, and a buffer outside RAM.
    f.rings[0].set_desc(&mem, 6, ARRAYS, 4, VIRTQ_DESC_F_WRITE, 0);
    f.rings[0].push(&mem, 6);
    f.rings[0].set_desc(&mem, 7, 0x1_0000_0000, 4, 0, 0);
    f.rings[0].push(&mem, 7);
    // A head outside the table.
    f.rings[0].push(&mem, 99);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);

    assert!(f.recorder.take().is_empty(), "no hostile input reached a syscall");
    assert!(f.page_is(0x200, 0xaa) && f.page_is(0x201, 0xaa));
    let s = f.stats();
    assert_eq!((s.inflated_pages, s.ballooned_pages, s.discard_ranges), (0, 0, 0));
    assert_eq!(s.inflate_refused, 6);
    let e = &s.errors;
    assert_eq!(
        (e.pfn_outside_ram, e.pfn_duplicate, e.bad_buffer, e.bad_chain, e.unreadable),
        (2, 1, 2, 2, 1),
        "{e:?}"
    );
    // Every valid head came back (the out-of-range one cannot be).
    assert_eq!(f.rings[0].used_idx(f.mem()), 7);
    assert_eq!(f.t.stats().needs_reset, 0, "bad buffers do not break the queue");
    // The queue still works.
    f.send_pfns(0, 8, &[0x200]);
    assert_eq!(f.recorder.take(), [(0x200000, 0x201000)]);
}

#[test]
fn bad_rings_never_reach_a_syscall() {
    let ram =
        GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false }).unwrap();
    // `ram` is declared first, so it is dropped after the address space.
    let (space, mmu, recorder) = memory_layer(&ram);
    for (size, base) in [(3u16, INFLATE), (16, RAM - 0x1000), (16, 0xd000_0000)] {
        let balloon = Balloon::new(mmu.clone(), &ram, BalloonConfig::default());
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(balloon, mmu.clone(), irq);
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &TestRing::new(size, base));
        driver_ok(&mut t);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0, "size {size} at {base:#x}");
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!((t.stats().queue_errors, t.stats().notify_errors, t.stats().activations), (1, 1, 0));
    }
    assert!(recorder.take().is_empty());
    drop(mmu);
    drop(space);
}

#[test]
fn ring_that_becomes_bad_sets_needs_reset() {
    let mut f = fixture(false);
    // The driver claims 100 entries on a 16-entry queue.
    f.mem().write_obj(100u16, GuestAddress(INFLATE + 0x1000 + 2)).unwrap();
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_ne!(f.t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, INTERRUPT_CONFIG_CHANGE);
    assert!(f.recorder.take().is_empty());
    // Notifies are ignored until reset; reset clears it.
    w32(&mut f.t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(f.t.stats().notify_errors, 1);
    w32(&mut f.t, reg::STATUS, 0);
    assert_eq!(f.t.status(), 0);
}

#[test]
fn config_target_actual_and_generation() {
    let mut f = fixture(false);
    let generation = r32(&mut f.t, reg::CONFIG_GENERATION);
    f.t.update_config(|b| b.set_target_pages(1234));
    assert_eq!(r32(&mut f.t, 0x100), 1234);
    assert_ne!(r32(&mut f.t, reg::CONFIG_GENERATION), generation);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(f.interrupts(), 1);
    w32(&mut f.t, 0x104, 77);
    assert_eq!(r32(&mut f.t, 0x104), 77);
    // num_pages is read-only for the driver.
    w32(&mut f.t, 0x100, 5);
    assert_eq!(r32(&mut f.t, 0x100), 1234);
    let s = f.stats();
    assert_eq!((s.target_pages, s.actual_pages, s.errors.config_write), (1234, 77, 1));
    // Reset forgets the guest's balloon, keeps the host's target.
    f.send_pfns(0, 0, &[0x300]);
    w32(&mut f.t, reg::STATUS, 0);
    let s = f.stats();
    assert_eq!((s.target_pages, s.actual_pages, s.ballooned_pages), (1234, 0, 0));
    serde_json::to_string(&s).unwrap();
}

#[test]
fn stats_queue_keeps_latest_and_holds_the_buffer() {
    let mut f = fixture(false);
    let entries: Vec<u8> = [(4u16, 1000u64), (5, 2000), (99, 7)]
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    f.mem().write_slice(&entries, GuestAddress(ARRAYS)).unwrap();
    let mem = f.ram.memory().clone();
    f.rings[2].set_desc(&mem, 0, ARRAYS, entries.len() as u32, 0, 0);
    f.rings[2].push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 2);
    let s = f.stats();
    assert_eq!(s.guest_stats_updates, 1);
    assert_eq!(s.guest_stats["free_memory"], 1000);
    assert_eq!(s.guest_stats["total_memory"], 2000);
    assert_eq!(s.guest_stats["tag_99"], 7);
    assert_eq!(f.rings[2].used_idx(f.mem()), 0, "held until the VMM asks");
    assert!(f.t.device_mut().request_guest_stats().unwrap());
    assert_eq!(f.rings[2].used_idx(f.mem()), 1);
    assert_eq!(f.interrupts(), 1);
    assert!(!f.t.device_mut().request_guest_stats().unwrap(), "nothing held any more");
}

#[test]
fn free_page_reports_are_discarded_and_checked() {
    let mut f = fixture(false);
    f.fill(0x400, 0x200);
    let mem = f.ram.memory().clone();
    // Two adjacent ranges (one discard), one elsewhere, one unaligned, one beyond RAM.
    let w = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
    f.rings[3].set_desc(&mem, 0, 0x400000, 0x100000, w, 1);
    f.rings[3].set_desc(&mem, 1, 0x500000, 0x100000, w, 2);
    f.rings[3].set_desc(&mem, 2, 0x800000, 0x1000, w, 3);
    f.rings[3].set_desc(&mem, 3, 0x900800, 0x1000, w, 4);
    f.rings[3].set_desc(&mem, 4, RAM - 0x1000, 0x2000, VIRTQ_DESC_F_WRITE, 0);
    f.rings[3].push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 3);
    assert_eq!(f.recorder.take(), [(0x400000, 0x600000), (0x800000, 0x801000)]);
    assert!(f.page_is(0x4ff, 0));
    let s = f.stats();
    assert_eq!((s.reported_ranges, s.reported_bytes, s.errors.bad_report_range), (2, 0x201000, 2));
    assert_eq!(s.report_requests, 1, "one scatter list, bad ranges included");
    assert_eq!(s.ballooned_pages, 0, "reported pages are not ballooned");
    assert_eq!(f.rings[3].used_idx(f.mem()), 1);
}

#[test]
fn free_page_reports_of_the_hotplug_region_are_refused() {
    // Regression (found by tests/parsers.rs and fuzz_balloon_queue): the reporting queue
    // checked ranges against the table only, which also covers virtio-mem's region. Without
    // virtio-mem's plugged map shared (no virtio-mem device, as here) that region is not the
    // balloon's at all; with it, only its plugged blocks are (the next test).
    let config = MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false };
    let mut f = fixture_on(GuestRam::with_hotplug(config, 4 << 20).unwrap());
    let hotplug = f.ram.hotplug().unwrap().0;
    assert!(f.mmu.host_range(hotplug, 0x2000).is_some(), "the table covers the region");
    let mem = f.ram.memory().clone();
    let w = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
    f.rings[3].set_desc(&mem, 0, hotplug, 0x1000, w, 1);
    f.rings[3].set_desc(&mem, 1, hotplug + 0x1000, 0x100000, w, 2);
    f.rings[3].set_desc(&mem, 2, 0x400000, 0x1000, VIRTQ_DESC_F_WRITE, 0);
    f.rings[3].push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 3);
    assert_eq!(f.recorder.take(), [(0x400000, 0x401000)], "only the range in RAM");
    let s = f.stats();
    assert_eq!((s.reported_ranges, s.errors.bad_report_range), (1, 2));
}

#[test]
fn plugged_virtio_mem_blocks_can_be_inflated_and_reported_unplugged_ones_cannot() {
    // Linux's driver inflates from hot-plugged memory and reports its free blocks: with
    // virtio-mem's map shared, the balloon takes pages of plugged blocks and refuses the rest.
    let config = MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false };
    let mut f = fixture_on(GuestRam::with_hotplug(config, 4 << 20).unwrap());
    let hotplug = f.ram.hotplug().unwrap().0;
    let plugged = Arc::new(PluggedBlocks::new(hotplug, 2 << 20, 2));
    f.t.device_mut().share_plugged_blocks(plugged.clone());
    plugged.set(0, true);
    // The recorder names ranges by their offset from the first RAM region's host mapping.
    let host_base = f.ram.regions().next().unwrap().1;
    let mmu = f.mmu.clone();
    let recorded = move |gpa: u64, len: u64| {
        let start = (mmu.host_range(gpa, len).unwrap() as u64).wrapping_sub(host_base);
        (start, start.wrapping_add(len))
    };
    let mem = f.ram.memory().clone();
    let w = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
    // Reports: in block 0 (plugged), in block 1 (not), and across both.
    f.rings[3].set_desc(&mem, 0, hotplug, 0x2000, w, 1);
    f.rings[3].set_desc(&mem, 1, hotplug + (2 << 20), 0x1000, w, 2);
    f.rings[3].set_desc(&mem, 2, hotplug + (2 << 20) - 0x1000, 0x2000, VIRTQ_DESC_F_WRITE, 0);
    f.rings[3].push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 3);
    assert_eq!(f.recorder.take(), [recorded(hotplug, 0x2000)], "only the plugged block's range");
    assert_eq!((f.stats().reported_ranges, f.stats().errors.bad_report_range), (1, 2));
    // Inflate: a page of block 0 is taken; a request naming a page of block 1 is refused whole.
    let pfn = (hotplug / PAGE_SIZE) as u32;
    f.send_pfns(0, 0, &[pfn + 1]);
    assert_eq!(f.recorder.take(), [recorded(hotplug + 0x1000, 0x1000)]);
    assert!(f.t.device().is_ballooned(u64::from(pfn) + 1));
    f.send_pfns(0, 1, &[pfn + 2, pfn + 512]);
    assert!(f.recorder.take().is_empty(), "a request with an unplugged page reaches no syscall");
    let s = f.stats();
    assert_eq!((s.ballooned_pages, s.errors.pfn_unplugged), (1, 1));
    // A deflate is refused no PFN for its block's state, but once virtio-mem unplugged the
    // block its page is not ballooned any more (the unplug discarded it: P3).
    f.send_pfns(1, 0, &[pfn + 1]);
    assert_eq!((f.stats().ballooned_pages, f.stats().deflated_pages), (0, 1), "plugged: a deflate");
    f.send_pfns(0, 2, &[pfn + 3]);
    plugged.set(0, false);
    assert_eq!(f.stats().ballooned_pages, 0, "an unplugged block holds nothing");
    f.send_pfns(1, 1, &[pfn + 3]);
    let s = f.stats();
    assert_eq!((s.deflated_pages, s.forgotten_pages, s.errors.deflate_not_ballooned), (1, 1, 1));
    assert!(f.recorder.take().len() == 1, "the inflate of pfn + 3 only");
}

#[test]
fn pages_held_before_a_virtio_mem_unplug_are_forgotten_not_discarded_after_a_replug() {
    // On THP a partial 2 MiB block is held (B1). A guest that unplugs such a block (virtio-mem
    // discarded it whole) and plugs it again must not have the stale half counted towards a
    // whole block, nor discarded on a deflate, once it wrote new data there (P3).
    let config = MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: true };
    let mut f = fixture_on(GuestRam::with_hotplug(config, 4 << 20).unwrap());
    let hotplug = f.ram.hotplug().unwrap().0;
    let plugged = Arc::new(PluggedBlocks::new(hotplug, 2 << 20, 2));
    f.t.device_mut().share_plugged_blocks(plugged.clone());
    plugged.set(0, true);
    let first = (hotplug / PAGE_SIZE) as u32;
    let half: Vec<u32> = (first..first + 256).collect();
    f.send_pfns(0, 0, &half);
    assert!(f.recorder.take().is_empty(), "half a huge page: held");
    assert_eq!((f.stats().ballooned_pages, f.stats().held_pages), (256, 256));
    // virtio-mem unplugs block 0 (its own discard is not the balloon's) and plugs it again;
    // the guest writes the whole block.
    plugged.set(0, false);
    assert_eq!((f.stats().ballooned_pages, f.stats().held_pages), (0, 0), "an unplugged block holds nothing");
    plugged.set(0, true);
    f.mmu.write(hotplug, &vec![0xaa; 2 << 20]).unwrap();
    // The other half: 256 pages given, not 512, so no whole-block discard.
    let other: Vec<u32> = (first + 256..first + 512).collect();
    f.send_pfns(0, 1, &other);
    assert!(f.recorder.take().is_empty(), "the stale half counted towards a whole block");
    assert!(f.page_is(u64::from(first), 0xaa), "data written after the replug survives");
    let s = f.stats();
    assert_eq!((s.ballooned_pages, s.held_pages, s.forgotten_pages), (256, 256, 256));
    // A stale page deflated: not ballooned any more, and nothing discarded.
    f.send_pfns(1, 0, &[first]);
    assert!(f.recorder.take().is_empty());
    assert!(f.page_is(u64::from(first), 0xaa));
    assert_eq!(f.stats().errors.deflate_not_ballooned, 1);
}

#[test]
fn thp_blocks_are_discarded_whole_once_given_whole() {
    let mut f = fixture(true);
    f.fill(0x400, 0x300);
    // The block at 4 MiB in two requests of two notifies (Linux's pattern: 256 PFNs per
    // request, one request per kick), and half of the block at 6 MiB.
    let block: Vec<u32> = (0x400..0x600).collect();
    f.send_pfns(0, 0, &block[..256]);
    assert!(f.recorder.take().is_empty(), "half a huge page: held, not split");
    assert!(f.page_is(0x400, 0xaa), "held pages are not discarded yet");
    assert_eq!(f.stats().held_pages, 256);
    assert_eq!(f.rings[0].used_idx(f.mem()), 1, "a held request is still answered");
    f.send_pfns(0, 1, &block[256..]);
    assert_eq!(f.recorder.take(), [(0x400000, 0x600000)], "the whole block, once");
    assert!(f.page_is(0x400, 0) && f.page_is(0x5ff, 0));
    let half: Vec<u32> = (0x600..0x700).collect();
    f.send_pfns(0, 2, &half);
    assert!(f.recorder.take().is_empty());
    let s = f.stats();
    assert!(s.thp);
    assert_eq!((s.ballooned_pages, s.huge_blocks_full, s.huge_blocks_partial), (768, 1, 1));
    assert_eq!((s.discard_ranges, s.bytes_discarded, s.held_pages), (1, 2 << 20, 256));
    // Deflate one page of the full block (discarded: no syscall) and two held pages of the
    // partial one: those are discarded first, so every page got back reads zeros.
    f.send_pfns(1, 0, &[0x400, 0x600, 0x601]);
    assert_eq!(f.recorder.take(), [(0x600000, 0x602000)]);
    assert!(f.page_is(0x400, 0) && f.page_is(0x600, 0) && f.page_is(0x601, 0));
    assert!(f.page_is(0x602, 0xaa), "still held");
    let s = f.stats();
    assert_eq!((s.huge_blocks_full, s.huge_blocks_partial, s.held_pages), (0, 2, 254));
    // The rest of the 6 MiB block in one notify of two requests: the block is given whole
    // (the two pages deflated above came back and are given again).
    let rest: Vec<u32> = (0x700..0x800).collect();
    f.queue_pfns(0, 3, &[0x600, 0x601]);
    f.queue_pfns(0, 4, &rest);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.recorder.take(), [(0x600000, 0x800000)]);
    let s = f.stats();
    assert_eq!((s.huge_blocks_full, s.huge_blocks_partial, s.held_pages), (1, 1, 0));
    assert_eq!(s.errors.total(), 0);
}

/// All requests of one notify are coalesced into one set of runs, and the notifier acts on
/// each before any of the notify's heads is in the used ring (MUST_TELL_HOST).
#[test]
fn one_notify_is_one_set_of_runs_discarded_before_any_head_is_used() {
    struct UsedIdxAtDiscard {
        mem: Arc<crate::memory::GuestMemoryMmap>,
        used_idx_gpa: u64,
        seen: std::sync::Mutex<Vec<u16>>,
    }
    impl notifier::Subscriber for UsedIdxAtDiscard {
        fn invalidate_range_start(&self, _: &notifier::Range) -> Result<(), notifier::Refused> {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used_idx_gpa)).unwrap();
            self.seen.lock().unwrap().push(idx);
            Ok(())
        }
    }
    let mut f = fixture(false);
    let watcher = Arc::new(UsedIdxAtDiscard {
        mem: f.ram.memory().clone(),
        used_idx_gpa: f.rings[0].used + 2,
        seen: Default::default(),
    });
    f._space.subscribe(watcher.clone()).unwrap();
    f.fill(0x200, 0x10);
    // Three requests, adjacent across requests, plus a refused one in the middle.
    f.queue_pfns(0, 0, &[0x202, 0x203]);
    f.queue_pfns(0, 1, &[0x200, 0x201]);
    f.queue_pfns(0, 2, &[0x201, 0x1000]);
    f.queue_pfns(0, 3, &[0x204, 0x208]);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.recorder.take(), [(0x200000, 0x205000), (0x208000, 0x209000)]);
    assert_eq!(*watcher.seen.lock().unwrap(), [0, 0], "no head was used before the discards");
    assert_eq!(f.rings[0].used_idx(f.mem()), 4);
    assert_eq!(f.interrupts(), 1, "one interrupt for the notify");
    let s = f.stats();
    assert_eq!((s.inflate_requests, s.inflate_refused, s.inflated_pages), (3, 1, 6));
    assert_eq!((s.discard_ranges, s.bytes_discarded), (2, 0x6000));
    assert!(f.page_is(0x200, 0) && f.page_is(0x208, 0) && f.page_is(0x205, 0xaa));
    // A PFN in two requests of one notify is one discard; the second is a re-inflate.
    f.queue_pfns(0, 4, &[0x20a]);
    f.queue_pfns(0, 5, &[0x20a, 0x20b]);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.recorder.take(), [(0x20a000, 0x20c000)]);
    assert_eq!((f.stats().inflated_pages, f.stats().reinflated_pages), (8, 1));
}

/// The PFN arrays of all the requests of one notify are one read (`read_scattered`: one
/// system call on the table's syscall path) and the queue's rings are read once per notify;
/// nothing is translated per PFN or per request.
#[test]
fn a_notify_reads_each_pfn_array_once() {
    use crate::devices::virtio::queue::tests::Counting;
    let mut f = fixture(false);
    let counting = Arc::new(Counting::new(f.mmu.clone()));
    // Re-activate the queues with the counting view (the transport activated with the
    // table itself): reset, negotiate, set up, DRIVER_OK.
    let balloon = Balloon::new(f.mmu.clone(), &f.ram, BalloonConfig::default());
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mem: Arc<dyn GuestMemoryAccess> = counting.clone();
    let mut t = MmioTransport::new(balloon, mem, irq);
    assert!(negotiate(&mut t, 0));
    setup_queue(&mut t, 0, &f.rings[0]);
    setup_queue(&mut t, 1, &f.rings[1]);
    driver_ok(&mut t);
    counting.take();
    let pfns: Vec<u32> = (0x300..0x400).collect();
    for d in 0..4u16 {
        f.queue_pfns(0, d, &pfns[64 * d as usize..64 * (d as usize + 1)]);
    }
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    // Index, ring entries, descriptor table, the four arrays at once; then the index again
    // (empty).
    assert_eq!(counting.take(), (1 + 1 + 1 + 1 + 1, 2), "used elements and used index");
    assert_eq!(f.recorder.take(), [(0x300000, 0x400000)]);
    assert_eq!(t.device().stats().inflated_pages, 256);
}

#[test]
fn hugetlb_discards_whole_blocks_only() {
    let config = MemoryConfig { size: RAM, backend: MemoryBackend::Hugetlb, thp: false };
    let ram = match GuestRam::new(config) {
        Ok(ram) => ram,
        Err(e) => {
            eprintln!("skipped: no hugetlb guest RAM on this host ({e})");
            return;
        }
    };
    let mut f = fixture_on(ram);
    f.fill(0x400, 0x400);
    let block: Vec<u32> = (0x400..0x600).collect();
    f.send_pfns(0, 0, &block[..256]);
    assert!(f.recorder.take().is_empty(), "half a huge page: nothing discarded yet");
    assert!(f.page_is(0x400, 0xaa));
    f.send_pfns(0, 1, &block[256..]);
    assert_eq!(f.recorder.take(), [(0x400000, 0x600000)]);
    assert!(f.page_is(0x400, 0) && f.page_is(0x5ff, 0));
    let s = f.stats();
    assert_eq!((s.discard_failures, s.huge_blocks_full, s.ballooned_pages), (0, 1, 512));
    // A report trimmed to the whole block inside it.
    let mem = f.ram.memory().clone();
    f.rings[3].set_desc(&mem, 0, 0x5ff000, 0x202000, VIRTQ_DESC_F_WRITE, 0);
    f.rings[3].push(&mem, 0);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 3);
    assert_eq!(f.recorder.take(), [(0x600000, 0x800000)]);
    assert!(f.page_is(0x7ff, 0) && f.page_is(0x800, 0xaa));
}

#[test]
fn unoffered_balloon_features_are_refused() {
    let ram =
        GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false }).unwrap();
    // SAFETY: `ram` is declared first, so it is dropped after the address space.
    let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.unwrap();
    let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).unwrap());
    let config = BalloonConfig { stats: false, free_page_reporting: false, ..Default::default() };
    let balloon = Balloon::new(mmu.clone(), &ram, config);
    assert_eq!(balloon.queue_max_sizes().len(), 2);
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(balloon, mmu.clone(), irq);
    assert!(!negotiate(&mut t, 1 << VIRTIO_BALLOON_F_STATS_VQ));
    let _: &dyn BusDevice = &t;
}
