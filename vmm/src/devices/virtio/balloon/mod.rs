//! virtio-balloon (device id 5; virtio 1.2, §5.5), discarding through the notifier.
//!
//! Queues, numbered as Linux numbers them (absent queues take no index): 0 inflateq, 1 deflateq,
//! then statsq if VIRTIO_BALLOON_F_STATS_VQ was accepted, then reporting_vq if
//! VIRTIO_BALLOON_F_PAGE_REPORTING was accepted. FREE_PAGE_HINT and PAGE_POISON are not offered.
//!
//! - **Inflate**: a request is an array of 32-bit PFNs (4 KiB pages). It is validated as a whole
//!   before anything is done: every descriptor device-readable with a length that is a multiple
//!   of 4, every PFN inside one of the balloon's regions (guest RAM the guest was told of), no
//!   PFN twice. A request that fails any check is refused entirely — each bad PFN or buffer is
//!   counted by kind and logged, and **nothing reaches a syscall**. The PFNs of all the valid
//!   requests of one notify are sorted and coalesced **as one set** into ranges (split where
//!   guest RAM regions end), the pages are marked in a bitmap, and each range is discarded with
//!   **one** notifier operation through `GuestMmu::discard` (translated once; start -> madvise
//!   or fallocate -> invalidate_range -> end), so the VMM's table and every other subscriber
//!   drop their translations before the syscall. Only then do the notify's heads go back to the
//!   driver, in one used-ring update: VIRTIO_BALLOON_F_MUST_TELL_HOST holds, no page is
//!   returned before the host acted.
//! - **Deflate**: the same validation; the pages leave the bitmap. No syscall for discarded
//!   pages: anonymous or memfd memory refaults as zero pages when the guest touches it again.
//! - **Stats** (statsq): the driver's buffer of (le16 tag, le64 value) pairs is parsed and kept
//!   as the latest guest statistics; the buffer is held until the VMM asks for fresh ones
//!   ([`Balloon::request_guest_stats`]), which returns it to the driver (the driver then refills
//!   and re-queues it).
//! - **Free page reporting** (reporting_vq): each descriptor names a free guest-physical range
//!   (addr/len, page-aligned, inside the RAM the guest was told of: never virtio-mem's hot-pluggable
//!   region); adjacent ranges are coalesced and discarded the
//!   same way. Reported pages are not ballooned (the guest reuses them freely).
//!
//! # When pages are discarded (invariant B1)
//! - B1. On 4 KiB-page memory every inflated run is discarded before the notify's heads are
//!   used. On huge-page-backed memory (THP or hugetlb) a 2 MiB guest block is discarded **whole,
//!   once the guest has given all of it** (the per-block count reaches the block's pages, in
//!   this notify or over several), runs of such blocks coalesced into one operation; the pages of
//!   a block still partly given are *held* (ballooned, not yet discarded; a bitmap, counted in
//!   [`BalloonStats::held_pages`]). A 4 KiB discard inside a THP would split the huge page, and
//!   the kernel frees a split huge page only later (deferred split) — the gap Firecracker's
//!   balloon documents; hugetlb cannot discard less than 2 MiB at all (the notifier refuses it
//!   before any syscall). Linux's driver gives 256 pages (half a block) per request and one
//!   request per kick, so without holding every THP block would be split. When the guest takes
//!   held pages back (deflate), on THP they are discarded first, so deflated pages always read
//!   zeros, as on 4 KiB memory; on hugetlb they come back with their contents.
//!
//! The stats count 2 MiB guest blocks that are fully ballooned vs partly ballooned
//! ([`BalloonStats::huge_blocks_full`], [`BalloonStats::huge_blocks_partial`]). Blocks are
//! guest-physical 2 MiB blocks; they coincide with host huge pages when
//! `GuestRam::huge_page_aligned` holds. Free page reports are discarded as given (coalesced
//! across the notify's buffers), trimmed to whole 2 MiB blocks on hugetlb.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::queue::{read_readable, DescriptorChain, Popped, Queue, QueueError};
use super::{
    device_type, features, log_guest_error, read_config_bytes, DeviceFault, VirtioDevice, VirtioInterrupt,
};
use crate::memory::{GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::mmu::{GuestMemoryAccess, GuestMmu};

// The contract (feature bits, the balloon's page, the config layout, the statistics tags) is
// defined once in the ABI crate the test guest's driver compiles too.
use guest_abi::virtio::balloon::{CONFIG_ACTUAL, CONFIG_NUM_PAGES, STAT_NAMES};
pub use guest_abi::virtio::balloon::{
    CONFIG_SIZE, PAGE as BALLOON_PAGE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};

/// Size of every balloon queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest PFN array accepted in one request (64 Ki PFNs; Linux sends at most 256).
pub const MAX_PFN_BYTES: usize = 256 << 10;
/// Largest statistics buffer accepted.
pub const MAX_STATS_BYTES: usize = 4096;

const PAGES_PER_BLOCK: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

/// Which features to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST.
    pub must_tell_host: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ.
    pub stats: bool,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING.
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self { must_tell_host: true, stats: true, deflate_on_oom: true, free_page_reporting: true }
    }
}

