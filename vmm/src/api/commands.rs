//! The commands of zapvm's QMP: what each takes, what it returns, and the session state that
//! decides which may run (capabilities negotiation first, as the QMP specification requires).
//!
//! Where QEMU has a command for the same thing, zapvm uses QEMU's name, arguments and reply
//! shape, so that a QMP client written for QEMU drives a zapvm VM unchanged; zapvm's own
//! commands carry QMP's prefix for downstream extensions, [`DOWNSTREAM_PREFIX`]. The table
//! [`COMMANDS`] is the whole list (`query-commands` answers from it, and a test keeps it in step
//! with [`dispatch`]).
//!
//! Every request is checked whole against its command's arguments (unknown, missing and
//! wrong-typed arguments, out-of-range values) before the VM is called: a malformed request
//! gets an error reply and changes nothing.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::kvm_stats::{StatBase, StatDesc, StatKind, StatUnit};

use super::protocol::{clip, parse_request, reply_line, version, QmpError, Request};

/// QMP's prefix for the names of downstream (non-QEMU) commands and events: `__` + a reversed
/// domain name + `_`.
pub const DOWNSTREAM_PREFIX: &str = "__org.zapvm_";

/// The QOM path of the balloon device (QEMU's `-device virtio-balloon,id=balloon0`).
pub const BALLOON_QOM_PATH: &str = "/machine/peripheral/balloon0";
/// The id and QOM path of the virtio-mem device.
pub const VIRTIO_MEM_ID: &str = "vmem0";
/// See [`VIRTIO_MEM_ID`].
pub const VIRTIO_MEM_QOM_PATH: &str = "/machine/peripheral/vmem0";

/// The QOM path QMP names vCPU `index` by (QEMU's path for CPUs created without an id).
pub fn vcpu_qom_path(index: usize) -> String {
    format!("/machine/unattached/device[{index}]")
}

// ---------------------------------------------------------------------------------------------
// What the VM offers

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// They run.
    Running,
    /// `stop` parked them.
    Paused,
}

/// A memory device as `query-memory-devices` lists it (QEMU's `VirtioMEMDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtioMemInfo {
    /// The device's id.
    pub id: String,
    /// Guest-physical start of its region.
    pub memaddr: u64,
    /// Bytes the host asks the guest to plug.
    pub requested_size: u64,
    /// Bytes the guest has plugged.
    pub size: u64,
    /// Bytes of its region.
    pub max_size: u64,
    /// Plug granularity.
    pub block_size: u64,
    /// NUMA node.
    pub node: u64,
}

/// The KVM statistics of one stats fd: the VM's (`vcpu: None`) or a vCPU's.
#[derive(Debug, Clone)]
pub struct StatsGroup {
    /// Which vCPU, or `None` for the VM.
    pub vcpu: Option<usize>,
    /// Every statistic with its values (one, or a histogram's buckets).
    pub stats: Vec<(StatDesc, Vec<u64>)>,
}

/// What a running VM offers its control socket; the machine implements it.
///
/// The server calls these on the VMM's event-loop thread, one request at a time; a call that
/// blocks (`stop` waiting for vCPUs to park) delays the event loop meanwhile. Arguments arrive
/// checked against their commands; what a call still refuses (no such device, a size the
/// device does not take) is its error.
pub trait VmHandle: Send + Sync {
    /// Whether the vCPUs run.
    fn status(&self) -> RunStatus;
    /// Stops every vCPU (returns once they are parked).
    fn stop(&self) -> Result<(), QmpError>;
    /// Lets the vCPUs run again.
    fn cont(&self) -> Result<(), QmpError>;
    /// Ends the VM.
    fn quit(&self) -> Result<(), QmpError>;
    /// Bytes of RAM the guest was booted with (without hot-pluggable memory).
    fn base_memory(&self) -> u64;
    /// Sets the balloon's target, in 4 KiB pages taken from the guest (`DeviceNotActive`
    /// without a balloon).
    fn set_balloon_target(&self, pages: u32) -> Result<(), QmpError>;
    /// The balloon's actual size, in 4 KiB pages, as the guest reports it.
    fn balloon_actual(&self) -> Result<u32, QmpError>;
    /// The guest's latest balloon statistics (virtio tag name -> value) and when the device
    /// received them (Unix seconds, 0 if never).
    fn balloon_guest_stats(&self) -> Result<(Vec<(String, u64)>, u64), QmpError>;
    /// zapvm's view of the balloon: target, actual, counters, errors.
    fn balloon_details(&self) -> Result<Value, QmpError>;
    /// The memory devices (zapvm has at most one virtio-mem device).
    fn memory_devices(&self) -> Vec<VirtioMemInfo>;
    /// Sets the requested size of memory device `id`.
    fn set_requested_size(&self, id: &str, bytes: u64) -> Result<(), QmpError>;
    /// zapvm's view of virtio-mem: region, sizes, counters, errors.
    fn virtio_mem_details(&self) -> Result<Value, QmpError>;
    /// KVM's binary statistics: the VM's, then each vCPU's.
    fn kvm_stats(&self) -> Result<Vec<StatsGroup>, QmpError>;
    /// Every statistic of the memory layer and the devices, with KVM's: what `zapvm stats`
    /// prints.
    fn memory_layer(&self) -> Result<Value, QmpError>;
}

