#![allow(dead_code)]
//! Test helpers: real mappings and a recording subscriber.

use std::sync::{Arc, Mutex};

use notifier::{AddressSpace, Backing, Range, Refused, RegionSpec, Subscriber};

pub const MB2: usize = 2 << 20;

/// An anonymous private mapping, aligned to `align`, unmapped on drop.
pub struct Map {
    pub base: *mut u8,
    raw: *mut u8,
    raw_len: usize,
    pub len: usize,
}

unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl Map {
    pub fn anon(len: usize, align: usize, thp: bool) -> Map {
        let raw_len = len + align;
        // SAFETY: anonymous mapping at a kernel-chosen address.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let base = ((raw as usize + align - 1) & !(align - 1)) as *mut u8;
        if thp {
            // SAFETY: advice on our own mapping.
            assert_eq!(unsafe { libc::madvise(base as *mut _, len, libc::MADV_HUGEPAGE) }, 0);
        }
        Map { base, raw: raw as *mut u8, raw_len, len }
    }

    pub fn addr(&self) -> usize {
        self.base as usize
    }

    /// Writes `v` at the first byte of every page.
    pub fn fill(&self, v: u8) {
        for off in (0..self.len).step_by(4096) {
            // SAFETY: inside our mapping; raw pointer access only.
            unsafe { self.base.add(off).write_volatile(v) };
        }
    }

    pub fn get(&self, off: usize) -> u8 {
        // SAFETY: inside our mapping.
        unsafe { self.base.add(off).read_volatile() }
    }

    pub fn set(&self, off: usize, v: u8) {
        // SAFETY: inside our mapping.
        unsafe { self.base.add(off).write_volatile(v) }
    }

    pub fn spec(&self, thp: bool) -> RegionSpec {
        RegionSpec { host_addr: self.addr(), len: self.len, backing: Backing::PrivateAnon, thp }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our mapping (parts may already be unmapped; munmap ignores holes).
        unsafe { libc::munmap(self.raw as *mut _, self.raw_len) };
    }
}

pub fn space(specs: &[RegionSpec]) -> Arc<AddressSpace> {
    // SAFETY: test mappings are accessed through raw pointers only.
    unsafe { AddressSpace::new(specs) }.expect("address space")
}

pub type Probe = Box<dyn Fn(Phase, &Range) + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Start,
    Range,
    End,
    Joined,
    Release,
}

/// Records every callback; optionally refuses the first `refuse` non-blockable starts and runs a
/// probe at each phase.
#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<(Phase, Range)>>,
    pub refuse: Mutex<u32>,
    pub probe: Mutex<Option<Probe>>,
    pub name: String,
}

impl Recorder {
    pub fn new(name: &str) -> Arc<Recorder> {
        Arc::new(Recorder { name: name.into(), ..Default::default() })
    }
    pub fn take(&self) -> Vec<(Phase, Range)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    pub fn phases(&self) -> Vec<Phase> {
        self.log.lock().unwrap().iter().map(|x| x.0).collect()
    }
    fn rec(&self, p: Phase, r: &Range) {
        if let Some(f) = self.probe.lock().unwrap().as_ref() {
            f(p, r);
        }
        self.log.lock().unwrap().push((p, *r));
    }
}

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Refused> {
        if !r.blockable {
            let mut n = self.refuse.lock().unwrap();
            if *n > 0 {
                *n -= 1;
                return Err(Refused);
            }
        }
        self.rec(Phase::Start, r);
        Ok(())
    }
    fn invalidate_range(&self, r: &Range) {
        self.rec(Phase::Range, r);
    }
    fn invalidate_range_end(&self, r: &Range) {
        self.rec(Phase::End, r);
    }
    fn invalidate_range_joined(&self, r: &Range) {
        self.rec(Phase::Joined, r);
    }
    fn release(&self) {
        self.log.lock().unwrap().push((
            Phase::Release,
            Range {
                start: 0,
                end: 0,
                exact_start: 0,
                exact_end: 0,
                event: notifier::Event::Release,
                origin: notifier::Origin::Vmm,
                blockable: true,
            },
        ));
    }
}

/// Moves `[start, start + len)` of `s` to free address space and returns the destination. The
/// destination must be free (`remap` refuses to map over anything); a hole is made by mapping and
/// unmapping, and taken again if another thread's mmap took it meanwhile (`DestinationOccupied`:
/// nothing was touched).
pub fn remap_to_hole(s: &AddressSpace, start: usize, len: usize) -> (usize, notifier::OpReport) {
    for _ in 0..100 {
        // SAFETY: a fresh inaccessible mapping at a kernel-chosen address, unmapped at once.
        let hole = unsafe {
            let q = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            assert_ne!(q, libc::MAP_FAILED);
            libc::munmap(q, len);
            q as usize
        };
        match s.remap(start, len, hole) {
            Ok(rep) => return (hole, rep),
            Err(notifier::Error::DestinationOccupied { .. }) => continue,
            Err(e) => panic!("remap: {e}"),
        }
    }
    panic!("no free hole for a remap in 100 tries");
}

/// Unmaps `[addr, addr + len)` (a remap destination the test owns) on drop.
pub struct Unmapper(pub usize, pub usize);
impl Drop for Unmapper {
    fn drop(&mut self) {
        // SAFETY: the test's own mapping.
        unsafe { libc::munmap(self.0 as *mut _, self.1) };
    }
}