/// Guest errors, by kind (each also logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonErrors {
    /// PFNs outside guest RAM.
    pub pfn_outside_ram: u64,
    /// PFNs given twice in one request.
    pub pfn_duplicate: u64,
    /// Descriptors whose length is not a multiple of the element size, or whose direction is
    /// wrong, or requests larger than the limit.
    pub bad_buffer: u64,
    /// Malformed chains (loops, indices outside the table, overflowing buffers, indirect).
    pub bad_chain: u64,
    /// Buffers that could not be read (outside guest RAM, unmapped).
    pub unreadable: u64,
    /// Deflated PFNs that were not ballooned (no effect).
    pub deflate_not_ballooned: u64,
    /// Reported ranges that are unaligned, empty or not inside guest RAM.
    pub bad_report_range: u64,
    /// Driver writes to the read-only `num_pages`, or beyond `actual`.
    pub config_write: u64,
    /// Notifies of a queue the negotiated features do not define.
    pub unknown_queue: u64,
}

impl BalloonErrors {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.pfn_outside_ram
            + self.pfn_duplicate
            + self.bad_buffer
            + self.bad_chain
            + self.unreadable
            + self.deflate_not_ballooned
            + self.bad_report_range
            + self.config_write
            + self.unknown_queue
    }
}

/// The balloon's counters and state, for `zapvm stats` (serde-serialisable).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonStats {
    /// The host's target (`num_pages`).
    pub target_pages: u32,
    /// What the guest says it has (`actual`).
    pub actual_pages: u32,
    /// Pages currently in the balloon (the bitmap).
    pub ballooned_pages: u64,
    /// Pages inflated (monotonic; valid requests only).
    pub inflated_pages: u64,
    /// Pages deflated (monotonic).
    pub deflated_pages: u64,
    /// Inflated pages that were already in the balloon (discarded again).
    pub reinflated_pages: u64,
    /// Inflate requests accepted / refused.
    pub inflate_requests: u64,
    /// Inflate requests refused (any bad PFN or buffer).
    pub inflate_refused: u64,
    /// Deflate requests accepted.
    pub deflate_requests: u64,
    /// Deflate requests refused.
    pub deflate_refused: u64,
    /// Notifier discard operations issued (one per coalesced range).
    pub discard_ranges: u64,
    /// Bytes those operations discarded.
    pub bytes_discarded: u64,
    /// Discard operations the notifier or the kernel failed.
    pub discard_failures: u64,
    /// Free page reports: ranges discarded and their bytes.
    pub reported_ranges: u64,
    /// See `reported_ranges`.
    pub reported_bytes: u64,
    /// Guest 2 MiB blocks now wholly in the balloon (on THP memory: huge pages the host freed).
    pub huge_blocks_full: u64,
    /// Guest 2 MiB blocks now partly in the balloon (on THP memory: split huge pages whose
    /// memory the kernel returns only when it completes the deferred split).
    pub huge_blocks_partial: u64,
    /// Whether guest RAM is THP-backed (the two counters above matter then).
    pub thp: bool,
    /// Pages in the balloon not discarded yet: on huge-page-backed memory, the pages of blocks
    /// the guest has not given whole (B1); 0 on 4 KiB pages.
    pub held_pages: u64,
    /// Guest errors.
    pub errors: BalloonErrors,
    /// Statistics buffers received from the guest.
    pub guest_stats_updates: u64,
    /// The latest guest statistics (tag name -> value).
    pub guest_stats: BTreeMap<String, u64>,
}

