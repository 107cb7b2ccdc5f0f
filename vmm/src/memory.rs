//! Guest RAM: its layout in guest-physical space, its host backing, and its KVM memslots.
//!
//! RAM starts at guest-physical 0. Whatever does not fit below [`MMIO_GAP_START`] (3 GiB) goes
//! above the 32-bit MMIO hole, at 4 GiB, so device windows (virtio-mmio, the LAPIC and IOAPIC)
//! never overlap RAM.
//!
//! Two backings are offered:
//! - [`MemoryBackend::Anonymous`]: private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`), the
//!   default. Discarding it (`MADV_DONTNEED`) frees the pages and the next touch reads zeros.
//! - [`MemoryBackend::Memfd`]: one `memfd` mapped `MAP_SHARED`. Discarding it needs
//!   `fallocate(PUNCH_HOLE)` or `MADV_REMOVE`; `MADV_DONTNEED` only drops the mapping and the
//!   page cache keeps the data (docs/host.md).
//!
//! - [`MemoryBackend::Hugetlb`]: a memfd of 2 MiB hugetlb pages (`MFD_HUGETLB`), mapped shared.
//!   The pages are reserved when guest RAM is mapped, so a host without enough free huge pages
//!   (`/proc/sys/vm/nr_hugepages`) is told at once; discards must cover whole huge pages.
//!
//! With `thp`, every region is `madvise(MADV_HUGEPAGE)`d so that the host backs it with 2 MiB
//! transparent huge pages where it can (this host's THP mode is `madvise`).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// The guest memory type of the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole (3 GiB); no RAM between here and [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB), where RAM continues.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Host and guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a transparent huge page / 2 MiB guest mapping.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Smallest guest RAM zapvm accepts.
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBackend {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A memfd mapped shared.
    Memfd,
    /// A memfd of 2 MiB hugetlb pages mapped shared.
    Hugetlb,
}

