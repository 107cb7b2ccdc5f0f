//! [`guest_abi::Workload::Kick`]: the guest-visible cost of a virtio queue kick.
//!
//! vCPU 0 brings the virtio-balloon up with the balloon driver's initialisation (so the device
//! is in DRIVER_OK with its queues live, as a real driver leaves it) and then never queues a
//! buffer: every kick finds the inflate queue empty, so what is timed is the way of the kick to
//! the device and back, not the device's work. Each round times [`KICKS_PER_ROUND`] QueueNotify
//! writes of the inflate queue's index, then as many reads of the MagicValue register: an MMIO
//! read always exits to the VMM, which answers it from a constant, so it is the cost of one exit
//! and return on this host, measured in the same VM between the kick passes.
//!
//! With an ioeventfd on the queue KVM completes the kick's write in the kernel (it signals the
//! eventfd and re-enters the guest); without one the write exits to the VMM like the read and the
//! vCPU thread processes the (empty) queue before it re-enters.

use guest_abi::virtio::device_type;
use guest_abi::{BootInfo, Pass, UcallKind, KICKS_PER_ROUND, KICK_ROUNDS};

use crate::balloon::{Driver, Slice};
use crate::virtio::{reg, Mmio};
use crate::{arch, done, fail, report};

/// [`guest_abi::Workload::Kick`] (see the module docs).
pub fn run(vcpu: u64, boot: &BootInfo) -> ! {
    if vcpu != 0 {
        done(vcpu, 0, 0);
    }
    let Some(device) = boot.virtio[..(boot.nr_virtio as usize).min(boot.virtio.len())]
        .iter()
        .find(|d| d.device_id == u64::from(device_type::BALLOON))
    else {
        fail(vcpu, format_args!("kick: the boot info names no virtio-balloon device"));
    };
    let driver = Driver::init(vcpu, boot, Mmio::new(device.base), Slice::new(boot, vcpu));
    let mmio = driver.mmio;
    let queue = driver.inflate_index();
    let mut round = 0;
    while round < KICK_ROUNDS {
        let start = arch::rdtsc();
        let mut i = 0;
        while i < KICKS_PER_ROUND {
            mmio.notify(queue);
            i += 1;
        }
        let cycles = arch::rdtsc() - start;
        report(vcpu, UcallKind::Timing, &[Pass::Kick as u64, KICKS_PER_ROUND, cycles]);

        let start = arch::rdtsc();
        let mut i = 0;
        let mut folded = 0u32;
        while i < KICKS_PER_ROUND {
            folded |= mmio.read(reg::MAGIC);
            i += 1;
        }
        let cycles = arch::rdtsc() - start;
        if folded != crate::virtio::MMIO_MAGIC {
            fail(vcpu, format_args!("kick: MagicValue read as {folded:#x}"));
        }
        report(vcpu, UcallKind::Timing, &[Pass::MmioRead as u64, KICKS_PER_ROUND, cycles]);
        round += 1;
    }
    done(vcpu, KICK_ROUNDS * KICKS_PER_ROUND, 0)
}
