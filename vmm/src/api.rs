//! The control API of a running VM: line-delimited JSON on a Unix socket.
//!
//! # Protocol
//!
//! One JSON object per line in each direction (`\n`-terminated, UTF-8, at most [`MAX_LINE`]
//! bytes per request). Every request line gets exactly one reply line, in order:
//!
//! ```text
//! -> {"id": 1, "op": "balloon-set", "size": "128M"}
//! <- {"id": 1, "ok": true, "result": {...}}
//! -> {"op": "mem-set", "bytes": 536870912}
//! <- {"id": null, "ok": false, "error": {"kind": "unavailable", "message": "..."}}
//! ```
//!
//! `id` is optional, may be any JSON value and is echoed (`null` when absent or when the line
//! could not be parsed). The operations are those of [`Op`]; `help` lists them. Error kinds
//! ([`ErrorKind`]): `bad-request` (not a JSON object, invalid UTF-8, a line too long, a missing
//! or non-string `op`, an unknown or duplicate field), `unknown-op`, `bad-argument` (an argument
//! of the wrong type or out of range, an unparsable size), `unavailable` (the VM lacks what the
//! operation needs, e.g. a virtio-mem device) and `failed` (the VM tried and failed). A bad
//! request never reaches the VM and never ends the connection.
//!
//! # Pieces
//!
//! - [`handle_line`]: one request line to one reply line, against a [`VmHandle`] (pure apart
//!   from the handle's calls; what the server, the tests and fuzzers use);
//! - [`ApiServer`]: the socket, an event-manager subscriber on the VMM's event loop;
//! - [`request`], [`call`], [`find_socket`]: the client side, for the `zapvm` subcommands.
//!
//! # Security
//!
//! The socket is created with mode 0600 with no window in which another user could connect:
//! it is bound inside a fresh private directory (mode 0700) next to its final path, chmod-ed
//! to 0600 there, and only then hard-linked to its final name (a link never replaces an
//! existing file). The process umask is never changed (it is process-wide, and other threads
//! may be creating files).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::EventSet;

use crate::memory::parse_size;

/// Longest request line, in bytes, without its `\n`. Longer lines get a `bad-request` reply
/// (the server discards them as they arrive; it never buffers more than this per client).
pub const MAX_LINE: usize = 64 * 1024;
/// Most clients connected at once; more get an `unavailable` reply and are disconnected.
pub const MAX_CLIENTS: usize = 16;
/// Most reply bytes the server keeps for a client that does not read them; past this the
/// client is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Longest reply line the client accepts.
pub const MAX_REPLY: usize = 16 << 20;
/// How long [`request`] waits for a reply (a `pause` may take up to 5 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from one client per event, so that one client cannot starve the event loop.
const READ_BUDGET: usize = 64 * 1024;
/// Connections accepted per event of the listener.
const ACCEPT_BUDGET: usize = 64;

// ---------------------------------------------------------------------------------------------
// Errors

/// The class of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The line is not a well-formed request: invalid UTF-8 or JSON, not an object, too long,
    /// `op` missing or not a string, an unknown or duplicate field.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// An argument has the wrong type or value.
    BadArgument,
    /// The VM cannot do this (e.g. it has no virtio-mem device).
    Unavailable,
    /// The VM tried and failed.
    Failed,
}

impl ErrorKind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::UnknownOp => "unknown-op",
            ErrorKind::BadArgument => "bad-argument",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: its kind and a one-line message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    /// The class.
    pub kind: ErrorKind,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into() }
    }
    /// A malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    /// An unknown operation.
    pub fn unknown_op(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UnknownOp, message)
    }
    /// A bad argument.
    pub fn bad_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadArgument, message)
    }
    /// Something the VM does not have ("this VM has no virtio-mem device").
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// The VM tried and failed.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }
}

// ---------------------------------------------------------------------------------------------
// What the VM offers

/// What a running VM offers the control API; the machine implements it.
///
/// The server calls these on the VMM's event-loop thread, one request at a time; a call that
/// blocks (a `pause` waiting for vCPUs to park) delays the event loop meanwhile. Results are
/// JSON objects the reply carries as its `result`.
pub trait VmHandle: Send + Sync {
    /// Sets the balloon's target size (bytes taken from the guest).
    fn balloon_set(&self, bytes: u64) -> Result<Value, ApiError>;
    /// The balloon's target, actual size and statistics.
    fn balloon_stats(&self) -> Result<Value, ApiError>;
    /// Sets virtio-mem's requested size.
    fn mem_set(&self, bytes: u64) -> Result<Value, ApiError>;
    /// virtio-mem's requested and plugged sizes and state.
    fn mem_state(&self) -> Result<Value, ApiError>;
    /// The notifier's, the table's and KVM's statistics.
    fn stats(&self) -> Result<Value, ApiError>;
    /// Stops every vCPU (returns once they are parked).
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), ApiError>;
    /// Ends the VM.
    fn quit(&self) -> Result<(), ApiError>;
}

// ---------------------------------------------------------------------------------------------
// Requests and replies

/// A size argument: exactly one of `bytes` (an integer) or `size` (a string such as `"128M"`,
/// parsed with [`parse_size`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeArg {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// A size with an optional K/M/G/T suffix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

impl SizeArg {
    /// `{"bytes": n}`.
    pub fn bytes(n: u64) -> Self {
        SizeArg { bytes: Some(n), size: None }
    }
    /// `{"size": text}`.
    pub fn size(text: impl Into<String>) -> Self {
        SizeArg { bytes: None, size: Some(text.into()) }
    }
    /// The size in bytes.
    pub fn resolve(&self) -> Result<u64, ApiError> {
        match (&self.bytes, &self.size) {
            (Some(n), None) => Ok(*n),
            (None, Some(text)) => parse_size(text).map_err(ApiError::bad_argument),
            (Some(_), Some(_)) => Err(ApiError::bad_argument("give either \"bytes\" or \"size\", not both")),
            (None, None) => Err(ApiError::bad_argument(
                "missing the size: give \"bytes\" (an integer) or \"size\" (e.g. \"128M\")",
            )),
        }
    }
}

/// An operation and its arguments; on the wire the `op` member names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Op {
    /// Set the balloon's target.
    BalloonSet(SizeArg),
    /// The balloon's state and statistics.
    BalloonStats,
    /// Set virtio-mem's requested size.
    MemSet(SizeArg),
    /// virtio-mem's state.
    MemState,
    /// Notifier, table and KVM statistics.
    Stats,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// End the VM.
    Quit,
    /// Check that the VM answers.
    Ping,
    /// List the operations.
    Help,
}

/// An operation as `help` describes it, and what the parser checks member names against.
struct OpSpec {
    name: &'static str,
    args: &'static [&'static str],
    usage: &'static str,
    description: &'static str,
}

const SIZE_USAGE: &str = "\"bytes\": integer | \"size\": string such as \"128M\"";

