//! `zapvm bench access`: what one device-path access to guest RAM costs through the VMM's
//! second-level table ([`GuestMmu`]), against the floor and against the kernel-copy path.
//!
//! In-process, no VM: guest RAM from [`GuestRam`], the notifier's address space over it, and two
//! tables subscribed to it, one per copy path. For reads and writes of 16 B, 256 B and 4 KiB,
//! three variants are timed side by side, interleaved chunk by chunk so that a burst of host load
//! lands on all of them (the report gives medians over the chunks):
//! - `memcpy`: `ptr::copy_nonoverlapping` between a buffer and the host mapping of guest RAM;
//! - `direct`: [`CopyPath::Direct`], the hit path (the translation is installed before timing):
//!   the access lock's read side, an O(1) entry lookup and the fault-tolerant copy routine;
//! - `syscall`: [`CopyPath::Syscall`], one `process_vm_readv`/`process_vm_writev` per access;
//! - `locked_memcpy`: the memcpy under an uncontended `RwLock`'s read side plus one relaxed
//!   counter increment — the synchronisation the hit path does (M1's read side, the hit counter)
//!   without its lookups: the floor of any copy that must hold off an invalidation.
//!
//! `access_vs_memcpy` = direct / memcpy and `access_vs_syscall` = direct / syscall. The system
//! calls each variant makes per access are counted with a perf counter on the kernel's
//! `raw_syscalls:sys_enter` tracepoint for the measuring thread (needs tracefs mounted and root);
//! where it cannot be opened the report says why and leaves the counts out. The counter proves
//! itself on every run: the syscall path must count at least one call per access, or the bench
//! fails rather than report a zero it did not see.
//!
//! Then contention: two reader threads read 256 B through the direct path at random pages of a
//! 2 MiB window, alone and with an invalidator thread discarding single pages of that window
//! through the notifier (each discard drops the entry under the access lock's write side, the
//! next read of the page misses and installs it again). Alternated rounds, medians.

use std::hint::black_box;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use notifier::AddressSpace;
use plotters::prelude::*;

use crate::bench::median;
use vmm::memory::{GuestRam, MemoryBackend, MemoryConfig, PAGE_SIZE};
use vmm::mmu::{CopyPath, GuestMemoryAccess, GuestMmu};

const PAGE: usize = PAGE_SIZE as usize;
/// Access sizes measured.
pub const SIZES: [usize; 3] = [16, 256, 4096];
/// Guest RAM of the benchmark.
const RAM: u64 = 16 << 20;
/// Pages the timed accesses cycle through (all installed, all in the CPU's caches).
const SPREAD: usize = 64;
/// The contention window: 2 MiB from guest-physical 8 MiB.
const WINDOW_GPA: u64 = 8 << 20;
const WINDOW_PAGES: usize = 512;

/// Options of `bench access`.
#[derive(Clone, Debug)]
pub struct AccessBenchOptions {
    /// Chunks per variant (the medians are over these).
    pub rounds: usize,
    /// Accesses per chunk.
    pub chunk: usize,
    /// Length of one contention phase.
    pub phase: Duration,
    /// Alternated contention rounds (each: readers alone, then with the invalidator).
    pub contention_rounds: usize,
}

impl AccessBenchOptions {
    /// A quick run (a few seconds).
    pub fn quick() -> Self {
        AccessBenchOptions {
            rounds: 31,
            chunk: 2_000,
            phase: Duration::from_millis(200),
            contention_rounds: 5,
        }
    }

    /// More chunks and longer contention phases (about a minute).
    pub fn full() -> Self {
        AccessBenchOptions { rounds: 201, chunk: 5_000, phase: Duration::from_secs(1), contention_rounds: 15 }
    }
}

/// One direction and size.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AccessRow {
    /// "read" (guest memory -> buffer) or "write".
    pub op: String,
    /// Bytes per access.
    pub bytes: usize,
    /// Median ns per access of each variant.
    pub memcpy_ns: f64,
    pub direct_ns: f64,
    pub syscall_ns: f64,
    pub locked_memcpy_ns: f64,
    /// direct / memcpy.
    pub access_vs_memcpy: f64,
    /// direct / syscall.
    pub access_vs_syscall: f64,
    /// System calls per access on the direct path and on the syscall path (`None`: not countable
    /// here, see [`AccessReport::syscall_counter`]).
    pub direct_syscalls_per_access: Option<f64>,
    pub syscall_syscalls_per_access: Option<f64>,
}

