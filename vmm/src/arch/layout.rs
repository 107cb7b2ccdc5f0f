//! The guest-physical map: every fixed guest-physical address the VMM uses, in one place, with
//! compile-time checks that the pieces neither overlap nor leave their room.
//!
//! Both boots share the descriptor tables (GDT, IDT, TSSes and their I/O bitmap); the rest of
//! low memory is laid out per boot, and what one boot puts at an address the other may put
//! elsewhere (the test guest's [`guest_abi::BootInfo`] and Linux's zero page are both at
//! 0x7000, never in the same VM).
//!
//! | range | both boots | test guest | Linux |
//! |---|---|---|---|
//! | 0x1000 | GDT | | |
//! | 0x2000 | IDT page | | |
//! | 0x7000 | | [`guest_abi::BootInfo`] | zero page |
//! | 0x8000 | | PML4 | boot stack (top 0x8ff0) |
//! | 0x9000 | | PDPT | PML4 |
//! | 0xa000 - 0xf000 | | | PDPT, 4 page directories |
//! | 0x1_0000 - 0x1_a001 | one TSS per vCPU, then their shared I/O bitmap | | |
//! | 0x2_0000 | | | command line |
//! | 0x9_fc00 - 0x10_0000 | | | EBDA and ROM (not RAM in the e820 map) |
//! | 0x10_0000 | | page directories (one per GiB, to 0x20_0000) | the kernel |
//! | 0x20_0000 | | the ELF image, then stacks and the workload's pages | |
//! | 0xc000_0000 - 0x1_0000_0000 | the MMIO hole: virtio-mmio windows from 0xd000_0000 | | |
//! | 0x1_0000_0000 - | RAM above the hole, then the virtio-mem region | | |

use guest_abi::{BootInfo, BOOT_INFO_GPA, MAX_VIRTIO_DEVICES, PAGE_SIZE};

use super::paging::PageTableLayout;

// --- The MMIO hole and the devices in it ---------------------------------------------------

/// Start of the 32-bit MMIO hole (3 GiB); no RAM between here and [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB), where RAM continues.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest-physical base of the first virtio-mmio window (in the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two virtio-mmio windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;

// --- Descriptor tables (both boots) ---------------------------------------------------------

/// Guest-physical address of the GDT (one page).
pub const GDT_START: u64 = 0x1000;
/// Guest-physical address of the IDT page.
pub const IDT_START: u64 = 0x2000;
/// Guest-physical address of the first TSS; vCPU `i`'s is at `TSS_START + i * TSS_STRIDE`.
pub const TSS_START: u64 = 0x1_0000;
/// Bytes between two TSSes (a 64-bit TSS is 104 bytes).
pub const TSS_STRIDE: u64 = 128;
/// The I/O permission bitmap all TSSes share (zeros: every port allowed), followed by the
/// terminating 0xff byte the architecture asks for.
pub const IO_BITMAP_START: u64 = 0x1_8000;
/// Bytes of the I/O bitmap (65,536 ports), not counting the terminating byte.
pub const IO_BITMAP_SIZE: u64 = 8192;
/// End of the descriptor tables' area (the I/O bitmap's terminating byte included).
pub const DESCRIPTOR_TABLES_END: u64 = IO_BITMAP_START + IO_BITMAP_SIZE + 1;

// --- The test guest's boot ------------------------------------------------------------------

/// The test guest's [`BootInfo`] (the ABI fixes the address).
pub const TEST_GUEST_BOOT_INFO: u64 = BOOT_INFO_GPA;
/// The test guest's identity page tables: PML4, PDPT, then one page directory per GiB mapped.
pub const TEST_GUEST_PAGE_TABLES: PageTableLayout =
    PageTableLayout { pml4: 0x8000, pdpt: 0x9000, pds: 0x10_0000 };
