//! The KVzip engine flow on the tiny random-weight fixture models (raw token ids, no tokenizer):
//! exact per-head cache lengths over multi-turn answering, score fidelity against the
//! transformers fixtures of `scripts/make_score_fixtures.py`, ratio / mode errors, retain-mode
//! re-pruning, and attention over a compacted cache against the equivalent dense cache.

use std::path::PathBuf;

use kvzip_cache::{KeepMask, KvCache, LayerKeep};
use kvzip_models::engine::kvzip::{ContextCache, KvType, Scoring};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::LogitsMode;
use kvzip_score::{select, Level};
use kvzip_templates::{reconstruction_inputs, PromptIds};
use kvzip_tests::{fixtures_dir, max_abs_diff, parity_dir};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

const ARCHS: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

/// Deterministic pseudo-random ids in `[4, vocab)` (ids 0..4 hold the fixtures' special ids).
fn random_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (4 + (state >> 33) as usize % (vocab - 4)) as u32
        })
        .collect()
}

/// Hand-built prompt pieces of random ids (the fixture models have no tokenizer).
fn random_prompt(vocab: usize) -> PromptIds {
    PromptIds {
        system_ids: random_ids(1, 10, vocab),
        postfix_ids: random_ids(2, 4, vocab),
        repeat_first_ids: random_ids(3, 6, vocab),
        repeat_next_ids: random_ids(4, 9, vocab),
    }
}

fn load(arch: &str) -> Engine {
    Engine::load(&parity_dir(arch)).unwrap_or_else(|e| panic!("{arch} fixture model loads: {e}"))
}

/// Greedy decoding of exactly `n` tokens (stop tokens cleared so the count is fixed).
fn greedy(engine: &Engine, n: usize) -> GenerateOptions {
    let mut opts = GenerateOptions::greedy(engine.spec(), n);
    opts.stop_tokens.clear();
    opts
}

fn lens(cache: &KvCache) -> Vec<Vec<usize>> {
    cache.layers().iter().map(|l| l.lens().to_vec()).collect()
}

fn prefill_scored(
    engine: &Engine,
    prompt: &PromptIds,
    ctx: &[u32],
    chunk: usize,
    kv_type: KvType,
) -> ContextCache {
    engine
        .prefill_context(
            prompt,
            ctx,
            &Scoring::Reconstruct { chunk },
            kv_type,
            &mut |_, _, _| {},
        )
        .expect("prefill + reconstruction scoring")
}

/// Expected lengths after a kept turn that fed `fed` more tokens: global layers grow by `fed`,
/// sliding-window layers hold at most `window - 1` rows after the commit.
fn grown(engine: &Engine, before: &[Vec<usize>], fed: usize, seen_after: usize) -> Vec<Vec<usize>> {
    before
        .iter()
        .enumerate()
        .map(|(l, heads)| match engine.spec().layers[l].window {
            Some(w) => heads.iter().map(|_| (w - 1).min(seen_after)).collect(),
            None => heads.iter().map(|&n| n + fed).collect(),
        })
        .collect()
}

