//! A bare split virtqueue (`Queue::validate`, `pop`, `add_used`) over 64 KiB of guest memory
//! filled from arbitrary bytes: no panic, chains bounded by the queue size, heads in the table,
//! no overflowing buffer, at most `size` chains per batch.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../../../tests/parsers/support/mod.rs"]
mod support;

static MEM: OnceLock<vmm::memory::GuestMemoryMmap> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    support::run_virtqueue_fuzz(MEM.get_or_init(support::virtqueue_memory), data);
});
