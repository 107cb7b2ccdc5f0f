//! The one way a test skips (shared by every test file that may skip): visibly, countably, and
//! never where skips are refused.
//!
//! [`skip`] prints `SKIP <test>: <reason>` to standard error and, when `ZAPVM_SKIP_LOG` names a
//! file, appends the same line to it (so that a summary can count and repeat the skips). When
//! `ZAPVM_REQUIRE_ALL=1` (CI), a skip is refused: [`skip`] panics with that line and the test
//! fails.
//!
//! A skipping test returns right after the call: `return skip("my_test", "why");`.

use std::io::Write;

/// Reports that `test` skips for `reason` (see the module docs); panics instead when skips are
/// refused.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("ZAPVM_SKIP_LOG").filter(|p| !p.is_empty()) {
        // One write of the whole line to a file opened for appending: lines of tests running in
        // parallel do not interleave.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            panic!("{line}; and the skip cannot be logged to {}: {e}", log.to_string_lossy());
        }
    }
    if std::env::var("ZAPVM_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{line} -- refused: ZAPVM_REQUIRE_ALL=1 allows no skip");
    }
}
