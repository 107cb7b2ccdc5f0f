//! External operations through the userfaultfd monitor. Needs userfaultfd (root here): the tests
//! fail loudly when it cannot be opened.

mod common;
use common::*;

use std::sync::mpsc;
use std::sync::Arc;

use notifier::{DiscardMethod, Event, Monitor, MonitorOptions, Origin, Range, Subscriber};

const P: usize = 4096;

/// Sends every range (at end) to a channel: the rendezvous for "the notification arrived".
struct Chan(std::sync::Mutex<mpsc::Sender<Range>>);
impl Subscriber for Chan {
    fn invalidate_range_end(&self, r: &Range) {
        let _ = self.0.lock().unwrap().send(*r);
    }
}

fn setup(pages: usize) -> (Map, Arc<notifier::AddressSpace>, mpsc::Receiver<Range>, Monitor) {
    let m = Map::anon(pages * P, P, false);
    m.fill(3);
    let s = space(&[m.spec(false)]);
    let (tx, rx) = mpsc::channel();
    s.subscribe(Arc::new(Chan(std::sync::Mutex::new(tx)))).unwrap();
    let mon = Monitor::start(&s, MonitorOptions::default())
        .expect("userfaultfd is required for these tests (run as root; /dev/userfaultfd)");
    (m, s, rx, mon)
}

fn on_thread(f: impl FnOnce() -> i32 + Send + 'static) {
    assert_eq!(std::thread::spawn(f).join().unwrap(), 0);
}

#[test]
fn external_madvise_reaches_subscribers_with_exact_range() {
    let (m, s, rx, mon) = setup(64);
    let a = m.addr();
    for adv in [libc::MADV_DONTNEED, libc::MADV_FREE] {
        // SAFETY: test mapping.
        on_thread(move || unsafe { libc::madvise((a + 4 * P) as *mut _, 3 * P, adv) });
        let r = rx.recv().unwrap();
        assert_eq!((r.start, r.end), (a + 4 * P, a + 7 * P));
        assert_eq!(r.event, Event::Discard(DiscardMethod::Unknown));
        assert_eq!(r.origin, Origin::External);
    }
    assert_eq!(m.get(4 * P), 0);
    let st = s.stats().monitor.unwrap();
    assert_eq!((st.remove, st.external, st.own), (2, 2, 0));
    mon.stop().unwrap();
}

#[test]
fn external_munmap_and_mremap() {
    let (m, s, rx, mon) = setup(64);
    let a = m.addr();
    // SAFETY: test mapping.
    on_thread(move || unsafe { libc::munmap((a + 8 * P) as *mut _, 2 * P) });
    let r = rx.recv().unwrap();
    assert_eq!((r.start, r.end, r.event, r.origin), (a + 8 * P, a + 10 * P, Event::Unmap, Origin::External));
    let regs: Vec<_> = s.regions().iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(regs, vec![(a, a + 8 * P), (a + 10 * P, a + 64 * P)]);
    assert!(s.discard(a + 8 * P, P).is_err(), "no syscall on externally unmapped RAM");
    // mremap a sub-range to a free spot.
    let d = Map::anon(4 * P, P, false);
    let dst = d.addr();
    // SAFETY: test mappings.
    on_thread(move || unsafe {
        let q = libc::mremap(
            (a + 20 * P) as *mut _,
            2 * P,
            2 * P,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst as *mut libc::c_void,
        );
        (q == libc::MAP_FAILED) as i32
    });
    let r = rx.recv().unwrap();
    assert_eq!((r.start, r.end, r.event), (a + 20 * P, a + 22 * P, Event::Remap { new_start: dst }));
    assert!(s.regions().iter().any(|r| (r.start, r.end) == (dst, dst + 2 * P)));
    // The UNMAP the kernel sends after the REMAP is not notified again; fence with a madvise.
    // SAFETY: test mapping.
    on_thread(move || unsafe { libc::madvise(a as *mut _, P, libc::MADV_DONTNEED) });
    let r = rx.recv().unwrap();
    assert_eq!((r.start, r.event), (a, Event::Discard(DiscardMethod::Unknown)));
    let st = s.stats().monitor.unwrap();
    // UNMAPs read: the munmap's, and the one the kernel queues after the REMAP.
    assert_eq!((st.unmap, st.remap, st.remove, st.external), (2, 1, 1, 3), "{st:?}");
    assert_eq!(st.remap_unmaps, 1, "the UNMAP after the REMAP is folded into the move");
    assert_eq!(st.outside, 0, "{st:?}");
    // The moved region is still monitored.
    // SAFETY: mapped by the mremap.
    on_thread(move || unsafe { libc::madvise(dst as *mut _, P, libc::MADV_DONTNEED) });
    let r = rx.recv().unwrap();
    assert_eq!((r.start, r.end, r.origin), (dst, dst + P, Origin::External));
    mon.stop().unwrap();
    drop(d);
}

