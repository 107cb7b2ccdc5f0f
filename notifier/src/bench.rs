//! Benchmarks (see `run`).
