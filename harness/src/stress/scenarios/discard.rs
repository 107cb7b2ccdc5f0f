//! The discard storm: random page-aligned ranges of the verifiers' data pages discarded through
//! the notifier, each checked through the device path right after.

use guest_abi::{stress_pattern, PAGE_SIZE};
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use vmm::mmu::GuestMemoryAccess;

use crate::stress::{bump, Ctx};

/// The discard storm: random ranges through the notifier, each checked right after.
pub(in crate::stress) fn discard_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut planted = false;
    while ctx.running() {
        ctx.maybe_plant(&mut planted);
        let (run, gpa, len) = ctx.pick(&mut rng, ctx.discard_max);
        // Generations the guest had completed before the discard, for up to 4 sampled pages.
        let pages = len / PAGE_SIZE;
        let samples: Vec<u64> = (0..pages.min(4)).map(|_| rng.random_range(0..pages)).collect();
        let before: Vec<Option<u64>> = samples
            .iter()
            .map(|&p| ctx.generation(run.vcpu, run.first_index + (gpa - run.gpa) / PAGE_SIZE + p).ok())
            .collect();
        let mut done = true;
        for (s, l) in ctx.pieces(ctx.hva(&run, gpa), len as usize) {
            match ctx.space().discard(s, l) {
                Ok(_) => {
                    bump(&c.discard_ops, 1);
                    bump(&c.discard_bytes, l as u64);
                }
                // Not mapped: an external hole the notifier knew of, or one it has not heard of
                // yet (the syscall failed with ENOMEM).
                Err(notifier::Error::NotMapped { .. }) => {
                    bump(&c.discard_skipped, 1);
                    done = false;
                }
                Err(notifier::Error::Os { source, .. }) if source.raw_os_error() == Some(libc::ENOMEM) => {
                    bump(&c.discard_skipped, 1);
                    done = false;
                }
                Err(e) => {
                    bump(&c.discard_errors, 1);
                    ctx.note_error(format!("discard {s:#x}+{l:#x}: {e}"));
                    done = false;
                }
            }
        }
        if !done
            || ctx.pieces(ctx.hva(&run, gpa), len as usize).iter().map(|p| p.1 as u64).sum::<u64>() != len
        {
            continue; // a hole came or went: the range is not known to be discarded as a whole
        }
        // Every word the guest wrote before the discard is gone: only zeros or generations
        // written after it (> the generation read before) may be found.
        for (&p, g0) in samples.iter().zip(before) {
            let Some(g0) = g0 else { continue };
            let page_gpa = gpa + p * PAGE_SIZE;
            if ctx.mmu.read(page_gpa, &mut page).is_err() {
                continue;
            }
            bump(&c.discard_checked, 1);
            let stale = page.chunks_exact(8).enumerate().find_map(|(i, w)| {
                let v = u64::from_le_bytes(w.try_into().unwrap());
                let at = page_gpa + 8 * i as u64;
                (v != 0 && (g0.saturating_sub(2)..=g0).any(|g| v == stress_pattern(ctx.seed, g, at)))
                    .then_some((at, v))
            });
            if let Some((at, v)) = stale {
                bump(&c.discard_stale, 1);
                ctx.first_stale_discard.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!(
                    "GPA {at:#x} holds {v:#x} (generation <= {g0}, written before the discard) after the discard"
                ));
            }
        }
    }
}
