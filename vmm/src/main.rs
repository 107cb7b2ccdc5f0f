//! The `zapvm` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{self, BootSource, Console, RunReport, VmConfig, VmOutcome};
use vmm::memory::{parse_size, MemoryBackend, MemoryConfig};
use vmm::vstate::vcpu::{pass_name, VcpuOutcome};

#[derive(Parser)]
#[command(
    name = "zapvm",
    version,
    about = "A minimal KVM hypervisor whose memory layer is a secondary MMU done right"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM: the built-in test guest by default, or a Linux kernel.
    Run(RunArgs),
    /// Measure.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Stress the memory layer: the Stress guest verifies its pages while host scenarios
    /// (discards, external chaos, mprotect phases) tear guest RAM down; JSON summary, non-zero
    /// exit on any broken invariant.
    Stress(vmm::stress::StressArgs),
    /// Print the statistics of a running VM: KVM's, the table's, the notifier's, the balloon's.
    Stats {
        /// Process id of the `zapvm run` (default: the only one running).
        #[arg(long)]
        pid: Option<u32>,
        /// The VM's control socket (`zapvm run --api-socket PATH`), instead of --pid.
        #[arg(long, conflicts_with = "pid")]
        api_socket: Option<PathBuf>,
    },
    /// The balloon of a running VM (through its control socket).
    #[command(subcommand)]
    Balloon(BalloonCommand),
    /// The virtio-mem device of a running VM (through its control socket).
    #[command(subcommand)]
    Mem(MemCommand),
    /// Stop every vCPU of a running VM.
    Pause(Target),
    /// Let a paused VM run again.
    Resume(Target),
    /// End a running VM.
    Quit(Target),
}

