//! `zapvm stress`: its arguments; the run and its judge are the harness's.

use std::path::PathBuf;
use std::time::Duration;

use std::process::ExitCode;

use harness::stress::StressRequest;
use harness::stress_linux::LinuxStressOptions;
use vmm::memory::parse_size;

use crate::values::MemoryBackendArg;

/// `zapvm stress` on the command line.
#[derive(clap::Args, Debug)]
pub struct StressArgs {
    /// vCPUs running the stress verifier (--balloon and --virtio-mem each add a vCPU that drives
    /// the device).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Back guest RAM with transparent huge pages.
    #[arg(long)]
    pub thp: bool,
    /// Host backing of guest RAM.
    #[arg(long, value_enum, default_value_t = MemoryBackendArg::Anonymous)]
    pub mem_backend: MemoryBackendArg,
    /// How long the scenarios run (e.g. 10s, 2m, 500ms; plain numbers are seconds). Without it
    /// and without --passes/--targets/--ops the run does a fixed amount of work (2 passes, 3
    /// targets, 5 ops). With --passes, --targets or --ops: the deadline for that work (default
    /// 10m), which only catches a hang.
    #[arg(long, value_parser = harness::stress::parse_duration)]
    pub duration: Option<Duration>,
    /// Run until every verifier vCPU completed this many passes over its slice (and the other
    /// work asked for is done).
    #[arg(long)]
    pub passes: Option<u64>,
    /// Run until the guest's driver reached this many targets in each device storm (--balloon,
    /// --virtio-mem).
    #[arg(long)]
    pub targets: Option<u64>,
    /// Run until each host scenario did this many operations (discards, external blows,
    /// read-only phases, device-path reads).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Seed of the guest's pattern and of every scenario's RNG (a run is reproducible from it).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Discard storm through the notifier.
    #[arg(long)]
    pub discard: bool,
    /// Largest discard range (default 2M; 4K gives the highest invalidation rate).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub discard_max: u64,
    /// madvise/munmap/mremap of guest RAM behind the VMM's back.
    #[arg(long)]
    pub external_chaos: bool,
    /// Read-only / read-write phases through the notifier.
    #[arg(long)]
    pub mprotect: bool,
    /// Balloon storm: random targets up and down, each followed and verified by the guest's
    /// balloon driver (not on hugetlb RAM).
    #[arg(long)]
    pub balloon: bool,
    /// virtio-mem plug/unplug storm: random requested sizes up and down, each followed and
    /// verified by the guest's virtio-mem driver (with --linux: by Linux's virtio_mem; the
    /// region then in whole 128 MiB blocks).
    #[arg(long)]
    pub virtio_mem: bool,
    /// Size of the virtio-mem device's hot-pluggable region (whole 2 MiB blocks).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub virtio_mem_region: u64,
    /// Every scenario at once (also what a run that names no scenario does).
    #[arg(long)]
    pub all: bool,
    /// Seal guest RAM with mseal(2): the external chaos's munmap, mremap, mprotect and
    /// mmap(MAP_FIXED) blows must then all be refused (EPERM) while its madvise blows still
    /// discard; the mprotect phases are not run (the VMM cannot re-protect sealed memory).
    #[arg(long)]
    pub seal_guest_ram: bool,
    /// Write the JSON summary here instead of standard output.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Linux under a balloon storm instead of the test guest: the project's Linux guest with
    /// free page reporting and deflate-on-OOM, memtester and seedcheck checking its memory,
    /// seeded random balloon targets (--targets, default 12, and then until free page reporting
    /// reported during the storm; --duration, default 60s, at the latest) followed by Linux's
    /// virtio_balloon; with --virtio-mem also random virtio-mem requested sizes (before one
    /// target in two) followed by Linux's virtio_mem.
    #[arg(long, conflicts_with_all = ["discard", "external_chaos", "mprotect", "balloon", "all",
        "seal_guest_ram", "thp", "passes", "ops"])]
    pub linux: bool,
    /// With --linux: MiB memtester tests per run (0: none).
    #[arg(long, default_value_t = 4, requires = "linux")]
    pub memtest_mib: u64,
    /// With --linux: MiB of seeded data seedcheck keeps and re-verifies (0: none).
    #[arg(long, default_value_t = 4, requires = "linux")]
    pub seedcheck_mib: u64,
    /// With --linux: MiB churn allocates and frees per round, so that free page reporting
    /// reports (0: none; the run then does not require reports).
    #[arg(long, default_value_t = 16, requires = "linux")]
    pub churn_mib: u64,
    /// With --linux: the largest reachable balloon target (e.g. 16M; default: all the guest can
    /// give beside the checkers and some headroom). Targets toward OOM ignore it.
    #[arg(long, value_parser = parse_size, requires = "linux")]
    pub max_target: Option<u64>,
    /// With --linux: how long the driver gets to reach one target (e.g. 60s); a target toward
    /// OOM, which the driver cannot reach, ends there.
    #[arg(long, value_parser = harness::stress::parse_duration, requires = "linux")]
    pub step_wait: Option<Duration>,
    /// With --linux: set no targets toward OOM (no deflate-on-OOM).
    #[arg(long, requires = "linux")]
    pub no_oom_targets: bool,
    /// With --linux: also draw the storm (targets and what the drivers reached, over time) as
    /// an SVG file here.
    #[arg(long, requires = "linux")]
    pub plot_out: Option<PathBuf>,
    /// With --linux: one target in this many goes toward OOM (each costs the driver inflating
    /// all the guest's free memory: minutes on a large guest where guest ring 0 is emulated).
    #[arg(long, default_value_t = 4, requires = "linux", conflicts_with = "no_oom_targets")]
    pub oom_one_in: u64,
}