fn multi_turn(arch: &str) {
    let engine = load(arch);
    let vocab = engine.spec().vocab_size;
    let prompt = random_prompt(vocab);
    let context = random_ids(10, 150, vocab);
    let mut ctx = prefill_scored(&engine, &prompt, &context, 64, KvType::Evict);
    let n_pre = prompt.system_ids.len() + context.len();
    assert_eq!(ctx.cache.seen_tokens(), n_pre);
    ctx.prune(0.3, Level::Pair).expect("prune 0.3");
    let pruned = lens(&ctx.cache);
    // The compacted heads really differ in length (pair level): the test below is not trivial.
    let global: Vec<usize> = (0..pruned.len())
        .filter(|&l| engine.spec().is_global(l))
        .collect();
    assert!(
        global
            .iter()
            .any(|&l| pruned[l].iter().any(|&n| n != pruned[l][0]))
            || global.windows(2).any(|w| pruned[w[0]] != pruned[w[1]])
    );

    // (query length, new tokens, keep the turn?)
    let turns = [
        (7, 5, true),
        (5, 4, false),
        (9, 6, true),
        (4, 1, true),
        (6, 5, false),
    ];
    let mut expected = pruned.clone();
    let mut seen = n_pre;
    for (i, &(q_len, n_new, keep)) in turns.iter().enumerate() {
        let query = random_ids(100 + i as u64, q_len, vocab);
        let before = ctx.cache.try_clone().unwrap();
        let mut streamed = Vec::new();
        let gen = engine
            .answer(&mut ctx, &query, &greedy(&engine, n_new), keep, &mut |t| {
                streamed.push(t);
                true
            })
            .expect("answer");
        assert_eq!(gen.tokens.len(), n_new, "{arch} turn {i}");
        assert_eq!(
            streamed, gen.tokens,
            "{arch} turn {i}: callback saw every token"
        );
        if keep {
            // The prompt and every generated token but the last were fed (the last one was
            // sampled from the final logits and never run through the model).
            let fed = q_len + n_new - 1;
            seen += fed;
            expected = grown(&engine, &expected, fed, seen);
            assert_eq!(lens(&ctx.cache), expected, "{arch} turn {i} (kept)");
            assert_eq!(ctx.cache.seen_tokens(), seen, "{arch} turn {i}");
            // The kept rows are the turn's positions, in order, in every global head.
            for l in global.iter().copied() {
                let layer = ctx.cache.layer(l).expect("layer");
                for h in 0..layer.n_kv_heads() {
                    let pos = layer.head_positions(h);
                    let tail: Vec<u32> = ((seen - fed) as u32..seen as u32).collect();
                    assert_eq!(&pos[pos.len() - fed..], &tail[..], "{arch} l{l} h{h}");
                }
            }
            // Rows already in the cache are untouched.
            for l in global.iter().copied() {
                let (a, b) = (before.layer(l).unwrap(), ctx.cache.layer(l).unwrap());
                for h in 0..a.n_kv_heads() {
                    let n = a.lens()[h];
                    assert_eq!(
                        a.head_keys(h).unwrap(),
                        &b.head_keys(h).unwrap()[..n * a.head_dim()]
                    );
                    assert_eq!(
                        a.head_values(h).unwrap(),
                        &b.head_values(h).unwrap()[..n * a.head_dim()]
                    );
                }
            }
        } else {
            // Exact restore: spans, seen_tokens, and every live K/V row and position.
            assert!(ctx.cache == before, "{arch} turn {i}: cache not restored");
            assert_eq!(lens(&ctx.cache), expected, "{arch} turn {i} (rolled back)");
            assert_eq!(ctx.cache.seen_tokens(), seen);
            // The restored cache answers the same query identically.
            let again = engine
                .answer(
                    &mut ctx,
                    &query,
                    &greedy(&engine, n_new),
                    false,
                    &mut |_| true,
                )
                .expect("answer again");
            assert_eq!(again.tokens, gen.tokens, "{arch} turn {i}: repeat differs");
            assert!(ctx.cache == before);
        }
    }
}

#[test]
fn multi_turn_lengths_llama() {
    multi_turn("llama");
}

#[test]
fn multi_turn_lengths_gemma3() {
    multi_turn("gemma3");
}

