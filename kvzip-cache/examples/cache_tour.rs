//! The cache side of KVzip in a toy engine with its OWN attention (host memory): prefill steps,
//! scores from kvzip-score under `mark`/`rollback`, retain views, `compact`, a kept turn and a
//! forgotten query, save/load. Run: `cargo run --release -p kvzip-cache --example cache_tour`
use kvzip_cache::{CacheError, CacheFileMeta, KvCache};
use kvzip_kernels::View;
use kvzip_score::{select, Level, ScoreAccumulator, ScoreShape};
use std::array::from_fn;

const LAYERS: usize = 6;
const KV: usize = 2; // KV heads per layer
const GROUP: usize = 2; // query heads per KV head
const D: usize = 16; // head dim

/// Deterministic value in [-1, 1) from a seed (splitmix64).
fn rnd(seed: u64) -> f32 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Toy projections of `ids` in layer `l` (no RoPE): `kind` 0 = K `[t, KV, D]`, 1 = V, 2 = Q
/// `[t, KV * GROUP, D]`: the token's own key, sharper in some heads, plus BOS's (a sink).
fn proj(kind: u64, l: usize, ids: &[u32]) -> Vec<f32> {
    let vec = |kind: u64, h: usize, id: u32| -> [f32; D] {
        from_fn(|i| rnd(kind << 56 | ((l * KV + h) as u64) << 40 | (id as u64) << 8 | i as u64))
    };
    let row = |id: u32, h: usize| -> [f32; D] {
        let kv = if kind == 2 { h / GROUP } else { h };
        let (key, bos, noise) = (vec(0, kv, id), vec(0, kv, 0), vec(2, h, id));
        let sharp = [0.3, 1.0, 3.0][(l + kv) % 3];
        let q = from_fn(|i| sharp * key[i] + 6.0 * bos[i] + 0.3 * noise[i]);
        [key, vec(1, kv, id), q][kind as usize]
    };
    let heads = if kind == 2 { KV * GROUP } else { KV };
    ids.iter()
        .flat_map(|&id| (0..heads).flat_map(move |h| row(id, h)))
        .collect()
}

/// Own attention of `q` `[LAYERS, KV * GROUP, D]` over each head's live rows.
fn attend(cache: &KvCache, q: &[f32]) -> Result<Vec<f32>, CacheError> {
    let mut out = Vec::with_capacity(q.len());
    for (l, q) in q.chunks(KV * GROUP * D).enumerate() {
        for (qh, qr) in q.chunks(D).enumerate() {
            let h = qh / GROUP;
            let (k, v) = (cache.head_keys(l, h)?, cache.head_values(l, h)?);
            let dot = |kr: &[f32]| kr.iter().zip(qr).map(|(a, b)| a * b).sum::<f32>();
            let logits: Vec<f32> = k.chunks(D).map(|kr| dot(kr) / (D as f32).sqrt()).collect();
            let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
            let w: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
            let (sum, mut o) = (w.iter().sum::<f32>(), [0.0f32; D]);
            for (w, vr) in w.iter().zip(v.chunks(D)) {
                o.iter_mut().zip(vr).for_each(|(o, v)| *o += w / sum * v);
            }
            out.extend(o);
        }
    }
    Ok(out)
}

