//! virtio-mem's request queue, driven through its virtio-mmio transport.

use super::*;

/// Guest RAM of the virtio-mem rig.
pub const MEM_RAM: u64 = 16 << 20;
/// The device region (the hot-pluggable region): 16 blocks of 2 MiB.
pub const MEM_REGION_SIZE: u64 = 32 << 20;
/// The block size.
pub const MEM_BLOCK: u64 = 2 << 20;
const M_RING: u64 = 0x10000;
/// The virtio-mem rig's scratch area (requests and responses).
pub const M_DATA: u64 = 0x100000;
const M_DATA_LEN: u64 = 0x4000;

/// A virtio-mem device over the hot-pluggable region, behind its transport.
pub struct MemRig {
    /// The transport and the device.
    pub t: MmioTransport<VirtioMem>,
    /// Guest RAM and the recorder.
    pub mem: Memory,
    /// The region's start.
    pub region: u64,
    size: u16,
    avail: u16,
}

impl MemRig {
    /// RAM with a 32 MiB hot-pluggable region and a device over it (nothing requested).
    pub fn new() -> Self {
        let mem = Memory::new(MEM_RAM, MEM_REGION_SIZE);
        let (region, size) = mem.ram.hotplug().expect("hotplug region");
        let dev = VirtioMem::new(mem.mmu.clone(), VirtioMemConfig::new(region, size)).expect("virtio-mem");
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let t = MmioTransport::new(dev, mem.mmu.clone(), irq);
        Self { t, mem, region, size: 0, avail: 0 }
    }

    /// Unplugs everything (a VM reset), sets `requested` bytes, resets the driver side and sets
    /// up requestq with `size` entries, then DRIVER_OK.
    pub fn start(&mut self, requested: u64, size: u16) {
        assert!(self.t.device_mut().unplug_all());
        self.check(self.mem.discards());
        self.t.device_mut().set_requested_size(requested).expect("requested size");
        negotiate(&mut self.t, 0);
        self.size = size;
        self.avail = 0;
        self.mem.write(M_RING, &vec![0u8; 0x3000]);
        self.mem.write(M_DATA, &vec![0u8; M_DATA_LEN as usize]);
        setup_queue(&mut self.t, 0, size, M_RING);
        driver_ok(&mut self.t);
    }

    fn check(&self, discards: Vec<Discard>) -> Vec<Discard> {
        for d in &discards {
            assert!(d.hotplug, "virtio-mem discarded {d:x?} outside its region");
            assert!(
                d.gpa >= self.region && d.gpa + d.len <= self.region + MEM_REGION_SIZE,
                "virtio-mem discarded {d:x?} outside [{:#x}, +{MEM_REGION_SIZE:#x})",
                self.region
            );
            assert!(
                (d.gpa - self.region).is_multiple_of(MEM_BLOCK) && d.len % MEM_BLOCK == 0,
                "virtio-mem discarded {d:x?}, not whole blocks"
            );
        }
        discards
    }

