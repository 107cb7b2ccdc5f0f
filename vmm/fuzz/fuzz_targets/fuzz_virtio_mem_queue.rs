//! virtio-mem's request queue driven from arbitrary bytes (24-byte requests, descriptor shapes,
//! avail ring, notifies, requested-size changes) on a VM-less rig built once per process.
//! Invariants: no panic; every discard lies inside the device region and is whole blocks; every
//! used element names a head inside the table with length 0 or 10.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "../../../tests/parsers/support/mod.rs"]
mod support;

static RIG: OnceLock<Mutex<support::MemRig>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rig = RIG.get_or_init(|| Mutex::new(support::MemRig::new()));
    rig.lock().unwrap_or_else(|e| e.into_inner()).run_fuzz(data);
});
