#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// One thread's reader slot, alone on its cache lines (128 bytes: a line and the one the
/// adjacent-line prefetcher pairs with it), so readers of different threads share no line.
#[repr(align(128))]
pub struct Slot {
    /// Sections entered plus sections left: odd while the owner is inside one (S1).
    count: AtomicU64,
    /// The region (its `Entries` address) of the section in progress, or of the last one.
    region: AtomicUsize,
    /// Held by a live thread (S1).
    owned: AtomicBool,
    /// The next slot of the list (set before the slot is published, never changed after).
    next: AtomicPtr<Slot>,
    /// Position in the list, from 0: the hit-counter shard of the owner.
    index: usize,
    /// Planted fault, loom models only: this reader has no barrier (see [`PlantedFault`]).
    #[cfg(loom)]
    no_barrier: bool,
}

/// An open read section of a slot; leaving it (drop) ends the section.
#[must_use = "the section ends when this is dropped"]
pub struct Section<'s> {
    slot: &'s Slot,
    left: u64,
}

impl Slot {
    /// Opens a read section over `region` (S1: by the slot's owner, not inside another
    /// section). The caller looks at the region's bits only after this returns (S2).
    #[inline]
    pub fn enter(&self, region: usize) -> Section<'_> {
        let count = self.count.load(Ordering::Relaxed);
        debug_assert!(count.is_multiple_of(2), "read sections do not nest (S1)");
        self.region.store(region, Ordering::Relaxed);
        // Release: a writer that reads this odd count (acquire) also sees `region` above.
        self.count.store(count + 1, Ordering::Release);
        // S2: the announcement above is ordered before the caller's look at the bits.
        #[cfg(loom)]
        if self.no_barrier {
            return Section { slot: self, left: count + 2 };
        }
        light_barrier();
        Section { slot: self, left: count + 2 }
    }

    /// The slot's position in its list (unique among the list's slots).
    #[inline]
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Section<'_> {
    /// Leaves the section: release, so the section's copy is complete before a writer that
    /// reads this count (acquire) returns from its wait (M1). (The copy routine's loads and
    /// stores, `rep movsb` included, are ordered before a later store on x86.)
    #[inline]
    fn drop(&mut self) {
        self.slot.count.store(self.left, Ordering::Release);
    }
}

/// Planted faults, loom models only (`tests/loom.rs` proves its models catch them).
#[cfg(loom)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedFault {
    /// None.
    None,
    /// The writer returns without waiting for the sections it saw (breaks M1).
    WriterDoesNotWait,
    /// Neither side has its barrier (breaks S2).
    NoBarriers,
}

/// The slots: a list that only grows (slots are recycled when their thread exits, never
/// freed while the list lives), so a writer walks it without a lock.
pub struct SlotList {
    head: AtomicPtr<Slot>,
    len: AtomicUsize,
    #[cfg(loom)]
    planted: PlantedFault,
}

// SAFETY: the list owns its slots (allocated by `claim`, freed only by `drop`); every field of
// a slot is an atomic or immutable after publication, so sharing the list shares atomics.
unsafe impl Send for SlotList {}
// SAFETY: as above.
unsafe impl Sync for SlotList {}

