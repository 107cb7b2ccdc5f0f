//! One reading of a stats fd, and the difference of two.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::desc::{StatDesc, StatKind};
use crate::error::{Result, StatsError};
use crate::layout::StatsLayout;

/// One reading of a stats fd.
///
/// With the `serde` feature it serializes as a map from name to value: scalars as numbers,
/// histograms as arrays of bucket counts.
#[derive(Debug, Clone)]
pub struct Snapshot {
    layout: Arc<StatsLayout>,
    /// The data block as u64 words; a stat's values start at word `desc.offset / 8`.
    words: Vec<u64>,
}

impl Snapshot {
    /// Builds a snapshot from the bytes of a data block laid out as `layout` (`data` from
    /// `data_offset`, at least `data_len` bytes; extra bytes are ignored).
    pub(crate) fn from_bytes(layout: &Arc<StatsLayout>, data: &[u8]) -> Result<Self> {
        let data = data.get(..layout.data_len).ok_or(StatsError::ShortRead {
            offset: layout.data_offset,
            want: layout.data_len,
            got: data.len(),
        })?;
        let words =
            data.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        Ok(Self { layout: Arc::clone(layout), words })
    }

    /// The layout (descriptors) this snapshot was read with.
    pub fn layout(&self) -> &Arc<StatsLayout> {
        &self.layout
    }

    pub(crate) fn values_of(&self, d: &StatDesc) -> &[u64] {
        // In bounds by construction (parse checked offset + 8·size ≤ data_len, and `words` has
        // data_len / 8 entries); `get` keeps it panic-free regardless.
        self.words.get(d.offset / 8..d.offset / 8 + d.size).unwrap_or(&[])
    }

    /// All values of stat `name`: one for scalars, every bucket for histograms.
    pub fn values(&self, name: &str) -> Option<&[u64]> {
        self.layout.desc(name).map(|d| self.values_of(d))
    }

    /// The value of stat `name` as one number:
    /// - cumulative, instant, peak (and unknown kinds): its (first) value;
    /// - histograms: the sum of all buckets, i.e. the number of samples recorded so far (so it
    ///   behaves like a cumulative counter).
    ///
    /// `None` if there is no such stat; a stat with no values reads as 0.
    pub fn value(&self, name: &str) -> Option<u64> {
        self.layout.desc(name).map(|d| self.scalar(d))
    }

    /// [`Snapshot::value`] of the stat `d` describes.
    pub(crate) fn scalar(&self, d: &StatDesc) -> u64 {
        let v = self.values_of(d);
        if d.kind.is_histogram() {
            v.iter().fold(0u64, |a, &b| a.saturating_add(b))
        } else {
            v.first().copied().unwrap_or(0)
        }
    }

    /// `(descriptor, values)` of every stat, in the kernel's order.
    pub fn iter(&self) -> impl Iterator<Item = (&StatDesc, &[u64])> + '_ {
        self.layout.descs.iter().map(move |d| (d, self.values_of(d)))
    }

    /// Every stat's [`Snapshot::value`], by name.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        self.layout.descs.iter().map(|d| (d.name.clone(), self.scalar(d))).collect()
    }

    /// Changes from `earlier` to `self` (see [`Delta`]). `earlier` should come from the same
    /// [`StatsFd`](crate::StatsFd); otherwise stats are matched by name and ones missing from
    /// `earlier` count from 0.
    pub fn delta(&self, earlier: &Snapshot) -> Delta {
        let same = Arc::ptr_eq(&self.layout, &earlier.layout);
        let entries = self
            .layout
            .descs
            .iter()
            .map(|d| {
                let now = self.values_of(d);
                let before: &[u64] =
                    if same { earlier.values_of(d) } else { earlier.values(&d.name).unwrap_or(&[]) };
                let diff = |i: usize| {
                    i128::from(now.get(i).copied().unwrap_or(0))
                        - i128::from(before.get(i).copied().unwrap_or(0))
                };
                let buckets = d
                    .kind
                    .is_histogram()
                    .then(|| (0..now.len().max(before.len())).map(diff).collect::<Vec<_>>());
                let change = match &buckets {
                    Some(b) => b.iter().sum(),
                    None => diff(0),
                };
                DeltaEntry {
                    name: d.name.clone(),
                    kind: d.kind,
                    change,
                    now: (!d.kind.is_counter()).then(|| self.scalar(d)),
                    buckets,
                }
            })
            .collect();
        Delta { entries }
    }
}

/// How one stat moved between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeltaEntry {
    /// The stat's name.
    pub name: String,
    /// The stat's kind.
    pub kind: StatKind,
    /// Later minus earlier value (for histograms: of the bucket sums, i.e. samples recorded in
    /// between). Signed: instant stats such as pages_4k fall when KVM zaps mappings.
    pub change: i128,
    /// For instant/peak (level) stats: the later value, which is what such a stat reports; `None`
    /// for cumulative counters and histograms, where only the change is meaningful.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub now: Option<u64>,
    /// For histograms: the change of every bucket.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub buckets: Option<Vec<i128>>,
}

