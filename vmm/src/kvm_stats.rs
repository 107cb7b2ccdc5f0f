//! KVM binary statistics (`KVM_GET_STATS_FD`) for the VM and its vCPUs.
//!
//! KVM exposes its per-VM and per-vCPU counters (shadow-MMU page counts, TLB-flush requests,
//! exits, page faults, ...) through a read-only "stats fd" (Linux
//! `Documentation/virt/kvm/api.rst`, section `KVM_GET_STATS_FD`). The fd's contents are laid out as
//!
//! ```text
//! offset 0            struct kvm_stats_header { flags, name_size, num_desc, id_offset,
//!                                               desc_offset, data_offset }
//! id_offset           id string ("kvm-<pid>" / "kvm-<pid>/vcpu-<n>"), name_size bytes
//! desc_offset         num_desc × { struct kvm_stats_desc (16 bytes), name[name_size] }
//! data_offset         the values: each stat is `size` u64s at data_offset + desc.offset
//! ```
//!
//! The header, id and descriptors never change for the life of the fd, so [`StatsFd`] reads them
//! once; [`StatsFd::read`] is then a single `pread` of the data block, cheap enough to bracket
//! every invalidation the VMM performs.
//!
//! Layers, so that parsing is testable without KVM:
//! - [`StatsLayout::parse`] turns the bytes of the fd (from offset 0, up to the end of the
//!   descriptors) into the descriptors, checking every kernel-supplied count and offset;
//! - [`StatsFd`] obtains the fd ([`StatsFd::for_vm`], [`StatsFd::for_vcpu`]) and reads it;
//! - [`Snapshot`] holds one reading, [`Delta`] the difference of two;
//! - [`KvmStats`] / [`KvmStatsDelta`] aggregate the VM and all vCPUs into one serializable view,
//!   and [`KvmStatsReader`] reads all of them at once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_bindings::{
    kvm_stats_desc, kvm_stats_header, KVM_STATS_BASE_MASK, KVM_STATS_BASE_POW10, KVM_STATS_BASE_POW2,
    KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES,
    KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE, KVM_STATS_UNIT_SECONDS,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

mod ioctls {
    use kvm_bindings::KVMIO;
    // KVM_GET_STATS_FD is _IO(KVMIO, 0xce); valid on a VM fd and on a vCPU fd (api.rst 4.133).
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}

/// Size of `struct kvm_stats_header` (24 bytes).
const HEADER_SIZE: usize = std::mem::size_of::<kvm_stats_header>();
/// Size of the fixed part of `struct kvm_stats_desc` (16 bytes); each descriptor is followed by
/// `name_size` bytes of name.
const DESC_FIXED_SIZE: usize = std::mem::size_of::<kvm_stats_desc>();

/// Sanity limits on kernel-supplied sizes, so a corrupt header cannot make us allocate gigabytes.
/// Today's kernels: name_size 48, fewer than 100 descriptors, data blocks of a few hundred bytes
/// (histograms add at most a few kilobytes).
const MAX_NAME_SIZE: u32 = 4096;
const MAX_NUM_DESC: u32 = 1 << 16;
const MAX_METADATA_BYTES: usize = 16 << 20;
const MAX_DATA_BYTES: usize = 16 << 20;

