//! The virtio-balloon's queues driven from arbitrary bytes (descriptors, avail rings, PFN arrays,
//! stats buffers, free page reports, notifies) on a VM-less rig built once per process: guest
//! RAM with a hot-pluggable region, the notifier, the VMM's table, the balloon behind its
//! virtio-mmio transport. Invariants: no panic, and the recording subscriber never sees a discard
//! outside guest RAM, in the hot-pluggable region (the rig shares no virtio-mem plugged map, so
//! none of it is the balloon's), of a page the inflate did not balloon, or from the deflate/stats
//! queues.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "../../../tests/parsers/support/mod.rs"]
mod support;

static RIG: OnceLock<Mutex<support::BalloonRig>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rig = RIG.get_or_init(|| Mutex::new(support::BalloonRig::new()));
    rig.lock().unwrap_or_else(|e| e.into_inner()).run_fuzz(data);
});
