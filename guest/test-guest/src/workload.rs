//! The workloads: [`verify`] (fill every word of the slice with the ABI's pattern, read it all
//! back, checksum what was read), [`discard_verify`] (the same fill, then the host discards parts
//! of the slice in a rendezvous, then every page must read as zeros or the pattern accordingly)
//! and [`touch`] (one word per page: cold write, warm write, warm read, each timed with the TSC).
//! All run over the pages `guest_abi::slice_pages` gives this vCPU, with volatile accesses so
//! that every access the VMM is told about really happens.

use guest_abi::{pattern, slice_pages, BootInfo, GpaRange, Pass, Rendezvous, UcallKind, PAGE_SIZE};

use crate::{arch, done, exchange, fail, report};

/// Words in a 4 KiB page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// About this many Progress ucalls per Verify pass.
const PROGRESS_REPORTS: u64 = 16;

/// Capacity, in entries, of the [`GpaRange`] array a Discard rendezvous hands the host.
const DISCARD_CAPACITY: usize = 16;

/// What the guest puts in the reply slot (`args[3]`) of a Discard rendezvous before the ucall:
/// more than any capacity, so a host that never answers is caught instead of passing for "no
/// range discarded".
const NO_REPLY: u64 = u64::MAX;

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

/// The fill pass of Verify and DiscardVerify: writes `pattern(seed, word_gpa)` into every word
/// of every page of the slice (`pages` of them), with Progress ucalls, then reports it as a
/// Timing ucall of [`Pass::Fill`].
fn fill(vcpu: u64, boot: &BootInfo, pages: u64) {
    let seed = boot.seed;
    let cycles = timed_pass_with_progress(boot, vcpu, pages, |page, _| {
        let base = page as *mut u64;
        let mut word = 0;
        while word < WORDS_PER_PAGE {
            // SAFETY: `page` is a page of this vCPU's slice of the work RAM (identity mapped,
            // writable, owned by this vCPU alone) and word < 512 stays inside it.
            unsafe { base.add(word as usize).write_volatile(pattern(seed, page + 8 * word)) };
            word += 1;
        }
    });
    report(vcpu, UcallKind::Timing, &[Pass::Fill as u64, pages, cycles]);
}

/// [`guest_abi::Workload::Verify`]: Stage 1, fill (Timing Fill), Stage 2, check (Timing Check),
/// then Done(pages, wrapping sum of every word read), or Failure at the first wrong word.
///
/// The reported cycles exclude the Progress ucalls made during the pass.
pub fn verify(vcpu: u64, boot: &BootInfo) -> ! {
    let seed = boot.seed;
    let pages = slice_len(boot, vcpu);

    report(vcpu, UcallKind::Stage, &[1]);
    fill(vcpu, boot, pages);

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
    report(vcpu, UcallKind::Timing, &[Pass::Check as u64, pages, cycles]);

    done(vcpu, pages, checksum)
}

/// Whether every page of `range` (page aligned, non-empty) belongs to this vCPU's slice.
///
/// The slice's pages are distinct, so `range` lies inside the slice exactly when as many slice
/// pages fall into it as it has pages (the slice may consist of several pieces when it spans
/// more than one work range).
fn slice_contains(boot: &BootInfo, vcpu: u64, range: &GpaRange) -> bool {
    let mut inside = 0u64;
    slice_pages(work(boot), boot.nr_vcpus, vcpu, |page| {
        if range.start <= page && page < range.end {
            inside += 1;
        }
    });
    inside == range.pages()
}

/// Whether `page` lies in one of `ranges`.
fn discarded(ranges: &[GpaRange], page: u64) -> bool {
    let mut i = 0;
    while i < ranges.len() {
        if ranges[i].start <= page && page < ranges[i].end {
            return true;
        }
        i += 1;
    }
    false
}

