//! From a config to a built VM ([`build`]): everything is made and checked, nothing runs yet.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use guest_abi::{BootInfo, Workload};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::events::name as event_name;
use crate::api::EventQueue;
use crate::arch::{cpu, gdt};
use crate::boot::{self, test_guest, BootError};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::Bus;
use crate::kvm_stats::KvmStatsReader;
use crate::memory::GuestRam;
use crate::mmu::{GuestMemoryAccess, GuestMmu};
use crate::rendezvous::DiscardRendezvous;
use crate::teardown::{GuardedRegion, TeardownGuard};
use crate::vstate::vcpu::{Vcpu, VcpuEvent, VcpuShared};
use crate::vstate::vm::{open_kvm, Vm, VmError};

use super::*;
use crate::devices::serial::SerialDevice as Serial;

/// A VM built from a [`VmConfig`] and not yet run: [`BuiltVm::run`] runs it to its end.
///
/// Its fields drop in declaration order, which is the order teardown needs: the event loop's
/// subscribers and the handles first, then the memory layer, the KVM VM, and guest RAM last
/// (the notifier's address space, the table and KVM's memory slots refer to it until then).
pub struct BuiltVm {
    pub(super) config: VmConfig,
    pub(super) started: Instant,
    pub(super) control: Arc<VmControl>,
    pub(super) manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub(super) watcher: Arc<Mutex<Watcher>>,
    pub(super) events_rx: Receiver<VcpuEvent>,
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) shared: Arc<VcpuShared>,
    pub(super) serial: Arc<Mutex<Serial>>,
    pub(super) events: Arc<EventQueue>,
    pub(super) balloon: Option<BalloonDevice>,
    pub(super) virtio_mem: Option<VirtioMemDevice>,
    pub(super) teardown: Arc<TeardownGuard>,
    pub(super) rendezvous: Option<Arc<DiscardRendezvous>>,
    pub(super) mmu: Arc<GuestMmu>,
    pub(super) monitor: Option<notifier::Monitor>,
    pub(super) space: Arc<notifier::AddressSpace>,
    pub(super) boot_info: Option<BootInfo>,
    pub(super) plan_summary: String,
    /// The KVM VM and the KVM handle: held (not read) so that the VM's fds live until the
    /// vCPUs are joined and guest RAM goes.
    pub(super) _vm: Vm,
    pub(super) _kvm: kvm_ioctls::Kvm,
    /// Last: see the type's docs.
    pub(super) ram: GuestRam,
}

/// The end of a VM, whether it ran or not (and however `run` ended): the
/// [`VmConfig::before_teardown`] hook, then the notifier's address space is released (its
/// regions emptied, every subscriber told: the table drops all its entries), and only then do
/// the fields drop, guest RAM last. Handles that outlive the VM (a clone of
/// [`VmControl::guest_mmu`], of the address space, of the control handle) keep working as
/// objects but no longer reach guest RAM: accesses through the table fail with
/// `AccessError::Unmapped` and notifier operations with `Released`, instead of touching memory
/// that the unmap let someone else reuse.
impl Drop for BuiltVm {
    fn drop(&mut self) {
        if let Some(hook) = self.config.before_teardown.take() {
            hook(&self.control);
        }
        if let Err(e) = self.space.release() {
            // Only refused from inside a teardown callback, which this is not.
            tracing::error!("releasing the notifier's address space: {e}");
        }
    }
}

impl BuiltVm {
    /// The handle controllers use while the VM runs (available before it runs, e.g. to give to
    /// a thread that waits for the vCPUs to start).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// What the boot path placed where (the summary `zapvm run` prints).
    pub fn boot_summary(&self) -> &str {
        &self.plan_summary
    }
}

