//! Adjustments for hosts whose /dev/kvm is PVM (`kvm_pvm`), kept in one place.
//!
//! On PVM, guest ring-0 code goes through KVM's instruction emulator, which cannot execute some
//! instructions (HOST.md). Everything here does nothing on VMX/SVM hosts, so the rest of the VMM
//! is the code a bare-metal user runs.

use std::sync::OnceLock;

use kvm_bindings::CpuId;

/// Whether the host's KVM is PVM (the `kvm_pvm` module is loaded).
pub fn is_pvm() -> bool {
    static PVM: OnceLock<bool> = OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// CPUID.1:ECX bit of CMPXCHG16B.
const CPUID1_ECX_CX16: u32 = 1 << 13;

/// Hides CPU features the PVM emulator cannot execute in guest ring 0: CMPXCHG16B (PVM honours
/// clearing it; HOST.md). Nothing on other hosts.
pub fn adjust_cpuid(cpuid: &mut CpuId) {
    if !is_pvm() {
        return;
    }
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx &= !CPUID1_ECX_CX16;
        }
    }
}

/// Kernel command-line options that keep a Linux guest away from instructions the PVM
/// emulator cannot execute (HOST.md); empty on other hosts.
pub fn linux_cmdline_options() -> &'static str {
    if is_pvm() {
        "noxsave clearcpuid=smap,popcnt nofsgsbase noinvpcid nopcid random.trust_cpu=on"
    } else {
        ""
    }
}
