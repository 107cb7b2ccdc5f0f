//! A bare split virtqueue laid out from fuzz bytes.

use super::*;

/// Pops every chain of a queue laid out from fuzz bytes in 64 KiB of guest memory: the input
/// is the queue size (1 byte), the ring addresses' offsets, then memory contents. Checks that
/// popping never panics, stops, returns at most `size` descriptors per chain, and that
/// `add_used` of every returned head works.
pub fn run_virtqueue_fuzz(mem: &GuestMemoryMmap, data: &[u8]) {
    const LEN: u64 = 0x10000;
    let mut b = Bytes::new(data);
    let size = match b.u8() {
        s @ 0..=15 => s as u16,
        s => 1u16 << (s % 10),
    };
    let desc = (b.u16() as u64 % LEN) & !15;
    let avail = (b.u16() as u64 % LEN) & !1;
    let used = (b.u16() as u64 % LEN) & !3;
    let mut contents = vec![0u8; LEN as usize];
    let rest = &data[data.len().min(7)..];
    // The rest of the input is repeated over the descriptor table and the avail ring so that
    // short inputs shape both.
    for (i, byte) in rest.iter().enumerate() {
        contents[(desc as usize + i) % LEN as usize] = *byte;
        contents[(avail as usize + i) % LEN as usize] ^= *byte;
    }
    GuestMemoryAccess::write(mem, 0, &contents).expect("64 KiB of RAM");
    let mut q = Queue::new(size.max(1));
    q.size = size;
    q.desc_table = desc;
    q.avail_ring = avail;
    q.used_ring = used;
    if q.validate(mem).is_err() {
        return;
    }
    q.mark_ready();
    for _ in 0..=size as usize {
        match q.pop(mem) {
            Err(_) | Ok(None) => return,
            Ok(Some(Popped::Chain(chain))) => {
                assert!(chain.head < size);
                assert!(!chain.descriptors.is_empty() && chain.descriptors.len() <= size as usize);
                for d in &chain.descriptors {
                    assert!(d.addr.checked_add(d.len as u64).is_some());
                }
                let _ = q.add_used(mem, chain.head, 0);
            }
            Ok(Some(Popped::Bad { head, .. })) => {
                if let Some(h) = head {
                    assert!(h < size);
                    let _ = q.add_used(mem, h, 0);
                }
            }
        }
    }
    panic!("more than {size} chains popped from a queue of {size}");
}

/// 64 KiB of guest memory at 0 for [`run_virtqueue_fuzz`].
pub fn virtqueue_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).expect("guest memory")
}

/// The device trait in scope for callers that need `queue_max_sizes` etc.
pub fn queue_count<D: VirtioDevice>(t: &MmioTransport<D>) -> usize {
    t.device().queue_max_sizes().len()
}
