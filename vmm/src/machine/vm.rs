//! The running VM: [`BuiltVm::run`] starts the control socket, the metrics and the vCPU
//! threads, runs the event loop until the VM ends, stops and joins the vCPUs, checks the test
//! guest's pages from the host's side and returns the [`RunReport`].

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::os::unix::thread::JoinHandleExt;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::vstate::vcpu::{
    install_kick_handler, kick_signal, VcpuEvent, VcpuOutcome, VcpuReport, VcpuShared,
};

use super::*;

impl BuiltVm {
    /// Runs the VM to its end (see the module docs).
    pub fn run(mut self) -> Result<RunReport, Error> {
        let vcpus = std::mem::take(&mut self.vcpus);
        let monitor = self.monitor.take();
        let plan_summary = std::mem::take(&mut self.plan_summary);
        let started = self.started;
        let BuiltVm {
            ref config,
            ref control,
            ref mut manager,
            ref watcher,
            ref events_rx,
            ref shared,
            ref serial,
            ref events,
            ref balloon,
            ref virtio_mem,
            ref teardown,
            ref rendezvous,
            ref mmu,
            ref space,
            ref boot_info,
            ref ram,
            ..
        } = self;
        crate::stats::set_wake_fd(
            watcher.lock().unwrap_or_else(|e| e.into_inner()).stats_wake.as_raw_fd_i32(),
        );
        // Stopped by `finish` below, or by its drop if setup fails before the vCPUs run.
        let metrics = match &config.metrics {
            Some(exporter) => {
                let vm = control.clone();
                Some(exporter.start(Arc::new(move || vm.sample()))?)
            }
            None => None,
        };
        if let Some(path) = &config.api_socket {
            let server = crate::api::ApiServer::bind(path, control.clone(), events.clone())
                .map_err(|source| Error::ApiSocket { path: path.clone(), source })?;
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
        // From here on, however this function ends (its return, a `?`, a panic unwinding through
        // it), the vCPUs are stopped and joined before anything they use is dropped: `threads`
        // is a local, dropped before `self` (guest RAM, KVM's memory slots) goes.
        let mut threads =
            VcpuThreads { handles: Vec::with_capacity(vcpus.len()), control, shared, events_rx };
        for vcpu in vcpus {
            let shared = shared.clone();
            let index = threads.handles.len();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu.run(&shared))
                .map_err(host("spawning a vCPU thread"))?;
            threads.handles.push(handle);
        }

        *control.threads.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(threads.handles.iter().map(|t| t.as_pthread_t()).collect());
        if let Some(hook) = &config.after_start {
            hook(control);
        }
        let snapshot = || control.stats().to_string();
        // The balloon's statistics polling: hand the guest's stats buffer back every interval.
        let last_stats_request = std::cell::Cell::new(Instant::now());
        let tick = || {
            let (Some(b), Some(interval)) = (&balloon, config.balloon_stats_interval) else { return };
            if last_stats_request.get().elapsed() >= interval {
                last_stats_request.set(Instant::now());
                if let Err(e) = b.lock().unwrap_or_else(|e| e.into_inner()).device_mut().request_guest_stats()
                {
                    tracing::warn!("balloon statistics request: {e:?}");
                }
            }
        };
        let outcome =
            event_loop(config, manager, watcher, events_rx, threads.handles.len(), started, &snapshot, &tick);
        crate::stats::set_wake_fd(-1);
        crate::stats::remove_snapshots();

        let reports = threads.stop_and_join();
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
            virtio_mem: virtio_mem
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).device().stats()),
            balloon_transport: balloon.as_ref().map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).stats()),
            virtio_mem_transport: virtio_mem
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).stats()),
        };
        Ok(RunReport {
            memory_layer,
            pvm_quirks: shared.pvm_quirks.as_ref().map(|q| q.counts()),
            outcome,
            boot: plan_summary,
            vcpus: reports,
            host_check,
            mem_bytes: ram.size(),
            thp_aligned: ram.huge_page_aligned(),
            wall_us: started.elapsed().as_micros() as u64,
        })
    }
}

/// The vCPU threads of a running VM, stopped and joined by [`VcpuThreads::stop_and_join`] or, when
/// `run` ends another way (an error after some threads started, a panic unwinding through it),
/// by its drop: no vCPU thread outlives the `run` that started it, so none runs over guest RAM,
/// KVM's memory slots or devices that are being dropped, and the control handle never signals a
/// thread that may have been joined (its `threads` is `None` before the first join).
struct VcpuThreads<'a> {
    handles: Vec<std::thread::JoinHandle<VcpuReport>>,
    control: &'a VmControl,
    shared: &'a VcpuShared,
    events_rx: &'a Receiver<VcpuEvent>,
}

impl VcpuThreads<'_> {
    /// Tells every vCPU still running to stop: flag first, then kick (see the protocol in
    /// vstate::vcpu). The control handle may no longer signal the threads once they can be joined.
    fn stop(&self) {
        *self.control.threads.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.pause.wake_all();
        let mut finished = vec![false; self.handles.len()];
        while let Ok(VcpuEvent::Finished { index, .. }) = self.events_rx.try_recv() {
            if let Some(f) = finished.get_mut(index) {
                *f = true;
            }
        }
        for (handle, done) in self.handles.iter().zip(&finished) {
            if !done {
                // The thread is not joined yet (its handle is still here), so its pthread_t is
                // valid: signalling a thread that has returned but is not joined is defined (the
                // signal is dropped or the call fails with ESRCH).
                let _ = handle.kill(kick_signal());
            }
        }
    }

    /// Stops the vCPUs and joins them; a thread that panicked reports as an error.
    fn stop_and_join(mut self) -> Vec<VcpuReport> {
        self.stop();
        std::mem::take(&mut self.handles)
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
            .collect()
    }
}

impl Drop for VcpuThreads<'_> {
    fn drop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        self.stop();
        for t in self.handles.drain(..) {
            let _ = t.join();
        }
    }
}

/// Watches the eventfds that end a run: vCPU threads finishing and the guest's reset.
pub(super) struct Watcher {
    pub(super) vcpu_wake: EventFd,
    pub(super) reset: EventFd,
    pub(super) reset_seen: bool,
    /// Written by the teardown guard when guest RAM was lost and the VM must stop.
    pub(super) teardown_stop: EventFd,
    pub(super) teardown_stop_seen: bool,
    /// Written by the SIGUSR1 handler: `zapvm stats` wants a snapshot.
    pub(super) stats_wake: EventFd,
    pub(super) stats_requested: bool,
    /// Written by [`VmControl::quit`].
    pub(super) quit: EventFd,
    pub(super) quit_seen: bool,
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

pub(super) trait RawFdI32 {
    fn as_raw_fd_i32(&self) -> i32;
}
impl RawFdI32 for EventFd {
    fn as_raw_fd_i32(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// Runs the event loop until the VM should end; `None` means "every vCPU finished".
// The loop's inputs are parts of the built VM borrowed apart (the loop needs the manager
// mutably while the closures borrow the rest).
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
