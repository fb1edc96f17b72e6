//! Shared CLI plumbing: model resolution (auto-fetch of the default model), tokenizer and KVzip
//! prompt pieces, progress bars, and JSON output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvzip_hub::fetch::{default_cache_dir, resolve_model};
use kvzip_models::engine::kvzip::{ContextCache, KvType, Scoring};
use kvzip_models::engine::Engine;
use kvzip_models::Device;
use kvzip_templates::{PromptIds, PromptPieces, Task, Tokenizer};

/// `--model` and `--device`: which model, and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory or short name (fetched when it is the default and missing).
    #[arg(long, default_value = kvzip_hub::fetch::DEFAULT_MODEL)]
    pub model: String,
    /// Where to run: cpu, cuda (GPU 0) or cuda:N. CUDA needs a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// Opens the device (a clear error for CUDA in a build without the feature or without a GPU).
    pub fn open(&self) -> Result<Device> {
        Device::parse(&self.device).with_context(|| format!("--device {}", self.device))
    }
}

/// A model ready to run: engine, tokenizer, and identity.
pub struct LoadedModel {
    /// The engine.
    pub engine: Engine,
    /// Its tokenizer (with chat template when the model has one).
    pub tokenizer: Tokenizer,
    /// Model directory.
    pub dir: PathBuf,
    /// Short name (last path component).
    pub name: String,
    /// Fingerprint of the weights (`wfp-…`, see `kvzip_models::fingerprint`): the identity
    /// recorded in saved caches and head-score files; a renamed directory keeps it.
    pub model_id: String,
}

/// Resolves `--model` (directory or short name; the default model is fetched when missing).
pub fn resolve(model: &str) -> Result<PathBuf> {
    let cache = default_cache_dir().context("cannot determine the kvzip cache directory")?;
    Ok(resolve_model(model, &cache, true)?)
}

/// Loads model and tokenizer from `--model` onto `--device` (weights go straight from the
/// mapped checkpoint into the device's memory, converted per tensor).
pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    let device = args.open()?;
    let model = args.model.as_str();
    let dir = resolve(model)?;
    let engine = Engine::load_on(&dir, &device)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_owned());
    // Identity by content (weights), not by directory name: caches and head scores record it.
    let model_id = kvzip_models::fingerprint::weights_fingerprint(&dir)?;
    Ok(LoadedModel {
        model_id,
        engine,
        tokenizer,
        dir,
        name,
    })
}

impl LoadedModel {
    /// KVzip prompt pieces: derived from the model's own chat template when it has one;
    /// a base model without one gets the plain-text pieces ([`PromptPieces::plain`]: BOS, task
    /// line, context, question, `Answer:`), never a chat format it was not trained on.
    pub fn prompt_pieces(&self, task: Task) -> Result<PromptPieces> {
        match self.tokenizer.chat_template() {
            Ok(t) => Ok(PromptPieces::from_chat_template(&t, task)?),
            Err(_) => {
                self.note_plain_format();
                Ok(PromptPieces::plain(self.bos_text()?.as_deref(), task))
            }
        }
    }

    /// The text of the special tokens the tokenizer puts before a raw prompt (its BOS), if any.
    pub fn bos_text(&self) -> Result<Option<String>> {
        let with = self.tokenizer.encode_prompt("a")?;
        let without = self.tokenizer.encode("a")?;
        if with.len() > without.len() && with.ends_with(&without) {
            let prefix = &with[..with.len() - without.len()];
            return Ok(Some(self.tokenizer.decode(prefix, false)?));
        }
        Ok(None)
    }

    /// Head scores loaded from files, checked to belong to these weights (same fingerprint):
    /// a file of another model with the same shape is refused.
    pub fn load_head_scores(&self, paths: &[PathBuf]) -> Result<kvzip_score::HeadScores> {
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let hs = kvzip_score::HeadScores::load_merged(&refs)?;
        if hs.model != self.model_id {
            anyhow::bail!(
                "--head-scores {}: computed for model {:?}, but {} has fingerprint {}; recompute \
                 them with `kvzip head-scores --model {}`",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                hs.model,
                self.name,
                self.model_id,
                self.dir.display()
            );
        }
        Ok(hs)
    }

    /// Says once on stderr that the model has no chat template and the plain format is used.
    pub fn note_plain_format(&self) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "note: {} has no chat template (a base model): prompts use the plain-text format \
                 (no chat turns; see README \"Base models\")",
                self.name
            )
        });
    }

    /// Token ids of the prompt pieces.
    pub fn prompt_ids(&self, task: Task) -> Result<PromptIds> {
        Ok(self.prompt_pieces(task)?.encode(&self.tokenizer)?)
    }

    /// [`kvzip_models::engine::Engine::prefill_context`] with a progress bar on stderr (hidden
    /// when `quiet`) showing the prefill and scoring stages.
    pub fn prefill_context(
        &self,
        prompt: &PromptIds,
        context_ids: &[u32],
        scoring: &Scoring,
        kv_type: KvType,
        quiet: bool,
    ) -> Result<ContextCache> {
        let pb = progress_bar(context_ids.len() as u64, "prefill", quiet);
        let ctx = self.engine.prefill_context(
            prompt,
            context_ids,
            scoring,
            kv_type,
            &mut |stage, done, total| {
                pb.set_prefix(stage.to_owned());
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            },
        )?;
        pb.finish_and_clear();
        Ok(ctx)
    }

    /// Ids that end generation: the model's EOS ids plus the tokenizer's EOS/end-of-turn tokens.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut ids = self.engine.spec().eos_token_ids.clone();
        for tok in [
            "<|im_end|>",
            "<|eot_id|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<eos>",
        ] {
            if let Some(id) = self.tokenizer.token_to_id(tok) {
                if self.tokenizer.is_special(id) && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids.extend(self.tokenizer.special_tokens().eos_ids.iter().copied());
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// `cpu` or `cuda`: the device kind reported in JSON output.
    pub fn device_kind(&self) -> &'static str {
        if self.engine.device().is_cuda() {
            "cuda"
        } else {
            "cpu"
        }
    }
}

/// A progress bar on stderr for `total` units, hidden when `quiet`.
pub fn progress_bar(total: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_owned());
    pb
}

/// Reads a UTF-8 text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Peak resident memory of this process in bytes (`VmHWM` of `/proc/self/status`; `None` where
/// the OS has no such file).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
