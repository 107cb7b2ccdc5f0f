use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{Direction, Entries, PAGE};

#[derive(Default)]
pub(super) struct StaleTranslations {
    armed: AtomicBool,
    left: AtomicUsize,
    fired: AtomicU64,
    /// Host page address -> the frame its stale entry still reaches.
    frames: Mutex<BTreeMap<usize, Box<[u8]>>>,
}

impl StaleTranslations {
    pub(super) fn arm(&self, pages: usize) {
        self.left.store(pages, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether the fault is armed (accesses must then look for stale frames first).
    #[inline]
    pub(super) fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    pub(super) fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// At `invalidate_range_start` of `[start, end)`, before the bits are cleared: the pages
    /// with an installed entry keep it, pointing at their current content.
    pub(super) fn keep_alive(&self, entries: &Entries, start: usize, end: usize) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let copier = fault_tolerant_copy::install().expect("installed by GuestMmu::new");
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let mut page = start & !(PAGE - 1);
        while page < end && self.left.load(Ordering::SeqCst) > 0 {
            let live =
                entries.pages.get(entries.page_index(page)) || entries.blocks.get(entries.block_index(page));
            if live && !frames.contains_key(&page) {
                let mut frame = vec![0u8; PAGE].into_boxed_slice();
                // SAFETY: `page` is guest RAM with an installed entry, read under the table
                // lock at invalidate_range_start, before the teardown's syscall; guest RAM is
                // never the target of a Rust reference; a fault is returned, not raised.
                if unsafe { copier.read(&mut frame, page as *const u8) }.is_ok() {
                    frames.insert(page, frame);
                    self.left.fetch_sub(1, Ordering::SeqCst);
                    self.fired.fetch_add(1, Ordering::SeqCst);
                }
            }
            page += PAGE;
        }
    }

    /// The bytes of an access at `hva` (`len` left, `done` already copied) served by a stale
    /// entry, or `None` when `hva`'s page has none.
    pub(super) fn access(
        &self,
        _copier: fault_tolerant_copy::Copier,
        hva: usize,
        len: usize,
        dir: Direction,
        done: usize,
    ) -> Option<usize> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let page = hva & !(PAGE - 1);
        let frame = frames.get_mut(&page)?;
        let offset = hva - page;
        let n = len.min(PAGE - offset);
        // SAFETY: the buffer of `dir` has `done + len` bytes (GuestMmu::access's caller's
        // buffer), exclusively borrowed for a read, only read for a write; the frame is ours.
        unsafe {
            match dir {
                Direction::Read(buf) => {
                    std::ptr::copy_nonoverlapping(frame[offset..].as_ptr(), buf.add(done), n)
                }
                Direction::Write(buf) => {
                    std::ptr::copy_nonoverlapping(buf.add(done), frame[offset..].as_mut_ptr(), n)
                }
            }
        }
        Some(n)
    }
}
