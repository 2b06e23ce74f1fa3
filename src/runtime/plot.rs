//! The end-of-run picture (`plot.png`), two panels with axes, tick values and legends:
//! training loss per step and held-out loss at each evaluation (line and points) on top;
//! below, per MoE layer, the busiest expert's load over the mean load, with perfect balance
//! (1.0) as a dark grey line.
//!
//! Text is drawn with a font embedded in the binary (a 25 KB subset of DejaVu Sans,
//! `fonts/`, registered with plotters' `ab_glyph` backend), so no system font or library
//! is needed. Knows only [`StepMetrics`]; the numbers themselves are in `metrics.jsonl`.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::runtime::train::StepMetrics;

/// Width and height of the picture, in pixels.
pub const SIZE: (u32, u32) = (1000, 760);

/// Printable ASCII and a few signs of DejaVu Sans (see `fonts/LICENSE`).
static FONT: &[u8] = include_bytes!("fonts/DejaVuSans-plot.ttf");
/// The family name the embedded font is registered under.
const FAMILY: &str = "sans-serif";

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const HELD_OUT: RGBColor = RGBColor(214, 39, 40);
const BALANCED: RGBColor = RGBColor(90, 90, 90);
/// One colour per MoE layer (in turn when there are more layers).
const LAYERS: [RGBColor; 6] = [
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn register_embedded_font() -> Result<()> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded plot font is not a font"));
    });
    result
}

/// `(lo, hi)` of the finite values with 5% room, or `(0, 1)` without any.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Draws `history` into `path` (PNG of [`SIZE`]).
pub fn draw(history: &[StepMetrics], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    render(&root, history)?;
    root.present().map_err(|e| anyhow!("{e}"))
}

/// Draws `history` into an RGB buffer of [`SIZE`] (3 bytes per pixel, rows top first).
pub fn draw_to_buffer(history: &[StepMetrics], rgb: &mut [u8]) -> Result<()> {
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    render(&root, history)?;
    root.present().map_err(|e| anyhow!("{e}"))
}

/// A panel's chart: steps across, `f64` values up.
type Panel<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A drawing error as this module's callers see it.
fn draw_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("{e}")
}

fn caption_font() -> FontDesc<'static> {
    (FAMILY, 20).into_font()
}

fn label_font() -> FontDesc<'static> {
    (FAMILY, 15).into_font()
}

/// A legend's key of a curve: a short line in its colour.
fn legend_key(colour: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(2))
}

fn render<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, history: &[StepMetrics]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    register_embedded_font()?;
    root.fill(&WHITE).map_err(draw_error)?;
    let (top, bottom) = root.split_vertically(430);
    let last = history.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    draw_losses(&top, history, last)?;
    draw_loads(&bottom, history, last)
}

/// A panel over steps `0..last` and values `lo..hi`, with its caption, its axes (tick
/// values formatted by `value`, described by `desc`) and a light grid.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    last: f64,
    (lo, hi): (f64, f64),
    desc: &str,
    value: &dyn Fn(&f64) -> String,
) -> Result<Panel<'a, DB>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, caption_font())
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..last, lo..hi)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(value)
        .label_style(label_font())
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_error)?;
    Ok(chart)
}

/// The legend of a panel's curves, in its upper right.
fn draw_legend<'a, DB: DrawingBackend + 'a>(chart: &mut Panel<'a, DB>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(label_font())
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)
}

