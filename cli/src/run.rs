//! `zapvm run`: its arguments, the VM configuration they make, and the run's summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use guest_abi::Workload;
use vmm::boot::test_guest::TestGuestParams;
use vmm::machine::{self, BootSource, Console, RunReport, VmConfig, VmOutcome};
use vmm::memory::{parse_size, MemoryConfig};
use vmm::vstate::vcpu::{pass_name, VcpuOutcome};

use crate::values::{MemoryBackendArg, TeardownPolicyArg};

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
    /// Run until told to quit: the stress verifier keeps checking its pages on --vcpus vCPUs,
    /// and one more vCPU each runs the test guest's balloon driver and (with --virtio-mem) its
    /// virtio-mem driver, following the targets set through the control socket (`zapvm balloon
    /// set`, `zapvm mem set`, QMP). With --hostile the drivers also send malformed requests.
    Serve,
    /// Run until told to quit: a working set that grows and shrinks between --phase-low and
    /// --phase-high over --phase-period (verified pass after pass, pages it stops using kept as
    /// cache up to --phase-cache then reported free), with the balloon driver inflating from free
    /// pages first; the guest's working set and stall time reach the host through the balloon's
    /// statistics (`zapvm balloon stats`). What `zapvm governor` and `zapvm bench overcommit` run.
    Phased,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Take the VM's settings from this JSON or TOML file (by its extension): its keys are these
    /// options' names (`mem = "1G"`, `vcpus = 2`, `virtio-mem = "256M"`, `thp = true`); an
    /// option typed on the command line overrides the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    #[arg(long, value_enum, default_value_t = MemoryBackendArg::Anonymous)]
    mem_backend: MemoryBackendArg,
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
    /// The test guest's drivers misbehave on purpose (malformed and out-of-range requests):
    /// only with --workload serve, the workload that runs them.
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
    /// Fault all guest RAM in before the guest starts (as QEMU's -mem-prealloc): the host commits
    /// it now and the guest never waits on a first touch; only the balloon, free page reporting
    /// or virtio-mem give memory back.
    #[arg(long)]
    prealloc: bool,
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
    /// Where the guest's serial console goes: `stdio` (this terminal, keys typed into the
    /// guest too), `file=PATH` (created or truncated), or `null`.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: Console,
    /// Name the VM: its default control socket is zapvm-<NAME>.sock (clients reach it with
    /// `--id NAME`), its metrics are labelled vm="NAME", its log lines carry it. Letters,
    /// digits, '-', '.', '_', starting with a letter.
    #[arg(long, value_parser = parse_vm_id)]
    id: Option<String>,
    /// Serve the control socket (QMP) on this Unix socket (default: zapvm-<pid>.sock, or
    /// zapvm-<id>.sock with --id, in $XDG_RUNTIME_DIR or the temporary directory).
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
    #[arg(long, value_enum, default_value_t = TeardownPolicyArg::Reback)]
    on_external_unmap: TeardownPolicyArg,
    /// Seal guest RAM with mseal(2): the kernel then refuses every munmap, mremap, mprotect and
    /// mmap(MAP_FIXED) over it by any code in the process, so nothing can tear it down or map
    /// something else into it. Discards (balloon, free page reporting, virtio-mem) still work;
    /// the VMM's own unmap, remap and protect operations are refused.
    #[arg(long)]
    seal_guest_ram: bool,
    /// The balloon does not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: a phased guest whose working
    /// set wants pages the balloon holds then stalls until the host lowers the target.
    #[arg(long, conflicts_with = "no_balloon")]
    no_deflate_on_oom: bool,
    #[command(flatten)]
    phase: PhaseArgs,
    /// Print the run report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

