//! End to end: `zapvm run --linux` boots the project's Linux guest (resources/linux-guest: a
//! small kernel with the project's PVM change and a busybox initramfs) to its /init, and Linux's
//! own virtio_balloon driver works zapvm's balloon device.
//!
//! [`linux_guest_reaches_init_and_its_drivers_work_the_balloon_and_virtio_mem`], one boot (at
//! tens of seconds each on this kind of host, one is enough):
//! - the guest's /init runs, finds virtio_balloon and virtio_mem bound to the devices, and
//!   reports its memory;
//! - through the control API the host sets the balloon's target to 4 MiB, then 1 MiB, then 0; after each step the device's counters,
//!   the driver's `actual`, the guest kernel's own count of ballooned pages (/proc/vmstat,
//!   reported on the console) and the VMM's resident memory (/proc/<pid>/status) must agree. The
//!   guest's statistics (the balloon's stats queue) must agree with its /proc/meminfo. Then
//!   Linux's virtio_mem plugs 128 MiB of the device's region and unplugs it again: the device's
//!   plugged size and the guest's MemTotal move by exactly that much;
//! - a line typed on the VMM's standard input reaches the guest's shell, which reboots, and the
//!   reboot ends the VM successfully.
//!
//! The guest is built on first use (minutes; resources/linux-guest/build.sh, which installs
//! Debian packages) and taken from its cache afterwards. On PVM hosts guest ring 0 is emulated
//! (docs/host.md, "PVM"): /init comes ~30 s after the VM starts and each guest page allocation costs
//! milliseconds, so the balloon targets are small and the budgets are tens of seconds.

#[path = "support/lines.rs"]
mod lines;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use harness::stress_linux::GuestMemReport as GuestMem;
use lines::lines_to_channel;

use serde_json::{json, Value};

/// From the VM's start to its /init's "checks passed" (measured: ~30 s).
const BOOT_BUDGET: Duration = Duration::from_secs(180);
/// One balloon step: the guest driver (de)flating up to a thousand pages, and its next report.
const STEP_BUDGET: Duration = Duration::from_secs(90);
/// How long a VM may take to end once asked to.
const END_BUDGET: Duration = Duration::from_secs(30);
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Guest RAM.
const MEM_MIB: u64 = 128;
/// What the guest's /init writes and frees before the balloon steps, so that the pages the
/// driver gives the host are resident ones.
const FILL_MIB: u64 = 6;
/// The virtio-mem device's region, and what the guest is asked to plug (one Linux memory block).
const VIRTIO_MEM_REGION_MIB: u64 = 256;
const VIRTIO_MEM_PLUG_MIB: u64 = 128;

