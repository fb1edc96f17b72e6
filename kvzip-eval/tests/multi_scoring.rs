//! `Engine::prefill_context_multi` (one prefill, several scorings) gives exactly the scores of
//! separate `prefill_context` calls, and `prune_with_selection` matches `prune`, on the tiny
//! random-weight llama / gemma3 fixture models of tests/fixtures/parity.

use std::path::PathBuf;

use kvzip_eval::methods::{Method, ScoreSource, ALL_METHODS};
use kvzip_models::engine::kvzip::{KvType, Scoring};
use kvzip_models::engine::Engine;
use kvzip_score::{HeadScores, Level};
use kvzip_templates::PromptIds;

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/parity")
        .join(arch)
}

fn ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (4 + s % (vocab as u64 - 4)) as u32
        })
        .collect()
}

fn check(arch: &str) {
    let engine = Engine::load(&fixture(arch)).expect("fixture model loads");
    let vocab = engine.spec().vocab_size;
    let prompt = PromptIds {
        system_ids: ids(1, 10, vocab),
        postfix_ids: ids(2, 4, vocab),
        repeat_first_ids: ids(3, 6, vocab),
        repeat_next_ids: ids(4, 9, vocab),
    };
    let ctx_ids = ids(5, 70, vocab);
    let chunk = 32;
    let single = |s: &Scoring| {
        engine
            .prefill_context(&prompt, &ctx_ids, s, KvType::Retain, &mut |_, _, _| {})
            .expect("single prefill")
    };
    let recon = single(&Scoring::Reconstruct { chunk });
    let head = HeadScores::from_context_scores(recon.scores().unwrap(), "fixture", "self").unwrap();
    let mut sources: Vec<ScoreSource> = Vec::new();
    for m in ALL_METHODS {
        if !sources.contains(&m.source()) {
            sources.push(m.source());
        }
    }
    let scorings: Vec<Scoring> = sources
        .iter()
        .map(|s| s.scoring(chunk, Some(&head)).unwrap())
        .collect();
    let (mut multi, scores) = engine
        .prefill_context_multi(
            &prompt,
            &ctx_ids,
            &scorings,
            KvType::Retain,
            &mut |_, _, _| {},
        )
        .expect("multi prefill");
    assert_eq!(scores.len(), scorings.len());
    for (s, got) in scorings.iter().zip(&scores) {
        let want = match s {
            Scoring::HeadScores(h) => h
                .to_context_scores(ctx_ids.len(), multi.layer_heads())
                .unwrap(),
            other => single(other).scores().unwrap().clone(),
        };
        assert_eq!(
            &want, got,
            "{arch}: scores of {s:?} differ between single and multi prefill"
        );
    }
    // prune_with_selection(select(pair)) == prune(pair) on the same cache.
    let mut plain = single(&Scoring::Reconstruct { chunk });
    plain.prune(0.3, Level::Pair).unwrap();
    let sel = Method::Kvzip.select(&scores[0], 0.3).unwrap();
    let report = multi.prune_with_selection(0.3, &sel).unwrap();
    assert!(
        (report.ratio_real - 0.3).abs() < 0.02,
        "{}",
        report.ratio_real
    );
    let lens = |c: &kvzip_models::engine::kvzip::ContextCache| {
        c.cache
            .layers()
            .iter()
            .map(|l| l.lens().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(&plain), lens(&multi), "{arch}: same keep set");
    // Every method selects and re-prunes in retain mode.
    for m in ALL_METHODS {
        let src = sources.iter().position(|s| *s == m.source()).unwrap();
        let sel = m.select(&scores[src], 0.5).unwrap();
        multi.prune_with_selection(0.5, &sel).unwrap();
        multi.unprune().unwrap();
    }
}

#[test]
fn multi_prefill_matches_single_prefills_llama() {
    check("llama");
}

#[test]
fn multi_prefill_matches_single_prefills_gemma3() {
    check("gemma3");
}