impl SlotList {
    /// An empty list.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        SlotList { head: AtomicPtr::new(std::ptr::null_mut()), len: AtomicUsize::new(0) }
    }

    /// An empty list.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self::with_planted_fault(PlantedFault::None)
    }

    /// **Planted fault, loom models only**: an empty list whose writers have `fault`.
    #[cfg(loom)]
    pub fn with_planted_fault(planted: PlantedFault) -> Self {
        SlotList { head: AtomicPtr::new(std::ptr::null_mut()), len: AtomicUsize::new(0), planted }
    }

    pub(super) fn slots(&self) -> impl Iterator<Item = &Slot> {
        // Acquire: a slot reached is fully initialised (published with release in `claim`).
        let mut at = self.head.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            // SAFETY: a non-null pointer of the list is a slot allocated by `claim` and
            // freed only when the list is dropped, which `&self` rules out.
            let slot = unsafe { at.as_ref() }?;
            at = slot.next.load(Ordering::Acquire);
            Some(slot)
        })
    }

    /// A slot for the calling thread, held until [`SlotList::release`]: a free one of the
    /// list, or a new one appended.
    pub fn claim(&self) -> &Slot {
        barrier_mode();
        for slot in self.slots() {
            // Acquire: the previous owner's last writes (its counts) happen before ours.
            if slot.owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return slot;
            }
        }
        let index = self.len.fetch_add(1, Ordering::Relaxed);
        let slot = Box::into_raw(Box::new(Slot {
            count: AtomicU64::new(0),
            region: AtomicUsize::new(0),
            owned: AtomicBool::new(true),
            next: AtomicPtr::new(std::ptr::null_mut()),
            index,
            #[cfg(loom)]
            no_barrier: self.planted == PlantedFault::NoBarriers,
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `slot` is ours alone until the exchange below publishes it.
            unsafe { (*slot).next.store(head, Ordering::Relaxed) };
            match self.head.compare_exchange_weak(head, slot, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => head = now,
            }
        }
        // SAFETY: published in the list, which frees it only when dropped (after `&self`).
        unsafe { &*slot }
    }

    /// Gives `slot` (claimed from this list, outside any section) back for another thread.
    pub fn release(&self, slot: &Slot) {
        debug_assert!(slot.count.load(Ordering::Relaxed).is_multiple_of(2), "released inside a section");
        slot.owned.store(false, Ordering::Release);
    }

    /// The writer's half of S2 and its wait (M1): called after the bits of `region` were
    /// cleared (and only if a set one was, S4), returns when every read section of `region`
    /// that may have seen them has ended. Never call it inside a section of the caller (S1).
    pub fn wait_for_readers(&self, region: usize) {
        #[cfg(loom)]
        let planted = self.planted;
        #[cfg(loom)]
        if planted != PlantedFault::NoBarriers {
            heavy_barrier();
        }
        #[cfg(not(loom))]
        heavy_barrier();
        for slot in self.slots() {
            let seen = slot.count.load(Ordering::Acquire);
            if seen.is_multiple_of(2) || slot.region.load(Ordering::Relaxed) != region {
                // Idle, or inside a section of another region (a newer section than `seen`
                // may have overwritten the region: then the one `seen` has ended).
                continue;
            }
            #[cfg(loom)]
            if planted == PlantedFault::WriterDoesNotWait {
                continue;
            }
            // S3: until this section ends, whatever the slot does next. Acquire: the
            // section's copy happens before the caller's teardown.
            let mut spins = 0u32;
            while slot.count.load(Ordering::Acquire) == seen {
                backoff(&mut spins);
            }
        }
    }

    /// Ends every section in progress (a forked child: the threads that had them are gone).
    #[cfg(not(loom))]
    fn forget_sections(&self) {
        for slot in self.slots() {
            let count = slot.count.load(Ordering::Relaxed);
            slot.count.store(count + count % 2, Ordering::Release);
        }
    }
}

impl Drop for SlotList {
    fn drop(&mut self) {
        let mut at = self.head.load(Ordering::Acquire);
        while !at.is_null() {
            // SAFETY: every slot of the list came from `Box::into_raw` in `claim` and is
            // freed once, here; `&mut self` means no one holds a slot any more.
            let slot = unsafe { Box::from_raw(at) };
            at = slot.next.load(Ordering::Relaxed);
        }
    }
}

impl Default for SlotList {
    fn default() -> Self {
        Self::new()
    }
}

/// Spins a little (64 pauses), then yields (1000 times), then sleeps (10 us, doubling up to
/// 640 us): a section that has not ended after the spins belongs to a thread that was
/// preempted inside it (two cores shared by many threads, often by this very writer, which
/// woke up on its CPU), and a writer that keeps the CPU only delays it. Yielding first lets a
/// reader preempted on the writer's CPU finish at once (in quick runs of `bench access`, about
/// twice the discard rate of yielding only 8 times before sleeping: a sleep lasts at least
/// the timer slack, ~50 us).
#[inline]
fn backoff(spins: &mut u32) {
    *spins += 1;
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 1064 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(10 << (*spins - 1064).min(6)));
    }
}

/// How the two barriers are made.
#[cfg(not(loom))]
pub(super) mod mode {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Once;

    /// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` and its registration (`include/uapi/linux/membarrier.h`).
    const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    static CHOSE: Once = Once::new();
    /// The kernel registered this process for private expedited membarrier: the light
    /// barrier is a compiler fence. Written once, before any slot exists (every slot is
    /// claimed after [`chosen`] returned), never changed after.
    static ASYMMETRIC: AtomicBool = AtomicBool::new(false);