/// The contention figures.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ContentionReport {
    /// Reader threads.
    pub readers: usize,
    /// Bytes per read.
    pub bytes: usize,
    /// Median ns per read of one reader thread alone (phase length / its reads).
    pub one_reader_ns: f64,
    /// The same per reader with [`Self::readers`] readers and nothing else: above
    /// `one_reader_ns`, the readers contend (on the read side's cache line, or for the cores).
    pub alone_ns: f64,
    /// The same with the invalidator running.
    pub with_invalidator_ns: f64,
    /// with_invalidator / alone.
    pub invalidator_slowdown: f64,
    /// Median discards per second the invalidator made.
    pub invalidations_per_s: f64,
    /// Share of the readers' accesses that missed (and installed) with the invalidator running.
    pub miss_share: f64,
    /// Reads that failed (must be 0: a discard keeps the range mapped).
    pub failed_reads: u64,
}

/// The report of `bench access`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AccessReport {
    /// The command line.
    pub command: String,
    /// RFC 3339 UTC time of the run.
    pub date: String,
    /// Rounds and chunk of the run.
    pub rounds: usize,
    pub chunk: usize,
    pub rows: Vec<AccessRow>,
    /// How system calls were counted: "raw_syscalls:sys_enter perf counter", or why they were not.
    pub syscall_counter: String,
    pub contention: ContentionReport,
}

/// Guest RAM, the address space and the two tables.
/// Fields drop in declaration order: the tables, then the address space, then guest RAM last
/// (the `SAFETY` of [`Setup::new`] relies on it).
struct Setup {
    direct: GuestMmu,
    syscall: GuestMmu,
    space: Arc<AddressSpace>,
    ram: GuestRam,
}

impl Setup {
    fn new() -> Result<Setup, String> {
        let ram = GuestRam::new(MemoryConfig { size: RAM, backend: MemoryBackend::Anonymous, thp: false })
            .map_err(|e| format!("guest RAM: {e}"))?;
        // SAFETY: the regions are `ram`'s own mappings, mapped until `ram` is dropped, which
        // happens after the tables and the space are dropped: by `Setup`'s field order, and, when
        // a `?` below returns before a `Setup` exists, because locals drop in reverse order and
        // `ram` is declared first. The benchmark never unmaps or remaps them (it only discards
        // through the space), and touches guest RAM only through raw pointers and the tables'
        // copies, never a Rust reference.
        let space = unsafe { AddressSpace::new(&ram.notifier_regions()) }.map_err(|e| e.to_string())?;
        let direct =
            GuestMmu::with_copy_path(&ram, space.clone(), CopyPath::Direct).map_err(|e| e.to_string())?;
        let syscall =
            GuestMmu::with_copy_path(&ram, space.clone(), CopyPath::Syscall).map_err(|e| e.to_string())?;
        let s = Setup { direct, syscall, space, ram };
        // A pattern in every page, so reads copy data the kernel really holds.
        let buf: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 3) as u8).collect();
        for p in 0..(RAM as usize / PAGE) {
            s.direct.write((p * PAGE) as u64, &buf).map_err(|e| format!("filling guest RAM: {e}"))?;
        }
        Ok(s)
    }

    /// The host address of guest-physical `gpa` (guest RAM is one region from 0 here).
    fn hva(&self, gpa: u64) -> *mut u8 {
        let (start, hva, len) = self.ram.regions().next().expect("guest RAM has a region");
        assert!(start.0 <= gpa && gpa < start.0 + len, "gpa {gpa:#x} outside guest RAM");
        (hva + gpa - start.0) as *mut u8
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Memcpy,
    Direct,
    Syscall,
    LockedMemcpy,
}

/// Counts the calling thread's system calls while it is enabled.
struct SyscallCounter(perf_event::Counter);

impl SyscallCounter {
    /// A counter for the calling thread, or why there is none.
    fn open() -> Result<SyscallCounter, String> {
        let paths = [
            "/sys/kernel/tracing/events/raw_syscalls/sys_enter/id",
            "/sys/kernel/debug/tracing/events/raw_syscalls/sys_enter/id",
        ];
        let id = paths
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .ok_or("tracefs is not mounted (as root: mount -t tracefs nodev /sys/kernel/tracing)")?;
        let id: u64 = id.trim().parse().map_err(|e| format!("bad tracepoint id {id:?}: {e}"))?;
        // A tracepoint fires in the kernel: the builder's default (exclude_kernel) would count
        // nothing.
        let counter = perf_event::Builder::new(perf_event::events::Tracepoint::with_id(id))
            .exclude_kernel(false)
            .build()
            .map_err(|e| format!("perf_event_open(raw_syscalls:sys_enter): {e}"))?;
        Ok(SyscallCounter(counter))
    }

