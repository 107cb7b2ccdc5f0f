//! `zapvm bench kick`: what a virtio queue kick costs the guest, with and without an ioeventfd.
//!
//! Each VM runs the test guest's [`Workload::Kick`]: vCPU 0 brings a virtio-balloon up and, in
//! [`KICK_ROUNDS`] rounds, times [`KICKS_PER_ROUND`] QueueNotify writes of an empty queue (what a
//! driver's kick costs the vCPU: guest TSC time per write) and as many reads of the MagicValue
//! register (one exit to the VMM and back with no device work: the baseline, measured in the same
//! VM between the kick passes). VMs with the queues' ioeventfds registered (the default of
//! `zapvm run`) and without (`--no-ioeventfd`: every kick exits and the vCPU thread processes the
//! queue) alternate, the order swapped every run, so both face the same host load.
//!
//! Reported per variant: ns per kick and per baseline read (medians over every round of every
//! run), `kick_vs_exit` (kick / baseline read), and the device's transport counters, which also
//! prove what was measured: with ioeventfds no kick may have exited to the VMM, without them every
//! kick must have (anything else fails the bench, see [`check_counters`]). Where the host refuses
//! ioeventfd the transport falls back to exits; the bench then reports the refusal and the
//! ioeventfd row measures the fallback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_abi::{Pass, Workload, KICKS_PER_ROUND, KICK_ROUNDS};
use plotters::prelude::*;
use vmm::boot::test_guest::TestGuestParams;
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::devices::virtio::mmio::TransportStats;
use vmm::machine::{self, Console, RunReport, VmConfig};
use vmm::memory::{MemoryBackend, MemoryConfig};
use vmm::vstate::vcpu::VcpuOutcome;

use crate::bench::median;

/// Options of `bench kick`.
#[derive(Clone, Debug)]
pub struct KickBenchOptions {
    /// VMs per variant.
    pub runs: usize,
    /// The KVM device.
    pub kvm_device: PathBuf,
}

impl KickBenchOptions {
    /// 3 VMs per variant (about 10 s).
    pub fn quick() -> Self {
        Self { runs: 3, kvm_device: "/dev/kvm".into() }
    }

    /// 9 VMs per variant.
    pub fn full() -> Self {
        Self { runs: 9, ..Self::quick() }
    }
}

/// One VM's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KickRun {
    /// Whether the VM registered ioeventfds.
    pub ioeventfd: bool,
    /// ns per kick, per round.
    pub kick_ns: Vec<f64>,
    /// ns per baseline MagicValue read, per round.
    pub mmio_read_ns: Vec<f64>,
    /// The balloon's transport counters at the end of the run.
    pub transport: TransportStats,
}

/// One variant's medians and counters (summed over its runs).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KickRow {
    /// "ioeventfd" or "exit".
    pub variant: String,
    /// VMs measured.
    pub runs: usize,
    /// Median ns per kick over every round of every run.
    pub kick_ns: f64,
    /// Median ns per baseline read (one exit to the VMM and back).
    pub mmio_read_ns: f64,
    /// kick_ns / mmio_read_ns.
    pub kick_vs_exit: f64,
    /// Kicks the guests made.
    pub kicks: u64,
    /// Of them, QueueNotify writes that exited to the VMM.
    pub kicks_exit: u64,
    /// Signals the device read from its ioeventfds (several kicks may count once).
    pub kicks_ioeventfd: u64,
    /// Queues with an ioeventfd, per VM.
    pub ioeventfd_queues: u64,
    /// Queues whose ioeventfd the host refused, per VM.
    pub ioeventfd_refused: u64,
}

/// What `bench kick` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KickReport {
    /// The command line.
    pub command: String,
    /// When (UTC).
    pub date: String,
    /// Kicks per timed pass.
    pub kicks_per_round: u64,
    /// Rounds per VM.
    pub rounds: u64,
    /// One row per variant: ioeventfd, then exit.
    pub rows: Vec<KickRow>,
    /// Median over the runs of (ioeventfd VM's median kick / the exit VM's it was paired with).
    pub ioeventfd_vs_exit: f64,
    /// Every VM.
    pub vms: Vec<KickRun>,
}

