//! Budget selection: exact counts, deterministic tie-break, errors, head level, pyramid.

use kvzip_score::{
    pyramid_layer_budgets, select, select_pyramid, ContextScores, LayerScores, Level, ScoreError,
};

fn scores_from(n_ctx: usize, layers: Vec<Option<Vec<f32>>>, heads: usize) -> ContextScores {
    ContextScores::from_layers(
        n_ctx,
        layers
            .into_iter()
            .map(|v| {
                v.map(|values| LayerScores {
                    n_heads: heads,
                    values,
                })
            })
            .collect(),
    )
    .unwrap()
}

fn pseudo_random(n: usize, seed: u64, levels: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % levels) as f32 / levels as f32
        })
        .collect()
}

#[test]
fn pair_keeps_exactly_round_ratio_n_even_with_many_ties() {
    // 8 distinct values only: massive ties, where the reference's strict '>' undershoots.
    let n_ctx = 97;
    let s = scores_from(
        n_ctx,
        vec![
            Some(pseudo_random(3 * n_ctx, 1, 8)),
            None,
            Some(pseudo_random(3 * n_ctx, 2, 8)),
        ],
        3,
    );
    let n = 2 * 3 * n_ctx;
    for ratio in [0.01, 0.1, 0.3, 0.333, 0.5, 0.77, 1.0] {
        for level in [Level::Pair, Level::Pyramid] {
            let sel = select(&s, ratio, level).unwrap();
            let want = (ratio * n as f64).round() as usize;
            assert_eq!(sel.kept, want, "ratio {ratio} level {level}");
            assert_eq!(sel.total, n);
            assert_eq!(sel.mask.counts(), (want, n));
            assert!((sel.ratio_real - want as f64 / n as f64).abs() < 1e-12);
            assert!(
                sel.mask.layer(1).is_none(),
                "unscored layer stays None (kept whole)"
            );
            assert!(sel.mask.is_kept(1, 0, 5));
        }
    }
}

#[test]
fn pair_keeps_highest_scores_and_breaks_ties_by_flat_index() {
    // Two layers x 2 heads x 4 positions; all 0.5 except a few.
    let mut l0 = vec![0.5f32; 8];
    let mut l1 = vec![0.5f32; 8];
    l1[7] = 0.9; // layer 1, head 1, pos 3: best
    l0[2] = 0.1; // worst
    l1[0] = 0.1;
    let s = scores_from(4, vec![Some(l0.clone()), Some(l1.clone())], 2);
    let sel = select(&s, 5.0 / 16.0, Level::Pair).unwrap();
    assert_eq!(sel.kept, 5);
    // The 0.9 pair, then the four 0.5 pairs with the lowest flat index: l0 h0 pos 0,1,3; l0 h1 pos 0.
    let kept: Vec<(usize, usize, usize)> = (0..2)
        .flat_map(|l| (0..2).flat_map(move |h| (0..4).map(move |p| (l, h, p))))
        .filter(|&(l, h, p)| sel.mask.is_kept(l, h, p))
        .collect();
    assert_eq!(
        kept,
        vec![(0, 0, 0), (0, 0, 1), (0, 0, 3), (0, 1, 0), (1, 1, 3)]
    );
    assert_eq!(sel.threshold, 0.5);
    // Deterministic: same input, same mask, every time.
    for _ in 0..5 {
        assert_eq!(select(&s, 5.0 / 16.0, Level::Pair).unwrap().mask, sel.mask);
    }
}

#[test]
fn pair_uniform_keeps_round_ratio_n_ctx_per_head() {
    let n_ctx = 50;
    let s = scores_from(
        n_ctx,
        vec![
            Some(pseudo_random(4 * n_ctx, 7, 5)),
            Some(pseudo_random(4 * n_ctx, 8, 5)),
        ],
        4,
    );
    let sel = select(&s, 0.3, Level::PairUniform).unwrap();
    assert_eq!(sel.kept, 2 * 4 * 15);
    for l in 0..2 {
        let lk = sel.mask.layer(l).unwrap();
        let vals = &s.layer(l).unwrap().values;
        for h in 0..4 {
            let bits = &lk.bits[h * n_ctx..(h + 1) * n_ctx];
            assert_eq!(bits.iter().filter(|b| **b).count(), 15);
            let min_kept = (0..n_ctx)
                .filter(|&p| bits[p])
                .map(|p| vals[h * n_ctx + p])
                .fold(f32::INFINITY, f32::min);
            let max_dropped = (0..n_ctx)
                .filter(|&p| !bits[p])
                .map(|p| vals[h * n_ctx + p])
                .fold(f32::NEG_INFINITY, f32::max);
            assert!(min_kept >= max_dropped);
            // Among ties at the boundary, lower positions are kept.
            let tie: Vec<usize> = (0..n_ctx)
                .filter(|&p| vals[h * n_ctx + p] == min_kept)
                .collect();
            let kept_ties: Vec<usize> = tie.iter().copied().filter(|&p| bits[p]).collect();
            assert_eq!(kept_ties, tie[..kept_ties.len()].to_vec());
        }
    }
}