    /// System calls `f` made on this thread (minus the counter's own enable/disable ioctls,
    /// measured with an empty `f`).
    fn count(&mut self, f: impl FnOnce()) -> u64 {
        let _ = self.0.reset();
        let _ = self.0.enable();
        f();
        let _ = self.0.disable();
        self.0.read().unwrap_or(0)
    }
}

/// One chunk of `n` accesses of `bytes` by `variant` (`write` or read), cycling through the
/// first [`SPREAD`] pages. Returns ns per access.
fn chunk(
    s: &Setup,
    variant: Variant,
    write: bool,
    bytes: usize,
    n: usize,
    buf: &mut [u8],
) -> Result<f64, String> {
    let lock = std::sync::RwLock::new(());
    let hits = AtomicU64::new(0);
    let t = Instant::now();
    for i in 0..n {
        let gpa = ((i % SPREAD) * PAGE) as u64;
        match variant {
            Variant::Memcpy | Variant::LockedMemcpy => {
                let guard = (variant == Variant::LockedMemcpy).then(|| {
                    hits.fetch_add(1, Ordering::Relaxed);
                    lock.read().unwrap_or_else(|p| p.into_inner())
                });
                let host = black_box(s.hva(gpa));
                let b = black_box(buf.as_mut_ptr());
                // SAFETY: `host` is `bytes` (<= one page) inside guest RAM, mapped for the life of
                // `s` and never torn down here; `b` is `buf`, at least `bytes` long; the two do
                // not overlap. Raw copies only: no reference into guest RAM is made.
                unsafe {
                    if write {
                        std::ptr::copy_nonoverlapping(b, host, bytes)
                    } else {
                        std::ptr::copy_nonoverlapping(host, b, bytes)
                    }
                }
                drop(black_box(guard));
            }
            Variant::Direct | Variant::Syscall => {
                let mmu = if variant == Variant::Direct { &s.direct } else { &s.syscall };
                let r = if write { mmu.write(gpa, &buf[..bytes]) } else { mmu.read(gpa, &mut buf[..bytes]) };
                r.map_err(|e| format!("access at {gpa:#x}: {e}"))?;
            }
        }
        black_box(&mut *buf);
    }
    Ok(t.elapsed().as_nanos() as f64 / n as f64)
}