/// Every operation; a test keeps this in step with [`Op`].
const OPS: &[OpSpec] = &[
    OpSpec {
        name: "balloon-set",
        args: &["bytes", "size"],
        usage: SIZE_USAGE,
        description: "set the balloon's target size (memory taken from the guest)",
    },
    OpSpec {
        name: "balloon-stats",
        args: &[],
        usage: "",
        description: "the balloon's target, actual size and statistics",
    },
    OpSpec {
        name: "mem-set",
        args: &["bytes", "size"],
        usage: SIZE_USAGE,
        description: "set virtio-mem's requested size",
    },
    OpSpec {
        name: "mem-state",
        args: &[],
        usage: "",
        description: "virtio-mem's requested and plugged sizes",
    },
    OpSpec { name: "stats", args: &[], usage: "", description: "notifier, table and KVM statistics" },
    OpSpec { name: "pause", args: &[], usage: "", description: "stop every vCPU" },
    OpSpec { name: "resume", args: &[], usage: "", description: "let the vCPUs run again" },
    OpSpec { name: "quit", args: &[], usage: "", description: "end the VM" },
    OpSpec { name: "ping", args: &[], usage: "", description: "check that the VM answers" },
    OpSpec { name: "help", args: &[], usage: "", description: "list the operations" },
];

impl Op {
    /// The name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::BalloonSet(_) => "balloon-set",
            Op::BalloonStats => "balloon-stats",
            Op::MemSet(_) => "mem-set",
            Op::MemState => "mem-state",
            Op::Stats => "stats",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Quit => "quit",
            Op::Ping => "ping",
            Op::Help => "help",
        }
    }
}

/// A request: an operation and an optional id the reply echoes.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed in the reply.
    pub id: Option<Value>,
    /// What to do.
    pub op: Op,
}

impl Request {
    /// A request without an id.
    pub fn new(op: Op) -> Self {
        Request { id: None, op }
    }

    /// The same request with `id`.
    pub fn with_id(mut self, id: impl Into<Value>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The request as a line, `\n` included.
    pub fn to_line(&self) -> String {
        let mut value = serde_json::to_value(&self.op).unwrap_or_else(|_| json!({ "op": self.op.name() }));
        if let (Value::Object(map), Some(id)) = (&mut value, &self.id) {
            map.insert("id".into(), id.clone());
        }
        let mut line = value.to_string();
        line.push('\n');
        line
    }

    /// Parses a request line (without or with its `\n`). On failure, returns the id to echo
    /// (`null` if none could be read) and the error.
    pub fn parse(line: &str) -> Result<Request, (Value, ApiError)> {
        if line.len() > MAX_LINE {
            return Err((Value::Null, too_long()));
        }
        if line.trim().is_empty() {
            return Err((Value::Null, ApiError::bad_request("empty request (expected a JSON object)")));
        }
        let StrictObject(mut members) = serde_json::from_str(line).map_err(|e| {
            (Value::Null, ApiError::bad_request(format!("a request is one JSON object per line: {e}")))
        })?;
        let id = members.remove("id").unwrap_or(Value::Null);
        let fail = |e: ApiError| (id.clone(), e);
        let name = match members.get("op") {
            Some(Value::String(name)) => name.as_str(),
            Some(_) => return Err(fail(ApiError::bad_request("\"op\" must be a string"))),
            None => return Err(fail(ApiError::bad_request("missing \"op\" (try {\"op\": \"help\"})"))),
        };
        let Some(spec) = OPS.iter().find(|s| s.name == name) else {
            return Err(fail(ApiError::unknown_op(format!(
                "unknown op {:?} (ops: {})",
                clip(name),
                OPS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ))));
        };
        if let Some(field) = members.keys().find(|k| *k != "op" && !spec.args.contains(&k.as_str())) {
            let allowed = if spec.args.is_empty() {
                "it takes no arguments".to_string()
            } else {
                format!(
                    "it takes {}",
                    spec.args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(fail(ApiError::bad_request(format!(
                "unknown field {:?} for op {:?}: {allowed}",
                clip(field),
                spec.name
            ))));
        }
        let op: Op = serde_json::from_value(Value::Object(members))
            .map_err(|e| fail(ApiError::bad_argument(format!("{}: {e}", spec.name))))?;
        // Sizes are checked here, so that a bad one never reaches the VM.
        if let Op::BalloonSet(size) | Op::MemSet(size) = &op {
            size.resolve()
                .map_err(|e| fail(ApiError::bad_argument(format!("{}: {}", spec.name, e.message))))?;
        }
        Ok(Request { id: (!id.is_null()).then_some(id), op })
    }
}

/// A reply: `result` when `ok`, `error` otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The request's id (`null` if it had none or could not be parsed).
    #[serde(default)]
    pub id: Value,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// What the operation returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Reply {
    /// A success.
    pub fn success(id: Value, result: Value) -> Self {
        Reply { id, ok: true, result: Some(result), error: None }
    }

    /// A failure.
    pub fn failure(id: Value, error: ApiError) -> Self {
        Reply { id, ok: false, result: None, error: Some(error) }
    }

    /// The reply as one line, without its `\n`.
    pub fn to_line(&self) -> String {
        // Serializing a Value-only structure cannot fail; the fallback is for form's sake.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"id":null,"ok":false,"error":{"kind":"failed","message":"unserializable reply"}}"#.into()
        })
    }

    /// `result` or `error`.
    pub fn into_result(self) -> Result<Value, ApiError> {
        if self.ok {
            Ok(self.result.unwrap_or(Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| ApiError::failed("error reply without an error")))
        }
    }
}

/// A JSON object whose member names are unique (serde_json's `Value` keeps the last of
/// duplicates, so `{"op": "ping", "op": "quit"}` would quietly quit).
struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut members = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    if members.contains_key(&key) {
                        return Err(A::Error::custom(format_args!("duplicate field {:?}", clip(&key))));
                    }
                    let value: Value = access.next_value()?;
                    members.insert(key, value);
                }
                Ok(StrictObject(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// At most 64 characters of `text`, for echoing the client's input in messages.
fn clip(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

fn too_long() -> ApiError {
    ApiError::bad_request(format!("request line longer than {MAX_LINE} bytes"))
}

fn help() -> Value {
    let ops: Vec<Value> =
        OPS.iter().map(|s| json!({ "op": s.name, "args": s.usage, "description": s.description })).collect();
    json!({ "ops": ops })
}

fn execute(op: &Op, vm: &dyn VmHandle) -> Result<Value, ApiError> {
    let done = |()| json!({});
    match op {
        Op::BalloonSet(size) => vm.balloon_set(size.resolve()?),
        Op::BalloonStats => vm.balloon_stats(),
        Op::MemSet(size) => vm.mem_set(size.resolve()?),
        Op::MemState => vm.mem_state(),
        Op::Stats => vm.stats(),
        Op::Pause => vm.pause().map(done),
        Op::Resume => vm.resume().map(done),
        Op::Quit => vm.quit().map(done),
        Op::Ping => Ok(json!({
            "pong": true,
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
        })),
        Op::Help => Ok(help()),
    }
}

/// Answers one request line (with or without its `\n`): the reply line, without its `\n`.
///
/// A malformed request gets an error reply and never reaches `vm`. A panic in `vm` becomes a
/// `failed` reply.
pub fn handle_line(line: &str, vm: &dyn VmHandle) -> String {
    let reply = match Request::parse(line) {
        Err((id, error)) => Reply::failure(id, error),
        Ok(Request { id, op }) => {
            let id = id.unwrap_or(Value::Null);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&op, vm))) {
                Ok(Ok(result)) => Reply::success(id, result),
                Ok(Err(error)) => Reply::failure(id, error),
                Err(_) => {
                    tracing::error!("the control API's handler panicked on {:?}", op.name());
                    Reply::failure(id, ApiError::failed(format!("internal error handling {:?}", op.name())))
                }
            }
        }
    };
    reply.to_line()
}