/// Errors from reading KVM statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl is unknown to this kernel (ENOTTY/EINVAL/ENOSYS/EOPNOTSUPP): KVM older than
    /// Linux 5.14, or a KVM flavour without binary stats.
    #[error("KVM_GET_STATS_FD is not supported by this host's KVM ({0})")]
    Unsupported(#[source] io::Error),
    /// The ioctl exists but failed (e.g. EMFILE: out of file descriptors).
    #[error("KVM_GET_STATS_FD failed: {0}")]
    GetFd(#[source] io::Error),
    /// `pread` of the stats fd failed.
    #[error("reading {len} bytes at offset {offset} of the KVM stats fd failed: {source}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// The stats fd ended before the bytes its own header promised.
    #[error("the KVM stats fd returned {got} of {want} bytes at offset {offset}")]
    ShortRead { offset: u64, want: usize, got: usize },
    /// The header or a descriptor is inconsistent (offsets/counts out of range, missing NUL, ...).
    #[error("malformed KVM stats data: {0}")]
    Malformed(String),
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, StatsError>;

fn malformed(msg: impl Into<String>) -> StatsError {
    StatsError::Malformed(msg.into())
}

/// What a stat's values mean (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatKind {
    /// Monotonic counter since the VM/vCPU was created (exits, remote_tlb_flush_requests, ...).
    Cumulative,
    /// Current level, may go up and down (pages_4k, ...).
    Instant,
    /// Highest level seen so far (max_mmu_rmap_size, ...).
    Peak,
    /// Histogram with `size` equal-width buckets of `bucket_size` each; the values are
    /// per-bucket sample counts (cumulative).
    LinearHist,
    /// Histogram with `size` buckets of power-of-two width; per-bucket sample counts (cumulative).
    LogHist,
    /// A type this module does not know (newer kernel); treated like [`StatKind::Instant`].
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_TYPE_MASK {
            KVM_STATS_TYPE_CUMULATIVE => Self::Cumulative,
            KVM_STATS_TYPE_INSTANT => Self::Instant,
            KVM_STATS_TYPE_PEAK => Self::Peak,
            KVM_STATS_TYPE_LINEAR_HIST => Self::LinearHist,
            KVM_STATS_TYPE_LOG_HIST => Self::LogHist,
            other => Self::Unknown(other),
        }
    }

    /// Whether the values are histogram buckets.
    pub fn is_histogram(self) -> bool {
        matches!(self, Self::LinearHist | Self::LogHist)
    }

    /// Whether differences of two readings are meaningful as "events in between" (counters and
    /// histogram bucket counts); otherwise the stat is a level (instant, peak, unknown).
    pub fn is_counter(self) -> bool {
        matches!(self, Self::Cumulative | Self::LinearHist | Self::LogHist)
    }
}

impl fmt::Display for StatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cumulative => f.write_str("cumulative"),
            Self::Instant => f.write_str("instant"),
            Self::Peak => f.write_str("peak"),
            Self::LinearHist => f.write_str("linear-hist"),
            Self::LogHist => f.write_str("log-hist"),
            Self::Unknown(t) => write!(f, "unknown({t})"),
        }
    }
}

/// Unit of a stat's values (`KVM_STATS_UNIT_*`), scaled by [`StatDesc::base`]^[`StatDesc::exponent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatUnit {
    /// A plain count.
    None,
    Bytes,
    Seconds,
    Cycles,
    /// 0 or 1 (for histograms: the buckets count samples of a boolean).
    Boolean,
    Unknown(u32),
}

impl StatUnit {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_UNIT_MASK {
            KVM_STATS_UNIT_NONE => Self::None,
            KVM_STATS_UNIT_BYTES => Self::Bytes,
            KVM_STATS_UNIT_SECONDS => Self::Seconds,
            KVM_STATS_UNIT_CYCLES => Self::Cycles,
            KVM_STATS_UNIT_BOOLEAN => Self::Boolean,
            other => Self::Unknown(other),
        }
    }
}

/// Base of a stat's unit exponent (`KVM_STATS_BASE_*`): value × base^exponent is in [`StatUnit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatBase {
    Pow10,
    Pow2,
    Unknown(u32),
}

impl StatBase {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_BASE_MASK {
            KVM_STATS_BASE_POW10 => Self::Pow10,
            KVM_STATS_BASE_POW2 => Self::Pow2,
            other => Self::Unknown(other),
        }
    }
}

