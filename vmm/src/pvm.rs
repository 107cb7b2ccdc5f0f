//! Adjustments for hosts whose /dev/kvm is PVM (`kvm_pvm`), kept in one place.
//!
//! On PVM, guest ring-0 code goes through KVM's instruction emulator, which cannot execute some
//! instructions (docs/host.md, "PVM"). Everything here does nothing on VMX/SVM hosts, so the rest of the VMM
//! is the code a bare-metal user runs:
//! - [`adjust_cpuid`] hides CMPXCHG16B;
//! - [`linux_cmdline_options`] keeps a Linux guest away from XSAVE, SMAP, POPCNT and friends;
//! - [`EmulationQuirks`] completes, on the emulator's behalf, the instructions it stops on that a
//!   Linux guest cannot avoid: INT3 (text patching), FWAIT, LDMXCSR and STMXCSR. Each kind is
//!   counted and logged the first time it happens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use kvm_bindings::{kvm_regs, CpuId};
use kvm_ioctls::VcpuFd;

use crate::mmu::GuestMemoryAccess;

/// Whether the host's KVM is PVM (the `kvm_pvm` module is loaded).
pub fn is_pvm() -> bool {
    static PVM: OnceLock<bool> = OnceLock::new();
    *PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// CPUID.1:ECX bit of CMPXCHG16B.
const CPUID1_ECX_CX16: u32 = 1 << 13;

/// Hides CPU features the PVM emulator cannot execute in guest ring 0: CMPXCHG16B (PVM honours
/// clearing it; docs/host.md). Nothing on other hosts.
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
/// emulator cannot execute (docs/host.md), and from byte-wise string instructions: without ERMS and
/// FSRM the kernel's memset, memcpy and clear_page use `rep stosq`/`rep movsq` (or unrolled
/// loops), which the emulator runs 8 bytes per step instead of 1 (the emulator executes every
/// iteration of a `rep` instruction separately). Empty on other hosts.
pub fn linux_cmdline_options() -> &'static str {
    if is_pvm() {
        "noxsave clearcpuid=smap,popcnt,erms,fsrm nofsgsbase noinvpcid nopcid random.trust_cpu=on"
    } else {
        ""
    }
}

/// An instruction the PVM emulator stops on (`KVM_EXIT_INTERNAL_ERROR`, suberror 1) that the
/// VMM completes for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quirk {
    /// `int3` (0xCC): Linux patches its text through INT3 breakpoints. Completed by moving RIP
    /// past it and injecting #BP, as the CPU would.
    Int3,
    /// `fwait` (0x9B): with no pending x87 exception (the guest's FPU state is not in use by the
    /// emulated kernel code) it does nothing.
    Fwait,
    /// `ldmxcsr m32` (0F AE /2): loads MXCSR from memory (KVM_SET_FPU).
    Ldmxcsr,
    /// `stmxcsr m32` (0F AE /3): stores MXCSR to memory (KVM_GET_FPU).
    Stmxcsr,
}

const QUIRKS: [Quirk; 4] = [Quirk::Int3, Quirk::Fwait, Quirk::Ldmxcsr, Quirk::Stmxcsr];

impl Quirk {
    fn index(self) -> usize {
        self as usize
    }

    /// The instruction's mnemonic.
    pub fn name(self) -> &'static str {
        match self {
            Quirk::Int3 => "INT3",
            Quirk::Fwait => "FWAIT",
            Quirk::Ldmxcsr => "LDMXCSR",
            Quirk::Stmxcsr => "STMXCSR",
        }
    }
}

/// How many of each [`Quirk`] the VMM completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QuirkCounts {
    /// INT3 completed (#BP injected).
    pub int3: u64,
    /// FWAIT skipped.
    pub fwait: u64,
    /// LDMXCSR performed.
    pub ldmxcsr: u64,
    /// STMXCSR performed.
    pub stmxcsr: u64,
}

