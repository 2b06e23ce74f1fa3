//! The end-of-run picture (`plot.png`): training loss (blue) and held-out loss (red dots) on
//! top, the busiest expert's load over the mean per MoE layer below (one colour per layer,
//! the grey line is perfect balance at 1.0).
//!
//! Drawn with plotters' bitmap backend and no text, so it needs no system fonts; the numbers
//! are in `metrics.jsonl` and the summary. Knows only [`StepMetrics`].

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::runtime::train::StepMetrics;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Draws `history` into `path` (PNG, 1000×700).
pub fn draw(history: &[StepMetrics], path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(400);
    let last = history.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;

    let (lo, hi) = range(
        history
            .iter()
            .map(|m| m.loss)
            .chain(history.iter().filter_map(|m| m.eval_loss)),
    );
    let mut chart = ChartBuilder::on(&top)
        .margin(20)
        .build_cartesian_2d(0f64..last, lo..hi)
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            history.iter().map(|m| (m.step as f64, m.loss)),
            PALETTE[0].stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(history.iter().filter_map(|m| {
            m.eval_loss
                .map(|l| Circle::new((m.step as f64, l), 4, RED.filled()))
        }))
        .map_err(|e| err(&e))?;
    top.draw(&Rectangle::new(
        [(20, 20), (980, 380)],
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(&e))?;

    let layers: Vec<usize> = history
        .first()
        .map(|m| m.moe.iter().map(|l| l.layer).collect())
        .unwrap_or_default();
    let (_, hi) = range(
        history
            .iter()
            .flat_map(|m| m.moe.iter().map(|l| l.telemetry.max_over_mean_load)),
    );
    let mut chart = ChartBuilder::on(&bottom)
        .margin(20)
        .build_cartesian_2d(0f64..last, 0f64..hi.max(1.5))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (last, 1.0)],
            RGBColor(160, 160, 160).stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
    for (i, layer) in layers.iter().enumerate() {
        let colour = PALETTE[(i + 1) % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                history.iter().filter_map(|m| {
                    m.moe
                        .iter()
                        .find(|l| l.layer == *layer)
                        .map(|l| (m.step as f64, l.telemetry.max_over_mean_load))
                }),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
    }
    bottom
        .draw(&Rectangle::new(
            [(20, 20), (980, 280)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
