//! [`guest_abi::Workload::Stress`]: the guest side of `zapvm stress`.
//!
//! Every data page of the vCPU's slice is kept in a known state: the generation table (laid out
//! by [`guest_abi::stress_layout`]) says which generation the page holds, and every word is either
//! `stress_pattern(seed, generation, word_gpa)` or zero (what the host's discards and re-backs
//! leave). The loop reads and checks every word of a page, then rewrites the page with the next
//! generation (word 0 last) and only then stores the new generation in the table, so a page is
//! never observed by this vCPU in a state other than "generation g, possibly partly zeroed".
//! Any other value — old data after a discard, another page's or another generation's data — is
//! corruption and ends the vCPU with a Failure naming the address.
//!
//! The host attacks data pages only (never the table, the header, the stack or the image), so the
//! table itself needs no checking.
//!
//! vCPUs that [`stress_role`] gives a device role run that device's driver instead (the same
//! drivers as the Balloon and VirtioMem workloads, with the same page-by-page checks).

use guest_abi::{
    stress_layout, stress_pattern, stress_role, BootInfo, GpaRange, StressHeader, StressLayout, StressRole,
    UcallKind, PAGE_SIZE, STAGE_STRESS_PASS, STRESS_MAGIC,
};

use crate::{fail, report};

/// Words in a 4 KiB page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// What one page looked like.
enum PageState {
    /// Every word held the pattern of its generation.
    Intact,
    /// Every word was zero.
    Zero,
    /// Some words zero, the others the pattern.
    Torn,
}

/// Checks every word of the data page at `page` against generation `generation`.
fn check_page(vcpu: u64, seed: u64, page: u64, generation: u64) -> PageState {
    let base = page as *const u64;
    let (mut zeros, mut word) = (0u64, 0u64);
    while word < WORDS_PER_PAGE {
        let gpa = page + 8 * word;
        // SAFETY: `page` is a data page of this vCPU's slice (identity mapped, user-accessible,
        // owned by this vCPU alone) and word < 512 stays inside it.
        let found = unsafe { base.add(word as usize).read_volatile() };
        if found == 0 {
            zeros += 1;
        } else if found != stress_pattern(seed, generation, gpa) {
            let what = if generation > 0 && found == stress_pattern(seed, generation - 1, gpa) {
                " -- the previous generation's data (stale)"
            } else if found == stress_pattern(seed, generation + 1, gpa) {
                " -- the next generation's data (torn rewrite)"
            } else {
                ""
            };
            fail(
                vcpu,
                format_args!(
                    "stress: corrupted word at GPA {gpa:#x}: found {found:#018x}, expected 0 or \
                     generation {generation} ({:#018x}){what}",
                    stress_pattern(seed, generation, gpa)
                ),
            );
        }
        word += 1;
    }
    match zeros {
        0 => PageState::Intact,
        WORDS_PER_PAGE => PageState::Zero,
        _ => PageState::Torn,
    }
}

/// Writes generation `generation` into every word of the data page at `page`, word 0 last.
fn write_page(seed: u64, page: u64, generation: u64) {
    let base = page as *mut u64;
    let mut word = WORDS_PER_PAGE;
    while word > 0 {
        word -= 1;
        // SAFETY: as in `check_page`; the page is writable (a write while the host keeps it
        // read-only exits to the VMM, which resumes the vCPU once it is writable again).
        unsafe { base.add(word as usize).write_volatile(stress_pattern(seed, generation, page + 8 * word)) };
    }
}

/// Runs this vCPU's role forever (the host stops the VM): a device driver when
/// [`stress_role`] says so, otherwise the stress loop.
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    match stress_role(boot.flags, boot.nr_vcpus, vcpu) {
        StressRole::BalloonDriver => crate::balloon::drive(vcpu, boot, true),
        StressRole::VirtioMemDriver => crate::virtio_mem::drive(vcpu, boot, true),
        StressRole::Verifier => verify_forever(vcpu, boot),
    }
}

/// The stress loop over this vCPU's slice (see the module docs).
fn verify_forever(vcpu: u64, boot: &BootInfo) -> ! {
    let work: &[GpaRange] = &boot.work[..boot.nr_work as usize];
    let layout: StressLayout = stress_layout(work, boot.nr_vcpus, vcpu);
    if layout.pages <= layout.meta_pages {
        fail(vcpu, format_args!("stress: slice of {} pages has no data pages", layout.pages));
    }
    let seed = boot.seed;
    let header = layout.header_gpa(work) as *mut StressHeader;
    let mut totals = StressHeader { magic: STRESS_MAGIC, ..StressHeader::default() };
    // SAFETY: the header lies at the start of this vCPU's first metadata page (identity mapped,
    // owned by this vCPU, never attacked by the host); the host only reads it.
    unsafe { header.write_volatile(totals) };
    loop {
        let (mut verified, mut zero, mut torn) = (0u64, 0u64, 0u64);
        let mut p = 0;
        while p < layout.data_pages() {
            let gen_ptr = layout.gen_gpa(work, p) as *mut u32;
            let page = layout.data_gpa(work, p);
            // SAFETY: the generation entry lies in this vCPU's metadata pages (see above); only
            // this vCPU writes it.
            let generation = u64::from(unsafe { gen_ptr.read_volatile() });
            match check_page(vcpu, seed, page, generation) {
                PageState::Intact => {}
                // Generation 0 is the zeroed RAM of the boot: nothing was discarded yet.
                PageState::Zero if generation == 0 => {}
                PageState::Zero => zero += 1,
                PageState::Torn => torn += 1,
            }
            verified += 1;
            let next = generation + 1;
            write_page(seed, page, next);
            // SAFETY: as above.
            unsafe { gen_ptr.write_volatile(next as u32) };
            p += 1;
        }
        totals.passes += 1;
        totals.verified += verified;
        totals.zero_pages += zero;
        totals.torn_pages += torn;
        // SAFETY: as for the first write of the header.
        unsafe { header.write_volatile(totals) };
        report(vcpu, UcallKind::Stage, &[STAGE_STRESS_PASS, totals.passes, verified, zero, torn]);
    }
}
