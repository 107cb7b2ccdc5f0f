//! [`guest_abi::Workload::VirtioMem`]: a polling virtio-mem driver (virtio 1.2, §5.15) that
//! checks that plugged memory is usable and that memory plugged again after an unplug comes back
//! as zeros.
//!
//! Only vCPU 0 drives the device; every vCPU (vCPU 0 too, after its carved pages) fills its slice
//! of RAM with the pattern. The other vCPUs verify it once and idle (spin without exits) until
//! the host stops the VM; vCPU 0 verifies its slice again after every step (plugging and
//! unplugging must not disturb ordinary RAM).
//!
//! # vCPU 0's slice
//! | page | what |
//! |---|---|
//! | 0 | the request queue (descriptors, available ring, used ring) |
//! | 1 | request buffers: the `virtio_mem_req` at +0, the `virtio_mem_resp` at +0x40 |
//! | 2.. | RAM: filled with the pattern, verified after every step |
//!
//! # The device region
//! Plugged blocks are always a prefix of the usable region: the driver plugs from the lowest
//! unplugged block upwards, in requests of up to [`RUN_BLOCKS`] blocks, and unplugs the most
//! recently plugged blocks first (from the top of the prefix downwards), also [`RUN_BLOCKS`] at
//! a time. So the driver's whole state is the number of plugged blocks. The region is identity
//! mapped like RAM; the driver touches only blocks it has plugged (an unplugged block is never
//! read or written).
//!
//! # One step
//! Every ~[`POLL_CYCLES`] TSC cycles the driver reads `requested_size` (config generation checked);
//! when it differs from what is plugged it plugs or unplugs towards it, one request at a time,
//! each waited for. After each ACKed PLUG it checks that every word of the new blocks reads zero
//! (never plugged, or discarded by the device when they were unplugged), fills them with the
//! pattern and verifies them. A NACK (the request shrank meanwhile) ends the step early; BUSY is
//! retried. At the end of the step it verifies every plugged block and its RAM slice, checks the
//! config's `plugged_size`, sends STATE requests (PLUGGED over the plugged prefix, UNPLUGGED over
//! the rest; at most 32768 blocks per request), and reports `Stage(STAGE_MEM_STEP, plugged
//! bytes)`. The STATE requests are the last thing a step sends, after every fill and check: a
//! host that sees `plugged_size == requested_size` and a STATE request after it changed
//! `requested_size` knows the step is complete.
//!
//! At probe, memory still plugged (from a previous driver) is unplugged with UNPLUG_ALL, and the
//! whole region is checked UNPLUGGED with STATE.
//!
//! With [`FLAG_HOSTILE`] the driver sends malformed requests first, see [`Driver::hostile`].

use guest_abi::virtio::device_type;
use guest_abi::virtio::mem::{
    config as cfg, REQUEST_SIZE, RESPONSE_SIZE, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_UNPLUG_ALL, VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR, VIRTIO_MEM_RESP_NACK, VIRTIO_MEM_STATE_PLUGGED, VIRTIO_MEM_STATE_UNPLUGGED,
};
use guest_abi::{pattern, BootInfo, UcallKind, FLAG_HOSTILE, PAGE_SIZE, STAGE_MEM_STEP};

