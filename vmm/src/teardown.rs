//! Surviving teardowns of guest RAM by code the VMM did not initiate.
//!
//! When something in the VMM's process unmaps or moves part of guest RAM without going through
//! the memory layer (a library, a debugging tool, a bug), the userfaultfd monitor tells the
//! notifier, which tells every subscriber — the VMM's table drops its entries, and the
//! [`TeardownGuard`] applies the policy chosen on the command line:
//!
//! - [`TeardownPolicy::Reback`] (default): map fresh zeroed memory (of guest RAM's own file, or
//!   for anonymous RAM of a memfd of the guard's own) at the same host addresses (`MAP_FIXED_NOREPLACE`, so a mapping someone else put there is never
//!   clobbered), hand it back to the notifier (and so to the monitor), and let the guest go on.
//!   The guest reads zeros there, as after a balloon inflate. KVM's memslot keeps its host
//!   address, so KVM needs no update: its own mmu_notifier already dropped the old pages.
//! - [`TeardownPolicy::Stop`]: stop the VM with an error naming the guest-physical range.
//!
//! A vCPU that touches the hole before the guard acted gets `EFAULT` (or
//! `KVM_EXIT_MEMORY_FAULT`) from `KVM_RUN`; it waits on the guard ([`TeardownGuard::wait_backed`])
//! and runs again. Device accesses through the table fail with `AccessError::Unmapped` meanwhile
//! (never a SIGSEGV: see `mmu`'s M2).
//!
//! The guard also follows the protection changes the VMM itself makes through the notifier
//! (`AddressSpace::protect`): while part of guest RAM is write-protected on purpose, a guest
//! write there makes `KVM_RUN` fail with `EFAULT` (as in the kernel's `mmu_stress_test`); the vCPU
//! then waits in [`TeardownGuard::wait_backed`] — with no deadline, since the VMM promised to
//! restore the protection — until the range is writable again, and the fault is counted
//! ([`TeardownReport::protect_faults`]). Unmaps of memory that was moved out of guest RAM (the
//! destination of an external `mremap`) concern no guest RAM and are only counted.
//!
//! # The reused-hole window: what is and is not guaranteed
//!
//! An external `munmap` (or `mremap` away) of guest RAM takes effect in the kernel before the
//! monitor can read its UNMAP event; the unmapping thread resumes as soon as the monitor's reader
//! has *read* it, and the monitor's worker turns events into notifications one at a time, behind
//! subscribers that may sleep. Until the worker handles the event the notifier's regions still
//! list the range, and until the table's `invalidate_range_start` for it returns the table keeps
//! its entries. In that window anything the process maps next can land in the hole (a malloc
//! arena, a thread stack, a file mapping).
//!
//! Guaranteed, with or without the seal:
//! - a device copy never crashes the VMM: `process_vm_readv`/`writev` fail with `EFAULT` on an
//!   address that is unmapped at the moment of the copy (an `AccessError`);
//! - once the worker handles the event the range leaves the notifier's regions (before any
//!   subscriber's start), so no new translation of it is installed; once the table's start has
//!   returned, no copy through a dropped entry is in flight and none starts;
//! - this guard looks for a mapping the VMM did not make in the hole as soon as its start for the
//!   event runs (before anything is re-backed) and then stops the VM with an error naming the
//!   guest-physical range; it never maps over, nor unmaps, a mapping it did not make
//!   (`MAP_FIXED_NOREPLACE`). It tells its own mappings by what they are, not where they are
//!   (a mapping of a file only the VMM holds, at the right offset: see `Identity`), so a
//!   foreign mapping that lands where an earlier re-back was is caught the same way, and what it
//!   registers with the notifier is checked again once registered.
//!
//! Not guaranteed without the seal: a device copy in the window — through an entry installed
//! before the unmap, or through a translation installed while the regions still listed the range —
//! reads or writes whatever was mapped into the hole meanwhile. A write succeeds and corrupts that
//! foreign memory (a test held the worker behind a slow subscriber and saw a 16-byte
//! `process_vm_writev` change a foreign page). KVM is in the same position: its memslot is keyed
//! by host virtual address, so a guest access faulting in the window maps the foreign page. No
//! notification can close this window, since the hole exists before any event can be read; the
//! check above stops the VM after the fact and cannot undo a write that already happened.
//!
//! With `--seal-guest-ram` (`mseal(2)`, see [`crate::memory`]) the window does not exist: the
//! kernel refuses every `munmap`, `mremap`, `mprotect` and `mmap(MAP_FIXED)` over guest RAM with
//! `EPERM`, so its host range can never be a hole nor hold another mapping, and a table entry
//! stays a valid address of guest RAM for the life of the process. Only discards (REMOVE events)
//! reach the monitor then, and this guard has nothing to re-back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use notifier::{AddressSpace, Event, Origin, Range, RegionSpec, Subscriber};

