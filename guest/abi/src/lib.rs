//! The contract between the zapvm VMM and its freestanding test guest.
//!
//! Both sides compile this crate: the VMM (std) and the test guest (`no_std`, no allocator).
//! Everything here is plain data with a fixed `#[repr(C)]` layout plus the few pure functions
//! both sides must agree on bit for bit (the memory pattern, how pages are split between vCPUs),
//! so that the VMM can check from its own view of guest RAM what the guest claims to have written.
//!
//! # Boot
//! The VMM loads the guest ELF, builds identity page tables (2 MiB pages, user-accessible), a GDT,
//! an IDT page the guest fills itself, one TSS per vCPU, and a [`BootInfo`] at [`BOOT_INFO_GPA`].
//! Every vCPU enters the ELF entry point with:
//! - `rdi` = vCPU index, `rsi` = [`BOOT_INFO_GPA`], `rsp` = the top of that vCPU's stack;
//! - CPL 3 (or CPL 0 when [`FLAG_CPL0`] is set), `RFLAGS.IOPL = 3`, interrupts off.
//!
//! # Ucalls
//! A ucall is one 32-bit `out` to [`UCALL_PORT`] whose value is the guest-physical address of a
//! [`Ucall`] record (on the guest stack, so always below 4 GiB). The VMM reads the record, acts, and
//! resumes the vCPU; the guest may reuse the record once `out` returns.
#![no_std]

/// The port a ucall is written to (a 32-bit `out` of the record's guest-physical address).
pub const UCALL_PORT: u16 = 0xe0;
/// Version of this ABI; the guest's hello ucall carries it and the VMM refuses a mismatch.
pub const ABI_VERSION: u64 = 3;
/// Guest-physical address of the [`BootInfo`] page.
pub const BOOT_INFO_GPA: u64 = 0x7000;
/// [`BootInfo::magic`].
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"ZAPVMBI1");
/// The longest message a ucall may carry; the VMM truncates longer ones.
pub const MAX_MESSAGE_LEN: usize = 512;
/// The most RAM ranges a [`BootInfo`] describes.
pub const MAX_RANGES: usize = 8;
/// The most virtio-mmio devices a [`BootInfo`] describes.
pub const MAX_VIRTIO_DEVICES: usize = 4;
/// Guest pages are 4 KiB (the one definition: the VMM's memory layer and the notifier use it).
pub const PAGE_SIZE: u64 = 4096;
/// A huge page (x86-64 PMD, THP and hugetlb default size): 2 MiB.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// [`BootInfo::flags`]: the workload runs at CPL 0 (for VMX/SVM hosts, where ring 0 is not emulated).
pub const FLAG_CPL0: u64 = 1 << 0;

pub mod phased;
pub mod virtio;

/// GDT selectors the VMM sets up (identical for the test guest and Linux's 64-bit boot protocol,
/// which wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18).
pub mod selectors {
    /// 64-bit ring-0 code (Linux's `__BOOT_CS`).
    pub const KERNEL_CODE: u16 = 0x10;
    /// Ring-0 data (Linux's `__BOOT_DS`).
    pub const KERNEL_DATA: u16 = 0x18;
    /// Ring-3 data, RPL 3.
    pub const USER_DATA: u16 = 0x20 | 3;
    /// 64-bit ring-3 code, RPL 3.
    pub const USER_CODE: u16 = 0x28 | 3;
    /// The first TSS descriptor; vCPU `i` uses `FIRST_TSS + 16 * i`.
    pub const FIRST_TSS: u16 = 0x30;
}

