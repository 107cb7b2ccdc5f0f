//! The defects of issue 14 in the notifier (2-7, and 9's `release` from a callback), one test each:
//! each failed on the code before its fix (see the commit messages for how each failed).
//!
//! Hangs are caught by running the step on a thread with a generous deadline (`within`): the
//! deadline only turns a hang into a failure, nothing is measured.

mod common;
use common::*;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use notifier::{Error, Event, Monitor, MonitorOptions, Origin, Range, Refused, Subscriber};

const P: usize = 4096;

/// Generous: only a hang takes this long.
const HANG: Duration = Duration::from_secs(60);

/// Runs `f` on a thread; fails the test if it has not returned within [`HANG`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(v) => v,
        Err(_) => panic!("hung: {what}"),
    }
}

/// Panics in the callbacks named by its flags (each flag is cleared when it fires).
#[derive(Default)]
struct Panicker {
    on_start: AtomicBool,
    on_end: AtomicBool,
    fired: AtomicU32,
}

impl Panicker {
    fn fire(&self, flag: &AtomicBool, what: &str) {
        if flag.swap(false, Ordering::SeqCst) {
            self.fired.fetch_add(1, Ordering::SeqCst);
            panic!("planted subscriber panic in {what}");
        }
    }
}

impl Subscriber for Panicker {
    fn name(&self) -> &str {
        "panicker"
    }
    fn invalidate_range_start(&self, _: &Range) -> Result<(), Refused> {
        self.fire(&self.on_start, "invalidate_range_start");
        Ok(())
    }
    fn invalidate_range_end(&self, _: &Range) {
        self.fire(&self.on_end, "invalidate_range_end");
    }
}

/// D2: a start that panics must not leave the subscribers that already began without their end.
/// Before the fix `accepted` was 0 until the whole loop finished: the table's interval stayed in
/// progress and the next reader of the range blocked forever.
#[test]
fn panicking_start_still_ends_the_earlier_subscribers() {
    let m = Map::anon(16 * P, P, false);
    let s = space(&[m.spec(false)]);
    let table = s.subscribe_interval("table", m.addr(), 16 * P, (), |_, _| {}).unwrap();
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let p = Arc::new(Panicker::default());
    p.on_start.store(true, Ordering::SeqCst);
    s.subscribe(p.clone()).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| s.discard(m.addr(), P)));
    assert!(r.is_err(), "the subscriber's panic reaches the VMM's caller");
    assert_eq!(p.fired.load(Ordering::SeqCst), 1);
    assert_eq!(rec.phases(), vec![Phase::Start, Phase::End], "the earlier subscriber got its end");
    assert_eq!(table.in_progress(), 0, "the interval's invalidation ended");
    let k = s.stats().kinds.into_iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert_eq!((k.starts, k.ends, k.panics, k.bytes), (1, 1, 1, 0), "{k:?}");
    // A reader of the range does not block, and the next discard works.
    let t = table.sub.clone();
    let a = m.addr();
    within("read_begin after the panicking start", move || {
        let _ = t.read_begin_range(a, a + P);
    });
    s.discard(m.addr(), P).unwrap();
    assert_eq!(table.in_progress(), 0);
}

/// D3: an end that panics must not wedge unsubscribe and release: before the fix `finish` set
/// `ended` first, so the panic left the in-flight record and the thread's teardown depth behind
/// (unsubscribe on the same thread returned `InCallback` forever, on another it hung).
#[test]
fn panicking_end_still_ends_the_others_and_retires_the_teardown() {
    let m = Map::anon(16 * P, P, false);
    let s = space(&[m.spec(false)]);
    let p = Arc::new(Panicker::default());
    p.on_end.store(true, Ordering::SeqCst);
    let pid = s.subscribe(p.clone()).unwrap();
    let rec = Recorder::new("after");
    let rid = s.subscribe(rec.clone()).unwrap();
    let table = s.subscribe_interval("table", m.addr(), 16 * P, (), |_, _| {}).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| s.discard(m.addr(), P)));
    assert!(r.is_err(), "the end's panic reaches the VMM's caller");
    assert_eq!(rec.phases(), vec![Phase::Start, Phase::Range, Phase::End], "later subscribers got their end");
    assert_eq!(table.in_progress(), 0);
    // Same thread: no longer "inside a callback".
    let st = s.unsubscribe(rid).expect("unsubscribe after a panicking end");
    assert_eq!((st.starts, st.ends), (1, 1));
    // Another thread: the teardown was retired, nothing to wait for.
    let s2 = s.clone();
    let st = within("unsubscribe from another thread", move || s2.unsubscribe(pid)).unwrap();
    assert_eq!((st.starts, st.ends), (1, 1), "the panicking end counts as delivered");
    let s2 = s.clone();
    within("release", move || s2.release()).unwrap();
}