/// [`handle_line`] for raw bytes off the socket: too long or not UTF-8 is a `bad-request`.
pub fn handle_bytes(line: &[u8], vm: &dyn VmHandle) -> String {
    if line.len() > MAX_LINE {
        return Reply::failure(Value::Null, too_long()).to_line();
    }
    match std::str::from_utf8(line) {
        Ok(text) => handle_line(text, vm),
        Err(e) => {
            Reply::failure(Value::Null, ApiError::bad_request(format!("request is not UTF-8: {e}"))).to_line()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Socket paths

/// Where sockets go by default: `$XDG_RUNTIME_DIR` if set to an absolute directory, else the
/// temporary directory.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() && dir.is_dir() => dir,
        _ => std::env::temp_dir(),
    }
}

/// The default control socket of the VM in process `pid`: `<runtime dir>/zapvm-<pid>.sock`.
pub fn default_socket_path(pid: u32) -> PathBuf {
    runtime_dir().join(format!("zapvm-{pid}.sock"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The `zapvm-<pid>.sock` sockets in `dirs`, by pid.
fn sockets_in(dirs: &[PathBuf]) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("zapvm-")?.strip_suffix(".sock")?.parse::<u32>().ok())
            else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_socket()) && !found.iter().any(|(p, _)| *p == pid) {
                found.push((pid, entry.path()));
            }
        }
    }
    found.sort();
    found
}

/// The control socket of VM `pid`, or with `None` of the only running VM that has one
/// (looking in [`runtime_dir`] and the temporary directory).
///
/// A socket nobody listens on (its VM was killed, or ended without removing it) is never
/// chosen; it is removed on the way (see [`probe_socket`]).
pub fn find_socket(pid: Option<u32>) -> Result<PathBuf, ClientError> {
    let mut dirs = vec![runtime_dir()];
    let tmp = std::env::temp_dir();
    if !dirs.contains(&tmp) {
        dirs.push(tmp);
    }
    find_socket_in(&dirs, pid)
}

