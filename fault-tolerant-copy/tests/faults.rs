//! The copy survives every fault of its own accesses, and only those.
//!
//! - unmapped, read-only and truncated (SIGBUS) memory: the copy returns a `Fault` that says how
//!   much was copied and where it faulted;
//! - memory unmapped by another thread under a copy loop: the loop sees a `Fault`, no crash;
//! - outside the routine, faults behave as without the crate (subprocess tests, which re-run this
//!   binary with `FTC_CHILD` set): a null write kills the process with SIGSEGV, a stack overflow
//!   in a thread still aborts with Rust's "has overflowed its stack"; the control runs a null
//!   read through the routine in the same harness and exits normally.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fault_tolerant_copy::{install, Fault};

const PAGE: usize = 4096;

/// `pages` fresh anonymous read-write pages.
fn map(pages: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn unmap(p: *mut u8, pages: usize) {
    // SAFETY: `p` is a mapping this test made; no reference points into it.
    assert_eq!(unsafe { libc::munmap(p.cast(), pages * PAGE) }, 0);
}

/// Two pages, the second taken away again (nothing is mapped there afterwards unless another
/// thread of this binary maps something into the hole; the tests below then only assert what
/// holds either way, or use PROT_NONE instead).
fn page_then_guard() -> *mut u8 {
    let p = map(2);
    // SAFETY: the second page is ours; PROT_NONE makes every access to it fault.
    assert_eq!(unsafe { libc::mprotect(p.add(PAGE).cast(), PAGE, libc::PROT_NONE) }, 0);
    p
}

#[test]
fn a_read_running_into_an_inaccessible_page_copies_up_to_it() {
    let c = install().unwrap();
    let p = page_then_guard();
    // SAFETY: first page ours and writable.
    unsafe { std::ptr::write_bytes(p, 0x5a, PAGE) };
    for (before, after) in
        [(1usize, 1usize), (8, 8), (20, 12), (40, 8), (100, 28), (1000, 1000), (3000, 5000)]
    {
        let mut buf = vec![0u8; before + after];
        // SAFETY: the source is our mapping (readable part, then PROT_NONE), no &mut into it.
        let r = unsafe { c.read(&mut buf, p.add(PAGE - before)) };
        let f = r.expect_err("the guard page faults");
        assert_eq!(f.signal, libc::SIGSEGV);
        assert_eq!(f.addr, p as usize + PAGE, "faults at the guard page's first byte");
        // A copy reports at most the bytes before the page as not copied: the 1- and 8-byte steps
        // exactly, a 16- or 64-byte step or a rep movsb at least the step the fault stopped.
        assert!(f.not_copied >= after && f.not_copied <= before + after, "{f:?} {before} {after}");
        let copied = buf.len() - f.not_copied;
        assert!(buf[..copied].iter().all(|&b| b == 0x5a));
    }
    unmap(p, 2);
}

#[test]
fn a_write_into_a_read_only_page_is_a_fault() {
    let c = install().unwrap();
    let p = map(1);
    // SAFETY: our page, made read-only.
    assert_eq!(unsafe { libc::mprotect(p.cast(), PAGE, libc::PROT_READ) }, 0);
    // SAFETY: the destination is our read-only mapping: the store faults, nothing is written.
    let f = unsafe { c.write(p.add(16), &[1u8; 64]) }.expect_err("read-only");
    assert_eq!((f.not_copied, f.addr, f.signal), (64, p as usize + 16, libc::SIGSEGV));
    // SAFETY: readable; no writes happened.
    assert_eq!(unsafe { std::ptr::read_volatile(p.add(16)) }, 0);
    unmap(p, 1);
}

#[test]
fn a_page_of_a_truncated_memfd_is_a_sigbus_fault() {
    let c = install().unwrap();
    // SAFETY: plain syscalls on an fd this test owns.
    let fd = unsafe { libc::memfd_create(c"ftc-truncate".as_ptr(), 0) };
    assert!(fd >= 0);
    assert_eq!(unsafe { libc::ftruncate(fd, 2 * PAGE as i64) }, 0);
    // SAFETY: a fresh shared mapping of the memfd.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    }
    .cast::<u8>();
    assert_ne!(p.cast(), libc::MAP_FAILED);
    let mut buf = [0u8; 256];
    // SAFETY: our mapping, fully backed now.
    unsafe { c.read(&mut buf, p.add(PAGE)) }.unwrap();
    // Truncate to one page: the second page of the mapping has no file behind it any more.
    assert_eq!(unsafe { libc::ftruncate(fd, PAGE as i64) }, 0);
    // SAFETY: still our mapping; the access raises SIGBUS, which the routine survives.
    let f = unsafe { c.read(&mut buf, p.add(PAGE)) }.expect_err("beyond EOF");
    assert_eq!((f.not_copied, f.addr, f.signal), (256, p as usize + PAGE, libc::SIGBUS));
    // SAFETY: as above, for writes.
    let f = unsafe { c.write(p.add(PAGE + 8), &buf[..16]) }.expect_err("beyond EOF");
    assert_eq!((f.not_copied, f.signal), (16, libc::SIGBUS));
    // The first page still works.
    unsafe { c.write(p, &buf[..16]) }.unwrap();
    unmap(p, 2);
    unsafe { libc::close(fd) };
}

#[test]
fn memory_unmapped_under_a_copy_loop_is_a_fault_not_a_crash() {
    let c = install().unwrap();
    let pages = 16;
    let p = map(pages) as usize;
    let copies = AtomicU64::new(0);
    let unmapped = AtomicBool::new(false);
    let f = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; PAGE];
            let mut x = 1u64;
            loop {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let at = p + (x >> 33) as usize % (pages * PAGE - 256);
                // SAFETY: `at` is inside our mapping until the other thread unmaps it; after,
                // the access faults (or reads whatever another thread mapped there, which the
                // routine only reads: no Rust reference is made).
                match unsafe { c.read(&mut buf[..256], at as *const u8) } {
                    Ok(()) => {
                        copies.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(f) => {
                        // Faults only once the page was unmapped (no false recovery before).
                        assert!(unmapped.load(Ordering::SeqCst), "{f:?} before the unmap");
                        return f;
                    }
                }
            }
        });
        while copies.load(Ordering::SeqCst) < 10_000 {
            std::hint::spin_loop();
        }
        unmapped.store(true, Ordering::SeqCst);
        unmap(p as *mut u8, pages);
        reader.join().unwrap()
    });
    assert!(copies.load(Ordering::SeqCst) >= 10_000);
    assert!(f.addr >= p && f.addr < p + pages * PAGE, "{f:?}");
    assert_eq!(f.signal, libc::SIGSEGV);
}

