//! The control socket of a running VM: QMP, the QEMU Machine Protocol, on a Unix socket.
//!
//! zapvm speaks QMP as its specification defines it, so QEMU's own clients (`qemu.qmp`,
//! `qmp-shell`) and anything written for them drive a zapvm VM:
//!
//! ```text
//! <- {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "zapvm 0.1.0"}, "capabilities": []}}
//! -> {"execute": "qmp_capabilities"}
//! <- {"return": {}}
//! -> {"execute": "balloon", "arguments": {"value": 134217728}, "id": 1}
//! <- {"return": {}, "id": 1}
//! <- {"event": "BALLOON_CHANGE", "data": {"actual": 134217728}, "timestamp": {"seconds": 1796230000, "microseconds": 1234}}
//! -> {"execute": "frobnicate"}
//! <- {"error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"}}
//! ```
//!
//! One JSON object per line each way. Every request gets exactly one reply, in order, its `id`
//! (any JSON) echoed; events arrive between replies, only after negotiation. Until
//! `qmp_capabilities` succeeded every other command is refused (`CommandNotFound`), as the
//! specification requires. A malformed request (not JSON, not an object, not UTF-8, longer
//! than [`MAX_LINE`], duplicate members, an unknown member, unknown or wrong-typed arguments)
//! gets a `GenericError` and changes nothing; the connection and the VM go on.
//!
//! # Rooms
//!
//! - [`protocol`]: the wire format (greeting, requests, replies, events, errors);
//! - [`commands`]: the commands, their arguments, the negotiation state, and [`VmHandle`], what
//!   a VM offers them ([`handle_line`] is one request line to one reply line: what the server,
//!   the tests and the fuzzers use);
//! - [`events`]: the VM's asynchronous events on their way to the clients;
//! - [`server`]: the socket, an event-manager subscriber on the VMM's event loop;
//! - [`client`]: finding a VM's socket, and a QMP client for the `zapvm` commands.

pub mod client;
pub mod commands;
pub mod events;
pub mod protocol;
pub mod server;

pub use client::{call, find_socket, socket_at, ClientError, QmpClient, Target};
pub use commands::{handle_line, RunStatus, Session, StatsGroup, VirtioMemInfo, VmHandle, DOWNSTREAM_PREFIX};
pub use events::EventQueue;
pub use protocol::{ErrorClass, QmpError, MAX_LINE};
pub use server::{ApiServer, Limits, ServerCounters};

#[cfg(test)]
mod tests;
