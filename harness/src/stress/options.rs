//! What a `zapvm stress` run is asked to do: [`StressOptions`] (with its planted faults, feature
//! `fault-injection`), the work goal [`Work`] and the least work done so far ([`Progress`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use vmm::memory::{MemoryBackend, HUGE_PAGE_SIZE};

use super::cli::DEFAULT_DURATION;
use super::Planted;
#[cfg(doc)]
use super::WorkReport;

/// What `zapvm stress` runs.
#[derive(Clone, Debug)]
pub struct StressOptions {
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// vCPUs running the stress verifier (the balloon and virtio-mem storms each add a driver
    /// vCPU on top).
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// THP for guest RAM.
    pub thp: bool,
    /// Host backing of guest RAM.
    pub backend: MemoryBackend,
    /// With [`Self::work`] unset, how long the scenarios run. With it set, the deadline that
    /// catches a hang: the run ends as soon as its work is done, and work not done by then is a
    /// broken invariant.
    pub duration: Duration,
    /// The work a run does before it ends (`None`: it runs for [`Self::duration`]).
    pub work: Option<Work>,
    /// Seed of the guest's pattern and of every scenario's RNG.
    pub seed: u64,
    /// Discard storm through the notifier.
    pub discard: bool,
    /// Seal guest RAM with `mseal(2)` (see the module docs).
    pub seal_guest_ram: bool,
    /// **Fault injection for the stress test only**: with `seal_guest_ram`, skip the `mseal`
    /// call itself (everything else behaves as sealed), as a seal that silently failed would;
    /// the judge must notice the external blows that then succeed.
    #[cfg(feature = "fault-injection")]
    pub plant_skip_mseal: bool,
    /// External madvise/munmap/mremap chaos.
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    pub mprotect: bool,
    /// Balloon storm: random targets up and down, followed by the guest's driver.
    pub balloon: bool,
    /// virtio-mem plug/unplug storm: random requested sizes up and down.
    pub virtio_mem: bool,
    /// Bytes of the virtio-mem device's hot-pluggable region (whole 2 MiB blocks).
    pub virtio_mem_region: u64,
    /// Largest discard range in bytes (4 KiB .. 2 MiB by default; 4 KiB for an invalidation-rate
    /// run).
    pub discard_max: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// **Fault injection for the stress test only**: after this long, the next teardown skips its
    /// `invalidate_range_end` (`notifier::AddressSpace::plant_fault_skip_next_end`).
    #[cfg(feature = "fault-injection")]
    pub plant_skip_end_after: Option<Duration>,
    /// **Fault injection for the stress test only**: after this long, the balloon and virtio-mem
    /// storms each write a non-zero word into memory their device discarded (the next ballooned
    /// page to come back, the next unplugged block to be plugged), as a memory layer that failed
    /// to discard would leave it.
    #[cfg(feature = "fault-injection")]
    pub plant_dirty_discarded_after: Option<Duration>,
    /// **Fault injection for the stress test only**: each time verifier 0 completes a pass, the
    /// host writes [`PLANTED_WORD`] into a word of that verifier's last data page (which the guest
    /// checks last in its next pass), as memory corrupted behind the guest's back would hold it.
    /// The guest's verifier must fail the run.
    #[cfg(feature = "fault-injection")]
    pub plant_corrupt_verifier_word: bool,
    /// **Fault injection for the stress test only**: the VMM's table keeps up to this many
    /// torn-down entries per region alive, translating to the frame they had
    /// ([`vmm::mmu::GuestMmu::plant_stale_translations`]), as a table that missed an
    /// invalidation would. The device-path checks must fail the run.
    #[cfg(feature = "fault-injection")]
    pub plant_stale_translations: usize,
}

/// How much work a run does (see [`StressOptions::work`]). A zero asks for nothing of its kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Passes over its whole slice every verifier vCPU completes.
    pub passes: u64,
    /// Targets the guest's driver reaches in each device storm (balloon targets, virtio-mem
    /// requested sizes).
    pub targets: u64,
    /// Operations each host scenario completes: discards (discard storm), madvise/munmap/mremap
    /// blows (external chaos), read-only phases (mprotect) and judged reads (device reader).
    pub ops: u64,
}

