//! `zapvm governor` against real VMs: three phased test guests whose high working sets do not fit
//! a budget together, with no policy (the budget check must fire) and then under the governor
//! (the resident total must stay under it), through a VM that stops answering and one that dies;
//! and the governor command's bad input.

#[path = "support/scratch.rs"]
mod scratch;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::bench_overcommit::{FleetSpec, RunningFleet};
use harness::governor::{Fleet, Governor, GovernorMetrics, Mode, PolicyConfig};

const MIB: u64 = 1 << 20;
/// With no policy each VM keeps its high-water mark, 3 x (128 + ~8) MiB; the governor needs at
/// most two VMs high and one low: 2 x (128 + 16) + (16 + 16) + 3 x ~8 MiB = 344 MiB.
const BUDGET: u64 = 368 * MIB;

fn spec() -> FleetSpec {
    FleetSpec {
        vms: 3,
        mem: 192 * MIB,
        low: 16 * MIB,
        high: 128 * MIB,
        period: 8.0,
        ramp: 0.8,
        cache: 192 * MIB,
        stats_interval: 0.5,
    }
}

/// Runs `gov` for `seconds`, a round every 0.5 s: the resident totals and the verified pages
/// per VM seen last.
fn rounds(gov: &mut Governor, seconds: f64, verified: &mut [u64; 3]) -> Vec<u64> {
    let start = Instant::now();
    let mut totals = Vec::new();
    while start.elapsed().as_secs_f64() < seconds {
        let t = gov.tick(|vm, balloon| {
            let i = vm.rsplit('-').next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(9);
            if let Some(v) = balloon["guest_stats"]["zapvm_verified_pages"].as_u64() {
                if i < 3 {
                    verified[i] = v;
                }
            }
        });
        totals.push(t.resident_total);
        std::thread::sleep(Duration::from_millis(500));
    }
    totals
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn the_governor_keeps_three_phased_vms_under_the_budget_and_survives_a_stuck_and_a_dead_vm() {
    let scratch = scratch::scratch_dir("governor");
    let dir = scratch.path().join("fleet");
    let fleet = RunningFleet::start(Path::new(env!("CARGO_BIN_EXE_zapvm")), &dir, "gov-", &spec()).unwrap();
    let pids: Vec<u32> = fleet.children.iter().map(|(_, c)| c.id()).collect();
    let config = PolicyConfig { budget: BUDGET, floor: 32 * MIB, headroom: 16 * MIB, ..Default::default() };
    let mut verified = [0u64; 3];

    // No policy for a cycle: every VM has been high once and kept it; the check must fire.
    let mut watch = Governor::new(Fleet::Dir(dir.clone()), Mode::Observe, config.clone(), None).unwrap();
    let totals = rounds(&mut watch, 9.0, &mut verified);
    let peak = totals.iter().max().copied().unwrap_or(0);
    assert!(
        peak > BUDGET,
        "with no policy the fleet should exceed {} MiB, peaked at {} MiB",
        BUDGET / MIB,
        peak / MIB
    );

    // The governor: a few seconds to take the caches back, then a cycle under the budget.
    let mut gov = Governor::new(Fleet::Dir(dir.clone()), Mode::Govern, config, None).unwrap();
    rounds(&mut gov, 3.0, &mut verified);
    let before = verified;
    let mut totals = rounds(&mut gov, 4.0, &mut verified);
    // VM 2 stops answering for a while (SIGSTOP): counted, and the others stay governed.
    signal(pids[2], libc::SIGSTOP);
    totals.extend(rounds(&mut gov, 3.0, &mut verified));
    signal(pids[2], libc::SIGCONT);
    totals.extend(rounds(&mut gov, 4.0, &mut verified));
    let m: GovernorMetrics = gov.metrics.clone();
    assert!(m.unreachable >= 1, "the stopped VM was not counted unreachable: {m:?}");
    let over: Vec<u64> = totals.iter().filter(|t| **t > BUDGET + BUDGET / 20).map(|t| t / MIB).collect();
    assert!(
        over.is_empty(),
        "resident totals above the budget + 5 % ({} MiB): {over:?} MiB of {totals:?}",
        BUDGET / MIB
    );
    assert!(m.commands > 0 && m.command_failures == 0, "{m:?}");
    for i in 0..3 {
        assert!(
            verified[i] > before[i],
            "VM {i} verified no pages under the governor: {before:?} -> {verified:?}"
        );
    }

    // VM 1 dies: it leaves the fleet, the governor goes on with the others.
    signal(pids[1], libc::SIGKILL);
    rounds(&mut gov, 2.0, &mut verified);
    assert_eq!((gov.metrics.vms_left, gov.metrics.vms), (1, 2), "{:?}", gov.metrics);

    // The others ran clean to the end (their guests verify every page they use).
    let ends = fleet.stop();
    for end in &ends {
        assert_eq!(end.clean, end.name != "gov-1", "{}: {}", end.name, end.output);
        assert_eq!(end.alive, end.name != "gov-1", "{}: {}", end.name, end.output);
    }
}

fn governor(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = scratch::zapvm_in(dir).arg("governor").args(args).output().expect("zapvm governor runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn governor_bad_input_is_a_clear_error_or_a_counted_condition() {
    let scratch = scratch::scratch_dir("governor-bad");
    let d = scratch.path();
    let (ok, text) = governor(d, &["--budget", "100M", "--socket", "a.sock", "--socket", "b.sock"]);
    assert!(!ok && text.contains("smaller than the floors"), "{text}");
    let (ok, text) = governor(d, &["--budget", "1G", "--dir", "/nonexistent/zapvm-fleet"]);
    assert!(!ok && text.contains("not a directory"), "{text}");
    let (ok, text) = governor(d, &["--budget", "1G", "--cgroup", d.to_str().unwrap()]);
    assert!(!ok && text.contains("not a memory cgroup"), "{text}");
    // The root memory cgroup: v1 refuses a limit on it, v2 has no memory.max there.
    let root =
        ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"].into_iter().find(|p| Path::new(p).is_dir()).unwrap();
    let (ok, text) = governor(d, &["--budget", "1G", "--cgroup", root, "--cgroup-enforce"]);
    assert!(
        !ok && (text.contains("cannot set the memory limit") || text.contains("not a memory cgroup")),
        "{text}"
    );
    // A socket nobody listens on: counted each round, not fatal.
    let (ok, text) = governor(
        d,
        &[
            "--budget",
            "1G",
            "--socket",
            d.join("zapvm-none.sock").to_str().unwrap(),
            "--duration",
            "1",
            "--interval",
            "0.3",
        ],
    );
    assert!(ok, "{text}");
    let metrics: serde_json::Value =
        serde_json::from_str(text.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert!(
        metrics["unreachable"].as_u64().unwrap() >= 2 && metrics["ticks"].as_u64().unwrap() >= 2,
        "{metrics}"
    );
}

/// Copies `buf.len()` bytes between this process's memory at `hva` and `buf` with
/// process_vm_readv/writev (no Rust reference to guest RAM, which the guest writes meanwhile).
fn poke(hva: usize, buf: &mut [u8], write: bool) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` is `buf`, valid for its length; the remote side is this process's guest RAM
    // mapping, checked by the kernel (EFAULT if unmapped).
    let n = unsafe {
        if write {
            libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0)
        } else {
            libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
        }
    };
    n == buf.len() as isize
}

/// The planted fault of the phased guest's checker: the host changes one word of a working-set
/// page behind the guest's back; the guest must fail naming it.
#[test]
fn the_phased_guest_fails_on_a_working_set_page_that_lost_its_pattern() {
    use guest_abi::phased::{phased_layout, PhaseParams};
    use std::sync::{Arc, Mutex};
    use vmm::boot::test_guest::TestGuestParams;
    use vmm::devices::virtio::balloon::BalloonConfig;
    use vmm::machine::{run, Console, VmConfig, VmControl, VmOutcome};
    use vmm::memory::{MemoryBackend, MemoryConfig};

    const SEED: u64 = 0xfa17;
    let planted: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let slot = planted.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let vm = vm.clone();
        let slot = slot.clone();
        std::thread::spawn(move || {
            // The boot info: work ranges at words 8.. (see guest_abi::BootInfo).
            let info = vm.guest_mmu().host_range(guest_abi::BOOT_INFO_GPA, 64 * 8).unwrap();
            let mut w = [0u8; 64 * 8];
            assert!(poke(info, &mut w, false));
            let word = |i: usize| u64::from_le_bytes(w[8 * i..8 * i + 8].try_into().unwrap());
            let (start, end) = (word(8), word(9));
            assert_eq!(word(7), 1, "one work range");
            let layout = phased_layout((end - start) / guest_abi::PAGE_SIZE).unwrap();
            // Pool page 0 is in the working set as soon as the guest filled it.
            let gpa = start + layout.pool_first * guest_abi::PAGE_SIZE + 8 * 17;
            let hva = vm.guest_mmu().host_range(gpa, 8).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut b = [0u8; 8];
            while u64::from_le_bytes(b) != guest_abi::pattern(SEED, gpa) {
                assert!(Instant::now() < deadline, "the guest never filled pool page 0");
                std::thread::sleep(Duration::from_millis(20));
                assert!(poke(hva, &mut b, false));
            }
            let mut bad = (guest_abi::pattern(SEED, gpa) ^ 0x10).to_le_bytes();
            assert!(poke(hva, &mut bad, true));
            *slot.lock().unwrap() = Some(gpa);
        });
    });
    let config = VmConfig {
        memory: MemoryConfig { size: 64 * MIB, backend: MemoryBackend::Anonymous, thp: false },
        vcpus: 1,
        timeout: Some(Duration::from_secs(120)),
        console: Console::Null,
        monitor: false,
        after_start: Some(hook),
        balloon: Some(BalloonConfig { deflate_on_oom: false, ..Default::default() }),
        ..VmConfig::test_guest(TestGuestParams {
            seed: SEED,
            phase: PhaseParams {
                low_pages: 2048,
                high_pages: 2048,
                cache_pages: 1 << 20,
                ..Default::default()
            },
            ..TestGuestParams::new(guest_abi::Workload::Phased)
        })
    };
    let report = run(&config).expect("the VM starts");
    let gpa = planted.lock().unwrap().expect("the fault was planted");
    match &report.outcome {
        VmOutcome::Failed { message } => {
            assert!(message.contains("working-set page lost its pattern"), "{message}");
            assert!(message.contains(&format!("{gpa:#x}")), "{message} does not name {gpa:#x}");
        }
        other => panic!("the guest did not catch the planted fault: {other:?}"),
    }
}

/// `bench overcommit --cgroup-enforce`'s room: a phased VM started in a memory cgroup
/// (`RunningFleet::start_in`) is charged to it from its first page, so a limit below what it
/// touches has the cgroup's OOM killer end it (the cgroup counts the kill), and the cgroup is
/// removed once the VM is gone. Without `start_in` the VM would run outside the limit and live.
#[test]
fn a_phased_vm_started_in_a_memory_cgroup_is_held_to_its_limit() {
    use harness::governor::cgroup::Cgroup;
    let cg = match Cgroup::create(&format!("zapvm-test-{}", std::process::id())) {
        Ok(cg) => cg,
        Err(e) => {
            panic!("this host kind has a memory cgroup hierarchy (v1 or v2) and the tests run as root: {e}")
        }
    };
    cg.enforce(96 * MIB).unwrap();
    let scratch = scratch::scratch_dir("governor-cgroup");
    let dir = scratch.path().join("fleet");
    let spec = FleetSpec { vms: 1, mem: 256 * MIB, low: 160 * MIB, high: 192 * MIB, ..spec() };
    let started = RunningFleet::start_in(
        Path::new(env!("CARGO_BIN_EXE_zapvm")),
        &dir,
        "cg-",
        &spec,
        Some(&cg.procs_file()),
    );
    // On a failure below, the fleet (declared later) is dropped first and kills the VM, then the
    // cgroup is removed.
    let mut fleet = started.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = fleet.children[0].1.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("the VM lived for a minute with 160 MiB of working set under a 96 MiB limit");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(cg.oom_kills().unwrap() >= 1, "the cgroup counted no OOM kill");
    drop(fleet);
    cg.remove().unwrap();
}

/// A fleet whose VM ends before its control socket exists is an error that says so (with the VM's
/// standard error) rather than a socket that never came; a cgroup created for a run is
/// removed when its owner drops it, also on such an early return.
#[test]
fn a_fleet_that_cannot_start_is_a_prompt_error_and_leaves_no_cgroup() {
    use harness::governor::cgroup::Cgroup;
    let scratch = scratch::scratch_dir("governor-fleet-fails");
    let err = RunningFleet::start(Path::new("/bin/false"), &scratch.path().join("fleet"), "no-", &spec())
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("no-0 ended") && err.contains("before its control socket existed"), "{err}");

    let cg = Cgroup::create(&format!("zapvm-test-drop-{}", std::process::id())).unwrap();
    let dir = cg.dir().to_path_buf();
    assert!(dir.is_dir());
    drop(cg);
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
