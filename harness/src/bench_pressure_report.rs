//! The report of `zapvm bench pressure`: what ran ([`PressureOptions`]), every point and VM, the
//! key figure and the per-page comparison ([`PressureReport`]), and its markdown table. The bench
//! ([`crate::bench_pressure`]) fills it, the plot ([`crate::bench_plot`]) draws it, and
//! `pressure.json` is its serialization (read back by `zapvm bench pressure --from-json`). How
//! each figure is measured is in [`crate::bench_pressure`].

// The workspace's rust-version (1.85) predates `u64::is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PressureBacking {
    /// Private anonymous memory in 4 KiB pages (`MADV_NOHUGEPAGE` is not set, THP is just not
    /// requested; the host's THP mode is `madvise`).
    #[serde(rename = "4k")]
    Small,
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    Thp,
}

impl PressureBacking {
    /// "4k" or "thp".
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "4k",
            Self::Thp => "thp",
        }
    }
}

/// How the pressure reaches the notifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// One discard (one callback set) per range.
    Range,
    /// One discard (one callback set, one 4 KiB syscall) per 4 KiB page of each range.
    PerPage,
}

/// What `zapvm bench pressure` runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PressureOptions {
    /// The KVM device.
    #[serde(skip)]
    pub kvm_device: PathBuf,
    /// Guest RAM bytes (the work area is all of it but the first few MiB).
    pub mem: u64,
    /// Range sizes, bytes (multiples of 4 KiB).
    pub ranges: Vec<u64>,
    /// Pressure rates, MiB/s (each > 0; the unpressured slices are the baseline).
    pub rates_mib_s: Vec<f64>,
    /// Host backings.
    pub backings: Vec<PressureBacking>,
    /// Length of an unpressured slice, and the least length of a pressured one.
    #[serde(with = "crate::seconds")]
    pub slice: Duration,
    /// Unpressured/pressured slice pairs per point.
    pub reps: usize,
    /// Also deliver the key point's pressure one 4 KiB page at a time.
    pub per_page: bool,
    /// Register guest RAM with the userfaultfd monitor, as `zapvm run` does.
    pub monitor: bool,
    /// Seed of the range picks.
    pub seed: u64,
    /// Points whose token period (range / rate) is longer than this are skipped.
    #[serde(with = "crate::seconds")]
    pub max_period: Duration,
}

impl PressureOptions {
    /// The default run (a minute or two): 256 MiB, 4 KiB / 64 KiB / 2 MiB ranges, 64 / 256 /
    /// 1024 MiB/s, 4 KiB and THP backing, 0.3 s slices, 3 reps, the per-page comparison.
    pub fn quick() -> Self {
        Self {
            kvm_device: "/dev/kvm".into(),
            mem: 256 << 20,
            ranges: vec![4 << 10, 64 << 10, 2 << 20],
            rates_mib_s: vec![64.0, 256.0, 1024.0],
            backings: vec![PressureBacking::Small, PressureBacking::Thp],
            slice: Duration::from_millis(300),
            reps: 3,
            per_page: true,
            monitor: true,
            seed: 0x5eed,
            max_period: Duration::from_secs(4),
        }
    }

    /// `--full`: 1280 MiB, ranges up to 1 GiB, 0.6 s slices, 5 reps.
    pub fn full() -> Self {
        Self {
            mem: 1280 << 20,
            ranges: vec![4 << 10, 64 << 10, 2 << 20, 64 << 20, 1 << 30],
            slice: Duration::from_millis(600),
            reps: 5,
            ..Self::quick()
        }
    }
}

