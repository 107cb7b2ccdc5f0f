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
//!   page cache keeps the data (see `docs/host.md`).
//!
//! - [`MemoryBackend::Hugetlb`]: a memfd of 2 MiB hugetlb pages (`MFD_HUGETLB`), mapped shared.
//!   The pages are reserved when guest RAM is mapped, so a host without enough free huge pages
//!   (`/proc/sys/vm/nr_hugepages`) is told at once; discards must cover whole huge pages.
//!
//! With `thp`, every region is `madvise(MADV_HUGEPAGE)`d so that the host backs it with 2 MiB
//! transparent huge pages where it can (this host's THP mode is `madvise`).
//!
//! # Sealed guest RAM
//!
//! [`GuestRam::sealed_with_hotplug`] seals every region with `mseal(2)` right after mapping it.
//! The kernel then refuses (`EPERM`) every `munmap`, `mremap`, `mprotect` and `mmap(MAP_FIXED)`
//! over guest RAM, by any code of the process, for the rest of its life: nothing can tear guest
//! RAM down behind the VMM's back, and no other mapping can ever land in its address range.
//! Every discard keeps working (measured, see `docs/host.md`): `MADV_DONTNEED` on the private
//! anonymous backing, `fallocate(PUNCH_HOLE)` and `MADV_REMOVE` on the memfd and hugetlb
//! backings, and `MADV_(NO)HUGEPAGE` and userfaultfd registration too.
//!
//! A sealed mapping can never be unmapped, not even by the VMM. So dropping sealed [`GuestRam`]
//! *discards* its contents instead (`MADV_DONTNEED`; `PUNCH_HOLE` over the whole memfd, which also
//! gives hugetlb pages and their reservations back to the host): the memory goes back to the host,
//! while the address range stays reserved in the process (mapped, reading zeros) until it exits.
//! A process that runs many VMs (the test binaries) therefore keeps no guest RAM resident, only
//! address space and the page tables of the discarded ranges.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// The guest memory type of the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The 32-bit MMIO hole, `[3 GiB, 4 GiB)`: no RAM there (the guest-physical map is
/// [`crate::arch::layout`]).
pub use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
/// Host and guest page size, and the size of a transparent huge page / 2 MiB guest mapping
/// (defined once, in the guest ABI).
pub use guest_abi::{HUGE_PAGE_SIZE, PAGE_SIZE};
// The notifier works in the host's page sizes (it knows nothing of guests); the VMM maps guest
// pages one to one onto host pages, so the two must be the same.
const _: () =
    assert!(notifier::PAGE_SIZE as u64 == PAGE_SIZE && notifier::HUGE_PAGE_SIZE as u64 == HUGE_PAGE_SIZE);
/// Smallest guest RAM zapvm accepts.
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
    /// madvise(MADV_POPULATE_WRITE) failed: the host cannot give guest RAM its pages now.
    #[error("cannot preallocate guest RAM (madvise(MADV_POPULATE_WRITE), Linux 5.14 or later): {0}")]
    Prealloc(#[source] std::io::Error),
    /// mseal(2) failed (it needs Linux 6.10 or later on x86_64).
    #[error("cannot seal guest RAM with mseal(2) (Linux 6.10 or later): {0}")]
    Seal(#[source] std::io::Error),
}

/// The `mseal(2)` system call on x86_64; libc has no wrapper for it.
const SYS_MSEAL: libc::c_long = 462;

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
    /// The sealed host mappings, discarded on drop; `None` when guest RAM is not sealed.
    sealed: Option<SealedMappings>,
}

/// Host mappings of guest RAM sealed with `mseal(2)`. They can never be unmapped, so dropping
/// this discards their contents instead: the memory goes back to the host and the address range
/// stays reserved (see the module docs).
#[derive(Debug, Default)]
struct SealedMappings {
    /// (host address, length) of each sealed mapping.
    ranges: Vec<(usize, usize)>,
    /// The memfd behind them (memfd and hugetlb backings), and its length.
    memfd: Option<(Arc<File>, u64)>,
}

