//! The SVG plot of `zapvm bench overcommit`: one panel per policy over time — the budget, the
//! resident total, and per VM its resident memory, its working set (dashed) and its balloon
//! (thin).

use std::path::Path;

use plotters::prelude::*;

use crate::bench_overcommit::OvercommitReport;
use crate::bench_plot::{legend_upper_right, COLORS};

const MIB: f64 = (1u64 << 20) as f64;

/// Draws `report` into `path`.
pub fn svg(report: &OvercommitReport, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("cannot draw {}: {e:?}", path.display());
    let n = report.policies.len().max(1);
    let root = SVGBackend::new(path, (1100, 330 * n as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!(
                "{} VMs x {} MiB under a {} MiB budget: resident memory over time",
                report.request.fleet.vms,
                report.request.fleet.mem >> 20,
                report.request.budget >> 20
            ),
            ("sans-serif", 18),
        )
        .map_err(|e| err(&e))?;
    let budget = report.request.budget as f64 / MIB;
    let y_hi = report
        .policies
        .iter()
        .flat_map(|p| p.samples.iter().map(|s| s.resident_total as f64 / MIB))
        .fold(budget, f64::max)
        * 1.1;
    let x_hi = report.request.duration;
    for (panel, p) in root.split_evenly((n, 1)).iter().zip(&report.policies) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{}: p99 resident {:.0} MiB ({:.2} x budget), work {:.2} x none, stall {:.1} s",
                    p.policy,
                    p.p99_resident as f64 / MIB,
                    p.p99_vs_budget,
                    p.work_vs_unconstrained,
                    p.stall_s
                ),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_hi, 0.0..y_hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, budget), (x_hi, budget)],
                RGBColor(0x80, 0x80, 0x80).stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("budget")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RGBColor(0x80, 0x80, 0x80)));
        chart
            .draw_series(LineSeries::new(
                p.samples.iter().map(|s| (s.t, s.resident_total as f64 / MIB)),
                BLACK.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("resident total")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        let nvm = p.samples.first().map_or(0, |s| s.vms.len());
        for v in 0..nvm {
            let c = COLORS[v % COLORS.len()];
            let pts = |f: &dyn Fn(&crate::bench_overcommit::VmSample) -> u64| {
                p.samples.iter().map(|s| (s.t, f(&s.vms[v]) as f64 / MIB)).collect::<Vec<_>>()
            };
            chart
                .draw_series(LineSeries::new(pts(&|x| x.resident), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("VM {v} resident"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c));
            chart
                .draw_series(DashedLineSeries::new(pts(&|x| x.wanted), 6, 4, c.stroke_width(1)))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(LineSeries::new(pts(&|x| x.balloon_actual), c.mix(0.35).stroke_width(1)))
                .map_err(|e| err(&e))?;
        }
        legend_upper_right(&mut chart).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