/// One statistic as described by the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatDesc {
    /// Name, unique within one stats fd (e.g. `"pages_4k"`, `"exits"`).
    pub name: String,
    pub kind: StatKind,
    pub unit: StatUnit,
    pub base: StatBase,
    /// Value × base^exponent is in `unit` (e.g. -9 with Pow10 and Seconds: nanoseconds).
    pub exponent: i16,
    /// Number of u64 values (1 for scalars, the bucket count for histograms).
    pub size: usize,
    /// Byte offset of the first value within the data block.
    pub offset: usize,
    /// Bucket width of a [`StatKind::LinearHist`]; 0 otherwise.
    pub bucket_size: u32,
    /// Raw `flags` of `struct kvm_stats_desc` (type | unit | base).
    pub flags: u32,
}

/// Everything about a stats fd that does not change: its id and descriptors, and where each
/// stat's values are. Shared (via `Arc`) by every [`Snapshot`] of that fd.
#[derive(Debug)]
pub struct StatsLayout {
    id: String,
    descs: Vec<StatDesc>,
    /// Index of each stat's first value in [`Snapshot`]'s word vector (`desc.offset / 8`).
    by_name: HashMap<String, usize>,
    data_offset: u64,
    /// Bytes of the data block that cover every descriptor (a multiple of 8).
    data_len: usize,
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
fn parse_header(buf: &[u8]) -> Result<kvm_stats_header> {
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
/// nothing inside the header, data after the descriptors) and returns the byte ranges of (id, descriptor block), both within
/// `u32` offsets and the sanity limits.
fn header_ranges(h: &kvm_stats_header) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
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
    /// data-block limit). An id that lies
    /// outside `image` is reported as empty. Duplicate names: the first descriptor wins for
    /// name lookups. Never panics.
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

    /// Builds a snapshot from the data block's bytes (`data` from `data_offset`, at least
    /// `data_len` bytes; extra bytes are ignored).
    fn snapshot_from_bytes(self: &Arc<Self>, data: &[u8]) -> Result<Snapshot> {
        let data = data.get(..self.data_len).ok_or(StatsError::ShortRead {
            offset: self.data_offset,
            want: self.data_len,
            got: data.len(),
        })?;
        let words =
            data.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        Ok(Snapshot { layout: Arc::clone(self), words })
    }
}

/// An open KVM stats fd (of a VM or a vCPU) with its parsed descriptors.
///
/// `Send + Sync`: [`StatsFd::read`] takes `&self` and uses `pread`, so any thread may read a
/// vCPU's stats while that vCPU runs. The fd stays valid (and its stats keep counting) after the
/// `VmFd`/`VcpuFd` it came from is dropped; KVM holds a reference.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    layout: Arc<StatsLayout>,
}

impl StatsFd {
    /// Opens the stats of a VM (`KVM_GET_STATS_FD` on the VM fd) and reads its header and
    /// descriptors once.
    ///
    /// Errors: [`StatsError::Unsupported`] if this KVM lacks binary stats,
    /// [`StatsError::Malformed`] if what it returned does not parse.
    pub fn for_vm(vm: &VmFd) -> Result<Self> {
        Self::from_kvm_fd(vm)
    }

    /// Opens the stats of a vCPU (`KVM_GET_STATS_FD` on the vCPU fd); as [`StatsFd::for_vm`].
    pub fn for_vcpu(vcpu: &VcpuFd) -> Result<Self> {
        Self::from_kvm_fd(vcpu)
    }

