//! Wall-clock timestamps as RFC 3339 UTC (`2026-12-02T18:22:09Z`), for reports people keep and
//! compare: `zapvm stats`, the metrics sample, the benchmarks' reports.
//!
//! Days become a civil date by Howard Hinnant's `civil_from_days`; a date crate for one format of
//! one timestamp is not worth the dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// `time` as an RFC 3339 UTC timestamp, to the second (a time before the epoch reads as the
/// epoch).
pub fn rfc3339(time: SystemTime) -> String {
    rfc3339_secs(time.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0))
}

/// The current time as [`rfc3339`].
pub fn utc_now() -> String {
    rfc3339(SystemTime::now())
}

/// `secs` since the Unix epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339_secs(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_secs(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_secs(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339_secs(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339(UNIX_EPOCH - std::time::Duration::from_secs(5)), "1970-01-01T00:00:00Z");
    }
}
