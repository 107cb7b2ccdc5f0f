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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