    fn from_kvm_fd(fd: &impl AsRawFd) -> Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and writes no user memory; `fd` is a valid,
        // open KVM VM or vCPU fd borrowed for the duration of the call. On an fd that does not
        // know the ioctl, the kernel returns an error, which is handled below.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, ioctls::KVM_GET_STATS_FD()) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOTTY | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    StatsError::Unsupported(err)
                }
                _ => StatsError::GetFd(err),
            });
        }
        // SAFETY: on success KVM_GET_STATS_FD returns a new file descriptor (O_RDONLY|O_CLOEXEC)
        // that nothing else owns; `File` takes sole ownership and closes it on drop.
        let file = unsafe { File::from_raw_fd(ret) };
        Self::from_file(file)
    }

    /// Reads and parses the metadata of an already-open stats fd (anything `pread`-able laid out
    /// as in the module docs).
    pub fn from_file(file: File) -> Result<Self> {
        let mut header = [0u8; HEADER_SIZE];
        pread_exact(&file, &mut header, 0)?;
        let h = parse_header(&header)?;
        let (id, desc) = header_ranges(&h)?;
        let mut image = vec![0u8; desc.end.max(id.end).max(HEADER_SIZE)];
        pread_exact(&file, &mut image, 0)?;
        let layout = StatsLayout::parse(&image)?;
        Ok(Self { file, layout: Arc::new(layout) })
    }

    /// The fd's id string (`"kvm-<pid>"`, `"kvm-<pid>/vcpu-<n>"`).
    pub fn id(&self) -> &str {
        self.layout.id()
    }

    /// All descriptors, in the kernel's order (read once at open).
    pub fn descriptors(&self) -> &[StatDesc] {
        self.layout.descriptors()
    }

    /// The parsed metadata shared by this fd's snapshots.
    pub fn layout(&self) -> &Arc<StatsLayout> {
        &self.layout
    }

    /// Reads the current values: one `pread` of the data block (a few hundred bytes) and one
    /// allocation. The values of one read are not an atomic snapshot across stats: KVM updates
    /// counters concurrently (a running vCPU keeps counting during the read).
    pub fn read(&self) -> Result<Snapshot> {
        let mut data = vec![0u8; self.layout.data_len];
        pread_exact(&self.file, &mut data, self.layout.data_offset)?;
        self.layout.snapshot_from_bytes(&data)
    }
}

/// `pread` of exactly `buf.len()` bytes at `offset` (retrying on EINTR and short reads; the
/// kernel's stats read fills the whole request in one call).
fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(StatsError::ShortRead { offset, want: buf.len(), got: done }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(StatsError::Read { offset, len: buf.len(), source }),
        }
    }
    Ok(())
}

/// One reading of a stats fd.
///
/// Serializes as a map from name to value: scalars as numbers, histograms as arrays of bucket
/// counts.
#[derive(Debug, Clone)]
pub struct Snapshot {
    layout: Arc<StatsLayout>,
    /// The data block as u64 words; a stat's values start at word `desc.offset / 8`.
    words: Vec<u64>,
}

impl Snapshot {
    /// The layout (descriptors) this snapshot was read with.
    pub fn layout(&self) -> &Arc<StatsLayout> {
        &self.layout
    }

    fn values_of(&self, d: &StatDesc) -> &[u64] {
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

    fn scalar(&self, d: &StatDesc) -> u64 {
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
    /// [`StatsFd`]; otherwise stats are matched by name and ones missing from `earlier` count
    /// from 0.
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

impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.layout.descs.len()))?;
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

/// How one stat moved between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeltaEntry {
    pub name: String,
    pub kind: StatKind,
    /// Later minus earlier value (for histograms: of the bucket sums, i.e. samples recorded in
    /// between). Signed: instant stats such as pages_4k fall when KVM zaps mappings.
    pub change: i128,
    /// For instant/peak (level) stats: the later value, which is what such a stat reports; `None`
    /// for cumulative counters and histograms, where only the change is meaningful.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<u64>,
    /// For histograms: the change of every bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
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
/// Serializes as a map from name to entry, containing only the stats that moved.
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

impl Serialize for Delta {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for e in self.moved() {
            map.serialize_entry(&e.name, e)?;
        }
        map.end()
    }
}

