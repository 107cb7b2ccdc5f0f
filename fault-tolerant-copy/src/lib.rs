//! Copies between memory that may be unmapped, truncated or protected under the copy: a fault
//! inside the copy routine ends the copy and is returned as a [`Fault`], never a crash.
//!
//! # How
//!
//! - [`install`] installs, once per process, a `SIGSEGV` and `SIGBUS` handler
//!   (`SA_SIGINFO | SA_ONSTACK`) and returns a [`Copier`], the proof that it did: copies exist
//!   only as methods of a `Copier`, so none can run before the handler is in place.
//! - The copy is a small hand-written x86_64 routine (`global_asm!` below): `rep movsb` for long
//!   copies, 16-byte SSE2 moves and an 8-byte and 1-byte moves for shorter ones. Its only
//!   instructions that can fault are the loads from the source and the stores to the
//!   destination, and at each of them `rcx` holds the number of bytes from the start of the
//!   current step on (every byte before it was copied; the step's own stores may have begun).
//!   The routine's exception table is one entry: "a fault
//!   with the instruction pointer in `[COPY_START, COPY_FIXUP)` resumes at `COPY_FIXUP`", which
//!   returns `rcx` (bytes not copied) and, in `rdx`, the faulting address the handler put there.
//! - The handler recovers only a fault the kernel raised (`si_code > 0`: a signal sent with
//!   `kill`/`tgkill` is not a fault) whose instruction pointer is inside the routine. Every other
//!   `SIGSEGV`/`SIGBUS` goes to the handler installed before [`install`] ran, as if this crate did
//!   not exist: its `sa_sigaction` when it asked for `SA_SIGINFO`, its `sa_handler` otherwise; for
//!   `SIG_DFL` (and `SIG_IGN`, which the kernel does not honour for a fault) the previous action
//!   is restored and the handler returns, so the faulting instruction runs again and the kernel
//!   takes the default action (the process dies of that signal, with a core dump if enabled).
//!   Rust's own stack-overflow guard (std's `SIGSEGV`/`SIGBUS` handler, which prints "thread ..
//!   has overflowed its stack" and aborts) and a sanitizer's handler keep working.
//!
//! This is how Linux's `copy_from_user` survives a bad user pointer (`arch/x86/lib/copy_user_64.S`
//! with an exception table, `arch/x86/mm/extable.c` moving the saved instruction pointer to the
//! fixup) and how Wasmtime turns a wasm out-of-bounds access into a trap (a signal handler that
//! checks the faulting pc against its code and rewrites the saved context).
//!
//! # Why hand-written
//!
//! No maintained crate does this soundly. The ones that recover from a fault in Rust code do it by
//! `siglongjmp` out of the handler (e.g. `bulletproof`), which skips the Rust frames between the
//! copy and the jump target: destructors do not run, locks stay held, and the compiler may have
//! kept values in registers or moved code across the copy on the assumption that the copy returns
//! normally — undefined behaviour in Rust. Resuming at a fixup inside a routine whose every
//! instruction is known (no Rust code between the fault and the return) has none of that: the
//! routine returns normally, with a result.
//!
//! # What the caller must know
//!
//! - The bytes are moved with plain loads and stores, never through a Rust reference: memory
//!   another thread (or a guest) writes concurrently may be copied, and the copy may tear at any
//!   byte. Overlapping source and destination give unspecified bytes (no memmove semantics).
//! - On a fault, the bytes before `len - not_copied` were copied; bytes after may have been
//!   written too (a `rep movsb` may store ahead of the iteration it reports).
//! - A fault with `SIGSEGV` blocked in the copying thread, or with the handler replaced by someone
//!   else after [`install`], is not recovered (the kernel then kills the process, or the new
//!   handler decides).
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::ffi::c_void;
use std::sync::OnceLock;

