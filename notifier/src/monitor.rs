//! The userfaultfd monitor: teardowns of guest RAM by code that does not use the API.
//!
//! # What the kernel guarantees, per event kind, and what subscribers get
//!
//! Guest RAM is registered with `UFFDIO_REGISTER_MODE_WP` and nothing write-protected, with
//! `UFFD_FEATURE_EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP`. Page faults stay in the kernel (with
//! `MODE_MISSING` every first touch after a discard would be a round trip through the monitor);
//! the events are the same (`docs/host.md`, "userfaultfd").
//!
//! | host operation (external) | event | kernel ordering | subscribers get |
//! |---|---|---|---|
//! | `madvise(DONTNEED / REMOVE / FREE)` | `UFFD_EVENT_REMOVE`, exact range, one per VMA piece | queued **before** the zap; the caller resumes when the monitor has *read* the event, then zaps | start, `invalidate_range`, end back to back, **after** the read: the zap may run before, during or after them. `Event::Discard(Unknown)`. For MADV_FREE the pages may stay mapped with old contents (lazy free). |
//! | `munmap`, `mmap(MAP_FIXED)` over guest RAM | `UFFD_EVENT_UNMAP`, exact range | sent **after** the unmap; the caller waits for the read | start/range/end after the mapping is gone; the range leaves the regions (later API operations on it fail with `NotMapped`). |
//! | `mremap(MAYMOVE[|FIXED])` | `UFFD_EVENT_REMAP {from, to, len}`, then `UFFD_EVENT_UNMAP` of the old range | both **after** the move; the caller waits for each read | `Event::Remap { new_start }` for the old range; the region moves. The reader folds the following UNMAP of exactly the old range into the move (counted as `remap_unmaps`, not notified), even if a subscriber has mapped new memory there meanwhile. |
//! | `fallocate(PUNCH_HOLE)`, `ftruncate` on a memfd | **none** | pages zapped at once | nothing: the monitor cannot see these; use the API. |
//!
//! So for external teardowns `invalidate_range_start` is *not* a "before" guarantee: a
//! subscriber must expect the range to be already gone (unmapped memory faults with SIGSEGV /
//! KVM_RUN returns EFAULT). What the crate does guarantee: each external teardown of registered
//! guest RAM reaches every overlapping subscriber exactly once as a start/end pair marked
//! [`Origin::External`], widened like VMM ranges for THP regions, in the order the kernel queued
//! the events.
//!
//! # The VMM's own operations
//!
//! Operations through [`AddressSpace`] on registered memory produce the same events. They are
//! recognised (see the invariants of `OwnOps` in `ledger.rs`: an own operation is recorded before
//! its syscall and the reader matches each event against the operations that could have produced
//! it) and counted as `own`, never notified twice. An external operation on a range contained in
//! an own operation of the same kind that runs at the same moment is indistinguishable from it
//! and is folded into it.
//!
//! # Invariants of the monitor
//!
//! * U1. No external teardown is dropped silently: the worker survives every panic (subscribers'
//!   are contained by the registry, R6 in `registry.rs`; anything else is caught and counted in
//!   `worker_panics`), and if an event still cannot be handed to it the reader fails (U2).
//! * U2. The monitor never stops intercepting with guest RAM still registered: when the reader
//!   cannot go on (a failed read, a lost worker) it releases the userfaultfd at once
//!   (`Userfaultfd::disable`), which unregisters every range and wakes every thread waiting for a
//!   read, records why in `MonitorStats::failed`, and `Monitor::stop` reports it.
//! * U3. The reader folds an UNMAP into an earlier REMAP only for a move that unmapped its old
//!   range: a REMAP whose old range is still registered (`mremap(MREMAP_DONTUNMAP)`, which is
//!   followed by no UNMAP) arms no pairing, its old range leaves the regions and is unregistered.
//!
//! # Threads
//!
//! A thread doing `madvise`/`munmap`/`mremap` on registered memory waits until the monitor has
//! read the event, so an operation on the reading thread would deadlock. The monitor therefore has
//! two threads: the *reader* only reads events, matches them and queues the external ones (it takes
//! no lock that is held across a syscall and calls no subscriber); the *worker* turns queued events
//! into notifications (subscribers may sleep and may call the API there). After an event the reader
//! keeps polling without sleeping for `MonitorOptions::spin`, so a burst of operations does not pay
//! a cross-CPU wakeup per event (`docs/host.md`: that wakeup's p99 is 2.5 ms on this host).
//!
//! # Where an external madvise's time goes
//!
//! The caller of an external `madvise` waits only for the reader's *read* of its REMOVE event, not
//! for the worker or any subscriber: the reader hands the event on after the kernel has already
//! let the caller go. So its extra cost is the kernel's round trip: the caller queues the event
//! and sleeps, the reader is woken (it sleeps in `poll` once `spin` has passed), reads, and the
//! caller is woken again — two wakeups, cross-CPU when the two threads run on different CPUs
//! (`docs/host.md` measures that round trip in C at 39 us for 4 KiB and 160 us for 2 MiB of 4 KiB
//! pages across CPUs, against 6.9 us and 111 us on one CPU). Measured with `bench notifier`'s
//! cases while the host was loaded: taking the worker hand-off out altogether (events read and
//! not forwarded) left the 2 MiB figure where it was (x2.98 and x3.97 without the hand-off, x2.13
//! and x2.87 with it, in alternating runs), so no part of the gap is the worker or subscriber
//! work; the reader's own work per event (decode, match against own operations, one channel send)
//! is well under a microsecond.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ledger::RawEvent;
use crate::space::AddressSpace;
use crate::uffd::{Message, Userfaultfd};
use crate::{Error, Origin};

