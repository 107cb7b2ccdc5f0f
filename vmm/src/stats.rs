//! Statistics of a running VM on demand: `zapvm stats`.
//!
//! Until the VM has a control socket, a running `zapvm run` answers `SIGUSR1` by writing a JSON
//! snapshot — KVM's VM and vCPU statistics, the VMM's table, the notifier's counters, external
//! teardowns — to [`stats_path`]`(pid)`; `zapvm stats --pid PID` sends the signal and prints the
//! file once it is rewritten. The signal handler only writes to an eventfd (async-signal-safe);
//! the VMM's event loop does the work.

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

/// Where the VM with process id `pid` writes its statistics.
pub fn stats_path(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("zapvm-{pid}.stats.json"))
}

/// Writes `json` to [`stats_path`] of this process, atomically (write, then rename).
pub fn write_snapshot(json: &str) -> std::io::Result<()> {
    let path = stats_path(std::process::id());
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(tmp, path)
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
