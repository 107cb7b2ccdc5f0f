//! Property-based tests of the request parsers (issue 6): the control API's request lines, the
//! balloon's PFN arrays and free page reports, virtio-mem's requests and the split virtqueue,
//! each fed arbitrary input for a few hundred cases (a short fuzz run inside `cargo test`; the
//! long runs are the cargo-fuzz targets in `vmm/fuzz/`, which share the rigs in
//! `tests/parsers/support/mod.rs`).
//!
//! Besides "never panics", the structured properties compare each device with a small model:
//! which discards a request must cause (exactly), which requests must be refused, which answer
//! virtio-mem must give.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, OnceLock};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

#[path = "parsers/support/mod.rs"]
mod support;

use support::{
    BalloonRig, Discard, MemRig, BALLOON_RAM, B_DATA, B_RINGS, B_RINGS_LEN, MEM_BLOCK, MEM_REGION_SIZE,
    M_DATA,
};
use vmm::devices::virtio::balloon::{VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use vmm::devices::virtio::mem::*;
use vmm::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

fn config(cases: u32) -> Config {
    // No regression files next to the sources: a failure prints its minimal input.
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn balloon_rig() -> MutexGuard<'static, BalloonRig> {
    static RIG: OnceLock<Mutex<BalloonRig>> = OnceLock::new();
    RIG.get_or_init(|| Mutex::new(BalloonRig::new())).lock().unwrap_or_else(|e| e.into_inner())
}

fn mem_rig() -> MutexGuard<'static, MemRig> {
    static RIG: OnceLock<Mutex<MemRig>> = OnceLock::new();
    RIG.get_or_init(|| Mutex::new(MemRig::new())).lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The control API

/// A JSON value of the kinds requests carry, biased towards what the parser looks at.
fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..1 << 40).prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:?}")),
        Just("18446744073709551616".to_string()),
        Just("1e3".to_string()),
        prop::sample::select(COMMAND_NAMES.to_vec()).prop_map(|s| serde_json::to_string(s).unwrap()),
        prop::sample::select(vec![
            "vmem0",
            "/machine/peripheral/vmem0",
            "balloon0",
            "requested-size",
            "size",
            "vm",
            "x"
        ])
        .prop_map(|s| serde_json::to_string(s).unwrap()),
        "[a-zA-Z0-9 \\\\\"\u{e9}-]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("[1, \"x\", {\"a\": null}]".to_string()),
        Just("{\"a\": 1, \"a\": 2}".to_string()),
        Just("{\"execute\": \"quit\"}".to_string()),
    ]
}

/// Command names a request may carry: zapvm's, and some it does not have.
const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "balloon",
    "query-balloon",
    "query-version",
    "query-commands",
    "query-memory-devices",
    "query-memory-size-summary",
    "qom-get",
    "qom-set",
    "query-stats",
    "query-stats-schemas",
    "__org.zapvm_query-memory-layer",
    "__org.zapvm_query-balloon",
    "__org.zapvm_query-virtio-mem",
    "system_reset",
    "Quit",
    "",
];

/// An `arguments` object: argument names the commands take (and others), duplicates possible.
fn arguments() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        3 => prop::sample::select(vec!["value", "path", "property", "target", "vcpus", "providers", "enable"])
            .prop_map(str::to_string),
        1 => "[a-z]{0,6}",
    ];
    vec((name, json_value()), 0..4).prop_map(|members| {
        let parts: Vec<String> =
            members.iter().map(|(k, v)| format!("{}: {v}", serde_json::to_string(k).unwrap())).collect();
        format!("{{{}}}", parts.join(", "))
    })
}