/// What to do when code outside the VMM unmaps or moves guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TeardownPolicy {
    /// Re-back the range with fresh zeroed memory at the same address and continue.
    #[default]
    Reback,
    /// Stop the VM with an error naming the range.
    Stop,
}

/// One guest RAM region as the guard needs it.
#[derive(Clone, Copy, Debug)]
pub struct GuardedRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// The region as the notifier was told of it.
    pub spec: RegionSpec,
}

/// A host range an external unmap/remap left without memory, until the guard re-backs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hole {
    start: usize,
    end: usize,
    /// Tells this hole from a later one at the same place (see [`TeardownGuard::wait_backed`]).
    id: u64,
}

#[derive(Default)]
struct State {
    /// Host ranges currently without memory, waiting for the guard.
    holes: Vec<Hole>,
    /// The id the next hole gets.
    next_hole: u64,
    /// vCPUs inside [`TeardownGuard::wait_backed`] (past taking their snapshot of the holes).
    waiting: u64,
    /// Bumped each time a hole was re-backed.
    generation: u64,
    /// Set when the VM must stop (policy Stop, or a re-back failed).
    fatal: Option<String>,
    /// Bytes re-backed so far.
    rebacked_bytes: u64,
    /// External teardowns seen.
    events: u64,
    /// Host ranges the VMM keeps write-protected (`AddressSpace::protect` without `PROT_WRITE`).
    protected: Vec<(usize, usize)>,
    /// vCPU memory faults that happened while a range was write-protected by the VMM.
    protect_faults: u64,
    /// Write protections and restores seen.
    protections: u64,
    restores: u64,
    /// External unmaps/remaps of memory that is not guest RAM (moved out of it before).
    outside: u64,
}

/// Removes `[start, end)` from every range of `ranges`.
fn subtract(ranges: &mut Vec<(usize, usize)>, start: usize, end: usize) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(s, e) in ranges.iter() {
        if e <= start || end <= s {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if end < e {
            out.push((end, e));
        }
    }
    *ranges = out;
}

/// What the guard did, for the run report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TeardownReport {
    /// The policy.
    pub policy: String,
    /// External unmaps and remaps of guest RAM seen.
    pub events: u64,
    /// Bytes re-backed with fresh memory.
    pub rebacked_bytes: u64,
    /// Why the VM had to stop, if it did.
    pub fatal: Option<String>,
    /// vCPU memory faults (EFAULT) while the VMM kept part of guest RAM write-protected: guest
    /// writes to read-only memory, each waited out until the protection was lifted.
    pub protect_faults: u64,
    /// Write protections of guest RAM by the VMM, and restores of write access.
    pub protections: u64,
    /// Restores of write access after a protection.
    pub restores: u64,
    /// External unmaps/remaps of memory outside guest RAM (e.g. what an external mremap moved
    /// out of it): nothing to re-back.
    pub outside_guest_ram: u64,
}

/// An external teardown of guest RAM as the guard handled it (what
/// [`TeardownGuard::on_external_teardown`] is told).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExternalTeardown {
    /// `unmap` or `remap`.
    pub kind: &'static str,
    /// Guest-physical start of the range.
    pub gpa: u64,
    /// Bytes.
    pub length: u64,
    /// `rebacked` (fresh zeroed memory at the same place) or `stop` (the VM stops).
    pub action: &'static str,
}

/// Told each [`ExternalTeardown`] once the guard handled it.
pub type TeardownObserver = Box<dyn Fn(&ExternalTeardown) + Send + Sync>;

/// How often a vCPU waiting in [`TeardownGuard::wait_backed`] looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The subscriber that applies the [`TeardownPolicy`].
pub struct TeardownGuard {
    policy: TeardownPolicy,
    space: Weak<AddressSpace>,
    regions: Vec<GuardedRegion>,
    state: Mutex<State>,
    changed: Condvar,
    /// Mirror of `State::generation`, read lock-free by vCPUs before each run.
    generation: AtomicU64,
    /// Wakes the VMM's event loop when the VM must stop.
    stop: vmm_sys_util::eventfd::EventFd,
    /// Told of each external teardown handled (set once, before the VM runs).
    observer: std::sync::OnceLock<TeardownObserver>,
    /// Per region without a file of its own (anonymous RAM): the memfd its re-backs map, made
    /// at the first re-back (see [`Identity`]).
    reback_files: Vec<std::sync::OnceLock<Result<OwnedFd, String>>>,
}