/// A copy that stopped at a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Bytes at the end of the request that were not copied (> 0).
    pub not_copied: usize,
    /// The address whose access faulted (the kernel's `si_addr`: inside the source or the
    /// destination range).
    pub addr: usize,
    /// `SIGSEGV` (nothing mapped, or the protection refused the access) or `SIGBUS` (e.g. a page
    /// of a file truncated under the mapping).
    pub signal: i32,
}

/// Proof that the fault handler is installed; the copies are its methods.
#[derive(Clone, Copy, Debug)]
pub struct Copier {
    _installed: (),
}

/// Why [`install`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallError {
    /// `sigaction` failed (errno).
    Sigaction(i32),
    /// Another thread changed the signal's action while it was being installed (the handler
    /// would have lost that thread's handler); the other thread's action was put back.
    Raced(i32),
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Sigaction(errno) => {
                write!(f, "sigaction failed: {}", std::io::Error::from_raw_os_error(*errno))
            }
            InstallError::Raced(sig) => write!(f, "the action of signal {sig} changed while installing"),
        }
    }
}

impl std::error::Error for InstallError {}

// The routine. System V calling convention: rdi = dst, rsi = src, rdx = len. Returns rax = bytes
// not copied, rdx = faulting address (0 when rax = 0). Clobbers rcx, rsi, rdi, xmm0-xmm3, flags
// (all caller-saved). The direction flag is clear on entry (the ABI guarantees it).
//
// Exception table (one entry): a fault at any instruction in [COPY_START, COPY_FIXUP) resumes at
// COPY_FIXUP with rdx = the faulting address. It holds because the only instructions of that range
// that can fault are the loads `[rsi + k]` and the stores `[rdi + k]`, and at each of them rcx is
// the number of bytes from the start of the current step (a 64-, 16-, 8- or 1-byte move, or one
// `rep movsb` iteration: it keeps rcx/rsi/rdi at the faulting one) to the end: every byte before
// the step was copied, so "rcx bytes not copied" never claims a byte that was not.
std::arch::global_asm!(
    ".pushsection .text.fault_tolerant_copy_v1,\"ax\",@progbits",
    ".p2align 4",
    ".globl fault_tolerant_copy_v1_start",
    ".hidden fault_tolerant_copy_v1_start",
    ".type fault_tolerant_copy_v1_start,@function",
    "fault_tolerant_copy_v1_start:",
    "    mov rcx, rdx",
    "    cmp rcx, {rep_from}",
    "    jae 3f",
    "    cmp rcx, 64",
    "    jb 6f",
    // 64 bytes per iteration in four 16-byte SSE2 moves (xmm0-3: caller-saved).
    "7:  movdqu xmm0, xmmword ptr [rsi]",
    "    movdqu xmm1, xmmword ptr [rsi + 16]",
    "    movdqu xmm2, xmmword ptr [rsi + 32]",
    "    movdqu xmm3, xmmword ptr [rsi + 48]",
    "    movdqu xmmword ptr [rdi], xmm0",
    "    movdqu xmmword ptr [rdi + 16], xmm1",
    "    movdqu xmmword ptr [rdi + 32], xmm2",
    "    movdqu xmmword ptr [rdi + 48], xmm3",
    "    add rsi, 64",
    "    add rdi, 64",
    "    sub rcx, 64",
    "    cmp rcx, 64",
    "    jae 7b",
    "6:  cmp rcx, 16",
    "    jb 8f",
    "9:  movdqu xmm0, xmmword ptr [rsi]",
    "    movdqu xmmword ptr [rdi], xmm0",
    "    add rsi, 16",
    "    add rdi, 16",
    "    sub rcx, 16",
    "    cmp rcx, 16",
    "    jae 9b",
    "8:  cmp rcx, 8",
    "    jb 2f",
    "    mov rax, qword ptr [rsi]",
    "    mov qword ptr [rdi], rax",
    "    add rsi, 8",
    "    add rdi, 8",
    "    sub rcx, 8",
    "2:  test rcx, rcx",
    "    jz 4f",
    "5:  mov al, byte ptr [rsi]",
    "    mov byte ptr [rdi], al",
    "    inc rsi",
    "    inc rdi",
    "    dec rcx",
    "    jnz 5b",
    "    jmp 4f",
    "3:  rep movsb",
    "4:  xor edx, edx",
    ".globl fault_tolerant_copy_v1_fixup",
    ".hidden fault_tolerant_copy_v1_fixup",
    "fault_tolerant_copy_v1_fixup:",
    "    mov rax, rcx",
    "    ret",
    ".size fault_tolerant_copy_v1_start, . - fault_tolerant_copy_v1_start",
    ".popsection",
    rep_from = const REP_MOVSB_FROM,
);

