//! The zapvm test guest: a freestanding x86-64 program the VMM embeds and runs on every vCPU.
//!
//! Contract: `guest/abi` (`zapvm-guest-abi`). Each vCPU enters `_start` (see [`arch`]) with its
//! index in `rdi` and the [`BootInfo`] address in `rsi`, normally at CPL 3. [`guest_main`] checks
//! the boot info, lets vCPU 0 fill the exception gates of the IDT, says hello and runs the
//! requested [`Workload`] over the vCPU's slice of the work ranges (see [`workload`]). Everything
//! the guest has to say goes out as ucalls: one `out` of a record's address to the ucall port.
//!
//! After its final ucall (Done or Failure) a vCPU issues that same ucall again, forever: the VMM
//! stops the vCPU at the first one, and if it does not, it keeps getting exits (a chance to stop
//! the vCPU) instead of a vCPU spinning silently. `hlt` is not an option at CPL 3 (#GP). An
//! exception is reported by the ring-0 handler, which then halts (`hlt` in a loop).
//!
//! The guest has no allocator, no mutable statics and no `.data`/`.bss`: all its state is on the
//! vCPU's own stack, so any number of vCPUs can run it at once.
#![no_std]
#![no_main]

mod arch;
mod balloon;
mod kick;
mod mem;
mod msg;
mod phased;
mod stress;
mod touch_rate;
mod virtio;
mod virtio_mem;
mod workload;

use core::fmt;
use core::panic::PanicInfo;

use guest_abi::{BootInfo, Ucall, UcallKind, Workload, ABI_VERSION, BOOT_INFO_MAGIC, MAX_RANGES};

use crate::msg::MsgBuf;

/// Sends a ucall of `kind` with `args` (the rest zero) and no message.
pub fn report(vcpu: u64, kind: UcallKind, args: &[u64]) {
    let mut u = Ucall::new(kind, vcpu);
    u.args[..args.len()].copy_from_slice(args);
    arch::ucall(&mut u);
}

/// Sends a ucall of `kind` with `args` (the rest zero) that the VMM answers in the record itself
/// (a Rendezvous), and returns the record's `args` as the VMM left them when it resumed the vCPU.
pub fn exchange(vcpu: u64, kind: UcallKind, args: &[u64]) -> [u64; 6] {
    let mut u = Ucall::new(kind, vcpu);
    u.args[..args.len()].copy_from_slice(args);
    arch::ucall(&mut u);
    // SAFETY: `u` is a live, aligned local. The VMM wrote its reply into it while the vCPU was
    // stopped in the `out`, behind the compiler's back: the `asm!` in `arch::ucall` is a memory
    // barrier for it (its address was exposed to the asm), and the volatile read makes sure the
    // reply is read from memory rather than from what the compiler remembers storing.
    unsafe { core::ptr::addr_of!(u.args).read_volatile() }
}

/// Sends the final ucall `u` again and again; the VMM stops the vCPU at the first one.
fn finish(u: &mut Ucall) -> ! {
    loop {
        arch::ucall(u);
    }
}

/// Sends a final ucall of `kind` with `args` and `msg`.
fn finish_with(vcpu: u64, kind: UcallKind, args: &[u64], msg: &MsgBuf) -> ! {
    let mut u = Ucall::new(kind, vcpu);
    u.args[..args.len()].copy_from_slice(args);
    let text = msg.as_bytes();
    u.msg_gpa = text.as_ptr() as u64;
    u.msg_len = text.len() as u64;
    finish(&mut u)
}

/// Ends the workload with a Done ucall (`args[0]` = pages, `args[1]` = checksum).
pub fn done(vcpu: u64, pages: u64, checksum: u64) -> ! {
    let mut u = Ucall::new(UcallKind::Done, vcpu);
    u.args[0] = pages;
    u.args[1] = checksum;
    finish(&mut u)
}

/// Ends the workload with a Failure ucall whose message is `args`, formatted on the stack.
pub fn fail(vcpu: u64, args: fmt::Arguments<'_>) -> ! {
    let msg = MsgBuf::format(args);
    finish_with(vcpu, UcallKind::Failure, &[], &msg)
}

