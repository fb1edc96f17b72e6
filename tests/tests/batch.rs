//! Continuous batching: many sequences decoding together, each a shared read-only context
//! (a compressed cache) plus a private suffix in one pool, give the same greedy tokens and
//! logits as answering each alone from its context — on every architecture. Sequences join and
//! leave the batch at different steps, and the shared context is never changed.

use kvzip_cache::KvCache;
use kvzip_kernels::sampling::argmax;
use kvzip_models::batch::{BatchSeq, BatchStep, SuffixPool};
use kvzip_models::engine::kvzip::{KvType, Scoring};
use kvzip_models::engine::{Engine, GenerateOptions};
use kvzip_models::LogitsMode;
use kvzip_score::Level;
use kvzip_templates::PromptIds;
use kvzip_tests::parity_dir;
use kvzip_tests::synthetic::{random_ids, ARCHS};

const NEW_TOKENS: usize = 6;

struct Request<'a> {
    context: &'a KvCache,
    prompt: Vec<u32>,
    /// Decode step at which the request arrives.
    arrives: usize,
}

/// Runs the requests through one pool with continuous batching; returns each request's
/// greedy tokens and per-token logits.
fn serve(engine: &Engine, reqs: &[Request<'_>]) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let dev = engine.device().clone();
    let mut pool = SuffixPool::new(&dev, engine.spec(), 3, 8).expect("pool");
    let mut out: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(Vec::new(), Vec::new()); reqs.len()];
    // (request, slot, next token to feed)
    let mut running: Vec<(usize, usize, u32)> = Vec::new();
    let mut waiting: Vec<usize> = (0..reqs.len()).collect();
    let mut step = 0;
    while !running.is_empty() || !waiting.is_empty() {
        // Admit arrived requests while slots are free: prefill their prompt alone.
        let mut still = Vec::new();
        for r in waiting {
            if reqs[r].arrives > step {
                still.push(r);
                continue;
            }
            let Some(slot) = pool.acquire() else {
                still.push(r);
                continue;
            };
            let seqs = vec![BatchSeq {
                context: reqs[r].context,
                slot,
            }];
            let t = reqs[r].prompt.len();
            let mut bs = BatchStep::new(&mut pool, seqs, t, None);
            let logits = engine
                .forward_step(&reqs[r].prompt, &mut bs, LogitsMode::Last)
                .expect("prompt")
                .expect("logits");
            let row = dev.to_host_f32(&logits.view()).expect("download");
            let next = argmax(&row) as u32;
            out[r].0.push(next);
            out[r].1.push(row);
            running.push((r, slot, next));
        }
        waiting = still;
        // Finished requests leave.
        let mut keep = Vec::new();
        for (r, slot, tok) in running {
            if out[r].0.len() >= NEW_TOKENS {
                pool.release(slot).expect("release");
            } else {
                keep.push((r, slot, tok));
            }
        }
        running = keep;
        if running.is_empty() {
            step += 1;
            continue;
        }
        // One decode step of every running request.
        let ids: Vec<u32> = running.iter().map(|x| x.2).collect();
        let seqs: Vec<BatchSeq<'_>> = running
            .iter()
            .map(|&(r, slot, _)| BatchSeq {
                context: reqs[r].context,
                slot,
            })
            .collect();
        let mut bs = BatchStep::new(&mut pool, seqs, 1, None);
        let logits = engine
            .forward_step(&ids, &mut bs, LogitsMode::All)
            .expect("decode step")
            .expect("logits");
        let all = dev.to_host_f32(&logits.view()).expect("download");
        let vocab = engine.spec().vocab_size;
        for (i, x) in running.iter_mut().enumerate() {
            let row = all[i * vocab..(i + 1) * vocab].to_vec();
            x.2 = argmax(&row) as u32;
            out[x.0].0.push(x.2);
            out[x.0].1.push(row);
        }
        step += 1;
    }
    assert!(pool.is_empty(), "every slot is released at the end");
    out
}

