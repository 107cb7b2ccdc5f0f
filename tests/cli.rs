//! End-to-end: the `zapvm` command's contract with a user — exit status 0 on success, non-zero
//! with a one-line message naming the problem on bad input or guest failure, never a panic —
//! and the client commands' handling of the control sockets that VMs leave behind.
//!
//! Every `zapvm` here runs with a scratch directory of its test as its temporary and runtime
//! directory, removed when the test ends: sockets, snapshots and files go with it.

#[path = "support/bench_files.rs"]
mod bench_files;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/skip.rs"]
mod skip;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use scratch::{scratch_dir, zapvm_in};

/// `zapvm args` in a scratch directory of its own.
fn zapvm(args: &[&str]) -> Output {
    let dir = scratch_dir("cli");
    zapvm_in(dir.path()).args(args).output().expect("zapvm runs")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A bad-input run: non-zero exit, one `zapvm: error:` line containing `needle`, no panic.
fn assert_refused(args: &[&str], needle: &str) {
    assert_output_refused(&zapvm(args), args, needle);
}

/// [`assert_refused`] for a run already made.
fn assert_output_refused(out: &Output, args: &[&str], needle: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(1), "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("zapvm: error: ")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: want one error line, stderr: {stderr}");
    assert!(errors[0].contains(needle), "{args:?}: {:?} does not mention {needle:?}", errors[0]);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A file `name` in a fresh scratch directory (removed when the returned directory drops).
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch_dir("cli-file");
    let path = dir.path().join(name);
    (dir, path)
}

