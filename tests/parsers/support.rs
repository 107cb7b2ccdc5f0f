//! Shared by `tests/parsers.rs` (proptest, stable `cargo test`) and the cargo-fuzz targets in
//! `vmm/fuzz/` (which include this file with `#[path]`): rigs that drive the request parsers —
//! the control socket's [`handle_line`] (QMP), the balloon's PFN arrays and free page reports, the
//! virtio-mem request queue, a bare split virtqueue — from arbitrary bytes, and check their
//! invariants. A violated invariant panics (that is what both proptest and libFuzzer catch).
//!
//! The device rigs are VM-less: guest RAM, the notifier's address space, the VMM's table
//! (`GuestMmu`) and the device behind its virtio-mmio transport, driven through MMIO register
//! writes exactly as a driver would. A recording notifier subscriber sees every range the device
//! discards. Guest RAM has a hot-pluggable region above 4 GiB as `zapvm run --virtio-mem` gives
//! it, which the balloon must never touch.
//!
//! Fuzz inputs are decoded by [`Bytes`], a cursor that yields zeros once the input is exhausted,
//! so every byte string is a valid input and the decoders are biased towards interesting values
//! (addresses inside the rings' data area, PFNs inside RAM, block-aligned virtio-mem ranges).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use vmm::api::{
    handle_line, ErrorClass, QmpError, RunStatus, Session, StatsGroup, VirtioMemInfo, VmHandle, MAX_LINE,
};
use vmm::devices::virtio::balloon::{
    Balloon, BalloonConfig, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use vmm::devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::devices::virtio::queue::{Popped, Queue};
use vmm::devices::virtio::{status, VirtioDevice, VirtioInterrupt};
use vmm::devices::BusDevice;
use vmm::memory::{GuestMemoryMmap, GuestRam, MemoryBackend, MemoryConfig};
use vmm::mmu::{GuestMemoryAccess, GuestMmu};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------------------------
// Input decoding

/// A cursor over fuzz input: little-endian integers, zeros once exhausted.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    /// The next `n` bytes (zero-padded past the end).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
}

fn w32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

fn r32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Status 0 (reset), then ACKNOWLEDGE, DRIVER, `features` | VERSION_1, FEATURES_OK.
fn negotiate(dev: &mut dyn BusDevice, features: u64) {
    w32(dev, reg::STATUS, 0);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(dev, reg::DRIVER_FEATURES_SEL, 0);
    w32(dev, reg::DRIVER_FEATURES, features as u32);
    w32(dev, reg::DRIVER_FEATURES_SEL, 1);
    w32(dev, reg::DRIVER_FEATURES, (features >> 32) as u32 | 1);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(r32(dev, reg::STATUS) & status::FEATURES_OK, 0, "features {features:#x} refused");
}

/// Queue `index` of `size` entries at `ring` (descriptors; avail at +0x1000, used at +0x2000).
fn setup_queue(dev: &mut dyn BusDevice, index: u32, size: u16, ring: u64) {
    w32(dev, reg::QUEUE_SEL, index);
    w32(dev, reg::QUEUE_NUM, size as u32);
    for (lo, addr) in [
        (reg::QUEUE_DESC_LOW, ring),
        (reg::QUEUE_DRIVER_LOW, ring + 0x1000),
        (reg::QUEUE_DEVICE_LOW, ring + 0x2000),
    ] {
        w32(dev, lo, addr as u32);
        w32(dev, lo + 4, (addr >> 32) as u32);
    }
    w32(dev, reg::QUEUE_READY, 1);
    assert_eq!(r32(dev, reg::QUEUE_READY), 1, "queue {index} of size {size} refused");
}