/// Where the test guest's ELF is linked (`vmm/build.rs` links it there, and refuses a segment
/// below); the page directories end here.
pub const TEST_GUEST_IMAGE_BASE: u64 = 0x20_0000;
/// The most guest-physical address space the test guest's page directories can map: one page
/// directory per GiB between [`TEST_GUEST_PAGE_TABLES`]`.pds` and the image.
pub const TEST_GUEST_MAX_MAPPED: u64 =
    (TEST_GUEST_IMAGE_BASE - TEST_GUEST_PAGE_TABLES.pds) / PAGE_SIZE * (1 << 30);

// --- Linux's boot ---------------------------------------------------------------------------

/// The zero page (`struct boot_params`).
pub const LINUX_ZERO_PAGE: u64 = 0x7000;
/// The boot stack's top (in the page below the page tables).
pub const LINUX_BOOT_STACK: u64 = 0x8ff0;
/// Linux's identity page tables (they map [`MMIO_GAP_END`], so 4 page directories).
pub const LINUX_PAGE_TABLES: PageTableLayout = PageTableLayout { pml4: 0x9000, pdpt: 0xa000, pds: 0xb000 };
/// Page directories of [`LINUX_PAGE_TABLES`].
pub const LINUX_PAGE_DIRECTORIES: u64 = MMIO_GAP_END / (1 << 30);
/// The command line.
pub const LINUX_CMDLINE: u64 = 0x2_0000;
/// Longest command line accepted.
pub const LINUX_CMDLINE_MAX: usize = 4096;
/// Start of the Extended BIOS Data Area: RAM below it is usable in the e820 map.
pub const LINUX_EBDA_START: u64 = 0x9_fc00;
/// Where the kernel is loaded (and where "high memory" starts for the loader).
pub const LINUX_HIMEM_START: u64 = 0x10_0000;

// --- Compile-time checks ----------------------------------------------------------------------

/// `[a, a + a_len)` and `[b, b + b_len)` do not overlap.
const fn disjoint(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a + a_len <= b || b + b_len <= a
}

/// `gpa` is a multiple of `align` (a power of two).
const fn aligned(gpa: u64, align: u64) -> bool {
    gpa & (align - 1) == 0
}

const fn page_aligned(gpa: u64) -> bool {
    aligned(gpa, PAGE_SIZE)
}

// The descriptor tables: pages of their own, the TSSes of the most vCPUs the GDT can describe
// before the I/O bitmap, the bitmap within a TSS's 16-bit I/O map base of every TSS.
const _: () = assert!(page_aligned(GDT_START) && page_aligned(IDT_START) && page_aligned(TSS_START));
const _: () = assert!(disjoint(GDT_START, PAGE_SIZE, IDT_START, PAGE_SIZE));
const _: () = assert!(IDT_START + PAGE_SIZE <= BOOT_INFO_GPA && IDT_START + PAGE_SIZE <= LINUX_ZERO_PAGE);
const _: () = assert!(TSS_START + super::gdt::MAX_VCPUS as u64 * TSS_STRIDE <= IO_BITMAP_START);
const _: () = assert!(IO_BITMAP_START - TSS_START <= 0xffff - IO_BITMAP_SIZE);

// The test guest: the boot info in its page, before the page tables; the tables before the
// descriptor tables' TSSes; the page directories between the descriptor tables and the image.
const _: () = assert!(page_aligned(TEST_GUEST_BOOT_INFO) && size_of::<BootInfo>() as u64 <= PAGE_SIZE);
const _: () = assert!(TEST_GUEST_BOOT_INFO + PAGE_SIZE <= TEST_GUEST_PAGE_TABLES.pml4);
const _: () = assert!(
    page_aligned(TEST_GUEST_PAGE_TABLES.pml4)
        && page_aligned(TEST_GUEST_PAGE_TABLES.pdpt)
        && page_aligned(TEST_GUEST_PAGE_TABLES.pds)
);
const _: () =
    assert!(disjoint(TEST_GUEST_PAGE_TABLES.pml4, PAGE_SIZE, TEST_GUEST_PAGE_TABLES.pdpt, PAGE_SIZE));
