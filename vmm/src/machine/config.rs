//! What the user asked for: a [`VmConfig`] of plain values (guest RAM, vCPUs, what to boot, the
//! devices, where the console goes, the control socket), checked and turned into a VM by
//! [`super::builder`].

use std::io::Write;

use super::AfterStart;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::test_guest;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::memory::MemoryConfig;
use crate::teardown::TeardownPolicy;

/// Where the guest's serial console goes.
#[derive(Clone, Default)]
pub enum Console {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// The VMM's standard output, and its standard input typed into the guest's UART (see
    /// [`crate::console_input`]): the user's terminal is the guest's console.
    Terminal,
    /// Nowhere.
    Null,
    /// A file, created or truncated when the VM starts (the guest's output only; nothing is
    /// typed into the guest).
    File(PathBuf),
    /// A buffer (tests).
    Buffer(Arc<Mutex<Vec<u8>>>),
}

pub(super) struct BufferWriter(Arc<Mutex<Vec<u8>>>);
impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub(super) fn writer(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Console::Stdout | Console::Terminal => Box::new(std::io::stdout()),
            Console::Null => Box::new(std::io::sink()),
            Console::File(path) => Box::new(std::fs::File::create(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("the serial console file {}: {e}", path.display()))
            })?),
            Console::Buffer(buf) => Box::new(BufferWriter(buf.clone())),
        })
    }
}

/// What to boot.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// The project's test guest: the built-in one, or an ELF at a path.
    TestGuest {
        /// An ELF to boot instead of the built-in guest.
        elf: Option<PathBuf>,
        /// What it does.
        params: test_guest::TestGuestParams,
    },
    /// A Linux kernel.
    Linux {
        /// bzImage or vmlinux.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
}

/// Everything a VM is made from.
#[derive(Clone)]
pub struct VmConfig {
    /// The KVM device (normally `/dev/kvm`).
    pub kvm_device: PathBuf,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// What to boot.
    pub boot: BootSource,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Where the serial console goes.
    pub console: Console,
    /// Watch guest RAM with the userfaultfd monitor, so that teardowns by code outside the VMM
    /// reach the memory layer too.
    pub monitor: bool,
    /// What to do when code outside the VMM unmaps or moves guest RAM.
    pub teardown_policy: TeardownPolicy,
    /// Seal guest RAM with `mseal(2)` (see [`crate::memory`]): the kernel refuses every unmap,
    /// move, protection change and `MAP_FIXED` mapping over it, by anyone, so no external
    /// teardown can leave a hole another mapping could be placed in. The VMM gives up its own
    /// unmap, remap and protect operations (the notifier refuses them with
    /// `notifier::Error::Sealed`); discards (balloon, virtio-mem, free page reporting) still work.
    pub seal_guest_ram: bool,
    /// **Fault injection for tests only**: with `seal_guest_ram`, everything behaves and reports
    /// as sealed except that the `mseal` call is skipped, as a VMM whose seal silently failed
    /// would; checkers of the seal (the stress run's) must notice. Only with the feature
    /// `fault-injection`.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub plant_skip_mseal: bool,
    /// Called on the VMM's thread once the vCPUs run (tests use it to act on a running VM).
    pub after_start: Option<AfterStart>,
    /// Called once when the VM has ended, however it ended (its vCPUs are joined, guest RAM is
    /// still mapped): controllers that touch guest RAM by its host addresses (not through the
    /// table or the notifier, which fail cleanly from then on) must stop before this returns,
    /// because guest RAM is unmapped right after it. See [`BuiltVm`](super::BuiltVm)'s drop.
    pub before_teardown: Option<AfterStart>,
    /// A virtio-balloon device, with the features it offers.
    pub balloon: Option<BalloonConfig>,
    /// How often the balloon asks the guest for fresh statistics (its stats queue); `None`: never.
    pub balloon_stats_interval: Option<Duration>,
    /// Serve the control API on this Unix socket (see [`crate::api`]).
    pub api_socket: Option<PathBuf>,
    /// A virtio-mem device and its hot-pluggable region.
    pub virtio_mem: Option<VirtioMemSpec>,
    /// Register an ioeventfd per virtio queue so that a guest kick does not exit to the VMM
    /// (the event loop processes the queue); `false`: every kick exits and is processed on the
    /// vCPU thread (what happens anyway where the host refuses ioeventfd).
    pub ioeventfd: bool,
    /// Fault all boot RAM in before the guest starts ([`crate::memory::GuestRam::prealloc`]):
    /// resident from the start, given back only by discards (balloon, free page reporting).
    pub prealloc: bool,
    /// Export the VM's statistics for Prometheus (see [`crate::metrics`]): served over HTTP
    /// and/or written to a file while the VM runs, stopped (after a last file write) when it ends.
    pub metrics: Option<crate::metrics::Exporter>,
}

/// A virtio-mem device: a region of `region_size` bytes above all RAM, of which the host asks
/// the guest to plug `requested_size` (both whole 2 MiB blocks).
#[derive(Clone, Copy, Debug)]
pub struct VirtioMemSpec {
    /// Bytes of the device's region.
    pub region_size: u64,
    /// Bytes the guest should plug at boot.
    pub requested_size: u64,
}

impl VmConfig {
    /// A VM booting `boot` with the defaults of `zapvm run`: `/dev/kvm`, 256 MiB of anonymous
    /// RAM without THP, one vCPU, no timeout, the console on stdout, the userfaultfd monitor on,
    /// external teardowns re-backed, a virtio-balloon with all its features, ioeventfds on.
    pub fn new(boot: BootSource) -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            memory: MemoryConfig { size: 256 << 20, backend: Default::default(), thp: false },
            vcpus: 1,
            boot,
            timeout: None,
            console: Console::Stdout,
            monitor: true,
            teardown_policy: Default::default(),
            seal_guest_ram: false,
            #[cfg(feature = "fault-injection")]
            plant_skip_mseal: false,
            after_start: None,
            before_teardown: None,
            balloon: Some(BalloonConfig::default()),
            balloon_stats_interval: Some(Duration::from_secs(5)),
            api_socket: None,
            virtio_mem: None,
            ioeventfd: true,
            prealloc: false,
            metrics: None,
        }
    }

    /// A VM booting the built-in test guest with `params`, otherwise as [`VmConfig::new`].
    pub fn test_guest(params: test_guest::TestGuestParams) -> Self {
        Self::new(BootSource::TestGuest { elf: None, params })
    }
}