impl QuirkCounts {
    /// Whether nothing was completed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The VM-wide side of the emulation quirks: counters and the log-once flags. Exists only on
/// PVM hosts ([`EmulationQuirks::for_host`]).
#[derive(Debug, Default)]
pub struct EmulationQuirks {
    counts: [AtomicU64; 4],
    logged: [AtomicBool; 4],
}

/// Why a failed emulation could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum QuirkError {
    /// The instruction is not one of the [`Quirk`]s.
    #[error("the instruction at rip={rip:#x} ({bytes}) is not one zapvm completes for the PVM emulator")]
    NotAQuirk {
        /// Where.
        rip: u64,
        /// Its first bytes in hex.
        bytes: String,
    },
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A guest-virtual address has no guest-physical page.
    #[error("guest-virtual address {gva:#x} is not mapped by the guest's page tables")]
    Unmapped {
        /// The address.
        gva: u64,
    },
    /// Guest RAM cannot be read or written there.
    #[error("guest memory at {gpa:#x}: {reason}")]
    Memory {
        /// Guest-physical address.
        gpa: u64,
        /// Why.
        reason: String,
    },
}

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// Bits of MXCSR a guest may set (MXCSR_MASK of every CPU with DAZ); others raise #GP.
const MXCSR_WRITABLE: u32 = 0xffff;
const BP_VECTOR: u8 = 3;
const GP_VECTOR: u8 = 13;

impl EmulationQuirks {
    /// `Some` on PVM hosts, `None` elsewhere (there the emulator never runs guest kernel code
    /// and an emulation failure is an error like any other).
    pub fn for_host() -> Option<Self> {
        is_pvm().then(Self::default)
    }

    /// What was completed so far.
    pub fn counts(&self) -> QuirkCounts {
        let n = |q: Quirk| self.counts[q.index()].load(Ordering::Relaxed);
        QuirkCounts {
            int3: n(Quirk::Int3),
            fwait: n(Quirk::Fwait),
            ldmxcsr: n(Quirk::Ldmxcsr),
            stmxcsr: n(Quirk::Stmxcsr),
        }
    }

    /// Completes the instruction a `KVM_EXIT_INTERNAL_ERROR` (emulation failure) of `vcpu`
    /// stopped on, if it is a [`Quirk`], reading and writing guest memory through `mem`. On
    /// success the vCPU is ready to run on; on error its state is unchanged.
    pub fn complete(&self, vcpu: &VcpuFd, mem: &dyn GuestMemoryAccess) -> Result<Quirk, QuirkError> {
        let kvm = |what| move |source| QuirkError::Kvm { what, source };
        let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let insn = fetch_instruction(vcpu, mem, regs.rip)?;
        let decoded =
            decode(&insn).ok_or_else(|| QuirkError::NotAQuirk { rip: regs.rip, bytes: hex(&insn) })?;
        let next_rip = regs.rip.wrapping_add(decoded.len as u64);
        match decoded.quirk {
            Quirk::Int3 => {
                regs.rip = next_rip;
                vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
                inject_exception(vcpu, BP_VECTOR, None)?;
            }
            Quirk::Fwait => {
                regs.rip = next_rip;
                vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
            }
            Quirk::Ldmxcsr | Quirk::Stmxcsr => {
                let operand = decoded.operand.expect("decode gives MXCSR instructions an operand");
                let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
                let segment_base = match operand.segment {
                    Some(Segment::Fs) => sregs.fs.base,
                    Some(Segment::Gs) => sregs.gs.base,
                    None => 0,
                };
                let gva = operand.effective_address(&regs, next_rip, segment_base);
                let mut fpu = vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
                if decoded.quirk == Quirk::Ldmxcsr {
                    let mut value = [0u8; 4];
                    access_virtual(vcpu, mem, gva, Access::Read(&mut value))?;
                    let value = u32::from_le_bytes(value);
                    if value & !MXCSR_WRITABLE != 0 {
                        // What the CPU does with reserved bits set.
                        inject_exception(vcpu, GP_VECTOR, Some(0))?;
                    } else {
                        fpu.mxcsr = value;
                        vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
                        regs.rip = next_rip;
                        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
                    }
                } else {
                    access_virtual(vcpu, mem, gva, Access::Write(&fpu.mxcsr.to_le_bytes()))?;
                    regs.rip = next_rip;
                    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
                }
            }
        }
        let q = decoded.quirk;
        self.counts[q.index()].fetch_add(1, Ordering::Relaxed);
        if !self.logged[q.index()].swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "pvm: the host's instruction emulator cannot execute {} (first at rip={:#x}); zapvm completes it for the guest from now on (counted in the run report)",
                q.name(),
                regs.rip
            );
        }
        Ok(q)
    }
}