/// One (backing, range, delivery, rate) point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PressurePoint {
    /// "4k" or "thp".
    pub backing: PressureBacking,
    /// Range size, bytes.
    pub range_bytes: u64,
    /// Range size, e.g. "2M".
    pub range: String,
    /// How the ranges were delivered.
    pub delivery: Delivery,
    /// The target rate is what the previous point of the same VM achieved (the per-page
    /// comparison's range delivery at equal pressure).
    pub rate_matched_to_previous: bool,
    /// Target pressure, MiB/s.
    pub target_mib_s: f64,
    /// Pressure achieved over the pressured slices, MiB/s.
    pub achieved_mib_s: f64,
    /// Discard calls made.
    pub discards: u64,
    /// Bytes discarded.
    pub discarded_bytes: u64,
    /// Discards that failed (the first error is in `first_error`).
    pub failed_discards: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Seconds of unpressured slices.
    pub unpressured_s: f64,
    /// Seconds of pressured slices.
    pub pressured_s: f64,
    /// Guest touch rate without pressure, pages/s.
    pub unpressured_pages_per_s: f64,
    /// Guest touch rate under pressure, pages/s.
    pub pressured_pages_per_s: f64,
    /// The median over the reps of each pressured slice's touch rate over the mean rate of the
    /// unpressured slices right before and right after it.
    pub pressured_vs_unpressured: f64,
    /// All pressured pages/s over all unpressured pages/s.
    pub pooled_ratio: f64,
    /// Each rep's ratio.
    pub rep_ratios: Vec<f64>,
    /// Guest passes completed during the pressured slices.
    pub pressured_passes: u64,
    /// Host time in discard calls per MiB discarded, microseconds.
    pub host_us_per_mib: f64,
    /// Fraction of the pressured slices the discarding thread spent in discard calls.
    pub host_busy_fraction: f64,
    /// Guest time lost per 4 KiB page refaulted, nanoseconds (see [`crate::bench_pressure`]).
    pub refault_ns_per_page: Option<f64>,
    /// Guest time lost per KVM `pf_fixed`, nanoseconds.
    pub lost_ns_per_kvm_fault: Option<f64>,
    /// KVM statistics that moved during the pressured slices (`vm.*`, `vcpu.*`).
    pub kvm_pressured: BTreeMap<String, i128>,
    /// KVM statistics that moved during the unpressured slices.
    pub kvm_unpressured: BTreeMap<String, i128>,
}

impl PressurePoint {
    /// How the point's pressure was delivered, for tables.
    pub fn delivery_label(&self) -> &'static str {
        match (self.delivery, self.rate_matched_to_previous) {
            (Delivery::Range, false) => "range",
            (Delivery::Range, true) => "range, at the per-page rate",
            (Delivery::PerPage, _) => "per 4K page",
        }
    }
}

/// One VM's run: a backing, a range size, and its points.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PressureVm {
    /// Host backing.
    pub backing: PressureBacking,
    /// Range size, bytes.
    pub range_bytes: u64,
    /// "sweep" (one discard per range, every rate) or "per-page comparison".
    pub purpose: String,
    /// Pages the guest touches per pass.
    pub working_set_pages: u64,
    /// Bytes of the pressure area.
    pub pressure_area_bytes: u64,
    /// Share of guest RAM backed by huge pages when the points started and when they ended
    /// (the process's `AnonHugePages` over guest RAM).
    pub thp_fraction_start: f64,
    /// See `thp_fraction_start`.
    pub thp_fraction_end: f64,
    /// Seconds from VMM start until the guest had done its cold and one warm pass.
    pub warmup_s: f64,
}

/// The per-page versus range comparison: the per-page delivery at the target rate, the range
/// delivery at the rate the per-page one achieved (same VM, equal pressure), and the range
/// delivery at the target rate (from the sweep).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PerPageVsRange {
    /// Host backing.
    pub backing: PressureBacking,
    /// Range size, bytes.
    pub range_bytes: u64,
    /// Target pressure, MiB/s.
    pub target_mib_s: f64,
    /// One discard per 4 KiB page, at the target rate.
    pub per_page: DeliveryFigures,
    /// One discard per range at the rate `per_page` achieved.
    pub range_equal_pressure: Option<DeliveryFigures>,
    /// One discard per range at the target rate (the sweep's point).
    pub range_at_target: Option<DeliveryFigures>,
}

/// The figures of one delivery in [`PerPageVsRange`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryFigures {
    /// Pressure achieved, MiB/s.
    pub achieved_mib_s: f64,
    /// Touch-rate ratio.
    pub pressured_vs_unpressured: f64,
    /// Host microseconds in discard calls per MiB.
    pub host_us_per_mib: f64,
    /// Guest time lost per 4 KiB page refaulted, ns.
    pub refault_ns_per_page: Option<f64>,
    /// KVM remote TLB flush requests per MiB discarded.
    pub flush_requests_per_mib: Option<f64>,
}

impl DeliveryFigures {
    /// The figures of point `p`.
    pub(crate) fn of(p: &PressurePoint) -> Self {
        Self {
            achieved_mib_s: p.achieved_mib_s,
            pressured_vs_unpressured: p.pressured_vs_unpressured,
            host_us_per_mib: p.host_us_per_mib,
            refault_ns_per_page: p.refault_ns_per_page,
            flush_requests_per_mib: p
                .kvm_pressured
                .get("vm.remote_tlb_flush_requests")
                .map(|&n| n as f64 / (p.discarded_bytes as f64 / (1 << 20) as f64).max(1e-9)),
        }
    }
}