// ------------------------------------------------------------------------------------------------
// Faults outside the routine: subprocesses.
// ------------------------------------------------------------------------------------------------

const CHILD: &str = "FTC_CHILD";

/// Runs test `name` of this binary alone in a child with `FTC_CHILD=name`; returns its status
/// and stderr.
fn run_child(name: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn in_child(name: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(name)
}

#[test]
fn a_null_write_outside_the_routine_still_kills_with_sigsegv() {
    const NAME: &str = "a_null_write_outside_the_routine_still_kills_with_sigsegv";
    if in_child(NAME) {
        install().unwrap();
        // SAFETY: deliberately not: the write faults and the process must die of SIGSEGV.
        unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>().wrapping_add(2), 0xdead) };
        std::process::exit(0);
    }
    let (status, stderr) = run_child(NAME);
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{stderr}");
}

#[test]
fn control_a_null_read_inside_the_routine_is_survived_in_the_same_harness() {
    const NAME: &str = "control_a_null_read_inside_the_routine_is_survived_in_the_same_harness";
    if in_child(NAME) {
        let c = install().unwrap();
        let mut b = [0u8; 8];
        // SAFETY: nothing is mapped at address 16; the routine's load faults and is recovered.
        let r = unsafe { c.read(&mut b, 16 as *const u8) };
        assert_eq!(r, Err(Fault { not_copied: 8, addr: 16, signal: libc::SIGSEGV }));
        std::process::exit(42);
    }
    let (status, stderr) = run_child(NAME);
    assert_eq!(status.code(), Some(42), "{status:?}\n{stderr}");
}

#[inline(never)]
#[allow(unconditional_recursion)] // the point: overflow the stack
fn recurse(depth: u64) -> u64 {
    let pad = [depth; 64];
    std::hint::black_box(&pad);
    recurse(depth + 1).wrapping_add(std::hint::black_box(pad[7]))
}

#[test]
fn a_stack_overflow_in_a_thread_still_aborts_with_rusts_message() {
    const NAME: &str = "a_stack_overflow_in_a_thread_still_aborts_with_rusts_message";
    if in_child(NAME) {
        install().unwrap();
        let t = std::thread::Builder::new().name("deep".into()).stack_size(256 << 10).spawn(|| recurse(0));
        let _ = t.unwrap().join();
        std::process::exit(0);
    }
    let (status, stderr) = run_child(NAME);
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}\n{stderr}");
    assert!(overflow_message(&stderr), "{stderr}");
}

/// Rust's stack-overflow guard's message for thread `deep` ("thread 'deep' (<tid>) has overflowed
/// its stack" on recent toolchains, without the tid on older ones).
fn overflow_message(stderr: &str) -> bool {
    stderr.lines().any(|l| l.starts_with("thread 'deep'") && l.ends_with("has overflowed its stack"))
}

/// PLANTED FAULT: the handler stops chaining (it restores the default action instead of calling
/// the previous handler); the checker of the test above must see the difference: the overflow
/// kills the child with SIGSEGV, without Rust's message.
#[cfg(feature = "fault-injection")]
#[test]
fn planted_a_handler_that_does_not_chain_loses_rusts_stack_overflow_message() {
    const NAME: &str = "planted_a_handler_that_does_not_chain_loses_rusts_stack_overflow_message";
    if in_child(NAME) {
        install().unwrap();
        fault_tolerant_copy::plant_fault_do_not_chain();
        let t = std::thread::Builder::new().name("deep".into()).stack_size(256 << 10).spawn(|| recurse(0));
        let _ = t.unwrap().join();
        std::process::exit(0);
    }
    let (status, stderr) = run_child(NAME);
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{stderr}");
    assert!(!overflow_message(&stderr), "{stderr}");
}