/// Options of the monitor.
#[derive(Clone, Copy, Debug)]
pub struct MonitorOptions {
    /// How long the reader keeps polling (busy) after the last event before it sleeps in
    /// `poll(2)`. Zero: always sleep. Costs CPU only right after events.
    pub spin: Duration,
    /// Events read per `read(2)`.
    pub batch: usize,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions { spin: Duration::from_micros(200), batch: 64 }
    }
}

/// Opens a userfaultfd for the monitor: not `UFFD_USER_MODE_ONLY` (so KVM's faults keep working),
/// non-blocking, with the REMOVE/UNMAP/REMAP events. Fails with a clear message when userfaultfd
/// is not available (it needs root here: `vm.unprivileged_userfaultfd = 0`).
pub fn open_userfaultfd() -> Result<Userfaultfd, Error> {
    Userfaultfd::open(crate::uffd::EVENT_FEATURES).map_err(|e| {
        Error::Uffd(format!(
            "cannot open a userfaultfd with EVENT_REMOVE|UNMAP|REMAP and without \
                 UFFD_USER_MODE_ONLY (needs root or vm.unprivileged_userfaultfd=1, and the \
                 userfaultfd syscall or /dev/userfaultfd): {e}"
        ))
    })
}

/// The running monitor. Stop it with [`Monitor::stop`] (or drop it) before the address space
/// goes away.
pub struct Monitor {
    space: Arc<AddressSpace>,
    uffd: Arc<Userfaultfd>,
    stop_fd: OwnedFd,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
    worker_id: std::thread::ThreadId,
}

impl Monitor {
    /// Registers every region of `space` with a new userfaultfd and starts the reader and worker
    /// threads. Regions added later with [`AddressSpace::add_region`] are registered too.
    pub fn start(space: &Arc<AddressSpace>, opts: MonitorOptions) -> Result<Monitor, Error> {
        let uffd = Arc::new(open_userfaultfd()?);
        {
            let g = space.write_regions();
            if space.own.active.load(Ordering::SeqCst) {
                return Err(Error::MonitorRunning);
            }
            for (s, e) in g.iter().map(|r| r.span()) {
                crate::uffd::register_range(&uffd, s, e)?;
            }
            *space.uffd.lock().unwrap_or_else(|p| p.into_inner()) = Some(uffd.clone());
            space.own.ever_started.store(true, Ordering::Relaxed);
            space.own.clear_failure();
            space.own.active.store(true, Ordering::SeqCst);
        }
        // SAFETY: eventfd takes no pointer.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            let source = std::io::Error::last_os_error();
            Self::deactivate(space);
            return Err(Error::Os { op: "eventfd", source });
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<RawEvent>();
        let wspace = space.clone();
        let worker = std::thread::Builder::new()
            .name("notifier-uffd-worker".into())
            .spawn(move || {
                for ev in rx {
                    // Subscribers' panics are contained by the registry (R6 in registry.rs); this
                    // catches anything else, so that one event's failure never costs the next.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wspace.external(ev)));
                    if r.is_err() {
                        wspace.own.counters.worker_panics.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(?ev, "the monitor's worker panicked on an external event");
                    }
                }
            })
            .map_err(|source| {
                Self::deactivate(space);
                Error::Os { op: "spawn", source }
            })?;
        let worker_id = worker.thread().id();
        let (rspace, ruffd, rstop, rstopfd) =
            (space.clone(), uffd.clone(), stop.clone(), stop_fd.as_raw_fd());
        let reader = std::thread::Builder::new()
            .name("notifier-uffd-reader".into())
            .spawn(move || reader_loop(&rspace, &ruffd, &rstop, rstopfd, opts, tx))
            .map_err(|source| {
                // The worker exits when the sender (moved into the failed closure) is dropped.
                Self::deactivate(space);
                Error::Os { op: "spawn", source }
            })?;
        Ok(Monitor {
            space: space.clone(),
            uffd,
            stop_fd,
            stop,
            reader: Some(reader),
            worker: Some(worker),
            worker_id,
        })
    }

