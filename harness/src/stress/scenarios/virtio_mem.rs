//! The virtio-mem storm: the host moves the device's `requested_size` up and down at random, the
//! guest's driver follows, and once its step is complete sampled plugged pages must hold the
//! pattern and sampled unplugged pages must read zero.

use std::time::Duration;

use guest_abi::PAGE_SIZE;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use super::sleep_until_or;
use super::steps::{
    first_non_zero, first_not_pattern, maybe_dirty, pick_target, poll_step, read_page, wait_step,
    STEP_SAMPLES, STEP_WAIT,
};
use crate::stress::{bump, Ctx};

/// STATE requests the guest's virtio-mem driver sends over `blocks` blocks of one state (it
/// asks about at most 32768 blocks at a time).
fn state_requests(blocks: u64) -> u64 {
    blocks.div_ceil(0x8000)
}

/// The virtio-mem storm: random requested sizes, each followed by the guest's driver, then
/// checked.
pub(in crate::stress) fn virtio_mem_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let Some(device) = &ctx.virtio_mem else { return };
    let s = &ctx.c.mem_storm;
    let lock = || device.lock().unwrap_or_else(|e| e.into_inner());
    let st = lock().device().stats();
    let (addr, block) = (st.addr, st.block_size);
    let blocks = st.region_size / block;
    let pages_per_block = block / PAGE_SIZE;
    // The driver's probe ends with STATE requests over the whole (unplugged) region: a step's
    // own STATE requests can only be counted after those.
    let probed = poll_step(ctx, || {
        let st = lock().device().stats();
        if st.state_requests >= state_requests(blocks) {
            Ok(())
        } else {
            Err(format!("{} STATE requests", st.state_requests))
        }
    });
    match probed {
        Ok(_) => {}
        Err(None) => return,
        Err(Some(state)) => {
            bump(&s.timed_out, 1);
            s.problem(format!(
                "the virtio-mem driver did not probe within {} s: {state}",
                STEP_WAIT.as_secs()
            ));
            return;
        }
    }
    let mut current = 0u64;
    let mut planted = false;
    while ctx.running() {
        let target = pick_target(&mut rng, current, blocks);
        let bytes = target * block;
        let before = lock().device().stats().state_requests;
        let states = state_requests(target) + state_requests(blocks - target);
        if let Err(e) = lock().update_config(|m| m.set_requested_size(bytes)) {
            s.problem(format!("requested size {bytes:#x} refused: {e}"));
            break;
        }
        bump(&s.targets, 1);
        let what = format!("virtio-mem requested size {target} blocks (from {current})");
        let reached = wait_step(ctx, s, &what, target.abs_diff(current), || {
            let st = lock().device().stats();
            if st.plugged_size == bytes && st.state_requests >= before + states {
                Ok(())
            } else {
                Err(format!(
                    "plugged {} blocks, {} of {states} STATE requests",
                    st.plugged_size / block,
                    st.state_requests - before
                ))
            }
        });
        if !reached {
            break;
        }
        let old = std::mem::replace(&mut current, target);
        // Blocks [0, target) are plugged and hold the pattern; the rest are unplugged: the
        // driver plugs the lowest (block `target`) next.
        if target < blocks && maybe_dirty(ctx, &mut planted, addr + target * block) {
            tracing::warn!("planted fault: unplugged block {target} dirtied");
        }
        if target > 0 {
            for _ in 0..STEP_SAMPLES {
                let gpa = addr + rng.random_range(0..target * pages_per_block) * PAGE_SIZE;
                let Some(page) = read_page(ctx, gpa) else { continue };
                bump(&s.owned_checked, 1);
                if let Some((at, v)) = first_not_pattern(ctx.seed, gpa, &page) {
                    bump(&s.owned_bad, 1);
                    s.problem(format!(
                        "plugged page {gpa:#x} (block {} of {target} plugged) holds {v:#x} at {at:#x}, not \
                         the pattern",
                        (gpa - addr) / block
                    ));
                }
            }
        }
        if target < blocks {
            // The next block to be plugged, then pages of the blocks just unplugged (if any),
            // else of any unplugged block.
            let (lo, hi) = if old > target { (target, old) } else { (target, blocks) };
            let mut sampled = vec![addr + target * block];
            sampled
                .extend((1..STEP_SAMPLES).map(|_| {
                    addr + rng.random_range(lo * pages_per_block..hi * pages_per_block) * PAGE_SIZE
                }));
            // Judged only if the block stayed unplugged all along (it does: the host changes
            // nothing until the next target; checked anyway, as for the balloon).
            let still_unplugged = |gpa: u64| {
                let m = lock();
                (!m.device().is_plugged(gpa)).then(|| m.device().stats().blocks_plugged)
            };
            for gpa in sampled {
                let Some(plugged) = still_unplugged(gpa) else { continue };
                let Some(page) = read_page(ctx, gpa) else { continue };
                if still_unplugged(gpa) != Some(plugged) {
                    continue;
                }
                bump(&s.discarded_checked, 1);
                if let Some((at, v)) = first_non_zero(gpa, &page) {
                    bump(&s.discarded_not_zero, 1);
                    s.problem(format!(
                        "unplugged page {gpa:#x} (block {}, {target} plugged, {old} before) holds {v:#x} at \
                         {at:#x}, not zero",
                        (gpa - addr) / block
                    ));
                }
            }
        }
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(0..20)));
    }
}
