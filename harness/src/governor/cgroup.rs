//! The memory cgroup a governor may enforce its budget in: cgroup v2's `memory.max` or v1's
//! `memory.limit_in_bytes` (whichever the directory has), read each round and written once when
//! asked to enforce. Every failure is an error naming the file.

use std::path::{Path, PathBuf};

/// A memory cgroup directory and the file that holds its limit.
#[derive(Clone, Debug)]
pub struct Cgroup {
    limit_file: PathBuf,
}

impl Cgroup {
    /// The cgroup at `dir` (v2 if it has `memory.max`, v1 if `memory.limit_in_bytes`).
    pub fn open(dir: &Path) -> Result<Self, String> {
        for name in ["memory.max", "memory.limit_in_bytes"] {
            let f = dir.join(name);
            if f.is_file() {
                return Ok(Self { limit_file: f });
            }
        }
        Err(format!("{}: not a memory cgroup (no memory.max, no memory.limit_in_bytes)", dir.display()))
    }

    /// The limit, bytes (`max`, or v1's huge "unlimited" value, as `u64::MAX`).
    pub fn limit(&self) -> Result<u64, String> {
        let text = std::fs::read_to_string(&self.limit_file)
            .map_err(|e| format!("{}: {e}", self.limit_file.display()))?;
        let text = text.trim();
        if text == "max" {
            return Ok(u64::MAX);
        }
        text.parse().map_err(|e| format!("{}: {text:?}: {e}", self.limit_file.display()))
    }

    /// Sets the limit to `bytes`.
    pub fn enforce(&self, bytes: u64) -> Result<(), String> {
        std::fs::write(&self.limit_file, bytes.to_string())
            .map_err(|e| format!("cannot set the memory limit: {}: {e}", self.limit_file.display()))
    }

    /// A new memory cgroup `name` in the host's memory hierarchy: cgroup v1's
    /// `/sys/fs/cgroup/memory`, else v2's `/sys/fs/cgroup` where it hands the memory controller to
    /// its children. For processes the caller starts inside it ([`Cgroup::procs_file`]). The
    /// returned [`CreatedCgroup`] removes it when dropped, also on an early return or a panic;
    /// [`CreatedCgroup::remove`] removes it and says whether that worked.
    pub fn create(name: &str) -> Result<CreatedCgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let parent = if v1.join("memory.limit_in_bytes").is_file() {
            v1
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"))
        {
            v2
        } else {
            return Err("no memory cgroup hierarchy: neither /sys/fs/cgroup/memory (v1) nor a v2 \
                        /sys/fs/cgroup whose cgroup.subtree_control has memory"
                .into());
        };
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
        match Self::open(&dir) {
            Ok(cgroup) => Ok(CreatedCgroup { cgroup, removed: false }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        self.limit_file.parent().expect("the limit file is in the cgroup's directory")
    }

    /// The file a process joins the cgroup through (its pid written to it).
    pub fn procs_file(&self) -> PathBuf {
        self.dir().join("cgroup.procs")
    }

    /// Processes the kernel's OOM killer killed in the cgroup (`oom_kill` of v1's
    /// `memory.oom_control` or v2's `memory.events`).
    pub fn oom_kills(&self) -> Result<u64, String> {
        for name in ["memory.events", "memory.oom_control"] {
            let f = self.dir().join(name);
            if let Ok(text) = std::fs::read_to_string(&f) {
                return text
                    .lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
                    .ok_or_else(|| format!("{}: no oom_kill count", f.display()));
            }
        }
        Err(format!("{}: neither memory.events nor memory.oom_control", self.dir().display()))
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) -> Result<(), String> {
        std::fs::remove_dir(self.dir())
            .map_err(|e| format!("cannot remove the cgroup {}: {e}", self.dir().display()))
    }
}

/// A cgroup this process created ([`Cgroup::create`]): removed when dropped.
///
/// The kernel removes a cgroup directory only once no process is in it, and a process killed a
/// moment ago may still be leaving: removal retries for up to [`CreatedCgroup::REMOVE_WAIT`].
/// Drop the processes' owner (which kills them) before this.
#[derive(Debug)]
pub struct CreatedCgroup {
    cgroup: Cgroup,
    removed: bool,
}

impl CreatedCgroup {
    /// How long removal waits for the cgroup's last processes to leave.
    pub const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Removes the cgroup, waiting up to [`CreatedCgroup::REMOVE_WAIT`] for it to empty.
    pub fn remove(mut self) -> Result<(), String> {
        self.removed = true;
        Self::remove_dir(&self.cgroup)
    }

    fn remove_dir(cgroup: &Cgroup) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Self::REMOVE_WAIT;
        loop {
            match cgroup.remove() {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }
}

impl std::ops::Deref for CreatedCgroup {
    type Target = Cgroup;

    fn deref(&self) -> &Cgroup {
        &self.cgroup
    }
}

impl Drop for CreatedCgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = Self::remove_dir(&self.cgroup) {
                tracing::warn!(error = %e, "a created cgroup is left behind");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_files_are_found_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("zapvm-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Cgroup::open(&dir).unwrap_err().contains("not a memory cgroup"));
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let cg = Cgroup::open(&dir).unwrap();
        assert_eq!(cg.limit().unwrap(), 9223372036854771712);
        cg.enforce(1 << 30).unwrap();
        assert_eq!(cg.limit().unwrap(), 1 << 30);
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(Cgroup::open(&dir).unwrap().limit().unwrap(), u64::MAX);
        std::fs::write(dir.join("memory.max"), "lots\n").unwrap();
        assert!(Cgroup::open(&dir).unwrap().limit().unwrap_err().contains("memory.max"));
        // A limit file that cannot be written (a directory in its place).
        std::fs::remove_file(dir.join("memory.max")).unwrap();
        std::fs::remove_file(dir.join("memory.limit_in_bytes")).unwrap();
        std::fs::create_dir(dir.join("memory.limit_in_bytes")).unwrap();
        assert!(Cgroup::open(&dir).is_err());
        let bad = Cgroup { limit_file: dir.join("memory.limit_in_bytes") };
        assert!(bad.enforce(1).unwrap_err().contains("cannot set the memory limit"));
        // The OOM kill count, from v1's memory.oom_control or v2's memory.events.
        assert!(bad.oom_kills().unwrap_err().contains("neither memory.events"));
        std::fs::write(dir.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
            .unwrap();
        assert_eq!(bad.oom_kills(), Ok(3));
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(bad.oom_kills(), Ok(2));
        std::fs::write(dir.join("memory.events"), "low 0\n").unwrap();
        assert!(bad.oom_kills().unwrap_err().contains("no oom_kill count"));
        assert_eq!(bad.procs_file(), dir.join("cgroup.procs"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