    /// **Fault injection, for tests only**: the reader's next `read(2)` of the userfaultfd fails,
    /// as a real read error would.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn plant_fault_fail_next_read(&self) {
        self.space.own.plant_read_failure();
    }

    fn deactivate(space: &AddressSpace) {
        let g = space.write_regions();
        if let Some(u) = space.uffd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            for (s, e) in g.iter().map(|r| r.span()) {
                let _ = u.unregister(s, e - s);
            }
        }
        space.own.active.store(false, Ordering::SeqCst);
    }

    /// Unregisters guest RAM, lets the reader drain what is queued and the worker deliver it, and
    /// joins both threads. Must not be called from a subscriber callback. Fails with
    /// [`Error::MonitorFailed`] if the monitor had stopped intercepting on its own (a failed
    /// userfaultfd read, see `MonitorStats::failed`) or one of its threads panicked: external
    /// teardowns after that point were not notified.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), Error> {
        if self.reader.is_none() {
            return Ok(());
        }
        if crate::registry::in_teardown() || std::thread::current().id() == self.worker_id {
            return Err(Error::InCallback);
        }
        // Under the mapping lock: no own operation is in its syscall, so none waits for the
        // reader after this. External callers already waiting are served by the reader's drain.
        Self::deactivate(&self.space);
        self.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        let reader = self.reader.take().map(|r| r.join());
        let worker = self.worker.take().map(|w| w.join());
        let _ = &self.uffd;
        let mut why = Vec::new();
        if let Some(Err(_)) = reader {
            why.push("the reader thread panicked".to_string());
        }
        if let Some(Err(_)) = worker {
            why.push("the worker thread panicked".to_string());
        }
        if let Some(f) = self.space.own.failure() {
            why.push(f);
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(Error::MonitorFailed(why.join("; ")))
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// The reader cannot go on (a failed read, a lost worker): it gives the userfaultfd up at once, so
/// that no madvise/munmap/mremap of guest RAM waits for a read that will never come (U2), records
/// why, and stops intercepting (`active` false: own operations stop recording). The failure is
/// reported by `MonitorStats::failed` and by `Monitor::stop`.
fn fail(space: &AddressSpace, uffd: &Userfaultfd, why: String) {
    tracing::error!(why, "the userfaultfd monitor stops intercepting external teardowns");
    // Recorded before the release: a caller that the release wakes sees the failure.
    space.own.active.store(false, Ordering::SeqCst);
    space.own.set_failure(why);
    if let Err(e) = uffd.disable() {
        tracing::error!(%e, "could not release the userfaultfd");
        space.own.set_failure(format!("and releasing the userfaultfd failed: {e}"));
    }
}

/// U3: whether the old range of an external move read just now is still there, i.e. the move was
/// `mremap(MREMAP_DONTUNMAP)` (no UNMAP will follow). A plain move has unmapped it before its
/// REMAP could be read, so `msync` finds a hole there (ENOMEM), unless another thread mapped
/// something into that hole meanwhile — memory that is not registered with our userfaultfd,
/// whereas a DONTUNMAP old range still is. The registration probe fails with EAGAIN while another
/// teardown of the process is between its event and its completion (the kernel's
/// `mmap_changing`); the DONTUNMAP caller completes its move as soon as this read woke it, so the
/// probe is retried a bounded number of times, and a mapped range it cannot tell is taken as kept
/// (the safe side: a later UNMAP of it is then notified rather than folded).
fn old_range_kept(uffd: &Userfaultfd, from: usize, len: usize) -> bool {
    // SAFETY: msync(MS_ASYNC) reads no memory and changes nothing of an anonymous or shmem
    // mapping; on a range with a hole it fails with ENOMEM.
    if unsafe { libc::msync(from as *mut libc::c_void, len, libc::MS_ASYNC) } != 0 {
        return false;
    }
    for _ in 0..1000 {
        match uffd.is_registered_wp(from, len) {
            Ok(registered) => return registered,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
            Err(_) => return true,
        }
    }
    true
}

fn reader_loop(
    space: &AddressSpace,
    uffd: &Userfaultfd,
    stop: &AtomicBool,
    stop_fd: i32,
    opts: MonitorOptions,
    tx: mpsc::Sender<RawEvent>,
) {
    let own = &space.own;
    let c = &own.counters;
    let mut msgs: Vec<Message> = Vec::with_capacity(opts.batch.max(1));
    let mut evs: Vec<RawEvent> = Vec::with_capacity(opts.batch.max(1));
    let mut last_event: Option<Instant> = None;
    // Old ranges of external remaps forwarded to the worker whose trailing UNMAP has not been
    // read yet. `mremap` queues REMAP {from, to, len} and then UNMAP [from, from + len) — two
    // reads, as the caller waits for each — and that UNMAP is part of the same move, not a new
    // teardown: by the time the worker sees it a subscriber may already have put new memory at
    // `from` (the VMM's teardown guard re-backs the hole), and notifying it would tear that down.
    // Only the reader, in event order, can pair them, so it folds such an UNMAP into its REMAP.
    let mut remapped_away: std::collections::VecDeque<(usize, usize)> = Default::default();
    loop {
        // O2: number this read before it can consume anything.
        let k = own.reads_started.fetch_add(1, Ordering::SeqCst) + 1;
        evs.clear();
        let mut n = 0u64;
        #[cfg(feature = "fault-injection")]
        let planted = space.own.take_planted_read_failure();
        #[cfg(not(feature = "fault-injection"))]
        let planted = false;
        let read = if planted {
            Err(std::io::Error::other("planted fault: userfaultfd read failed"))
        } else {
            uffd.read(&mut msgs, opts.batch)
        };
        match read {
            Ok(_) => {
                for msg in msgs.iter() {
                    n += 1;
                    match *msg {
                        Message::Remove { start, end } => {
                            c.remove.fetch_add(1, Ordering::Relaxed);
                            evs.push(RawEvent::Remove { start, end })
                        }
                        Message::Unmap { start, end } => {
                            c.unmap.fetch_add(1, Ordering::Relaxed);
                            evs.push(RawEvent::Unmap { start, end })
                        }
                        Message::Remap { from, to, len } => {
                            c.remap.fetch_add(1, Ordering::Relaxed);
                            evs.push(RawEvent::Remap { from, to, len, dontunmap: false })
                        }
                        Message::Other(event) => {
                            // Page faults cannot happen with nothing write-protected, and FORK is
                            // not requested.
                            c.other.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(event, "unexpected userfaultfd event ignored");
                        }
                    }
                }
            }
            Err(e) => {
                // U2: never stop with guest RAM still registered.
                fail(space, uffd, format!("userfaultfd read failed: {e}"));
                own.reads_processed.store(k, Ordering::SeqCst);
                return;
            }
        }
        if n > 0 {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.events.fetch_add(n, Ordering::Relaxed);
            c.max_batch.fetch_max(n, Ordering::Relaxed);
            let mut lost = None;
            for ev in evs.iter_mut() {
                if own.matches(k, ev) {
                    c.own.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let RawEvent::Unmap { start, end } = *ev {
                    if let Some(i) = remapped_away.iter().position(|&r| r == (start, end)) {
                        remapped_away.remove(i);
                        c.remap_unmaps.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                if let RawEvent::Remap { from, len, ref mut dontunmap, .. } = *ev {
                    // U3: only a move that unmapped its old range is followed by an UNMAP of it.
                    *dontunmap = old_range_kept(uffd, from, len);
                    if !*dontunmap {
                        remapped_away.push_back((from, from + len));
                    }
                }
                tracing::trace!(target: "notifier::uffd", ?ev, origin = ?Origin::External, "external event");
                if tx.send(*ev).is_err() {
                    lost = Some(*ev);
                    break;
                }
            }
            if let Some(ev) = lost {
                // U1: never drop an external teardown silently.
                fail(
                    space,
                    uffd,
                    format!("the monitor's worker is gone; external event {ev:?} not notified"),
                );
                own.processed(k);
                return;
            }
            own.processed(k);
            last_event = Some(Instant::now());
            continue;
        }
        own.reads_processed.store(k, Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if last_event.is_some_and(|t| t.elapsed() < opts.spin) {
            // Yield rather than spin: on a small host the caller and the worker may need this
            // CPU, and a pure spin would steal it from them.
            std::thread::yield_now();
            continue;
        }
        last_event = None;
        let mut fds = [
            libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfd structures.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    }
}
