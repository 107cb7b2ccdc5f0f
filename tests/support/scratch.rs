//! A test's own temporary directory, removed when the test ends (also when it fails), and the
//! `zapvm` command pointed at it: what a test's VMs and files leave behind goes with it.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// A fresh directory `zapvm-test-<name>-XXXXXX` in the temporary directory, removed with
/// everything in it when the returned value drops.
pub fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("zapvm-test-{name}-"))
        .tempdir()
        .expect("a scratch directory in the temporary directory")
}

/// The `zapvm` binary under test, with `dir` as its temporary and runtime directory: its default
/// control socket (`zapvm-<pid>.sock`) and statistics snapshots go there, and a client command
/// run this way looks for sockets there only.
pub fn zapvm_in(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zapvm"));
    command.env("TMPDIR", dir).env("XDG_RUNTIME_DIR", dir);
    command
}
