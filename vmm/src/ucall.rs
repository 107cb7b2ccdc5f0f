//! Decoding the test guest's ucalls (see [`guest_abi`]): a 32-bit `out` to
//! [`guest_abi::UCALL_PORT`] carrying the guest-physical address of a [`guest_abi::Ucall`].
//!
//! Everything read here is guest input: the record and its message must lie in guest RAM, the
//! kind must be known, and the message is cut at [`guest_abi::MAX_MESSAGE_LEN`] bytes. A bad
//! record is an error naming what was wrong, never a host read outside guest RAM.

use guest_abi::{Pass, Rendezvous, Ucall, UcallKind, MAX_MESSAGE_LEN};
use vm_memory::ByteValued;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::mmu::{read_obj, GuestMemoryAccess, GuestMmu};
use crate::vstate::vcpu::{GuestCalls, PassTiming, VcpuOutcome, VcpuReport};

/// A wrapper that lets vm-memory read a [`Ucall`] as plain bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct RawUcall(UcallBytes);

#[derive(Clone, Copy)]
#[repr(C)]
struct UcallBytes([u64; std::mem::size_of::<Ucall>() / 8]);

impl Default for UcallBytes {
    fn default() -> Self {
        Self([0; std::mem::size_of::<Ucall>() / 8])
    }
}

// SAFETY: `RawUcall` is an array of u64s with no padding; every bit pattern is valid.
unsafe impl ByteValued for RawUcall {}

/// What a vCPU's ucall said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UcallEvent {
    /// The guest started.
    Hello {
        /// The guest's ABI version.
        abi_version: u64,
        /// Guest TSC at its entry.
        entry_tsc: u64,
    },
    /// A line of text.
    Print(String),
    /// A new stage.
    Stage(u64),
    /// Progress of the stage.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// A timed pass.
    Timing {
        /// Which pass.
        pass: Pass,
        /// Pages it touched.
        pages: u64,
        /// TSC cycles it took.
        cycles: u64,
    },
    /// The workload failed.
    Failure(String),
    /// The workload finished.
    Done {
        /// Pages verified.
        pages: u64,
        /// Checksum of what was read.
        checksum: u64,
    },
    /// The vCPU waits while the host acts; the reply goes back into the record's args.
    Rendezvous {
        /// What the host should do.
        kind: Rendezvous,
        /// The record's arguments (`args[0]` is the kind).
        args: [u64; 6],
    },
    /// A CPU exception in the guest.
    Exception {
        /// Vector.
        vector: u64,
        /// Error code (0 where the CPU pushes none).
        error_code: u64,
        /// Faulting instruction.
        rip: u64,
        /// CR2 at the time (the faulting address of a #PF).
        cr2: u64,
    },
}

/// Why a ucall could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UcallError {
    /// The record is not in guest RAM.
    #[error("ucall record at {0:#x} is outside guest RAM")]
    RecordOutsideRam(u64),
    /// Unknown kind.
    #[error("ucall of unknown kind {0}")]
    UnknownKind(u64),
    /// Unknown pass in a timing ucall.
    #[error("timing ucall names unknown pass {0}")]
    UnknownPass(u64),
    /// The message is not in guest RAM.
    #[error("ucall message at {gpa:#x} (+{len}) is outside guest RAM")]
    MessageOutsideRam {
        /// Where the guest said it was.
        gpa: u64,
        /// Its length (after truncation).
        len: u64,
    },
    /// The `out` was not 4 bytes wide.
    #[error("ucall port written with {0} bytes; a ucall is a 32-bit out")]
    BadWidth(usize),
    /// Unknown rendezvous.
    #[error("rendezvous of unknown kind {0}")]
    UnknownRendezvous(u64),
}

/// Byte offset of `args` inside a [`Ucall`] record.
pub const ARGS_OFFSET: u64 = 16;

/// The guest-physical address of the record a ucall's `out` data names.
pub fn record_gpa(data: &[u8]) -> Result<u64, UcallError> {
    Ok(u64::from(u32::from_le_bytes(data.try_into().map_err(|_| UcallError::BadWidth(data.len()))?)))
}

