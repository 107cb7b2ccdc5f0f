//! [`guest_abi::Workload::Balloon`]: a polling virtio-balloon driver (virtio 1.2, §5.5) that
//! checks, page by page, that the host really gave back and took away what it said.
//!
//! Only vCPU 0 drives the device, over its own slice; any other vCPU fills and verifies its
//! slice like `Verify` and then idles (spins without exits) until the host stops the VM.
//!
//! # vCPU 0's slice
//! Pages are numbered by their index in the slice. The first [`WORK_FIRST`] pages are carved
//! out for the driver and must be contiguous (they are: the slice starts on a 2 MiB boundary):
//!
//! | pages | what |
//! |---|---|
//! | 0..4 | one page per virtqueue: inflate, deflate, stats, reporting (descriptors, avail, used) |
//! | 4 | PFN arrays of inflate/deflate requests (and of the hostile requests) |
//! | 5 | the statistics buffer |
//! | 6..70 | the "free" area: filled with the pattern, then pages 0..16 and 32..64 of it are reported free (they must read zeros afterwards) and 16..32 are not (they must keep the pattern) |
//! | 70.. | work pages: filled with the pattern; the balloon takes them from the end |
//!
//! The balloon is always a suffix of the work pages: inflating gives the host the highest page
//! still owned (in batches of up to [`BATCH`] PFNs, one descriptor per request), deflating takes
//! back the lowest page in the balloon (the most recently inflated), so "most recently inflated
//! first" holds without any bookkeeping beyond the balloon's size.
//!
//! # One step
//! Every ~[`POLL_CYCLES`] TSC cycles the driver reads `num_pages` (3 MMIO exits, with the
//! config generation check); when it differs from the balloon's size (clamped to the number of
//! work pages) it inflates or deflates to it, waiting for each request's used entry before the
//! next (so deflated pages are only touched once the host knows: MUST_TELL_HOST). Then it checks
//! that every work page it owns holds the pattern and every page it got back reads zeros (the host
//! discarded it while it was ballooned), refills the latter, reports the free area again after a
//! deflate, and only then writes `actual` and makes the Stage ucall. A host that sees `actual`
//! equal to its target therefore knows the guest has verified and refilled everything.
//!
//! The first time the balloon reaches a non-zero target, if DEFLATE_ON_OOM was negotiated, the
//! driver simulates memory pressure: it deflates a quarter of the balloon without being asked,
//! checks those pages read zeros, refills them, writes `actual`, reports
//! `Stage(STAGE_BALLOON_STEP | 1, pages deflated)`, and then inflates back to the target as usual.
//!
//! With [`FLAG_HOSTILE`] the driver first sends five malformed inflate requests (see
//! [`Driver::hostile`]) and checks that none of its memory changed.

