//! Synthetic stats-fd images for the unit tests: the kernel's layout, built byte by byte.

use std::sync::Arc;

use kvm_bindings::{
    KVM_STATS_BASE_POW10, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LOG_HIST,
    KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_SECONDS,
};

use crate::layout::{StatsLayout, DESC_FIXED_SIZE, HEADER_SIZE};
use crate::snapshot::Snapshot;

/// `name_size` of the synthetic images.
pub const NAME_SIZE: usize = 16;

/// One descriptor of a synthetic image.
pub struct Stat<'a> {
    pub name: &'a str,
    pub flags: u32,
    pub size: u16,
    pub offset: u32,
}

/// A stats-fd image: header, id at 24, descriptors after it, then the data block.
pub fn image(stats: &[Stat], data: &[u64]) -> Vec<u8> {
    let id_offset = HEADER_SIZE;
    let desc_offset = id_offset + NAME_SIZE;
    let data_offset = desc_offset + stats.len() * (DESC_FIXED_SIZE + NAME_SIZE);
    let mut b = Vec::new();
    for v in
        [0u32, NAME_SIZE as u32, stats.len() as u32, id_offset as u32, desc_offset as u32, data_offset as u32]
    {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    let mut id = [0u8; NAME_SIZE];
    id[..9].copy_from_slice(b"kvm-1234\0");
    b.extend_from_slice(&id);
    for s in stats {
        b.extend_from_slice(&s.flags.to_ne_bytes());
        b.extend_from_slice(&0i16.to_ne_bytes());
        b.extend_from_slice(&s.size.to_ne_bytes());
        b.extend_from_slice(&s.offset.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        let mut name = [0u8; NAME_SIZE];
        let n = s.name.len().min(NAME_SIZE);
        name[..n].copy_from_slice(&s.name.as_bytes()[..n]);
        b.extend_from_slice(&name);
    }
    for v in data {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

/// One stat of each kind: a counter, a level, a peak and a 3-bucket histogram; 6 words of data.
pub fn sample_stats() -> Vec<Stat<'static>> {
    vec![
        Stat { name: "exits", flags: KVM_STATS_TYPE_CUMULATIVE, size: 1, offset: 0 },
        Stat { name: "pages_4k", flags: KVM_STATS_TYPE_INSTANT, size: 1, offset: 8 },
        Stat { name: "max_rmap", flags: KVM_STATS_TYPE_PEAK, size: 1, offset: 16 },
        Stat {
            name: "hist",
            flags: KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS | KVM_STATS_BASE_POW10,
            size: 3,
            offset: 24,
        },
    ]
}

/// The layout of [`sample_stats`].
pub fn sample_layout() -> Arc<StatsLayout> {
    Arc::new(StatsLayout::parse(&image(&sample_stats(), &[])).unwrap())
}

/// A snapshot of `layout` holding `data`.
pub fn snapshot(layout: &Arc<StatsLayout>, data: &[u64]) -> Snapshot {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
    Snapshot::from_bytes(layout, &bytes).unwrap()
}
