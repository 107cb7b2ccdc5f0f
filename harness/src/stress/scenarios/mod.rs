//! The scenario threads: each runs on its own thread with its own RNG until the run ends
//! (see the [stress module's documentation](super)), sharing the run's [`Ctx`].
//!
//! - `discard.rs`: the discard storm through the notifier;
//! - `chaos.rs`: the external chaos (raw madvise, munmap, mremap and, on sealed RAM, mprotect and
//!   MAP_FIXED blows);
//! - `mprotect.rs`: the read-only / read-write phases and their restore;
//! - `device_reader.rs`: the device-path reader;
//! - `steps.rs`: what the two device storms share (targets, waiting for the guest's driver, the
//!   page checks);
//! - `balloon.rs` and `virtio_mem.rs`: the balloon and virtio-mem storms;
//! - `corrupt_verifier.rs`: a planted fault (feature `fault-injection`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Ctx;

mod balloon;
mod chaos;
mod corrupt_verifier;
mod device_reader;
mod discard;
mod mprotect;
mod steps;
mod virtio_mem;

pub(super) use balloon::balloon_storm;
pub(super) use chaos::{external_chaos, SealedBlow};
pub(super) use corrupt_verifier::corrupt_verifier;
pub(super) use device_reader::device_reader;
pub(super) use discard::discard_storm;
pub(super) use mprotect::mprotect_phases;
pub(crate) use steps::pick_target;
pub(super) use virtio_mem::virtio_mem_storm;

fn sleep_until_or(ctx: &Ctx, d: Duration) {
    let until = (Instant::now() + d).min(ctx.deadline);
    while !ctx.stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(20)));
    }
}
