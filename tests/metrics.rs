//! End-to-end: the Prometheus exporter of `zapvm run`. `--metrics-addr` serves `/metrics` to
//! concurrent scrapers while the VM runs (404 elsewhere) and stops with the VM; the text passes
//! the Prometheus project's own parser (`tests/python/parse_metrics.py`, which also refuses a
//! planted malformed exposition); a discard moves the notifier's and the table's series;
//! `--metrics-file` is replaced whole at its interval and written once more at the end; the
//! client commands reach a VM by `--api-socket PATH`.

#[path = "support/python.rs"]
mod python;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::Workload;
use serde_json::Value;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{run, Console, VmConfig, VmControl, VmOutcome};
use vmm::memory::MemoryConfig;
use vmm::metrics::{Exporter, MetricsConfig};

use scratch::{scratch_dir, zapvm_in};

/// `GET path` over HTTP/1.0: (status, headers, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head.to_string(), body.to_string()))
}

/// The parser's view of `text` ({"families": [...]}), or its complaint.
fn parse(py: &Path, text: &str) -> Result<Value, String> {
    let mut child = Command::new(py)
        .arg(python::script("parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the script prints JSON"))
}

/// The samples named `sample` whose labels include every pair of `labels`.
fn samples<'a>(parsed: &'a Value, sample: &str, labels: &[(&str, &str)]) -> Vec<&'a Value> {
    parsed["families"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .filter(|s| s["name"] == sample && labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .collect()
}

/// The one sample named `sample` with `labels`, as a number.
fn value(parsed: &Value, sample: &str, labels: &[(&str, &str)]) -> f64 {
    match samples(parsed, sample, labels).as_slice() {
        [s] => s["value"].as_f64().unwrap_or_else(|| panic!("{sample}: {s}")),
        other => panic!("{sample}{labels:?}: want one sample, found {other:?}"),
    }
}

/// The family `name`'s type.
fn family_type<'a>(parsed: &'a Value, name: &str) -> &'a str {
    parsed["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"))["type"]
        .as_str()
        .unwrap()
}

/// Waits up to `limit` for `done()`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `zapvm run` in `dir` with `args`, its stderr read by a thread (lines kept), killed and
/// reaped when dropped.
struct Vm {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let mut child = zapvm_in(dir)
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("zapvm run starts");
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let (pipe, lines) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, stderr }
    }

    /// The address of "zapvm: metrics at http://ADDR/metrics" on its stderr, once printed.
    fn metrics_addr(&mut self) -> SocketAddr {
        let mut addr = None;
        wait_for("the metrics address on stderr", Duration::from_secs(60), || {
            addr = self.stderr.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("zapvm: metrics at http://")?.strip_suffix("/metrics")?.parse().ok()
            });
            addr.is_some() || self.child.try_wait().unwrap().is_some()
        });
        addr.unwrap_or_else(|| panic!("zapvm ended without serving: {:?}", self.stderr.lock().unwrap()))
    }

    /// Waits (up to 60 s) for it to exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        wait_for("zapvm run to exit", Duration::from_secs(60), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(dir: &Path, args: &[&str]) -> Output {
    zapvm_in(dir).args(args).output().expect("zapvm runs")
}

fn assert_ok(out: &Output, what: &str) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{what}\nstdout: {stdout}\nstderr: {stderr}");
    stdout
}

/// Waits for the socket at `path` to appear.
fn wait_socket(path: &Path) {
    wait_for(&format!("{} to appear", path.display()), Duration::from_secs(60), || path.exists());
}

