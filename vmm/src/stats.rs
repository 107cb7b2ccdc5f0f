//! Statistics of a running VM on demand: `zapvm stats`.
//!
//! Until the VM has a control socket, a running `zapvm run` answers `SIGUSR1` by writing a JSON
//! snapshot — KVM's VM and vCPU statistics, the VMM's table, the notifier's counters, external
//! teardowns — to [`stats_path`]`(pid)`; `zapvm stats --pid PID` sends the signal and prints the
//! file once it is rewritten. The signal handler only writes to an eventfd (async-signal-safe);
//! the VMM's event loop does the work.
//!
//! The file lives in a directory private to the VM's user, [`stats_dir`]`(pid)` in the runtime
//! directory (`$XDG_RUNTIME_DIR`, else the temporary directory): created mode 0700, or taken
//! over only if it is a real directory (not a symlink) owned by this user that nobody else may
//! enter; the snapshot is written to a new file there (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600)
//! and renamed into place, so neither another user nor a planted symlink can redirect the VMM's
//! write (a VMM that runs as root would otherwise write wherever a link in /tmp points). The
//! directory goes when the VM ends ([`remove_snapshots`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The eventfd the handler wakes the event loop with (-1 while no VM runs).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigusr1(_: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` lives across the call; a failed write
        // (eventfd counter full) only loses a redundant wake-up.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Installs the `SIGUSR1` handler. Call once at program start, before any VM exists, so that an
/// early `zapvm stats` cannot kill the process with the signal's default action.
pub fn install_signal_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a plain handler (no SA_SIGINFO) and an empty mask is valid;
    // the handler only loads an atomic and calls write(2).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Points the handler at `fd` (the VM's event loop) or, with -1, at nothing.
pub fn set_wake_fd(fd: i32) {
    WAKE_FD.store(fd, Ordering::Relaxed);
}

/// The private directory of the VM with process id `pid` (see the module docs).
pub fn stats_dir(pid: u32) -> PathBuf {
    crate::api::client::runtime_dir().join(format!("zapvm-{pid}.d"))
}

/// Where the VM with process id `pid` writes its statistics.
pub fn stats_path(pid: u32) -> PathBuf {
    stats_dir(pid).join("stats.json")
}

/// This process's private directory: created mode 0700, or an existing one accepted only if it
/// is a directory (not a symlink) owned by this user with no access for group or others.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = stats_dir(std::process::id());
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => return Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} exists and is not a directory private to this user (not touching it)", dir.display()),
        ));
    }
    Ok(dir)
}

/// Writes `json` to [`stats_path`] of this process, atomically (a new file, then rename).
pub fn write_snapshot(json: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = private_dir()?;
    let tmp = dir.join("stats.json.tmp");
    // A leftover of an interrupted write; in a directory only this user can enter.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(json.as_bytes())?;
    drop(file);
    std::fs::rename(tmp, dir.join("stats.json"))
}

/// Removes this process's private directory and what it holds (the VM ended).
pub fn remove_snapshots() {
    let dir = stats_dir(std::process::id());
    for name in ["stats.json", "stats.json.tmp"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(&dir);
}

/// The running `zapvm run` processes (by `/proc/*/cmdline`).
pub fn running_vms() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"zapvm")) && args.get(1) == Some(&&b"run"[..])
            })
        })
        .collect()
}

/// Whether process `pid` catches `SIGUSR1` (its `SigCgt` mask in /proc): a zapvm that has not
/// installed its handler yet — or any other process — would be killed by the signal.
fn catches_sigusr1(pid: u32) -> Result<bool, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("no process {pid}: {e}"))?;
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .ok_or_else(|| format!("cannot read the signal mask of process {pid}"))?;
    Ok(caught & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// Asks VM `pid` for a snapshot and returns it, waiting at most `timeout`; the snapshot's file is
/// removed once read.
pub fn request(pid: u32, timeout: Duration) -> Result<String, String> {
    let path = stats_path(pid);
    // A snapshot that exists after this removal was written for this request. (Comparing mtimes
    // does not work: the kernel stamps files with a coarse clock that lags `SystemTime::now`.)
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove the old snapshot {}: {e}", path.display())),
    }
    let deadline = Instant::now() + timeout;
    let mut next_signal = Instant::now();
    loop {
        if Instant::now() >= next_signal && catches_sigusr1(pid)? {
            // SAFETY: kill(2) with a pid and a signal number; no memory is involved. The process
            // catches SIGUSR1 (checked just above), so the signal cannot kill it.
            if unsafe { libc::kill(pid as i32, libc::SIGUSR1) } != 0 {
                return Err(format!("cannot signal process {pid}: {}", std::io::Error::last_os_error()));
            }
            // The VM may not have started its event loop yet: ask again now and then.
            next_signal = Instant::now() + Duration::from_millis(500);
        }
        match std::fs::read_to_string(&path) {
            Ok(json) => {
                // The snapshot was for this request alone: nothing is left behind.
                let _ = std::fs::remove_file(&path);
                return Ok(json);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if Instant::now() >= deadline {
            return Err(if catches_sigusr1(pid)? {
                format!("process {pid} wrote no statistics within {timeout:?} (is it a running `zapvm run`?)")
            } else {
                format!("process {pid} does not answer statistics requests (it is not a running `zapvm run`)")
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn snapshots_go_only_to_a_directory_private_to_this_user() {
        let scratch = tempfile::tempdir().unwrap();
        // This test's process is alone with its environment under nextest (one process per
        // test); under `cargo test` no other test of this crate reads XDG_RUNTIME_DIR for a
        // file it writes.
        std::env::set_var("XDG_RUNTIME_DIR", scratch.path());
        let dir = stats_dir(std::process::id());
        assert!(dir.starts_with(scratch.path()));

        // A planted symlink to somewhere else: refused, nothing written there.
        let elsewhere = scratch.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let e = write_snapshot("{}").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        std::fs::remove_file(&dir).unwrap();

        // A directory others may enter: refused.
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(write_snapshot("{}").is_err());
        std::fs::remove_dir(&dir).unwrap();

        // Fresh: a 0700 directory, a 0600 file, replaced whole on the next write.
        write_snapshot(r#"{"n": 1}"#).unwrap();
        write_snapshot(r#"{"n": 2}"#).unwrap();
        assert_eq!(std::fs::symlink_metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let file = stats_path(std::process::id());
        assert_eq!(std::fs::symlink_metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), r#"{"n": 2}"#);
        remove_snapshots();
        assert!(!dir.exists(), "the directory goes with the VM");
        std::env::remove_var("XDG_RUNTIME_DIR");
    }
}
