//! QMP's asynchronous events of a VM, from the parts that see them happen to the control
//! socket's clients.
//!
//! Data flows one way: the parts of the VM (the balloon when the guest changes `actual`,
//! virtio-mem when its plugged size changes, the machine when it stops, resumes or shuts
//! down) [`EventQueue::emit`] on whatever thread they run; the control socket's server, on the
//! VMM's event loop, is woken through [`EventQueue::fd`], [`EventQueue::drain`]s the queue and
//! writes each event to every client that completed capabilities negotiation.
//!
//! The queue is bounded ([`MAX_QUEUED`]): a state event (`BALLOON_CHANGE`, a device's
//! `MEMORY_DEVICE_SIZE_CHANGE`) not yet delivered is replaced by a newer one of the same kind
//! and device (a client wants the current state, as QEMU's event throttling gives it), and
//! when the queue is full the oldest event is dropped and counted ([`EventQueue::dropped`]).
//! Nothing ever waits on a client.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::event_line;

/// Most events waiting for the server.
pub const MAX_QUEUED: usize = 1024;

/// The event names zapvm emits. QEMU's names where QEMU has the event; zapvm's own carry QMP's
/// prefix for downstream extensions ([`super::DOWNSTREAM_PREFIX`]).
pub mod name {
    /// The VM stopped (`stop`).
    pub const STOP: &str = "STOP";
    /// The VM runs again (`cont`).
    pub const RESUME: &str = "RESUME";
    /// The VM is ending (`quit`, or the guest ended).
    pub const SHUTDOWN: &str = "SHUTDOWN";
    /// The guest changed the balloon's actual size (`data.actual`: the guest's memory in bytes).
    pub const BALLOON_CHANGE: &str = "BALLOON_CHANGE";
    /// A memory device's plugged size changed (`data`: `id`, `size`, `qom-path`).
    pub const MEMORY_DEVICE_SIZE_CHANGE: &str = "MEMORY_DEVICE_SIZE_CHANGE";
    /// Code outside the VMM tore down guest RAM and the VMM handled it (`data`: `kind`,
    /// `gpa`, `length`, `action`).
    pub const EXTERNAL_TEARDOWN: &str = "__org.zapvm_EXTERNAL_TEARDOWN";
}

struct Pending {
    name: &'static str,
    /// Events with the same key replace each other while queued (`None`: never replaced).
    key: Option<String>,
    data: Option<Value>,
    at: SystemTime,
}

/// The events of one VM on their way to its control socket (see the module docs).
pub struct EventQueue {
    queue: Mutex<VecDeque<Pending>>,
    wake: EventFd,
    emitted: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("emitted", &self.emitted())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventQueue {
            queue: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            emitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues event `name` with `data`, happening now. Never blocks on a client: the lock is
    /// held only to push.
    pub fn emit(&self, name: &'static str, data: Option<Value>) {
        self.push(name, None, data);
    }

    /// Queues a state event: one still queued with the same `name` and `key` is replaced (its
    /// place kept, its data and time updated).
    pub fn emit_state(&self, name: &'static str, key: impl Into<String>, data: Value) {
        self.push(name, Some(key.into()), Some(data));
    }

    fn push(&self, name: &'static str, key: Option<String>, data: Option<Value>) {
        let at = SystemTime::now();
        self.emitted.fetch_add(1, Ordering::Relaxed);
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(same) = key
                .as_ref()
                .and_then(|k| queue.iter_mut().find(|p| p.name == name && p.key.as_ref() == Some(k)))
            {
                same.data = data;
                same.at = at;
            } else {
                if queue.len() >= MAX_QUEUED {
                    queue.pop_front();
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                queue.push_back(Pending { name, key, data, at });
            }
        }
        // An eventfd counter only saturates after 2^64 - 2 writes; a failed write leaves the
        // event queued for the next wake-up.
        let _ = self.wake.write(1);
    }

    /// Takes every queued event, oldest first, as event lines (without `\n`).
    pub fn drain(&self) -> Vec<String> {
        let _ = self.wake.read();
        let pending: Vec<Pending> = self.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        pending.iter().map(|p| event_line(p.name, p.data.as_ref(), p.at)).collect()
    }

    /// The eventfd that is readable while events are queued (for the server's event loop).
    pub fn fd(&self) -> &EventFd {
        &self.wake
    }

    /// Events emitted so far.
    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The data of a `SHUTDOWN` event: whether the guest asked for it, and QEMU's reason name.
pub fn shutdown_data(guest: bool, reason: &str) -> Value {
    json!({ "guest": guest, "reason": reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(lines: Vec<String>) -> Vec<Value> {
        lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn events_come_out_in_order_with_their_timestamps() {
        let q = EventQueue::new().unwrap();
        q.emit(name::STOP, None);
        q.emit(name::SHUTDOWN, Some(shutdown_data(false, "host-qmp-quit")));
        let events = parsed(q.drain());
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["event"], "STOP");
        assert!(events[0].get("data").is_none());
        assert_eq!(events[1]["data"], json!({ "guest": false, "reason": "host-qmp-quit" }));
        let seconds = events[1]["timestamp"]["seconds"].as_u64().unwrap();
        assert!(seconds > 1_700_000_000, "{}", events[1]);
        assert!(events[1]["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn a_queued_state_event_is_replaced_by_the_newer_one() {
        let q = EventQueue::new().unwrap();
        q.emit_state(name::BALLOON_CHANGE, "balloon0", json!({ "actual": 1 }));
        q.emit(name::STOP, None);
        q.emit_state(name::BALLOON_CHANGE, "balloon0", json!({ "actual": 2 }));
        q.emit_state(name::MEMORY_DEVICE_SIZE_CHANGE, "vmem0", json!({ "size": 3 }));
        let events = parsed(q.drain());
        let names: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(names, ["BALLOON_CHANGE", "STOP", "MEMORY_DEVICE_SIZE_CHANGE"]);
        assert_eq!(events[0]["data"]["actual"], 2, "the newer state, in the older one's place");
        assert_eq!(q.emitted(), 4);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts_it() {
        let q = EventQueue::new().unwrap();
        for _ in 0..MAX_QUEUED + 3 {
            q.emit(name::STOP, None);
        }
        q.emit(name::RESUME, None);
        let events = parsed(q.drain());
        assert_eq!(events.len(), MAX_QUEUED);
        assert_eq!(events.last().unwrap()["event"], "RESUME");
        assert_eq!(q.dropped(), 4);
    }
}