// ---------------------------------------------------------------------------------------------
// The command table

/// The type of an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON integer.
    Int,
    /// A JSON string.
    Str,
    /// An array of strings.
    StrList,
    /// An array of objects (checked by the command).
    ObjectList,
    /// Any JSON value (checked by the command).
    Any,
}

impl ArgType {
    fn name(self) -> &'static str {
        match self {
            ArgType::Int => "integer",
            ArgType::Str => "string",
            ArgType::StrList => "array of strings",
            ArgType::ObjectList => "array of objects",
            ArgType::Any => "any",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            ArgType::Int => value.is_i64() || value.is_u64(),
            ArgType::Str => value.is_string(),
            ArgType::StrList => value.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            ArgType::ObjectList => value.as_array().is_some_and(|a| a.iter().all(Value::is_object)),
            ArgType::Any => true,
        }
    }
}

/// One argument of a command.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: ArgType,
    /// Whether it must be given.
    pub required: bool,
}

const fn arg(name: &'static str, ty: ArgType) -> ArgSpec {
    ArgSpec { name, ty, required: true }
}

const fn optional(name: &'static str, ty: ArgType) -> ArgSpec {
    ArgSpec { name, ty, required: false }
}

/// One command.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    /// Its name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [ArgSpec],
    /// What it does.
    pub description: &'static str,
}

/// Every command zapvm answers (see the module docs).
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "qmp_capabilities",
        args: &[optional("enable", ArgType::StrList)],
        description: "end capabilities negotiation (zapvm offers no capability)",
    },
    CommandSpec { name: "query-version", args: &[], description: "zapvm's version" },
    CommandSpec { name: "query-commands", args: &[], description: "the commands" },
    CommandSpec { name: "query-status", args: &[], description: "whether the vCPUs run" },
    CommandSpec { name: "stop", args: &[], description: "stop every vCPU (returns once they are parked)" },
    CommandSpec { name: "cont", args: &[], description: "let the vCPUs run again" },
    CommandSpec { name: "quit", args: &[], description: "end the VM" },
    CommandSpec {
        name: "balloon",
        args: &[arg("value", ArgType::Int)],
        description: "set the guest's memory size through the balloon (bytes; the balloon takes the rest)",
    },
    CommandSpec {
        name: "query-balloon",
        args: &[],
        description: "the guest's memory size as the balloon leaves it",
    },
    CommandSpec {
        name: "query-memory-size-summary",
        args: &[],
        description: "base memory and plugged hot-pluggable memory",
    },
    CommandSpec { name: "query-memory-devices", args: &[], description: "the virtio-mem device" },
    CommandSpec {
        name: "qom-get",
        args: &[arg("path", ArgType::Str), arg("property", ArgType::Str)],
        description:
            "a device property: balloon0 guest-stats; vmem0 requested-size, size, max-size, block-size",
    },
    CommandSpec {
        name: "qom-set",
        args: &[arg("path", ArgType::Str), arg("property", ArgType::Str), arg("value", ArgType::Any)],
        description: "set vmem0 requested-size (bytes, whole blocks)",
    },
    CommandSpec {
        name: "query-stats",
        args: &[
            arg("target", ArgType::Str),
            optional("vcpus", ArgType::StrList),
            optional("providers", ArgType::ObjectList),
        ],
        description: "KVM's binary statistics of the VM or of its vCPUs",
    },
    CommandSpec {
        name: "query-stats-schemas",
        args: &[optional("provider", ArgType::Str)],
        description: "what each KVM statistic is: type, unit, scale",
    },
    CommandSpec {
        name: "__org.zapvm_query-memory-layer",
        args: &[],
        description: "the notifier's, the table's, external teardowns', the devices' and KVM's statistics",
    },
    CommandSpec {
        name: "__org.zapvm_query-balloon",
        args: &[],
        description: "the balloon's target, actual size, counters and errors",
    },
    CommandSpec {
        name: "__org.zapvm_query-virtio-mem",
        args: &[],
        description: "virtio-mem's region, sizes, counters and errors",
    },
];

