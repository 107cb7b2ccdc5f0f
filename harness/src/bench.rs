//! `zapvm bench`: measurements reported as tables and JSON.
//!
//! `bench boot` boots fresh VMs running the test guest's Touch workload and reports, as medians
//! over the runs: VMM start to the guest's first exit (its first instruction is its hello
//! ucall, so this is start-to-first-instruction plus one exit), and the guest's cold write,
//! warm write and warm read cost per 4 KiB page, for 4 KiB and THP host backing.

use std::time::Duration;

use guest_abi::{Pass, Workload};

use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{self, Console, VmConfig};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::vstate::vcpu::{pass_name, VcpuOutcome};

/// Options of `bench boot`.
#[derive(Clone, Debug)]
pub struct BootBenchOptions {
    /// Fresh VMs per configuration.
    pub runs: usize,
    /// Guest RAM per VM.
    pub mem: u64,
    /// KVM device.
    pub kvm_device: std::path::PathBuf,
}

/// One configuration's medians.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BootBenchRow {
    /// "4k" or "thp".
    pub backing: String,
    /// Runs measured.
    pub runs: usize,
    /// Median microseconds from VMM start to the guest's first exit.
    pub start_to_first_exit_us: f64,
    /// Median nanoseconds per page of each pass.
    pub ns_per_page: std::collections::BTreeMap<String, f64>,
}

/// The median of `v` (the mean of the middle two for an even count); NaN for none. The benches
/// report medians of repeated measurements so that a burst of host load moves one sample, not
/// the result.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `bench boot`; `progress` hears about each VM.
pub fn boot(opts: &BootBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<BootBenchRow>, String> {
    let mut rows = Vec::new();
    for (backing, thp) in [("4k", false), ("thp", true)] {
        let mut first_exit = Vec::new();
        let mut per_pass: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for run in 0..opts.runs {
            progress(&format!("bench boot: {backing} run {}/{}", run + 1, opts.runs));
            let config = VmConfig {
                kvm_device: opts.kvm_device.clone(),
                memory: MemoryConfig { size: opts.mem, backend: MemoryBackend::Anonymous, thp },
                timeout: Some(Duration::from_secs(120)),
                console: Console::Null,
                balloon: None,
                ..VmConfig::test_guest(TestGuestParams {
                    seed: run as u64 + 1,
                    ..TestGuestParams::new(Workload::Touch)
                })
            };
            let report = machine::run(&config).map_err(|e| e.to_string())?;
            let vcpu = &report.vcpus[0];
            if !matches!(vcpu.outcome, VcpuOutcome::Done { .. }) {
                return Err(format!("bench VM failed: {:?}", report.outcome));
            }
            let khz =
                vcpu.tsc_khz.ok_or("KVM_GET_TSC_KHZ is not available; cannot convert guest cycles")? as f64;
            first_exit.push(vcpu.first_exit_us.unwrap_or_default() as f64);
            for t in &vcpu.timings {
                if matches!(t.pass, Pass::ColdWrite | Pass::WarmWrite | Pass::WarmRead) && t.pages > 0 {
                    let ns = t.cycles as f64 * 1e6 / khz / t.pages as f64;
                    per_pass.entry(pass_name(t.pass).to_string()).or_default().push(ns);
                }
            }
        }
        rows.push(BootBenchRow {
            backing: backing.into(),
            runs: opts.runs,
            start_to_first_exit_us: median(first_exit),
            ns_per_page: per_pass.into_iter().map(|(k, v)| (k, median(v))).collect(),
        });
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub fn boot_table(rows: &[BootBenchRow]) -> String {
    let mut out = String::from(
        "| backing | runs | VMM start -> first guest exit | cold write / page | warm write / page | warm read / page |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let p = |k: &str| r.ns_per_page.get(k).map(|ns| format!("{ns:.0} ns")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {} | {} | {:.2} ms | {} | {} | {} |\n",
            r.backing,
            r.runs,
            r.start_to_first_exit_us / 1000.0,
            p("cold_write"),
            p("warm_write"),
            p("warm_read")
        ));
    }
    out
}