/// The name of a virtio-balloon statistics tag (virtio 1.2, §5.5.6.3).
pub fn stat_name(tag: u16) -> String {
    STAT_NAMES.get(tag as usize).map_or_else(|| format!("tag_{tag}"), |n| n.to_string())
}

/// What a queue index means under the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// How guest RAM is backed, for the discard policy (B1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// 4 KiB pages: every inflated run is discarded at once.
    Small,
    /// THP: a 2 MiB block is discarded whole once the guest has given all of it; pages of a
    /// partial block are held (discarded if the guest takes them back first).
    Thp,
    /// hugetlb: nothing smaller than a 2 MiB page can be discarded; pages of a partial block
    /// are held and come back with their contents.
    Hugetlb,
}

/// One guest RAM region's balloon state.
struct RegionMap {
    gpa: u64,
    pages: u64,
    /// One bit per 4 KiB page: in the balloon.
    bitmap: Vec<u64>,
    /// Ballooned pages per 2 MiB guest block (blocks indexed from `gpa` rounded down).
    per_block: Vec<u16>,
    /// One bit per 4 KiB page: in the balloon but not discarded yet (on huge-page-backed
    /// memory, a page of a block the guest has not given whole; B1 below).
    held: Vec<u64>,
}

impl RegionMap {
    fn new(gpa: u64, len: u64) -> Self {
        let pages = len / PAGE_SIZE;
        let first_block = gpa / HUGE_PAGE_SIZE;
        let last_block = (gpa + len).div_ceil(HUGE_PAGE_SIZE);
        Self {
            gpa,
            pages,
            bitmap: vec![0; pages.div_ceil(64) as usize],
            per_block: vec![0; (last_block - first_block) as usize],
            held: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Guest-physical end.
    fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }

    /// Pages of block `b` inside the region (the region may start or end mid-block).
    fn block_len(&self, b: usize) -> u64 {
        let block_start = (self.gpa / HUGE_PAGE_SIZE + b as u64) * PAGES_PER_BLOCK;
        let first = self.gpa / PAGE_SIZE;
        let end = (block_start + PAGES_PER_BLOCK).min(first + self.pages);
        end - block_start.max(first)
    }

    /// Whether every page of block `b` inside the region is in the balloon.
    fn block_full(&self, b: usize) -> bool {
        self.per_block[b] as u64 == self.block_len(b)
    }

    /// The guest-physical range of block `b`, clipped to the region.
    fn block_range(&self, b: usize) -> (u64, u64) {
        let start = ((self.gpa / HUGE_PAGE_SIZE + b as u64) * HUGE_PAGE_SIZE).max(self.gpa);
        let end = (start / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE + HUGE_PAGE_SIZE).min(self.end());
        (start, end)
    }

    fn is_held(&self, pfn: u64) -> bool {
        let i = self.index(pfn);
        self.held[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_held(&mut self, pfn: u64, on: bool) {
        let i = self.index(pfn);
        if on {
            self.held[i / 64] |= 1 << (i % 64);
        } else {
            self.held[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Clears the held bits of block `b` (it is being discarded whole).
    fn release_block(&mut self, b: usize) {
        let (start, end) = self.block_range(b);
        for pfn in start / PAGE_SIZE..end / PAGE_SIZE {
            self.set_held(pfn, false);
        }
    }

    fn held_pages(&self) -> u64 {
        self.held.iter().map(|w| w.count_ones() as u64).sum()
    }

    fn contains(&self, pfn: u64) -> bool {
        let first = self.gpa / PAGE_SIZE;
        pfn >= first && pfn < first + self.pages
    }

    fn index(&self, pfn: u64) -> usize {
        (pfn - self.gpa / PAGE_SIZE) as usize
    }

    fn block(&self, pfn: u64) -> usize {
        (pfn / PAGES_PER_BLOCK - self.gpa / HUGE_PAGE_SIZE) as usize
    }

    fn test(&self, pfn: u64) -> bool {
        let i = self.index(pfn);
        self.bitmap[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets or clears `pfn`; returns whether it changed.
    fn set(&mut self, pfn: u64, on: bool) -> bool {
        let i = self.index(pfn);
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if (self.bitmap[word] & bit != 0) == on {
            return false;
        }
        self.bitmap[word] ^= bit;
        let b = self.block(pfn);
        if on {
            self.per_block[b] += 1;
        } else {
            self.per_block[b] -= 1;
        }
        true
    }

    fn clear(&mut self) {
        self.bitmap.fill(0);
        self.per_block.fill(0);
        self.held.fill(0);
    }
}

/// The virtio-balloon device model.
pub struct Balloon {
    mmu: Arc<GuestMmu>,
    regions: Vec<RegionMap>,
    /// How guest RAM is backed, which decides when ballooned pages are discarded (B1).
    backing: Backing,
    avail_features: u64,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    target_pages: u32,
    actual_pages: u32,
    queues: Vec<Queue>,
    roles: Vec<Role>,
    mem: Option<Arc<dyn GuestMemoryAccess>>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    stats_head: Option<u16>,
    stats: BalloonStats,
}

impl Balloon {
    /// A balloon over `ram`, discarding through `mmu`'s notifier (`mmu` must be the table of
    /// `ram`), offering the features `config` selects. The target starts at 0 pages.
    pub fn new(mmu: Arc<GuestMmu>, ram: &GuestRam, config: BalloonConfig) -> Self {
        let mut avail_features = 1u64 << features::VIRTIO_F_VERSION_1;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        for (on, bit) in [
            (config.must_tell_host, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (config.stats, VIRTIO_BALLOON_F_STATS_VQ),
            (config.deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (config.free_page_reporting, VIRTIO_BALLOON_F_PAGE_REPORTING),
        ] {
            if on {
                avail_features |= 1 << bit;
            }
        }
        if config.stats {
            queue_sizes.push(QUEUE_SIZE);
        }
        if config.free_page_reporting {
            queue_sizes.push(QUEUE_SIZE);
        }
        let regions = ram.ram_regions().map(|(gpa, _, len)| RegionMap::new(gpa.0, len)).collect();
        let thp = ram.config().thp;
        Self {
            mmu,
            regions,
            backing: if ram.config().backend == crate::memory::MemoryBackend::Hugetlb {
                Backing::Hugetlb
            } else if thp {
                Backing::Thp
            } else {
                Backing::Small
            },
            avail_features,
            queue_sizes,
            acked_features: 0,
            target_pages: 0,
            actual_pages: 0,
            queues: Vec::new(),
            roles: Vec::new(),
            mem: None,
            interrupt: None,
            stats_head: None,
            stats: BalloonStats { thp, ..Default::default() },
        }
    }

    /// Sets the host's target (`num_pages`, in 4 KiB pages). Call it through
    /// `MmioTransport::update_config` so the driver gets a config-change interrupt.
    pub fn set_target_pages(&mut self, pages: u32) {
        self.target_pages = pages;
    }

    /// The counters, state and latest guest statistics.
    pub fn stats(&self) -> BalloonStats {
        let mut s = self.stats.clone();
        s.target_pages = self.target_pages;
        s.actual_pages = self.actual_pages;
        s.ballooned_pages =
            self.regions.iter().map(|r| r.per_block.iter().map(|&n| n as u64).sum::<u64>()).sum();
        s.held_pages = self.regions.iter().map(RegionMap::held_pages).sum();
        s.huge_blocks_full = 0;
        s.huge_blocks_partial = 0;
        for r in &self.regions {
            for (b, &n) in r.per_block.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                if n as u64 == r.block_len(b) {
                    s.huge_blocks_full += 1;
                } else {
                    s.huge_blocks_partial += 1;
                }
            }
        }
        s
    }

    /// Whether guest page `pfn` is in the balloon.
    pub fn is_ballooned(&self, pfn: u64) -> bool {
        self.regions.iter().find(|r| r.contains(pfn)).is_some_and(|r| r.test(pfn))
    }

    /// Returns the held statistics buffer to the driver so that it sends fresh statistics.
    /// Returns whether a request was sent (false: no buffer held, or the stats queue is not in
    /// use).
    pub fn request_guest_stats(&mut self) -> Result<bool, DeviceFault> {
        let Some(head) = self.stats_head.take() else {
            return Ok(false);
        };
        let (Some(mem), Some(irq)) = (self.mem.clone(), self.interrupt.clone()) else {
            return Ok(false);
        };
        let Some(i) = self.roles.iter().position(|&r| r == Role::Stats) else {
            return Ok(false);
        };
        self.queues[i].add_used(mem.as_ref(), head, 0).map_err(fault)?;
        irq.signal_used_queue();
        Ok(true)
    }

    fn region_of(&self, pfn: u64) -> Option<usize> {
        self.regions.iter().position(|r| r.contains(pfn))
    }

    /// Whether `[gpa, gpa + len)` lies inside one of the balloon's regions.
    fn in_balloon_regions(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| self.regions.iter().any(|r| gpa >= r.gpa && end <= r.end()))
    }

    /// Reads and validates a PFN request (its buffers with one copy each); `None` (counted,
    /// logged) when it is refused. A PFN is valid when it lies in one of the balloon's regions,
    /// which are guest RAM regions of the table: no further translation is needed until the
    /// discard, which translates each run once (`GuestMmu::discard`).
    fn read_pfns(&mut self, mem: &dyn GuestMemoryAccess, chain: &DescriptorChain) -> Option<Vec<u64>> {
        let e = &mut self.stats.errors;
        if chain.writable().next().is_some() || chain.readable().any(|d| d.len % 4 != 0) {
            e.bad_buffer += 1;
            log_guest_error(
                e.bad_buffer,
                format_args!(
                    "balloon: PFN request {} has a write-only or non-multiple-of-4 buffer",
                    chain.head
                ),
            );
            return None;
        }
        let bytes = match read_readable(mem, chain, MAX_PFN_BYTES) {
            Ok(b) => b,
            Err(why) => {
                e.unreadable += 1;
                log_guest_error(e.unreadable, format_args!("balloon: PFN request {}: {why}", chain.head));
                return None;
            }
        };
        let mut pfns: Vec<u64> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as u64)
            .collect();
        let mut ok = true;
        pfns.sort_unstable();
        // Sorted: one pass finds the region of each PFN (regions are few and disjoint).
        for &pfn in &pfns {
            if self.region_of(pfn).is_none() {
                ok = false;
                let e = &mut self.stats.errors;
                e.pfn_outside_ram += 1;
                log_guest_error(
                    e.pfn_outside_ram,
                    format_args!("balloon: PFN {pfn:#x} is outside guest RAM"),
                );
            }
        }
        for w in pfns.windows(2) {
            if w[0] == w[1] {
                ok = false;
                let e = &mut self.stats.errors;
                e.pfn_duplicate += 1;
                log_guest_error(e.pfn_duplicate, format_args!("balloon: PFN {:#x} given twice", w[0]));
            }
        }
        ok.then_some(pfns)
    }

    /// Discards guest `[gpa, gpa + len)` through the table's one handle (`GuestMmu::discard`:
    /// translated once, then one notifier operation). Callers pass ranges inside one balloon
    /// region; anything else is refused by the table before any syscall.
    fn discard(&mut self, gpa: u64, len: u64) -> bool {
        match self.mmu.discard(gpa, len) {
            Ok(_) => {
                self.stats.discard_ranges += 1;
                self.stats.bytes_discarded += len;
                true
            }
            Err(e) => {
                self.stats.discard_failures += 1;
                tracing::warn!("balloon: {e}");
                false
            }
        }
    }

    /// Coalesces sorted, unique PFNs of the balloon's regions into (gpa, len) runs, each inside
    /// one region.
    fn runs(&self, pfns: &[u64]) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut region_end = 0;
        for &pfn in pfns {
            let gpa = pfn * BALLOON_PAGE;
            if let Some((start, len)) = runs.last_mut() {
                if *start + *len == gpa && gpa < region_end {
                    *len += BALLOON_PAGE;
                    continue;
                }
            }
            region_end = self.region_of(pfn).map_or(0, |r| self.regions[r].end());
            runs.push((gpa, BALLOON_PAGE));
        }
        runs
    }

    /// Discards runs of `ranges` (sorted by start, possibly overlapping or adjacent), merged
    /// where they touch inside one region; returns the (gpa, len) of each discard that worked.
    fn discard_merged(&mut self, ranges: &mut Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for &(gpa, len) in ranges.iter() {
            if let Some((s, l)) = merged.last_mut() {
                let end = (*s + *l).max(gpa + len);
                if gpa <= *s + *l && self.in_balloon_regions(*s, end - *s) {
                    *l = end - *s;
                    continue;
                }
            }
            merged.push((gpa, len));
        }
        merged.into_iter().filter(|&(gpa, len)| self.discard(gpa, len)).collect()
    }

    /// Inflates every request of one notify: each request is validated whole (a bad one is
    /// refused, counted and reaches no syscall), then the PFNs of all accepted requests are
    /// sorted and coalesced **as one set** and discarded (B1), before any head goes back to the
    /// driver (the caller writes the used ring afterwards: VIRTIO_BALLOON_F_MUST_TELL_HOST).
    fn inflate_all(&mut self, mem: &dyn GuestMemoryAccess, chains: &[DescriptorChain]) {
        let mut pfns = Vec::new();
        for chain in chains {
            match self.read_pfns(mem, chain) {
                Some(p) => {
                    self.stats.inflate_requests += 1;
                    pfns.extend(p);
                }
                None => self.stats.inflate_refused += 1,
            }
        }
        if pfns.is_empty() {
            return;
        }
        pfns.sort_unstable();
        let given = pfns.len();
        pfns.dedup();
        // A PFN in two requests of one notify: the second is a re-inflate.
        self.stats.reinflated_pages += (given - pfns.len()) as u64;
        let mut touched_blocks: Vec<(usize, usize)> = Vec::new();
        for &pfn in &pfns {
            let Some(r) = self.region_of(pfn) else { continue };
            let region = &mut self.regions[r];
            if region.set(pfn, true) {
                self.stats.inflated_pages += 1;
            } else {
                self.stats.reinflated_pages += 1;
            }
            let block = (r, region.block(pfn));
            if touched_blocks.last() != Some(&block) {
                touched_blocks.push(block);
            }
        }
        match self.backing {
            Backing::Small => {
                for (gpa, len) in self.runs(&pfns) {
                    self.discard(gpa, len);
                }
            }
            Backing::Thp | Backing::Hugetlb => {
                // B1: a block the guest has now given whole is discarded whole (runs of such
                // blocks coalesced into one operation); the pages of the other blocks this
                // notify touched are held.
                for &pfn in &pfns {
                    let Some(r) = self.region_of(pfn) else { continue };
                    self.regions[r].set_held(pfn, true);
                }
                let mut whole = Vec::new();
                for &(r, b) in &touched_blocks {
                    if self.regions[r].block_full(b) {
                        self.regions[r].release_block(b);
                        let (start, end) = self.regions[r].block_range(b);
                        whole.push((start, end - start));
                    }
                }
                self.discard_merged(&mut whole);
            }
        }
    }

    /// Deflates every request of one notify. No syscall for pages the host discarded (anonymous
    /// or memfd memory refaults as zero pages); on THP memory, pages still held (B1) are
    /// discarded first so that they, too, come back as zeros.
    fn deflate_all(&mut self, mem: &dyn GuestMemoryAccess, chains: &[DescriptorChain]) {
        let mut flush = Vec::new();
        for chain in chains {
            let Some(pfns) = self.read_pfns(mem, chain) else {
                self.stats.deflate_refused += 1;
                continue;
            };
            self.stats.deflate_requests += 1;
            for pfn in pfns {
                let Some(r) = self.region_of(pfn) else { continue };
                let region = &mut self.regions[r];
                if region.is_held(pfn) {
                    region.set_held(pfn, false);
                    flush.push(pfn);
                }
                if region.set(pfn, false) {
                    self.stats.deflated_pages += 1;
                } else {
                    let e = &mut self.stats.errors;
                    e.deflate_not_ballooned += 1;
                    log_guest_error(
                        e.deflate_not_ballooned,
                        format_args!("balloon: deflate of PFN {pfn:#x}, which is not ballooned"),
                    );
                }
            }
        }
        if self.backing == Backing::Thp && !flush.is_empty() {
            flush.sort_unstable();
            for (gpa, len) in self.runs(&flush) {
                self.discard(gpa, len);
            }
        }
    }

    /// Checks the free page reports of one notify and discards them, adjacent ranges of all
    /// its buffers coalesced.
    fn report_all(&mut self, chains: &[DescriptorChain]) {
        let mut ranges = Vec::new();
        for d in chains.iter().flat_map(|c| &c.descriptors) {
            let (gpa, len) = (d.addr, d.len as u64);
            // Inside one of the balloon's regions (RAM the guest was told of), not merely guest
            // RAM of the table: the table also covers virtio-mem's hot-pluggable region, which
            // is not the balloon's to discard.
            if len == 0 || gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || !self.in_balloon_regions(gpa, len)
            {
                let e = &mut self.stats.errors;
                e.bad_report_range += 1;
                log_guest_error(
                    e.bad_report_range,
                    format_args!(
                        "balloon: reported range [{gpa:#x}, +{len:#x}) is unaligned or not guest RAM"
                    ),
                );
                continue;
            }
            if self.backing == Backing::Hugetlb {
                let (start, end) =
                    (gpa.next_multiple_of(HUGE_PAGE_SIZE), (gpa + len) / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE);
                if start < end {
                    ranges.push((start, end - start));
                }
                continue;
            }
            ranges.push((gpa, len));
        }
        for (_, len) in self.discard_merged(&mut ranges) {
            self.stats.reported_ranges += 1;
            self.stats.reported_bytes += len;
        }
    }

    fn take_stats(&mut self, mem: &dyn GuestMemoryAccess, chain: &DescriptorChain) -> Option<u16> {
        let bytes = match read_readable(mem, chain, MAX_STATS_BYTES) {
            Ok(b) if b.len() % 10 == 0 => b,
            Ok(b) => {
                let e = &mut self.stats.errors;
                e.bad_buffer += 1;
                log_guest_error(
                    e.bad_buffer,
                    format_args!("balloon: stats buffer of {} bytes is not whole entries", b.len()),
                );
                return Some(chain.head);
            }
            Err(why) => {
                let e = &mut self.stats.errors;
                e.unreadable += 1;
                log_guest_error(e.unreadable, format_args!("balloon: stats buffer: {why}"));
                return Some(chain.head);
            }
        };
        self.stats.guest_stats_updates += 1;
        for entry in bytes.chunks_exact(10) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let value = u64::from_le_bytes(entry[2..10].try_into().expect("8 bytes"));
            self.stats.guest_stats.insert(stat_name(tag), value);
        }
        // Hold the buffer until the VMM asks for new statistics; return an older one now.
        self.stats_head.replace(chain.head)
    }
}

fn fault(e: QueueError) -> DeviceFault {
    DeviceFault(e.to_string())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        let (target, actual) = (CONFIG_NUM_PAGES as usize, CONFIG_ACTUAL as usize);
        config[target..target + 4].copy_from_slice(&self.target_pages.to_le_bytes());
        config[actual..actual + 4].copy_from_slice(&self.actual_pages.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let end = offset.checked_add(data.len() as u64);
        if offset < CONFIG_ACTUAL || end.is_none_or(|e| e > CONFIG_ACTUAL + 4) {
            let e = &mut self.stats.errors;
            e.config_write += 1;
            log_guest_error(
                e.config_write,
                format_args!("balloon: config write at {offset:#x} outside `actual`"),
            );
            return;
        }
        let mut actual = self.actual_pages.to_le_bytes();
        actual[(offset - 4) as usize..(offset - 4) as usize + data.len()].copy_from_slice(data);
        self.actual_pages = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Queue>,
        mem: Arc<dyn GuestMemoryAccess>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), DeviceFault> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked_features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if acked_features & (1 << VIRTIO_BALLOON_F_PAGE_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        self.acked_features = acked_features;
        self.roles = roles;
        self.queues = queues;
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        self.stats_head = None;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceFault> {
        let (Some(mem), Some(irq)) = (self.mem.clone(), self.interrupt.clone()) else {
            return Err(DeviceFault("balloon notified before activation".into()));
        };
        let Some(&role) = self.roles.get(index).filter(|_| index < self.queues.len()) else {
            let e = &mut self.stats.errors;
            e.unknown_queue += 1;
            log_guest_error(e.unknown_queue, format_args!("balloon: notify of undefined queue {index}"));
            return Ok(());
        };
        let mut used_any = false;
        loop {
            // One notify's chains, read in bulk; all of them are handled (and, for inflate,
            // discarded) before their heads go back in one used-ring update.
            let batch = self.queues[index].pop_all(mem.as_ref()).map_err(fault)?;
            if batch.is_empty() {
                break;
            }
            let mut used: Vec<(u16, u32)> = Vec::with_capacity(batch.len());
            let mut chains = Vec::with_capacity(batch.len());
            for popped in batch {
                match popped {
                    Popped::Chain(chain) => chains.push(chain),
                    Popped::Bad { head, error } => {
                        let e = &mut self.stats.errors;
                        e.bad_chain += 1;
                        log_guest_error(e.bad_chain, format_args!("balloon: queue {index}: {error}"));
                        used.extend(head.map(|h| (h, 0)));
                    }
                }
            }
            match role {
                Role::Inflate => self.inflate_all(mem.as_ref(), &chains),
                Role::Deflate => self.deflate_all(mem.as_ref(), &chains),
                Role::Reporting => self.report_all(&chains),
                Role::Stats => {}
            }
            if role == Role::Stats {
                for chain in &chains {
                    used.extend(self.take_stats(mem.as_ref(), chain).map(|h| (h, 0)));
                }
            } else {
                used.extend(chains.iter().map(|c| (c.head, 0)));
            }
            self.queues[index].add_used_all(mem.as_ref(), &used).map_err(fault)?;
            used_any |= !used.is_empty();
        }
        if used_any {
            irq.signal_used_queue();
        }
        Ok(())
    }

    fn reset(&mut self) {
        // The driver is gone: its ballooned pages are ordinary guest memory again (discarded
        // ones read zeros until written; held ones, B1, keep their contents).
        self.regions.iter_mut().for_each(RegionMap::clear);
        self.actual_pages = 0;
        self.acked_features = 0;
        self.queues.clear();
        self.roles.clear();
        self.mem = None;
        self.interrupt = None;
        self.stats_head = None;
    }
}

#[cfg(test)]
mod tests {

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
        assert_eq!(
            (s.inflated_pages, s.ballooned_pages, s.discard_ranges, s.bytes_discarded),
            (4, 4, 1, 0x4000)
        );
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
        assert_eq!(s.ballooned_pages, 0, "reported pages are not ballooned");
        assert_eq!(f.rings[3].used_idx(f.mem()), 1);
    }

    #[test]
    fn free_page_reports_of_the_hotplug_region_are_refused() {
        // Regression (found by tests/parsers.rs and fuzz_balloon_queue): the reporting queue
        // checked ranges against the table only, which also covers virtio-mem's region, so a
        // guest could have the balloon discard plugged virtio-mem memory behind that device.
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

    /// Each request is one read of its PFN array and the queue's rings are read once per
    /// notify; nothing is translated per PFN.
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
        // Index, ring entries, descriptor table, four arrays; then the index again (empty).
        assert_eq!(counting.take(), (1 + 1 + 1 + 4 + 1, 2), "used elements and used index");
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
}