fn driver_ok(dev: &mut dyn BusDevice) {
    let s = r32(dev, reg::STATUS);
    w32(dev, reg::STATUS, s | status::DRIVER_OK);
    assert_eq!(r32(dev, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

/// What the fake VM was asked to do (queries that change nothing are not recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `stop()`.
    Stop,
    /// `cont()`.
    Cont,
    /// `quit()`.
    Quit,
    /// `set_balloon_target(pages)`.
    BalloonTarget(u32),
    /// `set_requested_size("vmem0", bytes)`.
    RequestedSize(u64),
    /// `memory_layer()`.
    MemoryLayer,
    /// `balloon_details()`.
    BalloonDetails,
    /// `virtio_mem_details()`.
    VirtioMemDetails,
}

/// The fake VM's base memory.
pub const FAKE_BASE_MEMORY: u64 = 1 << 30;

/// A VM that records its calls and always succeeds. (It does not assert anything itself:
/// `handle_line` turns a panic of the handle into an error reply, so checks are made on the
/// record afterwards.)
#[derive(Default)]
pub struct FakeVm {
    calls: Mutex<Vec<Call>>,
}

impl FakeVm {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
    /// The calls so far, emptied.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl VmHandle for FakeVm {
    fn status(&self) -> RunStatus {
        RunStatus::Running
    }
    fn stop(&self) -> Result<(), QmpError> {
        self.record(Call::Stop);
        Ok(())
    }
    fn cont(&self) -> Result<(), QmpError> {
        self.record(Call::Cont);
        Ok(())
    }
    fn quit(&self) -> Result<(), QmpError> {
        self.record(Call::Quit);
        Ok(())
    }
    fn base_memory(&self) -> u64 {
        FAKE_BASE_MEMORY
    }
    fn set_balloon_target(&self, pages: u32) -> Result<(), QmpError> {
        self.record(Call::BalloonTarget(pages));
        Ok(())
    }
    fn balloon_actual(&self) -> Result<u32, QmpError> {
        Ok(0)
    }
    fn balloon_guest_stats(&self) -> Result<(Vec<(String, u64)>, u64), QmpError> {
        Ok((Vec::new(), 0))
    }
    fn balloon_details(&self) -> Result<Value, QmpError> {
        self.record(Call::BalloonDetails);
        Ok(json!({}))
    }
    fn memory_devices(&self) -> Vec<VirtioMemInfo> {
        vec![VirtioMemInfo {
            id: "vmem0".into(),
            memaddr: 1 << 32,
            requested_size: 0,
            size: 0,
            max_size: 1 << 30,
            block_size: 2 << 20,
            node: 0,
        }]
    }
    fn set_requested_size(&self, _id: &str, bytes: u64) -> Result<(), QmpError> {
        self.record(Call::RequestedSize(bytes));
        Ok(())
    }
    fn virtio_mem_details(&self) -> Result<Value, QmpError> {
        self.record(Call::VirtioMemDetails);
        Ok(json!({}))
    }
    fn kvm_stats(&self) -> Result<Vec<StatsGroup>, QmpError> {
        Ok(Vec::new())
    }
    fn memory_layer(&self) -> Result<Value, QmpError> {
        self.record(Call::MemoryLayer);
        Ok(json!({}))
    }
}

/// A JSON value with every object's members in order, duplicates kept (the oracle's own view
/// of a request).
#[derive(Debug, Clone)]
enum Raw {
    Object(Vec<(String, Raw)>),
    Array(Vec<Raw>),
    Leaf(Value),
}

impl Raw {
    fn has_duplicates(&self) -> bool {
        match self {
            Raw::Object(members) => {
                let names: BTreeSet<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
                names.len() != members.len() || members.iter().any(|(_, v)| v.has_duplicates())
            }
            Raw::Array(items) => items.iter().any(Raw::has_duplicates),
            Raw::Leaf(_) => false,
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Raw::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_value())).collect()),
            Raw::Array(items) => Value::Array(items.iter().map(Raw::to_value).collect()),
            Raw::Leaf(v) => v.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Leaf(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Leaf(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Leaf(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Leaf(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Leaf(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Leaf(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = a.next_element::<Raw>()? {
                    items.push(item);
                }
                Ok(Raw::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Raw>()? {
                    members.push((k, v));
                }
                Ok(Raw::Object(members))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a request must get, by the oracle.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// A `return`, after exactly these VM calls.
    Return(Vec<Call>),
    /// An error of this class, and no VM call.
    Error(ErrorClass),
    /// A read-only query whose details the oracle does not model: a reply either way, and no
    /// VM call.
    Query,
}

/// What the QMP specification and zapvm's command contract (vmm/src/api) say a request in a
/// negotiated session must get, worked out independently of the parser: the id to echo (if
/// any) and the outcome.
fn oracle(line: &[u8]) -> (Option<Value>, Expected) {
    let generic = |id: Option<Value>| (id, Expected::Error(ErrorClass::GenericError));
    if line.len() > MAX_LINE {
        return generic(None);
    }
    let Ok(text) = std::str::from_utf8(line) else { return generic(None) };
    let Ok(raw) = serde_json::from_str::<Raw>(text) else { return generic(None) };
    if raw.has_duplicates() {
        return generic(None);
    }
    let Raw::Object(members) = raw else { return generic(None) };
    let get = |name: &str| members.iter().find(|(k, _)| k == name).map(|(_, v)| v.to_value());
    let id = get("id");
    if get("exec-oob").is_some() {
        return generic(id);
    }
    let Some(Value::String(execute)) = get("execute") else { return generic(id) };
    let arguments = match get("arguments") {
        None => serde_json::Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return generic(id),
    };
    if members.iter().any(|(k, _)| !["execute", "arguments", "id", "control"].contains(&k.as_str())) {
        return generic(id);
    }
    let plain = [
        ("stop", Some(Call::Stop)),
        ("cont", Some(Call::Cont)),
        ("quit", Some(Call::Quit)),
        ("query-status", None),
        ("query-balloon", None),
        ("query-version", None),
        ("query-commands", None),
        ("query-memory-devices", None),
        ("query-memory-size-summary", None),
        ("__org.zapvm_query-memory-layer", Some(Call::MemoryLayer)),
        ("__org.zapvm_query-balloon", Some(Call::BalloonDetails)),
        ("__org.zapvm_query-virtio-mem", Some(Call::VirtioMemDetails)),
    ];
    if let Some((_, call)) = plain.iter().find(|(n, _)| *n == execute) {
        if !arguments.is_empty() {
            return generic(id);
        }
        return (id, Expected::Return(call.iter().cloned().collect()));
    }
    let int = |v: &Value| v.as_i64().map(i128::from).or_else(|| v.as_u64().map(i128::from));
    match execute.as_str() {
        "qmp_capabilities" => (id, Expected::Error(ErrorClass::CommandNotFound)),
        "balloon" => {
            if arguments.keys().any(|k| k != "value") {
                return generic(id);
            }
            let Some(value) = arguments.get("value").and_then(int) else { return generic(id) };
            if value <= 0 {
                return generic(id);
            }
            let keep = (value as u128).min(u128::from(FAKE_BASE_MEMORY)) as u64;
            let pages = (FAKE_BASE_MEMORY - keep).div_ceil(4096) as u32;
            (id, Expected::Return(vec![Call::BalloonTarget(pages)]))
        }
        "qom-set" => {
            if arguments.keys().any(|k| !["path", "property", "value"].contains(&k.as_str())) {
                return generic(id);
            }
            let (Some(Value::String(path)), Some(Value::String(property)), Some(value)) =
                (arguments.get("path"), arguments.get("property"), arguments.get("value"))
            else {
                return generic(id);
            };
            match path.as_str() {
                "vmem0" | "/machine/peripheral/vmem0" => match (property.as_str(), value.as_u64()) {
                    ("requested-size", Some(bytes)) => {
                        (id, Expected::Return(vec![Call::RequestedSize(bytes)]))
                    }
                    _ => generic(id),
                },
                "balloon0" | "/machine/peripheral/balloon0" => generic(id),
                _ => (id, Expected::Error(ErrorClass::DeviceNotFound)),
            }
        }
        "qom-get" | "query-stats" | "query-stats-schemas" => (id, Expected::Query),
        _ => (id, Expected::Error(ErrorClass::CommandNotFound)),
    }
}

/// Runs `line` through [`handle_line`] in a negotiated session against a fake VM and checks
/// the reply: one line of JSON, a well-formed QMP reply (`return`, or `error` with a class and
/// a description), the id echoed exactly when the request had one, and the VM called exactly
/// as the oracle says (never for a malformed request). Returns the reply and the calls.
pub fn check_api_line(line: &[u8]) -> (Value, Vec<Call>) {
    let vm = FakeVm::default();
    let mut session = Session::new();
    let negotiated = handle_line(&mut session, br#"{"execute":"qmp_capabilities"}"#, &vm);
    assert_eq!(negotiated, r#"{"return":{}}"#);
    let text = handle_line(&mut session, line, &vm);
    let calls = vm.take();
    let shown = || String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
    assert!(!text.contains('\n'), "{:?}: reply is not one line: {text:?}", shown());
    let reply: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{:?}: reply {text:?} is not JSON: {e}", shown()));
    let object = reply.as_object().unwrap_or_else(|| panic!("{:?}: reply {text} is not an object", shown()));
    assert_eq!(
        object.contains_key("return"),
        !object.contains_key("error"),
        "{:?} -> {text}: exactly one of return and error",
        shown()
    );
    assert!(
        object.keys().all(|k| ["return", "error", "id"].contains(&k.as_str())),
        "{:?} -> {text}",
        shown()
    );
    if let Some(error) = object.get("error") {
        assert!(error["class"].is_string() && error["desc"].is_string(), "{:?} -> {text}", shown());
    }
    let (id, expected) = oracle(line);
    assert_eq!(object.get("id").cloned(), id, "{:?} -> {text}: id not echoed as sent", shown());
    match expected {
        Expected::Return(expected_calls) => {
            assert!(object.contains_key("return"), "{:?} is well-formed but got {text}", shown());
            assert_eq!(calls, expected_calls, "{:?}: wrong VM calls", shown());
        }
        Expected::Error(class) => {
            assert!(calls.is_empty(), "{:?} is refused ({class}) but reached the VM: {calls:?}", shown());
            let got: ErrorClass = serde_json::from_value(object["error"]["class"].clone())
                .unwrap_or_else(|e| panic!("{:?} -> {text}: {e}", shown()));
            assert_eq!(got, class, "{:?} -> {text}", shown());
        }
        Expected::Query => assert!(calls.is_empty(), "{:?}: a query called the VM: {calls:?}", shown()),
    }
    (reply, calls)
}

// ---------------------------------------------------------------------------------------------
// Discard recording

/// Records every range the notifier announces (`invalidate_range_start`), host addresses.
#[derive(Default)]
pub struct Recorder {
    ranges: Mutex<Vec<(usize, usize, usize, usize)>>,
}

impl notifier::Subscriber for Recorder {
    fn invalidate_range_start(&self, range: &notifier::Range) -> Result<(), notifier::Refused> {
        self.ranges.lock().unwrap().push((range.start, range.end, range.exact_start, range.exact_end));
        Ok(())
    }
}

/// One guest RAM region: (guest-physical start, host address, size, hot-pluggable).
type Region = (u64, usize, u64, bool);

/// A discard the subscriber saw, in guest-physical terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// Exact guest-physical range the syscall named.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
    /// Whether it lies in the hot-pluggable (virtio-mem) region.
    pub hotplug: bool,
}

/// Guest RAM, the notifier, the table and the recorder: what both device rigs share.
/// Field order is drop order (RAM last), though the rigs live in statics and are never dropped.
pub struct Memory {
    /// The VMM's table over all of guest RAM.
    pub mmu: Arc<GuestMmu>,
    recorder: Arc<Recorder>,
    space: Arc<notifier::AddressSpace>,
    regions: Vec<Region>,
    /// Guest RAM.
    pub ram: GuestRam,
}

impl Memory {
    /// `size` bytes of anonymous RAM at 0 plus `hotplug` bytes at `hotplug_base(size)`.
    pub fn new(size: u64, hotplug: u64) -> Self {
        let config = MemoryConfig { size, backend: MemoryBackend::Anonymous, thp: false };
        let ram = GuestRam::with_hotplug(config, hotplug).expect("guest RAM");
        // SAFETY: `ram` outlives the address space (dropped last, and in practice never: the
        // rigs live in statics) and stays mapped; RAM is accessed only through vm-memory and
        // the table.
        let space = unsafe { notifier::AddressSpace::new(&ram.notifier_regions()) }.expect("address space");
        let mmu = Arc::new(GuestMmu::new(&ram, space.clone()).expect("table"));
        let recorder = Arc::new(Recorder::default());
        space.subscribe(recorder.clone()).expect("subscribe");
        let hot = ram.hotplug().map(|(gpa, _)| gpa);
        let regions =
            ram.regions().map(|(gpa, hva, len)| (gpa.0, hva as usize, len, Some(gpa.0) == hot)).collect();
        Self { mmu, recorder, space, regions, ram }
    }

    /// Guest RAM through vm-memory (the driver's view).
    pub fn guest(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Writes `data` at `gpa` as the driver would (ignoring addresses outside RAM).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let _ = GuestMemoryAccess::write(self.guest(), gpa, data);
    }

    /// Reads guest memory (zeros where it is not RAM).
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let _ = GuestMemoryAccess::read(self.guest(), gpa, &mut buf);
        buf
    }

    /// The discards since the last call, checked to be whole pages inside one region of guest
    /// RAM (exact range) and announced with a page-aligned, enclosing range.
    pub fn discards(&self) -> Vec<Discard> {
        let raw = std::mem::take(&mut *self.recorder.ranges.lock().unwrap());
        raw.into_iter()
            .map(|(start, end, exact_start, exact_end)| {
                assert!(exact_start < exact_end, "empty range {exact_start:#x}..{exact_end:#x}");
                assert!(
                    start <= exact_start && exact_end <= end,
                    "announced range does not enclose the exact one"
                );
                assert!(start % 4096 == 0 && end % 4096 == 0);
                let &(gpa, hva, _, hotplug) = self
                    .regions
                    .iter()
                    .find(|&&(_, hva, len, _)| exact_start >= hva && exact_end <= hva + len as usize)
                    .unwrap_or_else(|| {
                        panic!("discard of host range {exact_start:#x}..{exact_end:#x} outside guest RAM")
                    });
                let d = Discard {
                    gpa: gpa + (exact_start - hva) as u64,
                    len: (exact_end - exact_start) as u64,
                    hotplug,
                };
                assert!(
                    d.gpa.is_multiple_of(4096) && d.len.is_multiple_of(4096),
                    "discard of partial pages: {d:x?}"
                );
                d
            })
            .collect()
    }
}

/// Where a fuzzed guest-physical address goes: mostly into `area` (the rig's scratch area, where
/// the fuzzer's bytes are), sometimes anywhere in RAM, at the hot-pluggable region, near the end
/// of RAM, or raw.
fn fuzz_addr(b: &mut Bytes, area: (u64, u64), ram: u64, hotplug: u64) -> u64 {
    let v = b.u32() as u64;
    match b.u8() % 8 {
        0..=3 => area.0 + v % area.1,
        4 => v % ram,
        5 => hotplug + v % (8 << 20),
        6 => ram - (v % 0x4000),
        _ => b.u64(),
    }
}

fn fuzz_len(b: &mut Bytes) -> u32 {
    let v = b.u16() as u32;
    match b.u8() % 8 {
        0..=2 => (v % 64) * 4,
        3 => v % 64,
        4 => v * 4,
        5 => (v % 16) * 4096,
        6 => v,
        _ => b.u32(),
    }
}

// ---------------------------------------------------------------------------------------------
// The balloon

/// Guest RAM of the balloon rig (PFNs 0..0x1000).
pub const BALLOON_RAM: u64 = 16 << 20;
/// The virtio-mem-style hot-pluggable region the balloon must leave alone.
pub const BALLOON_HOTPLUG: u64 = 4 << 20;
/// The balloon's rings: queue `q` at `B_RINGS + q * 0x4000`.
pub const B_RINGS: u64 = 0x10000;
/// The bytes the balloon's rings span (four queues).
pub const B_RINGS_LEN: u64 = 4 * 0x4000;
/// The balloon rig's scratch area for PFN arrays and stats buffers.
pub const B_DATA: u64 = 0x100000;
const B_DATA_LEN: u64 = 0x10000;

/// A balloon behind its transport over [`Memory`].
pub struct BalloonRig {
    /// The transport and the device.
    pub t: MmioTransport<Balloon>,
    /// Guest RAM and the recorder.
    pub mem: Memory,
    sizes: Vec<u16>,
    avail: Vec<u16>,
    features: u64,
}

/// The roles of the balloon's queues under `features` (Linux's numbering).
fn balloon_roles(features: u64) -> Vec<&'static str> {
    let mut roles = vec!["inflate", "deflate"];
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push("stats");
    }
    if features & (1 << VIRTIO_BALLOON_F_PAGE_REPORTING) != 0 {
        roles.push("report");
    }
    roles
}

impl BalloonRig {
    /// RAM, table, recorder and a balloon offering every feature, not yet driven.
    pub fn new() -> Self {
        let mem = Memory::new(BALLOON_RAM, BALLOON_HOTPLUG);
        let balloon = Balloon::new(mem.mmu.clone(), &mem.ram, BalloonConfig::default());
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let t = MmioTransport::new(balloon, mem.mmu.clone(), irq);
        Self { t, mem, sizes: Vec::new(), avail: Vec::new(), features: 0 }
    }

    /// The hot-pluggable region's start.
    pub fn hotplug_base(&self) -> u64 {
        self.mem.ram.hotplug().expect("hotplug region").0
    }

    /// Resets the device and the rings, negotiates `features` (balloon feature bits) and sets up
    /// every queue with `size` entries, then DRIVER_OK.
    pub fn start(&mut self, features: u64, sizes: &[u16]) {
        self.mem.discards();
        negotiate(&mut self.t, features);
        self.features = features;
        let n = balloon_roles(features).len();
        self.sizes = (0..n).map(|q| sizes[q % sizes.len()]).collect();
        self.avail = vec![0; n];
        self.mem.write(B_RINGS, &vec![0u8; B_RINGS_LEN as usize]);
        self.mem.write(B_DATA, &vec![0u8; B_DATA_LEN as usize]);
        for q in 0..n {
            setup_queue(&mut self.t, q as u32, self.sizes[q], B_RINGS + 0x4000 * q as u64);
        }
        driver_ok(&mut self.t);
        assert!(self.mem.discards().is_empty());
    }

    /// Descriptor `i` of queue `q`.
    pub fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let i = i % self.sizes[q];
        self.mem.write(B_RINGS + 0x4000 * q as u64 + 16 * i as u64, &raw);
    }

    /// Makes `head` available on queue `q`.
    pub fn push(&mut self, q: usize, head: u16) {
        let avail = B_RINGS + 0x4000 * q as u64 + 0x1000;
        let slot = avail + 4 + 2 * (self.avail[q] % self.sizes[q]) as u64;
        self.mem.write(slot, &head.to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write(avail + 2, &self.avail[q].to_le_bytes());
    }

    /// The used index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let b = self.mem.read(B_RINGS + 0x4000 * q as u64 + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Notifies queue `index` (any value, as the driver may) and checks what was discarded:
    /// guest RAM only, never the hot-pluggable region; on the inflate queue only pages that are
    /// now in the balloon; on the deflate and stats queues nothing. Returns the discards.
    pub fn notify(&mut self, index: u32) -> Vec<Discard> {
        self.mem.discards();
        let needs_reset = self.t.status() & status::DEVICE_NEEDS_RESET != 0;
        w32(&mut self.t, reg::QUEUE_NOTIFY, index);
        let discards = self.mem.discards();
        let role = balloon_roles(self.features).get(index as usize).copied();
        for d in &discards {
            assert!(!d.hotplug, "the balloon discarded {d:x?} in the hot-pluggable region ({role:?} queue)");
            assert!(d.gpa + d.len <= BALLOON_RAM, "{d:x?}");
            assert!(!needs_reset, "a device that needs a reset discarded {d:x?}");
            match role {
                Some("inflate") => {
                    for pfn in d.gpa / 4096..(d.gpa + d.len) / 4096 {
                        assert!(
                            self.t.device().is_ballooned(pfn),
                            "inflate discarded PFN {pfn:#x}, not ballooned"
                        );
                    }
                }
                Some("report") => {}
                _ => panic!("queue {index} ({role:?}) discarded {d:x?}"),
            }
        }
        let s = self.t.device().stats();
        assert!(s.ballooned_pages <= BALLOON_RAM / 4096);
        discards
    }

    /// Runs a fuzz input: a header (features, queue sizes), then operations on descriptors, the
    /// avail rings, the scratch area and notifies; finally notifies every queue.
    pub fn run_fuzz(&mut self, data: &[u8]) {
        let mut b = Bytes::new(data);
        let h = b.u8();
        let features = [
            (0, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (1, VIRTIO_BALLOON_F_STATS_VQ),
            (2, VIRTIO_BALLOON_F_PAGE_REPORTING),
            (3, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        ]
        .iter()
        .filter(|(bit, _)| h & (1 << bit) != 0)
        .fold(0u64, |f, &(_, feature)| f | 1 << feature);
        let size = 1u16 << (b.u8() % 9);
        let sizes = [size, 1 << (b.u8() % 9)];
        self.start(features, &sizes);
        let queues = balloon_roles(features).len();
        let hot = self.hotplug_base();
        let mut ops = 0;
        while !b.is_empty() && ops < 256 {
            ops += 1;
            let q = b.u8() as usize % queues;
            match b.u8() % 8 {
                // A descriptor.
                0 | 1 => {
                    let i = b.u16();
                    let addr = fuzz_addr(&mut b, (B_DATA, B_DATA_LEN), BALLOON_RAM, hot);
                    let len = fuzz_len(&mut b);
                    let flags = b.u8() as u16 & 0x7;
                    let flags = if flags & 4 != 0 && !b.u8().is_multiple_of(4) { flags & 3 } else { flags };
                    let next = b.u16();
                    self.set_desc(q, i, addr, len, flags, next);
                }
                // A head in the avail ring (usually inside the table).
                2 => {
                    let head = b.u16();
                    let head = if b.u8().is_multiple_of(8) { head } else { head % self.sizes[q] };
                    self.push(q, head);
                }
                // Raw bytes in the scratch area.
                3 => {
                    let at = b.u16() as u64 % B_DATA_LEN;
                    let n = b.u8() as usize;
                    let bytes = b.take(n);
                    self.mem.write(B_DATA + at, &bytes);
                }
                // A PFN array in the scratch area: PFNs mostly in RAM, some runs, some beyond.
                4 | 5 => {
                    let at = (b.u16() as u64 % B_DATA_LEN) & !3;
                    let n = b.u8() as usize % 64;
                    let mut pfn = b.u32();
                    let mode = b.u8();
                    let mut pfns = Vec::with_capacity(n);
                    for _ in 0..n {
                        let v = match mode % 4 {
                            0 => pfn % 0x1000,
                            1 => pfn % 0x1400,
                            2 => pfn,
                            _ => (pfn % 0x1000) | 0x10_0000,
                        };
                        pfns.extend_from_slice(&v.to_le_bytes());
                        pfn = match b.u8() % 4 {
                            0 => b.u32(),
                            _ => pfn.wrapping_add(1),
                        };
                    }
                    self.mem.write(B_DATA + at, &pfns);
                }
                // A notify (sometimes of a queue that does not exist).
                6 => {
                    let index = if b.u8().is_multiple_of(8) { b.u32() } else { q as u32 };
                    self.notify(index);
                }
                // A hostile avail index.
                _ => {
                    let idx = b.u16();
                    self.mem.write(B_RINGS + 0x4000 * q as u64 + 0x1002, &idx.to_le_bytes());
                }
            }
        }
        for q in 0..4 {
            self.notify(q);
        }
    }
}

impl Default for BalloonRig {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-mem

/// Guest RAM of the virtio-mem rig.
pub const MEM_RAM: u64 = 16 << 20;
/// The device region (the hot-pluggable region): 16 blocks of 2 MiB.
pub const MEM_REGION_SIZE: u64 = 32 << 20;
/// The block size.
pub const MEM_BLOCK: u64 = 2 << 20;
const M_RING: u64 = 0x10000;
/// The virtio-mem rig's scratch area (requests and responses).
pub const M_DATA: u64 = 0x100000;
const M_DATA_LEN: u64 = 0x4000;

/// A virtio-mem device over the hot-pluggable region, behind its transport.
pub struct MemRig {
    /// The transport and the device.
    pub t: MmioTransport<VirtioMem>,
    /// Guest RAM and the recorder.
    pub mem: Memory,
    /// The region's start.
    pub region: u64,
    size: u16,
    avail: u16,
}

impl MemRig {
    /// RAM with a 32 MiB hot-pluggable region and a device over it (nothing requested).
    pub fn new() -> Self {
        let mem = Memory::new(MEM_RAM, MEM_REGION_SIZE);
        let (region, size) = mem.ram.hotplug().expect("hotplug region");
        let dev = VirtioMem::new(mem.mmu.clone(), VirtioMemConfig::new(region, size)).expect("virtio-mem");
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let t = MmioTransport::new(dev, mem.mmu.clone(), irq);
        Self { t, mem, region, size: 0, avail: 0 }
    }

    /// Unplugs everything (a VM reset), sets `requested` bytes, resets the driver side and sets
    /// up requestq with `size` entries, then DRIVER_OK.
    pub fn start(&mut self, requested: u64, size: u16) {
        assert!(self.t.device_mut().unplug_all());
        self.check(self.mem.discards());
        self.t.device_mut().set_requested_size(requested).expect("requested size");
        negotiate(&mut self.t, 0);
        self.size = size;
        self.avail = 0;
        self.mem.write(M_RING, &vec![0u8; 0x3000]);
        self.mem.write(M_DATA, &vec![0u8; M_DATA_LEN as usize]);
        setup_queue(&mut self.t, 0, size, M_RING);
        driver_ok(&mut self.t);
    }

    fn check(&self, discards: Vec<Discard>) -> Vec<Discard> {
        for d in &discards {
            assert!(d.hotplug, "virtio-mem discarded {d:x?} outside its region");
            assert!(
                d.gpa >= self.region && d.gpa + d.len <= self.region + MEM_REGION_SIZE,
                "virtio-mem discarded {d:x?} outside [{:#x}, +{MEM_REGION_SIZE:#x})",
                self.region
            );
            assert!(
                (d.gpa - self.region).is_multiple_of(MEM_BLOCK) && d.len % MEM_BLOCK == 0,
                "virtio-mem discarded {d:x?}, not whole blocks"
            );
        }
        discards
    }

    /// Descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(M_RING + 16 * (i % self.size) as u64, &raw);
    }

    /// Makes `head` available.
    pub fn push(&mut self, head: u16) {
        let slot = M_RING + 0x1000 + 4 + 2 * (self.avail % self.size) as u64;
        self.mem.write(slot, &head.to_le_bytes());
        self.avail = self.avail.wrapping_add(1);
        self.mem.write(M_RING + 0x1002, &self.avail.to_le_bytes());
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        let b = self.mem.read(M_RING + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Used element `i` as (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let b = self.mem.read(M_RING + 0x2004 + 8 * (i % self.size) as u64, 8);
        (u32::from_le_bytes(b[0..4].try_into().unwrap()), u32::from_le_bytes(b[4..8].try_into().unwrap()))
    }

    /// Notifies queue `index` and checks: every discard is whole blocks of the region, every
    /// new used element names a head inside the table with length 0 (no answer) or 10 (a
    /// response), plugged size within the region. Returns the discards.
    pub fn notify(&mut self, index: u32) -> Vec<Discard> {
        self.check(self.mem.discards());
        let before = self.used_idx();
        w32(&mut self.t, reg::QUEUE_NOTIFY, index);
        let discards = self.check(self.mem.discards());
        let after = self.used_idx();
        let new = after.wrapping_sub(before);
        assert!(new <= self.size, "{new} used entries on a queue of {}", self.size);
        for i in 0..new {
            let (id, len) = self.used_elem(before.wrapping_add(i));
            assert!(id < self.size as u32, "used id {id} outside the table of {}", self.size);
            assert!(len == 0 || len == 10, "used length {len}");
        }
        let s = self.t.device().stats();
        assert!(s.plugged_size <= MEM_REGION_SIZE && s.plugged_blocks * MEM_BLOCK == s.plugged_size);
        discards
    }

    /// Writes a `virtio_mem_req` at `gpa`.
    pub fn write_request(&self, gpa: u64, kind: u16, addr: u64, nb_blocks: u16) {
        let mut req = [0u8; 24];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.mem.write(gpa, &req);
    }

    /// Runs a fuzz input: a header (requested blocks, queue size), then operations on
    /// descriptors, requests, the avail ring and notifies; finally one notify.
    pub fn run_fuzz(&mut self, data: &[u8]) {
        let mut b = Bytes::new(data);
        let requested = (b.u8() as u64 % 17) * MEM_BLOCK;
        let size = 1u16 << (b.u8() % 8);
        self.start(requested, size);
        let hot = self.region;
        let mut ops = 0;
        while !b.is_empty() && ops < 256 {
            ops += 1;
            match b.u8() % 8 {
                0 | 1 => {
                    let i = b.u16();
                    let addr = fuzz_addr(&mut b, (M_DATA, M_DATA_LEN), MEM_RAM, hot);
                    let len = match b.u8() % 4 {
                        0 => 24,
                        1 => 10,
                        2 => 16,
                        _ => fuzz_len(&mut b),
                    };
                    let flags = b.u8() as u16 & 0x7;
                    let flags = if flags & 4 != 0 && !b.u8().is_multiple_of(4) { flags & 3 } else { flags };
                    let next = b.u16();
                    self.set_desc(i, addr, len, flags, next);
                }
                2 => {
                    let head = b.u16();
                    let head = if b.u8().is_multiple_of(8) { head } else { head % self.size };
                    self.push(head);
                }
                // A request: type mostly valid, range mostly block-aligned in the region.
                3 | 4 => {
                    let at = b.u16() as u64 % M_DATA_LEN;
                    let kind = match b.u8() % 8 {
                        7 => b.u16(),
                        k => k as u16 % 4,
                    };
                    let v = b.u16() as u64;
                    let addr = match b.u8() % 8 {
                        0..=4 => hot + (v % 20) * MEM_BLOCK,
                        5 => hot + v * 4096,
                        6 => v << 21,
                        _ => b.u64(),
                    };
                    let nb = match b.u8() % 4 {
                        0..=2 => b.u8() as u16 % 18,
                        _ => b.u16(),
                    };
                    self.write_request(M_DATA + at, kind, addr, nb);
                }
                5 => {
                    let at = b.u16() as u64 % M_DATA_LEN;
                    let n = b.u8() as usize % 32;
                    let bytes = b.take(n);
                    self.mem.write(M_DATA + at, &bytes);
                }
                6 => {
                    let index = if b.u8().is_multiple_of(8) { b.u32() } else { 0 };
                    self.notify(index);
                }
                _ => {
                    // The host changes requested_size (valid sizes only: what the API allows).
                    let blocks = b.u8() as u64 % 17;
                    self.t.update_config(|m| m.set_requested_size(blocks * MEM_BLOCK)).expect("valid size");
                }
            }
        }
        self.notify(0);
    }
}

impl Default for MemRig {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// A bare split virtqueue

/// Pops every chain of a queue laid out from fuzz bytes in 64 KiB of guest memory: the input
/// is the queue size (1 byte), the ring addresses' offsets, then memory contents. Checks that
/// popping never panics, stops, returns at most `size` descriptors per chain, and that
/// `add_used` of every returned head works.
pub fn run_virtqueue_fuzz(mem: &GuestMemoryMmap, data: &[u8]) {
    const LEN: u64 = 0x10000;
    let mut b = Bytes::new(data);
    let size = match b.u8() {
        s @ 0..=15 => s as u16,
        s => 1u16 << (s % 10),
    };
    let desc = (b.u16() as u64 % LEN) & !15;
    let avail = (b.u16() as u64 % LEN) & !1;
    let used = (b.u16() as u64 % LEN) & !3;
    let mut contents = vec![0u8; LEN as usize];
    let rest = &data[data.len().min(7)..];
    // The rest of the input is repeated over the descriptor table and the avail ring so that
    // short inputs shape both.
    for (i, byte) in rest.iter().enumerate() {
        contents[(desc as usize + i) % LEN as usize] = *byte;
        contents[(avail as usize + i) % LEN as usize] ^= *byte;
    }
    GuestMemoryAccess::write(mem, 0, &contents).expect("64 KiB of RAM");
    let mut q = Queue::new(size.max(1));
    q.size = size;
    q.desc_table = desc;
    q.avail_ring = avail;
    q.used_ring = used;
    if q.validate(mem).is_err() {
        return;
    }
    q.mark_ready();
    for _ in 0..=size as usize {
        match q.pop(mem) {
            Err(_) | Ok(None) => return,
            Ok(Some(Popped::Chain(chain))) => {
                assert!(chain.head < size);
                assert!(!chain.descriptors.is_empty() && chain.descriptors.len() <= size as usize);
                for d in &chain.descriptors {
                    assert!(d.addr.checked_add(d.len as u64).is_some());
                }
                let _ = q.add_used(mem, chain.head, 0);
            }
            Ok(Some(Popped::Bad { head, .. })) => {
                if let Some(h) = head {
                    assert!(h < size);
                    let _ = q.add_used(mem, h, 0);
                }
            }
        }
    }
    panic!("more than {size} chains popped from a queue of {size}");
}

/// 64 KiB of guest memory at 0 for [`run_virtqueue_fuzz`].
pub fn virtqueue_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).expect("guest memory")
}

/// The device trait in scope for callers that need `queue_max_sizes` etc.
pub fn queue_count<D: VirtioDevice>(t: &MmioTransport<D>) -> usize {
    t.device().queue_max_sizes().len()
}