/// Decodes the ucall whose `out` data is `data`; returns the vCPU index the guest put in the
/// record and the event.
pub fn decode(mem: &dyn GuestMemoryAccess, data: &[u8]) -> Result<(u64, UcallEvent), UcallError> {
    let gpa = record_gpa(data)?;
    let raw: RawUcall = read_obj(mem, gpa).map_err(|_| UcallError::RecordOutsideRam(gpa))?;
    let w = raw.0 .0;
    let (kind, vcpu, args, msg_gpa, msg_len) = (w[0], w[1], [w[2], w[3], w[4], w[5], w[6], w[7]], w[8], w[9]);
    let message = || -> Result<String, UcallError> {
        let len = msg_len.min(MAX_MESSAGE_LEN as u64);
        let mut buf = vec![0u8; len as usize];
        mem.read(msg_gpa, &mut buf).map_err(|_| UcallError::MessageOutsideRam { gpa: msg_gpa, len })?;
        let mut text = String::from_utf8_lossy(&buf).into_owned();
        if msg_len > len {
            text.push_str("...");
        }
        Ok(text)
    };
    let event = match UcallKind::from_raw(kind).ok_or(UcallError::UnknownKind(kind))? {
        UcallKind::Hello => UcallEvent::Hello { abi_version: args[0], entry_tsc: args[1] },
        UcallKind::Print => UcallEvent::Print(message()?),
        UcallKind::Stage => UcallEvent::Stage(args[0]),
        UcallKind::Progress => UcallEvent::Progress { done: args[0], total: args[1] },
        UcallKind::Timing => UcallEvent::Timing {
            pass: Pass::from_raw(args[0]).ok_or(UcallError::UnknownPass(args[0]))?,
            pages: args[1],
            cycles: args[2],
        },
        UcallKind::Failure => UcallEvent::Failure(message()?),
        UcallKind::Done => UcallEvent::Done { pages: args[0], checksum: args[1] },
        UcallKind::Rendezvous => UcallEvent::Rendezvous {
            kind: Rendezvous::from_raw(args[0]).ok_or(UcallError::UnknownRendezvous(args[0]))?,
            args,
        },
        UcallKind::Exception => {
            UcallEvent::Exception { vector: args[0], error_code: args[1], rip: args[2], cr2: args[3] }
        }
    };
    Ok((vcpu, event))
}

// ---------------------------------------------------------------------------------------------
// The host side of the test guest's calls

/// The host side of a guest's [`guest_abi::UcallKind::Rendezvous`]: acts while the vCPU waits
/// and returns the reply arguments written back into the guest's record.
pub trait RendezvousHandler: Send + Sync {
    /// Handles `kind` for vCPU `vcpu` with the record's `args`; `Err` fails the vCPU.
    fn handle(&self, vcpu: usize, kind: guest_abi::Rendezvous, args: [u64; 6]) -> Result<[u64; 6], String>;
}

/// What the VMM does with the test guest's ucalls ([`crate::vstate::vcpu::GuestCalls`]): checks
/// the ABI version at the hello, keeps each vCPU's progress and pass timings, ends the vCPU at
/// its `Done`, `Failure` or `Exception`, sleeps for an idle rendezvous and hands every other
/// rendezvous to the VM's [`RendezvousHandler`].
pub struct TestGuestCalls {
    mmu: Arc<GuestMmu>,
    rendezvous: Option<Arc<dyn RendezvousHandler>>,
    /// Per vCPU: pages done in the current pass, and the pass's total (for progress display).
    progress: Vec<(AtomicU64, AtomicU64)>,
    /// When the VMM started building the VM.
    started: Instant,
}

impl TestGuestCalls {
    /// The calls of `nr_vcpus` vCPUs reading guest RAM through `mmu`, rendezvous going to
    /// `rendezvous`; first-exit times count from `started`.
    pub fn new(
        mmu: Arc<GuestMmu>,
        rendezvous: Option<Arc<dyn RendezvousHandler>>,
        nr_vcpus: usize,
        started: Instant,
    ) -> Self {
        TestGuestCalls {
            mmu,
            rendezvous,
            progress: (0..nr_vcpus).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
            started,
        }
    }

    /// Per vCPU: (pages done in the current pass, the pass's total).
    pub fn progress(&self) -> Vec<(u64, u64)> {
        self.progress.iter().map(|(d, t)| (d.load(Ordering::Relaxed), t.load(Ordering::Relaxed))).collect()
    }
}

