//! Benchmarks of the notifier against the raw host operations, all measured in one run
//! (the host is noisy: compare only within a run). Entry point: [`run`].
//!
//! What is measured:
//! * `discard`: ns per discard through [`AddressSpace::discard`] and with a raw `madvise`, for
//!   4 KiB, 64 KiB, 2 MiB and 1 GiB calls (quick mode: 32 MiB instead of 1 GiB) over populated
//!   private anonymous memory (4 KiB pages) and THP-backed memory, with 0, 1, 8, 64 subscribers;
//!   `ratio_vs_raw` = notifier / raw (medians over rounds; each round populates, then times).
//! * `per_page_vs_range`: invalidating THP-backed memory (1 GiB; quick: 64 MiB) the old
//!   `invalidate_page` way — one madvise, then one callback (start/range/end) per 4 KiB page —
//!   and the per-page-API way (one discard per 4 KiB page), versus one range discard.
//! * `uffd_overhead` / `uffd_p99_us`: a 4 KiB (and 2 MiB) external `madvise(DONTNEED)` from this
//!   thread on registered memory with the monitor running, versus without; p99 in microseconds,
//!   with the default spin and with spin 0.
//! * `uffd_refault`: ns per first touch of a 4 KiB page after a discard, registered (WP) versus not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use notifier::{
    AddressSpace, Backing, DiscardMethod, Event, Monitor, MonitorOptions, Origin, Range, RegionSpec,
    Subscriber, HUGE_PAGE_SIZE, PAGE_SIZE,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Small sizes and few iterations (CI).
    pub quick: bool,
    /// Rounds per case (medians are reported).
    pub rounds: usize,
    /// Samples for the uffd latency distribution.
    pub uffd_samples: usize,
}

impl BenchOptions {
    /// Quick mode: 32 MiB instead of 1 GiB, 3 rounds, 2,000 uffd samples.
    pub fn quick() -> Self {
        BenchOptions { quick: true, rounds: 4, uffd_samples: 2_000 }
    }

    /// Full mode: 1 GiB, 6 rounds, 20,000 uffd samples.
    pub fn full() -> Self {
        BenchOptions { quick: false, rounds: 6, uffd_samples: 20_000 }
    }
}

/// One discard case.
#[derive(Clone, Debug, Serialize)]
pub struct DiscardRow {
    /// `4K`, `64K`, `2M`, `1G` (`32M` in quick mode).
    pub size: String,
    /// Bytes per call.
    pub bytes: usize,
    /// `anon` (4 KiB pages) or `thp`.
    pub backing: String,
    /// Subscribers.
    pub subscribers: usize,
    /// ns per call through the notifier.
    pub notifier_ns: f64,
    /// ns per call with raw madvise.
    pub raw_ns: f64,
    /// notifier_ns / raw_ns.
    pub ratio_vs_raw: f64,
}

/// The seed's case.
#[derive(Clone, Debug, Serialize)]
pub struct PerPage {
    /// Bytes invalidated.
    pub bytes: usize,
    /// One range discard through the notifier (1 subscriber), ns.
    pub range_ns: f64,
    /// One raw madvise plus one start/range/end per 4 KiB page, ns.
    pub per_page_callbacks_ns: f64,
    /// One notifier discard per 4 KiB page, ns.
    pub per_page_discards_ns: f64,
    /// per_page_callbacks_ns / range_ns.
    pub ratio: f64,
    /// per_page_discards_ns / range_ns.
    pub ratio_discards: f64,
    /// Smallest fraction of the buffer that was THP-backed after populating (process-wide
    /// AnonHugePages; < 1 when the kernel fell back to 4 KiB pages).
    pub thp_backed_fraction: f64,
}

