//! A [`StatsSample`] in the Prometheus text exposition format (version 0.0.4), encoded by the
//! `prometheus-client` crate.
//!
//! Every series carries the label `vm` (the VM's id: [`super::MetricsConfig::vm_id`]); names
//! have the prefix `zapvm_`, counters the suffix `_total`, and values are in base units (bytes,
//! seconds).
//!
//! - KVM's binary statistics, by the kind the kernel gives each: cumulative → counter, instant
//!   and peak → gauge, linear and logarithmic histograms → histogram. The VM's stats fd gives
//!   `zapvm_kvm_vm_<name>`, each vCPU's `zapvm_kvm_vcpu_<name>` with the label `vcpu`. A value is
//!   scaled by the stat's base and exponent into its unit; a stat in seconds loses a time suffix
//!   of its kernel name (`_ns`, `_us`, ...) and gets `_seconds`, one in bytes gets `_bytes`, one
//!   in cycles `_cycles`. A histogram's buckets are the kernel's: bucket *i* of a linear one holds
//!   the values in [*i*·w, (*i*+1)·w), of a logarithmic one [2^(*i*-1), 2^*i*) (bucket 0: the
//!   value 0), the last one everything above; the values are integers in the stat's unit, so the
//!   inclusive bound `le` is the exclusive one less one unit. KVM keeps no sum of the values:
//!   `_sum` is `NaN`.
//! - The notifier, per teardown kind and origin (labels `kind`, `origin`):
//!   `zapvm_notifier_{starts,ends,refusals,retries,panics}_total`,
//!   `zapvm_notifier_bytes_total`; per subscriber (labels `subscriber`, `id`):
//!   `zapvm_notifier_subscriber_{starts,invalidates,ends,refusals,joined,read_retries}_total`.
//! - The userfaultfd monitor: `zapvm_monitor_<counter>_total`, `zapvm_monitor_max_batch_events`,
//!   `zapvm_monitor_failed` (1 once it stopped intercepting).
//! - The second-level table: `zapvm_table_{hits,misses,retries,faults}_total`,
//!   `zapvm_table_installs_total{page_size}` (bytes), `zapvm_table_entries`,
//!   `zapvm_table_torn_down_total{kind}`.
//! - External teardowns: `zapvm_external_teardown_{events,protect_faults,protections,restores,
//!   outside_guest_ram}_total`, `zapvm_external_teardown_rebacked_bytes_total`,
//!   `zapvm_external_teardown_fatal`.
//! - The devices: `zapvm_balloon_*` and `zapvm_virtio_mem_*` (every counter and level of their
//!   statistics; guest errors as `..._errors_total{error}`, the balloon's guest statistics as
//!   `zapvm_balloon_guest_stat{tag}`), their transports as `zapvm_virtio_transport_*{device}`.
//! - The VM: `zapvm_uptime_seconds`, `zapvm_paused`, `zapvm_rendezvous_discards_total`,
//!   `zapvm_pvm_quirks_total{quirk}`.

use std::collections::HashMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value as Json;

use super::StatsSample;
use crate::kvm_stats::{Snapshot, StatBase, StatDesc, StatKind, StatUnit};

/// The text exposition of `sample`, every series labelled `vm="<vm_id>"`.
pub fn encode(sample: &StatsSample, vm_id: &str) -> String {
    let mut registry = Registry::with_prefix("zapvm");
    registry.register_collector(Box::new(Families::of(sample, vm_id)));
    let mut text = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug of the families' names.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::error!("metrics encoding failed: {e}");
    }
    text
}