/// The least work done of each kind (see [`WorkReport::least`]); `None` for a kind no scenario of
/// the run does.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Progress {
    pub(super) passes: Option<u64>,
    pub(super) targets: Option<u64>,
    pub(super) ops: Option<u64>,
}

impl Progress {
    /// Whether this is at least `goal` in every kind some scenario does.
    pub(super) fn covers(&self, goal: &Work) -> bool {
        self.passes.is_none_or(|n| n >= goal.passes)
            && self.targets.is_none_or(|n| n >= goal.targets)
            && self.ops.is_none_or(|n| n >= goal.ops)
    }

    pub(super) fn as_work(&self) -> Work {
        Work {
            passes: self.passes.unwrap_or(0),
            targets: self.targets.unwrap_or(0),
            ops: self.ops.unwrap_or(0),
        }
    }
}

/// The word [`StressOptions::plant_corrupt_verifier_word`] writes: neither zero nor, for any
/// realistic generation, the guest's pattern.
#[cfg(feature = "fault-injection")]
pub const PLANTED_WORD: u64 = 0x0bad_c0de_0bad_c0de;

impl StressOptions {
    /// Defaults: 2 verifier vCPUs, 256 MiB anonymous RAM, a 128 MiB virtio-mem region (used only
    /// by the virtio-mem storm), 10 s without a work goal, no scenario selected.
    pub fn new() -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            vcpus: 2,
            mem: 256 << 20,
            thp: false,
            backend: MemoryBackend::Anonymous,
            duration: DEFAULT_DURATION,
            work: None,
            seed: 0x5eed,
            discard: false,
            seal_guest_ram: false,
            #[cfg(feature = "fault-injection")]
            plant_skip_mseal: false,
            external_chaos: false,
            mprotect: false,
            balloon: false,
            virtio_mem: false,
            virtio_mem_region: 128 << 20,
            discard_max: HUGE_PAGE_SIZE as usize,
            progress: false,
            #[cfg(feature = "fault-injection")]
            plant_skip_end_after: None,
            #[cfg(feature = "fault-injection")]
            plant_dirty_discarded_after: None,
            #[cfg(feature = "fault-injection")]
            plant_corrupt_verifier_word: false,
            #[cfg(feature = "fault-injection")]
            plant_stale_translations: 0,
        }
    }

    /// When each planted fault is due (all `None` without the `fault-injection` feature).
    pub(super) fn planted(&self) -> Planted {
        #[cfg(feature = "fault-injection")]
        return Planted {
            skip_end_after: self.plant_skip_end_after,
            dirty_discarded_after: self.plant_dirty_discarded_after,
            corrupt_verifier_word: self.plant_corrupt_verifier_word,
        };
        #[cfg(not(feature = "fault-injection"))]
        Planted::default()
    }

    /// Every scenario.
    pub fn all(mut self) -> Self {
        self.discard = true;
        self.external_chaos = true;
        self.mprotect = true;
        self.balloon = true;
        self.virtio_mem = true;
        self
    }
}

impl Default for StressOptions {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind of work no scenario of the run does never holds the run up; one that some
    /// scenario does must reach the goal.
    #[test]
    fn work_progress_covers_only_the_kinds_the_run_does() {
        let goal = Work { passes: 2, targets: 3, ops: 10 };
        let p = Progress { passes: Some(2), targets: None, ops: Some(10) };
        assert!(p.covers(&goal));
        assert_eq!(p.as_work(), Work { passes: 2, targets: 0, ops: 10 });
        assert!(!Progress { ops: Some(9), ..p }.covers(&goal));
        assert!(!Progress { passes: Some(1), ..p }.covers(&goal));
        assert!(!Progress { targets: Some(2), ..p }.covers(&goal));
    }
}