use crate::balloon::{check_page, fill_page, Slice};
use crate::virtio::{self, reg, status, Mmio, Virtqueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::{arch, fail, report};

/// Size of the request queue.
const QUEUE_SIZE: u16 = 8;
/// Blocks per PLUG or UNPLUG request.
const RUN_BLOCKS: u64 = 8;
/// Most blocks per STATE request (nb_blocks is 16 bits).
const STATE_CHUNK: u64 = 0x8000;
/// TSC cycles between two reads of `requested_size` (about 1 ms at 3 GHz).
const POLL_CYCLES: u64 = 3_000_000;
/// TSC cycles to wait for a used buffer before giving up.
const WAIT_CYCLES: u64 = 30_000_000_000;
/// BUSY answers tolerated in a row for one request (with [`POLL_CYCLES`] between tries).
const MAX_BUSY: u32 = 1000;

/// Slice page of the queue.
const QUEUE_PAGE: u64 = 0;
/// Slice page of the request buffers.
const BUFFER_PAGE: u64 = 1;
/// First slice page of ordinary RAM.
const RAM_FIRST: u64 = 2;
/// Offset of the response in the buffer page.
const RESP_OFFSET: u64 = 0x40;
/// What the driver writes into the response buffer before a request (the device overwrites it).
const RESP_SENTINEL: u64 = 0xdead_beef_dead_beef;
/// Bytes of a request / of the response the device writes.
const REQ_LEN: u32 = REQUEST_SIZE as u32;
const RESP_LEN: u32 = RESPONSE_SIZE as u32;

/// Writes the pattern into `[gpa, gpa + len)` (8-byte aligned).
fn fill(seed: u64, gpa: u64, len: u64) {
    let mut at = gpa;
    while at < gpa + len {
        // SAFETY: callers pass plugged blocks of the device region or pages of this vCPU's slice,
        // identity mapped and owned by vCPU 0 while it writes them.
        unsafe { (at as *mut u64).write_volatile(pattern(seed, at)) };
        at += 8;
    }
}

/// Checks `[gpa, gpa + len)` for the pattern (`zeros` false) or zeros; returns the first wrong
/// word as (address, found, expected).
fn check(seed: u64, gpa: u64, len: u64, zeros: bool) -> Result<(), (u64, u64, u64)> {
    let mut at = gpa;
    while at < gpa + len {
        // SAFETY: as in `fill` (plugged blocks only; never an unplugged one).
        let found = unsafe { (at as *const u64).read_volatile() };
        let expected = if zeros { 0 } else { pattern(seed, at) };
        if found != expected {
            return Err((at, found, expected));
        }
        at += 8;
    }
    Ok(())
}

/// Reads the 64-bit config field at `offset` consistently (both halves in one generation).
fn config_u64(mmio: &Mmio, offset: u64) -> u64 {
    loop {
        let before = mmio.read(reg::CONFIG_GENERATION);
        let lo = mmio.read(reg::CONFIG + offset);
        let hi = mmio.read(reg::CONFIG + offset + 4);
        if mmio.read(reg::CONFIG_GENERATION) == before {
            return u64::from(lo) | u64::from(hi) << 32;
        }
    }
}

/// The driver's state (on vCPU 0's stack).
struct Driver {
    vcpu: u64,
    seed: u64,
    mmio: Mmio,
    slice: Slice,
    queue: Virtqueue,
    /// Guest-physical start of the region.
    addr: u64,
    block_size: u64,
    /// Usable blocks (from `usable_region_size`).
    usable_blocks: u64,
    /// Plugged blocks: the prefix `[0, plugged)` of the region.
    plugged: u64,
    /// Wait between polls in a [`guest_abi::Rendezvous::Idle`] rather than spinning.
    idle: bool,
}

/// [`guest_abi::Workload::VirtioMem`] (see the module docs).
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    let slice = Slice::new(boot, vcpu);
    if vcpu != 0 {
        fill_and_check_slice(vcpu, boot.seed, &slice, 0);
        loop {
            core::hint::spin_loop();
        }
    }
    drive(vcpu, boot, false)
}