/// The page size the balloon counts in.
const BALLOON_PAGE: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Sessions

/// Where a connection is in QMP's life cycle.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A connection that has just been greeted.
    pub fn new() -> Self {
        Session::default()
    }

    /// Whether `qmp_capabilities` succeeded (commands run and events are sent only then).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }
}

/// Answers one request line (raw bytes, with or without its `\n`) in `session`: the reply
/// line, without its `\n`.
///
/// A malformed request, or one out of turn, gets an error reply and never reaches `vm`. A
/// panic in `vm` becomes a `GenericError` reply.
pub fn handle_line(session: &mut Session, line: &[u8], vm: &dyn VmHandle) -> String {
    let request = match parse_request(line) {
        Ok(request) => request,
        Err((id, error)) => return reply_line(id.as_ref(), Err(error)),
    };
    let result = answer(session, &request, vm);
    reply_line(request.id.as_ref(), result)
}

fn answer(session: &mut Session, request: &Request, vm: &dyn VmHandle) -> Result<Value, QmpError> {
    let name = request.execute.as_str();
    let Some(spec) = COMMANDS.iter().find(|c| c.name == name) else {
        return Err(QmpError::command_not_found(format!("The command {} has not been found", clip(name))));
    };
    match (session.negotiated, name) {
        (false, "qmp_capabilities") => {}
        (false, _) => {
            return Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        }
        (true, "qmp_capabilities") => {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ))
        }
        (true, _) => {}
    }
    let args = check_arguments(spec, &request.arguments)?;
    if name == "qmp_capabilities" {
        if let Some(first) = args.strings("enable").first() {
            return Err(QmpError::generic(format!("Capability '{}' not available", clip(first))));
        }
        session.negotiated = true;
        return Ok(json!({}));
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(name, &args, vm))) {
        Ok(result) => result,
        Err(_) => {
            tracing::error!("the control socket's handler panicked on {name:?}");
            Err(QmpError::generic(format!("internal error handling {name:?}")))
        }
    }
}

/// Arguments checked against their command's [`CommandSpec`].
struct Args<'a>(&'a Map<String, Value>);

impl Args<'_> {
    fn int(&self, name: &str) -> Option<i128> {
        let v = self.0.get(name)?;
        v.as_u64().map(i128::from).or_else(|| v.as_i64().map(i128::from))
    }
    fn str(&self, name: &str) -> &str {
        self.0.get(name).and_then(Value::as_str).unwrap_or_default()
    }
    fn strings(&self, name: &str) -> Vec<&str> {
        self.0
            .get(name)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
    fn value(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }
}

