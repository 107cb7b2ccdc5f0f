//! The client side of the control socket, for the `zapvm` commands that talk to a running VM
//! (`balloon`, `mem`, `pause`, `resume`, `quit`, `stats`): finding a VM's socket, and a QMP
//! client that reads the greeting, negotiates capabilities, runs commands and collects the
//! events that arrive meanwhile.
//!
//! A VM's socket is `zapvm-<pid>.sock`, or `zapvm-<id>.sock` for a VM started with `--id`, in
//! [`runtime_dir`]; [`find_socket`] picks one by pid, by id, or the only live one, and removes
//! the sockets of VMs that are gone on the way ([`probe_socket`]).

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::{QmpError, Reply, Request};

/// How long a client waits for the VM by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line a client accepts from the VM.
pub const MAX_REPLY: usize = 16 << 20;

/// Which VM a client talks to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Target {
    /// The only VM with a live socket.
    #[default]
    Only,
    /// The VM in process `pid` (its default socket).
    Pid(u32),
    /// The VM started with `--id`.
    Id(String),
}

/// Whether `id` may name a VM: 1 to 64 ASCII letters, digits, `-`, `.` and `_`, starting with a
/// letter (QEMU's rule for ids, which also keeps an id from reading as a pid).
pub fn check_vm_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("VM id {id:?}: give 1 to 64 letters, digits, '-', '.' or '_', starting with a letter"))
    }
}

/// The default control socket of the VM named `id`: `<runtime dir>/zapvm-<id>.sock`.
pub fn named_socket_path(id: &str) -> PathBuf {
    runtime_dir().join(format!("zapvm-{id}.sock"))
}

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

/// The `zapvm-<name>.sock` sockets in `dirs`, by name (a pid or an id), the first directory's
/// where two hold the same name.
fn sockets_in(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix("zapvm-")?.strip_suffix(".sock"))
            else {
                continue;
            };
            let valid = name.parse::<u32>().is_ok() || check_vm_id(name).is_ok();
            if valid
                && entry.file_type().is_ok_and(|t| t.is_socket())
                && !found.iter().any(|(n, _)| n == name)
            {
                found.push((name.to_string(), entry.path()));
            }
        }
    }
    found.sort();
    found
}

/// The control socket of `target` (looking in [`runtime_dir`] and the temporary directory).
///
/// A socket nobody listens on (its VM was killed, or ended without removing it) is never
/// chosen; it is removed on the way (see [`probe_socket`]).
pub fn find_socket(target: &Target) -> Result<PathBuf, ClientError> {
    let mut dirs = vec![runtime_dir()];
    let tmp = std::env::temp_dir();
    if !dirs.contains(&tmp) {
        dirs.push(tmp);
    }
    find_socket_in(&dirs, target)
}

#[cfg(test)]
pub(super) fn find_socket_in_for_tests(dirs: &[PathBuf], target: &Target) -> Result<PathBuf, ClientError> {
    find_socket_in(dirs, target)
}

