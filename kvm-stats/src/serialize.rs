//! `serde::Serialize` for the types whose shape is not their fields' (feature `serde`); the rest
//! derive it where they are defined.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::snapshot::{Delta, Snapshot};

/// A map from name to value: scalars as numbers, histograms as arrays of bucket counts.
impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.layout().descriptors().len()))?;
        for (d, v) in self.iter() {
            if d.kind.is_histogram() {
                map.serialize_entry(&d.name, v)?;
            } else {
                map.serialize_entry(&d.name, &v.first().copied().unwrap_or(0))?;
            }
        }
        map.end()
    }
}

/// A map from name to [`DeltaEntry`](crate::DeltaEntry), only the stats that moved.
impl Serialize for Delta {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for e in self.moved() {
            map.serialize_entry(&e.name, e)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use crate::aggregate::KvmStats;
    use crate::test_image::{sample_layout, snapshot};

    #[test]
    fn json_shapes() {
        let layout = sample_layout();
        let a = snapshot(&layout, &[10, 100, 7, 1, 2, 3]);
        let b = snapshot(&layout, &[15, 90, 9, 1, 4, 3]);
        let json = serde_json::to_value(b.delta(&a)).unwrap();
        assert_eq!(json["pages_4k"]["change"], -10);
        assert_eq!(json["pages_4k"]["now"], 90);
        assert_eq!(json["hist"]["buckets"][1], 2);
        assert_eq!(json["exits"].get("now"), None, "counters carry no level");
        assert_eq!(serde_json::to_value(b.delta(&b)).unwrap(), serde_json::json!({}));
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["exits"], 15);
        assert_eq!(json["hist"], serde_json::json!([1, 4, 3]));

        let s1 = KvmStats::aggregate(&a, [&a]);
        let s2 = KvmStats::aggregate(&b, [&b]);
        let json = serde_json::to_value(&s2).unwrap();
        assert_eq!(json["nr_vcpus"], 1);
        assert_eq!(json["vm"]["exits"], 15);
        assert_eq!(json.as_object().unwrap().len(), 3, "the kinds are not serialized: {json}");
        let json = serde_json::to_value(s2.delta(&s1)).unwrap();
        assert_eq!(json["vcpus"]["pages_4k"]["change"], -10);
    }
}
