//! The mprotect phases: random data ranges made read-only through the notifier for a while, then
//! writable again (the restore, which must leave no mapped page read-only).

use std::time::{Duration, Instant};

use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use super::sleep_until_or;
use crate::stress::{bump, pieces_of, Ctx};

/// mprotect phases: read-only for a while, then read-write again, through the notifier.
pub(in crate::stress) fn mprotect_phases(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut planted = false;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(20..120)));
        if !ctx.running() {
            break;
        }
        let mut ranges = Vec::new();
        for _ in 0..rng.random_range(1..=4) {
            let (run, gpa, len) = ctx.pick(&mut rng, 16 << 20);
            let (s, l) = (ctx.hva(&run, gpa), len as usize);
            for (ps, pl) in ctx.pieces(s, l) {
                match ctx.space().protect(ps, pl, libc::PROT_READ) {
                    Ok(_) => {
                        bump(&c.prot_ranges, 1);
                        bump(&c.prot_bytes, pl as u64);
                    }
                    Err(_) => bump(&c.prot_failed, 1),
                }
            }
            ranges.push((s, l));
        }
        bump(&c.prot_phases, 1);
        // Read-only phase (ends early at the deadline; the restore below always runs).
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(50..300)));
        for (s, l) in ranges {
            restore(ctx, s, l);
        }
    }
}

/// Makes `[s, s + l)` writable again (see [`restore_writable`]), counting retries and failures.
fn restore(ctx: &Ctx, s: usize, l: usize) {
    let c = &ctx.c;
    let deadline = Instant::now() + RESTORE_WAIT;
    match restore_writable(ctx.space(), s, l, deadline) {
        Ok(retries) => bump(&c.prot_restore_retries, retries),
        Err((retries, failure)) => {
            bump(&c.prot_restore_retries, retries);
            bump(&c.prot_restore_failures, 1);
            ctx.note_error(format!("cannot make {s:#x}+{l:#x} writable again ({failure})"));
        }
    }
}

/// How long a restore retries while external teardowns keep changing the range.
const RESTORE_WAIT: Duration = Duration::from_secs(15);

/// Makes every page of `[s, s + l)` that the kernel maps writable again, through the notifier,
/// retrying (until `deadline`) while external teardowns change the range under it. Returns the
/// retries, or the retries and the last failure.
///
/// Invariant: when this returns `Ok`, no page of the range that the kernel mapped at the last
/// pass is left read-only. A guest write to a page left read-only faults forever, and its vCPU
/// waits in the teardown guard for a restore that never comes (a verifier that stops making
/// passes and a VM that does not stop). Unmapped pages need nothing (the teardown guard re-backs
/// holes read-write), but a piece that is only *partly* unmapped does: `mprotect` fails with
/// `ENOMEM` at the first gap, having changed only the mappings before it, and a piece the notifier
/// split meanwhile fails validation without any change. So a piece whose restore fails is restored
/// again mapping by mapping, as the kernel maps it now.
fn restore_writable(
    space: &notifier::AddressSpace,
    s: usize,
    l: usize,
    deadline: Instant,
) -> Result<u64, (u64, String)> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let mut retries = 0;
    loop {
        let mut failure = None;
        for (ps, pl) in pieces_of(space, s, l) {
            if space.protect(ps, pl, rw).is_ok() {
                continue;
            }
            match vmm::teardown::host_mappings(ps, ps + pl) {
                Ok(mapped) => {
                    for (a, b) in mapped {
                        if let Err(e) = space.protect(a, b - a, rw) {
                            failure = Some(format!("{a:#x}+{:#x}: {e}", b - a));
                        }
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(failure) = failure else { return Ok(retries) };
        if Instant::now() >= deadline {
            return Err((retries, failure));
        }
        retries += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use guest_abi::PAGE_SIZE;

    const PAGE: usize = PAGE_SIZE as usize;

    /// The permissions (`rw-p`, ...) of every mapping of this process overlapping `[start, end)`.
    fn permissions(start: usize, end: usize) -> Vec<(usize, usize, String)> {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
        maps.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (a, b) = fields.next()?.split_once('-')?;
                let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
                (a < end && start < b)
                    .then(|| (a.max(start), b.min(end), fields.next().unwrap_or("").to_string()))
            })
            .collect()
    }

    /// A restore racing an external unmap the notifier has not processed yet: `mprotect` of the
    /// whole range fails with `ENOMEM` at the hole, having changed at most what lies before it.
    /// Every page the kernel still maps must be writable afterwards (a page left read-only is a
    /// verifier stuck forever on its write fault).
    #[test]
    fn restore_leaves_no_mapped_page_read_only_around_a_hole_the_notifier_has_not_seen() {
        for hole_page in [0, 3] {
            let len = 8 * PAGE;
            // SAFETY: a fresh anonymous mapping at an address the kernel picks; only this test uses it.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let base = base as usize;
            let spec = notifier::RegionSpec {
                host_addr: base,
                len,
                backing: notifier::Backing::PrivateAnon,
                thp: false,
            };
            // SAFETY: the mapping is this test's alone and is touched only through syscalls.
            let space = unsafe { notifier::AddressSpace::new(&[spec]) }.expect("address space");
            space.protect(base, len, libc::PROT_READ).expect("read-only");
            let hole = base + hole_page * PAGE;
            // SAFETY: one page of this test's mapping; no monitor runs, so the notifier never
            // hears of it (as before the monitor's worker gets to the event).
            assert_eq!(unsafe { libc::munmap(hole as *mut libc::c_void, PAGE) }, 0);

            let restored = restore_writable(&space, base, len, Instant::now() + Duration::from_secs(2));

            let maps = permissions(base, base + len);
            assert_eq!(maps.iter().map(|(a, b, _)| b - a).sum::<usize>(), 7 * PAGE, "{maps:x?}");
            assert!(restored.is_ok(), "hole at page {hole_page}: {restored:?}");
            for (a, b, perms) in &maps {
                assert!(perms.starts_with("rw"), "hole at page {hole_page}: [{a:#x}, {b:#x}) is {perms}");
            }
            drop(space);
            // SAFETY: the rest of the test's mapping (munmap skips the hole).
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}
