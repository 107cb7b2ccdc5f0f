//! What the controller reads to watch a run without going through the VMM's table (so that a
//! wedged table cannot wedge the watchdog): [`peek`] (`process_vm_readv`), the guests' counters,
//! the invalidation count, KVM's statistics flattened, and the work done so far.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_abi::StressHeader;

use super::{Ctx, Progress};

/// Reads `buf.len()` bytes of this process at `hva` without the VMM's table (monitoring only).
pub(crate) fn peek(hva: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: hva as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` is `buf`, writable for its length; the remote side is this process's memory,
    // checked by the kernel (EFAULT if unmapped), so no Rust reference to guest RAM is made.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == buf.len() as isize
}

/// The guest's counters of every vCPU.
pub(super) fn guest_headers(ctx: &Ctx) -> Vec<StressHeader> {
    ctx.layouts
        .iter()
        .map(|l| {
            let gpa = l.header_gpa(&ctx.work);
            let mut b = [0u8; std::mem::size_of::<StressHeader>()];
            let Some(hva) = ctx.mmu.host_range(gpa, b.len() as u64) else { return StressHeader::default() };
            if !peek(hva, &mut b) {
                return StressHeader::default();
            }
            let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
            StressHeader { magic: w(0), passes: w(1), verified: w(2), zero_pages: w(3), torn_pages: w(4) }
        })
        .collect()
}

pub(super) fn invalidations(kinds: &[notifier::KindStats]) -> u64 {
    kinds.iter().filter(|k| k.kind != "release").map(|k| k.starts).sum()
}

/// Flattens the numeric leaves of a JSON value into `out` as `path -> number`.
pub(super) fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out)
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), x, out)
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

/// The least work done of each kind by the scenarios `names` (see [`Progress`]).
/// `write_faults_while_read_only` is the teardown guard's count: mprotect phases count as work
/// only once a guest write has faulted on a read-only range (what the scenario exists to cause),
/// so a goal met by phases alone, with every write landing between phases, is not met.
pub(super) fn progress(ctx: &Ctx, names: &[String], write_faults_while_read_only: u64) -> Progress {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let k = &ctx.c;
    let ops: Vec<u64> = names
        .iter()
        .filter_map(|n| match n.as_str() {
            "device-reader" => Some(l(&k.dev_reads)),
            "discard" => Some(l(&k.discard_ops)),
            "external-chaos" => Some(l(&k.chaos_madvise) + l(&k.chaos_munmap) + l(&k.chaos_mremap)),
            "mprotect" => Some(if write_faults_while_read_only > 0 { l(&k.prot_phases) } else { 0 }),
            _ => None,
        })
        .collect();
    let targets: Vec<u64> = names
        .iter()
        .filter_map(|n| match n.as_str() {
            "balloon" => Some(l(&k.balloon_storm.reached)),
            "virtio-mem" => Some(l(&k.mem_storm.reached)),
            _ => None,
        })
        .collect();
    Progress {
        passes: guest_headers(ctx).iter().map(|h| h.passes).min(),
        targets: targets.into_iter().min(),
        ops: ops.into_iter().min(),
    }
}