    /// Chooses the mode once per process.
    pub(super) fn chosen() {
        CHOSE.call_once(|| {
            // SAFETY: membarrier takes no pointer; registering has no effect but allowing
            // the expedited command for this process.
            let registered =
                unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0, 0) } == 0;
            ASYMMETRIC.store(registered, Ordering::Relaxed);
            // SAFETY: registers a child handler that walks the slot list with atomic loads
            // and stores only (async-signal-safe), a plain function valid for the process.
            unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) };
        });
    }

    extern "C" fn forget_in_child() {
        super::super::reader_slots().forget_sections();
    }

    /// Whether the light barrier is a compiler fence paired with membarrier (S2).
    #[inline]
    pub(crate) fn asymmetric() -> bool {
        ASYMMETRIC.load(Ordering::Relaxed)
    }

    /// How many times a transient refusal of the expedited command (`ENOMEM`: the kernel
    /// could not allocate its CPU mask; `EINTR`) is retried before the barrier of this call is
    /// made by [`mprotect_barrier`] instead.
    pub(crate) const MEMBARRIER_TRIES: u32 = 8;

    /// The kernel refused the expedited command for good (anything but `ENOMEM`/`EINTR`, such
    /// as a seccomp filter installed after registration): every heavy barrier from now on is
    /// [`mprotect_barrier`].
    static REFUSED: AtomicBool = AtomicBool::new(false);
    /// Heavy barriers made by [`mprotect_barrier`] because membarrier failed.
    static FALLBACKS: AtomicU64 = AtomicU64::new(0);

    /// The heavy barrier: a full barrier on every CPU running a thread of this process.
    ///
    /// It never fails and never unwinds: it runs inside `invalidate_range_start` (the
    /// notifier's callback) and the VMM's own teardowns, between clearing a region's bits and
    /// waiting for its readers (M1), where a panic would leave a half-finished
    /// `drop_overlapping` / `wait_for_readers`. A transient refusal of membarrier is retried
    /// [`MEMBARRIER_TRIES`] times with a short backoff; then (or at once for a permanent
    /// refusal) the barrier is made by [`mprotect_barrier`]; if that fails too the process
    /// aborts with a message (no reader's compiler fence would pair with anything, so M1 could
    /// not be kept).
    pub(super) fn membarrier() {
        if !REFUSED.load(Ordering::Relaxed) {
            let mut error = 0;
            for attempt in 0..MEMBARRIER_TRIES {
                error = match expedited() {
                    0 => return,
                    e => e,
                };
                if error != libc::ENOMEM && error != libc::EINTR {
                    REFUSED.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        "membarrier(PRIVATE_EXPEDITED) refused after registration ({}); the \
                         heavy barrier is mprotect's TLB shootdown from now on",
                        std::io::Error::from_raw_os_error(error)
                    );
                    break;
                }
                // 1, 2, 4, ... 64 us: the kernel's allocation may succeed once memory is freed.
                if attempt + 1 < MEMBARRIER_TRIES {
                    std::thread::sleep(std::time::Duration::from_micros(1 << attempt));
                }
            }
            if !REFUSED.load(Ordering::Relaxed) {
                tracing::warn!(
                    "membarrier(PRIVATE_EXPEDITED) failed {MEMBARRIER_TRIES} times ({}); this \
                     heavy barrier is mprotect's TLB shootdown",
                    std::io::Error::from_raw_os_error(error)
                );
            }
        }
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = mprotect_barrier() {
            // Not a panic: unwinding here would skip the wait for readers (M1).
            eprintln!(
                "zapvm: fatal: membarrier(PRIVATE_EXPEDITED) failed and so did its mprotect \
                 fallback ({e}); the VMM's invalidations cannot wait for its readers (M1), aborting"
            );
            std::process::abort();
        }
    }

    /// Heavy barriers made by [`mprotect_barrier`] so far (membarrier failed).
    #[cfg(test)]
    pub(crate) fn fallbacks() -> u64 {
        FALLBACKS.load(Ordering::Relaxed)
    }

    /// membarrier(PRIVATE_EXPEDITED): 0, or the errno of its failure.
    fn expedited() -> i32 {
        #[cfg(feature = "fault-injection")]
        if let Some(errno) = planted::take_failure() {
            return errno;
        }
        // SAFETY: membarrier takes no pointer; the process registered for the command.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0, 0) };
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
        }
    }

    /// The heavy barrier without membarrier (folly's and liburcu's fallback), x86 only: a page
    /// of this process's own, written (so its PTE is present, writable and dirty), then made
    /// read-only. Removing write permission from a present PTE needs a TLB shootdown: the
    /// kernel sends an IPI to every CPU that has this mm loaded and is not lazy — every CPU
    /// running a thread of this process — and waits for each to acknowledge before mprotect
    /// returns. On x86 that is a full barrier for the threads of this mm, with the same
    /// argument as membarrier's own IPI: the caller's stores are drained by the locked
    /// operations of the syscall (mmap_lock) before the IPIs are sent; an interrupted
    /// thread's earlier stores are visible before its CPU acknowledges (TSO keeps them before
    /// the handler's acknowledging store), and its later loads execute after the handler's
    /// serializing INVLPG / CR3 write and IRET. A thread not running at that moment passes the
    /// scheduler's full barrier before it runs again (as membarrier relies on too).
    fn mprotect_barrier() -> std::io::Result<()> {
        use std::sync::{Mutex, OnceLock};
        /// The page (its address), mapped once, never unmapped; the lock serialises the
        /// write-then-protect pairs (another barrier's RW would leave the PTE writable).
        static PAGE: OnceLock<Result<usize, i32>> = OnceLock::new();
        static LOCK: Mutex<()> = Mutex::new(());
        const SIZE: usize = 4096;
        let page = *PAGE.get_or_init(|| {
            // SAFETY: a new private anonymous mapping, at an address of the kernel's choice;
            // nothing else knows of it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOMEM));
            }
            // SAFETY: our own mapping; a failed mlock (RLIMIT_MEMLOCK) only lets the page be
            // reclaimed, and the write below faults it back in.
            unsafe { libc::mlock(p, SIZE) };
            Ok(p as usize)
        });
        let page = page.map_err(std::io::Error::from_raw_os_error)?;
        let _serial = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let protect = |prot| {
            // SAFETY: the page is this function's own mapping (above), which nothing else
            // reads, writes or unmaps.
            if unsafe { libc::mprotect(page as *mut libc::c_void, SIZE, prot) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        protect(libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the page is mapped read-write (just above) and ours alone (under LOCK).
        unsafe {
            std::ptr::write_volatile(page as *mut u64, std::ptr::read_volatile(page as *const u64) + 1)
        };
        protect(libc::PROT_READ)
    }

    /// **Planted fault, for tests only** (cargo feature `fault-injection`): membarrier's
    /// expedited command fails.
    #[cfg(feature = "fault-injection")]
    pub(crate) mod planted {
        use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

        static LEFT: AtomicU32 = AtomicU32::new(0);
        static ERRNO: AtomicI32 = AtomicI32::new(0);

        /// The next `times` expedited membarriers fail with `errno` (no syscall is made).
        #[cfg(test)]
        pub(crate) fn fail_membarrier(times: u32, errno: i32) {
            ERRNO.store(errno, Ordering::SeqCst);
            LEFT.store(times, Ordering::SeqCst);
        }

        /// Planted failures not yet taken.
        #[cfg(test)]
        pub(crate) fn failures_left() -> u32 {
            LEFT.load(Ordering::SeqCst)
        }

        pub(super) fn take_failure() -> Option<i32> {
            LEFT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).ok()?;
            Some(ERRNO.load(Ordering::SeqCst))
        }
    }
}

