//! The whole KVzip flow, table-driven over every architecture, on every device this build and
//! machine have: prefill + reconstruction scoring, pair-level prune (retain: re-prunable;
//! evict: compacted), head-level prune from head scores, answering without changing the cache,
//! save and load (also across devices), answering again.
//!
//! On the CPU the flow runs on the HF parity fixtures themselves. With the `cuda` feature and a
//! GPU, every architecture runs on CUDA with raised head dims and bf16-exact weights, compared
//! with the CPU flow on the same weights (bf16 tolerances), and caches cross devices both ways.

use std::path::Path;

use kvzip_cache::{CacheFileMeta, DeviceKv, KvCache};
use kvzip_models::engine::kvzip::{ContextCache, KvType, PruneReport, Scoring};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::Device;
use kvzip_score::{ContextScores, HeadScores, Level};
use kvzip_templates::PromptIds;
use kvzip_tests::parity_dir;
use kvzip_tests::synthetic::{random_ids, ARCHS};

/// What one run of the flow produced.
struct Flow {
    scores: ContextScores,
    pair: PruneReport,
    pair_answer: Vec<u32>,
    head: PruneReport,
    head_answer: Vec<u32>,
    /// The evicted pair-0.3 context, kept to save across devices.
    evicted: ContextCache,
}

fn prompt() -> PromptIds {
    PromptIds {
        system_ids: vec![1, 2, 3, 4],
        postfix_ids: vec![5, 6],
        repeat_first_ids: vec![7, 8, 9],
        repeat_next_ids: vec![10, 11, 12, 13],
    }
}

/// The context: 700 tokens, or half the model's positions when that is less (the tiny
/// fixtures allow 512); scored in three chunks.
fn context(engine: &Engine) -> Vec<u32> {
    let n = (engine.spec().max_position_embeddings / 2).min(700);
    random_ids(n, engine.spec().vocab_size, 11)
        .into_iter()
        .map(|x| x.max(20))
        .collect()
}

fn query(vocab: usize) -> Vec<u32> {
    random_ids(9, vocab, 5)
}

fn greedy(engine: &Engine) -> GenerateOptions {
    let mut opts = GenerateOptions::greedy(engine.spec(), 6);
    opts.stop_tokens.clear();
    opts
}

fn answer(engine: &Engine, ctx: &mut ContextCache) -> Vec<u32> {
    let q = query(engine.spec().vocab_size);
    let before = ctx.cache.lens();
    let seen = ctx.cache.seen_tokens();
    let gen = engine
        .answer(ctx, &q, &greedy(engine), false, &mut |_| true)
        .expect("answer");
    assert_eq!(
        ctx.cache.lens(),
        before,
        "update_cache = false changed the cache"
    );
    assert_eq!(ctx.cache.seen_tokens(), seen);
    assert_eq!(gen.tokens.len(), 6);
    gen.tokens
}

fn meta(engine: &Engine, ctx: &ContextCache) -> CacheFileMeta {
    CacheFileMeta {
        model_id: format!("{}@test", engine.spec().architecture),
        ratio_requested: Some(0.3),
        ratio_real: None,
        level: Some("pair".into()),
        token_ids: ctx.prefill_ids.clone(),
        extra: Default::default(),
    }
}

/// Loads a saved cache onto `engine`'s device and answers from it.
fn answer_from_file(engine: &Engine, path: &Path) -> Vec<u32> {
    let storage = DeviceKv::new(engine.device().clone());
    let (cache, meta) = KvCache::load_in(storage, path).expect("load cache");
    let mut ctx = ContextCache::from_saved(cache, meta.token_ids).expect("saved context");
    answer(engine, &mut ctx)
}