use guest_abi::virtio::balloon::{
    tag, CONFIG_ACTUAL, CONFIG_NUM_PAGES, STAT_ENTRY_SIZE as STAT_ENTRY, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use guest_abi::virtio::device_type;
use guest_abi::{
    pattern, slice_pages, BootInfo, GpaRange, UcallKind, FLAG_HOSTILE, MAX_RANGES, PAGE_SIZE,
    STAGE_BALLOON_STEP,
};

use crate::virtio::{self, reg, status, Mmio, Virtqueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::{arch, fail, report};

/// Size of every queue the driver sets up.
const QUEUE_SIZE: u16 = 8;
/// Most PFNs in one inflate or deflate request (as Linux sends).
pub(crate) const BATCH: u64 = 256;
/// TSC cycles between two reads of the target (about 1 ms at 3 GHz; each read costs MMIO exits).
const POLL_CYCLES: u64 = 3_000_000;
/// TSC cycles the driver waits for the device to return a buffer before it gives up (the device
/// normally answers within the notify's exit).
const WAIT_CYCLES: u64 = 30_000_000_000;

/// Slice page of the inflate queue (the others follow: deflate, stats, reporting).
const QUEUE_PAGE: u64 = 0;
/// Slice page of the PFN arrays.
pub(crate) const ARRAY_PAGE: u64 = 4;
/// Slice page of the statistics buffer.
pub(crate) const STATS_PAGE: u64 = 5;
/// First page of the free area.
const FREE_FIRST: u64 = 6;
/// Pages of the free area.
const FREE_PAGES: u64 = 64;
/// The free area's pages reported free: `[a, b)` relative to [`FREE_FIRST`]. The pages between
/// the two ranges are never reported and must keep the pattern.
const REPORTED: [(u64, u64); 2] = [(0, 16), (32, 64)];
/// Microseconds of a [`guest_abi::Rendezvous::Idle`] between two polls (about [`POLL_CYCLES`]).
pub(crate) const IDLE_US: u64 = 1000;
/// First work page.
const WORK_FIRST: u64 = FREE_FIRST + FREE_PAGES;
// The host sizes its targets by the ABI's figure (`zapvm stress`).
const _: () = assert!(WORK_FIRST == guest_abi::BALLOON_CARVED_PAGES);

/// Words in a page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// Entries of the statistics buffer.
const NR_STATS: usize = 7;

/// A vCPU's slice as up to [`MAX_RANGES`] contiguous pieces, so that the `i`-th page is found
/// without walking every page.
pub(crate) struct Slice {
    pieces: [GpaRange; MAX_RANGES],
    nr: usize,
    pub(crate) pages: u64,
}

impl Slice {
    pub(crate) fn new(boot: &BootInfo, vcpu: u64) -> Self {
        let mut s = Slice { pieces: [GpaRange::default(); MAX_RANGES], nr: 0, pages: 0 };
        slice_pages(&boot.work[..boot.nr_work as usize], boot.nr_vcpus, vcpu, |gpa| {
            s.pages += 1;
            if s.nr > 0 && s.pieces[s.nr - 1].end == gpa {
                s.pieces[s.nr - 1].end += PAGE_SIZE;
            } else if s.nr < MAX_RANGES {
                s.pieces[s.nr] = GpaRange { start: gpa, end: gpa + PAGE_SIZE };
                s.nr += 1;
            }
        });
        s
    }

    /// Guest-physical address of page `index` (< `pages`).
    pub(crate) fn page(&self, mut index: u64) -> u64 {
        let mut i = 0;
        while i < self.nr {
            let p = self.pieces[i];
            if index < p.pages() {
                return p.start + index * PAGE_SIZE;
            }
            index -= p.pages();
            i += 1;
        }
        panic!("slice page index beyond the slice");
    }
}

/// Writes the pattern into every word of the page at `gpa`.
pub(crate) fn fill_page(seed: u64, gpa: u64) {
    let base = gpa as *mut u64;
    let mut word = 0;
    while word < WORDS_PER_PAGE {
        // SAFETY: `gpa` is a page of this vCPU's slice (identity mapped, writable, owned by this
        // vCPU and not in the balloon); word < 512 stays inside it.
        unsafe { base.add(word as usize).write_volatile(pattern(seed, gpa + 8 * word)) };
        word += 1;
    }
}

/// Checks that the page at `gpa` holds the pattern (`zeros` false) or zeros (`zeros` true);
/// returns the first wrong word as (address, found, expected).
pub(crate) fn check_page(seed: u64, gpa: u64, zeros: bool) -> Result<(), (u64, u64, u64)> {
    let base = gpa as *const u64;
    let mut word = 0;
    while word < WORDS_PER_PAGE {
        let at = gpa + 8 * word;
        // SAFETY: as in `fill_page`; a page got back from the balloon is still guest RAM (the
        // host dropped its contents, not the page).
        let found = unsafe { base.add(word as usize).read_volatile() };
        let expected = if zeros { 0 } else { pattern(seed, at) };
        if found != expected {
            return Err((at, found, expected));
        }
        word += 1;
    }
    Ok(())
}

/// The driver's state (all of it on vCPU 0's stack; the rings live in carved pages).
pub(crate) struct Driver {
    pub(crate) vcpu: u64,
    seed: u64,
    pub(crate) mmio: Mmio,
    pub(crate) slice: Slice,
    inflate: Virtqueue,
    deflate: Virtqueue,
    pub(crate) stats: Option<Virtqueue>,
    pub(crate) reporting: Option<Virtqueue>,
    pub(crate) deflate_on_oom: bool,
    /// Pages in the balloon: the work pages `[slice.pages - size, slice.pages)`.
    size: u64,
    /// Wait between polls in a [`guest_abi::Rendezvous::Idle`] rather than spinning.
    idle: bool,
}

/// [`guest_abi::Workload::Balloon`] (see the module docs).
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    let slice = Slice::new(boot, vcpu);
    if vcpu != 0 {
        // Other vCPUs: fill, verify, then idle without exits until the host stops the VM.
        let mut index = 0;
        while index < slice.pages {
            fill_page(boot.seed, slice.page(index));
            index += 1;
        }
        let mut index = 0;
        while index < slice.pages {
            if let Err((at, found, expected)) = check_page(boot.seed, slice.page(index), false) {
                fail(
                    vcpu,
                    format_args!(
                        "balloon (idle vCPU): word {at:#x} is {found:#018x}, expected {expected:#018x}"
                    ),
                );
            }
            index += 1;
        }
        loop {
            core::hint::spin_loop();
        }
    }
    drive(vcpu, boot, false)
}

/// Drives the balloon over `vcpu`'s slice forever (see the module docs; vCPU 0 of
/// [`guest_abi::Workload::Balloon`], or the balloon role of [`guest_abi::Workload::Stress`]).
/// With `idle`, the driver waits between two polls in a [`guest_abi::Rendezvous::Idle`] instead
/// of spinning.
pub fn drive(vcpu: u64, boot: &BootInfo, idle: bool) -> ! {
    let slice = Slice::new(boot, vcpu);
    let Some(device) = boot.virtio[..(boot.nr_virtio as usize).min(boot.virtio.len())]
        .iter()
        .find(|d| d.device_id == u64::from(device_type::BALLOON))
    else {
        fail(vcpu, format_args!("balloon: the boot info names no virtio-balloon device"));
    };
    if slice.pages <= WORK_FIRST {
        fail(vcpu, format_args!("balloon: the slice has {} pages, fewer than {WORK_FIRST} + 1", slice.pages));
    }
    if slice.pieces[0].pages() < WORK_FIRST {
        fail(vcpu, format_args!("balloon: the first {WORK_FIRST} pages of the slice are not contiguous"));
    }
    if slice.pieces[slice.nr - 1].end >> 12 > u64::from(u32::MAX) {
        fail(vcpu, format_args!("balloon: the slice reaches beyond what 32-bit PFNs name"));
    }
    let mut driver = Driver::init(vcpu, boot, Mmio::new(device.base), slice);
    driver.idle = idle;
    driver.fill_all();
    if boot.flags & FLAG_HOSTILE != 0 {
        driver.hostile(boot);
    }
    driver.send_stats();
    driver.report_free();
    driver.serve()
}

impl Driver {
    /// Device initialisation (virtio 1.2, §3.1.1 and §4.2.3): reset, ACKNOWLEDGE, DRIVER,
    /// features, FEATURES_OK (checked), queues, DRIVER_OK.
    pub(crate) fn init(vcpu: u64, boot: &BootInfo, mmio: Mmio, slice: Slice) -> Self {
        let magic = mmio.read(reg::MAGIC);
        let version = mmio.read(reg::VERSION);
        let id = mmio.read(reg::DEVICE_ID);
        if magic != virtio::MMIO_MAGIC || version != virtio::reg::VERSION_2 || id != device_type::BALLOON {
            fail(
                vcpu,
                format_args!(
                    "balloon: not a virtio-mmio v2 balloon: magic {magic:#x}, version {version}, id {id}"
                ),
            );
        }
        mmio.write(reg::STATUS, 0);
        if mmio.read(reg::STATUS) != 0 {
            fail(vcpu, format_args!("balloon: the device does not reset"));
        }
        mmio.add_status(status::ACKNOWLEDGE);
        mmio.add_status(status::DRIVER);
        let offered = mmio.device_features();
        let version_1 = 1u64 << virtio::VIRTIO_F_VERSION_1;
        if offered & version_1 == 0 {
            fail(vcpu, format_args!("balloon: device does not offer VIRTIO_F_VERSION_1 ({offered:#x})"));
        }
        let wanted = version_1
            | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
            | 1 << VIRTIO_BALLOON_F_STATS_VQ
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING;
        let accepted = offered & wanted;
        mmio.set_driver_features(accepted);
        let s = mmio.add_status(status::FEATURES_OK);
        if s & status::FEATURES_OK == 0 {
            fail(
                vcpu,
                format_args!("balloon: FEATURES_OK did not stick (accepted {accepted:#x}, status {s:#x})"),
            );
        }

        let queue_page = |i: u64| slice.page(QUEUE_PAGE + i);
        // SAFETY (all four): the queue pages are carved pages of this vCPU's slice that nothing
        // else uses (see the module docs).
        let inflate = unsafe { Virtqueue::new(0, QUEUE_SIZE, queue_page(0)) };
        let deflate = unsafe { Virtqueue::new(1, QUEUE_SIZE, queue_page(1)) };
        let mut next = 2;
        let stats = (accepted & 1 << VIRTIO_BALLOON_F_STATS_VQ != 0).then(|| {
            next += 1;
            // SAFETY: as above.
            unsafe { Virtqueue::new(next - 1, QUEUE_SIZE, queue_page(2)) }
        });
        let reporting = (accepted & 1 << VIRTIO_BALLOON_F_PAGE_REPORTING != 0).then(|| {
            // SAFETY: as above.
            unsafe { Virtqueue::new(next, QUEUE_SIZE, queue_page(3)) }
        });
        for q in [Some(&inflate), Some(&deflate), stats.as_ref(), reporting.as_ref()].into_iter().flatten() {
            if let Err(why) = q.setup(&mmio) {
                fail(vcpu, format_args!("balloon: queue {}: {why}", q.index));
            }
        }
        let s = mmio.add_status(status::DRIVER_OK);
        if s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0 {
            fail(vcpu, format_args!("balloon: DRIVER_OK refused (status {s:#x})"));
        }
        mmio.write_config(CONFIG_ACTUAL, 0);
        Self {
            vcpu,
            seed: boot.seed,
            mmio,
            slice,
            inflate,
            deflate,
            stats,
            reporting,
            deflate_on_oom: accepted & 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM != 0,
            size: 0,
            idle: false,
        }
    }

    /// The inflate queue's index (what a kick of it writes to QueueNotify).
    pub(crate) fn inflate_index(&self) -> u32 {
        self.inflate.index
    }

    /// Number of work pages (the most the balloon can hold).
    fn work_pages(&self) -> u64 {
        self.slice.pages - WORK_FIRST
    }

    /// Slice index of the first page in the balloon (one past the last page owned).
    fn balloon_start(&self) -> u64 {
        self.slice.pages - self.size
    }

    fn fill_range(&self, first: u64, end: u64) {
        let mut index = first;
        while index < end {
            fill_page(self.seed, self.slice.page(index));
            index += 1;
        }
    }

    /// Checks slice pages `[first, end)` for the pattern or zeros; fails naming `what`.
    fn check_range(&self, first: u64, end: u64, zeros: bool, what: &str) {
        let mut index = first;
        while index < end {
            if let Err((at, found, expected)) = check_page(self.seed, self.slice.page(index), zeros) {
                fail(
                    self.vcpu,
                    format_args!(
                        "balloon: {what}: word {at:#x} (slice page {index}) is {found:#018x}, expected {expected:#018x} (balloon {} pages)",
                        self.size
                    ),
                );
            }
            index += 1;
        }
    }

    /// The initial fill: the free area and every work page.
    fn fill_all(&self) {
        self.fill_range(FREE_FIRST, self.slice.pages);
    }

    /// Waits until `q` returns its oldest buffer and returns its (id, len).
    pub(crate) fn wait_used(vcpu: u64, mmio: &Mmio, q: &mut Virtqueue) -> (u32, u32) {
        let start = arch::rdtsc();
        loop {
            if let Some(used) = q.pop_used() {
                return used;
            }
            if arch::rdtsc().wrapping_sub(start) > WAIT_CYCLES {
                let s = mmio.read(reg::STATUS);
                fail(
                    vcpu,
                    format_args!(
                        "balloon: queue {} did not return a buffer (used idx {}, status {s:#x})",
                        q.index,
                        q.used_idx()
                    ),
                );
            }
            core::hint::spin_loop();
        }
    }

    /// Sends the chain starting at descriptor `head` on the inflate (`deflate` false) or deflate
    /// queue and waits for it to come back.
    pub(crate) fn request(&mut self, deflate: bool, head: u16) {
        let q = if deflate { &mut self.deflate } else { &mut self.inflate };
        q.push(head);
        self.mmio.notify(q.index);
        let (id, _) = Self::wait_used(self.vcpu, &self.mmio, q);
        if id != u32::from(head) {
            fail(self.vcpu, format_args!("balloon: queue {} returned descriptor {id}, sent {head}", q.index));
        }
    }

    /// Writes `pfns` PFN entries from `pfn_of(i)` into the array page at byte `offset`; returns
    /// the array's address.
    pub(crate) fn write_pfns(&self, offset: u64, count: u64, mut pfn_of: impl FnMut(u64) -> u32) -> u64 {
        let array = self.slice.page(ARRAY_PAGE) + offset;
        let mut i = 0;
        while i < count {
            // SAFETY: the array page is a carved page of this vCPU's slice; offset + 4 * count
            // stays inside it (callers keep count <= BATCH = 256 at offset 0, or a few entries).
            unsafe { ((array + 4 * i) as *mut u32).write_volatile(pfn_of(i)) };
            i += 1;
        }
        array
    }

    /// PFN of slice page `index`.
    pub(crate) fn pfn(&self, index: u64) -> u32 {
        (self.slice.page(index) >> 12) as u32
    }

    /// One inflate (`deflate` false) or deflate request of `count` (<= [`BATCH`]) PFNs,
    /// `pfn_of(i)` each, waited for (the phased workload's balloon).
    pub(crate) fn request_pfns(&mut self, deflate: bool, count: u64, pfn_of: impl FnMut(u64) -> u32) {
        let array = self.write_pfns(0, count.min(BATCH), pfn_of);
        let q = if deflate { &mut self.deflate } else { &mut self.inflate };
        q.set_desc(0, array, (4 * count.min(BATCH)) as u32, 0, 0);
        self.request(deflate, 0);
    }

    /// Inflates or deflates the balloon by `count` pages, `BATCH` at a time.
    fn move_pages(&mut self, deflate: bool, mut count: u64) {
        while count > 0 {
            let n = count.min(BATCH);
            let start = self.balloon_start();
            // Inflate: the n pages below the balloon, highest first; deflate: the lowest n pages
            // of the balloon (the most recently inflated), lowest first.
            let array = if deflate {
                self.write_pfns(0, n, |i| self.pfn(start + i))
            } else {
                self.write_pfns(0, n, |i| self.pfn(start - 1 - i))
            };
            let q = if deflate { &mut self.deflate } else { &mut self.inflate };
            q.set_desc(0, array, (4 * n) as u32, 0, 0);
            self.request(deflate, 0);
            if deflate {
                self.size -= n;
            } else {
                self.size += n;
            }
            count -= n;
        }
    }

    /// Writes `actual` and makes the Stage ucall `STAGE_BALLOON_STEP | kind`.
    fn announce(&self, kind: u64, pages: u64) {
        self.mmio.write_config(CONFIG_ACTUAL, self.size as u32);
        report(self.vcpu, UcallKind::Stage, &[STAGE_BALLOON_STEP | kind, pages]);
    }

    /// Deflates `count` pages and checks them: every page still owned holds the pattern, every
    /// page got back reads zeros; then refills those and reports the free area again.
    fn deflate_and_check(&mut self, count: u64) {
        let old_start = self.balloon_start();
        self.move_pages(true, count);
        self.check_range(WORK_FIRST, old_start, false, "owned page lost its pattern during a deflate");
        self.check_range(old_start, self.balloon_start(), true, "page got back from the balloon is not zero");
        self.fill_range(old_start, self.balloon_start());
        self.report_free();
    }

    /// Moves the balloon to `target` pages (see the module docs).
    fn step(&mut self, target: u64) {
        if target > self.size {
            self.move_pages(false, target - self.size);
            self.check_range(
                WORK_FIRST,
                self.balloon_start(),
                false,
                "owned page lost its pattern during an inflate",
            );
        } else {
            self.deflate_and_check(self.size - target);
        }
        self.announce(0, self.size);
    }

    /// The memory-pressure simulation of DEFLATE_ON_OOM: a quarter of the balloon comes back
    /// without a host request.
    fn deflate_on_oom(&mut self) {
        let count = self.size / 4;
        if count == 0 {
            return;
        }
        self.deflate_and_check(count);
        self.announce(1, count);
    }

    /// Polls for work forever: statistics requests (the stats queue's used ring, no exit) and,
    /// every [`POLL_CYCLES`], the target.
    fn serve(&mut self) -> ! {
        let mut oom_done = !self.deflate_on_oom;
        let mut last_poll = arch::rdtsc().wrapping_sub(POLL_CYCLES);
        loop {
            if let Some(q) = self.stats.as_mut() {
                if q.pop_used().is_some() {
                    self.send_stats();
                }
            }
            let now = arch::rdtsc();
            if now.wrapping_sub(last_poll) >= POLL_CYCLES {
                last_poll = now;
                let target = u64::from(self.mmio.read_config(CONFIG_NUM_PAGES)).min(self.work_pages());
                if target != self.size {
                    self.step(target);
                    if !oom_done && self.size > 0 {
                        oom_done = true;
                        self.deflate_on_oom();
                    }
                    last_poll = arch::rdtsc().wrapping_sub(POLL_CYCLES);
                }
            }
            if self.idle {
                virtio::idle(self.vcpu, IDLE_US);
            } else {
                core::hint::spin_loop();
            }
        }
    }

    /// Fills the statistics buffer and queues it (the device holds it until the host wants
    /// fresh statistics, then returns it through the used ring).
    fn send_stats(&mut self) {
        let Some(q) = self.stats.as_mut() else { return };
        let free = FREE_PAGES * PAGE_SIZE;
        let entries: [(u16, u64); NR_STATS] = [
            (tag::SWAP_IN, 0),
            (tag::SWAP_OUT, 0),
            (tag::MAJFLT, 0),
            (tag::MINFLT, 0),
            (tag::MEMFREE, free),
            (tag::MEMTOT, self.slice.pages * PAGE_SIZE),
            (tag::AVAIL, free),
        ];
        let buf = self.slice.page(STATS_PAGE);
        let mut i = 0;
        while i < NR_STATS {
            let at = buf + STAT_ENTRY * i as u64;
            let (t, v) = entries[i];
            // SAFETY: the stats page is a carved page of this vCPU's slice; 7 entries of 10
            // bytes stay inside it. Entries are packed, so they are written as byte arrays
            // (alignment 1).
            unsafe {
                (at as *mut [u8; 2]).write_volatile(t.to_le_bytes());
                ((at + 2) as *mut [u8; 8]).write_volatile(v.to_le_bytes());
            }
            i += 1;
        }
        q.set_desc(0, buf, (STAT_ENTRY * NR_STATS as u64) as u32, 0, 0);
        q.push(0);
        self.mmio.notify(q.index);
    }

    /// Free page reporting: refills the free area with the pattern, reports the [`REPORTED`]
    /// parts of it as one chain of device-writable buffers, waits for it, and checks that the
    /// reported pages read zeros and the rest of the area kept the pattern.
    fn report_free(&mut self) {
        let vcpu = self.vcpu;
        let (first, end) = (FREE_FIRST, FREE_FIRST + FREE_PAGES);
        let addrs =
            [self.slice.page(FREE_FIRST + REPORTED[0].0), self.slice.page(FREE_FIRST + REPORTED[1].0)];
        let Some(q) = self.reporting.as_mut() else { return };
        let mut index = first;
        while index < end {
            fill_page(self.seed, self.slice.page(index));
            index += 1;
        }
        let len = |r: (u64, u64)| ((r.1 - r.0) * PAGE_SIZE) as u32;
        q.set_desc(0, addrs[0], len(REPORTED[0]), VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
        q.set_desc(1, addrs[1], len(REPORTED[1]), VIRTQ_DESC_F_WRITE, 0);
        q.push(0);
        self.mmio.notify(q.index);
        let (id, _) = Self::wait_used(vcpu, &self.mmio, q);
        if id != 0 {
            fail(vcpu, format_args!("balloon: the reporting queue returned descriptor {id}, sent 0"));
        }
        for (a, b) in REPORTED {
            self.check_range(FREE_FIRST + a, FREE_FIRST + b, true, "reported free page is not zero");
        }
        self.check_range(
            FREE_FIRST + REPORTED[0].1,
            FREE_FIRST + REPORTED[1].0,
            false,
            "free-area page next to the reported ones lost its pattern",
        );
    }

    /// [`FLAG_HOSTILE`]: five malformed inflate requests, each its own chain, each waited for:
    /// a PFN beyond RAM (next to a page of ours), a duplicate PFN pair (of ours), a descriptor of
    /// length 3, a two-descriptor loop, a buffer outside RAM. A device that acted on any of them
    /// would have discarded one of our pages; so every page we own must still hold the pattern.
    /// Then `Stage(STAGE_BALLOON_STEP | 2, 5)`.
    fn hostile(&mut self, boot: &BootInfo) {
        // The first page beyond RAM: the end of the highest work range (RAM ends there).
        let ram_end = boot.work[..boot.nr_work as usize]
            .iter()
            .map(|r| r.end)
            .fold(0, u64::max)
            .next_multiple_of(PAGE_SIZE);
        let last = self.slice.pages - 1;
        let ours = [self.pfn(last), self.pfn(last - 1), self.pfn(WORK_FIRST), self.pfn(WORK_FIRST + 1)];

        // 1. A PFN beyond RAM next to one of ours: the request must be refused as a whole.
        let a = self.write_pfns(0x000, 2, |i| if i == 0 { ours[0] } else { (ram_end >> 12) as u32 });
        self.inflate.set_desc(0, a, 8, 0, 0);
        self.request(false, 0);
        // 2. The same PFN twice.
        let b = self.write_pfns(0x100, 2, |_| ours[1]);
        self.inflate.set_desc(0, b, 8, 0, 0);
        self.request(false, 0);
        // 3. A descriptor of length 3 (not a whole PFN).
        let c = self.write_pfns(0x200, 1, |_| ours[2]);
        self.inflate.set_desc(0, c, 3, 0, 0);
        self.request(false, 0);
        // 4. Two descriptors whose `next` point at each other.
        let d = self.write_pfns(0x300, 1, |_| ours[3]);
        self.inflate.set_desc(0, d, 4, VIRTQ_DESC_F_NEXT, 1);
        self.inflate.set_desc(1, d, 4, VIRTQ_DESC_F_NEXT, 0);
        self.request(false, 0);
        // 5. A buffer outside RAM.
        self.inflate.set_desc(0, ram_end, 4, 0, 0);
        self.request(false, 0);

        self.check_range(WORK_FIRST, self.slice.pages, false, "page changed after the hostile requests");
        self.check_range(FREE_FIRST, WORK_FIRST, false, "free-area page changed after the hostile requests");
        report(self.vcpu, UcallKind::Stage, &[STAGE_BALLOON_STEP | 2, 5]);
    }
}