/// What a mapping of guest RAM made by the VMM looks like in /proc/self/maps, so that the guard
/// tells its own mappings from someone else's by what they are, not by where they are.
///
/// An address says nothing: once code outside the VMM unmapped a range the guard re-backed,
/// anything may be mapped there, and a set of "addresses the guard mapped" would adopt it (the
/// next pass would hand someone's thread stack to the notifier, the table and KVM as guest RAM).
/// A file does: every mapping the guard makes is of a file only the VMM holds — guest RAM's own
/// memfd (or hugetlb file), or for anonymous RAM a memfd of the guard's own (its re-backs are
/// shared mappings of it, which behave as anonymous memory for the guest: zeros when fresh, and
/// discards punch holes) — at the file offset of that guest address. A mapping is the VMM's iff
/// its device, inode and offset are those; no mapping made without the VMM's file descriptor can
/// have them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: (u32, u32),
    ino: u64,
    /// The file offset of the region's first host address.
    base: u64,
}

/// One line of /proc/self/maps clipped to a range: `[start, end)`, the file offset at `start`,
/// the device and inode (0 for anonymous memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapsEntry {
    start: usize,
    end: usize,
    offset: u64,
    dev: (u32, u32),
    ino: u64,
}

impl TeardownGuard {
    /// A guard for `regions` of `space`; writes `stop` when the VM must stop.
    pub fn new(
        policy: TeardownPolicy,
        space: &Arc<AddressSpace>,
        regions: Vec<GuardedRegion>,
        stop: vmm_sys_util::eventfd::EventFd,
    ) -> Self {
        Self {
            policy,
            space: Arc::downgrade(space),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
            stop,
            observer: std::sync::OnceLock::new(),
            reback_files: (0..regions.len()).map(|_| std::sync::OnceLock::new()).collect(),
            regions,
        }
    }

    /// Calls `observer` with each external teardown of guest RAM once the guard handled it
    /// (re-backed it, or decided the VM stops), on the thread that delivered the teardown (the
    /// userfaultfd monitor's): it must not block. Only the first observer set is kept.
    pub fn on_external_teardown(&self, observer: TeardownObserver) {
        let _ = self.observer.set(observer);
    }