impl GuestCalls for TestGuestCalls {
    fn call(&self, index: usize, data: &[u8], report: &mut VcpuReport) -> Option<VcpuOutcome> {
        let (vcpu, event) = match decode(self.mmu.as_ref(), data) {
            Ok(decoded) => decoded,
            Err(e) => return Some(VcpuOutcome::GuestFailure { message: format!("bad ucall: {e}") }),
        };
        if vcpu != index as u64 {
            return Some(VcpuOutcome::GuestFailure {
                message: format!("vCPU {} made a ucall claiming to be vCPU {vcpu}", index),
            });
        }
        let (done, total) = &self.progress[index];
        match event {
            UcallEvent::Hello { abi_version, .. } => {
                report.first_exit_us = Some(self.started.elapsed().as_micros() as u64);
                if abi_version != guest_abi::ABI_VERSION {
                    return Some(VcpuOutcome::GuestFailure {
                        message: format!(
                            "guest speaks ABI version {abi_version}, this VMM {}",
                            guest_abi::ABI_VERSION
                        ),
                    });
                }
                tracing::debug!(vcpu = index, "guest said hello");
            }
            UcallEvent::Print(line) => println!("[guest vCPU {}] {line}", index),
            UcallEvent::Stage(stage) => {
                tracing::debug!(vcpu = index, stage, "guest stage");
                done.store(0, Ordering::Relaxed);
            }
            UcallEvent::Progress { done: d, total: t } => {
                done.store(d, Ordering::Relaxed);
                total.store(t, Ordering::Relaxed);
            }
            UcallEvent::Timing { pass, pages, cycles } => {
                report.timings.push(PassTiming { pass, pages, cycles })
            }
            UcallEvent::Failure(message) => return Some(VcpuOutcome::GuestFailure { message }),
            UcallEvent::Done { pages, checksum } => {
                done.store(pages, Ordering::Relaxed);
                return Some(VcpuOutcome::Done { pages, checksum });
            }
            UcallEvent::Rendezvous { kind: guest_abi::Rendezvous::Idle, args } => {
                // The guest has nothing to do for a moment: this thread sleeps instead of the
                // vCPU spinning (a CPL 3 guest cannot halt).
                std::thread::sleep(std::time::Duration::from_micros(args[1].min(guest_abi::MAX_IDLE_US)));
            }
            UcallEvent::Rendezvous { kind, args } => {
                let Some(handler) = &self.rendezvous else {
                    return Some(VcpuOutcome::GuestFailure {
                        message: format!("rendezvous {kind:?}, but this VM has no host side for it"),
                    });
                };
                let reply = match handler.handle(index, kind, args) {
                    Ok(reply) => reply,
                    Err(message) => return Some(VcpuOutcome::Error { message }),
                };
                let bytes: Vec<u8> = reply.iter().flat_map(|a| a.to_le_bytes()).collect();
                let record = record_gpa(data).expect("decoded above");
                if let Err(e) = self.mmu.write(record + ARGS_OFFSET, &bytes) {
                    return Some(VcpuOutcome::Error {
                        message: format!("cannot reply to the rendezvous: {e}"),
                    });
                }
            }
            UcallEvent::Exception { vector, error_code, rip, cr2 } => {
                return Some(VcpuOutcome::GuestException {
                    message: format!(
                        "{} (vector {vector}) at rip={rip:#x}, error code {error_code:#x}, cr2={cr2:#x}",
                        exception_name(vector)
                    ),
                })
            }
        }
        None
    }
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, gpa: u64, words: [u64; 10]) {
        for (i, w) in words.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(gpa + 8 * i as u64)).unwrap();
        }
    }

    #[test]
    fn decodes_a_failure_with_its_message() {
        let m = mem();
        m.write_slice(b"boom at 0x1000", GuestAddress(0x5000)).unwrap();
        put(&m, 0x4000, [6, 1, 0, 0, 0, 0, 0, 0, 0x5000, 14]);
        let (vcpu, ev) = decode(&m, &0x4000u32.to_le_bytes()).unwrap();
        assert_eq!(vcpu, 1);
        assert_eq!(ev, UcallEvent::Failure("boom at 0x1000".into()));
    }

    #[test]
    fn hostile_records_are_errors_not_reads_outside_ram() {
        let m = mem();
        assert_eq!(decode(&m, &0xfff0_0000u32.to_le_bytes()), Err(UcallError::RecordOutsideRam(0xfff0_0000)));
        // A record straddling the end of RAM.
        assert_eq!(
            decode(&m, &((1u32 << 20) - 16).to_le_bytes()),
            Err(UcallError::RecordOutsideRam((1 << 20) - 16))
        );
        put(&m, 0x4000, [99, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode(&m, &0x4000u32.to_le_bytes()), Err(UcallError::UnknownKind(99)));
        put(&m, 0x4000, [2, 0, 0, 0, 0, 0, 0, 0, 0xffff_0000, 8]);
        assert!(matches!(decode(&m, &0x4000u32.to_le_bytes()), Err(UcallError::MessageOutsideRam { .. })));
        assert_eq!(decode(&m, &[0, 0x40]), Err(UcallError::BadWidth(2)));
    }

    #[test]
    fn long_messages_are_cut() {
        let m = mem();
        m.write_slice(&[b'a'; 4096], GuestAddress(0x5000)).unwrap();
        put(&m, 0x4000, [2, 0, 0, 0, 0, 0, 0, 0, 0x5000, u64::MAX]);
        let (_, ev) = decode(&m, &0x4000u32.to_le_bytes()).unwrap();
        let UcallEvent::Print(text) = ev else { panic!("{ev:?}") };
        assert_eq!(text.len(), MAX_MESSAGE_LEN + 3);
    }
}
