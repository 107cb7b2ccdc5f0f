//! End-to-end: the control socket (QMP) of a running VM — negotiation, the balloon's target and
//! statistics, VM statistics, stop and cont, a malformed request that changes nothing, quit,
//! which ends the run, and the events of each, on the wire as a client sees them.

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

/// One request line; the next line that is not an event (events are collected in `events`).
fn ask(stream: &mut BufReader<UnixStream>, request: &str, events: &mut Vec<Value>) -> Value {
    stream.get_mut().write_all(format!("{request}\n").as_bytes()).unwrap();
    loop {
        let v = line(stream);
        if v.get("event").is_some() {
            events.push(v);
        } else {
            return v;
        }
    }
}

fn line(stream: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    stream.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}"))
}

#[test]
fn a_qmp_client_drives_balloon_stop_cont_and_quit_and_sees_their_events() {
    let dir = scratch_dir("control-api");
    let path = dir.path().join("vm.sock");
    let replies: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (log, socket, seen_by_client) = (replies.clone(), path.clone(), seen.clone());
    let hook = Arc::new(move |_vm: &Arc<VmControl>| {
        let (log, socket, seen) = (log.clone(), socket.clone(), seen_by_client.clone());
        std::thread::spawn(move || {
            let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
            log.lock().unwrap().push(("mode".into(), json!(mode & 0o777)));
            let mut s = BufReader::new(UnixStream::connect(&socket).unwrap());
            log.lock().unwrap().push(("greeting".into(), line(&mut s)));
            let mut events = Vec::new();
            for request in [
                r#"{"execute": "query-status", "id": 0}"#,
                r#"{"execute": "qmp_capabilities", "id": 1}"#,
                r#"{"execute": "balloon", "arguments": {"value": 1065353216}, "id": 2}"#,
                r#"{"execute": "__org.zapvm_query-balloon", "id": 3}"#,
                r#"{"execute": "stop", "id": 4}"#,
                r#"{"execute": "__org.zapvm_query-memory-layer", "id": 5}"#,
                r#"{"execute": "query-status", "id": 6}"#,
                r#"{"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", "value": 0}, "id": 7}"#,
                r#"this is not json"#,
                r#"{"execute": "cont", "id": 8}"#,
                r#"{"execute": "quit", "id": 9}"#,
            ] {
                let reply = ask(&mut s, request, &mut events);
                log.lock().unwrap().push((request.to_string(), reply));
            }
            // SHUTDOWN follows quit's reply.
            while !events.iter().any(|e| e["event"] == "SHUTDOWN") {
                events.push(line(&mut s));
            }
            *seen.lock().unwrap() = events;
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
    assert!(replies[1].1["QMP"]["version"]["qemu"]["major"].is_u64(), "{}", replies[1].1);
    assert_eq!(reply(0)["error"]["class"], "CommandNotFound", "nothing runs before negotiation");
    assert_eq!(reply(1)["return"], json!({}));
    assert_eq!(reply(2)["return"], json!({}));
    // The guest keeps 1 GiB - 8 MiB: the balloon's target is 8 MiB.
    assert_eq!(reply(3)["return"]["target_pages"], json!(2048), "{}", reply(3));
    assert_eq!(reply(4)["return"], json!({}));
    assert_eq!(reply(5)["return"]["paused"], true, "{}", reply(5));
    assert!(reply(5)["return"]["kvm"]["vm"]["pages_4k"].is_u64());
    assert_eq!(reply(6)["return"], json!({ "running": false, "status": "paused" }));
    assert_eq!(reply(7)["error"]["class"], "DeviceNotFound", "no virtio-mem device: {}", reply(7));
    let garbage = &replies.iter().find(|(q, _)| q.starts_with("this")).unwrap().1;
    assert_eq!(garbage["error"]["class"], "GenericError", "{garbage}");
    assert!(garbage.get("id").is_none());
    assert_eq!(reply(8)["return"], json!({}));
    assert_eq!(reply(9)["return"], json!({}));
    let events = seen.lock().unwrap();
    let names: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["STOP", "RESUME", "SHUTDOWN"], "{events:?}");
    assert_eq!(events[2]["data"], json!({ "guest": false, "reason": "host-qmp-quit" }));
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
