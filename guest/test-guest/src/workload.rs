//! The workloads: [`verify`] (fill every word of the slice with the ABI's pattern, read it all
//! back, checksum what was read) and [`touch`] (one word per page: cold write, warm write, warm
//! read, each timed with the TSC). Both run over the pages `guest_abi::slice_pages` gives this
//! vCPU, with volatile accesses so that every access the VMM is told about really happens.

use guest_abi::{pattern, slice_pages, BootInfo, GpaRange, Pass, UcallKind, PAGE_SIZE};

use crate::{arch, done, fail, report};

/// Words in a 4 KiB page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// About this many Progress ucalls per Verify pass.
const PROGRESS_REPORTS: u64 = 16;

/// The work ranges the boot info declares (`nr_work` was checked against `MAX_RANGES`).
fn work(boot: &BootInfo) -> &[GpaRange] {
    &boot.work[..boot.nr_work as usize]
}

/// Number of pages in this vCPU's slice.
fn slice_len(boot: &BootInfo, vcpu: u64) -> u64 {
    let mut pages = 0;
    slice_pages(work(boot), boot.nr_vcpus, vcpu, |_| pages += 1);
    pages
}

/// Runs `per_page` on every page of the slice, timed, with about [`PROGRESS_REPORTS`] Progress
/// ucalls in between; returns the TSC cycles of the pass without the time spent in those ucalls.
fn timed_pass_with_progress(
    boot: &BootInfo,
    vcpu: u64,
    pages: u64,
    mut per_page: impl FnMut(u64, u64),
) -> u64 {
    let step = (pages / PROGRESS_REPORTS).max(1);
    let mut reporting = 0u64;
    let mut done_pages = 0u64;
    let mut next_report = step;
    let start = arch::rdtsc();
    slice_pages(work(boot), boot.nr_vcpus, vcpu, |page| {
        per_page(page, done_pages);
        done_pages += 1;
        if done_pages == next_report {
            next_report += step;
            let before = arch::rdtsc();
            report(vcpu, UcallKind::Progress, &[done_pages, pages]);
            reporting += arch::rdtsc() - before;
        }
    });
    (arch::rdtsc() - start).wrapping_sub(reporting)
}

/// [`guest_abi::Workload::Verify`]: Stage 1, fill (Timing Fill), Stage 2, check (Timing Check),
/// then Done(pages, wrapping sum of every word read), or Failure at the first wrong word.
///
/// The reported cycles exclude the Progress ucalls made during the pass.
pub fn verify(vcpu: u64, boot: &BootInfo) -> ! {
    let seed = boot.seed;
    let pages = slice_len(boot, vcpu);

    report(vcpu, UcallKind::Stage, &[1]);
    let cycles = timed_pass_with_progress(boot, vcpu, pages, |page, _| {
        let base = page as *mut u64;
        let mut word = 0;
        while word < WORDS_PER_PAGE {
            // SAFETY: `page` is a page of this vCPU's slice of the work RAM (identity mapped,
            // writable, owned by this vCPU alone) and word < 512 stays inside it.
            unsafe {
                base.add(word as usize)
                    .write_volatile(pattern(seed, page + 8 * word))
            };
            word += 1;
        }
    });
    report(vcpu, UcallKind::Timing, &[Pass::Fill as u64, pages, cycles]);

    report(vcpu, UcallKind::Stage, &[2]);
    let mut checksum = 0u64;
    let cycles = timed_pass_with_progress(boot, vcpu, pages, |page, index| {
        let base = page as *const u64;
        let mut word = 0;
        while word < WORDS_PER_PAGE {
            let gpa = page + 8 * word;
            // SAFETY: as in the fill pass; the word was written there by that pass.
            let found = unsafe { base.add(word as usize).read_volatile() };
            let expected = pattern(seed, gpa);
            if found != expected {
                fail(
                    vcpu,
                    format_args!(
                        "verify: word at GPA {:#x} is {:#018x}, expected {:#018x} (page {} of {})",
                        gpa, found, expected, index, pages
                    ),
                );
            }
            checksum = checksum.wrapping_add(found);
            word += 1;
        }
    });
    report(
        vcpu,
        UcallKind::Timing,
        &[Pass::Check as u64, pages, cycles],
    );

    done(vcpu, pages, checksum)
}

/// [`guest_abi::Workload::Touch`]: the first word of every page, written with
/// `pattern(seed, page_gpa)` twice (cold, then warm), then read (warm): three Timing ucalls,
/// then Done(pages, wrapping sum of the words read in the warm read pass, which is the wrapping
/// sum of `pattern(seed, page_gpa)` over the slice when memory behaves).
///
/// No ucall happens inside a timed pass.
pub fn touch(vcpu: u64, boot: &BootInfo) -> ! {
    let seed = boot.seed;
    let pages = slice_len(boot, vcpu);
    let each_page = |f: &mut dyn FnMut(u64)| {
        let start = arch::rdtsc();
        slice_pages(work(boot), boot.nr_vcpus, vcpu, &mut *f);
        arch::rdtsc() - start
    };
    let write = &mut |page: u64| {
        // SAFETY: `page` is a page of this vCPU's slice of the work RAM (identity mapped,
        // writable, owned by this vCPU alone).
        unsafe { (page as *mut u64).write_volatile(pattern(seed, page)) }
    };

    let cycles = each_page(write);
    report(
        vcpu,
        UcallKind::Timing,
        &[Pass::ColdWrite as u64, pages, cycles],
    );
    let cycles = each_page(write);
    report(
        vcpu,
        UcallKind::Timing,
        &[Pass::WarmWrite as u64, pages, cycles],
    );

    let mut checksum = 0u64;
    let cycles = each_page(&mut |page: u64| {
        // SAFETY: as for the writes; the word was written by the passes above.
        let found = unsafe { (page as *const u64).read_volatile() };
        checksum = checksum.wrapping_add(found);
    });
    report(
        vcpu,
        UcallKind::Timing,
        &[Pass::WarmRead as u64, pages, cycles],
    );

    done(vcpu, pages, checksum)
}
