//! Booting Linux per the x86 64-bit boot protocol (Documentation/arch/x86/boot.rst).
//!
//! The kernel is a bzImage (loaded at 1 MiB, entered at its 64-bit entry, load address + 0x200)
//! or an uncompressed vmlinux ELF (entered at its ELF entry, which skips the decompressor: on
//! PVM hosts that saves seconds of emulated ring-0 code). The boot processor starts in 64-bit
//! mode with identity-mapped page tables for the first 4 GiB, a GDT with flat `__BOOT_CS` (0x10)
//! and `__BOOT_DS` (0x18), interrupts off, and `rsi` pointing at the zero page (`boot_params`),
//! which carries the setup header, the command line, the initrd and the e820 map. Secondary
//! vCPUs wait for the kernel's INIT/SIPI.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BootPlan};
use crate::arch::cpu::EntryState;
use crate::arch::gdt;
use crate::arch::paging;
use crate::memory::{GuestRam, MMIO_GAP_END};

/// Longest command line accepted.
pub use crate::arch::layout::LINUX_CMDLINE_MAX as CMDLINE_MAX;
use crate::arch::layout::{
    LINUX_BOOT_STACK as BOOT_STACK, LINUX_CMDLINE as CMDLINE, LINUX_EBDA_START as EBDA_START,
    LINUX_HIMEM_START as HIMEM_START, LINUX_PAGE_TABLES as PAGE_TABLES, LINUX_ZERO_PAGE as ZERO_PAGE,
};
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Default command line: serial console (early and late), reboot through the i8042 so that a
/// guest reboot ends the VM, and no keyboard probing. PVM hosts add their workarounds.
pub fn default_cmdline() -> String {
    let mut line = String::from(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 i8042.nokbd i8042.noaux i8042.nopnp",
    );
    let pvm = crate::pvm::linux_cmdline_options();
    if !pvm.is_empty() {
        line.push(' ');
        line.push_str(pvm);
    }
    line
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, BootError> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|source| BootError::Read {
        what,
        path: path.display().to_string(),
        source,
    })?;
    Ok(data)
}

/// Loads `kernel` (and `initrd`) with `cmdline` for `nr_vcpus` vCPUs.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    nr_vcpus: usize,
) -> Result<BootPlan, BootError> {
    let mem = ram.memory().as_ref();
    let image = read_file("kernel", kernel)?;
    let bad =
        |reason: String| BootError::BadImage { what: "kernel", path: kernel.display().to_string(), reason };
    let low_end = ram.ram_regions().next().map(|(_, _, size)| size).unwrap_or(0);
    if HIMEM_START + image.len() as u64 > low_end {
        return Err(BootError::MemoryTooSmall {
            what: format!("kernel {}", kernel.display()),
            mem: ram.size(),
            needed: HIMEM_START + image.len() as u64,
        });
    }
    let mut cursor = std::io::Cursor::new(&image[..]);
    let (entry, setup_header, kind) = if image.starts_with(b"\x7fELF") {
        let loaded = Elf::load(mem, None, &mut cursor, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| bad(format!("as vmlinux ELF: {e}")))?;
        (loaded.kernel_load.0, None, "vmlinux")
    } else {
        let loaded = BzImage::load(mem, None, &mut cursor, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| bad(format!("as bzImage: {e} (a kernel is a bzImage or a vmlinux ELF)")))?;
        let header = loaded.setup_header.expect("the bzImage loader always returns the header");
        let needed = loaded.kernel_load.0 + u64::from(header.init_size);
        if needed > low_end {
            return Err(BootError::MemoryTooSmall {
                what: format!("kernel {} (its init_size)", kernel.display()),
                mem: ram.size(),
                needed,
            });
        }
        (loaded.kernel_load.0 + 0x200, Some(header), "bzImage")
    };

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &line).map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(header) = setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    let write = |what| move |source| BootError::Write { what, source };
    if let Some(path) = initrd {
        let data = read_file("initrd", path)?;
        let max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        let top = low_end.min(max + 1);
        let addr = top
            .checked_sub(data.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= HIMEM_START + image.len() as u64);
        let addr = addr.ok_or_else(|| BootError::MemoryTooSmall {
            what: format!("kernel and initrd {}", path.display()),
            mem: ram.size(),
            needed: HIMEM_START + image.len() as u64 + data.len() as u64,
        })?;
        mem.write_slice(&data, GuestAddress(addr)).map_err(write("initrd"))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let mut e820 = vec![(0, EBDA_START)];
    for (gpa, _, size) in ram.ram_regions() {
        let start = if gpa.0 == 0 { HIMEM_START } else { gpa.0 };
        e820.push((start, gpa.0 + size - start));
    }
    for (i, &(addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: E820_RAM };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<crate::memory::GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| BootError::Cmdline(format!("cannot write the zero page: {e}")))?;

    paging::write_identity_tables(mem, PAGE_TABLES, MMIO_GAP_END, false).map_err(write("page tables"))?;
    gdt::write_tables(mem, &[]).map_err(write("descriptor tables"))?;

    let mut entries = vec![None; nr_vcpus];
    entries[0] = Some(EntryState {
        rip: entry,
        rsp: BOOT_STACK,
        rdi: 0,
        rsi: ZERO_PAGE,
        cr3: PAGE_TABLES.pml4,
        ring3: false,
        load_tss: false,
        idt: (0, 0),
        gdt_limit: gdt::gdt_limit(0),
    });
    let summary = format!(
        "Linux {kind} {}: entry {entry:#x}, {} bytes of command line, initrd {}, e820 {:x?}",
        kernel.display(),
        cmdline.len(),
        initrd.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        e820
    );
    Ok(BootPlan { entries, summary })
}