/// One series' value.
#[derive(Debug, Clone)]
enum Value {
    Int(u64),
    Float(f64),
    /// Per-bucket (not cumulative) counts by inclusive upper bound, the last one +Inf.
    Histogram {
        buckets: Vec<(f64, u64)>,
        count: u64,
    },
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// Every family of one sample, in the order first added (the encoder writes a family's series
/// together, under one descriptor).
#[derive(Debug, Default)]
struct Families {
    vm: String,
    list: Vec<Family>,
    index: HashMap<String, usize>,
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in self.list.iter().filter(|f| !f.series.is_empty()) {
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for (labels, value) in &f.series {
                let mut series = metric.encode_family(labels)?;
                match (f.kind, value) {
                    (MetricType::Counter, Value::Int(v)) => {
                        series.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (MetricType::Counter, Value::Float(v)) => {
                        series.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (_, Value::Int(v)) => series.encode_gauge(v)?,
                    (_, Value::Float(v)) => series.encode_gauge(v)?,
                    (_, Value::Histogram { buckets, count }) => {
                        series.encode_histogram::<NoLabelSet>(f64::NAN, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// A metric name part: `[a-zA-Z0-9_]` kept, anything else `_`.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

impl Families {
    fn of(s: &StatsSample, vm: &str) -> Self {
        let mut f = Families { vm: vm.to_string(), ..Default::default() };
        f.gauge("uptime_seconds", "Time since the VM was built.", &[], Value::Float(s.uptime.as_secs_f64()));
        f.gauge("paused", "1 while the vCPUs are paused.", &[], Value::Int(s.paused.into()));
        if let Some(kvm) = &s.kvm {
            f.kvm("vm", &kvm.vm, None);
            for (i, snap) in kvm.vcpus.iter().enumerate() {
                f.kvm("vcpu", snap, Some(i));
            }
        }
        f.notifier(&s.notifier);
        f.table(&s.table);
        let t = &s.external_teardowns;
        for (name, v, help) in [
            ("events", t.events, "External unmaps and remaps of guest RAM seen."),
            ("protect_faults", t.protect_faults, "vCPU faults on guest RAM the VMM write-protected."),
            ("protections", t.protections, "Write protections of guest RAM by the VMM."),
            ("restores", t.restores, "Restores of write access after a protection."),
            ("outside_guest_ram", t.outside_guest_ram, "External unmaps and remaps outside guest RAM."),
        ] {
            f.counter(&format!("external_teardown_{name}"), help, &[], Value::Int(v));
        }
        f.counter(
            "external_teardown_rebacked_bytes",
            "Bytes of guest RAM re-backed after external teardowns.",
            &[],
            Value::Int(t.rebacked_bytes),
        );
        f.gauge(
            "external_teardown_fatal",
            "1 once an external teardown made the VM stop.",
            &[],
            Value::Int(t.fatal.is_some().into()),
        );
        f.counter(
            "rendezvous_discards",
            "Discards the test guest's rendezvous made.",
            &[],
            Value::Int(s.discards as u64),
        );
        if let Some(b) = &s.balloon {
            f.device("balloon", "The virtio-balloon", b, BALLOON_LEVELS);
        }
        if let Some(m) = &s.virtio_mem {
            f.device("virtio_mem", "The virtio-mem device", m, VIRTIO_MEM_LEVELS);
        }
        for (device, t) in [("balloon", &s.balloon_transport), ("virtio-mem", &s.virtio_mem_transport)] {
            if let Some(t) = t {
                f.transport(device, t);
            }
        }
        if let Some(q) = &s.pvm_quirks {
            for (quirk, n) in crate::pvm::quirk_table(q) {
                f.counter(
                    "pvm_quirks",
                    "Instructions completed for a PVM host's emulator.",
                    &[("quirk", quirk)],
                    Value::Int(n),
                );
            }
        }
        f
    }

    fn add(&mut self, name: &str, help: &str, kind: MetricType, labels: &[(&str, &str)], value: Value) {
        let name = sanitize(name);
        let i = match self.index.get(&name) {
            Some(&i) => i,
            None => {
                self.list.push(Family { name: name.clone(), help: help.to_string(), kind, series: vec![] });
                self.index.insert(name, self.list.len() - 1);
                self.list.len() - 1
            }
        };
        let mut l: Labels = vec![("vm".into(), self.vm.clone())];
        l.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.list[i].series.push((l, value));
    }

    /// A counter family `name` (written `zapvm_<name>_total`).
    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: Value) {
        self.add(name, help, MetricType::Counter, labels, value);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: Value) {
        self.add(name, help, MetricType::Gauge, labels, value);
    }

    /// Every stat of one stats fd (see the module docs).
    fn kvm(&mut self, scope: &str, snap: &Snapshot, vcpu: Option<usize>) {
        let index = vcpu.map(|i| i.to_string());
        let labels: Vec<(&str, &str)> = index.iter().map(|i| ("vcpu", i.as_str())).collect();
        for (d, values) in snap.iter() {
            let (name, scale) = kvm_name(d);
            let name = format!("kvm_{scope}_{name}");
            let help = format!("KVM {scope} statistic {} ({}).", d.name, d.kind);
            let scaled =
                |v: u64| if scale.is_one() { Value::Int(v) } else { Value::Float(scale.apply(v as f64)) };
            let first = values.first().copied().unwrap_or(0);
            match d.kind {
                StatKind::Cumulative => self.add(&name, &help, MetricType::Counter, &labels, scaled(first)),
                StatKind::LinearHist | StatKind::LogHist => {
                    let value = kvm_histogram(d, values, scale);
                    self.add(&name, &help, MetricType::Histogram, &labels, value);
                }
                StatKind::Instant | StatKind::Peak | StatKind::Unknown(_) => {
                    self.add(&name, &help, MetricType::Gauge, &labels, scaled(first))
                }
            }
        }
    }

    fn notifier(&mut self, n: &notifier::Stats) {
        for k in &n.kinds {
            let labels = [("kind", k.kind), ("origin", k.origin)];
            for (name, v, help) in [
                ("starts", k.starts, "Teardowns begun (refused ones included)."),
                ("ends", k.ends, "Teardowns ended (refused ones included)."),
                ("refusals", k.refusals, "Teardowns refused by a subscriber."),
                ("retries", k.retries, "Operations retried after a refusal."),
                ("bytes", k.bytes, "Bytes of completed teardowns (notified ranges, after THP widening)."),
                ("panics", k.panics, "Subscriber callbacks that panicked."),
            ] {
                self.counter(&format!("notifier_{name}"), help, &labels, Value::Int(v));
            }
        }
        for s in &n.subscribers {
            let id = s.id.to_string();
            let labels = [("subscriber", s.name.as_str()), ("id", id.as_str())];
            for (name, v, help) in [
                ("starts", s.starts, "invalidate_range_start calls the subscriber accepted."),
                ("invalidates", s.invalidates, "invalidate_range calls."),
                ("ends", s.ends, "invalidate_range_end calls."),
                ("refusals", s.refusals, "invalidate_range_start calls the subscriber refused."),
                ("joined", s.joined, "Teardowns the subscriber joined while in progress."),
                ("read_retries", s.read_retries, "Sequence-retry reads that started over."),
            ] {
                self.counter(&format!("notifier_subscriber_{name}"), help, &labels, Value::Int(v));
            }
        }
        if let Some(m) = &n.monitor {
            self.gauge(
                "monitor_max_batch_events",
                "Most events one userfaultfd read returned.",
                &[],
                Value::Int(m.max_batch),
            );
            self.gauge(
                "monitor_failed",
                "1 once the userfaultfd monitor stopped intercepting.",
                &[],
                Value::Int(m.failed.is_some().into()),
            );
            let mut json = serde_json::to_value(m).unwrap_or_default();
            if let Json::Object(members) = &mut json {
                members.remove("max_batch"); // exported above, as a gauge in events
            }
            self.object("monitor", "The userfaultfd monitor", &json, &[]);
        }
    }

    fn table(&mut self, t: &crate::mmu::MmuStats) {
        for (name, v, help) in [
            ("hits", t.hits, "Accesses whose translation was installed."),
            ("misses", t.misses, "Accesses that had to install a translation."),
            ("retries", t.retries, "Installs started over because an invalidation overlapped them."),
            ("faults", t.faults, "Accesses that failed (host mapping gone)."),
        ] {
            self.counter(&format!("table_{name}"), help, &[], Value::Int(v));
        }
        for (size, v) in [("4096", t.installs_4k), ("2097152", t.installs_2m)] {
            self.counter(
                "table_installs",
                "Entries installed, by page size in bytes.",
                &[("page_size", size)],
                Value::Int(v),
            );
        }
        self.gauge("table_entries", "Entries currently installed.", &[], Value::Int(t.entries));
        for (kind, v) in &t.torn_down {
            self.counter(
                "table_torn_down",
                "Entries torn down, by teardown kind.",
                &[("kind", kind)],
                Value::Int(*v),
            );
        }
    }

    /// A device's statistics: its numeric members are counters but those in `levels` (gauges);
    /// `errors` (an object of counters) becomes `<prefix>_errors_total{error}`, the balloon's
    /// `guest_stats` (tag → value) `<prefix>_guest_stat{tag}`; members ending in `_size` are
    /// levels in bytes.
    fn device(&mut self, prefix: &str, what: &str, stats: &impl serde::Serialize, levels: &[&str]) {
        self.object(prefix, what, &serde_json::to_value(stats).unwrap_or_default(), levels);
    }

    fn object(&mut self, prefix: &str, what: &str, json: &Json, levels: &[&str]) {
        let Json::Object(members) = json else { return };
        for (key, v) in members {
            let help = format!("{what}: {}.", key.replace('_', " "));
            match (key.as_str(), v) {
                (_, Json::Bool(b)) => {
                    self.gauge(&format!("{prefix}_{key}"), &help, &[], Value::Int((*b).into()))
                }
                (_, Json::Number(n)) => {
                    let v = Value::Int(n.as_u64().unwrap_or_default());
                    if let Some(stem) = key.strip_suffix("_size") {
                        self.gauge(&format!("{prefix}_{stem}_size_bytes"), &help, &[], v);
                    } else if levels.contains(&key.as_str()) {
                        self.gauge(&format!("{prefix}_{key}"), &help, &[], v);
                    } else {
                        // `bytes_discarded` → `discarded_bytes`: the unit goes last.
                        let name = match key.strip_prefix("bytes_") {
                            Some(rest) => format!("{rest}_bytes"),
                            None => key.clone(),
                        };
                        self.counter(&format!("{prefix}_{name}"), &help, &[], v);
                    }
                }
                ("errors", Json::Object(errors)) => {
                    for (error, n) in errors {
                        if let Some(n) = n.as_u64() {
                            let help = format!("{what}: guest errors, by error.");
                            self.counter(
                                &format!("{prefix}_errors"),
                                &help,
                                &[("error", error)],
                                Value::Int(n),
                            );
                        }
                    }
                }
                ("guest_stats", Json::Object(tags)) => {
                    for (tag, n) in tags {
                        if let Some(n) = n.as_u64() {
                            let help = format!("{what}: the guest's latest statistics, by tag.");
                            self.gauge(
                                &format!("{prefix}_guest_stat"),
                                &help,
                                &[("tag", tag)],
                                Value::Int(n),
                            );
                        }
                    }
                }
                _ => {} // strings, nulls (addresses, reasons): not numbers
            }
        }
    }

    fn transport(&mut self, device: &str, t: &crate::devices::virtio::mmio::TransportStats) {
        let Json::Object(members) = serde_json::to_value(t).unwrap_or_default() else { return };
        for (key, v) in members {
            let Some(n) = v.as_u64() else { continue };
            let help = format!("The virtio-mmio transport: {}.", key.replace('_', " "));
            let name = format!("virtio_transport_{key}");
            if TRANSPORT_LEVELS.contains(&key.as_str()) {
                self.gauge(&name, &help, &[("device", device)], Value::Int(n));
            } else {
                self.counter(&name, &help, &[("device", device)], Value::Int(n));
            }
        }
    }
}

/// The balloon's members that are levels, not counters.
const BALLOON_LEVELS: &[&str] = &[
    "target_pages",
    "actual_pages",
    "ballooned_pages",
    "huge_blocks_full",
    "huge_blocks_partial",
    "held_pages",
];
/// virtio-mem's members that are levels (besides its `_size`s; `addr`: the region's guest-physical
/// address).
const VIRTIO_MEM_LEVELS: &[&str] = &["plugged_blocks", "addr"];
/// The transports' members that are levels.
const TRANSPORT_LEVELS: &[&str] = &["ioeventfd_queues", "ioeventfd_refused"];

/// Time suffixes of KVM stat names, dropped for `_seconds`.
const TIME_SUFFIXES: &[&str] = &["_ns", "_nsec", "_us", "_usec", "_ms", "_msec", "_s", "_sec", "_seconds"];

/// The Prometheus name of a KVM stat (without scope and prefix) and the factor that brings its
/// values into the unit's base (see the module docs).
fn kvm_name(d: &StatDesc) -> (String, Scale) {
    let base = sanitize(&d.name);
    let radix = match d.base {
        StatBase::Pow10 => 10f64,
        StatBase::Pow2 => 2f64,
        StatBase::Unknown(_) => 1.0,
    };
    let factor = Scale { radix, exponent: d.exponent };
    let with = |suffix: &str, name: &str| {
        if name.ends_with(suffix) {
            name.to_string()
        } else {
            format!("{name}{suffix}")
        }
    };
    match d.unit {
        StatUnit::Seconds => {
            let stem = TIME_SUFFIXES.iter().find_map(|s| base.strip_suffix(s)).unwrap_or(&base);
            (format!("{stem}_seconds"), factor)
        }
        StatUnit::Bytes => (with("_bytes", &base), factor),
        StatUnit::Cycles => (with("_cycles", &base), factor),
        StatUnit::None | StatUnit::Boolean => (base, factor),
        StatUnit::Unknown(_) => (base, Scale::ONE),
    }
}

/// Multiplication by `radix`^`exponent`, done as a division for negative exponents so that
/// e.g. 3 ns is exactly the double nearest 3e-9 s (3 × 1e-9 is not).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scale {
    radix: f64,
    exponent: i16,
}

impl Scale {
    const ONE: Scale = Scale { radix: 1.0, exponent: 0 };

    fn is_one(self) -> bool {
        self.exponent == 0 || self.radix == 1.0
    }

    fn apply(self, v: f64) -> f64 {
        if self.exponent < 0 {
            v / self.radix.powi(-i32::from(self.exponent))
        } else {
            v * self.radix.powi(self.exponent.into())
        }
    }
}

/// A KVM histogram's buckets with their inclusive upper bounds, scaled (see the module docs).
fn kvm_histogram(d: &StatDesc, values: &[u64], scale: Scale) -> Value {
    let last = values.len().saturating_sub(1);
    let buckets = values
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let bound = if i == last {
                f64::INFINITY
            } else {
                // The exclusive upper bound of bucket i, in the stat's integer unit.
                let exclusive = match d.kind {
                    StatKind::LinearHist => u64::from(d.bucket_size).saturating_mul(i as u64 + 1),
                    _ => 1u64.checked_shl(i as u32).unwrap_or(u64::MAX),
                };
                scale.apply(exclusive.saturating_sub(1) as f64)
            };
            (bound, n)
        })
        .collect();
    Value::Histogram { buckets, count: values.iter().fold(0u64, |a, &b| a.saturating_add(b)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(
        name: &str,
        kind: StatKind,
        unit: StatUnit,
        exponent: i16,
        size: usize,
        bucket_size: u32,
    ) -> StatDesc {
        StatDesc {
            name: name.into(),
            kind,
            unit,
            base: StatBase::Pow10,
            exponent,
            size,
            offset: 0,
            bucket_size,
            flags: 0,
        }
    }

    #[test]
    fn kvm_names_carry_base_units() {
        let d = desc("halt_poll_success_ns", StatKind::Cumulative, StatUnit::Seconds, -9, 1, 0);
        let (name, scale) = kvm_name(&d);
        assert_eq!(name, "halt_poll_success_seconds");
        assert_eq!(scale.apply(3.0), 3e-9, "exactly the double nearest 3e-9");
        let d = desc("pages_4k", StatKind::Instant, StatUnit::None, 0, 1, 0);
        let (name, scale) = kvm_name(&d);
        assert_eq!((name.as_str(), scale.is_one()), ("pages_4k", true));
        let d = desc("guest_mem", StatKind::Instant, StatUnit::Bytes, 3, 1, 0);
        let (name, scale) = kvm_name(&d);
        assert_eq!((name.as_str(), scale.apply(2.0)), ("guest_mem_bytes", 2000.0));
    }

    #[test]
    fn kvm_histogram_buckets_are_the_kernels() {
        let d = desc("h", StatKind::LogHist, StatUnit::None, 0, 4, 0);
        let Value::Histogram { buckets, count } = kvm_histogram(&d, &[1, 2, 3, 4], Scale::ONE) else {
            panic!()
        };
        // [0,1) [1,2) [2,4) [4,inf): inclusive bounds 0, 1, 3, +Inf.
        assert_eq!(buckets, vec![(0.0, 1), (1.0, 2), (3.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(count, 10);
        let d = desc("h", StatKind::LinearHist, StatUnit::None, 0, 3, 10);
        let Value::Histogram { buckets, .. } = kvm_histogram(&d, &[5, 0, 1], Scale::ONE) else { panic!() };
        assert_eq!(buckets, vec![(9.0, 5), (19.0, 0), (f64::INFINITY, 1)]);
    }

    #[test]
    fn families_encode_with_labels_and_suffixes() {
        let mut f = Families { vm: "7".into(), ..Default::default() };
        f.counter("notifier_bytes", "Bytes.", &[("kind", "discard"), ("origin", "vmm")], Value::Int(8192));
        f.counter("notifier_bytes", "Bytes.", &[("kind", "unmap"), ("origin", "vmm")], Value::Int(0));
        f.gauge("table_entries", "Entries.", &[], Value::Int(3));
        let d = desc("h", StatKind::LogHist, StatUnit::None, 0, 2, 0);
        f.add(
            "kvm_vcpu_h",
            "H.",
            MetricType::Histogram,
            &[("vcpu", "0")],
            kvm_histogram(&d, &[2, 1], Scale::ONE),
        );
        let mut registry = Registry::with_prefix("zapvm");
        registry.register_collector(Box::new(f));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE zapvm_notifier_bytes_total counter",
            "zapvm_notifier_bytes_total{vm=\"7\",kind=\"discard\",origin=\"vmm\"} 8192",
            "zapvm_notifier_bytes_total{vm=\"7\",kind=\"unmap\",origin=\"vmm\"} 0",
            "# TYPE zapvm_table_entries gauge",
            "zapvm_table_entries{vm=\"7\"} 3",
            "# TYPE zapvm_kvm_vcpu_h histogram",
            "zapvm_kvm_vcpu_h_bucket{vm=\"7\",vcpu=\"0\",le=\"0\"} 2",
            "zapvm_kvm_vcpu_h_bucket{vm=\"7\",vcpu=\"0\",le=\"+Inf\"} 3",
            "zapvm_kvm_vcpu_h_count{vm=\"7\",vcpu=\"0\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert_eq!(text.matches("# TYPE zapvm_notifier_bytes_total").count(), 1, "one descriptor per family");
    }
}
