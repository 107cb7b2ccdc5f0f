//! Statistics of a running VM on demand: `zapvm stats`.
//!
//! Until the VM has a control socket, a running `zapvm run` answers `SIGUSR1` by writing a JSON
//! snapshot — KVM's VM and vCPU statistics, the VMM's table, the notifier's counters, external
//! teardowns — to [`stats_path`]`(pid)`; `zapvm stats --pid PID` sends the signal and prints the
//! file once it is rewritten. The signal handler only writes to an eventfd (async-signal-safe);
//! the VMM's event loop does the work.
//!
//! The file lives in a directory private to the VM's user, [`stats_dir`]`(pid)` in the runtime
//! directory (`$XDG_RUNTIME_DIR`, else the temporary directory, which may be world-writable).
//! The VMM opens the directory once (`O_DIRECTORY | O_NOFOLLOW`) — created and `fchmod`-ed to
//! exactly 0700, or an existing one taken over only if `fstat` of the open fd says it is a
//! directory owned by this user with mode 0700 — and keeps the fd: the snapshot is written to a
//! new file relative to it (`openat`, `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600) and renamed
//! into place (`renameat`), and [`remove_snapshots`] unlinks through it when the VM ends. No
//! operation goes through the path again, so neither another user nor a symlink planted at the
//! path (or swapped in after a check) can redirect the VMM's writes or removals (a VMM that runs
//! as root would otherwise write or delete wherever a link in /tmp points). The client
//! ([`request`]) trusts the directory and the snapshot only if both belong to the VM process's
//! effective uid (the directory with mode 0700), and removes the snapshot through the directory's
//! fd.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};
use rustix::io::Errno;
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

/// The snapshot's name in the private directory, and its temporary name while it is written.
const SNAPSHOT: &str = "stats.json";
const SNAPSHOT_TMP: &str = "stats.json.tmp";

/// This process's private directory, open (see [`open_private`]): every file operation of the
/// VMM goes through `fd`, never through the path again.
struct PrivateDir {
    fd: OwnedFd,
    /// The path it was opened at (`stats_dir` of this process then).
    path: PathBuf,
    /// (device, inode), to remove the directory itself only if its path still names it.
    identity: (u64, u64),
}

/// The private directory this process opened (created or took over), kept until
/// [`remove_snapshots`].
static DIR: Mutex<Option<PrivateDir>> = Mutex::new(None);

fn refused(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {why}: not a directory private to its user (not touching it)", path.display()),
    )
}

/// Opens `path` as a directory without following a symlink at it, and accepts it only if it is
/// a directory owned by `owner` with mode exactly 0700: checked on the open fd (`fstat`), so
/// what is checked is what is used, whatever happens to the path meanwhile.
fn open_checked(path: &Path, owner: u32) -> io::Result<(OwnedFd, Stat)> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(CWD, path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e == Errno::LOOP || e == Errno::NOTDIR => {
            return Err(refused(path, "is a symlink or not a directory".into()))
        }
        Err(e) => {
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot open {}: {e}", path.display()),
            ))
        }
    };
    let st = check_dir(&fd, path, owner)?;
    Ok((fd, st))
}

fn check_dir(fd: &OwnedFd, path: &Path, owner: u32) -> io::Result<Stat> {
    let st = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(refused(path, "is not a directory".into()));
    }
    if st.st_uid != owner {
        return Err(refused(path, format!("is owned by uid {}, not {owner}", st.st_uid)));
    }
    if st.st_mode & 0o7777 != 0o700 {
        return Err(refused(path, format!("has mode {:04o}, not 0700", st.st_mode & 0o7777)));
    }
    Ok(st)
}