/// Runs `bench access`; `progress` hears about each step.
pub fn run(opts: &AccessBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<AccessReport, String> {
    if opts.rounds == 0 || opts.chunk == 0 || opts.contention_rounds == 0 {
        return Err("bench access: rounds, chunk and contention rounds must be at least 1".into());
    }
    let s = Setup::new()?;
    let mut buf = vec![0u8; PAGE];
    // Install every timed translation (the hit path is what is measured).
    for p in 0..SPREAD {
        s.direct.read((p * PAGE) as u64, &mut buf).map_err(|e| e.to_string())?;
    }
    let mut counter = SyscallCounter::open();
    let syscall_counter = match &counter {
        Ok(_) => "raw_syscalls:sys_enter perf counter of the measuring thread".to_string(),
        Err(why) => format!("not counted: {why}"),
    };
    let mut rows = Vec::new();
    for write in [false, true] {
        for bytes in SIZES {
            let op = if write { "write" } else { "read" };
            progress(&format!(
                "bench access: {op} {bytes} B ({} chunks of {} per variant)",
                opts.rounds, opts.chunk
            ));
            let mut ns = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..opts.rounds {
                let variants = [Variant::Memcpy, Variant::Direct, Variant::Syscall, Variant::LockedMemcpy];
                for (i, v) in variants.into_iter().enumerate() {
                    ns[i].push(chunk(&s, v, write, bytes, opts.chunk, &mut buf)?);
                }
            }
            let per_access = |c: &mut SyscallCounter, v: Variant| -> Result<f64, String> {
                let n = opts.chunk;
                let mut tmp = vec![0u8; PAGE];
                let idle = c.count(|| ());
                let mut res = Ok(0.0);
                let calls = c.count(|| res = chunk(&s, v, write, bytes, n, &mut tmp));
                res?;
                Ok(calls.saturating_sub(idle) as f64 / n as f64)
            };
            let (direct_calls, syscall_calls) = match counter.as_mut() {
                Ok(c) => {
                    let (d, k) = (per_access(c, Variant::Direct)?, per_access(c, Variant::Syscall)?);
                    if k < 1.0 {
                        return Err(format!(
                            "the system-call counter saw {k} calls per access of the syscall path, \
                             which makes at least one: it does not count, so its zero for the direct \
                             path would mean nothing"
                        ));
                    }
                    (Some(d), Some(k))
                }
                Err(_) => (None, None),
            };
            let [m, d, k, l] = ns.map(median);
            rows.push(AccessRow {
                op: op.into(),
                bytes,
                memcpy_ns: m,
                direct_ns: d,
                syscall_ns: k,
                locked_memcpy_ns: l,
                access_vs_memcpy: d / m,
                access_vs_syscall: d / k,
                direct_syscalls_per_access: direct_calls,
                syscall_syscalls_per_access: syscall_calls,
            });
        }
    }
    progress(&format!(
        "bench access: 2 readers alone and with an invalidator, {} rounds of {:?}",
        opts.contention_rounds, opts.phase
    ));
    let contention = contention(&s, opts)?;
    drop(s);
    Ok(AccessReport {
        // The program by its name, not its path (the report is kept and shared).
        command: std::iter::once("zapvm".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        date: vmm::timestamp::utc_now(),
        rounds: opts.rounds,
        chunk: opts.chunk,
        rows,
        syscall_counter,
        contention,
    })
}

/// What one contention phase measured.
struct Phase {
    ns_per_read: Vec<f64>,
    discards: u64,
    misses: u64,
    reads: u64,
    failed: u64,
}

/// Bytes per read of the contention phases.
const CONTENTION_BYTES: usize = 256;
/// Reader threads of the contention phases.
const READERS: usize = 2;

/// One phase: `readers` threads read 256 B at random pages of the window for `len`; with
/// `invalidate`, one more thread discards random single pages of the window meanwhile.
fn phase(s: &Setup, len: Duration, readers: usize, invalidate: bool, seed: u64) -> Result<Phase, String> {
    const BYTES: usize = CONTENTION_BYTES;
    let stop = AtomicBool::new(false);
    let failed = AtomicU64::new(0);
    let discards = AtomicU64::new(0);
    let start = Barrier::new(readers + 1 + usize::from(invalidate));
    let misses_before = s.direct.stats().misses;
    let window_hva = s.hva(WINDOW_GPA) as usize;
    let mut invalidator_error = None;
    let counts: Vec<u64> = std::thread::scope(|sc| {
        let readers: Vec<_> = (0..readers)
            .map(|r| {
                let (stop, failed, start) = (&stop, &failed, &start);
                sc.spawn(move || {
                    let mut x = seed ^ (r as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let mut buf = [0u8; BYTES];
                    let mut n = 0u64;
                    start.wait();
                    while !stop.load(Ordering::Relaxed) {
                        // xorshift64: a page of the window, not predictable by the prefetcher.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let gpa = WINDOW_GPA + (x % WINDOW_PAGES as u64) * PAGE as u64;
                        if s.direct.read(gpa, &mut buf).is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        black_box(&buf);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let invalidator = invalidate.then(|| {
            let (stop, discards, start) = (&stop, &discards, &start);
            sc.spawn(move || -> Result<(), String> {
                let mut x = seed.rotate_left(17) | 1;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = window_hva + (x % WINDOW_PAGES as u64) as usize * PAGE;
                    s.space.discard(page, PAGE).map_err(|e| format!("discard at {page:#x}: {e}"))?;
                    discards.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        });
        start.wait();
        std::thread::sleep(len);
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = invalidator {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => invalidator_error = Some(e),
                Err(_) => invalidator_error = Some("the invalidator thread panicked".into()),
            }
        }
        readers.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    if let Some(e) = invalidator_error {
        return Err(e);
    }
    let ns = len.as_nanos() as f64;
    Ok(Phase {
        ns_per_read: counts.iter().map(|&n| if n == 0 { f64::INFINITY } else { ns / n as f64 }).collect(),
        discards: discards.load(Ordering::Relaxed),
        misses: s.direct.stats().misses - misses_before,
        reads: counts.iter().sum(),
        failed: failed.load(Ordering::Relaxed),
    })
}

fn contention(s: &Setup, opts: &AccessBenchOptions) -> Result<ContentionReport, String> {
    let (mut one, mut alone, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rates, mut misses, mut reads, mut failed) = (Vec::new(), 0u64, 0u64, 0u64);
    for round in 0..opts.contention_rounds {
        let o = phase(s, opts.phase, 1, false, round as u64 + 1)?;
        one.extend(o.ns_per_read);
        failed += o.failed;
        let a = phase(s, opts.phase, READERS, false, round as u64 + 1)?;
        alone.extend(a.ns_per_read);
        failed += a.failed;
        let w = phase(s, opts.phase, READERS, true, round as u64 + 1)?;
        with.extend(w.ns_per_read);
        rates.push(w.discards as f64 / opts.phase.as_secs_f64());
        misses += w.misses;
        reads += w.reads;
        failed += w.failed;
    }
    let (alone, with) = (median(alone), median(with));
    Ok(ContentionReport {
        readers: READERS,
        bytes: CONTENTION_BYTES,
        one_reader_ns: median(one),
        alone_ns: alone,
        with_invalidator_ns: with,
        invalidator_slowdown: with / alone,
        invalidations_per_s: median(rates),
        miss_share: if reads == 0 { 0.0 } else { misses as f64 / reads as f64 },
        failed_reads: failed,
    })
}

impl AccessReport {
    /// The report as markdown tables.
    pub fn to_markdown(&self) -> String {
        let calls = |c: Option<f64>| c.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into());
        let mut out = String::from(
            "| op | bytes | memcpy ns | locked memcpy ns | direct ns | syscall ns | access_vs_memcpy | access_vs_syscall | syscalls/access direct | syscalls/access syscall |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.3} | {} | {} |\n",
                r.op,
                r.bytes,
                r.memcpy_ns,
                r.locked_memcpy_ns,
                r.direct_ns,
                r.syscall_ns,
                r.access_vs_memcpy,
                r.access_vs_syscall,
                calls(r.direct_syscalls_per_access),
                calls(r.syscall_syscalls_per_access)
            ));
        }
        out.push_str(&format!("\nSystem calls: {}.\n\n", self.syscall_counter));
        let c = &self.contention;
        out.push_str(&format!(
            "| readers | bytes | 1 reader ns/read | readers alone ns/read | with invalidator ns/read | slowdown | discards/s | miss share | failed reads |\n|---|---|---|---|---|---|---|---|---|\n| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.4} | {} |\n",
            c.readers,
            c.bytes,
            c.one_reader_ns,
            c.alone_ns,
            c.with_invalidator_ns,
            c.invalidator_slowdown,
            c.invalidations_per_s,
            c.miss_share,
            c.failed_reads
        ));
        out
    }
}

/// Line colours of the three variants.
const VARIANT_COLORS: [RGBColor; 4] = [
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
];

/// The plot: one panel per direction; x = bytes per access (log), y = ns per access (log), one
/// line per variant.
pub fn access_svg(report: &AccessReport, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("cannot draw {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (1000, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(&format!("device-path access through the VMM's table ({})", report.date), ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let all: Vec<f64> = report
        .rows
        .iter()
        .flat_map(|r| [r.memcpy_ns, r.direct_ns, r.syscall_ns, r.locked_memcpy_ns])
        .filter(|v| v.is_finite())
        .collect();
    let y_lo = all.iter().copied().fold(f64::MAX, f64::min).max(0.1) / 2.0;
    let y_hi = all.iter().copied().fold(1.0, f64::max) * 2.0;
    for (panel, op) in root.split_evenly((1, 2)).iter().zip(["read", "write"]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(op, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d((8f64..8192f64).log_scale(), (y_lo..y_hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("bytes per access")
            .y_desc("ns per access")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v}"))
            .draw()
            .map_err(|e| err(&e))?;
        let rows: Vec<&AccessRow> = report.rows.iter().filter(|r| r.op == op).collect();
        let names = ["memcpy", "direct (table hit)", "syscall (process_vm_*)", "memcpy under a read lock"];
        for (i, name) in names.into_iter().enumerate() {
            let color = VARIANT_COLORS[i];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| {
                    let ns = [r.memcpy_ns, r.direct_ns, r.syscall_ns, r.locked_memcpy_ns][i];
                    (r.bytes as f64, ns.clamp(y_lo, y_hi))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `access.json`, `access.md` and `access.svg` into `dir`.
pub fn write_outputs(report: &AccessReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let json =
        write("access.json", serde_json::to_string_pretty(report).expect("the report serialises") + "\n")?;
    let md =
        write("access.md", format!("`{}` on {}\n\n{}", report.command, report.date, report.to_markdown()))?;
    let svg = dir.join("access.svg");
    access_svg(report, &svg)?;
    Ok(vec![json, md, svg])
}

/// The command: runs, prints the tables, writes the outputs into `out`.
pub fn cli(opts: &AccessBenchOptions, out: &Path) -> Result<std::process::ExitCode, String> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let report = run(opts, &mut |line| match &bar {
        Some(bar) => bar.println(line),
        None => eprintln!("{line}"),
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    print!("{}", report.to_markdown());
    for path in write_outputs(&report, out)? {
        eprintln!("wrote {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
