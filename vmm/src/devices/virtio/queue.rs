//! Split virtqueues (virtio 1.2, §2.7), read and written through the VMM's table.
//!
//! This is hand-written rather than taken from the `virtio-queue` crate because that crate reads
//! guest memory through vm-memory's `GuestMemory` directly: its accesses would bypass the VMM's
//! second-level table ([`crate::mmu::GuestMmu`]) and with it the notifier's invalidation
//! protocol (docs/memory-layer.md). Here every access to the descriptor table, the
//! available ring, the used ring and the buffers goes through a `&dyn GuestMemoryAccess`.
//!
//! # Hostile guests
//! Nothing the guest writes can make this code panic or touch host memory outside guest RAM:
//! - ring addresses are checked (alignment, and that the whole ring is guest RAM) when the queue
//!   is made ready ([`Queue::validate`]); a ring that later becomes unreadable is an
//!   [`QueueError`] (the device needs a reset), never a fault;
//! - an available index more than `size` ahead of the device is a [`QueueError`];
//! - a head or `next` index outside the table, a chain longer than the queue (a loop), a buffer
//!   whose `addr + len` overflows, and an indirect descriptor (the feature is never offered) make
//!   the *chain* bad ([`ChainError`]): the device counts it and returns the head with length 0.
//!
//! `VIRTIO_RING_F_EVENT_IDX` is not offered, so the device interrupts after every batch it uses.

use std::sync::atomic::{fence, Ordering};

use crate::mmu::{AccessError, GuestMemoryAccess};

pub use guest_abi::virtio::ring::{DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

/// Errors that make a whole queue unusable (the device sets DEVICE_NEEDS_RESET).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// A ring could not be read or written.
    #[error("ring access failed: {0}")]
    Access(#[from] AccessError),
    /// The driver's available index is more than the queue size ahead of the device.
    #[error("available index {avail} is {ahead} entries ahead of the device (queue size {size})")]
    AvailTooFar {
        /// The driver's index.
        avail: u16,
        /// How far ahead.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// The queue is not ready.
    #[error("queue is not ready")]
    NotReady,
}

/// Errors of a single descriptor chain (counted; the queue keeps working).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index in the available ring is outside the descriptor table.
    #[error("head index {0} is outside the descriptor table")]
    HeadOutOfRange(u16),
    /// A `next` index is outside the descriptor table.
    #[error("next index {0} is outside the descriptor table")]
    NextOutOfRange(u16),
    /// More descriptors than the queue has: a loop.
    #[error("chain longer than the queue size {0} (a descriptor loop)")]
    TooLong(u16),
    /// `addr + len` overflows.
    #[error("buffer {addr:#x} + {len:#x} overflows")]
    Overflow {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// An indirect descriptor (VIRTIO_RING_F_INDIRECT_DESC is not offered).
    #[error("indirect descriptor (not negotiated)")]
    Indirect,
    /// A descriptor could not be read.
    #[error("descriptor read failed: {0}")]
    Access(AccessError),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address (not yet checked against guest RAM: accesses through the table
    /// check it).
    pub addr: u64,
    /// Length; `addr + len` does not overflow.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A chain the driver made available, with every descriptor already fetched and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorChain {
    /// The head index (what goes back in the used ring).
    pub head: u16,
    /// The descriptors in chain order (at most the queue size).
    pub descriptors: Vec<Descriptor>,
}

impl DescriptorChain {
    /// The device-readable descriptors.
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| !d.write)
    }

    /// The device-writable descriptors.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| d.write)
    }
}

/// What [`Queue::pop`] found at the next available entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Popped {
    /// A well-formed chain.
    Chain(DescriptorChain),
    /// A malformed chain. `head` is `Some` when it is a valid index (the device should return it
    /// to the driver with length 0), `None` when the head itself was out of range.
    Bad {
        /// The head, if it can be returned.
        head: Option<u16>,
        /// What was wrong.
        error: ChainError,
    },
}

