//! x86-64 glue of the test guest: the ELF entry point, the exception stubs and the IDT gates that
//! point at them, the ucall port write, the TSC, and the stack marker that lets the panic handler
//! find the vCPU index.
//!
//! Everything that runs at CPL 0 on this host (PVM) is emulated about 1000x slower than CPL 3, so
//! the only ring-0 code is the exception path: a handful of instructions that report the
//! exception in a ucall and halt.

use core::arch::{asm, global_asm};
use core::mem::{offset_of, size_of};

use guest_abi::{selectors, Ucall, UcallKind, UCALL_PORT};

/// The marker `_start` leaves at the top of the stack (`STACK_MARK ^ vcpu`, `vcpu`, `STACK_MARK`,
/// from low to high addresses) so that [`current_vcpu`] can find the vCPU index from any frame.
const STACK_MARK: u64 = u64::from_le_bytes(*b"ZAPVCPU!");

/// How far above the current stack pointer [`current_vcpu`] looks for the marker: the whole stack
/// the VMM gives each vCPU.
const STACK_SIZE: u64 = 64 * 1024;

/// Vectors 0..NR_EXCEPTION_VECTORS get a gate pointing at an exception stub.
pub const NR_EXCEPTION_VECTORS: u64 = 32;

/// Every exception stub starts at `zapvm_isr_stubs + STUB_STRIDE * vector`.
const STUB_STRIDE: u64 = 16;

// The ring-0 handler below writes the Ucall with fixed offsets.
const _: () = {
    assert!(offset_of!(Ucall, kind) == 0);
    assert!(offset_of!(Ucall, vcpu) == 8);
    assert!(offset_of!(Ucall, args) == 16);
    assert!(offset_of!(Ucall, msg_gpa) == 64);
    assert!(offset_of!(Ucall, msg_len) == 72);
    assert!(size_of::<Ucall>() == 80);
};

// The entry point. Every vCPU arrives here with rdi = vCPU index, rsi = BootInfo GPA and rsp = the
// 16-byte aligned top of its own stack. `_start` leaves the stack marker (three words plus one of
// padding, so rsp stays 16-byte aligned) and calls `guest_main(vcpu, boot)` with rsp 16-byte
// aligned at the call, as the SysV ABI wants. `guest_main` never returns; `ud2` catches it if it did.
global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "    and rsp, -16",
    "    mov rax, {mark}",
    "    push rax",
    "    push rdi",
    "    xor rax, rdi",
    "    push rax",
    "    push 0",
    "    xor ebp, ebp",
    "    call {main}",
    "    ud2",
    ".size _start, . - _start",
    ".popsection",
    mark = const STACK_MARK,
    main = sym crate::guest_main,
);