/// Copies of at least this many bytes use `rep movsb` (its start-up cost, tens of cycles, pays
/// off only for long copies, and later still on CPUs without ERMS/FSRM); shorter ones 16-byte
/// SSE2 moves (64 bytes per iteration), then an 8-byte and single-byte moves for the tail.
/// `zapvm bench access` measures the routine against memcpy at 16 B, 256 B and 4 KiB.
const REP_MOVSB_FROM: usize = 8192;

/// The routine's two return registers.
#[repr(C)]
struct RoutineResult {
    /// rax
    not_copied: usize,
    /// rdx
    fault_addr: usize,
}

extern "sysv64" {
    fn fault_tolerant_copy_v1_start(dst: *mut u8, src: *const u8, len: usize) -> RoutineResult;
    fn fault_tolerant_copy_v1_fixup();
}

/// The signal number of the last recovered fault of the calling thread is not kept anywhere (the
/// handler has no per-thread state); the routine returns only rax/rdx. So `rdx` carries the
/// address and the signal in its top bit: SIGBUS faults set bit 63, which no user-space address
/// has on x86_64 (canonical user addresses are below 2^47, or 2^56 with 5-level paging).
const SIGBUS_TAG: usize = 1 << 63;

fn routine_range() -> (usize, usize) {
    (fault_tolerant_copy_v1_start as *const () as usize, fault_tolerant_copy_v1_fixup as *const () as usize)
}

impl Copier {
    /// Copies `len` bytes from `src` to `dst` with loads and stores that survive faults.
    ///
    /// # Safety
    /// For every byte of `[src, src + len)` and `[dst, dst + len)` that is mapped with the needed
    /// permission, the access must be allowed by Rust's rules: no live Rust reference may cover
    /// the destination bytes (the routine writes them behind its back) and the source bytes must
    /// not be covered by a `&mut` reference; the bytes written must be valid for whatever type the
    /// destination holds. Bytes that are not mapped (or not accessible) are allowed: the access
    /// faults and the copy returns [`Fault`]. The ranges must not wrap around the address space.
    #[inline]
    pub unsafe fn copy(self, dst: *mut u8, src: *const u8, len: usize) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract covers every byte the routine accesses; the routine
        // touches only [src, src + len) and [dst, dst + len), follows the System V ABI (clobbers
        // caller-saved registers only, leaves the direction flag clear, does not touch the stack
        // beyond its return address), and a fault inside it resumes at its fixup because `self`
        // proves the handler is installed.
        let r = unsafe { fault_tolerant_copy_v1_start(dst, src, len) };
        if r.not_copied == 0 {
            Ok(())
        } else {
            let signal = if r.fault_addr & SIGBUS_TAG != 0 { libc::SIGBUS } else { libc::SIGSEGV };
            Err(Fault { not_copied: r.not_copied, addr: r.fault_addr & !SIGBUS_TAG, signal })
        }
    }

    /// Fills `buf` from `src`.
    ///
    /// # Safety
    /// As [`Copier::copy`] for the source: `[src, src + buf.len())` is either inaccessible or
    /// not covered by a `&mut` reference.
    #[inline]
    pub unsafe fn read(self, buf: &mut [u8], src: *const u8) -> Result<(), Fault> {
        // SAFETY: `buf` is an exclusively borrowed byte buffer (any bytes valid); the source is
        // the caller's contract.
        unsafe { self.copy(buf.as_mut_ptr(), src, buf.len()) }
    }

    /// Writes `buf` to `dst`.
    ///
    /// # Safety
    /// As [`Copier::copy`] for the destination: `[dst, dst + buf.len())` is either inaccessible
    /// or covered by no live Rust reference, and any bytes are valid there.
    #[inline]
    pub unsafe fn write(self, dst: *mut u8, buf: &[u8]) -> Result<(), Fault> {
        // SAFETY: `buf` is a shared borrow, only read; the destination is the caller's contract.
        unsafe { self.copy(dst, buf.as_ptr(), buf.len()) }
    }
}

