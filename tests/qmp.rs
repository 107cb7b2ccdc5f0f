//! The control socket against real QMP clients: QEMU's own `qemu.qmp` library (the Python
//! client in `tests/python/qmp_client.py`) and the `zapvm` client commands the README shows,
//! each against a `zapvm run --workload serve` VM whose test-guest drivers follow the balloon
//! and virtio-mem targets.

#[path = "support/python.rs"]
mod python;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/skip.rs"]
mod skip;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

/// `zapvm run --workload serve` with `args`, killed and reaped when dropped.
struct Vm(Child);

impl Vm {
    fn serve(dir: &Path, args: &[&str]) -> Vm {
        let child = scratch::zapvm_in(dir)
            .args(["run", "--workload", "serve", "--mem", "256M", "--virtio-mem", "64M", "--timeout", "300"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("zapvm run starts");
        Vm(child)
    }

    /// Waits up to 60 s for the VM to end: its exit status and output.
    fn wait(mut self) -> Output {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "zapvm run did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qemus_qmp_library_drives_a_zapvm_vm() {
    let Some(py) = python::python("qemus_qmp_library_drives_a_zapvm_vm") else { return };
    let dir = scratch::scratch_dir("qmp-python");
    let socket = dir.path().join("vm.sock");
    let vm = Vm::serve(dir.path(), &["--api-socket", socket.to_str().unwrap()]);
    wait_socket(&socket);
    let out =
        Command::new(py).arg(python::script("qmp_client.py")).arg(&socket).output().expect("python runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qmp_client.py failed:\n{stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    let run = vm.wait();
    assert!(
        run.status.success(),
        "the VM did not end well after quit: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    assert!(seen["greeting_package"].as_str().unwrap().starts_with("zapvm"), "{seen}");
    assert_eq!(seen["status"]["status"], "running");
    let base = seen["base_memory"].as_u64().unwrap();
    assert_eq!(base, 256 * MIB);
    assert_eq!(seen["balloon_change"]["actual"], base - 64 * MIB);
    assert!(seen["balloon_timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(seen["query_balloon"]["actual"], base - 64 * MIB, "query-balloon agrees with the event");
    assert_eq!(seen["memory_device_change"]["id"], "vmem0");
    let device = &seen["memory_devices"][0];
    assert_eq!(device["type"], "virtio-mem");
    assert_eq!(device["data"]["size"], 32 * MIB);
    assert_eq!(device["data"]["requested-size"], 32 * MIB);
    let vm_stats = seen["stats_vm"][0]["stats"].as_array().unwrap();
    assert!(
        vm_stats.iter().any(|s| s["name"] == "pages_4k" && s["value"].as_u64().is_some()),
        "{vm_stats:?}"
    );
    let vcpus = seen["stats_vcpu"].as_array().unwrap();
    assert_eq!(vcpus.len(), 3, "one verifier, the balloon's and virtio-mem's drivers: {vcpus:?}");
    assert!(vcpus
        .iter()
        .all(|v| v["stats"][0]["name"] == "exits" && v["stats"][0]["value"].as_u64() > Some(0)));
    assert!(seen["schemas"].as_array().unwrap().iter().any(|s| s["target"] == "vcpu"));
    assert!(
        seen["guest_stats"]["stats"]["stat-total-memory"].as_i64().unwrap() > 0,
        "{}",
        seen["guest_stats"]
    );
    assert_eq!(seen["paused_status"], serde_json::json!({ "running": false, "status": "paused" }));
    assert_eq!(seen["unknown_command"], "CommandNotFound");
    assert_eq!(seen["shutdown"], serde_json::json!({ "guest": false, "reason": "host-qmp-quit" }));
    let events: Vec<&str> =
        seen["events_seen"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    for name in ["BALLOON_CHANGE", "MEMORY_DEVICE_SIZE_CHANGE", "STOP", "RESUME", "SHUTDOWN"] {
        assert!(events.contains(&name), "{name} never arrived: {events:?}");
    }
}

fn zapvm(dir: &Path, args: &[&str]) -> Value {
    let out = scratch::zapvm_in(dir).args(args).output().expect("zapvm runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "zapvm {args:?}\nstdout: {stdout}\nstderr: {stderr}");
    if stdout.trim().is_empty() {
        return Value::Null;
    }
    // `zapvm events` prints one JSON line per event.
    serde_json::from_str(&stdout).unwrap_or_else(|_| {
        Value::Array(stdout.lines().map(|l| serde_json::from_str(l).expect("an event line")).collect())
    })
}

/// Polls `zapvm ARGS` until `done` holds of its output (up to 120 s).
fn until(dir: &Path, args: &[&str], what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = zapvm(dir, args);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: last {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_readmes_control_commands_work_against_a_serve_vm_by_id_and_by_socket() {
    let dir = scratch::scratch_dir("qmp-cli");
    let d = dir.path();
    let vm = Vm::serve(d, &["--id", "demo"]);
    wait_socket(&d.join("zapvm-demo.sock"));
    let by_id = ["--id", "demo"];
    let with = |args: &[&'static str]| -> Vec<&'static str> { args.iter().copied().chain(by_id).collect() };

    let set = zapvm(d, &with(&["balloon", "set", "64M"]));
    assert_eq!(set["target_pages"], 64 * MIB / 4096, "{set}");
    until(d, &with(&["balloon", "stats"]), "the guest's driver reaches the balloon target", |v| {
        v["actual_pages"] == 64 * MIB / 4096
    });
    assert_eq!(zapvm(d, &with(&["qmp", "query-balloon"]))["actual"], 192 * MIB);
    zapvm(d, &with(&["mem", "set", "32M"]));
    let state = until(d, &with(&["mem", "state"]), "the guest's driver plugs 32 MiB", |v| {
        v["plugged_size"] == 32 * MIB
    });
    assert_eq!(state["requested_size"], 32 * MIB);
    zapvm(d, &with(&["pause"]));
    let stats = zapvm(d, &with(&["stats"]));
    assert_eq!(stats["paused"], true, "{stats}");
    assert!(stats["time"].is_string() && stats["kvm"]["vm"]["pages_4k"].is_u64(), "{stats}");
    zapvm(d, &with(&["resume"]));
    assert_eq!(zapvm(d, &with(&["qmp", "query-status"]))["status"], "running");

    // The same VM by its socket's path; and the events of a change, followed by `zapvm events`.
    let socket = d.join("zapvm-demo.sock");
    let by_socket = ["--api-socket", socket.to_str().unwrap()];
    let events = std::thread::scope(|s| {
        let follower =
            s.spawn(|| zapvm(d, &["events", "--count", "5", "--timeout", "120", by_socket[0], by_socket[1]]));
        // The follower is connected once it is past negotiation; changes made before that are
        // missed, so change the size until the follower reports.
        let mut size = 0u64;
        while !follower.is_finished() {
            size = if size == 2 * MIB { 4 * MIB } else { 2 * MIB };
            let arg = format!("{}M", size / MIB);
            let out =
                scratch::zapvm_in(d).args(["mem", "set", &arg, by_socket[0], by_socket[1]]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(500));
        }
        follower.join().unwrap()
    });
    // The balloon's driver may still report its own changes: the resizes' events are among the
    // first five.
    let events = events.as_array().expect("five event lines");
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| e["timestamp"]["seconds"].is_u64()), "{events:?}");
    assert!(events.iter().any(|e| e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"), "{events:?}");
    zapvm(d, &["quit", by_socket[0], by_socket[1]]);
    let run = vm.wait();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!socket.exists(), "the VM removed its socket");
}

#[test]
fn hostile_is_refused_where_no_driver_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_zapvm"))
        .args(["run", "--workload", "touch", "--hostile"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--workload serve"), "{stderr}");
}