/// What the guest runs after it said hello.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Fill every word of every page of the vCPU's slice with [`pattern`], read it all back,
    /// report the verified page count and the checksum in [`UcallKind::Done`].
    Verify = 1,
    /// Touch one word per page: cold write, warm write, warm read, each reported as a
    /// [`UcallKind::Timing`]. The cost of guest memory access, for benchmarks.
    ///
    /// The word is the first of each page; both write passes store `pattern(seed, page_gpa)` there.
    /// [`UcallKind::Done`] then carries `args[0]` = pages touched and `args[1]` = the wrapping sum
    /// of the words the warm read pass read, i.e. the wrapping sum of `pattern(seed, page_gpa)`
    /// over the slice's pages when memory behaved.
    Touch = 2,
    /// Fail an assertion on purpose (tests that a guest failure reaches the user).
    AssertFail = 3,
    /// Execute `ud2` (tests that a guest exception reaches the user).
    Exception = 4,
    /// Fill the slice like [`Workload::Verify`], then a [`UcallKind::Rendezvous`] of kind
    /// [`Rendezvous::Discard`]: the host discards ranges of the slice through its memory layer
    /// and replies with them; the guest then checks that every page inside a discarded range
    /// reads as zeros and every other page still holds the pattern. `Done` carries the pages
    /// checked and the wrapping sum of [`page_checksum`] over the pages that kept the pattern.
    DiscardVerify = 5,
    /// Drive the virtio-balloon device of [`BootInfo::virtio`] by polling (interrupts stay off):
    /// fill the slice, then follow the host's target (`num_pages`) forever — inflate by giving the
    /// host pages from the end of the slice, deflate by taking them back — verifying after every
    /// step that the pages still owned hold the pattern and that pages got back read zeros;
    /// answer stats requests; report free pages. Each completed step is a [`UcallKind::Stage`]
    /// with `args[0]` = [`STAGE_BALLOON_STEP`] and `args[1]` = pages in the balloon. The run ends
    /// when the host stops the VM. With [`FLAG_HOSTILE`] the driver sends malformed requests.
    ///
    /// Details of the test guest's driver:
    /// - only vCPU 0 drives the device (over its own slice); other vCPUs fill and verify their
    ///   slices like [`Workload::Verify`], then idle until the host stops the VM;
    /// - the first 70 pages of vCPU 0's slice are carved out: the queues' rings, the PFN arrays,
    ///   the statistics buffer and a 64-page "free" area of which 48 pages are reported through
    ///   free page reporting after the initial fill and after every deflate (they must read
    ///   zeros afterwards); the balloon takes pages from the end of the slice, 256 PFNs per
    ///   request, and deflates the most recently inflated pages first;
    /// - the driver writes `actual` only after it has verified the step (owned pages hold the
    ///   pattern, pages got back read zeros) and refilled the pages it got back, then makes the
    ///   Stage ucall: a host that reads `actual` equal to its target knows the step is complete;
    /// - deflate-on-OOM (if negotiated): the first time the balloon reaches a non-zero target,
    ///   the driver deflates a quarter of it without a host request, verifies and refills those
    ///   pages, writes `actual` and reports `Stage(STAGE_BALLOON_STEP | 1, pages deflated)`; it
    ///   then inflates back to the target as for any other target;
    /// - with [`FLAG_HOSTILE`], after the initial fill: five malformed inflate requests (a PFN
    ///   beyond RAM, a duplicate PFN, a descriptor of length 3, a two-descriptor loop, a buffer
    ///   outside RAM), each its own chain and waited for; the driver checks that none of its
    ///   pages changed and reports `Stage(STAGE_BALLOON_STEP | 2, 5)`;
    /// - statistics (if negotiated): a buffer of SWAP_IN, SWAP_OUT, MAJFLT, MINFLT (all 0),
    ///   MEMFREE and AVAIL (the free area's bytes) and MEMTOT (the slice's bytes), queued after
    ///   DRIVER_OK and refilled and re-queued whenever the device returns it;
    /// - pages got back must read zeros, so the host must discard 4 KiB pages (anonymous or
    ///   memfd RAM, with or without THP); on hugetlb RAM only targets in whole 2 MiB blocks work
    ///   and free page reports (smaller than a block) fail the check.
    Balloon = 6,
    /// Like [`Workload::Balloon`] for the virtio-mem device: plug and unplug blocks as the
    /// host's requested size says, verify plugged memory, report each step as a Stage with
    /// `args[0]` = [`STAGE_MEM_STEP`] and `args[1]` = plugged bytes.
    ///
    /// Details of the test guest's driver:
    /// - only vCPU 0 drives the device; every vCPU fills its slice with the pattern (vCPU 0 all
    ///   but the first two pages of its slice: the request queue and the request/response
    ///   buffers), the others verify it and idle, vCPU 0 verifies its slice after every step;
    /// - the device region must not overlap the work ranges, and must be identity mapped;
    ///   features: VIRTIO_F_VERSION_1 only; memory plugged at probe is unplugged with
    ///   UNPLUG_ALL, then the whole usable region must be STATE UNPLUGGED;
    /// - the plugged blocks are always a prefix of the usable region: PLUG from the lowest
    ///   unplugged block up, UNPLUG from the highest plugged block down (most recently plugged
    ///   first), at most 8 blocks per request, one request in flight; the driver follows
    ///   `requested_size` (clamped to `usable_region_size`), polled about every millisecond;
    /// - after each ACKed PLUG the new blocks must read zeros (never plugged, or discarded when
    ///   they were unplugged); they are then filled with [`pattern`] and verified; unplugged
    ///   blocks are never touched; a NACK ends the step (the next poll re-reads the request),
    ///   BUSY is retried, anything else is a Failure;
    /// - at the end of a step: every plugged block holds the pattern, the config's
    ///   `plugged_size` is what the driver plugged, then STATE requests (PLUGGED over the
    ///   plugged prefix, UNPLUGGED over the rest, at most 32768 blocks each) — the last requests
    ///   of a step, so a host that sees `plugged_size == requested_size` and a STATE request
    ///   after it set `requested_size` knows the step is complete — then the Stage ucall;
    /// - with [`FLAG_HOSTILE`], before normal operation: well-formed requests that must be
    ///   answered ERROR (PLUG of one block at the end of the usable region, PLUG at the region's
    ///   start + 4 KiB, PLUG of 0 blocks, PLUG of 0xffff blocks at the highest block-aligned
    ///   address (overflow), PLUG of 0xffff blocks at the region's start (beyond its end),
    ///   UNPLUG of the never-plugged block 0); then the driver waits until `requested_size` is
    ///   at least one block, plugs block 0 (checks zeros, fills it) and sends PLUG of block 0
    ///   again (ERROR); then three malformed chains, each an UNPLUG of block 0 that must be
    ///   returned with used length 0 and no response written: a 16-byte request, a response
    ///   buffer that is device-readable only, a 4-byte response buffer. Block 0 must keep its
    ///   pattern, `plugged_size` stay one block; then `Stage(STAGE_MEM_STEP | 2, 10)` and normal
    ///   operation with block 0 plugged.
    VirtioMem = 7,
    /// The stress workload of `zapvm stress`: each vCPU's slice is laid out by [`stress_layout`]
    /// (a metadata table with one generation per data page, then the data pages). Forever, for
    /// each data page: read every word, each must be 0 or [`stress_pattern`]`(seed, gen, gpa)` for
    /// the generation the table holds (anything else is a Failure naming the address); count pages
    /// that were all zeros (discarded by the host) and pages mixing zeros and the pattern (torn by
    /// a concurrent discard); rewrite the page with generation + 1 (word 0 last), then store the
    /// new generation in the table. After each pass over the slice: the counters in the
    /// [`StressHeader`] at the start of the slice, and a [`UcallKind::Stage`] with `args[0]` =
    /// [`STAGE_STRESS_PASS`], `args[1]` = pass number, `args[2]` = pages verified, `args[3]` =
    /// zero pages seen, `args[4]` = torn pages (all of that pass). It never ends on its own.
    ///
    /// With [`FLAG_STRESS_BALLOON`] / [`FLAG_STRESS_VIRTIO_MEM`] some vCPUs drive a device
    /// instead, exactly as [`Workload::Balloon`] / [`Workload::VirtioMem`] do on vCPU 0 (same
    /// checks, same Stage ucalls, Failure on any page in the wrong state), over their own slice;
    /// [`stress_role`] says which. Between two polls of the device such a driver makes a
    /// [`Rendezvous::Idle`] of about a millisecond instead of spinning, so that it leaves the
    /// host's CPUs to the verifiers. The host attacks only the verifiers' data pages.
    Stress = 8,
    /// The touch-rate workload of `zapvm bench pressure`: forever, write one word (the first) of
    /// every page of the vCPU's slice except its first page, which holds a [`TouchRateHeader`];
    /// after each page the header's `pages` counter is updated, after each pass `passes` and
    /// `last_pass_cycles` (TSC cycles of that pass). The host samples the header to compute the
    /// guest's touch rate (pages/s) while it tears guest RAM down. Writes only (no read before
    /// the write), so a page the host discarded costs one write fault to get back. No ucall
    /// after the hello: the host stops the VM.
    TouchRate = 9,
    /// The phased workload of `zapvm governor` and `zapvm bench overcommit`: vCPU 0 keeps a
    /// working set that grows and shrinks as [`BootInfo::phase`] says, verifies it pass after
    /// pass, drives the balloon (inflating from free pages first, free page reporting of the
    /// pages it stopped using, statistics with zapvm's tags); other vCPUs idle. The contract is
    /// [`phased`]'s. It never ends on its own.
    Phased = 10,
    /// The guest-visible cost of a virtio queue kick, for `zapvm bench kick`: vCPU 0 initialises
    /// the virtio-balloon of [`BootInfo::virtio`] (features as [`Workload::Balloon`]'s driver,
    /// no buffer is ever queued), then [`KICK_ROUNDS`] times: [`KICKS_PER_ROUND`] QueueNotify
    /// writes of the inflate queue's index (a [`UcallKind::Timing`] of [`Pass::Kick`] with
    /// `args[1]` = kicks), then as many reads of the MagicValue register (an exit to the VMM
    /// that does no device work: [`Pass::MmioRead`], the baseline). Then Done(kicks in all, 0).
    /// Other vCPUs make Done(0, 0) at once. No ucall happens inside a timed pass.
    Kick = 11,
}