// The exception stubs, one per vector 0..32, each 16-byte aligned at `zapvm_isr_stubs + 16 * vector`.
// A stub pushes a dummy error code where the CPU pushes none (all but 8, 10-14, 17, 21, 29, 30),
// pushes the vector number and jumps to `zapvm_isr_common`.
//
// `zapvm_isr_common` runs at CPL 0 on the vCPU's TSS.RSP0 stack (or on the interrupted stack if
// the guest ran at CPL 0), with [rsp] = vector, [rsp+8] = error code, then the CPU's frame: RIP,
// CS, RFLAGS, RSP, SS. It builds a `Ucall` of kind Exception below it (args: vector, error code,
// RIP, CR2, CS; vcpu = (TR - FIRST_TSS) / 16, read with `str`), writes its address to the ucall
// port and halts for good. It touches no memory but its own stack and uses no SSE, so it works
// whatever state the interrupted code left.
global_asm!(
    ".pushsection .text.zapvm_isr, \"ax\", @progbits",
    ".macro ZAPVM_ISR_NOERR vector",
    "    .balign {stride}",
    "    push 0",
    "    push \\vector",
    "    jmp zapvm_isr_common",
    ".endm",
    ".macro ZAPVM_ISR_ERR vector",
    "    .balign {stride}",
    "    push \\vector",
    "    jmp zapvm_isr_common",
    ".endm",
    ".balign {stride}",
    ".globl zapvm_isr_stubs",
    "zapvm_isr_stubs:",
    "ZAPVM_ISR_NOERR 0",
    "ZAPVM_ISR_NOERR 1",
    "ZAPVM_ISR_NOERR 2",
    "ZAPVM_ISR_NOERR 3",
    "ZAPVM_ISR_NOERR 4",
    "ZAPVM_ISR_NOERR 5",
    "ZAPVM_ISR_NOERR 6",
    "ZAPVM_ISR_NOERR 7",
    "ZAPVM_ISR_ERR 8",
    "ZAPVM_ISR_NOERR 9",
    "ZAPVM_ISR_ERR 10",
    "ZAPVM_ISR_ERR 11",
    "ZAPVM_ISR_ERR 12",
    "ZAPVM_ISR_ERR 13",
    "ZAPVM_ISR_ERR 14",
    "ZAPVM_ISR_NOERR 15",
    "ZAPVM_ISR_NOERR 16",
    "ZAPVM_ISR_ERR 17",
    "ZAPVM_ISR_NOERR 18",
    "ZAPVM_ISR_NOERR 19",
    "ZAPVM_ISR_NOERR 20",
    "ZAPVM_ISR_ERR 21",
    "ZAPVM_ISR_NOERR 22",
    "ZAPVM_ISR_NOERR 23",
    "ZAPVM_ISR_NOERR 24",
    "ZAPVM_ISR_NOERR 25",
    "ZAPVM_ISR_NOERR 26",
    "ZAPVM_ISR_NOERR 27",
    "ZAPVM_ISR_NOERR 28",
    "ZAPVM_ISR_ERR 29",
    "ZAPVM_ISR_ERR 30",
    "ZAPVM_ISR_NOERR 31",
    ".balign {stride}",
    ".globl zapvm_isr_stubs_end",
    "zapvm_isr_stubs_end:",
    "",
    ".balign 16",
    ".type zapvm_isr_common, @function",
    "zapvm_isr_common:",
    "    sub rsp, {size}",
    "    mov qword ptr [rsp], {kind}",
    "    xor eax, eax",
    "    str ax",
    "    sub eax, {first_tss}",
    "    shr eax, 4",
    "    mov [rsp + 8], rax",
    "    mov rax, [rsp + {size}]",
    "    mov [rsp + 16], rax",
    "    mov rax, [rsp + {size} + 8]",
    "    mov [rsp + 24], rax",
    "    mov rax, [rsp + {size} + 16]",
    "    mov [rsp + 32], rax",
    "    mov rax, cr2",
    "    mov [rsp + 40], rax",
    "    mov rax, [rsp + {size} + 24]",
    "    mov [rsp + 48], rax",
    "    xor eax, eax",
    "    mov [rsp + 56], rax",
    "    mov [rsp + 64], rax",
    "    mov [rsp + 72], rax",
    "    mov rax, rsp",
    "    mov edx, {port}",
    "    out dx, eax",
    "2:  hlt",
    "    jmp 2b",
    ".size zapvm_isr_common, . - zapvm_isr_common",
    ".popsection",
    stride = const STUB_STRIDE,
    size = const size_of::<Ucall>(),
    kind = const UcallKind::Exception as u64,
    first_tss = const selectors::FIRST_TSS,
    port = const UCALL_PORT,
);

extern "C" {
    /// The first exception stub (defined in the `global_asm!` above; never called from Rust).
    fn zapvm_isr_stubs();
    /// One past the last exception stub.
    fn zapvm_isr_stubs_end();
}

