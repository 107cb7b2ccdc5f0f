//! `zapvm bench balloon`: inflate and deflate throughput of the virtio-balloon, against raw
//! `madvise(MADV_DONTNEED)` of the same pages in the same run. Entry point: [`run`].
//!
//! Measured host-side, without a VM: guest RAM ([`GuestRam`], anonymous; 4 KiB pages, and a THP
//! variant), the notifier [`notifier::AddressSpace`] over it, the VMM's table ([`GuestMmu`]),
//! and the [`Balloon`] behind its [`MmioTransport`]. A simulated driver negotiates and sets up
//! the inflate and deflate queues through MMIO register writes (as the device's unit tests do),
//! then, for each batch, writes up to `pfns_per_buffer` 32-bit PFNs per buffer (Linux sends 256
//! per request), makes `buffers_per_notify` buffers available, writes QueueNotify, and consumes
//! the used ring. The driver writes its rings and PFN arrays straight into guest memory (it is
//! the guest); the device reads them through the table, as in production. The rings and arrays
//! live in the first 2 MiB of guest RAM; the pages ballooned are the rest, in whole batches.
//!
//! # What one round does
//! 1. Fresh guest RAM, notifier, table and device (a range of THP-backed memory discarded in
//!    4 KiB pieces refaults in 4 KiB pages, one discarded in whole huge pages refaults huge: the
//!    variants' previous round must not decide their memory state). Populate: touch every
//!    ballooned page (untimed), so that every discard frees real memory.
//! 2. Inflate, interleaved batch by batch: the variants take turns batch by batch, in one of
//!    the six orders of the three (round `r` uses order `r % 6`), so that they see the same
//!    memory state, and each goes first and follows each other one equally often over six
//!    rounds:
//!    - `inflate`: the device. Timed: the QueueNotify write only, i.e. everything the VMM does
//!      for the batch (popping the notify's chains with one read each of the ring and the
//!      descriptor table, one read per PFN array, validating, sorting and coalescing the PFNs of
//!      **all the notify's requests as one set**, one notifier discard per run — start,
//!      madvise, end — the bitmap, one used-ring update and the interrupt). Staging the buffers
//!      and reaping the used ring is the guest's work and is not timed. On THP memory the device
//!      discards a 2 MiB block once it was given whole and holds the pages of partial blocks
//!      (the balloon's invariant B1), so its calls can be fewer than either raw pattern's.
//!    - `raw` (the baseline of `inflate_vs_raw`): bare `madvise(MADV_DONTNEED)` calls with each
//!      request on its own, its PFNs sorted and coalesced into contiguous runs, one call per
//!      run: what a VMM that handles requests one by one issues (and what this device did
//!      before it coalesced across requests). Contiguous PFNs: one 1 MiB call per 256-PFN
//!      request. Scattered PFNs: (almost always) one call per page. The host ranges are
//!      computed before the clock starts; only the syscalls are timed.
//!    - `raw_batch` (the best raw baseline, and the device's own call pattern on 4 KiB pages):
//!      the whole batch's PFNs (all `buffers_per_notify` requests) sorted and coalesced as one
//!      set, one call per run. Contiguous PFNs: one call for the whole batch (8 MiB with the
//!      defaults). Scattered: as `raw`, give or take the rare PFNs adjacent across requests.
//! 3. Deflate: the pages the device inflated, in the same requests, through the deflate queue
//!    (timed as inflate). No syscall: for anonymous memory deflate is bookkeeping only.
//! 4. Empty inflate: every page is discarded now; all batches are inflated again, the device
//!    and `raw` taking turns, so that the madvise finds nothing to free: what is left is the
//!    device's fixed cost per request (`empty_inflate_ns_per_request` vs
//!    `empty_raw_ns_per_request`).
//!
//! Each variant's throughput in a round is the batch's bytes over its **median batch time** in
//! that round (GiB/s of pages ballooned, 1 GiB = 2^30 bytes; the median, because on a shared
//! host a batch the scheduler preempted is an outlier, not a cost). Reported: medians over the
//! rounds; `inflate_vs_raw` and `inflate_vs_raw_batch` are medians of the per-round ratios
//! (paired within a round), > 1 meaning the device is faster. Patterns: `contiguous` (ascending
//! PFNs) and `scattered` (a random permutation of all ballooned PFNs, fixed seed, so a request
//! holds 256 pages from all over guest RAM). Targets (issue 13), for contiguous PFNs:
//! `inflate_vs_raw >= 0.95` on 4 KiB pages and `>= 0.9` on THP; and an empty request's
//! overhead over raw (`empty_overhead_ns_per_request`) of at most 1.5 us.
//!
//! Linux's driver makes one request per kick and waits for it (`tell_host`); several buffers per
//! notify (8 by default) amortise the notify's own fixed costs (the interrupt's eventfd write,
//! the final look at the available index) over several requests.
//!
//! Not measured: the userfaultfd monitor (a real `zapvm run` registers guest RAM with it, which
//! adds to every madvise of guest RAM, the device's and a raw one alike: `zapvm bench
//! notifier`'s `uffd_overhead`), the vCPU exit for the notify, and the irqfd delivery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bench::median;
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, VIRTIO_BALLOON_F_MUST_TELL_HOST};
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::devices::virtio::{status, VirtioInterrupt};
use vmm::devices::BusDevice;
use vmm::memory::{GuestMemoryMmap, GuestRam, MemoryBackend, MemoryConfig, HUGE_PAGE_SIZE, PAGE_SIZE};
use vmm::mmu::GuestMmu;

