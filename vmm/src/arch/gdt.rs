//! The GDT, TSS and IDT the VMM builds for a guest entered directly in 64-bit mode.
//!
//! One layout serves both the test guest and Linux's 64-bit boot protocol (which needs flat
//! `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18): see [`guest_abi::selectors`]. Each vCPU gets its
//! own TSS (so that an exception taken from ring 3 lands on that vCPU's own ring-0 stack).
//!
//! All TSSes share one I/O permission bitmap that allows every port. Architecturally IOPL = 3
//! already lets ring 3 use `in`/`out`, but PVM runs guest ring 3 in host ring 3 and emulates
//! port I/O after the #GP, checking the guest TSS's bitmap whatever IOPL says (seen here: with
//! IOPL 3 and a TSS without bitmap, the test guest's first `out` raised #GP). With the bitmap,
//! both kinds of host agree.

use guest_abi::selectors;
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{GDT_START, IDT_START, IO_BITMAP_SIZE, IO_BITMAP_START, TSS_START, TSS_STRIDE};

/// The most vCPUs the GDT page holds TSS descriptors for.
pub const MAX_VCPUS: u32 = ((4096 - selectors::FIRST_TSS as u64) / 16) as u32;
/// Byte offset of RSP0 inside a 64-bit TSS.
const TSS_RSP0: u64 = 4;
/// Byte offset of the I/O map base inside a 64-bit TSS.
const TSS_IOMAP_BASE: u64 = 102;

// That the TSSes of `MAX_VCPUS` vCPUs and the bitmap fit is checked in `layout`.

/// vCPU `index`'s TSS address and limit (the limit reaches to the end of the shared bitmap).
fn tss(index: usize) -> (u64, u32) {
    let base = TSS_START + index as u64 * TSS_STRIDE;
    (base, (IO_BITMAP_START + IO_BITMAP_SIZE - base) as u32)
}

/// A code or data descriptor: `flags` holds the access byte (bits 0-7) and the G/DB/L/AVL
/// nibble (bits 12-15), as in the Intel SDM's figure of a segment descriptor.
const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

const KERNEL_CODE64: u16 = 0xa09b; // G, L, present, DPL 0, code exec/read accessed
const KERNEL_DATA: u16 = 0xc093; // G, DB, present, DPL 0, data read/write accessed
const USER_DATA: u16 = 0xc0f3; // as KERNEL_DATA with DPL 3
const USER_CODE64: u16 = 0xa0fb; // as KERNEL_CODE64 with DPL 3
const TSS_AVAILABLE: u16 = 0x0089; // present, type 9 (64-bit TSS available)

/// Writes the GDT (with one TSS descriptor per vCPU), the TSSes and their I/O bitmap, and zeroes
/// the IDT page.
///
/// `rsp0` gives each vCPU's ring-0 stack top; pass none for a guest that never uses the TSS
/// (Linux loads its own).
pub fn write_tables<M: GuestMemory>(mem: &M, rsp0: &[u64]) -> Result<(), vm_memory::GuestMemoryError> {
    assert!(rsp0.len() <= MAX_VCPUS as usize, "callers check the vCPU count first");
    let mut gdt = vec![0u64; selectors::FIRST_TSS as usize / 8 + 2 * rsp0.len()];
    gdt[1] = descriptor(KERNEL_CODE64, 0, 0xfffff);
    gdt[selectors::KERNEL_CODE as usize / 8] = descriptor(KERNEL_CODE64, 0, 0xfffff);
    gdt[selectors::KERNEL_DATA as usize / 8] = descriptor(KERNEL_DATA, 0, 0xfffff);
    gdt[selectors::USER_DATA as usize / 8] = descriptor(USER_DATA, 0, 0xfffff);
    gdt[selectors::USER_CODE as usize / 8] = descriptor(USER_CODE64, 0, 0xfffff);
    for (i, &stack) in rsp0.iter().enumerate() {
        let (base, limit) = tss(i);
        let slot = selectors::FIRST_TSS as usize / 8 + 2 * i;
        gdt[slot] = descriptor(TSS_AVAILABLE, base as u32, limit);
        gdt[slot + 1] = base >> 32;
        mem.write_slice(&[0u8; TSS_STRIDE as usize], GuestAddress(base))?;
        mem.write_obj(stack, GuestAddress(base + TSS_RSP0))?;
        mem.write_obj((IO_BITMAP_START - base) as u16, GuestAddress(base + TSS_IOMAP_BASE))?;
    }
    if !rsp0.is_empty() {
        mem.write_slice(&[0u8; IO_BITMAP_SIZE as usize], GuestAddress(IO_BITMAP_START))?;
        mem.write_obj(0xffu8, GuestAddress(IO_BITMAP_START + IO_BITMAP_SIZE))?;
    }
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_slice(&[0u8; 4096], GuestAddress(IDT_START))?;
    Ok(())
}