/// Rounds of [`Workload::Kick`] (each a kick pass and a baseline pass).
pub const KICK_ROUNDS: u64 = 9;
/// Kicks (and baseline reads) in one pass of [`Workload::Kick`].
pub const KICKS_PER_ROUND: u64 = 2000;

/// Counters a [`Workload::TouchRate`] vCPU keeps in the first page of its slice (cumulative since
/// the workload started); the host reads them from its side of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TouchRateHeader {
    /// [`TOUCH_RATE_MAGIC`] once the vCPU started.
    pub magic: u64,
    /// Complete passes over the slice (the first is the cold one).
    pub passes: u64,
    /// Pages touched (written), updated after every page.
    pub pages: u64,
    /// TSC cycles of the last complete pass.
    pub last_pass_cycles: u64,
}

/// [`TouchRateHeader::magic`].
pub const TOUCH_RATE_MAGIC: u64 = u64::from_le_bytes(*b"ZAPTOUCH");

/// [`UcallKind::Stage`] `args[0]` of a completed balloon step.
pub const STAGE_BALLOON_STEP: u64 = 0x100;
/// [`UcallKind::Stage`] `args[0]` of a completed virtio-mem step.
pub const STAGE_MEM_STEP: u64 = 0x200;
/// [`UcallKind::Stage`] `args[0]` of a completed pass of [`Workload::Stress`].
pub const STAGE_STRESS_PASS: u64 = 0x300;
/// [`BootInfo::flags`]: drivers misbehave on purpose (out-of-range PFNs, duplicate PFNs, bad
/// descriptor lengths, descriptor loops, out-of-range virtio-mem requests) to test the devices.
pub const FLAG_HOSTILE: u64 = 1 << 1;

