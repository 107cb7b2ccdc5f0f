//! The balloon's PFN arrays and free page reports, driven through its virtio-mmio transport.

use super::*;

/// Guest RAM of the balloon rig (PFNs 0..0x1000).
pub const BALLOON_RAM: u64 = 16 << 20;
/// The virtio-mem-style hot-pluggable region the balloon must leave alone: the rig shares no
/// virtio-mem plugged map with it (the shared map's rules are the balloon's unit tests').
pub const BALLOON_HOTPLUG: u64 = 4 << 20;
/// The balloon's rings: queue `q` at `B_RINGS + q * 0x4000`.
pub const B_RINGS: u64 = 0x10000;
/// The bytes the balloon's rings span (four queues).
pub const B_RINGS_LEN: u64 = 4 * 0x4000;
/// The balloon rig's scratch area for PFN arrays and stats buffers.
pub const B_DATA: u64 = 0x100000;
const B_DATA_LEN: u64 = 0x10000;

/// A balloon behind its transport over [`Memory`].
pub struct BalloonRig {
    /// The transport and the device.
    pub t: MmioTransport<Balloon>,
    /// Guest RAM and the recorder.
    pub mem: Memory,
    sizes: Vec<u16>,
    avail: Vec<u16>,
    features: u64,
}

/// The roles of the balloon's queues under `features` (Linux's numbering).
fn balloon_roles(features: u64) -> Vec<&'static str> {
    let mut roles = vec!["inflate", "deflate"];
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push("stats");
    }
    if features & (1 << VIRTIO_BALLOON_F_PAGE_REPORTING) != 0 {
        roles.push("report");
    }
    roles
}

impl BalloonRig {
    /// RAM, table, recorder and a balloon offering every feature, not yet driven.
    pub fn new() -> Self {
        let mem = Memory::new(BALLOON_RAM, BALLOON_HOTPLUG);
        let balloon = Balloon::new(mem.mmu.clone(), &mem.ram, BalloonConfig::default());
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let t = MmioTransport::new(balloon, mem.mmu.clone(), irq);
        Self { t, mem, sizes: Vec::new(), avail: Vec::new(), features: 0 }
    }

    /// The hot-pluggable region's start.
    pub fn hotplug_base(&self) -> u64 {
        self.mem.ram.hotplug().expect("hotplug region").0
    }

    /// Resets the device and the rings, negotiates `features` (balloon feature bits) and sets up
    /// every queue with `size` entries, then DRIVER_OK.
    pub fn start(&mut self, features: u64, sizes: &[u16]) {
        self.mem.discards();
        negotiate(&mut self.t, features);
        self.features = features;
        let n = balloon_roles(features).len();
        self.sizes = (0..n).map(|q| sizes[q % sizes.len()]).collect();
        self.avail = vec![0; n];
        self.mem.write(B_RINGS, &vec![0u8; B_RINGS_LEN as usize]);
        self.mem.write(B_DATA, &vec![0u8; B_DATA_LEN as usize]);
        for q in 0..n {
            setup_queue(&mut self.t, q as u32, self.sizes[q], B_RINGS + 0x4000 * q as u64);
        }
        driver_ok(&mut self.t);
        assert!(self.mem.discards().is_empty());
    }