/// What the transport counters must say after a VM made `kicks` kicks of an empty queue: with
/// ioeventfds in effect no QueueNotify write exited and the device read at least one signal, at
/// most one per kick; without them (or where the host refused them all) every kick exited and none
/// came through an eventfd. Any other combination means the bench did not measure what its rows
/// name.
pub fn check_counters(ioeventfd: bool, kicks: u64, t: &TransportStats) -> Result<(), String> {
    let errors = t.register_errors + t.feature_errors + t.status_errors + t.queue_errors + t.notify_errors;
    if errors != 0 {
        return Err(format!("the guest's driver made {errors} transport errors: {t:?}"));
    }
    let through_eventfd = ioeventfd && t.ioeventfd_queues > 0;
    if ioeventfd && t.ioeventfd_queues == 0 && t.ioeventfd_refused == 0 {
        return Err(format!("ioeventfds were asked for but none was registered or refused: {t:?}"));
    }
    if through_eventfd {
        if t.kicks_exit != 0 || t.kicks_ioeventfd == 0 || t.kicks_ioeventfd > kicks {
            return Err(format!(
                "with ioeventfds, {kicks} kicks must reach the device through them (0 exits, 1..={kicks} \
                 signals): {t:?}"
            ));
        }
    } else if t.kicks_exit != kicks || t.kicks_ioeventfd != 0 {
        return Err(format!("without ioeventfds, all {kicks} kicks must exit to the VMM: {t:?}"));
    }
    Ok(())
}

/// Runs one VM of the Kick workload.
fn run_vm(opts: &KickBenchOptions, ioeventfd: bool) -> Result<KickRun, String> {
    let config = VmConfig {
        kvm_device: opts.kvm_device.clone(),
        memory: MemoryConfig { size: 64 << 20, backend: MemoryBackend::Anonymous, thp: false },
        timeout: Some(Duration::from_secs(300)),
        console: Console::Null,
        balloon: Some(BalloonConfig::default()),
        balloon_stats_interval: None,
        ioeventfd,
        ..VmConfig::test_guest(TestGuestParams::new(Workload::Kick))
    };
    let report = machine::run(&config).map_err(|e| format!("bench kick VM: {e}"))?;
    per_kick(&report, ioeventfd)
}

/// The figures of one VM's report, checked.
fn per_kick(report: &RunReport, ioeventfd: bool) -> Result<KickRun, String> {
    let vcpu = report.vcpus.first().ok_or("the VM reported no vCPU")?;
    if !matches!(vcpu.outcome, VcpuOutcome::Done { .. }) {
        return Err(format!("bench kick VM failed: {:?}", report.outcome));
    }
    let khz = f64::from(vcpu.tsc_khz.ok_or("the VM reported no TSC frequency")?);
    let per = |pass: Pass| -> Vec<f64> {
        vcpu.timings
            .iter()
            .filter(|t| t.pass == pass && t.pages > 0)
            .map(|t| t.cycles as f64 * 1e6 / khz / t.pages as f64)
            .collect()
    };
    let (kick_ns, mmio_read_ns) = (per(Pass::Kick), per(Pass::MmioRead));
    if kick_ns.len() as u64 != KICK_ROUNDS || mmio_read_ns.len() as u64 != KICK_ROUNDS {
        return Err(format!(
            "expected {KICK_ROUNDS} kick and baseline passes, the guest timed {} and {}",
            kick_ns.len(),
            mmio_read_ns.len()
        ));
    }
    let transport =
        report.memory_layer.balloon_transport.clone().ok_or("the VM reported no balloon transport")?;
    check_counters(ioeventfd, KICK_ROUNDS * KICKS_PER_ROUND, &transport)
        .map_err(|e| format!("bench kick ({}): {e}", variant_name(ioeventfd)))?;
    Ok(KickRun { ioeventfd, kick_ns, mmio_read_ns, transport })
}

fn variant_name(ioeventfd: bool) -> &'static str {
    if ioeventfd {
        "ioeventfd"
    } else {
        "exit"
    }
}