/// External madvise with and without the monitor.
#[derive(Clone, Debug, Serialize)]
pub struct UffdCase {
    /// Bytes per madvise.
    pub bytes: usize,
    /// Median ns without the monitor.
    pub without_ns: f64,
    /// Median ns with the monitor (default spin).
    pub with_ns: f64,
    /// with / without.
    pub ratio: f64,
    /// p99 without, us.
    pub without_p99_us: f64,
    /// p99 with the monitor (default spin), us.
    pub with_p99_us: f64,
    /// Median with the monitor and spin 0, ns.
    pub with_nospin_ns: f64,
    /// p99 with the monitor and spin 0, us.
    pub with_nospin_p99_us: f64,
}

/// 4 KiB discards with 64 subscribers of which one overlaps, against one subscriber (issue 13,
/// point 6: subscribers are found by interval, not by scan).
#[derive(Clone, Debug, Serialize)]
pub struct SparseSubscribers {
    /// ns per 4 KiB discard, one subscriber over the buffer.
    pub one_ns: f64,
    /// ns per 4 KiB discard, that subscriber plus 63 whose intervals lie outside the buffer.
    pub sparse_64_ns: f64,
    /// sparse_64_ns / one_ns (goal <= 1.1).
    pub ratio: f64,
}

/// First touch after a discard.
#[derive(Clone, Debug, Serialize)]
pub struct Refault {
    /// ns per 4 KiB page, not registered.
    pub without_ns: f64,
    /// ns per 4 KiB page, registered with the monitor (WP mode).
    pub with_ns: f64,
    /// with / without.
    pub ratio: f64,
}

/// Everything, serialisable to the JSON `zapvm bench notifier` writes.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `quick` or `full`.
    pub mode: String,
    /// All discard cases.
    pub discard: Vec<DiscardRow>,
    /// backing -> size -> subscribers -> ratio.
    pub ratio_vs_raw: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// The target case: 2 MiB, one subscriber (anon and thp).
    pub target_2m_1sub: BTreeMap<String, f64>,
    /// The seed's case.
    pub per_page_vs_range: PerPage,
    /// 64 subscribers of which one overlaps vs one (4 KiB discards).
    pub sparse_subscribers_4k: SparseSubscribers,
    /// External madvise with/without the monitor.
    pub uffd_overhead: Vec<UffdCase>,
    /// p99 of a 4 KiB external madvise with the monitor, us.
    pub uffd_p99_us: f64,
    /// First touch after discard, registered vs not.
    pub uffd_refault: Refault,
}

struct Counting(AtomicU64);
impl Subscriber for Counting {
    fn name(&self) -> &str {
        "bench"
    }
    fn invalidate_range_start(&self, _: &Range) -> Result<(), notifier::Refused> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range(&self, _: &Range) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn invalidate_range_end(&self, _: &Range) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A private anonymous mapping for the benchmark, unmapped on drop.
struct Buf {
    raw: usize,
    raw_len: usize,
    base: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, thp: bool) -> Buf {
        let raw_len = len + HUGE_PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "bench mmap of {len} bytes failed");
        let base = (raw as usize + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1);
        let advice = if thp { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(base as *mut libc::c_void, len, advice) };
        Buf { raw: raw as usize, raw_len, base, len }
    }

    fn populate(&self) {
        for off in (0..self.len).step_by(PAGE_SIZE) {
            // SAFETY: inside our mapping; raw-pointer access only.
            unsafe { ((self.base + off) as *mut u8).write_volatile(1) };
        }
    }

    fn spec(&self, thp: bool) -> RegionSpec {
        RegionSpec { host_addr: self.base, len: self.len, backing: Backing::PrivateAnon, thp }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.raw as *mut libc::c_void, self.raw_len) };
    }
}

fn madvise(addr: usize, len: usize) {
    // SAFETY: benchmark memory, accessed through raw pointers only.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise failed");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn label(n: usize) -> String {
    if n >= 1 << 30 {
        format!("{}G", n >> 30)
    } else if n >= 1 << 20 {
        format!("{}M", n >> 20)
    } else {
        format!("{}K", n >> 10)
    }
}

