//! Score fidelity against the HF-transformers fixtures of `scripts/make_score_fixtures.py`:
//! the score op on the stored rotated queries/keys reproduces the Python scores, and pair
//! selection at ratio 0.3 reproduces the stored keep set.

use std::path::PathBuf;

use kvzip_score::{score_chunk, select, ContextScores, LayerScores, Level, ScoreShape};
use safetensors::tensor::{Dtype, SafeTensors};

fn fixture(arch: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/scores")
        .join(format!("{arch}.safetensors"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

fn ints(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn score_op_reproduces_transformers_scores() {
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let bytes = fixture(arch);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (scores, sshape) = f32s(&st, "scores");
        let (q, qshape) = f32s(&st, "probe_q");
        let (keys, kshape) = f32s(&st, "probe_keys");
        let chunk = ints(&st, "probe_chunk");
        let n_sys = ints(&st, "sys_ids").len();
        let (q_len, n_q, d) = (qshape[0], qshape[1], qshape[2]);
        let (n_kv, rows) = (kshape[0], kshape[1]);
        let n_ctx = sshape[2];
        let shape = ScoreShape {
            q_len,
            n_kv_heads: n_kv,
            group: n_q / n_kv,
            head_dim: d,
            n_sys,
        };
        let chunk = chunk[0] as usize..chunk[1] as usize;
        let mut out = vec![0.0; n_kv * chunk.len()];
        score_chunk(
            &shape,
            &q,
            |h| &keys[h * rows * d..(h + 1) * rows * d],
            chunk.clone(),
            &mut out,
        )
        .unwrap();
        for h in 0..n_kv {
            for (j, p) in chunk.clone().enumerate() {
                let want = scores[h * n_ctx + p]; // scored layer 0
                let got = out[h * chunk.len() + j];
                assert!(
                    (got - want).abs() < 1e-5,
                    "{arch} head {h} pos {p}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn pair_selection_reproduces_fixture_keep_set() {
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let bytes = fixture(arch);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (scores, shape) = f32s(&st, "scores");
        let keep = st.tensor("keep_pair_0_3").unwrap().data().to_vec();
        let (n_layers, n_heads, n_ctx) = (shape[0], shape[1], shape[2]);
        let per = n_heads * n_ctx;
        let layers = (0..n_layers)
            .map(|l| {
                Some(LayerScores {
                    n_heads,
                    values: scores[l * per..(l + 1) * per].to_vec(),
                })
            })
            .collect();
        let cs = ContextScores::from_layers(n_ctx, layers).unwrap();
        let sel = select(&cs, 0.3, Level::Pair).unwrap();
        assert_eq!(sel.kept, keep.iter().filter(|k| **k == 1).count(), "{arch}");
        for l in 0..n_layers {
            let bits = &sel.mask.layer(l).unwrap().bits;
            for (i, b) in bits.iter().enumerate() {
                assert_eq!(*b, keep[l * per + i] == 1, "{arch} layer {l} index {i}");
            }
        }
    }
}
