//! `kvzip report`: per results folder, a markdown table of score vs ratio per method (the
//! full-cache row first, retention relative to full in parentheses), the summary JSON, and a
//! score-vs-ratio plot (SVG + PNG).

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

/// The markdown table: one column per method, rows = ratios (full cache first, then
/// descending); cells `score (retention %)`, retention = score / full-cache score.
pub fn markdown_table(s: &Summary) -> String {
    let order = method_order(s);
    let full = s.full_score().unwrap_or(0.0);
    let mut ratios: Vec<f64> = s
        .methods
        .values()
        .flatten()
        .map(|p| p.ratio)
        .filter(|r| *r < 1.0)
        .collect();
    ratios.sort_by(|a, b| b.total_cmp(a));
    ratios.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let mut t = String::new();
    let _ = writeln!(t, "| ratio | {} |", order.join(" | "));
    let _ = writeln!(t, "|---|{}", "---|".repeat(order.len()));
    let _ = writeln!(
        t,
        "| 1.0 (full) | {} |",
        order
            .iter()
            .map(|_| format!("{full:.1}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for r in ratios {
        let cells: Vec<String> = order
            .iter()
            .map(|m| match s.score_at(m, r) {
                Some(v) if full > 0.0 => format!("{v:.1} ({:.0}%)", 100.0 * v / full),
                Some(v) => format!("{v:.1}"),
                None => "-".to_owned(),
            })
            .collect();
        let _ = writeln!(t, "| {r:.1} | {} |", cells.join(" | "));
    }
    t
}

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
    for run in runs {
        let s = summarize_dir(&run)?;
        let stem = format!("{}-{}", s.model, s.data);
        let table = markdown_table(&s);
        let md = format!(
            "## {} / {}\n\n{} examples, {} queries, metric {} x100; cells: score (retention vs full \
             cache).\n\n{table}\n![{stem}]({stem}.png)\n",
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
        all.push_str(&md);
        all.push('\n');
        written.extend([md_path, json_path, svg, png]);
    }
    let report = out.join("report.md");
    std::fs::write(&report, all).map_err(io_err(&report))?;
    written.push(report);
    Ok(written)
}