/// Runs `bench kick`; `progress` hears about each VM.
pub fn run(opts: &KickBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<KickReport, String> {
    if opts.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let mut vms = Vec::new();
    let mut pair_ratios = Vec::new();
    for run in 0..opts.runs {
        let order = if run % 2 == 0 { [true, false] } else { [false, true] };
        let mut pair = [f64::NAN; 2];
        for ioeventfd in order {
            progress(&format!("bench kick: run {}/{}, {}", run + 1, opts.runs, variant_name(ioeventfd)));
            let vm = run_vm(opts, ioeventfd)?;
            pair[usize::from(!ioeventfd)] = median(vm.kick_ns.clone());
            vms.push(vm);
        }
        pair_ratios.push(pair[0] / pair[1]);
    }
    let rows = [true, false]
        .into_iter()
        .map(|ioeventfd| {
            let of: Vec<&KickRun> = vms.iter().filter(|v| v.ioeventfd == ioeventfd).collect();
            let all =
                |f: fn(&KickRun) -> &Vec<f64>| median(of.iter().flat_map(|v| f(v).iter().copied()).collect());
            let sum = |f: fn(&TransportStats) -> u64| of.iter().map(|v| f(&v.transport)).sum::<u64>();
            let (kick_ns, mmio_read_ns) = (all(|v| &v.kick_ns), all(|v| &v.mmio_read_ns));
            KickRow {
                variant: variant_name(ioeventfd).into(),
                runs: of.len(),
                kick_ns,
                mmio_read_ns,
                kick_vs_exit: kick_ns / mmio_read_ns,
                kicks: of.len() as u64 * KICK_ROUNDS * KICKS_PER_ROUND,
                kicks_exit: sum(|t| t.kicks_exit),
                kicks_ioeventfd: sum(|t| t.kicks_ioeventfd),
                ioeventfd_queues: of.first().map_or(0, |v| v.transport.ioeventfd_queues),
                ioeventfd_refused: of.first().map_or(0, |v| v.transport.ioeventfd_refused),
            }
        })
        .collect();
    Ok(KickReport {
        // The program by its name, not its path (the report is kept and shared).
        command: std::iter::once("zapvm".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        date: vmm::timestamp::utc_now(),
        kicks_per_round: KICKS_PER_ROUND,
        rounds: KICK_ROUNDS,
        rows,
        ioeventfd_vs_exit: median(pair_ratios),
        vms,
    })
}

impl KickReport {
    /// The markdown table and the summary line.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| variant | VMs | ns per kick | ns per exit (MagicValue read) | kick_vs_exit | kicks | kicks that exited | \
             ioeventfd signals read | queues with ioeventfd / refused |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {} | {} / {} |\n",
                r.variant,
                r.runs,
                r.kick_ns,
                r.mmio_read_ns,
                r.kick_vs_exit,
                r.kicks,
                r.kicks_exit,
                r.kicks_ioeventfd,
                r.ioeventfd_queues,
                r.ioeventfd_refused
            );
        }
        s += &format!(
            "\nioeventfd_vs_exit (median over the runs of the paired VMs' kick medians): {:.3}; {} kicks per pass, \
             {} rounds per VM, guest TSC time.\n",
            self.ioeventfd_vs_exit, self.kicks_per_round, self.rounds
        );
        if let Some(r) = self.rows.iter().find(|r| r.variant == "ioeventfd" && r.ioeventfd_refused > 0) {
            s += &format!(
                "\nThe host refused ioeventfd for {} queue(s): those kicks exited (the fallback).\n",
                r.ioeventfd_refused
            );
        }
        s
    }
}

/// One row of the plot's CSV: a round of one VM.
#[derive(serde::Serialize)]
struct PlotPoint {
    vm: usize,
    variant: &'static str,
    round: usize,
    kick_ns: f64,
    mmio_read_ns: f64,
}

fn plot_points(report: &KickReport) -> Vec<PlotPoint> {
    let mut out = Vec::new();
    for (vm, v) in report.vms.iter().enumerate() {
        for (round, (k, m)) in v.kick_ns.iter().zip(&v.mmio_read_ns).enumerate() {
            out.push(PlotPoint {
                vm,
                variant: variant_name(v.ioeventfd),
                round,
                kick_ns: *k,
                mmio_read_ns: *m,
            });
        }
    }
    out
}