/// The Rust entry point, called by `_start` on every vCPU (see the crate docs).
extern "C" fn guest_main(vcpu: u64, boot: *const BootInfo) -> ! {
    let entry_tsc = arch::rdtsc();

    // SAFETY: the VMM wrote a BootInfo at `boot` (identity-mapped, 8-byte aligned) before starting
    // any vCPU and does not change it while they run; the guest only reads it. Whether it is the
    // right kind of data is checked through `magic` below; every bit pattern is a valid BootInfo.
    let boot = unsafe { boot.read_volatile() };
    if boot.magic != BOOT_INFO_MAGIC {
        fail(
            vcpu,
            format_args!("boot info: bad magic {:#018x} (expected {:#018x})", boot.magic, BOOT_INFO_MAGIC),
        );
    }
    if boot.abi_version != ABI_VERSION {
        fail(
            vcpu,
            format_args!(
                "boot info: VMM speaks ABI version {}, this guest version {}",
                boot.abi_version, ABI_VERSION
            ),
        );
    }

    // vCPU 0 fills the exception gates; the others wait until it has (rendezvous), so that an
    // exception on any vCPU is reported by its handler rather than becoming a triple fault.
    if boot.idt_gpa != 0 {
        if vcpu == 0 {
            // SAFETY: idt_gpa is the IDT page the VMM loaded into every vCPU's IDTR, identity
            // mapped and user-writable, and vCPU 0 is the only writer.
            unsafe { arch::install_exception_gates(boot.idt_gpa) };
        } else {
            // SAFETY: as above; other vCPUs only read it.
            unsafe { arch::wait_for_exception_gates(boot.idt_gpa) };
        }
    }

    report(vcpu, UcallKind::Hello, &[ABI_VERSION, entry_tsc]);

    if boot.nr_work > MAX_RANGES as u64 {
        fail(vcpu, format_args!("boot info: nr_work {} > {}", boot.nr_work, MAX_RANGES));
    }
    if vcpu >= boot.nr_vcpus {
        fail(vcpu, format_args!("boot info: vCPU {} but nr_vcpus {}", vcpu, boot.nr_vcpus));
    }

    match Workload::from_raw(boot.workload) {
        Some(Workload::Verify) => workload::verify(vcpu, &boot),
        Some(Workload::Touch) => workload::touch(vcpu, &boot),
        Some(Workload::DiscardVerify) => workload::discard_verify(vcpu, &boot),
        Some(Workload::AssertFail) => {
            assert_eq!(core::hint::black_box(1) + 1, 3, "deliberate assertion failure requested by the VMM");
            fail(vcpu, format_args!("the deliberate assertion did not fail"))
        }
        Some(Workload::Exception) => {
            // SAFETY: raises #UD on purpose; the exception path reports it and never returns.
            unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
        }
        Some(Workload::Balloon) => balloon::run(vcpu, &boot),
        Some(Workload::Stress) => stress::run(vcpu, &boot),
        Some(Workload::VirtioMem) => virtio_mem::run(vcpu, &boot),
        Some(Workload::TouchRate) => touch_rate::run(vcpu, &boot),
        Some(Workload::Phased) => phased::run(vcpu, &boot),
        Some(Workload::Kick) => kick::run(vcpu, &boot),
        None => fail(vcpu, format_args!("unknown workload {} in boot info", boot.workload)),
    }
}

/// Reports a panic as a Failure ucall: "panicked at FILE:LINE:COL: MESSAGE", truncated to
/// `MAX_MESSAGE_LEN` bytes. The vCPU index comes from the marker `_start` left on the stack.
#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let vcpu = arch::current_vcpu();
    let msg = match info.location() {
        Some(at) => MsgBuf::format(format_args!(
            "panicked at {}:{}:{}: {}",
            at.file(),
            at.line(),
            at.column(),
            info.message()
        )),
        None => MsgBuf::format(format_args!("panicked: {}", info.message())),
    };
    finish_with(vcpu, UcallKind::Failure, &[], &msg)
}