    /// Descriptor `i` of queue `q`.
    pub fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let i = i % self.sizes[q];
        self.mem.write(B_RINGS + 0x4000 * q as u64 + 16 * i as u64, &raw);
    }

    /// Makes `head` available on queue `q`.
    pub fn push(&mut self, q: usize, head: u16) {
        let avail = B_RINGS + 0x4000 * q as u64 + 0x1000;
        let slot = avail + 4 + 2 * (self.avail[q] % self.sizes[q]) as u64;
        self.mem.write(slot, &head.to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write(avail + 2, &self.avail[q].to_le_bytes());
    }

    /// The used index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let b = self.mem.read(B_RINGS + 0x4000 * q as u64 + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Notifies queue `index` (any value, as the driver may) and checks what was discarded:
    /// guest RAM only, never the hot-pluggable region; on the inflate queue only pages that are
    /// now in the balloon; on the deflate and stats queues nothing. Returns the discards.
    pub fn notify(&mut self, index: u32) -> Vec<Discard> {
        self.mem.discards();
        let needs_reset = self.t.status() & status::DEVICE_NEEDS_RESET != 0;
        w32(&mut self.t, reg::QUEUE_NOTIFY, index);
        let discards = self.mem.discards();
        let role = balloon_roles(self.features).get(index as usize).copied();
        for d in &discards {
            assert!(!d.hotplug, "the balloon discarded {d:x?} in the hot-pluggable region ({role:?} queue)");
            assert!(d.gpa + d.len <= BALLOON_RAM, "{d:x?}");
            assert!(!needs_reset, "a device that needs a reset discarded {d:x?}");
            match role {
                Some("inflate") => {
                    for pfn in d.gpa / 4096..(d.gpa + d.len) / 4096 {
                        assert!(
                            self.t.device().is_ballooned(pfn),
                            "inflate discarded PFN {pfn:#x}, not ballooned"
                        );
                    }
                }
                Some("report") => {}
                _ => panic!("queue {index} ({role:?}) discarded {d:x?}"),
            }
        }
        let s = self.t.device().stats();
        assert!(s.ballooned_pages <= BALLOON_RAM / 4096);
        discards
    }

    /// Runs a fuzz input: a header (features, queue sizes), then operations on descriptors, the
    /// avail rings, the scratch area and notifies; finally notifies every queue.
    pub fn run_fuzz(&mut self, data: &[u8]) {
        let mut b = Bytes::new(data);
        let h = b.u8();
        let features = [
            (0, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (1, VIRTIO_BALLOON_F_STATS_VQ),
            (2, VIRTIO_BALLOON_F_PAGE_REPORTING),
            (3, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        ]
        .iter()
        .filter(|(bit, _)| h & (1 << bit) != 0)
        .fold(0u64, |f, &(_, feature)| f | 1 << feature);
        let size = 1u16 << (b.u8() % 9);
        let sizes = [size, 1 << (b.u8() % 9)];
        self.start(features, &sizes);
        let queues = balloon_roles(features).len();
        let hot = self.hotplug_base();
        let mut ops = 0;
        while !b.is_empty() && ops < 256 {
            ops += 1;
            let q = b.u8() as usize % queues;
            match b.u8() % 8 {
                // A descriptor.
                0 | 1 => {
                    let i = b.u16();
                    let addr = fuzz_addr(&mut b, (B_DATA, B_DATA_LEN), BALLOON_RAM, hot);
                    let len = fuzz_len(&mut b);
                    let flags = b.u8() as u16 & 0x7;
                    let flags = if flags & 4 != 0 && !b.u8().is_multiple_of(4) { flags & 3 } else { flags };
                    let next = b.u16();
                    self.set_desc(q, i, addr, len, flags, next);
                }
                // A head in the avail ring (usually inside the table).
                2 => {
                    let head = b.u16();
                    let head = if b.u8().is_multiple_of(8) { head } else { head % self.sizes[q] };
                    self.push(q, head);
                }
                // Raw bytes in the scratch area.
                3 => {
                    let at = b.u16() as u64 % B_DATA_LEN;
                    let n = b.u8() as usize;
                    let bytes = b.take(n);
                    self.mem.write(B_DATA + at, &bytes);
                }
                // A PFN array in the scratch area: PFNs mostly in RAM, some runs, some beyond.
                4 | 5 => {
                    let at = (b.u16() as u64 % B_DATA_LEN) & !3;
                    let n = b.u8() as usize % 64;
                    let mut pfn = b.u32();
                    let mode = b.u8();
                    let mut pfns = Vec::with_capacity(n);
                    for _ in 0..n {
                        let v = match mode % 4 {
                            0 => pfn % 0x1000,
                            1 => pfn % 0x1400,
                            2 => pfn,
                            _ => (pfn % 0x1000) | 0x10_0000,
                        };
                        pfns.extend_from_slice(&v.to_le_bytes());
                        pfn = match b.u8() % 4 {
                            0 => b.u32(),
                            _ => pfn.wrapping_add(1),
                        };
                    }
                    self.mem.write(B_DATA + at, &pfns);
                }
                // A notify (sometimes of a queue that does not exist).
                6 => {
                    let index = if b.u8().is_multiple_of(8) { b.u32() } else { q as u32 };
                    self.notify(index);
                }
                // A hostile avail index.
                _ => {
                    let idx = b.u16();
                    self.mem.write(B_RINGS + 0x4000 * q as u64 + 0x1002, &idx.to_le_bytes());
                }
            }
        }
        for q in 0..4 {
            self.notify(q);
        }
    }
}

impl Default for BalloonRig {
    fn default() -> Self {
        Self::new()
    }
}