/// The VM's stats and the vCPUs' stats summed, as one serializable view.
///
/// Values are [`Snapshot::value`]s (histograms: sample counts). vCPU stats are combined per name:
/// cumulative, instant and histogram stats are summed over vCPUs, peak stats take the maximum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmStats {
    /// VM-wide stats by name.
    pub vm: BTreeMap<String, u64>,
    /// vCPU stats by name, combined over all vCPUs.
    pub vcpus: BTreeMap<String, u64>,
    /// Number of vCPU snapshots combined.
    pub nr_vcpus: usize,
    #[serde(skip)]
    kinds_vm: BTreeMap<String, StatKind>,
    #[serde(skip)]
    kinds_vcpu: BTreeMap<String, StatKind>,
}

impl KvmStats {
    /// Combines a VM snapshot and any number of vCPU snapshots.
    pub fn aggregate<'a>(vm: &Snapshot, vcpus: impl IntoIterator<Item = &'a Snapshot>) -> Self {
        let mut out = KvmStats {
            vm: vm.to_map(),
            vcpus: BTreeMap::new(),
            nr_vcpus: 0,
            kinds_vm: vm.layout.descs.iter().map(|d| (d.name.clone(), d.kind)).collect(),
            kinds_vcpu: BTreeMap::new(),
        };
        for snap in vcpus {
            out.nr_vcpus += 1;
            for d in &snap.layout.descs {
                let v = snap.scalar(d);
                out.kinds_vcpu.entry(d.name.clone()).or_insert(d.kind);
                let slot = out.vcpus.entry(d.name.clone()).or_insert(0);
                *slot = if d.kind == StatKind::Peak { (*slot).max(v) } else { slot.saturating_add(v) };
            }
        }
        out
    }

    /// Changes from `earlier` to `self`, only the stats that moved; semantics as [`Delta`]
    /// (counters: the change; instant/peak: the change and the later value).
    pub fn delta(&self, earlier: &KvmStats) -> KvmStatsDelta {
        fn diff(
            now: &BTreeMap<String, u64>,
            before: &BTreeMap<String, u64>,
            kinds: &BTreeMap<String, StatKind>,
        ) -> BTreeMap<String, DeltaEntry> {
            now.iter()
                .filter_map(|(name, &v)| {
                    let kind = kinds.get(name).copied().unwrap_or(StatKind::Unknown(u32::MAX));
                    let change = i128::from(v) - i128::from(before.get(name).copied().unwrap_or(0));
                    (change != 0).then(|| {
                        let entry = DeltaEntry {
                            name: name.clone(),
                            kind,
                            change,
                            now: (!kind.is_counter()).then_some(v),
                            buckets: None,
                        };
                        (name.clone(), entry)
                    })
                })
                .collect()
        }
        KvmStatsDelta {
            vm: diff(&self.vm, &earlier.vm, &self.kinds_vm),
            vcpus: diff(&self.vcpus, &earlier.vcpus, &self.kinds_vcpu),
        }
    }
}

/// What moved between two [`KvmStats`]: per name, the [`DeltaEntry`] (change, and the later value
/// of instant/peak stats). Stats that did not move are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmStatsDelta {
    pub vm: BTreeMap<String, DeltaEntry>,
    pub vcpus: BTreeMap<String, DeltaEntry>,
}

impl KvmStatsDelta {
    /// Whether nothing moved.
    pub fn is_empty(&self) -> bool {
        self.vm.is_empty() && self.vcpus.is_empty()
    }
}

/// The stats fds of a VM and its vCPUs, read together into a [`KvmStats`].
#[derive(Debug)]
pub struct KvmStatsReader {
    pub vm: StatsFd,
    pub vcpus: Vec<StatsFd>,
}

