//! VMM-initiated operations: ordering, validation, refusal, intervals, THP widening, counters.

mod common;
use common::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use notifier::{DiscardMethod, Error, Event, OpOptions, Origin, Range, Subscriber};

const P: usize = 4096;

#[test]
fn order_is_start_syscall_range_end() {
    let m = Map::anon(16 * P, P, false);
    m.fill(0xab);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let (seen, base) = (seen.clone(), m.addr());
        *rec.probe.lock().unwrap() = Some(Box::new(move |p, r: &Range| {
            // SAFETY: inside the test mapping.
            let v = unsafe { ((r.exact_start) as *const u8).read_volatile() };
            assert!(r.exact_start >= base);
            seen.lock().unwrap().push((p, v));
        }));
    }
    s.subscribe(rec.clone()).unwrap();
    let rep = s.discard(m.addr() + 4 * P, 2 * P).unwrap();
    assert_eq!(rep.range.start, m.addr() + 4 * P);
    assert_eq!(rep.range.end, m.addr() + 6 * P);
    assert_eq!(rep.range.event, Event::Discard(DiscardMethod::DontNeed));
    assert_eq!(rep.range.origin, Origin::Vmm);
    assert_eq!(rec.phases(), vec![Phase::Start, Phase::Range, Phase::End]);
    // Data still there at start (before the syscall), gone at invalidate_range and end.
    assert_eq!(*seen.lock().unwrap(), vec![(Phase::Start, 0xab), (Phase::Range, 0), (Phase::End, 0)]);
    assert_eq!(m.get(3 * P), 0xab);
    assert_eq!(m.get(6 * P), 0xab);
}

#[test]
fn bad_input_is_rejected_without_syscall_or_callback() {
    let m = Map::anon(16 * P, P, false);
    m.fill(0xcd);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let a = m.addr();
    assert!(matches!(s.discard(a, 0), Err(Error::Empty)));
    assert!(matches!(s.discard(a + 1, P), Err(Error::Unaligned { .. })));
    assert!(matches!(s.discard(a, P + 7), Err(Error::Unaligned { .. })));
    assert!(matches!(s.discard(a + 15 * P, 2 * P), Err(Error::NotMapped { .. })));
    assert!(matches!(s.discard(a - P, P), Err(Error::NotMapped { .. })));
    assert!(matches!(s.discard(usize::MAX & !(P - 1), 2 * P), Err(Error::Overflow)));
    assert!(matches!(s.unmap(a + 16 * P, P), Err(Error::NotMapped { .. })));
    assert!(matches!(s.protect(a + 3, P, libc::PROT_READ), Err(Error::Unaligned { .. })));
    assert!(matches!(s.remap(a, P, a + 8 * P), Err(Error::DestinationOverlaps { .. })));
    assert!(matches!(
        s.discard_with(a, P, OpOptions { discard: Some(DiscardMethod::PunchHole), ..Default::default() }),
        Err(Error::Method(DiscardMethod::PunchHole))
    ));
    assert!(rec.take().is_empty(), "no callback for rejected input");
    for off in (0..16 * P).step_by(P) {
        assert_eq!(m.get(off), 0xcd, "no syscall for rejected input");
    }
    assert!(s.stats().kinds.iter().all(|k| k.starts == 0));
}