/// Places virtio-mmio devices: the `n`-th at `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE` with GSI
/// `VIRTIO_FIRST_GSI + n`, its interrupt an irqfd, its accesses to guest RAM through the table,
/// and (unless `ioeventfd` is off or the host refuses it) an ioeventfd per queue on its
/// QueueNotify register, whose kicks the event loop handles ([`QueueKicks`]).
pub(super) struct VirtioSlots<'a> {
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
        self.vm.fd().register_irqfd(&irq, gsi).map_err(|source| Error::Irqfd {
            what: format!("virtio device {device_id}"),
            gsi,
            source,
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
pub(super) struct QueueKicks<D: VirtioDevice> {
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

/// Builds the VM `config` describes, without running it: guest RAM, the memory layer (notifier,
/// table, monitor, teardown guard), the devices, the boot image and entry state, the vCPUs
/// (created, not started), the event loop's subscribers and the [`VmControl`] handle. Every
/// check of the config and every host resource the VM needs is here, so a config that builds
/// only fails to run for reasons of the run itself. The control socket and the metrics start
/// with [`BuiltVm::run`].
pub fn build(config: &VmConfig) -> Result<BuiltVm, Error> {
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
    if config.prealloc {
        // Before the memory layer watches guest RAM: populating is no teardown, and no vCPU runs.
        ram.prealloc()?;
    }
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&ram)?;

    // The memory layer: the notifier over guest RAM, the VMM's table subscribed to it, and the
    // monitor that turns teardowns by code outside the VMM into the same notifications.
    // SAFETY: guest RAM stays mapped at these addresses for as long as the VM's own use of
    // `space` lasts (`BuiltVm` drops `ram` after every other part of the VM: see its docs), and
    // the VMM touches it only through raw pointers (vm-memory's volatile accesses, KVM, the
    // fault-tolerant copy routine) — no Rust reference to guest RAM is held across an operation
    // of the address space.
    let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }?;
    if config.seal_guest_ram {
        // The VMM's own unmap/remap/protect of sealed RAM are refused before any syscall.
        for r in ram.notifier_regions() {
            space.mark_sealed(r.host_addr, r.len)?;
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
    let mmu = Arc::new(GuestMmu::new(&ram, space.clone())?);
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
    space.subscribe(teardown.clone())?;
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
            let device = VirtioMem::new(mmu.clone(), config)?;
            Some(virtio.add(device)?)
        }
        _ => None,
    };
    // The guest treats plugged virtio-mem memory as its RAM, balloon included (the balloon's
    // module documentation); both devices exist before any driver runs.
    if let (Some(b), Some(m)) = (&balloon, &virtio_mem) {
        let plugged = m.lock().unwrap_or_else(|e| e.into_inner()).device().plugged_blocks();
        b.lock().unwrap_or_else(|e| e.into_inner()).device_mut().share_plugged_blocks(plugged);
    }
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
    vm.fd().register_irqfd(&serial_irq, COM1_IRQ).map_err(|source| Error::Irqfd {
        what: "the serial port".into(),
        gsi: COM1_IRQ,
        source,
    })?;
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

    // The test guest's calls on the ucall port (a Linux guest makes none).
    let guest_calls = boot_info.is_some().then(|| {
        Arc::new(crate::ucall::TestGuestCalls::new(
            mmu.clone(),
            rendezvous.clone().map(|r| r as Arc<dyn crate::ucall::RendezvousHandler>),
            nr_vcpus as usize,
            started,
        ))
    });
    let (events_tx, events_rx) = channel();
    let shared = Arc::new(VcpuShared {
        mmu: mmu.clone(),
        teardown: teardown.clone(),
        guest_calls: guest_calls.clone().map(|c| c as Arc<dyn crate::vstate::vcpu::GuestCalls>),
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        stop: Default::default(),
        pause: Default::default(),
        alive: std::sync::atomic::AtomicUsize::new(nr_vcpus as usize),
        running: Default::default(),
        events: events_tx,
        wake: EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?,
        nr_vcpus: u64::from(nr_vcpus),
        pvm_quirks: crate::pvm::EmulationQuirks::for_host(),
    });

    let quit = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(Error::EventLoop)?;
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
        guest_calls,
        quit,
        events: events.clone(),
        shutdown_emitted: AtomicBool::new(false),
        threads: Mutex::new(None),
        started,
    });
    Ok(BuiltVm {
        config: config.clone(),
        started,
        control,
        manager,
        watcher,
        events_rx,
        vcpus,
        shared,
        serial,
        events,
        balloon,
        virtio_mem,
        teardown,
        rendezvous,
        mmu,
        monitor,
        space,
        boot_info,
        plan_summary: plan.summary,
        _vm: vm,
        _kvm: kvm,
        ram,
    })
}
