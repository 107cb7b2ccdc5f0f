//! The control socket of a running VM, served on the VMM's event loop: QMP's life cycle per
//! connection (greeting, capabilities negotiation, commands, events), many clients at once, each
//! bounded in what it may make the VMM buffer.
//!
//! # Security
//!
//! The socket is created with mode 0600 with no window in which another user could connect:
//! it is bound inside a fresh private directory (mode 0700) next to its final path, chmod-ed
//! to 0600 there, and only then hard-linked to its final name (a link never replaces an
//! existing file). The process umask is never changed (it is process-wide, and other threads
//! may be creating files).
//!
//! # Bounds
//!
//! - a request is at most [`super::MAX_LINE`] bytes: a longer one is dropped as it arrives and
//!   answered with an error, the connection goes on;
//! - at most [`MAX_CLIENTS`] connections; one more is told so and closed;
//! - a client that lets more than [`MAX_PENDING_OUTPUT`] bytes of replies and events pile up
//!   unread is disconnected (the VMM never blocks on a client, nor buffers without bound);
//! - at most [`READ_BUDGET`] bytes read from one client per wake-up, [`ACCEPT_BUDGET`] accepts:
//!   one busy client cannot starve the others or the rest of the event loop.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::commands::{handle_line, Session, VmHandle};
use super::events::EventQueue;
use super::protocol::{greeting_line, reply_line, too_long, Frame, Framer, QmpError};

