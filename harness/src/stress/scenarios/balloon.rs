//! The balloon storm: the host moves the balloon's target up and down at random, the guest's
//! driver follows, and once it reached each target sampled ballooned pages must read zero and
//! sampled owned pages must hold the pattern.

use std::time::Duration;

use guest_abi::PAGE_SIZE;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use super::sleep_until_or;
use super::steps::{
    first_non_zero, first_not_pattern, maybe_dirty, pick_target, read_page, wait_step, STEP_SAMPLES,
};
use crate::stress::{bump, Ctx};

/// The balloon storm: random targets, each followed by the guest's driver, then checked.
pub(in crate::stress) fn balloon_storm(ctx: &Ctx, mut rng: ChaCha8Rng) {
    let Some(pool) = &ctx.balloon else { return };
    let s = &ctx.c.balloon_storm;
    let lock = || pool.device.lock().unwrap_or_else(|e| e.into_inner());
    let (pages, max) = (pool.slice.len() as u64, pool.max_target());
    if max == 0 {
        s.problem(format!(
            "the balloon driver's slice has {pages} pages, no more than the {} it keeps for itself: \
             give the guest more RAM",
            guest_abi::BALLOON_CARVED_PAGES
        ));
        return;
    }
    let mut current = 0u64;
    let mut planted = false;
    while ctx.running() {
        let target = pick_target(&mut rng, current, max);
        lock().update_config(|b| b.set_target_pages(target as u32));
        bump(&s.targets, 1);
        let what = format!("balloon target {target} pages (from {current})");
        let reached = wait_step(ctx, s, &what, target.abs_diff(current), || {
            let st = lock().device().stats();
            if u64::from(st.actual_pages) == target && st.ballooned_pages == target {
                Ok(())
            } else {
                Err(format!("actual {} pages, {} ballooned", st.actual_pages, st.ballooned_pages))
            }
        });
        if !reached {
            break;
        }
        current = target;
        // The balloon is the last `target` pages of the slice; the guest deflates its lowest
        // page first. Pages stay as they are until the next target (but for the driver's one
        // unrequested deflate-on-OOM, which the bitmap check after each read covers).
        let first = pages - target;
        if target > 0 && maybe_dirty(ctx, &mut planted, pool.slice[first as usize]) {
            tracing::warn!("planted fault: ballooned page {:#x} dirtied", pool.slice[first as usize]);
        }
        let mut ballooned: Vec<u64> = Vec::new();
        if target > 0 {
            ballooned.push(first);
            ballooned.extend((1..STEP_SAMPLES).map(|_| rng.random_range(first..pages)));
        }
        // Judged only if the page was in the balloon all along: ballooned before and after the
        // read with no deflate in between (the driver touches a page only after the device
        // processed its deflate, MUST_TELL_HOST; its one unrequested deflate-on-OOM deflates,
        // refills and re-inflates pages while the host samples).
        let still_ballooned = |pfn: u64| {
            let b = lock();
            b.device().is_ballooned(pfn).then(|| b.device().stats().deflated_pages)
        };
        for index in ballooned {
            let gpa = pool.slice[index as usize];
            let Some(deflated) = still_ballooned(gpa / PAGE_SIZE) else { continue };
            let Some(page) = read_page(ctx, gpa) else { continue };
            if still_ballooned(gpa / PAGE_SIZE) != Some(deflated) {
                continue;
            }
            bump(&s.discarded_checked, 1);
            if let Some((at, v)) = first_non_zero(gpa, &page) {
                bump(&s.discarded_not_zero, 1);
                s.problem(format!(
                    "ballooned page {gpa:#x} (pool page {index} of {pages}, balloon {target} pages) holds \
                     {v:#x} at {at:#x}, not zero"
                ));
            }
        }
        let carved = guest_abi::BALLOON_CARVED_PAGES;
        if first > carved {
            for _ in 0..STEP_SAMPLES {
                let index = rng.random_range(carved..first);
                let gpa = pool.slice[index as usize];
                let Some(page) = read_page(ctx, gpa) else { continue };
                bump(&s.owned_checked, 1);
                if let Some((at, v)) = first_not_pattern(ctx.seed, gpa, &page) {
                    bump(&s.owned_bad, 1);
                    s.problem(format!(
                        "owned pool page {gpa:#x} (pool page {index}, balloon {target} pages) holds {v:#x} \
                         at {at:#x}, not the pattern"
                    ));
                }
            }
        }
        sleep_until_or(ctx, Duration::from_millis(rng.random_range(0..20)));
    }
}
