//! A vCPU thread: `KVM_RUN`, and what each exit means.
//!
//! Each vCPU runs on its own thread until the guest's own protocol ends it (its calls on the
//! ucall port go to the VM's [`GuestCalls`]: the test guest's `Done`, `Failure` or
//! `Exception`), a fatal exit happens, or the VMM stops it. The loop knows no guest: what a
//! call means lives with the guest's protocol ([`crate::ucall`]). Stopping uses the
//! `immediate_exit` protocol of `kvm_run`: the VMM sets the shared stop flag and signals the
//! thread; the signal handler sets `kvm_run.immediate_exit`, so a `KVM_RUN` that was about to
//! start returns `EINTR` at once and one that was running is interrupted. The thread then sees
//! the flag. No wake-up is lost whichever order the flag, the signal and `KVM_RUN` come in.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::time::Instant;

use guest_abi::{Pass, UCALL_PORT};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::Bus;
use crate::mmu::GuestMmu;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while its vCPU runs (null otherwise).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread local and one byte store.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread to its own vCPU's mapped `kvm_run` and
        // cleared before that vCPU is dropped; the handler runs on the same thread.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

/// A guest's calls to the VMM on the ucall port ([`guest_abi::UCALL_PORT`]), handled outside
/// the vCPU loop: the loop knows only that a port write there is a call in the guest's own
/// protocol (the test guest's is [`crate::ucall::TestGuestCalls`]).
pub trait GuestCalls: Send + Sync {
    /// Acts on vCPU `vcpu`'s call `data` (the port write's bytes, copied out of `kvm_run`) while
    /// the vCPU waits; may record in the vCPU's `report`; returns the outcome when the call ends
    /// the vCPU.
    fn call(&self, vcpu: usize, data: &[u8], report: &mut VcpuReport) -> Option<VcpuOutcome>;
}

/// How long a vCPU waits for guest RAM to be re-backed after `EFAULT`.
const FAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What every vCPU thread shares with the rest of the VMM.
pub struct VcpuShared {
    /// The VMM's table: every access to guest RAM on the guest's behalf goes through it.
    pub mmu: Arc<GuestMmu>,
    /// Applies the policy for teardowns of guest RAM outside the VMM; vCPUs wait on it after
    /// `EFAULT`.
    pub teardown: Arc<crate::teardown::TeardownGuard>,
    /// The guest's calls on the ucall port, if its protocol has them (the test guest's).
    pub guest_calls: Option<Arc<dyn GuestCalls>>,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Set by the VMM to stop every vCPU.
    pub stop: AtomicBool,
    /// Where vCPUs park while the VM is paused.
    pub pause: PauseGate,
    /// vCPU threads that have not finished yet.
    pub alive: std::sync::atomic::AtomicUsize,
    /// vCPU threads that have begun to run (a spawned thread may not have run yet).
    pub running: std::sync::atomic::AtomicUsize,
    /// Where vCPU threads report that they finished.
    pub events: Sender<VcpuEvent>,
    /// Wakes the VMM's event loop after an event was sent.
    pub wake: EventFd,
    /// Number of vCPUs (to validate the index a guest puts in its ucalls).
    pub nr_vcpus: u64,
    /// On PVM hosts: completes the instructions the host's emulator stops on (see
    /// [`crate::pvm`]); `None` elsewhere.
    pub pvm_quirks: Option<crate::pvm::EmulationQuirks>,
}

/// Where vCPUs park while the VM is paused.
///
/// Pausing sets `paused` and then kicks every vCPU out of `KVM_RUN`; a vCPU checks the gate
/// before each `KVM_RUN`, so once kicked it parks until `resume` (or a stop) and is counted in
/// `parked`, which the pauser waits for.
#[derive(Default)]
pub struct PauseGate {
    paused: AtomicBool,
    parked: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
}

impl PauseGate {
    /// Closes the gate (vCPUs park at their next check).
    pub fn close(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Opens the gate and wakes the parked vCPUs.
    pub fn open(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Waits until `n` vCPUs are parked, at most `timeout`; returns how many are.
    pub fn wait_parked(&self, n: usize, timeout: std::time::Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        while *parked < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            parked = self.changed.wait_timeout(parked, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *parked
    }

    /// Parks the calling vCPU while the gate is closed and `stop` is not set.
    fn park(&self, stop: &AtomicBool) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked += 1;
        self.changed.notify_all();
        while self.paused.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
    }

    /// Wakes parked vCPUs so that they see a stop.
    pub fn wake_all(&self) {
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }
}

/// What a vCPU thread tells the VMM loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// vCPU `index` stopped running; `fatal` when the VM should stop with it.
    Finished {
        /// Which vCPU.
        index: usize,
        /// Whether this ends the VM.
        fatal: bool,
    },
}

/// How a vCPU ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VcpuOutcome {
    /// The guest workload finished.
    Done {
        /// Pages the guest verified.
        pages: u64,
        /// Checksum the guest computed.
        checksum: u64,
    },
    /// The guest reported a failure.
    GuestFailure {
        /// Its message.
        message: String,
    },
    /// The guest took a CPU exception.
    GuestException {
        /// Description.
        message: String,
    },
    /// The VMM stopped the vCPU.
    Stopped,
    /// KVM or the VMM failed running it.
    Error {
        /// Description.
        message: String,
    },
}

impl VcpuOutcome {
    fn is_fatal(&self) -> bool {
        !matches!(self, VcpuOutcome::Done { .. } | VcpuOutcome::Stopped)
    }
}