#[inline]
fn barrier_mode() {
    #[cfg(not(loom))]
    mode::chosen();
}

/// The reader's barrier of S2.
#[inline]
fn light_barrier() {
    #[cfg(loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(loom))]
    if mode::asymmetric() {
        // The heavy barrier orders this thread's accesses as a full fence here would; the
        // compiler must keep program order across this point.
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The writer's barrier of S2 (in loom models a full fence, which is what membarrier gives
/// both sides).
fn heavy_barrier() {
    fence(Ordering::SeqCst);
    #[cfg(not(loom))]
    {
        mode::chosen();
        if mode::asymmetric() {
            mode::membarrier();
        }
    }
}

/// The calling thread's slot of the process's list, kept for the thread's life.
#[cfg(not(loom))]
mod own {
    use std::cell::Cell;

    use super::Slot;

    /// Gives the slot back when the thread exits.
    struct ReleaseAtExit(Cell<Option<&'static Slot>>);

    impl Drop for ReleaseAtExit {
        fn drop(&mut self) {
            if let Some(slot) = self.0.take() {
                let _ = OWN.try_with(|own| own.set(None));
                super::super::reader_slots().release(slot);
            }
        }
    }

    thread_local! {
        /// No destructor: readable for the whole life of the thread, cheap to read.
        static OWN: Cell<Option<&'static Slot>> = const { Cell::new(None) };
        static RELEASE: ReleaseAtExit = const { ReleaseAtExit(Cell::new(None)) };
    }

    /// Runs `f` with the calling thread's slot (claimed on first use; a thread whose
    /// thread-locals are being destroyed gets a slot for this call only).
    #[inline]
    pub(in super::super) fn with_slot<R>(f: impl FnOnce(&Slot) -> R) -> R {
        if let Some(slot) = OWN.with(Cell::get) {
            return f(slot);
        }
        let list = super::super::reader_slots();
        let slot = list.claim();
        if RELEASE.try_with(|r| r.0.set(Some(slot))).is_ok() {
            OWN.with(|own| own.set(Some(slot)));
            f(slot)
        } else {
            let r = f(slot);
            list.release(slot);
            r
        }
    }
}
#[cfg(not(loom))]
pub(super) use own::with_slot;
