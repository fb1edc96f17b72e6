//! A toy engine with its OWN attention compresses a context with KVzip (kvzip-score + kvzip-cache,
//! host memory): (a) prefill, (b) reconstruction scoring, (c) keep 30% of the context pairs and
//! compact, (d) attend; compared with the full cache and StreamingLLM. Run with
//! `cargo run --release -p kvzip-score --example toy_engine`.
use kvzip_cache::{CacheError, KvCache};
use kvzip_score::baselines::streaming_llm_scores;
use kvzip_score::{select, Level, ScoreAccumulator, ScoreShape};
use std::array::from_fn;

const LAYERS: usize = 4;
const KV: usize = 2; // KV heads per layer
const GROUP: usize = 4; // query heads per KV head (GQA)
const D: usize = 32; // head dim
const CHUNK: usize = 256; // scoring chunk in tokens (the reference uses 2000)
const REPEAT: [u32; 4] = [1, 2, 3, 4]; // stands for "\n\nRepeat the previous context exactly."

/// Deterministic value in [-1, 1) from a seed (splitmix64).
fn rnd(seed: u64) -> f32 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// The "weights": a fixed random vector per (layer, slot, token id).
fn embed(layer: usize, slot: usize, id: u32) -> [f32; D] {
    from_fn(|i| rnd(((layer * 64 + slot) as u64) << 40 | (id as u64) << 8 | i as u64))
}

/// Partial RoPE (half the dims rotate, as in some models) of one head row at `pos`.
fn rope(x: &mut [f32; D], pos: u32) {
    for i in 0..D / 4 {
        let (s, c) = (pos as f32 * 1e4f32.powf(-4.0 * i as f32 / D as f32)).sin_cos();
        (x[i], x[i + D / 4]) = (x[i] * c - x[i + D / 4] * s, x[i] * s + x[i + D / 4] * c);
    }
}

/// One "layer": K `[t, KV, D]` (induction heads: a key encodes the previous token, BOS = 0 at
/// first), V, and rotated Q `[t, KV * GROUP, D]` seeking the token itself and BOS (a sink).
fn project(l: usize, prev: u32, ids: &[u32], pos: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut k, mut v, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for (t, (&id, &p)) in ids.iter().zip(pos).enumerate() {
        for h in 0..KV {
            let mut kr = embed(l, h, if t == 0 { prev } else { ids[t - 1] });
            rope(&mut kr, p);
            k.extend(kr);
            v.extend(embed(l, KV + h, id));
            let this = embed(l, h, id).map(|x| x * [0.3, 1.0, 3.0][(l * KV + h) % 3]);
            for g in 0..GROUP {
                let (noise, bos) = (embed(l, 2 * KV + h * GROUP + g, id), embed(l, h, 0));
                let mut qr = from_fn(|i| this[i] + 0.3 * noise[i] + 6.0 * bos[i]);
                rope(&mut qr, p);
                q.extend(qr);
            }
        }
    }
    (k, v, q)
}