/// What guest RAM to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of RAM; a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// Host backing.
    pub backend: MemoryBackend,
    /// Ask for transparent huge pages.
    pub thp: bool,
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size is not a page multiple.
    #[error("memory size {0:#x} is not a multiple of the 4 KiB page size")]
    NotPageAligned(u64),
    /// Size too small.
    #[error("memory size {size} bytes is below the minimum of {min} bytes")]
    TooSmall {
        /// Requested.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// Size too large for the host address space or the layout.
    #[error("memory size {0:#x} is too large")]
    TooLarge(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create the memfd backing guest RAM: {0}")]
    Memfd(#[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Mmap {
        /// Bytes asked for.
        size: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Region overlap (cannot happen with the fixed layout, but vm-memory checks).
    #[error("cannot assemble guest memory: {0}")]
    Assemble(#[source] vm_memory::GuestRegionCollectionError),
    /// The hot-pluggable region must be whole 2 MiB blocks.
    #[error("hot-pluggable memory size {0:#x} is not a multiple of 2 MiB")]
    HotplugNotAligned(u64),
    /// Hugetlb needs whole huge pages.
    #[error("memory size {0:#x} is not a multiple of the 2 MiB huge page size (hugetlb backing)")]
    NotHugePageAligned(u64),
    /// Not enough free huge pages.
    #[error("cannot reserve {needed} huge pages of 2 MiB for guest RAM ({free} free): reserve them with `echo N > /proc/sys/vm/nr_hugepages` as root")]
    NoHugePages {
        /// Huge pages needed.
        needed: u64,
        /// Free huge pages on the host.
        free: u64,
    },
    /// madvise(MADV_HUGEPAGE) failed.
    #[error("madvise(MADV_HUGEPAGE) on guest RAM failed: {0}")]
    Thp(#[source] std::io::Error),
}

/// The guest-physical ranges `size` bytes of RAM occupy: below the MMIO hole first, the rest
/// above 4 GiB.
pub fn ram_layout(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Parses a size such as `256M`, `1G`, `4096K`, `2T` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} in {text:?} (use K, M, G or T)")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let value: u64 =
        digits.parse().map_err(|_| format!("{text:?} is not a size (examples: 256M, 1G, 4096K, 1048576)"))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| format!("size {text:?} overflows 64 bits"))
}

/// Guest RAM with the facts the rest of the VMM needs about its backing.
#[derive(Debug)]
pub struct GuestRam {
    memory: Arc<GuestMemoryMmap>,
    config: MemoryConfig,
    /// The memfd, for the memfd backend (fallocate needs it).
    memfd: Option<Arc<File>>,
    /// A hot-pluggable region above all RAM (guest-physical start, size), for virtio-mem.
    hotplug: Option<(u64, u64)>,
}

/// Where a hot-pluggable region of `size` bytes goes for `ram_size` bytes of RAM: above all RAM
/// and the 32-bit hole, 1 GiB aligned (Linux adds memory in 128 MiB blocks).
pub fn hotplug_base(ram_size: u64) -> u64 {
    let top = ram_layout(ram_size).last().map(|&(gpa, size)| gpa.0 + size).unwrap_or(0);
    top.max(MMIO_GAP_END).next_multiple_of(1 << 30)
}

impl GuestRam {
    /// Creates guest RAM as `config` says.
    pub fn new(config: MemoryConfig) -> Result<Self, MemoryError> {
        Self::with_hotplug(config, 0)
    }

    /// Creates guest RAM as `config` says plus, when `hotplug_size` is not zero, a region of that
    /// size at [`hotplug_base`] for a virtio-mem device: backed like the rest, registered with
    /// KVM and the memory layer, but not RAM the guest is told of at boot (not in the e820 map,
    /// not in the test guest's work ranges, not in the balloon's PFN space).
    pub fn with_hotplug(config: MemoryConfig, hotplug_size: u64) -> Result<Self, MemoryError> {
        if hotplug_size % HUGE_PAGE_SIZE != 0 {
            return Err(MemoryError::HotplugNotAligned(hotplug_size));
        }
        if config.size % PAGE_SIZE != 0 {
            return Err(MemoryError::NotPageAligned(config.size));
        }
        if config.backend == MemoryBackend::Hugetlb && config.size % HUGE_PAGE_SIZE != 0 {
            return Err(MemoryError::NotHugePageAligned(config.size));
        }
        if config.size < MIN_MEM_SIZE {
            return Err(MemoryError::TooSmall { size: config.size, min: MIN_MEM_SIZE });
        }
        // One PDPT of identity tables covers 512 GiB; the layout adds the 1 GiB hole.
        if config.size > (512 << 30) - (MMIO_GAP_END - MMIO_GAP_START) {
            return Err(MemoryError::TooLarge(config.size));
        }
        let mut layout = ram_layout(config.size);
        let hotplug = (hotplug_size > 0).then(|| (hotplug_base(config.size), hotplug_size));
        if let Some((gpa, size)) = hotplug {
            if gpa + size > 512 << 30 {
                return Err(MemoryError::TooLarge(config.size + size));
            }
            layout.push((GuestAddress(gpa), size));
        }
        let total = config.size + hotplug_size;
        let memfd = match config.backend {
            MemoryBackend::Anonymous => None,
            MemoryBackend::Memfd => Some(Arc::new(create_memfd(total, false)?)),
            MemoryBackend::Hugetlb => Some(Arc::new(create_memfd(total, true)?)),
        };
        let hugetlb = config.backend == MemoryBackend::Hugetlb;
        let mut regions = Vec::with_capacity(layout.len());
        let mut file_offset = 0u64;
        for &(base, size) in &layout {
            let builder =
                MmapRegionBuilder::new(size as usize).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            let builder = match &memfd {
                None => {
                    builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                }
                // Hugetlb pages are reserved at mmap (no MAP_NORESERVE): too few free huge
                // pages is an error now rather than a SIGBUS at the guest's first touch.
                Some(file) => builder
                    .with_mmap_flags(libc::MAP_SHARED | if hugetlb { 0 } else { libc::MAP_NORESERVE })
                    .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
                    .with_hugetlbfs(hugetlb),
            };
            let region: MmapRegion<()> = builder.build().map_err(|source| {
                let enomem = matches!(&source, vm_memory::mmap::MmapRegionError::Mmap(e) if e.raw_os_error() == Some(libc::ENOMEM));
                if hugetlb && enomem {
                    MemoryError::NoHugePages { needed: total / HUGE_PAGE_SIZE, free: free_huge_pages() }
                } else {
                    MemoryError::Mmap { size, source }
                }
            })?;
            if config.thp {
                // SAFETY: the range is exactly the mapping vm-memory just created and owns;
                // MADV_HUGEPAGE changes no contents and no mapping, only the fault policy.
                let ret =
                    unsafe { libc::madvise(region.as_ptr().cast(), size as usize, libc::MADV_HUGEPAGE) };
                if ret != 0 {
                    return Err(MemoryError::Thp(std::io::Error::last_os_error()));
                }
            }
            regions.push(GuestRegionMmap::new(region, base).expect("layout ranges never overflow u64"));
            file_offset += size;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Assemble)?;
        Ok(Self { memory: Arc::new(memory), config, memfd, hotplug })
    }

    /// The hot-pluggable region (guest-physical start, size), if any.
    pub fn hotplug(&self) -> Option<(u64, u64)> {
        self.hotplug
    }

    /// The regions of RAM the guest is told of at boot: [`Self::regions`] without the
    /// hot-pluggable one.
    pub fn ram_regions(&self) -> impl Iterator<Item = (GuestAddress, u64, u64)> + '_ {
        let hotplug = self.hotplug.map(|(gpa, _)| gpa);
        self.regions().filter(move |(gpa, _, _)| Some(gpa.0) != hotplug)
    }

    /// The guest memory, for loaders and devices.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// What this RAM was created from.
    pub fn config(&self) -> MemoryConfig {
        self.config
    }

    /// The memfd behind the memfd backend.
    pub fn memfd(&self) -> Option<&Arc<File>> {
        self.memfd.as_ref()
    }

    /// Each region as (guest-physical start, host address, size), the hot-pluggable one included.
    pub fn regions(&self) -> impl Iterator<Item = (GuestAddress, u64, u64)> + '_ {
        self.memory.iter().map(|r| (r.start_addr(), r.as_ptr() as u64, r.len()))
    }

    /// Whether guest RAM comes in 2 MiB pages on the host (THP asked for, or hugetlb), so that
    /// the VMM's table maps it with 2 MiB entries.
    pub fn huge_pages(&self) -> bool {
        self.config.thp || self.config.backend == MemoryBackend::Hugetlb
    }

    /// Whether every region's host mapping is 2 MiB aligned (what THP needs to map whole
    /// huge pages at the guest's 2 MiB boundaries).
    pub fn huge_page_aligned(&self) -> bool {
        self.regions().all(|(gpa, hva, _)| hva % HUGE_PAGE_SIZE == gpa.0 % HUGE_PAGE_SIZE)
    }

    /// The regions as the notifier describes them (host range, backing, THP).
    pub fn notifier_regions(&self) -> Vec<notifier::RegionSpec> {
        use std::os::fd::AsRawFd;
        let mut file_offset = 0u64;
        self.regions()
            .map(|(_, hva, size)| {
                let backing = match (&self.memfd, self.config.backend) {
                    (Some(f), MemoryBackend::Hugetlb) => notifier::Backing::Hugetlb {
                        page_size: HUGE_PAGE_SIZE as usize,
                        file: Some((f.as_raw_fd(), file_offset)),
                    },
                    (Some(f), _) => notifier::Backing::SharedMemfd { fd: f.as_raw_fd(), offset: file_offset },
                    (None, _) => notifier::Backing::PrivateAnon,
                };
                file_offset += size;
                notifier::RegionSpec {
                    host_addr: hva as usize,
                    len: size as usize,
                    backing,
                    thp: self.config.thp,
                }
            })
            .collect()
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.config.size
    }

    /// Whether `[gpa, gpa + len)` lies entirely inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions().any(|(start, _, size)| gpa >= start.0 && end <= start.0 + size)
    }
}

