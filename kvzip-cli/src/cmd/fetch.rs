//! `kvzip fetch` and `kvzip import-gguf`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvzip_hub::fetch::{default_cache_dir, fetch_model, KNOWN_MODELS};
use kvzip_hub::gguf::{import_gguf, ImportOptions};

/// Arguments of `kvzip fetch`.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Short name of the model (see `kvzip fetch --list`).
    #[arg(default_value = kvzip_hub::fetch::DEFAULT_MODEL)]
    pub name: String,
    /// List the known models and exit.
    #[arg(long)]
    pub list: bool,
}

/// `kvzip fetch`.
pub fn fetch(args: &FetchArgs) -> Result<()> {
    if args.list {
        for m in KNOWN_MODELS {
            println!("{}", m.name);
        }
        return Ok(());
    }
    let cache = default_cache_dir().context("cannot determine the kvzip cache directory")?;
    let dir = fetch_model(&args.name, &cache)?;
    println!("{}", dir.display());
    Ok(())
}

/// Arguments of `kvzip import-gguf`.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Output model directory (created atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Directory with an HF tokenizer.json for SentencePiece vocabularies (gemma).
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// A base (not instruction-tuned) model: write no chat template.
    #[arg(long)]
    pub base_model: bool,
}

/// `kvzip import-gguf`.
pub fn import(args: &ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        sentencepiece_tokenizer_dir: args.tokenizer_dir.clone(),
        cache_dir: None,
        overwrite: args.overwrite,
        progress: true,
        base_model: args.base_model,
    };
    let report = import_gguf(&args.file, &args.out, &opts)?;
    println!(
        "imported {} ({} tensors, {} parameters, tokenizer from {}) into {}",
        report.architecture,
        report.tensors_written.len(),
        report.n_parameters,
        report.tokenizer_source,
        report.out_dir.display()
    );
    Ok(())
}