/// Appends `ids` to every layer at the next positions (K and V of the toy model).
fn feed(cache: &mut KvCache, ids: &[u32]) -> Result<(), CacheError> {
    let pos = cache.next_positions(ids.len());
    (0..LAYERS).try_for_each(|l| cache.append(l, &proj(0, l, ids), &proj(1, l, ids), &pos))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n_sys, n_ctx) = (8, 1500);
    let mut ids: [u32; 1508] = from_fn(|i| 5 + (2e3 * (1.0 + rnd(i as u64))) as u32);
    ids[0] = 0; // BOS, the toy's attention sink

    // Prefill in engine steps of 512 tokens: `begin_step` once, `write_step` per layer.
    let mut cache = KvCache::uniform(LAYERS, KV, D)?;
    for step in ids.chunks(512) {
        cache.begin_step(step.len())?;
        for l in 0..LAYERS {
            let (k, v) = (proj(0, l, step), proj(1, l, step));
            cache.write_step(l, View::f32(&k), View::f32(&v))?;
        }
    }
    cache.set_spans(n_sys, n_ctx);
    let (live, alloc) = (cache.kv_bytes_live(), cache.bytes());
    println!("prefill: {live} B of K+V rows, {alloc} B allocated (spare capacity)");

    // KVzip scores (one chunk: repeat prompt ++ context), input K/V kept only until `rollback`.
    let input = [&[1, 2, 3][..], &ids[n_sys..]].concat();
    let shape = ScoreShape {
        q_len: input.len(),
        n_kv_heads: KV,
        group: GROUP,
        head_dim: D,
        n_sys,
    };
    let (mut acc, mark) = (
        ScoreAccumulator::new(n_ctx, &[Some(KV); LAYERS]),
        cache.mark(),
    );
    feed(&mut cache, &input)?;
    for l in 0..LAYERS {
        let keys = (0..KV).map(|h| cache.head_keys(l, h));
        let keys = keys.collect::<Result<Vec<_>, _>>()?;
        acc.score_layer_chunk(l, &shape, &proj(2, l, &input), |h| keys[h], 0..n_ctx)?;
    }
    cache.rollback(&mark)?;
    let scores = acc.finish()?;

    // Retain mode: the full cache stays, a compacted view per ratio; own attention vs full.
    let q: Vec<f32> = (0..LAYERS).flat_map(|l| proj(2, l, &[ids[700]])).collect();
    let reference = attend(&cache, &q)?;
    let l2 = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>().sqrt();
    for ratio in [0.1, 0.3, 0.5, 1.0] {
        let view = cache.compacted_view(&select(&scores, ratio, Level::Pair)?.mask)?;
        let out = attend(&view, &q)?;
        let diff: Vec<f32> = out.iter().zip(&reference).map(|(a, b)| a - b).collect();
        let (u, err) = (view.context_usage(4, |_| true), l2(&diff) / l2(&reference));
        println!("view {ratio}: {u:?}, attention rel. error {err:.4}");
    }

    // Evict mode at 0.3: pruned rows are freed; a mark from before is refused afterwards.
    let (stale, before) = (cache.mark(), cache.bytes());
    let selection = select(&scores, 0.3, Level::Pair)?;
    cache.compact(&selection.mask)?;
    assert!(cache.rollback(&stale).is_err());
    let (after, lens) = (cache.bytes(), cache.lens());
    println!("compact 0.3: {before} -> {after} B allocated; rows per (layer, head) {lens:?}");

    // A kept turn (update_cache = true), then a forgotten query + answer (update_cache = false).
    feed(&mut cache, &[42; 6])?;
    let (kept, mark) = (cache.try_clone()?, cache.mark());
    feed(&mut cache, &[7; 10])?;
    cache.rollback(&mark)?;
    let (exact, seen) = (cache == kept, cache.seen_tokens());
    println!("rollback exact: {exact}; seen_tokens {seen} (next RoPE position, uncompressed)");

    // Save the compressed cache with its provenance, load it back, check it.
    let (file, mut meta) = (tempfile::NamedTempFile::new()?, CacheFileMeta::default());
    (meta.model_id, meta.token_ids) = ("toy@1".into(), ids.to_vec());
    meta.ratio_real = Some(selection.ratio_real);
    cache.save(file.path(), &meta)?;
    let (loaded, meta) = KvCache::load(file.path())?;
    meta.check(file.path(), "toy@1", Some(&ids))?;
    let same = loaded == cache && attend(&loaded, &q)? == attend(&cache, &q)?;
    let size = std::fs::metadata(file.path())?.len();
    println!("file {size} B; loaded == saved: {same}");
    Ok(())
}
