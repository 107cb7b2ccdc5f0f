//! [`guest_abi::Workload::Phased`]: a working set that grows and shrinks over time, over a page
//! allocator shared with the balloon driver (the contract, the regions and the checks are
//! `guest_abi::phased`'s).
//!
//! vCPU 0 runs one loop: follow the working set the phase wants (grow from the cache, then from
//! free pages, else deflate on OOM or stall), answer statistics requests, poll the balloon's
//! target about every [`POLL_MS`] (3 MMIO exits) and inflate or deflate towards it,
//! report free pages that have waited long enough, and verify the next [`VERIFY_CHUNK`] pages of
//! the working set. Nothing in the loop exits but the target poll, the balloon's requests and
//! the idle rendezvous of a stall. Other vCPUs idle in rendezvous until the host stops the VM.

use guest_abi::phased::{phased_layout, tag as ztag, wanted_pages, PhaseParams, PhasedLayout};
use guest_abi::virtio::balloon::{tag, CONFIG_ACTUAL, CONFIG_NUM_PAGES, STAT_ENTRY_SIZE};
use guest_abi::virtio::device_type;
use guest_abi::{BootInfo, MAX_IDLE_US, PAGE_SIZE};

use crate::balloon::{check_page, fill_page, Driver, Slice, BATCH, STATS_PAGE};
use crate::virtio::{self, Mmio, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::{arch, fail};

/// State byte of a free page that holds the pattern and was not reported yet.
const DIRTY: u8 = 1;
/// State byte of a free page that must read zero (reported, or deflated).
const ZERO: u8 = 2;
// State 0: a page never used since boot (free pages not checked), or a used/cache page.

/// Working-set pages verified between two looks at the clock and the queues.
const VERIFY_CHUNK: u64 = 64;
/// Most pages the working set grows by in one turn of the loop.
const GROW_CHUNK: u64 = 512;
/// Milliseconds between two polls of the balloon's target.
const POLL_MS: u64 = 2;
/// Most pages in one descriptor of a free page report.
const REPORT_RUN: u64 = 1024;
/// Descriptors in one report chain (the queue's size).
const REPORT_DESCS: usize = 8;
/// Entries of the statistics buffer.
const NR_STATS: usize = 14;
/// Microseconds of one idle rendezvous while stalled.
const STALL_IDLE_US: u64 = 1000;

struct Phased {
    d: Driver,
    seed: u64,
    params: PhaseParams,
    layout: PhasedLayout,
    /// Address of the first state byte (the state pages are contiguous).
    states: u64,
    used: u64,
    cache: u64,
    balloon: u64,
    dirty: u64,
    dirty_since: u64,
    wanted: u64,
    cursor: u64,
    verified: u64,
    stall_cycles: u64,
    stall_since: Option<u64>,
    oom_deflated: u64,
    reported: u64,
}

/// Runs the phased workload (see the module docs); never returns.
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    if vcpu != 0 {
        loop {
            virtio::idle(vcpu, MAX_IDLE_US);
        }
    }
    let slice = Slice::new(boot, vcpu);
    let Some(layout) = phased_layout(slice.pages) else {
        fail(vcpu, format_args!("phased: the slice has {} pages, no room for a pool", slice.pages));
    };
    let last_carved = layout.pool_first - 1;
    if slice.page(last_carved) - slice.page(0) != last_carved * PAGE_SIZE {
        fail(
            vcpu,
            format_args!("phased: the first {} pages of the slice are not contiguous", layout.pool_first),
        );
    }
    let Some(device) = boot.virtio[..(boot.nr_virtio as usize).min(boot.virtio.len())]
        .iter()
        .find(|d| d.device_id == u64::from(device_type::BALLOON))
    else {
        fail(vcpu, format_args!("phased: the boot info names no virtio-balloon device"));
    };
    let params = boot.phase;
    if params.tsc_khz == 0 {
        fail(vcpu, format_args!("phased: the boot info gives no TSC frequency"));
    }
    let states = slice.page(layout.state_first);
    let d = Driver::init(vcpu, boot, Mmio::new(device.base), slice);
    let mut p = Phased {
        d,
        seed: boot.seed,
        params,
        layout,
        states,
        used: 0,
        cache: 0,
        balloon: 0,
        dirty: 0,
        dirty_since: 0,
        wanted: 0,
        cursor: 0,
        verified: 0,
        stall_cycles: 0,
        stall_since: None,
        oom_deflated: 0,
        reported: 0,
    };
    p.send_stats();
    p.serve()
}