/// Which running VM a control command talks to.
#[derive(clap::Args)]
struct Target {
    /// Process id of the `zapvm run` (default: the only one with a control socket).
    #[arg(long)]
    pid: Option<u32>,
    /// The VM's control socket (`zapvm run --api-socket PATH`), instead of --pid.
    #[arg(long, conflicts_with = "pid")]
    api_socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BalloonCommand {
    /// Set the balloon's target: how much memory to take from the guest (e.g. 128M, 0).
    Set {
        /// The target size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// The balloon's target, actual size and statistics.
    Stats(Target),
}

#[derive(Subcommand)]
enum MemCommand {
    /// Set virtio-mem's requested size (e.g. 512M).
    Set {
        /// The requested size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// virtio-mem's requested and plugged sizes.
    State(Target),
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    /// Fill every page with a pattern and verify it.
    Verify,
    /// Fill every page, let the host discard ranges through the memory layer, verify zeros
    /// there and the pattern elsewhere.
    DiscardVerify,
    /// Touch one word per page: cold write, warm write, warm read (timed).
    Touch,
    /// Fail an assertion on purpose.
    AssertFail,
    /// Raise a CPU exception on purpose.
    Exception,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Linux kernel (bzImage or vmlinux) to boot instead of the test guest.
    #[arg(long, conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Boot the project's Linux guest: a small kernel and a busybox initramfs whose /init checks
    /// that Linux's virtio drivers bound zapvm's devices and reports the guest's memory and
    /// balloon figures on the console. Built from Debian packages by
    /// resources/linux-guest/build.sh on first use (minutes), then taken from its cache.
    #[arg(long, conflicts_with_all = ["kernel", "guest"])]
    linux: bool,
    /// With --linux: boot the guest's bzImage instead of its vmlinux ELF (slower where guest
    /// ring 0 is emulated: the decompressor runs too).
    #[arg(long, requires = "linux")]
    bzimage: bool,
    /// Kernel command line, with --kernel or --linux (default: serial console and the host's
    /// workarounds).
    #[arg(long)]
    cmdline: Option<String>,
    /// Words to append to the kernel command line, with --kernel or --linux (e.g.
    /// "zapvm.report=5" or "zapvm.exit" for the --linux guest's /init).
    #[arg(long)]
    append: Option<String>,
    /// A test guest ELF to boot instead of the built-in one.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Guest RAM (e.g. 256M, 1G); a multiple of 4 KiB.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Host backing of guest RAM.
    #[arg(long, value_enum, default_value_t = MemoryBackend::Anonymous)]
    mem_backend: MemoryBackend,
    /// Back guest RAM with transparent huge pages (madvise MADV_HUGEPAGE).
    #[arg(long)]
    thp: bool,
    /// Stop the VM after this many seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    timeout: f64,
    /// The test guest's workload.
    #[arg(long, value_enum, default_value_t = WorkloadArg::DiscardVerify)]
    workload: WorkloadArg,
    /// Seed of the test guest's memory pattern.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Run the test guest's workload at CPL 0 (for VMX/SVM hosts; very slow on PVM).
    #[arg(long)]
    cpl0: bool,
    /// The test guest's drivers misbehave on purpose (malformed and out-of-range requests).
    #[arg(long)]
    hostile: bool,
    /// No virtio-balloon device.
    #[arg(long)]
    no_balloon: bool,
    /// The balloon does not offer free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING): the
    /// guest's free memory then stays resident unless it is ballooned.
    #[arg(long, conflicts_with = "no_balloon")]
    no_free_page_reporting: bool,
    /// No ioeventfds: every virtio queue kick exits to the VMM and is processed on the vCPU
    /// thread (the fallback used where the host refuses KVM_IOEVENTFD).
    #[arg(long)]
    no_ioeventfd: bool,
    /// Seconds between the balloon's requests for fresh guest statistics (0: never).
    #[arg(long, default_value_t = 5.0)]
    balloon_stats_interval: f64,
    /// A virtio-mem device with a hot-pluggable region of this size above all RAM (e.g. 1G;
    /// whole 2 MiB blocks).
    #[arg(long, value_parser = parse_size)]
    virtio_mem: Option<u64>,
    /// How much of the virtio-mem region the guest should plug at boot.
    #[arg(long, value_parser = parse_size, default_value = "0", requires = "virtio_mem")]
    virtio_mem_requested: u64,
    /// Serve the control API on this Unix socket (default: zapvm-<pid>.sock in
    /// $XDG_RUNTIME_DIR or the temporary directory).
    #[arg(long, conflicts_with = "no_api")]
    api_socket: Option<PathBuf>,
    /// No control socket.
    #[arg(long)]
    no_api: bool,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Do not watch guest RAM with the userfaultfd monitor (teardowns by code outside the VMM
    /// then go unseen by the memory layer).
    #[arg(long)]
    no_monitor: bool,
    /// What to do when code outside the VMM unmaps or moves guest RAM: re-back it with zeroed
    /// memory and continue, or stop the VM.
    #[arg(long, value_enum, default_value_t = vmm::teardown::TeardownPolicy::Reback)]
    on_external_unmap: vmm::teardown::TeardownPolicy,
    /// Seal guest RAM with mseal(2): the kernel then refuses every munmap, mremap, mprotect and
    /// mmap(MAP_FIXED) over it by any code in the process, so nothing can tear it down or map
    /// something else into it. Discards (balloon, free page reporting, virtio-mem) still work;
    /// the VMM's own unmap, remap and protect operations are refused.
    #[arg(long)]
    seal_guest_ram: bool,
    /// Print the run report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    metrics: vmm::metrics::cli::MetricsArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cost of invalidation through the notifier versus the raw syscalls, and of the
    /// userfaultfd monitor for external operations.
    Notifier {
        /// The full sizes (up to 1 GiB) and more rounds; the default is a quick run.
        #[arg(long)]
        full: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// virtio-balloon inflate and deflate throughput versus raw madvise of the same pages
    /// (host-side, no VM).
    Balloon {
        /// 1 GiB of guest RAM and more rounds; the default is a quick run (128 MiB).
        #[arg(long)]
        full: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// The guest's memory touch rate while the host discards guest RAM at chosen rates and
    /// range sizes, against the unpressured rate in the same run (JSON, markdown, SVG plot).
    Pressure(vmm::bench_pressure::PressureArgs),
    /// VMM start to first guest instruction, and guest touch cost per page.
    Boot {
        /// Fresh VMs per configuration.
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Guest RAM per VM.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        mem: u64,
        /// Write the results as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// The KVM device.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZAPVM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = vmm::stats::install_signal_handler() {
        eprintln!("zapvm: warning: no SIGUSR1 handler, `zapvm stats` will not work: {e}");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Bench(BenchCommand::Notifier { full, json_out }) => bench_notifier(full, json_out),
        Command::Bench(BenchCommand::Balloon { full, json_out }) => bench_balloon(full, json_out),
        Command::Stats { api_socket: Some(socket), .. } => {
            vmm::client::socket_at(&socket).and_then(|s| control_at(&s, vmm::api::Op::Stats))
        }
        Command::Stats { pid, api_socket: None } => stats(pid),
        Command::Balloon(BalloonCommand::Set { size, target }) => {
            control(target, vmm::api::Op::BalloonSet(vmm::api::SizeArg::size(size)))
        }
        Command::Balloon(BalloonCommand::Stats(target)) => control(target, vmm::api::Op::BalloonStats),
        Command::Mem(MemCommand::Set { size, target }) => {
            control(target, vmm::api::Op::MemSet(vmm::api::SizeArg::size(size)))
        }
        Command::Mem(MemCommand::State(target)) => control(target, vmm::api::Op::MemState),
        Command::Pause(target) => control(target, vmm::api::Op::Pause),
        Command::Resume(target) => control(target, vmm::api::Op::Resume),
        Command::Quit(target) => control(target, vmm::api::Op::Quit),
        Command::Stress(args) => vmm::stress::cli(args),
        Command::Bench(BenchCommand::Pressure(args)) => vmm::bench_pressure::cli(args),
        Command::Bench(BenchCommand::Boot { runs, mem, json_out, kvm_device }) => {
            bench_boot(runs, mem, json_out, kvm_device)
        }
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("zapvm: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    if args.kernel.is_none() && !args.linux && (args.cmdline.is_some() || args.append.is_some()) {
        return Err("--cmdline and --append are for a Linux kernel: add --kernel or --linux".into());
    }
    // The default command line, and for the --linux guest hot-plugged memory (virtio-mem) online
    // at once: it has no user space that would online it.
    let cmdline = |linux_guest: bool| {
        let mut line = args.cmdline.clone().unwrap_or_else(|| {
            let mut line = vmm::boot::linux::default_cmdline();
            if linux_guest {
                line.push_str(" memhp_default_state=online");
            }
            line
        });
        if let Some(extra) = &args.append {
            line.push(' ');
            line.push_str(extra);
        }
        line
    };
    let boot = match (args.kernel.clone(), args.linux) {
        (Some(kernel), _) => {
            BootSource::Linux { kernel, initrd: args.initrd.clone(), cmdline: cmdline(false) }
        }
        (None, true) => {
            let guest = vmm::boot::linux_guest::build()?;
            BootSource::Linux {
                kernel: if args.bzimage { guest.bzimage } else { guest.vmlinux },
                initrd: Some(guest.initramfs),
                cmdline: cmdline(true),
            }
        }
        (None, false) => BootSource::TestGuest {
            elf: args.guest,
            params: TestGuestParams {
                workload: match args.workload {
                    WorkloadArg::Verify => Workload::Verify,
                    WorkloadArg::DiscardVerify => Workload::DiscardVerify,
                    WorkloadArg::Touch => Workload::Touch,
                    WorkloadArg::AssertFail => Workload::AssertFail,
                    WorkloadArg::Exception => Workload::Exception,
                },
                seed: args.seed,
                cpl0: args.cpl0,
                hostile: args.hostile,
                extra_flags: 0,
            },
        },
    };
    if !(args.timeout >= 0.0 && args.timeout.is_finite()) {
        return Err(format!("--timeout {} is not a number of seconds", args.timeout));
    }
    let config = VmConfig {
        kvm_device: args.kvm_device,
        memory: MemoryConfig { size: args.mem, backend: args.mem_backend, thp: args.thp },
        vcpus: args.vcpus,
        boot,
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        console: Console::Terminal,
        monitor: !args.no_monitor,
        teardown_policy: args.on_external_unmap,
        seal_guest_ram: args.seal_guest_ram,
        plant_skip_mseal: false,
        after_start: None,
        balloon: (!args.no_balloon).then(|| vmm::devices::virtio::balloon::BalloonConfig {
            free_page_reporting: !args.no_free_page_reporting,
            ..Default::default()
        }),
        balloon_stats_interval: (args.balloon_stats_interval > 0.0
            && args.balloon_stats_interval.is_finite())
        .then(|| Duration::from_secs_f64(args.balloon_stats_interval)),
        virtio_mem: args.virtio_mem.map(|region_size| vmm::machine::VirtioMemSpec {
            region_size,
            requested_size: args.virtio_mem_requested,
        }),
        ioeventfd: !args.no_ioeventfd,
        metrics: args.metrics.exporter(&std::process::id().to_string())?,
        api_socket: if args.no_api {
            None
        } else {
            Some(args.api_socket.unwrap_or_else(|| vmm::api::default_socket_path(std::process::id())))
        },
    };
    let report = machine::run(&config).map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        print_summary(&config, &report);
    }
    Ok(if report.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_summary(config: &VmConfig, report: &RunReport) {
    let mem = config.memory;
    println!(
        "zapvm: {} MiB {:?}{} RAM, {} vCPU(s); {}",
        mem.size >> 20,
        mem.backend,
        if mem.thp {
            if report.thp_aligned {
                " THP"
            } else {
                " THP (mapping not 2 MiB aligned!)"
            }
        } else {
            ""
        },
        config.vcpus,
        report.boot
    );
    for v in &report.vcpus {
        let khz = v.tsc_khz.unwrap_or(0) as f64;
        let timings: Vec<String> = v
            .timings
            .iter()
            .map(|t| {
                let ms = if khz > 0.0 { t.cycles as f64 / khz } else { f64::NAN };
                format!("{} {:.1} ms", pass_name(t.pass), ms)
            })
            .collect();
        let first =
            v.first_exit_us.map(|us| format!(", first exit {:.2} ms after VMM start", us as f64 / 1000.0));
        match &v.outcome {
            VcpuOutcome::Done { pages, checksum } => println!(
                "zapvm: vCPU {}: verified {pages} pages ({} MiB), checksum {checksum:#018x}{}; {}",
                v.index,
                pages * 4096 >> 20,
                first.unwrap_or_default(),
                timings.join(", ")
            ),
            other => println!("zapvm: vCPU {}: {:?}", v.index, other),
        }
    }
    if let Some(check) = &report.host_check {
        println!(
            "zapvm: host check: read back {} pages through the VMM's own table, {} differ from what the guest wrote",
            check.pages, check.bad_pages
        );
    }
    print_memory_layer(&report.memory_layer);
    if let Some(counts) = report.pvm_quirks.filter(|c| !c.is_empty()) {
        let done: Vec<String> = vmm::pvm::quirk_table(&counts)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} x{n}"))
            .collect();
        println!("zapvm: PVM host: completed for its instruction emulator: {}", done.join(", "));
    }
    match &report.outcome {
        VmOutcome::Success => {
            println!("zapvm: success in {:.1} ms", report.wall_us as f64 / 1000.0)
        }
        VmOutcome::Reset => println!("zapvm: the guest reset the machine"),
        VmOutcome::Quit => println!("zapvm: stopped on request"),
        VmOutcome::Failed { message } => eprintln!("zapvm: failed: {message}"),
        VmOutcome::TimedOut { seconds } => eprintln!("zapvm: timed out after {seconds} s"),
    }
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
    let opts = vmm::bench::BootBenchOptions { runs, mem, kvm_device };
    let rows = vmm::bench::boot(&opts, &mut |line| eprintln!("{line}"))?;
    print!("{}", vmm::bench::boot_table(&rows));
    if let Some(path) = json_out {
        let json = serde_json::to_string_pretty(&rows).expect("rows serialise");
        std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_notifier(full: bool, json_out: Option<PathBuf>) -> Result<ExitCode, String> {
    let opts =
        if full { notifier::bench::BenchOptions::full() } else { notifier::bench::BenchOptions::quick() };
    let report = notifier::bench::run(&opts, &mut |line| eprintln!("{line}"));
    print!("{}", report.to_markdown_table());
    if let Some(path) = json_out {
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_balloon(full: bool, json_out: Option<PathBuf>) -> Result<ExitCode, String> {
    use vmm::bench_balloon::{run, BalloonBenchOptions};
    let opts = if full { BalloonBenchOptions::full() } else { BalloonBenchOptions::quick() };
    let report = run(&opts, &mut |line| eprintln!("{line}"))?;
    print!("{}", report.to_markdown_table());
    if let Some(path) = json_out {
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_memory_layer(layer: &vmm::machine::MemoryLayerReport) {
    let size = |b: u64| if b >= 1 << 20 { format!("{} MiB", b >> 20) } else { format!("{} KiB", b >> 10) };
    for d in &layer.discards {
        let widened = (d.notified.1 - d.notified.0) as u64 != d.len;
        let kvm: Vec<String> = d.kvm_delta.iter().map(|(k, v)| format!("{k} {v:+}")).collect();
        println!(
            "zapvm: discard vCPU {} [{:#x}, +{}): notified as {}{}; device path read {} before, {} after; KVM: {}",
            d.vcpu,
            d.gpa,
            size(d.len),
            size((d.notified.1 - d.notified.0) as u64),
            if widened { " (whole huge pages)" } else { "" },
            if d.device_read_pattern_before { "the guest's data" } else { "OTHER DATA" },
            if d.device_read_zeros { "zeros" } else { "NOT ZEROS" },
            if kvm.is_empty() { "no change".to_string() } else { kvm.join(", ") }
        );
    }
    let t = &layer.table;
    println!(
        "zapvm: memory layer: table {} hits / {} misses, installed {} x 4 KiB + {} x 2 MiB, {} retries, torn down {}; notifier {} starts / {} ends; uffd monitor {}",
        t.hits,
        t.misses,
        t.installs_4k,
        t.installs_2m,
        t.retries,
        t.torn_down.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{n} by {k}")).collect::<Vec<_>>().join(", "),
        layer.notifier.kinds.iter().map(|k| k.starts).sum::<u64>(),
        layer.notifier.kinds.iter().map(|k| k.ends).sum::<u64>(),
        if layer.monitor { "on" } else { "off" },
    );
}

/// Sends `op` to the control socket `--api-socket` names, or that of VM `--pid` (or the only
/// one), and prints the result.
fn control(target: Target, op: vmm::api::Op) -> Result<ExitCode, String> {
    let socket = match target.api_socket {
        Some(path) => vmm::client::socket_at(&path)?,
        None => vmm::api::find_socket(target.pid).map_err(|e| e.to_string())?,
    };
    control_at(&socket, op)
}

fn stats(pid: Option<u32>) -> Result<ExitCode, String> {
    // The control socket when the VM has one; SIGUSR1 otherwise (`zapvm run --no-api`).
    if let Ok(socket) = vmm::api::find_socket(pid) {
        return control_at(&socket, vmm::api::Op::Stats);
    }
    let pid = match pid {
        Some(pid) => pid,
        None => match vmm::stats::running_vms().as_slice() {
            [pid] => *pid,
            [] => return Err("no running `zapvm run` found; name one with --pid".into()),
            many => return Err(format!("several VMs run ({many:?}); choose one with --pid")),
        },
    };
    let json = vmm::stats::request(pid, Duration::from_secs(5))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("bad statistics file: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&value).expect("value serialises"));
    Ok(ExitCode::SUCCESS)
}

fn control_at(socket: &std::path::Path, op: vmm::api::Op) -> Result<ExitCode, String> {
    let result = vmm::api::call(socket, op).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&result).expect("value serialises"));
    Ok(ExitCode::SUCCESS)
}
