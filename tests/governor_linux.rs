//! `zapvm governor` over Linux guests (issue #17, item 4), in stages like the KVM selftests':
//!
//! 1. Two `zapvm run --linux --prealloc` VMs of 192 MiB (all guest RAM resident from the start,
//!    as with QEMU's -mem-prealloc) boot the project's Linux guest with free page reporting off,
//!    so only the balloon gives memory back; seedcheck writes 24 MiB of seeded data and
//!    re-verifies it for the whole test.
//! 2. No policy: the resident total must exceed the budget (the check below can fire).
//! 3. The governor: Linux's virtio_balloon inflates to the targets it sets, and the resident
//!    total falls under the budget and stays there (within 5 %).
//! 4. The governor paused and guest 0's balloon set to leave it 12 MiB free, it writes 20 MiB to
//!    tmpfs: Linux deflates the balloon itself (VIRTIO_BALLOON_F_DEFLATE_ON_OOM: its OOM notifier gives balloon pages back
//!    instead of killing a process); the device sees deflates with no new target.
//! 5. The governor again: it follows the guest (the target comes down to what the guest holds:
//!    G1 where the budget has room, else G3's share) and keeps the total under the budget. (It does not take the file's
//!    memory back when the file is deleted while the budget has room for it: G6.)
//!
//! All along: no checker failure, no kernel problem, no OOM kill. Guest ring 0 is emulated on
//! this host (docs/host.md), so the fleet is two small VMs.

#[path = "support/lines.rs"]
mod lines;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use harness::governor::{Fleet, Governor, Mode, PolicyConfig, Reason};
use harness::stress_linux::{kernel_problems, CheckerReport};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest RAM per VM.
const MEM_MIB: u64 = 192;
/// With no policy each VM keeps its 192 MiB resident (preallocated) and the VMM's own; under the
/// governor each guest needs ~60 MiB (the kernel, seedcheck, headroom), and guest 0 ~15 MiB more
/// after stage 4 (which must still fit, for the governor to follow it).
const BUDGET: u64 = 180 * MIB;
/// From the VMs' start to seedcheck's data written (two Linux guests booting on two cores).
const BOOT_BUDGET: Duration = Duration::from_secs(360);