#[test]
fn batched_decode_equals_answering_alone_every_architecture() {
    for (name, _) in ARCHS {
        let engine = Engine::load(&parity_dir(name)).expect("fixture model");
        let vocab = engine.spec().vocab_size;
        let prompt = PromptIds {
            system_ids: vec![1, 2, 3, 4],
            postfix_ids: vec![5, 6],
            repeat_first_ids: vec![7, 8, 9],
            repeat_next_ids: vec![10, 11, 12, 13],
        };
        let ctx_ids: Vec<u32> = random_ids(150, vocab, 3)
            .into_iter()
            .map(|x| x.max(20))
            .collect();
        let noop = &mut |_: &str, _: usize, _: usize| {};
        let mut ctx = engine
            .prefill_context(
                &prompt,
                &ctx_ids,
                &Scoring::Reconstruct { chunk: 60 },
                KvType::Evict,
                noop,
            )
            .expect("context");
        ctx.prune(0.3, Level::Pair).expect("prune");
        let before = ctx.cache.try_clone().expect("clone");
        let empty = engine.new_cache().expect("empty context");
        let queries: Vec<Vec<u32>> = (0..5)
            .map(|i| random_ids(4 + 3 * i, vocab, 50 + i as u64))
            .collect();
        let reqs: Vec<Request<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, q)| Request {
                // Four requests share the compressed context; one has no context at all.
                context: if i == 3 { &empty } else { &ctx.cache },
                prompt: q.clone(),
                arrives: [0, 0, 1, 2, 2][i],
            })
            .collect();
        let got = serve(&engine, &reqs);
        let mut opts = GenerateOptions::greedy(engine.spec(), NEW_TOKENS);
        opts.stop_tokens.clear();
        for (i, q) in queries.iter().enumerate() {
            let want = if i == 3 {
                let mut c = engine.new_cache().expect("cache");
                engine.generate(&mut c, q, &opts, true, &mut |_| true)
            } else {
                let mut alone = ContextClone::of(&ctx);
                engine.generate(&mut alone.0.cache, q, &opts, true, &mut |_| true)
            }
            .expect("alone");
            assert_eq!(got[i].0, want.tokens, "{name}: request {i} tokens");
            for (s, (g, w)) in got[i].1.iter().zip(&want.step_logits).enumerate() {
                let d = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    d < 1e-3,
                    "{name}: request {i} step {s}: logits differ by {d}"
                );
            }
        }
        assert!(ctx.cache == before, "{name}: the shared context changed");
    }
}

/// A context cache copy for answering alone (answers need `&mut`; the shared one stays intact).
struct ContextClone(kvzip_models::engine::kvzip::ContextCache);

impl ContextClone {
    fn of(ctx: &kvzip_models::engine::kvzip::ContextCache) -> Self {
        let cache = ctx.cache.try_clone().expect("clone");
        Self(
            kvzip_models::engine::kvzip::ContextCache::from_saved(cache, ctx.prefill_ids.clone())
                .expect("context"),
        )
    }
}

/// The same on CUDA (raised head dims, bf16-exact weights): a batch decoding together on the
/// GPU answers like each request alone on the GPU (bf16 tolerances: the pieces kernel and the
/// single-cache kernel split the keys differently).
#[cfg(feature = "cuda")]
#[test]
fn batched_decode_on_cuda_equals_answering_alone() {
    use kvzip_models::Device;
    use kvzip_tests::synthetic::{make_model, rel_err};
    let gpu = Device::cuda(0).expect("these tests need a CUDA GPU");
    for (name, head_dim) in kvzip_tests::synthetic::selected_archs() {
        let dir = tempfile::tempdir().expect("tempdir");
        make_model(name, head_dim, dir.path());
        let engine = Engine::load_on(dir.path(), &gpu).expect("gpu load");
        let vocab = engine.spec().vocab_size;
        let prompt = PromptIds {
            system_ids: vec![1, 2, 3, 4],
            postfix_ids: vec![5, 6],
            repeat_first_ids: vec![7, 8, 9],
            repeat_next_ids: vec![10, 11, 12, 13],
        };
        let ctx_ids: Vec<u32> = random_ids(600, vocab, 3)
            .into_iter()
            .map(|x| x.max(20))
            .collect();
        let noop = &mut |_: &str, _: usize, _: usize| {};
        let mut ctx = engine
            .prefill_context(
                &prompt,
                &ctx_ids,
                &Scoring::Reconstruct { chunk: 200 },
                KvType::Evict,
                noop,
            )
            .expect("context");
        ctx.prune(0.3, Level::Pair).expect("prune");
        let empty = engine.new_cache().expect("empty context");
        let queries: Vec<Vec<u32>> = (0..5)
            .map(|i| random_ids(4 + 7 * i, vocab, 50 + i as u64))
            .collect();
        let reqs: Vec<Request<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, q)| Request {
                context: if i == 3 { &empty } else { &ctx.cache },
                prompt: q.clone(),
                arrives: [0, 0, 1, 2, 2][i],
            })
            .collect();
        let got = serve(&engine, &reqs);
        let mut opts = GenerateOptions::greedy(engine.spec(), NEW_TOKENS);
        opts.stop_tokens.clear();
        for (i, q) in queries.iter().enumerate() {
            let want = if i == 3 {
                let mut c = engine.new_cache().expect("cache");
                engine.generate(&mut c, q, &opts, true, &mut |_| true)
            } else {
                let mut alone = ContextClone::of(&ctx);
                engine.generate(&mut alone.0.cache, q, &opts, true, &mut |_| true)
            }
            .expect("alone");
            let same = got[i]
                .0
                .iter()
                .zip(&want.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            assert!(
                same >= 3,
                "{name}: request {i}: batch {:?} alone {:?}",
                got[i].0,
                want.tokens
            );
            let e = rel_err(&got[i].1[0], &want.step_logits[0]);
            assert!(e < 2e-2, "{name}: request {i}: first logits rel err {e}");
        }
    }
}