/// Fills the IDT gates of vectors 0..32 at `idt_gpa` with 64-bit interrupt gates (type 0xE,
/// present, DPL 0, selector KERNEL_CODE, IST 0) pointing at the exception stubs.
///
/// # Safety
/// `idt_gpa` must be the (identity-mapped, writable) IDT page the VMM loaded into IDTR, which
/// nothing else in the guest uses.
pub unsafe fn install_exception_gates(idt_gpa: u64) {
    let stubs = zapvm_isr_stubs as *const () as u64;
    let end = zapvm_isr_stubs_end as *const () as u64;
    // Each stub must fit its 16-byte slot (checked here because only the linker knows the sizes).
    if end - stubs != STUB_STRIDE * NR_EXCEPTION_VECTORS {
        halt_forever();
    }
    let mut vector = 0;
    while vector < NR_EXCEPTION_VECTORS {
        let handler = stubs + STUB_STRIDE * vector;
        let low = (handler & 0xffff)
            | (u64::from(selectors::KERNEL_CODE) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate; IST (bits 32-34) 0
            | (((handler >> 16) & 0xffff) << 48);
        let high = handler >> 32;
        let gate = (idt_gpa + 16 * vector) as *mut u64;
        // SAFETY: the caller guarantees the IDT page is mapped, writable and ours; gate and
        // gate + 1 are the two 8-byte halves of gate `vector` < 32 inside that 4 KiB page.
        // The high half goes first so that a gate whose present bit is visible is complete
        // (x86 makes one CPU's stores visible to the others in program order).
        unsafe {
            gate.add(1).write_volatile(high);
            gate.write_volatile(low);
        }
        vector += 1;
    }
}

/// Waits until vCPU 0 has written every exception gate: the last gate's present bit is the
/// last store of [`install_exception_gates`], so once it is visible all gates are.
///
/// # Safety
/// `idt_gpa` must be the identity-mapped IDT page the VMM loaded into this vCPU's IDTR.
pub unsafe fn wait_for_exception_gates(idt_gpa: u64) {
    const PRESENT: u64 = 1 << 47;
    let last = (idt_gpa + 16 * (NR_EXCEPTION_VECTORS - 1)) as *const u64;
    // SAFETY: the caller guarantees the page is mapped; the gate lies inside it.
    while unsafe { last.read_volatile() } & PRESENT == 0 {
        core::hint::spin_loop();
    }
}

/// Performs a ucall: writes the guest-physical address of `u` (identity mapped, so its address)
/// to [`UCALL_PORT`]. The VMM reads the record during the exit; the `asm!` is a compiler memory
/// barrier, so every store to `u` (and everything before it) is done before the `out`.
///
/// A record above 4 GiB cannot be named by a 32-bit `out`; that is a broken stack placement by the
/// VMM, and the guest executes `ud2` (reported as an Exception ucall) rather than panic, because
/// the panic handler itself needs ucalls.
#[inline]
pub fn ucall(u: &mut Ucall) {
    let gpa = u as *mut Ucall as u64;
    if gpa >> 32 != 0 {
        // SAFETY: `ud2` raises #UD, which the exception path reports; it never returns.
        unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
    }
    // SAFETY: a port write to the VMM's ucall port; IOPL = 3 allows it at CPL 3. No `nomem`: the
    // VMM reads `*u` (and the message it points at) from guest memory during the exit.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") UCALL_PORT,
            in("eax") gpa as u32,
            options(nostack, preserves_flags),
        );
    }
}

/// Reads the TSC, serialised against earlier loads and later instructions (`lfence`), so that
/// a timed pass does not leak out of its bracket. Also a compiler barrier.
#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` is allowed at CPL 3 (CR4.TSD is clear); `lfence` is SSE2. No memory is
    // touched; no `nomem` so the compiler keeps memory accesses on their side of it.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            "lfence",
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags),
        );
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Spins forever without exiting (used only where nothing can be reported any more).
pub fn halt_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The vCPU index `_start` left at the top of the current stack, or `u64::MAX` if the marker is
/// not within [`STACK_SIZE`] above the stack pointer (a corrupted stack).
///
/// Reads only the words between the current stack pointer and the marker, all of which belong to
/// this vCPU's stack, so it cannot stray into memory the vCPU does not own.
#[inline(never)]
pub fn current_vcpu() -> u64 {
    let mut sp: u64;
    // SAFETY: reads rsp only.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    sp &= !7;
    let limit = sp.saturating_add(STACK_SIZE);
    let mut p = sp;
    while p + 16 < limit {
        let words = p as *const u64;
        // SAFETY: p..p+24 lies between the current stack pointer and the marker at the top of
        // this vCPU's stack (the scan stops at the first match), so it is mapped, ours and
        // initialised; volatile so the scan is not turned into anything clever.
        let (a, b, c) = unsafe {
            (
                words.read_volatile(),
                words.add(1).read_volatile(),
                words.add(2).read_volatile(),
            )
        };
        if c == STACK_MARK && a == STACK_MARK ^ b {
            return b;
        }
        p += 8;
    }
    u64::MAX
}