#[test]
fn the_parser_refuses_a_planted_malformed_exposition() {
    let Some(py) = python::python("the_parser_refuses_a_planted_malformed_exposition") else { return };
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{vm=\"1\"} 3\n";
    parse(&py, good).expect("a well-formed exposition parses");
    for bad in [
        "# TYPE a_total counter\na_total{vm=\"1} 3\n", // unterminated label value
        "# TYPE a_total counter\na_total{vm=\"1\"} three\n", // not a number
        "# TYPE a gauge\na 1\n# TYPE a gauge\na 2\n",  // a family declared twice
        "b 1\n",                                       // no type
        "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 3\nh_count 3\nh_sum 1\n",
    ] {
        assert!(parse(&py, bad).is_err(), "the parser took {bad:?}");
    }
}

#[test]
fn metrics_are_served_to_concurrent_scrapers_and_a_client_reaches_the_vm_by_api_socket() {
    let Some(py) = python::python("metrics_are_served_to_concurrent_scrapers") else { return };
    let dir = scratch_dir("metrics-http");
    let sock = dir.path().join("vm.sock");
    let sock_arg = sock.to_str().unwrap();
    // Touch over 2 GiB takes seconds; paused at once, it runs until told to quit.
    let mut vm = Vm::start(
        dir.path(),
        &[
            "--workload",
            "touch",
            "--mem",
            "2G",
            "--timeout",
            "120",
            "--api-socket",
            sock_arg,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = vm.metrics_addr();
    wait_socket(&sock);
    assert_ok(&client(dir.path(), &["pause", "--api-socket", sock_arg]), "pause --api-socket");

    let scrapes: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || (0..3).map(|_| get(addr, "/metrics").unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let scrapes: Vec<_> = scrapes.into_iter().flat_map(|t| t.join().unwrap()).collect();
    for (status, head, _) in &scrapes {
        assert_eq!(*status, 200, "{head}");
        assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    }
    let (status, _, _) = get(addr, "/nope").unwrap();
    assert_eq!(status, 404, "a bad path");

    let pid = vm.child.id().to_string();
    let vm_label = [("vm", pid.as_str())];
    let parsed = parse(&py, &scrapes.last().unwrap().2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&parsed, "zapvm_paused", &vm_label), 1.0);
    assert_eq!(family_type(&parsed, "zapvm_kvm_vcpu_exits"), "counter");
    assert!(value(&parsed, "zapvm_kvm_vcpu_exits_total", &[("vm", &pid), ("vcpu", "0")]) > 0.0);
    assert_eq!(family_type(&parsed, "zapvm_kvm_vm_pages_4k"), "gauge");
    assert!(value(&parsed, "zapvm_kvm_vm_pages_4k", &vm_label) > 0.0, "the guest touched pages");
    let hist = parsed["families"].as_array().unwrap().iter().find(|f| f["type"] == "histogram");
    assert!(
        hist.is_some_and(|h| h["name"].as_str().unwrap().starts_with("zapvm_kvm_vcpu_")),
        "a KVM histogram"
    );
    assert_eq!(family_type(&parsed, "zapvm_notifier_starts"), "counter");
    let discard_vmm = [("vm", pid.as_str()), ("kind", "discard"), ("origin", "vmm")];
    value(&parsed, "zapvm_notifier_bytes_total", &discard_vmm);
    value(&parsed, "zapvm_table_misses_total", &vm_label);
    value(&parsed, "zapvm_balloon_target_pages", &vm_label);
    value(&parsed, "zapvm_virtio_transport_notifies_total", &[("vm", &pid), ("device", "balloon")]);
    value(&parsed, "zapvm_monitor_events_total", &vm_label);
    value(&parsed, "zapvm_external_teardown_events_total", &vm_label);

    // The other client commands by --api-socket too; `stats` is the same sample as JSON.
    let stats = assert_ok(&client(dir.path(), &["stats", "--api-socket", sock_arg]), "stats --api-socket");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["pid"].to_string(), pid);
    assert_eq!(stats["paused"], true);
    assert_ok(
        &client(dir.path(), &["balloon", "stats", "--api-socket", sock_arg]),
        "balloon stats --api-socket",
    );
    assert_ok(&client(dir.path(), &["quit", "--api-socket", sock_arg]), "quit --api-socket");
    assert!(vm.wait().success(), "a quit VM exits 0: {:?}", vm.stderr.lock().unwrap());
    assert!(TcpStream::connect(addr).is_err(), "nothing listens once the VM is gone");
}

#[test]
fn a_discard_moves_the_notifier_and_table_series_in_the_final_metrics_file() {
    let Some(py) = python::python("a_discard_moves_the_notifier_and_table_series") else { return };
    let dir = scratch_dir("metrics-discard");
    let mut runs = Vec::new();
    for workload in ["discard-verify", "verify"] {
        let file = dir.path().join(format!("{workload}.prom"));
        let mut vm = Vm::start(
            dir.path(),
            &[
                "--workload",
                workload,
                "--timeout",
                "60",
                "--no-api",
                "--metrics-file",
                file.to_str().unwrap(),
            ],
        );
        assert!(vm.wait().success(), "{workload}: {:?}", vm.stderr.lock().unwrap());
        let pid = vm.child.id().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        runs.push((workload, pid, parse(&py, &text).unwrap_or_else(|e| panic!("{workload}: {e}"))));
    }
    for (workload, pid, parsed) in &runs {
        let discard_vmm = [("vm", pid.as_str()), ("kind", "discard"), ("origin", "vmm")];
        let starts = value(parsed, "zapvm_notifier_starts_total", &discard_vmm);
        let ends = value(parsed, "zapvm_notifier_ends_total", &discard_vmm);
        let bytes = value(parsed, "zapvm_notifier_bytes_total", &discard_vmm);
        let torn = value(parsed, "zapvm_table_torn_down_total", &[("vm", pid.as_str()), ("kind", "discard")]);
        let rendezvous = value(parsed, "zapvm_rendezvous_discards_total", &[("vm", pid.as_str())]);
        if *workload == "discard-verify" {
            assert!(starts > 0.0 && ends == starts, "{workload}: starts {starts}, ends {ends}");
            assert!(bytes >= 4096.0 * starts, "{workload}: {bytes} bytes for {starts} discards");
            assert!(torn > 0.0, "{workload}: the table's entries in the discarded ranges went");
            assert!(rendezvous > 0.0, "{workload}");
        } else {
            assert_eq!((starts, bytes, torn, rendezvous), (0.0, 0.0, 0.0, 0.0), "{workload}: no discard");
        }
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
}

#[test]
fn the_metrics_file_is_replaced_whole_at_its_interval() {
    let Some(py) = python::python("the_metrics_file_is_replaced_whole_at_its_interval") else { return };
    let dir = scratch_dir("metrics-file");
    let (sock, file) = (dir.path().join("vm.sock"), dir.path().join("zapvm.prom"));
    let sock_arg = sock.to_str().unwrap();
    let mut vm = Vm::start(
        dir.path(),
        &[
            "--workload",
            "touch",
            "--mem",
            "2G",
            "--timeout",
            "120",
            "--api-socket",
            sock_arg,
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-interval",
            "0.05",
        ],
    );
    wait_socket(&sock);
    assert_ok(&client(dir.path(), &["pause", "--api-socket", sock_arg]), "pause");
    // Readers see one whole file after another (a new inode each time), never a part of one.
    let mut seen: Vec<(u64, String)> = Vec::new();
    wait_for("five replacements of the metrics file", Duration::from_secs(60), || {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let ino = std::fs::metadata(&file).map(|m| m.ino()).unwrap_or(0);
            if seen.last().is_none_or(|(i, _)| *i != ino) {
                seen.push((ino, text));
            }
        }
        seen.len() >= 5
    });
    let families: Vec<usize> = seen
        .iter()
        .map(|(_, text)| {
            let parsed = parse(&py, text).unwrap_or_else(|e| panic!("a read of the file: {e}"));
            parsed["families"].as_array().unwrap().len()
        })
        .collect();
    assert!(
        families.iter().all(|&n| n == families[0] && n > 50),
        "every read is a whole exposition: {families:?}"
    );
    assert_ok(&client(dir.path(), &["resume", "--api-socket", sock_arg]), "resume");
    assert_ok(&client(dir.path(), &["quit", "--api-socket", sock_arg]), "quit");
    assert!(vm.wait().success(), "{:?}", vm.stderr.lock().unwrap());
    // A write came after the resume (the last one, at the end, after the vCPUs stopped; that the
    // end's write happens at all is shown by the discard test, whose runs end within the interval).
    let last = parse(&py, &std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(value(&last, "zapvm_paused", &[("vm", &vm.child.id().to_string())]), 0.0);
    let names: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(names, [file], "no temporary file and no socket are left");
}

/// A small test-guest VM (its Balloon workload runs until told to quit) exporting through
/// `exporter`, with `hook` run once it started.
fn balloon_vm(exporter: &Exporter, hook: vmm::machine::AfterStart) -> VmConfig {
    VmConfig {
        memory: MemoryConfig {
            size: 64 << 20,
            ..VmConfig::test_guest(TestGuestParams::new(Workload::Balloon)).memory
        },
        timeout: Some(Duration::from_secs(90)),
        console: Console::Null,
        after_start: Some(hook),
        metrics: Some(exporter.clone()),
        ..VmConfig::test_guest(TestGuestParams::new(Workload::Balloon))
    }
}

#[test]
fn the_server_stops_with_the_vm_and_serves_one_vm_only() {
    let exporter = Exporter::new(MetricsConfig {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        file: None,
        interval: Duration::from_secs(10),
        vm_id: "lib-test".into(),
    })
    .unwrap();
    let addr = exporter.local_addr().expect("it listens");
    let seen: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let log = seen.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (vm, log) = (vm.clone(), log.clone());
        std::thread::spawn(move || {
            for path in ["/metrics", "/metrics?x=1", "/"] {
                let (status, _, body) = get(addr, path).unwrap();
                log.lock().unwrap().push((status, body));
            }
            vm.quit();
        });
    });
    let config = balloon_vm(&exporter, hook);
    let report = run(&config).expect("the VM starts");
    assert_eq!(report.outcome, VmOutcome::Quit, "{report:#?}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [200, 200, 404]);
    assert!(seen[0].1.contains("zapvm_uptime_seconds{vm=\"lib-test\"}"), "{}", seen[0].1);
    // tiny_http's accept thread closes the listener right after the server is dropped.
    wait_for("the listener to close", Duration::from_secs(10), || TcpStream::connect(addr).is_err());
    let again = run(&config).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(again.contains("already serves a VM"), "a second VM on one exporter: {again:?}");
}

/// A client that sends many requests and never reads the answers (the socket buffers fill and
/// the workers block writing) does not hold the VM's stop: the run ends within the server's
/// grace period after `quit`.
#[test]
fn a_client_that_does_not_read_cannot_hold_the_vm_stop() {
    use std::io::Write;
    let exporter = Exporter::new(MetricsConfig {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        file: None,
        interval: Duration::from_secs(10),
        vm_id: "stuck-client".into(),
    })
    .unwrap();
    let addr = exporter.local_addr().expect("it listens");
    let quit_at: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
    let mark = quit_at.clone();
    let hook = Arc::new(move |vm: &Arc<VmControl>| {
        let (vm, mark) = (vm.clone(), mark.clone());
        std::thread::spawn(move || {
            // Pipelined requests, never read: each answer is several KiB, so a few hundred
            // fill both sockets' buffers and the workers block in their writes.
            let mut stuck = Vec::new();
            for _ in 0..2 {
                let mut c = TcpStream::connect(addr).unwrap();
                let burst = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(400);
                let _ = c.write_all(burst.as_bytes());
                stuck.push(c);
            }
            std::thread::sleep(Duration::from_secs(1)); // let the workers block (not a measurement)
            *mark.lock().unwrap() = Some(std::time::Instant::now());
            vm.quit();
            std::thread::sleep(Duration::from_secs(30)); // keep the clients open past the stop
            drop(stuck);
        });
    });
    let config = balloon_vm(&exporter, hook);
    let report = run(&config).expect("the VM starts");
    let took = quit_at.lock().unwrap().expect("quit was asked").elapsed();
    assert_eq!(report.outcome, VmOutcome::Quit, "{report:#?}");
    // Generous: the grace period plus the VM's own stop; a stop held by the client would last
    // the client's 30 s.
    assert!(took < Duration::from_secs(20), "the stop took {took:?}");
}