/// Guest-physical layout of the simulated driver (all inside the first 2 MiB block, which is
/// never ballooned).
const INFLATE_RING: u64 = 0x1_0000;
const DEFLATE_RING: u64 = 0x2_0000;
const ARRAYS: u64 = 0x10_0000;
const ARRAYS_END: u64 = 0x20_0000;
/// First ballooned guest-physical address (2 MiB aligned, so THP blocks line up).
const TARGET_START: u64 = HUGE_PAGE_SIZE;
/// Size of both queues.
const RING_SIZE: u16 = 256;
/// The variants' order in each round (0 device, 1 raw, 2 raw_batch): all six permutations, so
/// that no variant always follows the same other one.
const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]];
/// Target `inflate_vs_raw` for contiguous PFNs on 4 KiB pages (issue 13).
pub const TARGET_INFLATE_VS_RAW_ANON: f64 = 0.95;
/// Target `inflate_vs_raw` for contiguous PFNs on THP (issue 13).
pub const TARGET_INFLATE_VS_RAW_THP: f64 = 0.9;
/// Target of an empty request's overhead over raw, ns (issue 13).
pub const TARGET_EMPTY_OVERHEAD_NS: f64 = 1500.0;

/// The `inflate_vs_raw` target for contiguous PFNs on `backing` (`anon` or `thp`).
pub fn target_inflate_vs_raw(backing: &str) -> f64 {
    if backing == "thp" {
        TARGET_INFLATE_VS_RAW_THP
    } else {
        TARGET_INFLATE_VS_RAW_ANON
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BalloonBenchOptions {
    /// `quick` or `full` (a label for the report).
    pub mode: String,
    /// Guest RAM bytes (the first 2 MiB hold the driver's rings; the rest is ballooned).
    pub ram: u64,
    /// Rounds per case (medians are reported).
    pub rounds: usize,
    /// PFNs per buffer (Linux: 256).
    pub pfns_per_buffer: usize,
    /// Buffers made available per QueueNotify.
    pub buffers_per_notify: usize,
    /// Seed of the scattered permutation.
    pub seed: u64,
    /// Also run the THP-backed variant.
    pub thp: bool,
}

impl BalloonBenchOptions {
    /// Quick mode: 128 MiB of guest RAM, 6 rounds.
    pub fn quick() -> Self {
        Self { mode: "quick".into(), ram: 128 << 20, rounds: 6, ..Self::full() }
    }

    /// Full mode: 1 GiB of guest RAM, 12 rounds, 256 PFNs per buffer, 8 buffers per notify.
    pub fn full() -> Self {
        Self {
            mode: "full".into(),
            ram: 1 << 30,
            rounds: 12,
            pfns_per_buffer: 256,
            buffers_per_notify: 8,
            seed: 0xba11_0070,
            thp: true,
        }
    }
}

/// One case (backing x pattern): medians over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct BalloonBenchRow {
    /// `anon` (4 KiB pages) or `thp`.
    pub backing: String,
    /// `contiguous` or `scattered`.
    pub pattern: String,
    /// Pages ballooned per round (all variants together).
    pub pages_per_round: u64,
    /// Inflate through the device, GiB/s of pages ballooned (batch bytes / median batch time).
    pub inflate_gib_s: f64,
    /// Raw madvise, one call per run the device discards (same call pattern), GiB/s.
    pub raw_gib_s: f64,
    /// Median of the per-round inflate_gib_s / raw_gib_s (targets for contiguous PFNs: 0.95 on
    /// 4 KiB pages, 0.9 on THP).
    pub inflate_vs_raw: f64,
    /// Raw madvise with each batch's PFNs coalesced as one set (contiguous: one call per batch),
    /// GiB/s.
    pub raw_batch_gib_s: f64,
    /// Median of the per-round inflate_gib_s / raw_batch_gib_s.
    pub inflate_vs_raw_batch: f64,
    /// Deflate through the device (bookkeeping only), GiB/s.
    pub deflate_gib_s: f64,
    /// Discards (madvise calls) the device issued per request.
    pub calls_per_request: f64,
    /// madvise calls per request in `raw`'s pattern.
    pub raw_calls_per_request: f64,
    /// madvise calls per batch in `raw_batch`'s pattern.
    pub batch_calls_per_notify: f64,
    /// Device inflate ns per request minus `raw_batch` ns per request: what the VMM adds per
    /// request over the best raw pattern (median over rounds).
    pub overhead_ns_per_request: f64,
    /// Device inflate ns per request when the pages are already discarded (the madvise finds
    /// nothing to free): the device's fixed cost per request plus an empty madvise per run.
    pub empty_inflate_ns_per_request: f64,
    /// Raw madvise ns per request (`raw`'s calls) on already discarded pages.
    pub empty_raw_ns_per_request: f64,
    /// `empty_inflate_ns_per_request - empty_raw_ns_per_request` (median of the per-round
    /// differences): the device's fixed cost per request (target <= 1.5 us).
    pub empty_overhead_ns_per_request: f64,
    /// Device deflate ns per request.
    pub deflate_ns_per_request: f64,
    /// Smallest fraction of the ballooned pages that were THP-backed after populating
    /// (process-wide AnonHugePages growth; 0 for 4 KiB backing).
    pub thp_backed_fraction: f64,
}

/// Everything, serialisable to the JSON `zapvm bench balloon` writes.
#[derive(Clone, Debug, Serialize)]
pub struct BalloonBenchReport {
    /// `quick` or `full`.
    pub mode: String,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Rounds per case.
    pub rounds: usize,
    /// PFNs per buffer.
    pub pfns_per_buffer: usize,
    /// Buffers per notify.
    pub buffers_per_notify: usize,
    /// All cases.
    pub rows: Vec<BalloonBenchRow>,
    /// `backing/pattern` -> inflate_vs_raw.
    pub inflate_vs_raw: BTreeMap<String, f64>,
    /// `backing/pattern` -> inflate_vs_raw_batch.
    pub inflate_vs_raw_batch: BTreeMap<String, f64>,
    /// `backing` -> whether contiguous inflate_vs_raw >= [`target_inflate_vs_raw`].
    pub target_met_contiguous: BTreeMap<String, bool>,
    /// `backing` -> whether the contiguous empty-request overhead <= [`TARGET_EMPTY_OVERHEAD_NS`].
    pub target_met_empty_overhead: BTreeMap<String, bool>,
}

/// Process-wide AnonHugePages in bytes.
fn anon_huge_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// splitmix64, for the fixed-seed permutation.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn shuffle(v: &mut [u32], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn r32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn w32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// `madvise(MADV_DONTNEED)` of `[hva, hva + len)` inside guest RAM, bypassing the notifier.
fn madvise_dontneed(hva: usize, len: usize) -> Result<(), String> {
    // SAFETY: callers pass ranges of ballooned guest RAM (computed by the table's `host_range`),
    // which the rig keeps mapped. Dropping their contents is what the benchmark wants; no Rust
    // reference into guest RAM exists (it is touched through vm-memory's volatile accessors),
    // and no translation of the ballooned pages can be cached by the VMM's table, which only
    // ever translated the driver's rings in the first 2 MiB.
    let r = unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("madvise({hva:#x}, {len:#x}) failed: {}", std::io::Error::last_os_error()))
    }
}