/// The Discard rendezvous of [`discard_verify`]: asks the host to discard ranges of this vCPU's
/// slice, validates its reply and returns the discarded ranges (the first `count` entries).
///
/// The host's reply is not trusted: a count above the capacity, or a range that is not page
/// aligned, is empty or reaches outside this vCPU's slice, ends the workload with a Failure.
fn discard_rendezvous(vcpu: u64, boot: &BootInfo) -> ([GpaRange; DISCARD_CAPACITY], usize) {
    // The array the host fills. Zeroed with volatile stores so that the zeros are in memory when
    // the host looks at it; read back only with volatile loads (see below).
    let mut array = [GpaRange::default(); DISCARD_CAPACITY];
    let base = array.as_mut_ptr();
    let mut i = 0;
    while i < DISCARD_CAPACITY {
        // SAFETY: i < DISCARD_CAPACITY, so `base + i` is an element of `array`.
        unsafe { base.add(i).write_volatile(GpaRange::default()) };
        i += 1;
    }

    let reply = exchange(
        vcpu,
        UcallKind::Rendezvous,
        &[Rendezvous::Discard as u64, base as u64, DISCARD_CAPACITY as u64, NO_REPLY],
    );
    let count = reply[3];
    if count == NO_REPLY {
        fail(vcpu, format_args!("discard-verify: the host did not answer the Discard rendezvous"));
    }
    if count > DISCARD_CAPACITY as u64 {
        fail(
            vcpu,
            format_args!(
                "discard-verify: the host reports {} discarded ranges, the array holds {}",
                count, DISCARD_CAPACITY
            ),
        );
    }
    let count = count as usize;

    // What the host wrote, read once each and validated; the rest of the workload uses this copy.
    let mut ranges = [GpaRange::default(); DISCARD_CAPACITY];
    let mut i = 0;
    while i < count {
        // SAFETY: i < count <= DISCARD_CAPACITY, so `base + i` is an element of `array`; the
        // host wrote it while this vCPU was stopped in the ucall, hence the volatile read.
        let range = unsafe { base.add(i).read_volatile() };
        let problem = if range.start % PAGE_SIZE != 0 || range.end % PAGE_SIZE != 0 {
            Some("is not page aligned")
        } else if range.start >= range.end {
            Some("is empty")
        } else if !slice_contains(boot, vcpu, &range) {
            Some("is not inside this vCPU's slice")
        } else {
            None
        };
        if let Some(problem) = problem {
            fail(
                vcpu,
                format_args!(
                    "discard-verify: discarded range {} of {}, [{:#x}, {:#x}), {}",
                    i, count, range.start, range.end, problem
                ),
            );
        }
        ranges[i] = range;
        i += 1;
    }
    (ranges, count)
}

/// [`guest_abi::Workload::DiscardVerify`]: Stage 1, fill like [`verify`] (Timing Fill); Stage 2,
/// a [`Rendezvous::Discard`] in which the host discards ranges of the slice and names them;
/// Stage 3, check (Timing Check): every word of a discarded page must read 0 and every word of
/// any other page its pattern. Then Done(pages checked, wrapping sum of the words read from the
/// pages that kept the pattern, i.e. of `page_checksum(seed, page)` over them), or Failure at
/// the first wrong word or at a bad reply of the host.
///
/// The reported cycles exclude the Progress ucalls made during the pass.
pub fn discard_verify(vcpu: u64, boot: &BootInfo) -> ! {
    let seed = boot.seed;
    let pages = slice_len(boot, vcpu);

    report(vcpu, UcallKind::Stage, &[1]);
    fill(vcpu, boot, pages);

    report(vcpu, UcallKind::Stage, &[2]);
    let (ranges, count) = discard_rendezvous(vcpu, boot);
    let ranges = &ranges[..count];

    report(vcpu, UcallKind::Stage, &[3]);
    let mut checksum = 0u64;
    let cycles = timed_pass_with_progress(boot, vcpu, pages, |page, index| {
        let zeroed = discarded(ranges, page);
        let base = page as *const u64;
        let mut page_sum = 0u64;
        let mut word = 0;
        while word < WORDS_PER_PAGE {
            let gpa = page + 8 * word;
            // SAFETY: as in the fill pass. A discarded page is still guest RAM: the host dropped
            // its contents, not the page, so reading it is reading whatever the host left there.
            let found = unsafe { base.add(word as usize).read_volatile() };
            let expected = if zeroed { 0 } else { pattern(seed, gpa) };
            if found != expected {
                let why = if zeroed { "zero: page discarded" } else { "the pattern: page kept" };
                fail(
                    vcpu,
                    format_args!(
                        "discard-verify: GPA {:#x} holds {:#018x}, expected {:#018x} ({}, page {} of {})",
                        gpa, found, expected, why, index, pages
                    ),
                );
            }
            page_sum = page_sum.wrapping_add(found);
            word += 1;
        }
        if !zeroed {
            checksum = checksum.wrapping_add(page_sum);
        }
    });
    report(vcpu, UcallKind::Timing, &[Pass::Check as u64, pages, cycles]);

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
    report(vcpu, UcallKind::Timing, &[Pass::ColdWrite as u64, pages, cycles]);
    let cycles = each_page(write);
    report(vcpu, UcallKind::Timing, &[Pass::WarmWrite as u64, pages, cycles]);

    let mut checksum = 0u64;
    let cycles = each_page(&mut |page: u64| {
        // SAFETY: as for the writes; the word was written by the passes above.
        let found = unsafe { (page as *const u64).read_volatile() };
        checksum = checksum.wrapping_add(found);
    });
    report(vcpu, UcallKind::Timing, &[Pass::WarmRead as u64, pages, cycles]);

    done(vcpu, pages, checksum)
}