/// The flow on one engine; `dir` receives the saved cache as `<tag>.kvzip`.
fn run_flow(engine: &Engine, dir: &Path, tag: &str) -> Flow {
    let (prompt, ctx_ids) = (prompt(), context(engine));
    let scoring = Scoring::Reconstruct {
        chunk: ctx_ids.len().div_ceil(3),
    };
    let noop = &mut |_: &str, _: usize, _: usize| {};

    // Retain: prune at 0.5, then at 0.3 (re-prunable).
    let mut retain = engine
        .prefill_context(&prompt, &ctx_ids, &scoring, KvType::Retain, noop)
        .expect("prefill + scoring (retain)");
    let scores = retain.scores.clone().expect("reconstruction scores");
    retain.prune(0.5, Level::Pair).expect("prune 0.5");
    let _ = answer(engine, &mut retain);
    let pair = retain.prune(0.3, Level::Pair).expect("re-prune 0.3");
    if engine.scored_layer_heads().iter().any(Option::is_some) {
        assert!(
            (pair.ratio_real - 0.3).abs() < 0.01,
            "{tag}: ratio {}",
            pair.ratio_real
        );
        assert!(pair.kv_bytes_kept < pair.kv_bytes_full);
    } else {
        // Every layer is a sliding-window layer: nothing is scored or evicted (the window
        // already bounds the cache).
        assert_eq!(pair.ratio_real, 1.0, "{tag}");
    }
    let pair_answer = answer(engine, &mut retain);

    // Evict at 0.3: the same kept set, compacted in place, answers like the retain view.
    let mut evicted = engine
        .prefill_context(&prompt, &ctx_ids, &scoring, KvType::Evict, noop)
        .expect("prefill + scoring (evict)");
    let report = evicted.prune(0.3, Level::Pair).expect("prune (evict)");
    assert_eq!(report.ratio_real, pair.ratio_real, "{tag}: evict vs retain");
    assert_eq!(report.kv_bytes_kept, pair.kv_bytes_kept);
    assert_eq!(
        answer(engine, &mut evicted),
        pair_answer,
        "{tag}: evict vs retain answers"
    );
    assert!(
        evicted.prune(0.2, Level::Pair).is_err(),
        "{tag}: evicted caches cannot be re-pruned"
    );

    // Save, load on the same device, answer again: identical.
    let path = dir.join(format!("{tag}.kvzip"));
    evicted
        .cache
        .save(&path, &meta(engine, &evicted))
        .expect("save");
    assert_eq!(
        answer_from_file(engine, &path),
        pair_answer,
        "{tag}: answer after save + load"
    );

    // Head level from context-independent head scores (whole heads kept).
    let hs = HeadScores::from_context_scores(&scores, "test", "flow").expect("head scores");
    let mut heads = engine
        .prefill_context(
            &prompt,
            &ctx_ids,
            &Scoring::HeadScores(hs),
            KvType::Evict,
            noop,
        )
        .expect("prefill with head scores");
    let head = heads.prune(0.5, Level::Head).expect("head prune");
    assert!(head.kv_bytes_kept <= head.kv_bytes_full);
    let head_answer = answer(engine, &mut heads);

    // Sliding-window layers hold at most their window after a commit (memory freed).
    for (l, ls) in engine.spec().layers.iter().enumerate() {
        if let Some(w) = ls.window {
            let layer = evicted.cache.layer(l).expect("layer");
            assert!(
                layer.capacity_rows() <= layer.n_kv_heads() * (w - 1 + kvzip_cache::MIN_HEAD_SLACK),
                "{tag}: sliding layer {l} keeps {} rows of capacity for window {w}",
                layer.capacity_rows()
            );
        }
    }
    Flow {
        scores,
        pair,
        pair_answer,
        head,
        head_answer,
        evicted,
    }
}

/// Writes a copy of the model in `src` into `dst` with `sliding_window: null` (Mistral v0.2+
/// have no window: every layer is global and scored).
fn without_window(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).expect("model dir").flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
    let path = dst.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("json");
    cfg["sliding_window"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_vec(&cfg).expect("json")).expect("write");
}

#[test]
fn kvzip_flow_cpu_every_architecture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full_mistral = tempfile::tempdir().expect("tempdir");
    without_window(&parity_dir("mistral"), full_mistral.path());
    let models = ARCHS
        .iter()
        .map(|(name, _)| (name.to_string(), parity_dir(name)))
        .chain([("mistral-full".to_string(), full_mistral.path().to_owned())]);
    for (name, model_dir) in models {
        let name = name.as_str();
        let engine = Engine::load(&model_dir).expect("fixture model");
        let flow = run_flow(&engine, dir.path(), name);
        assert!(flow.scores.check_no_nan().is_ok());
        assert!(flow.head.ratio_real > 0.0 && flow.head.ratio_real <= 1.0);
        assert_eq!(
            flow.evicted.kv_bytes_context(),
            flow.pair.kv_bytes_kept,
            "{name}: the evicted cache holds what the prune reported"
        );
        eprintln!(
            "[flow] {name} cpu: pair 0.3 -> {:?}, head 0.5 (real {:.2}) -> {:?}",
            flow.pair_answer, flow.head.ratio_real, flow.head_answer
        );
    }
}

