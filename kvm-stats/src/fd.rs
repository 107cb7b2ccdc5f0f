//! Obtaining a stats fd from KVM and reading it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};

use crate::desc::StatDesc;
use crate::error::{Result, StatsError};
use crate::layout::{header_ranges, parse_header, StatsLayout, HEADER_SIZE};
use crate::snapshot::Snapshot;

mod ioctls {
    use kvm_bindings::KVMIO;
    // KVM_GET_STATS_FD is _IO(KVMIO, 0xce); valid on a VM fd and on a vCPU fd (api.rst 4.133).
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}

/// An open KVM stats fd (of a VM or a vCPU) with its parsed descriptors.
///
/// `Send + Sync`: [`StatsFd::read`] takes `&self` and uses `pread`, so any thread may read a
/// vCPU's stats while that vCPU runs. The fd stays valid (and its stats keep counting) after the
/// `VmFd`/`VcpuFd` it came from is dropped; KVM holds a reference.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    layout: Arc<StatsLayout>,
}

impl StatsFd {
    /// Opens the stats of a VM (`KVM_GET_STATS_FD` on the VM fd) and reads its header and
    /// descriptors once.
    ///
    /// Errors: [`StatsError::Unsupported`] if this KVM lacks binary stats,
    /// [`StatsError::Malformed`] if what it returned does not parse.
    pub fn for_vm(vm: &VmFd) -> Result<Self> {
        Self::from_kvm_fd(vm)
    }

    /// Opens the stats of a vCPU (`KVM_GET_STATS_FD` on the vCPU fd); as [`StatsFd::for_vm`].
    pub fn for_vcpu(vcpu: &VcpuFd) -> Result<Self> {
        Self::from_kvm_fd(vcpu)
    }

    /// `fd` is a `VmFd` or a `VcpuFd`: the only callers are the two constructors above.
    fn from_kvm_fd(fd: &impl AsRawFd) -> Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and writes no user memory; `fd` is a valid,
        // open KVM VM or vCPU fd borrowed for the duration of the call. On an fd that does not
        // know the ioctl, the kernel returns an error, which is handled below.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, ioctls::KVM_GET_STATS_FD()) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOTTY | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    StatsError::Unsupported(err)
                }
                _ => StatsError::GetFd(err),
            });
        }
        // SAFETY: on success KVM_GET_STATS_FD returns a new file descriptor (O_RDONLY|O_CLOEXEC)
        // that nothing else owns; `File` takes sole ownership and closes it on drop.
        let file = unsafe { File::from_raw_fd(ret) };
        Self::from_file(file)
    }

    /// Reads and parses the metadata of an already-open stats fd (anything `pread`-able laid out
    /// as in the crate docs): two `pread`s, one of the header and one of everything up to the end
    /// of the descriptors.
    pub fn from_file(file: File) -> Result<Self> {
        let mut header = [0u8; HEADER_SIZE];
        pread_exact(&file, &mut header, 0)?;
        let h = parse_header(&header)?;
        let (id, desc) = header_ranges(&h)?;
        let mut image = vec![0u8; desc.end.max(id.end).max(HEADER_SIZE)];
        pread_exact(&file, &mut image, 0)?;
        let layout = StatsLayout::parse(&image)?;
        Ok(Self { file, layout: Arc::new(layout) })
    }

    /// The fd's id string (`"kvm-<pid>"`, `"kvm-<pid>/vcpu-<n>"`).
    pub fn id(&self) -> &str {
        self.layout.id()
    }

    /// All descriptors, in the kernel's order (read once at open).
    pub fn descriptors(&self) -> &[StatDesc] {
        self.layout.descriptors()
    }

    /// The parsed metadata shared by this fd's snapshots.
    pub fn layout(&self) -> &Arc<StatsLayout> {
        &self.layout
    }

    /// Reads the current values: one `pread` of the data block (a few hundred bytes) and one
    /// allocation. The values of one read are not an atomic snapshot across stats: KVM updates
    /// counters concurrently (a running vCPU keeps counting during the read).
    pub fn read(&self) -> Result<Snapshot> {
        let mut data = vec![0u8; self.layout.data_len];
        pread_exact(&self.file, &mut data, self.layout.data_offset)?;
        Snapshot::from_bytes(&self.layout, &data)
    }
}

/// `pread` of exactly `buf.len()` bytes at `offset` (retrying on EINTR and short reads; the
/// kernel's stats read fills the whole request in one call).
fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(StatsError::ShortRead { offset, want: buf.len(), got: done }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(StatsError::Read { offset, len: buf.len(), source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_image::{image, sample_stats};
    use std::io::{Seek, SeekFrom, Write};

    /// `from_file` and `read` over an ordinary file holding a synthetic image: the same two
    /// preads as on a real stats fd, and a clear error where the file ends too early.
    #[test]
    fn reads_an_image_from_a_file() {
        let img = image(&sample_stats(), &[10, 20, 30, 1, 2, 3]);
        let path = std::env::temp_dir().join(format!("kvm-stats-image-{}", std::process::id()));
        let mut file =
            File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(&img).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        let fd = StatsFd::from_file(file.try_clone().unwrap()).unwrap();
        assert_eq!(fd.id(), "kvm-1234");
        let snap = fd.read().unwrap();
        assert_eq!(snap.value("exits"), Some(10));
        assert_eq!(snap.values("hist"), Some(&[1, 2, 3][..]));
        // The data block cut short: the read says how much was missing.
        file.set_len(img.len() as u64 - 8).unwrap();
        match fd.read() {
            Err(StatsError::ShortRead { want: 48, got: 40, .. }) => {}
            other => panic!("expected a short read, got {other:?}"),
        }
    }
}