fn space_over(b: &Buf, thp: bool, subs: usize) -> Arc<AddressSpace> {
    // SAFETY: the benchmark buffer is accessed through raw pointers only and outlives the space.
    let s = unsafe { AddressSpace::new(&[b.spec(thp)]) }.expect("bench address space");
    for _ in 0..subs {
        s.subscribe(Arc::new(Counting(AtomicU64::new(0)))).unwrap();
    }
    s
}

/// Times discards of every `size` chunk of `b` (populated first), `first` and `second`
/// taking turns chunk by chunk (`first` on even chunks); ns per call of each.
///
/// Interleaving gives both variants the same memory state and cache pollution: timing all of one
/// and then all of the other over a re-populated buffer let page-allocator and THP-refault
/// effects fall on one side only.
fn time_discards(
    b: &Buf,
    size: usize,
    first: &dyn Fn(usize, usize),
    second: &dyn Fn(usize, usize),
) -> (f64, f64) {
    b.populate();
    let n = b.len / size;
    let (mut t_first, mut t_second) = (0u128, 0u128);
    for i in 0..n {
        let f = if i % 2 == 0 { first } else { second };
        let t = Instant::now();
        f(b.base + i * size, size);
        let ns = t.elapsed().as_nanos();
        if i % 2 == 0 {
            t_first += ns;
        } else {
            t_second += ns;
        }
    }
    let (n_first, n_second) = (n.div_ceil(2).max(1), (n / 2).max(1));
    (t_first as f64 / n_first as f64, t_second as f64 / n_second as f64)
}

