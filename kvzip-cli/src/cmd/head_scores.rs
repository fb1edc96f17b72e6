//! `kvzip head-scores`: context-independent head scores (KVZIP-SPEC §3) from sample contexts:
//! reconstruction scores per sample, max over positions, merged by element-wise max.

use std::path::PathBuf;

use anyhow::{bail, Result};
use kvzip_models::engine::kvzip::{KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_score::HeadScores;
use kvzip_templates::Task;

use crate::common::{load_model, read_text, ModelArgs};

/// Arguments of `kvzip head-scores`.
#[derive(clap::Args, Debug)]
pub struct HeadScoresArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sample context files: several after one flag (`--context a.txt b.txt`) or the flag repeated.
    #[arg(long = "context", required = true, num_args = 1..)]
    pub contexts: Vec<PathBuf>,
    /// Existing head-score files to merge in (element-wise max).
    #[arg(long)]
    pub merge: Vec<PathBuf>,
    /// Output safetensors file ([layers, kv-heads] f32).
    #[arg(long)]
    pub out: PathBuf,
}

/// `kvzip head-scores`.
pub fn head_scores(args: &HeadScoresArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let prompt = model.prompt_ids(Task::Qa)?;
    let mut merged: Option<HeadScores> = None;
    for path in &args.merge {
        let hs = HeadScores::load(path)?;
        merged = Some(match merged {
            Some(m) => m.merge_max(&hs)?,
            None => hs,
        });
    }
    for path in &args.contexts {
        let ids = model.tokenizer.encode(&read_text(path)?)?;
        let ctx = model.prefill_context(
            &prompt,
            &ids,
            &Scoring::Reconstruct {
                chunk: DEFAULT_SCORING_CHUNK,
            },
            KvType::Evict,
            false,
        )?;
        let Some(scores) = ctx.scores() else {
            bail!("scoring produced no scores for {}", path.display());
        };
        let hs =
            HeadScores::from_context_scores(scores, &model.model_id, path.display().to_string())?;
        merged = Some(match merged {
            Some(m) => m.merge_max(&hs)?,
            None => hs,
        });
        eprintln!("scored {} ({} tokens)", path.display(), ids.len());
    }
    let Some(hs) = merged else {
        bail!("nothing to save");
    };
    hs.save(&args.out)?;
    println!("{}", args.out.display());
    Ok(())
}