/// A `zapvm run --linux` child and its console.
struct LinuxVm {
    child: Child,
    /// The VMM's standard input: what the test types on the guest's console.
    keyboard: Option<std::process::ChildStdin>,
    console: Receiver<String>,
    stderr: Receiver<String>,
    log: Vec<String>,
    started: Instant,
    socket: Option<PathBuf>,
    last_mem: Option<GuestMem>,
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl LinuxVm {
    fn start(name: &str, extra: &[&str], append: &str, with_api: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapvm"));
        command.args(["run", "--linux", "--mem", &format!("{MEM_MIB}M"), "--append", append]);
        let socket = with_api.then(|| {
            std::env::temp_dir().join(format!("zapvm-linux-guest-{}-{name}.sock", std::process::id()))
        });
        match &socket {
            Some(path) => command.arg("--api-socket").arg(path),
            None => command.arg("--no-api"),
        };
        command
            .args(extra)
            // The VMM ends itself should the test's kill be lost.
            .args(["--timeout", "900"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        eprintln!("linux_guest ({name}): {command:?}");
        let mut child = command.spawn().expect("spawn zapvm");
        let console = lines_to_channel(child.stdout.take().expect("piped"));
        let stderr = lines_to_channel(child.stderr.take().expect("piped"));
        let keyboard = child.stdin.take();
        LinuxVm {
            child,
            keyboard,
            console,
            stderr,
            log: Vec::new(),
            started: Instant::now(),
            socket,
            last_mem: None,
        }
    }

    /// Types `line` and Enter on the guest's console (through the VMM's standard input).
    fn type_line(&mut self, line: &str) {
        let keyboard = self.keyboard.as_mut().expect("the VMM's stdin is piped");
        keyboard.write_all(format!("{line}\n").as_bytes()).expect("write to the VMM's stdin");
        keyboard.flush().expect("flush the VMM's stdin");
    }

    /// Everything seen so far, for failure messages.
    fn dump(&mut self) -> String {
        let mut vmm = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            vmm.push(line);
        }
        format!(
            "--- console ({} lines) ---\n{}\n--- zapvm stderr ---\n{}",
            self.log.len(),
            self.log.join("\n"),
            vmm.join("\n")
        )
    }

    /// Reads console lines until one satisfies `want` (returned), or fails the test at `deadline`.
    fn wait_for(&mut self, what: &str, deadline: Instant, want: impl Fn(&str) -> bool) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.console.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    let dump = self.dump();
                    panic!("no {what} within the budget\n{dump}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let dump = self.dump();
                    panic!("zapvm ended before {what}\n{dump}")
                }
            };
            eprintln!("[{:7.1} s] {line}", self.started.elapsed().as_secs_f64());
            if let Some(mem) = GuestMem::parse(&line) {
                self.last_mem = Some(mem);
            }
            if line.contains("zapvm-guest: FAIL") {
                let dump = self.dump();
                panic!("the guest's check failed: {line}\n{dump}");
            }
            self.log.push(line.clone());
            if want(&line) {
                return line;
            }
        }
    }

    /// Waits for the next memory report of the guest that satisfies `want`.
    fn wait_mem(&mut self, what: &str, deadline: Instant, want: impl Fn(&GuestMem) -> bool) -> GuestMem {
        let line = self.wait_for(what, deadline, |l| GuestMem::parse(l).is_some_and(|m| want(&m)));
        GuestMem::parse(&line).expect("matched above")
    }

    /// Waits for the VMM to exit; returns its exit status and the rest of its console.
    fn wait_exit(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + END_BUDGET;
        let mut rest = Vec::new();
        loop {
            match self.console.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    eprintln!("[{:7.1} s] {line}", self.started.elapsed().as_secs_f64());
                    rest.push(line);
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let dump = self.dump();
                    panic!("zapvm did not end within {} s\n{dump}", END_BUDGET.as_secs())
                }
            }
        }
        let status = self.child.wait().expect("wait for zapvm");
        self.log.extend(rest.iter().cloned());
        (status, rest)
    }

    fn api(&self) -> Api {
        let path = self.socket.as_ref().expect("started with an API socket");
        Api(vmm::api::QmpClient::connect(path, Duration::from_secs(30))
            .expect("connect to the control socket"))
    }

    /// The VMM's resident memory (VmRSS) in bytes.
    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("VMM status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }
}

/// A QMP connection to the VM's control socket.
struct Api(vmm::api::QmpClient);

impl Api {
    fn call(&mut self, command: &str, arguments: Value) -> Value {
        self.0
            .execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("{command} {arguments} failed: {e}"))
    }

    fn balloon(&mut self) -> Value {
        self.call("__org.zapvm_query-balloon", Value::Null)
    }

    /// Sets the balloon's size (what it takes from the guest), as `zapvm balloon set` does.
    fn set_balloon(&mut self, bytes: u64) {
        let base = field(&self.call("query-memory-size-summary", Value::Null), "base-memory");
        self.call("balloon", json!({ "value": base - bytes }));
    }

    fn set_virtio_mem(&mut self, bytes: u64) {
        self.call("qom-set", json!({ "path": "vmem0", "property": "requested-size", "value": bytes }));
    }
}

