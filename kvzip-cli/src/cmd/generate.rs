//! `kvzip generate` and `kvzip chat`: plain generation with the chat template, streamed.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{bail, Result};
use kvzip_kernels::sampling::SamplingParams;
use kvzip_models::engine::GenerateOptions;
use kvzip_templates::ChatMessage;
use serde_json::json;

use kvzip_models::LogitsMode;

use crate::common::{load_model, print_json, progress_bar, LoadedModel, ModelArgs};

/// Prompts longer than this many tokens get a prefill progress bar.
const LONG_PROMPT_TOKENS: usize = 512;

/// Sampling flags shared by generate, chat and run.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Generation options for `model`.
    pub fn options(&self, model: &LoadedModel) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            stop_tokens: model.stop_tokens(),
        }
    }
}

/// Arguments of `kvzip generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Ids of a conversation: the model's chat template with the generation prompt, or, for a
/// base model without one, the plain-text format (see [`plain_conversation`]) with the
/// tokenizer's BOS.
fn conversation_ids(model: &LoadedModel, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    match model.tokenizer.chat_template() {
        Ok(t) => Ok(model.tokenizer.encode(&t.render(messages, true)?)?),
        Err(_) => {
            model.note_plain_format();
            Ok(model
                .tokenizer
                .encode_prompt(&plain_conversation(messages))?)
        }
    }
}

/// The plain-text conversation format for base models: a single user message is sent as it
/// is (a continuation prompt); otherwise `System: …`, `User: …`, `Assistant: …` blocks separated
/// by blank lines, ending with `Assistant:`.
pub fn plain_conversation(messages: &[ChatMessage]) -> String {
    if let [only] = messages {
        if only.role == "user" {
            return only.content.clone();
        }
    }
    let mut out: Vec<String> = messages
        .iter()
        .map(|m| {
            let mut role = m.role.clone();
            if let Some(first) = role.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            format!("{role}: {}", m.content)
        })
        .collect();
    out.push("Assistant:".into());
    out.join("\n\n")
}

/// Generates from `ids` on `cache`, streaming text to stdout unless `quiet`.
fn stream_generate(
    model: &LoadedModel,
    cache: &mut kvzip_cache::KvCache,
    ids: &[u32],
    opts: &GenerateOptions,
    quiet: bool,
) -> Result<(Vec<u32>, String, f64)> {
    // Refuse before any work what cannot fit the model's positions.
    let max = model.engine.spec().max_position_embeddings;
    let have = cache.seen_tokens();
    if have + ids.len() + opts.max_new_tokens > max {
        anyhow::bail!(
            "{} prompt tokens{} + --max-new-tokens {} exceed the model's max_position_embeddings \
             {max}; shorten the prompt or lower --max-new-tokens",
            ids.len(),
            if have > 0 {
                format!(" after {have} earlier tokens")
            } else {
                String::new()
            },
            opts.max_new_tokens
        );
    }
    // Long prompts: prefill all but the last token with a progress bar, then generate.
    let ids = if ids.len() > LONG_PROMPT_TOKENS {
        let (head, last) = ids.split_at(ids.len() - 1);
        let pb = progress_bar(head.len() as u64, "prefill", quiet);
        model
            .engine
            .feed(cache, head, LogitsMode::None, &mut |done, _| {
                pb.set_position(done as u64)
            })?;
        pb.finish_and_clear();
        last
    } else {
        ids
    };
    let mut stream = model.tokenizer.decode_stream(true);
    let mut text = String::new();
    let mut out = std::io::stdout();
    let t0 = Instant::now();
    let mut err = None;
    let gen = model.engine.generate(cache, ids, opts, false, &mut |id| {
        match stream.step(id) {
            Ok(Some(delta)) => {
                if !quiet {
                    print!("{delta}");
                    let _ = out.flush();
                }
                text.push_str(&delta);
            }
            Ok(None) => {}
            Err(e) => err = Some(e),
        }
        true
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    if let Some(rest) = stream.flush()? {
        if !quiet {
            print!("{rest}");
        }
        text.push_str(&rest);
    }
    Ok((gen.tokens, text, t0.elapsed().as_secs_f64() * 1e3))
}

/// `kvzip generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    // A raw prompt gets the tokenizer's special tokens (BOS) as transformers adds them; a
    // rendered chat template carries its own.
    let ids = if args.raw {
        model.tokenizer.encode_prompt(&args.prompt)?
    } else {
        conversation_ids(&model, &[ChatMessage::new("user", args.prompt.clone())])?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let opts = args.sampling.options(&model);
    let mut cache = model.engine.new_cache()?;
    let t0 = Instant::now();
    let (tokens, answer, gen_ms) = stream_generate(&model, &mut cache, &ids, &opts, args.json)?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    if args.json {
        print_json(&json!({
            "model": model.name,
            "prompt": args.prompt,
            "prompt_tokens": ids.len(),
            "output": answer,
            "output_tokens": tokens.len(),
            "timings_ms": {"total": total_ms, "generate": gen_ms},
        }))?;
    } else {
        println!();
    }
    Ok(())
}

/// Arguments of `kvzip chat`.
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `kvzip chat`: multi-turn; the KV cache is kept between turns and only the new part of the
/// rendered conversation is fed each turn.
pub fn chat(args: &ChatArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let opts = args.sampling.options(&model);
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    let mut cache = model.engine.new_cache()?;
    let mut fed: Vec<u32> = Vec::new();
    eprintln!(
        "kvzip chat with {} (empty line or Ctrl-D to quit)",
        model.name
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line.trim().to_owned()));
        let ids = conversation_ids(&model, &messages)?;
        // Reuse the cache when the rendered conversation extends what was fed.
        let new = if ids.len() > fed.len() && ids[..fed.len()] == fed[..] {
            &ids[fed.len()..]
        } else {
            cache = model.engine.new_cache()?;
            fed.clear();
            &ids[..]
        };
        let (tokens, answer, _) = stream_generate(&model, &mut cache, new, &opts, false)?;
        println!();
        model.engine.commit_windows(&mut cache)?;
        // The cache holds the prompt and every generated token but the last (never fed); the
        // next turn's rendered conversation brings that token back as part of its new ids.
        fed = ids;
        fed.extend_from_slice(&tokens[..tokens.len().saturating_sub(1)]);
        messages.push(ChatMessage::new("assistant", answer.trim().to_owned()));
    }
    Ok(())
}
