//! Loading the project's test guest and laying out its machine.
//!
//! Guest-physical layout: all below 2 MiB is the VMM's (the fixed addresses, with their
//! compile-time checks, are [`crate::arch::layout`]); the ELF links at 2 MiB, then come, at
//! the next 2 MiB boundary, per vCPU a 64 KiB stack and a 16 KiB ring-0 stack, and from the
//! next 2 MiB boundary to the end of RAM the workload's pages, split between vCPUs.

use std::io::Cursor;

use guest_abi::{
    page_checksum, pattern, slice_pages, BootInfo, GpaRange, Workload, BOOT_INFO_MAGIC, FLAG_CPL0, MAX_RANGES,
};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, ELFCLASS64, ELFMAG0, ELFMAG1, ELFMAG2, ELFMAG3, EM_X86_64, PT_LOAD,
};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{BootError, BootPlan};
use crate::arch::cpu::EntryState;
use crate::arch::gdt;
use crate::arch::paging;
use crate::memory::{GuestRam, HUGE_PAGE_SIZE, MMIO_GAP_END};
use crate::mmu::GuestMemoryAccess;
use crate::vstate::vcpu::{VcpuOutcome, VcpuReport};

/// Where the test guest's ELF is linked.
pub use crate::arch::layout::TEST_GUEST_IMAGE_BASE as IMAGE_BASE;
use crate::arch::layout::{
    IDT_START, TEST_GUEST_BOOT_INFO, TEST_GUEST_MAX_MAPPED as MAX_MAPPED,
    TEST_GUEST_PAGE_TABLES as PAGE_TABLES,
};
const STACK_SIZE: u64 = 64 << 10;
const RING0_STACK_SIZE: u64 = 16 << 10;

/// The test guest built with this VMM.
pub const BUILT_IN_ELF: &[u8] = include_bytes!(env!("ZAPVM_TEST_GUEST_ELF"));

/// What the test guest should do.
#[derive(Clone, Copy, Debug)]
pub struct TestGuestParams {
    /// Its workload.
    pub workload: Workload,
    /// Seed of the memory pattern.
    pub seed: u64,
    /// Run at CPL 0 instead of CPL 3.
    pub cpl0: bool,
    /// Drivers misbehave on purpose ([`guest_abi::FLAG_HOSTILE`]).
    pub hostile: bool,
    /// Further [`BootInfo::flags`] bits, ORed in as given: workload options such as
    /// [`guest_abi::FLAG_STRESS_BALLOON`].
    pub extra_flags: u64,
    /// The working set's shape of [`Workload::Phased`] (its `tsc_khz` is filled in when 0).
    pub phase: guest_abi::phased::PhaseParams,
}

impl TestGuestParams {
    /// `workload` at CPL 3, well-behaved drivers, a fixed seed.
    pub fn new(workload: Workload) -> Self {
        Self {
            workload,
            seed: 0x5eed,
            cpl0: false,
            hostile: false,
            extra_flags: 0,
            phase: Default::default(),
        }
    }
}

/// A loaded test guest.
#[derive(Debug, Clone)]
pub struct LoadedTestGuest {
    /// How the vCPUs start.
    pub plan: BootPlan,
    /// What the guest was told.
    pub boot_info: BootInfo,
}

// SAFETY: `BootInfo` is `repr(C)` plain old data made of u64s (no padding); any bits are valid.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct BootInfoBytes(BootInfo);
unsafe impl ByteValued for BootInfoBytes {}

/// The header of type `T` at `offset` of `elf`, copied out (the file's bytes need not be aligned
/// for `T`); `None` where the file ends first.
fn header_at<T: ByteValued + Default>(elf: &[u8], offset: usize) -> Option<T> {
    let bytes = elf.get(offset..offset.checked_add(std::mem::size_of::<T>())?)?;
    let mut header = T::default();
    header.as_mut_slice().copy_from_slice(bytes);
    Some(header)
}