#[test]
fn generate_leaves_prompt_and_all_but_last_token() {
    let engine = load("qwen2");
    let vocab = engine.spec().vocab_size;
    let mut cache = engine.new_cache().unwrap();
    let prompt = random_ids(7, 20, vocab);
    let gen = engine
        .generate(&mut cache, &prompt, &greedy(&engine, 6), false, &mut |_| {
            true
        })
        .unwrap();
    assert_eq!(gen.tokens.len(), 6);
    assert_eq!(cache.seen_tokens(), 20 + 5);
    // A callback returning false stops after that token, which is not fed either.
    let mut cache = engine.new_cache().unwrap();
    let mut n = 0;
    let gen = engine
        .generate(&mut cache, &prompt, &greedy(&engine, 6), false, &mut |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(gen.tokens.len(), 3);
    assert_eq!(cache.seen_tokens(), 20 + 2);
    // Stopping on a stop token: the stop token is kept in `tokens` but not fed.
    let mut opts = greedy(&engine, 6);
    opts.stop_tokens = vec![gen.tokens[1]];
    let mut cache = engine.new_cache().unwrap();
    let gen2 = engine
        .generate(&mut cache, &prompt, &opts, false, &mut |_| true)
        .unwrap();
    let stop_at = gen2.tokens.len();
    assert!(gen2.stopped && stop_at <= 2);
    assert_eq!(cache.seen_tokens(), 20 + stop_at - 1);
}

// ---------------------------------------------------------------------------------------------
// Score fidelity against the transformers fixtures.

struct ScoreFixture {
    bytes: Vec<u8>,
}

impl ScoreFixture {
    fn open(arch: &str) -> Self {
        let path: PathBuf = fixtures_dir()
            .join("scores")
            .join(format!("{arch}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors")
    }

    fn raw(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    fn f32s(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (dtype, shape, data) = self.raw(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        let v = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, shape)
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        let (dtype, _, data) = self.raw(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.ints(name).into_iter().map(|x| x as u32).collect()
    }
}

fn engine_scores_match_fixture(arch: &str) {
    let fx = ScoreFixture::open(arch);
    let prompt = PromptIds {
        system_ids: fx.ids("sys_ids"),
        postfix_ids: fx.ids("postfix_ids"),
        repeat_first_ids: fx.ids("prompt_first_ids"),
        repeat_next_ids: fx.ids("prompt_next_ids"),
    };
    let context = fx.ids("ctx_ids");
    let chunk = fx.ints("chunk_size")[0] as usize;
    let scored_layers: Vec<usize> = fx
        .ints("scored_layers")
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let (want, shape) = fx.f32s("scores");
    let (n_heads, n_ctx) = (shape[1], shape[2]);
    assert_eq!(n_ctx, context.len());

    // The engine's scoring inputs are the fixture's.
    let inputs = reconstruction_inputs(
        &context,
        &prompt.postfix_ids,
        &prompt.repeat_first_ids,
        &prompt.repeat_next_ids,
        chunk,
    )
    .unwrap();
    let lens: Vec<usize> = inputs.iter().map(|c| c.input_ids.len()).collect();
    let want_lens: Vec<usize> = fx
        .ints("scoring_input_lens")
        .into_iter()
        .map(|x| x as usize)
        .collect();
    assert_eq!(lens, want_lens, "{arch}: scoring input lengths");
    let flat: Vec<u32> = inputs.iter().flat_map(|c| c.input_ids.clone()).collect();
    assert_eq!(flat, fx.ids("scoring_inputs"), "{arch}: scoring inputs");

    let engine = load(arch);
    let mut ctx = prefill_scored(&engine, &prompt, &context, chunk, KvType::Evict);
    let ours = ctx.scores().expect("reconstruction scores").clone();
    assert_eq!(ours.n_ctx(), n_ctx);
    for l in 0..ours.n_layers() {
        assert_eq!(
            ours.layer(l).is_some(),
            scored_layers.contains(&l),
            "{arch}: layer {l} scored?"
        );
    }
    let mut worst = 0.0f32;
    for (j, &l) in scored_layers.iter().enumerate() {
        for h in 0..n_heads {
            let got = ours.head(l, h).expect("scored head");
            let exp = &want[(j * n_heads + h) * n_ctx..(j * n_heads + h + 1) * n_ctx];
            worst = worst.max(max_abs_diff(got, exp));
        }
    }
    assert!(worst < 1e-4, "{arch}: max |score diff| {worst} >= 1e-4");

    // Kept sets at 0.3 agree except at near-ties with the boundary score.
    let (dtype, _, keep) = fx.raw("keep_pair_0_3");
    assert_eq!(dtype, Dtype::U8);
    let boundary = keep
        .iter()
        .zip(&want)
        .filter(|(k, _)| **k == 1)
        .map(|(_, s)| *s)
        .fold(f32::INFINITY, f32::min);
    let sel = select(&ours, 0.3, Level::Pair).unwrap();
    let want_kept = keep.iter().filter(|k| **k == 1).count();
    assert_eq!(sel.kept, want_kept, "{arch}: kept count");
    let mut flips = 0;
    for (j, &l) in scored_layers.iter().enumerate() {
        let bits = &sel.mask.layer(l).expect("scored layer mask").bits;
        for (i, &b) in bits.iter().enumerate() {
            let flat = j * n_heads * n_ctx + i;
            if b != (keep[flat] == 1) {
                assert!(
                    (want[flat] - boundary).abs() < 1e-4,
                    "{arch}: layer {l} pair {i} differs and is not a tie (score {} vs boundary {boundary})",
                    want[flat]
                );
                flips += 1;
            }
        }
    }
    eprintln!("{arch}: max score diff {worst:.2e}, keep-set tie flips {flips}");

    // Pruning with those scores keeps exactly the selected pairs in every scored head.
    let n_sys = prompt.system_ids.len();
    let report = ctx.prune(0.3, Level::Pair).unwrap();
    assert_eq!(report.ratio_real, sel.ratio_real);
    for &l in &scored_layers {
        let bits = &sel.mask.layer(l).unwrap().bits;
        let layer = ctx.cache.layer(l).unwrap();
        for h in 0..n_heads {
            let want_pos: Vec<u32> = (0..n_sys as u32)
                .chain(
                    (0..n_ctx)
                        .filter(|&p| bits[h * n_ctx + p])
                        .map(|p| (n_sys + p) as u32),
                )
                .collect();
            assert_eq!(layer.head_positions(h), &want_pos[..], "{arch} l{l} h{h}");
        }
    }
}

#[test]
fn engine_scores_match_transformers_llama() {
    engine_scores_match_fixture("llama");
}

#[test]
fn engine_scores_match_transformers_qwen2() {
    engine_scores_match_fixture("qwen2");
}

#[test]
fn engine_scores_match_transformers_qwen3() {
    engine_scores_match_fixture("qwen3");
}

#[test]
fn engine_scores_match_transformers_gemma3() {
    engine_scores_match_fixture("gemma3");
}

// ---------------------------------------------------------------------------------------------
// Errors and pruning modes.

#[test]
fn ratio_and_context_errors() {
    let engine = load("llama");
    let vocab = engine.spec().vocab_size;
    let prompt = random_prompt(vocab);
    let context = random_ids(20, 80, vocab);
    let mut ctx = prefill_scored(&engine, &prompt, &context, 32, KvType::Evict);
    let untouched = ctx.cache.try_clone().unwrap();
    for bad in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        let err = ctx
            .prune(bad, Level::Pair)
            .expect_err("bad ratio must fail");
        assert!(err.to_string().contains("ratio"), "{bad}: {err}");
        assert!(
            ctx.cache == untouched,
            "a refused prune must not change the cache"
        );
    }
    ctx.prune(0.5, Level::Pair).expect("first evict prune");
    let err = ctx
        .prune(0.3, Level::Pair)
        .expect_err("second evict prune must fail");
    assert!(err.to_string().contains("retain"), "{err}");

    let err = engine
        .prefill_context(
            &prompt,
            &[],
            &Scoring::Reconstruct { chunk: 32 },
            KvType::Evict,
            &mut |_, _, _| {},
        )
        .err()
        .expect("empty context must fail");
    assert!(err.to_string().contains("context"), "{err}");

    // Without scores there is nothing to prune by.
    let mut unscored = engine
        .prefill_context(
            &prompt,
            &context,
            &Scoring::None,
            KvType::Evict,
            &mut |_, _, _| {},
        )
        .unwrap();
    assert!(unscored.prune(0.3, Level::Pair).is_err());
    // Ratio 1 keeps everything.
    let mut all = prefill_scored(&engine, &prompt, &context, 32, KvType::Evict);
    let full = all.cache.try_clone().unwrap();
    let report = all.prune(1.0, Level::Pair).unwrap();
    assert_eq!(report.ratio_real, 1.0);
    assert_eq!(report.kv_bytes_kept, report.kv_bytes_full);
    assert!(all.cache == full);
}

#[test]
fn retain_reprune_equals_fresh_evict() {
    for arch in ["llama", "gemma3"] {
        let engine = load(arch);
        let vocab = engine.spec().vocab_size;
        let prompt = random_prompt(vocab);
        let context = random_ids(30, 120, vocab);
        let query = random_ids(31, 6, vocab);
        let opts = greedy(&engine, 6);

        let mut retain = prefill_scored(&engine, &prompt, &context, 50, KvType::Retain);
        let full_cache = retain.cache.try_clone().unwrap();
        let full_answer = engine
            .answer(&mut retain, &query, &opts, false, &mut |_| true)
            .unwrap();
        let r50 = retain.prune(0.5, Level::Pair).unwrap();
        let cache50 = retain.cache.try_clone().unwrap();
        let answer50 = engine
            .answer(&mut retain, &query, &opts, false, &mut |_| true)
            .unwrap();
        let r30 = retain.prune(0.3, Level::Pair).expect("retain re-prune");
        let answer30 = engine
            .answer(&mut retain, &query, &opts, false, &mut |_| true)
            .unwrap();

        let mut evict = prefill_scored(&engine, &prompt, &context, 50, KvType::Evict);
        let e30 = evict.prune(0.3, Level::Pair).unwrap();
        assert!(
            retain.cache == evict.cache,
            "{arch}: retain 0.3 != evict 0.3"
        );
        assert_eq!(lens(&retain.cache), lens(&evict.cache));
        assert_eq!(r30.ratio_real, e30.ratio_real);
        assert_eq!(r30.kv_bytes_kept, e30.kv_bytes_kept);
        assert_eq!(r30.kv_bytes_full, e30.kv_bytes_full);
        let evict_answer = engine
            .answer(&mut evict, &query, &opts, false, &mut |_| true)
            .unwrap();
        assert_eq!(answer30.tokens, evict_answer.tokens, "{arch}");
        assert!(r30.kv_bytes_kept < r50.kv_bytes_kept);
        assert_eq!(r30.kv_bytes_full, r50.kv_bytes_full);

        // Back up to 0.5: same cache as the first 0.5 prune; unprune: the full cache again.
        retain.prune(0.5, Level::Pair).unwrap();
        assert!(retain.cache == cache50, "{arch}: re-prune to 0.5");
        let again50 = engine
            .answer(&mut retain, &query, &opts, false, &mut |_| true)
            .unwrap();
        assert_eq!(again50.tokens, answer50.tokens);
        retain.unprune().unwrap();
        assert!(retain.cache == full_cache, "{arch}: unprune");
        let again_full = engine
            .answer(&mut retain, &query, &opts, false, &mut |_| true)
            .unwrap();
        assert_eq!(again_full.tokens, full_answer.tokens);
        // An evicted cache cannot be restored.
        assert!(evict.unprune().is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Attention over a compacted cache equals the dense cache under the same keep mask.

/// Keeping only the first `k` context positions in every head of every layer must be the same
/// as a dense cache of `system ++ context[..k]` whose RoPE positions continue at the full length:
/// the query's logits (model level, all layers) agree.
fn compacted_equals_dense(arch: &str) {
    let engine = load(arch);
    let vocab = engine.spec().vocab_size;
    let prompt = random_prompt(vocab);
    let context = random_ids(40, 90, vocab);
    let k = 37;
    let n_sys = prompt.system_ids.len();
    let mut ctx = engine
        .prefill_context(
            &prompt,
            &context,
            &Scoring::None,
            KvType::Evict,
            &mut |_, _, _| {},
        )
        .unwrap();
    let heads = engine.spec().n_kv_heads;
    let layers = (0..engine.spec().n_layers())
        .map(|_| {
            Some(LayerKeep {
                n_heads: heads,
                bits: (0..heads)
                    .flat_map(|_| (0..context.len()).map(|p| p < k))
                    .collect(),
            })
        })
        .collect();
    let mask = KeepMask::from_layers(context.len(), layers).unwrap();
    ctx.cache.compact(&mask).unwrap();

    let mut dense = engine.new_cache().unwrap();
    dense.set_spans(n_sys, k);
    engine
        .prefill(
            &mut dense,
            &prompt.prefill_ids(&context[..k]),
            LogitsMode::None,
        )
        .unwrap();
    dense.set_seen_tokens(n_sys + context.len());
    assert_eq!(lens(&ctx.cache), lens(&dense));

    let query = random_ids(41, 12, vocab);
    let mut a = ctx.cache.try_clone().unwrap();
    let la = engine.prefill(&mut a, &query, LogitsMode::All).unwrap();
    let lb = engine.prefill(&mut dense, &query, LogitsMode::All).unwrap();
    let d = max_abs_diff(&la, &lb);
    assert!(d < 1e-4, "{arch}: compacted vs dense logits differ by {d}");
    // And the positions are not those of the truncated prompt: a dense cache whose positions
    // do not continue at the full length gives different logits.
    let mut short = engine.new_cache().unwrap();
    engine
        .prefill(
            &mut short,
            &prompt.prefill_ids(&context[..k]),
            LogitsMode::None,
        )
        .unwrap();
    let ls = engine.prefill(&mut short, &query, LogitsMode::All).unwrap();
    assert!(
        max_abs_diff(&la, &ls) > 1e-4,
        "{arch}: RoPE offset had no effect"
    );
}

#[test]
fn compacted_attention_equals_dense_masked() {
    // Gemma3 is left out: its sliding layers keep the last window of the full context, which
    // a truncated dense prefill cannot reproduce.
    for arch in ["llama", "qwen2", "qwen3"] {
        compacted_equals_dense(arch);
    }
}

#[test]
fn all_archs_prune_and_answer() {
    // Smoke over every architecture: prune at several levels, answer, restore.
    for arch in ARCHS {
        let engine = load(arch);
        let vocab = engine.spec().vocab_size;
        let prompt = random_prompt(vocab);
        let context = random_ids(50, 100, vocab);
        let query = random_ids(51, 5, vocab);
        for level in [Level::Pair, Level::PairUniform, Level::Head] {
            let mut ctx = prefill_scored(&engine, &prompt, &context, 40, KvType::Evict);
            let report = ctx.prune(0.3, level).unwrap();
            // Head level keeps whole heads, so its real ratio is coarse.
            let tol = if level == Level::Head { 0.35 } else { 0.02 };
            assert!(
                (report.ratio_real - 0.3).abs() < tol,
                "{arch} {level:?}: ratio_real {}",
                report.ratio_real
            );
            let before = ctx.cache.try_clone().unwrap();
            let gen = engine
                .answer(&mut ctx, &query, &greedy(&engine, 4), false, &mut |_| true)
                .unwrap();
            assert_eq!(gen.tokens.len(), 4);
            assert!(ctx.cache == before);
        }
    }
}
