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
//! - at most [`MAX_CLIENTS`] connections. A client that has not completed `qmp_capabilities`
//!   within [`Limits::handshake_timeout`] of connecting is told so and disconnected; when the
//!   table is full, a new connection takes the place of the longest-idle client (no request for
//!   [`Limits::idle_eviction`] or more), which is told so and disconnected; otherwise the new one
//!   is told the table is full and closed. So clients that connect and never speak cannot lock
//!   everyone else out; both kinds of disconnection are counted ([`ServerCounters`]);
//! - a client that lets more than [`MAX_PENDING_OUTPUT`] bytes of replies and events pile up
//!   unread is disconnected (the VMM never blocks on a client, nor buffers without bound);
//! - at most [`READ_BUDGET`] bytes read from one client per wake-up, [`ACCEPT_BUDGET`] accepts,
//!   and at most [`Limits::commands_per_pass`] commands executed for one client per event-loop
//!   pass: requests beyond that stay buffered (and the client's socket is not read meanwhile)
//!   and are answered, in order, on the next passes, which the server asks for through an
//!   eventfd of its own — one busy client (thousands of requests in one write) cannot starve the
//!   others or the rest of the event loop.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

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

/// The server's time and work limits per client (see the module docs); [`Limits::default`] is
/// what a VM's control socket uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A client must complete `qmp_capabilities` within this long of connecting (10 s).
    pub handshake_timeout: Duration,
    /// When the table is full, a client that sent no request for this long (60 s) may be
    /// disconnected to make room for a new one (the longest-idle first).
    pub idle_eviction: Duration,
    /// Most commands executed for one client per event-loop pass (64).
    pub commands_per_pass: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_eviction: Duration::from_secs(60),
            commands_per_pass: 64,
        }
    }
}

/// What the server did to bound its clients, counted since it was bound.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Clients disconnected for not completing `qmp_capabilities` in time.
    pub handshake_timeouts: AtomicU64,
    /// Idle clients disconnected to make room for a new one (the table was full).
    pub idle_evictions: AtomicU64,
    /// Connections refused because the table was full and nobody was idle long enough.
    pub refused: AtomicU64,
    /// Passes that left a client's requests buffered for the next pass (its budget was spent).
    pub deferred: AtomicU64,
}

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
    /// Requests received, not yet executed (at most one pass's budget is executed at a time).
    backlog: VecDeque<Frame>,
    /// When it connected (the handshake's deadline counts from here).
    connected: Instant,
    /// When it last sent a request (or connected).
    active: Instant,
}

