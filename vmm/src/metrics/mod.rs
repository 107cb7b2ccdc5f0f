//! The VM's statistics for Prometheus: `zapvm run --metrics-addr ADDR` serves `GET /metrics` in
//! the Prometheus text exposition format (version 0.0.4), and `--metrics-file PATH` writes the
//! same text to a file at an interval, for node_exporter's textfile collector.
//!
//! - [`sample`]: [`StatsSample`], one reading of every statistic of a VM, taken by
//!   [`crate::machine::VmControl::sample`]; `zapvm stats` prints it as JSON, the exposition encodes it;
//! - [`exposition`]: the text, encoded by the `prometheus-client` crate (what is exported, under
//!   which names, is documented there);
//! - [`server`]: the HTTP server (`tiny_http`).
//!
//! Life cycle: [`Exporter::new`] binds the address and checks that the file's directory takes
//! files, before any VM exists, so that bad values are refused up front; the VMM
//! ([`crate::machine::run`]) calls [`Exporter::start`] once the VM is built and
//! [`Running::finish`] once its vCPUs stopped — the file is written one last time, the server
//! threads end and the listening socket is closed before `run` returns.

pub mod exposition;
pub mod sample;
pub mod server;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use sample::{KvmSample, StatsSample};

/// Takes a fresh [`StatsSample`] of the VM (the VMM passes [`VmControl::sample`]).
///
/// [`VmControl::sample`]: crate::machine::VmControl::sample
pub type Sampler = Arc<dyn Fn() -> StatsSample + Send + Sync>;

/// What to export, and where.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` here (port 0: any free port; [`Exporter::local_addr`] says which).
    pub addr: Option<SocketAddr>,
    /// Write the exposition to this file, atomically, every `interval` and once at the end.
    pub file: Option<PathBuf>,
    /// How often the file is rewritten; more than zero.
    pub interval: Duration,
    /// The value of every series' `vm` label (`zapvm run`: its process id).
    pub vm_id: String,
}

/// Why the exporter cannot start; each a one-line message naming the value.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be listened on (in use, not local, no permission).
    #[error("cannot serve metrics on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        message: String,
    },
    /// The metrics file's directory does not take files.
    #[error("cannot write the metrics file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A zero (or absurd) interval.
    #[error("the metrics interval must be more than zero, not {0:?}")]
    Interval(Duration),
    /// [`Exporter::start`] of an exporter already started.
    #[error("this metrics exporter already serves a VM")]
    AlreadyStarted,
    /// A server or writer thread could not be spawned.
    #[error("cannot start the metrics threads: {0}")]
    Thread(std::io::Error),
}

/// A metrics exporter ready to serve one VM: its address bound, its file's directory checked.
/// Cheap to clone (clones share the one listener); [`Exporter::start`] succeeds once.
#[derive(Clone)]
pub struct Exporter(Arc<Inner>);

struct Inner {
    config: MetricsConfig,
    server: Mutex<Option<tiny_http::Server>>,
    local_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("config", &self.0.config)
            .field("local_addr", &self.0.local_addr)
            .finish()
    }
}

impl Exporter {
    /// Binds `config.addr` and checks that a file can be made next to `config.file` (the check
    /// leaves nothing behind); nothing is served or written until [`Exporter::start`].
    pub fn new(config: MetricsConfig) -> Result<Self, MetricsError> {
        if config.interval.is_zero() {
            return Err(MetricsError::Interval(config.interval));
        }
        if let Some(path) = &config.file {
            check_file(path).map_err(|source| MetricsError::File { path: path.clone(), source })?;
        }
        let (server, local_addr) = match config.addr {
            Some(addr) => {
                let server = tiny_http::Server::http(addr)
                    .map_err(|e| MetricsError::Bind { addr, message: e.to_string() })?;
                let local = server.server_addr().to_ip();
                (Some(server), local)
            }
            None => (None, None),
        };
        Ok(Self(Arc::new(Inner { config, server: Mutex::new(server), local_addr })))
    }