/// The extent `[lowest, highest)` of an ELF's loadable segments, with a check that the file is
/// a complete x86_64 ELF64 executable (linux-loader trusts the headers more than a user's file
/// deserves). The headers are linux-loader's ELF64 types, read with [`header_at`].
fn elf_extent(elf: &[u8]) -> Result<(u64, u64), String> {
    if elf.get(..4) != Some(&[ELFMAG0, ELFMAG1, ELFMAG2, ELFMAG3][..]) {
        return Err("no ELF magic".into());
    }
    let truncated = || "truncated ELF headers".to_string();
    let ehdr: Elf64_Ehdr = header_at(elf, 0).ok_or_else(truncated)?;
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_machine != EM_X86_64 {
        return Err("not an x86_64 ELF64 file".into());
    }
    let phoff = usize::try_from(ehdr.e_phoff).map_err(|_| truncated())?;
    let phentsize = usize::from(ehdr.e_phentsize);
    let phnum = usize::from(ehdr.e_phnum);
    if phentsize < std::mem::size_of::<Elf64_Phdr>() || phnum == 0 {
        return Err("no program headers".into());
    }
    let sh_end =
        ehdr.e_shoff.saturating_add(u64::from(ehdr.e_shentsize).saturating_mul(u64::from(ehdr.e_shnum)));
    if ehdr.e_shoff != 0 && sh_end > elf.len() as u64 {
        return Err(format!("truncated: section headers end at {sh_end:#x}, the file at {:#x}", elf.len()));
    }
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for i in 0..phnum {
        let at = phoff.checked_add(i * phentsize).ok_or_else(truncated)?;
        let ph: Elf64_Phdr = header_at(elf, at).ok_or_else(truncated)?;
        if ph.p_type != PT_LOAD {
            continue;
        }
        if ph.p_offset.checked_add(ph.p_filesz).is_none_or(|end| end > elf.len() as u64) {
            return Err(format!(
                "truncated: a segment needs bytes up to {:#x}, the file has {:#x}",
                ph.p_offset.saturating_add(ph.p_filesz),
                elf.len()
            ));
        }
        let end = ph.p_paddr.checked_add(ph.p_memsz).ok_or("segment address overflows")?;
        lo = lo.min(ph.p_paddr);
        hi = hi.max(end);
    }
    if lo >= hi {
        return Err("no loadable segments".into());
    }
    Ok((lo, hi))
}

const fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Loads the test guest `elf` (named `name` in errors) for `nr_vcpus` vCPUs.
pub fn load(
    ram: &GuestRam,
    elf: &[u8],
    name: &str,
    nr_vcpus: usize,
    params: TestGuestParams,
    virtio: &[guest_abi::VirtioMmioDevice],
) -> Result<LoadedTestGuest, BootError> {
    let bad = |reason: String| BootError::BadImage { what: "test guest ELF", path: name.into(), reason };
    let (lo, hi) = elf_extent(elf).map_err(bad)?;
    if lo < IMAGE_BASE {
        return Err(bad(format!(
            "it loads at {lo:#x}, below {IMAGE_BASE:#x} where the VMM keeps its tables"
        )));
    }
    let low_ram_end = ram.ram_regions().next().map(|(_, _, size)| size).unwrap_or(0);
    let stacks = align_up(hi, HUGE_PAGE_SIZE);
    let work_start = align_up(stacks + nr_vcpus as u64 * (STACK_SIZE + RING0_STACK_SIZE), HUGE_PAGE_SIZE);
    // The workload needs at least one page of its own per vCPU.
    let needed = work_start + nr_vcpus as u64 * guest_abi::PAGE_SIZE;
    if needed > low_ram_end {
        return Err(BootError::MemoryTooSmall {
            what: format!("the test guest image ({} KiB) and {nr_vcpus} vCPU stacks", (hi - lo) / 1024),
            mem: ram.size(),
            needed,
        });
    }
    let loaded =
        Elf::load(ram.memory().as_ref(), None, &mut Cursor::new(elf), Some(GuestAddress(IMAGE_BASE)))
            .map_err(|e| bad(e.to_string()))?;
    let entry = loaded.kernel_load.0;
    if !(lo..hi).contains(&entry) {
        return Err(bad(format!("entry point {entry:#x} lies outside the image [{lo:#x}, {hi:#x})")));
    }

    // The workload's RAM: the rest of the low region, and all of the high one.
    let mut work = [GpaRange::default(); MAX_RANGES];
    let mut nr_work = 0;
    for (gpa, _, size) in ram.ram_regions() {
        let start = if gpa.0 == 0 { work_start } else { gpa.0 };
        let end = gpa.0 + size;
        if start < end {
            work[nr_work] = GpaRange { start, end };
            nr_work += 1;
        }
    }
    let top = ram.regions().map(|(gpa, _, size)| gpa.0 + size).max().unwrap_or(0);
    let mapped = top.max(MMIO_GAP_END);
    if mapped > MAX_MAPPED {
        return Err(BootError::AddressSpaceTooLarge { max: MAX_MAPPED, top });
    }
    let write = |what| move |source| BootError::Write { what, source };
    let mem = ram.memory().as_ref();
    paging::write_identity_tables(mem, PAGE_TABLES, mapped, true).map_err(write("page tables"))?;
    let stack_base = |i: u64| stacks + i * (STACK_SIZE + RING0_STACK_SIZE);
    let rsp0: Vec<u64> =
        (0..nr_vcpus as u64).map(|i| stack_base(i) + STACK_SIZE + RING0_STACK_SIZE).collect();
    gdt::write_tables(mem, &rsp0).map_err(write("descriptor tables"))?;

    let boot_info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: guest_abi::ABI_VERSION,
        nr_vcpus: nr_vcpus as u64,
        workload: params.workload as u64,
        flags: if params.cpl0 { FLAG_CPL0 } else { 0 }
            | if params.hostile { guest_abi::FLAG_HOSTILE } else { 0 }
            | params.extra_flags,
        seed: params.seed,
        idt_gpa: IDT_START,
        nr_work: nr_work as u64,
        work,
        nr_virtio: virtio.len().min(guest_abi::MAX_VIRTIO_DEVICES) as u64,
        virtio: std::array::from_fn(|i| virtio.get(i).copied().unwrap_or_default()),
        phase: match params.workload {
            Workload::Phased if params.phase.tsc_khz == 0 => {
                guest_abi::phased::PhaseParams { tsc_khz: host_tsc_khz(), ..params.phase }
            }
            _ => params.phase,
        },
    };
    mem.write_obj(BootInfoBytes(boot_info), GuestAddress(TEST_GUEST_BOOT_INFO))
        .map_err(write("boot info"))?;

    let entries = (0..nr_vcpus)
        .map(|i| {
            Some(EntryState {
                rip: entry,
                rsp: stack_base(i as u64) + STACK_SIZE,
                rdi: i as u64,
                rsi: TEST_GUEST_BOOT_INFO,
                cr3: PAGE_TABLES.pml4,
                ring3: !params.cpl0,
                load_tss: true,
                idt: (IDT_START, 4095),
                gdt_limit: gdt::gdt_limit(nr_vcpus),
            })
        })
        .collect();
    let work_pages: u64 = work[..nr_work].iter().map(GpaRange::pages).sum();
    let summary = format!(
        "test guest {name}: image [{lo:#x}, {hi:#x}), entry {entry:#x}, {} , workload {:?} over {work_pages} pages ({} MiB) from {work_start:#x}",
        if params.cpl0 { "CPL 0" } else { "CPL 3" },
        params.workload,
        (work_pages * guest_abi::PAGE_SIZE) >> 20,
    );
    Ok(LoadedTestGuest { plan: BootPlan { entries, summary }, boot_info })
}

// ---------------------------------------------------------------------------------------------
// After the run: the host's check of what the guest wrote

/// What the host found when it checked guest RAM after the guest finished.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostCheck {
    /// Pages the host read back.
    pub pages: u64,
    /// Pages whose contents differ from the pattern.
    pub bad_pages: u64,
    /// The first difference.
    pub first_bad: Option<String>,
}