fn find_socket_in(dirs: &[PathBuf], pid: Option<u32>) -> Result<PathBuf, ClientError> {
    let where_ = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ");
    let sockets = sockets_in(dirs);
    match pid {
        Some(pid) => {
            let stale = match sockets.into_iter().find(|(p, _)| *p == pid) {
                // (A socket it cannot judge goes to the request, which says what is wrong.)
                Some((_, path)) if probe_socket(&path) != SocketState::Stale => return Ok(path),
                Some((_, path)) => Some(path),
                None => None,
            };
            let stale =
                stale.map(|p| format!(" (its stale socket {} was removed)", p.display())).unwrap_or_default();
            if pid_alive(pid) {
                Err(ClientError::NotFound(format!(
                    "process {pid} has no live control socket zapvm-{pid}.sock in {where_} (is it a `zapvm run`?){stale}"
                )))
            } else {
                Err(ClientError::NotFound(format!("no process {pid}{stale}")))
            }
        }
        None => {
            // A socket is live if something accepts on it (a VM that was killed leaves its
            // socket file behind: removed here).
            let live: Vec<(u32, PathBuf)> =
                sockets.into_iter().filter(|(_, path)| probe_socket(path) == SocketState::Live).collect();
            match live.len() {
                0 => Err(ClientError::NotFound(format!(
                    "no running VM has a control socket (zapvm-<pid>.sock) in {where_}"
                ))),
                1 => Ok(live.into_iter().next().map(|(_, p)| p).unwrap_or_default()),
                _ => Err(ClientError::NotFound(format!(
                    "{} VMs are running (pids {}); choose one with --pid",
                    live.len(),
                    live.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
    }
}

/// What [`probe_socket`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketState {
    /// Something accepts connections on it.
    Live,
    /// Nobody listens on it (`ECONNREFUSED`): it was removed.
    Stale,
    /// It cannot be told (not reachable by this user, gone meanwhile, ...): left alone.
    Unknown,
}

/// Connects to the socket at `path` (and hangs up at once) to tell whether a VM serves it; a
/// socket nobody listens on is removed.
///
/// `ECONNREFUSED` means no listener: a VM's server listens before its socket appears under its
/// name (see [`ApiServer::bind`]), so this is never a VM that is still starting. The file is
/// removed only if it is still the socket that refused (same device and inode), so a VM that
/// replaced it meanwhile keeps its own.
fn probe_socket(path: &Path) -> SocketState {
    let Ok(before) = std::fs::symlink_metadata(path) else { return SocketState::Unknown };
    match UnixStream::connect(path) {
        Ok(_) => SocketState::Live,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let same = std::fs::symlink_metadata(path)
                .is_ok_and(|now| (now.dev(), now.ino()) == (before.dev(), before.ino()));
            if same {
                match std::fs::remove_file(path) {
                    Ok(()) => tracing::info!("removed the stale control socket {}", path.display()),
                    Err(e) => {
                        tracing::warn!("cannot remove the stale control socket {}: {e}", path.display())
                    }
                }
            }
            SocketState::Stale
        }
        Err(_) => SocketState::Unknown,
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Writes to a client without raising `SIGPIPE` if it is gone (`EPIPE` instead): the VMM must
/// not depend on the signal being ignored.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call, and
    // the fd is open for as long as `stream` is borrowed.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    /// The current line so far (at most [`MAX_LINE`] bytes).
    input: Vec<u8>,
    /// The current line is too long: its bytes are dropped up to its `\n`.
    overlong: bool,
    /// Replies not yet written, from `written` on.
    output: Vec<u8>,
    written: usize,
    /// The client shut down its sending side (or it sent an EOF).
    read_closed: bool,
    /// What the connection is registered for.
    watched: EventSet,
}

impl Connection {
    fn pending(&self) -> usize {
        self.output.len() - self.written
    }

    fn queue(&mut self, reply: String) {
        self.output.extend_from_slice(reply.as_bytes());
        self.output.push(b'\n');
    }

    /// The client's bytes: complete lines are answered, the rest kept. Stops early (returning
    /// false) once more than [`MAX_PENDING_OUTPUT`] bytes of replies cannot be written.
    fn feed(&mut self, mut data: &[u8], vm: &dyn VmHandle) -> io::Result<bool> {
        while !data.is_empty() {
            if self.pending() > MAX_PENDING_OUTPUT {
                self.flush()?;
                if self.pending() > MAX_PENDING_OUTPUT {
                    return Ok(false);
                }
            }
            let (piece, end_of_line) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let piece = &data[..i];
                    data = &data[i + 1..];
                    (piece, true)
                }
                None => (std::mem::take(&mut data), false),
            };
            self.take_piece(piece, end_of_line, vm);
        }
        if self.pending() > MAX_PENDING_OUTPUT {
            self.flush()?;
        }
        Ok(self.pending() <= MAX_PENDING_OUTPUT)
    }

    fn take_piece(&mut self, piece: &[u8], end_of_line: bool, vm: &dyn VmHandle) {
        if self.overlong {
            if end_of_line {
                self.overlong = false;
                self.queue(Reply::failure(Value::Null, too_long()).to_line());
            }
            return;
        }
        if self.input.len() + piece.len() > MAX_LINE {
            self.input = Vec::new();
            if end_of_line {
                self.queue(Reply::failure(Value::Null, too_long()).to_line());
            } else {
                self.overlong = true;
            }
            return;
        }
        self.input.extend_from_slice(piece);
        if end_of_line {
            let reply = handle_bytes(&self.input, vm);
            self.input.clear();
            self.queue(reply);
        }
    }

    /// Reads what the client sent (up to [`READ_BUDGET`]) and answers it. `Ok(false)`: drop
    /// the client.
    fn read_input(&mut self, vm: &dyn VmHandle) -> io::Result<bool> {
        let mut buf = [0u8; 8192];
        let mut budget = READ_BUDGET;
        while budget > 0 && !self.read_closed {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.read_closed = true;
                    // A last line without its `\n` is still a request.
                    if self.overlong {
                        self.overlong = false;
                        self.queue(Reply::failure(Value::Null, too_long()).to_line());
                    } else if !self.input.iter().all(u8::is_ascii_whitespace) {
                        let reply = handle_bytes(&self.input, vm);
                        self.queue(reply);
                    }
                    self.input = Vec::new();
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if !self.feed(&buf[..n], vm)? {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes what it can of the pending replies.
    fn flush(&mut self) -> io::Result<()> {
        while self.pending() > 0 {
            match send(&self.stream, &self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.pending() == 0 {
            self.output.clear();
            self.written = 0;
        } else if self.written > self.output.len() / 2 {
            self.output.drain(..self.written);
            self.written = 0;
        }
        Ok(())
    }

    /// What to watch now: input until the client's EOF, output while replies wait.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.read_closed {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if self.pending() > 0 {
            set |= EventSet::OUT;
        }
        set
    }
}

/// The control socket of a running VM, served on the VMM's event loop.
///
/// Add it to the VM's `EventManager` (it is a [`MutEventSubscriber`]); it registers its
/// listener in `init` and each client as it connects. Requests are answered with
/// [`handle_line`] against the [`VmHandle`] as they arrive. Dropping it removes the socket file
/// (if the file is still this server's).
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, to remove it on drop only if it is still ours.
    identity: (u64, u64),
    handle: Arc<dyn VmHandle>,
    clients: HashMap<RawFd, Connection>,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).field("clients", &self.clients.len()).finish()
    }
}

/// A directory only its owner can enter, removed with what it holds when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(parent: &Path, stem: &str) -> io::Result<PrivateDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        for attempt in 0..16u32 {
            let path =
                parent.join(format!(".{stem}.{}.{}.{attempt}", std::process::id(), nanos.subsec_nanos()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = PrivateDir(path);
                    // The umask may have removed bits (never added any); make it exactly 0700.
                    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::AlreadyExists, "cannot create a private directory"))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Makes way for a socket at `path`: nothing there, or a socket nobody listens on (removed).
fn clear_stale(path: &Path) -> io::Result<()> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(context(format!("cannot inspect {shown}"))(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{shown} exists and is not a socket; not touching it"),
        )),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{shown} is the control socket of a running VM"),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing the stale control socket {shown}");
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(context(format!("cannot remove the stale socket {shown}"))(e))
                    }
                    _ => Ok(()),
                }
            }
            Err(e) => Err(context(format!("cannot tell whether {shown} is in use"))(e)),
        },
    }
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600, listening, non-blocking), serving `handle`.
    ///
    /// A socket file nobody listens on is replaced; a live socket or any other file at `path`
    /// is an error.
    pub fn bind(path: impl AsRef<Path>, handle: Arc<dyn VmHandle>) -> io::Result<ApiServer> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad socket path {shown}")))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        clear_stale(&path)?;

        // Bind inside a private directory, chmod there, then link into place: the socket is
        // 0600 before anyone else can reach it, and a link never replaces an existing file.
        let private = PrivateDir::create(parent, file_name)
            .map_err(context(format!("cannot create a private directory in {}", parent.display())))?;
        let staged = private.0.join("s");
        let listener = UnixListener::bind(&staged).map_err(context(format!("cannot bind {shown}")))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(context(format!("cannot chmod {shown}")))?;
        listener.set_nonblocking(true)?;
        match std::fs::hard_link(&staged, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{shown} appeared while the control socket was being created"),
                ))
            }
            // A filesystem without hard links: a rename (which would replace a file that
            // appeared since `clear_stale`; acceptable there).
            Err(_) => std::fs::rename(&staged, &path).map_err(context(format!("cannot create {shown}")))?,
        }
        drop(private);
        let meta = std::fs::symlink_metadata(&path).map_err(context(format!("cannot inspect {shown}")))?;
        tracing::info!("control API on {shown}");
        Ok(ApiServer { listener, path, identity: (meta.dev(), meta.ino()), handle, clients: HashMap::new() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BUDGET {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("control API: accept: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                let reply = Reply::failure(
                    Value::Null,
                    ApiError::unavailable(format!(
                        "too many clients (at most {MAX_CLIENTS}); try again later"
                    )),
                );
                let _ = send(&stream, format!("{}\n", reply.to_line()).as_bytes());
                continue; // dropping `stream` disconnects it
            }
            let watched = EventSet::IN | EventSet::READ_HANG_UP;
            if let Err(e) = ops.add(Events::new(&stream, watched)) {
                tracing::warn!("control API: cannot watch a client: {e:?}");
                continue;
            }
            let fd = stream.as_raw_fd();
            self.clients.insert(
                fd,
                Connection {
                    stream,
                    input: Vec::new(),
                    overlong: false,
                    output: Vec::new(),
                    written: 0,
                    read_closed: false,
                    watched,
                },
            );
        }
    }

    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.clients.get_mut(&fd) else { return };
        let keep = (|| -> io::Result<bool> {
            if events.contains(EventSet::ERROR) {
                return Ok(false);
            }
            if !conn.read_closed
                && events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
                && !conn.read_input(self.handle.as_ref())?
            {
                tracing::warn!("control API: a client does not read its replies; disconnecting it");
                return Ok(false);
            }
            if events.contains(EventSet::HANG_UP) {
                return Ok(false); // nobody to write to
            }
            conn.flush()?;
            Ok(!(conn.read_closed && conn.pending() == 0))
        })()
        .unwrap_or(false);
        if !keep {
            self.disconnect(fd, ops);
            return;
        }
        let wanted = conn.wanted();
        if wanted != conn.watched {
            if let Err(e) = ops.modify(Events::new(&conn.stream, wanted)) {
                tracing::warn!("control API: cannot watch a client: {e:?}");
                self.disconnect(fd, ops);
                return;
            }
            conn.watched = wanted;
        }
    }

    fn disconnect(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.clients.remove(&fd) {
            // Unregister before the fd closes (event-manager forgets it only then).
            let _ = ops.remove(Events::new(&conn.stream, conn.watched));
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control API: cannot watch the listener: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Why a request got no reply from the VM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket to talk to.
    #[error("{0}")]
    NotFound(String),
    /// Connecting failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No reply in time.
    #[error("no reply from {path} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// A reply that is not one.
    #[error("bad reply from {path}: {message}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The VM answered with an error.
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// Sends `req` to the socket at `path` and returns the reply, waiting at most
/// [`DEFAULT_TIMEOUT`].
pub fn request(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    request_with_timeout(path, req, DEFAULT_TIMEOUT)
}

/// [`request`] with a timeout (for the write and the reply; connecting to a listening socket
/// does not wait).
pub fn request_with_timeout(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let io_err = |source: io::Error| {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ClientError::Timeout { path: path.to_path_buf(), timeout }
        } else {
            ClientError::Io { path: path.to_path_buf(), source }
        }
    };
    let mut stream = UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(io_err)?;
    stream.write_all(req.to_line().as_bytes()).map_err(io_err)?;

    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    let line_end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout { path: path.to_path_buf(), timeout });
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(ClientError::BadReply {
                    path: path.to_path_buf(),
                    message: "the connection closed before a reply".into(),
                })
            }
            Ok(n) => {
                let seen = reply.len();
                reply.extend_from_slice(&chunk[..n]);
                if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
                    break seen + i;
                }
                if reply.len() > MAX_REPLY {
                    return Err(ClientError::BadReply {
                        path: path.to_path_buf(),
                        message: format!("a reply longer than {MAX_REPLY} bytes"),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    };
    let reply: Reply = serde_json::from_slice(&reply[..line_end])
        .map_err(|e| ClientError::BadReply { path: path.to_path_buf(), message: e.to_string() })?;
    if let Some(id) = &req.id {
        if reply.id != *id {
            return Err(ClientError::BadReply {
                path: path.to_path_buf(),
                message: format!("the reply's id {} is not the request's {id}", reply.id),
            });
        }
    }
    Ok(reply)
}

/// Performs `op` on the VM at `path`: its result, or its error as [`ClientError::Api`].
pub fn call(path: &Path, op: Op) -> Result<Value, ClientError> {
    let req = Request::new(op).with_id(std::process::id());
    Ok(request(path, &req)?.into_result()?)
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    /// A VM that records what it is asked.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
        no_mem: bool,
    }

    impl Fake {
        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl VmHandle for Fake {
        fn balloon_set(&self, bytes: u64) -> Result<Value, ApiError> {
            self.record(format!("balloon-set {bytes}"));
            Ok(json!({ "target_bytes": bytes }))
        }
        fn balloon_stats(&self) -> Result<Value, ApiError> {
            self.record("balloon-stats".into());
            Ok(json!({ "actual_bytes": 0 }))
        }
        fn mem_set(&self, bytes: u64) -> Result<Value, ApiError> {
            self.record(format!("mem-set {bytes}"));
            if self.no_mem {
                return Err(ApiError::unavailable("this VM has no virtio-mem device"));
            }
            if bytes == 12345 {
                return Err(ApiError::failed("cannot do that"));
            }
            if bytes == 666 {
                panic!("the handle panics");
            }
            Ok(json!({ "requested_bytes": bytes }))
        }
        fn mem_state(&self) -> Result<Value, ApiError> {
            self.record("mem-state".into());
            Ok(json!({ "plugged_bytes": 0 }))
        }
        fn stats(&self) -> Result<Value, ApiError> {
            self.record("stats".into());
            Ok(json!({ "table": {}, "notifier": {}, "kvm": null }))
        }
        fn pause(&self) -> Result<(), ApiError> {
            self.record("pause".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            self.record("resume".into());
            Ok(())
        }
        fn quit(&self) -> Result<(), ApiError> {
            self.record("quit".into());
            Ok(())
        }
    }

    /// Checks that `line` is one line holding a reply, and returns it.
    fn reply(line: &str) -> Reply {
        assert!(!line.contains('\n'), "a reply is one line: {line:?}");
        let reply: Reply = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(reply.ok, reply.result.is_some(), "{line}");
        assert_eq!(!reply.ok, reply.error.is_some(), "{line}");
        reply
    }

    fn ok(fake: &Fake, line: &str) -> Reply {
        let r = reply(&handle_line(line, fake));
        assert!(r.ok, "{line} -> {r:?}");
        r
    }

    fn err(fake: &Fake, line: &str) -> ApiError {
        let r = reply(&handle_line(line, fake));
        assert!(!r.ok, "{line} -> {r:?}");
        r.error.unwrap()
    }

    /// Each of these is malformed: an error reply of `kind`, and the VM is not called.
    fn rejected(line: &str, kind: ErrorKind) {
        let fake = Fake::default();
        let e = err(&fake, line);
        assert_eq!(e.kind, kind, "{:?} -> {e:?}", clip(line));
        assert!(fake.calls().is_empty(), "{:?} reached the VM", clip(line));
    }

    #[test]
    fn every_op_reaches_the_vm() {
        let fake = Fake::default();
        let r = ok(&fake, r#"{"op":"ping","id":1}"#);
        assert_eq!(r.id, json!(1));
        assert_eq!(r.result.unwrap()["pid"], json!(std::process::id()));
        let help = ok(&fake, r#"{"op":"help"}"#).result.unwrap();
        let names: Vec<&str> =
            help["ops"].as_array().unwrap().iter().map(|o| o["op"].as_str().unwrap()).collect();
        assert_eq!(names.len(), OPS.len());
        assert!(fake.calls().is_empty());

        let r = ok(&fake, r#"{"op":"balloon-set","size":"128M"}"#);
        assert_eq!(r.result.unwrap(), json!({ "target_bytes": 128u64 << 20 }));
        ok(&fake, r#"{"op":"balloon-set","bytes":4096}"#);
        ok(&fake, r#"{"op":"balloon-set","bytes":0}"#);
        ok(&fake, r#"{"op":"balloon-set","size":" 1g "}"#);
        ok(&fake, r#"{"op":"balloon-set","bytes":18446744073709551615}"#);
        ok(&fake, r#"{"op":"balloon-stats"}"#);
        ok(&fake, r#"{"op":"mem-set","size":"512M"}"#);
        ok(&fake, r#"{"op":"mem-set","bytes":1048576}"#);
        ok(&fake, r#"{"op":"mem-state"}"#);
        let r = ok(&fake, "  {\"op\" : \"stats\"}  \r\n");
        assert!(r.result.unwrap().get("table").is_some());
        assert_eq!(ok(&fake, r#"{"op":"pause"}"#).result.unwrap(), json!({}));
        ok(&fake, r#"{"op":"resume"}"#);
        ok(&fake, r#"{"op":"quit"}"#);
        assert_eq!(
            fake.calls(),
            [
                "balloon-set 134217728",
                "balloon-set 4096",
                "balloon-set 0",
                "balloon-set 1073741824",
                "balloon-set 18446744073709551615",
                "balloon-stats",
                "mem-set 536870912",
                "mem-set 1048576",
                "mem-state",
                "stats",
                "pause",
                "resume",
                "quit",
            ]
        );
    }

    #[test]
    fn ids_are_echoed() {
        let fake = Fake::default();
        for id in [json!(7), json!("abc"), json!({"a": [1, 2]}), json!(-1.5), json!(true), json!([null])] {
            let line = json!({ "id": id, "op": "ping" }).to_string();
            assert_eq!(ok(&fake, &line).id, id);
            // Errors too, once the id could be read.
            let line = json!({ "id": id, "op": "nope" }).to_string();
            assert_eq!(reply(&handle_line(&line, &fake)).id, id);
            let line = json!({ "id": id, "op": "mem-set", "size": "lots" }).to_string();
            assert_eq!(reply(&handle_line(&line, &fake)).id, id);
        }
        assert_eq!(ok(&fake, r#"{"op":"ping"}"#).id, Value::Null);
        assert_eq!(ok(&fake, r#"{"op":"ping","id":null}"#).id, Value::Null);
        assert_eq!(reply(&handle_line("{\"id\":3", &fake)).id, Value::Null);
    }

    #[test]
    fn float_ids_are_echoed_exactly() {
        // Regression (found by tests/parsers.rs): without serde_json's float_roundtrip, ids such
        // as these were parsed one ulp off and echoed as a different number, so a client could
        // not match its reply by id.
        let fake = Fake::default();
        for text in ["3.6384864786539836e-303", "-1.87930143646232e301", "0.1", "-2.5e-308"] {
            let line = format!(r#"{{"op":"ping","id":{text}}}"#);
            let answer = handle_line(&line, &fake);
            let sent: f64 = text.parse().unwrap();
            let echoed = reply(&answer).id.as_f64().unwrap();
            assert_eq!(echoed.to_bits(), sent.to_bits(), "{text} -> {answer}");
        }
    }

    #[test]
    fn vm_errors_pass_through() {
        let fake = Fake { no_mem: true, ..Default::default() };
        let e = err(&fake, r#"{"op":"mem-set","size":"1G","id":2}"#);
        assert_eq!(e, ApiError::unavailable("this VM has no virtio-mem device"));
        let fake = Fake::default();
        assert_eq!(err(&fake, r#"{"op":"mem-set","bytes":12345}"#).kind, ErrorKind::Failed);
        // A panicking handle is a `failed` reply, not a dead event loop.
        assert_eq!(err(&fake, r#"{"op":"mem-set","bytes":666}"#).kind, ErrorKind::Failed);
        ok(&fake, r#"{"op":"ping"}"#);
    }

    #[test]
    fn malformed_requests_are_rejected() {
        use ErrorKind::*;
        for line in [
            "",
            "   ",
            "garbage",
            "{",
            r#"{"op":"ping""#,
            r#"{"op":"ping"} {"op":"quit"}"#,
            r#"{"op":"ping"}}"#,
            "[]",
            "42",
            "null",
            r#""ping""#,
            "{}",
            r#"{"id":1}"#,
            r#"{"op":5}"#,
            r#"{"op":null}"#,
            r#"{"op":["quit"]}"#,
            r#"{"op":"ping","x":1}"#,
            r#"{"op":"quit","force":true}"#,
            r#"{"op":"balloon-set","bytes":1,"extra":2}"#,
            r#"{"op":"ping","op":"quit"}"#,
            r#"{"op":"balloon-set","bytes":1,"bytes":2}"#,
            "{\"op\":\"ping\u{0}\"}",
            "\u{0}{\"op\":\"ping\"}",
            "{\"op\":\"ping\"}\u{0}",
            "{\"op\":\"quit\"\n}x",
            "\u{feff}{\"op\":\"ping\"}",
        ] {
            rejected(line, BadRequest);
        }
        for line in
            [r#"{"op":"nope"}"#, r#"{"op":"QUIT"}"#, r#"{"op":"balloon_set","bytes":1}"#, r#"{"op":""}"#]
        {
            rejected(line, UnknownOp);
        }
        for line in [
            r#"{"op":"balloon-set"}"#,
            r#"{"op":"balloon-set","bytes":"12"}"#,
            r#"{"op":"balloon-set","size":12}"#,
            r#"{"op":"balloon-set","bytes":-1}"#,
            r#"{"op":"balloon-set","bytes":1.5}"#,
            r#"{"op":"balloon-set","bytes":1e3}"#,
            r#"{"op":"balloon-set","bytes":18446744073709551616}"#,
            r#"{"op":"balloon-set","bytes":null}"#,
            r#"{"op":"balloon-set","bytes":1,"size":"1M"}"#,
            r#"{"op":"mem-set","size":"-1M"}"#,
            r#"{"op":"mem-set","size":"99999999999T"}"#,
            r#"{"op":"mem-set","size":"18446744073709551616"}"#,
            r#"{"op":"mem-set","size":"12Q"}"#,
            r#"{"op":"mem-set","size":""}"#,
            r#"{"op":"mem-set","size":"M"}"#,
            r#"{"op":"mem-set","size":"1\u0000M"}"#,
            r#"{"op":"mem-set","size":{"bytes":1}}"#,
        ] {
            rejected(line, BadArgument);
        }
        // Too long, even when it is otherwise a fine request.
        let long = format!("{{\"op\":\"ping\"}}{}", " ".repeat(1 << 20));
        rejected(&long, BadRequest);
        let long = format!("{{\"op\":\"mem-set\",\"size\":\"{}\"}}", "9".repeat(MAX_LINE));
        rejected(&long, BadRequest);
        // Exactly MAX_LINE is still fine.
        let fake = Fake::default();
        let mut edge = r#"{"op":"ping"}"#.to_string();
        edge.push_str(&" ".repeat(MAX_LINE - edge.len()));
        ok(&fake, &edge);
        // Deep nesting is an error, not a stack overflow.
        rejected(&"[".repeat(60_000), BadRequest);
        rejected(
            &format!("{{\"id\":{}1{},\"op\":\"quit\"}}", "[".repeat(10_000), "]".repeat(10_000)),
            BadRequest,
        );
        // Invalid UTF-8, through the byte-level entry point.
        for bytes in [&b"{\"op\":\"ping\xff\"}"[..], b"\xc3", b"\xed\xa0\x80", b"{\"op\":\"quit\"}\xfe"] {
            let fake = Fake::default();
            let r = reply(&handle_bytes(bytes, &fake));
            assert_eq!(r.error.unwrap().kind, BadRequest);
            assert!(fake.calls().is_empty());
        }
        let fake = Fake::default();
        assert!(reply(&handle_bytes(&vec![b'x'; MAX_LINE + 1], &fake)).error.is_some());
    }

    /// Deterministic mutations of valid requests: never a panic, always one reply line, and a
    /// request that reaches the VM is one that parses.
    #[test]
    fn mutated_requests_never_panic() {
        let seeds: Vec<Vec<u8>> = [
            r#"{"id":1,"op":"balloon-set","size":"128M"}"#,
            r#"{"op":"mem-set","bytes":536870912}"#,
            r#"{"op":"stats","id":{"x":[1,"y"]}}"#,
            r#"{"op":"ping"}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,0123456789-+.eE\\ \n\0\xffabopquitsetmemballoon";
        for _ in 0..20_000 {
            let mut bytes = seeds[next() as usize % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = next() as usize % (bytes.len() + 1);
                match next() % 4 {
                    0 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, alphabet[next() as usize % alphabet.len()]),
                    2 if at < bytes.len() => bytes[at] = alphabet[next() as usize % alphabet.len()],
                    _ => bytes.truncate(at),
                }
            }
            let fake = Fake::default();
            let r = reply(&handle_bytes(&bytes, &fake));
            let parsed = std::str::from_utf8(&bytes).ok().map(Request::parse);
            if !fake.calls().is_empty() {
                assert!(
                    matches!(parsed, Some(Ok(_))),
                    "{:?} reached the VM",
                    String::from_utf8_lossy(&bytes)
                );
            }
            if !r.ok {
                assert!(matches!(parsed, None | Some(Err(_))) || r.error.unwrap().kind == ErrorKind::Failed);
            }
        }
    }

    #[test]
    fn the_op_table_matches_the_enum() {
        let all = [
            Op::BalloonSet(SizeArg::bytes(1)),
            Op::BalloonStats,
            Op::MemSet(SizeArg::size("1M")),
            Op::MemState,
            Op::Stats,
            Op::Pause,
            Op::Resume,
            Op::Quit,
            Op::Ping,
            Op::Help,
        ];
        assert_eq!(all.len(), OPS.len());
        for op in all {
            assert!(OPS.iter().any(|s| s.name == op.name()), "{op:?} missing from OPS");
            // What the client sends parses back to the same request.
            let req = Request::new(op.clone()).with_id("x");
            let line = req.to_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(Request::parse(&line).unwrap(), req, "{line}");
            assert_eq!(serde_json::to_value(&op).unwrap()["op"], json!(op.name()));
        }
    }

    // -----------------------------------------------------------------------------------------
    // The server on an event loop

    /// A fresh directory for one test, removed (with whatever the test left there) when the
    /// returned value drops, also when the test fails.
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

    struct Client {
        stream: UnixStream,
        buf: Vec<u8>,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let stream = UnixStream::connect(path).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client { stream, buf: Vec::new() }
        }
        fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).unwrap();
        }
        fn line(&mut self) -> Reply {
            loop {
                if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return reply(std::str::from_utf8(&line[..i]).unwrap());
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the server closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
        fn ask(&mut self, line: &str) -> Reply {
            self.send(format!("{line}\n").as_bytes());
            self.line()
        }
        /// Whether the server closed the connection (after any pending replies).
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

    #[test]
    fn server_answers_clients_on_the_event_loop() {
        let scratch = scratch_dir("server");
        let dir = scratch.path().to_path_buf();
        let path = dir.join("vm.sock");
        let fake = Arc::new(Fake::default());
        let server = ApiServer::bind(&path, fake.clone()).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        // Nothing is left of the staging directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let event_loop = Loop::start(server);

        let mut a = Client::connect(&path);
        let mut b = Client::connect(&path);
        let r = a.ask(r#"{"id":1,"op":"ping"}"#);
        assert_eq!((r.ok, r.id), (true, json!(1)));
        assert_eq!(b.ask(r#"{"id":"b","op":"mem-state"}"#).id, json!("b"));

        // A line in two writes.
        a.send(br#"{"id":2,"op":"ballo"#);
        std::thread::sleep(Duration::from_millis(50));
        b.ask(r#"{"op":"balloon-stats"}"#); // the other client is served meanwhile
        a.send(b"on-set\",\"size\":\"128M\"}\n");
        let r = a.line();
        assert_eq!((r.ok, r.id), (true, json!(2)));
        assert_eq!(r.result.unwrap()["target_bytes"], json!(128u64 << 20));

        // Malformed requests: an error each, and the connection keeps working.
        assert_eq!(a.ask("garbage").error.unwrap().kind, ErrorKind::BadRequest);
        assert_eq!(a.ask(r#"{"op":"nope","id":3}"#).error.unwrap().kind, ErrorKind::UnknownOp);
        assert_eq!(a.ask(r#"{"op":"mem-set","bytes":-5}"#).error.unwrap().kind, ErrorKind::BadArgument);
        a.send(b"{\"op\":\"ping\xff\"}\n");
        assert_eq!(a.line().error.unwrap().kind, ErrorKind::BadRequest);
        a.send(b"\0\0\0\n");
        assert_eq!(a.line().error.unwrap().kind, ErrorKind::BadRequest);
        // A 1 MiB line, in pieces: one error, nothing buffered, then business as usual.
        let mut long = b"{\"op\":\"ping\",\"pad\":\"".to_vec();
        long.resize(1 << 20, b'x');
        a.send(&long);
        a.send(b"\"}\n");
        assert_eq!(a.line().error.unwrap().kind, ErrorKind::BadRequest);
        // Pipelined requests: answered in order.
        a.send(b"{\"id\":10,\"op\":\"ping\"}\n{\"id\":11,\"op\":\"stats\"}\n\n{\"id\":12,\"op\":\"help\"}\n");
        assert_eq!(a.line().id, json!(10));
        assert_eq!(a.line().id, json!(11));
        assert!(!a.line().ok);
        assert_eq!(a.line().id, json!(12));
        assert!(a.ask(r#"{"op":"ping"}"#).ok);

        // A last request without its newline, then EOF: answered, then closed.
        let mut c = Client::connect(&path);
        c.send(br#"{"id":"eof","op":"ping"}"#);
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.line().id, json!("eof"));
        assert!(c.closed());

        // The library client.
        let r = request(&path, &Request::new(Op::Pause).with_id(20)).unwrap();
        assert_eq!((r.ok, r.id), (true, json!(20)));
        assert_eq!(call(&path, Op::Resume).unwrap(), json!({}));
        match call(&path, Op::MemSet(SizeArg::size("1x"))) {
            Err(ClientError::Api(e)) => assert_eq!(e.kind, ErrorKind::BadArgument),
            other => panic!("{other:?}"),
        }
        assert!(call(&path, Op::Quit).is_ok());
        let calls = fake.calls();
        assert_eq!(calls.iter().filter(|c| *c == "quit").count(), 1);
        assert_eq!(&calls[calls.len() - 2..], ["resume", "quit"]);
        assert!(calls.contains(&"pause".to_string()));

        drop(event_loop);
        assert!(!path.exists(), "the socket file is removed with the server");
    }

    #[test]
    fn server_bounds_clients_and_their_output() {
        let scratch = scratch_dir("bounds");
        let dir = scratch.path().to_path_buf();
        let path = dir.join("vm.sock");
        let fake = Arc::new(Fake::default());
        let _event_loop = Loop::start(ApiServer::bind(&path, fake.clone()).unwrap());

        // A client that sends requests but never reads: disconnected once its replies pile up.
        let mut hog = Client::connect(&path);
        hog.stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let requests = "{\"op\":\"help\"}\n".repeat(1000);
        let mut sent = 0;
        let mut dropped = false;
        for _ in 0..100 {
            match hog.stream.write_all(requests.as_bytes()) {
                Ok(()) => sent += 1000,
                Err(_) => {
                    dropped = true;
                    break;
                }
            }
        }
        let help_len = handle_line(r#"{"op":"help"}"#, &Fake::default()).len() + 1;
        assert!(dropped || hog.closed(), "a client that never reads stays connected");
        assert!(sent * help_len > MAX_PENDING_OUTPUT);

        // At most MAX_CLIENTS at once; the next one is told so and disconnected.
        let mut clients: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::connect(&path)).collect();
        for c in &mut clients {
            assert!(c.ask(r#"{"op":"ping"}"#).ok);
        }
        let mut extra = Client::connect(&path);
        let r = extra.line();
        assert_eq!(r.error.unwrap().kind, ErrorKind::Unavailable);
        assert!(extra.closed());
        // Once one leaves, another may come.
        drop(clients.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Until the server notices, a newcomer is turned away (as an id-less reply).
            if request(&path, &Request::new(Op::Ping).with_id(1)).is_ok_and(|r| r.ok) {
                break;
            }
            assert!(Instant::now() < deadline, "the departed client's slot is never freed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(clients[0].ask(r#"{"op":"ping"}"#).ok);
        assert!(fake.calls().is_empty());
        drop(_event_loop);
    }

    #[test]
    fn stale_sockets_are_replaced_and_live_ones_refused() {
        let scratch = scratch_dir("stale");
        let dir = scratch.path().to_path_buf();
        let path = dir.join("vm.sock");
        let fake: Arc<dyn VmHandle> = Arc::new(Fake::default());

        // Stale: a socket file nobody listens on.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ApiServer::bind(&path, fake.clone()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        // Live: refused, and the live socket keeps working.
        let e = ApiServer::bind(&path, fake.clone()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(UnixStream::connect(&path).is_ok());
        drop(server);
        assert!(!path.exists());

        // A live socket someone else made.
        let other = UnixListener::bind(&path).unwrap();
        assert_eq!(ApiServer::bind(&path, fake.clone()).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(other);
        std::fs::remove_file(&path).unwrap();

        // Not a socket: left alone.
        std::fs::write(&path, b"precious").unwrap();
        assert!(ApiServer::bind(&path, fake.clone()).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();

        // A server whose file was replaced does not remove the replacement.
        let server = ApiServer::bind(&path, fake.clone()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let replacement = UnixListener::bind(&path).unwrap();
        drop(server);
        assert!(path.exists());
        drop(replacement);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no staging directory is left behind");
    }

    #[test]
    fn sockets_are_found_by_pid() {
        let scratch = scratch_dir("find");
        let dir = scratch.path().to_path_buf();
        let dirs = [dir.clone()];
        let me = std::process::id();
        let dead = 4_000_000_000u32; // above any pid_max
        assert!(matches!(find_socket_in(&dirs, None), Err(ClientError::NotFound(_))));

        let path = dir.join(format!("zapvm-{me}.sock"));
        let server = ApiServer::bind(&path, Arc::new(Fake::default())).unwrap();
        // Unrelated files are ignored and left alone; stale sockets (nobody listens) are ignored
        // and removed, whether their process is gone or its pid was taken by another process
        // (process 1 is alive).
        let dead_socket = dir.join(format!("zapvm-{dead}.sock"));
        let reused_socket = dir.join("zapvm-1.sock");
        drop(UnixListener::bind(&dead_socket).unwrap());
        drop(UnixListener::bind(&reused_socket).unwrap());
        drop(UnixListener::bind(dir.join("zapvm-x.sock")).unwrap());
        std::fs::write(dir.join(format!("zapvm-{}.sock", u32::MAX - 1)), b"not a socket").unwrap();
        assert_eq!(find_socket_in(&dirs, None).unwrap(), path);
        assert!(!dead_socket.exists() && !reused_socket.exists(), "stale sockets are removed");
        assert!(
            dir.join("zapvm-x.sock").exists() && dir.join(format!("zapvm-{}.sock", u32::MAX - 1)).exists()
        );
        assert_eq!(find_socket_in(&dirs, Some(me)).unwrap(), path);
        drop(UnixListener::bind(&dead_socket).unwrap());
        let e = find_socket_in(&dirs, Some(dead)).unwrap_err().to_string();
        assert!(e.contains("no process") && e.contains("was removed"), "{e}");
        assert!(!dead_socket.exists());
        drop(UnixListener::bind(&reused_socket).unwrap());
        let e = find_socket_in(&dirs, Some(1)).unwrap_err().to_string();
        assert!(e.contains("process 1 has no live control socket") && e.contains("was removed"), "{e}");
        assert!(!reused_socket.exists());

        // Two live VMs: ambiguous. (Process 1 is alive; its "socket" is another server.)
        let other = dir.join("zapvm-1.sock");
        let second = ApiServer::bind(&other, Arc::new(Fake::default())).unwrap();
        let e = find_socket_in(&dirs, None).unwrap_err().to_string();
        assert!(e.contains("--pid"), "{e}");
        drop((server, second));

        assert!(default_socket_path(42).ends_with("zapvm-42.sock"));
    }

    #[test]
    fn the_client_times_out() {
        let scratch = scratch_dir("timeout");
        let dir = scratch.path().to_path_buf();
        let path = dir.join("mute.sock");
        let _mute = UnixListener::bind(&path).unwrap();
        // A listener that never accepts nor answers: the request ends with a timeout error (had
        // it not timed out, the test would hang, which the test runner's timeout reports).
        let e = request_with_timeout(&path, &Request::new(Op::Ping), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert!(matches!(
            request(&dir.join("absent.sock"), &Request::new(Op::Ping)),
            Err(ClientError::Connect { .. })
        ));
    }
}
