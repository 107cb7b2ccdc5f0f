//! Building a VM from a [`VmConfig`] and running it to an outcome.
//!
//! Data flows one way: the config makes guest RAM, the VM and its devices; the boot path
//! fills RAM and says how each vCPU enters; vCPU threads run and report to the event loop on
//! this thread; the loop decides when the VM ends and returns a [`RunReport`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use guest_abi::{page_checksum, pattern, slice_pages, BootInfo, Workload};
use std::os::unix::thread::JoinHandleExt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::api::events::name as event_name;
use crate::api::{EventQueue, QmpError};
use crate::arch::{cpu, gdt};
use crate::boot::{self, test_guest, BootError};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonStats};
use crate::devices::virtio::mem::{VirtioMem, VirtioMemConfig, VirtioMemStats};
use crate::devices::virtio::mmio::{MmioTransport, TransportStats, MMIO_WINDOW_SIZE};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::{Bus, BusError};
use crate::kvm_stats::KvmStatsReader;
use crate::memory::{GuestRam, MemoryConfig, MemoryError};
use crate::metrics::{KvmSample, StatsSample};
use crate::mmu::{GuestMemoryAccess, GuestMmu, MmuStats};
use crate::rendezvous::{DiscardRecord, DiscardRendezvous};
use crate::teardown::{GuardedRegion, TeardownGuard, TeardownPolicy, TeardownReport};
use crate::vstate::vcpu::{
    install_kick_handler, kick_signal, Vcpu, VcpuEvent, VcpuOutcome, VcpuReport, VcpuShared,
};
use crate::vstate::vm::{open_kvm, Vm, VmError};

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

struct BufferWriter(Arc<Mutex<Vec<u8>>>);
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
    fn writer(&self) -> std::io::Result<Box<dyn Write + Send>> {
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
            balloon: Some(BalloonConfig::default()),
            balloon_stats_interval: Some(Duration::from_secs(5)),
            api_socket: None,
            virtio_mem: None,
            ioeventfd: true,
            metrics: None,
        }
    }

    /// A VM booting the built-in test guest with `params`, otherwise as [`VmConfig::new`].
    pub fn test_guest(params: test_guest::TestGuestParams) -> Self {
        Self::new(BootSource::TestGuest { elf: None, params })
    }
}

/// The control socket's view of a running VM (QMP's commands; see [`crate::api::commands`]).
impl crate::api::VmHandle for VmControl {
    fn status(&self) -> crate::api::RunStatus {
        if self.paused() {
            crate::api::RunStatus::Paused
        } else {
            crate::api::RunStatus::Running
        }
    }

    fn stop(&self) -> Result<(), QmpError> {
        VmControl::pause(self).map_err(QmpError::generic)
    }

    fn cont(&self) -> Result<(), QmpError> {
        VmControl::resume(self);
        Ok(())
    }

    fn quit(&self) -> Result<(), QmpError> {
        VmControl::quit(self);
        Ok(())
    }

    fn base_memory(&self) -> u64 {
        self.ram_bytes
    }

    fn set_balloon_target(&self, pages: u32) -> Result<(), QmpError> {
        let b = self.balloon.as_ref().ok_or_else(no_balloon)?;
        b.lock().unwrap_or_else(|e| e.into_inner()).update_config(|d| d.set_target_pages(pages));
        Ok(())
    }

    fn balloon_actual(&self) -> Result<u32, QmpError> {
        let b = self.balloon.as_ref().ok_or_else(no_balloon)?;
        Ok(b.lock().unwrap_or_else(|e| e.into_inner()).device().stats().actual_pages)
    }

    fn balloon_guest_stats(&self) -> Result<(Vec<(String, u64)>, u64), QmpError> {
        let b = self.balloon.as_ref().ok_or_else(no_balloon)?;
        let b = b.lock().unwrap_or_else(|e| e.into_inner());
        let at = b
            .device()
            .guest_stats_updated_at()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok((b.device().stats().guest_stats.into_iter().collect(), at))
    }

    fn balloon_details(&self) -> Result<serde_json::Value, QmpError> {
        let b = self.balloon.as_ref().ok_or_else(no_balloon)?;
        Ok(self.balloon_json(b))
    }

    fn memory_devices(&self) -> Vec<crate::api::VirtioMemInfo> {
        let Some(m) = &self.virtio_mem else { return Vec::new() };
        let m = m.lock().unwrap_or_else(|e| e.into_inner());
        let d = m.device();
        let (addr, size) = d.region();
        vec![crate::api::VirtioMemInfo {
            id: crate::api::commands::VIRTIO_MEM_ID.into(),
            memaddr: addr,
            requested_size: d.requested_size(),
            size: d.plugged_size(),
            max_size: size,
            block_size: d.block_size(),
            node: 0,
        }]
    }

    fn set_requested_size(&self, id: &str, bytes: u64) -> Result<(), QmpError> {
        let m = match &self.virtio_mem {
            Some(m) if id == crate::api::commands::VIRTIO_MEM_ID => m,
            _ => return Err(QmpError::device_not_found(format!("Device '{id}' not found"))),
        };
        let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
        m.update_config(|d| d.set_requested_size(bytes))
            .map_err(|e| QmpError::generic(format!("Property 'virtio-mem.requested-size': {e}")))
    }

    fn virtio_mem_details(&self) -> Result<serde_json::Value, QmpError> {
        let m = self.virtio_mem.as_ref().ok_or_else(|| {
            QmpError::device_not_found("Device 'vmem0' not found (run the VM with --virtio-mem)")
        })?;
        Ok(serde_json::to_value(m.lock().unwrap_or_else(|e| e.into_inner()).device().stats())
            .unwrap_or_default())
    }