fn check_arguments<'a>(spec: &CommandSpec, arguments: &'a Map<String, Value>) -> Result<Args<'a>, QmpError> {
    if let Some(name) = arguments.keys().find(|k| !spec.args.iter().any(|a| a.name == k.as_str())) {
        return Err(QmpError::generic(format!("Parameter '{}' is unexpected", clip(name))));
    }
    for a in spec.args {
        match arguments.get(a.name) {
            None if a.required => {
                return Err(QmpError::generic(format!("Parameter '{}' is missing", a.name)))
            }
            None => {}
            Some(value) if !a.ty.accepts(value) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{}', expected: {}",
                    a.name,
                    a.ty.name()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(Args(arguments))
}

/// Runs a negotiated, checked command.
fn dispatch(name: &str, args: &Args, vm: &dyn VmHandle) -> Result<Value, QmpError> {
    let done = |()| json!({});
    match name {
        "query-version" => {
            let (major, minor, micro) = version();
            Ok(json!({
                "qemu": { "major": major, "minor": minor, "micro": micro },
                "package": concat!("zapvm ", env!("CARGO_PKG_VERSION")),
            }))
        }
        "query-commands" => Ok(COMMANDS.iter().map(|c| json!({ "name": c.name })).collect()),
        "query-status" => Ok(match vm.status() {
            RunStatus::Running => json!({ "running": true, "status": "running" }),
            RunStatus::Paused => json!({ "running": false, "status": "paused" }),
        }),
        "stop" => vm.stop().map(done),
        "cont" => vm.cont().map(done),
        "quit" => vm.quit().map(done),
        "balloon" => balloon(args, vm).map(done),
        "query-balloon" => {
            let actual = u64::from(vm.balloon_actual()?) * BALLOON_PAGE;
            Ok(json!({ "actual": vm.base_memory().saturating_sub(actual) }))
        }
        "query-memory-size-summary" => {
            let plugged: u64 = vm.memory_devices().iter().map(|d| d.size).sum();
            Ok(json!({ "base-memory": vm.base_memory(), "plugged-memory": plugged }))
        }
        "query-memory-devices" => {
            Ok(vm.memory_devices().into_iter().map(|d| json!({ "type": "virtio-mem", "data": d })).collect())
        }
        "qom-get" => qom_get(args.str("path"), args.str("property"), vm),
        "qom-set" => qom_set(args.str("path"), args.str("property"), args.value("value"), vm).map(done),
        "query-stats" => query_stats(args, vm),
        "query-stats-schemas" => query_stats_schemas(args, vm),
        "__org.zapvm_query-memory-layer" => vm.memory_layer(),
        "__org.zapvm_query-balloon" => vm.balloon_details(),
        "__org.zapvm_query-virtio-mem" => vm.virtio_mem_details(),
        _ => Err(QmpError::command_not_found(format!("The command {} has not been found", clip(name)))),
    }
}

/// `balloon`: `value` is the memory the guest should keep, in bytes (QEMU's meaning); the
/// balloon's target is the rest of base memory, in whole pages. More than base memory is base
/// memory (an empty balloon), as QEMU clamps it.
fn balloon(args: &Args, vm: &dyn VmHandle) -> Result<(), QmpError> {
    let value = args.int("value").unwrap_or(0);
    if value <= 0 {
        return Err(QmpError::generic("Parameter 'value' expects a size"));
    }
    let base = vm.base_memory();
    let keep = u64::try_from(value).unwrap_or(u64::MAX).min(base);
    let pages = (base - keep).div_ceil(BALLOON_PAGE);
    let pages = u32::try_from(pages)
        .map_err(|_| QmpError::generic("Parameter 'value' is too small for the balloon"))?;
    vm.set_balloon_target(pages)
}

/// The device a QOM path names: the full path or its last component (as QEMU resolves a
/// partial path that is unambiguous).
fn qom_device(path: &str) -> Option<&'static str> {
    match path {
        BALLOON_QOM_PATH | "balloon0" => Some("balloon0"),
        VIRTIO_MEM_QOM_PATH | VIRTIO_MEM_ID => Some(VIRTIO_MEM_ID),
        _ => None,
    }
}

fn device_not_found(path: &str) -> QmpError {
    QmpError::device_not_found(format!("Device '{}' not found", clip(path)))
}

fn property_not_found(device: &str, property: &str) -> QmpError {
    QmpError::generic(format!("Property '{device}.{}' not found", clip(property)))
}

fn virtio_mem(vm: &dyn VmHandle, path: &str) -> Result<VirtioMemInfo, QmpError> {
    vm.memory_devices().into_iter().find(|d| d.id == VIRTIO_MEM_ID).ok_or_else(|| device_not_found(path))
}

fn qom_get(path: &str, property: &str, vm: &dyn VmHandle) -> Result<Value, QmpError> {
    match qom_device(path) {
        Some("balloon0") => match property {
            "guest-stats" => {
                let (stats, last_update) = vm.balloon_guest_stats()?;
                Ok(json!({ "stats": guest_stats(&stats), "last-update": last_update }))
            }
            _ => Err(property_not_found("virtio-balloon", property)),
        },
        Some(_) => {
            let d = virtio_mem(vm, path)?;
            match property {
                "requested-size" => Ok(json!(d.requested_size)),
                "size" => Ok(json!(d.size)),
                "max-size" => Ok(json!(d.max_size)),
                "block-size" => Ok(json!(d.block_size)),
                _ => Err(property_not_found("virtio-mem", property)),
            }
        }
        None => Err(device_not_found(path)),
    }
}