/// This process's private directory, open: created with mode exactly 0700 (the umask may have
/// removed bits; `fchmod` on the open fd, once it is known to be ours), or an existing one taken
/// over only if it is a directory owned by this user with mode 0700. A symlink at the path is
/// refused (`O_NOFOLLOW`), never followed.
fn open_private(path: PathBuf) -> io::Result<PrivateDir> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let created = match rustix::fs::mkdirat(CWD, &path, Mode::RWXU) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => {
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot create {}: {e}", path.display()),
            ))
        }
    };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(CWD, &path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e == Errno::LOOP || e == Errno::NOTDIR => {
            return Err(refused(&path, "is a symlink or not a directory".into()))
        }
        Err(e) => return Err(e.into()),
    };
    if created {
        // Ours if it is owned by us (the path may have been replaced since mkdir: then the
        // owner check below refuses it before anything else touches it).
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory && st.st_uid == me {
            rustix::fs::fchmod(&fd, Mode::RWXU)?;
        }
    }
    let st = check_dir(&fd, &path, me)?;
    Ok(PrivateDir { fd, path, identity: (st.st_dev, st.st_ino) })
}

/// Runs `f` on this process's private directory, opening it first if needed.
fn with_private_dir<R>(f: impl FnOnce(&PrivateDir) -> io::Result<R>) -> io::Result<R> {
    let path = stats_dir(std::process::id());
    let mut dir = DIR.lock().unwrap_or_else(|p| p.into_inner());
    if dir.as_ref().is_none_or(|d| d.path != path) {
        *dir = Some(open_private(path)?);
    }
    f(dir.as_ref().expect("opened just above"))
}

/// Writes `json` to [`stats_path`] of this process, atomically (a new file, then rename), in
/// the private directory through its fd.
pub fn write_snapshot(json: &str) -> io::Result<()> {
    use std::io::Write;
    with_private_dir(|dir| {
        // A leftover of an interrupted write; in a directory only this user can enter.
        let _ = rustix::fs::unlinkat(&dir.fd, SNAPSHOT_TMP, AtFlags::empty());
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir.fd, SNAPSHOT_TMP, flags, Mode::RUSR | Mode::WUSR)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(json.as_bytes())?;
        drop(file);
        rustix::fs::renameat(&dir.fd, SNAPSHOT_TMP, &dir.fd, SNAPSHOT)?;
        Ok(())
    })
}

/// Removes this process's private directory and what it holds (the VM ended): only the
/// directory this process opened, through its fd (a symlink or another directory put at its
/// path is never followed); the directory itself only if its path still names it (and rmdir
/// removes an empty directory only).
pub fn remove_snapshots() {
    let Some(dir) = DIR.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    if dir.path != stats_dir(std::process::id()) {
        return; // a forked child: the directory is its parent's
    }
    for name in [SNAPSHOT, SNAPSHOT_TMP] {
        let _ = rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty());
    }
    let (Some(parent), Some(name)) = (dir.path.parent(), dir.path.file_name()) else { return };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(parent) = rustix::fs::openat(CWD, parent, flags, Mode::empty()) else { return };
    let at = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW);
    if at.is_ok_and(|st| (st.st_dev, st.st_ino) == dir.identity) {
        let _ = rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR);
    }
}

/// The effective uid of process `pid` (its `Uid:` line in /proc): the owner its private
/// directory and snapshot must have.
fn process_euid(pid: u32) -> Result<u32, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("no process {pid}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| format!("cannot read the uid of process {pid}"))
}