/// Sends every range (at end) to a channel: the rendezvous for "the notification arrived".
struct Chan(Mutex<mpsc::Sender<Range>>);
impl Subscriber for Chan {
    fn invalidate_range_end(&self, r: &Range) {
        let _ = self.0.lock().unwrap().send(*r);
    }
}

fn monitored(pages: usize) -> (Map, Arc<notifier::AddressSpace>, mpsc::Receiver<Range>) {
    let m = Map::anon(pages * P, P, false);
    m.fill(3);
    let s = space(&[m.spec(false)]);
    let (tx, rx) = mpsc::channel();
    s.subscribe(Arc::new(Chan(Mutex::new(tx)))).unwrap();
    (m, s, rx)
}

fn start_monitor(s: &Arc<notifier::AddressSpace>) -> Monitor {
    Monitor::start(s, MonitorOptions::default())
        .expect("userfaultfd is required for these tests (run as root; /dev/userfaultfd)")
}

/// An external `madvise(DONTNEED)` of `[a, a + len)` from another thread, which must return.
fn external_dontneed(a: usize, len: usize) {
    within("external madvise", move || {
        // SAFETY: a test mapping, accessed through raw pointers only.
        assert_eq!(unsafe { libc::madvise(a as *mut _, len, libc::MADV_DONTNEED) }, 0);
    });
}

fn recv(rx: &mpsc::Receiver<Range>, what: &str) -> Range {
    rx.recv_timeout(HANG).unwrap_or_else(|_| panic!("not notified: {what}"))
}

/// D4: a subscriber that panics on the monitor's worker must not cost later external teardowns:
/// before the fix the worker died and the reader dropped every later event (`let _ = tx.send`).
/// Now the panic is contained (every other subscriber still gets start and end), counted, and
/// the next event is delivered.
#[test]
fn panicking_subscriber_on_the_worker_loses_no_external_teardown() {
    let (m, s, rx) = monitored(64);
    let p = Arc::new(Panicker::default());
    p.on_start.store(true, Ordering::SeqCst);
    // Subscribed after the channel: its start panics after the channel's start ran, and the
    // channel must still hear that teardown's end.
    s.subscribe(p.clone()).unwrap();
    let mon = start_monitor(&s);
    let a = m.addr();
    external_dontneed(a, P);
    let r = recv(&rx, "the teardown whose subscriber panicked");
    assert_eq!((r.start, r.origin), (a, Origin::External));
    assert_eq!(p.fired.load(Ordering::SeqCst), 1);
    external_dontneed(a + 8 * P, P);
    let r = recv(&rx, "the next external teardown");
    assert_eq!((r.start, r.end, r.origin), (a + 8 * P, a + 9 * P, Origin::External));
    mon.stop().expect("a contained panic does not fail the monitor");
    // After stop: the worker has finished counting.
    let k = s.stats().kinds.into_iter().find(|k| k.kind == "discard" && k.origin == "external").unwrap();
    assert_eq!((k.starts, k.ends, k.panics), (2, 2, 1), "{k:?}");
}

/// D5: `remap` onto memory that is mapped (here: a live allocation that is not guest RAM) must
/// fail and leave that memory alone. Before the fix MREMAP_FIXED silently replaced it: Ok, and
/// the allocation then held guest data and was registered as guest RAM.
#[test]
fn remap_onto_a_live_mapping_is_refused() {
    let m = Map::anon(16 * P, P, false);
    m.fill(0x55);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let heap = Map::anon(4 * P, P, false);
    heap.fill(0xAA);
    let e = s.remap(m.addr(), 4 * P, heap.addr()).expect_err("the destination is occupied");
    assert!(matches!(e, Error::DestinationOccupied { .. }), "{e}");
    for off in (0..4 * P).step_by(P) {
        assert_eq!(heap.get(off), 0xAA, "the foreign allocation is untouched");
        assert_eq!(m.get(off), 0x55, "guest RAM did not move");
    }
    let regs: Vec<_> = s.regions().iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(regs, vec![(m.addr(), m.addr() + 16 * P)], "the regions did not change");
    assert_eq!(rec.phases(), vec![Phase::Start, Phase::End], "an aborted operation still ends");
}

