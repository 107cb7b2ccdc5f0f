//! A [`Duration`] in a report as a number of seconds (`0.6`), not serde's default
//! `{"secs": 0, "nanos": 600000000}`: what a person or a tracking tool reading the JSON expects.
//! Reading also accepts the old `{"secs", "nanos"}` form, so reports written before still load
//! (`zapvm bench pressure --from-json`). Use with `#[serde(with = "crate::seconds")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes `d` as seconds.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Reads seconds (or the old `{"secs", "nanos"}` form); a negative, infinite or overlong
/// number is an error naming it.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Seconds(f64),
        Parts { secs: u64, nanos: u32 },
    }
    match Either::deserialize(d)? {
        Either::Seconds(s) => Duration::try_from_secs_f64(s)
            .map_err(|e| serde::de::Error::custom(format!("{s} is not a duration in seconds: {e}"))),
        Either::Parts { secs, nanos } => Ok(Duration::new(secs, nanos)),
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(with = "crate::seconds")]
        d: std::time::Duration,
    }

    #[test]
    fn seconds_both_ways_and_the_old_form() {
        let t = T { d: std::time::Duration::from_millis(600) };
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"d":0.6}"#);
        assert_eq!(serde_json::from_str::<T>(r#"{"d":0.6}"#).unwrap(), t);
        assert_eq!(serde_json::from_str::<T>(r#"{"d":{"secs":0,"nanos":600000000}}"#).unwrap(), t);
        let e = serde_json::from_str::<T>(r#"{"d":-1}"#).unwrap_err().to_string();
        assert!(e.contains("-1 is not a duration"), "{e}");
    }
}
