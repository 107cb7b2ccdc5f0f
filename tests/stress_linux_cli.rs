//! `zapvm stress --linux`'s flags: bad values are refused with a clear message before any VM
//! boots or the Linux guest is built (`LinuxStressOptions::validate` runs first), and flags that
//! only mean something with --linux are refused without it. No VM runs here.

#[path = "support/scratch.rs"]
mod scratch;

use std::process::Output;

use scratch::{scratch_dir, zapvm_in};

fn zapvm(args: &[&str]) -> Output {
    let dir = scratch_dir("stress-linux-cli");
    zapvm_in(dir.path()).args(args).output().expect("zapvm runs")
}

/// `args` exit with `code` (1: the run refused them, 2: clap's usage error), one error message
/// on stderr that contains `needle`, no panic, nothing on stdout.
fn assert_refused(args: &[&str], code: i32, needle: &str) {
    let out = zapvm(args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.is_empty(), "{args:?}: no report for a refused run: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("linux-guest:"), "{args:?}: the guest was built for a refused run: {stderr}");
    let prefix = if code == 1 { "zapvm: error: " } else { "error: " };
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(errors.len(), 1, "{args:?}: want one {prefix:?} line, stderr: {stderr}");
    // clap's message may go on over a few lines (its list of missing arguments).
    let message = if code == 1 { errors[0] } else { &stderr };
    assert!(message.contains(needle), "{args:?}: {message:?} does not mention {needle:?}");
}

#[test]
fn a_zero_duration_or_step_wait_is_a_usage_error() {
    assert_refused(&["stress", "--linux", "--duration", "0"], 2, "must be positive");
    assert_refused(&["stress", "--linux", "--step-wait", "0s"], 2, "must be positive");
    assert_refused(&["stress", "--linux", "--duration", "soon"], 2, "bad duration");
}

#[test]
fn no_targets_is_refused() {
    assert_refused(&["stress", "--linux", "--targets", "0"], 1, "--targets");
}

#[test]
fn a_guest_too_small_for_its_checkers_is_refused() {
    assert_refused(&["stress", "--linux", "--mem", "64M"], 1, "too small");
    assert_refused(&["stress", "--linux", "--mem", "128M", "--churn-mib", "64"], 1, "--mem");
    assert_refused(&["stress", "--linux", "--oom-one-in", "0"], 1, "--oom-one-in");
}

#[test]
fn a_storm_without_a_checker_is_refused() {
    assert_refused(
        &["stress", "--linux", "--memtest-mib", "0", "--seedcheck-mib", "0"],
        1,
        "needs a checker",
    );
}

#[test]
fn a_max_target_below_a_mib_is_refused() {
    assert_refused(&["stress", "--linux", "--max-target", "4K"], 1, "--max-target");
    assert_refused(&["stress", "--linux", "--max-target", "lots"], 2, "--max-target");
}

#[test]
fn a_virtio_mem_region_linux_cannot_hot_plug_whole_is_refused() {
    assert_refused(
        &["stress", "--linux", "--virtio-mem", "--virtio-mem-region", "64M"],
        1,
        "--virtio-mem-region",
    );
}

#[test]
fn linux_only_flags_need_linux_and_linux_excludes_the_test_guest_scenarios() {
    assert_refused(&["stress", "--churn-mib", "8"], 2, "--linux");
    assert_refused(&["stress", "--no-oom-targets"], 2, "--linux");
    assert_refused(&["stress", "--linux", "--discard"], 2, "cannot be used with");
}