/// Most clients connected at once.
pub const MAX_CLIENTS: usize = 16;
/// Most bytes of replies and events waiting for one client before it is disconnected.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Most bytes read from one client per wake-up.
pub const READ_BUDGET: usize = 64 * 1024;
/// Most connections accepted per wake-up.
pub const ACCEPT_BUDGET: usize = 64;

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
    session: Session,
    /// Cuts the client's bytes into requests.
    framer: Framer,
    /// Replies and events not yet written, from `written` on.
    output: Vec<u8>,
    written: usize,
    /// The client shut down its sending side (or it sent an EOF).
    read_closed: bool,
    /// What the connection is registered for.
    watched: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, watched: EventSet) -> Self {
        let mut conn = Connection {
            stream,
            session: Session::new(),
            framer: Framer::new(),
            output: Vec::new(),
            written: 0,
            read_closed: false,
            watched,
        };
        conn.queue(greeting_line());
        conn
    }

    fn pending(&self) -> usize {
        self.output.len() - self.written
    }

    fn queue(&mut self, line: String) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.push(b'\n');
    }

    fn answer(&mut self, frame: Frame, vm: &dyn VmHandle) {
        let reply = match frame {
            Frame::Request(bytes) => handle_line(&mut self.session, &bytes, vm),
            Frame::TooLong => reply_line(None, Err(too_long())),
        };
        self.queue(reply);
    }

    /// The client's bytes: complete requests are answered, the rest kept. Stops early
    /// (returning false) once more than [`MAX_PENDING_OUTPUT`] bytes of output cannot be
    /// written.
    fn feed(&mut self, data: &[u8], vm: &dyn VmHandle) -> io::Result<bool> {
        let mut frames = Vec::new();
        self.framer.push(data, &mut frames);
        for frame in frames {
            if self.pending() > MAX_PENDING_OUTPUT {
                self.flush()?;
                if self.pending() > MAX_PENDING_OUTPUT {
                    return Ok(false);
                }
            }
            self.answer(frame, vm);
        }
        if self.pending() > MAX_PENDING_OUTPUT {
            self.flush()?;
        }
        Ok(self.pending() <= MAX_PENDING_OUTPUT)
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
                    // A last request without its end is still a request.
                    if let Some(frame) = self.framer.finish() {
                        self.answer(frame, vm);
                    }
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

    /// Writes what it can of the pending output.
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

    /// What to watch now: input until the client's EOF, output while lines wait.
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
/// listener and its event queue's eventfd in `init`, and each client as it connects. Each
/// client is greeted, then its requests are answered with [`handle_line`] against the
/// [`VmHandle`] as they arrive, and the [`EventQueue`]'s events are written to every client
/// that completed negotiation. Dropping it writes what events are still queued to the clients
/// that can take them without waiting, and removes the socket file (if it is still this
/// server's).
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, to remove it on drop only if it is still ours.
    identity: (u64, u64),
    handle: Arc<dyn VmHandle>,
    events: Arc<EventQueue>,
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
    /// Creates the socket at `path` (mode 0600, listening, non-blocking), serving `handle` and
    /// the events of `events`.
    ///
    /// A socket file nobody listens on is replaced; a live socket or any other file at `path`
    /// is an error.
    pub fn bind(
        path: impl AsRef<Path>,
        handle: Arc<dyn VmHandle>,
        events: Arc<EventQueue>,
    ) -> io::Result<ApiServer> {
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
        Ok(ApiServer {
            listener,
            path,
            identity: (meta.dev(), meta.ino()),
            handle,
            events,
            clients: HashMap::new(),
        })
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
                    tracing::warn!("control socket: accept: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                let error =
                    QmpError::generic(format!("too many clients (at most {MAX_CLIENTS}); try again later"));
                let _ = send(&stream, format!("{}\n", reply_line(None, Err(error))).as_bytes());
                continue; // dropping `stream` disconnects it
            }
            let mut conn = Connection::new(stream, EventSet::empty());
            // The greeting is written now if the socket takes it (it always does, being a few
            // hundred bytes into an empty buffer); the rest waits for EPOLLOUT.
            if conn.flush().is_err() {
                continue;
            }
            let watched = conn.wanted();
            if let Err(e) = ops.add(Events::new(&conn.stream, watched)) {
                tracing::warn!("control socket: cannot watch a client: {e:?}");
                continue;
            }
            conn.watched = watched;
            self.clients.insert(conn.stream.as_raw_fd(), conn);
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
                tracing::warn!("control socket: a client does not read its replies; disconnecting it");
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
        self.rewatch(fd, ops);
    }

    /// Registers client `fd` for what it waits for now.
    fn rewatch(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.clients.get_mut(&fd) else { return };
        let wanted = conn.wanted();
        if wanted != conn.watched {
            if let Err(e) = ops.modify(Events::new(&conn.stream, wanted)) {
                tracing::warn!("control socket: cannot watch a client: {e:?}");
                self.disconnect(fd, ops);
                return;
            }
            conn.watched = wanted;
        }
    }

    /// Writes the queued events to every negotiated client; one that has more than
    /// [`MAX_PENDING_OUTPUT`] bytes unread is disconnected.
    fn deliver_events(&mut self, ops: &mut EventOps) {
        let lines = self.events.drain();
        if lines.is_empty() {
            return;
        }
        let fds: Vec<RawFd> = self.clients.keys().copied().collect();
        for fd in fds {
            let Some(conn) = self.clients.get_mut(&fd) else { continue };
            if !conn.session.negotiated() {
                continue;
            }
            for line in &lines {
                conn.queue(line.clone());
            }
            let ok = conn.flush().is_ok() && conn.pending() <= MAX_PENDING_OUTPUT;
            if !ok {
                tracing::warn!("control socket: a client does not read its events; disconnecting it");
                self.disconnect(fd, ops);
                continue;
            }
            self.rewatch(fd, ops);
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
        } else if events.fd() == self.events.fd().as_raw_fd() {
            self.deliver_events(ops);
        } else {
            self.serve(events.fd(), events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the listener: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.events.fd(), EventSet::IN)) {
            tracing::error!("control socket: cannot watch the event queue: {e:?}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The last events (the VM's SHUTDOWN): to every negotiated client that takes them now.
        let lines = self.events.drain();
        for conn in self.clients.values_mut().filter(|c| c.session.negotiated()) {
            for line in &lines {
                conn.queue(line.clone());
            }
            let _ = conn.flush();
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
