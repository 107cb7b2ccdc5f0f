//! The copy of [`CopyPath::Syscall`]: `process_vm_readv`/`process_vm_writev` on this process
//! ([`syscall_copy`]), and the process id it names, cached across calls ([`own_pid`]).

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(doc)]
use super::CopyPath;
use super::Direction;

/// This process's id, asked of the kernel once per process (`getpid` is a system call of its
/// own, which doubled the syscall path's calls per access). A forked child forgets the parent's
/// (a `pthread_atfork` child handler clears it) and asks again, so it never copies from its
/// parent's memory.
pub(super) fn own_pid() -> libc::pid_t {
    /// The cache: 0 = not asked yet, [`NO_CACHE`] = never cache (no fork handler).
    static PID: AtomicU64 = AtomicU64::new(0);
    const NO_CACHE: u64 = u64::MAX;
    static FORGET_IN_CHILD: std::sync::Once = std::sync::Once::new();
    extern "C" fn forget() {
        // Async-signal-safe: one atomic store.
        PID.store(0, Ordering::Relaxed);
    }
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 && cached != NO_CACHE {
        return cached as libc::pid_t;
    }
    FORGET_IN_CHILD.call_once(|| {
        // SAFETY: registers a child handler that only stores to an atomic, a plain function
        // valid for the life of the process.
        if unsafe { libc::pthread_atfork(None, None, Some(forget)) } != 0 {
            PID.store(NO_CACHE, Ordering::Relaxed);
        }
    });
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // Cached only if nothing was (NO_CACHE stays).
    let _ = PID.compare_exchange(0, pid as u64, Ordering::Relaxed, Ordering::Relaxed);
    pid
}

/// [`CopyPath::Syscall`]: `run` bytes between `hva` and the buffer of `dir` at offset `done`, with
/// `process_vm_readv`/`writev` on this process. `Err((bytes not copied, None))` when the kernel
/// stopped at memory that is not mapped (a short copy, or EFAULT), `Err((run, Some(errno)))` when it
/// refused the copy for another reason.
pub(super) fn syscall_copy(
    hva: usize,
    run: usize,
    dir: Direction,
    done: usize,
) -> Result<(), (usize, Option<i32>)> {
    let (local, write) = match dir {
        Direction::Read(buf) => (buf.wrapping_add(done), false),
        Direction::Write(buf) => (buf.wrapping_add(done).cast_mut(), true),
    };
    let local_iov = libc::iovec { iov_base: local.cast(), iov_len: run };
    let remote_iov = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: run };
    // SAFETY: `local` points at `run` bytes inside the caller's buffer (writable for a read, only
    // read for a write). The remote side is this process's own memory, which the kernel checks
    // (EFAULT if not mapped); no Rust reference to guest memory is created.
    let copied = unsafe {
        if write {
            libc::process_vm_writev(own_pid(), &local_iov, 1, &remote_iov, 1, 0)
        } else {
            libc::process_vm_readv(own_pid(), &local_iov, 1, &remote_iov, 1, 0)
        }
    };
    if copied == run as isize {
        Ok(())
    } else if copied >= 0 {
        Err((run - copied as usize, None))
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EFAULT) | None => Err((run, None)),
            Some(e) => Err((run, Some(e))),
        }
    }
}