/// The driver-visible configuration of one queue and the device's position in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum as written by the driver (checked by [`Queue::validate`]).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc_table: u64,
    /// QueueDriver (the available ring).
    pub avail_ring: u64,
    /// QueueDevice (the used ring).
    pub used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    /// A queue of at most `max_size` entries, not ready; QueueNum starts at `max_size`.
    pub fn new(max_size: u16) -> Self {
        Self { max_size, size: max_size, ..Default::default() }
    }

    /// Back to the state after [`Queue::new`].
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Bytes of the available ring (flags, idx, ring, used_event).
    pub fn avail_ring_len(size: u16) -> u64 {
        6 + 2 * size as u64
    }

    /// Bytes of the used ring (flags, idx, ring, avail_event).
    pub fn used_ring_len(size: u16) -> u64 {
        6 + 8 * size as u64
    }

    /// Checks the configuration before the queue becomes ready: the size is a power of two in
    /// `1..=max_size`, the rings are aligned (16, 2, 4 bytes) and each ring lies in guest RAM
    /// (checked by reading it through `mem`). Returns a description of the first problem.
    pub fn validate(&self, mem: &dyn GuestMemoryAccess) -> Result<(), String> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!("queue size {} is not a power of two in 1..={}", self.size, self.max_size));
        }
        let rings = [
            ("descriptor table", self.desc_table, 16, DESC_SIZE * self.size as u64),
            ("available ring", self.avail_ring, 2, Self::avail_ring_len(self.size)),
            ("used ring", self.used_ring, 4, Self::used_ring_len(self.size)),
        ];
        for (name, addr, align, len) in rings {
            if addr % align != 0 {
                return Err(format!("{name} at {addr:#x} is not {align}-byte aligned"));
            }
            let mut buf = vec![0u8; len as usize];
            mem.read(addr, &mut buf).map_err(|e| format!("{name} [{addr:#x}, +{len:#x}): {e}"))?;
        }
        Ok(())
    }

    /// Readies the device side (positions at 0) after [`Queue::validate`] passed.
    pub fn mark_ready(&mut self) {
        self.ready = true;
        self.next_avail = 0;
        self.next_used = 0;
    }

    /// The device's next available index.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The device's next used index.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    fn read_u16(mem: &dyn GuestMemoryAccess, gpa: u64) -> Result<u16, AccessError> {
        let mut b = [0u8; 2];
        mem.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// How many chains the driver made available that the device has not popped yet.
    pub fn pending(&self, mem: &dyn GuestMemoryAccess) -> Result<u16, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let avail = Self::read_u16(mem, self.avail_ring + 2)?;
        let ahead = avail.wrapping_sub(self.next_avail);
        if ahead > self.size {
            return Err(QueueError::AvailTooFar { avail, ahead, size: self.size });
        }
        Ok(ahead)
    }

    /// Takes the next available chain, or `None` when there is none. A malformed chain is
    /// consumed and returned as [`Popped::Bad`]; a ring problem is an `Err` and consumes
    /// nothing. Reads field by field (the index, the slot, each descriptor): for a device that
    /// takes one chain at a time; [`Queue::pop_all`] takes a notify's chains with one read each
    /// of the ring and the descriptor table.
    pub fn pop(&mut self, mem: &dyn GuestMemoryAccess) -> Result<Option<Popped>, QueueError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        // The driver writes the ring entry before the index (virtio 1.2, §2.7.13): order our
        // reads of the entry and the descriptors after the read of the index.
        fence(Ordering::Acquire);
        let slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size) as u64;
        let head = Self::read_u16(mem, slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let desc_table = self.desc_table;
        let mut fetch = |index: u16| {
            let mut raw = [0u8; DESC_SIZE as usize];
            mem.read(desc_table + DESC_SIZE * index as u64, &mut raw).map(|()| raw)
        };
        Ok(Some(self.classify(head, &mut fetch)))
    }

    /// Takes every chain the driver has made available so far, in ring order (empty when there
    /// is none), with **one** read of the available index, one read of the ring entries (two
    /// when they wrap around the end of the ring) and one read of the whole descriptor table,
    /// instead of a translated access per field. A ring problem is an `Err` and consumes
    /// nothing; a malformed chain is consumed and returned as [`Popped::Bad`].
    ///
    /// Reading the table once is sound: the chains returned were made available before the
    /// index was read (the driver writes descriptors, then ring entries, then the index), and
    /// until the device returns a chain its descriptors belong to the device (§2.7.13), so a
    /// conforming driver does not change them under the snapshot; a hostile one can change
    /// anything at any time, and every descriptor is checked as it is parsed either way.
    pub fn pop_all(&mut self, mem: &dyn GuestMemoryAccess) -> Result<Vec<Popped>, QueueError> {
        let ahead = self.pending(mem)?;
        if ahead == 0 {
            return Ok(Vec::new());
        }
        // As in `pop`: the entries and descriptors are read after the index.
        fence(Ordering::Acquire);
        let size = self.size as usize;
        let first = self.next_avail as usize % size;
        let mut raw_heads = vec![0u8; 2 * ahead as usize];
        let before_wrap = (size - first).min(ahead as usize);
        let (head_part, wrapped_part) = raw_heads.split_at_mut(2 * before_wrap);
        mem.read(self.avail_ring + 4 + 2 * first as u64, head_part)?;
        if !wrapped_part.is_empty() {
            mem.read(self.avail_ring + 4, wrapped_part)?;
        }
        self.next_avail = self.next_avail.wrapping_add(ahead);
        let mut table = vec![0u8; DESC_SIZE as usize * size];
        let table_read = mem.read(self.desc_table, &mut table);
        let mut fetch = |index: u16| match &table_read {
            Ok(()) => {
                let at = DESC_SIZE as usize * index as usize;
                Ok(table[at..at + DESC_SIZE as usize].try_into().expect("16 bytes"))
            }
            Err(e) => Err(e.clone()),
        };
        Ok(raw_heads
            .chunks_exact(2)
            .map(|h| self.classify(u16::from_le_bytes([h[0], h[1]]), &mut fetch))
            .collect())
    }

    fn classify(
        &self,
        head: u16,
        fetch: &mut dyn FnMut(u16) -> Result<[u8; DESC_SIZE as usize], AccessError>,
    ) -> Popped {
        match self.read_chain(head, fetch) {
            Ok(chain) => Popped::Chain(chain),
            Err(error @ ChainError::HeadOutOfRange(_)) => Popped::Bad { head: None, error },
            Err(error) => Popped::Bad { head: Some(head), error },
        }
    }

    /// Follows the chain at `head`; `fetch(i)` gives the raw descriptor `i` (`i < size`).
    fn read_chain(
        &self,
        head: u16,
        fetch: &mut dyn FnMut(u16) -> Result<[u8; DESC_SIZE as usize], AccessError>,
    ) -> Result<DescriptorChain, ChainError> {
        if head >= self.size {
            return Err(ChainError::HeadOutOfRange(head));
        }
        let mut descriptors = Vec::new();
        let mut index = head;
        loop {
            if descriptors.len() >= self.size as usize {
                return Err(ChainError::TooLong(self.size));
            }
            let raw = fetch(index).map_err(ChainError::Access)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
            let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            if addr.checked_add(len as u64).is_none() {
                return Err(ChainError::Overflow { addr, len });
            }
            descriptors.push(Descriptor { addr, len, write: flags & VIRTQ_DESC_F_WRITE != 0 });
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(DescriptorChain { head, descriptors });
            }
            if next >= self.size {
                return Err(ChainError::NextOutOfRange(next));
            }
            index = next;
        }
    }

    /// Puts `head` in the used ring with `len` bytes written, then publishes the new used index.
    pub fn add_used(&mut self, mem: &dyn GuestMemoryAccess, head: u16, len: u32) -> Result<(), QueueError> {
        self.add_used_all(mem, &[(head, len)])
    }

    /// Puts every `(head, len)` of `used` in the used ring, in order, with one write of the
    /// elements (two when they wrap around the end of the ring) per `size` of them, then
    /// publishes the new used index with one write. The driver sees none of them before all
    /// are written (the index is written last, after a release fence).
    pub fn add_used_all(
        &mut self,
        mem: &dyn GuestMemoryAccess,
        used: &[(u16, u32)],
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if used.is_empty() {
            return Ok(());
        }
        let size = self.size as usize;
        let mut next = self.next_used;
        // At most `size` elements per publication: more would overwrite unpublished ones.
        for part in used.chunks(size) {
            let mut elems = Vec::with_capacity(8 * part.len());
            for &(head, len) in part {
                elems.extend_from_slice(&(head as u32).to_le_bytes());
                elems.extend_from_slice(&len.to_le_bytes());
            }
            let first = next as usize % size;
            let before_wrap = (size - first).min(part.len());
            let (head_part, wrapped_part) = elems.split_at(8 * before_wrap);
            mem.write(self.used_ring + 4 + 8 * first as u64, head_part)?;
            if !wrapped_part.is_empty() {
                mem.write(self.used_ring + 4, wrapped_part)?;
            }
            // The entries must be visible before the index that publishes them.
            fence(Ordering::Release);
            next = next.wrapping_add(part.len() as u16);
            mem.write(self.used_ring + 2, &next.to_le_bytes())?;
            self.next_used = next;
        }
        Ok(())
    }
}