/// Drives the device forever with `vcpu`'s slice as its RAM (see the module docs; vCPU 0 of
/// [`guest_abi::Workload::VirtioMem`], or the virtio-mem role of [`guest_abi::Workload::Stress`]).
/// With `idle`, the driver waits between two polls in a [`guest_abi::Rendezvous::Idle`] instead
/// of spinning.
pub fn drive(vcpu: u64, boot: &BootInfo, idle: bool) -> ! {
    let slice = Slice::new(boot, vcpu);
    let Some(device) = boot.virtio[..(boot.nr_virtio as usize).min(boot.virtio.len())]
        .iter()
        .find(|d| d.device_id == u64::from(device_type::MEM))
    else {
        fail(vcpu, format_args!("virtio-mem: the boot info names no virtio-mem device"));
    };
    if slice.pages <= RAM_FIRST {
        fail(
            vcpu,
            format_args!("virtio-mem: the slice has {} pages, need more than {RAM_FIRST}", slice.pages),
        );
    }
    let mut driver = Driver::init(vcpu, boot, Mmio::new(device.base), slice);
    driver.idle = idle;
    fill_and_check_slice(vcpu, boot.seed, &driver.slice, RAM_FIRST);
    if boot.flags & FLAG_HOSTILE != 0 {
        driver.hostile();
    }
    driver.serve()
}

/// Fills slice pages from `first` on with the pattern and verifies them.
fn fill_and_check_slice(vcpu: u64, seed: u64, slice: &Slice, first: u64) {
    let mut index = first;
    while index < slice.pages {
        fill_page(seed, slice.page(index));
        index += 1;
    }
    check_slice(vcpu, seed, slice, first, "RAM page lost its pattern");
}

/// Verifies slice pages from `first` on.
fn check_slice(vcpu: u64, seed: u64, slice: &Slice, first: u64, what: &str) {
    let mut index = first;
    while index < slice.pages {
        if let Err((at, found, expected)) = check_page(seed, slice.page(index), false) {
            fail(vcpu, format_args!("virtio-mem (vCPU {vcpu}): {what}: word {at:#x} is {found:#018x}, expected {expected:#018x}"));
        }
        index += 1;
    }
}