/// Size in bytes of the GDT [`write_tables`] writes for `nr_vcpus`.
pub fn gdt_limit(nr_vcpus: usize) -> u16 {
    (selectors::FIRST_TSS as usize + 16 * nr_vcpus - 1) as u16
}

/// The `kvm_segment` a selector loads from a descriptor built with `flags`.
fn segment(selector: u16, flags: u16, base: u64, limit: u32) -> kvm_segment {
    let granular = (flags >> 15) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: granular as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Code and data segments for a vCPU entered at ring 0 or ring 3.
pub fn code_and_data(ring3: bool) -> (kvm_segment, kvm_segment) {
    if ring3 {
        (
            segment(selectors::USER_CODE, USER_CODE64, 0, 0xfffff),
            segment(selectors::USER_DATA, USER_DATA, 0, 0xfffff),
        )
    } else {
        (
            segment(selectors::KERNEL_CODE, KERNEL_CODE64, 0, 0xfffff),
            segment(selectors::KERNEL_DATA, KERNEL_DATA, 0, 0xfffff),
        )
    }
}

/// The task register of vCPU `index` (its TSS, marked busy as after `ltr`).
pub fn task_register(index: usize) -> kvm_segment {
    let (base, limit) = tss(index);
    let mut tr = segment(selectors::FIRST_TSS + 16 * index as u16, TSS_AVAILABLE, base, limit);
    tr.type_ = 0xb; // 64-bit TSS, busy
    tr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_like_the_sdm() {
        // Well-known flat 64-bit code and data descriptors.
        assert_eq!(descriptor(KERNEL_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(KERNEL_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(USER_CODE64, 0, 0xfffff), 0x00af_fb00_0000_ffff);
        let s = segment(0x2b, USER_CODE64, 0, 0xfffff);
        assert_eq!((s.dpl, s.l, s.db, s.present, s.type_, s.limit), (3, 1, 0, 1, 0xb, u32::MAX));
    }

    #[test]
    fn every_tss_sees_the_shared_bitmap_allowing_all_ports() {
        use crate::memory::GuestMemoryMmap;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = MAX_VCPUS as usize;
        write_tables(&mem, &vec![0x1234; n]).unwrap();
        for i in [0, 1, n - 1] {
            let (base, limit) = tss(i);
            let iomap: u16 = mem.read_obj(GuestAddress(base + TSS_IOMAP_BASE)).unwrap();
            assert_eq!(base + u64::from(iomap), IO_BITMAP_START);
            assert_eq!(base + u64::from(limit), IO_BITMAP_START + IO_BITMAP_SIZE);
            let rsp0: u64 = mem.read_obj(GuestAddress(base + TSS_RSP0)).unwrap();
            assert_eq!(rsp0, 0x1234);
            let tr = task_register(i);
            assert_eq!((tr.base, tr.limit, tr.type_), (base, limit, 0xb));
        }
        let port_0x3f8: u8 = mem.read_obj(GuestAddress(IO_BITMAP_START + 0x3f8 / 8)).unwrap();
        assert_eq!(port_0x3f8, 0, "allowed");
        let end: u8 = mem.read_obj(GuestAddress(IO_BITMAP_START + IO_BITMAP_SIZE)).unwrap();
        assert_eq!(end, 0xff);
    }
}