    fn kvm_stats(&self) -> Result<Vec<crate::api::StatsGroup>, QmpError> {
        let reader = self.kvm_stats.as_ref().ok_or_else(|| {
            QmpError::generic("this host's KVM has no binary statistics (KVM_GET_STATS_FD)")
        })?;
        let group = |vcpu: Option<usize>, fd: &crate::kvm_stats::StatsFd| {
            let snapshot =
                fd.read().map_err(|e| QmpError::generic(format!("reading KVM's statistics: {e}")))?;
            Ok(crate::api::StatsGroup {
                vcpu,
                stats: snapshot.iter().map(|(desc, values)| (desc.clone(), values.to_vec())).collect(),
            })
        };
        let mut groups = vec![group(None, &reader.vm)?];
        for (index, fd) in reader.vcpus.iter().enumerate() {
            groups.push(group(Some(index), fd)?);
        }
        Ok(groups)
    }

    fn memory_layer(&self) -> Result<serde_json::Value, QmpError> {
        Ok(VmControl::stats(self))
    }
}

fn no_balloon() -> QmpError {
    QmpError::device_not_active("No balloon device has been activated")
}

/// Where the virtio-mmio windows go (the guest-physical map is [`crate::arch::layout`]).
pub use crate::arch::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
/// GSI of the first virtio-mmio device (after the legacy ISA lines the PIC/IOAPIC use).
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// The balloon device as the VMM holds it.
pub type BalloonDevice = Arc<Mutex<MmioTransport<Balloon>>>;
/// The virtio-mem device as the VMM holds it.
pub type VirtioMemDevice = Arc<Mutex<MmioTransport<VirtioMem>>>;

/// A hook called once the vCPUs of a VM run.
pub type AfterStart = Arc<dyn Fn(&Arc<VmControl>) + Send + Sync>;

/// A running VM as its controllers (the control API, tests) see it.
///
/// [`run`] hands it to the [`AfterStart`] hook once the vCPUs run; it is meant for use while the
/// run is in progress (from the hook or from threads the hook starts). Its accessors are the
/// whole view of the VM a controller gets: the guest RAM regions, the VMM's table, the devices.
pub struct VmControl {
    regions: Vec<(u64, usize, usize)>,
    mmu: Arc<GuestMmu>,
    balloon: Option<BalloonDevice>,
    virtio_mem: Option<VirtioMemDevice>,
    /// Bytes of RAM the guest was booted with (without a hot-pluggable region).
    ram_bytes: u64,
    shared: Arc<VcpuShared>,
    space: Arc<notifier::AddressSpace>,
    kvm_stats: Option<Arc<KvmStatsReader>>,
    teardown: Arc<TeardownGuard>,
    rendezvous: Option<Arc<DiscardRendezvous>>,
    quit: EventFd,
    /// The VM's QMP events on their way to the control socket.
    events: Arc<EventQueue>,
    /// Whether `SHUTDOWN` was emitted (once per VM).
    shutdown_emitted: AtomicBool,
    /// The vCPU threads, while they may be signalled (`None` once the VMM joins them).
    threads: Mutex<Option<Vec<libc::pthread_t>>>,
    started: Instant,
}

impl VmControl {
    /// Guest RAM as the VM was built with it: one `(guest-physical start, host address, length)`
    /// per region, in guest-physical order, the hot-pluggable (virtio-mem) region last if the VM
    /// has one. The host ranges are the VMM's mappings for the life of the VM; code outside the
    /// VMM may tear them down (the teardown guard re-backs them), but they never move.
    pub fn ram_regions(&self) -> &[(u64, usize, usize)] {
        &self.regions
    }

    /// The VMM's own second-level table over guest RAM: the device path every emulated device
    /// reads and writes guest memory through, kept coherent with every teardown by the notifier.
    /// Accesses through it are what a device would see at that moment.
    pub fn guest_mmu(&self) -> &Arc<GuestMmu> {
        &self.mmu
    }

    /// The balloon device, if the VM has one (`VmConfig::balloon`). Lock it briefly: the vCPU
    /// and event-loop threads take the same lock to process the device's queues.
    pub fn balloon(&self) -> Option<&BalloonDevice> {
        self.balloon.as_ref()
    }

    /// The virtio-mem device, if the VM has one (`VmConfig::virtio_mem`). Lock it briefly, as
    /// [`Self::balloon`].
    pub fn virtio_mem(&self) -> Option<&VirtioMemDevice> {
        self.virtio_mem.as_ref()
    }

    /// Asks the VMM to stop the VM; the run ends with [`VmOutcome::Quit`].
    pub fn quit(&self) {
        self.emit_shutdown(false, "host-qmp-quit");
        let _ = self.quit.write(1);
    }

    /// The VM's QMP events (what the control socket sends its clients).
    pub fn events(&self) -> &Arc<EventQueue> {
        &self.events
    }

    /// Emits `SHUTDOWN` unless it was already.
    fn emit_shutdown(&self, guest: bool, reason: &str) {
        if !self.shutdown_emitted.swap(true, Ordering::SeqCst) {
            self.events.emit(event_name::SHUTDOWN, Some(crate::api::events::shutdown_data(guest, reason)));
        }
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &t in threads.iter().flatten() {
            // SAFETY: the threads are joinable and not joined while `threads` is `Some` (the VMM
            // takes it, under this lock, before joining), so each pthread_t is valid.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Stops every vCPU at its next exit (kicking them out of `KVM_RUN`) and waits until all
    /// that still run are parked.
    pub fn pause(&self) -> Result<(), String> {
        if !self.shared.pause.is_closed() {
            self.events.emit(event_name::STOP, None);
        }
        self.shared.pause.close();
        self.kick_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive = self.shared.alive.load(Ordering::SeqCst);
            if self.shared.pause.wait_parked(alive, Duration::from_millis(100)) >= alive {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("only some of {alive} vCPUs stopped within 5 s"));
            }
            self.kick_all();
        }
    }

