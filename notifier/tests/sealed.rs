//! Sealed guest RAM (`AddressSpace::mark_sealed`): the own unmap, remap and protect operations
//! are refused whole, before any subscriber hears of them and before any syscall; discards keep
//! working on memory the kernel really sealed.

mod common;
use common::*;

use notifier::Error;

const P: usize = 4096;

/// `mseal(2)`; libc has no wrapper.
const SYS_MSEAL: libc::c_long = 462;

/// A range only marked sealed (the kernel would allow everything): what the operations do is
/// the address space's own refusal, not the kernel's. Nothing is notified, nothing changes.
#[test]
fn unmap_remap_and_protect_of_a_sealed_range_are_refused_before_any_notification_or_syscall() {
    let m = Map::anon(16 * P, P, false);
    let dst = Map::anon(16 * P, P, false);
    m.fill(0x5a);
    let s = space(&[m.spec(false)]);
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    s.mark_sealed(m.addr() + 4 * P, 4 * P).unwrap();

    // Overlapping the sealed part by one page is enough.
    let e = s.unmap(m.addr() + 7 * P, 2 * P).unwrap_err();
    assert!(matches!(e, Error::Sealed { op: "unmap", .. }), "{e}");
    let e = s.remap(m.addr() + 4 * P, P, dst.addr()).unwrap_err();
    assert!(matches!(e, Error::Sealed { op: "remap", .. }), "{e}");
    let e = s.protect(m.addr(), 16 * P, libc::PROT_READ).unwrap_err();
    assert!(matches!(e, Error::Sealed { op: "protect", .. }), "{e}");
    assert!(e.to_string().contains("sealed (mseal)"), "{e}");

    assert!(rec.phases().is_empty(), "a refused operation notifies nobody: {:?}", rec.phases());
    // No syscall ran: still mapped, still writable, still there, still one region.
    m.set(5 * P, 0x77);
    assert_eq!(m.get(7 * P), 0x5a);
    assert_eq!(s.regions().len(), 1);
    // Outside the sealed part everything still works, and discards work inside it.
    s.protect(m.addr() + 12 * P, P, libc::PROT_READ).unwrap();
    s.protect(m.addr() + 12 * P, P, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    s.discard(m.addr() + 4 * P, 4 * P).unwrap();
    assert_eq!(m.get(5 * P), 0);
    assert!(s.is_sealed(m.addr() + 7 * P, m.addr() + 8 * P));
    assert!(!s.is_sealed(m.addr() + 8 * P, m.addr() + 16 * P));
}

#[test]
fn marking_a_range_outside_the_regions_is_an_error() {
    let m = Map::anon(4 * P, P, false);
    let s = space(&[m.spec(false)]);
    assert!(matches!(s.mark_sealed(m.addr() + 2 * P, 4 * P), Err(Error::NotMapped { .. })));
    assert!(matches!(s.mark_sealed(m.addr() + 1, P), Err(Error::Unaligned { .. })));
    assert!(!s.is_sealed(m.addr(), m.addr() + 4 * P));
}

/// Memory the kernel sealed: the notifier's discard (MADV_DONTNEED) works and reads zeros after,
/// subscribers get the usual start/range/end; unmap is refused by the address space (and would
/// be by the kernel).
#[test]
fn discards_of_really_sealed_memory_work_through_the_notifier() {
    let m = Map::anon(8 * P, P, false);
    m.fill(0xab);
    // SAFETY: mseal only restricts later changes of this test's own mapping; it touches no memory.
    let ret = unsafe { libc::syscall(SYS_MSEAL, m.addr(), 8 * P, 0) };
    assert_eq!(ret, 0, "mseal: {}", std::io::Error::last_os_error());
    let s = space(&[m.spec(false)]);
    s.mark_sealed(m.addr(), 8 * P).unwrap();
    let rec = Recorder::new("rec");
    s.subscribe(rec.clone()).unwrap();
    s.discard(m.addr() + 2 * P, 2 * P).unwrap();
    assert_eq!(rec.phases(), vec![Phase::Start, Phase::Range, Phase::End]);
    assert_eq!((m.get(2 * P), m.get(3 * P), m.get(4 * P)), (0, 0, 0xab));
    assert!(matches!(s.unmap(m.addr(), P), Err(Error::Sealed { .. })));
    // The kernel agrees: the mapping cannot go away (the Map's drop fails the same way; its
    // pages are discarded here so the test leaves nothing resident).
    // SAFETY: an munmap of this test's sealed mapping, which the kernel must refuse.
    assert_eq!(unsafe { libc::munmap(m.base.cast(), P) }, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    s.discard(m.addr(), 8 * P).unwrap();
}
