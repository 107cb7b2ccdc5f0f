//! Plots of benchmark reports, as SVG files drawn with `plotters` (SVG backend only: no font
//! library is needed, the viewer renders the text).

use std::path::Path;

use plotters::prelude::*;

use crate::bench_pressure_report::{size_label, Delivery, PressureReport};

/// Draws the legend of `chart`'s labelled series in the upper right corner, as the plots over
/// time (`bench_overcommit_plot`, `stress_linux_plot`) show it.
pub(crate) fn legend_upper_right<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 11))
        .draw()
}

/// The target line's colour.
const TARGET: RGBColor = RGBColor(0xb0, 0xb0, 0xb0);

/// Line colours (distinguishable, print-safe): one per range size here, one per VM in
/// `bench_overcommit_plot`.
pub(crate) const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The touch-rate plot of `zapvm bench pressure`: one panel per backing; x = pressure achieved
/// (MiB/s, log), y = touch rate pressured / unpressured (log); one line per range size (one
/// discard per range), the per-4-KiB-page deliveries as crosses, the 0.5 target as a grey line.
pub fn pressure_svg(report: &PressureReport, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("cannot draw {}: {e:?}", path.display());
    let backings = &report.options.backings;
    let root = SVGBackend::new(path, (560 * backings.len().max(1) as u32, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!(
                "guest touch rate under host discards ({} MiB guest RAM, {})",
                report.options.mem >> 20,
                report.date
            ),
            ("sans-serif", 18),
        )
        .map_err(|e| err(&e))?;
    // The panels, and a strip below them for the legend (inside a panel it would hide points).
    let (charts, legend) = root.split_vertically(430);
    let panels = charts.split_evenly((1, backings.len().max(1)));
    let achieved: Vec<f64> = report.points.iter().map(|p| p.achieved_mib_s.max(1.0)).collect();
    let x_lo = achieved.iter().copied().fold(f64::MAX, f64::min).min(32.0) / 1.5;
    let x_hi = achieved.iter().copied().fold(1.0, f64::max).max(2048.0) * 1.5;
    let y_lo = report
        .points
        .iter()
        .map(|p| p.pressured_vs_unpressured)
        .filter(|r| *r > 0.0)
        .fold(0.01f64, f64::min)
        .max(1e-5)
        / 1.5;
    let clamp = |r: f64| r.clamp(y_lo, 2.0);
    for (panel, &backing) in panels.iter().zip(backings) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{} backing", backing.name()), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..2.0f64).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("pressure achieved, MiB/s")
            .y_desc("touch rate, pressured / unpressured")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v}"))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                [(x_lo, report.target), (x_hi, report.target)],
                TARGET.stroke_width(3),
            ))
            .map_err(|e| err(&e))?;
        for (i, &range) in report.options.ranges.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut line: Vec<(f64, f64, f64)> = report
                .points
                .iter()
                .filter(|p| {
                    p.backing == backing
                        && p.range_bytes == range
                        && p.delivery == Delivery::Range
                        && !p.rate_matched_to_previous
                })
                .map(|p| (p.target_mib_s, p.achieved_mib_s.max(1.0), clamp(p.pressured_vs_unpressured)))
                .collect();
            if line.is_empty() {
                continue;
            }
            // In the order of the target rates (the achieved rate may fall short of it).
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line: Vec<(f64, f64)> = line.into_iter().map(|(_, x, y)| (x, y)).collect();
            chart.draw_series(LineSeries::new(line.clone(), color.stroke_width(2))).map_err(|e| err(&e))?;
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
            let per_page: Vec<(f64, f64)> = report
                .points
                .iter()
                .filter(|p| p.backing == backing && p.range_bytes == range && p.delivery == Delivery::PerPage)
                .map(|p| (p.achieved_mib_s.max(1.0), clamp(p.pressured_vs_unpressured)))
                .collect();
            if !per_page.is_empty() {
                chart
                    .draw_series(per_page.iter().map(|&p| Cross::new(p, 6, color.stroke_width(2))))
                    .map_err(|e| err(&e))?;
            }
        }
    }
    // The legend: what each colour and marker means, in one or two rows.
    let mut entries: Vec<(String, RGBColor, bool)> =
        vec![(format!("target {}", report.target), TARGET, false)];
    for (i, &range) in report.options.ranges.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        entries.push((format!("{} ranges", size_label(range)), color, false));
        if report.points.iter().any(|p| p.range_bytes == range && p.delivery == Delivery::PerPage) {
            entries.push((format!("{} ranges, one discard per 4K page", size_label(range)), color, true));
        }
    }
    let width = legend.dim_in_pixel().0 as i32;
    let (mut x, mut y) = (70, 14);
    for (label, color, cross) in entries {
        let w = 40 + 7 * label.len() as i32;
        if x + w > width {
            (x, y) = (70, y + 24);
        }
        if cross {
            legend.draw(&Cross::new((x + 10, y), 5, color.stroke_width(2))).map_err(|e| err(&e))?;
        } else {
            legend
                .draw(&PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)))
                .map_err(|e| err(&e))?;
        }
        legend.draw(&Text::new(label, (x + 26, y - 7), ("sans-serif", 13))).map_err(|e| err(&e))?;
        x += w;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