/// QEMU's names of the virtio-balloon statistics (`stat-free-memory`, ...), every one present
/// (-1 where the guest did not report it), from the virtio tag names the device keeps.
fn guest_stats(stats: &[(String, u64)]) -> Value {
    const NAMES: &[(&str, &str)] = &[
        ("swap_in", "stat-swap-in"),
        ("swap_out", "stat-swap-out"),
        ("major_faults", "stat-major-faults"),
        ("minor_faults", "stat-minor-faults"),
        ("free_memory", "stat-free-memory"),
        ("total_memory", "stat-total-memory"),
        ("available_memory", "stat-available-memory"),
        ("disk_caches", "stat-disk-caches"),
        ("hugetlb_allocations", "stat-htlb-pgalloc"),
        ("hugetlb_failures", "stat-htlb-pgfail"),
    ];
    let mut out = Map::new();
    for (tag, qmp) in NAMES {
        let value = stats.iter().find(|(name, _)| name == tag).map_or(-1i128, |(_, v)| i128::from(*v));
        out.insert((*qmp).into(), json!(value));
    }
    Value::Object(out)
}

fn qom_set(path: &str, property: &str, value: Option<&Value>, vm: &dyn VmHandle) -> Result<(), QmpError> {
    match qom_device(path) {
        Some(VIRTIO_MEM_ID) if property == "requested-size" => {
            let bytes = value.and_then(Value::as_u64).ok_or_else(|| {
                QmpError::generic(
                    "Invalid parameter type for 'value', expected: size (a non-negative integer)",
                )
            })?;
            virtio_mem(vm, path)?;
            vm.set_requested_size(VIRTIO_MEM_ID, bytes)
        }
        Some(VIRTIO_MEM_ID) => Err(property_not_found("virtio-mem", property)),
        Some(_) => Err(property_not_found("virtio-balloon", property)),
        None => Err(device_not_found(path)),
    }
}

fn stat_type(kind: StatKind) -> &'static str {
    match kind {
        StatKind::Cumulative => "cumulative",
        StatKind::Instant | StatKind::Unknown(_) => "instant",
        StatKind::Peak => "peak",
        StatKind::LinearHist => "linear-histogram",
        StatKind::LogHist => "log2-histogram",
    }
}

