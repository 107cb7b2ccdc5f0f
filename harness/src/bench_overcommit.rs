//! `zapvm bench overcommit`: a fleet of phased VMs whose guest RAM together exceeds a memory
//! budget, run under three policies in the same run — none (no balloon target: what the guests
//! keep stays resident), a static split (each balloon at RAM minus the budget's equal share,
//! set once), and the governor ([`crate::governor`]) — each with a fresh fleet.
//!
//! # The fleet
//! `vms` `zapvm run --workload phased` processes (one vCPU each, the balloon without
//! DEFLATE_ON_OOM so that a guest whose working set wants pages the balloon holds stalls, which
//! is what the stall time measures), each with the same working-set cycle shifted by
//! `period / vms`: at any moment about half the fleet is at its high working set. The guests
//! keep pages they stopped using as cache (up to `cache`), so without a policy their resident
//! memory stays at its high-water mark.
//!
//! # What is measured (every `interval`, through the VMs' control sockets and /proc)
//! Per policy: the resident total of the VMM processes against the budget (peak, p99, seconds
//! over), the guests' work (pages verified per second, summed; the ratio is against the
//! no-policy run, whose guests are never constrained), the guests' stall time, bytes reclaimed
//! per path (balloon inflations, free page reporting; virtio-mem is not used by this fleet) and
//! the notifier discard operations they took, and the reclaim latency: from a VM's working set
//! starting to drop to its resident memory having fallen by 80 % of the drop (from the working
//! set it had then down to its low). Every VM must run
//! to the end with its verification clean (a wrong page ends its guest with a Failure and the
//! process with a non-zero status).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::governor::cgroup::Cgroup;
use crate::governor::{Fleet, Governor, Mode, PolicyConfig};

const MIB: u64 = 1 << 20;

/// The fleet's shape (what each `zapvm run` gets).
#[derive(Clone, Debug, Serialize)]
pub struct FleetSpec {
    /// VMs.
    pub vms: usize,
    /// Guest RAM per VM, bytes.
    pub mem: u64,
    /// Working set, low and high, bytes.
    pub low: u64,
    /// See `low`.
    pub high: u64,
    /// Seconds of a cycle, and of each ramp.
    pub period: f64,
    /// See `period`.
    pub ramp: f64,
    /// Most cache a guest keeps, bytes.
    pub cache: u64,
    /// Seconds between balloon statistics requests.
    pub stats_interval: f64,
}

/// A running fleet: its processes and their sockets' directory.
pub struct RunningFleet {
    /// The directory of the control sockets.
    pub dir: PathBuf,
    /// The `zapvm run` processes, with their names.
    pub children: Vec<(String, Child)>,
}

impl RunningFleet {
    /// Starts `spec.vms` phased VMs named `{prefix}{i}` with their sockets in `dir`, and waits
    /// until every socket exists.
    pub fn start(zapvm: &Path, dir: &Path, prefix: &str, spec: &FleetSpec) -> Result<Self, String> {
        Self::start_in(zapvm, dir, prefix, spec, None)
    }