impl Phased {
    fn pool(&self) -> u64 {
        self.layout.pool_pages
    }

    fn free(&self) -> u64 {
        self.pool() - self.balloon - self.used - self.cache
    }

    /// Guest-physical address of pool page `i`.
    fn gpa(&self, i: u64) -> u64 {
        self.d.slice.page(self.layout.pool_first + i)
    }

    fn state(&self, i: u64) -> u8 {
        // SAFETY: byte i < pool_pages of the state pages, which are carved, contiguous pages of
        // this vCPU's slice (checked in `run`) that only this vCPU uses.
        unsafe { ((self.states + i) as *const u8).read_volatile() }
    }

    fn set_state(&self, i: u64, state: u8) {
        // SAFETY: as in `state`.
        unsafe { ((self.states + i) as *mut u8).write_volatile(state) }
    }

    fn check(&self, i: u64, zeros: bool, what: &str) {
        if let Err((at, found, expected)) = check_page(self.seed, self.gpa(i), zeros) {
            fail(
                self.d.vcpu,
                format_args!(
                    "phased: {what}: word {at:#x} (pool page {i}) is {found:#018x}, expected {expected:#018x} (used {}, cache {}, balloon {})",
                    self.used, self.cache, self.balloon
                ),
            );
        }
    }

    /// Takes one more page into the working set (from the cache, else a free page); false when
    /// only the balloon holds pages.
    fn grow_one(&mut self) -> bool {
        let i = self.used;
        if self.cache > 0 {
            self.check(i, false, "cache page lost its pattern");
            self.cache -= 1;
        } else if self.free() > 0 {
            match self.state(i) {
                DIRTY => {
                    self.check(i, false, "free page not reported lost its pattern");
                    self.dirty -= 1;
                }
                ZERO => self.check(i, true, "reported or deflated page is not zero"),
                _ => {}
            }
            self.set_state(i, 0);
        } else {
            return false;
        }
        fill_page(self.seed, self.gpa(i));
        self.used += 1;
        true
    }

    /// The working set drops `k` pages into the cache; what overflows it becomes free, dirty.
    fn shrink(&mut self, k: u64, now: u64) {
        self.used -= k;
        self.cache += k;
        let over = self.cache.saturating_sub(self.params.cache_pages);
        if over > 0 {
            let top = self.used + self.cache;
            for i in top - over..top {
                self.set_state(i, DIRTY);
            }
            self.cache -= over;
            if self.dirty == 0 {
                self.dirty_since = now;
            }
            self.dirty += over;
        }
        self.cursor = 0;
    }

    /// Inflates by up to `k` pages (one request): free pages first, then the cache's, never
    /// the pages the working set is about to take (it wants more than it has).
    fn inflate(&mut self, k: u64) {
        let spare = (self.free() + self.cache).saturating_sub(self.wanted.saturating_sub(self.used));
        let k = k.min(BATCH).min(spare);
        if k == 0 {
            return;
        }
        let end = self.pool() - self.balloon;
        let start = end - k;
        for i in start..end {
            if self.state(i) == DIRTY {
                self.dirty -= 1;
            }
            self.set_state(i, 0);
        }
        let free_bottom = self.used + self.cache;
        if start < free_bottom {
            self.cache -= free_bottom - start;
        }
        let first = self.layout.pool_first + start;
        let pfns = |j: u64| self.d.pfn(first + j);
        let pfns: [u32; BATCH as usize] =
            core::array::from_fn(|j| if (j as u64) < k { pfns(j as u64) } else { 0 });
        self.d.request_pfns(false, k, |j| pfns[j as usize]);
        self.balloon += k;
    }