/// The snapshot in the private directory `dir` of a VM run by `owner`, read and then removed;
/// `None` while there is none. The directory must be `owner`'s with mode 0700 and the snapshot
/// a regular file of `owner`'s (checked on the open fds), or nothing is read or removed.
fn take_snapshot(dir: &Path, owner: u32) -> Result<Option<String>, String> {
    use std::io::Read;
    let fd = match open_checked(dir, owner) {
        Ok((fd, _)) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let shown = || dir.join(SNAPSHOT).display().to_string();
    // Non-blocking: a FIFO there must not hang the client (it is refused below).
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match rustix::fs::openat(&fd, SNAPSHOT, flags, Mode::empty()) {
        Ok(file) => file,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(format!("cannot open {}: {e}", shown())),
    };
    let st = rustix::fs::fstat(&file).map_err(|e| format!("cannot inspect {}: {e}", shown()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_uid != owner {
        return Err(format!(
            "{} is not a regular file of uid {owner} (uid {}); not reading or removing it",
            shown(),
            st.st_uid
        ));
    }
    let mut json = String::new();
    std::fs::File::from(file)
        .read_to_string(&mut json)
        .map_err(|e| format!("cannot read {}: {e}", shown()))?;
    // The snapshot was for this request alone: nothing is left behind.
    let _ = rustix::fs::unlinkat(&fd, SNAPSHOT, AtFlags::empty());
    Ok(Some(json))
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
    let owner = process_euid(pid)?;
    let dir = stats_dir(pid);
    // A snapshot that exists after this removal was written for this request. (Comparing mtimes
    // does not work: the kernel stamps files with a coarse clock that lags `SystemTime::now`.)
    take_snapshot(&dir, owner)?;
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
        if let Some(json) = take_snapshot(&dir, owner)? {
            return Ok(json);
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

    /// XDG_RUNTIME_DIR and the opened snapshot directory ([`DIR`]) are the process's: under
    /// nextest each test has its own process, under `cargo test` (tests as threads of one) the
    /// tests that use them take turns through this lock.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Points XDG_RUNTIME_DIR at `scratch`; returns this test's turn (hold it to the end) and the
    /// snapshot directory's path.
    fn runtime_in(scratch: &tempfile::TempDir) -> (std::sync::MutexGuard<'static, ()>, PathBuf) {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::env::set_var("XDG_RUNTIME_DIR", scratch.path());
        let dir = stats_dir(std::process::id());
        assert!(dir.starts_with(scratch.path()));
        (turn, dir)
    }

    /// A directory `elsewhere` holding a `stats.json` and a `stats.json.tmp` that must survive.
    fn bait(scratch: &tempfile::TempDir) -> PathBuf {
        let elsewhere = scratch.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        for name in [SNAPSHOT, SNAPSHOT_TMP] {
            std::fs::write(elsewhere.join(name), "precious").unwrap();
        }
        elsewhere
    }

    fn untouched(elsewhere: &Path) {
        for name in [SNAPSHOT, SNAPSHOT_TMP] {
            assert_eq!(std::fs::read_to_string(elsewhere.join(name)).unwrap(), "precious", "{name} touched");
        }
        assert_eq!(std::fs::read_dir(elsewhere).unwrap().count(), 2);
    }

    #[test]
    fn snapshots_go_only_to_a_directory_private_to_this_user() {
        let scratch = tempfile::tempdir().unwrap();
        let (_turn, dir) = runtime_in(&scratch);

        // A planted symlink to somewhere else: refused, nothing written or removed there.
        let elsewhere = bait(&scratch);
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let e = write_snapshot("{}").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("symlink"), "{e}");
        remove_snapshots();
        untouched(&elsewhere);
        std::fs::remove_file(&dir).unwrap();

        // A directory others may enter, or with any mode but 0700: refused, and said why.
        std::fs::create_dir(&dir).unwrap();
        for mode in [0o755, 0o750, 0o500, 0o1700] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = write_snapshot("{}").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{mode:o}: {e}");
            assert!(e.to_string().contains(&format!("has mode {mode:04o}, not 0700")), "{e}");
        }
        std::fs::remove_dir(&dir).unwrap();

        // Fresh: a 0700 directory, a 0600 file, replaced whole on the next write.
        write_snapshot(r#"{"n": 1}"#).unwrap();
        write_snapshot(r#"{"n": 2}"#).unwrap();
        assert_eq!(std::fs::symlink_metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        let file = stats_path(std::process::id());
        assert_eq!(std::fs::symlink_metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), r#"{"n": 2}"#);
        remove_snapshots();
        assert!(!dir.exists(), "the directory goes with the VM");
        std::env::remove_var("XDG_RUNTIME_DIR");
    }

    /// The directory this process created is moved away and a symlink to a directory of files
    /// that must survive put at its path (the root-VMM-in-/tmp attack): the next snapshot and the
    /// removal at the end act on the directory that was opened, never through the link.
    #[test]
    fn a_directory_swapped_for_a_symlink_after_it_was_opened_is_never_followed() {
        let scratch = tempfile::tempdir().unwrap();
        let (_turn, dir) = runtime_in(&scratch);
        write_snapshot(r#"{"n": 1}"#).unwrap();
        let moved = scratch.path().join("moved");
        std::fs::rename(&dir, &moved).unwrap();
        let elsewhere = bait(&scratch);
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();

        write_snapshot(r#"{"n": 2}"#).unwrap();
        untouched(&elsewhere);
        assert_eq!(std::fs::read_to_string(moved.join(SNAPSHOT)).unwrap(), r#"{"n": 2}"#);
        remove_snapshots();
        untouched(&elsewhere);
        assert!(
            std::fs::symlink_metadata(&dir).unwrap().file_type().is_symlink(),
            "the link is not ours to remove"
        );
        assert_eq!(std::fs::read_dir(&moved).unwrap().count(), 0, "the opened directory was emptied");
        std::env::remove_var("XDG_RUNTIME_DIR");
    }

    /// The wrong owner, for the VMM (an existing directory of another user's) and for the client
    /// (a directory or snapshot not of the VM's uid): refused with a clear error, nothing read
    /// or removed. Needs root (to make files of another uid); skipped, and logged, otherwise.
    #[test]
    fn directories_and_snapshots_of_another_user_are_refused() {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if me != 0 {
            let line = "SKIP directories_and_snapshots_of_another_user_are_refused: needs root to make files of another uid";
            eprintln!("{line}");
            if let Some(log) = std::env::var_os("ZAPVM_SKIP_LOG").filter(|p| !p.is_empty()) {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
                writeln!(f, "{line}").unwrap();
            }
            return;
        }
        const OTHER: u32 = 65534;
        let scratch = tempfile::tempdir().unwrap();
        let (_turn, dir) = runtime_in(&scratch);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(OTHER), None).unwrap();
        let e = write_snapshot("{}").unwrap_err();
        assert!(e.to_string().contains(&format!("is owned by uid {OTHER}, not 0")), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

        // The client: a directory not of the VM's uid is not trusted.
        std::fs::write(dir.join(SNAPSHOT), "{}").unwrap();
        let e = take_snapshot(&dir, me).unwrap_err();
        assert!(e.contains(&format!("is owned by uid {OTHER}, not 0")), "{e}");
        assert!(dir.join(SNAPSHOT).exists(), "removed a file it refused");
        // The VM's directory, but a snapshot of someone else's: neither read nor removed.
        std::os::unix::fs::chown(&dir, Some(me), None).unwrap();
        std::os::unix::fs::chown(dir.join(SNAPSHOT), Some(OTHER), None).unwrap();
        let e = take_snapshot(&dir, me).unwrap_err();
        assert!(e.contains("is not a regular file of uid 0"), "{e}");
        assert!(dir.join(SNAPSHOT).exists(), "removed a file it refused");
        std::env::remove_var("XDG_RUNTIME_DIR");
    }

    /// The client's side on the checks it can make as any user: a symlink or a directory with
    /// the wrong mode is refused; a good snapshot is read, then removed; none yet is `None`.
    #[test]
    fn the_client_reads_only_a_private_snapshot_and_removes_it() {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("zapvm-1.d");
        assert_eq!(take_snapshot(&dir, me), Ok(None), "no directory yet");
        let elsewhere = bait(&scratch);
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let e = take_snapshot(&dir, me).unwrap_err();
        assert!(e.contains("is a symlink"), "{e}");
        untouched(&elsewhere);
        std::fs::remove_file(&dir).unwrap();

        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join(SNAPSHOT), "{}").unwrap();
        let e = take_snapshot(&dir, me).unwrap_err();
        assert!(e.contains("has mode 0755, not 0700"), "{e}");
        assert!(dir.join(SNAPSHOT).exists(), "removed a file it refused");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::remove_file(dir.join(SNAPSHOT)).unwrap();
        std::os::unix::fs::symlink(elsewhere.join(SNAPSHOT), dir.join(SNAPSHOT)).unwrap();
        assert!(take_snapshot(&dir, me).is_err(), "followed a symlinked snapshot");
        untouched(&elsewhere);
        std::fs::remove_file(dir.join(SNAPSHOT)).unwrap();
        assert_eq!(take_snapshot(&dir, me), Ok(None), "no snapshot yet");
        std::fs::write(dir.join(SNAPSHOT), r#"{"n": 3}"#).unwrap();
        assert_eq!(take_snapshot(&dir, me), Ok(Some(r#"{"n": 3}"#.to_string())));
        assert!(!dir.join(SNAPSHOT).exists(), "the snapshot is removed once read");
    }
}
