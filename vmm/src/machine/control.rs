//! A running VM as its controllers see it: [`VmControl`], the handle the control socket (QMP,
//! through [`crate::api::VmHandle`]), the metrics and the tests hold while the VM runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::api::events::name as event_name;
use crate::api::{EventQueue, QmpError};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mem::VirtioMem;
use crate::devices::virtio::mmio::MmioTransport;
use crate::kvm_stats::KvmStatsReader;
use crate::metrics::{KvmSample, StatsSample};
use crate::mmu::GuestMmu;
use crate::rendezvous::DiscardRendezvous;
use crate::teardown::TeardownGuard;
use crate::vstate::vcpu::{kick_signal, VcpuShared};

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
    pub(super) regions: Vec<(u64, usize, usize)>,
    pub(super) mmu: Arc<GuestMmu>,
    pub(super) balloon: Option<BalloonDevice>,
    pub(super) virtio_mem: Option<VirtioMemDevice>,
    /// Bytes of RAM the guest was booted with (without a hot-pluggable region).
    pub(super) ram_bytes: u64,
    pub(super) shared: Arc<VcpuShared>,
    pub(super) space: Arc<notifier::AddressSpace>,
    pub(super) kvm_stats: Option<Arc<KvmStatsReader>>,
    pub(super) teardown: Arc<TeardownGuard>,
    pub(super) rendezvous: Option<Arc<DiscardRendezvous>>,
    /// The test guest's calls (its vCPUs' progress), if the guest is the test guest.
    pub(super) guest_calls: Option<Arc<crate::ucall::TestGuestCalls>>,
    pub(super) quit: EventFd,
    /// The VM's QMP events on their way to the control socket.
    pub(super) events: Arc<EventQueue>,
    /// Whether `SHUTDOWN` was emitted (once per VM).
    pub(super) shutdown_emitted: AtomicBool,
    /// The vCPU threads, while they may be signalled (`None` once the VMM joins them).
    pub(super) threads: Mutex<Option<Vec<libc::pthread_t>>>,
    pub(super) started: Instant,
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

    /// What the teardown guard has seen so far: external teardowns, write protections and the
    /// vCPU faults on write-protected guest RAM.
    pub fn external_teardowns(&self) -> crate::teardown::TeardownReport {
        self.teardown.report()
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
    pub(super) fn emit_shutdown(&self, guest: bool, reason: &str) {
        if !self.shutdown_emitted.swap(true, Ordering::SeqCst) {
            self.events.emit(event_name::SHUTDOWN, Some(crate::api::events::shutdown_data(guest, reason)));
        }
    }

    pub(super) fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &t in threads.iter().flatten() {
            // SAFETY: the threads are joinable and not joined while `threads` is `Some`: the VMM
            // takes it, under this lock, before joining, on every way `run` ends (its
            // `VcpuThreads` guard: a return, an error or a panic unwinding through it), so each
            // pthread_t is valid.
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
    pub(super) fn balloon_json(&self, b: &BalloonDevice) -> serde_json::Value {
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
        let progress = self.guest_calls.as_ref().map(|c| c.progress()).unwrap_or_default();
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