/// The plot: x = the rounds in the order they ran, y = ns per operation (log); kicks and
/// baseline reads of each variant.
pub fn kick_svg(report: &KickReport, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("cannot draw {}: {e:?}", path.display());
    let points = plot_points(report);
    let all: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.kick_ns, p.mmio_read_ns])
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let y_lo = all.iter().copied().fold(f64::MAX, f64::min).max(1.0) / 2.0;
    let y_hi = all.iter().copied().fold(10.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("guest-visible cost of a virtio queue kick ({})", report.date), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..points.len().max(1) as f64, (y_lo..y_hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("round (in the order the VMs ran)")
        .y_desc("ns per operation (guest TSC)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    let series: [(&str, &str, bool, RGBColor); 4] = [
        ("kick, ioeventfd", "ioeventfd", true, RGBColor(0x1f, 0x77, 0xb4)),
        ("kick, exit to the VMM", "exit", true, RGBColor(0xd6, 0x27, 0x28)),
        ("MagicValue read (one exit), ioeventfd VM", "ioeventfd", false, RGBColor(0x2c, 0xa0, 0x2c)),
        ("MagicValue read (one exit), exit VM", "exit", false, RGBColor(0xff, 0x7f, 0x0e)),
    ];
    for (name, variant, kick, color) in series {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter(|(_, p)| p.variant == variant)
            .map(|(i, p)| (i as f64, if kick { p.kick_ns } else { p.mmio_read_ns }.clamp(y_lo, y_hi)))
            .collect();
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 3, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `kick.json` (and its flat export `kick.flat.json`), `kick.md`, `kick.svg` and the
/// plotted points as `kick.csv` into `dir`.
pub fn write_outputs(report: &KickReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    crate::bench_export::write_outputs(report, dir, kick_svg, &plot_points(report))
}

/// The command: runs (a progress step per VM), prints the table, writes the outputs into `out`.
pub fn cli(opts: &KickBenchOptions, out: &Path) -> Result<std::process::ExitCode, String> {
    let steps = Some(2 * opts.runs as u64);
    let report = crate::bench_export::run_with_progress(steps, |progress| run(opts, progress))?;
    crate::bench_export::print_and_write(&report, out, write_outputs)?;
    Ok(std::process::ExitCode::SUCCESS)
}

impl crate::bench_export::BenchReport for KickReport {
    const NAME: &'static str = "kick";

    fn command(&self) -> &str {
        &self.command
    }

    fn date(&self) -> &str {
        &self.date
    }

    fn to_markdown(&self) -> String {
        KickReport::to_markdown(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(exit: u64, eventfd: u64, queues: u64, refused: u64) -> TransportStats {
        TransportStats {
            kicks_exit: exit,
            kicks_ioeventfd: eventfd,
            ioeventfd_queues: queues,
            ioeventfd_refused: refused,
            ..Default::default()
        }
    }

    #[test]
    fn the_counter_check_accepts_what_each_variant_must_show() {
        assert_eq!(check_counters(true, 100, &stats(0, 37, 4, 0)), Ok(()));
        assert_eq!(check_counters(true, 100, &stats(0, 100, 4, 0)), Ok(()));
        assert_eq!(check_counters(false, 100, &stats(100, 0, 0, 0)), Ok(()));
        // The host refused every ioeventfd: the fallback exits, and the row says so.
        assert_eq!(check_counters(true, 100, &stats(100, 0, 0, 4)), Ok(()));
    }

    #[test]
    fn the_counter_check_fires_when_the_variant_is_not_what_ran() {
        // Asked for ioeventfds, but kicks exited (e.g. a datamatch that never matches).
        assert!(check_counters(true, 100, &stats(3, 40, 4, 0)).is_err());
        // Asked for ioeventfds, and the device never heard a kick.
        assert!(check_counters(true, 100, &stats(0, 0, 4, 0)).is_err());
        // More signals than kicks.
        assert!(check_counters(true, 100, &stats(0, 101, 4, 0)).is_err());
        // Nothing registered, nothing refused.
        assert!(check_counters(true, 100, &stats(100, 0, 0, 0)).is_err());
        // Without ioeventfds, a kick went missing or came through an eventfd.
        assert!(check_counters(false, 100, &stats(99, 0, 0, 0)).is_err());
        assert!(check_counters(false, 100, &stats(100, 1, 0, 0)).is_err());
        // Driver errors make the figures meaningless.
        let mut t = stats(100, 0, 0, 0);
        t.notify_errors = 1;
        assert!(check_counters(false, 100, &t).is_err());
    }
}