/// The actions `SIGSEGV` and `SIGBUS` had before [`install`] replaced them: written once, before
/// the handler is installed, and only read afterwards (by the handler too: `OnceLock::get` is an
/// atomic load, async-signal-safe).
static PREVIOUS_SEGV: OnceLock<libc::sigaction> = OnceLock::new();
static PREVIOUS_BUS: OnceLock<libc::sigaction> = OnceLock::new();
/// The outcome of the one installation.
static INSTALLED: OnceLock<Result<(), InstallError>> = OnceLock::new();

fn previous(sig: libc::c_int) -> Option<&'static libc::sigaction> {
    match sig {
        libc::SIGSEGV => PREVIOUS_SEGV.get(),
        libc::SIGBUS => PREVIOUS_BUS.get(),
        _ => None,
    }
}

/// Installs the fault handler (once per process; later calls return the first call's outcome).
pub fn install() -> Result<Copier, InstallError> {
    INSTALLED.get_or_init(install_once).clone().map(|()| Copier { _installed: () })
}

fn install_once() -> Result<(), InstallError> {
    for (sig, slot) in [(libc::SIGSEGV, &PREVIOUS_SEGV), (libc::SIGBUS, &PREVIOUS_BUS)] {
        // SAFETY: a zeroed sigaction is a valid value (SIG_DFL, empty mask, no flags); sigaction
        // with a null new action only reads the current one into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            return Err(InstallError::Sigaction(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)));
        }
        // Set before the handler is installed: the handler never sees the slot empty.
        let _ = slot.set(old);
        // SAFETY: as above for the zeroed value; `on_fault` has the SA_SIGINFO signature.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = on_fault as *const () as usize;
        // Not SA_NODEFER: while the handler (or a handler it chains to) runs, the same signal is
        // blocked, so a fault inside it makes the kernel kill the process instead of recursing.
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset_t owned by `new`.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        let mut displaced: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigaction values owned by this frame.
        if unsafe { libc::sigaction(sig, &new, &mut displaced) } != 0 {
            return Err(InstallError::Sigaction(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)));
        }
        if displaced.sa_sigaction != old.sa_sigaction || displaced.sa_flags != old.sa_flags {
            // Someone installed a handler between the two calls: put theirs back rather than
            // chain to a stale one.
            // SAFETY: `displaced` is the action the kernel just returned.
            unsafe { libc::sigaction(sig, &displaced, std::ptr::null_mut()) };
            return Err(InstallError::Raced(sig));
        }
    }
    Ok(())
}