/// Everything `zapvm bench pressure` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PressureReport {
    /// The command line.
    pub command: String,
    /// When the run started (UTC, RFC 3339).
    pub date: String,
    /// What ran.
    pub options: PressureOptions,
    /// Every point.
    pub points: Vec<PressurePoint>,
    /// Every VM.
    pub vms: Vec<PressureVm>,
    /// Touch-rate ratio at the key point (2 MiB ranges at 1024 MiB/s) per backing.
    pub pressured_vs_unpressured: BTreeMap<String, f64>,
    /// The target.
    pub target: f64,
    /// Whether the target is met per backing.
    pub target_met: BTreeMap<String, bool>,
    /// Per page versus range at the key point.
    pub per_page_vs_range: Vec<PerPageVsRange>,
    /// Points skipped and why.
    pub notes: Vec<String>,
}

/// A size as "4K", "2M", "1G".
pub fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

impl PressureReport {
    /// The results as markdown: the points table, the key figure, the per-page comparison.
    pub fn to_markdown(&self) -> String {
        let o = &self.options;
        let mut s = format!(
            "bench pressure: {} MiB guest RAM (the guest writes one word per page over all of it, \
             cyclically), 1 vCPU, userfaultfd monitor {}, {} reps of {:.1} s slices per point\n\n",
            o.mem >> 20,
            if o.monitor { "on" } else { "off" },
            o.reps,
            o.slice.as_secs_f64()
        );
        s += "| backing | range | delivery | target MiB/s | achieved MiB/s | unpressured Mpages/s | pressured Mpages/s | pressured_vs_unpressured | host us/MiB | refault ns/page | KVM pf_fixed | TLB flush requests | shadow zapped |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for p in &self.points {
            let k =
                |name: &str| p.kvm_pressured.get(name).map(|v| v.to_string()).unwrap_or_else(|| "0".into());
            s += &format!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} | {:.0} | {} | {} | {} | {} |\n",
                p.backing.name(),
                p.range,
                p.delivery_label(),
                p.target_mib_s,
                p.achieved_mib_s,
                p.unpressured_pages_per_s / 1e6,
                p.pressured_pages_per_s / 1e6,
                p.pressured_vs_unpressured,
                p.host_us_per_mib,
                p.refault_ns_per_page.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into()),
                k("vcpu.pf_fixed"),
                k("vm.remote_tlb_flush_requests"),
                k("vm.mmu_shadow_zapped"),
            );
        }
        s += "\n";
        for (b, v) in &self.pressured_vs_unpressured {
            s += &format!(
                "`pressured_vs_unpressured` ({b}, 2M ranges at 1024 MiB/s): {v:.3} (target >= {}: {})\n",
                self.target,
                if *v >= self.target { "met" } else { "NOT met" }
            );
        }
        if !self.per_page_vs_range.is_empty() {
            s += "\n| per page vs range | delivery | target MiB/s | achieved MiB/s | pressured_vs_unpressured | host us/MiB | refault ns/page | TLB flush requests/MiB |\n|---|---|---|---|---|---|---|---|\n";
            let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
            for c in &self.per_page_vs_range {
                let rows = [
                    ("one discard per 4K page", c.target_mib_s, Some(&c.per_page)),
                    (
                        "one discard per range, equal pressure",
                        c.per_page.achieved_mib_s,
                        c.range_equal_pressure.as_ref(),
                    ),
                    ("one discard per range, target rate", c.target_mib_s, c.range_at_target.as_ref()),
                ];
                for (what, target, d) in rows {
                    let Some(d) = d else { continue };
                    s += &format!(
                        "| {} {} | {what} | {target:.0} | {:.0} | {:.3} | {:.0} | {} | {} |\n",
                        c.backing.name(),
                        size_label(c.range_bytes),
                        d.achieved_mib_s,
                        d.pressured_vs_unpressured,
                        d.host_us_per_mib,
                        d.refault_ns_per_page.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into()),
                        f(d.flush_requests_per_mib)
                    );
                }
            }
        }
        for n in &self.notes {
            s += &format!("\nnote: {n}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(size_label(4 << 10), "4K");
        assert_eq!(size_label(64 << 10), "64K");
        assert_eq!(size_label(2 << 20), "2M");
        assert_eq!(size_label(1 << 30), "1G");
        assert_eq!(size_label(3 << 19), "1536K");
    }
}

impl crate::bench_export::BenchReport for PressureReport {
    const NAME: &'static str = "pressure";

    fn command(&self) -> &str {
        &self.command
    }

    fn date(&self) -> &str {
        &self.date
    }

    fn to_markdown(&self) -> String {
        PressureReport::to_markdown(self)
    }
}