/// Every quirk, with the number of times it was completed (for reports).
pub fn quirk_table(counts: &QuirkCounts) -> Vec<(&'static str, u64)> {
    QUIRKS
        .iter()
        .map(|&q| {
            let n = match q {
                Quirk::Int3 => counts.int3,
                Quirk::Fwait => counts.fwait,
                Quirk::Ldmxcsr => counts.ldmxcsr,
                Quirk::Stmxcsr => counts.stmxcsr,
            };
            (q.name(), n)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Injects exception `vector` (with `error_code`) to be delivered at the next KVM_RUN.
fn inject_exception(vcpu: &VcpuFd, vector: u8, error_code: Option<u32>) -> Result<(), QuirkError> {
    let mut events =
        vcpu.get_vcpu_events().map_err(|source| QuirkError::Kvm { what: "KVM_GET_VCPU_EVENTS", source })?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = u8::from(error_code.is_some());
    events.exception.error_code = error_code.unwrap_or(0);
    vcpu.set_vcpu_events(&events).map_err(|source| QuirkError::Kvm { what: "KVM_SET_VCPU_EVENTS", source })
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

const PAGE: u64 = 4096;

/// Reads or writes guest-virtual `[gva, gva + len)` through the guest's page tables
/// (KVM_TRANSLATE), one page at a time.
fn access_virtual(
    vcpu: &VcpuFd,
    mem: &dyn GuestMemoryAccess,
    gva: u64,
    mut access: Access<'_>,
) -> Result<(), QuirkError> {
    let len = match &access {
        Access::Read(b) => b.len(),
        Access::Write(b) => b.len(),
    };
    let mut done = 0;
    while done < len {
        let at = gva.wrapping_add(done as u64);
        let piece = ((PAGE - at % PAGE) as usize).min(len - done);
        let t = vcpu.translate_gva(at).map_err(|source| QuirkError::Kvm { what: "KVM_TRANSLATE", source })?;
        if t.valid == 0 {
            return Err(QuirkError::Unmapped { gva: at });
        }
        let gpa = t.physical_address;
        let result = match &mut access {
            Access::Read(b) => mem.read(gpa, &mut b[done..done + piece]),
            Access::Write(b) => mem.write(gpa, &b[done..done + piece]),
        };
        result.map_err(|e| QuirkError::Memory { gpa, reason: e.to_string() })?;
        done += piece;
    }
    Ok(())
}

/// The bytes at `rip` (up to [`MAX_INSN_LEN`], fewer if the next page is not mapped).
fn fetch_instruction(vcpu: &VcpuFd, mem: &dyn GuestMemoryAccess, rip: u64) -> Result<Vec<u8>, QuirkError> {
    let first = ((PAGE - rip % PAGE) as usize).min(MAX_INSN_LEN);
    let mut bytes = vec![0u8; first];
    access_virtual(vcpu, mem, rip, Access::Read(&mut bytes))?;
    if first < MAX_INSN_LEN {
        let mut rest = vec![0u8; MAX_INSN_LEN - first];
        if access_virtual(vcpu, mem, rip.wrapping_add(first as u64), Access::Read(&mut rest)).is_ok() {
            bytes.extend_from_slice(&rest);
        }
    }
    Ok(bytes)
}

/// A segment override on a memory operand (the others have base 0 in 64-bit mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Fs,
    Gs,
}

/// A memory operand: `segment:[base + index * scale + disp]` or `[rip + disp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemOperand {
    /// Register number (0 = rax ... 15 = r15).
    base: Option<u8>,
    /// Register number and scale.
    index: Option<(u8, u8)>,
    disp: i64,
    rip_relative: bool,
    segment: Option<Segment>,
    /// Address-size prefix: the address is truncated to 32 bits.
    addr32: bool,
}

impl MemOperand {
    fn effective_address(&self, regs: &kvm_regs, next_rip: u64, segment_base: u64) -> u64 {
        let reg = |n: u8| match n {
            0 => regs.rax,
            1 => regs.rcx,
            2 => regs.rdx,
            3 => regs.rbx,
            4 => regs.rsp,
            5 => regs.rbp,
            6 => regs.rsi,
            7 => regs.rdi,
            8 => regs.r8,
            9 => regs.r9,
            10 => regs.r10,
            11 => regs.r11,
            12 => regs.r12,
            13 => regs.r13,
            14 => regs.r14,
            _ => regs.r15,
        };
        let mut addr = if self.rip_relative { next_rip } else { self.base.map_or(0, reg) };
        if let Some((index, scale)) = self.index {
            addr = addr.wrapping_add(reg(index).wrapping_mul(u64::from(scale)));
        }
        addr = addr.wrapping_add(self.disp as u64);
        if self.addr32 {
            addr &= 0xffff_ffff;
        }
        segment_base.wrapping_add(addr)
    }
}

/// A decoded [`Quirk`] instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decoded {
    quirk: Quirk,
    /// Its length in bytes.
    len: usize,
    /// The memory operand of LDMXCSR/STMXCSR.
    operand: Option<MemOperand>,
}

/// Decodes `bytes` (64-bit mode) if they start with one of the [`Quirk`] instructions. A hand
/// decoder because only these four instructions (and the ModRM/SIB forms of one opcode) are
/// needed; the emulator that would otherwise decode them is the one that failed.
fn decode(bytes: &[u8]) -> Option<Decoded> {
    let mut at = 0;
    let mut segment = None;
    let mut addr32 = false;
    // Legacy prefixes.
    loop {
        match *bytes.get(at)? {
            0x64 => segment = Some(Segment::Fs),
            0x65 => segment = Some(Segment::Gs),
            0x67 => addr32 = true,
            // Segment overrides without effect in 64-bit mode. (0x66, 0xf2 and 0xf3 would make
            // 0F AE another instruction.)
            0x26 | 0x2e | 0x36 | 0x3e => {}
            _ => break,
        }
        at += 1;
        if at >= MAX_INSN_LEN {
            return None;
        }
    }
    let rex = match *bytes.get(at)? {
        b @ 0x40..=0x4f => {
            at += 1;
            b
        }
        _ => 0,
    };
    match *bytes.get(at)? {
        0xcc if at == 0 => return Some(Decoded { quirk: Quirk::Int3, len: 1, operand: None }),
        0x9b if at == 0 => return Some(Decoded { quirk: Quirk::Fwait, len: 1, operand: None }),
        0x0f if bytes.get(at + 1) == Some(&0xae) => at += 2,
        _ => return None,
    }
    let modrm = *bytes.get(at)?;
    at += 1;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    let quirk = match reg {
        2 => Quirk::Ldmxcsr,
        3 => Quirk::Stmxcsr,
        _ => return None,
    };
    if mode == 3 {
        return None; // a register operand: not LDMXCSR/STMXCSR
    }
    let (rex_b, rex_x) = ((rex & 1) << 3, (rex & 2) << 2);
    let mut operand = MemOperand { base: None, index: None, disp: 0, rip_relative: false, segment, addr32 };
    let mut disp_len = match mode {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *bytes.get(at)?;
        at += 1;
        let (scale, index, base) = (1u8 << (sib >> 6), ((sib >> 3) & 7) | rex_x, sib & 7);
        if index != 4 {
            operand.index = Some((index, scale));
        }
        if base == 5 && mode == 0 {
            disp_len = 4;
        } else {
            operand.base = Some(base | rex_b);
        }
    } else if rm == 5 && mode == 0 {
        operand.rip_relative = true;
        disp_len = 4;
    } else {
        operand.base = Some(rm | rex_b);
    }
    operand.disp = match disp_len {
        1 => i64::from(*bytes.get(at)? as i8),
        4 => i64::from(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?)),
        _ => 0,
    };
    at += disp_len;
    Some(Decoded { quirk, len: at, operand: Some(operand) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(base: Option<u8>, index: Option<(u8, u8)>, disp: i64) -> MemOperand {
        MemOperand { base, index, disp, rip_relative: false, segment: None, addr32: false }
    }

    #[test]
    fn one_byte_quirks_decode() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Decoded { quirk: Quirk::Int3, len: 1, operand: None }));
        assert_eq!(decode(&[0x9b]), Some(Decoded { quirk: Quirk::Fwait, len: 1, operand: None }));
        // A prefix before INT3 or FWAIT is not what Linux emits: not ours.
        assert_eq!(decode(&[0x2e, 0xcc]), None);
        // With an operand-size or repeat prefix 0F AE is another instruction.
        assert_eq!(decode(&[0x66, 0x0f, 0xae, 0x10]), None);
        assert_eq!(decode(&[0xf3, 0x0f, 0xae, 0x10]), None);
    }

    #[test]
    fn mxcsr_forms_decode_with_their_operands() {
        // ldmxcsr -0x4(%rsp): 0f ae 54 24 fc
        let d = decode(&[0x0f, 0xae, 0x54, 0x24, 0xfc, 0x90]).unwrap();
        assert_eq!((d.quirk, d.len), (Quirk::Ldmxcsr, 5));
        assert_eq!(d.operand, Some(mem(Some(4), None, -4)));
        // stmxcsr -0x8(%rbp): 0f ae 5d f8
        let d = decode(&[0x0f, 0xae, 0x5d, 0xf8]).unwrap();
        assert_eq!((d.quirk, d.len), (Quirk::Stmxcsr, 4));
        assert_eq!(d.operand, Some(mem(Some(5), None, -8)));
        // ldmxcsr (%r8): 41 0f ae 10
        let d = decode(&[0x41, 0x0f, 0xae, 0x10]).unwrap();
        assert_eq!((d.quirk, d.len), (Quirk::Ldmxcsr, 4));
        assert_eq!(d.operand, Some(mem(Some(8), None, 0)));
        // ldmxcsr 0x10(%rip): 0f ae 15 10 00 00 00
        let d = decode(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(d.len, 7);
        assert!(d.operand.unwrap().rip_relative);
        // ldmxcsr %gs:0x1000 (no base, no index): 65 0f ae 14 25 00 10 00 00
        let d = decode(&[0x65, 0x0f, 0xae, 0x14, 0x25, 0x00, 0x10, 0, 0]).unwrap();
        assert_eq!(d.len, 9);
        assert_eq!(d.operand, Some(MemOperand { segment: Some(Segment::Gs), ..mem(None, None, 0x1000) }));
        // stmxcsr 0x100(%rax,%r9,8): 42 0f ae 9c c8 00 01 00 00
        let d = decode(&[0x42, 0x0f, 0xae, 0x9c, 0xc8, 0x00, 0x01, 0, 0]).unwrap();
        assert_eq!((d.quirk, d.len), (Quirk::Stmxcsr, 9));
        assert_eq!(d.operand, Some(mem(Some(0), Some((9, 8)), 0x100)));
    }

    #[test]
    fn other_instructions_are_not_quirks() {
        assert_eq!(decode(&[0x0f, 0xae, 0x00]), None); // fxsave (%rax)
        assert_eq!(decode(&[0x0f, 0xae, 0xd0]), None); // a register form
        assert_eq!(decode(&[0x0f, 0xae, 0x54, 0x24]), None); // truncated
        assert_eq!(decode(&[0x90]), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x2e; 20]), None);
    }

    #[test]
    fn effective_addresses() {
        let regs = kvm_regs { rsp: 0x1000, rax: 0x20, r9: 3, ..Default::default() };
        assert_eq!(mem(Some(4), None, -4).effective_address(&regs, 0, 0), 0xffc);
        assert_eq!(mem(Some(0), Some((9, 8)), 0x100).effective_address(&regs, 0, 0), 0x20 + 24 + 0x100);
        let rip = MemOperand { rip_relative: true, ..mem(None, None, 0x10) };
        assert_eq!(rip.effective_address(&regs, 0xffff_ffff_8100_0007, 0), 0xffff_ffff_8100_0017);
        assert_eq!(
            mem(None, None, 0x1000).effective_address(&regs, 0, 0xffff_8880_0000_0000),
            0xffff_8880_0000_1000
        );
        let a32 = MemOperand { addr32: true, ..mem(Some(4), None, -0x2000) };
        assert_eq!(a32.effective_address(&regs, 0, 0), 0xffff_f000);
    }

    #[test]
    fn counts_start_empty_and_name_every_quirk() {
        let q = EmulationQuirks::default();
        assert!(q.counts().is_empty());
        let table = quirk_table(&q.counts());
        assert_eq!(
            table.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ["INT3", "FWAIT", "LDMXCSR", "STMXCSR"]
        );
    }
}