    /// The balloon's target and statistics.
    fn balloon_json(&self, b: &BalloonDevice) -> serde_json::Value {
        serde_json::to_value(b.lock().unwrap_or_else(|e| e.into_inner()).device().stats())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        if self.shared.pause.is_closed() {
            self.events.emit(event_name::RESUME, None);
        }
        self.shared.pause.open();
    }

    /// How many vCPU threads have begun to run (every one has, once this equals the number of
    /// vCPUs).
    pub fn vcpus_running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Whether the VM is paused.
    pub fn paused(&self) -> bool {
        self.shared.pause.is_closed()
    }

    /// A JSON snapshot of the VM's statistics: KVM's, the table's, the notifier's, external
    /// teardowns, the balloon's ([`StatsSample::to_json`] of [`VmControl::sample`]).
    pub fn stats(&self) -> serde_json::Value {
        self.sample().to_json()
    }

    /// One reading of every statistic of the VM: what [`VmControl::stats`] prints and the
    /// Prometheus exposition ([`crate::metrics`]) encodes. Each part is read under its own lock;
    /// safe to call from any thread while the VM runs, and after it ended.
    pub fn sample(&self) -> StatsSample {
        let progress: Vec<(u64, u64)> = self
            .shared
            .progress
            .iter()
            .map(|(d, t)| (d.load(Ordering::Relaxed), t.load(Ordering::Relaxed)))
            .collect();
        let kvm = self.kvm_stats.as_ref().and_then(|k| {
            Some(KvmSample {
                vm: k.vm.read().ok()?,
                vcpus: k.vcpus.iter().map(|v| v.read()).collect::<Result<_, _>>().ok()?,
            })
        });
        let lock = |d: &BalloonDevice| {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            (d.device().stats(), d.stats())
        };
        let (balloon, balloon_transport) = self.balloon.as_ref().map(lock).unzip();
        let (virtio_mem, virtio_mem_transport) = self
            .virtio_mem
            .as_ref()
            .map(|m| {
                let m = m.lock().unwrap_or_else(|e| e.into_inner());
                (m.device().stats(), m.stats())
            })
            .unzip();
        StatsSample {
            pid: std::process::id(),
            taken_at: std::time::SystemTime::now(),
            uptime: self.started.elapsed(),
            paused: self.paused(),
            vcpu_progress_pages: progress,
            kvm,
            table: self.mmu.stats(),
            notifier: self.space.stats(),
            external_teardowns: self.teardown.report(),
            discards: self.rendezvous.as_ref().map(|r| r.records().len()).unwrap_or(0),
            balloon,
            balloon_transport,
            virtio_mem,
            virtio_mem_transport,
            pvm_quirks: self.shared.pvm_quirks.as_ref().map(|q| q.counts()),
        }
    }
}

/// Errors that keep a VM from starting (bad input or a host problem), each a one-line message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the VMM's descriptor layout holds.
    #[error("{wanted} vCPUs requested; zapvm supports at most {max}")]
    TooManyVcpus {
        /// Asked for.
        wanted: u32,
        /// Most supported.
        max: u32,
    },
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be set up.
    #[error("vCPU {index}: {source}")]
    Cpu {
        /// Which vCPU.
        index: usize,
        /// What failed.
        #[source]
        source: cpu::CpuSetupError,
    },
    /// Device setup.
    #[error("device setup: {0}")]
    Device(String),
    /// The memory layer could not be set up.
    #[error("memory layer: {0}")]
    Notifier(String),
    /// Threads, eventfds, epoll.
    #[error("{what}: {source}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<BusError> for Error {
    fn from(e: BusError) -> Self {
        Error::Device(e.to_string())
    }
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmOutcome {
    /// Every vCPU finished its workload and the host saw what the guest wrote.
    Success,
    /// The guest reset the machine (how a Linux guest ends).
    Reset,
    /// A vCPU failed; the message says which and why.
    Failed {
        /// What went wrong.
        message: String,
    },
    /// The VMM was asked to stop the VM (control API, `VmControl::quit`).
    Quit,
    /// The timeout expired.
    TimedOut {
        /// After how many seconds.
        seconds: f64,
    },
}

/// What the host found when it checked guest RAM after the guest finished.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostCheck {
    /// Pages the host read back.
    pub pages: u64,
    /// Pages whose contents differ from the pattern.
    pub bad_pages: u64,
    /// The first difference.
    pub first_bad: Option<String>,
}

/// What the memory layer did during a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryLayerReport {
    /// Whether the userfaultfd monitor watched guest RAM.
    pub monitor: bool,
    /// Whether guest RAM was sealed with `mseal(2)` (`--seal-guest-ram`).
    pub sealed: bool,
    /// The VMM's table.
    pub table: MmuStats,
    /// The notifier's counters.
    pub notifier: notifier::Stats,
    /// Discards the host performed for the guest, with what KVM's stats did meanwhile.
    pub discards: Vec<DiscardRecord>,
    /// Teardowns of guest RAM by code outside the VMM, and what the policy did.
    pub external_teardowns: TeardownReport,
    /// The balloon's counters, if the VM had one.
    pub balloon: Option<BalloonStats>,
    /// The virtio-mem device's counters, if the VM had one.
    pub virtio_mem: Option<VirtioMemStats>,
    /// The balloon's transport counters (kicks by exit / by ioeventfd, ioeventfd fallback).
    pub balloon_transport: Option<TransportStats>,
    /// The virtio-mem device's transport counters.
    pub virtio_mem_transport: Option<TransportStats>,
}

