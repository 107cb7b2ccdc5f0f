//! `zapvm governor` and `zapvm bench overcommit` on the command line (the work is
//! `harness::governor` and `harness::bench_overcommit`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use harness::governor::{cgroup::Cgroup, Fleet, Governor, Mode, PolicyConfig};
use vmm::memory::parse_size;

/// `zapvm governor`.
#[derive(clap::Args)]
pub struct GovernorArgs {
    /// The resident total the VMs must stay under (e.g. 2G).
    #[arg(long, value_parser = parse_size)]
    budget: u64,
    /// Watch every control socket (`*.sock`) in this directory, as VMs come and go (default:
    /// where `zapvm run --id NAME` puts them).
    #[arg(long, conflicts_with = "socket")]
    dir: Option<PathBuf>,
    /// Watch these control sockets (repeat the option).
    #[arg(long)]
    socket: Vec<PathBuf>,
    /// The least memory any VM keeps outside its balloon.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    floor: u64,
    /// Headroom over a VM's working set (at least; 8 % of the working set if more).
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    headroom: u64,
    /// Smaller changes of a VM's allowance are not made.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    hysteresis: u64,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 0.5)]
    interval: f64,
    /// Stop after this many seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
    /// Watch this memory cgroup (v2 memory.max or v1 memory.limit_in_bytes): its limit caps
    /// the budget.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// With --cgroup: set its limit to the budget first.
    #[arg(long, requires = "cgroup")]
    cgroup_enforce: bool,
    /// Write the governor's counters as JSON to this file after every round.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Watch only: decide nothing, send nothing (prints the observations).
    #[arg(long)]
    observe: bool,
}

/// Runs `zapvm governor`: one line per new balloon target on standard output (with its reason).
pub fn governor(args: GovernorArgs) -> Result<ExitCode, String> {
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(format!("--interval {} is not a positive number of seconds", args.interval));
    }
    let fleet = if args.socket.is_empty() {
        Fleet::Dir(args.dir.unwrap_or_else(vmm::api::client::runtime_dir))
    } else {
        Fleet::Sockets(args.socket)
    };
    let cgroup = args.cgroup.as_deref().map(Cgroup::open).transpose()?;
    if let (Some(cg), true) = (&cgroup, args.cgroup_enforce) {
        cg.enforce(args.budget)?;
    }
    let config = PolicyConfig {
        budget: args.budget,
        floor: args.floor,
        headroom: args.headroom,
        hysteresis: args.hysteresis,
        ..Default::default()
    };
    let mode = if args.observe { Mode::Observe } else { Mode::Govern };
    let mut gov = Governor::new(fleet, mode, config, cgroup)?;
    let start = Instant::now();
    let mut next = start;
    loop {
        let tick = gov.tick(|_, _| {});
        let mib = |b: u64| b >> 20;
        match &tick.decision {
            Some(d) => {
                for v in d.vms.iter().filter(|v| v.changed) {
                    println!(
                        "governor: {}: balloon {} MiB (keeps {} MiB, needs {} MiB): {:?}; resident total {} of {} MiB",
                        v.name,
                        mib(v.balloon_target),
                        mib(v.allowance),
                        mib(v.need),
                        v.reason,
                        mib(tick.resident_total),
                        mib(d.effective_budget)
                    );
                }
            }
            None => println!("{}", serde_json::to_string(&tick).unwrap_or_default()),
        }
        if let Some(path) = &args.metrics_file {
            let tmp = path.with_extension("tmp");
            let text = serde_json::to_string_pretty(&gov.metrics).unwrap_or_default();
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("--metrics-file {}: {e}", path.display()))?;
        }
        if args.duration > 0.0 && start.elapsed().as_secs_f64() >= args.duration {
            break;
        }
        next += Duration::from_secs_f64(args.interval);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    eprintln!("{}", serde_json::to_string(&gov.metrics).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

/// `zapvm bench overcommit`.
#[derive(clap::Args)]
pub struct OvercommitArgs {
    /// VMs in the fleet.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Guest RAM per VM.
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    mem: u64,
    /// The budget.
    #[arg(long, value_parser = parse_size, default_value = "1152M")]
    budget: u64,
    /// Working set per VM at its low and high phases.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    low: u64,
    /// See --low.
    #[arg(long, value_parser = parse_size, default_value = "320M")]
    high: u64,
    /// Seconds of a working-set cycle.
    #[arg(long, default_value_t = 40.0)]
    period: f64,
    /// Seconds of each ramp between low and high (the guests must be able to fill that fast:
    /// first touches are page faults, costly where guest memory is shadowed).
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// Seconds per policy.
    #[arg(long, default_value_t = 80.0)]
    duration: f64,
    /// Seconds between samples and governor rounds.
    #[arg(long, default_value_t = 0.5)]
    interval: f64,
    /// Most cache each guest keeps of pages it stopped using before it reports them free
    /// (default: its RAM, so only the balloon takes them back).
    #[arg(long, value_parser = parse_size)]
    phase_cache: Option<u64>,
    /// Also run no policy and the governor with the budget as the limit of a memory cgroup the
    /// fleet runs in (created under /sys/fs/cgroup/memory or /sys/fs/cgroup, removed after):
    /// what the host's OOM killer does without a governor.
    #[arg(long)]
    cgroup_enforce: bool,
    /// Where overcommit.json, overcommit.md and overcommit.svg go.
    #[arg(long, default_value = "target/bench/overcommit")]
    out: PathBuf,
}

/// Runs `zapvm bench overcommit`.
pub fn overcommit(a: OvercommitArgs) -> Result<ExitCode, String> {
    use harness::bench_overcommit::{FleetSpec, OvercommitRequest};
    if a.vms == 0
        || a.low > a.high
        || a.high > a.mem
        || !(a.period > 0.0 && a.duration > 0.0 && a.interval > 0.0)
    {
        return Err(
            "want --vms >= 1, --low <= --high <= --mem, positive --period, --duration, --interval".into()
        );
    }
    let req = OvercommitRequest {
        fleet: FleetSpec {
            vms: a.vms,
            mem: a.mem,
            low: a.low,
            high: a.high,
            period: a.period,
            ramp: a.ramp.min(a.period / 2.0),
            cache: a.phase_cache.unwrap_or(a.mem).min(a.mem),
            stats_interval: a.interval,
        },
        budget: a.budget,
        duration: a.duration,
        interval: a.interval,
        policy: PolicyConfig { budget: a.budget, ..Default::default() },
        cgroup_enforce: a.cgroup_enforce,
    };
    harness::governor::policy::check_config(&req.policy, a.vms)?;
    let zapvm = std::env::current_exe().map_err(|e| format!("cannot find the zapvm binary: {e}"))?;
    let work = std::env::temp_dir().join(format!("zapvm-overcommit-{}", std::process::id()));
    let report = harness::bench_overcommit::run(&zapvm, &req, &work);
    let _ = std::fs::remove_dir_all(&work);
    let report = report?;
    harness::bench_overcommit::write(&report, &a.out)?;
    print!("{}", harness::bench_overcommit::markdown(&report));
    eprintln!("wrote {}/overcommit.{{json,md,svg}}", a.out.display());
    // Every run must be clean but the one without a governor under the cgroup's limit: it is there
    // to show what the host's OOM killer does.
    Ok(if report.policies.iter().all(|p| p.verification_clean || p.policy == "none-cgroup") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