/// The driver's side of one split queue, written straight into guest memory (it is the guest).
struct DriverRing {
    queue: u32,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
    /// Heads made available and not yet reaped, in order.
    in_flight: Vec<u16>,
}

impl DriverRing {
    /// Rings at `base`: descriptors, the available ring at +0x1000, the used ring at +0x2000.
    fn new(queue: u32, base: u64) -> Self {
        Self {
            queue,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_idx: 0,
            in_flight: Vec::new(),
        }
    }

    /// QueueSel, QueueNum, the three ring addresses, QueueReady.
    fn setup(&self, dev: &mut dyn BusDevice) {
        w32(dev, reg::QUEUE_SEL, self.queue);
        w32(dev, reg::QUEUE_NUM, RING_SIZE as u32);
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, self.desc),
            (reg::QUEUE_DRIVER_LOW, self.avail),
            (reg::QUEUE_DEVICE_LOW, self.used),
        ] {
            w32(dev, lo, addr as u32);
            w32(dev, lo + 4, (addr >> 32) as u32);
        }
        w32(dev, reg::QUEUE_READY, 1);
    }

    /// One buffer per request (descriptor `i` -> PFN array `i`), made available, index
    /// published. The caller then notifies.
    fn post(&mut self, mem: &GuestMemoryMmap, requests: &[&[u32]], spacing: u64) -> Result<(), String> {
        let err = |e: vm_memory::GuestMemoryError| format!("driver write failed: {e}");
        let mut bytes = Vec::new();
        for (i, pfns) in requests.iter().enumerate() {
            let array = ARRAYS + spacing * i as u64;
            bytes.clear();
            bytes.extend(pfns.iter().flat_map(|p| p.to_le_bytes()));
            mem.write_slice(&bytes, GuestAddress(array)).map_err(err)?;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&array.to_le_bytes());
            d[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            // flags 0 (device-readable, no next), next 0.
            mem.write_slice(&d, GuestAddress(self.desc + 16 * i as u64)).map_err(err)?;
            let slot = self.avail + 4 + 2 * (self.avail_idx % RING_SIZE) as u64;
            mem.write_obj(i as u16, GuestAddress(slot)).map_err(err)?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.in_flight.push(i as u16);
        }
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).map_err(err)
    }

    /// Consumes the used ring; every buffer posted must have come back, in order.
    fn reap(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let err = |e: vm_memory::GuestMemoryError| format!("driver read failed: {e}");
        let used: u16 = mem.read_obj(GuestAddress(self.used + 2)).map_err(err)?;
        if used != self.avail_idx {
            return Err(format!(
                "queue {}: the device used {} of {} buffers",
                self.queue,
                used.wrapping_sub(self.used_idx),
                self.in_flight.len()
            ));
        }
        for head in self.in_flight.drain(..) {
            let at = self.used + 4 + 8 * (self.used_idx % RING_SIZE) as u64;
            let id: u32 = mem.read_obj(GuestAddress(at)).map_err(err)?;
            if id != head as u32 {
                return Err(format!("queue {}: used id {id}, expected {head}", self.queue));
            }
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        Ok(())
    }
}

