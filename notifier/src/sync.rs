//! The synchronisation primitives of the concurrent protocols, swapped for loom's under `cfg(loom)`
//! so that `tests/loom.rs` model-checks the very code the crate ships.
//!
//! Only the protocol-critical parts (the subscriber registry and [`crate::Interval`]) use this module;
//! the userfaultfd monitor uses `std` directly and is not run under loom.

#[cfg(loom)]
pub(crate) use loom::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Condvar, Mutex, MutexGuard,
    },
    thread_local,
};

#[cfg(not(loom))]
pub(crate) use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Condvar, Mutex, MutexGuard,
    },
    thread_local,
};

/// Locks `m`, ignoring poisoning: a panicking subscriber must not wedge every later invalidation,
/// and every structure guarded here is left consistent at each unlock point (updates are applied
/// before any user callback runs).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Waits on `cv`, ignoring poisoning (see [`lock`]).
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
