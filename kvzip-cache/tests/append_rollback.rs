//! Append, amortized growth, slice-back after queries (multi-turn) and sliding-window trimming.

mod common;

use common::{append_random, assert_matches, empty, filter_model, random_mask, Rng};
use kvzip_cache::{CacheError, KeepMask, KvCache, LayerKeep, MIN_HEAD_SLACK};

const SHAPES: [(usize, usize); 3] = [(2, 4), (3, 8), (2, 4)];

/// Builds a cache with a 3-token system prompt and a 30-token context, prefilled in chunks.
fn prefilled(rng: &mut Rng) -> (KvCache, common::Model) {
    let (mut cache, mut model) = empty(&SHAPES);
    cache.set_spans(3, 30);
    for chunk in [3, 12, 11, 7] {
        append_random(&mut cache, &mut model, chunk, rng);
    }
    assert_eq!(cache.seen_tokens(), 33);
    (cache, model)
}

/// One chat turn: a query prefill of `q` tokens then `a` single-token decode steps.
fn turn(cache: &mut KvCache, model: &mut common::Model, q: usize, a: usize, rng: &mut Rng) {
    append_random(cache, model, q, rng);
    for _ in 0..a {
        append_random(cache, model, 1, rng);
    }
}

#[test]
fn three_kept_turns_then_a_rolled_back_one_leave_exact_lengths() {
    let mut rng = Rng::new(7);
    let (mut cache, model) = prefilled(&mut rng);
    let mask = random_mask(&cache, 0.3, &[], &mut rng);
    cache.compact(&mask).unwrap();
    let mut model = filter_model(&model, &mask, 3, 30);
    let pruned_lens: Vec<Vec<usize>> = cache.layers().iter().map(|l| l.lens().to_vec()).collect();

    for (q, a) in [(5, 4), (3, 9), (6, 2)] {
        turn(&mut cache, &mut model, q, a, &mut rng);
    }
    assert_eq!(cache.seen_tokens(), 33 + 9 + 12 + 8);
    let before = cache.try_clone().unwrap();
    let mark = cache.mark();

    let mut scratch = model.clone();
    turn(&mut cache, &mut scratch, 7, 40, &mut rng);
    assert_eq!(cache.seen_tokens(), 62 + 47);
    cache.rollback(&mark).unwrap();

    assert_eq!(cache, before);
    assert_matches(&cache, &model);
    assert_eq!(cache.seen_tokens(), 62);
    for (layer, pruned) in cache.layers().iter().zip(&pruned_lens) {
        let expect: Vec<usize> = pruned.iter().map(|n| n + 29).collect();
        assert_eq!(layer.lens(), expect.as_slice());
    }
    // The next query gets the same positions the rolled-back one had.
    assert_eq!(cache.next_positions(2), vec![62, 63]);
    // A second query can be rolled back to the same mark again.
    turn(&mut cache, &mut scratch, 2, 2, &mut rng);
    cache.rollback(&mark).unwrap();
    assert_eq!(cache, before);
}

#[test]
fn rollback_is_refused_after_compaction_or_trim() {
    let mut rng = Rng::new(8);
    let (mut cache, _) = prefilled(&mut rng);
    let mark = cache.mark();
    let mask = random_mask(&cache, 0.5, &[], &mut rng);
    cache.compact(&mask).unwrap();
    assert!(matches!(
        cache.rollback(&mark),
        Err(CacheError::InvalidMark(_))
    ));

    let mark = cache.mark();
    cache.trim_front(0, 10).unwrap();
    assert!(matches!(
        cache.rollback(&mark),
        Err(CacheError::InvalidMark(_))
    ));

    let other = KvCache::new(&SHAPES).unwrap();
    assert!(matches!(
        cache.rollback(&other.mark()),
        Err(CacheError::InvalidMark(_))
    ));
}