/// Runs the benchmark; `progress` gets one line per case.
pub fn run(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> BenchReport {
    let big = if o.quick { 32 << 20 } else { 1 << 30 };
    let small_buf = if o.quick { 16 << 20 } else { 128 << 20 };
    let sizes = [4 << 10, 64 << 10, HUGE_PAGE_SIZE, big];
    let subs = [0usize, 1, 8, 64];
    let mut rows = Vec::new();
    for thp in [false, true] {
        for &size in &sizes {
            // At least two chunks: the variants take turns chunk by chunk.
            let b = Buf::new(small_buf.max(2 * size), thp);
            for &n in &subs {
                let s = space_over(&b, thp, n);
                let (mut raw, mut not) = (Vec::new(), Vec::new());
                let raw_call = |a, l| madvise(a, l);
                let notifier_call = |a, l| {
                    s.discard(a, l).expect("bench discard");
                };
                for round in 0..o.rounds {
                    // Alternate which variant takes the even chunks.
                    if round % 2 == 0 {
                        let (r, n) = time_discards(&b, size, &raw_call, &notifier_call);
                        raw.push(r);
                        not.push(n);
                    } else {
                        let (n, r) = time_discards(&b, size, &notifier_call, &raw_call);
                        raw.push(r);
                        not.push(n);
                    }
                }
                let (r, nn) = (median(&mut raw), median(&mut not));
                let row = DiscardRow {
                    size: label(size),
                    bytes: size,
                    backing: if thp { "thp" } else { "anon" }.into(),
                    subscribers: n,
                    notifier_ns: nn,
                    raw_ns: r,
                    ratio_vs_raw: nn / r,
                };
                progress(&format!(
                    "discard {:>4} {:4} {:2} subs: notifier {:>12.0} ns raw {:>12.0} ns ratio {:.3}",
                    row.size, row.backing, n, nn, r, row.ratio_vs_raw
                ));
                rows.push(row);
            }
        }
    }
    let mut ratio: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    let mut target = BTreeMap::new();
    for r in &rows {
        ratio
            .entry(r.backing.clone())
            .or_default()
            .entry(r.size.clone())
            .or_default()
            .insert(r.subscribers.to_string(), r.ratio_vs_raw);
        if r.bytes == HUGE_PAGE_SIZE && r.subscribers == 1 {
            target.insert(r.backing.clone(), r.ratio_vs_raw);
        }
    }
    let per_page = per_page_vs_range(o, progress);
    let sparse = sparse_subscribers(o, progress);
    let uffd = uffd_cases(o, progress);
    let p99 = uffd[0].with_p99_us;
    let refault = refault(o, progress);
    BenchReport {
        mode: if o.quick { "quick" } else { "full" }.into(),
        discard: rows,
        ratio_vs_raw: ratio,
        target_2m_1sub: target,
        per_page_vs_range: per_page,
        sparse_subscribers_4k: sparse,
        uffd_overhead: uffd,
        uffd_p99_us: p99,
        uffd_refault: refault,
    }
}

/// Process-wide AnonHugePages in bytes.
fn anon_huge_bytes() -> usize {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn per_page_vs_range(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> PerPage {
    let len = if o.quick { 64 << 20 } else { 1 << 30 };
    let (mut range, mut cb, mut disc) = (Vec::new(), Vec::new(), Vec::new());
    let mut thp_frac = 1.0f64;
    // A fresh THP-backed buffer per measurement: re-faulting a range this process just
    // discarded does not reliably get huge pages again on this host.
    let mut fresh = || {
        let b = Buf::new(len, true);
        let before = anon_huge_bytes();
        b.populate();
        let f = anon_huge_bytes().saturating_sub(before) as f64 / len as f64;
        thp_frac = thp_frac.min(f.min(1.0));
        let s = space_over(&b, true, 1);
        (b, s)
    };
    for _ in 0..o.rounds {
        let (b, s) = fresh();
        let t = Instant::now();
        s.discard(b.base, len).expect("bench discard");
        range.push(t.elapsed().as_nanos() as f64);
        drop((s, b));

        let (b, s) = fresh();
        let t = Instant::now();
        madvise(b.base, len);
        for p in (b.base..b.base + len).step_by(PAGE_SIZE) {
            let r = Range {
                start: p,
                end: p + PAGE_SIZE,
                exact_start: p,
                exact_end: p + PAGE_SIZE,
                event: Event::Discard(DiscardMethod::DontNeed),
                origin: Origin::Vmm,
                blockable: true,
            };
            let _ = s.notify_only(r);
        }
        cb.push(t.elapsed().as_nanos() as f64);
        drop((s, b));

        let (b, s) = fresh();
        let t = Instant::now();
        for p in (b.base..b.base + len).step_by(PAGE_SIZE) {
            s.discard(p, PAGE_SIZE).expect("bench discard");
        }
        disc.push(t.elapsed().as_nanos() as f64);
        drop((s, b));
    }
    let (r, c, d) = (median(&mut range), median(&mut cb), median(&mut disc));
    let pp = PerPage {
        bytes: len,
        range_ns: r,
        per_page_callbacks_ns: c,
        per_page_discards_ns: d,
        ratio: c / r,
        ratio_discards: d / r,
        thp_backed_fraction: thp_frac,
    };
    progress(&format!(
        "per-page vs range ({} THP): range {:.0} us, madvise+per-page callbacks {:.0} us ({:.1}x), per-page discards {:.0} us ({:.1}x); THP-backed fraction {:.2}",
        label(len), r / 1e3, c / 1e3, pp.ratio, d / 1e3, pp.ratio_discards, thp_frac
    ));
    pp
}

/// The sparse-subscriber case: two address spaces over one buffer, one with a single subscriber
/// over it, one with that and 63 over disjoint intervals past its end; 4 KiB discards taking turns.
fn sparse_subscribers(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> SparseSubscribers {
    let b = Buf::new(if o.quick { 16 << 20 } else { 128 << 20 }, false);
    let over = |subs: usize| {
        let s = space_over(&b, false, 0);
        s.subscribe_range(Arc::new(Counting(AtomicU64::new(0))), b.base, b.len).unwrap();
        for i in 1..subs {
            let start = b.base + b.len + i * 2 * PAGE_SIZE;
            s.subscribe_range(Arc::new(Counting(AtomicU64::new(0))), start, PAGE_SIZE).unwrap();
        }
        s
    };
    let (one, sparse) = (over(1), over(64));
    let one_call = |a, l| {
        one.discard(a, l).expect("bench discard");
    };
    let sparse_call = |a, l| {
        sparse.discard(a, l).expect("bench discard");
    };
    let (mut t1, mut t64) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        if round % 2 == 0 {
            let (a, c) = time_discards(&b, PAGE_SIZE, &one_call, &sparse_call);
            t1.push(a);
            t64.push(c);
        } else {
            let (c, a) = time_discards(&b, PAGE_SIZE, &sparse_call, &one_call);
            t1.push(a);
            t64.push(c);
        }
    }
    let (one_ns, sparse_64_ns) = (median(&mut t1), median(&mut t64));
    let r = SparseSubscribers { one_ns, sparse_64_ns, ratio: sparse_64_ns / one_ns };
    progress(&format!(
        "discard 4K, 64 subscribers of which 1 overlaps: {:.0} ns vs 1 subscriber {:.0} ns: x{:.3}",
        r.sparse_64_ns, r.one_ns, r.ratio
    ));
    r
}

/// The external madvise cases (4 KiB and 2 MiB), with and without the monitor.
pub fn uffd_cases(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Vec<UffdCase> {
    vec![uffd_case(o, PAGE_SIZE, progress), uffd_case(o, HUGE_PAGE_SIZE, progress)]
}

/// The sparse-subscriber case alone (see [`SparseSubscribers`]).
pub fn sparse_subscribers_case(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> SparseSubscribers {
    sparse_subscribers(o, progress)
}

/// External madvise latencies (from this thread) on registered memory.
fn external_samples(b: &Buf, size: usize, n: usize) -> Vec<f64> {
    let chunks = b.len / size;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let a = b.base + (i % chunks) * size;
        // Populate the chunk (one touch per page) outside the timed part.
        for off in (0..size).step_by(PAGE_SIZE) {
            // SAFETY: inside the benchmark buffer.
            unsafe { ((a + off) as *mut u8).write_volatile(1) };
        }
        let t = Instant::now();
        madvise(a, size);
        v.push(t.elapsed().as_nanos() as f64);
    }
    v
}

fn uffd_case(o: &BenchOptions, size: usize, progress: &mut dyn FnMut(&str)) -> UffdCase {
    let n = if size == PAGE_SIZE { o.uffd_samples } else { o.uffd_samples / 10 };
    let b = Buf::new(if o.quick { 16 << 20 } else { 64 << 20 }, false);
    let s = space_over(&b, false, 1);
    let mut without = external_samples(&b, size, n);
    let mon = Monitor::start(&s, MonitorOptions::default()).expect("uffd benchmark needs userfaultfd (root)");
    let mut with = external_samples(&b, size, n);
    mon.stop().expect("monitor stop");
    let mon = Monitor::start(&s, MonitorOptions { spin: Duration::ZERO, ..Default::default() })
        .expect("uffd benchmark needs userfaultfd (root)");
    let mut nospin = external_samples(&b, size, n);
    mon.stop().expect("monitor stop");
    let c = UffdCase {
        bytes: size,
        without_ns: median(&mut without),
        with_ns: median(&mut with),
        ratio: 0.0,
        without_p99_us: pct(&mut without, 0.99) / 1e3,
        with_p99_us: pct(&mut with, 0.99) / 1e3,
        with_nospin_ns: median(&mut nospin),
        with_nospin_p99_us: pct(&mut nospin, 0.99) / 1e3,
    };
    let c = UffdCase { ratio: c.with_ns / c.without_ns, ..c };
    progress(&format!(
        "external madvise {}: without {:.0} ns (p99 {:.1} us), with monitor {:.0} ns (p99 {:.1} us, x{:.2}), spin 0: {:.0} ns (p99 {:.1} us)",
        label(size), c.without_ns, c.without_p99_us, c.with_ns, c.with_p99_us, c.ratio, c.with_nospin_ns, c.with_nospin_p99_us
    ));
    c
}

fn refault(o: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Refault {
    let len = if o.quick { 16 << 20 } else { 64 << 20 };
    let b = Buf::new(len, false);
    let pages = (len / PAGE_SIZE) as f64;
    let touch = |b: &Buf| {
        b.populate();
        madvise(b.base, b.len);
        let t = Instant::now();
        b.populate();
        t.elapsed().as_nanos() as f64 / pages
    };
    let s = space_over(&b, false, 0);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds.max(3) {
        without.push(touch(&b));
        let mon =
            Monitor::start(&s, MonitorOptions::default()).expect("uffd benchmark needs userfaultfd (root)");
        with.push(touch(&b));
        mon.stop().expect("monitor stop");
    }
    let r = Refault { without_ns: median(&mut without), with_ns: median(&mut with), ratio: 0.0 };
    let r = Refault { ratio: r.with_ns / r.without_ns, ..r };
    progress(&format!(
        "first touch after discard: {:.0} ns/page without, {:.0} ns/page registered (x{:.2})",
        r.without_ns, r.with_ns, r.ratio
    ));
    r
}

impl BenchReport {
    /// The report as markdown tables.
    pub fn to_markdown_table(&self) -> String {
        let mut s = String::new();
        s += &format!("## notifier benchmark ({} mode)\n\n", self.mode);
        s += "| size | backing | subscribers | notifier ns/call | raw madvise ns/call | ratio_vs_raw |\n|---|---|---|---|---|---|\n";
        for r in &self.discard {
            s += &format!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.3} |\n",
                r.size, r.backing, r.subscribers, r.notifier_ns, r.raw_ns, r.ratio_vs_raw
            );
        }
        let p = &self.per_page_vs_range;
        s += &format!(
            "\n| per_page_vs_range ({} THP) | us | vs range |\n|---|---|---|\n| one range discard | {:.0} | 1.0 |\n| madvise + one callback per 4 KiB page | {:.0} | {:.1} |\n| one discard per 4 KiB page | {:.0} | {:.1} |\n(THP-backed fraction: {:.2})\n",
            label(p.bytes), p.range_ns / 1e3, p.per_page_callbacks_ns / 1e3, p.ratio,
            p.per_page_discards_ns / 1e3, p.ratio_discards, p.thp_backed_fraction
        );
        s += "\n| external madvise | without ns | with monitor ns | uffd_overhead | p99 without us | p99 with us | spin 0 ns | spin 0 p99 us |\n|---|---|---|---|---|---|---|---|\n";
        for c in &self.uffd_overhead {
            s += &format!(
                "| {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.1} |\n",
                label(c.bytes),
                c.without_ns,
                c.with_ns,
                c.ratio,
                c.without_p99_us,
                c.with_p99_us,
                c.with_nospin_ns,
                c.with_nospin_p99_us
            );
        }
        s += &format!("\nuffd_p99_us (4 KiB, default monitor): {:.1}\n", self.uffd_p99_us);
        let sp = &self.sparse_subscribers_4k;
        s += &format!(
            "4 KiB discard, 64 subscribers of which 1 overlaps: {:.0} ns vs 1 subscriber {:.0} ns: x{:.3} (goal <= 1.1)\n",
            sp.sparse_64_ns, sp.one_ns, sp.ratio
        );
        let r = &self.uffd_refault;
        s += &format!(
            "uffd_refault: {:.0} ns/page registered vs {:.0} ns/page not (x{:.2})\n",
            r.with_ns, r.without_ns, r.ratio
        );
        for (k, v) in &self.target_2m_1sub {
            s += &format!("target ratio_vs_raw at 2M, 1 subscriber ({k}): {v:.3} (goal <= 1.05)\n");
        }
        s
    }
}