fn field(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn linux_guest_reaches_init_and_its_drivers_work_the_balloon_and_virtio_mem() {
    let mut vm = LinuxVm::start(
        "drivers",
        // No free page reporting: guest RAM then leaves the host only through the balloon, so
        // the VMM's RSS measures what the driver gave back. Statistics every second.
        &[
            "--no-free-page-reporting",
            "--balloon-stats-interval",
            "1",
            "--virtio-mem",
            &format!("{VIRTIO_MEM_REGION_MIB}M"),
        ],
        &format!("zapvm.report=1 zapvm.fill={FILL_MIB}"),
        true,
    );
    let boot = vm.started + BOOT_BUDGET;
    vm.wait_for("the guest's /init", boot, |l| l == "zapvm-guest: init reached");
    let to_init = vm.started.elapsed();
    vm.wait_for("virtio_balloon bound", boot, |l| {
        l.starts_with("zapvm-guest: virtio balloon ") && l.ends_with(" bound to virtio_balloon")
    });
    vm.wait_for("virtio_mem bound", boot, |l| {
        l.starts_with("zapvm-guest: virtio mem ") && l.ends_with(" bound to virtio_mem")
    });
    vm.wait_for("the checks' verdict", boot, |l| l == "zapvm-guest: checks passed");
    vm.wait_for("the fill", boot + STEP_BUDGET, |l| l.starts_with("zapvm-guest: filled and freed"));
    let first = vm.wait_mem("a memory report after the fill", boot + STEP_BUDGET, |_| true);
    // MemTotal: RAM less what the kernel keeps (its image, reserved areas, page structures).
    assert!(
        first.mem_total_kib * 1024 <= MEM_MIB * MIB && first.mem_total_kib * 1024 > MEM_MIB * MIB * 3 / 4,
        "MemTotal {} KiB for {MEM_MIB} MiB of RAM\n{}",
        first.mem_total_kib,
        vm.dump()
    );
    assert_eq!(first.ballooned(), 0, "nothing is ballooned at boot");
    let mut api = vm.api();

    // The stats queue: Linux's driver handed its statistics buffer over at probe (before
    // DRIVER_OK) and refills it when asked; its figures are the guest's /proc/meminfo.
    let deadline = Instant::now() + STEP_BUDGET;
    let stats = loop {
        let b = api.balloon();
        if field(&b, "guest_stats_updates") >= 2 {
            break b;
        }
        assert!(Instant::now() < deadline, "no guest statistics from Linux's driver: {b}\n{}", vm.dump());
        thread::sleep(Duration::from_millis(200));
    };
    let guest_total = field(&stats["guest_stats"], "total_memory");
    assert_eq!(
        guest_total,
        first.mem_total_kib * 1024,
        "the stats queue's total_memory is not the guest's MemTotal: {stats}\n{}",
        vm.dump()
    );
    let guest_free = field(&stats["guest_stats"], "free_memory");
    assert!(guest_free > 0 && guest_free < guest_total, "free_memory {guest_free} of {guest_total}");

    let mut figures = Vec::new();
    let mut before = api.balloon();
    for target_mib in [4u64, 1, 0] {
        let target = target_mib * MIB / PAGE;
        let rss_before = vm.rss();
        let set_at = Instant::now();
        api.set_balloon(target_mib * MIB);
        let deadline = set_at + STEP_BUDGET;
        // The device: the driver's `actual` and the pages in the device's bitmap.
        let after = loop {
            let b = api.balloon();
            if field(&b, "actual_pages") == target && field(&b, "ballooned_pages") == target {
                break b;
            }
            assert!(
                Instant::now() < deadline,
                "the balloon did not reach {target} pages: {b}\n{}",
                vm.dump()
            );
            thread::sleep(Duration::from_millis(100));
        };
        let took = set_at.elapsed();
        // The guest kernel's own count agrees page for page (a migration is one inflate and one
        // deflate to the device).
        let mem = vm.wait_mem("the guest's view of the balloon", deadline, |m| m.ballooned() == target);
        assert_eq!(
            mem.told_host(),
            (field(&after, "inflated_pages"), field(&after, "deflated_pages")),
            "the guest's /proc/vmstat and the device count different pages: {after}\n{}",
            vm.dump()
        );
        let inflated = field(&after, "inflated_pages") - field(&before, "inflated_pages");
        let deflated = field(&after, "deflated_pages") - field(&before, "deflated_pages");
        let discarded = field(&after, "bytes_discarded") - field(&before, "bytes_discarded");
        assert_eq!(discarded, inflated * PAGE, "every inflated page is discarded once: {after}");
        assert_eq!(field(&after, "inflate_refused") + field(&after, "deflate_refused"), 0, "{after}");
        let rss_after = vm.rss();
        let rss_drop = rss_before as i64 - rss_after as i64;
        if inflated > 0 {
            // The driver takes the guest's free pages, which the fill made resident: the host
            // gets most of them back (a few may never have been touched).
            assert!(
                rss_drop >= (inflated * PAGE / 2) as i64,
                "inflating {inflated} pages lowered the VMM's RSS by only {rss_drop} bytes\n{}",
                vm.dump()
            );
        }
        figures.push(format!(
            "| {target_mib} MiB | {inflated} | {deflated} | {:.2} s | {:+.2} MiB | {} / {} |",
            took.as_secs_f64(),
            -(rss_drop as f64) / MIB as f64,
            mem.balloon_inflate,
            mem.balloon_deflate
        ));
        before = after;
    }

    // Linux's virtio_mem: plug, then unplug, a whole Linux memory block (128 MiB on x86-64).
    let mut mem_figures = Vec::new();
    for plugged_mib in [VIRTIO_MEM_PLUG_MIB, 0] {
        let set_at = Instant::now();
        api.set_virtio_mem(plugged_mib * MIB);
        let deadline = set_at + STEP_BUDGET;
        let state = loop {
            let m = api.call("__org.zapvm_query-virtio-mem", Value::Null);
            if field(&m, "plugged_size") == plugged_mib * MIB {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "virtio-mem did not reach {plugged_mib} MiB: {m}\n{}",
                vm.dump()
            );
            thread::sleep(Duration::from_millis(200));
        };
        let device_took = set_at.elapsed();
        let want_kib = first.mem_total_kib + plugged_mib * 1024;
        let mem = vm.wait_mem("the guest's MemTotal", deadline, |m| m.mem_total_kib == want_kib);
        let guest_took = set_at.elapsed();
        assert_eq!(field(&state, "error_responses"), 0, "{state}");
        mem_figures.push(format!(
            "| {plugged_mib} MiB | {:.1} s | {:.1} s | {} KiB | {} MiB |",
            device_took.as_secs_f64(),
            guest_took.as_secs_f64(),
            mem.mem_total_kib,
            field(&state, "bytes_discarded") / MIB
        ));
    }

    let transport = api.call("__org.zapvm_query-memory-layer", Value::Null)["balloon_transport"].clone();
    assert_eq!(field(&transport, "notify_errors"), 0, "Linux's driver broke a transport rule: {transport}");
    assert!(field(&transport, "early_notifies") >= 1, "the stats queue's kick at probe: {transport}");
    // The console is the user's terminal: what is typed on the VMM's stdin reaches the guest's
    // shell, which computes (so the echo of the typed line cannot match) and then reboots, which
    // ends the VM successfully.
    vm.type_line("echo zapvm-input-$((6 * 7)); reboot -f");
    vm.wait_for("the shell's answer to typed input", Instant::now() + STEP_BUDGET, |l| {
        l.trim_end().ends_with("zapvm-input-42") && !l.contains("$((")
    });
    let (status, rest) = vm.wait_exit();
    let dump = vm.dump();
    assert!(status.success(), "zapvm exited with {status}\n{dump}");
    assert!(rest.iter().any(|l| l == "zapvm: the guest reset the machine"), "{dump}");
    if vmm::pvm::is_pvm() {
        // The emulator stops on FWAIT in the FPU setup of every boot; zapvm completes it.
        assert!(
            rest.iter().any(|l| l.starts_with("zapvm: PVM host: completed") && l.contains("FWAIT x")),
            "no PVM quirk report\n{dump}"
        );
    }
    eprintln!("linux_guest: /init reached {:.1} s after the VM started", to_init.as_secs_f64());
    eprintln!(
        "linux_guest: Linux's virtio_balloon, {MEM_MIB} MiB guest:\n| target | inflated | deflated | time to actual | VMM RSS change | guest vmstat inflate / deflate |\n|---|---|---|---|---|---|\n{}",
        figures.join("\n")
    );
    eprintln!(
        "linux_guest: Linux's virtio_mem, {VIRTIO_MEM_REGION_MIB} MiB region:\n| requested | device plugged | guest MemTotal follows | MemTotal | discarded so far |\n|---|---|---|---|---|\n{}",
        mem_figures.join("\n")
    );
}