/// [`BootInfo::flags`] of [`Workload::Stress`]: one vCPU drives the virtio-balloon (see
/// [`stress_role`]) instead of running the stress verifier.
pub const FLAG_STRESS_BALLOON: u64 = 1 << 2;
/// [`BootInfo::flags`] of [`Workload::Stress`]: one vCPU drives the virtio-mem device (see
/// [`stress_role`]) instead of running the stress verifier.
pub const FLAG_STRESS_VIRTIO_MEM: u64 = 1 << 3;
/// Pages at the start of the balloon driver's slice that it keeps for itself (queues, PFN
/// arrays, statistics, free-page-report area); the rest is the balloon's pool, so the largest
/// target the driver follows is the slice's pages minus these.
pub const BALLOON_CARVED_PAGES: u64 = 70;

/// What a vCPU of [`Workload::Stress`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StressRole {
    /// The stress verifier over its slice (laid out by [`stress_layout`]).
    Verifier,
    /// The driver of [`Workload::Balloon`] over its slice (the balloon's pool); it never ends.
    BalloonDriver,
    /// The driver of [`Workload::VirtioMem`] over the hot-pluggable region (its slice is
    /// ordinary RAM it keeps filled and verified); it never ends.
    VirtioMemDriver,
}

/// The role of `vcpu` in a [`Workload::Stress`] VM of `nr_vcpus` vCPUs with boot `flags`: with
/// [`FLAG_STRESS_BALLOON`] the last vCPU drives the balloon; with [`FLAG_STRESS_VIRTIO_MEM`] the
/// last vCPU not driving the balloon drives virtio-mem; every other vCPU is a verifier. Slices
/// are those of [`slice_pages`] over all `nr_vcpus` whatever the roles, so the verifiers are
/// vCPUs `0..` (the host gives each driver a vCPU of its own beyond them).
pub fn stress_role(flags: u64, nr_vcpus: u64, vcpu: u64) -> StressRole {
    let balloon = flags & FLAG_STRESS_BALLOON != 0;
    let virtio_mem = flags & FLAG_STRESS_VIRTIO_MEM != 0;
    let balloon_vcpu = nr_vcpus.checked_sub(1).filter(|_| balloon);
    let mem_vcpu = nr_vcpus.checked_sub(1 + u64::from(balloon)).filter(|_| virtio_mem);
    if balloon_vcpu == Some(vcpu) {
        StressRole::BalloonDriver
    } else if mem_vcpu == Some(vcpu) {
        StressRole::VirtioMemDriver
    } else {
        StressRole::Verifier
    }
}