/// Runs `zapvm stress`: the test guest's scenarios, or with `--linux` the Linux storm.
pub fn stress(args: StressArgs) -> Result<ExitCode, String> {
    if !args.linux {
        return harness::stress::cli(args.into());
    }
    let defaults = LinuxStressOptions::new();
    let opts = LinuxStressOptions {
        kvm_device: args.kvm_device.clone(),
        mem: args.mem,
        targets: args.targets.unwrap_or(defaults.targets),
        duration: args.duration.unwrap_or(defaults.duration),
        seed: args.seed,
        memtest_mib: args.memtest_mib,
        seedcheck_mib: args.seedcheck_mib,
        churn_mib: args.churn_mib,
        max_target: args.max_target,
        step_wait: args.step_wait.unwrap_or(defaults.step_wait),
        oom_targets: !args.no_oom_targets,
        oom_one_in: args.oom_one_in,
        virtio_mem_region: args.virtio_mem.then_some(args.virtio_mem_region),
        progress: true,
        ..defaults
    };
    let report = harness::stress_linux::run(&opts)?;
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    match &args.json_out {
        Some(path) => {
            std::fs::write(path, json + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?
        }
        None => println!("{json}"),
    }
    if let Some(path) = &args.plot_out {
        harness::stress_linux_plot::svg(&report, path)?;
    }
    for b in &report.broken {
        eprintln!("zapvm: broken invariant: {b}");
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

impl From<StressArgs> for StressRequest {
    fn from(a: StressArgs) -> Self {
        StressRequest {
            vcpus: a.vcpus,
            mem: a.mem,
            thp: a.thp,
            mem_backend: a.mem_backend.into(),
            duration: a.duration,
            passes: a.passes,
            targets: a.targets,
            ops: a.ops,
            seed: a.seed,
            discard: a.discard,
            discard_max: a.discard_max,
            external_chaos: a.external_chaos,
            mprotect: a.mprotect,
            balloon: a.balloon,
            virtio_mem: a.virtio_mem,
            virtio_mem_region: a.virtio_mem_region,
            all: a.all,
            seal_guest_ram: a.seal_guest_ram,
            json_out: a.json_out,
            kvm_device: a.kvm_device,
        }
    }
}