/// Reads the device-readable part of `chain` into one buffer of at most `limit` bytes.
/// Errors (as text) when it is larger than `limit` or a buffer is not guest RAM.
pub fn read_readable(
    mem: &dyn GuestMemoryAccess,
    chain: &DescriptorChain,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let total: u64 = chain.readable().map(|d| d.len as u64).sum();
    if total > limit as u64 {
        return Err(format!("readable buffers hold {total} bytes, more than the limit {limit}"));
    }
    let mut out = vec![0u8; total as usize];
    let mut at = 0usize;
    for d in chain.readable() {
        let piece = &mut out[at..at + d.len as usize];
        mem.read(d.addr, piece).map_err(|e| e.to_string())?;
        at += d.len as usize;
    }
    Ok(out)
}

/// The device-readable parts of several chains, each into one buffer, with **one**
/// [`GuestMemoryAccess::read_scattered`] over all their buffers: `Some(bytes)` for each chain
/// `wanted` accepts and whose readable part is at most `limit` bytes, `None` for the others and
/// for every chain when that read failed (the caller then reads them one by one with
/// [`read_readable`], which names the failure).
pub fn read_readable_all(
    mem: &dyn GuestMemoryAccess,
    chains: &[DescriptorChain],
    wanted: impl Fn(&DescriptorChain) -> bool,
    limit: usize,
) -> Vec<Option<Vec<u8>>> {
    let mut out: Vec<Option<Vec<u8>>> = chains
        .iter()
        .map(|c| {
            let total: u64 = c.readable().map(|d| d.len as u64).sum();
            (wanted(c) && total <= limit as u64).then(|| vec![0u8; total as usize])
        })
        .collect();
    let mut reads: Vec<(u64, &mut [u8])> = Vec::new();
    for (chain, bytes) in chains.iter().zip(out.iter_mut()) {
        let Some(bytes) = bytes else { continue };
        let mut rest = bytes.as_mut_slice();
        for d in chain.readable() {
            let (piece, tail) = rest.split_at_mut(d.len as usize);
            reads.push((d.addr, piece));
            rest = tail;
        }
    }
    let ok = mem.read_scattered(&mut reads).is_ok();
    drop(reads);
    if !ok {
        out.iter_mut().for_each(|b| *b = None);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::{Address, Bytes, GuestAddress};

    /// A driver's view of a split queue laid out in guest memory, for tests.
    pub(crate) struct TestRing {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub avail_idx: u16,
    }

    impl TestRing {
        /// Rings at `base` (page-aligned): descriptors, then avail at +0x1000, used at +0x2000.
        pub fn new(size: u16, base: u64) -> Self {
            Self { size, desc: base, avail: base + 0x1000, used: base + 0x2000, avail_idx: 0 }
        }

        pub fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(self.desc + 16 * i as u64);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }

        /// Makes `head` available and publishes the index.
        pub fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
        }

        pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used element `i` as (id, len).
        pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * (i % self.size) as u64;
            (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
        }

        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size);
            q.desc_table = self.desc;
            q.avail_ring = self.avail;
            q.used_ring = self.used;
            q
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn pops_chains_and_writes_used() {
        let mem = memory();
        let mut ring = TestRing::new(8, 0x10000);
        ring.set_desc(&mem, 0, 0x20000, 100, VIRTQ_DESC_F_NEXT, 3);
        ring.set_desc(&mem, 3, 0x21000, 50, VIRTQ_DESC_F_WRITE, 0);
        ring.push(&mem, 0);
        let mut q = ring.queue();
        q.validate(&mem).unwrap();
        q.mark_ready();
        let Some(Popped::Chain(chain)) = q.pop(&mem).unwrap() else { panic!("no chain") };
        assert_eq!(chain.head, 0);
        assert_eq!(
            chain.descriptors,
            [
                Descriptor { addr: 0x20000, len: 100, write: false },
                Descriptor { addr: 0x21000, len: 50, write: true }
            ]
        );
        assert_eq!(q.pop(&mem).unwrap(), None);
        q.add_used(&mem, 0, 50).unwrap();
        assert_eq!(ring.used_idx(&mem), 1);
        assert_eq!(ring.used_elem(&mem, 0), (0, 50));
    }

    #[test]
    fn hostile_chains_are_errors() {
        let mem = memory();
        let mut ring = TestRing::new(4, 0x10000);
        // Loop 0 -> 1 -> 0.
        ring.set_desc(&mem, 0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 1);
        ring.set_desc(&mem, 1, 0x20000, 4, VIRTQ_DESC_F_NEXT, 0);
        // Next out of range.
        ring.set_desc(&mem, 2, 0x20000, 4, VIRTQ_DESC_F_NEXT, 9);
        // Overflowing buffer.
        ring.set_desc(&mem, 3, u64::MAX - 2, 4, 0, 0);
        let mut q = ring.queue();
        q.mark_ready();
        for head in [0, 2, 3, 7] {
            ring.push(&mem, head);
        }
        let errors: Vec<Popped> = std::iter::from_fn(|| q.pop(&mem).unwrap()).collect();
        assert_eq!(
            errors,
            [
                Popped::Bad { head: Some(0), error: ChainError::TooLong(4) },
                Popped::Bad { head: Some(2), error: ChainError::NextOutOfRange(9) },
                Popped::Bad { head: Some(3), error: ChainError::Overflow { addr: u64::MAX - 2, len: 4 } },
                Popped::Bad { head: None, error: ChainError::HeadOutOfRange(7) },
            ]
        );
        // The driver claims 100 new entries on a 4-entry queue.
        mem.write_obj(ring.avail_idx.wrapping_add(100), GuestAddress(ring.avail + 2)).unwrap();
        assert!(matches!(q.pop(&mem), Err(QueueError::AvailTooFar { .. })));
    }

    /// Counts the accesses made through it (one per `read`/`write` call).
    pub(crate) struct Counting {
        pub inner: std::sync::Arc<dyn GuestMemoryAccess>,
        pub reads: std::sync::atomic::AtomicU64,
        pub writes: std::sync::atomic::AtomicU64,
    }

    impl Counting {
        pub fn new(inner: std::sync::Arc<dyn GuestMemoryAccess>) -> Self {
            Self { inner, reads: Default::default(), writes: Default::default() }
        }

        /// (reads, writes) since the last call.
        pub fn take(&self) -> (u64, u64) {
            (self.reads.swap(0, Ordering::Relaxed), self.writes.swap(0, Ordering::Relaxed))
        }
    }

    impl GuestMemoryAccess for Counting {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read(gpa, buf)
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.inner.write(gpa, buf)
        }
        /// One access, as the inner memory may make it one operation.
        fn read_scattered(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), AccessError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_scattered(reads)
        }
    }

    /// A notify's chains cost one read of the index, one of the ring entries (two across the
    /// end of the ring) and one of the descriptor table, however many chains and descriptors;
    /// their used entries one write of the elements (two across the end) and one of the index.
    #[test]
    fn pop_all_and_add_used_all_access_each_ring_once() {
        let mem = std::sync::Arc::new(memory());
        let mut ring = TestRing::new(8, 0x10000);
        let mut q = ring.queue();
        q.mark_ready();
        let counting = Counting::new(mem.clone());
        // Start at slot 6 so that the five chains below wrap around the end of the ring.
        for _ in 0..6 {
            ring.set_desc(&mem, 0, 0x20000, 4, 0, 0);
            ring.push(&mem, 0);
        }
        assert_eq!(q.pop_all(&counting).unwrap().len(), 6);
        q.add_used_all(&counting, &[(0, 0); 6]).unwrap();
        counting.take();
        // Five chains of two descriptors each: (0, 1), (2, 3), ...
        for c in 0..5u16 {
            ring.set_desc(&mem, 2 * c, 0x20000 + 0x1000 * c as u64, 8, VIRTQ_DESC_F_NEXT, 2 * c + 1);
            ring.set_desc(&mem, 2 * c + 1, 0x30000 + 0x1000 * c as u64, 16, VIRTQ_DESC_F_WRITE, 0);
        }
        // Chain 4's head (8) is outside the 8-entry table: a bad chain, and no extra read.
        for c in 0..5u16 {
            ring.push(&mem, 2 * c);
        }
        let popped = q.pop_all(&counting).unwrap();
        assert_eq!(counting.take(), (4, 0), "index, ring entries in two parts (wrap), the table");
        assert_eq!(popped.len(), 5);
        for (c, p) in popped.iter().enumerate().take(4) {
            let Popped::Chain(chain) = p else { panic!("chain {c}: {p:?}") };
            assert_eq!(chain.head, 2 * c as u16);
            assert_eq!(
                chain.descriptors,
                [
                    Descriptor { addr: 0x20000 + 0x1000 * c as u64, len: 8, write: false },
                    Descriptor { addr: 0x30000 + 0x1000 * c as u64, len: 16, write: true },
                ]
            );
        }
        assert_eq!(popped[4], Popped::Bad { head: None, error: ChainError::HeadOutOfRange(8) });
        assert!(q.pop_all(&counting).unwrap().is_empty());
        assert_eq!(counting.take(), (1, 0), "nothing new: the index only");
        let used: Vec<(u16, u32)> = (0..5).map(|c| (2 * c, 16)).collect();
        q.add_used_all(&counting, &used).unwrap();
        assert_eq!(counting.take(), (0, 3), "elements in two parts (wrap), then the index");
        assert_eq!(ring.used_idx(&mem), 11);
        for (i, &(head, len)) in used.iter().enumerate() {
            assert_eq!(ring.used_elem(&mem, 6 + i as u16), (head as u32, len));
        }
    }

    #[test]
    fn validate_refuses_bad_sizes_alignment_and_rings_outside_ram() {
        let mem = memory();
        let ring = TestRing::new(8, 0x10000);
        let mut q = ring.queue();
        q.size = 3;
        assert!(q.validate(&mem).is_err());
        q.size = 16;
        assert!(q.validate(&mem).is_err(), "above max");
        q.size = 8;
        q.desc_table = 0x10008;
        assert!(q.validate(&mem).is_err(), "misaligned");
        q.desc_table = (1 << 20) - 16;
        assert!(q.validate(&mem).is_err(), "crosses the end of RAM");
        q.desc_table = 0x10000;
        q.used_ring = 0x1_0000_0000;
        assert!(q.validate(&mem).is_err(), "outside RAM");
        q.used_ring = ring.used;
        q.validate(&mem).unwrap();
    }
}
