//! The device-path reader (always runs): random data pages read through the VMM's table, each
//! word judged against the generations the guest's metadata allows.

use std::sync::atomic::Ordering;

use guest_abi::{stress_pattern, PAGE_SIZE};
use rand::rngs::ChaCha8Rng;

use vmm::mmu::{AccessError, GuestMemoryAccess};

use crate::stress::{bump, Ctx};

/// The device path: random data pages through the VMM's table, judged against the metadata.
pub(in crate::stress) fn device_reader(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let c = &ctx.c;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    while ctx.running() {
        let (run, gpa, _) = ctx.pick(&mut rng, PAGE_SIZE);
        let index = run.first_index + (gpa - run.gpa) / PAGE_SIZE;
        let judged = (|| -> Result<bool, AccessError> {
            let g1 = ctx.generation(run.vcpu, index)?;
            ctx.mmu.read(gpa, &mut page)?;
            let g2 = ctx.generation(run.vcpu, index)?;
            if g2 < g1 || g2 > g1 + 1 {
                return Ok(false);
            }
            // Data the guest completed (g1), or is writing (up to g2 + 1), or zeros.
            let bad = page.chunks_exact(8).enumerate().find_map(|(i, w)| {
                let v = u64::from_le_bytes(w.try_into().unwrap());
                let at = gpa + 8 * i as u64;
                (v != 0 && !(g1..=g2 + 1).any(|g| v == stress_pattern(ctx.seed, g, at))).then_some((at, v))
            });
            if let Some((at, v)) = bad {
                bump(&c.dev_stale, 1);
                ctx.first_stale_device.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!(
                    "device read of GPA {at:#x} returned {v:#x}, not 0 nor generation {g1}..={}",
                    g2 + 1
                ));
            }
            Ok(true)
        })();
        match judged {
            Ok(true) => bump(&c.dev_reads, 1),
            Ok(false) => bump(&c.dev_raced, 1),
            Err(AccessError::Unmapped { .. }) => bump(&c.dev_unmapped, 1),
            Err(e) => {
                ctx.note_error(format!("device read of {gpa:#x}: {e}"));
                bump(&c.dev_unmapped, 1);
            }
        }
        c.dev_last_ms.store(ctx.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