impl Connection {
    fn new(stream: UnixStream, watched: EventSet, now: Instant) -> Self {
        let mut conn = Connection {
            stream,
            session: Session::new(),
            framer: Framer::new(),
            output: Vec::new(),
            written: 0,
            read_closed: false,
            watched,
            backlog: VecDeque::new(),
            connected: now,
            active: now,
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

    /// Executes up to `budget` buffered requests, in order, queueing their replies. Stops early
    /// (returning false: drop the client) once more than [`MAX_PENDING_OUTPUT`] bytes of output
    /// cannot be written.
    fn execute(&mut self, budget: usize, vm: &dyn VmHandle) -> io::Result<bool> {
        for _ in 0..budget {
            let Some(frame) = self.backlog.pop_front() else { break };
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

    /// Reads what the client sent (up to [`READ_BUDGET`] bytes, and no more once `budget`
    /// requests are buffered) and cuts it into buffered requests.
    fn read_input(&mut self, budget: usize, now: Instant) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        let mut bytes = READ_BUDGET;
        let mut frames = Vec::new();
        while bytes > 0 && !self.read_closed && self.backlog.len() < budget {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.read_closed = true;
                    // A last request without its end is still a request.
                    if let Some(frame) = self.framer.finish() {
                        self.backlog.push_back(frame);
                    }
                }
                Ok(n) => {
                    bytes = bytes.saturating_sub(n);
                    self.framer.push(&buf[..n], &mut frames);
                    if !frames.is_empty() {
                        self.active = now;
                    }
                    self.backlog.extend(frames.drain(..));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

    /// What to watch now: input until the client's EOF while no request waits for a later
    /// pass (the socket is the buffer meanwhile), output while lines wait.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.read_closed && self.backlog.is_empty() {
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
    limits: Limits,
    counters: Arc<ServerCounters>,
    /// Signalled while some client has requests buffered for a later pass.
    more: EventFd,
    /// Expires at the earliest handshake deadline (never read: re-armed or cleared whenever it
    /// fires, which also resets its expirations, so it never blocks).
    timer: TimerFd,
    /// What the timer is armed for.
    armed: Option<Instant>,
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
            limits: Limits::default(),
            counters: Arc::new(ServerCounters::default()),
            more: EventFd::new(EFD_NONBLOCK)?,
            timer: TimerFd::new()?,
            armed: None,
        })
    }

    /// The same server with other limits (tests use short timeouts).
    pub fn with_limits(mut self, limits: Limits) -> ApiServer {
        self.limits = Limits { commands_per_pass: limits.commands_per_pass.max(1), ..limits };
        self
    }

    /// What the server has done to bound its clients, updated as it runs.
    pub fn counters(&self) -> Arc<ServerCounters> {
        self.counters.clone()
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
            let now = Instant::now();
            if self.clients.len() >= MAX_CLIENTS && !self.evict_idle(now, ops) {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                let error =
                    QmpError::generic(format!("too many clients (at most {MAX_CLIENTS}); try again later"));
                let _ = send(&stream, format!("{}\n", reply_line(None, Err(error))).as_bytes());
                continue; // dropping `stream` disconnects it
            }
            let mut conn = Connection::new(stream, EventSet::empty(), now);
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

    /// Makes room for a new client when the table is full: disconnects the longest-idle client
    /// if it sent no request for [`Limits::idle_eviction`]. Whether it did.
    fn evict_idle(&mut self, now: Instant, ops: &mut EventOps) -> bool {
        let idlest = self.clients.iter().min_by_key(|(_, c)| c.active).map(|(&fd, c)| (fd, c.active));
        match idlest {
            Some((fd, active)) if now.duration_since(active) >= self.limits.idle_eviction => {
                let idle = now.duration_since(active);
                tracing::info!("control socket: disconnecting a client idle for {idle:?} to make room");
                self.counters.idle_evictions.fetch_add(1, Ordering::Relaxed);
                self.tell_and_disconnect(
                    fd,
                    format!("disconnected after {idle:?} without a request: the table of {MAX_CLIENTS} clients is full"),
                    ops,
                );
                true
            }
            _ => false,
        }
    }

    /// Sends client `fd` an error line (if its socket takes it now), then disconnects it.
    fn tell_and_disconnect(&mut self, fd: RawFd, why: String, ops: &mut EventOps) {
        if let Some(conn) = self.clients.get_mut(&fd) {
            conn.queue(reply_line(None, Err(QmpError::generic(why))));
            let _ = conn.flush();
        }
        self.disconnect(fd, ops);
    }

    /// Disconnects the clients whose handshake deadline has passed; re-arms the timer for the
    /// next deadline.
    fn expire_handshakes(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        let timeout = self.limits.handshake_timeout;
        let late: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.session.negotiated() && now.duration_since(c.connected) >= timeout)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            tracing::info!("control socket: a client did not negotiate within {timeout:?}; disconnecting it");
            self.counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            self.tell_and_disconnect(
                fd,
                format!("no qmp_capabilities within {timeout:?} of connecting"),
                ops,
            );
        }
        self.armed = None; // it fired: set it again (or clear it) whatever it was armed for
        self.arm_timer();
    }

    /// Arms the timer for the earliest handshake deadline of the clients not negotiated yet,
    /// or clears it if there is none (a syscall only when that changes).
    fn arm_timer(&mut self) {
        let timeout = self.limits.handshake_timeout;
        let next =
            self.clients.values().filter(|c| !c.session.negotiated()).map(|c| c.connected + timeout).min();
        if next == self.armed && next.is_some() {
            return;
        }
        let r = match next {
            // At least 1 ms: a zero duration would disarm it.
            Some(at) => self
                .timer
                .reset(at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            tracing::warn!("control socket: cannot arm the handshake timer: {e}");
        }
        self.armed = next;
    }

    /// One pass for client `fd`: what it sent is read (if nothing is buffered), at most
    /// [`Limits::commands_per_pass`] requests are executed, and what they answered is written.
    /// Requests left over are executed on the next passes ([`ApiServer::more`]).
    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.clients.get_mut(&fd) else { return };
        let budget = self.limits.commands_per_pass;
        let keep = (|| -> io::Result<bool> {
            if events.contains(EventSet::ERROR) {
                return Ok(false);
            }
            if !conn.read_closed
                && conn.backlog.is_empty()
                && events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
            {
                conn.read_input(budget, Instant::now())?;
            }
            if !conn.execute(budget, self.handle.as_ref())? {
                tracing::warn!("control socket: a client does not read its replies; disconnecting it");
                return Ok(false);
            }
            if events.contains(EventSet::HANG_UP) {
                return Ok(false); // nobody to write to
            }
            conn.flush()?;
            Ok(!(conn.read_closed && conn.pending() == 0 && conn.backlog.is_empty()))
        })()
        .unwrap_or(false);
        if !keep {
            self.disconnect(fd, ops);
            return;
        }
        if !conn.backlog.is_empty() {
            self.counters.deferred.fetch_add(1, Ordering::Relaxed);
            // Level-triggered: the loop calls back (after the other ready subscribers).
            let _ = self.more.write(1);
        }
        self.rewatch(fd, ops);
    }

    /// The next pass for every client with requests left over.
    fn serve_backlogs(&mut self, ops: &mut EventOps) {
        // Reset before serving: a client that still has some after this pass signals again.
        let _ = self.more.read();
        let fds: Vec<RawFd> =
            self.clients.iter().filter(|(_, c)| !c.backlog.is_empty()).map(|(&fd, _)| fd).collect();
        for fd in fds {
            self.serve(fd, EventSet::empty(), ops);
        }
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
        } else if events.fd() == self.more.as_raw_fd() {
            self.serve_backlogs(ops);
        } else if events.fd() == self.timer.as_raw_fd() {
            self.expire_handshakes(ops);
        } else {
            self.serve(events.fd(), events.event_set(), ops);
        }
        // A client came, negotiated or went: the next handshake deadline may have changed.
        self.arm_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the listener: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.events.fd(), EventSet::IN)) {
            tracing::error!("control socket: cannot watch the event queue: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.more, EventSet::IN)) {
            tracing::error!("control socket: cannot watch its own backlog signal: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the handshake timer: {e:?}");
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