impl DeltaEntry {
    /// Whether the stat moved (some value changed).
    pub fn moved(&self) -> bool {
        self.change != 0 || self.buckets.as_ref().is_some_and(|b| b.iter().any(|&x| x != 0))
    }
}

impl fmt::Display for DeltaEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:+}", self.name, self.change)?;
        if let Some(now) = self.now {
            write!(f, " (now {now})")?;
        }
        Ok(())
    }
}

/// Differences between two [`Snapshot`]s of one stats fd, one [`DeltaEntry`] per stat.
///
/// Cumulative counters (and histograms) report `later − earlier`; instant and peak stats report
/// their later value in [`DeltaEntry::now`] and, as well, how much they moved in
/// [`DeltaEntry::change`] (that is how e.g. `pages_4k −512` after a 2 MiB discard shows up).
///
/// With the `serde` feature it serializes as a map from name to entry, containing only the stats
/// that moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    entries: Vec<DeltaEntry>,
}

impl Delta {
    /// All entries (moved or not), in the kernel's order.
    pub fn entries(&self) -> &[DeltaEntry] {
        &self.entries
    }

    /// The entry of stat `name`.
    pub fn get(&self, name: &str) -> Option<&DeltaEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The change of stat `name` (0 if it did not move, `None` if there is no such stat).
    pub fn change(&self, name: &str) -> Option<i128> {
        self.get(name).map(|e| e.change)
    }

    /// `(name, change)` of every stat that moved, in the kernel's order; for printing.
    pub fn nonzero(&self) -> impl Iterator<Item = (&str, i128)> + '_ {
        self.entries.iter().filter(|e| e.moved()).map(|e| (e.name.as_str(), e.change))
    }

    /// The entries of every stat that moved.
    pub fn moved(&self) -> impl Iterator<Item = &DeltaEntry> + '_ {
        self.entries.iter().filter(|e| e.moved())
    }
}

impl fmt::Display for Delta {
    /// One `name +change (now N)` per moved stat, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.moved().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_image::{image, sample_layout, sample_stats, snapshot};

    #[test]
    fn snapshot_values_and_delta_semantics() {
        let layout = sample_layout();
        let a = snapshot(&layout, &[10, 100, 7, 1, 2, 3]);
        let b = snapshot(&layout, &[15, 90, 9, 1, 4, 3]);
        assert_eq!(b.value("exits"), Some(15));
        assert_eq!(b.value("hist"), Some(8), "histogram value = sum of buckets");
        assert_eq!(b.values("hist"), Some(&[1, 4, 3][..]));
        assert_eq!(b.value("nope"), None);
        // Too little data is a short read, not a panic.
        assert!(matches!(
            Snapshot::from_bytes(&layout, &[0; 40]),
            Err(StatsError::ShortRead { want: 48, got: 40, .. })
        ));

        let d = b.delta(&a);
        assert_eq!(d.change("exits"), Some(5));
        let p = d.get("pages_4k").unwrap();
        assert_eq!((p.change, p.now), (-10, Some(90)));
        let m = d.get("max_rmap").unwrap();
        assert_eq!((m.change, m.now), (2, Some(9)));
        let h = d.get("hist").unwrap();
        assert_eq!((h.change, h.now, h.buckets.clone()), (2, None, Some(vec![0, 2, 0])));
        let moved: Vec<_> = d.nonzero().collect();
        assert_eq!(moved, [("exits", 5), ("pages_4k", -10), ("max_rmap", 2), ("hist", 2)]);
        assert_eq!(b.delta(&b).nonzero().count(), 0);
        assert_eq!(d.to_string(), "exits +5, pages_4k -10 (now 90), max_rmap +2 (now 9), hist +2");
    }

    /// Snapshots of two different fds are matched by name; a stat the earlier one lacks counts
    /// from 0.
    #[test]
    fn delta_across_layouts_matches_by_name() {
        let a = snapshot(&sample_layout(), &[10, 100, 7, 1, 2, 3]);
        let b = snapshot(&sample_layout(), &[15, 90, 9, 1, 4, 3]);
        assert!(!Arc::ptr_eq(a.layout(), b.layout()));
        assert_eq!(b.delta(&a).change("exits"), Some(5));
        assert_eq!(b.delta(&a).get("hist").unwrap().buckets, Some(vec![0, 2, 0]));
        let only_exits = Arc::new(StatsLayout::parse(&image(&sample_stats()[..1], &[])).unwrap());
        let c = snapshot(&only_exits, &[12]);
        let d = b.delta(&c);
        assert_eq!(d.change("exits"), Some(3));
        assert_eq!(d.change("pages_4k"), Some(90));
        assert_eq!(d.get("hist").unwrap().buckets, Some(vec![1, 4, 3]));
    }
}