/// A virtio-mmio device the guest may drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of its MMIO window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// virtio device type ([`virtio::device_type`]).
    pub device_id: u64,
    /// Its interrupt line (GSI); the test guest polls instead.
    pub irq: u64,
}

impl Workload {
    /// Decodes the raw value stored in [`BootInfo::workload`].
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Verify,
            2 => Self::Touch,
            3 => Self::AssertFail,
            4 => Self::Exception,
            5 => Self::DiscardVerify,
            6 => Self::Balloon,
            7 => Self::VirtioMem,
            8 => Self::Stress,
            9 => Self::TouchRate,
            10 => Self::Phased,
            11 => Self::Kick,
            _ => return None,
        })
    }
}

/// What a [`UcallKind::Rendezvous`] asks the host to do (its `args[0]`).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// Discard ranges of this vCPU's slice. `args[1]` = guest-physical address of an array of
    /// [`GpaRange`], `args[2]` = its capacity in entries. The host fills the array with the ranges
    /// it discarded and writes their number into `args[3]` of the record before resuming.
    Discard = 1,
    /// The vCPU has nothing to do for a while (a polling driver between two polls): the host
    /// may keep it stopped for up to `args[1]` microseconds (at most [`MAX_IDLE_US`]) instead of
    /// letting it spin at CPL 3, where it cannot halt. Nothing is written back. Every VMM that
    /// speaks this ABI answers it, with or without a host side for other rendezvous.
    Idle = 2,
}

/// The longest a [`Rendezvous::Idle`] keeps a vCPU stopped, in microseconds.
pub const MAX_IDLE_US: u64 = 10_000;

impl Rendezvous {
    /// Decodes `args[0]` of a rendezvous.
    pub fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            1 => Some(Self::Discard),
            2 => Some(Self::Idle),
            _ => None,
        }
    }
}

/// A range of guest-physical addresses, `[start, end)`, page aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpaRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl GpaRange {
    /// Number of 4 KiB pages in the range.
    pub fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start) / PAGE_SIZE
    }
}

/// What the VMM tells every vCPU of the guest, at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the VMM.
    pub abi_version: u64,
    /// Number of vCPUs running the workload.
    pub nr_vcpus: u64,
    /// A [`Workload`] as `u64`.
    pub workload: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// Seed of the memory pattern.
    pub seed: u64,
    /// Guest-physical address of the IDT page (256 16-byte gates) the guest fills itself.
    pub idt_gpa: u64,
    /// Number of valid entries in `work`.
    pub nr_work: u64,
    /// The RAM the workload owns, split between the vCPUs by [`slice_pages`].
    pub work: [GpaRange; MAX_RANGES],
    /// Number of valid entries in `virtio`.
    pub nr_virtio: u64,
    /// The virtio-mmio devices of the machine.
    pub virtio: [VirtioMmioDevice; MAX_VIRTIO_DEVICES],
    /// The working set's shape of [`Workload::Phased`] (zero for other workloads).
    pub phase: phased::PhaseParams,
}

/// Kinds of ucall.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UcallKind {
    /// First thing a vCPU does: `args[0]` = [`ABI_VERSION`], `args[1]` = guest TSC at entry.
    Hello = 1,
    /// A line of text for the console (the message).
    Print = 2,
    /// The vCPU entered a stage of its workload: `args[0]` = stage number.
    Stage = 3,
    /// Progress of the current stage: `args[0]` = done, `args[1]` = total.
    Progress = 4,
    /// A timed pass: `args[0]` = [`Pass`], `args[1]` = pages touched, `args[2]` = TSC cycles.
    Timing = 5,
    /// The workload failed; the message says why.
    Failure = 6,
    /// The workload finished: `args[0]` = pages verified, `args[1]` = checksum of the slice.
    Done = 7,
    /// A CPU exception: `args[0]` = vector, `args[1]` = error code, `args[2]` = RIP,
    /// `args[3]` = CR2, `args[4]` = CS.
    Exception = 8,
    /// The vCPU stops while the host acts on its behalf (a [`Rendezvous`] in `args[0]`); the
    /// host writes its reply into the record's `args` before the vCPU resumes.
    Rendezvous = 9,
}

impl UcallKind {
    /// Decodes [`Ucall::kind`].
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Hello,
            2 => Self::Print,
            3 => Self::Stage,
            4 => Self::Progress,
            5 => Self::Timing,
            6 => Self::Failure,
            7 => Self::Done,
            8 => Self::Exception,
            9 => Self::Rendezvous,
            _ => return None,
        })
    }
}