/// The top panel: the training loss of every step, the held-out loss at each evaluation.
fn draw_losses<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    history: &[StepMetrics],
    last: f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let values = range(
        history
            .iter()
            .map(|m| m.loss)
            .chain(history.iter().filter_map(|m| m.eval_loss)),
    );
    let mut chart = panel(area, "Loss", last, values, "loss (nats per token)", &|v| {
        format!("{v:.2}")
    })?;
    chart
        .draw_series(LineSeries::new(
            history.iter().map(|m| (m.step as f64, m.loss)),
            TRAIN.stroke_width(2),
        ))
        .map_err(draw_error)?
        .label("training loss")
        .legend(legend_key(TRAIN));
    let held_out: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l)))
        .collect();
    if !held_out.is_empty() {
        chart
            .draw_series(LineSeries::new(
                held_out.iter().copied(),
                HELD_OUT.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label("held-out loss")
            .legend(legend_key(HELD_OUT));
        chart
            .draw_series(
                held_out
                    .iter()
                    .map(|&p| Circle::new(p, 4, HELD_OUT.filled())),
            )
            .map_err(draw_error)?;
    }
    draw_legend(&mut chart)
}

/// The bottom panel: the busiest expert's load over the mean, per MoE layer, beside perfect
/// balance (or a line saying a dense run has none).
fn draw_loads<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    history: &[StepMetrics],
    last: f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let layers: Vec<usize> = history
        .first()
        .map(|m| m.moe.iter().map(|l| l.layer).collect())
        .unwrap_or_default();
    if layers.is_empty() {
        area.draw(&Text::new(
            "no MoE layers: no expert load to show",
            (80, 140),
            label_font(),
        ))
        .map_err(draw_error)?;
        return Ok(());
    }
    let (_, hi) = range(
        history
            .iter()
            .flat_map(|m| m.moe.iter().map(|l| l.telemetry.max_over_mean_load)),
    );
    let mut chart = panel(
        area,
        "Busiest expert's load / mean load, per MoE layer",
        last,
        (0.0, hi.max(1.5)),
        "max / mean load",
        &|v| format!("{v:.1}"),
    )?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (last, 1.0)],
            BALANCED.stroke_width(2),
        ))
        .map_err(draw_error)?
        .label("perfect balance")
        .legend(legend_key(BALANCED));
    for (i, layer) in layers.iter().enumerate() {
        let colour = LAYERS[i % LAYERS.len()];
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
            .map_err(draw_error)?
            .label(format!("layer {layer}"))
            .legend(legend_key(colour));
    }
    draw_legend(&mut chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 steps of a falling loss, an evaluation every 25, two MoE layers.
    fn history() -> Vec<StepMetrics> {
        (1..=100u64)
            .map(|s| {
                let layer = |l: usize, load: f64| {
                    serde_json::from_value::<crate::runtime::train::LayerMetrics>(
                        serde_json::json!({
                            "layer": l, "tokens_per_expert": [1, 2], "max_over_mean_load": load,
                            "dropped_fraction": 0.0, "gate_entropy": 1.0, "balance_loss": 0.0,
                        }),
                    )
                    .unwrap()
                };
                StepMetrics {
                    step: s,
                    loss: 5.5 - 3.0 * (s as f64 / 100.0).sqrt(),
                    balance_loss: 0.0,
                    lr: 1e-3,
                    grad_norm: 1.0,
                    tokens: 2048,
                    tokens_per_s: 1.0,
                    elapsed_s: s as f64,
                    moe: vec![layer(1, 1.8 - s as f64 / 200.0), layer(3, 1.3)],
                    eval_loss: (s % 25 == 0).then(|| 5.6 - 3.0 * (s as f64 / 100.0).sqrt()),
                    eval_ppl: None,
                }
            })
            .collect()
    }

    fn dark_pixels(rgb: &[u8], (x0, y0): (u32, u32), (x1, y1): (u32, u32)) -> usize {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = 3 * (y * SIZE.0 + x) as usize;
                if rgb[i..i + 3].iter().all(|&c| c < 100) {
                    n += 1;
                }
            }
        }
        n
    }

    fn colour_pixels(rgb: &[u8], colour: RGBColor) -> usize {
        rgb.chunks(3)
            .filter(|p| p[0] == colour.0 && p[1] == colour.1 && p[2] == colour.2)
            .count()
    }

    /// Issue 14, item 13: the picture has tick values on its axes, a legend, and the
    /// held-out loss as a curve beside the training loss.
    #[test]
    fn the_plot_has_axes_ticks_legends_and_the_held_out_curve() {
        let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        draw_to_buffer(&history(), &mut rgb).unwrap();
        // Tick values left of each panel and below it (text is dark; the plot area's
        // lines are coloured or light grey).
        assert!(dark_pixels(&rgb, (0, 40), (70, 380)) > 200, "loss ticks");
        assert!(
            dark_pixels(&rgb, (60, 385), (1000, 430)) > 200,
            "step ticks"
        );
        assert!(dark_pixels(&rgb, (0, 470), (70, 700)) > 200, "load ticks");
        // Legends in the upper right of each panel: their text, and their colour keys.
        assert!(
            dark_pixels(&rgb, (760, 40), (990, 110)) > 200,
            "loss legend"
        );
        assert!(
            dark_pixels(&rgb, (760, 470), (990, 560)) > 200,
            "load legend"
        );
        // Both curves and every layer's, drawn in their colours.
        assert!(colour_pixels(&rgb, TRAIN) > 500);
        assert!(colour_pixels(&rgb, HELD_OUT) > 300);
        assert!(colour_pixels(&rgb, LAYERS[0]) > 300);
        assert!(colour_pixels(&rgb, LAYERS[1]) > 300);
    }

    #[test]
    fn a_dense_run_and_an_empty_history_still_draw() {
        let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        let mut dense = history();
        for m in &mut dense {
            m.moe.clear();
        }
        draw_to_buffer(&dense, &mut rgb).unwrap();
        draw_to_buffer(&[], &mut rgb).unwrap();
    }
}