/// The result of running a VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// How it ended.
    pub outcome: VmOutcome,
    /// What was booted.
    pub boot: String,
    /// Each vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// The host's check of the workload's pages.
    pub host_check: Option<HostCheck>,
    /// Bytes of RAM.
    pub mem_bytes: u64,
    /// Whether RAM is mapped so that THP can back it with whole 2 MiB pages.
    pub thp_aligned: bool,
    /// Microseconds the run took, from the start of the VM build.
    pub wall_us: u64,
    /// The memory layer's view of the run.
    pub memory_layer: MemoryLayerReport,
    /// On PVM hosts: the instructions the VMM completed for the host's emulator.
    pub pvm_quirks: Option<crate::pvm::QuirkCounts>,
}

impl RunReport {
    /// Whether the run succeeded.
    pub fn success(&self) -> bool {
        matches!(self.outcome, VmOutcome::Success | VmOutcome::Reset | VmOutcome::Quit)
    }
}

/// Watches the eventfds that end a run: vCPU threads finishing and the guest's reset.
struct Watcher {
    vcpu_wake: EventFd,
    reset: EventFd,
    reset_seen: bool,
    /// Written by the teardown guard when guest RAM was lost and the VM must stop.
    teardown_stop: EventFd,
    teardown_stop_seen: bool,
    /// Written by the SIGUSR1 handler: `zapvm stats` wants a snapshot.
    stats_wake: EventFd,
    stats_requested: bool,
    /// Written by [`VmControl::quit`].
    quit: EventFd,
    quit_seen: bool,
}

impl MutEventSubscriber for Watcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset.as_raw_fd_i32() {
            let _ = self.reset.read();
            self.reset_seen = true;
        } else if events.fd() == self.teardown_stop.as_raw_fd_i32() {
            let _ = self.teardown_stop.read();
            self.teardown_stop_seen = true;
        } else if events.fd() == self.quit.as_raw_fd_i32() {
            let _ = self.quit.read();
            self.quit_seen = true;
        } else if events.fd() == self.stats_wake.as_raw_fd_i32() {
            let _ = self.stats_wake.read();
            self.stats_requested = true;
        } else {
            let _ = self.vcpu_wake.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.vcpu_wake, &self.reset, &self.teardown_stop, &self.stats_wake, &self.quit] {
            if let Err(e) = ops.add(event_manager::Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch an eventfd: {e:?}");
            }
        }
    }
}

trait RawFdI32 {
    fn as_raw_fd_i32(&self) -> i32;
}
impl RawFdI32 for EventFd {
    fn as_raw_fd_i32(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// Places virtio-mmio devices: the `n`-th at `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE` with GSI
/// `VIRTIO_FIRST_GSI + n`, its interrupt an irqfd, its accesses to guest RAM through the table,
/// and (unless `ioeventfd` is off or the host refuses it) an ioeventfd per queue on its
/// QueueNotify register, whose kicks the event loop handles ([`QueueKicks`]).
struct VirtioSlots<'a> {
    vm: &'a Vm,
    mmio: &'a mut Bus,
    mmu: &'a Arc<GuestMmu>,
    ioeventfd: bool,
    /// What the guest is told of the devices placed so far.
    devices: Vec<guest_abi::VirtioMmioDevice>,
    /// The event-loop subscribers of the devices' ioeventfds.
    kick_handlers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

impl VirtioSlots<'_> {
    fn add<D: VirtioDevice + Send + 'static>(
        &mut self,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, Error> {
        // The id the boot info announces is the one the transport's DeviceID register shows.
        let device_id = u64::from(device.device_type());
        let n = self.devices.len();
        let (base, gsi) = (VIRTIO_MMIO_BASE + VIRTIO_MMIO_STRIDE * n as u64, VIRTIO_FIRST_GSI + n as u32);
        let irq = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        self.vm.fd().register_irqfd(&irq, gsi).map_err(|e| {
            Error::Device(format!("KVM_IRQFD for virtio device {device_id} on GSI {gsi}: {e}"))
        })?;
        let mut transport = MmioTransport::new(
            device,
            self.mmu.clone() as Arc<dyn GuestMemoryAccess>,
            Arc::new(VirtioInterrupt::new(irq)),
        );
        let kicks = if self.ioeventfd { self.register_kicks(base, transport.queue_count())? } else { vec![] };
        let refused = kicks.iter().filter(|k| k.is_none()).count() as u64;
        let handler_fds: Vec<(usize, EventFd)> =
            kicks.iter().enumerate().filter_map(|(i, k)| Some((i, k.as_ref()?.try_clone().ok()?))).collect();
        transport.attach_ioeventfds(kicks, refused);
        let transport = Arc::new(Mutex::new(transport));
        if !handler_fds.is_empty() {
            self.kick_handlers
                .push(Arc::new(Mutex::new(QueueKicks { transport: transport.clone(), fds: handler_fds })));
        }
        self.mmio.insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
        self.devices.push(guest_abi::VirtioMmioDevice {
            base,
            size: MMIO_WINDOW_SIZE,
            device_id,
            irq: u64::from(gsi),
        });
        Ok(transport)
    }

    /// An ioeventfd per queue for a 4-byte write of its index to the QueueNotify register of
    /// the window at `base`; `None` for a queue whose registration the host refused (its kicks
    /// exit to the vCPU thread, the fallback; logged once per device).
    fn register_kicks(&self, base: u64, queues: usize) -> Result<Vec<Option<EventFd>>, Error> {
        let address =
            kvm_ioctls::IoEventAddress::Mmio(base + crate::devices::virtio::mmio::reg::QUEUE_NOTIFY);
        let mut kicks = Vec::with_capacity(queues);
        let mut refusal = None;
        for index in 0..queues {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
            match self.vm.fd().register_ioevent(&fd, &address, index as u32) {
                Ok(()) => kicks.push(Some(fd)),
                Err(e) => {
                    refusal.get_or_insert(e);
                    kicks.push(None);
                }
            }
        }
        if let Some(e) = refusal {
            tracing::warn!(
                "virtio-mmio at {base:#x}: the host refused KVM_IOEVENTFD ({e}); {} of {queues} queues' kicks exit to the vCPU thread",
                kicks.iter().filter(|k| k.is_none()).count()
            );
        }
        Ok(kicks)
    }
}

/// The event loop's side of a virtio device's ioeventfds: a signalled queue is processed under
/// the transport's lock (invariants T1-T3 of `devices::virtio::mmio`), off the vCPU thread.
struct QueueKicks<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    /// (queue index, the queue's ioeventfd).
    fds: Vec<(usize, EventFd)>,
}