/// Checks from the host's side what the guest says it wrote: every page of each vCPU's slice
/// holds the pattern (Verify), and the guest's checksum is the one the pattern gives.
pub(crate) fn check_workload(
    mem: &dyn GuestMemoryAccess,
    info: &BootInfo,
    reports: &[VcpuReport],
    discarded: &dyn Fn(usize) -> Vec<guest_abi::GpaRange>,
) -> (Option<HostCheck>, Option<String>) {
    if !matches!(Workload::from_raw(info.workload), Some(Workload::Verify | Workload::DiscardVerify)) {
        return (None, None);
    }
    let work = &info.work[..info.nr_work as usize];
    let mut check = HostCheck::default();
    let mut failure = None;
    let mut page = vec![0u8; guest_abi::PAGE_SIZE as usize];
    for report in reports {
        let VcpuOutcome::Done { pages, checksum } = report.outcome else {
            continue;
        };
        let (mut expected_pages, mut expected_sum) = (0u64, 0u64);
        let holes = discarded(report.index);
        slice_pages(work, info.nr_vcpus, report.index as u64, |gpa| {
            expected_pages += 1;
            let zeroed = holes.iter().any(|h| (h.start..h.end).contains(&gpa));
            if !zeroed {
                expected_sum = expected_sum.wrapping_add(page_checksum(info.seed, gpa));
            }
            check.pages += 1;
            let ok = mem.read(gpa, &mut page).is_ok()
                && page.chunks_exact(8).enumerate().all(|(i, w)| {
                    let want = if zeroed { 0 } else { pattern(info.seed, gpa + 8 * i as u64) };
                    u64::from_le_bytes(w.try_into().unwrap()) == want
                });
            if !ok {
                check.bad_pages += 1;
                check.first_bad.get_or_insert_with(|| {
                    format!("page {gpa:#x} does not hold {}", if zeroed { "zeros" } else { "the pattern" })
                });
            }
        });
        if pages != expected_pages || checksum != expected_sum {
            failure.get_or_insert(format!(
                "vCPU {}: guest reported {pages} pages / checksum {checksum:#x}, the host expects {expected_pages} / {expected_sum:#x}",
                report.index
            ));
        }
    }
    if let Some(bad) = &check.first_bad {
        failure.get_or_insert(format!("host check: {} bad pages; {bad}", check.bad_pages));
    }
    (Some(check), failure)
}

/// The TSC's frequency in kHz, measured against the monotonic clock over 20 ms (the guest's TSC
/// runs at the host's: zapvm does not scale it). For [`Workload::Phased`], whose guest keeps
/// time with the TSC.
fn host_tsc_khz() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86-64 (user mode may read the TSC).
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (std::time::Instant::now(), tsc());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (c1, elapsed) = (tsc(), t0.elapsed());
    ((c1.wrapping_sub(c0)) as f64 / elapsed.as_secs_f64() / 1000.0).round().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        assert!(elf_extent(b"").unwrap_err().contains("magic"));
        assert!(elf_extent(b"MZ\x90\0").unwrap_err().contains("magic"));
        let (lo, hi) = elf_extent(BUILT_IN_ELF).unwrap();
        assert!(lo >= IMAGE_BASE && hi > lo);
        for cut in [16, 64, BUILT_IN_ELF.len() / 2, BUILT_IN_ELF.len() - 1] {
            assert!(elf_extent(&BUILT_IN_ELF[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    /// The header fields are read where the ELF64 layout has them: changing one in a copy of the
    /// built-in guest changes the verdict it governs.
    #[test]
    fn header_fields_are_read_from_their_places() {
        let with = |offset: usize, bytes: &[u8]| {
            let mut elf = BUILT_IN_ELF.to_vec();
            elf[offset..offset + bytes.len()].copy_from_slice(bytes);
            elf_extent(&elf)
        };
        assert!(with(4, &[1]).unwrap_err().contains("not an x86_64 ELF64"), "EI_CLASS 32-bit");
        assert!(with(18, &3u16.to_le_bytes()).unwrap_err().contains("not an x86_64 ELF64"), "e_machine i386");
        assert!(with(56, &0u16.to_le_bytes()).unwrap_err().contains("no program headers"), "e_phnum 0");
        assert!(with(54, &32u16.to_le_bytes()).unwrap_err().contains("no program headers"), "e_phentsize");
        let far = (BUILT_IN_ELF.len() as u64).to_le_bytes();
        assert!(with(40, &far).unwrap_err().contains("section headers end"), "e_shoff past the end");
        assert!(with(32, &far).unwrap_err().contains("truncated"), "e_phoff past the end");
        // The first program header's p_filesz (e_phoff + 32) past the end of the file.
        let phoff = u64::from_le_bytes(BUILT_IN_ELF[32..40].try_into().unwrap()) as usize;
        let first_load = (0..usize::from(u16::from_le_bytes([BUILT_IN_ELF[56], BUILT_IN_ELF[57]])))
            .map(|i| phoff + i * 56)
            .find(|&ph| BUILT_IN_ELF[ph..ph + 4] == PT_LOAD.to_le_bytes())
            .expect("a PT_LOAD");
        let e = with(first_load + 32, &(u64::MAX / 2).to_le_bytes()).unwrap_err();
        assert!(e.contains("a segment needs bytes up to"), "{e}");
    }
}