#[test]
fn refusal_aborts_before_syscall_and_pairs_ends() {
    let m = Map::anon(8 * P, P, false);
    m.fill(1);
    let s = space(&[m.spec(false)]);
    let first = Recorder::new("first");
    let refuser = Recorder::new("refuser");
    let third = Recorder::new("third");
    *refuser.refuse.lock().unwrap() = 1;
    s.subscribe(first.clone()).unwrap();
    let rid = s.subscribe(refuser.clone()).unwrap();
    s.subscribe(third.clone()).unwrap();
    let nb = OpOptions { blockable: false, ..Default::default() };
    match s.discard_with(m.addr(), P, nb) {
        Err(Error::Refused { subscriber, name }) => {
            assert_eq!(subscriber, rid);
            assert_eq!(name, "refuser");
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    assert_eq!(m.get(0), 1, "no syscall after a refusal");
    assert_eq!(first.phases(), vec![Phase::Start, Phase::End]);
    assert!(refuser.phases().is_empty());
    assert!(third.phases().is_empty());
    // Retries: refuse twice, then accept.
    first.take();
    *refuser.refuse.lock().unwrap() = 2;
    let rep = s.discard_with(m.addr(), P, OpOptions { max_retries: 3, ..nb }).unwrap();
    assert_eq!(rep.retries, 2);
    assert_eq!(m.get(0), 0);
    assert_eq!(refuser.phases(), vec![Phase::Start, Phase::Range, Phase::End]);
    let st = s.stats();
    let d = st.kinds.iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert_eq!((d.starts, d.ends, d.refusals, d.retries), (4, 4, 3, 2));
    let r = st.subscribers.iter().find(|x| x.name == "refuser").unwrap();
    assert_eq!((r.starts, r.ends, r.refusals), (1, 1, 3));
    // Refusing a blockable range is a contract violation: counted and ignored (the op proceeds).
    struct Stubborn;
    impl Subscriber for Stubborn {
        fn name(&self) -> &str {
            "stubborn"
        }
        fn invalidate_range_start(&self, _: &Range) -> Result<(), notifier::Refused> {
            Err(notifier::Refused)
        }
    }
    s.subscribe(Arc::new(Stubborn)).unwrap();
    m.fill(1);
    s.discard(m.addr(), P).unwrap();
    assert_eq!(m.get(0), 0);
    let st = s.stats();
    let r = st.subscribers.iter().find(|x| x.name == "stubborn").unwrap();
    assert_eq!((r.starts, r.ends, r.refusals), (1, 1, 1));
    serde_json::to_string(&s.stats()).unwrap();
}

#[test]
fn intervals_see_only_overlapping_ranges() {
    let m = Map::anon(64 * P, P, false);
    let s = space(&[m.spec(false)]);
    let a = Recorder::new("a");
    let b = Recorder::new("b");
    s.subscribe_range(a.clone(), m.addr(), 16 * P).unwrap();
    s.subscribe_range(b.clone(), m.addr() + 16 * P, 16 * P).unwrap();
    s.discard(m.addr() + 20 * P, P).unwrap();
    assert!(a.phases().is_empty());
    assert_eq!(b.phases().len(), 3);
    s.discard(m.addr() + 15 * P, 2 * P).unwrap();
    assert_eq!(a.phases().len(), 3);
    assert_eq!(b.phases().len(), 6);
    s.discard(m.addr() + 40 * P, P).unwrap();
    assert_eq!((a.phases().len(), b.phases().len()), (3, 6));
}

fn anon_huge_kb(addr: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                    inside = lo <= addr && addr < hi;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = l.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches(" kB").trim().parse().unwrap();
            }
        }
    }
    0
}

/// A table of 4 KiB and 2 MiB translations kept with seq-retry, like the VMM's.
struct Table {
    small: std::collections::BTreeMap<usize, usize>,
    huge: std::collections::BTreeMap<usize, usize>,
}