impl Drop for SealedMappings {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Some((file, len)) = &self.memfd {
            // SAFETY: fallocate on guest RAM's own memfd; it zaps the sealed mappings' pages (they
            // stay mapped, so any pointer into them stays valid) and frees the file's pages (and
            // hugetlb reservations).
            let ret = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    *len as libc::off_t,
                )
            };
            if ret != 0 {
                tracing::warn!(
                    "discarding sealed guest RAM (PUNCH_HOLE): {}; its memory stays in use until exit",
                    std::io::Error::last_os_error()
                );
            }
            return;
        }
        for &(addr, len) in &self.ranges {
            // SAFETY: the range is a private anonymous mapping this struct's owner created and
            // sealed, so it stays mapped for the life of the process whatever anyone does: the
            // discard only replaces its contents by zeros, and no Rust reference points into
            // guest RAM (it is accessed through raw pointers only).
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
                tracing::warn!(
                    "discarding sealed guest RAM (MADV_DONTNEED): {}; its memory stays in use until exit",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
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
    /// not in the test guest's work ranges; the balloon serves its plugged blocks only when the
    /// VM builder shares virtio-mem's plugged map with it).
    pub fn with_hotplug(config: MemoryConfig, hotplug_size: u64) -> Result<Self, MemoryError> {
        Self::create(config, hotplug_size, false)
    }

    /// As [`Self::with_hotplug`], with every region sealed with `mseal(2)` (see the module docs:
    /// nothing can unmap, move or re-protect guest RAM any more, every discard still works, and
    /// dropping it discards the contents while the address range stays reserved).
    pub fn sealed_with_hotplug(config: MemoryConfig, hotplug_size: u64) -> Result<Self, MemoryError> {
        Self::create(config, hotplug_size, true)
    }

    fn create(config: MemoryConfig, hotplug_size: u64, seal: bool) -> Result<Self, MemoryError> {
        if !hotplug_size.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::HotplugNotAligned(hotplug_size));
        }
        if !config.size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::NotPageAligned(config.size));
        }
        if config.backend == MemoryBackend::Hugetlb && !config.size.is_multiple_of(HUGE_PAGE_SIZE) {
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
        // Filled as regions are sealed, so that a failure half-way still discards those.
        let mut sealed =
            seal.then(|| SealedMappings { ranges: Vec::new(), memfd: memfd.clone().map(|f| (f, total)) });
        let mut regions = Vec::with_capacity(layout.len());
        let mut file_offset = 0u64;
        for &(base, size) in &layout {
            let file = memfd.as_ref().map(|f| (f, file_offset));
            let region = match &mut sealed {
                None => map_region(size, total, file, hugetlb)?,
                Some(sealed) => map_sealed_region(size, total, file, hugetlb, sealed)?,
            };
            if config.thp {
                // SAFETY: the range is exactly the mapping just created for this region;
                // MADV_HUGEPAGE changes no contents and no mapping, only the fault policy (and
                // is allowed on sealed memory).
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
        Ok(Self { memory: Arc::new(memory), config, memfd, hotplug, sealed })
    }

    /// Whether guest RAM is sealed with `mseal(2)`.
    pub fn sealed(&self) -> bool {
        self.sealed.is_some()
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

    /// Faults every page of boot RAM in, writable, as the guest's first write would (QEMU's
    /// `-mem-prealloc`, Cloud Hypervisor's `prefault=on`): the host commits the memory now, and the
    /// guest never waits on a first-touch fault; from then on only a discard (the balloon, free
    /// page reporting) gives pages back. The hot-pluggable region is left alone: its blocks are
    /// unplugged until virtio-mem plugs them. Contents stay zero. Call it before a vCPU runs.
    pub fn prealloc(&self) -> Result<(), MemoryError> {
        let hotplug = self.hotplug.map(|(gpa, _)| gpa);
        for (gpa, hva, len) in self.regions() {
            if hotplug == Some(gpa.0) {
                continue;
            }
            // SAFETY: `[hva, hva + len)` is exactly one mapping of guest RAM this struct created and
            // keeps mapped; MADV_POPULATE_WRITE only faults its pages in (as writes that store
            // nothing) and changes no mapping, no protection and no contents, so it cannot break
            // any pointer or any data, and no Rust reference points into guest RAM.
            let ret =
                unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, libc::MADV_POPULATE_WRITE) };
            if ret != 0 {
                return Err(MemoryError::Prealloc(std::io::Error::last_os_error()));
            }
        }
        Ok(())
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

/// The mmap flags of a region of guest RAM: private anonymous, or the memfd shared. Hugetlb pages
/// are reserved at mmap (no `MAP_NORESERVE`): too few free huge pages is an error now rather
/// than a SIGBUS at the guest's first touch.
fn mmap_flags(file: bool, hugetlb: bool) -> i32 {
    match (file, hugetlb) {
        (false, _) => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        (true, false) => libc::MAP_SHARED | libc::MAP_NORESERVE,
        (true, true) => libc::MAP_SHARED,
    }
}

/// The error for a failed mmap of `size` bytes of guest RAM, of `total` bytes in all.
fn mmap_error(size: u64, total: u64, hugetlb: bool, source: vm_memory::mmap::MmapRegionError) -> MemoryError {
    let enomem = matches!(&source, vm_memory::mmap::MmapRegionError::Mmap(e) if e.raw_os_error() == Some(libc::ENOMEM));
    if hugetlb && enomem {
        MemoryError::NoHugePages { needed: total / HUGE_PAGE_SIZE, free: free_huge_pages() }
    } else {
        MemoryError::Mmap { size, source }
    }
}

/// Maps one region of `size` bytes of the `total` bytes of guest RAM (vm-memory owns and unmaps
/// it); `file` is the memfd and the region's offset in it.
fn map_region(
    size: u64,
    total: u64,
    file: Option<(&Arc<File>, u64)>,
    hugetlb: bool,
) -> Result<MmapRegion<()>, MemoryError> {
    let builder = MmapRegionBuilder::new(size as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(mmap_flags(file.is_some(), hugetlb));
    let builder = match file {
        None => builder,
        Some((file, offset)) => {
            builder.with_file_offset(FileOffset::from_arc(file.clone(), offset)).with_hugetlbfs(hugetlb)
        }
    };
    builder.build().map_err(|source| mmap_error(size, total, hugetlb, source))
}

/// Maps one region of guest RAM and seals it with `mseal(2)`, recording it in `sealed` (which
/// discards it on drop: it can never be unmapped). vm-memory gets the mapping as one it does not
/// own, so it never tries to unmap it.
fn map_sealed_region(
    size: u64,
    total: u64,
    file: Option<(&Arc<File>, u64)>,
    hugetlb: bool,
    sealed: &mut SealedMappings,
) -> Result<MmapRegion<()>, MemoryError> {
    use std::os::fd::AsRawFd;
    let len = size as usize;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = mmap_flags(file.is_some(), hugetlb);
    let (fd, offset) = file.map_or((-1, 0), |(f, off)| (f.as_raw_fd(), off as libc::off_t));
    // SAFETY: a new mapping at an address the kernel picks (no MAP_FIXED), so no existing
    // mapping is touched; the fd, if any, is guest RAM's own memfd, sized to cover the range.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
    if addr == libc::MAP_FAILED {
        let source = vm_memory::mmap::MmapRegionError::Mmap(std::io::Error::last_os_error());
        return Err(mmap_error(size, total, hugetlb, source));
    }
    // SAFETY: mseal only forbids later changes of the mapping just created (the whole of it);
    // it reads and writes no memory.
    if unsafe { libc::syscall(SYS_MSEAL, addr as usize, len, 0usize) } != 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: the mapping just created, which the failed mseal left unsealed; nothing else
        // knows of it.
        unsafe { libc::munmap(addr, len) };
        return Err(MemoryError::Seal(err));
    }
    sealed.ranges.push((addr as usize, len));
    let builder = MmapRegionBuilder::new(len).with_mmap_prot(prot).with_mmap_flags(flags);
    let builder = match file {
        None => builder,
        Some((file, offset)) => {
            builder.with_file_offset(FileOffset::from_arc(file.clone(), offset)).with_hugetlbfs(hugetlb)
        }
    };
    // SAFETY: `addr..addr + len` is a mapping of exactly this size, prot and flags, and it is
    // sealed: no one can unmap or move it for the life of the process, so it outlives the region.
    unsafe { builder.with_raw_mmap_pointer(addr.cast()) }
        .build()
        .map_err(|source| MemoryError::Mmap { size, source })
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
    fn prealloc_makes_boot_ram_resident_and_leaves_the_hotplug_region_alone() {
        let config = MemoryConfig { size: 8 << 20, backend: MemoryBackend::Anonymous, thp: false };
        let ram = GuestRam::with_hotplug(config, 2 << 20).unwrap();
        let regions: Vec<_> = ram.regions().collect();
        let hotplug = ram.hotplug().unwrap().0;
        let (boot, plug): (Vec<_>, Vec<_>) = regions.iter().partition(|r| r.0 .0 != hotplug);
        let resident = |r: &(GuestAddress, u64, u64)| resident_pages(r.1, r.2).expect("mapped");
        assert_eq!(boot.iter().map(|r| resident(r)).sum::<usize>(), 0, "fresh RAM is not resident");
        ram.prealloc().unwrap();
        for r in &boot {
            assert_eq!(resident(r), (r.2 / PAGE_SIZE) as usize, "boot RAM at {:#x}", r.0 .0);
        }
        assert_eq!(resident(&plug[0]), 0, "the unplugged region stays unbacked");
        // Contents stay zero.
        let mut b = [1u8; 64];
        ram.memory().read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0u8; 64]);
    }

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

    /// Resident pages of `[addr, addr + len)` (mincore), or `None` when part of it is unmapped.
    fn resident_pages(addr: u64, len: u64) -> Option<usize> {
        let mut vec = vec![0u8; (len / PAGE_SIZE) as usize];
        // SAFETY: mincore writes one byte per page of the range into `vec`, which is that long;
        // it touches no memory of the range.
        let ret = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
        (ret == 0).then(|| vec.iter().filter(|&&b| b & 1 != 0).count())
    }

    /// Sealed RAM cannot be unmapped, moved, re-protected or mapped over, but discards work; when
    /// it is dropped its pages go back to the host (none resident, the file holds no blocks)
    /// while the range stays mapped.
    #[test]
    fn sealed_ram_refuses_unmaps_keeps_discards_and_gives_its_memory_back_on_drop() {
        use std::os::unix::fs::MetadataExt;
        for backend in [MemoryBackend::Anonymous, MemoryBackend::Memfd] {
            let cfg = MemoryConfig { size: 8 << 20, backend, thp: false };
            let ram = GuestRam::sealed_with_hotplug(cfg, 0).unwrap();
            assert!(ram.sealed());
            let (_, hva, len) = ram.regions().next().unwrap();
            let page = hva as *mut libc::c_void;
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                ram.memory().write_obj(0x5a5a_u16, GuestAddress(off)).unwrap();
            }
            assert_eq!(resident_pages(hva, len), Some((len / PAGE_SIZE) as usize), "{backend:?}");
            let eperm =
                |ret: bool| ret && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            // SAFETY (all four): calls the kernel must refuse on sealed memory; were the seal
            // missing they would only tear down this test's own guest RAM.
            assert!(eperm(unsafe { libc::munmap(page, 4096) } != 0), "{backend:?}");
            assert!(eperm(unsafe { libc::mprotect(page, 4096, libc::PROT_READ) } != 0), "{backend:?}");
            let fixed = unsafe {
                libc::mmap(
                    page,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            assert!(eperm(fixed == libc::MAP_FAILED), "{backend:?}");
            let moved = unsafe { libc::mremap(page, 4096, 8192, libc::MREMAP_MAYMOVE) };
            assert!(eperm(moved == libc::MAP_FAILED), "{backend:?}");
            assert_eq!(ram.memory().read_obj::<u16>(GuestAddress(0)).unwrap(), 0x5a5a);

            let file = ram.memfd().cloned();
            drop(ram);
            assert_eq!(resident_pages(hva, len), Some(0), "{backend:?}: nothing resident, still mapped");
            if let Some(file) = file {
                assert_eq!(file.metadata().unwrap().blocks(), 0, "the memfd gave its pages back");
            }
        }
    }
}
