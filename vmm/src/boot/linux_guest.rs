//! The project's Linux guest: a small kernel built from Debian's linux-source with the project's
//! PVM change, and a busybox initramfs whose /init checks the virtio drivers and reports the
//! guest's memory and balloon figures (`resources/linux-guest/`).
//!
//! [`build`] runs `resources/linux-guest/build.sh`, which builds both on first use (minutes) and
//! then answers from its cache at once; its progress goes to the VMM's stderr.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Environment variable naming the build script to use instead of the repository's.
pub const SCRIPT_ENV: &str = "ZAPVM_LINUX_GUEST_SCRIPT";

/// Where the build script is in the source tree zapvm was built from.
const REPOSITORY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/linux-guest/build.sh");

/// What to pass on the command line of the guest for its /init (see `resources/linux-guest/init`):
/// the period of its memory reports.
pub const REPORT_OPTION: &str = "zapvm.report";

/// The built guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    /// The kernel as an ELF (entered without the decompressor: faster where ring 0 is emulated).
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// The initramfs (an uncompressed cpio archive).
    pub initramfs: PathBuf,
}

/// The build script: `$ZAPVM_LINUX_GUEST_SCRIPT`, or the one of the repository zapvm was built
/// from.
pub fn script() -> PathBuf {
    std::env::var_os(SCRIPT_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(REPOSITORY_SCRIPT))
}

/// Builds the guest (or finds it in the cache); the script's progress goes to stderr.
pub fn build() -> Result<LinuxGuest, String> {
    let script = script();
    if !script.is_file() {
        return Err(format!(
            "the Linux guest's build script {} does not exist: run zapvm from its source tree, or set {SCRIPT_ENV}",
            script.display()
        ));
    }
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_string(&mut out)
        .map_err(|e| format!("reading the output of {}: {e}", script.display()))?;
    let status = child.wait().map_err(|e| format!("waiting for {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status}); its messages are above", script.display()));
    }
    parse_output(&out).map_err(|why| format!("{}: {why}", script.display()))
}

/// Reads the script's `vmlinux=`, `bzimage=` and `initramfs=` lines; every file must exist.
fn parse_output(out: &str) -> Result<LinuxGuest, String> {
    let find = |key: &str| -> Result<PathBuf, String> {
        let path = out
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
            .map(PathBuf::from)
            .ok_or_else(|| format!("printed no {key}= line (output: {out:?})"))?;
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("printed {key}={}, which is not a file", path.display()))
        }
    };
    Ok(LinuxGuest { vmlinux: find("vmlinux")?, bzimage: find("bzimage")?, initramfs: find("initramfs")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_name_existing_files() {
        let dir = std::env::temp_dir().join(format!("zapvm-linux-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "bzImage", "initramfs.cpio"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let d = dir.display();
        let out = format!("vmlinux={d}/vmlinux\nbzimage={d}/bzImage\ninitramfs={d}/initramfs.cpio\n");
        let guest = parse_output(&out).unwrap();
        assert_eq!(guest.initramfs, dir.join("initramfs.cpio"));
        assert_eq!(guest.vmlinux, dir.join("vmlinux"));
        let missing = out.replace("initramfs.cpio", "gone.cpio");
        assert!(parse_output(&missing).unwrap_err().contains("not a file"));
        assert!(parse_output("vmlinux=/x\n").unwrap_err().contains("no"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
