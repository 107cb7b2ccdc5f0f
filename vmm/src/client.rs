//! The client commands' side of the control socket (`zapvm balloon`, `mem`, `pause`, `resume`,
//! `quit`, `stats`): a socket named with `--api-socket PATH` (see [`crate::api::find_socket`]
//! for `--pid`).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(socket_at(&sock).unwrap(), sock);
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(socket_at(&file).unwrap_err().contains("is a regular file"));
        assert!(socket_at(dir.path()).unwrap_err().contains("is a directory"));
        assert!(socket_at(&dir.path().join("gone")).unwrap_err().contains("no such socket"));
    }
}