    /// The guest-physical start of host address `start` inside guest RAM.
    fn gpa_of(&self, start: usize) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| r.spec.host_addr <= start && start < r.spec.host_addr + r.spec.len)
            .map(|r| r.gpa + (start - r.spec.host_addr) as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest-physical range of host range `[start, end)`, for messages.
    fn describe(&self, start: usize, end: usize) -> String {
        match self.regions.iter().find(|r| r.spec.host_addr <= start && end <= r.spec.host_addr + r.spec.len)
        {
            Some(r) => {
                let gpa = r.gpa + (start - r.spec.host_addr) as u64;
                format!("guest RAM [{gpa:#x}, {:#x})", gpa + (end - start) as u64)
            }
            None => format!("host range [{start:#x}, {end:#x})"),
        }
    }

    /// The first mapped host range inside `[start, end)` (an external unmap or move just left it
    /// without guest RAM) that this guard did not map, if any: someone else's mapping in the
    /// hole. `None` also when /proc/self/maps cannot be read (the re-back looks again).
    fn foreign_mapping(&self, start: usize, end: usize) -> Option<(usize, usize)> {
        let mapped = maps_entries(start, end).ok()?;
        mapped.into_iter().find(|m| !self.is_ours(m)).map(|m| (m.start, m.end))
    }

    /// The index of the region holding host range `[start, end)`.
    fn region_index(&self, start: usize, end: usize) -> Result<usize, String> {
        self.regions
            .iter()
            .position(|r| r.spec.host_addr <= start && end <= r.spec.host_addr + r.spec.len)
            .ok_or_else(|| format!("host range [{start:#x}, {end:#x}) is not guest RAM"))
    }

    /// The file every mapping of region `i` made by the VMM maps, and its offset at the region's
    /// start, if it exists yet: guest RAM's own file, else the guard's re-back memfd once made.
    fn existing_file(&self, i: usize) -> Option<(i32, u64)> {
        match self.regions[i].spec.backing {
            notifier::Backing::SharedMemfd { fd, offset } => Some((fd, offset)),
            notifier::Backing::Hugetlb { file: Some((fd, offset)), .. } => Some((fd, offset)),
            _ => Some((self.reback_files[i].get()?.as_ref().ok()?.as_raw_fd(), 0)),
        }
    }

    /// [`TeardownGuard::existing_file`], making the re-back memfd now if need be.
    fn region_file(&self, i: usize) -> Result<(i32, u64), String> {
        if let Some(file) = self.existing_file(i) {
            return Ok(file);
        }
        let flags = match self.regions[i].spec.backing {
            notifier::Backing::Hugetlb { page_size, .. } => libc::MFD_HUGETLB | hugetlb_size_flag(page_size),
            _ => 0,
        };
        self.reback_file(i, flags).map(|fd| (fd, 0))
    }

    /// Region `i`'s re-back memfd (`memfd_create` with `flags`, sized as the region).
    fn reback_file(&self, i: usize, flags: libc::c_uint) -> Result<i32, String> {
        let len = self.regions[i].spec.len;
        let made = self.reback_files[i].get_or_init(|| {
            // SAFETY: a NUL-terminated name and valid flags; the returned fd is owned below.
            let fd = unsafe { libc::memfd_create(c"zapvm-reback".as_ptr(), libc::MFD_CLOEXEC | flags) };
            if fd < 0 {
                return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ftruncate of the memfd just made; sparse, nothing is allocated.
            if unsafe { libc::ftruncate(owned.as_raw_fd(), len as i64) } != 0 {
                return Err(format!("sizing the re-back memfd: {}", std::io::Error::last_os_error()));
            }
            Ok(owned)
        });
        made.as_ref().map(|fd| fd.as_raw_fd()).map_err(Clone::clone)
    }

    /// Region `i`'s [`Identity`], if its file exists (a region never re-backed has none of the
    /// guard's own yet: then nothing in it can be a re-back).
    fn identity(&self, i: usize) -> Option<Identity> {
        let (fd, base) = self.existing_file(i)?;
        // SAFETY: fstat writes only into `st`; `fd` is open (the region's or the guard's own).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return None;
        }
        Some(Identity { dev: (libc::major(st.st_dev), libc::minor(st.st_dev)), ino: st.st_ino, base })
    }

    /// Whether the mapping `m` (inside guest RAM's host range) was made by the VMM: of the file
    /// of its region, at the offset of its address (see [`Identity`]).
    fn is_ours(&self, m: &MapsEntry) -> bool {
        let Ok(i) = self.region_index(m.start, m.end) else { return false };
        let Some(id) = self.identity(i) else { return false };
        m.ino != 0
            && (m.dev, m.ino) == (id.dev, id.ino)
            && m.offset == id.base + (m.start - self.regions[i].spec.host_addr) as u64
    }

    /// Whether `[start, end)` lies inside guest RAM as it was mapped at start-up.
    fn is_guest_ram(&self, start: usize, end: usize) -> bool {
        self.regions.iter().any(|r| r.spec.host_addr <= start && end <= r.spec.host_addr + r.spec.len)
    }

    /// Why the VM must stop, if it must.
    pub fn fatal(&self) -> Option<String> {
        self.lock().fatal.clone()
    }

    /// What the guard did.
    pub fn report(&self) -> TeardownReport {
        let s = self.lock();
        TeardownReport {
            policy: format!("{:?}", self.policy).to_lowercase(),
            events: s.events,
            rebacked_bytes: s.rebacked_bytes,
            fatal: s.fatal.clone(),
            protect_faults: s.protect_faults,
            protections: s.protections,
            restores: s.restores,
            outside_guest_ram: s.outside,
        }
    }

    /// Called by a vCPU whose `KVM_RUN` failed with EFAULT: waits (at most `timeout`) until a
    /// teardown that had not been re-backed when the fault happened is re-backed, or a write
    /// protection by the VMM is lifted, and no hole is left that the access may need. While the
    /// VMM keeps such a range write-protected the wait has no deadline (the fault is counted as a
    /// write to read-only memory). Returns `Err` with the reason when the VM must stop or nothing
    /// changed in time.
    ///
    /// `fault` is the guest-physical range of the access when KVM reports it
    /// (`KVM_EXIT_MEMORY_FAULT`): then only holes and protections overlapping it hold the vCPU
    /// back, so a storm of teardowns elsewhere in guest RAM cannot starve it. A plain `EFAULT`
    /// names no address, and any hole or protection may be the one.
    ///
    /// Only the holes open when the wait begins hold the vCPU back, never one opened later: the
    /// fault was caused by a hole that was open then (or by one already re-backed, which the
    /// generation shows), and an access that needs a later hole faults again and waits for
    /// that one. Waiting for "no hole left" instead starves a vCPU whose fault names no address
    /// while something outside keeps unmapping guest RAM: a new hole opens before it wakes.
    ///
    /// Returns `Ok` as soon as `stop` is set: a vCPU waiting here must never keep the VM from
    /// stopping (a protection the VMM never lifts would otherwise hold it forever).
    pub fn wait_backed(
        &self,
        seen_generation: u64,
        fault: Option<(u64, u64)>,
        stop: &AtomicBool,
        timeout: Duration,
    ) -> Result<(), String> {
        let host = fault.map(|(gpa, size)| self.host_range_of(gpa, size.max(1)));
        let concerns = |&(a, b): &(usize, usize)| match host {
            Some(Some((s, e))) => a < e && s < b,
            // Unknown address, or one outside guest RAM as mapped at start-up: any range may be it.
            _ => true,
        };
        let mut deadline = Instant::now() + timeout;
        let mut s = self.lock();
        let waited_for: Vec<u64> =
            s.holes.iter().filter(|h| concerns(&(h.start, h.end))).map(|h| h.id).collect();
        let open = |s: &State| s.holes.iter().find(|h| waited_for.contains(&h.id)).copied();
        let mut counted = false;
        s.waiting += 1;
        let result = loop {
            if let Some(fatal) = &s.fatal {
                break Err(fatal.clone());
            }
            if stop.load(Ordering::Acquire) {
                break Ok(());
            }
            if s.generation > seen_generation && open(&s).is_none() {
                break Ok(());
            }
            if s.protected.iter().any(concerns) {
                if !counted {
                    s.protect_faults += 1;
                    counted = true;
                }
                deadline = Instant::now() + timeout;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(match open(&s) {
                    Some(h) => format!("{} is still unmapped after {timeout:?}", self.describe(h.start, h.end)),
                    None => format!(
                        "guest memory access failed (EFAULT) and no teardown of guest RAM was seen within {timeout:?}"
                    ),
                });
            }
            // Wake up now and then to see `stop`: the VMM sets it without telling the guard.
            let slice = left.min(STOP_POLL);
            s = self.changed.wait_timeout(s, slice).unwrap_or_else(|e| e.into_inner()).0;
        };
        s.waiting -= 1;
        result
    }

    /// The host range of guest-physical `[gpa, gpa + size)`, if it lies in one region of guest
    /// RAM as mapped at start-up.
    fn host_range_of(&self, gpa: u64, size: u64) -> Option<(usize, usize)> {
        let end = gpa.checked_add(size)?;
        let r = self.regions.iter().find(|r| r.gpa <= gpa && end <= r.gpa + r.spec.len as u64)?;
        let start = r.spec.host_addr + (gpa - r.gpa) as usize;
        Some((start, start + size as usize))
    }

    /// The re-back generation now (read before running a vCPU, passed to [`Self::wait_backed`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn stop_vm(&self, s: &mut State, why: String) {
        eprintln!("zapvm: error: {why}");
        s.fatal.get_or_insert(why);
        let _ = self.stop.write(1);
        self.changed.notify_all();
    }

    /// Gives `[start, end)` memory again after an external unmap or move, and makes the notifier
    /// (and so the userfaultfd monitor) know all of it.
    ///
    /// Events describe the past: by the time one is handled, part of its range may already be
    /// re-backed (an earlier, overlapping event was handled first) and a stale event may have
    /// taken that part out of the notifier's regions. And a munmap that lands between mapping
    /// fresh memory and registering it produces no event at all (nothing was registered there).
    /// So this works from what is mapped *now* (/proc/self/maps), page run by page run:
    /// - unmapped: map fresh memory and register it;
    /// - mapped, unknown to the notifier, and the VMM's by its [`Identity`] (an earlier re-back
    ///   that was not registered): register it again;
    /// - mapped, unknown, not the VMM's: someone else's mapping sits in guest RAM — an error;
    ///
    /// and after registering a run checks by identity that what it registered is the VMM's (a
    /// munmap and someone's mmap between the re-back's mmap and its registration tell no event:
    /// nothing was registered there; from the registration on, every change does), and looks
    /// again until a pass changes nothing.
    fn reback(&self, start: usize, end: usize) -> Result<(), String> {
        const MAX_PASSES: usize = 16;
        let space = self.space.upgrade().ok_or("the address space is gone")?;
        for _ in 0..MAX_PASSES {
            let mapped = host_mappings(start, end)?;
            let mut changed = false;
            for (run_start, run_end, is_mapped) in runs(start, end, &mapped, |a, b| space.is_mapped(a, b)) {
                if is_mapped {
                    self.check_ours(run_start, run_end)?;
                } else {
                    self.map_fresh(run_start, run_end)?;
                }
                let spec = self.region_spec(run_start, run_end)?;
                // SAFETY: the range is memory this guard mapped, mapped for as long as guest RAM
                // is, and the VMM touches it only through raw pointers, as for the regions given
                // to `AddressSpace::new`.
                if let Err(e) = unsafe { space.add_region(&spec) } {
                    // Unmapped again before it was registered (no event tells of that): the next
                    // pass maps it anew. Still mapped: a real failure.
                    let still = host_mappings(run_start, run_end)?;
                    if still.iter().map(|(a, b)| b - a).sum::<usize>() == run_end - run_start {
                        return Err(format!("cannot hand the memory to the notifier: {e}"));
                    }
                }
                // Registered: what is mapped there now is what the notifier (and the table, and
                // the guest) will use. It must be the VMM's.
                self.check_ours(run_start, run_end)?;
                changed = true;
            }
            if !changed {
                return Ok(());
            }
        }
        Err(format!("it was unmapped again {MAX_PASSES} times while being re-backed"))
    }

    /// `Err` naming the first mapping inside `[start, end)` that is not the VMM's (by
    /// [`Identity`]); unmapped parts are not checked (an event will tell of them).
    fn check_ours(&self, start: usize, end: usize) -> Result<(), String> {
        match maps_entries(start, end)?.into_iter().find(|m| !self.is_ours(m)) {
            Some(m) => Err(format!("[{:#x}, {:#x}) holds a mapping the VMM did not make", m.start, m.end)),
            None => Ok(()),
        }
    }

    /// The notifier's description of re-backed guest RAM `[start, end)`: a mapping of its
    /// region's file (see [`TeardownGuard::region_file`]) at the offset of `start`.
    fn region_spec(&self, start: usize, end: usize) -> Result<RegionSpec, String> {
        let i = self.region_index(start, end)?;
        let region = &self.regions[i];
        let (fd, base) = self.region_file(i)?;
        let offset = base + (start - region.spec.host_addr) as u64;
        let backing = match region.spec.backing {
            notifier::Backing::Hugetlb { page_size, .. } => {
                notifier::Backing::Hugetlb { page_size, file: Some((fd, offset)) }
            }
            _ => notifier::Backing::SharedMemfd { fd, offset },
        };
        Ok(RegionSpec { host_addr: start, len: end - start, backing, thp: region.spec.thp })
    }

    /// Maps fresh zeroed memory of the region's file (see [`Identity`]) over the hole
    /// `[start, end)`.
    fn map_fresh(&self, start: usize, end: usize) -> Result<(), String> {
        let i = self.region_index(start, end)?;
        let region = &self.regions[i];
        let len = end - start;
        let (fd, base) = self.region_file(i)?;
        let offset = base + (start - region.spec.host_addr) as u64;
        // Zero the file's pages first: the fresh mapping must read zeros like anonymous memory.
        // SAFETY: fallocate on the VMM's own file (guest RAM's or the guard's re-back memfd)
        // over the range of this hole.
        let ret = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if ret != 0 {
            return Err(format!("fallocate(PUNCH_HOLE): {}", std::io::Error::last_os_error()));
        }
        let (flags, offset) = (libc::MAP_SHARED, offset as i64);
        // SAFETY: MAP_FIXED_NOREPLACE maps only if nothing is mapped in [start, end), so no
        // mapping (ours or anyone's) is replaced; the range was guest RAM, now a hole.
        let addr = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
                fd,
                offset,
            )
        };
        if addr == libc::MAP_FAILED || addr as usize != start {
            let err = std::io::Error::last_os_error();
            if addr != libc::MAP_FAILED {
                // An old kernel ignoring NOREPLACE mapped elsewhere: undo it.
                // SAFETY: `addr` is the mapping this call just created.
                unsafe { libc::munmap(addr, len) };
            }
            return Err(format!(
                "cannot map fresh memory there ({err}): something else is mapped in its place"
            ));
        }
        if region.spec.thp {
            // SAFETY: the range is the mapping just created; MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
        }
        Ok(())
    }
}