#[test]
fn ratio_outside_unit_interval_is_an_error() {
    let s = scores_from(4, vec![Some(vec![0.1; 4])], 1);
    for bad in [0.0, -0.1, 1.0001, 2.0, f64::NAN, f64::INFINITY] {
        for level in [Level::Pair, Level::PairUniform, Level::Head, Level::Pyramid] {
            let err = select(&s, bad, level).unwrap_err();
            assert!(matches!(err, ScoreError::InvalidRatio(_)), "{bad} {level}");
            assert!(err.to_string().contains("(0, 1]"));
        }
    }
    assert_eq!(select(&s, 1.0, Level::Pair).unwrap().kept, 4);
}

#[test]
fn nan_scores_are_rejected_with_location() {
    let mut v = vec![0.1; 6];
    v[4] = f32::NAN;
    let s = scores_from(3, vec![None, Some(v)], 2);
    let err = select(&s, 0.5, Level::Pair).unwrap_err().to_string();
    assert!(err.contains("layer 1, head 1, context position 1"), "{err}");
}

#[test]
fn head_level_keeps_whole_heads() {
    let n_ctx = 10;
    // Head maxima: l0h0 0.2, l0h1 0.9, l1h0 0.5, l1h1 0.5 (tie), l2 unscored.
    let mut l0 = vec![0.0; 20];
    l0[3] = 0.2;
    l0[10 + 9] = 0.9;
    let mut l1 = vec![0.0; 20];
    l1[0] = 0.5;
    l1[15] = 0.5;
    let s = scores_from(n_ctx, vec![Some(l0), Some(l1), None], 2);
    let sel = select(&s, 0.5, Level::Head).unwrap(); // round(0.5 * 4) = 2 heads
    assert_eq!(sel.kept, 2 * n_ctx);
    assert_eq!(sel.threshold, 0.5);
    for p in 0..n_ctx {
        assert!(!sel.mask.is_kept(0, 0, p));
        assert!(sel.mask.is_kept(0, 1, p));
        assert!(sel.mask.is_kept(1, 0, p), "tie: lower head index wins");
        assert!(!sel.mask.is_kept(1, 1, p));
    }
    assert!(sel.mask.layer(2).is_none());
    // 0.6 * 4 = 2.4 -> 2 heads; 0.63 * 4 = 2.52 -> 3 heads.
    assert_eq!(select(&s, 0.6, Level::Head).unwrap().kept, 2 * n_ctx);
    assert_eq!(select(&s, 0.63, Level::Head).unwrap().kept, 3 * n_ctx);
}

#[test]
fn pyramid_budgets_decrease_with_depth_and_sum_exactly() {
    let sizes = vec![(4usize, 1000usize); 6];
    for ratio in [0.1, 0.3, 0.5, 0.8, 1.0] {
        let b = pyramid_layer_budgets(&sizes, ratio, 20.0).unwrap();
        assert_eq!(
            b.iter().sum::<usize>(),
            (ratio * 24000.0).round() as usize,
            "{ratio}"
        );
        assert!(b.windows(2).all(|w| w[0] >= w[1]), "{b:?}");
        assert!(b.iter().all(|&x| x <= 4000));
        if ratio < 0.5 {
            assert!(b[0] > b[5]);
        }
    }
    let n_ctx = 40;
    let s = scores_from(
        n_ctx,
        (0..4)
            .map(|l| Some(pseudo_random(2 * n_ctx, l, 1000)))
            .collect(),
        2,
    );
    let sel = select_pyramid(&s, 0.25, 20.0).unwrap();
    assert_eq!(sel.kept, 80);
    let per_layer: Vec<usize> = (0..4)
        .map(|l| {
            sel.mask
                .layer(l)
                .unwrap()
                .bits
                .iter()
                .filter(|b| **b)
                .count()
        })
        .collect();
    assert!(per_layer[0] > per_layer[3], "{per_layer:?}");
    assert!(pyramid_layer_budgets(&sizes, 0.3, 0.5).is_err());
}

#[test]
fn level_parses_from_cli_spelling() {
    for l in [Level::Pair, Level::PairUniform, Level::Head, Level::Pyramid] {
        assert_eq!(l.as_str().parse::<Level>().unwrap(), l);
    }
    assert!("uniform".parse::<Level>().is_err());
}

#[test]
fn empty_context_and_no_scored_layers_are_fine() {
    let s = ContextScores::zeros(0, &[Some(2), None]);
    for level in [Level::Pair, Level::PairUniform, Level::Head, Level::Pyramid] {
        let sel = select(&s, 0.3, level).unwrap();
        assert_eq!(
            (sel.kept, sel.total, sel.ratio_real),
            (0, 0, 1.0),
            "{level}"
        );
    }
    let s = ContextScores::zeros(10, &[None, None]);
    assert_eq!(select(&s, 0.5, Level::Pair).unwrap().total, 0);
}
