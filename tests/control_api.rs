//! End-to-end: the control API of a running VM over its Unix socket — balloon target and
//! statistics, VM statistics, pause and resume, a malformed request that changes nothing, and
//! quit, which ends the run.

#[path = "support/scratch.rs"]
mod scratch;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_abi::Workload;
use serde_json::{json, Value};
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, Console, VmConfig, VmControl, VmOutcome};
use vmm::memory::MemoryConfig;

use scratch::scratch_dir;

/// One request line, one reply line.
fn ask(stream: &mut BufReader<UnixStream>, request: &str) -> Value {
    stream.get_mut().write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
}

#[test]
fn a_client_drives_balloon_pause_resume_and_quit() {
    let dir = scratch_dir("control-api");
    let path = dir.path().join("vm.sock");
    let replies: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let log = replies.clone();
    let socket = path.clone();
    let hook = Arc::new(move |_vm: &Arc<VmControl>| {
        let (log, socket) = (log.clone(), socket.clone());
        std::thread::spawn(move || {
            let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
            log.lock().unwrap().push(("mode".into(), json!(mode & 0o777)));
            let mut s = BufReader::new(UnixStream::connect(&socket).unwrap());
            for request in [
                r#"{"id": 1, "op": "ping"}"#,
                r#"{"id": 2, "op": "balloon-set", "size": "8M"}"#,
                r#"{"id": 3, "op": "balloon-stats"}"#,
                r#"{"id": 4, "op": "pause"}"#,
                r#"{"id": 5, "op": "stats"}"#,
                r#"{"id": 6, "op": "balloon-set", "size": "64G"}"#,
                r#"{"id": 7, "op": "mem-set", "size": "64M"}"#,
                r#"this is not json"#,
                r#"{"id": 8, "op": "resume"}"#,
                r#"{"id": 9, "op": "quit"}"#,
            ] {
                let reply = ask(&mut s, request);
                log.lock().unwrap().push((request.to_string(), reply));
            }
        });
    });
    let config = VmConfig {
        memory: MemoryConfig {
            size: 1 << 30,
            ..VmConfig::test_guest(TestGuestParams::new(Workload::Touch)).memory
        },
        timeout: Some(Duration::from_secs(60)),
        console: Console::Null,
        api_socket: Some(path.clone()),
        after_start: Some(hook),
        ..VmConfig::test_guest(TestGuestParams::new(Workload::Touch))
    };
    let report = run(&config).expect("the VM starts");
    let replies = replies.lock().unwrap();
    let reply = |id: u64| {
        &replies
            .iter()
            .find(|(_, r)| r["id"] == json!(id))
            .unwrap_or_else(|| panic!("no reply {id}: {replies:#?}"))
            .1
    };
    assert_eq!(replies[0].1, json!(0o600), "the socket is its owner's only");
    assert_eq!(reply(1)["ok"], true);
    assert_eq!(reply(2)["result"]["target_pages"], json!(2048));
    assert_eq!(reply(3)["result"]["target_pages"], json!(2048), "{}", reply(3));
    assert_eq!(reply(4)["ok"], true, "{}", reply(4));
    assert_eq!(reply(5)["result"]["paused"], true, "{}", reply(5));
    assert!(reply(5)["result"]["kvm"]["vm"]["pages_4k"].is_u64());
    assert_eq!(reply(6)["error"]["kind"], "bad-argument", "a balloon larger than RAM: {}", reply(6));
    assert_eq!(reply(7)["error"]["kind"], "unavailable", "{}", reply(7));
    let garbage = &replies.iter().find(|(q, _)| q.starts_with("this")).unwrap().1;
    assert_eq!(garbage["error"]["kind"], "bad-request", "{garbage}");
    assert_eq!(reply(8)["ok"], true);
    assert_eq!(reply(9)["ok"], true);
    assert_eq!(report.outcome, VmOutcome::Quit, "{report:#?}");
    assert!(!path.exists(), "the socket is removed when the VM ends");
}

#[test]
fn the_balloon_polls_the_guests_statistics_at_its_interval() {
    // The Balloon workload's driver answers every statistics request; with a 100 ms interval the
    // device must see several updates without anyone asking by hand.
    let updates: Arc<Mutex<u64>> = Arc::default();
    let seen = updates.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (vm, seen) = (vm.clone(), seen.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let balloon = vm.balloon().cloned().expect("a balloon");
            loop {
                let n = balloon.lock().unwrap().device().stats().guest_stats_updates;
                *seen.lock().unwrap() = n;
                if n >= 4 || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            vm.quit();
        });
    });
    let config = VmConfig {
        memory: MemoryConfig {
            size: 64 << 20,
            ..VmConfig::test_guest(TestGuestParams::new(Workload::Balloon)).memory
        },
        timeout: Some(Duration::from_secs(90)),
        console: Console::Null,
        balloon_stats_interval: Some(Duration::from_millis(100)),
        after_start: Some(hook),
        ..VmConfig::test_guest(TestGuestParams::new(Workload::Balloon))
    };
    let report = run(&config).expect("the VM starts");
    assert_eq!(report.outcome, VmOutcome::Quit, "{report:#?}");
    assert!(*updates.lock().unwrap() >= 4, "statistics updates: {}", updates.lock().unwrap());
}