/// The mapped host ranges of this process overlapping `[start, end)`, clipped to it and in
/// address order, as /proc/self/maps lists them at the moment of the call (adjacent mappings
/// are separate entries); `Err` when the file cannot be read.
pub fn host_mappings(start: usize, end: usize) -> Result<Vec<(usize, usize)>, String> {
    Ok(maps_entries(start, end)?.into_iter().map(|m| (m.start, m.end)).collect())
}

/// The lines of /proc/self/maps overlapping `[start, end)`, clipped to it (the offset moved to
/// the clipped start), in address order; `Err` when the file cannot be read.
fn maps_entries(start: usize, end: usize) -> Result<Vec<MapsEntry>, String> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("reading /proc/self/maps: {e}"))?;
    Ok(maps.lines().filter_map(parse_maps_line).filter_map(|m| clip(m, start, end)).collect())
}

/// `m` clipped to `[start, end)`, if they overlap.
fn clip(m: MapsEntry, start: usize, end: usize) -> Option<MapsEntry> {
    (m.start < end && start < m.end).then(|| {
        let s = m.start.max(start);
        MapsEntry { start: s, end: m.end.min(end), offset: m.offset + (s - m.start) as u64, ..m }
    })
}

/// One line of /proc/self/maps: `start-end perms offset major:minor inode [path]`, all hex but
/// the inode.
fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut f = line.split_whitespace();
    let (a, b) = f.next()?.split_once('-')?;
    let _perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let ino = f.next()?.parse().ok()?;
    Some(MapsEntry {
        start: usize::from_str_radix(a, 16).ok()?,
        end: usize::from_str_radix(b, 16).ok()?,
        offset,
        dev: (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        ino,
    })
}

