//! The stats fd's metadata: parsing and checking the header, the id and the descriptors.

use std::collections::HashMap;
use std::ops::Range;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};

use crate::desc::{StatBase, StatDesc, StatKind, StatUnit};
use crate::error::{malformed, Result};

/// Size of `struct kvm_stats_header` (24 bytes).
pub(crate) const HEADER_SIZE: usize = std::mem::size_of::<kvm_stats_header>();
/// Size of the fixed part of `struct kvm_stats_desc` (16 bytes); each descriptor is followed by
/// `name_size` bytes of name.
pub(crate) const DESC_FIXED_SIZE: usize = std::mem::size_of::<kvm_stats_desc>();

/// Sanity limits on kernel-supplied sizes, so a corrupt header cannot make us allocate gigabytes.
/// Today's kernels: name_size 48, fewer than 100 descriptors, data blocks of a few hundred bytes
/// (histograms add at most a few kilobytes).
const MAX_NAME_SIZE: u32 = 4096;
const MAX_NUM_DESC: u32 = 1 << 16;
const MAX_METADATA_BYTES: usize = 16 << 20;
const MAX_DATA_BYTES: usize = 16 << 20;

/// Everything about a stats fd that does not change: its id and descriptors, and where each
/// stat's values are. Shared (via `Arc`) by every [`Snapshot`](crate::Snapshot) of that fd.
#[derive(Debug)]
pub struct StatsLayout {
    id: String,
    pub(crate) descs: Vec<StatDesc>,
    /// Index in `descs` of the first descriptor of each name.
    by_name: HashMap<String, usize>,
    pub(crate) data_offset: u64,
    /// Bytes of the data block that cover every descriptor (a multiple of 8).
    pub(crate) data_len: usize,
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

/// Parses `struct kvm_stats_header` from the first 24 bytes of `buf`.
pub(crate) fn parse_header(buf: &[u8]) -> Result<kvm_stats_header> {
    if buf.len() < HEADER_SIZE {
        return Err(malformed(format!("header needs {HEADER_SIZE} bytes, got {}", buf.len())));
    }
    let field = |i: usize| u32_at(buf, 4 * i).unwrap_or(0); // in bounds: checked above
    Ok(kvm_stats_header {
        flags: field(0),
        name_size: field(1),
        num_desc: field(2),
        id_offset: field(3),
        desc_offset: field(4),
        data_offset: field(5),
    })
}

/// Validates the header (sizes within limits; id, descriptors and data in the kernel's order:
/// nothing inside the header, data after the descriptors) and returns the byte ranges of the id
/// and of the descriptor block, both within the sanity limits.
pub(crate) fn header_ranges(h: &kvm_stats_header) -> Result<(Range<usize>, Range<usize>)> {
    if h.name_size == 0 || h.name_size > MAX_NAME_SIZE {
        return Err(malformed(format!("name_size {} is outside 1..={MAX_NAME_SIZE}", h.name_size)));
    }
    if h.num_desc > MAX_NUM_DESC {
        return Err(malformed(format!("num_desc {} exceeds {MAX_NUM_DESC}", h.num_desc)));
    }
    if (h.id_offset as usize) < HEADER_SIZE || (h.desc_offset as usize) < HEADER_SIZE {
        return Err(malformed(format!(
            "id_offset {} / desc_offset {} overlap the {HEADER_SIZE}-byte header",
            h.id_offset, h.desc_offset
        )));
    }
    let name_size = h.name_size as usize;
    let id = h.id_offset as usize..h.id_offset as usize + name_size;
    let desc_bytes = (DESC_FIXED_SIZE + name_size) * h.num_desc as usize; // ≤ 2^16 × 4112
    let desc = h.desc_offset as usize..h.desc_offset as usize + desc_bytes;
    if desc.end > MAX_METADATA_BYTES || id.end > MAX_METADATA_BYTES {
        return Err(malformed(format!(
            "descriptors end at byte {}, id at {}: more than {MAX_METADATA_BYTES}",
            desc.end, id.end
        )));
    }
    if (h.data_offset as usize) < desc.end {
        return Err(malformed(format!(
            "data_offset {} lies inside the descriptors (bytes {}..{})",
            h.data_offset, desc.start, desc.end
        )));
    }
    Ok((id, desc))
}

impl StatsLayout {
    /// Parses a stats fd's metadata from `image`, the fd's bytes from offset 0 and at least up
    /// to the end of the descriptor block (the data block need not be included).
    ///
    /// Checks everything the kernel supplies: the header's sizes against sanity limits and its
    /// offsets for the kernel's order (header, id, descriptors, data), the descriptor block against
    /// `image.len()`, each name (NUL-terminated within `name_size`, non-empty printable ASCII),
    /// each stat's values (`size` ≥ 1; `offset` 8-byte aligned, `offset + 8·size` within the
    /// data-block limit). An id that lies outside `image` is reported as empty. Duplicate names:
    /// the first descriptor wins for name lookups. Never panics.
    pub fn parse(image: &[u8]) -> Result<Self> {
        let header = parse_header(image)?;
        let (id_range, desc_range) = header_ranges(&header)?;
        let id = image
            .get(id_range)
            .map(|b| {
                let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                String::from_utf8_lossy(&b[..end]).into_owned()
            })
            .unwrap_or_default();
        let block = image.get(desc_range.clone()).ok_or_else(|| {
            malformed(format!(
                "{} descriptors span bytes {}..{} but only {} bytes are available",
                header.num_desc,
                desc_range.start,
                desc_range.end,
                image.len()
            ))
        })?;
        let name_size = header.name_size as usize;
        let stride = DESC_FIXED_SIZE + name_size;
        let mut descs = Vec::with_capacity(header.num_desc as usize);
        let mut by_name = HashMap::with_capacity(header.num_desc as usize);
        let mut data_len = 0usize;
        for (i, raw) in block.chunks_exact(stride).enumerate() {
            let bad = |what: &str| malformed(format!("descriptor {i}: {what}"));
            // Fixed part: flags u32 @0, exponent s16 @4, size u16 @6, offset u32 @8,
            // bucket_size u32 @12 (struct kvm_stats_desc), then name[name_size] @16.
            let flags = u32_at(raw, 0).ok_or_else(|| bad("truncated"))?;
            let exponent = u16_at(raw, 4).ok_or_else(|| bad("truncated"))? as i16;
            let size = u16_at(raw, 6).ok_or_else(|| bad("truncated"))? as usize;
            let offset = u32_at(raw, 8).ok_or_else(|| bad("truncated"))? as usize;
            let bucket_size = u32_at(raw, 12).ok_or_else(|| bad("truncated"))?;
            let name_bytes = raw.get(DESC_FIXED_SIZE..).unwrap_or(&[]);
            let nul = name_bytes
                .iter()
                .position(|&c| c == 0)
                .ok_or_else(|| bad("name is not NUL-terminated within name_size"))?;
            let name = String::from_utf8_lossy(&name_bytes[..nul]).into_owned();
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
                return Err(bad(&format!("name {name:?} is empty or not printable ASCII")));
            }
            if size == 0 {
                return Err(bad(&format!("{name}: size 0 (no values)")));
            }
            if offset % 8 != 0 {
                return Err(bad(&format!("{name}: offset {offset} is not 8-byte aligned")));
            }
            // offset < 2^32 and size < 2^16: no overflow in usize (64-bit).
            let end = offset + size * 8;
            if end > MAX_DATA_BYTES {
                return Err(bad(&format!("{name}: values end at data byte {end}, beyond {MAX_DATA_BYTES}")));
            }
            data_len = data_len.max(end);
            by_name.entry(name.clone()).or_insert(descs.len());
            descs.push(StatDesc {
                name,
                kind: StatKind::from_flags(flags),
                unit: StatUnit::from_flags(flags),
                base: StatBase::from_flags(flags),
                exponent,
                size,
                offset,
                bucket_size,
                flags,
            });
        }
        Ok(Self { id, descs, by_name, data_offset: u64::from(header.data_offset), data_len })
    }