/// The `SIGSEGV`/`SIGBUS` handler.
///
/// Async-signal-safe: it reads the saved context the kernel gave it, two code addresses, and the
/// previous actions (set before it was installed, never changed); it writes only the saved
/// context of the interrupted thread. No lock, no allocation, no thread-local. Any number of
/// threads may run it at once (each on its own context). A second signal of another kind (a
/// `SIGBUS` while handling a `SIGSEGV`) nests without shared state to corrupt.
extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes valid `siginfo_t` and `ucontext_t` pointers to an SA_SIGINFO
    // handler; they live on the handler's stack frame for its duration.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as above; the saved registers of the interrupted thread.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let (start, fixup) = routine_range();
    // si_code > 0: raised by the kernel for a fault (SEGV_MAPERR, SEGV_ACCERR, BUS_ADRERR, ...);
    // kill/tgkill/sigqueue give SI_USER (0) or negative codes and are not faults of the routine.
    if code > 0 && (start..fixup).contains(&rip) {
        let tag = if sig == libc::SIGBUS { SIGBUS_TAG } else { 0 };
        gregs[libc::REG_RDX as usize] = (addr | tag) as i64;
        gregs[libc::REG_RIP as usize] = fixup as i64;
        return;
    }
    chain(sig, info, ctx);
}

/// Hands a fault that is not the routine's to the action installed before ours, as the kernel
/// would have.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    #[cfg(feature = "fault-injection")]
    if PLANT_DO_NOT_CHAIN.load(std::sync::atomic::Ordering::Relaxed) {
        restore_default(sig);
        return;
    }
    let Some(prev) = previous(sig) else {
        // Unreachable (the slot is set before the handler is installed); fall back to the
        // default action.
        restore_default(sig);
        return;
    };
    if prev.sa_sigaction == libc::SIG_DFL || prev.sa_sigaction == libc::SIG_IGN {
        // Put the previous action back and return: the faulting instruction runs again and the
        // kernel takes the default action (a fault is never ignored: the kernel resets SIG_IGN to
        // SIG_DFL for a forced fault signal). A signal sent by kill() is not repeated: with
        // SIG_DFL it would have killed the process, so do that.
        // SAFETY: `prev` is a sigaction the kernel returned at install time.
        unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
        // SAFETY: si_code read as in `on_fault`.
        if unsafe { (*info).si_code } <= 0 && prev.sa_sigaction == libc::SIG_DFL {
            // SAFETY: raising a signal at the calling thread; the default action applies now.
            unsafe { libc::raise(sig) };
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO, sa_sigaction is a handler of this signature (the one that was
        // installed before ours); it gets the same arguments the kernel gave us.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        handler(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO, sa_sigaction holds an `sa_handler` of this signature.
        let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        handler(sig);
    }
}

/// PLANTED FAULT switch (feature `fault-injection`, tests only): see [`plant_fault_do_not_chain`].
#[cfg(feature = "fault-injection")]
static PLANT_DO_NOT_CHAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// **Planted fault, for tests only**: from now on the handler does not chain to the previous
/// handler (it restores the default action instead), as a handler that forgot to would. Proves the
/// chaining tests can fail.
#[cfg(feature = "fault-injection")]
pub fn plant_fault_do_not_chain() {
    PLANT_DO_NOT_CHAIN.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn restore_default(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigaction value.
    unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_alignment() {
        let c = install().unwrap();
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [
            0usize, 1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 63, 64, 65, 127, 128, 129, 255, 256, 1000, 2047,
            2048, 2049, 3000,
        ] {
            for off in [0usize, 1, 3, 8] {
                let mut dst = vec![0u8; 4096 + 16];
                // SAFETY: both ranges lie inside owned vectors, dst is exclusively borrowed.
                unsafe { c.copy(dst.as_mut_ptr().add(off), src.as_ptr().add(off), len) }.unwrap();
                assert_eq!(&dst[off..off + len], &src[off..off + len], "len {len} off {off}");
                assert!(dst[..off].iter().all(|&b| b == 0) && dst[off + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn install_is_idempotent() {
        install().unwrap();
        install().unwrap();
        // SAFETY: reading the current action only.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut now) };
        assert_eq!(now.sa_sigaction, on_fault as *const () as usize);
        assert_ne!(
            PREVIOUS_SEGV.get().unwrap().sa_sigaction,
            on_fault as *const () as usize,
            "never chains to itself"
        );
    }
}
