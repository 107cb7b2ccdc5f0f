//! The Python clients of the tests: stock implementations of the protocols zapvm speaks (QEMU's
//! `qemu.qmp`, the Prometheus project's `prometheus_client`), run from the virtual environment
//! `tests/python/setup-venv` makes from `tests/python/requirements.txt`.
//!
//! [`python`] returns that environment's interpreter, making the environment first if it is not
//! there yet (once: the script keeps an environment made from the same requirements, and tests
//! calling it in parallel wait for the one that builds it). Where it cannot be made (no python3,
//! no venv module, no PyPI) the test skips through `skip.rs`, with the script's reason.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root: the nearest ancestor of this crate's manifest directory that holds
/// `tests/python/setup-venv`.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("tests/python/setup-venv").is_file())
        .unwrap_or_else(|| panic!("no tests/python/setup-venv above {}", manifest.display()))
        .to_path_buf()
}

/// A script under `tests/python/`, by file name.
pub fn script(name: &str) -> PathBuf {
    repo_root().join("tests/python").join(name)
}

/// The virtual environment's python, or `None` after reporting a skip of `test` (see the module
/// docs).
pub fn python(test: &str) -> Option<PathBuf> {
    let setup = repo_root().join("tests/python/setup-venv");
    let out = match Command::new(&setup).output() {
        Ok(out) => out,
        Err(e) => {
            super::skip::skip(test, &format!("cannot run {}: {e}", setup.display()));
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last().map(PathBuf::from) {
        Some(python) if out.status.success() && python.is_file() => Some(python),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
            super::skip::skip(test, &format!("no Python environment for the client tests: {reason}"));
            None
        }
    }
}
