//! `kvzip report`: per results folder, a markdown table of score vs ratio per method (the
//! full-cache row first, 95 % bootstrap intervals in brackets, retention relative to full in
//! parentheses), the summary JSON, and a score-vs-ratio plot with the intervals (SVG + PNG);
//! `report.md` with every table and `report.html`, one self-contained page (tables and inline
//! SVG plots) that opens offline.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::methods::ALL_METHODS;
use crate::plot::plot_summary;
use crate::results::{config_path, load_finished, read_json, write_json_atomic, RunConfig};
use crate::summary::{summarize, Summary};
use crate::{io_err, EvalError, Result};

/// Methods of `s` in the canonical order (known methods first, then any others).
pub fn method_order(s: &Summary) -> Vec<String> {
    let mut order: Vec<String> = ALL_METHODS
        .iter()
        .map(|m| m.as_str().to_owned())
        .filter(|m| s.methods.contains_key(m))
        .collect();
    let others: Vec<String> = s
        .methods
        .keys()
        .filter(|k| !order.contains(k))
        .cloned()
        .collect();
    order.extend(others);
    order
}

/// Cells of the table: `(header, rows)`, each row `(ratio label, cells)`; a cell is
/// `score [lo, hi] (retention %)`.
pub fn table_cells(s: &Summary) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    let order = method_order(s);
    let full = s.full_score().unwrap_or(0.0);
    let cell = |m: &str, r: f64| -> String {
        let Some(p) = s
            .methods
            .get(m)
            .and_then(|pts| pts.iter().find(|p| (p.ratio - r).abs() < 1e-6))
        else {
            return "-".to_owned();
        };
        let mut c = format!("{:.1}", p.score);
        if let (Some(lo), Some(hi)) = (p.ci_low, p.ci_high) {
            let _ = write!(c, " [{lo:.1}, {hi:.1}]");
        }
        if full > 0.0 && r < 1.0 {
            let _ = write!(c, " ({:.0}%)", 100.0 * p.score / full);
        }
        c
    };
    let mut ratios: Vec<f64> = s
        .methods
        .values()
        .flatten()
        .map(|p| p.ratio)
        .filter(|r| *r < 1.0)
        .collect();
    ratios.sort_by(|a, b| b.total_cmp(a));
    ratios.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let mut rows = vec![(
        "1.0 (full)".to_owned(),
        order.iter().map(|m| cell(m, 1.0)).collect(),
    )];
    for r in ratios {
        rows.push((
            format!("{r:.1}"),
            order.iter().map(|m| cell(m, r)).collect(),
        ));
    }
    (order, rows)
}

/// The markdown table: one column per method, rows = ratios (full cache first, then
/// descending); cells `score [95 % interval] (retention %)`, retention = score / full-cache
/// score.
pub fn markdown_table(s: &Summary) -> String {
    let (order, rows) = table_cells(s);
    let mut t = String::new();
    let _ = writeln!(t, "| ratio | {} |", order.join(" | "));
    let _ = writeln!(t, "|---|{}", "---|".repeat(order.len()));
    for (label, cells) in rows {
        let _ = writeln!(t, "| {label} | {} |", cells.join(" | "));
    }
    t
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One run's section of `report.html`: heading, the table, and the SVG plot inline.
fn html_section(s: &Summary, svg: &str) -> String {
    let (order, rows) = table_cells(s);
    let mut h = format!(
        "<section><h2>{} / {}</h2><p>{} examples, {} queries, metric {} x100; cells: score \
         [95% bootstrap interval over contexts] (retention vs full cache).</p><table><tr><th>ratio</th>",
        html_escape(&s.model),
        html_escape(&s.data),
        s.n_examples,
        s.n_queries,
        html_escape(&s.metric)
    );
    for m in &order {
        let _ = write!(h, "<th>{}</th>", html_escape(m));
    }
    h.push_str("</tr>");
    for (label, cells) in rows {
        let _ = write!(h, "<tr><td>{}</td>", html_escape(&label));
        for c in cells {
            let _ = write!(h, "<td>{}</td>", html_escape(&c));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    // The SVG file's own markup, without its XML declaration, is valid inline HTML.
    let body = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    let _ = writeln!(h, "<div class=\"plot\">{body}</div></section>");
    h
}

const HTML_HEAD: &str = "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>KVzip \
evaluation results</title><style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;\
padding:0 1em}table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid \
#ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}\
.plot svg{max-width:100%;height:auto}</style></head><body><h1>KVzip evaluation results</h1>\n";

/// Folders under `root` (itself included, up to 4 levels deep) that hold a `config.json`.
pub fn find_runs(root: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        if config_path(dir).is_file() {
            out.push(dir.to_owned());
            return Ok(());
        }
        if depth == 0 {
            return Ok(());
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        for s in subs {
            walk(&s, depth - 1, out)?;
        }
        Ok(())
    }
    if !root.is_dir() {
        return Err(EvalError::Input(format!(
            "{}: not a folder; pass --results DIR written by kvzip eval --out",
            root.display()
        )));
    }
    let mut out = Vec::new();
    walk(root, 4, &mut out)?;
    Ok(out)
}

/// Summary of one results folder, recomputed from its example files.
pub fn summarize_dir(run: &Path) -> Result<Summary> {
    let config: RunConfig = read_json(&config_path(run))?;
    let results = load_finished(run)?;
    Ok(summarize(&config, &results))
}

/// Writes `<model>-<data>.{md,json,svg,png}` per run found under `results` into `out`, plus
/// `report.md` with every table; returns the files written.
pub fn write_report(results: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let runs = find_runs(results)?;
    if runs.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no results folders (with config.json) found; run kvzip eval --out DIR first",
            results.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut written = Vec::new();
    let mut all = String::from("# KVzip evaluation results\n\n");
    let mut html = String::from(HTML_HEAD);
    for run in runs {
        let s = summarize_dir(&run)?;
        let stem = format!("{}-{}", s.model, s.data);
        let table = markdown_table(&s);
        let md = format!(
            "## {} / {}\n\n{} examples, {} queries, metric {} x100; cells: score [95% bootstrap \
             interval over contexts] (retention vs full cache).\n\n{table}\n![{stem}]({stem}.png)\n",
            s.model, s.data, s.n_examples, s.n_queries, s.metric
        );
        let md_path = out.join(format!("{stem}.md"));
        std::fs::write(&md_path, &md).map_err(io_err(&md_path))?;
        let json_path = out.join(format!("{stem}.json"));
        write_json_atomic(&json_path, &s)?;
        let (svg, png) = (
            out.join(format!("{stem}.svg")),
            out.join(format!("{stem}.png")),
        );
        plot_summary(&s, &method_order(&s), &svg, &png)?;
        let svg_text = std::fs::read_to_string(&svg).map_err(io_err(&svg))?;
        html.push_str(&html_section(&s, &svg_text));
        all.push_str(&md);
        all.push('\n');
        written.extend([md_path, json_path, svg, png]);
    }
    let report = out.join("report.md");
    std::fs::write(&report, all).map_err(io_err(&report))?;
    written.push(report);
    html.push_str("</body></html>\n");
    let page = out.join("report.html");
    std::fs::write(&page, html).map_err(io_err(&page))?;
    written.push(page);
    Ok(written)
}