/// Own attention of token `id`'s queries over every layer's segments: `[LAYERS, KV * GROUP, D]`.
fn attend(cache: &KvCache, id: u32) -> Result<Vec<f32>, CacheError> {
    let (pos, mut out) = (cache.next_positions(1), Vec::new()); // RoPE: uncompressed length
    for l in 0..LAYERS {
        let seg = cache.segments(l)?; // KV head h: rows offsets[h] .. offsets[h] + lens[h]
        for (qh, qr) in project(l, 0, &[id], &pos).2.chunks(D).enumerate() {
            let rows = seg.offsets[qh / GROUP]..seg.offsets[qh / GROUP] + seg.lens[qh / GROUP];
            let dot = |r: usize| (0..D).map(|i| qr[i] * seg.k[r * D + i]).sum::<f32>();
            let logits: Vec<f32> = rows.clone().map(|r| dot(r) / (D as f32).sqrt()).collect();
            let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
            let w: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
            let (sum, mut o) = (w.iter().sum::<f32>(), [0.0f32; D]);
            for (r, w) in rows.zip(&w) {
                let v_row = &seg.v[r * D..(r + 1) * D];
                o.iter_mut().zip(v_row).for_each(|(o, v)| *o += w / sum * v);
            }
            out.extend(o);
        }
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n_sys, n_ctx) = (16, 1024);
    let ids: [u32; 1040] = from_fn(|i| 5 + (2e3 * (1.0 + rnd(i as u64))) as u32);
    let ctx = &ids[n_sys..];

    // (a) Prefill system prompt + context into a host cache, one append per layer.
    let mut cache = KvCache::uniform(LAYERS, KV, D)?;
    let pos = cache.next_positions(ids.len());
    for l in 0..LAYERS {
        let (k, v, _) = project(l, 0, &ids, &pos);
        cache.append(l, &k, &v, &pos)?;
    }
    cache.set_spans(n_sys, n_ctx);

    // (b) Reconstruction scoring per chunk, the scoring input's K/V appended only meanwhile.
    let mut acc = ScoreAccumulator::new(n_ctx, &[Some(KV); LAYERS]);
    for start in (0..n_ctx).step_by(CHUNK) {
        let chunk = start..(start + CHUNK).min(n_ctx);
        let mut input = REPEAT.to_vec(); // ++ 8 hint ids (end of the previous chunk) ++ chunk
        input.extend(&ctx[start.saturating_sub(8)..chunk.end]);
        let shape = ScoreShape {
            q_len: input.len(),
            n_kv_heads: KV,
            group: GROUP,
            head_dim: D,
            n_sys,
        };
        let (mark, pos) = (cache.mark(), cache.next_positions(input.len()));
        for l in 0..LAYERS {
            let (k, v, q) = project(l, ctx[n_ctx - 1], &input, &pos);
            cache.append(l, &k, &v, &pos)?;
            let keys = (0..KV).map(|h| cache.head_keys(l, h));
            let keys = keys.collect::<Result<Vec<_>, _>>()?;
            acc.score_layer_chunk(l, &shape, &q, |h| keys[h], chunk.clone())?;
        }
        cache.rollback(&mark)?;
    }

    // (c) Keep 30% of the context pairs (one global budget over layers and heads); evict.
    let selection = select(&acc.finish()?, 0.3, Level::Pair)?;
    let full = cache.try_clone()?;
    cache.compact(&selection.mask)?;
    let (usage, ratio) = (cache.context_usage(4, |_| true), selection.ratio_real);
    let (lens, bytes) = (cache.lens(), (full.bytes(), cache.bytes()));
    println!("{usage:?}, real ratio {ratio:.4}\nallocated K+V bytes (full, compacted) {bytes:?}");
    println!("rows per (layer, head), {n_sys} system rows included: {lens:?}");

    // StreamingLLM (4 sinks + recent tokens) at the same budget, as a retain-mode view.
    let streaming = streaming_llm_scores(n_ctx, 4, &[Some(KV); LAYERS]);
    let streaming = full.compacted_view(&select(&streaming, 0.3, Level::Pair)?.mask)?;

    // (d) Queries "what follows token x of the context?": own attention over each cache.
    let (mut err, mut checksum, n_q) = ([0.0f32; 2], 0.0f32, 16);
    let l2 = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>().sqrt();
    for j in (0..n_ctx).step_by(n_ctx / n_q) {
        let r = attend(&full, ctx[j])?;
        for (e, c) in err.iter_mut().zip([&cache, &streaming]) {
            let out = attend(c, ctx[j])?;
            checksum += out.iter().sum::<f32>();
            let diff: Vec<f32> = out.iter().zip(&r).map(|(a, b)| a - b).collect();
            *e += l2(&diff) / l2(&r) / n_q as f32;
        }
    }
    let [kvzip, streaming] = err;
    println!("attention output vs full cache, mean relative error over {n_q} queries:");
    println!("  KVzip {kvzip:.4}, StreamingLLM {streaming:.4}; checksum {checksum:.4}");
    Ok(())
}