/// A pass the guest timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PassTiming {
    /// Which pass.
    #[serde(serialize_with = "serialize_pass")]
    pub pass: Pass,
    /// Pages it touched.
    pub pages: u64,
    /// Guest TSC cycles it took.
    pub cycles: u64,
}

fn serialize_pass<S: serde::Serializer>(pass: &Pass, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(pass_name(*pass))
}

/// A short name of a pass.
pub fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::ColdWrite => "cold_write",
        Pass::WarmWrite => "warm_write",
        Pass::WarmRead => "warm_read",
        Pass::Fill => "fill",
        Pass::Check => "check",
        Pass::Kick => "kick",
        Pass::MmioRead => "mmio_read",
    }
}

/// What a vCPU thread returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// How it ended.
    pub outcome: VcpuOutcome,
    /// Passes the guest timed.
    pub timings: Vec<PassTiming>,
    /// Microseconds from VMM start to this vCPU's first exit (its hello ucall).
    pub first_exit_us: Option<u64>,
    /// Exits to the VMM.
    pub exits: u64,
    /// The guest TSC frequency, to turn cycles into time.
    pub tsc_khz: Option<u32>,
}

/// A vCPU ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    index: usize,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, index: usize) -> Self {
        Self { fd, index }
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs until the guest ends, a fatal exit, or a stop; always tells the VMM it finished.
    pub fn run(mut self, shared: &VcpuShared) -> VcpuReport {
        shared.running.fetch_add(1, Ordering::SeqCst);
        let mut report = VcpuReport {
            index: self.index,
            outcome: VcpuOutcome::Stopped,
            timings: Vec::new(),
            first_exit_us: None,
            exits: 0,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        };
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        report.outcome = self.run_loop(shared, &mut report);
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        let fatal = report.outcome.is_fatal();
        shared.alive.fetch_sub(1, Ordering::SeqCst);
        shared.pause.wake_all(); // a pauser waiting for every live vCPU counts one fewer
                                 // The receiver lives as long as the VMM loop that joins this thread.
        let _ = shared.events.send(VcpuEvent::Finished { index: self.index, fatal });
        let _ = shared.wake.write(1);
        report
    }

    fn run_loop(&mut self, shared: &VcpuShared, report: &mut VcpuReport) -> VcpuOutcome {
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return VcpuOutcome::Stopped;
            }
            if shared.pause.is_closed() {
                shared.pause.park(&shared.stop);
                continue;
            }
            let generation = shared.teardown.generation();
            let exit = self.fd.run();
            let memory_fault = match &exit {
                Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                    Some((format!(" at guest [{gpa:#x}, +{size:#x})"), Some((*gpa, *size))))
                }
                Err(e) if e.errno() == libc::EFAULT => Some((String::new(), None)),
                _ => None,
            };
            if let Some((at, fault)) = memory_fault {
                // Guest RAM behind the access is gone: someone outside the VMM unmapped it. Wait
                // for the teardown guard to re-back it (or to decide that the VM stops). The wait
                // returns only after a re-back that completed after this run began, so every retry
                // follows progress; a fault nothing resolves ends in the wait's timeout. (Counting
                // faults in a row is no measure: under a storm of external unmaps nearly every exit
                // of a guest that only touches memory is a fault on some new hole.) The wait also
                // ends when the VM stops (seen at the top of the loop).
                match shared.teardown.wait_backed(generation, fault, &shared.stop, FAULT_WAIT) {
                    Ok(()) => continue,
                    Err(why) => {
                        return self.error(&format!("KVM_RUN: guest memory{at} is not backed: {why}"))
                    }
                }
            }
            report.exits += 1;
            let end = match exit {
                Ok(VcpuExit::IoOut(port, data)) if port == UCALL_PORT && shared.guest_calls.is_some() => {
                    // Copy out: `data` borrows the vCPU's kvm_run.
                    let data = data.to_vec();
                    shared.guest_calls.as_ref().and_then(|calls| calls.call(self.index, &data, report))
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    shared.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    shared.pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    shared.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    shared.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::Hlt) => Some(self.error("the guest halted with interrupts off")),
                Ok(VcpuExit::Shutdown) => Some(VcpuOutcome::GuestException {
                    message: format!("triple fault (KVM_EXIT_SHUTDOWN){}", self.where_now()),
                }),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(
                    self.error(&format!("system event {kind} (the guest asked for a reset or power-off)")),
                ),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(self.error(&format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                ))),
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                    // the `internal` member of the union.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let emulation = internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
                    match (&shared.pvm_quirks, emulation) {
                        (Some(quirks), true) => match quirks.complete(&self.fd, shared.mmu.as_ref()) {
                            Ok(_) => None,
                            Err(why) => Some(self.error(&format!(
                                "KVM's instruction emulator failed and zapvm cannot complete the instruction: {why}{}",
                                self.where_now()
                            ))),
                        },
                        _ => Some(self.error(&format!(
                            "KVM internal error, suberror {} (1 = the instruction emulator failed){}",
                            internal.suberror,
                            self.where_now()
                        ))),
                    }
                }
                Ok(other) => Some(VcpuOutcome::Error { message: format!("unexpected exit {other:?}") }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: re-arm and look at the stop flag.
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(self.error(&format!("KVM_RUN failed: {e}"))),
            };
            if let Some(outcome) = end {
                return outcome;
            }
        }
    }

    fn error(&self, message: &str) -> VcpuOutcome {
        VcpuOutcome::Error { message: message.to_owned() }
    }

    /// " at rip=..." when the registers can be read.
    fn where_now(&self) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!(" at rip={:#x} rsp={:#x}", regs.rip, regs.rsp),
            Err(_) => String::new(),
        }
    }
}