    /// The address the server listens on (the port chosen when `addr` had port 0), if it serves.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0.local_addr
    }

    /// The configuration.
    pub fn config(&self) -> &MetricsConfig {
        &self.0.config
    }

    /// Starts serving and writing the statistics `sample` takes: the HTTP server's threads
    /// (answering every request with a fresh sample) and the file writer's (a first write at
    /// once, then one every interval). Stops when the returned [`Running`] is finished or dropped.
    pub fn start(&self, sample: Sampler) -> Result<Running, MetricsError> {
        let server = match &self.0.config.addr {
            Some(_) => Some(
                self.0
                    .server
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or(MetricsError::AlreadyStarted)?,
            ),
            None => None,
        };
        let stop = Arc::new(Stop::default());
        let render: Arc<dyn Fn() -> String + Send + Sync> = {
            let id = self.0.config.vm_id.clone();
            Arc::new(move || exposition::encode(&sample(), &id))
        };
        let mut running =
            Running { stop, http: None, threads: Vec::new(), file: None, render: render.clone() };
        if let Some(server) = server {
            running.http = Some(
                server::spawn(server, render.clone(), running.stop.clone()).map_err(MetricsError::Thread)?,
            );
        }
        if let Some(path) = &self.0.config.file {
            running.file = Some(path.clone());
            let (path, stop, interval) = (path.clone(), running.stop.clone(), self.0.config.interval);
            let writer = std::thread::Builder::new()
                .name("metrics-file".into())
                .spawn(move || loop {
                    if let Err(e) = write_atomically(&path, &render()) {
                        tracing::warn!("metrics file {}: {e}", path.display());
                    }
                    if stop.wait(interval) {
                        return;
                    }
                })
                .map_err(MetricsError::Thread)?;
            running.threads.push(writer);
        }
        Ok(running)
    }
}

/// A stop flag its waiters see at once (no polling).
#[derive(Default)]
pub(crate) struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    pub(crate) fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the flag; whether it is set.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) =
            self.changed.wait_timeout_while(guard, timeout, |s| !*s).unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// The exporter of a running VM (see [`Exporter::start`]).
pub struct Running {
    stop: Arc<Stop>,
    http: Option<server::Handle>,
    threads: Vec<JoinHandle<()>>,
    file: Option<PathBuf>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
}

impl Running {
    /// Stops the server and the writer (joining their threads, which closes the listening
    /// socket), then writes the file a last time. Call once the VM's vCPUs stopped, so the last
    /// file holds the run's final counts.
    pub fn finish(mut self) {
        self.stop_threads();
        if let Some(path) = &self.file {
            if let Err(e) = write_atomically(path, &(self.render)()) {
                tracing::warn!("metrics file {}: {e}", path.display());
            }
        }
    }

    fn stop_threads(&mut self) {
        self.stop.set();
        if let Some(http) = self.http.take() {
            http.stop(&self.stop);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!("a metrics thread panicked");
            }
        }
    }
}

impl Drop for Running {
    /// Stops the threads (without the last write of [`Running::finish`]).
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The temporary file a write of `path` goes through: in the same directory (so the rename is
/// atomic), hidden and without `path`'s extension (node_exporter reads only `*.prom`), and
/// private to this process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Replaces `path` with `text` atomically: a reader sees the old file or the new one, whole.
/// Writes a temporary file next to it, syncs it to disk, renames it over `path` and syncs the
/// directory.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Some(dir) = parent(path) {
        // The rename is durable once the directory is; a failure here loses no data now.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn parent(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

/// Whether the file can be written the way [`write_atomically`] does: its name is a file name,
/// it is not a directory, and its directory takes a new file (made and removed again).
fn check_file(path: &Path) -> std::io::Result<()> {
    if path.file_name().is_none() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"));
    }
    if path.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "it is a directory"));
    }
    let tmp = temp_path(path);
    std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    std::fs::remove_file(&tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zapvm.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("zapvm.prom")]);
    }

    #[test]
    fn bad_files_and_intervals_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let config = |file: PathBuf, interval| MetricsConfig {
            addr: None,
            file: Some(file),
            interval,
            vm_id: "t".into(),
        };
        let err = Exporter::new(config(dir.path().join("no/such/dir/m.prom"), Duration::from_secs(1)));
        assert!(matches!(err, Err(MetricsError::File { .. })), "{err:?}");
        let err = Exporter::new(config(dir.path().to_path_buf(), Duration::from_secs(1)));
        assert!(err.unwrap_err().to_string().contains("it is a directory"));
        let err = Exporter::new(config(dir.path().join("m.prom"), Duration::ZERO));
        assert!(matches!(err, Err(MetricsError::Interval(_))), "{err:?}");
        // The good one leaves nothing behind until it starts.
        Exporter::new(config(dir.path().join("m.prom"), Duration::from_secs(1))).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_stop_wakes_its_waiter_at_once() {
        let stop = Arc::new(Stop::default());
        let waiter = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.wait(Duration::from_secs(600)))
        };
        stop.set();
        assert!(waiter.join().unwrap(), "the waiter saw the flag, long before its timeout");
        assert!(!Stop::default().wait(Duration::from_millis(1)), "an unset flag times out");
    }
}
