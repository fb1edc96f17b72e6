//! Compaction (evict), retain views, repeated compaction and memory accounting.

mod common;

use common::{append_random, assert_matches, empty, filter_model, random_mask, Rng};
use kvzip_cache::{CacheError, KeepMask, KvCache, LayerKeep};

const SHAPES: [(usize, usize); 4] = [(2, 4), (4, 8), (2, 4), (1, 16)];
const N_SYS: usize = 5;
const N_CTX: usize = 40;

/// System prompt + context + 6 tokens of a kept turn, so all three spans are present.
fn filled(rng: &mut Rng) -> (KvCache, common::Model) {
    let (mut cache, mut model) = empty(&SHAPES);
    cache.set_spans(N_SYS, N_CTX);
    for chunk in [N_SYS, 17, N_CTX - 17, 6] {
        append_random(&mut cache, &mut model, chunk, rng);
    }
    (cache, model)
}

#[test]
fn compaction_equals_filtering_rows_by_mask() {
    let mut rng = Rng::new(1);
    let (mut cache, model) = filled(&mut rng);
    let mask = random_mask(&cache, 0.35, &[2], &mut rng);
    let untouched = cache.try_clone().unwrap();
    cache.compact(&mask).unwrap();
    assert_matches(&cache, &filter_model(&model, &mask, N_SYS, N_CTX));
    assert_eq!(cache.layer(2).unwrap(), untouched.layer(2).unwrap());
    // Spans and logical length survive.
    assert_eq!(
        (cache.n_sys(), cache.n_ctx(), cache.seen_tokens()),
        (N_SYS, N_CTX, 51)
    );
    // System prompt and post-context rows are all there in every head.
    for layer in cache.layers() {
        for h in 0..layer.n_kv_heads() {
            let pos = layer.head_positions(h);
            assert_eq!(&pos[..N_SYS], &[0, 1, 2, 3, 4]);
            assert_eq!(&pos[pos.len() - 6..], &[45, 46, 47, 48, 49, 50]);
        }
    }
}

#[test]
fn compacting_twice_equals_the_intersection_of_masks() {
    let mut rng = Rng::new(2);
    let (mut cache, model) = filled(&mut rng);
    let first = random_mask(&cache, 0.6, &[], &mut rng);
    let second = random_mask(&cache, 0.6, &[1], &mut rng);
    cache.compact(&first).unwrap();
    cache.compact(&second).unwrap();
    let expect = filter_model(
        &filter_model(&model, &first, N_SYS, N_CTX),
        &second,
        N_SYS,
        N_CTX,
    );
    assert_matches(&cache, &expect);
}

#[test]
fn appends_after_compaction_continue_positions() {
    let mut rng = Rng::new(3);
    let (mut cache, model) = filled(&mut rng);
    let mask = random_mask(&cache, 0.2, &[], &mut rng);
    cache.compact_with_slack(&mask, 0).unwrap();
    let mut model = filter_model(&model, &mask, N_SYS, N_CTX);
    append_random(&mut cache, &mut model, 4, &mut rng);
    assert_matches(&cache, &model);
    assert_eq!(*cache.head_positions(0, 1).unwrap().last().unwrap(), 54);
}

#[test]
fn compacted_view_leaves_the_full_cache_intact() {
    let mut rng = Rng::new(4);
    let (cache, model) = filled(&mut rng);
    let original = cache.try_clone().unwrap();
    for p in [0.1, 0.3, 0.9] {
        let mask = random_mask(&cache, p, &[3], &mut rng);
        let view = cache.compacted_view(&mask).unwrap();
        assert_matches(&view, &filter_model(&model, &mask, N_SYS, N_CTX));
        let mut evicted = cache.try_clone().unwrap();
        evicted.compact(&mask).unwrap();
        assert_eq!(view, evicted);
    }
    assert_eq!(cache, original);
    assert_matches(&cache, &model);
}

#[test]
fn keep_all_and_keep_none_masks() {
    let mut rng = Rng::new(5);
    let (cache, model) = filled(&mut rng);
    let heads: Vec<Option<usize>> = SHAPES.iter().map(|s| Some(s.0)).collect();
    let all = KeepMask::keep_all(N_CTX, &heads);
    assert_eq!(cache.compacted_view(&all).unwrap(), cache);
    let none_layers = SHAPES
        .iter()
        .map(|s| {
            Some(LayerKeep {
                n_heads: s.0,
                bits: vec![false; s.0 * N_CTX],
            })
        })
        .collect();
    let none = KeepMask::from_layers(N_CTX, none_layers).unwrap();
    let view = cache.compacted_view(&none).unwrap();
    assert_eq!(view.context_pairs_kept(), 0);
    assert!(view
        .layers()
        .iter()
        .all(|l| l.lens().iter().all(|&n| n == N_SYS + 6)));
    assert_matches(&view, &filter_model(&model, &none, N_SYS, N_CTX));
}