/// Runs `zapvm run`: the summary (or the JSON report) on standard output; the exit status is
/// non-zero when the run did not succeed, and `Err` when the VM could not start.
pub fn run(args: RunArgs) -> Result<ExitCode, String> {
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
    let serve = matches!(args.workload, WorkloadArg::Serve) && args.kernel.is_none() && !args.linux;
    if args.hostile && !serve {
        return Err(
            "--hostile makes the test guest's device drivers misbehave: only --workload serve runs them"
                .into(),
        );
    }
    if matches!(args.workload, WorkloadArg::Phased) && args.no_balloon {
        return Err("--workload phased drives the balloon: drop --no-balloon".into());
    }
    if serve && args.no_balloon && args.virtio_mem.is_none() {
        return Err(
            "--workload serve drives the balloon and virtio-mem: with --no-balloon, give --virtio-mem".into(),
        );
    }
    let drivers = if serve { u32::from(!args.no_balloon) + u32::from(args.virtio_mem.is_some()) } else { 0 };
    let vm_name = args.id.clone().unwrap_or_else(|| std::process::id().to_string());
    let _span = tracing::info_span!("vm", id = %vm_name).entered();
    if let Some(path) = &args.config {
        tracing::info!(config = %path.display(), "settings from the config file, under the command line's");
    }
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
                    WorkloadArg::Serve => Workload::Stress,
                    WorkloadArg::Phased => Workload::Phased,
                },
                phase: args.phase.params()?,
                seed: args.seed,
                cpl0: args.cpl0,
                hostile: args.hostile,
                extra_flags: if serve {
                    (if args.no_balloon { 0 } else { guest_abi::FLAG_STRESS_BALLOON })
                        | (if args.virtio_mem.is_some() { guest_abi::FLAG_STRESS_VIRTIO_MEM } else { 0 })
                } else {
                    0
                },
            },
        },
    };
    if !(args.timeout >= 0.0 && args.timeout.is_finite()) {
        return Err(format!("--timeout {} is not a number of seconds", args.timeout));
    }
    let config = VmConfig {
        kvm_device: args.kvm_device,
        memory: MemoryConfig { size: args.mem, backend: args.mem_backend.into(), thp: args.thp },
        vcpus: args.vcpus + drivers,
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        console: args.serial.clone(),
        monitor: !args.no_monitor,
        teardown_policy: args.on_external_unmap.into(),
        seal_guest_ram: args.seal_guest_ram,
        balloon: (!args.no_balloon).then(|| vmm::devices::virtio::balloon::BalloonConfig {
            free_page_reporting: !args.no_free_page_reporting,
            deflate_on_oom: !args.no_deflate_on_oom,
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
        prealloc: args.prealloc,
        metrics: args.metrics.exporter(&vm_name)?,
        api_socket: if args.no_api {
            None
        } else {
            Some(args.api_socket.clone().unwrap_or_else(|| match &args.id {
                Some(id) => vmm::api::client::named_socket_path(id),
                None => vmm::api::client::default_socket_path(std::process::id()),
            }))
        },
        // No after-start hook, and the test-only fields at their defaults.
        ..VmConfig::new(boot)
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
                (pages * 4096) >> 20,
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

/// `--id`: a VM name clients can use (see [`vmm::api::client::check_vm_id`]).
fn parse_vm_id(text: &str) -> Result<String, String> {
    vmm::api::client::check_vm_id(text).map(|()| text.to_string())
}

/// `--serial`: `stdio`, `file=PATH` or `null`.
fn parse_serial(text: &str) -> Result<Console, String> {
    match text {
        "stdio" => Ok(Console::Terminal),
        "null" => Ok(Console::Null),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(Console::File(PathBuf::from(path))),
            _ => Err(format!("{text:?}: give stdio, file=PATH or null")),
        },
    }
}

/// The phased workload's shape (`--workload phased`).
#[derive(clap::Args)]
struct PhaseArgs {
    /// The working set at its low phase (e.g. 64M).
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    phase_low: u64,
    /// The working set at its high phase.
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    phase_high: u64,
    /// Seconds of one low-high-low cycle (0: always high).
    #[arg(long, default_value_t = 20.0)]
    phase_period: f64,
    /// Seconds into the cycle the guest starts (a per-VM offset).
    #[arg(long, default_value_t = 0.0)]
    phase_offset: f64,
    /// Seconds of each ramp between low and high.
    #[arg(long, default_value_t = 2.0)]
    phase_ramp: f64,
    /// Most memory kept as cache once it left the working set (the rest is reported free).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    phase_cache: u64,
    /// Seconds freed pages wait before they are reported (Linux waits 2 s).
    #[arg(long, default_value_t = 2.0)]
    phase_report_delay: f64,
}

impl PhaseArgs {
    fn params(&self) -> Result<guest_abi::phased::PhaseParams, String> {
        let ms = |what: &str, s: f64| {
            if s >= 0.0 && s.is_finite() {
                Ok((s * 1000.0).round() as u64)
            } else {
                Err(format!("--phase-{what} {s} is not a number of seconds"))
            }
        };
        if self.phase_low > self.phase_high {
            return Err(format!("--phase-low {} is above --phase-high {}", self.phase_low, self.phase_high));
        }
        Ok(guest_abi::phased::PhaseParams {
            low_pages: self.phase_low / guest_abi::PAGE_SIZE,
            high_pages: self.phase_high / guest_abi::PAGE_SIZE,
            period_ms: ms("period", self.phase_period)?,
            offset_ms: ms("offset", self.phase_offset)?,
            ramp_ms: ms("ramp", self.phase_ramp)?,
            cache_pages: self.phase_cache / guest_abi::PAGE_SIZE,
            report_delay_ms: ms("report-delay", self.phase_report_delay)?,
            tsc_khz: 0,
        })
    }
}