    /// Deflates up to `k` pages (one request); they come back as free pages that must read zero.
    fn deflate(&mut self, k: u64) -> u64 {
        let k = k.min(BATCH).min(self.balloon);
        if k == 0 {
            return 0;
        }
        let start = self.pool() - self.balloon;
        let first = self.layout.pool_first + start;
        let pfns: [u32; BATCH as usize] =
            core::array::from_fn(|j| if (j as u64) < k { self.d.pfn(first + j as u64) } else { 0 });
        self.d.request_pfns(true, k, |j| pfns[j as usize]);
        for i in start..start + k {
            self.set_state(i, ZERO);
        }
        self.balloon -= k;
        k
    }

    /// Reports every free dirty page, in chains of up to [`REPORT_DESCS`] contiguous runs.
    fn report_free(&mut self) {
        let (lo, hi) = (self.used + self.cache, self.pool() - self.balloon);
        let mut i = lo;
        loop {
            let mut runs = [(0u64, 0u64); REPORT_DESCS];
            let mut n = 0;
            while i < hi && n < REPORT_DESCS {
                if self.state(i) != DIRTY {
                    i += 1;
                    continue;
                }
                let (s, g) = (i, self.gpa(i));
                while i < hi
                    && self.state(i) == DIRTY
                    && i - s < REPORT_RUN
                    && self.gpa(i) == g + (i - s) * PAGE_SIZE
                {
                    i += 1;
                }
                runs[n] = (s, i - s);
                n += 1;
            }
            if n == 0 {
                break;
            }
            let gpas: [u64; REPORT_DESCS] =
                core::array::from_fn(|k| if k < n { self.gpa(runs[k].0) } else { 0 });
            let vcpu = self.d.vcpu;
            let Some(q) = self.d.reporting.as_mut() else { return };
            for k in 0..n {
                let more = k + 1 < n;
                let flags = VIRTQ_DESC_F_WRITE | if more { VIRTQ_DESC_F_NEXT } else { 0 };
                q.set_desc(
                    k as u16,
                    gpas[k],
                    (runs[k].1 * PAGE_SIZE) as u32,
                    flags,
                    if more { k as u16 + 1 } else { 0 },
                );
            }
            q.push(0);
            self.d.mmio.notify(q.index);
            let (id, _) = Driver::wait_used(vcpu, &self.d.mmio, q);
            if id != 0 {
                fail(vcpu, format_args!("phased: the reporting queue returned descriptor {id}, sent 0"));
            }
            for (s, len) in &runs[..n] {
                for j in *s..s + len {
                    self.set_state(j, ZERO);
                }
                self.dirty -= len;
                self.reported += len;
            }
        }
    }

    fn stall_us(&self, now: u64) -> u64 {
        let ongoing = self.stall_since.map_or(0, |s| now.wrapping_sub(s));
        (self.stall_cycles + ongoing) * 1000 / self.params.tsc_khz
    }