fn find_socket_in(dirs: &[PathBuf], target: &Target) -> Result<PathBuf, ClientError> {
    let where_ = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ");
    let sockets = sockets_in(dirs);
    let name = match target {
        Target::Only => None,
        Target::Pid(pid) => Some(pid.to_string()),
        Target::Id(id) => {
            check_vm_id(id).map_err(ClientError::NotFound)?;
            Some(id.clone())
        }
    };
    match name {
        Some(name) => {
            let stale = match sockets.into_iter().find(|(n, _)| *n == name) {
                // (A socket it cannot judge goes to the request, which says what is wrong.)
                Some((_, path)) if probe_socket(&path) != SocketState::Stale => return Ok(path),
                Some((_, path)) => Some(path),
                None => None,
            };
            let stale =
                stale.map(|p| format!(" (its stale socket {} was removed)", p.display())).unwrap_or_default();
            match target {
                Target::Pid(pid) if pid_alive(*pid) => Err(ClientError::NotFound(format!(
                    "process {pid} has no live control socket zapvm-{pid}.sock in {where_} (is it a `zapvm run`? \
                     one started with --id is reached with --id){stale}"
                ))),
                Target::Pid(pid) => Err(ClientError::NotFound(format!("no process {pid}{stale}"))),
                _ => Err(ClientError::NotFound(format!(
                    "no running VM has the id {name:?} (no live zapvm-{name}.sock in {where_}){stale}"
                ))),
            }
        }
        None => {
            // A socket is live if something accepts on it (a VM that was killed leaves its
            // socket file behind: removed here).
            let live: Vec<(String, PathBuf)> =
                sockets.into_iter().filter(|(_, path)| probe_socket(path) == SocketState::Live).collect();
            match live.len() {
                0 => Err(ClientError::NotFound(format!(
                    "no running VM has a control socket (zapvm-<pid or id>.sock) in {where_}"
                ))),
                1 => Ok(live.into_iter().next().map(|(_, p)| p).unwrap_or_default()),
                _ => Err(ClientError::NotFound(format!(
                    "{} VMs are running ({}); choose one with --pid or --id",
                    live.len(),
                    live.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
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
/// name (see [`super::ApiServer::bind`]), so this is never a VM that is still starting. The file is
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

/// `path` if it is a Unix socket; otherwise a one-line error saying what it is instead (missing,
/// not a socket, unreadable). A socket no VM listens on any more is found out by the request.
pub fn socket_at(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(path.to_path_buf()),
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            Err(format!("--api-socket {shown} is {what}, not a VM's control socket"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "--api-socket {shown}: no such socket (is the VM running with --api-socket {shown}?)"
        )),
        Err(e) => Err(format!("--api-socket {shown}: {e}")),
    }
}

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
    Qmp(#[from] QmpError),
}

/// A QMP connection to a VM: greeted and negotiated by [`QmpClient::connect`].
pub struct QmpClient {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read and not yet taken as lines.
    buffer: Vec<u8>,
    greeting: Value,
    next_id: u64,
    /// Events that arrived while waiting for replies, oldest first.
    events: std::collections::VecDeque<Value>,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to the socket at `path`, reads the greeting and negotiates capabilities, each
    /// step waiting at most `timeout` for the VM.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        let mut client = QmpClient {
            stream,
            path: path.to_path_buf(),
            buffer: Vec::new(),
            greeting: Value::Null,
            next_id: 1,
            events: Default::default(),
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = client.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(client.bad(format!("the first line is not a QMP greeting: {greeting}")));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    /// The greeting the VM sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    fn bad(&self, message: String) -> ClientError {
        ClientError::BadReply { path: self.path.clone(), message }
    }

    fn io(&self, source: io::Error) -> ClientError {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ClientError::Timeout { path: self.path.clone(), timeout: self.timeout }
        } else {
            ClientError::Io { path: self.path.clone(), source }
        }
    }

    /// The next JSON object from the VM, waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, ClientError> {
        loop {
            if let Some(i) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map_err(|e| self.bad(format!("not JSON: {e}")));
            }
            if self.buffer.len() > MAX_REPLY {
                return Err(self.bad(format!("a line longer than {MAX_REPLY} bytes")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout { path: self.path.clone(), timeout: self.timeout });
            }
            self.stream.set_read_timeout(Some(left)).map_err(|e| self.io(e))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(self.bad("the VM closed the connection".into())),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    /// Runs `command` with `arguments` (an object, or `Null` for none): its `return`, or its
    /// error as [`ClientError::Qmp`]. Events that arrive first are kept for
    /// [`QmpClient::next_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = format!("zapvm-{}-{}", std::process::id(), self.next_id);
        self.next_id += 1;
        let request = Request::new(command).with_arguments(arguments).with_id(id.clone());
        self.stream
            .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            .map_err(|e| self.io(e))?;
        self.stream.write_all(request.to_line().as_bytes()).map_err(|e| self.io(e))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message(deadline)?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            let reply: Reply =
                serde_json::from_value(message.clone()).map_err(|e| self.bad(format!("{e}: {message}")))?;
            match &reply.id {
                Some(Value::String(got)) if *got == id => return Ok(reply.into_result()?),
                // An error without an id: the VM could not parse the request.
                None if reply.error.is_some() => return Ok(reply.into_result()?),
                _ => return Err(self.bad(format!("a reply to another request: {message}"))),
            }
        }
    }

    /// The next event, waiting at most `timeout` for one (`None` if none came).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        match self.read_message(Instant::now() + timeout) {
            Ok(message) if message.get("event").is_some() => Ok(Some(message)),
            Ok(message) => Err(self.bad(format!("a reply nobody asked for: {message}"))),
            Err(ClientError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Runs `command` with `arguments` on the VM at `path` (connecting, negotiating, waiting at most
/// [`DEFAULT_TIMEOUT`] per step): its `return`.
pub fn call(path: &Path, command: &str, arguments: Value) -> Result<Value, ClientError> {
    QmpClient::connect(path, DEFAULT_TIMEOUT)?.execute(command, arguments)
}