/// A request-shaped line: an object of members (duplicates possible), sometimes mutated.
fn request_line() -> impl Strategy<Value = Vec<u8>> {
    let member = prop_oneof![
        3 => arguments().prop_map(|a| format!("\"arguments\": {a}")),
        2 => json_value().prop_map(|v| format!("\"id\": {v}")),
        1 => json_value().prop_map(|v| format!("\"arguments\": {v}")),
        1 => json_value().prop_map(|v| format!("\"control\": {v}")),
        1 => prop::sample::select(COMMAND_NAMES.to_vec()).prop_map(|c| format!("\"exec-oob\": {:?}", c)),
        1 => ("[a-z]{0,6}", json_value()).prop_map(|(k, v)| format!("{}: {v}", serde_json::to_string(&k).unwrap())),
    ];
    let execute = prop_oneof![
        6 => prop::sample::select(COMMAND_NAMES.to_vec()).prop_map(|c| serde_json::to_string(c).unwrap()),
        1 => json_value(),
    ];
    (
        execute,
        vec(member, 0..3),
        any::<bool>(),
        any::<bool>(),
        prop::option::weighted(0.2, (any::<prop::sample::Index>(), any::<u8>(), 0..3u8)),
    )
        .prop_map(|(execute, members, execute_first, with_execute, mutation)| {
            let mut parts = Vec::new();
            let execute = format!("\"execute\": {execute}");
            if with_execute && execute_first {
                parts.push(execute.clone());
            }
            parts.extend(members);
            if with_execute && !execute_first {
                parts.push(execute);
            }
            let mut line = format!("{{{}}}", parts.join(", ")).into_bytes();
            if let Some((at, byte, kind)) = mutation {
                let i = at.index(line.len() + 1);
                match kind {
                    0 if i < line.len() => {
                        line.remove(i);
                    }
                    1 => line.insert(i, byte),
                    _ => line.truncate(i),
                }
            }
            line
        })
}

proptest! {
    #![proptest_config(config(2048))]

    /// Arbitrary bytes: one well-formed reply, and the VM only for well-formed requests.
    #[test]
    fn api_arbitrary_bytes_get_one_reply(line in vec(any::<u8>(), 0..256)) {
        support::check_api_line(&line);
    }

    /// Request-shaped lines: the reply, the id and the VM call are what the protocol says.
    #[test]
    fn api_requests_follow_the_protocol(line in request_line()) {
        support::check_api_line(&line);
    }
}

// ---------------------------------------------------------------------------------------------
// The balloon

/// A PFN: mostly inside the rig's 16 MiB (PFNs 0..0x1000), sometimes just past it or anywhere.
fn pfn() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 0x100u32..0x140,
        4 => 0u32..0x1000,
        1 => 0x1000u32..0x1010,
        1 => any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
struct PfnRequest {
    deflate: bool,
    pfns: Vec<u32>,
    /// Descriptors the array is split into.
    pieces: u8,
    /// 0: well-formed; 1: a length not a multiple of 4; 2: a device-writable descriptor.
    hostile: u8,
}

fn pfn_request() -> impl Strategy<Value = PfnRequest> {
    (any::<bool>(), vec(pfn(), 0..40), 1u8..4, prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)])
        .prop_map(|(deflate, pfns, pieces, hostile)| PfnRequest { deflate, pfns, pieces, hostile })
}

/// Sorted, unique PFNs as (gpa, len) runs.
fn runs(pfns: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pfns {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == p * 4096 => *len += 4096,
            _ => runs.push((p * 4096, 4096)),
        }
    }
    runs
}

fn ranges(discards: &[Discard]) -> Vec<(u64, u64)> {
    discards.iter().map(|d| (d.gpa, d.len)).collect()
}

/// A free page report descriptor: page-aligned RAM, unaligned, empty, past RAM, or in the
/// hot-pluggable region (not the balloon's: the rig shares no virtio-mem plugged map).
fn report_range(hotplug: u64) -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        6 => (0x100u64..0x200, 1u32..8).prop_map(|(p, n)| (p * 4096, n * 4096)),
        1 => (0x100u64..0x200, 1u32..8).prop_map(|(p, n)| (p * 4096 + 512, n * 4096)),
        1 => (0x100u64..0x200).prop_map(|p| (p * 4096, 0)),
        1 => (0xff0u64..0x1000, 1u32..32).prop_map(|(p, n)| (p * 4096, n * 4096)),
        2 => (0u64..0x400, 1u32..8).prop_map(move |(p, n)| (hotplug + p * 4096, n * 4096)),
        1 => (any::<u64>(), any::<u32>()),
    ]
}

