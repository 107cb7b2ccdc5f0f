//! The command line's side of `zapvm stress`: what it asked for ([`StressRequest`]), the defaults
//! it applies, [`parse_duration`] for its durations, and [`cli`], which runs and prints the report.

use std::path::PathBuf;
use std::time::Duration;

use vmm::memory::MemoryBackend;

use super::{run, StressOptions, Work};

/// What `zapvm stress` was asked for on the command line, before [`cli`] applies the defaults
/// (a fixed amount of work when neither a duration nor a work goal is given). The `zapvm`
/// command's arguments convert to it; each field is the option of the same name.
#[derive(Clone, Debug)]
pub struct StressRequest {
    /// Verifier vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// THP for guest RAM.
    pub thp: bool,
    /// Host backing of guest RAM.
    pub mem_backend: MemoryBackend,
    /// How long the scenarios run; with a work goal, the deadline for it.
    pub duration: Option<Duration>,
    /// Passes every verifier completes.
    pub passes: Option<u64>,
    /// Targets each device storm reaches.
    pub targets: Option<u64>,
    /// Operations each host scenario does.
    pub ops: Option<u64>,
    /// Seed of the guest's pattern and of every scenario's RNG.
    pub seed: u64,
    /// Discard storm through the notifier.
    pub discard: bool,
    /// Largest discard range in bytes.
    pub discard_max: u64,
    /// External madvise/munmap/mremap chaos.
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    pub mprotect: bool,
    /// Balloon storm.
    pub balloon: bool,
    /// virtio-mem plug/unplug storm.
    pub virtio_mem: bool,
    /// Bytes of the virtio-mem device's hot-pluggable region.
    pub virtio_mem_region: u64,
    /// Every scenario at once (also when no scenario is named).
    pub all: bool,
    /// Seal guest RAM with `mseal(2)`.
    pub seal_guest_ram: bool,
    /// Where the JSON summary goes instead of standard output.
    pub json_out: Option<PathBuf>,
    /// The KVM device.
    pub kvm_device: PathBuf,
}

/// What `zapvm stress` does when given neither `--duration` nor a work goal.
const DEFAULT_WORK: Work = Work { passes: 2, targets: 3, ops: 5 };
/// How long `zapvm stress` runs without a work goal.
pub(super) const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The deadline of `zapvm stress --passes/--targets/--ops` unless `--duration` says otherwise.
const DEFAULT_WORK_DEADLINE: Duration = Duration::from_secs(600);

/// Parses `10s`, `2m`, `500ms`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs `zapvm stress`: the JSON summary goes to standard output (or `--json-out`); the exit
/// status is non-zero when an invariant broke, and `Err` when nothing could run.
pub fn cli(args: StressRequest) -> Result<std::process::ExitCode, String> {
    let asked = args.passes.is_some() || args.targets.is_some() || args.ops.is_some();
    let work = if asked {
        Some(Work {
            passes: args.passes.unwrap_or(0),
            targets: args.targets.unwrap_or(0),
            ops: args.ops.unwrap_or(0),
        })
    } else if args.duration.is_none() {
        // Neither a time nor an amount of work: a fixed amount of work, so that a slow host runs
        // longer instead of reporting starved verifiers.
        Some(DEFAULT_WORK)
    } else {
        None
    };
    let default_duration = if work.is_some() { DEFAULT_WORK_DEADLINE } else { DEFAULT_DURATION };
    let mut opts = StressOptions {
        kvm_device: args.kvm_device,
        vcpus: args.vcpus,
        mem: args.mem,
        thp: args.thp,
        backend: args.mem_backend,
        duration: args.duration.unwrap_or(default_duration),
        work,
        seed: args.seed,
        discard: args.discard,
        seal_guest_ram: args.seal_guest_ram,
        external_chaos: args.external_chaos,
        mprotect: args.mprotect,
        balloon: args.balloon,
        virtio_mem: args.virtio_mem,
        virtio_mem_region: args.virtio_mem_region,
        discard_max: args.discard_max as usize,
        progress: true,
        ..StressOptions::new()
    };
    // No scenario named: every scenario (what a user who types `zapvm stress` wants to see).
    let named = args.discard || args.external_chaos || args.mprotect || args.balloon || args.virtio_mem;
    if args.all || !named {
        opts = opts.all();
    }
    let report = run(&opts)?;
    for note in &report.notes {
        eprintln!("zapvm: note: {note}");
    }
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    match &args.json_out {
        Some(path) => {
            std::fs::write(path, json + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?
        }
        None => println!("{json}"),
    }
    for b in &report.broken {
        eprintln!("zapvm: broken invariant: {b}");
    }
    Ok(if report.ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}