#[test]
fn default_run_boots_the_test_guest_and_exits_zero() {
    let out = zapvm(&["run", "--timeout", "60"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("256 MiB"), "{stdout}");
    assert!(stdout.contains("vCPU 0: verified"), "{stdout}");
    assert!(stdout.contains("0 differ"), "{stdout}");
}

#[test]
fn two_vcpus_each_report_their_slice() {
    let out = zapvm(&["run", "--vcpus", "2", "--mem", "64M", "--timeout", "60"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("vCPU 0: verified") && stdout.contains("vCPU 1: verified"), "{stdout}");
}

#[test]
fn json_report_is_machine_readable() {
    let out = zapvm(&["run", "--mem", "32M", "--json", "--timeout", "60"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(report["outcome"]["kind"], "success");
    assert_eq!(report["vcpus"][0]["outcome"]["kind"], "done");
}

#[test]
fn guest_assertion_failure_exits_nonzero_with_the_message() {
    let out = zapvm(&["run", "--mem", "16M", "--workload", "assert-fail", "--timeout", "60"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("deliberate assertion failure"), "{stderr}");
}

#[test]
fn zero_vcpus_is_refused() {
    assert_refused(&["run", "--vcpus", "0"], "at least one vCPU");
}

#[test]
fn too_many_vcpus_is_refused() {
    assert_refused(&["run", "--vcpus", "100000"], "vCPUs requested");
}

#[test]
fn memory_that_is_not_page_multiple_is_refused() {
    assert_refused(&["run", "--mem", "1048577"], "not a multiple of the 4 KiB page size");
}

#[test]
fn memory_too_small_for_the_image_is_refused() {
    assert_refused(&["run", "--mem", "4M"], "too small");
}

#[test]
fn missing_guest_elf_is_refused() {
    assert_refused(
        &["run", "--guest", "/nonexistent/guest.elf"],
        "cannot read test guest ELF /nonexistent/guest.elf",
    );
}

#[test]
fn truncated_guest_elf_is_refused() {
    // An x86_64 ELF64 header cut off before its program header fields.
    let (_dir, path) = scratch("truncated.elf");
    let mut header = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0".to_vec();
    header.resize(40, 0);
    std::fs::write(&path, &header).unwrap();
    assert_refused(&["run", "--guest", path.to_str().unwrap()], "truncated");
}

#[test]
fn garbage_guest_is_refused() {
    let (_dir, path) = scratch("garbage.elf");
    std::fs::write(&path, b"#!/bin/sh\necho not an elf\n").unwrap();
    assert_refused(&["run", "--guest", path.to_str().unwrap()], "no ELF magic");
}

#[test]
fn missing_kernel_is_refused() {
    assert_refused(&["run", "--kernel", "/nonexistent/bzImage"], "cannot read kernel /nonexistent/bzImage");
}

#[test]
fn truncated_kernel_is_refused() {
    let (_dir, path) = scratch("bzImage");
    let mut image = vec![0u8; 0x300];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&path, &image[..0x210]).unwrap();
    assert_refused(&["run", "--kernel", path.to_str().unwrap()], "is not a valid image");
}

#[test]
fn missing_kvm_device_is_refused() {
    assert_refused(&["run", "--kvm-device", "/nonexistent/kvm"], "/nonexistent/kvm does not exist");
}

#[test]
fn inaccessible_kvm_device_is_refused() {
    // A device node nobody may open, opened as an unprivileged user.
    let (_dir, path) = scratch("kvm-no-access");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let dir = path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = zapvm_in(dir);
    cmd.args(["run", "--kvm-device", path.to_str().unwrap()]);
    // Root opens anything: drop to `nobody` in the child (CommandExt::uid/gid).
    if nix_is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not accessible"), "{stderr}");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

#[test]
fn bad_size_syntax_is_a_usage_error() {
    let out = zapvm(&["run", "--mem", "lots"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "clap's usage errors exit 2: {stderr}");
    assert!(stderr.contains("invalid value 'lots' for '--mem"), "{stderr}");
}

/// A `zapvm run` of the test guest in `dir` long enough to be asked things (Touch over 2 GiB of
/// 4 KiB pages takes seconds here), killed and reaped when dropped.
struct RunningVm(Child);

impl RunningVm {
    fn start(dir: &Path) -> Self {
        let child = zapvm_in(dir)
            .args(["run", "--workload", "touch", "--mem", "2G", "--timeout", "60"])
            // Not the test runner's terminal: the killed VMM could not give it back.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("zapvm run starts");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its default control socket, once it is there (waiting up to 60 s for it).
    fn socket(&self, dir: &Path) -> PathBuf {
        let socket = dir.join(format!("zapvm-{}.sock", self.pid()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{} did not appear", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        socket
    }

    /// Kills it (SIGKILL: it cannot remove its socket) and reaps it.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stats_of_a_running_vm_show_when_and_kvm_table_and_notifier_counters() {
    let dir = scratch_dir("cli-stats");
    let vm = RunningVm::start(dir.path());
    // The socket answers before the vCPU has run its first instruction: ask again until KVM's
    // counters show the vCPU has exited at least once (the guest's first port write), up to 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let out = zapvm_in(dir.path()).args(["stats", "--pid", &vm.pid().to_string()]).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
        let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats are JSON");
        let exits =
            stats["kvm"]["vcpus"]["exits"].as_u64().unwrap_or_else(|| panic!("no exit count: {stats}"));
        if exits > 0 {
            break stats;
        }
        assert!(Instant::now() < deadline, "the vCPU never exited in 60 s: {stats}");
        std::thread::sleep(Duration::from_millis(20));
    };
    vm.kill();
    assert!(stats["kvm"]["vm"]["pages_4k"].is_u64(), "{stats}");
    assert!(stats["table"]["installs_4k"].is_u64(), "{stats}");
    assert!(stats["notifier"]["kinds"].is_array(), "{stats}");
    // When it was taken: RFC 3339 UTC, and the same instant as Unix seconds, within this test's
    // own clock readings around the call.
    let time = stats["time"].as_str().unwrap_or_default();
    assert!(time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    let unix = stats["unix_time_s"].as_f64().unwrap_or(0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(unix > now - 120.0 && unix <= now, "{unix} vs now {now}");
}

#[test]
fn stale_sockets_of_killed_vms_are_removed_and_do_not_fail_client_commands() {
    let dir = scratch_dir("cli-stale");
    let killed = RunningVm::start(dir.path());
    let stale = killed.socket(dir.path());
    killed.kill();
    assert!(stale.exists(), "a killed VM leaves its socket behind (the case under test)");

    // Without --pid: the stale socket does not count (there is exactly one VM), and goes.
    let live = RunningVm::start(dir.path());
    let socket = live.socket(dir.path());
    let out = zapvm_in(dir.path()).args(["pause"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stale.exists(), "the stale socket {} is removed", stale.display());
    let out = zapvm_in(dir.path()).args(["stats"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats are JSON");
    assert_eq!(stats["pid"], live.pid(), "{stats}");
    assert_eq!(stats["paused"], true, "{stats}");

    // With --pid of a killed VM: a clear error, and its socket goes too.
    let pid = live.pid().to_string();
    live.kill();
    assert!(socket.exists());
    let args = ["quit", "--pid", &pid];
    let out = zapvm_in(dir.path()).args(args).output().unwrap();
    assert_output_refused(&out, &args, &format!("no process {pid}"));
    assert!(!socket.exists(), "the stale socket {} is removed", socket.display());
}

#[test]
fn stats_of_no_vm_is_a_clear_error() {
    assert_refused(&["stats", "--pid", "999999999"], "no process 999999999");
}

#[test]
fn stats_never_signals_a_process_that_would_die_of_it() {
    // `sleep` does not catch SIGUSR1: the default action would kill it.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    assert_refused(&["stats", "--pid", &sleeper.id().to_string()], "does not answer statistics requests");
    assert!(sleeper.try_wait().unwrap().is_none(), "the process is alive");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// `zapvm bench access` (a short run) writes its JSON, markdown table and plot, and its system
/// call counts show the table's hit path copying without a single system call while the syscall
/// path makes one per access (the bench itself fails when its counter counts nothing on the
/// syscall path, so a zero for the hit path is a zero that was seen).
#[test]
fn bench_access_writes_its_outputs_and_the_hit_path_makes_no_system_call() {
    let (_dir, out) = scratch("access");
    let o = zapvm(&["bench", "access", "--rounds", "3", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("access_vs_memcpy"), "{stdout}");
    let json = std::fs::read_to_string(out.join("access.json")).expect("access.json");
    let report: serde_json::Value = serde_json::from_str(&json).expect("access.json is JSON");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 6, "read and write of 16 B, 256 B, 4 KiB: {json}");
    for r in rows {
        for key in ["memcpy_ns", "direct_ns", "syscall_ns", "locked_memcpy_ns"] {
            let ns = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(ns.is_finite() && ns > 0.0, "{key} of {r}");
        }
    }
    assert_eq!(report["contention"]["failed_reads"], 0, "{json}");
    assert!(std::fs::read_to_string(out.join("access.svg")).expect("access.svg").starts_with("<svg"));
    assert!(std::fs::read_to_string(out.join("access.md")).expect("access.md").contains("| read | 256 |"));
    // The flat export holds the report's figures under stable names; the CSV the plotted rows.
    let flat = bench_files::read_flat(&out.join("access.flat.json"), "access");
    let direct = rows[2]["direct_ns"].as_f64().unwrap();
    let (op, bytes) = (rows[2]["op"].as_str().unwrap(), rows[2]["bytes"].as_u64().unwrap());
    let name = format!("access: rows[bytes={bytes},op={op}]/direct_ns");
    assert!(flat.contains(&(name.clone(), "ns".into(), direct)), "{name} = {direct} ns not in {flat:?}");
    assert!(flat.iter().any(|f| f.0 == "access: contention/miss_share" && f.1 == "ratio"), "{flat:?}");
    let csv = bench_files::read_csv(&out.join("access.csv"), rows.len());
    let csv_direct: Vec<f64> =
        bench_files::column(&csv, "direct_ns").iter().map(|c| c.parse().unwrap()).collect();
    let json_direct: Vec<f64> = rows.iter().map(|r| r["direct_ns"].as_f64().unwrap()).collect();
    assert_eq!(csv_direct, json_direct);
    assert_eq!(
        bench_files::column(&csv, "op"),
        rows.iter().map(|r| r["op"].as_str().unwrap()).collect::<Vec<_>>()
    );
    let counter = report["syscall_counter"].as_str().unwrap_or_default();
    if counter.starts_with("not counted") {
        return skip::skip("bench_access_writes_its_outputs_and_the_hit_path_makes_no_system_call", counter);
    }
    for r in rows {
        assert_eq!(
            r["direct_syscalls_per_access"].as_f64(),
            Some(0.0),
            "the hit path made a system call: {r}"
        );
        assert!(r["syscall_syscalls_per_access"].as_f64().unwrap_or(0.0) >= 1.0, "{r}");
    }
}

/// A `zapvm run` refused before any VM exists: the error line, and nothing on stdout (a VM that
/// ran would print its summary there).
fn assert_refused_before_the_vm(out: &Output, args: &[&str], needle: &str) {
    assert_output_refused(out, args, needle);
    assert_eq!(text(out).0, "", "{args:?}: no VM ran");
}

#[test]
fn bad_metrics_flags_are_refused_before_the_vm_starts() {
    let args = ["run", "--metrics-addr", "nonsense"];
    assert_refused_before_the_vm(&zapvm(&args), &args, "--metrics-addr \"nonsense\"");
    // A port in use (held by this test's listener).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args = ["run", "--metrics-addr", &addr];
    assert_refused_before_the_vm(&zapvm(&args), &args, &format!("cannot serve metrics on {addr}"));
    drop(taken);
    let args = ["run", "--metrics-file", "/nonexistent/dir/zapvm.prom"];
    assert_refused_before_the_vm(
        &zapvm(&args),
        &args,
        "cannot write the metrics file /nonexistent/dir/zapvm.prom",
    );
    let (_dir, path) = scratch("x.prom");
    let args = ["run", "--metrics-file", path.to_str().unwrap(), "--metrics-interval", "0"];
    assert_refused_before_the_vm(&zapvm(&args), &args, "--metrics-interval 0 is not");
}

#[test]
fn an_unwritable_metrics_directory_is_refused_before_the_vm_starts() {
    // A directory its user may not write to (as root: the child runs as `nobody`).
    let dir = scratch_dir("cli-metrics-ro");
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = ro.join("zapvm.prom");
    let args = ["run", "--metrics-file", file.to_str().unwrap()];
    let mut cmd = zapvm_in(dir.path());
    cmd.args(args);
    if nix_is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    assert_refused_before_the_vm(&out, &args, "Permission denied");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0, "the check leaves nothing behind");
}

#[test]
fn client_commands_refuse_an_api_socket_that_is_not_one() {
    let dir = scratch_dir("cli-api-socket");
    let missing = dir.path().join("missing.sock");
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    for command in
        [&["pause"][..], &["resume"], &["quit"], &["stats"], &["balloon", "stats"], &["mem", "state"]]
    {
        let mut args = command.to_vec();
        args.extend(["--api-socket", missing.to_str().unwrap()]);
        assert_refused(&args, "no such socket");
    }
    let args = ["balloon", "set", "8M", "--api-socket", file.to_str().unwrap()];
    assert_refused(&args, "is a regular file, not a VM's control socket");
    let args = ["mem", "set", "8M", "--api-socket", dir.path().to_str().unwrap()];
    assert_refused(&args, "is a directory");
}

/// `zapvm stress` naming no scenario runs every one of them (here with a small fixed amount of
/// work) and passes, rather than refusing to start.
#[test]
fn stress_without_a_scenario_runs_every_scenario() {
    let (_dir, json) = scratch("stress.json");
    let args =
        ["stress", "--passes", "1", "--targets", "1", "--ops", "1", "--json-out", json.to_str().unwrap()];
    let out = zapvm(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the report")).expect("JSON");
    let scenarios: Vec<&str> =
        report["scenarios"].as_array().expect("scenarios").iter().filter_map(|s| s.as_str()).collect();
    for s in ["discard", "external-chaos", "mprotect", "balloon", "virtio-mem"] {
        assert!(scenarios.contains(&s), "{s} not run: {scenarios:?}");
    }
    // The generator the seed drove, so that the seed can reproduce the run.
    assert!(
        report["rng"].as_str().is_some_and(|r| r.starts_with("rand 0.") && r.ends_with(" ChaCha8Rng")),
        "{report}"
    );
}

/// `--log-level` sets what is logged (here: trace and debug lines appear, which the default
/// `warn` hides), and a filter that does not parse is refused naming the flag.
#[test]
fn log_level_sets_the_filter_and_a_bad_one_is_refused() {
    let quiet = zapvm(&["run", "--timeout", "60"]);
    let loud = zapvm(&["--log-level", "trace", "run", "--timeout", "60"]);
    assert!(quiet.status.success() && loud.status.success());
    let (_, quiet_err) = text(&quiet);
    let (_, loud_err) = text(&loud);
    assert!(
        loud_err.lines().count() > quiet_err.lines().count(),
        "trace logs more than the default:\n{loud_err}"
    );
    assert!(loud_err.contains("TRACE") || loud_err.contains("DEBUG"), "{loud_err}");
    assert_refused(
        &["--log-level", "notifier=nonsense", "run"],
        "--log-level \"notifier=nonsense\" is not a log filter",
    );
}

#[test]
fn serial_goes_to_the_file_it_names_and_a_bad_one_is_refused_before_the_vm_starts() {
    let dir = scratch_dir("serial");
    let file = dir.path().join("console.txt");
    std::fs::write(&file, "an older run's output").unwrap();
    let arg = format!("file={}", file.display());
    let out = zapvm(&["run", "--mem", "32M", "--serial", &arg, "--timeout", "60"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    // The test guest says nothing on its UART: the file is the console's, truncated at start.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "", "the file was not the console's");
    let missing = dir.path().join("no/such/dir/console.txt");
    let out = zapvm(&["run", "--mem", "32M", "--serial", &format!("file={}", missing.display())]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("serial console") && stderr.contains("no/such/dir"), "{stderr}");
    for bad in ["file=", "tty", "FILE=x"] {
        let out = zapvm(&["run", "--serial", bad]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success() && stderr.contains("stdio, file=PATH or null"), "{bad}: {stderr}");
    }
}

/// `zapvm run --config FILE` (TOML or JSON, by extension) boots the VM the file describes, and an
/// option typed on the command line overrides the file's.
#[test]
fn config_file_describes_the_vm_and_the_command_line_overrides_it() {
    let dir = scratch_dir("cli-config");
    let toml = dir.path().join("vm.toml");
    std::fs::write(&toml, "mem = \"32M\"\nvcpus = 2\nworkload = \"verify\"\ntimeout = 60\nid = \"web\"\n")
        .unwrap();
    let json = dir.path().join("vm.json");
    std::fs::write(&json, r#"{"mem": "48M", "vcpus": 2, "workload": "verify", "timeout": 60, "json": true}"#)
        .unwrap();

    let out = zapvm(&["run", "--config", toml.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("zapvm: 32 MiB ") && stdout.contains("2 vCPU(s)"), "{stdout}");
    assert!(stdout.contains("workload Verify"), "{stdout}");
    assert!(stdout.contains("vCPU 0: verified") && stdout.contains("vCPU 1: verified"), "{stdout}");

    let out = zapvm(&["run", "--config", json.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("json = true: the report is JSON");
    assert_eq!(report["vcpus"].as_array().map(Vec::len), Some(2), "{report}");

    // Typed options win: one vCPU and 64 MiB, the rest (the workload) from the file.
    let out = zapvm(&["run", "--config", toml.to_str().unwrap(), "--vcpus", "1", "--mem", "64M"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("zapvm: 64 MiB ") && stdout.contains("1 vCPU(s)"), "{stdout}");
    assert!(stdout.contains("workload Verify") && !stdout.contains("vCPU 1:"), "{stdout}");
}

/// A config file's problems are one error line naming the file, exit status 1, before any VM.
#[test]
fn config_file_problems_are_refused_before_the_vm_starts() {
    let dir = scratch_dir("cli-config-bad");
    let cases: &[(&str, &str, &str)] = &[
        ("unknown.toml", "mem = \"32M\"\ncpus = 2\n", "unknown key \"cpus\""),
        ("snake.toml", "virtio_mem = \"256M\"\n", "did you mean \"virtio-mem\""),
        ("flag.toml", "thp = \"yes\"\n", "thp = \"yes\": a flag, give true or false"),
        ("value.json", r#"{"mem": true}"#, "mem = true: give a string or a number"),
        ("number.toml", "vcpus = \"two\"\n", "invalid value 'two' for '--vcpus"),
        ("enum.toml", "workload = \"nap\"\n", "invalid value 'nap' for '--workload"),
        ("syntax.toml", "vcpus = 2\nmem = \n", "not TOML: line 2"),
        ("syntax.json", "{\"vcpus\": 2,}", "not JSON"),
        ("list.json", "[]", "not a JSON object"),
        ("vm.yaml", "vcpus: 2\n", "give a .json or .toml file"),
    ];
    for (name, contents, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let args = ["run", "--config", path.to_str().unwrap()];
        let out = zapvm(&args);
        assert_refused_before_the_vm(&out, &args, needle);
        assert!(text(&out).1.contains(&format!("--config {}", path.display())), "{name}: names the file");
    }
    let missing = dir.path().join("missing.toml");
    let args = ["run", "--config", missing.to_str().unwrap()];
    assert_refused_before_the_vm(&zapvm(&args), &args, "cannot read it");
}

#[test]
fn a_control_socket_that_cannot_be_made_is_one_error_naming_it() {
    let dir = scratch_dir("bad-socket");
    let path = dir.path().join("no/such/dir/vm.sock");
    let out = zapvm(&["run", "--mem", "32M", "--api-socket", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.starts_with("zapvm: error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("control socket") && line.contains("no/such/dir/vm.sock"), "{line}");
}

/// `zapvm bench kick --runs 1` boots one VM with ioeventfds and one without, writes its JSON,
/// markdown table, plot and the plot's CSV, and its counters show what each row measured: with
/// ioeventfds no kick exited to the VMM (the bench fails otherwise, unless the host refused them
/// and the row says so), without them every kick did.
#[test]
fn bench_kick_measures_both_ways_to_the_device() {
    let (_dir, out) = scratch("kick");
    let o = zapvm(&["bench", "kick", "--runs", "1", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("kick_vs_exit"), "{stdout}");
    let json = std::fs::read_to_string(out.join("kick.json")).expect("kick.json");
    let report: serde_json::Value = serde_json::from_str(&json).expect("kick.json is JSON");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(
        rows.iter().map(|r| r["variant"].as_str().unwrap()).collect::<Vec<_>>(),
        ["ioeventfd", "exit"]
    );
    let kicks = report["kicks_per_round"].as_u64().unwrap() * report["rounds"].as_u64().unwrap();
    assert!(kicks > 0, "{json}");
    for r in rows {
        assert_eq!(r["kicks"].as_u64(), Some(kicks), "{r}");
        for key in ["kick_ns", "mmio_read_ns", "kick_vs_exit"] {
            let v = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{key} of {r}");
        }
    }
    assert_eq!(rows[1]["kicks_exit"].as_u64(), Some(kicks), "without ioeventfds every kick exits: {json}");
    assert_eq!(rows[1]["kicks_ioeventfd"].as_u64(), Some(0), "{json}");
    if rows[0]["ioeventfd_refused"].as_u64() == Some(0) {
        assert_eq!(rows[0]["kicks_exit"].as_u64(), Some(0), "with ioeventfds no kick exits: {json}");
        let signals = rows[0]["kicks_ioeventfd"].as_u64().unwrap();
        assert!(signals >= 1 && signals <= kicks, "{json}");
    }
    assert!(std::fs::read_to_string(out.join("kick.svg")).expect("kick.svg").starts_with("<svg"));
    assert!(std::fs::read_to_string(out.join("kick.md")).expect("kick.md").contains("| exit | 1 |"));
    let flat = bench_files::read_flat(&out.join("kick.flat.json"), "kick");
    let ratio = report["ioeventfd_vs_exit"].as_f64().unwrap();
    assert!(flat.contains(&("kick: ioeventfd_vs_exit".into(), "ratio".into(), ratio)), "{flat:?}");
    let rounds = report["rounds"].as_u64().unwrap() as usize;
    let csv = bench_files::read_csv(&out.join("kick.csv"), 2 * rounds);
    let csv_kicks: Vec<f64> =
        bench_files::column(&csv, "kick_ns").iter().map(|c| c.parse().unwrap()).collect();
    let json_kicks: Vec<f64> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["kick_ns"].as_array().unwrap().iter().map(|k| k.as_f64().unwrap()))
        .collect();
    assert_eq!(csv_kicks, json_kicks);
}