#[test]
fn cuda_in_a_build_without_it_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let err = Device::cuda(0).expect_err("no CUDA in this build");
    assert!(err.to_string().contains("--features cuda"), "{err}");
}

/// CUDA vs CPU on the same bf16-exact weights for every architecture, and caches crossing
/// devices both ways.
#[cfg(feature = "cuda")]
#[test]
fn kvzip_flow_cuda_matches_cpu_every_architecture() {
    use kvzip_tests::synthetic::{make_model, rel_err};

    let gpu = Device::cuda(0).expect("these tests need a CUDA GPU");
    let agree = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    for (name, head_dim) in ARCHS.into_iter().chain([("mistral-full", 64)]) {
        let dir = tempfile::tempdir().expect("tempdir");
        if name == "mistral-full" {
            let windowed = tempfile::tempdir().expect("tempdir");
            make_model("mistral", head_dim, windowed.path());
            without_window(windowed.path(), dir.path());
        } else {
            make_model(name, head_dim, dir.path());
        }
        let cpu_engine = Engine::load(dir.path()).expect("cpu load");
        let gpu_engine = Engine::load_on(dir.path(), &gpu).expect("gpu load");
        let cpu = run_flow(&cpu_engine, dir.path(), &format!("{name}-cpu"));
        let cuda = run_flow(&gpu_engine, dir.path(), &format!("{name}-cuda"));
        for (l, layer) in cpu.scores.scored_layers() {
            let g = cuda.scores.layer(l).expect("layer scored on the GPU");
            let e = rel_err(&g.values, &layer.values);
            assert!(e <= 5e-2, "{name}: layer {l} scores rel err {e}");
        }
        assert!(
            (cuda.pair.ratio_real - cpu.pair.ratio_real).abs() < 1e-9,
            "{name}: kept fraction differs"
        );
        assert_eq!(
            cuda.pair.kv_bytes_full * 2,
            cpu.pair.kv_bytes_full,
            "{name}: context bytes (bf16 vs f32)"
        );
        assert!(
            agree(&cuda.pair_answer, &cpu.pair_answer) >= 3,
            "{name}: pruned answers cpu {:?} cuda {:?}",
            cpu.pair_answer,
            cuda.pair_answer
        );
        assert!(
            agree(&cuda.head_answer, &cpu.head_answer) >= 3,
            "{name}: head-level answers cpu {:?} cuda {:?}",
            cpu.head_answer,
            cuda.head_answer
        );
        // Compressed on the GPU, answered on the CPU (and the other way round): the rows cross
        // devices through the file, and each side answers like the device that compressed it.
        let from_gpu = dir.path().join(format!("{name}-cuda.kvzip"));
        let from_cpu = dir.path().join(format!("{name}-cpu.kvzip"));
        let cpu_answers_gpu_cache = answer_from_file(&cpu_engine, &from_gpu);
        let gpu_answers_cpu_cache = answer_from_file(&gpu_engine, &from_cpu);
        assert!(
            agree(&cpu_answers_gpu_cache, &cuda.pair_answer) >= 3,
            "{name}: GPU cache on the CPU {cpu_answers_gpu_cache:?} vs {:?}",
            cuda.pair_answer
        );
        assert!(
            agree(&gpu_answers_cpu_cache, &cpu.pair_answer) >= 3,
            "{name}: CPU cache on the GPU {gpu_answers_cpu_cache:?} vs {:?}",
            cpu.pair_answer
        );
        assert_eq!(
            cuda.evicted.cache.lens(),
            {
                let (c, _) = KvCache::load(&from_gpu).expect("reload");
                c.lens()
            },
            "{name}: lengths survive the file"
        );
        eprintln!(
            "[flow] {name} d={head_dim}: cpu {:?} cuda {:?}; cross {:?} / {:?}",
            cpu.pair_answer, cuda.pair_answer, cpu_answers_gpu_cache, gpu_answers_cpu_cache
        );
    }
}