    /// Descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(M_RING + 16 * (i % self.size) as u64, &raw);
    }

    /// Makes `head` available.
    pub fn push(&mut self, head: u16) {
        let slot = M_RING + 0x1000 + 4 + 2 * (self.avail % self.size) as u64;
        self.mem.write(slot, &head.to_le_bytes());
        self.avail = self.avail.wrapping_add(1);
        self.mem.write(M_RING + 0x1002, &self.avail.to_le_bytes());
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        let b = self.mem.read(M_RING + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Used element `i` as (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let b = self.mem.read(M_RING + 0x2004 + 8 * (i % self.size) as u64, 8);
        (u32::from_le_bytes(b[0..4].try_into().unwrap()), u32::from_le_bytes(b[4..8].try_into().unwrap()))
    }

    /// Notifies queue `index` and checks: every discard is whole blocks of the region, every
    /// new used element names a head inside the table with length 0 (no answer) or 10 (a
    /// response), plugged size within the region. Returns the discards.
    pub fn notify(&mut self, index: u32) -> Vec<Discard> {
        self.check(self.mem.discards());
        let before = self.used_idx();
        w32(&mut self.t, reg::QUEUE_NOTIFY, index);
        let discards = self.check(self.mem.discards());
        let after = self.used_idx();
        let new = after.wrapping_sub(before);
        assert!(new <= self.size, "{new} used entries on a queue of {}", self.size);
        for i in 0..new {
            let (id, len) = self.used_elem(before.wrapping_add(i));
            assert!(id < self.size as u32, "used id {id} outside the table of {}", self.size);
            assert!(len == 0 || len == 10, "used length {len}");
        }
        let s = self.t.device().stats();
        assert!(s.plugged_size <= MEM_REGION_SIZE && s.plugged_blocks * MEM_BLOCK == s.plugged_size);
        discards
    }

    /// Writes a `virtio_mem_req` at `gpa`.
    pub fn write_request(&self, gpa: u64, kind: u16, addr: u64, nb_blocks: u16) {
        let mut req = [0u8; 24];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.mem.write(gpa, &req);
    }

    /// Runs a fuzz input: a header (requested blocks, queue size), then operations on
    /// descriptors, requests, the avail ring and notifies; finally one notify.
    pub fn run_fuzz(&mut self, data: &[u8]) {
        let mut b = Bytes::new(data);
        let requested = (b.u8() as u64 % 17) * MEM_BLOCK;
        let size = 1u16 << (b.u8() % 8);
        self.start(requested, size);
        let hot = self.region;
        let mut ops = 0;
        while !b.is_empty() && ops < 256 {
            ops += 1;
            match b.u8() % 8 {
                0 | 1 => {
                    let i = b.u16();
                    let addr = fuzz_addr(&mut b, (M_DATA, M_DATA_LEN), MEM_RAM, hot);
                    let len = match b.u8() % 4 {
                        0 => 24,
                        1 => 10,
                        2 => 16,
                        _ => fuzz_len(&mut b),
                    };
                    let flags = b.u8() as u16 & 0x7;
                    let flags = if flags & 4 != 0 && !b.u8().is_multiple_of(4) { flags & 3 } else { flags };
                    let next = b.u16();
                    self.set_desc(i, addr, len, flags, next);
                }
                2 => {
                    let head = b.u16();
                    let head = if b.u8().is_multiple_of(8) { head } else { head % self.size };
                    self.push(head);
                }
                // A request: type mostly valid, range mostly block-aligned in the region.
                3 | 4 => {
                    let at = b.u16() as u64 % M_DATA_LEN;
                    let kind = match b.u8() % 8 {
                        7 => b.u16(),
                        k => k as u16 % 4,
                    };
                    let v = b.u16() as u64;
                    let addr = match b.u8() % 8 {
                        0..=4 => hot + (v % 20) * MEM_BLOCK,
                        5 => hot + v * 4096,
                        6 => v << 21,
                        _ => b.u64(),
                    };
                    let nb = match b.u8() % 4 {
                        0..=2 => b.u8() as u16 % 18,
                        _ => b.u16(),
                    };
                    self.write_request(M_DATA + at, kind, addr, nb);
                }
                5 => {
                    let at = b.u16() as u64 % M_DATA_LEN;
                    let n = b.u8() as usize % 32;
                    let bytes = b.take(n);
                    self.mem.write(M_DATA + at, &bytes);
                }
                6 => {
                    let index = if b.u8().is_multiple_of(8) { b.u32() } else { 0 };
                    self.notify(index);
                }
                _ => {
                    // The host changes requested_size (valid sizes only: what the API allows).
                    let blocks = b.u8() as u64 % 17;
                    self.t.update_config(|m| m.set_requested_size(blocks * MEM_BLOCK)).expect("valid size");
                }
            }
        }
        self.notify(0);
    }
}

impl Default for MemRig {
    fn default() -> Self {
        Self::new()
    }
}