/// Timed passes of [`Workload::Touch`] (and of the fill/verify passes of [`Workload::Verify`]).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// First write of each page since boot.
    ColdWrite = 1,
    /// Second write of each page.
    WarmWrite = 2,
    /// Read of each page after it was written.
    WarmRead = 3,
    /// Verify: the fill pass (every word written).
    Fill = 4,
    /// Verify: the check pass (every word read and compared).
    Check = 5,
    /// [`Workload::Kick`]: QueueNotify writes (`pages` = kicks).
    Kick = 6,
    /// [`Workload::Kick`]: MagicValue reads, the exit baseline (`pages` = reads).
    MmioRead = 7,
}

impl Pass {
    /// Decodes a pass number from a [`UcallKind::Timing`] ucall.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::ColdWrite,
            2 => Self::WarmWrite,
            3 => Self::WarmRead,
            4 => Self::Fill,
            5 => Self::Check,
            6 => Self::Kick,
            7 => Self::MmioRead,
            _ => return None,
        })
    }
}

/// The record a ucall points at.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ucall {
    /// A [`UcallKind`] as `u64`.
    pub kind: u64,
    /// The vCPU index the guest was entered with.
    pub vcpu: u64,
    /// Arguments, meaning per kind.
    pub args: [u64; 6],
    /// Guest-physical address of a UTF-8 message, or 0.
    pub msg_gpa: u64,
    /// Length of the message in bytes.
    pub msg_len: u64,
}

impl Ucall {
    /// A ucall of `kind` with no arguments and no message.
    pub const fn new(kind: UcallKind, vcpu: u64) -> Self {
        Self { kind: kind as u64, vcpu, args: [0; 6], msg_gpa: 0, msg_len: 0 }
    }
}

/// The value the test guest writes at the 8-byte word at guest-physical address `gpa`.
///
/// Cheap (one multiply), different for every word and every seed, and never zero for a
/// non-zero seed's odd image, so a page read back as zeros never passes for a written one.
#[inline(always)]
pub fn pattern(seed: u64, gpa: u64) -> u64 {
    (gpa ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Calls `f` with the guest-physical address of every page of `vcpu`'s slice of `work`.
///
/// The pages of all ranges, taken in order, are cut into `nr_vcpus` contiguous slices whose sizes
/// differ by at most one page; vCPU `i` owns slice `i`.
pub fn slice_pages(work: &[GpaRange], nr_vcpus: u64, vcpu: u64, mut f: impl FnMut(u64)) {
    let total: u64 = work.iter().map(GpaRange::pages).sum();
    if nr_vcpus == 0 || vcpu >= nr_vcpus {
        return;
    }
    let first = total * vcpu / nr_vcpus;
    let last = total * (vcpu + 1) / nr_vcpus;
    let mut index = 0u64;
    for range in work {
        let pages = range.pages();
        // The part of [first, last) that falls into this range.
        let lo = first.max(index);
        let hi = last.min(index + pages);
        let mut page = lo;
        while page < hi {
            f(range.start + (page - index) * PAGE_SIZE);
            page += 1;
        }
        index += pages;
    }
}

/// The checksum the guest reports for a fully verified slice: the wrapping sum of [`pattern`]
/// over every word of every page the slice owns. The VMM recomputes it from its side.
pub fn page_checksum(seed: u64, page_gpa: u64) -> u64 {
    let mut sum = 0u64;
    let mut word = 0;
    while word < PAGE_SIZE {
        sum = sum.wrapping_add(pattern(seed, page_gpa + word));
        word += 8;
    }
    sum
}

/// Generations per metadata page of [`Workload::Stress`] (one `u32` each).
pub const STRESS_GENS_PER_PAGE: u64 = PAGE_SIZE / 4;
/// Bytes at the start of the first metadata page that hold the [`StressHeader`] (the generation
/// table starts after it).
pub const STRESS_HEADER_BYTES: u64 = 64;

/// Counters a [`Workload::Stress`] vCPU keeps at the start of its slice (cumulative since boot,
/// updated after every pass), so the host can read them through its own memory access.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StressHeader {
    /// [`STRESS_MAGIC`] once the vCPU started.
    pub magic: u64,
    /// Passes completed.
    pub passes: u64,
    /// Pages verified.
    pub verified: u64,
    /// Pages found all zero although they had been written (generation > 0): discards seen.
    pub zero_pages: u64,
    /// Pages found mixing zeros and the pattern (a discard raced the rewrite).
    pub torn_pages: u64,
}

/// [`StressHeader::magic`].
pub const STRESS_MAGIC: u64 = u64::from_le_bytes(*b"ZAPSTRES");

/// How one vCPU's slice of the work RAM is used by [`Workload::Stress`]: the first `meta_pages`
/// pages hold the [`StressHeader`] and the generation table (one `u32` per data page), the rest are
/// data pages. The host may attack data pages only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StressLayout {
    /// Index of the slice's first page among all pages of the work ranges.
    pub first: u64,
    /// Pages in the slice.
    pub pages: u64,
    /// Metadata pages at its start.
    pub meta_pages: u64,
}

