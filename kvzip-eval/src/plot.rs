//! Score-vs-KV-ratio plots (like the paper's Figure 9) as SVG and PNG. Pure Rust (plotters);
//! the PNG text uses the DejaVu Sans font embedded from the `dejavu` crate, so no system fonts
//! are needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::summary::Summary;
use crate::{EvalError, Result};

/// Plot size in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (720, 480);

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The embedded font is valid; a failure would only lose the PNG text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Line colour of a method (fixed per method so plots are comparable).
fn method_color(method: &str, i: usize) -> RGBColor {
    match method {
        "kvzip" => RGBColor(214, 39, 40),
        "kvzip-head" => RGBColor(255, 127, 14),
        "snapkv" => RGBColor(31, 119, 180),
        "pyramidkv" => RGBColor(44, 160, 44),
        "h2o" => RGBColor(148, 103, 189),
        "streaming" => RGBColor(127, 127, 127),
        "kvzip-plus" => RGBColor(140, 20, 30),
        "tova" => RGBColor(23, 190, 207),
        "knorm" => RGBColor(188, 189, 34),
        "keydiff" => RGBColor(227, 119, 194),
        "expected-attention" => RGBColor(140, 86, 75),
        _ => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &Summary,
    order: &[String],
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "{} / {} ({} ex., {} q.)",
                s.model, s.data, s.n_examples, s.n_queries
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0f64..1.02f64, 0.0f64..102.0f64)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("KV cache ratio (kept / full)")
        .y_desc(format!("score ({} x100)", s.metric))
        .x_labels(11)
        .y_labels(11)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(|x| e(&x))?;
    // Reverse order so the first method (kvzip) is drawn last, on top of overlapping curves.
    for (i, m) in order.iter().enumerate().rev() {
        let Some(pts) = s.methods.get(m) else {
            continue;
        };
        let color = method_color(m, i);
        let style = color.stroke_width(if m == "kvzip" { 3 } else { 2 });
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.ratio, p.score)),
                style,
            ))
            .map_err(|x| e(&x))?
            .label(m.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.ratio, p.score), 3, color.filled())),
            )
            .map_err(|x| e(&x))?;
        // 95 % bootstrap intervals as error bars, nudged sideways per method so they stay
        // readable where methods overlap.
        let dx = (i as f64 - order.len() as f64 / 2.0) * 0.004;
        chart
            .draw_series(pts.iter().filter_map(|p| {
                let (lo, hi) = (p.ci_low?, p.ci_high?);
                let x = p.ratio + dx;
                Some(PathElement::new(
                    vec![(x, lo), (x, hi)],
                    color.mix(0.6).stroke_width(1),
                ))
            }))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Draws the summary's curves (methods in `order`) into `svg` and `png`.
pub fn plot_summary(s: &Summary, order: &[String], svg: &Path, png: &Path) -> Result<()> {
    register_font();
    for p in [svg, png] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
        }
    }
    {
        let root = SVGBackend::new(svg, PLOT_SIZE).into_drawing_area();
        draw(&root, s, order).map_err(|problem| EvalError::Plot {
            path: svg.to_owned(),
            problem,
        })?;
    }
    let root = BitMapBackend::new(png, PLOT_SIZE).into_drawing_area();
    draw(&root, s, order).map_err(|problem| EvalError::Plot {
        path: png.to_owned(),
        problem,
    })
}