#[test]
fn appends_are_amortized_constant_per_token() {
    let mut cache = KvCache::new(&[(4, 8)]).unwrap();
    let k = vec![0.5f32; 4 * 8];
    let n = 20_000u32;
    for p in 0..n {
        cache.append(0, &k, &k, &[p]).unwrap();
    }
    let layer = cache.layer(0).unwrap();
    // Uniform slack = max(mean length, 64) => capacity at least doubles each re-layout.
    let bound = (n as f64 / MIN_HEAD_SLACK as f64).log2().ceil() as usize + 1;
    assert!(
        layer.relayout_count() <= bound,
        "{} re-layouts for {n} appends (bound {bound})",
        layer.relayout_count()
    );
    assert!(layer.capacity_rows() <= 2 * layer.rows() + 4 * (MIN_HEAD_SLACK + 1));
    assert_eq!(layer.lens(), &[n as usize; 4]);
    assert_eq!(layer.head_positions(3)[12_345], 12_345);
}

#[test]
fn appends_after_a_ragged_compaction_stay_amortized() {
    // Heads of very different lengths: the short head must not force a re-layout of the long
    // one on every few appends. Lengths 5000 / 0 / 17 with no slack, from a compaction.
    let mut cache = KvCache::new(&[(3, 2)]).unwrap();
    let ones = vec![1.0f32; 5000 * 3 * 2];
    let positions: Vec<u32> = (0..5000).collect();
    cache.append(0, &ones, &ones, &positions).unwrap();
    cache.set_spans(0, 5000);
    let keep = [5000, 0, 17];
    let bits: Vec<bool> = keep
        .iter()
        .flat_map(|&n| (0..5000).map(move |p| p < n))
        .collect();
    let mask = KeepMask::from_layers(5000, vec![Some(LayerKeep { n_heads: 3, bits })]).unwrap();
    cache.compact_with_slack(&mask, 0).unwrap();
    assert_eq!(cache.layer(0).unwrap().lens(), &[5000, 0, 17]);
    let k = vec![2.0f32; 3 * 2];
    for p in 5000..15_000u32 {
        cache.append(0, &k, &k, &[p]).unwrap();
    }
    let layer = cache.layer(0).unwrap();
    assert!(
        layer.relayout_count() <= 4,
        "{} re-layouts",
        layer.relayout_count()
    );
    assert_eq!(layer.lens(), &[15_000, 10_000, 10_017]);
    assert_eq!(&layer.head_keys(1).unwrap()[..2], &[2.0, 2.0]);
}

#[test]
fn reserve_avoids_relayouts() {
    let mut cache = KvCache::new(&[(2, 4)]).unwrap();
    cache.reserve(100).unwrap();
    let k = vec![0.0f32; 10 * 2 * 4];
    for c in 0..10u32 {
        let pos: Vec<u32> = (c * 10..c * 10 + 10).collect();
        cache.append(0, &k, &k, &pos).unwrap();
    }
    let layer = cache.layer(0).unwrap();
    assert_eq!(layer.relayout_count(), 0);
    assert_eq!(layer.rows(), 200);
}

#[test]
fn append_rejects_bad_shapes_and_bad_layers() {
    let mut cache = KvCache::new(&SHAPES).unwrap();
    let err = cache.append(1, &[0.0; 7], &[0.0; 7], &[0]).unwrap_err();
    assert!(err.to_string().contains("layer 1"), "{err}");
    assert!(matches!(
        cache.append(9, &[], &[], &[]),
        Err(CacheError::Shape(_))
    ));
    assert!(cache.head_keys(0, 2).is_err());
    assert!(KvCache::new(&[(0, 4)]).is_err());
}

#[test]
fn trim_front_keeps_the_newest_rows() {
    let mut rng = Rng::new(9);
    let (mut cache, model) = prefilled(&mut rng);
    assert_eq!(cache.trim_front(1, 10).unwrap(), 3 * (33 - 10));
    let mut expect = model.clone();
    for rows in expect[1].iter_mut() {
        rows.drain(..rows.len() - 10);
    }
    assert_matches(&cache, &expect);
    assert_eq!(cache.head_positions(1, 2).unwrap()[0], 23);
    // Trimming to more than present is a no-op and keeps marks valid.
    let mark = cache.mark();
    assert_eq!(cache.trim_front(0, 1000).unwrap(), 0);
    assert_matches(&cache, &expect);
    cache.rollback(&mark).unwrap();
    // Appends after trimming land after the kept rows.
    let mut expect2 = expect.clone();
    append_random(&mut cache, &mut expect2, 3, &mut rng);
    assert_matches(&cache, &expect2);
}
