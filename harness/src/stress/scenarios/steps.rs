//! What the device storms (balloon, virtio-mem) share: picking a target, waiting (bounded) for
//! the guest's driver to reach it, reading pages through the device path and judging them, and
//! the planted dirty page (feature `fault-injection`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use guest_abi::PAGE_SIZE;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use vmm::mmu::GuestMemoryAccess;

use crate::stress::{bump, Ctx, StormCounters};

/// How long a device storm waits for the guest's driver to reach one target (a step of the
/// largest size is well under a second on an idle host).
pub(super) const STEP_WAIT: Duration = Duration::from_secs(120);
/// Pages of each kind a device storm reads through the device path after each step.
pub(super) const STEP_SAMPLES: usize = 8;

/// A random target in `0..=max` other than `current` (`max` > 0): mostly anywhere, sometimes
/// empty or full, sometimes a small move.
pub(crate) fn pick_target(rng: &mut ChaCha8Rng, current: u64, max: u64) -> u64 {
    assert!(max > 0, "no target other than {current} in 0..={max}");
    loop {
        let t = match rng.random_range(0..10) {
            0 => 0,
            1 => max,
            2..=4 => {
                let step = rng.random_range(1..=(max / 16).max(1));
                if rng.random_bool(0.5) {
                    current.saturating_sub(step)
                } else {
                    (current + step).min(max)
                }
            }
            _ => rng.random_range(0..=max),
        };
        if t != current {
            return t;
        }
    }
}

/// Polls `reached` every 2 ms until it returns `Ok`, the run ends (`Err(None)`) or [`STEP_WAIT`]
/// passes (`Err(Some(state))`, with the state `reached` gave last). Returns how long it took.
pub(super) fn poll_step(
    ctx: &Ctx,
    mut reached: impl FnMut() -> Result<(), String>,
) -> Result<Duration, Option<String>> {
    let started = Instant::now();
    loop {
        let state = match reached() {
            Ok(()) => return Ok(started.elapsed()),
            Err(state) => state,
        };
        if !ctx.running() {
            return Err(None);
        }
        if started.elapsed() >= STEP_WAIT {
            return Err(Some(state));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// [`poll_step`] for one target of a storm that moves `moved` units, counted in `s`; returns
/// whether it was reached.
pub(super) fn wait_step(
    ctx: &Ctx,
    s: &StormCounters,
    what: &str,
    moved: u64,
    reached: impl FnMut() -> Result<(), String>,
) -> bool {
    match poll_step(ctx, reached) {
        Ok(took) => {
            let ms = took.as_millis() as u64;
            bump(&s.reached, 1);
            bump(&s.moved, moved);
            bump(&s.step_ms_total, ms);
            s.step_ms_max.fetch_max(ms, Ordering::Relaxed);
            true
        }
        Err(None) => {
            bump(&s.unfinished, 1);
            false
        }
        Err(Some(state)) => {
            bump(&s.timed_out, 1);
            s.problem(format!("{what} not reached within {} s: {state}", STEP_WAIT.as_secs()));
            false
        }
    }
}

/// Reads the page at `gpa` through the device path; `None` if it cannot be read.
pub(super) fn read_page(ctx: &Ctx, gpa: u64) -> Option<Vec<u8>> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    ctx.mmu.read(gpa, &mut page).ok().map(|_| page)
}

/// The first non-zero word of `page` (at `gpa`) as (address, value).
pub(super) fn first_non_zero(gpa: u64, page: &[u8]) -> Option<(u64, u64)> {
    page.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        (v != 0).then_some((gpa + 8 * i as u64, v))
    })
}

/// The first word of `page` (at `gpa`) that is not the drivers' [`guest_abi::pattern`].
pub(super) fn first_not_pattern(seed: u64, gpa: u64, page: &[u8]) -> Option<(u64, u64)> {
    page.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let (v, at) = (u64::from_le_bytes(w.try_into().unwrap()), gpa + 8 * i as u64);
        (v != guest_abi::pattern(seed, at)).then_some((at, v))
    })
}

/// Writes a non-zero word into the discarded page at `gpa` once the planted fault is due (fault
/// injection for the stress test); returns whether it did.
pub(super) fn maybe_dirty(ctx: &Ctx, planted: &mut bool, gpa: u64) -> bool {
    let due = ctx.plant_dirty_after.is_some_and(|after| ctx.started.elapsed() >= after);
    if *planted || !due {
        return false;
    }
    *planted = ctx.mmu.write(gpa, &0x0bad_0bad_0bad_0badu64.to_le_bytes()).is_ok();
    *planted
}