    /// Fills the statistics buffer and queues it.
    fn send_stats(&mut self) {
        let b = PAGE_SIZE;
        let entries: [(u16, u64); NR_STATS] = [
            (tag::SWAP_IN, 0),
            (tag::SWAP_OUT, 0),
            (tag::MAJFLT, 0),
            (tag::MINFLT, 0),
            (tag::MEMFREE, self.free() * b),
            (tag::MEMTOT, self.pool() * b),
            (tag::AVAIL, (self.free() + self.cache) * b),
            (7, self.cache * b), // disk caches
            (ztag::WORKING_SET, self.used * b),
            (ztag::WANTED, self.wanted * b),
            (ztag::STALL_US, self.stall_us(arch::rdtsc())),
            (ztag::VERIFIED_PAGES, self.verified),
            (ztag::OOM_DEFLATED_PAGES, self.oom_deflated),
            (ztag::REPORTED_PAGES, self.reported),
        ];
        let buf = self.d.slice.page(STATS_PAGE);
        let Some(q) = self.d.stats.as_mut() else { return };
        for (i, (t, v)) in entries.iter().enumerate() {
            let at = buf + STAT_ENTRY_SIZE * i as u64;
            // SAFETY: the stats page is a carved page of this vCPU's slice; 14 entries of 10
            // bytes stay inside it. Entries are packed, so they are written as byte arrays.
            unsafe {
                (at as *mut [u8; 2]).write_volatile(t.to_le_bytes());
                ((at + 2) as *mut [u8; 8]).write_volatile(v.to_le_bytes());
            }
        }
        q.set_desc(0, buf, (STAT_ENTRY_SIZE * NR_STATS as u64) as u32, 0, 0);
        q.push(0);
        self.d.mmio.notify(q.index);
    }

    /// Verifies the next [`VERIFY_CHUNK`] pages of the working set.
    fn verify_chunk(&mut self) {
        let mut n = 0;
        while n < VERIFY_CHUNK && self.used > 0 {
            if self.cursor >= self.used {
                self.cursor = 0;
            }
            self.check(self.cursor, false, "working-set page lost its pattern");
            self.cursor += 1;
            self.verified += 1;
            n += 1;
        }
    }

    fn serve(&mut self) -> ! {
        let khz = self.params.tsc_khz;
        let start = arch::rdtsc();
        let mut last_poll = start.wrapping_sub(POLL_MS * khz);
        loop {
            let now = arch::rdtsc();
            self.wanted = wanted_pages(&self.params, now.wrapping_sub(start) / khz).min(self.pool());
            if self.wanted < self.used {
                self.shrink(self.used - self.wanted, now);
            }
            let mut stalled = false;
            if self.wanted > self.used {
                let mut k = (self.wanted - self.used).min(GROW_CHUNK);
                while k > 0 && self.grow_one() {
                    k -= 1;
                }
                if k > 0 {
                    if self.d.deflate_on_oom && self.balloon > 0 {
                        let t0 = arch::rdtsc();
                        self.oom_deflated += self.deflate(k);
                        self.d.mmio.write_config(CONFIG_ACTUAL, self.balloon as u32);
                        while k > 0 && self.grow_one() {
                            k -= 1;
                        }
                        self.stall_cycles += arch::rdtsc().wrapping_sub(t0);
                    } else {
                        stalled = true;
                    }
                }
            }
            match (stalled, self.stall_since) {
                (true, None) => self.stall_since = Some(now),
                (false, Some(s)) => {
                    self.stall_cycles += now.wrapping_sub(s);
                    self.stall_since = None;
                }
                _ => {}
            }
            if let Some(q) = self.d.stats.as_mut() {
                if q.pop_used().is_some() {
                    self.send_stats();
                }
            }
            if now.wrapping_sub(last_poll) >= POLL_MS * khz {
                last_poll = now;
                let target = u64::from(self.d.mmio.read_config(CONFIG_NUM_PAGES)).min(self.pool());
                // The whole way to the target (or as far as free and cache pages go) in one
                // go: a stalled guest must not wait a stall's idle between two batches.
                let before = self.balloon;
                loop {
                    let at = self.balloon;
                    if target > self.balloon {
                        self.inflate(target - self.balloon);
                    } else if target < self.balloon {
                        self.deflate(self.balloon - target);
                    }
                    if self.balloon == at {
                        break;
                    }
                }
                if self.balloon != before {
                    self.d.mmio.write_config(CONFIG_ACTUAL, self.balloon as u32);
                }
            }
            if self.dirty > 0
                && self.d.reporting.is_some()
                && now.wrapping_sub(self.dirty_since) >= self.params.report_delay_ms * khz
            {
                self.report_free();
            }
            if stalled {
                virtio::idle(self.d.vcpu, STALL_IDLE_US);
            } else {
                self.verify_chunk();
            }
        }
    }
}