/// `query-stats`: QEMU's arguments (`target` "vm" or "vcpu"; `vcpus`, QOM paths; `providers`,
/// `[{"provider": "kvm", "names": [...]}]`) and reply (`[{"provider", "qom-path" (vCPUs),
/// "stats": [{"name", "value"}]}]`; a histogram's value is its buckets, a boolean stat's a
/// boolean).
fn query_stats(args: &Args, vm: &dyn VmHandle) -> Result<Value, QmpError> {
    let target = args.str("target");
    let want_vcpus = match target {
        "vm" => false,
        "vcpu" => true,
        "cryptodev" => return Ok(json!([])),
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'target' does not accept value '{}'",
                clip(other)
            )))
        }
    };
    if !want_vcpus && args.value("vcpus").is_some() {
        return Err(QmpError::generic("Parameter 'vcpus' is only allowed with target 'vcpu'"));
    }
    // The names asked of provider "kvm": None = all of them; other providers have none.
    let mut names: Option<Vec<String>> = None;
    if let Some(Value::Array(providers)) = args.value("providers") {
        // None: "kvm" not asked; Some(None): all its stats; Some(Some(list)): those named.
        let mut kvm: Option<Option<Vec<String>>> = None;
        for p in providers {
            let Some(provider) = p.get("provider").and_then(Value::as_str) else {
                return Err(QmpError::generic("Parameter 'providers[].provider' is missing"));
            };
            if let Some(k) = p.as_object().and_then(|o| o.keys().find(|k| *k != "provider" && *k != "names"))
            {
                return Err(QmpError::generic(format!("Parameter 'providers[].{}' is unexpected", clip(k))));
            }
            if !["kvm", "cryptodev"].contains(&provider) {
                return Err(QmpError::generic(format!(
                    "Parameter 'provider' does not accept value '{}'",
                    clip(provider)
                )));
            }
            let listed = match p.get("names") {
                None => None,
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                    Some(a.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>())
                }
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'names', expected: array of strings",
                    ))
                }
            };
            if provider == "kvm" {
                kvm = Some(match (kvm, listed) {
                    (Some(None), _) | (_, None) => None,
                    (Some(Some(mut all)), Some(list)) => {
                        all.extend(list);
                        Some(all)
                    }
                    (None, Some(list)) => Some(list),
                });
            }
        }
        match kvm {
            None => return Ok(json!([])),
            Some(asked) => names = asked,
        }
    }
    let vcpus: Option<Vec<&str>> = args.value("vcpus").map(|_| args.strings("vcpus"));
    let mut out = Vec::new();
    for group in vm.kvm_stats()? {
        let qom_path = group.vcpu.map(vcpu_qom_path);
        if group.vcpu.is_some() != want_vcpus {
            continue;
        }
        if let (Some(list), Some(path)) = (&vcpus, &qom_path) {
            if !list.contains(&path.as_str()) {
                continue;
            }
        }
        let stats: Vec<Value> = group
            .stats
            .iter()
            .filter(|(desc, _)| names.as_ref().is_none_or(|n| n.contains(&desc.name)))
            .map(|(desc, values)| {
                let value = if desc.kind.is_histogram() {
                    json!(values)
                } else if desc.unit == StatUnit::Boolean {
                    json!(values.first().copied().unwrap_or(0) != 0)
                } else {
                    json!(values.first().copied().unwrap_or(0))
                };
                json!({ "name": desc.name, "value": value })
            })
            .collect();
        let mut result = Map::new();
        result.insert("provider".into(), json!("kvm"));
        if let Some(path) = qom_path {
            result.insert("qom-path".into(), json!(path));
        }
        result.insert("stats".into(), Value::Array(stats));
        out.push(Value::Object(result));
    }
    Ok(Value::Array(out))
}

/// `query-stats-schemas`: per target, each statistic's `name`, `type`, `unit` (absent for a
/// plain count), `base` and `exponent` (its values times base^exponent are in `unit`) and, for
/// a linear histogram, `bucket-size`.
fn query_stats_schemas(args: &Args, vm: &dyn VmHandle) -> Result<Value, QmpError> {
    match args.value("provider").and_then(Value::as_str) {
        None | Some("kvm") => {}
        Some("cryptodev") => return Ok(json!([])),
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'provider' does not accept value '{}'",
                clip(other)
            )))
        }
    }
    let groups = vm.kvm_stats()?;
    let mut out = Vec::new();
    for (target, group) in
        [("vm", groups.iter().find(|g| g.vcpu.is_none())), ("vcpu", groups.iter().find(|g| g.vcpu.is_some()))]
    {
        let Some(group) = group else { continue };
        let stats: Vec<Value> = group
            .stats
            .iter()
            .map(|(desc, _)| {
                let mut s = Map::new();
                s.insert("name".into(), json!(desc.name));
                s.insert("type".into(), json!(stat_type(desc.kind)));
                let unit = match desc.unit {
                    StatUnit::Bytes => Some("bytes"),
                    StatUnit::Seconds => Some("seconds"),
                    StatUnit::Cycles => Some("cycles"),
                    StatUnit::Boolean => Some("boolean"),
                    StatUnit::None | StatUnit::Unknown(_) => None,
                };
                if let Some(unit) = unit {
                    s.insert("unit".into(), json!(unit));
                }
                let base = match desc.base {
                    StatBase::Pow2 => 2,
                    StatBase::Pow10 | StatBase::Unknown(_) => 10,
                };
                s.insert("base".into(), json!(base));
                s.insert("exponent".into(), json!(desc.exponent));
                if desc.kind == StatKind::LinearHist {
                    s.insert("bucket-size".into(), json!(desc.bucket_size));
                }
                Value::Object(s)
            })
            .collect();
        out.push(json!({ "provider": "kvm", "target": target, "stats": stats }));
    }
    Ok(Value::Array(out))
}