const _: () = assert!(TEST_GUEST_PAGE_TABLES.pdpt + PAGE_SIZE <= TSS_START);
const _: () = assert!(DESCRIPTOR_TABLES_END <= TEST_GUEST_PAGE_TABLES.pds);
const _: () = assert!(aligned(TEST_GUEST_IMAGE_BASE, 2 << 20) && TEST_GUEST_MAX_MAPPED >= MMIO_GAP_END);

// Linux: zero page, stack page, page tables, then the descriptor tables, the command line, the
// EBDA, the kernel, in that order and all below the MMIO hole.
const _: () =
    assert!(LINUX_ZERO_PAGE + PAGE_SIZE <= LINUX_BOOT_STACK && LINUX_BOOT_STACK < LINUX_PAGE_TABLES.pml4);
const _: () = assert!(
    LINUX_PAGE_TABLES.pml4 + PAGE_SIZE <= LINUX_PAGE_TABLES.pdpt
        && LINUX_PAGE_TABLES.pdpt + PAGE_SIZE <= LINUX_PAGE_TABLES.pds
        && LINUX_PAGE_TABLES.pds + LINUX_PAGE_DIRECTORIES * PAGE_SIZE <= TSS_START
);
const _: () = assert!(DESCRIPTOR_TABLES_END <= LINUX_CMDLINE);
const _: () = assert!(LINUX_CMDLINE + LINUX_CMDLINE_MAX as u64 <= LINUX_EBDA_START);
const _: () = assert!(LINUX_EBDA_START <= LINUX_HIMEM_START);

// The devices: every window the boot info can describe inside the MMIO hole, none overlapping
// the next, and everything fixed above below the hole.
const _: () = assert!(page_aligned(VIRTIO_MMIO_BASE) && VIRTIO_MMIO_BASE >= MMIO_GAP_START);
const _: () = assert!(guest_abi::virtio::mmio::WINDOW_SIZE <= VIRTIO_MMIO_STRIDE);
const _: () = assert!(VIRTIO_MMIO_BASE + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_STRIDE <= MMIO_GAP_END);
const _: () = assert!(TEST_GUEST_IMAGE_BASE < MMIO_GAP_START && LINUX_HIMEM_START < MMIO_GAP_START);
const _: () = assert!(page_aligned(MMIO_GAP_START) && aligned(MMIO_GAP_END, 1 << 30));

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks above are only as good as their predicates: planted overlaps and misalignments
    /// must fail them, and the map's own neighbours must pass.
    #[test]
    fn the_checks_refuse_planted_overlaps_and_misalignment() {
        assert!(!disjoint(GDT_START, PAGE_SIZE, GDT_START + 8, 8), "a range inside another");
        assert!(!disjoint(TSS_START, 0x100, TSS_START - 0x80, 0x100), "ranges crossing at the start");
        assert!(!disjoint(IDT_START, PAGE_SIZE, GDT_START, PAGE_SIZE + 1), "one byte too long");
        assert!(disjoint(GDT_START, PAGE_SIZE, IDT_START, PAGE_SIZE), "adjacent pages");
        assert!(!page_aligned(LINUX_BOOT_STACK) && !page_aligned(LINUX_EBDA_START));
        assert!(
            !aligned(TEST_GUEST_IMAGE_BASE + PAGE_SIZE, 2 << 20) && aligned(TEST_GUEST_IMAGE_BASE, 2 << 20)
        );
        assert!(page_aligned(TEST_GUEST_BOOT_INFO) && page_aligned(VIRTIO_MMIO_BASE));
    }

    #[test]
    fn the_test_guest_maps_what_its_page_directories_hold() {
        assert_eq!(TEST_GUEST_MAX_MAPPED, 256 << 30);
        assert_eq!(
            super::super::paging::PageTableLayout::pd_bytes(TEST_GUEST_MAX_MAPPED),
            TEST_GUEST_IMAGE_BASE - TEST_GUEST_PAGE_TABLES.pds
        );
        assert_eq!(
            super::super::paging::PageTableLayout::pd_bytes(MMIO_GAP_END),
            LINUX_PAGE_DIRECTORIES * PAGE_SIZE
        );
    }
}