#[test]
fn mask_geometry_mismatches_are_errors() {
    let mut rng = Rng::new(6);
    let (mut cache, _) = filled(&mut rng);
    let short = KeepMask::keep_all(N_CTX - 1, &[Some(2), Some(4), Some(2), Some(1)]);
    assert!(matches!(cache.compact(&short), Err(CacheError::Shape(_))));
    let heads = KeepMask::keep_all(N_CTX, &[Some(2), Some(3), Some(2), Some(1)]);
    let err = cache.compacted_view(&heads).unwrap_err();
    assert!(err.to_string().contains("layer 1"), "{err}");
    let layers = KeepMask::keep_all(N_CTX, &[Some(2)]);
    assert!(cache.compact(&layers).is_err());
}

#[test]
fn memory_accounting_is_exact() {
    let mut rng = Rng::new(7);
    let (mut cache, _) = filled(&mut rng);
    let f32_bytes = 4;
    let row_elems: Vec<usize> = SHAPES.iter().map(|&(nh, hd)| nh * hd).collect();
    let full_ctx_pairs: usize = SHAPES.iter().map(|s| s.0 * N_CTX).sum();
    assert_eq!(cache.context_pairs_full(), full_ctx_pairs);
    assert_eq!(cache.context_pairs_kept(), full_ctx_pairs);
    let used: usize = row_elems.iter().map(|e| e * 51 * 2 * f32_bytes).sum();
    assert_eq!(cache.kv_bytes_used(f32_bytes), used);
    assert_eq!(cache.kv_bytes_used(2), used / 2);
    let alloc: usize = cache
        .layers()
        .iter()
        .map(|l| l.capacity_rows() * l.head_dim() * 2 * 4)
        .sum();
    assert_eq!(cache.bytes(), alloc);
    assert!(cache.bytes() >= used);

    let mask = random_mask(&cache, 0.3, &[2], &mut rng);
    cache.compact_with_slack(&mask, 0).unwrap();
    // With no slack, allocation equals live rows in every compacted layer (layer 2 is frozen
    // and keeps its growth capacity).
    for (l, layer) in cache.layers().iter().enumerate().filter(|(l, _)| *l != 2) {
        assert_eq!(
            layer.bytes(),
            layer.rows() * layer.head_dim() * 2 * 4,
            "layer {l}"
        );
    }

    let evictable = |l: usize| l != 2;
    let (mask_kept, mask_total) = mask.counts();
    let u = cache.context_usage(2, evictable);
    assert_eq!((u.pairs_kept, u.pairs_full), (mask_kept, mask_total));
    let expect_kept_bytes: usize = (0..SHAPES.len())
        .filter(|&l| l != 2)
        .map(|l| {
            let kept = mask.layer(l).unwrap().bits.iter().filter(|b| **b).count();
            kept * SHAPES[l].1 * 2 * 2
        })
        .sum();
    assert_eq!(u.bytes_kept, expect_kept_bytes);
    let expect_full_bytes: usize = (0..SHAPES.len())
        .filter(|&l| l != 2)
        .map(|l| SHAPES[l].0 * N_CTX * SHAPES[l].1 * 2 * 2)
        .sum();
    assert_eq!(u.bytes_full, expect_full_bytes);
    // Over all layers, the frozen layer 2 counts fully.
    assert_eq!(cache.context_pairs_kept(), mask_kept + 2 * N_CTX);
    assert_eq!(cache.context_pairs_full(), full_ctx_pairs);
}

#[test]
fn segments_view_matches_the_layer() {
    let mut rng = Rng::new(8);
    let (mut cache, _) = filled(&mut rng);
    let mask = random_mask(&cache, 0.5, &[], &mut rng);
    cache.compact(&mask).unwrap();
    let seg = cache.segments(1).unwrap();
    let layer = cache.layer(1).unwrap();
    assert_eq!(seg.head_dim, 8);
    assert_eq!(seg.lens, layer.lens());
    for h in 0..layer.n_kv_heads() {
        let start = seg.offsets[h] * seg.head_dim;
        let end = start + seg.lens[h] * seg.head_dim;
        assert_eq!(&seg.k[start..end], layer.head_keys(h).unwrap());
        assert_eq!(&seg.v[start..end], layer.head_values(h).unwrap());
    }
    assert!(cache.segments(4).is_err());
}