/// The [`StressLayout`] of `vcpu`'s slice (the slices of [`slice_pages`]).
pub fn stress_layout(work: &[GpaRange], nr_vcpus: u64, vcpu: u64) -> StressLayout {
    let total: u64 = work.iter().map(GpaRange::pages).sum();
    if nr_vcpus == 0 || vcpu >= nr_vcpus {
        return StressLayout { first: 0, pages: 0, meta_pages: 0 };
    }
    let first = total * vcpu / nr_vcpus;
    let pages = total * (vcpu + 1) / nr_vcpus - first;
    // Smallest m with m * PER_PAGE >= header + 4 * (pages - m) bytes' worth of entries.
    let entries_first = (PAGE_SIZE - STRESS_HEADER_BYTES) / 4;
    let mut meta_pages = 1;
    while meta_pages < pages && entries_first + (meta_pages - 1) * STRESS_GENS_PER_PAGE < pages - meta_pages {
        meta_pages += 1;
    }
    StressLayout { first, pages, meta_pages: meta_pages.min(pages) }
}

/// The guest-physical address of the `index`-th page of all pages of `work` (in order).
pub fn work_page_gpa(work: &[GpaRange], mut index: u64) -> Option<u64> {
    for r in work {
        if index < r.pages() {
            return Some(r.start + index * PAGE_SIZE);
        }
        index -= r.pages();
    }
    None
}

impl StressLayout {
    /// Number of data pages.
    pub fn data_pages(&self) -> u64 {
        self.pages - self.meta_pages
    }

    /// Guest-physical address of the [`StressHeader`] (the slice's first page).
    pub fn header_gpa(&self, work: &[GpaRange]) -> u64 {
        work_page_gpa(work, self.first).unwrap_or(0)
    }

    /// Guest-physical address of data page `i`'s generation (`u32`).
    pub fn gen_gpa(&self, work: &[GpaRange], i: u64) -> u64 {
        let byte = STRESS_HEADER_BYTES + 4 * i;
        work_page_gpa(work, self.first + byte / PAGE_SIZE).unwrap_or(0) + byte % PAGE_SIZE
    }

    /// Guest-physical address of data page `i`.
    pub fn data_gpa(&self, work: &[GpaRange], i: u64) -> u64 {
        work_page_gpa(work, self.first + self.meta_pages + i).unwrap_or(0)
    }

    /// Calls `f` with every maximal guest-physically contiguous run of data pages, with the index
    /// of its first data page.
    pub fn data_runs(&self, work: &[GpaRange], mut f: impl FnMut(u64, GpaRange)) {
        let (lo, hi) = (self.first + self.meta_pages, self.first + self.pages);
        let mut index = 0u64;
        for r in work {
            let (s, e) = (lo.max(index), hi.min(index + r.pages()));
            if s < e {
                let run = GpaRange {
                    start: r.start + (s - index) * PAGE_SIZE,
                    end: r.start + (e - index) * PAGE_SIZE,
                };
                f(s - lo, run);
            }
            index += r.pages();
        }
    }
}