/// `memfd_create`'s flag for hugetlb pages of `page_size` (2 MiB or 1 GiB).
fn hugetlb_size_flag(page_size: usize) -> libc::c_uint {
    (page_size.trailing_zeros() as libc::c_uint) << libc::MFD_HUGE_SHIFT
}

/// Cuts `[start, end)` into maximal page runs that the notifier does not know (`known` is
/// false for them), each either mapped (`true`) or not, according to `mapped`.
fn runs(
    start: usize,
    end: usize,
    mapped: &[(usize, usize)],
    known: impl Fn(usize, usize) -> bool,
) -> Vec<(usize, usize, bool)> {
    const PAGE: usize = crate::memory::PAGE_SIZE as usize;
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut page = start;
    while page < end {
        let next = page + PAGE;
        if !known(page, next) {
            let is_mapped = mapped.iter().any(|&(a, b)| a <= page && next <= b);
            match out.last_mut() {
                Some(last) if last.1 == page && last.2 == is_mapped => last.1 = next,
                _ => out.push((page, next, is_mapped)),
            }
        }
        page = next;
    }
    out
}

impl Subscriber for TeardownGuard {
    fn name(&self) -> &str {
        "external-teardown-guard"
    }

    fn invalidate_range_start(&self, range: &Range) -> Result<(), notifier::Refused> {
        let (start, end) = (range.exact_start, range.exact_end);
        match (range.origin, range.event) {
            (Origin::External, Event::Unmap | Event::Remap { .. }) => {
                if !self.is_guest_ram(start, end) {
                    self.lock().outside += 1;
                    return Ok(());
                }
                // The earliest the guard can see it (the window of the module docs): a mapping
                // that landed in the hole stops the VM now, before any re-back.
                let foreign = self.foreign_mapping(start, end);
                let mut s = self.lock();
                if let Some((a, b)) = foreign {
                    let verb =
                        if matches!(range.event, Event::Remap { .. }) { "moved away" } else { "unmapped" };
                    let why = format!(
                        "{} was {verb} by code outside the VMM and [{a:#x}, {b:#x}) now holds a mapping \
                         the VMM did not make",
                        self.describe(start, end)
                    );
                    self.stop_vm(&mut s, why);
                }
                s.events += 1;
                let id = s.next_hole;
                s.next_hole += 1;
                s.holes.push(Hole { start, end, id });
                // Whatever maps there next (the re-back) is writable.
                subtract(&mut s.protected, start, end);
            }
            (Origin::Vmm, Event::Protect { prot }) if prot & libc::PROT_WRITE == 0 => {
                // Recorded before the mprotect, so a fault it causes always finds it.
                let mut s = self.lock();
                s.protections += 1;
                s.protected.push((start, end));
            }
            _ => {}
        }
        Ok(())
    }