impl<D: VirtioDevice> MutEventSubscriber for QueueKicks<D> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(&(index, _)) = self.fds.iter().find(|(_, fd)| fd.as_raw_fd_i32() == events.fd()) else {
            return;
        };
        // T2: the count is consumed under the lock, inside handle_kick.
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).handle_kick(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, fd) in &self.fds {
            if let Err(e) = ops.add(event_manager::Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch the ioeventfd of queue {index}: {e:?}");
            }
        }
    }
}

/// Builds the VM `config` describes and runs it to the end.
pub fn run(config: &VmConfig) -> Result<RunReport, Error> {
    let started = Instant::now();
    let nr_vcpus = config.vcpus;
    if nr_vcpus == 0 {
        return Err(Error::NoVcpus);
    }
    if nr_vcpus > gdt::MAX_VCPUS {
        return Err(Error::TooManyVcpus { wanted: nr_vcpus, max: gdt::MAX_VCPUS });
    }
    let kvm = open_kvm(&config.kvm_device)?;
    if nr_vcpus as usize > kvm.get_max_vcpus() {
        return Err(VmError::TooManyVcpus { wanted: nr_vcpus, max: kvm.get_max_vcpus() }.into());
    }
    let hotplug_size = config.virtio_mem.map_or(0, |m| m.region_size);
    #[cfg(feature = "fault-injection")]
    let skip_mseal = config.plant_skip_mseal;
    #[cfg(not(feature = "fault-injection"))]
    let skip_mseal = false;
    let ram = if config.seal_guest_ram && !skip_mseal {
        GuestRam::sealed_with_hotplug(config.memory, hotplug_size)?
    } else {
        GuestRam::with_hotplug(config.memory, hotplug_size)?
    };
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&ram)?;

    // The memory layer: the notifier over guest RAM, the VMM's table subscribed to it, and the
    // monitor that turns teardowns by code outside the VMM into the same notifications.
    let notifier_err = |e: notifier::Error| Error::Notifier(e.to_string());
    // SAFETY: guest RAM stays mapped at these addresses for as long as `space` is used (the
    // regions are dropped after it), and the VMM touches it only through raw pointers
    // (vm-memory's volatile accesses, KVM, process_vm_readv/writev) — no Rust reference to guest
    // RAM is held across an operation of the address space.
    let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.map_err(notifier_err)?;
    if config.seal_guest_ram {
        // The VMM's own unmap/remap/protect of sealed RAM are refused before any syscall.
        for r in ram.notifier_regions() {
            space.mark_sealed(r.host_addr, r.len).map_err(notifier_err)?;
        }
    }
    let monitor = if config.monitor {
        match notifier::Monitor::start(&space, notifier::MonitorOptions::default()) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("zapvm: warning: no userfaultfd monitor ({e}); teardowns outside the VMM will not be seen");
                None
            }
        }
    } else {
        None
    };
    let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).map_err(notifier_err)?);
    let teardown_stop = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let guarded = ram
        .regions()
        .zip(ram.notifier_regions())
        .map(|((gpa, _, _), spec)| GuardedRegion { gpa: gpa.0, spec })
        .collect();
    let teardown = Arc::new(TeardownGuard::new(
        config.teardown_policy,
        &space,
        guarded,
        teardown_stop.try_clone().map_err(host("eventfd"))?,
    ));
    space.subscribe(teardown.clone()).map_err(notifier_err)?;
    // KVM_CAP_MEMORY_FAULT_INFO needs no enabling: where the host reports it, a KVM_RUN that
    // finds no host memory exits with KVM_EXIT_MEMORY_FAULT naming the guest range.

    // virtio-mmio devices, at fixed windows in the MMIO hole; the guest learns them from its boot
    // info (test guest) or its command line (Linux).
    let mut mmio = Bus::default();
    let mut virtio = VirtioSlots {
        vm: &vm,
        mmio: &mut mmio,
        mmu: &mmu,
        ioeventfd: config.ioeventfd,
        devices: Vec::new(),
        kick_handlers: Vec::new(),
    };
    let balloon: Option<BalloonDevice> = match config.balloon {
        None => None,
        Some(features) => Some(virtio.add(Balloon::new(mmu.clone(), &ram, features))?),
    };
    let virtio_mem: Option<VirtioMemDevice> = match (config.virtio_mem, ram.hotplug()) {
        (Some(spec), Some((gpa, size))) => {
            let config =
                VirtioMemConfig { requested_size: spec.requested_size, ..VirtioMemConfig::new(gpa, size) };
            let device =
                VirtioMem::new(mmu.clone(), config).map_err(|e| Error::Device(format!("virtio-mem: {e}")))?;
            Some(virtio.add(device)?)
        }
        _ => None,
    };
    let kick_handlers = std::mem::take(&mut virtio.kick_handlers);
    let virtio = virtio.devices;

    // The devices' state changes, as QMP events for the control socket's clients.
    let events = Arc::new(EventQueue::new().map_err(host("eventfd"))?);
    if let Some(b) = &balloon {
        let (events, ram_bytes) = (events.clone(), ram.size());
        b.lock().unwrap_or_else(|e| e.into_inner()).device_mut().on_actual_change(Box::new(move |pages| {
            // QMP's BALLOON_CHANGE says what the guest keeps, not what the balloon holds.
            let actual = ram_bytes.saturating_sub(u64::from(pages) * crate::memory::PAGE_SIZE);
            events.emit_state(
                event_name::BALLOON_CHANGE,
                "balloon0",
                serde_json::json!({ "actual": actual }),
            );
        }));
    }
    {
        let events = events.clone();
        teardown.on_external_teardown(Box::new(move |t| {
            events.emit(event_name::EXTERNAL_TEARDOWN, serde_json::to_value(t).ok());
        }));
    }
    if let Some(m) = &virtio_mem {
        let events = events.clone();
        m.lock().unwrap_or_else(|e| e.into_inner()).device_mut().on_plugged_change(Box::new(move |size| {
            events.emit_state(
                event_name::MEMORY_DEVICE_SIZE_CHANGE,
                crate::api::commands::VIRTIO_MEM_ID,
                serde_json::json!({
                    "id": crate::api::commands::VIRTIO_MEM_ID,
                    "size": size,
                    "qom-path": crate::api::commands::VIRTIO_MEM_QOM_PATH,
                }),
            );
        }));
    }

    // Boot: fill RAM, decide entries.
    let (plan, boot_info) = match &config.boot {
        BootSource::TestGuest { elf, params } => {
            let (bytes, name) = match elf {
                Some(path) => (
                    std::fs::read(path).map_err(|source| BootError::Read {
                        what: "test guest ELF",
                        path: path.display().to_string(),
                        source,
                    })?,
                    path.display().to_string(),
                ),
                None => (test_guest::BUILT_IN_ELF.to_vec(), "built-in".to_string()),
            };
            let loaded = test_guest::load(&ram, &bytes, &name, nr_vcpus as usize, *params, &virtio)?;
            (loaded.plan, Some(loaded.boot_info))
        }
        BootSource::Linux { kernel, initrd, cmdline } => {
            // virtio_mmio.device=<size>@<base>:<irq> per device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
            let mut line = cmdline.clone();
            for d in &virtio {
                line.push_str(&format!(" virtio_mmio.device={:#x}@{:#x}:{}", d.size, d.base, d.irq));
            }
            (boot::linux::load(&ram, kernel, initrd.as_deref(), &line, nr_vcpus as usize)?, None)
        }
    };
    tracing::info!("{}", plan.summary);

    // Devices.
    let reset = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| Error::Device(format!("KVM_IRQFD for the serial port: {e}")))?;
    let mut pio = Bus::default();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        config.console.writer().map_err(host("opening the serial console"))?,
    )));
    pio.insert(COM1_PORT, 8, serial.clone())?;
    pio.insert(
        I8042_PORT,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(reset.try_clone().map_err(host("eventfd"))?))),
    )?;

    // vCPUs.
    let mut supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|source| {
        Error::Cpu { index: 0, source: cpu::CpuSetupError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source } }
    })?;
    // The host kind's CPUID fixups (a feature bit the per-vCPU APIC ids leave alone) are made
    // here, once, so that `arch` knows nothing of host kinds.
    crate::pvm::adjust_cpuid(&mut supported);
    let mut vcpus = Vec::with_capacity(nr_vcpus as usize);
    for (index, entry) in plan.entries.iter().enumerate() {
        let fd = vm.fd().create_vcpu(index as u64).map_err(|source| Error::Cpu {
            index,
            source: cpu::CpuSetupError::Kvm { what: "KVM_CREATE_VCPU", source },
        })?;
        let setup = || -> Result<(), cpu::CpuSetupError> {
            cpu::set_cpuid(&fd, &supported, index as u32)?;
            cpu::set_boot_msrs(&fd)?;
            cpu::set_fpu(&fd)?;
            cpu::set_lint(&fd)?;
            if let Some(entry) = entry {
                cpu::set_entry_state(&fd, index, entry)?;
            }
            Ok(())
        };
        setup().map_err(|source| Error::Cpu { index, source })?;
        vcpus.push(Vcpu::new(fd, index));
    }
    let kvm_stats = match KvmStatsReader::new(vm.fd(), vcpus.iter().map(Vcpu::fd)) {
        Ok(reader) => Some(Arc::new(reader)),
        Err(e) => {
            tracing::warn!("no KVM statistics: {e}");
            None
        }
    };
    let rendezvous = match boot_info {
        Some(info) if Workload::from_raw(info.workload) == Some(Workload::DiscardVerify) => {
            Some(Arc::new(DiscardRendezvous::new(
                mmu.clone(),
                info,
                config.memory.backend == crate::memory::MemoryBackend::Hugetlb,
                kvm_stats.clone(),
            )))
        }
        _ => None,
    };

    let (events_tx, events_rx) = channel();
    let shared = Arc::new(VcpuShared {
        mmu: mmu.clone(),
        teardown: teardown.clone(),
        rendezvous: rendezvous.clone().map(|r| r as Arc<dyn crate::vstate::vcpu::RendezvousHandler>),
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        stop: Default::default(),
        pause: Default::default(),
        alive: std::sync::atomic::AtomicUsize::new(nr_vcpus as usize),
        running: Default::default(),
        events: events_tx,
        wake: EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?,
        nr_vcpus: u64::from(nr_vcpus),
        progress: (0..nr_vcpus).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
        started,
        pvm_quirks: crate::pvm::EmulationQuirks::for_host(),
    });

    let quit = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| Error::Device(format!("epoll: {e:?}")))?;
    let watcher = Arc::new(Mutex::new(Watcher {
        vcpu_wake: shared.wake.try_clone().map_err(host("eventfd"))?,
        reset,
        reset_seen: false,
        teardown_stop,
        teardown_stop_seen: false,
        stats_wake: EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?,
        stats_requested: false,
        quit: quit.try_clone().map_err(host("eventfd"))?,
        quit_seen: false,
    }));
    crate::stats::set_wake_fd(watcher.lock().unwrap_or_else(|e| e.into_inner()).stats_wake.as_raw_fd_i32());
    manager.add_subscriber(watcher.clone());
    for handler in kick_handlers {
        manager.add_subscriber(handler);
    }

    let control = Arc::new(VmControl {
        regions: ram.regions().map(|(gpa, hva, len)| (gpa.0, hva as usize, len as usize)).collect(),
        mmu: mmu.clone(),
        balloon: balloon.clone(),
        virtio_mem: virtio_mem.clone(),
        ram_bytes: ram.size(),
        shared: shared.clone(),
        space: space.clone(),
        kvm_stats: kvm_stats.clone(),
        teardown: teardown.clone(),
        rendezvous: rendezvous.clone(),
        quit,
        events: events.clone(),
        shutdown_emitted: AtomicBool::new(false),
        threads: Mutex::new(None),
        started,
    });
    // Stopped by `finish` below, or by its drop if setup fails before the vCPUs run.
    let metrics = match &config.metrics {
        Some(exporter) => {
            let vm = control.clone();
            Some(exporter.start(Arc::new(move || vm.sample())).map_err(|e| Error::Device(e.to_string()))?)
        }
        None => None,
    };
    if let Some(path) = &config.api_socket {
        let server = crate::api::ApiServer::bind(path, control.clone(), events.clone())
            .map_err(|e| Error::Device(format!("control API socket {}: {e}", path.display())))?;
        manager.add_subscriber(Arc::new(Mutex::new(server)));
    }
    install_kick_handler()
        .map_err(|e| Error::Host { what: "installing the vCPU kick signal", source: e.into() })?;
    // The user's keyboard on the console, until this function returns (dropping it restores the
    // terminal).
    let _console_input = match config.console {
        Console::Terminal => crate::console_input::ConsoleInput::start(
            serial.clone(),
            control.quit.try_clone().map_err(host("eventfd"))?,
        ),
        _ => None,
    };
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let shared = shared.clone();
        let index = threads.len();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu.run(&shared))
            .map_err(host("spawning a vCPU thread"))?;
        threads.push(handle);
    }

    *control.threads.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(threads.iter().map(|t| t.as_pthread_t()).collect());
    if let Some(hook) = &config.after_start {
        hook(&control);
    }
    let snapshot = || control.stats().to_string();
    // The balloon's statistics polling: hand the guest's stats buffer back every interval.
    let last_stats_request = std::cell::Cell::new(Instant::now());
    let tick = || {
        let (Some(b), Some(interval)) = (&balloon, config.balloon_stats_interval) else { return };
        if last_stats_request.get().elapsed() >= interval {
            last_stats_request.set(Instant::now());
            if let Err(e) = b.lock().unwrap_or_else(|e| e.into_inner()).device_mut().request_guest_stats() {
                tracing::warn!("balloon statistics request: {e:?}");
            }
        }
    };
    let outcome =
        event_loop(config, &mut manager, &watcher, &events_rx, threads.len(), started, &snapshot, &tick);
    crate::stats::set_wake_fd(-1);
    crate::stats::remove_snapshots();

    // Stop every vCPU still running: flag first, then kick (see the protocol in vstate::vcpu).
    // The control handle may no longer signal the threads once they can be joined.
    *control.threads.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.stop.store(true, Ordering::SeqCst);
    shared.pause.wake_all();
    let finished: Vec<bool> = {
        let mut f = vec![false; threads.len()];
        while let Ok(VcpuEvent::Finished { index, .. }) = events_rx.try_recv() {
            f[index] = true;
        }
        f
    };
    for (handle, done) in threads.iter().zip(&finished) {
        if !done {
            let _ = handle.kill(kick_signal());
        }
    }
    let reports: Vec<VcpuReport> = threads
        .into_iter()
        .enumerate()
        .map(|(index, t)| {
            t.join().unwrap_or_else(|_| VcpuReport {
                index,
                outcome: VcpuOutcome::Error { message: "vCPU thread panicked".into() },
                timings: vec![],
                first_exit_us: None,
                exits: 0,
                tsc_khz: None,
            })
        })
        .collect();
    // The exporter's last file write sees the vCPUs' final counts; its server stops with the VM.
    if let Some(metrics) = metrics {
        metrics.finish();
    }

    let mut outcome = match (teardown.fatal(), outcome) {
        (Some(message), _) => VmOutcome::Failed { message },
        (None, Some(outcome)) => outcome,
        (None, None) => first_failure(&reports).unwrap_or(VmOutcome::Success),
    };
    // QMP's SHUTDOWN for every way the VM ends (`quit` emitted its own); the control socket's
    // server, dropped with the event manager when this function returns, writes it out.
    match &outcome {
        VmOutcome::Success => control.emit_shutdown(true, "guest-shutdown"),
        VmOutcome::Reset => control.emit_shutdown(true, "guest-reset"),
        VmOutcome::Quit => control.emit_shutdown(false, "host-qmp-quit"),
        VmOutcome::TimedOut { .. } => control.emit_shutdown(false, "host-error"),
        VmOutcome::Failed { .. } => control.emit_shutdown(true, "guest-panic"),
    }
    let mut host_check = None;
    if let (Some(info), VmOutcome::Success) = (&boot_info, &outcome) {
        let discarded = |vcpu: usize| rendezvous.as_ref().map(|r| r.discarded(vcpu)).unwrap_or_default();
        let (check, failure) = check_workload(mmu.as_ref(), info, &reports, &discarded);
        host_check = check;
        if let Some(message) = failure {
            outcome = VmOutcome::Failed { message };
        }
    }
    // The monitor must stop (closing the userfaultfd) before guest RAM is unmapped: a munmap of
    // registered memory waits for the monitor to read its event.
    let monitor_ran = monitor.is_some();
    if let Some(m) = monitor {
        if let Err(e) = m.stop() {
            tracing::warn!("stopping the userfaultfd monitor: {e}");
        }
    }
    let memory_layer = MemoryLayerReport {
        monitor: monitor_ran,
        sealed: config.seal_guest_ram,
        table: mmu.stats(),
        notifier: space.stats(),
        discards: rendezvous.as_ref().map(|r| r.records()).unwrap_or_default(),
        external_teardowns: teardown.report(),
        balloon: balloon.as_ref().map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).device().stats()),
        virtio_mem: virtio_mem.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).device().stats()),
        balloon_transport: balloon.as_ref().map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).stats()),
        virtio_mem_transport: virtio_mem
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).stats()),
    };
    Ok(RunReport {
        memory_layer,
        pvm_quirks: shared.pvm_quirks.as_ref().map(|q| q.counts()),
        outcome,
        boot: plan.summary,
        vcpus: reports,
        host_check,
        mem_bytes: ram.size(),
        thp_aligned: ram.huge_page_aligned(),
        wall_us: started.elapsed().as_micros() as u64,
    })
}

