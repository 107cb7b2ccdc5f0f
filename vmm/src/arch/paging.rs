//! Identity page tables for a guest entered in 64-bit mode.
//!
//! 2 MiB pages map guest-physical addresses to the same virtual addresses, from 0 to a chosen
//! end (rounded up to 1 GiB), through one PML4 entry and one PDPT. With `user`, the U/S bit is
//! set at every level so that ring-3 code may touch everything (the test guest runs its workload
//! at CPL 3, which on PVM hosts runs natively while ring 0 is emulated).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Where the tables go in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct PageTableLayout {
    /// The PML4 page (CR3).
    pub pml4: u64,
    /// The PDPT page.
    pub pdpt: u64,
    /// The first page directory; one page each 1 GiB mapped, contiguous.
    pub pds: u64,
}

impl PageTableLayout {
    /// Bytes of page directories needed to map `[0, end)`.
    pub fn pd_bytes(end: u64) -> u64 {
        end.div_ceil(1 << 30) * 4096
    }
}

/// Writes identity tables mapping `[0, end)` (rounded up to 1 GiB; at most 512 GiB).
pub fn write_identity_tables<M: GuestMemory>(
    mem: &M,
    layout: PageTableLayout,
    end: u64,
    user: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let gigs = end.div_ceil(1 << 30);
    assert!(gigs <= 512, "one PDPT maps at most 512 GiB; callers check");
    let flags = PRESENT | WRITABLE | if user { USER } else { 0 };
    mem.write_slice(&[0u8; 4096], GuestAddress(layout.pml4))?;
    mem.write_slice(&[0u8; 4096], GuestAddress(layout.pdpt))?;
    mem.write_obj(layout.pdpt | flags, GuestAddress(layout.pml4))?;
    let mut pd = vec![0u8; 4096];
    for gig in 0..gigs {
        let pd_gpa = layout.pds + gig * 4096;
        mem.write_obj(pd_gpa | flags, GuestAddress(layout.pdpt + gig * 8))?;
        for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
            let addr = (gig << 30) | ((i as u64) << 21);
            entry.copy_from_slice(&(addr | flags | HUGE).to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(pd_gpa))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    /// Walks the tables like the MMU does for a 2 MiB page.
    fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, u64)> {
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8)).ok()?;
        let pdpte: u64 = mem.read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8)).ok()?;
        let pde: u64 = mem.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8)).ok()?;
        if pml4e & pdpte & pde & PRESENT == 0 || pde & HUGE == 0 {
            return None;
        }
        Some(((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff), pml4e & pdpte & pde))
    }

    #[test]
    fn identity_maps_every_address_with_user_bits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let layout = PageTableLayout { pml4: 0x8000, pdpt: 0x9000, pds: 0x10_0000 };
        // An end just past 5 GiB rounds up to whole GiB: [0, 6 GiB) is mapped.
        write_identity_tables(&mem, layout, (5 << 30) + 1, true).unwrap();
        for va in [0, 0x20_1234, 0xd000_0000, (4 << 30) + 0x12_3456, (6 << 30) - 8] {
            let (pa, flags) = walk(&mem, 0x8000, va).unwrap();
            assert_eq!(pa, va);
            assert_eq!(flags & (USER | WRITABLE), USER | WRITABLE);
        }
        assert_eq!(walk(&mem, 0x8000, 6 << 30), None, "only [0, 6 GiB) is mapped");
    }
}
