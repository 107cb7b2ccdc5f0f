//! `zapvm bench access`: what one device-path access to guest RAM costs through the VMM's
//! second-level table ([`GuestMmu`]), against the floor and against the kernel-copy path.
//!
//! In-process, no VM: guest RAM from [`GuestRam`], the notifier's address space over it, and two
//! tables subscribed to it, one per copy path. For reads and writes of 16 B, 256 B and 4 KiB,
//! three variants are timed side by side, interleaved chunk by chunk so that a burst of host load
//! lands on all of them (the report gives medians over the chunks):
//! - `memcpy`: `ptr::copy_nonoverlapping` between a buffer and the host mapping of guest RAM;
//! - `direct`: [`CopyPath::Direct`], the hit path (the translation is installed before timing):
//!   a read section of the thread's reader slot (no lock, no read-modify-write), an O(1) entry
//!   lookup, the fault-tolerant copy routine and the thread's own hit-counter shard;
//! - `syscall`: [`CopyPath::Syscall`], one `process_vm_readv`/`process_vm_writev` per access;
//! - `copy_routine`: the fault-tolerant copy routine alone on the host mapping (no table): the
//!   floor of the direct path, which must copy with it (M2);
//! - `locked_memcpy`: the memcpy under an uncontended `RwLock`'s read side plus one relaxed
//!   shared-counter increment — the synchronisation the hit path did before its reader slots (an
//!   `RwLock` per region and shared hit counters), kept as the reference the design is judged by.
//!
//! `access_vs_memcpy` = direct / memcpy, `copy_routine_vs_memcpy` = copy_routine / memcpy and
//! `access_vs_syscall` = direct / syscall. The system
//! calls each variant makes per access are counted with a perf counter on the kernel's
//! `raw_syscalls:sys_enter` tracepoint for the measuring thread (needs tracefs mounted and root);
//! where it cannot be opened the report says why and leaves the counts out. The counter proves
//! itself on every run: the syscall path must count at least one call per access, or the bench
//! fails rather than report a zero it did not see.
//!
//! Then contention: for each size, two reader threads read at random pages of a 2 MiB window, by
//! plain memcpy and through the direct path, alone and with an invalidator thread discarding
//! single pages of that window through the notifier (each discard of a page with an entry clears
//! its bit, crosses the heavy barrier and waits for the read sections it sees; the next read of the
//! page misses and installs it again; the memcpy readers fault the discarded page in again),
//! paced at [`PACED_INVALIDATIONS_PER_S`] so that both variants face the same teardowns.
//! `access_vs_memcpy` under contention is direct / memcpy of the same phase kind. At 256 B the
//! report also gives one reader alone (`one_reader_ns`) and two readers against an invalidator
//! running flat out (`with_invalidator_ns`, `invalidations_per_s`: each discard of a page with an
//! entry pays the heavy barrier). Alternated rounds, medians.

use std::hint::black_box;
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
            contention_rounds: 3,
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
    /// The fault-tolerant copy routine alone (absent from reports made before it was measured).
    #[serde(default)]
    pub copy_routine_ns: f64,
    /// direct / memcpy.
    pub access_vs_memcpy: f64,
    /// copy_routine / memcpy: how much of `access_vs_memcpy` the copy routine alone costs.
    #[serde(default)]
    pub copy_routine_vs_memcpy: f64,
    /// direct / syscall.
    pub access_vs_syscall: f64,
    /// System calls per access on the direct path and on the syscall path (`None`: not countable
    /// here, see [`AccessReport::syscall_counter`]).
    pub direct_syscalls_per_access: Option<f64>,
    pub syscall_syscalls_per_access: Option<f64>,
}