/// D6: an external `mremap(MREMAP_DONTUNMAP)` is followed by no UNMAP; before the fix the reader
/// still armed its REMAP/UNMAP pairing, which later swallowed an unrelated external munmap of
/// the old range (here after the VMM put guest RAM there again, as its teardown guard does).
#[test]
fn mremap_dontunmap_arms_no_pairing() {
    let (m, s, rx) = monitored(64);
    let mon = start_monitor(&s);
    let a = m.addr();
    let old = a + 20 * P;
    let scratch = Map::anon(4 * P, P, false);
    let dst = scratch.addr();
    within("external mremap(DONTUNMAP)", move || {
        // SAFETY: test mappings; the destination is our scratch mapping (replaced atomically).
        let q = unsafe {
            libc::mremap(
                old as *mut _,
                2 * P,
                2 * P,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                dst as *mut libc::c_void,
            )
        };
        assert_ne!(q, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    });
    let r = recv(&rx, "the move");
    assert_eq!((r.start, r.end, r.event), (old, old + 2 * P, Event::Remap { new_start: dst }));
    // The old range is still mapped (DONTUNMAP): guest RAM is put there again.
    // SAFETY: still mapped; accessed through raw pointers only.
    unsafe {
        s.add_region(&notifier::RegionSpec {
            host_addr: old,
            len: 2 * P,
            backing: notifier::Backing::PrivateAnon,
            thp: false,
        })
    }
    .unwrap();
    // An unrelated external munmap of it must be notified, before the fence.
    within("external munmap", move || {
        // SAFETY: the test's own mapping.
        assert_eq!(unsafe { libc::munmap(old as *mut _, 2 * P) }, 0);
    });
    external_dontneed(a, P);
    let r = recv(&rx, "the munmap");
    assert_eq!((r.start, r.end, r.event), (old, old + 2 * P, Event::Unmap), "the munmap was swallowed");
    let r = recv(&rx, "the fence");
    assert_eq!(r.start, a);
    let st = s.stats().monitor.unwrap();
    assert_eq!((st.remap, st.remap_unmaps, st.remap_dontunmap), (1, 0, 1), "{st:?}");
    mon.stop().unwrap();
    drop(scratch);
}

/// D7: a failed userfaultfd read must not leave guest RAM registered with nobody reading: before
/// the fix the reader just returned, the next external madvise of guest RAM blocked in the kernel
/// forever, and so did `Monitor::stop` behind an own discard stuck the same way.
#[test]
fn failed_read_releases_guest_ram_and_stop_reports_it() {
    let (m, s, rx) = monitored(64);
    let mon = start_monitor(&s);
    let a = m.addr();
    external_dontneed(a, P);
    recv(&rx, "before the fault");
    mon.plant_fault_fail_next_read();
    // This one's read fails: the caller must still return (the userfaultfd is released).
    external_dontneed(a + P, P);
    // And later ones too, and the VMM's own operations.
    external_dontneed(a + 2 * P, P);
    let s2 = s.clone();
    within("own discard after the failure", move || s2.discard(a + 3 * P, P)).unwrap();
    assert_eq!(recv(&rx, "own discard").origin, Origin::Vmm);
    let st = s.stats().monitor.unwrap();
    assert!(st.failed.as_deref().is_some_and(|f| f.contains("planted")), "{st:?}");
    let e = within("Monitor::stop", move || mon.stop()).expect_err("stop reports the failure");
    assert!(matches!(e, Error::MonitorFailed(ref why) if why.contains("read failed")), "{e}");
    // A new monitor works again.
    let mon = start_monitor(&s);
    external_dontneed(a + 4 * P, P);
    let r = recv(&rx, "with a new monitor");
    assert_eq!((r.start, r.origin), (a + 4 * P, Origin::External));
    mon.stop().unwrap();
}

/// D9: `release()` from inside a callback must fail without setting `released`; before the fix
/// it set the flag and then failed with `InCallback`, so the later real release returned at once
/// and no subscriber ever got `release()`.
#[test]
fn release_from_a_callback_changes_nothing() {
    let m = Map::anon(16 * P, P, false);
    let s = space(&[m.spec(false)]);
    struct Releaser(Mutex<Option<Arc<notifier::AddressSpace>>>, Mutex<Option<Error>>);
    impl Subscriber for Releaser {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), Refused> {
            let space = self.0.lock().unwrap().take();
            if let Some(s) = space {
                *self.1.lock().unwrap() = s.release().err();
            }
            Ok(())
        }
    }
    let rel = Arc::new(Releaser(Mutex::new(Some(s.clone())), Mutex::new(None)));
    s.subscribe(rel.clone()).unwrap();
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    s.discard(m.addr(), P).unwrap();
    assert!(matches!(*rel.1.lock().unwrap(), Some(Error::InCallback)));
    s.discard(m.addr(), P).expect("the address space was not released");
    s.release().unwrap();
    assert_eq!(rec.phases().last(), Some(&Phase::Release), "{:?}", rec.phases());
}
