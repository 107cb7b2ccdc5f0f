//! The control socket against a fake VM: the protocol, the commands, the server and the client.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Value};

use super::client::{find_socket_in_for_tests as find_socket_in, named_socket_path};
use super::commands::{StatsGroup, COMMANDS};
use super::events::name;
use super::protocol::Reply;
use super::server::{MAX_CLIENTS, MAX_PENDING_OUTPUT};
use super::*;
use crate::kvm_stats::{StatBase, StatDesc, StatKind, StatUnit};

/// A VM that records what it is asked.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    no_balloon: bool,
    paused: AtomicBool,
    panic_on_stats: bool,
}

impl Fake {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

fn stat(name: &str, kind: StatKind, unit: StatUnit) -> StatDesc {
    StatDesc {
        name: name.into(),
        kind,
        unit,
        base: StatBase::Pow10,
        exponent: if unit == StatUnit::Seconds { -9 } else { 0 },
        size: if kind.is_histogram() { 3 } else { 1 },
        offset: 0,
        bucket_size: if kind == StatKind::LinearHist { 8 } else { 0 },
        flags: 0,
    }
}

impl VmHandle for Fake {
    fn status(&self) -> RunStatus {
        if self.paused.load(Ordering::SeqCst) {
            RunStatus::Paused
        } else {
            RunStatus::Running
        }
    }
    fn stop(&self) -> Result<(), QmpError> {
        self.record("stop".into());
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn cont(&self) -> Result<(), QmpError> {
        self.record("cont".into());
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn quit(&self) -> Result<(), QmpError> {
        self.record("quit".into());
        Ok(())
    }
    fn base_memory(&self) -> u64 {
        1 << 30
    }
    fn set_balloon_target(&self, pages: u32) -> Result<(), QmpError> {
        if self.no_balloon {
            return Err(QmpError::device_not_active("No balloon device has been activated"));
        }
        self.record(format!("balloon {pages}"));
        Ok(())
    }
    fn balloon_actual(&self) -> Result<u32, QmpError> {
        Ok(256)
    }
    fn balloon_guest_stats(&self) -> Result<(Vec<(String, u64)>, u64), QmpError> {
        Ok((vec![("free_memory".into(), 4096), ("tag_99".into(), 1)], 1_800_000_000))
    }
    fn balloon_details(&self) -> Result<Value, QmpError> {
        Ok(json!({ "target_pages": 0 }))
    }
    fn memory_devices(&self) -> Vec<VirtioMemInfo> {
        vec![VirtioMemInfo {
            id: "vmem0".into(),
            memaddr: 1 << 32,
            requested_size: 0,
            size: 2 << 20,
            max_size: 128 << 20,
            block_size: 2 << 20,
            node: 0,
        }]
    }
    fn set_requested_size(&self, id: &str, bytes: u64) -> Result<(), QmpError> {
        if !bytes.is_multiple_of(2 << 20) {
            return Err(QmpError::generic("not whole blocks"));
        }
        self.record(format!("requested-size {id} {bytes}"));
        Ok(())
    }
    fn virtio_mem_details(&self) -> Result<Value, QmpError> {
        Ok(json!({ "plugged_size": 0 }))
    }
    fn kvm_stats(&self) -> Result<Vec<StatsGroup>, QmpError> {
        let vm = vec![
            (stat("pages_4k", StatKind::Instant, StatUnit::None), vec![7]),
            (stat("remote_tlb_flush", StatKind::Cumulative, StatUnit::None), vec![3]),
        ];
        let vcpu = |i: u64| StatsGroup {
            vcpu: Some(i as usize),
            stats: vec![
                (stat("exits", StatKind::Cumulative, StatUnit::None), vec![100 + i]),
                (stat("halt_wait_hist", StatKind::LogHist, StatUnit::Seconds), vec![1, 2, 3]),
                (stat("guest_mode", StatKind::Instant, StatUnit::Boolean), vec![1]),
                (stat("halt_poll_hist", StatKind::LinearHist, StatUnit::Seconds), vec![0, 0, 1]),
            ],
        };
        Ok(vec![StatsGroup { vcpu: None, stats: vm }, vcpu(0), vcpu(1)])
    }
    fn memory_layer(&self) -> Result<Value, QmpError> {
        if self.panic_on_stats {
            panic!("planted");
        }
        self.record("memory-layer".into());
        Ok(json!({ "paused": self.paused.load(Ordering::SeqCst) }))
    }
}

fn reply(line: &str) -> Reply {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("reply {line:?} is not a QMP reply: {e}"))
}

/// A negotiated session.
fn session(fake: &Fake) -> Session {
    let mut s = Session::new();
    assert_eq!(
        reply(&handle_line(&mut s, br#"{"execute":"qmp_capabilities"}"#, fake)).into_result(),
        Ok(json!({}))
    );
    s
}

fn ok(fake: &Fake, line: &str) -> Value {
    let mut s = session(fake);
    reply(&handle_line(&mut s, line.as_bytes(), fake)).into_result().unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn err(fake: &Fake, line: &[u8]) -> QmpError {
    let mut s = session(fake);
    let text = handle_line(&mut s, line, fake);
    reply(&text).into_result().expect_err(&text)
}

#[test]
fn commands_before_negotiation_are_refused_and_negotiation_happens_once() {
    let fake = Fake::default();
    let mut s = Session::new();
    let r = reply(&handle_line(&mut s, br#"{"execute":"quit","id":1}"#, &fake));
    assert_eq!(r.id, Some(json!(1)));
    let e = r.into_result().unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert!(e.desc.contains("qmp_capabilities"), "{e}");
    assert!(fake.calls().is_empty(), "nothing ran before negotiation");
    let e = reply(&handle_line(
        &mut s,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
        &fake,
    ))
    .into_result()
    .unwrap_err();
    assert_eq!((e.class, e.desc.contains("oob")), (ErrorClass::GenericError, true), "{e}");
    assert!(!s.negotiated(), "a refused capability leaves negotiation open");
    assert!(reply(&handle_line(
        &mut s,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#,
        &fake
    ))
    .into_result()
    .is_ok());
    assert!(s.negotiated());
    let e =
        reply(&handle_line(&mut s, br#"{"execute":"qmp_capabilities"}"#, &fake)).into_result().unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert!(reply(&handle_line(&mut s, br#"{"execute":"quit"}"#, &fake)).into_result().is_ok());
    assert_eq!(fake.calls(), ["quit"]);
}

#[test]
fn every_command_reaches_the_vm_with_qemus_shapes() {
    let fake = Fake::default();
    assert_eq!(ok(&fake, r#"{"execute":"query-status"}"#), json!({ "running": true, "status": "running" }));
    assert_eq!(ok(&fake, r#"{"execute":"stop"}"#), json!({}));
    assert_eq!(ok(&fake, r#"{"execute":"query-status"}"#), json!({ "running": false, "status": "paused" }));
    assert_eq!(ok(&fake, r#"{"execute":"cont"}"#), json!({}));
    // balloon: `value` is what the guest keeps; the balloon takes the rest of 1 GiB.
    ok(&fake, r#"{"execute":"balloon","arguments":{"value":805306368}}"#);
    ok(&fake, r#"{"execute":"balloon","arguments":{"value":1073741824000}}"#); // clamped: empty balloon
    ok(&fake, r#"{"execute":"balloon","arguments":{"value":1073737729}}"#); // a partial page: taken whole
    assert_eq!(ok(&fake, r#"{"execute":"query-balloon"}"#), json!({ "actual": (1u64 << 30) - (256 << 12) }));
    assert_eq!(
        ok(&fake, r#"{"execute":"query-memory-size-summary"}"#),
        json!({ "base-memory": 1u64 << 30, "plugged-memory": 2u64 << 20 })
    );
    let devices = ok(&fake, r#"{"execute":"query-memory-devices"}"#);
    assert_eq!(devices[0]["type"], "virtio-mem");
    assert_eq!(devices[0]["data"]["max-size"], json!(128u64 << 20));
    assert_eq!(devices[0]["data"]["block-size"], json!(2u64 << 20));
    ok(
        &fake,
        r#"{"execute":"qom-set","arguments":{"path":"/machine/peripheral/vmem0","property":"requested-size","value":4194304}}"#,
    );
    ok(&fake, r#"{"execute":"qom-set","arguments":{"path":"vmem0","property":"requested-size","value":0}}"#);
    assert_eq!(
        ok(&fake, r#"{"execute":"qom-get","arguments":{"path":"vmem0","property":"size"}}"#),
        json!(2u64 << 20)
    );
    let stats = ok(
        &fake,
        r#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}"#,
    );
    assert_eq!(stats["stats"]["stat-free-memory"], 4096);
    assert_eq!(stats["stats"]["stat-swap-in"], -1, "a stat the guest did not report reads -1, as in QEMU");
    assert_eq!(stats["last-update"], 1_800_000_000u64);
    assert_eq!(ok(&fake, r#"{"execute":"__org.zapvm_query-balloon"}"#), json!({ "target_pages": 0 }));
    assert_eq!(ok(&fake, r#"{"execute":"__org.zapvm_query-virtio-mem"}"#), json!({ "plugged_size": 0 }));
    assert_eq!(ok(&fake, r#"{"execute":"__org.zapvm_query-memory-layer"}"#), json!({ "paused": false }));
    assert_eq!(ok(&fake, r#"{"execute":"quit"}"#), json!({}));
    assert_eq!(
        fake.calls(),
        [
            "stop",
            "cont",
            "balloon 65536",
            "balloon 0",
            "balloon 1",
            "requested-size vmem0 4194304",
            "requested-size vmem0 0",
            "memory-layer",
            "quit"
        ]
    );
    let version = ok(&fake, r#"{"execute":"query-version"}"#);
    assert!(version["qemu"]["major"].is_u64() && version["package"].as_str().unwrap().starts_with("zapvm"));
    let names: Vec<Value> = COMMANDS.iter().map(|c| json!({ "name": c.name })).collect();
    assert_eq!(ok(&fake, r#"{"execute":"query-commands"}"#), Value::Array(names));
}

#[test]
fn every_listed_command_is_dispatched() {
    // query-commands answers from the table: each name in it must reach a handler, not the
    // fallback "has not been found".
    let fake = Fake::default();
    for c in COMMANDS.iter().filter(|c| c.name != "qmp_capabilities") {
        let mut s = session(&fake);
        let mut arguments = serde_json::Map::new();
        for a in c.args.iter().filter(|a| a.required) {
            let v = match a.name {
                "value" if c.name == "balloon" => json!(1 << 29),
                "value" => json!(0),
                "path" => json!("vmem0"),
                "property" if c.name == "qom-get" => json!("size"),
                "property" => json!("requested-size"),
                "target" => json!("vm"),
                other => panic!("no sample for {}.{other}", c.name),
            };
            arguments.insert(a.name.into(), v);
        }
        let line = json!({ "execute": c.name, "arguments": arguments }).to_string();
        let r = reply(&handle_line(&mut s, line.as_bytes(), &fake));
        assert!(r.error.is_none(), "{}: {:?}", c.name, r.error);
    }
}

#[test]
fn kvm_statistics_come_in_qemus_query_stats_shapes() {
    let fake = Fake::default();
    let vm = ok(&fake, r#"{"execute":"query-stats","arguments":{"target":"vm"}}"#);
    assert_eq!(
        vm,
        json!([{ "provider": "kvm", "stats": [{ "name": "pages_4k", "value": 7 }, { "name": "remote_tlb_flush", "value": 3 }] }])
    );
    let vcpus = ok(&fake, r#"{"execute":"query-stats","arguments":{"target":"vcpu"}}"#);
    assert_eq!(vcpus.as_array().unwrap().len(), 2);
    assert_eq!(vcpus[1]["qom-path"], "/machine/unattached/device[1]");
    assert_eq!(vcpus[1]["stats"][0], json!({ "name": "exits", "value": 101 }));
    assert_eq!(vcpus[1]["stats"][1], json!({ "name": "halt_wait_hist", "value": [1, 2, 3] }));
    assert_eq!(vcpus[1]["stats"][2], json!({ "name": "guest_mode", "value": true }));
    let one = ok(
        &fake,
        r#"{"execute":"query-stats","arguments":{"target":"vcpu","vcpus":["/machine/unattached/device[0]"],"providers":[{"provider":"kvm","names":["exits"]}]}}"#,
    );
    assert_eq!(
        one,
        json!([{ "provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [{ "name": "exits", "value": 100 }] }])
    );
    assert_eq!(
        ok(
            &fake,
            r#"{"execute":"query-stats","arguments":{"target":"vm","providers":[{"provider":"cryptodev"}]}}"#
        ),
        json!([])
    );
    let schemas = ok(&fake, r#"{"execute":"query-stats-schemas"}"#);
    assert_eq!(schemas[0]["target"], "vm");
    assert_eq!(
        schemas[0]["stats"][0],
        json!({ "name": "pages_4k", "type": "instant", "base": 10, "exponent": 0 })
    );
    let vcpu = &schemas[1]["stats"];
    assert_eq!(schemas[1]["target"], "vcpu");
    assert_eq!(
        vcpu[1],
        json!({ "name": "halt_wait_hist", "type": "log2-histogram", "unit": "seconds", "base": 10, "exponent": -9 })
    );
    assert_eq!(vcpu[3]["type"], "linear-histogram");
    assert_eq!(vcpu[3]["bucket-size"], 8);
    for bad in [
        br#"{"execute":"query-stats","arguments":{"target":"moon"}}"#.as_slice(),
        br#"{"execute":"query-stats","arguments":{"target":"vm","vcpus":[]}}"#,
        br#"{"execute":"query-stats","arguments":{"target":"vm","providers":[{"provider":"x"}]}}"#,
        br#"{"execute":"query-stats","arguments":{"target":"vm","providers":[{"names":[]}]}}"#,
        br#"{"execute":"query-stats","arguments":{"target":"vm","providers":[{"provider":"kvm","names":[1]}]}}"#,
        br#"{"execute":"query-stats","arguments":{"target":"vm","providers":[{"provider":"kvm","extra":1}]}}"#,
        br#"{"execute":"query-stats-schemas","arguments":{"provider":"x"}}"#,
    ] {
        assert_eq!(err(&fake, bad).class, ErrorClass::GenericError, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn malformed_requests_get_errors_and_change_nothing() {
    let fake = Fake::default();
    let generic: &[&[u8]] = &[
        b"hello",
        b"[1,2]",
        b"42",
        b"\"quit\"",
        b"{",
        b"{\"execute\":\"quit\"",
        b"{\"execute\":7}",
        b"{\"arguments\":{}}",
        b"{\"execute\":\"quit\",\"execute\":\"stop\"}",
        b"{\"execute\":\"quit\",\"frob\":1}",
        b"{\"exec-oob\":\"quit\"}",
        b"{\"execute\":\"quit\",\"arguments\":[]}",
        b"{\"execute\":\"quit\",\"arguments\":{\"now\":true}}",
        b"{\"execute\":\"balloon\"}",
        b"{\"execute\":\"balloon\",\"arguments\":{\"value\":\"1G\"}}",
        b"{\"execute\":\"balloon\",\"arguments\":{\"value\":1.5}}",
        b"{\"execute\":\"balloon\",\"arguments\":{\"value\":0}}",
        b"{\"execute\":\"balloon\",\"arguments\":{\"value\":-4096}}",
        b"{\"execute\":\"balloon\",\"arguments\":{\"value\":1,\"value\":2}}",
        b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"vmem0\",\"property\":\"requested-size\",\"value\":-1}}",
        b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"vmem0\",\"property\":\"requested-size\",\"value\":\"1G\"}}",
        b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"vmem0\",\"property\":\"requested-size\",\"value\":3}}",
        b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"vmem0\",\"property\":\"size\",\"value\":0}}",
        b"{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"balloon0\",\"property\":\"frob\"}}",
        b"{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"vmem0\"}}",
        b"{\"execute\":\"quit\"}\xff",
        b"\x00\x00",
        b"   ",
    ];
    for line in generic {
        let e = err(&fake, line);
        assert_eq!(e.class, ErrorClass::GenericError, "{}: {e}", String::from_utf8_lossy(line));
    }
    assert_eq!(err(&fake, br#"{"execute":"frobnicate"}"#).class, ErrorClass::CommandNotFound);
    assert_eq!(
        err(&fake, br#"{"execute":"qom-get","arguments":{"path":"/machine/x","property":"size"}}"#).class,
        ErrorClass::DeviceNotFound
    );
    let long = format!("{{\"execute\":\"quit\",\"id\":\"{}\"}}", "x".repeat(MAX_LINE));
    assert_eq!(err(&fake, long.as_bytes()).class, ErrorClass::GenericError);
    let no_balloon = Fake { no_balloon: true, ..Fake::default() };
    assert_eq!(
        err(&no_balloon, br#"{"execute":"balloon","arguments":{"value":4096}}"#).class,
        ErrorClass::DeviceNotActive
    );
    // Only the well-formed set of a bad size reached the VM, and was refused there.
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[test]
fn ids_are_echoed_exactly_and_only_when_read() {
    let fake = Fake::default();
    let mut s = session(&fake);
    for id in [json!(1), json!("a"), json!({ "x": [1, null] }), json!(0.1), json!(-1e300), json!(null)] {
        for execute in ["query-status", "nope"] {
            let line = json!({ "execute": execute, "id": id }).to_string();
            let text = handle_line(&mut s, line.as_bytes(), &fake);
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["id"], id, "{text}");
            assert!(text.contains("\"id\""), "{text}");
        }
    }
    let text = handle_line(&mut s, b"not json", &fake);
    assert!(!serde_json::from_str::<Value>(&text).unwrap().as_object().unwrap().contains_key("id"), "{text}");
    let text = handle_line(&mut s, br#"{"execute":"query-status"}"#, &fake);
    assert!(!text.contains("\"id\""), "{text}");
}

#[test]
fn a_panicking_vm_call_is_an_error_reply() {
    let fake = Fake { panic_on_stats: true, ..Fake::default() };
    let e = err(&fake, br#"{"execute":"__org.zapvm_query-memory-layer"}"#);
    assert_eq!(e.class, ErrorClass::GenericError);
    assert!(ok(&fake, r#"{"execute":"query-status"}"#)["running"].as_bool().unwrap());
}

// ---------------------------------------------------------------------------------------------
// The server on an event loop

fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("zapvm-api-test-{name}-")).tempdir().unwrap()
}

/// An event loop on a thread serving `server` until the returned guard is dropped.
struct Loop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn start(server: ApiServer) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // The same subscriber type as the VMM's event loop.
            let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                EventManager::new().unwrap();
            manager.add_subscriber(Arc::new(Mutex::new(server)));
            while !flag.load(Ordering::SeqCst) {
                manager.run_with_timeout(20).unwrap();
            }
        });
        Loop { stop, thread: Some(thread) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// A raw line client.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connected and past the greeting.
    fn connect(path: &Path) -> Client {
        let mut c = Client::raw(path);
        let greeting = c.line();
        assert!(greeting["QMP"]["capabilities"].is_array(), "{greeting}");
        c
    }
    /// Connected and negotiated.
    fn negotiated(path: &Path) -> Client {
        let mut c = Client::connect(path);
        assert_eq!(c.ask(r#"{"execute":"qmp_capabilities"}"#)["return"], json!({}));
        c
    }
    fn raw(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { stream, buf: Vec::new() }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }
    fn line(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    fn ask(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.line()
    }
    /// Whether the server closed the connection (after any pending output).
    fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn bind(path: &Path, fake: Arc<Fake>) -> (ApiServer, Arc<EventQueue>) {
    let events = Arc::new(EventQueue::new().unwrap());
    (ApiServer::bind(path, fake, events.clone()).unwrap(), events)
}

#[test]
fn the_server_greets_negotiates_answers_and_sends_events() {
    let scratch = scratch_dir("server");
    let dir = scratch.path().to_path_buf();
    let path = dir.join("vm.sock");
    let fake = Arc::new(Fake::default());
    let (server, events) = bind(&path, fake.clone());
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing is left of the staging directory");
    let event_loop = Loop::start(server);

    let mut a = Client::negotiated(&path);
    let mut b = Client::connect(&path); // greeted, never negotiates
    assert_eq!(a.ask(r#"{"execute":"query-status","id":1}"#)["id"], 1);
    assert_eq!(b.ask(r#"{"execute":"query-status","id":"b"}"#)["error"]["class"], "CommandNotFound");

    // A line in two writes, another client served meanwhile.
    a.send(br#"{"execute":"ball"#);
    std::thread::sleep(Duration::from_millis(50));
    assert!(b.ask(r#"{"execute":"query-version"}"#)["error"].is_object());
    a.send(b"oon\",\"arguments\":{\"value\":536870912},\"id\":2}\n");
    assert_eq!(a.line(), json!({ "return": {}, "id": 2 }));

    // Events reach the negotiated client only, in order, between replies.
    events.emit(name::STOP, None);
    events.emit_state(name::BALLOON_CHANGE, "balloon0", json!({ "actual": 5 }));
    let stop = a.line();
    assert_eq!(stop["event"], "STOP");
    assert!(stop["timestamp"]["seconds"].is_u64());
    assert_eq!(a.line()["data"]["actual"], 5);
    assert_eq!(b.ask(r#"{"execute":"quit","id":3}"#)["id"], 3, "b saw no event before its reply");

    // Malformed input: an error each, the connection goes on.
    assert_eq!(a.ask("garbage")["error"]["class"], "GenericError");
    a.send(b"{\"execute\":\"query-status\xff\"}\n");
    assert_eq!(a.line()["error"]["class"], "GenericError");
    let mut long = b"{\"execute\":\"query-status\",\"pad\":\"".to_vec();
    long.resize(1 << 20, b'x');
    a.send(&long);
    a.send(b"\"}\n");
    let e = a.line();
    assert!(e["error"]["desc"].as_str().unwrap().contains("longer than"), "{e}");
    // Pipelined, with blank lines between: answered in order.
    a.send(b"{\"id\":10,\"execute\":\"query-status\"}\n\n{\"id\":11,\"execute\":\"nope\"}\n{\"id\":12,\"execute\":\"query-version\"}\n");
    assert_eq!(a.line()["id"], 10);
    assert_eq!(a.line()["id"], 11);
    assert_eq!(a.line()["id"], 12);

    // A last request without its newline, then EOF: answered, then closed.
    let mut c = Client::negotiated(&path);
    c.send(br#"{"id":"eof","execute":"query-status"}"#);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.line()["id"], "eof");
    assert!(c.closed());

    // The library client: events that arrive before a reply are kept.
    let mut q = QmpClient::connect(&path, Duration::from_secs(10)).unwrap();
    assert!(q.greeting()["QMP"]["version"]["qemu"].is_object());
    assert_eq!(q.execute("stop", Value::Null).unwrap(), json!({}));
    events.emit(name::RESUME, None);
    assert_eq!(q.next_event(Duration::from_secs(10)).unwrap().unwrap()["event"], "RESUME");
    assert!(q.next_event(Duration::from_millis(50)).unwrap().is_none());
    match q.execute("qom-set", json!({ "path": "vmem0", "property": "requested-size", "value": 3 })) {
        Err(ClientError::Qmp(e)) => assert_eq!(e.class, ErrorClass::GenericError),
        other => panic!("{other:?}"),
    }
    assert_eq!(call(&path, "cont", Value::Null).unwrap(), json!({}));
    let calls = fake.calls();
    assert_eq!(calls, ["balloon 131072", "stop", "cont"], "b's quit never ran");

    drop(event_loop);
    assert!(!path.exists(), "the socket file is removed with the server");
}

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Negotiates `client` while running `manager`'s turns on this thread (nothing else runs it).
fn negotiate_by_hand(manager: &mut Manager, client: &mut Client) {
    client.send(b"{\"execute\":\"qmp_capabilities\"}\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    client.stream.set_nonblocking(true).unwrap();
    while seen.iter().filter(|&&b| b == b'\n').count() < 2 {
        manager.run_with_timeout(10).unwrap();
        let mut chunk = [0u8; 4096];
        if let Ok(n) = client.stream.read(&mut chunk) {
            seen.extend_from_slice(&chunk[..n]);
        }
        assert!(Instant::now() < deadline, "no greeting and reply: {:?}", String::from_utf8_lossy(&seen));
    }
    client.stream.set_nonblocking(false).unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("\"return\""), "{:?}", String::from_utf8_lossy(&seen));
}

#[test]
fn a_client_that_never_reads_its_events_is_disconnected() {
    // The loop runs here, turn by turn: every event is delivered (or the client dropped) before
    // the client reads anything.
    let scratch = scratch_dir("deaf");
    let path = scratch.path().join("vm.sock");
    let (server, events) = bind(&path, Arc::new(Fake::default()));
    let mut manager: Manager = EventManager::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(server)));
    let mut deaf = Client::raw(&path);
    negotiate_by_hand(&mut manager, &mut deaf);
    let data = json!({ "pad": "x".repeat(4000) });
    let count = 2 * MAX_PENDING_OUTPUT / 4000;
    for i in 0..count {
        events.emit(name::EXTERNAL_TEARDOWN, Some(data.clone()));
        if i % 64 == 0 {
            manager.run_with_timeout(0).unwrap();
        }
    }
    manager.run_with_timeout(0).unwrap();
    assert_eq!(events.dropped(), 0, "the queue kept every event for the server");
    // Now read: the connection ends (EOF) before all events arrived.
    let mut read = 0usize;
    let mut chunk = [0u8; 65536];
    loop {
        match deaf.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the client that does not read ({read} bytes read): {e}"),
        }
    }
    assert!(read < count * 4000, "every event arrived: the client was never dropped ({read} bytes)");
    drop(manager);
}

#[test]
fn the_last_events_are_written_when_the_server_goes() {
    // The VM's SHUTDOWN is emitted after the event loop's last turn: only the server's drop can
    // deliver it. The loop runs here, turn by turn, so that no turn can deliver it first.
    let scratch = scratch_dir("shutdown");
    let path = scratch.path().join("vm.sock");
    let (server, events) = bind(&path, Arc::new(Fake::default()));
    let mut manager: Manager = EventManager::new().unwrap();
    manager.add_subscriber(Arc::new(Mutex::new(server)));
    let mut a = Client::raw(&path);
    let mut b = Client::raw(&path); // never negotiates: gets no event
    negotiate_by_hand(&mut manager, &mut a);
    events.emit(name::SHUTDOWN, Some(events::shutdown_data(true, "guest-shutdown")));
    drop(manager);
    let shutdown = a.line();
    assert_eq!(shutdown["event"], "SHUTDOWN", "{shutdown}");
    assert_eq!(shutdown["data"], json!({ "guest": true, "reason": "guest-shutdown" }));
    assert!(a.closed(), "the server's drop closes its clients");
    assert!(b.line()["QMP"].is_object());
    assert!(b.closed(), "the unnegotiated client got its greeting and no event");
}

#[test]
fn the_server_bounds_clients_and_their_output() {
    let scratch = scratch_dir("bounds");
    let path = scratch.path().join("vm.sock");
    let fake = Arc::new(Fake::default());
    let (server, _events) = bind(&path, fake.clone());
    let event_loop = Loop::start(server);

    // A client that sends requests but never reads: disconnected once its replies pile up.
    let mut hog = Client::negotiated(&path);
    hog.stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let requests = "{\"execute\":\"query-commands\"}\n".repeat(1000);
    let mut dropped = false;
    for _ in 0..100 {
        if hog.stream.write_all(requests.as_bytes()).is_err() {
            dropped = true;
            break;
        }
    }
    assert!(dropped || hog.closed(), "a client that never reads its replies stays connected");

    // At most MAX_CLIENTS at once; the next one is told so and disconnected.
    let mut clients: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::negotiated(&path)).collect();
    let mut extra = Client::raw(&path);
    let r = extra.line();
    assert!(r["error"]["desc"].as_str().unwrap().contains("too many clients"), "{r}");
    assert!(extra.closed());
    // Once one leaves, another may come.
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while QmpClient::connect(&path, Duration::from_secs(2)).is_err() {
        assert!(Instant::now() < deadline, "the departed client's slot is never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(clients[0].ask(r#"{"execute":"query-status"}"#)["return"]["running"], true);
    assert!(fake.calls().is_empty());
    drop(event_loop);
}

#[test]
fn stale_sockets_are_replaced_and_live_ones_refused() {
    let scratch = scratch_dir("stale");
    let dir = scratch.path().to_path_buf();
    let path = dir.join("vm.sock");
    let fake = Arc::new(Fake::default());
    let bind_again = |p: &Path| ApiServer::bind(p, fake.clone(), Arc::new(EventQueue::new().unwrap()));

    drop(UnixListener::bind(&path).unwrap());
    let server = bind_again(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let e = bind_again(&path).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    assert!(!path.exists());

    let other = UnixListener::bind(&path).unwrap();
    assert_eq!(bind_again(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
    drop(other);
    std::fs::remove_file(&path).unwrap();

    std::fs::write(&path, b"precious").unwrap();
    assert!(bind_again(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    let server = bind_again(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let replacement = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(path.exists(), "a server whose file was replaced leaves the replacement");
    drop(replacement);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no staging directory is left behind");
}

#[test]
fn sockets_are_found_by_pid_by_id_or_alone_and_stale_ones_removed() {
    let scratch = scratch_dir("find");
    let dir = scratch.path().to_path_buf();
    let dirs = [dir.clone()];
    let me = std::process::id();
    let dead = 4_000_000_000u32; // above any pid_max
    assert!(matches!(find_socket_in(&dirs, &Target::Only), Err(ClientError::NotFound(_))));

    let path = dir.join(format!("zapvm-{me}.sock"));
    let (server, _) = bind(&path, Arc::new(Fake::default()));
    let dead_socket = dir.join(format!("zapvm-{dead}.sock"));
    let reused_socket = dir.join("zapvm-1.sock");
    let gone_named = dir.join("zapvm-gone.sock");
    drop(UnixListener::bind(&dead_socket).unwrap());
    drop(UnixListener::bind(&reused_socket).unwrap());
    drop(UnixListener::bind(&gone_named).unwrap());
    drop(UnixListener::bind(dir.join("zapvm-_bad.sock")).unwrap()); // not a pid nor an id
    std::fs::write(dir.join(format!("zapvm-{}.sock", u32::MAX - 1)), b"not a socket").unwrap();
    assert_eq!(find_socket_in(&dirs, &Target::Only).unwrap(), path);
    assert!(
        !dead_socket.exists() && !reused_socket.exists() && !gone_named.exists(),
        "stale sockets are removed"
    );
    assert!(
        dir.join("zapvm-_bad.sock").exists() && dir.join(format!("zapvm-{}.sock", u32::MAX - 1)).exists()
    );
    assert_eq!(find_socket_in(&dirs, &Target::Pid(me)).unwrap(), path);
    drop(UnixListener::bind(&dead_socket).unwrap());
    let e = find_socket_in(&dirs, &Target::Pid(dead)).unwrap_err().to_string();
    assert!(e.contains("no process") && e.contains("was removed"), "{e}");
    drop(UnixListener::bind(&reused_socket).unwrap());
    let e = find_socket_in(&dirs, &Target::Pid(1)).unwrap_err().to_string();
    assert!(e.contains("process 1 has no live control socket") && e.contains("was removed"), "{e}");

    // A named VM: found by its id; two live VMs are ambiguous.
    let named = dir.join("zapvm-web-1.sock");
    let (second, _) = bind(&named, Arc::new(Fake::default()));
    assert_eq!(find_socket_in(&dirs, &Target::Id("web-1".into())).unwrap(), named);
    let e = find_socket_in(&dirs, &Target::Only).unwrap_err().to_string();
    assert!(e.contains("--pid or --id") && e.contains("web-1"), "{e}");
    let e = find_socket_in(&dirs, &Target::Id("nope".into())).unwrap_err().to_string();
    assert!(e.contains("no running VM has the id"), "{e}");
    assert!(find_socket_in(&dirs, &Target::Id("../etc".into())).is_err(), "an id is never a path");
    drop((server, second));

    assert!(client::default_socket_path(42).ends_with("zapvm-42.sock"));
    assert!(named_socket_path("db").ends_with("zapvm-db.sock"));
    for bad in ["", "1abc", "a/b", "a b", &"x".repeat(65)] {
        assert!(client::check_vm_id(bad).is_err(), "{bad:?}");
    }
    client::check_vm_id("web-1.prod_a").unwrap();
}

#[test]
fn the_client_times_out_and_says_why() {
    let scratch = scratch_dir("timeout");
    let dir = scratch.path().to_path_buf();
    let path = dir.join("mute.sock");
    let _mute = UnixListener::bind(&path).unwrap();
    // A listener that never greets: the client gives up (had it not, the test would hang,
    // which the runner's timeout reports).
    let e = QmpClient::connect(&path, Duration::from_millis(100)).err().unwrap();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(matches!(
        QmpClient::connect(&dir.join("absent.sock"), Duration::from_secs(1)),
        Err(ClientError::Connect { .. })
    ));
}

/// The server's time and work limits per client (idle clients, handshake deadline, commands
/// per pass).
mod limits;
