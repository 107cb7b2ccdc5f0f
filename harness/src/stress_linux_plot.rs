//! The SVG plot of `zapvm stress --linux`: over the storm's time, each balloon target and where
//! Linux's driver took the balloon by the end of the step, and (with virtio-mem) each requested
//! size and what Linux had plugged by the end of the step.

use std::path::Path;

use plotters::prelude::*;

use crate::bench_plot::{legend_upper_right, COLORS};
use crate::stress_linux::LinuxStressReport;

const MIB: f64 = (1u64 << 20) as f64;
const PAGE: f64 = 4096.0;

/// Draws `report` into `path`.
pub fn svg(report: &LinuxStressReport, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("cannot draw {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let x_hi = report.storm_s.max(1.0);
    let balloon = |pages: u64| pages as f64 * PAGE / MIB;
    // Targets toward OOM dwarf the rest: the axis covers what was reached, and the greedy
    // targets are drawn at its top edge.
    let reached_hi = report
        .steps
        .iter()
        .filter(|s| s.reached)
        .map(|s| balloon(s.target_pages))
        .chain(report.virtio_mem_steps.iter().map(|m| m.requested_bytes as f64 / MIB))
        .fold(8.0, f64::max);
    let y_hi = reached_hi * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Linux under a balloon storm, {} MiB guest: {} of {} targets reached ({} not, the driver said \
                 why), {} of {} virtio-mem sizes, ok: {}",
                report.mem_bytes >> 20,
                report.reached,
                report.targets,
                report.not_reached_explained,
                report.virtio_mem_reached,
                report.virtio_mem_steps.len(),
                report.ok
            ),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_hi, 0.0..y_hi)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds of storm")
        .y_desc("MiB")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    let steps = |points: Vec<(f64, f64)>| {
        // A step function: each value holds until the next.
        let mut out = Vec::new();
        for (i, &(t, v)) in points.iter().enumerate() {
            out.push((t, v));
            out.push((points.get(i + 1).map_or(x_hi, |n| n.0), v));
        }
        out
    };
    let clip = |v: f64| v.min(y_hi);
    let (c_balloon, c_mem) = (COLORS[0], COLORS[1]);
    let targets = steps(
        report.steps.iter().map(|s| (s.at_ms as f64 / 1000.0, clip(balloon(s.target_pages)))).collect(),
    );
    chart
        .draw_series(LineSeries::new(targets, c_balloon.mix(0.45).stroke_width(1)))
        .map_err(|e| err(&e))?
        .label("balloon target (toward OOM: clipped at the top)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c_balloon.mix(0.45)));
    chart
        .draw_series(report.steps.iter().map(|s| {
            let t = (s.at_ms + s.ms) as f64 / 1000.0;
            Circle::new((t, clip(balloon(s.actual_pages))), 2, c_balloon.filled())
        }))
        .map_err(|e| err(&e))?
        .label("balloon actual at the step's end")
        .legend(move |(x, y)| Circle::new((x + 8, y), 3, c_balloon.filled()));
    if !report.virtio_mem_steps.is_empty() {
        let requested = steps(
            report
                .virtio_mem_steps
                .iter()
                .map(|m| (m.at_ms as f64 / 1000.0, m.requested_bytes as f64 / MIB))
                .collect(),
        );
        chart
            .draw_series(LineSeries::new(requested, c_mem.mix(0.45).stroke_width(1)))
            .map_err(|e| err(&e))?
            .label("virtio-mem requested size")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c_mem.mix(0.45)));
        chart
            .draw_series(report.virtio_mem_steps.iter().map(|m| {
                let t = (m.at_ms + m.ms) as f64 / 1000.0;
                TriangleMarker::new((t, m.plugged_bytes as f64 / MIB), 4, c_mem.filled())
            }))
            .map_err(|e| err(&e))?
            .label("virtio-mem plugged at the step's end")
            .legend(move |(x, y)| TriangleMarker::new((x + 8, y), 4, c_mem.filled()));
    }
    legend_upper_right(&mut chart).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
