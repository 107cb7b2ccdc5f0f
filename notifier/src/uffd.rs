//! The few userfaultfd operations the monitor needs, over the kernel's own definitions.
//!
//! # Why this is written by hand
//!
//! The `userfaultfd` crate runs bindgen (and so needs libclang) at build time on every build,
//! whatever its features; that made a fresh machine fail the first `cargo run` with "Unable to
//! find libclang". The surface the monitor uses is small and stable kernel ABI: create a
//! userfaultfd (the syscall, or `/dev/userfaultfd`'s `USERFAULTFD_IOC_NEW` where the syscall is
//! refused), the `UFFDIO_API` handshake with the non-cooperative event features,
//! `UFFDIO_REGISTER` in write-protect mode, `UFFDIO_UNREGISTER`, and reading `struct uffd_msg`.
//! The structures and ioctl numbers come from `linux-raw-sys` (generated from the kernel's uapi
//! headers ahead of time: no build script), so nothing here restates a layout.
//!
//! See `docs/host.md` ("userfaultfd") for what each event promises on this kernel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_range, uffdio_register, uffdio_writeprotect, UFFDIO_REGISTER_MODE_WP,
    UFFD_API, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP, UFFD_USER_MODE_ONLY,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WRITEPROTECT};

/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` (include/uapi/linux/userfaultfd.h). linux-raw-sys
/// does not list the ioctls of the `/dev/userfaultfd` misc device.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

/// The events the monitor asks for: every teardown kind a non-cooperative manager can see.
pub const EVENT_FEATURES: u64 =
    (UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP) as u64;

/// One message read from a userfaultfd, with plain addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// `UFFD_EVENT_REMOVE`: `madvise(DONTNEED/REMOVE/FREE)` of `[start, end)`; read before the zap.
    Remove {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// `UFFD_EVENT_UNMAP`: `munmap` (or `mmap(MAP_FIXED)` over) `[start, end)`; sent after it.
    Unmap {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// `UFFD_EVENT_REMAP`: `mremap` moved `len` bytes from `from` to `to`; sent after the move.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Bytes moved.
        len: usize,
    },
    /// Any other event (a page fault, a fork): the event code.
    Other(u8),
}

impl Message {
    fn decode(m: &uffd_msg) -> Message {
        // The kernel fills the union member that `event` names; every member is plain integers.
        match u32::from(m.event) {
            UFFD_EVENT_REMOVE => {
                // SAFETY: REMOVE fills `arg.remove`; reading plain integers is always defined.
                let r = unsafe { m.arg.remove };
                Message::Remove { start: r.start as usize, end: r.end as usize }
            }
            UFFD_EVENT_UNMAP => {
                // SAFETY: UNMAP fills `arg.remove` (the kernel uses that member for both).
                let r = unsafe { m.arg.remove };
                Message::Unmap { start: r.start as usize, end: r.end as usize }
            }
            UFFD_EVENT_REMAP => {
                // SAFETY: REMAP fills `arg.remap`.
                let r = unsafe { m.arg.remap };
                Message::Remap { from: r.from as usize, to: r.to as usize, len: r.len as usize }
            }
            other => Message::Other(other as u8),
        }
    }
}

/// An open, API-negotiated userfaultfd (close-on-exec, non-blocking).
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens a userfaultfd **without** `UFFD_USER_MODE_ONLY` (with it, a guest touching a
    /// missing page makes `KVM_RUN` fail with EFAULT and no message is sent), close-on-exec and
    /// non-blocking, and negotiates the API with `features`, all of which must be granted.
    ///
    /// Tries the `userfaultfd(2)` syscall first and `/dev/userfaultfd` when the syscall is
    /// refused (the device's permissions, not `vm.unprivileged_userfaultfd`, govern it).
    pub fn open(features: u64) -> io::Result<Userfaultfd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        debug_assert_eq!(flags & UFFD_USER_MODE_ONLY as i32, 0);
        // SAFETY: the syscall takes one integer argument and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if fd >= 0 {
            fd
        } else {
            let syscall_err = io::Error::last_os_error();
            Self::open_device(flags).map_err(|dev_err| {
                io::Error::new(
                    dev_err.kind(),
                    format!("userfaultfd(2): {syscall_err}; /dev/userfaultfd: {dev_err}"),
                )
            })?
        };
        // SAFETY: `fd` is a descriptor we just created and own alone.
        let uffd = Userfaultfd { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        let mut api = uffdio_api { api: UFFD_API as u64, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which lives for the call.
        if unsafe { libc::ioctl(uffd.fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if api.features & features != features {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel grants features {:#x}, {features:#x} were asked for", api.features),
            ));
        }
        Ok(uffd)
    }

    fn open_device(flags: i32) -> io::Result<RawFd> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a new
        // descriptor or -1; `dev` stays open for the call.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Registers `[start, start + len)` in write-protect mode. With nothing write-protected, page
    /// faults stay in the kernel and only the non-cooperative events are delivered.
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: start as u64, len: len as u64 },
            mode: UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` that lives for the call;
        // it touches no memory of the range itself.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Unregisters `[start, start + len)`.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let range = uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` that lives for the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether some mapping in `[start, start + len)` is registered in write-protect mode (with
    /// this or another userfaultfd of the process), asked without changing anything: an
    /// un-write-protect (`UFFDIO_WRITEPROTECT` with mode 0) of a range where nothing is
    /// write-protected leaves every page as it was, and fails with `ENOENT` when no mapping of the
    /// range is registered in WP mode (an unmapped range, or memory nobody registered), which is
    /// `Ok(false)` here. Fails with `EAGAIN` while a non-cooperative event of the process is
    /// between its queueing and its completion (the kernel's `mmap_changing`).
    pub fn is_registered_wp(&self, start: usize, len: usize) -> io::Result<bool> {
        let mut wp =
            uffdio_writeprotect { range: uffdio_range { start: start as u64, len: len as u64 }, mode: 0 };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `uffdio_writeprotect` that lives for the call; with
        // mode 0 on memory that nobody write-protected it changes no page's contents or access.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    /// Gives the userfaultfd up for good, at once, while other threads may still hold `self`: the
    /// descriptor number is pointed at an inert eventfd (`dup3`), so the kernel releases the
    /// userfaultfd (it had no other reference). Releasing unregisters every range registered with
    /// it and wakes every thread waiting for one of its events to be read, so nothing can block on
    /// it any more. Afterwards ioctls on `self` fail (`ENOTTY`) and reads return no message.
    pub fn disable(&self) -> io::Result<()> {
        // SAFETY: eventfd takes no pointer.
        let inert = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if inert < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup3 atomically makes our own descriptor number refer to the eventfd; the number
        // stays owned by `self.fd` (which later closes the eventfd), so no other owner's
        // descriptor is touched. `inert` is ours and closed right after.
        let r = unsafe { libc::dup3(inert, self.fd.as_raw_fd(), libc::O_CLOEXEC) };
        let err = io::Error::last_os_error();
        // SAFETY: closes the descriptor we created above and nobody else uses.
        unsafe { libc::close(inert) };
        if r < 0 {
            return Err(err);
        }
        Ok(())
    }

    /// Reads up to `max` messages into `out` (cleared first). Returns how many were read; 0 when
    /// none is pending (the descriptor is non-blocking).
    pub fn read(&self, out: &mut Vec<Message>, max: usize) -> io::Result<usize> {
        out.clear();
        const MAX: usize = 256;
        let max = max.clamp(1, MAX);
        // On the reader's stack, not allocated per read: the monitor reads in a loop.
        let mut buf = [std::mem::MaybeUninit::<uffd_msg>::uninit(); MAX];
        let size = std::mem::size_of::<uffd_msg>();
        // SAFETY: `buf` owns `MAX * size >= max * size` writable bytes for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), max * size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let n = n as usize;
        if n % size != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short uffd_msg read: {n} bytes"),
            ));
        }
        // SAFETY: the kernel wrote `n / size` whole messages at the start of `buf`, and `uffd_msg`
        // is plain integers (any bytes are a valid value).
        out.extend(buf[..n / size].iter().map(|m| Message::decode(unsafe { m.assume_init_ref() })));
        Ok(n / size)
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Registers `[start, end)` with `u` for the events the monitor reads (write-protect mode, which
/// also reports unmaps, remaps and removes), as a notifier error naming the range. Both the
/// monitor (at start) and the address space (a region added later) register through this.
pub(crate) fn register_range(u: &Userfaultfd, start: usize, end: usize) -> Result<(), crate::Error> {
    u.register_wp(start, end - start)
        .map_err(|e| crate::Error::Uffd(format!("UFFDIO_REGISTER(WP) {start:#x}..{end:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_is_the_kernels_32_bytes() {
        assert_eq!(std::mem::size_of::<uffd_msg>(), 32);
    }

    #[test]
    fn decodes_each_event_kind() {
        // SAFETY: plain integers; all-zero is valid.
        let mut m: uffd_msg = unsafe { std::mem::zeroed() };
        m.event = UFFD_EVENT_REMAP as u8;
        m.arg.remap.from = 0x1000;
        m.arg.remap.to = 0x9000;
        m.arg.remap.len = 0x2000;
        assert_eq!(Message::decode(&m), Message::Remap { from: 0x1000, to: 0x9000, len: 0x2000 });
        m.event = UFFD_EVENT_UNMAP as u8;
        m.arg.remove.start = 0x4000;
        m.arg.remove.end = 0x6000;
        assert_eq!(Message::decode(&m), Message::Unmap { start: 0x4000, end: 0x6000 });
        m.event = UFFD_EVENT_REMOVE as u8;
        assert_eq!(Message::decode(&m), Message::Remove { start: 0x4000, end: 0x6000 });
        m.event = 18;
        assert_eq!(Message::decode(&m), Message::Other(18));
    }
}