impl Driver {
    /// Device initialisation (§3.1.1, §4.2.3), then the config, UNPLUG_ALL if anything is still
    /// plugged (§5.15.6.1), and a STATE check of the whole region.
    fn init(vcpu: u64, boot: &BootInfo, mmio: Mmio, slice: Slice) -> Self {
        let magic = mmio.read(reg::MAGIC);
        let version = mmio.read(reg::VERSION);
        let id = mmio.read(reg::DEVICE_ID);
        if magic != virtio::MMIO_MAGIC || version != virtio::reg::VERSION_2 || id != device_type::MEM {
            fail(
                vcpu,
                format_args!("virtio-mem: not a virtio-mmio v2 memory device: magic {magic:#x}, version {version}, id {id}"),
            );
        }
        mmio.write(reg::STATUS, 0);
        if mmio.read(reg::STATUS) != 0 {
            fail(vcpu, format_args!("virtio-mem: the device does not reset"));
        }
        mmio.add_status(status::ACKNOWLEDGE);
        mmio.add_status(status::DRIVER);
        let offered = mmio.device_features();
        let version_1 = 1u64 << virtio::VIRTIO_F_VERSION_1;
        if offered & version_1 == 0 {
            fail(vcpu, format_args!("virtio-mem: device does not offer VIRTIO_F_VERSION_1 ({offered:#x})"));
        }
        // Neither ACPI_PXM nor UNPLUGGED_INACCESSIBLE: this driver needs neither.
        mmio.set_driver_features(version_1);
        let s = mmio.add_status(status::FEATURES_OK);
        if s & status::FEATURES_OK == 0 {
            fail(vcpu, format_args!("virtio-mem: FEATURES_OK did not stick (status {s:#x})"));
        }
        // SAFETY: the queue page is a carved page of vCPU 0's slice that nothing else uses.
        let queue = unsafe { Virtqueue::new(0, QUEUE_SIZE, slice.page(QUEUE_PAGE)) };
        if let Err(why) = queue.setup(&mmio) {
            fail(vcpu, format_args!("virtio-mem: request queue: {why}"));
        }
        let s = mmio.add_status(status::DRIVER_OK);
        if s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0 {
            fail(vcpu, format_args!("virtio-mem: DRIVER_OK refused (status {s:#x})"));
        }

        let block_size = config_u64(&mmio, cfg::BLOCK_SIZE);
        let addr = config_u64(&mmio, cfg::ADDR);
        let region_size = config_u64(&mmio, cfg::REGION_SIZE);
        let usable = config_u64(&mmio, cfg::USABLE_REGION_SIZE);
        if !block_size.is_power_of_two()
            || block_size < PAGE_SIZE
            || !addr.is_multiple_of(block_size)
            || !region_size.is_multiple_of(block_size)
            || usable > region_size
            || !usable.is_multiple_of(block_size)
        {
            fail(
                vcpu,
                format_args!(
                    "virtio-mem: bad config: block {block_size:#x}, region [{addr:#x}, +{region_size:#x}), usable {usable:#x}"
                ),
            );
        }
        // The region must not overlap the RAM the workload owns.
        for r in &boot.work[..boot.nr_work as usize] {
            if r.start < addr + region_size && addr < r.end {
                fail(
                    vcpu,
                    format_args!(
                        "virtio-mem: region [{addr:#x}, +{region_size:#x}) overlaps work RAM [{:#x}, {:#x})",
                        r.start, r.end
                    ),
                );
            }
        }
        let mut d = Self {
            vcpu,
            seed: boot.seed,
            mmio,
            slice,
            queue,
            addr,
            block_size,
            usable_blocks: usable / block_size,
            plugged: 0,
            idle: false,
        };
        if config_u64(&d.mmio, cfg::PLUGGED_SIZE) != 0 {
            let r = d.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0);
            if r != (VIRTIO_MEM_RESP_ACK, 0) {
                fail(vcpu, format_args!("virtio-mem: UNPLUG_ALL at probe answered {r:?}"));
            }
        }
        d.check_plugged_size("at probe");
        d.check_state();
        d
    }

    fn block_addr(&self, block: u64) -> u64 {
        self.addr + block * self.block_size
    }

    fn buffer(&self) -> u64 {
        self.slice.page(BUFFER_PAGE)
    }

    /// Writes a `virtio_mem_req` into the buffer page at +`offset`, and the sentinel into the
    /// response buffer.
    fn write_request(&self, offset: u64, kind: u16, addr: u64, nb_blocks: u16) {
        let req = self.buffer() + offset;
        // SAFETY: the buffer page is a carved page of vCPU 0's slice; offset + 24 and the
        // response (+0x40, 16 bytes) stay inside it; all fields are naturally aligned.
        unsafe {
            (req as *mut u64).write_volatile(u64::from(kind));
            ((req + 8) as *mut u64).write_volatile(addr);
            ((req + 16) as *mut u64).write_volatile(u64::from(nb_blocks));
            ((self.buffer() + RESP_OFFSET) as *mut u64).write_volatile(RESP_SENTINEL);
            ((self.buffer() + RESP_OFFSET + 8) as *mut u64).write_volatile(RESP_SENTINEL);
        }
    }

    /// The response buffer as (type, state), or None if it still holds the sentinel.
    fn response(&self) -> Option<(u16, u16)> {
        let resp = self.buffer() + RESP_OFFSET;
        // SAFETY: as in `write_request`.
        let (w0, w1) =
            unsafe { ((resp as *const u64).read_volatile(), ((resp + 8) as *const u64).read_volatile()) };
        if w0 == RESP_SENTINEL && w1 == RESP_SENTINEL {
            return None;
        }
        Some((w0 as u16, w1 as u16))
    }

    /// Sends the chain already written at descriptors 0.. (head 0), waits for it, and returns
    /// the used length.
    fn send(&mut self) -> u32 {
        self.queue.push(0);
        self.mmio.notify(self.queue.index);
        let start = arch::rdtsc();
        loop {
            if let Some((id, len)) = self.queue.pop_used() {
                if id != 0 {
                    fail(self.vcpu, format_args!("virtio-mem: the queue returned descriptor {id}, sent 0"));
                }
                return len;
            }
            if arch::rdtsc().wrapping_sub(start) > WAIT_CYCLES {
                let s = self.mmio.read(reg::STATUS);
                fail(
                    self.vcpu,
                    format_args!("virtio-mem: the device did not return the request (status {s:#x})"),
                );
            }
            core::hint::spin_loop();
        }
    }

    /// A well-formed request; returns the response's (type, state).
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> (u16, u16) {
        self.write_request(0, kind, addr, nb_blocks);
        let buf = self.buffer();
        self.queue.set_desc(0, buf, REQ_LEN, VIRTQ_DESC_F_NEXT, 1);
        self.queue.set_desc(1, buf + RESP_OFFSET, 16, VIRTQ_DESC_F_WRITE, 0);
        let len = self.send();
        match self.response() {
            Some(r) if len == RESP_LEN => r,
            r => fail(
                self.vcpu,
                format_args!(
                    "virtio-mem: request {kind} ({nb_blocks} blocks at {addr:#x}): used length {len}, response {r:?}"
                ),
            ),
        }
    }

    /// Fails unless the config's `plugged_size` is what the driver plugged.
    fn check_plugged_size(&self, when: &str) {
        let size = config_u64(&self.mmio, cfg::PLUGGED_SIZE);
        if size != self.plugged * self.block_size {
            fail(
                self.vcpu,
                format_args!(
                    "virtio-mem: {when}: plugged_size {size:#x}, the driver plugged {} blocks of {:#x}",
                    self.plugged, self.block_size
                ),
            );
        }
    }

    /// STATE over blocks `[first, end)` in chunks; each must answer `want`.
    fn expect_state(&mut self, first: u64, end: u64, want: u16) {
        let mut b = first;
        while b < end {
            let n = (end - b).min(STATE_CHUNK);
            let r = self.request(VIRTIO_MEM_REQ_STATE, self.block_addr(b), n as u16);
            if r != (VIRTIO_MEM_RESP_ACK, want) {
                fail(
                    self.vcpu,
                    format_args!(
                        "virtio-mem: STATE of {n} blocks at {:#x} answered {r:?}, expected (ACK, {want}) ({} plugged)",
                        self.block_addr(b),
                        self.plugged
                    ),
                );
            }
            b += n;
        }
    }

    /// PLUGGED over the plugged prefix, UNPLUGGED over the rest of the usable region.
    fn check_state(&mut self) {
        self.expect_state(0, self.plugged, VIRTIO_MEM_STATE_PLUGGED);
        self.expect_state(self.plugged, self.usable_blocks, VIRTIO_MEM_STATE_UNPLUGGED);
    }

    /// Checks blocks `[first, first + n)` for the pattern or zeros; fails naming `what`.
    fn check_blocks(&self, first: u64, n: u64, zeros: bool, what: &str) {
        if let Err((at, found, expected)) =
            check(self.seed, self.block_addr(first), n * self.block_size, zeros)
        {
            fail(
                self.vcpu,
                format_args!(
                    "virtio-mem: {what}: word {at:#x} (block {}) is {found:#018x}, expected {expected:#018x} ({} plugged)",
                    (at - self.addr) / self.block_size,
                    self.plugged
                ),
            );
        }
    }

    /// Waits about one poll interval (between BUSY retries).
    fn pause(&self) {
        let start = arch::rdtsc();
        while arch::rdtsc().wrapping_sub(start) < POLL_CYCLES {
            core::hint::spin_loop();
        }
    }

    /// PLUG or UNPLUG `n` blocks from `first`, retrying BUSY; returns the final response type.
    fn plug_or_unplug(&mut self, kind: u16, first: u64, n: u64) -> u16 {
        let mut busy = 0;
        loop {
            let (r, _) = self.request(kind, self.block_addr(first), n as u16);
            if r != VIRTIO_MEM_RESP_BUSY {
                return r;
            }
            busy += 1;
            if busy > MAX_BUSY {
                fail(
                    self.vcpu,
                    format_args!(
                        "virtio-mem: request {kind} of {n} blocks at block {first}: BUSY {busy} times"
                    ),
                );
            }
            self.pause();
        }
    }

    /// Plugs or unplugs towards `target` blocks (see the module docs), then checks and reports.
    fn step(&mut self, target: u64) {
        while self.plugged < target {
            let (first, n) = (self.plugged, (target - self.plugged).min(RUN_BLOCKS));
            match self.plug_or_unplug(VIRTIO_MEM_REQ_PLUG, first, n) {
                VIRTIO_MEM_RESP_ACK => {
                    self.check_blocks(first, n, true, "newly plugged block is not zero");
                    fill(self.seed, self.block_addr(first), n * self.block_size);
                    self.check_blocks(first, n, false, "plugged block lost its pattern right after the fill");
                    self.plugged += n;
                }
                // The host lowered requested_size meanwhile: the next poll sees it.
                VIRTIO_MEM_RESP_NACK => break,
                r => fail(
                    self.vcpu,
                    format_args!("virtio-mem: PLUG of {n} blocks at block {first} answered {r}"),
                ),
            }
        }
        while self.plugged > target {
            let n = (self.plugged - target).min(RUN_BLOCKS);
            let first = self.plugged - n;
            match self.plug_or_unplug(VIRTIO_MEM_REQ_UNPLUG, first, n) {
                VIRTIO_MEM_RESP_ACK => self.plugged -= n,
                r => fail(
                    self.vcpu,
                    format_args!("virtio-mem: UNPLUG of {n} blocks at block {first} answered {r}"),
                ),
            }
        }
        self.check_blocks(0, self.plugged, false, "plugged block lost its pattern");
        check_slice(self.vcpu, self.seed, &self.slice, RAM_FIRST, "RAM page lost its pattern during a step");
        self.check_plugged_size("after a step");
        self.check_state();
        report(self.vcpu, UcallKind::Stage, &[STAGE_MEM_STEP, self.plugged * self.block_size]);
    }

    /// The target in blocks: `requested_size` clamped to the usable region.
    fn target(&self) -> u64 {
        (config_u64(&self.mmio, cfg::REQUESTED_SIZE) / self.block_size).min(self.usable_blocks)
    }

    /// Polls `requested_size` forever and follows it.
    fn serve(&mut self) -> ! {
        let mut last_poll = arch::rdtsc().wrapping_sub(POLL_CYCLES);
        loop {
            let now = arch::rdtsc();
            if now.wrapping_sub(last_poll) >= POLL_CYCLES {
                last_poll = now;
                let target = self.target();
                if target != self.plugged {
                    self.step(target);
                    last_poll = arch::rdtsc().wrapping_sub(POLL_CYCLES);
                }
            }
            if self.idle {
                virtio::idle(self.vcpu, crate::balloon::IDLE_US);
            } else {
                core::hint::spin_loop();
            }
        }
    }

    /// Sends a malformed chain: the descriptors `descs` (address, length, flags), chained in
    /// order. The device must return it with used length 0 and write no response.
    fn malformed(&mut self, what: &str, descs: &[(u64, u32, u16)]) {
        let mut i = 0;
        while i < descs.len() {
            let (addr, len, flags) = descs[i];
            let next = if i + 1 < descs.len() { VIRTQ_DESC_F_NEXT } else { 0 };
            self.queue.set_desc(i as u16, addr, len, flags | next, (i + 1) as u16);
            i += 1;
        }
        let len = self.send();
        if len != 0 || self.response().is_some() {
            fail(
                self.vcpu,
                format_args!(
                    "virtio-mem: malformed request ({what}) was answered: used length {len}, response {:?}",
                    self.response()
                ),
            );
        }
    }

    /// A well-formed request that must be answered ERROR without changing anything.
    fn must_fail(&mut self, kind: u16, addr: u64, nb_blocks: u16) {
        let r = self.request(kind, addr, nb_blocks);
        if r.0 != VIRTIO_MEM_RESP_ERROR {
            fail(
                self.vcpu,
                format_args!("virtio-mem: hostile request {kind} ({nb_blocks} blocks at {addr:#x}) answered {r:?}, expected ERROR"),
            );
        }
        self.check_plugged_size("after a hostile request");
    }

    /// [`FLAG_HOSTILE`], before normal operation (nothing plugged):
    /// 1. ERROR answers: PLUG one block at the region's end; PLUG at the region's start + 4 KiB;
    ///    PLUG 0 blocks; PLUG 0xffff blocks at the highest block-aligned address (overflows);
    ///    PLUG 0xffff blocks at the region's start (beyond its end); UNPLUG the never-plugged
    ///    block 0.
    /// 2. The driver waits until `requested_size` is at least one block, PLUGs block 0 (ACK),
    ///    checks zeros and fills it; PLUG of block 0 again is ERROR.
    /// 3. Malformed chains, each an UNPLUG of block 0 which must not happen: a 16-byte request;
    ///    a response buffer that is device-readable only; a 4-byte response buffer. Each comes
    ///    back with used length 0 and no response written.
    ///
    /// Then block 0 must still hold the pattern, `plugged_size` be one block, STATE agree, and
    /// the RAM slice be intact; `Stage(STAGE_MEM_STEP | 2, 10)` (requests that must fail), and
    /// normal operation continues with block 0 plugged.
    fn hostile(&mut self) {
        let (bs, region_end) = (self.block_size, self.block_addr(self.usable_blocks));
        let top = !(bs - 1);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, region_end, 1);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, self.addr + PAGE_SIZE, 1);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, self.addr, 0);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, top, u16::MAX);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, self.addr, u16::MAX);
        self.must_fail(VIRTIO_MEM_REQ_UNPLUG, self.addr, 1);

        while self.target() == 0 {
            self.pause();
        }
        let r = self.request(VIRTIO_MEM_REQ_PLUG, self.addr, 1);
        if r != (VIRTIO_MEM_RESP_ACK, 0) {
            fail(self.vcpu, format_args!("virtio-mem: PLUG of block 0 answered {r:?}"));
        }
        self.plugged = 1;
        self.check_blocks(0, 1, true, "newly plugged block is not zero");
        fill(self.seed, self.addr, bs);
        self.must_fail(VIRTIO_MEM_REQ_PLUG, self.addr, 1);

        let buf = self.buffer();
        let resp = buf + RESP_OFFSET;
        let w = VIRTQ_DESC_F_WRITE;
        self.write_request(0, VIRTIO_MEM_REQ_UNPLUG, self.addr, 1);
        self.malformed("16-byte request", &[(buf, 16, 0), (resp, 16, w)]);
        self.write_request(0, VIRTIO_MEM_REQ_UNPLUG, self.addr, 1);
        self.malformed("device-readable response buffer", &[(buf, REQ_LEN, 0), (resp, 16, 0)]);
        self.write_request(0, VIRTIO_MEM_REQ_UNPLUG, self.addr, 1);
        self.malformed("4-byte response buffer", &[(buf, REQ_LEN, 0), (resp, 4, w)]);

        self.check_blocks(0, 1, false, "plugged block changed after the hostile requests");
        check_slice(
            self.vcpu,
            self.seed,
            &self.slice,
            RAM_FIRST,
            "RAM page changed after the hostile requests",
        );
        self.check_plugged_size("after the hostile requests");
        self.check_state();
        report(self.vcpu, UcallKind::Stage, &[STAGE_MEM_STEP | 2, 10]);
    }
}