/// Contention at one size: [`CONTENTION_READERS`] reader threads at random pages of the window.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ContentionRow {
    /// Bytes per read.
    pub bytes: usize,
    /// Median ns per read of one reader thread, by memcpy and through the direct path, with
    /// the readers alone.
    pub memcpy_alone_ns: f64,
    pub direct_alone_ns: f64,
    /// The same with the paced invalidator running.
    pub memcpy_with_invalidator_ns: f64,
    pub direct_with_invalidator_ns: f64,
    /// direct / memcpy, readers alone.
    pub access_vs_memcpy_alone: f64,
    /// direct / memcpy, with the invalidator.
    pub access_vs_memcpy_with_invalidator: f64,
    /// Median discards per second the paced invalidator made during the direct phases and during
    /// the memcpy phases.
    pub invalidations_per_s: f64,
    pub memcpy_invalidations_per_s: f64,
    /// Share of the direct readers' accesses that missed with the invalidator running.
    pub miss_share: f64,
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
    /// The same with the invalidator running flat out.
    pub with_invalidator_ns: f64,
    /// with_invalidator / alone.
    pub invalidator_slowdown: f64,
    /// Median discards per second the invalidator made.
    pub invalidations_per_s: f64,
    /// Share of the readers' accesses that missed (and installed) with the invalidator running.
    pub miss_share: f64,
    /// Reads that failed (must be 0: a discard keeps the range mapped).
    pub failed_reads: u64,
    /// The target rate of the paced invalidator of [`Self::by_size`].
    #[serde(default)]
    pub paced_invalidations_per_s: f64,
    /// Every size, memcpy against the direct path, alone and with the paced invalidator (absent
    /// from reports made before).
    #[serde(default)]
    pub by_size: Vec<ContentionRow>,
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
    /// The fault-tolerant copy routine (its handler installed by the tables).
    copier: fault_tolerant_copy::Copier,
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
        let copier = fault_tolerant_copy::install().map_err(|e| format!("the fault-tolerant copy: {e}"))?;
        let s = Setup { direct, syscall, space, ram, copier };
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
    CopyRoutine,
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
            Variant::CopyRoutine => {
                let host = black_box(s.hva(gpa));
                let b = black_box(buf.as_mut_ptr());
                // SAFETY: as for the memcpy above: `bytes` inside guest RAM, mapped for the life
                // of `s`, and `buf`; the routine returns a fault instead of raising it.
                let r = unsafe {
                    if write {
                        s.copier.copy(host, b, bytes)
                    } else {
                        s.copier.copy(b, host, bytes)
                    }
                };
                r.map_err(|e| format!("copy routine at {gpa:#x}: {e:?}"))?;
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
            let mut ns = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..opts.rounds {
                let variants = [
                    Variant::Memcpy,
                    Variant::Direct,
                    Variant::Syscall,
                    Variant::LockedMemcpy,
                    Variant::CopyRoutine,
                ];
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
            let [m, d, k, l, c] = ns.map(median);
            rows.push(AccessRow {
                op: op.into(),
                bytes,
                memcpy_ns: m,
                direct_ns: d,
                syscall_ns: k,
                locked_memcpy_ns: l,
                copy_routine_ns: c,
                access_vs_memcpy: d / m,
                copy_routine_vs_memcpy: c / m,
                access_vs_syscall: d / k,
                direct_syscalls_per_access: direct_calls,
                syscall_syscalls_per_access: syscall_calls,
            });
        }
    }
    progress(&format!(
        "bench access: {CONTENTION_READERS} readers (memcpy, direct) alone and with an invalidator, \
         16 B to 4 KiB, {} rounds of {:?}",
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

/// Bytes per read of the contention figures kept at the top of the report (and the size of the
/// single-reader phases).
const CONTENTION_BYTES: usize = 256;
/// Reader threads of the contention phases.
pub const CONTENTION_READERS: usize = 2;

/// The invalidator of the paced phases: discards per second (below what it reaches flat out on
/// either variant, so that memcpy and the direct path face the same teardowns).
pub const PACED_INVALIDATIONS_PER_S: f64 = 10_000.0;

/// Whether and how a phase runs its invalidator thread.
#[derive(Clone, Copy, PartialEq)]
enum Invalidator {
    None,
    /// Discards as fast as it can.
    FlatOut,
    /// Discards at [`PACED_INVALIDATIONS_PER_S`] (sleeping between discards; never ahead).
    Paced,
}

/// One phase: `readers` threads read `bytes` at random pages of the window for `len`, by
/// `variant` ([`Variant::Memcpy`] or [`Variant::Direct`]); with an invalidator, one more thread
/// discards random single pages of the window meanwhile.
fn phase(
    s: &Setup,
    len: Duration,
    readers: usize,
    variant: Variant,
    bytes: usize,
    invalidate: Invalidator,
    seed: u64,
) -> Result<Phase, String> {
    let stop = AtomicBool::new(false);
    let failed = AtomicU64::new(0);
    let discards = AtomicU64::new(0);
    let start = Barrier::new(readers + 1 + usize::from(invalidate != Invalidator::None));
    let misses_before = s.direct.stats().misses;
    let window_hva = s.hva(WINDOW_GPA) as usize;
    let mut invalidator_error = None;
    let counts: Vec<u64> = std::thread::scope(|sc| {
        let readers: Vec<_> = (0..readers)
            .map(|r| {
                let (stop, failed, start) = (&stop, &failed, &start);
                sc.spawn(move || {
                    let mut x = seed ^ (r as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let mut buf = [0u8; PAGE];
                    let mut n = 0u64;
                    start.wait();
                    while !stop.load(Ordering::Relaxed) {
                        // xorshift64: a page of the window, not predictable by the prefetcher.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let gpa = WINDOW_GPA + (x % WINDOW_PAGES as u64) * PAGE as u64;
                        if variant == Variant::Memcpy {
                            let host = black_box(s.hva(gpa));
                            // SAFETY: `bytes` (<= one page) inside guest RAM, mapped for the life
                            // of `s` (a discard keeps the mapping: the page reads zeros or the
                            // pattern); `buf` is this thread's; raw copies, no reference into
                            // guest RAM.
                            unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), bytes) };
                        } else if s.direct.read(gpa, &mut buf[..bytes]).is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        black_box(&buf);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let invalidator = (invalidate != Invalidator::None).then(|| {
            let (stop, discards, start) = (&stop, &discards, &start);
            sc.spawn(move || -> Result<(), String> {
                let mut x = seed.rotate_left(17) | 1;
                let interval = Duration::from_secs_f64(1.0 / PACED_INVALIDATIONS_PER_S);
                start.wait();
                let began = Instant::now();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if invalidate == Invalidator::Paced {
                        let due = began + interval * n;
                        let now = Instant::now();
                        if now < due {
                            std::thread::sleep(due - now);
                            continue;
                        }
                        n += 1;
                    }
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

/// The samples of one size's contention phases.
#[derive(Default)]
struct SizeSamples {
    memcpy_alone: Vec<f64>,
    direct_alone: Vec<f64>,
    memcpy_with: Vec<f64>,
    direct_with: Vec<f64>,
    memcpy_rates: Vec<f64>,
    rates: Vec<f64>,
    misses: u64,
    reads: u64,
}

fn contention(s: &Setup, opts: &AccessBenchOptions) -> Result<ContentionReport, String> {
    let (mut one, mut flat_out, mut flat_out_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut flat_out_misses, mut flat_out_reads, mut failed) = (0u64, 0u64, 0u64);
    let mut samples: Vec<SizeSamples> = SIZES.iter().map(|_| SizeSamples::default()).collect();
    let per_s = |p: &Phase| p.discards as f64 / opts.phase.as_secs_f64();
    let r = CONTENTION_READERS;
    for round in 0..opts.contention_rounds {
        let seed = round as u64 + 1;
        let o = phase(s, opts.phase, 1, Variant::Direct, CONTENTION_BYTES, Invalidator::None, seed)?;
        one.extend(o.ns_per_read);
        failed += o.failed;
        let f = phase(s, opts.phase, r, Variant::Direct, CONTENTION_BYTES, Invalidator::FlatOut, seed)?;
        flat_out.extend(f.ns_per_read.iter().copied());
        flat_out_rates.push(per_s(&f));
        (flat_out_misses, flat_out_reads) = (flat_out_misses + f.misses, flat_out_reads + f.reads);
        failed += f.failed;
        for (&bytes, t) in SIZES.iter().zip(&mut samples) {
            let m = phase(s, opts.phase, r, Variant::Memcpy, bytes, Invalidator::None, seed)?;
            t.memcpy_alone.extend(m.ns_per_read);
            let a = phase(s, opts.phase, r, Variant::Direct, bytes, Invalidator::None, seed)?;
            t.direct_alone.extend(a.ns_per_read);
            failed += a.failed;
            let mw = phase(s, opts.phase, r, Variant::Memcpy, bytes, Invalidator::Paced, seed)?;
            t.memcpy_with.extend(mw.ns_per_read.iter().copied());
            t.memcpy_rates.push(per_s(&mw));
            let w = phase(s, opts.phase, r, Variant::Direct, bytes, Invalidator::Paced, seed)?;
            t.direct_with.extend(w.ns_per_read.iter().copied());
            t.rates.push(per_s(&w));
            t.misses += w.misses;
            t.reads += w.reads;
            failed += w.failed;
        }
    }
    let by_size: Vec<ContentionRow> = SIZES
        .iter()
        .zip(samples)
        .map(|(&bytes, t)| {
            let (ma, da) = (median(t.memcpy_alone), median(t.direct_alone));
            let (mw, dw) = (median(t.memcpy_with), median(t.direct_with));
            ContentionRow {
                bytes,
                memcpy_alone_ns: ma,
                direct_alone_ns: da,
                memcpy_with_invalidator_ns: mw,
                direct_with_invalidator_ns: dw,
                access_vs_memcpy_alone: da / ma,
                access_vs_memcpy_with_invalidator: dw / mw,
                invalidations_per_s: median(t.rates),
                memcpy_invalidations_per_s: median(t.memcpy_rates),
                miss_share: if t.reads == 0 { 0.0 } else { t.misses as f64 / t.reads as f64 },
            }
        })
        .collect();
    let main = by_size.iter().find(|r| r.bytes == CONTENTION_BYTES).expect("SIZES has 256 B");
    let with = median(flat_out);
    Ok(ContentionReport {
        readers: CONTENTION_READERS,
        bytes: CONTENTION_BYTES,
        one_reader_ns: median(one),
        alone_ns: main.direct_alone_ns,
        with_invalidator_ns: with,
        invalidator_slowdown: with / main.direct_alone_ns,
        invalidations_per_s: median(flat_out_rates),
        miss_share: if flat_out_reads == 0 { 0.0 } else { flat_out_misses as f64 / flat_out_reads as f64 },
        failed_reads: failed,
        paced_invalidations_per_s: PACED_INVALIDATIONS_PER_S,
        by_size,
    })
}

impl AccessReport {
    /// The report as markdown tables.
    pub fn to_markdown(&self) -> String {
        let calls = |c: Option<f64>| c.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into());
        let mut out = String::from(
            "| op | bytes | memcpy ns | copy routine ns | locked memcpy ns | direct ns | syscall ns | access_vs_memcpy | copy_routine_vs_memcpy | access_vs_syscall | syscalls/access direct | syscalls/access syscall |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.3} | {} | {} |\n",
                r.op,
                r.bytes,
                r.memcpy_ns,
                r.copy_routine_ns,
                r.locked_memcpy_ns,
                r.direct_ns,
                r.syscall_ns,
                r.access_vs_memcpy,
                r.copy_routine_vs_memcpy,
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
        if !c.by_size.is_empty() {
            out.push_str(&format!(
                "\n{} readers at random pages of a 2 MiB window, ns per read of one reader; invalidator paced at {:.0} discards/s:\n\n| bytes | memcpy alone | direct alone | access_vs_memcpy alone | memcpy + invalidator | direct + invalidator | access_vs_memcpy + invalidator | discards/s memcpy / direct | miss share |\n|---|---|---|---|---|---|---|---|---|\n",
                c.readers, c.paced_invalidations_per_s
            ));
            for r in &c.by_size {
                out.push_str(&format!(
                    "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.0} / {:.0} | {:.4} |\n",
                    r.bytes,
                    r.memcpy_alone_ns,
                    r.direct_alone_ns,
                    r.access_vs_memcpy_alone,
                    r.memcpy_with_invalidator_ns,
                    r.direct_with_invalidator_ns,
                    r.access_vs_memcpy_with_invalidator,
                    r.memcpy_invalidations_per_s,
                    r.invalidations_per_s,
                    r.miss_share
                ));
            }
        }
        out
    }
}

/// Line colours of the variants.
const VARIANT_COLORS: [RGBColor; 5] = [
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
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
        .flat_map(|r| [r.memcpy_ns, r.direct_ns, r.syscall_ns, r.locked_memcpy_ns, r.copy_routine_ns])
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
        let names = [
            "memcpy",
            "direct (table hit)",
            "syscall (process_vm_*)",
            "memcpy under a read lock (the old hit path's synchronisation)",
            "fault-tolerant copy routine alone",
        ];
        for (i, name) in names.into_iter().enumerate() {
            let color = VARIANT_COLORS[i];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| {
                    let ns =
                        [r.memcpy_ns, r.direct_ns, r.syscall_ns, r.locked_memcpy_ns, r.copy_routine_ns][i];
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

/// Writes `access.json` (and its flat export `access.flat.json`), `access.md`, `access.svg` and
/// the plotted rows as `access.csv` into `dir`.
pub fn write_outputs(report: &AccessReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    crate::bench_export::write_outputs(report, dir, access_svg, &report.rows)
}

/// The command: runs, prints the tables, writes the outputs into `out`.
pub fn cli(opts: &AccessBenchOptions, out: &Path) -> Result<std::process::ExitCode, String> {
    let report = crate::bench_export::run_with_progress(None, |progress| run(opts, progress))?;
    crate::bench_export::print_and_write(&report, out, write_outputs)?;
    Ok(std::process::ExitCode::SUCCESS)
}

impl crate::bench_export::BenchReport for AccessReport {
    const NAME: &'static str = "access";

    fn command(&self) -> &str {
        &self.command
    }

    fn date(&self) -> &str {
        &self.date
    }

    fn to_markdown(&self) -> String {
        AccessReport::to_markdown(self)
    }
}