/// Guest RAM, the notifier, the table, and the balloon behind its transport with both queues
/// set up by the simulated driver. Field order is drop order: guest RAM goes last.
struct Rig {
    t: MmioTransport<Balloon>,
    inflate: DriverRing,
    deflate: DriverRing,
    mmu: Arc<GuestMmu>,
    _space: Arc<notifier::AddressSpace>,
    ram: GuestRam,
}

impl Rig {
    fn new(ram_bytes: u64, thp: bool) -> Result<Self, String> {
        let ram = GuestRam::new(MemoryConfig { size: ram_bytes, backend: MemoryBackend::Anonymous, thp })
            .map_err(|e| format!("guest RAM: {e}"))?;
        // SAFETY: `ram` outlives the address space (the rig drops it last) and stays mapped; the
        // benchmark touches guest RAM only through vm-memory, the table, and madvise of the
        // ballooned pages (see `madvise_dontneed`).
        let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }
            .map_err(|e| format!("notifier: {e}"))?;
        let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).map_err(|e| format!("table: {e}"))?);
        let config = BalloonConfig {
            must_tell_host: true,
            stats: false,
            deflate_on_oom: false,
            free_page_reporting: false,
        };
        let balloon = Balloon::new(mmu.clone(), &ram, config);
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let mut t = MmioTransport::new(balloon, mmu.clone(), Arc::new(VirtioInterrupt::new(evt)));
        // What the driver does at probe: ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
        // DRIVER_OK.
        let features = (1u64 << VIRTIO_BALLOON_F_MUST_TELL_HOST) | (1 << 32);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, features as u32);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if r32(&mut t, reg::STATUS) & status::FEATURES_OK == 0 {
            return Err("the balloon refused FEATURES_OK".into());
        }
        let inflate = DriverRing::new(0, INFLATE_RING);
        let deflate = DriverRing::new(1, DEFLATE_RING);
        inflate.setup(&mut t);
        deflate.setup(&mut t);
        let s = r32(&mut t, reg::STATUS);
        w32(&mut t, reg::STATUS, s | status::DRIVER_OK);
        if t.stats().activations != 1 || t.stats().errors() != 0 {
            return Err(format!("the balloon did not activate: {:?}", t.stats()));
        }
        Ok(Self { t, inflate, deflate, mmu, _space: space, ram })
    }

    fn mem(&self) -> Arc<GuestMemoryMmap> {
        self.ram.memory().clone()
    }

    /// Posts `requests` on the inflate (queue 0) or deflate (queue 1) ring, times the
    /// QueueNotify write, reaps. Returns the ns of the notify.
    fn batch(&mut self, queue: u32, requests: &[&[u32]], spacing: u64) -> Result<u128, String> {
        let mem = self.mem();
        let ring = if queue == 0 { &mut self.inflate } else { &mut self.deflate };
        ring.post(&mem, requests, spacing)?;
        let t = Instant::now();
        w32(&mut self.t, reg::QUEUE_NOTIFY, queue);
        let ns = t.elapsed().as_nanos();
        let ring = if queue == 0 { &mut self.inflate } else { &mut self.deflate };
        ring.reap(&mem)?;
        // The driver's interrupt handler.
        let pending = r32(&mut self.t, reg::INTERRUPT_STATUS);
        w32(&mut self.t, reg::INTERRUPT_ACK, pending);
        Ok(ns)
    }

    /// Touches every page of `pfns` (one byte each).
    fn populate(&self, first_pfn: u64, pages: u64) -> Result<(), String> {
        let mem = self.ram.memory();
        for pfn in first_pfn..first_pfn + pages {
            mem.write_obj(1u8, GuestAddress(pfn * PAGE_SIZE)).map_err(|e| format!("populate: {e}"))?;
        }
        Ok(())
    }

    /// The host ranges the device discards for `pfns`: sorted, coalesced into runs (split where
    /// a guest RAM region ends), as `Balloon` does.
    fn host_runs(&self, pfns: &[u32]) -> Result<Vec<(usize, usize)>, String> {
        let mut sorted: Vec<u64> = pfns.iter().map(|&p| p as u64).collect();
        sorted.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for pfn in sorted {
            let gpa = pfn * PAGE_SIZE;
            if let Some((start, len)) = runs.last_mut() {
                if *start + *len == gpa && self.mmu.host_range(*start, *len + PAGE_SIZE).is_some() {
                    *len += PAGE_SIZE;
                    continue;
                }
            }
            runs.push((gpa, PAGE_SIZE));
        }
        runs.into_iter()
            .map(|(gpa, len)| {
                self.mmu
                    .host_range(gpa, len)
                    .map(|hva| (hva, len as usize))
                    .ok_or_else(|| format!("guest range {gpa:#x}+{len:#x} is not RAM"))
            })
            .collect()
    }
}

