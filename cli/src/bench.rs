//! `zapvm bench ...`: the benchmarks' arguments; the measurements are the harness's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use harness::bench_pressure::{PressureBacking, PressureRequest};
use vmm::memory::parse_size;

use crate::values::PressureBackingArg;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Cost of invalidation through the notifier versus the raw syscalls, and of the
    /// userfaultfd monitor for external operations.
    Notifier {
        /// The full sizes (up to 1 GiB) and more rounds; the default is a quick run.
        #[arg(long)]
        full: bool,
        /// Write the results as JSON here (and their flat export beside it, NAME.flat.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// virtio-balloon inflate and deflate throughput versus raw madvise of the same pages
    /// (host-side, no VM).
    Balloon {
        /// 1 GiB of guest RAM and more rounds; the default is a quick run (128 MiB).
        #[arg(long)]
        full: bool,
        /// Write the results as JSON here (and their flat export beside it, NAME.flat.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// The guest's memory touch rate while the host discards guest RAM at chosen rates and
    /// range sizes, against the unpressured rate in the same run (JSON, markdown, SVG plot).
    Pressure(PressureArgs),
    /// A device-path access to guest RAM through the VMM's table (hit path, fault-tolerant
    /// copy) versus memcpy and versus process_vm_readv/writev, 16 B to 4 KiB, with system calls
    /// counted; and two readers with a concurrent invalidator (JSON, markdown, SVG plot).
    Access {
        /// More chunks and longer contention phases (about a minute); the default is a quick run.
        #[arg(long)]
        full: bool,
        /// Chunks per variant (overrides --full's and the quick run's).
        #[arg(long)]
        rounds: Option<usize>,
        /// Directory for access.json (and access.flat.json), access.md, access.svg and access.csv.
        #[arg(long, default_value = "target/bench/access")]
        out: PathBuf,
    },
    /// The guest-visible cost of a virtio queue kick with and without ioeventfds, against one
    /// exit to the VMM measured in the same VMs (JSON, markdown, SVG plot).
    Kick {
        /// 9 VMs per variant; the default is a quick run (3).
        #[arg(long)]
        full: bool,
        /// VMs per variant (overrides --full's and the quick run's).
        #[arg(long)]
        runs: Option<usize>,
        /// Directory for kick.json (and kick.flat.json), kick.md, kick.svg and kick.csv.
        #[arg(long, default_value = "target/bench/kick")]
        out: PathBuf,
        /// The KVM device.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
    },
    /// A fleet of phased VMs whose RAM exceeds a memory budget, under no policy, a static
    /// split and the governor (JSON, markdown, SVG plot).
    Overcommit(crate::governor::OvercommitArgs),
    /// VMM start to first guest instruction, and guest touch cost per page.
    Boot {
        /// Fresh VMs per configuration.
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Guest RAM per VM.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        mem: u64,
        /// Write the results as JSON here (and their flat export beside it, NAME.flat.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// The KVM device.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
    },
}

/// `zapvm bench pressure` on the command line.
#[derive(clap::Args, Debug)]
pub struct PressureArgs {
    /// Ranges up to 1 GiB with 1280 MiB of guest RAM, 0.6 s slices, 5 reps (several minutes);
    /// the default is a quick run (256 MiB, ranges up to 2 MiB).
    #[arg(long)]
    pub full: bool,
    /// Guest RAM (e.g. 256M, 1280M; a 1G range needs more than 1 GiB).
    #[arg(long, value_parser = vmm::memory::parse_size)]
    pub mem: Option<u64>,
    /// Range sizes, comma separated (e.g. 4K,64K,2M,64M,1G).
    #[arg(long, value_delimiter = ',', value_parser = vmm::memory::parse_size)]
    pub ranges: Option<Vec<u64>>,
    /// Pressure rates in MiB/s, comma separated (e.g. 64,256,1024).
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<f64>>,
    /// Host backings, comma separated (4k, thp).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub backings: Option<Vec<PressureBackingArg>>,
    /// Length of an unpressured slice and least length of a pressured one (e.g. 400ms, 1s).
    #[arg(long, value_parser = harness::stress::parse_duration)]
    pub slice: Option<Duration>,
    /// Unpressured/pressured slice pairs per point.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Skip the per-page versus range comparison.
    #[arg(long)]
    pub no_per_page: bool,
    /// Do not register guest RAM with the userfaultfd monitor (`zapvm run` does).
    #[arg(long)]
    pub no_monitor: bool,
    /// Seed of the range picks.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Measure nothing: read a pressure.json this command wrote and write its table and plot
    /// again (e.g. into another --out).
    #[arg(long)]
    pub from_json: Option<PathBuf>,
    /// Where pressure.json (and pressure.flat.json), pressure.md, pressure.svg and pressure.csv go.
    #[arg(long, default_value = "target/bench/pressure")]
    pub out: PathBuf,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
}

impl From<PressureArgs> for PressureRequest {
    fn from(a: PressureArgs) -> Self {
        PressureRequest {
            full: a.full,
            mem: a.mem,
            ranges: a.ranges,
            rates: a.rates,
            backings: a.backings.map(|b| b.into_iter().map(PressureBacking::from).collect()),
            slice: a.slice,
            reps: a.reps,
            no_per_page: a.no_per_page,
            no_monitor: a.no_monitor,
            seed: a.seed,
            from_json: a.from_json,
            out: a.out,
            kvm_device: a.kvm_device,
        }
    }
}

/// Runs `zapvm bench <what>`.
pub fn bench(command: BenchCommand) -> Result<ExitCode, String> {
    match command {
        BenchCommand::Notifier { full, json_out } => bench_notifier(full, json_out),
        BenchCommand::Balloon { full, json_out } => bench_balloon(full, json_out),
        BenchCommand::Pressure(args) => harness::bench_pressure::cli(args.into()),
        BenchCommand::Access { full, rounds, out } => {
            use harness::bench_access::AccessBenchOptions;
            let base = if full { AccessBenchOptions::full() } else { AccessBenchOptions::quick() };
            harness::bench_access::cli(
                &AccessBenchOptions { rounds: rounds.unwrap_or(base.rounds), ..base },
                &out,
            )
        }
        BenchCommand::Kick { full, runs, out, kvm_device } => {
            use harness::bench_kick::KickBenchOptions;
            let base = if full { KickBenchOptions::full() } else { KickBenchOptions::quick() };
            harness::bench_kick::cli(&KickBenchOptions { runs: runs.unwrap_or(base.runs), kvm_device }, &out)
        }
        BenchCommand::Overcommit(args) => crate::governor::overcommit(args),
        BenchCommand::Boot { runs, mem, json_out, kvm_device } => bench_boot(runs, mem, json_out, kvm_device),
    }
}

/// Writes `report` as pretty JSON to `json_out` when one was given (`--json-out`), and its flat
/// export beside it (`NAME.flat.json`, see [`harness::bench_export`]), figures named after `bench`.
fn write_json(
    bench: &str,
    json_out: Option<PathBuf>,
    report: &impl serde::Serialize,
) -> Result<ExitCode, String> {
    if let Some(path) = json_out {
        for written in harness::bench_export::write_json_report(bench, &path, report)? {
            eprintln!("wrote {}", written.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_boot(
    runs: usize,
    mem: u64,
    json_out: Option<PathBuf>,
    kvm_device: PathBuf,
) -> Result<ExitCode, String> {
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let opts = harness::bench::BootBenchOptions { runs, mem, kvm_device };
    let rows = harness::bench::boot(&opts, &mut |line| eprintln!("{line}"))?;
    print!("{}", harness::bench::boot_table(&rows));
    write_json("boot", json_out, &rows)
}

fn bench_notifier(full: bool, json_out: Option<PathBuf>) -> Result<ExitCode, String> {
    let opts = if full {
        harness::bench_notifier::BenchOptions::full()
    } else {
        harness::bench_notifier::BenchOptions::quick()
    };
    let report = harness::bench_notifier::run(&opts, &mut |line| eprintln!("{line}"));
    print!("{}", report.to_markdown_table());
    write_json("notifier", json_out, &report)
}

fn bench_balloon(full: bool, json_out: Option<PathBuf>) -> Result<ExitCode, String> {
    use harness::bench_balloon::{run, BalloonBenchOptions};
    let opts = if full { BalloonBenchOptions::full() } else { BalloonBenchOptions::quick() };
    let report = run(&opts, &mut |line| eprintln!("{line}"))?;
    print!("{}", report.to_markdown_table());
    write_json("balloon", json_out, &report)
}
