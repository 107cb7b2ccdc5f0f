//! The planted fault of [`StressOptions::plant_corrupt_verifier_word`] (feature
//! `fault-injection`): a word of verifier 0's memory corrupted behind the guest's back.

#[cfg(feature = "fault-injection")]
use std::time::Duration;

#[cfg(feature = "fault-injection")]
use guest_abi::PAGE_SIZE;
use rand::rngs::ChaCha8Rng;
#[cfg(feature = "fault-injection")]
use vmm::mmu::GuestMemoryAccess;

use crate::stress::Ctx;
#[cfg(doc)]
use crate::stress::StressOptions;
#[cfg(feature = "fault-injection")]
use crate::stress::{bump, monitor::guest_headers, PLANTED_WORD};

/// The planted fault of [`StressOptions::plant_corrupt_verifier_word`]: each time verifier 0
/// completes a pass, [`PLANTED_WORD`] goes into the middle of its last data page, which the guest
/// checks last in its next pass. (A plant that lands while the guest rewrites that very page, or
/// that a discard zeroes, is lost; the next pass brings the next one.)
pub(in crate::stress) fn corrupt_verifier(ctx: &Ctx, _rng: ChaCha8Rng) {
    #[cfg(feature = "fault-injection")]
    {
        let Some(layout) = ctx.layouts.first() else { return };
        let gpa = layout.data_gpa(&ctx.work, layout.data_pages() - 1) + PAGE_SIZE / 2;
        let mut planted_after = None;
        while ctx.running() {
            let passes = guest_headers(ctx)[0].passes;
            if planted_after != Some(passes) {
                if ctx.mmu.write(gpa, &PLANTED_WORD.to_le_bytes()).is_ok() {
                    bump(&ctx.planted_corruptions, 1);
                    tracing::warn!("planted fault: word {PLANTED_WORD:#x} written at GPA {gpa:#x}");
                }
                planted_after = Some(passes);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = ctx;
}