/// Per-batch plans, computed before any clock starts.
struct BatchPlan {
    /// The device's discards (= `raw`'s calls): per request, sorted and coalesced.
    same: Vec<(usize, usize)>,
    /// `raw_batch`'s calls: the whole batch sorted and coalesced.
    batch: Vec<(usize, usize)>,
}

fn run_case(
    o: &BalloonBenchOptions,
    thp: bool,
    scattered: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<BalloonBenchRow, String> {
    let backing = if thp { "thp" } else { "anon" };
    let pattern = if scattered { "scattered" } else { "contiguous" };
    let spacing = (o.pfns_per_buffer as u64 * 4).next_multiple_of(64);
    let batch_pages = o.pfns_per_buffer * o.buffers_per_notify;
    let first_pfn = TARGET_START / PAGE_SIZE;
    let batches = ((o.ram - TARGET_START) / PAGE_SIZE) as usize / batch_pages;
    if batches < 3 {
        return Err(format!(
            "{} MiB of guest RAM holds {batches} batches of {batch_pages} pages; at least 3 are needed",
            o.ram >> 20
        ));
    }
    let pages = (batches * batch_pages) as u64;
    let mut order: Vec<u32> = (0..pages).map(|i| (first_pfn + i) as u32).collect();
    if scattered {
        shuffle(&mut order, o.seed);
    }
    let requests_per_batch = batch_pages.div_ceil(o.pfns_per_buffer) as f64;
    let batch_bytes = batch_pages as u64 * PAGE_SIZE;
    let requests = |i: usize| -> Vec<&[u32]> {
        order[i * batch_pages..(i + 1) * batch_pages].chunks(o.pfns_per_buffer).collect()
    };

    let (mut inflate, mut raw, mut raw_batch, mut deflate) = (vec![], vec![], vec![], vec![]);
    let (mut vs_raw, mut vs_batch, mut overhead, mut deflate_req_ns) = (vec![], vec![], vec![], vec![]);
    let (mut calls_per_request, mut raw_calls, mut batch_calls) = (vec![], vec![], vec![]);
    let (mut empty_inflate, mut empty_raw_ns, mut empty_overhead) = (vec![], vec![], vec![]);
    let mut thp_fraction = f64::INFINITY;
    for round in 0..o.rounds {
        // Fresh guest RAM and device every round: on THP-backed memory a range discarded in
        // 4 KiB pieces keeps its page table and refaults in 4 KiB pages, while a range discarded
        // in whole huge pages refaults huge, so reusing RAM would give the variants different
        // memory states in the next round.
        let mut rig = Rig::new(o.ram, thp)?;
        let mut plans = Vec::with_capacity(batches);
        for batch in order.chunks(batch_pages) {
            let mut same = Vec::new();
            for request in batch.chunks(o.pfns_per_buffer) {
                same.extend(rig.host_runs(request)?);
            }
            plans.push(BatchPlan { same, batch: rig.host_runs(batch)? });
        }
        let huge_before = anon_huge_bytes();
        rig.populate(first_pfn, pages)?;
        let fraction = anon_huge_bytes().saturating_sub(huge_before) as f64 / (pages * PAGE_SIZE) as f64;
        thp_fraction = thp_fraction.min(fraction.min(1.0));

        let before = rig.t.device().stats();
        // Per variant: ns of each batch, madvise calls of each batch.
        let mut ns: [Vec<f64>; 3] = Default::default();
        let mut calls: [Vec<f64>; 3] = Default::default();
        let mut device_batches = Vec::new();
        // The device's discards on 4 KiB pages: one per run of the whole notify (raw_batch's
        // calls).
        let mut expected_calls = 0.0;
        for (i, plan) in plans.iter().enumerate() {
            let variant = ORDERS[round % ORDERS.len()][i % 3];
            match variant {
                0 => {
                    let discards_before = rig.t.device().stats().discard_ranges;
                    ns[0].push(rig.batch(0, &requests(i), spacing)? as f64);
                    calls[0].push((rig.t.device().stats().discard_ranges - discards_before) as f64);
                    expected_calls += plan.batch.len() as f64;
                    device_batches.push(i);
                }
                _ => {
                    let list = if variant == 1 { &plan.same } else { &plan.batch };
                    let t = Instant::now();
                    for &(hva, len) in list {
                        madvise_dontneed(hva, len)?;
                    }
                    ns[variant].push(t.elapsed().as_nanos() as f64);
                    calls[variant].push(list.len() as f64);
                }
            }
        }
        // The device must have discarded or held every page it was given, and on 4 KiB pages
        // done exactly what `raw_batch` did.
        let after = rig.t.device().stats();
        let device_pages = (device_batches.len() * batch_pages) as u64;
        let discards = after.discard_ranges - before.discard_ranges;
        let expected = if thp { calls[0].iter().sum() } else { expected_calls };
        let accounted = (after.bytes_discarded - before.bytes_discarded) / PAGE_SIZE + after.held_pages;
        if after.inflated_pages - before.inflated_pages != device_pages
            || discards as f64 != expected
            || accounted != device_pages
            || after.errors.total() != 0
            || after.discard_failures != 0
            || rig.t.stats().needs_reset != 0
        {
            return Err(format!(
                "{backing}/{pattern}: the device inflated {} pages in {discards} discards, expected \
                 {device_pages} in {expected}; errors {:?}, {} discard failures, transport {:?}",
                after.inflated_pages - before.inflated_pages,
                after.errors,
                after.discard_failures,
                rig.t.stats()
            ));
        }

        let mut deflate_ns = Vec::new();
        for &i in &device_batches {
            deflate_ns.push(rig.batch(1, &requests(i), spacing)? as f64);
        }
        let s = rig.t.device().stats();
        if s.deflated_pages - after.deflated_pages != device_pages
            || s.ballooned_pages != 0
            || s.errors.total() != 0
        {
            return Err(format!(
                "{backing}/{pattern}: deflate left {} pages ballooned: {:?}",
                s.ballooned_pages, s.errors
            ));
        }
        // Every page is discarded now: inflate all of them again, device and `raw` taking turns,
        // to see the device's fixed cost per request without the kernel's cost of freeing.
        let mut empty: [Vec<f64>; 2] = Default::default();
        for (i, plan) in plans.iter().enumerate() {
            let variant = (i + round) % 2;
            if variant == 0 {
                empty[0].push(rig.batch(0, &requests(i), spacing)? as f64);
            } else {
                let t = Instant::now();
                for &(hva, len) in &plan.same {
                    madvise_dontneed(hva, len)?;
                }
                empty[1].push(t.elapsed().as_nanos() as f64);
            }
        }
        // Drain the interrupt eventfd (KVM's irqfd would have consumed it).
        let _ = rig.t.interrupt().eventfd().read();

        // The median batch of each variant: a batch the scheduler preempted is an outlier.
        let [dev, same, whole] = ns.map(median);
        let [dev_calls, same_calls, whole_calls] = calls.map(median);
        let deflate_batch = median(deflate_ns);
        let g = |batch_ns: f64| batch_bytes as f64 / (1u64 << 30) as f64 / (batch_ns / 1e9);
        let (gi, gr, gb, gd) = (g(dev), g(same), g(whole), g(deflate_batch));
        inflate.push(gi);
        raw.push(gr);
        raw_batch.push(gb);
        deflate.push(gd);
        vs_raw.push(gi / gr);
        vs_batch.push(gi / gb);
        overhead.push((dev - whole) / requests_per_batch);
        let [empty_dev, empty_raw] = empty.map(median);
        empty_inflate.push(empty_dev / requests_per_batch);
        empty_raw_ns.push(empty_raw / requests_per_batch);
        empty_overhead.push((empty_dev - empty_raw) / requests_per_batch);
        deflate_req_ns.push(deflate_batch / requests_per_batch);
        calls_per_request.push(dev_calls / requests_per_batch);
        raw_calls.push(same_calls / requests_per_batch);
        batch_calls.push(whole_calls);
        progress(&format!(
            "bench balloon: {backing} {pattern} round {}/{}: inflate {gi:.2} GiB/s, raw {gr:.2} GiB/s \
             (x{:.3}), raw batch {gb:.2} GiB/s (x{:.3}), deflate {gd:.1} GiB/s, THP {fraction:.2}",
            round + 1,
            o.rounds,
            gi / gr,
            gi / gb
        ));
    }
    Ok(BalloonBenchRow {
        backing: backing.into(),
        pattern: pattern.into(),
        pages_per_round: pages,
        inflate_gib_s: median(inflate),
        raw_gib_s: median(raw),
        inflate_vs_raw: median(vs_raw),
        raw_batch_gib_s: median(raw_batch),
        inflate_vs_raw_batch: median(vs_batch),
        deflate_gib_s: median(deflate),
        calls_per_request: median(calls_per_request),
        raw_calls_per_request: median(raw_calls),
        batch_calls_per_notify: median(batch_calls),
        overhead_ns_per_request: median(overhead),
        empty_inflate_ns_per_request: median(empty_inflate),
        empty_raw_ns_per_request: median(empty_raw_ns),
        empty_overhead_ns_per_request: median(empty_overhead),
        deflate_ns_per_request: median(deflate_req_ns),
        thp_backed_fraction: if thp_fraction.is_finite() { thp_fraction } else { 0.0 },
    })
}

/// Runs `bench balloon`; `progress` gets one line per round.
pub fn run(o: &BalloonBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BalloonBenchReport, String> {
    let spacing = (o.pfns_per_buffer as u64 * 4).next_multiple_of(64);
    if o.pfns_per_buffer == 0
        || o.buffers_per_notify == 0
        || o.buffers_per_notify > RING_SIZE as usize
        || spacing * o.buffers_per_notify as u64 > ARRAYS_END - ARRAYS
    {
        return Err(format!(
            "{} buffers of {} PFNs do not fit the driver's ring ({RING_SIZE}) and arrays (1 MiB)",
            o.buffers_per_notify, o.pfns_per_buffer
        ));
    }
    if o.rounds == 0 || o.ram <= TARGET_START || o.ram >= vmm::memory::MMIO_GAP_START {
        return Err("at least one round, and guest RAM above 2 MiB and below the 3 GiB hole".into());
    }
    let mut rows = Vec::new();
    for thp in if o.thp { vec![false, true] } else { vec![false] } {
        for scattered in [false, true] {
            rows.push(run_case(o, thp, scattered, progress)?);
        }
    }
    let inflate_vs_raw =
        rows.iter().map(|r| (format!("{}/{}", r.backing, r.pattern), r.inflate_vs_raw)).collect();
    let inflate_vs_raw_batch =
        rows.iter().map(|r| (format!("{}/{}", r.backing, r.pattern), r.inflate_vs_raw_batch)).collect();
    let contiguous = || rows.iter().filter(|r| r.pattern == "contiguous");
    let target_met_contiguous = contiguous()
        .map(|r| (r.backing.clone(), r.inflate_vs_raw >= target_inflate_vs_raw(&r.backing)))
        .collect();
    let target_met_empty_overhead = contiguous()
        .map(|r| (r.backing.clone(), r.empty_overhead_ns_per_request <= TARGET_EMPTY_OVERHEAD_NS))
        .collect();
    Ok(BalloonBenchReport {
        mode: o.mode.clone(),
        ram_bytes: o.ram,
        rounds: o.rounds,
        pfns_per_buffer: o.pfns_per_buffer,
        buffers_per_notify: o.buffers_per_notify,
        rows,
        inflate_vs_raw,
        inflate_vs_raw_batch,
        target_met_contiguous,
        target_met_empty_overhead,
    })
}

impl BalloonBenchReport {
    /// The report as markdown.
    pub fn to_markdown_table(&self) -> String {
        let mut s = format!(
            "bench balloon ({}): {} MiB guest RAM, {} PFNs per buffer, {} buffers per notify, medians of {} rounds\n\n",
            self.mode,
            self.ram_bytes >> 20,
            self.pfns_per_buffer,
            self.buffers_per_notify,
            self.rounds
        );
        s += "| backing | pattern | inflate GiB/s | raw GiB/s | inflate_vs_raw | raw_batch GiB/s | inflate_vs_raw_batch | deflate GiB/s | device / raw calls per request | raw_batch calls / notify | overhead over raw_batch ns / request | empty: inflate / raw / overhead ns per request | THP fraction |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {:.2} | {:.2} | {:.3} | {:.2} | {:.3} | {:.1} | {:.2} / {:.2} | {:.1} | {:.0} | {:.0} / {:.0} / {:.0} | {:.2} |\n",
                r.backing,
                r.pattern,
                r.inflate_gib_s,
                r.raw_gib_s,
                r.inflate_vs_raw,
                r.raw_batch_gib_s,
                r.inflate_vs_raw_batch,
                r.deflate_gib_s,
                r.calls_per_request,
                r.raw_calls_per_request,
                r.batch_calls_per_notify,
                r.overhead_ns_per_request,
                r.empty_inflate_ns_per_request,
                r.empty_raw_ns_per_request,
                r.empty_overhead_ns_per_request,
                r.thp_backed_fraction
            );
        }
        s += "\ninflate: through the device (QueueNotify write timed; the device coalesces all requests of a notify). raw: madvise(MADV_DONTNEED) of the same pages request by request (sorted, one call per contiguous run). raw_batch: one call per contiguous run of the whole notify batch. Ratios: medians of per-round ratios, > 1 = device faster.\n";
        for (backing, met) in &self.target_met_contiguous {
            let v = self.inflate_vs_raw.get(&format!("{backing}/contiguous")).copied().unwrap_or(f64::NAN);
            s += &format!(
                "target inflate_vs_raw >= {} for contiguous PFNs ({backing}): {v:.3} {}\n",
                target_inflate_vs_raw(backing),
                if *met { "met" } else { "NOT met" }
            );
        }
        for (backing, met) in &self.target_met_empty_overhead {
            let v = self
                .rows
                .iter()
                .find(|r| &r.backing == backing && r.pattern == "contiguous")
                .map_or(f64::NAN, |r| r.empty_overhead_ns_per_request);
            s += &format!(
                "target empty-request overhead <= {TARGET_EMPTY_OVERHEAD_NS} ns ({backing}): {v:.0} ns {}\n",
                if *met { "met" } else { "NOT met" }
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_quick_tiny() {
        let o = BalloonBenchOptions {
            mode: "test".into(),
            ram: 8 << 20,
            rounds: 2,
            pfns_per_buffer: 128,
            buffers_per_notify: 4,
            seed: 7,
            thp: true,
        };
        let mut lines = 0;
        let report = run(&o, &mut |_| lines += 1).unwrap();
        assert_eq!(lines, 2 * 2 * 2, "one progress line per round and case");
        assert_eq!(report.rows.len(), 4);
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "mode",
            "ram_bytes",
            "rounds",
            "rows",
            "inflate_vs_raw",
            "inflate_vs_raw_batch",
            "target_met_contiguous",
            "target_met_empty_overhead",
        ] {
            assert!(json.get(key).is_some(), "report key {key}");
        }
        for row in json["rows"].as_array().unwrap() {
            for key in [
                "inflate_gib_s",
                "raw_gib_s",
                "inflate_vs_raw",
                "raw_batch_gib_s",
                "inflate_vs_raw_batch",
                "deflate_gib_s",
                "raw_calls_per_request",
                "batch_calls_per_notify",
                "deflate_ns_per_request",
                "empty_inflate_ns_per_request",
                "empty_raw_ns_per_request",
            ] {
                let v = row[key].as_f64().unwrap_or(f64::NAN);
                assert!(v.is_finite() && v > 0.0, "{}/{} {key} = {v}", row["backing"], row["pattern"]);
            }
            for key in ["overhead_ns_per_request", "empty_overhead_ns_per_request", "calls_per_request"] {
                assert!(row[key].as_f64().is_some_and(f64::is_finite), "{key}");
            }
            assert!(row["thp_backed_fraction"].as_f64().is_some_and(|f| (0.0..=1.0).contains(&f)));
        }
        for key in ["anon/contiguous", "anon/scattered", "thp/contiguous", "thp/scattered"] {
            assert!(report.inflate_vs_raw[key] > 0.0, "{key}");
        }
        for contiguous in report.rows.iter().filter(|r| r.pattern == "contiguous") {
            // 4 requests of 128 PFNs = one aligned 2 MiB block per notify: whole on THP too.
            assert_eq!(contiguous.calls_per_request, 0.25, "one discard per notify ({})", contiguous.backing);
            assert_eq!(contiguous.raw_calls_per_request, 1.0, "one raw call per contiguous request");
            assert_eq!(contiguous.batch_calls_per_notify, 1.0, "one raw call per contiguous batch");
        }
        let table = report.to_markdown_table();
        assert!(table.contains("inflate_vs_raw") && table.contains("| thp | scattered |"), "{table}");
    }
}