    /// The fd's id string (`"kvm-<pid>"` for a VM, `"kvm-<pid>/vcpu-<n>"` for a vCPU).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// All descriptors, in the kernel's order.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.descs
    }

    /// The descriptor named `name`.
    pub fn desc(&self, name: &str) -> Option<&StatDesc> {
        self.by_name.get(name).map(|&i| &self.descs[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StatsError;
    use crate::test_image::{image, sample_stats, NAME_SIZE};

    #[test]
    fn parse_synthetic_image() {
        let img = image(&sample_stats(), &[0; 6]);
        let layout = StatsLayout::parse(&img).unwrap();
        assert_eq!(layout.id(), "kvm-1234");
        let names: Vec<_> = layout.descriptors().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["exits", "pages_4k", "max_rmap", "hist"]);
        let h = layout.desc("hist").unwrap();
        assert_eq!(
            (h.kind, h.unit, h.base, h.size),
            (StatKind::LogHist, StatUnit::Seconds, StatBase::Pow10, 3)
        );
        assert_eq!(layout.data_len, 48);
        // The image without its data block parses too (only metadata is needed).
        let meta_len = img.len() - 48;
        assert!(StatsLayout::parse(&img[..meta_len]).is_ok());
    }

    #[test]
    fn parse_rejects_malformed_headers() {
        let good = image(&sample_stats(), &[0; 6]);
        let set = |img: &mut Vec<u8>, field: usize, v: u32| {
            img[4 * field..4 * field + 4].copy_from_slice(&v.to_ne_bytes())
        };
        let expect_malformed = |img: &[u8], what: &str| match StatsLayout::parse(img) {
            Err(StatsError::Malformed(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected Malformed, got {other:?}"),
        };
        // Every truncation of the metadata (header, descriptors) is rejected, never a panic.
        let meta_len = good.len() - 48;
        for len in 0..meta_len {
            assert!(StatsLayout::parse(&good[..len]).is_err(), "truncated to {len}");
        }
        let mut img = good.clone();
        set(&mut img, 1, 0);
        expect_malformed(&img, "name_size 0");
        let mut img = good.clone();
        set(&mut img, 1, u32::MAX);
        expect_malformed(&img, "name_size huge");
        let mut img = good.clone();
        set(&mut img, 2, u32::MAX);
        expect_malformed(&img, "num_desc huge");
        let mut img = good.clone();
        set(&mut img, 2, 5);
        expect_malformed(&img, "num_desc one too many");
        let mut img = good.clone();
        set(&mut img, 4, u32::MAX);
        expect_malformed(&img, "desc_offset huge");
        let mut img = good.clone();
        set(&mut img, 4, 30);
        expect_malformed(&img, "desc_offset misplaced");
        let mut img = good.clone();
        set(&mut img, 4, 8);
        expect_malformed(&img, "desc_offset inside the header");
        let mut img = good.clone();
        set(&mut img, 5, 60);
        expect_malformed(&img, "data_offset inside the descriptors");
        // id outside the image: tolerated as empty.
        let mut img = good.clone();
        set(&mut img, 3, 1 << 20);
        assert_eq!(StatsLayout::parse(&img).unwrap().id(), "");

        let desc0 = HEADER_SIZE + NAME_SIZE;
        let mut img = good.clone();
        img[desc0 + DESC_FIXED_SIZE..desc0 + DESC_FIXED_SIZE + NAME_SIZE].fill(b'x');
        expect_malformed(&img, "name without NUL");
        let mut img = good.clone();
        img[desc0 + DESC_FIXED_SIZE] = 0;
        expect_malformed(&img, "empty name");
        let mut img = good.clone();
        img[desc0 + 8..desc0 + 12].copy_from_slice(&4u32.to_ne_bytes());
        expect_malformed(&img, "misaligned offset");
        let mut img = good.clone();
        img[desc0 + 8..desc0 + 12].copy_from_slice(&(!7u32).to_ne_bytes());
        expect_malformed(&img, "offset huge");
        let mut img = good.clone();
        img[desc0 + 6..desc0 + 8].copy_from_slice(&0u16.to_ne_bytes());
        expect_malformed(&img, "size 0");
        let mut img = good.clone();
        img[desc0 + 6..desc0 + 8].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(StatsLayout::parse(&img).is_ok(), "65535 values fit the data limit");
    }
}