/// The value of the word at `gpa` of a [`Workload::Stress`] data page of generation `generation`:
/// [`pattern`] with the seed mixed with the generation by a multiplication, so that generations
/// differ in every bit position (a plain XOR would make generation 8 at one word equal generation
/// 0 at the next word).
#[inline(always)]
pub fn stress_pattern(seed: u64, generation: u64, gpa: u64) -> u64 {
    pattern(seed ^ generation.wrapping_mul(0xd6e8_feb8_6659_fd93), gpa)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn slices_cover_every_page_exactly_once() {
        let work = [
            GpaRange { start: 0x40_0000, end: 0x40_0000 + 7 * PAGE_SIZE },
            GpaRange { start: 0x1_0000_0000, end: 0x1_0000_0000 + 5 * PAGE_SIZE },
        ];
        for nr in 1..=13u64 {
            let mut all = Vec::new();
            let mut sizes = Vec::new();
            for vcpu in 0..nr {
                let before = all.len();
                slice_pages(&work, nr, vcpu, |gpa| all.push(gpa));
                sizes.push(all.len() - before);
            }
            let mut expected = Vec::new();
            for r in &work {
                let mut a = r.start;
                while a < r.end {
                    expected.push(a);
                    a += PAGE_SIZE;
                }
            }
            assert_eq!(all, expected, "{nr} vCPUs");
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{nr} vCPUs: unbalanced {sizes:?}");
        }
    }

    #[test]
    fn pattern_is_never_zero_and_depends_on_seed_and_address() {
        for gpa in (0..1 << 20).step_by(8) {
            assert_ne!(pattern(7, gpa), 0);
            assert_ne!(pattern(7, gpa), pattern(8, gpa));
            assert_ne!(pattern(7, gpa), pattern(7, gpa + 8));
        }
    }

    #[test]
    fn unknown_raw_values_are_rejected() {
        assert_eq!(Workload::from_raw(0), None);
        assert_eq!(UcallKind::from_raw(99), None);
        assert_eq!(Pass::from_raw(0), None);
        assert_eq!(Workload::from_raw(Workload::Touch as u64), Some(Workload::Touch));
        assert_eq!(Workload::from_raw(8), Some(Workload::Stress));
        assert_eq!(Workload::from_raw(9), Some(Workload::TouchRate));
        assert_eq!(Workload::from_raw(11), Some(Workload::Kick));
        assert_eq!(Workload::from_raw(12), None);
        assert_eq!(Pass::from_raw(Pass::MmioRead as u64), Some(Pass::MmioRead));
        assert_eq!(Pass::from_raw(8), None);
    }

    #[test]
    fn stress_roles_take_the_last_vcpus() {
        let roles = |flags, nr| (0..nr).map(|v| stress_role(flags, nr, v)).collect::<Vec<_>>();
        use StressRole::*;
        assert_eq!(roles(0, 2), [Verifier, Verifier]);
        assert_eq!(roles(FLAG_STRESS_BALLOON, 3), [Verifier, Verifier, BalloonDriver]);
        assert_eq!(roles(FLAG_STRESS_VIRTIO_MEM, 2), [Verifier, VirtioMemDriver]);
        assert_eq!(
            roles(FLAG_STRESS_BALLOON | FLAG_STRESS_VIRTIO_MEM, 4),
            [Verifier, Verifier, VirtioMemDriver, BalloonDriver]
        );
        assert_eq!(roles(FLAG_STRESS_BALLOON | FLAG_STRESS_VIRTIO_MEM, 1), [BalloonDriver]);
        assert_eq!(roles(FLAG_STRESS_BALLOON, 0), []);
    }

    #[test]
    fn stress_layout_covers_the_slice_and_the_table_fits() {
        let work = [
            GpaRange { start: 0x40_0000, end: 0x40_0000 + 3000 * PAGE_SIZE },
            GpaRange { start: 0x1_0000_0000, end: 0x1_0000_0000 + 1500 * PAGE_SIZE },
        ];
        for nr in 1..=5u64 {
            let mut next_first = 0;
            for vcpu in 0..nr {
                let l = stress_layout(&work, nr, vcpu);
                assert_eq!(l.first, next_first);
                next_first += l.pages;
                let mut slice = Vec::new();
                slice_pages(&work, nr, vcpu, |g| slice.push(g));
                assert_eq!(slice.len() as u64, l.pages);
                // The table (after the header) holds every data page's entry, inside the meta pages.
                let last = l.gen_gpa(&work, l.data_pages() - 1);
                assert!(slice[..l.meta_pages as usize].contains(&(last & !(PAGE_SIZE - 1))));
                assert!(
                    l.meta_pages == 1 || {
                        let fewer = StressLayout { meta_pages: l.meta_pages - 1, ..l };
                        (fewer.gen_gpa(&work, fewer.data_pages() - 1) & !(PAGE_SIZE - 1))
                            == slice[fewer.meta_pages as usize]
                    }
                );
                let mut data = Vec::new();
                l.data_runs(&work, |i, r| {
                    assert_eq!(l.data_gpa(&work, i), r.start);
                    let mut a = r.start;
                    while a < r.end {
                        data.push(a);
                        a += PAGE_SIZE;
                    }
                });
                assert_eq!(&data[..], &slice[l.meta_pages as usize..]);
            }
        }
        assert_ne!(stress_pattern(1, 8, 0x1000), stress_pattern(1, 0, 0x1008));
    }
}
