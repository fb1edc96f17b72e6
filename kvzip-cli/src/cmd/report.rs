//! `kvzip report`: tables (score vs ratio per method, retention vs full cache), summary JSON
//! and score-vs-ratio plots (SVG + PNG) from `kvzip eval` results folders.

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `kvzip report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A results folder of `kvzip eval --out`, or a folder above several.
    #[arg(long)]
    pub results: PathBuf,
    /// Where to write the report files (default: <results>/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `kvzip report`.
pub fn report(args: &ReportArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.results.join("report"));
    for f in kvzip_eval::report::write_report(&args.results, &out)? {
        println!("{}", f.display());
    }
    Ok(())
}
