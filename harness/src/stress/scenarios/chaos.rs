//! The external chaos: raw `madvise(DONTNEED)`, `munmap` and `mremap` blows at the verifiers'
//! data pages, bypassing the VMM's API (and on sealed guest RAM `mprotect` and `mmap(MAP_FIXED)`
//! blows the kernel must refuse), with the count of the seal's refusals.

use std::time::{Duration, Instant};

use guest_abi::PAGE_SIZE;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use vmm::memory::HUGE_PAGE_SIZE;

use crate::stress::{bump, Counters, Ctx};

/// External chaos: the VMM's API is bypassed entirely.
pub(in crate::stress) fn external_chaos(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut planted = false;
    // The destination of every move: reserved now, while guest RAM has no hole, and kept reserved
    // (a fresh mapping made later with a NULL hint could land in a hole of guest RAM the guard has
    // not re-backed yet — and the guard rightly refuses to map over someone else's memory).
    let reserve = 2 * HUGE_PAGE_SIZE as usize;
    let none = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh PROT_NONE reservation at an address the kernel picks; nothing else uses it.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_NONE, none, -1, 0) };
    if base == libc::MAP_FAILED {
        ctx.note_error("external chaos: cannot reserve a scratch area".into());
        return;
    }
    // 2 MiB-aligned inside the reservation (hugetlb moves need it).
    let scratch = (base as usize).next_multiple_of(HUGE_PAGE_SIZE as usize) as *mut libc::c_void;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        let (run, gpa, len) = ctx.pick(&mut rng, HUGE_PAGE_SIZE);
        let (p, l) = (ctx.hva(&run, gpa) as *mut libc::c_void, len as usize);
        // With the seal the kernel must refuse every blow but madvise; two more kinds test it.
        let kinds = if ctx.sealed { 5 } else { 3 };
        match rng.random_range(0..kinds) {
            0 => {
                // SAFETY: `p..p+l` is guest RAM (data pages only: no metadata, stack or image), which
                // the VMM accesses only through raw pointers and the fault-tolerant copies of the
                // table; dropping its contents behind the VMM's back is the scenario.
                if unsafe { libc::madvise(p, l, libc::MADV_DONTNEED) } == 0 {
                    bump(&c.chaos_madvise, 1);
                    bump(&c.chaos_bytes, len);
                } else {
                    bump(&c.chaos_failed, 1);
                }
            }
            1 => {
                // SAFETY: as above; the VMM survives an unmap of guest RAM (the teardown guard
                // re-backs it, vCPUs and device reads wait or fail cleanly meanwhile).
                if unsafe { libc::munmap(p, l) } == 0 {
                    bump(&c.chaos_munmap, 1);
                    bump(&c.chaos_bytes, len);
                    wait_rebacked(p, l);
                } else {
                    refused(c, SealedBlow::Munmap);
                }
            }
            2 => {
                // SAFETY: moves guest RAM (data pages) onto this thread's scratch reservation,
                // replacing only it (MREMAP_FIXED); as for munmap, the VMM survives the hole left
                // behind.
                let moved =
                    unsafe { libc::mremap(p, l, l, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, scratch) };
                if moved == scratch {
                    bump(&c.chaos_mremap, 1);
                    bump(&c.chaos_bytes, len);
                    wait_rebacked(p, l);
                } else {
                    refused(c, SealedBlow::Mremap);
                }
                // SAFETY: `scratch..+l` is this thread's reservation (now possibly holding the
                // moved pages, no longer guest RAM): MAP_FIXED drops them and reserves it again in
                // one step, so the range is never free for anyone else's mapping.
                let again = unsafe { libc::mmap(scratch, l, libc::PROT_NONE, none | libc::MAP_FIXED, -1, 0) };
                if again != scratch {
                    ctx.note_error("external chaos: cannot re-reserve the scratch area".into());
                    break;
                }
            }
            3 => {
                // Sealed RAM only. SAFETY: guest RAM the kernel must refuse to re-protect; were
                // the seal missing, write access is given back at once (the guest may meanwhile
                // fault on a write and wait in the teardown guard), and the run is broken anyway.
                if unsafe { libc::mprotect(p, l, libc::PROT_READ) } == 0 {
                    bump(&c.chaos_mprotect, 1);
                    // SAFETY: the same range, made writable again.
                    unsafe { libc::mprotect(p, l, libc::PROT_READ | libc::PROT_WRITE) };
                } else {
                    refused(c, SealedBlow::Mprotect);
                }
            }
            _ => {
                // Sealed RAM only. SAFETY: guest RAM the kernel must refuse to map over; were the
                // seal missing, fresh zeroed memory replaces it (the teardown guard then stops the
                // VM: a mapping it did not make sits in guest RAM), and the run is broken anyway.
                let over = unsafe {
                    libc::mmap(p, l, libc::PROT_READ | libc::PROT_WRITE, none | libc::MAP_FIXED, -1, 0)
                };
                if over == p {
                    bump(&c.chaos_map_fixed, 1);
                } else {
                    refused(c, SealedBlow::MapFixed);
                }
            }
        }
        // Let the guard re-back before the next blow (bounded: at most a few ms per operation).
        std::thread::sleep(Duration::from_micros(rng.random_range(200..3000)));
    }
    // SAFETY: the reservation (and whatever was moved into it) is this thread's alone.
    unsafe { libc::munmap(base, reserve) };
}

/// The external blows sealed guest RAM must refuse, as indices of `Counters::chaos_eperm`.
#[derive(Clone, Copy)]
pub(in crate::stress) enum SealedBlow {
    Munmap = 0,
    Mremap = 1,
    Mprotect = 2,
    MapFixed = 3,
}

/// Counts a failed external blow, right after the call: an `EPERM` is the seal refusing it,
/// anything else an ordinary failure (a hole not re-backed yet, a range spanning two mappings).
fn refused(c: &Counters, blow: SealedBlow) {
    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        bump(&c.chaos_eperm[blow as usize], 1);
    } else {
        bump(&c.chaos_failed, 1);
    }
}

/// Waits (up to [`REBACK_WAIT`]) until the hole at `[p, p + l)` that an external unmap or move
/// left is mapped again (the teardown guard re-backs it).
///
/// A vCPU whose access fails with a plain `EFAULT` (KVM names no address) resumes only once no
/// hole is left anywhere in guest RAM; blows faster than the guard re-backs (a loaded host) would
/// keep some hole open nearly all the time and starve the vCPUs, which is not what the scenario is
/// about.
fn wait_rebacked(p: *mut libc::c_void, l: usize) {
    let deadline = Instant::now() + REBACK_WAIT;
    let mut residency = vec![0u8; l.div_ceil(PAGE_SIZE as usize)];
    // SAFETY: mincore only writes residency bytes into `residency` (one per page of the range,
    // which is its length); it fails with ENOMEM while part of the range is unmapped and touches
    // no guest memory.
    while unsafe { libc::mincore(p, l, residency.as_mut_ptr()) } != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// How long the external chaos waits for the guard to re-back a hole before the next blow.
const REBACK_WAIT: Duration = Duration::from_millis(100);
