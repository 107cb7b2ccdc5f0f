//! The KVM VM: in-kernel irqchip and PIT, and guest RAM registered as memslots.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::GuestRam;

/// Address of the three pages Intel VMX needs for its real-mode TSS (unused on AMD and PVM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device does not exist.
    #[error("{0} does not exist: this host has no KVM (load the kvm module, or run on a machine with virtualization)")]
    KvmMissing(String),
    /// The KVM device exists but cannot be opened.
    #[error("{0} is not accessible: run as root or add your user to the group owning it (usually `kvm`)")]
    KvmAccess(String),
    /// Opening the KVM device failed otherwise.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// The device path.
        path: String,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Its errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Too many vCPUs for this host.
    #[error("{wanted} vCPUs requested, but this host's KVM supports at most {max}")]
    TooManyVcpus {
        /// Asked for.
        wanted: u32,
        /// Host maximum.
        max: usize,
    },
}

/// Opens the KVM device at `path` with a clear error for the usual mistakes.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let name = path.display().to_string();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::KvmMissing(name.clone()))?;
    Kvm::new_with_path(c_path).map_err(|source| match source.errno() {
        libc::ENOENT => VmError::KvmMissing(name),
        libc::EACCES | libc::EPERM => VmError::KvmAccess(name),
        _ => VmError::KvmOpen { path: name, source },
    })
}

/// A KVM VM with its interrupt controllers.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates a VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Self { fd })
    }

    /// Registers every region of `ram` as a memslot, slot numbers from 0.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        for (slot, (gpa, hva, size)) in ram.regions().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa.0,
                memory_size: size,
                userspace_addr: hva,
            };
            // SAFETY: the host range is a live mapping owned by `ram`'s guest memory, which
            // the VM's owner keeps alive (and in place) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|source| VmError::Kvm { what: "KVM_SET_USER_MEMORY_REGION", source })?;
        }
        Ok(())
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
