//! Head scores: computation, save/load, merge, model checks, head-level selection from file.

use kvzip_score::{select_heads, ContextScores, HeadScores, LayerScores, ScoreError};

fn sample(n_ctx: usize, seed: f32) -> ContextScores {
    // 3 layers, layer 1 unscored (like a Gemma3 sliding layer), 2 heads.
    let layer = |l: usize| LayerScores {
        n_heads: 2,
        values: (0..2 * n_ctx)
            .map(|i| ((i as f32 * 0.37 + seed + l as f32).sin() + 1.0) / 2.0)
            .collect(),
    };
    ContextScores::from_layers(n_ctx, vec![Some(layer(0)), None, Some(layer(2))]).unwrap()
}

#[test]
fn head_scores_are_max_over_positions() {
    let s = sample(20, 0.0);
    let hs = HeadScores::from_context_scores(&s, "tiny-llama", "sample-0").unwrap();
    assert_eq!((hs.n_layers(), hs.n_heads()), (3, 2));
    for l in [0, 2] {
        for h in 0..2 {
            let want = s
                .head(l, h)
                .unwrap()
                .iter()
                .copied()
                .fold(f32::MIN, f32::max);
            assert_eq!(hs.get(l, h), Some(want));
        }
    }
    assert_eq!(hs.get(1, 0), None);
    assert!(!hs.is_scored(1));
}

#[test]
fn save_load_roundtrip_and_merge_by_max() {
    let dir = tempfile::tempdir().unwrap();
    let a = HeadScores::from_context_scores(&sample(30, 0.0), "m", "qa-0").unwrap();
    let b = HeadScores::from_context_scores(&sample(30, 1.3), "m", "repoqa-0").unwrap();
    let (pa, pb) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    a.save(&pa).unwrap();
    b.save(&pb).unwrap();
    let la = HeadScores::load(&pa).unwrap();
    assert_eq!(la, a);
    let merged = HeadScores::load_merged(&[&pa, &pb]).unwrap();
    for l in [0, 2] {
        for h in 0..2 {
            assert_eq!(
                merged.get(l, h).unwrap(),
                a.get(l, h).unwrap().max(b.get(l, h).unwrap())
            );
        }
    }
    assert_eq!(
        merged.sources,
        vec!["qa-0".to_string(), "repoqa-0".to_string()]
    );
    // Overwrite in place (atomic rename) works and leaves no temp files behind.
    merged.save(&pa).unwrap();
    assert_eq!(HeadScores::load(&pa).unwrap(), merged);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn load_errors_name_the_file_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let err = HeadScores::load(&missing).unwrap_err();
    assert!(matches!(err, ScoreError::Io { .. }));
    assert!(err.to_string().contains("nope.safetensors"));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    let err = HeadScores::load(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.safetensors") && err.contains("not a safetensors"),
        "{err}"
    );

    let good = dir.path().join("good.safetensors");
    HeadScores::from_context_scores(&sample(5, 0.0), "m", "s")
        .unwrap()
        .save(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4]).unwrap();
    let err = HeadScores::load(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.safetensors"), "{err}");
}

#[test]
fn merge_and_expand_check_shapes() {
    let a = HeadScores::from_context_scores(&sample(8, 0.0), "m", "s").unwrap();
    let other_model = HeadScores::from_context_scores(&sample(8, 0.0), "other", "s").unwrap();
    assert!(a.merge_max(&other_model).is_err());
    let small = HeadScores::new(2, vec![0.1; 4], vec![true, true], "m", vec![]).unwrap();
    assert!(a.merge_max(&small).is_err());
    // Model with a different layer count / head count / scored set -> clear errors.
    let err = a
        .to_context_scores(8, &[Some(2), None])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 layers") || err.contains("layers"), "{err}");
    let err = a
        .to_context_scores(8, &[Some(4), None, Some(4)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("4 KV heads"), "{err}");
    assert!(a
        .to_context_scores(8, &[Some(2), Some(2), Some(2)])
        .is_err());
    // Matching model: head-constant expansion.
    let cs = a.to_context_scores(8, &[Some(2), None, Some(2)]).unwrap();
    assert!(cs
        .head(2, 1)
        .unwrap()
        .iter()
        .all(|v| *v == a.get(2, 1).unwrap()));
}

#[test]
fn select_heads_from_file_keeps_whole_heads() {
    // 2 layers x 4 heads, distinct scores.
    let values = vec![0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.4, 0.7];
    let hs = HeadScores::new(4, values, vec![true, true], "m", vec![]).unwrap();
    let sel = select_heads(&hs, 0.5, 16, &[Some(4), Some(4)]).unwrap();
    assert_eq!(sel.kept, 4 * 16);
    let kept_heads: Vec<(usize, usize)> = (0..2)
        .flat_map(|l| (0..4).map(move |h| (l, h)))
        .filter(|&(l, h)| sel.mask.is_kept(l, h, 0))
        .collect();
    assert_eq!(kept_heads, vec![(0, 0), (0, 2), (1, 1), (1, 3)]);
    for (l, h) in kept_heads {
        assert!((0..16).all(|p| sel.mask.is_kept(l, h, p)));
    }
    assert!(select_heads(&hs, 0.5, 16, &[Some(4)]).is_err());
}