#[test]
fn thp_cut_is_widened_and_no_translation_survives_a_discard() {
    let len = 8 * MB2;
    let m = Map::anon(len, MB2, true);
    m.fill(7);
    assert!(anon_huge_kb(m.addr()) >= 2048, "test needs THP-backed memory (THP mode madvise/always)");
    let s = space(&[m.spec(true)]);
    let t = s
        .subscribe_interval(
            "table",
            m.addr(),
            len,
            Table { small: Default::default(), huge: Default::default() },
            |t: &mut Table, r: &Range| {
                t.small.retain(|_, h| !r.overlaps(*h, *h + P));
                t.huge.retain(|_, h| !r.overlaps(*h, *h + MB2));
            },
        )
        .unwrap();
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let install_all = || {
        let seq = t.read_begin();
        let mut g = t.lock();
        assert!(!t.read_retry(&g, seq));
        for i in 0..len / MB2 {
            g.huge.insert(i, m.addr() + i * MB2);
        }
        for i in 0..len / P {
            g.small.insert(i, m.addr() + i * P);
        }
    };
    // 4 KiB pieces of a THP, a piece crossing two THPs, and whole 2 MiB pages.
    let cases = [(MB2 + 3 * P, P), (3 * MB2 - P, 2 * P), (5 * MB2, MB2), (6 * MB2, 2 * MB2)];
    for (off, l) in cases {
        m.fill(7);
        install_all();
        let rep = s.discard(m.addr() + off, l).unwrap();
        let (ws, we) = (m.addr() + (off & !(MB2 - 1)), m.addr() + ((off + l + MB2 - 1) & !(MB2 - 1)));
        assert_eq!((rep.range.start, rep.range.end), (ws, we), "widened to whole 2 MiB pages");
        assert_eq!((rep.range.exact_start, rep.range.exact_end), (m.addr() + off, m.addr() + off + l));
        let (_, r) = rec.take()[0];
        assert_eq!(r, rep.range);
        // Every page whose contents changed is inside the notified range, and no translation
        // (4 KiB or 2 MiB) overlapping it survived.
        for p in (0..len).step_by(P) {
            if m.get(p) != 7 {
                assert!(ws <= m.addr() + p && m.addr() + p < we);
            }
        }
        let g = t.lock();
        assert!(g.small.values().all(|h| !rep.range.overlaps(*h, *h + P)));
        assert!(g.huge.values().all(|h| !rep.range.overlaps(*h, *h + MB2)));
        assert_eq!(g.huge.len(), len / MB2 - (we - ws) / MB2);
        assert_eq!(g.small.len(), len / P - (we - ws) / P);
    }
}

