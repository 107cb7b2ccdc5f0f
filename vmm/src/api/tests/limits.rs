//! The server's time and work limits per client: a client that never negotiates is timed out,
//! the longest-idle client makes room when the table is full, and a burst of requests is
//! answered over several passes, completely and in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::super::server::{Limits, MAX_CLIENTS};
use super::{bind, scratch_dir, Client, Fake, Loop};

fn limits(handshake_ms: u64, idle_ms: u64, commands_per_pass: usize) -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(handshake_ms),
        idle_eviction: Duration::from_millis(idle_ms),
        commands_per_pass,
    }
}

/// Issue B8 (a): 16 connections that never speak no longer lock everyone out. With a short
/// handshake timeout, the 15 silent clients are told why and disconnected (the negotiated one
/// stays), and then a 17th is served. No sleep: each silent client's blocking read ends when the
/// server disconnects it (or the test fails on the read timeout).
#[test]
fn clients_that_never_negotiate_are_timed_out_and_make_room() {
    let scratch = scratch_dir("handshake");
    let path = scratch.path().join("vm.sock");
    let (server, _events) = bind(&path, Arc::new(Fake::default()));
    let server = server.with_limits(limits(300, 3_600_000, 64));
    let counters = server.counters();
    let event_loop = Loop::start(server);

    let mut negotiated = Client::negotiated(&path);
    let mut silent: Vec<Client> = (1..MAX_CLIENTS).map(|_| Client::connect(&path)).collect();
    // The table is full and nobody is idle long enough to be evicted: refused, and counted.
    let mut refused = Client::raw(&path);
    let r = refused.line();
    assert!(r["error"]["desc"].as_str().unwrap().contains("too many clients"), "{r}");
    assert!(refused.closed());
    assert_eq!(counters.refused.load(Ordering::SeqCst), 1);

    for client in &mut silent {
        let r = client.line();
        assert!(r["error"]["desc"].as_str().unwrap().contains("no qmp_capabilities within"), "{r}");
        assert!(client.closed(), "a client that never negotiated stays connected");
    }
    assert_eq!(counters.handshake_timeouts.load(Ordering::SeqCst), (MAX_CLIENTS - 1) as u64);
    // The 17th is served; the negotiated client was never timed out.
    let mut late = Client::negotiated(&path);
    assert_eq!(late.ask(r#"{"execute":"query-status","id":17}"#)["id"], 17);
    assert_eq!(negotiated.ask(r#"{"execute":"query-status","id":1}"#)["id"], 1);
    assert_eq!(counters.idle_evictions.load(Ordering::SeqCst), 0);
    drop(event_loop);
}

/// Issue B8 (a): when the table is full of negotiated clients that stopped speaking, a new
/// client takes the place of the longest-idle one (the first to negotiate), which is told why.
/// Polled with a deadline: connections are refused until the idle limit has passed.
#[test]
fn a_full_table_makes_room_by_evicting_the_longest_idle_client() {
    let scratch = scratch_dir("idle");
    let path = scratch.path().join("vm.sock");
    let (server, _events) = bind(&path, Arc::new(Fake::default()));
    let server = server.with_limits(limits(3_600_000, 200, 64));
    let counters = server.counters();
    let event_loop = Loop::start(server);

    let mut clients: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::negotiated(&path)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut newcomer = loop {
        let mut c = Client::raw(&path);
        let first = c.line();
        if first["QMP"].is_object() {
            break c;
        }
        assert!(first["error"]["desc"].as_str().unwrap().contains("too many clients"), "{first}");
        assert!(Instant::now() < deadline, "no idle client was ever evicted");
        std::thread::yield_now();
    };
    assert_eq!(newcomer.ask(r#"{"execute":"qmp_capabilities"}"#)["return"], json!({}));
    let r = clients[0].line();
    assert!(r["error"]["desc"].as_str().unwrap().contains("without a request"), "{r}");
    assert!(clients[0].closed(), "the longest-idle client was not the one evicted");
    assert_eq!(counters.idle_evictions.load(Ordering::SeqCst), 1);
    for c in &mut clients[1..] {
        assert_eq!(c.ask(r#"{"execute":"query-status"}"#)["return"]["running"], true);
    }
    assert_eq!(counters.handshake_timeouts.load(Ordering::SeqCst), 0);
    drop(event_loop);
}

/// Issue B8 (b): thousands of requests in one write are executed a pass's budget at a time
/// (the rest stays buffered), and every one is answered, in order. Without the budget the
/// whole read is executed in one pass and no pass is ever deferred.
#[test]
fn a_burst_of_requests_is_answered_completely_and_in_order_across_passes() {
    const REQUESTS: usize = 2500;
    const BUDGET: usize = 8;
    let scratch = scratch_dir("burst");
    let path = scratch.path().join("vm.sock");
    let (server, _events) = bind(&path, Arc::new(Fake::default()));
    let server = server.with_limits(limits(10_000, 60_000, BUDGET));
    let counters = server.counters();
    let event_loop = Loop::start(server);

    let mut burst = Client::negotiated(&path);
    let mut other = Client::negotiated(&path);
    let requests: String =
        (0..REQUESTS).map(|i| format!("{{\"execute\":\"query-status\",\"id\":{i}}}\n")).collect();
    let mut writer = burst.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut writer, requests.as_bytes()));
    // Another client is served while the burst is.
    assert_eq!(other.ask(r#"{"execute":"query-status","id":"other"}"#)["id"], "other");
    for i in 0..REQUESTS {
        let reply = burst.line();
        assert_eq!(reply["id"], i, "{reply}");
        assert_eq!(reply["return"]["running"], true, "{reply}");
    }
    sender.join().unwrap().unwrap();
    let deferred = counters.deferred.load(Ordering::SeqCst);
    assert!(deferred >= (REQUESTS / BUDGET / 2) as u64, "only {deferred} passes were deferred");
    assert_eq!(burst.ask(r#"{"execute":"query-status","id":"after"}"#)["id"], "after");
    drop(event_loop);
}