/// The PFN-request property's check (see `balloon_pfn_requests_match_the_model`).
fn check_pfn_requests(requests: &[PfnRequest]) -> Result<(), TestCaseError> {
    let mut rig = balloon_rig();
    rig.start(1 << VIRTIO_BALLOON_F_STATS_VQ, &[16]);
    let mut ballooned = BTreeSet::new();
    for (n, r) in requests.iter().enumerate() {
        let q = r.deflate as usize;
        let bytes: Vec<u8> = r.pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        rig.mem.write(B_DATA, &bytes);
        // Split into `pieces` descriptors at multiples of 4 bytes (the last takes the rest).
        let mut cuts = vec![0usize];
        for i in 1..r.pieces as usize {
            cuts.push((bytes.len() / 4 * i / r.pieces as usize) * 4);
        }
        cuts.push(bytes.len());
        let pieces = cuts.len() - 1;
        for i in 0..pieces {
            let (a, b) = (cuts[i], cuts[i + 1]);
            let mut len = (b - a) as u32;
            let mut flags = if i + 1 < pieces { VIRTQ_DESC_F_NEXT } else { 0 };
            if i == 0 && r.hostile == 1 {
                len += 1 + (len % 3);
            }
            if i == pieces - 1 && r.hostile == 2 {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            rig.set_desc(q, i as u16, B_DATA + a as u64, len, flags, i as u16 + 1);
        }
        rig.push(q, 0);
        let discards = rig.notify(q as u32);
        let unique: BTreeSet<u64> = r.pfns.iter().map(|&p| p as u64).collect();
        let valid =
            r.hostile == 0 && unique.len() == r.pfns.len() && unique.iter().all(|&p| p < BALLOON_RAM / 4096);
        let expected = if valid && !r.deflate { runs(&unique) } else { Vec::new() };
        prop_assert_eq!(&ranges(&discards), &expected, "request {} {:?}", n, r);
        if !expected.is_empty()
            && unique.iter().any(|&p| (B_RINGS..B_RINGS + B_RINGS_LEN).contains(&(p * 4096)))
        {
            // The driver ballooned a page of its own rings: they now read zeros, which the device
            // may take for a broken ring (DEVICE_NEEDS_RESET). Nothing after this is meaningful.
            return Ok(());
        }
        if valid {
            if r.deflate {
                ballooned.retain(|p| !unique.contains(p));
            } else {
                ballooned.extend(unique.iter().copied());
            }
        }
        prop_assert_eq!(
            rig.used_idx(q),
            requests[..=n].iter().filter(|x| x.deflate == r.deflate).count() as u16
        );
        for &p in unique.iter().filter(|&&p| p < BALLOON_RAM / 4096) {
            prop_assert_eq!(rig.t.device().is_ballooned(p), ballooned.contains(&p), "PFN {:#x}", p);
        }
        prop_assert_eq!(rig.t.device().stats().ballooned_pages, ballooned.len() as u64);
    }
    Ok(())
}

/// A CI run's minimal failing input: the driver inflates PFN 17, the page that holds its own
/// inflate queue's available ring. The ring then reads zeros, so the device sees an available
/// index that went backwards, stops with DEVICE_NEEDS_RESET and discards nothing more; the
/// model stops at such a request.
#[test]
fn balloon_inflating_the_drivers_own_ring_needs_a_reset() {
    let ring_pfn = 17;
    assert!((B_RINGS..B_RINGS + B_RINGS_LEN).contains(&(ring_pfn as u64 * 4096)));
    let requests = [
        PfnRequest { deflate: false, pfns: vec![ring_pfn], pieces: 1, hostile: 0 },
        PfnRequest { deflate: false, pfns: vec![0x120], pieces: 1, hostile: 0 },
    ];
    check_pfn_requests(&requests).unwrap();
    let mut rig = balloon_rig();
    assert_ne!(rig.t.status() & vmm::devices::virtio::status::DEVICE_NEEDS_RESET, 0);
    rig.push(0, 0);
    assert!(rig.notify(0).is_empty(), "a device that needs a reset discards nothing");
}

proptest! {
    #![proptest_config(config(1024))]

    /// Arbitrary queue contents (the fuzz target's decoder): no panic, no discard outside RAM
    /// or of the hot-pluggable region, inflate discards only ballooned pages.
    #[test]
    fn balloon_arbitrary_queues_stay_inside_ram(data in vec(any::<u8>(), 0..1024)) {
        balloon_rig().run_fuzz(&data);
    }

    /// PFN requests against a model: a request is carried out iff every buffer is readable and
    /// whole PFNs and every PFN is in RAM and given once; an inflate discards exactly its PFNs'
    /// runs (one operation each), a deflate nothing; the bitmap follows.
    #[test]
    fn balloon_pfn_requests_match_the_model(requests in vec(pfn_request(), 1..8)) {
        check_pfn_requests(&requests)?;
    }

    /// Free page reports against a model: exactly the page-aligned, non-empty descriptors inside
    /// guest RAM proper are discarded (merged when they touch); nothing in the hot-pluggable
    /// region, nothing unaligned or outside RAM.
    #[test]
    fn balloon_free_page_reports_match_the_model(
        reports in vec(vec(report_range(1 << 32), 1..6), 1..4),
    ) {
        let mut rig = balloon_rig();
        prop_assert_eq!(rig.hotplug_base(), 1 << 32);
        rig.start(1 << VIRTIO_BALLOON_F_PAGE_REPORTING, &[16]);
        for report in &reports {
            for (i, &(addr, len)) in report.iter().enumerate() {
                let flags = VIRTQ_DESC_F_WRITE | if i + 1 < report.len() { VIRTQ_DESC_F_NEXT } else { 0 };
                rig.set_desc(2, i as u16, addr, len, flags, i as u16 + 1);
            }
            rig.push(2, 0);
            let discards = rig.notify(2);
            let mut valid: Vec<(u64, u64)> = report
                .iter()
                .map(|&(a, l)| (a, l as u64))
                .filter(|&(a, l)| l > 0 && a % 4096 == 0 && l % 4096 == 0 && a.checked_add(l).is_some_and(|e| e <= BALLOON_RAM))
                .collect();
            valid.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, l) in valid {
                match merged.last_mut() {
                    Some((s, ml)) if a <= *s + *ml => *ml = (*ml).max(a + l - *s),
                    _ => merged.push((a, l)),
                }
            }
            prop_assert_eq!(ranges(&discards), merged, "report {:x?}", report);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-mem

#[derive(Debug, Clone)]
enum MemOp {
    Request { kind: u16, addr: u64, nb_blocks: u16 },
    Requested(u64),
}

fn mem_op(region: u64) -> impl Strategy<Value = MemOp> {
    let kind = prop_oneof![8 => 0u16..4, 1 => any::<u16>()];
    let addr = prop_oneof![
        8 => (0u64..18).prop_map(move |b| region + b * MEM_BLOCK),
        1 => (0u64..0x4000).prop_map(move |p| region + p * 4096),
        1 => (0u64..40).prop_map(|b| b * MEM_BLOCK),
        1 => any::<u64>(),
        1 => Just(!(MEM_BLOCK - 1)),
    ];
    let nb = prop_oneof![8 => 0u16..18, 1 => any::<u16>()];
    prop_oneof![
        8 => (kind, addr, nb).prop_map(|(kind, addr, nb_blocks)| MemOp::Request { kind, addr, nb_blocks }),
        1 => (0u64..=16).prop_map(|b| MemOp::Requested(b * MEM_BLOCK)),
    ]
}

/// What virtio-mem 1.2 (§5.15.6) says a request gets: (type, state) and the discards.
struct MemModel {
    region: u64,
    plugged: [bool; 16],
    requested: u64,
}

impl MemModel {
    fn blocks(&self, addr: u64, nb: u16) -> Option<std::ops::Range<usize>> {
        let end = (nb as u64).checked_mul(MEM_BLOCK).and_then(|len| addr.checked_add(len))?;
        if nb == 0
            || !addr.is_multiple_of(MEM_BLOCK)
            || addr < self.region
            || end > self.region + MEM_REGION_SIZE
        {
            return None;
        }
        let first = ((addr - self.region) / MEM_BLOCK) as usize;
        Some(first..first + nb as usize)
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in (0..16).filter(|&b| self.plugged[b]) {
            let gpa = self.region + b as u64 * MEM_BLOCK;
            match runs.last_mut() {
                Some((s, l)) if *s + *l == gpa => *l += MEM_BLOCK,
                _ => runs.push((gpa, MEM_BLOCK)),
            }
        }
        runs
    }

    fn apply(&mut self, kind: u16, addr: u64, nb: u16) -> ((u16, u16), Vec<(u64, u64)>) {
        let error = ((VIRTIO_MEM_RESP_ERROR, 0), Vec::new());
        match kind {
            VIRTIO_MEM_REQ_UNPLUG_ALL => {
                let runs = self.runs();
                self.plugged = [false; 16];
                ((VIRTIO_MEM_RESP_ACK, 0), runs)
            }
            VIRTIO_MEM_REQ_PLUG | VIRTIO_MEM_REQ_UNPLUG | VIRTIO_MEM_REQ_STATE => {
                let Some(range) = self.blocks(addr, nb) else { return error };
                let count = range.clone().filter(|&b| self.plugged[b]).count();
                let total = self.plugged.iter().filter(|&&p| p).count();
                match kind {
                    VIRTIO_MEM_REQ_PLUG if count != 0 => error,
                    VIRTIO_MEM_REQ_PLUG if (total + range.len()) as u64 * MEM_BLOCK > self.requested => {
                        ((VIRTIO_MEM_RESP_NACK, 0), Vec::new())
                    }
                    VIRTIO_MEM_REQ_PLUG => {
                        range.for_each(|b| self.plugged[b] = true);
                        ((VIRTIO_MEM_RESP_ACK, 0), Vec::new())
                    }
                    VIRTIO_MEM_REQ_UNPLUG if count != range.len() => error,
                    VIRTIO_MEM_REQ_UNPLUG => {
                        range.clone().for_each(|b| self.plugged[b] = false);
                        ((VIRTIO_MEM_RESP_ACK, 0), vec![(addr, nb as u64 * MEM_BLOCK)])
                    }
                    _ => {
                        let state = match count {
                            0 => VIRTIO_MEM_STATE_UNPLUGGED,
                            n if n == range.len() => VIRTIO_MEM_STATE_PLUGGED,
                            _ => VIRTIO_MEM_STATE_MIXED,
                        };
                        ((VIRTIO_MEM_RESP_ACK, state), Vec::new())
                    }
                }
            }
            _ => error,
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Arbitrary requests and descriptor shapes (the fuzz target's decoder): no panic, every
    /// discard whole blocks of the device region, every used length 0 or 10.
    #[test]
    fn virtio_mem_arbitrary_queues_stay_inside_the_region(data in vec(any::<u8>(), 0..1024)) {
        mem_rig().run_fuzz(&data);
    }

    /// Well-formed chains with arbitrary requests against a model: the response type is in the
    /// spec's set and is exactly the model's (with the STATE answer), and the discards are
    /// exactly the unplugged blocks' runs.
    #[test]
    fn virtio_mem_requests_match_the_model(ops in vec(mem_op(1 << 32), 1..24)) {
        let mut rig = mem_rig();
        prop_assert_eq!(rig.region, 1 << 32);
        rig.start(8 * MEM_BLOCK, 8);
        let mut model = MemModel { region: rig.region, plugged: [false; 16], requested: 8 * MEM_BLOCK };
        let (req, resp) = (M_DATA, M_DATA + 0x100);
        let mut used = 0u16;
        for op in &ops {
            let (kind, addr, nb) = match *op {
                MemOp::Requested(bytes) => {
                    rig.t.update_config(|m| m.set_requested_size(bytes)).unwrap();
                    model.requested = bytes;
                    continue;
                }
                MemOp::Request { kind, addr, nb_blocks } => (kind, addr, nb_blocks),
            };
            rig.write_request(req, kind, addr, nb);
            rig.mem.write(resp, &[0xff; 16]);
            rig.set_desc(0, req, 24, VIRTQ_DESC_F_NEXT, 1);
            rig.set_desc(1, resp, 16, VIRTQ_DESC_F_WRITE, 0);
            rig.push(0);
            let discards = rig.notify(0);
            used = used.wrapping_add(1);
            prop_assert_eq!(rig.used_idx(), used);
            prop_assert_eq!(rig.used_elem(used - 1), (0, 10));
            let b = rig.mem.read(resp, 10);
            let got = (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[8], b[9]]));
            prop_assert!(got.0 <= VIRTIO_MEM_RESP_ERROR, "response type {} outside the spec", got.0);
            let (want, want_discards) = model.apply(kind, addr, nb);
            prop_assert_eq!(got, want, "{:?}", op);
            prop_assert_eq!(ranges(&discards), want_discards, "{:?}", op);
            let plugged = model.plugged.iter().filter(|&&p| p).count() as u64;
            prop_assert_eq!(rig.t.device().plugged_size(), plugged * MEM_BLOCK);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The split virtqueue

proptest! {
    #![proptest_config(config(2048))]

    /// Arbitrary descriptor tables and avail rings: no panic, bounded chains and batches.
    #[test]
    fn virtqueue_arbitrary_rings_pop_bounded_chains(data in vec(any::<u8>(), 0..512)) {
        static MEM: OnceLock<vmm::memory::GuestMemoryMmap> = OnceLock::new();
        support::run_virtqueue_fuzz(MEM.get_or_init(support::virtqueue_memory), &data);
    }
}

/// `balloon`'s `value` against answers worked out by hand from QEMU's meaning (the memory the
/// guest keeps; the balloon takes the rest of base memory, in whole 4 KiB pages, never less than
/// nothing), so that the oracle's own arithmetic is checked too.
#[test]
fn balloon_values_mean_what_qemu_says() {
    let base = support::FAKE_BASE_MEMORY;
    let cases: &[(&str, Option<u32>)] = &[
        ("1073741824", Some(0)),
        ("1073741825", Some(0)),
        ("18446744073709551615", Some(0)),
        ("805306368", Some(65536)),
        ("1073737728", Some(1)),
        ("1073737729", Some(1)),
        ("1", Some(262144)),
        ("0", None),
        ("-4096", None),
        ("1.5", None),
        ("\"1G\"", None),
        ("null", None),
    ];
    assert_eq!(base, 1 << 30);
    for &(value, pages) in cases {
        let line = format!(r#"{{"execute": "balloon", "arguments": {{"value": {value}}}, "id": 1}}"#);
        let (reply, calls) = support::check_api_line(line.as_bytes());
        assert_eq!(reply.get("return").is_some(), pages.is_some(), "{value}: {reply}");
        assert_eq!(calls, pages.map(support::Call::BalloonTarget).into_iter().collect::<Vec<_>>(), "{value}");
    }
}