    fn invalidate_range_end(&self, range: &Range) {
        if let (Origin::Vmm, Event::Protect { prot }) = (range.origin, range.event) {
            if prot & libc::PROT_WRITE != 0 {
                // Write access is back (the mprotect returned): vCPUs waiting on a write fault
                // run again.
                let mut s = self.lock();
                s.restores += 1;
                subtract(&mut s.protected, range.exact_start, range.exact_end);
                s.generation += 1;
                self.generation.store(s.generation, Ordering::Release);
                self.changed.notify_all();
            }
            return;
        }
        if range.origin != Origin::External || !matches!(range.event, Event::Unmap | Event::Remap { .. }) {
            return;
        }
        let (start, end) = (range.exact_start, range.exact_end);
        if !self.is_guest_ram(start, end) {
            return;
        }
        let what = self.describe(start, end);
        let verb = if matches!(range.event, Event::Remap { .. }) { "moved away" } else { "unmapped" };
        let stopping = self.lock().fatal.clone();
        let result = match (stopping, self.policy) {
            // The VM stops anyway (e.g. a foreign mapping was found in the hole at the start):
            // nothing is mapped any more.
            (Some(why), _) => Err(why),
            (None, TeardownPolicy::Stop) => {
                Err(format!("{what} was {verb} by code outside the VMM (policy: stop)"))
            }
            (None, TeardownPolicy::Reback) => self.reback(start, end).map_err(|e| {
                format!("{what} was {verb} by code outside the VMM and cannot be re-backed: {e}")
            }),
        };
        let handled = ExternalTeardown {
            kind: if matches!(range.event, Event::Remap { .. }) { "remap" } else { "unmap" },
            gpa: self.gpa_of(start).unwrap_or_default(),
            length: (end - start) as u64,
            action: if result.is_ok() { "rebacked" } else { "stop" },
        };
        let mut s = self.lock();
        // The oldest hole at exactly this place: events of one range come and end in order.
        if let Some(i) = s.holes.iter().position(|h| (h.start, h.end) == (start, end)) {
            s.holes.remove(i);
        }
        match result {
            Ok(()) => {
                tracing::info!("{what} was {verb} by code outside the VMM; re-backed with zeroed memory");
                s.rebacked_bytes += (end - start) as u64;
                s.generation += 1;
                self.generation.store(s.generation, Ordering::Release);
                self.changed.notify_all();
            }
            Err(why) => self.stop_vm(&mut s, why),
        }
        drop(s);
        if let Some(observer) = self.observer.get() {
            observer(&handled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = crate::memory::PAGE_SIZE as usize;
    const GPA: u64 = 0x10_0000;

    fn range(start: usize, end: usize, event: Event, origin: Origin) -> Range {
        Range { start, end, exact_start: start, exact_end: end, event, origin, blockable: true }
    }

    /// A guard over 16 pages of guest RAM at [`GPA`] (a host range nobody maps: the callbacks
    /// below are driven by hand and no re-back runs), with its address space.
    fn guard() -> (TeardownGuard, Arc<AddressSpace>, usize) {
        // SAFETY: no region; nothing is mapped or touched.
        let space = unsafe { AddressSpace::new(&[]) }.expect("address space");
        let host = 0x7000_0000_0000usize;
        let spec = RegionSpec {
            host_addr: host,
            len: 16 * PAGE,
            backing: notifier::Backing::PrivateAnon,
            thp: false,
        };
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let g =
            TeardownGuard::new(TeardownPolicy::Reback, &space, vec![GuardedRegion { gpa: GPA, spec }], stop);
        (g, space, host)
    }

    /// A hole elsewhere in guest RAM holds back only a vCPU whose fault names no address.
    #[test]
    fn a_fault_waits_only_for_holes_overlapping_its_range() {
        let (g, _space, host) = guard();
        // An external unmap of pages 8..10 whose re-back has not run.
        g.invalidate_range_start(&range(host + 8 * PAGE, host + 10 * PAGE, Event::Unmap, Origin::External))
            .unwrap();
        // Something else was made writable again meanwhile: the generation moves.
        let restore = Event::Protect { prot: libc::PROT_READ | libc::PROT_WRITE };
        g.invalidate_range_end(&range(host, host + PAGE, restore, Origin::Vmm));
        let stop = AtomicBool::new(false);
        let short = Duration::from_millis(100);
        assert_eq!(g.wait_backed(0, Some((GPA + 2 * PAGE as u64, 8)), &stop, short), Ok(()));
        let in_hole = g.wait_backed(0, Some((GPA + 9 * PAGE as u64, 8)), &stop, short);
        assert!(in_hole.as_ref().is_err_and(|e| e.contains("still unmapped")), "{in_hole:?}");
        let unknown = g.wait_backed(0, None, &stop, short);
        assert!(unknown.as_ref().is_err_and(|e| e.contains("still unmapped")), "{unknown:?}");
    }

    /// A fault that names no address waits for the holes open when it began, not for holes
    /// opened later: a steady stream of external unmaps elsewhere cannot starve it (a CI run saw
    /// a verifier make 1 pass where its sibling made 211).
    #[test]
    fn a_hole_opened_during_the_wait_does_not_hold_the_vcpu() {
        let (g, _space, host) = guard();
        let first = range(host + 8 * PAGE, host + 10 * PAGE, Event::Unmap, Origin::External);
        let later = range(host + 12 * PAGE, host + 14 * PAGE, Event::Unmap, Origin::External);
        g.invalidate_range_start(&first).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| g.wait_backed(g.generation(), None, &stop, Duration::from_secs(10)));
            // Rendezvous: the waiter has taken its snapshot of the open holes (it counts itself
            // as waiting under the lock it took the snapshot with) before the next one opens.
            while g.lock().waiting == 0 {
                assert!(!waiter.is_finished(), "the waiter returned with its hole still open");
                std::thread::yield_now();
            }
            g.invalidate_range_start(&later).unwrap();
            // The first hole is re-backed; the later one stays open.
            g.invalidate_range_end(&first);
            assert_eq!(waiter.join().unwrap(), Ok(()));
        });
        assert_eq!(g.lock().holes.len(), 1, "the later hole is still open");
        // A new fault now waits for that one.
        let again = g.wait_backed(g.generation(), None, &stop, Duration::from_millis(100));
        assert!(again.as_ref().is_err_and(|e| e.contains("still unmapped")), "{again:?}");
        // SAFETY: the re-back mapped these pages for this test only; nothing else uses them.
        unsafe { libc::munmap((host + 8 * PAGE) as *mut libc::c_void, 2 * PAGE) };
    }

    /// A vCPU waiting on a protection that is never lifted returns once the VM stops.
    #[test]
    fn a_wait_on_a_protection_ends_when_the_vm_stops() {
        let (g, _space, host) = guard();
        let read_only = Event::Protect { prot: libc::PROT_READ };
        g.invalidate_range_start(&range(host, host + 4 * PAGE, read_only, Origin::Vmm)).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| g.wait_backed(0, None, &stop, Duration::from_millis(100)));
            // Longer than the timeout: the protection keeps the wait going, unbounded.
            std::thread::sleep(Duration::from_millis(300));
            assert!(!waiter.is_finished(), "the wait must last while the protection does");
            stop.store(true, Ordering::Release);
            assert_eq!(waiter.join().unwrap(), Ok(()));
        });
        assert_eq!(g.report().protect_faults, 1);
    }
}