/// Free 2 MiB huge pages on the host (`HugePages_Free` of /proc/meminfo).
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn create_memfd(size: u64, hugetlb: bool) -> Result<File, MemoryError> {
    let flags = libc::MFD_CLOEXEC | if hugetlb { libc::MFD_HUGETLB | libc::MFD_HUGE_2MB } else { 0 };
    // SAFETY: the name is a valid NUL-terminated string; the call has no memory effects.
    let fd = unsafe { libc::memfd_create(c"zapvm-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_puts_memory_above_the_hole() {
        assert_eq!(ram_layout(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_layout(5 << 30), vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]);
        assert_eq!(ram_layout(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
    }

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        let cfg = |size| MemoryConfig { size, backend: MemoryBackend::Anonymous, thp: false };
        assert!(matches!(GuestRam::new(cfg((64 << 20) + 1)), Err(MemoryError::NotPageAligned(_))));
        assert!(matches!(GuestRam::new(cfg(4096)), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(GuestRam::new(cfg(1 << 40)), Err(MemoryError::TooLarge(_))));
    }

    #[test]
    fn memfd_backing_is_shared_with_the_file() {
        use std::os::unix::fs::FileExt;
        let ram =
            GuestRam::new(MemoryConfig { size: 8 << 20, backend: MemoryBackend::Memfd, thp: false }).unwrap();
        ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().unwrap().read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn high_memory_is_addressable_above_4g() {
        // 3 GiB + 8 MiB of MAP_NORESERVE memory: only touched pages cost anything.
        let ram = GuestRam::new(MemoryConfig {
            size: (3 << 30) + (8 << 20),
            backend: MemoryBackend::Anonymous,
            thp: true,
        })
        .unwrap();
        assert!(ram.contains(MMIO_GAP_END, 8 << 20));
        assert!(!ram.contains(MMIO_GAP_START, 4096));
        ram.memory().write_obj(7u64, GuestAddress(MMIO_GAP_END + 4096)).unwrap();
        assert_eq!(ram.memory().read_obj::<u64>(GuestAddress(MMIO_GAP_END + 4096)).unwrap(), 7);
        assert!(ram.huge_page_aligned(), "6.x kernels align large anonymous mappings to 2 MiB");
    }

    #[test]
    fn hotplug_region_sits_above_ram_and_out_of_the_boot_view() {
        let cfg = MemoryConfig { size: 64 << 20, backend: MemoryBackend::Memfd, thp: false };
        let ram = GuestRam::with_hotplug(cfg, 128 << 20).unwrap();
        assert_eq!(ram.hotplug(), Some((4 << 30, 128 << 20)));
        assert_eq!(ram.regions().count(), 2);
        assert_eq!(ram.ram_regions().map(|r| r.2).sum::<u64>(), 64 << 20);
        assert_eq!(ram.notifier_regions().len(), 2, "the memory layer covers it");
        ram.memory().write_obj(9u64, GuestAddress((4 << 30) + 4096)).unwrap();
        assert_eq!(hotplug_base((5 << 30) + 1), 7 << 30, "above RAM that reaches past 4 GiB, 1 GiB aligned");
        assert!(matches!(GuestRam::with_hotplug(cfg, 4096), Err(MemoryError::HotplugNotAligned(_))));
    }
}
