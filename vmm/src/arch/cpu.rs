//! Per-vCPU register state for a 64-bit entry: CPUID, MSRs, FPU, LAPIC, segments, paging.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::{gdt, layout};

/// CR0: protection, monitor coprocessor, extension type, numeric error, write protect, paging.
const CR0_BOOT: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE, OSFXSR, OSXMMEXCPT (SSE usable by the guest).
const CR4_BOOT: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enable and active.
const EFER_BOOT: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: the always-one bit.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS.IOPL = 3: `in`/`out` from ring 3 still exit to the VMM.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Errors setting a vCPU up.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Its errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM_SET_MSRS set only {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuSetupError {
    move |source| CpuSetupError::Kvm { what, source }
}

/// How a vCPU enters the guest.
#[derive(Clone, Copy, Debug)]
pub struct EntryState {
    /// First instruction.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// First argument register.
    pub rdi: u64,
    /// Second argument register.
    pub rsi: u64,
    /// CR3: the PML4.
    pub cr3: u64,
    /// Enter at CPL 3 (IOPL 3, user segments) rather than CPL 0.
    pub ring3: bool,
    /// Load the task register with this vCPU's TSS.
    pub load_tss: bool,
    /// The IDT's base and limit.
    pub idt: (u64, u16),
    /// The GDT's limit (its base is [`layout::GDT_START`]).
    pub gdt_limit: u16,
}

/// Gives vCPU `index` the CPUID `supported` (the host's, already adjusted for the host's kind by
/// the caller: `pvm::adjust_cpuid`) with its own APIC IDs.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u32) -> Result<(), CpuSetupError> {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24);
                entry.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))
}

/// Sets the MSRs a 64-bit guest expects to find initialised (as Firecracker and Linux's own
/// boot path do): SYSENTER/SYSCALL MSRs zeroed, TSC 0, fast strings on, MTRRs on with
/// write-back default.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let entry = |index: u32, data: u64| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(0x174, 0),             // IA32_SYSENTER_CS
        entry(0x175, 0),             // IA32_SYSENTER_ESP
        entry(0x176, 0),             // IA32_SYSENTER_EIP
        entry(0xc000_0081, 0),       // STAR
        entry(0xc000_0082, 0),       // LSTAR
        entry(0xc000_0083, 0),       // CSTAR
        entry(0xc000_0084, 0),       // SYSCALL_MASK
        entry(0xc000_0102, 0),       // KERNEL_GS_BASE
        entry(0x10, 0),              // TSC
        entry(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        entry(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    let msrs = Msrs::from_entries(&entries).expect("fixed, small MSR list");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuSetupError::Msrs { set, wanted: entries.len() });
    }
    Ok(())
}

/// Initialises the x87/SSE state as after `fninit` with all SSE exceptions masked.
pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// Routes the legacy PIC through LINT0 (ExtINT) and NMIs through LINT1, as a BIOS would.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Puts vCPU `index` in 64-bit mode at `entry`, runnable at once.
///
/// With the in-kernel irqchip every vCPU but 0 starts as an application processor waiting for
/// INIT/SIPI; one given an entry state here is made runnable instead.
pub fn set_entry_state(vcpu: &VcpuFd, index: usize, entry: &EntryState) -> Result<(), CpuSetupError> {
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE })
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (code, data) = gdt::code_and_data(entry.ring3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    if entry.load_tss {
        sregs.tr = gdt::task_register(index);
    }
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = entry.gdt_limit;
    sregs.idt.base = entry.idt.0;
    sregs.idt.limit = entry.idt.1;
    sregs.cr0 = CR0_BOOT;
    sregs.cr3 = entry.cr3;
    sregs.cr4 = CR4_BOOT;
    sregs.efer = EFER_BOOT;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rdi: entry.rdi,
        rsi: entry.rsi,
        rflags: RFLAGS_RESERVED | if entry.ring3 { RFLAGS_IOPL3 } else { 0 },
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}