#[test]
fn unmap_remap_protect_update_regions_and_notify() {
    let m = Map::anon(32 * P, P, false);
    m.fill(9);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let a = m.addr();
    let r = s.unmap(a + 8 * P, 4 * P).unwrap().range;
    assert_eq!((r.start, r.end, r.event), (a + 8 * P, a + 12 * P, Event::Unmap));
    let regs: Vec<(usize, usize)> = s.regions().iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(regs, vec![(a, a + 8 * P), (a + 12 * P, a + 32 * P)]);
    assert!(matches!(s.discard(a + 8 * P, P), Err(Error::NotMapped { .. })));
    m.set(20 * P, 42);
    // The destination must be free address space (a remap never maps over anything).
    let (d, rep) = remap_to_hole(&s, a + 20 * P, 4 * P);
    let _moved = Unmapper(d, 4 * P);
    let r = rep.range;
    assert_eq!(r.event, Event::Remap { new_start: d });
    // SAFETY: the destination is mapped now.
    assert_eq!(unsafe { (d as *const u8).read_volatile() }, 42);
    let regs: Vec<(usize, usize)> = s.regions().iter().map(|r| (r.start, r.end)).collect();
    assert!(regs.contains(&(d, d + 4 * P)));
    assert!(regs.contains(&(a + 12 * P, a + 20 * P)) && regs.contains(&(a + 24 * P, a + 32 * P)));
    s.discard(d, P).unwrap();
    // SAFETY: still mapped.
    assert_eq!(unsafe { (d as *const u8).read_volatile() }, 0);
    let r = s.protect(a, P, libc::PROT_READ).unwrap().range;
    assert_eq!(r.event, Event::Protect { prot: libc::PROT_READ });
    s.protect(a, P, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    assert_eq!(rec.phases().len(), 5 * 3);
    s.unmap(d, 4 * P).unwrap();
}

/// Unmaps `[at, at + len)` through `s`, maps fresh private memory at exactly that place and
/// gives it back with `add_region` (as the VMM's teardown guard does), with `thp` widening.
fn give_back(s: &notifier::AddressSpace, at: usize, len: usize, thp: bool) {
    s.unmap(at, len).unwrap();
    // SAFETY: the range was just unmapped through the address space and is the test's own;
    // MAP_FIXED_NOREPLACE maps nothing over anyone else's memory.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, at, "the hole at {at:#x} is free");
    let spec = notifier::RegionSpec { host_addr: at, len, backing: notifier::Backing::PrivateAnon, thp };
    // SAFETY: mapped above, accessed through raw pointers only.
    unsafe { s.add_region(&spec) }.unwrap();
}

fn spans(s: &notifier::AddressSpace) -> Vec<(usize, usize)> {
    s.regions().iter().map(|r| (r.start, r.end)).collect()
}

/// Guest RAM given back piece by piece (unmapped, mapped again at the same place, added back)
/// is one region again, not a list that grows at every round: a discard across the old seams
/// works, and the list every event walks stays as short as the memory is.
#[test]
fn regions_given_back_piece_by_piece_merge_again() {
    let m = Map::anon(32 * P, P, false);
    let s = space(&[m.spec(false)]);
    let a = m.addr();
    for round in 0..3 {
        for piece in [8, 0, 24, 16] {
            give_back(&s, a + piece * P, 8 * P, false);
        }
        assert_eq!(spans(&s), vec![(a, a + 32 * P)], "round {round}");
    }
    // Across the seams of the pieces: one region, one discard.
    s.discard(a + 4 * P, 24 * P).unwrap();
    // A piece with other THP widening stays its own region.
    give_back(&s, a + 8 * P, 8 * P, true);
    assert_eq!(s.regions().len(), 3);
}

/// Two regions given to the address space separately stay two even where they touch, also after
/// a piece at their seam was given back: the caller keeps a record per region it gave, and an
/// external event must not arrive as one piece spanning two of them.
#[test]
fn regions_given_separately_never_merge_across_their_seam() {
    let m = Map::anon(32 * P, P, false);
    let a = m.addr();
    let half = |at: usize| notifier::RegionSpec {
        host_addr: at,
        len: 16 * P,
        backing: notifier::Backing::PrivateAnon,
        thp: false,
    };
    let s = space(&[half(a), half(a + 16 * P)]);
    let separate = vec![(a, a + 16 * P), (a + 16 * P, a + 32 * P)];
    assert_eq!(spans(&s), separate);
    // The last piece of the first region, next to the seam, given back.
    give_back(&s, a + 12 * P, 4 * P, false);
    assert_eq!(spans(&s), separate);
    // A discard across the seam is refused as before (one operation stays inside one region).
    assert!(matches!(s.discard(a + 15 * P, 2 * P), Err(Error::NotMapped { .. })));
}

#[test]
fn memfd_discard_methods() {
    let len = 16 * P;
    // SAFETY: plain syscalls on our own memfd and mapping.
    let (fd, base) = unsafe {
        let fd = libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
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
        (fd, p as *mut u8)
    };
    let s = space(&[notifier::RegionSpec {
        host_addr: base as usize,
        len,
        backing: notifier::Backing::SharedMemfd { fd, offset: 0 },
        thp: false,
    }]);
    // SAFETY: the fd was duplicated by the address space.
    unsafe { libc::close(fd) };
    let set = |i: usize, v: u8| unsafe { base.add(i * P).write_volatile(v) };
    let get = |i: usize| unsafe { base.add(i * P).read_volatile() };
    for i in 0..16 {
        set(i, 5);
    }
    let r = s.discard(base as usize + P, P).unwrap().range;
    assert_eq!(r.event, Event::Discard(DiscardMethod::PunchHole));
    assert_eq!((get(0), get(1), get(2)), (5, 0, 5));
    let o = OpOptions { discard: Some(DiscardMethod::Remove), ..Default::default() };
    s.discard_with(base as usize + 2 * P, P, o).unwrap();
    assert_eq!(get(2), 0);
    let o = OpOptions { discard: Some(DiscardMethod::DontNeed), ..Default::default() };
    s.discard_with(base as usize + 3 * P, P, o).unwrap();
    assert_eq!(get(3), 5, "DONTNEED keeps shared data in the page cache (`docs/host.md`)");
    // SAFETY: our mapping.
    unsafe { libc::munmap(base as *mut _, len) };
}

#[test]
fn release_is_last_and_ends_operations() {
    let m = Map::anon(8 * P, P, false);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    s.release().unwrap();
    let log = rec.take();
    assert_eq!(log.len(), 4);
    assert_eq!(log[0].1.event, Event::Release);
    assert_eq!(log[3].0, Phase::Release);
    assert!(matches!(s.discard(m.addr(), P), Err(Error::Released)));
    assert!(matches!(s.subscribe(rec.clone()), Err(Error::Released)));
}

#[test]
fn unsubscribe_from_a_callback_is_refused_not_deadlocked() {
    struct Selfish {
        space: Mutex<Option<Arc<notifier::AddressSpace>>>,
        id: Mutex<Option<notifier::SubscriptionId>>,
        result: Mutex<Option<bool>>,
    }
    impl Subscriber for Selfish {
        fn invalidate_range_start(&self, _: &Range) -> Result<(), notifier::Refused> {
            let s = self.space.lock().unwrap().clone().unwrap();
            let id = self.id.lock().unwrap().unwrap();
            *self.result.lock().unwrap() = Some(matches!(s.unsubscribe(id), Err(Error::InCallback)));
            Ok(())
        }
    }
    let m = Map::anon(8 * P, P, false);
    let s = space(&[m.spec(false)]);
    let sub = Arc::new(Selfish {
        space: Mutex::new(Some(s.clone())),
        id: Mutex::new(None),
        result: Mutex::new(None),
    });
    let id = s.subscribe(sub.clone()).unwrap();
    *sub.id.lock().unwrap() = Some(id);
    s.discard(m.addr(), P).unwrap();
    assert_eq!(*sub.result.lock().unwrap(), Some(true));
    s.unsubscribe(id).unwrap();
    *sub.space.lock().unwrap() = None;
}

/// The `tracing` hook records each range at start and end.
#[test]
fn tracing_records_each_range() {
    use tracing::field::{Field, Visit};
    #[derive(Default)]
    struct Cap(Mutex<Vec<(String, usize, usize)>>);
    struct V(String, usize, usize);
    impl Visit for V {
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            if f.name() == "phase" {
                self.0 = format!("{v:?}");
            }
        }
        fn record_str(&mut self, f: &Field, v: &str) {
            if f.name() == "phase" {
                self.0 = v.to_string();
            }
        }
        fn record_u64(&mut self, f: &Field, v: u64) {
            match f.name() {
                "start" => self.1 = v as usize,
                "end" => self.2 = v as usize,
                _ => {}
            }
        }
    }
    struct Sub(Arc<Cap>);
    impl tracing::Subscriber for Sub {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            m.target() == "notifier::range"
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            let mut v = V(String::new(), 0, 0);
            e.record(&mut v);
            self.0 .0.lock().unwrap().push((v.0, v.1, v.2));
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    let cap = Arc::new(Cap::default());
    let m = Map::anon(8 * P, P, false);
    let s = space(&[m.spec(false)]);
    tracing::subscriber::with_default(Sub(cap.clone()), || {
        s.discard(m.addr() + P, 2 * P).unwrap();
    });
    let got = cap.0.lock().unwrap().clone();
    let (a, b) = (m.addr() + P, m.addr() + 3 * P);
    assert_eq!(got, vec![("start".into(), a, b), ("end".into(), a, b)]);
}

#[test]
fn counters_per_kind_and_subscriber() {
    let m = Map::anon(16 * P, P, false);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    let n = AtomicUsize::new(0);
    for i in 0..5 {
        s.discard(m.addr() + i * P, P).unwrap();
        n.fetch_add(1, Ordering::Relaxed);
    }
    s.protect(m.addr(), P, libc::PROT_READ).unwrap();
    let st = s.stats();
    let d = st.kinds.iter().find(|k| k.kind == "discard" && k.origin == "vmm").unwrap();
    assert_eq!((d.starts, d.ends, d.bytes), (5, 5, 5 * P as u64));
    let p = st.kinds.iter().find(|k| k.kind == "protect" && k.origin == "vmm").unwrap();
    assert_eq!((p.starts, p.ends), (1, 1));
    let r = &st.subscribers[0];
    assert_eq!((r.starts, r.invalidates, r.ends), (6, 6, 6));
    let json = serde_json::to_value(&st).unwrap();
    assert!(json["kinds"].is_array() && json["subscribers"][0]["name"] == "rec");
}
