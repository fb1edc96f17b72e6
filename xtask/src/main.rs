//! `cargo xtask <task>`: developer tasks that are not plain cargo commands.
//!
//! - `ci`: run `.ci/run` (fmt, clippy, cuda build check, tests) exactly as CI does.
//! - `fixtures [parity|scores|templates|real]`: regenerate committed fixtures with the Python
//!   scripts in `scripts/` (needs a Python with torch + transformers; set `KVZIP_PYTHON`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn fixtures(which: &[String]) -> Result<()> {
    let python = std::env::var("KVZIP_PYTHON").unwrap_or_else(|_| "python3".into());
    let all = ["parity", "scores", "templates", "real"];
    let selected: Vec<&str> = if which.is_empty() {
        all.to_vec()
    } else {
        which.iter().map(String::as_str).collect()
    };
    for name in selected {
        let script = match name {
            "parity" => "scripts/make_parity_fixtures.py",
            "scores" => "scripts/make_score_fixtures.py",
            "templates" => "scripts/make_template_fixtures.py",
            "real" => "scripts/make_real_model_fixtures.py",
            other => bail!("unknown fixture set {other:?}; expected one of {all:?}"),
        };
        run(Command::new(&python).arg(script).current_dir(repo_root()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => run(Command::new("bash").arg(".ci/run").current_dir(repo_root())),
        Some("fixtures") => fixtures(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | cargo xtask fixtures [parity|scores|templates|real]"
            );
            bail!("no task given")
        }
    }
}