/// Runs the event loop until the VM should end; `None` means "every vCPU finished".
// The loop's inputs are the built VM's parts; a struct for them is the builder/running-VM split
// of issue #12 item 2.
#[allow(clippy::too_many_arguments)]
fn event_loop(
    config: &VmConfig,
    manager: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    watcher: &Arc<Mutex<Watcher>>,
    events: &Receiver<VcpuEvent>,
    nr_threads: usize,
    started: Instant,
    snapshot: &dyn Fn() -> String,
    tick: &dyn Fn(),
) -> Option<VmOutcome> {
    let deadline = config.timeout.map(|t| started + t);
    let mut finished = vec![false; nr_threads];
    loop {
        let wait_ms = deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32)
            .unwrap_or(1000);
        if let Err(e) = manager.run_with_timeout(wait_ms.max(1)) {
            tracing::error!("event loop: {e:?}");
        }
        while let Ok(VcpuEvent::Finished { index, fatal }) = events.try_recv() {
            finished[index] = true;
            if fatal {
                return None; // the failing vCPU's report says why
            }
        }
        tick();
        {
            let mut w = watcher.lock().unwrap_or_else(|e| e.into_inner());
            if std::mem::take(&mut w.stats_requested) {
                if let Err(e) = crate::stats::write_snapshot(&snapshot()) {
                    tracing::warn!("cannot write the statistics snapshot: {e}");
                }
            }
            if w.reset_seen {
                return Some(VmOutcome::Reset);
            }
            if w.quit_seen {
                return Some(VmOutcome::Quit);
            }
            if w.teardown_stop_seen {
                return None; // the teardown guard's report says why
            }
        }
        if finished.iter().all(|&f| f) {
            return None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(VmOutcome::TimedOut { seconds: config.timeout.unwrap_or_default().as_secs_f64() });
        }
    }
}

