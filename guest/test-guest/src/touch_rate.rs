//! [`guest_abi::Workload::TouchRate`]: the guest side of `zapvm bench pressure`.
//!
//! The vCPU writes the first word of every page of its slice, pass after pass, forever, and
//! counts what it did in the [`TouchRateHeader`] at the start of the slice: the host samples
//! `pages` twice and divides by the time in between to get the touch rate. The loop is a write
//! only (no read first): after the host discarded a page, the next write takes exactly one
//! fault to get a fresh zeroed page back, with no zero-page mapping and copy-on-write in
//! between, so a refault costs what the host's memory layer makes it cost.
//!
//! The header page is written after every page (a store to a line that stays in the cache) and
//! never touched as part of the working set; the host never discards it.

use guest_abi::{pattern, slice_pages, BootInfo, GpaRange, TouchRateHeader, TOUCH_RATE_MAGIC};

use crate::{arch, fail};

/// Runs the touch loop forever (the host stops the VM).
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    let work: &[GpaRange] = &boot.work[..boot.nr_work as usize];
    let (mut header_gpa, mut pages_in_slice) = (None, 0u64);
    slice_pages(work, boot.nr_vcpus, vcpu, |page| {
        header_gpa.get_or_insert(page);
        pages_in_slice += 1;
    });
    let Some(header_gpa) = header_gpa.filter(|_| pages_in_slice >= 2) else {
        fail(vcpu, format_args!("touch-rate: slice of {pages_in_slice} pages has no page to touch"));
    };
    let header = header_gpa as *mut TouchRateHeader;
    let seed = boot.seed;
    let mut counters = TouchRateHeader { magic: TOUCH_RATE_MAGIC, ..TouchRateHeader::default() };
    // SAFETY: the header is the first page of this vCPU's slice (identity mapped, user-writable,
    // owned by this vCPU alone, never discarded by the host); the host only reads it.
    unsafe { header.write_volatile(counters) };
    // SAFETY: the address of a field of the header above; no reference is made.
    let pages_field = unsafe { core::ptr::addr_of_mut!((*header).pages) };
    loop {
        let start = arch::rdtsc();
        slice_pages(work, boot.nr_vcpus, vcpu, |page| {
            if page == header_gpa {
                return;
            }
            // SAFETY: `page` is a page of this vCPU's slice of the work RAM (identity mapped,
            // writable, owned by this vCPU alone). A discard by the host only replaces its
            // contents with zeros; the next write faults a fresh page in.
            unsafe { (page as *mut u64).write_volatile(pattern(seed, page)) };
            counters.pages += 1;
            // SAFETY: see `pages_field`.
            unsafe { pages_field.write_volatile(counters.pages) };
        });
        counters.passes += 1;
        counters.last_pass_cycles = arch::rdtsc() - start;
        // SAFETY: as for the first write of the header.
        unsafe { header.write_volatile(counters) };
    }
}