    /// [`RunningFleet::start`], with every VM started inside the cgroup whose `cgroup.procs` is
    /// `cgroup_procs` (a shell writes its pid there and then executes `zapvm run`, so the VM's
    /// memory is charged to the cgroup from its first page).
    pub fn start_in(
        zapvm: &Path,
        dir: &Path,
        prefix: &str,
        spec: &FleetSpec,
        cgroup_procs: Option<&Path>,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The children go into the fleet as they start: a failure half way drops it, which kills
        // those already running.
        let mut fleet = Self { dir: dir.to_path_buf(), children: Vec::new() };
        for i in 0..spec.vms {
            let name = format!("{prefix}{i}");
            let socket = dir.join(format!("zapvm-{name}.sock"));
            let _ = std::fs::remove_file(&socket);
            let offset = spec.period * i as f64 / spec.vms as f64;
            let mut command = match cgroup_procs {
                None => Command::new(zapvm),
                Some(procs) => {
                    let mut c = Command::new("/bin/sh");
                    c.args(["-c", "echo $$ > \"$0\" && exec \"$@\""]).arg(procs).arg(zapvm);
                    c
                }
            };
            let child = command
                .args([
                    "run",
                    "--workload",
                    "phased",
                    "--serial",
                    "null",
                    "--no-deflate-on-oom",
                    "--id",
                    &name,
                ])
                .arg("--api-socket")
                .arg(&socket)
                .args(["--mem", &format!("{}M", spec.mem / MIB)])
                .args(["--phase-low", &format!("{}M", spec.low / MIB)])
                .args(["--phase-high", &format!("{}M", spec.high / MIB)])
                .args(["--phase-cache", &format!("{}M", spec.cache / MIB)])
                .args(["--phase-period", &spec.period.to_string()])
                .args(["--phase-ramp", &spec.ramp.to_string()])
                .args(["--phase-offset", &offset.to_string()])
                .args(["--balloon-stats-interval", &spec.stats_interval.to_string()])
                .args(["--seed", &(0x5eed + i as u64).to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", zapvm.display()))?;
            fleet.children.push((name, child));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, child) in &mut fleet.children {
            let socket = dir.join(format!("zapvm-{name}.sock"));
            while !socket.exists() {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut stderr = String::new();
                    if let Some(mut pipe) = child.stderr.take() {
                        let _ = pipe.read_to_string(&mut stderr);
                    }
                    return Err(format!(
                        "{name} ended ({status}) before its control socket existed: {}",
                        stderr.trim()
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!("{name}: no control socket after 60 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(fleet)
    }

    /// Ends every VM still running (QMP quit, then kill) and returns how each ended.
    pub fn stop(mut self) -> Vec<VmEnd> {
        let mut out = Vec::new();
        for (name, child) in &mut std::mem::take(&mut self.children) {
            let socket = self.dir.join(format!("zapvm-{name}.sock"));
            let alive = matches!(child.try_wait(), Ok(None));
            if alive {
                let _ = vmm::api::client::call(&socket, "quit", Value::Null);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let status = child.wait().ok();
            let mut text = String::new();
            for pipe in [
                child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
                child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
            ]
            .into_iter()
            .flatten()
            {
                let mut p = pipe;
                let _ = p.read_to_string(&mut text);
            }
            let clean = alive && status.is_some_and(|s| s.success());
            out.push(VmEnd { name: name.clone(), alive, clean, output: text });
        }
        out
    }
}

/// How one VM of a [`RunningFleet`] ended.
#[derive(Clone, Debug)]
pub struct VmEnd {
    /// The VM's name.
    pub name: String,
    /// It was still running when the fleet was stopped.
    pub alive: bool,
    /// Alive until stopped, and it then exited with status 0.
    pub clean: bool,
    /// Its standard output and error.
    pub output: String,
}

impl Drop for RunningFleet {
    /// Kills the VMs [`RunningFleet::stop`] did not end (a caller that failed half way).
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

use std::io::Read;

/// One sample of one VM.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmSample {
    /// Resident memory of its VMM, bytes.
    pub resident: u64,
    /// Working set it has / wants, bytes.
    pub working_set: u64,
    /// See `working_set`.
    pub wanted: u64,
    /// Balloon target / actual, bytes.
    pub balloon_target: u64,
    /// See `balloon_target`.
    pub balloon_actual: u64,
    /// Cumulative: stall µs, pages verified.
    pub stall_us: u64,
    /// See `stall_us`.
    pub verified: u64,
    /// Cumulative bytes the balloon discarded on inflation, and through free page reports.
    pub balloon_bytes: u64,
    /// See `balloon_bytes`.
    pub reported_bytes: u64,
    /// Cumulative notifier discard operations of the balloon: inflations, reports.
    pub balloon_ranges: u64,
    /// See `balloon_ranges`.
    pub reported_ranges: u64,
}

/// One sample of the fleet.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the policy's run started.
    pub t: f64,
    /// The resident total, bytes.
    pub resident_total: u64,
    /// Per VM (in name order; absent VMs have zeros).
    pub vms: Vec<VmSample>,
}

/// The result of one policy.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyResult {
    /// none, static or governor.
    pub policy: String,
    /// Peak and p99 of the resident total, bytes, and their ratio to the budget.
    pub peak_resident: u64,
    /// See `peak_resident`.
    pub p99_resident: u64,
    /// p99 / budget.
    pub p99_vs_budget: f64,
    /// Seconds with the resident total over the budget.
    pub seconds_over_budget: f64,
    /// Pages verified per second, the fleet's sum.
    pub pages_verified_per_s: f64,
    /// Against the no-policy run.
    pub work_vs_unconstrained: f64,
    /// Stall seconds, the fleet's sum.
    pub stall_s: f64,
    /// Bytes reclaimed by balloon inflations / free page reports, and the notifier discard
    /// operations they took.
    pub balloon_bytes: u64,
    /// See `balloon_bytes`.
    pub reported_bytes: u64,
    /// See `balloon_bytes`.
    pub virtio_mem_bytes: u64,
    /// See `balloon_bytes`.
    pub notifier_ranges: u64,
    /// Reclaim latency, seconds: median and worst over the working-set drops seen (`None`:
    /// the resident memory never fell back).
    pub reclaim_latency_median_s: Option<f64>,
    /// See `reclaim_latency_median_s`.
    pub reclaim_latency_max_s: Option<f64>,
    /// Working-set drops seen, and those whose resident memory never fell back.
    pub drops: usize,
    /// See `drops`.
    pub drops_not_reclaimed: usize,
    /// Every VM ran to the end with its verification clean.
    pub verification_clean: bool,
    /// The governor's counters (governor run only).
    pub governor: Option<crate::governor::GovernorMetrics>,
    /// With the budget enforced in a memory cgroup: the processes its OOM killer killed.
    pub cgroup_oom_kills: Option<u64>,
    /// VMs that were no longer running when the run ended (killed, or failed); a VM that ran to
    /// the end and then did not exit cleanly is not lost but makes `verification_clean` false.
    pub vms_lost: usize,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// The bench's settings.
#[derive(Clone, Debug, Serialize)]
pub struct OvercommitRequest {
    /// The fleet.
    pub fleet: FleetSpec,
    /// The budget, bytes.
    pub budget: u64,
    /// Seconds per policy.
    pub duration: f64,
    /// Seconds between samples (and governor rounds).
    pub interval: f64,
    /// The policy's settings (budget filled in from `budget`).
    pub policy: PolicyConfig,
    /// Also run no policy and the governor with the budget enforced as the limit of a memory
    /// cgroup the fleet runs in (what the host's OOM killer or reclaim does without a governor).
    pub cgroup_enforce: bool,
}

/// The report.
#[derive(Clone, Debug, Serialize)]
pub struct OvercommitReport {
    /// What was run.
    pub request: OvercommitRequest,
    /// The host: cores, load average at the start and the end.
    pub host: Value,
    /// Per policy.
    pub policies: Vec<PolicyResult>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// Runs one policy on a fresh fleet.
fn run_policy(
    zapvm: &Path,
    req: &OvercommitRequest,
    mode: Mode,
    name: &str,
    base_dir: &Path,
    enforced: bool,
) -> Result<PolicyResult, String> {
    let dir = base_dir.join(name);
    let cgroup = if enforced {
        // Removed when dropped, after the fleet (declared later, dropped first) killed its VMs.
        let cg = Cgroup::create(&format!("zapvm-bench-overcommit-{}-{name}", std::process::id()))?;
        cg.enforce(req.budget)?;
        Some(cg)
    } else {
        None
    };
    let fleet = RunningFleet::start_in(
        zapvm,
        &dir,
        &format!("oc-{name}-"),
        &req.fleet,
        cgroup.as_ref().map(|c| c.procs_file()).as_deref(),
    )?;
    let names: Vec<String> = fleet.children.iter().map(|(n, _)| n.clone()).collect();
    let config = PolicyConfig { budget: req.budget, ..req.policy.clone() };
    let watched = if mode == Mode::Govern { cgroup.as_ref().map(|c| Cgroup::clone(c)) } else { None };
    let mut gov = Governor::new(Fleet::Dir(dir.clone()), mode, config, watched)?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next = start;
    while start.elapsed().as_secs_f64() < req.duration {
        let mut per: Vec<VmSample> = vec![VmSample::default(); names.len()];
        let tick = gov.tick(|vm, balloon| {
            let Some(i) = names.iter().position(|n| n == vm) else { return };
            let g = |k: &str| {
                balloon.get("guest_stats").and_then(|s| s.get(k)).and_then(Value::as_u64).unwrap_or(0)
            };
            let d = |k: &str| balloon.get(k).and_then(Value::as_u64).unwrap_or(0);
            per[i] = VmSample {
                working_set: g("zapvm_working_set"),
                wanted: g("zapvm_wanted"),
                stall_us: g("zapvm_stall_us"),
                verified: g("zapvm_verified_pages"),
                balloon_target: d("target_pages") * 4096,
                balloon_actual: d("actual_pages") * 4096,
                balloon_bytes: d("bytes_discarded"),
                reported_bytes: d("reported_bytes"),
                balloon_ranges: d("discard_ranges"),
                reported_ranges: d("reported_ranges"),
                resident: 0,
            };
        });
        for o in &tick.vms {
            if let Some(i) = names.iter().position(|n| *n == o.name) {
                per[i].resident = o.resident;
            }
        }
        let resident_total = per.iter().map(|v| v.resident).sum();
        samples.push(Sample { t: start.elapsed().as_secs_f64(), resident_total, vms: per });
        next += Duration::from_secs_f64(req.interval);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let ends = fleet.stop();
    let clean = ends.iter().all(|end| end.clean);
    for end in &ends {
        if !end.clean {
            tracing::warn!(vm = %end.name, output = %end.output, "bench overcommit: VM did not run clean");
        }
    }
    let mut result =
        summarise(name, req, samples, clean, (mode == Mode::Govern).then(|| gov.metrics.clone()));
    result.vms_lost = ends.iter().filter(|end| !end.alive).count();
    if let Some(cg) = cgroup {
        result.cgroup_oom_kills = Some(cg.oom_kills()?);
        // The VMs are gone (stopped or killed) and the shells became them: the cgroup empties.
        cg.remove()?;
    }
    Ok(result)
}

fn summarise(
    name: &str,
    req: &OvercommitRequest,
    samples: Vec<Sample>,
    clean: bool,
    governor: Option<crate::governor::GovernorMetrics>,
) -> PolicyResult {
    let mut totals: Vec<u64> = samples.iter().map(|s| s.resident_total).collect();
    totals.sort_unstable();
    let over = samples.iter().filter(|s| s.resident_total > req.budget).count() as f64 * req.interval;
    let (first, last) = (samples.first(), samples.last());
    let span = match (first, last) {
        (Some(a), Some(b)) if b.t > a.t => b.t - a.t,
        _ => 1.0,
    };
    let delta = |f: fn(&VmSample) -> u64| -> u64 {
        match (first, last) {
            (Some(a), Some(b)) => b.vms.iter().zip(&a.vms).map(|(y, x)| f(y).saturating_sub(f(x))).sum(),
            _ => 0,
        }
    };
    // Reclaim latency: per VM, each start of a working-set drop (wanted falling after it rose
    // to its high), to its resident memory having fallen by 80 % of the drop.
    let drop_size = req.fleet.high.saturating_sub(req.fleet.low);
    let mut latencies = Vec::new();
    let mut never = 0;
    let nvm = samples.first().map_or(0, |s| s.vms.len());
    let high = req.fleet.high * 95 / 100;
    for v in 0..nvm {
        let wanted = |k: usize| samples[k].vms[v].wanted;
        let mut k = 1;
        while k < samples.len() {
            if wanted(k - 1) >= high && wanted(k) < wanted(k - 1) {
                let (t0, r0) = (samples[k - 1].t, samples[k - 1].vms[v].resident);
                // The drop is from the working set it had (it may not have reached its high).
                let fall = samples[k - 1].vms[v].working_set.saturating_sub(req.fleet.low).min(drop_size);
                let goal = r0.saturating_sub(fall * 8 / 10);
                // Look until the working set is back at its high.
                let mut j = k;
                let mut found = None;
                while j < samples.len() && (j == k || wanted(j) < high) {
                    if samples[j].vms[v].resident <= goal {
                        found = Some(samples[j].t - t0);
                        break;
                    }
                    j += 1;
                }
                match found {
                    Some(l) => latencies.push(l),
                    None if j < samples.len() => never += 1,
                    None => {} // the run ended first: not judged
                }
                while k < samples.len() && wanted(k) < high {
                    k += 1;
                }
            }
            k += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    PolicyResult {
        policy: name.to_string(),
        peak_resident: totals.last().copied().unwrap_or(0),
        p99_resident: percentile(&totals, 0.99),
        p99_vs_budget: percentile(&totals, 0.99) as f64 / req.budget as f64,
        seconds_over_budget: over,
        pages_verified_per_s: delta(|v| v.verified) as f64 / span,
        work_vs_unconstrained: f64::NAN,
        stall_s: delta(|v| v.stall_us) as f64 / 1e6,
        balloon_bytes: delta(|v| v.balloon_bytes),
        reported_bytes: delta(|v| v.reported_bytes),
        virtio_mem_bytes: 0,
        notifier_ranges: delta(|v| v.balloon_ranges) + delta(|v| v.reported_ranges),
        reclaim_latency_median_s: latencies.get(latencies.len() / 2).copied(),
        reclaim_latency_max_s: latencies.last().copied(),
        drops: latencies.len() + never,
        drops_not_reclaimed: never,
        verification_clean: clean,
        governor,
        cgroup_oom_kills: None,
        vms_lost: 0,
        samples,
    }
}

/// Runs the bench: none, static, governor, each on a fresh fleet; sockets under `work_dir`.
pub fn run(zapvm: &Path, req: &OvercommitRequest, work_dir: &Path) -> Result<OvercommitReport, String> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = load();
    let mut policies = Vec::new();
    let mut runs = vec![
        (Mode::Observe, "none", false),
        (Mode::Static, "static", false),
        (Mode::Govern, "governor", false),
    ];
    if req.cgroup_enforce {
        runs.extend([(Mode::Observe, "none-cgroup", true), (Mode::Govern, "governor-cgroup", true)]);
    }
    for (mode, name, enforced) in runs {
        eprintln!(
            "bench overcommit: policy {name} ({} VMs x {} MiB, budget {} MiB, {} s)",
            req.fleet.vms,
            req.fleet.mem / MIB,
            req.budget / MIB,
            req.duration
        );
        policies.push(run_policy(zapvm, req, mode, name, work_dir, enforced)?);
    }
    let base = policies[0].pages_verified_per_s;
    for p in &mut policies {
        p.work_vs_unconstrained = if base > 0.0 { p.pages_verified_per_s / base } else { f64::NAN };
    }
    Ok(OvercommitReport {
        request: req.clone(),
        host: serde_json::json!({ "cores": cores, "loadavg_before": load_before, "loadavg_after": load() }),
        policies,
    })
}

/// The markdown table of a report.
pub fn markdown(r: &OvercommitReport) -> String {
    let mib = |b: u64| format!("{}", b / MIB);
    let opt = |x: Option<f64>| x.map_or("never".to_string(), |v| format!("{v:.1}"));
    let mut s = format!(
        "{} VMs x {} MiB guest RAM, budget {} MiB, working set {}-{} MiB per VM over {} s cycles, {} s per policy; host: {}\n\n",
        r.request.fleet.vms, r.request.fleet.mem / MIB, r.request.budget / MIB, r.request.fleet.low / MIB,
        r.request.fleet.high / MIB, r.request.fleet.period, r.request.duration, r.host
    );
    s += "| policy | peak resident (MiB) | p99 resident (MiB) | p99 / budget | s over budget | pages verified/s | work vs none | stall (s) | balloon MiB | FPR MiB | virtio-mem MiB | notifier ranges | reclaim latency median / max (s) | drops not reclaimed | verification | cgroup OOM kills | VMs lost |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for p in &r.policies {
        s += &format!(
            "| {} | {} | {} | {:.3} | {:.1} | {:.0} | {:.2} | {:.1} | {} | {} | {} | {} | {} / {} | {} of {} | {} | {} | {} |\n",
            p.policy, mib(p.peak_resident), mib(p.p99_resident), p.p99_vs_budget, p.seconds_over_budget,
            p.pages_verified_per_s, p.work_vs_unconstrained, p.stall_s, mib(p.balloon_bytes), mib(p.reported_bytes),
            mib(p.virtio_mem_bytes), p.notifier_ranges, opt(p.reclaim_latency_median_s), opt(p.reclaim_latency_max_s),
            p.drops_not_reclaimed, p.drops, if p.verification_clean { "clean" } else { "FAILED" },
            p.cgroup_oom_kills.map_or("-".to_string(), |k| k.to_string()), p.vms_lost
        );
    }
    s
}

/// Writes overcommit.json, overcommit.md and overcommit.svg into `out`.
pub fn write(r: &OvercommitReport, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let w =
        |name: &str, text: String| std::fs::write(out.join(name), text).map_err(|e| format!("{name}: {e}"));
    w("overcommit.json", serde_json::to_string_pretty(r).map_err(|e| e.to_string())?)?;
    w("overcommit.md", markdown(r))?;
    crate::bench_overcommit_plot::svg(r, &out.join("overcommit.svg"))
}