/// A `zapvm run --linux` child, its console and its control socket.
struct LinuxVm {
    name: String,
    child: Child,
    keyboard: std::process::ChildStdin,
    console: Receiver<String>,
    log: Vec<String>,
    socket: PathBuf,
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl LinuxVm {
    fn start(dir: &std::path::Path, index: u64) -> Self {
        let name = format!("linux-{index}");
        let socket = dir.join(format!("{name}.sock"));
        let append = format!("zapvm.seedcheck=24 zapvm.seed={} zapvm.report=5", index + 1);
        let mut command = Command::new(env!("CARGO_BIN_EXE_zapvm"));
        command
            .args(["run", "--linux", "--mem", &format!("{MEM_MIB}M"), "--append", &append])
            .arg("--api-socket")
            .arg(&socket)
            .args([
                "--prealloc",
                "--no-free-page-reporting",
                "--balloon-stats-interval",
                "1",
                "--timeout",
                "900",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        eprintln!("governor_linux ({name}): {command:?}");
        let mut child = command.spawn().expect("spawn zapvm");
        let console = lines::lines_to_channel(child.stdout.take().expect("piped"));
        let keyboard = child.stdin.take().expect("piped");
        LinuxVm { name, child, keyboard, console, log: Vec::new(), socket }
    }

    /// Takes the console lines that arrived; fails the test on a checker's failure.
    fn drain(&mut self) {
        while let Ok(line) = self.console.try_recv() {
            assert!(!line.contains("zapvm-guest: FAIL"), "{}: {line}\n{}", self.name, self.log.join("\n"));
            self.log.push(line);
        }
    }

    /// Whether a console line so far contains `text`.
    fn said(&mut self, text: &str) -> bool {
        self.drain();
        self.log.iter().any(|l| l.contains(text))
    }

    /// Waits until the console says `text`.
    fn wait_for(&mut self, text: &str, deadline: Instant) {
        while !self.said(text) {
            assert!(Instant::now() < deadline, "{}: no {text:?} in time\n{}", self.name, self.log.join("\n"));
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "{}: zapvm ended\n{}",
                self.name,
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types `line` on the guest's shell.
    fn type_line(&mut self, line: &str) {
        self.keyboard.write_all(format!("{line}\n").as_bytes()).expect("type on the console");
        self.keyboard.flush().expect("flush the console");
    }
}

/// What one round saw.
struct Round {
    total: u64,
    /// Per VM (by index): the balloon's reply.
    balloon: [Value; 2],
    /// Per VM: the decision's reason, when the governor decided.
    reason: [Option<Reason>; 2],
}

fn index_of(name: &str) -> usize {
    name.rsplit('-').next().and_then(|n| n.parse().ok()).expect("linux-N")
}

/// One governor round, and the console lines meanwhile.
fn round(gov: &mut Governor, vms: &mut [LinuxVm]) -> Round {
    let mut balloon = [Value::Null, Value::Null];
    let t = gov.tick(|vm, b| balloon[index_of(vm)] = b.clone());
    let mut reason = [None, None];
    if let Some(d) = &t.decision {
        for v in &d.vms {
            reason[index_of(&v.name)] = Some(v.reason);
        }
    }
    for vm in vms.iter_mut() {
        vm.drain();
    }
    std::thread::sleep(Duration::from_millis(500));
    Round { total: t.resident_total, balloon, reason }
}

fn pages(b: &Value, key: &str) -> u64 {
    b[key].as_u64().unwrap_or_else(|| panic!("no {key} in {b}"))
}

#[test]
fn linux_guests_under_the_governor_inflate_deflate_on_oom_and_stay_under_the_budget() {
    let dir = std::env::temp_dir().join(format!("zapvm-governor-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vms = vec![LinuxVm::start(&dir, 0), LinuxVm::start(&dir, 1)];
    let sockets: Vec<PathBuf> = vms.iter().map(|v| v.socket.clone()).collect();

    // 1. Both guests booted and seedcheck's data is written.
    let deadline = Instant::now() + BOOT_BUDGET;
    for vm in vms.iter_mut() {
        vm.wait_for("zapvm-guest: seedcheck ready", deadline);
    }
    eprintln!(
        "governor_linux: both guests ready after {:.0} s",
        BOOT_BUDGET.as_secs_f64() - deadline.saturating_duration_since(Instant::now()).as_secs_f64()
    );
    let config = PolicyConfig { budget: BUDGET, floor: 48 * MIB, headroom: 16 * MIB, ..Default::default() };

    // 2. No policy: over the budget.
    let mut watch =
        Governor::new(Fleet::Sockets(sockets.clone()), Mode::Observe, config.clone(), None).unwrap();
    let peak = (0..8).map(|_| round(&mut watch, &mut vms).total).max().unwrap();
    assert!(
        peak > BUDGET,
        "with no policy the guests should exceed {} MiB, peaked at {} MiB",
        BUDGET / MIB,
        peak / MIB
    );

    // 3. The governor: under the budget within a minute, and kept there.
    let mut gov = Governor::new(Fleet::Sockets(sockets.clone()), Mode::Govern, config.clone(), None).unwrap();
    let start = Instant::now();
    while round(&mut gov, &mut vms).total > BUDGET {
        assert!(start.elapsed() < Duration::from_secs(60), "not under the budget after a minute of governor");
    }
    let settled = start.elapsed();
    let mut last = None;
    for _ in 0..12 {
        let r = round(&mut gov, &mut vms);
        assert!(
            r.total <= BUDGET + BUDGET / 20,
            "{} MiB over the budget + 5 % under the governor",
            r.total / MIB
        );
        last = Some(r);
    }
    let r = last.unwrap();
    for (i, b) in r.balloon.iter().enumerate() {
        // The governor takes what the budget needs (G3), not more (G6): some of each guest.
        assert!(pages(b, "actual_pages") > 0, "VM {i}'s balloon holds nothing: {b}");
    }
    eprintln!(
        "governor_linux: peak {} MiB with no policy; under {} MiB after {:.1} s; now {} MiB, balloons {} / {} MiB",
        peak / MIB,
        BUDGET / MIB,
        settled.as_secs_f64(),
        r.total / MIB,
        pages(&r.balloon[0], "actual_pages") * PAGE / MIB,
        pages(&r.balloon[1], "actual_pages") * PAGE / MIB
    );

    // 4. The governor paused, the host leaves guest 0 only 12 MiB beyond what it uses (the target
    // a squeezed VM gets), and the guest writes 20 MiB to tmpfs: Linux must deflate the balloon on
    // its own to make room (no new target), and kill nothing.
    let b = &r.balloon[0];
    let available = b["guest_stats"]["available_memory"].as_u64().expect("the guest's available memory");
    let squeezed = (available + pages(b, "actual_pages") * PAGE).saturating_sub(12 * MIB) / MIB;
    let set = Command::new(env!("CARGO_BIN_EXE_zapvm"))
        .args(["balloon", "set", &format!("{squeezed}M"), "--api-socket"])
        .arg(&sockets[0])
        .output()
        .unwrap();
    assert!(set.status.success(), "zapvm balloon set: {}", String::from_utf8_lossy(&set.stderr));
    let start = Instant::now();
    let before = loop {
        let seen = round(&mut watch, &mut vms);
        // Within 2 MiB: the driver takes the last pages of a nearly full guest slowly (it backs
        // off when an allocation fails), and the write below needs only that little is free.
        if pages(&seen.balloon[0], "actual_pages") + 2 * MIB / PAGE >= pages(&seen.balloon[0], "target_pages")
        {
            break seen.balloon[0].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "Linux did not inflate to {squeezed} MiB: {}",
            seen.balloon[0]
        );
    };
    vms[0].type_line("dd if=/dev/zero of=/tmp/big bs=1M count=20 && echo zapvm-test: written-$((6*7))");
    vms[0].wait_for("zapvm-test: written-42", Instant::now() + Duration::from_secs(180));
    let seen = round(&mut watch, &mut vms);
    let after = &seen.balloon[0];
    assert_eq!(pages(after, "target_pages"), pages(&before, "target_pages"), "nobody set a target: {after}");
    let oom_deflated = pages(after, "deflated_pages") - pages(&before, "deflated_pages");
    assert!(oom_deflated > 0, "Linux wrote 20 MiB into 12 MiB without deflating: {after}");
    assert!(pages(after, "actual_pages") < pages(after, "target_pages"), "{after}");
    eprintln!(
        "governor_linux: balloon {squeezed} MiB in {:.1} s; 20 MiB written in 12 MiB free: {oom_deflated} pages \
         deflated on OOM",
        start.elapsed().as_secs_f64()
    );

    // 5. The governor follows the guest: its target comes down to what the guest holds.
    let start = Instant::now();
    let mut reasons = Vec::new();
    loop {
        let r = round(&mut gov, &mut vms);
        reasons.push(r.reason[0]);
        if pages(&r.balloon[0], "target_pages") <= pages(after, "actual_pages") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the governor did not follow the guest: {}",
            r.balloon[0]
        );
    }
    eprintln!(
        "governor_linux: the governor followed guest 0 in {:.1} s: {reasons:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(!reasons.contains(&Some(Reason::Unreachable)), "{reasons:?}");
    for _ in 0..6 {
        let r = round(&mut gov, &mut vms);
        assert!(
            r.total <= BUDGET + BUDGET / 20,
            "{} MiB over the budget + 5 % under the governor",
            r.total / MIB
        );
    }
    let m = gov.metrics.clone();
    assert!(m.commands > 0 && m.command_failures == 0 && m.unreachable == 0, "{m:?}");

    // All along: the checkers clean and still running, no kernel problem, no OOM kill.
    for vm in vms.iter_mut() {
        let seedcheck_before = CheckerReport::from_console(&vm.log).seedcheck_passes;
        let deadline = Instant::now() + Duration::from_secs(60);
        while CheckerReport::from_console(&vm.log).seedcheck_passes == seedcheck_before {
            assert!(Instant::now() < deadline, "{}: seedcheck made no pass after the test", vm.name);
            std::thread::sleep(Duration::from_millis(500));
            vm.drain();
        }
        let c = CheckerReport::from_console(&vm.log);
        assert!(c.failures.is_empty(), "{}: {:?}", vm.name, c.failures);
        assert_eq!(kernel_problems(&vm.log), Vec::<String>::new(), "{}", vm.name);
        assert!(
            !vm.log
                .iter()
                .any(|l| l.contains("Out of memory: Killed process") || l.contains("invoked oom-killer")),
            "{}: the OOM killer ran\n{}",
            vm.name,
            vm.log.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