fn first_failure(reports: &[VcpuReport]) -> Option<VmOutcome> {
    reports.iter().find_map(|r| {
        let what = match &r.outcome {
            VcpuOutcome::GuestFailure { message } => format!("guest failure: {message}"),
            VcpuOutcome::GuestException { message } => format!("guest exception: {message}"),
            VcpuOutcome::Error { message } => message.clone(),
            VcpuOutcome::Stopped | VcpuOutcome::Done { .. } => return None,
        };
        Some(VmOutcome::Failed { message: format!("vCPU {}: {what}", r.index) })
    })
}

/// Checks from the host's side what the guest says it wrote: every page of each vCPU's slice
/// holds the pattern (Verify), and the guest's checksum is the one the pattern gives.
fn check_workload(
    mem: &dyn GuestMemoryAccess,
    info: &BootInfo,
    reports: &[VcpuReport],
    discarded: &dyn Fn(usize) -> Vec<guest_abi::GpaRange>,
) -> (Option<HostCheck>, Option<String>) {
    if !matches!(Workload::from_raw(info.workload), Some(Workload::Verify | Workload::DiscardVerify)) {
        return (None, None);
    }
    let work = &info.work[..info.nr_work as usize];
    let mut check = HostCheck::default();
    let mut failure = None;
    let mut page = vec![0u8; guest_abi::PAGE_SIZE as usize];
    for report in reports {
        let VcpuOutcome::Done { pages, checksum } = report.outcome else {
            continue;
        };
        let (mut expected_pages, mut expected_sum) = (0u64, 0u64);
        let holes = discarded(report.index);
        slice_pages(work, info.nr_vcpus, report.index as u64, |gpa| {
            expected_pages += 1;
            let zeroed = holes.iter().any(|h| (h.start..h.end).contains(&gpa));
            if !zeroed {
                expected_sum = expected_sum.wrapping_add(page_checksum(info.seed, gpa));
            }
            check.pages += 1;
            let ok = mem.read(gpa, &mut page).is_ok()
                && page.chunks_exact(8).enumerate().all(|(i, w)| {
                    let want = if zeroed { 0 } else { pattern(info.seed, gpa + 8 * i as u64) };
                    u64::from_le_bytes(w.try_into().unwrap()) == want
                });
            if !ok {
                check.bad_pages += 1;
                check.first_bad.get_or_insert_with(|| {
                    format!("page {gpa:#x} does not hold {}", if zeroed { "zeros" } else { "the pattern" })
                });
            }
        });
        if pages != expected_pages || checksum != expected_sum {
            failure.get_or_insert(format!(
                "vCPU {}: guest reported {pages} pages / checksum {checksum:#x}, the host expects {expected_pages} / {expected_sum:#x}",
                report.index
            ));
        }
    }
    if let Some(bad) = &check.first_bad {
        failure.get_or_insert(format!("host check: {} bad pages; {bad}", check.bad_pages));
    }
    (Some(check), failure)
}
