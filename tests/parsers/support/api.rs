//! The control socket's QMP parser: a fake VM, an independent oracle of the protocol, and
//! [`check_api_line`].

use super::*;

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