impl KvmStatsReader {
    /// Opens the stats of `vm` and of each vCPU in `vcpus`.
    pub fn new<'a>(vm: &VmFd, vcpus: impl IntoIterator<Item = &'a VcpuFd>) -> Result<Self> {
        Ok(Self {
            vm: StatsFd::for_vm(vm)?,
            vcpus: vcpus.into_iter().map(StatsFd::for_vcpu).collect::<Result<_>>()?,
        })
    }

    /// Reads every fd (1 + nr_vcpus preads) and aggregates.
    pub fn read(&self) -> Result<KvmStats> {
        let vm = self.vm.read()?;
        let vcpus = self.vcpus.iter().map(StatsFd::read).collect::<Result<Vec<_>>>()?;
        Ok(KvmStats::aggregate(&vm, &vcpus))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- synthetic images -------------------------------------------------------------------

    const NAME_SIZE: usize = 16;

    struct Stat<'a> {
        name: &'a str,
        flags: u32,
        size: u16,
        offset: u32,
    }

    /// A stats-fd image: header, id at 24, descriptors after it, then the data block.
    fn image(stats: &[Stat], data: &[u64]) -> Vec<u8> {
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + NAME_SIZE;
        let data_offset = desc_offset + stats.len() * (DESC_FIXED_SIZE + NAME_SIZE);
        let mut b = Vec::new();
        for v in [
            0u32,
            NAME_SIZE as u32,
            stats.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
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

    fn sample_stats() -> Vec<Stat<'static>> {
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

    fn snapshot(layout: &Arc<StatsLayout>, data: &[u64]) -> Snapshot {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        layout.snapshot_from_bytes(&bytes).unwrap()
    }

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
        img[desc0 + 8..desc0 + 12].copy_from_slice(&(u32::MAX & !7).to_ne_bytes());
        expect_malformed(&img, "offset huge");
        let mut img = good.clone();
        img[desc0 + 6..desc0 + 8].copy_from_slice(&0u16.to_ne_bytes());
        expect_malformed(&img, "size 0");
        let mut img = good.clone();
        img[desc0 + 6..desc0 + 8].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(StatsLayout::parse(&img).is_ok(), "65535 values fit the data limit");
    }

    #[test]
    fn snapshot_values_and_delta_semantics() {
        let layout = Arc::new(StatsLayout::parse(&image(&sample_stats(), &[])).unwrap());
        let a = snapshot(&layout, &[10, 100, 7, 1, 2, 3]);
        let b = snapshot(&layout, &[15, 90, 9, 1, 4, 3]);
        assert_eq!(b.value("exits"), Some(15));
        assert_eq!(b.value("hist"), Some(8), "histogram value = sum of buckets");
        assert_eq!(b.values("hist"), Some(&[1, 4, 3][..]));
        assert_eq!(b.value("nope"), None);
        // Too little data is a short read, not a panic.
        assert!(matches!(
            layout.snapshot_from_bytes(&[0; 40]),
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

        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["pages_4k"]["change"], -10);
        assert_eq!(json["pages_4k"]["now"], 90);
        assert_eq!(json["hist"]["buckets"][1], 2);
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["exits"], 15);
        assert_eq!(json["hist"], serde_json::json!([1, 4, 3]));

        // Aggregation: sums, except peaks (max).
        let s1 = KvmStats::aggregate(&a, [&a, &b]);
        assert_eq!(s1.vcpus["exits"], 25);
        assert_eq!(s1.vcpus["max_rmap"], 9);
        assert_eq!(s1.vcpus["hist"], 14);
        let s2 = KvmStats::aggregate(&b, [&b, &b]);
        let d = s2.delta(&s1);
        assert_eq!(d.vm["exits"].change, 5);
        assert_eq!(d.vcpus["exits"].change, 5);
        assert_eq!(d.vcpus["pages_4k"].now, Some(180));
        assert!(!d.vcpus.contains_key("max_rmap"));
        serde_json::to_string(&d).unwrap();
    }

    // ---- real KVM -----------------------------------------------------------------------------

    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn kvm_stats_names_present() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let vm_stats = StatsFd::for_vm(&vm).unwrap();
        let vcpu_stats = StatsFd::for_vcpu(&vcpu).unwrap();
        for (what, fd) in [("VM", &vm_stats), ("vCPU", &vcpu_stats)] {
            println!("{what} stats ({}), id {:?}:", fd.descriptors().len(), fd.id());
            for d in fd.descriptors() {
                println!(
                    "  {:<32} {:<11} unit {:?} base {:?} exp {} size {}",
                    d.name,
                    d.kind.to_string(),
                    d.unit,
                    d.base,
                    d.exponent,
                    d.size
                );
            }
        }
        let vm_snap = vm_stats.read().unwrap();
        let vcpu_snap = vcpu_stats.read().unwrap();
        for name in ["pages_4k", "pages_2m", "remote_tlb_flush", "remote_tlb_flush_requests"] {
            assert!(vm_snap.value(name).is_some(), "VM stat {name} missing");
        }
        for name in ["exits", "io_exits", "mmio_exits", "pf_fixed", "pf_taken", "tlb_flush"] {
            assert!(vcpu_snap.value(name).is_some(), "vCPU stat {name} missing");
        }
        assert_eq!(vcpu_stats.descriptors()[0].name, vcpu_snap.iter().next().unwrap().0.name);
        assert!(vcpu_stats.id().contains("vcpu"), "id {:?}", vcpu_stats.id());
        // KvmStatsReader gives the same names.
        let reader = KvmStatsReader::new(&vm, [&vcpu]).unwrap();
        let all = reader.read().unwrap();
        assert_eq!(all.nr_vcpus, 1);
        assert!(all.vm.contains_key("pages_4k") && all.vcpus.contains_key("exits"));
    }

    #[test]
    fn kvm_stats_delta_moves_with_real_mode_outs() {
        const OUTS: usize = 5;
        // Declared before the VM, so dropped after it: the memslot never outlives its backing.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 0x10000,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `host` is the start of the 0x10000-byte mapping owned by `mem`, which is
        // declared before `vm` and therefore dropped after it, so the slot's backing stays mapped
        // for the VM's whole life.
        unsafe { vm.set_user_memory_region(region).unwrap() };

        // mov dx, 0x3f8; mov al, 'a'; out dx, al (×OUTS); hlt
        let mut code = vec![0xba, 0xf8, 0x03, 0xb0, b'a'];
        code.extend(std::iter::repeat(0xee).take(OUTS));
        code.push(0xf4);
        use vm_memory::Bytes;
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();

        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();

        let reader = KvmStatsReader::new(&vm, [&vcpu]).unwrap();
        let vm_before = reader.vm.read().unwrap();
        let vcpu_before = reader.vcpus[0].read().unwrap();
        let all_before = reader.read().unwrap();

        let mut outs = 0;
        let mut halted = false;
        for _ in 0..100 {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x3f8, [b'a']) => outs += 1,
                VcpuExit::Hlt => {
                    halted = true;
                    break;
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert!(halted, "guest did not reach hlt");
        assert_eq!(outs, OUTS);

        let vm_delta = reader.vm.read().unwrap().delta(&vm_before);
        let vcpu_delta = reader.vcpus[0].read().unwrap().delta(&vcpu_before);
        let all_delta = reader.read().unwrap().delta(&all_before);
        println!("VM delta:   {vm_delta}");
        println!("vCPU delta: {vcpu_delta}");
        println!("aggregated: {}", serde_json::to_string(&all_delta).unwrap());
        // Every `out` is a KVM_RUN return, counted in "exits". Where the `out` is counted besides
        // depends on who executed it: VMX/SVM intercept it (io_exits); PVM runs real-mode code in
        // KVM's instruction emulator (insn_emulation), whose port I/O does not count io_exits.
        let also = if crate::pvm::is_pvm() { "insn_emulation" } else { "io_exits" };
        for name in ["exits", also] {
            let change = vcpu_delta.change(name).unwrap();
            assert!(change >= OUTS as i128, "{name} moved by {change}, want >= {OUTS}");
            assert!(all_delta.vcpus[name].change >= OUTS as i128);
        }
    }
}