#[test]
fn own_operations_are_notified_once() {
    let (m, s, rx, mon) = setup(64);
    let a = m.addr();
    s.discard(a, 2 * P).unwrap();
    s.unmap(a + 10 * P, P).unwrap();
    // The destination must be free address space (a remap never maps over anything).
    let (dst, _) = remap_to_hole(&s, a + 20 * P, 2 * P);
    let _moved = Unmapper(dst, 2 * P);
    s.discard(dst, P).unwrap();
    let mut got: Vec<(Origin, Event)> =
        (0..4).map(|_| rx.recv().unwrap()).map(|r| (r.origin, r.event)).collect();
    // Fence: an external op; had an own event been forwarded, it would arrive first.
    // SAFETY: test mapping.
    on_thread(move || unsafe { libc::madvise((a + 40 * P) as *mut _, P, libc::MADV_DONTNEED) });
    let r = rx.recv().unwrap();
    assert_eq!(
        (r.start, r.origin),
        (a + 40 * P, Origin::External),
        "a={a:#x} dst={dst:#x} {r:x?} {got:?} {:?}",
        s.stats().monitor
    );
    got.dedup();
    assert!(got.iter().all(|(o, _)| *o == Origin::Vmm));
    let st = s.stats().monitor.unwrap();
    // discard: REMOVE; unmap: UNMAP; remap: REMAP + UNMAP; discard: REMOVE.
    assert!(st.own >= 5, "{st:?}");
    assert_eq!(st.external, 1, "{st:?}");
    assert!(rx.try_recv().is_err());
    mon.stop().unwrap();
}

#[test]
fn punch_hole_produces_no_event() {
    let len = 16 * P;
    // SAFETY: memfd and shared mapping for the test.
    let (fd, base) = unsafe {
        let fd = libc::memfd_create(c"g".as_ptr(), libc::MFD_CLOEXEC);
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (fd, p as usize)
    };
    let s = space(&[notifier::RegionSpec {
        host_addr: base,
        len,
        backing: notifier::Backing::SharedMemfd { fd, offset: 0 },
        thp: false,
    }]);
    let (tx, rx) = mpsc::channel();
    s.subscribe(Arc::new(Chan(std::sync::Mutex::new(tx)))).unwrap();
    let mon = Monitor::start(&s, MonitorOptions::default()).expect("userfaultfd required (root)");
    // External punch hole: the kernel sends nothing.
    // SAFETY: plain fallocate.
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, P as i64,) },
        0
    );
    // API punch hole: notified once by the API.
    s.discard(base + P, P).unwrap();
    assert_eq!(rx.recv().unwrap().origin, Origin::Vmm);
    // Fence.
    on_thread(move || unsafe { libc::madvise((base + 2 * P) as *mut _, P, libc::MADV_REMOVE) });
    let r = rx.recv().unwrap();
    assert_eq!((r.start, r.origin), (base + 2 * P, Origin::External));
    let st = s.stats().monitor.unwrap();
    assert_eq!((st.events, st.own), (1, 0));
    mon.stop().unwrap();
    // SAFETY: test resources.
    unsafe {
        libc::munmap(base as *mut _, len);
        libc::close(fd);
    }
}

#[test]
fn faults_stay_in_the_kernel() {
    let (m, s, rx, mon) = setup(256);
    s.discard(m.addr(), 256 * P).unwrap();
    rx.recv().unwrap();
    m.fill(1); // first touch of every page after a discard: no monitor round trip
    for off in (0..256 * P).step_by(P) {
        assert_eq!(m.get(off), 1);
    }
    assert_eq!(s.stats().monitor.unwrap().other, 0, "no page-fault events");
    mon.stop().unwrap();
}

#[test]
fn unsubscribe_during_external_storm() {
    let (m, s, rx, mon) = setup(64);
    let a = m.addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: test mapping.
                unsafe { libc::madvise((a + (i % 64) * P) as *mut _, P, libc::MADV_DONTNEED) };
                i += 1;
            }
            i
        })
    };
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    struct Guarded(Arc<std::sync::atomic::AtomicBool>, std::sync::atomic::AtomicU64);
    impl Subscriber for Guarded {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), notifier::Refused> {
            assert!(!self.0.load(std::sync::atomic::Ordering::SeqCst), "removed subscriber called");
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn invalidate_range_end(&self, _: &Range) {
            assert!(!self.0.load(std::sync::atomic::Ordering::SeqCst), "removed subscriber called");
        }
    }
    for _ in 0..200 {
        let g = Arc::new(Guarded(gone.clone(), Default::default()));
        gone.store(false, std::sync::atomic::Ordering::SeqCst);
        let id = s.subscribe(g.clone()).unwrap();
        // Rendezvous: wait until it saw at least one external range.
        while g.1.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            rx.recv().unwrap();
        }
        let st = s.unsubscribe(id).unwrap();
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(st.starts + st.joined, st.ends, "{st:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(storm.join().unwrap() > 0);
    mon.stop().unwrap();
}
